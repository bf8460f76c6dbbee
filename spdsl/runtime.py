"""``spdsl.build``: a pattern in, a cached generated module and its op (:mod:`spdsl.op`) out.

The generated module is standalone (torch + triton); this module renders it (or finds it in the
on-disk cache, keyed by everything that determines its text) and imports it.
"""

from __future__ import annotations

import dataclasses
import os
import threading

import torch

from . import cache
from ._version import __version__
from .backend import AutoAttention, FA4Attention, check_backend, require_fa4
from .codegen import BackwardConfig, BuildSpec, KernelConfig, embedded_core, render_module, template_texts
from .heads import resolve
from .op import SparseAttention

#: Tried on the first CUDA call per (head dim, dtype); the first one is the interpreter's and the default.
#: 3 stages won every measured Hopper row (by 5-13%); 2 stages is what GPUs with less shared memory
#: can compile. bd2575d also tried a loop per tile kind (full, then partial): 8-12% slower than the one
#: loop on every H200 row of benchmarks/results/regression.json (each config pinned on both sides), so
#: it is gone.
#: The 64x64 one is what fp32 inputs at head dim 128 fit in (the 128x128 tiles need 262-393 KB of
#: shared memory there, an H200 has 227 KB); it is slower for 16-bit inputs, so the tuner drops it there.
DEFAULT_CONFIGS = (KernelConfig(128, 128, 8, 3), KernelConfig(128, 128, 8, 2), KernelConfig(64, 64, 4, 2))
#: The backward's, timed likewise on its first CUDA call (the best two of a sweep on an H200,
#: benchmarks/results/backward_explore.json); deterministic.
DEFAULT_BWD_CONFIGS = (
    BackwardConfig(dkdv_m=64, dkdv_n=64, dkdv_warps=4, dq_m=64, dq_n=64, dq_warps=4),
    BackwardConfig(dkdv_m=64, dkdv_n=128, dkdv_warps=8, dkdv_stages=3),
)
#: ``deterministic=False``: dQ added up with fp32 atomics inside the dK/dV kernel (no dQ kernel).
ATOMIC_BWD_CONFIGS = tuple(dataclasses.replace(c, atomic_dq=True) for c in DEFAULT_BWD_CONFIGS)

_LOCK = threading.Lock()
_OPS: dict[tuple, SparseAttention] = {}  # by (module key, heads): ops of one module share it


def _versions() -> str:
    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = "none"
    return f"spdsl={__version__} triton={tv} torch={torch.__version__}"


def _configs(config: dict) -> tuple[tuple[KernelConfig, ...], tuple[BackwardConfig, ...]]:
    """(prefill configs, backward configs): ``configs=[...]`` or one config from keyword options over
    the default (else the defaults), and ``backward_configs=[...]`` (else the defaults, atomic ones
    with ``deterministic=False``)."""
    options = set(KernelConfig.__dataclass_fields__)
    unknown = set(config) - options - {"configs", "backward_configs", "deterministic"}
    if unknown:
        valid = ", ".join(["configs", "backward_configs", "deterministic", *sorted(options)])
        raise TypeError(f"unknown build option(s): {', '.join(sorted(unknown))}; valid: {valid}")
    config = dict(config)
    bwd = config.pop("backward_configs", None)
    deterministic = config.pop("deterministic", True)
    if not isinstance(deterministic, bool):
        raise TypeError(f"deterministic must be True or False, got {deterministic!r}")
    if bwd is None:
        bwd = DEFAULT_BWD_CONFIGS if deterministic else ATOMIC_BWD_CONFIGS
    elif not deterministic:
        raise TypeError("pass either backward_configs=[...] or deterministic=False, not both")
    bwd = tuple(c if isinstance(c, BackwardConfig) else BackwardConfig(*c) for c in bwd)
    if not bwd:
        raise ValueError("backward_configs must hold at least one config")
    if "configs" in config:
        if len(config) > 1:
            raise TypeError("pass either configs=[...] or single-config options (block_m=...), not both")
        out = tuple(c if isinstance(c, KernelConfig) else KernelConfig(*c) for c in config["configs"])
        if not out:
            raise ValueError("configs must hold at least one config")
        return out, bwd
    if config:
        return (KernelConfig(**{**DEFAULT_CONFIGS[0].__dict__, **config}),), bwd
    return DEFAULT_CONFIGS, bwd


def build(pattern, heads=None, backend: str = "triton", **config):
    """Render (or reuse from the on-disk cache) the kernels for ``pattern``; return its op.

    Parameters
    ----------
    pattern: a :class:`~spdsl.Pattern` (``spdsl.load`` / ``spdsl.compile``), a ``PatternIR`` or a
        path to a ``.spd`` file; or a list of them, with ``heads``.
    heads: per-head patterns: for each query head, the index (into the list) of the pattern it uses,
        e.g. ``spdsl.build([p_full, p_stream], heads=[0] * 8 + [1] * 24)``. One kernel launch serves
        every head (each walks its own pattern's layout); the patterns may differ in ``unit`` and
        ``causal``, and the heads of one GQA group may use different patterns. The generated module
        depends only on the patterns; ``heads`` is bound in the op (q must have ``len(heads)`` heads).
    config: ``block_m``, ``block_n``, ``num_warps``, ``num_stages``, ``warp_specialize``
        (one fixed prefill config), or ``configs=[KernelConfig | tuple, ...]`` (timed on the first
        CUDA call per head dim and dtype; default :data:`DEFAULT_CONFIGS`); and
        ``backward_configs=[BackwardConfig | tuple, ...]`` (default :data:`DEFAULT_BWD_CONFIGS`), or
        ``deterministic=False`` for the faster atomic dQ (:data:`ATOMIC_BWD_CONFIGS`; gradients then
        vary in their last bits from run to run).
    backend: ``"triton"`` (default, portable), ``"fa4"`` (FlashAttention-4 block-sparse with a
        CuTe mask emitted from the IR; RuntimeError here when FA4 cannot run: not installed,
        no CUDA, pre-Hopper) or ``"auto"`` (Triton where FA4 is unavailable, else the faster per
        GPU, dtype and shape bucket, measured once and cached on disk). See :mod:`spdsl.backend`.

    Returns
    -------
    The op: ``op(q, k, v)`` (differentiable), ``op.varlen(...)``, ``op.decode(...)``. The generated
    module is cached on disk (``SPDSL_CACHE_DIR``), keyed by everything that determines its text.

    >>> import torch, spdsl
    >>> op = spdsl.build(spdsl.compile("pattern w() { causal attend local(16) }"))
    >>> q = k = v = torch.randn(1, 2, 40, 16)
    >>> ref = spdsl.reference.attention(op.pattern, q, k, v)
    >>> bool((op(q, k, v).double() - ref).abs().max() < 1e-5)
    True
    """
    check_backend(backend, heads)
    if backend == "fa4":
        require_fa4()
    op = _build_triton(pattern, heads, config)
    if backend == "fa4":
        return FA4Attention(op)
    return AutoAttention(op) if backend == "auto" else op


def _build_triton(pattern, heads, config: dict) -> SparseAttention:
    pats, heads = resolve(pattern, heads)
    configs, bwd_configs = _configs(config)
    irs = tuple(p.ir for p in pats)
    source = "\n\n".join(p.source.strip() for p in pats) if len(pats) > 1 else pats[0].source
    spec = BuildSpec(irs if len(pats) > 1 else irs[0], source, configs, bwd_configs)
    key = cache.cache_key(
        *(ir.text() for ir in irs),
        *(p.source for p in pats),
        template_texts(),
        embedded_core(*irs),
        _versions(),
        repr(configs),
        repr(bwd_configs),
        os.environ.get("TRITON_INTERPRET", ""),
    )
    name = "_".join(p.name for p in pats)[:64]
    with _LOCK:
        if (key, heads) in _OPS:
            return _OPS[key, heads]
        path = cache.cache_dir() / f"{name}_{key}.py"
        module = next((o.module for (k, _), o in _OPS.items() if k == key), None)  # other heads, same patterns
        if module is None:
            cache.get_or_create(path, lambda: render_module(spec))
            module = cache.import_generated(path, f"spdsl_gen_{name}_{key}")
        op = SparseAttention(pats if heads is not None else pats[0], module, path, key, heads)
        _OPS[key, heads] = op
        return op
