"""The op returned by ``spdsl.build``: argument validation, the CPU reference path, ``torch.compile``.

These tests run WITHOUT the Triton interpreter (CPU tensors go to the blocked reference), except
where a test turns it on to check an interpreter-only rule.
"""

from __future__ import annotations

import math

import pytest
import torch

import spdsl
from spdsl import reference

POWER_LIKE = "pattern power_like { unit 4 causal attend sink(1) | local(3) | powers(2) }"


@pytest.fixture(autouse=True)
def env(monkeypatch, tmp_path_factory):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("SPDSL_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "spdsl_cache_op"))


@pytest.fixture
def op():
    return spdsl.build(spdsl.compile(POWER_LIKE), block_m=16, block_n=16, num_warps=4, num_stages=1)


def qkv(B=1, Hq=4, Hkv=2, Sq=37, Skv=37, D=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(B, Hq, Sq, D, generator=g).to(dtype),
        torch.randn(B, Hkv, Skv, D, generator=g).to(dtype),
        torch.randn(B, Hkv, Skv, D, generator=g).to(dtype),
    )


# --------------------------------------------------------------------------------------------
# the CPU path


def test_build_returns_a_cached_op(op):
    assert isinstance(op, spdsl.SparseAttention)
    again = spdsl.build(spdsl.compile(POWER_LIKE), block_m=16, block_n=16, num_warps=4, num_stages=1)
    assert again is op
    assert op.op_name.startswith("spdsl::power_like_")
    assert op.path.is_file()


def test_cpu_fallback_equals_reference(op):
    q, k, v = qkv()
    out = op(q, k, v)
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out.double(), reference.attention(op.pattern, q, k, v), atol=1e-5, rtol=0)


def test_return_lse_shapes(op):
    q, k, v = qkv(B=2, Hq=4, Hkv=1, Sq=13, Skv=29)
    out, lse = op(q, k, v, return_lse=True)
    assert out.shape == (2, 4, 13, 16) and out.dtype == torch.float32
    assert lse.shape == (2, 4, 13) and lse.dtype == torch.float32
    _, ref_lse = reference.attention(op.pattern, q, k, v, return_lse=True)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=0)


def test_fp16_cpu_path(op):
    q, k, v = qkv(dtype=torch.float16)
    out, lse = op(q, k, v, return_lse=True)
    assert out.dtype == torch.float16 and lse.dtype == torch.float32
    assert (out.double() - reference.attention(op.pattern, q, k, v)).abs().max() < 4e-3


def test_scale_argument(op):
    q, k, v = qkv(seed=1)
    out = op(q, k, v, scale=0.05)
    torch.testing.assert_close(out.double(), reference.attention(op.pattern, q, k, v, scale=0.05), atol=1e-5, rtol=0)
    assert not torch.allclose(out, op(q, k, v))
    # the default is 1/sqrt(D)
    torch.testing.assert_close(op(q, k, v, scale=1 / math.sqrt(16)), op(q, k, v))


def test_q_offset_argument(op):
    q, k, v = qkv(Sq=9, Skv=30, seed=2)
    for off in (0, 5, -4, 21):
        out, lse = op(q, k, v, q_offset=off, return_lse=True)
        ref, ref_lse = reference.attention(op.pattern, q, k, v, q_offset=off, return_lse=True)
        torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)
        assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    out, lse = op(q, k, v, q_offset=-20, return_lse=True)  # every row before the keys: nothing visible
    assert torch.equal(out, torch.zeros_like(out)) and bool((lse == -math.inf).all())


@pytest.mark.parametrize("bad", [1.5, "3", True, torch.tensor(2)])
def test_q_offset_type_error(op, bad):
    q, k, v = qkv()
    with pytest.raises(TypeError, match="q_offset"):
        op(q, k, v, q_offset=bad)


# --------------------------------------------------------------------------------------------
# validation (the op and the generated module say what was expected and what came)


def test_dtype_mix(op):
    q, k, v = qkv()
    with pytest.raises(TypeError, match=r"one dtype.*float32.*float16"):
        op(q, k.half(), v)


def test_integer_dtype(op):
    q, k, v = qkv()
    with pytest.raises(TypeError, match=r"float16, bfloat16 or float32.*int64"):
        op(q.long(), k.long(), v.long())


def test_device_mix(op):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"one device.*cpu.*meta"):
        op.module.check_inputs(q, k.to("meta"), v, "BHSD", allow_cpu=True)


def test_device_mix_through_the_op(op):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"device"):
        op(q, k.to("meta"), v)


@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_rank(op, which):
    t = dict(zip("qkv", qkv()))
    t[which] = t[which][0]
    with pytest.raises(ValueError, match=rf"{which} must be a 4-d tensor.*got shape"):
        op(t["q"], t["k"], t["v"])


def test_head_dim_not_supported(op):
    q, k, v = qkv(D=48)
    with pytest.raises(ValueError, match=r"head dim 48 is not supported; supported: .*64, 128"):
        op(q, k, v)


def test_head_dim_mismatch(op):
    q, _, _ = qkv(D=32)
    _, k, v = qkv(D=16)
    with pytest.raises(ValueError, match=r"head dim.*32.*16"):
        op(q, k, v)


def test_gqa_heads_not_divisible(op):
    q, k, v = qkv(Hq=3, Hkv=2)
    with pytest.raises(ValueError, match=r"query heads \(3\).*multiple of kv heads \(2\)"):
        op(q, k, v)


def test_k_v_shape_mismatch(op):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"k and v"):
        op(q, k, v[:, :, :-1])


def test_batch_mismatch(op):
    q, k, v = qkv(B=2)
    with pytest.raises(ValueError, match=r"batch"):
        op(q, k[:1], v[:1])


def test_non_contiguous_last_dim(op):
    q, k, v = qkv()
    q_bad = q.transpose(2, 3).contiguous().transpose(2, 3)  # same values, last-dim stride != 1
    assert q_bad.stride(-1) != 1
    with pytest.raises(ValueError, match=r"q must be contiguous in its last \(head\) dim.*contiguous\(\)"):
        op(q_bad, k, v)


def test_strided_but_last_dim_contiguous_is_fine(op):
    q, k, v = qkv()
    q2 = q.transpose(1, 2).contiguous().transpose(1, 2)  # [B, S, H, D] storage
    torch.testing.assert_close(op(q2, k, v), op(q, k, v))


def test_bf16_under_interpreter_is_a_type_error(op, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q, k, v = qkv(dtype=torch.bfloat16)
    with pytest.raises(TypeError, match=r"bfloat16.*TRITON_INTERPRET"):
        op.module.attention(q, k, v)


def test_cpu_without_interpreter_module_says_what_to_do(op):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"CUDA.*TRITON_INTERPRET=1"):
        op.module.attention(q, k, v)


def test_bad_scale(op):
    q, k, v = qkv()
    with pytest.raises((ValueError, TypeError), match="scale"):
        op(q, k, v, scale=float("nan"))


def test_not_a_tensor_in_the_module(op):
    _, k, v = qkv()
    with pytest.raises(TypeError, match=r"q must be a torch.Tensor, got list"):
        op.module.check_inputs([[1.0]], k, v, "BHSD", allow_cpu=True)


def test_not_a_tensor(op):
    _, k, v = qkv()
    with pytest.raises(TypeError, match=r"q must be a torch.Tensor"):
        op([[1.0]], k, v)


# --------------------------------------------------------------------------------------------
# torch.compile


class Block(torch.nn.Module):
    def __init__(self, op, dim=32, heads=4, kv_heads=2):
        super().__init__()
        self.op, self.h, self.hk, self.d = op, heads, kv_heads, dim // heads
        g = torch.Generator().manual_seed(0)
        self.wq = torch.nn.Parameter(torch.randn(dim, heads * self.d, generator=g) / dim**0.5)
        self.wkv = torch.nn.Parameter(torch.randn(dim, 2 * kv_heads * self.d, generator=g) / dim**0.5)

    def forward(self, x):
        B, S, _ = x.shape
        q = (x @ self.wq).view(B, S, self.h, self.d).transpose(1, 2)
        k, v = (x @ self.wkv).view(B, S, 2, self.hk, self.d).permute(2, 0, 3, 1, 4).unbind(0)
        o = self.op(q, k, v)
        return torch.relu(o.transpose(1, 2).reshape(B, S, -1)) + x


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(op, backend):
    torch._dynamo.reset()
    model = Block(op, dim=64, heads=4, kv_heads=2)
    x = torch.randn(2, 29, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True, backend=backend)  # a graph break would raise
        got = compiled(x)
        got2 = compiled(x + 1)
    torch.testing.assert_close(got, eager, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got2, model(x + 1), atol=1e-5, rtol=1e-5)


def test_torch_compile_with_lse_and_options(op):
    torch._dynamo.reset()

    def f(q, k, v):
        out, lse = op(q, k, v, scale=0.2, q_offset=3, return_lse=True)
        return out.sum(-1) + lse

    q, k, v = qkv(Sq=11, Skv=20)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v), f(q, k, v))


def test_fake_impl_shapes(op):
    """The op's fake (meta) implementation gives the shapes torch.compile traces with."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(2, 4, 17, 64)
        k = torch.empty(2, 1, 40, 64)
        out, lse = op(q, k, k, return_lse=True)
    assert out.shape == (2, 4, 17, 64) and lse.shape == (2, 4, 17) and lse.dtype == torch.float32


def test_decode_under_torch_compile_fullgraph(op):
    """op.decode is a custom op under torch.compile (no graph break), same result as eager."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 1, 4, 16, generator=g)
    kc, vc = (torch.randn(2, 40, 2, 16, generator=g) for _ in range(2))
    lens = torch.tensor([40, 23], dtype=torch.int32)

    def f(q, kc, vc, lens):
        out, lse = op.decode(q, kc, vc, lens, return_lse=True)
        return out * 2, lse

    got, lse = torch.compile(f, fullgraph=True, backend="aot_eager")(q, kc, vc, lens)
    want, want_lse = f(q, kc, vc, lens)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(lse, want_lse)


def test_eager_no_grad_call_skips_the_custom_op(op, monkeypatch):
    """Inference in eager mode calls the generated module directly (no dispatch); with grad it is the op."""
    q, k, v = qkv()
    calls = []
    monkeypatch.setattr(op, "_fwd", lambda *a: calls.append(a) or op.module.forward(*a[:3], validate=False))
    monkeypatch.setattr(op, "_on_cpu", lambda q: False)
    seen = []

    def forward(q, k, v, return_lse=True, **kw):
        seen.append(return_lse)
        return (q.clone(), q.new_zeros(q.shape[:3])) if return_lse else q.clone()

    monkeypatch.setattr(op.module, "forward", forward)
    with torch.no_grad():
        assert op(q, k, v).shape == q.shape
        assert op(q, k, v, return_lse=True)[1].shape == q.shape[:3]
    assert calls == [] and seen == [False, True]  # no LSE written unless asked for
    op(q.requires_grad_(), k, v)
    assert len(calls) == 1


def test_autocast_casts_mixed_inputs_like_sdpa(op):
    """Inside torch.autocast the op runs in autocast's dtype, as SDPA does; a transformers Llama hands
    it float32 q/k (RoPE) and bfloat16 v, which without the cast was a dtype error or the float32 kernels."""
    q, k, v = qkv()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = op(q, k, v.bfloat16())
        ref_sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v.bfloat16(), enable_gqa=True)
        expected = op(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert out.dtype == ref_sdpa.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    q.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        op(q, k, v).float().sum().backward()
    assert q.grad.dtype == torch.float32 and bool(torch.isfinite(q.grad).all())


def test_autocast_off_keeps_the_dtype_rule(op):
    q, k, v = qkv()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False), pytest.raises(TypeError, match="share one dtype"):
        op(q, k, v.bfloat16())
