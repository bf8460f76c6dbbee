"""Which kernels run a call: Triton (portable, the default everywhere) or FA4 (Hopper+, optional).

``spdsl.build(p, backend="triton" | "fa4" | "auto")`` wraps the Triton op (:class:`~spdsl.op.SparseAttention`):

* ``"triton"``: the op itself;
* ``"fa4"``: :class:`FA4Attention` (raises at build time when FA4 cannot run here);
* ``"auto"``: :class:`AutoAttention`: Triton where FA4 is unavailable (CPU, pre-Hopper, FA4 not
  installed); elsewhere the faster of the two per (GPU, dtype, shape bucket), measured once and
  cached on disk (``backend_choice.json`` beside the kernel cache, written atomically).

Only the forward call ``op(q, k, v, ...)`` switches (its autograd follows the chosen kernels);
``varlen`` and ``decode`` stay on Triton.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Callable
from pathlib import Path

import torch

from . import cache
from .core.checks import resolve_scale
from .integrations import fa4

BACKENDS = ("auto", "triton", "fa4")
_LOCK = threading.Lock()


def check_backend(backend: str, heads) -> str:
    """Validate ``backend`` (ValueError for an unknown name; FA4 supports single-pattern ops only)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}; got {backend!r}")
    if backend == "fa4" and heads is not None:
        raise NotImplementedError("backend='fa4' does not support per-head patterns (heads=) yet; use 'triton'")
    return backend


def require_fa4() -> None:
    """Raise RuntimeError saying what is missing when FA4 cannot run on this machine's GPU."""
    reason = fa4.unavailable()
    if reason:
        raise RuntimeError(f"backend='fa4' is unavailable: {reason}. {fa4.INSTALL_HINT}")


class _Wrapped:
    """Delegates everything but ``__call__`` to the Triton op (varlen, decode, pattern, module...)."""

    def __init__(self, op):
        self.triton = op

    def __getattr__(self, name):
        return getattr(self.triton, name)

    def _fa4(self, q, k, v, scale, q_offset, return_lse):
        q, k, v, scale, q_offset = self.triton.checked(q, k, v, scale, q_offset)  # the Triton op's checks
        return fa4.attention(self.triton.pattern.ir, q, k, v, resolve_scale(scale, q.shape[-1]), q_offset, return_lse)


class FA4Attention(_Wrapped):
    """``op(q, k, v, scale=None, q_offset=None, return_lse=False)`` on FA4 (block-sparse, emitted mask)."""

    backend = "fa4"

    def __call__(self, q, k, v, scale: float | None = None, q_offset: int | None = None, return_lse: bool = False):
        return self._fa4(q, k, v, scale, q_offset, return_lse)


def _bucket(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def _shape(q: torch.Tensor, k: torch.Tensor) -> tuple[int, int, int, int]:
    """Power-of-two buckets of the lengths, head dim, GQA ratio: what a choice is made per."""
    return _bucket(q.shape[2]), _bucket(k.shape[2]), q.shape[-1], q.shape[1] // max(k.shape[1], 1)


def choice_key(pattern_hash: str, q: torch.Tensor, k: torch.Tensor) -> str:
    """The measurement's key: GPU name, dtype, pattern, power-of-two buckets of the lengths, head dim, GQA."""
    gpu = torch.cuda.get_device_name(q.device) if q.is_cuda else "cpu"
    shape = "q{}_kv{}_d{}_g{}".format(*_shape(q, k))
    return f"{gpu}|{str(q.dtype).removeprefix('torch.')}|{pattern_hash}|{shape}"


def choices_path() -> Path:
    """Where the measured choices live (``backend_choice.json`` in the cache folder)."""
    return cache.cache_dir() / "backend_choice.json"


def load_choices(path: Path) -> dict[str, str]:
    """The cached choices (empty when missing or unreadable)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in data.items() if v in ("triton", "fa4")} if isinstance(data, dict) else {}


def cuda_timer(fn: Callable[[], object], reps: int = 10) -> float:
    """Median milliseconds of ``fn()`` over ``reps`` runs after two warm-ups (CUDA events)."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def pick(key: str, candidates: dict[str, Callable[[], object]], timer: Callable, path: Path) -> str:
    """The cached winner for ``key``, else time every candidate once, store the fastest, return it.

    A candidate that raises is skipped (its time is infinite); the file is rewritten atomically
    (merged with what other processes wrote meanwhile).
    """
    with _LOCK:
        known = load_choices(path)
        if key in known and known[key] in candidates:
            return known[key]
        times = {}
        for name, fn in candidates.items():
            try:
                times[name] = float(timer(fn))
            except Exception:  # a backend that cannot run this shape loses
                times[name] = math.inf
        best = min(candidates, key=lambda n: times[n])
        merged = {**load_choices(path), key: best}
        path.parent.mkdir(parents=True, exist_ok=True)
        cache.write_atomic(path, json.dumps(merged, indent=1, sort_keys=True) + "\n")
        return best


class AutoAttention(_Wrapped):
    """Triton where FA4 cannot run; elsewhere the measured faster backend per (GPU, dtype, shape bucket)."""

    backend = "auto"

    def __init__(self, op, timer: Callable | None = None):
        super().__init__(op)
        self.timer = timer or cuda_timer
        self._chosen: dict[tuple, str] = {}  # per (device, dtype, shape bucket): no file read per call

    def choose(self, q, k, v, scale=None, q_offset=None) -> str:
        """``"triton"`` or ``"fa4"`` for these inputs (measuring once when not cached)."""
        seen = (q.device, q.dtype, *_shape(q, k))
        if seen not in self._chosen:
            if self.triton.heads is not None or fa4.unavailable(q.device):
                self._chosen[seen] = "triton"
            else:
                self._chosen[seen] = self._cached(q, k, v, scale, q_offset)
        return self._chosen[seen]

    def _cached(self, q, k, v, scale, q_offset) -> str:
        key = choice_key(self.triton.pattern.ir.hash(), q, k)
        with torch.no_grad():
            candidates = {
                "triton": lambda: self.triton(q, k, v, scale=scale, q_offset=q_offset),
                "fa4": lambda: self._fa4(q, k, v, scale, q_offset, False),
            }
            return pick(key, candidates, self.timer, choices_path())

    def __call__(self, q, k, v, scale: float | None = None, q_offset: int | None = None, return_lse: bool = False):
        if self.choose(q, k, v, scale, q_offset) == "fa4":
            return self._fa4(q, k, v, scale, q_offset, return_lse)
        return self.triton(q, k, v, scale=scale, q_offset=q_offset, return_lse=return_lse)
