"""Pattern IR: the primitives, the set operations over them, and the normalized pattern.

Every primitive is one class that knows, in *unit* coordinates (Q = q // unit, K = k // unit):

* ``keep(ops, Q, K)``           -- its predicate, elementwise;
* ``classify(ops, Qa, Qb, Ka, Kb)`` -- exactly whether it keeps *any* / *all* cells of the
  rectangle [Qa, Qb] x [Ka, Kb];
* ``candidates(Qa, Qb, kmax, span)`` -- key-unit intervals it may touch for a range of query units.

The primitives themselves live in :mod:`spdsl.primitives` (re-exported here).

``ops`` is a backend: :class:`TorchOps` here (torch tensors or Python ints), a Triton text
emitter in :mod:`spdsl.codegen`. Arithmetic and comparisons are plain operators, so one
definition serves the dense mask, the layout and the generated kernel alike.

This module imports only torch (and the standard library): :mod:`spdsl.codegen` embeds its
source in standalone generated modules.
"""

from __future__ import annotations

import hashlib
import math
from typing import ClassVar

import torch

INT_LIMIT = 2**31  # every integer in a pattern lies strictly between -INT_LIMIT and INT_LIMIT


class TorchOps:
    """Backend for torch int64 tensors and Python ints (``//`` and ``%`` already floor)."""

    @staticmethod
    def abs(x):
        return abs(x)

    @staticmethod
    def fdiv(a, b: int):
        return a // b

    @staticmethod
    def fmod(a, b: int):
        return a % b

    @staticmethod
    def minimum(a, b):
        if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
            return torch.minimum(torch.as_tensor(a), torch.as_tensor(b))
        return min(a, b)

    @staticmethod
    def maximum(a, b):
        if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
            return torch.maximum(torch.as_tensor(a), torch.as_tensor(b))
        return max(a, b)

    @staticmethod
    def where(c, a, b):
        if isinstance(c, torch.Tensor):
            return torch.where(c, torch.as_tensor(a), torch.as_tensor(b))
        return a if c else b

    @staticmethod
    def const(value: bool):
        return value

    @staticmethod
    def floor_pow(x, b: int):
        """Largest b**i <= x for x >= 1 (1 where x < 1)."""
        r = TorchOps.where(x >= 1, 1, 1)
        p = b
        while p < INT_LIMIT:
            r = TorchOps.where(x >= p, p, r)
            p *= b
        return r


class Expr:
    """A node of the attend expression: a primitive or a set operation."""

    def __or__(self, other: Expr) -> Expr:
        return Union((self, other))

    def __and__(self, other: Expr) -> Expr:
        return Inter((self, other))

    def __sub__(self, other: Expr) -> Expr:
        return Diff(self, other)

    def text(self) -> str:
        raise NotImplementedError

    def primitives(self) -> list[Primitive]:
        raise NotImplementedError


class Primitive(Expr):
    """Base of all primitives: positional integer arguments, value semantics."""

    name: ClassVar[str]
    arg_names: ClassVar[tuple[str, ...]] = ()
    doc: ClassVar[str] = ""
    __slots__ = ("args",)

    def __init__(self, *args: int):
        if len(args) != len(self.arg_names):
            raise TypeError(f"{self.name} takes {len(self.arg_names)} argument(s), got {len(args)}")
        self.args = tuple(int(a) for a in args)

    def __getattr__(self, item: str):
        names = type(self).arg_names
        if item in names:
            return self.args[names.index(item)]
        raise AttributeError(item)

    def __eq__(self, other) -> bool:
        return type(self) is type(other) and self.args == other.args

    def __hash__(self) -> int:
        return hash((self.name, self.args))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(map(str, self.args))})"

    def text(self) -> str:
        return f"{self.name}({', '.join(map(str, self.args))})" if self.arg_names else self.name

    def primitives(self) -> list[Primitive]:
        return [self]

    def check(self) -> list[tuple[int, str]]:
        """Problems with the arguments, as (argument index, message); empty when valid."""
        return []

    def keep(self, ops, Q, K):
        raise NotImplementedError

    def classify(self, ops, Qa, Qb, Ka, Kb):
        raise NotImplementedError

    def candidates(self, Qa: torch.Tensor, Qb: torch.Tensor, kmax: int, span: int):
        raise NotImplementedError


class _SetOp(Expr):
    symbol: ClassVar[str]
    __slots__ = ("parts",)

    def __init__(self, parts):
        self.parts = tuple(parts)

    def __eq__(self, other) -> bool:
        return type(self) is type(other) and self.parts == other.parts

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.parts))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(({', '.join(map(repr, self.parts))},))"

    def text(self) -> str:
        return "(" + f" {self.symbol} ".join(p.text() for p in self.parts) + ")"

    def primitives(self) -> list[Primitive]:
        return [p for part in self.parts for p in part.primitives()]


class Union(_SetOp):
    symbol = "|"


class Inter(_SetOp):
    symbol = "&"


class Diff(_SetOp):
    symbol = "-"

    def __init__(self, a, b=None):
        super().__init__((a, b) if b is not None else a)


def normalize(expr: Expr) -> Expr:
    """Flatten nested unions/intersections, drop duplicate operands, order operands canonically."""
    if isinstance(expr, Primitive):
        return expr
    if isinstance(expr, Diff):
        return Diff(normalize(expr.parts[0]), normalize(expr.parts[1]))
    flat: list[Expr] = []
    for part in map(normalize, expr.parts):
        flat.extend(part.parts if type(part) is type(expr) else (part,))
    unique = sorted(set(flat), key=lambda e: e.text())
    return unique[0] if len(unique) == 1 else type(expr)(unique)


class PatternIR:
    """A checked, normalized pattern: integers resolved, ready for layout and codegen."""

    __slots__ = ("causal", "expr", "name", "params", "unit")

    def __init__(self, name: str, unit: int, causal: bool, expr: Expr, params: dict[str, int] | None = None):
        if not name.isidentifier():
            raise ValueError(f"pattern name must be an identifier, got {name!r}")
        if unit < 1:
            raise ValueError(f"unit must be >= 1, got {unit}")
        self.name = name
        self.unit = int(unit)
        self.causal = bool(causal)
        self.expr = normalize(expr)
        self.params = dict(params or {})

    def text(self) -> str:
        """Stable textual form: equal texts mean equal patterns (and equal hashes)."""
        params = ", ".join(f"{k}={v}" for k, v in self.params.items())
        lines = [f"pattern {self.name}({params})", f"unit {self.unit}"]
        if self.causal:
            lines.append("causal")
        lines.append(f"attend {self.expr.text()}")
        return "\n".join(lines) + "\n"

    def hash(self) -> str:
        return hashlib.sha256(self.text().encode()).hexdigest()[:16]

    def __repr__(self) -> str:
        return (
            f"PatternIR({self.name!r}, unit={self.unit}, causal={self.causal}, "
            f"expr={self.expr!r}, params={self.params!r})"
        )

    def __eq__(self, other) -> bool:
        return isinstance(other, PatternIR) and self.text() == other.text()

    def __hash__(self) -> int:
        return hash(self.text())


# ---------------------------------------------------------------------------------------------
# Evaluation over expression trees


def keep(expr: Expr, ops, Q, K):
    """The expression's predicate on unit indices (no causal cut)."""
    if isinstance(expr, Primitive):
        return expr.keep(ops, Q, K)
    vals = [keep(p, ops, Q, K) for p in expr.parts]
    if isinstance(expr, Diff):
        return vals[0] & ~vals[1]
    out = vals[0]
    for v in vals[1:]:
        out = (out | v) if isinstance(expr, Union) else (out & v)
    return out


def classify(expr: Expr, ops, Qa, Qb, Ka, Kb):
    """(any, all, proven) over unit rectangles.

    ``any``/``all`` are sound: ``all`` implies every cell is kept, ``not any`` that none is.
    ``proven`` marks results known exact; an unproven mixed result (any and not all) may in
    truth be all or none and must be refined on smaller rectangles.
    """
    if isinstance(expr, Primitive):
        a, b = expr.classify(TorchOps, Qa, Qb, Ka, Kb)
        a, b = torch.as_tensor(a).expand(Qa.shape), torch.as_tensor(b).expand(Qa.shape)
        return a, b, torch.ones_like(a)
    res = [classify(p, ops, Qa, Qb, Ka, Kb) for p in expr.parts]
    if isinstance(expr, Diff):
        (aa, la, pa), (ab, lb, pb) = res
        any_, all_ = aa & ~lb, la & ~ab
        mixed_ok = (~ab & pa) | (la & pb)
    elif isinstance(expr, Union):
        any_ = torch.stack([r[0] for r in res]).any(0)
        all_ = torch.stack([r[1] for r in res]).any(0)
        live = torch.stack([r[0] for r in res])
        live_proven = torch.stack([r[0] & r[2] for r in res])
        mixed_ok = (live.sum(0) == 1) & live_proven.any(0)
    else:
        any_ = torch.stack([r[0] for r in res]).all(0)
        all_ = torch.stack([r[1] for r in res]).all(0)
        partial = torch.stack([~r[1] for r in res])
        partial_proven = torch.stack([~r[1] & r[2] for r in res])
        mixed_ok = (partial.sum(0) == 1) & partial_proven.any(0)
    proven = all_ | ~any_ | mixed_ok
    return any_, all_, proven


def describe(prim_cls: type[Primitive]) -> str:
    """One-line signature and meaning, for help texts and error hints."""
    args = ", ".join(prim_cls.arg_names)
    sig = f"{prim_cls.name}({args})" if prim_cls.arg_names else prim_cls.name
    return f"{sig}: {prim_cls.doc}"


def ilog(x: int, b: int) -> int:
    """floor(log_b(x)) for x >= 1, exactly."""
    i = int(math.log(x, b)) if x > 0 else 0
    while b ** (i + 1) <= x:
        i += 1
    while i > 0 and b**i > x:
        i -= 1
    return i


from .primitives import *  # noqa: E402, F403  (re-export: every primitive class and PRIMITIVES)
