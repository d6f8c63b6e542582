"""Ranks that disagree (usp.consistency, Note [call agreement]): when rank 1's call differs from rank 0's, every
rank raises ValueError/TypeError naming what differs, and none hangs or aborts inside a collective.

One 2-rank gloo world (started once, with a timeout) runs every case on meshes 1x2 and 2x1, then a correct call
that would hang if any rank were still waiting in a collective from an earlier case.
"""
from __future__ import annotations

import re

import pytest
import torch

from distributed import run_world

MESHES = [(1, 2), (2, 1)]

# (case, regex every rank's message must match). Rank 0 always makes the base call; rank 1 the changed one.
CASES = [
    ("causal", r"causal differs: rank 0 True, rank 1 False"),
    ("softmax_scale", r"softmax_scale differs: rank 0 0\.25, rank 1 0\.3"),
    ("fp16 vs bf16", r"dtype differs: rank 0 torch\.float16, rank 1 torch\.bfloat16"),
    ("batch x seq reshaped", r"batch differs: rank 0 1, rank 1 2; seq_local differs: rank 0 8, rank 1 4"),
    ("heads x head_dim reshaped", r"heads differs: rank 0 4, rank 1 8.*head_dim differs: rank 0 16, rank 1 8"),
    ("local length", r"seq_local differs: rank 0 8, rank 1 4"),
    ("heads", r"heads differs: rank 0 4, rank 1 2"),
    ("head_dim", r"head_dim differs: rank 0 16, rank 1 32"),
    ("batch", r"batch differs: rank 0 1, rank 1 2"),
    ("dtype size", r"dtype differs: rank 0 torch\.float32, rank 1 torch\.float64"),
    ("head_chunks", r"head_chunks differs: rank 0 1, rank 1 2"),
    ("return_lse", r"return_lse differs: rank 0 False, rank 1 True"),
    ("backend", r"backend differs: rank 0 reference, rank 1 reference_copy"),
    ("backward", r"backward differs: rank 0 False, rank 1 True"),
    ("deterministic", r"deterministic differs: rank 0 False, rank 1 True"),
    ("varlen cu_seqlens, same local tokens",
     r"documents differs: rank 0 \[2 documents of lengths 16, 16; .*\], rank 1 \[2 documents of lengths 8, 24; "),
    ("varlen causal", r"causal differs: rank 0 True, rank 1 False"),
    ("dense vs varlen", r"entry point differs: rank 0 long_context_attention, rank 1 long_context_attention_varlen"),
    # one rank fails validation: it raises its own error, the other names it
    ("bad argument on rank 1", r"causal must be a bool"),
    ("backend unavailable on rank 1", r"'rank0_only' is not available"),
]
FAILING_ON_RANK_1 = {"bad argument on rank 1": "TypeError", "backend unavailable on rank 1": "ValueError"}


def _disagreeing_world(rank, world_size, device_type="cpu"):
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    import usp
    from usp.kernels.reference import ReferenceKernel

    class ReferenceCopy(ReferenceKernel):
        name = "reference_copy"

    class Rank0Only(ReferenceKernel):
        name = "rank0_only"

        def is_available(self):
            return dist.get_rank() == 0

    device = torch.device(device_type, rank if device_type == "cuda" else None)

    def t(*shape, dtype=torch.float32):
        return torch.randn(*shape, dtype=dtype, device=device)

    results = {}
    for mesh_u, mesh_r in MESHES:
        mesh = usp.SequenceParallelMesh(ulysses=mesh_u, ring=mesh_r)
        attn, varlen = usp.long_context_attention, usp.long_context_attention_varlen
        mine = rank == 1  # rank 1 makes the changed call

        def dense(b=1, s=8, h=4, h_kv=2, d=16, dtype=torch.float32, grad=False, **kw):
            q, k, v = t(b, s, h, d, dtype=dtype), t(b, s, h_kv, d, dtype=dtype), t(b, s, h_kv, d, dtype=dtype)
            if grad:
                q.requires_grad_()
            kw.setdefault("backend", "reference")
            return attn(q, k, v, mesh, **kw)

        def packed(cu, causal=True):
            t_local = usp.varlen_layout(cu, mesh, causal).local_tokens
            return varlen(t(t_local, 4, 16), t(t_local, 2, 16), t(t_local, 2, 16), cu, None, mesh, causal=causal,
                          backend="reference")

        calls = {
            "causal": lambda: dense(causal=not mine),
            "softmax_scale": lambda: dense(softmax_scale=0.3 if mine else 0.25),
            "fp16 vs bf16": lambda: dense(dtype=torch.bfloat16 if mine else torch.float16),
            "batch x seq reshaped": lambda: dense(b=2, s=4) if mine else dense(),
            "heads x head_dim reshaped": lambda: dense(h=8, h_kv=4, d=8) if mine else dense(),
            "local length": lambda: dense(s=4) if mine else dense(),
            "heads": lambda: dense(h=2) if mine else dense(),
            "head_dim": lambda: dense(d=32) if mine else dense(),
            "batch": lambda: dense(b=2) if mine else dense(),
            "dtype size": lambda: dense(dtype=torch.float64 if mine else torch.float32),
            "head_chunks": lambda: dense(head_chunks=2 if mine else 1),
            "return_lse": lambda: dense(return_lse=mine),
            "backend": lambda: dense(backend=ReferenceCopy() if mine else "reference"),
            "backward": lambda: dense(grad=mine),
            "deterministic": lambda: dense(deterministic=mine),
            "varlen cu_seqlens, same local tokens": lambda: packed([0, 8, 32] if mine else [0, 16, 32]),
            "varlen causal": lambda: packed([0, 16, 32], causal=not mine),
            "dense vs varlen": lambda: packed([0, 16, 32]) if mine else dense(),
            "bad argument on rank 1": lambda: dense(causal="yes" if mine else True),
            "backend unavailable on rank 1": lambda: dense(backend=Rank0Only()),
        }
        assert list(calls) == [case for case, _ in CASES]
        for case, call in calls.items():
            try:
                call()
            except (ValueError, TypeError) as error:  # RankMismatchError is a ValueError
                results[(mesh_u, mesh_r, case)] = ("TypeError" if isinstance(error, TypeError) else "ValueError",
                                                   str(error))
            else:
                results[(mesh_u, mesh_r, case)] = ("no error", "")

        # the same call on every rank runs, and right: nobody is left inside a collective from the cases above
        torch.manual_seed(0)
        q, k, v = t(1, 16, 4, 16), t(1, 16, 2, 16), t(1, 16, 2, 16)
        shards = [usp.shard(x, mesh, causal=True) for x in (q, k, v)]
        out = usp.gather(attn(*shards, mesh, causal=True, backend="reference"), mesh, causal=True)
        expected = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.repeat_interleave(2, 2).transpose(1, 2), v.repeat_interleave(2, 2).transpose(1, 2),
            is_causal=True,
        ).transpose(1, 2)
        results[(mesh_u, mesh_r, "same call")] = float((out - expected).abs().max())  # fp32 reference kernel
        cu = [0, 5, 32]
        layout_rows = usp.varlen_layout(cu, mesh).local_tokens
        torch.manual_seed(1)
        packed_out = varlen(t(layout_rows, 4, 16), t(layout_rows, 2, 16), t(layout_rows, 2, 16), cu, None, mesh)
        results[(mesh_u, mesh_r, "same packed call")] = tuple(packed_out.shape)
    return results


@pytest.fixture(scope="module")
def disagreeing():
    return run_world(2, _disagreeing_world, timeout=240)


def _check_case(world_results, mesh_u, mesh_r, case, pattern):
    for rank, results in enumerate(world_results):
        kind, message = results[(mesh_u, mesh_r, case)]
        assert kind in ("ValueError", "TypeError"), f"rank {rank}: {kind} {message}"
        assert re.search(pattern, message), f"rank {rank}: {message}"
        if case in FAILING_ON_RANK_1:
            assert kind == FAILING_ON_RANK_1[case]
            if rank == 0:  # the healthy rank names the failing one
                assert re.search(r"rank 1 raised \w+Error", message), message


def _check_same_call(world_results, mesh_u, mesh_r, tolerance):
    for results in world_results:
        assert results[(mesh_u, mesh_r, "same call")] < tolerance
        assert results[(mesh_u, mesh_r, "same packed call")][1:] == (4, 16)


@pytest.mark.parametrize("mesh_u,mesh_r", MESHES)
@pytest.mark.parametrize("case,pattern", CASES, ids=[case for case, _ in CASES])
def test_every_rank_raises_naming_the_difference(disagreeing, mesh_u, mesh_r, case, pattern):
    _check_case(disagreeing, mesh_u, mesh_r, case, pattern)


@pytest.mark.parametrize("mesh_u,mesh_r", MESHES)
def test_the_same_call_passes(disagreeing, mesh_u, mesh_r):
    _check_same_call(disagreeing, mesh_u, mesh_r, 1e-5)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices (run on the GPU machine)")
def test_every_rank_raises_on_gpus_with_nccl_data_groups():
    """The same cases with CUDA tensors and NCCL data groups (the check stays on the gloo consistency group): with
    NCCL, unequal message sizes would hang rather than abort."""
    world_results = run_world(2, _disagreeing_world, "cuda", backend="nccl", timeout=300)
    for mesh_u, mesh_r in MESHES:
        for case, pattern in CASES:
            _check_case(world_results, mesh_u, mesh_r, case, pattern)
        _check_same_call(world_results, mesh_u, mesh_r, 1e-4)


def _policy_world(rank, world_size):
    import torch

    import usp
    import usp.consistency as consistency

    gathers = []
    real = consistency._gather_signatures

    def counted(signature, group, wait=True):
        gathers.append(1)
        return real(signature, group, wait)

    consistency._gather_signatures = counted
    results = {}
    t = torch.randn
    for policy in ("always", 2, "off"):
        mesh = usp.SequenceParallelMesh(ulysses=1, ring=2, check_calls=policy)
        q, k, v = t(1, 8, 4, 16), t(1, 8, 2, 16), t(1, 8, 2, 16)
        outcomes = []
        for call in range(4):
            del gathers[:]
            try:  # call 1 differs (causal on rank 1), the others are the same on both ranks
                usp.long_context_attention(q, k, v, mesh, causal=not (call == 1 and rank == 1))
                outcomes.append(("ok", len(gathers)))
            except ValueError as error:
                outcomes.append((type(error).__name__, len(gathers)))
        results[str(policy)] = outcomes
    try:  # the policy is part of the mesh the ranks agree on: differing policies would make one rank check alone
        usp.SequenceParallelMesh(ulysses=1, ring=2, check_calls="always" if rank == 0 else "off")
        results["differing policies"] = "no error"
    except ValueError as error:
        results["differing policies"] = str(error)
    return results


def test_check_calls_policy_decides_which_calls_are_checked():
    for results in run_world(2, _policy_world, timeout=120):
        assert results["always"] == [("ok", 1), ("RankMismatchError", 1), ("ok", 1), ("ok", 1)]
        assert results["2"] == [("ok", 1), ("RankMismatchError", 1), ("ok", 0), ("ok", 0)]
        # "off": the differing call runs unchecked (and wrong: what the check exists to stop)
        assert results["off"] == [("ok", 0), ("ok", 0), ("ok", 0), ("ok", 0)]
        assert re.search(r"check_calls", results["differing policies"]), results["differing policies"]


def test_call_check_policy():
    from usp.consistency import CallCheck

    always, off, first = CallCheck.parse("always"), CallCheck.parse("off"), CallCheck.parse(3)
    assert [always.due() for _ in range(5)] == [True] * 5
    assert [off.due() for _ in range(5)] == [False] * 5
    assert [first.due() for _ in range(5)] == [True, True, True, False, False]
    assert CallCheck.parse(first).due()  # a new counter, not shared
    for bad in ("sometimes", 0, -1, True, 2.0):
        with pytest.raises(ValueError, match=r"check_calls=.* valid values: 'always' \(default\), 'off'"):
            CallCheck.parse(bad)


def _deferred_world(rank, world_size):
    """The order of kernel calls, the settling of the agreement and the first collective on each path."""
    import torch
    import torch.distributed as dist

    import usp
    import usp.consistency as consistency
    from usp.kernels.reference import ReferenceKernel
    from usp.kernels.varlen import VARLEN_BACKENDS

    events = []

    class Recording(ReferenceKernel):
        def forward(self, *args, **kwargs):
            events.append("kernel")
            return super().forward(*args, **kwargs)

    settle = consistency._Pending.__call__

    def settled(self):
        if self.work is not None:
            events.append("agreed")
        return settle(self)

    consistency._Pending.__call__ = settled
    real_p2p, real_a2a = dist.batch_isend_irecv, dist.all_to_all_single

    def p2p(*args, **kwargs):
        events.append("p2p")
        return real_p2p(*args, **kwargs)

    def a2a(*args, **kwargs):
        events.append("all_to_all")
        return real_a2a(*args, **kwargs)

    dist.batch_isend_irecv, dist.all_to_all_single = p2p, a2a
    varlen_kernel = VARLEN_BACKENDS["reference"]
    real_varlen = type(varlen_kernel).forward

    def varlen_forward(self, *args, **kwargs):
        events.append("kernel")
        return real_varlen(self, *args, **kwargs)

    type(varlen_kernel).forward = varlen_forward
    results = {}
    t = torch.randn
    try:
        for u, r in ((1, 2), (2, 1)):
            mesh = usp.SequenceParallelMesh(ulysses=u, ring=r)
            del events[:]
            usp.long_context_attention(t(1, 8, 4, 16), t(1, 8, 2, 16), t(1, 8, 2, 16), mesh, causal=True,
                                       backend=Recording())
            results[f"dense {u}x{r}"] = list(events)
        mesh = usp.SequenceParallelMesh(ulysses=1, ring=2)
        for name, lengths in (("varlen, none cut", [4] * 8), ("varlen, one cut", [40, 2, 2])):
            cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist())
            x = usp.shard_varlen(t(sum(lengths), 4, 16), cu, mesh, causal=True)
            del events[:]
            usp.long_context_attention_varlen(x, x, x, cu, None, mesh, causal=True, backend="reference")
            results[name] = list(events)
    finally:
        consistency._Pending.__call__ = settle
        dist.batch_isend_irecv, dist.all_to_all_single = real_p2p, real_a2a
        type(varlen_kernel).forward = real_varlen
    return results


@pytest.mark.timeout(120)
def test_agreement_settles_after_local_work_and_before_any_collective():
    """Note [deferred agreement]: the ring launches its step 0 (its own blocks) while the signatures are gathered,
    and settles the call before its first P2P; Ulysses settles it before its first all-to-all; a packed batch
    with no document cut runs whole before settling (it makes no collective)."""
    for results in run_world(2, _deferred_world, timeout=100):
        ring = results["dense 1x2"]
        assert ring.index("agreed") == 1 and ring[0] == "kernel" and ring[2] == "p2p", ring
        ulysses = results["dense 2x1"]
        assert ulysses[0] == "agreed" and ulysses[1] == "all_to_all" and "kernel" in ulysses, ulysses
        assert results["varlen, none cut"][-1] == "agreed" and "p2p" not in results["varlen, none cut"], results
        one_cut = results["varlen, one cut"]
        first = one_cut.index("p2p")
        assert one_cut[first - 1] == "agreed" and set(one_cut[:first - 1]) == {"kernel"}, one_cut
