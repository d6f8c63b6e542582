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

import enum
import math
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.distributed as dist

from .mesh import SequenceParallelMesh

__all__ = ["Layout", "choose_layout", "required_multiple", "position_ids", "shard", "gather"]


class Layout(enum.Enum):
    CONTIGUOUS = "contiguous"
    ZIGZAG = "zigzag"


def choose_layout(ring: int, causal: bool) -> Layout:
    return Layout.ZIGZAG if causal and ring > 1 else Layout.CONTIGUOUS


def required_multiple(ulysses: int, ring: int, causal: bool) -> int:
    """The global sequence length must be a multiple of this for the layout (U, R, causal) to exist."""
    if choose_layout(ring, causal) is Layout.ZIGZAG:
        return math.lcm(2 * ring, ring * ulysses)
    return ring * ulysses


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
    place of ``causal`` (``kernel_mask``). The varlen path (``usp.varlen``) puts a ``usp.kernels.varlen.VarlenBlock``
    there: the per-document sequences of this block. Dense schedules leave it ``None``.
    """

    q_rows: slice
    kv_rows: slice
    causal: bool
    mask: Optional[object] = None

    @property
    def kernel_mask(self):
        """What the kernel's ``causal`` argument receives: ``mask`` if set, else the ``causal`` flag."""
        return self.causal if self.mask is None else self.mask


_ALL = slice(None)


class FullSchedule:
    """Non-causal (any layout): every step is the full local Q against the full visiting K/V."""

    layout = Layout.CONTIGUOUS

    def block(self, step: int, ring_rank: int, ring_size: int, local_len: int) -> Optional[BlockTask]:
        return BlockTask(_ALL, _ALL, False)


class ZigzagCausalSchedule:
    """Causal over the zigzag layout (see Note [zigzag layout]); with R == 1 it is plain causal attention."""

    layout = Layout.ZIGZAG

    def block(self, step: int, ring_rank: int, ring_size: int, local_len: int) -> Optional[BlockTask]:
        if step == 0:
            return BlockTask(_ALL, _ALL, True)
        half = local_len // 2
        source = (ring_rank - step) % ring_size
        if source < ring_rank:
            # visiting chunks: `source` (before both of ours) and 2R-1-source (after both): first half only
            return BlockTask(_ALL, slice(0, half), False)
        # visiting chunks both lie before our second chunk and after our first: second half of Q only
        return BlockTask(slice(half, local_len), _ALL, False)


def schedule_for(causal: bool):
    return ZigzagCausalSchedule() if causal else FullSchedule()
