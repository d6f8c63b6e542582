"""Lazy build of the CUDA extension in ``csrc/`` (the fused out/LSE merge), with a PyTorch fallback.

Nothing is compiled at import or install time: the first merge on a CUDA tensor calls ``fused_merge_op()``, which
builds ``csrc/`` with ``torch.utils.cpp_extension.load`` (nvcc + ninja; cached under ``TORCH_EXTENSIONS_DIR``, about
a minute the first time on a machine) and returns the op. The sources ship inside the package (``usp/csrc`` in an
install, see setup.py; ``csrc/`` beside ``usp/`` in a checkout): ``csrc_dir()`` says where. If they are missing, the
build fails, or ``USP_NO_CSRC=1`` is set, it warns once and returns ``None``; callers then use the PyTorch
implementation, which computes the same function.
"""
from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch

_SOURCES = ("merge_attention.cpp", "merge_attention_kernel.cu")
_FILES = _SOURCES + ("merge_attention.h",)  # what the build needs: the sources and the header they include
_lock = threading.Lock()
_state: dict = {}  # build result, computed once per process: {"op": callable or None, "reason": str}


def _csrc_candidates() -> tuple:
    package = Path(__file__).parent
    # an install (setup.py maps the repository's csrc/ to usp/csrc), then a checkout (csrc/ beside usp/)
    return package / "csrc", package.parent / "csrc"


def csrc_dir() -> Optional[Path]:
    """The directory holding the fused merge's sources and header (all of them), or ``None``. Compiles nothing."""
    for directory in _csrc_candidates():
        if all((directory / name).is_file() for name in _FILES):
            return directory
    return None


def _build() -> Optional[Callable]:
    if os.environ.get("USP_NO_CSRC") == "1":
        _state["reason"] = "USP_NO_CSRC=1"
        return None
    directory = csrc_dir()
    if directory is None:
        _state["reason"] = f"sources {list(_FILES)} not found in {[str(d) for d in _csrc_candidates()]}"
        return None
    sources = [directory / name for name in _SOURCES]
    from torch.utils import cpp_extension

    major, minor = torch.cuda.get_device_capability()
    arch = f"-gencode=arch=compute_{major}{minor},code=sm_{major}{minor}"
    try:
        cpp_extension.load(
            name="usp_csrc",
            sources=[str(p) for p in sources],
            extra_include_paths=[str(directory)],
            extra_cflags=["-O3"],
            extra_cuda_cflags=["-O3", arch],
            is_python_module=False,
            verbose=False,
        )
    except Exception as error:  # noqa: BLE001 -- any build failure means: use the fallback
        _state["reason"] = f"build failed: {type(error).__name__}: {str(error).strip().splitlines()[-1:]}"
        return None
    return torch.ops.usp_csrc.merge_attention_


def fused_merge_op() -> Optional[Callable]:
    """``torch.ops.usp_csrc.merge_attention_`` once built, or ``None`` (with a one-time warning saying why)."""
    if "op" not in _state:
        with _lock:
            if "op" not in _state:
                op = _build()
                if op is None:
                    warnings.warn(f"usp: fused merge kernel unavailable ({_state['reason']}); using PyTorch ops",
                                  RuntimeWarning, stacklevel=3)
                _state["op"] = op
    return _state["op"]


def fused_merge_status() -> str:
    """"built", "not built yet", or why the fallback is in use (for benchmark records)."""
    if "op" not in _state:
        return "not built yet"
    return "built" if _state["op"] is not None else _state["reason"]
