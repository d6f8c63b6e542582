"""Packed variable-length documents (``usp.varlen``): layout, kernels, and the distributed path against a per-document
fp64 reference, on CPU with gloo.

Each world size (2, 4, 8 ranks) is started once (module fixture) and runs every case of every mesh of that size plus
the validation checks; the cases and the pass rule are in ``varlen_cases.py``.
"""
from __future__ import annotations

import re

import pytest
import torch

from distributed import run_world
from usp.kernels.varlen import (
    ReferenceVarlenKernel,
    VarlenBlock,
    VarlenBlockKernel,
    VarlenCall,
    VarlenSeqs,
    resolve_varlen_backend,
)
from usp.varlen import VarlenSchedule, _build_layout
from varlen_cases import (
    EXPECTED_ERRORS,
    VarlenCase,
    cases_for,
    check_varlen_result,
    module_check,
    per_document_reference,
    run_varlen_case,
    scenario_lengths,
    validation_checks,
)

MESHES = {2: [(1, 2), (2, 1)], 4: [(2, 2), (1, 4), (4, 1)], 8: [(2, 4), (4, 2)]}


def _world_main(rank, world_size, meshes, full):
    import usp

    torch.manual_seed(1234)  # every rank draws the same inputs in validation_checks
    device = torch.device("cpu")
    out = {"cases": [], "validation": {}, "module": {}}
    for u, r in meshes:
        mesh = usp.SequenceParallelMesh(ulysses=u, ring=r)
        for case in cases_for(u, r, full=full):
            out["cases"].append(run_varlen_case(case, mesh, device))
        out["validation"][f"{u}x{r}"] = validation_checks(mesh)
        out["module"][f"{u}x{r}"] = module_check(mesh, device)
    return out


@pytest.fixture(scope="module", params=sorted(MESHES))
def world_results(request):
    world_size = request.param
    # 8 ranks on the CPU machine's 2 cores: the reduced case list
    return world_size, run_world(world_size, _world_main, MESHES[world_size], world_size < 8, timeout=240)


@pytest.mark.timeout(300)
def test_varlen_matches_per_document_reference(world_results):
    world_size, per_rank = world_results
    failures = []
    for rank, results in enumerate(per_rank):
        for result in results["cases"]:
            for problem in check_varlen_result(result):
                failures.append(f"rank {rank} {VarlenCase(**result['case']).name()}: {problem}")
    assert not failures, "\n".join(failures[:40])
    # every mesh ran every case on every rank
    assert len({len(r["cases"]) for r in per_rank}) == 1
    # Note [document placement] was exercised: "placed" cuts some documents and places some whole on every ring
    # rank of a ring > 1; "all_whole" cuts none (and then nothing travels: the collective counts above)
    for result in per_rank[0]["cases"]:
        case = VarlenCase(**result["case"])
        cut, *whole = result["placement"]
        if case.ring > 1 and case.scenario == "placed":
            assert cut >= 1 and min(whole) >= 1, (case.name(), result["placement"])
        if case.ring > 1 and case.scenario == "all_whole":
            assert cut == 0 and not result["documents_cut"], (case.name(), result["placement"])


@pytest.mark.timeout(300)
def test_varlen_bad_inputs_raise_on_every_rank(world_results):
    _, per_rank = world_results
    failures = []
    for rank, results in enumerate(per_rank):
        for mesh_name, checks in results["validation"].items():
            for check, (kind, message) in checks.items():
                want_kind, pattern = EXPECTED_ERRORS[check]
                if kind != want_kind or not re.search(pattern, message):
                    failures.append(f"rank {rank} mesh {mesh_name} {check}: got {kind}: {message!r}")
    assert not failures, "\n".join(failures)


@pytest.mark.timeout(300)
def test_varlen_module_equals_functional(world_results):
    _, per_rank = world_results
    failures = [f"rank {rank} mesh {mesh}: {check}" for rank, results in enumerate(per_rank)
                for mesh, checks in results["module"].items() for check, ok in checks.items() if not ok]
    assert not failures, "\n".join(failures)


# ---------------------------------------------------------------------------------------------- single process
@pytest.mark.parametrize("ulysses,ring,causal", [(1, 2, True), (2, 2, True), (4, 2, False), (2, 4, True),
                                                 (3, 1, True), (1, 3, False), (2, 3, True)])
@pytest.mark.parametrize("scenario", ["short", "one_doc", "tiny_many", "exact", "mixed", "placed", "all_whole"])
def test_layout_places_every_token_once(ulysses, ring, causal, scenario):
    lengths = scenario_lengths(scenario, ulysses, ring)
    cu = tuple(torch.tensor((0,) + lengths).cumsum(0).tolist())
    layout = _build_layout(cu, ulysses, ring, causal)
    seen, padding = [], 0
    for r in range(ring):
        for u in range(ulysses):
            packed, position = layout.local_rows(u, r)
            assert packed.numel() == layout.local_tokens
            real = packed >= 0
            seen.append(packed[real])
            padding += int((~real).sum())
            # positions restart at every document
            doc_start = torch.tensor(cu[:-1])[torch.searchsorted(torch.tensor(cu[1:]), packed[real], right=True)]
            assert torch.equal(position[real], packed[real] - doc_start)
    assert torch.equal(torch.sort(torch.cat(seen)).values, torch.arange(cu[-1]))
    assert padding == layout.padding == layout.padded_total - cu[-1]
    assert layout.ring_tokens % ulysses == 0
    if scenario == "exact":
        assert layout.padding == 0


def _causal_work(layout, ring_rank):
    """Real (query, key) pairs a ring rank's queries attend under causal masking: sum of (position + 1)."""
    packed, position = layout.ring_rows(ring_rank)
    return int((position[packed >= 0] + 1).sum())


def test_layout_balances_causal_work_per_document():
    # one long document and many short ones: contiguous cutting would give the last ring rank most of the work
    lengths = (4096,) + (37, 5, 1, 200, 3) * 20
    cu = tuple(torch.tensor((0,) + lengths).cumsum(0).tolist())
    layout = _build_layout(cu, 1, 4, True)
    work = [_causal_work(layout, r) for r in range(4)]
    assert max(work) / min(work) < 1.02, work
    # the kernel work (every call's rows, padding included) is identical on every rank by construction
    assert len({tuple(layout.chunk_sizes)}) == 1


def test_reference_varlen_kernel_matches_per_document_dense_with_empty_sequences():
    torch.manual_seed(0)
    lengths = (3, 0, 5, 1, 4)
    total, h, kvh, d, scale = sum(lengths), 4, 2, 8, 0.3
    q, dout = torch.randn(total, h, d, dtype=torch.float64), torch.randn(total, h, d, dtype=torch.float64)
    k, v = torch.randn(total, kvh, d, dtype=torch.float64), torch.randn(total, kvh, d, dtype=torch.float64)
    kernel = ReferenceVarlenKernel()
    for causal in (True, False):
        seqs = VarlenSeqs(lengths, lengths)
        out, lse = kernel.forward(q, k, v, seqs, causal, scale)
        grads = kernel.backward(dout, q, k, v, out, lse, seqs, causal, scale)
        truth = per_document_reference(q, k, v, dout, lengths, causal, scale)
        for got, want in zip((out, lse) + tuple(grads), truth.values()):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_causal_varlen_is_bottom_right_aligned():
    torch.manual_seed(2)
    q, k, v = torch.randn(2, 1, 8, dtype=torch.float64), torch.randn(5, 1, 8, dtype=torch.float64), \
        torch.randn(5, 1, 8, dtype=torch.float64)
    out, lse = ReferenceVarlenKernel().forward(q, k, v, VarlenSeqs([2], [5]), True, 1.0)
    scores = (q[:, 0] @ k[:, 0].T)
    scores[0, 4] = float("-inf")  # query 0 (aligned to key 3) must not see key 4
    torch.testing.assert_close(lse[0], torch.logsumexp(scores, -1), rtol=1e-12, atol=1e-12)


def test_block_kernel_enforces_empty_sequence_semantics():
    torch.manual_seed(3)
    # query seq 0 has no keys; key seq 2 has no queries
    seqs = VarlenSeqs([2, 3, 0], [0, 4, 2])
    q, dout = torch.randn(1, 5, 2, 8, dtype=torch.float64), torch.randn(1, 5, 2, 8, dtype=torch.float64)
    k, v = torch.randn(1, 6, 2, 8, dtype=torch.float64), torch.randn(1, 6, 2, 8, dtype=torch.float64)
    block = VarlenBlock([VarlenCall(slice(0, 5), slice(0, 6), seqs, False)], 5, 6)

    class Garbage(ReferenceVarlenKernel):
        """A kernel that writes garbage where sequences are empty (what a GPU kernel may leave there)."""

        def forward(self, *args):
            out, lse = super().forward(*args)
            out[:2] = float("nan")
            lse[:, :2] = float("inf")
            return out, lse

        def backward(self, *args, **kwargs):
            dq, dk, dv = super().backward(*args, **kwargs)
            dq[:2], dk[4:], dv[4:] = 7.0, float("nan"), 3.0
            return dq, dk, dv

    for kernel in (ReferenceVarlenKernel(), Garbage()):
        adapter = VarlenBlockKernel(kernel)
        out, lse = adapter.forward(q, k, v, block, 0.5)
        dq, dk, dv = adapter.backward(dout, q, k, v, out, lse, block, 0.5)
        assert (out[0, :2] == 0).all() and torch.isneginf(lse[0, :, :2]).all()
        assert (dq[0, :2] == 0).all() and (dk[0, 4:] == 0).all() and (dv[0, 4:] == 0).all()
        assert torch.isfinite(out).all() and torch.isfinite(dq).all()


def test_zigzag_blocks_equal_one_call_per_document():
    """The three-call diagonal block (heads x heads, tails x heads, tails x tails) merged equals causal attention
    over each document's real [head, tail] rows computed in one call; padding rows come out zero."""
    torch.manual_seed(4)
    cu = (0, 9, 10, 23)
    layout = _build_layout(cu, 1, 2, True)
    assert layout.cut_docs == (0, 1, 2)  # too few documents to place any whole
    schedule = VarlenSchedule(layout)
    task = schedule.block(0, 0, 2, layout.ring_tokens)
    c = sum(layout.chunk_sizes)
    s, h, d = 2 * c, 2, 8
    q, k, v, dout = (torch.randn(1, s, h, d, dtype=torch.float64) for _ in range(4))
    adapter = VarlenBlockKernel(ReferenceVarlenKernel())
    out, lse = adapter.forward(q, k, v, task.kernel_mask, 0.4)
    grads = adapter.backward(dout, q, k, v, out, lse, task.kernel_mask, 0.4)
    # ring rank 0 holds chunks 0 (head) and 3 (tail) of every document: its real rows, document by document
    packed, position = layout.ring_rows(0)
    starts = torch.tensor(layout.chunk_sizes).cumsum(0) - torch.tensor(layout.chunk_sizes)
    order, sizes = [], []
    for a, n in zip(starts.tolist(), layout.chunk_sizes):
        rows = [i for i in list(range(a, a + n)) + list(range(c + a, c + a + n)) if packed[i] >= 0]
        order += rows
        sizes.append(len(rows))
    order = torch.tensor(order)
    want = per_document_reference(*(x[0, order] for x in (q, k, v, dout)), sizes, True, 0.4)
    torch.testing.assert_close(out[0, order], want["out"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse[0][:, order], want["lse"], rtol=1e-12, atol=1e-12)
    for got, name in zip(grads, ("dq", "dk", "dv")):
        torch.testing.assert_close(got[0, order], want[name], rtol=1e-12, atol=1e-12)
    padding = packed < 0
    assert padding.any() and (out[0, padding] == 0).all() and torch.isneginf(lse[0][:, padding]).all()
    assert all((g[0, padding] == 0).all() for g in grads)


def test_block_rows_no_call_reaches_have_no_keys():
    """A windowed block need not cover every row: rows no call reaches come out as out = 0, lse = -inf, zero
    gradients (and a block of no calls is all of that); calls must still match their rows."""
    seqs = VarlenSeqs([2], [2])
    with pytest.raises(ValueError, match="does not match its rows"):
        VarlenBlock([VarlenCall(slice(0, 3), slice(0, 2), seqs, False)], 3, 2)
    torch.manual_seed(2)
    q, k, v, dout = (torch.randn(1, 4, 2, 8, dtype=torch.float64) for _ in range(4))
    adapter = VarlenBlockKernel(ReferenceVarlenKernel())
    for block in (VarlenBlock([VarlenCall(slice(1, 3), slice(0, 2), seqs, False)], 4, 4), VarlenBlock([], 4, 4)):
        out, lse = adapter.forward(q, k, v, block, 0.5)
        dq, dk, dv = adapter.backward(dout, q, k, v, out, lse, block, 0.5)
        assert not block.single and out.dtype == torch.float64
        covered = [1, 2] if block.calls else []
        others = [i for i in range(4) if i not in covered]
        assert (out[0, others] == 0).all() and torch.isneginf(lse[0][:, others]).all()
        assert (dq[0, others] == 0).all() and (dk[0, 2:] == 0).all() and (dv[0, 2:] == 0).all()
        if covered:
            want = ReferenceVarlenKernel().forward(q[0, 1:3], k[0, :2], v[0, :2], seqs, False, 0.5)
            torch.testing.assert_close(out[0, 1:3], want[0])


def test_windowed_varlen_schedule_groups_documents_by_mask():
    """Note [varlen windows]: every call has one mask, each document at most one piece per call, documents of one
    chunk size share a call, and a ring step that no document's window reaches is skipped."""
    from usp.kernels.base import Mask

    layout = _build_layout((0, 40, 80, 81, 83, 123), 1, 4, True)
    # Note [document placement]: the three documents of 40 cut (chunks of 5), those of 1 and 2 tokens whole
    assert layout.cut_docs == (0, 1, 4) and layout.chunk_sizes == (5, 5, 5) and layout.whole_docs[1] == (2,)
    schedule = VarlenSchedule(layout, 0.0, (3, 0))
    diagonal = schedule.block(0, 1, 4, layout.ring_tokens).mask
    assert all(isinstance(call.mask, Mask) for call in diagonal.calls)
    # heads x heads: the documents of 5 rows share one window (3, 0) call
    heads = [call for call in diagonal.calls if call.q == slice(0, 15) and call.k == slice(0, 15)]
    assert [(c.mask.left, c.mask.right) for c in heads] == [(3, 0)]
    # the whole document (1 token, within the window) and the padding after it: one call over the whole section
    whole = [call for call in diagonal.calls if call.q.start == 30]
    assert len(whole) == 1 and whole[0].q == slice(30, layout.ring_tokens)
    assert whole[0].seqs.q_lengths[0] == 1 and whole[0].seqs.k_lengths[0] == 1
    # chunks of 5 and a window of 3: only neighbouring chunks meet; the steps that bring none are skipped
    even = _build_layout((0, 40, 80, 120), 1, 4, True)
    windowed = VarlenSchedule(even, 0.0, (3, 0))
    skipped = [(step, rank) for rank in range(4) for step in range(1, 4)
               if windowed.block(step, rank, 4, even.ring_tokens) is None]
    assert (2, 1) in skipped and (1, 1) not in skipped
    assert VarlenSchedule(layout, 0.0, (200, 0)).window is None  # binds on no document: the dense calls


def test_resolve_varlen_backend_names_valid_values():
    assert resolve_varlen_backend("auto", torch.device("cpu"), torch.float32, 64).name == "reference"
    with pytest.raises(ValueError, match=r"backend='fa3' has no varlen kernel; valid values .*'fa2'.*'reference'"):
        resolve_varlen_backend("fa3", torch.device("cpu"), torch.float32, 64)
    with pytest.raises(TypeError, match="backend must be a str or usp.kernels.varlen.VarlenKernel"):
        resolve_varlen_backend(3, torch.device("cpu"), torch.float32, 64)


def test_row_sums_copy_add_and_zero_the_rest():
    """The block adapter's gradient sums (no zero-filled buffer): copy onto fresh rows, add onto written ones, zero
    the gaps of a partly written range and every row no call reached."""
    from usp.kernels.varlen_block import _RowSums

    like = torch.empty(10, 1, 1)
    sums = _RowSums(like, torch.float64)
    want = torch.zeros(10, 1, 1, dtype=torch.float64)
    for rows, value in (((2, 4), 1.0), ((2, 4), 2.0), ((6, 7), 5.0), ((3, 8), 0.5)):
        grad = torch.full((rows[1] - rows[0], 1, 1), value, dtype=torch.float64)
        sums.add(rows, grad)
        want[rows[0]:rows[1]] += grad
    assert torch.equal(sums.finish(), want)


def test_calls_split_where_row_offsets_would_overflow(monkeypatch):
    """Note [varlen row offsets]: where a sequence would start 2**31 elements or more into a tensor, torch_flash's
    calls run as several over consecutive runs of sequences; the runs' results equal one call's. Checked with the
    reference kernel and the limit lowered to a few rows (the real one needs 2**31-element tensors: GPU only)."""
    import usp.kernels.varlen as varlen_kernels

    torch.manual_seed(5)
    # GQA 4/2, one query sequence without keys and one key sequence without queries in the middle
    q_len, k_len = [3, 5, 2, 0, 4, 1, 6], [3, 5, 0, 2, 4, 1, 6]
    seqs = VarlenSeqs(q_len, k_len)
    q, dout = (torch.randn(sum(q_len), 4, 8, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(sum(k_len), 2, 8, dtype=torch.float64) for _ in range(2))
    kernel = ReferenceVarlenKernel()
    out, lse = kernel.forward(q, k, v, seqs, True, 0.5)
    grads = kernel.backward(dout, q, k, v, out, lse, seqs, True, 0.5)
    assert len(seqs.runs(*(varlen_kernels._OFFSET_LIMIT,) * 2)) == 1
    runs = {}
    for rows in (4, 7, 9):  # the limit: a run spans at most `rows` query rows (or is one sequence)
        monkeypatch.setattr(varlen_kernels, "_OFFSET_LIMIT", rows * 4 * 8 + 1)
        runs[rows] = seqs.runs(rows, 2 * rows)
        assert runs[rows] == seqs.runs(varlen_kernels._row_limit(q), varlen_kernels._row_limit(k, v))
        assert len(runs[rows]) > 1 and runs[rows][0][1] == 0 and runs[rows][-1][2] == sum(q_len)
        assert all(a[2] == b[1] and a[4] == b[3] for a, b in zip(runs[rows], runs[rows][1:]))  # they tile the rows
        for part, qa, qb, ka, kb in runs[rows]:
            assert (qb - qa <= rows and kb - ka <= 2 * rows) or len(part.q_lengths) == 1
        got_out, got_lse = varlen_kernels.forward_in_runs(
            lambda *a: kernel.forward(*a, True, 0.5), q, k, v, seqs)
        torch.testing.assert_close(got_out, out, rtol=1e-12, atol=1e-12)  # fp64: other matmul sizes round apart
        torch.testing.assert_close(got_lse, lse, rtol=1e-12, atol=1e-12)
        got = varlen_kernels.backward_in_runs(
            lambda *a: kernel.backward(*a, True, 0.5), dout, q, k, v, out, lse, seqs)
        for g, want in zip(got, grads):
            torch.testing.assert_close(g, want, rtol=1e-12, atol=1e-12)
