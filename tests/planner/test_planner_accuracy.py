"""The cost model against every recorded fwd+bwd run of the current code (``benchmarks/data``): 2x H100 (targets,
16K-256K, the 32K repeat, 1M-2M with head chunks) and 2x H200 (targets), each predicted with the probe taken on
its machine. Issue 16: mean error within 5%, no run outside 10%.

Before the distributed overheads (``collectives.step_overhead_us``, ``collectives.compute_slowdown``) every run was
predicted low: mean -6.1% on H200 and -9% to -13% at 32K (``test_without_the_overheads_the_model_is_low``).

Packed documents (``test_packed_runs_are_predicted``): the recorded ``bench_varlen`` mixes on 2x H200 with
flash-attn 2, the kernel alone on one GPU, Ulysses 2x1 and ring 1x2 (issue 14: within 15%), priced with the
varlen points of the probe taken in the same session.
"""
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from usp import planner
from usp.planner import batch
from usp.planner.cost import CostModel, Shape

DATA = Path(__file__).resolve().parents[2] / "benchmarks" / "data"
H100 = DATA / "probe_h100x2_heads_20261125.yaml"
RUNS = [("targets_cudnn_20261125b.jsonl", H100), ("planner_cudnn_16k_256k_20261125b.jsonl", H100),
        ("targets_cudnn_32k_repeat_20261125.jsonl", H100), ("scale_chunks1_20261125.jsonl", H100),
        ("scale_chunks8_20261125.jsonl", H100), ("scale_chunks8b_20261125.jsonl", H100),
        ("scale_chunks16_20261125.jsonl", H100),
        ("targets_cudnn_h200x2_20261130.jsonl", DATA / "probe_h200x2_20261130.yaml")]


def errors(overheads: bool = True) -> list:
    """``[(file, seqlen, heads, kv_heads, causal, mesh, head_chunks, predicted / measured - 1)]``."""
    out = []
    for name, probe in RUNS:
        topo = planner.load_topology(str(probe))
        if not overheads:
            topo = dataclasses.replace(topo, collectives=dataclasses.replace(topo.collectives, step_overhead=0.0,
                                                                              compute_slowdown=0.0))
        for line in (DATA / name).read_text().splitlines():
            r = json.loads(line)
            if r.get("method") != "usp" or r.get("mode") != "fwdbwd" or r.get("status") != "ok":
                continue
            c, m = r["config"], r["mesh"]
            chunks = r.get("head_chunks") or 1
            p = planner.predict(m["ulysses"], m["ring"], c["seqlen"], c["heads"], c["kv_heads"],
                                head_dim=c["head_dim"], batch=c["batch"], dtype=c["dtype"], causal=c["causal"],
                                topology=topo, world_size=r["gpus"], kernel=r["kernel"], head_chunks=chunks)
            out.append((name, c["seqlen"], c["heads"], c["kv_heads"], c["causal"], f"{m['ulysses']}x{m['ring']}",
                        chunks, p.total * 1e3 / r["median_ms"] - 1))
    return out


def test_recorded_runs_are_predicted_within_bounds():
    errs = errors()
    assert len(errs) == 24 + 16 + 8 + 1 + 2 + 1 + 1 + 24
    mean = sum(e[-1] for e in errs) / len(errs)
    assert abs(mean) < 0.05, f"mean error {mean:+.1%}"
    worst = max(errs, key=lambda e: abs(e[-1]))
    assert abs(worst[-1]) <= 0.10, f"worst: {worst}"
    h200 = [e[-1] for e in errs if "h200" in e[0]]
    assert abs(sum(h200) / len(h200)) < 0.05


def test_without_the_overheads_the_model_is_low():
    errs = errors(overheads=False)
    assert all(e[-1] < 0.02 for e in errs)
    h200 = [e[-1] for e in errs if "h200" in e[0]]
    assert sum(h200) / len(h200) == pytest.approx(-0.061, abs=0.003)  # issue 16: "mean -6.1%"


# ------------------------------------------------------------------------------------------- packed documents
#: ``bench_varlen`` on 2x H200 with flash-attn 2, on the code the model prices (the document placement, padding
#: rows as sequences of the whole documents' call, the deferred call agreement), with the probe of the same GPUs
#: in the same session (its varlen points: the per-sequence rates)
PACKED = DATA / "gpu_20261130e" / "varlen_fa2.json"
PACKED_PROBE = DATA / "gpu_20261130e" / "probe_fa2.yaml"


def packed_errors() -> list:
    """``[(mix, tokens, what, predicted / measured - 1)]`` for every recorded point of ``PACKED``: ``what`` is
    ``1gpu`` (the varlen kernel alone over the whole batch, 32 heads), ``1gpu-half`` (every document halved),
    ``2x1`` (Ulysses: every document on every rank, 16 heads a call) or ``1x2`` (ring, on today's placement,
    checked to be the one the run recorded)."""
    topo = planner.load_topology(str(PACKED_PROBE))
    kernel, _ = topo.kernel("fa2", "bfloat16", 128)
    assert kernel.varlen and all(v.varlen for v in kernel.variants)  # priced from the varlen points
    out = []
    for r in json.loads(PACKED.read_text())["records"]:
        lengths = np.array(r["doc_lengths"])

        def predict(docs, ulysses, ring):
            shape = Shape(seqlen=int(docs.sum()), heads=r["heads"], kv_heads=r["kv_heads"], head_dim=r["head_dim"],
                          causal=r["causal"])
            sp = ulysses * ring
            f, b, _, cost = batch.evaluate_batch(CostModel(topo, sp, sp), shape, batch.documents(lengths=docs),
                                                 ulysses, ring, "ulysses_inner", kernel)
            return (f.total + b.total) * 1e3, cost

        for what, docs, ms in (("1gpu", lengths, r["t1_ms"]), ("1gpu-half", -(-lengths // 2),
                                                               r["t_kernel_local_shard_ms"])):
            out.append((r["mix"], r["total_tokens"], what, predict(docs, 1, 1)[0] / ms - 1))
        out.append((r["mix"], r["total_tokens"], "2x1", predict(lengths, 2, 1)[0] / r["meshes"]["2x1"]["tp_ms"] - 1))
        ran = r["meshes"]["1x2"]
        total, cost = predict(lengths, 1, 2)
        assert ((cost.cut_documents, cost.whole_documents, cost.cut_rows, cost.padding)
                == (ran["placement"]["cut"], sum(ran["placement"]["whole"]), ran["placement"]["cut_rows"],
                    ran["padding_tokens"])), r["mix"]  # the placement priced is the one that ran
        out.append((r["mix"], r["total_tokens"], "1x2", total / ran["tp_ms"] - 1))
    return out


def test_packed_runs_are_predicted():
    """Issue 14's target, +-15%, on every recorded point: 4 mixes, 128K-1M tokens. Achieved: the kernel alone within
    +6%, the splits within -13% (Ulysses on 128K tokens of 64-1022-token documents, where the layer's fixed
    costs weigh most) to +10%. Before the per-sequence rates of the varlen points (the fall-off form, fitted on
    H100 torch_flash) the many_tiny points were predicted 11% to 23% low."""
    errs = packed_errors()
    for e in errs:
        print(f"{e[0]:14s} {e[1]:8d} {e[2]:10s} {e[3]:+.1%}")
    assert len(errs) == 7 * 4
    for what in ("2x1", "1x2"):
        split = [e[3] for e in errs if e[2] == what]
        assert abs(sum(split) / len(split)) < 0.05, what
    for mix, tokens, what, err in errs:
        assert abs(err) <= (0.07 if what.startswith("1gpu") else 0.15), (mix, tokens, what, err)
