"""FlexAttention interop: ``Layout.to_block_mask()`` is the same pattern as ``dense_mask``,
token by token, and eager Flex on CPU with it agrees with the fp64 reference."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spdsl.core import primitives as prims
from spdsl.core.ir import PatternIR
from spdsl.layout import Layout, dense_mask
from tests.strategies import blocks, n_examples, offsets, pattern_irs


def block_mask_to_dense(bm, q_len: int, kv_len: int) -> torch.Tensor:
    """Token mask rebuilt from a BlockMask: full blocks all True, partial blocks via its mask_mod on
    that block's index vectors only."""
    bq, bkv = bm.BLOCK_SIZE
    mask = torch.zeros(q_len, kv_len, dtype=torch.bool)
    b = h = torch.zeros((), dtype=torch.int64)
    for i in range(-(-q_len // bq)):
        r = torch.arange(i * bq, min((i + 1) * bq, q_len))
        full = bm.full_kv_indices[0, 0, i, : int(bm.full_kv_num_blocks[0, 0, i])].tolist()
        part = bm.kv_indices[0, 0, i, : int(bm.kv_num_blocks[0, 0, i])].tolist()
        assert not set(full) & set(part), "a block is both full and partial"
        for j in full:
            mask[r[0] : r[-1] + 1, j * bkv : min((j + 1) * bkv, kv_len)] = True
        for j in part:
            c = torch.arange(j * bkv, min((j + 1) * bkv, kv_len))
            mask[r[0] : r[-1] + 1, c[0] : c[-1] + 1] = bm.mask_mod(b, h, r[:, None], c[None, :]).expand(len(r), len(c))
    return mask


@settings(max_examples=n_examples(60), deadline=None)
@given(
    p=pattern_irs(),
    q_len=st.integers(1, 70),
    kv_len=st.integers(1, 70),
    q_offset=offsets,
    block_q=blocks,
    block_kv=blocks,
)
def test_block_mask_equals_dense_mask(p, q_len, kv_len, q_offset, block_q, block_kv):
    lay = Layout(p, q_len, kv_len, block_q, block_kv, q_offset)
    bm = lay.to_block_mask()
    assert bm.BLOCK_SIZE == (block_q, block_kv)
    assert tuple(bm.seq_lengths) == (q_len, kv_len)
    assert torch.equal(bm.to_dense()[0, 0].bool(), lay.tile_grid() > 0)
    assert torch.equal(block_mask_to_dense(bm, q_len, kv_len), dense_mask(p, q_len, kv_len, lay.q_offset))


def _flex_or_skip():
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError as e:  # pragma: no cover - torch < 2.5
        pytest.skip(f"FlexAttention is not available: {e}")
    return flex_attention


# Eager Flex re-traces for every new sequence length (seconds each on CPU): one shape for all.
FLEX_Q, FLEX_KV = 37, 41


def _flex_run(lay: Layout, q, k, v):
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError as e:  # pragma: no cover - torch < 2.5
        pytest.skip(f"FlexAttention is not available: {e}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "flex_attention called without torch.compile()"
        try:
            return flex_attention(q, k, v, block_mask=lay.to_block_mask())
        except NotImplementedError as e:
            pytest.skip(f"FlexAttention does not run eagerly on CPU here: {e}")


@settings(max_examples=n_examples(8), deadline=None)
@given(
    p=pattern_irs(max_depth=2),
    shift=st.integers(-12, 8),
    block=st.sampled_from([(8, 8), (16, 8), (8, 16), (5, 12)]),
    seed=st.integers(0, 2**16),
)
def test_flex_attention_eager_cpu_matches_reference(p, shift, block, seed):
    """Eager (uncompiled) Flex on CPU with our BlockMask vs the fp64 reference, empty rows included.

    Eager Flex evaluates the mask_mod densely (it ignores the block sparsity), so this checks the
    mask_mod and the q_offset convention; the block structure is checked above.
    """
    from spdsl.reference import attention

    q_offset = FLEX_KV - FLEX_Q + shift
    lay = Layout(p, FLEX_Q, FLEX_KV, *block, q_offset=q_offset)
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, 2, n, 16, generator=g) for n in (FLEX_Q, FLEX_KV, FLEX_KV))
    got = _flex_run(lay, q, k, v)
    want = attention(p, q, k, v, q_offset=q_offset)
    assert not torch.isnan(got).any()
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-4)
    empty = ~dense_mask(p, FLEX_Q, FLEX_KV, q_offset).any(1)
    assert (got[:, :, empty] == 0).all()


def test_flex_empty_rows_give_zero():
    """Rows with no visible key: Flex gives 0, as the reference does."""
    p = PatternIR("p", 1, True, prims.Local(2))
    lay = Layout(p, FLEX_Q, FLEX_KV, 8, 8, q_offset=-10)  # rows 0..9 sit before every key
    q, k, v = torch.randn(1, 1, FLEX_Q, 8), torch.randn(1, 1, FLEX_KV, 8), torch.randn(1, 1, FLEX_KV, 8)
    got = _flex_run(lay, q, k, v)
    assert (got[0, 0, :10] == 0).all() and not torch.isnan(got).any()
    assert (got[0, 0, 10:] != 0).any(-1).all()
    assert lay.row(0) == ([], [])
