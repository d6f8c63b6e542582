"""The planner on packed documents (issue 14 part 2): inputs, the cost model against the recorded varlen runs,
the spec's varlen facts against the runtime's schedule, ``usp.choose`` and the CLI."""
import hashlib
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import usp
from usp import planner, spec
from usp.planner import batch
from usp.planner.cost import CostModel, Shape

DATA = Path(__file__).resolve().parents[2] / "benchmarks" / "data" / "varlen_torch_flash_20261125.json"
RECORDS = json.loads(DATA.read_text())["records"]


def recorded_predict(topo, kernel, ulysses, ring, heads, kv_heads, causal, lengths):
    """``planner.predict`` of one split for the recorded runs, priced on the layout they ran with (every document
    cut: ``doc_placement="cut_all"``, the layout before Note [document placement])."""
    sp = ulysses * ring
    shape = Shape(seqlen=int(np.sum(lengths)), heads=heads, kv_heads=kv_heads, causal=causal)
    f, b, _, cost = batch.evaluate_batch(CostModel(topo, sp, sp), shape, batch.documents(lengths=lengths), ulysses,
                                         ring, "ulysses_inner", kernel, doc_placement="cut_all")
    return f.total + b.total, cost


def recorded_errors():
    """``[(kind, total, what, predicted / measured - 1)]``: the varlen kernel alone on 1 GPU (whole and half
    documents) and usp on 2x H100 (1x2, 2x1), torch_flash, 32/8 heads, causal. The runs used the layout before
    Note [document placement] (every document cut), which is what is priced here."""
    topo = planner.load_topology("h100-nvlink-2x")
    kernel, _ = topo.kernel("torch_flash", "bfloat16", 128)
    out = []
    for r in RECORDS:
        lengths = np.array(r.get("doc_lengths") or [r["total_tokens"]])
        shape = Shape(seqlen=int(lengths.sum()), heads=r["heads"], kv_heads=r["kv_heads"], causal=r["causal"])
        for what, docs, ms in (("1gpu", lengths, r["t1_ms"]), ("1gpu-half", -(-lengths // 2),
                                                                r["t_kernel_local_shard_ms"])):
            f, b, _, _ = batch.evaluate_batch(CostModel(topo, 1, 1), shape, batch.documents(lengths=docs), 1, 1,
                                              "ulysses_inner", kernel, doc_placement="cut_all")
            out.append((r["kind"], r["total_tokens"], what, (f.total + b.total) * 1e3 / ms - 1))
        for mesh, m in r["meshes"].items():
            u, ring = map(int, mesh.split("x"))
            total, cost = recorded_predict(topo, kernel, u, ring, r["heads"], r["kv_heads"], r["causal"], lengths)
            assert cost.padding == m["padding_tokens"]  # the layout's padding, as recorded
            out.append((r["kind"], r["total_tokens"], mesh, total * 1e3 / m["tp_ms"] - 1))
    return out


def test_recorded_varlen_runs_are_predicted():
    errs = recorded_errors()
    assert len(errs) == 16
    for e in errs:
        print(f"{e[0]:7s} {e[1]:7d} {e[2]:10s} {e[3]:+.1%}")
    # achieved: every one within +-4.3% (mean +1.1%); issue 14's target is +-15%
    assert max(abs(e[3]) for e in errs) <= 0.05
    assert abs(np.mean([e[3] for e in errs])) <= 0.03


def test_recorded_pick_is_the_faster_split():
    topo = planner.load_topology("h100-nvlink-2x")
    kernel, _ = topo.kernel("torch_flash", "bfloat16", 128)
    for r in RECORDS:
        if r["kind"] != "varlen":
            continue
        predicted = {mesh: recorded_predict(topo, kernel, *map(int, mesh.split("x")), 32, 8, True,
                                            r["doc_lengths"])[0] for mesh in r["meshes"]}
        fastest = min(r["meshes"], key=lambda k: r["meshes"][k]["tp_ms"])
        assert min(predicted, key=predicted.get) == fastest
        # plan prices the batch as the runtime now places it (Note [document placement])
        p = planner.plan(2, None, 32, 8, topology="h100-nvlink-2x", kernel="torch_flash",
                         doc_lengths=r["doc_lengths"])
        assert p.documents["documents"] == r["documents"]
        assert "padding tokens" in p.summary()
        one_by_two = next(c for c in p.candidates if (c.ulysses, c.ring) == (1, 2))
        assert one_by_two.batch["padding"] < r["meshes"]["1x2"]["padding_tokens"]


LAYOUT_BATCHES = {
    "mixed": (0, 700, 713, 1000, 1001, 1500),         # R > 1: the long documents cut, the short ones whole
    "all_whole": tuple(range(0, 6401, 100)),           # 64 equal documents: none cut, nothing travels
    "one_doc": (0, 1037),                              # one document: cut
    "placed": (0,) + tuple(np.cumsum((800, 480) + tuple(3 + (i * 5) % 7 for i in range(60))).tolist()),
}


@pytest.mark.parametrize("name", sorted(LAYOUT_BATCHES))
@pytest.mark.parametrize("ulysses,ring,causal", [(1, 2, True), (2, 2, True), (1, 4, False), (4, 1, True),
                                                 (2, 4, True), (3, 1, False), (3, 2, True), (2, 3, False)])
def test_layout_facts_match_the_runtime(name, ulysses, ring, causal):
    pytest.importorskip("torch")
    from usp.varlen import _build_layout, _schedule_for_layout

    cu = LAYOUT_BATCHES[name]
    layout = _build_layout(cu, ulysses, ring, causal)
    lengths = np.diff(cu)
    owner = batch.placement_owner(lengths, ring, causal)
    assert tuple(np.flatnonzero(owner < 0)) == (layout.cut_docs if ring > 1 else tuple(range(len(lengths))))
    for r in range(ring):
        assert tuple(np.flatnonzero(owner == r)) == layout.whole_docs[r]
    cost = batch.batch_compute(lengths, ulysses, ring, causal, 12, 12, 64, 2, 1,
                               batch._rates(planner.load_topology("h100-nvlink-2x").kernel("torch_flash",
                                                                                          "bfloat16", 128)[0], 1.0),
                               "torch_flash", None)
    assert (cost.padding, cost.local_tokens, cost.padded_total) == (layout.padding, layout.local_tokens,
                                                                    layout.padded_total)
    assert (cost.ring_tokens, cost.cut_rows) == (layout.ring_tokens, layout.cut_rows)
    assert (cost.cut_documents, cost.whole_documents) == (len(layout.cut_docs),
                                                          sum(len(w) for w in layout.whole_docs))
    assert spec.varlen_chunks_per_doc(ring, causal) == layout.chunks_per_doc
    schedule = _schedule_for_layout(layout)
    assert cost.steps == schedule.steps(ring)
    busiest = 0
    for r in range(ring):
        calls = 0
        for step in range(schedule.steps(ring)):
            block = schedule.block(step, r, ring, layout.ring_tokens)
            # the cut section's calls are the spec's; step 0 adds one for the rank's whole documents
            expected = (len(spec.varlen_block_calls(ring, causal, step, r)) if layout.cut_docs else 0) + (
                1 if step == 0 and layout.whole_docs[r] else 0)
            assert len(block.mask.calls) == expected
            calls += len(block.mask.calls)
        busiest = max(busiest, calls)
    assert cost.calls_per_pass == busiest
    if name == "all_whole" and ring > 1:
        assert cost.cut_rows == 0 and cost.steps == 1


def random_batches(seed: int = 3, count: int = 40):
    rng = np.random.default_rng(seed)
    for i in range(count):
        n = int(rng.integers(1, 400))
        kind = i % 5
        if kind == 0:
            yield rng.integers(1, 4096, n)
        elif kind == 1:  # long-tailed
            yield np.minimum((64 * (1 - rng.random(n)) ** (-1 / 1.1)).astype(int), 2 ** 16) + 1
        elif kind == 2:  # many ties
            yield rng.choice([7, 64, 128, 1000, 5000], n)
        elif kind == 3:  # short documents and a few long ones
            yield np.concatenate([rng.integers(1, 300, n), rng.integers(10000, 40000, int(rng.integers(0, 4)))])
        else:  # fewer documents than ring ranks, or a handful
            yield rng.integers(1, 2000, int(rng.integers(1, 9)))


def test_placement_keeps_its_rule():
    """``usp.spec.varlen_placement`` on random batches: every document placed once, the cut ones the longest, and
    a placement with whole documents keeps its bounds (busiest rank's work at most the all-cut work per rank and
    within 1/WORK_SLACK of the mean, tokens within 1/PLACEMENT_SLACK of the mean); ``usp.choose``'s cached copy is
    the same; the mixed cases (some
    cut, some whole) are exercised."""
    mixed = 0
    for lengths in random_batches():
        for ring in (2, 3, 4, 8):
            for causal in (True, False):
                owner = batch.placement_owner(lengths, ring, causal)
                assert np.array_equal(batch.fast_placement_owner(lengths, ring, causal), owner)
                cut = owner < 0
                if cut.all():
                    continue
                if cut.any():
                    assert lengths[cut].min() >= lengths[~cut].max()
                chunks = spec.varlen_chunks_per_doc(ring, causal)
                cut_work = sum(spec.varlen_cut_work(int(n), ring, causal) for n in lengths[cut])
                cut_rows = sum(-(-int(n) // chunks) * chunks for n in lengths[cut])
                every_cut = sum(spec.varlen_cut_work(int(n), ring, causal) for n in lengths)
                works = [ring * sum(spec.varlen_doc_work(int(n), causal) for n in lengths[owner == r]) + cut_work
                         for r in range(ring)]
                assert max(works) * ring * spec.WORK_SLACK <= (spec.WORK_SLACK + 1) * sum(works) + ring * len(lengths)
                for r in range(ring):
                    mine = lengths[owner == r]
                    work = works[r]
                    assert work <= every_cut + len(lengths), (lengths, ring, causal)  # the spec sums to a unit each
                    tokens = ring * int(mine.sum()) + cut_rows
                    slack = spec.PLACEMENT_SLACK
                    assert tokens * slack <= (slack + 1) * int(lengths.sum()), (lengths, ring, causal)
                mixed += bool(cut.any())
    assert mixed >= 50


#: sha256 of ``usp.spec.varlen_owners`` on ``random_batches(seed=7, count=60)`` x rings 2, 3, 4, 8 x causal, recorded
#: from the rule as it stood before its speed-up (bc07ba3): the runtime and the planner both place with it, so a
#: faster rule must place every document the same
PLACEMENT_DIGEST = "bd4992217baa1ec3b26d821b3b87cd55610d32a0d04c81cf516a028f1faedbbe"


def test_placement_is_pinned():
    digest = hashlib.sha256()
    for lengths in random_batches(seed=7, count=60):
        for ring in (2, 3, 4, 8):
            for causal in (True, False):
                digest.update(repr(spec.varlen_owners(lengths.tolist(), ring, causal)).encode())
    assert digest.hexdigest() == PLACEMENT_DIGEST


def test_placement_kept_per_batch_is_the_same():
    """The per-batch part of a placement is kept for the ring degrees of the same batch: a caller that changes
    the owners it got, a tuple for a list, or a new batch of the same lengths gets the same placement."""
    lengths = [60000, 50000] + [1000, 37, 5] * 100
    first = spec.varlen_owners(lengths, 4, True)
    assert min(first) == -1 and max(first) >= 0  # some cut, some whole
    first_copy = list(first)
    first[:] = [9] * len(first)
    assert spec.varlen_owners(tuple(lengths), 4, True) == first_copy
    assert spec.varlen_owners(lengths, 8, True) != first_copy  # another ring degree, another placement
    batch.forget_placements()
    assert spec.varlen_owners(lengths, 4, True) == first_copy


def test_ring_traffic_is_the_cut_section():
    """The ring moves the cut documents' rows only; with no document cut, it moves nothing in one step."""
    topo = planner.load_topology("dgx-h100")
    kernel, _ = topo.kernel("torch_flash", "bfloat16", 128)
    model = CostModel(topo, 8, 8)
    shape = Shape(seqlen=1, heads=32, kv_heads=8)
    none_cut = batch.documents(lengths=[4096] * 64)
    f, b, memory, cost = batch.evaluate_batch(model, shape, none_cut, 2, 4, "ulysses_inner", kernel)
    assert cost.cut_rows == 0 and cost.steps == 1 and cost.padding == 0
    assert f.ring_transfers == b.ring_transfers == 0 and f.ring_bytes == b.ring_bytes == 0
    assert f.ring_exposed == pytest.approx(0, abs=1e-9) and b.ring_exposed == pytest.approx(0, abs=1e-9)
    assert f.a2a_calls > 0  # the Ulysses all-to-all still runs
    dense = Shape(seqlen=cost.padded_total, heads=32, kv_heads=8)
    assert memory.peak == pytest.approx(CostModel.memory(dense, 2, 4, ring_rows=0).peak)
    assert memory.peak < CostModel.memory(dense, 2, 4).peak
    some_cut = batch.documents(lengths=[60000, 50000] + [1000] * 300)
    f, b, _, cost = batch.evaluate_batch(model, shape, some_cut, 2, 4, "ulysses_inner", kernel)
    assert 0 < cost.cut_rows < cost.ring_tokens and cost.cut_documents == 2 and cost.steps == 4
    dense = Shape(seqlen=cost.padded_total, heads=32, kv_heads=8)
    fd, bd, _ = model.evaluate(dense, 2, 4, "ulysses_inner", kernel)
    assert f.ring_transfers == fd.ring_transfers and b.ring_transfers == bd.ring_transfers
    assert f.ring_bytes == pytest.approx(fd.ring_bytes * cost.cut_rows / cost.ring_tokens)
    assert b.ring_bytes == pytest.approx(bd.ring_bytes * cost.cut_rows / cost.ring_tokens)
    # every document cut (the old layout): the whole ring rows travel
    f, _, _, old = batch.evaluate_batch(model, shape, some_cut, 2, 4, "ulysses_inner", kernel,
                                        doc_placement="cut_all")
    assert old.cut_documents == 302 and old.cut_rows == old.ring_tokens
    with pytest.raises(ValueError, match="doc_placement"):
        batch.evaluate_batch(model, shape, some_cut, 2, 4, "ulysses_inner", kernel, doc_placement="nope")


def test_whole_documents_price_the_slowest_rank():
    """Step 0 is the slowest ring rank's: its cut calls plus its whole documents' call."""
    kernel = planner.load_topology("dgx-h100").kernel("torch_flash", "bfloat16", 128)[0]
    rates = batch._rates(kernel, 8.0)
    lengths = np.array([30000] + [2000] * 40 + [100] * 500)
    owner = batch.placement_owner(lengths, 4, True)
    assert (owner < 0).sum() == 1 and (owner >= 0).sum() == lengths.size - 1
    cost = batch.batch_compute(lengths, 2, 4, True, 32, 8, 128, 2, 2, rates, "torch_flash", None)
    cut = batch.batch_compute(lengths[:1], 2, 4, True, 32, 8, 128, 2, 2, rates, "torch_flash", None)
    per_rank = []
    for r in range(4):
        held = batch.batch_compute(lengths[owner == r], 1, 1, True, 16, 4, 128, 2, 2, rates, "torch_flash", None)
        per_rank.append(held.step0)
    # one whole call per rank (the R == 1 price of the rank's documents, on its heads), on top of the cut ones
    assert cost.step0[0] == pytest.approx(cut.step0[0] + max(p[0] for p in per_rank), rel=1e-9)
    assert cost.later == cut.later and cost.steps == 4
    assert cost.calls_per_pass == 2 * (3 + 1 + 2 * 3)


def test_varlen_points_price_the_calls():
    """With varlen points (``usp-plan probe``: one call over many equal sequences of 128-4096 tokens) a call is
    priced per sequence, each rounded up to whole 128-row tiles, at the measured rate of calls of many such
    sequences, and no faster than one dense block of the call's whole work; two head counts interpolate in
    log2(heads). A profile without them keeps the fall-off form."""
    import dataclasses

    from usp.planner.topology import VarlenPoint

    base = planner.load_topology("dgx-h100").kernel("torch_flash", "bfloat16", 128)[0]
    assert not base.varlen and batch._Rates(base, 32.0)._sequence is None
    lengths = (128, 512, 4096)
    measured = {128: 50.0, 512: 150.0, 4096: 300.0}  # TFLOP/s, every direction and mask
    k32 = dataclasses.replace(base, heads=32, variants=(), varlen=tuple(
        VarlenPoint(n, 32768 // n, *[measured[n]] * 4) for n in lengths))
    k8 = dataclasses.replace(base, heads=8, variants=(), varlen=tuple(
        VarlenPoint(n, 32768 // n, *[measured[n] / 2] * 4) for n in lengths))
    rates = batch._Rates(k32, 32.0)
    unit = 4.0 * 32 * 128
    many = np.full(64, 512.0)
    fwd, bwd = rates.call_times(True, unit, many, many)
    flops = unit * 64 * 512 * 512 / 2
    assert fwd == pytest.approx(flops / 150e12) and bwd == pytest.approx(2.5 * flops / 150e12)
    # 500 tokens run as 512 (whole tiles); 200 as 256, between the points in log2(length): 100 TFLOP/s
    assert rates.call_times(True, unit, np.full(64, 500.0), np.full(64, 500.0))[0] == pytest.approx(fwd)
    assert rates.call_times(False, unit, [200.0], [200.0])[0] == pytest.approx(
        max(unit * 256 ** 2 / 100e12, unit * 256 ** 2 / base.rate(False, False, base.points[0].block, 32)))
    # one long sequence: no faster than the dense block of its side (the probe's 300 beats the dense rate here)
    one = rates.call_times(True, unit, [4096.0], [4096.0])[0]
    assert one == pytest.approx(unit * 4096 ** 2 / 2 / base.rate(False, True, 4096, 32))
    # calls grouped: two calls of different sequences in one go
    two = rates.call_times(True, unit, np.array([512.0, 512.0, 128.0]), np.array([512.0, 512.0, 128.0]),
                           np.array([0, 0, 1]), 2)[0]
    assert two[0] == pytest.approx(2 * unit * 512 ** 2 / 2 / 150e12)
    assert two[1] == pytest.approx(max(unit * 128 ** 2 / 2 / 50e12,
                                       unit * 128 ** 2 / 2 / base.rate(False, True, base.points[0].block, 32)))
    # heads: 16 per call lies halfway between 8 and 32 in log2(heads): 0.75 of the 32-head rate
    mixed = batch._Rates(dataclasses.replace(k32, variants=(k8,)), 16.0)
    assert mixed._sequence[(False, True)][np.searchsorted(mixed._log, np.log2(512))] == pytest.approx(0.75 * 150e12)


@pytest.mark.parametrize("kwargs,match", [
    (dict(cu_seqlens=[0, 5, 3]), "non-decreasing"),
    (dict(cu_seqlens=[1, 5]), "start at 0"),
    (dict(cu_seqlens=[0]), "at least 2"),
    (dict(cu_seqlens=[0, 0, 0]), "no tokens"),
    (dict(doc_lengths=[5, -1]), "lengths must be >= 0"),
    (dict(doc_lengths=[]), "no tokens"),
    (dict(doc_lengths=[1.5]), "integers"),
    (dict(histogram="/nonexistent/h.txt"), "cannot be read"),
    (dict(cu_seqlens=[0, 4], doc_lengths=[4]), "exactly one"),
])
def test_bad_documents_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        planner.plan(2, None, 32, 8, topology="h100-nvlink-2x", **kwargs)


def test_seqlen_must_match_and_no_windows():
    with pytest.raises(ValueError, match="does not match"):
        planner.plan(2, 100, 32, 8, doc_lengths=[10, 20], topology="h100-nvlink-2x")
    with pytest.raises(ValueError, match="window"):
        planner.plan(2, None, 32, 8, doc_lengths=[10, 20], topology="h100-nvlink-2x", window=4)


def test_histogram_formats(tmp_path):
    text = tmp_path / "h.txt"
    text.write_text("# length count\n4096 3\n100 2\n")
    mapping = tmp_path / "h.yaml"
    mapping.write_text("{4096: 3, 100: 2}\n")
    a, b = batch.documents(histogram=text), batch.documents(histogram=mapping)
    assert sorted(a.lengths.tolist()) == sorted(b.lengths.tolist()) == [100, 100, 4096, 4096, 4096]
    bad = tmp_path / "bad.txt"
    bad.write_text("4096\n")
    with pytest.raises(ValueError, match="line 1"):
        batch.documents(histogram=bad)


def test_plan_roundtrips_with_documents():
    p = planner.plan(2, None, 32, 8, doc_lengths=[30000, 100, 200] * 10, topology="h100-nvlink-2x")
    q = planner.Plan.from_json(p.to_json())
    assert q.documents == p.documents and q.candidates[0].batch == p.candidates[0].batch


def test_choose_agrees_with_plan_and_is_deterministic():
    meshes = [SimpleNamespace(ulysses=u, ring=8 // u) for u in (1, 2, 4, 8)]
    rng = np.random.default_rng(1)
    for trial in range(4):
        lengths = np.minimum((64 * (1 - rng.random(200)) ** (-1 / 1.1)).astype(int), 2 ** 16) + 1
        if trial == 3:
            lengths = np.array([2 ** 19])  # one giant document
        cu = [0] + np.cumsum(lengths).tolist()
        picked = usp.choose(cu, meshes, heads=32, kv_heads=8, topology="dgx-h100", kernel="torch_flash")
        assert picked is usp.choose(cu, list(meshes), heads=32, kv_heads=8, topology="dgx-h100",
                                    kernel="torch_flash")
        p = planner.plan(8, None, 32, 8, topology="dgx-h100", kernel="torch_flash", cu_seqlens=cu)
        best = {c.label: c.total for c in p.candidates if c.feasible and c.placement == "ulysses_inner"}
        mine = f"U{picked.ulysses}xR{picked.ring}"
        assert best[mine] <= min(best.values()) * 1.03, (trial, mine, best)


def test_choose_bad_input():
    meshes = [SimpleNamespace(ulysses=1, ring=2)]
    with pytest.raises(ValueError, match="non-decreasing"):
        usp.choose([0, 5, 2], meshes, heads=8, topology="h100-nvlink-2x")
    with pytest.raises(ValueError, match="at least one mesh"):
        usp.choose([0, 5], [], heads=8, topology="h100-nvlink-2x")
    with pytest.raises(ValueError, match="ulysses and ring"):
        usp.choose([0, 5], [object()], heads=8, topology="h100-nvlink-2x")


def test_choose_is_fast():
    meshes = [SimpleNamespace(ulysses=u, ring=8 // u) for u in (8, 2, 1)]
    lengths = np.random.default_rng(0).integers(64, 4096, 1000)
    cu = [0] + np.cumsum(lengths).tolist()
    opts = dict(heads=32, kv_heads=8, topology="dgx-h100", kernel="torch_flash")
    usp.choose(cu, meshes, **opts)
    import time
    times = []
    for _ in range(50):
        batch.forget_placements()  # a new batch every call: the placement is computed each time
        t = time.perf_counter()
        usp.choose(cu, meshes, **opts)
        times.append(time.perf_counter() - t)
    # measured ~1.0-1.1 ms on the 2-core development machine (uniform lengths: more documents are placed one
    # by one than in benchmarks/choose_cost.py's long tail, 0.85 ms); loose for busy CI
    assert sorted(times)[25] < 0.004


def test_cli_documents(tmp_path):
    hist = tmp_path / "h.txt"
    hist.write_text("4096 30\n32768 1\n")
    run = lambda *a: subprocess.run([sys.executable, "-m", "usp.planner.cli", *a], capture_output=True, text=True)
    ok = run("--world-size", "2", "--heads", "32", "--kv-heads", "8", "--topology", "h100-nvlink-2x",
             "--histogram", str(hist), "--format", "json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["documents"]["documents"] == 31
    ok = run("--world-size", "2", "--heads", "32", "--topology", "h100-nvlink-2x", "--doc-lengths", "100,2000,30")
    assert ok.returncode == 0, ok.stderr
    for args in (["--cu-seqlens", "0,5,3"], ["--doc-lengths", "5,-2"], ["--histogram", str(tmp_path / "none")]):
        bad = run("--world-size", "2", "--heads", "32", "--topology", "h100-nvlink-2x", *args)
        assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
