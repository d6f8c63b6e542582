"""torch.compile vs eager with usp attention (issue 15): training-step time and host overhead per attention call.

    torchrun --nproc-per-node 2 benchmarks/bench_compile.py --json-out benchmarks/data/compile_h200x2.json

Two measurements, medians over ranks' rank 0, CUDA events for GPU time:

1. Step time of a 4-layer Llama-style model (``examples/train_compile_fsdp.py``'s, bf16, FSDP2 over the 2 ranks,
   usp ring over the same 2 ranks, activation checkpointing per block) at 32K and 128K tokens, eager vs
   ``torch.compile`` (inductor, fullgraph per block): forward + backward + optimizer step.
2. Host (CPU) time of one attention call, eager vs compiled: the Python/dispatch cost of a call before its work is
   on the GPU, measured with ``time.perf_counter`` around calls on small inputs (1K tokens) so that the launch
   queue never fills; compiled = the ``usp::attention_forward`` op under a compiled function (what dynamo leaves
   at run time: guards, the op's mesh rebuild from its group names, validation and the ranks' agreement).

Budget: under 3 minutes on 2 x H200 (compiles included).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)
sys.path.insert(0, os.path.join(_ROOT, "examples"))

import usp  # noqa: E402
import train_compile_fsdp as ex  # noqa: E402


def step_times(args, device_mesh, usp_mesh, seqlen: int, compile_backend, steps: int, warmup: int):
    """Median step time in ms (CUDA events) of the model at ``seqlen`` tokens."""
    torch.manual_seed(0)
    model = ex.Llama(args.vocab, args.hidden, args.layers, args.heads, args.kv_heads, usp_mesh)
    model.to(device="cuda", dtype=torch.bfloat16)
    ex.parallelize(model, device_mesh, compile_backend)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    config = argparse.Namespace(batch=1, seqlen=seqlen, vocab=args.vocab)
    times = []
    for step in range(warmup + steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        ex.train_step(model, optimizer, step, config, usp_mesh, 0, 1, torch.device("cuda"))
        end.record()
        torch.cuda.synchronize()
        if step >= warmup:
            times.append(start.elapsed_time(end))
    del model, optimizer
    torch.cuda.empty_cache()
    return statistics.median(times), times


def host_overhead(usp_mesh, calls: int):
    """Median host microseconds per attention call (no sync inside the timed region), eager and compiled."""
    b, s, h, kv, d = 1, 1024 // usp_mesh.sequence_parallel_size, 16, 4, 128
    q, k, v = (torch.randn(b, s, n, d, device="cuda", dtype=torch.bfloat16) for n in (h, kv, kv))

    def attention(q, k, v):
        return usp.long_context_attention(q, k, v, usp_mesh, causal=True)

    compiled = torch.compile(attention, fullgraph=True)
    result = {}
    for name, fn in (("eager", attention), ("compiled", compiled)):
        for _ in range(10):
            fn(q, k, v)
        torch.cuda.synchronize()
        samples = []
        for _ in range(calls):
            t0 = time.perf_counter()
            fn(q, k, v)
            samples.append((time.perf_counter() - t0) * 1e6)
            torch.cuda.synchronize()  # outside the timed region: the next call starts on an idle queue
        result[name] = statistics.median(samples)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seqlens", default="32768,131072")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl")
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size()
    device_mesh = init_device_mesh("cuda", (1, world), mesh_dim_names=("dp", "cp"))
    usp_mesh = usp.SequenceParallelMesh.from_device_mesh(device_mesh, ring_dim="cp")
    report = dict(torch=torch.__version__, gpu=torch.cuda.get_device_name(), world=world, mesh="ring",
                  model=dict(layers=args.layers, hidden=args.hidden, heads=args.heads, kv_heads=args.kv_heads,
                             vocab=args.vocab, dtype="bfloat16", fsdp2=True, checkpointing=True),
                  steps={}, host_us_per_call=None)
    began = time.perf_counter()
    report["host_us_per_call"] = host_overhead(usp_mesh, args.calls)
    for seqlen in (int(s) for s in args.seqlens.split(",")):
        row = {}
        for name, backend in (("eager", None), ("compiled", "inductor")):
            t0 = time.perf_counter()
            median, samples = step_times(args, device_mesh, usp_mesh, seqlen, backend, args.steps, args.warmup)
            row[name] = dict(median_ms=median, samples_ms=samples, wall_s=time.perf_counter() - t0)
        row["speedup"] = row["eager"]["median_ms"] / row["compiled"]["median_ms"]
        report["steps"][seqlen] = row
        if dist.get_rank() == 0:
            print(f"{seqlen} tokens: eager {row['eager']['median_ms']:.1f} ms, compiled "
                  f"{row['compiled']['median_ms']:.1f} ms ({row['speedup']:.2f}x)", flush=True)
    report["wall_s"] = time.perf_counter() - began
    if dist.get_rank() == 0:
        print(f"host time per attention call: {report['host_us_per_call']}", flush=True)
        if args.json_out:
            with open(args.json_out, "w") as f:
                json.dump(report, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
