"""Key summaries (issue 12): the box is exact per block, update equals a build from scratch and
touches only changed blocks, paged equals contiguous, the bound bounds every key."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spdsl.summaries import KeySummaries, box_bound, rounding_margin
from tests.strategies import n_examples
from tests.test_decode import to_paged


def _cache(seed: int, B=3, S=100, H=2, D=16, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, S, H, D, generator=g).to(dtype), torch.randn(B, S, H, D, generator=g).to(dtype)


def test_box_is_the_per_channel_min_max_of_each_block():
    k, _ = _cache(0)
    lengths = torch.tensor([100, 37, 0], dtype=torch.int32)
    s = KeySummaries(k, lengths, block_size=16)
    assert s.lo.shape == (3, 2, 7, 16) and s.num_blocks == 7
    for b, n in enumerate(lengths.tolist()):
        for t in range(-(-n // 16)):
            keys = k[b, t * 16 : min(n, t * 16 + 16)].transpose(0, 1)  # [H, tokens, D]
            assert torch.equal(s.lo[b, :, t], keys.amin(1)) and torch.equal(s.hi[b, :, t], keys.amax(1))
            far = (keys - (keys.amin(1, keepdim=True) + keys.amax(1, keepdim=True)) / 2).norm(dim=-1).amax(1)
            torch.testing.assert_close(s.radius[b, :, t], far, rtol=1e-5, atol=0)
            assert bool((s.radius[b, :, t] >= far).all())
    assert not s.lo[1, :, 3:].any() and not s.hi[2].any()  # empty blocks hold zeros


@settings(max_examples=n_examples(25), deadline=None)
@given(
    seed=st.integers(0, 2**16),
    steps=st.lists(st.lists(st.integers(-20, 40), min_size=3, max_size=3), min_size=1, max_size=4),
    paged=st.booleans(),
)
def test_update_equals_a_build_from_scratch(seed, steps, paged):
    k, _ = _cache(seed)
    bt = None
    if paged:
        k, _, bt = to_paged(k, k, 16, torch.Generator().manual_seed(seed))
    lengths = torch.tensor([30, 0, 64], dtype=torch.int32)
    s = KeySummaries(k, lengths, bt, block_size=16)
    for delta in steps:
        lengths = (lengths + torch.tensor(delta, dtype=torch.int32)).clamp(0, 100)
        k.add_(0.0)  # the same storage: appended tokens are written in place in a real cache
        s.update(k, lengths)
        fresh = KeySummaries(k, lengths, bt, block_size=16)
        assert torch.equal(s.lo, fresh.lo) and torch.equal(s.hi, fresh.hi) and torch.equal(s.radius, fresh.radius)
        assert s.seqlens == lengths.tolist()


def test_update_touches_only_the_changed_blocks():
    k, _ = _cache(1)
    lengths = torch.tensor([40, 40, 40], dtype=torch.int32)
    s = KeySummaries(k, lengths, block_size=16)
    s.lo[:, :, :2] = 123.0  # blocks 0 and 1 hold tokens 0..31, which do not change below
    s.update(k, torch.tensor([41, 40, 70], dtype=torch.int32))
    assert bool((s.lo[:, :, :2] == 123.0).all())
    assert not bool((s.lo[1, :, 2] == 123.0).any())


def test_paged_equals_contiguous():
    k, _ = _cache(2)
    lengths = torch.tensor([100, 55, 17], dtype=torch.int32)
    kp, _, bt = to_paged(k, k, 32, torch.Generator().manual_seed(3))
    flat, paged = KeySummaries(k, lengths, block_size=16), KeySummaries(kp, lengths, bt, block_size=16)
    assert torch.equal(flat.lo[:, :, :7], paged.lo[:, :, :7]) and torch.equal(flat.hi[:, :, :7], paged.hi[:, :, :7])


def test_bound_is_exact_for_the_box_and_the_ball_bounds_every_key():
    k, _ = _cache(4, B=2, S=64, H=2, D=32)
    q = torch.randn(2, 2, 3, 32)  # [B, Hkv, rows, D]
    s = KeySummaries(k, torch.tensor([64, 50], dtype=torch.int32), block_size=16)
    u = box_bound(q, s.lo, s.hi)  # [B, Hkv, rows, NB]
    scores = torch.einsum("bhrd,bshd->bhrs", q, k)
    both = box_bound(q, s.lo, s.hi, s.radius)
    assert bool((both <= u + 1e-3).all()) and bool((both < u - 1).any())  # (the margin grows by |q| r)
    for b, n in enumerate([64, 50]):
        for t in range(-(-n // 16)):
            assert bool((scores[b, :, :, t * 16 : min(n, t * 16 + 16)].amax(-1) <= both[b, :, :, t]).all())
    corner = torch.where(q[..., None, :] > 0, s.hi[:, :, None], s.lo[:, :, None]).double()
    exact = (q[..., None, :].double() * corner).sum(-1)  # the box's maximizing corner, in fp64
    assert bool((u >= exact).all())
    slack = rounding_margin(32) * (q.abs()[..., None, :] * torch.maximum(s.lo.abs(), s.hi.abs())[:, :, None]).sum(-1)
    assert bool(((u - exact) <= 2 * slack + 1e-6).all())


def test_bad_inputs():
    k, _ = _cache(5)
    lengths = torch.tensor([10, 10, 10], dtype=torch.int32)
    with pytest.raises(ValueError, match="power of two"):
        KeySummaries(k, lengths, block_size=24)
    with pytest.raises(TypeError, match="k_cache"):
        KeySummaries(k[0], lengths)
    with pytest.raises(TypeError, match="cache_seqlens"):
        KeySummaries(k, lengths.float())
    with pytest.raises(ValueError, match="batch"):
        KeySummaries(k, lengths[:2])
    s = KeySummaries(k, lengths, block_size=16)
    with pytest.raises(ValueError, match="capacity"):
        s.update(k, lengths + 200)
    with pytest.raises(ValueError, match="another k_cache"):
        s.update(k.clone(), lengths)
    assert "blocks=7x16" in repr(s)
