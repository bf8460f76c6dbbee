"""fp64 references for the v1.1 lines (issue 12), written from the semantics in docs/language.md.

* the *candidates* of a query are ``attend ∪ select``, cut by ``causal`` (:func:`candidate_mask`);
* softmax (no ``score`` line): exact softmax attention over the candidates;
* ``score relu(alpha)``: weights ``relu(scale·q·k − bias)**alpha`` over the candidates, divided by
  their row sum; a row whose weights are all zero returns 0.

Tests only, like :mod:`spdsl.reference` (the op's decode is :mod:`spdsl.dynamic`). Conventions as
there: ``q [B, Hq, Sq, D]``, ``k [B, Hkv, Skv, D]``, GQA by ``h // (Hq // Hkv)``.
"""

from __future__ import annotations

import torch

from .core.checks import check_qkv, resolve_scale
from .core.ir import PatternIR, Union
from .core.layout import dense_mask
from .pattern import as_ir
from .reference import attention_dense
from .summaries import sequence_kv

__all__ = ["attention", "attention_dense_dynamic", "candidate_ir", "candidate_mask", "decode"]


def candidate_ir(pattern_or_ir) -> PatternIR:
    """The static pattern of the candidates: ``attend | select`` (just ``attend`` without select)."""
    ir = as_ir(pattern_or_ir)
    expr = ir.expr if ir.select is None else Union((ir.expr, ir.select))
    return PatternIR(ir.name, ir.unit, ir.causal, expr, ir.params)


def candidate_mask(pattern_or_ir, q_len: int, kv_len: int, q_offset: int | None = None) -> torch.Tensor:
    """bool ``[q_len, kv_len]``: the candidate keys (``attend ∪ select``, cut by ``causal``) of each row."""
    return dense_mask(candidate_ir(pattern_or_ir), q_len, kv_len, q_offset)


def attention_dense_dynamic(q, k, v, mask, *, score=None, scale=None, bias: float = 0.0) -> torch.Tensor:
    """fp64 attention over ``mask`` (bool ``[Sq, Skv]``): softmax when ``score`` is None, else
    ``("relu", alpha)`` weights normalized by their row sum (all-zero rows give 0).

    Returns
    -------
    float64 ``out [B, Hq, Sq, Dv]``.
    """
    if score is None:
        return attention_dense(q, k, v, mask, scale=scale)
    _, Hq, Hkv, _, _, D, _ = check_qkv(q, k, v)
    sc, G = resolve_scale(scale, D), Hq // Hkv
    kf = k.to(torch.float64).repeat_interleave(G, dim=1)
    vf = v.to(torch.float64).repeat_interleave(G, dim=1)
    x = torch.matmul(q.to(torch.float64), kf.transpose(-1, -2)) * sc - float(bias)
    w = torch.relu(x).pow(int(score[1])).masked_fill(~mask.to(q.device), 0.0)
    denom = w.sum(-1, keepdim=True)
    return torch.matmul(w, vf) / torch.where(denom > 0, denom, 1.0)


def attention(pattern_or_ir, q, k, v, *, scale=None, bias: float = 0.0, q_offset: int | None = None) -> torch.Tensor:
    """fp64 prefill-shaped attention under a v1.1 pattern (``q [B, Hq, Sq, D]``); returns ``[B, Hq, Sq, Dv]``."""
    ir = as_ir(pattern_or_ir)
    _, _, _, Sq, Skv, _, _ = check_qkv(q, k, v)
    mask = candidate_mask(ir, Sq, Skv, q_offset)
    return attention_dense_dynamic(q, k, v, mask, score=ir.score, scale=scale, bias=bias)


def decode(
    pattern_or_ir, q, k_cache, v_cache, cache_seqlens, *, block_table=None, scale=None, bias: float = 0.0
) -> torch.Tensor:
    """fp64 decode reference (``flash_attn_with_kvcache`` conventions, as ``op.decode``).

    Parameters
    ----------
    q: ``[B, Sq, Hq, D]``; query ``j`` of sequence ``b`` sits at ``cache_seqlens[b] - Sq + j``.
    k_cache, v_cache: ``[B, S_max, Hkv, D]``, or paged ``[pages, page, Hkv, D]`` with ``block_table``.
    cache_seqlens: int ``[B]``, tokens in each cache (new ones included).

    Returns
    -------
    float64 ``[B, Sq, Hq, Dv]``: exact attention over the candidates (softmax or ReLU^alpha).
    """
    ir = as_ir(pattern_or_ir)
    B, Sq, Hq, _ = q.shape
    out = torch.zeros((B, Sq, Hq, v_cache.shape[-1]), dtype=torch.float64)
    for b, n in enumerate(cache_seqlens.tolist()):
        k, v = (t.cpu()[None].transpose(1, 2) for t in sequence_kv(k_cache, v_cache, b, n, block_table))
        o = attention(ir, q[b : b + 1].cpu().transpose(1, 2), k, v, scale=scale, bias=bias)
        out[b] = o[0].transpose(0, 1)
    return out
