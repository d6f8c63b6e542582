"""The preset cases whose picks and predictions ``test_planner_pins.py`` pins, and the code that records them.

    python tests/planner/_pins.py        # rewrite data/preset_pins.json from the current planner

The pins were first recorded from the planner that routed every GPU pair through networkx (before issue 16), so
the per-host-class fabric cost must give the same picks and the same numbers.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

PINS = Path(__file__).resolve().parent / "data" / "preset_pins.json"

#: (topology, world, seqlen, heads, kv_heads, extra kwargs of planner.plan)
CASES = [
    ("dgx-h100", 8, "128k", 32, 8, {}),
    ("dgx-h100", 8, "32k", 32, 32, {"causal": False}),
    ("dgx-a100", 8, "32k", 32, 32, {}),
    ("dgx-a100", 8, "128k", 32, 8, {"causal": False}),
    ("l20-pcie", 8, "32k", 32, 8, {"forward_only": True}),
    ("l20-pcie", 8, "128k", 32, 8, {}),
    ("l20-pcie", 4, "64k", 16, 4, {}),
    ("h100-nvlink-2x", 2, "128k", 32, 8, {}),
    ("h100-nvlink-2x", 2, "32k", 32, 32, {"causal": False}),
    ("dgx-h100-cluster", 16, "128k", 32, 8, {}),
    ("dgx-h100-cluster", 16, "1M", 32, 8, {"causal": False}),
    ("dgx-h100-cluster", 16, "1M", 32, 8, {"gpus_per_node": 4}),
    ("dgx-h100-cluster", 24, "768k", 24, 8, {}),
    ("dgx-h100-cluster", 32, "256k", 64, 8, {}),
    ("dgx-h100-cluster", 64, "1M", 32, 8, {}),
    ("dgx-h100-cluster", 64, "256k", 32, 32, {}),
    ("dgx-h100-cluster", 64, "1M", 32, 8, {"sequence_parallel_size": 16}),
    ("dgx-h100-cluster", 128, "256k", 64, 8, {"causal": False}),
    ("dgx-h100-cluster", 128, "2M", 128, 8, {}),
    ("dgx-h100-cluster", 256, "4M", 64, 8, {}),
    ("l20-pcie", 4, "64k", 32, 32, {"gpus_per_node": 4}),
    ("dgx-h100-cluster", 16, "256k", 32, 8, {"gpus_per_node": 2, "sequence_parallel_size": 8}),
]


def case_id(case) -> str:
    topo, world, seqlen, heads, kv, extra = case
    more = ",".join(f"{k}={v}" for k, v in sorted(extra.items()))
    return f"{topo}/{world}/{seqlen}/{heads}-{kv}" + (f"/{more}" if more else "")


def record(case) -> dict:
    """The pick and every candidate's predicted totals and memory for one case."""
    from usp import planner

    topo, world, seqlen, heads, kv, extra = case
    p = planner.plan(world, seqlen, heads, kv, topology=topo, **extra)
    return {"pick": [p.ulysses, p.ring, p.placement, p.head_chunks],
            "candidates": [[c.ulysses, c.ring, c.placement, c.feasible, c.forward and c.forward.total,
                            c.backward and c.backward.total, c.memory and c.memory.peak] for c in p.candidates]}


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    PINS.parent.mkdir(exist_ok=True)
    PINS.write_text(json.dumps({case_id(c): record(c) for c in CASES}, indent=1) + "\n")
    print(f"wrote {PINS} ({len(CASES)} cases)")
