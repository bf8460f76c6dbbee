"""Block layouts: which (q-tile, kv-tile) pairs are visible, and which of them are full.

The only place that decides which tiles exist. The work is analytic and O(nnz):

1. *candidates* -- the expression enumerates key-unit intervals it may touch for each q-tile's
   range of query units (:meth:`~spdsl.core.ir.Expr.candidates`), turned into candidate tiles;
2. *classify* -- every candidate tile is a token rectangle that :func:`~spdsl.core.refine.refine`
   decides exactly: any element visible, every element visible.

No N x N or (N/tile) x (N/tile) array is ever built, and the number of candidate tiles is
estimated (on a sample of q-tiles) before anything is allocated: above the ``tiles`` limit the
layout is refused (:mod:`spdsl.core.limits`). Torch and :mod:`spdsl.core` only: generated modules
embed this file (tree-shaken).
"""

from __future__ import annotations

import torch

from .ir import PatternIR, TorchOps, resolve_q_offset
from .limits import require
from .refine import refine

_I64 = torch.int64
_SAMPLE_ROWS = 64  # q-tiles whose candidates estimate the whole layout's


def check_sizes(q_len: int, kv_len: int, block_q: int, block_kv: int) -> None:
    """Lengths are ints >= 0, tiles ints >= 1 (ValueError otherwise)."""
    sizes = {"q_len": (q_len, 0), "kv_len": (kv_len, 0), "block_q": (block_q, 1), "block_kv": (block_kv, 1)}
    for name, (v, least) in sizes.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < least:
            raise ValueError(f"{name} must be an integer >= {least}, got {v!r}")


def _q_tiles(ir: PatternIR, i, q_len: int, kv_len: int, block_q: int, q_offset: int):
    """Token bounds (p0, p1) of q-tiles ``i`` and the last key unit each may see (-1: none)."""
    p0 = q_offset + i * block_q
    p1 = q_offset + torch.clamp((i + 1) * block_q, max=q_len) - 1
    kcap = torch.minimum(p1, torch.full_like(p1, kv_len - 1)) if ir.causal else torch.full_like(p1, kv_len - 1)
    return p0, p1, torch.where(kcap >= 0, kcap // ir.unit, -1)


def _tile_spans(ir: PatternIR, i, q_len: int, kv_len: int, block_q: int, block_kv: int, q_offset: int):
    """(row, first tile, last tile) of the candidate key intervals of q-tiles ``i``."""
    N = ir.unit
    p0, p1, kcap = _q_tiles(ir, i, q_len, kv_len, block_q, q_offset)
    lo, hi = torch.broadcast_tensors(*ir.expr.candidates(p0 // N, p1 // N, (kv_len - 1) // N, block_kv // N))
    row = i[:, None].expand_as(lo).reshape(-1)
    lo, hi = lo.reshape(-1).clamp(min=0), torch.minimum(hi.reshape(-1), kcap.repeat_interleave(lo.shape[1]))
    ok = hi >= lo
    row, lo, hi = row[ok], lo[ok], hi[ok]
    return row, (lo * N) // block_kv, torch.clamp((hi + 1) * N - 1, max=kv_len - 1) // block_kv


def build_csr(ir: PatternIR, q_len: int, kv_len: int, block_q: int, block_kv: int, q_offset: int):
    """(kv_ptr int32 [n_q_tiles+1], kv_idx int32 [nnz], kv_full bool [nnz]): the q-major tile CSR.

    Raises SpdError when the candidate tiles (estimated on a sample of q-tiles first, then
    counted) exceed the ``tiles`` limit.
    """
    check_sizes(q_len, kv_len, block_q, block_kv)
    nq, nk = -(-q_len // block_q), -(-kv_len // block_kv)
    if nq == 0 or nk == 0:
        empty = torch.zeros(0, dtype=torch.int32)
        return torch.zeros(nq + 1, dtype=torch.int32), empty, empty.bool()
    geometry = (q_len, kv_len, block_q, block_kv, q_offset)
    task = f"the layout of {ir.name} for q_len={q_len:,}, kv_len={kv_len:,} ({block_q}x{block_kv} tiles)"
    hint = "use shorter lengths or larger tiles"
    sample = torch.unique(torch.linspace(0, nq - 1, min(nq, _SAMPLE_ROWS), dtype=torch.float64).round().to(_I64))
    _, t_lo, t_hi = _tile_spans(ir, sample, *geometry)
    require("tiles", max(int((t_hi - t_lo + 1).sum()), t_lo.numel()) * nq / sample.numel(), task, hint)
    row, t_lo, t_hi = _tile_spans(ir, torch.arange(nq, dtype=_I64), *geometry)
    count = t_hi - t_lo + 1
    require("tiles", int(count.sum()), task, hint)
    start = torch.repeat_interleave(row * nk + t_lo, count)
    step = torch.arange(int(count.sum()), dtype=_I64) - torch.repeat_interleave(torch.cumsum(count, 0) - count, count)
    keys = torch.unique(start + step)
    row, tile = keys // nk, keys % nk
    seen, full = _decide(ir, row, tile, *geometry)
    return _pack(row[seen], tile[seen], full[seen], nq)


def _decide(ir: PatternIR, row, tile, q_len: int, kv_len: int, block_q: int, block_kv: int, q_offset: int):
    """(seen, full) of tiles (row, tile): some key visible / every in-range key visible (exact)."""
    p0, p1, _ = _q_tiles(ir, row, q_len, kv_len, block_q, q_offset)
    k0 = tile * block_kv
    k1 = torch.clamp(k0 + block_kv, max=kv_len) - 1
    seen = torch.zeros(row.numel(), dtype=torch.bool)
    hidden = torch.zeros(row.numel(), dtype=torch.bool)
    for r in refine(ir, p0, p1, k0, k1, causal=ir.causal, live=lambda r: ~(seen[r.origin] & hidden[r.origin])):
        seen[r.origin[r.proven & r.any]] = True
        hidden[r.origin[r.proven & ~r.all]] = True
    return seen, ~hidden


def _pack(row, tile, full, nq: int):
    kv_ptr = torch.zeros(nq + 1, dtype=_I64)
    kv_ptr[1:] = torch.cumsum(torch.bincount(row, minlength=nq), 0)
    return kv_ptr.to(torch.int32), tile.to(torch.int32), full


def restrict_csr(ir: PatternIR, csr, length: int, block_q: int, block_kv: int):
    """The tile CSR of a square prefill (``q_len = kv_len = length``, ``q_offset`` 0) from ``csr``, the
    one of a longer square: positions are absolute, so the shorter square's tiles are the longer
    one's inside it, the same except the tiles its end cuts, which are decided again. O(nnz).
    """
    kv_ptr, kv_idx, kv_full = csr
    nq, nk = -(-length // block_q), -(-length // block_kv)
    counts = (kv_ptr[1 : nq + 1] - kv_ptr[:nq]).long()
    row = torch.repeat_interleave(torch.arange(nq, dtype=_I64), counts)
    n = row.numel()
    tile, full = kv_idx[:n].long(), kv_full[:n].clone()
    inside = tile < nk
    row, tile, full = row[inside], tile[inside], full[inside]
    cut = ((row == nq - 1) & (length % block_q != 0)) | ((tile == nk - 1) & (length % block_kv != 0))
    if bool(cut.any()):
        seen, full[cut] = _decide(ir, row[cut], tile[cut], length, length, block_q, block_kv, 0)
        keep = torch.ones_like(cut)
        keep[cut] = seen
        row, tile, full = row[keep], tile[keep], full[keep]
    return _pack(row, tile, full, nq)


def transpose_csr(kv_ptr: torch.Tensor, kv_idx: torch.Tensor, kv_full: torch.Tensor, n_kv_tiles: int):
    """The kv-major CSR of a q-major one: for each kv tile, the q tiles that see it (sorted), full flags.

    ``(q_ptr int32 [n_kv_tiles+1], q_idx int32 [nnz], q_full bool [nnz])``, O(nnz).
    """
    n_q = kv_ptr.numel() - 1
    rows = torch.repeat_interleave(torch.arange(n_q, dtype=_I64), (kv_ptr[1:] - kv_ptr[:-1]).long())
    order = torch.argsort(kv_idx.long(), stable=True)  # rows stay sorted inside each kv tile
    q_ptr = torch.zeros(n_kv_tiles + 1, dtype=_I64)
    q_ptr[1:] = torch.cumsum(torch.bincount(kv_idx.long(), minlength=n_kv_tiles), 0)
    return q_ptr.to(torch.int32), rows[order].to(torch.int32), kv_full[order]


def dense_mask(ir: PatternIR, q_len: int, kv_len: int, q_offset: int | None = None) -> torch.Tensor:
    """Token-level truth, bool [q_len, kv_len]. O(q_len * kv_len): tests and small sizes only.

    Raises SpdError above the ``dense`` limit (elements).
    """
    check_sizes(q_len, kv_len, 1, 1)
    q_offset = resolve_q_offset(q_offset, q_len, kv_len)
    require(
        "dense", q_len * kv_len, f"a dense mask of {q_len:,} x {kv_len:,}", "use Pattern.layout(...) for long sequences"
    )
    p = q_offset + torch.arange(q_len, dtype=_I64)[:, None]
    k = torch.arange(kv_len, dtype=_I64)[None, :]
    # evaluate once per (query unit, key unit) and expand: units repeat `unit` times
    uq, q_of = torch.unique(p[:, 0] // ir.unit, return_inverse=True)
    uk, k_of = torch.unique(k[0] // ir.unit, return_inverse=True)
    per_unit = torch.as_tensor(ir.expr.keep(TorchOps, uq[:, None], uk[None, :])).expand(uq.numel(), uk.numel())
    mask = per_unit[q_of][:, k_of]
    if ir.causal:
        mask = mask & (k <= p)
    return mask.contiguous()


class Layout:
    """CSR over q-tiles: ``kv_idx[kv_ptr[i]:kv_ptr[i+1]]`` are q-tile i's visible kv tiles, sorted;
    ``kv_full`` marks tiles whose every in-range element is visible (the kernel skips the mask).

    >>> from spdsl.core.ir import PatternIR
    >>> from spdsl.core.primitives import Local
    >>> lay = Layout(PatternIR("w", 1, True, Local(64)), 256, 256, 64, 64)
    >>> lay.kv_ptr.tolist(), lay.kv_idx.tolist(), lay.kv_full.tolist()
    ([0, 1, 3, 5, 7], [0, 0, 1, 1, 2, 2, 3], [False, False, False, False, False, False, False])
    """

    def __init__(
        self,
        ir: PatternIR,
        q_len: int,
        kv_len: int,
        block_q: int = 128,
        block_kv: int = 128,
        q_offset: int | None = None,
    ):
        check_sizes(q_len, kv_len, block_q, block_kv)
        self.ir = ir
        self.q_len, self.kv_len, self.block_q, self.block_kv = q_len, kv_len, block_q, block_kv
        self.q_offset = resolve_q_offset(q_offset, q_len, kv_len)
        self.kv_ptr, self.kv_idx, self.kv_full = build_csr(ir, q_len, kv_len, block_q, block_kv, self.q_offset)

    @property
    def n_q_tiles(self) -> int:
        return self.kv_ptr.numel() - 1

    @property
    def n_kv_tiles(self) -> int:
        return -(-self.kv_len // self.block_kv)

    @property
    def nnz(self) -> int:
        return self.kv_idx.numel()

    @property
    def n_full(self) -> int:
        return int(self.kv_full.sum())

    def counts(self) -> torch.Tensor:
        """Visible kv tiles per q-tile, int64 [n_q_tiles]."""
        return (self.kv_ptr[1:] - self.kv_ptr[:-1]).long()

    def kv_major(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(q_ptr, q_idx, q_full)``: for each kv tile the q tiles that see it, sorted (a backward's order)."""
        return transpose_csr(self.kv_ptr, self.kv_idx, self.kv_full, self.n_kv_tiles)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.kv_ptr, self.kv_idx, self.kv_full))

    def row(self, i: int) -> tuple[list[int], list[bool]]:
        a, b = int(self.kv_ptr[i]), int(self.kv_ptr[i + 1])
        return self.kv_idx[a:b].tolist(), self.kv_full[a:b].tolist()

    def tile_grid(self) -> torch.Tensor:
        """int8 [n_q_tiles, n_kv_tiles]: 0 empty, 1 partial, 2 full. Small layouts only."""
        require(
            "dense",
            self.n_q_tiles * self.n_kv_tiles,
            f"a tile grid of {self.n_q_tiles:,} x {self.n_kv_tiles:,}",
            "walk the CSR (kv_ptr, kv_idx) instead",
        )
        grid = torch.zeros(self.n_q_tiles, self.n_kv_tiles, dtype=torch.int8)
        rows = torch.repeat_interleave(torch.arange(self.n_q_tiles), self.counts())
        grid[rows, self.kv_idx.long()] = 1 + self.kv_full.to(torch.int8)
        return grid

    def __repr__(self) -> str:
        return (
            f"Layout({self.ir.name}, q_len={self.q_len}, kv_len={self.kv_len}, block={self.block_q}x{self.block_kv}, "
            f"q_offset={self.q_offset}, nnz={self.nnz}, full={self.n_full})"
        )
