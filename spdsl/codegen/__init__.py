"""Codegen: the only place that writes kernel source.

One traversal of the IR (its own ``keep`` / ``classify``, run over :mod:`.expr` nodes) feeds
every target; a target is an ops backend plus templates: :mod:`.triton` with
``templates/triton/*.py.jinja`` today. :func:`render_module` writes the standalone module that
``spdsl build`` saves and ``spdsl.build`` imports: the pattern's kernels, host code, and the
tree-shaken core it needs (:mod:`.embed`).
"""

from __future__ import annotations

import dataclasses
import re
import textwrap
from dataclasses import dataclass, field

import jinja2

from .._version import __version__
from ..core.ir import MAX_NAME_LENGTH, Expr, PatternIR, SetOp
from ..resources import data_path, template_text
from .embed import embed
from .triton import predicate, tile_test

__all__ = [
    "BackwardConfig",
    "BuildSpec",
    "KernelConfig",
    "embedded_core",
    "predicate",
    "render_module",
    "template_texts",
    "tile_test",
]

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
#: Core names the host templates call.
HOST_ROOTS = {"build_csr", "transpose_csr", "resolve_q_offset", "check_qkv", "resolve_scale"}
#: Names the module template imports itself.
MODULE_IMPORTS = {"functools", "math", "os", "sys", "time", "torch", "triton", "tl", "SimpleNamespace"}


def _ident(name: str) -> str:
    if not _IDENT.match(name) or len(name) > MAX_NAME_LENGTH:
        raise ValueError(f"not a valid identifier for generated code: {name!r}")
    return name


@dataclass(frozen=True)
class KernelConfig:
    """Tile shape and launch settings of the prefill kernel; part of the cache key."""

    block_m: int = 128
    block_n: int = 128
    num_warps: int = 8
    num_stages: int = 3
    warp_specialize: bool = False

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
class BackwardConfig:
    """Tiles and launch settings of the backward kernels; part of the cache key.

    The layout's tiles are ``tile_m x tile_n``. A dK/dV program owns ``dkdv_n`` keys of a kv tile
    and walks the q tiles that see it ``dkdv_m`` rows at a time; a dQ program owns ``dq_m`` rows
    of a q tile and walks its kv tiles ``dq_n`` keys at a time. ``atomic_dq``: no dQ kernel; the
    dK/dV kernel adds each tile's dQ into an fp32 buffer with atomics (two matmuls per tile fewer,
    but the summation order varies: results are not bitwise reproducible run to run).
    """

    tile_m: int = 128
    tile_n: int = 128
    dkdv_m: int = 64
    dkdv_n: int = 128
    dkdv_warps: int = 8
    dkdv_stages: int = 2
    dq_m: int = 128
    dq_n: int = 64
    dq_warps: int = 8
    dq_stages: int = 2
    atomic_dq: bool = False

    def __post_init__(self):
        for name in ("tile_m", "tile_n", "dkdv_m", "dkdv_n", "dq_m", "dq_n"):
            if getattr(self, name) not in (16, 32, 64, 128, 256):
                raise ValueError(f"{name} must be one of 16, 32, 64, 128, 256; got {getattr(self, name)}")
        for part, whole in (("dkdv_m", "tile_m"), ("dq_m", "tile_m"), ("dkdv_n", "tile_n"), ("dq_n", "tile_n")):
            if getattr(self, whole) % getattr(self, part):
                raise ValueError(f"{part} must divide {whole}, got {self}")
        for name in ("dkdv_warps", "dq_warps"):
            if getattr(self, name) not in (1, 2, 4, 8, 16):
                raise ValueError(f"{name} must be a power of two <= 16, got {getattr(self, name)}")
        for name in ("dkdv_stages", "dq_stages"):
            if not 1 <= getattr(self, name) <= 8:
                raise ValueError(f"{name} must be in 1..8, got {getattr(self, name)}")


@dataclass(frozen=True)
class BuildSpec:
    """Everything that determines the generated module's text."""

    pattern: PatternIR
    source: str = ""
    configs: tuple[KernelConfig, ...] = field(default_factory=lambda: (KernelConfig(),))
    bwd_configs: tuple[BackwardConfig, ...] = field(default_factory=lambda: (BackwardConfig(),))


def _env() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FunctionLoader(template_text),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def template_texts() -> str:
    """All template text (part of the cache key)."""
    names = sorted(str(p.relative_to(data_path("templates"))) for p in data_path("templates").rglob("*.py.jinja"))
    return "\n".join(template_text(n) for n in names)


def _expr_classes(expr: Expr) -> set[str]:
    out = {type(expr).__name__}
    if isinstance(expr, SetOp):
        for p in expr.parts:
            out |= _expr_classes(p)
    return out


def embedded_core(pat: PatternIR) -> str:
    """The tree-shaken core a pattern's module embeds (part of the cache key)."""
    return embed(HOST_ROOTS | _expr_classes(pat.expr), have=MODULE_IMPORTS)


def _definition(source: str) -> str:
    """The source from its first pattern on: the file's header comments stay in the file."""
    lines = source.strip().splitlines()
    while lines and (not lines[0].strip() or lines[0].lstrip().startswith("#")):
        lines.pop(0)
    return "\n".join(lines)


def render_module(spec: BuildSpec) -> str:
    """The standalone Python module (torch + triton imports only) for one pattern."""
    pat = spec.pattern
    source = _definition(spec.source) or pat.text()
    safe_source = textwrap.indent(source.replace("\\", "\\\\").replace('"""', '\\"\\"\\"'), "    ")
    keep, test = predicate(pat), tile_test(pat)
    keep_t = predicate(pat, q_units="qu[None, :]", k_units="ku[:, None]")
    text = (
        _env()
        .get_template("triton/module.py.jinja")
        .render(
            name=_ident(pat.name),
            version=__version__,
            ir_text=textwrap.indent(pat.text().strip(), "    "),
            spd_source=safe_source,
            expr_repr=repr(pat.expr),
            ir_hash=pat.hash(),
            unit=pat.unit,
            causal=pat.causal,
            predicate=keep,
            predicate_t=keep_t,
            tile_test=test,
            floor_pow=bool(keep.pow_bases | test.pow_bases),
            core_source=embedded_core(pat),
            configs=[dataclasses.asdict(c) for c in spec.configs],
            bwd_configs=[dataclasses.asdict(c) for c in spec.bwd_configs],
        )
    )
    compile(text, f"<spdsl generated {pat.name}>", "exec")  # fail here, not at import time
    return text
