"""Run a function on N gloo CPU processes once, with a hard timeout (spawned, so it works under pytest), and the
functions the ranks run (module level, so the spawned processes can import them)."""
from __future__ import annotations

import os
import queue as queue_module
import socket
import time
import traceback
from typing import Any, Callable, List

import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, results) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        results.put((rank, True, fn(rank, world_size, *args)))
    except BaseException:  # report everything to the parent, including assertion errors
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_world(world_size: int, fn: Callable, *args: Any, timeout: float = 90.0) -> List[Any]:
    """``fn(rank, world_size, *args)`` on every rank; results by rank. Kills everything after ``timeout``."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, results), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    out: dict = {}
    deadline = time.monotonic() + timeout
    try:
        while len(out) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{world_size} ranks did not finish within {timeout:.0f} s")
            try:
                rank, ok, payload = results.get(timeout=min(remaining, 2.0))
            except queue_module.Empty:
                dead = [p for p in procs if p.exitcode not in (0, None)]
                if dead:
                    raise RuntimeError(f"a rank process died with exit code {dead[0].exitcode}")
                continue
            if not ok:
                raise RuntimeError(f"rank {rank} failed:\n{payload}")
            out[rank] = payload
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    return [out[r] for r in range(world_size)]


def probe_worker(rank: int, world: int, tmp: str, gpus_per_host) -> tuple:
    """Two probes in one world: a full one written to ``tmp`` and a quick one without the kernel timing."""
    import planner

    out = f"{tmp}/probe-{world}.yaml"
    topo = planner.probe(output=out, name=f"cpu-{world}", message_sizes=[4096, 65536, 262144], iters=2, warmup=1,
                         gpus_per_host=gpus_per_host, kernel_blocks=[64, 128], heads=2, head_dim=32, progress=False)
    second = planner.probe(name="no-kernel", message_sizes=[4096], group_sizes=[2], iters=1, warmup=0, kernel=None,
                           gpus_per_host=gpus_per_host, progress=False)
    return topo.to_dict(), second.to_dict(), out
