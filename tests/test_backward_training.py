"""Training with the op: torch.compile of a training step, a tiny model against a reference twin, and
the validation of the generated module's backward(...)."""

from __future__ import annotations

import pytest
import torch

import spdsl
from spdsl import reference
from tests.backward_helpers import (
    POWER_LIKE,
    TRAIN,
    build,
    build_cpu,
    cu,
    interpreter,
    qkv,
)
from tests.helpers import nan_buffers

# --------------------------------------------------------------------------------------------
# 5. torch.compile of a training step (CPU: the blocked backend)


def _projections(seed=15, dim=32, heads=4, kv_heads=2, dh=16):
    g = torch.Generator().manual_seed(seed)
    wq = (torch.randn(heads * dh, dim, generator=g) / dim**0.5).requires_grad_()
    wkv = (torch.randn(2 * kv_heads * dh, dim, generator=g) / dim**0.5).requires_grad_()
    x = torch.randn(2, 29, dim, generator=g)
    return x, (wq, wkv)


def _step_loss(op, x, wq, wkv, heads=4, kv_heads=2, dh=16):
    B, S, _ = x.shape
    q = torch.nn.functional.linear(x, wq).view(B, S, heads, dh).transpose(1, 2)
    k, v = torch.nn.functional.linear(x, wkv).view(B, S, 2, kv_heads, dh).permute(2, 0, 3, 1, 4).unbind(0)
    out, lse = op(q, k, v, return_lse=True)
    return (out**2).mean() + 0.1 * torch.where(torch.isfinite(lse), lse, 0.0).mean()


def test_torch_compile_training_step_fullgraph():
    op = build_cpu(POWER_LIKE)
    x, params = _projections()
    eager_loss = _step_loss(op, x, *params)
    eager = torch.autograd.grad(eager_loss, params)
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, wq, wkv: _step_loss(op, x, wq, wkv), fullgraph=True, backend="aot_eager")
    loss = compiled(x, *params)  # a graph break would raise
    loss.backward()
    torch.testing.assert_close(loss, eager_loss, atol=1e-6, rtol=1e-6)
    for got, want in zip((p.grad for p in params), eager):
        assert got.abs().max() > 0
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


@pytest.mark.skipif(
    not hasattr(torch._dynamo.config, "trace_autograd_ops"), reason="this torch cannot trace torch.autograd.grad"
)
def test_torch_compile_autograd_grad_inside_fullgraph():
    op = build_cpu(POWER_LIKE)
    x, params = _projections(seed=16)

    def step(x, wq, wkv):
        loss = _step_loss(op, x, wq, wkv)
        return loss.detach(), torch.autograd.grad(loss, (wq, wkv))

    eager_loss, eager = step(x, *params)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        loss, grads = torch.compile(step, fullgraph=True, backend="aot_eager")(x, *params)
    torch.testing.assert_close(loss, eager_loss, atol=1e-6, rtol=1e-6)
    for got, want in zip(grads, eager):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# 6. A tiny model trained with the op and with the reference


class TinyLM(torch.nn.Module):
    """embedding -> 2 x [q/k/v projections -> attention -> output projection, residual] -> logits."""

    def __init__(self, attend, vocab=37, dim=32, heads=2, layers=2):
        super().__init__()
        self.attend, self.heads = attend, heads
        self.emb = torch.nn.Embedding(vocab, dim)
        self.qkv = torch.nn.ModuleList(torch.nn.Linear(dim, 3 * dim) for _ in range(layers))
        self.proj = torch.nn.ModuleList(torch.nn.Linear(dim, dim) for _ in range(layers))
        self.head = torch.nn.Linear(dim, vocab)

    def forward(self, tokens):
        x = self.emb(tokens)
        B, S, dim = x.shape
        for in_proj, proj in zip(self.qkv, self.proj):
            q, k, v = in_proj(x).view(B, S, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
            o = self.attend(q, k, v)
            x = x + proj(o.transpose(1, 2).reshape(B, S, dim))
        return self.head(x)


def train(attend, steps=5, seq_len=48, seed=17):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = TinyLM(attend)
        tokens = torch.randint(0, 37, (2, seq_len + 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    for _ in range(steps):
        logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, model


def test_tiny_model_trains_like_the_reference():
    pat = spdsl.compile(TRAIN)
    mask = pat.dense_mask(48, 48)
    causal = torch.ones(48, 48, dtype=torch.bool).tril()
    assert mask.sum() < 0.7 * causal.sum()  # the pattern really cuts at this length
    op = build_cpu(pat)
    got, model = train(op)
    want, ref_model = train(lambda q, k, v: reference.attention(pat, q, k, v).to(q.dtype))
    dense, _ = train(lambda q, k, v: reference.attention_dense(q, k, v, causal).to(q.dtype))
    assert got[-1] < got[0]  # it trains
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=0, rtol=1e-5)
    for (name, a), b in zip(model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)
    # the comparison can tell patterns apart: dense causal attention trains differently
    assert max(abs(a - b) for a, b in zip(got[1:], dense[1:])) > 1e-3


# --------------------------------------------------------------------------------------------
# 7. Validation of the module's backward


@pytest.fixture
def fwd_small():
    """(op, q, k, v, out, lse, dout) from the interpreter, under TRITON_INTERPRET=1 for the test."""
    with interpreter():
        op = build(POWER_LIKE)
        q, k, v, dout, _ = qkv(1, 2, 1, 20, 20, 16, torch.float32, seed=18)
        q, k, v = (t.detach() for t in (q, k, v))
        out, lse = op.module.forward(q, k, v)
        yield op, q, k, v, out, lse, dout


@pytest.mark.parametrize(
    "bad,match",
    [
        (dict(dout="short"), r"gradient of out \(dout\) must be a tensor of shape \(1, 2, 20, 16\) on cpu"),
        (dict(dout="list"), r"gradient of out \(dout\) must be a tensor"),
        (dict(dout="meta"), r"gradient of out \(dout\) .* on cpu"),
        (dict(dlse="short"), r"gradient of lse must be a tensor of shape \(1, 2, 20\) on cpu"),
        (dict(dlse="bhsd"), r"gradient of lse must be a tensor of shape \(1, 2, 20\)"),
        (dict(dlse="meta"), r"gradient of lse .* on cpu"),
    ],
    ids=["dout-shape", "dout-not-a-tensor", "dout-device", "dlse-shape", "dlse-4d", "dlse-device"],
)
def test_backward_rejects_bad_gradients(fwd_small, bad, match):
    op, q, k, v, out, lse, dout = fwd_small
    dlse = None
    if "dout" in bad:
        dout = {"short": dout[:, :, :-1], "list": dout.tolist(), "meta": dout.to("meta")}[bad["dout"]]
    else:
        dlse = {"short": lse[:, :1], "bhsd": out, "meta": lse.to("meta")}[bad["dlse"]]
    with pytest.raises(ValueError, match=match):
        op.module.backward(dout, q, k, v, out, lse, dlse=dlse)


def test_backward_varlen_rejects_bad_gradients():
    g = torch.Generator().manual_seed(19)
    q, k, v = (torch.randn(12, 2, 16, generator=g) for _ in range(3))
    c = cu([5, 7])
    with interpreter():
        op = build(POWER_LIKE)
        out, lse = op.module.forward_varlen(q, k, v, c, c, 7, 7)
        with pytest.raises(ValueError, match=r"gradient of out \(dout\) must be a tensor of shape \(12, 2, 16\)"):
            op.module.backward_varlen(out[:-1], q, k, v, out, lse, c, c, 7, 7)
        with pytest.raises(ValueError, match=r"gradient of lse must be a tensor of shape \(2, 12\)"):
            op.module.backward_varlen(out, q, k, v, out, lse, c, c, 7, 7, dlse=lse.t())


def test_backward_input_checks_run(fwd_small):
    op, q, k, v, out, lse, dout = fwd_small
    with pytest.raises(TypeError, match=r"one dtype"):
        op.module.backward(dout, q, k.half(), v, out, lse)
    with pytest.raises(ValueError, match=r"multiple of kv heads"):
        op.module.backward(dout, q, k.expand(1, 3, 20, 16).contiguous(), v.expand(1, 3, 20, 16).contiguous(), out, lse)


def test_backward_rejects_out_of_the_wrong_shape(fwd_small):
    op, q, k, v, out, lse, dout = fwd_small
    # views of the full tensors, so the kernels' reads past the short shape stay inside memory
    with nan_buffers(op.module), pytest.raises(ValueError, match=r"out"):
        op.module.backward(dout[:, :, :10], q, k, v, out[:, :, :10], lse)


def test_backward_rejects_lse_of_the_wrong_shape(fwd_small):
    op, q, k, v, out, lse, dout = fwd_small
    longer = torch.cat([lse, lse[:, :, :10]], 2)  # only the harmless direction is exercised here
    with pytest.raises(ValueError, match=r"lse"):
        op.module.backward(dout, q, k, v, out, longer)


def test_backward_with_a_non_contiguous_lse(fwd_small):
    op, q, k, v, out, lse, dout = fwd_small
    lse_t = lse.transpose(1, 2).contiguous().transpose(1, 2)  # same values, row stride 2
    assert torch.equal(lse_t, lse) and lse_t.stride(-1) != 1
    want = op.module.backward(dout, q, k, v, out, lse)
    got = op.module.backward(dout, q, k, v, out, lse_t)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_backward_rejects_dout_of_another_dtype(fwd_small):
    op, q, k, v, out, lse, dout = fwd_small
    with pytest.raises((TypeError, ValueError), match=r"dout|gradient of out"):
        op.module.backward(dout.half(), q, k, v, out, lse)
