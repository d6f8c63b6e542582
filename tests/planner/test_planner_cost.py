"""The cost model against hand-computed cases (every number below is worked out in the comments)."""
import pytest
import usp.spec as spec

from usp.planner.cost import CostModel, Shape, replicated_kv_heads
from usp.planner.search import predict, required_seqlen_multiple
from usp.planner.topology import Topology

MiB = 1024**2


def toy(memory_bandwidth=None, gpus=4, bandwidth=100, overhead_us=0, slowdown=0):
    """4 GPUs on a switch, 100 GB/s per GPU link, no link latency; P2P latency 10 us, all-to-all 5 us; a kernel
    at 100 TFLOP/s forward and 50 TFLOP/s backward at every block size; no distributed overheads unless asked."""
    doc = {"name": "toy", "hosts": 1, "gpus_per_host": gpus,
           "gpu": {"model": "toy", "memory_gib": 80},
           "host_fabric": {"kind": "switch", "bandwidth_GBps": bandwidth, "latency_us": 0},
           "collectives": {"p2p": {"latency_us": 10, "floor_us": 0}, "all_to_all": {"latency_us": 5, "floor_us": 0},
                           "step_overhead_us": overhead_us, "compute_slowdown": slowdown},
           "kernels": [{"name": "flat", "points": [{"block": 1024, "forward": 100, "backward": 50}]}]}
    if memory_bandwidth:
        doc["gpu"]["memory_bandwidth_GBps"] = memory_bandwidth
    return Topology.from_dict(doc)


SHAPE = Shape(seqlen=4096, heads=8, kv_heads=8, head_dim=64, batch=1, dtype="bfloat16", causal=False)


def evaluate(topo, shape, u, r, placement="ulysses_inner", head_chunks=1):
    model = CostModel(topo, u * r)
    return model.evaluate(shape, u, r, placement, topo.kernel()[0], head_chunks)


def test_pure_ulysses_by_hand():
    fwd, bwd, _ = evaluate(toy(), SHAPE, 4, 1)
    flops = 4 * 1 * (8 / 4) * 4096 * 4096 * 64           # 4·b·(H/U)·s²·d, one s x s block per rank
    assert fwd.flops == flops and bwd.flops == 2.5 * flops
    assert fwd.compute == pytest.approx(flops / 100e12)
    assert bwd.compute == pytest.approx(2.5 * flops / 50e12)
    buf = 1 * (4096 / 4) * 8 * 64 * 2                       # b·(s/P)·H·d·B = 1 MiB for Q (and K, V, O: MHA)
    assert buf == MiB
    # H/U = Hkv/U = 2 are even: G = 2 head groups, every call moves buf/2 = 0.5 MiB
    one_call = 5e-6 + (buf / 2 / 4) * 3 / 100e9             # latency + (M/U) x 3 flows per GPU link / 100 GB/s
    t_fwd, t_bwd = flops / 2 / 100e12, 2.5 * flops / 2 / 50e12  # one group's compute: 42.9 us, 214.7 us
    # forward: group 0's Q, K, V in (3 calls) and group 1's O out (1 call) exposed; group 1's inputs (26.8 us) and
    # group 0's output (8.9 us) hide under the other group's compute. Backward: 1 dO in + 3 grads out exposed.
    assert 3 * one_call < t_fwd and 3 * one_call < t_bwd
    assert fwd.all_to_all == pytest.approx(4 * one_call) and bwd.all_to_all == pytest.approx(4 * one_call)
    assert fwd.a2a_calls == bwd.a2a_calls == 8
    assert fwd.a2a_bytes == pytest.approx(4 * 0.75 * MiB)  # (U-1)/U of each buffer leaves the rank
    assert fwd.ring_exposed == bwd.ring_exposed == 0 and fwd.ring_transfers == 0
    assert fwd.total == pytest.approx(fwd.compute + fwd.all_to_all)


def test_pure_ring_by_hand():
    fwd, bwd, _ = evaluate(toy(), SHAPE, 1, 4)
    c = 4 * 8 * 1024 * 1024 * 64 / 100e12                   # one (s/R)² block per step, 21.47 us
    n_kv = 2 * 1024 * 8 * 64 * 2                            # K and V of s/R tokens: 2 MiB
    n_dkv = 2 * 1024 * 8 * 64 * 4                           # fp32 dK, dV: 4 MiB
    bw, alpha = 100e9, 10e-6                                # one flow per link direction in a ring
    assert fwd.compute == pytest.approx(4 * c)
    # steps 0..2 carry the next KV: alpha + max(c, n/bw); the last step is compute only
    assert fwd.compute + fwd.ring_exposed == pytest.approx(3 * (alpha + max(c, n_kv / bw)) + c)
    assert fwd.ring_transfers == 3 and fwd.ring_bytes == 3 * n_kv
    cb = 2.5 * 4 * 8 * 1024 * 1024 * 64 / 50e12
    # reverse walk j = 3, 2, 1, 0, starting on the K/V kept from the forward
    expected = ((alpha + max(cb, n_kv / bw))                 # j = 3: K/V to the previous rank
                + (2 * alpha + max(cb, (n_kv + n_dkv) / bw))  # j = 2: K/V and the dKV of step 3
                + (alpha + max(cb, n_dkv / bw))              # j = 1: the dKV of step 2 (step 0 is our own K/V)
                + (alpha + max(cb, n_dkv / bw)))             # j = 0: the last dKV, under the diagonal block
    assert bwd.compute + bwd.ring_exposed == pytest.approx(expected)
    assert bwd.ring_transfers == 5 and bwd.ring_bytes == 2 * n_kv + 3 * n_dkv
    assert fwd.a2a_calls == 0 and fwd.all_to_all == 0


def test_transfer_longer_than_compute_is_exposed():
    fwd, _, _ = evaluate(toy(bandwidth=1), SHAPE, 1, 4)    # 1 GB/s: 2 MiB takes 2.1 ms >> 21 us of compute
    n_kv = 2 * 1024 * 8 * 64 * 2
    c = 4 * 8 * 1024 * 1024 * 64 / 100e12
    # three steps take alpha + n/bw instead of c; the last step is compute only
    assert fwd.ring_exposed == pytest.approx(3 * (10e-6 + n_kv / 1e9 - c))


def test_causal_zigzag_flops_and_blocks():
    shape = Shape(seqlen=8192, heads=8, kv_heads=8, head_dim=64, causal=True)
    fwd, bwd, _ = evaluate(toy(), shape, 2, 2)
    total = 4 * 8 * 8192**2 * 64 / 2                        # causal: half of 4·b·H·s²·d
    assert fwd.flops == pytest.approx(total / 4)            # zigzag balances: every rank does 1/P
    assert fwd.kernel_calls == 2 * 2                        # G = 2 head groups x R blocks (diagonal + half)
    blocks = CostModel.blocks(shape, 4)
    assert [b.causal for b in blocks] == [True, False, False, False]
    assert blocks[1].q * blocks[1].k == pytest.approx(0.5 * blocks[0].q * blocks[0].k)


def test_merge_traffic_by_hand():
    fwd, bwd, _ = evaluate(toy(memory_bandwidth=1000), SHAPE, 1, 4)
    q_h = 1024 * 8 * 64                                     # b·(s/R)·(H/U)·d
    g_h = q_h + 2 * q_h                                     # dq + dK + dV (MHA)
    B = 2
    fwd_bytes = 3 * (8 + B) * q_h + (B + 4) * q_h + (4 + B) * q_h  # fused merges, promotion, final cast
    bwd_bytes = (4 + B) * g_h + 4 * (8 + B) * g_h + (4 + B) * g_h  # fp32 sums created, 4 add_ steps, final casts
    assert fwd.merge == pytest.approx(fwd_bytes / 1e12)
    assert bwd.merge == pytest.approx(bwd_bytes / 1e12)
    # a ring of two keeps its sums in bf16 (Note [narrow sums]): one merge, dq + dK/dV adds at step 0
    q2 = 2048 * 8 * 64
    fwd2, bwd2, _ = evaluate(toy(memory_bandwidth=1000), SHAPE, 1, 2)
    assert fwd2.merge == pytest.approx(3 * B * q2 / 1e12)
    assert bwd2.merge == pytest.approx(3 * B * (q2 + 2 * q2) / 1e12)
    f_u, _, _ = evaluate(toy(memory_bandwidth=1000), SHAPE, 4, 1)
    f_plain, _, _ = evaluate(toy(), SHAPE, 4, 1)
    assert f_u.all_to_all - f_plain.all_to_all == pytest.approx(4 * 4 * MiB / 1e12)  # staging: 4·M per call


def test_memory_by_hand():
    _, _, mem = evaluate(toy(), SHAPE, 2, 2)
    q_h = kv_h = 2048 * 4 * 64                              # b·(s/R)·(H/U)·d, MHA
    lse = 4 * 2048
    B = 2
    saved = B * (2 * q_h + 2 * kv_h) + 4 * lse + 2 * kv_h * B  # + the forward's last K/V (G = 2 halves)
    fwd = 2 * q_h * B + (1 * 2 * kv_h * B) + q_h * B + 8 * lse  # R == 2: no fp32 out accumulator
    # R == 2: the held step-1 dq block (B) and bf16 dK/dV partial sums instead of fp32 ones
    bwd = 2 * q_h * B + 2 * (q_h + 2 * kv_h) * B + 4 * q_h + q_h * B + 2 * 2 * kv_h * B + 2 * kv_h * B
    assert (mem.saved, mem.forward_transient, mem.backward_transient) == (saved, fwd, bwd)
    assert mem.peak == saved + max(fwd, bwd) == 24_150_016
    # head chunks divide the ring and per-call terms, and drop the held K/V block
    _, _, chunked = evaluate(toy(), SHAPE, 1, 2, head_chunks=4)
    _, _, whole = evaluate(toy(), SHAPE, 1, 2)
    assert chunked.saved == whole.saved - 2 * (2048 * 8 * 64) * B
    assert chunked.backward_transient < whole.backward_transient / 2


def test_kv_replication():
    assert replicated_kv_heads(8, 4) == 8
    assert replicated_kv_heads(8, 16) == 16
    assert replicated_kv_heads(6, 4) == 12
    assert replicated_kv_heads(1, 8) == 8
    shape = Shape(seqlen=4096, heads=16, kv_heads=2, head_dim=64, causal=False)
    fwd, _, _ = evaluate(toy(), shape, 4, 1)
    q_buf, kv_buf = 1024 * 16 * 64 * 2, 1024 * 4 * 64 * 2   # KV heads 2 -> lcm(2, 4) = 4 before the a2a
    assert fwd.a2a_bytes == pytest.approx(0.75 * (2 * q_buf + 2 * kv_buf))


def test_measured_all_to_all_replaces_the_graph_estimate():
    topo = Topology.preset("h100-nvlink-2x")
    shape = Shape(seqlen=16384, heads=32, kv_heads=32, head_dim=128)
    fwd, _, _ = CostModel(topo, 2).evaluate(shape, 2, 1, "ulysses_inner", topo.kernel()[0])
    buf = 8192 * 32 * 128 * 2 / 2                           # H/U = 16 is even: G = 2, each call moves half
    fit = topo.measured_a2a(2, 1)
    # exposed: group 0's Q, K, V in and group 1's O out (the other four hide under ~0.9 ms of group compute);
    # staging copies of all 8 calls
    assert 3 * fit.time(buf) < fwd.compute / 2
    assert fwd.all_to_all == pytest.approx(4 * fit.time(buf) + 8 * 4 * buf / topo.memory_bandwidth)


def test_seqlen_multiple_matches_the_core():
    for u in range(1, 9):
        for r in range(1, 9):
            for causal in (False, True):
                assert required_seqlen_multiple(u, r, causal) == spec.required_multiple(u, r, causal)


def test_exposed_time_is_never_negative():
    for topo in ("dgx-h100", "l20-pcie", "dgx-a100"):
        for u, r in ((1, 8), (2, 4), (4, 2), (8, 1)):
            for causal in (True, False):
                c = predict(u, r, "64k", 32, 8, topology=topo, causal=causal)
                for p in (c.forward, c.backward):
                    assert p.ring_exposed >= -1e-12 and p.all_to_all >= 0 and p.merge >= 0


@pytest.mark.parametrize("seqlen, causal, measured_ms", [
    ("32k", True, 53.1), ("64k", True, 210.8), ("128k", True, 865.8),
    ("32k", False, 103.1), ("64k", False, 414.6), ("128k", False, 1653.1)])
def test_single_gpu_times_match_facts(seqlen, causal, measured_ms):
    """benchmarks/RESULTS.md reference measurements, PyTorch CP table, 1-GPU column (cuDNN, bf16, 32 heads, d=128, fwd+bwd): an independent measurement
    of what the kernel-rate points (16K, 32K) predict, including the extrapolation to 64K and 128K."""
    c = predict(1, 1, seqlen, 32, 32, causal=causal, topology="h100-nvlink-2x", kernel="cudnn", world_size=1)
    assert c.total * 1e3 == pytest.approx(measured_ms, rel=0.05)


def test_distributed_overheads_by_hand():
    """planner.cost "Distributed overheads": kernels (1 + slowdown) slower and a fixed cost per ring step, inside
    the step (it counts against the transfer the step overlaps)."""
    fwd0, bwd0, _ = evaluate(toy(), SHAPE, 1, 4)
    fwd, bwd, _ = evaluate(toy(overhead_us=100, slowdown=0.05), SHAPE, 1, 4)
    assert fwd.compute == pytest.approx(1.05 * fwd0.compute) and bwd.compute == pytest.approx(1.05 * bwd0.compute)
    assert fwd.overhead == bwd.overhead == pytest.approx(4 * 100e-6)  # R = 4 steps per pass
    c = 1.05 * 4 * 8 * 1024 * 1024 * 64 / 100e12 + 100e-6       # one step's kernel + overhead
    n_kv = 2 * 1024 * 8 * 64 * 2
    assert fwd.total == pytest.approx(3 * (10e-6 + max(c, n_kv / 100e9)) + c)
    one, _, _ = CostModel(toy(overhead_us=100, slowdown=0.05), 1).evaluate(SHAPE, 1, 1, "ulysses_inner",
                                                                           toy().kernel()[0])
    assert one.overhead == 0 and one.compute == pytest.approx(evaluate(toy(), SHAPE, 1, 1)[0].compute)  # 1 GPU
    u_fwd, _, _ = evaluate(toy(overhead_us=100), SHAPE, 4, 1)
    assert u_fwd.overhead == pytest.approx(100e-6)                # R == 1: one step per pass
