"""spdsl.show pictures and the ``spdsl show`` / ``spdsl analyze`` commands."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from typer.testing import CliRunner

from spdsl import cli
from spdsl.core.ir import PatternIR
from spdsl.core.primitives import All, Local, Powers, Sink
from spdsl.layout import Layout
from spdsl.pattern import Pattern
from spdsl.show import cell_grid, render_layout, save_png, save_reach_png
from tests.strategies import pattern_irs

ROOT = Path(__file__).resolve().parent.parent
POWER = ROOT / "patterns" / "power.spd"
runner = CliRunner()


def invoke(*args):
    return runner.invoke(cli.app, [str(a) for a in args])


def test_tiny_picture_exact():
    lay = Pattern(PatternIR("causal", 1, True, All())).layout(8, 8, 2, 2)
    assert render_layout(lay) == (
        "▒···\n"
        "█▒··\n"
        "██▒·\n"
        "███▒\n"
        "█ full  ▒ partial  · empty  (1 char = 1 tile of 2x2 tokens)  "
        "density 100.00% of causal pairs, 2.50 of 4 kv tiles per q-tile"
    )


def test_tiny_picture_downsampled_ascii():
    # sink(1) | local(2) | powers(2), unit 2, 24 tokens, tiles of 2: 12 x 12 tiles -> 4 x 4 cells of 3 x 3
    ir = PatternIR("p", 2, True, Sink(1) | Local(2) | Powers(2))
    lay = Pattern(ir).layout(24, 24, 2, 2)
    text = render_layout(lay, 4, ascii=True)
    assert text.splitlines()[:4] == ["+...", "++..", "+++.", "++++"]
    assert "1 char = 3x3 tiles of 2x2 tokens" in text.splitlines()[4]
    assert render_layout(lay, 12, ascii=True).splitlines()[:3] == ["+...........", "#+..........", "##+........."]


@settings(max_examples=80)
@given(pattern_irs(max_depth=2), st.integers(1, 60), st.integers(1, 7), st.integers(1, 9))
def test_cell_rule_matches_tile_grid(ir, seq, block, width):
    lay = Layout(ir, seq, seq, block, block)
    grid, f = cell_grid(lay, width)
    tiles = lay.tile_grid()
    assert grid.shape == (-(-tiles.shape[0] // f), -(-tiles.shape[1] // f))
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            cell = tiles[i * f : (i + 1) * f, j * f : (j + 1) * f]
            want = 2 if bool((cell == 2).all()) else (1 if bool((cell > 0).any()) else 0)
            assert int(grid[i, j]) == want


def test_million_tokens_draws_from_csr(monkeypatch):
    lay = Pattern(PatternIR("power", 256, True, Sink(1) | Local(5) | Powers(2))).layout(1 << 20, 1 << 20)
    monkeypatch.setattr(Layout, "tile_grid", lambda self: pytest.fail("tile_grid on a big layout"))
    t = time.perf_counter()
    lines = render_layout(lay, 80).splitlines()
    assert time.perf_counter() - t < 5
    assert len(lines) == 81 and all(len(line) == 80 for line in lines[:-1])  # 8192 tiles / 103 per cell
    assert "1 char = 103x103 tiles" in lines[-1]


def test_bad_width():
    lay = Pattern(PatternIR("causal", 1, True, All())).layout(8, 8, 2, 2)
    with pytest.raises(ValueError, match="width"):
        render_layout(lay, 0)


def test_png_sizes(tmp_path):
    p = Pattern(PatternIR("power", 16, True, Sink(1) | Local(5) | Powers(2)))
    out = save_png(p, 4096, tmp_path / "p.png", block=64)
    assert Image.open(out).size == (1000, 450)
    from spdsl.analyze import analyze

    curves = [("a", analyze(p, 2048, block=64)), ("b", analyze(Pattern(PatternIR("c", 1, True, All())), 64))]
    out = save_reach_png(curves, tmp_path / "c.png")
    assert Image.open(out).size == (1000, 450)
    with pytest.raises(FileNotFoundError):
        save_reach_png(curves, tmp_path / "missing" / "c.png")


# ----------------------------------------------------------------------------------- CLI
def test_cli_show(tmp_path):
    res = invoke("show", POWER, "--seq", "4096", "--ascii", "--png", tmp_path / "s.png", "-D", "window=3")
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[0].startswith(f"{POWER}: power") and "window=3" in lines[0]
    assert lines[2] == "+" + "." * 31 and lines[3] == "#+" + "." * 30
    assert Image.open(tmp_path / "s.png").size == (1000, 450)


def test_cli_analyze_json_one_object_or_list(tmp_path):
    res = invoke("analyze", POWER, "--seq", "32768", "--json")
    assert res.exit_code == 0, res.output
    one = json.loads(res.output)
    assert (
        isinstance(one, dict)
        and one["layers_to_full_reach"] == 6
        and one["tiles_per_row"] == pytest.approx(17.33, abs=0.01)
    )
    for key in ("density", "tiles_per_row", "decode_bytes", "layers_to_full_reach", "receptive_field"):
        assert key in one
    sw = ROOT / "patterns" / "sliding_window.spd"
    res = invoke("analyze", POWER, sw, "--seq", "32768", "--json", "--png", tmp_path / "c.png")
    assert res.exit_code == 0, res.output
    many = json.loads(res.stdout)
    assert [r["name"] for r in many] == ["power", "sliding_window"]
    assert many[1]["layers_to_full_reach"] == 16
    assert Image.open(tmp_path / "c.png").size == (1000, 450)


def test_cli_analyze_text_and_markdown():
    res = invoke("analyze", POWER, "--seq", "8192")
    assert res.exit_code == 0, res.output
    assert "layers to full reach   4" in res.output
    res = invoke("analyze", POWER, ROOT / "patterns" / "longnet.spd", "--seq", "8192", "--markdown")
    assert res.exit_code == 0, res.output
    rows = res.output.splitlines()
    assert rows[0].startswith("| file | pattern | seq | density |") and len(rows) == 4
    assert rows[2].startswith("| `power.spd` | `power(window=5, sinks=1)` | 8,192 |") and rows[2].endswith("| 4 |")
    assert "never (" in rows[3]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["show", "nope.spd"], "no such file: nope.spd"),
        (["analyze", "nope.spd"], "no such file: nope.spd"),
        (["show", POWER, "-D", "window"], "bad -D 'window'"),
        (["analyze", POWER, "-D", "window=x"], "is not an integer"),
        (["analyze", POWER, "-D", "windw=3"], "power.spd:14:9: error: unknown parameter 'windw'"),
        (["show", POWER, "--png", "/nonexistent/dir/x.png", "--seq", "1024"], "no such directory"),
    ],
)
def test_cli_errors_are_clean(args, message):
    res = invoke(*args)
    assert res.exit_code == 1, res.output
    assert message in res.stderr
    assert "Traceback" not in res.output


def test_cli_bad_file_contents(tmp_path):
    bad = tmp_path / "bad.spd"
    bad.write_text("pattern p() {\n    attend locl(3)\n}\n")
    res = invoke("analyze", bad)
    assert res.exit_code == 1
    assert f"{bad}:2:12: error: unknown primitive" in res.stderr
    assert "did you mean local?" in res.stderr


def test_cli_seq_must_be_positive():
    res = invoke("show", POWER, "--seq", "0")
    assert res.exit_code == 2  # Typer's usage error
