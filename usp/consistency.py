"""Ranks that disagree: every rank of the sequence-parallel group agrees on the call before any data moves.

Every attention call runs the same collectives on every rank of a replica's sequence-parallel group, sized from
that rank's own arguments. If one rank's call differs, the others cannot tell: equal message sizes give silently
wrong results on *every* rank (``causal`` or ``softmax_scale`` differs, fp16 against bf16, ``[b, s]`` reshaped to
the same bytes, other ``cu_seqlens`` with the same local token count), unequal sizes abort the process inside the
collective library, and a rank whose validation raised leaves the others waiting in a collective until the
timeout.

Note [call agreement]. Before the first all-to-all or P2P of a call, ``agree`` runs on every rank:

1. the rank validates its own call, catching its exception instead of raising it;
2. it encodes a fixed-size signature, ``SLOTS`` int64 values: a version, the validation outcome, the entry point
   and one value per field the path reports (``describe``): every argument that changes the collectives or the
   math (local shape, dtype, device type, mesh degrees, causal, the resolved softmax scale's bits, return_lse,
   head_chunks, the resolved kernel's name, deterministic, whether a backward will run, the packed batch's
   documents). Non-integer values enter as a stable 64-bit digest (blake2b of their ``repr``), never Python's
   ``hash`` (salted per process for strings);
3. one ``all_gather`` of the signatures over ``mesh.consistency_group``, a gloo group over the replica's
   sequence-parallel ranks, so the check never waits on a GPU stream;
4. every rank sees every signature and so takes the same branch: all equal, run the call; some rank failed
   validation, every rank raises (the failing ranks their own error, the others the same exception type naming
   which rank failed and why); signatures differ, a second gather of readable values and every rank raises
   ``RankMismatchError`` naming each field that differs and each rank's value ("causal differs: rank 0 True,
   rank 1 False").

Note [deferred agreement]. The gather of step 3 takes a few hundred microseconds on the host (more when the ranks
reach the call at different times), during which the GPU would sit idle. The eager entry points therefore agree
with ``defer=True``: a rank whose own call validated starts the gather and goes on to launch the work that needs
no other rank (the ring's step 0: its own diagonal block; a ring of one step, such as a packed batch with no
document cut, all of it), then waits for the gather and settles the call before its first P2P (the ring) or
all-to-all (Ulysses waits before it starts). Nothing moves between ranks before every rank has agreed, so the
guarantees above hold; the only difference is that a rank whose call was valid may have computed its own step 0
before raising (results it throws away). A rank whose validation failed launches nothing: it gathers and raises
at once. ``usp.compiled``'s op agrees without deferring.

A check that some ranks run and others skip is itself a hang, so *whether* a call is checked never depends on
the call's arguments: it depends only on the mesh's policy and on how many calls the mesh has made, which is the
same on every rank (each call runs collectives on all of them). The policy is ``mesh.check_calls``
(``CallCheck``):

* ``"always"`` (default): every call. The cost is one gloo all-gather of ``SLOTS * 8`` bytes plus about 10 us of
  encoding on the host, before the call's own collectives (``R - 1`` ring steps forward and as many backward, four
  all-to-alls per Ulysses head group): one more small round on a call that makes many, at the sequence lengths usp
  is for, where a call takes milliseconds to seconds. ``benchmarks/consistency_overhead.py`` measures it, alone and
  against whole calls (numbers in benchmarks/RESULTS.md). Only checking every call also catches a difference that
  appears late, such as one rank's data loader handing it another packed batch at step 1000.
* an int ``N``: the first ``N`` calls on this mesh (e.g. one training step's worth of layers), then none;
  catches a wrong configuration at start-up for no steady-state cost, but not a difference that appears later,
  and after the ``N``-th call a rank that fails validation raises alone again.
* ``"off"``: no check (e.g. when the host-side sync point must go, as under CUDA graphs).

Meshes of one sequence-parallel rank never check (nobody to disagree with). A ``mesh`` argument that is not a
``SequenceParallelMesh`` raises on that rank alone: without a mesh there is no group to agree on.
"""
from __future__ import annotations

import hashlib
import struct
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, TypeVar, Union

import torch
import torch.distributed as dist

__all__ = ["CallCheck", "RankMismatchError", "agree"]

T = TypeVar("T")

#: int64 values in a signature: fixed, so that ranks on different paths still gather equal sizes
SLOTS = 32
_HEADER = 4  # version, validation outcome, entry point, number of fields
_VERSION = 0x7573_7001  # "usp" + format 1
_OK, _FAILED = 0, 1


class RankMismatchError(ValueError):
    """The ranks of a sequence-parallel group made different calls; raised on every rank, naming each field."""


class CallCheck:
    """When a mesh's attention calls are checked (Note [call agreement]).

    ``CallCheck.parse(value)`` takes ``"always"``, ``"off"`` or a positive int ``N`` (the first ``N`` calls) and
    returns a new policy with its own call counter: the mesh holds one, so two meshes never share a count.
    """

    __slots__ = ("limit", "calls")

    def __init__(self, limit: Union[int, None]):
        #: None: every call; 0: none; N: the first N calls
        self.limit = limit
        self.calls = 0

    @classmethod
    def parse(cls, value: Union[str, int, "CallCheck"], argument: str = "check_calls") -> "CallCheck":
        if isinstance(value, CallCheck):
            return cls(value.limit)
        if isinstance(value, str) and value.strip().lower() in ("always", "off"):
            return cls(None if value.strip().lower() == "always" else 0)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return cls(value)
        raise ValueError(
            f"{argument}={value!r} is not a valid call check; valid values: 'always' (default), 'off', "
            "or a positive int N (check the first N calls)"
        )

    def due(self) -> bool:
        """Whether this call is checked; counts the call. The same answer on every rank of the mesh."""
        if self.limit is None:
            return True
        self.calls += 1
        return self.calls <= self.limit

    def __repr__(self) -> str:
        return {None: "'always'", 0: "'off'"}.get(self.limit, str(self.limit))


def _policy(mesh) -> CallCheck:
    policy = getattr(mesh, "check_calls", None)  # until SequenceParallelMesh has the field: the default
    return policy if isinstance(policy, CallCheck) else _ALWAYS


_ALWAYS = CallCheck(None)  # limit None never counts: immutable in effect, safe to share


def agree(mesh, entry: str, validate: Callable[[], T], describe: Callable[[T], Dict[str, Any]],
          defer: bool = False):
    """Run ``validate()`` on every rank of ``mesh``'s sequence-parallel group and make sure every rank made the
    same call (Note [call agreement]); return ``validate()``'s result, or raise on every rank.

    ``entry`` names the public function in errors. ``describe(result)`` gives the call's fields in a fixed order,
    ``name -> value`` (ints, bools, floats, strings, dtypes...): every argument that changes the collectives or
    the math. No collective on the data groups, none on the GPU.

    ``defer``: return ``(result, ready)`` as soon as this rank's own validation passed, the gather of signatures
    left running; ``ready`` (None when no check is due) completes the check, raising as above, and must be
    called on every rank before the call's first collective on the data groups (Note [deferred agreement]). A
    rank whose own validation failed still gathers and raises here, before returning.
    """
    from .mesh import SequenceParallelMesh  # lazy: usp.mesh imports this module (CallCheck)

    if not isinstance(mesh, SequenceParallelMesh) or mesh.sequence_parallel_size == 1 or not _policy(mesh).due():
        result = validate()
        return (result, None) if defer else result
    try:
        result = validate()
        failure, fields = None, describe(result)
    except Exception as error:  # noqa: BLE001 - every rank must learn of it before anyone raises
        failure, fields = error, {}
    group = mesh.consistency_group
    signature = _encode(entry, failure is None, fields)
    if defer and failure is None:
        return result, _Pending(entry, fields, signature, group)
    _settle(entry, failure, fields, _gather_signatures(signature, group)[0], group)
    return (result, None) if defer else result


class _Pending:
    """A gather of signatures in flight (``agree(defer=True)``); calling it waits for it and settles the call
    (returns, or raises on every rank). Later calls do nothing."""

    def __init__(self, entry: str, fields: Dict[str, Any], signature: torch.Tensor, group):
        self.entry, self.fields, self.group = entry, fields, group
        self.gathered, self.work = _gather_signatures(signature, group, wait=False)

    def __call__(self) -> None:
        if self.work is None:
            return
        work, self.work = self.work, None
        work.wait()
        _settle(self.entry, None, self.fields, self.gathered, self.group)


def _settle(entry: str, failure: Optional[Exception], fields: Dict[str, Any], signatures: torch.Tensor,
            group) -> None:
    """Step 4 of Note [call agreement] on the gathered ``signatures``: return if every rank made this call, else
    raise (this rank's own ``failure``, or the error naming the ranks that failed or the fields that differ)."""
    statuses = signatures[:, 1].tolist()
    if any(s != _OK for s in statuses):
        if all(s != _OK for s in statuses):
            raise failure  # every rank has its own error; no one waits
        reasons = _gather_objects(None if failure is None else (type(failure).__name__, str(failure)), group)
        if failure is not None:
            raise failure
        raise _failure_elsewhere(entry, reasons, dist.get_process_group_ranks(group))
    if bool((signatures != signatures[0]).any()):
        readable = _gather_objects((entry, {name: str(value) for name, value in fields.items()}), group)
        raise RankMismatchError(_mismatch_message(readable, dist.get_process_group_ranks(group)))


# ---------------------------------------------------------------------------------------------- encoding
def _digest(value: Any) -> int:
    """A 64-bit value the same on every process (Python's ``hash`` of a string is salted per process)."""
    return struct.unpack("<q", hashlib.blake2b(repr(value).encode(), digest_size=8).digest())[0]


def _code(value: Any) -> int:
    if isinstance(value, (bool, int)) and -(2 ** 63) <= value < 2 ** 63:
        return int(value)
    if isinstance(value, float):
        return struct.unpack("<q", struct.pack("<d", value))[0]  # the exact bits: 0.125 vs 0.1250001 differ
    return _digest(value)


def _encode(entry: str, ok: bool, fields: Dict[str, Any]) -> torch.Tensor:
    codes = [_code(value) for value in fields.values()]
    if len(codes) > SLOTS - _HEADER:  # fold the overflow into the last slot
        codes = codes[: SLOTS - _HEADER - 1] + [_digest(tuple(codes[SLOTS - _HEADER - 1:]))]
    row = [_VERSION, _OK if ok else _FAILED, _digest(entry), len(fields)] + codes
    return torch.tensor(row + [0] * (SLOTS - len(row)), dtype=torch.int64)


def _gather_signatures(signature: torch.Tensor, group, wait: bool = True):
    """``([group size, SLOTS], work)``: every rank's signature, in group rank order, once ``work`` (None when
    ``wait``, the gather then done) is waited for."""
    gathered = torch.empty(dist.get_world_size(group), SLOTS, dtype=torch.int64)
    # rows of one buffer: no copy back
    work = dist.all_gather(list(gathered.unbind(0)), signature, group=group, async_op=not wait)
    return gathered, work


def _gather_objects(obj: Any, group) -> List[Any]:
    gathered: List[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, obj, group=group)
    return gathered


# ---------------------------------------------------------------------------------------------- errors
def _ranks_by_value(values: Sequence[str], ranks: Sequence[int]) -> str:
    """``"rank 0 True, rank 1 False"``; ranks with one value are grouped (``"ranks 0, 2 True"``)."""
    order: Dict[str, List[int]] = {}
    for value, rank in zip(values, ranks):
        order.setdefault(value, []).append(rank)
    return ", ".join(
        f"{'rank' if len(members) == 1 else 'ranks'} {', '.join(map(str, members))} {value}"
        for value, members in order.items()
    )


def _mismatch_message(readable: Sequence[Tuple[str, Dict[str, str]]], ranks: Sequence[int]) -> str:
    entries = [entry for entry, _ in readable]
    names: List[str] = []
    for _, fields in readable:
        names += [name for name in fields if name not in names]
    parts = []
    if len(set(entries)) > 1:
        parts.append(f"entry point differs: {_ranks_by_value(entries, ranks)}")
    for name in names:
        values = [fields.get(name, "(none)") for _, fields in readable]
        if len(set(values)) > 1:
            parts.append(f"{name} differs: {_ranks_by_value(values, ranks)}")
    return (
        f"usp.{entries[0]}: the ranks of this sequence-parallel group made different calls; "
        + "; ".join(parts or ["signatures differ (no readable field differs)"])
        + ". Every rank must pass the same options and shapes of the same shard layout; no data moved between "
        "the ranks and no rank returned a result"
    )


def _failure_elsewhere(entry: str, reasons: Sequence[Any], ranks: Sequence[int]) -> Exception:
    """The error a rank whose call was valid raises when others' were not: the first failing rank's type."""
    failed = [(rank, reason) for rank, reason in zip(ranks, reasons) if reason is not None]
    kind = TypeError if failed[0][1][0] == "TypeError" else ValueError
    listed = "; ".join(f"rank {rank} raised {name}: {message}" for rank, (name, message) in failed)
    return kind(
        f"usp.{entry}: another rank of this sequence-parallel group rejected its call, so no rank runs it "
        f"(this rank's call was valid): {listed}"
    )
