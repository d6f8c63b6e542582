"""Ulysses x ring with the all-to-alls pipelined per head group, as one autograd function.

Note [head-group pipeline]. The heads each Ulysses rank receives are cut into ``G`` groups (``G = 2`` when the
query and K/V head counts allow it, else 1). Forward: every group's Q/K/V trades are posted up front (NCCL runs
them in order on its own stream), then for each group: wait for its inputs, run the ring attention, post its
output trade. So group ``g + 1``'s inputs arrive while group ``g`` computes, and group ``g``'s output leaves while
group ``g + 1`` computes; only the first input trade and the last output trade are exposed. Backward mirrors it
(dO trades up front; dQ/dK/dV trades posted as each group's ring backward finishes). Collective count per layer:
forward ``4G`` all-to-alls and ``G (R - 1)`` P2P batches, backward ``4G`` and ``G (2R - 3)`` (``R > 1``).
"""
from __future__ import annotations

from typing import List

import torch

from .comm.all_to_all import (pack_heads_to_seq, pack_seq_to_heads, start_all_to_all, unpack_heads_to_seq_into,
                              unpack_seq_to_heads)
from .ring import refuse_double_backward, ring_backward, ring_forward


def head_groups(heads: int, kv_heads: int, ulysses: int, head_chunks: int = 1) -> int:
    """Pipeline depth ``G`` for ``heads`` query and ``kv_heads`` (already replicated) K/V heads over ``ulysses``;
    each group is further cut into ``head_chunks`` ring passes (``usp.ring``, Note [head chunks])."""
    if ulysses == 1:
        return 1
    q_local, kv_local = heads // ulysses, kv_heads // ulysses
    if q_local % (2 * head_chunks) or kv_local % 2:
        return 1
    # each group's heads must still split into head_chunks (ring.py _chunk_slices)
    kv_group = kv_local // 2
    return 2 if kv_group % head_chunks == 0 or head_chunks % kv_group == 0 else 1


class UlyssesRingFunction(torch.autograd.Function):
    """``apply(q, k, v, mesh, kernel, schedule, scale, groups, head_chunks, deterministic)
    -> (out [b, s/P, h, d], lse [b, h/U, s/R])``; no double backward (``usp.ring.refuse_double_backward``).

    ``k, v`` must already have a K/V head count divisible by ``U * groups * head_chunks`` (see ``usp.attention``).
    """

    @staticmethod
    def forward(ctx, q, k, v, mesh, kernel, schedule, scale, groups, head_chunks=1, deterministic=False):
        world, comm = mesh.ulysses, mesh.ulysses_group
        incoming = [[start_all_to_all(pack_seq_to_heads(x, world, groups, g), comm) for x in (q, k, v)]
                    for g in range(groups)]
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
        outgoing, saved, lses = [], [], []
        for g in range(groups):
            q_g, k_g, v_g = (_arrived(recv, work) for recv, work in incoming[g])
            incoming[g] = None  # done with this group's work handles
            out_g, lse_g, last_kv = ring_forward(q_g, k_g, v_g, mesh, kernel, schedule, scale, head_chunks)
            outgoing.append(start_all_to_all(pack_heads_to_seq(out_g, world), comm))
            saved += [q_g, k_g, v_g, out_g, lse_g] + (last_kv if mesh.ring > 1 else [])
            lses.append(lse_g)
        for g, (recv, work) in enumerate(outgoing):
            work.wait()
            unpack_heads_to_seq_into(recv, out, groups, g)
        ctx.save_for_backward(*saved)
        ctx.mesh, ctx.kernel, ctx.schedule, ctx.scale, ctx.groups = mesh, kernel, schedule, scale, groups
        ctx.head_chunks, ctx.deterministic = head_chunks, deterministic
        ctx.shapes = (q.shape, k.shape)
        lse = torch.cat(lses, dim=1) if groups > 1 else lses[0]
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        refuse_double_backward()
        mesh, groups = ctx.mesh, ctx.groups
        world, comm = mesh.ulysses, mesh.ulysses_group
        saved = ctx.saved_tensors  # unpacked once: non-reentrant checkpointing allows one unpack per backward
        per_group = len(saved) // groups
        incoming = [start_all_to_all(pack_seq_to_heads(dout, world, groups, g), comm) for g in range(groups)]
        q_shape, kv_shape = ctx.shapes
        device, dtype = dout.device, saved[0].dtype
        grads = [torch.empty(q_shape, dtype=dtype, device=device)] + [
            torch.empty(kv_shape, dtype=dtype, device=device) for _ in range(2)]
        outgoing: List[list] = []
        for g in range(groups):
            q_g, k_g, v_g, out_g, lse_g, *last_kv = saved[g * per_group:(g + 1) * per_group]
            dout_g = _arrived(*incoming[g])
            block_grads = ring_backward(dout_g, q_g, k_g, v_g, out_g, lse_g, last_kv, mesh, ctx.kernel,
                                        ctx.schedule, ctx.scale, ctx.head_chunks, ctx.deterministic)
            outgoing.append([start_all_to_all(pack_heads_to_seq(t, world), comm) for t in block_grads])
        for g, trades in enumerate(outgoing):
            for (recv, work), dest in zip(trades, grads):
                work.wait()
                unpack_heads_to_seq_into(recv, dest, groups, g)
        return grads[0], grads[1], grads[2], None, None, None, None, None, None, None


def _arrived(recv: torch.Tensor, work) -> torch.Tensor:
    work.wait()
    return unpack_seq_to_heads(recv)
