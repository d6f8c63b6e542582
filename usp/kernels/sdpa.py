"""Kernels reached through PyTorch's private SDPA ops: cuDNN attention and the built-in FlashAttention-2.

Both ops take ``[b, h, s, d]``; we pass ``transpose(1, 2)`` views of our ``[b, s, h, d]`` tensors (no copies)
and transpose the results back. Argument orders are pinned here, once (they differ between the two ops).
"""
from __future__ import annotations

import contextlib
from typing import Optional, Tuple

import torch

from .base import AttentionKernel, Tensor, head_dim_range_reason, plain_causal

_HALF = (torch.bfloat16, torch.float16)


def _bhsd(x: Tensor) -> Tensor:
    return x.transpose(1, 2)


class CudnnKernel(AttentionKernel):
    """``aten._scaled_dot_product_cudnn_attention``: ~580 TFLOP/s fwd+bwd on H100 (``benchmarks/RESULTS.md``,
    reference measurements)."""

    name = "cudnn"
    dtypes = _HALF
    device_types = ("cuda",)

    def is_available(self) -> bool:
        return torch.cuda.is_available() and hasattr(torch.ops.aten, "_scaled_dot_product_cudnn_attention")

    def _head_dim_reason(self, head_dim: int) -> Optional[str]:
        return head_dim_range_reason(self.name, head_dim, 8, 256, 8)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> Tuple[Tensor, Tensor]:
        causal = plain_causal(causal, self.name)  # no window/softcap: resolve_kernel refuses them
        result = torch.ops.aten._scaled_dot_product_cudnn_attention(
            _bhsd(q), _bhsd(k), _bhsd(v), None, True, 0.0, causal, False, scale=scale
        )
        out, lse = result[0], result[1]
        return out.transpose(1, 2), lse.reshape(lse.shape[0], lse.shape[1], lse.shape[2])

    def _nondeterminism_note(self) -> str:
        return " (PyTorch's cuDNN attention entry point has no deterministic option)"

    def backward(self, dout, q, k, v, out, lse, causal, scale, deterministic=False):
        causal = plain_causal(causal, self.name)
        assert not deterministic, "cudnn has no deterministic backward: resolve_kernel refuses it"
        b, s_q, h, _ = q.shape
        s_k = k.shape[1]
        philox = torch.zeros((), dtype=torch.int64, device=q.device)
        dq, dk, dv = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            _bhsd(dout), _bhsd(q), _bhsd(k), _bhsd(v), _bhsd(out), lse.unsqueeze(-1),
            philox, philox, None, None, None, s_q, s_k, 0.0, causal, scale=scale,
        )
        return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


@contextlib.contextmanager
def torch_deterministic_algorithms(enabled: bool):
    """PyTorch's flash-attention backward is deterministic exactly when ``torch.use_deterministic_algorithms(True,
    warn_only=False)`` is in force (aten's ``_flash_attention_backward`` reads that flag); set it around one call
    and restore the caller's setting."""
    if not enabled:
        yield
        return
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(True, warn_only=False)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


class TorchFlashKernel(AttentionKernel):
    """``aten._scaled_dot_product_flash_attention`` (FlashAttention-2 inside PyTorch): ~320 TFLOP/s on H100."""

    name = "torch_flash"
    dtypes = _HALF
    device_types = ("cuda",)
    deterministic_backward = True

    def is_available(self) -> bool:
        return torch.cuda.is_available() and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention")

    def _head_dim_reason(self, head_dim: int) -> Optional[str]:
        return head_dim_range_reason(self.name, head_dim, 8, 256, 8)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> Tuple[Tensor, Tensor]:
        causal = plain_causal(causal, self.name)  # no window/softcap: resolve_kernel refuses them
        result = torch.ops.aten._scaled_dot_product_flash_attention(
            _bhsd(q), _bhsd(k), _bhsd(v), 0.0, causal, False, scale=scale
        )
        return result[0].transpose(1, 2), result[1]

    def backward(self, dout, q, k, v, out, lse, causal, scale, deterministic=False):
        causal = plain_causal(causal, self.name)
        s_q, s_k = q.shape[1], k.shape[1]
        philox = torch.zeros(2, dtype=torch.int64, device=q.device)  # unused: dropout is 0
        # cum_seq_q/k undefined (None) selects the dense, non-varlen path
        with torch_deterministic_algorithms(deterministic):
            dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
                _bhsd(dout), _bhsd(q), _bhsd(k), _bhsd(v), _bhsd(out), lse,
                None, None, s_q, s_k, 0.0, causal, philox, philox, scale=scale,
            )
        return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)
