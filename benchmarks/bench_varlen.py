"""Packed variable-length documents through usp's varlen path on 2 GPUs (issue 6), next to the dense case.

    torchrun --nproc-per-node 2 benchmarks/bench_varlen.py --out benchmarks/varlen_results.json

For every total length (default 128K and 256K tokens): a long-tailed document mix (seeded Pareto lengths, capped at a
quarter of the total, summing exactly to the total) and the dense sequence of the same length. Heads 32/8 (GQA),
head_dim 128, bf16, causal, forward+backward (``--heads``, ``--head-dim``, ``--non-causal`` change that). Measured:

* ``t1_ms``: the same kernel on one GPU over the whole problem: the varlen kernel over the whole packed batch, or the
  dense kernel over the whole sequence (every rank measures it on its own GPU; the slowest counts);
* ``tp_ms`` for each mesh (default 1x2 ring and 2x1 Ulysses): usp on local shards (``usp.shard_varlen`` /
  ``usp.shard``), forward + backward;
* ``efficiency`` E = T_1GPU / (P * T_P) (issue 4's definition);
* ``rfa_ratio`` = P * T_kernel(local shard) / T_P, ring-flash-attention's "theoretic" ratio: the kernel on a problem
  of one rank's size (each document ``L_j / P`` long, or ``s / P`` dense). Its README reports 75.9% for its varlen
  zigzag (8xH800, fwd+bwd), recorded in the output as ``ring_flash_attn_published_varlen_ratio``;
* TFLOP/s per GPU (4·h·d·sum(L²), halved when causal, x3.5 for fwd+bwd) and peak memory per GPU.

Timing: CUDA events around one iteration, all ranks started together (barrier + synchronize before each), per
iteration the slowest rank's time, the median over ``--iters`` iterations after ``--warmup`` untimed ones (the first
call of an FA4 variant JIT-compiles). Defaults take about 1-2 minutes of GPU time with FA4. Without CUDA it runs on
the CPU with gloo and the reference kernels (wall-clock timing), a smoke test for tiny ``--totals`` only.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import statistics
import sys
import time
from typing import Callable, Dict, List, Sequence, Tuple

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import usp  # noqa: E402
from usp.kernels import resolve_backend  # noqa: E402
from usp.kernels.varlen import VarlenSeqs, resolve_varlen_backend  # noqa: E402
from cuda_timing import init_distributed  # noqa: E402
from usp.varlen import long_context_attention_varlen, shard_varlen, varlen_layout  # noqa: E402

RING_FLASH_ATTN_VARLEN_RATIO = 0.759  # ring-flash-attention README: varlen zigzag, 8xH800, fwd+bwd, vs "theoretic"


def parse_tokens(text: str) -> int:
    text = text.strip().lower()
    scale = {"k": 1024, "m": 1024 ** 2}.get(text[-1:], 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def long_tailed_lengths(total: int, seed: int, alpha: float = 1.1, minimum: int = 64) -> List[int]:
    """Document lengths summing to ``total``: Pareto(alpha) from ``minimum``, capped at ``total // 4``."""
    rng = random.Random(seed)
    cap = max(minimum, total // 4)
    lengths: List[int] = []
    left = total
    while left > 0:
        n = min(cap, int(minimum * (1.0 - rng.random()) ** (-1.0 / alpha)), left)
        lengths.append(n)
        left -= n
    rng.shuffle(lengths)
    return lengths


def flops(lengths: Sequence[int], heads: int, head_dim: int, causal: bool) -> float:
    forward = sum(4.0 * heads * head_dim * n * n for n in lengths) * (0.5 if causal else 1.0)
    return 3.5 * forward


class Timer:
    def __init__(self, warmup: int, iters: int, device: torch.device):
        self.warmup, self.iters, self.device = warmup, iters, device

    def __call__(self, step: Callable[[], None]) -> Dict[str, float]:
        cuda = self.device.type == "cuda"
        for _ in range(self.warmup):
            step()
        if cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        times = []
        for _ in range(self.iters):
            dist.barrier()
            if cuda:
                torch.cuda.synchronize(self.device)
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
                step()
                end.record()
                torch.cuda.synchronize(self.device)
                elapsed_ms = begin.elapsed_time(end)
            else:
                start = time.perf_counter()
                step()
                elapsed_ms = (time.perf_counter() - start) * 1e3
            elapsed = torch.tensor(elapsed_ms, device=self.device)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the slowest rank
            times.append(float(elapsed))
        peak = torch.tensor(float(torch.cuda.max_memory_allocated(self.device)) if cuda else 0.0, device=self.device)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        return {"median_ms": statistics.median(times), "times_ms": times, "peak_gib": float(peak) / 2 ** 30}


def randn(shape, device, seed):
    gen = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(shape, generator=gen, device=device, dtype=torch.bfloat16)


def varlen_kernel_step(kernel, lengths, heads, kv_heads, head_dim, causal, device) -> Callable[[], None]:
    """One GPU, the varlen kernel alone over a packed batch of ``lengths``: forward then backward."""
    total = sum(lengths)
    seqs = VarlenSeqs(lengths, lengths)
    q, dout = randn((total, heads, head_dim), device, 1), randn((total, heads, head_dim), device, 2)
    k, v = randn((total, kv_heads, head_dim), device, 3), randn((total, kv_heads, head_dim), device, 4)
    scale = head_dim ** -0.5

    def step():
        out, lse = kernel.forward(q, k, v, seqs, causal, scale)
        kernel.backward(dout, q, k, v, out, lse, seqs, causal, scale)

    return step


def dense_kernel_step(kernel, seqlen, heads, kv_heads, head_dim, causal, device) -> Callable[[], None]:
    q, dout = randn((1, seqlen, heads, head_dim), device, 1), randn((1, seqlen, heads, head_dim), device, 2)
    k, v = randn((1, seqlen, kv_heads, head_dim), device, 3), randn((1, seqlen, kv_heads, head_dim), device, 4)
    scale = head_dim ** -0.5

    def step():
        out, lse = kernel.forward(q, k, v, causal, scale)
        kernel.backward(dout, q, k, v, out, lse, causal, scale)

    return step


def usp_varlen_step(lengths, mesh, heads, kv_heads, head_dim, causal, backend, device) -> Callable[[], None]:
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    cu_seqlens = torch.tensor(cu, dtype=torch.int32)  # on the CPU: no device sync per call
    total = cu[-1]
    local = {}
    for name, h, seed in (("q", heads, 1), ("k", kv_heads, 3), ("v", kv_heads, 4), ("dout", heads, 2)):
        full = randn((total, h, head_dim), device, seed)
        local[name] = shard_varlen(full, cu_seqlens, mesh, causal=causal).contiguous()
        del full
    q, k, v = (local[n].requires_grad_() for n in ("q", "k", "v"))
    max_seqlen = max(lengths)

    def step():
        for t in (q, k, v):
            t.grad = None
        out = long_context_attention_varlen(q, k, v, cu_seqlens, max_seqlen, mesh, causal=causal, backend=backend)
        out.backward(local["dout"])

    return step


def usp_dense_step(seqlen, mesh, heads, kv_heads, head_dim, causal, backend, device) -> Callable[[], None]:
    local = {}
    for name, h, seed in (("q", heads, 1), ("k", kv_heads, 3), ("v", kv_heads, 4), ("dout", heads, 2)):
        full = randn((1, seqlen, h, head_dim), device, seed)
        local[name] = usp.shard(full, mesh, dim=1, causal=causal).contiguous()
        del full
    q, k, v = (local[n].requires_grad_() for n in ("q", "k", "v"))

    def step():
        for t in (q, k, v):
            t.grad = None
        out = usp.long_context_attention(q, k, v, mesh, causal=causal, backend=backend)
        out.backward(local["dout"])

    return step


def _empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def scaled_lengths(lengths: Sequence[int], world: int) -> List[int]:
    """One rank's share of every document (``ceil(L / P)``): the "local shard" problem of the rfa ratio."""
    return [-(-n // world) for n in lengths]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--totals", default="128k,256k", help="total tokens per packed batch, comma separated")
    parser.add_argument("--heads", default="32/8", help="query heads / KV heads")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--non-causal", action="store_true")
    parser.add_argument("--backend", default="auto", help="varlen backend (fa4, torch_flash); dense uses the same")
    parser.add_argument("--meshes", default="1x2,2x1", help="UxR meshes, comma separated")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-dense", action="store_true", help="skip the dense comparison")
    parser.add_argument("--out", default="varlen_results.json")
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    rank, world, device = init_distributed()
    heads, kv_heads = (int(x) for x in args.heads.split("/"))
    causal = not args.non_causal
    meshes: List[Tuple[int, int]] = [tuple(int(x) for x in m.lower().split("x")) for m in args.meshes.split(",")]
    varlen_kernel = resolve_varlen_backend(args.backend, device, torch.bfloat16, args.head_dim)
    dense_kernel = resolve_backend(varlen_kernel.name, device, torch.bfloat16, args.head_dim)
    timer = Timer(args.warmup, args.iters, device)

    def log(message: str) -> None:
        if rank == 0:
            print(message, flush=True)

    records = []
    for total in (parse_tokens(t) for t in args.totals.split(",")):
        lengths = long_tailed_lengths(total, args.seed)
        problems = [("varlen", lengths)] + ([] if args.no_dense else [("dense", [total])])
        for kind, docs in problems:
            work = flops(docs, heads, args.head_dim, causal)
            record = {
                "kind": kind, "total_tokens": total, "documents": len(docs), "longest": max(docs),
                "median_doc": statistics.median(docs), "heads": heads, "kv_heads": kv_heads,
                "head_dim": args.head_dim, "causal": causal, "dtype": "bfloat16", "kernel": varlen_kernel.name,
                "flops": work, "meshes": {},
            }
            if kind == "varlen":
                record["doc_lengths"] = docs
                single = varlen_kernel_step(varlen_kernel, docs, heads, kv_heads, args.head_dim, causal, device)
                shard = varlen_kernel_step(varlen_kernel, scaled_lengths(docs, world), heads, kv_heads,
                                           args.head_dim, causal, device)
            else:
                single = dense_kernel_step(dense_kernel, total, heads, kv_heads, args.head_dim, causal, device)
                shard = dense_kernel_step(dense_kernel, -(-total // world), heads, kv_heads, args.head_dim,
                                          causal, device)
            t1 = timer(single)
            del single
            t_shard = timer(shard)
            del shard
            _empty_cache(device)
            record["t1_ms"], record["t1_peak_gib"] = t1["median_ms"], t1["peak_gib"]
            record["t_kernel_local_shard_ms"] = t_shard["median_ms"]
            log(f"{kind} {total} tokens, {len(docs)} docs (longest {max(docs)}): 1 GPU {t1['median_ms']:.2f} ms, "
                f"local-shard kernel {t_shard['median_ms']:.2f} ms")
            for u, r in meshes:
                mesh = usp.SequenceParallelMesh(ulysses=u, ring=r)
                if kind == "varlen":
                    step = usp_varlen_step(docs, mesh, heads, kv_heads, args.head_dim, causal, args.backend, device)
                    layout = varlen_layout([0] + list(torch.tensor(docs).cumsum(0).tolist()), mesh, causal)
                    padding = layout.padding
                else:
                    step = usp_dense_step(total, mesh, heads, kv_heads, args.head_dim, causal, args.backend, device)
                    padding = 0
                tp = timer(step)
                del step
                _empty_cache(device)
                p = u * r
                entry = {
                    "tp_ms": tp["median_ms"], "times_ms": tp["times_ms"], "peak_gib": tp["peak_gib"],
                    "efficiency": record["t1_ms"] / (p * tp["median_ms"]),
                    "rfa_ratio": p * record["t_kernel_local_shard_ms"] / tp["median_ms"],
                    "tflops_per_gpu": work / (p * tp["median_ms"] * 1e-3) / 1e12, "padding_tokens": padding,
                }
                record["meshes"][f"{u}x{r}"] = entry
                log(f"  {u}x{r}: {tp['median_ms']:.2f} ms, E {entry['efficiency']:.3f}, "
                    f"rfa ratio {entry['rfa_ratio']:.3f}, {entry['tflops_per_gpu']:.0f} TFLOP/s/GPU, "
                    f"peak {tp['peak_gib']:.1f} GiB, padding {padding}")
            records.append(record)
    if rank == 0:
        result = {
            "benchmark": "bench_varlen", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "command": "torchrun --nproc-per-node %d benchmarks/bench_varlen.py %s" % (world, " ".join(sys.argv[1:])),
            "device": torch.cuda.get_device_name(device) if cuda else "cpu", "world_size": world,
            "torch": torch.__version__, "nccl": ".".join(map(str, torch.cuda.nccl.version())) if cuda else None,
            "warmup": args.warmup, "iters": args.iters,
            "ring_flash_attn_published_varlen_ratio": RING_FLASH_ATTN_VARLEN_RATIO, "records": records,
        }
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.out}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
