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

from .._version import __version__
from ..core.ir import MAX_NAME_LENGTH, Expr, PatternIR, SetOp
from ..resources import data_path, jinja_env, template_text
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
HOST_ROOTS = {
    "build_csr",
    "restrict_csr",
    "transpose_csr",
    "resolve_q_offset",
    "check_qkv",
    "resolve_scale",
}
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
    """Everything that determines the generated module's text.

    ``pattern``: one pattern, or a tuple of them for a per-head module (each query head picks one
    at call time, ``heads=[...]``); ``source``: the ``.spd`` text (all of it, for several).
    """

    pattern: PatternIR | tuple[PatternIR, ...]
    source: str = ""
    configs: tuple[KernelConfig, ...] = field(default_factory=lambda: (KernelConfig(),))
    bwd_configs: tuple[BackwardConfig, ...] = field(default_factory=lambda: (BackwardConfig(),))

    @property
    def patterns(self) -> tuple[PatternIR, ...]:
        """The patterns, as a tuple (one for a single-pattern module)."""
        return self.pattern if isinstance(self.pattern, tuple) else (self.pattern,)


def template_texts(target: str = "triton") -> str:
    """All template text of one target (``templates/<target>/``; part of the cache key)."""
    base = data_path("templates")
    names = sorted(p.relative_to(base).as_posix() for p in base.joinpath(target).rglob("*.py.jinja"))
    return "\n".join(template_text(n) for n in names)


def _expr_classes(expr: Expr) -> set[str]:
    out = {type(expr).__name__}
    if isinstance(expr, SetOp):
        for p in expr.parts:
            out |= _expr_classes(p)
    return out


def embedded_core(*patterns: PatternIR) -> str:
    """The tree-shaken core a module for these patterns embeds (part of the cache key)."""
    classes = set().union(*(_expr_classes(p.expr) for p in patterns))
    return embed(HOST_ROOTS | classes, have=MODULE_IMPORTS)


def _definition(source: str) -> str:
    """The source from its first pattern on: the file's header comments stay in the file."""
    lines = source.strip().splitlines()
    while lines and (not lines[0].strip() or lines[0].lstrip().startswith("#")):
        lines.pop(0)
    return "\n".join(lines)


def _pattern_items(patterns: tuple[PatternIR, ...]) -> list[dict]:
    """What the templates need of each pattern; names get a suffix ``_i`` when there are several."""
    items = []
    for i, pat in enumerate(patterns):
        suffix = f"_{i}" if len(patterns) > 1 else ""
        keep = predicate(pat)
        items.append(
            dict(
                index=i,
                suffix=suffix,
                unit_name=f"UNIT{suffix}",
                unit=pat.unit,
                causal=pat.causal,
                predicate=keep,
                predicate_t=predicate(pat, q_units="qu[None, :]", k_units="ku[:, None]"),
                tile_test=tile_test(pat),
                expr_repr=repr(pat.expr),
                name=_ident(pat.name),
            )
        )
    return items


def render_module(spec: BuildSpec) -> str:
    """The standalone Python module (torch + triton imports only) for one pattern, or for several
    (per-head: each query head walks its own pattern's layout, one launch for all heads)."""
    pats = spec.patterns
    if not pats:
        raise ValueError("a module needs at least one pattern")
    name = "_".join(_ident(p.name) for p in pats)[:MAX_NAME_LENGTH]
    source = _definition(spec.source) or "\n\n".join(p.text() for p in pats)
    safe_source = textwrap.indent(source.replace("\\", "\\\\").replace('"""', '\\"\\"\\"'), "    ")
    items = _pattern_items(pats)
    multi = len(pats) > 1
    text = (
        jinja_env(lambda name: template_text(name))  # (late-bound: tests swap template_text)
        .get_template("triton/module.py.jinja")
        .render(
            name=name,
            version=__version__,
            ir_text=textwrap.indent("\n\n".join(p.text().strip() for p in pats), "    "),
            spd_source=safe_source,
            ir_hash=" + ".join(p.hash() for p in pats),
            patterns=items,
            multi=multi,
            pat_arg=", pat" if multi else "",
            crow="crow" if multi else "row",
            floor_pow=any(it[k].pow_bases for it in items for k in ("predicate", "predicate_t", "tile_test")),
            core_source=embedded_core(*pats),
            configs=[dataclasses.asdict(c) for c in spec.configs],
            bwd_configs=[dataclasses.asdict(c) for c in spec.bwd_configs],
        )
    )
    compile(text, f"<spdsl generated {name}>", "exec")  # fail here, not at import time
    return text
