"""Packed variable-length documents (``cu_seqlens``) through Ulysses x ring, load-balanced per document.

A packed batch is ``[total, heads, head_dim]`` (``flash_attn_varlen_func``'s layout) with document ``j`` at rows
``cu_seqlens[j]:cu_seqlens[j+1]``; no token attends across a document boundary. ``cu_seqlens`` is the *global*
boundaries of the whole packed batch, identical on every rank; everything else (padding, chunking, each rank's
rows, the kernel calls of every ring block) is a pure function of ``(cu_seqlens, ulysses, ring, causal)``, built once
and cached (``varlen_layout``).

Note [varlen zigzag layout]. Load balance must hold per document: a batch of one long document and many short ones
cut contiguously would leave the rank with the long document's tail doing most of the causal work. So every
document that is cut over the ring is cut on its own, exactly like the dense zigzag (Note [zigzag layout] in
``usp.layout``):

* causal, ``R > 1``: document ``j`` (length ``L_j``) is padded at its end to ``2R * c_j`` tokens,
  ``c_j = ceil(L_j / 2R)``, and cut into ``2R`` chunks of ``c_j``. Ring rank ``r`` holds chunk ``r`` (head) and
  chunk ``2R-1-r`` (tail) of *every cut* document, all heads first, then all tails::

      ring rank r:  [ head_0 ... head_n | tail_0 ... tail_n | whole documents of r | padding ]

  so the dense zigzag schedule's row halves of the cut section still mean "the head chunks" and "the tail chunks"
  and every rank does the same causal work for every cut document. A ring block is then a few varlen calls whose
  sequences are the chunks: the diagonal block is heads x heads (causal) + tails x heads + tails x tails (causal),
  merged, plus one call over the rank's whole documents; "all queries x the visiting heads" is two calls; "our
  tails x all visiting K/V" is two calls, merged. Every call covers its rows whole, so no kernel needs ``seqused``.
* non-causal, or ``R == 1``: ``R`` chunks per cut document (``c_j = ceil(L_j / R)``), rank ``r`` holds chunk ``r``
  of every cut document; one varlen call per block (plus the whole documents' call on the diagonal).
* Ulysses: each ring rank's rows are split into ``U`` equal contiguous pieces (the all-to-all concatenates them
  back, as in the dense path); the whole section's padding makes the row count a multiple of ``U``.

Note [document placement]. Cutting every document costs: a document of a few hundred tokens cut into ``2R`` chunks
runs as ``2R`` tiny sequences per call (tiles mostly empty), in three calls on the diagonal and two per later step,
and its K/V travel round the ring. A document whose work is small next to a rank's share need not be cut: placed
whole on one ring rank it costs one sequence of one call and no transfer. ``usp.spec.varlen_placement`` (the rule;
the planner prices the same) cuts only the documents whose work (attention area plus a tile row per token) is a
large share of a rank's, and places the others whole, balancing work and tokens per ring rank to within
``1/PLACEMENT_SLACK`` of the mean (else it cuts everything: the zigzag balances any batch). Only the cut section's
K/V and dK/dV travel (``VarlenSchedule.traveling_rows``: a prefix of the sequence); a batch with no cut document
does no ring transfer at all (``usp.spec.layer_collectives(documents_cut=False)``). Whole documents are laid out
in order after the cut section; the padding after them is one more sequence of their call, with no keys and no
queries (out = 0, LSE = -inf), so a rank holding whole documents computes its diagonal block in one call when
nothing is cut (a rank with none leaves its padding rows to no call: the same zeros).

Sliding windows (``window_size``, over positions inside each document) keep this layout: each block's calls are
the window's trimmed pieces per document, one call per distinct mask (Note [varlen windows] at
``VarlenSchedule._window_calls``).

Padding is never attended and never attends. In every call, a document's real query rows and real key rows
(prefixes of its chunks) form one sequence, its padding queries a sequence with no keys and its padding keys one
with no queries (the padding after a rank's whole documents likewise): padding rows come out as out = 0,
LSE = -inf, zero gradients, with no mask applied afterwards (the returned LSE is set to -inf there once more,
since sinks add their logit to every row).

Modules: this file is the public API (validation, ``long_context_attention_varlen``), as ``usp.attention`` is for
dense input; the layout and the shard/gather helpers are ``usp.layout_varlen`` (next to ``usp.layout``), the ring
schedule ``usp.schedule_varlen``, the kernels ``usp.kernels.varlen`` and their ring adapter
``usp.kernels.varlen_block``; the module class is ``usp.modules`` (``LongContextAttention`` takes both inputs).
Their names are re-exported here.
"""
from __future__ import annotations

import numbers
from typing import Optional, Tuple, Union

import torch

from .attention import (call_fields, check_deterministic, check_device_matches_mesh, check_mask_options, check_qkv,
                        mask_fields, resolve_scale, sequence_parallel_attention)
from .consistency import agree
from .kernels.base import MaskNeeds
from .kernels.varlen import VarlenKernel, resolve_varlen_backend
from .kernels.varlen_block import VarlenBlockKernel
from .layout import normalize_window
from .mesh import SequenceParallelMesh
# the layout, its helpers and the schedule live next to their dense counterparts; re-exported here (public names and
# the private ones other modules and tests use)
from .layout_varlen import (VarlenLayout, _build_layout, _check_causal, _check_mesh, _cu_seqlens_tuple,  # noqa: F401
                            _device_padding, _documents, _local_rows, _ring_rows, gather_varlen, padding_mask_varlen,
                            position_ids_varlen, shard_varlen, varlen_layout)
from .schedule_varlen import VarlenSchedule, _schedule_for_layout  # noqa: F401

__all__ = [
    "LongContextAttentionVarlen",
    "VarlenLayout",
    "gather_varlen",
    "long_context_attention_varlen",
    "padding_mask_varlen",
    "position_ids_varlen",
    "shard_varlen",
    "varlen_layout",
]

Tensor = torch.Tensor


# ---------------------------------------------------------------------------------------------- attention
_VARLEN_DIMS = ("total_local_tokens", "heads", "head_dim")


def _validate(q, k, v, cu_seqlens, max_seqlen, mesh, causal, softmax_scale, backend, deterministic=False,
              window_size=(-1, -1), softcap=0.0, sinks=None):
    _check_mesh(mesh)
    check_qkv(q, k, v, mesh, causal, _VARLEN_DIMS)
    window, softcap = check_mask_options(window_size, softcap, sinks, q, causal)
    t, h, d = q.shape
    layout = _build_layout(_cu_seqlens_tuple(cu_seqlens), mesh.ulysses, mesh.ring, causal)
    longest = max(layout.doc_lengths)
    if max_seqlen is not None:
        if isinstance(max_seqlen, torch.Tensor) and max_seqlen.numel() == 1 and not max_seqlen.is_floating_point():
            max_seqlen = int(max_seqlen)
        if not isinstance(max_seqlen, numbers.Integral) or isinstance(max_seqlen, bool):
            raise TypeError(f"max_seqlen must be an int or None, got {type(max_seqlen).__name__}")
        if max_seqlen < longest:
            raise ValueError(
                f"max_seqlen={max_seqlen} is smaller than the longest document in cu_seqlens ({longest}); "
                f"pass max_seqlen >= {longest} or None"
            )
    if t != layout.local_tokens:
        raise ValueError(
            f"q.shape[0]={t} but cu_seqlens (total {layout.total}, {len(layout.doc_lengths)} documents) on this "
            f"mesh (ulysses={mesh.ulysses}, ring={mesh.ring}, causal={causal}) gives {layout.local_tokens} rows per "
            f"rank; shard the packed batch with usp.shard_varlen(x, cu_seqlens, mesh, causal={causal})"
        )
    scale = resolve_scale(softmax_scale, d)
    check_deterministic(deterministic)
    window = normalize_window(window, causal, longest)  # bounds no document reaches are no bounds
    binds = window != (-1, 0 if causal else -1)
    needs = MaskNeeds(window=binds, softcap=softcap > 0, v_head_dim=v.shape[-1] if v.shape[-1] != d else None,
                      grouped=q.shape[1] != k.shape[1])
    kernel = resolve_varlen_backend(backend, q.device, q.dtype, d, deterministic, needs)
    check_device_matches_mesh(q, mesh)
    return layout, kernel, scale, window, softcap


def agreed_call(q, k, v, cu_seqlens, max_seqlen, mesh, causal, softmax_scale, return_lse, backend,
                deterministic, window_size=(-1, -1), softcap=0.0, sinks=None, with_softcap=False, defer=False):
    """Validate a packed call and agree on it across the ranks (Note [call agreement]): ``(layout, kernel,
    scale)`` (and the window and softcap when ``with_softcap``); ``defer``: ``(that, ready)``, the agreement
    settled by ``ready`` (Note [deferred agreement] in ``usp.consistency``)."""
    outcome = agree(  # every rank validated and made the same call
        mesh, "long_context_attention_varlen",
        lambda: _validate(q, k, v, cu_seqlens, max_seqlen, mesh, causal, softmax_scale, backend, deterministic,
                          window_size, softcap, sinks),
        lambda checked: dict(call_fields(q, k, v, mesh, _VARLEN_DIMS, causal, checked[2], return_lse, checked[1]),
                             documents=_documents(checked[0]), deterministic=deterministic,
                             **mask_fields(checked[3], checked[4], sinks, v)),
        defer=defer,
    )
    checked, ready = outcome if defer else (outcome, None)
    result = checked[:5 if with_softcap else 3]
    return (result, ready) if defer else result


def long_context_attention_varlen(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens,
    max_seqlen: Optional[int],
    mesh: SequenceParallelMesh,
    causal: bool = True,
    softmax_scale: Optional[float] = None,
    return_lse: bool = False,
    backend: Union[str, VarlenKernel] = "auto",
    deterministic: bool = False,
    window_size: Tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    sinks: Optional[Tensor] = None,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Exact attention over packed documents sharded across ``mesh`` (Ulysses x ring), no attention across documents.

    Args:
        q: ``[total_local_tokens, heads, head_dim]``, this rank's shard of the packed batch as ``usp.shard_varlen``
            makes it (``varlen_layout(cu_seqlens, mesh, causal).local_tokens`` rows, padding included).
        k, v: ``[total_local_tokens, kv_heads, head_dim]``; ``heads % kv_heads == 0`` (GQA/MQA).
        cu_seqlens: the *global* document boundaries of the whole packed batch, ``[0, L_0, L_0 + L_1, ..., total]``
            (int32 tensor like flash-attn, int64 or a list of ints also accepted; empty documents allowed),
            identical on every rank. A CPU tensor (or the same CUDA tensor for every layer) avoids a device sync.
        max_seqlen: the longest document (checked, may be larger) or None.
        mesh: the ``usp.SequenceParallelMesh``; ``heads`` must be divisible by ``mesh.ulysses``.
        causal: causal mask inside each document, over positions in the document.
        softmax_scale: score scale, default ``head_dim ** -0.5``.
        return_lse: also return the LSE ``[heads, total_local_tokens]`` (float32 (float64 for float64 inputs), -inf
            at padding rows; the flash-attn varlen layout; not differentiable).
        backend: "auto" (fa4, fa2, torch_flash, reference), a name of ``usp.kernels.varlen.VARLEN_BACKENDS``,
            or a ``VarlenKernel``.
        deterministic: bitwise-repeatable out and gradients (see ``usp.long_context_attention``).
        window_size: as ``usp.long_context_attention``, over positions inside each document (query ``i`` of a
            document sees its keys ``j`` with ``i - left <= j <= i + right``); needs a varlen kernel with windows
            (reference, fa4, fa2). Same shards as without it (Note [varlen windows]).
        softcap, sinks: as ``usp.long_context_attention`` (softcap needs a varlen kernel with it: reference, fa4,
            fa2; sinks work with every kernel).

    Returns:
        ``out [total_local_tokens, heads, v_head_dim]`` in the input dtype (zero at padding rows), and ``lse`` if
        asked. Differentiable with respect to q, k, v and sinks (zero gradient at padding rows).
    """
    if torch.compiler.is_compiling():  # one custom op for dynamo (Note [compiled attention] in usp.compiled)
        from .compiled import compiled_attention

        return compiled_attention(q, k, v, mesh, (cu_seqlens, max_seqlen), dict(
            causal=causal, softmax_scale=softmax_scale, return_lse=return_lse, backend=backend,
            deterministic=deterministic, window_size=window_size, softcap=softcap), sinks)
    (layout, kernel, scale, window, softcap), ready = agreed_call(
        q, k, v, cu_seqlens, max_seqlen, mesh, causal, softmax_scale, return_lse, backend, deterministic,
        window_size, softcap, sinks, with_softcap=True, defer=True)
    out, lse = sequence_parallel_attention(  # one packed row: [1, t, h, d]
        q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), mesh, VarlenBlockKernel(kernel),
        _schedule_for_layout(layout, softcap, window), scale, return_lse, deterministic=deterministic, sinks=sinks,
        ready=ready,
    )
    out = out[0]  # zero at padding rows already: no call gives them a key (Note [varlen zigzag layout])
    if not return_lse:
        return out
    lse = lse[0]
    padding = layout.device_padding(mesh.ulysses_rank, mesh.ring_rank, out.device)
    if padding is not None:  # -inf there, also with sinks (whose logit the ring added to every row)
        lse = lse.masked_fill(padding[None, :], float("-inf"))
    return out, lse


def __getattr__(name: str):
    """``LongContextAttentionVarlen``, from ``usp.modules`` (which imports this module)."""
    if name == "LongContextAttentionVarlen":
        from .modules import LongContextAttentionVarlen

        return LongContextAttentionVarlen
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
