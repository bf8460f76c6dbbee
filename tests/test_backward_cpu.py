"""Backward of the blocked CPU backend (gradcheck in float64), varlen gradients, determinism.

Truth and tolerances as in test_backward_interpreter.py."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import spdsl
from spdsl.blocked import attention_blocked, attention_blocked_backward
from tests.backward_helpers import (
    _QUIET,
    BAND,
    POWER_LIKE,
    SHAPE_CASES,
    TOL,
    build,
    build_cpu,
    case_inputs,
    check_case,
    check_grads,
    cu,
    interpreter,
    loss_of,
    op_grads,
    qkv,
    ref_grads,
    rel_err,
)
from tests.helpers import nan_buffers
from tests.strategies import n_examples, pattern_irs

# --------------------------------------------------------------------------------------------
# 2. The blocked CPU backend (no interpreter)


@st.composite
def cpu_cases(draw, max_len=150):
    Hkv = draw(st.integers(1, 2))
    return dict(
        pattern=draw(pattern_irs(max_depth=3)),
        shape=(draw(st.integers(1, 2)), Hkv * draw(st.sampled_from([1, 2, 4])), Hkv)
        + (draw(st.integers(1, max_len)), draw(st.integers(1, max_len))),
        D=draw(st.sampled_from([16, 32])),
        dtype=draw(st.sampled_from([torch.float32, torch.float16])),
        q_offset=draw(st.one_of(st.none(), st.integers(-80, 160))),
        scale=draw(st.sampled_from([None, 0.3])),
        lse=draw(st.booleans()),
        strided=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


def run_cpu_case(case):
    op = build_cpu(case["pattern"])
    q, k, v, dout, w, kw = case_inputs(case)
    check_case(op, op_grads(op, q, k, v, dout, w, **kw), q, k, v, dout, w, kw)


@settings(max_examples=n_examples(25), suppress_health_check=_QUIET)
@given(cpu_cases())
def test_cpu_random_patterns(case):
    run_cpu_case(case)


@pytest.mark.slow
@settings(max_examples=n_examples(300), suppress_health_check=_QUIET)
@given(cpu_cases(max_len=300))
def test_cpu_random_patterns_thorough(case):
    run_cpu_case(case)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", list(SHAPE_CASES), ids=str)
def test_cpu_shapes_and_offsets(case, dtype):
    B, Hq, Hkv, Sq, Skv, off = SHAPE_CASES[case]
    op = build_cpu(POWER_LIKE)
    q, k, v, dout, w = qkv(B, Hq, Hkv, Sq, Skv, 16, dtype, seed=8)
    got = op_grads(op, q, k, v, dout, w, q_offset=off)
    check_grads(op.pattern, got, ref_grads(op.pattern, q, k, v, dout, w, q_offset=off), (q, k, v), q_offset=off)


def test_cpu_op_takes_no_float64():
    """The op (CPU path included) accepts fp16/bf16/fp32 only; float64 is covered below on the
    blocked backend's functions themselves."""
    op = build_cpu(POWER_LIKE)
    q, k, v, _, _ = qkv(1, 2, 1, 9, 9, 16, torch.float64)
    with pytest.raises(TypeError, match=r"q must be float16, bfloat16 or float32, got torch.float64"):
        op(q, k, v)


class _Blocked64(torch.autograd.Function):
    """The CPU path's two functions in float64 (the op runs them in fp32), joined for gradcheck."""

    @staticmethod
    def forward(ctx, q, k, v, layout, scale):
        out, lse = attention_blocked(layout, q, k, v, scale=scale, return_lse=True, dtype=torch.float64)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = layout, scale
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        layout, scale = ctx.args
        grads = attention_blocked_backward(layout, q, k, v, out, lse, dout, scale=scale, dlse=dlse, dtype=torch.float64)
        return *grads, None, None


GRADCHECK_CASES = {
    # name: (pattern, B, Hq, Hkv, Sq, Skv, q_offset, tile)
    "power-q9-kv11-gqa2-tile4": (POWER_LIKE, 1, 2, 1, 9, 11, None, 4),
    "band-q10-kv7-tile3": (BAND, 1, 1, 1, 10, 7, None, 3),
    "power-q8-kv8-offset-neg3": (POWER_LIKE, 2, 2, 2, 8, 8, -3, 4),
    "segment-minus-every-q7-kv12": ("pattern s { unit 2 attend segment(2) - every(3) }", 1, 2, 1, 7, 12, 2, 5),
}


@pytest.mark.parametrize("case", list(GRADCHECK_CASES), ids=str)
def test_cpu_backend_gradcheck_float64(case):
    text, B, Hq, Hkv, Sq, Skv, off, tile = GRADCHECK_CASES[case]
    pat = spdsl.compile(text)
    lay = pat.layout(Sq, Skv, tile, tile, off)
    assert lay.n_full < lay.nnz  # partial tiles: the predicate runs in the backward too
    g = torch.Generator().manual_seed(9)
    D = 4
    q = torch.randn(B, Hq, Sq, D, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, Hkv, Skv, D, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, Hkv, Skv, D, generator=g, dtype=torch.float64, requires_grad=True)

    def f(q, k, v):
        out, lse = _Blocked64.apply(q, k, v, lay, 0.7)
        return out, torch.where(torch.isfinite(lse), lse, 0.0)

    assert torch.autograd.gradcheck(f, (q, k, v), eps=1e-6, atol=1e-8, rtol=1e-6)
    # and the same function as the reference's, to fp64 rounding
    dout, w = torch.randn(B, Hq, Sq, D, generator=g, dtype=torch.float64), torch.randn(B, Hq, Sq, generator=g)
    out, lse = _Blocked64.apply(q, k, v, lay, 0.7)
    got = torch.autograd.grad(loss_of(out, lse, dout, w), (q, k, v))
    check_grads(pat, got, ref_grads(pat, q, k, v, dout, w, scale=0.7, q_offset=off), (q, k, v), q_offset=off, tol=1e-10)


def test_cpu_opcheck():
    """torch.library's own checks of the custom op: schema, fake, autograd registration, AOT dispatch."""
    op = build_cpu(POWER_LIKE)
    q, k, v, _, _ = qkv(1, 4, 2, 19, 23, 16, torch.float32, seed=10)
    torch.library.opcheck(op._fwd, (q, k, v, None, 2))


# --------------------------------------------------------------------------------------------
# 3. Varlen: packed sequences give the gradients of separate calls


def seq(t, cu_seqlens, i):
    """Sequence i of a packed [total, H, D] tensor as [1, H, len, D] (or of [H, total] as [1, H, len])."""
    a, b = int(cu_seqlens[i]), int(cu_seqlens[i + 1])
    return t[a:b].transpose(0, 1).unsqueeze(0) if t.dim() == 3 else t[:, a:b].unsqueeze(0)


VARLEN_CASES = {
    # name: (pattern, q_lens, kv_lens, Hq, Hkv, D, dtype, tiles, atomic)
    "three-odd-equal": (POWER_LIKE, [37, 5, 23], [37, 5, 23], 2, 1, 16, torch.float32, (16, 16), False),
    "q-shorter-gqa2": (POWER_LIKE, [7, 1, 19], [41, 9, 30], 4, 2, 16, torch.float32, (16, 32), False),
    "more-q-than-kv-empty-rows": (POWER_LIKE, [9, 20], [13, 6], 2, 2, 16, torch.float32, (16, 16), False),
    "empty-sequence": (POWER_LIKE, [11, 0, 7], [11, 4, 7], 2, 1, 16, torch.float32, (16, 16), False),
    "noncausal-fp16-gqa4": (BAND, [17, 21, 3], [17, 21, 3], 4, 1, 32, torch.float16, (32, 16), False),
    "atomic-fp32": (POWER_LIKE, [30, 13], [30, 13], 2, 1, 16, torch.float32, (16, 16), True),
}


@pytest.mark.parametrize("case", list(VARLEN_CASES), ids=str)
def test_varlen_gradients_equal_per_sequence_calls(case):
    text, q_lens, kv_lens, Hq, Hkv, D, dtype, tiles, atomic = VARLEN_CASES[case]
    g = torch.Generator().manual_seed(11)
    q = torch.randn(sum(q_lens), Hq, D, generator=g).to(dtype).requires_grad_()
    k = torch.randn(sum(kv_lens), Hkv, D, generator=g).to(dtype).requires_grad_()
    v = torch.randn(sum(kv_lens), Hkv, D, generator=g).to(dtype).requires_grad_()
    dout = torch.randn(q.shape, generator=g).to(dtype)
    w = torch.randn(Hq, sum(q_lens), generator=g)
    cq, ck = cu(q_lens), cu(kv_lens)
    with interpreter():
        op = build(text, *tiles, atomic=atomic)
        with nan_buffers(op.module):
            out, lse = op.varlen(q, k, v, cq, ck, max(q_lens), max(kv_lens), return_lse=True)
            packed = torch.autograd.grad(loss_of(out, lse, dout, w), (q, k, v))
        for i in range(len(q_lens)):
            qi, ki, vi = (seq(t, c, i).detach().requires_grad_() for t, c in ((q, cq), (k, ck), (v, ck)))
            do_i, w_i = seq(dout, cq, i), seq(w, cq, i)
            got_i = [seq(t, c, i) for t, c in zip(packed, (cq, ck, ck))]
            if qi.shape[2] == 0:  # no query: nothing flows into the sequence's keys
                assert all(torch.equal(t, torch.zeros_like(t)) for t in got_i)
                continue
            single = op_grads(op, qi, ki, vi, do_i, w_i)
            # the same kernels over the same tiles in the same order: equal up to rounding
            for a, b in zip(got_i, single):
                assert rel_err(a, b.double()) <= TOL[dtype] / 10
            check_grads(op.pattern, got_i, ref_grads(op.pattern, qi, ki, vi, do_i, w_i), (qi, ki, vi))


def test_varlen_module_backward_directly():
    """backward_varlen with NaN-prefilled buffers and a dlse: every packed row is written."""
    q_lens, kv_lens = [23, 4, 18], [30, 4, 18]
    g = torch.Generator().manual_seed(12)
    q, k, v = (torch.randn(sum(n), H, 16, generator=g) for n, H in ((q_lens, 2), (kv_lens, 1), (kv_lens, 1)))
    dout = torch.randn(q.shape, generator=g)
    cq, ck = cu(q_lens), cu(kv_lens)
    with interpreter():
        op = build(POWER_LIKE, 16, 32, dkdv=(16, 16), dq=(16, 32))
        out, lse = op.module.forward_varlen(q, k, v, cq, ck, 23, 30)
        dlse = torch.where(torch.isfinite(lse), torch.randn(lse.shape, generator=g), 0.0)
        with nan_buffers(op.module):
            grads = op.module.backward_varlen(dout, q, k, v, out, lse, cq, ck, 23, 30, dlse=dlse)
    for i in range(3):
        qi, ki, vi = seq(q, cq, i), seq(k, ck, i), seq(v, ck, i)
        ref = ref_grads(op.pattern, qi, ki, vi, seq(dout, cq, i), seq(dlse, cq, i))
        check_grads(op.pattern, [seq(t, c, i) for t, c in zip(grads, (cq, ck, ck))], ref, (qi, ki, vi))


# --------------------------------------------------------------------------------------------
# 4. Determinism


@pytest.mark.parametrize("config", ["default", "small-tiles"])
def test_default_backward_is_bitwise_deterministic(config):
    """Two backward calls (the second with NaN-prefilled buffers) give identical bits. In the
    interpreter programs run one at a time, so this catches reads of unwritten memory and state
    carried between calls; real scheduling is tests/test_gpu_backward.py's."""
    with interpreter():
        pat = spdsl.compile(POWER_LIKE)
        op = spdsl.build(pat) if config == "default" else build(pat, 32, 16, dkdv=(16, 16), dq=(16, 16))
        assert not any(c["atomic_dq"] for c in op.module.BWD_CONFIGS)
        q, k, v, dout, w = qkv(1, 4, 2, 150, 150, 32, torch.float32, seed=13)
        first = op_grads(op, q, k, v, dout, w)
        with nan_buffers(op.module):
            second = op_grads(op, q, k, v, dout, w)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    check_grads(pat, first, ref_grads(pat, q, k, v, dout, w), (q, k, v))


def test_deterministic_false_builds_the_atomic_variant():
    with interpreter():
        pat = spdsl.compile(POWER_LIKE)
        atomic, default = spdsl.build(pat, deterministic=False), spdsl.build(pat)
        assert atomic.module is not default.module
        assert all(c["atomic_dq"] for c in atomic.module.BWD_CONFIGS)
        q, k, v, dout, _ = qkv(1, 2, 1, 70, 70, 16, torch.float16, seed=14)
        with nan_buffers(atomic.module):
            got = op_grads(atomic, q, k, v, dout)
    check_grads(pat, got, ref_grads(pat, q, k, v, dout), (q, k, v))
