"""Codegen: the only module that writes Triton text.

The pattern's predicate is rendered from the IR's own ``keep`` methods through :class:`TritonOps`,
an operator-overloading text emitter, so the kernel, ``dense_mask`` and the layout read one
definition. User text never reaches the output: names are validated identifiers, values ints.
"""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import jinja2

from . import ir as ir_mod
from ._version import __version__
from .ir import INT_LIMIT, PatternIR
from .resources import data_path, template_text

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def _ident(name: str) -> str:
    if not _IDENT.match(name) or len(name) > 64:
        raise ValueError(f"not a valid identifier for generated code: {name!r}")
    return name


class T:
    """A Triton expression as text; Python operators build bigger expressions."""

    __slots__ = ("s",)
    __hash__ = None  # type: ignore[assignment]

    def __init__(self, s: str):
        self.s = s

    def __str__(self) -> str:
        return self.s


def _txt(x) -> str:
    if isinstance(x, T):
        return x.s
    if isinstance(x, bool):
        return "True" if x else "False"
    if isinstance(x, int):
        if not -INT_LIMIT < x < INT_LIMIT:
            raise ValueError(f"integer {x} out of range for generated code")
        return f"({x})" if x < 0 else str(x)
    raise TypeError(f"cannot render {type(x).__name__} into Triton code")


def _binop(op: str, swap: bool = False):
    def f(self, other):
        a, b = (other, self) if swap else (self, other)
        return T(f"({_txt(a)} {op} {_txt(b)})")

    return f


for _name, _op in [("add", "+"), ("sub", "-"), ("mul", "*"), ("and", "&"), ("or", "|")]:
    setattr(T, f"__{_name}__", _binop(_op))
    setattr(T, f"__r{_name}__", _binop(_op, swap=True))
for _name, _op in [("lt", "<"), ("le", "<="), ("gt", ">"), ("ge", ">="), ("eq", "=="), ("ne", "!=")]:
    setattr(T, f"__{_name}__", _binop(_op))
T.__neg__ = lambda self: T(f"(-{self.s})")
T.__invert__ = lambda self: T(f"({self.s} == 0)")
T.__abs__ = lambda self: TritonOps.abs(self)
T.__floordiv__ = lambda self, b: TritonOps.fdiv(self, b)
T.__mod__ = lambda self, b: TritonOps.fmod(self, b)


class TritonOps:
    """Backend of the IR's ``keep``/``classify`` that emits Triton expressions."""

    @staticmethod
    def abs(x):
        return T(f"tl.abs({_txt(x)})")

    @staticmethod
    def fdiv(a, b: int):
        if not isinstance(b, int) or b < 1:
            raise ValueError("floor division in generated code needs a positive constant divisor")
        return T(f"_fdiv({_txt(a)}, {b})")

    @staticmethod
    def fmod(a, b: int):
        if not isinstance(b, int) or b < 1:
            raise ValueError("modulo in generated code needs a positive constant divisor")
        return T(f"_fmod({_txt(a)}, {b})")

    @staticmethod
    def minimum(a, b):
        return T(f"tl.minimum({_txt(a)}, {_txt(b)})")

    @staticmethod
    def maximum(a, b):
        return T(f"tl.maximum({_txt(a)}, {_txt(b)})")

    @staticmethod
    def where(c, a, b):
        return T(f"tl.where({_txt(c)}, {_txt(a)}, {_txt(b)})")

    @staticmethod
    def floor_pow(x, b: int):
        return T(f"_floor_pow{b}({_txt(x)})")


def floor_pow_helper(b: int) -> str:
    """A jitted ``_floor_pow{b}(x)``: the largest b**i <= x (1 when x < 1), unrolled."""
    lines = [f"@triton.jit\ndef _floor_pow{b}(x):", "    r = tl.full(x.shape, 1, tl.int32)"]
    p = b
    while p < INT_LIMIT:
        lines.append(f"    r = tl.where(x >= {p}, {p}, r)")
        p *= b
    lines.append("    return r")
    return "\n".join(lines)


def predicate(pat: PatternIR, q_units: str = "qu[:, None]", k_units: str = "ku[None, :]") -> str:
    """The attend expression (no causal cut) as Triton text over unit-index vectors."""
    return _txt(ir_mod.keep(pat.expr, TritonOps, T(q_units), T(k_units)))


def _classify(expr, qa: T, qb: T, ka: T, kb: T) -> tuple:
    """Sound (any, all) of the attend expression over unit rectangles, as Triton text."""
    if isinstance(expr, ir_mod.Primitive):
        return expr.classify(TritonOps, qa, qb, ka, kb)
    parts = [_classify(p, qa, qb, ka, kb) for p in expr.parts]
    if isinstance(expr, ir_mod.Diff):
        (a_any, a_all), (b_any, b_all) = parts
        return a_any & ~b_all, a_all & ~b_any
    any_, all_ = parts[0]
    for p_any, p_all in parts[1:]:
        if isinstance(expr, ir_mod.Union):
            any_, all_ = any_ | p_any, all_ | p_all
        else:
            any_, all_ = any_ & p_any, all_ & p_all
    return any_, all_


def tile_test(pat: PatternIR) -> str:
    """Triton text: may a kv tile with key units [ka, kb] hold a key that query units [qa, qb] see?

    Sound (never drops a visible tile); exact for single primitives and unions.
    """
    return _txt(_classify(pat.expr, T("qa"), T("qb"), T("ka"), T("kb"))[0])


def _powers_bases(pat: PatternIR) -> list[int]:
    return sorted({p.b for p in pat.expr.primitives() if isinstance(p, ir_mod.Powers)})


def embedded_runtime_source() -> str:
    """Source of ir.py + layout.py, to embed in standalone modules (no spdsl import needed)."""
    parts = []
    for mod in ("ir", "primitives", "layout"):
        text = Path(ir_mod.__file__).with_name(f"{mod}.py").read_text(encoding="utf-8")
        text = re.sub(r"^from __future__ import annotations\n", "", text, flags=re.M)
        text = re.sub(r"^from \.(ir|primitives) import [^\n]+\n", "", text, flags=re.M)
        parts.append(f"# {'-' * 20} spdsl/{mod}.py (spdsl {__version__}) {'-' * 20}\n{text.strip()}\n")
    return "\n\n".join(parts)


@dataclass(frozen=True)
class KernelConfig:
    """Tile shape and launch settings; part of the cache key."""

    block_m: int = 128
    block_n: int = 128
    num_warps: int = 8
    num_stages: int = 3
    warp_specialize: bool = False
    one_loop: bool = False

    def __post_init__(self):
        for name in ("block_m", "block_n"):
            v = getattr(self, name)
            if v not in (16, 32, 64, 128, 256):
                raise ValueError(f"{name} must be one of 16, 32, 64, 128, 256; got {v}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"num_warps must be a power of two <= 16, got {self.num_warps}")
        if not 1 <= self.num_stages <= 8:
            raise ValueError(f"num_stages must be in 1..8, got {self.num_stages}")


@dataclass(frozen=True)
class BuildSpec:
    """Everything that determines the generated module's text."""

    pattern: PatternIR
    source: str = ""
    configs: tuple[KernelConfig, ...] = field(default_factory=lambda: (KernelConfig(),))


def _env() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FunctionLoader(lambda name: template_text(name)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    return env


def template_texts() -> str:
    """All template text (part of the cache key)."""
    names = sorted(p.name for p in data_path("templates").glob("*.py.jinja"))
    return "\n".join(template_text(n) for n in names)


def render_module(spec: BuildSpec) -> str:
    """The standalone Python module (torch + triton imports only) for one pattern."""
    pat = spec.pattern
    source = spec.source.strip() or pat.text()
    safe_source = textwrap.indent(source.replace("\\", "\\\\").replace('"""', '\\"\\"\\"'), "    ")
    text = (
        _env()
        .get_template("module.py.jinja")
        .render(
            name=_ident(pat.name),
            version=__version__,
            ir_text=textwrap.indent(pat.text().strip(), "    "),
            spd_source=safe_source,
            ir_repr=repr(pat),
            ir_hash=pat.hash(),
            unit=pat.unit,
            causal=pat.causal,
            predicate=predicate(pat),
            tile_test=tile_test(pat),
            pow_helpers=[floor_pow_helper(b) for b in _powers_bases(pat)],
            runtime_source=embedded_runtime_source(),
            configs=[
                (c.block_m, c.block_n, c.num_warps, c.num_stages, c.warp_specialize, c.one_loop) for c in spec.configs
            ],
        )
    )
    compile(text, f"<spdsl generated {pat.name}>", "exec")  # fail here, not at import time
    return text
