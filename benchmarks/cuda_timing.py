"""CUDA-event timing and process-group start-up shared by the quick GPU scripts (``quick_splits.py``,
``profile_step.py``, ``kernel_overhead.py``, ``bench_varlen.py``, ``bench_window.py``); the harness
``bench_attention.py`` has its own, collective-aware loop."""
import os
import statistics

import torch
import torch.distributed as dist


def init_distributed():
    """The process group under torchrun: NCCL with this rank's GPU, or gloo on the CPU. Returns (rank, world,
    device)."""
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if cuda:
        torch.cuda.set_device(local_rank)
    return rank, world, torch.device("cuda", local_rank) if cuda else torch.device("cpu")


def events_ms(fn) -> float:
    """Milliseconds of device time for one call of ``fn``, between two CUDA events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def median_ms(fn, warmup: int, repeats: int) -> float:
    """Median of ``repeats`` timed calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    return statistics.median(events_ms(fn) for _ in range(repeats))


def versions(packages) -> dict:
    """Python, torch, CUDA, NCCL and the installed versions of ``packages`` (distribution names; absent ones left
    out): what a benchmark's JSON records."""
    import importlib.metadata as md
    import sys

    out = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda}
    try:
        out["nccl"] = ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001 - a build without NCCL
        out["nccl"] = None
    for package in packages:
        try:
            out[package] = md.version(package)
        except md.PackageNotFoundError:
            pass
    return out


def finish(record: dict, path: str, script: str) -> None:
    """End a torchrun benchmark: rank 0 adds the date, device, torch version and command line to ``record`` and
    writes it to ``path`` as JSON; then every rank leaves the process group."""
    import datetime
    import json
    import sys

    if dist.get_rank() == 0:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
        record.update(date=datetime.datetime.now(datetime.timezone.utc).isoformat(), torch=torch.__version__,
                      device=torch.cuda.get_device_name(device) if device is not None else "cpu",
                      command="torchrun --nproc-per-node %d %s %s" % (dist.get_world_size(), script,
                                                                      " ".join(sys.argv[1:])))
        with open(path, "w") as f:
            json.dump(record, f, indent=1)
        print(f"wrote {path}")
    dist.barrier()
    dist.destroy_process_group()
