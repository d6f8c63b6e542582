"""Predicted times for measured records: the planner's side of the accuracy table (issue 3, item 9).

Kept apart from the harness so the report can re-predict old measurements after the cost model changes, without
running anything on a GPU. A *predictor* is any callable ``record -> {"fwd_ms", "bwd_ms", "fwdbwd_ms", ...} | None``;
``planner_predictor`` builds one from the ``usp.planner`` package, ``add_predictions`` attaches predictions to records.
"""
from __future__ import annotations

from typing import Callable, Iterable, List, Optional

Predictor = Callable[[dict], Optional[dict]]

#: the preset that describes the machine of RESULTS.md's reference measurements, used when the records come from 2 H100s and none is given
_H100_PAIR_PRESET = "h100-nvlink-2x"


def planner_predictor(topology: Optional[str] = None) -> Optional[Predictor]:
    """A predictor backed by ``usp.planner.predict(ulysses, ring, seqlen, heads, ...)``, or None if it is unavailable.

    ``topology``: a planner preset name or a YAML path (e.g. written by ``usp-plan probe`` on the GPU machine);
    default: the ``h100-nvlink-2x`` preset for records from 2 H100s, else the planner's default.
    """
    try:
        from usp import planner

        predict = planner.predict
    except Exception:  # planner missing or without predict()
        return None

    def predictor(record: dict) -> Optional[dict]:
        mesh = record.get("mesh")
        if record.get("method") != "usp" or not mesh:
            return None
        c = record["config"]
        topo = topology
        if topo is None and "H100" in str(record.get("device_name")) and record.get("gpus") == 2:
            topo = _H100_PAIR_PRESET
        kwargs = dict(seqlen=c["seqlen"], heads=c["heads"], kv_heads=c["kv_heads"], head_dim=c["head_dim"],
                      batch=c["batch"], dtype=c["dtype"], causal=c["causal"], topology=topo,
                      world_size=record.get("gpus"), head_chunks=record.get("head_chunks") or 1)
        candidate, note = None, ""
        for kernel in (record.get("kernel"), "auto"):
            try:
                candidate = predict(mesh["ulysses"], mesh["ring"], kernel=kernel, **kwargs)
                note = "" if kernel == record.get("kernel") else f"kernel {record.get('kernel')!r} unknown: auto"
                break
            except TypeError:  # an older predict() without the kernel keyword
                try:
                    candidate = predict(mesh["ulysses"], mesh["ring"], **kwargs)
                    break
                except Exception as exc:  # noqa: BLE001
                    return {"error": f"{type(exc).__name__}: {exc}"}
            except Exception as exc:  # noqa: BLE001 - unknown kernel name: retry with auto
                note = f"{type(exc).__name__}: {exc}"
        if candidate is None or getattr(candidate, "forward", None) is None:
            return {"error": note or "no prediction"}
        fwd = candidate.forward.total
        bwd = candidate.backward.total if candidate.backward is not None else None
        return {
            "fwd_ms": fwd * 1e3,
            "bwd_ms": None if bwd is None else bwd * 1e3,
            "fwdbwd_ms": None if bwd is None else (fwd + bwd) * 1e3,
            "feasible": getattr(candidate, "feasible", None),
            "topology": topo or "planner default",
            "note": note,
        }

    return predictor


def add_predictions(records: Iterable[dict], predictor: Optional[Predictor]) -> List[dict]:
    """Copies of ``records`` with ``prediction`` (the predictor's dict) and ``predicted_ms`` for the record's mode."""
    out = []
    for record in records:
        record = dict(record)
        if predictor is not None and record.get("method") == "usp":
            try:
                prediction = predictor(record)
            except Exception as exc:  # noqa: BLE001 - a broken model must not break the report
                prediction = {"error": f"{type(exc).__name__}: {exc}"}
            if prediction:
                record["prediction"] = prediction
                record["predicted_ms"] = prediction.get("fwd_ms" if record["mode"] == "fwd" else "fwdbwd_ms")
        out.append(record)
    return out
