"""The rules of usp's sequence parallelism that the runtime, the planner and the tests all need, in one place.

Pure Python: this module imports nothing from torch or from the rest of usp, so the planner (``usp.planner``) and
anything else that only reasons about a split can read it without paying for torch. The runtime modules import
these names from here (``usp.mesh``, ``usp.layout``, ``usp.attention``, ``usp.ulysses`` re-export them), the planner
prices what they say, and the tests compare the collectives they count with :func:`layer_collectives`.

Notation: ``U`` Ulysses degree, ``R`` ring degree, ``P = U * R``, ``H`` query heads, ``Hkv`` K/V heads,
``Hkv'`` K/V heads after replication, ``G`` head groups, ``C`` head chunks.

* Placements and the rank grid (:class:`Placement`, :func:`sequence_parallel_rank_grid`).
* Layouts and the sequence-length multiple each needs (:class:`Layout`, :func:`choose_layout`,
  :func:`required_multiple`; Note [zigzag layout] in ``usp/layout.py``).
* Heads: K/V replication (:func:`kv_replication`), the valid head chunks (:func:`valid_head_chunks`) and the
  head-group pipeline depth (:func:`head_groups`; Note [head-group pipeline] in ``usp/ulysses.py``).
* Communication: the ring's steps and what each step sends (:func:`ring_steps`, :func:`forward_step_rotations`,
  :func:`backward_step_rotations`) and the collective calls of one layer (:func:`layer_collectives`).
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import List, Tuple, Union

__all__ = [
    "Placement", "PLACEMENTS", "sequence_parallel_rank_grid", "ulysses_stride", "ring_stride",
    "Layout", "choose_layout", "required_multiple",
    "kv_replication", "replicated_kv_heads", "valid_head_chunks", "head_groups",
    "ring_steps", "forward_step_rotations", "backward_step_rotations",
    "PassCollectives", "LayerCollectives", "layer_collectives",
]


# ------------------------------------------------------------------------------------------- placements, ranks
class Placement(str, enum.Enum):
    """Which sequence-parallel axis gets adjacent ranks. Ranks are ``data_parallel x (ulysses x ring)``: the
    ``P = U * R`` ranks of one data-parallel replica are contiguous, and inside them

    * ``ULYSSES_INNER`` ("head-first", the default): ``rank = dp * P + ring_rank * U + ulysses_rank``;
    * ``RING_INNER``: ``rank = dp * P + ulysses_rank * R + ring_rank``.
    """

    ULYSSES_INNER = "ulysses_inner"
    RING_INNER = "ring_inner"

    @classmethod
    def parse(cls, value: Union[str, "Placement"], argument: str = "placement") -> "Placement":
        """A placement from itself, its value or an alias ("head_first", "ulysses_first", "ring_first"; any case,
        ``-`` for ``_``); a ValueError naming ``argument`` and the valid values otherwise."""
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            normalized = value.strip().lower().replace("-", "_")
            aliases = {"head_first": cls.ULYSSES_INNER, "ulysses_first": cls.ULYSSES_INNER,
                       "ring_first": cls.RING_INNER}
            if normalized in aliases:
                return aliases[normalized]
            for member in cls:
                if member.value == normalized:
                    return member
        raise ValueError(
            f"{argument}={value!r} is not a valid placement; valid values: "
            + ", ".join(repr(m.value) for m in cls)
        )


#: the placement names, the default first
PLACEMENTS: Tuple[str, ...] = tuple(p.value for p in Placement)


def ulysses_stride(ulysses: int, ring: int, placement: Union[str, Placement]) -> int:
    """Rank distance between consecutive members of a Ulysses group."""
    return 1 if Placement.parse(placement) is Placement.ULYSSES_INNER else ring


def ring_stride(ulysses: int, ring: int, placement: Union[str, Placement]) -> int:
    """Rank distance between consecutive members of a ring (before the wrap-around)."""
    return ulysses if Placement.parse(placement) is Placement.ULYSSES_INNER else 1


def sequence_parallel_rank_grid(world_size: int, ulysses: int, ring: int,
                                placement: Union[str, Placement]) -> List[List[List[int]]]:
    """Global ranks as nested lists ``grid[dp][ring_rank][ulysses_rank]`` for the given placement (see
    :class:`Placement`). Pure function (no process groups): the mesh builds its groups from it, the planner
    loads the links with it."""
    sp = ulysses * ring
    u_stride, r_stride = ulysses_stride(ulysses, ring, placement), ring_stride(ulysses, ring, placement)
    return [[[dp * sp + r * r_stride + u * u_stride for u in range(ulysses)] for r in range(ring)]
            for dp in range(world_size // sp)]


# ---------------------------------------------------------------------------------------------------- layouts
class Layout(enum.Enum):
    """How the global sequence is cut over the ring (Note [zigzag layout] in ``usp/layout.py``)."""

    CONTIGUOUS = "contiguous"
    ZIGZAG = "zigzag"


def choose_layout(ring: int, causal: bool) -> Layout:
    """Zigzag (``2R`` chunks, ring rank ``r`` holds chunks ``r`` and ``2R-1-r``) for causal attention over a ring of
    more than one; contiguous chunks otherwise."""
    return Layout.ZIGZAG if causal and ring > 1 else Layout.CONTIGUOUS


def required_multiple(ulysses: int, ring: int, causal: bool) -> int:
    """The global sequence length must be a multiple of this for the layout (U, R, causal) to exist: ``U * R``, or
    ``lcm(2R, R * U)`` for the zigzag layout (``2R`` chunks, each ring rank's part split over ``U``)."""
    if choose_layout(ring, causal) is Layout.ZIGZAG:
        return math.lcm(2 * ring, ring * ulysses)
    return ring * ulysses


# ------------------------------------------------------------------------------------------------------ heads
def kv_replication(kv_heads: int, ulysses: int) -> int:
    """How many times each K/V head is repeated so that ``ulysses`` divides the K/V head count (1 = none): up to
    ``lcm(kv_heads, ulysses)`` heads, which divides the query heads whenever ``ulysses`` and ``kv_heads`` do."""
    return math.lcm(kv_heads, ulysses) // kv_heads


def replicated_kv_heads(kv_heads: int, ulysses: int) -> int:
    """``Hkv'``: the K/V heads the all-to-all moves, after :func:`kv_replication`."""
    return kv_heads * kv_replication(kv_heads, ulysses)


def valid_head_chunks(heads: int, kv_heads: int, ulysses: int) -> List[int]:
    """The ``head_chunks`` values that split the heads each Ulysses rank gets evenly: divisors of its query heads
    that divide its K/V heads (after replication) or are a multiple of them (several chunks per K/V head). Chunks
    that share a K/V head round their dK/dV partial sums once more; replicated K/V heads (``kv_heads % ulysses !=
    0``) round them once more again when the replicas are summed, which is more than the accuracy usp promises, so
    sharing is left out there."""
    replicated = kv_replication(kv_heads, ulysses) > 1
    q_local, kv_local = heads // ulysses, replicated_kv_heads(kv_heads, ulysses) // ulysses
    return [c for c in range(1, q_local + 1)
            if q_local % c == 0 and (kv_local % c == 0 or (c % kv_local == 0 and not replicated))]


def head_groups(heads: int, kv_heads: int, ulysses: int, head_chunks: int = 1) -> int:
    """Pipeline depth ``G`` for ``heads`` query and ``kv_heads`` (already replicated) K/V heads over ``ulysses``
    (Note [head-group pipeline] in ``usp/ulysses.py``): 2 when each Ulysses rank's query and K/V heads split into
    two groups that each still split into ``head_chunks`` ring passes (Note [head chunks] in ``usp/ring.py``),
    else 1."""
    if ulysses == 1:
        return 1
    q_local, kv_local = heads // ulysses, kv_heads // ulysses
    if q_local % (2 * head_chunks) or kv_local % 2:
        return 1
    # each group's heads must still split into head_chunks (ring.py _chunk_slices)
    kv_group = kv_local // 2
    return 2 if kv_group % head_chunks == 0 or head_chunks % kv_group == 0 else 1


# ---------------------------------------------------------------------------------------------- communication
def ring_steps(ring: int, causal: bool) -> int:
    """Steps of one pass round the ring: step ``j`` computes this rank's queries against ring rank ``r - j``'s
    K/V (``usp/ring.py``). The dense schedules (``FullSchedule``, ``ZigzagCausalSchedule`` in ``usp/layout.py``)
    visit every rank's K/V: ``R`` steps.

    Schedule-dependent counts live here: a schedule that needs fewer steps (e.g. a sliding window that no query
    of a distant rank reaches, issue 11) returns its step count here (with the arguments it needs), and the
    rotations of :func:`forward_step_rotations` / :func:`backward_step_rotations`, the counts of
    :func:`layer_collectives` and the planner's ring terms all follow from it."""
    return ring


def forward_step_rotations(step: int, steps: int) -> int:
    """K/V rotations (batched isend/irecv) in flight under forward step ``step``'s block, of ``steps``: the next
    step's K/V, posted before the block (double-buffered); the last step sends nothing. ``steps - 1`` a pass."""
    return 1 if step + 1 < steps else 0


def backward_step_rotations(step: int, steps: int) -> Tuple[int, int]:
    """``(K/V, dK/dV)`` rotations in flight under backward step ``step``'s block (Note [reverse backward] in
    ``usp/ring.py``).

    The backward walks the forward's steps in reverse, ``j = steps-1 .. 0``, starting on the K/V block the forward
    ended on. Under step ``j``'s block travel the K/V for step ``j - 1`` when ``j >= 2`` (step 0 is the rank's own
    block) and the dK/dV partial sum posted after step ``j + 1`` when ``j <= steps - 2``: ``steps - 2`` K/V and
    ``steps - 1`` dK/dV rotations a pass, the last dK/dV under the diagonal block. With head chunks each pass
    first fetches the block the forward ended on, exposed: one K/V rotation more (:func:`layer_collectives`)."""
    return (1 if step >= 2 else 0), (1 if step <= steps - 2 else 0)


@dataclass(frozen=True)
class PassCollectives:
    """Collective calls of one pass (forward or backward) of one attention layer, per rank."""

    #: Ulysses trades (``torch.distributed.all_to_all_single`` calls)
    all_to_all: int
    #: ring rotations (``torch.distributed.batch_isend_irecv`` calls: K/V and dK/dV travel as separate rotations)
    p2p: int


@dataclass(frozen=True)
class LayerCollectives:
    """Collective calls of one attention layer, forward and backward (:func:`layer_collectives`)."""

    forward: PassCollectives
    backward: PassCollectives


def layer_collectives(ulysses: int, ring: int, heads: int, kv_heads: int, head_chunks: int = 1,
                      causal: bool = True, return_lse: bool = False) -> LayerCollectives:
    """The collective calls of one layer of ``usp.long_context_attention`` on a ``ulysses x ring`` mesh, per rank.

    ``kv_heads`` as the caller passes them (replicated here). ``G = head_groups(...)`` head groups
    (Note [head-group pipeline] in ``usp/ulysses.py``), each running ``C = head_chunks`` ring passes:

    * all-to-alls (``U > 1``): forward Q, K, V in and the output back, backward dO in and dQ, dK, dV back, per head
      group: ``4G`` per pass; ``return_lse`` adds one forward trade of the LSE.
    * ring rotations (``R > 1``), per head group and chunk, :func:`ring_steps` ``= S`` steps: forward ``S - 1``
      K/V (:func:`forward_step_rotations`); backward ``S - 2`` K/V and ``S - 1`` dK/dV
      (:func:`backward_step_rotations`), plus one K/V fetch when chunked (``C > 1``: the block the forward ended
      on is not kept, Note [head chunks] in ``usp/ring.py``).
    """
    replicated = replicated_kv_heads(kv_heads, ulysses)
    groups = head_groups(heads, replicated, ulysses, head_chunks)
    a2a = 4 * groups if ulysses > 1 else 0
    lse = 1 if ulysses > 1 and return_lse else 0
    forward_p2p = backward_p2p = 0
    if ring > 1:
        steps = ring_steps(ring, causal)
        forward_p2p = sum(forward_step_rotations(j, steps) for j in range(steps))
        backward_p2p = sum(sum(backward_step_rotations(j, steps)) for j in range(steps))
        backward_p2p += 1 if head_chunks > 1 else 0
    passes = groups * head_chunks
    return LayerCollectives(forward=PassCollectives(all_to_all=a2a + lse, p2p=passes * forward_p2p),
                            backward=PassCollectives(all_to_all=a2a, p2p=passes * backward_p2p))
