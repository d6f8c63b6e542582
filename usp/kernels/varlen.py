"""Variable-length (packed documents) attention kernels: one call over packed sequences.

Shapes: ``t_q``/``t_k`` packed query/key rows, ``h``/``h_kv`` heads, ``d`` head_dim (legend of ``base.py``).

``VarlenKernel``: the contract of ``flash_attn_varlen_func``.
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

The ring adapter that runs these kernels on ring blocks (``VarlenCall``, ``VarlenBlock``, ``VarlenBlockKernel``)
is ``usp.kernels.varlen_block`` (its names are still reachable from here).

Backends, in "auto" order: ``"fa4"`` (flash-attn-4 ``_flash_attn_fwd/_bwd`` with ``cu_seqlens_q/k``), ``"fa2"``
(flash-attn 2 ``_flash_attn_varlen_forward/_backward``), ``"torch_flash"`` (``aten._flash_attention_forward/
_backward`` with ``cum_seq_q/k``, FlashAttention-2 in PyTorch) and ``"reference"`` (pure PyTorch, any device and
dtype: CPU/CI). ``"cudnn"`` is refused with its reason (``CudnnVarlenKernel``: no ragged cuDNN kernel for the
pinned torch).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from .base import (KernelCapabilities, Mask, MaskNeeds, Tensor, as_mask, head_dim_range_reason, plain_causal,
                   resolve_kernel)
from .flash_attn import FlashAttn2Capabilities, FlashAttn4Capabilities
from .sdpa import torch_deterministic_algorithms
from .reference import _compute_dtype, softcapped

__all__ = [
    "VARLEN_BACKENDS",
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

    def _cached(self, what, device: Optional[torch.device], build):
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

    def runs(self, q_rows: int, k_rows: int) -> Tuple[Tuple["VarlenSeqs", int, int, int, int], ...]:
        """Consecutive runs of the sequences, each ``(seqs, q_begin, q_end, k_begin, k_end)`` (its sequences and
        its rows), each spanning at most ``q_rows`` query and ``k_rows`` key rows unless it is one sequence
        (Note [varlen row offsets]). One run (``self``, all rows) when the limits allow it."""

        def build():
            n, firsts = len(self.q_lengths), [0]
            for i in range(1, n):
                first = firsts[-1]
                if self.cu_q[i + 1] - self.cu_q[first] > q_rows or self.cu_k[i + 1] - self.cu_k[first] > k_rows:
                    firsts.append(i)
            bounds = list(zip(firsts, firsts[1:] + [n]))
            return tuple(
                (self if (a, b) == (0, n) else VarlenSeqs(self.q_lengths[a:b], self.k_lengths[a:b]),
                 self.cu_q[a], self.cu_q[b], self.cu_k[a], self.cu_k[b]) for a, b in bounds)

        return self._cached(("runs", q_rows, k_rows), None, build)

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

        def call(q, k, v, seqs):
            cu_q, cu_k = seqs.cu_tensors(q.device)
            result = torch.ops.aten._flash_attention_forward(
                q, k, v, cu_q, cu_k, _fa2_max_q(seqs), seqs.max_k, 0.0, causal, False, scale=scale
            )
            return result[0], result[1]

        return forward_in_runs(call, q, k, v, seqs)

    def backward(self, dout, q, k, v, out, lse, seqs, causal, scale, deterministic=False):
        causal = plain_causal(causal, self.name)
        philox = torch.zeros(2, dtype=torch.int64, device=q.device)  # unused: dropout is 0

        def call(dout, q, k, v, out, lse, seqs):
            cu_q, cu_k = seqs.cu_tensors(q.device)
            return torch.ops.aten._flash_attention_backward(
                dout, q, k, v, out, lse, cu_q, cu_k, _fa2_max_q(seqs), seqs.max_k, 0.0, causal,
                philox, philox, scale=scale,
            )

        with torch_deterministic_algorithms(deterministic):
            return backward_in_runs(call, dout, q, k, v, out, lse, seqs)


# Note [varlen row offsets]. PyTorch's copy of FlashAttention-2 (``torch_flash``, torch 2.11) faults with an
# illegal memory access on some varlen calls whose tensors pass 2**31 elements, as if an offset were computed in 32
# bits (measured on H200, ``benchmarks/RESULTS.md``): 600,000 rows in 1,111 sequences with 32 query and 32 K/V
# heads of 128 faults, and so did the 1M-row many_tiny batch with 32/8 heads; one sequence of 1M rows does not,
# nor does any call whose tensors stay under 2**31 elements; flash-attn 2.8.3 ran the 1M-row many_tiny call. A rank
# can hold that many rows (a packed batch of 1M tokens on a ring of 2), so such calls run as several: consecutive
# runs of sequences, each spanning fewer than 2**31 elements of every tensor (or one sequence alone), the tensors
# sliced at the run (a view: the base pointer moves, in 64 bits).
_OFFSET_LIMIT = 2 ** 31


def _row_limit(*tensors: Tensor) -> int:
    """Rows that stay under ``_OFFSET_LIMIT`` elements in each of ``tensors`` (by its row stride)."""
    return (_OFFSET_LIMIT - 1) // max(max(t.stride(0), t.shape[1] * t.shape[2]) for t in tensors)


def forward_in_runs(call, q, k, v, seqs: VarlenSeqs):
    """``call(q, k, v, seqs) -> (out, lse)`` over the runs of Note [varlen row offsets]: one call when the offsets
    fit, else one per run, written into one ``out``/``lse``. A run without keys gets out = 0, lse = -inf."""
    runs = seqs.runs(_row_limit(q), _row_limit(k, v))
    if len(runs) == 1:
        return call(q, k, v, seqs)
    out = lse = None
    for part, qa, qb, ka, kb in runs:
        if qa == qb:
            continue
        if ka == kb:  # queries without keys (Note [varlen zigzag layout]'s padding)
            part_out = q.new_zeros((qb - qa, q.shape[1], v.shape[2]))
            part_lse = torch.full((q.shape[1], qb - qa), float("-inf"), device=q.device,
                                  dtype=torch.promote_types(q.dtype, torch.float32))  # the contract's LSE dtype
        else:
            part_out, part_lse = call(q[qa:qb], k[ka:kb], v[ka:kb], part)
        if out is None:
            out = q.new_empty((q.shape[0], q.shape[1], v.shape[2]), dtype=part_out.dtype)
            lse = torch.empty((q.shape[1], q.shape[0]), dtype=part_lse.dtype, device=q.device)
        out[qa:qb] = part_out
        lse[:, qa:qb] = part_lse
    return out, lse


def backward_in_runs(call, dout, q, k, v, out, lse, seqs: VarlenSeqs):
    """``call(dout, q, k, v, out, lse, seqs) -> (dq, dk, dv)`` over the runs of Note [varlen row offsets]: one call
    when the offsets fit, else one per run (its LSE columns made contiguous), written into one ``dq``/``dk``/``dv``;
    rows of a run without keys or without queries get zero gradients."""
    runs = seqs.runs(_row_limit(dout, q, out), _row_limit(k, v))
    if len(runs) == 1:
        return call(dout, q, k, v, out, lse, seqs)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for part, qa, qb, ka, kb in runs:
        if qa == qb or ka == kb:
            continue
        dq[qa:qb], dk[ka:kb], dv[ka:kb] = call(dout[qa:qb], q[qa:qb], k[ka:kb], v[ka:kb], out[qa:qb],
                                               lse[:, qa:qb].contiguous(), part)
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


class CudnnVarlenKernel(VarlenKernel):
    """The name ``"cudnn"`` for packed documents, refused: usp has no ragged cuDNN kernel for the torch it supports.

    PyTorch's ragged cuDNN attention (``aten._cudnn_attention_forward/_backward`` with ``cum_seq_q/k``) sizes the
    backward's dQ workspace by head_dim instead of the longest sequence before torch 2.14 (out-of-bounds writes,
    pytorch#186142), and usp pins ``torch < 2.14`` (``pyproject.toml``; the GPU machines here run 2.11). The adapter
    written for torch >= 2.14 was never run on any machine and was removed rather than kept unreachable (it is in
    the history of this file, with Note [cuDNN ragged attention]: what the ragged path expects). Packed batches run
    on ``"fa4"``, ``"fa2"``, ``"torch_flash"`` or ``"reference"``; the dense ``"cudnn"`` backend is unaffected.
    """

    name = "cudnn"
    dtypes = _HALF
    device_types = ("cuda",)
    #: why the name is refused (the resolver's message)
    reason = ("usp has no ragged cuDNN kernel: PyTorch's ragged cuDNN backward overruns its dQ workspace before "
              "torch 2.14 (pytorch#186142) and usp supports torch < 2.14; use 'torch_flash', 'fa2' or 'fa4'")

    def is_available(self) -> bool:
        return False

    def _input_reason(self, device, dtype, head_dim):
        return f"{self.label} {self.name!r} is not available: {self.reason}"


#: every varlen backend by name, in "auto" preference order (fastest first where measured); "cudnn" is only a
#: name that is refused with its reason (``CudnnVarlenKernel``)
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


def __getattr__(name: str):
    """The ring adapter's names, from ``usp.kernels.varlen_block`` where they live (they import this module's
    kernels, so they are looked up on first use rather than imported here)."""
    if name in ("VarlenBlock", "VarlenBlockKernel", "VarlenCall"):
        from . import varlen_block

        return getattr(varlen_block, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
