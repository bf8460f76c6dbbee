"""The op for one pattern: ``torch.library`` custom ops around a generated module, with autograd.

``op(q, k, v)`` is ``torch.ops.spdsl.<name>_<key>`` (forward: out and LSE) with a fake
implementation, so ``torch.compile(fullgraph=True)`` traces it, and an autograd formula that calls
``torch.ops.spdsl.<name>_<key>_bwd`` (dq, dk, dv from out and LSE; nothing O(S^2) is saved). CUDA
tensors (and CPU tensors under ``TRITON_INTERPRET=1``) run the generated Triton kernels; other
CPU tensors the blocked PyTorch backend (:mod:`spdsl.blocked`), within the ``cpu_flops`` limit.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import torch

from . import single_query
from .core.checks import resolve_scale
from .core.ir import resolve_q_offset
from .core.limits import require
from .heads import check_count, split
from .pattern import Pattern
from .summaries import sequence_kv

#: Tile size of the CPU backend's layouts.
CPU_TILE = 64
#: Default key-block size of the summaries (and of the dynamic decode's kernel tiles).
SUMMARY_BLOCK = 64
#: ``op.decode`` keywords that only patterns with ``score`` / ``select`` lines take, and their defaults.
_DYNAMIC_DEFAULTS = {"summaries": None, "eps": 1e-3, "bias": 0.0, "return_error": False}


class SparseAttention:
    """The op for one pattern (from :func:`spdsl.build`): prefill, varlen and decode, differentiable.

    >>> import torch, spdsl
    >>> op = spdsl.build(spdsl.compile("pattern w() { causal attend sink(1) | local(8) }"))
    >>> q, k, v = (torch.randn(1, 2, 24, 16, requires_grad=True) for _ in range(3))
    >>> op(q, k, v).sum().backward()
    >>> q.grad.shape, bool(torch.isfinite(k.grad).all())
    (torch.Size([1, 2, 24, 16]), True)
    """

    def __init__(
        self, pattern: Pattern | tuple[Pattern, ...], module, path: Path, key: str, heads: Sequence[int] | None = None
    ):
        """``pattern``: one pattern, or a tuple of them with ``heads`` (each query head's pattern index)."""
        self.patterns = pattern if isinstance(pattern, tuple) else (pattern,)
        #: the pattern; None for per-head patterns (see ``patterns`` and ``heads``)
        self.pattern = None if heads is not None else self.patterns[0]
        self._dynamic = heads is None and self.patterns[0].ir.dynamic  # (resolve refuses per-head dynamic)
        self.heads = None if heads is None else tuple(heads)
        self.module = module
        self.path = path
        self.key = key
        name = "_".join(p.name for p in self.patterns)[:64]
        tag = "" if heads is None else "_h" + hashlib.sha256(repr(self.heads).encode()).hexdigest()[:12]
        self.op_name = f"spdsl::{name}_{key}{tag}"
        self._kw = {} if heads is None else {"heads": self.heads}  # what the module's functions take
        self._fwd, self._decode = _register(self.op_name, self.patterns, self.heads, module)

    def __call__(
        self, q, k, v, scale: float | None = None, q_offset: int | None = None, return_lse: bool = False, **dynamic
    ):
        """q [B, Hq, Sq, D], k/v [B, Hkv, Skv, D] -> out (and LSE [B, Hq, Sq] in natural log).

        Differentiable in q, k and v (and through LSE when it is returned). Under ``torch.autocast``
        the inputs are cast to its dtype first, as SDPA's are. Patterns with ``score`` / ``select``
        lines take ``eps``, ``bias`` and ``return_error`` as :meth:`decode` does (forward only; see
        :func:`spdsl.dynamic.prefill`).
        """
        if not (self._dynamic or dynamic) and single_query.routable(self, q, k, q_offset) and _direct(q, k, v):
            q, k, v = _autocast(q, k, v)
            return single_query.attention(self, q, k, v, scale, return_lse)
        q, k, v, scale, q_offset = self.checked(q, k, v, scale, q_offset)
        if self._dynamic or dynamic:
            return self._prefill_dynamic(q, k, v, scale, q_offset, return_lse, dynamic)
        check_count(self.heads, q.shape[1])
        if _direct(q, k, v) and not self._on_cpu(q):  # eager, nothing to differentiate: no op dispatch,
            # and no LSE unless asked for (the custom op always returns it: the backward needs it)
            return self.module.forward(
                q, k, v, scale=scale, q_offset=q_offset, return_lse=return_lse, validate=False, **self._kw
            )
        out, lse = self._fwd(q, k, v, scale, q_offset)
        return (out, lse) if return_lse else out

    def checked(self, q, k, v, scale: float | None, q_offset: int | None):
        """The forward's front, shared by every backend: ``torch.autocast``'s cast, the module's input
        checks (dtype, device, rank, head dim, GQA ratio, strides), the offset and scale resolved.

        Returns
        -------
        ``(q, k, v, scale, q_offset)``, scale and q_offset None where not given.
        """
        q, k, v = _autocast(q, k, v)
        self.module.check_inputs(q, k, v, "BHSD", allow_cpu=True)
        if q_offset is not None:
            q_offset = resolve_q_offset(q_offset, q.shape[2], k.shape[2])
        if scale is not None:
            scale = resolve_scale(scale, q.shape[-1])
        return q, k, v, scale, q_offset

    def _on_cpu(self, q) -> bool:
        return _on_cpu(self.module, q)

    def varlen(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, scale=None, return_lse=False):
        """Packed sequences (FlashAttention varlen conventions), differentiable; see the generated module."""
        self._static_only("op.varlen")
        q, k, v = _autocast(q, k, v)
        return self.module.attention_varlen(
            q,
            k,
            v,
            cu_seqlens_q,
            cu_seqlens_k,
            max_seqlen_q,
            max_seqlen_k,
            scale=scale,
            return_lse=return_lse,
            **self._kw,
        )

    def _static_only(self, what: str) -> None:
        if self._dynamic:
            raise NotImplementedError(
                f"{what} is not implemented yet for patterns with score/select lines (issue 12 ships decode "
                "first): use op.decode(..., summaries=op.summaries(...))"
            )

    def summaries(self, k_cache, cache_seqlens, block_table=None, *, block_size: int = SUMMARY_BLOCK):
        """Per-block key summaries of a KV cache, for ``decode(..., summaries=s)`` (issue 12).

        Parameters
        ----------
        k_cache: ``[B, S_max, Hkv, D]``, or paged ``[pages, page, Hkv, D]`` with ``block_table``.
        cache_seqlens: int ``[B]``, tokens in each cache.
        block_table: int32 ``[B, max_pages]`` for a paged cache (kept by reference: pages appended to
            it later are seen by ``update``).
        block_size: tokens per summarized block (a power of two >= 16).

        Returns
        -------
        A :class:`spdsl.summaries.KeySummaries`; call ``s.update(k_cache, cache_seqlens)`` after
        appending tokens (only the changed blocks are recomputed).
        """
        from .summaries import KeySummaries

        return KeySummaries(k_cache, cache_seqlens, block_table, block_size)

    def decode(self, q, k_cache, v_cache, cache_seqlens, *, block_table=None, scale=None, return_lse=False, **dynamic):
        """KV-cache decode (FlashAttention ``flash_attn_with_kvcache`` conventions); see the generated module.

        CUDA (or ``TRITON_INTERPRET=1``) runs the sparse decode kernel; CPU tensors the blocked backend.
        Under ``torch.compile`` it is the custom op ``<op name>_decode`` (no graph break; CUDA-graph safe).
        Under ``torch.autocast`` the inputs are cast to its dtype first, as SDPA's are.

        Patterns with ``score`` / ``select`` lines (v1.1) take ``summaries=`` (from :meth:`summaries`;
        built on the spot when omitted), ``eps=1e-3`` (softmax error bound, 0 < eps < 1; ReLU^alpha
        is exact and ignores it), ``bias=0.0`` (ReLU^alpha bias; softmax ignores it) and
        ``return_error=False``; with ``return_error=True`` they
        return ``(out, err)``, ``err [B, Sq, Hq]`` float32 the certified total-variation bound
        (see :mod:`spdsl.dynamic`). Not CUDA-graph safe (the block choice synchronizes).
        """
        q, k_cache, v_cache = _autocast(q, k_cache, v_cache)
        _check_keywords(dynamic, _DYNAMIC_DEFAULTS, "decode")
        if self._dynamic:
            return self._decode_dynamic(q, k_cache, v_cache, cache_seqlens, block_table, scale, return_lse, dynamic)
        if any(value != _DYNAMIC_DEFAULTS[k] for k, value in dynamic.items()):
            raise TypeError(
                f"{', '.join(sorted(dynamic))} apply only to patterns with score/select lines; "
                f"pattern {self.pattern.name} has neither"
            )
        if torch.compiler.is_compiling():
            out, lse = self._decode(q, k_cache, v_cache, cache_seqlens, block_table, scale)
        elif self._on_cpu(q):
            self.module.check_decode(q, k_cache, v_cache, cache_seqlens, block_table, allow_cpu=True)
            check_count(self.heads, q.shape[2])
            out, lse = _decode_cpu(self.patterns, self.heads, q, k_cache, v_cache, cache_seqlens, block_table, scale)
        else:
            return self.module.decode(
                q,
                k_cache,
                v_cache,
                cache_seqlens,
                block_table=block_table,
                scale=scale,
                return_lse=return_lse,
                **self._kw,
            )
        return (out, lse) if return_lse else out

    def _prefill_dynamic(self, q, k, v, scale, q_offset, return_lse, options):
        from . import dynamic

        _check_keywords(options, set(_DYNAMIC_DEFAULTS) - {"summaries"}, "op")
        if not self._dynamic:
            raise TypeError(f"{', '.join(sorted(options))} apply only to patterns with score/select lines")
        opts = _dynamic_options(options, return_lse)
        if q_offset is not None and q_offset != k.shape[2] - q.shape[2]:  # (resolved by checked())
            raise NotImplementedError(
                "patterns with score/select lines take the default q_offset (kv_len - q_len) only"
            )
        sc = resolve_scale(scale, q.shape[-1])
        out, err = dynamic.prefill(self.pattern.ir, q, k, v, scale=sc, eps=opts["eps"], bias=opts["bias"])
        out = out.to(q.dtype)
        return (out, err) if opts["return_error"] else out

    def _decode_dynamic(self, q, k_cache, v_cache, cache_seqlens, block_table, scale, return_lse, options):
        from . import dynamic

        opts = _dynamic_options(options, return_lse)
        self.module.check_decode(q, k_cache, v_cache, cache_seqlens, block_table, allow_cpu=True)
        s = opts["summaries"] if opts["summaries"] is not None else self.summaries(k_cache, cache_seqlens, block_table)
        backend = None
        if not self._on_cpu(q):
            from .dynamic_kernels import TRITON as backend
        sc = resolve_scale(scale, q.shape[-1])
        out, err, _ = dynamic.decode(
            self.pattern.ir, q, k_cache, v_cache, cache_seqlens, s, scale=sc, eps=opts["eps"], bias=opts["bias"],
            block_table=block_table, backend=backend,
        )  # fmt: skip
        return (out, err) if opts["return_error"] else out

    def __repr__(self) -> str:
        return f"<spdsl op {self.op_name} from {self.path}>"


def _cpu_layout(pattern: Pattern, q, k, q_offset):
    """The CPU backend's layout, refused above the ``cpu_flops`` limit (the work of one forward)."""
    lay = pattern.layout(q.shape[2], k.shape[2], CPU_TILE, CPU_TILE, q_offset)
    B, Hq, _, D = q.shape
    flops = 4 * B * Hq * D * lay.nnz * lay.block_q * lay.block_kv
    require("cpu_flops", flops, f"attention on the CPU ({lay!r})", "use a GPU, or shorter sequences")
    return lay


def _forward_cpu(patterns, heads, q, k, v, scale, q_offset):
    """The blocked backend; per-head patterns run a pattern at a time, each on its heads (and their kv heads)."""
    from .blocked import attention_blocked

    def run(pattern, q, k, v):
        with torch.autocast("cpu", enabled=False):  # the inputs' dtype (see _autocast)
            o, l_ = attention_blocked(_cpu_layout(pattern, q, k, q_offset), q, k, v, scale=scale, return_lse=True)
        return o.to(q.dtype), l_.float()

    if heads is None:
        return run(patterns[0], q, k, v)
    out = q.new_empty(q.shape)
    lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
    for pattern, qi, ki in split(patterns, heads, q.shape[1], k.shape[1]):
        out[:, qi], lse[:, qi] = run(pattern, q[:, qi], k[:, ki], v[:, ki])
    return out, lse


def _backward_cpu(patterns, heads, dout, dlse, q, k, v, out, lse, scale, q_offset):
    """Gradients from the blocked backend; with per-head patterns the kv heads' gradients add up over patterns."""
    from .blocked import attention_blocked_backward

    def run(pattern, q, k, v, out, lse, dout, dlse):
        lay = _cpu_layout(pattern, q, k, q_offset)
        with torch.autocast("cpu", enabled=False):  # autograd replays the forward's autocast state
            return attention_blocked_backward(lay, q, k, v, out, lse, dout, scale=scale, dlse=dlse)

    if heads is None:
        grads = run(patterns[0], q, k, v, out, lse, dout, dlse)
    else:
        grads = [torch.zeros(x.shape, dtype=torch.float32, device=x.device) for x in (q, k, v)]
        for pattern, qi, ki in split(patterns, heads, q.shape[1], k.shape[1]):
            dl = None if dlse is None else dlse[:, qi]
            dq, dk, dv = run(pattern, q[:, qi], k[:, ki], v[:, ki], out[:, qi], lse[:, qi], dout[:, qi], dl)
            grads[0][:, qi] = dq.float()
            grads[1].index_add_(1, ki, dk.float())
            grads[2].index_add_(1, ki, dv.float())
    # the fake promises the strides of q, k, v (empty_like), as the GPU kernels write them
    return tuple(torch.empty_like(x).copy_(g) for x, g in zip((q, k, v), grads))


def _decode_cpu(patterns, heads, q, k_cache, v_cache, cache_seqlens, block_table, scale):
    """CPU decode: gather each sequence's keys (paged or not) and run the blocked backend."""
    B, Sq, Hq, _ = q.shape
    out = q.new_zeros(q.shape)
    lse = torch.full((B, Hq, Sq), float("-inf"), dtype=torch.float32)
    for b, n in enumerate(cache_seqlens.tolist()):
        k, v = sequence_kv(k_cache, v_cache, b, n, block_table)
        qb, kb, vb = q[b : b + 1].transpose(1, 2), k[None].transpose(1, 2), v[None].transpose(1, 2)
        o, l_ = _forward_cpu(patterns, heads, qb, kb, vb, scale, None)
        out[b] = o[0].transpose(0, 1)
        lse[b] = l_[0]
    return out, lse


def _register(name: str, patterns: tuple[Pattern, ...], heads: tuple[int, ...] | None, module):
    """Define the forward and backward custom ops and connect them with ``register_autograd``."""
    kw = {} if heads is None else {"heads": heads}

    @torch.library.custom_op(name, mutates_args=())
    def fwd(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None, q_offset: int | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if _on_cpu(module, q):  # inputs checked by __call__ / the fake
            return _forward_cpu(patterns, heads, q, k, v, scale, q_offset)
        return module.forward(q, k, v, scale=scale, q_offset=q_offset, validate=False, **kw)  # __call__ checked them

    @fwd.register_fake
    def _(q, k, v, scale, q_offset):
        module.check_inputs(q, k, v, "BHSD", allow_cpu=True)
        check_count(heads, q.shape[1])
        B, H, S, D = q.shape
        return q.new_empty((B, H, S, D)), q.new_empty((B, H, S), dtype=torch.float32)

    @torch.library.custom_op(f"{name}_bwd", mutates_args=())
    def bwd(
        dout: torch.Tensor,
        dlse: torch.Tensor | None,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor,
        scale: float | None,
        q_offset: int | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if _on_cpu(module, q):
            return _backward_cpu(patterns, heads, dout, dlse, q, k, v, out, lse, scale, q_offset)
        return module.backward(dout, q, k, v, out, lse, scale=scale, q_offset=q_offset, dlse=dlse, validate=False, **kw)

    @bwd.register_fake
    def _(dout, dlse, q, k, v, out, lse, scale, q_offset):
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    def setup_context(ctx, inputs, output):
        q, k, v, scale, q_offset = inputs
        ctx.save_for_backward(q, k, v, *output)
        ctx.args = scale, q_offset

    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dout = torch.zeros_like(out) if dout is None else dout
        return *bwd(dout, dlse, q, k, v, out, lse, *ctx.args), None, None

    fwd.register_autograd(backward, setup_context=setup_context)

    @torch.library.custom_op(f"{name}_decode", mutates_args=())
    def decode(
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        cache_seqlens: torch.Tensor,
        block_table: torch.Tensor | None,
        scale: float | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if _on_cpu(module, q):
            return _decode_cpu(patterns, heads, q, k_cache, v_cache, cache_seqlens, block_table, scale)
        return module.decode(
            q, k_cache, v_cache, cache_seqlens, block_table=block_table, scale=scale, return_lse=True, **kw
        )

    @decode.register_fake
    def _(q, k_cache, v_cache, cache_seqlens, block_table, scale):
        module.check_decode(q, k_cache, v_cache, cache_seqlens, block_table, allow_cpu=True)
        check_count(heads, q.shape[2])
        B, Sq, H, _ = q.shape
        return q.new_empty(q.shape), q.new_empty((B, H, Sq), dtype=torch.float32)

    return fwd, decode


def _check_keywords(options: dict, allowed, what: str) -> None:
    unknown = set(options) - set(allowed)
    if unknown:
        raise TypeError(f"{what}() got unexpected keyword argument(s): {', '.join(sorted(unknown))}")


def _dynamic_options(options: dict, return_lse: bool) -> dict:
    """The score/select call options with their defaults, checked (ValueError / TypeError)."""
    from .dynamic import check_options

    if return_lse:
        raise ValueError("return_lse is not available for patterns with score/select lines; use return_error=True")
    opts = {**_DYNAMIC_DEFAULTS, **options}
    check_options(opts["eps"], opts["bias"])
    return opts


def _on_cpu(module, q) -> bool:
    """CPU tensors without the Triton interpreter: the blocked PyTorch backend runs them."""
    return q.device.type == "cpu" and not module.interpreting()


def _autocast(*tensors):
    """SDPA's autocast rule: inside ``torch.autocast`` attention runs in its low-precision dtype (mixed
    inputs otherwise reach the kernels as float32: in a transformers Llama, RoPE makes q and k float32,
    and the float32 kernels are ~100x slower than bfloat16 ones)."""
    t = tensors[0]
    if not isinstance(t, torch.Tensor) or not torch.is_autocast_enabled(t.device.type):
        return tensors
    dtype = torch.get_autocast_dtype(t.device.type)
    return tuple(x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in tensors)


def _direct(*tensors) -> bool:
    """Eager and nothing to differentiate: the generated module can be called without the custom op."""
    if torch.compiler.is_compiling():
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
