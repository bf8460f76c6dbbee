"""Fuzzing the front end: whatever the text, compile_ir returns a PatternIR or raises SpdError.

* grammatical texts drawn from the grammar itself (``hypothesis.extra.lark.from_lark``) must
  parse, and lower to an IR or a located SpdError;
* shipped-style patterns with random deletions, insertions and replacements, and random unicode,
  may only ever raise SpdError (a slow test runs 10,000 mutated files, shipped patterns among the
  seeds, through ``spdsl.compile``);
* random overrides may only ever raise SpdError;
* random *valid* programs (set expressions printed with minimal parentheses, integers as small
  expressions over a parameter) lower to exactly the IR built directly from ``spdsl.ir``.
"""

from __future__ import annotations

import keyword
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.lark import from_lark

import spdsl
from spdsl import SpdError
from spdsl.core import ir
from spdsl.core import primitives as prims
from spdsl.lower import compile_ir
from spdsl.parser import lark_parser, parse
from tests.strategies import n_examples

ROOT = Path(__file__).resolve().parent.parent
FUZZ = settings(max_examples=n_examples(300), deadline=None, suppress_health_check=[HealthCheck.too_slow])

SEEDS = [
    """# patterns/power.spd — PowerAttention, arXiv 2503.03588, Algorithm 1
pattern power(window = 5, sinks = 1) {
    unit 256                                  # tokens per pattern block
    causal
    attend sink(sinks) | local(window) | powers(2)
}
""",
    """# LongNet-style dilated segments
pattern longnet(base = 8) {
    unit 64
    causal
    attend segment(base) & every(1) | segment(2 * base) & every(2)
    attend segment(4 * base) & every(4) | (segment(128) & every(base * 2))
}
""",
    """pattern stride_slash(s = 8) { unit 256; causal; attend sink(1) | local(6) | stride(s) }
pattern dilated(w = 20, r = 1) { attend dilated(w, r) - band(-1, -1 + 0 * w // r % 3) }
""",
]

KEYWORDS = {"pattern", "unit", "causal", "attend", "score", "select"}
NAMES = [*prims.PRIMITIVES, "w", "s", "window", "x", "locl", "all", "relu"]


def _name_strategy() -> st.SearchStrategy[str]:
    fresh = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,6}", fullmatch=True)
    return st.one_of(st.sampled_from(NAMES), fresh.filter(lambda n: n not in KEYWORDS))


def _grammatical(start: str) -> st.SearchStrategy[str]:
    """Texts drawn from the grammar from rule ``start``, with terminals chosen to keep them lexable."""
    strategy = from_lark(
        lark_parser(),
        start=start,
        explicit={
            # keywords need a space around them, or they would glue to a neighbouring name
            **{kw.upper(): st.just(f" {kw} ") for kw in KEYWORDS},
            "NAME": _name_strategy(),
            "INT": st.one_of(st.integers(0, 12), st.integers(0, 2**32)).map(str),
            "COMMENT": st.sampled_from(["#\n", "# a comment (x) {\n", "#\u00e9\u2028\x00}\n"]),
            "WS": st.sampled_from([" ", "\n", "\t", "\r\n", "  \n  "]),
        },
    )
    # The expression rules branch more than once on average, so uniform choices draw huge
    # trees that Hypothesis then discards (a 250-example run took over a minute). Weighting
    # their shortest alternative keeps most draws small. This reaches into Hypothesis'
    # LarkStrategy, so it is skipped -- the test just runs slower -- if those internals change.
    rules = getattr(getattr(strategy, "wrapped_strategy", None), "nonterminal_strategies", None)
    if isinstance(rules, dict):
        for name, choice in list(rules.items()):
            alternatives = list(getattr(choice, "elements", ()))
            if len(alternatives) > 1 and any(w in name for w in ("expr", "term", "factor", "atom")):
                rules[name] = st.sampled_from([alternatives[0]] * 4 + alternatives[1:])
    return strategy


GRAMMATICAL = st.one_of(_grammatical("start"), _grammatical("pattern_def"))


def check_only_spd_errors(text: str, **kw) -> None:
    """compile_ir returns a PatternIR or raises a well-formed SpdError; nothing else escapes."""
    try:
        result = compile_ir(text, filename="fuzz.spd", **kw)
    except SpdError as e:
        report = str(e)
        assert report.startswith("fuzz.spd")
        assert e.line is None or 1 <= e.line <= text.count("\n") + 1
        return
    assert isinstance(result, ir.PatternIR)
    assert result.unit >= 1 and result.text()


@settings(max_examples=n_examples(120), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(GRAMMATICAL)
def test_grammatical_text_parses_and_lowers_or_spd_error(text):
    try:
        program = parse(text)
    except SpdError as e:
        # the only refusals allowed for grammatical text: no pattern, too deep, too large a number
        assert any(s in e.message for s in ("no pattern", "nested too deeply", "too large")), str(e)
        return
    assert all(p.name.isidentifier() for p in program.patterns)
    check_only_spd_errors(text)
    for p in program.patterns:
        check_only_spd_errors(text, pattern=p.name)


MUTATION_CHARS = st.one_of(
    st.sampled_from(list("(){}|&-+*/%,=;#\n\t 0123456789_aelmnoprstuw")),
    st.characters(),  # any code point, surrogates and controls included
)


@st.composite
def mutated(draw, seeds=tuple(SEEDS)) -> str:
    """One of ``seeds`` with 1-6 random edits: a character deleted, inserted or replaced, or the rest cut."""
    text = draw(st.sampled_from(seeds))
    for _ in range(draw(st.integers(1, 6))):
        pos = draw(st.integers(0, len(text)))
        op = draw(st.sampled_from(["delete", "insert", "replace", "cut"]))
        if op == "delete":
            text = text[:pos] + text[pos + 1 :]
        elif op == "insert":
            text = text[:pos] + draw(MUTATION_CHARS) + text[pos:]
        elif op == "replace":
            text = text[:pos] + draw(MUTATION_CHARS) + text[pos + 1 :]
        else:
            text = text[:pos]
    return text


@FUZZ
@given(mutated())
def test_mutated_patterns_raise_only_spd_error(text):
    check_only_spd_errors(text)


SHIPPED = tuple(p.read_text(encoding="utf-8") for p in sorted((ROOT / "patterns").glob("*.spd")))


@pytest.mark.slow
@settings(max_examples=n_examples(10_000), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated(seeds=(*SEEDS, *SHIPPED)))
def test_10000_mutated_files_through_spdsl_compile_raise_only_spd_error(text):
    """The CI-sized subset is test_mutated_patterns_raise_only_spd_error (300 examples, compile_ir)."""
    try:
        pattern = spdsl.compile(text, filename="fuzz.spd")
    except SpdError as e:
        assert str(e).startswith("fuzz.spd")
        assert e.line is None or 1 <= e.line <= text.count("\n") + 1
        return
    assert isinstance(pattern, spdsl.Pattern) and pattern.source == text
    assert pattern.unit >= 1 and pattern.text()


@settings(max_examples=n_examples(150), deadline=None)
@given(st.text())
def test_random_unicode_raises_only_spd_error(text):
    check_only_spd_errors(text)


@settings(max_examples=n_examples(150), deadline=None)
@given(
    st.sampled_from(SEEDS),
    st.dictionaries(
        st.one_of(st.sampled_from(["window", "sinks", "base", "s", "w", "r"]), st.text(max_size=5)),
        st.one_of(st.integers(), st.booleans(), st.none(), st.floats(), st.text(max_size=3)),
        max_size=3,
    ),
)
def test_random_overrides_raise_only_spd_error(text, overrides):
    check_only_spd_errors(text, overrides=overrides)


@settings(max_examples=n_examples(60), deadline=None)
@given(st.integers(1, 400), st.sampled_from(["(", "-", "all | (", "local(", "(" * 3 + "-"]))
def test_deep_or_unbalanced_nesting_raises_only_spd_error(depth, piece):
    check_only_spd_errors(f"pattern p {{ attend {piece * depth}")
    check_only_spd_errors(f"pattern p {{ attend {piece * depth}all{')' * depth} }}")


def test_python_keywords_never_reach_the_ir():
    for word in keyword.kwlist:
        check_only_spd_errors(f"pattern {word}({word} = 1) {{ attend all }}")


# --- random valid programs: the text and the IR it must lower to ----------------------------

LEAST = {"powers": 2}  # smallest valid argument; band's (lo, hi) is ordered below; others >= 1
PRECEDENCE = {"|": 1, "-": 1, "&": 2}


@st.composite
def int_text(draw, value: int) -> str:
    """An integer expression over parameter w (= 3) that evaluates to ``value``."""
    forms = [
        f"{value}",
        f"({value} + w - w)",
        f"{2 * value} // 2",
        f"-(-{value})",
        f"(w * {value}) // w",
        f"{value} % 2147483647" if value >= 0 else f"{value}",
        f"{value}*1",
    ]
    return draw(st.sampled_from(forms))


@st.composite
def primitive(draw) -> tuple[str, int, ir.Expr]:
    cls = draw(st.sampled_from(list(prims.PRIMITIVES.values())))
    if cls.name == "band":
        lo, hi = sorted(draw(st.lists(st.integers(-40, 40), min_size=2, max_size=2)))
        args = [lo, hi]
    else:
        args = [draw(st.integers(LEAST.get(cls.name, 1), 40)) for _ in cls.arg_names]
    texts = [draw(int_text(a)) for a in args]
    if cls.arg_names:
        src = f"{cls.name}({', '.join(texts)})"
    else:
        src = draw(st.sampled_from(["all", "all()"]))
    return src, 3, cls(*args)


def combine(children: st.SearchStrategy) -> st.SearchStrategy:
    @st.composite
    def node(draw):
        op = draw(st.sampled_from("|&-"))
        (ls, lp, le), (rs, rp, re_) = draw(children), draw(children)
        prec = PRECEDENCE[op]
        full = draw(st.booleans())  # sometimes parenthesize everything
        ls = f"({ls})" if full or lp < prec else ls
        rs = f"({rs})" if full or rp <= prec else rs
        expected = ir.Diff(le, re_) if op == "-" else (ir.Union if op == "|" else ir.Inter)((le, re_))
        return f"{ls} {op} {rs}", prec, expected

    return node()


SET_EXPRS = st.recursive(primitive(), combine, max_leaves=8)


@settings(max_examples=n_examples(150), deadline=None)
@given(SET_EXPRS, st.integers(1, 512), st.booleans())
def test_random_valid_programs_lower_to_the_expected_ir(expr, unit, causal):
    src, _, expected = expr
    text = f"pattern rnd(w = 3) {{\n  unit {unit}\n{'  causal' if causal else ''}\n  attend {src}\n}}\n"
    got = compile_ir(text)
    want = ir.PatternIR("rnd", unit, causal, expected, {"w": 3})
    assert got.text() == want.text(), text
