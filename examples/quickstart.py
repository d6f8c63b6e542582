"""Exact long-context attention across all ranks, output and gradients checked against PyTorch on one device.

    torchrun --nproc-per-node 4 examples/quickstart.py                 # CPU, gloo: Ulysses 2 x ring 2
    torchrun --nproc-per-node 2 examples/quickstart.py --seqlen 32k    # GPUs, NCCL, bf16: the planner's split

On CPU the split uses both Ulysses and the ring where the world allows (4 ranks: 2 x 2); on GPUs the planner picks
it for --topology (default: its DGX-H100-like preset). --ulysses/--ring force one. The check: the gathered output
and dQ, dK, dV against plain PyTorch attention in float64 on the full tensors; usp passes when its error is at most
twice that of PyTorch's own attention in the input dtype (SDPA on the full tensors). It exits non-zero otherwise.
"""
import argparse
import math
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import usp


def parse_len(text: str) -> int:
    text = text.lower()
    scale = {"k": 1024, "m": 1024 * 1024}.get(text[-1], 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def cpu_split(world: int, heads: int) -> tuple:
    """(ulysses, ring) with both degrees > 1 where possible: the largest Ulysses degree <= sqrt(world) that
    divides world and heads (4 ranks: 2 x 2; 2 ranks: 1 x 2)."""
    ulysses = max(u for u in range(1, math.isqrt(world) + 1) if world % u == 0 and heads % u == 0)
    return ulysses, world // ulysses


def reference_attention(q, k, v, causal: bool, block: int = 1024):
    """Plain attention, softmax(q k^T / sqrt(d)) v, in q's dtype, independent of usp; q [b, s, h, d], k/v
    [b, s, kv_h, d] (K/V heads repeated for GQA). Query blocks of ``block`` rows, each recomputed in backward
    (checkpoint), so memory is O(block * s), not O(s^2)."""
    group = q.shape[2] // k.shape[2]
    k, v = (x.repeat_interleave(group, dim=2).transpose(1, 2) for x in (k, v))   # [b, h, s, d]
    q = q.transpose(1, 2)                                                          # [b, h, s, d]
    positions = torch.arange(q.shape[2], device=q.device)

    def rows(q_rows, start):
        scores = q_rows @ k.transpose(-1, -2) * q.shape[-1] ** -0.5                # [b, h, rows, s]
        if causal:
            hidden = positions[None, :] > (start + torch.arange(q_rows.shape[2], device=q.device))[:, None]
            scores = scores.masked_fill(hidden, float("-inf"))
        return scores.softmax(-1) @ v                                              # [b, h, rows, d]

    out = [checkpoint(rows, q[:, :, i:i + block], i, use_reentrant=False) for i in range(0, q.shape[2], block)]
    return torch.cat(out, dim=2).transpose(1, 2)                                   # [b, s, h, d]


def sdpa_attention(q, k, v, causal: bool):
    """PyTorch's fused attention (SDPA) on the full tensors, in their dtype: the baseline error."""
    group = q.shape[2] // k.shape[2]
    k, v = (x.repeat_interleave(group, dim=2) for x in (k, v))
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          is_causal=causal).transpose(1, 2)


def out_and_grads(fn, q, k, v, dout, dtype):
    """fn's output and dq, dk, dv for the upstream gradient dout, computed in dtype."""
    q, k, v = (x.to(dtype).requires_grad_() for x in (q, k, v))
    out = fn(q, k, v)
    out.backward(dout.to(dtype))
    return [out.detach(), q.grad, k.grad, v.grad]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seqlen", type=parse_len, default=None, help="global tokens (default 1k CPU, 32k GPU)")
    parser.add_argument("--heads", type=int, default=8, help="query heads")
    parser.add_argument("--kv-heads", type=int, default=2, help="K/V heads (GQA)")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--ulysses", type=int, default=None, help="force the Ulysses degree")
    parser.add_argument("--ring", type=int, default=None, help="force the ring degree")
    parser.add_argument("--topology", default=None, help="planner topology on GPUs: a preset name or a YAML path")
    parser.add_argument("--no-causal", dest="causal", action="store_false")
    args = parser.parse_args()

    use_cuda = torch.cuda.is_available()
    if use_cuda:
        local_rank, gpus = int(os.environ.get("LOCAL_RANK", 0)), torch.cuda.device_count()
        if local_rank >= gpus:
            raise SystemExit(f"local rank {local_rank} has no GPU ({gpus} visible): start at most {gpus} processes "
                             f"per node, or run on the CPU with CUDA_VISIBLE_DEVICES=''")
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if use_cuda else "gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    device = torch.device("cuda") if use_cuda else torch.device("cpu")
    dtype = torch.bfloat16 if use_cuda else torch.float32
    seqlen = args.seqlen or (32 * 1024 if use_cuda else 1024)

    if args.ulysses or args.ring:
        mesh = usp.SequenceParallelMesh(ulysses=args.ulysses or 1, ring=args.ring or 1)
    elif use_cuda:
        plan = usp.plan(world, seqlen, args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim, dtype=dtype,
                        causal=args.causal, topology=args.topology)
        mesh = usp.SequenceParallelMesh.from_plan(plan)
    else:  # the planner models GPUs; on CPU use both Ulysses and the ring
        ulysses, ring = cpu_split(world, args.heads)
        mesh = usp.SequenceParallelMesh(ulysses=ulysses, ring=ring)
    attention = usp.LongContextAttention(mesh, causal=args.causal)

    gen = torch.Generator().manual_seed(0)  # the same full tensors on every rank, for the check below
    q, k, v, dout = (torch.randn(1, seqlen, h, args.head_dim, generator=gen).to(device, dtype)
                     for h in (args.heads, args.kv_heads, args.kv_heads, args.heads))
    q_local, k_local, v_local = (usp.shard(x, mesh, causal=args.causal).requires_grad_() for x in (q, k, v))

    start = time.perf_counter()
    out_local = attention(q_local, k_local, v_local)
    out_local.backward(usp.shard(dout, mesh, causal=args.causal))
    if use_cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start

    got = [usp.gather(x, mesh, causal=args.causal) for x in (out_local.detach(), q_local.grad, k_local.grad,
                                                            v_local.grad)]
    if rank == 0:
        reference = out_and_grads(lambda *x: reference_attention(*x, args.causal), q, k, v, dout, torch.float64)
        baseline = out_and_grads(lambda *x: sdpa_attention(*x, args.causal), q, k, v, dout, dtype)
        print(f"Ulysses {mesh.ulysses} x ring {mesh.ring} on {world} ranks, {seqlen} tokens, {dtype}, backend "
              f"{attention.resolved_backend(q_local).name}: fwd+bwd {elapsed * 1e3:.1f} ms (first call)")
        failed = []
        for name, usp_x, ref_x, base_x in zip(("out", "dq", "dk", "dv"), got, reference, baseline):
            error, base_error = ((x.double() - ref_x).abs().max().item() for x in (usp_x, base_x))
            ok = error <= 2 * base_error + 1e-6
            failed += [] if ok else [name]
            print(f"  {name}: max |usp - float64| = {error:.2e}, PyTorch SDPA {dtype}: {base_error:.2e}"
                  f"{'' if ok else '  <- more than twice'}")
        if failed:
            raise SystemExit(f"usp's {', '.join(failed)} differ from the float64 reference by more than twice "
                             f"PyTorch's own {dtype} error")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
