"""The blocked PyTorch backend: attention and its gradients walking a layout tile by tile.

What the op runs on CPU tensors (unless ``TRITON_INTERPRET=1`` asks for the Triton kernels), and
the oracle for shapes too large for a dense mask. Per q-tile, its kv tiles are gathered in chunks
of at most :data:`SCORE_CHUNK_ELEMS` score elements, so memory is O(nnz) plus one chunk: full tiles
unmasked, partial tiles masked by the pattern's predicate on their own index vectors (which also
checks the layout's full/partial flags along the way).

Conventions as :mod:`spdsl.reference`: ``q [B, Hq, Sq, D]``, ``k [B, Hkv, Skv, D]``,
``v [B, Hkv, Skv, Dv]``, GQA by ``h // (Hq // Hkv)``; rows that see nothing give 0 and LSE -inf.
"""

from __future__ import annotations

import math

import torch

from .core.checks import check_qkv, resolve_scale
from .core.ir import TorchOps
from .core.layout import Layout

__all__ = ["SCORE_CHUNK_ELEMS", "attention_blocked", "attention_blocked_backward"]

#: The kv tiles of one q-tile are handled in chunks of at most this many score elements
#: (B * Hq * block_q * keys), so memory stays bounded even for dense rows.
SCORE_CHUNK_ELEMS = 1 << 22


def _tile_tokens(tiles: torch.Tensor, full: torch.Tensor, block: int, length: int):
    """Token indices of the given tiles, in order, clipped at ``length`` (int64), and whether each
    token lies in a full tile."""
    idx = (tiles.to(torch.int64)[:, None] * block + torch.arange(block, dtype=torch.int64)).reshape(-1)
    in_full = full[:, None].expand(-1, block).reshape(-1)
    ok = idx < length
    return idx[ok], in_full[ok]


def _check(layout, q, k, v, dtype):
    if not isinstance(layout, Layout):
        raise TypeError(f"layout must be a spdsl.Layout, got {type(layout).__name__}")
    sizes = check_qkv(q, k, v)
    if (layout.q_len, layout.kv_len) != sizes[3:5]:
        raise ValueError(
            f"layout is for q_len={layout.q_len}, kv_len={layout.kv_len} but q has {sizes[3]} rows and k has {sizes[4]}"
        )
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    return sizes


def _chunks(layout: Layout, q, k, v, dtype, scale):
    """Per q-tile: ``(r0, r1, chunks)``, chunks yielding ``(kidx, s)``: the keys of a chunk of the
    tile's kv tiles and the scaled scores ``[B, Hkv, G * rows, keys]`` (hidden elements -inf)."""
    B, Hq, Hkv, Sq, Skv, D, _ = check_qkv(q, k, v)
    ir, N, off, G, dev = layout.ir, layout.ir.unit, layout.q_offset, Hq // Hkv, q.device
    bq, bkv = layout.block_q, layout.block_kv
    qg = q.to(dtype).reshape(B, Hkv, G, Sq, D)
    kd = k.to(dtype)
    kv_ptr = layout.kv_ptr.tolist()
    kv_idx, kv_full = layout.kv_idx.to(torch.int64), layout.kv_full
    per_chunk = max(1, SCORE_CHUNK_ELEMS // max(1, B * Hq * min(bq, max(Sq, 1)) * bkv))

    def scores(a, b, r0, r1, qt):
        pos = torch.arange(r0 + off, r1 + off, dtype=torch.int64)  # absolute query positions
        for c in range(a, b, per_chunk):
            full = kv_full[c : min(b, c + per_chunk)]
            keys, in_full = _tile_tokens(kv_idx[c : min(b, c + per_chunk)], full, bkv, Skv)
            kidx = keys.to(dev)
            s = torch.matmul(qt, kd.index_select(2, kidx).transpose(-1, -2)) * scale
            if not bool(full.all()):
                pk = keys[~in_full]  # the predicate is evaluated on the partial tiles' keys only
                vis = torch.as_tensor(ir.expr.keep(TorchOps, pos[:, None] // N, pk[None, :] // N))
                vis = vis.expand(pos.numel(), pk.numel())
                if ir.causal:
                    vis = vis & (pk[None, :] <= pos[:, None])
                mask = torch.ones(pos.numel(), keys.numel(), dtype=torch.bool)
                mask[:, ~in_full] = vis
                s = s.view(B, Hkv, G, r1 - r0, -1).masked_fill(~mask.to(dev), -math.inf).view_as(s)
            yield kidx, s

    for i in range(layout.n_q_tiles):
        a, b = kv_ptr[i], kv_ptr[i + 1]
        if a < b:
            r0, r1 = i * bq, min((i + 1) * bq, Sq)
            qt = qg[:, :, :, r0:r1].reshape(B, Hkv, G * (r1 - r0), D)
            yield r0, r1, qt, scores(a, b, r0, r1, qt)


def attention_blocked(layout: Layout, q, k, v, *, scale=None, return_lse: bool = False, dtype=torch.float32):
    """Attention walking ``layout`` tile by tile with an online softmax in ``dtype``.

    Parameters
    ----------
    layout: the pattern's :class:`Layout` for ``q_len = q.shape[2]``, ``kv_len = k.shape[2]``.
    q, k, v: ``[B, Hq, Sq, D]``, ``[B, Hkv, Skv, D]``, ``[B, Hkv, Skv, Dv]``.
    scale: softmax scale (default ``1/sqrt(D)``); dtype: the arithmetic's dtype.

    Returns
    -------
    ``out [B, Hq, Sq, Dv]`` in q's dtype (and ``lse [B, Hq, Sq]`` in ``dtype``, natural log).

    >>> import torch, spdsl
    >>> p = spdsl.compile("pattern w() { causal attend local(8) }")
    >>> q = k = v = torch.randn(1, 2, 40, 16, dtype=torch.float64)
    >>> out = attention_blocked(p.layout(40, 40, 16, 16), q, k, v, dtype=torch.float64)
    >>> torch.allclose(out, spdsl.reference.attention(p, q, k, v))
    True
    """
    B, Hq, Hkv, Sq, _, _, Dv = _check(layout, q, k, v, dtype)
    G, dev = Hq // Hkv, q.device
    out = torch.zeros(B, Hkv, G, Sq, Dv, dtype=dtype, device=dev)
    lse = torch.full((B, Hkv, G, Sq), -math.inf, dtype=dtype, device=dev)
    vd = v.to(dtype)
    for r0, r1, _, chunks in _chunks(layout, q, k, v, dtype, resolve_scale(scale, q.shape[-1])):
        m_run = torch.full((B, Hkv, G * (r1 - r0), 1), -math.inf, dtype=dtype, device=dev)
        l_run = torch.zeros_like(m_run)
        acc = torch.zeros(B, Hkv, G * (r1 - r0), Dv, dtype=dtype, device=dev)
        for kidx, s in chunks:
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
    return (out, lse.reshape(B, Hq, Sq)) if return_lse else out


def attention_blocked_backward(
    layout: Layout, q, k, v, out, lse, dout, *, scale=None, dlse=None, dtype=torch.float32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(dq, dk, dv)`` of :func:`attention_blocked`, from its ``out`` and ``lse`` (nothing O(S^2)).

    ``dout`` is the gradient of ``out``, ``dlse`` (optional) that of ``lse``. With ``P`` the softmax,
    ``dS = P * (dO V^T - delta)``, ``delta = rowsum(dO * O) - dLSE``; ``dq = dS K * scale``,
    ``dk = dS^T Q * scale``, ``dv = P^T dO`` (summed over the query heads of a GQA group).
    Rows that see nothing get zero gradients.
    """
    B, Hq, Hkv, Sq, Skv, D, Dv = _check(layout, q, k, v, dtype)
    sc = resolve_scale(scale, D)
    G, dev = Hq // Hkv, q.device
    delta = (dout.to(dtype) * out.to(dtype)).sum(-1) - (0 if dlse is None else dlse.to(dtype))
    lse_safe = torch.where(torch.isinf(lse) & (lse < 0), math.inf, lse.to(dtype))  # p = 0 on empty rows
    grouped = (t.reshape(B, Hkv, G, Sq, -1) for t in (dout.to(dtype), lse_safe[..., None], delta[..., None]))
    dog, lseg, deltag = grouped
    dq = torch.zeros(B, Hkv, G, Sq, D, dtype=dtype, device=dev)
    dk = torch.zeros(B, Hkv, Skv, D, dtype=dtype, device=dev)
    dv = torch.zeros(B, Hkv, Skv, Dv, dtype=dtype, device=dev)
    kd, vd = k.to(dtype), v.to(dtype)
    for r0, r1, qt, chunks in _chunks(layout, q, k, v, dtype, sc):
        rows = (B, Hkv, G * (r1 - r0), -1)
        do_t, m, dl = (t[:, :, :, r0:r1].reshape(rows) for t in (dog, lseg, deltag))
        dq_t = torch.zeros(B, Hkv, G * (r1 - r0), D, dtype=dtype, device=dev)
        for kidx, s in chunks:
            p = torch.exp(s - m)
            ds = p * (torch.matmul(do_t, vd.index_select(2, kidx).transpose(-1, -2)) - dl)
            dq_t += torch.matmul(ds, kd.index_select(2, kidx)) * sc
            dk.index_add_(2, kidx, torch.matmul(ds.transpose(-1, -2), qt) * sc)
            dv.index_add_(2, kidx, torch.matmul(p.transpose(-1, -2), do_t))
        dq[:, :, :, r0:r1] = dq_t.view(B, Hkv, G, r1 - r0, D)
    return dq.reshape(B, Hq, Sq, D).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
