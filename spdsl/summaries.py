"""Per-block key summaries of a KV cache (issue 12): a per-channel box ``[lo, hi]`` per KV head and
block of ``block_size`` consecutive token positions, plus a ball around the box's middle, and the
bound they give on ``q·k``.

For a box, ``max over k in [lo, hi] of q·k = Σ_i max(q_i·lo_i, q_i·hi_i) = q⁺·hi + q⁻·lo``
(``q⁺ = max(q, 0)``, ``q⁻ = min(q, 0)``): exact for the box, an upper bound for every key of the
block. For the ball of ``radius`` r around ``mid = (lo + hi) / 2`` holding every key of the block,
``q·k <= q·mid + |q|·r`` (tighter than the box for isotropic noise in many channels; the box is
tighter for a few outlier channels). :func:`box_bound` takes the smaller of the two and adds a
rounding margin so that it also bounds the fp32 dot products the kernels compute. Summaries live
on the cache's device, in float32 (exact for fp16/bf16 keys).

A block's softmax *mass* ``Σ_j exp(s·q·k_j)`` is bounded more tightly by its keys' mean ``m`` and
spread ``λ`` (an upper bound on the largest eigenvalue of ``Σ_j r_j r_jᵀ``, ``r_j = k_j − m``):
with ``x_j = s·q·r_j``, ``Σ_j x_j = 0`` and ``Σ_j x_j² <= V = s²·λ·|q|²``, and over such ``x`` the
sum ``Σ_j exp(x_j)`` is largest with one key at ``a = sqrt(V·(n−1)/n)`` and the other ``n − 1`` at
``−a/(n−1)`` (:func:`mass_bound`). For noise spread over many channels ``|q|·sqrt(λ)`` is far below
the ball's ``|q|·radius``: the bound charges the variance along ``q``, not the worst key's distance.
"""

from __future__ import annotations

import torch

__all__ = ["KeySummaries", "box_bound", "gather_rows", "mass_bound", "rounding_margin", "spread_bound"]

#: Blocks recomputed per step of a from-scratch build (bounds the gathered keys' memory).
_CHUNK_BLOCKS = 512


def rounding_margin(head_dim: int) -> float:
    """Relative margin covering fp32 rounding of a length-``head_dim`` dot product (both the kernel's
    score and the bound's own sums): ``(2·D + 8)·2**-24`` times ``Σ|q_i|·max(|lo_i|, |hi_i|)``."""
    return (2 * head_dim + 8) * 2.0**-24


def box_bound(q: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, radius: torch.Tensor | None = None) -> torch.Tensor:
    """Upper bounds on ``q·k`` per block (unscaled): the box's, or the smaller of the box's and the
    ball's when ``radius`` is given; rounding margin included.

    Parameters
    ----------
    q: ``[B, Hkv, R, D]`` (the rows of one KV head: its query heads x queries).
    lo, hi: ``[B, Hkv, NB, D]`` summaries; radius: ``[B, Hkv, NB]`` or None.

    Returns
    -------
    float32 ``[B, Hkv, R, NB]``.
    """
    qf = q.float()
    exact = qf.clamp(min=0) @ hi.transpose(-1, -2) + qf.clamp(max=0) @ lo.transpose(-1, -2)
    margin = rounding_margin(q.shape[-1])
    size = qf.abs() @ torch.maximum(lo.abs(), hi.abs()).transpose(-1, -2)
    if radius is not None:
        reach = qf.norm(dim=-1, keepdim=True) * radius[:, :, None]  # |q| r
        ball = 0.5 * (qf @ lo.transpose(-1, -2) + qf @ hi.transpose(-1, -2)) + reach
        exact, size = torch.minimum(exact, ball), size + reach
    return exact + margin * size


def spread_bound(r: torch.Tensor) -> torch.Tensor:
    """An upper bound on the largest eigenvalue of ``Σ_j r_j r_jᵀ`` for rows ``r [..., n, D]``:
    ``tr(G)·tr((G / tr G)^32)^(1/32)`` with the Gram matrix ``G = r rᵀ`` (same nonzero eigenvalues),
    in float64 -- at most ``n^(1/32)`` (1.14 at n = 64) above the exact value, never below it.

    Returns
    -------
    float32 ``[...]`` (0 for all-zero rows).
    """
    g = r.double() @ r.double().transpose(-1, -2)
    t = g.diagonal(dim1=-2, dim2=-1).sum(-1)
    m = g / torch.where(t > 0, t, 1.0)[..., None, None]
    for _ in range(5):  # m ** 32: eigenvalues of m lie in [0, 1], nothing overflows
        m = m @ m
    top = m.diagonal(dim1=-2, dim2=-1).sum(-1).clamp(min=0) ** (1 / 32)
    return (t * top * (1 + 1e-6)).float()


def mass_bound(q: torch.Tensor, mean: torch.Tensor, spread: torch.Tensor, count: torch.Tensor, scale: float):
    """Upper bounds on ``log Σ_j exp(scale·q·k_j)`` over each block's keys (see the module docstring),
    rounding margin included.

    Parameters
    ----------
    q: ``[B, Hkv, R, D]``; mean: ``[B, Hkv, NB, D]``; spread: ``[B, Hkv, NB]`` (:func:`spread_bound`);
    count: keys per block, integer ``[B, NB]``; scale: the softmax scale.

    Returns
    -------
    float64 ``[B, Hkv, R, NB]`` (-inf for empty blocks).
    """
    qf, mf = q.double(), mean.double()
    qn = qf.norm(dim=-1, keepdim=True)  # [B, Hkv, R, 1]
    lam = spread.double()[:, :, None]  # [B, Hkv, 1, NB]
    n = count.double()[:, None, None]  # [B, 1, 1, NB]
    a = scale * qn * (lam * (n - 1) / n.clamp(min=1)).sqrt()
    spreadout = torch.logaddexp((n - 1).log() - a / (n - 1).clamp(min=1), a)  # n = 1: log 1 = 0
    centre = scale * (qf @ mf.transpose(-1, -2))
    size = scale * rounding_margin(q.shape[-1]) * qn * (mf.norm(dim=-1)[:, :, None] + lam.sqrt())
    return torch.where(n > 0, centre + spreadout + size, -torch.inf)


def gather_rows(cache: torch.Tensor, b: torch.Tensor, pos: torch.Tensor, block_table=None, head=None) -> torch.Tensor:
    """``cache`` rows at token positions ``pos`` of sequences ``b``: ``[..., H, D]`` (all heads), or
    ``[..., D]`` for the heads ``head`` (``b``, ``pos`` and ``head`` broadcast together).

    Positions must lie inside the cache's capacity; a paged cache maps them through ``block_table``.
    """
    h = slice(None) if head is None else head
    if block_table is None:
        return cache[b, pos, h]
    page = cache.shape[1]
    return cache[block_table[b, pos // page].long(), pos % page, h]


def sequence_kv(k_cache, v_cache, b: int, n: int, block_table=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` cached keys and values of sequence ``b``, ``[n, Hkv, D]`` each (paged or not)."""
    if block_table is None:
        return k_cache[b, :n], v_cache[b, :n]
    page = k_cache.shape[1]
    pages = block_table[b, : -(-n // page)].long()
    return k_cache[pages].flatten(0, 1)[:n], v_cache[pages].flatten(0, 1)[:n]


class KeySummaries:
    """Per-block min/max boxes of a KV cache's keys: ``lo``, ``hi`` float32 ``[B, Hkv, NB, D]``,
    ``radius [B, Hkv, NB]``: the largest distance of a block's key from its box's middle, and the
    keys' ``mean [B, Hkv, NB, D]`` and ``spread [B, Hkv, NB]`` (:func:`spread_bound`) for
    :func:`mass_bound`; ``count(cache_seqlens)`` gives the keys per block.

    Built by ``op.summaries(k_cache, cache_seqlens, block_table=None)``; :meth:`update` after
    tokens are appended recomputes only the blocks whose tokens changed. Empty blocks hold zeros
    (the decode never reads a summary of a block without candidate keys).
    """

    def __init__(self, k_cache: torch.Tensor, cache_seqlens: torch.Tensor, block_table=None, block_size: int = 64):
        """Summarize ``k_cache`` at ``cache_seqlens``.

        Parameters
        ----------
        k_cache: ``[B, S_max, Hkv, D]``, or paged ``[pages, page, Hkv, D]`` with ``block_table``.
        cache_seqlens: integer ``[B]``; block_table: integer ``[B, max_pages]`` (kept by reference).
        block_size: tokens per block, a power of two >= 16.
        """
        _check_cache(k_cache, cache_seqlens, block_table, block_size)
        B = cache_seqlens.shape[0]
        capacity = block_table.shape[1] * k_cache.shape[1] if block_table is not None else k_cache.shape[1]
        self.block_size = block_size
        self.num_blocks = -(-capacity // block_size)
        self.capacity = capacity
        self.block_table = block_table
        self._identity = _identity(k_cache)
        shape = (B, k_cache.shape[2], self.num_blocks, k_cache.shape[3])
        self.lo = torch.zeros(shape, dtype=torch.float32, device=k_cache.device)
        self.hi = torch.zeros(shape, dtype=torch.float32, device=k_cache.device)
        self.radius = torch.zeros(shape[:3], dtype=torch.float32, device=k_cache.device)
        self.mean = torch.zeros(shape, dtype=torch.float32, device=k_cache.device)
        self.spread = torch.zeros(shape[:3], dtype=torch.float32, device=k_cache.device)
        self.seqlens = [0] * B
        self.update(k_cache, cache_seqlens)

    def update(self, k_cache: torch.Tensor, cache_seqlens: torch.Tensor) -> KeySummaries:
        """Recompute the blocks between each sequence's previous and new length (appended or
        truncated tokens); every other block is untouched.

        Parameters
        ----------
        k_cache: the same cache (same storage), new tokens written; cache_seqlens: the new lengths.

        Returns
        -------
        ``self``. Reads ``cache_seqlens`` on the host (one synchronization): not CUDA-graph
        capturable yet.
        """
        self.check(k_cache, cache_seqlens, None, check_lengths=False)
        new = [int(n) for n in cache_seqlens.tolist()]
        if any(n < 0 or n > self.capacity for n in new):
            raise ValueError(f"cache_seqlens must lie in [0, {self.capacity}] (the cache's capacity), got {new}")
        bs, pairs = self.block_size, []
        for b, (old, n) in enumerate(zip(self.seqlens, new)):
            if old != n:
                first, last = min(old, n) // bs, (max(old, n) - 1) // bs
                pairs.extend((b, t) for t in range(first, last + 1))
        lengths = cache_seqlens.to(device=k_cache.device, dtype=torch.int64)
        for c in range(0, len(pairs), _CHUNK_BLOCKS):
            idx = torch.tensor(pairs[c : c + _CHUNK_BLOCKS], dtype=torch.int64, device=k_cache.device)
            self._recompute(k_cache, lengths, idx[:, 0], idx[:, 1])
        self.seqlens = new
        return self

    def _recompute(self, k_cache, lengths, b, t) -> None:
        pos = t[:, None] * self.block_size + torch.arange(self.block_size, device=k_cache.device)
        valid = pos < lengths[b][:, None]  # [n, bs]
        keys = gather_rows(k_cache, b[:, None], pos.clamp(max=self.capacity - 1), self.block_table).float()
        ok = valid[:, :, None, None]
        lo = torch.where(ok, keys, torch.inf).amin(1)  # [n, Hkv, D]
        hi = torch.where(ok, keys, -torch.inf).amax(1)
        empty = ~valid.any(1)[:, None, None]
        lo, hi = torch.where(empty, 0.0, lo), torch.where(empty, 0.0, hi)
        dist = (keys - 0.5 * (lo + hi)[:, None]).norm(dim=-1)  # [n, bs, Hkv]: from the box's middle
        radius = torch.where(valid[:, :, None], dist, 0.0).amax(1) * (1 + rounding_margin(keys.shape[-1]))
        self.lo[b, :, t], self.hi[b, :, t], self.radius[b, :, t] = lo, hi, radius
        k64 = torch.where(ok, keys.double(), 0.0)
        mean = k64.sum(1) / valid.sum(1).clamp(min=1)[:, None, None]  # [n, Hkv, D]
        r = torch.where(ok, k64 - mean[:, None], 0.0).transpose(1, 2)  # [n, Hkv, bs, D]
        self.mean[b, :, t], self.spread[b, :, t] = mean.float(), spread_bound(r)

    def count(self, cache_seqlens: torch.Tensor) -> torch.Tensor:
        """Keys per block at ``cache_seqlens``: int64 ``[B, NB]``."""
        first = torch.arange(self.num_blocks, device=cache_seqlens.device) * self.block_size
        return (cache_seqlens.to(torch.int64)[:, None] - first).clamp(0, self.block_size)

    def check(self, k_cache, cache_seqlens, block_table, *, check_lengths: bool = True) -> None:
        """Raise ValueError unless these summaries describe ``k_cache`` (same storage, shape, dtype,
        block table) at ``cache_seqlens`` (with ``check_lengths``; one host synchronization)."""
        if not isinstance(k_cache, torch.Tensor) or _identity(k_cache) != self._identity:
            raise ValueError(
                "these summaries were built for another k_cache (storage, shape, dtype or device differ); "
                "build them for this cache with op.summaries(k_cache, cache_seqlens, block_table)"
            )
        if block_table is not None and block_table is not self.block_table:
            raise ValueError("these summaries were built with another block_table (or none); rebuild them")
        if check_lengths and [int(n) for n in cache_seqlens.tolist()] != self.seqlens:
            raise ValueError(
                f"the summaries are stale: built at cache_seqlens={self.seqlens}, called with "
                f"{cache_seqlens.tolist()}; call s.update(k_cache, cache_seqlens) after appending tokens"
            )

    def __repr__(self) -> str:
        B, H, NB, D = self.lo.shape
        return f"<KeySummaries B={B} Hkv={H} blocks={NB}x{self.block_size} D={D} on {self.lo.device}>"


def _identity(k_cache: torch.Tensor) -> tuple:
    return (k_cache.data_ptr(), tuple(k_cache.shape), tuple(k_cache.stride()), k_cache.dtype, k_cache.device)


def _check_cache(k_cache, cache_seqlens, block_table, block_size) -> None:
    if not isinstance(k_cache, torch.Tensor) or k_cache.dim() != 4 or not k_cache.is_floating_point():
        raise TypeError("k_cache must be a floating 4-d tensor [B, S_max, Hkv, D] (or paged [pages, page, Hkv, D])")
    if not isinstance(cache_seqlens, torch.Tensor) or cache_seqlens.dim() != 1 or cache_seqlens.is_floating_point():
        raise TypeError("cache_seqlens must be a 1-d integer tensor [B]")
    if cache_seqlens.device != k_cache.device:
        raise ValueError(f"cache_seqlens must be on {k_cache.device}, got {cache_seqlens.device}")
    if (
        isinstance(block_size, bool)
        or not isinstance(block_size, int)
        or block_size < 16
        or block_size & (block_size - 1)
    ):
        raise ValueError(f"block_size must be a power of two >= 16, got {block_size!r}")
    if block_table is None:
        if k_cache.shape[0] != cache_seqlens.shape[0]:
            raise ValueError(f"k_cache has batch {k_cache.shape[0]} but cache_seqlens has {cache_seqlens.shape[0]}")
        return
    if not isinstance(block_table, torch.Tensor) or block_table.dim() != 2 or block_table.is_floating_point():
        raise TypeError("block_table must be a 2-d integer tensor [B, max_pages]")
    if block_table.shape[0] != cache_seqlens.shape[0] or block_table.device != k_cache.device:
        raise ValueError(f"block_table must be [B={cache_seqlens.shape[0]}, max_pages] on {k_cache.device}")
