"""``planner.layout`` restates the core's pure layout rules without torch: it must agree with them everywhere."""
import pytest
import usp.attention
import usp.mesh
import usp.ulysses

from usp.planner import layout
from usp.planner.search import plan

HEADS = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 40, 64, 96, 128]


def test_rank_grid_matches_the_mesh():
    for world in (1, 2, 6, 8, 12, 24, 32):
        for sp in [d for d in range(1, world + 1) if world % d == 0]:
            for u in [d for d in range(1, sp + 1) if sp % d == 0]:
                for placement in usp.mesh.Placement:
                    want = usp.mesh.sequence_parallel_rank_grid(world, u, sp // u, placement)
                    assert layout.rank_grid(world, u, sp // u, placement.value) == want


@pytest.mark.parametrize("heads", HEADS)
def test_head_rules_match_the_core(heads):
    for kv in [d for d in range(1, heads + 1) if heads % d == 0]:
        for u in [d for d in range(1, heads + 1) if heads % d == 0]:
            assert layout.kv_replication(kv, u) == usp.attention.kv_replication(kv, u)
            assert layout.valid_head_chunks(heads, kv, u) == usp.attention.valid_head_chunks(heads, kv, u)
            kv_used = layout.replicated_kv_heads(kv, u)
            for chunks in layout.valid_head_chunks(heads, kv, u):
                assert layout.head_groups(heads, kv_used, u, chunks) == usp.ulysses.head_groups(heads, kv_used, u,
                                                                                                  chunks)


def test_placement_names_match_the_core():
    for text in ("ulysses_inner", "ring_inner", "head_first", "ring-first", "Ulysses_First", usp.mesh.Placement.RING_INNER):
        assert layout.parse_placement(text) == usp.mesh.Placement.parse(text).value
    with pytest.raises(ValueError, match="valid values: 'ulysses_inner', 'ring_inner'"):
        layout.parse_placement("sideways")


def test_planning_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, planner; planner.plan(64, '1M', 32, 8); print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"
    assert plan(8, "32k", 32, 8).ulysses > 0


def test_divisors():
    for n in (1, 2, 12, 36, 97, 1024, 65536):
        assert layout.divisors(n) == [d for d in range(1, n + 1) if n % d == 0]
