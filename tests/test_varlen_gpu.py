"""The varlen path on 2 GPUs with NCCL: meshes 1x2 and 2x1, every GPU varlen backend (fa4, fa2, torch_flash, cudnn;
``gpu_backends.py`` says how to narrow or require them), against the
per-document fp64 reference (cases and pass rule in ``varlen_cases.py``); and every GPU varlen kernel alone on one
GPU with empty sequences on either side (the semantics ``VarlenBlockKernel`` promises whatever the kernel writes),
length-1 and odd lengths, causal and not, GQA/MQA, bf16 and fp16, head_dim 64 and 128. A backend that reports itself
unavailable is skipped with its reason, unless the run requires it (``USP_GPU_REQUIRE``).

Skipped without 2 CUDA devices (CI has none). On the GPU machine: ``pytest tests/test_varlen_gpu.py -s`` (it starts
its two NCCL ranks itself, like ``test_gpu.py``). ``USP_TEST_REPORT=path.json`` saves every case's errors.
"""
from __future__ import annotations

import json

import pytest
import torch

from distributed import run_world
from gpu_backends import gpu_backends, save_report, skip_unless_required
from varlen_cases import VarlenCase, check_varlen_result, run_varlen_case

pytestmark = pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="needs 2 CUDA devices (run on the GPU machine)"
)
# cuDNN has no varlen kernel in usp by design (refused with its reason: tests/test_structure.py), so a run that
# requires cudnn for the dense tests does not require it here
BACKENDS = tuple(name for name in gpu_backends() if name != "cudnn")
#: kernel alone vs fp64 (relative Frobenius); FA-style kernels round P to bf16, ~3e-3 is typical (fp16 less)
KERNEL_TOLERANCE = 2e-2


def _gpu_cases(backend):
    cases = []
    for u, r in ((1, 2), (2, 1)):
        for causal in (True, False):
            cases.append(VarlenCase(u, r, causal, "bfloat16", "gpu_mixed", 16, 4, 128, backend))
            cases.append(VarlenCase(u, r, causal, "bfloat16", "gpu_tiny", 8, 8, 64, backend))
            cases.append(VarlenCase(u, r, causal, "bfloat16", "gpu_placed", 16, 4, 128, backend))
        cases.append(VarlenCase(u, r, True, "float16", "gpu_mixed", 16, 1, 128, backend))
    return cases


#: (dtype, heads, kv_heads, head_dim) of the kernel-alone check
KERNEL_VARIANTS = (("bfloat16", 16, 4, 128), ("float16", 16, 4, 64), ("bfloat16", 8, 8, 64), ("float16", 8, 1, 128))
#: label -> (causal, query lengths, key lengths)
KERNEL_CONFIGS = {
    "full": (False, [300, 0, 129, 64, 1], [300, 77, 129, 0, 1]),
    "causal": (True, [300, 129, 1, 517], [300, 129, 1, 517]),
    # empty sequences (both sides) between causal ones
    "causal, empty": (True, [0, 37, 0, 1, 255], [0, 37, 0, 1, 255]),
    # every query sequence at most 1 long, some empty (FA2's max_seqlen_q == 1 shortcut must not trigger)
    "full, max_q 1": (False, [1, 0, 1, 1], [1, 3, 0, 1]),
    # odd lengths, queries and keys of different lengths
    "full, odd": (False, [97, 3, 1025], [1, 201, 33]),
}


def _kernel_semantics(backend: str, device: torch.device) -> dict:
    """One varlen kernel through ``VarlenBlockKernel`` (one call) vs the fp64 reference varlen kernel, for every
    ``KERNEL_VARIANTS`` x ``KERNEL_CONFIGS``: sequences empty on either side (non-causal) or both (causal)."""
    from usp.kernels.varlen import (VARLEN_BACKENDS, ReferenceVarlenKernel, VarlenBlock, VarlenBlockKernel,
                                    VarlenCall, VarlenSeqs)

    kernel = VARLEN_BACKENDS[backend]
    gen = torch.Generator().manual_seed(7)
    results = {}
    for dtype_name, h, h_kv, d in KERNEL_VARIANTS:
        dtype = getattr(torch, dtype_name)
        for config, (causal, q_lengths, k_lengths) in KERNEL_CONFIGS.items():
            seqs = VarlenSeqs(q_lengths, k_lengths)
            t_q, t_k = seqs.total_q, seqs.total_k
            tensors = {
                "q": torch.randn(1, t_q, h, d, generator=gen), "k": torch.randn(1, t_k, h_kv, d, generator=gen),
                "v": torch.randn(1, t_k, h_kv, d, generator=gen), "dout": torch.randn(1, t_q, h, d, generator=gen),
            }
            low = {n: t.to(dtype).to(device) for n, t in tensors.items()}
            f64 = {n: t.double() for n, t in low.items()}
            block = VarlenBlock([VarlenCall(slice(0, t_q), slice(0, t_k), seqs, causal)], t_q, t_k)
            scale = d ** -0.5
            got, want = {}, {}
            runs = ((VarlenBlockKernel(kernel), low, got), (VarlenBlockKernel(ReferenceVarlenKernel()), f64, want))
            for kern, ins, into in runs:
                out, lse = kern.forward(ins["q"], ins["k"], ins["v"], block, scale)
                dq, dk, dv = kern.backward(ins["dout"], ins["q"], ins["k"], ins["v"], out, lse, block, scale)
                into.update(out=out, lse=lse, dq=dq, dk=dk, dv=dv)
            errors = {}
            for name in want:
                finite = torch.isfinite(want[name])
                same_inf = bool((got[name][~finite] == want[name][~finite]).all())  # -inf LSE of empty sequences
                diff = torch.linalg.vector_norm((got[name].double() - want[name])[finite])
                ref_norm = torch.linalg.vector_norm(want[name][finite])
                if ref_norm == 0:
                    # e.g. dq, dk when every query sees one key: exactly zero, so measure against the incoming gradient
                    ref_norm = torch.linalg.vector_norm(f64["dout"])
                errors[name] = {"error": float(diff / ref_norm), "same_inf": same_inf,
                                "finite": bool(torch.isfinite(got[name][finite]).all()),
                                "dtype_ok": got[name].dtype == (torch.float32 if name == "lse" else dtype)}
            results[f"{dtype_name} h{h}/{h_kv} d{d}: {config}"] = errors
    return results


def _gpu_world(rank, world_size, backends):
    import usp

    from usp.kernels.varlen import VARLEN_BACKENDS

    device = torch.device("cuda", rank)
    mesh_cache = {}
    results = {}
    for backend in backends:
        kernel = VARLEN_BACKENDS[backend]
        if not kernel.is_available():
            results[backend] = {"unavailable": kernel.unsupported_reason(device, torch.bfloat16, 128)}
            continue
        try:
            cases = []
            for case in _gpu_cases(backend):
                key = (case.ulysses, case.ring)
                if key not in mesh_cache:
                    mesh_cache[key] = usp.SequenceParallelMesh(ulysses=case.ulysses, ring=case.ring)
                cases.append(run_varlen_case(case, mesh_cache[key], device))
            results[backend] = {"cases": cases, "kernel": _kernel_semantics(backend, device)}
        except Exception:  # one broken backend must not hide the others' results
            import traceback

            results[backend] = traceback.format_exc()
    return results


@pytest.fixture(scope="module")
def gpu_results():
    per_rank = run_world(2, _gpu_world, BACKENDS, timeout=1500, backend="nccl")
    save_report(per_rank[0])
    return per_rank


def _results_for(gpu_results, backend):
    first = gpu_results[0][backend]
    if isinstance(first, dict) and "unavailable" in first:
        skip_unless_required(backend, first["unavailable"])
    for rank, results in enumerate(gpu_results):
        assert not isinstance(results[backend], str), f"rank {rank} crashed:\n{results[backend]}"
    return [results[backend] for results in gpu_results]


@pytest.mark.timeout(1600)
@pytest.mark.parametrize("backend", BACKENDS)
def test_gpu_varlen_kernel_alone_matches_fp64_with_empty_sequences(gpu_results, backend):
    failures = []
    for rank, results in enumerate(_results_for(gpu_results, backend)):
        for mask, errors in results["kernel"].items():
            for name, e in errors.items():
                if not (e["finite"] and e["same_inf"] and e["dtype_ok"] and e["error"] <= KERNEL_TOLERANCE):
                    failures.append(f"rank {rank} {mask} {name}: {e}")
    print(f"\n{backend} kernel alone vs fp64:", json.dumps(_results_for(gpu_results, backend)[0]["kernel"]))
    assert not failures, "\n".join(failures)


@pytest.mark.timeout(1600)
@pytest.mark.parametrize("backend", BACKENDS)
def test_gpu_varlen_matches_per_document_fp64_reference(gpu_results, backend):
    failures = []
    worst = {}
    for rank, results in enumerate(_results_for(gpu_results, backend)):
        for result in results["cases"]:
            case = VarlenCase(**result["case"])
            assert result["kernel"] == backend
            failures += [f"rank {rank} {case.name()}: {p}" for p in check_varlen_result(result)]
            for name, t in result["tensors"].items():
                key = f"U{case.ulysses}xR{case.ring} {'causal' if case.causal else 'full'} {name}"
                ratio = t["error"] / t["single_device_error"] if t["single_device_error"] else 0.0
                worst[key] = max(worst.get(key, 0.0), ratio)
    print(f"\n{backend}: worst error ratio (usp varlen / single-GPU varlen kernel, vs fp64):",
          json.dumps({k: round(v, 3) for k, v in sorted(worst.items())}))
    assert not failures, "\n".join(failures[:30])

