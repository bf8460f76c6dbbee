"""Density matching: choose one integer parameter of a pattern so that its density meets a target.

Comparing patterns fairly means comparing them at the same density (the same attention work). The
density of a pattern at ``seq`` tokens is its visible over allowed (query, key) pairs
(:func:`spdsl.analyze.pair_density`), counted exactly from the analytic layout.

>>> import spdsl
>>> from spdsl.density import density_at, match_density
>>> ref = spdsl.compile("pattern p() { unit 64 causal attend sink(1) | local(5) | powers(2) }")
>>> sw = spdsl.compile("pattern sw(window = 2) { unit 64 causal attend sink(1) | local(window) }")
>>> m = match_density(sw, "window", density_at(ref, 8192), 8192)
>>> m.value, round(m.density, 4), round(m.target, 4)
(8, 0.1285, 0.1316)
"""

from __future__ import annotations

from dataclasses import dataclass

from .analyze import pair_density
from .errors import SpdError
from .layout import Layout
from .pattern import Pattern, as_pattern, compile


@dataclass(frozen=True)
class Match:
    """The chosen ``value`` of ``param``, the pattern with it, its density and the target."""

    param: str
    value: int
    pattern: Pattern
    density: float
    target: float
    #: no value in the range reaches the target: ``value`` is the closest the parameter gets
    out_of_reach: bool = False


def with_param(pattern: Pattern, name: str, value: int) -> Pattern:
    """``pattern`` recompiled from its source with parameter ``name`` set to ``value``."""
    if name not in pattern.params:
        have = ", ".join(pattern.params) or "none"
        raise SpdError(f"pattern {pattern.name} has no parameter {name!r} (its parameters: {have})")
    params = {**pattern.params, name: value}
    return compile(pattern.source, pattern=pattern.name, filename=pattern.filename, params=params)


def density_at(pattern, seq: int, block: int = 128) -> float:
    """Visible over allowed pairs at ``seq`` tokens (query and key lengths ``seq``)."""
    d = pair_density(Layout(as_pattern(pattern).ir, seq, seq, block, block))
    if d is None:
        raise SpdError(f"the density at seq={seq:,} is over the tiles limit to count; raise SPDSL_MAX_TILES")
    return d


def match_density(pattern, param: str, target: float, seq: int, *, lo: int = 1, hi: int | None = None) -> Match:
    """The value of ``param`` in ``[lo, hi]`` whose density at ``seq`` is closest to ``target``.

    The density must be monotone in the parameter (a window or width grows it, a stride's step
    shrinks it); bisection then needs O(log(hi - lo)) layouts. ``hi`` defaults to the sequence's
    length in units. Ties go to the smaller value.
    """
    p = as_pattern(pattern)
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target density must be in (0, 1], got {target!r}")
    hi = max(lo, -(-seq // p.unit)) if hi is None else hi
    if hi < lo:
        raise ValueError(f"empty range for {param}: lo={lo} > hi={hi}")
    cache: dict[int, float] = {}

    def dens(v: int) -> float:
        if v not in cache:
            cache[v] = density_at(with_param(p, param, v), seq)
        return cache[v]

    increasing = dens(hi) >= dens(lo)
    a, b = lo, hi  # invariant: the crossing of target lies in [a, b]
    while b - a > 1:
        mid = (a + b) // 2
        if (dens(mid) < target) == increasing:
            a = mid
        else:
            b = mid
    best = min((a, b), key=lambda v: (abs(dens(v) - target), v))
    reach = sorted((dens(lo), dens(hi)))
    out = not reach[0] <= target <= reach[1]
    return Match(param, best, with_param(p, param, best), dens(best), target, out)
