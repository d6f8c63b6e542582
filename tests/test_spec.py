"""``usp.spec``: the one statement of the rules the runtime, the planner and the tests share, importable without
torch. The runtime must use the spec's objects (not copies), the planner must price the spec's collective counts,
and ``import usp.planner`` / planning must work where torch cannot be imported at all."""
import subprocess
import sys

import pytest
import usp.spec as spec

HEADS = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 40, 64, 96, 128]


def test_the_runtime_uses_the_spec_itself():
    import usp
    import usp.attention
    import usp.layout
    import usp.mesh
    import usp.ulysses

    for module, names in ((usp.mesh, ("Placement", "sequence_parallel_rank_grid")),
                          (usp.layout, ("Layout", "choose_layout", "required_multiple", "normalize_window",
                                        "SlidingWindow", "band_pieces", "sliding_window")),
                          (usp.attention, ("kv_replication", "valid_head_chunks")),
                          (usp.ulysses, ("head_groups",)), (usp, ("Placement",))):
        for name in names:
            assert getattr(module, name) is getattr(spec, name), f"{module.__name__}.{name} is not usp.spec's"


def test_the_planner_uses_the_spec_itself():
    from usp.planner import cost, search, topology

    assert cost.head_groups is spec.head_groups and cost.replicated_kv_heads is spec.replicated_kv_heads
    assert cost.head_chunk_options is spec.valid_head_chunks and cost.PLACEMENTS == spec.PLACEMENTS
    assert cost.spec is spec and topology.spec is spec
    assert search.required_seqlen_multiple is spec.required_multiple


def test_rank_grid_is_the_documented_affine_layout():
    for world in (1, 2, 6, 8, 12, 24, 32):
        for sp in [d for d in range(1, world + 1) if world % d == 0]:
            for u in [d for d in range(1, sp + 1) if sp % d == 0]:
                r = sp // u
                for placement in spec.Placement:
                    grid = spec.sequence_parallel_rank_grid(world, u, r, placement)
                    assert grid == spec.sequence_parallel_rank_grid(world, u, r, placement.value)
                    for dp, block in enumerate(grid):
                        for ring_rank, row in enumerate(block):
                            for ulysses_rank, rank in enumerate(row):
                                inner = (ring_rank * u + ulysses_rank if placement is spec.Placement.ULYSSES_INNER
                                         else ulysses_rank * r + ring_rank)
                                assert rank == dp * sp + inner
                    assert sorted(x for b in grid for row in b for x in row) == list(range(world // sp * sp))


def test_rank_functions_are_the_grid():
    """``sequence_parallel_rank`` / ``_coords`` invert each other, and ``ring_peer`` / ``ulysses_group`` (what the
    planner's host classes load the links with) walk the grid the mesh builds its groups from."""
    for world in (4, 12, 24):
        for sp in [d for d in range(1, world + 1) if world % d == 0]:
            for u in [d for d in range(1, sp + 1) if sp % d == 0]:
                r = sp // u
                for placement in spec.PLACEMENTS:
                    grid = spec.sequence_parallel_rank_grid(world, u, r, placement)
                    assert spec.inner_axis_size(u, r, placement) == (u if placement == "ulysses_inner" else r)
                    for dp, block in enumerate(grid):
                        for ring_rank, row in enumerate(block):
                            assert spec.ulysses_group(row[-1], u, r, placement) == row
                            for ulysses_rank, rank in enumerate(row):
                                assert spec.sequence_parallel_coords(rank, u, r, placement) == (
                                    dp, ring_rank, ulysses_rank)
                                for step in (-1, 1, 2, r + 1):
                                    assert (spec.ring_peer(rank, step, u, r, placement)
                                            == block[(ring_rank + step) % r][ulysses_rank])


def test_the_planner_loads_the_grids_groups():
    """The planner's compact host classes find each rank's Ulysses partners and ring neighbours from the spec's
    rank layout: the same partners the grid's groups give (two hosts of 8 GPUs)."""
    from usp.planner.topology import Topology

    classes = Topology.preset("dgx-h100-cluster").host_classes(16)
    for u, r in ((1, 16), (2, 8), (4, 4), (8, 2), (16, 1)):
        for placement in spec.PLACEMENTS:
            grid = spec.sequence_parallel_rank_grid(16, u, r, placement)
            for block in grid:
                for row in block:
                    for x in row:
                        same, off = classes._a2a_partners(x, u, r, placement)
                        want = [y for y in row if y != x and y // classes.gph == x // classes.gph]
                        assert (sorted(same), off) == (sorted(want), u - 1 - len(want))


def test_the_dense_schedules_are_the_specs_blocks():
    """``usp.layout``'s dense schedules run ``spec.dense_block``; the ring's narrow sums are ``spec.narrow_sums``."""
    import usp.ring
    from usp.layout import FullSchedule, ZigzagCausalSchedule

    assert usp.ring.narrow_sums is spec.narrow_sums
    assert [spec.narrow_sums(r) for r in (1, 2, 3, 8)] == [True, True, False, False]
    # the sparse ring decides per rank from the terms a row sums (Note [sparse sums]): a window within one chunk
    # adds one neighbour's piece to the own one; 40,000 on 32K chunks reaches two chunks back, so chunk 3's first
    # rows (rank 0) sum their own piece and two of rank 1's, and rank 1's chunk-1 keys feed its own piece, chunk
    # 2's queries and rank 0's (a returned partial)
    assert [spec.SlidingWindow(True, 2, 0).row_terms(r, 8, 32) for r in range(8)] == [(2, 2)] * 8
    assert spec.SlidingWindow(True, 2, 0).narrow_sums(3, 8, 32) == (True, True)
    wide = spec.SlidingWindow(True, 40000, 0)
    assert [wide.row_terms(r, 2, 65536) for r in range(2)] == [(3, 2), (3, 3)]
    assert wide.narrow_sums(0, 2, 65536) == (False, True)
    for causal, schedule in ((True, ZigzagCausalSchedule(0.5)), (False, FullSchedule(0.5))):
        for ring in (1, 2, 3, 4, 8):
            for r in range(ring):
                for j in range(ring):
                    t = schedule.block(j, r, ring, 12)
                    assert (t.q_rows, t.kv_rows, t.causal, t.softcap) == spec.dense_block(causal, j, r, ring, 12) + (
                        0.5,)


def _rows(sl, n):
    return len(range(*sl.indices(n)))


@pytest.mark.parametrize("causal", [True, False])
def test_the_planner_prices_the_specs_blocks(causal):
    """The planner's blocks (``CostModel.blocks``: the diagonal, then the average visit) are the average of
    ``spec.dense_block`` over every ring rank and step >= 1, for any ring size: the area and the rows updated."""
    from usp.planner.cost import CostModel, Shape

    for ring in (2, 3, 4, 5, 8, 16):
        local = 16
        shape = Shape(seqlen=ring * local, heads=8, kv_heads=8, head_dim=64, causal=causal)
        blocks = CostModel.blocks(shape, ring)
        assert len(blocks) == ring
        diag = spec.dense_block(causal, 0, 0, ring, local)
        assert (blocks[0].q * blocks[0].k, blocks[0].causal) == (
            _rows(diag[0], local) * _rows(diag[1], local), diag[2])
        visits = [spec.dense_block(causal, j, r, ring, local) for j in range(1, ring) for r in range(ring)]
        area = sum(_rows(q, local) * _rows(k, local) for q, k, _ in visits) / len(visits)
        rows = sum(_rows(q, local) for q, _, _ in visits) / len(visits) / local
        for b in blocks[1:]:
            assert b.q * b.k == pytest.approx(area) and b.rows == pytest.approx(rows) and not b.causal
    assert CostModel.blocks(Shape(seqlen=64, heads=8, kv_heads=8, head_dim=64, causal=causal), 1)[0].q == 64


def test_placement_names():
    for text, want in (("ulysses_inner", "ulysses_inner"), ("ring_inner", "ring_inner"), ("head_first", "ulysses_inner"),
                       ("ring-first", "ring_inner"), ("Ulysses_First", "ulysses_inner"),
                       (spec.Placement.RING_INNER, "ring_inner")):
        assert spec.Placement.parse(text).value == want
    with pytest.raises(ValueError, match="placement='sideways' is not a valid placement; valid values: "
                                         "'ulysses_inner', 'ring_inner'"):
        spec.Placement.parse("sideways")
    assert spec.PLACEMENTS == ("ulysses_inner", "ring_inner")


@pytest.mark.parametrize("heads", HEADS)
def test_head_rules(heads):
    for kv in [d for d in range(1, heads + 1) if heads % d == 0]:
        for u in [d for d in range(1, heads + 1) if heads % d == 0]:
            kv_used = spec.replicated_kv_heads(kv, u)
            assert kv_used % u == 0 and heads % kv_used == 0 and kv_used == kv * spec.kv_replication(kv, u)
            chunks = spec.valid_head_chunks(heads, kv, u)
            assert 1 in chunks and all((heads // u) % c == 0 for c in chunks)
            for c in chunks:
                g = spec.head_groups(heads, kv_used, u, c)
                assert g in (1, 2) and (heads // u) % (g * c) == 0 and (g == 1 or (kv_used // u) % 2 == 0)


def _stated_counts(u, r, heads, kv, chunks, return_lse):
    """The counts as Note [head-group pipeline], Note [reverse backward] and Note [head chunks] state them."""
    g = spec.head_groups(heads, spec.replicated_kv_heads(kv, u), u, chunks)
    a2a = 4 * g if u > 1 else 0
    backward = 0 if r == 1 else (2 * r - 3 if chunks == 1 else 2 * r - 2)
    return ((a2a + (1 if u > 1 and return_lse else 0), g * chunks * (r - 1)), (a2a, g * chunks * backward))


def _splits():
    for u in (1, 2, 4, 8):
        for r in (1, 2, 3, 4, 8):
            for heads, kv in ((8, 8), (8, 2), (8, 1), (32, 8), (12, 3)):
                if heads % u:
                    continue
                for chunks in spec.valid_head_chunks(heads, kv, u):
                    yield u, r, heads, kv, chunks


def test_layer_collectives_sum_the_ring_steps():
    for u, r, heads, kv, chunks in _splits():
        for causal in (True, False):
            for lse in (True, False):
                calls = spec.layer_collectives(u, r, heads, kv, chunks, causal, return_lse=lse)
                got = ((calls.forward.all_to_all, calls.forward.p2p), (calls.backward.all_to_all, calls.backward.p2p))
                assert got == _stated_counts(u, r, heads, kv, chunks, lse), (u, r, heads, kv, chunks, causal, lse)


def test_the_planner_prices_the_spec_counts():
    """``PassCost.a2a_calls`` / ``ring_transfers`` are the spec's counts (a training layer: no LSE returned); the
    distributed tests compare both with the collectives they count (``attention_cases.check_result``)."""
    from usp.planner import predict

    for u, r, heads, kv, chunks in _splits():
        for causal in (True, False):
            seqlen = spec.required_multiple(u, r, causal) * 64
            cand = predict(u, r, seqlen, heads, kv, 64, causal=causal, head_chunks=chunks)
            calls = spec.layer_collectives(u, r, heads, kv, chunks, causal)
            for priced, stated in ((cand.forward, calls.forward), (cand.backward, calls.backward)):
                assert (priced.a2a_calls, priced.ring_transfers) == (stated.all_to_all, stated.p2p), (
                    u, r, heads, kv, chunks, causal)


def test_the_window_schedule_is_the_specs_sliding_window():
    """``usp.layout.WindowSchedule`` runs the spec's window facts: its blocks are the spec's pieces with the kernel
    mask attached, and ``schedule_for`` picks a window exactly when ``spec.sliding_window`` finds one."""
    from usp.layout import WindowSchedule, schedule_for

    for causal, window, seqlen, ring in ((True, (5, 0), 96, 4), (False, (3, 7), 96, 3), (True, (200, 0), 96, 4),
                                         (False, (1, 40), 60, 2), (True, (2, 0), 32, 1)):
        schedule = schedule_for(causal, window, 1.5, seqlen)
        facts = spec.sliding_window(causal, window, seqlen)
        assert (facts is None) == (not isinstance(schedule, WindowSchedule)), (causal, window)
        if facts is None:
            continue
        assert isinstance(schedule, spec.SlidingWindow)
        local = seqlen // ring
        assert schedule.active_steps(ring, local) == facts.active_steps(ring, local)
        for r in range(ring):
            for j in range(ring):
                blocks = [(t.q_rows, t.kv_rows, t.mask.left, t.mask.right, t.mask.softcap)
                          for t in schedule.blocks(j, r, ring, local)]
                assert blocks == [p + (1.5,) for p in facts.pieces(j, r, ring, local)]


def _brute_pieces(window, r, step, ring, local):
    """Every (query, key) pair of ring rank r against ring rank r - step that the window lets through, in shard
    rows, from the layout's global positions (no spec arithmetic)."""
    def positions(rank):
        if spec.choose_layout(ring, window.causal) is spec.Layout.ZIGZAG:
            c = local // 2
            return list(range(rank * c, (rank + 1) * c)) + list(range((2 * ring - 1 - rank) * c,
                                                                     (2 * ring - rank) * c))
        return list(range(rank * local, (rank + 1) * local))

    mine, theirs = positions(r), positions((r - step) % ring)
    left, right = window.left, window.right
    return {(i, j) for i, qi in enumerate(mine) for j, kj in enumerate(theirs)
            if (left == -1 or kj >= qi - left) and (right == -1 or kj <= qi + right)
            and (not window.causal or kj <= qi)}


def test_sliding_window_pieces_cover_exactly_the_window():
    """The pieces of every (rank, step) cover each visible pair once and nothing else; ``band_area`` counts them;
    the halo bounds the key rows; steps nobody needs are not active."""
    for causal in (True, False):
        for ring in (1, 2, 3, 4):
            local = 12
            windows = ([(0, 0), (1, 0), (5, 0), (13, 0), (30, 0)] if causal
                       else [(1, 2), (0, 5), (13, 1), (-1, 3), (4, -1)])
            for left, right in windows:
                window = spec.sliding_window(causal, (left, right), ring * local)
                if window is None:
                    continue
                active = set()
                for r in range(ring):
                    for step in range(ring):
                        pairs, area = set(), 0
                        pieces = window.pieces(step, r, ring, local)
                        for q, k, l, rr in pieces:
                            n_q, n_k = q.stop - q.start, k.stop - k.start
                            got = {(q.start + i, k.start + j) for i in range(n_q) for j in range(n_k)
                                   if (l == -1 or j - i >= n_k - n_q - l) and (rr == -1 or j - i <= n_k - n_q + rr)}
                            assert not pairs & got
                            pairs |= got
                            area += spec.band_area(n_q, n_k, l, rr)
                        want = _brute_pieces(window, r, step, ring, local)
                        assert pairs == want and area == len(want), (causal, ring, left, right, r, step)
                        halo = window.halo(step, r, ring, local)
                        if step and want:
                            active.add(step)
                            assert halo.start == min(j for _, j in want) and halo.stop == max(j for _, j in want) + 1
                        else:
                            assert halo is None
                assert set(window.active_steps(ring, local)) == active


def test_window_collectives_in_the_layer_counts():
    """With a window, ``layer_collectives`` counts the window's exchanges per head group and chunk (ring rank
    given, or the busiest); a window that binds nowhere is the dense count; a window without seqlen raises."""
    calls = spec.layer_collectives(2, 8, 8, 4, 1, True, window_size=(2, 0), seqlen=8 * 32)
    window = spec.sliding_window(True, (2, 0), 8 * 32)
    groups = spec.head_groups(8, 4, 2)
    busiest = max(window.collectives(r, 8, 32) for r in range(8))
    assert busiest == (2, 2) and window.active_steps(8, 32) == (1, 7)  # two neighbours, not the whole ring
    assert (calls.forward.p2p, calls.backward.p2p) == (groups * 2, groups * 2)
    for r in range(8):
        one = spec.layer_collectives(2, 8, 8, 4, 1, True, window_size=(2, 0), seqlen=8 * 32, ring_rank=r)
        assert one.forward.p2p == groups * window.collectives(r, 8, 32)[0]
        assert one.forward.all_to_all == calls.forward.all_to_all == 4 * groups
    wide = spec.layer_collectives(1, 4, 8, 8, 1, True, window_size=(10**6, 0), seqlen=64)
    assert wide == spec.layer_collectives(1, 4, 8, 8, 1, True)
    with pytest.raises(ValueError, match="needs the global seqlen"):
        spec.layer_collectives(1, 4, 8, 8, window_size=(3, 0))


def test_band_area_counts_the_visible_pairs():
    for q in range(1, 8):
        for k in range(1, 8):
            for left in range(-1, 9):
                for right in range(-1, 9):
                    brute = sum(1 for i in range(q) for j in range(k)
                                if (left == -1 or j - i >= k - q - left) and (right == -1 or j - i <= k - q + right))
                    assert spec.band_area(q, k, left, right) == brute, (q, k, left, right)
    assert spec.band_area(1 << 20, 1 << 20, 4095, 0) == 4096 * (1 << 20) - 4095 * 4096 // 2


def test_divisors():
    from usp.planner.units import divisors

    for n in (1, 2, 12, 36, 97, 1024, 65536):
        assert divisors(n) == [d for d in range(1, n + 1) if n % d == 0]


#: run in a fresh interpreter where any import of torch raises
_NO_TORCH = r"""
import sys

class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError(f"torch is blocked in this test (import of {name!r})")
        return None

sys.meta_path.insert(0, NoTorch())
import usp
import usp.spec
import usp.planner

plan = usp.planner.plan(64, "1M", 32, 8)
assert (plan.ulysses, plan.ring) == (8, 8), plan.summary()
assert usp.plan is usp.planner.plan and usp.Placement is usp.spec.Placement
calls = usp.spec.layer_collectives(8, 8, 32, 8)
assert (calls.forward.all_to_all, calls.forward.p2p) == (plan.forward.a2a_calls, plan.forward.ring_transfers)
windowed = usp.planner.plan(64, "1M", 32, 8, window=4095, window_layers="5:1")
assert windowed.total < 6 * plan.total and windowed.shape.sliding_window() is not None
assert usp.spec.required_multiple(2, 4, True) == 8 and "long_context_attention" in dir(usp)
try:
    usp.long_context_attention
except ImportError as exc:
    assert "torch is blocked" in str(exc)
else:
    raise AssertionError("usp.long_context_attention imported without torch")
assert not any(name == "torch" or name.startswith("torch.") for name in sys.modules)
print("ok")
"""


def test_planner_and_spec_import_without_torch():
    out = subprocess.run([sys.executable, "-c", _NO_TORCH], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_lazy_public_names():
    code = ("import sys, usp; assert 'torch' not in sys.modules; assert set(usp.__all__) <= set(dir(usp)); "
            "f = usp.long_context_attention; import usp.attention; assert f is usp.attention.long_context_attention; "
            "assert usp.SequenceParallelMesh is usp.mesh.SequenceParallelMesh and usp.plan is usp.planner.plan; "
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
    import usp

    with pytest.raises(AttributeError, match="module 'usp' has no attribute 'nothing'"):
        usp.nothing
