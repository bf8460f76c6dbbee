"""Kernel expressions as a DAG: built with Python operators by the IR, printed with shared subexpressions named.

The IR's ``keep`` and ``classify`` run once over :class:`Node` values (through a target's ops
backend, e.g. :class:`spdsl.codegen.triton.TritonOps`) and leave a DAG. :func:`render` prints it
as straight-line code: a subexpression used more than once is bound to a name first
(``d = qu[:, None] - ku[None, :]``, ``ad = tl.abs(d)``), so the kernel reads like hand-written code.
Constant booleans fold (``x == x`` is true for integers, ``True & x`` is ``x``).

No user text reaches the output: variables are template-given names, constants are ints.
"""

from __future__ import annotations

from ..core.ir import INT_LIMIT

_BINARY = {"+", "-", "*", "&", "|", "<", "<=", ">", ">=", "==", "!="}


def _lift(x) -> Node:
    if isinstance(x, Node):
        return x
    if isinstance(x, bool):
        return Node("const", (x,))
    if isinstance(x, int):
        if not -INT_LIMIT < x < INT_LIMIT:
            raise ValueError(f"integer {x} out of range for generated code")
        return Node("const", (x,))
    raise TypeError(f"cannot use {type(x).__name__} in a kernel expression")


class Node:
    """One operation: ``var`` (a name), ``const`` (int or bool), a binary operator, ``not``, ``neg``
    or ``call`` (a function name, then its arguments). Equal structure means equal ``key``."""

    __slots__ = ("args", "hint", "key", "op")
    __hash__ = None  # type: ignore[assignment]  # == builds an expression

    def __init__(self, op: str, args: tuple = (), hint: str | None = None):
        self.op, self.args, self.hint = op, args, hint
        self.key = (op, tuple(a.key if isinstance(a, Node) else a for a in args))

    @property
    def const(self):
        """The Python value of a constant node, else None."""
        return self.args[0] if self.op == "const" else None

    def __bool__(self):
        raise TypeError("a kernel expression has no truth value (use & | ~ and ops.where)")

    def _bin(self, op: str, other, swap: bool = False) -> Node:
        a, b = (_lift(other), self) if swap else (self, _lift(other))
        ca, cb = a.const, b.const
        if op == "&":
            if ca is True or cb is True:
                return b if ca is True else a
            if ca is False or cb is False:
                return _FALSE
        if op == "|":
            if ca is False or cb is False:
                return b if ca is False else a
            if ca is True or cb is True:
                return _TRUE
        if op == "==" and a.key == b.key:
            return _TRUE
        hint = "d" if op == "-" and a.op == "var" and b.op == "var" else None
        return Node(op, (a, b), hint)

    def __invert__(self) -> Node:
        return _lift(not self.const) if isinstance(self.const, bool) else Node("not", (self,))

    def __neg__(self) -> Node:
        return (
            _lift(-self.const)
            if isinstance(self.const, int) and not isinstance(self.const, bool)
            else Node("neg", (self,))
        )


def _binop(op: str, swap: bool = False):
    return lambda self, other: self._bin(op, other, swap)


for _name, _op in (("add", "+"), ("sub", "-"), ("mul", "*"), ("and", "&"), ("or", "|")):
    setattr(Node, f"__{_name}__", _binop(_op))
    setattr(Node, f"__r{_name}__", _binop(_op, swap=True))
for _name, _op in (("lt", "<"), ("le", "<="), ("gt", ">"), ("ge", ">="), ("eq", "=="), ("ne", "!=")):
    setattr(Node, f"__{_name}__", _binop(_op))

_TRUE, _FALSE = Node("const", (True,)), Node("const", (False,))


def var(text: str) -> Node:
    """A value the template provides (``qu[:, None]``, ``ka``)."""
    return Node("var", (text,))


def call(fn: str, *args, hint: str | None = None) -> Node:
    """``fn(args...)``; arguments may be nodes or ints."""
    return Node("call", (fn, *(_lift(a) for a in args)), hint)


def render(roots: list, reserved: set[str] = frozenset()) -> tuple[list[str], list]:
    """``(lines, exprs)``: assignments binding every subexpression used twice, then one expression
    per root. A root that is a constant bool comes back as that bool (the template decides)."""
    roots = [_lift(r) for r in roots]
    uses: dict = {}

    def count(n: Node) -> None:
        if n.key in uses:
            uses[n.key] += 1
            return
        uses[n.key] = 1
        for a in n.args:
            if isinstance(a, Node):
                count(a)

    for r in roots:
        count(r)
    lines: list[str] = []
    names: dict = {}
    taken = set(reserved)

    def fresh(hint: str | None) -> str:
        base = hint or "t"
        name, i = base, 1
        while name in taken:
            name, i = f"{base}{i}", i + 1
        taken.add(name)
        return name

    def atom(n: Node) -> str:
        s = text(n)
        return s if n.op in ("var", "const", "call") or n.key in names else f"({s})"

    def text(n: Node) -> str:
        if n.key in names:
            return names[n.key]
        if n.op == "var":
            return n.args[0]
        if n.op == "const":
            v = n.args[0]
            return repr(v) if isinstance(v, bool) or v >= 0 else f"({v})"
        if n.op == "call":
            s = f"{n.args[0]}({', '.join(text(a) for a in n.args[1:])})"
        elif n.op == "not":
            s = f"{atom(n.args[0])} == 0"
        elif n.op == "neg":
            s = f"-{atom(n.args[0])}"
        else:
            s = f"{atom(n.args[0])} {n.op} {atom(n.args[1])}"
        if uses[n.key] > 1:
            name = fresh(n.hint)
            lines.append(f"{name} = {s}")
            names[n.key] = name
            return name
        return s

    exprs = [r.const if isinstance(r.const, bool) else text(r) for r in roots]
    return lines, exprs


def positive(b, what: str) -> int:
    """``b`` when it is a positive int constant, else ValueError (it is pasted into generated code)."""
    if not isinstance(b, int) or isinstance(b, bool) or b < 1:
        raise ValueError(f"{what} in generated code needs a positive constant, got {b!r}")
    return b


class EmitOps:
    """What the code-emitting ops backends share: the IR's methods build :mod:`.expr` nodes; a
    backend names its functions (``ABS``, ``MIN``, ``MAX``, ``WHERE``) and defines ``floor_pow``."""

    ABS = MIN = MAX = WHERE = ""

    def __init__(self):
        self.pow_bases: set[int] = set()

    def abs(self, x):
        return call(self.ABS, x, hint="a" + x.hint if isinstance(x, Node) and x.hint else "abs")

    def fdiv(self, a, b: int):
        return call("_fdiv", a, positive(b, "floor division"))

    def fmod(self, a, b: int):
        return call("_fmod", a, positive(b, "modulo"))

    def minimum(self, a, b):
        return call(self.MIN, a, b)

    def maximum(self, a, b):
        return call(self.MAX, a, b)

    def where(self, c, a, b):
        return call(self.WHERE, c, a, b)

    def not_(self, x):
        return ~x

    def true_like(self, x):
        return True
