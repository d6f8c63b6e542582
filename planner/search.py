"""Search: every Ulysses x ring factorization of the sequence-parallel size, both placements, under the
constraints; the fastest feasible one is the :class:`Plan`.

Constraints (the core's layout contract):
  * ``U`` divides ``heads``. KV heads that ``U`` does not divide are replicated up to ``lcm(kv_heads, U)`` (noted
    on the candidate; costs more all-to-all bytes and memory).
  * The sequence splits evenly: ``seqlen % (U*R) == 0``; causal with ``R > 1`` (zigzag, ``2R`` chunks each split
    across ``U`` ranks) needs ``seqlen % lcm(2R, R*U) == 0``.
  * Peak memory per GPU (``planner.cost``) is at most ``memory_limit`` (default: the topology's GPU memory).
With ``U == 1`` or ``R == 1`` both placements give the same rank layout, so only ``ulysses_inner`` is listed.
Ranking: predicted forward + backward time (forward only with ``forward_only=True``, for inference). Candidates
within ``TIE_TOLERANCE`` (1%) of the fastest are a tie the model cannot resolve: the pick among them is the one whose
Ulysses groups stay inside one host, then ``ulysses_inner``, then the faster (a note on the plan says so).
"""
from __future__ import annotations

import json
import os
import textwrap
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, List, Optional, Tuple, Union

import yaml
from usp import spec

from .cost import PLACEMENTS, CostModel, MemoryCost, PassCost, Shape, head_chunk_options, replicated_kv_heads
from .topology import DEFAULT_PRESET, Topology, load_topology
from .units import (PlannerError, canonical_dtype, divisors, format_bytes, format_in_unit, parse_memory_limit,
                    parse_seqlen, seconds_unit)

__all__ = ["Candidate", "Plan", "plan", "predict", "sweep", "required_seqlen_multiple", "default_sweep_lengths",
           "equivalent"]


#: head_dim the GPU kernels of usp run: (lowest, highest, multiple of), from ``head_dim_range_reason`` in
#: ``usp/kernels/flash_attn.py`` and ``usp/kernels/sdpa.py``
KERNEL_HEAD_DIMS = (8, 256, 8)


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PlannerError(f"{name} must be a positive integer, got {value!r}")
    return value


#: What ``seqlen`` must be a multiple of for a split (U, R, causal): the runtime's rule, ``usp.spec.required_multiple``
required_seqlen_multiple = spec.required_multiple


@dataclass
class Candidate:
    """One (U, R, placement) with its predicted cost, or why it was rejected (``reason``)."""

    ulysses: int
    ring: int
    placement: str
    feasible: bool
    reason: Optional[str] = None
    forward: Optional[PassCost] = None
    backward: Optional[PassCost] = None
    memory: Optional[MemoryCost] = None
    kv_heads_used: Optional[int] = None
    notes: List[str] = field(default_factory=list)
    #: ring passes per head group (``usp.long_context_attention(head_chunks=...)``); > 1 only to fit memory
    head_chunks: int = 1
    #: a mix of layer types (``window_layers``): ``[{"kind": "windowed"|"global", "count": n, "forward":
    #: PassCost, "backward": PassCost}]``, one layer of each kind; ``forward``/``backward`` are their sum
    layers: List[dict] = field(default_factory=list)
    #: a packed batch (``documents=``): its layout, padding, local tokens, kernel calls and imbalance
    #: (``planner.batch.BatchCost.to_dict``)
    batch: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"U{self.ulysses}xR{self.ring}"

    @property
    def total(self) -> Optional[float]:
        if self.forward is None or self.backward is None:
            return None
        return self.forward.total + self.backward.total

    @property
    def memory_bytes(self) -> Optional[float]:
        return None if self.memory is None else self.memory.peak

    def to_dict(self) -> dict:
        return {"ulysses": self.ulysses, "ring": self.ring, "placement": self.placement, "feasible": self.feasible,
                "reason": self.reason, "total_s": self.total,
                "forward": None if self.forward is None else self.forward.to_dict(),
                "backward": None if self.backward is None else self.backward.to_dict(),
                "memory": None if self.memory is None else self.memory.to_dict(),
                "kv_heads_used": self.kv_heads_used, "notes": list(self.notes), "head_chunks": self.head_chunks,
                "layers": [{"kind": x["kind"], "count": x["count"], "forward": x["forward"].to_dict(),
                            "backward": x["backward"].to_dict()} for x in self.layers], "batch": dict(self.batch)}

    @classmethod
    def from_dict(cls, data: dict) -> "Candidate":
        return cls(ulysses=int(data["ulysses"]), ring=int(data["ring"]), placement=str(data["placement"]),
                   feasible=bool(data["feasible"]), reason=data.get("reason"),
                   forward=None if data.get("forward") is None else PassCost.from_dict(data["forward"]),
                   backward=None if data.get("backward") is None else PassCost.from_dict(data["backward"]),
                   memory=None if data.get("memory") is None else MemoryCost.from_dict(data["memory"]),
                   kv_heads_used=data.get("kv_heads_used"), notes=list(data.get("notes") or []),
                   head_chunks=int(data.get("head_chunks", 1)),
                   layers=[{"kind": str(x["kind"]), "count": int(x["count"]),
                            "forward": PassCost.from_dict(x["forward"]), "backward": PassCost.from_dict(x["backward"])}
                           for x in data.get("layers") or []], batch=dict(data.get("batch") or {}))


@dataclass
class Plan:
    """The chosen split and everything that led to it.

    ``ulysses``, ``ring`` and ``placement`` are what ``usp.SequenceParallelMesh.from_plan(plan)`` reads.
    ``forward``/``backward`` are the predicted per-layer pass costs with their breakdown, ``memory`` the peak
    per GPU, ``candidates`` every candidate ranked (feasible first, fastest first), ``rejected`` those with a
    reason. Serialises with ``to_dict``/``to_json``/``to_yaml`` and back with the ``from_*`` class methods.
    """

    ulysses: int
    ring: int
    placement: str
    world_size: int
    sequence_parallel_size: int
    shape: Shape
    forward: PassCost
    backward: PassCost
    memory: MemoryCost
    topology: str
    topology_source: Optional[str] = None
    kernel: str = ""
    memory_limit: Optional[float] = None
    forward_only: bool = False
    candidates: List[Candidate] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    #: pass to ``usp.LongContextAttention(head_chunks=...)``; > 1 when only chunking the ring fits the memory cap
    head_chunks: int = 1
    #: ``(windowed, global)`` layer counts priced together (``forward``/``backward`` are their sum), or None: one
    #: layer, windowed when ``shape.window`` is set
    window_layers: Optional[Tuple[int, int]] = None
    #: the packed batch priced (``documents=``): ``{"source", "documents", "total", "longest"}``, or None
    documents: Optional[dict] = None

    # ------------------------------------------------------------------ derived
    @property
    def objective(self) -> float:
        """What the search minimised: forward time when ``forward_only`` (inference), else forward + backward."""
        return self.forward.total if self.forward_only else self.total

    @property
    def data_parallel(self) -> int:
        return self.world_size // self.sequence_parallel_size

    @property
    def total(self) -> float:
        return self.forward.total + self.backward.total

    @property
    def memory_bytes(self) -> float:
        return self.memory.peak

    @property
    def rejected(self) -> List[Candidate]:
        return [c for c in self.candidates if not c.feasible]

    @property
    def label(self) -> str:
        return f"U{self.ulysses}xR{self.ring}"

    @property
    def runner_up(self) -> Optional[Candidate]:
        """The best feasible candidate that is not equivalent to the pick (:func:`equivalent`), or None."""
        if not self.candidates:
            return None
        pick = self.candidates[0]
        return next((c for c in self.candidates[1:] if c.feasible and not equivalent(c, pick)), None)

    def explain(self) -> Optional[dict]:
        """Why this split: the margin to the runner-up and the cost term that decides it.

        ``terms_s`` is runner-up minus pick for each part of the predicted time (``compute``, ``merge``,
        ``all_to_all``, ``ring_exposed``, ``overhead``; forward only when ``forward_only``): positive where the pick is faster.
        ``deciding_term`` is the one where the pick gains the most. None when nothing else is feasible."""
        second = self.runner_up
        if second is None:
            return None
        pick = self.candidates[0]
        passes = (lambda c: (c.forward,)) if self.forward_only else (lambda c: (c.forward, c.backward))
        terms = {name: sum(getattr(p, name) for p in passes(second)) - sum(getattr(p, name) for p in passes(pick))
                 for name in ("compute", "merge", "all_to_all", "ring_exposed", "overhead")}
        mine, theirs = _time(pick, self.forward_only), _time(second, self.forward_only)
        return {"runner_up": f"{second.label} {second.placement}", "runner_up_s": theirs,
                "margin": theirs / mine - 1, "margin_s": theirs - mine,
                "deciding_term": max(terms, key=lambda k: terms[k]), "terms_s": terms}

    def why(self) -> str:
        """One line from :meth:`explain`."""
        info = self.explain()
        if info is None:
            return "the only feasible split"
        unit = seconds_unit([abs(v) for v in info["terms_s"].values()] + [abs(info["margin_s"])])
        term = info["deciding_term"].replace("_", " ").replace("all to all", "all-to-all")
        gain = info["terms_s"][info["deciding_term"]]
        return (f"the runner-up {info['runner_up']} is {100 * info['margin']:.1f}% "
                f"({format_in_unit(info['margin_s'], unit)} {unit}) slower; the pick wins on {term} "
                f"({format_in_unit(gain, unit)} {unit} less)")

    def summary(self) -> str:
        """One line: the pick and its predicted cost (one unit for the line)."""
        unit = seconds_unit([self.forward.total, self.backward.total, self.total])
        if self.forward_only:
            time = f"fwd {format_in_unit(self.forward.total, unit)} {unit} per layer (forward only)"
        else:
            time = (f"fwd {format_in_unit(self.forward.total, unit)} + bwd {format_in_unit(self.backward.total, unit)}"
                    f" = {format_in_unit(self.total, unit)} {unit} per layer")
        chunks = f", head_chunks={self.head_chunks}" if self.head_chunks > 1 else ""
        if self.window_layers is not None:
            windowed, dense = self.window_layers
            time = time.replace("per layer", f"per {windowed + dense} layers ({windowed} windowed + {dense} global)")
        elif tuple(self.shape.window) != (-1, -1):
            time = time.replace("per layer", "per windowed layer")
        packed = ""
        if self.documents is not None and self.candidates and self.candidates[0].batch:
            packed = (f" ({self.documents['documents']} documents, {self.candidates[0].batch['padding']} padding "
                      "tokens)")
        return (f"Ulysses {self.ulysses} x ring {self.ring} ({self.placement}{chunks}): {time}{packed}, "
                f"{format_bytes(self.memory_bytes)} per GPU")

    def snippet(self) -> str:
        """Ready-to-paste code that builds this plan's mesh and attention module."""
        s = self.shape
        args = [f"world_size={self.world_size}", f"seqlen={s.seqlen}", f"heads={s.heads}", f"kv_heads={s.kv_heads}",
                f"head_dim={s.head_dim}", f"batch={s.batch}", f"dtype=torch.{s.dtype}", f"causal={s.causal}"]
        if self.sequence_parallel_size != self.world_size:
            args.append(f"sequence_parallel_size={self.sequence_parallel_size}")
        if self.topology_source:
            args.append(f"topology={self.topology_source!r}")
        if self.memory_limit is not None:
            args.append(f"memory_limit={int(self.memory_limit)}")
        if self.forward_only:
            args.append("forward_only=True")
        windowed = tuple(s.window) != (-1, -1)
        if windowed:
            args.append(f"window={tuple(s.window)}")
        if self.window_layers is not None:
            args.append(f"window_layers='{self.window_layers[0]}:{self.window_layers[1]}'")
        call = "\n".join(textwrap.wrap("plan = usp.plan(" + ", ".join(args) + ")", 79, subsequent_indent=" " * 16,
                                       break_long_words=False, break_on_hyphens=False))
        lines = ["import torch", "import usp", "", "# after torch.distributed.init_process_group(...) on every rank"]
        if self.topology_source is not None:
            lines += [call, f"# -> Ulysses {self.ulysses} x ring {self.ring}, placement {self.placement!r}"]
            mesh = "mesh = usp.SequenceParallelMesh.from_plan(plan)"
        else:
            mesh = (f"mesh = usp.SequenceParallelMesh(ulysses={self.ulysses}, ring={self.ring}, "
                    f"placement={self.placement!r})")
        chunks = f", head_chunks={self.head_chunks}" if self.head_chunks > 1 else ""
        if not windowed:
            lines += [mesh, f"attn = usp.LongContextAttention(mesh, causal={s.causal}{chunks})"]
            return "\n".join(lines)
        lines += [mesh, f"local_attn = usp.LongContextAttention(mesh, causal={s.causal}{chunks}, "
                  f"window_size={tuple(s.window)})"]
        if self.window_layers is not None and self.window_layers[1]:
            lines.append(f"global_attn = usp.LongContextAttention(mesh, causal={s.causal}{chunks})")
        return "\n".join(lines)

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict:
        return {
            "ulysses": self.ulysses, "ring": self.ring, "placement": self.placement,
            "world_size": self.world_size, "sequence_parallel_size": self.sequence_parallel_size,
            "data_parallel": self.data_parallel, "shape": self.shape.to_dict(),
            "topology": self.topology, "topology_source": self.topology_source, "kernel": self.kernel,
            "total_s": self.total, "forward": self.forward.to_dict(), "backward": self.backward.to_dict(),
            "memory": self.memory.to_dict(), "memory_limit_bytes": self.memory_limit,
            "forward_only": self.forward_only, "notes": list(self.notes), "head_chunks": self.head_chunks,
            "window_layers": None if self.window_layers is None else list(self.window_layers),
            "documents": self.documents,
            "why": self.explain(),
            "candidates": [c.to_dict() for c in self.candidates],
        }

    @classmethod
    def from_dict(cls, data: Any) -> "Plan":
        if not isinstance(data, dict):
            raise PlannerError(f"a plan must be a mapping, got {type(data).__name__}")
        try:
            placement = str(data["placement"])
            if placement not in PLACEMENTS:
                raise PlannerError(f"plan key 'placement': {placement!r} is not one of {', '.join(PLACEMENTS)}")
            return cls(
                ulysses=int(data["ulysses"]), ring=int(data["ring"]), placement=placement,
                world_size=int(data["world_size"]), sequence_parallel_size=int(data["sequence_parallel_size"]),
                shape=Shape.from_dict(data["shape"]), forward=PassCost.from_dict(data["forward"]),
                backward=PassCost.from_dict(data["backward"]), memory=MemoryCost.from_dict(data["memory"]),
                topology=str(data["topology"]), topology_source=data.get("topology_source"),
                kernel=str(data.get("kernel", "")), memory_limit=data.get("memory_limit_bytes"),
                forward_only=bool(data.get("forward_only", False)),
                candidates=[Candidate.from_dict(c) for c in data.get("candidates") or []],
                notes=list(data.get("notes") or []), head_chunks=int(data.get("head_chunks", 1)),
                window_layers=(None if data.get("window_layers") is None
                               else (int(data["window_layers"][0]), int(data["window_layers"][1]))),
                documents=data.get("documents"),
            )
        except KeyError as exc:
            raise PlannerError(f"plan is missing key {exc.args[0]!r}") from None

    def to_json(self, indent: Optional[int] = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as exc:
            raise PlannerError(f"plan JSON is malformed: {exc}") from None

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, width=120)

    @classmethod
    def from_yaml(cls, text: str) -> "Plan":
        try:
            return cls.from_dict(yaml.safe_load(text))
        except yaml.YAMLError as exc:
            raise PlannerError(f"plan YAML is malformed: {str(exc).splitlines()[0]}") from None


# ----------------------------------------------------------------------------------------------- inputs
@dataclass
class _Request:
    world_size: int
    sp_size: int
    shape: Shape
    topology: Topology
    topology_source: Optional[str]
    memory_limit: Optional[int]
    kernel: str
    forward_only: bool
    window_layers: Optional[Tuple[int, int]] = None
    documents: Optional[Any] = None  # planner.batch.Documents

    def layers(self) -> List[Tuple[str, int, Shape]]:
        """``[(kind, count, shape)]`` of the layer types priced: one layer, or the ``window_layers`` mix."""
        if tuple(self.shape.window) == (-1, -1):
            return [("global", 1, self.shape)]
        if self.window_layers is None:
            return [("windowed", 1, self.shape)]
        windowed, dense = self.window_layers
        return [(kind, n, shape) for kind, n, shape in (("windowed", windowed, self.shape),
                                                        ("global", dense, replace(self.shape, window=(-1, -1))))
                if n]


def _window(window: Any, causal: bool) -> Tuple[int, int]:
    """``window`` as ``window_size`` ``(left, right)``: an int ``W`` is the left window of a causal layer (each query
    sees itself and the ``W`` tokens before it: ``(W, 0)``); a pair is flash-attn's ``(left, right)`` (-1 =
    unbounded), the only form for non-causal (symmetric or not) windows."""
    if window is None:
        return (-1, -1)
    if isinstance(window, int) and not isinstance(window, bool):
        if window < 0:
            raise PlannerError(f"window={window} must be a left window in tokens >= 0 (each query sees itself and the "
                               "window tokens before it: window_size=(window, 0)), or a pair (left, right)")
        if not causal:
            raise PlannerError(f"window={window} with causal=False: give both sides, window=(left, right) "
                               "(flash-attn's window_size over global positions; -1 = unbounded)")
        return (window, 0)
    if (isinstance(window, (tuple, list)) and len(window) == 2
            and all(isinstance(x, int) and not isinstance(x, bool) and x >= -1 for x in window)):
        left, right = int(window[0]), int(window[1])
        if causal and right not in (0, -1):
            raise PlannerError(f"window={tuple(window)} with causal=True: a causal window has right = 0 (or -1); "
                               f"pass causal=False for a window that looks {right} tokens ahead")
        if causal:
            return (-1, -1) if left == -1 else (left, 0)  # causal (-1, 0) is plain causal: no window
        return (left, right)
    raise PlannerError(f"window must be a left window in tokens (an int >= 0) or a pair (left, right) of ints >= -1 "
                       f"(-1 = unbounded), got {window!r}")


def _window_layers(window_layers: Any, window: Tuple[int, int]) -> Optional[Tuple[int, int]]:
    """``(windowed, global)`` layer counts from a pair of ints or a ``"W:G"`` string, or None."""
    if window_layers is None:
        return None
    counts: Any = window_layers
    if isinstance(window_layers, str):
        parts = window_layers.split(":")
        try:
            counts = tuple(int(p) for p in parts) if len(parts) == 2 else None
        except ValueError:
            counts = None
    if (not isinstance(counts, (tuple, list)) or len(counts) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in counts) or sum(counts) == 0):
        raise PlannerError(f"window_layers must be 'W:G' (or a pair (W, G)): W windowed and G global layers, "
                           f"counts >= 0, not both 0 (e.g. '5:1'), got {window_layers!r}")
    if tuple(window) == (-1, -1):
        raise PlannerError(f"window_layers={window_layers!r} needs window=... (the window of the windowed layers)")
    return (int(counts[0]), int(counts[1]))


def _shape(seqlen: Any, heads: Any, kv_heads: Any, head_dim: Any, batch: Any, dtype: Any, causal: Any,
           window: Any = None) -> Shape:
    tokens = parse_seqlen(seqlen)
    heads = _positive_int("heads", heads)
    kv_heads = heads if kv_heads is None else _positive_int("kv_heads", kv_heads)
    if heads % kv_heads:
        raise PlannerError(f"heads={heads} is not divisible by kv_heads={kv_heads} (each KV head must serve a whole "
                           "number of query heads)")
    head_dim = _positive_int("head_dim", head_dim)
    batch = _positive_int("batch", batch)
    if not isinstance(causal, bool):
        raise PlannerError(f"causal must be True or False, got {causal!r}")
    return Shape(seqlen=tokens, heads=heads, kv_heads=kv_heads, head_dim=head_dim, batch=batch,
                 dtype=canonical_dtype(dtype), causal=causal, window=_window(window, causal))


def _request(world_size: Any, shape: Shape, topology: Any, memory_limit: Any, sequence_parallel_size: Any,
             kernel: Any, gpus_per_node: Any, forward_only: Any, window_layers: Any = None) -> _Request:
    world_size = _positive_int("world_size", world_size)
    sp = world_size if sequence_parallel_size is None else _positive_int("sequence_parallel_size",
                                                                          sequence_parallel_size)
    if world_size % sp:
        raise PlannerError(f"world_size={world_size} is not divisible by sequence_parallel_size={sp}; the "
                           "data-parallel degree world_size / sequence_parallel_size must be a whole number")
    if not isinstance(kernel, str):
        raise PlannerError(f"kernel must be a string ('auto' or a kernel name), got {kernel!r}")
    if not isinstance(forward_only, bool):
        raise PlannerError(f"forward_only must be True or False, got {forward_only!r}")
    source: Optional[str] = None
    if topology is None:
        source = DEFAULT_PRESET
    elif isinstance(topology, (str, os.PathLike)):
        source = os.fspath(topology)
    topo = load_topology(topology)
    if gpus_per_node is not None:
        topo = topo.with_gpus_per_host(gpus_per_node)
        source = None if source is None else _with_param(source, "gpus_per_host", gpus_per_node)
    limit = parse_memory_limit(memory_limit)
    if gpus_per_node is not None and world_size > gpus_per_node and world_size % gpus_per_node:
        raise PlannerError(f"gpus_per_node={gpus_per_node} does not divide world_size={world_size}: torchrun starts "
                           "the same number of ranks on every node; valid values: "
                           + ", ".join(str(d) for d in divisors(world_size)))
    if not (KERNEL_HEAD_DIMS[0] <= shape.head_dim <= KERNEL_HEAD_DIMS[1] and shape.head_dim % KERNEL_HEAD_DIMS[2] == 0) \
            and all(k.head_dim != shape.head_dim for k in topo.kernels):
        low, high, multiple = KERNEL_HEAD_DIMS
        raise PlannerError(f"head_dim={shape.head_dim} is not supported by any of usp's GPU attention kernels "
                           f"(fa4, fa2, cudnn, torch_flash: {low}..{high}, a multiple of {multiple}; usp/kernels) and "
                           f"topology {topo.name!r} has no kernel measured at it")
    topo.check_world(world_size)  # validates that the world fits the topology
    topo.kernel(kernel, shape.dtype, shape.head_dim)  # validates the kernel name
    mix = _window_layers(window_layers, shape.window)
    return _Request(world_size, sp, shape, topo, source, limit, kernel, forward_only, mix)


def _with_param(source: str, key: str, value: int) -> Optional[str]:
    if source.endswith((".yaml", ".yml")) or os.sep in source:
        return None  # a file with an override is not reproducible by name
    return f"{source}{',' if ':' in source else ':'}{key}={value}"


def _evaluate(model: CostModel, req: _Request, ulysses: int, ring: int, placement: str, kernel_profile,
              cap: float, head_chunks: Optional[int] = None) -> Candidate:
    """One candidate. ``head_chunks=None``: 1, or the smallest valid count that brings the peak under ``cap``."""
    shape = req.shape
    cand = Candidate(ulysses=ulysses, ring=ring, placement=placement, feasible=True)
    if shape.heads % ulysses:
        cand.feasible = False
        cand.reason = f"heads={shape.heads} is not divisible by ulysses={ulysses}"
        return cand
    kv = replicated_kv_heads(shape.kv_heads, ulysses)
    cand.kv_heads_used = kv
    if kv != shape.kv_heads:
        cand.notes.append(f"KV heads replicated {shape.kv_heads} -> {kv} for ulysses={ulysses}")
    options = head_chunk_options(shape.heads, shape.kv_heads, ulysses)
    if head_chunks is not None and head_chunks not in options:
        raise PlannerError(f"head_chunks={head_chunks} must divide the {shape.heads // ulysses} query and "
                           f"{kv // ulysses} K/V heads per Ulysses rank; valid values: {options}")
    if req.documents is not None:  # a packed batch: padded per document, no length constraint
        from .batch import evaluate_batch

        cand.forward, cand.backward, cand.memory, cost = evaluate_batch(
            model, shape, req.documents, ulysses, ring, placement, kernel_profile, head_chunks or 1)
        cand.head_chunks = head_chunks or 1
        cand.batch = cost.to_dict()
        if cand.memory.peak > cap:
            cand.feasible = False
            cand.reason = f"needs {format_bytes(cand.memory.peak)} per GPU > limit {format_bytes(cap)}"
        return cand
    multiple = required_seqlen_multiple(ulysses, ring, shape.causal)
    if shape.seqlen % multiple and tuple(shape.window) != (-1, -1):  # a window's pieces need whole shards
        cand.feasible = False
        cand.reason = (f"seqlen={shape.seqlen} is not a multiple of {multiple} "
                       f"({'causal zigzag needs lcm(2R, R*U)' if shape.causal and ring > 1 else 'needs U*R'})")
        return cand
    for chunks in [head_chunks] if head_chunks is not None else options:
        costs = [(kind, n, model.evaluate(layer, ulysses, ring, placement, kernel_profile, chunks))
                 for kind, n, layer in req.layers()]
        cand.forward = PassCost.combine([(n, c[0]) for _, n, c in costs])
        cand.backward = PassCost.combine([(n, c[1]) for _, n, c in costs])
        cand.memory = max((c[2] for _, _, c in costs), key=lambda m: m.peak)  # one layer at a time
        cand.layers = ([{"kind": kind, "count": n, "forward": c[0], "backward": c[1]} for kind, n, c in costs]
                       if req.window_layers is not None else [])
        if len(costs) == 1 and costs[0][1] == 1:  # one layer: its own costs, as before
            cand.forward, cand.backward = costs[0][2][0], costs[0][2][1]
        cand.head_chunks = chunks
        if cand.memory.peak <= cap:
            break
    if cand.head_chunks > 1 and head_chunks is None:
        cand.notes.append(f"head_chunks={cand.head_chunks}: the ring runs once per 1/{cand.head_chunks} of the "
                          "heads so that its working memory fits")
    if shape.seqlen % multiple:
        why = "causal zigzag needs lcm(2R, R*U)" if shape.causal and ring > 1 else "needs U*R"
        cand.feasible = False
        cand.reason = f"seqlen={shape.seqlen} is not a multiple of {multiple} ({why})"
    elif cand.memory.peak > cap:
        cand.feasible = False
        cand.reason = f"needs {format_bytes(cand.memory.peak)} per GPU > limit {format_bytes(cap)}"
    return cand


def _placements(ulysses: int, ring: int) -> Tuple[str, ...]:
    return PLACEMENTS if ulysses > 1 and ring > 1 else PLACEMENTS[:1]


#: Predictions closer than this (relative) are a tie: the model cannot tell them apart (its inputs are measured or
#: published numbers good to a few percent). Ties go to the split whose all-to-all stays inside one host, then to
#: ulysses_inner ("head-first": benchmarks/RESULTS.md reference measurements, LoongTrain, yunchang use_ulysses_low, Megatron hierarchical CP).
TIE_TOLERANCE = 0.01


def equivalent(a: Candidate, b: Candidate) -> bool:
    """Same split, same predictions, same memory and verdict: two placements the model cannot tell apart (on one
    host, ``ulysses_inner`` and ``ring_inner`` of a split often load the same links the same way)."""
    if (a.ulysses, a.ring, a.feasible, a.reason, a.head_chunks) != (b.ulysses, b.ring, b.feasible, b.reason,
                                                                     b.head_chunks):
        return False
    if a.forward is None or b.forward is None:
        return a.forward is b.forward

    def close(x: float, y: float) -> bool:
        return abs(x - y) <= 1e-9 * max(abs(x), abs(y))

    return (close(a.forward.total, b.forward.total) and close(a.backward.total, b.backward.total)
            and close(a.memory.peak, b.memory.peak))


def _time(c: Candidate, forward_only: bool) -> float:
    return c.forward.total if forward_only else c.total


def _rank_key(c: Candidate, forward_only: bool) -> tuple:
    return (round(_time(c, forward_only), 12), PLACEMENTS.index(c.placement), -c.ulysses)


def _break_ties(ranked: List[Candidate], model: CostModel, forward_only: bool) -> Tuple[List[Candidate], List[str]]:
    """Move the preferred candidate among those within TIE_TOLERANCE of the fastest to the front."""
    if len(ranked) < 2:
        return ranked, []
    fastest = _time(ranked[0], forward_only)
    tied = [c for c in ranked if _time(c, forward_only) <= fastest * (1 + TIE_TOLERANCE)]

    def preference(c: Candidate) -> tuple:
        crosses_hosts = model.ulysses_hosts(c.ulysses, c.ring, c.placement)[1]
        return (crosses_hosts, PLACEMENTS.index(c.placement), _time(c, forward_only))

    pick = min(tied, key=preference)
    if pick is ranked[0]:
        return ranked, []
    note = (f"{pick.label} {pick.placement} is within {TIE_TOLERANCE:.0%} of the fastest ({ranked[0].label} "
            f"{ranked[0].placement}, {100 * (_time(pick, forward_only) / fastest - 1):.2f}% faster): a tie for this "
            "model, given to the split whose all-to-all stays inside a host / head-first placement")
    return [pick] + [c for c in ranked if c is not pick], [note]


def _search(req: _Request, model: Optional[CostModel] = None) -> Plan:
    model = model or CostModel(req.topology, req.world_size, req.sp_size)
    profile, notes = req.topology.kernel(req.kernel, req.shape.dtype, req.shape.head_dim)
    cap = req.memory_limit if req.memory_limit is not None else req.topology.gpu_memory
    cands = [_evaluate(model, req, u, req.sp_size // u, pl, profile, cap)
             for u in divisors(req.sp_size) for pl in _placements(u, req.sp_size // u)]
    feasible = sorted((c for c in cands if c.feasible), key=lambda c: _rank_key(c, req.forward_only))
    feasible, tie_notes = _break_ties(feasible, model, req.forward_only)
    notes = notes + tie_notes
    rejected = [c for c in cands if not c.feasible]
    if not feasible:
        memory_only = [c for c in rejected if c.reason and c.reason.startswith("needs ")]
        if memory_only:
            smallest = min(memory_only, key=lambda c: c.memory.peak)
            what = "memory_limit" if req.memory_limit is not None else "the GPU memory"
            raise PlannerError(f"{what} of {format_bytes(cap)} is too small: the smallest candidate "
                               f"({smallest.label} {smallest.placement}) needs {format_bytes(smallest.memory.peak)} "
                               "per GPU")
        by_reason: dict = {}
        for c in rejected:  # both placements of a split fail for the same reason: say it once
            labels = by_reason.setdefault(c.reason, [])
            if c.label not in labels:
                labels.append(c.label)
        reasons = "; ".join(f"{', '.join(labels)}: {reason}" for reason, labels in by_reason.items())
        raise PlannerError(f"no Ulysses x ring split of {req.sp_size} GPUs works for this shape: {reasons}")
    best = feasible[0]
    return Plan(ulysses=best.ulysses, ring=best.ring, placement=best.placement, world_size=req.world_size,
                sequence_parallel_size=req.sp_size, shape=req.shape, forward=best.forward, backward=best.backward,
                memory=best.memory, topology=req.topology.name, topology_source=req.topology_source,
                kernel=profile.name, memory_limit=req.memory_limit, forward_only=req.forward_only,
                candidates=feasible + rejected,
                notes=notes + best.notes, head_chunks=best.head_chunks, window_layers=req.window_layers,
                documents=None if req.documents is None else req.documents.to_dict())


# ----------------------------------------------------------------------------------------------- public API
def plan(world_size: int, seqlen: Union[int, str], heads: int, kv_heads: Optional[int] = None, head_dim: int = 128,
         batch: int = 1, dtype: Any = "bfloat16", causal: bool = True,
         topology: Union[None, str, os.PathLike, Topology] = None,
         memory_limit: Union[None, int, str] = None, *, sequence_parallel_size: Optional[int] = None,
         kernel: str = "auto", gpus_per_node: Optional[int] = None, forward_only: bool = False,
         window: Union[None, int, Tuple[int, int]] = None,
         window_layers: Union[None, str, Tuple[int, int]] = None, cu_seqlens: Any = None, doc_lengths: Any = None,
         histogram: Any = None) -> Plan:
    """Choose the Ulysses x ring split for one attention layer (or a mix of windowed and global layers).

    Args:
        world_size: ranks in the job.
        seqlen: global sequence length in tokens (int, or "128k", "1M").
        heads, kv_heads: query and KV heads (``kv_heads`` defaults to ``heads``; must divide it).
        head_dim, batch: per-head dimension and micro-batch size.
        dtype: input dtype, a ``torch.dtype`` (e.g. ``torch.bfloat16``, the default) or its name.
        causal: causal mask (zigzag layout when the ring degree is > 1).
        topology: ``None`` (the default preset, ``dgx-h100-cluster``: as many DGX-H100-like nodes as needed),
            a preset name (``planner.list_presets()``, optionally ``NAME:hosts=N``), a YAML path (e.g. written by
            ``usp-plan probe``) or a :class:`Topology`.
        memory_limit: cap on the predicted peak attention memory per GPU: bytes (int) or a string ("40GiB");
            default the topology's GPU memory.
        sequence_parallel_size: ``U * R``; default ``world_size`` (the rest is data parallel).
        kernel: which kernel's rates to use ("auto" = the fastest the topology lists).
        gpus_per_node: override the topology's GPUs per host (compact topologies only).
        forward_only: minimise the forward time (inference / prefill) instead of forward + backward.
        window: a sliding window. An int ``W`` is a causal layer's left window in tokens: each query sees itself
            and the ``W`` tokens before it, ``window_size=(W, 0)`` (Mistral's ``sliding_window=4096`` is
            ``W=4095``). A pair is ``window_size=(left, right)`` (flash-attn's meaning, -1 = unbounded): the form for
            non-causal windows, symmetric or not (an int with ``causal=False`` is refused as ambiguous). Priced
            with the blocks the window skips and only the halo rows exchanged (``usp.spec.SlidingWindow``).
        window_layers: a model that mixes windowed and global (dense) layers: ``"W:G"`` or ``(W, G)``, ``W``
            windowed and ``G`` global layers (counts: the model's own, e.g. ``"40:8"``, or a ratio, ``"5:1"``; the
            order of the layers does not matter). The plan's ``forward``/``backward`` are then the sum over those
            ``W + G`` layers (per layer type in each candidate's ``layers``), memory the larger layer's.
        cu_seqlens, doc_lengths, histogram: a packed batch of documents (at most one of them: ``cu_seqlens`` as
            ``usp.long_context_attention_varlen`` takes it, a list of document lengths, or a histogram file /
            ``{length: count}`` mapping; ``planner.batch``). The layer is then priced as the packed path runs it:
            per-document padding, each ring block's varlen calls on every document's chunks, the slowest rank
            (each candidate's ``batch``). ``seqlen`` may be None (the batch's total; if given it must match).

    Returns the fastest feasible :class:`Plan`. Raises ``ValueError`` (:class:`PlannerError`) with one line naming
    the bad argument, or saying why nothing fits.
    """
    seqlen, docs = _documents(seqlen, window, batch, cu_seqlens, doc_lengths, histogram)
    shape = _shape(seqlen, heads, kv_heads, head_dim, batch, dtype, causal, window)
    req = _request(world_size, shape, topology, memory_limit, sequence_parallel_size, kernel, gpus_per_node,
                   forward_only, window_layers)
    req.documents = docs
    return _search(req)


def _documents(seqlen: Any, window: Any, batch: Any, cu_seqlens: Any, doc_lengths: Any,
               histogram: Any) -> Tuple[Any, Any]:
    """``(seqlen, planner.batch.Documents or None)``: the packed batch given, checked against ``seqlen``."""
    if cu_seqlens is None and doc_lengths is None and histogram is None:
        return seqlen, None
    from .batch import documents

    docs = documents(cu_seqlens=cu_seqlens, lengths=doc_lengths, histogram=histogram)
    if window is not None:
        raise PlannerError("window with documents: sliding windows over packed documents are not priced yet; "
                           "plan the batch without window=")
    if batch != 1:
        raise PlannerError(f"batch={batch} with documents: a packed batch is one row (batch=1)")
    if seqlen is not None and parse_seqlen(seqlen) != docs.total:
        raise PlannerError(f"seqlen={seqlen} does not match the documents' total of {docs.total} tokens; pass "
                           "seqlen=None")
    return docs.total, docs


def predict(ulysses: int, ring: int, seqlen: Union[int, str], heads: int, kv_heads: Optional[int] = None,
            head_dim: int = 128, batch: int = 1, dtype: Any = "bfloat16", causal: bool = True,
            placement: str = "ulysses_inner", topology: Union[None, str, os.PathLike, Topology] = None,
            world_size: Optional[int] = None, memory_limit: Union[None, int, str] = None, *,
            kernel: str = "auto", gpus_per_node: Optional[int] = None, head_chunks: Optional[int] = 1,
            window: Union[None, int, Tuple[int, int]] = None,
            window_layers: Union[None, str, Tuple[int, int]] = None, cu_seqlens: Any = None,
            doc_lengths: Any = None, histogram: Any = None) -> Candidate:
    """Predict one fixed split (for comparing measured against predicted). ``world_size`` defaults to ``U*R``;
    ``head_chunks`` as passed to the attention (``None``: the smallest that fits the memory cap, as ``plan`` does);
    ``window``, ``window_layers`` and the packed batch (``cu_seqlens``, ``doc_lengths``, ``histogram``) as for
    :func:`plan`.

    Returns a :class:`Candidate` (``forward``, ``backward``, ``memory``, ``total``); ``feasible`` is False with a
    ``reason`` when the split breaks a constraint (its costs are still filled in unless the heads do not divide).
    """
    ulysses = _positive_int("ulysses", ulysses)
    ring = _positive_int("ring", ring)
    placement = _placement(placement)
    sp = ulysses * ring
    world_size = sp if world_size is None else world_size
    seqlen, docs = _documents(seqlen, window, batch, cu_seqlens, doc_lengths, histogram)
    shape = _shape(seqlen, heads, kv_heads, head_dim, batch, dtype, causal, window)
    req = _request(world_size, shape, topology, memory_limit, sp, kernel, gpus_per_node, False, window_layers)
    req.documents = docs
    profile, notes = req.topology.kernel(req.kernel, req.shape.dtype, req.shape.head_dim)
    cap = req.memory_limit if req.memory_limit is not None else req.topology.gpu_memory
    cand = _evaluate(CostModel(req.topology, req.world_size, sp), req, ulysses, ring, placement, profile, cap,
                     head_chunks)
    cand.notes = notes + cand.notes
    return cand


def _placement(value: Any) -> str:
    """A placement name from a string, an alias ("head_first") or a ``usp.mesh.Placement``."""
    try:
        return spec.Placement.parse(value).value
    except ValueError as exc:
        raise PlannerError(str(exc)) from None


def sweep(seqlens: Iterable[Union[int, str]], world_size: int, heads: int, kv_heads: Optional[int] = None,
          head_dim: int = 128, batch: int = 1, dtype: Any = "bfloat16", causal: bool = True,
          topology: Union[None, str, os.PathLike, Topology] = None, memory_limit: Union[None, int, str] = None, *,
          sequence_parallel_size: Optional[int] = None, kernel: str = "auto", gpus_per_node: Optional[int] = None,
          forward_only: bool = False, window: Union[None, int, Tuple[int, int]] = None,
          window_layers: Union[None, str, Tuple[int, int]] = None) -> List[Tuple[int, Union[Plan, PlannerError]]]:
    """``plan`` for each sequence length: ``[(seqlen, Plan or PlannerError)]``. A length with no feasible split
    gives its error in place (the sweep goes on); bad arguments other than the lengths raise."""
    lengths = [parse_seqlen(v, "sweep") for v in seqlens]
    if not lengths:
        raise PlannerError("sweep needs at least one sequence length")
    req = _request(world_size, _shape(lengths[0], heads, kv_heads, head_dim, batch, dtype, causal, window), topology,
                   memory_limit, sequence_parallel_size, kernel, gpus_per_node, forward_only, window_layers)
    model = CostModel(req.topology, req.world_size, req.sp_size)
    out: List[Tuple[int, Union[Plan, PlannerError]]] = []
    for tokens in lengths:
        req.shape = replace(req.shape, seqlen=tokens)
        try:
            out.append((tokens, _search(req, model)))
        except PlannerError as exc:
            out.append((tokens, exc))
    return out


def default_sweep_lengths(seqlen: Optional[int], multiple: int = 1) -> List[int]:
    """Powers of two from 8K up to ``seqlen`` (default 1M), plus ``seqlen`` itself, rounded down to ``multiple``."""
    top = seqlen or 1024**2
    lengths, n = [], 8 * 1024
    while n < top:
        lengths.append(n)
        n *= 2
    lengths.append(top)
    return sorted({max(multiple, (x // multiple) * multiple) for x in lengths})
