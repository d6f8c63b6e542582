"""The examples run as written, and README.md's "Use" code is examples/use_cpu.py word for word.

    pytest tests/test_examples.py           # ~30 s on 2 cores: two 4-process CPU (gloo) runs under torchrun
"""
import os
import re
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def torchrun(nproc: int, script: str, *args: str, timeout: float, gpus: bool = False) -> str:
    """Run ``torchrun --nproc-per-node nproc examples/script args``; return its output, fail on a non-zero exit.
    ``gpus=False`` hides the GPUs (the CPU runs start more ranks than a GPU machine may have GPUs)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           os.path.join(ROOT, "examples", script), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if not gpus:
        env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def readme_block(section: str, index: int) -> str:
    """The ``index``-th ```python block of README.md's ``## section``."""
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    body = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", body, flags=re.S)[index]


def test_readme_use_examples_are_the_files():
    for index, script in enumerate(("use_cpu.py", "use_gpu.py")):
        with open(os.path.join(ROOT, "examples", script), encoding="utf-8") as f:
            assert readme_block("Use", index) == f.read(), f"README.md's Use block {index} differs from {script}"


@pytest.mark.timeout(200)
def test_use_cpu_example_matches_pytorch():
    out = torchrun(4, "use_cpu.py", timeout=180)
    assert "Ulysses 2 x ring 2: output and gradients match PyTorch" in out


@pytest.mark.timeout(200)
def test_quickstart_uses_ulysses_and_ring_and_checks_gradients():
    out = torchrun(4, "quickstart.py", timeout=180)
    assert "Ulysses 2 x ring 2 on 4 ranks" in out
    assert all(f"  {name}: max |usp - float64|" in out for name in ("out", "dq", "dk", "dv")), out


@pytest.mark.timeout(600)
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_use_gpu_example_on_two_gpus():
    out = torchrun(2, "use_gpu.py", timeout=580, gpus=True)
    assert "output and gradients within 2x" in out
