"""usp attention under ``torch.compile``: the whole sequence-parallel call as two custom ops.

Note [compiled attention]. Dynamo cannot trace usp's attention: the ranks agree on every call over gloo
(``usp.consistency``), the ring posts P2P batches and the Ulysses trades post asynchronous all-to-alls, and the
packed path reads ``cu_seqlens`` on the host. Under ``torch.compile`` (``torch.compiler.is_compiling()``),
``long_context_attention`` and ``long_context_attention_varlen`` therefore hand the call to two
``torch.library`` custom ops, so a compiled model has no graph break at its attention:

* ``usp::attention_forward(q, k, v, sinks, cu_seqlens, mesh, options, backward) -> (out, lse, saved)`` runs
  exactly what the eager call runs, in the same order: validation and the ranks' agreement (``agreed_call`` of
  ``usp.attention`` / ``usp.varlen``, so a bad or differing call raises on every rank before any collective, now at
  run time), K/V head replication, the ``RingAttentionFunction`` / ``UlyssesRingFunction`` forward (with the
  mask's schedule: a window's sparse ring, softcap, the sinks), the LSE's all-to-all and the packed path's padding.
  ``saved`` is what that autograd function saved for its backward (minus the op's own inputs and output, which
  autograd keeps anyway). The function states it from shapes alone (its ``saved_layout``: the fake implementation
  sizes ``saved`` by it, and the op checks the real tensors against it on every call); a window's kept halos
  depend on the ring rank, so each rank's graph has its own shapes. ``out`` has v's head_dim (MLA).
* ``usp::attention_backward(dout, inputs, sinks, saved, cu_seqlens, mesh, options, kv_heads, head_dim) -> (dq, dk,
  dv, dsinks)`` runs the function's backward on them (and the replicas' gradient sum, and the padding's zero
  gradient); ``dsinks`` is empty when there are no sinks or they need no gradient.

The ops take only tensors, strings, ints and bools. The mesh travels as ``mesh._group_spec()``, the names of its
process groups, and is rebuilt inside the op from torch's own registry of groups
(``SequenceParallelMesh._from_group_spec``): no module state of usp holds a group or a mesh. The options travel as
one string (``_encode``/``_decode``): the call's keyword arguments by name, so a new option of the public functions
passes through without touching the ops' schemas (plus ``sinks_grad``: whether the sinks need a gradient, which
the ranks agree on as in eager). The kernel must be named by a string under compile (a kernel
object cannot cross the op boundary). A mesh with ``check_calls=N`` checks every compiled call (the count of calls
lives on the mesh object, which a compiled graph does not hold).

The numbers are the eager ones bit for bit: the same functions run on the same tensors in the same order.
Eager calls never come here.
"""
from __future__ import annotations

import ast
import functools
import inspect
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from . import attention as _dense
from .comm.all_to_all import _heads_to_seq
from .layout import schedule_for
from .mesh import SequenceParallelMesh

__all__ = ["compiled_attention"]

Tensor = torch.Tensor


# ---------------------------------------------------------------------------------------------- options
_PLAIN = (bool, int, float, str, type(None))


def _encode(options: Dict[str, Any]) -> str:
    """``{"causal": True, "softmax_scale": None, ...}`` -> ``"causal=True;softmax_scale=None;..."`` (sorted by name;
    ``repr`` of a float round-trips exactly). Dynamo folds it to a constant. Only plain values (and tuples or
    lists of them, e.g. ``window_size``) round-trip: anything else (a numpy int...) is refused here."""
    for name, value in options.items():
        items = value if isinstance(value, (tuple, list)) else (value,)
        if not all(type(x) in _PLAIN for x in items):
            raise TypeError(f"under torch.compile {name} must be a bool, int, float, str or None (or a tuple of "
                            f"them), got {value!r}")
    return ";".join(f"{name}={options[name]!r}" for name in sorted(options))


def _decode(options: str) -> Dict[str, Any]:
    pairs = (item.split("=", 1) for item in options.split(";") if item)
    return {name: ast.literal_eval(value) for name, value in pairs}


# ---------------------------------------------------------------------------------------------- the call
class _Context:
    """Stands in for autograd's ``ctx`` when a usp autograd function's forward or backward runs inside an op."""

    def __init__(self, saved: Sequence[Tensor] = ()):
        self.saved_tensors = tuple(saved)

    def save_for_backward(self, *tensors: Tensor) -> None:
        self.saved_tensors = tensors

    def mark_non_differentiable(self, *tensors: Tensor) -> None:
        pass


class _Like:
    """A tensor's shape and dtype, no memory: what the functions' ``saved_layout`` reads."""

    def __init__(self, shape, dtype: torch.dtype):
        self.shape, self.dtype = tuple(shape), dtype


class _Call:
    """One attention call resolved inside an op: the mesh, the kernel, the schedule and the autograd function with
    its arguments, exactly as ``long_context_attention`` / ``long_context_attention_varlen`` build them."""

    def __init__(self, q: Tensor, k: Tensor, v: Tensor, sinks: Optional[Tensor], cu_seqlens: Optional[Tensor],
                 mesh: str, options: str, agree: bool):
        self.mesh = SequenceParallelMesh._from_group_spec(mesh)
        self.options = o = _decode(options)
        self.dense = cu_seqlens is None
        masks = (o["window_size"], o["softcap"], sinks)
        if self.dense:
            if agree:
                self.kernel, self.scale, self.schedule = _dense.agreed_call(
                    q, k, v, self.mesh, o["causal"], o["softmax_scale"], o["return_lse"], o["backend"],
                    o["head_chunks"], o["deterministic"], *masks, with_schedule=True)
            else:
                self.kernel, self.scale, self.schedule = _dense._validate(
                    q, k, v, self.mesh, o["causal"], o["softmax_scale"], o["backend"], o["head_chunks"],
                    o["deterministic"], *masks)[:3]
            self.head_chunks, self.layout = o["head_chunks"], None
        else:
            from . import varlen  # lazy: usp.varlen imports usp.attention, which imports this module
            from .kernels.varlen_block import VarlenBlockKernel

            if agree:
                self.layout, kernel, self.scale, window, softcap = varlen.agreed_call(
                    q, k, v, cu_seqlens, o["max_seqlen"], self.mesh, o["causal"], o["softmax_scale"],
                    o["return_lse"], o["backend"], o["deterministic"], *masks, with_softcap=True)
            else:
                self.layout, kernel, self.scale, window, softcap = varlen._validate(
                    q, k, v, cu_seqlens, o["max_seqlen"], self.mesh, o["causal"], o["softmax_scale"], o["backend"],
                    o["deterministic"], *masks)
            self.kernel = VarlenBlockKernel(kernel)
            self.schedule = varlen._schedule_for_layout(self.layout, softcap, window)
            self.head_chunks = 1
        self.function, self.args, self.repeat = _dense.autograd_function(
            self.mesh, self.kernel, self.schedule, self.scale, q.shape[-2], k.shape[-2], self.head_chunks,
            o["deterministic"])

    def padding(self, device) -> Optional[Tensor]:
        return self.layout.device_padding(self.mesh.ulysses_rank, self.mesh.ring_rank, device)

    def context(self, q4: Tensor, k4: Tensor, v4: Tensor, saved: Sequence[Tensor],
                sinks: Optional[Tensor]) -> _Context:
        """The ctx the function's forward filled, rebuilt for its backward: every forward argument under its own
        name, ``shapes`` (the forward's q and K/V shapes) and ``needs_input_grad`` (``sinks``' from the call)."""
        ctx = _Context(saved)
        bound = inspect.signature(self.function.forward).bind(ctx, q4, k4, v4, *self.args, sinks)
        for name, value in list(bound.arguments.items())[4:]:
            setattr(ctx, name, value)
        ctx.shapes = (q4.shape, k4.shape, v4.shape)
        sinks_grad = sinks is not None and self.options["sinks_grad"]
        ctx.needs_input_grad = (True, True, True) + (False,) * len(self.args) + (sinks_grad,)
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


# ---------------------------------------------------------------------------------------------- saved tensors
_GIVEN = ("q", "k", "v", "out")  # saved tensors autograd keeps anyway (the op's inputs and output), in this order


def _saved_plan(q, k, v, sinks: Optional[Tensor], dense: bool, mesh: SequenceParallelMesh,
                options: Dict[str, Any]) -> List[Tuple[str, Any, Any]]:
    """What the call's autograd function saves, in order, from shapes alone: its ``saved_layout``
    (``(kind, shape, dtype)``; kind ``"q"``, ``"k"``, ``"v"``, ``"out"``, ``"sinks"``, ``"none"`` or ``"new"``, a
    tensor returned in the op's ``saved``), with ``"out"`` made ``"new"`` on the packed path (the op's output is
    then the padded, masked one). The fake implementation sizes ``saved`` by it; the real op checks the saved
    tensors against it on every call. The halos a window keeps depend on the ring rank (``mesh``); the packed
    path's ring is dense, windowed or not, so its saved shapes do not depend on ``cu_seqlens``."""
    o = options
    lead = () if dense else (1,)
    q4, k4, v4 = (_Like(lead + tuple(x.shape), x.dtype) for x in (q, k, v))
    if dense:
        window = o["window_size"]
        schedule = _mask_schedule(o["causal"], tuple(window) if isinstance(window, list) else window, o["softcap"],
                                  q4.shape[1] * mesh.ulysses * mesh.ring)
        if schedule.sparse:  # the halos' sizes depend on the length: a concrete one (under dynamic shapes)
            q4, k4, v4 = (_Like(x.shape[:1] + (int(x.shape[1]),) + x.shape[2:], x.dtype) for x in (q4, k4, v4))
    else:
        schedule = schedule_for(o["causal"])
    head_chunks = o["head_chunks"] if dense else 1
    function, args, repeat = _dense.autograd_function(mesh, None, schedule, None, q4.shape[-2], k4.shape[-2],
                                                      head_chunks, o["deterministic"])
    kr, vr = (_Like(x.shape[:-2] + (x.shape[-2] * repeat, x.shape[-1]), x.dtype) for x in (k4, v4))
    plan = function.saved_layout(q4, kr, vr, *args, sinks)
    return [("new" if kind == "out" and not dense else kind, shape, dtype) for kind, shape, dtype in plan]


def _mask_schedule(causal: bool, window_size, softcap, seqlen):
    """The ring schedule of a dense call's mask, as ``usp.attention._validate`` makes it, for ``_saved_plan``. A
    window that binds makes the saved halos depend on the length: ``seqlen`` is then made concrete (under dynamic
    shapes, one graph per length for windowed layers). A malformed mask gets the dense schedule: the op's
    validation raises on every rank at run time."""
    try:
        window, softcap = _dense.check_mask_options(window_size, softcap, None, None, causal)
    except (TypeError, ValueError):
        return schedule_for(causal)
    if not schedule_for(causal, window, softcap).sparse:  # no bound at any length: shapes stay symbolic
        return schedule_for(causal)
    return _window_schedule(causal, window, softcap, int(seqlen))


@functools.lru_cache(maxsize=64)
def _window_schedule(causal: bool, window: Tuple[int, int], softcap: float, seqlen: int):
    return schedule_for(causal, window, softcap, seqlen=seqlen)  # cached: the op asks on every call


def _is_planned(t: Optional[Tensor], kind: str, shape, dtype, given: Dict[str, Optional[Tensor]]) -> bool:
    """Whether the saved ``t`` is the plan's entry: that very input/output (q, k and v may be one tensor), None, or
    a tensor of that shape and dtype that is none of them."""
    if kind == "none" or t is None:
        return kind == "none" and t is None
    if kind != "new":
        return t is given[kind]
    return tuple(t.shape) == tuple(shape) and t.dtype == dtype and not any(t is g for g in given.values())


def _shares_storage(x: Tensor, others: Sequence[Tensor]) -> bool:
    ptr = x.untyped_storage().data_ptr()
    return any(o.untyped_storage().data_ptr() == ptr for o in others)


# ---------------------------------------------------------------------------------------------- the ops
@torch.library.custom_op("usp::attention_forward", mutates_args=())
def _attention_forward(q: Tensor, k: Tensor, v: Tensor, sinks: Optional[Tensor], cu_seqlens: Optional[Tensor],
                       mesh: str, options: str, backward: bool) -> Tuple[Tensor, Tensor, List[Tensor]]:
    o = _decode(options)
    # the leaves the eager call would get, so the ranks agree on `backward` (and the sinks' grad) as in eager
    with torch.enable_grad():
        leaves = [x.detach().requires_grad_(backward) for x in (q, k, v)]
        sinks_leaf = None if sinks is None else sinks.detach().requires_grad_(o["sinks_grad"])
        call = _Call(*leaves, sinks_leaf, cu_seqlens, mesh, options, agree=True)
    with torch.no_grad():
        q4, k4, v4 = (q, k, v) if call.dense else (q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0))
        kr, vr = k4, v4
        if call.repeat > 1:
            kr, vr = (_dense._ReplicateKVHeads.forward(_Context(), x, call.repeat) for x in (k4, v4))
        ctx = _Context()
        out4, lse4 = call.function.forward(ctx, q4, kr, vr, *call.args, sinks)
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
        given = dict(q=q4, k=kr, v=vr, out=out4 if call.dense else None, sinks=sinks)
        plan = _saved_plan(q, k, v, sinks, call.dense, call.mesh, o)
        saved = ctx.saved_tensors
        if len(saved) != len(plan) or not all(_is_planned(t, kind, shape, dtype, given)
                                              for t, (kind, shape, dtype) in zip(saved, plan)):
            got = [("none", None, None) if t is None else
                   (next((name for name, g in given.items() if g is t), "new"), tuple(t.shape), t.dtype)
                   for t in saved]
            raise RuntimeError(f"usp.compiled: {call.function.__name__} saved {got}, its saved_layout says {plan}; "
                               f"update {call.function.__name__}.saved_layout")
        new = [t.contiguous() for t, (kind, _, _) in zip(saved, plan) if kind == "new"]
        # a custom op's outputs alias neither its inputs nor each other
        inputs = [q, k, v] + ([sinks] if sinks is not None else [])
        if _shares_storage(out, new + inputs):
            out = out.clone()
        if o["return_lse"] and _shares_storage(lse, new + inputs + [out]):
            lse = lse.clone()
    return out, lse, new


@_attention_forward.register_fake
def _attention_forward_fake(q, k, v, sinks, cu_seqlens, mesh, options, backward):
    o = _decode(options)
    dense = cu_seqlens is None
    plan = _saved_plan(q, k, v, sinks, dense, SequenceParallelMesh._from_group_spec(mesh), o)
    lse_dtype = torch.promote_types(q.dtype, torch.float32)
    if o["return_lse"]:
        lse = q.new_empty((q.shape[0], q.shape[2], q.shape[1]) if dense else (q.shape[1], q.shape[0]), dtype=lse_dtype)
    else:
        lse = q.new_empty((0,), dtype=lse_dtype)
    out = q.new_empty(tuple(q.shape[:-1]) + (v.shape[-1],))  # v's head_dim (MLA)
    return out, lse, [q.new_empty(shape, dtype=dtype) for kind, shape, dtype in plan if kind == "new"]


@torch.library.custom_op("usp::attention_backward", mutates_args=())
def _attention_backward(dout: Tensor, inputs: List[Tensor], sinks: Optional[Tensor], saved: List[Tensor],
                        cu_seqlens: Optional[Tensor], mesh: str, options: str, kv_heads: int,
                        head_dim: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    q_shape, k_shape, v_shape = _input_shapes(dout, kv_heads, head_dim)
    like = dout.new_empty(())  # validation reads shapes, dtype and device only: expanded views, no memory
    q, k, v = (like.expand(s) for s in (q_shape, k_shape, v_shape))
    call = _Call(q, k, v, sinks, cu_seqlens, mesh, options, agree=False)
    expand = (lambda x: x) if call.dense else (lambda x: x.unsqueeze(0))
    dout4 = dout
    if not call.dense:
        padding = call.padding(dout.device)  # the eager path's masked_fill: zero gradient at padding rows
        dout4 = (dout if padding is None else dout.masked_fill(padding[:, None, None], 0.0)).unsqueeze(0)
    plan = _saved_plan(q, k, v, sinks, call.dense, call.mesh, call.options)
    given_kinds = [kind for kind in _GIVEN if kind in {kind for kind, _, _ in plan}]
    given = dict(zip(given_kinds, (expand(x) for x in inputs)), sinks=sinks, none=None)
    new = iter(saved)
    tensors = [next(new) if kind == "new" else given[kind] for kind, _, _ in plan]
    lead = (1,) if not call.dense else ()
    replicated = [lead + s[:-2] + (s[-2] * call.repeat, s[-1]) for s in (k_shape, v_shape)]
    ctx = call.context(*(like.expand(s) for s in [lead + q_shape] + replicated), tensors, sinks)
    grads = call.function.backward(ctx, dout4, None)
    (dq, dk, dv), dsinks = grads[:3], grads[3 + len(call.args)]  # apply(q, k, v, *args, sinks[, ready])
    if call.repeat > 1:
        replicas = _Context()
        replicas.repeat = call.repeat
        dk, dv = (_dense._ReplicateKVHeads.backward(replicas, g)[0] for g in (dk, dv))
    if not call.dense:
        dq, dk, dv = dq[0], dk[0], dv[0]
    dsinks = dout.new_empty((0,)) if dsinks is None else dsinks.contiguous()
    return dq.contiguous(), dk.contiguous(), dv.contiguous(), dsinks


def _input_shapes(dout: Tensor, kv_heads: int, head_dim: int):
    """q, k, v shapes of the call whose output gradient is ``dout`` (its last dim is the value head dim)."""
    lead = tuple(dout.shape[:-2])
    return lead + (dout.shape[-2], head_dim), lead + (kv_heads, head_dim), lead + (kv_heads, dout.shape[-1])


@_attention_backward.register_fake
def _attention_backward_fake(dout, inputs, sinks, saved, cu_seqlens, mesh, options, kv_heads, head_dim):
    grads = tuple(dout.new_empty(shape) for shape in _input_shapes(dout, kv_heads, head_dim))
    sinks_grad = sinks is not None and _decode(options)["sinks_grad"]
    return grads + (sinks.new_empty(sinks.shape) if sinks_grad else dout.new_empty((0,)),)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, sinks, cu_seqlens, mesh, options, backward = inputs
    out, _, saved = output
    plan = _saved_plan(q, k, v, sinks, cu_seqlens is None, SequenceParallelMesh._from_group_spec(mesh),
                       _decode(options))
    kinds = {kind for kind, _, _ in plan}
    given = [x for kind, x in zip(_GIVEN, (q, k, v, out)) if kind in kinds]
    ctx.n_given, ctx.has_cu, ctx.has_sinks = len(given), cu_seqlens is not None, sinks is not None
    ctx.save_for_backward(*given, *([cu_seqlens] if ctx.has_cu else []), *([sinks] if ctx.has_sinks else []),
                          *saved)
    ctx.mesh, ctx.options, ctx.kv_heads, ctx.head_dim = mesh, options, k.shape[-2], q.shape[-1]
    ctx.mark_non_differentiable(*saved)


def _backward(ctx, dout, _dlse, _dsaved):
    tensors = list(ctx.saved_tensors)
    given, rest = tensors[:ctx.n_given], tensors[ctx.n_given:]
    cu_seqlens = rest.pop(0) if ctx.has_cu else None
    sinks = rest.pop(0) if ctx.has_sinks else None
    dq, dk, dv, dsinks = torch.ops.usp.attention_backward(dout.contiguous(), given, sinks, rest, cu_seqlens,
                                                          ctx.mesh, ctx.options, ctx.kv_heads, ctx.head_dim)
    return dq, dk, dv, (dsinks if ctx.needs_input_grad[3] else None), None, None, None, None


_attention_forward.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------- entry
def compiled_attention(q: Tensor, k: Tensor, v: Tensor, mesh: SequenceParallelMesh, packed, options: Dict[str, Any],
                       sinks: Optional[Tensor] = None):
    """``long_context_attention`` (``packed=None``) or ``long_context_attention_varlen`` (``packed=(cu_seqlens,
    max_seqlen)``) with the keyword arguments ``options`` and ``sinks``, as the custom op (Note [compiled
    attention]). Dynamo traces this function; the op runs validation and the ranks' agreement at run time."""
    if not isinstance(mesh, SequenceParallelMesh):
        raise TypeError(f"mesh must be a usp.SequenceParallelMesh, got {type(mesh).__name__}")
    if not isinstance(options["backend"], str):
        raise TypeError(f"under torch.compile the backend must be given by name (e.g. 'auto', 'reference'), got "
                        f"{type(options['backend']).__name__}: a kernel object cannot be passed to a custom op")
    if sinks is not None and not isinstance(sinks, torch.Tensor):
        raise TypeError(f"sinks must be a torch.Tensor [heads] or None, got {type(sinks).__name__}")
    cu_seqlens = None
    if packed is not None:
        cu_seqlens, max_seqlen = packed
        if not isinstance(cu_seqlens, torch.Tensor):
            cu_seqlens = torch.tensor(list(cu_seqlens), dtype=torch.int64)
        if max_seqlen is not None and not isinstance(max_seqlen, int):
            raise TypeError(f"under torch.compile max_seqlen must be an int or None, got {type(max_seqlen).__name__}")
        options = dict(options, max_seqlen=max_seqlen)
    grad = torch.is_grad_enabled()
    backward = grad and (q.requires_grad or k.requires_grad or v.requires_grad)
    options = dict(options, sinks_grad=bool(sinks is not None and grad and sinks.requires_grad))
    out, lse, _ = torch.ops.usp.attention_forward(q, k, v, sinks, cu_seqlens, mesh._group_spec(), _encode(options),
                                                  backward)
    return (out, lse.detach()) if options["return_lse"] else out
