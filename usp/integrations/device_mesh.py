"""DeviceMesh interop: turn a torchtitan/accelerate style ``DeviceMesh`` into a ``usp.SequenceParallelMesh``.

Two cases:

* The mesh already has one dim per sequence-parallel axis, e.g.
  ``init_device_mesh("cuda", (dp, U, R), mesh_dim_names=("dp", "ulysses", "ring"))``: use the core constructor
  ``SequenceParallelMesh.from_device_mesh(device_mesh, ulysses_dim="ulysses", ring_dim="ring")`` (it reuses the
  DeviceMesh's groups; the placement is whatever the DeviceMesh has: its last dim holds adjacent ranks).
  A single context-parallel dim used wholly as ring (or wholly as Ulysses) is the same call with one of the dims:
  ``from_device_mesh(device_mesh, ring_dim="cp")``.
* The context-parallel degree is one flattened dim (``mesh_dim_names=("dp", "cp")``, as torchtitan and accelerate
  build it) and should be split into ``U x R``: ``split_context_parallel(device_mesh, "cp", ulysses=U, ring=R)``.
  It builds a new DeviceMesh over the same ranks with the ``cp`` dim unflattened into ``(R, U)`` (or ``(U, R)``)
  and takes the groups from it. Creating groups is collective over the *whole* world (every rank creates every
  group in the same order), which is why this needs the root mesh, not the ``device_mesh["cp"]`` slice, and why
  it must be called on every rank.
"""
from __future__ import annotations

from typing import Any, Union

import torch.distributed as dist

from ..mesh import Placement, SequenceParallelMesh

__all__ = ["split_context_parallel"]

_ULYSSES_DIM, _RING_DIM, _REST_DIM = "usp_ulysses", "usp_ring", "usp_rest"


def split_context_parallel(
    device_mesh: Any,
    cp_dim: Union[str, int] = "cp",
    *,
    ulysses: int,
    ring: int,
    placement: Union[str, Placement] = Placement.ULYSSES_INNER,
) -> SequenceParallelMesh:
    """Split the flattened context-parallel dim ``cp_dim`` of ``device_mesh`` into Ulysses x ring.

    Args:
        device_mesh: the root ``DeviceMesh`` covering every rank of the job (e.g. from
            ``init_device_mesh("cuda", (dp, cp), mesh_dim_names=("dp", "cp"))``).
        cp_dim: name or index of the context-parallel dim.
        ulysses, ring: the degrees; ``ulysses * ring`` must equal the size of ``cp_dim`` (a planner ``Plan`` gives
            them: ``ulysses=plan.ulysses, ring=plan.ring``).
        placement: ``"ulysses_inner"`` (default: consecutive ranks of ``cp_dim`` form the Ulysses groups, so the
            all-to-all stays on neighbouring GPUs) or ``"ring_inner"``.

    Returns:
        A ``SequenceParallelMesh`` whose groups come from a new DeviceMesh over the same ranks with dims
        ``(rest, ring, ulysses)`` (or ``(rest, ulysses, ring)``); every other dim of ``device_mesh`` (dp, tp, ...)
        is flattened into ``rest`` and untouched. Collective: call it on every rank.
    """
    from torch.distributed.device_mesh import DeviceMesh

    if not isinstance(device_mesh, DeviceMesh):
        raise TypeError(f"device_mesh must be a torch.distributed.DeviceMesh, got {type(device_mesh).__name__}")
    names = tuple(device_mesh.mesh_dim_names or ())
    if isinstance(cp_dim, str):
        if cp_dim not in names:
            raise ValueError(f"cp_dim={cp_dim!r} is not a dimension of the DeviceMesh; valid names: {names}")
        cp_index = names.index(cp_dim)
    elif isinstance(cp_dim, int) and not isinstance(cp_dim, bool) and 0 <= cp_dim < device_mesh.ndim:
        cp_index = cp_dim
    else:
        raise ValueError(f"cp_dim={cp_dim!r} must be a dim name {names} or an index in [0, {device_mesh.ndim})")
    for name, value in (("ulysses", ulysses), ("ring", ring)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    cp_size = device_mesh.size(cp_index)
    if ulysses * ring != cp_size:
        options = [(u, cp_size // u) for u in range(1, cp_size + 1) if cp_size % u == 0]
        raise ValueError(
            f"ulysses * ring = {ulysses} * {ring} must equal the size {cp_size} of DeviceMesh dim {cp_dim!r}; "
            f"valid (ulysses, ring): {options}"
        )
    placement = Placement.parse(placement)
    ranks = device_mesh.mesh
    if ranks.numel() != dist.get_world_size():
        raise ValueError(
            f"device_mesh covers {ranks.numel()} ranks but the world has {dist.get_world_size()}: pass the root "
            "DeviceMesh (from init_device_mesh), not a slice such as device_mesh['cp'] (creating the Ulysses and "
            "ring groups is collective over every rank)"
        )
    # [..., cp] with the other dims flattened in front: [rest, cp]
    ranks = ranks.movedim(cp_index, -1).reshape(-1, cp_size)
    if placement is Placement.ULYSSES_INNER:
        shape, dim_names = (ranks.shape[0], ring, ulysses), (_REST_DIM, _RING_DIM, _ULYSSES_DIM)
    else:
        shape, dim_names = (ranks.shape[0], ulysses, ring), (_REST_DIM, _ULYSSES_DIM, _RING_DIM)
    split = DeviceMesh(device_mesh.device_type, ranks.reshape(shape), mesh_dim_names=dim_names)
    return SequenceParallelMesh.from_device_mesh(split, ulysses_dim=_ULYSSES_DIM, ring_dim=_RING_DIM)
