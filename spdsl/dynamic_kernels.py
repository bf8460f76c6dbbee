"""Triton kernels of the certified decode (issue 12): the block bound and the decode over a list
of chosen blocks per (sequence, KV head), split-K with a log-sum-exp merge.

Hand-written (they depend on no pattern: the pattern enters through the host's candidate mask and
block lists, :mod:`spdsl.dynamic`). Triton fixes interpreted-or-compiled when a kernel is
decorated, so the kernels are decorated on first use, once per ``TRITON_INTERPRET`` mode
(:func:`_kernels`): importing this module in one mode does not fix the other.

Rows of one KV head are its query heads x queries, row ``r = g * Sq + j`` (as :mod:`spdsl.dynamic`).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from .dynamic import Backend, block_lists, merge_parts
from .summaries import rounding_margin

__all__ = ["TRITON", "bound_triton", "run_blocks_triton"]

_LN2 = 0.6931471805599453


@functools.cache
def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _bound_kernel(
    Q, LO, HI, RADIUS, U, R, NB,
    stride_qb, stride_qh, stride_qr, stride_sb, stride_sh, stride_st, stride_rb, stride_rh,
    stride_ub, stride_uh, stride_ur, margin,
    HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr, BALL: tl.constexpr,
):  # fmt: skip
    # U[b, h, r, t] = min(q+ . hi + q- . lo, q . mid + |q| radius) + margin * (|q| . max(|lo|, |hi|) + |q| radius)
    # for one chunk of blocks t (the ball term only with BALL)
    pid_t = tl.program_id(0)
    off_h = tl.program_id(1).to(tl.int64)
    off_b = tl.program_id(2).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, HEAD_DIM)
    r_ok, t_ok = offs_r < R, offs_t < NB
    q_ptrs = Q + off_b * stride_qb + off_h * stride_qh + offs_r[:, None] * stride_qr + offs_d[None, :]
    q = tl.load(q_ptrs, mask=r_ok[:, None], other=0.0).to(tl.float32)
    s_off = off_b * stride_sb + off_h * stride_sh + offs_t[:, None].to(tl.int64) * stride_st + offs_d[None, :]
    lo = tl.load(LO + s_off, mask=t_ok[:, None], other=0.0)
    hi = tl.load(HI + s_off, mask=t_ok[:, None], other=0.0)
    u = tl.dot(tl.maximum(q, 0.0), tl.trans(hi), input_precision="ieee")
    u = tl.dot(tl.minimum(q, 0.0), tl.trans(lo), u, input_precision="ieee")
    size = tl.dot(tl.abs(q), tl.trans(tl.maximum(tl.abs(lo), tl.abs(hi))), input_precision="ieee")
    if BALL:
        r_ptrs = RADIUS + off_b * stride_rb + off_h * stride_rh + offs_t
        reach = tl.sqrt(tl.sum(q * q, 1))[:, None] * tl.load(r_ptrs, mask=t_ok, other=0.0)[None, :]
        mid = 0.5 * (tl.dot(q, tl.trans(lo), input_precision="ieee") + tl.dot(q, tl.trans(hi), input_precision="ieee"))
        u = tl.minimum(u, mid + reach)
        size = size + reach
    u = u + margin * size
    u_ptrs = U + off_b * stride_ub + off_h * stride_uh + offs_r[:, None] * stride_ur + offs_t[None, :]
    tl.store(u_ptrs, u, mask=r_ok[:, None] & t_ok[None, :])


@functools.cache
def _decorated(interpret: bool):
    """``(bound kernel, blocks kernel)`` jit-decorated in the current mode (the argument keys the cache)."""
    return triton.jit(_bound_kernel), triton.jit(_blocks_kernel)


def _kernels():
    return _decorated(os.environ.get("TRITON_INTERPRET") == "1")


def bound_triton(
    rows: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, radius: torch.Tensor | None = None
) -> torch.Tensor:
    """:func:`spdsl.summaries.box_bound` as a Triton kernel.

    Parameters
    ----------
    rows: ``[B, Hkv, R, D]``; lo, hi: ``[B, Hkv, NB, D]`` float32; radius: ``[B, Hkv, NB]`` or None.

    Returns
    -------
    float32 ``[B, Hkv, R, NB]``.
    """
    B, Hkv, R, D = rows.shape
    NB = lo.shape[2]
    rows = rows.contiguous()
    u = torch.empty((B, Hkv, R, NB), dtype=torch.float32, device=rows.device)
    block_t = 64 if NB >= 64 else max(16, _pow2(NB))
    rad = radius if radius is not None else u
    _kernels()[0][(triton.cdiv(NB, block_t), Hkv, B)](
        rows, lo, hi, rad, u, R, NB, *rows.stride()[:3], *lo.stride()[:3], *rad.stride()[:2], *u.stride()[:3],
        rounding_margin(D),
        HEAD_DIM=D, BLOCK_R=max(16, _pow2(R)), BLOCK_T=block_t, BALL=radius is not None, num_warps=4,
    )  # fmt: skip
    return u


def _blocks_kernel(
    Q, K, V, MASK, LIST, COUNT, SEQLENS, BLOCK_TABLE, OPART, LPART,
    stride_qb, stride_qh, stride_qr, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_mb, stride_mj, stride_bt,
    R, Sq, LIST_LEN, scale, bias,
    ALPHA: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    NSPLIT: tl.constexpr, PAGED: tl.constexpr, PAGE: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    # one program per (split, kv head, sequence): list entries split, split + NSPLIT, ...
    # log-weights in base 2: softmax scale * qk * log2(e); ReLU^ALPHA ALPHA * log2(relu(scale * qk - bias))
    split = tl.program_id(0)
    off_h = tl.program_id(1)
    off_b = tl.program_id(2)
    prog = off_b * tl.num_programs(1) + off_h
    seqlen = tl.load(SEQLENS + off_b)
    n = tl.load(COUNT + prog)
    offs_r = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_r < R
    row_j = offs_r % Sq
    q_ptrs = Q + off_b.to(tl.int64) * stride_qb + off_h * stride_qh + offs_r[:, None] * stride_qr + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for i in range(split, n, NSPLIT):
        tile = tl.load(LIST + prog.to(tl.int64) * LIST_LEN + i)
        kpos = tile * BLOCK_N + offs_n
        kv_ok = kpos < seqlen
        if PAGED:
            page = tl.load(BLOCK_TABLE + off_b.to(tl.int64) * stride_bt + kpos // PAGE, mask=kv_ok, other=0)
            k_rows = page.to(tl.int64) * PAGE + kpos % PAGE
            k_ptrs = K + k_rows[:, None] * stride_ks + off_h * stride_kh + offs_d[None, :]
            v_ptrs = V + k_rows[:, None] * stride_vs + off_h * stride_vh + offs_d[None, :]
        else:
            k_base = off_b.to(tl.int64) * stride_kb + kpos[:, None].to(tl.int64) * stride_ks + off_h * stride_kh
            v_base = off_b.to(tl.int64) * stride_vb + kpos[:, None].to(tl.int64) * stride_vs + off_h * stride_vh
            k_ptrs = K + k_base + offs_d[None, :]
            v_ptrs = V + v_base + offs_d[None, :]
        k = tl.load(k_ptrs, mask=kv_ok[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=kv_ok[:, None], other=0.0)
        m_ptrs = MASK + off_b.to(tl.int64) * stride_mb + row_j[:, None] * stride_mj + kpos[None, :]
        vis = tl.load(m_ptrs, mask=row_ok[:, None] & kv_ok[None, :], other=0) != 0
        qk = tl.dot(q, tl.trans(k), input_precision="ieee" if IEEE else None)
        if ALPHA == 0:
            s = qk * (scale * 1.4426950408889634)
        else:
            x = qk * scale - bias
            s = tl.where(x > 0.0, ALPHA * tl.math.log2(tl.maximum(x, 1e-37)), float("-inf"))
        s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        corr = tl.math.exp2(m_i - m_safe)
        l_i = l_i * corr + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * corr[:, None], input_precision="ieee" if IEEE else None)
        m_i = m_new
    empty = l_i == 0.0
    lse2 = tl.where(empty, float("-inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
    acc = acc / tl.where(empty, 1.0, l_i)[:, None]
    part = (prog * NSPLIT + split).to(tl.int64) * BLOCK_M
    tl.store(OPART + (part + offs_r)[:, None] * HEAD_DIM + offs_d[None, :], acc)
    tl.store(LPART + part + offs_r, lse2)


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _splits(device: torch.device, programs: int, width: int) -> int:
    """Splits per (sequence, KV head): enough programs for two waves of the GPU (2 on the interpreter)."""
    if device.type != "cuda":
        return min(2, width)
    sms = _sm_count(device)
    return 1 if programs >= 2 * sms else max(1, min(-(-2 * sms // programs), width, 32))


def run_blocks_triton(
    rows: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor | None,
    chosen: torch.Tensor,
    cand_tok: torch.Tensor,
    seqlens: torch.Tensor,
    Sq: int,
    scale: float,
    bias: float,
    score: tuple[str, int] | None,
    bs: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`spdsl.dynamic.run_blocks_torch` as a Triton kernel (same parameters).

    Returns
    -------
    ``(o [B, Hkv, R, D], lse [B, Hkv, R])`` float32: the splits of each (sequence, KV head)
    merged by their log-sum-exp.
    """
    B, Hkv, R, D = rows.shape
    lists, counts = block_lists(chosen, chosen.shape[-1])  # every block's width: no host synchronization
    nsplit = _splits(rows.device, B * Hkv, lists.shape[-1])
    block_m = max(16, _pow2(R))
    rows = rows.contiguous()
    mask = cand_tok.to(torch.uint8).contiguous()
    opart = torch.empty((B, Hkv, nsplit, block_m, D), dtype=torch.float32, device=rows.device)
    lpart = torch.empty((B, Hkv, nsplit, block_m), dtype=torch.float32, device=rows.device)
    paged = block_table is not None
    bt = block_table if paged else seqlens
    _kernels()[1][(nsplit, Hkv, B)](
        rows, k_cache, v_cache, mask, lists, counts, seqlens, bt, opart, lpart,
        *rows.stride()[:3], *k_cache.stride()[:3], *v_cache.stride()[:3], *mask.stride()[:2], bt.stride(0),
        R, Sq, lists.shape[-1], scale, float(bias),
        ALPHA=0 if score is None else int(score[1]), HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=bs, NSPLIT=nsplit,
        PAGED=paged, PAGE=k_cache.shape[1] if paged else 1, IEEE=rows.dtype == torch.float32,
        num_warps=4, num_stages=2,
    )  # fmt: skip
    return merge_parts(opart[..., :R, :], lpart[..., :R] * _LN2, 2)  # lpart: log2 -> natural log


#: CUDA (or the interpreter) backend of :func:`spdsl.dynamic.decode`.
TRITON = Backend(bound_triton, run_blocks_triton)
