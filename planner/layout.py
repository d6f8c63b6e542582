"""The core's layout rules the planner needs, without importing torch.

The runtime states these rules in ``usp/mesh.py`` (``sequence_parallel_rank_grid``, ``Placement``),
``usp/attention.py`` (``kv_replication``, ``valid_head_chunks``) and ``usp/ulysses.py`` (``head_groups``). Those
modules import torch (1.4 s and ~220 MB on a 2-core CPU), which a dry run of ``usp-plan`` must not pay (issue 16:
under 1 s for 8-64 GPUs). So the planner restates the few pure functions here, and
``tests/planner/test_planner_layout.py`` checks, over a grid of arguments, that every one of them returns what the
core's returns: the two statements cannot drift apart unnoticed.

Rank layout (``usp/mesh.py``): ranks are ``data_parallel x (ulysses x ring)``; the block of ``P = U * R`` ranks of
one data-parallel replica is contiguous, and inside it
  * ``ulysses_inner``: ``rank = dp * P + ring_rank * U + ulysses_rank``;
  * ``ring_inner``:    ``rank = dp * P + ulysses_rank * R + ring_rank``.
"""
from __future__ import annotations

import math
from typing import List, Tuple

__all__ = ["PLACEMENTS", "parse_placement", "rank_grid", "kv_replication", "replicated_kv_heads", "head_groups",
           "valid_head_chunks", "ulysses_stride", "ring_stride"]

PLACEMENTS = ("ulysses_inner", "ring_inner")
_ALIASES = {"head_first": "ulysses_inner", "ulysses_first": "ulysses_inner", "ring_first": "ring_inner"}


def parse_placement(value, argument: str = "placement") -> str:
    """A placement name from a string, an alias ("head_first", "ring_first") or a ``usp.Placement``."""
    text = getattr(value, "value", value)
    if isinstance(text, str):
        normalized = text.strip().lower().replace("-", "_")
        normalized = _ALIASES.get(normalized, normalized)
        if normalized in PLACEMENTS:
            return normalized
    raise ValueError(f"{argument}={value!r} is not a valid placement; valid values: "
                     + ", ".join(repr(p) for p in PLACEMENTS))


def ulysses_stride(ulysses: int, ring: int, placement: str) -> int:
    """Rank distance between consecutive members of a Ulysses group."""
    return 1 if placement == "ulysses_inner" else ring


def ring_stride(ulysses: int, ring: int, placement: str) -> int:
    """Rank distance between consecutive members of a ring (before the wrap-around)."""
    return ulysses if placement == "ulysses_inner" else 1


def rank_grid(world_size: int, ulysses: int, ring: int, placement: str) -> List[List[List[int]]]:
    """``grid[dp][ring_rank][ulysses_rank]`` global ranks (``usp.mesh.sequence_parallel_rank_grid``)."""
    sp = ulysses * ring
    u_stride, r_stride = ulysses_stride(ulysses, ring, placement), ring_stride(ulysses, ring, placement)
    return [[[b * sp + r * r_stride + u * u_stride for u in range(ulysses)] for r in range(ring)]
            for b in range(world_size // sp)]


def kv_replication(kv_heads: int, ulysses: int) -> int:
    """How many times each K/V head is repeated so that ``ulysses`` divides the K/V heads (``usp.attention``)."""
    return math.lcm(kv_heads, ulysses) // kv_heads


def replicated_kv_heads(kv_heads: int, ulysses: int) -> int:
    """``Hkv'``: K/V heads after replication (lcm when ``ulysses`` does not divide them)."""
    return kv_heads * kv_replication(kv_heads, ulysses)


def head_groups(heads: int, kv_heads: int, ulysses: int, head_chunks: int = 1) -> int:
    """Head-group pipeline depth ``G`` (``usp.ulysses.head_groups``; ``kv_heads`` already replicated)."""
    if ulysses == 1:
        return 1
    q_local, kv_local = heads // ulysses, kv_heads // ulysses
    if q_local % (2 * head_chunks) or kv_local % 2:
        return 1
    kv_group = kv_local // 2
    return 2 if kv_group % head_chunks == 0 or head_chunks % kv_group == 0 else 1


def valid_head_chunks(heads: int, kv_heads: int, ulysses: int) -> List[int]:
    """Valid ``head_chunks`` (``usp.attention.valid_head_chunks``): divisors of the query heads per Ulysses rank
    that divide its K/V heads, or are a multiple of them when the K/V heads are not replicated."""
    replicated = kv_replication(kv_heads, ulysses) > 1
    q_local, kv_local = heads // ulysses, kv_heads * kv_replication(kv_heads, ulysses) // ulysses
    return [c for c in range(1, q_local + 1)
            if q_local % c == 0 and (kv_local % c == 0 or (c % kv_local == 0 and not replicated))]


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


def group_hosts(first: int, stride: int, count: int, gpus_per_host: int) -> Tuple[int, int]:
    """(first host, last host) of the ranks ``first + k * stride``, ``k < count`` (hosts of ``gpus_per_host``)."""
    return first // gpus_per_host, (first + (count - 1) * stride) // gpus_per_host
