"""Packed documents: the planner's price of one packed batch (``cu_seqlens``) on a ``U x R`` split, and
``choose``, the cheap per-batch pick among meshes that already exist.

Inputs (:func:`documents`): ``cu_seqlens`` (``[0, L0, L0+L1, ..., total]``, as ``usp.long_context_attention_varlen``
takes it), a list of document lengths, or a histogram file. Histogram files: a YAML/JSON mapping ``{length: count}``
(``{4096: 12, 65536: 1}``), or plain text with one ``length count`` pair per line (``#`` starts a comment). The
order of the documents does not change the price (every document is cut on its own).

The model (Note [varlen zigzag layout] in ``usp/varlen.py``; the facts are ``usp.spec``'s ``varlen_*``):

* layout: document ``j`` is padded to ``chunks * c_j`` tokens, ``c_j = ceil(L_j / chunks)``, ``chunks =
  spec.varlen_chunks_per_doc(R, causal)``, plus the padding-only document of ``spec.varlen_pad_chunk`` rows per
  chunk for Ulysses. ``padding`` is every token added; the all-to-all, ring transfers, merges and memory are those
  of the dense layer of the padded length (``planner.cost``).
* compute: each ring block is ``spec.varlen_block_calls`` kernel calls, each one piece of every document (``c_j x
  c_j``, causal or full; ``R == 1``: the whole document). A piece of ``F`` FLOPs takes ``F / rate(side)`` at the
  kernel's rate for a block of side ``sqrt(q * k)`` (the topology's profile; below its smallest block the rate falls
  as ``side / (side + SMALL_SIDE)``: a fixed cost per query tile that short documents cannot amortise). A varlen call
  of flash-attn 2's family (``torch_flash``, ``fa2``) also launches a grid of ``ceil(longest / 128)`` tiles per
  sequence and head (forward; three such grids in the backward), empty for all but the longest sequence:
  ``GRID_CELL_NS`` per cell. Multi-call blocks sum their calls in float32 (output copies and merges, gradient
  zero-fill and ``add_``), at the topology's memory bandwidth.
* imbalance: causal zigzag blocks are identical on every rank; non-causal blocks (``R > 1``) see the visiting
  chunk's real keys only, so a ring step takes the slowest rank's block (the largest over the visiting chunks).
* the rest (collectives, step overheads, the NCCL slowdown, ring overlap) is ``planner.cost.CostModel.evaluate``
  with these step times in place of the dense blocks'.

Fitted (``tests/planner/test_planner_batch.py``, ``benchmarks/data/varlen_torch_flash_20261125.json``: the varlen
kernel alone on 1 H100, whole documents and half documents, 128K and 256K tokens): ``GRID_CELL_NS`` and
``SMALL_SIDE``. Other kernels (fa4, cudnn) have no varlen measurement here: their grid cost is taken as 0.
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from usp import spec

from .cost import FP32, BACKWARD_FLOPS_FACTOR, CostModel, MemoryCost, PassCost, Shape
from .units import PlannerError

__all__ = ["Documents", "documents", "BatchCost", "batch_compute", "evaluate_batch", "Chooser", "choose",
           "GRID_CELL_NS", "SMALL_SIDE"]

#: ns per grid cell (sequence x head x 128-row tile) of a varlen call, by kernel (module docstring); 0 if absent
GRID_CELL_NS: Dict[str, float] = {"torch_flash": 1.9, "fa2": 1.9}
#: tokens: below the profile's smallest block the rate falls as side / (side + SMALL_SIDE) (module docstring)
SMALL_SIDE = 512.0
CTA_ROWS = 128
BACKWARD_GRIDS = 3


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


# ------------------------------------------------------------------------------------------------ compute
class _Rates:
    """Vectorised ``KernelProfile.rate`` over block sides for one heads-per-call, with the small-side fall-off."""

    def __init__(self, kernel, heads_per_call: float):
        smallest = kernel.points[0].block
        self._log = np.arange(0.0, 23.01, 0.125)  # log2(side): 1 .. 8M tokens
        sides = 2.0 ** self._log
        self._table = {}
        for backward in (False, True):
            for causal in (False, True):
                at = np.array([kernel.rate(backward, causal, max(s, smallest), heads_per_call) for s in sides])
                fall = np.where(sides < smallest, (sides / (sides + SMALL_SIDE)) / (smallest / (smallest + SMALL_SIDE)),
                                1.0)
                self._table[(backward, causal)] = at * fall

    def __call__(self, backward: bool, causal: bool, side: np.ndarray) -> np.ndarray:
        return np.interp(np.log2(np.maximum(side, 1.0)), self._log, self._table[(backward, causal)])


@dataclass
class BatchCost:
    """What the batch adds to a split: the layout and each ring step's kernel time on one rank (all its heads)."""

    layout: str
    padding: int
    local_tokens: int
    padded_total: int
    #: (forward, backward) seconds of the kernel calls of step 0 and of a step >= 1, before the NCCL slowdown
    step0: Tuple[float, float]
    later: Tuple[float, float]
    #: float32 sums of multi-call blocks (seconds), included in the step times above
    block_sums: Tuple[float, float]
    calls_per_pass: int
    flops: float
    #: slowest rank / mean rank compute of a pass (1.0: balanced)
    imbalance: float

    def to_dict(self) -> dict:
        return {"layout": self.layout, "padding": self.padding, "local_tokens": self.local_tokens,
                "padded_total": self.padded_total, "kernel_calls_per_pass": self.calls_per_pass,
                "imbalance": self.imbalance, "block_sums_s": list(self.block_sums)}


def batch_compute(lengths: np.ndarray, ulysses: int, ring: int, causal: bool, heads: int, kv_heads: int,
                  head_dim: int, element_bytes: int, groups: int, rates: _Rates, kernel_name: str,
                  memory_bandwidth: Optional[float]) -> BatchCost:
    """The packed batch's layout and per-step kernel times on one rank (module docstring). Vectorised over the
    documents: ``O(documents)`` numpy work (``O(R * documents)`` non-causal)."""
    chunks = spec.varlen_chunks_per_doc(ring, causal)
    c = -(-lengths // chunks)
    rows = int(c.sum())
    pad = spec.varlen_pad_chunk(rows, ulysses, ring, causal)
    zigzag = chunks == 2 * ring and ring > 1
    halves = 2 if zigzag else 1
    ring_tokens = halves * (rows + pad)
    padded_total = chunks * (rows + pad)
    hq = heads / ulysses
    kv = spec.replicated_kv_heads(kv_heads, ulysses) / ulysses
    cell = GRID_CELL_NS.get(kernel_name, 0.0) * 1e-9
    cf = c.astype(np.float64)
    unit = 4.0 * hq * head_dim  # FLOPs of one (query, key) pair, all heads of the rank

    def grid(n_seqs: int, longest: float) -> Tuple[float, float]:
        cells = n_seqs * hq * math.ceil(longest / CTA_ROWS)
        return cell * cells, BACKWARD_GRIDS * cell * cells

    def call(q: np.ndarray, k: np.ndarray, causal_piece: bool, extra_seqs: int = 0) -> Tuple[float, float, float]:
        area = q * k / (2.0 if causal_piece else 1.0)
        side = np.sqrt(q * k)
        f = unit * area
        fwd = float(np.sum(f / rates(False, causal_piece, side)))
        bwd = float(np.sum(BACKWARD_FLOPS_FACTOR * f / rates(True, causal_piece, side)))
        g_f, g_b = grid(q.size + extra_seqs + (1 if pad else 0), float(max(q.max(), k.max())))
        return fwd + g_f, bwd + g_b, float(f.sum())

    hbm = memory_bandwidth or 0.0
    B = element_bytes

    def sums(q_copies: int, q_merges: int, q_rows_calls: int, k_rows_calls: int, q_rows: int, k_rows: int):
        """Seconds of a multi-call block's float32 sums over ``C = rows`` chunk rows: forward output copies and
        merges; backward zero-filled float32 dq/dk/dv and one ``add_`` per call over its rows."""
        if not hbm:
            return 0.0, 0.0
        C = rows + pad
        fwd = ((B + 4) * q_copies + (8 + B) * q_merges) * C * hq * head_dim
        bwd = FP32 * C * (q_rows * hq + 2 * k_rows * kv) * head_dim
        bwd += (8 + B) * C * (q_rows_calls * hq + 2 * k_rows_calls * kv) * head_dim
        return fwd / hbm, bwd / hbm

    if ring == 1:
        f, b, fl = call(cf, cf, causal)
        step0 = later = (f, b)
        block = (0.0, 0.0)
        calls, flops, imbalance = 1, fl, 1.0
    elif zigzag:
        f1, b1, fl1 = call(cf, cf, True)
        f2, b2, fl2 = call(cf, cf, False)
        diag = sums(2, 1, 3, 3, 2, 2)  # heads, tails copied, tails merged; calls: 3 query and 3 key chunk sides
        before = sums(2, 0, 2, 2, 2, 1)  # all our rows x the visiting heads
        after = sums(1, 1, 2, 2, 1, 2)   # our tails x the visiting heads and tails
        step_sums = (max(before[0], after[0]), max(before[1], after[1]))
        step0 = (2 * f1 + f2 + diag[0], 2 * b1 + b2 + diag[1])
        later = (2 * f2 + step_sums[0], 2 * b2 + step_sums[1])
        block = (diag[0] + (ring - 1) * step_sums[0], diag[1] + (ring - 1) * step_sums[1])
        calls = 3 + 2 * (ring - 1)
        flops, imbalance = 2 * fl1 + fl2 + (ring - 1) * 2 * fl2, 1.0
    else:  # non-causal ring: the visiting chunk's real keys; a step waits for the busiest rank
        per_source = []
        for source in range(ring):
            real = np.clip(lengths - source * c, 0, c).astype(np.float64)
            keep = real > 0
            f, b, fl = call(cf[keep], real[keep], False, extra_seqs=int(np.sum(real < cf)))
            per_source.append((f, b, fl))
        f_max = max(p[0] for p in per_source)
        b_max = max(p[1] for p in per_source)
        step0 = later = (f_max, b_max)
        block = (0.0, 0.0)
        calls = ring
        flops = sum(p[2] for p in per_source)
        mean = sum(p[0] + p[1] for p in per_source) / ring
        imbalance = (f_max + b_max) / mean if mean else 1.0
    layout = "per-document zigzag (2R chunks)" if zigzag else (
        "whole documents" if ring == 1 else "per-document contiguous (R chunks)")
    total = int(lengths.sum())
    return BatchCost(layout=layout, padding=padded_total - total, local_tokens=ring_tokens // ulysses,
                     padded_total=padded_total, step0=step0, later=later, block_sums=block,
                     calls_per_pass=calls * groups, flops=flops, imbalance=imbalance)


class _StepRates:
    """A kernel profile for ``CostModel.evaluate`` whose rates make each dense block it prices take the batch's
    step time: ``evaluate`` prices step 0 with the causal diagonal block (causal, ``R > 1``) and every later step
    with the average visiting block; ``R == 1`` and non-causal layers have one kind of block."""

    def __init__(self, shape: Shape, ulysses: int, cost: BatchCost, ring: int):
        self.shape, self.heads_per_rank, self.cost, self.ring = shape, shape.heads / ulysses, cost, ring
        self.name = "varlen"

    def rate(self, backward: bool, causal: bool, side: float, heads: Optional[float] = None) -> float:
        s = self.shape
        flops = 4.0 * s.batch * self.heads_per_rank * side * side * s.head_dim * (0.5 if causal else 1.0)
        flops *= BACKWARD_FLOPS_FACTOR if backward else 1.0
        zigzag_diag = causal and self.ring > 1 and s.causal
        seconds = (self.cost.step0 if zigzag_diag else self.cost.later)[1 if backward else 0]
        return flops / max(seconds, 1e-12)


def evaluate_batch(model: CostModel, shape: Shape, docs: Documents, ulysses: int, ring: int, placement: str,
                   kernel, head_chunks: int = 1) -> Tuple[PassCost, PassCost, MemoryCost, BatchCost]:
    """Forward, backward, memory and the batch's facts of one split for a packed batch (module docstring).
    ``shape.seqlen`` is ignored: the padded total is priced."""
    kv = spec.replicated_kv_heads(shape.kv_heads, ulysses)
    groups = spec.head_groups(shape.heads, kv, ulysses, head_chunks) * head_chunks
    rates = _rates(kernel, shape.heads / (ulysses * groups))
    cost = batch_compute(docs.lengths, ulysses, ring, shape.causal, shape.heads, shape.kv_heads, shape.head_dim,
                         shape.element_bytes, groups, rates, kernel.name, model.topology.memory_bandwidth)
    padded = Shape(seqlen=cost.padded_total, heads=shape.heads, kv_heads=shape.kv_heads, head_dim=shape.head_dim,
                   batch=1, dtype=shape.dtype, causal=shape.causal)
    fwd, bwd, memory = model.evaluate(padded, ulysses, ring, placement, _StepRates(padded, ulysses, cost, ring),
                                      head_chunks)
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
    groups, the cost model) are built once. Per batch: the batch's compute is :func:`batch_compute` (vectorised
    over the documents, the same code ``plan`` prices with), and the rest of the layer (collectives, sums, step
    overheads, exposed ring) is the dense layer's at the nearest of a fixed grid of totals (8 per octave, built
    on first use and kept), scaled to the padded total. A pure function of the batch: every rank that calls it
    with the same ``cu_seqlens`` picks the same mesh, with no collective. Ties go to the earlier mesh.
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
        self._rest: Dict[Tuple[int, int], float] = {}

    def _rest_at(self, i: int, padded_total: int) -> float:
        """The dense layer's time minus its kernel compute at the grid total nearest ``padded_total``, scaled."""
        key = (i, int(round(8 * math.log2(max(padded_total, 2)))))
        if key not in self._rest:
            u, r, placement = self._splits[i]
            s = max(2, int(round(2 ** (key[1] / 8))))
            shape = Shape(seqlen=s, heads=self.shape.heads, kv_heads=self.shape.kv_heads,
                          head_dim=self.shape.head_dim, dtype=self.shape.dtype, causal=self.shape.causal)
            fwd, bwd, _ = self._model[u * r].evaluate(shape, u, r, placement, self._kernel)
            self._rest[key] = (fwd.total + bwd.total - fwd.compute - bwd.compute) / s
        return self._rest[key] * padded_total

    def predict(self, lengths: np.ndarray) -> List[float]:
        """Predicted forward + backward seconds of one layer on every mesh, for document ``lengths`` (> 0)."""
        out = []
        for i, (u, r, _) in enumerate(self._splits):
            groups, rates, slow = self._const[i]
            cost = batch_compute(lengths, u, r, self.shape.causal, self.shape.heads, self.shape.kv_heads,
                                 self.shape.head_dim, self.shape.element_bytes, groups, rates, self._kernel.name,
                                 self._hbm)
            compute = slow * (sum(cost.step0) + (r - 1) * sum(cost.later) - sum(cost.block_sums))
            out.append(compute + sum(cost.block_sums) + self._rest_at(i, cost.padded_total))
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
