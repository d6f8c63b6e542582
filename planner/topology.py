"""The machine the planner plans for: GPUs, links, hosts, collective overheads and attention-kernel rates.

A :class:`Topology` is the one validated object that owns this description. It comes from a YAML file (a shipped
preset, or what ``usp-plan probe`` measured), from a dict, or from code; it builds a ``networkx.DiGraph`` of the
machine on demand (:meth:`Topology.fabric`) and the cost model asks that graph how long a communication pattern
takes.

YAML schema (``format: usp-topology/1``). Bandwidths are GB/s (10^9 bytes/s) *per direction*, latencies are µs,
kernel rates TFLOP/s. Two forms describe the links:

*Compact form* (homogeneous hosts; every preset uses it)::

    name: dgx-h100-cluster
    hosts: auto                 # an int, or "auto": as many hosts as the world size needs
    gpus_per_host: 8
    gpu: {model: H100 SXM5 80GB, memory_gib: 80, memory_bandwidth_GBps: 3000}   # memory_gib: the default memory
                                # cap; memory_bandwidth_GBps (optional): copies and fp32 merges (planner.cost)
    host_fabric:                # links inside one host
      kind: nvswitch            # nvswitch | switch | nvlink | pcie
      bandwidth_GBps: 370       # each GPU's link to the switch (nvswitch/switch/pcie) or each GPU pair (nvlink)
      latency_us: 2             # GPU-to-GPU latency through the fabric
      # pcie only: gpus_per_switch, switches_per_socket, uplink_GBps (switch -> CPU root complex),
      #            inter_socket_GBps (CPU <-> CPU, e.g. UPI), uplink_latency_us, inter_socket_latency_us
    network:                    # links between hosts (needed when there is more than one host)
      kind: infiniband          # infiniband | roce | ethernet
      nics_per_host: 8          # GPU i uses NIC (i * nics_per_host // gpus_per_host): rail-aligned
      nic_bandwidth_GBps: 48
      latency_us: 5             # GPU-to-GPU latency across the network, on top of the software latency
    collectives:                # software cost of one operation (launch, handshake), independent of size
      p2p: {latency_us: 47, floor_us: 168}         # one ring step (batched isend/irecv)
      all_to_all: {latency_us: 25, floor_us: 60}   # one all_to_all_single
      step_overhead_us: 176     # optional: per ring step of a distributed run (planner.cost); default 176
      compute_slowdown: 0.047   # optional: kernels slowed by concurrent NCCL kernels; default 0.047
    kernels:                    # attention kernel rates vs block size (tokens per side of the attention block)
      - name: fa4
        dtype: bfloat16
        head_dim: 128
        points:
          - {block: 16384, forward: 725, forward_backward: 685, causal_forward: 714, causal_forward_backward: 682}
    measured:                   # what the probe measured; optional. Fits are computed from samples when absent.
      p2p: [{scope: intra_host, samples: [[bytes, seconds], ...]}]        # ring step, bytes per rank
      all_to_all: [{group_size: 2, hosts_per_group: 1, samples: [...]}]   # bytes = the whole buffer per rank
      # the cost model uses an all_to_all fit (instead of the graph) for contiguous Ulysses groups of that size
      # spanning that many hosts; the p2p fits are kept for reference (the probe already wrote them into
      # host_fabric/network/collectives). Any other key (date, backend, detected, warnings) is kept as is.

*Graph form* (anything else): replace ``hosts/gpus_per_host/host_fabric/network`` by ::

    graph:
      nodes: [{id: g0, kind: gpu, host: 0}, {id: sw, kind: switch}, ...]   # GPUs in rank order
      links: [{src: g0, dst: sw, type: nvlink, bandwidth_GBps: 300, latency_us: 1}, ...]
      # each link is added in both directions unless `bidirectional: false`

Model of a transfer (used by ``planner.cost``): every flow takes the lowest-hop path between its GPUs (never
through another GPU); all flows of a pattern run at once; a pattern of flows of ``n`` bytes each takes
``max(floor, latency + n * max_e(flows_e / bandwidth_e))`` — the bottleneck link, shared equally by the flows that
cross it (this is how PCIe switches, a CPU-to-CPU link or a NIC shared by several GPUs slow an all-to-all down),
plus the software latency of the collective and the largest path latency. ``floor`` is the smallest time one
operation was ever measured to take (benchmarks/RESULTS.md, reference measurements: ~0.17 ms per batched P2P step on 2x H100 even at 1 MiB).

A kernel rate for a block is interpolated linearly in ``log2(block)`` between the listed points, clamped outside
them, never below a smaller block's rate, and for causal blocks beyond the last point the causal shortfall
shrinks as ``1/block`` (see :meth:`KernelProfile.rate`). ``forward_backward`` is the FLOP convention of benchmarks/RESULTS.md (fwd+bwd
FLOPs counted as 3.5x the forward); the backward rate follows from ``3.5 / r_fb = 1 / r_f + 2.5 / r_b``.
"lowest-hop path": fewest hops, through switches, CPUs and NICs only; every GPU i reaches another host through its
own rail NIC (NCCL's PXN, which reroutes through NVLink first, is not modelled).
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import yaml

from usp import spec

from .units import PlannerError, canonical_dtype

__all__ = [
    "TopologyError",
    "KernelPoint",
    "VarlenPoint",
    "KernelProfile",
    "Fit",
    "Topology",
    "Fabric",
    "HostClassFabric",
    "PRESETS_DIR",
    "DEFAULT_PRESET",
    "list_presets",
    "load_topology",
    "fit_latency_bandwidth",
]

FORMAT = "usp-topology/1"
PRESETS_DIR = Path(__file__).resolve().parent / "presets"
#: The preset a dry run uses when no topology is given: DGX-H100-like nodes, as many as the world size needs.
DEFAULT_PRESET = "dgx-h100-cluster"

GB = 1e9
US = 1e-6
TFLOPS = 1e12

#: Distributed overheads (``planner.cost``): defaults fitted to the recorded 2-GPU runs of ``benchmarks/data``
#: (``tests/planner/test_planner_accuracy.py``); a topology YAML may set its own (``collectives.step_overhead_us``,
#: ``collectives.compute_slowdown``).
STEP_OVERHEAD_US = 176.0
COMPUTE_SLOWDOWN = 0.047

HOST_FABRIC_KINDS = ("nvswitch", "switch", "nvlink", "pcie")
NETWORK_KINDS = ("infiniband", "roce", "ethernet")
P2P_SCOPES = ("intra_host", "inter_host")


class TopologyError(PlannerError):
    """A topology file or dict is malformed or incomplete; the message names the offending key."""


# ----------------------------------------------------------------------------------------------- validation
class _Reader:
    """Reads one mapping of a topology document and raises TopologyError naming ``source`` and the key path."""

    def __init__(self, data: Any, path: str, source: str):
        self.path = path
        self.source = source
        if not isinstance(data, dict):
            self.fail(path or "<document>", f"expected a mapping, got {_describe(data)}")
        self.data = data
        self.seen: set = set()

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def fail(self, key: str, problem: str) -> None:
        raise TopologyError(f"{self.source}: key '{key}': {problem}")

    def has(self, name: str) -> bool:
        return name in self.data

    def raw(self, name: str, default: Any = ..., ) -> Any:
        self.seen.add(name)
        if name not in self.data or self.data[name] is None:
            if default is ...:
                self.fail(self.key(name), "is required but missing")
            return default
        return self.data[name]

    def number(self, name: str, default: Any = ..., minimum: float = 0.0, strict: bool = True) -> Optional[float]:
        value = self.raw(name, default)
        if value is None or (default is not ... and value is default):
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            self.fail(self.key(name), f"expected a number, got {_describe(value)}")
        if (strict and value <= minimum) or (not strict and value < minimum):
            bound = f"> {minimum:g}" if strict else f">= {minimum:g}"
            self.fail(self.key(name), f"expected a number {bound}, got {value!r}")
        return float(value)

    def integer(self, name: str, default: Any = ..., minimum: int = 1) -> Optional[int]:
        value = self.raw(name, default)
        if value is None or (default is not ... and value is default):
            return value
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(self.key(name), f"expected an integer, got {_describe(value)}")
        if value < minimum:
            self.fail(self.key(name), f"expected an integer >= {minimum}, got {value!r}")
        return value

    def string(self, name: str, default: Any = ..., choices: Optional[Sequence[str]] = None) -> Optional[str]:
        value = self.raw(name, default)
        if value is None or (default is not ... and value is default):
            return value
        if not isinstance(value, str):
            self.fail(self.key(name), f"expected a string, got {_describe(value)}")
        if choices is not None and value not in choices:
            self.fail(self.key(name), f"{value!r} is not one of {', '.join(map(repr, choices))}")
        return value

    def listing(self, name: str, default: Any = ...) -> list:
        value = self.raw(name, default)
        if value is None or (default is not ... and value is default):
            return value
        if not isinstance(value, list):
            self.fail(self.key(name), f"expected a list, got {_describe(value)}")
        return value

    def section(self, name: str, default: Any = ...) -> Optional["_Reader"]:
        value = self.raw(name, default)
        if value is None or (default is not ... and value is default):
            return None
        return _Reader(value, self.key(name), self.source)

    def done(self, extra_allowed: Sequence[str] = ()) -> None:
        unknown = [k for k in self.data if k not in self.seen and k not in extra_allowed]
        if unknown:
            valid = ", ".join(sorted(self.seen | set(extra_allowed)))
            self.fail(self.key(str(unknown[0])), f"unknown key; valid keys here: {valid}")


def _describe(value: Any) -> str:
    if value is None:
        return "nothing"
    return f"{type(value).__name__} {value!r}"


# ----------------------------------------------------------------------------------------------- kernels
@dataclass(frozen=True)
class KernelPoint:
    """Attention kernel throughput on a square ``block x block`` problem, TFLOP/s (4·b·h·s²·d, halved causal)."""

    block: int
    forward: float
    backward: float
    causal_forward: float
    causal_backward: float

    def to_dict(self) -> dict:
        return {"block": self.block, "forward": _r(self.forward), "backward": _r(self.backward),
                "causal_forward": _r(self.causal_forward), "causal_backward": _r(self.causal_backward)}


@dataclass(frozen=True)
class VarlenPoint:
    """One varlen kernel call over ``sequences`` packed sequences of ``length`` tokens each (every query attends the
    keys of its own sequence), TFLOP/s over the call (4·h·d·sequences·length², halved causal): the kernel's rate on
    short documents, which ``planner.batch`` prices packed documents with (``usp-plan probe`` measures it for
    kernels with a varlen form)."""

    length: int
    sequences: int
    forward: float
    backward: float
    causal_forward: float
    causal_backward: float

    def to_dict(self) -> dict:
        return {"length": self.length, "sequences": self.sequences, "forward": _r(self.forward),
                "backward": _r(self.backward), "causal_forward": _r(self.causal_forward),
                "causal_backward": _r(self.causal_backward)}


def _backward_from_total(forward: float, total: float, key: str, reader: _Reader) -> float:
    # benchmarks/RESULTS.md FLOP convention: fwd+bwd FLOPs = 3.5 x forward, i.e. backward = 2.5 x forward.
    # 3.5 F / r_total = F / r_fwd + 2.5 F / r_bwd  =>  r_bwd = 2.5 / (3.5 / r_total - 1 / r_fwd)
    denominator = 3.5 / total - 1.0 / forward
    if denominator <= 0:
        reader.fail(key, f"forward_backward rate {total:g} is inconsistent with forward {forward:g} "
                         "(the backward would be infinitely fast)")
    return 2.5 / denominator


def heads_neighbours(family: Sequence["KernelProfile"],
                     heads: float) -> Tuple["KernelProfile", "KernelProfile", float]:
    """``(lo, hi, t)``: a quantity measured on each profile of ``family`` (ascending by ``heads``, every one
    recorded), taken at ``heads`` query heads per call, is ``value(lo) + t * (value(hi) - value(lo))``: linear in
    log2(heads) between the two nearest measured counts, clamped outside them (``hi is lo``, ``t = 0``)."""
    if heads <= family[0].heads:
        return family[0], family[0], 0.0
    if heads >= family[-1].heads:
        return family[-1], family[-1], 0.0
    for lo, hi in zip(family, family[1:]):
        if lo.heads <= heads <= hi.heads:
            return lo, hi, (math.log2(heads) - math.log2(lo.heads)) / (math.log2(hi.heads) - math.log2(lo.heads))
    raise AssertionError("unreachable: heads lies between the first and last measured counts")


@dataclass(frozen=True)
class KernelProfile:
    """Measured or published rates of one attention kernel for one (dtype, head_dim)."""

    name: str
    dtype: str
    head_dim: int
    points: Tuple[KernelPoint, ...]
    source: str = ""
    #: query heads per call the points were measured with (None: not recorded, used for any head count)
    heads: Optional[int] = None
    #: the same kernel measured at other head counts (``Topology.kernel`` gathers them; see ``rate``)
    variants: Tuple["KernelProfile", ...] = ()
    #: varlen calls over many short sequences, ascending by length (optional; ``VarlenPoint``)
    varlen: Tuple[VarlenPoint, ...] = ()

    def rate(self, backward: bool, causal: bool, block: float, heads: Optional[float] = None) -> float:
        """FLOP/s for one kernel call on a ``block``-token square block with ``heads`` query heads.

        Interpolated linearly in log2(block) between the points: usp runs every ring block as one call, so a dip
        measured inside the range (cuDNN at 128K and 256K in the 2x H100 probe) is a real slowdown and is kept.
        Beyond the largest point the rate is the best of the listed points: a dip measured at the last point only
        (FA4 at 32K in benchmarks/RESULTS.md) says nothing of larger blocks and is not extrapolated to all of them. Beyond the
        largest point a causal block's shortfall against a
        non-causal one shrinks as ``1/block``: it comes from the masked diagonal tiles, whose share of the work is
        ``tile / block`` (benchmarks/RESULTS.md, cuDNN: the causal gap is 134, 23, 17 TFLOP/s at 4K, 16K, 32K).

        Kernel efficiency also depends on the work per call: a small block with few heads leaves the GPU's
        multiprocessors idle (too few tiles for a full wave). When the profile was measured at several head counts
        (``usp-plan probe --heads 8,32``), the rate at ``heads`` is interpolated linearly in log2(heads) between
        the two nearest measured counts (clamped outside them).
        """
        family = sorted((p for p in (self,) + self.variants if p.heads is not None), key=lambda p: p.heads)
        if heads is not None and len(family) > 1:
            lo, hi, t = heads_neighbours(family, heads)
            a = lo._rate_at(backward, causal, block)
            return a if hi is lo else a + t * (hi._rate_at(backward, causal, block) - a)
        return self._rate_at(backward, causal, block)

    def _rate_at(self, backward: bool, causal: bool, block: float) -> float:
        last = self.points[-1]
        if causal and block > last.block:
            full = self._rate_at(backward, False, block)
            gap = ((last.backward if backward else last.forward) -
                   (last.causal_backward if backward else last.causal_forward)) * TFLOPS
            return full - max(gap, 0.0) * last.block / block

        def value(p: KernelPoint) -> float:
            if backward:
                return p.causal_backward if causal else p.backward
            return p.causal_forward if causal else p.forward

        pts = self.points
        floor = max(value(p) for p in pts) if block > pts[-1].block else 0.0
        if block <= pts[0].block:
            interpolated = value(pts[0])
        elif block >= pts[-1].block:
            interpolated = value(pts[-1])
        else:
            x = math.log2(block)
            for lo, hi in zip(pts, pts[1:]):
                if lo.block <= block <= hi.block:
                    t = (x - math.log2(lo.block)) / (math.log2(hi.block) - math.log2(lo.block))
                    interpolated = value(lo) + t * (value(hi) - value(lo))
                    break
        return max(interpolated, floor) * TFLOPS

    def mean_rate(self) -> float:
        """Average fwd+bwd rate over the points: how "auto" ranks kernels."""
        totals = [3.5 / (1 / p.forward + 2.5 / p.backward) + 3.5 / (1 / p.causal_forward + 2.5 / p.causal_backward)
                  for p in self.points]
        return sum(totals) / (2 * len(totals))

    @classmethod
    def from_dict(cls, data: Any, path: str, source: str) -> "KernelProfile":
        reader = _Reader(data, path, source)
        name = reader.string("name")
        try:
            dtype = canonical_dtype(reader.raw("dtype", "bfloat16"))
        except PlannerError:
            reader.fail(reader.key("dtype"), f"{data.get('dtype')!r} is not a dtype (bfloat16, float16, float32)")
        head_dim = reader.integer("head_dim", 128)
        raw_points = reader.listing("points")
        if not raw_points:
            reader.fail(reader.key("points"), "needs at least one {block, forward, backward} entry")
        points = []
        for i, item in enumerate(raw_points):
            p = _Reader(item, f"{reader.key('points')}[{i}]", source)
            block = p.integer("block")
            forward = p.number("forward")
            if p.has("backward"):
                backward = p.number("backward")
            else:
                total = p.number("forward_backward")
                backward = _backward_from_total(forward, total, p.key("forward_backward"), p)
            causal_forward = p.number("causal_forward", forward)
            if p.has("causal_backward"):
                causal_backward = p.number("causal_backward")
            elif p.has("causal_forward_backward"):
                total = p.number("causal_forward_backward")
                causal_backward = _backward_from_total(causal_forward, total, p.key("causal_forward_backward"), p)
            else:
                causal_backward = backward
            p.done(extra_allowed=("note",))
            points.append(KernelPoint(block, forward, backward, causal_forward, causal_backward))
        points.sort(key=lambda q: q.block)
        if len({q.block for q in points}) != len(points):
            reader.fail(reader.key("points"), "two points have the same block size")
        varlen = []
        for i, item in enumerate(reader.listing("varlen", [])):
            p = _Reader(item, f"{reader.key('varlen')}[{i}]", source)
            length, sequences = p.integer("length"), p.integer("sequences")
            rates = [p.number(key) for key in ("forward", "backward", "causal_forward", "causal_backward")]
            p.done()
            varlen.append(VarlenPoint(length, sequences, *rates))
        varlen.sort(key=lambda q: q.length)
        if len({q.length for q in varlen}) != len(varlen):
            reader.fail(reader.key("varlen"), "two points have the same length")
        src = reader.string("source", "")
        heads = reader.integer("heads") if reader.has("heads") else None
        reader.done()
        return cls(name=name, dtype=dtype, head_dim=head_dim, points=tuple(points), source=src, heads=heads,
                   varlen=tuple(varlen))

    def to_dict(self) -> dict:
        out = {"name": self.name, "dtype": self.dtype, "head_dim": self.head_dim,
               "points": [p.to_dict() for p in self.points]}
        if self.varlen:
            out["varlen"] = [p.to_dict() for p in self.varlen]
        if self.heads is not None:
            out["heads"] = self.heads
        if self.source:
            out["source"] = self.source
        return out


# ----------------------------------------------------------------------------------------------- fits
@dataclass(frozen=True)
class Fit:
    """``time(n) = max(floor, latency + n / bandwidth)`` for ``n`` bytes (SI units inside: s, bytes/s)."""

    latency: float
    bandwidth: float
    floor: float = 0.0

    def time(self, nbytes: float) -> float:
        return max(self.floor, self.latency + nbytes / self.bandwidth)

    def to_dict(self) -> dict:
        return {"latency_us": _r(self.latency / US), "bandwidth_GBps": _r(self.bandwidth / GB),
                "floor_us": _r(self.floor / US)}


def fit_latency_bandwidth(samples: Iterable[Tuple[float, float]]) -> Fit:
    """Fit ``t = max(floor, latency + n / bandwidth)`` to ``(bytes, seconds)`` samples.

    ``floor`` is the fastest sample (the size-independent minimum of one operation). The line is a least-squares
    fit over the samples slower than 1.25x that floor (the bandwidth-bound ones); with fewer than two of those it
    goes through the largest sample and the origin. A non-positive slope (timing noise on CPU) gives an effectively
    infinite bandwidth (1e15 B/s) rather than a crash, so the structure of a CPU/gloo probe is still right.
    """
    pts = sorted((float(n), float(t)) for n, t in samples)
    if not pts:
        raise PlannerError("cannot fit latency and bandwidth without samples")
    floor = min(t for _, t in pts)
    bound = [(n, t) for n, t in pts if t > 1.25 * floor]
    if len(bound) >= 2:
        mean_n = sum(n for n, _ in bound) / len(bound)
        mean_t = sum(t for _, t in bound) / len(bound)
        var = sum((n - mean_n) ** 2 for n, _ in bound)
        slope = sum((n - mean_n) * (t - mean_t) for n, t in bound) / var if var > 0 else 0.0
        latency = mean_t - slope * mean_n
        if latency < 0:  # keep the line physical: refit through the origin
            slope = sum(n * t for n, t in bound) / sum(n * n for n, _ in bound)
            latency = 0.0
    else:
        n, t = pts[-1]
        slope = t / n if n > 0 else 0.0
        latency = 0.0
    bandwidth = 1.0 / slope if slope > 0 else 1e15
    return Fit(latency=latency, bandwidth=bandwidth, floor=floor)


def _fit_from(reader: _Reader) -> Tuple[Fit, list]:
    samples = reader.listing("samples", [])
    clean = []
    for i, sample in enumerate(samples):
        if (not isinstance(sample, (list, tuple)) or len(sample) != 2
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in sample)
                or sample[0] < 0 or sample[1] <= 0):
            reader.fail(f"{reader.key('samples')}[{i}]", f"expected [bytes, seconds], got {sample!r}")
        clean.append((float(sample[0]), float(sample[1])))
    if reader.has("bandwidth_GBps"):
        fit = Fit(latency=reader.number("latency_us", 0.0, strict=False) * US,
                  bandwidth=reader.number("bandwidth_GBps") * GB,
                  floor=reader.number("floor_us", 0.0, strict=False) * US)
    elif clean:
        reader.seen.update({"latency_us", "floor_us"})
        fit = fit_latency_bandwidth(clean)
    else:
        reader.fail(reader.key("bandwidth_GBps"), "is required (or give samples: [[bytes, seconds], ...])")
    return fit, clean


@dataclass(frozen=True)
class MeasuredCollective:
    """A probe measurement: P2P ring steps (``scope``) or all-to-all of contiguous groups (``group_size``)."""

    fit: Fit
    samples: Tuple[Tuple[float, float], ...] = ()
    scope: Optional[str] = None
    group_size: Optional[int] = None
    hosts_per_group: Optional[int] = None

    def to_dict(self) -> dict:
        out: Dict[str, Any] = {}
        if self.scope is not None:
            out["scope"] = self.scope
        if self.group_size is not None:
            out["group_size"] = self.group_size
        if self.hosts_per_group is not None:
            out["hosts_per_group"] = self.hosts_per_group
        out.update(self.fit.to_dict())
        if self.samples:
            out["samples"] = [[int(n), _r(t, 6)] for n, t in self.samples]
        return out


# ----------------------------------------------------------------------------------------------- topology
@dataclass(frozen=True)
class Collectives:
    """Size-independent software cost of one P2P ring step and one all-to-all (seconds), and what running
    distributed costs the compute stream (``planner.cost``, "Distributed overheads")."""

    p2p_latency: float = 20 * US
    p2p_floor: float = 0.0
    a2a_latency: float = 20 * US
    a2a_floor: float = 0.0
    #: per ring step of a sequence-parallel run: waits on the communication streams, launches between steps
    step_overhead: float = STEP_OVERHEAD_US * US
    #: relative slowdown of the attention kernels while NCCL kernels share the GPU (sequence-parallel runs)
    compute_slowdown: float = COMPUTE_SLOWDOWN

    def to_dict(self) -> dict:
        out = {"p2p": {"latency_us": _r(self.p2p_latency / US), "floor_us": _r(self.p2p_floor / US)},
               "all_to_all": {"latency_us": _r(self.a2a_latency / US), "floor_us": _r(self.a2a_floor / US)}}
        if self.step_overhead != STEP_OVERHEAD_US * US:
            out["step_overhead_us"] = _r(self.step_overhead / US)
        if self.compute_slowdown != COMPUTE_SLOWDOWN:
            out["compute_slowdown"] = _r(self.compute_slowdown)
        return out


@dataclass
class Topology:
    """A machine description (see the module docstring for the YAML schema and the transfer model).

    Build with :meth:`from_dict`, :func:`load_topology`, :meth:`preset` or :meth:`load`; never mutate one that a
    plan used (use :meth:`with_gpus_per_host` / :meth:`with_hosts` to derive another).
    """

    name: str
    gpu_model: str
    gpu_memory: float                      # bytes
    collectives: Collectives
    kernels: Tuple[KernelProfile, ...]
    hosts: Union[int, str, None] = None    # int or "auto" (compact form); None in graph form
    gpus_per_host: Optional[int] = None
    host_fabric: Optional[dict] = None     # validated compact sections, in YAML units
    network: Optional[dict] = None
    graph_spec: Optional[dict] = None      # validated graph form, in YAML units
    description: str = ""
    sources: Tuple[str, ...] = ()
    measured_p2p: Tuple[MeasuredCollective, ...] = ()
    measured_all_to_all: Tuple[MeasuredCollective, ...] = ()
    measured_info: Dict[str, Any] = field(default_factory=dict)
    origin: str = ""                       # file path or "preset NAME", for messages
    memory_bandwidth: Optional[float] = None  # bytes/s of GPU memory (HBM) for copies and fp32 merges
    _fabrics: Dict[Any, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, data: Any, source: str = "topology") -> "Topology":
        """Validate a parsed YAML document; raises TopologyError naming the offending key."""
        top = _Reader(data, "", source)
        fmt = top.string("format", FORMAT)
        if fmt != FORMAT:
            top.fail("format", f"{fmt!r} is not supported; expected {FORMAT!r}")
        name = top.string("name")
        description = top.string("description", "")
        sources = top.listing("sources", [])
        for i, s in enumerate(sources):
            if not isinstance(s, str):
                top.fail(f"sources[{i}]", f"expected a string, got {_describe(s)}")
        gpu = top.section("gpu")
        gpu_model = gpu.string("model", "GPU")
        gpu_memory = gpu.number("memory_gib") * 1024**3
        hbm = gpu.number("memory_bandwidth_GBps", None)
        gpu.done(extra_allowed=("note",))

        coll = top.section("collectives", {}) or _Reader({}, "collectives", source)
        p2p = coll.section("p2p", {}) or _Reader({}, "collectives.p2p", source)
        a2a = coll.section("all_to_all", {}) or _Reader({}, "collectives.all_to_all", source)
        collectives = Collectives(
            p2p_latency=p2p.number("latency_us", 20.0, strict=False) * US,
            p2p_floor=p2p.number("floor_us", 0.0, strict=False) * US,
            a2a_latency=a2a.number("latency_us", 20.0, strict=False) * US,
            a2a_floor=a2a.number("floor_us", 0.0, strict=False) * US,
            step_overhead=coll.number("step_overhead_us", STEP_OVERHEAD_US, strict=False) * US,
            compute_slowdown=coll.number("compute_slowdown", COMPUTE_SLOWDOWN, strict=False),
        )
        for r in (p2p, a2a):
            r.done(extra_allowed=("note",))
        coll.done()

        kernels_raw = top.listing("kernels")
        if not kernels_raw:
            top.fail("kernels", "needs at least one kernel profile")
        kernels = tuple(KernelProfile.from_dict(k, f"kernels[{i}]", source) for i, k in enumerate(kernels_raw))

        has_compact = any(top.has(k) for k in ("hosts", "gpus_per_host", "host_fabric", "network"))
        has_graph = top.has("graph")
        if has_compact and has_graph:
            top.fail("graph", "give either the compact form (hosts, gpus_per_host, host_fabric, network) "
                              "or graph, not both")
        if not has_compact and not has_graph:
            top.fail("host_fabric", "is required but missing (or give the graph form: graph.nodes/graph.links)")
        kwargs: Dict[str, Any] = {}
        if has_compact:
            hosts = top.raw("hosts", 1)
            if hosts != "auto" and (isinstance(hosts, bool) or not isinstance(hosts, int) or hosts < 1):
                top.fail("hosts", f"expected a positive integer or 'auto', got {_describe(hosts)}")
            gpus_per_host = top.integer("gpus_per_host")
            fabric = _validate_host_fabric(top.section("host_fabric"), gpus_per_host)
            net_reader = top.section("network", None)
            network = _validate_network(net_reader) if net_reader is not None else None
            if network is None and (hosts == "auto" or hosts > 1):
                top.fail("network", f"is required when hosts is {hosts!r} (how do the hosts talk?)")
            kwargs.update(hosts=hosts, gpus_per_host=gpus_per_host, host_fabric=fabric, network=network)
        else:
            kwargs["graph_spec"] = _validate_graph(top.section("graph"))

        measured_p2p: List[MeasuredCollective] = []
        measured_a2a: List[MeasuredCollective] = []
        info: Dict[str, Any] = {}
        measured = top.section("measured", None)
        if measured is not None:
            for i, item in enumerate(measured.listing("p2p", [])):
                r = _Reader(item, f"measured.p2p[{i}]", source)
                scope = r.string("scope", choices=P2P_SCOPES)
                fit, samples = _fit_from(r)
                r.done(extra_allowed=("note",))
                measured_p2p.append(MeasuredCollective(fit=fit, samples=tuple(samples), scope=scope))
            for i, item in enumerate(measured.listing("all_to_all", [])):
                r = _Reader(item, f"measured.all_to_all[{i}]", source)
                group_size = r.integer("group_size", minimum=2)
                hosts_per_group = r.integer("hosts_per_group", 1)
                fit, samples = _fit_from(r)
                r.done(extra_allowed=("note",))
                measured_a2a.append(MeasuredCollective(fit=fit, samples=tuple(samples), group_size=group_size,
                                                       hosts_per_group=hosts_per_group))
            info = {k: copy.deepcopy(v) for k, v in measured.data.items() if k not in ("p2p", "all_to_all")}
        top.done()
        return cls(name=name, gpu_model=gpu_model, gpu_memory=gpu_memory, collectives=collectives, kernels=kernels,
                   memory_bandwidth=None if hbm is None else hbm * GB,
                   description=description, sources=tuple(sources), measured_p2p=tuple(measured_p2p),
                   measured_all_to_all=tuple(measured_a2a), measured_info=info, origin=source, **kwargs)

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "Topology":
        """Read a topology YAML file."""
        path = Path(path)
        source = f"topology file '{path}'"
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise TopologyError(f"{source}: cannot be read ({exc.strerror or exc})") from None
        return cls.from_yaml(text, source=source)

    @classmethod
    def from_yaml(cls, text: str, source: str = "topology") -> "Topology":
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise TopologyError(f"{source}: malformed YAML{where}: {problem}") from None
        return cls.from_dict(data, source=source)

    @classmethod
    def preset(cls, name: str) -> "Topology":
        """A shipped preset by name (see :func:`list_presets`), optionally ``NAME:hosts=N,gpus_per_host=G``."""
        base, _, params = name.partition(":")
        path = PRESETS_DIR / f"{base}.yaml"
        if not base or not path.is_file():
            raise TopologyError(f"unknown topology preset {base!r}; valid presets: {', '.join(list_presets())} "
                                "(or give a path to a topology YAML file)")
        topo = cls.load(path)
        topo.origin = f"preset '{base}'"
        for item in filter(None, params.split(",")):
            key, _, value = item.partition("=")
            if key not in ("hosts", "gpus_per_host") or not value.isdigit() or int(value) < 1:
                raise TopologyError(f"topology {name!r}: bad parameter {item!r}; valid: hosts=N, gpus_per_host=G")
            topo = topo.with_hosts(int(value)) if key == "hosts" else topo.with_gpus_per_host(int(value))
        return topo

    # ------------------------------------------------------------------ output
    def to_dict(self) -> dict:
        out: Dict[str, Any] = {"format": FORMAT, "name": self.name}
        if self.description:
            out["description"] = self.description
        if self.sources:
            out["sources"] = list(self.sources)
        if self.graph_spec is None:
            out["hosts"] = self.hosts
            out["gpus_per_host"] = self.gpus_per_host
        out["gpu"] = {"model": self.gpu_model, "memory_gib": _r(self.gpu_memory / 1024**3)}
        if self.memory_bandwidth is not None:
            out["gpu"]["memory_bandwidth_GBps"] = _r(self.memory_bandwidth / GB)
        if self.graph_spec is None:
            out["host_fabric"] = copy.deepcopy(self.host_fabric)
            if self.network is not None:
                out["network"] = copy.deepcopy(self.network)
        else:
            out["graph"] = copy.deepcopy(self.graph_spec)
        out["collectives"] = self.collectives.to_dict()
        out["kernels"] = [k.to_dict() for k in self.kernels]
        if self.measured_p2p or self.measured_all_to_all or self.measured_info:
            measured: Dict[str, Any] = copy.deepcopy(self.measured_info)
            if self.measured_p2p:
                measured["p2p"] = [m.to_dict() for m in self.measured_p2p]
            if self.measured_all_to_all:
                measured["all_to_all"] = [m.to_dict() for m in self.measured_all_to_all]
            out["measured"] = measured
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None, width=120)

    def save(self, path: Union[str, os.PathLike]) -> None:
        Path(path).write_text(self.to_yaml(), encoding="utf-8")

    # ------------------------------------------------------------------ derived topologies
    def _copy(self, **changes: Any) -> "Topology":
        data = {f: getattr(self, f) for f in self.__dataclass_fields__ if f != "_fabrics"}
        data.update(changes)
        return Topology(**data)

    def with_hosts(self, hosts: int) -> "Topology":
        """The same machine with a fixed number of hosts (compact form only)."""
        if self.graph_spec is not None:
            raise TopologyError(f"topology {self.name!r} is an explicit graph; its host count is fixed")
        if hosts > 1 and self.network is None:
            raise TopologyError(f"topology {self.name!r} has no network section, so it cannot have {hosts} hosts")
        return self._copy(hosts=hosts)

    def with_gpus_per_host(self, gpus_per_host: int) -> "Topology":
        """The same kind of host with another GPU count (compact form only; the probe's all-to-all fits, measured
        with the old count, are dropped)."""
        if self.graph_spec is not None:
            raise TopologyError(f"gpus_per_node cannot change topology {self.name!r}: it is an explicit graph")
        if isinstance(gpus_per_host, bool) or not isinstance(gpus_per_host, int) or gpus_per_host < 1:
            raise TopologyError(f"gpus_per_node must be a positive integer, got {gpus_per_host!r}")
        fabric = dict(self.host_fabric)
        if fabric["kind"] == "pcie":
            group = fabric["gpus_per_switch"] * fabric["switches_per_socket"]
            if gpus_per_host % fabric["gpus_per_switch"] or (gpus_per_host > group and gpus_per_host % group):
                raise TopologyError(
                    f"gpus_per_node={gpus_per_host} does not fit topology {self.name!r}: its PCIe tree has "
                    f"{fabric['gpus_per_switch']} GPUs per switch and {fabric['switches_per_socket']} switches per "
                    "socket")
        keep = gpus_per_host == self.gpus_per_host
        return self._copy(gpus_per_host=gpus_per_host, host_fabric=fabric,
                          measured_all_to_all=self.measured_all_to_all if keep else ())

    # ------------------------------------------------------------------ queries
    def max_gpus(self) -> Optional[int]:
        """GPUs available, or None when the host count is "auto" (unbounded)."""
        if self.graph_spec is not None:
            return sum(1 for n in self.graph_spec["nodes"] if n["kind"] == "gpu")
        if self.hosts == "auto":
            return None
        return self.hosts * self.gpus_per_host

    def fabric(self, world_size: int) -> "Fabric":
        """The concrete graph holding ``world_size`` ranks (rank r on host r // gpus_per_host, like torchrun).

        Builds a networkx graph of every GPU: for inspection and explicit graphs. The cost model of a compact
        topology uses :meth:`host_classes` instead, whose cost does not grow with the world size."""
        self.check_world(world_size)
        if world_size not in self._fabrics:
            self._fabrics[world_size] = Fabric(self, world_size)
        return self._fabrics[world_size]

    def host_classes(self, world_size: int) -> "HostClassFabric":
        """Link loads per host class (Note [host classes]); compact form only."""
        if self.graph_spec is not None:
            raise TopologyError(f"topology {self.name!r} is an explicit graph; it has no host classes")
        self.check_world(world_size)
        key = ("classes", world_size)
        if key not in self._fabrics:
            self._fabrics[key] = HostClassFabric(self, world_size)
        return self._fabrics[key]

    def check_world(self, world_size: int) -> None:
        """Raise PlannerError unless ``world_size`` ranks fit this topology (a network for several hosts)."""
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise PlannerError(f"world_size must be a positive integer, got {world_size!r}")
        capacity = self.max_gpus()
        if capacity is not None and world_size > capacity:
            where = (f"{self.hosts} host(s) x {self.gpus_per_host} GPUs" if self.graph_spec is None
                     else "its graph")
            raise PlannerError(f"world_size={world_size} does not fit topology {self.name!r}: it has {capacity} GPUs "
                               f"({where}); use a multi-host topology (e.g. '{DEFAULT_PRESET}') or probe the "
                               "machine")
        if self.graph_spec is None and self.network is None and -(-world_size // self.gpus_per_host) > 1:
            raise PlannerError(f"world_size={world_size} needs {-(-world_size // self.gpus_per_host)} hosts but "
                               f"topology {self.name!r} has no network section")

    def kernel(self, name: str = "auto", dtype: str = "bfloat16",
               head_dim: int = 128) -> Tuple[KernelProfile, List[str]]:
        """The kernel profile to use and notes about any approximation (dtype or head_dim not measured)."""
        notes: List[str] = []
        candidates = list(self.kernels)
        if name != "auto":
            candidates = [k for k in candidates if k.name == name]
            if not candidates:
                raise PlannerError(f"kernel={name!r} has no rates in topology {self.name!r}; valid values: 'auto', "
                                   + ", ".join(sorted({repr(k.name) for k in self.kernels})))
        same = [k for k in candidates if k.dtype == dtype]
        if not same:
            half = {"bfloat16", "float16"}
            same = [k for k in candidates if k.dtype in half and dtype in half]
            if same:
                notes.append(f"no {dtype} kernel rate in topology {self.name!r}; used the {same[0].dtype} rate")
            else:
                same = candidates
                notes.append(f"no {dtype} kernel rate in topology {self.name!r}; used the {same[0].dtype} rate "
                             "(probe with this dtype for a real number)")
        best_dim = min(abs(k.head_dim - head_dim) for k in same)
        same = [k for k in same if abs(k.head_dim - head_dim) == best_dim]
        if best_dim:
            notes.append(f"no head_dim={head_dim} kernel rate; used head_dim={same[0].head_dim}")
        best = max(same, key=lambda k: k.mean_rate())
        family = tuple(k for k in same if k.name == best.name and k.dtype == best.dtype and k is not best
                       and k.heads is not None and k.heads != best.heads)
        if family and best.heads is not None:
            best = dataclasses.replace(best, variants=family)
        return best, notes

    def measured_a2a(self, group_size: int, hosts_per_group: int) -> Optional[Fit]:
        for m in self.measured_all_to_all:
            if m.group_size == group_size and m.hosts_per_group == hosts_per_group:
                return m.fit
        return None

    def describe(self) -> str:
        """One line: what this topology is."""
        if self.graph_spec is not None:
            return f"{self.name}: {self.max_gpus()} x {self.gpu_model} (explicit graph)"
        hosts = "N" if self.hosts == "auto" else str(self.hosts)
        net = f", {self.network['kind']} between hosts" if self.network else ""
        return f"{self.name}: {hosts} x {self.gpus_per_host} x {self.gpu_model}, {self.host_fabric['kind']}{net}"


def _validate_host_fabric(reader: _Reader, gpus_per_host: int) -> dict:
    kind = reader.string("kind", choices=HOST_FABRIC_KINDS)
    out: Dict[str, Any] = {"kind": kind, "bandwidth_GBps": reader.number("bandwidth_GBps"),
                           "latency_us": reader.number("latency_us", 0.0, strict=False)}
    if kind == "pcie":
        out["gpus_per_switch"] = reader.integer("gpus_per_switch", gpus_per_host)
        out["switches_per_socket"] = reader.integer("switches_per_socket", 1)
        out["uplink_GBps"] = reader.number("uplink_GBps", out["bandwidth_GBps"])
        out["inter_socket_GBps"] = reader.number("inter_socket_GBps", out["uplink_GBps"])
        out["uplink_latency_us"] = reader.number("uplink_latency_us", 0.0, strict=False)
        out["inter_socket_latency_us"] = reader.number("inter_socket_latency_us", 0.0, strict=False)
        per_socket = out["gpus_per_switch"] * out["switches_per_socket"]
        if gpus_per_host % out["gpus_per_switch"] or (gpus_per_host > per_socket and gpus_per_host % per_socket):
            reader.fail(reader.key("gpus_per_switch"),
                        f"gpus_per_host={gpus_per_host} must be a multiple of gpus_per_switch x switches_per_socket")
    reader.done(extra_allowed=("note",))
    if "note" in reader.data:
        out["note"] = reader.data["note"]
    return out


def _validate_network(reader: _Reader) -> dict:
    out = {"kind": reader.string("kind", choices=NETWORK_KINDS), "nics_per_host": reader.integer("nics_per_host"),
           "nic_bandwidth_GBps": reader.number("nic_bandwidth_GBps"),
           "latency_us": reader.number("latency_us", 0.0, strict=False)}
    reader.done(extra_allowed=("note",))
    if "note" in reader.data:
        out["note"] = reader.data["note"]
    return out


def _validate_graph(reader: _Reader) -> dict:
    nodes_raw = reader.listing("nodes")
    links_raw = reader.listing("links")
    nodes, ids = [], set()
    for i, item in enumerate(nodes_raw):
        r = _Reader(item, f"{reader.key('nodes')}[{i}]", reader.source)
        node_id = r.raw("id")
        if not isinstance(node_id, (str, int)) or isinstance(node_id, bool):
            r.fail(r.key("id"), f"expected a string, got {_describe(node_id)}")
        node_id = str(node_id)
        if node_id in ids:
            r.fail(r.key("id"), f"duplicate node id {node_id!r}")
        ids.add(node_id)
        kind = r.string("kind", choices=("gpu", "switch", "cpu", "nic", "fabric"))
        node = {"id": node_id, "kind": kind}
        if kind == "gpu":
            node["host"] = r.integer("host", 0, minimum=0)
        r.done()
        nodes.append(node)
    if not any(n["kind"] == "gpu" for n in nodes):
        reader.fail(reader.key("nodes"), "has no node of kind 'gpu'")
    links = []
    for i, item in enumerate(links_raw):
        r = _Reader(item, f"{reader.key('links')}[{i}]", reader.source)
        link = {}
        for end in ("src", "dst"):
            value = str(r.raw(end))
            if value not in ids:
                r.fail(r.key(end), f"{value!r} is not a node id")
            link[end] = value
        link["type"] = r.string("type", "link")
        link["bandwidth_GBps"] = r.number("bandwidth_GBps")
        link["latency_us"] = r.number("latency_us", 0.0, strict=False)
        bidirectional = r.raw("bidirectional", True)
        if not isinstance(bidirectional, bool):
            r.fail(r.key("bidirectional"), f"expected true or false, got {_describe(bidirectional)}")
        link["bidirectional"] = bidirectional
        r.done()
        links.append(link)
    reader.done()
    return {"nodes": nodes, "links": links}


# ----------------------------------------------------------------------------------------------- fabric
_GPU_ENTRY_WEIGHT = 1_000_000  # routing never passes *through* a GPU unless nothing else connects


class Fabric:
    """The networkx graph of a topology instantiated for ``world_size`` ranks, with routing and pattern costs.

    Nodes carry ``kind`` (gpu/switch/cpu/nic/fabric) and ``host``; directed edges carry ``type``, ``bandwidth``
    (bytes/s) and ``latency`` (s). ``rank_nodes[r]`` is rank r's GPU.
    """

    def __init__(self, topology: Topology, world_size: int):
        import networkx as nx  # lazy: only explicit graphs and inspection need it (0.2 s to import)

        self.topology = topology
        self.world_size = world_size
        self.graph = nx.DiGraph()
        if topology.graph_spec is not None:
            self._build_explicit(topology.graph_spec)
        else:
            gph = topology.gpus_per_host
            hosts = -(-world_size // gph)
            if hosts > 1 and topology.network is None:
                raise PlannerError(f"world_size={world_size} needs {hosts} hosts but topology {topology.name!r} "
                                   "has no network section")
            self._build_compact(topology, hosts)
        gpus = [n for n, a in self.graph.nodes(data=True) if a["kind"] == "gpu"]
        self.rank_nodes: List[str] = gpus[:world_size]
        self._paths: Dict[Tuple[int, int], Tuple[List[Tuple[str, str]], float]] = {}
        self._sources: Dict[int, Dict[str, List[str]]] = {}
        self._patterns: Dict[Any, Tuple[float, float]] = {}

    # ------------------------------------------------------------------ building
    def _edge(self, a: str, b: str, kind: str, bandwidth_gbps: float, latency_us: float,
              bidirectional: bool = True) -> None:
        attrs = {"type": kind, "bandwidth": bandwidth_gbps * GB, "latency": latency_us * US}
        self.graph.add_edge(a, b, **attrs)
        if bidirectional:
            self.graph.add_edge(b, a, **attrs)

    def _build_explicit(self, spec: dict) -> None:
        for node in spec["nodes"]:
            self.graph.add_node(node["id"], kind=node["kind"], host=node.get("host"))
        for link in spec["links"]:
            self._edge(link["src"], link["dst"], link["type"], link["bandwidth_GBps"], link["latency_us"],
                       link["bidirectional"])

    def _build_compact(self, topo: Topology, hosts: int) -> None:
        gph, fab, net = topo.gpus_per_host, topo.host_fabric, topo.network
        bw, lat = fab["bandwidth_GBps"], fab["latency_us"]
        for h in range(hosts):
            gpus = [f"h{h}.gpu{i}" for i in range(gph)]
            for i, g in enumerate(gpus):
                self.graph.add_node(g, kind="gpu", host=h, local=i)
            kind = fab["kind"]
            if kind in ("nvswitch", "switch"):
                sw = f"h{h}.{kind}"
                self.graph.add_node(sw, kind="switch", host=h)
                for g in gpus:
                    self._edge(g, sw, kind, bw, lat / 2)
            elif kind == "nvlink":
                for i in range(gph):
                    for j in range(i + 1, gph):
                        self._edge(gpus[i], gpus[j], "nvlink", bw, lat)
            else:  # pcie tree: GPU -> PCIe switch -> CPU root complex -> (inter-socket link) -> CPU
                per_switch, per_socket = fab["gpus_per_switch"], fab["switches_per_socket"]
                switches = gph // per_switch
                sockets = max(1, -(-switches // per_socket))
                for c in range(sockets):
                    self.graph.add_node(f"h{h}.cpu{c}", kind="cpu", host=h)
                for k in range(switches):
                    sw = f"h{h}.pcie{k}"
                    self.graph.add_node(sw, kind="switch", host=h)
                    self._edge(sw, f"h{h}.cpu{k // per_socket}", "pcie", fab["uplink_GBps"],
                               fab["uplink_latency_us"])
                for i, g in enumerate(gpus):
                    self._edge(g, f"h{h}.pcie{i // per_switch}", "pcie", bw, lat / 2)
                for a in range(sockets):
                    for b in range(a + 1, sockets):
                        self._edge(f"h{h}.cpu{a}", f"h{h}.cpu{b}", "inter_socket", fab["inter_socket_GBps"],
                                   fab["inter_socket_latency_us"])
            if net is not None and hosts > 1:
                nics = net["nics_per_host"]
                for n in range(nics):
                    nic = f"h{h}.nic{n}"
                    self.graph.add_node(nic, kind="nic", host=h)
                    self._edge(nic, "network", net["kind"], net["nic_bandwidth_GBps"], net["latency_us"] / 2)
                for i, g in enumerate(gpus):
                    # The GPU-NIC hop (PCIe) is not the bottleneck: the NIC's own edge carries the shared limit.
                    self._edge(g, f"h{h}.nic{i * nics // gph}", "pcie", net["nic_bandwidth_GBps"], 0.0)
        if hosts > 1:
            self.graph.nodes["network"].update(kind="fabric", host=None)

    # ------------------------------------------------------------------ queries
    def host_of(self, rank: int) -> Any:
        return self.graph.nodes[self.rank_nodes[rank]].get("host")

    def path(self, src: int, dst: int) -> Tuple[List[Tuple[str, str]], float]:
        """Edges of the route from rank ``src`` to rank ``dst`` and its latency (s)."""
        key = (src, dst)
        if key not in self._paths:
            if src not in self._sources:
                def weight(u: str, v: str, attrs: dict) -> float:
                    return _GPU_ENTRY_WEIGHT if self.graph.nodes[v]["kind"] == "gpu" else 1.0

                import networkx as nx

                self._sources[src] = nx.single_source_dijkstra_path(self.graph, self.rank_nodes[src], weight=weight)
            nodes = self._sources[src].get(self.rank_nodes[dst])
            if nodes is None:
                raise PlannerError(f"topology {self.topology.name!r}: no link path from {self.rank_nodes[src]} to "
                                   f"{self.rank_nodes[dst]}")
            edges = list(zip(nodes, nodes[1:]))
            self._paths[key] = (edges, sum(self.graph.edges[e]["latency"] for e in edges))
        return self._paths[key]

    def pattern(self, key: Any, flows: Iterable[Tuple[int, int]]) -> Tuple[float, float]:
        """``(seconds_per_byte, latency)`` of flows that all run at once, each carrying the same byte count.

        seconds_per_byte = max over directed links of (flows crossing it) / bandwidth; latency = the largest path
        latency. Cached under ``key``.
        """
        if key not in self._patterns:
            load: Dict[Tuple[str, str], int] = {}
            latency = 0.0
            for src, dst in flows:
                if src == dst:
                    continue
                edges, lat = self.path(src, dst)
                latency = max(latency, lat)
                for e in edges:
                    load[e] = load.get(e, 0) + 1
            spb = max((count / self.graph.edges[e]["bandwidth"] for e, count in load.items()), default=0.0)
            self._patterns[key] = (spb, latency)
        return self._patterns[key]

    def link_types(self, src: int, dst: int) -> List[str]:
        return [self.graph.edges[e]["type"] for e in self.path(src, dst)[0]]


# ----------------------------------------------------------------------------------------------- host classes
class HostClassFabric:
    """Link loads of the compact form computed per host class, without a graph: cost independent of the world size.

    Note [host classes]
    -------------------
    In the compact form every host is alike, and the rank layout of ``usp.spec`` is affine, so a pattern
    (the flows of every Ulysses group's all-to-all, or of every ring's step) loads the links of two hosts the same
    way whenever the two hosts see the same flows relative to their own GPUs: their *views* are equal. Every link
    belongs to one host (GPU-switch, PCIe switch uplinks, CPU-CPU, GPU-NIC, NIC-network), and a link's load
    depends only on its host's view, so the pattern's bottleneck is the largest load over one host of each view.
    Which hosts to look at:
      * the pattern repeats every ``Q = lcm(P, gpus_per_host)`` ranks (``P = U * R``: blocks map to blocks and
        hosts to hosts), except at the end of the world (a partly filled last host): hosts in ``[0, Q)`` and the
        last hosts stand for all;
      * away from the block boundaries (multiples of ``P``), the groups repeat every ``inner`` ranks (``U`` for
        ``ulysses_inner``, ``R`` for ``ring_inner``; block starts are multiples of it), so the view of a host
        there depends only on its first rank modulo ``lcm(inner, gpus_per_host)``: one period of interior hosts
        of the first block stands for every interior host;
      * the hosts within reach of a block boundary (the ring's wrap-around reaches ``U`` ranks back with
        ``ulysses_inner``; with ``ring_inner`` nothing crosses a boundary but the hosts that straddle one) are
        evaluated one by one, for every boundary in ``[0, Q]``.
    The work is ``O(gpus_per_host · (boundaries + period))`` per pattern, not ``O(world)``: 65,536 GPUs on hosts
    of 8 take the same time as 64. Routing is the one of :class:`Fabric` (traffic inside a host stays on the host
    fabric; between hosts it goes GPU -> its rail NIC -> network -> NIC -> GPU) and the loads, bandwidths and
    latencies are the same floating-point expressions, so the results are identical to the graph's
    (``tests/planner/test_planner_topology.py`` compares them). One deliberate difference: on a PCIe host with a
    network, the graph's fewest-hops routing sent traffic between the two CPU sockets of one host out through the
    NICs and back (4 hops instead of 5); here it stays on the host's PCIe tree and CPU link, as NCCL keeps
    intra-node traffic (no shipped preset has that combination).
    """

    def __init__(self, topology: "Topology", world_size: int):
        self.topology = topology
        self.world_size = world_size
        self.gph = topology.gpus_per_host
        self.hosts = -(-world_size // self.gph)
        fab, net = topology.host_fabric, topology.network
        self.kind = fab["kind"]
        self.fab_bw = fab["bandwidth_GBps"] * GB
        half = (fab["latency_us"] / 2) * US
        if self.kind == "nvlink":
            self._lat_same_switch = 0 + fab["latency_us"] * US
        else:
            self._lat_same_switch = 0 + half + half
        if self.kind == "pcie":
            self.per_switch = fab["gpus_per_switch"]
            self.per_socket = fab["gpus_per_switch"] * fab["switches_per_socket"]
            self.uplink_bw = fab["uplink_GBps"] * GB
            self.socket_bw = fab["inter_socket_GBps"] * GB
            up, sock = fab["uplink_latency_us"] * US, fab["inter_socket_latency_us"] * US
            self._lat_same_socket = 0 + half + up + up + half
            self._lat_cross_socket = 0 + half + up + sock + up + half
        self.networked = net is not None and self.hosts > 1
        if self.networked:
            self.nics = net["nics_per_host"]
            self.nic_bw = net["nic_bandwidth_GBps"] * GB
            hop = (net["latency_us"] / 2) * US
            self._lat_inter = 0 + 0.0 * US + hop + hop + 0.0 * US
        self._patterns: Dict[Any, Tuple[float, float]] = {}

    def host_of(self, rank: int) -> int:
        return rank // self.gph

    # ------------------------------------------------------------------ flows of one rank
    def _a2a_partners(self, x: int, ulysses: int, ring: int, placement: str) -> Tuple[List[int], int]:
        """Same-host partners (ranks) of rank ``x`` in its Ulysses group, and the number of off-host ones."""
        gph = self.gph
        h = x // gph
        lo, hi = h * gph, min((h + 1) * gph, self.world_size)
        partners = [y for y in spec.ulysses_group(x, ulysses, ring, placement) if lo <= y < hi and y != x]
        return partners, ulysses - 1 - len(partners)

    # ------------------------------------------------------------------ loads of one host
    def _host_load(self, h: int, kind: str, ulysses: int, ring: int, placement: str) -> Tuple[float, float]:
        """(max over this host's links of flows / bandwidth, largest path latency) of the pattern's flows that
        start or end on host ``h``."""
        gph = self.gph
        lo, hi = h * gph, min((h + 1) * gph, self.world_size)
        out_intra: Dict[int, List[int]] = {}
        in_intra: Dict[int, int] = {}
        out_inter: Dict[int, int] = {}
        in_inter: Dict[int, int] = {}
        for x in range(lo, hi):
            if kind == "a2a":
                same, off = self._a2a_partners(x, ulysses, ring, placement)
                out_intra[x], out_inter[x] = same, off
                in_inter[x] = off
                for y in same:
                    in_intra[y] = in_intra.get(y, 0) + 1
            else:
                nxt = spec.ring_peer(x, 1, ulysses, ring, placement)
                prv = spec.ring_peer(x, -1, ulysses, ring, placement)
                if nxt == x:
                    out_intra[x], out_inter[x], in_inter[x] = [], 0, 0
                    continue
                if nxt // gph == h:
                    out_intra[x], out_inter[x] = [nxt], 0
                    in_intra[nxt] = in_intra.get(nxt, 0) + 1
                else:
                    out_intra[x], out_inter[x] = [], 1
                in_inter[x] = 0 if prv // gph == h else 1
        spb, latency = 0.0, 0.0
        flows_intra = [(x, y) for x, ys in out_intra.items() for y in ys]
        if flows_intra:
            if self.kind == "nvlink":
                spb = max(spb, 1 / self.fab_bw)
            else:
                spb = max(spb, max(len(ys) for ys in out_intra.values()) / self.fab_bw,
                          max(in_intra.values()) / self.fab_bw)
            if self.kind != "pcie":
                latency = self._lat_same_switch
            else:
                up_out: Dict[int, int] = {}
                up_in: Dict[int, int] = {}
                sockets: Dict[Tuple[int, int], int] = {}
                for x, y in flows_intra:
                    i, j = x - lo, y - lo
                    if i // self.per_switch == j // self.per_switch:
                        latency = max(latency, self._lat_same_switch)
                        continue
                    up_out[i // self.per_switch] = up_out.get(i // self.per_switch, 0) + 1
                    up_in[j // self.per_switch] = up_in.get(j // self.per_switch, 0) + 1
                    a, b = i // self.per_socket, j // self.per_socket
                    if a == b:
                        latency = max(latency, self._lat_same_socket)
                    else:
                        latency = max(latency, self._lat_cross_socket)
                        sockets[(a, b)] = sockets.get((a, b), 0) + 1
                for count in list(up_out.values()) + list(up_in.values()):
                    spb = max(spb, count / self.uplink_bw)
                for count in sockets.values():
                    spb = max(spb, count / self.socket_bw)
        if self.networked and (any(out_inter.values()) or any(in_inter.values())):
            latency = max(latency, self._lat_inter)
            nic_out: Dict[int, int] = {}
            nic_in: Dict[int, int] = {}
            for x in range(lo, hi):
                nic = (x - lo) * self.nics // gph
                nic_out[nic] = nic_out.get(nic, 0) + out_inter[x]
                nic_in[nic] = nic_in.get(nic, 0) + in_inter[x]
            for count in (list(out_inter.values()) + list(in_inter.values()) + list(nic_out.values())
                          + list(nic_in.values())):
                spb = max(spb, count / self.nic_bw)
        return spb, latency

    # ------------------------------------------------------------------ which hosts
    def representative_hosts(self, ulysses: int, ring: int, placement: str) -> List[int]:
        """Hosts whose views cover every host's view for this layout (Note [host classes])."""
        gph, hosts = self.gph, self.hosts
        sp = ulysses * ring
        period = math.lcm(sp, gph)
        period_hosts = min(hosts, period // gph)
        inner = spec.inner_axis_size(ulysses, ring, placement)
        # the ring's wrap-around reaches one ring stride back (U ranks with ulysses_inner; adjacent with ring_inner,
        # where nothing crosses a block boundary but the hosts that straddle one)
        head_first = spec.Placement.parse(placement) is spec.Placement.ULYSSES_INNER
        margin = (-(-spec.ring_stride(ulysses, ring, placement) // gph) if head_first else 0) + 1
        block_hosts = sp // gph
        chosen = set(range(max(0, hosts - margin - 1), hosts))
        for b in range(period // sp + 1):  # hosts within reach of each block boundary of one period
            edge = b * sp
            chosen.update(range(max(0, edge // gph - margin), min(hosts, (edge - 1) // gph + margin + 1)))
        if inner >= 4 * gph and block_hosts >= 2 * margin + inner // gph + 2:
            # a long inner axis: interior hosts differ only next to a multiple of it (a group edge or a chunk's
            # wrap-around); all the others see the same flows (one host far from any edge stands for them)
            for m in range(0, min(sp, math.lcm(inner, gph)) + 1, inner):
                chosen.update((m // gph - 1, m // gph, m // gph + 1))
            chosen.add((inner + inner // 2) // gph)
        else:
            interior = math.lcm(inner, gph) // gph
            if block_hosts >= 2 * margin + interior + 2:
                chosen.update(range(margin + 1, margin + 1 + interior))
            else:
                chosen.update(range(period_hosts))
        return sorted(h for h in chosen if 0 <= h < hosts)

    def layout_pattern(self, kind: str, ulysses: int, ring: int, placement: str) -> Tuple[float, float]:
        """``(seconds_per_byte, latency)`` of every Ulysses group's all-to-all (``kind="a2a"``) or every ring's
        step (``kind="p2p"``) at once, over the whole world (see :meth:`Fabric.pattern`)."""
        if ulysses == 1 or ring == 1:
            placement = "ulysses_inner"  # one layout
        key = (kind, ulysses, ring, placement)
        if key not in self._patterns:
            spb, latency = 0.0, 0.0
            for h in self.representative_hosts(ulysses, ring, placement):
                s, lat = self._host_load(h, kind, ulysses, ring, placement)
                spb, latency = max(spb, s), max(latency, lat)
            self._patterns[key] = (spb, latency)
        return self._patterns[key]

    def ulysses_hosts(self, ulysses: int, ring: int, placement: str) -> Tuple[int, bool]:
        """(hosts spanned by the first Ulysses group, whether any Ulysses group spans more than one host)."""
        gph = self.gph
        if ulysses == 1 or ring == 1:
            placement = "ulysses_inner"
        spanned = len({r // gph for r in spec.ulysses_group(0, ulysses, ring, placement)})
        if spec.ulysses_stride(ulysses, ring, placement) == 1:
            crosses = any((s // gph) != ((s + ulysses - 1) // gph)
                          for s in range(0, min(self.world_size, math.lcm(ulysses, gph)), ulysses))
        else:
            def hosts_of(dp: int, ring_rank: int) -> set:  # the hosts of the Ulysses group at (dp, ring_rank)
                first = spec.sequence_parallel_rank(dp, ring_rank, 0, ulysses, ring, placement)
                return {x // gph for x in spec.ulysses_group(first, ulysses, ring, placement)}

            crosses = ulysses > 1 and (ring >= gph or any(
                len(hosts_of(b, r)) > 1
                for b in range(min(self.world_size, math.lcm(ulysses * ring, gph)) // (ulysses * ring))
                for r in range(ring)))
        return spanned, crosses


# ----------------------------------------------------------------------------------------------- loading
def list_presets() -> List[str]:
    """Names of the shipped presets (files in ``planner/presets``)."""
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def load_topology(topology: Union[None, str, os.PathLike, Topology, dict] = None) -> Topology:
    """``None`` -> the default preset; a ``Topology`` as is; a dict -> validated; a str/path -> a file if it exists
    (or ends in .yaml/.yml), else a preset name (``NAME`` or ``NAME:hosts=N``)."""
    if topology is None:
        return Topology.preset(DEFAULT_PRESET)
    if isinstance(topology, Topology):
        return topology
    if isinstance(topology, dict):
        return Topology.from_dict(topology)
    if isinstance(topology, (str, os.PathLike)):
        text = os.fspath(topology)
        if os.path.exists(text) or text.endswith((".yaml", ".yml")) or os.sep in text:
            return Topology.load(text)
        return Topology.preset(text)
    raise PlannerError(f"topology={topology!r} must be None, a preset name, a YAML path or a Topology")


def _r(value: float, digits: int = 4) -> float:
    """Round for YAML output without losing meaning (4 significant digits by default)."""
    if value == 0 or not math.isfinite(value):
        return value
    return float(f"{value:.{digits}g}")
