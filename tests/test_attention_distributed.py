"""Multi-process CPU (gloo) correctness of the hybrid attention against an fp64 single-process reference.

Each world size is started once (module-scoped fixture) and runs every case of every mesh of that size; the tests
below then assert per mesh. Meshes: 1x2, 2x1 (2 ranks); 2x2, 1x4, 4x1 and data-parallel 2 x (1x2), 2 x (2x1)
(4 ranks); 2x4, 4x2, 8x1, 1x8 (8 ranks), plus the ring-inner placement.
"""
from __future__ import annotations

import pytest

from attention_cases import Case, check_result, run_cases, standard_cases
from distributed import run_world

MESHES = {2: [(1, 2), (2, 1)], 4: [(2, 2), (1, 4), (4, 1)], 8: [(2, 4), (4, 2), (8, 1), (1, 8)]}


def _chunked_cases(u, r):
    """Head chunks (Note [head chunks]): the ring run once per head group, GQA kept per chunk; also more chunks
    than K/V heads (chunks sharing a K/V head sum their dK/dV in float32)."""
    from usp.attention import check_head_chunks
    from usp.layout import required_multiple

    cases = []
    for causal, dtype, kv_heads, chunks in ((True, "bfloat16", 4, 2), (False, "float32", 8, 4),
                                            (True, "float32", 2, 4), (True, "bfloat16", 1, 2)):
        if kv_heads % u and u % kv_heads:
            continue
        try:
            check_head_chunks(chunks, 8, kv_heads, u)
        except ValueError:
            continue
        seqlen = required_multiple(u, r, causal) * 7
        cases.append(Case(u, r, causal, dtype, 1, seqlen, 8, kv_heads, 64, head_chunks=chunks))
    return cases


def _cases_for_world(world_size):
    cases = []
    for u, r in MESHES[world_size]:
        cases += standard_cases(u, r) + _chunked_cases(u, r)
    return cases


def _world_main(rank, world_size, cases, data_parallel_cases):
    import torch

    device = torch.device("cpu")
    results = {"sequence": run_cases(cases, device)}
    # the ring-inner placement on the mixed mesh, one causal GQA case
    results["ring_inner"] = run_cases(
        [c for c in cases if c.ulysses > 1 and c.ring > 1][:2], device, placement="ring_inner"
    )
    # an outer data-parallel dimension: world = 2 x (U x R), each replica on its own data
    results["data_parallel"] = run_cases(data_parallel_cases, device)
    return results


@pytest.fixture(scope="module", params=sorted(MESHES))
def world_results(request):
    world_size = request.param
    cases = _cases_for_world(world_size)
    dp_cases = []
    if world_size == 4:
        dp_cases = [Case(1, 2, True, "float32", 1, 20, 4, 2, 64), Case(2, 1, False, "bfloat16", 2, 14, 4, 1, 80)]
    results = run_world(world_size, _world_main, cases, dp_cases, timeout=600)
    return world_size, results


@pytest.mark.timeout(900)
def test_every_case_within_tolerance_and_collective_counts(world_results):
    world_size, per_rank = world_results
    failures = []
    for rank, results in enumerate(per_rank):
        for group, items in results.items():
            for result in items:
                for problem in check_result(result):
                    failures.append(f"rank {rank} {group} {Case(**result['case']).name()}: {problem}")
    assert not failures, "\n".join(failures[:40])


@pytest.mark.timeout(900)
def test_all_meshes_ran(world_results):
    world_size, per_rank = world_results
    ran = {(r["case"]["ulysses"], r["case"]["ring"]) for r in per_rank[0]["sequence"]}
    assert ran == set(MESHES[world_size])
    assert len(per_rank[0]["sequence"]) == len(_cases_for_world(world_size))
    if any(u > 1 and r > 1 for u, r in MESHES[world_size]):
        assert len(per_rank[0]["ring_inner"]) == 2


@pytest.mark.timeout(900)
def test_error_ratio_does_not_grow_with_world_size(world_results):
    """The bound is the same at every world size (2x the single-device error); also report the worst ratio."""
    world_size, per_rank = world_results
    worst = max(t["ratio"] for r in per_rank[0]["sequence"] for t in r["tensors"].values()
                if t["single_device_error"] > 0)
    print(f"world {world_size}: worst error ratio vs single-device kernel {worst:.2f}")
    assert worst <= 2.0 + 1e-9 or all(
        t["error"] <= t["bound"] for r in per_rank[0]["sequence"] for t in r["tensors"].values()
    )
