"""Tests of the benchmark harness: formulas, record joins, report rendering, and one CPU/gloo run of the smoke suite.

    pytest benchmarks/test_harness.py            # ~40 s on 2 cores (the torchrun test dominates)
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

HERE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, HERE)

import bench_common as bc  # noqa: E402
import planner_adapter  # noqa: E402
import report  # noqa: E402


# ------------------------------------------------------------------------------------------------ formulas
def test_flops_follow_the_facts_convention():
    # 4·b·h·s²·d, halved when causal; fwd+bwd = 3.5x
    assert bc.attention_flops(1, 32, 1024, 128, False, "fwd") == 4 * 32 * 1024**2 * 128
    assert bc.attention_flops(1, 32, 1024, 128, True, "fwd") == 2 * 32 * 1024**2 * 128
    assert bc.attention_flops(2, 32, 1024, 128, True, "fwdbwd") == 3.5 * 2 * 2 * 32 * 1024**2 * 128
    with pytest.raises(ValueError, match="valid values"):
        bc.attention_flops(1, 1, 1, 1, True, "bwd")


def test_min_memory_matches_the_documented_1m_example():
    # 1M tokens on 2 GPUs, GQA 32/8, d=128, bf16: 20 GiB of tensors + 64 MiB of LSE
    got = bc.min_memory_bytes(1, 524288, 32, 8, 128, 2, "fwdbwd")
    assert got == 20 * bc.GiB + 64 * bc.MiB
    assert bc.min_memory_bytes(1, 524288, 32, 8, 128, 2, "fwd") == 10 * bc.GiB + 64 * bc.MiB


@pytest.mark.parametrize("text,tokens", [("32k", 32768), ("128K", 131072), ("1M", 1048576), ("1.5M", 1572864),
                                         ("4096", 4096), (64, 64)])
def test_parse_seqlen(text, tokens):
    assert bc.parse_seqlen(text) == tokens


@pytest.mark.parametrize("bad", ["", "1.3k", "-4", "x", "0"])
def test_parse_seqlen_rejects(bad):
    with pytest.raises(ValueError, match="sequence length"):
        bc.parse_seqlen(bad)


def test_parse_heads_and_mesh():
    assert bc.parse_heads("32") == (32, 32)
    assert bc.parse_heads("32/8") == (32, 8)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        bc.parse_heads("32/5")
    assert bc.parse_mesh("1x2") == (1, 2)
    assert bc.parse_mesh("2X1") == (2, 1)
    with pytest.raises(ValueError, match="UxR"):
        bc.parse_mesh("2")


def test_format_tokens():
    assert [bc.format_tokens(t) for t in (64, 32768, 1048576, 1572864, 100000)] == ["64", "32K", "1M", "1.5M",
                                                                                     "100000"]


# ------------------------------------------------------------------------------------------------ records
def _record(method, median, *, kernel="cudnn", gpus=1, shard_of=1, variant="", mode="fwdbwd", seqlen=32768,
            run="r1", **extra):
    cfg = {"seqlen": seqlen, "batch": 1, "heads": 32, "kv_heads": 32, "head_dim": 128, "causal": True,
           "dtype": "bfloat16"}
    label = {"kernel_full": "kernel 1 GPU (full)", "kernel_local": "kernel 1 GPU (s/2)",
             "usp": f"usp {variant}", "torch_cp": f"torch CP {variant}"}[method]
    rec = {"suite": "targets", "device_name": "H100", "config": cfg, "method": method, "variant": variant,
           "label": label, "mode": mode, "gpus": gpus, "shard_of": shard_of, "kernel": kernel,
           "status": "ok", "median_ms": median, "flops": 1e12, "mem_min_bytes": bc.GiB, "peak_mem_bytes": bc.GiB,
           "mem_ratio": 1.0, "tflops_per_gpu": 1.0, "seq": 1,
           "mesh": {"ulysses": int(variant[0]), "ring": int(variant[2])} if method == "usp" else None,
           "run": {"run_id": run, "date": "2026-11-25T00:00:00+00:00", "command": "torchrun ...",
                   "env": {"device_name": "H100", "torch": "2.11", "world_size": 2}}}
    rec.update(extra)
    return rec


def test_derive_efficiency_and_rfa_ratio():
    records = [
        _record("kernel_full", 100.0),
        _record("kernel_local", 30.0, shard_of=2),
        _record("usp", 55.0, gpus=2, variant="1x2"),
        _record("torch_cp", 60.0, gpus=2, variant="allgather"),
        _record("torch_cp", 60.0, gpus=2, variant="alltoall", kernel="sdpa:other"),  # no baseline of its kernel
    ]
    out = {r["label"]: r for r in bc.derive(records)}
    assert out["usp 1x2"]["efficiency"] == pytest.approx(100 / (2 * 55))
    assert out["usp 1x2"]["ratio_rfa"] == pytest.approx(2 * 30 / 55)
    assert out["torch CP allgather"]["efficiency"] == pytest.approx(100 / 120)
    assert out["torch CP alltoall"]["efficiency"] is None


def test_derive_prefers_the_baseline_of_the_same_run():
    records = [_record("kernel_full", 100.0, run="a"), _record("kernel_full", 200.0, run="b"),
               _record("usp", 50.0, gpus=2, variant="1x2", run="a")]
    usp = [r for r in bc.derive(records) if r["method"] == "usp"][0]
    assert usp["efficiency"] == pytest.approx(1.0)


def test_side_by_side_marks_targets_and_cp_comparison():
    records = [_record("kernel_full", 100.0), _record("usp", 52.0, gpus=2, variant="1x2"),
               _record("usp", 51.0, gpus=2, variant="2x1"), _record("torch_cp", 60.0, gpus=2, variant="allgather")]
    text = report.render_section(records, "t")
    assert "0.980 / 0.93 ✓" in text  # best usp E at 32K vs the target
    assert "| yes (1.18× best) |" in text


def test_failed_check_hides_the_time():
    bad = _record("usp", 1.0, gpus=2, variant="1x2",
                  check={"ok": False, "errors": {"out": {"max_abs_err": 1.0, "rel_err": 0.5}}})
    text = report.render_section([_record("kernel_full", 100.0), bad], "t")
    row = next(line for line in text.splitlines() if "| usp 1x2 |" in line)
    assert "| ok, CHECK FAILED | – | – |" in row  # no time, no TFLOP/s
    assert "50.0" not in row  # and no efficiency from the wrong time
    assert "CHECK FAILED" in text.split("### All measurements")[0]  # the side-by-side says so too


def test_scale_table_reports_memory_target():
    records = [_record("usp", 26000.0, gpus=2, variant="1x2", seqlen=1048576, suite="scale", mem_ratio=1.5),
               _record("usp", None, gpus=2, variant="1x2", seqlen=2097152, suite="scale", status="oom",
                       reason="CUDA out of memory")]
    text = report.render_section(records, "s")
    assert "1.50 ✗" in text and "Longest sequence that ran: 1M (target ≥ 1M: met)" in text
    assert "oom: CUDA out of memory" in text


def test_planner_table_with_a_fake_predictor():
    records = [_record("usp", 50.0, gpus=2, variant="1x2"), _record("usp", 40.0, gpus=2, variant="2x1")]

    def predictor(rec):
        return {"fwd_ms": 1.0, "fwdbwd_ms": 55.0 if rec["variant"] == "1x2" else 42.0, "topology": "fake"}

    text = report.render_section(planner_adapter.add_predictions(records, predictor), "p")
    assert "+10.0%" in text and "+5.0%" in text
    assert "Within ±15%: 2/2; ranking right: 1/1 shapes. Topology: fake." in text


def test_upsert_replaces_its_own_section(tmp_path):
    path = str(tmp_path / "RESULTS.md")
    assert report.upsert_section(path, "abc", "## one\n") == "appended"
    assert report.upsert_section(path, "def", "## two\n") == "appended"
    assert report.upsert_section(path, "abc", "## one again\n") == "replaced"
    text = open(path, encoding="utf-8").read()
    assert text.count("<!-- section abc -->") == 1 and "## one again" in text and "## two" in text
    assert text.index("one again") < text.index("## two")  # kept in place


# ------------------------------------------------------------------------------------------------ CPU run
@pytest.mark.timeout(240)
def test_smoke_suite_on_cpu_gloo_then_report(tmp_path):
    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not on PATH")
    out = tmp_path / "out"
    cmd = [torchrun, "--nproc-per-node", "2", os.path.join(HERE, "bench_attention.py"), "--device", "cpu",
           "--backend", "reference", "--suite", "smoke", "--seqlens", "64", "--check", "--out", str(out),
           "--repeats", "2", "--simulate-oom-above", "32", "--methods",
           "kernel_full,kernel_local,usp,cp_allgather,cp_alltoall"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=230, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = list(out.glob("*.jsonl"))
    assert len(files) == 1
    records = [json.loads(line) for line in files[0].read_text().splitlines()]
    # simulated OOM above 32 tokens: kernel and usp tasks fail cleanly, CP (not simulated) runs and is checked
    by_status = {}
    for r in records:
        by_status.setdefault((r["method"], r["status"]), 0)
        by_status[(r["method"], r["status"])] += 1
    assert by_status.get(("usp", "oom")) == 2 * 2 * 2 * 2  # 2 meshes x 2 modes x 2 head configs x 2 masks
    cp_ok = [r for r in records if r["method"] == "torch_cp" and r["status"] == "ok"]
    assert len(cp_ok) == 2 * 2 * 2 * 2 and all(r["check"]["ok"] for r in cp_ok)
    assert all(r["run"]["command"].startswith("torchrun") for r in records)

    # and again without the simulated OOM, only usp, for E and the report's plot
    cmd2 = [c for c in cmd if c not in ("--simulate-oom-above", "32")]
    cmd2[cmd2.index("--methods") + 1] = "kernel_full,kernel_local,usp"
    proc = subprocess.run(cmd2, capture_output=True, text=True, timeout=230, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = tmp_path / "RESULTS.md"
    rc = report.main([str(out), "--results", str(results), "--plots", str(tmp_path / "plots"), "--no-predict"])
    assert rc == 0
    text = results.read_text()
    assert "### Side by side" in text and "### All measurements" in text and "| ok, checked |" in text
    pngs = list((tmp_path / "plots").glob("*.png"))
    import importlib.util

    assert len(pngs) == (1 if importlib.util.find_spec("matplotlib") else 0)


@pytest.mark.timeout(240)
def test_packed_benchmarks_smoke_on_cpu_gloo(tmp_path):
    """``bench_varlen.py`` (every mix, the planner's pick recorded or its reason) and ``profile_varlen.py`` on tiny
    packed batches with the reference kernel: both finish and write what their docstrings say."""
    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not on PATH")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = ["--backend", "reference", "--heads", "4/2", "--head-dim", "16", "--iters", "1", "--warmup", "0"]
    bench = tmp_path / "varlen.json"
    cmd = [torchrun, "--nproc-per-node", "2", os.path.join(HERE, "bench_varlen.py"), *common, "--no-dense",
           "--points", "long_tail:512,uniform_short:9000,one_giant:512,many_tiny:512", "--topology", "h100-nvlink-2x",
           "--out", str(bench)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=230, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(bench.read_text())
    assert result["command"].startswith("torchrun") and [r["mix"] for r in result["records"]] == [
        "long_tail", "uniform_short", "one_giant", "many_tiny"]
    for record in result["records"]:
        assert sum(record["doc_lengths"]) == record["total_tokens"]
        assert set(record["meshes"]) == {"1x2", "2x1"} and record["meshes"]["1x2"]["placement"]["ring_tokens"] > 0
        assert "reference" in record["planner"]["error"]  # no rates for the CPU kernel: said, not crashed
    profile = tmp_path / "profile.json"
    cmd = [torchrun, "--nproc-per-node", "2", os.path.join(HERE, "profile_varlen.py"), *common, "--total", "512",
           "--meshes", "1x2", "--out", str(profile)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=230, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads(profile.read_text())
    facts = record["meshes"]["1x2"]["layout"]
    assert len(record["meshes"]["1x2"]["per_rank"]) == 2 and facts["cut_docs"] + sum(facts["whole_docs"]) > 0
