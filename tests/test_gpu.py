"""The correctness suite on 2 GPUs with NCCL: meshes 1x2 and 2x1, every GPU backend "auto" can pick (fa4, fa2, cudnn,
torch_flash; ``gpu_backends.py`` says how to narrow or require them), dense and head chunks, plus ring-flash-attention's
own test shapes (seqlen 3816, 5 heads, head_dim 128), and deterministic mode (bitwise over three runs).

Skipped without 2 CUDA devices (CI has none); run on the GPU machine with ``pytest tests/test_gpu.py``.
Set ``USP_TEST_REPORT=path.json`` to save every case's errors and ratios.
"""
from __future__ import annotations

import json

import pytest
import torch

from attention_cases import Case, check_result, run_cases
from distributed import run_world
from gpu_backends import gpu_backends, save_report, skip_unless_required

needs_two_gpus = pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="needs 2 CUDA devices (run on the GPU machine)"
)
BACKENDS = gpu_backends()


def _gpu_cases(backend):
    from usp.layout import required_multiple

    cases = []
    for u, r in ((1, 2), (2, 1)):
        for causal in (True, False):
            for i, (heads, kv_heads, head_dim) in enumerate(((16, 16, 128), (16, 4, 64), (16, 1, 128))):
                odd = (511, 1021, 257)[i]
                seqlen = required_multiple(u, r, causal) * odd
                cases.append(Case(u, r, causal, "bfloat16", 1 + i % 2, seqlen, heads, kv_heads, head_dim, backend))
        cases.append(Case(u, r, True, "float16", 1, required_multiple(u, r, True) * 333, 8, 2, 64, backend))
        cases.append(Case(u, r, True, "bfloat16", 1, required_multiple(u, r, True) * 401, 16, 4, 128, backend,
                          head_chunks=2))
        # more chunks than K/V heads per rank: chunks share a K/V head and sum its dK/dV in float32
        cases.append(Case(u, r, False, "bfloat16", 1, required_multiple(u, r, False) * 389, 16, 4, 64, backend,
                          head_chunks=8 // u))
    for causal in (True, False):  # ring-flash-attention's test shapes (5 heads: ring only)
        cases.append(Case(1, 2, causal, "bfloat16", 1, 3816, 5, 5, 128, backend))
    return cases


def _deterministic_runs(mesh, backend, device, runs=3):
    """Dense and packed, bf16, sizes where atomic accumulation would show: ``{mode: bitwise equal over runs}`` for
    deterministic=True, and for the default (False) as a record of whether the kernel is non-deterministic at all."""
    import usp

    gen = torch.Generator().manual_seed(3)
    seqlen, lengths = 8192, [3001, 17, 1203, 2999, 972]
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    dense = [torch.randn(1, seqlen, 16, 128, generator=gen).bfloat16().to(device) for _ in range(4)]
    packed = [torch.randn(cu[-1], 16, 128, generator=gen).bfloat16().to(device) for _ in range(4)]
    dense_local = [usp.shard(t, mesh) for t in dense]
    packed_local = [usp.shard_varlen(t, cu, mesh) for t in packed]
    report = {}
    for deterministic in (True, False):
        for path, local in (("dense", dense_local), ("packed", packed_local)):
            outputs = []
            for _ in range(runs):
                q, k, v = (t.clone().requires_grad_() for t in local[:3])
                if path == "dense":
                    out = usp.long_context_attention(q, k, v, mesh, backend=backend, deterministic=deterministic)
                else:
                    out = usp.long_context_attention_varlen(q, k, v, cu, None, mesh, backend=backend,
                                                            deterministic=deterministic)
                out.backward(local[3])
                outputs.append([out.detach(), q.grad, k.grad, v.grad])
            same = all(torch.equal(a, b) for other in outputs[1:] for a, b in zip(outputs[0], other))
            report[f"{path} deterministic={deterministic}"] = same
    return report


def _gpu_world(rank, world_size, backends):
    import usp
    from usp.kernels import BACKENDS as ALL

    device = torch.device("cuda", rank)
    results = {}
    meshes = {}
    for backend in backends:
        if not ALL[backend].is_available():
            results[backend] = None
            continue
        try:
            results[backend] = {"cases": run_cases(_gpu_cases(backend), device), "deterministic": {}}
            if ALL[backend].deterministic_backward:
                for u, r in ((1, 2), (2, 1)):
                    mesh = meshes.setdefault((u, r), usp.SequenceParallelMesh(ulysses=u, ring=r))
                    results[backend]["deterministic"][f"{u}x{r}"] = _deterministic_runs(mesh, backend, device)
        except Exception:  # one broken backend must not hide the others' results
            import traceback

            results[backend] = traceback.format_exc()
    return results


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on the GPU machine)")
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fused_merge_kernel_matches_pytorch_merge(out_dtype):
    """csrc/ fused merge vs the PyTorch ops it replaces: strided row/head views, rows without keys, every dtype."""
    from usp._csrc import fused_merge_op, fused_merge_status
    from usp.merge import merge_attention_reference_

    op = fused_merge_op()
    assert op is not None, f"fused merge not built: {fused_merge_status()}"
    gen = torch.Generator(device="cuda").manual_seed(5)
    for block_dtype in (torch.bfloat16, torch.float16, torch.float32):
        base = torch.randn(2, 1037, 12, 128, device="cuda", generator=gen).to(out_dtype)
        block_full = torch.randn(2, 1037, 12, 128, device="cuda", generator=gen).to(block_dtype)
        lse_base = torch.randn(2, 12, 1037, device="cuda", generator=gen) * 4
        block_lse_full = torch.randn(2, 12, 1037, device="cuda", generator=gen) * 4
        lse_base[0, 3, :17] = float("-inf")
        block_lse_full[1, 5, 100:140] = float("-inf")
        block_lse_full[0, 3, :5] = float("-inf")  # both sides empty: keep the accumulator
        rows, heads = slice(511, 1037), slice(4, 8)
        results = []
        for merge in (op, merge_attention_reference_):
            out, lse = base.clone(), lse_base.clone()
            merge(out[:, rows, heads], lse[:, heads, rows], block_full[:, rows, heads],
                  block_lse_full[:, heads, rows])
            results.append((out, lse))
        (fused_out, fused_lse), (ref_out, ref_lse) = results
        assert torch.equal(fused_lse.isinf(), ref_lse.isinf())
        torch.testing.assert_close(fused_lse, ref_lse, rtol=2e-6, atol=2e-6)
        # same float32 math; torch's lerp switches formula at weight 0.5, so the two may differ by a few float32
        # roundings of the operands' size (cancellation), and then by one rounding of the out dtype
        acc, new = base[:, rows, heads].float(), block_full[:, rows, heads].float()
        scale = acc.abs() + new.abs()
        diff = (fused_out[:, rows, heads].float() - ref_out[:, rows, heads].float()).abs()
        limit = 4 * torch.finfo(torch.float32).eps * scale + torch.finfo(out_dtype).eps * ref_out[:, rows, heads].float().abs()
        assert (diff <= limit).all(), (diff - limit).max()
        untouched = torch.ones_like(base, dtype=torch.bool)
        untouched[:, rows, heads] = False
        assert torch.equal(fused_out[untouched], base[untouched])


@pytest.fixture(scope="module")
def gpu_results():
    per_rank = run_world(2, _gpu_world, BACKENDS, timeout=900, backend="nccl")
    save_report(per_rank[0])
    return per_rank


@needs_two_gpus
@pytest.mark.timeout(1000)
@pytest.mark.parametrize("backend", BACKENDS)
def test_gpu_backend_matches_fp64_reference(gpu_results, backend):
    _results_for(gpu_results, backend)
    failures = []
    worst = {}
    for rank, results in enumerate(gpu_results):
        for result in results[backend]["cases"]:
            case = Case(**result["case"])
            assert result["kernel"] == backend
            failures += [f"rank {rank} {case.name()}: {p}" for p in check_result(result)]
            for name, t in result["tensors"].items():
                key = f"U{case.ulysses}xR{case.ring} {'causal' if case.causal else 'full'} {name}"
                worst[key] = max(worst.get(key, 0.0), t["ratio"])
    print(f"\n{backend}: worst error ratio (usp / single-GPU kernel, vs fp64):",
          json.dumps({k: round(v, 3) for k, v in sorted(worst.items())}))
    assert not failures, "\n".join(failures[:30])


def _results_for(gpu_results, backend):
    if gpu_results[0][backend] is None:
        skip_unless_required(backend, "not installed on this machine")
    for rank, results in enumerate(gpu_results):
        assert not isinstance(results[backend], str), f"rank {rank} crashed:\n{results[backend]}"
    return [results[backend] for results in gpu_results]


@needs_two_gpus
@pytest.mark.timeout(1000)
@pytest.mark.parametrize("backend", BACKENDS)
def test_gpu_deterministic_mode_is_bitwise_over_three_runs(gpu_results, backend):
    from usp.kernels import BACKENDS as ALL

    per_rank = _results_for(gpu_results, backend)
    if not ALL[backend].deterministic_backward:
        with pytest.raises(ValueError, match="has no deterministic backward"):
            from usp.kernels import resolve_backend

            resolve_backend(backend, "cuda", torch.bfloat16, 128, deterministic=True)
        return
    print(f"\n{backend} bitwise over 3 runs:", json.dumps(per_rank[0]["deterministic"]))
    for rank, results in enumerate(per_rank):
        assert set(results["deterministic"]) == {"1x2", "2x1"}
        for mesh, report in results["deterministic"].items():
            for mode, same in report.items():
                if "deterministic=True" in mode:
                    assert same, f"rank {rank} {backend} {mesh} {mode}: runs differ"
