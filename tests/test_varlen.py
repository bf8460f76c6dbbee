"""``attention_varlen`` of the generated module (Triton interpreter): packed sequences equal
per-sequence ``attention`` calls and the fp64 reference; cu_seqlens validation."""

from __future__ import annotations

import math

import pytest
import torch

import spdsl
from spdsl import reference
from tests.helpers import nan_buffers, scoped_env

TOL = {torch.float32: 1e-4, torch.float16: 4e-3}

POWER_LIKE = "pattern power_like { unit 4 causal attend sink(1) | local(3) | powers(2) }"
BAND = "pattern band_nc { unit 2 attend band(-2, 1) | every(5) }"


@pytest.fixture(scope="module", autouse=True)
def interpreter_env(tmp_path_factory):
    with scoped_env(TRITON_INTERPRET="1", SPDSL_CACHE_DIR=str(tmp_path_factory.mktemp("spdsl_cache"))):
        yield


def build(text: str, block_m: int = 16, block_n: int = 16):
    return spdsl.build(spdsl.compile(text), block_m=block_m, block_n=block_n, num_warps=4, num_stages=1)


def cu(lens):
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)


def packed(q_lens, kv_lens, Hq, Hkv, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(q_lens), Hq, D, generator=g).to(dtype)
    k = torch.randn(sum(kv_lens), Hkv, D, generator=g).to(dtype)
    v = torch.randn(sum(kv_lens), Hkv, D, generator=g).to(dtype)
    return q, k, v


def seq(t, cu_seqlens, i):
    """Sequence i of a packed [total, H, D] tensor as [1, H, len, D]."""
    a, b = int(cu_seqlens[i]), int(cu_seqlens[i + 1])
    return t[a:b].transpose(0, 1).unsqueeze(0)


def check_varlen(op, q_lens, kv_lens, Hq, Hkv, D, dtype, seed=0):
    q, k, v = packed(q_lens, kv_lens, Hq, Hkv, D, dtype, seed)
    cq, ck = cu(q_lens), cu(kv_lens)
    with nan_buffers(op.module):
        out, lse = op.module.attention_varlen(q, k, v, cq, ck, max(q_lens), max(kv_lens), return_lse=True)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == (Hq, q.shape[0]) and lse.dtype == torch.float32
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    for i in range(len(q_lens)):
        qi, ki, vi = seq(q, cq, i), seq(k, ck, i), seq(v, ck, i)
        o_i, l_i = op.module.attention(qi, ki, vi, return_lse=True)
        got_o, got_l = seq(out, cq, i), lse[:, int(cq[i]) : int(cq[i + 1])].unsqueeze(0)
        # the same kernel on the same sequence: equal up to summation order (it is the same tile order)
        torch.testing.assert_close(got_o, o_i, atol=TOL[dtype] / 4, rtol=0)
        torch.testing.assert_close(got_l, l_i, atol=1e-5, rtol=0)
        ref, ref_lse = reference.attention(op.pattern, qi, ki, vi, return_lse=True)
        vis = torch.isfinite(ref_lse[0, 0])
        if got_o.numel():
            assert (got_o.double() - ref).abs().max() <= TOL[dtype]
        assert torch.equal(torch.isfinite(got_l), torch.isfinite(ref_lse))
        if vis.any():
            assert (got_l.double() - ref_lse)[..., vis].abs().max() <= TOL[dtype]
        if not vis.all():
            assert torch.equal(got_o[:, :, ~vis], torch.zeros_like(got_o[:, :, ~vis]))
    return out, lse


def test_three_odd_sequences_equal_per_sequence_calls():
    op = build(POWER_LIKE)
    check_varlen(op, [37, 5, 23], [37, 5, 23], Hq=2, Hkv=1, D=16, dtype=torch.float32, seed=1)


def test_q_shorter_than_kv_bottom_right_alignment():
    op = build(POWER_LIKE, 16, 32)
    q_lens, kv_lens = [7, 1, 19], [41, 9, 30]
    check_varlen(op, q_lens, kv_lens, Hq=4, Hkv=2, D=16, dtype=torch.float32, seed=2)


def test_bottom_right_alignment_is_per_sequence():
    """Sequence i's last query sits at its own kv_len - 1: causal rows see their sequence's last key."""
    op = build("pattern c { causal attend all }")
    q_lens, kv_lens = [3, 2], [10, 25]
    q, k, v = packed(q_lens, kv_lens, 1, 1, 16, torch.float32, seed=3)
    v = torch.zeros_like(v)
    v[9, 0, 0] = v[34, 0, 0] = 1.0  # the last key of each sequence
    out = op.module.attention_varlen(q, k, v, cu(q_lens), cu(kv_lens), 3, 25)
    assert out[2, 0, 0] > 0 and out[4, 0, 0] > 0  # the last queries see their last keys
    assert out[0, 0, 0] == 0 and out[1, 0, 0] == 0  # earlier queries do not
    assert out[3, 0, 0] == 0


def test_noncausal_fp16_gqa4():
    op = build(BAND, 32, 16)
    check_varlen(op, [17, 21, 3], [17, 21, 3], Hq=4, Hkv=1, D=32, dtype=torch.float16, seed=4)


def test_more_queries_than_keys_gives_empty_rows():
    op = build(POWER_LIKE)
    _, lse = check_varlen(op, [9, 20], [13, 6], Hq=2, Hkv=2, D=16, dtype=torch.float32, seed=5)
    assert bool((lse[:, 9 : 9 + 14] == -math.inf).all())  # sequence 1: rows at positions -14..-1


def test_empty_sequence_in_the_batch():
    op = build(POWER_LIKE)
    check_varlen(op, [11, 0, 7], [11, 4, 7], Hq=2, Hkv=1, D=16, dtype=torch.float32, seed=6)


def test_without_lse_and_op_varlen():
    op = build(POWER_LIKE)
    q_lens = [5, 12]
    q, k, v = packed(q_lens, q_lens, 2, 1, 16, torch.float32, seed=7)
    out = op.varlen(q, k, v, cu(q_lens), cu(q_lens), 12, 12)
    assert isinstance(out, torch.Tensor) and out.shape == q.shape
    out2, lse = op.varlen(q, k, v, cu(q_lens), cu(q_lens), 12, 12, return_lse=True)
    torch.testing.assert_close(out, out2, atol=0, rtol=0)
    assert lse.shape == (2, 17)


# --------------------------------------------------------------------------------------------
# cu_seqlens validation


@pytest.fixture(scope="module")
def small():
    op = build(POWER_LIKE)
    q_lens = [5, 7, 3]
    q, k, v = packed(q_lens, q_lens, 2, 1, 16, torch.float32)
    return op, q, k, v, cu(q_lens)


def _call(small, cq=None, ck=None, mq=7, mk=7):
    op, q, k, v, c = small
    return op.module.attention_varlen(q, k, v, c if cq is None else cq, c if ck is None else ck, mq, mk)


def test_valid_call_works(small):
    assert _call(small).shape == small[1].shape


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(cq=torch.tensor([0, 5, 12, 15], dtype=torch.int64)), r"cu_seqlens_q.*int32"),
        (dict(ck=torch.tensor([0, 5, 12, 15], dtype=torch.float32)), r"cu_seqlens_k.*int32"),
        (dict(cq=torch.tensor([[0, 5, 12, 15]], dtype=torch.int32)), r"cu_seqlens_q.*1-d"),
        (dict(cq=torch.tensor([0], dtype=torch.int32)), r"cu_seqlens_q"),
        (dict(cq=[0, 5, 12, 15]), r"cu_seqlens_q.*tensor"),
        (dict(cq=torch.tensor([1, 5, 12, 15], dtype=torch.int32)), r"cu_seqlens_q.*start at 0"),
        (dict(ck=torch.tensor([0, 12, 5, 15], dtype=torch.int32)), r"cu_seqlens_k.*never decrease"),
        (dict(cq=torch.tensor([0, 5, 12, 14], dtype=torch.int32)), r"cu_seqlens_q.*end at 15"),
        (dict(ck=torch.tensor([0, 5, 12, 16], dtype=torch.int32)), r"cu_seqlens_k.*end at 15"),
        (dict(mq=6), r"cu_seqlens_q.*length 7 > max_seqlen 6"),
        (dict(mk=3), r"cu_seqlens_k.*max_seqlen 3"),
        (dict(ck=torch.tensor([0, 5, 15], dtype=torch.int32), mk=10), r"same number of sequences"),
    ],
)
def test_bad_cu_seqlens(small, kwargs, match):
    with pytest.raises(ValueError, match=match):
        _call(small, **kwargs)


def test_bad_packed_tensors(small):
    op, q, k, v, c = small
    with pytest.raises(ValueError, match=r"3-d"):
        op.module.attention_varlen(q[None], k, v, c, c, 7, 7)
    with pytest.raises(ValueError, match=r"multiple of kv heads"):
        op.module.attention_varlen(
            q[:, :1].expand(-1, 3, -1).contiguous(),
            k[:, :1].expand(-1, 2, -1).contiguous(),
            v[:, :1].expand(-1, 2, -1).contiguous(),
            c,
            c,
            7,
            7,
        )
    with pytest.raises(TypeError, match=r"one dtype"):
        op.module.attention_varlen(q.half(), k, v, c, c, 7, 7)
