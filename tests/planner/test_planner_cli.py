"""usp-plan: JSON/YAML/table output, sweep, probe subcommand parsing, bad input -> exit 2 with one line."""
import io
import json
import re
import shutil
import subprocess
import sys

import pytest
import yaml

from usp import planner
from usp.planner.cli import build_parser, build_probe_parser, main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


BASE = ("--world-size", "64", "--seqlen", "1M", "--heads", "32", "--kv-heads", "8")


def test_json_default_topology(capsys):
    code, out, err = run(capsys, *BASE, "--format", "json")
    assert code == 0 and err == ""
    data = json.loads(out)
    assert (data["ulysses"], data["ring"], data["placement"]) == (8, 8, "ulysses_inner")
    assert data["topology"] == "dgx-h100-cluster" and data["shape"]["seqlen"] == 1048576
    assert planner.Plan.from_dict(data).to_dict() == data


@pytest.mark.parametrize("argv, check", [
    (("--world-size", "8", "--seqlen", "32k", "--heads", "32", "--kv-heads", "8", "--topology", "l20-pcie",
      "--forward-only"), lambda d: d["forward_only"] and d["world_size"] == 8 and d["shape"]["kv_heads"] == 8),
    (("--world-size", "2", "--seqlen", "131072", "--heads", "32", "--no-causal", "--topology", "h100-nvlink-2x"),
     lambda d: d["shape"]["causal"] is False and {c["ulysses"] for c in d["candidates"]} == {1, 2}),
    (("--world-size", "16", "--seqlen", "256k", "--heads", "64", "--kv-heads", "8", "--gpus-per-node", "4",
      "--memory-limit", "20", "--dtype", "fp16"),
     lambda d: d["ulysses"] <= 4 and d["memory_limit_bytes"] == 20 * 1024**3 and d["shape"]["dtype"] == "float16"),
])
def test_json_cases(capsys, argv, check):
    code, out, _ = run(capsys, *argv, "--format", "json")
    assert code == 0 and check(json.loads(out))


def test_yaml_output(capsys):
    code, out, _ = run(capsys, *BASE, "--format", "yaml")
    assert code == 0 and yaml.safe_load(out)["ring"] == 8


def test_plain_table_when_not_a_tty(capsys):
    code, out, _ = run(capsys, *BASE)
    assert code == 0 and "\x1b[" not in out
    lines = out.splitlines()
    pick = [ln for ln in lines if ln.startswith("*")]
    assert len(pick) == 1 and pick[0].split()[1:4] == ["8", "8", "ulysses_inner"]
    assert any(ln.startswith("x ") and "not divisible" in ln for ln in lines)
    assert "pick (*): Ulysses 8 x ring 8" in out
    assert "mesh = usp.SequenceParallelMesh.from_plan(plan)" in out
    assert "attn = usp.LongContextAttention(mesh, causal=True)" in out


def test_rich_table_on_a_tty(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    buffer = Tty()
    monkeypatch.setattr(sys, "stdout", buffer)
    assert main(list(BASE)) == 0
    assert "┃" in buffer.getvalue() or "│" in buffer.getvalue()


def test_sweep_table_and_json(capsys):
    code, out, _ = run(capsys, "--world-size", "32", "--heads", "32", "--kv-heads", "8", "--sweep")
    assert code == 0
    rows = [ln for ln in out.splitlines() if ln[:1].isdigit()]
    assert [r.split()[0] for r in rows] == ["8K", "16K", "32K", "64K", "128K", "256K", "512K", "1M"]
    assert "<- changes" in out
    code, out, _ = run(capsys, "--world-size", "8", "--heads", "32", "--sweep", "32k,1001", "--format", "json")
    data = json.loads(out)["sweep"]
    assert data[0]["seqlen"] == 32768 and "plan" in data[0]
    assert data[1]["seqlen"] == 1001 and "not a multiple" in data[1]["error"]


def test_list_presets(capsys):
    code, out, _ = run(capsys, "--list-presets")
    assert code == 0 and all(name in out for name in planner.list_presets())


def _bad_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nhosts: a: b\n")
    return str(path)


def _incomplete_yaml(tmp_path):
    path = tmp_path / "incomplete.yaml"
    doc = planner.load_topology("dgx-h100").to_dict()
    del doc["host_fabric"]["bandwidth_GBps"]
    path.write_text(yaml.safe_dump(doc))
    return str(path)


@pytest.mark.parametrize("argv, message", [
    (("--world-size", "12", "--seqlen", "32k", "--heads", "32", "--sequence-parallel-size", "8"),
     "world_size=12 is not divisible by sequence_parallel_size=8"),
    (("--world-size", "8", "--seqlen", "32k", "--heads", "0"), "heads must be a positive integer, got 0"),
    (("--world-size", "8", "--seqlen", "32k", "--heads", "32", "--topology", "nope"), "unknown topology preset 'nope'"),
    (("--world-size", "8", "--seqlen", "32k", "--heads", "32", "--topology", "{bad}"), "malformed YAML at line 2"),
    (("--world-size", "8", "--seqlen", "32k", "--heads", "32", "--topology", "{incomplete}"),
     "key 'host_fabric.bandwidth_GBps': is required but missing"),
    (("--world-size", "8", "--seqlen", "32k", "--heads", "32", "--memory-limit", "1MiB"),
     "memory_limit of 1 MiB is too small"),
    (("--world-size", "8", "--seqlen", "12q", "--heads", "32"), "argument --seqlen: '12q' is not a sequence length"),
    (("--world-size", "8", "--heads", "32"), "required: --seqlen"),
    (("--world-size", "8", "--seqlen", "32k", "--heads", "32", "--format", "xml"), "invalid choice: 'xml'"),
])
def test_bad_input_exits_2_with_one_line(capsys, tmp_path, argv, message):
    argv = [a.format(bad=_bad_yaml(tmp_path), incomplete=_incomplete_yaml(tmp_path)) for a in argv]
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("usp-plan: error: ") and message in err


def test_cli_and_api_report_the_same_text(capsys):
    with pytest.raises(ValueError) as info:
        planner.plan(8, "32k", 32, memory_limit="1MiB")
    code, _, err = run(capsys, "--world-size", "8", "--seqlen", "32k", "--heads", "32", "--memory-limit", "1MiB")
    assert code == 2 and err.strip() == f"usp-plan: error: {info.value}"


def test_cli_surface_is_pinned():
    plan_flags = {a for action in build_parser()._actions for a in action.option_strings}
    assert {"--world-size", "--seqlen", "--heads", "--kv-heads", "--head-dim", "--batch", "--causal", "--no-causal",
            "--dtype", "--topology", "--gpus-per-node", "--memory-limit", "--format", "--sweep"} <= plan_flags
    probe_flags = {a for action in build_probe_parser()._actions for a in action.option_strings}
    assert {"--output", "--sizes", "--iters", "--kernel", "--no-kernel", "--gpus-per-host"} <= probe_flags


@pytest.mark.timeout(60)
def test_console_script_dry_run():
    exe = shutil.which("usp-plan")
    cmd = [exe] if exe else [sys.executable, "-m", "usp.planner.cli"]
    result = subprocess.run(cmd + list(BASE), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "pick (*): Ulysses 8 x ring 8 (ulysses_inner)" in result.stdout
    bad = subprocess.run(cmd + ["--world-size", "8", "--seqlen", "32k", "--heads", "0"], capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1


# ----------------------------------------------------------------------------------------------- issue 16
def _cli(*argv, columns=80):
    exe = shutil.which("usp-plan")
    cmd = ([exe] if exe else [sys.executable, "-m", "usp.planner.cli"]) + list(argv)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60,
                          env={**__import__("os").environ, "COLUMNS": str(columns)})


@pytest.mark.timeout(60)
def test_closed_pipe_ends_quietly():
    exe = shutil.which("usp-plan") or f"{sys.executable} -m usp.planner.cli"
    result = subprocess.run(f"{exe} {' '.join(BASE)} --world-size 4096 | head -2", shell=True, capture_output=True,
                            text=True, timeout=60, executable="/bin/bash")
    assert len(result.stdout.splitlines()) == 2
    assert "Traceback" not in result.stderr and "BrokenPipeError" not in result.stderr


@pytest.mark.parametrize("argv", [BASE, ("--world-size", "8", "--seqlen", "32k", "--heads", "32", "--kv-heads", "8",
                                          "--topology", "l20-pcie", "--forward-only", "--memory-limit", "40GiB"),
                                  ("--world-size", "16", "--heads", "32", "--kv-heads", "8", "--sweep")])
def test_table_fits_80_columns(monkeypatch, capsys, argv):
    monkeypatch.setenv("COLUMNS", "80")
    code, out, _ = run(capsys, *argv)
    assert code == 0
    assert max(len(line) for line in out.splitlines()) <= 80
    assert "…" not in out


def test_rich_table_fits_80_columns(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setenv("COLUMNS", "80")
    buffer = Tty()
    monkeypatch.setattr(sys, "stdout", buffer)
    assert main(list(BASE)) == 0
    text = __import__("re").sub(r"\x1b\[[0-9;]*m", "", buffer.getvalue())
    assert max(len(line) for line in text.splitlines()) <= 80 and "…" not in text
    assert "total ms" in text and "764" in text


def test_wide_table_has_the_breakdown_and_one_unit_per_column(capsys):
    code, out, _ = run(capsys, "--world-size", "8", "--seqlen", "1M", "--heads", "32", "--kv-heads", "8",
                       "--topology", "dgx-h100", "--wide")
    header = next(line for line in out.splitlines() if line.startswith("   U  R"))
    for column in ("compute ms", "merge ms", "all-to-all ms", "ring exp. ms", "overhead ms", "fwd ms", "bwd ms",
                   "total ms"):
        assert column in header
    rows = [line for line in out.splitlines() if re.match(r"^[*x ]\s+\d+\s+\d+\s", line)]
    assert rows and " s " not in header and not any(" ms" in row for row in rows)  # no unit inside the cells
    assert "fwd 1637 + bwd 4405 = 6042 ms per layer" in " ".join(out.split())  # one unit on the summary line


def test_equivalent_placements_are_merged(capsys):
    code, out, _ = run(capsys, "--world-size", "8", "--seqlen", "128k", "--heads", "32", "--kv-heads", "8",
                       "--topology", "dgx-h100")
    splits = [m.groups() for m in (re.match(r"^[*x ]\s+(\d+)\s+(\d+)\s", line) for line in out.splitlines()) if m]
    assert len(splits) == 4 and "either" in out and "both placements predict the same" in " ".join(out.split())
    assert len(splits) == len(set(splits)), "one row per split on one node"
    code, out, _ = run(capsys, "--world-size", "8", "--heads", "32", "--kv-heads", "8", "--topology", "dgx-h100",
                       "--sweep", "32k,128k", "--format", "json")
    for entry in json.loads(out)["sweep"]:
        why = entry["plan"]["why"]
        pick = entry["plan"]["candidates"][0]
        assert why["runner_up"] != f"U{pick['ulysses']}xR{pick['ring']} ring_inner" or why["margin"] > 1e-9
        assert why["margin"] != 0


def test_sweep_runner_up_is_never_the_picks_twin(capsys):
    code, out, _ = run(capsys, "--world-size", "8", "--heads", "32", "--kv-heads", "8", "--topology", "dgx-h100",
                       "--sweep")
    assert code == 0 and "+0.0%" not in out


def test_why_in_table_json_and_yaml(capsys):
    code, out, _ = run(capsys, *BASE)
    out = " ".join(out.split())
    assert "why: the runner-up U16xR4 ulysses_inner is 0.5%" in out and "the pick wins on all-to-all" in out
    code, out, _ = run(capsys, *BASE, "--format", "json")
    why = json.loads(out)["why"]
    assert why["runner_up"] == "U16xR4 ulysses_inner" and why["deciding_term"] == "all_to_all"
    assert why["margin"] == pytest.approx(why["margin_s"] / json.loads(out)["total_s"])
    assert set(why["terms_s"]) == {"compute", "merge", "all_to_all", "ring_exposed", "overhead"}
    code, out, _ = run(capsys, *BASE, "--format", "yaml")
    assert yaml.safe_load(out)["why"]["deciding_term"] == "all_to_all"


@pytest.mark.parametrize("argv, message", [
    (("--world-size", "8", "--seqlen", "32k", "--heads", "32", "--head-dim", "1000"),
     "head_dim=1000 is not supported by any of usp's GPU attention kernels"),
    (("--world-size", "8", "--seqlen", "32k", "--heads", "32", "--gpus-per-node", "3"),
     "gpus_per_node=3 does not divide world_size=8: torchrun starts the same number of ranks on every node; "
     "valid values: 1, 2, 4, 8"),
])
def test_refused_validation(capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == "" and err.count("\n") == 1 and message in err


def test_errors_are_listed_once(capsys):
    code, _, err = run(capsys, "--world-size", "8", "--seqlen", "100", "--heads", "32", "--kv-heads", "8")
    assert code == 2
    for label in ("U1xR8", "U2xR4", "U4xR2", "U8xR1"):
        assert err.count(label) == 1
    assert err.count("not a multiple of 8 (causal zigzag") == 1


def test_usage_names_probe_and_every_flag_has_help(capsys):
    parser, probe = build_parser(), build_probe_parser()
    assert "probe" in parser.format_usage()
    for p in (parser, probe):
        for action in p._actions:
            assert action.help, f"{p.prog}: {action.option_strings} has no help"
    code, out, _ = run(capsys, "--help")
    assert code == 0 and "--wide" in out and "probe" in out
