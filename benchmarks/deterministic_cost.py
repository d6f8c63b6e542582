"""What ``deterministic=True`` costs: fwd+bwd of one attention layer, deterministic vs not, side by side in one run.

    torchrun --nproc-per-node 2 benchmarks/deterministic_cost.py [--seqlen 32768] [--out FILE.json]

Every backend with a deterministic backward that is installed (``usp.kernels``), meshes 1x2 and 2x1, causal, GQA
32/8, head_dim 128, bf16. Medians of CUDA-event times after warm-up; the ratio is measured in the same run. Rank 0
prints one JSON line per (backend, mesh) and writes them to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cuda_timing import median_ms  # noqa: E402

import usp  # noqa: E402
from usp.kernels import BACKENDS  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqlen", type=int, default=32768, help="global sequence length")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls first")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls (median reported)")
    parser.add_argument("--out", default=None, help="write the rows as JSON here (rank 0)")
    args = parser.parse_args()
    dist.init_process_group("nccl")
    rank = dist.get_rank()
    torch.cuda.set_device(rank % torch.cuda.device_count())
    device = torch.device("cuda", torch.cuda.current_device())
    gen = torch.Generator().manual_seed(0)
    full = [torch.randn(1, args.seqlen, heads, 128, generator=gen).bfloat16() for heads in (32, 8, 8, 32)]
    rows = []
    for name, kernel in BACKENDS.items():
        if name == "reference" or not kernel.is_available() or not kernel.deterministic_backward:
            continue
        for ulysses, ring in ((1, 2), (2, 1)):
            mesh = usp.SequenceParallelMesh(ulysses=ulysses, ring=ring)
            local = [usp.shard(t, mesh).to(device) for t in full]
            times = {}
            for deterministic in (False, True):
                q, k, v = (t.clone().requires_grad_() for t in local[:3])

                def step():
                    out = usp.long_context_attention(q, k, v, mesh, backend=name, deterministic=deterministic)
                    out.backward(local[3])

                times[deterministic] = median_ms(step, args.warmup, args.repeats)
            row = {"backend": name, "mesh": f"{ulysses}x{ring}", "seqlen": args.seqlen, "heads": "32/8",
                   "fwd_bwd_ms": round(times[False], 3), "deterministic_fwd_bwd_ms": round(times[True], 3),
                   "cost": round(times[True] / times[False], 4),
                   "device": torch.cuda.get_device_name(device), "torch": torch.__version__}
            rows.append(row)
            if rank == 0:
                print(json.dumps(row), flush=True)
    if rank == 0 and args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
