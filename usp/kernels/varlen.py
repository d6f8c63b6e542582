"""Variable-length (packed documents) attention kernels, and the adapter that runs them inside the ring loop.

Two levels. Shapes: ``t_q``/``t_k`` packed query/key rows, ``h``/``h_kv`` heads, ``d`` head_dim (legend of
``base.py``).

* ``VarlenKernel``: one call over packed sequences, the contract of ``flash_attn_varlen_func``.
  ``forward(q, k, v, seqs, causal, scale) -> (out, lse)``: ``q [t_q, h, d]``, ``k, v [t_k, h_kv, d]``,
  ``out [t_q, h, d]`` in ``q.dtype``, ``lse [h, t_q]`` float32 (float64 for float64 inputs).
  ``backward(dout, q, k, v, out, lse, seqs, causal, scale) -> (dq, dk, dv)``.
  Query sequence ``i`` (rows ``seqs.cu_q[i]:seqs.cu_q[i+1]``) attends key sequence ``i`` only. A causal mask is
  bottom-right aligned (flash-attn's convention); usp asks for causal only where every query sequence is as long as
  its key sequence, where top-left and bottom-right agree. Sequences may be empty on either side.
* ``VarlenBlockKernel``: an ``AttentionKernel`` (what ``usp.ring`` calls) whose ``causal`` argument is a
  ``VarlenBlock``, the varlen calls that make up one ring block (built by ``usp.varlen``). It takes the ring's
  ``[1, s, h, d]`` row slices, runs the calls on row ranges of them, merges calls that share query rows, and
  enforces the empty-sequence semantics whatever a kernel writes there: rows of a query sequence with no keys come
  out as ``out = 0``, ``lse = -inf``, ``dq = 0``; rows of a key sequence with no queries get ``dk = dv = 0``.

Backends: ``"fa4"`` (flash-attn-4 ``_flash_attn_fwd/_bwd`` with ``cu_seqlens_q/k``), ``"torch_flash"``
(``aten._flash_attention_forward/_backward`` with ``cum_seq_q/k``, FlashAttention-2 inside PyTorch) and
``"reference"`` (pure PyTorch, any device and dtype: the CPU/CI path). cuDNN has no varlen backend: see
``VARLEN_BACKENDS``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from ..merge import merge_attention_
from .base import AttentionKernel, KernelCapabilities, Tensor, head_dim_range_reason, resolve_kernel
from .flash_attn import FlashAttn4Capabilities
from .reference import _compute_dtype

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

    def forward(self, q: Tensor, k: Tensor, v: Tensor, seqs: VarlenSeqs, causal: bool, scale: float):
        raise NotImplementedError

    def backward(self, dout, q, k, v, out, lse, seqs: VarlenSeqs, causal: bool, scale: float):
        raise NotImplementedError


class ReferenceVarlenKernel(VarlenKernel):
    """Pure PyTorch, a block-diagonal (per-sequence, optionally causal) mask over the packed rows.

    Computes in float32 (float64 for float64 inputs), rounds results to the input dtype. ``O(h * t_q * t_k)``
    memory: this is the CPU/CI path and the numerical reference, not a fast kernel. GQA by grouping query heads.
    """

    name = "reference"
    dtypes = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
    device_types = ("cpu", "cuda")

    @staticmethod
    def _mask(seqs: VarlenSeqs, causal: bool, device: torch.device) -> Tensor:
        q_seq, q_pos, k_seq, k_pos, q_shift = seqs.row_structure(device)
        allowed = q_seq[:, None] == k_seq[None, :]  # [t_q, t_k]
        if causal:
            allowed &= k_pos[None, :] <= (q_pos + q_shift)[:, None]
        return allowed

    @staticmethod
    def _grouped(x: Tensor, kv_heads: int) -> Tensor:
        t, h, d = x.shape
        return x.reshape(t, kv_heads, h // kv_heads, d)

    def _probs(self, q_c, k_c, allowed, scale, lse=None):
        scores = torch.einsum("qngd,knd->ngqk", q_c, k_c) * scale  # [h_kv, g, t_q, t_k]
        scores = scores.masked_fill(~allowed, float("-inf"))
        if lse is None:
            lse = torch.logsumexp(scores, dim=-1)  # -inf for rows without keys
        # where(): rows without keys have -inf - (-inf) = nan inside exp; they get probability 0
        probs = torch.where(allowed, torch.exp(scores - lse.unsqueeze(-1)), torch.zeros((), dtype=scores.dtype))
        return probs, lse

    def forward(self, q, k, v, seqs, causal, scale):
        t_q, h, d = q.shape
        kv_heads = k.shape[1]
        ct = _compute_dtype(q.dtype)
        allowed = self._mask(seqs, causal, q.device)
        probs, lse = self._probs(self._grouped(q.to(ct), kv_heads), k.to(ct), allowed, scale)
        out = torch.einsum("ngqk,knd->qngd", probs, v.to(ct)).reshape(t_q, h, d)
        return out.to(q.dtype), lse.reshape(h, t_q)

    def backward(self, dout, q, k, v, out, lse, seqs, causal, scale):
        t_q, h, d = q.shape
        kv_heads = k.shape[1]
        g = h // kv_heads
        ct = _compute_dtype(q.dtype)
        allowed = self._mask(seqs, causal, q.device)
        q_g, k_c, v_c = self._grouped(q.to(ct), kv_heads), k.to(ct), v.to(ct)
        dout_g = self._grouped(dout.to(ct), kv_heads)
        probs, _ = self._probs(q_g, k_c, allowed, scale, lse=lse.to(ct).reshape(kv_heads, g, t_q))
        dv = torch.einsum("ngqk,qngd->knd", probs, dout_g)
        dprobs = torch.einsum("qngd,knd->ngqk", dout_g, v_c)
        row_dot = (dout_g * self._grouped(out.to(ct), kv_heads)).sum(-1).permute(1, 2, 0)  # [h_kv, g, t_q]
        dscores = probs * (dprobs - row_dot.unsqueeze(-1))
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

    def is_available(self) -> bool:
        return (torch.cuda.is_available() and hasattr(torch.ops.aten, "_flash_attention_forward")
                and hasattr(torch.ops.aten, "_flash_attention_backward"))

    def _head_dim_reason(self, head_dim: int) -> Optional[str]:
        return head_dim_range_reason(self.name, head_dim, 8, 256, 8)

    @staticmethod
    def _max_q(seqs: VarlenSeqs) -> int:
        # max_seqlen_q is an upper bound (grid size). At exactly 1, FA2's forward takes its decoding shortcut for
        # GQA (one query per sequence, reshaped per KV head), which is wrong when some query sequences are empty.
        return max(seqs.max_q, 2)

    def forward(self, q, k, v, seqs, causal, scale):
        cu_q, cu_k = seqs.cu_tensors(q.device)
        result = torch.ops.aten._flash_attention_forward(
            q, k, v, cu_q, cu_k, self._max_q(seqs), seqs.max_k, 0.0, causal, False, scale=scale
        )
        return result[0], result[1]

    def backward(self, dout, q, k, v, out, lse, seqs, causal, scale):
        cu_q, cu_k = seqs.cu_tensors(q.device)
        philox = torch.zeros(2, dtype=torch.int64, device=q.device)  # unused: dropout is 0
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            dout, q, k, v, out, lse.contiguous(), cu_q, cu_k, self._max_q(seqs), seqs.max_k, 0.0, causal,
            philox, philox, scale=scale,
        )
        return dq, dk, dv


class FlashAttn4VarlenKernel(FlashAttn4Capabilities, VarlenKernel):
    """flash-attn-4 (``flash_attn.cute.interface``) ``_flash_attn_fwd/_bwd`` with ``cu_seqlens_q/k`` and
    ``max_seqlen_q/k``; LSE ``[h, t_q]`` float32. Only documented keyword arguments are used."""

    def forward(self, q, k, v, seqs, causal, scale):
        cu_q, cu_k = seqs.cu_tensors(q.device)
        result = self._interface()._flash_attn_fwd(
            q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=seqs.max_q, max_seqlen_k=seqs.max_k,
            softmax_scale=scale, causal=causal, return_lse=True,
        )
        return result[0], result[1]

    def backward(self, dout, q, k, v, out, lse, seqs, causal, scale):
        cu_q, cu_k = seqs.cu_tensors(q.device)
        dq, dk, dv = self._interface()._flash_attn_bwd(
            q, k, v, out, dout, lse, softmax_scale=scale, causal=causal, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
            max_seqlen_q=seqs.max_q, max_seqlen_k=seqs.max_k,
        )[:3]
        return dq, dk, dv


#: every varlen backend by name, in "auto" preference order. No cuDNN: PyTorch's varlen cuDNN entry points
#: (``aten._cudnn_attention_forward/_backward`` with ``cum_seq_q/k``, the nested-tensor path) do not document their
#: LSE layout or empty-sequence behaviour, and no machine here can pin them down; FA4 is faster on H100 anyway.
VARLEN_BACKENDS: Dict[str, VarlenKernel] = {
    kernel.name: kernel for kernel in (FlashAttn4VarlenKernel(), TorchFlashVarlenKernel(), ReferenceVarlenKernel())
}


def available_varlen_backends() -> List[str]:
    """Names of the varlen backends usable in this process."""
    return [name for name, kernel in VARLEN_BACKENDS.items() if kernel.is_available()]


def resolve_varlen_backend(
    backend: Union[str, VarlenKernel], device: torch.device, dtype: torch.dtype, head_dim: int
) -> VarlenKernel:
    """The varlen kernel for ``backend`` ("auto", a name of ``VARLEN_BACKENDS`` or a ``VarlenKernel``).

    Raises ValueError naming the valid values when the name is unknown or the backend cannot run
    ``(device, dtype, head_dim)``; TypeError for anything else.
    """
    return resolve_kernel(backend, VARLEN_BACKENDS, VarlenKernel, device, dtype, head_dim, "varlen")


# ---------------------------------------------------------------------------------------------- ring adapter
@dataclass(frozen=True)
class VarlenCall:
    """One varlen kernel call of a ring block: query rows ``q`` of the block against key rows ``k`` of it."""

    q: slice
    k: slice
    seqs: VarlenSeqs
    causal: bool


class VarlenBlock:
    """The varlen calls that make up one ring block, over a block of ``q_len`` query and ``k_len`` key rows.

    Every query row and every key row must be covered by at least one call; calls that share query rows have their
    results merged (in float32) by their LSE, so each call must cover disjoint key rows for the rows it shares.
    """

    def __init__(self, calls: Sequence[VarlenCall], q_len: int, k_len: int):
        self.calls = tuple(calls)
        self.q_len, self.k_len = q_len, k_len
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
        for ranges, total, what in ((q_ranges, q_len, "query"), (k_ranges, k_len, "key")):
            covered = 0
            for a, b in sorted(ranges):
                if a > covered:
                    break
                covered = max(covered, b)
            if covered < total:
                raise ValueError(f"the calls of a varlen block must cover every {what} row")
        self.merges = tuple(merges)
        self.single = len(self.calls) == 1

    def __repr__(self) -> str:
        return f"VarlenBlock(q_len={self.q_len}, k_len={self.k_len}, calls={list(self.calls)})"


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


class VarlenBlockKernel(AttentionKernel):
    """The ring loop's kernel for packed documents: runs the ``VarlenBlock`` it gets as ``causal`` with ``kernel``.

    Takes the ring's ``[1, s, h, d]`` tensors and ``[1, h, s]`` LSE (batch 1: the packed rows). A block of one call
    returns the kernel's results as they are (input dtype). Otherwise the output is float32 where calls are merged
    and the gradients are float32 sums (the ring loop accumulates and casts them at the end), so no partial result
    is rounded to the input dtype twice. ``R == 1`` blocks are always one call, so there the input dtype comes back.
    """

    def __init__(self, kernel: VarlenKernel):
        self.kernel = kernel
        self.name = f"varlen_{kernel.name}"
        self.dtypes, self.device_types = kernel.dtypes, kernel.device_types

    def is_available(self) -> bool:
        return self.kernel.is_available()

    def unsupported_reason(self, device, dtype, head_dim):
        return self.kernel.unsupported_reason(device, dtype, head_dim)

    @staticmethod
    def _block(block) -> VarlenBlock:
        if not isinstance(block, VarlenBlock):
            raise TypeError(f"VarlenBlockKernel needs a VarlenBlock as its mask, got {type(block).__name__}")
        return block

    def _forward_call(self, q0, k0, v0, call: VarlenCall, scale):
        out, lse = self.kernel.forward(q0[call.q], k0[call.k], v0[call.k], call.seqs, call.causal, scale)
        _fix_empty_forward(out, lse, call.seqs)
        return out, lse

    def forward(self, q: Tensor, k: Tensor, v: Tensor, causal, scale: float) -> Tuple[Tensor, Tensor]:
        block = self._block(causal)
        q0, k0, v0 = q[0], k[0], v[0]  # [t, h, d]
        if block.single:
            out, lse = self._forward_call(q0, k0, v0, block.calls[0], scale)
            return out.unsqueeze(0), lse.unsqueeze(0)
        t_q, h, d = q0.shape
        out = lse = None
        for call, merge in zip(block.calls, block.merges):
            call_out, call_lse = self._forward_call(q0, k0, v0, call, scale)
            if out is None:
                out_dtype = torch.promote_types(q.dtype, torch.float32) if any(block.merges) else q.dtype
                out = torch.empty((t_q, h, d), dtype=out_dtype, device=q.device)
                lse = torch.empty((h, t_q), dtype=call_lse.dtype, device=q.device)
            if merge:
                merge_attention_(out[call.q].unsqueeze(0), lse[:, call.q].unsqueeze(0),
                                 call_out.unsqueeze(0), call_lse.unsqueeze(0))
            else:
                out[call.q].copy_(call_out)
                lse[:, call.q].copy_(call_lse)
        return out.unsqueeze(0), lse.unsqueeze(0)

    def backward(self, dout, q, k, v, out, lse, causal, scale):
        block = self._block(causal)
        dout0, q0, k0, v0, out0, lse0 = dout[0], q[0], k[0], v[0], out[0], lse[0]
        grads = None
        for call in block.calls:
            dq, dk, dv = self.kernel.backward(
                dout0[call.q], q0[call.q], k0[call.k], v0[call.k], out0[call.q], lse0[:, call.q], call.seqs,
                call.causal, scale,
            )
            _fix_empty_backward(dq, dk, dv, call.seqs)
            if block.single:
                return dq.unsqueeze(0), dk.unsqueeze(0), dv.unsqueeze(0)
            if grads is None:
                acc = torch.promote_types(q.dtype, torch.float32)
                grads = [torch.zeros(t.shape, dtype=acc, device=t.device) for t in (q0, k0, v0)]
            grads[0][call.q].add_(dq)
            grads[1][call.k].add_(dk)
            grads[2][call.k].add_(dv)
        return tuple(g.unsqueeze(0) for g in grads)

    def __repr__(self) -> str:
        return f"<varlen block kernel over {self.kernel!r}>"
