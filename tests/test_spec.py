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
                          (usp.layout, ("Layout", "choose_layout", "required_multiple")),
                          (usp.attention, ("kv_replication", "valid_head_chunks")),
                          (usp.ulysses, ("head_groups",)), (usp, ("Placement",))):
        for name in names:
            assert getattr(module, name) is getattr(spec, name), f"{module.__name__}.{name} is not usp.spec's"


def test_the_planner_uses_the_spec_itself():
    from usp.planner import cost, search

    assert cost.head_groups is spec.head_groups and cost.replicated_kv_heads is spec.replicated_kv_heads
    assert cost.head_chunk_options is spec.valid_head_chunks and cost.PLACEMENTS == spec.PLACEMENTS
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
