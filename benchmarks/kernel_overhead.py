"""usp's own cost on one GPU: ``long_context_attention`` on a 1x1 mesh vs calling the kernel directly.

    python3 benchmarks/kernel_overhead.py --seqlens 32k,128k --json out.json

Issue 4 asks the default backend to be the fastest kernel present and within 3% of calling that kernel directly.
For each backend ("auto" and each named one present) and shape: median fwd+bwd ms over --repeats after --warmup
(CUDA events) of (a) usp on a 1x1 mesh, (b) the kernel's public entry point called directly on the same tensors
(FA4: ``flash_attn.cute.flash_attn_func``; cuDNN: ``F.scaled_dot_product_attention`` under the cuDNN SDPA backend),
interleaved so drift hits both. Also, with --memory-probe, the extra memory the cuDNN kernel allocates for a
head-sliced (strided) view, as head chunks pass it, against a contiguous tensor of the same shape.
"""
import argparse
import json
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

import usp
from bench_common import parse_seqlen as parse_len
from cuda_timing import events_ms
from usp.kernels import resolve_backend


def direct_step(name, q, k, v, dout, causal):
    if name == "fa4":
        from flash_attn.cute import flash_attn_func

        def step():
            out = flash_attn_func(q, k, v, causal=causal)
            out = out[0] if isinstance(out, tuple) else out
            out.backward(dout)
        return step
    if name == "cudnn":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def step():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                     is_causal=causal, enable_gqa=k.shape[2] != q.shape[2])
            out.transpose(1, 2).backward(dout)
        return step
    return None


def memory_probe(seqlen, heads, chunk_heads, head_dim):
    """Peak extra bytes of one cuDNN fwd+bwd on a head slice of [1, s, heads, d] vs on a contiguous chunk."""
    kernel = resolve_backend("cudnn", torch.device("cuda"), torch.bfloat16, head_dim)
    full = [torch.randn(1, seqlen, heads, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(5)]
    result = {"seqlen": seqlen, "heads": heads, "chunk_heads": chunk_heads}
    for label in ("head_slice", "contiguous"):
        if label == "head_slice":
            q, k, v, out_like, dout = (t[:, :, :chunk_heads] for t in full)
        else:
            q, k, v, out_like, dout = (t[:, :, :chunk_heads].contiguous() for t in full)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out, lse = kernel.forward(q, k, v, True, head_dim ** -0.5)
        fwd_peak = torch.cuda.max_memory_allocated() - base
        torch.cuda.reset_peak_memory_stats()
        base_bwd = torch.cuda.memory_allocated()
        grads = kernel.backward(dout, q, k, v, out, lse, True, head_dim ** -0.5)
        bwd_peak = torch.cuda.max_memory_allocated() - base_bwd
        chunk_bytes = q.numel() * q.element_size()
        result[label] = {"forward_peak_over_inputs_GiB": fwd_peak / 2**30, "backward_peak_GiB": bwd_peak / 2**30,
                         "in_units_of_q_chunk": {"forward": fwd_peak / chunk_bytes, "backward": bwd_peak / chunk_bytes}}
        del out, lse, grads
    return result


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seqlens", default="32k,128k")
    p.add_argument("--heads", default="32/32,32/8")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--backends", default="auto,fa4,cudnn")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--memory-probe", action="store_true")
    p.add_argument("--json", required=True)
    a = p.parse_args()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    mesh = usp.SequenceParallelMesh(ulysses=1, ring=1)
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
              "auto_resolves_to": resolve_backend("auto", torch.device("cuda"), torch.bfloat16, a.head_dim).name,
              "rows": [], "memory_probe": None}
    for backend in a.backends.split(","):
        try:
            kernel = resolve_backend(backend, torch.device("cuda"), torch.bfloat16, a.head_dim)
        except ValueError as error:
            report["rows"].append({"backend": backend, "error": str(error)})
            continue
        for seqlen in map(parse_len, a.seqlens.split(",")):
            for heads, kv_heads in (tuple(map(int, h.split("/"))) for h in a.heads.split(",")):
                for causal in (True, False):
                    q = torch.randn(1, seqlen, heads, a.head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                    k = torch.randn(1, seqlen, kv_heads, a.head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                    v = torch.randn(1, seqlen, kv_heads, a.head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                    dout = torch.randn_like(q)

                    def via_usp():
                        q.grad = k.grad = v.grad = None
                        usp.long_context_attention(q, k, v, mesh, causal=causal, backend=backend).backward(dout)

                    direct = direct_step(kernel.name, q, k, v, dout, causal)
                    steps = {"usp": via_usp}
                    if direct is not None:
                        def via_kernel():
                            q.grad = k.grad = v.grad = None
                            direct()
                        steps["direct"] = via_kernel
                    times = {name: [] for name in steps}
                    for _ in range(a.warmup):
                        for fn in steps.values():
                            fn()
                    torch.cuda.synchronize()
                    for _ in range(a.repeats):
                        for name, fn in steps.items():
                            times[name].append(events_ms(fn))
                    row = {"backend": backend, "kernel": kernel.name, "seqlen": seqlen, "heads": heads,
                           "kv_heads": kv_heads, "causal": causal,
                           **{f"{name}_ms": statistics.median(t) for name, t in times.items()}}
                    if "direct_ms" in row:
                        row["usp_over_direct"] = row["usp_ms"] / row["direct_ms"]
                    report["rows"].append(row)
                    print(json.dumps(row), flush=True)
                    del q, k, v, dout
    if a.memory_probe:
        report["memory_probe"] = memory_probe(512 * 1024, 32, 4, a.head_dim)
        print(json.dumps(report["memory_probe"], indent=1))
    with open(a.json, "w") as f:
        json.dump(report, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
