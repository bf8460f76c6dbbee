"""The Triton target: the IR's ``keep`` / ``classify`` as Triton expressions.

:class:`TritonOps` is the ops backend the IR's methods run on; it builds :mod:`.expr` nodes and
remembers which jitted helpers (``_floor_pow2``...) the expressions call.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..core.ir import INT_LIMIT, PatternIR
from .expr import Node, call, render, var


def _positive(b, what: str) -> int:
    if not isinstance(b, int) or isinstance(b, bool) or b < 1:
        raise ValueError(f"{what} in generated code needs a positive constant, got {b!r}")
    return b


class TritonOps:
    """Ops backend emitting Triton: ``_fdiv`` / ``_fmod`` floor like Python, ``tl.*`` elsewhere."""

    def __init__(self):
        self.pow_bases: set[int] = set()

    def abs(self, x):
        return call("tl.abs", x, hint="a" + x.hint if isinstance(x, Node) and x.hint else "abs")

    def fdiv(self, a, b: int):
        return call("_fdiv", a, _positive(b, "floor division"))

    def fmod(self, a, b: int):
        return call("_fmod", a, _positive(b, "modulo"))

    def minimum(self, a, b):
        return call("tl.minimum", a, b)

    def maximum(self, a, b):
        return call("tl.maximum", a, b)

    def where(self, c, a, b):
        return call("tl.where", c, a, b)

    def not_(self, x):
        return ~x

    def true_like(self, x):
        return True

    def floor_pow(self, x, b: int):
        """``_floor_pow(x, b, n)``: the jitted helper (prefill template) unrolls b, b**2, ... b**n < 2**31."""
        self.pow_bases.add(_positive(b, "a power base"))
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
