"""Picks and predictions on the shipped presets, pinned (``data/preset_pins.json``, written by ``_pins.py``).

First recorded from the planner that routed every GPU pair through networkx, before the per-host-class fabric of
issue 16 (Note [host classes] in ``planner/topology.py``): that rewrite left every pick and number unchanged
(relative 1e-12). Re-recorded once after, when the cost model gained its distributed overheads (issue 16, the bias
on measured runs; ``planner.cost``): the predictions grew by them and two picks moved, both away from long rings of
little work per step: l20-pcie 4 GPUs 64K 16/4 heads U1xR4 -> U2xR2, and 128 GPUs 256K 64/8 non-causal U8xR16 ->
U32xR4.
"""
import json

import pytest

from _pins import CASES, PINS, case_id, record

PINNED = json.loads(PINS.read_text())


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_preset_pick_and_predictions_are_pinned(case):
    pinned, now = PINNED[case_id(case)], record(case)
    assert now["pick"] == pinned["pick"]
    assert [c[:4] for c in now["candidates"]] == [c[:4] for c in pinned["candidates"]]
    for got, want in zip(now["candidates"], pinned["candidates"]):
        if want[4] is None:  # rejected before costing (heads not divisible)
            assert got[4:] == want[4:]
        else:
            assert got[4:] == pytest.approx(want[4:], rel=1e-12), got[:3]
