"""Data helpers for causal-LM training under sequence parallelism: shard a batch, an exact loss, gradient sums.

Legend: ``b`` batch, ``S`` global sequence length, ``P = U * R`` sequence-parallel size, ``V`` vocabulary.

Note [labels are shifted before sharding]. A causal LM predicts token ``t + 1`` at position ``t``. Transformers'
own loss shifts the labels inside the model (``labels[..., 1:]``), which is wrong on a shard: a rank's next token
lives on another rank (and with the zigzag layout a shard is two distant pieces). ``shard_batch`` therefore shifts
the *global* labels first (``shift_labels[:, t] = labels[:, t + 1]``, the last position gets ``ignore_index``) and
then shards them with the same layout as ``input_ids``: every rank's ``shift_labels`` are the next tokens in global
order. The returned key is ``shift_labels`` (not ``labels``) so it is never shifted a second time.

Note [the exact loss and its gradient]. The loss of a replica is ``sum of token losses / number of non-ignored
tokens`` over the whole global sequence. ``causal_lm_loss`` returns this rank's *partial* loss: the sum of its own
token losses divided by the *global* count (all-reduced over the sequence-parallel group: the Ulysses group, then
the ring group). Hence:

* the replica's loss is ``reduce_loss(partial)`` (the sum of the partial losses over the SP group);
* ``partial.backward()`` on every rank gives each rank's exact contribution to every parameter gradient, and the
  true gradient is their *sum* over the SP group: call ``all_reduce_gradients(model, mesh)`` after backward.

Data parallel (an outer DP dimension, each replica on its own batch): the loss above is the per-replica mean. Either

* average gradients over the DP group only (DDP/FSDP built on the DP group, or
  ``all_reduce_gradients(model, mesh, data_parallel_group=...)``) after summing over SP as above; or
* let DDP/FSDP average over the *whole* DP x SP world and backward ``partial * mesh.sequence_parallel_size``:
  the world average of ``P`` partial gradients times ``P`` is exactly the SP sum, averaged over DP.

Either way the result is the mean over replicas of per-replica token means (standard DDP semantics). For a
token-weighted mean over all replicas, pass ``global_count=`` the count all-reduced over DP as well, and sum
(not average) over DP.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Mapping, Optional, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..layout import check_sequence_length, position_ids, shard
from ..mesh import SequenceParallelMesh

__all__ = [
    "IGNORE_INDEX",
    "shift_labels",
    "shard_batch",
    "shard_packed_batch",
    "global_token_count",
    "causal_lm_loss",
    "reduce_loss",
    "all_reduce_gradients",
]

Tensor = torch.Tensor

#: the label value that is not trained on (PyTorch's and transformers' default)
IGNORE_INDEX = -100

_SEQUENCE_KEYS = ("input_ids", "inputs_embeds", "labels", "attention_mask")
_PADDING_MESSAGE = (
    "has zeros (padding or packed documents); usp's dense path attends to every token of the global sequence, so "
    "padded or packed batches must go through the varlen path (cu_seqlens, usp.long_context_attention_varlen). "
    "For unpadded batches drop the mask or pass all ones"
)


def _check_mesh(mesh) -> None:
    if not isinstance(mesh, SequenceParallelMesh):
        raise TypeError(f"mesh must be a usp.SequenceParallelMesh, got {type(mesh).__name__}")


def shift_labels(labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Next-token targets of *global* ``labels [..., S]``: ``out[..., t] = labels[..., t + 1]``, last = ignore_index.

    Call it on the full sequence, before sharding (``shard_batch`` does; see Note [labels are shifted before
    sharding]).
    """
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.ndim < 1:
        raise TypeError(f"labels must be an integer tensor [..., seq], got {labels!r:.80}")
    return F.pad(labels[..., 1:], (0, 1), value=ignore_index)


def shard_batch(
    batch: Mapping[str, Tensor],
    mesh: SequenceParallelMesh,
    *,
    causal: bool = True,
    ignore_index: int = IGNORE_INDEX,
) -> Dict[str, Tensor]:
    """This rank's part of a *global* causal-LM batch, in the layout usp attention expects.

    Args:
        batch: the same full batch on every rank of the sequence-parallel group, with ``input_ids [b, S]`` (or
            ``inputs_embeds [b, S, hidden]``), optionally ``labels [b, S]`` (unshifted, as for a transformers causal
            LM; ``ignore_index`` marks positions not trained on) and ``attention_mask [b, S]`` (must be all ones:
            padded/packed batches go through the varlen path; the mask is not returned).
        mesh: the ``usp.SequenceParallelMesh``. ``S`` must be a multiple of what the layout needs
            (``usp.layout.required_multiple(U, R, causal)``); the error says how much to pad.
        causal: the layout: ``True`` (zigzag when ring > 1) for causal attention; must match the attention (and
            ``usp.integrations.transformers.enable(..., causal=...)``).
        ignore_index: the label value to skip; also put at the last global position of ``shift_labels``.

    Returns:
        ``{"input_ids" or "inputs_embeds": [b, S/P(, hidden)], "position_ids": [b, S/P] (global positions, from
        usp.position_ids), "shift_labels": [b, S/P] (only if labels were given)}``. Pass ``input_ids`` and
        ``position_ids`` to the model and ``shift_labels`` to ``causal_lm_loss``.
    """
    _check_mesh(mesh)
    if not isinstance(batch, Mapping):
        raise TypeError(f"batch must be a mapping of str to tensors, got {type(batch).__name__}")
    unknown = sorted(set(batch) - set(_SEQUENCE_KEYS))
    if unknown:
        raise ValueError(
            f"batch has keys {unknown} that shard_batch does not know how to shard; valid keys: {list(_SEQUENCE_KEYS)} "
            "(position_ids are computed from the layout; packed batches go through the varlen path)"
        )
    inputs = [key for key in ("input_ids", "inputs_embeds") if batch.get(key) is not None]
    if len(inputs) != 1:
        raise ValueError(f"batch needs exactly one of 'input_ids' or 'inputs_embeds', got {inputs or 'neither'}")
    key = inputs[0]
    tokens = batch[key]
    if not isinstance(tokens, torch.Tensor) or tokens.ndim != (2 if key == "input_ids" else 3):
        want = "[batch, seq]" if key == "input_ids" else "[batch, seq, hidden]"
        raise ValueError(f"batch[{key!r}] must be a tensor {want}, got {getattr(tokens, 'shape', type(tokens))}")
    b, seqlen = tokens.shape[:2]
    check_sequence_length(seqlen, mesh.ulysses, mesh.ring, causal, argument=f"batch[{key!r}].shape[1]")
    for name in ("labels", "attention_mask"):
        value = batch.get(name)
        if value is not None and (not isinstance(value, torch.Tensor) or tuple(value.shape) != (b, seqlen)):
            raise ValueError(
                f"batch[{name!r}] must have shape [batch, seq] = {(b, seqlen)}, got {getattr(value, 'shape', value)}"
            )
    mask = batch.get("attention_mask")
    if mask is not None and not bool(mask.bool().all()):
        raise ValueError("batch['attention_mask'] " + _PADDING_MESSAGE)

    out = {key: shard(tokens, mesh, dim=1, causal=causal)}
    out["position_ids"] = position_ids(seqlen, mesh, causal=causal, device=tokens.device).unsqueeze(0).expand(b, -1)
    labels = batch.get("labels")
    if labels is not None:
        out["shift_labels"] = shard(shift_labels(labels, ignore_index), mesh, dim=1, causal=causal)
    return out


def shard_packed_batch(
    input_ids: Tensor,
    cu_seqlens,
    mesh: SequenceParallelMesh,
    *,
    labels: Optional[Tensor] = None,
    causal: bool = True,
    ignore_index: int = IGNORE_INDEX,
) -> Dict[str, object]:
    """This rank's part of a *packed* batch (documents concatenated, no padding) for the varlen path.

    Args:
        input_ids: ``[total]`` or ``[1, total]``, the whole packed batch on every rank.
        cu_seqlens: global document boundaries ``[0, L_0, L_0 + L_1, ..., total]`` (list or int tensor).
        mesh: the ``usp.SequenceParallelMesh``.
        labels: like ``input_ids``, unshifted; shifted *within* each document (a document's last token has no
            target), then sharded. Padding rows the layout adds get ``ignore_index``.
        causal: must match the attention.

    Returns:
        ``{"input_ids": [1, t_local], "position_ids": [1, t_local] (restarting per document), "cu_seq_lens_q",
        "cu_seq_lens_k" (the global boundaries, an int32 CPU tensor), "max_length_q", "max_length_k",
        "shift_labels": [1, t_local] (if labels)}``: pass everything but ``shift_labels`` to the model (transformers
        forwards the ``cu_seq_lens_*`` kwargs to the attention function, which runs
        ``usp.long_context_attention_varlen``) and ``shift_labels`` to ``causal_lm_loss``. Needs usp's varlen
        module (``usp.varlen``).
    """
    from ..varlen import position_ids_varlen, shard_varlen  # the varlen path (issue 6)

    _check_mesh(mesh)
    squeeze = isinstance(input_ids, torch.Tensor) and input_ids.ndim == 2 and input_ids.shape[0] == 1
    if not isinstance(input_ids, torch.Tensor) or not (input_ids.ndim == 1 or squeeze):
        shape = getattr(input_ids, "shape", input_ids)
        raise ValueError(f"input_ids must be a packed [total] or [1, total] tensor, got {shape}")
    ids = input_ids[0] if squeeze else input_ids
    cu = torch.as_tensor(cu_seqlens, dtype=torch.int32).cpu()
    if cu.ndim != 1 or cu.numel() < 2 or int(cu[0]) != 0 or int(cu[-1]) != ids.shape[0] or bool((cu.diff() < 0).any()):
        raise ValueError(
            f"cu_seqlens must rise from 0 to total={ids.shape[0]} (the packed length), got {cu.tolist()}"
        )
    out: Dict[str, object] = {
        "input_ids": shard_varlen(ids, cu, mesh, dim=0, causal=causal).unsqueeze(0),
        "position_ids": position_ids_varlen(cu, mesh, causal=causal, device=ids.device).unsqueeze(0),
        "cu_seq_lens_q": cu,
        "cu_seq_lens_k": cu,
        "max_length_q": int(cu.diff().max()),
        "max_length_k": int(cu.diff().max()),
    }
    if labels is not None:
        labels = labels[0] if labels.ndim == 2 else labels
        if tuple(labels.shape) != tuple(ids.shape):
            raise ValueError(f"labels must have the shape of input_ids {tuple(ids.shape)}, got {tuple(labels.shape)}")
        targets = shift_labels(labels, ignore_index)
        ends = cu[1:].long() - 1  # each document's last token predicts nothing (the next token is another document)
        targets[ends[ends >= 0].to(targets.device)] = ignore_index
        out["shift_labels"] = shard_varlen(targets, cu, mesh, dim=0, causal=causal, pad_value=ignore_index).unsqueeze(0)
    return out


def _sequence_parallel_all_reduce(x: Tensor, mesh: SequenceParallelMesh) -> Tensor:
    """Sum ``x`` in place over the whole U x R block: over the Ulysses group, then over the ring group."""
    if mesh.ulysses > 1:
        dist.all_reduce(x, group=mesh.ulysses_group)
    if mesh.ring > 1:
        dist.all_reduce(x, group=mesh.ring_group)
    return x


def global_token_count(shift_labels: Tensor, mesh: SequenceParallelMesh, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Number of non-ignored targets over the whole sequence-parallel group (int64 scalar; a collective)."""
    _check_mesh(mesh)
    count = (shift_labels != ignore_index).sum().to(torch.int64)
    return _sequence_parallel_all_reduce(count, mesh)


def causal_lm_loss(
    logits: Tensor,
    shift_labels: Tensor,
    mesh: SequenceParallelMesh,
    *,
    ignore_index: int = IGNORE_INDEX,
    global_count: Optional[Tensor] = None,
) -> Tensor:
    """This rank's partial loss: sum of its token cross-entropies / the global count of non-ignored tokens.

    Args:
        logits: ``[b, S/P, V]`` of this rank's shard (any float dtype; the loss is computed in at least float32).
        shift_labels: ``[b, S/P]`` from ``shard_batch`` (already shifted, see the module notes).
        mesh: the mesh the batch was sharded on. Every rank of the SP group must call this (it all-reduces the
            count) unless ``global_count`` is given.
        global_count: a precomputed ``global_token_count`` (e.g. over several micro-batches for gradient
            accumulation, or all-reduced over DP too); default: this batch's count over the SP group.

    Returns:
        A scalar. Its sum over the SP group (``reduce_loss``) is the replica's mean token loss; backward of it on
        every rank, then ``all_reduce_gradients``, gives the exact gradient (see Note [the exact loss and its
        gradient]). A batch with no target at all gives 0, not NaN.
    """
    _check_mesh(mesh)
    if logits.ndim < 2 or tuple(logits.shape[:-1]) != tuple(shift_labels.shape):
        raise ValueError(
            f"logits [..., vocab] and shift_labels [...] must agree: logits {tuple(logits.shape)}, "
            f"shift_labels {tuple(shift_labels.shape)}"
        )
    if global_count is None:
        global_count = global_token_count(shift_labels, mesh, ignore_index)
    compute = torch.promote_types(logits.dtype, torch.float32)
    token_sum = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).to(compute),
        shift_labels.reshape(-1).to(logits.device),
        ignore_index=ignore_index,
        reduction="sum",
    )
    return token_sum / global_count.to(device=token_sum.device, dtype=compute).clamp(min=1)


def reduce_loss(partial_loss: Tensor, mesh: SequenceParallelMesh) -> Tensor:
    """The replica's loss: ``partial_loss`` summed over the sequence-parallel group (detached; a collective)."""
    _check_mesh(mesh)
    return _sequence_parallel_all_reduce(partial_loss.detach().clone(), mesh)


def all_reduce_gradients(
    model_or_parameters: Union[nn.Module, Iterable[nn.Parameter]],
    mesh: SequenceParallelMesh,
    *,
    data_parallel_group: Optional[dist.ProcessGroup] = None,
    bucket_bytes: int = 256 * 2 ** 20,
) -> None:
    """Sum parameter gradients over the sequence-parallel group (in place); optionally average over a DP group.

    Each rank's backward of its partial loss produces a partial gradient for every parameter (it saw only its
    tokens); their sum over the U x R group is the exact gradient. Parameters whose ``.grad`` is None are skipped
    (under sequence parallelism every rank runs the same code, so the set is the same on every rank). Gradients are
    reduced in flat buckets of at most ``bucket_bytes`` per (device, dtype).

    Args:
        model_or_parameters: a module (its parameters) or an iterable of parameters.
        mesh: the sequence-parallel mesh.
        data_parallel_group: if given (e.g. ``mesh.data_parallel_group``, or ``device_mesh.get_group("dp")``),
            gradients are then averaged over it. Leave None when DDP/FSDP on the DP group does that.
    """
    _check_mesh(mesh)
    params = model_or_parameters.parameters() if isinstance(model_or_parameters, nn.Module) else model_or_parameters
    grads = [p.grad for p in params if p.grad is not None]
    dp_size = dist.get_world_size(data_parallel_group) if data_parallel_group is not None else 1
    if mesh.sequence_parallel_size == 1 and dp_size == 1:
        return
    for bucket in _buckets(grads, bucket_bytes):
        in_place = len(bucket) == 1 and bucket[0].is_contiguous()
        flat = bucket[0].view(-1) if in_place else torch.cat([g.reshape(-1) for g in bucket])
        _sequence_parallel_all_reduce(flat, mesh)
        if dp_size > 1:
            dist.all_reduce(flat, group=data_parallel_group)
            flat.div_(dp_size)
        if in_place:
            continue
        offset = 0
        for g in bucket:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


def _buckets(grads: List[Tensor], bucket_bytes: int) -> List[List[Tensor]]:
    """Group gradients by (device, dtype), in order, into lists of at most ``bucket_bytes`` (at least one each)."""
    by_kind: Dict[Tuple[torch.device, torch.dtype], List[List[Tensor]]] = {}
    filled: Dict[Tuple[torch.device, torch.dtype], int] = {}
    for g in grads:
        kind, size = (g.device, g.dtype), g.numel() * g.element_size()
        lists = by_kind.setdefault(kind, [[]])
        if lists[-1] and filled[kind] + size > bucket_bytes:
            lists.append([])
            filled[kind] = 0
        lists[-1].append(g)
        filled[kind] = filled.get(kind, 0) + size
    return [bucket for lists in by_kind.values() for bucket in lists]
