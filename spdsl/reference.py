"""Reference attention: the truth the kernels are tested against, and the CPU execution path.

* :func:`attention_dense` -- masked softmax attention in float64 from an explicit bool mask.
* :func:`attention` -- the same from a pattern (the mask comes from :func:`spdsl.layout.dense_mask`).
* :func:`attention_blocked` -- walks a :class:`~spdsl.layout.Layout` tile by tile with an online
  softmax (fp32 by default), O(nnz) memory: full tiles unmasked, partial tiles masked by the
  pattern's predicate evaluated on that tile's index vectors only. This is the oracle for shapes too
  large for a dense mask, and it checks the layout's full/partial flags along the way.

Conventions everywhere: ``q [B, Hq, Sq, D]``, ``k [B, Hkv, Skv, D]``, ``v [B, Hkv, Skv, Dv]``,
``Hq % Hkv == 0`` and query head ``h`` reads kv head ``h // (Hq // Hkv)`` (GQA); query row ``i`` sits
at absolute position ``q_offset + i``; a row that sees no key returns zeros and LSE ``-inf``
(natural log), never NaN.
"""

from __future__ import annotations

import math

import torch

from .core.checks import check_qkv, resolve_scale
from .core.ir import TorchOps
from .core.layout import Layout, dense_mask
from .pattern import as_ir

__all__ = ["attention", "attention_blocked", "attention_dense", "check_qkv"]

#: attention_blocked handles the kv tiles of one q-tile in chunks of at most this many score
#: elements (B * Hq * block_q * keys), so memory stays bounded even for dense rows.
SCORE_CHUNK_ELEMS = 1 << 22


def attention_dense(q, k, v, mask, *, scale=None, return_lse: bool = False):
    """Masked softmax attention computed in float64; returns float64 ``out [B, Hq, Sq, Dv]``
    (and ``lse [B, Hq, Sq]`` if ``return_lse``).

    ``mask`` is bool ``[Sq, Skv]`` (True = visible), shared by every batch and head; it is moved to
    q's device if needed. Rows with no visible key give zeros and LSE -inf.
    """
    B, Hq, Hkv, Sq, Skv, D, _ = check_qkv(q, k, v)
    sc = resolve_scale(scale, D)
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got dtype {mask.dtype}")
    if tuple(mask.shape) != (Sq, Skv):
        raise ValueError(f"mask must have shape [q_len, kv_len] = [{Sq}, {Skv}], got {tuple(mask.shape)}")
    mask = mask.to(q.device)
    G = Hq // Hkv
    qf = q.to(torch.float64)
    kf = k.to(torch.float64).repeat_interleave(G, dim=1)
    vf = v.to(torch.float64).repeat_interleave(G, dim=1)
    s = torch.matmul(qf, kf.transpose(-1, -2)) * sc
    s = s.masked_fill(~mask, -math.inf)
    if Skv:
        m = s.amax(-1, keepdim=True)
    else:
        m = s.new_full((B, Hq, Sq, 1), -math.inf)
    m = torch.where(torch.isinf(m) & (m < 0), 0.0, m)  # empty rows: exp(-inf - 0) = 0, no NaN
    p = torch.exp(s - m)
    denom = p.sum(-1, keepdim=True)
    out = torch.matmul(p, vf) / torch.where(denom > 0, denom, 1.0)
    if not return_lse:
        return out
    lse = (m + torch.log(denom)).squeeze(-1)  # log(0) = -inf for empty rows
    return out, lse


def attention(pattern_or_ir, q, k, v, *, scale=None, q_offset: int | None = None, return_lse: bool = False):
    """fp64 attention under a pattern: ``attention_dense`` with the pattern's ``dense_mask``.

    ``q_offset`` (default ``kv_len - q_len``) is the absolute position of query row 0.
    """
    ir = as_ir(pattern_or_ir)
    _, _, _, Sq, Skv, _, _ = check_qkv(q, k, v)
    mask = dense_mask(ir, Sq, Skv, q_offset)
    return attention_dense(q, k, v, mask, scale=scale, return_lse=return_lse)


def _tile_tokens(tiles: torch.Tensor, full: torch.Tensor, block: int, length: int):
    """Token indices of the given tiles, in order, clipped at ``length`` (int64), and whether each
    token lies in a full tile."""
    idx = (tiles.to(torch.int64)[:, None] * block + torch.arange(block, dtype=torch.int64)).reshape(-1)
    in_full = full[:, None].expand(-1, block).reshape(-1)
    ok = idx < length
    return idx[ok], in_full[ok]


def attention_blocked(layout: Layout, q, k, v, *, scale=None, return_lse: bool = False, dtype=torch.float32):
    """Attention walking ``layout`` tile by tile with an online softmax in ``dtype``.

    Memory is O(nnz): per q-tile, its kv tiles are gathered in chunks of at most
    :data:`SCORE_CHUNK_ELEMS` score elements. Full tiles are not masked; partial tiles are masked
    by the pattern's predicate (+ causal cut) on their own index vectors. Output dtype = q.dtype.
    """
    if not isinstance(layout, Layout):
        raise TypeError(f"layout must be a spdsl.Layout, got {type(layout).__name__}")
    B, Hq, Hkv, Sq, Skv, D, Dv = check_qkv(q, k, v)
    if (layout.q_len, layout.kv_len) != (Sq, Skv):
        raise ValueError(
            f"layout is for q_len={layout.q_len}, kv_len={layout.kv_len} but q has {Sq} rows and k has {Skv}"
        )
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    sc = resolve_scale(scale, D)
    ir, N, off = layout.ir, layout.ir.unit, layout.q_offset
    bq, bkv = layout.block_q, layout.block_kv
    G = Hq // Hkv
    dev = q.device

    out = torch.zeros(B, Hkv, G, Sq, Dv, dtype=dtype, device=dev)
    lse = torch.full((B, Hkv, G, Sq), -math.inf, dtype=dtype, device=dev)
    qg = q.to(dtype).reshape(B, Hkv, G, Sq, D)
    kd, vd = k.to(dtype), v.to(dtype)
    kv_ptr = layout.kv_ptr.tolist()
    kv_idx, kv_full = layout.kv_idx.to(torch.int64), layout.kv_full
    tiles_per_chunk = max(1, SCORE_CHUNK_ELEMS // max(1, B * Hq * min(bq, max(Sq, 1)) * bkv))

    for i in range(layout.n_q_tiles):
        a, b = kv_ptr[i], kv_ptr[i + 1]
        if a == b:
            continue
        r0, r1 = i * bq, min((i + 1) * bq, Sq)
        pos = torch.arange(r0 + off, r1 + off, dtype=torch.int64)  # absolute query positions
        qt = qg[:, :, :, r0:r1].reshape(B, Hkv, G * (r1 - r0), D)
        m_run = torch.full((B, Hkv, G * (r1 - r0), 1), -math.inf, dtype=dtype, device=dev)
        l_run = torch.zeros_like(m_run)
        acc = torch.zeros(B, Hkv, G * (r1 - r0), Dv, dtype=dtype, device=dev)
        for c in range(a, b, tiles_per_chunk):
            tiles = kv_idx[c : min(b, c + tiles_per_chunk)]
            full = kv_full[c : min(b, c + tiles_per_chunk)]
            keys, in_full = _tile_tokens(tiles, full, bkv, Skv)
            kidx = keys.to(dev)
            s = torch.matmul(qt, kd.index_select(2, kidx).transpose(-1, -2)) * sc  # [B, Hkv, G*rows, n]
            if not bool(full.all()):
                part = ~in_full
                pk = keys[part]  # the predicate is evaluated on the partial tiles' keys only
                vis = torch.as_tensor(ir.expr.keep(TorchOps, pos[:, None] // N, pk[None, :] // N)).expand(
                    pos.numel(), pk.numel()
                )
                if ir.causal:
                    vis = vis & (pk[None, :] <= pos[:, None])
                mask = torch.ones(pos.numel(), keys.numel(), dtype=torch.bool)
                mask[:, part] = vis
                s = s.view(B, Hkv, G, r1 - r0, -1).masked_fill(~mask.to(dev), -math.inf).view_as(s)
            m_new = torch.maximum(m_run, s.amax(-1, keepdim=True))
            m_safe = torch.where(torch.isinf(m_new) & (m_new < 0), 0.0, m_new)
            p = torch.exp(s - m_safe)
            alpha = torch.exp(m_run - m_safe)
            l_run = l_run * alpha + p.sum(-1, keepdim=True)
            acc = acc * alpha + torch.matmul(p, vd.index_select(2, kidx))
            m_run = m_new
        m_safe = torch.where(torch.isinf(m_run) & (m_run < 0), 0.0, m_run)
        out[:, :, :, r0:r1] = (acc / torch.where(l_run > 0, l_run, 1.0)).view(B, Hkv, G, r1 - r0, Dv)
        lse[:, :, :, r0:r1] = (m_safe + torch.log(l_run)).view(B, Hkv, G, r1 - r0)
    out = out.reshape(B, Hq, Sq, Dv).to(q.dtype)
    if not return_lse:
        return out
    return out, lse.reshape(B, Hq, Sq)
