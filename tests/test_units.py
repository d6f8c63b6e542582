"""Single-process tests of the small pieces: merge, reference kernel, layout, schedules, backend choice."""
from __future__ import annotations

import math

import pytest
import torch

from usp.kernels import BACKENDS, resolve_backend
from usp.kernels.reference import ReferenceKernel
from usp.layout import (FullSchedule, ZigzagCausalSchedule, positions_for, required_multiple, choose_layout, Layout)
from usp.merge import merge_attention_
from usp.attention import kv_replication


def _sdpa_reference(q, k, v, causal, scale):
    """[b, s, h, d] through torch's math SDPA in fp64, with K/V expanded for GQA."""
    g = q.shape[2] // k.shape[2]
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k.repeat_interleave(g, 2), v.repeat_interleave(g, 2)))
    scores = qt @ kt.transpose(-1, -2) * scale
    if causal:
        scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
    return (scores.softmax(-1) @ vt).transpose(1, 2), torch.logsumexp(scores, -1)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads,kv_heads", [(6, 6), (6, 2), (6, 1)])
def test_reference_kernel_forward_backward_matches_autograd(causal, heads, kv_heads):
    torch.manual_seed(0)
    b, s, d, scale = 2, 13, 24, 0.37
    q = torch.randn(b, s, heads, d, dtype=torch.float64, requires_grad=True)
    k = torch.randn(b, s, kv_heads, d, dtype=torch.float64, requires_grad=True)
    v = torch.randn(b, s, kv_heads, d, dtype=torch.float64, requires_grad=True)
    out_ref, lse_ref = _sdpa_reference(q, k, v, causal, scale)
    dout = torch.randn_like(out_ref)
    out_ref.backward(dout)
    kernel = ReferenceKernel()
    out, lse = kernel.forward(q.detach(), k.detach(), v.detach(), causal, scale)
    dq, dk, dv = kernel.backward(dout, q.detach(), k.detach(), v.detach(), out, lse, causal, scale)
    for got, want in ((out, out_ref), (lse, lse_ref), (dq, q.grad), (dk, k.grad), (dv, v.grad)):
        torch.testing.assert_close(got, want.detach(), rtol=1e-12, atol=1e-12)


def test_merge_equals_attention_over_union_of_keys():
    torch.manual_seed(1)
    kernel = ReferenceKernel()
    b, s, h, d = 1, 7, 3, 8
    q = torch.randn(b, s, h, d, dtype=torch.float64)
    k = torch.randn(b, 10, h, d, dtype=torch.float64)
    v = torch.randn(b, 10, h, d, dtype=torch.float64)
    full_out, full_lse = _sdpa_reference_rect(q, k, v)
    out1, lse1 = _sdpa_reference_rect(q, k[:, :4], v[:, :4])
    out2, lse2 = _sdpa_reference_rect(q, k[:, 4:], v[:, 4:])
    out, lse = out1.clone(), lse1.clone()
    merge_attention_(out, lse, out2, lse2)
    torch.testing.assert_close(out, full_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, full_lse, rtol=1e-12, atol=1e-12)
    # into a row slice (views), as the ring does for half blocks
    out, lse = full_out.clone(), full_lse.clone()
    out_a, lse_a = _sdpa_reference_rect(q[:, 3:], k[:, :4], v[:, :4])
    out_b, lse_b = _sdpa_reference_rect(q[:, 3:], k[:, 4:], v[:, 4:])
    out[:, 3:], lse[:, :, 3:] = out_a, lse_a
    merge_attention_(out[:, 3:], lse[:, :, 3:], out_b, lse_b)
    torch.testing.assert_close(out, full_out, rtol=1e-12, atol=1e-12)
    del kernel


def _sdpa_reference_rect(q, k, v):
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k)
    lse = torch.logsumexp(scores, -1)
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v), lse


def test_merge_handles_rows_without_keys():
    out = torch.zeros(1, 2, 1, 4)
    lse = torch.full((1, 1, 2), float("-inf"))
    block = torch.ones(1, 2, 1, 4)
    block_lse = torch.tensor([[[0.5, float("-inf")]]])
    merge_attention_(out, lse, block, block_lse)
    assert torch.equal(out[0, 0], torch.ones(1, 4)) and torch.equal(out[0, 1], torch.zeros(1, 4))
    assert lse[0, 0, 0] == 0.5 and lse[0, 0, 1] == float("-inf")
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_merge_into_half_output_rounds_once_like_a_float32_accumulator(dtype):
    """Note [narrow sums]: merging straight into a half-precision output equals float32 merge + one cast."""
    gen = torch.Generator().manual_seed(3)
    out = torch.randn(2, 9, 3, 16, generator=gen).to(dtype)
    block = torch.randn(2, 9, 3, 16, generator=gen).to(dtype)
    lse, block_lse = torch.randn(2, 3, 9, generator=gen), torch.randn(2, 3, 9, generator=gen)
    lse[0, 1, 2] = float("-inf")
    wide_out, wide_lse = out.float(), lse.clone()
    merge_attention_(wide_out, wide_lse, block, block_lse)
    narrow_out, narrow_lse = out.clone(), lse.clone()
    merge_attention_(narrow_out, narrow_lse, block, block_lse)
    assert torch.equal(narrow_out, wide_out.to(dtype))
    assert torch.equal(narrow_lse, wide_lse)


def test_gradient_sum_of_two_blocks_in_half_precision_equals_float32_sum():
    """Note [narrow sums]: a partial block held until the full one arrives, one rounding, no zeros buffer."""
    from usp.ring import _GradientSum

    gen = torch.Generator().manual_seed(4)
    full = torch.randn(1, 10, 2, 8, generator=gen).to(torch.bfloat16)
    part = torch.randn(1, 5, 2, 8, generator=gen).to(torch.bfloat16)
    rows = slice(5, 10)
    narrow = _GradientSum(full.shape, torch.bfloat16, full.device, narrow=True)
    narrow.add(rows, part)
    assert narrow.total is None  # held, not added to zeros
    narrow.add(slice(None), full.clone())  # taken as the running sum itself: no copy
    want = full.float()
    want[:, rows] += part.float()
    assert torch.equal(narrow.materialize(), want.to(torch.bfloat16))
    wide = _GradientSum(full.shape, torch.float32, full.device, narrow=False)
    wide.add(rows, part)
    wide.add(slice(None), full.clone())
    assert torch.equal(wide.materialize(), want)
    empty = _GradientSum((1, 3, 2, 8), torch.float32, full.device, narrow=True)
    assert torch.equal(empty.materialize(), torch.zeros(1, 3, 2, 8))


@pytest.mark.parametrize("ulysses,ring", [(1, 1), (1, 2), (2, 1), (2, 2), (1, 4), (4, 2), (2, 4), (3, 3)])
@pytest.mark.parametrize("causal", [True, False])
def test_layout_is_a_permutation_and_schedule_covers_the_mask_exactly_once(ulysses, ring, causal):
    seqlen = required_multiple(ulysses, ring, causal) * 3
    shards = {(u, r): positions_for(seqlen, ulysses, ring, u, r, causal) for u in range(ulysses) for r in range(ring)}
    everything = torch.cat([shards[(u, r)] for r in range(ring) for u in range(ulysses)])
    assert torch.equal(everything.sort().values, torch.arange(seqlen))
    # ring-level sequences (what the ring sees after the Ulysses all-to-all)
    ring_seq = [torch.cat([shards[(u, r)] for u in range(ulysses)]) for r in range(ring)]
    schedule = ZigzagCausalSchedule() if causal else FullSchedule()
    covered = torch.zeros(seqlen, seqlen, dtype=torch.int64)
    work = []
    for r in range(ring):
        flops = 0
        for step in range(ring):
            task = schedule.block(step, r, ring, ring_seq[r].numel())
            source = (r - step) % ring
            if task is None:
                continue
            qpos, kpos = ring_seq[r][task.q_rows], ring_seq[source][task.kv_rows]
            allowed = qpos[:, None] >= kpos[None, :] if task.causal else torch.ones(len(qpos), len(kpos), dtype=torch.bool)
            if causal and not task.causal:
                assert bool((qpos[:, None] >= kpos[None, :]).all()), "a non-causal block must be fully visible"
            covered[qpos[:, None].expand_as(allowed)[allowed], kpos[None, :].expand_as(allowed)[allowed]] += 1
            flops += int(allowed.sum())
        work.append(flops)
    expected = torch.ones(seqlen, seqlen, dtype=torch.int64)
    if causal:
        expected = expected.tril()
    assert torch.equal(covered, expected)
    if causal and ring > 1:
        # zigzag balance: every ring rank computes the same number of (q, k) pairs
        assert max(work) == min(work), work


def test_required_multiple_and_layout_choice():
    assert required_multiple(1, 1, True) == 1
    assert required_multiple(4, 1, True) == 4
    assert required_multiple(1, 4, True) == 8
    assert required_multiple(2, 4, True) == 8
    assert required_multiple(4, 2, True) == 8
    assert required_multiple(3, 2, True) == 12
    assert required_multiple(2, 4, False) == 8
    assert choose_layout(1, True) is Layout.CONTIGUOUS
    assert choose_layout(2, True) is Layout.ZIGZAG
    assert choose_layout(2, False) is Layout.CONTIGUOUS


def test_kv_replication_is_smallest_count_divisible_by_ulysses():
    assert kv_replication(8, 4) == 1
    assert kv_replication(2, 4) == 2
    assert kv_replication(1, 8) == 8
    assert kv_replication(6, 4) == 2  # 6 -> 12 heads
    for kv in range(1, 9):
        for u in (1, 2, 3, 4, 8):
            total = kv * kv_replication(kv, u)
            assert total % u == 0 and total == math.lcm(kv, u)


def test_backend_auto_on_cpu_is_reference_and_errors_name_valid_values():
    assert resolve_backend("auto", torch.device("cpu"), torch.bfloat16, 80).name == "reference"
    assert set(BACKENDS) == {"fa4", "fa2", "cudnn", "torch_flash", "reference"}
    with pytest.raises(ValueError, match="valid values for the dense path: 'auto'"):
        resolve_backend("nope", torch.device("cpu"), torch.float32, 64)
    with pytest.raises(ValueError, match="cannot run here"):
        resolve_backend("cudnn", torch.device("cpu"), torch.bfloat16, 64)


def test_import_has_no_side_effects():
    import subprocess
    import sys

    code = (
        "import os, sys; env = dict(os.environ); import usp, torch.distributed as dist; "
        "assert not dist.is_initialized(); assert dict(os.environ) == env; "
        "assert 'usp.planner' not in sys.modules; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_ring_rotation_refuses_misuse():
    from usp.comm.p2p import RingRotation

    rotation = RingRotation(None, 0, 0)
    with pytest.raises(RuntimeError, match="wait called before start"):
        rotation.wait()
