"""End-to-end cases for the transformers integration, run inside a gloo world (see test_integration_transformers.py).

One tiny random-weight Llama (GQA) is built identically in the parent (the single-process references) and on every
rank. Each rank runs one forward + backward on its shard under a Ulysses x ring mesh, sums the partial gradients
over the sequence-parallel group and returns the loss and every gradient; the parent compares them with the
single-process model. ``FAMILIES``: the same sizes in the model families whose attention has a sliding window,
softcap, sinks or MLA head sizes (issue 11).
"""
from __future__ import annotations

import re
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

FP32_ULP = torch.finfo(torch.float32).eps

# hidden 64 = 4 heads x head_dim 16, 2 KV heads (GQA); initializer_range 0.15 keeps attention far from uniform
CONFIG = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=128, max_position_embeddings=256, rms_norm_eps=1e-6, attention_dropout=0.0, use_cache=False,
    tie_word_embeddings=False, initializer_range=0.15,
)
# 44 = 4 * 11: local shards of 22 (2 ranks) and 11 (4 ranks), zigzag chunks of 11 (ring 2): odd lengths
BATCH, SEQLEN = 2, 44


# RoPE whose frequencies depend on the sequence length (Note [length-dependent RoPE] in the integration). The
# thresholds sit between a shard's largest position and the global one (44): on 1x2 the zigzag shard of rank 1 ends
# at position 32, on 2x1 rank 0's ends at 21, so each rank alone would choose other frequencies than one process.
ROPE_MODELS = {
    # Phi-3 128k-style: long factors when max(position_ids) + 1 > original_max_position_embeddings = 40
    "phi3 longrope": ("phi3", dict(
        max_position_embeddings=160, original_max_position_embeddings=40, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, rope_parameters={"rope_type": "longrope", "short_factor": [1.0] * 8,
                                         "long_factor": [1.0 + 0.5 * i for i in range(8)],
                                         "original_max_position_embeddings": 40})),
    # dynamic NTK: the base grows once max(position_ids) + 1 > max_position_embeddings = 36
    "llama dynamic": ("llama", dict(
        max_position_embeddings=36, rope_parameters={"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0})),
}


def make_model(dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa", state_dict=None,
               family: str = "llama", **overrides):
    """The tiny model of ``CONFIG`` (``family`` "llama" or "phi3"), seeded, with ``overrides`` on the config."""
    import transformers

    classes = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "phi3": ("Phi3Config", "Phi3ForCausalLM")}
    config_class, model_class = (getattr(transformers, name) for name in classes[family])
    torch.manual_seed(1234)
    config = config_class(**{**CONFIG, **overrides}, attn_implementation=attn_implementation)
    model = model_class(config)
    if state_dict is not None:
        model.load_state_dict(state_dict)
    return model.to(dtype)


def make_batch(seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Token ids [BATCH, SEQLEN] and labels with some ignored positions (so counts differ across ranks)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, CONFIG["vocab_size"], (BATCH, SEQLEN), generator=gen)
    labels = ids.clone()
    labels[0, :7] = -100  # a "prompt" not trained on
    labels[1, 20:25] = -100
    return ids, labels


def reference(model, ids, labels) -> Dict[str, object]:
    """Single-process loss (mean over non-ignored next tokens, in the model's dtype) and gradients."""
    from usp.integrations.data import shift_labels

    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids, use_cache=False).logits
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), shift_labels(labels).reshape(-1), ignore_index=-100)
    loss.backward()
    return {"loss": loss.detach(), "grads": {n: p.grad.detach().clone() for n, p in model.named_parameters()}}


def enable_checkpointing(model) -> None:
    """Non-reentrant activation checkpointing per decoder layer (renamed in transformers 5.2x)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()


def run_sequence_parallel(mesh, state_dict, ids, labels, mode: str = "register", data_parallel_group=None,
                          checkpointing: bool = False, bucket_bytes: int = 256 * 2 ** 20,
                          model_kwargs: Optional[dict] = None) -> dict:
    """One forward + backward of the tiny model (``make_model(**model_kwargs)``) on this rank's shard; gradients
    summed over SP (and averaged over ``data_parallel_group`` if given)."""
    import usp.integrations.transformers as usp_hf
    from usp.integrations import data

    model = make_model(torch.float32, "sdpa", state_dict, **(model_kwargs or {}))
    if checkpointing:
        enable_checkpointing(model)
    usp_hf.enable(model, mesh, mode=mode)
    batch = data.shard_batch({"input_ids": ids, "labels": labels}, mesh)
    targets = batch.pop("shift_labels")
    logits = model(**batch, use_cache=False).logits
    partial = data.causal_lm_loss(logits, targets, mesh)
    partial.backward()
    data.all_reduce_gradients(model, mesh, data_parallel_group=data_parallel_group, bucket_bytes=bucket_bytes)
    result = {
        "loss": data.reduce_loss(partial, mesh),
        "grads": {n: p.grad.detach().clone() for n, p in model.named_parameters()},
        "implementation": model.config._attn_implementation,
    }
    usp_hf.disable(model)
    return result


def shared_config_models(mesh, state_dict, ids) -> dict:
    """Two models built from ONE config object; enabling the first (either mode) must leave the second as it was:
    same config object and implementation, same logits, no "was not enabled" error."""
    import usp.integrations.transformers as usp_hf
    from transformers import LlamaConfig, LlamaForCausalLM

    out = {}
    for mode in ("register", "replace"):
        config = LlamaConfig(**CONFIG, attn_implementation="sdpa")
        first, second = LlamaForCausalLM(config), LlamaForCausalLM(config)
        first.load_state_dict(state_dict)
        second.load_state_dict(state_dict)
        before = second(input_ids=ids).logits.detach()
        usp_hf.enable(first, mesh, mode=mode)
        after = guarded(lambda: second(input_ids=ids).logits.detach())
        out[mode] = {
            "second_unchanged": isinstance(after, torch.Tensor) and torch.equal(before, after),
            "second_error": after.get("error") if isinstance(after, dict) else None,
            "second_config_kept": second.config is config and all(
                getattr(m, "config", config) is config for m in second.modules()),
            "second_implementation": second.config._attn_implementation,
            "first_implementation": first.config._attn_implementation,
            "first_config_own": first.config is not config and all(
                getattr(m, "config", None) is not config for m in first.modules()),
            "shared_config_implementation": config._attn_implementation,
        }
        usp_hf.disable(first)
        out[mode]["first_disabled_implementation"] = first.config._attn_implementation
    return out


# a packed row of 4 documents (44 tokens): shorter and longer than the 2R zigzag chunks, none a multiple of them
DOCUMENTS = (13, 5, 20, 6)


def make_packed(seed: int = 2):
    """Packed ``input_ids [44]``, ``labels [44]`` (a few ignored) and the global ``cu_seqlens``."""
    gen = torch.Generator().manual_seed(seed)
    total = sum(DOCUMENTS)
    ids = torch.randint(0, CONFIG["vocab_size"], (total,), generator=gen)
    labels = ids.clone()
    labels[14:16] = -100
    cu = [0]
    for length in DOCUMENTS:
        cu.append(cu[-1] + length)
    return ids, labels, cu


def packed_reference(model, ids, labels, cu) -> Dict[str, object]:
    """Each document on its own through the single-process model: sum of token losses / count, and gradients."""
    from usp.integrations.data import shift_labels

    model.zero_grad(set_to_none=True)
    total, count = 0.0, 0
    for start, end in zip(cu[:-1], cu[1:]):
        logits = model(input_ids=ids[None, start:end], use_cache=False).logits[0]
        targets = shift_labels(labels[start:end])
        total = total + F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum")
        count += int((targets != -100).sum())
    loss = total / count
    loss.backward()
    return {"loss": loss.detach(), "grads": {n: p.grad.detach().clone() for n, p in model.named_parameters()}}


def run_packed(mesh, state_dict, ids, labels, cu) -> dict:
    """The packed row through the varlen path (cu_seq_lens_* passed to the model), gradients summed over SP."""
    import usp.integrations.transformers as usp_hf
    from usp.integrations import data

    model = usp_hf.enable(make_model(torch.float32, "sdpa", state_dict), mesh)
    batch = data.shard_packed_batch(ids, cu, mesh, labels=labels)
    targets = batch.pop("shift_labels")
    partial = data.causal_lm_loss(model(**batch, use_cache=False).logits, targets, mesh)
    partial.backward()
    data.all_reduce_gradients(model, mesh)
    return {"loss": data.reduce_loss(partial, mesh),
            "grads": {n: p.grad.detach().clone() for n, p in model.named_parameters()}}


def portable(obj):
    """Tensors -> numpy arrays, recursively: torch.multiprocessing would pass tensors by shared memory, which is
    gone once the rank process exits."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().numpy()
    if isinstance(obj, dict):
        return {k: portable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(portable(v) for v in obj)
    return obj


def restore(obj):
    """Inverse of ``portable`` (numpy arrays -> tensors)."""
    import numpy as np

    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj)
    if isinstance(obj, dict):
        return {k: restore(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(restore(v) for v in obj)
    return obj


def guarded(fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, or ``{"error": traceback}`` so one failing case does not hide the others."""
    import traceback

    try:
        return fn(*args, **kwargs)
    except Exception:  # noqa: BLE001 - reported by the test that owns the case
        return {"error": traceback.format_exc()}


def capture(checks: List[Tuple[str, Callable]]) -> Dict[str, Optional[Tuple[str, str]]]:
    """Run each callable; record (exception type name, message) or None if it did not raise."""
    out = {}
    for name, fn in checks:
        try:
            fn()
            out[name] = None
        except Exception as error:  # noqa: BLE001 - recorded and asserted by the parent
            out[name] = (type(error).__name__, str(error))
    return out


def relative_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    norm = float(torch.linalg.vector_norm(ref))
    return float(torch.linalg.vector_norm(x.double() - ref)) / norm if norm else float(torch.linalg.vector_norm(x))


def compare(result: dict, truth: dict, single: dict, floor: float = FP32_ULP) -> List[str]:
    """Problems (empty = pass): every tensor's relative Frobenius error vs the fp64 truth must be at most twice the
    same-dtype single-process model's error, plus one float32 ulp (the rule of the core tests; ``floor`` replaces
    the ulp for float64 runs)."""
    problems = []
    pairs = [("loss", result["loss"], truth["loss"], single["loss"])]
    pairs += [(f"grad {n}", result["grads"][n], truth["grads"][n], single["grads"][n]) for n in truth["grads"]]
    for name, got, ref, base in pairs:
        error, base_error = relative_error(got, ref), relative_error(base, ref)
        bound = 2 * base_error + floor
        if not error <= bound:
            problems.append(f"{name}: error {error:.3e} > bound {bound:.3e} (single-process error {base_error:.3e})")
    return problems


def matches(record: Optional[Tuple[str, str]], exception: str, pattern: str) -> bool:
    return record is not None and record[0] == exception and re.search(pattern, record[1]) is not None


# ---------------------------------------------------------------------------------------------- model families
# Families whose attention is not plain causal (issue 11), as tiny random configs on CONFIG's sizes. WINDOW = 8 is
# smaller than a zigzag chunk (11) and a shard (11 or 22): windowed layers exchange halos, not whole shards.
WINDOW = 8
FAMILIES = {
    # every layer windowed
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=WINDOW)),
    # layers >= max_window_layers windowed: layer 0 full, layer 1 sliding
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(use_sliding_window=True, sliding_window=WINDOW,
                                                      max_window_layers=1)),
    # softcap 2 binds at these logits; scaling query_pre_attn_scalar ** -0.5 != head_dim ** -0.5; sliding, full
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(
        sliding_window=WINDOW, head_dim=16, query_pre_attn_scalar=24, attn_logit_softcapping=2.0,
        layer_types=["sliding_attention", "full_attention"])),
    # local layer, then global layer (per-layer-type RoPE)
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        sliding_window=WINDOW, head_dim=16, query_pre_attn_scalar=24,
        layer_types=["sliding_attention", "full_attention"])),
    # learnable sinks, sliding then full; both experts on every token (no routing to flip between fp32 and fp64),
    # run as plain matmuls (torch's grouped_mm has no float64)
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM", dict(
        sliding_window=WINDOW, head_dim=16, num_local_experts=2, num_experts_per_tok=2,
        experts_implementation="eager",
        layer_types=["sliding_attention", "full_attention"])),
    # MLA: q/k head_dim 16 + 8 = 24, v head_dim 16; dense MLPs (first_k_dense_replace = layers)
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(
        num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=16, first_k_dense_replace=2, n_routed_experts=2, num_experts_per_tok=1, n_group=1, topk_group=1)),
}
# gpt-oss runs in float64 on both sides: in float32 the sinks' and the router bias's gradients are sums with heavy
# cancellation whose rounding depends on the algorithm (transformers' eager softmax over a concatenated sink column
# vs usp's LSE form, Note [attention sinks] in usp/ring.py): measured 2.6-7x the single-process float32 error on
# 1x2/2x1, while in float64 every gradient is within 3e-15 of one process. FP64_BOUND is the bound there.
FAMILY_DTYPE = {"gpt_oss": torch.float64}
FP64_BOUND = 1e-12
# mode="replace" keeps the model's implementation name; transformers refuses "sdpa" for these two families, which
# are loaded with flash attention on GPUs: the name is set on the config as such a load would (no flash_attn needed)
REPLACE_FROM = {"gemma2": "flash_attention_2", "gpt_oss": "flash_attention_2"}


def make_family_model(family: str, dtype: torch.dtype = torch.float32, implementation: str = "eager",
                      state_dict=None, **overrides):
    """The tiny ``family`` model of ``FAMILIES`` (seeded), its attention implementation named ``implementation``."""
    import transformers

    config_class, model_class, family_overrides = FAMILIES[family]
    torch.manual_seed(1234)
    config = getattr(transformers, config_class)(**{**CONFIG, **family_overrides, **overrides},
                                                 attn_implementation="eager")
    model = getattr(transformers, model_class)(config)
    if implementation != "eager":
        model.config._attn_implementation = implementation  # the setter: no check that flash_attn is installed
    if state_dict is not None:
        model.load_state_dict(state_dict)
    return model.to(dtype)


def family_references(family: str, ids, labels, packed, **overrides) -> dict:
    """fp32 weights, and fp64 truth / fp32 single-process results (eager attention) on the dense batch and on the
    packed row (each document alone)."""
    model32 = make_family_model(family, torch.float32, **overrides)
    state_dict = {k: v.clone() for k, v in model32.state_dict().items()}
    model64 = make_family_model(family, torch.float64, state_dict=state_dict, **overrides)
    dense, packed_truth = reference(model64, ids, labels), packed_reference(model64, *packed)
    if FAMILY_DTYPE.get(family) == torch.float64:  # the single-process float64 model is the truth
        return {"state_dict": state_dict, "dense": (dense, dense), "packed": (packed_truth, packed_truth)}
    return {"state_dict": state_dict,
            "dense": (dense, reference(model32, ids, labels)),
            "packed": (packed_truth, packed_reference(model32, *packed))}


def run_family(mesh, family: str, state_dict, ids, labels, mode: str = "register", cu=None,
               dtype: torch.dtype = torch.float32, **overrides) -> dict:
    """One forward + backward of the ``family`` model on this rank's shard (dense, or the packed row when ``cu`` is
    given), gradients summed over SP. Register mode starts from "eager", replace mode from ``REPLACE_FROM``."""
    import usp.integrations.transformers as usp_hf
    from usp.integrations import data

    implementation = "eager" if mode == "register" else REPLACE_FROM.get(family, "sdpa")
    model = make_family_model(family, dtype, implementation, state_dict, **overrides)
    usp_hf.enable(model, mesh, mode=mode)
    if cu is None:
        batch = data.shard_batch({"input_ids": ids, "labels": labels}, mesh)
    else:
        batch = data.shard_packed_batch(ids, cu, mesh, labels=labels)
    targets = batch.pop("shift_labels")
    partial = data.causal_lm_loss(model(**batch, use_cache=False).logits, targets, mesh)
    partial.backward()
    data.all_reduce_gradients(model, mesh)
    result = {"loss": data.reduce_loss(partial, mesh),
              "grads": {n: p.grad.detach().clone() for n, p in model.named_parameters()},
              "implementation": model.config._attn_implementation}
    usp_hf.disable(model)
    return result


# (family, overrides) per case name: the six families, plus packed-only cases whose window (20 = the longest
# document) binds on no document
FAMILY_CASES = {name: (name, {}) for name in FAMILIES}
PACKED_ONLY_CASES = {"gemma2 window 20": ("gemma2", dict(sliding_window=20)),
                     "gpt_oss window 20": ("gpt_oss", dict(sliding_window=20))}


def family_cases(meshes: dict, modes, states: dict, ids, labels, packed_meshes=()) -> dict:
    """Every (case, mesh, mode) this world runs: ``{"<case> <mesh> <mode|packed>": result or {"error": ...}}``.
    ``meshes``: name -> mesh; ``modes``: (mesh name, mode) pairs; ``states``: case -> fp32 state dict."""
    out = {}
    pids, plabels, cu = make_packed()
    for case, (family, overrides) in {**FAMILY_CASES, **PACKED_ONLY_CASES}.items():
        state_dict = states[case]
        overrides = dict(overrides, dtype=FAMILY_DTYPE.get(family, torch.float32))
        if case in FAMILY_CASES:
            for mesh_name, mode in modes:
                out[f"{case} {mesh_name} {mode}"] = guarded(run_family, meshes[mesh_name], family, state_dict, ids,
                                                            labels, mode, **overrides)
        for mesh_name in packed_meshes:
            out[f"{case} {mesh_name} packed"] = guarded(run_family, meshes[mesh_name], family, state_dict, pids,
                                                        plabels, "register", cu, **overrides)
    return out
