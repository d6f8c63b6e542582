"""The benchmark runner: executes the task list of a suite (``bench_suites``) on every rank, decides what runs
(failures, checks, the time budget), measures each method and writes one JSON Lines record per measurement.

Methods: ``kernel_full`` / ``kernel_local`` (the kernel alone on one GPU), ``usp`` (``long_context_attention`` on a
mesh), ``torch_cp`` (PyTorch's ``context_parallel``, ``torch_cp.py``); ``check`` is ``bench_check.run_check``.
"""
from __future__ import annotations

import json
import time
from typing import Callable, Dict, List, Optional, Tuple

import bench_common as bc
from bench_check import run_check
from bench_runtime import DistContext, _t, free, guarded, timed
from bench_suites import Config, Estimator, Suite, Task




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
        free(self.ctx)

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
        """``bench_runtime.timed`` with this run's warm-up, repeats and target seconds."""
        return timed(self.ctx, step, prepare, collective, self.warmup, self.repeats, self.args.target_seconds)

    def guarded(self, fn: Callable[[], dict], collective: bool) -> dict:
        """``bench_runtime.guarded``: OOM and other errors become a status."""
        return guarded(self.ctx, fn, collective)

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
        """Compare every usp mesh and CP variant with the single-GPU kernel (``bench_check.run_check``)."""
        run_check(self, task, t0)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
