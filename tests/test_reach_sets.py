"""Reach sets (spdsl.reach_sets) against a brute-force token-level walk: (I | M)**L on the dense mask."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import spdsl
from spdsl.reach_sets import hops, reach_within
from tests.strategies import PRIMITIVE_CASES


def token_reach(pattern, seq: int, layers: int) -> torch.Tensor:
    """bool [seq, seq]: token k's information reaches q within ``layers`` layers (residual included)."""
    step = (pattern.dense_mask(seq, seq) | torch.eye(seq, dtype=torch.bool)).double()
    out = step.clone()
    for _ in range(layers - 1):
        out = ((out @ step) > 0).double()
    return out > 0


def check(pattern, seq: int, layers: int) -> None:
    """Every allowed token pair q != k (k <= q when causal) has its units' answer."""
    units = torch.as_tensor(reach_within(pattern, seq, layers))
    tokens = token_reach(pattern, seq, layers)
    unit_of = torch.arange(seq) // pattern.unit
    allowed = ~torch.eye(seq, dtype=torch.bool)
    if pattern.causal:
        allowed &= torch.ones(seq, seq, dtype=torch.bool).tril()
    want = units[unit_of[:, None], unit_of[None, :]]
    bad = (tokens != want) & allowed
    assert not bad.any(), f"first mismatch at (q, k) = {bad.nonzero()[0].tolist()}"


@pytest.mark.parametrize("body", PRIMITIVE_CASES)
@pytest.mark.parametrize("layers", [1, 3])
def test_every_primitive_matches_the_token_walk(body, layers):
    check(spdsl.compile(f"pattern p {{ {body} }}"), 40, layers)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(PRIMITIVE_CASES), st.sampled_from(PRIMITIVE_CASES), st.sampled_from(["|", "&", "-"]),
    st.integers(1, 4), st.integers(1, 5), st.integers(5, 60), st.booleans(),
)  # fmt: skip
def test_combined_patterns_match_the_token_walk(a, b, op, unit, layers, seq, causal):
    ea, eb = (s.split("attend", 1)[1] for s in (a, b))
    text = f"pattern p {{ unit {unit} {'causal' if causal else ''} attend ({ea}) {op} ({eb}) }}"
    check(spdsl.compile(text), seq, layers)


def test_hops_are_the_first_layer_that_links():
    p = spdsl.compile("pattern w() { unit 4 causal attend sink(1) | local(2) }")
    h = hops(p, 64, 20)
    for L in (1, 2, 5, 20):
        assert ((h > 0) & (h <= L)).tolist() == reach_within(p, 64, L).tolist()
    assert h[15, 0] == 1 and h[15, 13] == 2 and h[15, 1] == 14  # the sink directly; unit 1 only step by step


def test_layers_must_be_positive():
    with pytest.raises(ValueError, match="layers"):
        reach_within(spdsl.compile("pattern p { attend all }"), 8, 0)
