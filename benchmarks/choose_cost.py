"""CPU cost of ``usp.choose`` per batch (issue 14: under 1 ms for 1,000 documents).

    python benchmarks/choose_cost.py [--documents 1000] [--calls 2000] [--same-batch]
    python benchmarks/choose_cost.py --topology benchmarks/data/gpu_20261130e/probe_fa2.yaml --kernel fa2 \
        --meshes 2x1,1x2

A long-tailed batch of ``--documents`` documents (seeded), three meshes of 8 GPUs (8x1, 2x4, 1x8) on the
``dgx-h100`` preset (a profile without varlen points: the fall-off form of ``planner.batch``), or ``--meshes`` on
``--topology`` (a probe's, with varlen points: the measured form), GQA 32/8; the chooser is built and warmed once
(as a training loop would), then the median wall time of ``--calls`` calls of ``usp.choose(cu_seqlens, meshes,
...)`` with a list ``cu_seqlens``. Every call is timed as for a new batch (a training loop's case): the caches of
document placements (``planner.batch.forget_placements``) are emptied before each one; ``--same-batch`` keeps them
(the same batch again: the placements are looked up).
"""
import argparse
import statistics
import time
from types import SimpleNamespace

import numpy as np

import usp
from usp.planner import batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--documents", type=int, default=1000)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--same-batch", action="store_true", help="keep the placement cache between calls")
    parser.add_argument("--topology", default="dgx-h100", help="preset name or topology YAML")
    parser.add_argument("--kernel", default="torch_flash")
    parser.add_argument("--meshes", default="8x1,2x4,1x8", help="UxR, comma-separated")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    lengths = np.minimum((64 * (1 - rng.random(args.documents)) ** (-1 / 1.1)).astype(int), 65536)
    cu = [0] + np.cumsum(lengths).tolist()
    meshes = [SimpleNamespace(ulysses=u, ring=r) for u, r in (map(int, m.split("x")) for m in args.meshes.split(","))]
    options = dict(heads=32, kv_heads=8, topology=args.topology, kernel=args.kernel)
    pick = usp.choose(cu, meshes, **options)  # builds and warms the chooser
    times = []
    for _ in range(args.calls):
        if not args.same_batch:
            batch.forget_placements()  # a new batch: its placements are computed in the call
        t = time.perf_counter()
        usp.choose(cu, meshes, **options)
        times.append(time.perf_counter() - t)
    print(f"{args.documents} documents, {sum(lengths)} tokens, {len(meshes)} meshes: pick U{pick.ulysses}xR{pick.ring}; "
          f"median {statistics.median(times) * 1e6:.0f} us, p90 {sorted(times)[int(0.9 * len(times))] * 1e6:.0f} us "
          f"per call ({args.calls} calls, {'same batch' if args.same_batch else 'as new batches'})")


if __name__ == "__main__":
    main()
