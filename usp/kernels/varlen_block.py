"""The ring adapter of the varlen kernels: what ``usp.ring`` runs for packed documents.

* ``VarlenCall``: one varlen kernel call of a ring block (query rows, key rows, ``VarlenSeqs``, ``Mask``).
* ``VarlenBlock``: the calls that make up one ring block (built by ``usp.schedule_varlen``).
* ``VarlenBlockKernel``: an ``AttentionKernel`` (what ``usp.ring`` calls) whose mask argument is a ``VarlenBlock``.
  It takes the ring's ``[1, s, h, d]`` row slices, runs the calls on row ranges of them, merges calls that share
  query rows, and enforces the empty-sequence semantics whatever a kernel writes there: rows of a query sequence
  with no keys come out as ``out = 0``, ``lse = -inf``, ``dq = 0``; rows of a key sequence with no queries get
  ``dk = dv = 0``.

The kernels themselves (one call over packed sequences) are ``usp.kernels.varlen``'s; the dense counterpart of
this adapter is the dense kernel itself, which the ring calls directly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch

from ..merge import merge_attention_
from .base import AttentionKernel, Tensor, WrappedKernelCapabilities, as_mask
from .varlen import VarlenKernel, VarlenSeqs

__all__ = ["VarlenBlock", "VarlenBlockKernel", "VarlenCall"]


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
        self.q_ranges, self.k_ranges = tuple(q_ranges), tuple(k_ranges)
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


class _RowSums:
    """The sum of gradients landing on row ranges of one ``[t, h, d]`` tensor, in ``dtype``, without zero-filling
    it first: a gradient on rows nothing was written to yet is copied, one on written rows added; rows that no
    call reaches are zeroed once at the end."""

    def __init__(self, like: Tensor, dtype: torch.dtype):
        self.total = torch.empty(like.shape, dtype=dtype, device=like.device)
        self.written: List[Tuple[int, int]] = []  # disjoint, sorted

    def _gaps(self, a: int, b: int) -> List[Tuple[int, int]]:
        gaps, at = [], a
        for x, y in self.written:
            if y <= at or x >= b:
                continue
            if x > at:
                gaps.append((at, x))
            at = max(at, y)
        if at < b:
            gaps.append((at, b))
        return gaps

    def add(self, rows: Tuple[int, int], grad: Tensor) -> None:
        a, b = rows
        gaps = self._gaps(a, b)
        if gaps == [(a, b)]:
            self.total[a:b].copy_(grad)
        else:
            for x, y in gaps:
                self.total[x:y].zero_()
            self.total[a:b].add_(grad)
        merged: List[Tuple[int, int]] = []
        for x, y in sorted(self.written + [(a, b)]):
            if merged and x <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], y))
            else:
                merged.append((x, y))
        self.written = merged

    def finish(self) -> Tensor:
        for x, y in self._gaps(0, self.total.shape[0]):
            self.total[x:y].zero_()
        return self.total


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

    #: the ring applies sinks around the block (Note [attention sinks]): a packed block is several calls and
    #: padding rows, so no one call covers each row once
    supports_sinks = False

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
        out_dtype = wide if any(block.merges) else q.dtype  # zeros at rows no call reaches are exact in any dtype
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
            sums = [_RowSums(t, acc) for t in (q0, k0, v0)]
        for call, q_range, k_range in zip(block.calls, block.q_ranges, block.k_ranges):
            # a column slice of the [h, t] LSE is strided: the contract promises kernels a contiguous one
            dq, dk, dv = self.kernel.backward(
                dout0[call.q], q0[call.q], k0[call.k], v0[call.k], out0[call.q], lse0[:, call.q].contiguous(),
                call.seqs, as_mask(call.mask), scale, deterministic=deterministic,
            )
            _fix_empty_backward(dq, dk, dv, call.seqs)
            if block.single:
                return dq.unsqueeze(0), dk.unsqueeze(0), dv.unsqueeze(0)
            sums[0].add(q_range, dq)
            sums[1].add(k_range, dk)
            sums[2].add(k_range, dv)
        grads = [part.finish() for part in sums]
        if block.final:
            grads = [g.to(t.dtype) for g, t in zip(grads, (q0, k0, v0))]
        return tuple(g.unsqueeze(0) for g in grads)

    def __repr__(self) -> str:
        return f"<varlen block kernel over {self.kernel!r}>"
