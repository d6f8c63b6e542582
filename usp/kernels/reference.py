"""Pure-PyTorch attention with LSE: runs anywhere (the CPU/CI path) and is the numerical reference.

Computes in float32 (float64 for float64 inputs) and rounds results to the input dtype, like a fused kernel.
GQA is handled by grouping query heads (``[b, s, h_kv, h // h_kv, d]`` views), never by expanding K/V.
"""
from __future__ import annotations

from typing import Tuple

import torch

from .base import AttentionKernel, Tensor


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _grouped(q: Tensor, kv_heads: int) -> Tensor:
    """[b, s, h, d] -> [b, s, h_kv, g, d] with g = h // h_kv query heads per KV head."""
    b, s, h, d = q.shape
    return q.reshape(b, s, kv_heads, h // kv_heads, d)


def _scores(q_grouped: Tensor, k: Tensor, causal: bool, scale: float) -> Tensor:
    """Scaled scores [b, h_kv, g, s_q, s_k], causal-masked on the (square) diagonal block."""
    scores = torch.einsum("bqngd,bknd->bngqk", q_grouped, k) * scale
    if causal:
        s_q, s_k = scores.shape[-2:]
        mask = torch.ones(s_q, s_k, dtype=torch.bool, device=scores.device).triu_(1)
        scores = scores.masked_fill(mask, float("-inf"))
    return scores


class ReferenceKernel(AttentionKernel):
    name = "reference"
    dtypes = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
    device_types = ("cpu", "cuda")
    deterministic_backward = True  # einsums and reductions in a fixed order, no atomics

    def forward(self, q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> Tuple[Tensor, Tensor]:
        b, s_q, h, d = q.shape
        kv_heads = k.shape[2]
        ct = _compute_dtype(q.dtype)
        scores = _scores(_grouped(q.to(ct), kv_heads), k.to(ct), causal, scale)
        lse = torch.logsumexp(scores, dim=-1)  # [b, h_kv, g, s_q]
        probs = torch.exp(scores - lse.unsqueeze(-1))
        out = torch.einsum("bngqk,bknd->bqngd", probs, v.to(ct)).reshape(b, s_q, h, d)
        return out.to(q.dtype), lse.reshape(b, h, s_q)

    def backward(
        self, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, causal: bool, scale: float,
        deterministic: bool = False,
    ) -> Tuple[Tensor, Tensor, Tensor]:
        b, s_q, h, d = q.shape
        kv_heads = k.shape[2]
        g = h // kv_heads
        ct = _compute_dtype(q.dtype)
        q_grouped = _grouped(q.to(ct), kv_heads)
        k_c, v_c = k.to(ct), v.to(ct)
        dout_grouped = _grouped(dout.to(ct), kv_heads)
        scores = _scores(q_grouped, k_c, causal, scale)
        lse_grouped = lse.to(ct).reshape(b, kv_heads, g, s_q, 1)
        probs = torch.exp(scores - lse_grouped)  # [b, h_kv, g, s_q, s_k]
        dv = torch.einsum("bngqk,bqngd->bknd", probs, dout_grouped)
        dprobs = torch.einsum("bqngd,bknd->bngqk", dout_grouped, v_c)
        # D_i = sum_j P_ij dP_ij = <dO_i, O_i>: the softmax Jacobian's row term, computed from the final output.
        row_dot = (dout_grouped * _grouped(out.to(ct), kv_heads)).sum(-1).permute(0, 2, 3, 1)  # [b, h_kv, g, s_q]
        dscores = probs * (dprobs - row_dot.unsqueeze(-1))
        dq = torch.einsum("bngqk,bknd->bqngd", dscores, k_c).reshape(b, s_q, h, d) * scale
        dk = torch.einsum("bngqk,bqngd->bknd", dscores, q_grouped) * scale
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
