"""transformers integration, data helpers and DeviceMesh interop: end to end on CPU (gloo), 2 and 4 processes.

A tiny random-weight Llama (GQA: 4 heads, 2 KV heads; fp32) runs one forward + backward under Ulysses x ring
sequence parallelism; the loss and every parameter gradient (summed over the SP group) must match the same model in
one process: relative Frobenius error vs an fp64 run at most 2x the fp32 single-process model's, plus one fp32 ulp
(the rule of the core tests). Meshes: 1x2, 2x1 (2 ranks, register and replace modes, with and without activation
checkpointing); 2x2 (4 ranks, both placements); meshes built from DeviceMeshes (named ulysses/ring dims, a flattened
cp dim split 2x2) and data parallel 2 x (2x1), 2 x (1x2) with a different batch per replica; a packed row of
documents through the varlen path (1x2, 2x1, 2x2) against the model run on each document alone. Model families
with other masks (issue 11: Mistral, Qwen2 sliding window, Gemma 2 softcap, Gemma 3, gpt-oss sinks, DeepSeek V3 MLA;
tiny configs in integration_cases.FAMILIES) on the same meshes, dense and packed. Each world size is
started once (module-scoped fixtures) and runs every case; refused inputs are checked on every rank, followed by a
correct call that would hang if a refused one had entered a collective.
"""
from __future__ import annotations

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402

from distributed import run_world  # noqa: E402
from integration_cases import (  # noqa: E402
    BATCH,
    FAMILY_CASES,
    FAMILY_DTYPE,
    FP64_BOUND,
    PACKED_ONLY_CASES,
    family_cases,
    family_references,
    make_family_model,
    SEQLEN,
    FP32_ULP,
    capture,
    compare,
    guarded,
    make_batch,
    make_model,
    ROPE_MODELS,
    make_packed,
    packed_reference,
    matches,
    portable,
    reference,
    restore,
    run_packed,
    run_sequence_parallel,
    shared_config_models,
)

WORLD_TIMEOUT = 240


# ---------------------------------------------------------------------------------------------- worlds
def _world2(rank, world_size, state_dict, batches, packed, rope_states, family_states):
    import torch.nn as nn

    import usp
    import usp.integrations.transformers as usp_hf
    from usp.integrations import data

    ids, labels = batches[0]
    mesh12 = usp.SequenceParallelMesh(ulysses=1, ring=2)
    mesh21 = usp.SequenceParallelMesh(ulysses=2, ring=1)
    bystander = make_model(torch.float32, "sdpa", state_dict)  # never enabled: replace mode must not touch it
    before = bystander(input_ids=ids).logits.detach()

    results = {"e2e": {}}
    for name, mesh, mode in (("1x2 register", mesh12, "register"), ("2x1 register", mesh21, "register"),
                             ("1x2 replace", mesh12, "replace"), ("2x1 replace", mesh21, "replace")):
        # small gradient buckets on one mesh: many buckets, some reduced in place (a single contiguous gradient)
        buckets = 16 * 2 ** 10 if name == "2x1 replace" else 256 * 2 ** 20
        results["e2e"][name] = run_sequence_parallel(mesh, state_dict, ids, labels, mode=mode, bucket_bytes=buckets)
    results["bystander_unchanged"] = torch.equal(before, bystander(input_ids=ids).logits.detach())
    # long-context training runs with activation checkpointing: the recomputed forward repeats the collectives
    results["checkpointing"] = {
        name: guarded(run_sequence_parallel, mesh, state_dict, ids, labels, checkpointing=True)
        for name, mesh in (("1x2", mesh12), ("2x1", mesh21))}
    # packed documents: cu_seq_lens_* reach the attention function, which runs usp's varlen path
    results["packed"] = {name: guarded(run_packed, mesh, state_dict, *packed)
                         for name, mesh in (("1x2", mesh12), ("2x1", mesh21))}
    results["bystander_implementation"] = bystander.config._attn_implementation
    # enabling one model leaves a model built from the same config object alone
    results["shared_config"] = guarded(shared_config_models, mesh12, state_dict, ids)
    # RoPE whose frequencies depend on the sequence length sees the global length
    results["rope"] = {
        f"{name} {mesh_name}": guarded(run_sequence_parallel, mesh, rope_states[name], ids, labels,
                                       model_kwargs=dict(family=ROPE_MODELS[name][0], **ROPE_MODELS[name][1]))
        for name in ROPE_MODELS for mesh_name, mesh in (("1x2", mesh12), ("2x1", mesh21))}
    # model families with sliding windows, softcap, sinks, MLA (issue 11): both modes, both meshes, dense and packed
    meshes = {"1x2": mesh12, "2x1": mesh21}
    results["families"] = family_cases(
        meshes, [(m, mode) for m in meshes for mode in ("register", "replace")], family_states, ids, labels,
        packed_meshes=("1x2", "2x1"))

    # transformers' own loss with the pre-shifted labels and the global count equals causal_lm_loss
    model = usp_hf.enable(make_model(torch.float32, "sdpa", state_dict), mesh12)
    batch = data.shard_batch({"input_ids": ids, "labels": labels}, mesh12)
    targets = batch.pop("shift_labels")
    count = data.global_token_count(targets, mesh12)
    out = model(**batch, labels=targets, shift_labels=targets, num_items_in_batch=count)
    results["hf_loss"] = (out.loss.detach(), data.causal_lm_loss(out.logits, targets, mesh12).detach())

    # every refused input, on both ranks, before any collective
    replaced = usp_hf.enable(make_model(torch.float32, "sdpa", state_dict), mesh12, mode="replace")
    attn = model.model.layers[0].self_attn
    local = SEQLEN // 2
    q = torch.randn(BATCH, 4, local, 16)
    kv = torch.randn(BATCH, 2, local, 16)
    padding = torch.ones(BATCH, local, dtype=torch.long)
    padding[1, -3:] = 0

    def dropout_in_training():
        model.train()
        for module in model.modules():
            if hasattr(module, "attention_dropout"):
                module.attention_dropout = 0.1
        try:
            model(**batch)
        finally:
            model.eval()
            for module in model.modules():
                if hasattr(module, "attention_dropout"):
                    module.attention_dropout = 0.0

    checks = [
        ("padding mask (register)", lambda: model(**batch, attention_mask=padding)),
        ("padding mask (replace)", lambda: replaced(**batch, attention_mask=padding)),
        ("all-ones mask is fine", lambda: model(**batch, attention_mask=torch.ones_like(padding))),
        ("missing position_ids", lambda: model(input_ids=batch["input_ids"])),
        ("local position_ids", lambda: model(input_ids=batch["input_ids"],
                                             position_ids=torch.arange(local).expand(BATCH, -1))),
        ("dropout in training", dropout_in_training),
        ("sliding window of 0", lambda: usp_hf.attention_forward(attn, q, kv, kv, None, sliding_window=0)),
        ("sliding window covering the sequence",
         lambda: usp_hf.attention_forward(attn, q, kv, kv, None, sliding_window=SEQLEN)),
        ("negative softcap", lambda: usp_hf.attention_forward(attn, q, kv, kv, None, softcap=-30.0)),
        ("sinks of the wrong shape", lambda: usp_hf.attention_forward(attn, q, kv, kv, None, s_aux=torch.zeros(2))),
        ("4D mask", lambda: usp_hf.attention_forward(attn, q, kv, kv, torch.zeros(BATCH, 1, local, local))),
        ("kv cache", lambda: usp_hf.attention_forward(attn, q, torch.cat([kv, kv], 2), torch.cat([kv, kv], 2), None)),
        ("module not enabled", lambda: usp_hf.attention_forward(nn.Linear(2, 2), q, kv, kv, None)),
        ("enable twice", lambda: usp_hf.enable(model, mesh12)),
        ("bad mode", lambda: usp_hf.enable(make_model(), mesh12, mode="monkeypatch")),
        ("not a model", lambda: usp_hf.enable(nn.Linear(2, 2), mesh12)),
        ("heads not divisible by ulysses",
         lambda: usp_hf.enable(make_model(hidden_size=48, num_attention_heads=3, num_key_value_heads=1), mesh21)),
        ("replace from eager", lambda: usp_hf.enable(make_model(attn_implementation="eager"), mesh12, mode="replace")),
        ("chunked attention (Llama 4)", lambda: usp_hf.enable(_llama4_chunked(), mesh12)),
        ("shard_batch bad length", lambda: data.shard_batch({"input_ids": ids[:, :-2]}, mesh12)),
        ("shard_batch unknown key", lambda: data.shard_batch({"input_ids": ids, "pixel_values": ids}, mesh12)),
        ("shard_batch padding", lambda: data.shard_batch(
            {"input_ids": ids, "attention_mask": torch.cat([torch.ones(BATCH, SEQLEN - 1), torch.zeros(BATCH, 1)], 1)},
            mesh12)),
    ]
    results["errors"] = capture(checks)
    # a correct call after all the refused ones: would hang if a refused call had entered a collective
    results["after_errors"] = data.reduce_loss(
        data.causal_lm_loss(model(**batch).logits, targets, mesh12), mesh12)
    usp_hf.disable(model)
    results["disabled_implementation"] = model.config._attn_implementation
    return portable(results)


def _llama4_chunked():
    """A tiny Llama 4 text model with chunked attention, which transformers applies only through its 4D mask."""
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    config = Llama4TextConfig(hidden_size=32, intermediate_size=64, intermediate_size_mlp=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=64,
                              num_local_experts=2, attention_chunk_size=16)
    return Llama4ForCausalLM(config)


def _world4(rank, world_size, state_dict, batches, packed, family_states):
    from torch.distributed.device_mesh import init_device_mesh

    import usp
    from usp.integrations import split_context_parallel

    ids, labels = batches[0]
    results = {"e2e": {}, "dp": {}, "packed": None}
    e2e = results["e2e"]
    e2e["2x2 register"] = run_sequence_parallel(usp.SequenceParallelMesh(ulysses=2, ring=2), state_dict, ids, labels)
    e2e["2x2 ring_inner replace"] = run_sequence_parallel(
        usp.SequenceParallelMesh(ulysses=2, ring=2, placement="ring_inner"), state_dict, ids, labels, mode="replace")
    mesh = usp.SequenceParallelMesh(ulysses=2, ring=2)
    results["packed"] = {"2x2": guarded(run_packed, mesh, state_dict, *packed)}
    meshes = {"2x2": usp.SequenceParallelMesh(ulysses=2, ring=2),
              "2x2 ring_inner": usp.SequenceParallelMesh(ulysses=2, ring=2, placement="ring_inner")}
    results["families"] = family_cases(meshes, [("2x2", "register"), ("2x2 ring_inner", "replace")], family_states,
                                       ids, labels, packed_meshes=("2x2",))

    # torchtitan-style named dims, one per axis
    named = init_device_mesh("cpu", (2, 2), mesh_dim_names=("ulysses", "ring"))
    mesh = usp.SequenceParallelMesh.from_device_mesh(named, ulysses_dim="ulysses", ring_dim="ring")
    e2e["DeviceMesh (ulysses, ring)"] = run_sequence_parallel(mesh, state_dict, ids, labels)
    # accelerate/torchtitan style: one flattened cp dim, split into 2 x 2
    flat = init_device_mesh("cpu", (1, 4), mesh_dim_names=("dp", "cp"))
    mesh = split_context_parallel(flat, "cp", ulysses=2, ring=2)
    results["split_2x2"] = (mesh.ulysses, mesh.ring, mesh.ulysses_rank, mesh.ring_rank, mesh.placement.value)
    e2e["DeviceMesh (dp=1, cp=4) split 2x2"] = run_sequence_parallel(mesh, state_dict, ids, labels)

    # data parallel 2 x (sequence parallel 2): each replica its own batch, gradients averaged over dp
    dp_cp = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "cp"))
    replica = dp_cp.get_coordinate()[0]
    dp_group = dp_cp.get_group("dp")
    ids_r, labels_r = batches[replica]
    results["replica"] = replica
    results["dp"]["dp2 x cp2 split as 2x1"] = run_sequence_parallel(
        split_context_parallel(dp_cp, "cp", ulysses=2, ring=1), state_dict, ids_r, labels_r,
        data_parallel_group=dp_group)
    results["dp"]["dp2 x cp2 from_device_mesh(ring_dim='cp') as 1x2"] = run_sequence_parallel(
        usp.SequenceParallelMesh.from_device_mesh(dp_cp, ring_dim="cp"), state_dict, ids_r, labels_r,
        data_parallel_group=dp_group)
    results["errors"] = capture([
        ("split: sizes do not multiply", lambda: split_context_parallel(dp_cp, "cp", ulysses=2, ring=2)),
        ("split: slice, not root mesh", lambda: split_context_parallel(dp_cp["cp"], 0, ulysses=2, ring=1)),
        ("split: unknown dim", lambda: split_context_parallel(dp_cp, "sp", ulysses=2, ring=1)),
    ])
    return portable(results)


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def references():
    """fp64 truth and fp32 single-process results for batches 0 and 1, plus the shared fp32 weights."""
    torch.set_num_threads(1)
    model32 = make_model(torch.float32)
    state_dict = {k: v.clone() for k, v in model32.state_dict().items()}
    model64 = make_model(torch.float64, state_dict=state_dict)
    batches = [make_batch(0), make_batch(1)]
    truth = [reference(model64, *b) for b in batches]
    single = [reference(model32, *b) for b in batches]
    packed = make_packed()
    truth.append(packed_reference(model64, *packed))
    single.append(packed_reference(model32, *packed))
    return state_dict, batches, truth, single, packed


@pytest.fixture(scope="module")
def rope_references(references):
    """Per length-dependent RoPE model: fp32 weights, fp64 truth and fp32 single-process result on batch 0."""
    _, batches, _, _, _ = references
    out = {}
    for name, (family, overrides) in ROPE_MODELS.items():
        model32 = make_model(torch.float32, family=family, **overrides)
        state_dict = {k: v.clone() for k, v in model32.state_dict().items()}
        model64 = make_model(torch.float64, state_dict=state_dict, family=family, **overrides)
        out[name] = (state_dict, reference(model64, *batches[0]), reference(model32, *batches[0]))
    return out


@pytest.fixture(scope="module")
def family_refs(references):
    """Per family case: fp32 weights, (truth, single) on batch 0 and on the packed row (FAMILY_DTYPE: float64)."""
    _, batches, _, _, packed = references
    return {case: family_references(family, *batches[0], packed, **overrides)
            for case, (family, overrides) in {**FAMILY_CASES, **PACKED_ONLY_CASES}.items()}


def _family_states(family_refs):
    return {case: refs["state_dict"] for case, refs in family_refs.items()}


@pytest.fixture(scope="module")
def world2(references, rope_references, family_refs):
    state_dict, batches, _, _, packed = references
    rope_states = {name: value[0] for name, value in rope_references.items()}
    return restore(run_world(2, _world2, state_dict, batches, packed, rope_states, _family_states(family_refs),
                             timeout=WORLD_TIMEOUT))


@pytest.fixture(scope="module")
def world4(references, family_refs):
    state_dict, batches, _, _, packed = references
    return restore(run_world(4, _world4, state_dict, batches, packed, _family_states(family_refs),
                             timeout=WORLD_TIMEOUT))


def _average(results):
    results = results[:2]  # the two dense batches (the third reference is the packed row)
    return {"loss": sum(r["loss"] for r in results) / len(results),
            "grads": {n: sum(r["grads"][n] for r in results) / len(results) for n in results[0]["grads"]}}


def _check_ranks_agree(per_rank, group, names):
    for name in names:
        first = per_rank[0][group][name]
        for rank, results in enumerate(per_rank[1:], start=1):
            other = results[group][name]
            assert torch.equal(other["loss"], first["loss"]), f"{name}: rank {rank} loss differs from rank 0"
            for param, grad in first["grads"].items():
                assert torch.equal(other["grads"][param], grad), f"{name}: rank {rank} grad {param} differs"


# ---------------------------------------------------------------------------------------------- tests: 2 ranks
@pytest.mark.timeout(WORLD_TIMEOUT + 60)
def test_two_ranks_match_single_process(world2, references):
    _, _, truth, single, _ = references
    cases = world2[0]["e2e"]
    assert set(cases) == {"1x2 register", "2x1 register", "1x2 replace", "2x1 replace"}
    problems = [f"{name}: {p}" for name, result in cases.items() for p in compare(result, truth[0], single[0])]
    assert not problems, "\n".join(problems)
    _check_ranks_agree(world2, "e2e", cases)
    assert cases["1x2 register"]["implementation"] == "usp"
    assert cases["1x2 replace"]["implementation"] == "sdpa"


@pytest.mark.timeout(WORLD_TIMEOUT + 60)
def test_activation_checkpointing_matches_single_process(world2, references):
    """Non-reentrant activation checkpointing (how long contexts are trained): the recompute repeats the
    collectives, and usp's autograd functions must read their saved tensors once per backward."""
    _, _, truth, single, _ = references
    problems = []
    for rank, results in enumerate(world2):
        for name, result in results["checkpointing"].items():
            if "error" in result:
                problems.append(f"rank {rank} {name}: raised\n{result['error'][-1500:]}")
            else:
                problems += [f"rank {rank} {name}: {p}" for p in compare(result, truth[0], single[0])]
    assert not problems, "\n".join(problems)


def _check_packed(per_rank, references):
    _, _, truth, single, _ = references
    problems = []
    for rank, results in enumerate(per_rank):
        for name, result in results["packed"].items():
            if "error" in result:
                problems.append(f"rank {rank} {name}: raised\n{result['error'][-1500:]}")
            else:
                problems += [f"rank {rank} {name}: {p}" for p in compare(result, truth[2], single[2])]
    assert not problems, "\n".join(problems)


@pytest.mark.timeout(WORLD_TIMEOUT + 60)
def test_packed_documents_through_varlen_match_per_document_model(world2, world4, references):
    """cu_seq_lens_* passed to the model reach usp's varlen path: loss and gradients equal the single-process
    model run on each document separately (1x2, 2x1, 2x2)."""
    _check_packed(world2, references)
    _check_packed(world4, references)


@pytest.mark.timeout(WORLD_TIMEOUT + 60)
def test_replace_mode_leaves_other_models_alone(world2):
    for results in world2:
        assert results["bystander_unchanged"]
        assert results["bystander_implementation"] == "sdpa"
        assert results["disabled_implementation"] == "sdpa"


@pytest.mark.timeout(WORLD_TIMEOUT + 60)
def test_enable_leaves_models_sharing_the_config_alone(world2):
    """Models built from one config object: enabling one (either mode) changes nothing about the other."""
    for rank, results in enumerate(world2):
        shared = results["shared_config"]
        assert "error" not in shared, f"rank {rank}: {shared.get('error')}"
        for mode, record in shared.items():
            assert record["second_error"] is None, f"rank {rank} {mode}: {record['second_error']}"
            assert record["second_unchanged"] and record["second_config_kept"], (rank, mode, record)
            assert record["second_implementation"] == record["shared_config_implementation"] == "sdpa"
            assert record["first_config_own"], (rank, mode)
            assert record["first_implementation"] == ("usp" if mode == "register" else "sdpa")
            assert record["first_disabled_implementation"] == "sdpa"


@pytest.mark.timeout(WORLD_TIMEOUT + 60)
def test_length_dependent_rope_matches_single_process(world2, rope_references):
    """longrope (Phi-3) and dynamic NTK (Llama): loss and gradients on 1x2 and 2x1 match one process."""
    problems = []
    for rank, results in enumerate(world2):
        assert set(results["rope"]) == {f"{n} {m}" for n in ROPE_MODELS for m in ("1x2", "2x1")}
        for case, result in results["rope"].items():
            _, truth, single = rope_references[case.rsplit(" ", 1)[0]]
            if "error" in result:
                problems.append(f"rank {rank} {case}: raised\n{result['error'][-1500:]}")
            else:
                problems += [f"rank {rank} {case}: {p}" for p in compare(result, truth, single)]
    assert not problems, "\n".join(problems)


_ALL_FAMILY_CASES = {**FAMILY_CASES, **PACKED_ONLY_CASES}


def _check_families(per_rank, family_refs):
    """Every family case on every rank, dense and packed (windows inside documents included): loss and gradients
    within the bound of one process, ranks bitwise equal."""
    problems = []
    for rank, results in enumerate(per_rank):
        for name, result in results["families"].items():
            case = next(c for c in sorted(_ALL_FAMILY_CASES, key=len, reverse=True) if name.startswith(c + " "))
            family, _ = _ALL_FAMILY_CASES[case]
            truth, single = family_refs[case]["packed" if name.endswith(" packed") else "dense"]
            if "error" in result:
                problems.append(f"rank {rank} {name}: raised\n{result['error'][-1500:]}")
                continue
            floor = FP64_BOUND if FAMILY_DTYPE.get(family) == torch.float64 else FP32_ULP
            problems += [f"rank {rank} {name}: {p}" for p in compare(result, truth, single, floor)]
            first = per_rank[0]["families"][name]
            if rank and ("error" in first or not torch.equal(first["loss"], result["loss"]) or any(
                    not torch.equal(first["grads"][n], g) for n, g in result["grads"].items())):
                problems.append(f"{name}: rank {rank} differs from rank 0")
    assert not problems, "\n".join(problems)


@pytest.mark.timeout(WORLD_TIMEOUT + 60)
def test_model_families_match_single_process(world2, world4, family_refs):
    """Mistral, Qwen2 (use_sliding_window), Gemma 2 (softcap + sliding/full), Gemma 3 (local/global), gpt-oss
    (sinks + sliding/full) and DeepSeek V3 (MLA: v head_dim 16, q/k 24): loss and every gradient equal one process
    on 1x2, 2x1 (register and replace) and 2x2 (register; ring_inner replace), dense; packed rows on 1x2, 2x1,
    2x2, windows inside documents included."""
    for per_rank in (world2, world4):
        names = set(per_rank[0]["families"])
        dense = {n for n in names if not n.endswith(" packed")}
        assert len(dense) == len(FAMILY_CASES) * (4 if per_rank is world2 else 2), sorted(dense)
        assert len(names - dense) == len({**FAMILY_CASES, **PACKED_ONLY_CASES}) * (2 if per_rank is world2 else 1)
    _check_families(world2, family_refs)
    _check_families(world4, family_refs)
    for per_rank in (world2, world4):
        cases = per_rank[0]["families"]
        assert cases["mistral 2x1 replace" if per_rank is world2 else "mistral 2x2 ring_inner replace"][
            "implementation"] == "sdpa"
        if per_rank is world2:
            assert cases["gemma2 2x1 replace"]["implementation"] == "flash_attention_2"
            assert cases["gpt_oss 1x2 register"]["implementation"] == "usp"


def test_family_masks_change_the_loss():
    """The family tests would catch plain causal attention: turning each model's window, softcap or sinks off
    changes its single-process loss by far more than the bound."""
    from integration_cases import reference as run_reference

    ids, labels = make_batch(0)

    def loss(family, **overrides):
        return run_reference(make_family_model(family, torch.float32, **overrides), ids, labels)["loss"]

    def sinks_off(family):
        model = make_family_model(family, torch.float32)
        with torch.no_grad():
            for module in model.modules():
                if hasattr(module, "sinks"):
                    module.sinks.fill_(-float("inf"))
        return run_reference(model, ids, labels)["loss"]

    variants = {
        "mistral window": (loss("mistral"), loss("mistral", sliding_window=None)),
        "qwen2 window": (loss("qwen2"), loss("qwen2", use_sliding_window=False)),
        "gemma2 window": (loss("gemma2"), loss("gemma2", sliding_window=SEQLEN)),
        "gemma2 softcap": (loss("gemma2"), loss("gemma2", attn_logit_softcapping=None)),
        "gemma3 window": (loss("gemma3"), loss("gemma3", sliding_window=SEQLEN)),
        "gpt_oss window": (loss("gpt_oss"), loss("gpt_oss", sliding_window=SEQLEN)),
        "gpt_oss sinks": (loss("gpt_oss"), sinks_off("gpt_oss")),
    }
    for name, (on, off) in variants.items():
        assert abs(float(on) - float(off)) > 1e-4 * abs(float(on)), (name, float(on), float(off))


def test_rope_models_are_length_dependent_at_these_sizes():
    """The rope test would catch a rank choosing its own frequencies: the cos/sin of a shard's positions differ
    between the shard's own largest position (1x2 rank 1: 32, 2x1 rank 0: 21) and the global one (43)."""
    def cos(family, overrides, positions):  # a fresh model each time: dynamic RoPE keeps state
        rotary = make_model(torch.float32, family=family, **overrides).model.rotary_emb
        return rotary(torch.zeros(1), position_ids=positions[None])[0]

    for name, (family, overrides) in ROPE_MODELS.items():
        for shard_end in (33, 22):
            local = cos(family, overrides, torch.arange(shard_end))
            whole = cos(family, overrides, torch.arange(SEQLEN))[:, :shard_end]
            assert not torch.allclose(local, whole), (name, shard_end)


@pytest.mark.timeout(WORLD_TIMEOUT + 60)
def test_transformers_loss_with_shift_labels_equals_causal_lm_loss(world2):
    for results in world2:
        theirs, ours = results["hf_loss"]
        torch.testing.assert_close(theirs, ours, rtol=1e-6, atol=0)


@pytest.mark.timeout(WORLD_TIMEOUT + 60)
def test_refused_inputs_raise_clear_errors_on_every_rank(world2, references):
    _, _, truth, _, _ = references
    expected = {
        "padding mask (register)": ("ValueError", r"attention_mask with zeros.*varlen path"),
        "padding mask (replace)": ("ValueError", r"attention_mask with zeros.*varlen path"),
        "missing position_ids": ("ValueError", r"needs position_ids"),
        "local position_ids": ("ValueError", r"not the global positions"),
        "dropout in training": ("ValueError", r"no dropout.*attention_dropout"),
        "sliding window of 0": ("ValueError", r"LlamaAttention passed sliding_window=0; usp takes None or an int"),
        "negative softcap": ("ValueError", r"softcap must be a finite float >= 0"),
        "sinks of the wrong shape": ("ValueError", r"sinks must have shape \[heads\] = \[4\]"),
        "4D mask": ("ValueError", r"takes no custom mask"),
        "kv cache": ("ValueError", r"use_cache=False"),
        "module not enabled": ("RuntimeError", r"enable\(model, mesh\)"),
        "enable twice": ("ValueError", r"already enabled"),
        "bad mode": ("ValueError", r"mode='monkeypatch'.*'register', 'replace'"),
        "not a model": ("TypeError", r"PreTrainedModel"),
        "heads not divisible by ulysses": ("ValueError", r"num_attention_heads=3.*ulysses=2.*\[1, 3\]"),
        "replace from eager": ("ValueError", r"'eager'.*mode='register'"),
        "chunked attention (Llama 4)": ("ValueError", r"attention_chunk_size=16.*not supported"),
        "shard_batch bad length": ("ValueError", r"input_ids.*multiple of 4.*pad it to 44"),
        "shard_batch unknown key": ("ValueError", r"pixel_values"),
        "shard_batch padding": ("ValueError", r"zeros.*varlen"),
    }
    for rank, results in enumerate(world2):
        errors = results["errors"]
        for name, (exception, pattern) in expected.items():
            if name not in errors:
                continue  # a check this rank did not run
            assert matches(errors[name], exception, pattern), f"rank {rank} {name}: got {errors[name]}"
        assert errors["all-ones mask is fine"] is None
        assert errors["sliding window covering the sequence"] is None
        torch.testing.assert_close(results["after_errors"], truth[0]["loss"].float(), rtol=1e-5, atol=0)


# ---------------------------------------------------------------------------------------------- tests: 4 ranks
@pytest.mark.timeout(WORLD_TIMEOUT + 60)
def test_four_ranks_and_device_meshes_match_single_process(world4, references):
    _, _, truth, single, _ = references
    cases = world4[0]["e2e"]
    problems = [f"{name}: {p}" for name, result in cases.items() for p in compare(result, truth[0], single[0])]
    assert not problems, "\n".join(problems)
    _check_ranks_agree(world4, "e2e", cases)
    # ranks 0..3 of the flattened cp dim: Ulysses pairs (0, 1) and (2, 3) adjacent
    assert [r["split_2x2"] for r in world4] == [
        (2, 2, 0, 0, "ulysses_inner"), (2, 2, 1, 0, "ulysses_inner"),
        (2, 2, 0, 1, "ulysses_inner"), (2, 2, 1, 1, "ulysses_inner")]


@pytest.mark.timeout(WORLD_TIMEOUT + 60)
def test_data_parallel_over_sequence_parallel(world4, references):
    """Each dp replica trains on its own batch: its loss is that batch's loss; gradients are the replica mean."""
    _, _, truth, single, _ = references
    mean_truth, mean_single = _average(truth), _average(single)
    for rank, results in enumerate(world4):
        replica = results["replica"]
        assert replica == rank // 2
        for name, result in results["dp"].items():
            grads_only = {"loss": mean_truth["loss"], "grads": result["grads"]}
            problems = compare(grads_only, mean_truth, mean_single)
            loss_problems = compare({"loss": result["loss"], "grads": {}},
                                    {"loss": truth[replica]["loss"], "grads": {}},
                                    {"loss": single[replica]["loss"], "grads": {}})
            assert not problems + loss_problems, f"rank {rank} {name}: " + "\n".join(problems + loss_problems)


@pytest.mark.timeout(WORLD_TIMEOUT + 60)
def test_split_context_parallel_errors(world4):
    expected = {
        "split: sizes do not multiply": ("ValueError", r"2 \* 2 must equal the size 2.*\(1, 2\), \(2, 1\)"),
        "split: slice, not root mesh": ("ValueError", r"root DeviceMesh"),
        "split: unknown dim": ("ValueError", r"'sp' is not a dimension.*\('dp', 'cp'\)"),
    }
    for rank, results in enumerate(world4):
        for name, (exception, pattern) in expected.items():
            record = results["errors"][name]
            assert matches(record, exception, pattern), f"rank {rank} {name}: {record}"


# ---------------------------------------------------------------------------------------------- tests: no spawn
def test_mask_function_refuses_padding_and_returns_none_otherwise():
    from usp.integrations.transformers import mask_function

    padded = torch.tensor([[True, True, True], [True, True, False]])
    with pytest.raises(ValueError, match=r"attention_mask with zeros .*varlen path"):
        mask_function(batch_size=2, q_length=3, kv_length=3, attention_mask=padded)
    assert mask_function(batch_size=2, q_length=3, kv_length=3, attention_mask=None) is None
    all_ones = torch.ones(2, 3, dtype=torch.bool)
    assert mask_function(batch_size=2, q_length=3, kv_length=3, attention_mask=all_ones) is None
    with pytest.raises(ValueError, match=r"no custom attention mask"):
        mask_function(attention_mask=torch.zeros(2, 1, 3, 3))


def test_import_registers_nothing():
    from transformers import AttentionInterface

    import usp.integrations.transformers  # noqa: F401

    entries = AttentionInterface()  # a fresh instance reads the library-wide registry
    assert "usp" not in entries
    assert not any(type(entries[name]).__name__ == "_ReplacedAttention" for name in entries)


def test_shift_labels_is_global_next_token():
    from usp.integrations.data import shift_labels

    labels = torch.tensor([[5, 6, 7, -100, 9]])
    assert shift_labels(labels).tolist() == [[6, 7, -100, 9, -100]]


def test_gradient_buckets_group_by_kind_and_respect_the_size():
    from usp.integrations.data import _buckets

    f32 = [torch.zeros(n) for n in (100, 300, 50, 2000)]
    f64 = torch.zeros(10, dtype=torch.float64)
    buckets = _buckets([f32[0], f64, f32[1], f32[2], f32[3]], bucket_bytes=1600)
    assert [[t.numel() for t in b] for b in buckets] == [[100, 300], [50], [2000], [10]]
