"""Hybrid Ulysses x ring attention: the public functional and module.

Data flow for a mesh of ``U`` (Ulysses) x ``R`` (ring), local shards ``q [b, s/P, h, d]``, ``k, v [b, s/P, h_kv, d]``
(``P = U * R``):

1. Ulysses all-to-all over the ``U`` ranks: ``[b, s/P, h, d] -> [b, s/R, h/U, d]`` (K/V likewise; K/V heads are
   first replicated up to ``lcm(h_kv, U)`` when ``U`` does not divide ``h_kv``, their gradients summed back).
2. Ring attention over the ``R`` ranks on ``[b, s/R, h/U, d]`` (``usp.ring``).
3. Inverse all-to-all of the output: ``[b, s/R, h/U, d] -> [b, s/P, h, d]``.
Steps 1-3 run per head group so that the trades overlap the attention (``usp.ulysses``, Note [head-group
pipeline]).

Every argument is validated before the first collective, and the ranks agree that they made the same call
(``usp.consistency``, Note [call agreement]), so a bad or differing call raises on every rank instead of hanging.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Dict, Optional, Tuple, Union

import torch
import torch.distributed as dist

from .comm.all_to_all import _heads_to_seq
from .consistency import agree
from .kernels import AttentionKernel, resolve_backend
from .kernels.base import MaskNeeds
from .layout import WindowSchedule, check_sequence_length, normalize_window, schedule_for
from .mesh import SequenceParallelMesh
from .ring import RingAttentionFunction
from .ulysses import UlyssesRingFunction, head_groups
from .spec import kv_replication, valid_head_chunks  # the head rules live in usp.spec

__all__ = ["long_context_attention", "LongContextAttention", "kv_replication"]

Tensor = torch.Tensor


class _ReplicateKVHeads(torch.autograd.Function):
    """``[b, s, h_kv, d] -> [b, s, h_kv * repeat, d]`` (each head repeated in place, GQA order kept); backward sums
    the replicas' gradients in float32 and rounds once."""

    @staticmethod
    def forward(ctx, x, repeat):
        ctx.repeat = repeat
        return x.repeat_interleave(repeat, dim=2)

    @staticmethod
    def backward(ctx, grad):
        b, s, h, d = grad.shape
        summed = grad.reshape(b, s, h // ctx.repeat, ctx.repeat, d).sum(3, dtype=torch.promote_types(grad.dtype, torch.float32))
        return summed.to(grad.dtype), None


def check_qkv(q, k, v, mesh, causal, dims: Tuple[str, ...]) -> None:
    """Checks shared by the dense and the packed path: types, ``dims`` (the layout's dim names, heads and head_dim
    last), one dtype and device, K/V shape, GQA and Ulysses divisibility of the heads. Shapes only: no collective."""
    if not isinstance(mesh, SequenceParallelMesh):
        raise TypeError(f"mesh must be a usp.SequenceParallelMesh, got {type(mesh).__name__}")
    layout = ", ".join(dims)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.ndim != len(dims):
            raise ValueError(f"{name} must have {len(dims)} dims [{layout}], got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k, v must be on one device, got q {q.device}, k {k.device}, v {v.device}")
    if k.shape[:-1] != v.shape[:-1]:
        raise ValueError(f"k and v must have the same shape except the head_dim (v's may differ: multi-head latent "
                         f"attention), got k {tuple(k.shape)}, v {tuple(v.shape)}")
    heads_axis, dim_axis = len(dims) - 2, len(dims) - 1
    for axis in range(heads_axis):
        if k.shape[axis] != q.shape[axis]:
            raise ValueError(
                f"{dims[axis]} mismatch: q.shape[{axis}]={q.shape[axis]}, k.shape[{axis}]={k.shape[axis]}"
                + (" (self-attention shards must match)" if axis == heads_axis - 1 else "")
            )
    h, d, kv_heads = q.shape[heads_axis], q.shape[dim_axis], k.shape[heads_axis]
    if k.shape[dim_axis] != d:
        raise ValueError(f"head_dim mismatch: q.shape[{dim_axis}]={d}, k.shape[{dim_axis}]={k.shape[dim_axis]}")
    if d == 0:
        raise ValueError(f"head_dim (q.shape[{dim_axis}]) must be positive, got q shape {tuple(q.shape)}")
    if v.shape[-1] == 0:
        raise ValueError(f"v's head_dim (v.shape[-1]) must be positive, got v shape {tuple(v.shape)}")
    if h == 0 or kv_heads == 0 or h % kv_heads:
        raise ValueError(
            f"heads (q.shape[{heads_axis}]={h}) must be a positive multiple of kv_heads "
            f"(k.shape[{heads_axis}]={kv_heads}); valid kv_heads: {[x for x in range(1, h + 1) if h % x == 0]}"
        )
    if h % mesh.ulysses:
        valid = [u for u in range(1, h + 1) if h % u == 0]
        raise ValueError(
            f"heads (q.shape[{heads_axis}]={h}) must be divisible by the Ulysses degree ulysses={mesh.ulysses}; "
            f"Ulysses degrees valid for {h} heads: {valid}"
        )


def check_head_chunks(head_chunks, heads: int, kv_heads: int, ulysses: int) -> None:
    """``head_chunks`` must be one of ``valid_head_chunks``; the error lists them."""
    valid = valid_head_chunks(heads, kv_heads, ulysses)
    if not isinstance(head_chunks, int) or isinstance(head_chunks, bool) or head_chunks not in valid:
        replicated = kv_replication(kv_heads, ulysses) > 1
        q_local, kv_local = heads // ulysses, kv_heads * kv_replication(kv_heads, ulysses) // ulysses
        raise ValueError(
            f"head_chunks={head_chunks!r} must divide the {q_local} query heads each Ulysses rank attends and "
            f"divide or be a multiple of its {kv_local} K/V heads (heads={heads}, kv_heads={kv_heads}, "
            f"ulysses={ulysses}{', K/V heads replicated: divide only' if replicated else ''}); valid values: {valid}"
        )


_DENSE_DIMS = ("batch", "seq_local", "heads", "head_dim")


def check_mask_options(window_size, softcap, sinks, q: Tensor, causal: bool) -> Tuple[Tuple[int, int], float]:
    """``window_size``, ``softcap`` and ``sinks`` validated (shapes only, no collective); returns ``(window, softcap)``
    as ``(int, int)`` and float."""
    if (not isinstance(window_size, (tuple, list)) or len(window_size) != 2
            or not all(isinstance(x, numbers.Integral) and not isinstance(x, bool) for x in window_size)
            or any(x < -1 for x in window_size)):
        raise ValueError(f"window_size must be a pair (left, right) of ints >= -1 (-1 = unbounded; flash-attn's "
                         f"meaning over global positions), got {window_size!r}")
    left, right = int(window_size[0]), int(window_size[1])
    if causal and right > 0:
        raise ValueError(f"window_size={window_size!r} with causal=True: a causal window has right = 0 (or -1); "
                         f"pass causal=False for a window that looks {right} tokens ahead")
    if not (isinstance(softcap, numbers.Real) and not isinstance(softcap, bool) and 0 <= softcap < math.inf):
        raise ValueError(f"softcap must be a finite float >= 0 (0 = off), got {softcap!r}")
    if sinks is not None:
        heads = q.shape[-2]
        if not isinstance(sinks, torch.Tensor):
            raise TypeError(f"sinks must be a torch.Tensor [heads] or None, got {type(sinks).__name__}")
        if sinks.ndim != 1 or sinks.shape[0] != heads:
            raise ValueError(f"sinks must have shape [heads] = [{heads}] (one logit per query head), got "
                             f"{tuple(sinks.shape)}")
        if not sinks.is_floating_point():
            raise TypeError(f"sinks must be a floating-point tensor, got dtype {sinks.dtype}")
        if sinks.device != q.device:
            raise ValueError(f"sinks must be on q's device {q.device}, got {sinks.device}")
    return (left, right), float(softcap)


def mask_needs(schedule, softcap: float, q: Tensor, k: Tensor, v: Tensor) -> MaskNeeds:
    """What the kernel must support for this call (``usp.kernels.base.MaskNeeds``)."""
    return MaskNeeds(window=isinstance(schedule, WindowSchedule), softcap=softcap > 0,
                     v_head_dim=v.shape[-1] if v.shape[-1] != q.shape[-1] else None,
                     grouped=q.shape[2] != k.shape[2])


def mask_fields(window, softcap, sinks, v) -> Dict[str, Any]:
    """The mask options every rank must agree on (added to ``call_fields``)."""
    return dict(window_size=tuple(window), softcap=softcap, v_head_dim=v.shape[-1],
                sinks=None if sinks is None else f"{tuple(sinks.shape)} {sinks.dtype} "
                                                 f"grad={bool(sinks.requires_grad and torch.is_grad_enabled())}")


def call_fields(q, k, v, mesh, dims, causal, scale, return_lse, kernel) -> Dict[str, Any]:
    """What every rank of the sequence-parallel group must agree on for a validated call, shared by the dense and
    the packed path (``usp.consistency``, Note [call agreement]): everything that sizes a collective or changes
    the math, including whether a backward (with its own collectives) will follow."""
    fields: Dict[str, Any] = dict(zip(dims[:-2], q.shape[:-2]))
    fields.update(
        heads=q.shape[-2], kv_heads=k.shape[-2], head_dim=q.shape[-1], dtype=q.dtype, device=q.device.type,
        mesh=f"{mesh.ulysses}x{mesh.ring} {mesh.placement.value}", causal=causal, softmax_scale=scale,
        return_lse=return_lse, backend=kernel.name,
        backward=torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad),
    )
    return fields


def check_deterministic(deterministic) -> None:
    if not isinstance(deterministic, bool):
        raise TypeError(f"deterministic must be a bool, got {type(deterministic).__name__}")


def _validate(q, k, v, mesh, causal, softmax_scale, backend, head_chunks,
              deterministic=False, window_size=(-1, -1), softcap=0.0, sinks=None):
    """Everything checked before any collective: ``(kernel, scale, schedule, window, softcap)``."""
    check_qkv(q, k, v, mesh, causal, _DENSE_DIMS)
    window, softcap = check_mask_options(window_size, softcap, sinks, q, causal)
    check_head_chunks(head_chunks, q.shape[2], k.shape[2], mesh.ulysses)
    b, s, h, d = q.shape
    if s == 0:
        raise ValueError("q.shape[1] (the local sequence length) must be positive")
    check_sequence_length(
        s * mesh.ulysses * mesh.ring, mesh.ulysses, mesh.ring, causal,
        argument=f"sequence length (q.shape[1] * ulysses * ring = {s} * {mesh.ulysses} * {mesh.ring})",
    )
    scale = resolve_scale(softmax_scale, d)
    check_deterministic(deterministic)
    window = normalize_window(window, causal, s * mesh.ulysses * mesh.ring)
    schedule = schedule_for(causal, window, softcap)
    kernel = resolve_backend(backend, q.device, q.dtype, d, deterministic, mask_needs(schedule, softcap, q, k, v))
    check_device_matches_mesh(q, mesh)
    return kernel, scale, schedule, window, softcap


def resolve_scale(softmax_scale, head_dim: int) -> float:
    """``softmax_scale`` validated, or the default ``head_dim ** -0.5``."""
    if softmax_scale is None:
        return head_dim ** -0.5
    if (isinstance(softmax_scale, numbers.Real) and not isinstance(softmax_scale, bool)
            and 0 < softmax_scale < math.inf):
        return float(softmax_scale)
    raise ValueError(f"softmax_scale must be None (head_dim ** -0.5) or a finite positive float, got {softmax_scale!r}")


def check_device_matches_mesh(q: Tensor, mesh: SequenceParallelMesh) -> None:
    """CPU tensors cannot go through NCCL groups: say so instead of failing inside a collective."""
    if q.device.type != "cpu":
        return
    for axis, group, size in (("ulysses", mesh.ulysses_group, mesh.ulysses), ("ring", mesh.ring_group, mesh.ring)):
        if size > 1 and dist.get_backend(group) == "nccl":
            raise ValueError(
                f"q is on the CPU but the mesh's {axis} group uses NCCL; move q, k, v to the rank's GPU "
                f"or build the mesh on a gloo process group"
            )


def long_context_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mesh: SequenceParallelMesh,
    causal: bool = True,
    softmax_scale: Optional[float] = None,
    return_lse: bool = False,
    backend: Union[str, AttentionKernel] = "auto",
    head_chunks: int = 1,
    deterministic: bool = False,
    window_size: Tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    sinks: Optional[Tensor] = None,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Exact attention over a sequence sharded across ``mesh`` (Ulysses x ring).

    Args:
        q: ``[batch, seq_local, heads, head_dim]``, this rank's shard (``usp.shard`` produces it).
        k, v: ``[batch, seq_local, kv_heads, head_dim]``; ``heads % kv_heads == 0`` (GQA/MQA supported).
        mesh: the ``usp.SequenceParallelMesh``; ``heads`` must be divisible by ``mesh.ulysses``.
        causal: causal (lower-triangular) mask over *global* positions; the shards must be in the layout that
            ``usp.shard(..., causal=causal)`` makes (zigzag when causal and ring > 1).
        softmax_scale: score scale, default ``head_dim ** -0.5``.
        return_lse: also return the log-sum-exp ``[batch, heads, seq_local]`` (float32 (float64 for float64
            inputs); not differentiable).
        backend: "auto" (fastest available), "fa4", "fa2", "cudnn", "torch_flash", "reference", or a kernel.
        head_chunks: run the ring once per group of ``heads / (ulysses * head_chunks)`` heads to cut the working
            memory by that factor at the same bytes moved (``usp.ring``, Note [head chunks]); for the longest
            sequences. Must divide the query and K/V heads each Ulysses rank gets; 1 (default) = one pass.
        deterministic: bitwise-identical out and gradients on repeated runs on the same mesh: the kernels'
            deterministic backward (backends without one are refused; "auto" picks the fastest that has one).
            usp's own sums always run in a fixed order.
        window_size: sliding window ``(left, right)`` over *global* token positions, flash-attn's meaning: query
            ``i`` sees key ``j`` iff ``i - left <= j <= i + right`` (-1 = unbounded; with ``causal`` right is 0).
            Same shards as without a window; the ring computes and transfers only the blocks and halo rows the
            window reaches (``usp.layout.WindowSchedule``, Note [sparse ring] in ``usp.ring``). Needs a kernel
            with window support ("auto" picks one; a named backend without it is refused).
        softcap: logit soft-capping, scores = ``softcap * tanh(q.k * scale / softcap)`` (0 = off); needs a kernel
            with softcap support.
        sinks: ``[heads]`` learnable logits (gpt-oss ``s_aux``), one per query head, added to every row's softmax
            denominator with no value (Note [attention sinks] in ``usp.ring``); any kernel. Differentiable: its
            gradient is this rank's partial sum (its rows, its heads), so like any parameter under sequence
            parallelism it must be summed over the sequence-parallel ranks. With ``return_lse`` the LSE includes
            the sink.
        ``v`` may have a head_dim different from q/k's (multi-head latent attention, e.g. 192/128) on kernels that
        support it (the reference kernels; fa4 without grouped K/V heads, see README); ``out`` then has v's head_dim.

    Returns:
        ``out [batch, seq_local, heads, v_head_dim]`` in the input dtype (and ``lse`` if asked), equal to slicing
        single-device attention over the gathered sequence. Differentiable with respect to q, k, v and sinks.
    """
    if torch.compiler.is_compiling():  # one custom op for dynamo (Note [compiled attention] in usp.compiled)
        from .compiled import compiled_attention

        return compiled_attention(q, k, v, mesh, None, dict(
            causal=causal, softmax_scale=softmax_scale, return_lse=return_lse, backend=backend,
            head_chunks=head_chunks, deterministic=deterministic, window_size=window_size, softcap=softcap), sinks)
    (kernel, scale, schedule), ready = agreed_call(q, k, v, mesh, causal, softmax_scale, return_lse, backend,
                                                   head_chunks, deterministic, window_size, softcap, sinks,
                                                   with_schedule=True, defer=True)
    out, lse = sequence_parallel_attention(q, k, v, mesh, kernel, schedule, scale, return_lse,
                                           head_chunks, deterministic, sinks, ready)
    return (out, lse) if return_lse else out


def agreed_call(q, k, v, mesh, causal, softmax_scale, return_lse, backend, head_chunks,
                deterministic, window_size=(-1, -1), softcap=0.0, sinks=None, with_schedule=False, defer=False):
    """Validate a dense call and agree on it across the ranks (Note [call agreement]): ``(kernel, scale)``
    (and the ring schedule of its mask when ``with_schedule``); ``defer``: ``(that, ready)``, the agreement
    settled by ``ready`` (Note [deferred agreement])."""
    outcome = agree(  # every rank validated and made the same call
        mesh, "long_context_attention",
        lambda: _validate(q, k, v, mesh, causal, softmax_scale, backend, head_chunks, deterministic, window_size,
                          softcap, sinks),
        lambda checked: dict(call_fields(q, k, v, mesh, _DENSE_DIMS, causal, checked[1], return_lse, checked[0]),
                             head_chunks=head_chunks, deterministic=deterministic,
                             **mask_fields(checked[3], checked[4], sinks, v)),
        defer=defer,
    )
    checked, ready = outcome if defer else (outcome, None)
    result = checked[:3] if with_schedule else checked[:2]
    return (result, ready) if defer else result


def autograd_function(mesh: SequenceParallelMesh, kernel, schedule, scale, heads: int, kv_heads: int,
                      head_chunks: int, deterministic: bool):
    """``(function, args, repeat)`` for ``heads`` query and ``kv_heads`` K/V heads: the autograd function of step 2
    (the ring alone, or Ulysses x ring with its head-group pipeline), its arguments between ``v`` and ``sinks``, and
    the K/V head replication step 1 applies before it (1 = none). Shared with ``usp.compiled``."""
    ulysses = mesh.ulysses
    if ulysses == 1:
        return RingAttentionFunction, (mesh, kernel, schedule, scale, head_chunks, deterministic), 1
    repeat = kv_replication(kv_heads, ulysses)
    groups = head_groups(heads, kv_heads * repeat, ulysses, head_chunks)
    return UlyssesRingFunction, (mesh, kernel, schedule, scale, groups, head_chunks, deterministic), repeat


def sequence_parallel_attention(q, k, v, mesh, kernel, schedule, scale, return_lse, head_chunks=1,
                                deterministic=False, sinks=None, ready=None):
    """Steps 1-3 of the module docstring on validated ``[b, s_local, h, d]`` shards, for any kernel and schedule
    (the dense path and the packed-document path share it). Returns ``(out, lse [b, h, s_local] or None)``.
    ``ready``: the call's pending agreement (Note [deferred agreement] in ``usp.consistency``), settled before the
    first collective: by the ring after its step 0 is launched, before the all-to-all with Ulysses."""
    ulysses = mesh.ulysses
    function, args, repeat = autograd_function(mesh, kernel, schedule, scale, q.shape[2], k.shape[2], head_chunks,
                                               deterministic)
    if repeat > 1:
        k = _ReplicateKVHeads.apply(k, repeat)
        v = _ReplicateKVHeads.apply(v, repeat)
    if ready is not None and ulysses > 1:
        ready()  # the first all-to-all comes before any local work
        ready = None
    out, lse = function.apply(q, k, v, *args, sinks, *(() if ready is None else (ready,)))
    if not return_lse:
        return out, None
    if ulysses > 1:
        # [b, h/U, s/R] viewed as [b, s/R, h/U, 1] -> [b, s/P, h, 1] -> [b, h, s/P]
        lse = _heads_to_seq(lse.transpose(1, 2).unsqueeze(-1).contiguous(), mesh.ulysses_group, ulysses)
        lse = lse.squeeze(-1).transpose(1, 2).contiguous()
    return out, lse


def __getattr__(name: str):
    """``LongContextAttention``, from ``usp.modules`` (one module class for dense and packed input; it imports this
    module and ``usp.varlen``, which imports this module too, so it is looked up on first use)."""
    if name == "LongContextAttention":
        from .modules import LongContextAttention

        return LongContextAttention
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# usp's custom ops exist before dynamo traces a call (it cannot import a module inside a checkpointed region)
from . import compiled as _compiled  # noqa: E402,F401  (Note [compiled attention])
