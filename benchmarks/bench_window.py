"""Sliding-window attention through usp's sparse ring on 2 GPUs (issue 11), next to the dense causal ring.

    torchrun --nproc-per-node 2 benchmarks/bench_window.py --json-out benchmarks/data/window_2xh200.json
    torchrun --nproc-per-node 2 benchmarks/bench_window.py --quick         # 128K only: a smoke test (~30 s)

Problem (defaults, the issue's): sliding window 4096 (``window_size=(4095, 0)``: each query sees itself and the
4095 tokens before it, Mistral's ``sliding_window=4096``), GQA 32/8 heads, head_dim 128, causal, bfloat16,
forward + backward, S = 128K, 512K and 1M on a 1 x 2 ring (zigzag shards, ``usp.shard``). Measured per length:

* ``window_ms``: usp, windowed layer, 2 GPUs (Note [sparse ring] in ``usp/ring.py``: each rank exchanges only the
  halo rows its window needs with its neighbour);
* ``dense_ms``: usp, the dense causal ring, 2 GPUs, only at ``--dense-lengths`` (default 128K and 512K): dense
  causal attention at 1M takes tens of seconds per step (~4x 512K's), so it is skipped there (recorded as skipped,
  with the reason), and 512K is skipped too when the run is already past ``--budget-s`` (the whole script must
  finish in under 4 minutes on 2x H200);
* ``dense_over_window``: dense / windowed time (the issue's target: >= 8 at 128K);
* ``t1_ms``: the same kernel with the same window on ONE GPU over the whole sequence (the kernel's forward and
  backward alone, ``Mask(4095, 0)``; every rank runs it on its own GPU at once, the slowest counts; 1M fits a
  141 GB H200) and ``efficiency`` E = t1 / (2 x window_ms) (targets: >= 0.85 at 128K, >= 0.9 at 512K);
* ``sinks_ms``: the windowed layer with attention sinks (``sinks=Tensor[heads]``, with their gradient) and
  ``sinks_overhead`` = sinks_ms / window_ms - 1 (target < 2%);
* ``planner``: the planner's prediction of the windowed and dense layers for the same split
  (``usp.planner.predict(..., window=W)``, topology ``--topology``), for comparison.

Timing: CUDA events around one forward + backward (``benchmarks/cuda_timing.py``), all ranks started together
(barrier + synchronize before each), per iteration the slowest rank's time, the median of ``--repeats`` (3)
iterations after ``--warmup`` (1) untimed ones (the first call of an FA4 variant JIT-compiles). The JSON
(``--json-out``) holds the device, the versions (torch, CUDA, NCCL, flash-attn packages), the command and every
time. Without CUDA it runs on the CPU with gloo and the reference kernel (wall clock), for tiny ``--lengths`` only.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

BACKENDS = ("auto", "fa4", "fa2", "reference")
DEFAULT_LENGTHS = "128k,512k,1m"
DENSE_LENGTHS = "128k,512k"


def parse_tokens(text: str) -> int:
    text = text.strip().lower()
    scale = {"k": 1024, "m": 1024 ** 2}.get(text[-1:], 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Run under torchrun --nproc-per-node 2 (see the module docstring).")
    p.add_argument("--lengths", default=DEFAULT_LENGTHS, help=f"global sequence lengths (default {DEFAULT_LENGTHS})")
    p.add_argument("--dense-lengths", default=DENSE_LENGTHS,
                   help=f"lengths that also run the dense causal ring (default {DENSE_LENGTHS}; 1M dense takes tens "
                   "of seconds per step)")
    p.add_argument("--window", type=int, default=4096,
                   help="window in tokens, query included (default 4096: window_size=(4095, 0))")
    p.add_argument("--heads", default="32/8", help="query heads / KV heads (default 32/8)")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="kernel for usp and the 1-GPU baseline (default auto: the fastest with window support)")
    p.add_argument("--warmup", type=int, default=1, help="untimed iterations per measurement (default 1)")
    p.add_argument("--repeats", type=int, default=3, help="timed iterations per measurement, 3-5 (default 3)")
    p.add_argument("--budget-s", type=float, default=150.0,
                   help="skip the remaining dense runs once this many seconds have passed (default 150)")
    p.add_argument("--no-sinks", action="store_true", help="skip the sinks on/off comparison")
    p.add_argument("--no-single", action="store_true", help="skip the 1-GPU baseline (no E)")
    p.add_argument("--topology", default="h100-nvlink-2x", help="planner topology for the predictions")
    p.add_argument("--quick", action="store_true", help="128K only (window, dense, 1 GPU, sinks): a smoke test")
    p.add_argument("--json-out", default=None, help="write the results here (rank 0)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.window < 1:
        raise SystemExit(f"--window={args.window} must be >= 1 (tokens seen by each query, itself included)")
    if not 1 <= args.repeats <= 20:
        raise SystemExit(f"--repeats={args.repeats} must be in 1..20 (3-5 keeps the run under 4 minutes)")

    import torch
    import torch.distributed as dist

    import usp
    from cuda_timing import events_ms, init_distributed, versions
    from usp.kernels import resolve_backend
    from usp.kernels.base import Mask, MaskNeeds

    began = time.perf_counter()
    cuda = torch.cuda.is_available()
    rank, world, device = init_distributed()
    dtype = torch.bfloat16 if cuda else torch.float32
    heads, kv_heads = (int(x) for x in args.heads.split("/"))
    d = args.head_dim
    left = args.window - 1
    window_size = (left, 0)
    lengths = [parse_tokens("128k")] if args.quick else [parse_tokens(t) for t in args.lengths.split(",")]
    dense_lengths = {parse_tokens(t) for t in args.dense_lengths.split(",") if t.strip()}
    mesh = usp.SequenceParallelMesh(ulysses=1, ring=world)
    backend = args.backend
    kernel = resolve_backend(backend, device, dtype, d, needs=MaskNeeds(window=True))

    def log(message: str) -> None:
        if rank == 0:
            print(message, flush=True)

    def timed(step: Callable[[], None]) -> Dict[str, float]:
        """Median of the slowest rank's CUDA-event time over ``repeats`` iterations after ``warmup``."""
        for _ in range(args.warmup):
            step()
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for _ in range(args.repeats):
            dist.barrier()
            if cuda:
                torch.cuda.synchronize(device)
                ms = events_ms(step)
            else:
                start = time.perf_counter()
                step()
                ms = (time.perf_counter() - start) * 1e3
            value = torch.tensor(ms, device=device)
            dist.all_reduce(value, op=dist.ReduceOp.MAX)
            times.append(float(value))
        peak = torch.tensor(float(torch.cuda.max_memory_allocated(device)) if cuda else 0.0, device=device)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        if cuda:
            torch.cuda.empty_cache()
        return {"median_ms": statistics.median(times), "times_ms": times, "peak_gib": float(peak) / 2 ** 30}

    def randn(shape, seed):
        gen = torch.Generator(device=device).manual_seed(seed)
        return torch.randn(shape, generator=gen, device=device, dtype=dtype)

    def usp_step(seqlen: int, window, sinks: bool) -> Callable[[], None]:
        """usp on this rank's zigzag shards: forward + backward of one layer."""
        local = {}
        for name, h, seed in (("q", heads, 1), ("k", kv_heads, 3), ("v", kv_heads, 4), ("dout", heads, 2)):
            full = randn((1, seqlen, h, d), seed)
            local[name] = usp.shard(full, mesh, dim=1, causal=True).contiguous()
            del full
        q, k, v = (local[n].requires_grad_() for n in ("q", "k", "v"))
        sink = torch.zeros(heads, device=device, dtype=torch.float32).requires_grad_() if sinks else None

        def step():
            for t in (q, k, v, sink):
                if t is not None:
                    t.grad = None
            out = usp.long_context_attention(q, k, v, mesh, causal=True, backend=backend, window_size=window,
                                             sinks=sink)
            out.backward(local["dout"])

        return step

    def single_step(seqlen: int) -> Callable[[], None]:
        """The same kernel, same window, one GPU, whole sequence: forward then backward."""
        q, dout = randn((1, seqlen, heads, d), 1), randn((1, seqlen, heads, d), 2)
        k, v = randn((1, seqlen, kv_heads, d), 3), randn((1, seqlen, kv_heads, d), 4)
        mask, scale = Mask(left, 0), d ** -0.5

        def step():
            out, lse = kernel.forward(q, k, v, mask, scale)
            kernel.backward(dout, q, k, v, out, lse, mask, scale)

        return step

    def predicted(seqlen: int) -> Optional[dict]:
        from usp.planner import predict

        try:
            windowed = predict(1, world, seqlen, heads, kv_heads, d, topology=args.topology, window=left)
            dense = predict(1, world, seqlen, heads, kv_heads, d, topology=args.topology)
        except ValueError as exc:  # a shape the planner refuses (e.g. a head_dim no GPU kernel runs)
            return {"error": str(exc)}
        return {"topology": args.topology, "window_ms": 1e3 * windowed.total, "dense_ms": 1e3 * dense.total,
                "window_ring_transfers": [windowed.forward.ring_transfers, windowed.backward.ring_transfers]}

    log(f"bench_window: {world} ranks, {torch.cuda.get_device_name(device) if cuda else 'cpu'}, kernel "
        f"{kernel.name}, window {args.window} (window_size={window_size}), heads {heads}/{kv_heads}, d {d}, "
        f"lengths {lengths}")
    records: List[dict] = []
    for seqlen in lengths:
        record: dict = {"seqlen": seqlen, "window_size": list(window_size), "heads": heads, "kv_heads": kv_heads,
                        "head_dim": d, "causal": True, "dtype": str(dtype).replace("torch.", ""),
                        "mesh": f"1x{world}", "kernel": kernel.name, "planner": predicted(seqlen)}
        result = timed(usp_step(seqlen, window_size, sinks=False))
        record["window_ms"], record["window_times_ms"] = result["median_ms"], result["times_ms"]
        record["window_peak_gib"] = result["peak_gib"]
        line = f"S={seqlen}: window {result['median_ms']:.2f} ms"
        if not args.no_sinks:
            result = timed(usp_step(seqlen, window_size, sinks=True))
            record["sinks_ms"], record["sinks_times_ms"] = result["median_ms"], result["times_ms"]
            record["sinks_overhead"] = record["sinks_ms"] / record["window_ms"] - 1
            line += f", sinks {result['median_ms']:.2f} ms ({100 * record['sinks_overhead']:+.1f}%)"
        if not args.no_single:
            result = timed(single_step(seqlen))
            record["t1_ms"], record["t1_times_ms"], record["t1_peak_gib"] = (result["median_ms"], result["times_ms"],
                                                                             result["peak_gib"])
            record["efficiency"] = record["t1_ms"] / (world * record["window_ms"])
            line += f", 1 GPU {result['median_ms']:.2f} ms, E {record['efficiency']:.3f}"
        elapsed = time.perf_counter() - began
        if seqlen not in dense_lengths:
            record["dense_skipped"] = ("dense causal at this length takes tens of seconds per step: not run "
                                       "(--dense-lengths)")
        elif elapsed > args.budget_s:
            record["dense_skipped"] = f"time budget: {elapsed:.0f} s > --budget-s {args.budget_s:.0f} s"
        else:
            result = timed(usp_step(seqlen, (-1, -1), sinks=False))
            record["dense_ms"], record["dense_times_ms"] = result["median_ms"], result["times_ms"]
            record["dense_over_window"] = record["dense_ms"] / record["window_ms"]
            line += f", dense causal {result['median_ms']:.1f} ms ({record['dense_over_window']:.1f}x)"
        if "dense_skipped" in record:
            line += f", dense skipped ({record['dense_skipped'].split(':')[0]})"
        log(line)
        records.append(record)
    total_s = time.perf_counter() - began
    if rank == 0:
        result = {
            "benchmark": "bench_window", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "command": f"torchrun --nproc-per-node {world} benchmarks/bench_window.py "
                       + " ".join(sys.argv[1:] if argv is None else argv),
            "device": torch.cuda.get_device_name(device) if cuda else "cpu", "world_size": world,
            "versions": versions(("flash-attn", "flash-attn-cute", "flash_attn_cute", "nvidia-cutlass-dsl", "usp")), "backend": backend, "kernel": kernel.name, "warmup": args.warmup,
            "repeats": args.repeats, "wall_s": total_s, "records": records,
        }
        if args.json_out:
            os.makedirs(os.path.dirname(os.path.abspath(args.json_out)), exist_ok=True)
            with open(args.json_out, "w") as f:
                json.dump(result, f, indent=1)
            print(f"wrote {args.json_out} ({total_s:.0f} s)")
        else:
            print(json.dumps({k: v for k, v in result.items() if k != "records"}))
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
