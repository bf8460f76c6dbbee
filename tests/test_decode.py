"""Sparse decode: the generated Triton decode kernel (interpreter on CPU, real kernel on CUDA)
against an fp64 reference; paged caches with shuffled pages; GQA; Sq > 1; CUDA-graph replay."""

from __future__ import annotations

import math
import os

import pytest
import torch

import spdsl
from spdsl import reference
from tests.helpers import scoped_env

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"

PATTERNS = {
    "power": "pattern power() { unit 4\n causal\n attend sink(1) | local(3) | powers(2) }",
    "segdiff": "pattern segdiff() { unit 2\n causal\n attend segment(5) - every(3) }",
    "band": "pattern band() { unit 3\n causal\n attend band(0, 4) | every(5) }",
}


@pytest.fixture(scope="module")
def ops(tmp_path_factory):
    """Ops whose decode runs the Triton kernel: on CUDA, or under the interpreter on CPU (this module only)."""
    cfg = {} if CUDA else {"block_m": 16, "block_n": 16, "num_warps": 4, "num_stages": 1}
    interpret = None if CUDA else "1"
    with scoped_env(TRITON_INTERPRET=interpret, SPDSL_CACHE_DIR=str(tmp_path_factory.mktemp("cache"))):
        yield {name: spdsl.build(spdsl.compile(text), **cfg) for name, text in PATTERNS.items()}


def ref_decode(pattern, q, kc, vc, seqlens, scale):
    B, Sq, Hq, _ = q.shape
    out = torch.zeros(q.shape, dtype=torch.float64)
    lse = torch.full((B, Hq, Sq), float("-inf"), dtype=torch.float64)
    for b, n in enumerate(seqlens.tolist()):
        k, v = kc[b, :n].cpu()[None].transpose(1, 2), vc[b, :n].cpu()[None].transpose(1, 2)
        o, l_ = reference.attention(pattern, q[b : b + 1].cpu().transpose(1, 2), k, v, scale=scale, return_lse=True)
        out[b], lse[b] = o[0].transpose(0, 1), l_[0]
    return out, lse


def to_paged(kc, vc, page, gen):
    B, S, H, D = kc.shape
    npg = -(-S // page)
    pad = npg * page - S
    kc, vc = (torch.nn.functional.pad(t, (0, 0, 0, 0, 0, pad)) for t in (kc, vc))
    perm = torch.randperm(B * npg, generator=gen)
    kp, vp = torch.empty(B * npg, page, H, D, dtype=kc.dtype), torch.empty(B * npg, page, H, D, dtype=kc.dtype)
    kp[perm], vp[perm] = kc.reshape(B * npg, page, H, D), vc.reshape(B * npg, page, H, D)
    return kp, vp, perm.view(B, npg).to(torch.int32)


CASES = [  # (pattern, B, Sq, Hq, Hkv, D, S_max, dtype)
    ("power", 3, 1, 4, 1, 16, 70, torch.float32),
    ("power", 2, 3, 8, 2, 32, 50, torch.float16),
    ("segdiff", 2, 2, 4, 4, 16, 41, torch.float32),
    ("band", 2, 4, 8, 1, 16, 37, torch.float16),
]


@pytest.mark.parametrize(
    "case", CASES, ids=lambda c: f"{c[0]}-B{c[1]}-Sq{c[2]}-H{c[3]}x{c[4]}-D{c[5]}-S{c[6]}-{str(c[7])[6:]}"
)
def test_decode_matches_reference(ops, case):
    name, B, Sq, Hq, Hkv, D, S, dtype = case
    gen = torch.Generator().manual_seed(S * B + Sq)
    q = torch.randn(B, Sq, Hq, D, generator=gen).to(dtype)
    kc, vc = (torch.randn(B, S, Hkv, D, generator=gen).to(dtype) for _ in range(2))
    seqlens = torch.randint(Sq, S + 1, (B,), generator=gen, dtype=torch.int32)
    seqlens[0] = min(S, 5)  # shorter than one tile
    op = ops[name]
    ro, rl = ref_decode(op.pattern, q, kc, vc, seqlens, 1 / math.sqrt(D))
    dev = lambda t: t.to(DEVICE)
    out, lse = op.decode(dev(q), dev(kc), dev(vc), dev(seqlens), return_lse=True)
    tol = 1e-4 if dtype == torch.float32 else 3e-3
    assert not out.isnan().any()
    torch.testing.assert_close(out.cpu().double(), ro, atol=tol, rtol=0)
    assert torch.equal(torch.isinf(lse.cpu()), torch.isinf(rl))
    fin = torch.isfinite(rl)
    torch.testing.assert_close(lse.cpu().double()[fin], rl[fin], atol=1e-4, rtol=1e-4)
    for page in (16, 32):
        kp, vp, bt = to_paged(kc, vc, page, gen)
        out_p = op.decode(dev(q), dev(kp), dev(vp), dev(seqlens), block_table=dev(bt))
        assert torch.equal(out_p.cpu(), out.cpu()), "paged must equal contiguous bit for bit"


def test_decode_validation(ops):
    op = ops["power"]
    q = torch.randn(2, 1, 4, 16, device=DEVICE)
    kc = torch.randn(2, 32, 2, 16, device=DEVICE)
    ok = torch.tensor([32, 5], dtype=torch.int32, device=DEVICE)
    with pytest.raises(TypeError, match="cache_seqlens must be a 1-d int32"):
        op.decode(q, kc, kc, ok.long())
    with pytest.raises(ValueError, match="cache_seqlens must have shape"):
        op.decode(q, kc, kc, ok[:1])
    with pytest.raises(ValueError, match="multiple of kv heads"):
        op.decode(torch.randn(2, 1, 3, 16, device=DEVICE), kc, kc, ok)
    with pytest.raises(TypeError, match="block_table must be a 2-d int32"):
        op.decode(q, kc, kc, ok, block_table=torch.zeros(2, 1, device=DEVICE))
    with pytest.raises(ValueError, match="page size"):
        op.decode(
            q,
            torch.randn(4, 24, 2, 16, device=DEVICE),
            torch.randn(4, 24, 2, 16, device=DEVICE),
            ok,
            block_table=torch.zeros(2, 2, dtype=torch.int32, device=DEVICE),
        )
    with pytest.raises(ValueError, match="k_cache must be"):
        op.decode(q, kc[:1], kc[:1], ok)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("paged", [False, True])
def test_gpu_bf16_and_cuda_graph(paged):
    op = spdsl.build(spdsl.load(os.path.join(os.path.dirname(__file__), "..", "patterns", "power.spd")))
    gen = torch.Generator(device="cuda").manual_seed(0)
    B, Hq, Hkv, D, S = 4, 32, 8, 128, 8192
    q = torch.randn(B, 1, Hq, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    kc, vc = (torch.randn(B, S, Hkv, D, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(2))
    seqlens = torch.tensor([8192, 5000, 300, 77], dtype=torch.int32, device="cuda")
    kw = {}
    if paged:
        kp, vp, bt = to_paged(kc.cpu(), vc.cpu(), 64, torch.Generator().manual_seed(1))
        kc_, vc_, kw = kp.cuda(), vp.cuda(), {"block_table": bt.cuda()}
    else:
        kc_, vc_ = kc, vc
    out = op.decode(q, kc_, vc_, seqlens, **kw)
    ro, _ = ref_decode(op.pattern, q.float(), kc.float(), vc.float(), seqlens, 1 / math.sqrt(D))
    err = ((out.cpu().double() - ro).norm() / ro.norm()).item()
    assert err < 1e-2, err
    static = seqlens.clone()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        graphed = op.decode(q, kc_, vc_, static, **kw)
    for new in ([4000, 4001, 17, 1], [8192, 8191, 8190, 129]):
        static.copy_(torch.tensor(new, dtype=torch.int32))
        g.replay()
        torch.testing.assert_close(graphed, op.decode(q, kc_, vc_, static, **kw), atol=0, rtol=0)


SINGLE = [(2, 4, 1, 37), (1, 8, 2, 70), (3, 2, 2, 5)]


@pytest.mark.parametrize("shape", SINGLE, ids=lambda s: "B{}-H{}x{}-S{}".format(*s))
def test_single_query_call_is_the_prefill(ops, shape, monkeypatch):
    """op(q, k, v) with one query row runs the decode kernel (issue 11's eager path): same result as the
    reference prefill, LSE included, in the prefill's layout; bad inputs get the prefill's messages."""
    B, Hq, Hkv, S = shape
    gen = torch.Generator().manual_seed(S)
    q = torch.randn(B, Hq, 1, 16, generator=gen).to(DEVICE)
    k, v = (torch.randn(B, Hkv, S, 16, generator=gen).to(DEVICE) for _ in range(2))
    op = ops["power"]
    monkeypatch.setattr(op.module, "forward", None)  # the prefill kernels must not run
    out, lse = op(q, k, v, return_lse=True)
    monkeypatch.undo()
    ro, rl = reference.attention(op.pattern, q.cpu(), k.cpu(), v.cpu(), return_lse=True)
    assert out.shape == q.shape and out.is_contiguous()
    torch.testing.assert_close(out.cpu().double(), ro, atol=1e-4, rtol=0)
    torch.testing.assert_close(lse.cpu().double(), rl, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="q and k must share the head dim"):
        op(q[..., :15].contiguous(), k, v)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_plans_fast_path_and_one_launch():
    """A repeated decode shape reuses its checked plan and compiled kernel (the eager fast path); a growing
    cache, a misaligned query view and B64 (no split) stay exact; a call is one kernel launch."""
    op = spdsl.build(spdsl.load(os.path.join(os.path.dirname(__file__), "..", "patterns", "power.spd")))
    gen = torch.Generator(device="cuda").manual_seed(3)
    rnd = lambda *s: torch.randn(*s, device="cuda", dtype=torch.bfloat16, generator=gen)
    Hq, Hkv, D = 32, 8, 128

    def check(q, kc, vc, lens):
        out = op.decode(q, kc, vc, lens)
        ro, _ = ref_decode(op.pattern, q.float(), kc.float(), vc.float(), lens, 1 / math.sqrt(D))
        err = ((out.cpu().double() - ro).norm() / ro.norm()).item()
        assert err < 1e-2, err

    for B, S in ((1, 4096), (1, 4100), (1, 4160), (2, 9000), (64, 600)):
        kc, vc = rnd(B, S, Hkv, D), rnd(B, S, Hkv, D)
        lens = torch.randint(S // 2, S + 1, (B,), dtype=torch.int32, device="cuda", generator=gen)
        for _ in range(2):  # the second call runs the plan's compiled kernel directly
            check(rnd(B, 1, Hq, D), kc, vc, lens)
    plans = len(op.module._DECODE_PLANS)
    check(rnd(B, 1, Hq, D), kc, vc, lens)
    assert len(op.module._DECODE_PLANS) == plans, "a seen shape must not build a new plan"
    misaligned = rnd(B * Hq * D + 1)[1:].view(B, 1, Hq, D)  # 2-byte aligned: its own specialization
    check(misaligned, kc, vc, lens)
    assert len(op.module._DECODE_PLANS) == plans + 1
    q1, k1, v1 = rnd(1, 1, Hq, D), rnd(1, 8192, Hkv, D), rnd(1, 8192, Hkv, D)
    lens1 = torch.full((1,), 8192, dtype=torch.int32, device="cuda")
    op.decode(q1, k1, v1, lens1)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        op.decode(q1, k1, v1, lens1)
        torch.cuda.synchronize()
    kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert len(kernels) == 1, kernels
    # op(q, k, v) with one query: the decode kernel, the prefill's result
    qh, kh, vh = q1.transpose(1, 2).contiguous(), k1.transpose(1, 2).contiguous(), v1.transpose(1, 2).contiguous()
    out, lse = op(qh, kh, vh, return_lse=True)
    ro, rl = reference.attention(op.pattern, qh.float().cpu(), kh.float().cpu(), vh.float().cpu(), return_lse=True)
    assert ((out.cpu().double() - ro).norm() / ro.norm()).item() < 1e-2
    torch.testing.assert_close(lse.cpu().double(), rl, atol=2e-2, rtol=0)
