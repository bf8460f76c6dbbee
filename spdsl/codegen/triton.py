"""The Triton target: the IR's ``keep`` / ``classify`` as Triton expressions.

:class:`TritonOps` is the ops backend the IR's methods run on; it builds :mod:`.expr` nodes and
remembers which jitted helpers (``_floor_pow2``...) the expressions call.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..core.ir import INT_LIMIT, PatternIR
from .expr import EmitOps, call, positive, render, var


class TritonOps(EmitOps):
    """Ops backend emitting Triton: ``_fdiv`` / ``_fmod`` floor like Python, ``tl.*`` elsewhere."""

    ABS, MIN, MAX, WHERE = "tl.abs", "tl.minimum", "tl.maximum", "tl.where"

    def floor_pow(self, x, b: int):
        """``_floor_pow(x, b, n)``: the jitted helper (prefill template) unrolls b, b**2, ... b**n < 2**31."""
        self.pow_bases.add(positive(b, "a power base"))
        n, p = 0, b
        while p < INT_LIMIT:
            n, p = n + 1, p * b
        return call("_floor_pow", x, b, n, hint=f"pow{b}")


@dataclass
class Emitted:
    """Straight-line Triton for one expression: ``lines`` bind shared subexpressions, then ``expr``.

    ``expr`` is the expression's text, or True/False when it folded to a constant.
    """

    lines: list[str]
    expr: str | bool
    pow_bases: set[int] = field(default_factory=set)


#: Names the kernel templates use around the emitted code (never chosen for a bound subexpression).
RESERVED = {"qu", "ku", "qpos", "kpos", "kv_len", "keep", "qa", "qb", "ka", "kb", "vis", "tl", "triton"}


def predicate(pat: PatternIR, q_units: str = "qu[:, None]", k_units: str = "ku[None, :]") -> Emitted:
    """The attend expression (no causal cut) over unit-index vectors."""
    ops = TritonOps()
    lines, (expr,) = render([pat.expr.keep(ops, var(q_units), var(k_units))], RESERVED)
    return Emitted(lines, expr, ops.pow_bases)


def tile_test(pat: PatternIR) -> Emitted:
    """May a kv tile with key units [ka, kb] hold a key that query units [qa, qb] see? (sound: never
    drops a visible tile; exact for single primitives and unions)."""
    ops = TritonOps()
    any_, _ = pat.expr.classify(ops, var("qa"), var("qb"), var("ka"), var("kb"))
    lines, (expr,) = render([any_], RESERVED)
    return Emitted(lines, expr, ops.pow_bases)
