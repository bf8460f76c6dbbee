"""The shipped patterns (patterns/*.spd): they load, document themselves, round-trip, and mean
what their headers say (dense masks written out by hand on tiny lengths, densities at 8K)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import spdsl
from spdsl import resources

PATTERNS = Path(__file__).resolve().parent.parent / "patterns"
SHIPPED = {
    "power.spd": "power",
    "sliding_window.spd": "sliding_window",
    "stride_slash.spd": "stride_slash",
    "dilated.spd": "dilated",
    "longnet.spd": "longnet",
    "causal.spd": "dense_causal",
    "streaming.spd": "streaming",
}
FILES = sorted(SHIPPED)


def load(name: str, **params) -> spdsl.Pattern:
    return spdsl.load(PATTERNS / name, **params)


def ir_text_as_spd(text: str) -> str:
    """``PatternIR.text()`` (header line + statements) as ``.spd`` source: wrap the body in braces."""
    head, _, body = text.partition("\n")
    return f"{head} {{\n{body}}}\n"


def tiles_from_dense(mask: torch.Tensor, bq: int, bk: int) -> torch.Tensor:
    """int8 tile grid from a token mask: 0 empty, 1 partial, 2 full (in-range elements only)."""
    q, k = mask.shape
    nq, nk = -(-q // bq), -(-k // bk)
    grid = torch.zeros(nq, nk, dtype=torch.int8)
    for i in range(nq):
        for j in range(nk):
            t = mask[i * bq : (i + 1) * bq, j * bk : (j + 1) * bk]
            grid[i, j] = 2 if bool(t.all()) else int(bool(t.any()))
    return grid


def unit_rows(*rows: str) -> torch.Tensor:
    """A unit-level mask written as strings of 0/1 (row Q; missing columns are 0)."""
    n = len(rows)
    m = torch.zeros(n, n, dtype=torch.bool)
    for i, r in enumerate(rows):
        for j, c in enumerate(r):
            m[i, j] = c == "1"
    return m


def to_tokens(unit_mask: torch.Tensor, unit: int) -> torch.Tensor:
    """Expand a unit-level mask to tokens and apply the token-level causal cut k <= q."""
    m = unit_mask.repeat_interleave(unit, 0).repeat_interleave(unit, 1)
    return m & torch.ones_like(m).tril()


# --------------------------------------------------------------------------------------------
# every shipped pattern


def test_shipped_set_is_complete():
    assert sorted(p.name for p in PATTERNS.glob("*.spd")) == FILES
    assert [p.name for p in resources.shipped_patterns()] == FILES
    assert resources.pattern_path("power") == resources.data_path("patterns/power.spd")


@pytest.mark.parametrize("fname", FILES)
def test_loads_with_defaults_and_header(fname):
    p = load(fname)
    assert p.name == SHIPPED[fname]
    assert p.causal
    # Header comment: says what it is, its source and every parameter, in units.
    text = (PATTERNS / fname).read_text()
    header = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    assert text.startswith(f"# {fname} -- ")
    for name in p.params:
        assert re.search(rf"^#\s+{name}\s", header, re.M), f"{fname}: parameter {name} is not documented"
    if p.params:
        assert f"units of `unit` = {p.unit} tokens" in header
    if fname != "causal.spd":
        assert "arXiv" in header


@pytest.mark.parametrize("fname", FILES)
def test_text_round_trips(fname):
    p = load(fname)
    again = spdsl.compile(ir_text_as_spd(p.text()))
    assert again.ir == p.ir
    assert again.text() == p.text()
    assert again.ir.hash() == p.ir.hash()
    # and the source itself compiles to the same pattern
    assert spdsl.compile(p.source) == p


@pytest.mark.parametrize("fname", FILES)
def test_layout_matches_dense_mask(fname):
    p = load(fname)
    for q_len, kv_len, bq, bk in ((2048, 2048, 64, 64), (1000, 2048, 128, 64)):
        lay = p.layout(q_len, kv_len, bq, bk)
        assert torch.equal(lay.tile_grid(), tiles_from_dense(p.dense_mask(q_len, kv_len), bq, bk)), (q_len, kv_len)


@pytest.mark.parametrize("fname", FILES)
def test_density_at_8k_is_sane(fname):
    p = load(fname)
    lay = p.layout(8192, 8192)
    counts = lay.counts()
    n = lay.n_q_tiles
    assert n == 64
    assert int(counts.min()) >= 1  # every query tile sees at least its own keys
    assert lay.nnz <= n * (n + 1) // 2  # causal: never above the diagonal
    assert torch.equal(
        lay.kv_idx.long() <= torch.repeat_interleave(torch.arange(n), counts), torch.ones(lay.nnz, dtype=torch.bool)
    )


# --------------------------------------------------------------------------------------------
# what each pattern means


def test_power_paper_density_at_8k():
    lay = load("power.spd").layout(8192, 8192, 128, 128)
    assert lay.nnz / lay.n_q_tiles == pytest.approx(12.9, abs=0.05)


def test_power_overrides():
    p = load("power.spd", window=8, sinks=2)
    assert p.params == {"window": 8, "sinks": 2}
    assert "local(8)" in p.text() and "sink(2)" in p.text()


def test_sliding_window_tiles_per_row_at_8k():
    # 32 units of 256 tokens = 64 q-tiles of 128 (two per unit, h = 0, 1). Unit Q <= 8: tiles
    # 0 .. 2Q+h. Unit Q >= 9: the sink unit (2 tiles) + units Q-8 .. Q-1 (16) + 1+h own tiles.
    expected = sum((2 * Q + h + 1) if Q <= 8 else (2 + 16 + 1 + h) for Q in range(32) for h in (0, 1))
    assert expected == 1068
    lay = load("sliding_window.spd").layout(8192, 8192)
    assert lay.nnz == expected


def test_dense_causal_layout():
    lay = load("causal.spd").layout(8192, 8192)
    assert lay.nnz == 64 * 65 // 2
    assert lay.n_full == lay.nnz - 64  # the diagonal tiles are the partial ones


def test_dense_causal_mask_by_hand():
    p = load("causal.spd")
    assert p.unit == 1
    assert p.dense_mask(4, 4).int().tolist() == [
        [1, 0, 0, 0],
        [1, 1, 0, 0],
        [1, 1, 1, 0],
        [1, 1, 1, 1],
    ]
    # two queries at the end of five keys (bottom-right alignment, q_offset = 3)
    assert p.dense_mask(2, 5).int().tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]


def test_sliding_window_mask_by_hand():
    p = load("sliding_window.spd")
    assert p.unit == 256
    # default window 9, one sink unit, 12 units: unit Q sees unit 0 and units Q-8 .. Q
    expected = unit_rows(
        "1",
        "11",
        "111",
        "1111",
        "11111",
        "111111",
        "1111111",
        "11111111",
        "111111111",
        "1111111111",
        "10111111111",
        "100111111111",
    )
    assert torch.equal(p.dense_mask(12 * 256, 12 * 256), to_tokens(expected, 256))
    small = load("sliding_window.spd", window=2, sinks=2)
    expected = unit_rows("1", "11", "111", "1111", "11011", "110011")
    assert torch.equal(small.dense_mask(6 * 256, 6 * 256), to_tokens(expected, 256))


def test_streaming_mask_by_hand():
    p = load("streaming.spd")
    assert p.unit == 64
    small = load("streaming.spd", window=3)
    expected = unit_rows("1", "11", "111", "1111", "10111", "100111", "1000111")
    assert torch.equal(small.dense_mask(7 * 64, 7 * 64), to_tokens(expected, 64))
    # defaults: the window is 16 units; unit 17 sees unit 0 and units 2 .. 17
    m = p.dense_mask(20 * 64, 20 * 64)
    last_unit_row = m[17 * 64 + 63].view(20, 64).all(1).int().tolist()
    assert last_unit_row == [1, 0] + [1] * 16 + [0, 0]
    # ~1K tokens of recent context plus the 64 sink tokens
    assert int(m[-1].sum()) == 64 + 16 * 64


def test_stride_slash_mask_by_hand():
    p = load("stride_slash.spd", step=4, window=2)
    expected = unit_rows(
        "1",
        "11",
        "111",
        "1011",  # 3: sink 0, window 2..3
        "10011",  # 4: sink 0, window 3..4, distance 4 -> 0
        "110011",  # 5: sink, window 4..5, distance 4 -> 1
        "1010011",  # 6: sink, window 5..6, distance 4 -> 2
        "10010011",  # 7: sink, window 6..7, distance 4 -> 3
        "100010011",  # 8: sink, window 7..8, distances 4 and 8 -> 4 and 0
    )
    assert torch.equal(p.dense_mask(9 * 256, 9 * 256), to_tokens(expected, 256))


def test_dilated_mask_by_hand():
    p = load("dilated.spd")
    assert p.params == {"w": 20, "r": 1}
    small = load("dilated.spd", w=3, r=2)  # distances 0, 2, 4
    expected = unit_rows("1", "01", "101", "0101", "10101", "010101", "0010101")
    assert torch.equal(small.dense_mask(7 * 256, 7 * 256), to_tokens(expected, 256))


def test_longnet_pieces():
    p = load("longnet.spd")
    assert p.unit == 64
    assert p.params == {"w": 8, "ratio": 2}
    prims = sorted(prim.text() for prim in p.ir.expr.primitives())
    pieces = [(8, 1), (16, 2), (32, 4), (64, 8), (128, 16)]
    expected_prims = [f"segment({L})" for L, _ in pieces] + [f"every({r})" for _, r in pieces if r > 1]
    assert prims == sorted(expected_prims)
    # the last unit of a 128-unit block sees: its 8-unit segment, even units of its 16-unit
    # segment, multiples of 4 in its 32-unit segment, ... and multiples of 16 anywhere in the block
    m = p.dense_mask(64, 128 * 64)  # the last unit's queries only
    row = m[-1].view(128, 64).any(1)
    seen = {K for K in range(128) if row[K]}
    expected = set(range(120, 128)) | set(range(112, 128, 2)) | set(range(96, 128, 4))
    expected |= set(range(64, 128, 8)) | set(range(0, 128, 16))
    assert seen == expected
