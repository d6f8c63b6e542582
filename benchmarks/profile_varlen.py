"""Where the time of usp's packed-document ring goes (issue 14, part 1): one profile per mesh on 2 GPUs.

    torchrun --nproc-per-node 2 benchmarks/profile_varlen.py --backend fa4 --out profile_varlen.json

For one packed batch (``--mix``, ``--total``; the mixes are ``bench_varlen.MIXES``) it records, per mesh:

* ``tp_ms``: fwd+bwd on the mesh (CUDA events, median, slowest rank) and ``t1_ms``: the varlen kernel alone over
  the whole batch on one GPU; ``kernel_share_ms`` = t1 / P, the time a rank would take with perfect splitting;
* from ``torch.profiler`` over ``--iters`` iterations, per rank and per iteration: GPU time by category
  (``attention`` kernels, ``nccl``, ``merge`` (usp's LSE merges), ``copy`` (copies, fills, casts), ``other``),
  the number of kernel launches, the number of attention kernel launches, and the 12 kernels that took longest
  (so the categories can be checked by name);
* the layout's facts: padding rows, documents cut over the ring and placed whole, kernel calls per ring block.

``gap_ms`` = tp - (GPU time outside NCCL): time the compute stream sat idle (waiting for a transfer or the host).
Where the host's time goes (medians over the timed iterations, the slowest rank): ``host_forward_ms`` and
``host_backward_ms``, the host's time in the forward call and in ``backward()`` (no sync inside; the GPU idles
until the forward's first launch, and again whenever the host falls behind it), and ``tp_unchecked_ms``, the same
step on a mesh with ``check_calls="off"`` (Note [call agreement]: what the per-call agreement adds).
Without CUDA it runs on the CPU with gloo (a smoke test: no CUDA kernel times).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections import defaultdict

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import usp  # noqa: E402
from usp.kernels.varlen import resolve_varlen_backend  # noqa: E402
from usp.varlen import _schedule_for_layout, varlen_layout  # noqa: E402
from bench_varlen import MIXES, Timer, parse_tokens, usp_varlen_step, varlen_kernel_step  # noqa: E402
from cuda_timing import finish, init_distributed  # noqa: E402

CATEGORIES = (
    ("nccl", ("nccl",)),
    ("merge", ("merge",)),
    ("attention", ("flash", "fmha", "attn", "attention", "cutlass", "sm90", "kernel_cute")),
    ("copy", ("copy", "memcpy", "memset", "fill", "cast", "index", "scatter", "gather", "cat")),
)


def category(name: str) -> str:
    low = name.lower()
    for label, keys in CATEGORIES:
        if any(key in low for key in keys):
            return label
    return "other"


def profile_step(step, iters: int, device: torch.device) -> dict:
    """GPU time by category, launches and the longest kernels of ``iters`` calls of ``step``, per iteration."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(iters):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    by_category = defaultdict(float)
    launches = defaultdict(int)
    kernels = []
    for event in prof.key_averages():
        device_us = getattr(event, "device_time_total", None)
        if device_us is None:
            device_us = getattr(event, "cuda_time_total", 0.0)
        if not device_us or event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        label = category(event.key)
        by_category[label] += device_us / 1e3 / iters
        launches[label] += event.count / iters
        kernels.append((device_us / 1e3 / iters, event.count / iters, event.key[:160]))
    kernels.sort(reverse=True)
    return {
        "gpu_ms": dict(by_category), "launches": dict(launches), "launches_total": sum(launches.values()),
        "top_kernels": [{"ms": ms, "count": count, "name": name} for ms, count, name in kernels[:12]],
    }


def layout_facts(layout) -> dict:
    schedule = _schedule_for_layout(layout)
    calls = {}
    for rank in range(layout.ring):
        per_step = []
        for step in range(schedule.steps(layout.ring)):
            task = schedule.block(step, rank, layout.ring, layout.ring_tokens)
            per_step.append(0 if task is None else len(task.mask.calls))
        calls[rank] = per_step
    return {"padding_tokens": layout.padding, "ring_tokens": layout.ring_tokens, "calls_per_step": calls,
            "cut_docs": len(layout.cut_docs), "whole_docs": [len(docs) for docs in layout.whole_docs],
            "cut_rows": layout.cut_rows}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mix", default="long_tail", choices=sorted(MIXES))
    parser.add_argument("--total", default="128k")
    parser.add_argument("--heads", default="32/8")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--meshes", default="1x2,2x1")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="profile_varlen.json")
    args = parser.parse_args(argv)

    rank, world, device = init_distributed()
    heads, kv_heads = (int(x) for x in args.heads.split("/"))
    total = parse_tokens(args.total)
    lengths = MIXES[args.mix](total, args.seed)
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    kernel = resolve_varlen_backend(args.backend, device, torch.bfloat16, args.head_dim)
    timer = Timer(args.warmup, args.iters, device)
    t1 = timer(varlen_kernel_step(kernel, lengths, heads, kv_heads, args.head_dim, True, device))
    single = profile_step(varlen_kernel_step(kernel, lengths, heads, kv_heads, args.head_dim, True, device),
                          args.iters, device)
    record = {"mix": args.mix, "total_tokens": total, "documents": len(lengths), "longest": max(lengths),
              "kernel": kernel.name, "t1_ms": t1["median_ms"], "t1_profile": single, "meshes": {}}
    for spec in args.meshes.split(","):
        u, r = (int(x) for x in spec.lower().split("x"))
        mesh = usp.SequenceParallelMesh(ulysses=u, ring=r)
        host_times: list = []
        step = usp_varlen_step(lengths, mesh, heads, kv_heads, args.head_dim, True, args.backend, device,
                               host_times)
        timed = timer(step)
        host = torch.tensor([statistics.median(t[i] for t in host_times[-args.iters:]) * 1e3 for i in (0, 1)],
                            device=device)
        dist.all_reduce(host, op=dist.ReduceOp.MAX)
        unchecked = timer(usp_varlen_step(lengths, usp.SequenceParallelMesh(ulysses=u, ring=r, check_calls="off"),
                                          heads, kv_heads, args.head_dim, True, args.backend, device))
        profiled = profile_step(step, args.iters, device)
        gathered = [None] * world
        dist.all_gather_object(gathered, profiled)
        outside_nccl = max(sum(ms for label, ms in p["gpu_ms"].items() if label != "nccl") for p in gathered)
        record["meshes"][spec] = {
            "tp_ms": timed["median_ms"], "peak_gib": timed["peak_gib"], "kernel_share_ms": t1["median_ms"] / world,
            "efficiency": t1["median_ms"] / (world * timed["median_ms"]),
            "gap_ms": timed["median_ms"] - outside_nccl, "host_forward_ms": float(host[0]),
            "host_backward_ms": float(host[1]), "tp_unchecked_ms": unchecked["median_ms"], "per_rank": gathered,
            "layout": layout_facts(varlen_layout(cu, mesh, True)),
        }
        del step
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if rank == 0:
            m = record["meshes"][spec]
            print(f"{spec}: {m['tp_ms']:.2f} ms (1 GPU {t1['median_ms']:.2f}, E {m['efficiency']:.3f}, "
                  f"gap {m['gap_ms']:.2f} ms, host {m['host_forward_ms']:.2f}+{m['host_backward_ms']:.2f} ms, "
                  f"unchecked {m['tp_unchecked_ms']:.2f} ms); rank 0 GPU ms {gathered[0]['gpu_ms']}, "
                  f"launches {gathered[0]['launches_total']:.0f}; layout {m['layout']}", flush=True)
    finish(record, args.out, "benchmarks/profile_varlen.py")

if __name__ == "__main__":
    main()
