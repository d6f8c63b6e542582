"""The ring schedule of packed documents: the dense schedule (``usp.layout``) with each block's varlen kernel calls
attached (Note [varlen zigzag layout] in ``usp/varlen.py``; Note [varlen windows] at
``VarlenSchedule._window_calls``). The varlen counterpart of ``usp.layout``'s schedules; the layout is
``usp.layout_varlen``, the ring adapter that runs the calls ``usp.kernels.varlen_block``.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

from .kernels.base import Mask
from .kernels.varlen import VarlenSeqs
from .kernels.varlen_block import VarlenBlock, VarlenCall
from .layout import BlockTask, band_block, normalize_window
from .layout_varlen import VarlenLayout
from .spec import dense_block

__all__ = ["VarlenSchedule"]


class VarlenSchedule:
    """The ring schedule of a packed batch (Note [varlen zigzag layout], Note [document placement]): the dense
    schedule's blocks (``usp.spec.dense_block``) over the cut section of each ring rank's sequence, with each
    block's varlen calls attached as its ``mask`` (the ring loop hands it to ``VarlenBlockKernel``); the diagonal
    block (step 0) also holds the rank's whole documents. Only the cut section's K/V travel
    (``traveling_rows``); with no cut document nothing does, and the ring has one step. Bound to one
    ``VarlenLayout``; reused across calls.

    With a ``window`` that binds on some document, every block's calls come from Note [varlen windows]; a ring step
    whose block no document's window reaches is skipped (``block`` returns ``None``; its K/V still rotate)."""

    sparse = False

    def __init__(self, layout: VarlenLayout, softcap: float = 0.0, window: Tuple[int, int] = (-1, -1)):
        self.layout = layout
        self.softcap = softcap
        left, right = normalize_window(window, layout.causal, max(layout.doc_lengths))
        self.window = None if left == -1 and right in ((-1, 0) if layout.causal else (-1,)) else (left, right)
        self._blocks: Dict[Tuple[int, int], Optional[BlockTask]] = {}

    def traveling_rows(self, local_len: int) -> int:
        """The K/V rows (a prefix of the ring rank's sequence) that go round the ring: the cut section."""
        return self.layout.cut_rows

    def _mask(self, causal: bool) -> Mask:
        return Mask(-1, 0 if causal else -1, self.softcap)

    def _cut_rows(self, step: int, ring_rank: int, ring_size: int) -> Tuple[slice, slice]:
        """``(q_rows, kv_rows)`` of the cut section in a step ``>= 1`` block, as absolute row ranges of our sequence
        and of the visiting (cut-section-only) K/V."""
        cut = self.layout.cut_rows
        q_rows, kv_rows, _ = dense_block(self.layout.causal, step, ring_rank, ring_size, cut)
        return slice(*q_rows.indices(cut)[:2]), slice(*kv_rows.indices(cut)[:2])

    def _regions(self, rows: slice, rank: int, ring_size: int) -> List[Tuple[int, int]]:
        """``(offset from rows.start, chunk index)`` of the chunk groups (one chunk of every cut document) in the cut
        section rows ``rows`` of ring rank ``rank``'s sequence (all of it, its first half or its second half)."""
        if not self.layout.zigzag:
            return [(0, rank)]
        c = sum(self.layout.chunk_sizes)
        tail = 2 * ring_size - 1 - rank
        if rows.stop - rows.start == 2 * c:
            return [(0, rank), (c, tail)]
        return [(0, rank)] if rows.start == 0 else [(0, tail)]

    def _chunk_pieces(self, q_chunk: int, k_chunk: int) -> List[Tuple[int, int, int, int, int]]:
        """``(rows, q position, k position, real queries, real keys)`` of every cut document for query chunk
        ``q_chunk`` against key chunk ``k_chunk``: what ``_calls`` takes. A chunk's real rows are a prefix (padding
        sits at the document's end)."""
        layout = self.layout
        pieces = []
        for j, c in zip(layout.cut_docs, layout.chunk_sizes):
            length = layout.doc_lengths[j]
            pieces.append((c, q_chunk * c, k_chunk * c, min(max(length - q_chunk * c, 0), c),
                           min(max(length - k_chunk * c, 0), c)))
        return pieces

    def _calls(self, q_off: int, k_off: int, docs: List[Tuple[int, int, int, int, int]]) -> List[VarlenCall]:
        """The varlen calls of a region of documents laid out one after another on both sides (block rows from
        ``q_off`` and ``k_off``): per document ``(rows, q position, k position, real queries, real keys)``, its
        ``rows`` query and key rows sitting at those positions of the document, the first ``real`` of each real.

        Padding never enters a sequence with the other side: padding queries are sequences with no keys (out = 0,
        LSE = -inf, dq = 0) and padding keys sequences with no queries (dk = dv = 0), so every padding row of the
        packed path comes out zero without a mask (Note [varlen zigzag layout]). Without a window: one call, each
        document's real rows one sequence (causal when the layout is and the two pieces are the same chunk, else
        full). With a window: Note [varlen windows]. No call for a region with no real query."""
        if not any(real_q for _, _, _, real_q, _ in docs):
            return []
        total = sum(rows for rows, _, _, _, _ in docs)
        if self.window is not None:
            return self._window_calls(q_off, k_off, docs, total)
        causal = self.layout.causal and all(q_pos == k_pos for _, q_pos, k_pos, _, _ in docs)
        seqs = _Sequences()
        for rows, _, _, real_q, real_k in docs:
            seqs.add(real_q, real_k)
            seqs.add(rows - real_q, 0)
            seqs.add(0, rows - real_k)
        return [VarlenCall(slice(q_off, q_off + total), slice(k_off, k_off + total), seqs.varlen(),
                           self._mask(causal))]

    def _window_calls(self, q_off: int, k_off: int, docs: List[Tuple[int, int, int, int, int]],
                      total: int) -> List[VarlenCall]:
        """Note [varlen windows]. The calls of one region of documents (as ``_calls``).

        Per document the window's pieces are ``band_block`` of its real query and key rows at their positions in
        the document: trimmed, each with its own bottom-right ``Mask``. Documents are grouped by that mask, one
        call per distinct mask: documents of one chunk size share it, and so do all documents the window covers
        whole (their mask is plain causal or full). In a call, a document's piece is one sequence; its rows outside
        the piece (padding included), and every row of the documents outside the group, are sequences with no keys
        or no queries (out = 0, lse = -inf, no gradient; coalesced)."""
        left, right = self.window
        groups: Dict[Mask, Dict[int, Tuple[slice, slice]]] = {}
        for j, (rows, q_pos, k_pos, real_q, real_k) in enumerate(docs):
            for q_rows, k_rows, mask in band_block(q_pos, real_q, k_pos, real_k, left, right, self.softcap):
                groups.setdefault(mask, {})[j] = (q_rows, k_rows)
        calls = []
        for mask, pieces in groups.items():
            seqs = _Sequences()
            for j, (c, _, _, _, _) in enumerate(docs):
                q_rows, k_rows = pieces.get(j, (slice(c, c), slice(c, c)))
                seqs.add(q_rows.start, 0)
                seqs.add(0, k_rows.start)
                seqs.add(q_rows.stop - q_rows.start, k_rows.stop - k_rows.start)
                seqs.add(c - q_rows.stop, 0)
                seqs.add(0, c - k_rows.stop)
            calls.append(VarlenCall(slice(q_off, q_off + total), slice(k_off, k_off + total), seqs.varlen(), mask))
        return calls

    def _diagonal_calls(self, ring_rank: int, ring_size: int) -> List[VarlenCall]:
        layout = self.layout
        calls: List[VarlenCall] = []
        if layout.cut_docs:
            regions = self._regions(slice(0, layout.cut_rows), ring_rank, ring_size)
            if layout.zigzag and self.window is None:
                # heads x heads (causal), tails x heads, tails x tails (causal): the tails' two calls are merged
                (_, head), (c, tail) = regions
                calls += self._calls(0, 0, self._chunk_pieces(head, head))
                calls += self._calls(c, 0, self._chunk_pieces(tail, head))
                calls += self._calls(c, c, self._chunk_pieces(tail, tail))
            else:
                calls += [call for q_off, q_chunk in regions for k_off, k_chunk in regions
                          for call in self._calls(q_off, k_off, self._chunk_pieces(q_chunk, k_chunk))]
        whole = layout.whole_lengths(ring_rank)
        pad = layout.ring_tokens - layout.cut_rows - sum(whole)
        # one sequence per whole document, right after the cut section, then the padding (no keys, no queries)
        calls += self._calls(layout.cut_rows, layout.cut_rows,
                             [(n, 0, 0, n, n) for n in whole] + ([(pad, 0, 0, 0, 0)] if pad else []))
        return calls

    def _build(self, step: int, ring_rank: int, ring_size: int) -> Optional[BlockTask]:
        layout = self.layout
        if step == 0:
            calls = self._diagonal_calls(ring_rank, ring_size)
            q_rows = kv_rows = slice(None)
            q_len = k_len = layout.ring_tokens
        else:
            q_rows, kv_rows = self._cut_rows(step, ring_rank, ring_size)
            source = (ring_rank - step) % ring_size
            calls = [call for q_off, q_chunk in self._regions(q_rows, ring_rank, ring_size)
                     for k_off, k_chunk in self._regions(kv_rows, source, ring_size)
                     for call in self._calls(q_off, k_off, self._chunk_pieces(q_chunk, k_chunk))]
            q_len, k_len = q_rows.stop - q_rows.start, kv_rows.stop - kv_rows.start
        if not calls and step > 0:
            return None  # no document's window reaches this block (step 0 always runs: the ring starts its sums)
        block = VarlenBlock(calls, q_len, k_len, final=self.steps(ring_size) == 1)
        return BlockTask(q_rows, kv_rows, layout.causal and step == 0, mask=block, softcap=self.softcap)

    def steps(self, ring_size: int) -> int:
        """Ring steps of this batch: one when no document is cut (nothing travels), else ``ring_size``."""
        return ring_size if self.layout.cut_rows else 1

    def block(self, step: int, ring_rank: int, ring_size: int, local_len: int) -> Optional[BlockTask]:
        if local_len != self.layout.ring_tokens or ring_size != self.layout.ring:
            raise RuntimeError(
                f"varlen schedule built for ring={self.layout.ring}, {self.layout.ring_tokens} rows per ring rank; "
                f"called with ring={ring_size}, {local_len} rows"
            )
        key = (step, ring_rank)
        if key not in self._blocks:
            self._blocks[key] = self._build(step, ring_rank, ring_size)
        return self._blocks[key]


class _Sequences:
    """The ``(queries, keys)`` lengths of one varlen call, built in row order; consecutive sequences with no keys
    (or no queries) coalesce into one, and empty ones are dropped."""

    def __init__(self):
        self.q: List[int] = []
        self.k: List[int] = []

    def add(self, n_q: int, n_k: int) -> None:
        if not n_q and not n_k:
            return
        if self.q and ((n_k == 0 and self.k[-1] == 0) or (n_q == 0 and self.q[-1] == 0)):
            self.q[-1] += n_q
            self.k[-1] += n_k
            return
        self.q.append(n_q)
        self.k.append(n_k)

    def varlen(self) -> VarlenSeqs:
        return VarlenSeqs(self.q, self.k)


def _schedule_for_layout(layout: VarlenLayout, softcap: float = 0.0,
                         window: Tuple[int, int] = (-1, -1)) -> VarlenSchedule:
    """The ``VarlenSchedule`` of ``layout`` with these mask options, built once and held by the layout (its blocks
    keep their ``cu`` tensors per device: ``VarlenSeqs.cu_tensors``)."""
    window = tuple(window)
    return layout.cached(("schedule", softcap, window), lambda: VarlenSchedule(layout, softcap, window))
