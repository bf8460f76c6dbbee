"""Shared Hypothesis strategies: random primitives, expressions and patterns over every primitive.

Import as ``from tests.strategies import exprs, pattern_irs, primitives`` (``tests/conftest.py``
puts the repository root on ``sys.path``). Arguments are small and always valid (``check()`` is
empty), so the drawn patterns are dense enough to be interesting at lengths of a few dozen tokens.
"""

from __future__ import annotations

import os

from hypothesis import strategies as st

from spdsl.core import ir
from spdsl.core import primitives as prims

# One strategy per primitive name, drawing valid small arguments. Every name in prims.PRIMITIVES must
# appear here (checked at import time, so a new primitive cannot silently escape the property tests).
_ARGS = {
    "all": st.just(()),
    "sink": st.tuples(st.integers(1, 4)),
    "local": st.tuples(st.integers(1, 5)),
    "powers": st.tuples(st.integers(2, 4)),
    "stride": st.tuples(st.integers(1, 5)),
    "dilated": st.tuples(st.integers(1, 4), st.integers(1, 4)),
    "segment": st.tuples(st.integers(1, 5)),
    "every": st.tuples(st.integers(1, 4)),
    "band": st.integers(-4, 4).flatmap(lambda lo: st.tuples(st.just(lo), st.integers(lo, lo + 5))),
}
_missing = set(prims.PRIMITIVES) - set(_ARGS)
if _missing:  # pragma: no cover - fires only when a primitive is added without a strategy
    raise ImportError(f"tests/strategies.py has no argument strategy for primitive(s) {sorted(_missing)}")

PRIMITIVE_NAMES = sorted(prims.PRIMITIVES)


def n_examples(n: int) -> int:
    """``max_examples`` for a property test: ``n`` times ``$SPDSL_EXAMPLES_SCALE`` (default 1), so a
    nightly or bug-hunting run can ask for 10x without editing the tests."""
    return max(1, round(n * float(os.environ.get("SPDSL_EXAMPLES_SCALE", "1"))))


def primitive_of(name: str) -> st.SearchStrategy[ir.Primitive]:
    """A primitive of the given name with small valid arguments."""
    cls = prims.PRIMITIVES[name]
    return _ARGS[name].map(lambda args: cls(*args))


def primitives() -> st.SearchStrategy[ir.Primitive]:
    """Any primitive in ``prims.PRIMITIVES`` with small valid arguments."""
    return st.sampled_from(PRIMITIVE_NAMES).flatmap(primitive_of)


def exprs(max_depth: int = 3) -> st.SearchStrategy[ir.Expr]:
    """Random expression trees: primitives combined with ``|``, ``&`` and ``-`` up to ``max_depth``."""
    if max_depth <= 0:
        return primitives()
    sub = exprs(max_depth - 1)
    return st.one_of(
        primitives(),
        primitives(),  # weight leaves so that trees stay small on average
        st.lists(sub, min_size=2, max_size=3).map(lambda ps: ir.Union(ps)),
        st.lists(sub, min_size=2, max_size=3).map(lambda ps: ir.Inter(ps)),
        st.tuples(sub, sub).map(lambda ab: ir.Diff(*ab)),
    )


def units() -> st.SearchStrategy[int]:
    """Tokens per unit: mostly 1..8, sometimes 16 or 64."""
    return st.one_of(st.integers(1, 8), st.integers(1, 8), st.sampled_from([16, 64]))


def pattern_irs(max_depth: int = 3, unit: st.SearchStrategy[int] | None = None) -> st.SearchStrategy[ir.PatternIR]:
    """A random checked pattern: expression, unit, causal or not."""
    return st.builds(
        lambda expr, u, causal: ir.PatternIR("p", u, causal, expr),
        exprs(max_depth),
        units() if unit is None else unit,
        st.booleans(),
    )


#: Sequence lengths, query offsets and tile sizes for layout properties (odd values on purpose).
lengths = st.integers(0, 70)
offsets = st.one_of(st.none(), st.integers(-80, 80))
blocks = st.integers(1, 16)


# Every primitive at least once (unit > 1, odd lengths, set operations), deterministically: Hypothesis
# may not draw all of them in a dozen examples. tests/test_kernel_interpret.py checks the coverage.
PRIMITIVE_CASES = [
    "unit 3 causal attend all",
    "unit 2 causal attend sink(2)",
    "unit 3 attend local(2)",
    "unit 2 causal attend powers(3)",
    "unit 1 attend stride(4)",
    "unit 2 causal attend dilated(3, 2)",
    "unit 4 attend segment(2)",
    "unit 1 causal attend every(3)",
    "unit 2 attend band(-1, 3)",
    "unit 2 causal attend (local(3) | sink(1)) & powers(2)",
    "unit 3 attend segment(3) - every(2)",
]
