"""Density matching (spdsl.density, `spdsl analyze --match-density`): against a brute-force scan."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

import spdsl
from spdsl import cli
from spdsl.density import density_at, match_density, with_param
from spdsl.errors import SpdError

REF = spdsl.compile("pattern p() { unit 64 causal attend sink(1) | local(5) | powers(2) }")
SLIDING = spdsl.compile("pattern sw(window = 2) { unit 64 causal attend sink(1) | local(window) }")
STRIDE = spdsl.compile("pattern st(step = 4) { unit 64 causal attend sink(1) | local(3) | stride(step) }")


def brute(pattern, param, target, seq, values):
    """The closest density by trying every value, ties to the smaller one."""
    return min(values, key=lambda v: (abs(density_at(with_param(pattern, param, v), seq) - target), v))


@pytest.mark.parametrize("seq", [4096, 8191, 8192])
@pytest.mark.parametrize(("pattern", "param"), [(SLIDING, "window"), (STRIDE, "step")], ids=["window", "step"])
def test_bisection_finds_what_a_scan_finds(pattern, param, seq):
    target = density_at(REF, seq)
    units = -(-seq // 64)
    m = match_density(pattern, param, target, seq)
    assert m.value == brute(pattern, param, target, seq, range(1, units + 1))
    assert m.pattern.params[param] == m.value and m.density == density_at(m.pattern, seq)
    assert not m.out_of_reach


def test_density_grows_with_the_window_and_shrinks_with_the_step():
    d = [density_at(with_param(SLIDING, "window", w), 8192) for w in (2, 4, 8)]
    s = [density_at(with_param(STRIDE, "step", w), 8192) for w in (2, 4, 8)]
    assert d == sorted(d) and s == sorted(s, reverse=True)


def test_a_target_out_of_reach_is_said():
    """Past the sequence's length in units a larger step changes nothing: the smallest value of the
    lowest density is the answer, marked out of reach."""
    m = match_density(STRIDE, "step", 1e-6, 8192)
    assert m.out_of_reach and m.value == brute(STRIDE, "step", 1e-6, 8192, range(1, 129))


def test_bad_arguments():
    with pytest.raises(SpdError, match=r"no parameter 'nope'.*step"):
        match_density(STRIDE, "nope", 0.1, 4096)
    with pytest.raises(ValueError, match="target density"):
        match_density(STRIDE, "step", 0.0, 4096)
    with pytest.raises(ValueError, match="empty range"):
        match_density(STRIDE, "step", 0.1, 4096, lo=5, hi=4)


def run_cli(*args: str):
    return CliRunner().invoke(cli.app, list(args))


def test_cli_match_density(tmp_path):
    ref, sw = tmp_path / "ref.spd", tmp_path / "sw.spd"
    ref.write_text(REF.source)
    sw.write_text(SLIDING.source)
    res = run_cli("analyze", str(sw), "--seq", "8192", "--match-density", str(ref), "--vary", "window", "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    want = match_density(SLIDING, "window", density_at(REF, 8192), 8192)
    assert out["matched"]["value"] == want.value == out["params"]["window"]
    assert out["density"] == pytest.approx(want.density)
    res = run_cli("analyze", str(sw), "--seq", "8192", "--vary", "window")
    assert res.exit_code == 2 and "together" in res.output
