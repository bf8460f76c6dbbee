"""Reference attention: the truth the kernels are tested against (tests only; the CPU backend is
:mod:`spdsl.blocked`).

* :func:`attention_dense` -- masked softmax attention in float64 from an explicit bool mask;
  differentiable through torch autograd, so it is the gradient reference too.
* :func:`attention` -- the same from a pattern (the mask comes from :func:`spdsl.core.layout.dense_mask`);
  :func:`attention_heads` from per-head patterns (a mask per query head).

Conventions everywhere: ``q [B, Hq, Sq, D]``, ``k [B, Hkv, Skv, D]``, ``v [B, Hkv, Skv, Dv]``,
``Hq % Hkv == 0`` and query head ``h`` reads kv head ``h // (Hq // Hkv)`` (GQA); query row ``i`` sits
at absolute position ``q_offset + i``; a row that sees no key returns zeros and LSE ``-inf``
(natural log), never NaN.
"""

from __future__ import annotations

import math

import torch

from .core.checks import check_qkv, resolve_scale
from .core.layout import dense_mask
from .pattern import as_ir

__all__ = ["attention", "attention_dense", "attention_heads", "check_qkv"]


def attention_dense(q, k, v, mask, *, scale=None, return_lse: bool = False):
    """Masked softmax attention computed in float64; returns float64 ``out [B, Hq, Sq, Dv]``
    (and ``lse [B, Hq, Sq]`` if ``return_lse``).

    ``mask`` is bool ``[Sq, Skv]`` (True = visible), shared by every batch and head, or ``[Hq, Sq, Skv]``
    (one per query head); it is moved to q's device if needed. Rows with no visible key give zeros and
    LSE -inf.
    """
    B, Hq, Hkv, Sq, Skv, D, _ = check_qkv(q, k, v)
    sc = resolve_scale(scale, D)
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got dtype {mask.dtype}")
    if tuple(mask.shape) not in ((Sq, Skv), (Hq, Sq, Skv)):
        raise ValueError(
            f"mask must have shape [q_len, kv_len] = [{Sq}, {Skv}] (or [Hq, q_len, kv_len]), got {tuple(mask.shape)}"
        )
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


def attention_heads(patterns, heads, q, k, v, *, scale=None, q_offset: int | None = None, return_lse: bool = False):
    """fp64 attention with per-head patterns: query head ``h`` under ``patterns[heads[h]]``
    (``attention_dense`` with a mask per head)."""
    irs = [as_ir(p) for p in patterns]
    _, Hq, _, Sq, Skv, _, _ = check_qkv(q, k, v)
    if len(heads) != Hq:
        raise ValueError(f"heads has {len(heads)} entries, q has {Hq} heads")
    masks = [dense_mask(ir, Sq, Skv, q_offset) for ir in irs]
    mask = torch.stack([masks[h] for h in heads]) if Hq else torch.zeros(0, Sq, Skv, dtype=torch.bool)
    return attention_dense(q, k, v, mask, scale=scale, return_lse=return_lse)
