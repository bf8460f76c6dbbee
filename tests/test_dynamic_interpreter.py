"""The certified decode's Triton kernels (issue 12) under ``TRITON_INTERPRET=1`` on CPU tensors
(the real kernels on CUDA): the bound kernel equals the torch bound, and decode equals the fp64
reference (ReLU^alpha) or holds its certificate (softmax), paged and contiguous, GQA, fp16."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import spdsl
from spdsl import dynamic
from spdsl import dynamic_reference as dref
from spdsl.summaries import KeySummaries, box_bound
from tests.dynamic_helpers import KINDS, check_certificate, fp32_tol, make_cache, pattern_text, value_range
from tests.helpers import scoped_env
from tests.strategies import n_examples
from tests.test_decode import to_paged

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Kernels interpreted on CPU (this module only); ops built and cached per pattern text."""
    with scoped_env(TRITON_INTERPRET=None if CUDA else "1", SPDSL_CACHE_DIR=str(tmp_path_factory.mktemp("cache"))):
        from spdsl import dynamic_kernels  # kernels decorated per TRITON_INTERPRET mode, on first use

        ops = {}
        cfg = {} if CUDA else {"block_m": 16, "block_n": 16, "num_warps": 4, "num_stages": 1}
        yield dynamic_kernels, lambda text: ops.setdefault(text, spdsl.build(spdsl.compile(text), **cfg))


def _to(device, *tensors):
    return [t.to(device) for t in tensors]


@pytest.mark.parametrize("D, rows, blocks", [(16, 3, 5), (32, 8, 70)])
def test_bound_kernel_equals_the_torch_bound(env, D, rows, blocks):
    kernels, _ = env
    g = torch.Generator().manual_seed(D)
    q = torch.randn(2, 2, rows, D, generator=g)
    lo = torch.randn(2, 2, blocks, D, generator=g)
    hi = lo + torch.rand(2, 2, blocks, D, generator=g)
    radius = torch.rand(2, 2, blocks, generator=g) * 3
    got = kernels.bound_triton(*_to(DEVICE, q, lo, hi)).cpu()
    torch.testing.assert_close(got, box_bound(q, lo, hi), atol=1e-4, rtol=1e-5)
    got = kernels.bound_triton(*_to(DEVICE, q, lo, hi, radius)).cpu()
    torch.testing.assert_close(got, box_bound(q, lo, hi, radius), atol=1e-4, rtol=1e-5)
    assert bool((box_bound(q, lo, hi, radius) < box_bound(q, lo, hi)).any())  # the ball is tighter somewhere
    assert CUDA or type(kernels._kernels()[0]).__name__ == "InterpretedFunction"


@pytest.mark.parametrize("alpha", [1, 2, 3])
@pytest.mark.parametrize("paged", [False, True])
def test_relu_alpha_kernel_equals_the_reference(env, alpha, paged):
    _, build = env
    op = build(pattern_text("massive", alpha))
    q, k, v, lengths, _ = make_cache("needle" if paged else "peaked", alpha, Sq=2, Hq=4, Hkv=2)
    bias = 0.1 * alpha
    bt = None
    kc, vc = k, v
    if paged:
        kc, vc, bt = to_paged(k, v, 16, torch.Generator().manual_seed(alpha))
    q_, kc, vc, lengths_ = _to(DEVICE, q, kc, vc, lengths)
    bt = bt.to(DEVICE) if bt is not None else None
    s = op.summaries(kc, lengths_, bt, block_size=16)
    out, err = op.decode(q_, kc, vc, lengths_, block_table=bt, summaries=s, bias=bias, return_error=True)
    ref = dref.decode(op.pattern, q, k, v, lengths, bias=bias)
    assert float(err.abs().max()) == 0.0
    torch.testing.assert_close(out.cpu().double(), ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize(
    "kind, eps, hkv, dtype",
    [
        ("needle", 1e-3, 2, torch.float32),
        ("peaked", 1e-2, 1, torch.float32),
        ("outliers", 1e-1, 4, torch.float32),
        ("needle", 1e-3, 2, torch.float16),
    ],
)
def test_softmax_kernel_holds_the_certificate(env, kind, eps, hkv, dtype):
    _, build = env
    op = build(pattern_text("massive", None))
    q, k, v, lengths, needle = make_cache(kind, 11, Sq=1, Hkv=hkv, S=200, dtype=dtype)
    q_, k_, v_, lengths_ = _to(DEVICE, q, k, v, lengths)
    s = op.summaries(k_, lengths_, block_size=16)
    out, err = op.decode(q_, k_, v_, lengths_, summaries=s, eps=eps, return_error=True)
    ref = dref.decode(op.pattern, q, k, v, lengths)
    tol = 2e-5 if dtype == torch.float32 else 3e-3
    check_certificate(out.cpu(), err.cpu(), ref, value_range(op.pattern, v, lengths, 1, q.shape[2]), eps, tol)
    cpu = dynamic.decode(op.pattern.ir, q, k, v, lengths, KeySummaries(k, lengths, block_size=16), scale=0.25, eps=eps)
    torch.testing.assert_close(err.cpu(), cpu[1], atol=1e-5, rtol=1e-3)  # the same blocks, the same bound
    if kind == "needle":  # found: its block is read for every KV head
        assert all(bool(cpu[2][b, :, needle[b] // 16].all()) for b in range(q.shape[0]))


@settings(max_examples=n_examples(10), deadline=None)
@given(
    kind=st.sampled_from(KINDS),
    alpha=st.sampled_from([None, 1, 3]),
    eps=st.sampled_from([1e-1, 1e-3]),
    sq=st.integers(1, 3),
    hkv=st.sampled_from([1, 2]),
    paged=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_kernels_on_drawn_caches(env, kind, alpha, eps, sq, hkv, paged, seed):
    _, build = env
    op = build(pattern_text("strided", alpha))
    q, k, v, lengths, _ = make_cache(kind, seed, Sq=sq, Hkv=hkv, S=130)
    kc, vc, bt = to_paged(k, v, 16, torch.Generator().manual_seed(seed)) if paged else (k, v, None)
    q_, kc, vc, lengths_ = _to(DEVICE, q, kc, vc, lengths)
    bt = bt.to(DEVICE) if bt is not None else None
    s = op.summaries(kc, lengths_, bt, block_size=16)
    out, err = op.decode(q_, kc, vc, lengths_, block_table=bt, summaries=s, eps=eps, bias=0.1, return_error=True)
    ref = dref.decode(op.pattern, q, k, v, lengths, bias=0.1)
    vrange = value_range(op.pattern, v, lengths, sq, q.shape[2])
    check_certificate(out.cpu(), err.cpu(), ref, vrange, eps if alpha is None else 0.0, fp32_tol(q, k))
