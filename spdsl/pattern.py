"""The user-facing pattern: a checked IR plus where it came from; ``spdsl.load`` and ``spdsl.compile``."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from .core.ir import PatternIR
from .core.layout import dense_mask
from .errors import SpdError
from .layout import Layout

__all__ = ["Pattern", "as_ir", "as_pattern", "compile", "load", "read_source"]


class Pattern:
    """A compiled ``.spd`` pattern with every parameter resolved.

    ``dense_mask`` is the token-level truth (small sizes only); ``layout`` the analytic tile CSR.

    >>> p = compile("pattern w(n = 2) { causal attend local(n) }")
    >>> p.name, p.unit, p.causal, p.params
    ('w', 1, True, {'n': 2})
    >>> p.dense_mask(3, 3).int().tolist()
    [[1, 0, 0], [1, 1, 0], [0, 1, 1]]
    """

    def __init__(self, ir: PatternIR, source: str = "", filename: str = "<string>"):
        self.ir = ir
        self.source = source
        self.filename = filename

    name = property(lambda self: self.ir.name)
    unit = property(lambda self: self.ir.unit)
    causal = property(lambda self: self.ir.causal)
    params = property(lambda self: dict(self.ir.params))

    def dense_mask(self, q_len: int, kv_len: int, q_offset: int | None = None) -> torch.Tensor:
        """bool [q_len, kv_len]: which keys each query row sees. O(q_len * kv_len), refused above the
        ``dense`` limit (:mod:`spdsl.core.limits`)."""
        return dense_mask(self.ir, q_len, kv_len, q_offset)

    def layout(
        self, q_len: int, kv_len: int, block_q: int = 128, block_kv: int = 128, q_offset: int | None = None
    ) -> Layout:
        """Tile CSR for these lengths, built analytically in O(nnz) (refused above the ``tiles`` limit)."""
        return Layout(self.ir, q_len, kv_len, block_q, block_kv, q_offset)

    def text(self) -> str:
        return self.ir.text()

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v}" for k, v in self.ir.params.items())
        causal = "causal " if self.causal else ""
        extra = "" if self.ir.score is None else f" score {self.ir.score[0]}({self.ir.score[1]})"
        extra += "" if self.ir.select is None else f" select {self.ir.select.text()}"
        return f"<spdsl.Pattern {self.name}({params}) unit={self.unit} {causal}attend {self.ir.expr.text()}{extra}>"

    def __eq__(self, other) -> bool:
        return isinstance(other, Pattern) and self.ir == other.ir

    def __hash__(self) -> int:
        return hash(self.ir)


def _overrides(fn: str, params, overrides: dict, taken: dict) -> dict[str, object]:
    """``params`` (a mapping) and ``**overrides`` merged; keyword arguments of ``fn`` that look like
    parameters (``taken``: name -> value given) are refused with a hint instead of being swallowed."""
    if params is not None and not isinstance(params, Mapping):
        raise SpdError(
            f"spdsl.{fn}: params must be a mapping of parameter names to ints, got {type(params).__name__}",
            hint="a pattern parameter named 'params' goes inside the mapping: params={'params': 3}",
        )
    for name, value in taken.items():
        if isinstance(value, int):
            what = {"pattern": "which pattern of the text to compile", "filename": "the name shown in errors"}
            raise SpdError(
                f"spdsl.{fn}: {name}= is {what.get(name, 'a keyword of spdsl.' + fn)} (a str), got the int {value!r}",
                hint=f"a parameter named '{name}' goes in a mapping: spdsl.{fn}(..., params={{{name!r}: {value!r}}})",
            )
    both = set(params or {}) & set(overrides)
    if both:
        raise SpdError(f"spdsl.{fn}: {', '.join(sorted(both))} given both in params= and as keywords")
    return {**(params or {}), **overrides}


def compile(
    text: str,
    /,
    *,
    pattern: str | None = None,
    filename: str = "<string>",
    params: Mapping[str, int] | None = None,
    **overrides: int,
) -> Pattern:
    """Compile ``.spd`` source text into a :class:`Pattern`.

    Parameters
    ----------
    text: the ``.spd`` source.
    pattern: which pattern of the text (default: its first).
    filename: shown in error locations.
    params: parameter overrides as a mapping (any name); ``**overrides`` is sugar for the same.

    Returns
    -------
    The pattern, every parameter resolved. Raises :class:`SpdError` for any problem in the text
    or the overrides (located, with a hint).

    >>> compile("pattern p(w = 4) { attend local(w) }", params={"w": 8}).ir.expr
    Local(8)
    """
    from .lower import compile_ir

    if not isinstance(text, str):
        raise TypeError(f"spdsl.compile expects the .spd source as str, got {type(text).__name__}")
    taken = {k: v for k, v in (("filename", filename), ("pattern", pattern)) if not isinstance(v, (str, type(None)))}
    merged = _overrides("compile", params, overrides, taken)
    if not isinstance(filename, str):
        raise TypeError(f"filename must be a str, got {type(filename).__name__}")
    if pattern is not None and not isinstance(pattern, str):
        raise TypeError(f"pattern must be a pattern name (str), got {type(pattern).__name__}")
    return Pattern(compile_ir(text, filename=filename, pattern=pattern, overrides=merged), text, filename)


def read_source(path: str | Path) -> str:
    """The text of a ``.spd`` file; every way reading can fail is an :class:`SpdError` naming the file."""
    p = Path(path)
    try:
        return p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpdError(
            f"no such file: {p}", file=str(p), hint="check the path; patterns ship in patterns/*.spd"
        ) from None
    except IsADirectoryError:
        raise SpdError(f"{p} is a folder with no .spd files in it", file=str(p)) from None
    except UnicodeDecodeError as e:
        raise SpdError(f"cannot read {p}: not UTF-8 text ({e.reason})", file=str(p)) from None
    except OSError as e:
        raise SpdError(f"cannot read {p}: {e.strerror or e}", file=str(p)) from None


def load(
    path: str | Path, /, *, pattern: str | None = None, params: Mapping[str, int] | None = None, **overrides: int
) -> Pattern:
    """Read and compile a ``.spd`` file (see :func:`compile` for ``pattern``, ``params`` and ``**overrides``).

    >>> from spdsl.resources import pattern_path
    >>> load(pattern_path("power"), window=8).params
    {'window': 8, 'sinks': 1}
    """
    taken = {"pattern": pattern} if not isinstance(pattern, (str, type(None))) else {}
    merged = _overrides("load", params, overrides, taken)
    return compile(read_source(path), pattern=pattern, filename=str(Path(path)), params=merged)


def as_pattern(obj) -> Pattern:
    """A :class:`Pattern` from a Pattern, a :class:`PatternIR` or a path to a ``.spd`` file."""
    if isinstance(obj, Pattern):
        return obj
    if isinstance(obj, PatternIR):
        return Pattern(obj)
    if isinstance(obj, (str, Path)):
        return load(obj)
    raise TypeError(
        f"expected a spdsl.Pattern (from spdsl.load/compile), a PatternIR or a path, got {type(obj).__name__}"
    )


def as_ir(obj) -> PatternIR:
    """The :class:`PatternIR` of a :class:`Pattern` (or the IR itself); TypeError for anything else."""
    if isinstance(obj, (Pattern, PatternIR)):
        return as_pattern(obj).ir
    raise TypeError(f"expected a spdsl.Pattern or PatternIR, got {type(obj).__name__}")
