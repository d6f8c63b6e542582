"""The benchmark harness's runtime: the process group and device, the environment a record carries, and the timing
loop (``timed``) with its failure guard (``guarded``). torch is imported on first use, so the suites and the dry run
do not need it.
"""
from __future__ import annotations

import datetime as _dt
import gc
import math
import os
import platform
import shlex
import socket
import subprocess
import sys
import time
import traceback
from typing import Callable, List, Optional

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)


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
            os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast stays off (RESULTS.md, reference measurements)
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


def is_oom(exc: BaseException) -> bool:
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


def free(ctx: DistContext) -> None:
    """Collect garbage and return cached device memory, between measurements."""
    gc.collect()
    if ctx.cuda:
        _t().cuda.empty_cache()


def timed(ctx: DistContext, step: Callable[[], None], prepare: Callable[[], None], collective: bool,
          warmup: Optional[int], repeats: Optional[int], target_seconds: float) -> dict:
    """Warm-up, then timed iterations (``bench_attention``'s docstring: ``warmup`` untimed, default 1; then
    ``repeats``, or a probe and enough more for ``target_seconds``, 3 to 10). Collective: every rank runs the same
    count, and each iteration starts on all ranks together."""
    torch = _t()
    ctx.sync()
    if ctx.cuda:
        torch.cuda.reset_peak_memory_stats(ctx.device)
    base = torch.cuda.memory_allocated(ctx.device) if ctx.cuda else None
    warm = 1 if warmup is None else warmup
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
    if repeats is None:
        probe = one()
        shared = ctx.max_float(probe) if collective else probe
        if shared >= 0.2:
            times.append(probe)
        else:
            warm += 1
        n = min(10, max(3, math.ceil(target_seconds / max(shared, 1e-6)))) - len(times)
    else:
        n = repeats
    for _ in range(n):
        times.append(one())
    peak = torch.cuda.max_memory_allocated(ctx.device) if ctx.cuda else None
    return {"times": times, "peak": peak, "base": base, "warmup": warm}


def guarded(ctx: DistContext, fn: Callable[[], dict], collective: bool) -> dict:
    """Run ``fn``; OOM and other errors become a status, and its memory is released (``free``). Collective: every
    rank learns the worst outcome, and the times are the slowest rank's per iteration."""
    result: dict
    try:
        result = {"status": "ok", **fn()}
    except Exception as exc:  # noqa: BLE001 - every failure becomes a record
        oom = is_oom(exc)
        result = {"status": "oom" if oom else "error", "reason": f"{type(exc).__name__}: {str(exc)[:400]}"}
        if not oom:
            traceback.print_exc()
    free(ctx)
    if not collective:
        return result
    everyone = ctx.gather(result)
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
