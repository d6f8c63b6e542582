"""Topology: presets, YAML round trip, validation errors naming the key, fits, kernel rates, link contention."""
import math

import networkx as nx
import pytest

from usp.planner.topology import (DEFAULT_PRESET, GB, Topology, TopologyError, fit_latency_bandwidth, list_presets,
                              load_topology)

MiB = 1024**2
PRESETS = ["dgx-a100", "dgx-h100", "dgx-h100-cluster", "h100-nvlink-2x", "l20-pcie"]


def minimal(**overrides):
    doc = {"name": "tiny", "hosts": 1, "gpus_per_host": 2, "gpu": {"model": "X", "memory_gib": 16},
           "host_fabric": {"kind": "nvlink", "bandwidth_GBps": 100},
           "kernels": [{"name": "k", "points": [{"block": 1024, "forward": 100, "backward": 80}]}]}
    doc.update(overrides)
    return doc


def test_presets_shipped_and_cited():
    assert list_presets() == PRESETS
    assert DEFAULT_PRESET in PRESETS
    for name in PRESETS:
        topo = Topology.preset(name)
        assert topo.sources, f"preset {name} cites no source"
        assert topo.kernels and topo.memory_bandwidth
        assert name in topo.describe()


@pytest.mark.parametrize("name", PRESETS)
def test_yaml_round_trip_presets(name, tmp_path):
    topo = Topology.preset(name)
    path = tmp_path / "t.yaml"
    topo.save(path)
    again = Topology.load(path)
    assert again.to_dict() == topo.to_dict()
    assert Topology.from_yaml(again.to_yaml()).to_dict() == topo.to_dict()


def test_yaml_round_trip_graph_form(tmp_path):
    doc = minimal()
    for key in ("hosts", "gpus_per_host", "host_fabric"):
        doc.pop(key)
    doc["graph"] = {"nodes": [{"id": "a", "kind": "gpu"}, {"id": "b", "kind": "gpu"}, {"id": "sw", "kind": "switch"}],
                    "links": [{"src": "a", "dst": "sw", "bandwidth_GBps": 10},
                              {"src": "sw", "dst": "b", "bandwidth_GBps": 20, "bidirectional": False},
                              {"src": "b", "dst": "sw", "bandwidth_GBps": 5, "bidirectional": False}]}
    topo = Topology.from_dict(doc)
    path = tmp_path / "g.yaml"
    topo.save(path)
    assert Topology.load(path).to_dict() == topo.to_dict()
    fabric = topo.fabric(2)
    assert isinstance(fabric.graph, nx.DiGraph)
    # per-direction bandwidth: a->b crosses a->sw (10) and sw->b (20); b->a crosses b->sw (5) and sw->a (10)
    assert fabric.pattern("ab", [(0, 1)])[0] == pytest.approx(1 / (10 * GB))
    assert fabric.pattern("ba", [(1, 0)])[0] == pytest.approx(1 / (5 * GB))


@pytest.mark.parametrize("mutate, key", [
    (lambda d: d.pop("gpu"), "gpu"),
    (lambda d: d["gpu"].pop("memory_gib"), "gpu.memory_gib"),
    (lambda d: d["host_fabric"].update(bandwidth_GBps="fast"), "host_fabric.bandwidth_GBps"),
    (lambda d: d["host_fabric"].update(kind="carrier-pigeon"), "host_fabric.kind"),
    (lambda d: d["host_fabric"].update(bandwith_GBps=3), "host_fabric.bandwith_GBps"),
    (lambda d: d["kernels"][0]["points"][0].pop("forward"), "kernels[0].points[0].forward"),
    (lambda d: d.update(hosts=4), "network"),
    (lambda d: d.update(hosts=0), "hosts"),
    (lambda d: d.update(measured={"p2p": [{"scope": "intra_host", "samples": [[1, "x"]]}]}),
     "measured.p2p[0].samples[0]"),
])
def test_errors_name_the_key(mutate, key):
    doc = minimal()
    mutate(doc)
    with pytest.raises(TopologyError) as info:
        Topology.from_dict(doc, source="topology file 't.yaml'")
    message = str(info.value)
    assert f"key '{key}'" in message and "t.yaml" in message and "\n" not in message


def test_malformed_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nhosts: [1, 2\n")
    with pytest.raises(TopologyError, match=r"malformed YAML at line \d+"):
        Topology.load(bad)
    with pytest.raises(TopologyError, match="cannot be read"):
        Topology.load(tmp_path / "missing.yaml")


def test_unknown_preset_lists_valid_ones():
    with pytest.raises(TopologyError, match="unknown topology preset 'dgx-z9'.*dgx-h100"):
        load_topology("dgx-z9")


def test_fit_reproduces_facts_p2p_numbers():
    # benchmarks/RESULTS.md reference measurements, 2x H100 NVLink, batched isend+irecv ring step
    samples = [(1 * MiB, 0.168e-3), (16 * MiB, 0.168e-3), (64 * MiB, 0.261e-3), (256 * MiB, 0.904e-3)]
    fit = fit_latency_bandwidth(samples)
    assert fit.floor == pytest.approx(0.168e-3)
    assert fit.latency == pytest.approx(46.7e-6, rel=0.01)
    assert fit.bandwidth == pytest.approx(313e9, rel=0.01)
    for n, t in samples:
        assert fit.time(n) == pytest.approx(t, abs=2e-6)


def test_fit_survives_cpu_noise():
    fit = fit_latency_bandwidth([(1, 1e-3), (2, 0.9e-3), (3, 0.95e-3)])
    assert fit.bandwidth > 0 and math.isfinite(fit.latency) and fit.latency >= 0


def test_measurement_preset_is_consistent_with_its_samples():
    topo = Topology.preset("h100-nvlink-2x")
    fit = topo.measured_p2p[0].fit
    assert topo.host_fabric["bandwidth_GBps"] * GB == pytest.approx(fit.bandwidth, rel=1e-3)
    assert topo.collectives.p2p_latency == pytest.approx(fit.latency, rel=1e-3)
    assert topo.collectives.p2p_floor == pytest.approx(fit.floor, rel=1e-3)
    a2a = topo.measured_a2a(2, 1)
    assert a2a.time(256 * MiB) == pytest.approx(0.512e-3, rel=0.01)


def test_kernel_rates_interpolate_keep_measured_dips_and_do_not_extrapolate_them():
    kernel, notes = Topology.preset("h100-nvlink-2x").kernel("cudnn")
    assert notes == []
    # benchmarks/RESULTS.md (reference measurements): cuDNN fwd 4K non-causal 647, causal 513; 16K causal 624
    assert kernel.rate(False, False, 4096) == pytest.approx(647e12)
    assert kernel.rate(False, True, 4096) == pytest.approx(513e12)
    mid = kernel.rate(False, True, 8192)
    assert 513e12 < mid < 624e12 and mid == pytest.approx((513 + 624) / 2 * 1e12)
    # fwd+bwd 16K non-causal 582 = 3.5 / (1/647 + 2.5/r_b)
    r_b = kernel.rate(True, False, 16384) / 1e12
    assert 3.5 / (1 / 647 + 2.5 / r_b) == pytest.approx(582, rel=1e-3)
    # the dip measured at 32K (615 < 647) is kept there, but not extrapolated to every larger block
    assert kernel.rate(False, False, 32768) == pytest.approx(615e12)
    assert kernel.rate(False, False, 65536) == pytest.approx(647e12)
    assert kernel.rate(False, False, 1024) == pytest.approx(647e12)  # clamped below the first point


def test_kernel_rate_interpolates_between_probed_head_counts():
    """Work per call: profiles probed at 8 and 32 heads; a 16-head call sits halfway in log2(heads)."""
    def profile(heads, rate):
        return {"name": "k", "dtype": "bfloat16", "head_dim": 128, "heads": heads,
                "points": [{"block": 4096, "forward": rate, "backward": rate / 2},
                           {"block": 65536, "forward": 600, "backward": 500}]}
    doc = Topology.preset("h100-nvlink-2x").to_dict()
    doc["kernels"] = [profile(8, 300), profile(32, 500)]
    topo = Topology.from_dict(doc)
    kernel, _ = topo.kernel("k")
    assert kernel.rate(False, False, 4096, heads=8) == pytest.approx(300e12)
    assert kernel.rate(False, False, 4096, heads=32) == pytest.approx(500e12)
    assert kernel.rate(False, False, 4096, heads=16) == pytest.approx(400e12)
    assert kernel.rate(False, False, 4096, heads=64) == pytest.approx(500e12)  # clamped
    assert kernel.rate(True, False, 65536, heads=16) == pytest.approx(500e12)
    assert kernel.rate(False, False, 4096) in (300e12, 500e12)  # no head count: the chosen profile's own
    assert Topology.from_dict(topo.to_dict()).to_dict() == topo.to_dict()  # heads survive the round trip


def test_auto_kernel_is_the_fastest_and_dtype_fallback_is_noted():
    topo = Topology.preset("dgx-h100")
    assert topo.kernel("auto")[0].name == "fa4"
    _, notes = topo.kernel("auto", dtype="float16")
    assert notes and "bfloat16" in notes[0]
    with pytest.raises(ValueError, match="kernel='fa9'"):
        topo.kernel("fa9")


def test_nvswitch_all_to_all_bottleneck_is_the_gpu_link():
    fabric = Topology.preset("dgx-h100").fabric(8)
    flows = [(a, b) for a in range(8) for b in range(8) if a != b]
    spb, _ = fabric.pattern("a2a8", flows)
    assert spb == pytest.approx(7 / (370 * GB))  # each GPU's link carries its 7 outgoing flows


def test_pcie_contention_is_modelled():
    fabric = Topology.preset("l20-pcie").fabric(8)
    # two GPUs under one switch: only their own links
    assert fabric.pattern("pair", [(0, 1), (1, 0)])[0] == pytest.approx(1 / (25 * GB))
    # GPU 3 -> 4 crosses the CPU-to-CPU link
    assert "inter_socket" in fabric.link_types(3, 4)
    # four flows crossing sockets at once share the 16 GB/s link
    spb, _ = fabric.pattern("cross4", [(r, r + 4) for r in range(4)])
    assert spb == pytest.approx(4 / (16 * GB))


def test_cluster_routes_across_hosts_through_nics():
    topo = Topology.preset("dgx-h100-cluster")
    fabric = topo.fabric(16)
    assert fabric.host_of(7) == 0 and fabric.host_of(8) == 1
    assert fabric.link_types(0, 8) == ["pcie", "infiniband", "infiniband", "pcie"]
    assert "infiniband" not in fabric.link_types(0, 7)
    # all 8 GPUs of a host send across at once: each uses its own NIC (rail), 48 GB/s each
    spb, latency = fabric.pattern("rails", [(r, r + 8) for r in range(8)])
    assert spb == pytest.approx(1 / (48 * GB))
    assert latency == pytest.approx(10e-6)
    with pytest.raises(ValueError, match="world_size=9 does not fit topology 'dgx-h100'"):
        Topology.preset("dgx-h100").fabric(9)


def test_preset_parameters_and_gpus_per_host_override():
    topo = Topology.preset("dgx-h100-cluster:hosts=2")
    assert topo.max_gpus() == 16
    four = topo.with_gpus_per_host(4)
    assert four.max_gpus() == 8 and four.fabric(8).host_of(4) == 1
    with pytest.raises(TopologyError, match="gpus_per_node=3 does not fit topology 'l20-pcie'"):
        Topology.preset("l20-pcie").with_gpus_per_host(3)
    with pytest.raises(TopologyError, match="bad parameter"):
        Topology.preset("dgx-h100:nodes=4")


def _graph_pattern(topo, world, kind, ulysses, ring, placement):
    """The pattern over every GPU pair, routed through the networkx graph (the reference)."""
    from usp.spec import sequence_parallel_rank_grid as rank_grid

    grid = rank_grid(world, ulysses, ring, placement)
    if kind == "a2a":
        flows = [(a, b) for block in grid for g in block for a in g for b in g if a != b]
    else:
        rings = [[block[r][u] for r in range(ring)] for block in grid for u in range(ulysses)]
        flows = [(g[i], g[(i + 1) % len(g)]) for g in rings for i in range(len(g))]
    return topo.fabric(world).pattern((kind, ulysses, ring, placement), flows)


@pytest.mark.parametrize("preset, gph, world, sp", [
    ("dgx-h100-cluster", 8, 64, 64), ("dgx-h100-cluster", 8, 48, 24), ("dgx-h100-cluster", 4, 24, 12),
    ("dgx-h100-cluster", 8, 12, 12), ("dgx-h100-cluster", 16, 96, 32), ("dgx-h100-cluster", 2, 36, 6),
    ("dgx-h100-cluster", 8, 160, 160), ("dgx-h100-cluster", 8, 128, 4), ("l20-pcie", 8, 8, 8),
    ("l20-pcie", 8, 8, 4), ("l20-pcie", 4, 4, 4), ("dgx-a100", 8, 8, 8), ("h100-nvlink-2x", 2, 2, 2),
    ("dgx-h100-cluster", 2, 64, 64), ("dgx-h100-cluster", 2, 96, 48), ("dgx-h100-cluster", 4, 192, 96),
    ("dgx-h100-cluster", 3, 60, 30)])
def test_host_classes_match_the_graph(preset, gph, world, sp):
    """Note [host classes]: the per-host-class loads equal the graph's, for every split and both placements."""
    topo = Topology.preset(preset)
    if gph != topo.gpus_per_host:
        topo = topo.with_gpus_per_host(gph)
    classes = topo.host_classes(world)
    for u in [d for d in range(1, sp + 1) if sp % d == 0]:
        for placement in ("ulysses_inner", "ring_inner"):
            for kind in ("a2a", "p2p"):
                got = classes.layout_pattern(kind, u, sp // u, placement)
                want = _graph_pattern(topo, world, kind, u, sp // u, placement)
                assert got == want, (kind, u, sp // u, placement)


def test_host_classes_look_at_few_hosts():
    classes = Topology.preset("dgx-h100-cluster").host_classes(65536)
    for u, r, placement in ((8, 8192, "ulysses_inner"), (32, 2048, "ulysses_inner"), (4, 16384, "ring_inner")):
        assert len(classes.representative_hosts(u, r, placement)) < 40
    assert classes.ulysses_hosts(8, 8192, "ulysses_inner") == (1, False)
    assert classes.ulysses_hosts(16, 4096, "ulysses_inner") == (2, True)
    assert classes.ulysses_hosts(2, 32768, "ring_inner") == (2, True)
