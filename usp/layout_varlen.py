"""Where every token of a packed batch lives on the mesh (Note [varlen zigzag layout] in ``usp/varlen.py``): the
``VarlenLayout``, built once per ``(cu_seqlens, ulysses, ring, causal)``, and the helpers that shard, gather and
number a packed batch in it. The varlen counterpart of ``usp.layout`` (the ring schedule is
``usp.schedule_varlen``, the public API ``usp.varlen``).

Caches: the only process-wide one is ``_build_layout``'s (bounded, keyed by the host ``cu_seqlens`` tuple); what
is built from a layout (rows, padding masks on a device, schedules and their per-device ``cu`` tensors) is held by
the layout itself (``VarlenLayout.cached``) and released with it.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import numbers
import weakref
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from .layout import _all_gather_cat, _normalize_dim
from .mesh import SequenceParallelMesh
from .spec import varlen_chunks_per_doc, varlen_placement, varlen_ring_rows

__all__ = ["VarlenLayout", "gather_varlen", "padding_mask_varlen", "position_ids_varlen", "shard_varlen",
           "varlen_layout"]

Tensor = torch.Tensor


@dataclass(frozen=True)
class VarlenLayout:
    """Where every token of a packed batch lives on a ``ulysses x ring`` mesh (Note [varlen zigzag layout]).

    Built by ``varlen_layout``; pure data, identical on every rank. Ring rank ``r``'s sequence is
    ``[cut section | whole section]``: the chunks of the cut documents (heads, then tails with the zigzag:
    ``cut_rows`` rows, the only rows whose K/V travel round the ring), then the documents ``whole_docs[r]`` in order,
    then padding up to ``ring_tokens``.
    """

    ulysses: int
    ring: int
    causal: bool
    #: packed start row and length of every non-empty document (empty ones are dropped: they have no tokens)
    doc_starts: Tuple[int, ...]
    doc_lengths: Tuple[int, ...]
    #: cu_seqlens[-1]: real tokens in the packed batch
    total: int
    #: chunks each cut document is cut into: 2R (zigzag) or R
    chunks_per_doc: int
    #: documents cut over the ring (indices into ``doc_lengths``, ascending; Note [document placement])
    cut_docs: Tuple[int, ...]
    #: chunk size ``c_j`` of every cut document, in ``cut_docs`` order
    chunk_sizes: Tuple[int, ...]
    #: per ring rank, the documents it holds whole (indices into ``doc_lengths``, ascending)
    whole_docs: Tuple[Tuple[int, ...], ...]
    #: rows of every ring rank's sequence (``usp.spec.varlen_ring_rows``): the cut documents' chunks, then the
    #: rank's whole documents, then padding
    ring_tokens: int

    def __post_init__(self):
        # hashed on every attention call (caches keyed on the layout): compute it once
        object.__setattr__(self, "_hash", hash(dataclasses.astuple(self)))
        # what is built from this layout (rows, padding masks per device, schedules): held here, released with it
        object.__setattr__(self, "_memo", {})

    def cached(self, key, build):
        """``build()`` once per ``key`` for this layout: the derived rows, device tensors (keyed by device) and
        schedules live on the layout that owns them, not in process-wide caches."""
        memo = self._memo
        if key not in memo:
            memo[key] = build()
        return memo[key]

    def __hash__(self) -> int:
        return self._hash

    @property
    def zigzag(self) -> bool:
        return self.chunks_per_doc == 2 * self.ring and self.ring > 1

    @property
    def cut_rows(self) -> int:
        """Rows of the cut section of every ring rank's sequence (the K/V rows the ring rotates)."""
        return (2 if self.zigzag else 1) * sum(self.chunk_sizes)

    def whole_lengths(self, ring_rank: int) -> Tuple[int, ...]:
        """Lengths of the documents ring rank ``ring_rank`` holds whole, in the order of its whole section."""
        return tuple(self.doc_lengths[j] for j in self.whole_docs[ring_rank])

    @property
    def local_tokens(self) -> int:
        """Rows of one rank's shard: ``q.shape[0]`` of ``long_context_attention_varlen``."""
        return self.ring_tokens // self.ulysses

    @property
    def padded_total(self) -> int:
        return self.ring * self.ring_tokens

    @property
    def padding(self) -> int:
        """Padding tokens over the whole mesh (``padded_total - total``)."""
        return self.padded_total - self.total

    def local_rows(self, ulysses_rank: int, ring_rank: int) -> Tuple[Tensor, Tensor]:
        """``(packed_index, position)`` of this rank's rows, int64 CPU tensors of ``local_tokens``.

        ``packed_index`` is the row in the packed batch (``-1`` for padding); ``position`` the offset inside the
        (padded) document, i.e. the position id that restarts at every document.
        """
        packed, offset = self.ring_rows(ring_rank)
        rows = slice(ulysses_rank * self.local_tokens, (ulysses_rank + 1) * self.local_tokens)
        return packed[rows], offset[rows]

    def ring_rows(self, ring_rank: int) -> Tuple[Tensor, Tensor]:
        """``local_rows`` for a whole ring rank's sequence (all its Ulysses pieces, in order)."""
        return self.cached(("rows", ring_rank), lambda: _ring_rows(self, ring_rank))

    def device_padding(self, ulysses_rank: int, ring_rank: int, device: torch.device) -> Optional[Tensor]:
        """The padding mask of rank ``(ulysses_rank, ring_rank)``'s shard on ``device`` (built once per device),
        ``None`` when the shard has no padding."""
        def build() -> Optional[Tensor]:
            packed, _ = self.local_rows(ulysses_rank, ring_rank)
            padding = packed < 0
            return padding.to(device) if bool(padding.any()) else None

        return self.cached(("padding", ulysses_rank, ring_rank, torch.device(device)), build)

    def documents(self) -> str:
        """The packed batch as the ranks agree on it (``usp.consistency``): readable, plus a digest of every
        document boundary (``cu_seqlens`` that differ only in empty documents give the same layout and the same
        result)."""
        def build() -> str:
            boundaries = repr((self.doc_starts, self.doc_lengths, self.total)).encode()
            digest = hashlib.blake2b(boundaries, digest_size=8).hexdigest()
            lengths = ", ".join(map(str, self.doc_lengths[:8])) + (", ..." if len(self.doc_lengths) > 8 else "")
            return f"[{len(self.doc_lengths)} documents of lengths {lengths}; {self.total} tokens; digest {digest}]"

        return self.cached(("documents",), build)


def _ring_rows(layout: VarlenLayout, ring_rank: int) -> Tuple[Tensor, Tensor]:
    cut = layout.cut_docs
    sizes = torch.tensor(layout.chunk_sizes, dtype=torch.int64)
    lengths = torch.tensor([layout.doc_lengths[j] for j in cut], dtype=torch.int64)
    starts = torch.tensor([layout.doc_starts[j] for j in cut], dtype=torch.int64)
    doc = torch.repeat_interleave(torch.arange(len(sizes)), sizes)  # cut document of every row of one half
    within = torch.arange(doc.numel()) - torch.repeat_interleave(torch.cumsum(sizes, 0) - sizes, sizes)
    if layout.zigzag:
        tail = 2 * layout.ring - 1 - ring_rank
        offset = torch.cat([ring_rank * sizes[doc] + within, tail * sizes[doc] + within])
        doc = torch.cat([doc, doc])
    else:
        offset = ring_rank * sizes[doc] + within
    packed = torch.where(offset < lengths[doc], starts[doc] + offset, torch.full_like(offset, -1))
    # the whole section: this rank's whole documents in order, then padding (position ids counting from 0)
    whole = [torch.arange(layout.doc_lengths[j], dtype=torch.int64) for j in layout.whole_docs[ring_rank]]
    whole_starts = [layout.doc_starts[j] for j in layout.whole_docs[ring_rank]]
    pad = layout.ring_tokens - layout.cut_rows - sum(layout.whole_lengths(ring_rank))
    packed = torch.cat([packed] + [start + rows for start, rows in zip(whole_starts, whole)]
                       + [torch.full((pad,), -1, dtype=torch.int64)])
    offset = torch.cat([offset] + whole + [torch.arange(pad, dtype=torch.int64)])
    return packed, offset


@functools.lru_cache(maxsize=64)
def _build_layout(cu: Tuple[int, ...], ulysses: int, ring: int, causal: bool) -> VarlenLayout:
    starts, lengths = [], []
    for a, b in zip(cu[:-1], cu[1:]):
        if b > a:
            starts.append(a)
            lengths.append(b - a)
    # the rules are usp.spec's (the planner prices the same placement)
    cut, whole = varlen_placement(lengths, ring, causal)
    chunks = varlen_chunks_per_doc(ring, causal)
    sizes = tuple(-(-lengths[j] // chunks) for j in cut)
    held = tuple(sum(lengths[j] for j in docs) for docs in whole)
    return VarlenLayout(
        ulysses=ulysses, ring=ring, causal=causal, doc_starts=tuple(starts), doc_lengths=tuple(lengths),
        total=cu[-1], chunks_per_doc=chunks, cut_docs=cut, chunk_sizes=sizes, whole_docs=whole,
        ring_tokens=varlen_ring_rows(sum(sizes), held, ulysses, ring, causal),
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


# ------------------------------------------------------------------------------------------------ helpers
def _local_rows(layout: VarlenLayout, mesh: SequenceParallelMesh) -> Tuple[Tensor, Tensor]:
    return layout.local_rows(mesh.ulysses_rank, mesh.ring_rank)


def _checked_layout(x, argument: str, cu_seqlens, mesh, dim: int, causal: bool, local: bool):
    """``(layout, dim)`` for a tensor that holds the whole packed batch (``local=False``: ``cu_seqlens[-1]`` rows
    along ``dim``) or this rank's shard of it (``local=True``: ``layout.local_tokens`` rows); raises naming
    ``argument`` otherwise."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{argument} must be a torch.Tensor, got {type(x).__name__}")
    layout = varlen_layout(cu_seqlens, mesh, causal)
    dim = _normalize_dim(dim, x.ndim)
    rows = layout.local_tokens if local else layout.total
    if x.shape[dim] != rows:
        what = f"the layout's local_tokens={rows}" if local else \
            f"equal cu_seqlens[-1]={rows} (the whole packed batch)"
        raise ValueError(f"{argument}.shape[{dim}]={x.shape[dim]} must {'be ' if local else ''}{what}")
    return layout, dim


def shard_varlen(
    x: Tensor, cu_seqlens, mesh: SequenceParallelMesh, dim: int = 0, causal: bool = True, pad_value=0
) -> Tensor:
    """This rank's shard of the packed tensor ``x`` along ``dim``, padded per document, in the attention's layout.

    ``x`` is the whole packed batch on every rank (``x.shape[dim] == cu_seqlens[-1]``): hidden states
    ``[total, ...]``, token ids ``[total]``, labels... Padding rows are filled with ``pad_value`` (use ``-100`` for
    labels so the loss skips them). Differentiable (zero gradient at padding). ``causal`` must match the attention.
    Returns ``layout.local_tokens`` rows along ``dim``.
    """
    layout, dim = _checked_layout(x, "x", cu_seqlens, mesh, dim, causal, local=False)
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
    layout, dim = _checked_layout(x_local, "x_local", cu_seqlens, mesh, dim, causal, local=True)
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
    (the padding after a rank's whole documents counts from 0); their value does not matter, they are never attended."""
    layout = varlen_layout(cu_seqlens, mesh, causal)
    _, position = _local_rows(layout, mesh)
    return position.to(device) if device is not None else position.clone()


def padding_mask_varlen(cu_seqlens, mesh: SequenceParallelMesh, causal: bool = True, device=None) -> Tensor:
    """Bool ``[local_tokens]``: True at this rank's padding rows (e.g. to mask a loss)."""
    layout = varlen_layout(cu_seqlens, mesh, causal)
    packed, _ = _local_rows(layout, mesh)
    mask = packed < 0
    return mask.to(device) if device is not None else mask


def _documents(layout: VarlenLayout) -> str:
    """``layout.documents()`` (what the ranks agree on)."""
    return layout.documents()


def _device_padding(layout: VarlenLayout, ulysses_rank: int, ring_rank: int, device: torch.device) -> Optional[Tensor]:
    """``layout.device_padding(...)``: this rank's padding mask on ``device``, ``None`` without padding."""
    return layout.device_padding(ulysses_rank, ring_rank, device)
