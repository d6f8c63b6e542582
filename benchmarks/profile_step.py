"""Where the time of one usp forward+backward goes, and what the out/LSE merge costs (torchrun, 2 GPUs).

    torchrun --nproc-per-node 2 benchmarks/profile_step.py --seqlens 32k,64k --splits 1x2,2x1 --json out.json

Two measurements, both with CUDA events / the CUDA-side profiler, in one run:

1. **Merge cost** (rank 0, before the distributed part): ``usp.merge.merge_attention_`` on the half block a ring
   step of 2 merges at each shape (``[b, s/4, h, d]`` rows into a bf16 and into a float32 accumulator), fused
   kernel of ``csrc/`` vs the PyTorch ops (``merge_attention_reference_``); median of 20 after 5 warm-ups, with the
   bytes moved and the attention kernel's forward time on the same rows for scale.
2. **Step profile**: ``torch.profiler`` over ``--repeats`` fwd+bwd iterations after warm-up; GPU kernel time summed
   per category (attention kernels, NCCL, element-wise/copies) on rank 0, against the wall time of the same
   iterations. ``exposed = wall - attention`` is everything the attention kernels do not cover: communication not
   hidden, merges, copies, launch gaps.
"""
import argparse
import json
import os
import time

import torch
import torch.distributed as dist

import usp
from bench_common import parse_seqlen as parse_len
from cuda_timing import median_ms
from usp._csrc import fused_merge_op, fused_merge_status
from usp.kernels import resolve_backend
from usp.merge import merge_attention_reference_


def merge_costs(seqlen, heads, head_dim, kernel):
    rows = seqlen // 4  # a ring of 2 merges half of the local s/2 rows at step 1
    shape = (1, rows, heads, head_dim)
    block = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    block_lse = torch.randn(1, heads, rows, device="cuda")
    q = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    k = torch.randn((1, 2 * rows, heads, head_dim), device="cuda", dtype=torch.bfloat16)
    result = {"rows": rows, "heads": heads, "head_dim": head_dim}
    op = fused_merge_op()
    for acc_dtype in (torch.bfloat16, torch.float32):
        out = torch.randn(shape, device="cuda", dtype=acc_dtype)
        lse = torch.randn(1, heads, rows, device="cuda")
        element_bytes = out.element_size() * 2 + block.element_size()  # read out, read block, write out
        moved = out.numel() * element_bytes
        name = str(acc_dtype).replace("torch.", "")
        for label, fn in (("fused", op), ("pytorch", merge_attention_reference_)):
            if fn is None:
                continue
            ms = median_ms(lambda: fn(out, lse, block, block_lse), 5, 20)
            result[f"{label}_{name}_ms"] = ms
            result[f"{label}_{name}_GBps"] = moved / ms / 1e6
    result["attention_fwd_same_rows_ms"] = median_ms(lambda: kernel.forward(q, k, k, False, head_dim ** -0.5), 5, 20)
    return result


def categorize(name):
    low = name.lower()
    if "nccl" in low:
        return "nccl"
    if any(key in low for key in ("cudnn", "flash", "fmha", "sdpa", "attention", "cutlass", "sm90", "fprop",
                                  "bprop", "fwd_kernel", "bwd_kernel")):
        return "attention"
    return "elementwise_copy"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seqlens", default="32k")
    p.add_argument("--backend", default="cudnn")
    p.add_argument("--heads", default="32/32,32/8")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--splits", default="1x2,2x1")
    p.add_argument("--causal", default="1")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", required=True)
    a = p.parse_args()
    local_rank = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
    rank = dist.get_rank()
    kernel = resolve_backend(a.backend, torch.device("cuda"), torch.bfloat16, a.head_dim)
    fused_merge_op()
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cudnn": torch.backends.cudnn.version(),
              "kernel": kernel.name, "fused_merge": fused_merge_status(), "date": time.strftime("%Y-%m-%d"),
              "merge": [], "profiles": []}
    heads_list = [tuple(map(int, h.split("/"))) for h in a.heads.split(",")]
    seqlens = [parse_len(s) for s in a.seqlens.split(",")]
    if rank == 0:
        for seqlen in seqlens:
            for heads, _ in heads_list[:1]:
                report["merge"].append({"seqlen": seqlen, **merge_costs(seqlen, heads, a.head_dim, kernel)})
    dist.barrier()
    meshes = {s: usp.SequenceParallelMesh(ulysses=int(s.split("x")[0]), ring=int(s.split("x")[1]))
              for s in a.splits.split(",")}
    for seqlen in seqlens:
        for heads, kv_heads in heads_list:
            for causal in (c == "1" for c in a.causal.split(",")):
                for split, mesh in meshes.items():
                    s_loc = seqlen // dist.get_world_size()
                    q = torch.randn(1, s_loc, heads, a.head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                    k = torch.randn(1, s_loc, kv_heads, a.head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                    v = torch.randn(1, s_loc, kv_heads, a.head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                    dout = torch.randn_like(q)

                    def step():
                        q.grad = k.grad = v.grad = None  # no gradient accumulation kernels in the profile
                        out = usp.long_context_attention(q, k, v, mesh, causal=causal, backend=kernel)
                        out.backward(dout)

                    for _ in range(a.warmup):
                        step()
                    torch.cuda.synchronize()
                    dist.barrier()
                    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                        start = torch.cuda.Event(enable_timing=True)
                        end = torch.cuda.Event(enable_timing=True)
                        start.record()
                        for _ in range(a.repeats):
                            step()
                        end.record()
                        torch.cuda.synchronize()
                    wall = start.elapsed_time(end) / a.repeats
                    per_category, top = {}, {}
                    for event in prof.key_averages():
                        device_us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
                        if device_us <= 0:
                            continue
                        category = categorize(event.key)
                        per_category[category] = per_category.get(category, 0.0) + device_us / 1000 / a.repeats
                        top[event.key[:90]] = (device_us / 1000 / a.repeats, event.count // a.repeats)
                    if rank == 0:
                        biggest = sorted(top.items(), key=lambda kv: -kv[1][0])[:12]
                        record = {"seqlen": seqlen, "heads": heads, "kv_heads": kv_heads, "causal": causal,
                                  "split": split, "wall_ms": wall, "kernel_ms": per_category,
                                  "exposed_ms": wall - per_category.get("attention", 0.0),
                                  "top_kernels": [{"name": n, "ms": t, "calls": c} for n, (t, c) in biggest]}
                        report["profiles"].append(record)
                        print(json.dumps({k: record[k] for k in ("seqlen", "heads", "kv_heads", "causal", "split",
                                                                  "wall_ms", "kernel_ms", "exposed_ms")}), flush=True)
                    del q, k, v, dout
                    torch.cuda.empty_cache()
    if rank == 0:
        print(json.dumps(report["merge"], indent=1))
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
