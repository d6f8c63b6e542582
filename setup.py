"""What pyproject.toml cannot say: the package list, with the directories that install inside ``usp``.

The repository keeps the planner and the CUDA sources at the top level (``planner/``, ``csrc/``). An install places
them inside the package, as ``usp/planner`` (imported as ``usp.planner``) and ``usp/csrc`` (the fused merge's
sources, found there by ``usp._csrc.csrc_dir()`` and compiled on first use, never at install time), so the
distribution claims no top-level name but ``usp``. Everything else is in pyproject.toml.
"""
from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["usp", "usp.*"]) + ["usp.planner", "usp.csrc"],
    package_dir={"usp.planner": "planner", "usp.csrc": "csrc"},
    package_data={"usp.planner": ["presets/*.yaml"], "usp.csrc": ["*.cpp", "*.cu", "*.h"]},
)
