"""``spdsl.build``: a pattern in, a cached generated module and a torch custom op out.

The generated module is standalone (torch + triton). This module imports it from the cache,
registers ``torch.ops.spdsl.<name>_<key>`` with a fake implementation (so ``torch.compile``
traces it without graph breaks), and routes CPU tensors to the blocked reference unless
``TRITON_INTERPRET=1`` asks for the Triton interpreter.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import threading
from pathlib import Path

import torch

from . import cache
from ._version import __version__
from .codegen import BuildSpec, KernelConfig, embedded_core, render_module, template_texts
from .core.checks import resolve_scale
from .core.ir import resolve_q_offset
from .core.limits import require
from .pattern import Pattern, as_pattern

#: Tried on the first CUDA call per (head dim, dtype); the first one is the interpreter's and the default.
#: 3 stages won every measured Hopper row; 2 stages is what GPUs with less shared memory can compile.
DEFAULT_CONFIGS = (KernelConfig(128, 128, 8, 3), KernelConfig(128, 128, 8, 2))

_LOCK = threading.Lock()
_OPS: dict[str, SparseAttention] = {}


def _versions() -> str:
    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = "none"
    return f"spdsl={__version__} triton={tv} torch={torch.__version__}"


def _configs(config: dict) -> tuple[KernelConfig, ...]:
    """``configs=[...]``, or one config from keyword options over the default, or the defaults."""
    options = set(KernelConfig.__dataclass_fields__)
    unknown = set(config) - options - {"configs"}
    if unknown:
        raise TypeError(
            f"unknown build option(s): {', '.join(sorted(unknown))}; valid: configs, {', '.join(sorted(options))}"
        )
    if "configs" in config:
        if len(config) > 1:
            raise TypeError("pass either configs=[...] or single-config options (block_m=...), not both")
        out = tuple(c if isinstance(c, KernelConfig) else KernelConfig(*c) for c in config["configs"])
        if not out:
            raise ValueError("configs must hold at least one config")
        return out
    if config:
        return (KernelConfig(**{**DEFAULT_CONFIGS[0].__dict__, **config}),)
    return DEFAULT_CONFIGS


def build(pattern, **config) -> SparseAttention:
    """Render (or reuse from the on-disk cache) the kernels for ``pattern``; return its op.

    Parameters
    ----------
    pattern: a :class:`~spdsl.Pattern` (``spdsl.load`` / ``spdsl.compile``), a ``PatternIR`` or a
        path to a ``.spd`` file.
    config: ``block_m``, ``block_n``, ``num_warps``, ``num_stages``, ``warp_specialize``,
        (one fixed prefill config), or ``configs=[KernelConfig | tuple, ...]``
        (timed on the first CUDA call per head dim and dtype). Default: :data:`DEFAULT_CONFIGS`.

    Returns
    -------
    The op: ``op(q, k, v)``, ``op.varlen(...)``, ``op.decode(...)``. The generated module is
    cached on disk (``SPDSL_CACHE_DIR``), keyed by everything that determines its text.

    >>> import torch, spdsl
    >>> op = spdsl.build(spdsl.compile("pattern w() { causal attend local(16) }"))
    >>> q = k = v = torch.randn(1, 2, 40, 16)
    >>> ref = spdsl.reference.attention(op.pattern, q, k, v)
    >>> bool((op(q, k, v).double() - ref).abs().max() < 1e-5)
    True
    """
    pat = as_pattern(pattern)
    configs = _configs(config)
    spec = BuildSpec(pat.ir, pat.source, configs)
    key = cache.cache_key(
        pat.ir.text(),
        pat.source,
        template_texts(),
        embedded_core(pat.ir),
        _versions(),
        repr(configs),
        os.environ.get("TRITON_INTERPRET", ""),
    )
    with _LOCK:
        if key in _OPS:
            return _OPS[key]
        path = cache.cache_dir() / f"{pat.name}_{key}.py"
        cache.get_or_create(path, lambda: render_module(spec))
        module = import_generated(path, f"spdsl_gen_{pat.name}_{key}")
        op = SparseAttention(pat, module, path, key)
        _OPS[key] = op
        return op


def import_generated(path: Path, name: str):
    """Import a generated module from ``path`` as ``name`` (registered in sys.modules)."""
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


class SparseAttention:
    """The op for one pattern. ``op(q, k, v)`` is a ``torch.library`` custom op (namespace spdsl)."""

    def __init__(self, pattern: Pattern, module, path: Path, key: str):
        self.pattern = pattern
        self.module = module
        self.path = path
        self.key = key
        self.op_name = f"spdsl::{pattern.name}_{key}"
        self._fwd = _register(self.op_name, pattern, module)

    def __call__(self, q, k, v, scale: float | None = None, q_offset: int | None = None, return_lse: bool = False):
        """q [B, Hq, Sq, D], k/v [B, Hkv, Skv, D] -> out (and LSE [B, Hq, Sq] in natural log)."""
        self.module.check_inputs(q, k, v, "BHSD", allow_cpu=True)
        if q_offset is not None:
            q_offset = resolve_q_offset(q_offset, q.shape[2], k.shape[2])
        if scale is not None:
            scale = resolve_scale(scale, q.shape[-1])
        out, lse = self._fwd(q, k, v, scale, q_offset)
        return (out, lse) if return_lse else out

    def varlen(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, scale=None, return_lse=False):
        """Packed sequences (FlashAttention varlen conventions); see the generated module."""
        return self.module.attention_varlen(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale=scale, return_lse=return_lse
        )

    def decode(self, q, k_cache, v_cache, cache_seqlens, *, block_table=None, scale=None, return_lse=False):
        """KV-cache decode (FlashAttention ``flash_attn_with_kvcache`` conventions); see the generated module.

        CUDA (or ``TRITON_INTERPRET=1``) runs the sparse decode kernel; CPU tensors the blocked reference.
        """
        if q.device.type == "cpu" and not self.module.interpreting():
            self.module.check_decode(q, k_cache, v_cache, cache_seqlens, block_table, allow_cpu=True)
            out, lse = _decode_reference(self.pattern, q, k_cache, v_cache, cache_seqlens, block_table, scale)
            return (out, lse) if return_lse else out
        return self.module.decode(
            q, k_cache, v_cache, cache_seqlens, block_table=block_table, scale=scale, return_lse=return_lse
        )

    def __repr__(self) -> str:
        return f"<spdsl op {self.op_name} from {self.path}>"


def _blocked(lay, q, k, v, scale):
    """The blocked CPU reference over ``lay`` (q [B, Hq, Sq, D]), refused above the ``cpu_flops`` limit."""
    from . import reference

    B, Hq, _, D = q.shape
    flops = 4 * B * Hq * D * lay.nnz * lay.block_q * lay.block_kv
    require("cpu_flops", flops, f"attention on the CPU ({lay!r})", "use a GPU, or shorter sequences")
    return reference.attention_blocked(lay, q, k, v, scale=scale, return_lse=True)


def _cpu_reference(pattern: Pattern, q, k, v, scale, q_offset):
    out, lse = _blocked(pattern.layout(q.shape[2], k.shape[2], 64, 64, q_offset), q, k, v, scale)
    return out.to(q.dtype), lse.float()


def _decode_reference(pattern: Pattern, q, k_cache, v_cache, cache_seqlens, block_table, scale):
    """CPU decode: gather each sequence's keys (paged or not) and run the blocked reference."""
    B, Sq, Hq, _ = q.shape
    out = torch.zeros_like(q)
    lse = torch.full((B, Hq, Sq), float("-inf"), dtype=torch.float32)
    for b, n in enumerate(cache_seqlens.tolist()):
        if block_table is None:
            k, v = k_cache[b, :n], v_cache[b, :n]
        else:
            page = k_cache.shape[1]
            pages = block_table[b, : -(-n // page)].long()
            k, v = k_cache[pages].flatten(0, 1)[:n], v_cache[pages].flatten(0, 1)[:n]
        lay = pattern.layout(Sq, n, 64, 64)  # queries are the last Sq tokens (the default)
        o, l_ = _blocked(lay, q[b : b + 1].transpose(1, 2), k[None].transpose(1, 2), v[None].transpose(1, 2), scale)
        out[b] = o[0].transpose(0, 1).to(q.dtype)
        lse[b] = l_[0].float()
    return out, lse


def _register(name: str, pattern: Pattern, module):
    @torch.library.custom_op(name, mutates_args=())
    def fwd(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None, q_offset: int | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if q.device.type == "cpu" and not module.interpreting():  # inputs checked by __call__ / the fake
            return _cpu_reference(pattern, q, k, v, scale, q_offset)
        return module.attention(q, k, v, scale=scale, q_offset=q_offset, return_lse=True)

    @fwd.register_fake
    def _(q, k, v, scale, q_offset):
        module.check_inputs(q, k, v, "BHSD", allow_cpu=True)
        B, H, S, D = q.shape
        return q.new_empty((B, H, S, D)), q.new_empty((B, H, S), dtype=torch.float32)

    return fwd
