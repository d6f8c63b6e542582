"""Variable-length (packed documents) attention kernels, and the adapter that runs them inside the ring loop.

Two levels. Shapes: ``t_q``/``t_k`` packed query/key rows, ``h``/``h_kv`` heads, ``d`` head_dim (legend of
``base.py``).

* ``VarlenKernel``: one call over packed sequences, the contract of ``flash_attn_varlen_func``.
  ``forward(q, k, v, seqs, mask, scale) -> (out, lse)``: ``q [t_q, h, d]``, ``k, v [t_k, h_kv, d]``,
  ``out [t_q, h, d]`` in ``q.dtype``, ``lse [h, t_q]`` float32 (float64 for float64 inputs).
  ``backward(dout, q, k, v, out, lse, seqs, mask, scale, deterministic=False) -> (dq, dk, dv)``.
  Strides as in Note [kernel contract] (``base.py``): every tensor's last dim contiguous, ``lse`` (backward input)
  contiguous.
  Query sequence ``i`` (rows ``seqs.cu_q[i]:seqs.cu_q[i+1]``) attends key sequence ``i`` only. ``mask`` is one
  ``Mask`` (Note [block mask]) for every sequence of the call, bottom-right aligned *per sequence* like
  flash-attn's varlen ``window_size``: query ``i`` of a sequence with ``q_len`` rows and ``k_len`` keys sees key
  ``j`` iff ``i + k_len - q_len - left <= j <= i + k_len - q_len + right`` (-1: unbounded; causal is
  ``(-1, 0)``). usp asks for plain causal only where every sequence with both queries and keys is square (where
  top-left and bottom-right agree), and for a window only on sequences trimmed as Note [kernel contract] says
  (every query row sees a key, every key row is seen). Sequences may be empty on either side.
* ``VarlenBlockKernel``: an ``AttentionKernel`` (what ``usp.ring`` calls) whose ``causal`` argument is a
  ``VarlenBlock``, the varlen calls that make up one ring block (built by ``usp.varlen``). It takes the ring's
  ``[1, s, h, d]`` row slices, runs the calls on row ranges of them, merges calls that share query rows, and
  enforces the empty-sequence semantics whatever a kernel writes there: rows of a query sequence with no keys come
  out as ``out = 0``, ``lse = -inf``, ``dq = 0``; rows of a key sequence with no queries get ``dk = dv = 0``.

Backends, in "auto" order: ``"fa4"`` (flash-attn-4 ``_flash_attn_fwd/_bwd`` with ``cu_seqlens_q/k``), ``"fa2"``
(flash-attn 2 ``_flash_attn_varlen_forward/_backward``), ``"torch_flash"`` (``aten._flash_attention_forward/_backward`` with ``cum_seq_q/k``, FlashAttention-2 in PyTorch),
``"cudnn"`` (``aten._cudnn_attention_forward/_backward`` with ``cum_seq_q/k``, PyTorch's ragged cuDNN path; torch
>= 2.14 only, see Note [cuDNN ragged attention]) and ``"reference"`` (pure PyTorch, any device and dtype: CPU/CI).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from ..merge import merge_attention_
from .base import (AttentionKernel, KernelCapabilities, Mask, MaskNeeds, Tensor, WrappedKernelCapabilities, as_mask,
                   head_dim_range_reason, plain_causal, resolve_kernel)
from .flash_attn import FlashAttn2Capabilities, FlashAttn4Capabilities
from .sdpa import torch_deterministic_algorithms
from .reference import _compute_dtype, softcapped

__all__ = [
    "VARLEN_BACKENDS",
    "VarlenBlock",
    "VarlenBlockKernel",
    "VarlenCall",
    "VarlenKernel",
    "VarlenSeqs",
    "available_varlen_backends",
    "resolve_varlen_backend",
]

_HALF = (torch.bfloat16, torch.float16)


def _cumsum(lengths: Sequence[int]) -> Tuple[int, ...]:
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return tuple(cu)


class VarlenSeqs:
    """The packed sequences of one varlen call: query sequence ``i`` has ``q_lengths[i]`` rows and attends the
    ``k_lengths[i]`` rows of key sequence ``i``. Host-side (ints); device tensors are built once per device.

    Attributes: ``cu_q``, ``cu_k`` (cumulative lengths, tuples), ``max_q``, ``max_k``, ``total_q``, ``total_k``.
    """

    def __init__(self, q_lengths: Sequence[int], k_lengths: Sequence[int]):
        q_lengths, k_lengths = tuple(int(n) for n in q_lengths), tuple(int(n) for n in k_lengths)
        if len(q_lengths) != len(k_lengths) or not q_lengths or min(q_lengths + k_lengths) < 0:
            raise ValueError(f"bad varlen sequences: q {q_lengths}, k {k_lengths}")
        self.q_lengths, self.k_lengths = q_lengths, k_lengths
        self.cu_q, self.cu_k = _cumsum(q_lengths), _cumsum(k_lengths)
        self.max_q, self.max_k = max(q_lengths), max(k_lengths)
        self.total_q, self.total_k = self.cu_q[-1], self.cu_k[-1]
        # row ranges that the empty-sequence rule fixes: queries with no keys, keys with no queries
        self._q_without_keys = [
            (self.cu_q[i], self.cu_q[i + 1]) for i in range(len(q_lengths)) if q_lengths[i] and not k_lengths[i]
        ]
        self._k_without_queries = [
            (self.cu_k[i], self.cu_k[i + 1]) for i in range(len(q_lengths)) if k_lengths[i] and not q_lengths[i]
        ]
        self._device_cache: Dict[Tuple[str, torch.device], object] = {}

    def __repr__(self) -> str:
        return f"VarlenSeqs(q={self.q_lengths}, k={self.k_lengths})"

    def _cached(self, what: str, device: torch.device, build):
        key = (what, device)
        if key not in self._device_cache:
            self._device_cache[key] = build()
        return self._device_cache[key]

    def cu_tensors(self, device: torch.device) -> Tuple[Tensor, Tensor]:
        """``(cu_seqlens_q, cu_seqlens_k)`` as contiguous int32 tensors on ``device``."""
        return self._cached(
            "cu", device,
            lambda: (torch.tensor(self.cu_q, dtype=torch.int32, device=device),
                     torch.tensor(self.cu_k, dtype=torch.int32, device=device)),
        )

    def empty_rows(self, device: torch.device) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        """int64 row indices ``(queries without keys, keys without queries)``; ``None`` where there are none."""

        def build():
            def index(ranges):
                if not ranges:
                    return None
                return torch.cat([torch.arange(a, b) for a, b in ranges]).to(device)

            return index(self._q_without_keys), index(self._k_without_queries)

        return self._cached("empty", device, build)

    def nonempty(self, device: torch.device) -> Tuple[Optional["VarlenSeqs"], Optional[Tensor], Optional[Tensor]]:
        """For kernels that cannot take empty sequences: ``(seqs, q_rows, k_rows)``, ``seqs`` the sequences that are
        non-empty on both sides (``None`` if there are none), ``q_rows``/``k_rows`` the int64 indices of their query/key
        rows on ``device``, ``None`` where those are all the rows (sequences empty on both sides have no rows)."""

        def build():
            n = len(self.q_lengths)
            live = [i for i in range(n) if self.q_lengths[i] and self.k_lengths[i]]
            if not live:
                return None, None, None
            if len(live) == n:
                return self, None, None
            seqs = VarlenSeqs([self.q_lengths[i] for i in live], [self.k_lengths[i] for i in live])

            def rows(cu, needed):
                if not needed:  # every row belongs to a live sequence
                    return None
                return torch.cat([torch.arange(cu[i], cu[i + 1]) for i in live]).to(device)

            return seqs, rows(self.cu_q, self._q_without_keys), rows(self.cu_k, self._k_without_queries)

        return self._cached("nonempty", device, build)

    def row_structure(self, device: torch.device) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """For the reference kernel: ``(q_seq, q_pos, k_seq, k_pos, q_shift)``: sequence id and position of every
        query/key row, and per query row the bottom-right causal shift ``k_len - q_len`` of its sequence."""

        def build():
            n = len(self.q_lengths)
            q_len = torch.tensor(self.q_lengths, dtype=torch.int64)
            k_len = torch.tensor(self.k_lengths, dtype=torch.int64)
            q_seq = torch.repeat_interleave(torch.arange(n), q_len)
            k_seq = torch.repeat_interleave(torch.arange(n), k_len)
            q_pos = torch.arange(self.total_q) - torch.tensor(self.cu_q[:-1], dtype=torch.int64)[q_seq]
            k_pos = torch.arange(self.total_k) - torch.tensor(self.cu_k[:-1], dtype=torch.int64)[k_seq]
            q_shift = (k_len - q_len)[q_seq]
            return tuple(t.to(device) for t in (q_seq, q_pos, k_seq, k_pos, q_shift))

        return self._cached("rows", device, build)


class VarlenKernel(KernelCapabilities):
    """Base class of the varlen kernels (module docstring): capabilities as for dense kernels, plus
    ``forward(q, k, v, seqs, causal, scale)`` and ``backward(dout, q, k, v, out, lse, seqs, causal, scale)``."""

    label = "varlen backend"

    def forward(self, q: Tensor, k: Tensor, v: Tensor, seqs: VarlenSeqs, mask: Mask, scale: float):
        raise NotImplementedError

    def backward(self, dout, q, k, v, out, lse, seqs: VarlenSeqs, mask: Mask, scale: float,
                 deterministic: bool = False):
        raise NotImplementedError


class ReferenceVarlenKernel(VarlenKernel):
    """Pure PyTorch, a block-diagonal mask over the packed rows: per sequence, the ``Mask``'s bottom-right aligned
    window (causal, sliding, full; the module docstring's rule, flash-attn's varlen ``window_size``) and softcap.

    Computes in float32 (float64 for float64 inputs), rounds results to the input dtype. ``O(h * t_q * t_k)``
    memory: this is the CPU/CI path and the numerical reference, not a fast kernel. GQA by grouping query heads.
    """

    name = "reference"
    dtypes = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
    device_types = ("cpu", "cuda")
    deterministic_backward = True
    supports_window = True
    supports_softcap = True
    different_v_head_dim = True

    @staticmethod
    def _mask(seqs: VarlenSeqs, mask: Mask, device: torch.device) -> Tensor:
        q_seq, q_pos, k_seq, k_pos, q_shift = seqs.row_structure(device)
        allowed = q_seq[:, None] == k_seq[None, :]  # [t_q, t_k]
        rel = k_pos[None, :] - (q_pos + q_shift)[:, None]  # bottom-right aligned per sequence
        if mask.right != -1:
            allowed &= rel <= mask.right
        if mask.left != -1:
            allowed &= rel >= -mask.left
        return allowed

    @staticmethod
    def _grouped(x: Tensor, kv_heads: int) -> Tensor:
        t, h, d = x.shape
        return x.reshape(t, kv_heads, h // kv_heads, d)

    def _probs(self, q_c, k_c, allowed, scale, softcap, lse=None):
        scores, tanh = softcapped(torch.einsum("qngd,knd->ngqk", q_c, k_c) * scale, softcap)  # [h_kv, g, t_q, t_k]
        scores = scores.masked_fill(~allowed, float("-inf"))
        if lse is None:
            lse = torch.logsumexp(scores, dim=-1)  # -inf for rows without keys
        # where(): rows without keys have -inf - (-inf) = nan inside exp; they get probability 0
        probs = torch.where(allowed, torch.exp(scores - lse.unsqueeze(-1)), torch.zeros((), dtype=scores.dtype))
        return probs, lse, tanh

    def forward(self, q, k, v, seqs, mask, scale):
        mask = as_mask(mask)
        t_q, h, d = q.shape
        kv_heads, dv = k.shape[1], v.shape[2]
        ct = _compute_dtype(q.dtype)
        allowed = self._mask(seqs, mask, q.device)
        probs, lse, _ = self._probs(self._grouped(q.to(ct), kv_heads), k.to(ct), allowed, scale, mask.softcap)
        out = torch.einsum("ngqk,knd->qngd", probs, v.to(ct)).reshape(t_q, h, dv)
        return out.to(q.dtype), lse.reshape(h, t_q)

    def backward(self, dout, q, k, v, out, lse, seqs, mask, scale, deterministic=False):
        mask = as_mask(mask)
        t_q, h, d = q.shape
        kv_heads = k.shape[1]
        g = h // kv_heads
        ct = _compute_dtype(q.dtype)
        allowed = self._mask(seqs, mask, q.device)
        q_g, k_c, v_c = self._grouped(q.to(ct), kv_heads), k.to(ct), v.to(ct)
        dout_g = self._grouped(dout.to(ct), kv_heads)
        probs, _, tanh = self._probs(q_g, k_c, allowed, scale, mask.softcap, lse=lse.to(ct).reshape(kv_heads, g, t_q))
        dv = torch.einsum("ngqk,qngd->knd", probs, dout_g)
        dprobs = torch.einsum("qngd,knd->ngqk", dout_g, v_c)
        row_dot = (dout_g * self._grouped(out.to(ct), kv_heads)).sum(-1).permute(1, 2, 0)  # [h_kv, g, t_q]
        dscores = probs * (dprobs - row_dot.unsqueeze(-1))
        if tanh is not None:
            dscores = dscores * (1 - tanh * tanh)
        dq = torch.einsum("ngqk,knd->qngd", dscores, k_c).reshape(t_q, h, d) * scale
        dk = torch.einsum("ngqk,qngd->knd", dscores, q_g) * scale
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# ---------------------------------------------------------------------------------------------- GPU kernels
class TorchFlashVarlenKernel(VarlenKernel):
    """``aten._flash_attention_forward/_backward`` with ``cum_seq_q/k`` (FlashAttention-2 inside PyTorch).

    Varlen LSE is ``[h, t_q]`` ("unpadded"). For a query sequence with no keys FA2 writes ``out = 0`` and
    ``lse = +inf``; ``VarlenBlockKernel`` turns that into ``-inf`` (see the module docstring).
    """

    name = "torch_flash"
    dtypes = _HALF
    device_types = ("cuda",)
    deterministic_backward = True  # through torch_deterministic_algorithms, as the dense kernel

    def is_available(self) -> bool:
        return (torch.cuda.is_available() and hasattr(torch.ops.aten, "_flash_attention_forward")
                and hasattr(torch.ops.aten, "_flash_attention_backward"))

    def _head_dim_reason(self, head_dim: int) -> Optional[str]:
        return head_dim_range_reason(self.name, head_dim, 8, 256, 8)

    def forward(self, q, k, v, seqs, causal, scale):
        causal = plain_causal(causal, self.name)  # no window/softcap: resolve_kernel refuses them
        cu_q, cu_k = seqs.cu_tensors(q.device)
        result = torch.ops.aten._flash_attention_forward(
            q, k, v, cu_q, cu_k, _fa2_max_q(seqs), seqs.max_k, 0.0, causal, False, scale=scale
        )
        return result[0], result[1]

    def backward(self, dout, q, k, v, out, lse, seqs, causal, scale, deterministic=False):
        causal = plain_causal(causal, self.name)
        cu_q, cu_k = seqs.cu_tensors(q.device)
        philox = torch.zeros(2, dtype=torch.int64, device=q.device)  # unused: dropout is 0
        with torch_deterministic_algorithms(deterministic):
            dq, dk, dv = torch.ops.aten._flash_attention_backward(
                dout, q, k, v, out, lse, cu_q, cu_k, _fa2_max_q(seqs), seqs.max_k, 0.0, causal,
                philox, philox, scale=scale,
            )
        return dq, dk, dv


def _fa2_max_q(seqs: VarlenSeqs) -> int:
    """``max_seqlen_q`` for FlashAttention-2 kernels (flash-attn 2 and torch's copy): an upper bound (grid size). At
    exactly 1, FA2's forward takes its decoding shortcut for GQA (one query per sequence, reshaped per KV head), which
    is wrong when some query sequences are empty."""
    return max(seqs.max_q, 2)


class FlashAttn2VarlenKernel(FlashAttn2Capabilities, VarlenKernel):
    """flash-attn 2 ``_flash_attn_varlen_forward/_backward`` (``flash_attn_varlen_func``'s kernels); LSE ``[h, t_q]``
    float32. For a query sequence with no keys it writes ``out = 0``, ``lse = +inf``; ``VarlenBlockKernel`` fixes
    that up (module docstring). Only documented keyword arguments are used."""

    def forward(self, q, k, v, seqs, mask, scale):
        mask = as_mask(mask)
        cu_q, cu_k = seqs.cu_tensors(q.device)
        out, lse, _, _ = self._interface()._flash_attn_varlen_forward(
            q, k, v, cu_q, cu_k, _fa2_max_q(seqs), seqs.max_k, dropout_p=0.0, softmax_scale=scale,
            causal=mask.causal, window_size_left=mask.left, window_size_right=mask.right, softcap=mask.softcap,
            alibi_slopes=None, return_softmax=False,
        )
        return out, lse

    def backward(self, dout, q, k, v, out, lse, seqs, mask, scale, deterministic=False):
        mask = as_mask(mask)
        cu_q, cu_k = seqs.cu_tensors(q.device)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        self._interface()._flash_attn_varlen_backward(
            dout, q, k, v, out, lse, dq, dk, dv, cu_q, cu_k, _fa2_max_q(seqs), seqs.max_k, dropout_p=0.0,
            softmax_scale=scale, causal=mask.causal, window_size_left=mask.left, window_size_right=mask.right,
            softcap=mask.softcap,
            alibi_slopes=None, deterministic=deterministic,
        )
        return dq, dk, dv


class FlashAttn4VarlenKernel(FlashAttn4Capabilities, VarlenKernel):
    """flash-attn-4 (``flash_attn.cute.interface``) ``_flash_attn_fwd/_bwd`` with ``cu_seqlens_q/k`` and
    ``max_seqlen_q/k``; LSE ``[h, t_q]`` float32. Only documented keyword arguments are used."""

    def forward(self, q, k, v, seqs, mask, scale):
        cu_q, cu_k = seqs.cu_tensors(q.device)
        result = self._interface()._flash_attn_fwd(
            q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=seqs.max_q, max_seqlen_k=seqs.max_k,
            softmax_scale=scale, return_lse=True, **self._mask_kwargs(mask),
        )
        return result[0], result[1]

    def backward(self, dout, q, k, v, out, lse, seqs, mask, scale, deterministic=False):
        cu_q, cu_k = seqs.cu_tensors(q.device)
        kwargs = self._mask_kwargs(mask)
        kwargs["softcap"] = kwargs["softcap"] or 0.0  # the backward takes a float
        dq, dk, dv = self._interface()._flash_attn_bwd(
            q, k, v, out, dout, lse, softmax_scale=scale, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
            max_seqlen_q=seqs.max_q, max_seqlen_k=seqs.max_k, deterministic=deterministic, **kwargs,
        )[:3]
        return dq, dk, dv


# Note [cuDNN ragged attention]
# What PyTorch's ragged cuDNN path does, read from pytorch/pytorch (no machine here could run it):
# * Layout. attention.cu `_cudnn_attention_forward`: with cum_seq_q/k, q/k/v are packed 3-D [total, heads, head_dim],
#   heads = size(-2). cudnn/MHA.cpp `build_graph_nestedtensor` declares them to cuDNN as BHSD with strides
#   {-, stride(1), stride(0), stride(2)}; `run_cudnn_SDP_fprop_nestedtensor` passes seq lengths diff(cum_seq) and ragged
#   offsets cum_seq * stride(0) (cum_seq: int32, [b + 1], on the device). We pass contiguous tensors (head_dim % 8 == 0
#   keeps every row 16-byte aligned, which cuDNN requires: pytorch#194818).
# * LSE. Up to mid-2026 `run_cudnn_SDP_fprop_nestedtensor` returns [total_q, h, 1] float32, token-major (ragged offset
#   cum_seq_q * h) and `build_graph_backward_nestedtensor` reads that layout back; later builds (pytorch#172108) return
#   and expect FA's [h, total_q]. Both are recognised by their shape; backward hands back the forward's layout.
# * GQA. The graph takes h_k separately, but torch/nn/attention/varlen.py refuses GQA on cuDNN and cudnn-frontend#1083
#   reports a ragged-stats GQA bug: K/V heads are expanded here and the dK/dV replicas summed in float32.
# * Empty sequences. Zero-length sequences need cuDNN >= 9.25 (NaN rows before: cudnn-frontend#943/#944). Calls here
#   never contain one: sequences empty on either side are left out (their rows gathered away when needed); the
#   module's empty-sequence semantics then give their rows out = 0, lse = -inf, zero gradients.
# * Causal masks are top-left (`set_causal_mask`); equal lengths are checked, where top-left = bottom-right.
# * Backward bug. attention_backward.cu `_cudnn_attention_backward` takes max_seqlen from query.size(2), which is
#   head_dim for the 3-D ragged input: cuDNN's dQ workspace is then sized by head_dim and overrun by any sequence longer
#   than head_dim (illegal address). Fixed by pytorch#186142 (June 2026): torch 2.11 (March 2026) has the bug, 2.12 and
#   2.13 are unverified, hence torch >= 2.14. Builds of that time also rebuilt the cuDNN graph on every ragged call
#   (~40 ms, pytorch#191576).
# * Limits from varlen.py `_should_use_cudnn` / `_cudnn_supports_head_dims`: cuDNN >= 9.18 on SM90/SM100, head_dim
#   <= 128; SM100 with cuDNN 9.19-9.25.0 (not 9.24.1) mis-handles max_q == 1 (MHA.cpp `check_cudnn_sdpa_decode`).
_CUDNN_MIN_TORCH = (2, 14)
_CUDNN_MIN_VERSION = 91800
_CUDNN_MAX_SEQUENCES = 65535  # cuDNN dimension limit (pytorch#180718)


def _torch_version() -> Tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


class CudnnVarlenKernel(VarlenKernel):
    """``aten._cudnn_attention_forward/_backward`` with ``cum_seq_q/k`` (Note [cuDNN ragged attention]).

    Not preferred by "auto" over ``torch_flash``: untested on hardware here, and the graph is specialised to each
    packing's shapes, one-side-empty sequences cost a gather and GQA an expansion of K/V.
    """

    name = "cudnn"
    dtypes = _HALF
    device_types = ("cuda",)

    def __init__(self):
        self._lse_ndim: Optional[int] = None  # 3: [t, h, 1] token-major LSE, 2: [h, t]; set by the first forward

    @staticmethod
    def _unavailable_reason() -> Optional[str]:
        if not torch.cuda.is_available():
            return "CUDA is not available"
        if not (hasattr(torch.ops.aten, "_cudnn_attention_forward")
                and hasattr(torch.ops.aten, "_cudnn_attention_backward")):
            return "this torch has no aten._cudnn_attention_forward/_backward"
        if _torch_version() < _CUDNN_MIN_TORCH:
            return (f"torch {torch.__version__} < 2.14: its ragged cuDNN backward sizes the dQ workspace by head_dim "
                    "instead of the longest sequence (out-of-bounds writes, fixed by pytorch#186142)")
        version = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        if version is None or version < _CUDNN_MIN_VERSION:
            return f"needs cuDNN >= 9.18 for ragged attention, found {version}"
        major = torch.cuda.get_device_capability()[0]
        if major not in (9, 10):
            return f"ragged cuDNN attention is used on SM90/SM100 only, this GPU is SM{major}x"
        if major == 10 and 91900 <= version < 92501 and version != 92401:
            return f"cuDNN {version} mis-handles single-query sequences on SM100 (pytorch#193893)"
        return None

    def is_available(self) -> bool:
        return self._unavailable_reason() is None

    def _input_reason(self, device, dtype, head_dim):
        reason = self._unavailable_reason()
        if reason:
            return f"{self.label} {self.name!r} is not available: {reason}"
        return super()._input_reason(device, dtype, head_dim)

    def _nondeterminism_note(self) -> str:
        return " (PyTorch's cuDNN attention entry point has no deterministic option)"

    def _head_dim_reason(self, head_dim: int) -> Optional[str]:
        return head_dim_range_reason(self.name, head_dim, 8, 128, 8)

    @staticmethod
    def _live(seqs: VarlenSeqs, causal: bool, device: torch.device):
        if causal and seqs.q_lengths != seqs.k_lengths:
            raise ValueError(f"varlen backend 'cudnn' aligns causal masks top-left: causal needs equal query and key "
                             f"lengths, got {seqs}")
        live, q_rows, k_rows = seqs.nonempty(device)
        if live is not None and len(live.q_lengths) > _CUDNN_MAX_SEQUENCES:
            raise ValueError(f"varlen backend 'cudnn' takes at most {_CUDNN_MAX_SEQUENCES} sequences per call, got "
                             f"{len(live.q_lengths)}")
        return live, q_rows, k_rows

    @staticmethod
    def _rows(x: Tensor, index: Optional[Tensor], dim: int = 0) -> Tensor:
        return x if index is None else x.index_select(dim, index)

    @staticmethod
    def _expand_heads(x: Tensor, heads: int) -> Tensor:
        # [t, h_kv, d] -> [t, h, d]: query head i reads KV head i // (h // h_kv)
        return x if x.shape[1] == heads else x.repeat_interleave(heads // x.shape[1], dim=1)

    def _heads_first(self, lse: Tensor, t: int, h: int) -> Tensor:
        if lse.dim() == 3 and tuple(lse.shape) == (t, h, 1):  # token-major [t, h, 1]
            self._lse_ndim = 3
            return lse[:, :, 0].t().contiguous()
        if lse.dim() == 2 and tuple(lse.shape) == (h, t):
            self._lse_ndim = 2
            return lse
        raise RuntimeError(f"aten._cudnn_attention_forward returned a {tuple(lse.shape)} logsumexp for {t} query rows "
                           f"and {h} heads; expected [{t}, {h}, 1] or [{h}, {t}]")

    def _call_forward(self, q, k, v, seqs: VarlenSeqs, causal, scale):
        cu_q, cu_k = seqs.cu_tensors(q.device)
        result = torch.ops.aten._cudnn_attention_forward(
            q, k, v, None, cu_q, cu_k, seqs.max_q, seqs.max_k, True, 0.0, causal, False, scale=scale
        )
        return result[0], self._heads_first(result[1], q.shape[0], q.shape[1])

    def forward(self, q, k, v, seqs, causal, scale):
        causal = plain_causal(causal, self.name)  # no window/softcap: resolve_kernel refuses them
        t_q, h, d = q.shape
        live, q_rows, k_rows = self._live(seqs, causal, q.device)
        if live is None:  # no sequence has both queries and keys
            return q.new_zeros((t_q, h, d)), torch.full((h, t_q), float("-inf"), device=q.device)
        q_c = self._rows(q, q_rows).contiguous()
        k_c, v_c = (self._expand_heads(self._rows(x, k_rows), h).contiguous() for x in (k, v))
        out_c, lse_c = self._call_forward(q_c, k_c, v_c, live, causal, scale)
        if q_rows is None:
            return out_c, lse_c
        out = q.new_zeros((t_q, h, d)).index_copy_(0, q_rows, out_c)
        lse = torch.full((h, t_q), float("-inf"), device=q.device).index_copy_(1, q_rows, lse_c)
        return out, lse

    def _lse_for_backward(self, lse: Tensor, device: torch.device, dtype: torch.dtype) -> Tensor:
        if self._lse_ndim is None:  # backward before any forward in this process: one tiny forward finds the layout
            probe = torch.zeros((2, 1, 64), dtype=dtype, device=device)
            self._call_forward(probe, probe, probe, VarlenSeqs([2], [2]), False, 0.125)
        return lse.t().contiguous().unsqueeze(-1) if self._lse_ndim == 3 else lse.contiguous()

    def backward(self, dout, q, k, v, out, lse, seqs, causal, scale, deterministic=False):
        causal = plain_causal(causal, self.name)
        assert not deterministic, "cudnn has no deterministic backward: resolve_kernel refuses it"
        h, d = q.shape[1:]
        h_kv = k.shape[1]
        live, q_rows, k_rows = self._live(seqs, causal, q.device)
        if live is None:
            return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        q_c, dout_c, out_c = (self._rows(x, q_rows).contiguous() for x in (q, dout, out))
        k_c, v_c = (self._expand_heads(self._rows(x, k_rows), h).contiguous() for x in (k, v))
        lse_c = self._lse_for_backward(self._rows(lse, q_rows, dim=1), q.device, q.dtype)
        cu_q, cu_k = live.cu_tensors(q.device)
        philox = torch.zeros((), dtype=torch.int64, device=q.device)  # unused: dropout is 0
        dq_c, dk_c, dv_c = torch.ops.aten._cudnn_attention_backward(
            dout_c, q_c, k_c, v_c, out_c, lse_c, philox, philox, None, cu_q, cu_k, live.max_q, live.max_k, 0.0, causal,
            scale=scale,
        )
        if h_kv != h:  # sum the replicas of each KV head in float32
            dk_c, dv_c = (g.reshape(g.shape[0], h_kv, h // h_kv, d).sum(2, dtype=torch.float32).to(k.dtype)
                          for g in (dk_c, dv_c))
        dq = dq_c if q_rows is None else torch.zeros_like(q).index_copy_(0, q_rows, dq_c)
        if k_rows is not None:
            dk_c, dv_c = (torch.zeros_like(x).index_copy_(0, k_rows, g) for x, g in ((k, dk_c), (v, dv_c)))
        return dq, dk_c, dv_c


#: every varlen backend by name, in "auto" preference order (fastest first where measured). cuDNN comes after
#: torch_flash: Note [cuDNN ragged attention] lists why it is neither verified nor known to be faster here.
VARLEN_BACKENDS: Dict[str, VarlenKernel] = {
    kernel.name: kernel
    for kernel in (FlashAttn4VarlenKernel(), FlashAttn2VarlenKernel(), TorchFlashVarlenKernel(), CudnnVarlenKernel(),
                   ReferenceVarlenKernel())
}


def available_varlen_backends() -> List[str]:
    """Names of the varlen backends usable in this process."""
    return [name for name, kernel in VARLEN_BACKENDS.items() if kernel.is_available()]


def resolve_varlen_backend(
    backend: Union[str, VarlenKernel], device: torch.device, dtype: torch.dtype, head_dim: int,
    deterministic: bool = False, needs: Optional[MaskNeeds] = None,
) -> VarlenKernel:
    """The varlen kernel for ``backend`` ("auto", a name of ``VARLEN_BACKENDS`` or a ``VarlenKernel``).

    Raises ValueError naming the valid values when the name is unknown or the backend cannot run
    ``(device, dtype, head_dim)`` (with a deterministic backward if ``deterministic``); TypeError for anything else.
    """
    return resolve_kernel(backend, VARLEN_BACKENDS, VarlenKernel, device, dtype, head_dim, "varlen", deterministic,
                          needs)


# ---------------------------------------------------------------------------------------------- ring adapter
@dataclass(frozen=True)
class VarlenCall:
    """One varlen kernel call of a ring block: query rows ``q`` of the block against key rows ``k`` of it."""

    q: slice
    k: slice
    seqs: VarlenSeqs
    #: the call's mask (Note [block mask]), the same for every sequence of the call; a bool means causal/full
    mask: object


class VarlenBlock:
    """The varlen calls that make up one ring block, over a block of ``q_len`` query and ``k_len`` key rows.

    Calls that share query rows have their results merged (in float32) by their LSE, so each must cover disjoint
    key rows for the rows it shares; a call's query rows equal an earlier call's or overlap none. Rows that no call
    covers (a windowed block that some documents do not reach, or none) come out as ``out = 0``, ``lse = -inf``
    and zero gradients. ``final``: the block is its rows' only one (``R == 1``), so results come back in the input
    dtype (rounded once) even when calls were merged.
    """

    def __init__(self, calls: Sequence[VarlenCall], q_len: int, k_len: int, final: bool = False):
        self.calls = tuple(calls)
        self.q_len, self.k_len, self.final = q_len, k_len, final
        q_ranges: List[Tuple[int, int]] = []
        k_ranges: List[Tuple[int, int]] = []
        merges = []
        for call in self.calls:
            q_range, k_range = call.q.indices(q_len), call.k.indices(k_len)
            if q_range[2] != 1 or k_range[2] != 1:
                raise ValueError("varlen calls take contiguous row ranges (slices with step 1)")
            q_range, k_range = q_range[:2], k_range[:2]
            if call.seqs.total_q != q_range[1] - q_range[0] or call.seqs.total_k != k_range[1] - k_range[0]:
                raise ValueError(f"varlen call {call} does not match its rows {q_range}, {k_range}")
            merge = q_range in q_ranges
            if not merge and any(a < q_range[1] and q_range[0] < b for a, b in q_ranges):
                raise ValueError("a varlen call's query rows must equal an earlier call's or overlap none")
            merges.append(merge)
            q_ranges.append(q_range)
            k_ranges.append(k_range)
        self.merges = tuple(merges)
        self.covers_q = _covers(q_ranges, q_len)
        self.single = len(self.calls) == 1 and self.covers_q and _covers(k_ranges, k_len)

    def __repr__(self) -> str:
        return f"VarlenBlock(q_len={self.q_len}, k_len={self.k_len}, calls={list(self.calls)})"


def _covers(ranges: List[Tuple[int, int]], total: int) -> bool:
    covered = 0
    for a, b in sorted(ranges):
        if a > covered:
            break
        covered = max(covered, b)
    return covered >= total


def _fix_empty_forward(out: Tensor, lse: Tensor, seqs: VarlenSeqs) -> None:
    q_empty, _ = seqs.empty_rows(out.device)
    if q_empty is not None:
        out.index_fill_(0, q_empty, 0.0)
        lse.index_fill_(1, q_empty, float("-inf"))


def _fix_empty_backward(dq: Tensor, dk: Tensor, dv: Tensor, seqs: VarlenSeqs) -> None:
    q_empty, k_empty = seqs.empty_rows(dq.device)
    if q_empty is not None:
        dq.index_fill_(0, q_empty, 0.0)
    if k_empty is not None:
        dk.index_fill_(0, k_empty, 0.0)
        dv.index_fill_(0, k_empty, 0.0)


class VarlenBlockKernel(WrappedKernelCapabilities, AttentionKernel):
    """The ring loop's kernel for packed documents: runs the ``VarlenBlock`` it gets as ``causal`` with ``kernel``.

    Takes the ring's ``[1, s, h, d]`` tensors and ``[1, h, s]`` LSE (batch 1: the packed rows). A block of one call
    returns the kernel's results as they are (input dtype). Otherwise the output is float32 where calls are merged
    and the gradients are float32 sums (the ring loop accumulates and casts them at the end), so no partial result
    is rounded to the input dtype twice. ``R == 1`` blocks (``VarlenBlock.final``) return the input dtype.
    """

    def __init__(self, kernel: VarlenKernel):
        self._wrap(kernel, "varlen_")

    @staticmethod
    def _block(block) -> VarlenBlock:
        if not isinstance(block, VarlenBlock):
            raise TypeError(f"VarlenBlockKernel needs a VarlenBlock as its mask, got {type(block).__name__}")
        return block

    def _forward_call(self, q0, k0, v0, call: VarlenCall, scale):
        out, lse = self.kernel.forward(q0[call.q], k0[call.k], v0[call.k], call.seqs, as_mask(call.mask), scale)
        _fix_empty_forward(out, lse, call.seqs)
        return out, lse

    def forward(self, q: Tensor, k: Tensor, v: Tensor, causal, scale: float) -> Tuple[Tensor, Tensor]:
        block = self._block(causal)
        q0, k0, v0 = q[0], k[0], v[0]  # [t, h, d]
        if block.single:
            out, lse = self._forward_call(q0, k0, v0, block.calls[0], scale)
            return out.unsqueeze(0), lse.unsqueeze(0)
        t_q, h, d = q0.shape[0], q0.shape[1], v0.shape[2]
        wide = torch.promote_types(q.dtype, torch.float32)
        out_dtype = wide if any(block.merges) or not block.covers_q else q.dtype
        if block.covers_q:  # every row written by its first call
            out = torch.empty((t_q, h, d), dtype=out_dtype, device=q.device)
            lse = torch.empty((h, t_q), dtype=wide, device=q.device)
        else:  # rows no call reaches: no keys
            out = torch.zeros((t_q, h, d), dtype=out_dtype, device=q.device)
            lse = torch.full((h, t_q), float("-inf"), dtype=wide, device=q.device)
        for call, merge in zip(block.calls, block.merges):
            call_out, call_lse = self._forward_call(q0, k0, v0, call, scale)
            if merge:
                merge_attention_(out[call.q].unsqueeze(0), lse[:, call.q].unsqueeze(0),
                                 call_out.unsqueeze(0), call_lse.unsqueeze(0))
            else:
                out[call.q].copy_(call_out)
                lse[:, call.q].copy_(call_lse)
        if block.final:
            out = out.to(q.dtype)
        return out.unsqueeze(0), lse.unsqueeze(0)

    def backward(self, dout, q, k, v, out, lse, causal, scale, deterministic=False):
        block = self._block(causal)
        dout0, q0, k0, v0, out0, lse0 = dout[0], q[0], k[0], v[0], out[0], lse[0]
        if not block.single:  # float32 sums (zero where no call reaches)
            acc = torch.promote_types(q.dtype, torch.float32)
            grads = [torch.zeros(t.shape, dtype=acc, device=t.device) for t in (q0, k0, v0)]
        for call in block.calls:
            # a column slice of the [h, t] LSE is strided: the contract promises kernels a contiguous one
            dq, dk, dv = self.kernel.backward(
                dout0[call.q], q0[call.q], k0[call.k], v0[call.k], out0[call.q], lse0[:, call.q].contiguous(),
                call.seqs, as_mask(call.mask), scale, deterministic=deterministic,
            )
            _fix_empty_backward(dq, dk, dv, call.seqs)
            if block.single:
                return dq.unsqueeze(0), dk.unsqueeze(0), dv.unsqueeze(0)
            grads[0][call.q].add_(dq)
            grads[1][call.k].add_(dk)
            grads[2][call.k].add_(dv)
        if block.final:
            grads = [g.to(t.dtype) for g, t in zip(grads, (q0, k0, v0))]
        return tuple(g.unsqueeze(0) for g in grads)

    def __repr__(self) -> str:
        return f"<varlen block kernel over {self.kernel!r}>"
