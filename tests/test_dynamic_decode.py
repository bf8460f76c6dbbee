"""Certified decode (issue 12) on the CPU backend: ReLU^alpha exact, the softmax certificate on
adversarial caches, planted needles found, paged equals contiguous, input errors. The Triton
kernels run the same cases in tests/test_dynamic_interpreter.py."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import spdsl
from spdsl import dynamic
from spdsl import dynamic_reference as dref
from tests.dynamic_helpers import KINDS, check_certificate, fp32_tol, make_cache, pattern_text, value_range
from tests.helpers import scoped_env
from tests.strategies import n_examples
from tests.test_decode import to_paged


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """spdsl.build on the CPU backend (no interpreter), ops cached per pattern text."""
    with scoped_env(TRITON_INTERPRET=None, SPDSL_CACHE_DIR=str(tmp_path_factory.mktemp("cache"))):
        ops = {}
        yield lambda text: ops.setdefault(text, spdsl.build(spdsl.compile(text)))


def run(op, q, k, v, lengths, *, eps=1e-3, bias=0.0, paged=False, seed=0):
    """op.decode with fresh summaries (block 16), contiguous or paged (page 16)."""
    bt = None
    if paged:
        k, v, bt = to_paged(k, v, 16, torch.Generator().manual_seed(seed))
    s = op.summaries(k, lengths, bt, block_size=16)
    return op.decode(q, k, v, lengths, block_table=bt, summaries=s, eps=eps, bias=bias, return_error=True)


@settings(max_examples=n_examples(30), deadline=None)
@given(
    alpha=st.integers(1, 3),
    bias=st.floats(-0.5, 1.5),
    name=st.sampled_from(["massive", "strided", "noselect", "bidir"]),
    kind=st.sampled_from(KINDS),
    sq=st.integers(1, 3),
    paged=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_relu_alpha_equals_the_dense_reference(build, alpha, bias, name, kind, sq, paged, seed):
    text = pattern_text(name, alpha)
    op = build(text)
    q, k, v, lengths, _ = make_cache(kind, seed, Sq=sq)
    out, err = run(op, q, k, v, lengths, bias=bias, paged=paged, seed=seed)
    ref = dref.decode(op.pattern, q, k, v, lengths, bias=bias)
    assert float(err.abs().max()) == 0.0
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)


def test_relu_skips_blocks_below_the_bias(build):
    op = build(pattern_text("massive", 2))
    q, k, v, lengths, _ = make_cache("tiny", 1)
    s = op.summaries(k, lengths, block_size=16)
    out, _, chosen = dynamic.decode(op.pattern.ir, q, k, v, lengths, s, scale=0.25, bias=0.05)
    assert chosen.float().mean() < 0.5  # only the sink and local blocks
    ref = dref.decode(op.pattern, q, k, v, lengths, bias=0.05)
    torch.testing.assert_close(out.double(), ref, atol=1e-6, rtol=1e-5)


@settings(max_examples=n_examples(40), deadline=None)
@given(
    name=st.sampled_from(["massive", "strided", "bidir"]),  # softmax without select is a static pattern
    kind=st.sampled_from(KINDS),
    eps=st.sampled_from([1e-1, 1e-2, 1e-3, 1e-5]),
    sq=st.integers(1, 2),
    hkv=st.sampled_from([1, 2, 4]),
    paged=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_softmax_certificate(build, name, kind, eps, sq, hkv, paged, seed):
    op = build(pattern_text(name, None))
    q, k, v, lengths, _ = make_cache(kind, seed, Sq=sq, Hkv=hkv)
    out, err = run(op, q, k, v, lengths, eps=eps, paged=paged, seed=seed)
    ref = dref.decode(op.pattern, q, k, v, lengths)
    check_certificate(out, err, ref, value_range(op.pattern, v, lengths, sq, q.shape[2]), eps, tol=fp32_tol(q, k))


@pytest.mark.parametrize("seed", range(6))
def test_planted_needle_is_found_and_the_rest_skipped(build, seed):
    op = build(pattern_text("massive", None))
    q, k, v, lengths, needle = make_cache("needle", seed, S=320)
    s = op.summaries(k, lengths, block_size=16)
    out, err, chosen = dynamic.decode(op.pattern.ir, q, k, v, lengths, s, scale=0.25, eps=1e-3)
    for b in range(q.shape[0]):
        assert bool(chosen[b, :, needle[b] // 16].all()), f"needle block missed in sequence {b}"
    assert chosen.float().mean() < 0.5
    ref = dref.decode(op.pattern, q, k, v, lengths)
    check_certificate(out, err, ref, value_range(op.pattern, v, lengths, 1, q.shape[2]), 1e-3, tol=2e-5)


def test_mass_far_from_attend_is_found_in_rounds(build):
    op = build(pattern_text("massive", None))
    q, k, v, lengths, _ = make_cache("hot", 9, S=320, Sq=2)
    s = op.summaries(k, lengths, block_size=16)
    out, err, chosen = dynamic.decode(op.pattern.ir, q, k, v, lengths, s, scale=0.25, eps=1e-3)
    assert bool(chosen[:, :, [1, 3, 4]].all()) and chosen.float().mean() < 0.5
    ref = dref.decode(op.pattern, q, k, v, lengths)
    check_certificate(out, err, ref, value_range(op.pattern, v, lengths, 2, q.shape[2]), 1e-3, tol=2e-5)


@pytest.mark.parametrize("alpha", [None, 2])
def test_paged_equals_contiguous(build, alpha):
    op = build(pattern_text("strided", alpha))
    q, k, v, lengths, _ = make_cache("needle", 3, B=3, Sq=2, S=150)
    flat = run(op, q, k, v, lengths, bias=0.1)
    paged = run(op, q, k, v, lengths, bias=0.1, paged=True, seed=5)
    torch.testing.assert_close(paged[0], flat[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(paged[1], flat[1], atol=1e-7, rtol=1e-5)


def test_fp16_and_default_summaries(build):
    op = build(pattern_text("massive", None))
    q, k, v, lengths, _ = make_cache("gaussian", 2, dtype=torch.float16)
    out = op.decode(q, k, v, lengths)  # summaries built on the spot
    assert out.dtype == torch.float16 and out.shape == q.shape
    torch.testing.assert_close(out.double(), dref.decode(op.pattern, q, k, v, lengths), atol=2e-3, rtol=2e-3)


def test_errors(build):
    op = build(pattern_text("massive", None))
    q, k, v, lengths, _ = make_cache("gaussian", 0)
    s = op.summaries(k, lengths, block_size=16)
    with pytest.raises(ValueError, match="eps"):
        op.decode(q, k, v, lengths, summaries=s, eps=0.0)
    with pytest.raises(TypeError, match="eps"):
        op.decode(q, k, v, lengths, summaries=s, eps="small")
    with pytest.raises(TypeError, match="bias"):
        op.decode(q, k, v, lengths, summaries=s, bias=float("nan"))
    with pytest.raises(ValueError, match="another k_cache"):
        op.decode(q, k.clone(), v, lengths, summaries=s)
    with pytest.raises(ValueError, match="stale"):
        op.decode(q, k, v, lengths - 1, summaries=s)
    with pytest.raises(TypeError, match="summaries must come from"):
        op.decode(q, k, v, lengths, summaries=object())
    with pytest.raises(TypeError, match="unexpected keyword"):
        op.decode(q, k, v, lengths, summary=s)
    with pytest.raises(ValueError, match="return_lse"):
        op.decode(q, k, v, lengths, return_lse=True)
    with pytest.raises(TypeError):
        op.decode(q.double(), k, v, lengths, summaries=s)
    with pytest.raises(NotImplementedError, match="decode first"):
        op.varlen(q[0], k[0], v[0], None, None, 1, 160)
    static = build("pattern w() { causal attend local(4) }")
    with pytest.raises(TypeError, match="only to patterns with score/select"):
        static.decode(q, k, v, lengths, summaries=s)
    assert static.decode(q, k, v, lengths, eps=1e-3, return_error=False).shape == q.shape  # defaults pass


@pytest.mark.parametrize("alpha", [None, 1])
def test_topk_baseline(build, alpha):
    op = build(pattern_text("massive", alpha))
    q, k, v, lengths, _ = make_cache("peaked", 4, Sq=2)
    s = op.summaries(k, lengths, block_size=16)
    everything = dynamic.candidate_blocks(op.pattern.ir, lengths, 2, s)
    out, err, chosen = dynamic.decode(op.pattern.ir, q, k, v, lengths, s, scale=0.25, topk=s.num_blocks)
    assert bool(err.isnan().all()) and torch.equal(chosen, everything[:, None].expand_as(chosen))
    torch.testing.assert_close(out.double(), dref.decode(op.pattern, q, k, v, lengths), atol=2e-5, rtol=2e-5)
    _, _, two = dynamic.decode(op.pattern.ir, q, k, v, lengths, s, scale=0.25, topk=2)
    assert int(two.sum(-1).max()) <= 2 + 2  # the sink block and the local block, plus two
