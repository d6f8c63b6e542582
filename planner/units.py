"""Small parsers and formatters shared by the planner, its CLI and its YAML files.

Nothing here imports torch: a ``torch.dtype`` is recognised by its string form (``"torch.bfloat16"``), so the CLI
and dry runs stay fast and have no import-time side effects.
"""
from __future__ import annotations

import math
import re
from typing import Any, List, Optional, Union

__all__ = [
    "PlannerError",
    "parse_seqlen",
    "parse_bytes",
    "parse_memory_limit",
    "canonical_dtype",
    "dtype_bytes",
    "format_tokens",
    "format_bytes",
    "format_seconds",
    "seconds_unit",
    "format_in_unit",
    "divisors",
]


class PlannerError(ValueError):
    """Bad planner input. The message is one line naming the argument (or YAML key) and the valid values.

    The CLI prints exactly this message and exits with status 2, so API and CLI report the same text.
    """


_SEQLEN_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMgG]?)\s*$")
_SEQLEN_SCALE = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def parse_seqlen(value: Union[int, str], argument: str = "seqlen") -> int:
    """Tokens from ``131072``, ``"128k"``, ``"128K"``, ``"1M"``, ``"1m"`` or ``"1.5M"`` (k = 1024, M = 1024**2).

    Raises PlannerError for anything that is not a positive whole number of tokens.
    """
    if isinstance(value, bool):
        raise PlannerError(f"{argument}={value!r} is not a sequence length (expected e.g. 131072, 128k, 1M)")
    if isinstance(value, int):
        tokens = value
    elif isinstance(value, float) and value.is_integer():
        tokens = int(value)
    elif isinstance(value, str):
        match = _SEQLEN_RE.match(value)
        if not match:
            raise PlannerError(f"{argument}={value!r} is not a sequence length (expected e.g. 131072, 128k, 1M)")
        number, suffix = match.groups()
        scaled = float(number) * _SEQLEN_SCALE[suffix.lower()]
        if not scaled.is_integer():
            raise PlannerError(f"{argument}={value!r} is not a whole number of tokens")
        tokens = int(scaled)
    else:
        raise PlannerError(f"{argument}={value!r} is not a sequence length (expected e.g. 131072, 128k, 1M)")
    if tokens < 1:
        raise PlannerError(f"{argument} must be a positive number of tokens, got {value!r}")
    return tokens


_BYTES_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(i?)([bB]?)\s*$")
_BYTES_POWER = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}


def parse_bytes(value: Union[int, float, str], argument: str = "size", default_unit: str = "") -> int:
    """Bytes from ``1048576``, ``"1MiB"``, ``"64M"`` (binary), ``"40GB"`` (decimal), ``"40G"`` (binary).

    A bare number is in ``default_unit`` ("" = bytes, "GiB", "MiB"). Suffixes with ``i`` or without ``B``
    are binary (1024-based); ``kB/MB/GB/TB`` are decimal.
    """
    if isinstance(value, bool):
        raise PlannerError(f"{argument}={value!r} is not a size (expected e.g. 40GiB, 64MiB, 1048576)")
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise PlannerError(f"{argument}={value!r} is not a size")
        number, power, binary = float(value), _unit_power(default_unit), True
    elif isinstance(value, str):
        match = _BYTES_RE.match(value)
        if not match:
            raise PlannerError(f"{argument}={value!r} is not a size (expected e.g. 40GiB, 64MiB, 1048576)")
        digits, prefix, i_flag, b_flag = match.groups()
        number = float(digits)
        if prefix:
            power = _BYTES_POWER[prefix.lower()]
            binary = bool(i_flag) or not b_flag
        else:
            if i_flag:
                raise PlannerError(f"{argument}={value!r} is not a size (expected e.g. 40GiB, 64MiB, 1048576)")
            power, binary = (_unit_power(default_unit), True) if not b_flag else (0, True)
    else:
        raise PlannerError(f"{argument}={value!r} is not a size (expected e.g. 40GiB, 64MiB, 1048576)")
    result = number * (1024 if binary else 1000) ** power
    if result <= 0:
        raise PlannerError(f"{argument} must be positive, got {value!r}")
    return int(round(result))


def _unit_power(unit: str) -> int:
    return {"": 0, "KiB": 1, "MiB": 2, "GiB": 3, "TiB": 4}[unit]


def parse_memory_limit(value: Optional[Union[int, float, str]], argument: str = "memory_limit",
                       default_unit: str = "") -> Optional[int]:
    """``None`` stays ``None`` (use the GPU's memory); otherwise bytes via :func:`parse_bytes`."""
    if value is None:
        return None
    return parse_bytes(value, argument, default_unit)


_DTYPES = {
    "bfloat16": ("bfloat16", 2), "bf16": ("bfloat16", 2),
    "float16": ("float16", 2), "fp16": ("float16", 2), "half": ("float16", 2),
    "float32": ("float32", 4), "fp32": ("float32", 4), "float": ("float32", 4),
    "float8_e4m3fn": ("float8_e4m3fn", 1), "fp8": ("float8_e4m3fn", 1),
}


def canonical_dtype(dtype: Any, argument: str = "dtype") -> str:
    """``"bfloat16"``, ``"float16"``, ``"float32"`` or ``"float8_e4m3fn"`` from a torch.dtype or a name."""
    name = str(dtype).strip().lower()
    if name.startswith("torch."):
        name = name[len("torch."):]
    if name in _DTYPES:
        return _DTYPES[name][0]
    valid = "bfloat16 (bf16), float16 (fp16), float32 (fp32), float8_e4m3fn (fp8)"
    raise PlannerError(f"{argument}={dtype!r} is not a supported dtype; valid values: {valid}")


def dtype_bytes(dtype: Any) -> int:
    """Bytes per element of a dtype accepted by :func:`canonical_dtype`."""
    return _DTYPES[canonical_dtype(dtype)][1]


def format_tokens(tokens: int) -> str:
    """131072 -> '128K', 1048576 -> '1M', 100000 -> '100000'."""
    for scale, suffix in ((1024**2, "M"), (1024, "K")):
        if tokens >= scale and tokens % scale == 0:
            return f"{tokens // scale}{suffix}"
    return str(tokens)


def format_bytes(num: float) -> str:
    """Binary units: 1.50 GiB, 64.0 MiB, 512 B."""
    for power, suffix in ((4, "TiB"), (3, "GiB"), (2, "MiB"), (1, "KiB")):
        if abs(num) >= 1024**power:
            return f"{num / 1024 ** power:.3g} {suffix}" if num / 1024**power < 100 else \
                f"{num / 1024 ** power:.0f} {suffix}"
    return f"{num:.0f} B"


def format_seconds(seconds: Optional[float]) -> str:
    """Milliseconds with 3 significant digits ('12.3 ms'), seconds above 10 s."""
    if seconds is None:
        return "-"
    if seconds >= 10:
        return f"{seconds:.1f} s"
    ms = seconds * 1e3
    if ms >= 100:
        return f"{ms:.0f} ms"
    if ms >= 10:
        return f"{ms:.1f} ms"
    return f"{ms:.2f} ms"


def seconds_unit(values) -> str:
    """One unit for a column or a line of times: "s" when the largest is 10 s or more, else "ms"."""
    largest = max((v for v in values if v is not None), default=0.0)
    return "s" if largest >= 10 else "ms"


def format_in_unit(seconds: Optional[float], unit: str) -> str:
    """A time in ``unit`` ("ms" or "s") with about 3 significant digits and no unit suffix ('6228', '16.8')."""
    if seconds is None:
        return "-"
    value = seconds * (1e3 if unit == "ms" else 1.0)
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def divisors(n: int) -> List[int]:
    """Divisors of ``n`` in increasing order (O(sqrt n))."""
    small, large = [], []
    d = 1
    while d * d <= n:
        if n % d == 0:
            small.append(d)
            if d * d != n:
                large.append(n // d)
        d += 1
    return small + large[::-1]
