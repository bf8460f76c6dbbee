"""Gradients of the op: dq, dk, dv (and the LSE's contribution) against fp64 autograd.

The truth is ``torch.autograd`` through :func:`spdsl.reference.attention` (dense, float64) on the very
same (rounded) inputs. Covered here:

* the generated Triton backward kernels in the interpreter (``TRITON_INTERPRET=1``), through the op's
  autograd and through the module's ``backward(...)``: Hypothesis over patterns from every primitive
  and set operation, units, tile sizes, odd lengths, q_offset (rows that see nothing get exact zeros),
  GQA, fp16 / fp32, gradients through the LSE, the atomic-dQ variant; NaN-prefilled buffers;
* the blocked CPU backend (no interpreter), and ``gradcheck`` of its formulas in float64;
* varlen (packed sequences equal per-sequence calls), determinism, ``torch.compile`` of a training
  step, a tiny two-layer model trained against a reference-attention twin, and the backward's
  input validation.

Tolerances are relative to the gradient's scale (``max |reference|`` of each of dq, dk, dv):

* fp32 1e-4: the kernels use IEEE fp32 dots; measured worst cases over the Hypothesis sweeps are
  below 2e-6, so 1e-4 (the forward tests' fp32 bound, there absolute on outputs of size ~1) leaves
  ~50x margin while a missing or extra tile gives errors of order 1e-1..1.
* fp16 5e-3: the kernels round P and dS to fp16 before their dots and store dq / dk / dv in fp16
  (half an fp16 ulp is 4.9e-4 relative); the forward output they start from is fp16 too. Measured
  worst cases are ~1.5e-3 (a sum of a few such roundings); the forward tests allow 4e-3 absolute
  on outputs of size up to ~4, i.e. ~1e-3 relative.

Shapes are small (the interpreter runs every program and tile iteration in Python); the larger
sweeps are ``@pytest.mark.slow`` (``SPDSL_SLOW=1``).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import spdsl
from tests.backward_helpers import (
    _QUIET,
    BAND,
    POWER_LIKE,
    SHAPE_CASES,
    TILED,
    build,
    case_inputs,
    check_case,
    check_grads,
    interpreter,
    loss_of,
    module_grads,
    op_grads,
    qkv,
    ref_grads,
)
from tests.helpers import nan_buffers
from tests.strategies import PRIMITIVE_CASES, n_examples, pattern_irs

# --------------------------------------------------------------------------------------------
# 1. The generated backward kernels in the interpreter


def _sub_blocks(tile):
    return st.sampled_from([b for b in (16, 32, 64) if b <= tile])


@st.composite
def interp_cases(draw, max_len=100):
    tile_m = draw(st.sampled_from([16, 32, 64]))
    tile_n = draw(st.sampled_from([16, 32, 64]))
    B = draw(st.integers(1, 2))
    Hkv = draw(st.integers(1, 2))
    group = draw(st.sampled_from([1, 2, 4]))
    if B * Hkv * group > 4:  # keep the interpreter's program count small
        B, Hkv = 1, 1
    return dict(
        pattern=draw(pattern_irs(max_depth=2)),
        tiles=(tile_m, tile_n),
        dkdv=(draw(_sub_blocks(tile_m)), draw(_sub_blocks(tile_n))),
        dq=(draw(_sub_blocks(tile_m)), draw(_sub_blocks(tile_n))),
        atomic=draw(st.booleans()),
        shape=(B, Hkv * group, Hkv, draw(st.integers(1, max_len)), draw(st.integers(1, max_len))),
        D=draw(st.sampled_from([16, 32])),
        dtype=draw(st.sampled_from([torch.float32, torch.float16])),
        q_offset=draw(st.one_of(st.none(), st.integers(-60, 120))),
        scale=draw(st.sampled_from([None, 0.3])),
        lse=draw(st.booleans()),
        via=draw(st.sampled_from(["op", "module"])),
        strided=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


def run_interp_case(case):
    with interpreter():
        op = build(case["pattern"], *case["tiles"], dkdv=case["dkdv"], dq=case["dq"], atomic=case["atomic"])
        q, k, v, dout, w, kw = case_inputs(case)
        with nan_buffers(op.module):  # buffers the module allocates start NaN: unwritten rows show
            got = (op_grads if case["via"] == "op" else module_grads)(op, q, k, v, dout, w, **kw)
    check_case(op, got, q, k, v, dout, w, kw)


@settings(max_examples=n_examples(12), suppress_health_check=_QUIET)
@given(interp_cases())
def test_interpreter_random_patterns(case):
    run_interp_case(case)


@pytest.mark.slow
@settings(max_examples=n_examples(150), suppress_health_check=_QUIET)
@given(interp_cases(max_len=200))
def test_interpreter_random_patterns_thorough(case):
    run_interp_case(case)


@pytest.mark.parametrize("body", PRIMITIVE_CASES, ids=lambda b: b.replace(" ", "_"))
def test_interpreter_each_primitive_B1_H2_Hkv1_q37_kv45_fp32(body):
    with interpreter():
        op = build(f"pattern p {{ {body} }}", 16, 32, dkdv=(16, 16), dq=(16, 32))
        q, k, v, dout, _ = qkv(1, 2, 1, 37, 45, 16, torch.float32, seed=1)
        with nan_buffers(op.module):
            got = op_grads(op, q, k, v, dout)
    check_grads(op.pattern, got, ref_grads(op.pattern, q, k, v, dout), (q, k, v))


TILES = [
    ((16, 16), (16, 16), (16, 16)),
    ((32, 16), (16, 16), (32, 16)),
    ((32, 64), (16, 32), (32, 16)),
    ((64, 32), (32, 32), (16, 32)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("tiles,dkdv,dq", TILES, ids=lambda t: "x".join(map(str, t)))
def test_interpreter_tiles_power_like_q77_kv77_gqa2(tiles, dkdv, dq, dtype):
    """Full tiles (no predicate), partial ones and absent ones; every sub-block split of a tile."""
    pat = spdsl.compile(TILED)
    lay = pat.layout(77, 77, *tiles)
    assert 0 < lay.n_full < lay.nnz < lay.n_q_tiles * lay.n_kv_tiles
    with interpreter():
        op = build(pat, *tiles, dkdv=dkdv, dq=dq)
        q, k, v, dout, _ = qkv(1, 4, 2, 77, 77, 32, dtype, seed=2)
        with nan_buffers(op.module):
            got = op_grads(op, q, k, v, dout)
    check_grads(pat, got, ref_grads(pat, q, k, v, dout), (q, k, v))


@pytest.mark.parametrize("via", ["op", "module"])
@pytest.mark.parametrize("case", list(SHAPE_CASES), ids=str)
def test_interpreter_shapes_and_offsets(case, via):
    B, Hq, Hkv, Sq, Skv, off = SHAPE_CASES[case]
    with interpreter():
        op = build(POWER_LIKE, 16, 16)
        q, k, v, dout, w = qkv(B, Hq, Hkv, Sq, Skv, 16, torch.float32, seed=3)
        with nan_buffers(op.module):
            got = (op_grads if via == "op" else module_grads)(op, q, k, v, dout, w, q_offset=off)
    check_grads(op.pattern, got, ref_grads(op.pattern, q, k, v, dout, w, q_offset=off), (q, k, v), q_offset=off)


def test_interpreter_rows_before_every_key_get_zero_gradients():
    """q_offset so negative that the first 20 rows see nothing: their dq is exactly 0 (never NaN),
    and the LSE term (only finite entries in the loss) adds nothing there."""
    with interpreter():
        op = build(POWER_LIKE, 16, 16)
        q, k, v, dout, w = qkv(1, 2, 1, 36, 30, 16, torch.float32, seed=4)
        with nan_buffers(op.module):
            out, lse = op(q, k, v, q_offset=-20, return_lse=True)
            dq, dk, dv = torch.autograd.grad(loss_of(out, lse, dout, w), (q, k, v))
    assert bool((lse[:, :, :20] == -math.inf).all()) and torch.isfinite(lse[:, :, 20:]).all()
    assert torch.equal(dq[:, :, :20], torch.zeros_like(dq[:, :, :20]))
    assert dq[:, :, 20:].abs().max() > 0
    check_grads(
        op.pattern, (dq, dk, dv), ref_grads(op.pattern, q, k, v, dout, w, q_offset=-20), (q, k, v), q_offset=-20
    )


def test_interpreter_pattern_with_no_visible_key_anywhere():
    with interpreter():
        op = build("pattern e { causal attend band(1, 3) - band(0, 5) }")
        q, k, v, dout, w = qkv(1, 2, 1, 21, 21, 16, torch.float32)
        with nan_buffers(op.module):
            got = op_grads(op, q, k, v, dout, w)
    for g in got:
        assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("atomic", [False, True], ids=["deterministic", "atomic"])
def test_interpreter_lse_gradient_noncausal_q41_kv50_gqa4(atomic, dtype):
    """Only the LSE in the loss (dout is zeros / None in the op's backward), then both terms."""
    with interpreter():
        op = build(BAND, 32, 16, dkdv=(16, 16), dq=(32, 16), atomic=atomic)
        q, k, v, dout, w = qkv(1, 4, 1, 41, 50, 32, dtype, seed=5)
        _, lse = op(q, k, v, return_lse=True)
        lse_only = torch.autograd.grad((torch.where(torch.isfinite(lse), lse, 0.0) * w).sum(), (q, k, v))
        both = op_grads(op, q, k, v, dout, w)
    check_grads(op.pattern, lse_only, ref_grads(op.pattern, q, k, v, torch.zeros_like(dout), w), (q, k, v))
    check_grads(op.pattern, both, ref_grads(op.pattern, q, k, v, dout, w), (q, k, v))


@pytest.mark.parametrize("loss", ["sum", "strided-dout"])
def test_interpreter_unusual_dout_layouts(loss):
    """dout as autograd hands it over: expanded (stride 0, from .sum()) or non-contiguous."""
    with interpreter():
        op = build(POWER_LIKE, 16, 32)
        q, k, v, _, _ = qkv(1, 2, 1, 27, 35, 16, torch.float32, seed=6, strided=True)
        out = op(q, k, v)
        if loss == "sum":
            dout = torch.ones_like(out)
            got = torch.autograd.grad(out.sum(), (q, k, v))
        else:
            dout = torch.randn(1, 27, 16, 2).permute(0, 3, 1, 2)  # stride(-1) != 1
            got = torch.autograd.grad(out, (q, k, v), dout)
    check_grads(op.pattern, got, ref_grads(op.pattern, q, k, v, dout), (q, k, v))


def test_interpreter_grad_of_q_only():
    with interpreter():
        op = build(POWER_LIKE)
        q, k, v, dout, _ = qkv(1, 2, 2, 20, 20, 16, torch.float32, seed=7)
        (dq,) = torch.autograd.grad(op(q, k.detach(), v.detach()), q, dout)
    torch.testing.assert_close(dq.double(), ref_grads(op.pattern, q, k, v, dout)[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("Sq,Skv", [(0, 10), (10, 0)], ids=["q0-kv10", "q10-kv0"])
def test_interpreter_zero_lengths(Sq, Skv):
    with interpreter():
        op = build(POWER_LIKE)
        q, k, v, dout, _ = qkv(1, 2, 1, Sq, Skv, 16, torch.float32)
        out, lse = op.module.forward(q.detach(), k.detach(), v.detach())
        grads = op.module.backward(dout, q.detach(), k.detach(), v.detach(), out, lse)
    for g, t in zip(grads, (q, k, v)):
        assert g.shape == t.shape and torch.equal(g, torch.zeros_like(g))
