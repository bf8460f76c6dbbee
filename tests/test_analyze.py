"""spdsl.analyze against brute force over the dense token-level graph.

The truth here is written independently of spdsl.analyze: the token mask M from ``dense_mask``,
reach after L stacked layers = ``(I | M) ** L`` as boolean matrix powers (the residual stream
keeps a token's own state), allowed pairs = ``k <= q`` (causal) or all pairs.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spdsl import analyze as A
from spdsl import reach as R
from spdsl.core.ir import PatternIR
from spdsl.core.primitives import All, Band, Dilated, Every, Local, Powers, Segment, Sink, Stride
from spdsl.layout import Layout, dense_mask
from spdsl.pattern import Pattern
from tests.strategies import pattern_irs


def brute(ir: PatternIR, seq: int, block: int = 4, per_key: int = 2 * 8 * 128 * 2) -> dict:
    M = dense_mask(ir, seq, seq, 0)
    eye = torch.eye(seq, dtype=torch.bool)
    allowed = torch.ones(seq, seq, dtype=torch.bool).tril() if ir.causal else torch.ones(seq, seq, dtype=torch.bool)
    step = (M | eye).double()
    R = eye.clone()
    first = torch.full((seq, seq), -1, dtype=torch.long)
    first[eye] = 0
    curve = []
    L = 0
    while True:
        L += 1
        new = (step @ R.double()) > 0
        first[new & ~R] = L
        if torch.equal(new, R):
            break
        R = new
        curve.append(int(R[-1].sum()))
    linked = first >= 0
    full = None if bool((allowed & ~linked).any()) else int(first[allowed].max())
    nq = -(-seq // block)
    tiles = M.new_zeros(nq, nq)
    for i in range(nq):
        for j in range(nq):
            tiles[i, j] = M[i * block : (i + 1) * block, j * block : (j + 1) * block].any()
    last_tiles = [j for j in range(nq) if M[-1, j * block : (j + 1) * block].any()]
    return {
        "density": int(M.sum()) / int(allowed.sum()),
        "visible_pairs": int(M.sum()),
        "allowed_pairs": int(allowed.sum()),
        "tiles_per_row": float(tiles.sum(1).double().mean()),
        "decode_keys": int(M[-1].sum()),
        "decode_bytes": int(M[-1].sum()) * per_key,
        "decode_tile_bytes": sum(min(block, seq - j * block) for j in last_tiles) * per_key,
        "layers_to_full_reach": full,
        "longest_shortest_path": int(first[allowed & linked].max()),
        "connected_fraction": int((allowed & linked).sum()) / int(allowed.sum()),
        "_curve": curve,
        "_first": first,
    }


def check(ir: PatternIR, seq: int, block: int = 4) -> dict:
    got = A.analyze(Pattern(ir), seq, block=block)
    want = brute(ir, seq, block)
    for key in (
        "visible_pairs",
        "allowed_pairs",
        "decode_keys",
        "decode_bytes",
        "decode_tile_bytes",
        "layers_to_full_reach",
        "longest_shortest_path",
    ):
        assert got[key] == want[key], (key, got[key], want[key], ir, seq)
    for key in ("density", "tiles_per_row", "connected_fraction"):
        assert got[key] == pytest.approx(want[key], rel=1e-12), (key, ir, seq)
    curve = want["_curve"]
    for point in got["receptive_field"]:
        L = point["layers"]
        count = curve[min(L, len(curve)) - 1] if curve else 1
        assert point["fraction"] == pytest.approx(count / seq), (L, ir, seq)
    curve = [1, *curve]
    while len(curve) > 1 and curve[-1] == curve[-2]:
        curve = curve[:-1]
    curve = curve[1:]
    assert got["receptive_by_layer"] == pytest.approx([c / seq for c in curve])
    pts = got["receptive_field"]
    assert [p["layers"] for p in pts] == [2**i for i in range(len(pts))]
    assert pts[-1]["fraction"] == pytest.approx((curve[-1] if curve else 1) / seq)
    if got["worst_pair"] is not None:
        q, k = got["worst_pair"]
        assert int(want["_first"][q, k]) == got["longest_shortest_path"]
        assert got["worst_distance"] == q - k
    else:
        assert want["longest_shortest_path"] == 0
    return got


def power(unit=1, window=2, sinks=1):
    return PatternIR("power", unit, True, Sink(sinks) | Local(window) | Powers(2))


def sliding(unit=1, window=3, sinks=1):
    return PatternIR("sliding", unit, True, Sink(sinks) | Local(window))


SHIPPED_SMALL = [
    power(1),
    power(2, 3),
    power(3, 1, 2),
    sliding(1),
    sliding(2, 2),
    PatternIR("stride_slash", 2, True, Sink(1) | Local(2) | Stride(3)),
    PatternIR("dilated", 2, True, Dilated(3, 2)),
    PatternIR("longnet", 1, True, Segment(2) | (Segment(4) & Every(2)) | (Segment(8) & Every(4))),
    PatternIR("causal", 1, True, All()),
    PatternIR("causal3", 3, True, All()),
    PatternIR("segment_only", 2, True, Segment(3)),
    PatternIR("bidir_local", 2, False, Local(2)),
    PatternIR("bidir_powers", 1, False, Powers(2)),
    PatternIR("band_ahead", 2, False, Band(-1, 0)),
    PatternIR("every", 3, False, Every(2)),
    PatternIR("no_diag", 2, True, Powers(3) - Local(1)),
]


@pytest.mark.parametrize("ir", SHIPPED_SMALL, ids=lambda ir: f"{ir.name}-u{ir.unit}")
@pytest.mark.parametrize("seq", [1, 2, 7, 16, 33, 64, 200])
def test_matches_brute_force(ir, seq):
    check(ir, seq)


@settings(max_examples=120)
@given(pattern_irs(max_depth=2), st.integers(1, 48), st.integers(1, 9))
def test_random_patterns_match_brute_force(ir, seq, block):
    check(ir, seq, block)


@pytest.mark.parametrize("ir", SHIPPED_SMALL + [PatternIR("dense_u1", 1, False, All())], ids=lambda ir: ir.name)
@pytest.mark.parametrize("seq", [37, 64])
def test_coarse_graph_is_exact(ir, seq, monkeypatch):
    """Forcing node coarsening (tiny FINE_NODES) must give the same answers, or fall back."""
    monkeypatch.setattr(R, "FINE_NODES", 4)
    got = check(ir, seq)
    if ir.name in ("causal", "dense_u1"):
        assert got["node_tokens"] > ir.unit  # dense patterns do coarsen


@settings(max_examples=60)
@given(pattern_irs(max_depth=2), st.integers(2, 40), st.sampled_from([2, 3, 5]))
def test_random_coarse_match_brute_force(ir, seq, fine):
    import unittest.mock

    with unittest.mock.patch.object(R, "FINE_NODES", fine):
        check(ir, seq)


def test_too_many_nodes_is_a_clear_error(monkeypatch):
    from spdsl import SpdError, limits

    monkeypatch.setattr(R, "FINE_NODES", 4)
    with limits.override(reach_nodes=8), pytest.raises(SpdError, match=r"unit graph.*20 graph nodes.*limit of 8") as e:
        A.analyze(Pattern(sliding(2)), 40)
    assert "smaller --seq" in e.value.hint and "SPDSL_MAX_REACH_NODES" in e.value.hint


@settings(max_examples=60)
@given(pattern_irs(max_depth=2), st.integers(0, 40), st.integers(0, 40), st.integers(-10, 10), st.integers(1, 9))
def test_visible_pairs_on_any_layout(ir, q_len, kv_len, shift, block):
    lay = Layout(ir, q_len, kv_len, block, block + 1, q_offset=kv_len - q_len + shift)
    mask = dense_mask(ir, q_len, kv_len, lay.q_offset)
    assert A.visible_pairs(lay) == int(mask.sum())
    p = lay.q_offset + torch.arange(q_len)[:, None]
    allowed = (torch.arange(kv_len)[None, :] <= p) if ir.causal else torch.ones(q_len, kv_len, dtype=torch.bool)
    assert A.allowed_pairs(lay) == int(allowed.expand(q_len, kv_len).sum())


@pytest.mark.parametrize("seq", [32, 48, 64, 100, 128, 200, 256, 300, 512, 1000, 2048, 4096])
def test_power_reaches_in_log_layers(seq):
    got = A.analyze(Pattern(power(1, 5)), seq, block=16)
    assert got["layers_to_full_reach"] <= math.ceil(math.log2(seq)) + 1
    assert got["receptive_field"][-1]["fraction"] == 1.0


@pytest.mark.parametrize("unit", [4, 256])
def test_power_reach_bound_at_unit(unit):
    for n_units in (7, 31, 64, 129, 600):
        got = A.analyze(Pattern(power(unit, 5)), n_units * unit, block=128)
        assert got["layers_to_full_reach"] <= math.ceil(math.log2(n_units)) + 1


def test_sliding_window_reach_grows_linearly():
    unit, window = 4, 3
    reach = {}
    for n_units in (20, 40, 80, 160):
        reach[n_units] = A.analyze(Pattern(sliding(unit, window, 1)), n_units * unit, block=8)["layers_to_full_reach"]
        # the farthest non-sink key: (n_units - 2) unit steps back, window - 1 units per layer
        assert reach[n_units] == math.ceil((n_units - 2) / (window - 1))
    assert reach[160] - reach[80] == pytest.approx(2 * (reach[80] - reach[40]), abs=1)


def test_segment_alone_never_reaches():
    got = A.analyze(Pattern(PatternIR("seg", 4, True, Segment(2))), 64, block=8)
    assert got["layers_to_full_reach"] is None
    assert 0 < got["connected_fraction"] < 1
    assert got["longest_shortest_path"] == 1


def test_report_and_keys():
    got = A.analyze(Pattern(power(256, 5)), 32768)
    for key in (
        "density",
        "tiles_per_row",
        "decode_bytes",
        "layers_to_full_reach",
        "receptive_field",
        "longest_shortest_path",
        "worst_distance",
    ):
        assert key in got
    assert got["decode_bytes"] == (1 + 5 + 4) * 256 * 2 * 8 * 128 * 2  # sink, window, distances 8..64
    text = A.format_report(got, "power.spd")
    assert "layers to full reach" in text and "power(" in text


def test_bad_arguments():
    with pytest.raises(ValueError, match="seq must be an integer >= 1"):
        A.analyze(Pattern(power()), 0)
    with pytest.raises(ValueError, match="block"):
        A.analyze(Pattern(power()), 10, block=0)


@pytest.mark.slow
def test_power_one_million_tokens_is_fast():
    import time

    t = time.perf_counter()
    got = A.analyze(Pattern(power(256, 5)), 1 << 20)
    assert time.perf_counter() - t < 30
    assert got["layers_to_full_reach"] <= 13
