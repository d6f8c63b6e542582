"""How the global sequence is laid out over the mesh, and the ring schedule that goes with each layout.

Note [zigzag layout]. With causal attention, rank ``r`` of a ring of ``R`` over contiguous chunks would do ``r + 1``
blocks of work: the last rank ``R`` times the first. Cutting the sequence into ``2R`` chunks and giving ring rank
``r`` chunks ``r`` and ``2R - 1 - r`` ("zigzag", or head-tail) gives every rank the same work: at ring step 0 the
local diagonal block (causal); at every later step exactly half a block (either all local queries against the first
half of the visiting K/V, or the second half of the local queries against all of it, see ``ZigzagCausalSchedule``).
Non-causal attention, and any attention with ``R == 1``, uses contiguous chunks.

Inside a ring rank's sequence, Ulysses rank ``u`` holds the ``u``-th of ``U`` equal pieces, so the Ulysses
all-to-all (which concatenates the pieces in rank order) rebuilds exactly the ring rank's sequence.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist

from .kernels.base import Mask
from .mesh import SequenceParallelMesh
# the layout rules and the window arithmetic live in usp.spec (torch-free: the planner reads them too)
from .spec import (Layout, SlidingWindow, band_pieces, choose_layout, dense_block, normalize_window,
                   required_multiple, sliding_window)

__all__ = ["Layout", "choose_layout", "required_multiple", "position_ids", "shard", "gather"]


def check_sequence_length(seqlen: int, ulysses: int, ring: int, causal: bool, argument: str = "seqlen") -> None:
    multiple = required_multiple(ulysses, ring, causal)
    if seqlen <= 0 or seqlen % multiple:
        why = (
            f"causal attention over a ring of {ring} uses the zigzag layout of 2*ring={2 * ring} chunks, "
            f"each ring rank's part split over ulysses={ulysses}"
            if choose_layout(ring, causal) is Layout.ZIGZAG
            else f"the sequence is split into ulysses*ring={ring * ulysses} contiguous shards"
        )
        raise ValueError(
            f"{argument}={seqlen}: the global sequence length must be a positive multiple of {multiple} "
            f"({why}); pad it to {max(multiple, -(-seqlen // multiple) * multiple)}"
        )


def _ring_positions(seqlen: int, ring: int, ring_rank: int, layout: Layout) -> torch.Tensor:
    if layout is Layout.ZIGZAG:
        chunk = seqlen // (2 * ring)
        return torch.cat(
            [
                torch.arange(ring_rank * chunk, (ring_rank + 1) * chunk),
                torch.arange((2 * ring - 1 - ring_rank) * chunk, (2 * ring - ring_rank) * chunk),
            ]
        )
    per_ring = seqlen // ring
    return torch.arange(ring_rank * per_ring, (ring_rank + 1) * per_ring)


def positions_for(seqlen: int, ulysses: int, ring: int, ulysses_rank: int, ring_rank: int, causal: bool):
    """Global positions held by (ulysses_rank, ring_rank), in local order. Pure function; no collectives."""
    check_sequence_length(seqlen, ulysses, ring, causal)
    ring_seq = _ring_positions(seqlen, ring, ring_rank, choose_layout(ring, causal))
    piece = ring_seq.numel() // ulysses
    return ring_seq[ulysses_rank * piece : (ulysses_rank + 1) * piece]


def position_ids(seqlen: int, mesh: SequenceParallelMesh, causal: bool = True, device=None) -> torch.Tensor:
    """This rank's global token positions, int64 ``[seqlen / (U * R)]``, in the order of its local shard.

    Use them for RoPE / position embeddings of the local shard. ``seqlen`` is the global sequence length.
    """
    positions = positions_for(seqlen, mesh.ulysses, mesh.ring, mesh.ulysses_rank, mesh.ring_rank, causal)
    return positions.to(device) if device is not None else positions


def shard(x: torch.Tensor, mesh: SequenceParallelMesh, dim: int = 1, causal: bool = True) -> torch.Tensor:
    """This rank's shard of the full tensor ``x`` along ``dim`` (the sequence dim), in the attention's layout.

    ``x`` is the same full tensor on every rank (e.g. ``[batch, seq, heads, head_dim]`` or ``[batch, seq]``
    token ids). Differentiable. ``causal`` must match the attention's ``causal``.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    dim = _normalize_dim(dim, x.ndim)
    check_sequence_length(x.shape[dim], mesh.ulysses, mesh.ring, causal, argument=f"x.shape[{dim}]")
    index = position_ids(x.shape[dim], mesh, causal, device=x.device)
    return x.index_select(dim, index)


def gather(x_local: torch.Tensor, mesh: SequenceParallelMesh, dim: int = 1, causal: bool = True) -> torch.Tensor:
    """Inverse of ``shard``: the full tensor on every rank of the sequence-parallel group (a collective).

    Not differentiable. Gathers over the Ulysses group, then over the ring group, then restores global order.
    """
    if not isinstance(x_local, torch.Tensor):
        raise TypeError(f"x_local must be a torch.Tensor, got {type(x_local).__name__}")
    dim = _normalize_dim(dim, x_local.ndim)
    local_len = x_local.shape[dim]
    seqlen = local_len * mesh.ulysses * mesh.ring
    check_sequence_length(seqlen, mesh.ulysses, mesh.ring, causal, argument=f"x_local.shape[{dim}] * U * R")
    x_local = x_local.contiguous()
    ring_seq = _all_gather_cat(x_local, mesh.ulysses_group, mesh.ulysses, dim)
    everything = _all_gather_cat(ring_seq, mesh.ring_group, mesh.ring, dim)
    order = torch.cat([_ring_positions(seqlen, mesh.ring, r, choose_layout(mesh.ring, causal)) for r in range(mesh.ring)])
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(seqlen)
    return everything.index_select(dim, inverse.to(x_local.device))


def _all_gather_cat(x: torch.Tensor, group, size: int, dim: int) -> torch.Tensor:
    if size == 1:
        return x
    parts: List[torch.Tensor] = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=dim)


def _normalize_dim(dim: int, ndim: int) -> int:
    if not isinstance(dim, int) or not -ndim <= dim < ndim:
        raise ValueError(f"dim={dim!r} is out of range for a tensor with {ndim} dims")
    return dim % ndim


# ---------------------------------------------------------------------------------------------- ring schedules
@dataclass(frozen=True)
class BlockTask:
    """One block of a ring step: local query rows ``q_rows`` against rows ``kv_rows`` of the visiting K/V.

    ``mask`` is for kernels that need more than a causal flag: when set, the ring loop passes it to the kernel in
    place of ``causal`` (``kernel_mask``). The varlen path (``usp.schedule_varlen``) puts a
    ``usp.kernels.varlen_block.VarlenBlock`` there: the per-document sequences of this block. Dense schedules leave
    it ``None``.
    """

    q_rows: slice
    kv_rows: slice
    causal: bool
    mask: Optional[object] = None
    softcap: float = 0.0

    @property
    def kernel_mask(self):
        """What the kernel's mask argument receives: ``mask`` if set (a ``Mask`` of a windowed sub-block, or the
        varlen block), else the ``causal`` flag and ``softcap`` as a ``Mask`` (Note [block mask])."""
        if self.mask is not None:
            return self.mask
        return Mask(-1, 0 if self.causal else -1, self.softcap)


class DenseRotation:
    """What travels in the dense ring (``usp.ring``'s loop asks every non-sparse schedule): all the K/V rows, at
    each of the ``R`` steps. ``usp.schedule_varlen.VarlenSchedule`` sends only a prefix (its cut section)."""

    def steps(self, ring_size: int) -> int:
        return ring_size

    def traveling_rows(self, local_len: int) -> int:
        return local_len


class FullSchedule(DenseRotation):
    """Non-causal (any layout): every step is the full local Q against the full visiting K/V
    (``usp.spec.dense_block``)."""

    sparse = False

    def __init__(self, softcap: float = 0.0):
        self.softcap = softcap

    def block(self, step: int, ring_rank: int, ring_size: int, local_len: int) -> BlockTask:
        q_rows, kv_rows, causal = dense_block(False, step, ring_rank, ring_size, local_len)
        return BlockTask(q_rows, kv_rows, causal, softcap=self.softcap)


class ZigzagCausalSchedule(DenseRotation):
    """Causal over the zigzag layout (see Note [zigzag layout]); with R == 1 it is plain causal attention. The
    blocks are ``usp.spec.dense_block``'s (the planner prices the same ones): step 0 the rank's own causal block,
    later steps the first half of the visiting K/V or the second half of the local queries."""

    sparse = False

    def __init__(self, softcap: float = 0.0):
        self.softcap = softcap

    def block(self, step: int, ring_rank: int, ring_size: int, local_len: int) -> BlockTask:
        q_rows, kv_rows, causal = dense_block(True, step, ring_rank, ring_size, local_len)
        return BlockTask(q_rows, kv_rows, causal, softcap=self.softcap)


def band_block(q_start: int, q_len: int, k_start: int, k_len: int, left: int, right: int, softcap: float):
    """Note [window blocks] (the arithmetic is ``usp.spec.band_pieces``): the pieces of a ``q_len x k_len`` block
    that a window ``(left, right)`` over global positions lets through, as ``(q_rows, k_rows, Mask)`` in block
    rows, the ``Mask`` carrying the piece's own bottom-right aligned window and ``softcap``."""
    return [(q_rows, k_rows, Mask(l, r, softcap))
            for q_rows, k_rows, l, r in band_pieces(q_start, q_len, k_start, k_len, left, right)]


class WindowSchedule(SlidingWindow):
    """A sliding window ``(left, right)`` over global positions (Note [window blocks]) on the layout that
    ``causal`` picks (zigzag when causal and ``R > 1``: the same shards as the global layers of the model).

    The torch-free facts (``pieces``, ``halo``, ``active_steps``, ``exchange_steps``, ``keep_halos``,
    ``collectives``) are ``usp.spec.SlidingWindow``'s, the ones the planner prices; this class adds the kernel
    masks. ``blocks(step, ring_rank, R, n)`` lists the sub-blocks ring rank ``r`` computes against ring rank
    ``r - step``'s K/V (empty: nothing, neither computed nor transferred). The ring loop (``usp.ring``,
    Note [sparse ring]) exchanges K/V directly with the ring rank ``step`` away only for the ``active_steps``, and
    only the rows the receiver needs (``halo``): a window much smaller than a shard needs the one or two
    neighbouring shards' edges, whatever the ring size.
    """

    sparse = True

    def __init__(self, causal: bool, left: int, right: int, softcap: float = 0.0):
        super().__init__(causal, left, right)
        self.softcap = softcap
        self._cache = {}

    def __repr__(self) -> str:
        return f"WindowSchedule(causal={self.causal}, window=({self.left}, {self.right}), softcap={self.softcap})"

    def blocks(self, step: int, ring_rank: int, ring_size: int, local_len: int) -> List[BlockTask]:
        key = (step, ring_rank, ring_size, local_len)
        if key not in self._cache:
            self._cache[key] = [BlockTask(q_rows, k_rows, False, Mask(l, r, self.softcap))
                                for q_rows, k_rows, l, r in self.pieces(step, ring_rank, ring_size, local_len)]
        return self._cache[key]

    def own_blocks(self, ring_rank: int, ring_size: int, local_len: int) -> Tuple[List[BlockTask], List[BlockTask]]:
        """``blocks(0, ...)`` split as ``SlidingWindow.own_pieces`` says: each chunk's block against itself (they
        partition the rows, in order), then the rest (Note [sparse sums] in ``usp/ring.py``)."""
        blocks = self.blocks(0, ring_rank, ring_size, local_len)
        own, others = self.own_pieces(ring_rank, ring_size, local_len)
        return [blocks[i] for i in own], [blocks[i] for i in others]


def schedule_for(causal: bool, window_size=(-1, -1), softcap: float = 0.0, seqlen: Optional[int] = None):
    """The ring schedule of a (validated) mask: the dense schedules when no window bounds anything on a sequence of
    ``seqlen`` tokens (a window wider than the sequence is no window, ``usp.spec.sliding_window``), else a
    ``WindowSchedule``."""
    window = sliding_window(causal, window_size, seqlen)
    if window is None:
        return ZigzagCausalSchedule(softcap) if causal else FullSchedule(softcap)
    return WindowSchedule(causal, window.left, window.right, softcap)
