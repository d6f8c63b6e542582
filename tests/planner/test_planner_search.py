"""Search: sensible picks on the presets, constraints always honoured, errors, serialisation."""
import json
import random

import pytest

from usp import planner
import usp.mesh as mesh_module
from usp.planner import Plan, PlannerError, plan, predict, sweep
from usp.planner.cost import CostModel
from usp.planner.search import required_seqlen_multiple


def ulysses_hosts(p: Plan, topology):
    model = CostModel(planner.load_topology(topology), p.world_size, p.sequence_parallel_size)
    groups = model.ulysses_groups(p.ulysses, p.ring, p.placement)
    return {len({model.fabric.host_of(r) for r in g}) for g in groups}


def test_default_dry_run_64_gpus_1m_tokens():
    p = plan(world_size=64, seqlen="1M", heads=32, kv_heads=8)
    assert (p.ulysses, p.ring, p.placement) == (8, 8, "ulysses_inner")
    assert p.topology == planner.DEFAULT_PRESET and p.kernel == "fa4"
    assert p.forward.total > 0 and p.backward.total > p.forward.total
    assert len(p.candidates) == 12 and [c.label for c in p.rejected] == ["U64xR1"]
    assert "not divisible" in p.rejected[0].reason


@pytest.mark.parametrize("world, seqlen, heads, kv, causal", [
    (16, "128k", 32, 8, True), (16, "1M", 32, 8, False), (32, "256k", 64, 8, True), (64, "1M", 32, 8, True),
    (64, "4M", 64, 8, True), (128, "2M", 128, 8, False), (128, "1M", 32, 4, True)])
def test_ulysses_stays_inside_a_node_on_infiniband_clusters(world, seqlen, heads, kv, causal):
    """Long-context GQA shapes (>= 4K tokens per GPU). Known exception, by the model's own numbers: MHA with few
    tokens per GPU, where the ring's K/V + fp32 dK/dV over InfiniBand costs more than a cross-node all-to-all."""
    p = plan(world, seqlen, heads, kv, causal=causal, topology="dgx-h100-cluster")
    assert p.ulysses > 1, "on NVSwitch nodes some Ulysses should pay off"
    assert ulysses_hosts(p, "dgx-h100-cluster") == {1}
    assert p.ring >= world // 8


def test_ulysses_inside_a_node_with_fewer_gpus_per_node():
    p = plan(16, "1M", 32, 8, gpus_per_node=4)
    assert p.ulysses <= 4 and p.topology_source == "dgx-h100-cluster:gpus_per_host=4"
    model = CostModel(planner.load_topology("dgx-h100-cluster").with_gpus_per_host(4), 16)
    groups = model.ulysses_groups(p.ulysses, p.ring, p.placement)
    assert all(len({model.fabric.host_of(r) for r in g}) == 1 for g in groups)


def test_a100_nvlink_prefers_ulysses_when_heads_allow():
    # benchmarks/RESULTS.md reference measurements (yunchang README): on 8x A100 NVLink, Ulysses 4-8 won when heads allowed
    for seqlen in ("32k", "128k"):
        assert plan(8, seqlen, 32, 32, topology="dgx-a100").ulysses in (4, 8)


def test_pcie_l20_box_published_conditions():
    """yunchang README: best split on 8x L20 PCIe was Ulysses 2 x ring 4 (scripts/run_qkvpack_compare.sh: GQA 32/8,
    32K, batch 1, causal zigzag, --fwd_only). What the model reproduces robustly is the PCIe part of that story:
    pure Ulysses and Ulysses across CPU sockets (ring_inner) lose badly to all-to-all contention, and the winners
    are mixed splits with the Ulysses group inside one PCIe switch, U2 x R4 within a few percent of the best.
    (With the head-group pipelined all-to-all the model picks U4 x R2; since issue 16's per-ring-step overhead,
    U2 x R4 is second, 4.2% behind, and pure ring third: see test_pcie_l20_box_picks_u2_r4.)"""
    p = plan(8, "32k", 32, 8, topology="l20-pcie", forward_only=True)
    best = p.objective
    by = {(c.ulysses, c.ring, c.placement): c.forward.total for c in p.candidates}
    assert by[(8, 1, "ulysses_inner")] > 1.3 * best
    assert by[(2, 4, "ring_inner")] > 1.2 * best and by[(4, 2, "ring_inner")] > 1.2 * best
    assert p.placement == "ulysses_inner" and 1 < p.ulysses < 8, "a mixed split, Ulysses inside a PCIe switch"
    assert by[(2, 4, "ulysses_inner")] < 1.05 * best
    assert by[(2, 4, "ulysses_inner")] < by[(1, 8, "ulysses_inner")]


@pytest.mark.xfail(strict=True, reason="not reproduced, by evidence rather than a known gap (benchmarks/RESULTS.md, "
                   "'The L20 PCIe crossover'): the model ranks U4xR2, U2xR4 (+4.2%), R8 (+7.4%); yunchang's "
                   "measurement ran a different implementation (its all-to-all is not overlapped with compute: "
                   "modelled that way the order is R8, U2xR4 +1.8%, U4xR2 +2.7%) and the preset's L20 numbers are "
                   "assumed, not probed. The three are within the model's error (up to 9% on measured runs).")
def test_pcie_l20_box_picks_u2_r4():
    p = plan(8, "32k", 32, 8, topology="l20-pcie", forward_only=True)
    assert (p.ulysses, p.ring) == (2, 4)


def test_never_an_infeasible_plan():
    rng = random.Random(1234)
    topologies = ["dgx-h100", "dgx-h100-cluster", "l20-pcie", "dgx-a100", "h100-nvlink-2x"]
    checked = 0
    while checked < 60:
        topo = rng.choice(topologies)
        world = {"dgx-h100": 8, "dgx-a100": 8, "l20-pcie": 8, "h100-nvlink-2x": 2}.get(topo) or rng.choice([16, 24, 64])
        world = rng.choice([d for d in range(1, world + 1) if world % d == 0])
        heads = rng.choice([1, 4, 8, 12, 32, 40, 64])
        kv = rng.choice([d for d in range(1, heads + 1) if heads % d == 0])
        seqlen = rng.choice([1000, 4096, 12288, 32768, 100000, 131072, 1 << 20])
        causal = rng.random() < 0.6
        limit = rng.choice([None, "2GiB", "64MiB"])
        try:
            p = plan(world, seqlen, heads, kv, head_dim=rng.choice([64, 128]), causal=causal, topology=topo,
                     memory_limit=limit)
        except PlannerError as exc:  # nothing fits: the error says why, in one line
            assert "\n" not in str(exc)
            continue
        checked += 1
        assert heads % p.ulysses == 0 and p.ulysses * p.ring == world
        assert seqlen % required_seqlen_multiple(p.ulysses, p.ring, causal) == 0
        cap = planner.load_topology(topo).gpu_memory if limit is None else planner.units.parse_bytes(limit)
        assert p.memory_bytes <= cap
        assert all(c.reason for c in p.rejected) and all(c.feasible for c in p.candidates[:1])
        feasible = [c.total for c in p.candidates if c.feasible]
        assert feasible[1:] == sorted(feasible[1:]) and p.total == feasible[0]
        assert p.total <= min(feasible) * (1 + planner.search.TIE_TOLERANCE)


@pytest.mark.parametrize("kwargs, message", [
    (dict(world_size=8, seqlen="32k", heads=32, memory_limit="1MiB"), r"memory_limit of 1 MiB is too small: the "
                                                                      r"smallest candidate \(U\d+xR\d+ \w+\) needs"),
    (dict(world_size=8, seqlen=1001, heads=32), "no Ulysses x ring split of 8 GPUs works for this shape: U1xR8: "
                                                "seqlen=1001 is not a multiple of 16"),
    (dict(world_size=12, seqlen="32k", heads=32, sequence_parallel_size=8), "world_size=12 is not divisible by "
                                                                             "sequence_parallel_size=8"),
    (dict(world_size=8, seqlen="32k", heads=0), "heads must be a positive integer, got 0"),
    (dict(world_size=8, seqlen="32k", heads=32, kv_heads=6), "heads=32 is not divisible by kv_heads=6"),
    (dict(world_size=0, seqlen="32k", heads=32), "world_size must be a positive integer"),
    (dict(world_size=8, seqlen="32q", heads=32), "seqlen='32q' is not a sequence length"),
    (dict(world_size=8, seqlen="32k", heads=32, topology="nope"), "unknown topology preset 'nope'"),
    (dict(world_size=16, seqlen="32k", heads=32, topology="dgx-h100"), "world_size=16 does not fit topology"),
    (dict(world_size=8, seqlen="32k", heads=32, dtype="int4"), "dtype='int4' is not a supported dtype"),
])
def test_bad_input_raises_value_error_with_one_line(kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        plan(**kwargs)
    assert "\n" not in str(info.value)


def test_plan_serialises_and_round_trips(tmp_path):
    p = plan(16, "256k", 32, 8, causal=False, memory_limit="40GiB")
    for text, load in ((p.to_json(), Plan.from_json), (p.to_yaml(), Plan.from_yaml)):
        again = load(text)
        assert again == p and again.to_dict() == p.to_dict()
    data = json.loads(p.to_json())
    assert data["ulysses"] == p.ulysses and data["placement"] == p.placement
    assert {"compute_s", "merge_s", "all_to_all_s", "ring_exposed_s", "total_s"} <= set(data["forward"])
    assert data["candidates"][0]["feasible"] and data["memory"]["peak_bytes"] == p.memory_bytes
    with pytest.raises(PlannerError, match="missing key 'ring'"):
        Plan.from_dict({k: v for k, v in data.items() if k != "ring"})


def test_plan_builds_the_core_mesh_arguments():
    p = plan(8, "128k", 32, 8, topology="dgx-h100")
    assert mesh_module.Placement.parse(p.placement).value == p.placement
    snippet = p.snippet()
    assert "usp.SequenceParallelMesh.from_plan(plan)" in snippet
    assert "usp.LongContextAttention(mesh, causal=True)" in snippet and "topology='dgx-h100'" in snippet
    compile(snippet, "<snippet>", "exec")
    explicit = plan(8, "128k", 32, 8, topology=planner.load_topology("dgx-h100")).snippet()
    assert f"usp.SequenceParallelMesh(ulysses={p.ulysses}, ring={p.ring}" in explicit


def test_predict_matches_the_search():
    p = plan(8, "128k", 32, 8, topology="dgx-h100")
    for c in p.candidates:
        if c.forward is None:
            continue
        q = predict(c.ulysses, c.ring, "128k", 32, 8, placement=c.placement, topology="dgx-h100")
        assert q.total == pytest.approx(c.total) and q.feasible == c.feasible
    assert predict(2, 4, "128k", 32, 8, placement="head_first", topology="dgx-h100").placement == "ulysses_inner"
    bad = predict(64, 1, "128k", 32, topology="dgx-h100-cluster")
    assert not bad.feasible and bad.forward is None and "not divisible" in bad.reason
    with pytest.raises(ValueError, match="placement='sideways'"):
        predict(2, 4, "128k", 32, placement="sideways")


def test_ties_go_to_the_host_local_all_to_all():
    # U16xR4 is <1% faster but its all-to-all crosses two hosts. (Until issue 16 the case was 128 GPUs, 256K,
    # 64/8 non-causal; with the cost of each ring step, U32xR4 now wins it by more than 1%.)
    p = plan(64, "1M", 32, 32, causal=False)
    assert ulysses_hosts(p, "dgx-h100-cluster") == {1}
    assert p.candidates[1].total < p.total <= p.candidates[1].total * 1.01
    assert any("within 1% of the fastest" in note for note in p.notes)


def test_forward_only_objective():
    p = plan(8, "32k", 32, 8, topology="l20-pcie", forward_only=True)
    assert p.forward_only and p.objective == p.forward.total
    fwd = [c.forward.total for c in p.candidates if c.feasible]
    assert fwd[1:] == sorted(fwd[1:]) and fwd[0] <= min(fwd) * 1.01


def test_sweep_reports_each_length_and_errors_in_place():
    results = sweep([8192, "128k", "1M", 1001], world_size=8, heads=32, kv_heads=8, topology="dgx-h100")
    assert [n for n, _ in results] == [8192, 131072, 1048576, 1001]
    assert all(isinstance(r, Plan) for _, r in results[:3])
    assert isinstance(results[3][1], PlannerError)
    with pytest.raises(PlannerError, match="heads must be"):
        sweep(["8k"], world_size=8, heads=0)
