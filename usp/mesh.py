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
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import torch.distributed as dist

__all__ = ["Placement", "SequenceParallelMesh"]


class Placement(str, enum.Enum):
    """Which sequence-parallel axis gets adjacent ranks (see the module docstring)."""

    ULYSSES_INNER = "ulysses_inner"
    RING_INNER = "ring_inner"

    @classmethod
    def parse(cls, value: Union[str, "Placement"], argument: str = "placement") -> "Placement":
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


def _check_degree(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a positive int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {value}")
    return value


def sequence_parallel_rank_grid(world_size: int, ulysses: int, ring: int, placement: Placement):
    """Global ranks as nested lists ``grid[dp][ring_rank][ulysses_rank]`` for the given placement.

    Pure function (no process groups), shared by the mesh and by the planner's placement model.
    """
    sp_size = ulysses * ring
    grid = []
    for dp_index in range(world_size // sp_size):
        base = dp_index * sp_size
        if placement is Placement.ULYSSES_INNER:
            grid.append([[base + r * ulysses + u for u in range(ulysses)] for r in range(ring)])
        else:
            grid.append([[base + u * ring + r for u in range(ulysses)] for r in range(ring)])
    return grid


@dataclass(eq=False)
class SequenceParallelMesh:
    """Ulysses x ring sequence-parallel mesh (plus an outer data-parallel dimension).

    Args:
        ulysses: Ulysses (all-to-all, head-parallel) degree ``U``.
        ring: ring-attention (P2P) degree ``R``.
        placement: ``"ulysses_inner"`` (default, head-first: Ulysses ranks adjacent) or ``"ring_inner"``.
        group: the process group to build inside; default the world. Its size must be a multiple of
            ``U * R``; the quotient is the data-parallel degree.

    Must be constructed on every rank of ``group`` (creating sub-groups is collective). After construction the
    mesh exposes ``ulysses_size``, ``ring_size``, ``sequence_parallel_size``, ``data_parallel_size``, this rank's
    ``ulysses_rank``, ``ring_rank``, ``sequence_parallel_rank``, ``data_parallel_rank``, the process groups
    ``ulysses_group``, ``ring_group``, ``data_parallel_group`` and the global ranks of the ring neighbours
    (``ring_next_global_rank``, ``ring_prev_global_rank``) used by the P2P rotation.
    """

    ulysses: int = 1
    ring: int = 1
    placement: Union[str, Placement] = Placement.ULYSSES_INNER
    group: Optional[dist.ProcessGroup] = None
    # Filled in __post_init__ (or by from_device_mesh).
    ulysses_group: Optional[dist.ProcessGroup] = field(default=None, init=False, repr=False)
    ring_group: Optional[dist.ProcessGroup] = field(default=None, init=False, repr=False)
    data_parallel_group: Optional[dist.ProcessGroup] = field(default=None, init=False, repr=False)
    ulysses_rank: int = field(default=0, init=False)
    ring_rank: int = field(default=0, init=False)
    data_parallel_rank: int = field(default=0, init=False)
    data_parallel_size: int = field(default=1, init=False)
    ring_global_ranks: tuple = field(default=(), init=False, repr=False)

    def __post_init__(self) -> None:
        _check_degree("ulysses", self.ulysses)
        _check_degree("ring", self.ring)
        self.placement = Placement.parse(self.placement)
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "SequenceParallelMesh needs torch.distributed to be initialized "
                "(call torch.distributed.init_process_group first, e.g. under torchrun)"
            )
        group = self.group if self.group is not None else dist.group.WORLD
        world_ranks = dist.get_process_group_ranks(group)
        world_size = len(world_ranks)
        sp_size = self.ulysses * self.ring
        if world_size % sp_size != 0:
            raise ValueError(
                f"ulysses * ring = {self.ulysses} * {self.ring} = {sp_size} must divide the world size "
                f"{world_size}; valid sequence-parallel sizes here: {_divisors(world_size)}"
            )
        my_index = dist.get_rank(group)
        grid = sequence_parallel_rank_grid(world_size, self.ulysses, self.ring, self.placement)
        # Translate group-local indices to global ranks.
        grid = [[[world_ranks[i] for i in row] for row in block] for block in grid]

        ulysses_lists = [row for block in grid for row in block]
        ring_lists = [[block[r][u] for r in range(self.ring)] for block in grid for u in range(self.ulysses)]
        dp_lists = [[grid[d][r][u] for d in range(len(grid))] for r in range(self.ring) for u in range(self.ulysses)]
        self.ulysses_group = _new_subgroup(ulysses_lists)
        self.ring_group = _new_subgroup(ring_lists)
        self.data_parallel_group = _new_subgroup(dp_lists)

        my_global = world_ranks[my_index]
        for d, block in enumerate(grid):
            for r, row in enumerate(block):
                if my_global in row:
                    self.data_parallel_rank, self.ring_rank, self.ulysses_rank = d, r, row.index(my_global)
        self.data_parallel_size = len(grid)
        self.ring_global_ranks = tuple(grid[self.data_parallel_rank][r][self.ulysses_rank] for r in range(self.ring))

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_device_mesh(
        cls,
        device_mesh: Any,
        ulysses_dim: Optional[Union[str, int]] = None,
        ring_dim: Optional[Union[str, int]] = None,
    ) -> "SequenceParallelMesh":
        """Use the groups of an existing ``torch.distributed.DeviceMesh``.

        Args:
            device_mesh: a ``DeviceMesh`` (e.g. from ``init_device_mesh(..., mesh_dim_names=("dp", "cp_u", "cp_r"))``).
            ulysses_dim: name or index of the dimension used for Ulysses; ``None`` means degree 1.
            ring_dim: name or index of the dimension used for the ring; ``None`` means degree 1.

        The placement is whatever the DeviceMesh already has (its last dimension is the contiguous one). The
        data-parallel degree is ``world_size // (U * R)``; ``data_parallel_group`` is left ``None``.
        """
        if ulysses_dim is None and ring_dim is None:
            raise ValueError("from_device_mesh needs at least one of ulysses_dim or ring_dim")
        names = tuple(getattr(device_mesh, "mesh_dim_names", None) or ())
        for argument, dim in (("ulysses_dim", ulysses_dim), ("ring_dim", ring_dim)):
            if dim is None:
                continue
            if isinstance(dim, str) and dim not in names:
                raise ValueError(f"{argument}={dim!r} is not a dimension of the DeviceMesh; valid names: {names}")
            if isinstance(dim, int) and not 0 <= dim < device_mesh.ndim:
                raise ValueError(f"{argument}={dim} is out of range; the DeviceMesh has {device_mesh.ndim} dims")
        if ulysses_dim is not None and ring_dim is not None and _dim_index(device_mesh, ulysses_dim) == _dim_index(
            device_mesh, ring_dim
        ):
            raise ValueError("ulysses_dim and ring_dim must be different DeviceMesh dimensions")

        self = cls.__new__(cls)
        self.group = None
        self.ulysses = device_mesh.size(_dim_index(device_mesh, ulysses_dim)) if ulysses_dim is not None else 1
        self.ring = device_mesh.size(_dim_index(device_mesh, ring_dim)) if ring_dim is not None else 1
        local = device_mesh.get_coordinate()
        ulysses_index = _dim_index(device_mesh, ulysses_dim) if ulysses_dim is not None else None
        ring_index = _dim_index(device_mesh, ring_dim) if ring_dim is not None else None
        if ulysses_index is not None and ring_index is not None:
            self.placement = Placement.ULYSSES_INNER if ulysses_index > ring_index else Placement.RING_INNER
        else:
            self.placement = Placement.ULYSSES_INNER
        self.ulysses_group = device_mesh.get_group(ulysses_index) if ulysses_index is not None else None
        self.ring_group = device_mesh.get_group(ring_index) if ring_index is not None else None
        self.data_parallel_group = None
        self.ulysses_rank = local[ulysses_index] if ulysses_index is not None else 0
        self.ring_rank = local[ring_index] if ring_index is not None else 0
        self.data_parallel_size = dist.get_world_size() // (self.ulysses * self.ring)
        self.data_parallel_rank = 0
        if self.ring_group is not None:
            self.ring_global_ranks = tuple(dist.get_process_group_ranks(self.ring_group))
        else:
            self.ring_global_ranks = (dist.get_rank(),)
        return self

    @classmethod
    def from_plan(cls, plan: Any, group: Optional[dist.ProcessGroup] = None) -> "SequenceParallelMesh":
        """Build the mesh a planner ``Plan`` chose (anything with ``ulysses``, ``ring`` and ``placement``)."""
        return cls(ulysses=plan.ulysses, ring=plan.ring, placement=plan.placement, group=group)

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
            f"data_parallel={self.data_parallel_size}, ulysses_rank={self.ulysses_rank}, ring_rank={self.ring_rank})"
        )


def _dim_index(device_mesh: Any, dim: Union[str, int]) -> int:
    if isinstance(dim, int):
        return dim
    return list(device_mesh.mesh_dim_names).index(dim)


def _divisors(n: int) -> list:
    return [d for d in range(1, n + 1) if n % d == 0]


def _new_subgroup(rank_lists: Sequence[Sequence[int]]) -> dist.ProcessGroup:
    """Create this rank's group among ``rank_lists`` (one list per group, together a partition of the ranks).

    Only the members take part (``use_local_synchronization``), so meshes built at the same time on different
    parent groups (``group=`` per data-parallel replica) never cross their ``new_group`` calls.
    """
    mine = [ranks for ranks in rank_lists if dist.get_rank() in ranks]
    assert len(mine) == 1, "every rank belongs to exactly one subgroup"
    return dist.new_group(ranks=list(mine[0]), use_local_synchronization=True)
