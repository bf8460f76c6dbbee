"""Tile CSRs as the padded per-row lists FlexAttention and FA4 take: counts plus left-packed indices."""

from __future__ import annotations

import torch


def padded_rows(rows: torch.Tensor, cols: torch.Tensor, n_rows: int, width: int | None = None):
    """``(num int32 [n_rows], idx int32 [n_rows, width])`` from (row, col) pairs sorted by row.

    Parameters
    ----------
    rows, cols: int tensors [nnz], ``rows`` non-decreasing (a CSR's row of each entry).
    n_rows: the number of rows.
    width: the index tensor's last dimension; None for the longest row (at least 1). O(n_rows * width
        + nnz), never a dense block mask: FlexAttention wants ``width`` = all kv tiles, FA4 accepts
        the compact longest-row width.

    Returns
    -------
    Counts per row and each row's columns packed to the left (the rest 0).
    """
    rows = rows.long()
    num = torch.bincount(rows, minlength=n_rows)
    if width is None:
        width = max(int(num.max()) if n_rows else 0, 1)
    start = torch.cumsum(num, 0) - num
    col = torch.arange(rows.numel()) - torch.repeat_interleave(start, num)
    idx = torch.zeros(n_rows, width, dtype=torch.int32)
    idx[rows, col] = cols.to(torch.int32)
    return num.to(torch.int32), idx


def csr_rows(ptr: torch.Tensor) -> torch.Tensor:
    """The row of each entry of a CSR with row pointers ``ptr`` (int64 [nnz])."""
    return torch.repeat_interleave(torch.arange(ptr.numel() - 1), (ptr[1:] - ptr[:-1]).long())


def split_full(ptr: torch.Tensor, idx: torch.Tensor, full: torch.Tensor, width: int | None = None):
    """``(partial_num, partial_idx, full_num, full_idx)`` of one CSR (see :func:`padded_rows`)."""
    n_rows, rows = ptr.numel() - 1, csr_rows(ptr)
    partial = padded_rows(rows[~full], idx[~full], n_rows, width)
    whole = padded_rows(rows[full], idx[full], n_rows, width)
    return (*partial, *whole)
