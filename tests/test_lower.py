"""Lowering: semantic checks (each error located, with a hint), IR text of valid files, overrides."""

from __future__ import annotations

import pytest

import spdsl
from spdsl import SpdError
from spdsl.core import primitives as prims
from spdsl.lower import compile_ir, pattern_names

POWER = """\
# patterns/power.spd — PowerAttention, arXiv 2503.03588, Algorithm 1
pattern power(window = 5, sinks = 1) {
    unit 256                                  # tokens per pattern block
    causal
    attend sink(sinks) | local(window) | powers(2)
}
"""

TWO = """\
pattern first(w = 2) {
    attend local(w)
}

pattern second(s = 3, w = 1) {
    unit 16
    attend stride(s) & local(w + 8)
}
"""


def lower_error(text: str, **kw) -> SpdError:
    with pytest.raises(SpdError) as info:
        compile_ir(text, filename="f.spd", **kw)
    return info.value


def body(src: str, params: str = "") -> str:
    return f"pattern p({params}) {{\n    {src}\n}}\n"


def attend_text(src: str, params: str = "") -> str:
    """The IR text of the attend expression of ``pattern p(params) { attend src }``."""
    return compile_ir(body(f"attend {src}", params)).expr.text()


# --- valid files ---------------------------------------------------------------------------


def test_power_example():
    p = compile_ir(POWER)
    assert p.text() == ("pattern power(window=5, sinks=1)\nunit 256\ncausal\nattend (local(5) | powers(2) | sink(1))\n")
    assert p.params == {"window": 5, "sinks": 1}
    assert spdsl.compile(POWER).ir == p


def test_defaults_unit_1_and_not_causal():
    p = compile_ir("pattern p { attend all }")
    assert (p.name, p.unit, p.causal, p.params) == ("p", 1, False, {})
    assert p.text() == "pattern p()\nunit 1\nattend all\n"


def test_all_primitives_lower_to_their_classes():
    src = "all | sink(1) | local(2) | powers(3) | stride(4) | dilated(5, 6) | segment(7) | every(8) | band(-1, 2)"
    expr = compile_ir(body(f"attend {src}")).expr
    assert sorted(type(p).__name__ for p in expr.primitives()) == sorted(c.__name__ for c in prims.PRIMITIVES.values())
    assert compile_ir(body("attend all()")).expr == prims.All()


@pytest.mark.parametrize(
    "src, text",
    [
        ("local(1) | sink(1) & all", "((all & sink(1)) | local(1))"),
        ("local(1) | (sink(1) & all)", "((all & sink(1)) | local(1))"),
        ("(local(1) | sink(1)) & all", "((local(1) | sink(1)) & all)"),
        ("local(3) - sink(1) | all", "((local(3) - sink(1)) | all)"),
        ("local(3) - (sink(1) | all)", "(local(3) - (all | sink(1)))"),
        ("local(3) - sink(1) - all", "((local(3) - sink(1)) - all)"),
        ("local(3) | local(3)", "local(3)"),
    ],
)
def test_set_precedence_in_ir(src, text):
    assert attend_text(src) == text


@pytest.mark.parametrize(
    "expr, value",
    [
        ("1 + 2 * 3", 7),
        ("(1 + 2) * 3", 9),
        ("20 - 4 - 3", 13),
        ("-7 // 2 + 10", 6),  # floor division: -4
        ("-7 % 3 + 1", 3),  # Python modulo: 2
        ("7 % -3 + 5", 3),  # -2
        ("- -4", 4),
        ("w * 2 - w // 3", 9),
        ("65536 * 32767", 2147418112),
    ],
)
def test_integer_expressions_follow_python(expr, value):
    p = compile_ir(body(f"attend band({expr}, {expr})", "w = 5"))
    assert p.expr == prims.Band(value, value)


def test_multiple_attend_lines_are_unioned():
    p = compile_ir(body("attend sink(1)\n    attend local(4) & all\n    attend sink(1)"))
    assert p.expr.text() == "((all & local(4)) | sink(1))"


def test_comments_and_blank_lines():
    text = "\n# a\n\npattern p(  # params\n\n w = 3 # w\n) {\n\n  # nothing\n  unit 2 # u\n\n  attend local(w)\n}\n\n"
    assert compile_ir(text).text() == "pattern p(w=3)\nunit 2\nattend local(3)\n"


def test_defaults_may_use_earlier_parameters():
    text = "pattern p(w = 4, reach = 2 * w + 1) { attend band(-reach, reach) }"
    assert compile_ir(text).params == {"w": 4, "reach": 9}
    assert compile_ir(text, overrides={"w": 10}).params == {"w": 10, "reach": 21}
    assert compile_ir(text, overrides={"reach": 3}).params == {"w": 4, "reach": 3}


def test_params_keep_declaration_order_and_unit_expression():
    p = compile_ir("pattern p(b = 2, a = 1) { unit a * 64 causal attend local(b) }")
    assert list(p.params) == ["b", "a"] and p.unit == 64 and p.causal


# --- several patterns ----------------------------------------------------------------------


def test_several_patterns_first_is_default():
    assert compile_ir(TWO).name == "first"
    assert pattern_names(TWO) == ["first", "second"]


def test_select_pattern_by_name():
    p = compile_ir(TWO, pattern="second", overrides={"s": 5})
    assert p.text() == "pattern second(s=5, w=1)\nunit 16\nattend (local(9) & stride(5))\n"


def test_unknown_pattern_name():
    err = lower_error(TWO, pattern="secnd")
    assert err.message == "no pattern named 'secnd' in f.spd"
    assert "did you mean second?" in err.hint and "first, second" in err.hint
    assert "first, second" in lower_error(TWO, pattern="zzz").hint


def test_errors_in_other_patterns_do_not_block_the_selected_one():
    text = TWO + "pattern broken { attend locl(1) }\n"
    assert compile_ir(text, pattern="second").name == "second"
    assert "unknown primitive" in lower_error(text, pattern="broken").message


# --- overrides -----------------------------------------------------------------------------


def test_overrides():
    p = compile_ir(POWER, overrides={"window": 8})
    assert p.params == {"window": 8, "sinks": 1} and "local(8)" in p.text()
    assert spdsl.compile(POWER, window=7).params["window"] == 7


@pytest.mark.parametrize(
    "overrides, message, hint",
    [
        ({"windw": 3}, "unknown parameter 'windw' for pattern power", "did you mean window? (its parameters are"),
        ({"zzz": 3}, "unknown parameter 'zzz' for pattern power", "its parameters are window, sinks"),
        ({"window": "8"}, "parameter window must be an integer, got str '8'", "window=8"),
        ({"window": True}, "parameter window must be an integer, got bool True", None),
        ({"window": 2.0}, "parameter window must be an integer, got float 2.0", None),
        ({"window": 2**31}, "parameter window = 2147483648 is out of range", "2**31"),
        ({"window": 0}, "local(w) needs w >= 1, got 0", None),
    ],
)
def test_bad_overrides(overrides, message, hint):
    err = lower_error(POWER, overrides=overrides)
    assert message in err.message
    assert err.file == "f.spd"
    if hint:
        assert hint in err.hint


def test_override_for_pattern_without_parameters():
    err = lower_error("pattern p { attend all }", overrides={"w": 1})
    assert err.hint == "it has no parameters" and (err.line, err.column) == (1, 9)


def test_override_bad_value_points_at_its_use():
    err = lower_error(POWER, overrides={"window": 0})
    assert (err.line, err.column) == (5, 32)


# --- semantic errors -----------------------------------------------------------------------

SEMANTIC_ERRORS = [
    # (text, line, column, caret length, message substring, hint substring or None)
    (body("attend locl(4)"), 2, 12, 4, "unknown primitive 'locl'", "did you mean local?"),
    (body("attend foo(4)"), 2, 12, 3, "unknown primitive 'foo'", "dilated(w, r)"),
    (body("attend w", "w = 1"), 2, 12, 1, "unknown primitive 'w'", "'w' is a parameter"),
    (body("attend local(4, 5)"), 2, 12, 11, "local takes 1 argument (w), got 2", "local(w): unit distance"),
    (body("attend local"), 2, 12, 5, "local takes 1 argument (w), got 0", None),
    (body("attend dilated(4)"), 2, 12, 10, "dilated takes 2 arguments (w, r), got 1", None),
    (body("attend all(1)"), 2, 12, 6, "all takes no arguments, got 1", "all: every key"),
    (body("attend local(0)"), 2, 18, 1, "local(w) needs w >= 1, got 0", "local(w)"),
    (body("attend sink(1) | powers(2 - 1)"), 2, 29, 5, "powers(b) needs b >= 2, got 1", None),
    (body("attend dilated(3, -1)"), 2, 23, 2, "dilated(w, r) needs r >= 1, got -1", None),
    (body("attend band(3, 1 + 1)"), 2, 20, 5, "band(lo, hi) needs lo <= hi", None),
    (body("unit 0\n    attend all"), 2, 10, 1, "unit must be between 1 and 2**30, got 0", "unit 256"),
    (body("unit 2 - 5\n    attend all"), 2, 10, 5, "got -3", None),
    (body("unit 1073741825\n    attend all"), 2, 10, 10, "unit must be between 1 and 2**30", None),
    (body("unit 2\n    unit 3\n    attend all"), 3, 5, 6, "duplicate 'unit' in pattern p", "line 2:5"),
    (body("causal\n    causal\n    attend all"), 3, 5, 6, "duplicate 'causal' in pattern p", "line 2:5"),
    (body("unit 4\n    causal"), 1, 9, 1, "pattern p has no attend line", "attend local(4)"),
    ("pattern p {}", 1, 9, 1, "pattern p has no attend line", None),
    (body("attend local(w)", "w = 1, w = 2"), 1, 18, 1, "duplicate parameter 'w' in pattern p", "line 1:11"),
    ("pattern a { attend all }\n\npattern a { attend all }", 3, 9, 1, "duplicate pattern name 'a'", "line 1:9"),
    (body("attend local(windw)", "window = 1"), 2, 18, 5, "undefined parameter 'windw'", "did you mean window?"),
    (body("attend local(zz)", "a = 1, b = 2"), 2, 18, 2, "undefined parameter 'zz'", "parameters: a, b"),
    (body("attend local(zz)"), 2, 18, 2, "undefined parameter 'zz'", "declare it"),
    (body("attend all", "a = b, b = 1"), 1, 15, 1, "parameter 'b' is used before it is defined", None),
    (body("attend all", "a = a"), 1, 15, 1, "parameter 'a' is used before it is defined", None),
    (body("attend local(65536 * 65536)"), 2, 18, 13, "integer overflow: `65536 * 65536` = 4294967296", "2**31"),
    (body("attend local(x * x // x)", "x = 65536"), 2, 18, 5, "integer overflow", None),
    (body("attend local(-2147483647 - 1)"), 2, 18, 15, "integer overflow", None),
    (body("attend local(7 // (3 - 3))"), 2, 18, 12, "division by zero in `7 // (3 - 3)`", "'//'"),
    (body("attend local(7 % z)", "z = 0"), 2, 18, 5, "division by zero", "'%'"),
    ("pattern class { attend all }", 1, 9, 5, "'class' cannot name a pattern: it is a Python keyword", None),
    (body("attend all", "None = 1"), 1, 11, 4, "'None' cannot name a parameter", None),
]


@pytest.mark.parametrize("text, line, column, length, message, hint", SEMANTIC_ERRORS)
def test_semantic_errors(text, line, column, length, message, hint):
    err = lower_error(text)
    assert message in err.message, str(err)
    assert (err.line, err.column, err.length) == (line, column, length), str(err)
    if hint is not None:
        assert hint in (err.hint or ""), str(err)
    report = str(err).splitlines()
    assert report[0] == f"f.spd:{line}:{column}: {err.message}"
    assert report[1] == "    " + text.split("\n")[line - 1]
    assert report[2] == "    " + " " * (column - 1) + "^" * length


def test_extreme_but_valid_integers():
    p = compile_ir(body("attend band(-2147483647, 2147483647)"))
    assert p.expr == prims.Band(-(2**31) + 1, 2**31 - 1)
    assert compile_ir(body("unit 1073741824\n    attend all")).unit == 2**30


def test_pattern_names_reports_duplicates_and_syntax_errors():
    with pytest.raises(SpdError, match="duplicate pattern name"):
        pattern_names("pattern a { } pattern a { }")
    with pytest.raises(SpdError, match="no pattern in this file"):
        pattern_names("")


def test_load_from_file(tmp_path):
    f = tmp_path / "power.spd"
    f.write_text(POWER, encoding="utf-8")
    assert spdsl.load(f, window=6).params == {"window": 6, "sinks": 1}
    f.write_text(POWER.replace("local", "locl"), encoding="utf-8")
    with pytest.raises(SpdError) as info:
        spdsl.load(f)
    assert info.value.file == str(f) and str(info.value).startswith(f"{f}:5:26: unknown primitive 'locl'")


def test_byte_order_mark_is_ignored():
    assert compile_ir("\ufeffpattern p { attend all }").name == "p"
    err = lower_error("\ufeffpattern p { attend locl }")
    assert (err.column, str(err).splitlines()[1]) == (20, "    pattern p { attend locl }")
