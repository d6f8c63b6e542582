"""The hybrid (U > 1 and R > 1 together) on real NCCL with two GPUs: a 2x2 mesh as 4 processes, 2 per GPU.

NCCL refuses a communicator with two ranks on one GPU, so the default group is gloo and the mesh's Ulysses and ring
subgroups are NCCL (``SequenceParallelMesh(..., backend="nccl")``), placed so that no subgroup has two ranks on one
GPU: with the default placement the Ulysses groups are ranks {0, 1} and {2, 3} and the ring groups {0, 2} and
{1, 3}, so ranks 0 and 3 share GPU 0 and ranks 1 and 2 share GPU 1. Dense and packed, causal and not, against the
fp64 reference (``attention_cases``/``varlen_cases``), collective counts included.

Skipped without 2 CUDA devices (CI has none).
"""
from __future__ import annotations

import json

import pytest
import torch

from attention_cases import Case, check_result, run_case
from distributed import run_world
from gpu_backends import save_report
from varlen_cases import VarlenCase, check_varlen_result, run_varlen_case

#: GPU of each rank: no Ulysses group ({0, 1}, {2, 3}) and no ring group ({0, 2}, {1, 3}) shares a GPU
GPU_OF_RANK = (0, 1, 1, 0)


def _cases():
    from usp.layout import required_multiple

    dense = []
    for causal in (True, False):
        multiple = required_multiple(2, 2, causal)
        dense.append(Case(2, 2, causal, "bfloat16", 1, multiple * 1021, 16, 4, 128))
        dense.append(Case(2, 2, causal, "bfloat16", 2, multiple * 257, 8, 8, 64))
    dense.append(Case(2, 2, True, "bfloat16", 1, required_multiple(2, 2, True) * 401, 16, 4, 128, head_chunks=2))
    packed = [VarlenCase(2, 2, causal, "bfloat16", "gpu_mixed", 16, 4, 128) for causal in (True, False)]
    return dense, packed


def _hybrid_world(rank, world_size):
    import usp

    device = torch.device("cuda", GPU_OF_RANK[rank])
    torch.cuda.set_device(device)
    mesh = usp.SequenceParallelMesh(ulysses=2, ring=2, backend="nccl")
    dense, packed = _cases()
    return {"dense": [run_case(c, mesh, device) for c in dense],
            "packed": [run_varlen_case(c, mesh, device) for c in packed],
            "groups": [str(torch.distributed.get_backend(g)) for g in (mesh.ulysses_group, mesh.ring_group)]}


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices (run on the GPU machine)")
@pytest.mark.timeout(900)
def test_hybrid_2x2_on_nccl_two_ranks_per_gpu():
    per_rank = run_world(4, _hybrid_world, timeout=800, backend="gloo")
    save_report(per_rank[0])
    failures = []
    for rank, results in enumerate(per_rank):
        assert results["groups"] == ["nccl", "nccl"], results["groups"]
        for result in results["dense"]:
            failures += [f"rank {rank} {Case(**result['case']).name()}: {p}" for p in check_result(result)]
        for result in results["packed"]:
            failures += [f"rank {rank} {VarlenCase(**result['case']).name()}: {p}" for p in check_varlen_result(result)]
    worst = {}
    for result in per_rank[0]["dense"] + per_rank[0]["packed"]:
        for name, t in result["tensors"].items():
            ratio = t["error"] / t["single_device_error"] if t["single_device_error"] else 0.0
            worst[name] = max(worst.get(name, 0.0), ratio)
    print("\n2x2 on NCCL, kernel", per_rank[0]["dense"][0]["kernel"], "worst ratio to the single-GPU kernel:",
          json.dumps({k: round(v, 3) for k, v in worst.items()}))
    assert not failures, "\n".join(failures[:30])
