"""FlashAttention-4 (``flash_attn.cute``, CuTe DSL) as a second backend: spdsl's layouts in FA4's
block-sparse form and the pattern's ``mask_mod`` emitted from the IR (:mod:`spdsl.codegen.cute`).

FA4's block-sparse tensors are, per (batch, head, block row), a count and left-packed indices:
``mask_block_cnt [B, H, M]`` / ``mask_block_idx [B, H, M, W]`` for partial blocks (``mask_mod``
applied) and ``full_block_cnt`` / ``full_block_idx`` for full ones. The format is inherently padded
to a width ``W``, but FA4 accepts a compact ``W`` (the longest row, not all blocks), and ``B`` /
``H`` may be 1 (broadcast): built here from the CSR by a scatter, O(nnz + M * W), no dense mask.
The forward reads q-major lists (rows are q tiles, entries kv tiles); the backward kv-major ones
(``block_sparse_tensors_bwd``: rows are kv tiles, entries q tiles) -- the transposed CSR.

Nothing here imports ``flash_attn`` or ``cutlass`` at module import time.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..core.ir import PatternIR
from ..core.layout import Layout
from .blocks import split_full

INSTALL_HINT = "pip install 'spdsl[fa4]' (FlashAttention-4, CuTe DSL; CUDA, Hopper sm90 or newer)"
#: FA4's sparse block size on Hopper: its forward and backward q tile is 128 there.
BLOCK = (128, 128)


def unavailable(device: torch.device | str | None = None) -> str | None:
    """Why the FA4 backend cannot run on ``device`` (None: it can).

    Parameters
    ----------
    device: the tensors' device; None checks the current CUDA device.

    Returns
    -------
    None, or a sentence naming what is missing (no CUDA device, a pre-Hopper GPU, FA4 not importable).
    """
    device = torch.device(device) if device is not None else None
    if device is not None and device.type != "cuda":
        return f"the FA4 backend needs CUDA tensors, got device {device.type!r}"
    if not torch.cuda.is_available():
        return "the FA4 backend needs a CUDA GPU (none is available)"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 9:
        return f"the FA4 backend needs a Hopper (sm90) or newer GPU, this one is sm{major}{minor}"
    missing = _import_error()
    return f"flash_attn.cute does not import ({missing}); {INSTALL_HINT}" if missing else None


@functools.lru_cache(maxsize=1)
def _import_error() -> str | None:
    try:
        import flash_attn.cute  # noqa: F401
    except Exception as e:  # ImportError, or a broken CUDA / cutlass install
        return f"{type(e).__name__}: {str(e)[:200]}"
    return None


@dataclass(frozen=True)
class BlockLists:
    """One direction's lists: ``(partial_cnt, partial_idx, full_cnt, full_idx)``, int32, shaped
    ``[1, 1, rows]`` and ``[1, 1, rows, width]`` (broadcast over batch and heads)."""

    partial_cnt: torch.Tensor
    partial_idx: torch.Tensor
    full_cnt: torch.Tensor
    full_idx: torch.Tensor

    def to(self, device) -> BlockLists:
        return BlockLists(*(t.to(device) for t in self.tensors()))

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.partial_cnt, self.partial_idx, self.full_cnt, self.full_idx)


def block_lists(layout: Layout) -> tuple[BlockLists, BlockLists]:
    """``(forward q-major, backward kv-major)`` lists of a layout, on the CPU, compact width.

    Parameters
    ----------
    layout: a :class:`~spdsl.core.layout.Layout` (any tile sizes; FA4 wants :data:`BLOCK`).

    Returns
    -------
    Two :class:`BlockLists`; partial and full blocks apart, each row's indices ascending.
    """
    fwd = split_full(layout.kv_ptr, layout.kv_idx, layout.kv_full)
    bwd = split_full(*layout.kv_major())
    return tuple(BlockLists(*(t[None, None] for t in lists)) for lists in (fwd, bwd))


@functools.lru_cache(maxsize=64)
def cached_block_lists(
    ir: PatternIR, q_len: int, kv_len: int, q_offset: int | None, device: str
) -> tuple[BlockLists, BlockLists]:
    """:func:`block_lists` for ``BLOCK`` tiles, on ``device``, cached per shape (as the Triton plans are)."""
    fwd, bwd = block_lists(Layout(ir, q_len, kv_len, *BLOCK, q_offset=q_offset))
    return fwd.to(device), bwd.to(device)


@functools.lru_cache(maxsize=64)
def mask_mod(ir: PatternIR, q_offset: int | None):
    """The emitted CuTe ``mask_mod`` for ``ir`` (source cached on disk, imported once per process)."""
    from .. import cache
    from ..codegen.cute import mask_source

    text = mask_source(ir, q_offset)
    key = cache.cache_key(text)
    path = cache.cache_dir() / f"fa4_mask_{ir.name}_{key}.py"
    cache.get_or_create(path, lambda: text)
    return cache.import_generated(path, f"spdsl_fa4_mask_{ir.name}_{key}").mask_mod


@functools.lru_cache(maxsize=64)
def _dense(ir: PatternIR) -> bool:
    from ..codegen.cute import keeps_all

    return keeps_all(ir)


def _sparse(lists: BlockLists):
    from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch

    return BlockSparseTensorsTorch(*lists.tensors(), block_size=BLOCK)


def attention(
    ir: PatternIR,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    q_offset: int | None = None,
    return_lse: bool = False,
):
    """Block-sparse FA4 attention for one pattern; differentiable (FA4's block-sparse backward).
    A pattern keeping every pair (``attend all``, as ``causal.spd``) runs FA4's dense (causal)
    kernel instead, where its alignment is spdsl's (default offset, ``q_len <= kv_len``).

    Parameters
    ----------
    ir: the pattern; q [B, Hq, Sq, D], k / v [B, Hkv, Skv, D] on a Hopper+ GPU (Hq % Hkv == 0: FA4
        handles GQA itself); scale: the softmax scale; q_offset: None for spdsl's default
        ``kv_len - q_len``; return_lse: also return the LSE [B, Hq, Sq] (natural log).

    Returns
    -------
    out [B, Hq, Sq, D] (and the LSE). Raises RuntimeError when FA4 cannot run here (see :func:`unavailable`).
    """
    reason = unavailable(q.device)
    if reason:
        raise RuntimeError(reason)
    from flash_attn.cute import flash_attn_func

    q_len, kv_len = q.shape[2], k.shape[2]
    default = q_offset is None or q_offset == kv_len - q_len
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if _dense(ir) and (not ir.causal or (default and q_len <= kv_len)):
        # FA4's causal is bottom-right aligned, spdsl's default offset; q_len <= kv_len: no empty rows
        res = flash_attn_func(qt, kt, vt, softmax_scale=scale, causal=ir.causal, return_lse=return_lse)
    else:
        fwd, bwd = cached_block_lists(ir, q_len, kv_len, q_offset, str(q.device))
        res = flash_attn_func(
            qt,
            kt,
            vt,
            softmax_scale=scale,
            mask_mod=mask_mod(ir, None if default else q_offset),
            block_sparse_tensors=_sparse(fwd),
            block_sparse_tensors_bwd=_sparse(bwd),
            return_lse=return_lse,
        )
    out, lse = res if isinstance(res, tuple) else (res, None)
    out = out.transpose(1, 2)
    if not return_lse:
        return out
    # spdsl's rule: a row that sees no key has LSE -inf (FlashAttention kernels have written +inf)
    return out, torch.where(torch.isposinf(lse), float("-inf"), lse)
