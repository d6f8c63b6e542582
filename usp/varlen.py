"""Packed variable-length documents (``cu_seqlens``) through Ulysses x ring, load-balanced per document.

A packed batch is ``[total, heads, head_dim]`` (``flash_attn_varlen_func``'s layout) with document ``j`` at rows
``cu_seqlens[j]:cu_seqlens[j+1]``; no token attends across a document boundary. ``cu_seqlens`` is the *global*
boundaries of the whole packed batch, identical on every rank; everything else (padding, chunking, each rank's
rows, the kernel calls of every ring block) is a pure function of ``(cu_seqlens, ulysses, ring, causal)``, built once
and cached (``varlen_layout``).

Note [varlen zigzag layout]. Load balance must hold per document: a batch of one long document and many short ones
cut contiguously would leave the rank with the long document's tail doing most of the causal work. So every
document is cut on its own, exactly like the dense zigzag (Note [zigzag layout] in ``usp.layout``):

* causal, ``R > 1``: document ``j`` (length ``L_j``) is padded at its end to ``2R * c_j`` tokens,
  ``c_j = ceil(L_j / 2R)``, and cut into ``2R`` chunks of ``c_j``. Ring rank ``r`` holds chunk ``r`` (head) and
  chunk ``2R-1-r`` (tail) of *every* document, all heads first, then all tails::

      ring rank r:  [ head_0  head_1 ... head_n | tail_0  tail_1 ... tail_n ]     (head_j, tail_j: c_j rows)

  so the dense zigzag schedule's row halves still mean "the head chunks" and "the tail chunks" and every rank does
  the same causal work for every document. A ring block is then a few varlen calls whose sequences are the chunks
  (``cu = cumsum(c_j)`` on both sides): the diagonal block is heads x heads (causal) + tails x heads + tails x tails
  (causal), merged; "all queries x the visiting heads" is two calls; "our tails x all visiting K/V" is two calls,
  merged. Every call covers its rows whole, so no kernel needs ``seqused``.
* non-causal, or ``R == 1``: ``R`` chunks per document (``c_j = ceil(L_j / R)``), rank ``r`` holds chunk ``r`` of
  every document; one varlen call per block.
* Ulysses: each ring rank's rows are split into ``U`` equal contiguous pieces (the all-to-all concatenates them
  back, as in the dense path). If the ring rank's row count is not a multiple of ``U``, a padding-only document of
  ``pad_chunk`` rows per chunk is appended.

Sliding windows (``window_size``, over positions inside each document) keep this layout: each block's calls are
the window's trimmed pieces per document, one call per distinct mask (Note [varlen windows] at
``VarlenSchedule._window_calls``).

Padding is never attended. It sits at the end of its document, after every real token, so a causal mask hides it
from every real query: in every block above, a real query only ever meets keys that are earlier in its document,
hence real. Non-causal blocks (``R > 1``) cut each visiting chunk into its real prefix and its padding as separate
key sequences (the padding's query sequence is empty). Padding *queries* do compute something, but their output
is zeroed (``masked_fill``) before it leaves ``long_context_attention_varlen``, so the incoming gradient there is
zero, and a query row with zero gradient contributes nothing to ``dq``, ``dk`` or ``dv``. The returned LSE is
``-inf`` at padding rows.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import numbers
import weakref
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from .attention import (call_fields, check_deterministic, check_device_matches_mesh, check_mask_options, check_qkv,
                        mask_fields, resolve_scale, sequence_parallel_attention)
from .kernels.base import Mask, MaskNeeds
from .consistency import agree
from .kernels.varlen import (
    VarlenBlock,
    VarlenBlockKernel,
    VarlenCall,
    VarlenKernel,
    VarlenSeqs,
    resolve_varlen_backend,
)
from .layout import _all_gather_cat, _normalize_dim, band_block, normalize_window, schedule_for
from .mesh import SequenceParallelMesh

__all__ = [
    "LongContextAttentionVarlen",
    "VarlenLayout",
    "gather_varlen",
    "long_context_attention_varlen",
    "padding_mask_varlen",
    "position_ids_varlen",
    "shard_varlen",
    "varlen_layout",
]

Tensor = torch.Tensor


# ---------------------------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class VarlenLayout:
    """Where every token of a packed batch lives on a ``ulysses x ring`` mesh (Note [varlen zigzag layout]).

    Built by ``varlen_layout``; pure data, identical on every rank. ``chunk_sizes`` has one entry per non-empty
    document in order, plus a last one for the padding-only document when ``pad_chunk > 0``.
    """

    ulysses: int
    ring: int
    causal: bool
    #: packed start row and length of every non-empty document (empty ones are dropped: they have no tokens)
    doc_starts: Tuple[int, ...]
    doc_lengths: Tuple[int, ...]
    #: cu_seqlens[-1]: real tokens in the packed batch
    total: int
    #: chunks each document is cut into: 2R (zigzag) or R
    chunks_per_doc: int
    chunk_sizes: Tuple[int, ...]
    #: chunk size of the padding-only document (0: none)
    pad_chunk: int

    def __post_init__(self):
        # hashed on every attention call (caches keyed on the layout): compute it once
        object.__setattr__(self, "_hash", hash(dataclasses.astuple(self)))

    def __hash__(self) -> int:
        return self._hash

    @property
    def zigzag(self) -> bool:
        return self.chunks_per_doc == 2 * self.ring and self.ring > 1

    @property
    def ring_tokens(self) -> int:
        """Rows of one ring rank's sequence (what the ring loop sees)."""
        return (2 if self.zigzag else 1) * sum(self.chunk_sizes)

    @property
    def local_tokens(self) -> int:
        """Rows of one rank's shard: ``q.shape[0]`` of ``long_context_attention_varlen``."""
        return self.ring_tokens // self.ulysses

    @property
    def padded_total(self) -> int:
        return self.chunks_per_doc * sum(self.chunk_sizes)

    @property
    def padding(self) -> int:
        """Padding tokens over the whole mesh (``padded_total - total``)."""
        return self.padded_total - self.total

    def local_rows(self, ulysses_rank: int, ring_rank: int) -> Tuple[Tensor, Tensor]:
        """``(packed_index, position)`` of this rank's rows, int64 CPU tensors of ``local_tokens``.

        ``packed_index`` is the row in the packed batch (``-1`` for padding); ``position`` the offset inside the
        (padded) document, i.e. the position id that restarts at every document.
        """
        packed, offset = _ring_rows(self, ring_rank)
        rows = slice(ulysses_rank * self.local_tokens, (ulysses_rank + 1) * self.local_tokens)
        return packed[rows], offset[rows]

    def ring_rows(self, ring_rank: int) -> Tuple[Tensor, Tensor]:
        """``local_rows`` for a whole ring rank's sequence (all its Ulysses pieces, in order)."""
        return _ring_rows(self, ring_rank)


@functools.lru_cache(maxsize=256)
def _ring_rows(layout: VarlenLayout, ring_rank: int) -> Tuple[Tensor, Tensor]:
    sizes = torch.tensor(layout.chunk_sizes, dtype=torch.int64)
    n_docs = len(layout.doc_lengths)
    lengths = torch.tensor(layout.doc_lengths + (0,) * (len(sizes) - n_docs), dtype=torch.int64)
    starts = torch.tensor(layout.doc_starts + (layout.total,) * (len(sizes) - n_docs), dtype=torch.int64)
    doc = torch.repeat_interleave(torch.arange(len(sizes)), sizes)  # document of every row of one half
    within = torch.arange(doc.numel()) - torch.repeat_interleave(torch.cumsum(sizes, 0) - sizes, sizes)
    if layout.zigzag:
        tail = 2 * layout.ring - 1 - ring_rank
        offset = torch.cat([ring_rank * sizes[doc] + within, tail * sizes[doc] + within])
        doc = torch.cat([doc, doc])
    else:
        offset = ring_rank * sizes[doc] + within
    packed = torch.where(offset < lengths[doc], starts[doc] + offset, torch.full_like(offset, -1))
    return packed, offset


@functools.lru_cache(maxsize=64)
def _build_layout(cu: Tuple[int, ...], ulysses: int, ring: int, causal: bool) -> VarlenLayout:
    starts, lengths = [], []
    for a, b in zip(cu[:-1], cu[1:]):
        if b > a:
            starts.append(a)
            lengths.append(b - a)
    chunks = 2 * ring if causal and ring > 1 else ring
    sizes = [-(-n // chunks) for n in lengths]
    halves = 2 if chunks == 2 * ring and ring > 1 else 1
    pad_chunk = 0
    while (halves * (sum(sizes) + pad_chunk)) % ulysses:
        pad_chunk += 1
    if pad_chunk:
        sizes.append(pad_chunk)
    return VarlenLayout(
        ulysses=ulysses, ring=ring, causal=causal, doc_starts=tuple(starts), doc_lengths=tuple(lengths),
        total=cu[-1], chunks_per_doc=chunks, chunk_sizes=tuple(sizes), pad_chunk=pad_chunk,
    )


class _CuSeqlensMemo:
    """Host copy of the last CUDA ``cu_seqlens`` seen, so a model passing the same tensor to every layer syncs once.

    Keyed on the tensor object itself (weak reference) and its version counter (bumped by in-place writes).
    """

    def __init__(self):
        self._ref = None
        self._version = -1
        self._value: Tuple[int, ...] = ()

    def host_tuple(self, tensor: Tensor) -> Tuple[int, ...]:
        if tensor.device.type == "cpu":
            return tuple(tensor.tolist())
        if self._ref is not None and self._ref() is tensor and self._version == tensor._version:
            return self._value
        value = tuple(tensor.tolist())  # one device-to-host copy
        self._ref, self._version, self._value = weakref.ref(tensor), tensor._version, value
        return value


_CU_MEMO = _CuSeqlensMemo()


def _cu_seqlens_tuple(cu_seqlens, argument: str = "cu_seqlens") -> Tuple[int, ...]:
    """Validate ``cu_seqlens`` (1-D integer tensor or sequence of ints) and return it as a tuple of ints."""
    if isinstance(cu_seqlens, torch.Tensor):
        if cu_seqlens.dtype == torch.bool or cu_seqlens.is_floating_point() or cu_seqlens.is_complex():
            raise TypeError(f"{argument} must be an integer tensor (int32 like flash-attn), got {cu_seqlens.dtype}")
        if cu_seqlens.ndim != 1:
            raise ValueError(f"{argument} must be 1-D [num_docs + 1], got shape {tuple(cu_seqlens.shape)}")
        values = _CU_MEMO.host_tuple(cu_seqlens.detach())
    elif isinstance(cu_seqlens, (list, tuple)):
        if not all(isinstance(x, numbers.Integral) and not isinstance(x, bool) for x in cu_seqlens):
            raise TypeError(f"{argument} must hold ints, got {cu_seqlens!r}")
        values = tuple(int(x) for x in cu_seqlens)
    else:
        raise TypeError(
            f"{argument} must be a 1-D integer torch.Tensor or a list of ints, got {type(cu_seqlens).__name__}"
        )
    if len(values) < 2:
        raise ValueError(f"{argument} must have at least 2 entries [0, ..., total], got {list(values)}")
    if values[0] != 0:
        raise ValueError(f"{argument} must start at 0 (cumulative document lengths), got {values[0]}")
    if any(b < a for a, b in zip(values[:-1], values[1:])):
        raise ValueError(f"{argument} must be non-decreasing (cumulative document lengths), got {list(values)[:16]}...")
    if values[-1] <= 0:
        raise ValueError(f"{argument} describes no tokens (cu_seqlens[-1] = {values[-1]}); it must be positive")
    return values


def _check_mesh(mesh) -> None:
    if not isinstance(mesh, SequenceParallelMesh):
        raise TypeError(f"mesh must be a usp.SequenceParallelMesh, got {type(mesh).__name__}")


def _check_causal(causal) -> None:
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")


def varlen_layout(cu_seqlens, mesh: SequenceParallelMesh, causal: bool = True) -> VarlenLayout:
    """The layout of the packed batch ``cu_seqlens`` on ``mesh`` (cached; no collectives).

    ``cu_seqlens``: the global document boundaries ``[0, L_0, L_0 + L_1, ..., total]`` (int tensor or list).
    ``layout.local_tokens`` is every rank's shard length; ``layout.padding`` the padding tokens added in total.
    """
    _check_mesh(mesh)
    _check_causal(causal)
    return _build_layout(_cu_seqlens_tuple(cu_seqlens), mesh.ulysses, mesh.ring, causal)


# ---------------------------------------------------------------------------------------------- helpers
def _local_rows(layout: VarlenLayout, mesh: SequenceParallelMesh) -> Tuple[Tensor, Tensor]:
    return layout.local_rows(mesh.ulysses_rank, mesh.ring_rank)


def shard_varlen(
    x: Tensor, cu_seqlens, mesh: SequenceParallelMesh, dim: int = 0, causal: bool = True, pad_value=0
) -> Tensor:
    """This rank's shard of the packed tensor ``x`` along ``dim``, padded per document, in the attention's layout.

    ``x`` is the whole packed batch on every rank (``x.shape[dim] == cu_seqlens[-1]``): hidden states
    ``[total, ...]``, token ids ``[total]``, labels... Padding rows are filled with ``pad_value`` (use ``-100`` for
    labels so the loss skips them). Differentiable (zero gradient at padding). ``causal`` must match the attention.
    Returns ``layout.local_tokens`` rows along ``dim``.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    layout = varlen_layout(cu_seqlens, mesh, causal)
    dim = _normalize_dim(dim, x.ndim)
    if x.shape[dim] != layout.total:
        raise ValueError(
            f"x.shape[{dim}]={x.shape[dim]} must equal cu_seqlens[-1]={layout.total} (the whole packed batch)"
        )
    packed, _ = _local_rows(layout, mesh)
    padding = packed < 0
    local = x.index_select(dim, packed.clamp(min=0).to(x.device))
    if bool(padding.any()):
        shape = [1] * x.ndim
        shape[dim] = -1
        local = local.masked_fill(padding.to(x.device).reshape(shape), pad_value)
    return local


def gather_varlen(x_local: Tensor, cu_seqlens, mesh: SequenceParallelMesh, dim: int = 0, causal: bool = True) -> Tensor:
    """Inverse of ``shard_varlen``: the whole packed batch (padding dropped) on every rank. A collective.

    Not differentiable. Gathers over the Ulysses group, then the ring group, then restores packed order.
    """
    if not isinstance(x_local, torch.Tensor):
        raise TypeError(f"x_local must be a torch.Tensor, got {type(x_local).__name__}")
    layout = varlen_layout(cu_seqlens, mesh, causal)
    dim = _normalize_dim(dim, x_local.ndim)
    if x_local.shape[dim] != layout.local_tokens:
        raise ValueError(
            f"x_local.shape[{dim}]={x_local.shape[dim]} must be the layout's local_tokens={layout.local_tokens}"
        )
    x_local = x_local.contiguous()
    ring_seq = _all_gather_cat(x_local, mesh.ulysses_group, mesh.ulysses, dim)
    everything = _all_gather_cat(ring_seq, mesh.ring_group, mesh.ring, dim)
    order = torch.cat([layout.ring_rows(r)[0] for r in range(mesh.ring)])  # packed row of every gathered row
    real = torch.nonzero(order >= 0).squeeze(1)
    inverse = torch.empty(layout.total, dtype=torch.int64)
    inverse[order[real]] = real
    return everything.index_select(dim, inverse.to(x_local.device))


def position_ids_varlen(cu_seqlens, mesh: SequenceParallelMesh, causal: bool = True, device=None) -> Tensor:
    """This rank's position ids, int64 ``[local_tokens]``: the offset of every row inside its document (restarting
    at 0 at each document), in the order of ``shard_varlen``'s shard. Padding rows continue their document's count
    (the padding-only document counts from 0); their value does not matter, they are never attended."""
    layout = varlen_layout(cu_seqlens, mesh, causal)
    _, position = _local_rows(layout, mesh)
    return position.to(device) if device is not None else position.clone()


def padding_mask_varlen(cu_seqlens, mesh: SequenceParallelMesh, causal: bool = True, device=None) -> Tensor:
    """Bool ``[local_tokens]``: True at this rank's padding rows (e.g. to mask a loss)."""
    layout = varlen_layout(cu_seqlens, mesh, causal)
    packed, _ = _local_rows(layout, mesh)
    mask = packed < 0
    return mask.to(device) if device is not None else mask


@functools.lru_cache(maxsize=64)
def _device_padding(layout: VarlenLayout, ulysses_rank: int, ring_rank: int, device: torch.device) -> Optional[Tensor]:
    """This rank's padding mask on ``device`` (built once), ``None`` when the shard has no padding."""
    packed, _ = layout.local_rows(ulysses_rank, ring_rank)
    padding = packed < 0
    return padding.to(device) if bool(padding.any()) else None


# ---------------------------------------------------------------------------------------------- schedule
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
        task = self._base.block(step, ring_rank, ring_size, local_len)
        if task is None:
            return None
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


@functools.lru_cache(maxsize=64)
def _schedule_for_layout(layout: VarlenLayout, softcap: float = 0.0,
                         window: Tuple[int, int] = (-1, -1)) -> VarlenSchedule:
    return VarlenSchedule(layout, softcap, tuple(window))


# ---------------------------------------------------------------------------------------------- attention
_VARLEN_DIMS = ("total_local_tokens", "heads", "head_dim")


@functools.lru_cache(maxsize=64)
def _documents(layout: VarlenLayout) -> str:
    """The packed batch as the ranks agree on it (``usp.consistency``): readable, plus a digest of every document
    boundary (``cu_seqlens`` that differ only in empty documents give the same layout and the same result)."""
    boundaries = repr((layout.doc_starts, layout.doc_lengths, layout.total)).encode()
    digest = hashlib.blake2b(boundaries, digest_size=8).hexdigest()
    lengths = ", ".join(map(str, layout.doc_lengths[:8])) + (", ..." if len(layout.doc_lengths) > 8 else "")
    return f"[{len(layout.doc_lengths)} documents of lengths {lengths}; {layout.total} tokens; digest {digest}]"


def _validate(q, k, v, cu_seqlens, max_seqlen, mesh, causal, softmax_scale, backend, deterministic=False,
              window_size=(-1, -1), softcap=0.0, sinks=None):
    _check_mesh(mesh)
    check_qkv(q, k, v, mesh, causal, _VARLEN_DIMS)
    window, softcap = check_mask_options(window_size, softcap, sinks, q, causal)
    t, h, d = q.shape
    layout = _build_layout(_cu_seqlens_tuple(cu_seqlens), mesh.ulysses, mesh.ring, causal)
    longest = max(layout.doc_lengths)
    if max_seqlen is not None:
        if isinstance(max_seqlen, torch.Tensor) and max_seqlen.numel() == 1 and not max_seqlen.is_floating_point():
            max_seqlen = int(max_seqlen)
        if not isinstance(max_seqlen, numbers.Integral) or isinstance(max_seqlen, bool):
            raise TypeError(f"max_seqlen must be an int or None, got {type(max_seqlen).__name__}")
        if max_seqlen < longest:
            raise ValueError(
                f"max_seqlen={max_seqlen} is smaller than the longest document in cu_seqlens ({longest}); "
                f"pass max_seqlen >= {longest} or None"
            )
    if t != layout.local_tokens:
        raise ValueError(
            f"q.shape[0]={t} but cu_seqlens (total {layout.total}, {len(layout.doc_lengths)} documents) on this "
            f"mesh (ulysses={mesh.ulysses}, ring={mesh.ring}, causal={causal}) gives {layout.local_tokens} rows per "
            f"rank; shard the packed batch with usp.shard_varlen(x, cu_seqlens, mesh, causal={causal})"
        )
    scale = resolve_scale(softmax_scale, d)
    check_deterministic(deterministic)
    window = normalize_window(window, causal, longest)  # bounds no document reaches are no bounds
    binds = window != (-1, 0 if causal else -1)
    needs = MaskNeeds(window=binds, softcap=softcap > 0, v_head_dim=v.shape[-1] if v.shape[-1] != d else None)
    kernel = resolve_varlen_backend(backend, q.device, q.dtype, d, deterministic, needs)
    check_device_matches_mesh(q, mesh)
    return layout, kernel, scale, window, softcap


def agreed_call(q, k, v, cu_seqlens, max_seqlen, mesh, causal, softmax_scale, return_lse, backend,
                deterministic, window_size=(-1, -1), softcap=0.0, sinks=None, with_softcap=False):
    """Validate a packed call and agree on it across the ranks (Note [call agreement]): ``(layout, kernel,
    scale)``."""
    return agree(  # every rank validated and made the same call
        mesh, "long_context_attention_varlen",
        lambda: _validate(q, k, v, cu_seqlens, max_seqlen, mesh, causal, softmax_scale, backend, deterministic,
                          window_size, softcap, sinks),
        lambda checked: dict(call_fields(q, k, v, mesh, _VARLEN_DIMS, causal, checked[2], return_lse, checked[1]),
                             documents=_documents(checked[0]), deterministic=deterministic,
                             **mask_fields(checked[3], checked[4], sinks, v)),
    )[:5 if with_softcap else 3]


def long_context_attention_varlen(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens,
    max_seqlen: Optional[int],
    mesh: SequenceParallelMesh,
    causal: bool = True,
    softmax_scale: Optional[float] = None,
    return_lse: bool = False,
    backend: Union[str, VarlenKernel] = "auto",
    deterministic: bool = False,
    window_size: Tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    sinks: Optional[Tensor] = None,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Exact attention over packed documents sharded across ``mesh`` (Ulysses x ring), no attention across documents.

    Args:
        q: ``[total_local_tokens, heads, head_dim]``, this rank's shard of the packed batch as ``usp.shard_varlen``
            makes it (``varlen_layout(cu_seqlens, mesh, causal).local_tokens`` rows, padding included).
        k, v: ``[total_local_tokens, kv_heads, head_dim]``; ``heads % kv_heads == 0`` (GQA/MQA).
        cu_seqlens: the *global* document boundaries of the whole packed batch, ``[0, L_0, L_0 + L_1, ..., total]``
            (int32 tensor like flash-attn, int64 or a list of ints also accepted; empty documents allowed),
            identical on every rank. A CPU tensor (or the same CUDA tensor for every layer) avoids a device sync.
        max_seqlen: the longest document (checked, may be larger) or None.
        mesh: the ``usp.SequenceParallelMesh``; ``heads`` must be divisible by ``mesh.ulysses``.
        causal: causal mask inside each document, over positions in the document.
        softmax_scale: score scale, default ``head_dim ** -0.5``.
        return_lse: also return the LSE ``[heads, total_local_tokens]`` (float32 (float64 for float64 inputs), -inf
            at padding rows; the flash-attn varlen layout; not differentiable).
        backend: "auto" (fa4, then torch_flash, cudnn, reference), a name of ``usp.kernels.varlen.VARLEN_BACKENDS``,
            or a ``VarlenKernel``.
        deterministic: bitwise-repeatable out and gradients (see ``usp.long_context_attention``).
        window_size: as ``usp.long_context_attention``, over positions inside each document (query ``i`` of a
            document sees its keys ``j`` with ``i - left <= j <= i + right``); needs a varlen kernel with windows
            (reference, fa4, fa2). Same shards as without it (Note [varlen windows]).
        softcap, sinks: as ``usp.long_context_attention`` (softcap needs a varlen kernel with it: reference, fa4,
            fa2; sinks work with every kernel).

    Returns:
        ``out [total_local_tokens, heads, v_head_dim]`` in the input dtype (zero at padding rows), and ``lse`` if
        asked. Differentiable with respect to q, k, v and sinks (zero gradient at padding rows).
    """
    if torch.compiler.is_compiling():  # one custom op for dynamo (Note [compiled attention] in usp.compiled)
        from .compiled import compiled_attention

        return compiled_attention(q, k, v, mesh, (cu_seqlens, max_seqlen), dict(
            causal=causal, softmax_scale=softmax_scale, return_lse=return_lse, backend=backend,
            deterministic=deterministic, window_size=window_size, softcap=softcap), sinks)
    layout, kernel, scale, window, softcap = agreed_call(q, k, v, cu_seqlens, max_seqlen, mesh, causal, softmax_scale,
                                                    return_lse, backend, deterministic, window_size, softcap, sinks,
                                                    with_softcap=True)
    out, lse = sequence_parallel_attention(  # one packed row: [1, t, h, d]
        q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), mesh, VarlenBlockKernel(kernel),
        _schedule_for_layout(layout, softcap, window), scale, return_lse, deterministic=deterministic, sinks=sinks,
    )
    out = out[0]
    padding = _device_padding(layout, mesh.ulysses_rank, mesh.ring_rank, out.device)
    if padding is not None:
        # zero output at padding rows; its backward zeroes the incoming gradient there (Note [varlen zigzag layout])
        out = out.masked_fill(padding[:, None, None], 0.0)
    if not return_lse:
        return out
    lse = lse[0]
    if padding is not None:
        lse = lse.masked_fill(padding[None, :], float("-inf"))
    return out, lse


class LongContextAttentionVarlen(nn.Module):
    """Module form of ``long_context_attention_varlen``: ``forward(q, k, v, cu_seqlens, max_seqlen=None)``.

    Args:
        mesh: the ``usp.SequenceParallelMesh`` to run on.
        causal: causal mask inside each document.
        softmax_scale: default ``head_dim ** -0.5``.
        backend: varlen kernel choice, "auto" by default; ``resolved_backend(q)`` tells which kernel runs.
        deterministic: bitwise-repeatable out and gradients (see ``usp.long_context_attention``).
        window_size, softcap: as ``long_context_attention_varlen``; ``sinks`` go to ``forward``.
    """

    def __init__(
        self,
        mesh: SequenceParallelMesh,
        causal: bool = True,
        softmax_scale: Optional[float] = None,
        backend: Union[str, VarlenKernel] = "auto",
        deterministic: bool = False,
        window_size: Tuple[int, int] = (-1, -1),
        softcap: float = 0.0,
    ):
        super().__init__()
        _check_mesh(mesh)
        _check_causal(causal)
        check_deterministic(deterministic)
        self.mesh = mesh
        self.causal = causal
        self.softmax_scale = softmax_scale
        self.backend = backend
        self.deterministic = deterministic
        self.window_size = window_size
        self.softcap = softcap

    def resolved_backend(self, q: Tensor) -> VarlenKernel:
        """The varlen kernel that runs for inputs like ``q`` (device, dtype, head_dim)."""
        left, right = self.window_size  # a window may still bind on no document of some batch
        window = left != -1 or (right != -1 and not (self.causal and right == 0))
        return resolve_varlen_backend(self.backend, q.device, q.dtype, q.shape[-1], self.deterministic,
                                      MaskNeeds(window=window, softcap=bool(self.softcap)))

    def forward(self, q: Tensor, k: Tensor, v: Tensor, cu_seqlens, max_seqlen: Optional[int] = None,
                sinks: Optional[Tensor] = None) -> Tensor:
        """``q [t_local, h, d]``, ``k, v [t_local, h_kv, d]``, global ``cu_seqlens`` -> ``[t_local, h, d]``."""
        return long_context_attention_varlen(
            q, k, v, cu_seqlens, max_seqlen, self.mesh, causal=self.causal, softmax_scale=self.softmax_scale,
            backend=self.backend, deterministic=self.deterministic, window_size=self.window_size,
            softcap=self.softcap, sinks=sinks,
        )

    def extra_repr(self) -> str:
        deterministic = ", deterministic=True" if self.deterministic else ""
        return f"mesh={self.mesh!r}, causal={self.causal}, backend={self.backend!r}{deterministic}"
