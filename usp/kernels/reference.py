"""Pure-PyTorch attention with LSE: runs anywhere (the CPU/CI path) and is the numerical reference.

Every mask option (Note [block mask] in ``base.py``: windows, softcap), sinks (Note [kernel sinks]) and a value
head size different from the query/key one (MLA) are supported.

Computes in float32 (float64 for float64 inputs) and rounds results to the input dtype, like a fused kernel.
GQA is handled by grouping query heads (``[b, s, h_kv, h // h_kv, d]`` views), never by expanding K/V.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .base import AttentionKernel, Mask, Tensor, as_mask


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _grouped(q: Tensor, kv_heads: int) -> Tensor:
    """[b, s, h, d] -> [b, s, h_kv, g, d] with g = h // h_kv query heads per KV head."""
    b, s, h, d = q.shape
    return q.reshape(b, s, kv_heads, h // kv_heads, d)


def window_allowed(s_q: int, s_k: int, mask: Mask, device) -> "Tensor | None":
    """Bool ``[s_q, s_k]``: which keys each query row sees under ``mask``'s window (bottom-right aligned, Note
    [block mask]); ``None`` when every key is seen."""
    if mask.left == -1 and mask.right == -1:
        return None
    rel = torch.arange(s_k, device=device)[None, :] - torch.arange(s_q, device=device)[:, None] - (s_k - s_q)
    allowed = torch.ones(s_q, s_k, dtype=torch.bool, device=device)
    if mask.left != -1:
        allowed &= rel >= -mask.left
    if mask.right != -1:
        allowed &= rel <= mask.right
    return allowed


def softcapped(raw: Tensor, softcap: float) -> Tuple[Tensor, "Tensor | None"]:
    """``(scores, tanh)``: ``softcap * tanh(raw / softcap)`` and the tanh (for the backward), or ``raw`` unchanged."""
    if not softcap:
        return raw, None
    t = torch.tanh(raw / softcap)
    return softcap * t, t


def _scores(q_grouped: Tensor, k: Tensor, mask: Mask, scale: float):
    """Scaled (softcapped) scores [b, h_kv, g, s_q, s_k] with ``mask`` applied, and the tanh of the softcap."""
    scores, t = softcapped(torch.einsum("bqngd,bknd->bngqk", q_grouped, k) * scale, mask.softcap)
    allowed = window_allowed(scores.shape[-2], scores.shape[-1], mask, scores.device)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    return scores, t


def _softmax(scores: Tensor, lse: Tensor) -> Tensor:
    """``exp(scores - lse)``, 0 where a row sees no key (``lse = -inf``)."""
    return torch.exp(scores - lse).nan_to_num_(nan=0.0)


class ReferenceKernel(AttentionKernel):
    name = "reference"
    dtypes = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
    device_types = ("cpu", "cuda")
    deterministic_backward = True  # einsums and reductions in a fixed order, no atomics
    supports_window = True
    supports_softcap = True
    different_v_head_dim = True
    supports_sinks = True

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float,
                sinks: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        mask = as_mask(mask)
        b, s_q, h, d = q.shape
        kv_heads, dv = k.shape[2], v.shape[3]
        ct = _compute_dtype(q.dtype)
        scores, _ = _scores(_grouped(q.to(ct), kv_heads), k.to(ct), mask, scale)
        lse = torch.logsumexp(scores, dim=-1)  # [b, h_kv, g, s_q]
        if sinks is not None:  # one more logit per head in the denominator, with no value
            lse = torch.logaddexp(lse, sinks.to(ct).reshape(1, kv_heads, h // kv_heads, 1))
        probs = _softmax(scores, lse.unsqueeze(-1))
        out = torch.einsum("bngqk,bknd->bqngd", probs, v.to(ct)).reshape(b, s_q, h, dv)
        return out.to(q.dtype), lse.reshape(b, h, s_q)

    def backward(
        self, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, mask: Mask, scale: float,
        deterministic: bool = False, sinks: Optional[Tensor] = None,
    ) -> Tuple[Tensor, ...]:
        mask = as_mask(mask)
        b, s_q, h, d = q.shape
        kv_heads = k.shape[2]
        g = h // kv_heads
        ct = _compute_dtype(q.dtype)
        q_grouped = _grouped(q.to(ct), kv_heads)
        k_c, v_c = k.to(ct), v.to(ct)
        dout_grouped = _grouped(dout.to(ct), kv_heads)
        scores, tanh = _scores(q_grouped, k_c, mask, scale)
        lse_grouped = lse.to(ct).reshape(b, kv_heads, g, s_q, 1)
        probs = _softmax(scores, lse_grouped)  # [b, h_kv, g, s_q, s_k]
        dv = torch.einsum("bngqk,bqngd->bknd", probs, dout_grouped)
        dprobs = torch.einsum("bqngd,bknd->bngqk", dout_grouped, v_c)
        # D_i = sum_j P_ij dP_ij = <dO_i, O_i>: the softmax Jacobian's row term, computed from the final output.
        row_dot = (dout_grouped * _grouped(out.to(ct), kv_heads)).sum(-1).permute(0, 2, 3, 1)  # [b, h_kv, g, s_q]
        dscores = probs * (dprobs - row_dot.unsqueeze(-1))
        if tanh is not None:  # d softcap*tanh(x/softcap) / dx = 1 - tanh^2
            dscores = dscores * (1 - tanh * tanh)
        dq = torch.einsum("bngqk,bknd->bqngd", dscores, k_c).reshape(b, s_q, h, d) * scale
        dk = torch.einsum("bngqk,bqngd->bknd", dscores, q_grouped) * scale
        grads = (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype))
        if sinks is None:
            return grads
        # the sink's probability exp(sink - lse) times its dP - D with dP = 0 (no value): -p_sink * D, summed over rows
        sink_probs = torch.exp(sinks.to(ct).reshape(1, kv_heads, g, 1) - lse_grouped.squeeze(-1))
        dsinks = -(sink_probs * row_dot).sum(dim=(0, 3)).reshape(h)
        return grads + (dsinks.to(sinks.dtype),)
