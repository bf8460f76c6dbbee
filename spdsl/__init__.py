"""spdsl: sparse attention patterns as a small language, compiled to Triton kernels."""

from ._version import __version__
from .errors import SpdError
from .ir import PatternIR
from .layout import Layout
from .pattern import Pattern, compile, load
from .runtime import SparseAttention, build

__all__ = ["Layout", "Pattern", "PatternIR", "SparseAttention", "SpdError", "__version__", "build", "compile", "load"]
