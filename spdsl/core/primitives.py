"""The primitives of the language: one class each, knowing its predicate (``keep``), its exact
rectangle classification (``classify``) and the key intervals it may touch (``candidates``).

A new primitive is one class here (a subclass of :class:`~spdsl.core.ir.Primitive`; it registers
itself in :data:`PRIMITIVES` under its ``name``) and its tests; the grammar parses any name and
:mod:`spdsl.lower` resolves it here. Torch and :mod:`spdsl.core.ir` only (embedded in generated
modules, tree-shaken to the primitives a pattern uses).
"""

from __future__ import annotations

import torch

from .ir import INT_LIMIT, Primitive

__all__ = ["PRIMITIVES", "All", "Band", "Dilated", "Every", "Local", "Powers", "Segment", "Sink", "Stride"]


def _multiple_in(ops, lo, hi, s: int):
    """Whether some multiple of s (s >= 1) lies in [lo, hi], for lo >= 0."""
    return (hi >= lo) & (ops.fdiv(hi, s) * s >= lo)


def _abs_range(ops, Qa, Qb, Ka, Kb):
    """Smallest and largest |Q - K| over the rectangle; every value in between occurs too."""
    dlo, dhi = Qa - Kb, Qb - Ka
    return ops.maximum(ops.maximum(dlo, -dhi), 0), ops.maximum(dhi, -dlo)


def _residue_intervals(Qa, Qb, s: int, kmax: int, span: int):
    """Key-unit intervals {[Qa + m*s, Qb + m*s]} inside [0, kmax]: keys K with K = Q (mod s).

    When one kv tile (``span`` key units) or the query range is as wide as the spacing, every
    tile in reach has a hit and one covering interval is returned (keeps enumeration O(output)).
    """
    width = int((Qb - Qa).max().item()) + 1 if Qa.numel() else 0
    if s <= span or s <= width:
        return torch.zeros_like(Qa)[:, None], torch.full_like(Qa, kmax)[:, None]
    m0 = -torch.div(Qb, s, rounding_mode="floor")  # smallest m with Qb + m*s >= 0
    shift = (m0[:, None] + torch.arange(kmax // s + 2, dtype=Qa.dtype)) * s
    return Qa[:, None] + shift, Qb[:, None] + shift


def _positive(prim: Primitive, idx: int, least: int = 1) -> list[tuple[int, str]]:
    v = prim.args[idx]
    if v < least:
        return [(idx, f"{prim.name}({', '.join(prim.arg_names)}) needs {prim.arg_names[idx]} >= {least}, got {v}")]
    return []


class All(Primitive):
    name = "all"
    doc = "every key"

    def keep(self, ops, Q, K):
        return (Q == Q) & (K == K)

    def classify(self, ops, Qa, Qb, Ka, Kb):
        t = Qa == Qa
        return t, t

    def candidates(self, Qa, Qb, kmax, span):
        return torch.zeros_like(Qa)[:, None], torch.full_like(Qa, kmax)[:, None]


class Sink(Primitive):
    name, arg_names = "sink", ("s",)
    doc = "the first s key units (attention sinks)"

    def check(self):
        return _positive(self, 0)

    def keep(self, ops, Q, K):
        return (K < self.s) & (Q == Q)

    def classify(self, ops, Qa, Qb, Ka, Kb):
        return (Ka < self.s) & (Qa == Qa), (Kb < self.s) & (Qa == Qa)

    def candidates(self, Qa, Qb, kmax, span):
        return torch.zeros_like(Qa)[:, None], torch.full_like(Qa, self.s - 1)[:, None]


class Local(Primitive):
    name, arg_names = "local", ("w",)
    doc = "unit distance |d| < w (sliding window, both sides unless causal)"

    def check(self):
        return _positive(self, 0)

    def keep(self, ops, Q, K):
        return ops.abs(Q - K) < self.w

    def classify(self, ops, Qa, Qb, Ka, Kb):
        amin, amax = _abs_range(ops, Qa, Qb, Ka, Kb)
        return amin < self.w, amax < self.w

    def candidates(self, Qa, Qb, kmax, span):
        return (Qa - self.w + 1)[:, None], (Qb + self.w - 1)[:, None]


class Powers(Primitive):
    name, arg_names = "powers", ("b",)
    doc = "unit distance |d| = b**i for some i >= 0 (PowerAttention)"

    def check(self):
        return _positive(self, 0, least=2)

    def keep(self, ops, Q, K):
        ad = ops.abs(Q - K)
        return (ad >= 1) & (ops.floor_pow(ad, self.b) == ad)

    def classify(self, ops, Qa, Qb, Ka, Kb):
        amin, amax = _abs_range(ops, Qa, Qb, Ka, Kb)
        lo = ops.maximum(amin, 1)
        any_ = (amax >= lo) & (ops.floor_pow(amax, self.b) >= lo)
        single = (amin == amax) & (amin >= 1) & (ops.floor_pow(amin, self.b) == amin)
        all_ = single | ((amin == 1) & (amax == 2)) if self.b == 2 else single
        return any_, all_

    def candidates(self, Qa, Qb, kmax, span):
        pows = []
        p = 1
        reach = kmax + (int(Qa.abs().max().item()) + int(Qb.abs().max().item()) if Qa.numel() else 0) + 1
        while p <= reach and p < INT_LIMIT:
            pows.append(p)
            p *= self.b
        pw = torch.tensor(pows, dtype=Qa.dtype)
        lo = torch.cat([Qa[:, None] - pw, Qa[:, None] + pw], 1)
        hi = torch.cat([Qb[:, None] - pw, Qb[:, None] + pw], 1)
        return lo, hi


class Stride(Primitive):
    name, arg_names = "stride", ("s",)
    doc = "unit distance a multiple of s (strided attention)"

    def check(self):
        return _positive(self, 0)

    def keep(self, ops, Q, K):
        return ops.fmod(ops.abs(Q - K), self.s) == 0

    def classify(self, ops, Qa, Qb, Ka, Kb):
        amin, amax = _abs_range(ops, Qa, Qb, Ka, Kb)
        all_ = (amin == amax) & (ops.fmod(amin, self.s) == 0) if self.s > 1 else amin == amin
        return _multiple_in(ops, amin, amax, self.s), all_

    def candidates(self, Qa, Qb, kmax, span):
        return _residue_intervals(Qa, Qb, self.s, kmax, span)


class Dilated(Primitive):
    name, arg_names = "dilated", ("w", "r")
    doc = "|d| < w*r and |d| a multiple of r (dilated window)"

    def check(self):
        errs = _positive(self, 0) + _positive(self, 1)
        if not errs and self.w * self.r >= INT_LIMIT:
            errs.append((0, f"dilated(w, r) needs w * r < 2**31, got {self.w} * {self.r} = {self.w * self.r}"))
        return errs

    def keep(self, ops, Q, K):
        ad = ops.abs(Q - K)
        return (ad < self.w * self.r) & (ops.fmod(ad, self.r) == 0)

    def classify(self, ops, Qa, Qb, Ka, Kb):
        amin, amax = _abs_range(ops, Qa, Qb, Ka, Kb)
        reach = self.w * self.r - 1
        any_ = _multiple_in(ops, amin, ops.minimum(amax, reach), self.r)
        all_ = (amax <= reach) & (((amin == amax) & (ops.fmod(amin, self.r) == 0)) if self.r > 1 else amin == amin)
        return any_, all_

    def candidates(self, Qa, Qb, kmax, span):
        reach = self.w * self.r - 1
        if self.r <= span or self.w <= 2:
            return (Qa - reach)[:, None], (Qb + reach)[:, None]
        j = torch.arange(-(self.w - 1), self.w, dtype=Qa.dtype) * self.r
        return Qa[:, None] + j, Qb[:, None] + j


class Segment(Primitive):
    name, arg_names = "segment", ("L",)
    doc = "query and key in the same segment of L units (Q // L == K // L)"

    def check(self):
        return _positive(self, 0)

    def keep(self, ops, Q, K):
        return ops.fdiv(Q, self.L) == ops.fdiv(K, self.L)

    def classify(self, ops, Qa, Qb, Ka, Kb):
        L = self.L
        qa, qb, ka, kb = ops.fdiv(Qa, L), ops.fdiv(Qb, L), ops.fdiv(Ka, L), ops.fdiv(Kb, L)
        any_ = ops.maximum(qa, ka) <= ops.minimum(qb, kb)
        all_ = (qa == qb) & (ka == kb) & (qa == ka)
        return any_, all_

    def candidates(self, Qa, Qb, kmax, span):
        L = self.L
        return ((Qa // L) * L)[:, None], ((Qb // L) * L + L - 1)[:, None]


class Every(Primitive):
    name, arg_names = "every", ("r",)
    doc = "key units that are multiples of r (global strided keys)"

    def check(self):
        return _positive(self, 0)

    def keep(self, ops, Q, K):
        return (ops.fmod(K, self.r) == 0) & (Q == Q)

    def classify(self, ops, Qa, Qb, Ka, Kb):
        all_ = (Ka == Kb) & (ops.fmod(Ka, self.r) == 0) if self.r > 1 else Ka == Ka
        return _multiple_in(ops, Ka, Kb, self.r) & (Qa == Qa), all_ & (Qa == Qa)

    def candidates(self, Qa, Qb, kmax, span):
        zero = torch.zeros_like(Qa)
        return _residue_intervals(zero, zero, self.r, kmax, span)


class Band(Primitive):
    name, arg_names = "band", ("lo", "hi")
    doc = "lo <= d <= hi (an arbitrary diagonal band)"

    def check(self):
        if self.lo > self.hi:
            return [(1, f"band(lo, hi) needs lo <= hi, got lo={self.lo} > hi={self.hi}")]
        return []

    def keep(self, ops, Q, K):
        d = Q - K
        return (d >= self.lo) & (d <= self.hi)

    def classify(self, ops, Qa, Qb, Ka, Kb):
        dlo, dhi = Qa - Kb, Qb - Ka
        return (dhi >= self.lo) & (dlo <= self.hi), (dlo >= self.lo) & (dhi <= self.hi)

    def candidates(self, Qa, Qb, kmax, span):
        return (Qa - self.hi)[:, None], (Qb - self.lo)[:, None]


#: Every primitive by its name in the language, in definition order (every subclass above).
PRIMITIVES: dict[str, type[Primitive]] = {cls.name: cls for cls in Primitive.__subclasses__()}
