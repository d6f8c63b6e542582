"""Packed variable-length documents through usp's varlen path on 2 GPUs (issue 6), next to the dense case.

    torchrun --nproc-per-node 2 benchmarks/bench_varlen.py --out benchmarks/varlen_results.json
    torchrun --nproc-per-node 2 benchmarks/bench_varlen.py --backend fa2 --peers rfa_zigzag,rfa_llama3 \
        --points long_tail:128k,many_tiny:1m --topology benchmarks/data/probe_h200x2_20261130.yaml --no-dense

Mixes (``MIXES``, seeded, summing exactly to the total): ``long_tail`` (Pareto lengths from 64, capped at a
quarter of the total), ``uniform_short`` (4-8K), ``one_giant`` (one document of three quarters of the total among
512-4096-token ones), ``many_tiny`` (64-1024). ``--peers`` adds ring-flash-attention's zigzag and llama3 varlen
functions on the same inputs (flash-attn 2 kernels; compare with ``--backend fa2``), ``--topology`` the planner's
pick and predictions.

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
from cuda_timing import finish, init_distributed, versions  # noqa: E402
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


def _uniform_lengths(total: int, seed: int, low: int, high: int, rng=None) -> List[int]:
    """Seeded lengths uniform in ``[low, high]`` summing exactly to ``total`` (the last one cut short)."""
    rng = rng or random.Random(seed)
    lengths: List[int] = []
    left = total
    while left > 0:
        lengths.append(min(rng.randint(low, high), left))
        left -= lengths[-1]
    return lengths


def one_giant_lengths(total: int, seed: int) -> List[int]:
    """One document of three quarters of the batch among short ones (512-4096 tokens), shuffled."""
    rng = random.Random(seed)
    giant = 3 * total // 4
    lengths = [giant] + _uniform_lengths(total - giant, seed, 512, 4096, rng)
    rng.shuffle(lengths)
    return lengths


#: the document mixes of the packed benchmarks (issue 14): name -> lengths(total, seed), summing to total
MIXES: Dict[str, Callable[[int, int], List[int]]] = {
    "long_tail": lambda total, seed: long_tailed_lengths(total, seed),
    "uniform_short": lambda total, seed: _uniform_lengths(total, seed, 4096, 8192),
    "one_giant": one_giant_lengths,
    "many_tiny": lambda total, seed: _uniform_lengths(total, seed, 64, 1024),
}


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


def usp_varlen_step(lengths, mesh, heads, kv_heads, head_dim, causal, backend, device,
                    host_times: list = None) -> Callable[[], None]:
    """usp's fwd+bwd on this rank's shards of the packed batch ``lengths``. ``host_times``: a list to which each call
    appends the host seconds of its forward call and of its backward call (``time.perf_counter``, no sync)."""
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
        start = time.perf_counter()
        out = long_context_attention_varlen(q, k, v, cu_seqlens, max_seqlen, mesh, causal=causal, backend=backend)
        forward = time.perf_counter()
        out.backward(local["dout"])
        if host_times is not None:
            host_times.append((forward - start, time.perf_counter() - forward))

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


def import_ring_flash_attn():
    """ring-flash-attention (its HF adapter fails to import on transformers 5.x: stubbed out; we use none of it)."""
    import types

    if "ring_flash_attn.adapters" not in sys.modules:
        stub = types.ModuleType("ring_flash_attn.adapters")
        stub.substitute_hf_flash_attn = stub.update_ring_flash_attn_params = None
        sys.modules["ring_flash_attn.adapters"] = stub
    import ring_flash_attn

    return ring_flash_attn


def rfa_zigzag_step(lengths, heads, kv_heads, head_dim, device) -> Tuple[Callable[[], None], int]:
    """ring-flash-attn's ``zigzag_ring_flash_attn_varlen_func`` over the whole process group, causal. It needs every
    document a multiple of ``2 * world`` tokens: each is padded to one (returns the padded total, for the record).
    Rank ``r``'s shard is chunks ``r`` and ``2w-1-r`` of every document, as its tests build it."""
    rfa = import_ring_flash_attn()
    world, rank = dist.get_world_size(), dist.get_rank()
    unit = 2 * world
    padded = [-(-n // unit) * unit for n in lengths]
    cu = [0]
    for n in padded:
        cu.append(cu[-1] + n)
    rows = torch.cat([torch.cat([torch.arange(a + r * (n // unit), a + (r + 1) * (n // unit))
                                 for r in (rank, unit - 1 - rank)]) for a, n in zip(cu[:-1], padded)]).to(device)
    local = {}
    for name, h, seed in (("q", heads, 1), ("k", kv_heads, 3), ("v", kv_heads, 4), ("dout", heads, 2)):
        local[name] = randn((cu[-1], h, head_dim), device, seed).index_select(0, rows).contiguous()
    q, k, v = (local[n].requires_grad_() for n in ("q", "k", "v"))
    local_cu = torch.tensor(cu, dtype=torch.int32, device=device) // world
    max_local = max(padded) // world

    def step():
        for t in (q, k, v):
            t.grad = None
        out = rfa.zigzag_ring_flash_attn_varlen_func(q, k, v, local_cu, max_local, causal=True)
        out.backward(local["dout"])

    return step, cu[-1]


def rfa_llama3_step(lengths, heads, kv_heads, head_dim, device, heads_k_stride: int) -> Callable[[], None]:
    """ring-flash-attn's ``llama3_flash_attn_varlen_func`` (contiguous shards, K/V all-gathered ``heads_k_stride``
    heads at a time), causal; the total must divide by the world size."""
    rfa = import_ring_flash_attn()
    world, rank = dist.get_world_size(), dist.get_rank()
    total = sum(lengths)
    assert total % world == 0, total
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()), dtype=torch.int32, device=device)
    cu_q, cu_k, max_q, max_k, k_slice = rfa.llama3_flash_attn_prepare_cu_seqlens(cu, True, rank, world)
    rows = slice(rank * total // world, (rank + 1) * total // world)
    local = {}
    for name, h, seed in (("q", heads, 1), ("k", kv_heads, 3), ("v", kv_heads, 4), ("dout", heads, 2)):
        local[name] = randn((total, h, head_dim), device, seed)[rows].contiguous()
    q, k, v = (local[n].requires_grad_() for n in ("q", "k", "v"))

    def step():
        for t in (q, k, v):
            t.grad = None
        out = rfa.llama3_flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, heads_k_stride, k_slice,
                                                causal=True)
        out.backward(local["dout"])

    return step


def planner_pick(lengths, world, heads, kv_heads, head_dim, causal, kernel, topology) -> Dict[str, object]:
    """``usp.plan`` on the packed batch: the split it picks and every candidate's predicted fwd+bwd ms."""
    from usp.planner import PlannerError, plan

    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    try:
        result = plan(world, cu[-1], heads, kv_heads, head_dim, causal=causal, topology=topology, kernel=kernel,
                      cu_seqlens=cu)
    except PlannerError as error:  # e.g. no rates for this kernel in the topology: say so in the record
        return {"pick": None, "error": str(error)}
    feasible = [c for c in result.candidates if c.feasible]
    return {"pick": f"{feasible[0].ulysses}x{feasible[0].ring}",
            "predicted_ms": {f"{c.ulysses}x{c.ring}": c.total * 1e3 for c in feasible}}


def _empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def scaled_lengths(lengths: Sequence[int], world: int) -> List[int]:
    """One rank's share of every document (``ceil(L / P)``): the "local shard" problem of the rfa ratio."""
    return [-(-n // world) for n in lengths]


def parse_points(args) -> List[Tuple[str, int]]:
    """``(mix, total)`` pairs: ``--points mix:total,...`` or every ``--mixes`` x ``--totals``."""
    if args.points:
        points = []
        for item in args.points.split(","):
            mix, total = item.split(":")
            if mix not in MIXES:
                raise SystemExit(f"--points: unknown mix {mix!r}; valid: {sorted(MIXES)}")
            points.append((mix, parse_tokens(total)))
        return points
    return [(mix, parse_tokens(t)) for mix in args.mixes.split(",") for t in args.totals.split(",")]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--totals", default="128k,256k", help="total tokens per packed batch, comma separated")
    parser.add_argument("--mixes", default="long_tail", help=f"document mixes, comma separated: {sorted(MIXES)}")
    parser.add_argument("--points", default="", help="mix:total pairs (e.g. long_tail:128k,many_tiny:1m); "
                                                     "overrides --mixes x --totals")
    parser.add_argument("--heads", default="32/8", help="query heads / KV heads")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--non-causal", action="store_true")
    parser.add_argument("--backend", default="auto", help="varlen backend (fa2, fa4, torch_flash); dense uses the same")
    parser.add_argument("--meshes", default="1x2,2x1", help="UxR meshes, comma separated")
    parser.add_argument("--peers", default="", help="ring-flash-attn side by side (causal, flash-attn 2 kernels): "
                                                    "rfa_zigzag, rfa_llama3")
    parser.add_argument("--llama3-strides", default="1,8", help="heads_k_stride values tried for rfa_llama3 (the "
                                                                "fastest is reported)")
    parser.add_argument("--topology", default=None, help="planner topology (preset or probe file): record usp.plan's "
                                                         "pick and predictions for every point")
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
    peers = [p for p in args.peers.split(",") if p]
    varlen_kernel = resolve_varlen_backend(args.backend, device, torch.bfloat16, args.head_dim)
    dense_kernel = resolve_backend(varlen_kernel.name, device, torch.bfloat16, args.head_dim)
    timer = Timer(args.warmup, args.iters, device)

    def log(message: str) -> None:
        if rank == 0:
            print(message, flush=True)

    records = []
    for mix, total in parse_points(args):
        lengths = MIXES[mix](total, args.seed)
        problems = [("varlen", lengths)] + ([] if args.no_dense else [("dense", [total])])
        for kind, docs in problems:
            work = flops(docs, heads, args.head_dim, causal)
            record = {
                "kind": kind, "mix": mix if kind == "varlen" else None, "total_tokens": total, "documents": len(docs),
                "longest": max(docs), "median_doc": statistics.median(docs), "heads": heads, "kv_heads": kv_heads,
                "head_dim": args.head_dim, "causal": causal, "dtype": "bfloat16", "kernel": varlen_kernel.name,
                "flops": work, "meshes": {}, "peers": {},
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
            log(f"{kind} {mix} {total} tokens, {len(docs)} docs (longest {max(docs)}): 1 GPU {t1['median_ms']:.2f} "
                f"ms, local-shard kernel {t_shard['median_ms']:.2f} ms")
            for u, r in meshes:
                mesh = usp.SequenceParallelMesh(ulysses=u, ring=r)
                placement = None
                if kind == "varlen":
                    step = usp_varlen_step(docs, mesh, heads, kv_heads, args.head_dim, causal, args.backend, device)
                    layout = varlen_layout([0] + list(torch.tensor(docs).cumsum(0).tolist()), mesh, causal)
                    padding = layout.padding
                    placement = {"cut": len(layout.cut_docs), "whole": [len(d) for d in layout.whole_docs],
                                 "cut_rows": layout.cut_rows, "ring_tokens": layout.ring_tokens}
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
                    "placement": placement,
                }
                record["meshes"][f"{u}x{r}"] = entry
                log(f"  usp {u}x{r}: {tp['median_ms']:.2f} ms, E {entry['efficiency']:.3f}, "
                    f"{entry['tflops_per_gpu']:.0f} TFLOP/s/GPU, peak {tp['peak_gib']:.1f} GiB, padding {padding}, "
                    f"placement {placement}")
            if kind == "varlen" and causal:
                for peer in peers:
                    if peer == "rfa_zigzag":
                        step, padded_total = rfa_zigzag_step(docs, heads, kv_heads, args.head_dim, device)
                        tries = {"": step}
                    elif peer == "rfa_llama3":
                        padded_total = total
                        tries = {f"heads_k_stride={stride}": rfa_llama3_step(docs, heads, kv_heads, args.head_dim,
                                                                              device, int(stride))
                                 for stride in args.llama3_strides.split(",") if kv_heads % int(stride) == 0}
                    else:
                        raise SystemExit(f"--peers: unknown peer {peer!r}; valid: rfa_zigzag, rfa_llama3")
                    best = None
                    for label, step in tries.items():
                        tp = timer(step)
                        _empty_cache(device)
                        if best is None or tp["median_ms"] < best[1]["median_ms"]:
                            best = (label, tp)
                    del tries, step
                    _empty_cache(device)
                    label, tp = best
                    entry = {"tp_ms": tp["median_ms"], "times_ms": tp["times_ms"], "peak_gib": tp["peak_gib"],
                             "efficiency": record["t1_ms"] / (world * tp["median_ms"]), "variant": label,
                             "padded_total": padded_total}
                    record["peers"][peer] = entry
                    log(f"  {peer} {label}: {tp['median_ms']:.2f} ms, E {entry['efficiency']:.3f}, "
                        f"peak {tp['peak_gib']:.1f} GiB (tokens incl. its padding: {padded_total})")
            if kind == "varlen" and args.topology:
                record["planner"] = planner_pick(docs, world, heads, kv_heads, args.head_dim, causal,
                                                 varlen_kernel.name, args.topology)
                log(f"  planner: {record['planner']}")
            records.append(record)
    finish({"benchmark": "bench_varlen", "world_size": world,
            "nccl": ".".join(map(str, torch.cuda.nccl.version())) if cuda else None,
            "packages": versions(("flash-attn", "flash-attn-4", "ring-flash-attn", "usp")), "warmup": args.warmup,
            "iters": args.iters, "ring_flash_attn_published_varlen_ratio": RING_FLASH_ATTN_VARLEN_RATIO,
            "records": records}, args.out, "benchmarks/bench_varlen.py")

if __name__ == "__main__":
    main()
