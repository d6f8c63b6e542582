"""The rules of usp's sequence parallelism that the runtime, the planner and the tests all need, in one place.

Pure Python: this module imports nothing from torch or from the rest of usp, so the planner (``usp.planner``) and
anything else that only reasons about a split can read it without paying for torch. The runtime modules import
these names from here (``usp.mesh``, ``usp.layout``, ``usp.attention``, ``usp.ulysses`` re-export them), the planner
prices what they say, and the tests compare the collectives they count with :func:`layer_collectives`.

Notation: ``U`` Ulysses degree, ``R`` ring degree, ``P = U * R``, ``H`` query heads, ``Hkv`` K/V heads,
``Hkv'`` K/V heads after replication, ``G`` head groups, ``C`` head chunks.

* Placements and the rank grid (:class:`Placement`, :func:`sequence_parallel_rank_grid`, the affine rank layout
  :func:`sequence_parallel_rank` / :func:`sequence_parallel_coords` and the group members it implies,
  :func:`ring_peer`, :func:`ulysses_group`).
* Layouts and the sequence-length multiple each needs (:class:`Layout`, :func:`choose_layout`,
  :func:`required_multiple`; Note [zigzag layout] in ``usp/layout.py``); the dense ring schedules' block of each
  step (:func:`dense_block`; the planner's average, :func:`block_fractions`) and where the ring's sums are kept
  (:func:`narrow_sums`, Note [narrow sums] in ``usp/ring.py``).
* Heads: K/V replication (:func:`kv_replication`), the valid head chunks (:func:`valid_head_chunks`) and the
  head-group pipeline depth (:func:`head_groups`; Note [head-group pipeline] in ``usp/ulysses.py``).
* Sliding windows: which ring steps a window needs, the halo rows each step exchanges and the compute of each
  sub-block (:func:`normalize_window`, :func:`band_pieces`, :func:`band_area`, :class:`SlidingWindow`,
  :func:`sliding_window`; Note [window blocks]). ``usp.layout.WindowSchedule`` is a ``SlidingWindow`` with the
  kernel masks attached; the planner prices the same object.
* Communication: the ring's steps and what each step sends (:func:`ring_steps`, :func:`forward_step_rotations`,
  :func:`backward_step_rotations`) and the collective calls of one layer (:func:`layer_collectives`).
"""
from __future__ import annotations

import enum
import functools
import heapq
import itertools
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple, Union

__all__ = [
    "Placement", "PLACEMENTS", "sequence_parallel_rank_grid", "ulysses_stride", "ring_stride", "inner_axis_size",
    "sequence_parallel_rank", "sequence_parallel_coords", "ring_peer", "ulysses_group",
    "Layout", "choose_layout", "required_multiple", "dense_block", "block_fractions", "narrow_sums",
    "kv_replication", "replicated_kv_heads", "valid_head_chunks", "head_groups",
    "normalize_window", "band_pieces", "band_area", "SlidingWindow", "sliding_window",
    "ring_steps", "forward_step_rotations", "backward_step_rotations", "ring_transfer_dtypes",
    "PassCollectives", "LayerCollectives", "layer_collectives",
    "varlen_chunks_per_doc", "varlen_doc_work", "varlen_cut_work", "varlen_placement", "varlen_owners",
    "varlen_ring_rows",
    "varlen_block_calls", "PLACEMENT_SLACK", "WORK_SLACK", "PLACEMENT_SHARES", "SMALL_BLOCK_SIDE",
]


# ------------------------------------------------------------------------------------------- placements, ranks
class Placement(str, enum.Enum):
    """Which sequence-parallel axis gets adjacent ranks. Ranks are ``data_parallel x (ulysses x ring)``: the
    ``P = U * R`` ranks of one data-parallel replica are contiguous, and inside them

    * ``ULYSSES_INNER`` ("head-first", the default): ``rank = dp * P + ring_rank * U + ulysses_rank``;
    * ``RING_INNER``: ``rank = dp * P + ulysses_rank * R + ring_rank``.
    """

    ULYSSES_INNER = "ulysses_inner"
    RING_INNER = "ring_inner"

    @classmethod
    def parse(cls, value: Union[str, "Placement"], argument: str = "placement") -> "Placement":
        """A placement from itself, its value or an alias ("head_first", "ulysses_first", "ring_first"; any case,
        ``-`` for ``_``); a ValueError naming ``argument`` and the valid values otherwise."""
        if isinstance(value, cls):
            return value
        if isinstance(value, str) and value in _PLACEMENT_VALUES:  # the common case, cheap (the planner asks per rank)
            return _PLACEMENT_VALUES[value]
        if isinstance(value, str):
            normalized = value.strip().lower().replace("-", "_")
            aliases = {"head_first": cls.ULYSSES_INNER, "ulysses_first": cls.ULYSSES_INNER,
                       "ring_first": cls.RING_INNER}
            if normalized in aliases:
                return aliases[normalized]
            for member in cls:
                if member.value == normalized:
                    return member
        raise ValueError(
            f"{argument}={value!r} is not a valid placement; valid values: "
            + ", ".join(repr(m.value) for m in cls)
        )


_PLACEMENT_VALUES: Dict[str, Placement] = {p.value: p for p in Placement}

#: the placement names, the default first
PLACEMENTS: Tuple[str, ...] = tuple(p.value for p in Placement)


def ulysses_stride(ulysses: int, ring: int, placement: Union[str, Placement]) -> int:
    """Rank distance between consecutive members of a Ulysses group."""
    return 1 if Placement.parse(placement) is Placement.ULYSSES_INNER else ring


def ring_stride(ulysses: int, ring: int, placement: Union[str, Placement]) -> int:
    """Rank distance between consecutive members of a ring (before the wrap-around)."""
    return ulysses if Placement.parse(placement) is Placement.ULYSSES_INNER else 1


def inner_axis_size(ulysses: int, ring: int, placement: Union[str, Placement]) -> int:
    """The size of the axis on adjacent ranks (``U`` for ``ulysses_inner``, ``R`` for ``ring_inner``): the groups
    of the other axis are strided by it, and the rank pattern inside a replica repeats every that many ranks."""
    return ulysses if Placement.parse(placement) is Placement.ULYSSES_INNER else ring


def sequence_parallel_rank(dp: int, ring_rank: int, ulysses_rank: int, ulysses: int, ring: int,
                           placement: Union[str, Placement]) -> int:
    """The global rank at ``(dp, ring_rank, ulysses_rank)`` (the affine layout of :class:`Placement`)."""
    return (dp * ulysses * ring + ring_rank * ring_stride(ulysses, ring, placement)
            + ulysses_rank * ulysses_stride(ulysses, ring, placement))


def sequence_parallel_coords(rank: int, ulysses: int, ring: int,
                             placement: Union[str, Placement]) -> Tuple[int, int, int]:
    """``(dp, ring_rank, ulysses_rank)`` of a global rank: the inverse of :func:`sequence_parallel_rank`."""
    dp, inner = divmod(rank, ulysses * ring)
    if Placement.parse(placement) is Placement.ULYSSES_INNER:
        ring_rank, ulysses_rank = divmod(inner, ulysses)
    else:
        ulysses_rank, ring_rank = divmod(inner, ring)
    return dp, ring_rank, ulysses_rank


def ring_peer(rank: int, step: int, ulysses: int, ring: int, placement: Union[str, Placement]) -> int:
    """The rank ``step`` places after ``rank`` round its ring (negative: before; wraps around)."""
    dp, ring_rank, ulysses_rank = sequence_parallel_coords(rank, ulysses, ring, placement)
    return sequence_parallel_rank(dp, (ring_rank + step) % ring, ulysses_rank, ulysses, ring, placement)


def ulysses_group(rank: int, ulysses: int, ring: int, placement: Union[str, Placement]) -> List[int]:
    """The global ranks of ``rank``'s Ulysses group, in Ulysses-rank order."""
    dp, ring_rank, _ = sequence_parallel_coords(rank, ulysses, ring, placement)
    return [sequence_parallel_rank(dp, ring_rank, u, ulysses, ring, placement) for u in range(ulysses)]


def sequence_parallel_rank_grid(world_size: int, ulysses: int, ring: int,
                                placement: Union[str, Placement]) -> List[List[List[int]]]:
    """Global ranks as nested lists ``grid[dp][ring_rank][ulysses_rank]`` for the given placement (see
    :class:`Placement`). Pure function (no process groups): the mesh builds its groups from it, the planner
    loads the links with it."""
    return [[[sequence_parallel_rank(dp, r, u, ulysses, ring, placement) for u in range(ulysses)]
             for r in range(ring)] for dp in range(world_size // (ulysses * ring))]


# ---------------------------------------------------------------------------------------------------- layouts
class Layout(enum.Enum):
    """How the global sequence is cut over the ring (Note [zigzag layout] in ``usp/layout.py``)."""

    CONTIGUOUS = "contiguous"
    ZIGZAG = "zigzag"


def choose_layout(ring: int, causal: bool) -> Layout:
    """Zigzag (``2R`` chunks, ring rank ``r`` holds chunks ``r`` and ``2R-1-r``) for causal attention over a ring of
    more than one; contiguous chunks otherwise."""
    return Layout.ZIGZAG if causal and ring > 1 else Layout.CONTIGUOUS


def required_multiple(ulysses: int, ring: int, causal: bool) -> int:
    """The global sequence length must be a multiple of this for the layout (U, R, causal) to exist: ``U * R``, or
    ``lcm(2R, R * U)`` for the zigzag layout (``2R`` chunks, each ring rank's part split over ``U``)."""
    if choose_layout(ring, causal) is Layout.ZIGZAG:
        return math.lcm(2 * ring, ring * ulysses)
    return ring * ulysses


#: every query row and every K/V row of a block
_ALL = slice(None)


def dense_block(causal: bool, step: int, ring_rank: int, ring_size: int, local_len: int) -> Tuple[slice, slice, bool]:
    """The block ring rank ``ring_rank`` computes at ``step`` (against ring rank ``ring_rank - step``'s K/V) in
    the dense schedules (``usp.layout.FullSchedule``, ``ZigzagCausalSchedule``): ``(q_rows, kv_rows, causal)``,
    rows as slices of the ``local_len`` rows of the two shards.

    Non-causal: every step is the full local Q against the full visiting K/V. Causal (Note [zigzag layout]):
    step 0 is the rank's own, causal, block; a visiting rank's chunks either both lie before this rank's second
    chunk and after its first (``source > ring_rank``: the second half of Q against all of the K/V) or one before
    both and one after both (``source < ring_rank``: all of Q against the first half of the K/V)."""
    if not causal:
        return _ALL, _ALL, False
    if step == 0:
        return _ALL, _ALL, True
    half = local_len // 2
    if (ring_rank - step) % ring_size < ring_rank:
        return _ALL, slice(0, half), False
    return slice(half, local_len), _ALL, False


def block_fractions(causal: bool, step: int) -> List[Tuple[float, float, float, bool]]:
    """The :func:`dense_block` s of ``step`` 0 (the diagonal) or of a step ``>= 1`` averaged over every ring rank
    and step, as ``(weight, q_fraction, k_fraction, causal)`` with fractions of the local shard and weights that
    sum to 1. Over the ordered pairs ``(ring_rank, source)`` with ``source != ring_rank`` half have the source
    before and half after, at any ring size, so the average is the mean of the two kinds a ring of two has: what
    the planner prices (``usp.planner.cost.CostModel.blocks``)."""

    def length(rows: slice) -> int:
        return len(range(*rows.indices(2)))

    ranks = (0,) if step == 0 else (1, 0)  # ring of two, two rows a shard: the source before, then after
    blocks = [dense_block(causal, min(step, 1), r, 2, 2) for r in ranks]
    return [(1 / len(blocks), length(q) / 2, length(k) / 2, c) for q, k, c in blocks]


def narrow_sums(ring: int) -> bool:
    """Note [narrow sums] in ``usp/ring.py``: whether the dense ring's running sums (output, dQ, dK/dV) stay in the
    kernels' dtype instead of float32: when every row sums at most two blocks (``ring <= 2``). The sparse ring of a
    window decides per rank from the blocks each row actually sums (``SlidingWindow.row_terms``)."""
    return ring <= 2


def _max_overlap(spans) -> int:
    """The most of ``spans`` (slices) covering one position (0 for none)."""
    events = sorted([(x.start, 1) for x in spans] + [(x.stop, -1) for x in spans])  # at a tie, stops first
    most = depth = 0
    for _, change in events:
        depth += change
        most = max(most, depth)
    return most


# ------------------------------------------------------------------------------------------------------ heads
def kv_replication(kv_heads: int, ulysses: int) -> int:
    """How many times each K/V head is repeated so that ``ulysses`` divides the K/V head count (1 = none): up to
    ``lcm(kv_heads, ulysses)`` heads, which divides the query heads whenever ``ulysses`` and ``kv_heads`` do."""
    return math.lcm(kv_heads, ulysses) // kv_heads


def replicated_kv_heads(kv_heads: int, ulysses: int) -> int:
    """``Hkv'``: the K/V heads the all-to-all moves, after :func:`kv_replication`."""
    return kv_heads * kv_replication(kv_heads, ulysses)


def valid_head_chunks(heads: int, kv_heads: int, ulysses: int) -> List[int]:
    """The ``head_chunks`` values that split the heads each Ulysses rank gets evenly: divisors of its query heads
    that divide its K/V heads (after replication) or are a multiple of them (several chunks per K/V head). Chunks
    that share a K/V head round their dK/dV partial sums once more; replicated K/V heads (``kv_heads % ulysses !=
    0``) round them once more again when the replicas are summed, which is more than the accuracy usp promises, so
    sharing is left out there."""
    replicated = kv_replication(kv_heads, ulysses) > 1
    q_local, kv_local = heads // ulysses, replicated_kv_heads(kv_heads, ulysses) // ulysses
    return [c for c in range(1, q_local + 1)
            if q_local % c == 0 and (kv_local % c == 0 or (c % kv_local == 0 and not replicated))]


def head_groups(heads: int, kv_heads: int, ulysses: int, head_chunks: int = 1) -> int:
    """Pipeline depth ``G`` for ``heads`` query and ``kv_heads`` (already replicated) K/V heads over ``ulysses``
    (Note [head-group pipeline] in ``usp/ulysses.py``): 2 when each Ulysses rank's query and K/V heads split into
    two groups that each still split into ``head_chunks`` ring passes (Note [head chunks] in ``usp/ring.py``),
    else 1."""
    if ulysses == 1:
        return 1
    q_local, kv_local = heads // ulysses, kv_heads // ulysses
    if q_local % (2 * head_chunks) or kv_local % 2:
        return 1
    # each group's heads must still split into head_chunks (ring.py _chunk_slices)
    kv_group = kv_local // 2
    return 2 if kv_group % head_chunks == 0 or head_chunks % kv_group == 0 else 1


# -------------------------------------------------------------------------------------------- sliding windows
def normalize_window(window_size, causal: bool, seqlen: int) -> Tuple[int, int]:
    """``window_size`` as ``(left, right)`` with causal's ``right = 0`` applied and bounds that cannot bind on a
    sequence of ``seqlen`` tokens (``>= seqlen - 1``) turned into -1 (unbounded)."""
    left, right = window_size
    if causal:
        right = 0
    if left >= seqlen - 1:
        left = -1
    if right >= seqlen - 1:
        right = -1
    return left, right


#: one piece of a windowed block: ``(q_rows, k_rows, left, right)``, rows as slices of the block (or of the
#: rank's shard), the window bottom-right aligned in the piece's own rows (-1 = unbounded; ``right == 0`` causal)
Piece = Tuple[slice, slice, int, int]


def band_pieces(q_start: int, q_len: int, k_start: int, k_len: int, left: int, right: int) -> List[Piece]:
    """Note [window blocks]. The part of a ``q_len x k_len`` block (query/key chunks starting at global positions
    ``q_start``/``k_start``) that a window ``(left, right)`` over global positions lets through (-1 = unbounded;
    causal is ``right = 0``), as a list of pieces ``(q_rows, k_rows, left', right')`` in block rows: empty when no
    query sees a key. Rows that see nothing are trimmed, so every query row of a piece sees a key and every key
    row is seen (what Note [kernel contract] in ``usp/kernels/base.py`` promises windowed kernels), and the window
    is re-expressed bottom-right aligned in the piece's own rows (``left'``, ``right'``). A plain causal mask on a
    non-square piece is split into its full part and its square causal part, so causal stays on square blocks.
    ``usp.layout.band_block`` attaches the kernel ``Mask`` to each piece."""
    inf = float("inf")
    delta = q_start - k_start  # key j (block row) - query i (block row) lies in [lo, hi]
    lo = -inf if left == -1 else delta - left
    hi = inf if right == -1 else delta + right
    i0, i1 = max(0, -hi), min(q_len - 1, k_len - 1 - lo)
    j0, j1 = max(0, lo), min(k_len - 1, q_len - 1 + hi)
    if i0 > i1 or j0 > j1:
        return []
    i0, i1, j0, j1 = int(i0), int(i1), int(j0), int(j1)
    s_q, s_k = i1 - i0 + 1, j1 - j0 + 1
    lo_t, hi_t = lo + i0 - j0, hi + i0 - j0  # the band in the trimmed piece, top-left
    big_l = -1 if lo_t == -inf else int(-lo_t + s_k - s_q)
    big_r = -1 if hi_t == inf else int(hi_t - (s_k - s_q))
    if big_l != -1 and big_l >= s_k - 1:
        big_l = -1
    if big_r != -1 and big_r >= s_q - 1:
        big_r = -1
    if big_l == -1 and big_r == 0 and s_q != s_k:
        if s_k > s_q:  # keys before the square part are seen by every row
            extra = s_k - s_q
            return [(slice(i0, i1 + 1), slice(j0, j0 + extra), -1, -1),
                    (slice(i0, i1 + 1), slice(j0 + extra, j1 + 1), -1, 0)]
        extra = s_q - s_k  # s_q > s_k: bottom-right causal leaves the first rows without keys: trim them
        return [(slice(i0 + extra, i1 + 1), slice(j0, j1 + 1), -1, 0)]
    return [(slice(i0, i1 + 1), slice(j0, j1 + 1), big_l, big_r)]


def band_area(q_len: int, k_len: int, left: int, right: int) -> int:
    """The (query, key) pairs a ``q_len x k_len`` piece with the bottom-right aligned window ``(left, right)``
    computes (-1 = unbounded): ``q_len * k_len`` for a full piece, ``n (n + 1) / 2`` for a causal square. The
    planner's FLOPs of a piece are ``4 * b * heads * d * band_area`` (Note [window blocks]). Closed form: with
    ``D(t)`` the pairs with ``j - i <= t``, the area is ``D(off + right) - D(off - left - 1)``,
    ``off = k_len - q_len``."""

    def ramp(m: int) -> int:  # sum_{x=1..m} clamp(x, 0, k_len)
        if m <= 0:
            return 0
        if m <= k_len:
            return m * (m + 1) // 2
        return k_len * (k_len + 1) // 2 + (m - k_len) * k_len

    def below(t: int) -> int:  # pairs with j - i <= t: sum_{i<q_len} clamp(i + t + 1, 0, k_len)
        return ramp(t + q_len) - ramp(t)

    off = k_len - q_len
    hi = k_len if right == -1 else off + right
    lo = -q_len if left == -1 else off - left
    return max(0, below(hi) - below(lo - 1))


class SlidingWindow:
    """The ring facts of a sliding window ``(left, right)`` over global positions (normalized: -1 = unbounded,
    causal ``right == 0``) on the layout ``causal`` picks (zigzag when causal and ``R > 1``): what
    ``usp.layout.WindowSchedule`` runs (it is one, with the kernel masks attached) and what the planner prices.
    All methods take the ring size ``R`` and ``local_len``, the tokens a ring rank holds (``seqlen / R``).

    * :meth:`pieces`: the sub-blocks ring rank ``r`` computes against ring rank ``r - step``'s K/V, in rows of the
      two shards (Note [window blocks]; step 0 is the rank's own K/V);
    * :meth:`halo`: the rows of the visiting K/V a rank needs at a step (one bounding range);
    * :meth:`active_steps`, :meth:`exchange_steps`: the steps some rank / this rank exchanges K/V at;
    * :meth:`keep_halos`: whether the forward keeps the received halos for the backward;
    * :meth:`collectives`: the batched P2P calls of one ring pass (Note [sparse ring] in ``usp/ring.py``).

    Only the chunk pairs the window connects are visited (``O(R * (1 + window / chunk))``), so the planner can
    ask about rings of thousands of ranks.
    """

    def __init__(self, causal: bool, left: int, right: int):
        self.causal, self.left, self.right = causal, left, right
        self._tables: Dict[Tuple[int, int], Dict[Tuple[int, int], List[Piece]]] = {}
        self._facts: Dict[tuple, object] = {}

    def __repr__(self) -> str:
        return f"SlidingWindow(causal={self.causal}, window=({self.left}, {self.right}))"

    def chunks(self, ring_rank: int, ring_size: int, local_len: int):
        """``(global_start, length, local_offset)`` of the chunks ring rank ``ring_rank`` holds."""
        if choose_layout(ring_size, self.causal) is Layout.ZIGZAG:
            c = local_len // 2
            return ((ring_rank * c, c, 0), ((2 * ring_size - 1 - ring_rank) * c, c, c))
        return ((ring_rank * local_len, local_len, 0),)

    def _table(self, ring_size: int, local_len: int) -> Dict[Tuple[int, int], List[Piece]]:
        """``{(receiver, step): pieces}`` for the non-empty ones, pieces ordered by (query chunk, key chunk)."""
        key = (ring_size, local_len)
        if key in self._tables:
            return self._tables[key]
        zigzag = choose_layout(ring_size, self.causal) is Layout.ZIGZAG
        c = local_len // 2 if zigzag else local_len
        n = 2 * ring_size if zigzag else ring_size

        def owner(a: int) -> Tuple[int, int]:  # (ring rank, local offset) of global chunk a
            if zigzag and a >= ring_size:
                return 2 * ring_size - 1 - a, c
            return a, 0

        found: Dict[Tuple[int, int], list] = {}
        for a in range(n):  # query chunk a sees key chunks first..last at most
            first = 0 if self.left == -1 else max(0, (a * c - self.left) // c)
            last = n - 1 if self.right == -1 else min(n - 1, ((a + 1) * c - 1 + self.right) // c)
            receiver, q_off = owner(a)
            for b in range(first, last + 1):
                pieces = band_pieces(a * c, c, b * c, c, self.left, self.right)
                if pieces:
                    source, k_off = owner(b)
                    found.setdefault((receiver, (receiver - source) % ring_size), []).append((q_off, k_off, pieces))
        table = {}
        for where, parts in found.items():
            parts.sort(key=lambda part: part[:2])
            table[where] = [(slice(q_off + q.start, q_off + q.stop), slice(k_off + k.start, k_off + k.stop), l, r)
                            for q_off, k_off, pieces in parts for q, k, l, r in pieces]
        self._tables[key] = table
        return table

    def pieces(self, step: int, ring_rank: int, ring_size: int, local_len: int) -> List[Piece]:
        """The sub-blocks ``(q_rows, k_rows, left, right)`` ring rank ``ring_rank`` computes against ring rank
        ``ring_rank - step``'s K/V (rows of the two shards; empty: nothing, neither computed nor transferred)."""
        return self._table(ring_size, local_len).get((ring_rank, step), [])

    def halo(self, step: int, receiver: int, ring_size: int, local_len: int) -> Optional[slice]:
        """The rows of ring rank ``receiver - step``'s K/V that ``receiver`` needs at ``step`` (one bounding
        range), ``None`` for none."""
        pieces = self.pieces(step, receiver, ring_size, local_len)
        if step == 0 or not pieces:
            return None
        return slice(min(p[1].start for p in pieces), max(p[1].stop for p in pieces))

    def _memo(self, name, ring_size: int, local_len: int, compute):
        key = (name, ring_size, local_len)
        if key not in self._facts:
            self._facts[key] = compute()
        return self._facts[key]

    def active_steps(self, ring_size: int, local_len: int) -> Tuple[int, ...]:
        """The ring steps ``1..R-1`` at which some ring rank needs K/V (the same on every rank)."""
        return self._memo("active", ring_size, local_len, lambda: tuple(sorted(
            {step for _, step in self._table(ring_size, local_len) if step != 0})))

    def exchange_steps(self, ring_rank: int, ring_size: int, local_len: int) -> Tuple[int, ...]:
        """The steps at which ``ring_rank`` sends or receives a halo (one batched P2P call each, per direction of
        data: K/V forward, dK/dV backward)."""
        table = self._table(ring_size, local_len)
        return tuple(j for j in self.active_steps(ring_size, local_len)
                     if (ring_rank, j) in table or ((ring_rank + j) % ring_size, j) in table)

    def own_pieces(self, ring_rank: int, ring_size: int, local_len: int) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
        """Note [sparse sums] in ``usp/ring.py``: the indices (into ``pieces(0, ...)``) of the step-0 pieces of a
        chunk against itself, which partition the rank's rows in order (the window always holds the query's own
        position), and of the other step-0 pieces."""
        def split():
            pieces = self.pieces(0, ring_rank, ring_size, local_len)
            own = tuple(i for i, p in enumerate(pieces) if p[0] == p[1])
            rows = [pieces[i][0] for i in own]
            assert [x.start for x in rows] == [0] + [x.stop for x in rows[:-1]] and rows[-1].stop == local_len, (
                pieces, local_len)
            return own, tuple(i for i in range(len(pieces)) if i not in own)

        return self._memo(("own", ring_rank), ring_size, local_len, split)

    def row_terms(self, ring_rank: int, ring_size: int, local_len: int) -> Tuple[int, int]:
        """Note [sparse sums] in ``usp/ring.py``: the most terms summed into one query row (pieces: out and dQ) and
        into one key row (dK/dV: this rank's step-0 pieces and the halo partial sums other ranks send back) of
        ``ring_rank``. At most 2 lets a sum stay in the input dtype (one rounding, as a float32 sum rounded once)."""
        def terms():
            steps = self.active_steps(ring_size, local_len)
            q_spans = [p[0] for j in (0,) + steps for p in self.pieces(j, ring_rank, ring_size, local_len)]
            k_spans = [p[1] for p in self.pieces(0, ring_rank, ring_size, local_len)]
            for j in steps:
                back = self.halo(j, (ring_rank + j) % ring_size, ring_size, local_len)
                if back is not None:
                    k_spans.append(back)
            return _max_overlap(q_spans), _max_overlap(k_spans)

        return self._memo(("terms", ring_rank), ring_size, local_len, terms)

    def narrow_sums(self, ring_rank: int, ring_size: int, local_len: int) -> Tuple[bool, bool]:
        """Whether ``ring_rank``'s (out and dQ, dK/dV) sums stay in the input dtype (:meth:`row_terms` <= 2)."""
        q_terms, k_terms = self.row_terms(ring_rank, ring_size, local_len)
        return q_terms <= 2, k_terms <= 2

    def keep_halos(self, ring_size: int, local_len: int) -> bool:
        """Whether the forward keeps the halos it received for the backward (no second K/V exchange): when they add
        up to at most one shard on every rank, the memory the dense ring keeps anyway (its last K/V block)."""
        def keep() -> bool:
            received = [0] * ring_size
            for (receiver, step) in self._table(ring_size, local_len):
                if step:
                    halo = self.halo(step, receiver, ring_size, local_len)
                    received[receiver] += halo.stop - halo.start
            return max(received) <= local_len

        return self._memo("keep", ring_size, local_len, keep)

    def collectives(self, ring_rank: int, ring_size: int, local_len: int, head_chunks: int = 1) -> Tuple[int, int]:
        """``(forward, backward)`` batched P2P calls of one ring pass on ``ring_rank``: a K/V exchange per step it
        takes part in; backward a dK/dV exchange per such step, plus the K/V again unless the halos were kept
        (``keep_halos``, and one pass: head chunks do not keep them)."""
        steps = len(self.exchange_steps(ring_rank, ring_size, local_len))
        kept = self.keep_halos(ring_size, local_len) and head_chunks == 1
        return steps, steps * (1 if kept else 2)


def sliding_window(causal: bool, window_size=(-1, -1), seqlen: Optional[int] = None) -> Optional[SlidingWindow]:
    """The :class:`SlidingWindow` of a (validated) ``window_size``, or ``None`` when no bound binds on a sequence of
    ``seqlen`` tokens (a window wider than the sequence is no window: the dense schedules run)."""
    left, right = (tuple(window_size) if seqlen is None else normalize_window(window_size, causal, seqlen))
    if causal:
        right = 0
    if left == -1 and (right == -1 or (causal and right == 0)):
        return None
    return SlidingWindow(causal, left, right)


# ---------------------------------------------------------------------------------------------- communication
def ring_steps(ring: int, causal: bool) -> int:
    """Steps of one pass round the ring: step ``j`` computes this rank's queries against ring rank ``r - j``'s
    K/V (``usp/ring.py``). The dense schedules (``FullSchedule``, ``ZigzagCausalSchedule`` in ``usp/layout.py``)
    visit every rank's K/V: ``R`` steps.

    Schedule-dependent counts live in this module: a sliding window visits only the steps its queries reach, and
    not as a rotation (each rank exchanges halos directly with the rank ``j`` away): its steps and calls are
    :class:`SlidingWindow`'s (``active_steps``, ``exchange_steps``, ``collectives``), which
    :func:`layer_collectives` and the planner's ring terms read."""
    return ring


def forward_step_rotations(step: int, steps: int) -> int:
    """K/V rotations (batched isend/irecv) in flight under forward step ``step``'s block, of ``steps``: the next
    step's K/V, posted before the block (double-buffered); the last step sends nothing. ``steps - 1`` a pass."""
    return 1 if step + 1 < steps else 0


def backward_step_rotations(step: int, steps: int) -> Tuple[int, int]:
    """``(K/V, dK/dV)`` rotations in flight under backward step ``step``'s block (Note [reverse backward] in
    ``usp/ring.py``).

    The backward walks the forward's steps in reverse, ``j = steps-1 .. 0``, starting on the K/V block the forward
    ended on. Under step ``j``'s block travel the K/V for step ``j - 1`` when ``j >= 2`` (step 0 is the rank's own
    block) and the dK/dV partial sum posted after step ``j + 1`` when ``j <= steps - 2``: ``steps - 2`` K/V and
    ``steps - 1`` dK/dV rotations a pass, the last dK/dV under the diagonal block. With head chunks each pass
    first fetches the block the forward ended on, exposed: one K/V rotation more (:func:`layer_collectives`)."""
    return (1 if step >= 2 else 0), (1 if step <= steps - 2 else 0)


def ring_transfer_dtypes(ring: int, chunks_share_kv: bool = False) -> Tuple[str, str]:
    """``(K/V, dK/dV)``: the dtype each of the ring's rotations carries, ``"input"`` (the K/V's own dtype) or
    ``"float32"``. K/V always travel as they are; the dK/dV partial sums travel in the input dtype when the running
    sums are narrow (:func:`narrow_sums`, Note [narrow sums] in ``usp/ring.py``) and no two head chunks share a K/V
    head (``chunks_share_kv``: their sums are added up in float32 before the one rounding), else in float32. The
    ring (``usp.ring``) sends what this says and the planner prices these bytes."""
    return "input", ("input" if narrow_sums(ring) and not chunks_share_kv else "float32")


@dataclass(frozen=True)
class PassCollectives:
    """Collective calls of one pass (forward or backward) of one attention layer, per rank."""

    #: Ulysses trades (``torch.distributed.all_to_all_single`` calls)
    all_to_all: int
    #: ring rotations (``torch.distributed.batch_isend_irecv`` calls: K/V and dK/dV travel as separate rotations)
    p2p: int


@dataclass(frozen=True)
class LayerCollectives:
    """Collective calls of one attention layer, forward and backward (:func:`layer_collectives`)."""

    forward: PassCollectives
    backward: PassCollectives


def layer_collectives(ulysses: int, ring: int, heads: int, kv_heads: int, head_chunks: int = 1,
                      causal: bool = True, return_lse: bool = False, window_size=(-1, -1),
                      seqlen: Optional[int] = None, ring_rank: Optional[int] = None,
                      documents_cut: bool = True) -> LayerCollectives:
    """The collective calls of one layer of ``usp.long_context_attention`` on a ``ulysses x ring`` mesh, per rank.

    ``kv_heads`` as the caller passes them (replicated here). ``G = head_groups(...)`` head groups
    (Note [head-group pipeline] in ``usp/ulysses.py``), each running ``C = head_chunks`` ring passes:

    * all-to-alls (``U > 1``): forward Q, K, V in and the output back, backward dO in and dQ, dK, dV back, per head
      group: ``4G`` per pass; ``return_lse`` adds one forward trade of the LSE.
    * ring rotations (``R > 1``), per head group and chunk, :func:`ring_steps` ``= S`` steps: forward ``S - 1``
      K/V (:func:`forward_step_rotations`); backward ``S - 2`` K/V and ``S - 1`` dK/dV
      (:func:`backward_step_rotations`), plus one K/V fetch when chunked (``C > 1``: the block the forward ended
      on is not kept, Note [head chunks] in ``usp/ring.py``).
    * a sliding window ``window_size`` (``seqlen`` then required; one that binds nowhere is no window): per head
      group and chunk the :meth:`SlidingWindow.collectives` of ring rank ``ring_rank`` (Note [sparse ring]: one
      batched exchange per step the rank takes part in, backward the dK/dV return and, unless the halos were kept,
      the K/V again); ranks differ at the ends of the sequence, and ``ring_rank=None`` gives the busiest one's.
    * packed documents (``usp.long_context_attention_varlen``, Note [document placement]): the counts above when
      some document is cut over the ring (``documents_cut``, i.e. the layout's ``cut_rows > 0``), else no ring
      rotation at all (every document sits whole on one ring rank). Windows on packed documents keep the dense
      rotations (a block no window reaches is skipped, its K/V still travel).
    """
    replicated = replicated_kv_heads(kv_heads, ulysses)
    groups = head_groups(heads, replicated, ulysses, head_chunks)
    a2a = 4 * groups if ulysses > 1 else 0
    lse = 1 if ulysses > 1 and return_lse else 0
    forward_p2p = backward_p2p = 0
    window = None
    if tuple(window_size) != (-1, -1):
        if seqlen is None:
            raise ValueError("layer_collectives: a window_size needs the global seqlen (which steps a window "
                             "reaches depends on the shard length)")
        window = sliding_window(causal, window_size, seqlen)
    if window is not None and ring > 1:
        ranks = range(ring) if ring_rank is None else (ring_rank,)
        forward_p2p, backward_p2p = max(window.collectives(r, ring, seqlen // ring, head_chunks) for r in ranks)
    elif ring > 1 and documents_cut:
        steps = ring_steps(ring, causal)
        forward_p2p = sum(forward_step_rotations(j, steps) for j in range(steps))
        backward_p2p = sum(sum(backward_step_rotations(j, steps)) for j in range(steps))
        backward_p2p += 1 if head_chunks > 1 else 0
    passes = groups * head_chunks
    return LayerCollectives(forward=PassCollectives(all_to_all=a2a + lse, p2p=passes * forward_p2p),
                            backward=PassCollectives(all_to_all=a2a, p2p=passes * backward_p2p))


# ------------------------------------------------------------------------------------------- packed documents
def varlen_chunks_per_doc(ring: int, causal: bool) -> int:
    """Chunks each packed document is cut into (Note [varlen zigzag layout] in ``usp/varlen.py``): ``2R`` for the
    per-document zigzag (causal, ``R > 1``), else ``R``. Document ``j`` is padded at its end to
    ``chunks * ceil(L_j / chunks)`` tokens."""
    return 2 * ring if choose_layout(ring, causal) is Layout.ZIGZAG else ring


#: Note [document placement]: a placement keeps every ring rank's tokens within 1/PLACEMENT_SLACK of the mean (the
#: rest of the rank's sequence is padding: free in attention, which gives it no keys, but not in the model's other
#: layers)
PLACEMENT_SLACK = 16
#: ... and its busiest rank's work within 1/WORK_SLACK of the mean rank's
WORK_SLACK = 32
#: tokens: a kernel call's rate on a block of side ``n`` falls as ``n / (n + SMALL_BLOCK_SIDE)`` (a fixed cost per
#: query tile that short sequences cannot amortise; fitted on measured varlen runs on 1 H100, see
#: ``planner/batch.py``), so a document cut into chunks costs more than the same document whole: the placement's
#: weight, one rule for every machine (the planner prices a probed kernel from its own varlen points)
SMALL_BLOCK_SIDE = 512
#: the shares of a rank's work above which a document is cut, tried in order (Note [document placement])
PLACEMENT_SHARES = (4, 8, 16, 32, 64)


def varlen_doc_work(length, causal: bool):
    """The cost of attending one document of ``length`` tokens whole, in Note [document placement]'s units: its
    attention area (halved when causal) at the rate ``side / (side + SMALL_BLOCK_SIDE)`` of a block of its side.
    Integer arithmetic; elementwise on numpy integer arrays too."""
    return length * (length + SMALL_BLOCK_SIDE) // (2 if causal else 1)


def varlen_cut_work(length, ring: int, causal: bool):
    """The cost of the same document cut over a ring of ``ring`` (``varlen_chunks_per_doc`` chunks; every block
    is chunk by chunk, of side ``length / chunks``): the same area at the smaller blocks' rate."""
    chunks = varlen_chunks_per_doc(ring, causal)
    return length * (length + chunks * SMALL_BLOCK_SIDE) // (2 if causal else 1)


def varlen_placement(lengths, ring: int, causal: bool) -> Tuple[Tuple[int, ...], Tuple[Tuple[int, ...], ...]]:
    """Note [document placement] (in ``usp/varlen.py``): ``(cut, whole)`` for the non-empty documents
    ``lengths`` on a ring of ``ring``. ``cut``: indices of the documents cut over the ring (``varlen_chunks_per_doc``
    chunks each), ascending; ``whole[r]``: the documents ring rank ``r`` holds whole, ascending. The placement
    :func:`varlen_owners` decides, grouped."""
    cut: List[int] = []
    held: List[List[int]] = [[] for _ in range(ring)]
    for j, r in enumerate(varlen_owners(lengths, ring, causal)):
        (cut if r < 0 else held[r]).append(j)
    return tuple(cut), tuple(tuple(h) for h in held)


@functools.lru_cache(maxsize=2)
def _documents_by_length(lengths: Tuple[int, ...], causal: bool):
    """What :func:`varlen_owners` needs of a batch whatever the ring: the documents longest first (stable: the lower
    index first on ties), their lengths and whole work (``varlen_doc_work``) in that order, and the total work and
    tokens. Kept for the last two batches: ``usp.choose`` places a batch on every ring degree it weighs and the
    runtime then places it once more, and these per-document passes are most of a placement's cost. Tuples, so a
    caller cannot change what later calls read."""
    items = list(lengths)  # a list's item lookup is faster than a tuple's
    order = sorted(range(len(items)), key=items.__getitem__, reverse=True)
    length = [items[j] for j in order]
    work = list(map(varlen_doc_work, length, itertools.repeat(causal)))
    return tuple(order), tuple(length), tuple(work), sum(work), sum(length)


def varlen_owners(lengths, ring: int, causal: bool) -> List[int]:
    """Note [document placement]: for each non-empty document of ``lengths``, ``-1`` if it is cut over a ring of
    ``ring``, else the ring rank that holds it whole (what the planner reads; :func:`varlen_placement` groups it).

    For each share ``1/4, 1/8, ..., 1/64`` (``PLACEMENT_SHARES``) of a rank's mean work in turn, the documents whose
    whole work (``varlen_doc_work``) exceeds it are cut (every rank then does ``1/R`` of their ``varlen_cut_work``)
    and the others placed whole, longest first: the larger ones (work above 1/256 of a rank's mean) each on the
    rank with the least work, the rest each on the rank with the fewest tokens (lowest rank on ties) until the
    ranks' tokens are within one document of each other, then dealt in snake order (fewest tokens first). The first
    placement whose busiest rank does no more work than a rank does with every document cut and is within
    ``1 + 1/WORK_SLACK`` of the mean rank's work, and whose ranks all hold within ``1 + 1/PLACEMENT_SLACK`` of the
    mean tokens (a cut document's padding counted), wins; if none
    does, every document is cut (the per-document zigzag balances any batch). ``R == 1``: every document is
    "cut" into one chunk (the ring rank holds the batch in order). Integer arithmetic only: a pure function of
    its arguments."""
    n = len(lengths)
    if ring == 1 or n == 0:
        return [-1] * n
    chunks = varlen_chunks_per_doc(ring, causal)
    order, length, work, total_work, total_tokens = _documents_by_length(tuple(lengths), causal)
    # ring x a rank's work with every document cut: the sum of varlen_cut_work (which exceeds varlen_doc_work by
    # (chunks - 1) * SMALL_BLOCK_SIDE / 2 a token, causal), to within one unit a document
    all_cut = total_work + (chunks - 1) * SMALL_BLOCK_SIDE * total_tokens // (2 if causal else 1)
    large = total_work // (ring * 256)
    tried = set()
    k = 0
    for share in PLACEMENT_SHARES:
        # the documents with w * ring * share > total_work: a prefix of ``order`` (work grows with length)
        threshold = total_work // (ring * share)
        while k < n and work[k] > threshold:
            k += 1
        if k == n:
            break
        if k in tried:
            continue  # the same placement as a rejected share
        tried.add(k)
        # loads and tokens are ring x a rank's (every rank does 1/ring of each cut document); heap keys are
        # value * ring + rank: the least value first, the lowest rank on ties
        base_work = sum(varlen_cut_work(x, ring, causal) for x in length[:k])
        base_tokens = sum(-(-x // chunks) * chunks for x in length[:k])
        owner = [0] * n
        loads = [base_work * ring + r for r in range(ring)]
        tokens = [base_tokens] * ring
        i = k
        replace, spread = heapq.heapreplace, ring * ring  # local names: a step per large document
        while i < n and work[i] > large:
            r = replace(loads, loads[0] + work[i] * spread) % ring
            owner[i] = r
            tokens[r] += ring * length[i]
            i += 1
        load_of = [0] * ring
        for key in loads:
            load_of[key % ring] = key // ring
        # the small documents, longest first, each on the rank with the fewest tokens until the ranks are within
        # one document of each other; from there dealt in snake order (fewest tokens first, then back), which
        # keeps them so and costs no per-document Python work. Tokens only grow, so the most is a running max.
        fewest = [t * ring + r for r, t in enumerate(tokens)]
        heapq.heapify(fewest)
        most = max(tokens)
        while i < n and most - fewest[0] // ring > ring * length[i]:
            r = fewest[0] % ring
            grown = fewest[0] // ring + ring * length[i]
            heapq.heapreplace(fewest, grown * ring + r)
            most = max(most, grown)
            owner[i] = r
            load_of[r] += ring * work[i]
            i += 1
        for key in fewest:
            tokens[key % ring] = key // ring
        if i < n:
            ranks = sorted(range(ring), key=lambda x: (tokens[x], x))
            snake = ranks + ranks[::-1]
            period = 2 * ring
            owner[i:] = (snake * ((n - i) // period + 1))[:n - i]
            for offset, r in enumerate(snake):
                tokens[r] += ring * sum(length[i + offset::period])
                load_of[r] += ring * sum(work[i + offset::period])
        busiest = max(load_of)
        if (busiest <= all_cut and busiest * ring * WORK_SLACK <= (WORK_SLACK + 1) * sum(load_of)
                and max(tokens) * PLACEMENT_SLACK <= (PLACEMENT_SLACK + 1) * total_tokens):
            owners = [-1] * n
            for j, r in zip(order[k:], owner[k:]):
                owners[j] = r
            return owners
    return [-1] * n


def varlen_ring_rows(chunk_rows: int, whole_rows: Tuple[int, ...], ulysses: int, ring: int, causal: bool) -> int:
    """Rows of every ring rank's sequence (Note [document placement]): ``halves * chunk_rows`` (``chunk_rows =
    sum_j c_j`` over the cut documents, ``halves`` 2 with the zigzag) plus the whole documents of the rank that holds
    the most (``whole_rows[r]``: rank ``r``'s tokens held whole), rounded up to a multiple of ``ulysses`` (each ring
    rank's rows split into ``U`` equal pieces). The rest of a rank's rows after its whole documents is padding."""
    halves = 2 if choose_layout(ring, causal) is Layout.ZIGZAG else 1
    rows = halves * chunk_rows + max(whole_rows, default=0)
    return -(-rows // ulysses) * ulysses


def varlen_block_calls(ring: int, causal: bool, step: int, ring_rank: int = 0) -> Tuple[Tuple[str, str, bool], ...]:
    """The varlen kernel calls of one ring block of the packed path (``usp.varlen.VarlenSchedule``, no window), as
    ``(query chunk, key chunk, causal)`` per call, chunks named ``"head"`` / ``"tail"`` (zigzag: chunk ``r`` /
    ``2R-1-r`` of every document of the rank that holds them) or ``"all"`` (the one chunk). Every call covers
    one chunk of every document on each side (``c_j x c_j`` per document).

    Zigzag (causal, ``R > 1``): the diagonal (step 0) is heads x heads (causal), tails x heads, tails x tails
    (causal); a visiting rank before this one (``source < ring_rank``) gives all our rows x its heads (two calls),
    one after it our tails x its heads and tails (two calls). Otherwise one call per block."""
    if choose_layout(ring, causal) is not Layout.ZIGZAG:
        return (("all", "all", causal),)
    if step == 0:
        return (("head", "head", True), ("tail", "head", False), ("tail", "tail", True))
    if (ring_rank - step) % ring < ring_rank:
        return (("head", "head", False), ("tail", "head", False))
    return (("tail", "head", False), ("tail", "tail", False))
