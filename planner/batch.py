"""Packed documents: the planner's price of one packed batch (``cu_seqlens``) on a ``U x R`` split, and
``choose``, the cheap per-batch pick among meshes that already exist.

Inputs (:func:`documents`): ``cu_seqlens`` (``[0, L0, L0+L1, ..., total]``, as ``usp.long_context_attention_varlen``
takes it), a list of document lengths, or a histogram file. Histogram files: a YAML/JSON mapping ``{length: count}``
(``{4096: 12, 65536: 1}``), or plain text with one ``length count`` pair per line (``#`` starts a comment). The
order of the documents does not change the price (the placement takes them longest first; equal lengths are
interchangeable).

The model (Note [varlen zigzag layout] and Note [document placement] in ``usp/varlen.py``; the facts are
``usp.spec``'s ``varlen_*``):

* placement (``R > 1``): ``spec.varlen_placement`` (:func:`placement_owner`; ``usp.choose`` uses
  :func:`fast_placement_owner`, the same placement kept for repeated batches) cuts some documents over the ring and puts
  the others whole on one ring rank. ``R == 1``: every document is "cut" into one chunk.
* layout: a cut document ``j`` is padded to ``chunks * c_j`` tokens, ``c_j = ceil(L_j / chunks)``, ``chunks =
  spec.varlen_chunks_per_doc(R, causal)``; ring rank ``r``'s sequence is the cut section (``cut_rows = halves *
  sum_j c_j`` over the cut documents, ``halves`` 2 with the zigzag), then its whole documents, then padding up to
  ``ring_tokens = spec.varlen_ring_rows(...)`` (the rank holding the most, rounded to a multiple of ``U``).
  ``padding = R * ring_tokens - total``. The all-to-all and the memory are those of the dense layer of ``R *
  ring_tokens`` tokens; the ring moves the cut section's K/V and dK/dV only (``CostModel.evaluate(ring_rows=
  cut_rows)``, "Travelling rows" in ``planner.cost``): with no document cut it runs one step and moves nothing.
* compute: each ring block of the cut section is ``spec.varlen_block_calls`` kernel calls, each one piece of every
  cut document (``c_j x c_j``, causal or full; ``R == 1``: the whole document); step 0 (the diagonal) adds one call
  for the rank's whole documents (each one ``L_j x L_j`` sequence, causal or full), so step 0 takes the slowest
  rank's (``max_r`` of the cut calls + its whole call + its sums). Padding rows are in no call. A call's time
  (``_Rates.call_times``), with the profile's *varlen points* (``usp-plan probe``: one call over many equal sequences
  of 128-4096 tokens, 32K tokens a call, at each probed head count): every sequence rounded up to whole 128-row tiles
  (a 600-token document costs what a 640-token one does), each at the rate measured for calls of many sequences of
  its (rounded) side, summed, and the call no faster than one dense block of its whole work (so a call of one
  sequence runs at the profile's dense rate for its side); heads per call between two probed counts: linear in
  log2(heads). (The tile rounding is what short documents of arbitrary lengths cost beyond the probe's whole-tile
  lengths: without it the 64-1022-token documents of ``many_tiny`` were predicted 12% to 21% low on one GPU.)
  *Without* varlen points (older probes, the presets): the fall-off form, a call's pieces at the kernel's rate for
  one block of the call's whole work (side ``sqrt(sum q * k)``), each scaled by ``fall(sqrt(q * k)) / fall(call
  side)``, ``fall(n) = n / (n + SMALL_SIDE)`` (below the profile's smallest block the rate falls by ``fall`` too); on
  2x H200 with fa2 it predicts the ``many_tiny`` points 11% to 23% low (``benchmarks/RESULTS.md``, fifth GPU session;
  ``tests/planner/test_planner_accuracy.py`` has the measured form's errors). (Pricing each sequence as a call of its
  own at the dense rate of its side charged a many-document call the small blocks' per-call costs once per document:
  2x1 on 2x H200 with fa2 was predicted +28% to +163% on 64-8K-token documents.) A varlen call of flash-attn 2's
  family (``torch_flash``, ``fa2``) also launches a grid of ``ceil(longest / 128)`` tiles per sequence and head
  (forward; three such grids in the backward), empty for all but the longest sequence: ``GRID_CELL_NS`` per cell.
  Padding rows are sequences with no keys of the whole documents' call (Note [document placement]), so only a rank
  that holds no whole document leaves them uncovered. A block of several calls, or one call that leaves padding rows
  uncovered, sums in float32 (output copies and merges, the zero-filled output where rows are uncovered, gradient
  zero-fill and ``add_``, and the casts of a block that is its rows' only one), at the topology's memory bandwidth.
* imbalance: causal zigzag blocks of the cut section are identical on every rank; non-causal ones (``R > 1``) see
  the visiting chunk's real keys only, so a ring step takes the slowest rank's block (the largest over the
  visiting chunks); the whole documents differ by rank (step 0 above). ``imbalance`` is the pass as priced over
  the ranks' mean.
* the rest (collectives, step overheads, the NCCL slowdown, ring overlap) is ``planner.cost.CostModel.evaluate``
  with these step times in place of the dense blocks' (non-causal rings: every step the mean of the pass's steps,
  the whole documents of step 0 spread over them; the pass's compute is exact).
* ``doc_placement="cut_all"`` (``evaluate_batch``, ``batch_compute``) prices the layout before Note [document
  placement], that of the recorded runs below: every document cut, plus a padding-only document of the fewest
  rows per chunk that make ``halves * (sum_j c_j + pad)`` a multiple of ``U`` (one more sequence in every call),
  its ring moving every row.

Fitted (``tests/planner/test_planner_batch.py``, ``benchmarks/data/varlen_torch_flash_20261125.json``: the varlen
kernel alone on 1 H100, whole documents and half documents, 128K and 256K tokens): ``GRID_CELL_NS`` and
``SMALL_SIDE``. Other kernels (fa4, cudnn) have no grid measurement here: their grid cost is taken as 0.
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from usp import spec

from .cost import FP32, BACKWARD_FLOPS_FACTOR, CostModel, MemoryCost, PassCost, Shape
from .topology import heads_neighbours
from .units import PlannerError

__all__ = ["Documents", "documents", "BatchCost", "batch_compute", "evaluate_batch", "Chooser", "choose",
           "GRID_CELL_NS", "SMALL_SIDE"]

#: ns per grid cell (sequence x head x 128-row tile) of a varlen call, by kernel (module docstring); 0 if absent
GRID_CELL_NS: Dict[str, float] = {"torch_flash": 1.9, "fa2": 1.9}
#: tokens: the fall-off form's per-tile cost (module docstring; profiles without varlen points), the spec's
#: constant, which the document placement weighs cut documents with
SMALL_SIDE = float(spec.SMALL_BLOCK_SIDE)
#: rows of a query tile (one thread block) of the flash-attention kernels: a grid cell, and the unit short
#: sequences are rounded up to
CTA_ROWS = 128
BACKWARD_GRIDS = 3
#: ``Chooser``: the travelling fraction of the ring rows is rounded to 1/TRAVEL_STEPS for the rest of the layer
TRAVEL_STEPS = 16


# ------------------------------------------------------------------------------------------------ inputs
@dataclass(frozen=True)
class Documents:
    """The non-empty document lengths of a packed batch (int64 array) and where they came from."""

    lengths: np.ndarray = field(repr=False)
    source: str = "lengths"

    @property
    def total(self) -> int:
        return int(self.lengths.sum())

    @property
    def count(self) -> int:
        return int(self.lengths.size)

    @property
    def longest(self) -> int:
        return int(self.lengths.max())

    def summary(self) -> str:
        return (f"{self.count} documents, {self.total} tokens, longest {self.longest}, median "
                f"{int(np.median(self.lengths))}")

    def to_dict(self) -> dict:
        return {"source": self.source, "documents": self.count, "total": self.total, "longest": self.longest}


def _int_array(values: Any, argument: str) -> np.ndarray:
    if hasattr(values, "detach") and hasattr(values, "cpu"):  # a torch tensor, without importing torch
        if values.dtype.is_floating_point or values.dtype.is_complex or str(values.dtype) == "torch.bool":
            raise PlannerError(f"{argument} must hold integers, got {values.dtype}")
        values = values.detach().cpu().numpy()
    try:
        arr = np.asarray(values)
    except Exception:  # noqa: BLE001 - anything numpy cannot read is bad input
        raise PlannerError(f"{argument} must be a 1-D sequence of integers, got {type(values).__name__}") from None
    if arr.ndim != 1:
        raise PlannerError(f"{argument} must be 1-D, got shape {arr.shape}")
    if arr.dtype == bool or (arr.size and arr.dtype.kind not in "iu"):
        if arr.dtype.kind == "f" and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
            pass
        else:
            raise PlannerError(f"{argument} must hold integers, got {arr.dtype}")
    return arr.astype(np.int64)


def _from_cu_seqlens(cu: Any) -> np.ndarray:
    arr = _int_array(cu, "cu_seqlens")
    if arr.size < 2:
        raise PlannerError(f"cu_seqlens must have at least 2 entries [0, ..., total], got {arr.tolist()}")
    if arr[0] != 0:
        raise PlannerError(f"cu_seqlens must start at 0 (cumulative document lengths), got {int(arr[0])}")
    lengths = np.diff(arr)
    if np.any(lengths < 0):
        at = int(np.argmax(lengths < 0))
        raise PlannerError(f"cu_seqlens must be non-decreasing, but cu_seqlens[{at + 1}]={int(arr[at + 1])} < "
                           f"cu_seqlens[{at}]={int(arr[at])}")
    return lengths


def _from_lengths(values: Any) -> np.ndarray:
    arr = _int_array(values, "lengths")
    if np.any(arr < 0):
        at = int(np.argmax(arr < 0))
        raise PlannerError(f"lengths must be >= 0, got lengths[{at}]={int(arr[at])}")
    return arr


def read_histogram(path: Any) -> np.ndarray:
    """Document lengths from a histogram file (module docstring: a ``{length: count}`` mapping in YAML/JSON, or
    ``length count`` lines)."""
    import yaml

    name = os.fspath(path)
    try:
        with open(name, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise PlannerError(f"histogram file {name!r} cannot be read: {exc.strerror if hasattr(exc, 'strerror') and exc.strerror else exc}") from None
    pairs: List[Tuple[Any, Any]] = []
    data = None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        data = None
    if isinstance(data, dict):
        pairs = list(data.items())
    else:
        for number, line in enumerate(text.splitlines(), 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.replace(",", " ").replace(":", " ").split()
            if len(parts) != 2:
                raise PlannerError(f"histogram file {name!r} line {number}: expected 'length count', got {line!r}")
            pairs.append((parts[0], parts[1]))
    if not pairs:
        raise PlannerError(f"histogram file {name!r} holds no documents (expected {{length: count}} or "
                           "'length count' lines)")
    lengths, counts = [], []
    for length, count in pairs:
        try:
            n, c = int(str(length)), int(str(count))
        except ValueError:
            raise PlannerError(f"histogram file {name!r}: length and count must be integers, got "
                               f"{length!r}: {count!r}") from None
        if n < 0 or c < 0:
            raise PlannerError(f"histogram file {name!r}: lengths and counts must be >= 0, got {n}: {c}")
        lengths.append(n)
        counts.append(c)
    return np.repeat(np.asarray(lengths, dtype=np.int64), np.asarray(counts, dtype=np.int64))


def documents(cu_seqlens: Any = None, lengths: Any = None, histogram: Any = None) -> Documents:
    """A :class:`Documents` from exactly one of ``cu_seqlens``, ``lengths`` (a list of document lengths) or
    ``histogram`` (a file path, or a ``{length: count}`` mapping). Empty documents are dropped; a batch with no
    tokens is refused. Bad input raises ``ValueError`` (:class:`PlannerError`) naming the argument."""
    given = [name for name, value in (("cu_seqlens", cu_seqlens), ("lengths", lengths), ("histogram", histogram))
             if value is not None]
    if len(given) != 1:
        raise PlannerError("give the documents as exactly one of cu_seqlens, lengths or histogram, got "
                           + (", ".join(given) if given else "none"))
    if cu_seqlens is not None:
        arr, source = _from_cu_seqlens(cu_seqlens), "cu_seqlens"
    elif lengths is not None:
        arr, source = _from_lengths(lengths), "lengths"
    elif isinstance(histogram, dict):
        try:
            keys = np.asarray([int(k) for k in histogram], dtype=np.int64)
            counts = np.asarray([int(v) for v in histogram.values()], dtype=np.int64)
        except (TypeError, ValueError):
            raise PlannerError(f"histogram must map integer lengths to integer counts, got {histogram!r}") from None
        if np.any(keys < 0) or np.any(counts < 0):
            raise PlannerError("histogram lengths and counts must be >= 0")
        arr, source = np.repeat(keys, counts), "histogram"
    else:
        arr, source = read_histogram(histogram), f"histogram {os.fspath(histogram)}"
    arr = arr[arr > 0]
    if arr.size == 0:
        raise PlannerError(f"the batch ({source}) has no tokens: give at least one document of length >= 1")
    return Documents(arr, source)


# ------------------------------------------------------------------------------------------------ placement
#: how :func:`batch_compute` places the documents: ``"spec"`` (Note [document placement], what the runtime does)
#: or ``"cut_all"`` (the layout before Note [document placement], for the recorded runs of
#: ``benchmarks/data/varlen_torch_flash_20261125.json``: every document cut, plus a padding-only document)
DOC_PLACEMENTS = ("spec", "cut_all")
def placement_owner(lengths: np.ndarray, ring: int, causal: bool) -> np.ndarray:
    """Note [document placement] as ``usp.spec.varlen_owners`` decides it, as an int64 array over the
    documents: ``-1`` for a document cut over the ring, ``r`` for one held whole by ring rank ``r``."""
    if ring == 1:
        return np.full(lengths.size, -1, dtype=np.int64)
    return np.array(spec.varlen_owners(lengths.tolist(), ring, causal), dtype=np.int64)


@functools.lru_cache(maxsize=32)
def _owner_cached(key: bytes, ring: int, causal: bool) -> np.ndarray:
    owner = placement_owner(np.frombuffer(key, dtype=np.int64), ring, causal)
    owner.flags.writeable = False
    return owner


def fast_placement_owner(lengths: np.ndarray, ring: int, causal: bool) -> np.ndarray:
    """:func:`placement_owner` for ``usp.choose``, kept for the last 32 ``(batch, ring, causal)`` (meshes of one
    ring degree share it). Read-only."""
    if ring == 1:
        return np.full(lengths.size, -1, dtype=np.int64)
    return _owner_cached(np.ascontiguousarray(lengths, dtype=np.int64).tobytes(), ring, causal)


def forget_placements() -> None:
    """Empty the caches of placements (:func:`fast_placement_owner`'s, and the spec's per-batch document order
    that its ring degrees share), so the next batch is placed as a new one: what the benchmarks and tests that time
    ``usp.choose`` on a new batch call before each call."""
    _owner_cached.cache_clear()
    spec._documents_by_length.cache_clear()


# ------------------------------------------------------------------------------------------------ compute
class _Rates:
    """Varlen call times for one kernel profile and one heads-per-call (module docstring, "compute"): from the
    profile's varlen points when it has them (``usp-plan probe``), else from its dense points with the small-side
    fall-off."""

    def __init__(self, kernel, heads_per_call: float):
        self.smallest = float(kernel.points[0].block)
        self._log = np.arange(0.0, 23.01, 0.125)  # log2(side): 1 .. 8M tokens
        sides = 2.0 ** self._log
        #: dense rates at max(side, smallest block)
        self._table = {(backward, causal): np.array([kernel.rate(backward, causal, max(x, self.smallest),
                                                                 heads_per_call) for x in sides])
                       for backward in (False, True) for causal in (False, True)}
        self._sequence = _sequence_rates(kernel, heads_per_call, sides)

    def call_times(self, causal: bool, unit: float, q: Any, k: Any, group: Any = None,
                   calls: int = 1) -> Tuple[Any, Any]:
        """Forward and backward seconds of varlen calls: sequence ``i`` (``q[i]`` query rows against ``k[i]`` keys,
        causal or full) belongs to call ``group[i]`` (arrays of ``calls`` times), or every one to one call
        (``group`` None: numbers); ``unit`` FLOPs per (query, key) pair (``4 * heads * head_dim``, halved here
        when causal)."""
        q, k = np.asarray(q, dtype=np.float64), np.asarray(k, dtype=np.float64)

        def total(values):
            return values.sum() if group is None else np.bincount(group, values, minlength=calls)

        flops_per_pair = unit / (2.0 if causal else 1.0)
        if self._sequence is None:  # the fall-off form
            S = SMALL_SIDE
            area = np.maximum(total(q * k), 1.0)
            side = np.sqrt(area)
            work = flops_per_pair * (area + S * total(q if k is q else np.sqrt(q * k))) * side / (side + S)
            at = np.log2(np.maximum(side, self.smallest))
            below = np.where(side < self.smallest,
                             (side / (side + S)) / (self.smallest / (self.smallest + S)), 1.0)
            return (work / (np.interp(at, self._log, self._table[(False, causal)]) * below),
                    BACKWARD_FLOPS_FACTOR * work / (np.interp(at, self._log, self._table[(True, causal)]) * below))
        # measured: every sequence rounded up to whole tiles, at the rate of calls of many such sequences; a
        # call no faster than one block of its whole work
        q_up = np.ceil(q / CTA_ROWS) * CTA_ROWS
        area_i = q_up * q_up if k is q else q_up * (np.ceil(k / CTA_ROWS) * CTA_ROWS)
        at_i = np.log2(np.maximum(np.sqrt(area_i), 1.0))
        area = total(area_i)
        at = np.log2(np.maximum(np.sqrt(area), self.smallest))
        times = []
        for backward in (False, True):
            sequences = total(area_i / np.interp(at_i, self._log, self._sequence[(backward, causal)]))
            whole = area / np.interp(at, self._log, self._table[(backward, causal)])
            times.append((BACKWARD_FLOPS_FACTOR if backward else 1.0) * flops_per_pair
                         * np.maximum(sequences, whole))
        return times[0], times[1]


def _sequence_rates(kernel, heads_per_call: float, sides: np.ndarray) -> Optional[Dict[Tuple[bool, bool], Any]]:
    """FLOP/s of one sequence of side ``sides`` inside a call of many (arrays over ``sides``), per ``(backward,
    causal)``, from the varlen points of the profile and its head-count variants (None when none has any): linear in
    log2(length) between the points (the smallest point's rate below them; above them the larger of the longest
    point's and the dense rate of one block of that side), and linear in log2(heads) between the two nearest
    measured head counts (clamped)."""
    family = sorted((p for p in (kernel,) + tuple(kernel.variants) if p.varlen), key=lambda p: p.heads or 0)
    if not family:
        return None
    at = np.log2(sides)

    def own(p) -> Dict[Tuple[bool, bool], Any]:
        lengths = np.log2([v.length for v in p.varlen])
        out = {}
        for backward in (False, True):
            for causal in (False, True):
                key = ("causal_" if causal else "") + ("backward" if backward else "forward")
                measured = np.array([getattr(v, key) for v in p.varlen]) * 1e12
                rate = np.interp(at, lengths, measured)
                longer = sides > p.varlen[-1].length
                dense = np.array([p.rate(backward, causal, x) if x > p.varlen[-1].length else 0.0 for x in sides])
                out[(backward, causal)] = np.where(longer, np.maximum(measured[-1], dense), rate)
        return out

    if len(family) == 1 or any(p.heads is None for p in family):
        return own(family[0])
    lo, hi, t = heads_neighbours(family, heads_per_call)
    a = own(lo)
    if hi is lo:
        return a
    b = own(hi)
    return {key: a[key] + t * (b[key] - a[key]) for key in a}


@dataclass
class BatchCost:
    """What the batch adds to a split: the layout and each ring step's kernel time on one rank (all its heads)."""

    layout: str
    padding: int
    local_tokens: int
    padded_total: int
    #: (forward, backward) seconds of the kernel calls of step 0 (the slowest ring rank's) and of a step >= 1,
    #: before the NCCL slowdown
    step0: Tuple[float, float]
    later: Tuple[float, float]
    #: float32 sums of multi-call blocks (seconds) of one pass, included in the step times above
    block_sums: Tuple[float, float]
    #: kernel calls of one pass on the busiest ring rank (all head groups and chunks)
    calls_per_pass: int
    flops: float
    #: the pass's compute as priced (each step its slowest rank's) / the ranks' mean own compute (1.0: balanced)
    imbalance: float
    #: rows of every ring rank's sequence, and of its cut section (the K/V rows that travel round the ring)
    ring_tokens: int = 0
    cut_rows: int = 0
    #: documents cut over the ring and documents held whole by one ring rank
    cut_documents: int = 0
    whole_documents: int = 0
    #: ring steps of a pass: R, or 1 when no document is cut (nothing travels)
    steps: int = 1
    #: ``DOC_PLACEMENTS``
    doc_placement: str = "spec"

    def to_dict(self) -> dict:
        return {"layout": self.layout, "padding": self.padding, "local_tokens": self.local_tokens,
                "padded_total": self.padded_total, "ring_tokens": self.ring_tokens, "cut_rows": self.cut_rows,
                "documents_cut": self.cut_documents, "documents_whole": self.whole_documents,
                "ring_steps": self.steps, "kernel_calls_per_pass": self.calls_per_pass,
                "imbalance": self.imbalance, "block_sums_s": list(self.block_sums)}


def batch_compute(lengths: np.ndarray, ulysses: int, ring: int, causal: bool, heads: int, kv_heads: int,
                  head_dim: int, element_bytes: int, groups: int, rates: _Rates, kernel_name: str,
                  memory_bandwidth: Optional[float], owner: Optional[np.ndarray] = None,
                  doc_placement: str = "spec") -> BatchCost:
    """The packed batch's layout and per-step kernel times on one rank (module docstring). Vectorised over the
    documents: ``O(documents)`` numpy work (``O(R * documents)`` non-causal) after the placement.

    ``owner``: the placement (:func:`placement_owner`'s array; computed from ``usp.spec.varlen_placement`` when
    None). ``doc_placement``: ``"spec"``, or ``"cut_all"`` (``DOC_PLACEMENTS``: the layout before Note [document
    placement], for the recorded runs; ``owner`` is then ignored)."""
    if doc_placement not in DOC_PLACEMENTS:
        raise PlannerError(f"doc_placement={doc_placement!r} is not valid; valid values: {', '.join(DOC_PLACEMENTS)}")
    chunks = spec.varlen_chunks_per_doc(ring, causal)
    zigzag = chunks == 2 * ring and ring > 1
    halves = 2 if zigzag else 1
    if doc_placement == "cut_all" or ring == 1:
        owner = np.full(lengths.size, -1, dtype=np.int64)
    elif owner is None:
        owner = placement_owner(lengths, ring, causal)
    is_cut = owner < 0
    cut_lengths = lengths[is_cut]
    whole_lengths, whole_rank = lengths[~is_cut].astype(np.float64), owner[~is_cut]
    c = -(-cut_lengths // chunks)
    rows = int(c.sum())
    held = np.bincount(whole_rank, minlength=ring)  # whole documents per ring rank
    held_tokens = np.bincount(whole_rank, weights=whole_lengths, minlength=ring).round().astype(np.int64)
    if doc_placement == "cut_all":
        # the padding-only document of the old layout: the fewest rows per chunk that make a ring rank's rows
        # (halves * (rows + pad)) split into U pieces
        pad = (-rows) % (ulysses // math.gcd(halves, ulysses))
        ring_tokens = halves * (rows + pad)
    else:
        pad = 0
        ring_tokens = spec.varlen_ring_rows(rows, tuple(int(x) for x in held_tokens), ulysses, ring, causal)
    C = rows + pad  # rows of one chunk of every cut document (a half of the cut section with the zigzag)
    cut_rows = halves * C
    steps = ring if cut_rows and ring > 1 else 1
    T = ring_tokens
    hq = heads / ulysses
    kv = spec.replicated_kv_heads(kv_heads, ulysses) / ulysses
    cell = GRID_CELL_NS.get(kernel_name, 0.0) * 1e-9
    cf = c.astype(np.float64)
    unit = 4.0 * hq * head_dim  # FLOPs of one (query, key) pair, all heads of the rank
    pad_seq = 1 if pad else 0  # the padding-only document: one more sequence per call

    def grid(n_seqs, longest) -> Tuple[Any, Any]:
        cells = n_seqs * hq * np.ceil(np.asarray(longest, dtype=np.float64) / CTA_ROWS)
        return cell * cells, BACKWARD_GRIDS * cell * cells

    def call(q: np.ndarray, k: np.ndarray, causal_piece: bool, extra_seqs: int = 0) -> Tuple[float, float, float]:
        """One varlen call over the cut documents' pieces (``q x k`` per document)."""
        if q.size == 0:
            return 0.0, 0.0, 0.0
        flops = (unit / (2.0 if causal_piece else 1.0)) * float((q * k).sum())
        fwd, bwd = rates.call_times(causal_piece, unit, q, k)
        g_f, g_b = grid(q.size + extra_seqs + pad_seq, float(max(q.max(), k.max())))
        return float(fwd) + float(g_f), float(bwd) + float(g_b), flops

    # the whole documents' call of step 0, per ring rank: each document one L x L sequence
    zeros = np.zeros(ring)
    whole_f, whole_b, whole_flops = zeros, zeros, zeros
    if whole_lengths.size:
        area = np.bincount(whole_rank, weights=whole_lengths * whole_lengths, minlength=ring)
        whole_flops = (unit / (2.0 if causal else 1.0)) * area
        whole_f, whole_b = rates.call_times(causal, unit, whole_lengths, whole_lengths, whole_rank, ring)
        longest = np.zeros(ring)
        np.maximum.at(longest, whole_rank, whole_lengths)
        g_f, g_b = grid(held, longest)
        whole_f, whole_b = whole_f + g_f, whole_b + g_b

    hbm = memory_bandwidth or 0.0
    B = element_bytes
    eq, ek = hq * head_dim, kv * head_dim  # elements of one row: query heads, one of K/V

    def sums(t_q, t_k, copy, merge, q_add, k_add, uncovered=0.0, final=0.0) -> Tuple[Any, Any]:
        """Seconds of a multi-call block's float32 sums over ``t_q`` query and ``t_k`` key rows: forward, each
        call's output copied (``B + 4``) or merged (``8 + B``) per element of its rows, the float32 output
        zero-filled when calls leave rows ``uncovered``, and cast back (``4 + B``) in a block that is its rows'
        only one (``final``); backward, zero-filled float32 dq/dk/dv, one ``add_`` per call over its rows (``8 +
        B``) and, ``final``, the casts. Rows and the 0/1 flags: numbers or per-rank arrays."""
        if not hbm:
            return 0.0, 0.0
        wide = 1.0 if merge else uncovered  # the output is float32 (else the input dtype, nothing to cast)
        fwd = ((B + 4) * copy + (8 + B) * merge + 4 * t_q * uncovered + (4 + B) * t_q * final * wide) * eq
        grads = t_q * eq + 2 * t_k * ek
        bwd = FP32 * grads + (8 + B) * (q_add * eq + 2 * k_add * ek) + (4 + B) * grads * final
        return fwd / hbm, bwd / hbm

    final = 1.0 if steps == 1 else 0.0
    W = held_tokens.astype(np.float64)
    if ring == 1:
        f, b, fl = call(cf, cf, causal)
        n_calls = np.ones(1)
        covers = C == T
        cut_f, cut_b, s0 = np.full(1, f), np.full(1, b), sums(T, T, C, 0, C, C, 0.0 if covers else 1.0, final)
        single = np.full(1, covers)
        later, step_sums, cut_flops = (0.0, 0.0), (0.0, 0.0), fl
        own_later = np.zeros(1)  # each rank's own compute at steps >= 1
    elif zigzag:
        f1, b1, fl1 = call(cf, cf, True)   # heads x heads, tails x tails
        f2, b2, fl2 = call(cf, cf, False)  # tails x heads; either half of a visiting block
        n_calls = (3 if C else 0) + (held > 0)
        covers = (2 * C + W == T) | (held > 0)  # padding rows are sequences of the whole documents' call
        single = (n_calls == 1) & covers
        cut_f, cut_b = np.full(ring, 2 * f1 + f2), np.full(ring, 2 * b1 + b2)
        # heads, tails copied, tails merged, the whole documents copied; calls: 3 query and key chunk sides
        s0 = sums(T, T, 2 * C + W, C, 3 * C + W, 3 * C + W, 1.0 - covers, final)
        before = sums(2 * C, C, 2 * C, 0, 2 * C, 2 * C)  # all our rows x the visiting heads
        after = sums(C, 2 * C, C, C, 2 * C, 2 * C)       # our tails x the visiting heads and tails
        step_sums = ((float(max(before[0], after[0])), float(max(before[1], after[1]))) if steps > 1
                     else (0.0, 0.0))
        later = (2 * f2 + step_sums[0], 2 * b2 + step_sums[1]) if steps > 1 else (0.0, 0.0)
        n_calls = n_calls + 2 * (steps - 1)
        cut_flops = 2 * fl1 + fl2 + (steps - 1) * 2 * fl2
        own_later = np.full(ring, (steps - 1) * sum(later))
    else:  # non-causal ring: the visiting chunk's real keys; a step waits for the busiest rank
        per_source = []
        for source in range(ring):
            real = np.clip(cut_lengths - source * c, 0, c).astype(np.float64)
            keep = real > 0
            per_source.append(call(cf[keep], real[keep], False, extra_seqs=int(np.sum(real < cf))))
        n_calls = (1 if C else 0) + (held > 0)
        covers = (C + W == T) | (held > 0)
        single = (n_calls == 1) & covers
        cut_f = np.array([p[0] for p in per_source])
        cut_b = np.array([p[1] for p in per_source])
        s0 = sums(T, T, C + W, 0, C + W, C + W, 1.0 - covers, final)
        step_sums = (0.0, 0.0)  # one call over the cut section on both sides
        later = (float(cut_f.max()), float(cut_b.max())) if steps > 1 else (0.0, 0.0)
        n_calls = n_calls + (steps - 1)
        cut_flops = sum(p[2] for p in per_source) if steps > 1 else per_source[0][2]
        # rank r's own steps >= 1 see every other source once
        own_later = (float(np.sum(cut_f + cut_b)) - (cut_f + cut_b)) if steps > 1 else np.zeros(ring)
    s0_f = np.where(single, 0.0, s0[0]) * np.ones(ring)
    s0_b = np.where(single, 0.0, s0[1]) * np.ones(ring)
    rank_f = cut_f + whole_f + s0_f
    rank_b = cut_b + whole_b + s0_b
    step0 = (float(rank_f.max()), float(rank_b.max()))
    slowest = int(np.argmax(rank_f + rank_b))
    block = (float(s0_f[slowest]) + (steps - 1) * step_sums[0], float(s0_b[slowest]) + (steps - 1) * step_sums[1])
    priced = sum(step0) + (steps - 1) * sum(later)
    mean = float(np.mean(rank_f + rank_b + own_later))
    imbalance = float(priced / mean) if mean else 1.0
    n_cut, n_whole = int(cut_lengths.size), int(whole_lengths.size)
    if ring == 1:
        layout = "whole documents"
    elif not n_cut:
        layout = "every document whole on one ring rank (no ring transfers)"
    else:
        layout = "per-document zigzag (2R chunks)" if zigzag else "per-document contiguous (R chunks)"
        if n_whole:
            layout = (f"{n_cut} document{'s' if n_cut > 1 else ''} cut ({layout[len('per-document '):]}), "
                      f"{n_whole} whole on one ring rank")
    total = int(lengths.sum())
    return BatchCost(layout=layout, padding=ring * T - total, local_tokens=T // ulysses, padded_total=ring * T,
                     step0=step0, later=later, block_sums=block, calls_per_pass=int(np.max(n_calls)) * groups,
                     flops=cut_flops + float(np.mean(whole_flops)), imbalance=imbalance, ring_tokens=T,
                     cut_rows=cut_rows, cut_documents=n_cut, whole_documents=n_whole, steps=steps,
                     doc_placement=doc_placement)


class _StepRates:
    """A kernel profile for ``CostModel.evaluate`` whose rates make each dense block it prices take the batch's
    step time: ``evaluate`` prices step 0 with the causal diagonal block (causal, ``R > 1``) and every later step
    with the average visiting block; ``R == 1``, a ring of one step (no document cut) and non-causal layers have
    one kind of block: one step takes step 0's time, non-causal steps the mean of the pass's steps (the whole
    documents of step 0 spread over them)."""

    def __init__(self, shape: Shape, ulysses: int, cost: BatchCost, ring: int):
        self.shape, self.heads_per_rank, self.cost, self.ring = shape, shape.heads / ulysses, cost, ring
        self.name = "varlen"

    def rate(self, backward: bool, causal: bool, side: float, heads: Optional[float] = None) -> float:
        s, cost, i = self.shape, self.cost, 1 if backward else 0
        flops = 4.0 * s.batch * self.heads_per_rank * side * side * s.head_dim * (0.5 if causal else 1.0)
        flops *= BACKWARD_FLOPS_FACTOR if backward else 1.0
        if cost.steps == 1 or (causal and self.ring > 1 and s.causal):
            seconds = cost.step0[i]
        elif not s.causal:
            seconds = (cost.step0[i] + (cost.steps - 1) * cost.later[i]) / cost.steps
        else:
            seconds = cost.later[i]
        return flops / max(seconds, 1e-12)


def evaluate_batch(model: CostModel, shape: Shape, docs: Documents, ulysses: int, ring: int, placement: str,
                   kernel, head_chunks: int = 1,
                   doc_placement: str = "spec") -> Tuple[PassCost, PassCost, MemoryCost, BatchCost]:
    """Forward, backward, memory and the batch's facts of one split for a packed batch (module docstring).
    ``shape.seqlen`` is ignored: the padded total is priced, the ring moving the cut section's rows only.
    ``doc_placement``: ``DOC_PLACEMENTS`` (``"cut_all"``: the layout before Note [document placement], for the
    recorded runs)."""
    kv = spec.replicated_kv_heads(shape.kv_heads, ulysses)
    groups = spec.head_groups(shape.heads, kv, ulysses, head_chunks) * head_chunks
    rates = _rates(kernel, shape.heads / (ulysses * groups))
    cost = batch_compute(docs.lengths, ulysses, ring, shape.causal, shape.heads, shape.kv_heads, shape.head_dim,
                         shape.element_bytes, groups, rates, kernel.name, model.topology.memory_bandwidth,
                         doc_placement=doc_placement)
    padded = Shape(seqlen=cost.padded_total, heads=shape.heads, kv_heads=shape.kv_heads, head_dim=shape.head_dim,
                   batch=1, dtype=shape.dtype, causal=shape.causal)
    ring_rows = None if doc_placement == "cut_all" or ring == 1 else cost.cut_rows
    fwd, bwd, memory = model.evaluate(padded, ulysses, ring, placement, _StepRates(padded, ulysses, cost, ring),
                                      head_chunks, ring_rows=ring_rows)
    fwd.kernel_calls = bwd.kernel_calls = cost.calls_per_pass
    fwd.flops, bwd.flops = cost.flops, BACKWARD_FLOPS_FACTOR * cost.flops
    return fwd, bwd, memory, cost


@functools.lru_cache(maxsize=64)
def _rates(kernel, heads_per_call: float) -> _Rates:
    return _Rates(kernel, heads_per_call)


# ------------------------------------------------------------------------------------------------ choose
class Chooser:
    """Per-batch pick among meshes that already exist: ``Chooser(meshes, heads=...)(cu_seqlens) -> index``.

    ``meshes``: objects with ``ulysses`` and ``ring`` (and optionally ``placement``), e.g. ``usp.SequenceParallel
    Mesh``; ``heads`` .. ``kernel`` as for ``planner.plan``. Per mesh the constants (kernel rate tables, head
    groups, the cost model) are built once. Per batch: the placement is :func:`fast_placement_owner` (the spec's,
    computed once per ring degree), the batch's compute is :func:`batch_compute` (vectorised over the documents,
    the same code ``plan`` prices with), and the rest of the layer (collectives, sums, step overheads, exposed
    ring) is the dense layer's at the nearest of a fixed grid of totals (8 per octave) and travelling fractions
    (``TRAVEL_STEPS``; none when no document is cut), built on first use and kept, scaled to the padded total. A
    pure function of the batch: every rank that calls it with the same ``cu_seqlens`` picks the same mesh, with
    no collective. Ties go to the earlier mesh.
    """

    def __init__(self, meshes: Sequence[Any], heads: int, kv_heads: Optional[int] = None, head_dim: int = 128,
                 causal: bool = True, dtype: Any = "bfloat16", topology: Any = None, kernel: str = "auto",
                 world_size: Optional[int] = None):
        from .search import _request, _shape

        meshes = list(meshes)
        if not meshes:
            raise PlannerError("meshes must hold at least one mesh (objects with ulysses and ring)")
        self._splits = []
        for i, m in enumerate(meshes):
            u, r = getattr(m, "ulysses", None), getattr(m, "ring", None)
            if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in (u, r)):
                raise PlannerError(f"meshes[{i}] must have positive int ulysses and ring, got {m!r}")
            placement = getattr(m, "placement", "ulysses_inner")
            placement = spec.Placement.parse(getattr(placement, "value", placement), f"meshes[{i}].placement").value
            self._splits.append((u, r, placement))
        sizes = {u * r for u, r, _ in self._splits}
        world = world_size or max(sizes)
        self.shape = _shape(max(sizes), heads, kv_heads, head_dim, 1, dtype, causal)
        self._req = {size: _request(world, self.shape, topology, None, size, kernel, None, False)
                     for size in sizes}
        self._model = {size: CostModel(req.topology, world, size) for size, req in self._req.items()}
        any_req = next(iter(self._req.values()))
        self._kernel, _ = any_req.topology.kernel(kernel, self.shape.dtype, self.shape.head_dim)
        coll = any_req.topology.collectives
        self._hbm = any_req.topology.memory_bandwidth
        self._const = []
        for u, r, placement in self._splits:
            if self.shape.heads % u:
                raise PlannerError(f"heads={self.shape.heads} is not divisible by ulysses={u} (a mesh in meshes)")
            kv = spec.replicated_kv_heads(self.shape.kv_heads, u)
            groups = spec.head_groups(self.shape.heads, kv, u)
            slow = 1.0 + coll.compute_slowdown if u * r > 1 else 1.0
            self._const.append((groups, _rates(self._kernel, self.shape.heads / (u * groups)), slow))
        self._rest: Dict[Tuple[int, int, int], float] = {}

    def _rest_at(self, i: int, cost: BatchCost) -> float:
        """The dense layer's time minus its kernel compute at the grid total nearest the batch's padded total, its
        ring moving the nearest sixteenth of the rows that the batch's moves (none when no document is cut),
        scaled to the padded total."""
        u, r, placement = self._splits[i]
        travel = TRAVEL_STEPS if r == 1 else (0 if cost.steps == 1 else
                                             max(1, round(TRAVEL_STEPS * cost.cut_rows / cost.ring_tokens)))
        key = (i, int(round(8 * math.log2(max(cost.padded_total, 2)))), travel)
        if key not in self._rest:
            s = max(2, int(round(2 ** (key[1] / 8))))
            shape = Shape(seqlen=s, heads=self.shape.heads, kv_heads=self.shape.kv_heads,
                          head_dim=self.shape.head_dim, dtype=self.shape.dtype, causal=self.shape.causal)
            ring_rows = None if travel == TRAVEL_STEPS else s / r * travel / TRAVEL_STEPS
            fwd, bwd, _ = self._model[u * r].evaluate(shape, u, r, placement, self._kernel, ring_rows=ring_rows)
            self._rest[key] = (fwd.total + bwd.total - fwd.compute - bwd.compute) / s
        return self._rest[key] * cost.padded_total

    def predict(self, lengths: np.ndarray) -> List[float]:
        """Predicted forward + backward seconds of one layer on every mesh, for document ``lengths`` (> 0)."""
        out = []
        for i, (u, r, _) in enumerate(self._splits):
            groups, rates, slow = self._const[i]
            cost = batch_compute(lengths, u, r, self.shape.causal, self.shape.heads, self.shape.kv_heads,
                                 self.shape.head_dim, self.shape.element_bytes, groups, rates, self._kernel.name,
                                 self._hbm, owner=fast_placement_owner(lengths, r, self.shape.causal))
            if u == 1 and cost.steps == 1:
                slow = 1.0  # no collective at all: nothing slows the kernels (planner.cost)
            compute = slow * (sum(cost.step0) + (cost.steps - 1) * sum(cost.later) - sum(cost.block_sums))
            out.append(compute + sum(cost.block_sums) + self._rest_at(i, cost))
        return out

    def __call__(self, cu_seqlens: Any) -> int:
        """The index in ``meshes`` of the fastest mesh for the batch ``cu_seqlens``."""
        lengths = _from_cu_seqlens(cu_seqlens)
        lengths = lengths[lengths > 0]
        if lengths.size == 0:
            raise PlannerError("cu_seqlens describes no tokens: give at least one document of length >= 1")
        times = self.predict(lengths)
        return int(np.argmin(times))  # first of equals


_CHOOSERS: Dict[tuple, Chooser] = {}


def choose(cu_seqlens: Any, meshes: Sequence[Any], heads: int, kv_heads: Optional[int] = None, head_dim: int = 128,
           causal: bool = True, dtype: Any = "bfloat16", topology: Any = None, kernel: str = "auto") -> Any:
    """The mesh of ``meshes`` that runs the packed batch ``cu_seqlens`` fastest (:class:`Chooser`, built once per
    set of meshes and options and kept). Deterministic, no collective."""
    meshes = list(meshes)
    key = (tuple((getattr(m, "ulysses", None), getattr(m, "ring", None), str(getattr(m, "placement", "")))
                 for m in meshes), heads, kv_heads, head_dim, causal, str(dtype),
           topology if isinstance(topology, (str, type(None))) else id(topology), kernel)
    chooser = _CHOOSERS.get(key)
    if chooser is None:
        chooser = _CHOOSERS[key] = Chooser(meshes, heads, kv_heads, head_dim, causal, dtype, topology, kernel)
    return meshes[chooser(cu_seqlens)]
