"""Eager one-query prefill calls (``op(q, k, v)`` with ``q_len == 1``) through the decode kernel.

A model that runs attention as ``op(q, k, v)`` on every generated token pays the prefill path's host
work (layout lookup, tile plan, launch sizing) for a single query row. The decode kernel enumerates
tiles itself and keeps a checked plan per shape, so the same call costs one decode launch: k and v
are read in place as a ``[B, Skv, Hkv, D]`` cache (a transposed view, no copy), the query sits at the
default offset ``kv_len - 1``, and the result is the prefill's, in the prefill's layout.
"""

from __future__ import annotations

import torch

#: cache_seqlens tensors by (batch, kv length, device): a token loop asks for the same one again
_LENGTHS: dict = {}


def routable(op, q, k, q_offset) -> bool:
    """Is this ``op(q, k, v)`` call one the decode kernel serves exactly? (q_len 1, default offset; CUDA,
    or CPU under the Triton interpreter)"""
    T = torch.Tensor
    if type(q) is not T or type(k) is not T or q_offset is not None:
        return False
    if not q.is_cuda and not (q.device.type == "cpu" and op.module.interpreting()):
        return False
    if q.dim() != 4 or k.dim() != 4 or q.shape[2] != 1 or k.shape[2] < 1:
        return False
    hkv = k.shape[1]
    return hkv > 0 and q.shape[1] % hkv == 0 and q.shape[1] // hkv <= 128


def attention(op, q, k, v, scale, return_lse: bool):
    """``op(q, k, v)`` for q ``[B, Hq, 1, D]``, k/v ``[B, Hkv, Skv, D]`` by one decode launch.

    Invalid inputs raise the prefill path's own error (its checks name the prefill layout)."""
    B, _, _, _ = q.shape
    skv = k.shape[2]
    key = (B, skv, q.device)
    lens = _LENGTHS.get(key)
    if lens is None:
        if len(_LENGTHS) >= 256:
            _LENGTHS.clear()
        lens = _LENGTHS[key] = torch.full((B,), skv, dtype=torch.int32, device=q.device)
    try:
        out, lse = op.module.decode(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), lens, scale=scale, return_lse=True, **op._kw
        )
    except (TypeError, ValueError):
        op.checked(q, k, v, scale, None)  # the prefill's message, in the caller's layout
        raise
    out = out.transpose(1, 2)
    return (out, lse) if return_lse else out
