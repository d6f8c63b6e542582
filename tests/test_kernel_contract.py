"""Note [kernel contract] (``usp.kernels.base``), deterministic mode and the double-backward refusal, on CPU (gloo).

Every schedule (causal and not, batch 2 so that row slices are strided, GQA with K/V replication, head chunks
with and without shared K/V heads, Ulysses x ring, packed documents; sliding windows, softcap and sinks, dense and
packed) runs with the reference kernels wrapped in
the contract checker (``usp.kernels.contract``), which raises on anything a kernel may not receive: a caller that
hands a kernel a strided LSE (what made flash-attn 2 return wrong gradients) fails here, on CPU. The same worlds
check that ``deterministic=True`` gives bitwise-identical results over three runs and that second-order gradients
are refused on every mesh.
"""
from __future__ import annotations

import pytest
import torch

from attention_cases import CONTRACT_PREFIX, Case, check_result, run_cases, standard_cases
from distributed import run_world
from mask_cases import MaskCase, check_mask_result, run_mask_case
from varlen_cases import VarlenCase, cases_for, check_varlen_result, masked_cases_for, run_varlen_case

MESHES = {2: [(1, 2), (2, 1)], 4: [(2, 2), (1, 4)]}
CHECKED = CONTRACT_PREFIX + "reference"


def _dense_cases(u, r):
    from usp.layout import required_multiple

    cases = standard_cases(u, r, dtypes=("float32",), backend=CHECKED)
    for causal, kv_heads, chunks in ((True, 4, 2), (False, 2, 4), (True, 1, 2)):
        try:
            from usp.attention import check_head_chunks

            check_head_chunks(chunks, 8, kv_heads, u)
        except ValueError:
            continue
        cases.append(Case(u, r, causal, "bfloat16", 2, required_multiple(u, r, causal) * 5, 8, kv_heads, 32,
                          backend=CHECKED, head_chunks=chunks))
    return cases


def _varlen_cases(u, r):
    cases = [VarlenCase(c.ulysses, c.ring, c.causal, c.dtype, c.scenario, c.heads, c.kv_heads, c.head_dim, CHECKED)
             for c in cases_for(u, r, full=False)]
    # windows (trimmed per-document sequences, one mask per call), softcap, sinks
    return cases + [c for i, c in enumerate(masked_cases_for(u, r, CHECKED)) if i in (0, 2, 3)]


def _mask_cases(u, r):
    """Dense windowed blocks (trimmed sub-blocks, Note [block mask]), softcap, sinks, MLA head sizes."""
    from mask_cases import MaskCase
    from usp.spec import required_multiple

    cases = []
    for causal in (True, False):
        seqlen = required_multiple(u, r, causal) * 6
        shard = seqlen // (u * r)
        cases.append(MaskCase(u, r, causal, "float32", seqlen, window=(2, 0 if causal else 3), sinks=True,
                              backend=CHECKED))
        cases.append(MaskCase(u, r, causal, "bfloat16", seqlen, window=(shard + 3, 0 if causal else 1),
                              softcap=5.0, kv_heads=1, v_head_dim=8, backend=CHECKED))
    return cases


def _bitwise_runs(mesh, varlen: bool, runs: int = 3):
    """Out and every gradient of ``runs`` identical deterministic calls; True if all bitwise equal."""
    import usp

    gen = torch.Generator().manual_seed(11)
    results = []
    if varlen:
        lengths = [13, 2, 29, 7]
        cu = torch.tensor([0, 13, 15, 44, 51])
        full = [torch.randn(51, 4, 16, generator=gen) for _ in range(3)]
        local = [usp.shard_varlen(t, cu, mesh) for t in full]
        for _ in range(runs):
            q, k, v = (t.clone().requires_grad_() for t in local)
            out = usp.long_context_attention_varlen(q, k, v, cu, max(lengths), mesh, deterministic=True)
            out.backward(torch.ones_like(out))
            results.append([out.detach(), q.grad, k.grad, v.grad])
    else:
        seqlen = 16 * mesh.ulysses * mesh.ring
        full = [torch.randn(2, seqlen, 4, 16, generator=gen).bfloat16() for _ in range(3)]
        local = [usp.shard(t, mesh) for t in full]
        for _ in range(runs):
            q, k, v = (t.clone().requires_grad_() for t in local)
            out = usp.long_context_attention(q, k, v, mesh, deterministic=True)
            out.backward(torch.ones_like(out))
            results.append([out.detach(), q.grad, k.grad, v.grad])
    return all(torch.equal(a, b) for other in results[1:] for a, b in zip(results[0], other))


def _double_backward_refused(mesh, varlen: bool):
    import usp

    if varlen:
        cu = [0, 5, 3 + 5 + 8 * mesh.ulysses * mesh.ring]
        full = [torch.randn(cu[-1], 2, 8, dtype=torch.float64) for _ in range(3)]
        q, k, v = (usp.shard_varlen(t, cu, mesh).requires_grad_() for t in full)
        out = usp.long_context_attention_varlen(q, k, v, cu, None, mesh)
    else:
        full = [torch.randn(1, 4 * mesh.ulysses * mesh.ring, 2, 8, dtype=torch.float64) for _ in range(3)]
        q, k, v = (usp.shard(t, mesh).requires_grad_() for t in full)
        out = usp.long_context_attention(q, k, v, mesh)
    try:
        torch.autograd.grad(out.square().sum(), (q, k, v), create_graph=True)
    except ValueError as error:
        return str(error)
    return None


def _world_main(rank, world_size, meshes):
    import usp

    device = torch.device("cpu")
    results = {"dense": [], "masked": [], "varlen": [], "deterministic": {}, "double_backward": {}}
    for u, r in meshes:
        results["dense"] += run_cases(_dense_cases(u, r), device)
        mesh = usp.SequenceParallelMesh(ulysses=u, ring=r)
        results["masked"] += [run_mask_case(case, mesh) for case in _mask_cases(u, r)]
        for case in _varlen_cases(u, r):
            results["varlen"].append(run_varlen_case(case, mesh, device))
        for varlen in (False, True):
            key = f"{u}x{r} {'varlen' if varlen else 'dense'}"
            results["deterministic"][key] = _bitwise_runs(mesh, varlen)
            results["double_backward"][key] = _double_backward_refused(mesh, varlen)
    if world_size == 2:  # a 1x1 mesh (data-parallel 2): the plain kernel path refuses too
        results["double_backward"]["1x1 dense"] = _double_backward_refused(usp.SequenceParallelMesh(), False)
    return results


@pytest.fixture(scope="module", params=sorted(MESHES))
def world_results(request):
    return request.param, run_world(request.param, _world_main, MESHES[request.param], timeout=500)


@pytest.mark.timeout(600)
def test_every_schedule_honours_the_kernel_contract(world_results):
    """Dense and packed, every mesh: no contract violation (the checker raises inside the world, which fails it),
    and results within the usual bound of the fp64 reference, collective counts included."""
    world_size, per_rank = world_results
    failures = []
    for rank, results in enumerate(per_rank):
        for result in results["dense"]:
            failures += [f"rank {rank} {Case(**result['case']).name()}: {p}" for p in check_result(result)]
        for result in results["masked"]:
            failures += [f"rank {rank} {MaskCase(**result['case']).name()}: {p}" for p in check_mask_result(result)]
        for result in results["varlen"]:
            failures += [f"rank {rank} {VarlenCase(**result['case']).name()}: {p}" for p in check_varlen_result(result)]
    assert not failures, "\n".join(failures[:30])
    kernels = {result["kernel"] for result in per_rank[0]["dense"] + per_rank[0]["varlen"]}
    assert kernels == {"contract_checked_reference"}
    assert all(MaskCase(**r["case"]).backend == CHECKED for r in per_rank[0]["masked"])
    assert any(VarlenCase(**r["case"]).window != (-1, -1) for r in per_rank[0]["varlen"])  # packed windows ran
    assert any(Case(**r["case"]).batch == 2 for r in per_rank[0]["dense"])  # strided row slices were exercised
    assert any(Case(**r["case"]).head_chunks > 1 for r in per_rank[0]["dense"])


@pytest.mark.timeout(600)
def test_deterministic_mode_is_bitwise_over_three_runs(world_results):
    _, per_rank = world_results
    for rank, results in enumerate(per_rank):
        assert results["deterministic"] and all(results["deterministic"].values()), (rank, results["deterministic"])


@pytest.mark.timeout(600)
def test_double_backward_is_refused_on_every_mesh(world_results):
    _, per_rank = world_results
    for rank, results in enumerate(per_rank):
        for mesh, message in results["double_backward"].items():
            assert message is not None, f"rank {rank} {mesh}: create_graph=True was not refused"
            assert "create_graph=True" in message and "create_graph=False" in message, message


# ------------------------------------------------------------------------------------------ single process
def test_checker_rejects_a_strided_lse_and_accepts_the_ring_copy():
    """The fa2 bug in miniature: a row slice of the LSE is strided; the checker refuses it, the ring's copy passes."""
    from usp.kernels.contract import ContractCheckingKernel, KernelContractError
    from usp.kernels.reference import ReferenceKernel
    from usp.ring import _KernelLse

    kernel = ContractCheckingKernel(ReferenceKernel())
    q, k, v = (torch.randn(1, 8, 2, 4) for _ in range(3))
    out, lse = kernel.forward(q, k, v, False, 0.5)
    rows = slice(4, 8)
    args = (out[:, rows], q[:, rows], k, v, out[:, rows])
    with pytest.raises(KernelContractError, match="lse must be contiguous"):
        kernel.backward(*args, lse[:, :, rows], False, 0.5)
    copied = _KernelLse(lse)
    assert copied.rows(rows) is copied.rows(rows)  # one copy per slice and backward pass
    kernel.backward(*args, copied.rows(rows), False, 0.5)
    with pytest.raises(KernelContractError, match="causal=True on a non-square block"):
        kernel.forward(q[:, rows], k, v, True, 0.5)
    with pytest.raises(KernelContractError, match="last dim"):
        kernel.forward(q.transpose(-1, -2).contiguous().transpose(-1, -2), k, v, False, 0.5)


def test_deterministic_refuses_a_kernel_without_one():
    from usp.kernels import resolve_backend
    from usp.kernels.reference import ReferenceKernel
    from usp.kernels.varlen import resolve_varlen_backend

    class NonDeterministic(ReferenceKernel):
        name = "atomic_reference"
        deterministic_backward = False

    with pytest.raises(ValueError, match="'atomic_reference' has no deterministic backward"):
        resolve_backend(NonDeterministic(), "cpu", torch.float32, 64, deterministic=True)
    assert resolve_backend(NonDeterministic(), "cpu", torch.float32, 64).name == "atomic_reference"
    assert resolve_backend("auto", "cpu", torch.float32, 64, deterministic=True).name == "reference"
    assert resolve_varlen_backend("auto", "cpu", torch.float32, 64, deterministic=True).name == "reference"
    # cuDNN has no deterministic backward: named, it is refused for that reason wherever it would otherwise run
    from usp.kernels import BACKENDS

    assert BACKENDS["cudnn"].deterministic_backward is False
    assert all(BACKENDS[name].deterministic_backward for name in ("fa2", "torch_flash", "reference"))
    with pytest.raises(TypeError, match="deterministic must be a bool"):
        from usp.attention import check_deterministic

        check_deterministic(1)


def test_kernel_sinks_match_the_sinks_applied_around_the_kernel():
    """Note [kernel sinks]: a kernel taking the sinks (the reference, GQA, a window) returns what applying them
    around it does (``apply_sinks``, ``sink_grad``); the checker refuses sinks where the kernel claims no support
    and a wrong dtype."""
    from usp.kernels.base import Mask
    from usp.kernels.contract import ContractCheckingKernel, KernelContractError
    from usp.kernels.reference import ReferenceKernel
    from usp.ring import apply_sinks, sink_grad

    gen = torch.Generator().manual_seed(3)
    q, dout = (torch.randn(2, 9, 4, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(2, 9, 2, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    sinks = torch.randn(4, generator=gen, dtype=torch.float64)
    kernel, mask = ContractCheckingKernel(ReferenceKernel()), Mask(3, 0, 2.0)
    out, lse = kernel.forward(q, k, v, mask, 0.3, sinks=sinks)
    plain_out, plain_lse = kernel.forward(q, k, v, mask, 0.3)
    around_out, around_lse = apply_sinks(plain_out, plain_lse, sinks)
    torch.testing.assert_close(out, around_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, around_lse, rtol=1e-12, atol=1e-12)
    dq, dk, dv, dsinks = kernel.backward(dout, q, k, v, out, lse, mask, 0.3, sinks=sinks)
    for got, want in zip((dq, dk, dv), kernel.backward(dout, q, k, v, out, lse, mask, 0.3)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dsinks, sink_grad(dout, out, lse, sinks), rtol=1e-10, atol=1e-12)
    assert dsinks.abs().min() > 0  # every head's sink has a gradient here: the check above is not vacuous
    with pytest.raises(KernelContractError, match="without sink support"):
        ContractCheckingKernel(ReferenceKernel(), native_sinks=False).forward(q, k, v, mask, 0.3, sinks=sinks)
    with pytest.raises(KernelContractError, match="sinks has dtype"):
        kernel.forward(q, k, v, mask, 0.3, sinks=sinks.float())
