"""usp: exact attention over very long sequences split across GPUs (Ulysses x ring), with a planner.

Public API (see README.md): ``SequenceParallelMesh``, ``LongContextAttention``, ``long_context_attention``,
``shard``, ``gather``, ``position_ids``, ``plan``, ``Plan``, ``resolve_backend``, ``available_backends``.
Importing usp has no side effects: no process groups, no CUDA initialisation, no environment changes.
"""
from .attention import LongContextAttention, long_context_attention
from .kernels import AttentionKernel, available_backends, resolve_backend
from .layout import gather, position_ids, shard
from .mesh import Placement, SequenceParallelMesh
from .varlen import (LongContextAttentionVarlen, VarlenLayout, gather_varlen, long_context_attention_varlen,
                     padding_mask_varlen, position_ids_varlen, shard_varlen, varlen_layout)

__version__ = "0.1.0"  # the one version source: pyproject.toml reads it from here

# The planner's sources are the repository's top-level planner/ directory; an install places them at usp/planner
# (setup.py). Imported from a checkout itself (its root first on sys.path, e.g. `python -m pytest` run there), this
# package is the checkout's usp/, which has no planner/: then the checkout root is searched too, so that
# `usp.planner` is the checkout's planner/. Nothing is imported here.
import os as _os  # noqa: E402

_root = _os.path.dirname(_os.path.abspath(__path__[0]))
if not _os.path.isdir(_os.path.join(__path__[0], "planner")) and all(
        _os.path.isfile(_os.path.join(_root, *name)) for name in (("pyproject.toml",), ("planner", "__init__.py"))):
    __path__.append(_root)
del _os, _root

__all__ = [
    "AttentionKernel",
    "LongContextAttention",
    "Placement",
    "SequenceParallelMesh",
    "available_backends",
    "gather",
    "long_context_attention",
    "position_ids",
    "resolve_backend",
    "shard",
    "LongContextAttentionVarlen",
    "VarlenLayout",
    "gather_varlen",
    "long_context_attention_varlen",
    "padding_mask_varlen",
    "position_ids_varlen",
    "shard_varlen",
    "varlen_layout",
]


def __getattr__(name):
    # The planner (usp.planner) is imported on first use, so `import usp` stays light.
    if name in ("plan", "Plan"):
        from . import planner

        return getattr(planner, name)
    raise AttributeError(f"module 'usp' has no attribute {name!r}")
