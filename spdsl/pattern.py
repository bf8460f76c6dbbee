"""The user-facing pattern: a checked IR plus where it came from."""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import SpdError
from .ir import PatternIR
from .layout import Layout, dense_mask


class Pattern:
    """A compiled ``.spd`` pattern with every parameter resolved.

    ``dense_mask`` is the token-level truth (small sizes only); ``layout`` the analytic tile CSR.
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
        """bool [q_len, kv_len]: which keys each query row sees. O(q_len * kv_len)."""
        return dense_mask(self.ir, q_len, kv_len, kv_len - q_len if q_offset is None else int(q_offset))

    def layout(
        self, q_len: int, kv_len: int, block_q: int = 128, block_kv: int = 128, q_offset: int | None = None
    ) -> Layout:
        """Tile CSR for these lengths, built analytically in O(nnz)."""
        return Layout(self.ir, q_len, kv_len, block_q, block_kv, q_offset)

    def text(self) -> str:
        return self.ir.text()

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v}" for k, v in self.ir.params.items())
        causal = "causal " if self.causal else ""
        return f"<spdsl.Pattern {self.name}({params}) unit={self.unit} {causal}attend {self.ir.expr.text()}>"

    def __eq__(self, other) -> bool:
        return isinstance(other, Pattern) and self.ir == other.ir

    def __hash__(self) -> int:
        return hash(self.ir)


def compile(text: str, *, pattern: str | None = None, filename: str = "<string>", **params: int) -> Pattern:
    """Compile ``.spd`` source text. ``pattern`` picks one of several; ``params`` override defaults."""
    from .lower import compile_ir

    if not isinstance(text, str):
        raise TypeError(f"spdsl.compile expects the .spd source as str, got {type(text).__name__}")
    return Pattern(compile_ir(text, filename=filename, pattern=pattern, overrides=params), text, filename)


def load(path: str | Path, *, pattern: str | None = None, **params: int) -> Pattern:
    """Read and compile a ``.spd`` file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpdError(
            f"no such file: {p}", file=str(p), hint="check the path; patterns ship in patterns/*.spd"
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise SpdError(f"cannot read {p}: {e}", file=str(p)) from None
    return compile(text, pattern=pattern, filename=str(p), **params)
