"""FlexAttention interop: a layout as a ``BlockMask`` (partial and full blocks) with its ``mask_mod``."""

from __future__ import annotations

import torch

from ..core.ir import TorchOps
from ..core.layout import Layout


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

    nq, nk = layout.n_q_tiles, layout.n_kv_tiles
    rows = torch.repeat_interleave(torch.arange(nq), layout.counts())
    width = max(nk, 1)

    def pack(sel: torch.Tensor):
        r, t = rows[sel], layout.kv_idx[sel].long()
        num = torch.bincount(r, minlength=nq).to(torch.int32)
        start = torch.cumsum(num.long(), 0) - num.long()
        col = torch.arange(r.numel()) - torch.repeat_interleave(start, num.long())
        idx = torch.zeros(nq, width, dtype=torch.int32)
        idx[r, col] = t.to(torch.int32)
        return num[None, None].to(device), idx[None, None].to(device)

    partial_num, partial_idx = pack(~layout.kv_full)
    full_num, full_idx = pack(layout.kv_full)
    return BlockMask.from_kv_blocks(
        partial_num,
        partial_idx,
        full_num,
        full_idx,
        BLOCK_SIZE=(layout.block_q, layout.block_kv),
        mask_mod=mask_mod(layout),
        seq_lengths=(layout.q_len, layout.kv_len),
    )
