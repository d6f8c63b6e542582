"""Markdown tables and a PNG plot from the harness's JSON records; writes/updates a section of RESULTS.md.

    python benchmarks/report.py benchmarks/results/targets-*.jsonl            # one section for these files
    python benchmarks/report.py DIR --title "targets, cuDNN" --topology probe.yaml
    python benchmarks/report.py FILES --stdout                                 # print, write nothing

All records given form one section (split runs of one suite belong together). The section is keyed by its run ids:
re-running the report replaces it in RESULTS.md instead of appending a copy. The plot goes to
``benchmarks/plots/<section>.png`` and is linked from the section. Column meanings: README.md in this folder.
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import sys
from collections import OrderedDict
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

_HERE = os.path.dirname(os.path.abspath(__file__))
for _path in (_HERE, os.path.dirname(_HERE)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import bench_common as bc  # noqa: E402
from bench_common import fmt  # noqa: E402

#: issue 4 item 3: E of the better split, forward+backward, per total sequence length
E_TARGETS = {32 * 1024: 0.93, 64 * 1024: 0.96, 128 * 1024: 0.97}
#: issue 4 item 5
MEMORY_TARGET = 1.2
SCALE_TARGET_TOKENS = 1024 * 1024


# ----------------------------------------------------------------------------------------------- loading
def load(paths: Sequence[str]) -> List[dict]:
    """Records from ``.jsonl`` files (one per line), ``.json`` files (a list or one record) or folders of them."""
    files: List[str] = []
    for path in paths:
        if os.path.isdir(path):
            files += sorted(glob.glob(os.path.join(path, "*.jsonl")) + glob.glob(os.path.join(path, "*.json")))
        else:
            files.append(path)
    records: List[dict] = []
    for name in files:
        with open(name, encoding="utf-8") as handle:
            if name.endswith(".jsonl"):
                for number, line in enumerate(handle, 1):
                    line = line.strip()
                    if not line:
                        continue
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as exc:  # a run killed mid-write leaves a partial last line
                        print(f"warning: {name}:{number}: skipped unreadable line ({exc})", file=sys.stderr)
            else:
                data = json.load(handle)
                records += data if isinstance(data, list) else [data]
    for record in records:  # runs with head chunks are a configuration of their own ("1x2 c8")
        chunks = record.get("head_chunks") or 1
        if chunks > 1 and record.get("variant") and not str(record["variant"]).endswith(f" c{chunks}"):
            record["variant"] = f"{record['variant']} c{chunks}"
    return records


# ----------------------------------------------------------------------------------------------- helpers
def _ms(value) -> str:
    return fmt(value)


def _gib(value) -> str:
    return "–" if value is None else f"{value / bc.GiB:.2f}"


def _cfg(r: dict) -> dict:
    return r["config"]


def _heads(r: dict) -> str:
    c = _cfg(r)
    return f"{c['heads']}" if c["heads"] == c["kv_heads"] else f"{c['heads']}/{c['kv_heads']}"


def _causal(r: dict) -> str:
    return "causal" if _cfg(r)["causal"] else "non-causal"


def _mode(mode: str) -> str:
    return {"fwd": "fwd", "fwdbwd": "fwd+bwd"}.get(mode, mode)


def _status(r: dict) -> str:
    status = r.get("status", "?")
    if status == "ok":
        check = r.get("check")
        if check is None:
            return "ok"
        return "ok, checked" if check.get("ok") else "ok, CHECK FAILED"
    return status


def _check(r: dict) -> str:
    check = r.get("check")
    if not check:
        return "–"
    worst = max((e["rel_err"] for e in check.get("errors", {}).values()), default=None)
    mark = "ok" if check.get("ok") else "FAIL"
    return f"{mark} ({worst:.1e})" if worst is not None else mark


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _sort_key(r: dict) -> tuple:
    c = _cfg(r)
    order = {"kernel_full": 0, "kernel_local": 1, "usp": 2, "torch_cp": 3}
    return (c["heads"] != c["kv_heads"], c["heads"], -c["kv_heads"], not c["causal"], c["seqlen"],
            r.get("mode", ""), order.get(r.get("method"), 9), r.get("variant", ""))


def _trusted(r: dict) -> bool:
    """A time that may be reported: measured, and not contradicted by --check."""
    return bc.is_ok(r) and not (r.get("check") and not r["check"].get("ok"))


# ----------------------------------------------------------------------------------------------- sections
def header_lines(records: Sequence[dict]) -> List[str]:
    runs: "OrderedDict[str, dict]" = OrderedDict()
    for r in records:
        run = r.get("run") or {}
        runs.setdefault(run.get("run_id", "?"), run)
    lines = []
    for run_id, run in runs.items():
        env = run.get("env") or {}
        versions = ", ".join(f"{k} {env[k]}" for k in ("torch", "cuda", "cudnn", "nccl", "flash_attn", "usp",
                                                        "git_commit") if env.get(k))
        lines.append(f"- run `{run_id}`, {run.get('date', '?')}: {env.get('world_size', '?')} × "
                     f"{env.get('device_name', '?')}; {versions}; usp kernel `{env.get('kernel')}`, PyTorch CP SDPA "
                     f"`{run.get('cp_sdpa_backend')}`; NCCL_NVLS_ENABLE={env.get('NCCL_NVLS_ENABLE')}")
        lines.append(f"  - command: `{run.get('command', '?')}`")
    return lines


def detail_table(records: Sequence[dict]) -> str:
    header = ["seq", "heads", "mask", "pass", "method", "kernel", "status", "median ms", "TFLOP/s/GPU",
              "peak GiB/GPU", "peak/min", "E", "ratio", "check"]
    rows = []
    for r in sorted(records, key=_sort_key):
        good = _trusted(r)
        rows.append([
            bc.format_tokens(_cfg(r)["seqlen"]), _heads(r), _causal(r), _mode(r["mode"]), r.get("label", "?"),
            r.get("kernel", "?"), _status(r) if r.get("status") == "ok" else f"{r.get('status')}: "
            f"{(r.get('reason') or '')[:80]}".replace("|", "/"),
            _ms(r.get("median_ms")) if good else "–", fmt(r.get("tflops_per_gpu")) if good else "–",
            _gib(r.get("peak_mem_bytes")), fmt(r.get("mem_ratio")), fmt(r.get("efficiency")) if good else "–",
            fmt(r.get("ratio_rfa")) if good else "–", _check(r),
        ])
    return _table(header, rows)


def side_by_side_table(records: Sequence[dict]) -> Optional[str]:
    """One row per shape and pass: 1-GPU time, then each distributed method's time and E, and the targets."""
    dist = [r for r in records if r.get("method") in ("usp", "torch_cp")]
    if not dist or not any(r.get("method") in ("kernel_full", "torch_cp") for r in records):
        return None
    labels = sorted({r["label"] for r in dist}, key=lambda l: (not l.startswith("usp"), l))
    groups: "OrderedDict[tuple, Dict[str, dict]]" = OrderedDict()
    for r in sorted(records, key=_sort_key):
        key = (bc.config_key(r), r["mode"], r.get("device_name"))
        groups.setdefault(key, {})
        if r.get("method") in ("usp", "torch_cp"):
            groups[key][r["label"]] = r
        elif r.get("method") == "kernel_full" and _trusted(r):
            groups[key].setdefault("_full_" + r.get("kernel", ""), r)
    header = ["seq", "heads", "mask", "pass", "1 GPU ms"] + [f"{l} ms (E)" for l in labels] + [
        "best usp E / target", "usp faster than CP?"]
    rows = []
    for (key, mode, _device), by_label in groups.items():
        members = [r for l, r in by_label.items() if not l.startswith("_")]
        if not members:
            continue
        any_r = members[0]
        fulls = {l[6:]: r for l, r in by_label.items() if l.startswith("_full_")}
        usp_kernel = next((r.get("kernel") for r in members if r["method"] == "usp"), None)
        full = fulls.get(usp_kernel) or (next(iter(fulls.values())) if fulls else None)
        cells = []
        for label in labels:
            r = by_label.get(label)
            if r is None:
                cells.append("")
            elif _trusted(r):
                cells.append(f"{_ms(r['median_ms'])} ({fmt(r.get('efficiency'))})")
            else:
                cells.append(r.get("status", "?") if r.get("status") != "ok" else "CHECK FAILED")
        usp_ok = [r for r in members if r["method"] == "usp" and _trusted(r)]
        cp_ok = [r for r in members if r["method"] == "torch_cp" and _trusted(r)]
        best_e = max((r["efficiency"] for r in usp_ok if r.get("efficiency") is not None), default=None)
        target = E_TARGETS.get(_cfg(any_r)["seqlen"]) if mode == "fwdbwd" else None
        e_cell = fmt(best_e)
        if target is not None and best_e is not None:
            e_cell += f" / {target} {'✓' if best_e >= target else '✗'}"
        if usp_ok and cp_ok:
            fastest_cp = min(r["median_ms"] for r in cp_ok)
            slow_usp = max(r["median_ms"] for r in usp_ok)
            faster = "yes" if slow_usp < fastest_cp else "no"
            faster += f" ({fastest_cp / min(r['median_ms'] for r in usp_ok):.2f}× best)"
        else:
            faster = "–"
        rows.append([bc.format_tokens(_cfg(any_r)["seqlen"]), _heads(any_r), _causal(any_r), _mode(mode),
                     _ms(full["median_ms"]) if full else "–"] + cells + [e_cell, faster])
    return _table(header, rows)


def scale_table(records: Sequence[dict]) -> Optional[str]:
    rows_src = [r for r in records if r.get("suite") == "scale" and r.get("method") == "usp"]
    if not rows_src:
        return None
    header = ["seq", "heads", "mesh", "status", "fwd+bwd s", "TFLOP/s/GPU", "peak GiB/GPU", "analytic min GiB",
              "peak/min (target ≤ 1.2)"]
    rows = []
    for r in sorted(rows_src, key=lambda r: (r.get("variant", ""), _cfg(r)["seqlen"])):
        good = _trusted(r)
        ratio = r.get("mem_ratio")
        ratio_cell = "–" if ratio is None else f"{ratio:.2f} {'✓' if ratio <= MEMORY_TARGET else '✗'}"
        rows.append([bc.format_tokens(_cfg(r)["seqlen"]), _heads(r), r.get("variant"),
                     r.get("status") if r.get("status") == "ok" else f"{r.get('status')}: "
                     f"{(r.get('reason') or '')[:60]}".replace("|", "/"),
                     fmt(r["median_ms"] / 1e3) if good else "–", fmt(r.get("tflops_per_gpu")) if good else "–",
                     _gib(r.get("peak_mem_bytes")), _gib(r.get("mem_min_bytes")), ratio_cell])
    longest = max((_cfg(r)["seqlen"] for r in rows_src if _trusted(r)), default=None)
    note = (f"\nLongest sequence that ran: {bc.format_tokens(longest) if longest else 'none'} "
            f"(target ≥ {bc.format_tokens(SCALE_TARGET_TOKENS)}: "
            f"{'met' if longest and longest >= SCALE_TARGET_TOKENS else 'NOT met'}).")
    return _table(header, rows) + note


def planner_table(records: Sequence[dict]) -> Optional[str]:
    rows_src = [r for r in records if r.get("method") == "usp" and "prediction" in r]
    if not rows_src:
        return None
    groups: "OrderedDict[tuple, List[dict]]" = OrderedDict()
    for r in sorted(rows_src, key=_sort_key):
        groups.setdefault((bc.config_key(r), r["mode"]), []).append(r)
    header = ["seq", "heads", "mask", "pass", "mesh", "measured ms", "predicted ms", "error", "within ±15%",
              "ranking right"]
    rows, within, total, ranked, ranked_ok = [], 0, 0, 0, 0
    for (_, mode), members in groups.items():
        measured = {r["variant"]: r["median_ms"] for r in members if _trusted(r)}
        predicted = {r["variant"]: r.get("predicted_ms") for r in members if r.get("predicted_ms") is not None}
        ranking = "–"
        if len(measured) > 1 and set(measured) <= set(predicted):
            ranked += 1
            ok = min(measured, key=measured.get) == min(predicted, key=predicted.get)
            ranked_ok += ok
            ranking = "yes" if ok else "NO"
        for r in members:
            meas, pred = measured.get(r["variant"]), r.get("predicted_ms")
            err = None if meas is None or pred is None else (pred - meas) / meas
            if err is not None:
                total += 1
                within += abs(err) <= 0.15
            note = r["prediction"].get("error")
            rows.append([bc.format_tokens(_cfg(r)["seqlen"]), _heads(r), _causal(r), _mode(mode), r["variant"],
                         _ms(meas), _ms(pred) if pred is not None else (note or "–")[:60].replace("|", "/"),
                         "–" if err is None else f"{err * 100:+.1f}%",
                         "–" if err is None else ("yes" if abs(err) <= 0.15 else "NO"), ranking])
    topo = sorted({str(r["prediction"].get("topology")) for r in rows_src if r["prediction"].get("topology")})
    notes = sorted({str(r["prediction"].get("note")) for r in rows_src if r["prediction"].get("note")})
    summary = (f"\nWithin ±15%: {within}/{total}; ranking right: {ranked_ok}/{ranked} shapes. "
               f"Topology: {', '.join(topo) or '–'}." + (f" Notes: {'; '.join(notes)}." if notes else ""))
    return _table(header, rows) + summary


def render_section(records: Sequence[dict], title: str, plot_path: Optional[str] = None,
                   plot_link: Optional[str] = None) -> str:
    """The Markdown section for ``records`` (E and ratio derived here); also draws the plot when a path is given."""
    records = bc.derive(records)
    parts = [f"## {title}", ""] + header_lines(records) + [""]
    side = side_by_side_table(records)
    if side:
        parts += ["### Side by side (time in ms, E = T_1GPU / (P·T_P))", "", side, ""]
    scale = scale_table(records)
    if scale:
        parts += ["### Longest sequence and memory", "", scale, ""]
    planner = planner_table(records)
    if planner:
        parts += ["### Planner: predicted vs measured", "", planner, ""]
    parts += ["### All measurements", "", detail_table(records), ""]
    if plot_path:
        drawn = plot(records, plot_path)
        if drawn:
            parts += [f"![time and memory vs sequence length]({plot_link or plot_path})", ""]
    return "\n".join(parts)


# ----------------------------------------------------------------------------------------------- plot
def plot(records: Sequence[dict], path: str) -> bool:
    """Time (fwd+bwd where measured, else fwd) and peak memory vs sequence length, one row per head/mask config."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        print("warning: matplotlib missing (pip install matplotlib); no plot", file=sys.stderr)
        return False
    good = [r for r in records if _trusted(r)]
    if not good:
        return False
    mode = "fwdbwd" if any(r["mode"] == "fwdbwd" for r in good) else "fwd"
    good = [r for r in good if r["mode"] == mode]
    panels: "OrderedDict[tuple, List[dict]]" = OrderedDict()
    for r in sorted(good, key=_sort_key):
        c = _cfg(r)
        panels.setdefault((c["heads"], c["kv_heads"], c["head_dim"], c["causal"]), []).append(r)
    fig, axes = plt.subplots(len(panels), 2, figsize=(11, 3.6 * len(panels)), squeeze=False)
    for row, ((h, hkv, d, causal), members) in enumerate(panels.items()):
        series: "OrderedDict[str, List[Tuple[int, dict]]]" = OrderedDict()
        for r in members:
            series.setdefault(f"{r['label']} [{r.get('kernel')}]", []).append((_cfg(r)["seqlen"], r))
        for name, points in series.items():
            points.sort(key=lambda p: p[0])
            xs = [p[0] for p in points]
            axes[row][0].plot(xs, [p[1]["median_ms"] for p in points], marker="o", label=name)
            mem = [(x, p[1]["peak_mem_bytes"] / bc.GiB) for x, p in zip(xs, points) if p[1].get("peak_mem_bytes")]
            if mem:
                axes[row][1].plot([m[0] for m in mem], [m[1] for m in mem], marker="o", label=name)
        mins = sorted({(_cfg(r)["seqlen"], r["mem_min_bytes"] / bc.GiB) for r in members
                       if r["method"] == "usp" and r.get("mem_min_bytes")})
        if mins:
            axes[row][1].plot([m[0] for m in mins], [m[1] for m in mins], "k--", label="analytic min (usp shard)")
        title = f"heads {h}/{hkv}, d={d}, {'causal' if causal else 'non-causal'}"
        axes[row][0].set_title(f"{_mode(mode)} time: {title}", fontsize=9)
        axes[row][1].set_title(f"peak memory per GPU: {title}", fontsize=9)
        axes[row][0].set_ylabel("ms")
        axes[row][1].set_ylabel("GiB")
        xs_all = sorted({_cfg(r)["seqlen"] for r in members})
        for ax in axes[row]:
            ax.set_xscale("log", base=2)
            ax.set_xticks(xs_all)
            ax.set_xticklabels([bc.format_tokens(x) for x in xs_all])
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            ax.set_yscale("log")
            ax.set_xlabel("total sequence length (tokens)")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------------------------- RESULTS.md
RESULTS_PREAMBLE = """# Benchmark results

Sections are written by `benchmarks/report.py` from the JSON records of `benchmarks/bench_attention.py`; each says
the device, versions, command and date it was measured with. Column meanings: `benchmarks/README.md`.
"""


def section_id(records: Sequence[dict]) -> str:
    runs = sorted({(r.get("run") or {}).get("run_id", "?") for r in records})
    return hashlib.sha1("\n".join(runs).encode()).hexdigest()[:10]


def upsert_section(results_path: str, sid: str, body: str) -> str:
    """Replace the section marked ``sid`` in ``results_path`` or append it; returns 'replaced' or 'appended'."""
    begin, end = f"<!-- section {sid} -->", f"<!-- /section {sid} -->"
    block = f"{begin}\n{body.rstrip()}\n{end}\n"
    text = RESULTS_PREAMBLE
    if os.path.exists(results_path):
        with open(results_path, encoding="utf-8") as handle:
            text = handle.read()
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text, action = head + block.rstrip("\n") + tail, "replaced"
    else:
        text, action = text.rstrip("\n") + "\n\n" + block, "appended"
    with open(results_path, "w", encoding="utf-8") as handle:
        handle.write(text)
    return action


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("inputs", nargs="+", help=".jsonl/.json files or folders of them")
    p.add_argument("--results", default=os.path.join(_HERE, "RESULTS.md"), help="Markdown file to update")
    p.add_argument("--plots", default=os.path.join(_HERE, "plots"), help="folder for the PNG")
    p.add_argument("--title", default=None, help="section title (default: suites and date)")
    p.add_argument("--topology", default=None,
                   help="planner topology (preset or YAML from usp-plan probe) for predicted times")
    p.add_argument("--no-predict", action="store_true", help="leave out the planner's predictions")
    p.add_argument("--stdout", action="store_true", help="print the section; write neither RESULTS.md nor PNG")
    args = p.parse_args(argv)

    records = load(args.inputs)
    if not records:
        print("no records found in " + ", ".join(args.inputs), file=sys.stderr)
        return 1
    if not args.no_predict:
        import planner_adapter

        predictor = planner_adapter.planner_predictor(args.topology)
        if predictor is None:
            print("note: usp.planner.predict unavailable; no predicted times", file=sys.stderr)
        records = planner_adapter.add_predictions(records, predictor)
    sid = section_id(records)
    suites = sorted({r.get("suite", "?") for r in records})
    dates = sorted({(r.get("run") or {}).get("date", "?")[:10] for r in records})
    title = args.title or f"{', '.join(suites)} — {', '.join(dates)}"
    if args.stdout:
        print(render_section(records, title))
        return 0
    plot_path = os.path.join(args.plots, f"{sid}.png")
    link = os.path.relpath(plot_path, os.path.dirname(os.path.abspath(args.results)))
    body = render_section(records, title, plot_path=plot_path, plot_link=link)
    action = upsert_section(args.results, sid, body)
    print(f"{action} section {sid} ({len(records)} records) in {args.results}; plot {plot_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
