"""The public :class:`Layout`: :mod:`spdsl.core.layout`'s, plus FlexAttention interop.

``build_csr``, ``dense_mask`` and ``transpose_csr`` are re-exported from the core.
"""

from __future__ import annotations

import torch

from .core import layout as _core
from .core.layout import build_csr, dense_mask, transpose_csr

__all__ = ["Layout", "build_csr", "dense_mask", "transpose_csr"]


class Layout(_core.Layout):
    """Tile CSR of a pattern (see :class:`spdsl.core.layout.Layout`), convertible to a Flex ``BlockMask``.

    >>> import spdsl
    >>> lay = spdsl.load(spdsl.resources.pattern_path("power")).layout(8192, 8192)
    >>> lay.n_q_tiles, lay.nnz, lay.n_full
    (64, 828, 764)
    """

    def mask_mod(self):
        """FlexAttention ``mask_mod`` for this pattern (q_idx is the row, offset applied)."""
        from .integrations.flex import mask_mod

        return mask_mod(self)

    def to_block_mask(self, device: str | torch.device = "cpu"):
        """torch FlexAttention ``BlockMask`` with exactly this pattern (partial and full blocks)."""
        from .integrations.flex import to_block_mask

        return to_block_mask(self, device)
