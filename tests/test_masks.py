"""Sliding window, softcap, sinks and MLA head sizes through every mesh (issue 11), CPU/gloo against an fp64
autograd reference (``mask_cases``), with the P2P calls the window's ring schedule states; and bad mask options
raising on every rank before any collective."""
from __future__ import annotations

import pytest

from distributed import run_world
from mask_cases import MaskCase, check_mask_result, mask_cases

MESHES = {2: [(1, 2), (2, 1)], 4: [(2, 2), (1, 4), (4, 1)], 8: [(4, 2)]}


def _bad_calls(mesh):
    """Each bad option must raise ValueError/TypeError on every rank (no hang: validation precedes collectives)."""
    import torch

    import usp

    q = torch.randn(1, 8, 4, 16)
    k = v = torch.randn(1, 8, 2, 16)
    calls = {
        "negative softcap": dict(softcap=-1.0),
        "malformed window": dict(window_size=(3,)),
        "window below -1": dict(window_size=(-2, 0)),
        "causal window looking ahead": dict(window_size=(2, 3)),
        "sinks wrong shape": dict(sinks=torch.zeros(3)),
        "sinks wrong dtype": dict(sinks=torch.zeros(4, dtype=torch.int64)),
        "sinks wrong device": dict(sinks=torch.zeros(4, device="meta")),
    }
    messages = {}
    for name, kwargs in calls.items():
        try:
            usp.long_context_attention(q, k, v, mesh, **kwargs)
            messages[name] = None
        except (ValueError, TypeError) as error:
            messages[name] = str(error)
    # a named backend lacking the option
    from usp.kernels.base import AttentionKernel
    from usp.kernels.reference import ReferenceKernel

    class NoWindow(ReferenceKernel):
        name = "no_window"
        supports_window = False
        supports_softcap = False
        different_v_head_dim = False

    for name, kwargs in (("backend without window", dict(window_size=(2, 0))),
                         ("backend without softcap", dict(softcap=3.0))):
        try:
            usp.long_context_attention(q, k, v, mesh, backend=NoWindow(), **kwargs)
            messages[name] = None
        except ValueError as error:
            messages[name] = str(error)
    try:
        usp.long_context_attention(q, k, torch.randn(1, 8, 2, 8), mesh, backend=NoWindow())
        messages["backend without MLA"] = None
    except ValueError as error:
        messages["backend without MLA"] = str(error)
    return messages


def _packed_bad_calls(mesh):
    """Packed input: a named varlen backend without windows is refused (ValueError naming the option)."""
    import torch

    import usp
    from usp.kernels.varlen import ReferenceVarlenKernel

    class NoWindow(ReferenceVarlenKernel):
        name = "no_window"
        supports_window = False

    cu = [0, 20, 23]
    q, k, v = (usp.shard_varlen(torch.randn(23, h, 16), cu, mesh) for h in (4, 2, 2))
    try:
        usp.long_context_attention_varlen(q, k, v, cu, None, mesh, window_size=(4, 0), backend=NoWindow())
    except ValueError as error:
        return str(error)
    return None


def _world(rank, world_size):
    import torch

    import usp
    from mask_cases import run_mask_case
    from varlen_cases import masked_cases_for, run_varlen_case

    results, bad, packed = [], None, []
    for u, r in MESHES[world_size]:
        mesh = usp.SequenceParallelMesh(ulysses=u, ring=r)
        cases = mask_cases(u, r)
        if world_size == 8:
            cases = cases[:3] + cases[-2:]
        results += [run_mask_case(case, mesh) for case in cases]
        if world_size < 8:  # packed documents with windows, softcap, sinks (Note [varlen windows])
            packed += [run_varlen_case(case, mesh, torch.device("cpu")) for case in masked_cases_for(u, r)]
        if bad is None:
            bad = _bad_calls(mesh)
            bad["packed backend without window"] = _packed_bad_calls(mesh)
    return results, bad, packed


@pytest.fixture(scope="module", params=sorted(MESHES))
def world(request):
    return request.param, run_world(request.param, _world, timeout=600)


@pytest.mark.timeout(900)
def test_masked_cases_within_bound_with_the_schedule_collectives(world):
    world_size, per_rank = world
    failures = []
    for rank, (results, _, _) in enumerate(per_rank):
        for result in results:
            for problem in check_mask_result(result):
                failures.append(f"rank {rank} {MaskCase(**result['case']).name()}: {problem}")
    assert not failures, "\n".join(failures[:40])
    assert len(per_rank[0][0]) >= len(MESHES[world_size]) * 5


@pytest.mark.timeout(900)
def test_bad_mask_options_raise_on_every_rank(world):
    _, per_rank = world
    for rank, (_, bad, _) in enumerate(per_rank):
        missing = [name for name, message in bad.items() if message is None]
        assert not missing, f"rank {rank}: no error for {missing}"
    bad = per_rank[0][1]
    assert "softcap" in bad["negative softcap"] and "window_size" in bad["malformed window"]
    assert "sinks" in bad["sinks wrong shape"] and "sinks" in bad["sinks wrong dtype"]
    assert "window" in bad["backend without window"] and "reference" in bad["backend without window"]
    assert "softcap" in bad["backend without softcap"]
    assert "head_dim" in bad["backend without MLA"]
    assert "window" in bad["packed backend without window"] and "reference" in bad["packed backend without window"]


@pytest.mark.timeout(900)
def test_packed_windows_within_bound_with_the_dense_ring_collectives(world):
    """Windows, softcap and sinks on packed documents, every mesh of 2 and 4 ranks, against a per-document fp64
    reference; the K/V still rotate round the whole ring (the dense counts)."""
    from varlen_cases import VarlenCase, check_varlen_result

    world_size, per_rank = world
    if world_size == 8:
        pytest.skip("packed masked cases run on the 2- and 4-rank worlds")
    failures = [f"rank {rank} {VarlenCase(**result['case']).name()}: {problem}"
                for rank, (_, _, packed) in enumerate(per_rank) for result in packed
                for problem in check_varlen_result(result)]
    assert not failures, "\n".join(failures[:40])
    from varlen_cases import masked_cases_for

    assert len(per_rank[0][2]) == len(masked_cases_for(1, 2)) * len(MESHES[world_size])


def test_a_window_within_one_shard_does_not_rotate_round_the_ring():
    """The schedule itself: a window of 2 on a causal ring of 8 exchanges with two neighbours only, a halo of 2
    rows each; the backward reuses the kept halos."""
    from usp.layout import WindowSchedule

    schedule = WindowSchedule(True, 2, 0)
    ring, local = 8, 32
    assert schedule.active_steps(ring, local) == (1, 7)
    assert all(schedule.collectives(r, ring, local) in ((1, 1), (2, 2)) for r in range(ring))
    halos = [schedule.halo(j, r, ring, local) for r in range(ring) for j in (1, 7)]
    assert all(h is None or h.stop - h.start == 2 for h in halos)
    assert schedule.keep_halos(ring, local)
    assert WindowSchedule(False, 100, 100).active_steps(ring, local) == (1, 2, 3, 4, 5, 6, 7)


def test_fa4_takes_mla_head_sizes_without_grouped_kv_heads(monkeypatch):
    """flash-attn-4's dense kernel runs a v head size other than q/k's for MHA (DeepSeek V3's 192/128) and refuses
    it with grouped K/V heads, naming why (its SM90 backward asserts equal sizes there); the varlen kernel refuses
    it (not run on a GPU here)."""
    from usp.kernels import flash_attn
    from usp.kernels.base import MaskNeeds
    from usp.kernels.varlen import VARLEN_BACKENDS

    monkeypatch.setattr(flash_attn, "_capability_major", lambda: 9)
    dense = flash_attn.FlashAttn4Kernel()
    assert dense._needs_reason(MaskNeeds(v_head_dim=128), 192) is None
    reason = dense._needs_reason(MaskNeeds(v_head_dim=128, grouped=True), 192)
    assert "GQA" in reason and "reference" in reason
    assert "[8, 256]" in dense._needs_reason(MaskNeeds(v_head_dim=264), 192)
    assert "head_dim" in VARLEN_BACKENDS["fa4"]._needs_reason(MaskNeeds(v_head_dim=128), 192)
