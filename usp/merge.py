"""Merging partial attention results by their log-sum-exp (the online-softmax update), in place.

For one query row with partial results ``(o1, l1)`` over key set A and ``(o2, l2)`` over a disjoint set B,
attention over A ∪ B is ``l = logaddexp(l1, l2)`` and ``o = o1 + w * (o2 - o1)`` with ``w = exp(l2 - l)``
(equivalently ``sigmoid(l2 - l1)``, the form credited to ring-flash-attention PR #34). Both exponents are ≤ 0, so
nothing overflows; rows that have seen no key yet (``l = -inf``) take the other side whole.
"""
from __future__ import annotations

import torch


def merge_attention_(out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor) -> None:
    """Merge ``(block_out, block_lse)`` into the accumulators ``(out, lse)`` in place.

    Args:
        out: ``[b, s, h, d]`` accumulator (float32/float64), may be a view (e.g. a row slice).
        lse: ``[b, h, s]`` accumulator, same dtype family, may be a view.
        block_out: ``[b, s, h, d]`` partial output of the new block, any float dtype.
        block_lse: ``[b, h, s]`` its log-sum-exp.
    """
    new_lse = torch.logaddexp(lse, block_lse.to(lse.dtype))
    # share of the new block; NaN only where both sides are -inf (no keys yet): keep the accumulator there
    weight = torch.exp(block_lse.to(lse.dtype) - new_lse).nan_to_num_(nan=0.0)
    out.lerp_(block_out.to(out.dtype), weight.transpose(1, 2).unsqueeze(-1).to(out.dtype))
    lse.copy_(new_lse)
