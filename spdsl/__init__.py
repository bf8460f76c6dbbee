"""spdsl: sparse attention patterns as a small language, compiled to Triton kernels.

>>> import spdsl
>>> p = spdsl.compile("pattern w(n = 2) { causal attend sink(1) | local(n) }")
>>> p.layout(1024, 1024, 128, 128).nnz
15
"""

from . import blocked, limits, reference, resources
from ._version import __version__
from .core.ir import PatternIR
from .errors import SpdError
from .layout import Layout
from .op import SparseAttention
from .pattern import Pattern, compile, load
from .runtime import build

__all__ = [
    "Layout",
    "Pattern",
    "PatternIR",
    "SparseAttention",
    "SpdError",
    "__version__",
    "blocked",
    "build",
    "compile",
    "limits",
    "load",
    "reference",
    "resources",
]
