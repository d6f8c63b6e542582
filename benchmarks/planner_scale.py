"""How the planner's cost grows with the GPU count (issue 16): ``usp-plan`` wall time and peak memory, and
``planner.plan()`` once imported, from 8 to 131,072 GPUs. CPU only; a benchmark, not a timed test.

    python benchmarks/planner_scale.py                         # the table of RESULTS.md, section "Planner at scale"
    python benchmarks/planner_scale.py --worlds 8,65536 --repeats 5

Targets: ``usp-plan`` for 65,536 GPUs (8 per host) under 3 s including interpreter start and under 300 MB;
8-64 GPUs under 1 s; ``plan()`` under 100 ms at any size.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time

SHAPE = ["--seqlen", "1M", "--heads", "32", "--kv-heads", "8"]


def cli_run(world: int, extra) -> tuple:
    """(wall seconds, peak RSS in MB) of one ``usp-plan`` process."""
    exe = shutil.which("usp-plan")
    cmd = ([exe] if exe else [sys.executable, "-m", "usp.planner.cli"]) + SHAPE + ["--world-size", str(world)] + extra
    start = time.perf_counter()
    pid = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(pid.pid, 0)
    wall = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {pid.stderr.read().decode()}")
    return wall, usage.ru_maxrss / 1024


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", default="8,64,512,1024,2048,8192,65536,131072")
    parser.add_argument("--repeats", type=int, default=3, help="runs per size; the median is reported")
    parser.add_argument("--topology", default="dgx-h100-cluster")
    args = parser.parse_args(argv)
    worlds = [int(w) for w in args.worlds.split(",")]
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from usp import planner

    planner.plan(8, "1M", 32, 8, topology=args.topology)  # warm: imports, preset parsing
    print("| GPUs | usp-plan wall s (median) | usp-plan peak RSS MB | plan() ms (median) | pick |")
    print("|---|---|---|---|---|")
    for world in worlds:
        runs = sorted(cli_run(world, ["--topology", args.topology]) for _ in range(args.repeats))
        wall, rss = runs[len(runs) // 2][0], max(r[1] for r in runs)
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            p = planner.plan(world, "1M", 32, 8, topology=args.topology)
            times.append(time.perf_counter() - start)
        ms = sorted(times)[len(times) // 2] * 1e3
        print(f"| {world:,} | {wall:.2f} | {rss:.0f} | {ms:.1f} | U{p.ulysses}xR{p.ring} {p.placement} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
