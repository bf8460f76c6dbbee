"""The refinement engine: split token rectangles at unit boundaries until the IR decides each piece.

Layouts (which tiles are visible, which are full), pair counting (density) and the reach graph
(which node pairs are linked) all ask the same question of many rectangles at once: does the
pattern keep *any* / *all* of it? The IR answers exactly for a primitive and soundly for set
operations; where it cannot tell, the rectangle is halved at a unit boundary (of ``grain``
units), along its longer side, and asked again. A single unit cell is always decided.

Torch and :mod:`spdsl.core.ir` only: generated modules embed this file.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .ir import PatternIR, TorchOps


class Pieces(NamedTuple):
    """One round of :func:`refine`: the current pieces of the rectangles and what the IR says."""

    origin: torch.Tensor  # index of the rectangle each piece came from
    p0: torch.Tensor  # first and last query token, first and last key token
    p1: torch.Tensor
    k0: torch.Tensor
    k1: torch.Tensor
    any: torch.Tensor  # some cell kept (sound: False means none)
    all: torch.Tensor  # every cell kept (sound)
    proven: torch.Tensor  # any/all are exact
    stuck: torch.Tensor  # undecided (maybe mixed) single grain cell: not split further; see refine_exact


def refine(ir: PatternIR, p0, p1, k0, k1, *, causal: bool = False, grain: int = 1, live=None):
    """Yield :class:`Pieces` round by round until every piece is all kept, none kept, or stuck.

    ``p0..k1`` are int64 token bounds (inclusive) of the rectangles; query positions may be
    negative. ``causal`` intersects with the token-level cut ``k <= q`` (always exact). Pieces
    with ``any & ~all`` are split after each round unless ``live(pieces)`` (a bool per piece) says
    they no longer matter; ``grain`` (units) is the finest split.
    """
    N = ir.unit
    origin = torch.arange(p0.numel(), dtype=torch.int64)
    while origin.numel():
        Qa, Qb, Ka, Kb = p0 // N, p1 // N, k0 // N, k1 // N
        any_, all_, proven = (
            torch.as_tensor(x).expand(Qa.shape) for x in ir.expr.classify_proven(TorchOps, Qa, Qb, Ka, Kb)
        )
        if causal:
            c_any, c_all = k0 <= p1, k1 <= p0
            mixed_ok = (~all_ & c_all & proven) | (all_ & ~c_all)
            any_, all_ = any_ & c_any, all_ & c_all
            proven = all_ | ~any_ | mixed_ok
        ga, gb, ha, hb = Qa // grain, Qb // grain, Ka // grain, Kb // grain
        todo = any_ & ~all_
        single = todo & (ga == gb) & (ha == hb)
        if grain == 1 and bool((single & ~proven).any()):
            raise AssertionError("refinement failed to decide a unit cell")
        pieces = Pieces(origin, p0, p1, k0, k1, any_, all_, proven, single)
        yield pieces
        todo &= ~single
        if live is not None:
            todo &= live(pieces)
        if not bool(todo.any()):
            return
        origin, p0, p1, k0, k1 = origin[todo], p0[todo], p1[todo], k0[todo], k1[todo]
        ga, gb, ha, hb = ga[todo], gb[todo], ha[todo], hb[todo]
        split_q = (gb - ga) >= (hb - ha)
        q_mid = (ga + (gb - ga + 1) // 2) * (grain * N)
        k_mid = (ha + (hb - ha + 1) // 2) * (grain * N)
        origin = torch.cat([origin, origin])
        p0, p1 = torch.cat([p0, torch.where(split_q, q_mid, p0)]), torch.cat([torch.where(split_q, q_mid - 1, p1), p1])
        k0, k1 = torch.cat([k0, torch.where(split_q, k0, k_mid)]), torch.cat([torch.where(split_q, k1, k_mid - 1), k1])


def settle(ir: PatternIR, p0, p1, k0, k1, causal: bool = False):
    """(some cell kept, some cell not kept) of each rectangle, exactly: refined down to single units."""
    kept = torch.zeros(p0.numel(), dtype=torch.int64)
    empty = torch.zeros_like(kept)
    for pieces in refine(ir, p0, p1, k0, k1, causal=causal):
        kept.index_add_(0, pieces.origin, (pieces.all | pieces.stuck).to(torch.int64))
        empty.index_add_(0, pieces.origin, (~pieces.any | pieces.stuck).to(torch.int64))
    return kept > 0, empty > 0


def refine_exact(ir: PatternIR, p0, p1, k0, k1, *, causal: bool = False, grain: int = 1, live=None):
    """:func:`refine` where ``stuck`` means truly mixed: a grain cell the set operations cannot decide
    (operands that only jointly cover it) is settled unit by unit and reported all kept or none."""
    for pieces in refine(ir, p0, p1, k0, k1, causal=causal, grain=grain, live=live):
        cell = torch.nonzero(pieces.stuck & ~pieces.proven).flatten()
        if cell.numel():
            kept, empty = settle(ir, pieces.p0[cell], pieces.p1[cell], pieces.k0[cell], pieces.k1[cell], causal)
            any_, all_, proven, stuck = (x.clone() for x in (pieces.any, pieces.all, pieces.proven, pieces.stuck))
            any_[cell], all_[cell], proven[cell], stuck[cell] = kept, ~empty, True, kept & empty
            pieces = pieces._replace(any=any_, all=all_, proven=proven, stuck=stuck)
        yield pieces
