"""The planner on packed documents (issue 14 part 2): inputs, the cost model against the recorded varlen runs,
the spec's varlen facts against the runtime's schedule, ``usp.choose`` and the CLI."""
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


def recorded_errors():
    """``[(kind, total, what, predicted / measured - 1)]``: the varlen kernel alone on 1 GPU (whole and half
    documents) and usp on 2x H100 (1x2, 2x1), torch_flash, 32/8 heads, causal."""
    topo = planner.load_topology("h100-nvlink-2x")
    kernel, _ = topo.kernel("torch_flash", "bfloat16", 128)
    out = []
    for r in RECORDS:
        lengths = np.array(r.get("doc_lengths") or [r["total_tokens"]])
        shape = Shape(seqlen=int(lengths.sum()), heads=r["heads"], kv_heads=r["kv_heads"], causal=r["causal"])
        for what, docs, ms in (("1gpu", lengths, r["t1_ms"]), ("1gpu-half", -(-lengths // 2),
                                                                r["t_kernel_local_shard_ms"])):
            f, b, _, _ = batch.evaluate_batch(CostModel(topo, 1, 1), shape, batch.documents(lengths=docs), 1, 1,
                                              "ulysses_inner", kernel)
            out.append((r["kind"], r["total_tokens"], what, (f.total + b.total) * 1e3 / ms - 1))
        for mesh, m in r["meshes"].items():
            u, ring = map(int, mesh.split("x"))
            cand = planner.predict(u, ring, None, r["heads"], r["kv_heads"], topology=topo, kernel="torch_flash",
                                   doc_lengths=lengths.tolist())
            assert cand.batch["padding"] == m["padding_tokens"]  # the layout's padding, as recorded
            out.append((r["kind"], r["total_tokens"], mesh, cand.total * 1e3 / m["tp_ms"] - 1))
    return out


def test_recorded_varlen_runs_are_predicted():
    errs = recorded_errors()
    assert len(errs) == 16
    for e in errs:
        print(f"{e[0]:7s} {e[1]:7d} {e[2]:10s} {e[3]:+.1%}")
    # achieved: every one within +-4.3% (mean +1.3%); issue 14's target is +-15%
    assert max(abs(e[3]) for e in errs) <= 0.05
    assert abs(np.mean([e[3] for e in errs])) <= 0.03


def test_recorded_pick_is_the_faster_split():
    for r in RECORDS:
        if r["kind"] != "varlen":
            continue
        p = planner.plan(2, None, 32, 8, topology="h100-nvlink-2x", kernel="torch_flash",
                         doc_lengths=r["doc_lengths"])
        fastest = min(r["meshes"], key=lambda k: r["meshes"][k]["tp_ms"])
        assert f"{p.ulysses}x{p.ring}" == fastest
        assert p.documents["documents"] == r["documents"]
        assert "padding tokens" in p.summary()


@pytest.mark.parametrize("ulysses,ring,causal", [(1, 2, True), (2, 2, True), (1, 4, False), (4, 1, True),
                                                 (2, 4, True), (3, 1, False)])
def test_layout_facts_match_the_runtime(ulysses, ring, causal):
    pytest.importorskip("torch")
    from usp.varlen import _build_layout, _schedule_for_layout

    cu = (0, 700, 713, 1000, 1001, 1500)
    layout = _build_layout(cu, ulysses, ring, causal)
    lengths = np.diff(cu)
    cost = batch.batch_compute(lengths, ulysses, ring, causal, 12, 12, 64, 2, 1,
                               batch._rates(planner.load_topology("h100-nvlink-2x").kernel("torch_flash",
                                                                                          "bfloat16", 128)[0], 1.0),
                               "torch_flash", None)
    assert cost.padding == layout.padding and cost.local_tokens == layout.local_tokens
    assert spec.varlen_chunks_per_doc(ring, causal) == layout.chunks_per_doc
    assert spec.varlen_pad_chunk(sum(-(-n // layout.chunks_per_doc) for n in lengths), ulysses, ring,
                                 causal) == layout.pad_chunk
    schedule = _schedule_for_layout(layout)
    calls = 0
    for r in range(ring):
        for step in range(ring):
            block = schedule.block(step, r, ring, layout.ring_tokens)
            assert len(block.mask.calls) == len(spec.varlen_block_calls(ring, causal, step, r))
            calls += len(block.mask.calls) if r == 0 else 0
    assert cost.calls_per_pass == calls


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
        t = time.perf_counter()
        usp.choose(cu, meshes, **opts)
        times.append(time.perf_counter() - t)
    assert sorted(times)[25] < 0.003  # measured ~0.3 ms (benchmarks/choose_cost.py); loose for busy CI


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
