"""The Ulysses all-to-all, autograd-aware: trade sequence shards for head shards and back.

``seq -> heads``: ``[b, s_local, h, d]`` on each of the ``U`` ranks becomes ``[b, U * s_local, h / U, d]``:
rank ``u`` receives heads ``[u * h/U, (u+1) * h/U)`` of every rank's sequence shard, concatenated in rank order.
``heads -> seq`` is its inverse, and each is the other's backward.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist


def seq_to_heads_shape(shape: Tuple[int, ...], world: int) -> Tuple[int, int, int, int]:
    b, s, h, d = shape
    return (b, s * world, h // world, d)


def _seq_to_heads(x: torch.Tensor, group: Optional[dist.ProcessGroup], world: int) -> torch.Tensor:
    b, s, h, d = x.shape
    # [b, s, U, h/U, d] -> [U, b, s, h/U, d]: chunk u of dim 0 goes to rank u
    send = x.reshape(b, s, world, h // world, d).permute(2, 0, 1, 3, 4).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    # recv[u] = rank u's sequence shard of my heads: [U, b, s, h/U, d] -> [b, U * s, h/U, d]
    return recv.permute(1, 0, 2, 3, 4).reshape(b, world * s, h // world, d)


def _heads_to_seq(x: torch.Tensor, group: Optional[dist.ProcessGroup], world: int) -> torch.Tensor:
    b, s_full, h_local, d = x.shape
    s = s_full // world
    # [b, U, s, h/U, d] -> [U, b, s, h/U, d]: sequence piece u goes back to rank u
    send = x.reshape(b, world, s, h_local, d).transpose(0, 1).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    # recv[u] = my sequence shard of rank u's heads: [U, b, s, h/U, d] -> [b, s, U * h/U, d]
    return recv.permute(1, 2, 0, 3, 4).reshape(b, s, world * h_local, d)


class _SeqToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, world):
        ctx.group, ctx.world = group, world
        return _seq_to_heads(x, group, world)

    @staticmethod
    def backward(ctx, grad):
        return _heads_to_seq(grad.contiguous(), ctx.group, ctx.world), None, None


class _HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, world):
        ctx.group, ctx.world = group, world
        return _heads_to_seq(x, group, world)

    @staticmethod
    def backward(ctx, grad):
        return _seq_to_heads(grad.contiguous(), ctx.group, ctx.world), None, None


def all_to_all_seq_to_heads(x: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """``[b, s_local, h, d]`` -> ``[b, U * s_local, h / U, d]`` over ``group`` (size ``U``; ``h % U == 0``)."""
    world = dist.get_world_size(group)
    if world == 1:
        return x
    return _SeqToHeads.apply(x, group, world)


def all_to_all_heads_to_seq(x: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """``[b, U * s_local, h / U, d]`` -> ``[b, s_local, h, d]``: the inverse of ``all_to_all_seq_to_heads``."""
    world = dist.get_world_size(group)
    if world == 1:
        return x
    return _HeadsToSeq.apply(x, group, world)
