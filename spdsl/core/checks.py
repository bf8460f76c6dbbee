"""Input validation shared by the reference, the op and generated modules: one set of rules.

* :func:`check_qkv` -- q / k / v structure: tensors, rank, one device, agreeing batch, heads
  (GQA: ``Hq % Hkv == 0``), lengths and head dims; returns the sizes;
* :func:`resolve_scale` -- the softmax scale: ``1/sqrt(D)`` by default, else a finite positive number.

What a particular kernel supports beyond this (dtypes, head dims, CUDA) it checks itself.
Torch and the standard library only: generated modules embed this file.
"""

from __future__ import annotations

import math
import numbers

import torch

#: q / k / v layouts: [batch, heads, seq, dim] (prefill), [batch, seq, heads, dim] (decode caches),
#: [tokens, heads, dim] (packed varlen).
LAYOUTS = {
    "BHSD": "[batch, heads, seq, head_dim]",
    "BSHD": "[batch, seq, heads, head_dim]",
    "THD": "[tokens, heads, head_dim]",
}


def check_qkv(q, k, v, layout: str = "BHSD") -> tuple[int, int, int, int, int, int, int]:
    """Validate q / k / v in ``layout``; return ``(B, Hq, Hkv, Sq, Skv, D, Dv)`` (B = 1 for ``THD``).

    Raises TypeError / ValueError that say what was expected and what came.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
        if t.dim() != len(layout):
            n = len(layout)
            raise ValueError(f"{name} must be a {n}-d tensor (rank {n}) {LAYOUTS[layout]}, got shape {tuple(t.shape)}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got q on {q.device}, k on {k.device}, v on {v.device}")
    dims = {c: i for i, c in enumerate(layout)}
    h, s = dims["H"], dims.get("S", dims.get("T"))
    if layout == "BHSD" and not (q.shape[0] == k.shape[0] == v.shape[0]):  # (decode checks its caches itself)
        raise ValueError(f"q, k, v must have the same batch size, got q {q.shape[0]}, k {k.shape[0]}, v {v.shape[0]}")
    if k.shape[:-1] != v.shape[:-1]:
        raise ValueError(
            f"k and v must have the same shape but the last dim, got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    D, Hq, Hkv = q.shape[-1], q.shape[h], k.shape[h]
    if k.shape[-1] != D:
        raise ValueError(f"q and k must share the head dim (head_dim), got {D} and {k.shape[-1]}")
    if D < 1:
        raise ValueError("head_dim must be >= 1")
    if Hkv < 1 or Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of kv heads ({Hkv}) for GQA")
    B = q.shape[0] if "B" in dims else 1
    return B, Hq, Hkv, q.shape[s], k.shape[s], D, v.shape[-1]


def resolve_scale(scale, head_dim: int) -> float:
    """The softmax scale: ``1 / sqrt(head_dim)`` when None, else a finite positive number."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a finite positive number, got {scale}")
    return float(scale)
