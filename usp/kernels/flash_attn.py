"""The external flash-attn package, adapted once, here.

* FlashAttention-4 (``flash-attn-4``, module ``flash_attn.cute``; Hopper/Blackwell): fastest on H100 (~665 TFLOP/s
  fwd+bwd, ``benchmarks/RESULTS.md``, reference measurements). Native GQA, ``[b, s, h, d]`` layout, LSE
  ``[b, h, s]`` fp32.
* FlashAttention-2 (``flash_attn``): the same contract through ``flash_attn.flash_attn_interface``.

Only the private entry points' *documented* keyword arguments are used; nothing is introspected at run time.
"""
from __future__ import annotations

import functools
import importlib
from typing import Optional, Tuple

import torch

from .base import AttentionKernel, Mask, Tensor, as_mask, head_dim_range_reason

_HALF = (torch.bfloat16, torch.float16)


@functools.lru_cache(maxsize=None)
def _import_optional(module: str):
    """Import ``module`` once; ``None`` when it (or the CUDA stack it needs) is missing."""
    try:
        return importlib.import_module(module)
    except Exception:  # ImportError, or a CUDA/driver error raised while the package initialises
        return None


def _capability_major() -> int:
    return torch.cuda.get_device_capability()[0] if torch.cuda.is_available() else 0


class FlashAttn4Capabilities:
    """Where flash-attn-4 runs (shared by the dense and the varlen kernel): Hopper or newer, head_dim 8..256 (8..128
    past Hopper) in steps of 8, fp16/bf16. Its backward takes ``deterministic=True`` on SM 9x-11x (a fixed
    order for the dQ and GQA dK/dV accumulation)."""

    name = "fa4"
    dtypes = _HALF
    device_types = ("cuda",)
    supports_window = True  # window_size_left/right (None = unbounded)
    supports_softcap = True
    # A value head size other than q/k's (MLA): the dense kernel takes it without grouped K/V heads (MHA, as
    # DeepSeek V3 trains) -- flash-attn-4 4.0.0b36's SM90 backward asserts "GQA backward requires head_dim ==
    # head_dim_v" (seen on 2x H200, 2026-11-30); the varlen kernel has not run it on a GPU here: refused until it
    # has (the reference kernels do it)
    different_v_head_dim = False

    def _v_head_dim_reason(self, head_dim: int, v_head_dim: int, grouped: bool = False) -> Optional[str]:
        if grouped:  # asserted on SM90; not run on later GPUs here
            return (f"{self.label} {self.name!r} needs v's head_dim equal to q/k's ({head_dim} and {v_head_dim}) "
                    "when query heads share K/V heads (GQA/MQA): flash-attn-4's SM90 backward asserts it; "
                    "MHA (as many K/V heads as query heads) or backend='reference' run it")
        if _capability_major() == 9 or (head_dim, v_head_dim) == (192, 128):
            return head_dim_range_reason(self.name, v_head_dim, 8, 256, 8)
        return head_dim_range_reason(self.name, v_head_dim, 8, 128, 8)

    @staticmethod
    def _mask_kwargs(mask) -> dict:
        """flash-attn-4's mask arguments: ``causal`` for plain causal, else the window (None = unbounded)."""
        mask = as_mask(mask)
        if mask.causal:
            window = {}
        else:
            window = dict(window_size_left=None if mask.left == -1 else mask.left,
                          window_size_right=None if mask.right == -1 else mask.right)
        return dict(causal=mask.causal, softcap=mask.softcap or None, **window)

    @property
    def deterministic_backward(self) -> bool:
        return _capability_major() in (9, 10, 11)  # flash-attn-4 refuses deterministic=True on SM 12.x

    def _interface(self):
        return _import_optional("flash_attn.cute.interface")

    def is_available(self) -> bool:
        return torch.cuda.is_available() and _capability_major() >= 9 and self._interface() is not None

    def _head_dim_reason(self, head_dim: int) -> Optional[str]:
        high = 256 if _capability_major() == 9 else 128
        return head_dim_range_reason(self.name, head_dim, 8, high, 8)


class FlashAttn4Kernel(FlashAttn4Capabilities, AttentionKernel):
    different_v_head_dim = True  # without grouped K/V heads on SM90 (``_v_head_dim_reason``)

    # Note [kernel sinks]: ``learnable_sink`` adds the sink to the forward's denominator and LSE; the backward
    # forms dsinks from its own rowsum(dout * out) in the dQ post-processing kernel (one CTA per head, rows in a
    # fixed order: deterministic)
    supports_sinks = True

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float,
                sinks: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        result = self._interface()._flash_attn_fwd(q, k, v, softmax_scale=scale, return_lse=True,
                                                   learnable_sink=sinks, **self._mask_kwargs(mask))
        return result[0], result[1]

    def backward(self, dout, q, k, v, out, lse, mask, scale, deterministic=False, sinks=None):
        kwargs = self._mask_kwargs(mask)
        kwargs["softcap"] = kwargs["softcap"] or 0.0  # the backward takes a float
        grads = self._interface()._flash_attn_bwd(q, k, v, out, dout, lse, softmax_scale=scale,
                                                  deterministic=deterministic, learnable_sink=sinks, **kwargs)
        return tuple(grads[:3 if sinks is None else 4])


class FlashAttn2Capabilities:
    """Where flash-attn 2 runs (shared by the dense and the varlen kernel): CUDA, fp16/bf16, head_dim 8..256 in
    steps of 8 (a build may hold fewer head sizes: it then raises at the call). Its backward takes
    ``deterministic=True`` (a split dQ accumulator summed in a fixed order)."""

    name = "fa2"
    dtypes = _HALF
    device_types = ("cuda",)
    deterministic_backward = True
    supports_window = True  # window_size_left/right, bottom-right aligned
    supports_softcap = True  # forward and backward (flash-attn >= 2.6)

    def _interface(self):
        return _import_optional("flash_attn.flash_attn_interface")

    def is_available(self) -> bool:
        iface = self._interface()
        return torch.cuda.is_available() and iface is not None and hasattr(iface, "_flash_attn_forward")

    def _head_dim_reason(self, head_dim: int) -> Optional[str]:
        return head_dim_range_reason(self.name, head_dim, 8, 256, 8)


class FlashAttn2Kernel(FlashAttn2Capabilities, AttentionKernel):

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float) -> Tuple[Tensor, Tensor]:
        mask = as_mask(mask)
        out, lse, _, _ = self._interface()._flash_attn_forward(
            q, k, v, dropout_p=0.0, softmax_scale=scale, causal=mask.causal, window_size_left=mask.left,
            window_size_right=mask.right, softcap=mask.softcap, alibi_slopes=None, return_softmax=False,
        )
        return out, lse

    def backward(self, dout, q, k, v, out, lse, mask, scale, deterministic=False):
        mask = as_mask(mask)
        # lse must be contiguous (Note [kernel contract]): flash-attn 2 reads it by pointer as [b, h, s_q]
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        self._interface()._flash_attn_backward(
            dout, q, k, v, out, lse, dq, dk, dv, dropout_p=0.0, softmax_scale=scale, causal=mask.causal,
            window_size_left=mask.left, window_size_right=mask.right, softcap=mask.softcap, alibi_slopes=None,
            deterministic=deterministic,
        )
        return dq, dk, dv
