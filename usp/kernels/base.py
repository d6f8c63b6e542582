"""The one small interface every attention kernel implements.

Shapes (legend used throughout usp): ``b`` batch, ``s_q``/``s_k`` query/key sequence length, ``h`` query heads,
``h_kv`` key/value heads (``h % h_kv == 0``; query head ``i`` reads KV head ``i // (h // h_kv)``), ``d`` head_dim.

* ``forward(q, k, v, causal, scale) -> (out, lse)``
  ``q [b, s_q, h, d]``, ``k, v [b, s_k, h_kv, d]`` (any strides with a contiguous last dim);
  ``out [b, s_q, h, d]`` in ``q.dtype``; ``lse [b, h, s_q]`` float32 (float64 for float64 inputs), the natural
  log of the softmax denominator of the *scaled* scores.
* ``backward(dout, q, k, v, out, lse, causal, scale) -> (dq, dk, dv)``
  gradients with the shapes of q, k, v. ``out`` and ``lse`` are the (possibly ring-merged) final output and LSE
  of the whole row; that is what makes block-wise backward exact.

``causal=True`` is only ever requested on square blocks (``s_q == s_k``), where top-left and bottom-right mask
alignment agree; the ring schedules guarantee this.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

Tensor = torch.Tensor


class AttentionKernel:
    """Base class: subclasses set ``name`` and implement ``forward``/``backward`` and ``unsupported_reason``."""

    name: str = "abstract"
    #: dtypes the kernel accepts
    dtypes: Tuple[torch.dtype, ...] = ()
    #: device types the kernel runs on ("cpu", "cuda")
    device_types: Tuple[str, ...] = ()

    def is_available(self) -> bool:
        """Whether the kernel's implementation can be imported/used in this process at all."""
        return True

    def unsupported_reason(self, device: torch.device, dtype: torch.dtype, head_dim: int) -> Optional[str]:
        """``None`` if the kernel handles this (device, dtype, head_dim); otherwise a human-readable reason."""
        if not self.is_available():
            return f"backend {self.name!r} is not available in this environment"
        if device.type not in self.device_types:
            return f"backend {self.name!r} runs on {'/'.join(self.device_types)}, not {device.type}"
        if dtype not in self.dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in self.dtypes)
            return f"backend {self.name!r} supports dtypes {names}, not {str(dtype).replace('torch.', '')}"
        return self._head_dim_reason(head_dim)

    def _head_dim_reason(self, head_dim: int) -> Optional[str]:
        return None

    def forward(self, q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> Tuple[Tensor, Tensor]:
        raise NotImplementedError

    def backward(
        self, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, causal: bool, scale: float
    ) -> Tuple[Tensor, Tensor, Tensor]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<attention kernel {self.name!r}>"


def head_dim_range_reason(name: str, head_dim: int, low: int, high: int, multiple: int) -> Optional[str]:
    if head_dim < low or head_dim > high or head_dim % multiple:
        return f"backend {name!r} supports head_dim in [{low}, {high}] divisible by {multiple}, got {head_dim}"
    return None
