"""Formulas and record handling shared by ``bench_attention.py`` (on the GPU machine) and ``report.py`` (anywhere).

Nothing here imports torch, so the report runs on a machine without it.

Legend: ``b`` batch, ``s`` global sequence length, ``s_loc = s / P`` the local shard, ``h`` query heads, ``h_kv``
key/value heads, ``d`` head_dim, ``B`` bytes per element of the input dtype, ``P`` GPUs of the measurement.

Note [FLOP count]. Forward attention is two matmuls of ``2·b·h·s²·d`` FLOPs each, so ``4·b·h·s²·d``, halved
when causal (only the lower triangle is computed). Forward+backward is counted as 3.5x the forward (backward = 2.5x:
five matmuls instead of two), the convention of FlashAttention's benchmarks (``RESULTS.md``, reference measurements).
TFLOP/s per GPU = FLOPs of the whole problem / (P · time).

Note [analytic minimum memory]. What one attention layer's forward+backward cannot avoid holding per GPU for its
local shard (``s_loc`` tokens): the inputs ``q`` (``h`` heads), ``k``, ``v`` (``h_kv`` heads each), the output
``out`` (``h`` heads), the gradients of all four (``dq``, ``dk``, ``dv`` and the incoming ``dout``), and the
float32 log-sum-exp saved for backward::

    M_min(fwd+bwd) = 2 · b·s_loc·d·B · (2·h + 2·h_kv)  +  4 · b·h·s_loc
                     ^ tensors and their gradients       ^ LSE, float32

    M_min(fwd)     =     b·s_loc·d·B · (2·h + 2·h_kv)  +  4 · b·h·s_loc      (q, k, v, out, LSE)

Example: 1M tokens on 2 GPUs, GQA 32/8, d=128, bf16: s_loc = 524288, M_min = 2·524288·128·2·(64+16) + 4·32·524288
= 20.0 GiB + 64 MiB. The peak measured by ``torch.cuda.max_memory_allocated`` includes the inputs, so the two are
directly comparable; the issue's target is peak / M_min ≤ 1.2.
"""
from __future__ import annotations

import math
import re
import statistics
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

GiB = 1024**3
MiB = 1024**2

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "float64": 8}

#: Single-GPU fwd / fwd+bwd TFLOP/s on one H100 (``RESULTS.md``, reference measurements), used only to *estimate* how long a suite will take.
NOMINAL_TFLOPS = {
    "fa4": (680.0, 650.0),
    "fa2": (350.0, 320.0),
    "cudnn": (610.0, 570.0),
    "torch_flash": (350.0, 320.0),
    "reference": (0.02, 0.01),  # CPU / debugging; estimates for it are meaningless
}

_SEQLEN_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmM]?)\s*$")


def parse_seqlen(text) -> int:
    """Tokens from ``131072``, ``"128k"``, ``"128K"``, ``"1M"``, ``"1.5M"`` (k = 1024, M = 1024**2)."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        match = _SEQLEN_RE.match(str(text))
        if not match:
            raise ValueError(f"sequence length {text!r} is not valid (expected e.g. 32768, 32k, 1M, 1.5M)")
        number, suffix = match.groups()
        scaled = float(number) * {"": 1, "k": 1024, "m": 1024**2}[suffix.lower()]
        if not scaled.is_integer():
            raise ValueError(f"sequence length {text!r} is not a whole number of tokens")
        value = int(scaled)
    if value < 1:
        raise ValueError(f"sequence length must be positive, got {text!r}")
    return value


def format_tokens(tokens: int) -> str:
    """131072 -> '128K', 1572864 -> '1.5M', 100 -> '100'."""
    if tokens >= 1024**2 and (tokens * 4) % 1024**2 == 0:
        value = tokens / 1024**2
        return f"{value:g}M"
    if tokens >= 1024 and tokens % 1024 == 0:
        return f"{tokens // 1024}K"
    return str(tokens)


def parse_heads(text: str) -> Tuple[int, int]:
    """``"32"`` -> (32, 32); ``"32/8"`` -> (32, 8) (query heads / KV heads)."""
    parts = str(text).split("/")
    try:
        if len(parts) == 1:
            heads = kv = int(parts[0])
        elif len(parts) == 2:
            heads, kv = int(parts[0]), int(parts[1])
        else:
            raise ValueError
    except ValueError:
        raise ValueError(f"heads {text!r} is not valid (expected e.g. 32 or 32/8 for query/KV heads)") from None
    if heads < 1 or kv < 1 or heads % kv:
        raise ValueError(f"heads {text!r}: query heads must be a positive multiple of KV heads")
    return heads, kv


def parse_mesh(text: str) -> Tuple[int, int]:
    """``"1x2"`` -> (ulysses=1, ring=2): Ulysses degree first, as in ``SequenceParallelMesh(ulysses=U, ring=R)``."""
    match = re.match(r"^\s*(\d+)\s*[xX×]\s*(\d+)\s*$", str(text))
    if not match or int(match.group(1)) < 1 or int(match.group(2)) < 1:
        raise ValueError(f"mesh {text!r} is not valid (expected UxR, e.g. 1x2 for ring 2 or 2x1 for Ulysses 2)")
    return int(match.group(1)), int(match.group(2))


def attention_flops(batch: int, heads: int, seqlen: int, head_dim: int, causal: bool, mode: str) -> float:
    """FLOPs of one attention over the whole sequence (Note [FLOP count])."""
    forward = 4.0 * batch * heads * seqlen * seqlen * head_dim * (0.5 if causal else 1.0)
    if mode == "fwd":
        return forward
    if mode == "fwdbwd":
        return 3.5 * forward
    raise ValueError(f"mode={mode!r}; valid values: 'fwd', 'fwdbwd'")


def min_memory_bytes(batch: int, seqlen_local: int, heads: int, kv_heads: int, head_dim: int, dtype_bytes: int,
                     mode: str) -> int:
    """Analytic minimum bytes per GPU for the local shard (Note [analytic minimum memory])."""
    tensors = batch * seqlen_local * head_dim * dtype_bytes * (2 * heads + 2 * kv_heads)
    lse = 4 * batch * heads * seqlen_local
    if mode == "fwd":
        return tensors + lse
    if mode == "fwdbwd":
        return 2 * tensors + lse
    raise ValueError(f"mode={mode!r}; valid values: 'fwd', 'fwdbwd'")


def estimate_iteration_seconds(kernel: str, batch: int, heads: int, seqlen: int, head_dim: int, causal: bool,
                               mode: str, gpus: int, efficiency: float = 0.85) -> float:
    """Rough time of one iteration from ``NOMINAL_TFLOPS`` (for planning suites, never reported)."""
    rates = NOMINAL_TFLOPS.get(kernel, NOMINAL_TFLOPS["cudnn"])
    rate = rates[0 if mode == "fwd" else 1] * 1e12
    flops = attention_flops(batch, heads, seqlen, head_dim, causal, mode)
    eff = 1.0 if gpus == 1 else efficiency
    return flops / (gpus * rate * eff) + 2e-4


# ------------------------------------------------------------------------------------------------ records
CONFIG_FIELDS = ("seqlen", "batch", "heads", "kv_heads", "head_dim", "causal", "dtype")


def config_key(record: dict) -> tuple:
    return tuple(record["config"][f] for f in CONFIG_FIELDS)


def is_ok(record: dict) -> bool:
    return record.get("status") == "ok" and record.get("median_ms") is not None


def _latest(records: Iterable[dict]) -> Optional[dict]:
    best = None
    for r in records:
        if best is None or (r.get("run", {}).get("date", ""), r.get("seq", 0)) >= (
            best.get("run", {}).get("date", ""), best.get("seq", 0)
        ):
            best = r
    return best


def derive(records: Sequence[dict]) -> List[dict]:
    """Attach the two efficiencies to every distributed record (a new list of shallow copies).

    * ``E = T_1GPU(full) / (P · T_P)`` against the single-GPU record of the *same kernel*, device, shape and mode;
    * ``ratio_rfa = P · T_kernel(local shard) / T_P`` (ring-flash-attention's "theoretic" ratio).

    When several baselines match (split runs, reruns), the one from the same run is used, else the latest.
    """
    baselines: Dict[tuple, List[dict]] = {}
    for r in records:
        if r.get("method") in ("kernel_full", "kernel_local") and is_ok(r):
            key = (r["method"], r.get("device_name"), r.get("kernel"), r["mode"], config_key(r), r.get("shard_of", 1))
            baselines.setdefault(key, []).append(r)

    def pick(key, run_id):
        candidates = baselines.get(key, [])
        same_run = [c for c in candidates if c.get("run", {}).get("run_id") == run_id]
        return _latest(same_run or candidates)

    out = []
    for r in records:
        r = dict(r)
        if r.get("method") in ("usp", "torch_cp") and is_ok(r):
            p = r["gpus"]
            run_id = r.get("run", {}).get("run_id")
            full = pick(("kernel_full", r.get("device_name"), r.get("kernel"), r["mode"], config_key(r), 1), run_id)
            local = pick(("kernel_local", r.get("device_name"), r.get("kernel"), r["mode"], config_key(r), p), run_id)
            r["t1gpu_ms"] = full["median_ms"] if full else None
            r["tlocal_ms"] = local["median_ms"] if local else None
            r["efficiency"] = full["median_ms"] / (p * r["median_ms"]) if full else None
            r["ratio_rfa"] = p * local["median_ms"] / r["median_ms"] if local else None
        out.append(r)
    return out


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def fmt(value, digits: int = 3, none: str = "–") -> str:
    """Compact number formatting for tables."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return none
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.{digits - 1}f}" if abs(value) >= 1 else f"{value:.{digits}f}"
