"""spdsl/core: the one traversal, the one refinement engine, the kv-major layout, shared validation, the API.

* ``classify_proven`` is sound against brute force over each rectangle's cells (``keep``), exact
  where it says ``proven``, for primitives and nested ``Union`` / ``Inter`` / ``Diff``;
* ``keep`` through :class:`TorchOps` on Python ints equals the tensor result;
* ``candidates`` cover every kept key;
* :func:`spdsl.core.refine.refine`: pieces tile their origin rectangles exactly, decided pieces agree
  with brute force (with and without ``causal``, with ``grain`` > 1);
* ``Layout.kv_major()`` is the transpose of ``tile_grid()``;
* ``resolve_q_offset``, ``resolve_scale``, ``check_qkv``: their rules and messages, applied alike by
  the reference, the op and the generated module;
* ``spdsl.compile`` / ``spdsl.load`` with ``params=`` and ``**overrides``; ``SpdError`` formatting.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import spdsl
from spdsl import SpdError, reference
from spdsl.core import primitives as prims
from spdsl.core.checks import check_qkv, resolve_scale
from spdsl.core.ir import INT_LIMIT, Diff, Inter, PatternIR, Primitive, TorchOps, Union, resolve_q_offset
from spdsl.core.layout import Layout, transpose_csr
from spdsl.core.refine import refine, refine_exact
from spdsl.resources import pattern_path
from tests.helpers import scoped_env
from tests.strategies import blocks, exprs, lengths, n_examples, offsets, pattern_irs, primitives

_I64 = torch.int64

# ---------------------------------------------------------------------------------------------
# Brute force: the expression's own ``keep`` over every cell of a bounding grid


def keep_grid(expr, q_lo: int, q_hi: int, k_lo: int, k_hi: int) -> torch.Tensor:
    """bool [q_hi - q_lo + 1, k_hi - k_lo + 1]: ``expr.keep`` on every unit cell of the box."""
    Q = torch.arange(q_lo, q_hi + 1, dtype=_I64)[:, None]
    K = torch.arange(k_lo, k_hi + 1, dtype=_I64)[None, :]
    return torch.as_tensor(expr.keep(TorchOps, Q, K)).expand(Q.shape[0], K.shape[1])


@st.composite
def unit_rects(draw, n_max: int = 8):
    """1..n_max unit rectangles [Qa, Qb] x [Ka, Kb]: query units may be negative, key units are >= 0."""
    n = draw(st.integers(1, n_max))
    qa = draw(st.lists(st.integers(-12, 30), min_size=n, max_size=n))
    qw = draw(st.lists(st.integers(0, 10), min_size=n, max_size=n))
    ka = draw(st.lists(st.integers(0, 30), min_size=n, max_size=n))
    kw = draw(st.lists(st.integers(0, 10), min_size=n, max_size=n))
    return [(a, a + w, c, c + x) for a, w, c, x in zip(qa, qw, ka, kw)]


def set_exprs(kind: str) -> st.SearchStrategy:
    """Expressions whose root is the given set operation over random (nested) operands."""
    sub = exprs(2)
    if kind == "diff":
        return st.tuples(sub, sub).map(lambda ab: Diff(*ab))
    cls = {"union": Union, "inter": Inter}[kind]
    return st.lists(sub, min_size=2, max_size=3).map(cls)


def check_classify(expr, rects, exact: bool) -> None:
    """classify_proven on tensors (one call for every rectangle) and on Python ints (one call each)
    against the brute force; ``exact``: every answer must be proven and exact (a primitive)."""
    Qa, Qb, Ka, Kb = (torch.tensor([r[i] for r in rects], dtype=_I64) for i in range(4))
    any_t, all_t, proven_t = (
        torch.as_tensor(x).expand(Qa.shape) for x in expr.classify_proven(TorchOps, Qa, Qb, Ka, Kb)
    )
    grid = keep_grid(expr, -12, 40, 0, 40)
    for j, (qa, qb, ka, kb) in enumerate(rects):
        cells = grid[qa + 12 : qb + 13, ka : kb + 1]
        b_any, b_all = bool(cells.any()), bool(cells.all())
        got = bool(any_t[j]), bool(all_t[j]), bool(proven_t[j])
        where = f"{expr.text()} on [{qa}, {qb}] x [{ka}, {kb}]: (any, all, proven) = {got}, truth ({b_any}, {b_all})"
        assert not got[1] or b_all, f"all claimed but a cell is dropped: {where}"
        assert got[0] or not b_any, f"none claimed but a cell is kept: {where}"
        if got[2] or exact:
            assert got[:2] == (b_any, b_all), f"proven but not exact: {where}"
        if exact:
            assert got[2], f"a primitive's answer must be proven: {where}"
        ints = tuple(bool(x) for x in expr.classify_proven(TorchOps, qa, qb, ka, kb))
        assert ints == got, f"Python ints give {ints}: {where}"
        assert tuple(bool(x) for x in expr.classify(TorchOps, qa, qb, ka, kb)) == got[:2]


# ---------------------------------------------------------------------------------------------
# (a) classify_proven: sound, exact where proven


@settings(max_examples=n_examples(80), deadline=None)
@given(prim=primitives(), rects=unit_rects())
def test_classify_of_a_primitive_is_exact(prim, rects):
    check_classify(prim, rects, exact=True)


@settings(max_examples=n_examples(120), deadline=None)
@given(expr=exprs(3), rects=unit_rects())
def test_classify_proven_is_sound_for_random_expressions(expr, rects):
    check_classify(expr, rects, exact=isinstance(expr, Primitive))


@pytest.mark.parametrize("kind", ["union", "inter", "diff"])
@settings(max_examples=n_examples(50), deadline=None)
@given(data=st.data(), rects=unit_rects())
def test_classify_proven_is_sound_for_nested_set_operations(kind, data, rects):
    check_classify(data.draw(set_exprs(kind)), rects, exact=False)


@pytest.mark.parametrize(
    ("expr", "rect", "want"),
    [
        (Union((prims.Local(2), prims.Sink(1))), (10, 12, 20, 25), (False, False, True)),  # both operands empty
        (Union((prims.Local(20), prims.Every(3))), (10, 12, 0, 5), (True, True, True)),  # one covers it all
        (Union((prims.Local(3), prims.Every(100))), (10, 12, 9, 14), (True, False, True)),  # one mixed, one empty
        (Inter((prims.Local(3), prims.All())), (10, 12, 9, 14), (True, False, True)),  # one mixed, one neutral
        (Diff(prims.Local(3), prims.Sink(1)), (10, 12, 9, 14), (True, False, True)),  # removes nothing
        (Diff(prims.All(), prims.Local(3)), (10, 12, 9, 14), (True, False, True)),  # left keeps everything
    ],
    ids=["union-empty", "union-covered", "union-one-mixed", "inter-one-mixed", "diff-removes-nothing", "diff-all-left"],
)
def test_classify_proven_where_exactness_is_known(expr, rect, want):
    """Set operations are exact where all operands but one are neutral and that one is exact."""
    Qa, Qb, Ka, Kb = (torch.tensor([x]) for x in rect)
    assert tuple(bool(x) for x in expr.classify_proven(TorchOps, Qa, Qb, Ka, Kb)) == want


# ---------------------------------------------------------------------------------------------
# (b) keep: Python ints and tensors agree


@settings(max_examples=n_examples(60), deadline=None)
@given(
    expr=exprs(3),
    cells=st.lists(st.tuples(st.integers(-40, 60), st.integers(0, 60)), min_size=1, max_size=40),
)
def test_keep_on_python_ints_equals_the_tensor_result(expr, cells):
    Q = torch.tensor([c[0] for c in cells], dtype=_I64)
    K = torch.tensor([c[1] for c in cells], dtype=_I64)
    tensor = torch.as_tensor(expr.keep(TorchOps, Q, K)).expand(Q.shape)
    for j, (q, k) in enumerate(cells):
        got = expr.keep(TorchOps, q, k)
        assert not isinstance(got, torch.Tensor), f"{expr.text()}: keep on ints returned a tensor"
        assert bool(got) == bool(tensor[j]), f"{expr.text()} at (Q, K) = ({q}, {k})"


def test_keep_on_python_ints_spot_checks():
    e = Union((prims.Powers(2), prims.Sink(1)))
    assert [bool(e.keep(TorchOps, 9, k)) for k in range(10)] == [1, 1, 0, 0, 0, 1, 0, 1, 1, 0]
    seg = prims.Segment(4)  # floor division for negative query units: -1 // 4 == -1
    assert not seg.keep(TorchOps, -1, 0) and seg.keep(TorchOps, -1, -4)
    assert TorchOps.floor_pow(0, 2) == 1 and TorchOps.floor_pow(9, 3) == 9 and TorchOps.floor_pow(80, 3) == 27


# ---------------------------------------------------------------------------------------------
# (c) candidates cover every kept key


@settings(max_examples=n_examples(100), deadline=None)
@given(
    expr=exprs(3),
    rows=st.lists(st.tuples(st.integers(-10, 40), st.integers(0, 8)), min_size=1, max_size=6),
    kmax=st.integers(0, 60),
    span=st.integers(0, 8),
)
def test_candidates_cover_every_kept_key(expr, rows, kmax, span):
    Qa = torch.tensor([r[0] for r in rows], dtype=_I64)
    Qb = torch.tensor([r[0] + r[1] for r in rows], dtype=_I64)
    lo, hi = torch.broadcast_tensors(*expr.candidates(Qa, Qb, kmax, span))
    assert lo.dim() == 2 and lo.shape[0] == len(rows)
    keys = torch.arange(kmax + 1, dtype=_I64)
    for j in range(len(rows)):
        kept = keep_grid(expr, int(Qa[j]), int(Qb[j]), 0, kmax).any(0)
        covered = ((keys[:, None] >= lo[j][None, :]) & (keys[:, None] <= hi[j][None, :])).any(1)
        missed = keys[kept & ~covered].tolist()
        assert not missed, f"{expr.text()}: query units [{int(Qa[j])}, {int(Qb[j])}] keep key units {missed} uncovered"


# ---------------------------------------------------------------------------------------------
# (d) the refinement engine


def token_truth(ir: PatternIR, p0: int, p1: int, k0: int, k1: int, causal: bool) -> torch.Tensor:
    """bool [p1 - p0 + 1, k1 - k0 + 1]: the expression at token level, cut by ``k <= q`` if causal."""
    p = torch.arange(p0, p1 + 1, dtype=_I64)[:, None]
    k = torch.arange(k0, k1 + 1, dtype=_I64)[None, :]
    mask = torch.as_tensor(ir.expr.keep(TorchOps, p // ir.unit, k // ir.unit)).expand(p.shape[0], k.shape[1])
    return mask & (k <= p) if causal else mask


@st.composite
def token_rects(draw):
    n = draw(st.integers(1, 5))
    out = []
    for _ in range(n):
        p0, k0 = draw(st.integers(-20, 40)), draw(st.integers(0, 40))
        out.append((p0, p0 + draw(st.integers(0, 20)), k0, k0 + draw(st.integers(0, 20))))
    return out


def check_refine(ir: PatternIR, rects, causal: bool, grain: int) -> None:
    p0, p1, k0, k1 = (torch.tensor([r[i] for r in rects], dtype=_I64) for i in range(4))
    cover = [torch.zeros(r[1] - r[0] + 1, r[3] - r[2] + 1, dtype=torch.int64) for r in rects]
    N = ir.unit
    for rounds, pieces in enumerate(refine(ir, p0, p1, k0, k1, causal=causal, grain=grain)):
        assert rounds < 200, "refinement does not terminate"
        leaf = ~(pieces.any & ~pieces.all) | pieces.stuck
        for j in range(pieces.origin.numel()):
            o = int(pieces.origin[j])
            a, b, c, d = (int(t[j]) for t in (pieces.p0, pieces.p1, pieces.k0, pieces.k1))
            r0, _, c0, _ = rects[o]
            assert rects[o][0] <= a <= b <= rects[o][1] and rects[o][2] <= c <= d <= rects[o][3]
            truth = token_truth(ir, a, b, c, d, causal)
            t_any, t_all = bool(truth.any()), bool(truth.all())
            flags = bool(pieces.any[j]), bool(pieces.all[j]), bool(pieces.proven[j]), bool(pieces.stuck[j])
            where = f"{ir.expr.text()} unit {N} grain {grain} causal={causal}: [{a}, {b}] x [{c}, {d}] {flags}"
            assert not flags[1] or t_all, f"all claimed, a cell is hidden: {where}"
            assert flags[0] or not t_any, f"none claimed, a cell is visible: {where}"
            if flags[2]:
                assert flags[:2] == (t_any, t_all), f"proven but wrong: {where}"
            if flags[3]:
                cell = (a // N // grain, b // N // grain, c // N // grain, d // N // grain)
                assert cell[0] == cell[1] and cell[2] == cell[3], f"stuck across grain cells: {where}"
                assert flags[0] and not flags[1], f"stuck but decided: {where}"
                if flags[2] or grain == 1:
                    assert t_any and not t_all, f"stuck (proven) but not mixed: {where}"
            if bool(leaf[j]):
                cover[o][a - r0 : b - r0 + 1, c - c0 : d - c0 + 1] += 1
    for o, c in enumerate(cover):
        assert int(c.min()) == 1 and int(c.max()) == 1, f"rectangle {rects[o]}: leaves overlap or leave holes"


@pytest.mark.parametrize("grain", [1, 2, 3], ids=["grain1", "grain2", "grain3"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@settings(max_examples=n_examples(35), deadline=None)
@given(ir=pattern_irs(unit=st.integers(1, 4)), rects=token_rects())
def test_refine_pieces_tile_their_rectangles_and_agree_with_brute_force(causal, grain, ir, rects):
    check_refine(ir, rects, causal, grain)


def test_refine_single_unit_cell_is_always_decided():
    ir = PatternIR("p", 4, False, Union((prims.Powers(2), prims.Stride(3))) - prims.Every(2))
    p0 = torch.arange(0, 40, 4, dtype=_I64)
    k0 = torch.full_like(p0, 8)
    (pieces,) = list(refine(ir, p0, p0 + 3, k0, k0 + 3))  # one unit cell each: decided in the first round
    assert bool((pieces.all | ~pieces.any).all()) and bool(pieces.proven.all())


def test_refine_live_stops_splitting():
    ir = PatternIR("p", 1, False, prims.Local(3))
    t = torch.tensor([0], dtype=_I64)
    rounds = list(refine(ir, t, t + 31, t, t + 31, live=lambda r: torch.zeros_like(r.any)))
    assert len(rounds) == 1 and bool(rounds[0].any[0]) and not bool(rounds[0].all[0])
    assert len(list(refine(ir, t, t + 31, t, t + 31))) > 1


def test_refine_stuck_only_where_a_grain_cell_is_mixed():
    """``local(2) | band(2, 3)`` keeps every cell of units [2, 3] x [0, 1] (d = 1, 2, 2, 3), but neither
    operand alone does, so ``all`` is not proven and the grain-2 cell is reported stuck. Through
    :mod:`spdsl.reach` a stuck node pair abandons the coarse graph: e.g. the causal pattern
    ``(segment(32) & every(2)) | (segment(32) - every(2))`` (== ``segment(32)``) at 65,536 tokens was
    refused over the reach_nodes limit while ``segment(32)`` gets 16-unit nodes."""
    ir = PatternIR("p", 1, False, Union((prims.Local(2), prims.Band(2, 3))))
    assert bool(token_truth(ir, 2, 3, 0, 1, False).all())
    t = lambda x: torch.tensor([x], dtype=_I64)
    for pieces in refine_exact(ir, t(2), t(3), t(0), t(1), grain=2):
        assert not bool(pieces.stuck.any()), f"stuck on a fully kept grain cell: {pieces}"


def test_reach_graph_of_a_split_and_rejoined_pattern_equals_the_plain_one():
    from spdsl.reach import unit_graph

    split = spdsl.compile("pattern a { causal attend (segment(32) & every(2)) | (segment(32) - every(2)) }")
    plain = spdsl.compile("pattern b { causal attend segment(32) }")
    ga, gb = unit_graph(split, 65536), unit_graph(plain, 65536)
    assert ga.r == gb.r == 16
    for x, y in zip((ga.rows, ga.a, ga.b), (gb.rows, gb.a, gb.b)):
        assert x.tolist() == y.tolist()


# ---------------------------------------------------------------------------------------------
# (e) the kv-major layout


def check_kv_major(lay: Layout) -> None:
    q_ptr, q_idx, q_full = lay.kv_major()
    assert q_ptr.dtype == torch.int32 and q_idx.dtype == torch.int32 and q_full.dtype == torch.bool
    assert q_ptr.numel() == lay.n_kv_tiles + 1 and q_idx.numel() == q_full.numel() == lay.nnz
    grid = lay.tile_grid()
    for j in range(lay.n_kv_tiles):
        a, b = int(q_ptr[j]), int(q_ptr[j + 1])
        rows = torch.nonzero(grid[:, j]).flatten()
        assert q_idx[a:b].tolist() == rows.tolist(), f"kv tile {j}: q tiles {q_idx[a:b].tolist()}"
        assert q_full[a:b].tolist() == (grid[rows, j] == 2).tolist(), f"kv tile {j}: full flags"
    back = transpose_csr(q_ptr, q_idx, q_full, lay.n_q_tiles)  # transposing twice gives the q-major CSR
    assert [t.tolist() for t in back] == [lay.kv_ptr.tolist(), lay.kv_idx.tolist(), lay.kv_full.tolist()]


@settings(max_examples=n_examples(120), deadline=None)
@given(p=pattern_irs(), q_len=lengths, kv_len=lengths, q_offset=offsets, block_q=blocks, block_kv=blocks)
def test_kv_major_is_the_transpose_of_the_tile_grid(p, q_len, kv_len, q_offset, block_q, block_kv):
    check_kv_major(Layout(p, q_len, kv_len, block_q, block_kv, q_offset))


@pytest.mark.parametrize(
    ("q_len", "kv_len", "block_q", "block_kv", "q_offset"),
    [
        (777, 1001, 64, 32, None),
        (1001, 777, 32, 64, None),
        (300, 900, 48, 80, 123),
        (5, 5, 128, 128, 0),
        (0, 9, 4, 4, 0),
    ],
    ids=["q<kv-odd", "q>kv-negative-positions", "q_offset-odd-tiles", "one-tile", "no-queries"],
)
def test_kv_major_of_power(q_len, kv_len, block_q, block_kv, q_offset):
    p = spdsl.compile("pattern p(w = 3) { unit 16 causal attend sink(1) | local(w) | powers(2) }")
    check_kv_major(p.layout(q_len, kv_len, block_q, block_kv, q_offset))


# ---------------------------------------------------------------------------------------------
# (f) resolve_q_offset, resolve_scale, check_qkv


@pytest.mark.parametrize(
    ("q_offset", "q_len", "kv_len", "want"),
    [
        (None, 3, 10, 7),
        (None, 10, 3, -7),
        (0, 4, 4, 0),
        (-5, 4, 4, -5),
        (np.int64(12), 4, 4, 12),
        (np.int32(-3), 4, 4, -3),
        (-(2**31) + 1, 1, 1, -(2**31) + 1),
        (2**31 - 4, 4, 4, 2**31 - 4),
    ],
    ids=["default", "default-negative", "zero", "negative", "numpy-int64", "numpy-int32", "lowest", "highest"],
)
def test_resolve_q_offset_accepts(q_offset, q_len, kv_len, want):
    got = resolve_q_offset(q_offset, q_len, kv_len)
    assert got == want and type(got) is int


@pytest.mark.parametrize(
    "bad",
    [True, False, 1.0, "3", torch.tensor(3), np.float64(2.0)],
    ids=["true", "false", "float", "str", "tensor", "np-float"],
)
def test_resolve_q_offset_refuses_non_integers(bad):
    with pytest.raises(TypeError, match=r"^q_offset must be an int or None, got \w+"):
        resolve_q_offset(bad, 4, 4)


@pytest.mark.parametrize(
    ("q_offset", "q_len"),
    [(-(2**31), 1), (2**31, 1), (2**31 - 3, 4), (None, 2**31 + 1)],
    ids=["below", "above", "end-above", "default"],
)
def test_resolve_q_offset_refuses_positions_outside_int32(q_offset, q_len):
    with pytest.raises(ValueError, match=r"q_offset=-?\d+ puts query positions outside int32"):
        resolve_q_offset(q_offset, q_len, 0)


@pytest.mark.parametrize(
    ("scale", "want"), [(None, 1 / 8), (0.5, 0.5), (2, 2.0), (1e-30, 1e-30)], ids=["default", "float", "int", "tiny"]
)
def test_resolve_scale_accepts(scale, want):
    got = resolve_scale(scale, 64)
    assert got == want and type(got) is float


BAD_SCALES = [
    (-1.0, ValueError, r"scale must be a finite positive number, got -1.0"),
    (0.0, ValueError, r"scale must be a finite positive number, got 0.0"),
    (math.nan, ValueError, r"scale must be a finite positive number, got nan"),
    (math.inf, ValueError, r"scale must be a finite positive number, got inf"),
    (True, TypeError, r"scale must be a float or None, got bool"),
    ("0.5", TypeError, r"scale must be a float or None, got str"),
]
BAD_SCALE_IDS = ["negative", "zero", "nan", "inf", "bool", "str"]


@pytest.mark.parametrize(("scale", "exc", "message"), BAD_SCALES, ids=BAD_SCALE_IDS)
def test_resolve_scale_refuses(scale, exc, message):
    with pytest.raises(exc, match=f"^{message}$"):
        resolve_scale(scale, 64)


def _t(*shape, dtype=torch.float32, device="cpu"):
    return torch.zeros(*shape, dtype=dtype, device=device)


def _qkv(q=(1, 1, 4, 16), k=(1, 1, 4, 16), v=(1, 1, 4, 16), **options):
    """Zero tensors of the given shapes (a non-tuple is passed through); ``options`` maps a tensor's
    name to its ``dtype`` / ``device``: ``_qkv(k_device="meta")``."""
    out = []
    for name, shape in (("q", q), ("k", k), ("v", v)):
        opts = {key[2:]: val for key, val in options.items() if key.startswith(name + "_")}
        out.append(_t(*shape, **opts) if isinstance(shape, tuple) else shape)
    return tuple(out)


#: (q, k, v) that break one rule, the exception and the start of its message.
BAD_QKV = {
    "not-a-tensor": (_qkv(q=np.zeros((1, 1, 4, 16))), TypeError, "q must be a torch.Tensor, got ndarray"),
    "integer-dtype": (_qkv(k_dtype=torch.int32), TypeError, "k must be a floating-point tensor"),
    "rank": (
        _qkv(q=(1, 4, 16)),
        ValueError,
        "q must be a 4-d tensor (rank 4) [batch, heads, seq, head_dim], got shape (1, 4, 16)",
    ),
    "devices": (_qkv(k_device="meta"), ValueError, "q, k, v must be on one device"),
    "batch": (_qkv(q=(2, 1, 4, 16)), ValueError, "q, k, v must have the same batch size, got q 2, k 1, v 1"),
    "k-v-shapes": (_qkv(v=(1, 1, 5, 16)), ValueError, "k and v must have the same shape but the last dim"),
    "head-dims": (
        _qkv(k=(1, 1, 4, 32), v=(1, 1, 4, 32)),
        ValueError,
        "q and k must share the head dim (head_dim), got 16 and 32",
    ),
    "gqa": (
        _qkv(q=(1, 3, 4, 16), k=(1, 2, 4, 16), v=(1, 2, 4, 16)),
        ValueError,
        "query heads (3) must be a multiple of kv heads (2) for GQA",
    ),
    "no-kv-heads": (
        _qkv(q=(1, 2, 4, 16), k=(1, 0, 4, 16), v=(1, 0, 4, 16)),
        ValueError,
        "query heads (2) must be a multiple of kv heads (0)",
    ),
    "head-dim-0": (_qkv((1, 1, 4, 0), (1, 1, 4, 0), (1, 1, 4, 0)), ValueError, "head_dim must be >= 1"),
}


@pytest.mark.parametrize("case", list(BAD_QKV), ids=list(BAD_QKV))
def test_check_qkv_refuses(case):
    qkv, exc, message = BAD_QKV[case]
    with pytest.raises(exc) as info:
        check_qkv(*qkv)
    assert str(info.value).startswith(message), str(info.value)


@pytest.mark.parametrize(
    ("layout", "shapes", "want"),
    [
        ("BHSD", [(2, 4, 5, 16), (2, 2, 7, 16), (2, 2, 7, 8)], (2, 4, 2, 5, 7, 16, 8)),
        ("BSHD", [(2, 5, 4, 16), (3, 7, 2, 16), (3, 7, 2, 16)], (2, 4, 2, 5, 7, 16, 16)),
        ("THD", [(9, 4, 32), (11, 1, 32), (11, 1, 32)], (1, 4, 1, 9, 11, 32, 32)),
    ],
    ids=["BHSD-gqa-dv", "BSHD-cache-batch", "THD-packed"],
)
def test_check_qkv_returns_sizes(layout, shapes, want):
    assert check_qkv(*(_t(*s) for s in shapes), layout) == want


@pytest.fixture(scope="module")
def power_op(tmp_path_factory):
    with scoped_env(SPDSL_CACHE_DIR=str(tmp_path_factory.mktemp("spdsl_cache")), TRITON_INTERPRET=None):
        yield spdsl.build(spdsl.compile(SMALL_POWER))


#: power.spd at unit 4, so that 12-token calls see several units
SMALL_POWER = "pattern power(window = 2, sinks = 1) { unit 4 causal attend sink(sinks) | local(window) | powers(2) }"


def _raised(fn) -> tuple[type, str]:
    with pytest.raises((TypeError, ValueError)) as info:
        fn()
    return type(info.value), str(info.value)


@pytest.mark.parametrize(("scale", "exc", "message"), BAD_SCALES, ids=BAD_SCALE_IDS)
def test_reference_op_and_module_refuse_the_same_scales(power_op, scale, exc, message):
    q = k = v = torch.randn(1, 2, 12, 16)
    want = (exc, message)
    assert _raised(lambda: reference.attention(power_op.pattern, q, k, v, scale=scale)) == want
    assert _raised(lambda: power_op(q, k, v, scale=scale)) == want  # the op on CPU (blocked backend)
    assert _raised(lambda: power_op.module.resolve_scale(scale, 16)) == want  # the generated module's copy
    with scoped_env(TRITON_INTERPRET="1"):  # the generated module's own entry point refuses before any launch
        assert _raised(lambda: power_op.module.attention(q, k, v, scale=scale)) == want


@pytest.mark.parametrize(
    ("q_offset", "exc"),
    [(True, TypeError), (1.5, TypeError), ("0", TypeError), (2**31, ValueError), (-(2**31), ValueError)],
    ids=["bool", "float", "str", "above-int32", "below-int32"],
)
def test_reference_op_and_module_refuse_the_same_q_offsets(power_op, q_offset, exc):
    q = k = v = torch.randn(1, 2, 12, 16)
    want = _raised(lambda: resolve_q_offset(q_offset, 12, 12))
    assert want[0] is exc
    assert _raised(lambda: reference.attention(power_op.pattern, q, k, v, q_offset=q_offset)) == want
    assert _raised(lambda: power_op(q, k, v, q_offset=q_offset)) == want
    assert _raised(lambda: power_op.module.resolve_q_offset(q_offset, 12, 12)) == want
    with scoped_env(TRITON_INTERPRET="1"):
        assert _raised(lambda: power_op.module.attention(q, k, v, q_offset=q_offset)) == want


def test_reference_op_and_module_accept_numpy_q_offset(power_op):
    q, k, v = (torch.randn(1, 2, 12, 16, generator=torch.Generator().manual_seed(i)) for i in range(3))
    ref = reference.attention(power_op.pattern, q, k, v, q_offset=np.int64(3))
    assert torch.allclose(power_op(q, k, v, q_offset=np.int64(3)).double(), ref, atol=1e-5)
    assert power_op.module.resolve_q_offset(np.int32(3), 12, 12) == 3


STRUCTURAL = ["rank", "batch", "k-v-shapes", "head-dims", "gqa", "no-kv-heads"]


@pytest.mark.parametrize("case", STRUCTURAL, ids=STRUCTURAL)
def test_reference_op_and_module_refuse_the_same_shapes(power_op, case):
    (q, k, v), exc, message = BAD_QKV[case]
    want = _raised(lambda: check_qkv(q, k, v))
    assert want[0] is exc and want[1].startswith(message)
    assert _raised(lambda: reference.attention(power_op.pattern, q, k, v)) == want
    assert _raised(lambda: power_op(q, k, v)) == want
    assert _raised(lambda: power_op.module.check_qkv(q, k, v)) == want


# ---------------------------------------------------------------------------------------------
# (g) the params API

TEXT = "pattern p(w = 2, s = 1, reach = w * 2) { unit 4 causal attend sink(s) | band(0, reach) | local(w) }"


@pytest.mark.parametrize("params", [{}, {"w": 5}, {"w": 5, "s": 3}, {"reach": 1}], ids=["none", "w", "w-s", "derived"])
def test_compile_params_equals_keywords(params):
    a, b = spdsl.compile(TEXT, params=params), spdsl.compile(TEXT, **params)
    assert a == b and a.params == b.params and a.ir.hash() == b.ir.hash()
    assert a.params["reach"] == params.get("reach", 2 * params.get("w", 2))  # later defaults follow overrides


@pytest.mark.parametrize("params", [{}, {"window": 8}, {"window": 8, "sinks": 2}], ids=["none", "window", "both"])
def test_load_params_equals_keywords(params):
    a, b = spdsl.load(pattern_path("power"), params=params), spdsl.load(pattern_path("power"), **params)
    assert a == b and a.params == {"window": 5, "sinks": 1, **params}


def test_parameter_names_that_are_keywords_go_through_params():
    text = "pattern p(filename = 2, params = 1) { attend local(filename) | sink(params) }"
    p = spdsl.compile(text, params={"filename": 5, "params": 3}, filename="f.spd")
    assert p.params == {"filename": 5, "params": 3} and p.ir.expr == Union((prims.Local(5), prims.Sink(3)))
    assert p.filename == "f.spd"


def test_load_parameter_named_like_keywords(tmp_path):
    path = tmp_path / "k.spd"
    path.write_text(
        "pattern first() { attend all }\npattern k(filename = 2, params = 1) { attend band(-params, filename) }\n"
    )
    p = spdsl.load(path, pattern="k", params={"filename": 7, "params": 4})
    assert p.name == "k" and p.ir.expr == prims.Band(-4, 7)
    assert spdsl.load(path, pattern="k", filename=6).ir.expr == prims.Band(-1, 6)  # load has no filename keyword


def test_keyword_colliding_with_a_parameter_is_refused_with_a_hint():
    with pytest.raises(SpdError) as info:
        spdsl.compile("pattern p(filename = 2) { attend local(filename) }", filename=5)
    err = info.value
    assert "filename= is the name shown in errors (a str), got the int 5" in err.message
    assert "params=" in (err.hint or "")
    assert "params={'filename': 5}" in str(err)


@pytest.mark.parametrize("fn", ["compile", "load"])
def test_integer_pattern_keyword_is_refused(fn):
    call = (
        (lambda: spdsl.compile(TEXT, pattern=3))
        if fn == "compile"
        else (lambda: spdsl.load(pattern_path("power"), pattern=3))
    )
    with pytest.raises(SpdError, match=r"pattern= is which pattern .* \(a str\), got the int 3") as info:
        call()
    assert "params=" in info.value.hint


@pytest.mark.parametrize("bad", [[("w", 3)], 3, "w=3"], ids=["list", "int", "str"])
@pytest.mark.parametrize("fn", ["compile", "load"])
def test_params_must_be_a_mapping(fn, bad):
    call = (
        (lambda: spdsl.compile(TEXT, params=bad))
        if fn == "compile"
        else (lambda: spdsl.load(pattern_path("power"), params=bad))
    )
    with pytest.raises(SpdError, match=rf"spdsl.{fn}: params must be a mapping"):
        call()


@pytest.mark.parametrize("fn", ["compile", "load"])
def test_a_name_given_both_ways_is_refused(fn):
    if fn == "compile":
        call = lambda: spdsl.compile(TEXT, params={"w": 3}, w=3)
    else:
        call = lambda: spdsl.load(pattern_path("power"), params={"window": 3}, window=4)
    with pytest.raises(SpdError, match=r"given both in params= and as keywords"):
        call()


def test_params_reach_the_lowering_checks():
    with pytest.raises(SpdError, match=r"unknown parameter 'x' for pattern p"):
        spdsl.compile(TEXT, params={"x": 1})
    with pytest.raises(SpdError, match=r"parameter w must be an integer, got bool True"):
        spdsl.compile(TEXT, params={"w": True})
    with pytest.raises(SpdError, match=r"parameter w = 2147483648 is out of range"):
        spdsl.compile(TEXT, params={"w": INT_LIMIT})


# ---------------------------------------------------------------------------------------------
# (h) SpdError formatting


def test_located_error_shows_file_line_col_source_caret_and_hint():
    where = {"file": "f.spd", "line": 3, "column": 12, "source_line": "    attend locl(5)\n", "length": 4}
    err = SpdError("unknown primitive 'locl'", hint="did you mean local?", **where)
    assert err.location == "f.spd:3:12"
    assert str(err) == (
        "f.spd:3:12: unknown primitive 'locl'\n        attend locl(5)\n               ^^^^\nhint: did you mean local?"
    )


@pytest.mark.parametrize(
    ("kwargs", "text"),
    [
        ({}, "no pattern"),
        ({"hint": "add one"}, "no pattern\nhint: add one"),
        ({"file": "x.spd"}, "x.spd: no pattern"),
        ({"line": 2, "column": 5}, "<string>:2:5: no pattern"),
    ],
    ids=["bare", "hint", "file-only", "line-no-file"],
)
def test_error_location_forms(kwargs, text):
    err = SpdError("no pattern", **kwargs)
    assert str(err) == err.format() == text
    assert (err.location is None) == ("file" not in kwargs and "line" not in kwargs)


def test_errors_from_compile_are_located():
    with pytest.raises(SpdError) as info:
        spdsl.compile("pattern p(w = 2) {\n    attend locl(w)\n}\n", filename="bad.spd")
    err = info.value
    assert (err.file, err.line, err.column) == ("bad.spd", 2, 12)
    assert str(err).splitlines() == [
        "bad.spd:2:12: unknown primitive 'locl'",
        "        attend locl(w)",
        "               ^^^^",
        "hint: did you mean local?",
    ]


def test_unlocated_error_shows_just_the_message():
    with pytest.raises(SpdError) as info:
        spdsl.compile(TEXT, params=3)
    err = info.value
    assert err.location is None and str(err).splitlines()[0] == err.message
    assert not str(err).startswith(("<string>", ":"))
