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

__version__ = "0.1.0"

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
    # The planner is a sibling top-level package; resolved on first use so `import usp` stays light.
    if name in ("plan", "Plan"):
        import planner

        return getattr(planner, name)
    raise AttributeError(f"module 'usp' has no attribute {name!r}")
