"""Quick side-by-side timing of usp splits vs the same kernel on one GPU (torchrun, 2 GPUs).

    torchrun --nproc-per-node 2 benchmarks/quick_splits.py --seqlens 32k,128k --backends cudnn,fa4

Prints one line per (backend, seqlen, causal, split): median fwd+bwd ms over --repeats after --warmup, the
single-GPU time of the same kernel on the full sequence (rank 0, measured in the same run), and E = T1 / (P * TP).
"""
import argparse
import json
import os

import torch
import torch.distributed as dist

import usp
from bench_common import parse_seqlen as parse_len
from cuda_timing import median_ms


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seqlens", default="32k")
    p.add_argument("--backends", default="cudnn")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--causal", default="1,0")
    p.add_argument("--splits", default="1x2,2x1")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl", device_id=torch.device("cuda", int(os.environ["LOCAL_RANK"])))
    rank, world = dist.get_rank(), dist.get_world_size()
    dev, dt = torch.device("cuda"), torch.bfloat16
    meshes = {s: usp.SequenceParallelMesh(ulysses=int(s.split("x")[0]), ring=int(s.split("x")[1]))
              for s in a.splits.split(",")}
    records = []
    for backend in a.backends.split(","):
        for seqlen in map(parse_len, a.seqlens.split(",")):
            for causal in (c == "1" for c in a.causal.split(",")):
                kernel = usp.resolve_backend(backend, dev, dt, a.head_dim)
                scale = a.head_dim ** -0.5
                t1 = None
                if rank == 0:
                    q = torch.randn(1, seqlen, a.heads, a.head_dim, device=dev, dtype=dt)
                    k = torch.randn(1, seqlen, a.kv_heads, a.head_dim, device=dev, dtype=dt)
                    v = torch.randn_like(k)
                    do = torch.randn_like(q)

                    def single():
                        o, l = kernel.forward(q, k, v, causal, scale)
                        kernel.backward(do, q, k, v, o, l, causal, scale)

                    t1 = median_ms(single, a.warmup, a.repeats)
                    del q, k, v, do
                dist.barrier()
                for name, mesh in meshes.items():
                    local = seqlen // world
                    q = torch.randn(1, local, a.heads, a.head_dim, device=dev, dtype=dt, requires_grad=True)
                    k = torch.randn(1, local, a.kv_heads, a.head_dim, device=dev, dtype=dt, requires_grad=True)
                    v = torch.randn(1, local, a.kv_heads, a.head_dim, device=dev, dtype=dt, requires_grad=True)
                    do = torch.randn(1, local, a.heads, a.head_dim, device=dev, dtype=dt)

                    def step():
                        out = usp.long_context_attention(q, k, v, mesh, causal=causal, backend=backend)
                        out.backward(do)

                    torch.cuda.reset_peak_memory_stats()
                    tp = median_ms(step, a.warmup, a.repeats)
                    peak = torch.cuda.max_memory_allocated() / 2**30
                    tp_all = [None] * world
                    dist.all_gather_object(tp_all, tp)
                    tp = max(tp_all)
                    if rank == 0:
                        e = t1 / (world * tp)
                        rec = dict(backend=backend, seqlen=seqlen, causal=causal, split=name, heads=a.heads,
                                   kv_heads=a.kv_heads, t1_ms=round(t1, 3), tp_ms=round(tp, 3), E=round(e, 4),
                                   peak_gib=round(peak, 2))
                        records.append(rec)
                        print(json.dumps(rec), flush=True)
                    del q, k, v, do
    if rank == 0 and a.json:
        with open(a.json, "w") as f:
            json.dump(records, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
