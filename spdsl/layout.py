"""Block layouts: which (q-tile, kv-tile) pairs are visible, and which of them are full.

This is the only module that decides which tiles exist. The work is analytic and O(nnz):

1. *candidates* -- each primitive enumerates the key-unit intervals it may touch for a q-tile's
   range of query units; set operations combine the candidate tile sets;
2. *classify* -- every candidate tile is a token rectangle; the IR says exactly, or refines by
   halving the rectangle at unit boundaries until it can say, whether any / all of it is kept.

No N x N or (N/tile) x (N/tile) array is ever built. Imports only torch and :mod:`spdsl.ir`
(its source is embedded in standalone generated modules).
"""

from __future__ import annotations

import torch

from .ir import Expr, Inter, PatternIR, Primitive, TorchOps, Union, classify, keep

_I64 = torch.int64


def _check_sizes(q_len: int, kv_len: int, block_q: int, block_kv: int) -> None:
    for name, v, least in (
        ("q_len", q_len, 0),
        ("kv_len", kv_len, 0),
        ("block_q", block_q, 1),
        ("block_kv", block_kv, 1),
    ):
        if not isinstance(v, int) or isinstance(v, bool) or v < least:
            raise ValueError(f"{name} must be an integer >= {least}, got {v!r}")


def _candidate_keys(expr: Expr, rows: dict, geo: dict) -> torch.Tensor:
    """Sorted unique keys (row * n_kv_tiles + kv_tile) of tiles the expression may touch."""
    if isinstance(expr, Primitive):
        lo, hi = expr.candidates(rows["Qa"], rows["Qb"], geo["kmax"], geo["span"])
        return _intervals_to_keys(lo, hi, rows, geo)
    keys = [_candidate_keys(p, rows, geo) for p in expr.parts]
    if isinstance(expr, Union):
        return torch.unique(torch.cat(keys))
    if isinstance(expr, Inter):
        out = min(keys, key=len)
        for k in keys:
            out = out[torch.isin(out, k)]
        return out
    return keys[0]  # Diff: a subset of its left operand


def _intervals_to_keys(lo: torch.Tensor, hi: torch.Tensor, rows: dict, geo: dict) -> torch.Tensor:
    N, bkv, kv_len, nk = geo["unit"], geo["block_kv"], geo["kv_len"], geo["n_kv_tiles"]
    row = torch.arange(lo.shape[0], dtype=_I64)[:, None].expand_as(lo).reshape(-1)
    lo, hi = lo.reshape(-1).clamp(min=0), torch.minimum(hi.reshape(-1), rows["Kcap"][row])
    ok = hi >= lo
    row, lo, hi = row[ok], lo[ok], hi[ok]
    t_lo = (lo * N) // bkv
    t_hi = torch.clamp((hi + 1) * N - 1, max=kv_len - 1) // bkv
    count = t_hi - t_lo + 1
    if count.numel() == 0:
        return torch.empty(0, dtype=_I64)
    start = torch.repeat_interleave(row * nk + t_lo, count)
    step = torch.arange(int(count.sum()), dtype=_I64) - torch.repeat_interleave(torch.cumsum(count, 0) - count, count)
    return torch.unique(start + step)


def _classify_tiles(ir: PatternIR, p0, p1, k0, k1):
    """Exact (any kept, some hidden) per token rectangle, refining unproven ones."""
    N = ir.unit
    n = p0.numel()
    seen = torch.zeros(n, dtype=torch.bool)
    hidden = torch.zeros(n, dtype=torch.bool)
    idx = torch.arange(n, dtype=_I64)
    while idx.numel():
        Qa, Qb, Ka, Kb = p0 // N, p1 // N, k0 // N, k1 // N
        any_, all_, proven = classify(ir.expr, TorchOps, Qa, Qb, Ka, Kb)
        if ir.causal:  # intersect with the token-level cut k <= q, which is always exact
            c_any, c_all = k0 <= p1, k1 <= p0
            mixed_ok = (~all_ & c_all & proven) | (all_ & ~c_all)
            any_, all_ = any_ & c_any, all_ & c_all
            proven = all_ | ~any_ | mixed_ok
        seen[idx[proven & any_]] = True
        hidden[idx[proven & ~all_]] = True
        todo = ~proven & ~(seen[idx] & hidden[idx])
        if not bool(todo.any()):
            break
        idx, p0, p1, k0, k1 = idx[todo], p0[todo], p1[todo], k0[todo], k1[todo]
        Qa, Qb, Ka, Kb = Qa[todo], Qb[todo], Ka[todo], Kb[todo]
        if bool(((Qa == Qb) & (Ka == Kb)).any()):  # a single unit cell is always decided
            raise AssertionError("layout refinement failed to decide a unit cell")
        split_q = (Qb - Qa) >= (Kb - Ka)
        q_mid = (Qa + (Qb - Qa + 1) // 2) * N
        k_mid = (Ka + (Kb - Ka + 1) // 2) * N
        idx = torch.cat([idx, idx])
        p0, p1 = torch.cat([p0, torch.where(split_q, q_mid, p0)]), torch.cat([torch.where(split_q, q_mid - 1, p1), p1])
        k0, k1 = torch.cat([k0, torch.where(split_q, k0, k_mid)]), torch.cat([torch.where(split_q, k1, k_mid - 1), k1])
    return seen, hidden


def build_csr(ir: PatternIR, q_len: int, kv_len: int, block_q: int, block_kv: int, q_offset: int):
    """(kv_ptr int32 [n_q_tiles+1], kv_idx int32 [nnz], kv_full bool [nnz])."""
    _check_sizes(q_len, kv_len, block_q, block_kv)
    N = ir.unit
    nq, nk = -(-q_len // block_q), -(-kv_len // block_kv)
    if nq == 0 or nk == 0:
        empty = torch.zeros(0, dtype=torch.int32)
        return torch.zeros(nq + 1, dtype=torch.int32), empty, empty.bool()
    i0 = torch.arange(nq, dtype=_I64) * block_q
    p0 = q_offset + i0
    p1 = q_offset + torch.clamp(i0 + block_q, max=q_len) - 1
    kcap = torch.full_like(p0, kv_len - 1)
    if ir.causal:
        kcap = torch.minimum(kcap, p1)
    rows = {"Qa": p0 // N, "Qb": p1 // N, "Kcap": torch.where(kcap >= 0, kcap // N, -1)}
    geo = {
        "unit": N,
        "block_kv": block_kv,
        "kv_len": kv_len,
        "n_kv_tiles": nk,
        "kmax": (kv_len - 1) // N,
        "span": block_kv // N,
    }
    keys = _candidate_keys(ir.expr, rows, geo)
    row, tile = keys // nk, keys % nk
    k0 = tile * block_kv
    k1 = torch.clamp(k0 + block_kv, max=kv_len) - 1
    seen, hidden = _classify_tiles(ir, p0[row], p1[row], k0, k1)
    row, tile, full = row[seen], tile[seen], ~hidden[seen]
    kv_ptr = torch.zeros(nq + 1, dtype=_I64)
    kv_ptr[1:] = torch.cumsum(torch.bincount(row, minlength=nq), 0)
    return kv_ptr.to(torch.int32), tile.to(torch.int32), full


def dense_mask(ir: PatternIR, q_len: int, kv_len: int, q_offset: int) -> torch.Tensor:
    """Token-level truth, bool [q_len, kv_len]. O(q_len * kv_len): tests and small sizes only."""
    _check_sizes(q_len, kv_len, 1, 1)
    p = q_offset + torch.arange(q_len, dtype=_I64)[:, None]
    k = torch.arange(kv_len, dtype=_I64)[None, :]
    # evaluate once per (query unit, key unit) and expand: units repeat `unit` times
    uq, q_of = torch.unique(p[:, 0] // ir.unit, return_inverse=True)
    uk, k_of = torch.unique(k[0] // ir.unit, return_inverse=True)
    per_unit = keep(ir.expr, TorchOps, uq[:, None], uk[None, :]).expand(uq.numel(), uk.numel())
    mask = per_unit[q_of][:, k_of]
    if ir.causal:
        mask = mask & (k <= p)
    return mask.contiguous()


class Layout:
    """CSR over q-tiles: ``kv_idx[kv_ptr[i]:kv_ptr[i+1]]`` are q-tile i's visible kv tiles, sorted;
    ``kv_full`` marks tiles whose every in-range element is visible (the kernel skips the mask)."""

    def __init__(
        self,
        ir: PatternIR,
        q_len: int,
        kv_len: int,
        block_q: int = 128,
        block_kv: int = 128,
        q_offset: int | None = None,
    ):
        self.ir = ir
        self.q_len, self.kv_len, self.block_q, self.block_kv = q_len, kv_len, block_q, block_kv
        self.q_offset = kv_len - q_len if q_offset is None else int(q_offset)
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

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.kv_ptr, self.kv_idx, self.kv_full))

    def row(self, i: int) -> tuple[list[int], list[bool]]:
        a, b = int(self.kv_ptr[i]), int(self.kv_ptr[i + 1])
        return self.kv_idx[a:b].tolist(), self.kv_full[a:b].tolist()

    def tile_grid(self) -> torch.Tensor:
        """int8 [n_q_tiles, n_kv_tiles]: 0 empty, 1 partial, 2 full. Small layouts only."""
        grid = torch.zeros(self.n_q_tiles, self.n_kv_tiles, dtype=torch.int8)
        rows = torch.repeat_interleave(torch.arange(self.n_q_tiles), self.counts())
        grid[rows, self.kv_idx.long()] = 1 + self.kv_full.to(torch.int8)
        return grid

    def mask_mod(self):
        """FlexAttention mask_mod for this pattern (q_idx is the row, offset applied)."""
        ir, off = self.ir, self.q_offset

        def mask_mod(b, h, q_idx, kv_idx):
            p = q_idx + off
            m = keep(ir.expr, TorchOps, p // ir.unit, kv_idx // ir.unit)
            return (m & (kv_idx <= p)) if ir.causal else m

        return mask_mod

    def to_block_mask(self, device: str | torch.device = "cpu"):
        """torch FlexAttention BlockMask with exactly this pattern (partial and full blocks)."""
        from torch.nn.attention.flex_attention import BlockMask

        nq, nk = self.n_q_tiles, self.n_kv_tiles
        rows = torch.repeat_interleave(torch.arange(nq), self.counts())
        width = max(nk, 1)

        def pack(sel: torch.Tensor):
            r, t = rows[sel], self.kv_idx[sel].long()
            num = torch.bincount(r, minlength=nq).to(torch.int32)
            start = torch.cumsum(num.long(), 0) - num.long()
            col = torch.arange(r.numel()) - torch.repeat_interleave(start, num.long())
            idx = torch.zeros(nq, width, dtype=torch.int32)
            idx[r, col] = t.to(torch.int32)
            return num[None, None].to(device), idx[None, None].to(device)

        partial_num, partial_idx = pack(~self.kv_full)
        full_num, full_idx = pack(self.kv_full)
        return BlockMask.from_kv_blocks(
            partial_num,
            partial_idx,
            full_num,
            full_idx,
            BLOCK_SIZE=(self.block_q, self.block_kv),
            mask_mod=self.mask_mod(),
            seq_lengths=(self.q_len, self.kv_len),
        )

    def __repr__(self) -> str:
        return (
            f"Layout({self.ir.name}, q_len={self.q_len}, kv_len={self.kv_len}, block={self.block_q}x{self.block_kv}, "
            f"q_offset={self.q_offset}, nnz={self.nnz}, full={self.n_full})"
        )
