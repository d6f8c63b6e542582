"""Probe: detection parsers, kernel timing with a fake kernel, and the real probe on 2 and 4 gloo processes."""
import sys
import time
from pathlib import Path

import pytest
import torch

from usp import planner
from usp.planner.probing import (classify_host_fabric, kernel_flops, measure_kernel, measure_varlen_kernel,
                                 parse_nvidia_smi_topo, read_infiniband)

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the spawned ranks import the helpers by this path
from _world import probe_worker, run_world  # noqa: E402

DGX_TOPO = """\
\tGPU0\tGPU1\tGPU2\tGPU3\tNIC0\tCPU Affinity\tNUMA Affinity\tGPU NUMA ID
GPU0\t X \tNV18\tNV18\tNV18\tPXB\t0-55\t0\t\tN/A
GPU1\tNV18\t X \tNV18\tNV18\tSYS\t0-55\t0\t\tN/A
GPU2\tNV18\tNV18\t X \tNV18\tSYS\t0-55\t0\t\tN/A
GPU3\tNV18\tNV18\tNV18\t X \tSYS\t0-55\t0\t\tN/A
NIC0\tPXB\tSYS\tSYS\tSYS\t X \t\t\t\t

Legend:

  X    = Self
  NV#  = Connection traversing a bonded set of # NVLinks
"""

PCIE_TOPO = """\
        GPU0    GPU1    GPU2    GPU3    CPU Affinity    NUMA Affinity
GPU0     X      PIX     NODE    SYS     0-31    0
GPU1    PIX      X      NODE    SYS     0-31    0
GPU2    NODE    NODE     X      SYS     0-31    0
GPU3    SYS     SYS     SYS      X      32-63   1
"""


def test_parse_nvidia_smi_topo_nvswitch_and_pcie():
    parsed = parse_nvidia_smi_topo(DGX_TOPO)
    assert parsed["gpus"] == ["GPU0", "GPU1", "GPU2", "GPU3"] and parsed["nics"] == ["NIC0"]
    assert parsed["links"][("GPU0", "GPU1")] == "NV18" and parsed["links"][("GPU0", "NIC0")] == "PXB"
    assert classify_host_fabric(parsed) == {"kind": "nvswitch", "nvlinks_per_pair": 18}
    assert classify_host_fabric({"gpus": ["GPU0", "GPU1"], "links": {("GPU0", "GPU1"): "NV18"}})["kind"] == "nvlink"
    pcie = classify_host_fabric(parse_nvidia_smi_topo(PCIE_TOPO))
    assert pcie == {"kind": "pcie", "gpus_per_switch": 2, "switches": 3, "sockets": 2}
    assert parse_nvidia_smi_topo("No devices were found") == {"gpus": [], "nics": [], "links": {}}


def test_read_infiniband(tmp_path):
    port = tmp_path / "mlx5_0" / "ports" / "1"
    port.mkdir(parents=True)
    (port / "state").write_text("4: ACTIVE\n")
    (port / "rate").write_text("400 Gb/sec (4X NDR)\n")
    (port / "link_layer").write_text("InfiniBand\n")
    assert read_infiniband(str(tmp_path)) == [{"device": "mlx5_0", "port": "1", "state": "4: ACTIVE",
                                               "rate_gbps": 400.0, "link_layer": "InfiniBand"}]
    assert read_infiniband(str(tmp_path / "absent")) == []


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class FakeKernel:
    """Takes exactly FLOPs / rate seconds on the fake clock: 100 TFLOP/s forward, 50 backward, causal at half rate."""

    name = "fake"

    def __init__(self, clock):
        self.clock = clock

    def forward(self, q, k, v, causal, scale):
        b, s, h, d = q.shape
        self.clock.now += kernel_flops(s, h, d, causal, b) / (50e12 if causal else 100e12)
        return q.clone(), q.new_zeros(b, h, s)

    def backward(self, dout, q, k, v, out, lse, causal, scale):
        b, s, h, d = q.shape
        self.clock.now += 2.5 * kernel_flops(s, h, d, causal, b) / (25e12 if causal else 50e12)
        return q, k, v


def test_measure_kernel_with_a_fake_kernel():
    clock = FakeClock()
    points = measure_kernel(FakeKernel(clock), [64, 128], heads=2, head_dim=16, dtype=torch.float32, device="cpu",
                            iters=2, warmup=1, clock=clock)
    assert [p["block"] for p in points] == [64, 128]
    for p in points:
        assert p["forward"] == pytest.approx(100) and p["backward"] == pytest.approx(50)
        assert p["causal_forward"] == pytest.approx(50) and p["causal_backward"] == pytest.approx(25)


class FakeVarlenKernel:
    """Varlen interface: FLOPs / rate seconds plus 1 us per sequence (forward), 3 us (backward)."""

    name = "fake"

    def __init__(self, clock):
        self.clock = clock

    def forward(self, q, k, v, seqs, causal, scale):
        n = len(seqs.q_lengths)
        flops = sum(kernel_flops(x, q.shape[1], q.shape[2], causal) for x in seqs.q_lengths)
        self.clock.now += flops / 100e12 + n * 1e-6
        return q.clone(), q.new_zeros(q.shape[1], q.shape[0])

    def backward(self, dout, q, k, v, out, lse, seqs, causal, scale):
        n = len(seqs.q_lengths)
        flops = sum(kernel_flops(x, q.shape[1], q.shape[2], causal) for x in seqs.q_lengths)
        self.clock.now += 2.5 * flops / 50e12 + n * 3e-6
        return q, k, v


def test_measure_varlen_kernel_with_a_fake_kernel():
    clock = FakeClock()
    points = measure_varlen_kernel(FakeVarlenKernel(clock), [16, 64], tokens=256, heads=2, head_dim=16,
                                   dtype=torch.float32, device="cpu", iters=2, warmup=1, clock=clock)
    assert [(p["length"], p["sequences"]) for p in points] == [(16, 16), (64, 4)]
    for p in points:
        for causal in (False, True):
            flops = p["sequences"] * kernel_flops(p["length"], 2, 16, causal)
            prefix = "causal_" if causal else ""
            assert p[prefix + "forward"] == pytest.approx(flops / (flops / 100e12 + p["sequences"] * 1e-6) / 1e12)
            assert p[prefix + "backward"] == pytest.approx(
                2.5 * flops / (2.5 * flops / 50e12 + p["sequences"] * 3e-6) / 1e12)
    assert points[0]["forward"] < points[1]["forward"] < 100  # shorter sequences: more per-sequence cost


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world, gpus_per_host", [(2, None), (4, 2)])
def test_probe_on_gloo(tmp_path, world, gpus_per_host):
    start = time.monotonic()
    results = run_world(world, probe_worker, str(tmp_path), gpus_per_host, timeout=100)
    assert time.monotonic() - start < 100
    data, no_kernel, path = results[0]
    assert all(r[0] == data for r in results), "every rank returns the same topology"
    topo = planner.Topology.load(path)
    assert topo.to_dict() == data
    hosts = 1 if gpus_per_host is None else world // gpus_per_host
    assert (topo.hosts, topo.gpus_per_host) == (hosts, world // hosts)
    assert topo.host_fabric["kind"] == "switch" and topo.memory_bandwidth > 0
    scopes = [m.scope for m in topo.measured_p2p]
    assert scopes == (["intra_host"] if hosts == 1 else ["intra_host", "inter_host"])
    assert all(len(m.samples) == 3 for m in topo.measured_p2p)
    group_sizes = [m.group_size for m in topo.measured_all_to_all]
    assert group_sizes == [g for g in range(2, world + 1) if world % g == 0]
    assert [m.hosts_per_group for m in topo.measured_all_to_all] == [1 if g <= world // hosts else hosts
                                                                   for g in group_sizes]
    one_head, two_heads = topo.kernels  # one profile per probed head count
    for kernel, heads in ((one_head, 1), (two_heads, 2)):
        assert kernel.name == "reference" and kernel.dtype == "float32" and kernel.heads == heads
        assert [p.block for p in kernel.points] == [64, 128]
        # the reference kernel's varlen form, timed over many short sequences in one call
        assert [(p.length, p.sequences) for p in kernel.varlen] == [(16, 8), (64, 2)]
        assert all(p.forward > 0 and p.causal_backward > 0 for p in kernel.varlen)
    chosen, _ = topo.kernel("reference", "float32", 32)
    assert {chosen.heads} | {v.heads for v in chosen.variants} == {1, 2}
    if hosts > 1:
        assert topo.network["kind"] in ("infiniband", "roce", "ethernet") and topo.network["nics_per_host"] == 2
    assert any("kernel not timed" in w for w in no_kernel["measured"]["warnings"])
    # the probed topology plans (numbers meaningless on CPU, structure right)
    p = planner.plan(world, 4096, 4, 2, head_dim=32, dtype="float32", topology=path)
    assert p.ulysses * p.ring == world and p.kernel == "reference"
    assert planner.plan(world, 4096, 4, 2, topology=path).notes  # bf16 asked, float32 measured: noted


def test_probe_refuses_without_distributed(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ValueError, match="run it under torchrun"):
        planner.probe()
