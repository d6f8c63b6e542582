"""The one small interface every attention kernel implements, and its written contract.

Shapes (legend used throughout usp): ``b`` batch, ``s_q``/``s_k`` query/key sequence length, ``h`` query heads,
``h_kv`` key/value heads (``h % h_kv == 0``; query head ``i`` reads KV head ``i // (h // h_kv)``), ``d`` head_dim.

* ``forward(q, k, v, causal, scale) -> (out, lse)``
* ``backward(dout, q, k, v, out, lse, causal, scale, deterministic=False) -> (dq, dk, dv)``
  ``out`` and ``lse`` are the (possibly ring-merged) final output and LSE of the whole row; that is what makes
  block-wise backward exact.

Note [kernel contract]. What a kernel may receive and must return; callers (the ring loop ``usp.ring`` and the
varlen block adapter ``usp.kernels.varlen.VarlenBlockKernel``) guarantee the inputs, adapters may rely on them and
nothing more. ``usp.kernels.contract`` checks every point, and the CPU tests run every schedule through it.

=========  ====================  ======================================  ==========================================
argument   shape                 dtype                                   strides
=========  ====================  ======================================  ==========================================
q          ``[b, s_q, h, d]``    fp16/bf16/fp32/fp64 (kernel's dtypes)   last dim contiguous (``stride(-1) == 1``);
                                                                         other strides arbitrary: row and head
                                                                         slices of a larger tensor are views
k, v       ``[b, s_k, h_kv, d]`` ``q.dtype``                             as q
out        ``[b, s_q, h, d]``    ``q.dtype``                             as q (backward input)
dout       ``[b, s_q, h, d]``    ``q.dtype``                             as q
lse        ``[b, h, s_q]``       float32 (float64 for float64 inputs)    **contiguous** (backward input): kernels
                                                                         such as flash-attn 2 read it by pointer
                                                                         as a dense ``[b, h, s_q]`` array
=========  ====================  ======================================  ==========================================

Returned: ``out`` ``[b, s_q, h, d]`` in ``q.dtype`` with ``stride(-1) == 1``; ``lse`` ``[b, h, s_q]`` float32
(float64 for float64 inputs), contiguous, the natural log of the softmax denominator of the *scaled* scores;
``dq, dk, dv`` with the shapes and dtypes of ``q, k, v`` and ``stride(-1) == 1``. All on ``q.device``.
``causal=True`` is only ever requested on square blocks (``s_q == s_k``), where top-left and bottom-right mask
alignment agree; the ring schedules guarantee this. ``deterministic=True`` is only passed to kernels whose
``deterministic_backward`` is set: the backward must then give bitwise-identical gradients for identical inputs.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

Tensor = torch.Tensor


class KernelCapabilities:
    """What every kernel family shares: a name, the dtypes and device types it runs, and why it cannot run an input.

    ``label`` names the family in messages ("backend" for dense kernels, "varlen backend" for packed ones).
    """

    name: str = "abstract"
    label: str = "backend"
    #: dtypes the kernel accepts
    dtypes: Tuple[torch.dtype, ...] = ()
    #: device types the kernel runs on ("cpu", "cuda")
    device_types: Tuple[str, ...] = ()
    #: whether ``backward(..., deterministic=True)`` gives bitwise-repeatable gradients (Note [kernel contract])
    deterministic_backward: bool = False

    def is_available(self) -> bool:
        """Whether the kernel's implementation can be imported/used in this process at all."""
        return True

    def unsupported_reason(self, device: torch.device, dtype: torch.dtype, head_dim: int,
                           deterministic: bool = False) -> Optional[str]:
        """``None`` if the kernel handles this (device, dtype, head_dim, deterministic backward); otherwise a
        human-readable reason."""
        reason = self._input_reason(device, dtype, head_dim)
        if reason is None and deterministic and not self.deterministic_backward:
            reason = f"{self.label} {self.name!r} has no deterministic backward{self._nondeterminism_note()}"
        return reason

    def _input_reason(self, device: torch.device, dtype: torch.dtype, head_dim: int) -> Optional[str]:
        if not self.is_available():
            return f"{self.label} {self.name!r} is not available in this environment"
        if device.type not in self.device_types:
            return f"{self.label} {self.name!r} runs on {'/'.join(self.device_types)}, not {device.type}"
        if dtype not in self.dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in self.dtypes)
            return f"{self.label} {self.name!r} supports dtypes {names}, not {str(dtype).replace('torch.', '')}"
        return self._head_dim_reason(head_dim)

    def _head_dim_reason(self, head_dim: int) -> Optional[str]:
        return None

    def _nondeterminism_note(self) -> str:
        """Why there is no deterministic backward (appended to the refusal), if there is more to say."""
        return ""

    def __repr__(self) -> str:
        return f"<{self.label} {self.name!r}>"


class AttentionKernel(KernelCapabilities):
    """Dense kernels: subclasses set ``name`` and implement ``forward``/``backward`` (module docstring)."""

    def forward(self, q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> Tuple[Tensor, Tensor]:
        raise NotImplementedError

    def backward(
        self, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, causal: bool, scale: float,
        deterministic: bool = False,
    ) -> Tuple[Tensor, Tensor, Tensor]:
        raise NotImplementedError


class WrappedKernelCapabilities:
    """For kernels that wrap another (``self.kernel``): every capability is the wrapped kernel's."""

    kernel: KernelCapabilities

    def _wrap(self, kernel: KernelCapabilities, prefix: str) -> None:
        self.kernel = kernel
        self.name = f"{prefix}{kernel.name}"
        self.dtypes, self.device_types = kernel.dtypes, kernel.device_types

    @property
    def deterministic_backward(self) -> bool:
        return self.kernel.deterministic_backward

    def is_available(self) -> bool:
        return self.kernel.is_available()

    def unsupported_reason(self, device, dtype, head_dim, deterministic=False):
        return self.kernel.unsupported_reason(device, dtype, head_dim, deterministic)


def resolve_kernel(backend, registry: dict, kind: type, device, dtype: torch.dtype, head_dim: int, what: str,
                   deterministic: bool = False):
    """The kernel for ``backend`` ("auto", a name in ``registry`` or an instance of ``kind``); ``what`` names
    the path in messages. ``deterministic``: the kernel must have a deterministic backward ("auto" skips those
    without). Raises ValueError naming the valid values, or why the kernel cannot run this input."""
    device = torch.device(device)
    if isinstance(backend, kind):
        reason = backend.unsupported_reason(device, dtype, head_dim, deterministic)
        if reason:
            raise ValueError(f"backend: {reason}")
        return backend
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str or {kind.__module__}.{kind.__name__}, got {type(backend).__name__}")
    if backend == "auto":
        reasons = []
        for kernel in registry.values():
            reason = kernel.unsupported_reason(device, dtype, head_dim, deterministic)
            if reason is None:
                return kernel
            reasons.append(reason)
        raise ValueError(f"backend='auto' found no {what} kernel for this input: " + "; ".join(reasons))
    if backend not in registry:
        raise ValueError(
            f"backend={backend!r} has no {what} kernel; valid values for the {what} path: 'auto', "
            + ", ".join(map(repr, registry))
        )
    kernel = registry[backend]
    reason = kernel.unsupported_reason(device, dtype, head_dim, deterministic)
    if reason:
        available = [name for name, k in registry.items() if k.is_available()]
        if deterministic:
            able = [name for name, k in registry.items() if k.is_available() and k.deterministic_backward]
            raise ValueError(f"backend={backend!r} cannot run deterministic=True here: {reason}; available "
                             f"backends with a deterministic backward: {able} (or pass deterministic=False)")
        raise ValueError(f"backend={backend!r} cannot run here: {reason}; available: {available}")
    return kernel


def head_dim_range_reason(name: str, head_dim: int, low: int, high: int, multiple: int) -> Optional[str]:
    if head_dim < low or head_dim > high or head_dim % multiple:
        return f"backend {name!r} supports head_dim in [{low}, {high}] divisible by {multiple}, got {head_dim}"
    return None
