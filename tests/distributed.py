"""Run a function on W CPU processes (gloo) once, with a hard timeout, and collect each rank's result.

Spawning costs ~1 s of torch import per process on 2 cores, so each world size is started once per session and
runs many cases; a hang kills every process and fails instead of stalling CI.
"""
from __future__ import annotations

import os
import socket
import traceback
from typing import Any, Callable, List

import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, backend: str, fn: Callable, args: tuple, queue) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    # torchrun's variables too, for code that reads them (the planner's probe does)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        kwargs = {}
        if backend == "nccl":
            torch.cuda.set_device(rank)
            kwargs["device_id"] = torch.device("cuda", rank)
        dist.init_process_group(
            backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size, **kwargs
        )
        result = fn(rank, world_size, *args)
        queue.put((rank, True, result))
    except BaseException:  # report everything, including assertion errors, to the parent
        queue.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_world(world_size: int, fn: Callable, *args: Any, timeout: float = 300.0, backend: str = "gloo") -> List[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` ranks (gloo on CPU, or nccl with one GPU per rank);
    return the results ordered by rank.

    ``fn`` must be importable (module level). Raises RuntimeError with the failing rank's traceback, or
    TimeoutError (after killing every process) if the world does not finish within ``timeout`` seconds.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, backend, fn, args, queue), daemon=True)
             for r in range(world_size)]
    env_backup = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        for p in procs:
            p.start()
    finally:
        if env_backup is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = env_backup
    results: dict = {}
    import queue as queue_module
    import time

    deadline = time.monotonic() + timeout
    try:
        while len(results) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"world of {world_size} ranks did not finish within {timeout:.0f} s (hang?)")
            try:
                rank, ok, payload = queue.get(timeout=min(remaining, 5.0))
            except queue_module.Empty:
                dead = [p for p in procs if not p.is_alive() and p.exitcode not in (0, None)]
                if dead:
                    raise RuntimeError(f"rank process exited with code {dead[0].exitcode} without a result")
                continue
            if not ok:
                raise RuntimeError(f"rank {rank} failed:\n{payload}")
            results[rank] = payload
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(world_size)]
