"""Check a parsed ``.spd`` program and lower one of its patterns to :class:`spdsl.core.ir.PatternIR`.

Rules enforced here (each violation is an :class:`SpdError` at the offending text, with a hint):

* pattern names are unique in a file; parameter names are unique in a pattern; neither may be
  a Python keyword (names may reach generated code as identifiers);
* parameters are resolved in declaration order. A default is an integer expression over
  literals and parameters declared *before* it (``pattern p(w = 4, reach = 2 * w)``); an
  override replaces a parameter's value before later defaults are evaluated, so overriding
  ``w`` above also changes ``reach``. Using a later (or the same) parameter is an error;
* integer expressions use Python's ``+ - * // %`` (floor division and modulo); every
  intermediate and final value must lie strictly between ``-2**31`` and ``2**31``, and
  dividing by zero is an error;
* a pattern has at most one ``unit`` (1 <= unit <= 2**30; default 1), at most one ``causal``
  and at least one ``attend``; several ``attend`` lines are unioned;
* v1.1: at most one ``score`` line, ``score relu(alpha)`` with an integer ``alpha >= 1``;
  ``select`` lines (unioned like ``attend``) need an ``attend`` line;
* primitives are looked up in :data:`spdsl.core.primitives.PRIMITIVES`, called with exactly their number
  of arguments, and their own range checks (``Primitive.check``) are reported at the argument.
"""

from __future__ import annotations

import keyword
import operator
import re
from collections.abc import Mapping

from . import syntax as ast
from .core import ir
from .core.primitives import PRIMITIVES
from .errors import SpdError, did_you_mean
from .parser import parse
from .syntax import error_at, error_at_node, strip_bom

UNIT_MAX = 2**30
_IR_OPS = {"|": ir.Union, "&": ir.Inter}
_ARITH = {
    "+": operator.add,
    "-": operator.sub,
    "*": operator.mul,
    "//": operator.floordiv,  # floor division and modulo, as in Python and DESIGN.md
    "%": operator.mod,
}


def describe(prim_cls: type[ir.Primitive]) -> str:
    """One-line signature and meaning, for error hints: ``local(w): unit distance |d| < w ...``."""
    args = ", ".join(prim_cls.arg_names)
    sig = f"{prim_cls.name}({args})" if prim_cls.arg_names else prim_cls.name
    return f"{sig}: {prim_cls.doc}"


class _Lowering:
    """Holds the source text for located errors while one pattern is lowered."""

    def __init__(self, text: str, filename: str, pdef: ast.PatternDef):
        self.text = text
        self.filename = filename
        self.pdef = pdef
        self.env: dict[str, int] = {}

    def error(self, node: ast.Node, message: str, hint: str | None = None) -> SpdError:
        return error_at_node(message, self.text, node, file=self.filename, hint=hint)

    def snippet(self, node: ast.Node) -> str:
        """The source text of ``node`` on one line: comments dropped, spaces collapsed, shortened."""
        starts = [0]
        for line in self.text.split("\n"):
            starts.append(starts[-1] + len(line) + 1)
        if not 1 <= node.line <= node.end_line < len(starts):
            return "?"
        src = self.text[starts[node.line - 1] + node.column - 1 : starts[node.end_line - 1] + node.end_column - 1]
        src = " ".join(re.sub(r"#[^\n]*", " ", src).split())
        return src if len(src) <= 60 else src[:57] + "..."

    # --- integers ------------------------------------------------------------------------

    def eval_int(self, node: ast.IntExpr) -> int:
        """Evaluate an integer expression over the parameters resolved so far."""
        if isinstance(node, ast.Num):
            return node.value
        if isinstance(node, ast.Name):
            return self.lookup(node)
        if isinstance(node, ast.Neg):
            return -self.eval_int(node.operand)
        a, b = self.eval_int(node.left), self.eval_int(node.right)
        if node.op in ("//", "%") and b == 0:
            raise self.error(
                node,
                f"division by zero in `{self.snippet(node)}`",
                hint=f"the right side of '{node.op}' evaluates to 0",
            )
        value = _ARITH[node.op](a, b)
        if abs(value) >= ir.INT_LIMIT:
            raise self.error(
                node,
                f"integer overflow: `{self.snippet(node)}` = {value}",
                hint="every integer in a pattern must lie strictly between -2**31 and 2**31",
            )
        return value

    def lookup(self, node: ast.Name) -> int:
        if node.id in self.env:
            return self.env[node.id]
        declared = [p.name for p in self.pdef.params]
        if node.id in declared:
            raise self.error(
                node,
                f"parameter '{node.id}' is used before it is defined",
                hint="a default may use only the parameters declared before it",
            )
        pattern = self.pdef.name
        hint = did_you_mean(node.id, declared) or (
            f"pattern {pattern} has parameters: {', '.join(declared)}"
            if declared
            else f"declare it: `pattern {pattern}({node.id} = 4) {{ ... }}`"
        )
        raise self.error(node, f"undefined parameter '{node.id}'", hint=hint)

    # --- parameters ----------------------------------------------------------------------

    def resolve_params(self, overrides: Mapping[str, object]) -> dict[str, int]:
        seen: dict[str, ast.Param] = {}
        for param in self.pdef.params:
            check_name(self, param, "parameter")
            if param.name in seen:
                first = seen[param.name]
                raise self.error(
                    param,
                    f"duplicate parameter '{param.name}' in pattern {self.pdef.name}",
                    hint=f"it is already declared at line {first.line}:{first.column}; rename or remove one",
                )
            seen[param.name] = param
        self.check_overrides(overrides)
        for param in self.pdef.params:
            self.env[param.name] = overrides[param.name] if param.name in overrides else self.eval_int(param.default)
        return dict(self.env)

    def check_overrides(self, overrides: Mapping[str, object]) -> None:
        names = [p.name for p in self.pdef.params]
        where = {"file": self.filename}
        for key, value in overrides.items():
            if key not in names:
                listing = f"its parameters are {', '.join(names)}" if names else "it has no parameters"
                close = did_you_mean(str(key), names)
                raise self.error(
                    self.pdef,
                    f"unknown parameter '{key}' for pattern {self.pdef.name}",
                    hint=f"{close} ({listing})" if close else listing,
                )
            if isinstance(value, bool) or not isinstance(value, int):
                raise SpdError(
                    f"parameter {key} must be an integer, got {type(value).__name__} {value!r}",
                    hint=f"pass an int, e.g. {key}=8",
                    **where,
                )
            if abs(value) >= ir.INT_LIMIT:
                raise SpdError(
                    f"parameter {key} = {value} is out of range",
                    hint="integers must lie strictly between -2**31 and 2**31",
                    **where,
                )

    # --- statements ----------------------------------------------------------------------

    def lower(self, overrides: Mapping[str, object]) -> ir.PatternIR:
        check_name(self, self.pdef, "pattern")
        params = self.resolve_params(overrides)
        once: dict[type, ast.Node] = {}  # unit, causal, score: at most one each
        sets: dict[type, list[ir.Expr]] = {ast.Attend: [], ast.Select: []}
        for stmt in self.pdef.stmts:
            if isinstance(stmt, (ast.Attend, ast.Select)):
                sets[type(stmt)].append(self.lower_set(stmt.expr))
                continue
            first = once.get(type(stmt))
            if first is not None:
                word = type(stmt).__name__.lower()
                raise self.error(
                    stmt,
                    f"duplicate '{word}' in pattern {self.pdef.name}",
                    hint=f"the first is at line {first.line}:{first.column}; keep only one",
                )
            once[type(stmt)] = stmt
        attends, selects = sets[ast.Attend], sets[ast.Select]
        if not attends:
            first_select = next((s for s in self.pdef.stmts if isinstance(s, ast.Select)), None)
            if first_select is not None:
                raise self.error(
                    first_select,
                    f"pattern {self.pdef.name} has a select line but no attend line",
                    hint="select adds candidates beyond attend, which is always computed: "
                    "add one, e.g. `attend sink(1) | local(4)`",
                )
            raise self.error(
                self.pdef, f"pattern {self.pdef.name} has no attend line", hint="add one, e.g. `attend local(4)`"
            )
        return ir.PatternIR(
            self.pdef.name,
            self.unit_value(once.get(ast.Unit)),
            ast.Causal in once,
            _union(attends),
            params,
            score=self.score_value(once.get(ast.Score)),
            select=_union(selects) if selects else None,
        )

    def score_value(self, stmt: ast.Score | None) -> tuple[str, int] | None:
        """``score relu(alpha)`` -> ("relu", alpha); None (softmax) without a score line."""
        if stmt is None:
            return None
        call = stmt.call
        hint = "the score function is `relu(alpha)` with an integer alpha >= 1, e.g. `score relu(2)`"
        if call.name != "relu":
            name_node = _name_node(call)
            close = did_you_mean(call.name, ["relu"])
            raise self.error(name_node, f"unknown score function '{call.name}'", hint=close or hint)
        if len(call.args) != 1:
            raise self.error(call, f"relu takes 1 argument (alpha), got {len(call.args)}", hint=hint)
        alpha = self.eval_int(call.args[0])
        if alpha < 1:
            raise self.error(call.args[0], f"alpha must be an integer >= 1, got {alpha}", hint=hint)
        return ("relu", alpha)

    def unit_value(self, stmt: ast.Unit | None) -> int:
        if stmt is None:
            return 1
        value = self.eval_int(stmt.expr)
        if not 1 <= value <= UNIT_MAX:
            raise self.error(
                stmt.expr,
                f"unit must be between 1 and 2**30, got {value}",
                hint="unit is the number of tokens per pattern unit, e.g. `unit 256`",
            )
        return value

    # --- set expressions -----------------------------------------------------------------

    def lower_set(self, node: ast.SetExpr) -> ir.Expr:
        if isinstance(node, ast.SetOp):
            left, right = self.lower_set(node.left), self.lower_set(node.right)
            return ir.Diff(left, right) if node.op == "-" else _IR_OPS[node.op]((left, right))
        return self.lower_call(node)

    def lower_call(self, call: ast.Call) -> ir.Primitive:
        cls = PRIMITIVES.get(call.name)
        name_node = _name_node(call)
        if cls is None:
            raise self.error(name_node, f"unknown primitive '{call.name}'", hint=self.unknown_hint(call.name))
        want = len(cls.arg_names)
        if len(call.args) != want:
            takes = (
                "no arguments"
                if want == 0
                else f"{want} argument{'s' if want > 1 else ''} ({', '.join(cls.arg_names)})"
            )
            raise self.error(call, f"{cls.name} takes {takes}, got {len(call.args)}", hint=describe(cls))
        prim = cls(*(self.eval_int(a) for a in call.args))
        problems = prim.check()
        if problems:
            index, message = problems[0]
            raise self.error(call.args[index] if index < len(call.args) else call, message, hint=describe(cls))
        return prim

    def unknown_hint(self, name: str) -> str:
        close = did_you_mean(name, PRIMITIVES)
        if close:
            return close
        if name in {p.name for p in self.pdef.params}:
            return f"'{name}' is a parameter; use it as an argument, e.g. `local({name})`"
        names = ", ".join(describe(c).split(":")[0] for c in PRIMITIVES.values())
        return f"the primitives are {names}"


def _union(exprs: list[ir.Expr]) -> ir.Expr:
    """Several attend (or select) lines are one union."""
    return exprs[0] if len(exprs) == 1 else ir.Union(exprs)


def check_name(low: _Lowering, node: ast.PatternDef | ast.Param, what: str) -> None:
    """Names reach generated code as identifiers: refuse Python keywords and overlong names."""
    if len(node.name) > ir.MAX_NAME_LENGTH:
        raise low.error(
            node,
            f"a {what} name may have at most {ir.MAX_NAME_LENGTH} characters; this one has {len(node.name)}",
            hint=f"shorten it, e.g. {node.name[:24]}",
        )
    if keyword.iskeyword(node.name):
        raise low.error(
            node,
            f"'{node.name}' cannot name a {what}: it is a Python keyword",
            hint=f"choose another name, e.g. {node.name}_",
        )


def _check_patterns(program: ast.Program, text: str, filename: str) -> None:
    seen: dict[str, ast.PatternDef] = {}
    for pdef in program.patterns:
        if pdef.name in seen:
            first = seen[pdef.name]
            raise error_at_node(
                f"duplicate pattern name '{pdef.name}'",
                text,
                pdef,
                file=filename,
                hint=f"the first is at line {first.line}:{first.column}; rename one",
            )
        seen[pdef.name] = pdef


def _name_node(call: ast.Call) -> ast.Name:
    """The call's name as a node, located (for errors that point at it)."""
    return ast.Name(
        call.name,
        line=call.line,
        column=call.column,
        end_line=call.line,
        end_column=call.name_end_column or call.column + len(call.name),
    )


def _select(program: ast.Program, pattern: str | None, filename: str) -> ast.PatternDef:
    if pattern is None:
        return program.patterns[0]
    for pdef in program.patterns:
        if pdef.name == pattern:
            return pdef
    names = [p.name for p in program.patterns]
    listing = f"the patterns in this file are {', '.join(names)}"
    close = did_you_mean(pattern, names)
    raise SpdError(
        f"no pattern named '{pattern}' in {filename}", file=filename, hint=f"{close} ({listing})" if close else listing
    )


def pattern_names(text: str, filename: str = "<string>") -> list[str]:
    """Names of the patterns in ``text``, in file order (raises SpdError on syntax errors or duplicates)."""
    text = strip_bom(text)
    program = parse(text, filename)
    _check_patterns(program, text, filename)
    return [p.name for p in program.patterns]


def compile_ir(
    text: str, *, filename: str = "<string>", pattern: str | None = None, overrides: Mapping[str, object] | None = None
) -> ir.PatternIR:
    """Parse, check and lower one pattern of ``text`` (``pattern`` by name, else the first).

    ``overrides`` maps parameter names to ints and replaces their defaults. Raises
    :class:`SpdError` -- and nothing else -- for any problem in the text or the overrides.
    """
    text = strip_bom(text)
    program = parse(text, filename)
    _check_patterns(program, text, filename)
    pdef = _select(program, pattern, filename)
    try:
        return _Lowering(text, filename, pdef).lower(dict(overrides or {}))
    except RecursionError:  # pragma: no cover - the parser bounds nesting well below the limit
        line, col = pdef.line, pdef.column
        raise error_at("expression nested too deeply", text, line, col, file=filename) from None
