"""Pattern IR: expressions over primitives, their set operations, and the normalized pattern.

Every node of an attend expression -- a primitive or a set operation -- answers three questions
in *unit* coordinates (``Q = q // unit``, ``K = k // unit``), for any backend ``ops``:

* ``keep(ops, Q, K)`` -- the predicate, elementwise;
* ``classify(ops, Qa, Qb, Ka, Kb) -> (any, all)`` -- whether it keeps any / all cells of the unit
  rectangle [Qa, Qb] x [Ka, Kb]; sound (``all`` means every cell is kept, ``not any`` none),
  exact for a primitive; ``classify_proven`` adds ``proven``, true where the answer is exact;
* ``candidates(Qa, Qb, kmax, span) -> (lo, hi)`` -- key-unit intervals ``[lo, hi]`` (rows x m)
  covering every key the node may keep for each row's query units (torch only).

Set operations combine their operands' answers themselves (as JAX splash attention's
``LogicalOr``/``LogicalAnd`` do), so one traversal serves every backend: :class:`TorchOps` here
(torch tensors or Python ints), the kernel emitters in :mod:`spdsl.codegen`. Arithmetic and
comparisons are plain operators; what operators cannot say goes through ``ops``.

Torch and the standard library only: generated modules embed this file (tree-shaken).
"""

from __future__ import annotations

import functools
import hashlib
import numbers
import operator
from typing import ClassVar

import torch

INT_LIMIT = 2**31  # every integer in a pattern, and every token position, lies strictly inside +-INT_LIMIT


def resolve_q_offset(q_offset, q_len: int, kv_len: int) -> int:
    """Absolute position of query row 0: ``q_offset``, by default ``kv_len - q_len``.

    The default puts the queries at the end of the keys (FlashAttention >= 2.1, KV-cache decode).
    Raises TypeError for a non-integer and ValueError when a position would leave int32.
    """
    if q_offset is None:
        q_offset = kv_len - q_len
    elif isinstance(q_offset, bool) or not isinstance(q_offset, numbers.Integral):
        raise TypeError(f"q_offset must be an int or None, got {type(q_offset).__name__}")
    q_offset = operator.index(q_offset)
    if not -INT_LIMIT < q_offset or q_offset + q_len > INT_LIMIT:
        raise ValueError(f"q_offset={q_offset} puts query positions outside int32 (+-2**31) for q_len={q_len}")
    return q_offset


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
        tensors = isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor)
        return torch.minimum(torch.as_tensor(a), torch.as_tensor(b)) if tensors else min(a, b)

    @staticmethod
    def maximum(a, b):
        tensors = isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor)
        return torch.maximum(torch.as_tensor(a), torch.as_tensor(b)) if tensors else max(a, b)

    @staticmethod
    def where(c, a, b):
        if isinstance(c, torch.Tensor):
            return torch.where(c, torch.as_tensor(a), torch.as_tensor(b))
        return a if c else b

    @staticmethod
    def not_(x):
        return ~x if isinstance(x, torch.Tensor) else not x

    @staticmethod
    def true_like(x):
        return torch.ones_like(x, dtype=torch.bool) if isinstance(x, torch.Tensor) else True

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

    def keep(self, ops, Q, K):
        raise NotImplementedError

    def classify(self, ops, Qa, Qb, Ka, Kb):
        return self.classify_proven(ops, Qa, Qb, Ka, Kb)[:2]

    def classify_proven(self, ops, Qa, Qb, Ka, Kb):
        raise NotImplementedError

    def candidates(self, Qa: torch.Tensor, Qb: torch.Tensor, kmax: int, span: int):
        raise NotImplementedError


class Primitive(Expr):
    """Base of all primitives: positional integer arguments, value semantics.

    A primitive defines ``keep`` and an exact ``classify``; ``check`` reports bad arguments.
    """

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

    def classify(self, ops, Qa, Qb, Ka, Kb):
        raise NotImplementedError

    def classify_proven(self, ops, Qa, Qb, Ka, Kb):
        any_, all_ = self.classify(ops, Qa, Qb, Ka, Kb)
        return any_, all_, ops.true_like(any_)


def _only_one(ops, flags, proven):
    """Where exactly one of ``flags`` holds, and that one is proven."""
    others = [[ops.not_(g) for j, g in enumerate(flags) if j != i] for i in range(len(flags))]
    terms = [functools.reduce(operator.and_, [f & p, *rest]) for f, p, rest in zip(flags, proven, others)]
    return functools.reduce(operator.or_, terms)


class SetOp(Expr):
    """Base of ``|``, ``&`` and ``-``: operands in ``parts``."""

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


class _Flat(SetOp):
    """``|`` and ``&``: operands combined by ``join``. Exact where every operand but one is
    neutral on the rectangle (keeps nothing for ``|``, everything for ``&``) and that one is exact."""

    def keep(self, ops, Q, K):
        return functools.reduce(self.join, (p.keep(ops, Q, K) for p in self.parts))

    def classify_proven(self, ops, Qa, Qb, Ka, Kb):
        res = [p.classify_proven(ops, Qa, Qb, Ka, Kb) for p in self.parts]
        any_ = functools.reduce(self.join, (r[0] for r in res))
        all_ = functools.reduce(self.join, (r[1] for r in res))
        union = self.join is operator.or_  # an operand matters if it keeps something (|) / drops something (&)
        matters = [r[0] if union else ops.not_(r[1]) for r in res]
        mixed_ok = _only_one(ops, matters, [r[2] for r in res])
        return any_, all_, all_ | ops.not_(any_) | mixed_ok


class Union(_Flat):
    symbol, join = "|", operator.or_

    def candidates(self, Qa, Qb, kmax, span):
        los, his = zip(*(torch.broadcast_tensors(*p.candidates(Qa, Qb, kmax, span)) for p in self.parts))
        return torch.cat(los, 1), torch.cat(his, 1)


class Inter(_Flat):
    symbol, join = "&", operator.and_

    def candidates(self, Qa, Qb, kmax, span):
        """Any operand's intervals cover the intersection: the tightest operand's (fewest key units,
        judged on a sample of rows, so the others are never built for every row)."""

        def size(part, rows):
            lo, hi = torch.broadcast_tensors(*part.candidates(Qa[rows], Qb[rows], kmax, span))
            return int((hi.clamp(max=kmax) - lo.clamp(min=0) + 1).clamp(min=0).sum())

        sample = torch.linspace(0, max(Qa.numel() - 1, 0), min(Qa.numel(), 16)).round().long()
        best = min(self.parts, key=lambda p: size(p, sample))
        return best.candidates(Qa, Qb, kmax, span)


class Diff(SetOp):
    symbol = "-"

    def __init__(self, a, b=None):
        super().__init__((a, b) if b is not None else a)

    def keep(self, ops, Q, K):
        a, b = (p.keep(ops, Q, K) for p in self.parts)
        return a & ops.not_(b)

    def classify_proven(self, ops, Qa, Qb, Ka, Kb):
        (aa, la, pa), (ab, lb, pb) = (p.classify_proven(ops, Qa, Qb, Ka, Kb) for p in self.parts)
        any_, all_ = aa & ops.not_(lb), la & ops.not_(ab)
        # mixed, and exact when the right side removes nothing or the left side keeps everything
        mixed_ok = (ops.not_(ab) & pa) | (la & pb)
        return any_, all_, all_ | ops.not_(any_) | mixed_ok

    def candidates(self, Qa, Qb, kmax, span):
        return self.parts[0].candidates(Qa, Qb, kmax, span)  # a subset of its left operand


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


#: The longest pattern name: names become identifiers of generated code (module, op and file names).
MAX_NAME_LENGTH = 64


class PatternIR:
    """A checked, normalized pattern: integers resolved, ready for layout and codegen."""

    __slots__ = ("causal", "expr", "name", "params", "score", "select", "unit")

    def __init__(
        self,
        name: str,
        unit: int,
        causal: bool,
        expr: Expr,
        params: dict[str, int] | None = None,
        *,
        score: tuple[str, int] | None = None,
        select: Expr | None = None,
    ):
        if not name.isidentifier():
            raise ValueError(f"pattern name must be an identifier, got {name!r}")
        if unit < 1:
            raise ValueError(f"unit must be >= 1, got {unit}")
        if score is not None and (score[0] != "relu" or isinstance(score[1], bool) or int(score[1]) < 1):
            raise ValueError(f"score must be ('relu', alpha) with an integer alpha >= 1, got {score!r}")
        self.name = name
        self.unit = int(unit)
        self.causal = bool(causal)
        self.expr = normalize(expr)
        self.params = dict(params or {})
        self.score = None if score is None else ("relu", int(score[1]))  # None: softmax
        self.select = None if select is None else normalize(select)  # v1.1 candidates beyond `expr`

    @property
    def dynamic(self) -> bool:
        """Whether the pattern has v1.1 lines (``score``/``select``): its decode is content-aware."""
        return self.score is not None or self.select is not None

    def text(self) -> str:
        """Stable textual form: equal texts mean equal patterns (and equal hashes).

        v1 patterns keep their v1 text; ``score`` and ``select`` lines appear only when present.
        """
        params = ", ".join(f"{k}={v}" for k, v in self.params.items())
        lines = [f"pattern {self.name}({params})", f"unit {self.unit}"]
        if self.causal:
            lines.append("causal")
        lines.append(f"attend {self.expr.text()}")
        if self.score is not None:
            lines.append(f"score {self.score[0]}({self.score[1]})")
        if self.select is not None:
            lines.append(f"select {self.select.text()}")
        return "\n".join(lines) + "\n"

    def hash(self) -> str:
        return hashlib.sha256(self.text().encode()).hexdigest()[:16]

    def __repr__(self) -> str:
        return (
            f"PatternIR({self.name!r}, unit={self.unit}, causal={self.causal}, "
            f"expr={self.expr!r}, params={self.params!r}"
            + (f", score={self.score!r}" if self.score is not None else "")
            + (f", select={self.select!r}" if self.select is not None else "")
            + ")"
        )

    def __eq__(self, other) -> bool:
        return isinstance(other, PatternIR) and self.text() == other.text()

    def __hash__(self) -> int:
        return hash(self.text())
