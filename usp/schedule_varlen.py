"""The ring schedule of packed documents: the dense schedule (``usp.layout``) with each block's varlen kernel calls
attached (Note [varlen zigzag layout] in ``usp/varlen.py``; Note [varlen windows] at
``VarlenSchedule._window_calls``). The varlen counterpart of ``usp.layout``'s schedules; the layout is
``usp.layout_varlen``, the ring adapter that runs the calls ``usp.kernels.varlen_block``.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Tuple

from .kernels.base import Mask
from .kernels.varlen import VarlenSeqs
from .kernels.varlen_block import VarlenBlock, VarlenCall
from .layout import band_block, normalize_window, schedule_for
from .layout_varlen import VarlenLayout

__all__ = ["VarlenSchedule"]


class VarlenSchedule:
    """The dense ring schedule (``usp.layout.schedule_for``) with each block's varlen calls attached as its
    ``mask`` (the ring loop hands it to ``VarlenBlockKernel``). Bound to one ``VarlenLayout``; reused across calls.

    With a ``window`` that binds on some document, every block's calls come from Note [varlen windows]; a ring step
    whose block no document's window reaches is skipped (``block`` returns ``None``; its K/V still rotate)."""

    sparse = False

    def __init__(self, layout: VarlenLayout, softcap: float = 0.0, window: Tuple[int, int] = (-1, -1)):
        self.layout = layout
        self.softcap = softcap
        left, right = normalize_window(window, layout.causal, max(layout.doc_lengths))
        self.window = None if left == -1 and right in ((-1, 0) if layout.causal else (-1,)) else (left, right)
        self._base = schedule_for(layout.causal)
        m = self._mask = lambda causal: Mask(-1, 0 if causal else -1, softcap)  # noqa: E731
        self._by_source: Dict[int, VarlenBlock] = {}
        self._windowed: Dict[Tuple[int, int], Optional[VarlenBlock]] = {}
        sizes = layout.chunk_sizes
        chunks = VarlenSeqs(sizes, sizes)
        if layout.zigzag and self.window is None:
            c = sum(sizes)
            heads, tails = slice(0, c), slice(c, 2 * c)
            self._diagonal = VarlenBlock(
                [VarlenCall(heads, heads, chunks, m(True)), VarlenCall(tails, heads, chunks, m(False)),
                 VarlenCall(tails, tails, chunks, m(True))], 2 * c, 2 * c,
            )
            # source < rank: all our rows x the visiting heads (the ring passes only those: `c` key rows)
            self._visiting_heads = VarlenBlock(
                [VarlenCall(heads, heads, chunks, m(False)), VarlenCall(tails, heads, chunks, m(False))], 2 * c, c,
            )
            # source > rank: our tails (the ring passes only those: `c` query rows) x all visiting rows
            self._our_tails = VarlenBlock(
                [VarlenCall(heads, heads, chunks, m(False)), VarlenCall(heads, tails, chunks, m(False))], c, 2 * c,
            )

    def _contiguous_block(self, source: int) -> VarlenBlock:
        if source not in self._by_source:
            layout = self.layout
            n_docs = len(layout.doc_lengths)
            q_lengths: List[int] = []
            k_lengths: List[int] = []
            for j, c in enumerate(layout.chunk_sizes):
                # real rows of this document in the visiting chunk: a prefix (padding sits at the document's end)
                if j < n_docs:
                    real = min(max(layout.doc_lengths[j] - source * c, 0), c)
                else:  # the padding-only document attends itself: inert
                    real = c
                q_lengths.append(c)
                k_lengths.append(real)
                if real < c:  # the padding as its own key sequence, with no queries
                    q_lengths.append(0)
                    k_lengths.append(c - real)
            seqs = VarlenSeqs(q_lengths, k_lengths)
            total = sum(layout.chunk_sizes)
            self._by_source[source] = VarlenBlock(
                [VarlenCall(slice(0, total), slice(0, total), seqs, self._mask(layout.causal))], total, total
            )
        return self._by_source[source]

    def _regions(self, rows: slice, rank: int, ring_size: int) -> List[Tuple[int, int]]:
        """``(block row offset, chunk index)`` of the chunk groups (one chunk of every document) in ``rows`` of ring
        rank ``rank``'s sequence (``rows`` as the base schedule gives them: all, first half, second half)."""
        if not self.layout.zigzag:
            return [(0, rank)]
        tail = 2 * ring_size - 1 - rank
        if rows == slice(None):
            return [(0, rank), (sum(self.layout.chunk_sizes), tail)]
        return [(0, rank)] if rows.start == 0 else [(0, tail)]

    def _window_calls(self, q_off: int, q_chunk: int, k_off: int, k_chunk: int) -> List[VarlenCall]:
        """Note [varlen windows]. The calls of one pair of chunk groups: query chunk ``q_chunk`` of every document
        (block rows from ``q_off``) against key chunk ``k_chunk`` of every document (from ``k_off``).

        Per document ``j`` (chunk size ``c``) the window's pieces are ``band_block`` of the two chunks at their
        positions in the document (``q_chunk * c``, ``k_chunk * c``): trimmed, each with its own bottom-right
        ``Mask``. Documents are grouped by that mask, one call per distinct mask: documents of one chunk size
        share it, and so do all documents the window covers whole (their mask is plain causal or full). In a call,
        a document's piece is one sequence; its rows outside the piece, and every row of the documents outside
        the group, are sequences with no keys or no queries (out = 0, lse = -inf, no gradient; coalesced).
        Padding: causal, padding keys come after every real query (the causal band hides them); non-causal, only
        the real prefix of a key chunk enters ``band_block`` (its mask then depends on that prefix too: the
        chunk holding a document's end may need its own call). The padding-only document gets no keys."""
        layout, (left, right) = self.layout, self.window
        n_docs = len(layout.doc_lengths)
        groups: Dict[Mask, Dict[int, Tuple[slice, slice]]] = {}
        for j, c in enumerate(layout.chunk_sizes[:n_docs]):
            keys = c if layout.causal else min(max(layout.doc_lengths[j] - k_chunk * c, 0), c)
            for q_rows, k_rows, mask in band_block(q_chunk * c, c, k_chunk * c, keys, left, right, self.softcap):
                groups.setdefault(mask, {})[j] = (q_rows, k_rows)
        total = sum(layout.chunk_sizes)
        calls = []
        for mask, pieces in groups.items():
            q_lengths: List[int] = []
            k_lengths: List[int] = []

            def add(n_q: int, n_k: int) -> None:
                if not n_q and not n_k:
                    return
                if (n_k == 0 and q_lengths and k_lengths[-1] == 0) or (n_q == 0 and q_lengths and q_lengths[-1] == 0):
                    q_lengths[-1] += n_q  # same kind as the last sequence (no keys / no queries): one sequence
                    k_lengths[-1] += n_k
                    return
                q_lengths.append(n_q)
                k_lengths.append(n_k)

            for j, c in enumerate(layout.chunk_sizes):
                q_rows, k_rows = pieces.get(j, (slice(c, c), slice(c, c)))
                add(q_rows.start, 0)
                add(0, k_rows.start)
                add(q_rows.stop - q_rows.start, k_rows.stop - k_rows.start)
                add(c - q_rows.stop, 0)
                add(0, c - k_rows.stop)
            calls.append(VarlenCall(slice(q_off, q_off + total), slice(k_off, k_off + total),
                                    VarlenSeqs(q_lengths, k_lengths), mask))
        return calls

    def _windowed_block(self, task, step: int, ring_rank: int, ring_size: int) -> Optional[VarlenBlock]:
        key = (step, ring_rank)
        if key not in self._windowed:
            source = (ring_rank - step) % ring_size
            calls = [call for q_off, q_chunk in self._regions(task.q_rows, ring_rank, ring_size)
                     for k_off, k_chunk in self._regions(task.kv_rows, source, ring_size)
                     for call in self._window_calls(q_off, q_chunk, k_off, k_chunk)]
            total = sum(self.layout.chunk_sizes)
            halves = 2 if self.layout.zigzag else 1
            q_len = total * (halves if task.q_rows == slice(None) else 1)
            k_len = total * (halves if task.kv_rows == slice(None) else 1)
            # step 0 always runs (the ring loop starts its sums there), possibly as a block of no calls
            block = VarlenBlock(calls, q_len, k_len, final=ring_size == 1) if calls or step == 0 else None
            self._windowed[key] = block
        return self._windowed[key]

    def block(self, step: int, ring_rank: int, ring_size: int, local_len: int):
        if local_len != self.layout.ring_tokens or ring_size != self.layout.ring:
            raise RuntimeError(
                f"varlen schedule built for ring={self.layout.ring}, {self.layout.ring_tokens} rows per ring rank; "
                f"called with ring={ring_size}, {local_len} rows"
            )
        task = self._base.block(step, ring_rank, ring_size, local_len)  # the dense block: always one
        if self.window is not None:
            mask = self._windowed_block(task, step, ring_rank, ring_size)
            return None if mask is None else dataclasses.replace(task, mask=mask)
        if self.layout.zigzag:
            if step == 0:
                mask = self._diagonal
            elif task.q_rows == slice(None):
                mask = self._visiting_heads
            else:
                mask = self._our_tails
        else:
            mask = self._contiguous_block((ring_rank - step) % ring_size)
        return dataclasses.replace(task, mask=mask)


def _schedule_for_layout(layout: VarlenLayout, softcap: float = 0.0,
                         window: Tuple[int, int] = (-1, -1)) -> VarlenSchedule:
    """The ``VarlenSchedule`` of ``layout`` with these mask options, built once and held by the layout (its blocks
    keep their ``cu`` tensors per device: ``VarlenSeqs.cu_tensors``)."""
    window = tuple(window)
    return layout.cached(("schedule", softcap, window), lambda: VarlenSchedule(layout, softcap, window))
