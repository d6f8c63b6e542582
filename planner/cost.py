"""Cost model: time and memory of one attention layer, forward and backward, for one (U, R, placement).

Notation: ``b`` batch, ``s`` global sequence, ``H`` query heads, ``Hkv`` KV heads, ``d`` head_dim, ``B`` bytes per
element of the input dtype, ``U`` Ulysses degree, ``R`` ring degree, ``P = U * R``. Sources in brackets:
[RESULTS] ``benchmarks/RESULTS.md``, section "Reference measurements the code cites"; [CORE] the core's layout contract (``usp/``); [TE] TransformerEngine
``context_parallel.py``; [DS] DeepSpeed-Ulysses paper; [RFA] ring-flash-attention.

KV replication [CORE]: when ``Hkv % U != 0`` the KV heads are replicated up to ``Hkv' = lcm(Hkv, U)`` before the
all-to-all (``Hkv'`` divides ``H``); otherwise ``Hkv' = Hkv``.

Layout [CORE]: after the Ulysses all-to-all each rank holds ``H/U`` query heads, ``Hkv'/U`` KV heads and
``s/R`` tokens. Causal with ``R > 1`` uses zigzag: ``2R`` chunks, ring rank ``r`` holds chunks ``r`` and
``2R-1-r``.

Compute [RESULTS, FLOP convention]
  forward FLOPs of a ``q x k`` block: ``4 * b * (H/U) * q * k * d``, halved for a causal (square) block;
  backward FLOPs = 2.5 x forward (fwd+bwd = 3.5 x forward).
  Blocks per rank [CORE]:
    * ``R == 1``: one block ``s x s`` (causal or not).
    * ``R > 1``, non-causal: ``R`` blocks ``(s/R) x (s/R)``.
    * ``R > 1``, causal zigzag: step 0 is the causal diagonal block ``(s/R) x (s/R)`` (half the FLOPs of a
      square); steps ``1..R-1`` are half squares ``(s/R) x (s/2R)`` (or ``(s/2R) x (s/R)``), non-causal.
  Every rank does ``1/P`` of the total (``4·b·H·s²·d``, halved if causal) — zigzag balances the causal mask.
  A block takes ``FLOPs / rate(kind, side)`` where ``rate`` is the topology's kernel rate (forward or backward,
  causal or not) at the block's equivalent square side ``sqrt(q * k)`` (interpolated in log2; see
  ``planner.topology``) and the call's query heads ``H/(U·G·C)`` when the profile was measured at several head
  counts (work per call: few heads on a small block leave multiprocessors idle). Kernel rates come from [RESULTS] (cuDNN ~580, FA4 ~665 TFLOP/s fwd+bwd on H100) or the
  probe.

Head-group pipeline [CORE ``usp/ulysses.py``, Note [head-group pipeline], ``head_groups()``]: the heads of each
Ulysses rank are cut into ``G`` groups, ``G = 2`` when ``U > 1`` and both ``H/U`` and ``Hkv'/U`` are even, else
``G = 1``. Each group runs its own ring (forward and backward) on ``H/(U·G)`` query and ``Hkv'/(U·G)`` KV heads:
per-group compute, merge traffic and ring bytes are ``1/G`` of the whole, and every ring step's latency ``α`` is
paid once per group and head chunk (the calls of ``usp.spec.layer_collectives``: ``G·C·(R-1)`` forward and
``G·C·(2R-3)`` backward P2P batches, ``G·C·(2R-2)`` when ``C > 1``; ``a2a_calls`` and ``ring_transfers`` of a
:class:`PassCost` are those counts). Head groups, head-chunk rules and K/V replication are ``usp.spec``'s.

Ulysses all-to-all [DS], per rank, ``4G`` calls per pass, each on ``1/G`` of the buffer:
  forward: Q, K, V in (``b·(s/P)·H·d·B / G`` for Q, ``b·(s/P)·Hkv'·d·B / G`` for K and V) and O out (as Q),
    per group; backward: dO in, dQ, dK, dV out (same sizes; gradients keep the input dtype), per group.
  Overlap [CORE]: NCCL runs the trades in order on its own stream; group ``g+1``'s input trades run under group
  ``g``'s ring, group ``g``'s output trades under group ``g+1``'s ring. With ``I = a(Q/G) + 2·a(KV/G)``,
  ``O = a(Q/G)`` (forward; backward ``I = a(Q/G)`` for dO and ``O = a(Q/G) + 2·a(KV/G)`` for dQ, dK, dV) and
  ``T`` the ring time of one group (compute + merge + exposed ring), the pass takes
  ``I + G·T + O + (G-1)·(max(0, I - T) + max(0, O - T))`` (``G ≤ 2``): only the first group's inputs and the last
  group's outputs are exposed, plus whatever part of the overlapped trades outlasts the other group's compute.
  "All-to-all" in a breakdown is that exposed time plus the staging copies below.
  Each call of an ``M``-byte buffer sends ``(U-1)/U · M`` bytes, ``M/U`` to each peer, all Ulysses groups at once.
  Its time is ``max(floor_a2a, latency_a2a + path_latency + (M/U) · spb)`` where ``spb`` (seconds per byte of
  one flow) is the bottleneck-link load of the pattern (``planner.topology``: flows sharing a link share its
  bandwidth — PCIe switches, CPU-to-CPU links, NICs). When the topology holds a probe fit for this group size and
  the groups are contiguous ranks (``ulysses_inner`` or ``R == 1``) spanning as many hosts as in the probe, that
  fit replaces the graph estimate: ``max(floor, latency + M / bandwidth)`` (bandwidth in buffer bytes per second,
  "algbw"; [RESULTS] 2x H100: ``max(57 µs, 25 µs + M / 552 GB/s)``).

GPU-memory traffic (not FLOPs, but time on the compute stream), at the topology's ``memory_bandwidth``
(HBM; skipped when the topology does not give it):
  * all-to-all staging [CORE ``usp/comm/all_to_all.py``]: a permute+contiguous copy before and a permute+reshape
    copy after each call, ``4 · M`` bytes read+written per call (on the compute stream, never hidden), added to
    the all-to-all time;
  * ring sums [CORE ``usp/ring.py`` Note [narrow sums], ``usp/merge.py``], the "merge" part of a breakdown, over
    the rows (keys) each block touched. The forward merge is the fused kernel of ``csrc/`` (one pass: read the
    accumulator and the block output, write the accumulator). ``R == 2`` (at most two terms per row,
    ``usp.spec.narrow_sums``): the sums stay in the input dtype: forward ``3·B · q_h`` per merged row;
    backward, dq ``3·B`` over the rows of step 1 and, at the owner, dK/dV ``3·B`` over every row (received
    partial + own block), no zero-fill, no casts.
    ``R > 2``: float32 accumulators: forward step 0's output promoted (``B + 4``), each merge ``(8 + B)``, the
    final cast ``(4 + B)`` (all ``· q_h``); backward the fp32 dq and dKV sums are created (``4 + B``), every
    step ``add_``s its block gradients (``8 + B``) and the final casts cost ``(4 + B)``, over ``q_h + 2·kv_h``
    elements. Causal zigzag steps ``>= 1`` touch 3/4 of the rows (keys) on average: half the steps take every row
    against half the keys, half take half the rows against every key (``usp.spec.dense_block``, averaged by
    ``usp.spec.block_fractions``). Counts ``q_h``, ``kv_h`` are defined under
    memory below.

Ring P2P [CORE], [TE]; each step is double-buffered (the next transfer is issued before the current block's
compute):
  bytes per rank per transfer: KV ``n_kv = 2·b·(s/R)·(Hkv'/U)·d·B``;
  dKV ``n_dkv = 2·b·(s/R)·(Hkv'/U)·d·4`` (fp32 partial sums; ``·B`` when ``R == 2``, Note [narrow sums]). Each head group moves ``1/G`` of these (``n_kv/G``, ``n_dkv/G``) in its own
  rotations; the ring time of the pass is ``G`` times one group's.
  An isolated transfer of ``n`` bytes takes ``t(n) = max(floor_p2p, α + n · spb)``, ``α = latency_p2p +
  path_latency``; [RESULTS] measured ``max(0.168 ms, 0.047 ms + n / 313 GB/s)`` on 2x H100 NVLink, which fits all
  four sizes. A step with ``k`` rotations in flight (each one batched isend/irecv; the core runs KV and dKV as two
  rotations) carrying ``n`` bytes in all, overlapped with compute ``c`` (kernel + merge), costs
  ``k · α + max(c, max(floor_p2p - α, n · spb))``: the latency part (launch + handshake) is exposed, the rest hides
  under compute (the issue's "max(compute, transfer) plus the latency floor"); for ``k = 1`` that is
  ``α + max(c, t(n) - α)``.
  forward: steps ``0..R-2`` carry the next KV (``R-1`` transfers); the last step is compute only.
  backward [CORE ``usp/ring.py``, Note [reverse backward]]: the forward's steps in reverse, ``j = R-1 .. 0``,
  starting on the K/V block kept from the forward (no wait). Step ``j`` carries K/V to the previous rank for step
  ``j-1`` (if ``j >= 2``: step 0 is the rank's own block) and the fp32 dKV partial sum of step ``j+1`` (if
  ``j <= R-2``): ``R-2`` KV and ``R-1`` dKV transfers; the last dKV transfer overlaps the diagonal block's (step 0)
  compute, nothing trails it.
  "Exposed ring" in a breakdown = ring time - (compute + merge) time.
  Travelling rows (packed documents: ``evaluate(..., ring_rows=)`` from ``planner.batch``, Note [document
  placement] in ``usp/varlen.py``): only the first ``ring_rows`` of each ring rank's ``s/R`` rows (the cut
  section) travel. With ``f = ring_rows / (s/R)``: ``n_kv``, ``n_dkv``, the visiting blocks' merges (steps
  ``>= 1``), the fp32 dKV sums created, the ring K/V and dKV buffers and the kept last K/V block scale by ``f``;
  step 0 and the output and dq sums keep every row. ``ring_rows = 0``: no rotation at all
  (``usp.spec.layer_collectives(documents_cut=False)``), one step, no ring sums, the memory of ``R == 1`` on the
  ``s/R`` rows, and no NCCL slowdown or step overhead unless ``U > 1``. ``None`` (dense layers): ``f = 1``.

Peak memory per GPU [CORE], one attention layer, element counts ``q_h = b·(s/R)·(H/U)·d`` (= ``b·(s/P)·H·d``),
``kv_h = b·(s/R)·(Hkv'/U)·d``, ``l = b·(H/U)·(s/R)`` (LSE):
  saved for backward: ``B·(2·q_h + 2·kv_h) + 4·l``  (head-sharded q, k, v, out; fp32 LSE), plus with ``R > 1``
    and no head chunks the K/V block held at the forward's last step, one per head group: ``2·kv_h·B``
  forward transient: replicated KV before the all-to-all ``2·kv_h·B`` (only when replicating); a2a staging
    ``q_h·B`` (only with ``U > 1``); the output after the a2a back ``q_h·B``; with ``R > 1``: ring KV buffers ``min(R-1, 2)·2·kv_h·B``
    (double-buffered), the fp32 out accumulator ``4·q_h`` (none when ``R == 2``: Note [narrow sums]), block out
    ``q_h·B``, LSE accumulator + block LSE ``8·l``.
  backward transient: dO after the a2a ``q_h·B``; a2a staging ``q_h·B`` (only with ``U > 1``); grads after the a2a back
    ``(q_h + 2·kv_h)·B``; per kernel call the block grads ``(q_h + 2·kv_h)·B`` and the kernel's fp32 dq workspace
    ``4·q_h`` (measured for cuDNN on H100: 2x the bf16 q block, ``benchmarks/kernel_overhead.py --memory-probe``);
    with ``R > 1``: the dq sum (fp32 ``4·q_h``; ``R == 2``: the held step-1 block ``q_h·B``), the travelling dKV,
    double-buffered ``2·2·kv_h·4`` (``·B`` when ``R == 2``), ring KV buffers ``min(R-1, 2)·2·kv_h·B``.
  head chunks ``C`` [CORE ``usp/ring.py`` Note [head chunks]]: every ring and per-call term above is divided by
    ``C`` (one chunk's ring is live at a time; K/V-sized terms by ``min(C, Hkv'/U)``, as chunks beyond the K/V
    heads share one); the dq sum is written straight into dq (no held block); the Ulysses-level buffers are not
    divided.
  peak = saved + max(forward transient, backward transient). Not modelled: weights, other layers, allocator
  fragmentation, communicator buffers (NCCL's are ~hundreds of MiB per communicator).

Sliding windows [CORE ``usp/spec.py`` ``SlidingWindow``, ``usp/ring.py`` Note [sparse ring]], a shape with
``window`` (``window_size=(left, right)``; one that binds nowhere on the sequence is the dense layer above). The
facts are the spec's, the object the runtime's ``WindowSchedule`` is: the active ring steps, each rank's pieces
per step (trimmed sub-blocks with their own window) and the halo rows it receives and sends per step. Per head
group and chunk, on every ring rank ``r`` (the pass takes the slowest rank's time):
  compute: each piece ``4·b·(H/U)·d·A`` FLOPs, ``A = band_area`` its (query, key) pairs (2.5x backward), at the
    kernel's rate at the equivalent side ``sqrt(2A)`` — the causal rate when the piece is masked (the window's
    edges are masked tiles, like the diagonal), the non-causal rate at ``sqrt(q·k)`` for a full piece;
  sums [CORE ``usp/ring.py`` Note [sparse sums]]: in the input dtype (``a = B``) on a rank whose rows sum at most
    two terms (``SlidingWindow.narrow_sums``, out/dQ and dK/dV apart), else float32 (``a = 4``): the own pieces
    write their rows (``B + a`` per element; nothing when one piece covers every row and ``a = B``, a cast
    ``B + 4`` when ``a = 4``), every other piece merges (``3·B`` per query element in the input dtype, ``8 + B`` in
    float32) or adds its dq and step-0 dK/dV the same way (the remote halos' dK/dV partials: float32 zeros and
    adds, ``12 + B``, and their return added at ``4 + 2a``), and float32 sums are cast at the end (``4 + B``);
  steps ``0, j1, j2, ...`` (step 0 and the active steps): under step ``j_i``'s pieces travels the halo exchange of
    ``j_{i+1}`` (``max(received, sent)`` rows · ``2·b·(Hkv'/U)·d·B``, one batched call: ``α + max(c, n·spb)``);
    backward: the halo again unless kept (``keep_halos`` and ``C == 1``) and the fp32 dK/dV halo of ``j_{i-1}``
    going home; the last step's dK/dV return trails the last block (exposed);
  overhead: ``step_overhead`` per step walked (``1 + active steps``);
  counts: ``usp.spec.layer_collectives`` with the window (the busiest ring rank's calls); bytes, compute and
    kernel calls of the slowest rank;
  memory: as the dense layer (halo buffers and kept halos are at most the dense ring's K/V blocks) with the sums'
    dtypes above (the widest rank's).
A mix of layer types (``planner.plan(window_layers=...)``) is the sum of its layers' costs (``PassCost.combine``);
its memory is the larger layer's.

Distributed overheads (issue 16; ``collectives.step_overhead_us`` and ``collectives.compute_slowdown`` of the
topology, defaults in ``planner.topology``), only when ``P > 1``: every kernel time is multiplied by
``1 + compute_slowdown`` (NCCL's kernels share the SMs and memory bandwidth with the attention while a transfer is
in flight), and every ring step of the layer (``R`` per pass, ``1`` when ``R == 1``) costs ``step_overhead`` more on
the compute stream (the wait on the communication stream, the launches of the step's kernels and sums), inside the
step, so that it counts against the transfer it overlaps; "overhead" in a breakdown. Fitted to the 77 recorded
fwd+bwd runs of ``benchmarks/data`` (2x H100 and 2x H200, 16K-2M, 1x2 and 2x1; ``tests/planner/
test_planner_accuracy.py``): 176 µs and 4.7%. Without them every prediction was low (mean -5.5%, -9% to -13% at
16K-32K, where the fixed part weighs most); the 1-GPU kernel alone is predicted within +-4%
(``test_single_gpu_times_match_facts``), so the gap is the distribution's. The runs cannot tell a cost per ring step
from one per kernel call or per pass (all have 2 ring steps or 2 head groups per pass): per ring step is the
choice that does not penalise head groups and chunks, for which no run shows a cost.

Not modelled (candidates for the accuracy work of issue 3 item 9): how the overheads above grow with the ring size
(jitter across many ring ranks); kernel
efficiency vs heads per rank; NCCL PXN routing; whether the P2P floor (0.168 ms on 2x H100) is hidden under
compute (assumed: yes, only ``α`` is exposed). Blocks smaller than a profile's smallest point get its rate
(optimistic for very small blocks).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Tuple

from usp import spec
# [CORE] rules, from the spec the runtime runs (torch-free): re-exported for the planner's callers
from usp.spec import PLACEMENTS, head_groups, replicated_kv_heads
from usp.spec import valid_head_chunks as head_chunk_options

from .topology import Fit, KernelProfile, Topology
from .units import PlannerError, canonical_dtype, dtype_bytes

__all__ = ["Shape", "PassCost", "MemoryCost", "CostModel", "replicated_kv_heads", "head_groups", "PLACEMENTS"]

FP32 = 4
BACKWARD_FLOPS_FACTOR = 2.5


@dataclass(frozen=True)
class Shape:
    """The attention problem: global sequence ``seqlen``, heads, KV heads, head_dim, batch, dtype, causal."""

    seqlen: int
    heads: int
    kv_heads: int
    head_dim: int = 128
    batch: int = 1
    dtype: str = "bfloat16"
    causal: bool = True
    #: sliding window ``(left, right)`` over global positions, ``usp.long_context_attention``'s ``window_size``
    #: (-1 = unbounded; causal: ``right == 0``). ``(-1, -1)``: no window
    window: Tuple[int, int] = (-1, -1)

    @property
    def element_bytes(self) -> int:
        return dtype_bytes(self.dtype)

    def sliding_window(self) -> Optional[spec.SlidingWindow]:
        """The window's ring facts (``usp.spec.SlidingWindow``), or None when no bound binds on this sequence."""
        if tuple(self.window) == (-1, -1):
            return None
        return spec.sliding_window(self.causal, self.window, self.seqlen)

    def total_forward_flops(self) -> float:
        """``4·b·H·s²·d``, halved when causal [RESULTS, FLOP convention]; with a window ``4·b·H·d`` times the
        (query, key) pairs it lets through (``usp.spec.band_area``)."""
        window = self.sliding_window()
        if window is not None:
            return 4.0 * self.batch * self.heads * self.head_dim * spec.band_area(self.seqlen, self.seqlen,
                                                                                  window.left, window.right)
        flops = 4.0 * self.batch * self.heads * self.seqlen**2 * self.head_dim
        return flops / 2 if self.causal else flops

    def to_dict(self) -> dict:
        return {"seqlen": self.seqlen, "heads": self.heads, "kv_heads": self.kv_heads, "head_dim": self.head_dim,
                "batch": self.batch, "dtype": self.dtype, "causal": self.causal, "window": list(self.window)}

    @classmethod
    def from_dict(cls, data: dict) -> "Shape":
        window = data.get("window") or (-1, -1)
        return cls(seqlen=int(data["seqlen"]), heads=int(data["heads"]), kv_heads=int(data["kv_heads"]),
                   head_dim=int(data.get("head_dim", 128)), batch=int(data.get("batch", 1)),
                   dtype=canonical_dtype(data.get("dtype", "bfloat16")), causal=bool(data.get("causal", True)),
                   window=(int(window[0]), int(window[1])))


@dataclass
class PassCost:
    """Predicted time of one pass (forward or backward) of one layer, seconds, with its parts.

    ``total = all_to_all + compute + merge + ring_exposed + overhead``. Counts are per rank: ``a2a_calls``/``a2a_bytes`` (bytes
    sent), ``ring_transfers``/``ring_bytes`` (bytes sent to the ring neighbour).
    """

    compute: float = 0.0
    merge: float = 0.0
    all_to_all: float = 0.0
    ring_exposed: float = 0.0
    overhead: float = 0.0
    a2a_calls: int = 0
    a2a_bytes: float = 0.0
    ring_transfers: int = 0
    ring_bytes: float = 0.0
    kernel_calls: int = 0
    flops: float = 0.0

    @property
    def total(self) -> float:
        return self.compute + self.merge + self.all_to_all + self.ring_exposed + self.overhead

    @classmethod
    def combine(cls, parts: "List[Tuple[int, PassCost]]") -> "PassCost":
        """``sum(count * cost)``: every time, count and byte of several layers (a mix of layer types)."""
        out = cls()
        for count, cost in parts:
            for name in cls.__dataclass_fields__:
                setattr(out, name, getattr(out, name) + count * getattr(cost, name))
        return out

    def to_dict(self) -> dict:
        return {"total_s": self.total, "compute_s": self.compute, "merge_s": self.merge,
                "all_to_all_s": self.all_to_all, "overhead_s": self.overhead,
                "ring_exposed_s": self.ring_exposed, "flops": self.flops, "kernel_calls": self.kernel_calls,
                "a2a_calls": self.a2a_calls, "a2a_bytes": self.a2a_bytes, "ring_transfers": self.ring_transfers,
                "ring_bytes": self.ring_bytes}

    @classmethod
    def from_dict(cls, data: dict) -> "PassCost":
        return cls(compute=data["compute_s"], merge=data.get("merge_s", 0.0), all_to_all=data["all_to_all_s"],
                   ring_exposed=data["ring_exposed_s"], overhead=data.get("overhead_s", 0.0),
                   a2a_calls=data.get("a2a_calls", 0), a2a_bytes=data.get("a2a_bytes", 0.0),
                   ring_transfers=data.get("ring_transfers", 0), ring_bytes=data.get("ring_bytes", 0.0),
                   kernel_calls=data.get("kernel_calls", 0), flops=data.get("flops", 0.0))


@dataclass
class MemoryCost:
    """Peak bytes per GPU for one attention layer (see the module docstring)."""

    saved: float = 0.0
    forward_transient: float = 0.0
    backward_transient: float = 0.0

    @property
    def peak(self) -> float:
        return self.saved + max(self.forward_transient, self.backward_transient)

    def to_dict(self) -> dict:
        return {"peak_bytes": self.peak, "saved_bytes": self.saved, "forward_transient_bytes": self.forward_transient,
                "backward_transient_bytes": self.backward_transient}

    @classmethod
    def from_dict(cls, data: dict) -> "MemoryCost":
        return cls(saved=data["saved_bytes"], forward_transient=data["forward_transient_bytes"],
                   backward_transient=data["backward_transient_bytes"])


@dataclass
class _Block:
    q: float          # query tokens
    k: float          # key tokens
    causal: bool
    rows: float = 1.0  # fraction of the local queries the block updates, on average (usp.spec.block_fractions)

    def flops(self, shape: Shape, heads_per_rank: float) -> float:
        f = 4.0 * shape.batch * heads_per_rank * self.q * self.k * shape.head_dim
        return f / 2 if self.causal else f

    @property
    def side(self) -> float:
        return math.sqrt(self.q * self.k)


def _travel(seqlen: int, ring: int, ring_rows: Optional[float]) -> float:
    """The fraction of each ring rank's ``seqlen / ring`` rows whose K/V travel (``CostModel.evaluate``)."""
    if ring_rows is None:
        return 1.0
    local = seqlen / ring
    if not 0 <= ring_rows <= local:
        raise PlannerError(f"ring_rows={ring_rows} must be between 0 and the {local:g} rows of a ring rank")
    return ring_rows / local if local else 0.0


def _step_weights(ring: int) -> List[Tuple[int, int]]:
    """``[(step index, how many steps it stands for)]``: steps 0, 1, R-2 and R-1 differ from the others (diagonal
    block, merges, first and last transfers); steps 2..R-3 are alike and stand for each other."""
    if ring <= 5:
        return [(i, 1) for i in range(ring)]
    return [(0, 1), (1, 1), (2, ring - 4), (ring - 2, 1), (ring - 1, 1)]


class CostModel:
    """Evaluates candidates on one topology for one world size; caches link-pattern costs across shapes."""

    def __init__(self, topology: Topology, world_size: int, sequence_parallel_size: Optional[int] = None):
        self.topology = topology
        self.world_size = world_size
        self.sp_size = sequence_parallel_size or world_size
        topology.check_world(world_size)
        # compact form: link loads per host class (cost independent of the world size); explicit graph: networkx
        self._classes = topology.host_classes(world_size) if topology.graph_spec is None else None

    @property
    def fabric(self):
        """The networkx graph of the world (built on first use: for inspection and explicit graphs)."""
        return self.topology.fabric(self.world_size)

    # ------------------------------------------------------------------ groups (rank layout of usp.mesh)
    def rank_grid(self, ulysses: int, ring: int, placement: str) -> List[List[List[int]]]:
        """``grid[block][ring_rank][ulysses_rank]`` global ranks over the whole world (every data-parallel
        replica runs the same pattern at the same time, so all of them load the links). O(world): for tests and
        explicit graphs; the compact form never lists the ranks."""
        return spec.sequence_parallel_rank_grid(self.world_size, ulysses, ring, placement)

    def ulysses_groups(self, ulysses: int, ring: int, placement: str) -> List[List[int]]:
        return [row for block in self.rank_grid(ulysses, ring, placement) for row in block]

    def ring_groups(self, ulysses: int, ring: int, placement: str) -> List[List[int]]:
        grid = self.rank_grid(ulysses, ring, placement)
        return [[block[r][u] for r in range(ring)] for block in grid for u in range(ulysses)]

    def hosts_spanned(self, group: List[int]) -> int:
        if self._classes is not None:
            return len({self._classes.host_of(r) for r in group})
        return len({self.fabric.host_of(r) for r in group})

    def ulysses_hosts(self, ulysses: int, ring: int, placement: str) -> Tuple[int, bool]:
        """(hosts the first Ulysses group spans, whether any Ulysses group spans more than one host)."""
        if self._classes is not None:
            return self._classes.ulysses_hosts(ulysses, ring, placement)
        groups = self.ulysses_groups(ulysses, ring, placement)
        return self.hosts_spanned(groups[0]), any(self.hosts_spanned(g) > 1 for g in groups)

    # ------------------------------------------------------------------ communication
    def _pattern(self, kind: str, ulysses: int, ring: int, placement: str) -> Tuple[float, float]:
        if self._classes is not None:
            return self._classes.layout_pattern(kind, ulysses, ring, placement)
        if kind == "a2a":
            flows = ((a, b) for g in self.ulysses_groups(ulysses, ring, placement) for a in g for b in g if a != b)
        else:
            flows = ((g[i], g[(i + 1) % len(g)]) for g in self.ring_groups(ulysses, ring, placement)
                     for i in range(len(g)))
        return self.fabric.pattern((kind, ulysses, ring, placement), flows)

    def a2a_time(self, ulysses: int, ring: int, placement: str, buffer_bytes: float) -> float:
        """One all_to_all_single of a ``buffer_bytes`` buffer per rank in every Ulysses group at once."""
        if ulysses == 1:
            return 0.0
        if spec.ulysses_stride(ulysses, ring, placement) == 1:  # contiguous groups: a probe's fit may apply
            measured = self.topology.measured_a2a(ulysses, self.ulysses_hosts(ulysses, ring, placement)[0])
            if measured is not None:
                return measured.time(buffer_bytes)
        spb, path_latency = self._pattern("a2a", ulysses, ring, placement)
        coll = self.topology.collectives
        return max(coll.a2a_floor, coll.a2a_latency + path_latency + buffer_bytes / ulysses * spb)

    def p2p_fit(self, ulysses: int, ring: int, placement: str) -> Fit:
        """Isolated ring-step time as a Fit: ``max(floor, α + n / bandwidth)`` for ``n`` bytes per rank."""
        spb, path_latency = self._pattern("p2p", ulysses, ring, placement)
        coll = self.topology.collectives
        return Fit(latency=coll.p2p_latency + path_latency, bandwidth=1.0 / spb if spb > 0 else math.inf,
                   floor=coll.p2p_floor)

    # ------------------------------------------------------------------ compute
    @staticmethod
    def blocks(shape: Shape, ring: int, limit: Optional[int] = None) -> List[_Block]:
        """The block of each ring step, or of the first ``limit`` steps: the runtime's (``usp.spec.dense_block``)
        as ``usp.spec.block_fractions`` averages them, step 0 the diagonal and every later step the average visit
        (``q`` the local queries, ``k`` the keys that give the average area, ``rows`` the average fraction of the
        queries it updates; zigzag: half the area, 3/4 of the rows)."""
        local = shape.seqlen / ring
        count = ring if limit is None else min(ring, limit)

        def average(step: int) -> _Block:
            parts = spec.block_fractions(shape.causal, step)
            area = sum(w * q * k for w, q, k, _ in parts)
            rows = sum(w * q for w, q, _, _ in parts)
            return _Block(local, local * area, any(causal for _, _, _, causal in parts), rows)

        return [average(0)] + [average(1) for _ in range(count - 1)]

    # ------------------------------------------------------------------ the model
    def evaluate(self, shape: Shape, ulysses: int, ring: int, placement: str,
                 kernel: KernelProfile, head_chunks: int = 1,
                 ring_rows: Optional[float] = None) -> Tuple[PassCost, PassCost, MemoryCost]:
        """Forward cost, backward cost and peak memory of one layer (formulas in the module docstring).

        ``ring_rows``: the rows of each ring rank's ``s/R`` whose K/V (and dK/dV partial sums) travel round the
        ring ("Travelling rows" in the module docstring; packed documents: the layout's cut section, priced by
        ``planner.batch``). ``None``: all of them (a dense layer); ``0``: none, the ring runs one step."""
        if placement not in PLACEMENTS:
            raise PlannerError(f"placement={placement!r} is not valid; valid values: {', '.join(PLACEMENTS)}")
        B = shape.element_bytes
        b, s, H, d = shape.batch, shape.seqlen, shape.heads, shape.head_dim
        kv = replicated_kv_heads(shape.kv_heads, ulysses)
        heads_per_rank = H / ulysses
        travel = _travel(s, ring, ring_rows)
        rotating = ring > 1 and travel > 0  # K/V go round the ring (else one step, no P2P)

        hbm = self.topology.memory_bandwidth
        G = head_groups(H, kv, ulysses, head_chunks)
        C = head_chunks
        fwd, bwd = PassCost(), PassCost()
        # collective calls: the spec's (usp.spec.layer_collectives, what the runtime makes; a training layer
        # returns no LSE)
        window = shape.sliding_window()
        if window is not None:
            if ring_rows is not None:
                raise PlannerError("ring_rows with a sliding window is not priced (packed documents have no window "
                                   "in the planner)")
            return self._evaluate_window(shape, ulysses, ring, placement, kernel, head_chunks, window)
        calls = spec.layer_collectives(ulysses, ring, H, shape.kv_heads, head_chunks, shape.causal,
                                       documents_cut=travel > 0)
        fwd.a2a_calls, bwd.a2a_calls = calls.forward.all_to_all, calls.backward.all_to_all
        fwd.ring_transfers, bwd.ring_transfers = calls.forward.p2p, calls.backward.p2p
        q_buf, kv_buf = self._a2a_staging(shape, ulysses, ring, G, fwd, bwd)

        # --- compute per ring step. Steps 2..R-3 are alike (same block, merge and transfers), so they are
        # evaluated once and weighted: the cost of a candidate does not grow with the ring degree.
        steps = _step_weights(ring if rotating else 1)
        blocks = self.blocks(shape, ring, limit=5)  # steps >= 1 all have the block of step 1

        def block(i: int) -> _Block:
            return blocks[min(i, len(blocks) - 1)]

        per_call = heads_per_rank / (G * C)  # query heads of one kernel call
        rates = {}

        def kernel_time(i: int, backward: bool) -> float:
            blk = block(i)
            key = (blk.q, blk.k, blk.causal, backward)
            if key not in rates:
                rates[key] = kernel.rate(backward, blk.causal, blk.side, per_call)
            factor = BACKWARD_FLOPS_FACTOR if backward else 1.0
            return factor * blk.flops(shape, heads_per_rank) / rates[key]

        # Distributed overheads (module docstring): kernels slowed by concurrent NCCL kernels, and a fixed cost per
        # ring step of the layer (stream waits, launches) on the compute stream
        communicating = ulysses > 1 or rotating  # a dense layer: P > 1
        slow = 1.0 + self.topology.collectives.compute_slowdown if communicating else 1.0
        # a ring of one step (packed documents, none cut) moves nothing but is still a distributed call
        per_step = self.topology.collectives.step_overhead if ulysses * ring > 1 else 0.0
        c_fwd = {i: slow * kernel_time(i, False) for i, _ in steps}
        c_bwd = {i: slow * kernel_time(i, True) for i, _ in steps}
        fwd.compute = sum(w * c_fwd[i] for i, w in steps)
        bwd.compute = sum(w * c_bwd[i] for i, w in steps)
        fwd.flops = sum(w * block(i).flops(shape, heads_per_rank) for i, w in steps)
        bwd.flops = BACKWARD_FLOPS_FACTOR * fwd.flops
        fwd.kernel_calls = bwd.kernel_calls = G * C * (ring if rotating else 1)
        fwd.overhead = bwd.overhead = per_step * (ring if rotating else 1)
        # --- sums of the ring (GPU-memory traffic on the compute stream; usp/ring.py, usp/merge.py)
        narrow = spec.narrow_sums(ring)  # Note [narrow sums]: used below only when R > 1
        m_fwd = {i: 0.0 for i, _ in steps}
        m_bwd = {i: 0.0 for i, _ in steps}
        if rotating and hbm:
            q_h = b * (s / ring) * heads_per_rank * d
            kv2_h = 2 * b * (s / ring) * (kv / ulysses) * d  # dK + dV elements
            # visiting blocks (steps >= 1) touch the travelling rows only (travel = 1 for a dense layer)
            if narrow:
                m_fwd[1] = 3 * B * q_h * block(1).rows * travel / hbm
                m_bwd[0] = 3 * B * (q_h * block(1).rows * travel + kv2_h) / hbm  # both adds land at step 0
            else:
                g_h = q_h + kv2_h
                for i, _ in steps:
                    m_fwd[i] = 0.0 if i == 0 else (8 + B) * q_h * block(i).rows * travel / hbm
                    # add_ into dq and the travelling dKV
                    m_bwd[i] = (8 + B) * g_h * block(i).rows * (1.0 if i == 0 else travel) / hbm
                m_fwd[1] += (B + 4) * q_h / hbm       # step 0's output promoted to the fp32 accumulator
                m_fwd[ring - 1] += (4 + B) * q_h / hbm  # final cast
                # fp32 dq and dKV sums created (first walked step; the dKV sums over the travelling rows)
                m_bwd[ring - 1] += (4 + B) * (q_h + kv2_h * travel) / hbm
                m_bwd[0] += (4 + B) * g_h / hbm       # final casts of dq and (at the owner) dK, dV after step 0
            fwd.merge = sum(w * m_fwd[i] for i, w in steps)
            bwd.merge = sum(w * m_bwd[i] for i, w in steps)
            c_fwd = {i: c_fwd[i] + m_fwd[i] for i, _ in steps}
            c_bwd = {i: c_bwd[i] + m_bwd[i] for i, _ in steps}

        c_fwd = {i: c_fwd[i] + per_step for i, _ in steps}
        c_bwd = {i: c_bwd[i] + per_step for i, _ in steps}

        # --- ring with double-buffered overlap, once per head group and chunk (each on 1/(G·C) of the heads)
        GC = G * C
        # chunks beyond the K/V heads of a group share one K/V head each and all carry it round the ring
        kv_split = G * min(C, max(1, kv // (ulysses * G)))
        # one group's ring time (R == 1: compute + merge)
        t_fwd = sum(w * c_fwd[i] for i, w in steps) / G
        t_bwd = sum(w * c_bwd[i] for i, w in steps) / G
        if rotating:
            n_kv = 2 * b * (s / ring) * travel * (kv / ulysses) * d * B / kv_split
            dkv_dtype = spec.ring_transfer_dtypes(ring, chunks_share_kv=C > kv // (ulysses * G))[1]
            n_dkv = (2 * b * (s / ring) * travel * (kv / ulysses) * d * (B if dkv_dtype == "input" else FP32)
                     / kv_split)
            fit = self.p2p_fit(ulysses, ring, placement)

            def step(compute: float, nbytes: float, rotations: int) -> float:
                if rotations == 0:
                    return compute
                return rotations * fit.latency + max(compute, fit.floor - fit.latency, nbytes / fit.bandwidth)

            # the rotations in flight under each step: usp.spec (forward_step_rotations, backward_step_rotations)
            t_chunk = 0.0
            for i, w in steps:
                kv_out = spec.forward_step_rotations(i, ring)
                t_chunk += w * step(c_fwd[i] / GC, n_kv * kv_out, kv_out)
            t_fwd = C * t_chunk
            fwd.ring_exposed = G * t_fwd - fwd.compute - fwd.merge - fwd.overhead
            fwd.ring_bytes = GC * sum(spec.forward_step_rotations(j, ring) for j in range(ring)) * n_kv
            t_chunk = 0.0
            for j, w in steps:  # order does not change the sum; step j as in the docstring
                kv_out, dkv_in = spec.backward_step_rotations(j, ring)
                t_chunk += w * step(c_bwd[j] / GC, n_kv * kv_out + n_dkv * dkv_in, kv_out + dkv_in)
            kv_transfers = sum(spec.backward_step_rotations(j, ring)[0] for j in range(ring))
            dkv_transfers = sum(spec.backward_step_rotations(j, ring)[1] for j in range(ring))
            if C > 1:  # Note [head chunks]: each chunk first fetches the block the forward ended on, exposed
                t_chunk += fit.latency + max(fit.floor - fit.latency, n_kv / fit.bandwidth)
                kv_transfers += 1
            t_bwd = C * t_chunk
            bwd.ring_exposed = G * t_bwd - bwd.compute - bwd.merge - bwd.overhead
            bwd.ring_bytes = GC * (kv_transfers * n_kv + dkv_transfers * n_dkv)

        self._a2a_exposed(ulysses, ring, placement, q_buf, kv_buf, G, fwd, bwd, t_fwd, t_bwd)
        memory = self.memory(shape, ulysses, ring, head_chunks, ring_rows=ring_rows)
        return fwd, bwd, memory

    def _evaluate_window(self, shape: Shape, ulysses: int, ring: int, placement: str, kernel: KernelProfile,
                         head_chunks: int, window: "spec.SlidingWindow") -> Tuple[PassCost, PassCost, MemoryCost]:
        """A windowed layer (module docstring, "Sliding windows"): the Ulysses terms of the dense layer, and a ring
        walked over ``window``'s active steps only, each rank computing its pieces and exchanging its halos."""
        B = shape.element_bytes
        b, s, H, d = shape.batch, shape.seqlen, shape.heads, shape.head_dim
        P = ulysses * ring
        kv = replicated_kv_heads(shape.kv_heads, ulysses)
        heads_per_rank = H / ulysses
        hbm = self.topology.memory_bandwidth
        G, C = head_groups(H, kv, ulysses, head_chunks), head_chunks
        GC = G * C
        fwd, bwd = PassCost(), PassCost()
        calls = spec.layer_collectives(ulysses, ring, H, shape.kv_heads, head_chunks, shape.causal,
                                       window_size=shape.window, seqlen=s)  # the busiest ring rank's
        fwd.a2a_calls, bwd.a2a_calls = calls.forward.all_to_all, calls.backward.all_to_all
        fwd.ring_transfers, bwd.ring_transfers = calls.forward.p2p, calls.backward.p2p
        q_buf, kv_buf = self._a2a_staging(shape, ulysses, ring, G, fwd, bwd)

        local = s // ring
        slow = 1.0 + self.topology.collectives.compute_slowdown if P > 1 else 1.0
        per_step = self.topology.collectives.step_overhead if P > 1 else 0.0
        per_call = heads_per_rank / GC
        kv_split = G * min(C, max(1, kv // (ulysses * G)))
        kv_row = 2 * b * (kv / ulysses) * d * B / kv_split       # K and V bytes of one halo row, one pass
        dkv_row = 2 * b * (kv / ulysses) * d * FP32 / kv_split   # fp32 dK/dV partial sums of one row
        q_row, kv2_row = b * heads_per_rank * d / GC, 2 * b * (kv / ulysses) * d / GC  # elements of one row
        fit = self.p2p_fit(ulysses, ring, placement) if ring > 1 else None
        steps = (0,) + window.active_steps(ring, local)
        kept = window.keep_halos(ring, local) and C == 1
        shared_kv = C > kv / (ulysses * G)  # head chunks sharing a K/V head sum its dK/dV in float32 (wide)
        piece_cache = {}

        def piece(q_len: int, k_len: int, left: int, right: int) -> Tuple[float, float, float]:
            """(flops of all heads, forward and backward seconds of one pass's call) of one piece."""
            key = (q_len, k_len, left, right)
            if key not in piece_cache:
                area = spec.band_area(q_len, k_len, left, right)
                masked = (left, right) != (-1, -1)
                side = math.sqrt(2 * area) if masked else math.sqrt(q_len * k_len)
                flops = 4.0 * b * heads_per_rank * d * area
                piece_cache[key] = (flops, slow * flops / GC / kernel.rate(False, masked, side, per_call),
                                    slow * BACKWARD_FLOPS_FACTOR * flops / GC / kernel.rate(True, masked, side,
                                                                                             per_call))
            return piece_cache[key]

        def rows(sl: Optional[slice]) -> int:
            return 0 if sl is None else sl.stop - sl.start

        def transfer(compute: float, nbytes: float, rotations: int) -> float:
            if rotations == 0:
                return compute
            return rotations * fit.latency + max(compute, fit.floor - fit.latency, nbytes / fit.bandwidth)

        def sums_bytes(r: int):
            """Note [sparse sums] on ring rank ``r``: bytes per step of the merges/adds ``(forward, backward)`` and
            of the own pieces' writes, the final casts and the returned partials ``(forward, backward)``."""
            narrow_q, narrow_kv = window.narrow_sums(r, ring, local)
            narrow_kv = narrow_kv and not shared_kv
            a_q, a_kv = (B if narrow_q else FP32), (B if narrow_kv else FP32)
            merge_q = 3 * B if narrow_q else 8 + B  # one merged/added element: read both, write one
            merge_kv = 3 * B if narrow_kv else 8 + B
            own = window.own_pieces(r, ring, local)[0]
            steps_bytes = {}
            for j in steps:
                fwd_bytes = bwd_bytes = 0.0
                for index, (q_span, k_span, _, _) in enumerate(window.pieces(j, r, ring, local)):
                    if j == 0 and index in own:
                        continue  # an own piece: written, below
                    n_q, n_k = rows(q_span), rows(k_span)
                    fwd_bytes += merge_q * n_q * q_row
                    bwd_bytes += merge_q * n_q * q_row + (merge_kv if j == 0 else 12 + B) * n_k * kv2_row
                steps_bytes[j] = (fwd_bytes, bwd_bytes)

            def written(a: int, single: bool) -> float:  # per element: the own pieces' results into the sums
                return (0.0 if a == B else B + a) if single else B + a

            cast_q, cast_kv = (0.0 if narrow_q else 4 + B), (0.0 if narrow_kv else 4 + B)
            single = len(own) == 1
            single_b = single and C == 1  # head chunks write their dQ into the gradient's slice: copied
            start_f = (written(a_q, single) + cast_q) * local * q_row
            start_b = ((written(a_q, single_b) + cast_q) * local * q_row
                       + (written(a_kv, single_b) + cast_kv) * local * kv2_row)
            for j in steps[1:]:
                mine = window.halo(j, (r + j) % ring, ring, local)
                start_b += (4 + 2 * a_kv) * rows(mine) * kv2_row
            return steps_bytes, start_f, start_b

        def rank_cost(r: int):
            """One pass of ring rank ``r`` (one head group and chunk): forward and backward ring time, and the
            per-pass totals of compute, merge, overhead, flops, kernel calls and bytes sent."""
            work = {}
            steps_bytes, start_f, start_b = sums_bytes(r)
            start_f, start_b = (start_f / hbm, start_b / hbm) if hbm else (0.0, 0.0)
            for j in steps:
                pieces = window.pieces(j, r, ring, local)
                parts = [piece(p[0].stop - p[0].start, p[1].stop - p[1].start, p[2], p[3]) for p in pieces]
                merge_f, merge_b = (x / hbm for x in steps_bytes[j]) if hbm else (0.0, 0.0)
                work[j] = (sum(p[1] for p in parts), sum(p[2] for p in parts), merge_f, merge_b,
                           sum(p[0] for p in parts), len(parts))
            links = []  # (rows received, rows sent) of each step's halo, for the next step's exchange
            for j in steps:
                if j == 0:
                    links.append((0, 0))
                else:
                    links.append((rows(window.halo(j, r, ring, local)),
                                  rows(window.halo(j, (r + j) % ring, ring, local))))
            t_f = t_b = 0.0
            sent_f = sent_b = 0.0
            for i, j in enumerate(steps):
                c_f = work[j][0] + work[j][2] + per_step + (start_f if i == 0 else 0.0)
                c_b = work[j][1] + work[j][3] + per_step + (start_b if i == 0 else 0.0)
                nxt = links[i + 1] if i + 1 < len(steps) else (0, 0)
                kv_on = 1 if any(nxt) else 0
                t_f += transfer(c_f, kv_row * max(nxt), kv_on)
                sent_f += kv_row * nxt[1]
                # backward: the next halo fetched again (unless kept) and the previous step's dK/dV going home
                fetch = 0 if kept else kv_on
                back = links[i - 1] if i >= 2 else (0, 0)
                dkv_on = 1 if any(back) else 0
                t_b += transfer(c_b, kv_row * max(nxt) * fetch + dkv_row * max(back), fetch + dkv_on)
                sent_b += kv_row * nxt[1] * fetch + dkv_row * back[0]
            last = links[-1]
            if any(last):  # the last step's dK/dV return trails the last block
                t_b += fit.latency + max(fit.floor - fit.latency, dkv_row * max(last) / fit.bandwidth)
                sent_b += dkv_row * last[0]
            totals = [sum(w[k] for w in work.values()) for k in range(6)]
            merge_f = sum(w[2] for w in work.values()) + start_f
            merge_b = sum(w[3] for w in work.values()) + start_b
            return t_f, t_b, totals[0], totals[1], merge_f, merge_b, totals[4], totals[5], sent_f, sent_b

        costs = [rank_cost(r) for r in range(ring)]
        slowest_f = max(costs, key=lambda c: c[0])  # the pass waits for its slowest ring rank
        slowest_b = max(costs, key=lambda c: c[1])
        t_fwd, t_bwd = C * slowest_f[0], C * slowest_b[1]  # one head group's ring time
        fwd.compute, bwd.compute = GC * slowest_f[2], GC * slowest_b[3]
        fwd.merge, bwd.merge = GC * slowest_f[4], GC * slowest_b[5]
        fwd.overhead = bwd.overhead = per_step * len(steps)
        fwd.flops, bwd.flops = slowest_f[6], BACKWARD_FLOPS_FACTOR * slowest_b[6]
        fwd.kernel_calls, bwd.kernel_calls = GC * slowest_f[7], GC * slowest_b[7]
        fwd.ring_bytes, bwd.ring_bytes = GC * slowest_f[8], GC * slowest_b[9]
        fwd.ring_exposed = max(0.0, G * t_fwd - fwd.compute - fwd.merge - fwd.overhead)
        bwd.ring_exposed = max(0.0, G * t_bwd - bwd.compute - bwd.merge - bwd.overhead)
        self._a2a_exposed(ulysses, ring, placement, q_buf, kv_buf, G, fwd, bwd, t_fwd, t_bwd)
        narrow = [window.narrow_sums(r, ring, local) for r in range(ring)]  # the peak: the widest rank's sums
        return fwd, bwd, self.memory(shape, ulysses, ring, head_chunks,
                                     narrow=(all(n[0] for n in narrow), all(n[1] for n in narrow)))

    def _a2a_staging(self, shape: Shape, ulysses: int, ring: int, G: int, fwd: PassCost,
                     bwd: PassCost) -> Tuple[float, float]:
        """Ulysses all-to-all staging and counts: 4 calls per pass and head group, each on 1/G of the buffer.
        Returns the Q and K/V buffer bytes of one call (0 without Ulysses)."""
        B, b, s, H, d = shape.element_bytes, shape.batch, shape.seqlen, shape.heads, shape.head_dim
        P = ulysses * ring
        q_buf = kv_buf = 0.0
        if ulysses > 1:
            kv = replicated_kv_heads(shape.kv_heads, ulysses)
            q_buf = b * (s / P) * H * d * B / G
            kv_buf = b * (s / P) * kv * d * B / G
            hbm = self.topology.memory_bandwidth
            for pc in (fwd, bwd):
                for buf in (q_buf, kv_buf, kv_buf, q_buf):
                    if hbm:
                        pc.all_to_all += G * 4 * buf / hbm  # staging copies before and after (compute stream)
                    pc.a2a_bytes += G * (ulysses - 1) / ulysses * buf
        return q_buf, kv_buf

    def _a2a_exposed(self, ulysses: int, ring: int, placement: str, q_buf: float, kv_buf: float, G: int,
                     fwd: PassCost, bwd: PassCost, t_fwd: float, t_bwd: float) -> None:
        """Exposed Ulysses all-to-all time of the head-group pipeline (``t_*``: one group's ring time)."""
        if ulysses > 1:
            a_q = self.a2a_time(ulysses, ring, placement, q_buf)
            a_kv = self.a2a_time(ulysses, ring, placement, kv_buf)
            for pc, t_group, first, last in ((fwd, t_fwd, a_q + 2 * a_kv, a_q), (bwd, t_bwd, a_q, a_q + 2 * a_kv)):
                pc.all_to_all += first + last + (G - 1) * (max(0.0, first - t_group) + max(0.0, last - t_group))

    @staticmethod
    def memory(shape: Shape, ulysses: int, ring: int, head_chunks: int = 1,
               narrow: Optional[Tuple[bool, bool]] = None, ring_rows: Optional[float] = None) -> MemoryCost:
        """Peak memory of one layer (module docstring). ``narrow``: a windowed layer's (Note [sparse sums]) whether
        its out/dQ and its dK/dV sums stay in the input dtype (default: the dense ring's ``spec.narrow_sums``); its
        halo buffers and kept halos are at most the dense ring's blocks.
        ``ring_rows`` as for :meth:`evaluate` (the ring's K/V and dK/dV buffers hold the travelling rows)."""
        B = shape.element_bytes
        b, s, H, d = shape.batch, shape.seqlen, shape.heads, shape.head_dim
        kv = replicated_kv_heads(shape.kv_heads, ulysses)
        q_h = b * (s / ring) * (H / ulysses) * d
        kv_h = b * (s / ring) * (kv / ulysses) * d
        lse = b * (H / ulysses) * (s / ring)
        travel = _travel(s, ring, ring_rows)
        kv_t = kv_h * travel  # the travelling K/V (all of kv_h for a dense layer)
        if travel == 0:
            ring = 1  # nothing travels: one step, the R == 1 layer on these s/R rows
        saved = B * (2 * q_h + 2 * kv_h) + FP32 * lse
        C = head_chunks
        narrow_q, narrow_kv = (spec.narrow_sums(ring),) * 2 if narrow is None else narrow  # used only when R > 1
        Ckv = min(C, max(1, kv // ulysses))  # chunks beyond the K/V heads share one K/V head each
        if ring > 1 and C == 1:
            saved += 2 * kv_t * B  # the forward's last K/V block, one per head group (each 1/G of the heads)
        replicate = 2 * kv_h * B if kv != shape.kv_heads else 0.0
        ring_kv = min(ring - 1, 2) * 2 * kv_t * B / Ckv
        # per kernel call (1/C of the heads with head chunks): block grads and the kernel's fp32 dq workspace
        kernel_bwd = (q_h * B + FP32 * q_h) / C + 2 * kv_h * B / Ckv
        staging = q_h * B if ulysses > 1 else 0.0  # the all-to-all's packed copy (none without Ulysses)
        fwd = replicate + staging + q_h * B
        bwd = q_h * B + staging + (q_h + 2 * kv_h) * B + kernel_bwd
        if ring > 1:
            accumulator = 0.0 if narrow_q else FP32 * q_h  # Note [narrow sums]: R == 2 merges into the output
            fwd += ring_kv + (accumulator + q_h * B) / C + 2 * FP32 * lse / C
            dq_sum = 0.0 if narrow_q and C > 1 else (q_h * B if narrow_q else FP32 * q_h / C)  # chunks: into dq
            dkv_bytes = B if narrow_kv and C <= Ckv else FP32
            bwd += dq_sum + 2 * 2 * kv_t * dkv_bytes / Ckv + ring_kv
        return MemoryCost(saved=saved, forward_transient=fwd, backward_transient=bwd)
