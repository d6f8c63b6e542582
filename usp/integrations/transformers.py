"""Hugging Face transformers integration: one call makes a loaded model run usp attention.

Usage::

    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="sdpa", dtype=torch.bfloat16)
    mesh = usp.SequenceParallelMesh(ulysses=2, ring=2)          # under torchrun, on every rank
    usp.integrations.transformers.enable(model, mesh)           # model now runs usp attention over `mesh`

    batch = usp.integrations.data.shard_batch({"input_ids": ids, "labels": ids}, mesh)   # global batch -> shard
    labels = batch.pop("shift_labels")
    loss = usp.integrations.data.causal_lm_loss(model(**batch).logits, labels, mesh)      # partial (exact) loss
    loss.backward(); usp.integrations.data.all_reduce_gradients(model, mesh)

Every rank feeds the model its shard (``input_ids [b, S/P]``) and the *global* positions of that shard
(``position_ids``, from ``shard_batch`` or ``usp.position_ids``), in the layout of ``usp.shard`` (zigzag when
causal and ring > 1). Everything outside attention is per token, so only attention needs the other ranks.

Two modes (``enable(..., mode=...)``):

* ``"register"`` (default): registers the function ``attention_forward`` as ``"usp"`` in transformers'
  ``AttentionInterface`` and the mask function ``mask_function`` as ``"usp"`` in ``AttentionMaskInterface``, and
  switches the model to ``attn_implementation="usp"`` (through ``model.set_attn_implementation``).
* ``"replace"``: the model keeps its attention implementation name (``"sdpa"`` or ``"flash_attention_2/3/4"``),
  for model code that branches on those names. The registry entries of those names are replaced by dispatchers
  that run usp for the modules of enabled models and the original function for every other model in the process.

Note [how the mesh reaches the attention function]. transformers looks attention functions up by name and calls
``fn(module, query, key, value, attention_mask, scaling=..., dropout=..., **kwargs)``. ``enable`` stores a small
binding (mesh, backend, layout) on every submodule of the model as ``module._usp_attention``; the function reads it
from ``module``. No process group lives in a global, and two models in one process can use two meshes.

Note [masks]. usp applies the causal mask inside the kernel over *global* positions, so no 4D mask is built. The
"usp" mask function returns None, but refuses a padding mask (an ``attention_mask`` with zeros): usp's dense path
would attend to padding, so padded or packed batches must go through the varlen path. Without a registered mask
function transformers would skip mask creation and silently drop the padding mask; that is why one is registered.

Note [masks of model families]. Models with other masks than plain causal pass them to the attention function as
kwargs, per layer; they map onto usp's options exactly (the core computes them over *global* positions, on the
same shards as the global layers):

* ``sliding_window=W`` (Mistral: every layer; Qwen2 with ``use_sliding_window``, Gemma 2/3, gpt-oss: the layers
  whose ``config.layer_types`` entry is ``"sliding_attention"``, the attribute ``module.sliding_window``; None on
  full layers). transformers' causal mask lets query ``i`` see key ``j`` iff ``0 <= i - j < W``, i.e. flash-attn's
  ``window_size=(W - 1, 0)``; for a bidirectional layer (``is_causal=False``, e.g. Gemma 3's
  ``use_bidirectional_attention``) ``|i - j| < W``, i.e. ``(W - 1, W - 1)`` (transformers' flash-attention path
  uses the same pair). A window as wide as the sequence is no window.
* ``softcap=c`` (Gemma 2's ``attn_logit_softcapping``): ``c * tanh(q.k * scaling / c)`` before the softmax, the
  same as usp's ``softcap``; None is off.
* ``s_aux=sinks`` (gpt-oss: the parameter ``module.sinks [num_attention_heads]``): one logit per query head in the
  softmax denominator, usp's ``sinks``. Its gradient on each rank is the partial sum of that rank's rows and heads;
  ``usp.integrations.data.all_reduce_gradients`` sums it with every other parameter's.
* ``scaling``: whatever the model computes (Gemma's ``query_pre_attn_scalar ** -0.5``, DeepSeek V3's YaRN mscale)
  is passed as ``softmax_scale``.
* MLA (DeepSeek V3): ``value`` has its own head_dim (``v_head_dim``), the output has it too.

What the core cannot do raises there, with its reason, on every rank before any collective (e.g. a named backend
without softcap, or one without the MLA value head size). Packed batches (``cu_seq_lens_q``) take the same options
through ``long_context_attention_varlen``: the window applies inside each document. Known gap: mask semantics that
transformers expresses only in the 4D mask it builds (Llama 4's chunked attention, Gemma 3's bidirectional
image-token spans) are not passed as kwargs: ``enable`` refuses those models (``attention_chunk_size`` set, or
Gemma 3 with a vision tower) instead of computing plain causal.

Note [own config]. Models built from one config object share it, and the attention implementation lives on the
config. So ``enable`` first gives the model its own copies of its config objects (``model.config`` and every
submodule's ``config``, deep-copied together so that sub-configs stay shared inside the model) and only then
switches the copy: every other model keeps its config, its implementation and its masks. ``disable`` switches the
copy back; the model keeps its copy.

Note [length-dependent RoPE]. Some rotary embeddings choose their frequencies from the sequence length they see:
``rope_type="dynamic"`` (NTK scaling grows with ``max(position_ids) + 1``) and ``"longrope"`` (long or short
factors by whether ``max(position_ids) + 1`` exceeds ``original_max_position_embeddings``). On a shard each rank
would see only its own positions and pick other frequencies than one process does. ``enable`` therefore hooks
those rotary modules: before each call the largest position id over the sequence-parallel group (one all-reduce
MAX of one integer per forward) is appended to ``position_ids`` as one extra column, so the frequency update sees
exactly the length one process would see; the extra column's cos/sin are dropped from the output. cos/sin are per
position, so the local rows are the ones one process computes.

Note [input checks]. A sharded model given no ``position_ids`` would silently use local positions ``0..S/P-1`` for
RoPE, and one given packed position ids (restarting per document) without ``cu_seq_lens_*`` would silently attend
across documents. So ``enable`` adds a forward pre-hook on the model that checks, once per forward, that
``position_ids`` are exactly the layout's global positions (one small device-to-host sync; ``check_inputs=False``
turns it off).
"""
from __future__ import annotations

import copy
import inspect
import numbers
import weakref
from dataclasses import dataclass, field
from typing import Any, Optional, Tuple, Union

import torch
import torch.distributed as dist
from torch import nn

from .. import layout
from ..attention import long_context_attention
from ..kernels import AttentionKernel
from ..mesh import SequenceParallelMesh
from ..varlen import long_context_attention_varlen

__all__ = ["ATTN_IMPLEMENTATION", "REPLACEABLE", "enable", "disable", "attention_forward", "mask_function"]

Tensor = torch.Tensor

#: the name registered in AttentionInterface / AttentionMaskInterface
ATTN_IMPLEMENTATION = "usp"
#: the implementation names mode="replace" substitutes
REPLACEABLE = ("sdpa", "flash_attention_2", "flash_attention_3", "flash_attention_4")
_MODES = ("register", "replace")
_BINDING_ATTR = "_usp_attention"

_PADDING_ERROR = (
    "usp attention got an attention_mask with zeros (padding or packed documents). usp's dense path attends to "
    "every token of the global sequence; padded or packed batches go through the varlen path (pass cu_seq_lens_q/"
    "cu_seq_lens_k, see usp.long_context_attention_varlen). For unpadded batches pass attention_mask=None."
)


# ---------------------------------------------------------------------------------------------- the binding
@dataclass(eq=False)
class _Binding:
    """What ``enable`` attaches to every submodule of a model (see Note [how the mesh reaches the attention ...])."""

    mesh: SequenceParallelMesh
    backend: Union[str, AttentionKernel]
    causal: bool  # the layout the inputs were sharded with
    mode: str
    previous_implementation: Any = None
    hook: Any = field(default=None, repr=False)
    rope_hooks: list = field(default_factory=list, repr=False)

    def __deepcopy__(self, memo):
        # copy.deepcopy(model) (EMA, accelerate) shares the mesh: process groups cannot be copied
        return self


def _binding(module: nn.Module) -> Optional[_Binding]:
    return module.__dict__.get(_BINDING_ATTR)


# ---------------------------------------------------------------------------------------------- attention
def attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Optional[Tensor],
    scaling: Optional[float] = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> Tuple[Tensor, None]:
    """The function registered as ``"usp"``: transformers' attention-function contract, run by usp.

    Args:
        module: the model's attention module; must belong to a model passed to ``enable`` (it carries the mesh).
            ``module.is_causal`` (or the ``is_causal`` kwarg) selects causal attention.
        query: ``[b, h, s_local, d]``; key, value: ``[b, h_kv, s_local, d]`` (GQA unexpanded). Used as
            ``[b, s_local, h, d]`` transposed views, without copies.
        attention_mask: must be None (see Note [masks]); a mask here raises.
        scaling: the softmax scale (default ``d ** -0.5``).
        dropout: must be 0 (usp has no attention dropout); set ``config.attention_dropout = 0``.
        kwargs: ``sliding_window``, ``softcap`` and ``s_aux`` (usp's ``window_size``, ``softcap`` and ``sinks``:
            Note [masks of model families]), ``cu_seq_lens_q/k`` and ``max_length_q/k`` (the varlen path),
            ``is_causal``; other kwargs (``position_ids``, ``use_cache``, ...) are ignored.

    Returns:
        ``(out [b, s_local, h, d_v], None)``: no attention weights (``d_v``: value's head_dim, MLA's may differ).
    """
    binding = _binding(module)
    if binding is None:
        raise RuntimeError(
            f"{type(module).__name__} runs attn_implementation={ATTN_IMPLEMENTATION!r} but its model was not enabled: "
            "call usp.integrations.transformers.enable(model, mesh) on the loaded model (it attaches the mesh)"
        )
    mesh = binding.mesh
    if attention_mask is not None:
        raise ValueError(
            f"usp attention got an attention_mask of shape {tuple(getattr(attention_mask, 'shape', ()))}; usp "
            "applies the causal mask itself and takes no custom mask. " + _PADDING_ERROR
        )
    if dropout:
        raise ValueError(
            f"usp attention has no dropout, got dropout={dropout} (training); set the model's "
            "config.attention_dropout = 0.0 (and the attention modules' attention_dropout) before training"
        )
    is_causal = kwargs.get("is_causal")
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    is_causal = bool(is_causal)
    masks = _mask_options(module, kwargs, is_causal)
    if key.shape[2] != query.shape[2]:
        raise ValueError(
            f"usp attention is self-attention over one shard: query has {query.shape[2]} tokens, key {key.shape[2]}; "
            "KV caches (generation) and cross-attention are not supported: pass use_cache=False"
        )
    if is_causal and not binding.causal and mesh.ring > 1:
        raise ValueError(
            "a causal attention layer needs inputs sharded with the causal (zigzag) layout, but enable() was given "
            "causal=False; shard with shard_batch(..., causal=True) and enable(..., causal=True)"
        )
    if kwargs.get("cu_seq_lens_q") is not None:
        return _varlen(binding, query, key, value, is_causal, scaling, kwargs, masks), None
    # [b, h, s, d] views of [b, s, h, d] projections: transposing back is free
    out = long_context_attention(
        query.transpose(1, 2),
        key.transpose(1, 2),
        value.transpose(1, 2),
        mesh,
        causal=is_causal,
        softmax_scale=scaling,
        backend=binding.backend,
        **masks,
    )
    return out, None


def _mask_options(module: nn.Module, kwargs: dict, is_causal: bool) -> dict:
    """transformers' mask kwargs as usp's ``window_size``, ``softcap`` and ``sinks`` (Note [masks of model
    families]); the core validates them on every rank before any collective."""
    window = (-1, -1)
    sliding_window = kwargs.get("sliding_window")
    if sliding_window is not None:
        if not isinstance(sliding_window, numbers.Integral) or isinstance(sliding_window, bool) or sliding_window < 1:
            raise ValueError(
                f"{type(module).__name__} passed sliding_window={sliding_window!r}; usp takes None or an int >= 1 "
                "(transformers' meaning: the number of tokens a query sees, its own included)"
            )
        left = int(sliding_window) - 1  # causal: i - j < sliding_window; bidirectional: |i - j| < sliding_window
        window = (left, 0 if is_causal else left)
    softcap = kwargs.get("softcap")
    return dict(window_size=window, softcap=0.0 if softcap is None else softcap, sinks=kwargs.get("s_aux"))


def _varlen(binding: _Binding, query, key, value, is_causal, scaling, kwargs, masks) -> Tensor:
    """Packed batches (``cu_seq_lens_q``): one packed row through ``long_context_attention_varlen``.

    ``cu_seq_lens_q`` are the *global* document boundaries (``shard_packed_batch`` returns them), the local rows are
    ``usp.varlen.shard_varlen``'s shard, padding included.
    """
    cu_q, cu_k = kwargs["cu_seq_lens_q"], kwargs.get("cu_seq_lens_k")
    if query.shape[0] != 1:
        raise ValueError(f"the varlen path takes one packed row (batch 1), got batch {query.shape[0]}")
    if cu_k is not None and cu_k is not cu_q and not torch.equal(torch.as_tensor(cu_q), torch.as_tensor(cu_k)):
        raise ValueError("usp's varlen path is self-attention: cu_seq_lens_k must equal cu_seq_lens_q")
    # [1, h, t_local, d] -> [t_local, h, d] (flash_attn_varlen_func layout), views
    out = long_context_attention_varlen(
        query[0].transpose(0, 1),
        key[0].transpose(0, 1),
        value[0].transpose(0, 1),
        cu_q,
        kwargs.get("max_length_q"),
        binding.mesh,
        causal=is_causal,
        softmax_scale=scaling,
        **masks,
    )
    return out.unsqueeze(0)


# ---------------------------------------------------------------------------------------------- masks
def mask_function(*args: Any, attention_mask: Optional[Tensor] = None, **kwargs: Any) -> None:
    """The mask function registered as ``"usp"``: no mask to build, but a padding mask is refused.

    transformers calls it with keyword arguments (``batch_size``, ``q_length``/``cache_position``, ``kv_length``,
    ``mask_function``, ``attention_mask`` (2D bool), ``config``, ...). Returns None when ``attention_mask`` is None
    or all ones; raises ValueError if it has zeros (see Note [masks]).
    """
    if attention_mask is None:
        return None
    if isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 2:
        if not bool(attention_mask.bool().all()):
            raise ValueError(_PADDING_ERROR)
        return None
    raise ValueError(
        f"usp attention takes no custom attention mask (got {type(attention_mask).__name__} of shape "
        f"{tuple(getattr(attention_mask, 'shape', ()))}); the causal mask is applied inside the kernel"
    )


# ---------------------------------------------------------------------------------------------- replace mode
class _ReplacedAttention:
    """Registry entry for ``name`` in mode="replace": usp for enabled modules, the original function otherwise."""

    def __init__(self, name: str, original):
        self.name, self.original = name, original

    def __call__(self, module, *args, **kwargs):
        if _binding(module) is not None:
            return attention_forward(module, *args, **kwargs)
        return self.original(module, *args, **kwargs)


class _ReplacedMask:
    """Mask-registry entry for ``name`` in mode="replace": ``mask_function`` for configs of enabled models."""

    # transformers passes mask functions only the config, which cannot hold the binding (it is serialised) and is
    # not hashable: enabled configs are kept here by id, weakly, next to the registry entry they affect.
    configs: "weakref.WeakValueDictionary[int, Any]" = weakref.WeakValueDictionary()

    def __init__(self, name: str, original):
        self.name, self.original = name, original

    def __call__(self, *args, **kwargs):
        config = kwargs.get("config")
        if config is not None and _ReplacedMask.configs.get(id(config)) is config:
            return mask_function(*args, **kwargs)
        return self.original(*args, **kwargs)


def _interfaces():
    import transformers

    try:
        from transformers import AttentionInterface
    except ImportError as error:  # pragma: no cover - transformers < 4.48
        raise ImportError(
            f"usp.integrations.transformers needs transformers>=4.56 with AttentionInterface; found "
            f"{transformers.__version__}"
        ) from error
    try:
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError:  # pragma: no cover - transformers < 4.53: masks are built in the model, not registered
        AttentionMaskInterface = None
    return AttentionInterface, AttentionMaskInterface


def _install(mode: str) -> None:
    """Put usp's functions in transformers' registries (idempotent; no-op cost on repeat)."""
    attention_interface, mask_interface = _interfaces()
    if mode == "register":
        attention_interface.register(ATTN_IMPLEMENTATION, attention_forward)
        if mask_interface is not None:
            mask_interface.register(ATTN_IMPLEMENTATION, mask_function)
        return
    # a fresh interface instance has no local overrides: indexing it reads the library-wide entry
    for interface, wrapper in ((attention_interface, _ReplacedAttention), (mask_interface, _ReplacedMask)):
        if interface is None:
            continue
        entries = interface()
        for name in REPLACEABLE:
            current = entries.get(name)
            if current is not None and not isinstance(current, wrapper):
                interface.register(name, wrapper(name, current))


def _configs(model: nn.Module):
    """The model's config and every config of a submodule (multimodal models have sub-configs)."""
    from transformers import PretrainedConfig

    seen = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if isinstance(config, PretrainedConfig):
            seen[id(config)] = config
            for key in getattr(config, "sub_configs", {}) or {}:
                sub = getattr(config, key, None)
                if isinstance(sub, PretrainedConfig):
                    seen[id(sub)] = sub
    return list(seen.values())


def _set_attn_implementation(model: nn.Module, name: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:  # pragma: no cover - older transformers: the config setter recurses into sub-configs
        model.config._attn_implementation = name


def _own_configs(model: nn.Module) -> None:
    """Give ``model`` its own copies of its config objects (Note [own config])."""
    from transformers import PretrainedConfig

    memo: dict = {}  # one memo: a config shared by several submodules (or a sub-config) stays shared in the copy
    for module in model.modules():
        config = module.__dict__.get("config")
        if isinstance(config, PretrainedConfig):
            module.config = copy.deepcopy(config, memo)


# ---------------------------------------------------------------------------------------------- length-dependent RoPE
#: rope types whose frequencies depend on the largest position id (transformers' ``dynamic_rope_update``)
LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")


def _length_dependent(rope_type: Any) -> bool:
    types = rope_type.values() if isinstance(rope_type, dict) else [rope_type]
    return any(isinstance(t, str) and ("dynamic" in t or t == "longrope") for t in types)


class _GlobalLengthRope:
    """Hooks of one rotary module: the frequency update sees the global largest position (Note [length-dependent
    RoPE]). The pre-hook appends that position as one extra column of ``position_ids``; the forward hook drops
    the extra column from every output (cos, sin: ``position_ids.shape + [dim]``)."""

    def __init__(self, binding: _Binding):
        self.binding = binding
        self.shape = None  # the caller's position_ids shape, between the two hooks

    @staticmethod
    def _positions(args, kwargs):
        if "position_ids" in kwargs:
            return kwargs["position_ids"], None
        return (args[1], 1) if len(args) > 1 else (None, None)

    def before(self, module, args, kwargs):
        positions, index = self._positions(args, kwargs)
        if not isinstance(positions, torch.Tensor) or positions.ndim == 0 or positions.numel() == 0:
            self.shape = None
            return None
        mesh = self.binding.mesh
        largest = positions.max().reshape(1)
        for group, size in ((mesh.ulysses_group, mesh.ulysses), (mesh.ring_group, mesh.ring)):
            if size > 1:
                dist.all_reduce(largest, op=dist.ReduceOp.MAX, group=group)
        extra = largest.to(positions.dtype).expand(*positions.shape[:-1], 1)
        extended = torch.cat([positions, extra], dim=-1)
        self.shape = tuple(positions.shape)
        if index is None:
            return args, {**kwargs, "position_ids": extended}
        return args[:index] + (extended,) + args[index + 1:], kwargs

    def after(self, module, args, kwargs, output):
        shape, self.shape = self.shape, None
        if shape is None:
            return None
        dim, extended = len(shape) - 1, shape[:-1] + (shape[-1] + 1,)

        def trim(t):
            if isinstance(t, torch.Tensor) and tuple(t.shape[:len(shape)]) == extended:
                return t.narrow(dim, 0, shape[-1])
            raise RuntimeError(
                f"usp cannot adapt {type(module).__name__} (rope_type={getattr(module, 'rope_type', None)!r}) to "
                f"sequence parallelism: its output is not per position (expected tensors of shape {extended} + "
                f"[...], got {getattr(t, 'shape', type(t).__name__)}); use a rope type whose frequencies do not "
                f"depend on the sequence length, or run this model without sequence parallelism"
            )

        if isinstance(output, tuple):
            return tuple(trim(t) for t in output)
        return trim(output)


def _hook_length_dependent_rope(model: nn.Module, binding: _Binding) -> None:
    if binding.mesh.sequence_parallel_size == 1:
        return
    for module in model.modules():
        if _length_dependent(getattr(module, "rope_type", None)):
            hooks = _GlobalLengthRope(binding)
            binding.rope_hooks.append(module.register_forward_pre_hook(hooks.before, with_kwargs=True))
            binding.rope_hooks.append(module.register_forward_hook(hooks.after, with_kwargs=True))


# ---------------------------------------------------------------------------------------------- input checks
class _InputCheck:
    """Forward pre-hook: ``position_ids`` must be the layout's global positions (see Note [input checks])."""

    def __init__(self, model: nn.Module, binding: _Binding):
        self.binding = binding
        signature = inspect.signature(model.forward)
        self.names = [p.name for p in signature.parameters.values()
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]

    def _argument(self, args, kwargs, name):
        if name in kwargs:
            return kwargs[name]
        if name in self.names and self.names.index(name) < len(args):
            return args[self.names.index(name)]
        return None

    def __call__(self, module, args, kwargs):
        if self._argument(args, kwargs, "cu_seq_lens_q") is not None:
            return None  # packed: the varlen path checks its own inputs
        tokens = self._argument(args, kwargs, "input_ids")
        if tokens is None:
            tokens = self._argument(args, kwargs, "inputs_embeds")
        if not isinstance(tokens, torch.Tensor) or tokens.ndim < 2:
            return None  # let the model raise its own error
        mesh, causal = self.binding.mesh, self.binding.causal
        local_len = tokens.shape[1]
        given = self._argument(args, kwargs, "position_ids")
        if given is None:
            if mesh.sequence_parallel_size == 1:
                return None
            raise ValueError(
                f"the model runs usp attention over {mesh.sequence_parallel_size} sequence shards, so it needs "
                "position_ids: the global positions of this rank's shard (shard_batch returns them, or "
                "usp.position_ids(seqlen, mesh)[None]); without them RoPE would use local positions 0..S/P-1"
            )
        if not isinstance(given, torch.Tensor) or given.ndim not in (1, 2):
            return None  # e.g. multimodal 3D rope positions: not checked
        expected = layout.position_ids(local_len * mesh.sequence_parallel_size, mesh, causal, device=given.device)
        if given.shape[-1] != local_len or not bool((given == expected).all()):
            raise ValueError(
                "position_ids are not the global positions of this rank's shard in usp's "
                f"{'causal' if causal else 'non-causal'} layout (expected usp.position_ids(seqlen={local_len} * "
                f"{mesh.sequence_parallel_size}, mesh, causal={causal})). Shard the global batch with "
                "usp.integrations.data.shard_batch; packed documents (restarting positions) go through the varlen "
                "path (cu_seq_lens_q/k). enable(..., check_inputs=False) skips this check"
            )
        return None


# ---------------------------------------------------------------------------------------------- enable / disable
def _refuse_mask_only_semantics(config, text_config) -> None:
    """Refuse the models whose attention pattern transformers expresses only in the 4D mask it builds (Note [masks of
    model families], known gap): usp builds no such mask, so they would silently get plain causal attention."""
    chunk = getattr(text_config, "attention_chunk_size", None)
    if chunk is not None:
        raise ValueError(
            f"the model uses chunked attention (attention_chunk_size={chunk}, e.g. Llama 4's local layers), which "
            "transformers applies only through its 4D mask: usp cannot honour it and does not compute it as plain "
            "causal; this model family is not supported"
        )
    if getattr(config, "model_type", None) == "gemma3" and getattr(config, "vision_config", None) is not None:
        raise ValueError(
            "Gemma 3 with a vision tower attends bidirectionally among each image's tokens, which transformers "
            "applies only through its 4D mask: usp cannot honour it; enable the text model (Gemma3ForCausalLM, "
            "model_type 'gemma3_text') instead"
        )


def enable(
    model: nn.Module,
    mesh: SequenceParallelMesh,
    *,
    mode: str = "register",
    backend: Union[str, AttentionKernel] = "auto",
    causal: bool = True,
    check_inputs: bool = True,
) -> nn.Module:
    """Make a loaded transformers model run usp attention over ``mesh``. Returns the model (changed in place).

    Args:
        model: a ``transformers.PreTrainedModel`` whose attention goes through ``AttentionInterface`` (Llama,
            Qwen2/3, Mistral, Gemma 2/3, gpt-oss, DeepSeek V3, ... in transformers >= 4.56).
        mesh: the ``usp.SequenceParallelMesh``; the model's attention heads must be divisible by ``mesh.ulysses``.
        mode: ``"register"`` (default; implementation name "usp") or ``"replace"`` (keep the model's "sdpa" /
            "flash_attention_2|3|4" name; see the module docstring).
        backend: usp kernel, "auto" (fastest available) or a name from ``usp.available_backends()``.
        causal: the layout the inputs are sharded with (``shard_batch(..., causal=...)``); True for causal LMs.
            Non-causal layers are exact on either layout; causal layers need True when ring > 1.
        check_inputs: check ``position_ids`` once per forward (see Note [input checks]).

    Call it on every rank after loading (and after ``.to(device)``), before wrapping in DDP/FSDP. Sliding windows,
    logit softcapping, attention sinks and MLA value head sizes run exactly (Note [masks of model families]);
    generation (KV caches), attention dropout and what the core cannot do (e.g. a named ``backend`` without
    softcap) raise a clear error at the first forward. ``disable(model)`` undoes it. The model gets its own copy of
    its config objects first (Note [own config]): other models built from the same config are left as they were.
    Rotary embeddings whose frequencies depend on the sequence length (``rope_type`` "dynamic", "longrope") see
    the global length, as in one process (Note [length-dependent RoPE]).
    """
    if not isinstance(model, nn.Module) or not hasattr(getattr(model, "config", None), "_attn_implementation"):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    if not isinstance(mesh, SequenceParallelMesh):
        raise TypeError(f"mesh must be a usp.SequenceParallelMesh, got {type(mesh).__name__}")
    if mode not in _MODES:
        raise ValueError(f"mode={mode!r} is not valid; valid values: {_MODES}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if _binding(model) is not None:
        raise ValueError("this model is already enabled; call disable(model) first to change the mesh or mode")
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = getattr(text_config, "num_attention_heads", None)
    if isinstance(heads, int) and heads % mesh.ulysses:
        valid = [u for u in range(1, heads + 1) if heads % u == 0]
        raise ValueError(
            f"the model has num_attention_heads={heads}, not divisible by the mesh's ulysses={mesh.ulysses}; "
            f"Ulysses degrees valid for this model: {valid}"
        )
    _refuse_mask_only_semantics(model.config, text_config)
    current = model.config._attn_implementation
    if mode == "replace" and current not in REPLACEABLE:
        raise ValueError(
            f"mode='replace' keeps the model's attn_implementation, which is {current!r}; it must be one of "
            f"{REPLACEABLE} (load the model with attn_implementation='sdpa') or use mode='register'"
        )

    _install(mode)
    _own_configs(model)
    binding = _Binding(mesh=mesh, backend=backend, causal=causal, mode=mode, previous_implementation=current)
    for module in model.modules():
        module.__dict__[_BINDING_ATTR] = binding
    _hook_length_dependent_rope(model, binding)
    if mode == "register":
        _set_attn_implementation(model, ATTN_IMPLEMENTATION)
    else:
        for config in _configs(model):
            _ReplacedMask.configs[id(config)] = config
    if check_inputs:
        binding.hook = model.register_forward_pre_hook(_InputCheck(model, binding), with_kwargs=True)
    return model


def disable(model: nn.Module) -> nn.Module:
    """Undo ``enable``: the model runs its previous attention implementation again. Returns the model."""
    binding = _binding(model)
    if binding is None:
        raise ValueError("this model was not enabled with usp.integrations.transformers.enable")
    if binding.hook is not None:
        binding.hook.remove()
    for hook in binding.rope_hooks:
        hook.remove()
    if binding.mode == "register":
        _set_attn_implementation(model, binding.previous_implementation)
    else:
        for config in _configs(model):
            _ReplacedMask.configs.pop(id(config), None)
    for module in model.modules():
        module.__dict__.pop(_BINDING_ATTR, None)
    return model
