"""Inputs and checks shared by the certified-decode tests (issue 12): adversarial KV caches and
the certificate ``|o - o_exact| <= err * (value range over the candidates)``, ``err <= eps``."""

from __future__ import annotations

import math

import torch

from spdsl import dynamic_reference as dref

#: Kinds of cache drawn by the tests (see :func:`make_cache`).
KINDS = ("gaussian", "needle", "hot", "peaked", "outliers", "ties", "constant", "huge", "tiny")

PATTERNS = {
    "massive": "pattern massive() {{ unit 16 causal attend sink(1) | local(1) {score} select all }}",
    "strided": "pattern strided() {{ unit 8 causal attend local(2) {score} select every(3) | sink(2) }}",
    "noselect": "pattern noselect() {{ unit 16 causal attend sink(1) | local(2) | stride(5) {score} }}",
    "bidir": "pattern bidir() {{ unit 8 attend local(2) {score} select every(2) - segment(9) }}",
}


def pattern_text(name: str, alpha: int | None) -> str:
    """The test pattern ``name`` with ``score relu(alpha)`` (softmax when alpha is None)."""
    return PATTERNS[name].format(score="" if alpha is None else f"score relu({alpha})")


def make_cache(kind: str, seed: int, *, B=2, Sq=1, Hq=4, Hkv=2, D=16, S=160, dtype=torch.float32):
    """``(q [B, Sq, Hq, D], k_cache, v_cache [B, S, Hkv, D], cache_seqlens int32 [B], needle)``.

    Kinds: i.i.d. Gaussian; a *needle* (a key aligned with every query of its KV head, far back,
    with a distinctive value, at token ``needle[b]``) over small keys, beside a strong sink;
    *hot*: three blocks far back aligned with the queries, over small keys and an ordinary sink
    (the attend mass is small: the certificate needs the rounds of the top-p); *peaked* (a sink of
    random strength over moderate keys: the certificate near its threshold);
    *outliers* (a few channels 30x larger); near *ties* (keys equal up to 1e-4); *constant* keys;
    *huge* (norm x 30) and *tiny* (x 1e-3) keys.
    """
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Sq, Hq, D, generator=g)
    k = torch.randn(B, S, Hkv, D, generator=g)
    v = torch.randn(B, S, Hkv, D, generator=g)
    lengths = torch.randint(S // 2, S + 1, (B,), generator=g)
    lengths[0] = S
    needle = torch.zeros(B, dtype=torch.long)
    if kind in ("needle", "peaked"):
        k *= 0.05 if kind == "needle" else 0.3
        strength = 8.0 if kind == "needle" else float(torch.rand(1, generator=g)) * 5 + 1
        direction = q.reshape(B, Sq, Hkv, Hq // Hkv, D).mean((1, 3))  # [B, Hkv, D]
        direction = direction / direction.norm(dim=-1, keepdim=True) * math.sqrt(D) * strength
        k[:, 0] = direction  # the sink: a large attend mass
    if kind == "needle":
        for b in range(B):
            needle[b] = int(torch.randint(20, int(lengths[b]) // 2, (1,), generator=g))
            k[b, needle[b]] = direction[b]
            v[b, needle[b]] = 5.0
    elif kind == "hot":  # every query of a KV head near one direction, which three blocks hold
        k *= 0.05
        direction = torch.randn(B, Hkv, D, generator=g)
        direction = direction / direction.norm(dim=-1, keepdim=True) * math.sqrt(D)
        q = 0.3 * q + direction.repeat_interleave(Hq // Hkv, 1)[:, None]
        direction = 3 * direction
        for t in (1, 3, 4):  # tokens of blocks 1, 3 and 4 (block size 16)
            k[:, 16 * t : 16 * t + 16] = direction[:, None] + 0.05 * k[:, 16 * t : 16 * t + 16]
    elif kind == "outliers":
        k[..., torch.randint(0, D, (2,), generator=g)] *= 30.0
    elif kind == "ties":
        k = k[:, :1].expand_as(k) + 1e-4 * k
    elif kind == "constant":
        k = k[:, :1].expand_as(k).clone()
    elif kind == "huge":
        k *= 30.0
    elif kind == "tiny":
        k *= 1e-3
    return q.to(dtype), k.contiguous().to(dtype), v.to(dtype), lengths.to(torch.int32), needle


def value_range(pattern, v_cache, cache_seqlens, Sq: int, Hq: int) -> torch.Tensor:
    """fp64 ``[B, Sq, Hq, Dv]``: max - min of each value coordinate over each row's candidate keys."""
    B, _, Hkv, Dv = v_cache.shape
    out = torch.zeros(B, Sq, Hq, Dv, dtype=torch.float64)
    for b, n in enumerate(cache_seqlens.tolist()):
        mask = dref.candidate_mask(pattern, Sq, n)  # [Sq, n]
        vb = v_cache[b, :n].double().repeat_interleave(Hq // Hkv, dim=1)  # [n, Hq, Dv]
        hi = torch.where(mask[:, :, None, None], vb[None], -math.inf).amax(1)
        lo = torch.where(mask[:, :, None, None], vb[None], math.inf).amin(1)
        out[b] = torch.where(mask.any(1)[:, None, None], hi - lo, 0.0)
    return out


def fp32_tol(q, k_cache, scale: float = 0.25, base: float = 2e-5) -> float:
    """Rounding allowance of fp32 kernels: ``base``, growing with the largest ``|scale·q·k|`` (an
    fp32 score of magnitude s carries an absolute error ~ s·2**-23, and so does its weight)."""
    smax = float((q.double().flatten(1, 2) @ k_cache.double().flatten(1, 2).transpose(1, 2)).abs().max()) * scale
    return base * max(1.0, smax / 20)


def check_certificate(out, err, ref, vrange, eps: float, tol: float) -> None:
    """``err <= eps`` everywhere and ``|out - ref| <= err * vrange + tol`` per coordinate."""
    assert err.shape == out.shape[:3] and err.dtype == torch.float32
    assert bool((err >= 0).all()) and float(err.max()) <= eps, float(err.max())
    excess = (out.double() - ref).abs() - err.double()[..., None] * vrange
    assert float(excess.max()) <= tol, float(excess.max())
