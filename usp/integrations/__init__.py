"""Integrations of usp with training stacks. Nothing here is imported by ``import usp``.

* ``usp.integrations.transformers`` -- ``enable(model, mesh)``: a Hugging Face transformers model runs usp attention
  (needs ``transformers``, the ``[test]`` extra; imported only when you import that submodule).
* ``usp.integrations.data`` -- shard a causal-LM batch for the mesh (``shard_batch``; packed documents:
  ``shard_packed_batch``, for the varlen path), the exact loss over the
  sequence-parallel group (``causal_lm_loss``), ``reduce_loss`` and ``all_reduce_gradients``.
* ``usp.integrations.device_mesh`` -- ``split_context_parallel``: a torchtitan/accelerate style DeviceMesh whose
  context-parallel dim is one flattened ``cp`` dim becomes a Ulysses x ring ``SequenceParallelMesh``.

Importing this package has no side effects (no registration, no process groups).
"""
from .data import (
    IGNORE_INDEX,
    all_reduce_gradients,
    causal_lm_loss,
    global_token_count,
    reduce_loss,
    shard_batch,
    shard_packed_batch,
    shift_labels,
)
from .device_mesh import split_context_parallel

__all__ = [
    "IGNORE_INDEX",
    "all_reduce_gradients",
    "causal_lm_loss",
    "global_token_count",
    "reduce_loss",
    "shard_batch",
    "shard_packed_batch",
    "shift_labels",
    "split_context_parallel",
]
