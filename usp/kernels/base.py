"""The one small interface every attention kernel implements, and its written contract.

Shapes (legend used throughout usp): ``b`` batch, ``s_q``/``s_k`` query/key sequence length, ``h`` query heads,
``h_kv`` key/value heads (``h % h_kv == 0``; query head ``i`` reads KV head ``i // (h // h_kv)``), ``d`` head_dim.

* ``forward(q, k, v, mask, scale, sinks=None) -> (out, lse)``
* ``backward(dout, q, k, v, out, lse, mask, scale, deterministic=False, sinks=None) -> (dq, dk, dv)``, and
  ``(dq, dk, dv, dsinks)`` when ``sinks`` is given
  ``out`` and ``lse`` are the (possibly ring-merged) final output and LSE of the whole row; that is what makes
  block-wise backward exact. ``mask`` is a ``Mask`` (Note [block mask]); a bool is read as ``Mask.causal_mask()`` /
  ``Mask.full()`` for callers of the older form. ``sinks`` (Note [kernel sinks]) only reaches kernels whose
  ``supports_sinks`` is set.

Note [kernel contract]. What a kernel may receive and must return; callers (the ring loop ``usp.ring`` and the
varlen block adapter ``usp.kernels.varlen.VarlenBlockKernel``) guarantee the inputs, adapters may rely on them and
nothing more. ``usp.kernels.contract`` checks every point, and the CPU tests run every schedule through it.

=========  ====================  ======================================  ==========================================
argument   shape                 dtype                                   strides
=========  ====================  ======================================  ==========================================
q          ``[b, s_q, h, d]``    fp16/bf16/fp32/fp64 (kernel's dtypes)   last dim contiguous (``stride(-1) == 1``);
                                                                         other strides arbitrary: row and head
                                                                         slices of a larger tensor are views
k          ``[b, s_k, h_kv, d]`` ``q.dtype``                             as q
v          ``[b, s_k, h_kv, dv]````q.dtype`` (``dv != d``: MLA, only to     as q
                                 kernels with ``different_v_head_dim``)
out        ``[b, s_q, h, dv]``   ``q.dtype``                             as q (backward input)
dout       ``[b, s_q, h, dv]``   ``q.dtype``                             as q
lse        ``[b, h, s_q]``       float32 (float64 for float64 inputs)    **contiguous** (backward input): kernels
                                                                         such as flash-attn 2 read it by pointer
                                                                         as a dense ``[b, h, s_q]`` array
sinks      ``[h]``               float32 (float64 for float64 inputs)    contiguous
=========  ====================  ======================================  ==========================================

Returned: ``out`` ``[b, s_q, h, dv]`` in ``q.dtype`` with ``stride(-1) == 1``; ``lse`` ``[b, h, s_q]`` float32
(float64 for float64 inputs), contiguous, the natural log of the softmax denominator of the *scaled* scores;
``dq, dk, dv`` with the shapes and dtypes of ``q, k, v`` and ``stride(-1) == 1``; ``dsinks`` ``[h]`` in
``sinks.dtype``. All on ``q.device``.
Plain causal (``Mask(left=-1, right=0)``) is only ever requested on square blocks (``s_q == s_k``), where
top-left and bottom-right mask alignment agree; the ring schedules guarantee this. A finite window is only requested
on blocks trimmed so that every query row sees at least one key and every key row is seen by at least one query
(``usp.layout.WindowSchedule``); a window (``left``/``right`` not -1) or ``softcap`` only reaches kernels whose
``supports_window`` / ``supports_softcap`` is set (``resolve_kernel`` refuses the others).

Note [kernel sinks]. With ``sinks`` the call's softmax denominator of every row of head ``i`` gets ``exp(sinks[i])``
(a logit with no value, Note [attention sinks] in ``usp/ring.py``): the returned ``out`` and ``lse`` include it.
The backward receives the row's final ``out``/``lse`` (sink included, like any merged row) and returns besides the
block gradients ``dsinks[i] = -sum over this call's rows of exp(sinks[i] - lse) * <dout, out>``. The ring passes
the sinks to one call per row (the calls that cover each row once: the own block), so neither the forward's
rescaling nor the backward's ``<dout, out>`` costs a pass of its own when a kernel fuses them (flash-attn-4 does).

Note [block mask]. ``Mask(left, right, softcap)`` says which keys of *this block* each query row sees, in the
block's own coordinates, bottom-right aligned like flash-attn: with ``s_q`` query and ``s_k`` key rows, query ``i``
sees key ``j`` iff ``i + s_k - s_q - left <= j <= i + s_k - s_q + right`` (a bound of -1 is unbounded). Causal is
``right == 0``. ``softcap > 0`` replaces every scaled score ``x`` by ``softcap * tanh(x / softcap)`` before the
softmax. The global mask (a window over *global* token positions) is turned into one ``Mask`` per sub-block by the
ring schedule, which shifts the window by the offset between the block's query and key positions and trims rows
that see nothing. ``deterministic=True`` is only passed to kernels whose
``deterministic_backward`` is set: the backward must then give bitwise-identical gradients for identical inputs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

Tensor = torch.Tensor


@dataclass(frozen=True)
class Mask:
    """The mask of one kernel call (Note [block mask]): bottom-right aligned window ``(left, right)`` in the block's
    own rows (-1 = unbounded; ``right == 0`` is causal) and the logit ``softcap`` (0 = off). Frozen and hashable.

    Not a bool on purpose: ``if mask:`` raises, so a kernel written for the older ``causal`` flag cannot silently
    compute plain causal attention for a window."""

    left: int = -1
    right: int = -1
    softcap: float = 0.0

    def __post_init__(self):
        for name in ("left", "right"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < -1:
                raise ValueError(f"Mask.{name} must be an int >= -1 (-1 = unbounded), got {value!r}")
        if not (isinstance(self.softcap, (int, float)) and self.softcap >= 0):
            raise ValueError(f"Mask.softcap must be a float >= 0, got {self.softcap!r}")

    @classmethod
    def causal_mask(cls, softcap: float = 0.0) -> "Mask":
        return cls(-1, 0, softcap)

    @classmethod
    def full(cls, softcap: float = 0.0) -> "Mask":
        return cls(-1, -1, softcap)

    @property
    def causal(self) -> bool:
        """Plain causal: no left bound, right bound 0 (what kernels without window support can run)."""
        return self.left == -1 and self.right == 0

    @property
    def windowed(self) -> bool:
        """A window beyond plain causal/full: needs a kernel with ``supports_window``."""
        return self.left != -1 or self.right > 0

    def __bool__(self):
        raise TypeError("a usp Mask is not a bool: read mask.causal / mask.left / mask.right / mask.softcap")


def as_mask(mask) -> Mask:
    """``mask`` as a ``Mask``: a bool is the older ``causal`` flag (True: causal, False: full)."""
    if isinstance(mask, Mask):
        return mask
    if isinstance(mask, bool):
        return Mask(-1, 0 if mask else -1)
    raise TypeError(f"a kernel's mask must be a usp.kernels.Mask (or a causal bool), got {type(mask).__name__}")


@dataclass(frozen=True)
class MaskNeeds:
    """What a call asks of a kernel beyond (device, dtype, head_dim): a sliding window, a logit softcap, a value
    head size different from the query/key one (MLA). ``resolve_kernel`` refuses kernels that lack one."""

    window: bool = False
    softcap: bool = False
    v_head_dim: Optional[int] = None  # set when it differs from head_dim
    #: query heads share K/V heads (GQA/MQA): some kernels take a different v head size only without it
    grouped: bool = False

    def describe(self) -> str:
        parts = [name for name, on in (("window_size", self.window), ("softcap", self.softcap)) if on]
        if self.v_head_dim is not None:
            parts.append(f"v head_dim {self.v_head_dim} != q/k head_dim")
        return ", ".join(parts)


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
    #: Note [block mask]: whether the kernel takes a finite window / a logit softcap / a value head size that
    #: differs from the query/key head size (MLA)
    supports_window: bool = False
    supports_softcap: bool = False
    different_v_head_dim: bool = False
    #: Note [kernel sinks]: whether forward/backward take ``sinks`` (else the ring applies them around the kernel)
    supports_sinks: bool = False

    def is_available(self) -> bool:
        """Whether the kernel's implementation can be imported/used in this process at all."""
        return True

    def unsupported_reason(self, device: torch.device, dtype: torch.dtype, head_dim: int,
                           deterministic: bool = False, needs: Optional[MaskNeeds] = None) -> Optional[str]:
        """``None`` if the kernel handles this (device, dtype, head_dim, deterministic backward, ``needs``);
        otherwise a human-readable reason."""
        reason = self._input_reason(device, dtype, head_dim)
        if reason is None and deterministic and not self.deterministic_backward:
            reason = f"{self.label} {self.name!r} has no deterministic backward{self._nondeterminism_note()}"
        if reason is None and needs is not None:
            reason = self._needs_reason(needs, head_dim)
        return reason

    def _needs_reason(self, needs: MaskNeeds, head_dim: int) -> Optional[str]:
        lacking = []
        if needs.window and not self.supports_window:
            lacking.append("window_size (sliding window)")
        if needs.softcap and not self.supports_softcap:
            lacking.append("softcap")
        if lacking:
            return f"{self.label} {self.name!r} does not support {' or '.join(lacking)}"
        if needs.v_head_dim is not None:
            if not self.different_v_head_dim:
                return (f"{self.label} {self.name!r} needs v's head_dim equal to q/k's (got {head_dim} and "
                        f"{needs.v_head_dim}: multi-head latent attention)")
            return self._v_head_dim_reason(head_dim, needs.v_head_dim, needs.grouped)
        return None

    def _v_head_dim_reason(self, head_dim: int, v_head_dim: int, grouped: bool = False) -> Optional[str]:
        return None

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

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float,
                sinks: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        raise NotImplementedError

    def backward(
        self, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, mask: Mask, scale: float,
        deterministic: bool = False, sinks: Optional[Tensor] = None,
    ) -> Tuple[Tensor, ...]:
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

    @property
    def supports_window(self) -> bool:
        return self.kernel.supports_window

    @property
    def supports_softcap(self) -> bool:
        return self.kernel.supports_softcap

    @property
    def different_v_head_dim(self) -> bool:
        return self.kernel.different_v_head_dim

    @property
    def supports_sinks(self) -> bool:
        return self.kernel.supports_sinks

    def is_available(self) -> bool:
        return self.kernel.is_available()

    def unsupported_reason(self, device, dtype, head_dim, deterministic=False, needs=None):
        return self.kernel.unsupported_reason(device, dtype, head_dim, deterministic, needs)


def resolve_kernel(backend, registry: dict, kind: type, device, dtype: torch.dtype, head_dim: int, what: str,
                   deterministic: bool = False, needs: Optional[MaskNeeds] = None):
    """The kernel for ``backend`` ("auto", a name in ``registry`` or an instance of ``kind``); ``what`` names
    the path in messages. ``deterministic``: the kernel must have a deterministic backward ("auto" skips those
    without); ``needs``: the mask options and head sizes it must support (likewise). Raises ValueError naming the
    valid values, or why the kernel cannot run this input and the backends that can."""
    device = torch.device(device)
    if needs is not None and needs == MaskNeeds():
        needs = None
    if isinstance(backend, kind):
        reason = backend.unsupported_reason(device, dtype, head_dim, deterministic, needs)
        if reason:
            if needs is not None and backend._needs_reason(needs, head_dim) is not None:
                able = [name for name, k in registry.items() if k._needs_reason(needs, head_dim) is None]
                reason += f"; backends that can run {needs.describe()}: {able}"
            raise ValueError(f"backend: {reason}")
        return backend
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str or {kind.__module__}.{kind.__name__}, got {type(backend).__name__}")
    if backend == "auto":
        reasons = []
        for kernel in registry.values():
            reason = kernel.unsupported_reason(device, dtype, head_dim, deterministic, needs)
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
    if reason is None and needs is not None:
        reason = kernel.unsupported_reason(device, dtype, head_dim, deterministic, needs)
        if reason:
            able = [name for name, k in registry.items() if k._needs_reason(needs, head_dim) is None]
            raise ValueError(f"backend={backend!r} cannot run {needs.describe()}: {reason}; backends that can: "
                             f"{able} (or backend='auto')")
    if reason:
        available = [name for name, k in registry.items() if k.is_available()]
        if deterministic:
            able = [name for name, k in registry.items() if k.is_available() and k.deterministic_backward]
            raise ValueError(f"backend={backend!r} cannot run deterministic=True here: {reason}; available "
                             f"backends with a deterministic backward: {able} (or pass deterministic=False)")
        raise ValueError(f"backend={backend!r} cannot run here: {reason}; available: {available}")
    return kernel


def plain_causal(mask, name: str) -> bool:
    """The causal flag of ``mask`` for a kernel without window/softcap support; raises if ``mask`` needs more (a
    caller bug: ``resolve_kernel`` refuses such kernels for such masks), so nothing silently runs plain causal."""
    mask = as_mask(mask)
    if mask.windowed or mask.softcap:
        raise ValueError(f"backend {name!r} supports no window/softcap but was given {mask}")
    return mask.causal


def flash_window(mask: Mask) -> Tuple[bool, int, int]:
    """``(causal, window_size_left, window_size_right)`` in flash-attn's convention (-1 = unbounded)."""
    return mask.causal, mask.left, mask.right


def head_dim_range_reason(name: str, head_dim: int, low: int, high: int, multiple: int) -> Optional[str]:
    if head_dim < low or head_dim > high or head_dim % multiple:
        return f"backend {name!r} supports head_dim in [{low}, {high}] divisible by {multiple}, got {head_dim}"
    return None
