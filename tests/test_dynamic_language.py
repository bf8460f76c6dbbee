"""v1.1 language lines (issue 12): ``score relu(alpha)`` and ``select EXPR`` -- parsing into the
typed AST with positions, lowering into PatternIR (text and hash), located errors."""

from __future__ import annotations

import pytest

import spdsl
from spdsl import syntax as ast
from spdsl.core import ir
from spdsl.core.primitives import All, Local, Sink
from spdsl.parser import parse

MASSIVE = """pattern massive(window = 4, sinks = 1) {
    unit 64
    causal
    attend sink(sinks) | local(window)
    score relu(2)
    select all
}"""


def test_ast_has_score_and_select_with_positions():
    (pdef,) = parse(MASSIVE).patterns
    score = next(s for s in pdef.stmts if isinstance(s, ast.Score))
    select = next(s for s in pdef.stmts if isinstance(s, ast.Select))
    assert (score.line, score.column) == (5, 5)
    assert score.call == ast.Call("relu", (ast.Num(2),))
    assert (select.line, select.column, select.end_column) == (6, 5, 15)
    assert select.expr == ast.Call("all")


def test_lowered_ir_fields_text_and_hash():
    p = spdsl.compile(MASSIVE)
    assert p.ir.score == ("relu", 2)
    assert p.ir.select == All()
    assert p.ir.expr == ir.Union((Local(4), Sink(1)))
    assert p.ir.dynamic
    assert p.ir.text().endswith("score relu(2)\nselect all\n")
    softmax = spdsl.compile(MASSIVE.replace("score relu(2)", ""))
    assert softmax.ir.score is None and softmax.ir.dynamic
    assert len({p.ir.hash(), softmax.ir.hash(), spdsl.compile(MASSIVE, window=5).ir.hash()}) == 3


def test_v1_text_and_hash_unchanged():
    p = spdsl.compile("pattern w() { causal attend local(4) }")
    assert p.ir.score is None and p.ir.select is None and not p.ir.dynamic
    assert p.ir.text() == "pattern w()\nunit 1\ncausal\nattend local(4)\n"


def test_alpha_from_a_parameter_and_select_lines_are_unioned():
    p = spdsl.compile("pattern p(a = 3) { attend local(1) score relu(a + 1) select sink(2) select every(4) }")
    assert p.ir.score == ("relu", 4)
    assert p.ir.select.text() == "(every(4) | sink(2))"


@pytest.mark.parametrize(
    "text, line, col, message, hint",
    [
        ("pattern p {\n  attend all\n  score relu(0)\n}", 3, 14, "alpha must be an integer >= 1, got 0", "relu(alpha)"),
        ("pattern p(a = 2) { attend all score relu(a - 3) }", 1, 42, "alpha must be an integer >= 1, got -1", None),
        ("pattern p { attend all score relu(1) score relu(2) }", 1, 38, "duplicate 'score'", "line 1:24"),
        ("pattern p { attend all score rel(1) }", 1, 30, "unknown score function 'rel'", "did you mean relu"),
        ("pattern p { attend all score softmax }", 1, 30, "unknown score function 'softmax'", "relu(alpha)"),
        ("pattern p { attend all score relu }", 1, 30, "relu takes 1 argument (alpha), got 0", None),
        ("pattern p { attend all score relu(1, 2) }", 1, 30, "relu takes 1 argument (alpha), got 2", None),
        ("pattern p { causal select all }", 1, 20, "has a select line but no attend line", "add one"),
        ("pattern p { attend all select }", 1, 31, "expected a set expression after 'select'", "select all"),
        ("pattern p { attend all score }", 1, 30, "expected a score function after 'score'", "relu(1)"),
        ("pattern p { attend all select locl(2) }", 1, 31, "unknown primitive 'locl'", "did you mean local"),
        ("pattern p { attend all select local(0) }", 1, 37, "needs w >= 1", None),
        ("pattern p { attend all score relu(1.5) }", 1, 36, "unexpected character '.'", "no decimals"),
        ("pattern p(select = 1) { attend all }", 1, 11, "keyword 'select'", "is a keyword"),
    ],
)
def test_errors_are_located(text, line, col, message, hint):
    with pytest.raises(spdsl.SpdError) as info:
        spdsl.compile(text, filename="d.spd")
    err = info.value
    assert (err.line, err.column) == (line, col), str(err)
    assert message in str(err), str(err)
    if hint is not None:
        assert hint in str(err), str(err)
    assert str(err).startswith(f"d.spd:{line}:{col}:")
    assert "^" in str(err)


def test_pattern_ir_refuses_a_bad_score():
    with pytest.raises(ValueError, match="alpha"):
        ir.PatternIR("p", 1, True, Local(1), score=("relu", 0))
    with pytest.raises(ValueError, match="relu"):
        ir.PatternIR("p", 1, True, Local(1), score=("gelu", 1))


def test_cli_summary_shows_the_v11_lines():
    from spdsl.cli_common import summary

    line = summary(spdsl.compile(MASSIVE))
    assert "score relu(2)  select all  (layouts and pictures: attend only)" in line
    assert summary(spdsl.compile("pattern w() { attend local(2) }")).endswith("attend local(2)  params -")
