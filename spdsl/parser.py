"""Parse ``.spd`` text into the AST of :mod:`spdsl.syntax`.

The grammar is ``grammar/spd.lark`` (LALR(1), basic lexer, reserved keywords), loaded through
:func:`spdsl.resources.grammar_text`. Every failure -- a Lark error of any kind, a number
literal beyond the 32-bit range, a file without patterns, nesting too deep to walk -- becomes a
:class:`~spdsl.errors.SpdError` that says, in plain words, what is wrong at which line and
column and how to fix it. Lark's terminal names never reach the user.

This module knows no torch.
"""

from __future__ import annotations

import functools

from lark import Lark, Token, Transformer, Tree, v_args
from lark.exceptions import LarkError, UnexpectedCharacters, UnexpectedEOF, UnexpectedToken, VisitError

from . import syntax as ast
from .errors import SpdError, did_you_mean
from .resources import grammar_text
from .syntax import end_position, error_at, strip_bom

INT_MAX = 2**31 - 1  # largest integer literal
MAX_DEPTH = 100  # deepest parse tree accepted (keeps every later recursive pass far from the limit)


@functools.lru_cache(maxsize=1)
def lark_parser() -> Lark:
    """The Lark parser for the grammar (built once; also used by the fuzz tests)."""
    return Lark(grammar_text(), parser="lalr", lexer="basic", propagate_positions=True, maybe_placeholders=False)


def parse(text: str, filename: str = "<string>") -> ast.Program:
    """Parse ``.spd`` source into a :class:`spdsl.syntax.Program` holding at least one pattern.

    Raises :class:`SpdError` -- and nothing else -- for any text that is not a valid program.
    A leading byte-order mark is ignored (see :func:`strip_bom`).
    """
    if not isinstance(text, str):
        raise TypeError(f"spdsl source must be str, got {type(text).__name__}")
    text = strip_bom(text)
    try:
        tree = lark_parser().parse(text)
    except UnexpectedToken as e:
        raise token_error(e, text, filename) from None
    except UnexpectedCharacters as e:
        raise _character_error(e, text, filename) from None
    except UnexpectedEOF:
        line, col = end_position(text)
        raise error_at("unexpected end of the file", text, line, col, file=filename) from None
    except LarkError as e:  # pragma: no cover - other Lark failures are not expected from LALR
        raise SpdError(f"cannot parse this file: {e}", file=filename) from None
    _check_depth(tree, text, filename)
    try:
        program = _Build(text, filename).transform(tree)
    except VisitError as e:
        if isinstance(e.orig_exc, SpdError):
            raise e.orig_exc from None
        raise  # pragma: no cover - a bug in the transformer
    except RecursionError:  # pragma: no cover - _check_depth keeps us well below the limit
        raise SpdError("expression nested too deeply", file=filename) from None
    if not program.patterns:
        line, col = end_position(text)
        raise error_at(
            "no pattern in this file",
            text,
            line,
            col,
            file=filename,
            hint="a .spd file holds one or more `pattern NAME(PARAM = INT, ...) { ... }` blocks, "
            "e.g. `pattern p() { attend local(4) }`",
        )
    return program


# --- lexer errors --------------------------------------------------------------------------

_SET_OPS_WORDS = "set operations are '|' (union), '&' (intersection) and '-' (difference)"
_CHAR_HINTS = {
    "/": "integer division is written '//' (floor division, as in Python)",
    ".": "numbers are integers; there are no decimals",
    **dict.fromkeys("\"'", "there are no strings in the language; names are written bare"),
    **dict.fromkeys("!~^", _SET_OPS_WORDS),
    **dict.fromkeys("[]", "group with parentheses '(' and ')'"),
    ":": "parameters are written `name = value`",
}


def _show_char(ch: str) -> str:
    if ch.isprintable() and not ch.isspace():
        return f"'{ch}'"
    return f"{ch!r} (U+{ord(ch):04X})"


def _character_error(e: UnexpectedCharacters, text: str, filename: str) -> SpdError:
    ch = e.char
    hint = _CHAR_HINTS.get(ch)
    if hint is None and ch.isspace():
        hint = "an unusual space character; replace it with a plain space"
    elif hint is None and ch.isalpha():
        hint = "names use only ASCII letters, digits and '_', and do not start with a digit"
    elif hint is None:
        hint = (
            "remove it; the language uses only names, integers, `+ - * // %`, `| & -`, `( ) { } , = ;` and # comments"
        )
    return error_at(f"unexpected character {_show_char(ch)}", text, e.line, e.column, file=filename, hint=hint)


# --- parser errors: Lark's view (state, expected terminals, value stack) -> plain words ------

_KEYWORDS = {"PATTERN", "UNIT", "CAUSAL", "ATTEND", "SCORE", "SELECT"}
_OPERATORS = {"PLUS", "MINUS", "STAR", "PERCENT", "VBAR", "AMPERSAND"}
_STATEMENTS = ("unit", "causal", "attend", "score", "select")
_SET_OPS_HINT = "combine primitives with | (union), & (intersection) or - (difference), e.g. `sink(1) | local(8)`"


def _is(value: object, *types: str) -> bool:
    return isinstance(value, Token) and value.type in types


def _words(names) -> str:
    """Lark terminal names as readable alternatives: "')', ',' or a name"."""
    fixed = {"NAME": "a name", "INT": "a number", "$END": "the end of the file"}
    terms = {t.name: t.pattern.value for t in lark_parser().terminals}
    words = sorted(fixed.get(n) or f"'{terms.get(n, n)}'" for n in names)
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


def _describe(tok: Token) -> str:
    if tok.type == "$END":
        return "the end of the file"
    if tok.type == "NAME":
        return f"name '{tok.value}'"
    if tok.type == "INT":
        return f"number {tok.value if len(tok.value) <= 24 else tok.value[:20] + '...'}"
    if tok.type in _KEYWORDS:
        return f"keyword '{tok.value}'"
    return f"'{tok.value}'"


class _Context:
    """Where the parser stood: the innermost open bracket and what it belongs to."""

    def __init__(self, stack: list):
        self.stack = stack
        self.last = stack[-1] if stack else None
        self.pattern = "?"
        for i, v in enumerate(stack[:-1]):
            if _is(v, "PATTERN") and _is(stack[i + 1], "NAME"):
                self.pattern = stack[i + 1].value
        self.opener, self.owner, self.kind = None, None, "top"
        depth = 0
        for i in range(len(stack) - 1, -1, -1):
            if _is(stack[i], "RPAR", "RBRACE"):
                depth += 1
            elif _is(stack[i], "LPAR", "LBRACE") and depth:
                depth -= 1
            elif _is(stack[i], "LPAR", "LBRACE"):
                self.opener = stack[i]
                self._classify(i)
                break
        else:
            header = any(_is(v, "PATTERN") for v in stack) and not _is(self.last, "RBRACE")
            self.kind = "header" if header else "top"

    def _classify(self, i: int) -> None:
        stack = self.stack
        if stack[i].type == "LBRACE":
            self.kind = "body"
        elif i >= 1 and _is(stack[i - 1], "NAME"):
            self.kind = "params" if i >= 2 and _is(stack[i - 2], "PATTERN") else "args"
            self.owner = stack[i - 1].value
        else:
            self.kind = "paren"

    def last_statement(self) -> str | None:
        """The keyword of the statement being parsed inside a body, if any."""
        for v in reversed(self.stack):
            if _is(v, "UNIT", "ATTEND", "CAUSAL", "SCORE", "SELECT", "LBRACE"):
                return v.value if v.type != "LBRACE" else None
        return None

    def param_name(self) -> str:
        """The parameter whose default is being parsed."""
        for i in range(len(self.stack) - 1, 0, -1):
            if _is(self.stack[i], "EQUAL") and _is(self.stack[i - 1], "NAME"):
                return self.stack[i - 1].value
        return "?"

    def opened_at(self) -> str:
        return f"line {self.opener.line}:{self.opener.column}" if self.opener is not None else "?"


def _after_token(ctx: _Context, got: str, expected) -> tuple[str, str | None] | None:
    """Messages for an error right after a keyword, an operator or an opening bracket."""
    last = ctx.last
    kind = last.type if isinstance(last, Token) else None
    if kind == "PATTERN":
        return f"expected a pattern name after 'pattern', got {got}", "e.g. `pattern power(window = 5) { ... }`"
    if kind == "UNIT":
        return f"expected an integer expression after 'unit', got {got}", "e.g. `unit 256` (tokens per pattern unit)"
    if kind == "ATTEND":
        return f"expected a set expression after 'attend', got {got}", "e.g. `attend sink(1) | local(8)`"
    if kind == "SELECT":
        return f"expected a set expression after 'select', got {got}", "e.g. `select all`"
    if kind == "SCORE":
        return f"expected a score function after 'score', got {got}", "e.g. `score relu(1)`"
    if kind == "EQUAL":
        name = ctx.stack[-2].value if len(ctx.stack) > 1 else "?"
        return f"expected the default value of parameter {name} after '=', got {got}", f"e.g. `{name} = 4`"
    if kind in _OPERATORS or (kind or "").startswith("__ANON"):
        if "INT" in expected:
            return f"expected an integer expression after '{last.value}', got {got}", None
        return f"expected a primitive or '(' after '{last.value}', got {got}", _SET_OPS_HINT
    if kind == "COMMA" and ctx.kind == "params":
        return f"expected a parameter or ')' after ',', got {got}", "parameters look like `window = 5`"
    if kind == "COMMA":
        return f"expected another argument of {ctx.owner} after ',', got {got}", "remove the trailing ','"
    if kind == "LPAR" and ctx.kind == "params":
        return f"expected a parameter or ')' after '(', got {got}", "parameters look like `window = 5`"
    if kind == "LPAR" and ctx.kind == "args":
        return f"expected an argument or ')' after '{ctx.owner}(', got {got}", "arguments are integer expressions"
    if kind == "LPAR":
        return f"expected an expression after '(', got {got}", None
    if kind == "NAME" and ctx.kind == "header":
        return (
            f"expected '{{' to open the body of pattern {last.value}, got {got}",
            f"write `pattern {last.value}(PARAM = INT, ...) {{ ... }}`",
        )
    if kind == "NAME" and ctx.kind == "params" and _is(ctx.stack[-2], "LPAR", "COMMA"):
        return (
            f"expected '=' after parameter {last.value}, got {got}",
            f"every parameter needs a default: `{last.value} = 4`",
        )
    return None


def _missing_closer(ctx: _Context, tok: Token) -> tuple[str, str | None] | None:
    """A bracket still open where the file ends (or, for a body, where the next pattern starts)."""
    end = tok.type == "$END"
    if ctx.kind == "body" and (end or tok.type == "PATTERN"):
        return (
            f"missing '}}' at the end of pattern {ctx.pattern}",
            f"the body opened with '{{' at {ctx.opened_at()} needs a closing '}}'",
        )
    if not end:
        return None
    if ctx.kind == "args":
        return f"missing ')' after the arguments of {ctx.owner}", f"the '(' is at {ctx.opened_at()}"
    if ctx.kind == "params":
        return f"missing ')' after the parameters of pattern {ctx.pattern}", f"the '(' is at {ctx.opened_at()}"
    if ctx.kind == "paren":
        return f"missing ')' to close the '(' at {ctx.opened_at()}", None
    if ctx.kind == "header":
        return f"expected '{{' to open the body of pattern {ctx.pattern}", None
    return None


def _in_body(ctx: _Context, tok: Token, got: str, text: str) -> tuple[str, str | None]:
    stmt = ctx.last_statement()
    if tok.type == "RPAR":
        return "unexpected ')' that closes nothing", "remove it, or add the matching '('"
    if stmt in ("attend", "select", "score") and _is(ctx.last, "NAME") and tok.type == "INT":
        return f"expected '(' before the arguments of {ctx.last.value}", f"write `{ctx.last.value}({tok.value})`"
    if stmt in ("attend", "select") and tok.type in ("NAME", "LPAR") and not _is(ctx.last, "LBRACE", "SEMICOLON"):
        return f"expected '|', '&' or '-' before {got}", _SET_OPS_HINT
    hint = "statements are `unit N`, `causal`, `attend EXPR`, `select EXPR` and `score relu(A)`, one per line"
    if tok.type == "NAME" and text[tok.end_pos :].lstrip().startswith("("):
        hint = f"to keep {tok.value}(...), write `attend {tok.value}(...)`"
    elif tok.type == "NAME":
        hint = did_you_mean(tok.value, _STATEMENTS) or hint
    return f"expected a statement (unit, causal, attend, select or score) or '}}', got {got}", hint


def _complete(ctx: _Context, tok: Token, got: str, text: str) -> tuple[str, str | None] | None:
    """An expression or statement is complete here and ``tok`` cannot follow it."""
    if ctx.kind == "args":
        return f"expected ')' after the arguments of {ctx.owner}, got {got}", "separate arguments with ','"
    if ctx.kind == "params":
        return (
            f"expected ',' or ')' after the default of parameter {ctx.param_name()}, got {got}",
            "separate parameters with ','",
        )
    if ctx.kind == "paren":
        return f"expected ')' to close the '(' at {ctx.opened_at()}, got {got}", None
    if ctx.kind == "body":
        return _in_body(ctx, tok, got, text)
    if ctx.kind == "header":
        return (
            f"expected '{{' to open the body of pattern {ctx.pattern}, got {got}",
            f"write `pattern {ctx.pattern}(PARAM = INT, ...) {{ ... }}`",
        )
    if tok.type in ("RBRACE", "RPAR"):
        return f"unexpected '{tok.value}' outside any pattern", "remove it; it closes nothing"
    hint = "a .spd file holds `pattern NAME(PARAM = INT, ...) { ... }` blocks"
    if tok.type in ("UNIT", "CAUSAL", "ATTEND", "SCORE", "SELECT"):
        hint = "statements belong inside a pattern: `pattern p() { ... }`"
    return f"expected 'pattern' to start a pattern definition, got {got}", hint


def token_error(e: UnexpectedToken, text: str, filename: str) -> SpdError:
    """Translate Lark's UnexpectedToken into an :class:`SpdError` in plain words."""
    tok = e.token
    stack = list(e.interactive_parser.parser_state.value_stack) if e.interactive_parser is not None else []
    ctx = _Context(stack)
    got = _describe(tok)
    expected = set(e.expected or ())
    found = _after_token(ctx, got, expected) or _missing_closer(ctx, tok) or _complete(ctx, tok, got, text)
    message, hint = found or (f"unexpected {got}; expected {_words(expected)}", None)
    if tok.type in _KEYWORDS and (ctx.kind == "params" or _is(ctx.last, "PATTERN")):
        hint = f"'{tok.value}' is a keyword and cannot be used as a name"
    if tok.type == "$END":
        line, col = end_position(text)
        return error_at(message, text, line, col, file=filename, hint=hint)
    return error_at(message, text, tok.line, tok.column, file=filename, hint=hint, length=len(tok.value))


# --- the tree -> AST transformer ------------------------------------------------------------


def _check_depth(tree: Tree, text: str, filename: str) -> None:
    """Refuse trees deeper than MAX_DEPTH, walking iteratively (no recursion on user input)."""
    stack = [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            meta = node.meta
            raise error_at(
                "expression nested too deeply",
                text,
                getattr(meta, "line", 1),
                getattr(meta, "column", 1),
                file=filename,
                hint=f"at most about {MAX_DEPTH} levels of operators and parentheses; split a long union "
                "over several attend lines, or simplify the expression",
            )
        stack.extend((c, depth + 1) for c in node.children if isinstance(c, Tree))


def _span(meta) -> dict[str, int]:
    if getattr(meta, "empty", True):
        return {"line": 1, "column": 1, "end_line": 1, "end_column": 1}
    return {"line": meta.line, "column": meta.column, "end_line": meta.end_line, "end_column": meta.end_column}


def _tspan(tok: Token) -> dict[str, int]:
    return {"line": tok.line, "column": tok.column, "end_line": tok.end_line, "end_column": tok.end_column}


_INT_OPS = {"add": "+", "sub": "-", "mul": "*", "floordiv": "//", "mod": "%"}
_SET_OPS = {"union": "|", "diff": "-", "inter": "&"}


@v_args(meta=True)
class _Build(Transformer):
    """Lark tree -> :mod:`spdsl.syntax` nodes. Literals are range-checked here."""

    def __init__(self, text: str, filename: str):
        super().__init__()
        self.text = text
        self.filename = filename

    def start(self, meta, children):
        return ast.Program(tuple(children), **_span(meta))

    def pattern_def(self, meta, children):
        name, *rest = children
        params = rest[0] if len(rest) == 2 else ()
        span = _span(meta)
        return ast.PatternDef(
            name.value, params, rest[-1], start_line=span["line"], start_column=span["column"], **_tspan(name)
        )

    def __default__(self, data, children, meta):
        """Operators (``add``, ``union``, ...) and the plain lists (``body``, ``arg_list``, ...)."""
        if data in _INT_OPS:
            return ast.BinOp(_INT_OPS[data], *children, **_span(meta))
        if data in _SET_OPS:
            return ast.SetOp(_SET_OPS[data], *children, **_span(meta))
        return tuple(children)

    def param(self, meta, children):
        name, default = children
        return ast.Param(name.value, default, **_tspan(name))

    def unit(self, meta, children):
        return ast.Unit(children[0], **_span(meta))

    def causal(self, meta, children):
        return ast.Causal(**_span(meta))

    def attend(self, meta, children):
        return ast.Attend(children[0], **_span(meta))

    def score(self, meta, children):
        return ast.Score(children[0], **_span(meta))

    def select(self, meta, children):
        return ast.Select(children[0], **_span(meta))

    def call(self, meta, children):
        name = children[0]
        args = children[1] if len(children) > 1 else ()
        return ast.Call(name.value, args, name_end_column=name.end_column, **_span(meta))

    def neg(self, meta, children):
        return ast.Neg(children[0], **_span(meta))

    def name(self, meta, children):
        return ast.Name(children[0].value, **_tspan(children[0]))

    def num(self, meta, children):
        tok = children[0]
        digits = tok.value.lstrip("0")
        if len(digits) > 10 or int(digits or "0") > INT_MAX:
            shown = tok.value if len(tok.value) <= 24 else tok.value[:20] + "..."
            raise error_at(
                f"number {shown} is too large",
                self.text,
                tok.line,
                tok.column,
                file=self.filename,
                length=len(tok.value),
                hint=f"integers must lie between -{INT_MAX} and {INT_MAX} (2**31 - 1)",
            )
        return ast.Num(int(digits or "0"), **_tspan(tok))
