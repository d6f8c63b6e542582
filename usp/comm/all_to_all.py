"""The Ulysses all-to-all: trade sequence shards for head shards and back, whole or one head group at a time.

``seq -> heads``: ``[b, s_local, h, d]`` on each of the ``U`` ranks becomes ``[b, U * s_local, h / U, d]``:
rank ``u`` receives heads ``[u * h/U, (u+1) * h/U)`` of every rank's sequence shard, concatenated in rank order.
``heads -> seq`` is its inverse, and each is the other's backward.

With ``groups = G > 1`` the heads each rank receives are cut into ``G`` equal groups and group ``g`` is traded
alone (``pack_*``/``start``/``unpack_*``), so the attention of one group can run while the next is in flight.
Each direction costs exactly one copy per tensor: the pack before ``seq -> heads``, the unpack after
``heads -> seq`` (NCCL moves contiguous chunks; the head interleave has to happen on one side).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist


def pack_seq_to_heads(x: torch.Tensor, world: int, groups: int = 1, group_index: int = 0) -> torch.Tensor:
    """``[b, s, h, d]`` -> send buffer ``[U, b, s, h/(U*G), d]``: chunk ``u`` = rank ``u``'s heads of group ``g``."""
    b, s, h, d = x.shape
    per = h // (world * groups)
    return x.reshape(b, s, world, groups, per, d)[:, :, :, group_index].permute(2, 0, 1, 3, 4).contiguous()


def unpack_seq_to_heads(recv: torch.Tensor) -> torch.Tensor:
    """Receive buffer ``[U, b, s, h', d]`` (chunk ``u`` from rank ``u``) -> ``[b, U * s, h', d]``."""
    world, b, s, h, d = recv.shape
    return recv.transpose(0, 1).reshape(b, world * s, h, d)


def pack_heads_to_seq(x: torch.Tensor, world: int) -> torch.Tensor:
    """``[b, U * s, h', d]`` -> send buffer ``[U, b, s, h', d]``: chunk ``u`` = sequence piece ``u``."""
    b, s_full, h, d = x.shape
    return x.reshape(b, world, s_full // world, h, d).transpose(0, 1).contiguous()


def unpack_heads_to_seq_into(recv: torch.Tensor, dest: torch.Tensor, groups: int = 1, group_index: int = 0) -> None:
    """Write receive buffer ``[U, b, s, h', d]`` (rank ``u``'s heads of group ``g``) into ``dest [b, s, h, d]``."""
    world, b, s, per, d = recv.shape
    dest.view(b, s, world, groups, per, d)[:, :, :, group_index].copy_(recv.permute(1, 2, 0, 3, 4))


def start_all_to_all(send: torch.Tensor, group: Optional[dist.ProcessGroup]) -> Tuple[torch.Tensor, object]:
    """Post ``all_to_all_single`` asynchronously; returns ``(receive buffer, work)`` — call ``work.wait()``."""
    recv = torch.empty_like(send)
    work = dist.all_to_all_single(recv, send, group=group, async_op=True)
    return recv, work


def _seq_to_heads(x: torch.Tensor, group: Optional[dist.ProcessGroup], world: int) -> torch.Tensor:
    recv, work = start_all_to_all(pack_seq_to_heads(x, world), group)
    work.wait()
    return unpack_seq_to_heads(recv)


def _heads_to_seq(x: torch.Tensor, group: Optional[dist.ProcessGroup], world: int) -> torch.Tensor:
    b, s_full, h_local, d = x.shape
    recv, work = start_all_to_all(pack_heads_to_seq(x, world), group)
    dest = torch.empty(b, s_full // world, world * h_local, d, dtype=x.dtype, device=x.device)
    work.wait()
    unpack_heads_to_seq_into(recv, dest)
    return dest


class _SeqToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, world):
        ctx.group, ctx.world = group, world
        return _seq_to_heads(x, group, world)

    @staticmethod
    def backward(ctx, grad):
        return _heads_to_seq(grad, ctx.group, ctx.world), None, None


class _HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, world):
        ctx.group, ctx.world = group, world
        return _heads_to_seq(x, group, world)

    @staticmethod
    def backward(ctx, grad):
        return _seq_to_heads(grad, ctx.group, ctx.world), None, None


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
