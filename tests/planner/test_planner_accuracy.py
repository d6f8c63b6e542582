"""The cost model against every recorded fwd+bwd run of the current code (``benchmarks/data``): 2x H100 (targets,
16K-256K, the 32K repeat, 1M-2M with head chunks) and 2x H200 (targets), each predicted with the probe taken on
its machine. Issue 16: mean error within 5%, no run outside 10%.

Before the distributed overheads (``collectives.step_overhead_us``, ``collectives.compute_slowdown``) every run was
predicted low: mean -6.1% on H200 and -9% to -13% at 32K (``test_without_the_overheads_the_model_is_low``).
"""
import dataclasses
import json
from pathlib import Path

import pytest

from usp import planner

DATA = Path(__file__).resolve().parents[2] / "benchmarks" / "data"
H100 = DATA / "probe_h100x2_heads_20261125.yaml"
RUNS = [("targets_cudnn_20261125b.jsonl", H100), ("planner_cudnn_16k_256k_20261125b.jsonl", H100),
        ("targets_cudnn_32k_repeat_20261125.jsonl", H100), ("scale_chunks1_20261125.jsonl", H100),
        ("scale_chunks8_20261125.jsonl", H100), ("scale_chunks8b_20261125.jsonl", H100),
        ("scale_chunks16_20261125.jsonl", H100),
        ("targets_cudnn_h200x2_20261130.jsonl", DATA / "probe_h200x2_20261130.yaml")]


def errors(overheads: bool = True) -> list:
    """``[(file, seqlen, heads, kv_heads, causal, mesh, head_chunks, predicted / measured - 1)]``."""
    out = []
    for name, probe in RUNS:
        topo = planner.load_topology(str(probe))
        if not overheads:
            topo = dataclasses.replace(topo, collectives=dataclasses.replace(topo.collectives, step_overhead=0.0,
                                                                              compute_slowdown=0.0))
        for line in (DATA / name).read_text().splitlines():
            r = json.loads(line)
            if r.get("method") != "usp" or r.get("mode") != "fwdbwd" or r.get("status") != "ok":
                continue
            c, m = r["config"], r["mesh"]
            chunks = r.get("head_chunks") or 1
            p = planner.predict(m["ulysses"], m["ring"], c["seqlen"], c["heads"], c["kv_heads"],
                                head_dim=c["head_dim"], batch=c["batch"], dtype=c["dtype"], causal=c["causal"],
                                topology=topo, world_size=r["gpus"], kernel=r["kernel"], head_chunks=chunks)
            out.append((name, c["seqlen"], c["heads"], c["kv_heads"], c["causal"], f"{m['ulysses']}x{m['ring']}",
                        chunks, p.total * 1e3 / r["median_ms"] - 1))
    return out


def test_recorded_runs_are_predicted_within_bounds():
    errs = errors()
    assert len(errs) == 24 + 16 + 8 + 1 + 2 + 1 + 1 + 24
    mean = sum(e[-1] for e in errs) / len(errs)
    assert abs(mean) < 0.05, f"mean error {mean:+.1%}"
    worst = max(errs, key=lambda e: abs(e[-1]))
    assert abs(worst[-1]) <= 0.10, f"worst: {worst}"
    h200 = [e[-1] for e in errs if "h200" in e[0]]
    assert abs(sum(h200) / len(h200)) < 0.05


def test_without_the_overheads_the_model_is_low():
    errs = errors(overheads=False)
    assert all(e[-1] < 0.02 for e in errs)
    h200 = [e[-1] for e in errs if "h200" in e[0]]
    assert sum(h200) / len(h200) == pytest.approx(-0.061, abs=0.003)  # issue 16: "mean -6.1%"
