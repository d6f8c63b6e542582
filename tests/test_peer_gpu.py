"""Same-kernel cross-check with the peer: usp's flash-attn 2 ring against ring-flash-attention's, on 2 GPUs (NCCL).

Identical inputs (the zigzag layout for causal, contiguous chunks otherwise: both libraries lay a ring of two out
the same way), the same flash-attn 2 build, both compared with an fp64 reference on the gathered tensors. usp must
be within the usual bound (2x the single-GPU flash-attn 2 error) and agree with ring-flash-attention to that bound.

Skipped unless 2 CUDA devices, flash-attn 2 and ring-flash-attn are importable; ``USP_GPU_REQUIRE=fa2`` turns the
skip into a failure. On the GPU machine the flash-attn 2 recipe installs both (see ``benchmarks/RESULTS.md``).
"""
from __future__ import annotations

import json
import sys
import types

import pytest
import torch

from distributed import run_world
from gpu_backends import save_report, skip_unless_required

FP32_ULP = torch.finfo(torch.float32).eps
#: (causal, batch, seqlen, heads, kv_heads, head_dim): ring-flash-attention's own test shape, then GQA, batch 2
CASES = ((True, 1, 3816, 5, 5, 128), (False, 1, 3816, 5, 5, 128), (True, 2, 8192, 16, 4, 128),
         (False, 1, 4096, 8, 2, 64))


def _import_ring_flash_attn():
    """ring-flash-attn's Hugging Face adapter fails to import on transformers 5.x; it is not used here."""
    if "ring_flash_attn.adapters" not in sys.modules:
        stub = types.ModuleType("ring_flash_attn.adapters")

        def unavailable(*args, **kwargs):
            raise RuntimeError("ring_flash_attn.adapters is stubbed out in usp's tests")

        stub.substitute_hf_flash_attn = stub.update_ring_flash_attn_params = unavailable
        sys.modules["ring_flash_attn.adapters"] = stub
    import ring_flash_attn

    return ring_flash_attn


def _peer_available() -> str:
    if torch.cuda.device_count() < 2:
        return "needs 2 CUDA devices"
    try:
        _import_ring_flash_attn()
        from flash_attn.flash_attn_interface import _flash_attn_forward  # noqa: F401
    except Exception as error:  # ImportError, or the adapter failing for another reason
        return f"ring-flash-attn / flash-attn 2 not importable: {error!r}"
    return ""


def _norm(x):
    return float(torch.linalg.vector_norm(x.double()))


def _peer_world(rank, world_size):
    import torch.distributed as dist

    import usp
    from usp.kernels import BACKENDS
    from usp.kernels.reference import ReferenceKernel

    rfa = _import_ring_flash_attn()
    device = torch.device("cuda", rank)
    mesh = usp.SequenceParallelMesh(ulysses=1, ring=2)
    fa2 = BACKENDS["fa2"]
    results = []
    for causal, b, s, h, h_kv, d in CASES:
        gen = torch.Generator().manual_seed(17)
        full = {name: torch.randn(b, s, heads, d, generator=gen).bfloat16().to(device)
                for name, heads in (("q", h), ("k", h_kv), ("v", h_kv), ("dout", h))}
        scale = d ** -0.5
        f64 = {n: t.double() for n, t in full.items()}
        out64, lse64 = ReferenceKernel().forward(f64["q"], f64["k"], f64["v"], causal, scale)
        truth = [out64, *ReferenceKernel().backward(f64["dout"], f64["q"], f64["k"], f64["v"], out64, lse64,
                                                     causal, scale)]
        out1, lse1 = fa2.forward(full["q"], full["k"], full["v"], causal, scale)
        single = [out1, *fa2.backward(full["dout"], full["q"], full["k"], full["v"], out1, lse1, causal, scale)]
        local = {n: usp.shard(t, mesh, causal=causal) for n, t in full.items()}
        gathered = {}
        for library in ("usp", "ring_flash_attn"):
            q, k, v = (local[n].clone().requires_grad_() for n in ("q", "k", "v"))
            if library == "usp":
                out = usp.long_context_attention(q, k, v, mesh, causal=causal, backend="fa2")
            else:
                peer = rfa.zigzag_ring_flash_attn_func if causal else rfa.ring_flash_attn_func
                out = peer(q, k, v, softmax_scale=scale, causal=causal, group=dist.group.WORLD)
            out.backward(local["dout"])
            gathered[library] = [usp.gather(t.detach(), mesh, causal=causal) for t in (out, q.grad, k.grad, v.grad)]
        row = {"case": [causal, b, s, h, h_kv, d], "tensors": {}}
        for i, name in enumerate(("out", "dq", "dk", "dv")):
            ref_norm = _norm(truth[i])
            row["tensors"][name] = {
                "single": _norm(single[i].double() - truth[i]) / ref_norm,
                "usp": _norm(gathered["usp"][i].double() - truth[i]) / ref_norm,
                "ring_flash_attn": _norm(gathered["ring_flash_attn"][i].double() - truth[i]) / ref_norm,
                "usp_vs_ring_flash_attn": _norm(gathered["usp"][i].double() - gathered["ring_flash_attn"][i].double())
                / ref_norm,
            }
        results.append(row)
    return results


@pytest.mark.timeout(900)
def test_usp_fa2_ring_agrees_with_ring_flash_attention():
    reason = _peer_available()
    if reason:
        skip_unless_required("fa2", reason)
    per_rank = run_world(2, _peer_world, timeout=800, backend="nccl")
    save_report(per_rank[0])
    failures = []
    for row in per_rank[0]:
        print("\npeer cross-check", row["case"], json.dumps(
            {n: {k: f"{v:.3e}" for k, v in t.items()} for n, t in row["tensors"].items()}))
        for name, t in row["tensors"].items():
            bound = 2 * t["single"] + FP32_ULP
            if not t["usp"] <= bound:
                failures.append(f"{row['case']} {name}: usp error {t['usp']:.3e} > bound {bound:.3e}")
            if not t["usp_vs_ring_flash_attn"] <= bound:
                failures.append(f"{row['case']} {name}: usp vs ring-flash-attn {t['usp_vs_ring_flash_attn']:.3e} "
                                f"> bound {bound:.3e}")
    assert not failures, "\n".join(failures)
