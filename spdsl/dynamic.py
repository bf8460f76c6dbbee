"""Certified content-aware decode (issue 12): which key blocks to compute, and the error bound.

For a pattern with ``score`` / ``select`` lines (docs/language.md, v1.1), per sequence ``b`` and
KV head, the key blocks of :class:`~spdsl.summaries.KeySummaries` split into

* *attend blocks* (holding a key of ``attend`` for some query row): always computed;
* *select blocks* (candidate keys of ``select`` only): computed where the box bound ``U`` on
  ``scale·q·k`` (box and ball, :func:`~spdsl.summaries.box_bound`) says they can matter, for any query head of
  the GQA group and any query row:

  - ``score relu(alpha)``: a block is skipped iff ``U <= bias`` for every row -- its weights are
    exactly 0, so the result is exact over ``attend ∪ select``;
  - softmax: the attend blocks are computed first, giving each row's exact kept mass ``K``. Per
    row, a select block holding ``c`` candidate keys has mass at most ``c·exp(U)``, and at most the
    mean-and-spread bound of :func:`~spdsl.summaries.mass_bound` (the smaller counts); while the bound
    ``D`` on the unread mass exceeds ``eps/(1-eps)·K`` for some row, the unread blocks that rows
    need are computed, highest bound first (``FIRST_ROUND`` or 1/``FIRST_SHARE`` of the blocks per
    sequence and KV head, ``GROWTH`` times more each round, all that is still needed in round
    ``MAX_ROUNDS``), and ``K`` grows. At the end ``ε̂ = D / (K + D) <= eps`` for every row is the certificate: the
    total-variation distance to exact softmax over the candidates is at most ``ε̂``, so per
    coordinate ``|o - o_exact| <= ε̂ · (value range over the candidates)``.

The block lists are computed in torch on the tensors' device (host synchronization: not
CUDA-graph capturable yet). The blocks themselves run on a *backend*: the Triton kernels of
:mod:`spdsl.dynamic_kernels` (CUDA, or CPU under ``TRITON_INTERPRET=1``) or :func:`run_blocks_torch`
(CPU). Both return per-row ``(o, lse)`` over the chosen blocks.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch

from .core.ir import PatternIR, TorchOps
from .core.limits import limit, require
from .summaries import KeySummaries, box_bound, gather_rows, mass_bound

#: Select blocks per (sequence, KV head) computed in the softmax path's first round: ``FIRST_ROUND``
#: or 1/``FIRST_SHARE`` of the blocks if more, growing by ``GROWTH`` a round; the ``MAX_ROUNDS``-th
#: round computes every block still needed (which ends it). At 32K (512 blocks: 16, then 64, then
#: the rest) that is 4 launches with the attend blocks', where 4 doubling from 4 took 8, reading
#: within a few points as many blocks (B2 Hq32 Hkv8 D128, clustered keys, 1-20% of blocks hot).
FIRST_ROUND, FIRST_SHARE, GROWTH, MAX_ROUNDS = 4, 32, 4, 3

__all__ = [
    "TORCH",
    "Backend",
    "block_lists",
    "candidate_blocks",
    "check_options",
    "decode",
    "merge_parts",
    "prefill",
    "run_blocks_torch",
    "weights_log",
]


class Backend(NamedTuple):
    """Where the blocks run: ``bound(rows, lo, hi, radius)`` as :func:`~spdsl.summaries.box_bound`, and
    ``run_blocks(...)`` as :func:`run_blocks_torch`."""

    bound: object
    run_blocks: object


def check_options(eps, bias) -> None:
    """TypeError / ValueError for a bad ``eps`` (0 < eps < 1) or ``bias`` (a finite float)."""
    for name, value in (("eps", eps), ("bias", bias)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise TypeError(f"{name} must be a finite float, got {value!r}")
    if not 0 < eps < 1:
        raise ValueError(f"eps must lie strictly between 0 and 1, got {eps}")


def _token_masks(ir: PatternIR, seqlens: torch.Tensor, Sq: int, length: int, q_start=None):
    """bool ``[B, Sq, length]`` for attend and for the candidates (attend ∪ select), cut by causal
    and by each cache's length; query ``j`` of sequence ``b`` sits at ``q_start[b] + j`` (default
    ``seqlens[b] - Sq``)."""
    n = seqlens.to(torch.int64)[:, None, None]
    first = n - Sq if q_start is None else q_start.to(torch.int64)[:, None, None]
    pos = first + torch.arange(Sq, device=seqlens.device)[None, :, None]
    keys = torch.arange(length, device=seqlens.device)[None, None, :]
    live = keys < n
    if ir.causal:
        live = live & (keys <= pos)
    Q, K = pos // ir.unit, keys // ir.unit
    attend = live & torch.as_tensor(ir.expr.keep(TorchOps, Q, K), device=seqlens.device)
    if ir.select is None:
        return attend, attend
    return attend, attend | (live & torch.as_tensor(ir.select.keep(TorchOps, Q, K), device=seqlens.device))


def merge_parts(o: torch.Tensor, lse: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine normalized outputs ``o [..., n, R, D]`` over disjoint key sets (along ``dim`` >= 0, the
    same index in ``o`` and ``lse [..., n, R]``, natural log; empty parts -inf) by their
    log-sum-exp: ``(o [..., R, D], lse [..., R])``."""
    total = lse.logsumexp(dim)
    w = torch.exp(lse - torch.where(torch.isinf(total), 0.0, total).unsqueeze(dim))
    return (o * w[..., None]).sum(dim), total


def _merge(a, b):
    """Combine two ``(o, lse)`` over disjoint key sets (see :func:`merge_parts`)."""
    dim = a[1].dim() - 1  # before the rows
    return merge_parts(torch.stack([a[0], b[0]], dim), torch.stack([a[1], b[1]], dim), dim)


def decode(
    ir: PatternIR,
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    summaries: KeySummaries,
    *,
    scale: float,
    eps: float = 1e-3,
    bias: float = 0.0,
    block_table=None,
    backend: Backend | None = None,
    topk: int | None = None,
    q_start: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Certified decode over ``attend ∪ select`` (inputs already checked by the op).

    Parameters
    ----------
    ir: the pattern (``score`` / ``select`` lines).
    q: ``[B, Sq, Hq, D]``; caches as ``op.decode``; ``summaries`` of ``k_cache`` at ``cache_seqlens``.
    scale, eps, bias: the softmax scale, the error target, the ReLU bias.
    backend: where bounds and blocks are computed (default :data:`TORCH`).
    topk: a heuristic baseline instead of the certificate (benchmarks): per (sequence, KV head) the
        attend blocks and the ``topk`` select blocks of highest bound (Quest-style); ``err`` is NaN.
        ``topk >= NB`` reads every candidate block (exact).
    q_start: int ``[B]``, the position of each sequence's first query (default ``cache_seqlens - Sq``,
        the decode convention; :func:`prefill` passes chunks of rows; torch backend only).

    Returns
    -------
    ``(out [B, Sq, Hq, Dv] in q's dtype, err [B, Sq, Hq] float32, chosen [B, Hkv, NB] bool)``:
    the certified total-variation bound ``ε̂`` per row (0 for ReLU^alpha) and the blocks read.
    """
    check_options(eps, bias)
    if not isinstance(summaries, KeySummaries):
        raise TypeError(
            f"summaries must come from op.summaries(k_cache, cache_seqlens), got {type(summaries).__name__}"
        )
    summaries.check(k_cache, cache_seqlens, block_table)
    backend = backend or TORCH
    if q_start is not None and backend is not TORCH:
        raise ValueError("q_start is supported by the torch backend only")
    B, Sq, Hq, D = q.shape
    Hkv, bs, NB = k_cache.shape[2], summaries.block_size, summaries.num_blocks
    G = Hq // Hkv
    rows = q.reshape(B, Sq, Hkv, G, D).permute(0, 2, 3, 1, 4).reshape(B, Hkv, G * Sq, D)  # row g * Sq + j
    attend_tok, cand_tok = _token_masks(ir, cache_seqlens, Sq, NB * bs, q_start)
    count = cand_tok.view(B, Sq, NB, bs).sum(-1)  # candidate keys per (row, block)
    attend_blk = attend_tok.view(B, Sq, NB, bs).any(-1).any(1)[:, None].expand(B, Hkv, NB)
    select_row = (count > 0)[:, None, None] & ~attend_blk[:, :, None, None]  # [B, Hkv, 1, Sq, NB]
    bound = backend.bound(rows, summaries.lo, summaries.hi, summaries.radius).view(B, Hkv, G, Sq, NB) * scale

    def run(chosen):
        return backend.run_blocks(rows, k_cache, v_cache, block_table, chosen, cand_tok, cache_seqlens, Sq, scale, bias,
                          ir.score, bs)  # fmt: skip

    if topk is not None:
        best = torch.where(select_row, bound, -math.inf).flatten(2, 3).amax(2)  # [B, Hkv, NB]
        picked = best.topk(min(int(topk), NB), dim=-1).indices
        chosen = attend_blk | (torch.zeros_like(attend_blk).scatter(-1, picked, True) & (best > -math.inf))
        o, _ = run(chosen)
        err = torch.full((B, Hkv, G, Sq), math.nan, dtype=torch.float32, device=q.device)
    elif ir.score is not None:
        need = (select_row & (bound > bias)).flatten(2, 3).any(2)
        chosen = attend_blk | need
        o, _ = run(chosen)
        err = torch.zeros((B, Hkv, G, Sq), dtype=torch.float32, device=q.device)
    else:
        mass = mass_bound(rows, summaries.mean, summaries.spread, summaries.count(cache_seqlens), scale)
        logc = torch.minimum(count.double().log()[:, None, None] + bound.double(), mass.view(B, Hkv, G, Sq, NB))
        logc = torch.where(select_row, logc, -math.inf)
        o, lse, chosen = _top_p(run, attend_blk, logc, math.log(eps / (1 - eps)))
        dropped = torch.where(chosen[:, :, None, None], -math.inf, logc).logsumexp(-1)  # [B, Hkv, G, Sq]
        total = torch.logaddexp(lse.view(B, Hkv, G, Sq).double(), dropped)
        err = torch.where(torch.isinf(dropped), 0.0, torch.exp(dropped - total)).float()
    out = o.view(B, Hkv, G, Sq, -1).permute(0, 3, 1, 2, 4).reshape(B, Sq, Hq, -1).to(q.dtype)
    return out, err.permute(0, 3, 1, 2).reshape(B, Sq, Hq), chosen


def prefill(
    ir: PatternIR, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, eps: float = 1e-3,
    bias: float = 0.0, block_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Certified prefill: :func:`decode` over chunks of query rows (queries are the last ``Sq`` of
    the ``Skv`` keys), on the torch backend, whatever the device; one set of key summaries.

    Differentiable in q, k and v through torch's autograd (the gradient of what is computed: the
    blocks read; the block choice itself is not differentiated); the backward keeps every chunk's
    scores, ``B·Hq·Sq·Skv`` floats, so it is refused above the ``dense`` limit.

    The guarantee is the decode's, per row. The block choice is per (sequence, KV head) and chunk
    of rows -- as many rows as keep the chunk's ``[B, rows, Skv]`` token masks and scores within
    the ``dense`` limit -- so it skips less than a per-q-tile choice would; a tiled prefill kernel
    is still to do.

    Parameters
    ----------
    q: ``[B, Hq, Sq, D]``; k, v: ``[B, Hkv, Skv, D]`` (checked by the op); scale, eps, bias: as decode.

    Returns
    -------
    ``(out [B, Hq, Sq, Dv], err [B, Hq, Sq] float32)``.
    """
    B, Hq, Sq, _ = q.shape
    Skv = k.shape[2]
    padded = -(-Skv // block_size) * block_size
    chunk = max(1, min(Sq, limit("dense") // max(1, B * Hq * padded)))
    require("dense", B * Hq * chunk * padded, f"the certified prefill's scores of {chunk:,} rows x {Skv:,} keys",
            "use fewer query heads or a shorter sequence")  # fmt: skip
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        require("dense", B * Hq * Sq * padded, f"the certified prefill's backward ({Sq:,} x {Skv:,} scores kept)",
                "train with shorter sequences, or run the forward under torch.no_grad()")  # fmt: skip
    kc, vc = (t.transpose(1, 2).contiguous() for t in (k, v))
    seqlens = torch.full((B,), Skv, dtype=torch.int32, device=q.device)
    s = KeySummaries(kc.detach(), seqlens, None, block_size)
    qs, outs, errs = q.transpose(1, 2), [], []
    for a in range(0, Sq, chunk):
        start = torch.full((B,), Skv - Sq + a, dtype=torch.int64, device=q.device)
        o, e, _ = decode(ir, qs[:, a : a + chunk], kc, vc, seqlens, s, scale=scale, eps=eps, bias=bias, q_start=start)
        outs.append(o)
        errs.append(e)
    return torch.cat(outs, 1).transpose(1, 2), torch.cat(errs, 1).transpose(1, 2)


def _top_p(run, attend_blk, logc, log_ratio: float):
    """Certified top-p: compute the attend blocks, then in rounds the unread blocks that some row
    still needs, highest bound (over the group's rows) first -- ``FIRST_ROUND`` or 1/``FIRST_SHARE``
    of the blocks per (sequence, KV head), ``GROWTH`` times more each round -- until for every row
    the bound on the unread mass is at most ``exp(log_ratio)`` times its exact kept mass. Round
    ``MAX_ROUNDS`` computes every block some row still needs: each row's unread tail is then within
    its bound under the mass kept before the round, which only grew, so that round is the last.

    ``logc`` ``[B, Hkv, G, Sq, NB]``: log of (candidate keys x e^bound) per select block, -inf
    elsewhere. Returns ``(o, lse, read)`` over the blocks read, ``read [B, Hkv, NB]``.
    """
    B, Hkv, G, Sq, NB = logc.shape
    o, lse = run(attend_blk)
    read, budget, left = attend_blk.clone(), max(FIRST_ROUND, -(-NB // FIRST_SHARE)), MAX_ROUNDS
    best = logc.flatten(2, 3).amax(2)  # [B, Hkv, NB]: the group's highest bound per block
    while True:
        ordered, order = torch.where(read[:, :, None, None], -math.inf, logc).sort(-1, descending=True)
        tail = ordered.flip(-1).logcumsumexp(-1).flip(-1)  # unread mass bound from rank r on
        needed = tail > lse.view(B, Hkv, G, Sq, 1).double() + log_ratio  # a prefix of each row's ranks
        if not bool(needed.any()):
            return o, lse, read
        wanted = torch.zeros_like(needed).scatter(-1, order, needed).flatten(2, 3).any(2) & ~read
        new = wanted
        if left > 1:  # else all that is wanted: each row's unread tail is then within its bound already
            top = torch.where(wanted, best, -math.inf).topk(min(budget, NB), dim=-1).indices
            new = torch.zeros_like(wanted).scatter(-1, top, True) & wanted
        o, lse = _merge((o, lse), run(new))
        read, budget, left = read | new, budget * GROWTH, left - 1


def candidate_blocks(ir: PatternIR, cache_seqlens: torch.Tensor, Sq: int, summaries: KeySummaries) -> torch.Tensor:
    """Blocks holding a candidate key (``attend ∪ select``) of some query row.

    Parameters
    ----------
    ir: the pattern; cache_seqlens: int ``[B]``; Sq: queries per sequence; summaries: the blocks.

    Returns
    -------
    bool ``[B, NB]`` (the denominator of the fraction of blocks read).
    """
    NB, bs = summaries.num_blocks, summaries.block_size
    _, cand = _token_masks(ir, cache_seqlens, Sq, NB * bs)
    return cand.view(cand.shape[0], Sq, NB, bs).any(-1).any(1)


def block_lists(chosen: torch.Tensor, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernels' form of a block choice.

    Parameters
    ----------
    chosen: bool ``[B, Hkv, NB]``.
    width: the lists' length ``L`` (at least the largest count); None for ``max(1, largest count)``,
        which costs a host synchronization.

    Returns
    -------
    ``(lists, counts)``: int32 ``[B, Hkv, L]`` block indices, ascending, padded with 0, and int32
    ``[B, Hkv]`` counts.
    """
    counts = chosen.sum(-1)
    if width is None:
        width = max(1, int(counts.max()) if counts.numel() else 1)
    order = torch.argsort((~chosen).to(torch.int8), dim=-1, stable=True)[..., :width]
    lists = torch.where(torch.arange(width, device=chosen.device) < counts[..., None], order, 0)
    return lists.to(torch.int32).contiguous(), counts.to(torch.int32).contiguous()


def weights_log(s: torch.Tensor, scale: float, bias: float, score: tuple[str, int] | None) -> torch.Tensor:
    """Log-weights of raw scores ``q·k``.

    Parameters
    ----------
    s: raw scores; scale, bias: as ``op.decode``; score: None (softmax) or ``("relu", alpha)``.

    Returns
    -------
    ``scale·s`` (softmax), or ``alpha·log(relu(scale·s − bias))`` (-inf where the weight is 0).
    """
    if score is None:
        return s * scale
    x = s * scale - bias
    return torch.where(x > 0, score[1] * torch.log(x.clamp(min=torch.finfo(x.dtype).tiny)), -math.inf)


def run_blocks_torch(
    rows: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor | None,
    chosen: torch.Tensor,
    cand_tok: torch.Tensor,
    seqlens: torch.Tensor,
    Sq: int,
    scale: float,
    bias: float,
    score: tuple[str, int] | None,
    bs: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The CPU backend: attention of each KV head's rows over the chosen blocks' candidate keys, fp32.

    Parameters
    ----------
    rows: ``[B, Hkv, R, D]``, row ``g * Sq + j`` (query head ``g`` of the group, query ``j``).
    k_cache, v_cache, block_table, seqlens: the cache, as ``op.decode``.
    chosen: bool ``[B, Hkv, NB]``, the blocks (of ``bs`` tokens) to read.
    cand_tok: bool ``[B, Sq, NB * bs]``, each query's candidate keys.
    scale, bias, score: see :func:`weights_log`.

    Returns
    -------
    ``(o [B, Hkv, R, Dv], lse [B, Hkv, R])``: normalized output and natural-log sum of the weights
    over the keys read (0 and -inf for a row that read nothing).
    """
    B, Hkv, R, _ = rows.shape
    lists, counts = block_lists(chosen)
    L = lists.shape[-1]
    tok = (lists.long()[..., None] * bs + torch.arange(bs, device=rows.device)).view(B, Hkv, L * bs)
    in_list = (torch.arange(L, device=rows.device) < counts[..., None]).repeat_interleave(bs, -1)
    b_idx = torch.arange(B, device=rows.device)[:, None, None]
    h_idx = torch.arange(Hkv, device=rows.device)[None, :, None]
    at = tok.clamp(max=(block_table.shape[1] * k_cache.shape[1] if block_table is not None else k_cache.shape[1]) - 1)
    k = gather_rows(k_cache, b_idx, at, block_table, h_idx).float()  # [B, Hkv, T, D]
    v = gather_rows(v_cache, b_idx, at, block_table, h_idx).float()
    visible = torch.gather(cand_tok[:, None].expand(B, Hkv, Sq, -1), 3, tok[:, :, None].expand(B, Hkv, Sq, L * bs))
    visible = (visible & in_list[:, :, None]).repeat(1, 1, R // Sq, 1)  # [B, Hkv, R, T]
    s = weights_log(rows.float() @ k.transpose(-1, -2), scale, bias, score).masked_fill(~visible, -math.inf)
    lse = s.logsumexp(-1)
    p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    return p @ v, lse


#: The CPU backend: torch bounds and blocks.
TORCH = Backend(box_bound, run_blocks_torch)
