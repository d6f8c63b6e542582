"""What the benchmark harness measures: the suites, their configurations and tasks, and the time a task will take.

``build_tasks`` turns a suite (and the command line's overrides) into the ordered task list the runner executes;
``Estimator`` predicts each task's wall time (for ``--dry-run`` and the ``--max-seconds`` budget) with the same
iteration-count rule as the timing loop (``bench_runtime.timed``). No torch: the dry run needs no GPU.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Dict, List, Optional, Sequence, Tuple

import bench_common as bc



@dataclasses.dataclass(frozen=True)
class Suite:
    """A named list of configurations and what to measure on each."""

    description: str
    seqlens: Tuple[int, ...]
    heads: Tuple[Tuple[int, int], ...]  #: (query heads, KV heads)
    head_dim: int = 128
    causal: Tuple[bool, ...] = (True, False)
    modes: Tuple[str, ...] = ("fwd", "fwdbwd")
    methods: Tuple[str, ...] = ("kernel_full", "kernel_local", "usp", "cp_allgather", "cp_alltoall")
    cp_mha_only: bool = False
    warmup: Optional[int] = None  #: None: 1
    repeats: Optional[int] = None  #: None: auto (probe + target seconds, 3..10)
    stop_after_failure: bool = False  #: skip larger sequences of a method once it ran out of memory
    prewarm_seqlen: Optional[int] = None  #: one untimed fwd+bwd per mesh at this length first (JIT, plans)
    dtype: str = "bfloat16"
    batch: int = 1
    check_seqlen_max: Optional[int] = None  #: --check skips sequences longer than this


K, M = 1024, 1024 * 1024

SUITES: Dict[str, Suite] = {
    "smoke": Suite(
        "tiny shapes for CPU/gloo: every code path, timings meaningless",
        seqlens=(64, 128), heads=((4, 4), (4, 2)), head_dim=16,
    ),
    "targets": Suite(
        "issue 4 item 3: 32K/64K/128K, MHA 32 and GQA 32/8, d=128, causal and not; usp 1x2 and 2x1 vs PyTorch CP "
        "(both rotate methods) vs the kernel on 1 GPU (full sequence and local shard)",
        seqlens=(32 * K, 64 * K, 128 * K), heads=((32, 32), (32, 8)),
    ),
    "scale": Suite(
        "issue 4 item 5: longest causal GQA 32/8 d=128 fwd+bwd on the GPUs; one timed iteration per length, "
        "ascending, a mesh stops at its first failure (OOM); peak memory vs the analytic minimum",
        seqlens=(1 * M, 3 * M // 2, 2 * M), heads=((32, 8),), causal=(True,), modes=("fwdbwd",),
        methods=("usp",), warmup=0, repeats=1, stop_after_failure=True, prewarm_seqlen=16 * K,
        check_seqlen_max=256 * K,
    ),
    "planner": Suite(
        "issue 3 item 9: measured side of the planner accuracy table; usp 1x2 and 2x1 at 16K..256K, heads 32 with "
        "kv_heads 32 and 8, causal and not",
        seqlens=(16 * K, 32 * K, 64 * K, 128 * K, 256 * K), heads=((32, 32), (32, 8)), methods=("usp",),
    ),
}

METHOD_NAMES = ("kernel_full", "kernel_local", "usp", "cp_allgather", "cp_alltoall")


@dataclasses.dataclass(frozen=True)
class Config:
    seqlen: int
    heads: int
    kv_heads: int
    head_dim: int
    causal: bool
    dtype: str
    batch: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        return (f"s={bc.format_tokens(self.seqlen)} h={self.heads}/{self.kv_heads} d={self.head_dim} "
                f"{'causal' if self.causal else 'non-causal'}")


@dataclasses.dataclass
class Task:
    """One unit of work: a correctness check or one measurement (or an unrecorded pre-warm)."""

    kind: str  #: "check", "kernel_full", "kernel_local", "usp", "torch_cp", "prewarm"
    config: Config
    mode: str = "fwdbwd"
    mesh: Optional[Tuple[int, int]] = None  #: (U, R) for usp/prewarm
    rotate: Optional[str] = None  #: for torch_cp
    gpus: int = 1
    kernel: Optional[str] = None  #: kernel_full/kernel_local with another kernel than --backend's (CP's baseline)

    @property
    def variant(self) -> str:
        if self.mesh is not None:
            return f"{self.mesh[0]}x{self.mesh[1]}"
        return self.rotate or ""

    @property
    def label(self) -> str:
        which = f" {self.kernel}" if self.kernel else ""
        return {
            "kernel_full": f"kernel{which} 1 GPU (full)",
            "kernel_local": f"kernel{which} 1 GPU (s/{self.gpus})",
            "usp": f"usp {self.variant}",
            "torch_cp": f"torch CP {self.variant}",
            "check": "check",
            "prewarm": f"pre-warm usp {self.variant}",
        }[self.kind]

    @property
    def family(self) -> tuple:
        """Same method on the same head/causal configuration (for stop-after-failure and time estimates)."""
        c = self.config
        return (self.kind, self.variant, self.kernel, self.mode, c.heads, c.kv_heads, c.head_dim, c.causal, c.dtype,
                c.batch)


def build_tasks(suite: Suite, args, world_size: int, meshes: Sequence[Tuple[int, int]],
                cp_kernels: Sequence[str] = ()) -> List[Task]:
    """The ordered task list: for each head config, causal flag, sequence length (ascending): check, then methods.

    ``cp_kernels``: kernels other than ``--backend``'s that PyTorch CP runs (cuDNN when usp runs FA4); the 1-GPU
    baselines are measured for them too, on configurations where CP runs, so that CP's E uses its own kernel.
    """
    tasks: List[Task] = []
    methods = args.methods or suite.methods
    shard_gpus = world_size if world_size > 1 else args.shard_gpus
    for heads, kv_heads in args.heads_list or suite.heads:
        for causal in args.causal_list if args.causal_list is not None else suite.causal:
            prewarm = args.prewarm_seqlen if args.prewarm_seqlen is not None else suite.prewarm_seqlen
            if prewarm and "usp" in methods and world_size > 1:
                pre = Config(prewarm, heads, kv_heads, args.head_dim or suite.head_dim, causal,
                             args.dtype or suite.dtype, args.batch or suite.batch)
                tasks += [Task("prewarm", pre, "fwdbwd", mesh=m, gpus=world_size) for m in meshes]
            for seqlen in sorted(args.seqlens or suite.seqlens):
                cfg = Config(seqlen, heads, kv_heads, args.head_dim or suite.head_dim, causal,
                             args.dtype or suite.dtype, args.batch or suite.batch)
                cp_here = world_size > 1 and not ((args.cp_mha_only or suite.cp_mha_only) and heads != kv_heads)
                if args.check and world_size > 1 and (suite.check_seqlen_max is None
                                                      or seqlen <= suite.check_seqlen_max):
                    tasks.append(Task("check", cfg, gpus=world_size))
                for mode in args.modes or suite.modes:
                    for method in methods:
                        extra = list(cp_kernels) if cp_here and any(m.startswith("cp_") for m in methods) else []
                        if method == "kernel_full":
                            tasks += [Task("kernel_full", cfg, mode, gpus=1, kernel=k) for k in [None] + extra]
                        elif method == "kernel_local":
                            tasks += [Task("kernel_local", cfg, mode, gpus=shard_gpus, kernel=k)
                                      for k in [None] + extra]
                        elif method == "usp" and world_size > 1:
                            tasks += [Task("usp", cfg, mode, mesh=m, gpus=world_size) for m in meshes]
                        elif method.startswith("cp_") and cp_here:
                            tasks.append(Task("torch_cp", cfg, mode, rotate=method[3:], gpus=world_size))
    return tasks


# --------------------------------------------------------------------------------------------------- estimates


class Estimator:
    """Predicts a task's wall time: from measured iterations of the same family (scaled by s²), else nominal rates."""

    def __init__(self, kernel_name: str, warmup: Optional[int], repeats: Optional[int], target_seconds: float):
        self.kernel_name = kernel_name
        self.warmup = warmup
        self.repeats = repeats
        self.target = target_seconds
        self.seen: Dict[tuple, List[Tuple[int, float]]] = {}

    def observe(self, task: Task, seconds_per_iteration: float) -> None:
        self.seen.setdefault(task.family, []).append((task.config.seqlen, seconds_per_iteration))

    def iteration(self, task: Task) -> float:
        c = task.config
        known = [(s, t) for s, t in self.seen.get(task.family, []) if s <= c.seqlen]
        if known:
            s0, t0 = max(known)
            return t0 * (c.seqlen / s0) ** 2
        if task.kind == "check":
            one = bc.estimate_iteration_seconds(self.kernel_name, c.batch, c.heads, c.seqlen, c.head_dim, c.causal,
                                                "fwdbwd", 1)
            return one
        seqlen = c.seqlen // task.gpus if task.kind == "kernel_local" else c.seqlen
        gpus = 1 if task.kind.startswith("kernel") else task.gpus
        return bc.estimate_iteration_seconds(task.kernel or self.kernel_name, c.batch, c.heads, seqlen, c.head_dim,
                                             c.causal, task.mode, gpus)

    def iterations(self, seconds_per_iteration: float) -> int:
        warm = 1 if self.warmup is None else self.warmup
        if self.repeats is not None:
            return warm + self.repeats
        probe_kept = seconds_per_iteration >= 0.2
        n = min(10, max(3, math.ceil(self.target / max(seconds_per_iteration, 1e-6))))
        return warm + n + (0 if probe_kept else 1)

    def task_seconds(self, task: Task, meshes: int = 2, cp_variants: int = 2) -> float:
        one = self.iteration(task)
        if task.kind == "check":
            # reference fwd+bwd on the full sequence + every mesh and CP variant once (~1 iteration each) + gathers
            return one * (1 + meshes + cp_variants) * 1.3
        if task.kind == "prewarm":
            return one + 5.0  # plus a possible JIT compile
        return one * self.iterations(one) + 0.2


def default_meshes(world: int, heads: int) -> List[Tuple[int, int]]:
    """Every U x R = world with U dividing the query heads, ring-heavy first (1xP, ..., Px1)."""
    return [(u, world // u) for u in range(1, world + 1) if world % u == 0 and heads % u == 0]
