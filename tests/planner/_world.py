"""The function the probe test's ranks run (module level, so the spawned processes can import it); the world
itself is started by ``tests/distributed.py``'s ``run_world``."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: distributed.py
from distributed import run_world  # noqa: E402,F401  (re-exported for the tests)


def probe_worker(rank: int, world: int, tmp: str, gpus_per_host) -> tuple:
    """Two probes in one world: a full one written to ``tmp`` and a quick one without the kernel timing."""
    from usp import planner

    out = f"{tmp}/probe-{world}.yaml"
    topo = planner.probe(output=out, name=f"cpu-{world}", message_sizes=[4096, 65536, 262144], iters=2, warmup=1,
                         gpus_per_host=gpus_per_host, kernel_blocks=[64, 128], heads=[1, 2], head_dim=32,
                         progress=False)
    second = planner.probe(name="no-kernel", message_sizes=[4096], group_sizes=[2], iters=1, warmup=0, kernel=None,
                           gpus_per_host=gpus_per_host, progress=False)
    return topo.to_dict(), second.to_dict(), out
