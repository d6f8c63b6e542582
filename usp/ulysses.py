"""Ulysses x ring with the all-to-alls pipelined per head group, as one autograd function.

Note [head-group pipeline]. The heads each Ulysses rank receives are cut into ``G`` groups (``G = 2`` when the
query and K/V head counts allow it, else 1). Forward: every group's Q/K/V trades are posted up front (NCCL runs
them in order on its own stream), then for each group: wait for its inputs, run the ring attention, post its
output trade. So group ``g + 1``'s inputs arrive while group ``g`` computes, and group ``g``'s output leaves while
group ``g + 1`` computes; only the first input trade and the last output trade are exposed. Backward mirrors it
(dO trades up front; dQ/dK/dV trades posted as each group's ring backward finishes). ``G`` is
``usp.spec.head_groups``; the collective calls per layer are ``usp.spec.layer_collectives`` (forward ``4G``
all-to-alls, backward ``4G``; the ring's rotations per group and head chunk).
"""
from __future__ import annotations

from typing import List

import torch

from .comm.all_to_all import (pack_heads_to_seq, pack_seq_to_heads, start_all_to_all, unpack_heads_to_seq_into,
                              unpack_seq_to_heads)
from .ring import (_accumulator_dtype, kept_kv_shapes, refuse_double_backward, ring_backward, ring_forward,
                   saved_argument)
from .spec import head_groups  # noqa: F401 (the pipeline depth lives in usp.spec)


class UlyssesRingFunction(torch.autograd.Function):
    """``apply(q, k, v, mesh, kernel, schedule, scale, groups, head_chunks, deterministic, sinks)
    -> (out [b, s/P, h, dv], lse [b, h/U, s/R])``; no double backward (``usp.ring.refuse_double_backward``).
    ``sinks [h]`` (or None): Note [attention sinks] in ``usp.ring``, applied per head group; its gradient is
    this rank's partial sum over the rows it attends.

    ``k, v`` must already have a K/V head count divisible by ``U * groups * head_chunks`` (see ``usp.attention``).
    """

    @staticmethod
    def forward(ctx, q, k, v, mesh, kernel, schedule, scale, groups, head_chunks=1, deterministic=False, sinks=None):
        world, comm = mesh.ulysses, mesh.ulysses_group
        incoming = [[start_all_to_all(pack_seq_to_heads(x, world, groups, g), comm) for x in (q, k, v)]
                    for g in range(groups)]
        out = torch.empty(q.shape[:3] + v.shape[3:], dtype=q.dtype, device=q.device)
        outgoing, saved, lses = [], [], []
        for g in range(groups):
            q_g, k_g, v_g = (_arrived(recv, work) for recv, work in incoming[g])
            incoming[g] = None  # done with this group's work handles
            sinks_g = None if sinks is None else _group_sinks(sinks, mesh, groups, g)
            out_g, lse_g, last_kv = ring_forward(q_g, k_g, v_g, mesh, kernel, schedule, scale, head_chunks, sinks_g)
            outgoing.append(start_all_to_all(pack_heads_to_seq(out_g, world), comm))
            saved += [q_g, k_g, v_g, out_g, lse_g] + (last_kv if mesh.ring > 1 else [])
            lses.append(lse_g)
        for g, (recv, work) in enumerate(outgoing):
            work.wait()
            unpack_heads_to_seq_into(recv, out, groups, g)
        ctx.save_for_backward(*saved, sinks)
        ctx.mesh, ctx.kernel, ctx.schedule, ctx.scale, ctx.groups = mesh, kernel, schedule, scale, groups
        ctx.head_chunks, ctx.deterministic = head_chunks, deterministic
        ctx.shapes = (q.shape, k.shape, v.shape)
        lse = torch.cat(lses, dim=1) if groups > 1 else lses[0]
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def saved_layout(q, k, v, mesh, kernel, schedule, scale, groups, head_chunks=1, deterministic=False,
                     sinks=None):
        """What ``forward`` saves, in order, from shapes alone, as ``usp.ring.RingAttentionFunction.saved_layout``
        says it: per head group the traded ``q, k, v [b, s*U, heads/(U*groups), .]``, the group's ``out`` and
        ``lse`` and its ring's ``last_kv``, then ``sinks``."""
        world = mesh.ulysses

        def traded(x):
            b, s, h, d = x.shape
            return (b, s * world, h // (world * groups), d)

        q_g, k_g, v_g = traded(q), traded(k), traded(v)
        b, s, h, _ = q_g
        group = [("new", q_g, q.dtype), ("new", k_g, k.dtype), ("new", v_g, v.dtype),
                 ("new", (b, s, h, v_g[3]), q.dtype), ("new", (b, h, s), _accumulator_dtype(q.dtype))]
        group += [("new", shape, k.dtype) for shape in kept_kv_shapes(k_g, v_g, mesh, schedule, head_chunks)]
        return group * groups + [saved_argument("sinks", sinks)]

    @staticmethod
    def backward(ctx, dout, _dlse):
        refuse_double_backward()
        mesh, groups = ctx.mesh, ctx.groups
        world, comm = mesh.ulysses, mesh.ulysses_group
        *saved, sinks = ctx.saved_tensors  # unpacked once: non-reentrant checkpointing allows one unpack
        per_group = len(saved) // groups
        incoming = [start_all_to_all(pack_seq_to_heads(dout, world, groups, g), comm) for g in range(groups)]
        q_shape, k_shape, v_shape = ctx.shapes
        device, dtype = dout.device, saved[0].dtype
        grads = [torch.empty(shape, dtype=dtype, device=device) for shape in (q_shape, k_shape, v_shape)]
        dsinks = torch.zeros_like(sinks) if sinks is not None and ctx.needs_input_grad[10] else None
        outgoing: List[list] = []
        for g in range(groups):
            q_g, k_g, v_g, out_g, lse_g, *last_kv = saved[g * per_group:(g + 1) * per_group]
            dout_g = _arrived(*incoming[g])
            sinks_g = None if sinks is None else _group_sinks(sinks, mesh, groups, g)
            *block_grads, dsinks_g = ring_backward(dout_g, q_g, k_g, v_g, out_g, lse_g, last_kv, mesh, ctx.kernel,
                                                   ctx.schedule, ctx.scale, ctx.head_chunks, ctx.deterministic,
                                                   sinks_g, sinks_grad=dsinks is not None)
            if dsinks is not None:
                _group_sinks(dsinks, mesh, groups, g).copy_(dsinks_g)
            outgoing.append([start_all_to_all(pack_heads_to_seq(t, world), comm) for t in block_grads])
        for g, trades in enumerate(outgoing):
            for (recv, work), dest in zip(trades, grads):
                work.wait()
                unpack_heads_to_seq_into(recv, dest, groups, g)
        return grads[0], grads[1], grads[2], None, None, None, None, None, None, None, dsinks


def _group_sinks(sinks: torch.Tensor, mesh, groups: int, g: int) -> torch.Tensor:
    """The sinks ``[h]`` of the query heads this Ulysses rank attends in group ``g`` (a view)."""
    world = mesh.ulysses
    return sinks.view(world, groups, -1)[mesh.ulysses_rank, g]


def _arrived(recv: torch.Tensor, work) -> torch.Tensor:
    work.wait()
    return unpack_seq_to_heads(recv)
