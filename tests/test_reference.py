"""spdsl.reference: fp64 dense attention vs a naive per-row loop, and the blocked (layout-walking)
attention vs the dense one, GQA, empty rows, LSE and argument validation."""

from __future__ import annotations

import math
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spdsl import blocked, reference
from spdsl.blocked import attention_blocked
from spdsl.core import primitives as prims
from spdsl.core.ir import PatternIR
from spdsl.layout import Layout, dense_mask
from spdsl.pattern import Pattern
from spdsl.reference import attention, attention_dense
from tests.strategies import n_examples, pattern_irs


def naive_attention(q, k, v, mask, scale=None):
    """One (batch, head, row) at a time, in float64: the textbook formula, GQA by h // (Hq // Hkv)."""
    B, Hq, Sq, D = q.shape
    Hkv, Skv, Dv = k.shape[1], k.shape[2], v.shape[3]
    scale = 1 / math.sqrt(D) if scale is None else scale
    out = torch.zeros(B, Hq, Sq, Dv, dtype=torch.float64)
    lse = torch.full((B, Hq, Sq), -math.inf, dtype=torch.float64)
    for b in range(B):
        for h in range(Hq):
            kh = h // (Hq // Hkv)
            for i in range(Sq):
                keys = [j for j in range(Skv) if mask[i, j]]
                if not keys:
                    continue
                s = [float(q[b, h, i].double() @ k[b, kh, j].double()) * scale for j in keys]
                m = max(s)
                w = [math.exp(x - m) for x in s]
                out[b, h, i] = sum(wj * v[b, kh, j].double() for wj, j in zip(w, keys)) / sum(w)
                lse[b, h, i] = m + math.log(sum(w))
    return out, lse


def qkv(B, Hq, Hkv, Sq, Skv, D, Dv=None, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Sq, D, generator=g, dtype=dtype)
    k = torch.randn(B, Hkv, Skv, D, generator=g, dtype=dtype)
    v = torch.randn(B, Hkv, Skv, D if Dv is None else Dv, generator=g, dtype=dtype)
    return q, k, v


shapes = st.tuples(
    st.integers(1, 2),  # B
    st.integers(1, 2),  # Hkv
    st.sampled_from([1, 2, 4]),  # GQA ratio
    st.integers(0, 9),  # Sq
    st.integers(0, 9),  # Skv
    st.integers(1, 8),  # D
)

# ---------------------------------------------------------------------------------------------
# attention_dense


@settings(max_examples=n_examples(60), deadline=None)
@given(
    shape=shapes,
    density=st.sampled_from([0.0, 0.2, 0.6, 1.0]),
    scale=st.one_of(st.none(), st.floats(0.05, 3.0)),
    dv=st.one_of(st.none(), st.integers(1, 6)),
    seed=st.integers(0, 2**16),
)
def test_dense_matches_naive_loop(shape, density, scale, dv, seed):
    B, Hkv, G, Sq, Skv, D = shape
    q, k, v = qkv(B, Hkv * G, Hkv, Sq, Skv, D, dv, seed)
    mask = torch.rand(Sq, Skv, generator=torch.Generator().manual_seed(seed + 1)) < density
    out, lse = attention_dense(q, k, v, mask, scale=scale, return_lse=True)
    want, want_lse = naive_attention(q, k, v, mask, scale)
    assert out.dtype == lse.dtype == torch.float64
    assert out.shape == (B, Hkv * G, Sq, v.shape[3]) and lse.shape == (B, Hkv * G, Sq)
    torch.testing.assert_close(out, want, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(lse, want_lse, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(attention_dense(q, k, v, mask, scale=scale), out, atol=0, rtol=0)


@pytest.mark.parametrize("G", [1, 2, 4])
def test_gqa_uses_interleaved_kv_heads(G):
    """Query head h reads kv head h // G: same as MHA with k/v repeat_interleave'd (not tiled)."""
    q, k, v = qkv(2, 2 * G, 2, 7, 11, 8, seed=G)
    mask = torch.rand(7, 11, generator=torch.Generator().manual_seed(3)) < 0.7
    got = attention_dense(q, k, v, mask)
    want = attention_dense(q, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1), mask)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    torch.testing.assert_close(got, naive_attention(q, k, v, mask)[0], atol=1e-12, rtol=1e-10)
    if G > 1:
        tiled = attention_dense(q, k.repeat(1, G, 1, 1), v.repeat(1, G, 1, 1), mask)
        assert not torch.allclose(got, tiled)


def test_lse_is_logsumexp_of_masked_scores():
    q, k, v = qkv(1, 2, 1, 6, 9, 4, seed=7)
    mask = torch.rand(6, 9, generator=torch.Generator().manual_seed(5)) < 0.5
    mask[2] = False
    _, lse = attention_dense(q, k, v, mask, scale=0.3, return_lse=True)
    s = (q.double() @ k.double().transpose(-1, -2)) * 0.3
    want = torch.logsumexp(s.masked_fill(~mask, -math.inf), -1)
    torch.testing.assert_close(lse, want, atol=1e-12, rtol=1e-12)
    assert torch.isneginf(lse[..., 2]).all()


def test_large_scores_are_stable():
    """Scores of +-1e4 must not overflow: the max is subtracted before exp."""
    q, k, v = qkv(1, 1, 1, 4, 5, 2, seed=1)
    mask = torch.ones(4, 5, dtype=torch.bool)
    out, lse = attention_dense(q * 100, k * 100, v, mask, return_lse=True)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    lay = Layout(PatternIR("a", 1, False, prims.All()), 4, 5, 2, 2)
    out2, lse2 = attention_blocked(lay, q * 100, k * 100, v, return_lse=True, dtype=torch.float64)
    torch.testing.assert_close(out2.double(), out, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(lse2, lse, atol=1e-8, rtol=1e-10)


def test_empty_rows_give_zero_and_neg_inf():
    q, k, v = qkv(2, 4, 2, 5, 6, 8)
    mask = torch.ones(5, 6, dtype=torch.bool)
    mask[[0, 3]] = False
    out, lse = attention_dense(q, k, v, mask, return_lse=True)
    assert not out.isnan().any() and not lse.isnan().any()
    assert (out[:, :, [0, 3]] == 0).all() and torch.isneginf(lse[:, :, [0, 3]]).all()
    assert torch.isfinite(lse[:, :, [1, 2, 4]]).all()
    out, lse = attention_dense(q, k, v, torch.zeros(5, 6, dtype=torch.bool), return_lse=True)
    assert (out == 0).all() and torch.isneginf(lse).all()


@pytest.mark.parametrize(("Sq", "Skv"), [(0, 0), (0, 5), (5, 0)])
def test_zero_lengths(Sq, Skv):
    q, k, v = qkv(2, 2, 1, Sq, Skv, 4)
    p = PatternIR("c", 1, True, prims.All())
    for out, lse in (
        attention_dense(q, k, v, torch.ones(Sq, Skv, dtype=torch.bool), return_lse=True),
        attention(p, q, k, v, return_lse=True),
        attention_blocked(Layout(p, Sq, Skv, 4, 4), q, k, v, return_lse=True),
    ):
        assert out.shape == (2, 2, Sq, 4) and lse.shape == (2, 2, Sq)
        assert (out == 0).all() and torch.isneginf(lse).all()


def test_attention_from_pattern_defaults_to_bottom_right():
    p = PatternIR("w", 2, True, prims.Local(2) | prims.Sink(1))
    q, k, v = qkv(1, 2, 2, 5, 13, 4)
    got = attention(Pattern(p), q, k, v)
    torch.testing.assert_close(got, attention_dense(q, k, v, dense_mask(p, 5, 13, 8)), atol=0, rtol=0)
    got = attention(p, q, k, v, q_offset=-2)  # first two rows before every key: zeros
    torch.testing.assert_close(got, attention_dense(q, k, v, dense_mask(p, 5, 13, -2)), atol=0, rtol=0)
    assert (got[:, :, :2] == 0).all()


# ---------------------------------------------------------------------------------------------
# attention_blocked


@settings(max_examples=n_examples(80), deadline=None)
@given(
    p=pattern_irs(),
    B=st.integers(1, 2),
    Hkv=st.integers(1, 2),
    G=st.sampled_from([1, 2, 4]),
    q_len=st.integers(1, 48),
    kv_len=st.integers(1, 48),
    shift=st.one_of(st.none(), st.integers(-20, 20)),
    block_q=st.integers(1, 16),
    block_kv=st.integers(1, 16),
    chunk=st.sampled_from([None, 1, 300]),
    seed=st.integers(0, 2**16),
)
def test_blocked_matches_dense(p, B, Hkv, G, q_len, kv_len, shift, block_q, block_kv, chunk, seed):
    q_offset = None if shift is None else kv_len - q_len + shift
    lay = Layout(p, q_len, kv_len, block_q, block_kv, q_offset)
    q, k, v = qkv(B, Hkv * G, Hkv, q_len, kv_len, 8, seed=seed)
    # chunk: force several kv chunks per q-tile (online softmax across chunks)
    with mock.patch.object(blocked, "SCORE_CHUNK_ELEMS", chunk or blocked.SCORE_CHUNK_ELEMS):
        out, lse = attention_blocked(lay, q, k, v, return_lse=True)
    want, want_lse = attention(p, q, k, v, q_offset=lay.q_offset, return_lse=True)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    assert not out.isnan().any() and not lse.isnan().any()
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), want_lse, atol=1e-5, rtol=1e-5)  # -inf rows must match exactly


@settings(max_examples=n_examples(20), deadline=None)
@given(p=pattern_irs(max_depth=2), q_len=st.integers(1, 40), kv_len=st.integers(1, 40), blk=st.integers(1, 9))
def test_blocked_float64_is_exact(p, q_len, kv_len, blk):
    lay = Layout(p, q_len, kv_len, blk, blk + 1)
    q, k, v = qkv(1, 2, 1, q_len, kv_len, 4, dtype=torch.float64)
    out = attention_blocked(lay, q, k, v, dtype=torch.float64, scale=0.7)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, attention(p, q, k, v, scale=0.7), atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_blocked_output_dtype_follows_q(dtype):
    p = PatternIR("s", 4, True, prims.Sink(1) | prims.Local(3))
    q, k, v = qkv(1, 4, 2, 33, 33, 16, seed=2, dtype=dtype)
    out = attention_blocked(Layout(p, 33, 33, 8, 8), q, k, v)
    assert out.dtype == dtype
    tol = {torch.float16: 2e-3, torch.bfloat16: 2e-2, torch.float64: 1e-5}[dtype]
    torch.testing.assert_close(out.double(), attention(p, q, k, v), atol=tol, rtol=tol)


def test_blocked_power_larger_shape():
    """PowerAttention at unit 16 over 1500 tokens (GQA 4): the CPU path agrees with fp64 dense."""
    p = PatternIR("power", 16, True, prims.Sink(1) | prims.Local(5) | prims.Powers(2))
    q, k, v = qkv(1, 4, 1, 1500, 1500, 32, seed=11)
    lay = Layout(p, 1500, 1500, 64, 32)
    out, lse = attention_blocked(lay, q, k, v, return_lse=True)
    want, want_lse = attention(p, q, k, v, return_lse=True)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), want_lse, atol=1e-5, rtol=1e-5)


def test_blocked_never_builds_a_dense_mask(monkeypatch):
    """O(nnz): the blocked path must not call dense_mask nor allocate anything of size Sq x Skv."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class Watch(TorchDispatchMode):
        biggest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    Watch.biggest = max(Watch.biggest, t.untyped_storage().nbytes())
            return out

    def boom(*a, **kw):
        raise AssertionError("attention_blocked called dense_mask")

    monkeypatch.setattr(reference, "dense_mask", boom)
    S = 2048
    p = PatternIR("sw", 32, True, prims.Sink(1) | prims.Local(2))
    q, k, v = qkv(1, 1, 1, S, S, 4)
    lay = Layout(p, S, S, 32, 32)
    with Watch():
        out = attention_blocked(lay, q, k, v)
    assert out.shape == (1, 1, S, 4)
    assert Watch.biggest < S * S // 16, f"an allocation of {Watch.biggest} bytes is not O(nnz)"


# ---------------------------------------------------------------------------------------------
# Validation


P = PatternIR("c", 1, True, prims.All())


def _ok():
    return qkv(1, 4, 2, 5, 7, 8)


@pytest.mark.parametrize(
    ("case", "exc", "match"),
    [
        ("rank", ValueError, "rank 4"),
        ("batch", ValueError, "batch"),
        ("head_dim", ValueError, "head_dim"),
        ("gqa", ValueError, "multiple of kv heads"),
        ("kv_mismatch", ValueError, "k and v"),
        ("not_tensor", TypeError, "torch.Tensor"),
        ("int_dtype", TypeError, "floating-point"),
        ("device", ValueError, "one device"),
    ],
)
def test_qkv_validation(case, exc, match):
    q, k, v = _ok()
    if case == "rank":
        q = q[0]
    elif case == "batch":
        k, v = k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1)
    elif case == "head_dim":
        k = k[..., :4]
    elif case == "gqa":
        q = q[:, :3]
    elif case == "kv_mismatch":
        v = v[:, :, :3]
    elif case == "not_tensor":
        q = q.tolist()
    elif case == "int_dtype":
        k = k.long()
    elif case == "device":
        q = q.to("meta")
    mask = torch.ones(5, 7, dtype=torch.bool)
    for call in (
        lambda: attention_dense(q, k, v, mask),
        lambda: attention(P, q, k, v),
        lambda: attention_blocked(Layout(P, 5, 7, 4, 4), q, k, v),
    ):
        with pytest.raises(exc, match=match):
            call()


def test_mask_validation():
    q, k, v = _ok()
    with pytest.raises(ValueError, match=r"\[5, 7\]"):
        attention_dense(q, k, v, torch.ones(7, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool"):
        attention_dense(q, k, v, torch.ones(5, 7))
    with pytest.raises(TypeError, match="mask"):
        attention_dense(q, k, v, [[True] * 7] * 5)


def test_other_argument_validation():
    q, k, v = _ok()
    with pytest.raises(ValueError, match="layout is for"):
        attention_blocked(Layout(P, 6, 7, 4, 4), q, k, v)
    with pytest.raises(TypeError, match="Layout"):
        attention_blocked(P, q, k, v)
    with pytest.raises(TypeError, match="dtype"):
        attention_blocked(Layout(P, 5, 7, 4, 4), q, k, v, dtype=torch.int32)
    with pytest.raises(TypeError, match="Pattern or PatternIR"):
        attention("causal", q, k, v)
    with pytest.raises(TypeError, match="q_offset"):
        attention(P, q, k, v, q_offset=1.5)
    with pytest.raises(TypeError, match="scale"):
        attention_dense(q, k, v, torch.ones(5, 7, dtype=torch.bool), scale="0.1")
    with pytest.raises(ValueError, match="finite"):
        attention_dense(q, k, v, torch.ones(5, 7, dtype=torch.bool), scale=math.inf)
