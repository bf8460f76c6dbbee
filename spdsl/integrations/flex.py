"""FlexAttention interop: a layout as a ``BlockMask`` (partial and full blocks) with its ``mask_mod``."""

from __future__ import annotations

import torch

from ..core.ir import TorchOps
from ..core.layout import Layout
from .blocks import split_full


def mask_mod(layout: Layout):
    """FlexAttention ``mask_mod`` for the layout's pattern (q_idx is the row; the offset is applied)."""
    ir, off = layout.ir, layout.q_offset

    def mask_mod(b, h, q_idx, kv_idx):
        p = q_idx + off
        m = ir.expr.keep(TorchOps, p // ir.unit, kv_idx // ir.unit)
        return (m & (kv_idx <= p)) if ir.causal else m

    return mask_mod


def to_block_mask(layout: Layout, device: str | torch.device = "cpu"):
    """torch FlexAttention ``BlockMask`` with exactly the layout's tiles (partial and full)."""
    from torch.nn.attention.flex_attention import BlockMask

    width = max(layout.n_kv_tiles, 1)
    pn, pi, fn, fi = (t[None, None].to(device) for t in split_full(layout.kv_ptr, layout.kv_idx, layout.kv_full, width))
    return BlockMask.from_kv_blocks(
        pn,
        pi,
        fn,
        fi,
        BLOCK_SIZE=(layout.block_q, layout.block_kv),
        mask_mod=mask_mod(layout),
        seq_lengths=(layout.q_len, layout.kv_len),
    )
