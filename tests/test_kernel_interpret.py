"""The GENERATED Triton prefill kernel, run by the Triton interpreter on CPU, against the fp64 reference.

``op.module.attention`` is called directly, so the kernel runs (not the op's CPU reference
fallback). Buffers the module allocates with ``torch.empty`` are pre-filled with NaN (see
:func:`nan_buffers`), so a row the kernel forgets to write shows up. Shapes stay tiny: the
interpreter runs every program and every tile iteration in Python.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import spdsl
from spdsl import reference
from spdsl.core import primitives as prims
from tests.helpers import nan_buffers, scoped_env
from tests.strategies import PRIMITIVE_CASES, pattern_irs

#: Max abs error vs fp64: fp32 (IEEE dots) and fp16 (P is rounded to fp16 before P @ V, like any
#: flash kernel; inputs ~N(0,1) so |out| <= ~4 and an fp16 ulp there is ~2e-3).
TOL = {torch.float32: 1e-4, torch.float16: 4e-3}
LSE_TOL = {torch.float32: 1e-4, torch.float16: 2e-3}


@pytest.fixture(scope="module", autouse=True)
def interpreter_env(tmp_path_factory):
    """TRITON_INTERPRET=1 and a private SPDSL_CACHE_DIR for this module's tests, restored after."""
    with scoped_env(TRITON_INTERPRET="1", SPDSL_CACHE_DIR=str(tmp_path_factory.mktemp("spdsl_cache"))):
        yield


def build(pattern, block_m: int = 16, block_n: int = 16):
    """The op (cached in-process by spdsl.build) with a single small interpreter config."""
    if isinstance(pattern, str):
        pattern = spdsl.compile(pattern)
    return spdsl.build(pattern, block_m=block_m, block_n=block_n, num_warps=4, num_stages=1)


def qkv(B, Hq, Hkv, Sq, Skv, D, dtype, seed=0, strided=False):
    g = torch.Generator().manual_seed(seed)
    if strided:  # [B, S, H, D] storage viewed as [B, H, S, D]: only the last dim is contiguous
        q = torch.randn(B, Sq, Hq, D, generator=g).transpose(1, 2)
        k = torch.randn(B, Skv, Hkv, D, generator=g).transpose(1, 2)
        v = torch.randn(B, Skv, Hkv, D, generator=g).transpose(1, 2)
    else:
        q = torch.randn(B, Hq, Sq, D, generator=g)
        k = torch.randn(B, Hkv, Skv, D, generator=g)
        v = torch.randn(B, Hkv, Skv, D, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def check_against_reference(op, q, k, v, *, scale=None, q_offset=None):
    """Run the kernel (NaN-prefilled buffers) and compare out and LSE with the fp64 reference."""
    with nan_buffers(op.module):
        out, lse = op.module.attention(q, k, v, scale=scale, q_offset=q_offset, return_lse=True)
    Sq, Skv = q.shape[2], k.shape[2]
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == q.shape[:3] and lse.dtype == torch.float32
    assert not torch.isnan(out).any(), "NaN in the output: a row was not written (or 0/0)"
    assert not torch.isnan(lse).any(), "NaN in the LSE"
    ref, ref_lse = reference.attention(op.pattern, q, k, v, scale=scale, q_offset=q_offset, return_lse=True)
    off = Skv - Sq if q_offset is None else q_offset
    empty = ~op.pattern.dense_mask(Sq, Skv, off).any(-1)  # [Sq]
    if empty.any():
        assert torch.equal(out[:, :, empty], torch.zeros_like(out[:, :, empty])), "empty rows must be exactly 0"
        assert bool((lse[:, :, empty] == -math.inf).all()), "empty rows must have LSE -inf"
    vis = ~empty
    if vis.any():
        err = (out.double() - ref).abs()[:, :, vis].max().item()
        assert err <= TOL[q.dtype], f"max abs error {err:.3g} > {TOL[q.dtype]}"
        lerr = (lse.double() - ref_lse).abs()[:, :, vis].max().item()
        assert lerr <= LSE_TOL[q.dtype], f"LSE max abs error {lerr:.3g} > {LSE_TOL[q.dtype]}"
        assert torch.isfinite(lse[:, :, vis]).all()
    return out, lse, empty


# --------------------------------------------------------------------------------------------
# Hypothesis: random patterns over every primitive


@st.composite
def cases(draw):
    pat = draw(pattern_irs(max_depth=2))
    B = draw(st.integers(1, 2))
    Hkv = draw(st.integers(1, 2))
    group = draw(st.sampled_from([1, 2, 4]))
    if B * Hkv * group > 4:  # keep the interpreter's program count small
        B, Hkv = 1, 1
    Sq = draw(st.integers(1, 80))
    Skv = draw(st.integers(1, 80))
    q_offset = draw(st.one_of(st.none(), st.integers(-40, 100)))
    return dict(
        pattern=pat,
        shape=(B, Hkv * group, Hkv, Sq, Skv, draw(st.sampled_from([16, 32]))),
        dtype=draw(st.sampled_from([torch.float32, torch.float16])),
        block_m=draw(st.sampled_from([16, 32])),
        block_n=draw(st.sampled_from([16, 32])),
        q_offset=q_offset,
        scale=draw(st.sampled_from([None, 0.3])),
        strided=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


def run_case(case):
    op = build(spdsl.Pattern(case["pattern"]), case["block_m"], case["block_n"])
    q, k, v = qkv(*case["shape"], case["dtype"], case["seed"], case["strided"])
    check_against_reference(op, q, k, v, scale=case["scale"], q_offset=case["q_offset"])


_QUIET = [HealthCheck.too_slow, HealthCheck.data_too_large]


@settings(max_examples=20, suppress_health_check=_QUIET)
@given(cases())
def test_random_patterns_match_reference(case):
    run_case(case)


@pytest.mark.slow
@settings(max_examples=150, suppress_health_check=_QUIET)
@given(cases())
def test_random_patterns_match_reference_thorough(case):
    run_case(case)


def test_primitive_cases_cover_every_primitive():
    names = {p.name for s in PRIMITIVE_CASES for p in spdsl.compile(f"pattern p {{ {s} }}").ir.expr.primitives()}
    assert names == set(prims.PRIMITIVES)


@pytest.mark.parametrize("body", PRIMITIVE_CASES)
def test_each_primitive(body):
    op = build(f"pattern p {{ {body} }}", 16, 32)
    check_against_reference(op, *qkv(1, 2, 1, 37, 45, 16, torch.float32, seed=1))


# --------------------------------------------------------------------------------------------
# Regression cases

POWER_LIKE = "pattern power_like { unit 4 causal attend sink(1) | local(3) | powers(2) }"


@pytest.mark.parametrize("block_m,block_n", [(16, 16), (32, 16), (16, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_power_like_s37(block_m, block_n, dtype):
    op = build(POWER_LIKE, block_m, block_n)
    _, _, empty = check_against_reference(op, *qkv(1, 4, 2, 37, 37, 32, dtype, seed=2))
    assert not empty.any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_full_and_partial_tiles(dtype):
    """Both kernel loops run: full tiles (no predicate) and partial ones (predicate), plus absent tiles."""
    pat = spdsl.compile("pattern wide { unit 4 causal attend sink(1) | local(8) | powers(2) }")
    lay = pat.layout(77, 77, 16, 16)
    assert 0 < lay.n_full < lay.nnz < lay.n_q_tiles * lay.n_kv_tiles
    check_against_reference(build(pat), *qkv(1, 2, 1, 77, 77, 16, dtype, seed=12))


def test_noncausal_band():
    op = build("pattern b { attend band(-3, 2) }")
    check_against_reference(op, *qkv(2, 2, 2, 41, 41, 16, torch.float32, seed=3))


def test_noncausal_band_fp16_gqa4():
    op = build("pattern b { attend band(-3, 2) }", 32, 16)
    check_against_reference(op, *qkv(1, 4, 1, 41, 50, 32, torch.float16, seed=4))


def test_segment_minus_every():
    op = build("pattern s { unit 2 attend segment(2) - every(3) }")
    check_against_reference(op, *qkv(1, 2, 1, 33, 33, 16, torch.float32, seed=5))


def test_q_len_greater_than_kv_len_gives_empty_rows():
    """Default q_offset = kv_len - q_len < 0: the first rows sit at negative positions and see nothing."""
    op = build("pattern c { causal attend all }")
    _, lse, empty = check_against_reference(op, *qkv(1, 2, 1, 50, 20, 16, torch.float32, seed=6))
    assert int(empty.sum()) == 30 and bool(empty[:30].all())
    assert bool((lse[:, :, :30] == -math.inf).all())


def test_negative_positions_with_floor_division():
    """Negative positions need floor (not truncating) division by the unit."""
    op = build("pattern w { unit 3 causal attend local(2) | sink(1) }")
    check_against_reference(op, *qkv(1, 1, 1, 29, 23, 16, torch.float32, seed=7), q_offset=-5)


def test_pattern_with_no_visible_key_anywhere():
    op = build("pattern e { causal attend band(1, 3) - band(0, 5) }")
    with nan_buffers(op.module):
        out, lse = op.module.attention(*qkv(1, 2, 1, 21, 21, 16, torch.float32), return_lse=True)
    assert torch.equal(out, torch.zeros_like(out))
    assert bool((lse == -math.inf).all())


@pytest.mark.parametrize("q_offset", [None, 0, 17, -3])
def test_q_len_1(q_offset):
    op = build(POWER_LIKE)
    check_against_reference(op, *qkv(1, 4, 2, 1, 45, 16, torch.float32, seed=8), q_offset=q_offset)


@pytest.mark.parametrize("kv_len", [17, 31, 33, 47])
def test_kv_len_not_a_multiple_of_the_block(kv_len):
    op = build("pattern d { unit 2 causal attend sink(1) | local(4) }", 16, 16)
    check_against_reference(op, *qkv(1, 2, 2, 19, kv_len, 16, torch.float32, seed=9))


def test_q_len_smaller_than_kv_len_bottom_right():
    op = build(POWER_LIKE, 32, 32)
    check_against_reference(op, *qkv(2, 2, 1, 13, 70, 32, torch.float16, seed=10))


def test_without_lse_returns_only_out():
    op = build(POWER_LIKE)
    q, k, v = qkv(1, 2, 1, 20, 20, 16, torch.float32)
    out = op.module.attention(q, k, v)
    assert isinstance(out, torch.Tensor) and out.shape == q.shape
    torch.testing.assert_close(out.double(), reference.attention(op.pattern, q, k, v), atol=1e-4, rtol=0)


def test_op_call_runs_the_interpreted_kernel():
    """Under TRITON_INTERPRET=1 the op itself routes CPU tensors to the generated kernel."""
    op = build(POWER_LIKE)
    q, k, v = qkv(1, 2, 1, 23, 23, 16, torch.float32, seed=11)
    with nan_buffers(op.module):
        out, lse = op(q, k, v, return_lse=True)
    ref, ref_lse = reference.attention(op.pattern, q, k, v, return_lse=True)
    assert (out.double() - ref).abs().max() <= 1e-4
    assert (lse.double() - ref_lse).abs().max() <= 1e-4


def test_zero_length_inputs():
    op = build(POWER_LIKE)
    q, k, v = qkv(1, 2, 1, 0, 10, 16, torch.float32)
    out, lse = op.module.attention(q, k, v, return_lse=True)
    assert out.shape == (1, 2, 0, 16) and lse.shape == (1, 2, 0)
