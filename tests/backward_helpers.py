"""Shared by the test_backward_* files: builds, inputs, fp64 reference gradients, tolerances."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck

import spdsl
from spdsl import reference
from spdsl.codegen import BackwardConfig, KernelConfig
from tests.helpers import scoped_env

TOL = {torch.float32: 1e-4, torch.float16: 5e-3}
_QUIET = [HealthCheck.too_slow, HealthCheck.data_too_large]

POWER_LIKE = "pattern power_like { unit 4 causal attend sink(1) | local(3) | powers(2) }"
BAND = "pattern band_nc { unit 2 attend band(-2, 1) | every(5) }"
# wide enough that every tile size below has full tiles, partial ones and absent ones at 77 x 77
TILED = "pattern tiled { unit 4 causal attend sink(8) | local(16) | powers(2) }"
TRAIN = "pattern p() { unit 4 causal attend sink(1) | local(2) | powers(2) }"


@pytest.fixture(scope="module", autouse=True)
def _env(tmp_path_factory):
    """A private SPDSL_CACHE_DIR and no interpreter by default (tests that want it use `interpreter()`)."""
    with scoped_env(TRITON_INTERPRET=None, SPDSL_CACHE_DIR=str(tmp_path_factory.mktemp("spdsl_cache_bwd"))):
        yield


def interpreter():
    """TRITON_INTERPRET=1 for the block: the op then routes CPU tensors to the generated kernels."""
    return scoped_env(TRITON_INTERPRET="1")


def as_pattern(pattern):
    if isinstance(pattern, str):
        return spdsl.compile(pattern)
    return pattern if isinstance(pattern, spdsl.Pattern) else spdsl.Pattern(pattern)


def build(pattern, tile_m=16, tile_n=16, dkdv=None, dq=None, atomic=False):
    """An interpreter op with one forward config and one backward config (must be called under
    `interpreter()`: the build key and the module's jit functions depend on TRITON_INTERPRET)."""
    dkdv_m, dkdv_n = dkdv or (tile_m, tile_n)
    dq_m, dq_n = dq or (tile_m, tile_n)
    bwd = BackwardConfig(
        tile_m=tile_m,
        tile_n=tile_n,
        dkdv_m=dkdv_m,
        dkdv_n=dkdv_n,
        dq_m=dq_m,
        dq_n=dq_n,
        dkdv_warps=4,
        dq_warps=4,
        dkdv_stages=1,
        dq_stages=1,
        atomic_dq=atomic,
    )
    return spdsl.build(as_pattern(pattern), configs=[KernelConfig(tile_m, tile_n, 4, 1)], backward_configs=[bwd])


def build_cpu(pattern):
    """The op for the blocked CPU backend (built and called without the interpreter)."""
    return spdsl.build(as_pattern(pattern), block_m=16, block_n=16, num_warps=4, num_stages=1)


def qkv(B, Hq, Hkv, Sq, Skv, D, dtype, seed=0, strided=False):
    """Leaf q, k, v (requires_grad) in dtype, plus dout and the LSE weights w (fp32)."""
    g = torch.Generator().manual_seed(seed)
    if strided:  # [B, S, H, D] storage viewed as [B, H, S, D]: only the last dim is contiguous
        ts = [torch.randn(B, S, H, D, generator=g).transpose(1, 2) for H, S in ((Hq, Sq), (Hkv, Skv), (Hkv, Skv))]
    else:
        ts = [torch.randn(B, H, S, D, generator=g) for H, S in ((Hq, Sq), (Hkv, Skv), (Hkv, Skv))]
    q, k, v = (t.to(dtype).requires_grad_() for t in ts)
    dout = torch.randn(B, Hq, Sq, D, generator=g).to(dtype)
    w = torch.randn(B, Hq, Sq, generator=g)
    return q, k, v, dout, w


def loss_of(out, lse, dout, w):
    """sum(out * dout) + sum(w * lse) over the finite LSE entries (rows that see something): its
    gradient is dout for out and w (0 where the LSE is -inf) for the LSE."""
    loss = (out.double() * dout.double()).sum()
    if lse is not None:
        loss = loss + (torch.where(torch.isfinite(lse), lse.double(), 0.0) * w.double()).sum()
    return loss


def ref_grads(pattern, q, k, v, dout, w=None, *, scale=None, q_offset=None):
    """fp64 autograd through the dense reference: (dq, dk, dv)."""
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out, lse = reference.attention(pattern, q64, k64, v64, scale=scale, q_offset=q_offset, return_lse=True)
    grads = torch.autograd.grad(loss_of(out, lse if w is not None else None, dout, w), (q64, k64, v64))
    return grads


def op_grads(op, q, k, v, dout, w=None, *, scale=None, q_offset=None):
    """(dq, dk, dv) through the op's autograd (LSE in the loss when w is given)."""
    out, lse = op(q, k, v, scale=scale, q_offset=q_offset, return_lse=True)
    return torch.autograd.grad(loss_of(out, lse if w is not None else None, dout, w), (q, k, v))


def module_grads(op, q, k, v, dout, w=None, *, scale=None, q_offset=None):
    """(dq, dk, dv) from the generated module's forward and backward, called directly."""
    q, k, v = (t.detach() for t in (q, k, v))
    out, lse = op.module.forward(q, k, v, scale=scale, q_offset=q_offset)
    dlse = None if w is None else torch.where(torch.isfinite(lse), w, 0.0)
    return op.module.backward(dout, q, k, v, out, lse, scale=scale, q_offset=q_offset, dlse=dlse)


def rel_err(got, ref) -> float:
    scale = ref.abs().max().item() if ref.numel() else 0.0
    err = (got.double() - ref).abs().max().item() if ref.numel() else 0.0
    return err / scale if scale > 0 else err


def check_grads(pattern, got, ref, inputs, *, q_offset=None, tol=None):
    """Shapes and dtypes, no NaN/inf, error relative to the gradient's scale, and exact zeros where
    nothing flows: dq of rows that see no key, dk / dv of keys no row sees."""
    pattern = as_pattern(pattern)
    q, k = inputs[0], inputs[1]
    Sq, Skv = q.shape[2], k.shape[2]
    mask = pattern.dense_mask(Sq, Skv, q_offset)
    empty_rows, unseen_keys = ~mask.any(1), ~mask.any(0)
    for name, g, r, t in zip(("dq", "dk", "dv"), got, ref, inputs):
        assert g.shape == t.shape and g.dtype == t.dtype, (name, g.shape, g.dtype)
        assert torch.isfinite(g).all(), f"{name} has NaN/inf"
        err = rel_err(g, r)
        bound = TOL[t.dtype] if tol is None else tol
        assert err <= bound, f"{name}: max error {err:.3g} x max|ref| > {bound}"
        hidden = empty_rows if name == "dq" else unseen_keys
        if hidden.any():
            assert torch.equal(g[:, :, hidden], torch.zeros_like(g[:, :, hidden])), (
                f"{name} must be 0 where nothing flows"
            )


SHAPE_CASES = {
    # name: (B, Hq, Hkv, Sq, Skv, q_offset)
    "q13-kv70-bottom-right": (2, 2, 1, 13, 70, None),
    "q50-kv20-empty-rows": (1, 2, 1, 50, 20, None),
    "q29-kv23-offset-neg5": (1, 1, 1, 29, 23, -5),
    "q40-kv40-offset-neg25": (1, 2, 2, 40, 40, -25),
    "q1-kv45-offset17": (1, 4, 2, 1, 45, 17),
    "q33-kv19-offset30": (1, 4, 1, 33, 19, 30),
    "q31-kv47-gqa4": (1, 4, 1, 31, 47, None),
}


def cu(lens):
    return torch.tensor([0, *torch.tensor(lens, dtype=torch.int64).cumsum(0).tolist()], dtype=torch.int32)


def case_inputs(case):
    """(q, k, v, dout, w, kw) of a drawn case: w (the LSE's weight in the loss) only when it asks for it."""
    q, k, v, dout, w = qkv(*case["shape"], case["D"], case["dtype"], case["seed"], case["strided"])
    return q, k, v, dout, w if case["lse"] else None, dict(scale=case["scale"], q_offset=case["q_offset"])


def check_case(op, got, q, k, v, dout, w, kw):
    """``got`` (dq, dk, dv) against fp64 autograd through the reference for the same inputs."""
    check_grads(op.pattern, got, ref_grads(op.pattern, q, k, v, dout, w, **kw), (q, k, v), q_offset=kw["q_offset"])
