"""Ring attention: Q stays, K/V (and in backward dK/dV) travel round the ring; one loop for every variant.

The schedule (``usp.layout``) says which block each step computes; the kernel (``usp.kernels``) computes it.
Forward: ``R - 1`` K/V rotations, each started before the current step's compute (double-buffered), partial results
merged in float32 (``usp.merge``). Backward (Note [reverse backward] below): the forward's steps in
reverse, K/V (``R - 2`` rotations) and the float32 dK/dV partial sums (``R - 1``) travelling the other way round,
every transfer overlapping a block's compute. Block backward uses the *final* merged out and LSE, which is what makes it
exact.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from .comm.p2p import RingRotation
from .kernels.base import AttentionKernel
from .merge import merge_attention_
from .mesh import SequenceParallelMesh

Tensor = torch.Tensor
_KV_TAG, _DKV_TAG = 0, 1


def _accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _rows(x: Tensor, rows: slice) -> Tensor:
    """Row (sequence) slice of a ``[b, s, ...]`` tensor."""
    return x if rows == slice(None) else x[:, rows]


def _lse_rows(lse: Tensor, rows: slice) -> Tensor:
    return lse if rows == slice(None) else lse[:, :, rows]


def _rotation(mesh: SequenceParallelMesh, tag: int, forward: bool = True) -> RingRotation:
    """K/V go to the next ring rank in forward; the backward walks the ring the other way."""
    nxt, prev = mesh.ring_next_global_rank, mesh.ring_prev_global_rank
    return RingRotation(mesh.ring_group, nxt if forward else prev, prev if forward else nxt, tag)


def ring_forward(
    q: Tensor, k: Tensor, v: Tensor, mesh: SequenceParallelMesh, kernel: AttentionKernel, schedule, scale: float
) -> Tuple[Tensor, Tensor, List[Tensor]]:
    """Local ``q [b, s, h, d]``, ``k, v [b, s, h_kv, d]`` (this ring rank's sequence) -> ``(out, lse, last_kv)``.

    ``last_kv`` is the K/V block held at the last step (ring rank ``r + 1``'s); the backward starts from it.
    """
    ring_size, ring_rank, local_len = mesh.ring, mesh.ring_rank, q.shape[1]
    kv = [k, v] if ring_size == 1 else [k.contiguous(), v.contiguous()]
    rotation = _rotation(mesh, _KV_TAG)
    out: Optional[Tensor] = None
    lse: Optional[Tensor] = None
    for step in range(ring_size):
        if step + 1 < ring_size:
            rotation.start(kv)
        task = schedule.block(step, ring_rank, ring_size, local_len)
        if task is not None:
            block_out, block_lse = kernel.forward(
                _rows(q, task.q_rows), _rows(kv[0], task.kv_rows), _rows(kv[1], task.kv_rows), task.kernel_mask, scale
            )
            if out is None:
                # step 0 always covers every row: keep the kernel's result as is (no copy when R == 1)
                assert task.q_rows == slice(None)
                out, lse = block_out, block_lse
            else:
                if out.dtype != _accumulator_dtype(q.dtype):
                    out = out.to(_accumulator_dtype(q.dtype))
                merge_attention_(_rows(out, task.q_rows), _lse_rows(lse, task.q_rows), block_out, block_lse)
        if step + 1 < ring_size:
            received = rotation.wait()
            if step > 0:
                rotation.recycle(kv)  # our own receive buffer, sent and computed on: reuse it
            kv = received
    return out.to(q.dtype), lse, kv


def ring_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, last_kv: List[Tensor],
    mesh: SequenceParallelMesh, kernel: AttentionKernel, schedule, scale: float,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``ring_forward``, walking the forward's steps in reverse.

    Note [reverse backward]. Step ``j`` of the forward computed this rank's queries against ring rank
    ``r - j``'s K/V. The backward visits ``j = R-1, ..., 0``: it starts on ``last_kv`` (kept by the forward, so no
    transfer is waited for), passes K/V to the *previous* rank, and the float32 dK/dV partial sums of each block
    follow one step behind in the same direction. At ``j = 0`` the block is our own (no K/V to receive), and the
    partial sum that arrives carries every other rank's contribution: ``R - 2`` K/V and ``R - 1`` dK/dV transfers,
    and the last one overlaps the diagonal block's compute instead of trailing it.
    """
    ring_size, ring_rank, local_len = mesh.ring, mesh.ring_rank, q.shape[1]
    if ring_size == 1:
        task = schedule.block(0, 0, 1, local_len)
        return kernel.backward(dout, q, k, v, out, lse, task.kernel_mask, scale)
    acc = _accumulator_dtype(q.dtype)
    kv_rotation = _rotation(mesh, _KV_TAG, forward=False)
    dkv_rotation = _rotation(mesh, _DKV_TAG, forward=False)
    kv = last_kv
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dkv: List[Tensor] = []
    for step in range(ring_size - 1, -1, -1):
        if step > 1:  # step 0 computes on our own K/V: nothing to receive for it
            kv_rotation.start(kv)
        blocks = (k, v) if step == 0 else kv  # at step 0 the block is our own K/V
        task = schedule.block(step, ring_rank, ring_size, local_len)
        if task is not None:
            block_dq, block_dk, block_dv = kernel.backward(
                _rows(dout, task.q_rows), _rows(q, task.q_rows), _rows(blocks[0], task.kv_rows),
                _rows(blocks[1], task.kv_rows), _rows(out, task.q_rows), _lse_rows(lse, task.q_rows),
                task.kernel_mask, scale,
            )
            _rows(dq, task.q_rows).add_(block_dq)
        if step == ring_size - 1:
            dkv = [torch.zeros(k.shape, dtype=acc, device=k.device), torch.zeros(v.shape, dtype=acc, device=v.device)]
        else:
            sent = dkv
            dkv = dkv_rotation.wait()  # partial dK/dV of the block we hold, from the ranks that saw it later
            dkv_rotation.recycle(sent)
        if task is not None:
            _rows(dkv[0], task.kv_rows).add_(block_dk)
            _rows(dkv[1], task.kv_rows).add_(block_dv)
        if step > 0:
            dkv_rotation.start(dkv)
        if step > 1:
            received = kv_rotation.wait()
            if step < ring_size - 1:
                kv_rotation.recycle(kv)
            kv = received
    return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype)


class RingAttentionFunction(torch.autograd.Function):
    """Autograd wrapper: ``apply(q, k, v, mesh, kernel, schedule, scale) -> (out, lse)``; lse not differentiable."""

    @staticmethod
    def forward(ctx, q, k, v, mesh, kernel, schedule, scale):
        out, lse, last_kv = ring_forward(q, k, v, mesh, kernel, schedule, scale)
        saved_kv = last_kv if mesh.ring > 1 else []
        ctx.save_for_backward(q, k, v, out, lse, *saved_kv)
        ctx.mesh, ctx.kernel, ctx.schedule, ctx.scale = mesh, kernel, schedule, scale
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, *last_kv = ctx.saved_tensors
        dq, dk, dv = ring_backward(dout, q, k, v, out, lse, last_kv, ctx.mesh, ctx.kernel, ctx.schedule, ctx.scale)
        return dq, dk, dv, None, None, None, None
