"""Parser: the AST it builds (shapes, precedence, positions) and its syntax errors in plain words."""

from __future__ import annotations

import pytest

from spdsl import SpdError
from spdsl import syntax as ast
from spdsl.parser import MAX_DEPTH, lark_parser, parse

POWER = """\
# patterns/power.spd — PowerAttention, arXiv 2503.03588, Algorithm 1
pattern power(window = 5, sinks = 1) {
    unit 256                                  # tokens per pattern block
    causal
    attend sink(sinks) | local(window) | powers(2)
}
"""


def attend_expr(src: str) -> ast.SetExpr:
    """The expression of the single attend line of ``pattern p { attend <src> }``."""
    (stmt,) = parse(f"pattern p {{ attend {src} }}").patterns[0].stmts
    return stmt.expr


def int_expr(src: str) -> ast.IntExpr:
    """The argument of ``local(<src>)``."""
    return attend_expr(f"local({src})").args[0]


def C(name: str, *args: ast.IntExpr) -> ast.Call:
    return ast.Call(name, tuple(args))


def N(v: int) -> ast.Num:
    return ast.Num(v)


def syntax_error(text: str) -> SpdError:
    with pytest.raises(SpdError) as info:
        parse(text, "f.spd")
    return info.value


# --- valid programs ------------------------------------------------------------------------


def test_power_example_ast():
    (p,) = parse(POWER).patterns
    assert p.name == "power"
    assert [(q.name, q.default) for q in p.params] == [("window", N(5)), ("sinks", N(1))]
    unit, causal, attend = p.stmts
    assert unit == ast.Unit(N(256)) and causal == ast.Causal()
    union = ast.SetOp(
        "|", ast.SetOp("|", C("sink", ast.Name("sinks")), C("local", ast.Name("window"))), C("powers", N(2))
    )
    assert attend == ast.Attend(union)


def test_positions_are_one_based_and_span_the_text():
    (p,) = parse(POWER).patterns
    assert (p.line, p.column, p.start_line, p.start_column) == (2, 9, 2, 1)
    assert (p.params[1].line, p.params[1].column) == (2, 27)
    unit, causal, attend = p.stmts
    assert (unit.line, unit.column, unit.expr.column, unit.expr.end_column) == (3, 5, 10, 13)
    assert (causal.line, causal.column, causal.end_column) == (4, 5, 11)
    local = attend.expr.left.right
    assert (local.line, local.column, local.end_column, local.name_end_column) == (5, 26, 39, 31)


def test_positions_do_not_take_part_in_equality():
    a = parse("pattern p { attend local(4) }")
    b = parse("\n\n  pattern   p{attend\n local( 4 )\n}\n")
    assert a == b


@pytest.mark.parametrize(
    "src, expected",
    [
        ("a | b & c", ast.SetOp("|", C("a"), ast.SetOp("&", C("b"), C("c")))),
        ("a & b | c", ast.SetOp("|", ast.SetOp("&", C("a"), C("b")), C("c"))),
        ("a - b | c", ast.SetOp("|", ast.SetOp("-", C("a"), C("b")), C("c"))),
        ("a | b - c", ast.SetOp("-", ast.SetOp("|", C("a"), C("b")), C("c"))),
        ("a - b - c", ast.SetOp("-", ast.SetOp("-", C("a"), C("b")), C("c"))),
        ("a - b & c", ast.SetOp("-", C("a"), ast.SetOp("&", C("b"), C("c")))),
        ("a - (b | c)", ast.SetOp("-", C("a"), ast.SetOp("|", C("b"), C("c")))),
        ("((a))", C("a")),
        ("all()", C("all")),
    ],
)
def test_set_precedence(src, expected):
    assert attend_expr(src) == expected


def B(op, a, b):
    return ast.BinOp(op, a, b)


@pytest.mark.parametrize(
    "src, expected",
    [
        ("1 + 2 * 3", B("+", N(1), B("*", N(2), N(3)))),
        ("1 - 2 - 3", B("-", B("-", N(1), N(2)), N(3))),
        ("(1 - 2) * 3", B("*", B("-", N(1), N(2)), N(3))),
        ("7 // 2 % 3", B("%", B("//", N(7), N(2)), N(3))),
        ("-w * 2", B("*", ast.Neg(ast.Name("w")), N(2))),
        ("2 * -3", B("*", N(2), ast.Neg(N(3)))),
        ("--1", ast.Neg(ast.Neg(N(1)))),
        ("007", N(7)),
        ("2147483647", N(2**31 - 1)),
    ],
)
def test_int_precedence(src, expected):
    assert int_expr(src) == expected


def test_comments_blank_lines_semicolons_and_layout():
    text = (
        "\n\n# header\n\npattern p(\n  a = 1,   # first\n  b = 2,\n) {  # trailing comma ok\n\n"
        "  unit 4;  causal;;\n  # comment line\n  attend local(a)   \n\tattend sink(b)\n}\n# end"
    )
    (p,) = parse(text).patterns
    assert [q.name for q in p.params] == ["a", "b"]
    assert [type(s).__name__ for s in p.stmts] == ["Unit", "Causal", "Attend", "Attend"]


def test_several_patterns_params_optional():
    prog = parse("pattern a { attend all }\npattern b() { attend all }\npattern c(x=1) { }")
    assert [p.name for p in prog.patterns] == ["a", "b", "c"]
    assert prog.patterns[2].stmts == ()


def test_crlf_line_endings():
    err = syntax_error("pattern p {\r\n  attend local(4 5)\r\n}\r\n")
    assert (err.line, err.column) == (2, 18)
    assert "\r" not in str(err)


def test_grammar_is_lalr_with_reserved_keywords():
    assert lark_parser().options.parser == "lalr"
    assert syntax_error("pattern unit { }").message.startswith("expected a pattern name")


# --- syntax errors -------------------------------------------------------------------------

SYNTAX_ERRORS = [
    # (text, line, column, message substring, hint substring or None)
    ("pattern p { attend local(4 5) }", 1, 28, "expected ')' after the arguments of local", "','"),
    ("pattern p { attend local(4\n", 1, 27, "missing ')' after the arguments of local", "1:25"),
    ("pattern power(window = 5)\n  unit 4\n}", 2, 3, "expected '{' to open the body of pattern power", None),
    ("pattern power attend", 1, 15, "expected '{' to open the body of pattern power", None),
    ("pattern p { attend local(4) $ }", 1, 29, "unexpected character '$'", "remove it"),
    ("pattern power {\n  attend local(4)\n\n", 2, 18, "missing '}' at the end of pattern power", "1:15"),
    ("pattern a { attend all\npattern b { attend all }", 2, 1, "missing '}' at the end of pattern a", None),
    ("pattern p { unit\n causal }", 2, 2, "expected an integer expression after 'unit'", "unit 256"),
    ("pattern p { attend }", 1, 20, "expected a set expression after 'attend'", None),
    ("pattern p { attend local(4) | }", 1, 31, "expected a primitive or '(' after '|'", None),
    ("pattern p { attend local(4 + ) }", 1, 30, "expected an integer expression after '+'", None),
    ("pattern p { attend local(4 //) }", 1, 30, "expected an integer expression after '//'", None),
    ("pattern p { attend local(4/2) }", 1, 27, "unexpected character '/'", "'//'"),
    ("pattern p { attend local(4.5) }", 1, 27, "unexpected character '.'", "integers"),
    ("pattern p { attend local(4) sink(1) }", 1, 29, "expected '|', '&' or '-' before name 'sink'", "union"),
    ("pattern p { attend local 4 }", 1, 26, "expected '(' before the arguments of local", "local(4)"),
    (
        "pattern p { local(4) }",
        1,
        13,
        "expected a statement (unit, causal, attend, select or score)",
        "attend local(...)",
    ),
    ("pattern p { atend local(4) }", 1, 13, "expected a statement", "did you mean attend?"),
    ("pattern p { unit 4 5 }", 1, 20, "expected a statement", None),
    ("pattern p { attend (local(4) | sink(1) }", 1, 40, "expected ')' to close the '(' at line 1:20", None),
    ("pattern p { attend local(4)) }", 1, 28, "unexpected ')' that closes nothing", None),
    ("pattern p { attend local(4) } }", 1, 31, "unexpected '}' outside any pattern", None),
    ("attend local(4)", 1, 1, "expected 'pattern' to start a pattern definition", "inside a pattern"),
    ("pattern { }", 1, 9, "expected a pattern name after 'pattern'", None),
    ("pattern p(unit = 3) { }", 1, 11, "expected a parameter or ')' after '('", "'unit' is a keyword"),
    ("pattern p(w 3) { }", 1, 13, "expected '=' after parameter w", "w = 4"),
    ("pattern p(w = ) { }", 1, 15, "expected the default value of parameter w after '='", None),
    ("pattern p(w = 3 x = 4) { }", 1, 17, "expected ',' or ')' after the default of parameter w", None),
    ("pattern p(w = 3", 1, 16, "missing ')' after the parameters of pattern p", None),
    ("pattern p { attend local(,) }", 1, 26, "expected an argument or ')' after 'local('", None),
    ("pattern p { attend local(1,) }", 1, 28, "expected another argument of local after ','", None),
    ("pattern p { unit (2 }", 1, 21, "expected ')' to close the '(' at line 1:18", None),
    ("pattern p { unit (", 1, 19, "expected an expression after '('", None),
    ("pattern p { attend x\u00a0}", 1, 21, "unexpected character '\\xa0' (U+00A0)", "space"),
    ("pattern p { attend x\x00 }", 1, 21, "unexpected character '\\x00' (U+0000)", None),
    ("pattern pé { }", 1, 10, "unexpected character 'é'", "ASCII"),
    ("pattern p { unit 2147483648 }", 1, 18, "number 2147483648 is too large", "2**31 - 1"),
    ("pattern p { unit " + "9" * 5000 + " }", 1, 18, "is too large", None),
    ("", 1, 1, "no pattern in this file", "pattern NAME"),
    ("# nothing here\n\n", 1, 15, "no pattern in this file", None),
]


@pytest.mark.parametrize("text, line, column, message, hint", SYNTAX_ERRORS)
def test_syntax_errors(text, line, column, message, hint):
    err = syntax_error(text)
    assert message in err.message
    assert (err.line, err.column) == (line, column), str(err)
    assert err.file == "f.spd"
    if hint is not None:
        assert hint in (err.hint or ""), str(err)
    report = str(err).splitlines()
    assert report[0].startswith(f"f.spd:{line}:{column}: ")
    caret = next(r for r in report if r.strip().startswith("^"))
    assert caret.index("^") == 4 + column - 1
    assert "Token" not in str(err) and "__ANON" not in str(err) and "RPAR" not in str(err)


def test_huge_literal_message_is_truncated():
    err = syntax_error("pattern p { unit " + "1" * 100 + " }")
    assert len(err.message) < 80 and err.length == 100


def test_nesting_too_deep_is_an_spd_error():
    deep = "all | (" * (MAX_DEPTH + 5) + "all" + ")" * (MAX_DEPTH + 5)
    err = syntax_error(f"pattern p {{ attend {deep} }}")
    assert "nested too deeply" in err.message and err.line == 1
    assert "nested too deeply" in syntax_error("pattern p { attend " + " | ".join(["all"] * 200) + " }").message
    parse("pattern p { attend " + "(" * 5000 + "all" + ")" * 5000 + " }")  # parentheses alone add no depth
    deep_int = "-" * 5000 + "1"
    assert "nested too deeply" in syntax_error(f"pattern p {{ unit {deep_int} }}").message
    very_deep = "(" * 100_000
    assert isinstance(syntax_error(f"pattern p {{ attend {very_deep}"), SpdError)


def test_moderate_nesting_is_fine():
    union = " | ".join(f"local({i})" for i in range(1, 60))
    parse(f"pattern p {{ attend {union} }}")
    parse("pattern p { attend " + "(" * 40 + "all" + ")" * 40 + " }")


def test_unprintable_characters_are_masked_in_the_source_line():
    err = syntax_error("pattern p { attend x \x00 }")
    assert "\x00" not in str(err)


def test_non_string_input_is_a_type_error():
    with pytest.raises(TypeError):
        parse(b"pattern p { attend all }")  # type: ignore[arg-type]
