"""Ring attention: Q stays, K/V (and in backward dK/dV) travel round the ring; one loop for every variant.

The schedule (``usp.layout``) says which block each step computes; the kernel (``usp.kernels``) computes it.
Forward: ``R - 1`` K/V rotations, each started before the current step's compute (double-buffered), partial results
merged in float32 (``usp.merge``). Backward: the same K/V rotation plus the dK/dV accumulators of the visiting block
travelling one step behind in float32 (``R`` rotations): step ``i`` computes the block gradient while the previous
rank's partial dK/dV for it is still arriving. Block backward uses the *final* merged out and LSE, which is what
makes it exact.
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


def _contiguous_copy(x: Tensor, dtype: torch.dtype) -> Tensor:
    """A new contiguous tensor of ``dtype`` holding ``x`` (one pass; ours to send and to accumulate into)."""
    return torch.empty(x.shape, dtype=dtype, device=x.device).copy_(x)


def _accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _rows(x: Tensor, rows: slice) -> Tensor:
    """Row (sequence) slice of a ``[b, s, ...]`` tensor."""
    return x if rows == slice(None) else x[:, rows]


def _lse_rows(lse: Tensor, rows: slice) -> Tensor:
    return lse if rows == slice(None) else lse[:, :, rows]


def _rotation(mesh: SequenceParallelMesh, tag: int) -> RingRotation:
    return RingRotation(mesh.ring_group, mesh.ring_next_global_rank, mesh.ring_prev_global_rank, tag)


def ring_forward(
    q: Tensor, k: Tensor, v: Tensor, mesh: SequenceParallelMesh, kernel: AttentionKernel, schedule, scale: float,
    rotations: Optional[List[RingRotation]] = None,
) -> Tuple[Tensor, Tensor]:
    """Local ``q [b, s, h, d]``, ``k, v [b, s, h_kv, d]`` (this ring rank's sequence) -> ``(out, lse)``."""
    ring_size, ring_rank, local_len = mesh.ring, mesh.ring_rank, q.shape[1]
    kv = [k, v] if ring_size == 1 else [k.contiguous(), v.contiguous()]
    rotation = _rotation(mesh, _KV_TAG)
    if rotations is not None:
        rotations.append(rotation)
    out: Optional[Tensor] = None
    lse: Optional[Tensor] = None
    for step in range(ring_size):
        if step + 1 < ring_size:
            rotation.start(kv)
        task = schedule.block(step, ring_rank, ring_size, local_len)
        if task is not None:
            block_out, block_lse = kernel.forward(
                _rows(q, task.q_rows), _rows(kv[0], task.kv_rows), _rows(kv[1], task.kv_rows), task.causal, scale
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
    return out.to(q.dtype), lse


def ring_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, mesh: SequenceParallelMesh,
    kernel: AttentionKernel, schedule, scale: float, rotations: Optional[List[RingRotation]] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    ring_size, ring_rank, local_len = mesh.ring, mesh.ring_rank, q.shape[1]
    if ring_size == 1:
        task = schedule.block(0, 0, 1, local_len)
        return kernel.backward(dout, q, k, v, out, lse, task.causal, scale)
    acc = _accumulator_dtype(q.dtype)
    kv = [k.contiguous(), v.contiguous()]
    kv_rotation, dkv_rotation = _rotation(mesh, _KV_TAG), _rotation(mesh, _DKV_TAG)
    if rotations is not None:
        rotations.extend([kv_rotation, dkv_rotation])
    dq: Optional[Tensor] = None
    dkv: List[Tensor] = []
    for step in range(ring_size):
        if step + 1 < ring_size:
            kv_rotation.start(kv)
        task = schedule.block(step, ring_rank, ring_size, local_len)
        if task is not None:
            block_dq, block_dk, block_dv = kernel.backward(
                _rows(dout, task.q_rows), _rows(q, task.q_rows), _rows(kv[0], task.kv_rows),
                _rows(kv[1], task.kv_rows), _rows(out, task.q_rows), _lse_rows(lse, task.q_rows), task.causal, scale,
            )
        if step == 0:
            assert task is not None and task.q_rows == slice(None) and task.kv_rows == slice(None)
            dq = _contiguous_copy(block_dq, acc)
            dkv = [_contiguous_copy(block_dk, acc), _contiguous_copy(block_dv, acc)]
        else:
            if task is not None:
                _rows(dq, task.q_rows).add_(block_dq)
            sent = dkv
            dkv = dkv_rotation.wait()  # the previous rank's partial dK/dV of the block we now hold
            dkv_rotation.recycle(sent)
            if task is not None:
                _rows(dkv[0], task.kv_rows).add_(block_dk)
                _rows(dkv[1], task.kv_rows).add_(block_dv)
        dkv_rotation.start(dkv)
        if step + 1 < ring_size:
            received = kv_rotation.wait()
            if step > 0:
                kv_rotation.recycle(kv)
            kv = received
    dk, dv = dkv_rotation.wait()  # our own block, with every rank's contribution
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class RingAttentionFunction(torch.autograd.Function):
    """Autograd wrapper: ``apply(q, k, v, mesh, kernel, schedule, scale) -> (out, lse)``; lse not differentiable."""

    @staticmethod
    def forward(ctx, q, k, v, mesh, kernel, schedule, scale):
        out, lse = ring_forward(q, k, v, mesh, kernel, schedule, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.mesh, ctx.kernel, ctx.schedule, ctx.scale = mesh, kernel, schedule, scale
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = ring_backward(dout, q, k, v, out, lse, ctx.mesh, ctx.kernel, ctx.schedule, ctx.scale)
        return dq, dk, dv, None, None, None, None
