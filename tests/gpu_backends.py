"""Which GPU backends a GPU test run covers, and which must be there (a present-but-failing or a required-but-missing
backend is a failure, never a skip).

* ``USP_GPU_TEST_BACKENDS=fa2,cudnn`` narrows a run to some backends (default: every backend "auto" can pick on a
  GPU, i.e. every registered backend but the CPU reference).
* ``USP_GPU_REQUIRE=fa4,cudnn,torch_flash`` (or ``all``) names backends whose absence fails the run: set it on the
  GPU machine to what was installed for that run (flash-attn 2 and flash-attn-4 both install the package
  ``flash_attn``, so one process has one of them).
"""
from __future__ import annotations

import json
import os
from typing import Tuple

import pytest


def gpu_backends() -> Tuple[str, ...]:
    from usp.kernels import BACKENDS

    every = tuple(name for name in BACKENDS if name != "reference")
    chosen = os.environ.get("USP_GPU_TEST_BACKENDS")
    return tuple(chosen.split(",")) if chosen else every


def required_backends() -> Tuple[str, ...]:
    value = os.environ.get("USP_GPU_REQUIRE", "")
    if value == "all":
        return gpu_backends()
    return tuple(name for name in value.split(",") if name)


def skip_unless_required(backend: str, reason: str) -> None:
    """Skip a test of an absent backend, or fail it when the run requires that backend."""
    if backend in required_backends():
        pytest.fail(f"backend {backend} is required (USP_GPU_REQUIRE) but unavailable: {reason}")
    pytest.skip(f"backend {backend} unavailable here: {reason}")


def save_report(data) -> None:
    """Write ``data`` as JSON to ``USP_TEST_REPORT`` when it is set (``benchmarks/gpu_suite.sh`` keeps one report
    per test file)."""
    report = os.environ.get("USP_TEST_REPORT")
    if report:
        with open(report, "w") as f:
            json.dump(data, f, indent=1)
