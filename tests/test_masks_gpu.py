"""Masked attention on 2 GPUs over NCCL (issue 11): window, softcap, sinks (and MLA head sizes on fa4), dense and
packed (windows on packed documents against the per-document reference on the varlen kernels with windows), meshes 1x2 and 2x1, on every GPU backend that supports the option (``gpu_backends``: narrow with
``USP_GPU_TEST_BACKENDS``, require with ``USP_GPU_REQUIRE``). Same cases and pass rule as the CPU ``test_masks``
(fp64 autograd reference, 2x the same kernel's single-GPU error + 1 fp32 ulp, P2P calls as the schedule states).
Skips without 2 GPUs. About a minute per backend."""
from __future__ import annotations

import pytest
import torch

from distributed import run_world
from gpu_backends import gpu_backends, skip_unless_required

needs_two_gpus = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs"
)


def _cases(backend, u, r):
    from mask_cases import MaskCase
    from usp.kernels import BACKENDS
    from usp.spec import required_multiple

    kernel = BACKENDS[backend]
    cases = []
    for causal in (True, False):
        seqlen = required_multiple(u, r, causal) * 128  # 256-token shards: windows below and above a shard
        for window, softcap, sinks in (((64, 0 if causal else 32), 0.0, True), ((300, 0 if causal else 300), 0.0, False),
                                       ((-1, -1 if not causal else 0), 30.0, True), ((-1, -1 if not causal else 0), 0.0, True)):
            if window not in ((-1, -1), (-1, 0)) and not kernel.supports_window:
                continue
            if softcap and not kernel.supports_softcap:
                continue
            cases.append(MaskCase(u, r, causal, "bfloat16", seqlen, heads=8, kv_heads=2, head_dim=128, v_head_dim=128,
                                  window=window, softcap=softcap, sinks=sinks, backend=backend))
    if kernel.different_v_head_dim:  # MLA as DeepSeek V3 trains it: MHA, q/k 192, v 128
        for causal, window in ((True, (64, 0)), (False, (-1, -1))):
            cases.append(MaskCase(u, r, causal, "bfloat16", required_multiple(u, r, causal) * 128, heads=8,
                                  kv_heads=8, head_dim=192, v_head_dim=128, window=window, sinks=True,
                                  backend=backend))
    return cases


def _world(rank, world_size, backend):
    import usp
    from mask_cases import check_mask_result, run_mask_case

    device = torch.device("cuda", rank)
    problems = []
    for u, r in ((1, 2), (2, 1)):
        mesh = usp.SequenceParallelMesh(ulysses=u, ring=r)
        for case in _cases(backend, u, r):
            problems += [f"{case.name()}: {p}" for p in check_mask_result(run_mask_case(case, mesh, device=device))]
        # packed documents with windows (smaller and larger than a document's chunk, crossing document starts),
        # softcap and sinks, against the per-document fp64 reference (varlen_cases), on the varlen kernels with windows;
        # a varlen backend that is not available here (cuDNN's before torch 2.14) has no packed part
        from usp.kernels.varlen import VARLEN_BACKENDS
        from varlen_cases import VarlenCase, check_varlen_result, run_varlen_case

        varlen_kernel = VARLEN_BACKENDS.get(backend)
        if varlen_kernel is None or not varlen_kernel.is_available():
            continue
        if varlen_kernel.supports_window:
            for causal, window, softcap, sinks in ((True, (64, 0), 0.0, True), (True, (700, 0), 30.0, False),
                                                   (False, (100, 37), 30.0, True)):
                case = VarlenCase(u, r, causal, "bfloat16", "gpu_mixed", 8, 2, 128, backend, window=window,
                                  softcap=softcap, sinks=sinks)
                problems += [f"{case.name()}: {p}" for p in check_varlen_result(run_varlen_case(case, mesh, device))]
            # windows on documents cut over the ring and placed whole (Note [document placement])
            case = VarlenCase(u, r, True, "bfloat16", "gpu_placed", 8, 2, 128, backend, window=(128, 0), sinks=True)
            problems += [f"{case.name()}: {p}" for p in check_varlen_result(run_varlen_case(case, mesh, device))]
        # packed documents with softcap and sinks on every backend (refused with a ValueError naming softcap where the
        # kernel lacks it)
        cu = [0, 300, 700, 1024]
        q, k, v = (torch.randn(1024, h, 128, device=device, dtype=torch.bfloat16) for h in (8, 2, 2))
        sinks = torch.zeros(8, device=device, requires_grad=True)
        shard = [usp.shard_varlen(t, cu, mesh).requires_grad_() for t in (q, k, v)]
        try:
            out = usp.long_context_attention_varlen(*shard, cu, None, mesh, softcap=30.0, sinks=sinks, backend=backend)
            out.float().sum().backward()
            if not torch.isfinite(out).all():
                problems.append("packed: non-finite output")
        except ValueError as error:
            if "softcap" not in str(error):
                problems.append(f"packed: {error}")
    return problems


@needs_two_gpus
@pytest.mark.timeout(600)
@pytest.mark.parametrize("backend", gpu_backends())
def test_masks_on_gpu(backend):
    from usp.kernels import BACKENDS

    kernel = BACKENDS[backend]
    if not kernel.is_available():
        skip_unless_required(backend, "not importable / no device it runs on")
    per_rank = run_world(2, _world, backend, backend="nccl", timeout=540)
    problems = [p for rank in per_rank for p in rank]
    assert not problems, "\n".join(problems[:40])
