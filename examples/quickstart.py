"""Exact long-context attention across all ranks, checked against one device. Same file on CPU and GPU:

    torchrun --nproc-per-node 4 examples/quickstart.py                 # CPU, gloo
    torchrun --nproc-per-node 2 examples/quickstart.py --seqlen 32k    # GPUs, NCCL, bf16

The planner picks the Ulysses x ring split for this world size; pass --ulysses/--ring to force one.
"""
import argparse
import os
import time

import torch
import torch.distributed as dist

import usp


def parse_len(text: str) -> int:
    text = text.lower()
    scale = {"k": 1024, "m": 1024 * 1024}.get(text[-1], 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seqlen", type=parse_len, default=None, help="global tokens (default 1k CPU, 32k GPU)")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--ulysses", type=int, default=None)
    parser.add_argument("--ring", type=int, default=None)
    parser.add_argument("--no-causal", dest="causal", action="store_false")
    args = parser.parse_args()

    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if use_cuda else "gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    device = torch.device("cuda") if use_cuda else torch.device("cpu")
    dtype = torch.bfloat16 if use_cuda else torch.float32
    seqlen = args.seqlen or (32 * 1024 if use_cuda else 1024)

    if args.ulysses or args.ring:
        mesh = usp.SequenceParallelMesh(ulysses=args.ulysses or 1, ring=args.ring or 1)
    else:
        plan = usp.plan(world, seqlen, args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim,
                        dtype=dtype, causal=args.causal)
        mesh = usp.SequenceParallelMesh.from_plan(plan)
    attention = usp.LongContextAttention(mesh, causal=args.causal)

    gen = torch.Generator().manual_seed(0)  # same full tensors on every rank, for the check below
    q, k, v = (torch.randn(1, seqlen, h, args.head_dim, generator=gen).to(device, dtype)
               for h in (args.heads, args.kv_heads, args.kv_heads))
    q_local, k_local, v_local = (usp.shard(x, mesh, causal=args.causal).requires_grad_() for x in (q, k, v))

    start = time.perf_counter()
    out_local = attention(q_local, k_local, v_local)
    out_local.sum().backward()
    if use_cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start

    out = usp.gather(out_local.detach(), mesh, causal=args.causal)
    if rank == 0:
        kernel = attention.resolved_backend(q_local)
        reference, _ = kernel.forward(q, k, v, args.causal, args.head_dim ** -0.5) if seqlen <= 32768 else (None, None)
        error = (out.float() - reference.float()).abs().max().item() if reference is not None else float("nan")
        print(f"{mesh}: {world} ranks, {seqlen} tokens, backend {kernel.name}, fwd+bwd {elapsed * 1e3:.1f} ms "
              f"(first call), max |usp - one device| = {error:.2e}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
