"""Resource limits: every costly step estimates its work first and refuses above a stated limit.

One test per refusal -- layouts (candidate tiles), dense masks, tile grids, pictures, reach nodes,
reach words, refinement pieces, the op's CPU path, layouts inside a generated module -- each
checking that the message names the estimate and the limit, and the hint the environment variable
and a way forward. Then the limits themselves: bad environment values, ``override`` restoring the
environment and refusing bad arguments, work within a limit finishing, and the CLI's one-line
refusal.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import spdsl
from spdsl import SpdError, cli, limits
from spdsl.analyze import analyze, pair_density
from spdsl.cli_build import density_line
from spdsl.reach import unit_graph
from spdsl.show import cell_grid, render_layout
from tests.helpers import scoped_env

ROOT = Path(__file__).resolve().parent.parent
PATTERNS = ROOT / "patterns"
ENV = {name: spec[1] for name, spec in limits.LIMITS.items()}
CHECKER = "pattern checker() { causal attend every(2) }"  # unit 1: every partial tile refines to unit cells


@pytest.fixture(autouse=True)
def _default_limits():
    """Every test starts from the defaults (a limit left in the environment would skew the numbers)."""
    with scoped_env(**dict.fromkeys(ENV.values())):
        yield


def load(name: str, **params) -> spdsl.Pattern:
    return spdsl.load(PATTERNS / f"{name}.spd", **params)


def _number(text: str) -> int:
    return int(text.replace(",", ""))


def assert_refusal(err: SpdError, *, task: str, what: str, cap: int, env: str, way: str) -> int:
    """The message names the task, the estimate (> cap) and the limit; the hint a way forward and the
    variable with a value that would pass. Returns the estimate."""
    m = re.fullmatch(
        rf"(?P<task>.*) would need about (?P<est>[\d,]+) {what}( \(.*\))?, over the limit of (?P<cap>[\d,]+) {what}.*",
        err.message,
    )
    assert m is not None, err.message
    assert task in m["task"], err.message
    estimate, limit = _number(m["est"]), _number(m["cap"])
    assert limit == cap and estimate > cap, err.message
    assert err.hint is not None and way in err.hint, err.hint
    suggested = re.search(rf"or raise the limit, e\.g\. {env}=(\d+)$", err.hint)
    assert suggested is not None and int(suggested[1]) >= estimate, err.hint
    assert err.location is None  # a resource refusal is not located in the pattern text
    return estimate


# ------------------------------------------------------------------------------- layouts: tiles
def test_layout_of_dense_causal_at_4m_tokens_is_refused_before_any_work():
    t0 = time.perf_counter()
    with pytest.raises(SpdError) as e:
        load("causal").layout(4 * 2**20, 4 * 2**20)
    estimate = assert_refusal(
        e.value,
        task="the layout of dense_causal for q_len=4,194,304, kv_len=4,194,304 (128x128 tiles)",
        what="candidate tiles",
        cap=limits.LIMITS["tiles"][0],
        env="SPDSL_MAX_TILES",
        way="use shorter lengths or larger tiles",
    )
    assert estimate == 32768 * 32769 // 2  # the sampled estimate is exact for a dense triangle
    assert "GiB" in e.value.message and " s)" in e.value.message  # memory and time of both numbers
    assert time.perf_counter() - t0 < 5  # refused from a sample of q-tiles, not after building


def test_layout_tiles_limit_by_override_and_by_environment():
    power = load("power")
    assert power.layout(8192, 8192).nnz == 828
    with limits.override(tiles=100), pytest.raises(SpdError) as e:
        power.layout(8192, 8192)
    assert_refusal(
        e.value, task="the layout of power", what="candidate tiles", cap=100, env="SPDSL_MAX_TILES", way="shorter"
    )
    with scoped_env(SPDSL_MAX_TILES="1_000"), pytest.raises(SpdError, match="over the limit of 1,000 candidate tiles"):
        power.layout(8192, 8192)
    with scoped_env(SPDSL_MAX_TILES=" 1000000 "):
        assert power.layout(8192, 8192).nnz == 828


def test_layout_within_the_limit_finishes_at_1m_tokens():
    lay = load("power").layout(2**20, 2**20)
    assert lay.n_q_tiles == 8192
    assert 0 < lay.nnz < limits.limit("tiles")
    assert int(lay.counts().max()) < 64  # sparse: a few dozen of 8192 kv tiles per q-tile


def test_layout_inside_a_generated_module_is_refused_with_spdsls_own_error(tmp_path):
    with scoped_env(SPDSL_CACHE_DIR=str(tmp_path)):
        op = spdsl.build(load("power"))
    module = op.module
    assert module.SpdError is SpdError  # spdsl is loaded: the module raises spdsl's class
    assert module.build_csr(module.PATTERN, 4096, 4096, 128, 128, 0)[1].numel() > 0
    with limits.override(tiles=10), pytest.raises(SpdError) as e:
        module.build_csr(module.PATTERN, 4096, 4096, 128, 128, 0)
    assert type(e.value) is SpdError
    assert_refusal(e.value, task="the layout of power", what="candidate tiles", cap=10, env="SPDSL_MAX_TILES", way="")


def test_a_generated_module_alone_reads_the_limit_from_the_environment(tmp_path):
    """Without spdsl the module raises its embedded SpdError, and SPDSL_MAX_TILES still applies."""
    with scoped_env(SPDSL_CACHE_DIR=str(tmp_path)):
        path = spdsl.build(load("power")).path
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('standalone_power', {str(path)!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "assert not any(n == 'spdsl' or n.startswith('spdsl.') for n in sys.modules), 'spdsl was imported'\n"
        "try:\n"
        "    m.build_csr(m.PATTERN, 4096, 4096, 128, 128, 0)\n"
        "except m.SpdError as e:\n"
        "    print(type(e).__module__, '|', e.message)\n"
    )
    env = {**os.environ, "SPDSL_MAX_TILES": "10"}
    env.pop("PYTHONPATH", None)
    res = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
    module, message = res.stdout.strip().split(" | ")
    assert module == "standalone_power"
    assert "over the limit of 10 candidate tiles" in message


# --------------------------------------------------------------------------- dense: masks, grids
def test_dense_mask_is_refused_above_the_dense_limit():
    power = load("power")
    with pytest.raises(SpdError) as e:
        power.dense_mask(20_000, 20_000)
    estimate = assert_refusal(
        e.value,
        task="a dense mask of 20,000 x 20,000",
        what="mask elements",
        cap=limits.LIMITS["dense"][0],
        env="SPDSL_MAX_DENSE",
        way="use Pattern.layout(...) for long sequences",
    )
    assert estimate == 20_000 * 20_000
    with limits.override(dense=100):
        assert power.dense_mask(10, 10).shape == (10, 10)  # exactly at the limit: allowed
        with pytest.raises(SpdError, match="a dense mask of 10 x 11 would need about 110 mask elements"):
            power.dense_mask(10, 11)


def test_tile_grid_is_refused_above_the_dense_limit():
    lay = load("power").layout(4096, 4096, 16, 16)
    assert lay.tile_grid().shape == (256, 256)
    with limits.override(dense=1000), pytest.raises(SpdError) as e:
        lay.tile_grid()
    estimate = assert_refusal(
        e.value,
        task="a tile grid of 256 x 256",
        what="mask elements",
        cap=1000,
        env="SPDSL_MAX_DENSE",
        way="walk the CSR (kv_ptr, kv_idx) instead",
    )
    assert estimate == 256 * 256


def test_picture_size_is_refused_above_the_dense_limit():
    lay = load("power").layout(8192, 8192)  # 64 x 64 tiles
    assert cell_grid(lay, 64)[0].shape == (64, 64)
    with limits.override(dense=1000):
        assert cell_grid(lay, 16)[0].shape == (16, 16)  # coarser cells fit
        for draw in (lambda: cell_grid(lay, 64), lambda: render_layout(lay, 64)):
            with pytest.raises(SpdError) as e:
                draw()
            estimate = assert_refusal(
                e.value,
                task="a picture of 64 x 64 cells",
                what="mask elements",
                cap=1000,
                env="SPDSL_MAX_DENSE",
                way="use a smaller --width",
            )
            assert estimate == 64 * 64


# ---------------------------------------------------------------------------------------- reach
def test_analyze_refuses_a_unit_graph_above_the_reach_nodes_limit():
    with limits.override(reach_nodes=8), pytest.raises(SpdError) as e:
        analyze(load("power"), 256 * 20)
    estimate = assert_refusal(
        e.value,
        task="reachability of power at seq=5,120 on its unit graph (unit 256)",
        what="graph nodes",
        cap=8,
        env="SPDSL_MAX_REACH_NODES",
        way="use a smaller --seq, or a pattern with a larger unit (at most 2,048 tokens at this unit)",
    )
    assert estimate == 20


def test_analyze_refuses_a_search_above_the_reach_words_limit():
    power = load("power")
    assert analyze(power, 32768)["layers_to_full_reach"] == 6
    with limits.override(reach_words=1000), pytest.raises(SpdError) as e:
        analyze(power, 32768)
    assert_refusal(
        e.value,
        task="reachability on a graph of 128 nodes (256 tokens each)",
        what="bitset word operations",
        cap=1000,
        env="SPDSL_MAX_REACH_WORDS",
        way="use a smaller --seq",
    )


# ---------------------------------------------------------------------------- refinement pieces
def test_counting_pairs_of_a_checkerboard_is_refused_while_refining():
    """`every(2)` at unit 1 refines each partial tile into unit cells: O(seq**2) pieces, not O(tiles).
    The count is checked before each refinement round, so it stops at the limit, not after."""
    checker = spdsl.compile(CHECKER)
    assert analyze(checker, 512)["density"] == pytest.approx(0.5, abs=0.01)
    with limits.override(tiles=20_000), pytest.raises(SpdError) as e:
        analyze(checker, 1024)
    m = re.fullmatch(
        r"counting the visible pairs of checker \(36 partial tiles refined at unit boundaries\) needs more than "
        r"([\d,]+) candidate tiles .* and is still refining, over the limit of 20,000 candidate tiles .*",
        e.value.message,
    )
    assert m is not None, e.value.message
    assert 20_000 < _number(m[1]) <= 3 * 20_000 + 36
    assert e.value.hint.startswith("use a shorter sequence (--seq); or raise the limit, e.g. SPDSL_MAX_TILES=")


def test_pictures_and_build_print_without_the_density_they_may_not_count():
    checker = spdsl.compile(CHECKER)
    with limits.override(tiles=20_000):
        lay = checker.layout(1024, 1024)
        assert pair_density(lay) is None
        legend = render_layout(lay).splitlines()[-1]
        assert "density not counted (over the SPDSL_MAX_TILES limit), 4.50 of 8 kv tiles per q-tile" in legend
        line = density_line(checker)
        assert line.endswith(
            "(max 64; 0 of 2080 tiles full), causal pairs not counted (over the SPDSL_MAX_TILES limit)"
        )
    assert pair_density(lay) == pytest.approx(0.5, abs=0.01)
    assert density_line(checker, 1024).endswith("50.05% of causal pairs")


def test_the_reach_graph_refinement_is_refused_above_the_tiles_limit():
    checker = spdsl.compile(CHECKER)
    assert unit_graph(checker, 256).n == 256
    with limits.override(tiles=5_000), pytest.raises(SpdError) as e:
        unit_graph(checker, 256)
    assert e.value.message.startswith(
        "the reach graph of checker on 256 nodes of 1 tokens (refined at node boundaries)"
    )
    assert "over the limit of 5,000 candidate tiles" in e.value.message
    assert "smaller --seq" in e.value.hint and "SPDSL_MAX_TILES=" in e.value.hint


# ------------------------------------------------------------------------------ the op on the CPU
def test_the_ops_cpu_path_is_refused_above_the_cpu_flops_limit(tmp_path):
    with scoped_env(SPDSL_CACHE_DIR=str(tmp_path)):
        op = spdsl.build(load("power"))
    q, k, v = (torch.randn(1, h, 300, 16) for h in (2, 1, 1))
    assert op(q, k, v).shape == (1, 2, 300, 16)
    with limits.override(cpu_flops=1000), pytest.raises(SpdError) as e:
        op(q, k, v)
    assert_refusal(
        e.value,
        task="attention on the CPU (Layout(power, q_len=300, kv_len=300, block=64x64",
        what="floating-point operations on the CPU",
        cap=1000,
        env="SPDSL_MAX_CPU_FLOPS",
        way="use a GPU, or shorter sequences",
    )
    with limits.override(tiles=10), pytest.raises(SpdError) as e:  # the layout the CPU path builds first
        op(q, k, v)
    assert_refusal(
        e.value, task="the layout of power for q_len=300", what="candidate tiles", cap=10, env="SPDSL_MAX_TILES", way=""
    )


# ------------------------------------------------------------------------------- the limits API
@pytest.mark.parametrize("raw", ["abc", "0", "-5", "1.5", "1e6", "0x10", "\u00b2", "\u0661\u0662", "12 34", "_"])
def test_a_bad_environment_value_is_an_error_naming_the_variable(raw):
    with scoped_env(SPDSL_MAX_TILES=raw):
        for call in (lambda: limits.limit("tiles"), lambda: load("power").layout(1024, 1024)):
            with pytest.raises(SpdError) as e:
                call()
            assert e.value.message == f"SPDSL_MAX_TILES={raw!r} is not a positive integer"
            assert e.value.hint == "the default is 16,777,216 candidate tiles"


@pytest.mark.parametrize(("raw", "value"), [("", 1 << 24), ("  ", 1 << 24), ("7", 7), (" 1_000 ", 1000)])
def test_environment_values_that_are_read(raw, value):
    with scoped_env(SPDSL_MAX_TILES=raw):
        assert limits.limit("tiles") == value


def test_a_bad_environment_value_is_a_one_line_cli_error(capsys):
    with scoped_env(SPDSL_MAX_DENSE="lots"), pytest.raises(SystemExit) as e:
        cli.main(["show", str(PATTERNS / "power.spd"), "--seq", "1024"])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert err.splitlines() == [
        "spdsl: error: SPDSL_MAX_DENSE='lots' is not a positive integer",
        "hint: the default is 268,435,456 mask elements",
    ]


def test_override_sets_and_restores_the_environment():
    with scoped_env(SPDSL_MAX_DENSE="12345"):
        with limits.override(tiles=77, dense=88):
            assert os.environ["SPDSL_MAX_TILES"] == "77" and limits.limit("tiles") == 77
            assert limits.limit("dense") == 88
            with limits.override(tiles=5):  # nested
                assert limits.limit("tiles") == 5
            assert limits.limit("tiles") == 77
        assert "SPDSL_MAX_TILES" not in os.environ  # was unset before: unset again
        assert os.environ["SPDSL_MAX_DENSE"] == "12345"  # was set: its old value is back


def test_override_restores_the_environment_after_an_exception():
    with pytest.raises(SpdError), limits.override(tiles=3):
        load("power").layout(8192, 8192)
    assert "SPDSL_MAX_TILES" not in os.environ
    with pytest.raises(KeyError), limits.override(reach_words=9):
        raise KeyError("anything")
    assert "SPDSL_MAX_REACH_WORDS" not in os.environ


def test_override_rejects_unknown_names_and_non_positive_values():
    unknown = r"unknown limit\(s\) tile; known: tiles, dense, reach_nodes"
    with pytest.raises(TypeError, match=unknown), limits.override(tile=5):
        pass
    for bad in (0, -1, 1.5, "100", True, None):
        not_positive = f"limit dense must be a positive int, got {re.escape(repr(bad))}"
        with pytest.raises(TypeError, match=not_positive), limits.override(dense=bad):
            pass
    with pytest.raises(TypeError), limits.override(tiles=5, dense=0):  # the first was set, then undone
        pass
    assert "SPDSL_MAX_TILES" not in os.environ and "SPDSL_MAX_DENSE" not in os.environ


# ---------------------------------------------------------------------------------------- CLI
def test_cli_analyze_dense_causal_at_4m_tokens_refuses_in_one_line(capsys):
    t0 = time.perf_counter()
    with pytest.raises(SystemExit) as e:
        cli.main(["analyze", str(PATTERNS / "causal.spd"), "--seq", "4194304"])
    assert e.value.code == 1
    assert time.perf_counter() - t0 < 5
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 2, err
    assert lines[0].startswith("spdsl: error: the layout of dense_causal for q_len=4,194,304, kv_len=4,194,304")
    assert "over the limit of 16,777,216 candidate tiles" in lines[0]
    assert re.fullmatch(
        r"hint: use shorter lengths or larger tiles; or raise the limit, e\.g\. SPDSL_MAX_TILES=\d+", lines[1]
    )
    assert "Traceback" not in err


def test_cli_analyze_power_at_4m_tokens_finishes(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["analyze", str(PATTERNS / "power.spd"), "--seq", "4194304", "--json"])
    out, err = capsys.readouterr()
    assert e.value.code == 0, err
    res = json.loads(out)
    assert res["seq"] == 4194304 and res["graph_nodes"] == 16384
    assert res["layers_to_full_reach"] == 13
    assert 0 < res["density"] < 0.02
