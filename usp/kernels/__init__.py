"""Attention kernels behind one interface (see ``base.py``) and the backend choice.

Backends, fastest first on H100 (``benchmarks/RESULTS.md``): ``"fa4"`` (flash-attn-4), ``"fa2"`` (flash-attn 2.x),
``"cudnn"``, ``"torch_flash"``, then ``"reference"`` (pure PyTorch, any device, fp64/fp32/bf16/fp16).
``"auto"`` takes the first one that supports the device, dtype and head_dim; ``resolve_backend`` tells which.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Union

import torch

from .base import AttentionKernel, Mask, MaskNeeds, resolve_kernel
from .flash_attn import FlashAttn2Kernel, FlashAttn4Kernel
from .reference import ReferenceKernel
from .sdpa import CudnnKernel, TorchFlashKernel

__all__ = ["AttentionKernel", "BACKENDS", "Mask", "MaskNeeds", "available_backends", "resolve_backend"]

#: every backend by name, in "auto" preference order
BACKENDS: Dict[str, AttentionKernel] = {
    kernel.name: kernel
    for kernel in (FlashAttn4Kernel(), FlashAttn2Kernel(), CudnnKernel(), TorchFlashKernel(), ReferenceKernel())
}


def available_backends() -> List[str]:
    """Names of the backends usable in this process (importable, with a device they run on)."""
    return [name for name, kernel in BACKENDS.items() if kernel.is_available()]


def resolve_backend(
    backend: Union[str, AttentionKernel], device: torch.device, dtype: torch.dtype, head_dim: int,
    deterministic: bool = False, needs: Optional[MaskNeeds] = None,
) -> AttentionKernel:
    """Return the kernel for ``backend`` ("auto", a name of ``BACKENDS`` or an ``AttentionKernel``).

    Raises ValueError naming the valid values if the name is unknown, or why the backend cannot run
    ``(device, dtype, head_dim)`` (with a deterministic backward if ``deterministic``; "auto" then picks the
    fastest backend that has one).
    """
    return resolve_kernel(backend, BACKENDS, AttentionKernel, device, dtype, head_dim, "dense", deterministic, needs)
