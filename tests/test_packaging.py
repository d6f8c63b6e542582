"""Packaging: the planner is usp.planner and the fused merge's sources are found (the wheel is checked by .ci/run)."""
import usp
from usp import _csrc


def test_fused_merge_sources_are_found_without_compiling():
    status = _csrc.fused_merge_status()
    directory = _csrc.csrc_dir()
    assert directory is not None
    assert {"merge_attention.cpp", "merge_attention_kernel.cu", "merge_attention.h"} <= {
        p.name for p in directory.iterdir()}
    assert _csrc.fused_merge_status() == status  # looking for the sources builds nothing


def test_planner_is_inside_usp():
    from usp import planner

    assert usp.plan is planner.plan and usp.Plan is planner.Plan
    assert planner.__name__ == "usp.planner" and planner.list_presets()
