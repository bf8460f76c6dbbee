"""The abstract syntax tree of a ``.spd`` file: frozen dataclasses built by :mod:`spdsl.parser`.

Every node carries where it came from -- ``line``, ``column`` (1-based, the first character)
and ``end_line``, ``end_column`` (1-based, just past the last character) -- so that
:mod:`spdsl.lower` can point its errors at the offending text. Positions do not take part in
equality: two trees that differ only in layout compare equal.

Also here: locating errors in the source (:func:`error_at`, :func:`error_at_node`), with lines
numbered the way the lexer numbers them (``\n`` only). Standard library only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import SpdError


@dataclass(frozen=True, kw_only=True)
class Node:
    """Base of all nodes: the source span, excluded from ``==``."""

    line: int = field(default=0, compare=False)
    column: int = field(default=0, compare=False)
    end_line: int = field(default=0, compare=False)
    end_column: int = field(default=0, compare=False)

    def span(self) -> dict[str, int]:
        """The position fields, to copy onto another node (``Num(3, **node.span())``)."""
        return {"line": self.line, "column": self.column, "end_line": self.end_line, "end_column": self.end_column}


# --- integer expressions -------------------------------------------------------------------


@dataclass(frozen=True)
class Num(Node):
    """An integer literal (already checked to lie in the 32-bit range)."""

    value: int


@dataclass(frozen=True)
class Name(Node):
    """A parameter reference inside an integer expression."""

    id: str


@dataclass(frozen=True)
class BinOp(Node):
    """``left op right`` with ``op`` one of ``+ - * // %``."""

    op: str
    left: IntExpr
    right: IntExpr


@dataclass(frozen=True)
class Neg(Node):
    """Unary minus."""

    operand: IntExpr


IntExpr = Num | Name | BinOp | Neg


# --- set expressions -----------------------------------------------------------------------


@dataclass(frozen=True)
class Call(Node):
    """A primitive, ``name`` or ``name(arg, ...)``; the name is resolved by :mod:`spdsl.lower`.

    ``line``/``column`` are those of the name; ``end_column`` lies past the closing ``)``.
    """

    name: str
    args: tuple[IntExpr, ...] = ()
    name_end_column: int = field(default=0, compare=False)


@dataclass(frozen=True)
class SetOp(Node):
    """``left op right`` with ``op`` one of ``|`` (union), ``&`` (intersection), ``-`` (difference)."""

    op: str
    left: SetExpr
    right: SetExpr


SetExpr = Call | SetOp


# --- statements and patterns ---------------------------------------------------------------


@dataclass(frozen=True)
class Unit(Node):
    """``unit EXPR``: tokens per pattern unit."""

    expr: IntExpr


@dataclass(frozen=True)
class Causal(Node):
    """``causal``: keep only keys at or before the query."""


@dataclass(frozen=True)
class Attend(Node):
    """``attend EXPR``: keys to keep (several attend lines are unioned)."""

    expr: SetExpr


@dataclass(frozen=True)
class Score(Node):
    """``score FN(ARGS)`` (v1.1): the attention weights, e.g. ``score relu(2)``; checked by :mod:`spdsl.lower`."""

    call: Call


@dataclass(frozen=True)
class Select(Node):
    """``select EXPR`` (v1.1): candidate keys beyond ``attend``, computed only where a bound says they matter."""

    expr: SetExpr


Stmt = Unit | Causal | Attend | Score | Select


@dataclass(frozen=True)
class Param(Node):
    """``NAME = EXPR`` in a pattern's parameter list; the position is that of the name."""

    name: str
    default: IntExpr


@dataclass(frozen=True)
class PatternDef(Node):
    """``pattern NAME(params) { stmts }``; ``line``/``column`` are those of the *name*.

    ``start_line``/``start_column`` locate the ``pattern`` keyword.
    """

    name: str
    params: tuple[Param, ...] = ()
    stmts: tuple[Stmt, ...] = ()
    start_line: int = field(default=0, compare=False)
    start_column: int = field(default=0, compare=False)


@dataclass(frozen=True)
class Program(Node):
    """A whole file: one or more patterns, in order."""

    patterns: tuple[PatternDef, ...] = ()


# --- source positions -> located errors --------------------------------------------------


def source_line(text: str, line: int) -> str:
    """Line ``line`` (1-based, split on ``\\n`` only, as the lexer counts) made safe to print."""
    lines = text.split("\n")
    src = lines[line - 1].rstrip("\r") if 1 <= line <= len(lines) else ""
    return "".join(c if c.isprintable() or c == "\t" else "?" for c in src)


def error_at(
    message: str, text: str, line: int, column: int, *, file: str = "<string>", hint: str | None = None, length: int = 1
) -> SpdError:
    """An :class:`SpdError` at (line, column) of ``text``, numbering lines the way the lexer does."""
    return SpdError(
        message, file=file, line=line, column=column, source_line=source_line(text, line), hint=hint, length=length
    )


def error_at_node(message: str, text: str, node: Node, *, file: str = "<string>", hint: str | None = None) -> SpdError:
    """An :class:`SpdError` with the caret under ``node``'s text (up to the end of its first line)."""
    if node.end_line == node.line and node.end_column > node.column:
        length = node.end_column - node.column
    else:
        length = max(1, len(source_line(text, node.line)) - node.column + 1)
    return error_at(message, text, node.line, node.column, file=file, hint=hint, length=length)


def end_position(text: str) -> tuple[int, int]:
    """(line, column) just past the last non-blank character: where a missing token belongs."""
    body = text.rstrip()
    line = body.count("\n") + 1
    return line, len(body) - (body.rfind("\n") + 1) + 1


def strip_bom(text: str) -> str:
    """``text`` without a leading byte-order mark (editors hide it; columns count without it)."""
    return text[1:] if text.startswith("\ufeff") else text
