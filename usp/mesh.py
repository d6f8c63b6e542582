"""The sequence-parallel mesh: one validated object that owns every process group usp uses.

Ranks are arranged as ``data_parallel x (ulysses x ring)``. The sequence-parallel block of ``P = U * R`` ranks is
the innermost (contiguous) part of the world; inside it the *placement* decides which of the two axes is
contiguous:

* ``Placement.ULYSSES_INNER`` ("head-first", the default): ``rank = dp * P + ring_rank * U + ulysses_rank``.
  The Ulysses all-to-all (the bandwidth-hungry collective) stays on adjacent ranks, i.e. inside a node on NVLink;
  the ring (whose P2P transfer hides under compute) crosses nodes. This is LoongTrain's "head-first" placement
  and yunchang's ``use_ulysses_low=True``.
* ``Placement.RING_INNER``: ``rank = dp * P + ulysses_rank * R + ring_rank``.

Nothing in usp reads a process group from a global: the mesh is passed explicitly to every function.

Note [one construction path]
----------------------------
``SequenceParallelMesh(...)``, ``from_plan`` and ``from_device_mesh`` differ only in how they describe the layout
(degrees on a process group, or dims of a DeviceMesh). Each turns its arguments into a ``_Request``: the rank grid
``grid[dp][ring_rank][ulysses_rank]`` of global ranks, a small signature of the arguments, the validation outcome
and where the groups come from. ``_construct`` then, on every rank of the parent group and before any group is
created, all-gathers the signature (one small int tensor on the parent's backend): if any rank's arguments failed
validation, or the ranks asked for different meshes, every rank raises (a ``ValueError`` naming what differs)
instead of some ranks hanging in ``new_group``. Only then are the groups created, the coordinates read off the
grid (data-parallel rank and group included) and the object frozen. On the whole world every rank creates every
group in one order (as DeviceMesh does); on a smaller ``group=`` only the members of each group create it
(``use_local_synchronization``), so data-parallel replicas can build their meshes independently.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist

from .spec import Placement, sequence_parallel_rank_grid  # noqa: F401 (the rank layout lives in usp.spec)

__all__ = ["Placement", "SequenceParallelMesh"]


def _check_degree(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a positive int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {value}")
    return value


# ---------------------------------------------------------------------------------------------------- requests
_PLACEMENT_CODES = {Placement.ULYSSES_INNER: 0, Placement.RING_INNER: 1}
_UNKNOWN = -1  # signature value of an argument that failed validation or does not apply


@dataclass
class _Request:
    """What a construction path hands to ``_construct`` (see Note [one construction path])."""

    source: str  # "SequenceParallelMesh(...)", "from_plan" or "from_device_mesh", for messages
    parent: Optional[dist.ProcessGroup]  # the agreement runs over it (None: the default group)
    group: Optional[dist.ProcessGroup]  # stored as ``mesh.group``
    signature: Dict[str, int]  # what every rank must agree on, in message order
    error: Optional[Exception] = None  # this rank's validation failure, raised after the agreement
    ulysses: int = 1
    ring: int = 1
    placement: Placement = Placement.ULYSSES_INNER
    check_calls: Any = None  # usp.consistency.CallCheck
    grid: Optional[List[List[List[int]]]] = None  # global ranks grid[dp][ring_rank][ulysses_rank]
    # the groups a DeviceMesh already has: () -> (ulysses_group, ring_group, data_parallel_group), None = create it
    existing_groups: Optional[Callable[[], Tuple[Any, Any, Any]]] = None
    # backend of the Ulysses, ring and data-parallel groups usp creates (None: the default group's)
    backend: Optional[str] = None


def _degrees_request(source: str, ulysses: Any, ring: Any, placement: Any, group: Any,
                     world_size: Any = None, check_calls: Any = "always") -> _Request:
    """The request of ``SequenceParallelMesh(...)`` and ``from_plan``: degrees laid out on ``group``."""
    if group is dist.GroupMember.NON_GROUP_MEMBER:  # what new_group returned on a rank outside its ranks
        raise ValueError(f"{source}: this process (global rank {dist.get_rank()}) is not a member of group "
                         "(new_group returned NON_GROUP_MEMBER here); build the mesh only on the ranks of group")
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be None (the default group) or a torch.distributed.ProcessGroup, "
                        f"got {type(group).__name__}")
    parent = group if group is not None else dist.group.WORLD
    parent_ranks = dist.get_process_group_ranks(parent)
    if dist.get_rank(parent) < 0:  # the agreement cannot include a non-member: say so at once
        raise ValueError(
            f"{source}: this process (global rank {dist.get_rank()}) is not a member of group (global ranks "
            f"{parent_ranks}); build the mesh only on the ranks of group"
        )
    size = len(parent_ranks)
    request = _Request(source, group, group, {
        "ulysses": ulysses if _is_int(ulysses) else _UNKNOWN,
        "ring": ring if _is_int(ring) else _UNKNOWN,
        "placement": _placement_code(placement),
        "group size": size,
        "check_calls": _check_calls_code(check_calls),
    })
    try:
        request.check_calls = _parse_check_calls(check_calls)
        request.ulysses = _check_degree("ulysses", ulysses)
        request.ring = _check_degree("ring", ring)
        request.placement = Placement.parse(placement)
        if world_size is not None and world_size != size:
            raise ValueError(
                f"plan.world_size={world_size!r} but the mesh is being built on {size} ranks (the size of "
                f"group); make the plan for world_size={size} (usp.plan(world_size={size}, ...)) or build the "
                f"mesh on a group of {world_size!r} ranks"
            )
        sp_size = request.ulysses * request.ring
        if size % sp_size != 0:
            raise ValueError(
                f"ulysses * ring = {request.ulysses} * {request.ring} = {sp_size} must divide the world size "
                f"{size}; valid sequence-parallel sizes here: {_divisors(size)}"
            )
    except (TypeError, ValueError) as error:
        request.error = error
        return request
    grid = sequence_parallel_rank_grid(size, request.ulysses, request.ring, request.placement)
    request.grid = [[[parent_ranks[i] for i in row] for row in block] for block in grid]  # group index -> global
    return request


def _device_mesh_request(device_mesh: Any, ulysses_dim: Any, ring_dim: Any, check_calls: Any = "always") -> _Request:
    """The request of ``from_device_mesh``: the DeviceMesh's dims give the grid and the groups."""
    from torch.distributed.device_mesh import DeviceMesh

    source = "from_device_mesh"
    if not isinstance(device_mesh, DeviceMesh):
        raise TypeError(f"device_mesh must be a torch.distributed.DeviceMesh, got {type(device_mesh).__name__}")
    if device_mesh.get_coordinate() is None:
        raise ValueError(f"{source}: this process (global rank {dist.get_rank()}) is not part of device_mesh "
                         f"(ranks {device_mesh.mesh.flatten().tolist()}); call it on the ranks of the DeviceMesh only")
    ranks = device_mesh.mesh
    if ranks.numel() == dist.get_world_size():
        parent = None
    elif device_mesh.ndim == 1:
        parent = device_mesh.get_group(0)
    else:  # a multi-dim slice of a larger DeviceMesh: a group over its ranks, for the agreement only
        parent = dist.new_group(sorted(ranks.flatten().tolist()), backend="gloo", use_local_synchronization=True)
    request = _Request(source, parent, None, {
        "ulysses_dim": _UNKNOWN, "ring_dim": _UNKNOWN, "ulysses": _UNKNOWN, "ring": _UNKNOWN,
        "placement": _UNKNOWN, "group size": ranks.numel(), "check_calls": _check_calls_code(check_calls),
    })
    try:
        request.check_calls = _parse_check_calls(check_calls)
        names = tuple(device_mesh.mesh_dim_names or ())
        indices = {}
        for argument, dim in (("ulysses_dim", ulysses_dim), ("ring_dim", ring_dim)):
            if dim is None:
                continue
            if isinstance(dim, str):
                if dim not in names:
                    raise ValueError(f"{argument}={dim!r} is not a dimension of the DeviceMesh; valid names: {names}")
                indices[argument] = names.index(dim)
            elif isinstance(dim, int) and not isinstance(dim, bool):
                if not 0 <= dim < device_mesh.ndim:
                    raise ValueError(f"{argument}={dim} is out of range; valid indices: 0 to {device_mesh.ndim - 1} "
                                     f"(the DeviceMesh has {device_mesh.ndim} dims) or a dim name {names}")
                indices[argument] = dim
            else:
                raise TypeError(f"{argument} must be None, a dim name {names} or a dim index, "
                                f"got {type(dim).__name__} {dim!r}")
            request.signature[argument] = indices[argument]
        if not indices:
            raise ValueError("from_device_mesh needs at least one of ulysses_dim or ring_dim (a dim name or index)")
        u_index, r_index = indices.get("ulysses_dim"), indices.get("ring_dim")
        if u_index is not None and u_index == r_index:
            raise ValueError(f"ulysses_dim and ring_dim must be different DeviceMesh dimensions, both are "
                             f"dim {u_index}")
    except (TypeError, ValueError) as error:
        request.error = error
        return request

    request.ulysses = device_mesh.size(u_index) if u_index is not None else 1
    request.ring = device_mesh.size(r_index) if r_index is not None else 1
    # the DeviceMesh's last dims hold adjacent ranks: the later of the two dims is the inner one
    request.placement = (Placement.RING_INNER if u_index is not None and r_index is not None and r_index > u_index
                         else Placement.ULYSSES_INNER)
    request.signature.update(ulysses=request.ulysses, ring=request.ring,
                             placement=_PLACEMENT_CODES[request.placement])
    # grid[dp][ring_rank][ulysses_rank]: ring and Ulysses dims moved last, every other dim flattened into dp
    # (row-major, so the data-parallel rank is this rank's coordinate over the remaining dims)
    grid, ndim = ranks, ranks.ndim
    u_axis, r_axis = u_index, r_index
    if r_axis is None:
        grid, r_axis, ndim = grid.unsqueeze(-1), ndim, ndim + 1
    if u_axis is None:
        grid, u_axis, ndim = grid.unsqueeze(-1), ndim, ndim + 1
    grid = grid.movedim((r_axis, u_axis), (-2, -1)).reshape(-1, request.ring, request.ulysses)
    request.grid = grid.tolist()
    rest = [d for d in range(device_mesh.ndim) if d not in (u_index, r_index)]

    def existing_groups():
        return (device_mesh.get_group(u_index) if u_index is not None else None,
                device_mesh.get_group(r_index) if r_index is not None else None,
                device_mesh.get_group(rest[0]) if len(rest) == 1 else None)

    request.existing_groups = existing_groups
    return request


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _placement_code(value: Any) -> int:
    try:
        return _PLACEMENT_CODES[Placement.parse(value)]
    except ValueError:
        return _UNKNOWN


def _parse_check_calls(value: Any):
    from .consistency import CallCheck  # lazy: usp.consistency reads the mesh's policy

    return CallCheck.parse(value)


_ALWAYS_CODE = -2  # signature value of check_calls="always" ("off" is 0, N is N)


def _check_calls_code(value: Any) -> int:
    try:
        limit = _parse_check_calls(value).limit
    except (TypeError, ValueError):
        return _UNKNOWN
    return _ALWAYS_CODE if limit is None else limit


def _collective_device(group: Optional[dist.ProcessGroup]) -> torch.device:
    """Where a tensor for a collective on ``group`` must live: the CPU for gloo, the current GPU for NCCL."""
    backend = str(dist.get_backend(group))
    if "gloo" in backend or "mpi" in backend:
        return torch.device("cpu")
    if "nccl" in backend:
        return torch.device("cuda", torch.cuda.current_device())
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and accelerator.is_available():
        return torch.device(accelerator.current_accelerator().type, accelerator.current_device_index())
    return torch.device("cpu")


def _agree(request: _Request) -> None:
    """All-gather ``(ok, *signature)`` over the parent group; raise on every rank if any rank failed validation or
    the ranks asked for different meshes. Collective over the parent group (every rank takes part, valid or not)."""
    parent = request.parent
    size = dist.get_world_size(parent)
    values = [0 if request.error is not None else 1] + [int(v) for v in request.signature.values()]
    if size > 1:
        mine = torch.tensor(values, dtype=torch.int64, device=_collective_device(parent))
        gathered = [torch.empty_like(mine) for _ in range(size)]
        dist.all_gather(gathered, mine, group=parent)
        rows = [t.tolist() for t in gathered]
    else:
        rows = [values]
    if request.error is not None:
        raise request.error
    failed = [i for i, row in enumerate(rows) if row[0] == 0]
    if failed:
        raise ValueError(
            f"{request.source}: rank(s) {failed} of the group rejected their mesh arguments (see the error raised "
            f"there); every rank must build the same, valid mesh"
        )
    differences = []
    for position, name in enumerate(request.signature, start=1):
        column = [row[position] for row in rows]
        if len(set(column)) > 1:
            shown = ", ".join(f"rank {i}: {_show(name, v)}" for i, v in enumerate(column))
            differences.append(f"{name} ({shown})")
    if differences:
        raise ValueError(
            f"{request.source}: the ranks of the group asked for different meshes; they differ in "
            + "; ".join(differences) + ". Every rank must build the same mesh (same ulysses, ring, placement, "
            "group / DeviceMesh dims)"
        )


def _show(name: str, value: int) -> str:
    if value == _UNKNOWN:
        return "unset" if name.endswith("_dim") else "invalid"
    if name == "placement":
        return repr([p.value for p, code in _PLACEMENT_CODES.items() if code == value][0])
    if name == "check_calls" and value in (_ALWAYS_CODE, 0):
        return "'always'" if value == _ALWAYS_CODE else "'off'"
    return str(value)


# ---------------------------------------------------------------------------------------------------- the mesh
class SequenceParallelMesh:
    """Ulysses x ring sequence-parallel mesh (plus an outer data-parallel dimension). Immutable.

    Args:
        ulysses: Ulysses (all-to-all, head-parallel) degree ``U``.
        ring: ring-attention (P2P) degree ``R``.
        placement: ``"ulysses_inner"`` (default, head-first: Ulysses ranks adjacent) or ``"ring_inner"``.
        group: the process group to build inside; default the world. Its size must be a multiple of
            ``U * R``; the quotient is the data-parallel degree.
        backend: backend of the Ulysses, ring and data-parallel groups (e.g. ``"nccl"`` under a gloo default
            group, when several ranks share a GPU and NCCL refuses the world); default: the default group's.
        check_calls: when attention calls on this mesh first agree on their arguments across the
            sequence-parallel ranks (``usp.consistency``, Note [call agreement]): ``"always"`` (default),
            ``"off"`` or ``N`` (the first ``N`` calls). ``from_device_mesh`` and ``from_plan`` take it too; it is
            part of what the ranks agree on at construction.

    Must be constructed on every rank of ``group`` with the same arguments (creating sub-groups is collective);
    the ranks first agree on ``(ulysses, ring, placement, group size)``, and if they differ, or one rank's
    arguments are invalid, every rank raises a ``ValueError`` saying what differs (Note [one construction path]).
    After construction the mesh exposes ``ulysses_size``, ``ring_size``, ``sequence_parallel_size``,
    ``data_parallel_size``, this rank's ``ulysses_rank``, ``ring_rank``, ``sequence_parallel_rank``,
    ``data_parallel_rank``, the process groups ``ulysses_group``, ``ring_group``, ``data_parallel_group`` and
    ``consistency_group`` (gloo, over this replica's ``U * R`` ranks, for agreeing on small per-call signatures),
    the global ranks ``sequence_parallel_global_ranks`` (this replica's ranks in sequence-parallel rank order),
    ``ring_global_ranks``, ``ulysses_global_ranks``, ``data_parallel_global_ranks`` and the ring neighbours
    (``ring_next_global_rank``, ``ring_prev_global_rank``) used by the P2P rotation. Setting an attribute raises
    ``AttributeError``: build a new mesh instead.
    """

    __slots__ = (
        "ulysses", "ring", "placement", "group", "ulysses_group", "ring_group", "data_parallel_group",
        "consistency_group", "ulysses_rank", "ring_rank", "data_parallel_rank", "data_parallel_size",
        "ring_global_ranks", "ulysses_global_ranks", "data_parallel_global_ranks",
        "sequence_parallel_global_ranks", "check_calls", "_frozen",
    )

    def __init__(
        self,
        ulysses: int = 1,
        ring: int = 1,
        placement: Union[str, Placement] = Placement.ULYSSES_INNER,
        group: Optional[dist.ProcessGroup] = None,
        backend: Optional[str] = None,
        check_calls: Union[str, int] = "always",
    ) -> None:
        _require_initialized()
        if backend is not None and not isinstance(backend, str):
            raise TypeError(f"backend must be None or a torch.distributed backend name such as 'nccl' or 'gloo', "
                            f"got {type(backend).__name__}")
        request = _degrees_request("SequenceParallelMesh(...)", ulysses, ring, placement, group,
                                   check_calls=check_calls)
        request.backend = backend
        self._construct(request)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_device_mesh(
        cls,
        device_mesh: Any,
        ulysses_dim: Optional[Union[str, int]] = None,
        ring_dim: Optional[Union[str, int]] = None,
        check_calls: Union[str, int] = "always",
    ) -> "SequenceParallelMesh":
        """Use the groups of an existing ``torch.distributed.DeviceMesh``.

        Args:
            device_mesh: a ``DeviceMesh`` (e.g. from ``init_device_mesh(..., mesh_dim_names=("dp", "cp_u", "cp_r"))``).
            ulysses_dim: name or index of the dimension used for Ulysses; ``None`` means degree 1.
            ring_dim: name or index of the dimension used for the ring; ``None`` means degree 1.

        The Ulysses and ring groups are the DeviceMesh's groups of those dims; the placement is whatever the
        DeviceMesh already has (its last dimension is the contiguous one). Every other dim of ``device_mesh`` is
        data-parallel: ``data_parallel_rank`` is this rank's coordinate over them (row-major) and
        ``data_parallel_group`` the ranks that share this rank's Ulysses and ring coordinates (the DeviceMesh's
        group when exactly one dim remains). Pass the root DeviceMesh, or a slice holding the data-parallel dims:
        the mesh covers the ranks of ``device_mesh`` only. Collective over the ranks of ``device_mesh``.
        """
        _require_initialized()
        self = cls.__new__(cls)
        self._construct(_device_mesh_request(device_mesh, ulysses_dim, ring_dim, check_calls))
        return self

    @classmethod
    def from_plan(cls, plan: Any, group: Optional[dist.ProcessGroup] = None,
                  check_calls: Union[str, int] = "always") -> "SequenceParallelMesh":
        """Build the mesh a planner ``Plan`` chose (``ulysses``, ``ring``, ``placement`` and ``world_size``).

        ``plan.world_size`` must equal the size of ``group`` (default: the world): a plan made for another number
        of ranks raises ``ValueError`` instead of silently becoming a different data-parallel split. An object
        without ``world_size`` is accepted (only the degrees and the placement are read).
        """
        _require_initialized()
        missing = [name for name in ("ulysses", "ring", "placement") if not hasattr(plan, name)]
        if missing:
            raise TypeError(f"plan must have ulysses, ring and placement (a usp.plan(...) Plan), "
                            f"{type(plan).__name__} lacks {missing}")
        self = cls.__new__(cls)
        self._construct(_degrees_request("from_plan", plan.ulysses, plan.ring, plan.placement, group,
                                         world_size=getattr(plan, "world_size", None), check_calls=check_calls))
        return self

    # ------------------------------------------------------------------ the shared path
    def _construct(self, request: _Request) -> None:
        """Agree, create the groups, read the coordinates off the grid, freeze (Note [one construction path])."""
        _agree(request)
        grid, ulysses, ring = request.grid, request.ulysses, request.ring
        me = dist.get_rank()
        where = [(d, r, row.index(me)) for d, block in enumerate(grid) for r, row in enumerate(block) if me in row]
        assert len(where) == 1, f"global rank {me} appears {len(where)} times in the mesh grid {grid}"
        dp_rank, ring_rank, ulysses_rank = where[0]
        block = grid[dp_rank]
        ulysses_ranks = tuple(block[ring_rank])
        ring_ranks = tuple(block[r][ulysses_rank] for r in range(ring))
        dp_ranks = tuple(grid[d][ring_rank][ulysses_rank] for d in range(len(grid)))
        sp_ranks = tuple(block[r][u] for r in range(ring) for u in range(ulysses))

        existing = request.existing_groups() if request.existing_groups is not None else (None, None, None)
        partitions = (  # every group of each axis, as lists of global ranks (one holds this rank)
            [row for blk in grid for row in blk],
            [[blk[r][u] for r in range(ring)] for blk in grid for u in range(ulysses)],
            [[grid[d][r][u] for d in range(len(grid))] for r in range(ring) for u in range(ulysses)],
        )
        # creating groups over the whole world is collective over every rank in one order (robust to ranks that
        # made different numbers of groups before); inside a smaller parent only the members of each group take
        # part, so replicas building meshes on their own ``group=`` at the same time never cross their calls
        world_wide = dist.get_world_size(request.parent) == dist.get_world_size()
        groups = [g if g is not None else _create_group(partition, mine, request.backend, world_wide)
                  for g, partition, mine in zip(existing, partitions, (ulysses_ranks, ring_ranks, dp_ranks))]
        for g, ranks in zip(groups, (ulysses_ranks, ring_ranks, dp_ranks)):
            assert tuple(dist.get_process_group_ranks(g)) == ranks, (dist.get_process_group_ranks(g), ranks)
        consistency = _create_group([[x for row in blk for x in row] for blk in grid], sp_ranks, "gloo", world_wide)

        values = dict(
            ulysses=ulysses, ring=ring, placement=request.placement, group=request.group,
            ulysses_group=groups[0], ring_group=groups[1], data_parallel_group=groups[2],
            consistency_group=consistency, ulysses_rank=ulysses_rank, ring_rank=ring_rank,
            data_parallel_rank=dp_rank, data_parallel_size=len(grid), ring_global_ranks=ring_ranks,
            ulysses_global_ranks=ulysses_ranks, data_parallel_global_ranks=dp_ranks,
            sequence_parallel_global_ranks=sp_ranks, check_calls=request.check_calls, _frozen=True,
        )
        for name, value in values.items():
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"SequenceParallelMesh is immutable: cannot set {name!r}; build a new mesh instead")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"SequenceParallelMesh is immutable: cannot delete {name!r}")

    # ------------------------------------------------------------------ by its groups' names (usp.compiled)
    def _group_spec(self) -> str:
        """The mesh as one string: degrees, placement, call-check policy and its process groups' names (Note
        [compiled attention] in ``usp.compiled``: a custom op takes strings, not meshes). A call-check limit
        ``N`` is written as ``"always"``: its call count lives on this object, which a compiled graph does not hold,
        so compiled calls are all checked."""
        check = "off" if self.check_calls.limit == 0 else "always"
        names = [g.group_name for g in (self.ulysses_group, self.ring_group, self.data_parallel_group,
                                         self.consistency_group)]
        parent = "" if self.group is None else self.group.group_name
        return "|".join([str(self.ulysses), str(self.ring), self.placement.value, check] + names + [parent])

    @classmethod
    def _from_group_spec(cls, spec: str) -> "SequenceParallelMesh":
        """The mesh ``_group_spec`` describes, from torch's registry of process groups; no collective (the mesh
        was agreed on when first built). Equal to the original in every attribute (a fresh call-check policy)."""
        from torch.distributed.distributed_c10d import _resolve_process_group

        fields = spec.split("|")
        if len(fields) != 9:
            raise ValueError(f"not a SequenceParallelMesh group spec: {spec!r}")
        ulysses, ring, placement, check, *names, parent = fields
        ulysses_group, ring_group, dp_group, consistency = (_resolve_process_group(n) for n in names)
        self = cls.__new__(cls)
        values = dict(
            ulysses=int(ulysses), ring=int(ring), placement=Placement.parse(placement),
            group=_resolve_process_group(parent) if parent else None,
            ulysses_group=ulysses_group, ring_group=ring_group, data_parallel_group=dp_group,
            consistency_group=consistency, ulysses_rank=dist.get_rank(ulysses_group),
            ring_rank=dist.get_rank(ring_group), data_parallel_rank=dist.get_rank(dp_group),
            data_parallel_size=dist.get_world_size(dp_group),
            ring_global_ranks=tuple(dist.get_process_group_ranks(ring_group)),
            ulysses_global_ranks=tuple(dist.get_process_group_ranks(ulysses_group)),
            data_parallel_global_ranks=tuple(dist.get_process_group_ranks(dp_group)),
            sequence_parallel_global_ranks=tuple(dist.get_process_group_ranks(consistency)),
            check_calls=_parse_check_calls(check), _frozen=True,
        )
        for name, value in values.items():
            object.__setattr__(self, name, value)
        return self

    def __copy__(self) -> "SequenceParallelMesh":
        return self  # immutable, and process groups cannot be copied: a copy is the mesh itself

    def __deepcopy__(self, memo) -> "SequenceParallelMesh":
        return self

    # ------------------------------------------------------------------ derived properties
    @property
    def ulysses_size(self) -> int:
        return self.ulysses

    @property
    def ring_size(self) -> int:
        return self.ring

    @property
    def sequence_parallel_size(self) -> int:
        return self.ulysses * self.ring

    @property
    def sequence_parallel_rank(self) -> int:
        """Index of this rank's sequence shard (ring-major): ``ring_rank * U + ulysses_rank``."""
        return self.ring_rank * self.ulysses + self.ulysses_rank

    @property
    def ring_next_global_rank(self) -> int:
        return self.ring_global_ranks[(self.ring_rank + 1) % self.ring]

    @property
    def ring_prev_global_rank(self) -> int:
        return self.ring_global_ranks[(self.ring_rank - 1) % self.ring]

    def __repr__(self) -> str:
        return (
            f"SequenceParallelMesh(ulysses={self.ulysses}, ring={self.ring}, placement={self.placement.value!r}, "
            f"data_parallel={self.data_parallel_size}, ulysses_rank={self.ulysses_rank}, ring_rank={self.ring_rank}, "
            f"data_parallel_rank={self.data_parallel_rank})"
        )


def _require_initialized() -> None:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "SequenceParallelMesh needs torch.distributed to be initialized "
            "(call torch.distributed.init_process_group first, e.g. under torchrun)"
        )


def _divisors(n: int) -> list:
    return [d for d in range(1, n + 1) if n % d == 0]


# group rank i = ranks[i] (torch >= 2.12 sorts the ranks of new_group unless told not to; older ones never sort)
_UNSORTED = {"sort_ranks": False} if "sort_ranks" in inspect.signature(dist.new_group).parameters else {}


def _create_group(partition: Sequence[Sequence[int]], mine: Sequence[int], backend: Optional[str],
                  world_wide: bool) -> dist.ProcessGroup:
    """This rank's group ``mine`` out of ``partition`` (every group of one axis). ``world_wide``: every rank
    creates every group of the partition in order (plain ``new_group``, like DeviceMesh); otherwise only the
    members create theirs (``use_local_synchronization``; torch then names the group from the ranks and the number
    of groups each member made before, so the members must have made the same number)."""
    if not world_wide:
        return _new_group(mine, backend)
    created = None
    for ranks in partition:
        group = dist.new_group(ranks=list(ranks), backend=backend, **_UNSORTED)
        if tuple(ranks) == tuple(mine):
            created = group
    assert created is not None, (partition, mine)
    return created


def _new_group(ranks: Sequence[int], backend: Optional[str] = None) -> dist.ProcessGroup:
    """This rank's group over the global ``ranks``. Only the members take part (``use_local_synchronization``),
    so meshes built at the same time on different parent groups (``group=`` per data-parallel replica) never cross
    their ``new_group`` calls; every member creates its groups in the same order. The group's rank order is the
    order of ``ranks`` (so ``consistency_group`` rank ``i`` is sequence-parallel rank ``i``)."""
    return dist.new_group(ranks=list(ranks), backend=backend, use_local_synchronization=True, **_UNSORTED)

