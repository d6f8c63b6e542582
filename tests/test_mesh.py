"""SequenceParallelMesh construction on CPU (gloo): one validated path for ``__init__``, ``from_device_mesh`` and
``from_plan``; data-parallel rank and group on every rank; immutability; ranks that ask for different meshes get a
ValueError on every rank instead of a hang; misuse raises ValueError/TypeError naming the argument.

One 4-rank world runs every check (starting a world costs seconds on 2 cores); a correct mesh and a collective on
it after the failing calls prove that no rank was left inside a collective.
"""
from __future__ import annotations

import re
from types import SimpleNamespace

import pytest

from distributed import run_world


def _describe(mesh):
    import torch.distributed as dist

    return {
        "ulysses": mesh.ulysses, "ring": mesh.ring, "placement": mesh.placement.value,
        "ulysses_rank": mesh.ulysses_rank, "ring_rank": mesh.ring_rank,
        "sequence_parallel_rank": mesh.sequence_parallel_rank,
        "data_parallel_rank": mesh.data_parallel_rank, "data_parallel_size": mesh.data_parallel_size,
        "ulysses_group": dist.get_process_group_ranks(mesh.ulysses_group),
        "ring_group": dist.get_process_group_ranks(mesh.ring_group),
        "data_parallel_group": dist.get_process_group_ranks(mesh.data_parallel_group),
        "consistency_group": dist.get_process_group_ranks(mesh.consistency_group),
        "consistency_backend": str(dist.get_backend(mesh.consistency_group)),
        "sequence_parallel_global_ranks": list(mesh.sequence_parallel_global_ranks),
        "ring_global_ranks": list(mesh.ring_global_ranks),
        "ring_next": mesh.ring_next_global_rank, "ring_prev": mesh.ring_prev_global_rank,
    }


def _outcome(fn):
    try:
        fn()
    except Exception as error:  # noqa: BLE001 - the test compares type and message
        return (type(error).__name__, str(error))
    return ("ok", "")


def _world4(rank, world_size):
    import copy

    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    import usp

    out = {"meshes": {}, "errors": {}, "immutable": {}}
    meshes = out["meshes"]
    meshes["1x2 on 4 (dp 2)"] = _describe(usp.SequenceParallelMesh(ulysses=1, ring=2))
    meshes["2x2 ring_inner"] = _describe(usp.SequenceParallelMesh(ulysses=2, ring=2, placement="ring_inner"))
    meshes["from_plan 2x1"] = _describe(usp.SequenceParallelMesh.from_plan(
        SimpleNamespace(ulysses=2, ring=1, placement="ulysses_inner", world_size=4)))
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # new_group is collective over the world
    pair, pair2 = pairs[rank // 2], pairs[1]
    meshes["1x2 on group= of 2"] = _describe(usp.SequenceParallelMesh(ulysses=1, ring=2, group=pair))

    dp_cp = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "cp"))
    meshes["DeviceMesh dp x cp, ring_dim=cp"] = _describe(usp.SequenceParallelMesh.from_device_mesh(dp_cp, ring_dim="cp"))
    meshes["DeviceMesh dp x cp, ulysses_dim=1"] = _describe(usp.SequenceParallelMesh.from_device_mesh(dp_cp, ulysses_dim=1))
    cp_ur = init_device_mesh("cpu", (2, 2), mesh_dim_names=("cp_u", "cp_r"))
    meshes["DeviceMesh cp_u x cp_r"] = _describe(
        usp.SequenceParallelMesh.from_device_mesh(cp_ur, ulysses_dim="cp_u", ring_dim="cp_r"))
    meshes["DeviceMesh cp_u x cp_r swapped"] = _describe(
        usp.SequenceParallelMesh.from_device_mesh(cp_ur, ulysses_dim="cp_r", ring_dim="cp_u"))
    three = init_device_mesh("cpu", (2, 2, 1), mesh_dim_names=("dp", "tp", "cp"))  # two data-parallel dims
    meshes["DeviceMesh dp x tp x cp(1)"] = _describe(usp.SequenceParallelMesh.from_device_mesh(three, ring_dim="cp"))

    mesh = usp.SequenceParallelMesh(ulysses=2, ring=2)
    for name in ("ulysses", "ring", "placement", "ring_group", "data_parallel_rank", "consistency_group",
                 "sequence_parallel_global_ranks", "brand_new"):
        out["immutable"][name] = _outcome(lambda: setattr(mesh, name, 1))
    out["immutable"]["del ring"] = _outcome(lambda: delattr(mesh, "ring"))
    out["copies_are_the_mesh"] = copy.copy(mesh) is mesh and copy.deepcopy({"m": mesh})["m"] is mesh

    errors = out["errors"]
    # the hang: ranks ask for different splits of the same group
    errors["different splits"] = _outcome(
        lambda: usp.SequenceParallelMesh(ulysses=2, ring=1) if rank % 2 == 0 else usp.SequenceParallelMesh(1, 2))
    errors["different placement"] = _outcome(
        lambda: usp.SequenceParallelMesh(2, 2, placement="ring_inner" if rank == 3 else "ulysses_inner"))
    errors["different check_calls"] = _outcome(
        lambda: usp.SequenceParallelMesh(2, 1, check_calls="off" if rank == 2 else "always"))
    errors["bad check_calls"] = _outcome(lambda: usp.SequenceParallelMesh(2, 1, check_calls="sometimes"))
    out["check_calls"] = (repr(usp.SequenceParallelMesh(2, 1).check_calls),
                          repr(usp.SequenceParallelMesh(2, 1, check_calls=3).check_calls))
    errors["one rank invalid"] = _outcome(lambda: usp.SequenceParallelMesh(ulysses=3 if rank == 0 else 2, ring=1))
    errors["one rank wrong type"] = _outcome(lambda: usp.SequenceParallelMesh(ulysses=2, ring=1.0 if rank == 1 else 1))
    errors["DeviceMesh dims differ"] = _outcome(lambda: usp.SequenceParallelMesh.from_device_mesh(
        cp_ur, ulysses_dim="cp_u" if rank else "cp_r", ring_dim="cp_r" if rank else "cp_u"))
    errors["from_plan world_size"] = _outcome(lambda: usp.SequenceParallelMesh.from_plan(
        SimpleNamespace(ulysses=1, ring=1, placement="ulysses_inner", world_size=1)))
    errors["from_plan not a plan"] = _outcome(lambda: usp.SequenceParallelMesh.from_plan({"ulysses": 1}))
    errors["not divisible"] = _outcome(lambda: usp.SequenceParallelMesh(ulysses=3, ring=1))
    errors["group wrong type"] = _outcome(lambda: usp.SequenceParallelMesh(ulysses=1, ring=1, group="world"))
    errors["rank outside group"] = _outcome(lambda: usp.SequenceParallelMesh(ulysses=1, ring=1, group=pair2))
    errors["device_mesh wrong type"] = _outcome(lambda: usp.SequenceParallelMesh.from_device_mesh("dp", ring_dim=0))
    errors["device_mesh unknown dim"] = _outcome(lambda: usp.SequenceParallelMesh.from_device_mesh(dp_cp, ring_dim="sp"))
    errors["device_mesh dim out of range"] = _outcome(lambda: usp.SequenceParallelMesh.from_device_mesh(dp_cp, ring_dim=2))
    errors["device_mesh same dim"] = _outcome(
        lambda: usp.SequenceParallelMesh.from_device_mesh(dp_cp, ulysses_dim="cp", ring_dim=1))
    errors["device_mesh no dim"] = _outcome(lambda: usp.SequenceParallelMesh.from_device_mesh(dp_cp))
    errors["device_mesh dim bool"] = _outcome(lambda: usp.SequenceParallelMesh.from_device_mesh(dp_cp, ring_dim=True))

    # nobody is stuck in a collective: a correct mesh and a collective on its consistency group still work
    mesh = usp.SequenceParallelMesh(ulysses=2, ring=1)
    total = torch.tensor([float(rank)])
    dist.all_reduce(total, group=mesh.consistency_group)
    out["after"] = total.item()
    return out


@pytest.fixture(scope="module")
def world4():
    return run_world(4, _world4, timeout=240)


def _expected_degree_mesh(rank, world, ulysses, ring, placement):
    from usp.mesh import Placement, sequence_parallel_rank_grid

    grid = sequence_parallel_rank_grid(world, ulysses, ring, Placement.parse(placement))
    for d, block in enumerate(grid):
        for r, row in enumerate(block):
            if rank in row:
                u = row.index(rank)
                return {"data_parallel_rank": d, "ring_rank": r, "ulysses_rank": u, "data_parallel_size": len(grid),
                        "data_parallel_group": [grid[x][r][u] for x in range(len(grid))],
                        "sequence_parallel_global_ranks": [x for row_ in block for x in row_],
                        "ring_global_ranks": [block[x][u] for x in range(ring)]}
    raise AssertionError(rank)


@pytest.mark.timeout(300)
def test_degree_meshes_data_parallel_rank_and_groups(world4):
    for rank, out in enumerate(world4):
        for name, (u, r, placement) in {"1x2 on 4 (dp 2)": (1, 2, "ulysses_inner"),
                                        "2x2 ring_inner": (2, 2, "ring_inner"),
                                        "from_plan 2x1": (2, 1, "ulysses_inner")}.items():
            got = out["meshes"][name]
            expected = _expected_degree_mesh(rank, 4, u, r, placement)
            assert {k: got[k] for k in expected} == expected, (rank, name)
            assert got["consistency_group"] == got["sequence_parallel_global_ranks"], (rank, name)
            assert got["consistency_backend"] == "gloo"
            assert got["sequence_parallel_global_ranks"][got["sequence_parallel_rank"]] == rank
        on_pair = out["meshes"]["1x2 on group= of 2"]
        base = 0 if rank < 2 else 2
        assert on_pair["data_parallel_size"] == 1 and on_pair["data_parallel_group"] == [rank]
        assert on_pair["ring_global_ranks"] == [base, base + 1] and on_pair["ring_next"] == base + (1 - rank % 2)
        assert on_pair["sequence_parallel_global_ranks"] == [base, base + 1]
        assert out["after"] == 1.0 if rank < 2 else 5.0  # 0+1 and 2+3 on the 2x1 consistency groups


@pytest.mark.timeout(300)
def test_device_mesh_data_parallel_rank_and_group_on_every_rank(world4):
    for rank, out in enumerate(world4):
        dp, cp = divmod(rank, 2)
        for name, axis in (("DeviceMesh dp x cp, ring_dim=cp", "ring"), ("DeviceMesh dp x cp, ulysses_dim=1", "ulysses")):
            got = out["meshes"][name]
            assert got["data_parallel_rank"] == dp and got["data_parallel_size"] == 2, (rank, name, got)
            assert got["data_parallel_group"] == [cp, cp + 2], (rank, name)
            assert got[f"{axis}_group"] == [2 * dp, 2 * dp + 1] and got[f"{axis}_rank"] == cp
            assert got["sequence_parallel_global_ranks"] == [2 * dp, 2 * dp + 1]
            assert got["consistency_group"] == [2 * dp, 2 * dp + 1]
        # ("cp_u", "cp_r"): the ring dim is the last (contiguous) one
        got = out["meshes"]["DeviceMesh cp_u x cp_r"]
        assert (got["ulysses"], got["ring"], got["placement"]) == (2, 2, "ring_inner")
        assert (got["ulysses_rank"], got["ring_rank"]) == divmod(rank, 2)
        assert got["ring_group"] == got["ring_global_ranks"] == [2 * (rank // 2), 2 * (rank // 2) + 1]
        assert got["data_parallel_size"] == 1 and got["data_parallel_rank"] == 0 and got["data_parallel_group"] == [rank]
        assert got["sequence_parallel_global_ranks"] == [0, 2, 1, 3]  # sequence-parallel rank = ring_rank * U + u
        assert got["sequence_parallel_global_ranks"][got["sequence_parallel_rank"]] == rank
        swapped = out["meshes"]["DeviceMesh cp_u x cp_r swapped"]
        assert swapped["placement"] == "ulysses_inner" and swapped["sequence_parallel_global_ranks"] == [0, 1, 2, 3]
        three = out["meshes"]["DeviceMesh dp x tp x cp(1)"]
        assert three["data_parallel_size"] == 4 and three["data_parallel_rank"] == rank
        assert three["data_parallel_group"] == [0, 1, 2, 3] and three["sequence_parallel_global_ranks"] == [rank]


@pytest.mark.timeout(300)
def test_mesh_is_immutable(world4):
    for out in world4:
        for name, (kind, message) in out["immutable"].items():
            assert kind == "AttributeError" and "immutable" in message, (name, kind, message)
        assert out["copies_are_the_mesh"]
        assert out["check_calls"] == ("'always'", "3")


EXPECTED_ERRORS = {
    "different splits": ("ValueError", r"different meshes.*ulysses \(rank 0: 2, rank 1: 1.*ring \(rank 0: 1, rank 1: 2"),
    "different placement": ("ValueError", r"placement \(rank 0: 'ulysses_inner'.*rank 3: 'ring_inner'\)"),
    "DeviceMesh dims differ": ("ValueError", r"different meshes.*ulysses_dim \(rank 0: 1, rank 1: 0"),
    "different check_calls": ("ValueError", r"check_calls \(rank 0: 'always', rank 1: 'always', rank 2: 'off'"),
    "bad check_calls": ("ValueError", r"check_calls='sometimes' is not a valid call check; valid values"),
    "from_plan world_size": ("ValueError", r"plan.world_size=1 but the mesh is being built on 4 ranks"),
    "from_plan not a plan": ("TypeError", r"plan must have ulysses, ring and placement"),
    "not divisible": ("ValueError", r"ulysses \* ring = 3 \* 1 = 3 must divide the world size 4; valid .*\[1, 2, 4\]"),
    "group wrong type": ("TypeError", r"group must be None .* or a torch.distributed.ProcessGroup, got str"),
    "device_mesh wrong type": ("TypeError", r"device_mesh must be a torch.distributed.DeviceMesh, got str"),
    "device_mesh unknown dim": ("ValueError", r"ring_dim='sp' is not a dimension of the DeviceMesh; valid names: \('dp', 'cp'\)"),
    "device_mesh dim out of range": ("ValueError", r"ring_dim=2 is out of range"),
    "device_mesh same dim": ("ValueError", r"ulysses_dim and ring_dim must be different"),
    "device_mesh no dim": ("ValueError", r"at least one of ulysses_dim or ring_dim"),
    "device_mesh dim bool": ("TypeError", r"ring_dim must be None, a dim name"),
}


@pytest.mark.timeout(300)
def test_misuse_raises_on_every_rank_without_hanging(world4):
    for rank, out in enumerate(world4):
        errors = out["errors"]
        for name, (kind, pattern) in EXPECTED_ERRORS.items():
            got_kind, message = errors[name]
            assert got_kind == kind and re.search(pattern, message), (rank, name, got_kind, message)
        # one rank's invalid arguments: that rank raises its own error, the others say which rank rejected
        kind, message = errors["one rank invalid"]
        if rank == 0:
            assert kind == "ValueError" and "ulysses * ring = 3 * 1" in message, message
        else:
            assert kind == "ValueError" and re.search(r"rank\(s\) \[0\] of the group rejected", message), message
        kind, message = errors["one rank wrong type"]
        assert (kind, rank == 1) in {("TypeError", True), ("ValueError", False)}, (rank, kind, message)
        kind, message = errors["rank outside group"]  # ranks 0 and 1 are outside group [2, 3]
        if rank < 2:
            assert kind == "ValueError" and "is not a member of group" in message, message
        else:
            assert kind == "ok", message
