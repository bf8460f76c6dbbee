"""The mean-and-spread bound on a block's softmax mass (issue 12): the spread bounds the largest
eigenvalue from above, the mass bound is never below the exact mass of a block's keys (outliers,
identical keys, one-key and partial blocks, large magnitudes), and on noise spread over many
channels it is far below ``log(n) + `` the box/ball bound -- and the certified decode reads fewer
blocks with it, the certificate still holding."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spdsl.summaries import KeySummaries, box_bound, mass_bound, spread_bound
from tests.strategies import n_examples


@pytest.mark.parametrize("kind", ["gaussian", "rank1", "zero", "one_row", "outlier"])
def test_spread_bounds_the_top_eigenvalue_from_above(kind):
    g = torch.Generator().manual_seed(0)
    r = torch.randn(20, 64, 48, generator=g, dtype=torch.float64)
    if kind == "rank1":
        r = torch.randn(20, 64, 1, generator=g, dtype=torch.float64) * torch.randn(20, 1, 48, generator=g)
    elif kind == "zero":
        r = torch.zeros(20, 64, 48, dtype=torch.float64)
    elif kind == "one_row":
        r[:, 1:] = 0
    elif kind == "outlier":
        r[:, 3] *= 1e3
    top = torch.linalg.eigvalsh(r @ r.transpose(-1, -2))[..., -1].clamp(min=0)
    got = spread_bound(r).double()
    assert bool((got >= top * (1 - 1e-6)).all())
    assert bool((got <= top * 64 ** (1 / 32) * (1 + 1e-5) + 1e-9).all())


def _exact_log_mass(q, k, n, block, scale, dtype=torch.float64):
    """log Σ exp(scale q·k) over each block's first keys, scores in ``dtype``: [B, Hkv, R, NB]."""
    B, S, Hkv, _ = k.shape
    s = torch.einsum("bhrd,bshd->bhrs", q.to(dtype), k.to(dtype)).double() * scale
    live = torch.arange(S)[None, :] < torch.as_tensor(n)[:, None]  # [B, S]
    s = s.masked_fill(~live[:, None, None], -math.inf)
    return s.view(B, Hkv, q.shape[2], -1, block).logsumexp(-1)


@settings(max_examples=n_examples(40), deadline=None)
@given(
    seed=st.integers(0, 2**16),
    kind=st.sampled_from(["gaussian", "outlier", "identical", "aligned", "huge"]),
    lens=st.lists(st.integers(1, 96), min_size=1, max_size=3),
    block=st.sampled_from([16, 32]),
)
def test_mass_bound_is_never_below_the_exact_mass(seed, kind, lens, block):
    g = torch.Generator().manual_seed(seed)
    B, S, Hkv, D = len(lens), 96, 2, 32
    k = torch.randn(B, S, Hkv, D, generator=g)
    q = torch.randn(B, Hkv, 3, D, generator=g)
    if kind == "outlier":
        k[:, 5] *= 30
        q[:, :, 0] = k[:, 5]  # the query along the outlier
    elif kind == "identical":
        k[:] = k[:, :1]
    elif kind == "aligned":  # the query along one key: the one-outlier extreme
        q[:, :, 1] = 4 * k[:, 17]
    elif kind == "huge":
        k, q = k * 300, q * 3
    k = k.to(torch.bfloat16).float()  # cache values as the kernels see them
    n = torch.tensor(lens, dtype=torch.int32)
    s = KeySummaries(k, n, block_size=block)
    scale = 1 / math.sqrt(D)
    got = mass_bound(q, s.mean, s.spread, s.count(n), scale)
    exact = _exact_log_mass(q, k, n, block, scale)
    fp32 = _exact_log_mass(q, k, n, block, scale, torch.float32)  # scores as the kernels round them
    ok = torch.isinf(exact) | (got >= torch.maximum(exact, fp32) - 1e-9)
    assert bool(ok.all()), (got - exact)[~ok]
    assert bool((torch.isinf(got) == torch.isinf(exact)).all())  # empty blocks and only those


def test_mass_bound_is_far_tighter_than_the_ball_on_isotropic_noise():
    # the benchmark's clustered keys: block centres plus 0.3 x Gaussian noise in 128 channels
    g = torch.Generator().manual_seed(1)
    B, S, Hkv, D, block = 1, 64 * 64, 2, 128, 64
    centres = torch.randn(Hkv, 64, D, generator=g)
    k = centres[torch.arange(Hkv)[None, None], torch.arange(S)[None, :, None] // block % 64]
    k = k + 0.3 * torch.randn(B, S, Hkv, D, generator=g)
    q = centres[:, :1].expand(Hkv, 4, D)[None] + 0.3 * torch.randn(B, Hkv, 4, D, generator=g)
    n = torch.tensor([S], dtype=torch.int32)
    s = KeySummaries(k, n, block_size=block)
    scale = 1 / math.sqrt(D)
    mass = mass_bound(q, s.mean, s.spread, s.count(n), scale)
    ball = math.log(block) + scale * box_bound(q, s.lo, s.hi, s.radius).double()
    exact = _exact_log_mass(q, k, n, block, scale)
    assert bool((mass >= exact).all())
    assert float((ball - mass).median()) > 1.5  # nats (2.3 here): ~10x less mass charged per block
    assert float((mass - exact).median()) < 2.0


def test_decode_reads_fewer_blocks_with_it_in_at_most_max_rounds(monkeypatch):
    import spdsl
    from benchmarks.dynamic import PATTERN, exact, make_data, measured
    from spdsl import dynamic

    op = spdsl.build(spdsl.compile(PATTERN))
    q, kc, vc = make_data("clustered", 0.05, 1, 8192, 8, 2, 128, torch.float32, 3, "cpu", 0.3)
    n = torch.tensor([8192], dtype=torch.int32)
    s = op.summaries(kc, n, block_size=64)
    launches = []
    counting = dynamic.Backend(dynamic.TORCH.bound, lambda *a: (launches.append(1), dynamic.TORCH.run_blocks(*a))[1])

    def decode():
        launches.clear()
        return dynamic.decode(op.pattern.ir, q, kc, vc, n, s, scale=128**-0.5, eps=1e-3, backend=counting)

    out, err, chosen = decode()
    assert len(launches) <= dynamic.MAX_ROUNDS + 1 and float(err.max()) <= 1e-3
    ref, vrange = exact(op.pattern, q, kc, vc, n, 128**-0.5)
    assert measured(out, ref, vrange) <= float(err.max()) + 1e-5
    with monkeypatch.context() as m:
        m.setattr(dynamic, "mass_bound", lambda q, *a, **k: torch.full((*q.shape[:3], s.num_blocks), math.inf))
        _, _, without = decode()
    assert int(chosen.sum()) < 0.8 * int(without.sum())
