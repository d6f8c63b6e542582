"""CI: check a usp wheel installed in a fresh virtual environment, run from outside the source tree.

    python -I check_wheel.py dist/usp-<version>-py3-none-any.whl       # .ci/run does this from a temporary folder

Checks: the wheel holds one top-level package, ``usp`` (the planner inside it at ``usp/planner``, the fused
merge's sources at ``usp/csrc``); ``import usp`` loads the installed package; ``usp._csrc.csrc_dir()`` finds the
sources there (nothing is compiled); every planner preset loads; ``usp.plan`` plans; the ``usp-plan`` command
prints its help and a plan.
"""
import importlib.util
import json
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

wheel = Path(sys.argv[1])
site = Path(sysconfig.get_paths()["purelib"]).resolve()
assert not (Path.cwd() / "usp").exists(), "run this outside the source tree"

import usp  # noqa: E402
from usp import _csrc  # noqa: E402

assert Path(usp.__file__).resolve() == site / "usp" / "__init__.py", usp.__file__
top_level = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
assert top_level == {"usp", f"usp-{usp.__version__}.dist-info"}, top_level
assert importlib.util.find_spec("planner") is None, "the wheel must not install a top-level 'planner'"

sources = _csrc.csrc_dir()
assert sources is not None and sources.resolve() == site / "usp" / "csrc", sources
assert _csrc.fused_merge_status() == "not built yet"  # finding the sources compiles nothing

from usp import planner  # noqa: E402

presets = planner.list_presets()
assert presets, "no planner presets installed"
for name in presets:
    planner.load_topology(name)
plan = usp.plan(8, seqlen="32k", heads=32, kv_heads=8)
assert plan.ulysses * plan.ring == 8, plan

usp_plan = Path(sys.executable).with_name("usp-plan")
shown = subprocess.run([usp_plan, "--help"], capture_output=True, text=True, timeout=120)
assert shown.returncode == 0 and "usp-plan" in shown.stdout, shown.stderr
shown = subprocess.run([usp_plan, "--world-size", "8", "--seqlen", "32k", "--heads", "32", "--kv-heads", "8",
                        "--format", "json"], capture_output=True, text=True, timeout=120)
assert shown.returncode == 0, shown.stderr
picked = json.loads(shown.stdout)
assert (picked["ulysses"], picked["ring"]) == (plan.ulysses, plan.ring), picked

print(f"wheel {wheel.name}: installed at {site / 'usp'}, fused-merge sources in {sources}, presets "
      f"{', '.join(presets)} load, usp.plan and usp-plan pick {plan.ulysses}x{plan.ring}")
