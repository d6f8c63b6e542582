"""Benchmark harness for usp attention vs the same kernel on one GPU vs PyTorch's native context parallel.

Run (see README.md in this folder for every suite and column)::

    torchrun --nproc-per-node 2 benchmarks/bench_attention.py --suite targets --out benchmarks/results
    torchrun --nproc-per-node 2 benchmarks/bench_attention.py --device cpu --backend reference --suite smoke \
        --out /tmp/b
    python benchmarks/bench_attention.py --suite targets --dry-run       # the task list and estimated GPU time

What one run does, per configuration (seqlen, heads/kv_heads, head_dim, causal, dtype, batch) and mode (forward,
forward+backward), in this order:

1. ``--check``: usp's output and gradients (every mesh) and PyTorch CP's (every rotate method) against the single-GPU
   kernel on the gathered sequence; a method that fails is still timed but its records carry the failed check, and
   the report never shows such a time (``--skip-failed-check``: not timed at all, status ``check_failed``).
2. ``kernel_full``: the kernel alone on one GPU over the full sequence (rank 0; the other ranks wait), skipped when the
   estimated memory does not fit; ``kernel_local``: the same on the local shard length ``s / P``.
3. ``usp``: ``long_context_attention`` on every mesh ``UxR`` (``SequenceParallelMesh(ulysses=U, ring=R)``).
4. ``torch_cp``: PyTorch's ``context_parallel`` with each rotate method, cuDNN SDPA forced (``torch_cp.py``).

Timing: CUDA events around one iteration, all ranks started together (barrier + synchronize before each), per
iteration the slowest rank's time, the median over iterations. Iterations: ``--warmup`` untimed (default 1), then,
unless ``--repeats`` is given, one probe iteration (kept as a sample when it takes ≥ 0.2 s, else treated as one more
warm-up) and enough more for ``--target-seconds`` of samples, between 3 and 10. Peak memory: ``max_memory_allocated``
reset before each measurement (inputs included; they are allocated before the reset). Every record is appended to a
JSON Lines file as soon as it exists, so a run cut short keeps what it measured.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import gc
import json
import math
import os
import platform
import shlex
import socket
import subprocess
import sys
import time
import traceback
import uuid
from typing import Callable, Dict, List, Optional, Sequence, Tuple

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
for _path in (_HERE, _ROOT):  # bench_common/torch_cp/report next to this file; usp from the checkout
    if _path not in sys.path:
        sys.path.insert(0, _path)

import bench_common as bc  # noqa: E402

# --------------------------------------------------------------------------------------------------- suites


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
    """Predicts a task's wall time: from measured iterations of the same family (scaled by s²), else FACTS rates."""

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


# --------------------------------------------------------------------------------------------------- runtime

_torch = None


def _t():
    global _torch
    if _torch is None:
        import torch

        _torch = torch
    return _torch


class DistContext:
    """Process group, device, and the few collectives the harness itself needs."""

    def __init__(self, device_type: str, timeout_s: float):
        torch = _t()
        import torch.distributed as dist

        self.dist = dist
        launched = "WORLD_SIZE" in os.environ and "RANK" in os.environ
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device_type == "cuda":
            if not torch.cuda.is_available():
                raise SystemExit("--device cuda but no CUDA device is visible (use --device cpu --backend reference)")
            torch.cuda.set_device(local_rank)
            self.device = torch.device("cuda", local_rank)
            os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # FACTS.md: NVLink multicast must stay off
        else:
            self.device = torch.device("cpu")
        self.initialized_here = False
        if launched and not dist.is_initialized():
            kwargs = {"timeout": _dt.timedelta(seconds=timeout_s)}
            if device_type == "cuda":
                kwargs["device_id"] = self.device
            dist.init_process_group("nccl" if device_type == "cuda" else "gloo", **kwargs)
            self.initialized_here = True
        self.active = dist.is_initialized()
        self.rank = dist.get_rank() if self.active else 0
        self.world = dist.get_world_size() if self.active else 1

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            _t().cuda.synchronize(self.device)

    def barrier(self) -> None:
        if self.active and self.world > 1:
            self.dist.barrier()

    def max_float(self, value: float) -> float:
        if not self.active or self.world == 1:
            return value
        torch = _t()
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        self.dist.all_reduce(t, op=self.dist.ReduceOp.MAX)
        return float(t.item())

    def from_rank0(self, obj):
        if not self.active or self.world == 1:
            return obj
        box = [obj]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj) -> list:
        if not self.active or self.world == 1:
            return [obj]
        out = [None] * self.world
        self.dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self.active and self.initialized_here:
            self.barrier()
            self.dist.destroy_process_group()


def _is_oom(exc: BaseException) -> bool:
    torch = _t()
    oom_types = tuple(t for t in (getattr(torch, "OutOfMemoryError", None),
                                  getattr(torch.cuda, "OutOfMemoryError", None)) if t is not None)
    return isinstance(exc, oom_types) or "out of memory" in str(exc).lower()


def environment(ctx: DistContext, kernel_name: str) -> dict:
    torch = _t()
    info = {
        "hostname": socket.gethostname(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": None,
        "nccl": None,
        "device_name": "cpu",
        "device_count": 0,
        "world_size": ctx.world,
        "NCCL_NVLS_ENABLE": os.environ.get("NCCL_NVLS_ENABLE"),
        "kernel": kernel_name,
    }
    if ctx.cuda:
        info["device_name"] = torch.cuda.get_device_name(ctx.device)
        info["device_count"] = torch.cuda.device_count()
        info["cudnn"] = torch.backends.cudnn.version()
        try:
            version = torch.cuda.nccl.version()
            info["nccl"] = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
        except Exception:  # NCCL missing from this build
            pass
    else:
        info["device_name"] = f"cpu ({platform.machine()}, {os.cpu_count()} cores)"
    try:
        from importlib import metadata

        for dist_name in ("flash-attn-4", "flash_attn_4", "flash-attn"):
            try:
                info["flash_attn"] = f"{dist_name} {metadata.version(dist_name)}"
                break
            except metadata.PackageNotFoundError:
                continue
    except Exception:
        pass
    try:
        import usp

        info["usp"] = usp.__version__
        if ctx.cuda:  # build csrc/ now, outside any timed region, and record whether the fused merge is in use
            from usp._csrc import fused_merge_op, fused_merge_status

            fused_merge_op()
            info["fused_merge"] = fused_merge_status()
    except Exception:
        pass
    try:
        commit = subprocess.run(["git", "-C", _ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=5)
        if commit.returncode == 0:
            info["git_commit"] = commit.stdout.strip()
            dirty = subprocess.run(["git", "-C", _ROOT, "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=5)
            info["git_dirty"] = bool(dirty.stdout.strip()) if dirty.returncode == 0 else None
    except Exception:
        pass
    return info


def command_line(world: int) -> str:
    argv = [os.path.relpath(sys.argv[0])] + sys.argv[1:]
    if "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_WORLD_SIZE" in os.environ:
        return shlex.join(["torchrun", f"--nproc-per-node={world}"] + argv)
    return shlex.join(["python"] + argv)


# --------------------------------------------------------------------------------------------------- runner


class Runner:
    def __init__(self, args, suite: Suite, ctx: DistContext, kernel, meshes, cp, run_info: dict, out_path: str):
        self.args = args
        self.suite = suite
        self.ctx = ctx
        self.kernel = kernel
        self.kernels = {kernel.name: kernel}  # + CP's baseline kernel, added by main()
        self.meshes = meshes  # {(U, R): SequenceParallelMesh}
        self.cp = cp  # TorchContextParallel or None
        self.run_info = run_info
        self.out_path = out_path
        self.records: List[dict] = []
        self.seq = 0
        self.warmup = args.warmup if args.warmup is not None else suite.warmup
        self.repeats = args.repeats if args.repeats is not None else suite.repeats
        self.estimator = Estimator(kernel.name, self.warmup, self.repeats, args.target_seconds)
        self.failed_families: set = set()
        self.check_results: Dict[tuple, dict] = {}
        self.cp_gqa_mode: Dict[tuple, str] = {}  # (heads, kv) -> "native" | "expand"
        self.start = time.monotonic()
        self._file = open(out_path, "a", encoding="utf-8") if ctx.rank == 0 else None

    # ---------------------------------------------------------------- helpers
    def log(self, message: str) -> None:
        if self.ctx.rank == 0:
            print(f"[{time.monotonic() - self.start:7.1f}s] {message}", flush=True)

    def dtype(self, cfg: Config):
        return getattr(_t(), cfg.dtype)

    def scale(self, cfg: Config) -> float:
        return cfg.head_dim ** -0.5

    def randn(self, shape, cfg: Config, seed: int):
        torch = _t()
        g = torch.Generator(device=self.ctx.device)
        g.manual_seed(seed)
        return torch.randn(shape, generator=g, device=self.ctx.device, dtype=self.dtype(cfg))

    def maybe_simulate_oom(self, cfg: Config) -> None:
        """--simulate-oom-above (tests): fail like an allocation would, to exercise the OOM path on CPU."""
        limit = self.args.simulate_oom_above
        if limit is not None and cfg.seqlen > limit:
            torch = _t()
            oom = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
            raise oom(f"simulated: seqlen {cfg.seqlen} > --simulate-oom-above {limit}")

    def free(self) -> None:
        gc.collect()
        if self.ctx.cuda:
            _t().cuda.empty_cache()

    def write(self, record: dict) -> None:
        self.seq += 1
        record = {"seq": self.seq, **record, "run": self.run_info}
        self.records.append(record)
        if self._file is not None:
            self._file.write(json.dumps(record, default=str) + "\n")
            self._file.flush()

    def base_record(self, task: Task) -> dict:
        cfg = task.config
        kernel = task.kernel or self.kernel.name
        if task.kind == "torch_cp" and self.cp is not None:
            kernel = self.cp.kernel_name or f"sdpa:{self.cp.sdpa_backend}"
        seqlen_local = cfg.seqlen // task.gpus if task.kind != "kernel_full" else cfg.seqlen
        return {
            "suite": self.args.suite,
            "device_name": self.run_info["env"]["device_name"],
            "config": cfg.to_dict(),
            "method": task.kind,
            "variant": task.variant,
            "label": task.label,
            "mode": task.mode,
            "gpus": 1 if task.kind.startswith("kernel") else task.gpus,
            "shard_of": task.gpus if task.kind == "kernel_local" else 1,
            "kernel": kernel,
            "seqlen_local": seqlen_local,
            "mesh": {"ulysses": task.mesh[0], "ring": task.mesh[1]} if task.mesh else None,
            "head_chunks": self.args.head_chunks if task.kind == "usp" else None,
            "flops": bc.attention_flops(cfg.batch, cfg.heads, seqlen_local if task.kind == "kernel_local"
                                        else cfg.seqlen, cfg.head_dim, cfg.causal, task.mode),
            "mem_min_bytes": bc.min_memory_bytes(cfg.batch, seqlen_local, cfg.heads, cfg.kv_heads, cfg.head_dim,
                                                 bc.DTYPE_BYTES[cfg.dtype], task.mode),
        }

    # ---------------------------------------------------------------- timing core
    def timed(self, step: Callable[[], None], prepare: Callable[[], None], collective: bool) -> dict:
        """Warm-up, then timed iterations (see the module docstring). Collective: every rank runs the same count."""
        torch = _t()
        ctx = self.ctx
        ctx.sync()
        if ctx.cuda:
            torch.cuda.reset_peak_memory_stats(ctx.device)
        base = torch.cuda.memory_allocated(ctx.device) if ctx.cuda else None
        warm = 1 if self.warmup is None else self.warmup
        for _ in range(warm):
            prepare()
            step()
        ctx.sync()

        def one() -> float:
            prepare()
            ctx.sync()
            if collective:
                ctx.barrier()
                ctx.sync()
            if ctx.cuda:
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
                step()
                end.record()
                end.synchronize()
                return begin.elapsed_time(end) / 1e3
            t0 = time.perf_counter()
            step()
            return time.perf_counter() - t0

        times: List[float] = []
        if self.repeats is None:
            probe = one()
            shared = ctx.max_float(probe) if collective else probe
            if shared >= 0.2:
                times.append(probe)
            else:
                warm += 1
            n = min(10, max(3, math.ceil(self.args.target_seconds / max(shared, 1e-6)))) - len(times)
        else:
            n = self.repeats
        for _ in range(n):
            times.append(one())
        peak = torch.cuda.max_memory_allocated(ctx.device) if ctx.cuda else None
        return {"times": times, "peak": peak, "base": base, "warmup": warm}

    def guarded(self, fn: Callable[[], dict], collective: bool) -> dict:
        """Run ``fn``; OOM and other errors become a status. Collective: every rank learns the worst outcome."""
        result: dict
        try:
            result = {"status": "ok", **fn()}
        except Exception as exc:  # noqa: BLE001 - every failure becomes a record
            oom = _is_oom(exc)
            result = {"status": "oom" if oom else "error", "reason": f"{type(exc).__name__}: {str(exc)[:400]}"}
            if not oom:
                traceback.print_exc()
        self.free()
        if not collective:
            return result
        everyone = self.ctx.gather(result)
        statuses = [r["status"] for r in everyone]
        if all(s == "ok" for s in statuses):
            combined = dict(result)
            if "times" not in result:
                return combined
            n = min(len(r["times"]) for r in everyone)
            combined["times"] = [max(r["times"][i] for r in everyone) for i in range(n)]
            combined["peak_per_rank"] = [r.get("peak") for r in everyone]
            combined["peak"] = max((r["peak"] for r in everyone if r.get("peak") is not None), default=None)
            combined["base_per_rank"] = [r.get("base") for r in everyone]
            return combined
        worst = next(r for r in everyone if r["status"] == ("oom" if "oom" in statuses else "error"))
        ranks = [i for i, s in enumerate(statuses) if s != "ok"]
        return {"status": worst["status"], "reason": f"rank(s) {ranks}: {worst.get('reason')}"}

    def finish(self, task: Task, record: dict, outcome: dict, elapsed: float, extra: Optional[dict] = None) -> None:
        record.update(extra or {})
        record["status"] = outcome["status"]
        record["elapsed_s"] = round(elapsed, 3)
        if outcome["status"] == "ok":
            times = outcome["times"]
            med = bc.median(times)
            record.update({
                "times_ms": [round(t * 1e3, 4) for t in times],
                "median_ms": med * 1e3,
                "min_ms": min(times) * 1e3,
                "max_ms": max(times) * 1e3,
                "warmup": outcome["warmup"],
                "repeats": len(times),
                "tflops_per_gpu": record["flops"] / (record["gpus"] * med) / 1e12,
                "peak_mem_bytes": outcome.get("peak"),
                "peak_mem_per_rank": outcome.get("peak_per_rank"),
                "base_mem_bytes": outcome.get("base"),
                "mem_ratio": (outcome["peak"] / record["mem_min_bytes"]) if outcome.get("peak") else None,
            })
            self.estimator.observe(task, med)
            mem = f" peak {outcome['peak'] / bc.GiB:.2f} GiB ({record['mem_ratio']:.2f}x min)" if outcome.get(
                "peak") else ""
            if record.get("check") and not record["check"].get("ok"):
                mem += " CHECK FAILED: not a valid result"
            self.log(f"{task.label:24s} {task.mode:6s} {task.config.describe()}: {med * 1e3:9.2f} ms "
                     f"{record['tflops_per_gpu']:7.1f} TFLOP/s/GPU{mem} [{elapsed:.1f}s]")
        else:
            record["reason"] = outcome.get("reason")
            if outcome["status"] in ("oom", "error") and self.suite.stop_after_failure:
                self.failed_families.add(task.family)
            self.log(f"{task.label:24s} {task.mode:6s} {task.config.describe()}: {outcome['status'].upper()} "
                     f"{outcome.get('reason') or ''} [{elapsed:.1f}s]")
        self.write(record)

    def skip(self, task: Task, status: str, reason: str) -> None:
        if task.kind in ("check", "prewarm"):
            self.log(f"{task.label} {task.config.describe()}: {status} ({reason})")
            return
        record = self.base_record(task)
        record.update({"status": status, "reason": reason})
        self.log(f"{task.label:24s} {task.mode:6s} {task.config.describe()}: {status} ({reason})")
        self.write(record)

    # ---------------------------------------------------------------- tasks
    def run(self, tasks: List[Task]) -> None:
        for index, task in enumerate(tasks):
            decision = None
            if self.ctx.rank == 0:
                decision = self.admit(task)
            decision = self.ctx.from_rank0(decision)
            if decision is not None:
                self.skip(task, *decision)
                continue
            t0 = time.monotonic()
            getattr(self, f"run_{task.kind}")(task, t0)

    def admit(self, task: Task) -> Optional[Tuple[str, str]]:
        """Rank 0 decides whether a task runs (every rank follows): failures, check, time budget."""
        if task.family in self.failed_families and task.kind != "check":
            return ("skipped", "a shorter sequence of this method already failed (stop-after-failure)")
        check = self.check_results.get(self.check_key(task))
        if check is not None and not check.get("ok", False) and self.args.skip_failed_check:
            return ("check_failed", f"--check failed: {check.get('summary')}")
        if self.args.max_seconds:
            estimate = self.estimator.task_seconds(task, len(self.meshes), self.cp_variant_count())
            left = self.args.max_seconds - (time.monotonic() - self.start)
            if estimate > left:
                return ("skipped_time", f"estimated {estimate:.0f} s > {left:.0f} s left of --max-seconds")
        return None

    def cp_variant_count(self) -> int:
        methods = self.args.methods or self.suite.methods
        return sum(1 for m in methods if m.startswith("cp_")) if self.cp is not None else 0

    @staticmethod
    def check_key(task: Task) -> tuple:
        return (task.kind, task.variant, task.config)

    def run_prewarm(self, task: Task, t0: float) -> None:
        saved = (self.warmup, self.repeats)
        self.warmup, self.repeats = 1, 0
        try:
            outcome = self.guarded(lambda: self._usp_measure(task), collective=True)
        finally:
            self.warmup, self.repeats = saved
        self.log(f"{task.label} {task.config.describe()}: {outcome['status']} [{time.monotonic() - t0:.1f}s]")

    # kernel on one GPU -------------------------------------------------------
    def _kernel_tensors(self, cfg: Config, seqlen: int):
        shape_q = (cfg.batch, seqlen, cfg.heads, cfg.head_dim)
        shape_kv = (cfg.batch, seqlen, cfg.kv_heads, cfg.head_dim)
        return (self.randn(shape_q, cfg, 1), self.randn(shape_kv, cfg, 2), self.randn(shape_kv, cfg, 3),
                self.randn(shape_q, cfg, 4))

    def kernel_fits(self, cfg: Config, seqlen: int, mode: str) -> Optional[str]:
        """None if the single-GPU kernel run should fit in free memory, else why not."""
        if not self.ctx.cuda:
            return None
        torch = _t()
        need = bc.min_memory_bytes(cfg.batch, seqlen, cfg.heads, cfg.kv_heads, cfg.head_dim,
                                   bc.DTYPE_BYTES[cfg.dtype], mode)
        if mode == "fwdbwd":
            need += 4 * cfg.batch * seqlen * cfg.heads * cfg.head_dim  # fp32 dQ accumulator of the kernels
        need += bc.GiB  # workspace and allocator slack
        free, _ = torch.cuda.mem_get_info(self.ctx.device)
        free += torch.cuda.memory_reserved(self.ctx.device) - torch.cuda.memory_allocated(self.ctx.device)
        if need > free:
            return f"estimated {need / bc.GiB:.1f} GiB > {free / bc.GiB:.1f} GiB free"
        return None

    def _run_kernel(self, task: Task, t0: float, seqlen: int) -> None:
        cfg = task.config
        record = self.base_record(task)
        outcome = None
        if self.ctx.rank == 0:
            reason = self.kernel_fits(cfg, seqlen, task.mode)
            if reason:
                outcome = {"status": "skipped_memory", "reason": reason}
            else:
                kernel = self.kernels[task.kernel or self.kernel.name]
                outcome = self.guarded(lambda: self._kernel_measure(kernel, cfg, seqlen, task.mode),
                                       collective=False)
        self.ctx.barrier()
        if self.ctx.rank == 0:
            self.finish(task, record, outcome, time.monotonic() - t0)

    def _kernel_measure(self, kernel, cfg: Config, seqlen: int, mode: str) -> dict:
        torch = _t()
        self.maybe_simulate_oom(cfg)
        q, k, v, dout = self._kernel_tensors(cfg, seqlen)
        scale, causal = self.scale(cfg), cfg.causal

        def fwd():
            kernel.forward(q, k, v, causal, scale)

        def fwdbwd():
            out, lse = kernel.forward(q, k, v, causal, scale)
            kernel.backward(dout, q, k, v, out, lse, causal, scale)

        with torch.no_grad():
            return self.timed(fwd if mode == "fwd" else fwdbwd, lambda: None, collective=False)

    def run_kernel_full(self, task: Task, t0: float) -> None:
        self._run_kernel(task, t0, task.config.seqlen)

    def run_kernel_local(self, task: Task, t0: float) -> None:
        self._run_kernel(task, t0, task.config.seqlen // task.gpus)

    # usp -----------------------------------------------------------------------
    def _usp_measure(self, task: Task) -> dict:
        torch = _t()
        from usp import long_context_attention

        cfg, mesh = task.config, self.meshes[task.mesh]
        self.maybe_simulate_oom(cfg)
        s_loc = cfg.seqlen // task.gpus
        seed = 100 + 10 * self.ctx.rank
        q = self.randn((cfg.batch, s_loc, cfg.heads, cfg.head_dim), cfg, seed)
        k = self.randn((cfg.batch, s_loc, cfg.kv_heads, cfg.head_dim), cfg, seed + 1)
        v = self.randn((cfg.batch, s_loc, cfg.kv_heads, cfg.head_dim), cfg, seed + 2)
        dout = self.randn((cfg.batch, s_loc, cfg.heads, cfg.head_dim), cfg, seed + 3)
        kernel, causal, chunks = self.kernel, cfg.causal, self.args.head_chunks

        if task.mode == "fwd":
            def step():
                with torch.no_grad():
                    long_context_attention(q, k, v, mesh, causal=causal, backend=kernel, head_chunks=chunks)

            return self.timed(step, lambda: None, collective=True)

        for t in (q, k, v):
            t.requires_grad_(True)

        def prepare():
            q.grad = k.grad = v.grad = None

        def step():
            out = long_context_attention(q, k, v, mesh, causal=causal, backend=kernel, head_chunks=chunks)
            out.backward(dout)

        return self.timed(step, prepare, collective=True)

    def run_usp(self, task: Task, t0: float) -> None:
        record = self.base_record(task)
        outcome = self.guarded(lambda: self._usp_measure(task), collective=True)
        check = self.check_results.get(self.check_key(task))
        self.finish(task, record, outcome, time.monotonic() - t0, {"check": check})

    # PyTorch CP ------------------------------------------------------------------
    def _cp_inputs(self, cfg: Config, expand: bool, source=None):
        """Full ``[b, h, s, d]`` q, k, v, dout, identical on every rank (same seed; or copies of ``source``, four
        ``[b, s, h, d]`` tensors); K/V expanded to ``h`` heads if asked."""
        if source is not None:
            q, k, v, dout = (t.transpose(1, 2).contiguous() for t in source)
        else:
            q = self.randn((cfg.batch, cfg.heads, cfg.seqlen, cfg.head_dim), cfg, 11)
            k = self.randn((cfg.batch, cfg.kv_heads, cfg.seqlen, cfg.head_dim), cfg, 12)
            v = self.randn((cfg.batch, cfg.kv_heads, cfg.seqlen, cfg.head_dim), cfg, 13)
            dout = self.randn((cfg.batch, cfg.heads, cfg.seqlen, cfg.head_dim), cfg, 14)
        if expand and cfg.kv_heads != cfg.heads:
            group = cfg.heads // cfg.kv_heads
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        return q, k, v, dout

    def _cp_call(self, cfg: Config, task_rotate: str, body: Callable, expand: bool, source=None):
        q, k, v, dout = self._cp_inputs(cfg, expand, source)
        with self.cp.session(q, k, v, dout, cfg.causal, task_rotate) as (local, info):
            del q, k, v, dout
            result = body(local, info)
        return result

    def _cp_with_gqa_fallback(self, cfg: Config, rotate: str, body: Callable, source=None) -> Tuple[dict, str]:
        """Run ``body`` inside a CP session; on a GQA failure retry with K/V expanded (remembered per heads)."""
        key = (cfg.heads, cfg.kv_heads)
        gqa = cfg.heads != cfg.kv_heads
        mode = self.cp_gqa_mode.get(key, "native") if gqa else "mha"
        if mode != "expand":
            outcome = self.guarded(lambda: self._cp_call(cfg, rotate, body, False, source), collective=True)
            if outcome["status"] != "error" or not gqa:
                if gqa and outcome["status"] == "ok":
                    self.cp_gqa_mode[key] = "native"
                return outcome, mode
            self.log(f"torch CP with enable_gqa failed ({outcome.get('reason')}); retrying with K/V expanded")
        self.cp_gqa_mode[key] = "expand"
        outcome = self.guarded(lambda: self._cp_call(cfg, rotate, body, True, source), collective=True)
        return outcome, "expand"

    def run_torch_cp(self, task: Task, t0: float) -> None:
        torch = _t()
        cfg = task.config
        record = self.base_record(task)
        scale = self.scale(cfg)

        def body(local, info):
            lq, lk, lv, ldout = local
            if task.mode == "fwd":
                def step():
                    with torch.no_grad():
                        self.cp.attention(lq, lk, lv, cfg.causal, scale)

                result = self.timed(step, lambda: None, collective=True)
            else:
                for t in (lq, lk, lv):
                    t.requires_grad_(True)

                def prepare():
                    lq.grad = lk.grad = lv.grad = None

                def step():
                    out = self.cp.attention(lq, lk, lv, cfg.causal, scale)
                    out.backward(ldout)

                result = self.timed(step, prepare, collective=True)
            result["cp"] = info
            return result

        outcome, gqa_mode = self._cp_with_gqa_fallback(cfg, task.rotate, body)
        extra = {"cp": {**(outcome.get("cp") or {}), "gqa": gqa_mode},
                 "check": self.check_results.get(self.check_key(task))}
        self.finish(task, record, outcome, time.monotonic() - t0, extra)

    # --check -----------------------------------------------------------------------
    def run_check(self, task: Task, t0: float) -> None:
        """Compare every usp mesh and CP variant with the single-GPU kernel on the full sequence (out and grads)."""
        torch = _t()
        from usp import gather, long_context_attention, shard

        cfg = task.config
        kernel, scale, causal = self.kernel, self.scale(cfg), cfg.causal
        rtol = self.args.check_rtol if self.args.check_rtol is not None else (
            1e-4 if cfg.dtype in ("float32", "float64") else 2e-2)
        shape_q = (cfg.batch, cfg.seqlen, cfg.heads, cfg.head_dim)
        shape_kv = (cfg.batch, cfg.seqlen, cfg.kv_heads, cfg.head_dim)
        full = (self.randn(shape_q, cfg, 21), self.randn(shape_kv, cfg, 22), self.randn(shape_kv, cfg, 23),
                self.randn(shape_q, cfg, 24))  # q, k, v, dout: identical on every rank
        q, k, v, dout = full
        with torch.no_grad():
            ref_out, ref_lse = kernel.forward(q, k, v, causal, scale)
            ref = dict(zip(("out", "dq", "dk", "dv"),
                           (ref_out, *kernel.backward(dout, q, k, v, ref_out, ref_lse, causal, scale))))
        del ref_out, ref_lse

        def compare(got: dict) -> dict:
            errors = {}
            for name, value in got.items():
                expected = ref[name].float()
                err = (value.float() - expected).abs().max().item()
                errors[name] = {"max_abs_err": err, "rel_err": err / max(expected.abs().max().item(), 1e-12)}
            ok = all(e["rel_err"] <= rtol for e in errors.values())
            worst = max(errors, key=lambda n: errors[n]["rel_err"])
            return {"ok": ok, "rtol": rtol, "errors": errors,
                    "summary": f"worst {worst} rel err {errors[worst]['rel_err']:.2e} (rtol {rtol:.0e})"}

        def usp_check(mesh):
            ql, kl, vl, dl = (shard(t, mesh, causal=causal).detach() for t in full)
            for t in (ql, kl, vl):
                t.requires_grad_(True)
            out = long_context_attention(ql, kl, vl, mesh, causal=causal, backend=kernel,
                                         head_chunks=self.args.head_chunks)
            out.backward(dl)
            got = {name: gather(t.detach(), mesh, causal=causal) for name, t in
                   (("out", out), ("dq", ql.grad), ("dk", kl.grad), ("dv", vl.grad))}
            return {"check": compare(got)}

        def cp_check(local, info):
            lq, lk, lv, ldout = local
            for t in (lq, lk, lv):
                t.requires_grad_(True)
            out = self.cp.attention(lq, lk, lv, causal, scale)
            out.backward(ldout)
            out_f, dq_f, dk_f, dv_f = (t.transpose(1, 2) for t in  # [b, h, s, d] -> [b, s, h, d]
                                       self.cp.unshard([out.detach(), lq.grad, lk.grad, lv.grad]))
            if dk_f.shape[2] != cfg.kv_heads:  # K/V were expanded for CP: sum each KV head's query group
                group = cfg.heads // cfg.kv_heads
                dk_f = dk_f.unflatten(2, (cfg.kv_heads, group)).sum(3)
                dv_f = dv_f.unflatten(2, (cfg.kv_heads, group)).sum(3)
            return {"check": compare({"out": out_f, "dq": dq_f, "dk": dk_f, "dv": dv_f})}

        def record(probe: Task, outcome: dict, extra: Optional[dict] = None) -> None:
            result = outcome.get("check") or {"ok": False, "summary": f"{outcome['status']}: {outcome.get('reason')}"}
            result = {**result, **(extra or {})}
            self.check_results[self.check_key(probe)] = result
            self.log(f"check {probe.label} {cfg.describe()}: {'ok' if result['ok'] else 'FAILED'} "
                     f"{result['summary']}")

        for (u, r), mesh in self.meshes.items():
            outcome = self.guarded(lambda: usp_check(mesh), collective=True)
            record(Task("usp", cfg, mesh=(u, r), gpus=task.gpus), outcome)

        if self.cp is not None and not ((self.args.cp_mha_only or self.suite.cp_mha_only)
                                        and cfg.heads != cfg.kv_heads):
            for method in self.args.methods or self.suite.methods:
                if method.startswith("cp_"):
                    outcome, gqa_mode = self._cp_with_gqa_fallback(cfg, method[3:], cp_check, source=full)
                    record(Task("torch_cp", cfg, rotate=method[3:], gpus=task.gpus), outcome, {"gqa": gqa_mode})
        q = k = v = dout = full = ref = None  # release before timing (the closures above are done with them)
        self.free()
        self.log(f"check {cfg.describe()} done [{time.monotonic() - t0:.1f}s]")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


# --------------------------------------------------------------------------------------------------- CLI


def _csv(parse):
    def inner(text: str):
        return [parse(part) for part in text.split(",") if part.strip()]

    return inner


def _methods(text: str):
    values = [m.strip() for m in text.split(",") if m.strip()]
    for m in values:
        if m not in METHOD_NAMES:
            raise argparse.ArgumentTypeError(f"method {m!r}; valid values: {', '.join(METHOD_NAMES)}")
    return values


def _modes(text: str):
    values = [m.strip() for m in text.split(",") if m.strip()]
    for m in values:
        if m not in ("fwd", "fwdbwd"):
            raise argparse.ArgumentTypeError(f"mode {m!r}; valid values: fwd, fwdbwd")
    return values


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", default="smoke", choices=sorted(SUITES), help="configuration list (default smoke)")
    p.add_argument("--out", default=os.path.join(_HERE, "results"), help="folder for the JSON Lines output")
    p.add_argument("--device", default=None, choices=("cuda", "cpu"), help="default cuda when available")
    p.add_argument("--backend", default="auto",
                   help="usp kernel: auto, fa4, fa2, cudnn, torch_flash, reference (default auto)")
    p.add_argument("--cp-sdpa", default=None, choices=("cudnn", "flash", "efficient", "math"),
                   help="SDPA backend forced for PyTorch CP (default: the same kernel as --backend, else cudnn)")
    g = p.add_argument_group("overrides of the suite")
    g.add_argument("--seqlens", type=_csv(bc.parse_seqlen), help="e.g. 32k,64k,128k or 1M,1.5M")
    g.add_argument("--heads-list", type=_csv(bc.parse_heads), help="query/KV heads, e.g. 32/32,32/8")
    g.add_argument("--head-dim", type=int)
    g.add_argument("--batch", type=int)
    g.add_argument("--dtype", choices=sorted(bc.DTYPE_BYTES))
    c = g.add_mutually_exclusive_group()
    c.add_argument("--causal-only", dest="causal_list", action="store_const", const=[True])
    c.add_argument("--noncausal-only", dest="causal_list", action="store_const", const=[False])
    g.add_argument("--modes", type=_modes, help="fwd,fwdbwd")
    g.add_argument("--methods", type=_methods, help="subset of " + ",".join(METHOD_NAMES))
    g.add_argument("--meshes", type=_csv(bc.parse_mesh),
                   help="usp meshes UxR, e.g. 1x2,2x1 (default every factorisation of the world size)")
    g.add_argument("--head-chunks", type=int, default=1,
                   help="usp's head_chunks (ring passes per head group; cuts working memory, see usp.ring)")
    g.add_argument("--cp-mha-only", action="store_true", help="run PyTorch CP on MHA configurations only")
    g.add_argument("--prewarm-seqlen", type=lambda text: 0 if text.strip() == "0" else bc.parse_seqlen(text),
                   help="untimed fwd+bwd per mesh at this length before the suite (scale suite: 16K; 0 = none)")
    g.add_argument("--shard-gpus", type=int, default=2,
                   help="with 1 process: kernel_local uses s / this (default 2)")
    t = p.add_argument_group("timing")
    t.add_argument("--warmup", type=int, help="untimed iterations (default 1; scale suite 0)")
    t.add_argument("--repeats", type=int, help="timed iterations (default auto: 3..10 within --target-seconds)")
    t.add_argument("--target-seconds", type=float, default=1.0, help="auto repeats aim at this much timed work")
    t.add_argument("--max-seconds", type=float, default=None,
                   help="skip tasks whose estimated time would overrun this wall budget (status skipped_time)")
    t.add_argument("--timeout", type=float, default=300.0, help="process-group timeout, seconds (hang guard)")
    p.add_argument("--check", action="store_true",
                   help="before timing, compare usp (and CP) output and grads with the 1-GPU kernel on the full seq")
    p.add_argument("--skip-failed-check", action="store_true",
                   help="do not time a method whose --check failed (default: time it, flagged; the report hides it)")
    p.add_argument("--check-rtol", type=float, default=None,
                   help="max |err| / max |ref| allowed (default 2e-2 for bf16/fp16, 1e-4 for fp32)")
    p.add_argument("--dry-run", action="store_true", help="print the task list with estimated times; no GPU needed")
    p.add_argument("--world-size", type=int, default=2, help="for --dry-run only")
    p.add_argument("--list-suites", action="store_true")
    p.add_argument("--simulate-oom-above", type=bc.parse_seqlen, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.warmup is not None and args.warmup < 0 or args.repeats is not None and args.repeats < 1:
        p.error("--warmup must be >= 0 and --repeats >= 1")
    return args


def default_meshes(world: int, heads: int) -> List[Tuple[int, int]]:
    """Every U x R = world with U dividing the query heads, ring-heavy first (1xP, ..., Px1)."""
    return [(u, world // u) for u in range(1, world + 1) if world % u == 0 and heads % u == 0]


def dry_run(args, suite: Suite) -> int:
    world = args.world_size
    kernel = args.backend if args.backend not in ("auto",) else "cudnn"
    heads = args.heads_list or suite.heads
    meshes = args.meshes or default_meshes(world, min(h for h, _ in heads))
    cp_kernel = {"torch_flash": "torch_flash"}.get(kernel, "cudnn")
    tasks = build_tasks(suite, args, world, meshes, [cp_kernel] if cp_kernel != kernel else [])
    warm = args.warmup if args.warmup is not None else suite.warmup
    reps = args.repeats if args.repeats is not None else suite.repeats
    est = Estimator(kernel, warm, reps, args.target_seconds)
    n_cp = sum(1 for m in (args.methods or suite.methods) if m.startswith("cp_"))
    total = 0.0
    print(f"suite {args.suite}: {suite.description}")
    print(f"{len(tasks)} tasks on {world} GPUs, kernel {kernel} (estimates from FACTS.md rates, E=0.85 assumed)")
    for task in tasks:
        seconds = est.task_seconds(task, len(meshes), n_cp)
        total += seconds
        print(f"  {task.label:24s} {task.mode:6s} {task.config.describe():40s} ~{seconds:6.1f} s")
    print(f"estimated total: {total:.0f} s of measurement + ~30-60 s start-up (imports, NCCL, JIT)")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.list_suites:
        for name, suite in SUITES.items():
            print(f"{name:8s} {suite.description}")
        return 0
    suite = SUITES[args.suite]
    if args.dry_run:
        return dry_run(args, suite)

    torch = _t()
    device_type = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    ctx = DistContext(device_type, args.timeout)
    from usp import SequenceParallelMesh, resolve_backend

    dtype = getattr(torch, args.dtype or suite.dtype)
    head_dim = args.head_dim or suite.head_dim
    kernel = resolve_backend(args.backend, ctx.device, dtype, head_dim)
    heads_list = args.heads_list or suite.heads
    meshes_spec = args.meshes or default_meshes(ctx.world, min(h for h, _ in heads_list))
    for u, r in meshes_spec:
        if u * r != ctx.world:
            raise SystemExit(f"--meshes {u}x{r}: U*R must equal the world size {ctx.world}")
    meshes = {m: SequenceParallelMesh(ulysses=m[0], ring=m[1]) for m in meshes_spec} if ctx.world > 1 else {}

    cp = None
    methods = list(args.methods or suite.methods)
    if ctx.world > 1 and any(m.startswith("cp_") for m in methods):
        import torch_cp

        reason = torch_cp.is_available()
        if reason:
            if ctx.rank == 0:
                print(f"PyTorch CP skipped: {reason}", flush=True)
        else:
            sdpa = args.cp_sdpa or torch_cp.sdpa_backend_for(kernel.name)
            cp = torch_cp.TorchContextParallel(ctx.device, sdpa, cpu_shim=ctx.device.type == "cpu")
    args.methods = [m for m in methods if cp is not None or not m.startswith("cp_")]
    cp_kernels = []
    if cp is not None and cp.kernel_name and cp.kernel_name != kernel.name:
        try:
            cp_kernels.append(resolve_backend(cp.kernel_name, ctx.device, dtype, head_dim).name)
        except ValueError as exc:
            if ctx.rank == 0:
                print(f"no 1-GPU baseline for PyTorch CP's kernel: {exc}", flush=True)

    now = _dt.datetime.now(_dt.timezone.utc)
    run_id = ctx.from_rank0(f"{args.suite}-{now:%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}")
    run_info = {
        "run_id": run_id,
        "suite": args.suite,
        "date": now.isoformat(timespec="seconds"),
        "command": command_line(ctx.world),
        "env": environment(ctx, kernel.name),
        "cp_sdpa_backend": cp.sdpa_backend if cp else None,
    }
    out_path = os.path.join(args.out, f"{run_id}.jsonl")
    if ctx.rank == 0:
        os.makedirs(args.out, exist_ok=True)
        env = run_info["env"]
        print(f"usp bench: suite {args.suite}, {ctx.world} x {env['device_name']}, kernel {kernel.name}, "
              f"torch {env['torch']}, cuDNN {env['cudnn']}, NCCL {env['nccl']}, CP SDPA "
              f"{run_info['cp_sdpa_backend']}; writing {out_path}", flush=True)
    runner = Runner(args, suite, ctx, kernel, meshes, cp, run_info, out_path)
    for name in cp_kernels:
        runner.kernels[name] = resolve_backend(name, ctx.device, dtype, head_dim)
    tasks = build_tasks(suite, args, ctx.world, meshes_spec, cp_kernels)
    if not tasks and ctx.rank == 0:
        print(f"nothing to run: suite {args.suite} measures {', '.join(args.methods)} and this world has "
              f"{ctx.world} process(es) (usp and PyTorch CP need 2 or more)", flush=True)
    try:
        runner.run(tasks)
    finally:
        runner.close()
    if ctx.rank == 0:
        import report

        print()
        print(report.render_section(runner.records, title=f"{args.suite} (this run)", plot_path=None), flush=True)
        print(f"records: {out_path}", flush=True)
    ctx.close()
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Exit without interpreter teardown: with PyTorch CP's functional collectives, gloo intermittently aborts
    # ("terminate called without an active exception") while destroying threads after a clean shutdown.
    os._exit(code)
