"""Kernels that enforce Note [kernel contract] (``usp.kernels.base``): wrap any kernel to reject what the contract
forbids, in its inputs and in the wrapped kernel's results.

``ContractCheckingKernel(kernel)`` (dense) and ``ContractCheckingVarlenKernel(kernel)`` (packed) behave exactly like
``kernel`` and raise ``KernelContractError`` naming the argument and the broken rule. The CPU tests run every
schedule (causal and not, head chunks, Ulysses x ring, packed documents) through them around the reference kernels,
so a caller that hands a kernel something the contract does not promise fails there, on CPU, instead of inside an
adapter that happens to tolerate it. Pass one as ``backend=`` to debug a new adapter on a GPU.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch

from .base import AttentionKernel, Mask, Tensor, WrappedKernelCapabilities
from .varlen import VarlenKernel, VarlenSeqs

__all__ = ["ContractCheckingKernel", "ContractCheckingVarlenKernel", "KernelContractError"]


class KernelContractError(AssertionError):
    """A kernel received, or returned, something Note [kernel contract] forbids (a bug in usp, not user input)."""


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fail(kernel_name: str, message: str) -> None:
    raise KernelContractError(f"kernel contract broken around {kernel_name!r}: {message}")


def _check_tensor(kernel_name: str, name: str, t, shape: Sequence[int], dtype: torch.dtype, device: torch.device,
                  contiguous: bool) -> None:
    if not isinstance(t, torch.Tensor):
        _fail(kernel_name, f"{name} is a {type(t).__name__}, not a tensor")
    if tuple(t.shape) != tuple(shape):
        _fail(kernel_name, f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    if t.dtype != dtype:
        _fail(kernel_name, f"{name} has dtype {t.dtype}, expected {dtype}")
    if t.device != device:
        _fail(kernel_name, f"{name} is on {t.device}, expected {device}")
    if contiguous and not t.is_contiguous():
        _fail(kernel_name, f"{name} must be contiguous, got strides {t.stride()} for shape {tuple(t.shape)}")
    if t.numel() and t.stride(-1) != 1:
        _fail(kernel_name, f"{name} must have a contiguous last dim (stride(-1) == 1), got strides {t.stride()}")


def _check_mask(kernel, mask, s_q: int, s_k: int, what: str = "block") -> Mask:
    """Note [block mask]: a ``Mask`` (or the older causal bool); plain causal only on square blocks; a window only
    to kernels that support one, on a trimmed block (every query row sees a key, every key row is seen); softcap
    only to kernels that support it."""
    name = kernel.name
    if isinstance(mask, bool):
        mask = Mask(-1, 0 if mask else -1)
    if not isinstance(mask, Mask):
        _fail(name, f"mask must be a usp.kernels.Mask (or a causal bool), got {type(mask).__name__}")
    if mask.causal and s_q != s_k:
        _fail(name, f"causal=True on a non-square {what} ({s_q} query rows, {s_k} key rows)")
    if mask.windowed:
        if not kernel.supports_window:
            _fail(name, f"{mask} has a window but the kernel does not support windows")
        if (mask.right != -1 and mask.right < s_q - s_k) or (mask.left != -1 and mask.left < s_k - s_q):
            _fail(name, f"{mask} on an untrimmed {what} ({s_q} query rows, {s_k} key rows): some query row sees "
                        "no key or some key row is seen by no query")
    if mask.softcap and not kernel.supports_softcap:
        _fail(name, f"{mask} has a softcap but the kernel does not support it")
    return mask


def _sinks_kwargs(sinks) -> dict:
    """``sinks`` as a keyword only when given: kernels without sink support need not take the argument."""
    return {} if sinks is None else {"sinks": sinks}


class ContractCheckingKernel(WrappedKernelCapabilities, AttentionKernel):
    """A dense kernel that checks Note [kernel contract] on every call and then runs ``kernel``."""

    def __init__(self, kernel: AttentionKernel, native_sinks: bool = True):
        self._wrap(kernel, "contract_checked_")
        #: False: claim no sink support even when ``kernel`` has it (the ring then applies the sinks around the
        #: kernel: the CPU tests run both paths of Note [attention sinks] on one kernel)
        self._native_sinks = native_sinks

    @property
    def supports_sinks(self) -> bool:
        return self._native_sinks and self.kernel.supports_sinks

    def _check_sinks(self, sinks, q) -> None:
        """Note [kernel sinks]: only to kernels with ``supports_sinks``; ``[h]`` contiguous, the LSE's dtype."""
        if sinks is None:
            return
        if not self.supports_sinks:
            _fail(self.kernel.name, "sinks passed to a kernel without sink support")
        _check_tensor(self.kernel.name, "sinks", sinks, (q.shape[2],), _lse_dtype(q.dtype), q.device, contiguous=True)

    def _check_qkv(self, q, k, v, causal) -> Tuple[int, int, int, int, int, int]:
        name = self.kernel.name
        if not isinstance(q, torch.Tensor) or q.ndim != 4:
            _fail(name, f"q must be a 4-D [b, s_q, h, d] tensor, got {getattr(q, 'shape', q)}")
        b, s_q, h, d = q.shape
        if not isinstance(k, torch.Tensor) or k.ndim != 4:
            _fail(name, f"k must be a 4-D [b, s_k, h_kv, d] tensor, got {getattr(k, 'shape', k)}")
        s_k, h_kv = k.shape[1], k.shape[2]
        if h_kv == 0 or h % h_kv:
            _fail(name, f"query heads {h} must be a multiple of K/V heads {h_kv}")
        if not isinstance(v, torch.Tensor) or v.ndim != 4:
            _fail(name, f"v must be a 4-D [b, s_k, h_kv, dv] tensor, got {getattr(v, 'shape', v)}")
        dv = v.shape[3]
        if dv != d and not self.kernel.different_v_head_dim:
            _fail(name, f"v head_dim {dv} != q/k head_dim {d} but the kernel needs them equal")
        _check_tensor(name, "q", q, (b, s_q, h, d), q.dtype, q.device, contiguous=False)
        _check_tensor(name, "k", k, (b, s_k, h_kv, d), q.dtype, q.device, contiguous=False)
        _check_tensor(name, "v", v, (b, s_k, h_kv, dv), q.dtype, q.device, contiguous=False)
        _check_mask(self.kernel, causal, s_q, s_k)
        return b, s_q, h, dv, s_k, h_kv

    def forward(self, q: Tensor, k: Tensor, v: Tensor, causal, scale: float, sinks=None) -> Tuple[Tensor, Tensor]:
        b, s_q, h, d, _, _ = self._check_qkv(q, k, v, causal)
        self._check_sinks(sinks, q)
        out, lse = self.kernel.forward(q, k, v, causal, scale, **_sinks_kwargs(sinks))
        name = self.kernel.name
        _check_tensor(name, "returned out", out, (b, s_q, h, d), q.dtype, q.device, contiguous=False)
        _check_tensor(name, "returned lse", lse, (b, h, s_q), _lse_dtype(q.dtype), q.device, contiguous=True)
        return out, lse

    def backward(self, dout, q, k, v, out, lse, causal, scale, deterministic=False, sinks=None):
        b, s_q, h, d, s_k, h_kv = self._check_qkv(q, k, v, causal)
        self._check_sinks(sinks, q)
        name = self.kernel.name
        for arg, t in (("out", out), ("dout", dout)):
            _check_tensor(name, arg, t, (b, s_q, h, d), q.dtype, q.device, contiguous=False)
        _check_tensor(name, "lse", lse, (b, h, s_q), _lse_dtype(q.dtype), q.device, contiguous=True)
        if deterministic and not self.kernel.deterministic_backward:
            _fail(name, "deterministic=True passed to a kernel without a deterministic backward")
        grads = self.kernel.backward(dout, q, k, v, out, lse, causal, scale, deterministic=deterministic,
                                     **_sinks_kwargs(sinks))
        if len(grads) != (3 if sinks is None else 4):
            _fail(name, f"backward returned {len(grads)} tensors, expected {3 if sinks is None else 4}")
        for arg, t, like in zip(("dq", "dk", "dv", "dsinks"), grads, (q, k, v, sinks)):
            _check_tensor(name, f"returned {arg}", t, tuple(like.shape), like.dtype, q.device, contiguous=False)
        return grads

    def __repr__(self) -> str:
        return f"<contract-checked {self.kernel!r}>"


class ContractCheckingVarlenKernel(WrappedKernelCapabilities, VarlenKernel):
    """A varlen kernel that checks the packed form of Note [kernel contract] and then runs ``kernel``: ``q [t_q, h,
    d]``, ``k, v [t_k, h_kv, d]`` (rows of ``seqs``), last dim contiguous; ``lse [h, t_q]`` contiguous; plain causal
    only where every sequence with both queries and keys is square, a window only on trimmed sequences
    (``usp.kernels.varlen``)."""

    def __init__(self, kernel: VarlenKernel):
        self._wrap(kernel, "contract_checked_")

    def _check_qkv(self, q, k, v, seqs, causal):
        name = self.kernel.name
        if not isinstance(seqs, VarlenSeqs):
            _fail(name, f"seqs must be a VarlenSeqs, got {type(seqs).__name__}")
        if not isinstance(q, torch.Tensor) or q.ndim != 3 or not isinstance(k, torch.Tensor) or k.ndim != 3:
            _fail(name, "q, k, v must be 3-D packed [t, heads, d] tensors")
        t_q, h, d = q.shape
        h_kv = k.shape[1]
        if h_kv == 0 or h % h_kv:
            _fail(name, f"query heads {h} must be a multiple of K/V heads {h_kv}")
        if t_q != seqs.total_q or k.shape[0] != seqs.total_k:
            _fail(name, f"q/k rows ({t_q}, {k.shape[0]}) do not match the sequences ({seqs.total_q}, {seqs.total_k})")
        dv = v.shape[2] if isinstance(v, torch.Tensor) and v.ndim == 3 else d
        if dv != d and not self.kernel.different_v_head_dim:
            _fail(name, f"v head_dim {dv} != q/k head_dim {d} but the kernel needs them equal")
        _check_tensor(name, "q", q, (t_q, h, d), q.dtype, q.device, contiguous=False)
        _check_tensor(name, "k", k, (seqs.total_k, h_kv, d), q.dtype, q.device, contiguous=False)
        _check_tensor(name, "v", v, (seqs.total_k, h_kv, dv), q.dtype, q.device, contiguous=False)
        mask = _check_mask(self.kernel, causal, 0, 0, "call")
        if mask.causal and any(a != b for a, b in zip(seqs.q_lengths, seqs.k_lengths) if a and b):
            _fail(name, f"causal mask on a sequence whose query and key lengths differ: {seqs}")
        if mask.windowed:  # every sequence trimmed (an empty side is fine: its rows are fixed up)
            for s_q, s_k in zip(seqs.q_lengths, seqs.k_lengths):
                if s_q and s_k:
                    _check_mask(self.kernel, mask, s_q, s_k, "sequence")
        return t_q, h, dv

    def forward(self, q, k, v, seqs, causal, scale):
        t_q, h, d = self._check_qkv(q, k, v, seqs, causal)
        out, lse = self.kernel.forward(q, k, v, seqs, causal, scale)
        name = self.kernel.name
        _check_tensor(name, "returned out", out, (t_q, h, d), q.dtype, q.device, contiguous=False)
        _check_tensor(name, "returned lse", lse, (h, t_q), _lse_dtype(q.dtype), q.device, contiguous=True)
        return out, lse

    def backward(self, dout, q, k, v, out, lse, seqs, causal, scale, deterministic=False):
        t_q, h, d = self._check_qkv(q, k, v, seqs, causal)
        name = self.kernel.name
        for arg, t in (("out", out), ("dout", dout)):
            _check_tensor(name, arg, t, (t_q, h, d), q.dtype, q.device, contiguous=False)
        _check_tensor(name, "lse", lse, (h, t_q), _lse_dtype(q.dtype), q.device, contiguous=True)
        if deterministic and not self.kernel.deterministic_backward:
            _fail(name, "deterministic=True passed to a kernel without a deterministic backward")
        grads = self.kernel.backward(dout, q, k, v, out, lse, seqs, causal, scale, deterministic=deterministic)
        for arg, t, like in zip(("dq", "dk", "dv"), grads, (q, k, v)):
            _check_tensor(name, f"returned {arg}", t, tuple(like.shape), like.dtype, q.device, contiguous=False)
        return grads

    def __repr__(self) -> str:
        return f"<contract-checked {self.kernel!r}>"
