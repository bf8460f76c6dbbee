"""Certified prefill (issue 12): ``op(q, k, v, eps=, bias=, return_error=)`` on patterns with
``score`` / ``select`` lines, against the fp64 references of the v1.1 semantics."""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import spdsl
from spdsl import dynamic_reference as dref
from tests.dynamic_helpers import KINDS, check_certificate, fp32_tol, make_cache, pattern_text, value_range
from tests.helpers import scoped_env
from tests.strategies import n_examples


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    with scoped_env(TRITON_INTERPRET=None, SPDSL_CACHE_DIR=str(tmp_path_factory.mktemp("cache"))):
        ops = {}
        yield lambda text: ops.setdefault(text, spdsl.build(spdsl.compile(text)))


def prefill_inputs(kind: str, seed: int, sq: int):
    """BHSD q (the last ``sq`` of 160 keys) and BSHD caches for the decode-shaped helpers."""
    q, k, v, _, _ = make_cache(kind, seed, Sq=sq)
    lengths = torch.full((q.shape[0],), k.shape[1], dtype=torch.int32)
    return q, k, v, lengths, (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))


def relu_tol(pattern, q, k, v, alpha: int, bias: float, base: float = 2e-5) -> torch.Tensor:
    """fp32 allowance per row of ReLU^alpha attention: its weights are summed and normalized in fp32,
    so a row whose weights nearly cancel to a tiny sum (near ties at the bias) is ill-conditioned:
    ``base * (1 + sum of |terms| / sum of weights) * max |v|``."""
    scale = q.shape[-1] ** -0.5
    mask = dref.candidate_mask(pattern, q.shape[2], k.shape[2])
    g = q.shape[1] // k.shape[1]
    x = scale * q.double() @ k.double().repeat_interleave(g, 1).transpose(-1, -2)
    w = torch.where(mask, (x - bias).clamp(min=0) ** alpha, 0.0).sum(-1)
    mag = torch.where(mask, (x.abs() + abs(bias)) ** alpha, 0.0).sum(-1)
    cond = torch.where(w > 0, mag / w.clamp(min=1e-300), 0.0)
    return base * (1 + cond[..., None]) * float(v.abs().max())


@settings(max_examples=n_examples(20), deadline=None)
@given(
    alpha=st.sampled_from([None, 1, 2, 3]),
    bias=st.floats(-0.5, 1.5),
    name=st.sampled_from(["massive", "strided", "noselect", "bidir"]),
    kind=st.sampled_from(KINDS),
    sq=st.sampled_from([1, 17, 64, 160]),
    seed=st.integers(0, 2**16),
)
def test_prefill_is_exact_for_relu_and_certified_for_softmax(build, alpha, bias, name, kind, sq, seed):
    assume(name != "noselect" or alpha is not None)  # no score, no select: a static pattern
    op = build(pattern_text(name, alpha))
    q, k, v, lengths, (qh, kh, vh) = prefill_inputs(kind, seed, sq)
    out, err = op(qh, kh, vh, eps=1e-3, bias=bias, return_error=True)
    assert out.shape == qh.shape and err.shape == qh.shape[:3]
    ref = dref.attention(op.pattern, qh, kh, vh, bias=bias)
    if alpha is not None:
        assert float(err.abs().max()) == 0.0
        excess = (out.double() - ref).abs() - relu_tol(op.pattern, qh, kh, vh, alpha, bias)
        assert float(excess.max()) <= 0.0, float(excess.max())
    else:
        vr = value_range(op.pattern, v, lengths, sq, q.shape[2])
        tol = fp32_tol(q, k)
        check_certificate(out.transpose(1, 2), err.transpose(1, 2), ref.transpose(1, 2), vr, 1e-3, tol)


def test_prefill_equals_decode_with_the_same_rows(build):
    op = build(pattern_text("massive", None))
    q, k, v, lengths, (qh, kh, vh) = prefill_inputs("needle", 3, 24)
    out = op(qh, kh, vh)
    dec = op.decode(q, k, v, lengths)
    torch.testing.assert_close(out.transpose(1, 2), dec, atol=0, rtol=0)


def test_prefill_refusals(build):
    op = build(pattern_text("massive", None))
    _, _, _, _, (q, k, v) = prefill_inputs("gaussian", 0, 8)
    with pytest.raises(ValueError, match="return_error=True"):
        op(q, k, v, return_lse=True)
    with pytest.raises(NotImplementedError, match="default q_offset"):
        op(q, k, v, q_offset=0)
    assert op(q, k, v, q_offset=k.shape[2] - q.shape[2]).shape == q.shape  # the default, spelled out
    with pytest.raises(TypeError, match="unexpected keyword"):
        op(q, k, v, summaries=None)
    with pytest.raises(ValueError, match="eps"):
        op(q, k, v, eps=2.0)
    with pytest.raises(NotImplementedError, match="not implemented yet"):
        op.varlen(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), None, None, 8, 160)
    static = build("pattern w() { causal attend local(4) }")
    with pytest.raises(TypeError, match="only to patterns with score/select"):
        static(q, k, v, eps=1e-3)


@pytest.mark.parametrize("alpha", [None, 2])
def test_prefill_in_chunks_of_rows_keeps_the_guarantee(build, alpha):
    """A small ``dense`` limit makes the prefill take its rows a few at a time (each chunk chooses
    its own blocks); the result is still exact (ReLU^alpha) or certified (softmax)."""
    from spdsl.limits import override

    op = build(pattern_text("strided", alpha))
    q, k, v, lengths, (qh, kh, vh) = prefill_inputs("hot", 5, 96)
    B, Hq = qh.shape[:2]
    with override(dense=B * Hq * 160 * 7):  # 7 rows per chunk (160 keys, blocks of 64 -> 192 padded: 5)
        out, err = op(qh, kh, vh, eps=1e-3, return_error=True)
    ref = dref.attention(op.pattern, qh, kh, vh)
    if alpha is not None:
        assert float((out.double() - ref).abs().sub(relu_tol(op.pattern, qh, kh, vh, alpha, 0.0)).max()) <= 0
    else:
        vr = value_range(op.pattern, v, lengths, 96, q.shape[2])
        check_certificate(out.transpose(1, 2), err.transpose(1, 2), ref.transpose(1, 2), vr, 1e-3, fp32_tol(q, k))
    with override(dense=B * Hq * 100), pytest.raises(spdsl.SpdError, match="certified prefill"):
        op(qh, kh, vh)


@pytest.mark.parametrize("alpha", [1, 2, None])
@pytest.mark.parametrize("name", ["massive", "noselect", "bidir"])
def test_prefill_backward_matches_fp64_autograd(build, alpha, name):
    """ReLU^alpha (static, or with select) and certified softmax prefill are differentiable: the
    gradients are those of the blocks read, which for ReLU^alpha are all that matter (exact), and
    for softmax differ from the exact ones by about the certified error."""
    if name == "noselect" and alpha is None:
        pytest.skip("no score, no select: a static pattern (tests/test_backward_*)")
    op = build(pattern_text(name, alpha))
    _, _, _, _, (q, k, v) = prefill_inputs("gaussian", 11, 48)
    q, k, v = (t.clone().requires_grad_(True) for t in (q, k, v))
    g = torch.randn(q.shape[:3] + (v.shape[-1],), generator=torch.Generator().manual_seed(2))
    out = op(q, k, v, eps=1e-6)
    (out * g).sum().backward()
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    (dref.attention(op.pattern, q64, k64, v64) * g.double()).sum().backward()
    for got, want, what in ((q.grad, q64.grad, "dq"), (k.grad, k64.grad, "dk"), (v.grad, v64.grad, "dv")):
        torch.testing.assert_close(got.double(), want, atol=2e-4, rtol=2e-4, msg=what)


def test_prefill_backward_memory_is_refused_above_the_limit(build):
    from spdsl.limits import override

    op = build(pattern_text("massive", 2))
    _, _, _, _, (q, k, v) = prefill_inputs("gaussian", 0, 64)
    with override(dense=q.shape[0] * q.shape[1] * 64 * 192 - 1), pytest.raises(spdsl.SpdError, match="backward"):
        op(q.requires_grad_(True), k, v)
