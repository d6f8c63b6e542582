"""usp attention under ``torch.compile``: the whole sequence-parallel call as two custom ops.

Note [compiled attention]. Dynamo cannot trace usp's attention: the ranks agree on every call over gloo
(``usp.consistency``), the ring posts P2P batches and the Ulysses trades post asynchronous all-to-alls, and the
packed path reads ``cu_seqlens`` on the host. Under ``torch.compile`` (``torch.compiler.is_compiling()``),
``long_context_attention`` and ``long_context_attention_varlen`` therefore hand the call to two
``torch.library`` custom ops, so a compiled model has no graph break at its attention:

* ``usp::attention_forward(q, k, v, cu_seqlens, mesh, options, backward) -> (out, lse, saved)`` runs exactly
  what the eager call runs, in the same order: validation and the ranks' agreement (``agreed_call`` of
  ``usp.attention`` / ``usp.varlen``, so a bad or differing call raises on every rank before any collective, now at
  run time), K/V head replication, the ``RingAttentionFunction`` / ``UlyssesRingFunction`` forward, the LSE's
  all-to-all and the packed path's padding. ``saved`` is what that autograd function saved for its backward (minus
  the op's own inputs and output, which autograd keeps anyway); a fake (meta) implementation gives every shape.
* ``usp::attention_backward(dout, inputs, saved, cu_seqlens, mesh, options, kv_heads, head_dim) -> (dq, dk, dv)`` runs the
  function's backward on them (and the replicas' gradient sum, and the padding's zero gradient).

The ops take only tensors, strings, ints and bools. The mesh travels as ``mesh._group_spec()``, the names of its
process groups, and is rebuilt inside the op from torch's own registry of groups
(``SequenceParallelMesh._from_group_spec``): no module state of usp holds a group or a mesh. The options travel as
one string (``_encode``/``_decode``): the call's keyword arguments by name, so a new option of the public functions
passes through without touching the ops' schemas. The kernel must be named by a string under compile (a kernel
object cannot cross the op boundary). A mesh with ``check_calls=N`` checks every compiled call (the count of calls
lives on the mesh object, which a compiled graph does not hold).

The numbers are the eager ones bit for bit: the same functions run on the same tensors in the same order.
Eager calls never come here.
"""
from __future__ import annotations

import ast
import inspect
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from . import attention as _dense
from .comm.all_to_all import _heads_to_seq
from .layout import schedule_for
from .mesh import SequenceParallelMesh
from .ring import RingAttentionFunction
from .ulysses import UlyssesRingFunction, head_groups

__all__ = ["compiled_attention"]

Tensor = torch.Tensor


# ---------------------------------------------------------------------------------------------- options
def _encode(options: Dict[str, Any]) -> str:
    """``{"causal": True, "softmax_scale": None, ...}`` -> ``"causal=True;softmax_scale=None;..."`` (sorted by name;
    ``repr`` of a float round-trips exactly). Dynamo folds it to a constant."""
    return ";".join(f"{name}={options[name]!r}" for name in sorted(options))


def _decode(options: str) -> Dict[str, Any]:
    pairs = (item.split("=", 1) for item in options.split(";") if item)
    return {name: ast.literal_eval(value) for name, value in pairs}


def _spec_degrees(mesh: str) -> Tuple[int, int]:
    """``(ulysses, ring)`` of a ``_group_spec`` without resolving its groups (for shapes)."""
    ulysses, ring = mesh.split("|", 2)[:2]
    return int(ulysses), int(ring)


# ---------------------------------------------------------------------------------------------- the call
class _Context:
    """Stands in for autograd's ``ctx`` when a usp autograd function's forward or backward runs inside an op."""

    def __init__(self, saved: Sequence[Tensor] = ()):
        self.saved_tensors = tuple(saved)

    def save_for_backward(self, *tensors: Tensor) -> None:
        self.saved_tensors = tensors

    def mark_non_differentiable(self, *tensors: Tensor) -> None:
        pass


class _Call:
    """One attention call resolved inside an op: the mesh, the kernel, the schedule and the autograd function with
    its arguments, exactly as ``usp.attention.sequence_parallel_attention`` builds them."""

    def __init__(self, q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Optional[Tensor], mesh: str, options: str,
                 agree: bool, return_lse: Optional[bool] = None):
        self.mesh = SequenceParallelMesh._from_group_spec(mesh)
        self.options = _decode(options)
        self.dense = cu_seqlens is None
        o = self.options
        if self.dense:
            check = _dense.agreed_call if agree else _validate_dense
            self.kernel, self.scale = check(q, k, v, self.mesh, o["causal"], o["softmax_scale"], o["return_lse"],
                                            o["backend"], o["head_chunks"], o["deterministic"])
            self.schedule, self.head_chunks, self.layout = schedule_for(o["causal"]), o["head_chunks"], None
        else:
            from . import varlen
            from .kernels.varlen import VarlenBlockKernel

            check = varlen.agreed_call if agree else _validate_varlen
            self.layout, kernel, self.scale = check(q, k, v, cu_seqlens, o["max_seqlen"], self.mesh, o["causal"],
                                                    o["softmax_scale"], o["return_lse"], o["backend"],
                                                    o["deterministic"])
            self.kernel, self.schedule = VarlenBlockKernel(kernel), varlen._schedule_for_layout(self.layout)
            self.head_chunks = 1
        ulysses = self.mesh.ulysses
        self.repeat = _dense.kv_replication(k.shape[-2], ulysses) if ulysses > 1 else 1
        if ulysses > 1:
            self.groups = head_groups(q.shape[-2], k.shape[-2] * self.repeat, ulysses, self.head_chunks)
            self.function = UlyssesRingFunction
            self.args = (self.mesh, self.kernel, self.schedule, self.scale, self.groups, self.head_chunks,
                         o["deterministic"])
        else:
            self.function = RingAttentionFunction
            self.args = (self.mesh, self.kernel, self.schedule, self.scale, self.head_chunks, o["deterministic"])

    def padding(self, device) -> Optional[Tensor]:
        from .varlen import _device_padding

        return _device_padding(self.layout, self.mesh.ulysses_rank, self.mesh.ring_rank, device)

    def context(self, q4: Tensor, k4: Tensor, v4: Tensor, saved: Sequence[Tensor]) -> _Context:
        """The ctx the function's forward filled, rebuilt for its backward: every forward argument under its own
        name, and ``shapes`` (the forward's q and K/V shapes)."""
        ctx = _Context(saved)
        bound = inspect.signature(self.function.forward).bind(ctx, q4, k4, v4, *self.args)
        for name, value in list(bound.arguments.items())[4:]:
            setattr(ctx, name, value)
        ctx.shapes = (q4.shape, k4.shape, v4.shape)
        ctx.needs_input_grad = (True, True, True) + (False,) * len(self.args)
        return ctx

    def check_context(self, ctx: _Context, shapes) -> None:
        """The forward stored nothing that ``context`` does not rebuild (else the backward would miss it)."""
        known = set(inspect.signature(self.function.forward).parameters) | {"shapes", "saved_tensors"}
        unknown = sorted(set(vars(ctx)) - known)
        if "shapes" in vars(ctx) and ctx.shapes != shapes:
            unknown.append(f"shapes={ctx.shapes} (rebuilt as {shapes})")
        if unknown:
            raise RuntimeError(f"usp.compiled: {self.function.__name__}.forward stored ctx.{unknown}, which "
                               "usp.compiled._Call.context does not rebuild for the backward; add it there")


def _validate_dense(q, k, v, mesh, causal, softmax_scale, return_lse, backend, head_chunks, deterministic):
    return _dense._validate(q, k, v, mesh, causal, softmax_scale, backend, head_chunks, deterministic)[:2]


def _validate_varlen(q, k, v, cu_seqlens, max_seqlen, mesh, causal, softmax_scale, return_lse, backend,
                     deterministic):
    from .varlen import _validate

    return _validate(q, k, v, cu_seqlens, max_seqlen, mesh, causal, softmax_scale, backend, deterministic)[:3]


# ---------------------------------------------------------------------------------------------- saved tensors
def _saved_plan(ulysses: int, ring: int, groups: int, head_chunks: int, dense: bool, q4_shape, kv4_heads: int,
                dtype: torch.dtype) -> List[Tuple[str, Any, torch.dtype]]:
    """What the autograd function saves, in order, as ``(kind, shape, dtype)``: kind ``"q"``, ``"k"``, ``"v"``
    (its inputs), ``"out"`` (its output, the op's own on the dense path), ``"none"`` (a ``None``: no sinks) or
    ``"new"`` (returned in ``saved``).

    ``RingAttentionFunction``: ``q, k, v, out, lse, sinks`` and the last K/V block when ``ring > 1`` and one head
    chunk. ``UlyssesRingFunction``: per head group the traded ``q, k, v``, the group's ``out``, ``lse`` and last K/V
    block, then ``sinks``. The forward op checks the real tensors against this list on every call."""
    b, s, h, d = q4_shape
    lse_dtype = torch.promote_types(dtype, torch.float32)
    last_kv = ring > 1 and head_chunks == 1
    if ulysses == 1:
        kv = (b, s, kv4_heads, d)
        plan = [("q", None, dtype), ("k", None, dtype), ("v", None, dtype),
                ("out" if dense else "new", (b, s, h, d), dtype), ("new", (b, h, s), lse_dtype), ("none", None, None)]
        return plan + [("new", kv, dtype)] * (2 if last_kv else 0)
    s_ring, hq, hk = s * ulysses, h // (ulysses * groups), kv4_heads // (ulysses * groups)
    group = [("new", (b, s_ring, hq, d), dtype), ("new", (b, s_ring, hk, d), dtype), ("new", (b, s_ring, hk, d), dtype),
             ("new", (b, s_ring, hq, d), dtype), ("new", (b, hq, s_ring), lse_dtype)]
    group += [("new", (b, s_ring, hk, d), dtype)] * (2 if last_kv else 0)
    return group * groups + [("none", None, None)]


def _plan_for(q: Tensor, k: Tensor, dense: bool, mesh: str, options: Dict[str, Any]):
    ulysses, ring = _spec_degrees(mesh)
    q4_shape = tuple(q.shape) if dense else (1,) + tuple(q.shape)
    repeat = _dense.kv_replication(k.shape[-2], ulysses) if ulysses > 1 else 1
    head_chunks = options.get("head_chunks", 1)
    groups = head_groups(q.shape[-2], k.shape[-2] * repeat, ulysses, head_chunks) if ulysses > 1 else 1
    return _saved_plan(ulysses, ring, groups, head_chunks, dense, q4_shape, k.shape[-2] * repeat, q.dtype)


def _shares_storage(x: Tensor, others: Sequence[Tensor]) -> bool:
    ptr = x.untyped_storage().data_ptr()
    return any(o.untyped_storage().data_ptr() == ptr for o in others)


# ---------------------------------------------------------------------------------------------- the ops
@torch.library.custom_op("usp::attention_forward", mutates_args=())
def _attention_forward(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Optional[Tensor], mesh: str, options: str,
                       backward: bool) -> Tuple[Tensor, Tensor, List[Tensor]]:
    # the leaves the eager call would get, so the ranks agree on `backward` as they do in eager
    with torch.enable_grad():
        leaves = [x.detach().requires_grad_(backward) for x in (q, k, v)]
        call = _Call(*leaves, cu_seqlens, mesh, options, agree=True)
    o = call.options
    with torch.no_grad():
        q4, k4, v4 = (q, k, v) if call.dense else (q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0))
        kr, vr = k4, v4
        if call.repeat > 1:
            kr, vr = (_dense._ReplicateKVHeads.forward(_Context(), x, call.repeat) for x in (k4, v4))
        ctx = _Context()
        out4, lse4 = call.function.forward(ctx, q4, kr, vr, *call.args)
        call.check_context(ctx, (q4.shape, kr.shape, vr.shape))
        lse = torch.empty(0, dtype=lse4.dtype, device=q.device)
        if o["return_lse"]:
            lse = lse4
            if call.mesh.ulysses > 1:  # as usp.attention.sequence_parallel_attention: [b, h/U, s/R] -> [b, h, s/P]
                lse = _heads_to_seq(lse.transpose(1, 2).unsqueeze(-1).contiguous(), call.mesh.ulysses_group,
                                    call.mesh.ulysses)
                lse = lse.squeeze(-1).transpose(1, 2).contiguous()
        out = out4
        if not call.dense:  # as usp.varlen.long_context_attention_varlen
            padding = call.padding(q.device)
            out = out4[0] if padding is None else out4[0].masked_fill(padding[:, None, None], 0.0)
            if o["return_lse"]:
                lse = lse[0] if padding is None else lse[0].masked_fill(padding[None, :], float("-inf"))
        kinds = {id(q4): "q", id(kr): "k", id(vr): "v"}
        if call.dense:
            kinds[id(out4)] = "out"
        saved = ["none" if t is None else kinds.get(id(t), "new") for t in ctx.saved_tensors]
        new = [t.contiguous() for t, kind in zip(ctx.saved_tensors, saved) if kind == "new"]
        plan = _plan_for(q, k, call.dense, mesh, o)
        got = [(kind, tuple(t.shape) if kind == "new" else None, None if t is None else t.dtype)
               for kind, t in zip(saved, ctx.saved_tensors)]
        want = [(kind, tuple(shape) if kind == "new" else None, dtype) for kind, shape, dtype in plan]
        if got != want:
            raise RuntimeError(f"usp.compiled: {call.function.__name__} saved {got}, usp.compiled._saved_plan says "
                               f"{want}; update _saved_plan")
        # a custom op's outputs alias neither its inputs nor each other
        if _shares_storage(out, new + [q, k, v]):
            out = out.clone()
        if o["return_lse"] and _shares_storage(lse, new + [out]):
            lse = lse.clone()
    return out, lse, new


@_attention_forward.register_fake
def _attention_forward_fake(q, k, v, cu_seqlens, mesh, options, backward):
    o = _decode(options)
    dense = cu_seqlens is None
    plan = _plan_for(q, k, dense, mesh, o)
    lse_dtype = torch.promote_types(q.dtype, torch.float32)
    if o["return_lse"]:
        lse = q.new_empty((q.shape[0], q.shape[2], q.shape[1]) if dense else (q.shape[1], q.shape[0]), dtype=lse_dtype)
    else:
        lse = q.new_empty((0,), dtype=lse_dtype)
    out = torch.empty(tuple(q.shape[:-1]) + (v.shape[-1],), dtype=q.dtype, device=q.device)
    return out, lse, [q.new_empty(shape, dtype=dtype) for kind, shape, dtype in plan if kind == "new"]


@torch.library.custom_op("usp::attention_backward", mutates_args=())
def _attention_backward(dout: Tensor, inputs: List[Tensor], saved: List[Tensor], cu_seqlens: Optional[Tensor],
                        mesh: str, options: str, kv_heads: int, head_dim: int) -> Tuple[Tensor, Tensor, Tensor]:
    q_shape, k_shape, v_shape = _input_shapes(dout, kv_heads, head_dim)
    like = dout.new_empty(())  # validation reads shapes, dtype and device only: expanded views, no memory
    call = _Call(like.expand(q_shape), like.expand(k_shape), like.expand(v_shape), cu_seqlens, mesh, options,
                 agree=False)
    expand = (lambda x: x) if call.dense else (lambda x: x.unsqueeze(0))
    dout4 = dout
    if not call.dense:
        padding = call.padding(dout.device)  # the eager path's masked_fill: zero gradient at padding rows
        dout4 = (dout if padding is None else dout.masked_fill(padding[:, None, None], 0.0)).unsqueeze(0)
    plan = _plan_for(like.expand(q_shape), like.expand(k_shape), call.dense, mesh, call.options)
    given = dict(zip(("q", "k", "v", "out"), (expand(x) for x in inputs)))
    new = iter(saved)
    tensors = [next(new) if kind == "new" else given.get(kind) for kind, _, _ in plan]
    lead = (1,) if not call.dense else ()
    replicated = [lead + s[:-2] + (s[-2] * call.repeat, s[-1]) for s in (k_shape, v_shape)]
    ctx = call.context(*(like.expand(s) for s in [lead + q_shape] + replicated), tensors)
    dq, dk, dv = call.function.backward(ctx, dout4, None)[:3]
    if call.repeat > 1:
        replicas = _Context()
        replicas.repeat = call.repeat
        dk, dv = (_dense._ReplicateKVHeads.backward(replicas, g)[0] for g in (dk, dv))
    if not call.dense:
        dq, dk, dv = dq[0], dk[0], dv[0]
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


def _input_shapes(dout: Tensor, kv_heads: int, head_dim: int):
    """q, k, v shapes of the call whose output gradient is ``dout`` (its last dim is the value head dim)."""
    lead = tuple(dout.shape[:-2])
    return lead + (dout.shape[-2], head_dim), lead + (kv_heads, head_dim), lead + (kv_heads, dout.shape[-1])


@_attention_backward.register_fake
def _attention_backward_fake(dout, inputs, saved, cu_seqlens, mesh, options, kv_heads, head_dim):
    return tuple(dout.new_empty(shape) for shape in _input_shapes(dout, kv_heads, head_dim))


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, cu_seqlens, mesh, options, backward = inputs
    out, _, saved = output
    dense = cu_seqlens is None
    kinds = {kind for kind, _, _ in _plan_for(q, k, dense, mesh, _decode(options))}
    given = [x for kind, x in zip(("q", "k", "v", "out"), (q, k, v, out)) if kind in kinds]
    ctx.n_given, ctx.has_cu = len(given), cu_seqlens is not None
    ctx.save_for_backward(*given, *([cu_seqlens] if ctx.has_cu else []), *saved)
    ctx.mesh, ctx.options, ctx.kv_heads, ctx.head_dim = mesh, options, k.shape[-2], q.shape[-1]
    ctx.mark_non_differentiable(*saved)


def _backward(ctx, dout, _dlse, _dsaved):
    tensors = ctx.saved_tensors
    given, rest = list(tensors[:ctx.n_given]), tensors[ctx.n_given:]
    cu_seqlens = rest[0] if ctx.has_cu else None
    saved = list(rest[1:] if ctx.has_cu else rest)
    dq, dk, dv = torch.ops.usp.attention_backward(dout.contiguous(), given, saved, cu_seqlens, ctx.mesh,
                                                  ctx.options, ctx.kv_heads, ctx.head_dim)
    return dq, dk, dv, None, None, None, None


_attention_forward.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------- entry
def compiled_attention(q: Tensor, k: Tensor, v: Tensor, mesh: SequenceParallelMesh, packed, options: Dict[str, Any]):
    """``long_context_attention`` (``packed=None``) or ``long_context_attention_varlen`` (``packed=(cu_seqlens,
    max_seqlen)``) with the keyword arguments ``options``, as the custom op (Note [compiled attention]). Dynamo
    traces this function; the op runs validation and the ranks' agreement at run time."""
    if not isinstance(mesh, SequenceParallelMesh):
        raise TypeError(f"mesh must be a usp.SequenceParallelMesh, got {type(mesh).__name__}")
    if not isinstance(options["backend"], str):
        raise TypeError(f"under torch.compile the backend must be given by name (e.g. 'auto', 'reference'), got "
                        f"{type(options['backend']).__name__}: a kernel object cannot be passed to a custom op")
    cu_seqlens = None
    if packed is not None:
        cu_seqlens, max_seqlen = packed
        if not isinstance(cu_seqlens, torch.Tensor):
            cu_seqlens = torch.tensor(list(cu_seqlens), dtype=torch.int64)
        if max_seqlen is not None and not isinstance(max_seqlen, int):
            raise TypeError(f"under torch.compile max_seqlen must be an int or None, got {type(max_seqlen).__name__}")
        options = dict(options, max_seqlen=max_seqlen)
    backward = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    out, lse, _ = torch.ops.usp.attention_forward(q, k, v, cu_seqlens, mesh._group_spec(), _encode(options),
                                                  backward)
    return (out, lse.detach()) if options["return_lse"] else out
