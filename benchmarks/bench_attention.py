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

Modules: this file is the command line; ``bench_suites.py`` (suites, tasks, time estimates), ``bench_runtime.py``
(process group, environment, the timing loop), ``bench_runner.py`` (runs the tasks, writes the records),
``bench_check.py`` (``--check``), ``bench_common.py`` (formulas and records shared with ``report.py``).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import sys
import uuid

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
for _path in (_HERE, _ROOT):  # bench_common/torch_cp/report next to this file; usp from the checkout
    if _path not in sys.path:
        sys.path.insert(0, _path)

import bench_common as bc  # noqa: E402
from bench_runner import Runner  # noqa: E402
from bench_runtime import DistContext, _t, command_line, environment  # noqa: E402
from bench_suites import METHOD_NAMES, SUITES, Estimator, Suite, build_tasks, default_meshes  # noqa: E402




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
    print(f"{len(tasks)} tasks on {world} GPUs, kernel {kernel} (estimates from bench_common's nominal rates, E=0.85 assumed)")
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
