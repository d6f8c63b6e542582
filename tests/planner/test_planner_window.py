"""The planner prices sliding windows (issue 11): the window's ring facts are ``usp.spec.SlidingWindow``'s (the
object ``usp.layout.WindowSchedule`` runs), a windowed layer's time grows with the window and linearly with the
sequence, a mix of windowed and global layers is the sum of its parts, and the CLI flags are validated."""
import json

import pytest

import usp.spec as spec
from usp import planner
from usp.planner.cli import build_parser, main

TOPO = "h100-nvlink-2x"


def _splits():
    for u, r in ((1, 2), (2, 1), (1, 4), (2, 2), (4, 2), (1, 8), (2, 4)):
        for heads, kv in ((8, 8), (8, 2), (16, 4)):
            for chunks in spec.valid_head_chunks(heads, kv, u)[:2]:
                yield u, r, heads, kv, chunks


def test_windowed_counts_are_the_specs():
    """``PassCost.a2a_calls`` / ``ring_transfers`` of a windowed layer are ``usp.spec.layer_collectives`` with the
    window (the busiest ring rank's: the distributed mask tests compare each rank's counted calls with the same
    function); steps are the window's, not the ring's."""
    for u, r, heads, kv, chunks in _splits():
        for causal, window in ((True, 5), (True, 100), (False, (3, 7)), (False, (60, 2))):
            seqlen = spec.required_multiple(u, r, causal) * 24
            size = (window, 0) if isinstance(window, int) else window
            cand = planner.predict(u, r, seqlen, heads, kv, 64, causal=causal, head_chunks=chunks, window=window,
                                   world_size=8)
            calls = spec.layer_collectives(u, r, heads, kv, chunks, causal, window_size=size, seqlen=seqlen)
            for priced, stated in ((cand.forward, calls.forward), (cand.backward, calls.backward)):
                assert (priced.a2a_calls, priced.ring_transfers) == (stated.all_to_all, stated.p2p), (
                    u, r, heads, kv, chunks, causal, window)
    # a window within one neighbour's chunk: two neighbours on a ring of 8, not R-1 rotations
    cand = planner.predict(1, 8, "128k", 32, 8, window=4095, world_size=8, topology="dgx-h100")
    assert cand.forward.ring_transfers == 2 and cand.backward.ring_transfers == 2


def _total(seqlen, window=None, u=1, r=2, **kw):
    return planner.predict(u, r, seqlen, 32, 8, topology=TOPO, window=window, **kw)


def test_time_grows_with_the_window_not_the_sequence():
    """At a fixed window the halo traffic does not depend on the sequence and the time is linear in it (dense
    causal: quadratic); at a fixed sequence the time grows with the window."""
    small, big = _total("128k", 4095), _total("512k", 4095)
    assert small.forward.ring_bytes == big.forward.ring_bytes  # the halo: the window's rows, whatever the length
    assert small.forward.ring_bytes < _total("128k").forward.ring_bytes / 10  # 4095 halo rows, not 64K
    assert 3.6 < big.total / small.total < 4.4  # 4x the sequence: ~4x the time
    assert _total("512k").total / _total("128k").total > 12  # dense causal: ~16x
    narrow, wide = _total("512k", 2047), _total("512k", 8191)
    assert 3.0 < wide.total / narrow.total < 4.4 and narrow.total < big.total < wide.total
    assert _total("128k").total > 8 * small.total  # the target: windowed 8x below dense causal at 128K
    # Ulysses only: the same band, no ring
    assert _total("512k", 4095, u=2, r=1).total < _total("512k", u=2, r=1).total / 20


def test_a_window_wider_than_the_sequence_is_no_window():
    dense, wide = _total("64k"), _total("64k", 10**7)
    assert wide.total == dense.total and wide.memory.peak == dense.memory.peak
    assert planner.predict(1, 2, "64k", 32, 8, topology=TOPO, causal=False, window=(-1, -1)).total == \
        planner.predict(1, 2, "64k", 32, 8, topology=TOPO, causal=False).total


def test_a_mix_is_the_sum_of_its_parts():
    windowed, dense = _total("256k", 4095), _total("256k")
    mix = _total("256k", 4095, window_layers="5:1")
    assert mix.total == pytest.approx(5 * windowed.total + dense.total, rel=1e-12)
    assert mix.forward.ring_transfers == 5 * windowed.forward.ring_transfers + dense.forward.ring_transfers
    assert mix.memory.peak == max(windowed.memory.peak, dense.memory.peak)
    assert [(x["kind"], x["count"]) for x in mix.layers] == [("windowed", 5), ("global", 1)]
    assert mix.layers[0]["forward"].total == pytest.approx(windowed.forward.total, rel=1e-12)
    assert _total("256k", 4095, window_layers=(3, 0)).total == pytest.approx(3 * windowed.total, rel=1e-12)
    p = planner.plan(8, "256k", 32, 8, topology="dgx-h100", window=4095, window_layers="40:8")
    best = next(c for c in p.candidates if (c.ulysses, c.ring, c.placement) == (p.ulysses, p.ring, p.placement))
    parts = [planner.predict(p.ulysses, p.ring, "256k", 32, 8, topology="dgx-h100", placement=p.placement,
                             window=w, head_chunks=p.head_chunks) for w in (4095, None)]
    assert best.total == pytest.approx(40 * parts[0].total + 8 * parts[1].total, rel=1e-12)
    assert "per 48 layers (40 windowed + 8 global)" in p.summary()
    again = planner.Plan.from_json(p.to_json())
    assert again.to_dict() == p.to_dict() and again.window_layers == (40, 8) and again.shape.window == (4095, 0)
    assert "window=(4095, 0), window_layers='40:8'" in p.snippet().replace("\n", " ").replace("  ", "")
    assert "window_size=(4095, 0)" in p.snippet() and "global_attn" in p.snippet()


@pytest.mark.parametrize("kwargs, message", [
    (dict(window=-3), "window=-3 must be a left window in tokens >= 0"),
    (dict(window=True), "window must be a left window in tokens"),
    (dict(window=(4, 2)), "a causal window has right = 0"),
    (dict(window=(4, -2)), "pair (left, right) of ints >= -1"),
    (dict(window=4, causal=False), "window=4 with causal=False: give both sides"),
    (dict(window_layers="5:1"), "needs window="),
    (dict(window=8, window_layers="5"), "window_layers must be 'W:G'"),
    (dict(window=8, window_layers=(0, 0)), "not both 0"),
    (dict(window=8, window_layers="a:b"), "window_layers must be 'W:G'"),
])
def test_bad_window_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        planner.plan(2, "128k", 32, 8, topology=TOPO, **kwargs)


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


BASE = ("--world-size", "8", "--seqlen", "1M", "--heads", "32", "--kv-heads", "8", "--topology", "dgx-h100")


@pytest.mark.parametrize("argv, message", [
    (("--window", "-5"), "window=-5 must be a left window in tokens >= 0"),
    (("--window", "4k"), "argument --window: expected W (tokens) or LEFT,RIGHT"),
    (("--window", "1,2,3"), "argument --window: expected W (tokens) or LEFT,RIGHT"),
    (("--window", "4,4"), "a causal window has right = 0 (or -1)"),
    (("--window", "4", "--no-causal"), "give both sides, window=(left, right)"),
    (("--window-layers", "5:1"), "window_layers='5:1' needs window="),
    (("--window", "4095", "--window-layers", "5"), "window_layers must be 'W:G'"),
])
def test_cli_bad_window_exits_2_with_one_line(capsys, argv, message):
    code, out, err = _run(capsys, *BASE, *argv)
    assert code == 2 and out == "" and err.count("\n") == 1 and err.startswith("usp-plan: error: ")
    assert message in err


def test_cli_window_and_mix(capsys):
    flags = {a for action in build_parser()._actions for a in action.option_strings}
    assert {"--window", "--window-layers"} <= flags
    code, out, _ = _run(capsys, *BASE, "--window", "4095", "--window-layers", "5:1", "--format", "json")
    data = json.loads(out)
    assert code == 0 and data["shape"]["window"] == [4095, 0] and data["window_layers"] == [5, 1]
    api = planner.plan(8, "1M", 32, 8, topology="dgx-h100", window=4095, window_layers=(5, 1))
    assert data["total_s"] == pytest.approx(api.total, rel=1e-12)
    code, out, _ = _run(capsys, *BASE, "--window", "100,20", "--no-causal", "--format", "json")
    assert code == 0 and json.loads(out)["shape"]["window"] == [100, 20]
    code, out, _ = _run(capsys, *BASE, "--window", "4095", "--window-layers", "5:1")
    assert code == 0 and "window_size (4095, 0), 5 windowed + 1 global layers" in " ".join(out.split())
    assert "per 6 layers (5 windowed + 1 global)" in " ".join(out.split())
