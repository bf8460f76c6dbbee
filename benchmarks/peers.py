"""The peers every GPU benchmark times beside spdsl, on the identical layout, in the same process.

* FlexAttention (``torch.compile(flex_attention)``) on ``Layout.to_block_mask()``, with its default
  Triton backend and with ``kernel_options={"BACKEND": "FLASH"}`` (FlashAttention-4 underneath);
* FA4 dense (``flash_attn.cute.flash_attn_func``, causal) and cuDNN / FA2 dense causal through SDPA.

A peer that is not installed or cannot run a shape is reported (``None`` plus the reason), never
fatal. Inputs are spdsl's ``[B, H, S, D]``; FA4 wants ``[B, S, H, D]`` and gets transposed copies.
"""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=1)
def fa4_missing() -> str | None:
    """None when ``flash_attn.cute`` imports, else why not."""
    try:
        import flash_attn.cute  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        return f"flash_attn.cute is not available: {type(e).__name__}: {str(e)[:160]}"
    return None


@functools.lru_cache(maxsize=4)
def compiled_flex(dynamic: bool = False):
    """``torch.compile(flex_attention)``, shared by every case of a run."""
    from torch.nn.attention.flex_attention import flex_attention

    # one compile per (backend, layout, length): past dynamo's default 8 recompiles Flex silently
    # runs eagerly (the full score matrix: 2 TiB at 128K), as the 2026-12-03 backward run found
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
    return torch.compile(flex_attention, dynamic=dynamic)


def flex(block_mask, q, k, v, scale, *, backend: str = "TRITON", gqa: bool = False):
    """A callable running compiled FlexAttention with ``backend`` ("TRITON" or "FLASH")."""
    if backend == "FLASH" and fa4_missing():
        raise RuntimeError(fa4_missing())
    compiled = compiled_flex()
    options = {"BACKEND": "FLASH"} if backend == "FLASH" else None
    kwargs = {"block_mask": block_mask, "scale": scale, "enable_gqa": gqa or q.shape[1] != k.shape[1]}
    if options:
        kwargs["kernel_options"] = options
    return lambda: compiled(q, k, v, **kwargs)


def fa4_dense_causal(q, k, v, scale):
    """A callable running FA4's dense causal attention (returns out in spdsl's [B, H, S, D] layout)."""
    if fa4_missing():
        raise RuntimeError(fa4_missing())
    from flash_attn.cute import flash_attn_func

    qt, kt, vt = (t.detach().transpose(1, 2).contiguous().requires_grad_(t.requires_grad) for t in (q, k, v))

    def run():
        res = flash_attn_func(qt, kt, vt, softmax_scale=scale, causal=True)
        out = res[0] if isinstance(res, tuple) else res
        return out.transpose(1, 2)

    run.inputs = (qt, kt, vt)
    return run


def sdpa_causal(backend, q, k, v, scale):
    """A callable running dense causal SDPA with one backend (``SDPBackend.CUDNN_ATTENTION``...)."""
    from torch.nn.attention import sdpa_kernel

    def run():
        with sdpa_kernel(backend):
            return torch.nn.functional.scaled_dot_product_attention(
                q, k, v, is_causal=True, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
            )

    return run


def fwd_bwd(fn, grad, inputs):
    """A callable running ``fn()`` then its backward with ``grad`` (gradients of ``inputs`` reset each call)."""

    def run():
        for t in inputs:
            t.grad = None
        fn().backward(grad)

    return run


def try_time(timer, fn):
    """``(ms, None)``, or ``(None, reason)`` when the peer cannot run this case."""
    try:
        fn()
        torch.cuda.synchronize()
        return timer(fn), None
    except Exception as e:  # a peer that cannot run this shape is reported, not fatal
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        return None, f"{type(e).__name__}: {str(e)[:300]}"


def register_flex_transformers(pattern, name: str = "flex_pattern", backend: str = "TRITON") -> str:
    """FlexAttention on the pattern's BlockMask as a transformers attention function (no KV cache:
    queries are the last keys; one BlockMask per (q_len, kv_len)); differentiable. Returns ``name``."""
    import transformers

    masks = {}

    def attend(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        q_len, kv_len = query.shape[2], key.shape[2]
        if (q_len, kv_len) not in masks:
            masks[(q_len, kv_len)] = pattern.layout(q_len, kv_len, 128, 128).to_block_mask(device=query.device)
        run = flex(masks[(q_len, kv_len)], query, key, value, scaling, backend=backend, gqa=True)
        return run().transpose(1, 2).contiguous(), None

    transformers.AttentionInterface.register(name, attend)
    return name
