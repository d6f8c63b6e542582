"""Train a small Llama-style model with torch.compile + FSDP2 + usp sequence parallelism.

One DeviceMesh ``(dp, cp)``: FSDP2 (``fully_shard``) shards the parameters over ``cp`` and replicates them over
``dp`` (HSDP), so the gradients are summed over every rank; usp attention runs on the ``cp`` dim
(``SequenceParallelMesh.from_device_mesh``, as a ring or as Ulysses), every block is activation-checkpointed and
compiled (``torch.compile(fullgraph=True)``: usp attention is a custom op, no graph break; Note [compiled attention]
in ``usp/compiled.py``). Each data-parallel replica trains on its own sequences; each cp rank holds its shard of
them (``usp.shard``), with RoPE at global positions (``usp.position_ids``).

    # CPU, gloo, 4 processes: dp 2 x cp 2 (ring), inductor would be slow on CPU: aot_eager
    torchrun --nproc-per-node 4 examples/train_compile_fsdp.py --dp 2 --cp 2 --cp-kind ring --compile aot_eager
    # GPUs, NCCL, bf16: 2 GPUs, cp 2 (Ulysses), inductor
    torchrun --nproc-per-node 2 examples/train_compile_fsdp.py --device cuda --dtype bfloat16 --cp 2 \\
        --cp-kind ulysses --seqlen 32768 --layers 4 --hidden 1024 --heads 16 --kv-heads 4 --steps 10

Per step it prints the loss (the mean over every token of the global batch) and the step time.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

_CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isdir(os.path.join(_CHECKOUT, "usp")):  # run from a checkout: use its usp package
    sys.path.insert(0, _CHECKOUT)

import usp  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}


# ---------------------------------------------------------------------------------------------- the model
class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


def rope(x, positions, theta: float = 10000.0):
    """Rotary embedding of ``x [b, s, h, d]`` at the global ``positions [s]`` (rotate-half form)."""
    d = x.shape[-1]
    freqs = 1.0 / theta ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)
    angles = positions.to(x.device, torch.float32)[:, None] * freqs[None, :]  # [s, d/2]
    cos, sin = (torch.cat([t, t], -1)[None, :, None, :].to(x.dtype) for t in (angles.cos(), angles.sin()))
    half = torch.cat([-x[..., d // 2:], x[..., : d // 2]], -1)
    return x * cos + half * sin


class Block(nn.Module):
    """Pre-norm attention (GQA, RoPE) + SwiGLU MLP. ``mesh=None``: PyTorch's attention on the whole sequence."""

    def __init__(self, hidden: int, heads: int, kv_heads: int, mesh=None):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim, self.mesh = heads, kv_heads, hidden // heads, mesh
        self.attn_norm, self.mlp_norm = RMSNorm(hidden), RMSNorm(hidden)
        self.wq = nn.Linear(hidden, heads * self.head_dim, bias=False)
        self.wk = nn.Linear(hidden, kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(hidden, kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(heads * self.head_dim, hidden, bias=False)
        self.w1 = nn.Linear(hidden, 2 * hidden, bias=False)
        self.w3 = nn.Linear(hidden, 2 * hidden, bias=False)
        self.w2 = nn.Linear(2 * hidden, hidden, bias=False)

    def forward(self, x, positions):
        b, s, _ = x.shape
        h = self.attn_norm(x)
        q = rope(self.wq(h).view(b, s, self.heads, self.head_dim), positions)
        k = rope(self.wk(h).view(b, s, self.kv_heads, self.head_dim), positions)
        v = self.wv(h).view(b, s, self.kv_heads, self.head_dim)
        if self.mesh is not None:  # this rank's shard of the sequence, in usp's layout
            o = usp.long_context_attention(q, k, v, self.mesh, causal=True)
        else:
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               is_causal=True, enable_gqa=True).transpose(1, 2)
        x = x + self.wo(o.reshape(b, s, -1))
        h = self.mlp_norm(x)
        return x + self.w2(F.silu(self.w1(h)) * self.w3(h))


class Llama(nn.Module):
    def __init__(self, vocab: int, hidden: int, layers: int, heads: int, kv_heads: int, mesh=None):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.blocks = nn.ModuleList(Block(hidden, heads, kv_heads, mesh) for _ in range(layers))
        self.norm = RMSNorm(hidden)
        self.head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, tokens, positions):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, positions)
        return self.head(self.norm(x))


def token_loss_sum(model, tokens, labels, positions):
    """Sum of the cross-entropy over the tokens given (labels ``-100`` skipped), in float32."""
    logits = model(tokens, positions)
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="sum", ignore_index=-100)


def make_batch(step: int, batch: int, seqlen: int, vocab: int, device):
    """The global batch of a step (the same on every rank): ``tokens, labels [batch, seqlen]``; labels are the
    next token, ``-100`` at the last position."""
    g = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, vocab, (batch, seqlen), generator=g)
    labels = torch.cat([tokens[:, 1:], torch.full((batch, 1), -100)], 1)
    return tokens.to(device), labels.to(device)


# ---------------------------------------------------------------------------------------------- parallel set-up
def parallelize(model: Llama, device_mesh, compile_backend=None, checkpoint=True):
    """Activation checkpointing and (optionally) ``torch.compile`` per block, FSDP2 per block and at the root over
    ``device_mesh`` (2-D ``(dp, cp)``: HSDP, sharded over cp, replicated over dp)."""
    from torch.distributed.fsdp import fully_shard
    from torch.utils.checkpoint import checkpoint as activation_checkpoint

    for block in model.blocks:
        forward = block.forward
        if checkpoint:
            def forward(x, positions, _inner=block.forward):
                return activation_checkpoint(_inner, x, positions, use_reentrant=False)
        if compile_backend:
            forward = torch.compile(forward, backend=compile_backend, fullgraph=True)
        block.forward = forward
        fully_shard(block, mesh=device_mesh)
    fully_shard(model, mesh=device_mesh)
    return model


def train_step(model, optimizer, step, args, usp_mesh, dp_rank, dp_size, device):
    """One step on this rank's shard of this replica's sequences; returns the global mean loss."""
    tokens, labels = make_batch(step, args.batch * dp_size, args.seqlen, args.vocab, device)
    rows = slice(dp_rank * args.batch, (dp_rank + 1) * args.batch)
    tokens, labels = (usp.shard(x[rows], usp_mesh, dim=1, causal=True) for x in (tokens, labels))
    positions = usp.position_ids(args.seqlen, usp_mesh, causal=True, device=device)
    total = args.batch * dp_size * (args.seqlen - 1)  # tokens with a label in the global batch
    world = dist.get_world_size()
    # FSDP2 averages the gradients over its ranks: scale so that their mean is d(global mean loss)
    loss = token_loss_sum(model, tokens, labels, positions) * (world / total)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    reported = loss.detach().clone()
    dist.all_reduce(reported)
    return reported.item() / world


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", default="float32", choices=tuple(DTYPES))
    parser.add_argument("--dp", type=int, default=1, help="data-parallel (replicate) degree")
    parser.add_argument("--cp", type=int, default=2, help="context-parallel degree (FSDP shards over it too)")
    parser.add_argument("--cp-kind", default="ring", choices=("ring", "ulysses"), help="usp on the cp dim")
    parser.add_argument("--compile", default="inductor", help="torch.compile backend, or 'none' (eager)")
    parser.add_argument("--no-checkpoint", action="store_true", help="no activation checkpointing")
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1, help="sequences per data-parallel replica")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args(argv)
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    if dist.get_world_size() != args.dp * args.cp:
        raise SystemExit(f"--dp {args.dp} x --cp {args.cp} must equal the world size {dist.get_world_size()}")
    device = torch.device(args.device, torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    from torch.distributed.device_mesh import init_device_mesh

    device_mesh = init_device_mesh(args.device, (args.dp, args.cp), mesh_dim_names=("dp", "cp"))
    usp_mesh = usp.SequenceParallelMesh.from_device_mesh(device_mesh, **{f"{args.cp_kind}_dim": "cp"})
    torch.manual_seed(0)  # the same initial weights on every rank
    model = Llama(args.vocab, args.hidden, args.layers, args.heads, args.kv_heads, usp_mesh)
    model.to(device=device, dtype=DTYPES[args.dtype])
    compile_backend = None if args.compile == "none" else args.compile
    parallelize(model, device_mesh, compile_backend, checkpoint=not args.no_checkpoint)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    dp_rank = device_mesh.get_local_rank("dp")
    for step in range(args.steps):
        start = time.perf_counter()
        loss = train_step(model, optimizer, step, args, usp_mesh, dp_rank, args.dp, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if dist.get_rank() == 0:
            print(f"step {step}: loss {loss:.4f} ({math.log(args.vocab):.4f} at chance), "
                  f"{time.perf_counter() - start:.3f} s", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
