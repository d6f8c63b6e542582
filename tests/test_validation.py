"""Every bad input raises ValueError/TypeError naming the argument, on every rank, before any collective.

One 2-rank world runs every bad call on both ranks (mesh 2x1 and 1x2) and then a correct call, which would hang
if any rank had entered a collective for a bad call.
"""
from __future__ import annotations

import pytest

from distributed import run_world


def _bad_calls(mesh_u, mesh_r):
    """(description, expected exception type name, regex the message must match, callable)."""
    import torch

    import usp
    from usp.kernels.reference import ReferenceKernel

    mesh = usp.SequenceParallelMesh(ulysses=mesh_u, ring=mesh_r)
    mesh_u2 = mesh if mesh_u > 1 else usp.SequenceParallelMesh(ulysses=2, ring=1)
    f32 = torch.float32

    def t(*shape, dtype=f32, device="cpu"):
        return torch.randn(*shape, dtype=dtype, device=device)

    q, k, v = t(1, 4, 4, 16), t(1, 4, 2, 16), t(1, 4, 2, 16)

    class NoHeadDim80(ReferenceKernel):
        name = "no80"

        def _head_dim_reason(self, head_dim):
            return f"backend 'no80' supports head_dim 16 or 64, got {head_dim}" if head_dim not in (16, 64) else None

    attn = usp.long_context_attention
    calls = [
        ("heads not divisible by ulysses", "ValueError", r"heads .*divisible by the Ulysses degree",
         lambda: attn(t(1, 4, 3, 16), t(1, 4, 3, 16), t(1, 4, 3, 16), mesh if mesh_u > 1 else mesh_u2)),
        ("kv_heads not dividing heads", "ValueError", r"kv_heads",
         lambda: attn(t(1, 4, 4, 16), t(1, 4, 3, 16), t(1, 4, 3, 16), mesh)),
        ("sequence not divisible by chunk count", "ValueError", r"multiple of",
         lambda: attn(t(1, 3, 4, 16), t(1, 3, 2, 16), t(1, 3, 2, 16), mesh, causal=True) if mesh_r > 1 else
         usp.shard(t(1, 5, 4, 16), mesh)),
        ("dtype mismatch", "TypeError", r"dtype", lambda: attn(q, k.double(), v, mesh)),
        ("device mismatch", "ValueError", r"device", lambda: attn(q, t(1, 4, 2, 16, device="meta"), v, mesh)),
        ("ndim", "ValueError", r"q must have 4 dims", lambda: attn(t(4, 4, 16), k, v, mesh)),
        ("batch mismatch", "ValueError", r"batch", lambda: attn(q, t(2, 4, 2, 16), t(2, 4, 2, 16), mesh)),
        ("head_dim mismatch", "ValueError", r"head_dim", lambda: attn(q, t(1, 4, 2, 8), t(1, 4, 2, 8), mesh)),
        ("k/v shape mismatch", "ValueError", r"k and v", lambda: attn(q, k, t(1, 4, 1, 16), mesh)),
        ("sequence mismatch", "ValueError", r"seq_local mismatch", lambda: attn(q, t(1, 2, 2, 16), t(1, 2, 2, 16), mesh)),
        ("head_dim the backend cannot do", "ValueError", r"head_dim",
         lambda: attn(t(1, 4, 4, 80), t(1, 4, 2, 80), t(1, 4, 2, 80), mesh, backend=NoHeadDim80())),
        ("unknown backend", "ValueError", r"valid values for the dense path: 'auto'", lambda: attn(q, k, v, mesh, backend="flashy")),
        ("backend not available here", "ValueError", r"cannot run here", lambda: attn(q, k, v, mesh, backend="cudnn")),
        ("backend wrong type", "TypeError", r"backend", lambda: attn(q, k, v, mesh, backend=3)),
        ("integer tensors", "TypeError", r"floating-point", lambda: attn(q.long(), k.long(), v.long(), mesh)),
        ("not a tensor", "TypeError", r"q must be a torch.Tensor", lambda: attn([1], k, v, mesh)),
        ("mesh wrong type", "TypeError", r"mesh must be", lambda: attn(q, k, v, "mesh")),
        ("causal not bool", "TypeError", r"causal", lambda: attn(q, k, v, mesh, causal="yes")),
        ("bad softmax_scale", "ValueError", r"softmax_scale", lambda: attn(q, k, v, mesh, softmax_scale=-1.0)),
        ("softmax_scale inf", "ValueError", r"softmax_scale must be None .*or a finite positive float, got inf",
         lambda: attn(q, k, v, mesh, softmax_scale=float("inf"))),
        ("softmax_scale nan", "ValueError", r"finite positive float, got nan",
         lambda: attn(q, k, v, mesh, softmax_scale=float("nan"))),
        ("softmax_scale zero", "ValueError", r"finite positive float, got 0",
         lambda: attn(q, k, v, mesh, softmax_scale=0)),
        ("head_dim zero", "ValueError", r"head_dim \(q.shape\[3\]\) must be positive",
         lambda: attn(t(1, 4, 4, 0), t(1, 4, 2, 0), t(1, 4, 2, 0), mesh)),
        ("head_chunks not fitting the heads", "ValueError", r"head_chunks=3 .*valid values: \[1, 2(, 4)?\]",
         lambda: attn(q, k, v, mesh, head_chunks=3)),
        ("head_chunks zero", "ValueError", r"head_chunks=0", lambda: attn(q, k, v, mesh, head_chunks=0)),
        ("head_chunks not an int", "ValueError", r"head_chunks=2.0", lambda: attn(q, k, v, mesh, head_chunks=2.0)),
        ("mesh larger than world", "ValueError", r"must divide the world size",
         lambda: usp.SequenceParallelMesh(ulysses=3, ring=1)),
        ("mesh degree not int", "TypeError", r"ulysses must be a positive int",
         lambda: usp.SequenceParallelMesh(ulysses=1.5, ring=1)),
        ("bad placement", "ValueError", r"valid values: 'ulysses_inner', 'ring_inner'",
         lambda: usp.SequenceParallelMesh(ulysses=1, ring=2, placement="diagonal")),
        ("shard dim out of range", "ValueError", r"dim=5", lambda: usp.shard(q, mesh, dim=5)),
        ("module mesh wrong type", "TypeError", r"mesh must be", lambda: usp.LongContextAttention(None)),
    ]
    return mesh, calls


def _validation_world(rank, world_size, mesh_u, mesh_r):
    import re

    import torch

    import usp

    mesh, calls = _bad_calls(mesh_u, mesh_r)
    outcomes = []
    for description, expected, pattern, call in calls:
        try:
            call()
            outcomes.append((description, "no exception"))
        except Exception as error:  # noqa: BLE001 - we classify below
            ok = type(error).__name__ == expected and re.search(pattern, str(error))
            outcomes.append((description, "ok" if ok else f"{type(error).__name__}: {error}"))
    # a good call after all bad ones: would hang if a rank were stuck in a collective
    q = usp.shard(torch.randn(1, 8, 4, 16), mesh, causal=True)
    out = usp.long_context_attention(q, q, q, mesh, causal=True)
    outcomes.append(("good call afterwards", "ok" if out.shape == q.shape else "wrong shape"))
    # the LSE is float32, float64 for float64 inputs (README, docstrings)
    dtypes = {}
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        x = q.to(dtype)
        dtypes[dtype] = usp.long_context_attention(x, x, x, mesh, causal=True, return_lse=True)[1].dtype
    expected = {torch.float32: torch.float32, torch.float64: torch.float64, torch.bfloat16: torch.float32}
    outcomes.append(("lse dtype", "ok" if dtypes == expected else f"lse dtypes {dtypes}"))
    return outcomes


@pytest.mark.timeout(300)
@pytest.mark.parametrize("mesh_u,mesh_r", [(2, 1), (1, 2)])
def test_bad_inputs_raise_on_every_rank(mesh_u, mesh_r):
    per_rank = run_world(2, _validation_world, mesh_u, mesh_r, timeout=240)
    assert per_rank[0] == per_rank[1], "ranks disagreed"
    failures = [f"{d}: {o}" for d, o in per_rank[0] if o != "ok"]
    assert not failures, "\n".join(failures)
    assert len(per_rank[0]) == 33
