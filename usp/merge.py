"""Merging partial attention results by their log-sum-exp (the online-softmax update), in place.

For one query row with partial results ``(o1, l1)`` over key set A and ``(o2, l2)`` over a disjoint set B,
attention over A ∪ B is ``l = logaddexp(l1, l2)`` and ``o = o1 + w * (o2 - o1)`` with ``w = exp(l2 - l)``
(equivalently ``sigmoid(l2 - l1)``, the form credited to ring-flash-attention PR #34). Both exponents are ≤ 0, so
nothing overflows; rows that have seen no key yet (``l = -inf``) take the other side whole.

The arithmetic is float32 (float64 for float64 inputs) whatever the storage dtype of ``out``: a bf16 ``out``
is widened, merged and rounded once. On CUDA the fused kernel of ``csrc/`` does that in one pass (built on first
use, see ``usp._csrc``); elsewhere, or if it cannot be built, PyTorch element-wise ops compute the same function.
"""
from __future__ import annotations

import torch

from ._csrc import fused_merge_op

_FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def merge_attention_(out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor) -> None:
    """Merge ``(block_out, block_lse)`` into the accumulators ``(out, lse)`` in place.

    Args:
        out: ``[b, s, h, d]`` accumulator, any float dtype (merged in float32 and rounded once when narrower);
            may be a view (e.g. a row or head slice) with a contiguous last dim.
        lse: ``[b, h, s]`` float32/float64 accumulator, may be a view.
        block_out: ``[b, s, h, d]`` partial output of the new block, any float dtype.
        block_lse: ``[b, h, s]`` its log-sum-exp.
    """
    if _fusable(out, lse, block_out, block_lse):
        op = fused_merge_op()
        if op is not None:
            op(out, lse, block_out, block_lse)
            return
    merge_attention_reference_(out, lse, block_out, block_lse)


def merge_attention_reference_(out, lse, block_out, block_lse) -> None:
    """The PyTorch implementation of ``merge_attention_`` (any device; also the fused kernel's test oracle)."""
    new_lse = torch.logaddexp(lse, block_lse.to(lse.dtype))
    # share of the new block; NaN only where both sides are -inf (no keys yet): keep the accumulator there
    weight = torch.exp(block_lse.to(lse.dtype) - new_lse).nan_to_num_(nan=0.0)
    math_dtype = torch.promote_types(out.dtype, lse.dtype)
    weight = weight.transpose(1, 2).unsqueeze(-1).to(math_dtype)
    if out.dtype == math_dtype:
        out.lerp_(block_out.to(math_dtype), weight)
    else:
        out.copy_(out.to(math_dtype).lerp_(block_out.to(math_dtype), weight))
    lse.copy_(new_lse)


def _fusable(out, lse, block_out, block_lse) -> bool:
    return (
        out.is_cuda and out.dim() == 4 and out.shape == block_out.shape
        and out.dtype in _FUSED_DTYPES and block_out.dtype in _FUSED_DTYPES
        and lse.dtype == torch.float32 and block_lse.dtype == torch.float32
        and out.stride(-1) == 1 and block_out.stride(-1) == 1
    )
