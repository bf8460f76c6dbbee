"""Per-head patterns: ``spdsl.build([p0, p1, p2], heads=[...])`` against the fp64 reference computed
per head (:func:`spdsl.reference.attention_heads`).

The generated kernels run in the Triton interpreter (prefill, varlen, decode contiguous and paged,
the backward's dq / dk / dv); the blocked CPU backend runs without it. The patterns differ in unit
and causality, GQA groups mix patterns, lengths are odd, q_offset is explicit too. Then the checks on
``heads`` and what a single pattern keeps: the same op, module and kernels as before.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import spdsl
from spdsl import reference
from spdsl.codegen import BackwardConfig, BuildSpec, KernelConfig, render_module
from tests.helpers import scoped_env
from tests.strategies import n_examples, pattern_irs

POWER = spdsl.compile("pattern pw { unit 4 causal attend sink(1) | local(3) | powers(2) }")
BAND = spdsl.compile("pattern bd { unit 2 attend band(-2, 1) | every(5) }")  # bidirectional
STREAM = spdsl.compile("pattern st { unit 3 causal attend sink(1) | local(2) }")
PATTERNS = [POWER, BAND, STREAM]
#: GQA 3 (two kv heads): the first group mixes all three patterns, the second two of them
HEADS = [0, 2, 1, 1, 1, 0]
TILE = 16
BWD = BackwardConfig(
    tile_m=TILE, tile_n=TILE, dkdv_m=TILE, dkdv_n=TILE, dq_m=TILE, dq_n=TILE, dkdv_warps=4, dq_warps=4,
    dkdv_stages=1, dq_stages=1,
)  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def _interpreter(tmp_path_factory):
    """The whole module under TRITON_INTERPRET=1 with a private cache (CPU tensors run the kernels)."""
    with scoped_env(TRITON_INTERPRET="1", SPDSL_CACHE_DIR=str(tmp_path_factory.mktemp("spdsl_cache_heads"))):
        yield


@pytest.fixture(scope="module")
def op():
    return spdsl.build(PATTERNS, heads=HEADS, configs=[KernelConfig(TILE, TILE, 4, 1)], backward_configs=[BWD])


def inputs(B, Hq, Hkv, Sq, Skv, D=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Sq, D, generator=g).to(dtype)
    k, v = (torch.randn(B, Hkv, Skv, D, generator=g).to(dtype) for _ in range(2))
    return q, k, v, torch.randn(B, Hq, Sq, D, generator=g).to(dtype)


def assert_lse_close(lse, ref):
    assert torch.equal(torch.isinf(lse), torch.isinf(ref))
    fin = torch.isfinite(ref)
    torch.testing.assert_close(lse.double()[fin], ref[fin], atol=1e-4, rtol=1e-4)


def test_the_heads_really_differ():
    masks = [p.dense_mask(37, 45, q_offset=3) for p in PATTERNS]
    assert not torch.equal(masks[0], masks[1]) and not torch.equal(masks[0], masks[2])
    assert masks[1][0, 10] and not masks[0][0, 10], "band is bidirectional: a key after the query"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("q_offset", [None, 3, -4], ids=["default", "3", "-4"])
def test_prefill_matches_the_per_head_reference(op, dtype, q_offset):
    q, k, v, _ = inputs(2, 6, 2, 37, 45, dtype=dtype, seed=1)
    want, want_lse = reference.attention_heads(PATTERNS, HEADS, q, k, v, q_offset=q_offset, return_lse=True)
    out, lse = op(q, k, v, q_offset=q_offset, return_lse=True)
    tol = 1e-5 if dtype == torch.float32 else 4e-3
    torch.testing.assert_close(out.double(), want, atol=tol, rtol=0)
    assert_lse_close(lse, want_lse)


def test_every_head_of_one_group_may_use_a_different_pattern(op):
    """Hkv 1: one kv head serves all six query heads, under three patterns."""
    q, k, v, _ = inputs(1, 6, 1, 29, 29, seed=2)
    want = reference.attention_heads(PATTERNS, HEADS, q, k, v)
    torch.testing.assert_close(op(q, k, v).double(), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape", [(2, 6, 2, 37, 45, 3), (1, 6, 6, 33, 33, None), (1, 6, 3, 21, 50, None)])
def test_backward_matches_the_per_head_reference(op, shape):
    B, Hq, Hkv, Sq, Skv, q_offset = shape
    q, k, v, dout = inputs(B, Hq, Hkv, Sq, Skv, seed=3)
    heads = HEADS if Hkv != 6 else [2, 0, 1, 0, 2, 1]
    o = spdsl.build(PATTERNS, heads=heads, configs=[KernelConfig(TILE, TILE, 4, 1)], backward_configs=[BWD])
    got = [t.clone().requires_grad_() for t in (q, k, v)]
    w = torch.randn(B, Hq, Sq, generator=torch.Generator().manual_seed(4))
    out, lse = o(*got, q_offset=q_offset, return_lse=True)
    ((out * dout).sum() + (lse.nan_to_num(0, 0, 0) * w).sum()).backward()
    ref = [t.double().requires_grad_() for t in (q, k, v)]
    r_out, r_lse = reference.attention_heads(PATTERNS, heads, *ref, q_offset=q_offset, return_lse=True)
    ((r_out * dout.double()).sum() + (r_lse.nan_to_num(0, 0, 0) * w.double()).sum()).backward()
    for name, a, b in zip(("dq", "dk", "dv"), got, ref):
        scale = b.grad.abs().max().item()
        assert (a.grad.double() - b.grad).abs().max().item() <= 1e-4 * scale, name


def test_module_backward_takes_heads(op):
    q, k, v, dout = inputs(1, 6, 2, 19, 19, seed=5)
    out, lse = op.module.forward(q, k, v, heads=HEADS)
    dq, dk, dv = op.module.backward(dout, q, k, v, out, lse, heads=HEADS)
    ref = [t.double().requires_grad_() for t in (q, k, v)]
    (reference.attention_heads(PATTERNS, HEADS, *ref) * dout.double()).sum().backward()
    for a, b in zip((dq, dk, dv), ref):
        torch.testing.assert_close(a.double(), b.grad, atol=1e-4, rtol=0)


def to_paged(kc, vc, page, gen):
    B, S, H, D = kc.shape
    npg = -(-S // page)
    kc, vc = (torch.nn.functional.pad(t, (0, 0, 0, 0, 0, npg * page - S)) for t in (kc, vc))
    perm = torch.randperm(B * npg, generator=gen)
    kp, vp = torch.empty(B * npg, page, H, D), torch.empty(B * npg, page, H, D)
    kp[perm], vp[perm] = kc.reshape(B * npg, page, H, D), vc.reshape(B * npg, page, H, D)
    return kp, vp, perm.view(B, npg).to(torch.int32)


def ref_decode(q, kc, vc, seqlens):
    out = torch.zeros(q.shape, dtype=torch.float64)
    for b, n in enumerate(seqlens.tolist()):
        qb, kb, vb = q[b : b + 1].transpose(1, 2), kc[b : b + 1, :n].transpose(1, 2), vc[b : b + 1, :n].transpose(1, 2)
        out[b] = reference.attention_heads(PATTERNS, HEADS, qb, kb, vb)[0].transpose(0, 1)
    return out


@pytest.mark.parametrize("Sq", [1, 3])
def test_decode_contiguous_and_paged(op, Sq):
    gen = torch.Generator().manual_seed(6 + Sq)
    B, S, D = 3, 53, 16
    q = torch.randn(B, Sq, 6, D, generator=gen)
    kc, vc = (torch.randn(B, S, 2, D, generator=gen) for _ in range(2))
    seqlens = torch.tensor([5, S, 38], dtype=torch.int32)
    want = ref_decode(q, kc, vc, seqlens)
    out = op.decode(q, kc, vc, seqlens)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=0)
    kp, vp, bt = to_paged(kc, vc, 16, gen)
    assert torch.equal(op.decode(q, kp, vp, seqlens, block_table=bt), out), "paged equals contiguous bit for bit"


def test_decode_visits_the_tiles_of_every_pattern_of_a_group():
    """A group mixing a sink-only and a local-only pattern: their tiles do not overlap, so decode must
    take the union (group 0) and, for a group of one pattern, only that pattern's (group 1)."""
    sink = spdsl.compile("pattern sk { unit 4 causal attend sink(2) }")
    local = spdsl.compile("pattern lc { unit 5 causal attend local(2) }")
    heads = [0, 1, 1, 1]
    o = spdsl.build([sink, local], heads=heads, configs=[KernelConfig(TILE, TILE, 4, 1)], backward_configs=[BWD])
    gen = torch.Generator().manual_seed(13)
    q = torch.randn(2, 1, 4, 16, generator=gen)
    kc, vc = (torch.randn(2, 100, 2, 16, generator=gen) for _ in range(2))
    seqlens = torch.tensor([100, 61], dtype=torch.int32)
    out = o.decode(q, kc, vc, seqlens)
    for b, n in enumerate(seqlens.tolist()):
        qb, kb, vb = q[b : b + 1].transpose(1, 2), kc[b : b + 1, :n].transpose(1, 2), vc[b : b + 1, :n].transpose(1, 2)
        want = reference.attention_heads([sink, local], heads, qb, kb, vb)[0].transpose(0, 1)
        torch.testing.assert_close(out[b].double(), want, atol=1e-5, rtol=0)


def test_varlen_equals_per_sequence_calls(op):
    q, k, v, _ = inputs(1, 6, 2, 40, 40, seed=8)
    lens = [(17, 23), (23, 17)]
    cq = torch.tensor([0, 17, 40], dtype=torch.int32)
    ck = torch.tensor([0, 23, 40], dtype=torch.int32)
    packed = [t[0].transpose(0, 1).contiguous() for t in (q, k, v)]  # [T, H, D]
    out = op.varlen(*packed, cq, ck, 23, 23)
    for s, (lq, lk) in enumerate(lens):
        qs = packed[0][cq[s] : cq[s] + lq].transpose(0, 1)[None]
        ks, vs = (t[ck[s] : ck[s] + lk].transpose(0, 1)[None] for t in packed[1:])
        want = reference.attention_heads(PATTERNS, HEADS, qs, ks, vs)
        torch.testing.assert_close(out[cq[s] : cq[s] + lq].transpose(0, 1)[None].double(), want, atol=1e-5, rtol=0)


def test_the_cpu_backend_forward_backward_and_decode():
    """Without the interpreter the op runs the blocked PyTorch backend, a pattern at a time."""
    with scoped_env(TRITON_INTERPRET=None):
        op = spdsl.build(PATTERNS, heads=HEADS, block_m=TILE, block_n=TILE)
        assert not op.module.interpreting()
        q, k, v, dout = inputs(2, 6, 2, 30, 41, seed=9)
        got = [t.clone().requires_grad_() for t in (q, k, v)]
        out = op(*got, q_offset=5)
        (out * dout).sum().backward()
        ref = [t.double().requires_grad_() for t in (q, k, v)]
        want = reference.attention_heads(PATTERNS, HEADS, *ref, q_offset=5)
        (want * dout.double()).sum().backward()
        torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=0)
        for a, b in zip(got, ref):
            torch.testing.assert_close(a.grad.double(), b.grad, atol=1e-4, rtol=0)
        qd = torch.randn(2, 1, 6, 16)
        kc, vc = (torch.randn(2, 41, 2, 16) for _ in range(2))
        seqlens = torch.tensor([41, 9], dtype=torch.int32)
        torch.testing.assert_close(
            op.decode(qd, kc, vc, seqlens).double(), ref_decode(qd, kc, vc, seqlens), atol=1e-5, rtol=0
        )


def test_two_patterns_with_other_tiles_and_fp16(op):
    """A 2-pattern build (its own module) with 32 x 16 tiles, fp16."""
    cfg = KernelConfig(32, 16, 4, 1)
    two = spdsl.build([STREAM, POWER], heads=[1, 0, 0, 1], configs=[cfg], backward_configs=[BWD])
    q, k, v, _ = inputs(1, 4, 2, 41, 41, dtype=torch.float16, seed=10)
    want = reference.attention_heads([STREAM, POWER], [1, 0, 0, 1], q, k, v)
    torch.testing.assert_close(two(q, k, v).double(), want, atol=4e-3, rtol=0)


@st.composite
def cases(draw):
    """2 or 3 random patterns (each its own unit and causality), heads drawn per query head, GQA."""
    patterns = [spdsl.Pattern(p) for p in draw(st.lists(pattern_irs(max_depth=2), min_size=2, max_size=3))]
    Hkv, group = draw(st.sampled_from([(1, 3), (2, 2), (1, 4), (3, 1)]))
    heads = draw(st.lists(st.integers(0, len(patterns) - 1), min_size=Hkv * group, max_size=Hkv * group))
    Sq, Skv = draw(st.integers(1, 50)), draw(st.integers(1, 50))
    q_offset = draw(st.one_of(st.none(), st.integers(-30, 60)))
    return patterns, heads, (1, Hkv * group, Hkv, Sq, Skv), q_offset, draw(st.integers(0, 2**16))


def check_case(case):
    patterns, heads, shape, q_offset, seed = case
    o = spdsl.build(patterns, heads=heads, configs=[KernelConfig(TILE, TILE, 4, 1)], backward_configs=[BWD])
    q, k, v, dout = inputs(*shape, seed=seed)
    got = [t.clone().requires_grad_() for t in (q, k, v)]
    out = o(*got, q_offset=q_offset)
    (out * dout).sum().backward()
    ref = [t.double().requires_grad_() for t in (q, k, v)]
    want = reference.attention_heads(patterns, heads, *ref, q_offset=q_offset)
    (want * dout.double()).sum().backward()
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=0)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a.grad.double(), b.grad, atol=1e-4 * max(1.0, b.grad.abs().max().item()), rtol=0)


@settings(max_examples=n_examples(6), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_random_patterns_and_heads_forward_and_backward(case):
    check_case(case)


@pytest.mark.slow
@settings(max_examples=n_examples(60), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_random_patterns_and_heads_thorough(case):
    check_case(case)


# --------------------------------------------------------------------------------------------
# heads: checks, and what stays as it was


def test_ops_of_one_set_of_patterns_share_the_module(op):
    other = spdsl.build(PATTERNS, heads=[2] * 6, configs=[KernelConfig(TILE, TILE, 4, 1)], backward_configs=[BWD])
    assert other.module is op.module and other is not op and other.op_name != op.op_name
    assert op.heads == tuple(HEADS) and op.patterns == tuple(PATTERNS) and op.pattern is None
    assert spdsl.build(PATTERNS, heads=HEADS, configs=[KernelConfig(TILE, TILE, 4, 1)], backward_configs=[BWD]) is op


def test_one_pattern_with_heads_is_the_plain_op():
    plain = spdsl.build(POWER, block_m=TILE, block_n=TILE)
    assert spdsl.build([POWER], heads=[0] * 4, block_m=TILE, block_n=TILE) is plain
    assert spdsl.build(POWER, heads=[0, 0], block_m=TILE, block_n=TILE) is plain
    assert plain.pattern is POWER and plain.heads is None


def test_bad_heads_are_refused_with_a_hint(op):
    with pytest.raises(ValueError, match="2 patterns but no heads: pass heads="):
        spdsl.build([POWER, BAND])
    with pytest.raises(
        ValueError, match=r"heads holds \[2, 5\], but there are 2 pattern\(s\): indices run from 0 to 1"
    ):
        spdsl.build([POWER, BAND], heads=[0, 1, 2, 5])
    with pytest.raises(ValueError, match="the only pattern is 0"):
        spdsl.build(POWER, heads=[0, 1])
    with pytest.raises(TypeError, match="heads must hold ints"):
        spdsl.build([POWER, BAND], heads=[0, 1.0])
    with pytest.raises(TypeError, match="heads must be a sequence of ints"):
        spdsl.build([POWER, BAND], heads=3)
    with pytest.raises(ValueError, match="heads is empty"):
        spdsl.build([POWER, BAND], heads=[])
    with pytest.raises(ValueError, match="empty list of patterns"):
        spdsl.build([], heads=[0])
    q, k, v, _ = inputs(1, 4, 2, 8, 8)
    with pytest.raises(ValueError, match="built with heads of length 6, but q has 4 heads"):
        op(q, k, v)
    with pytest.raises(ValueError, match="heads has 6 entries but q has 4 heads"):  # the module's own check
        op.decode(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), torch.tensor([8], dtype=torch.int32))
    with pytest.raises(ValueError, match="pass heads=\\[pattern index"):
        op.module.forward(q, k, v)
    with pytest.raises(ValueError, match="heads has 3 entries but q has 4 heads"):
        op.module.forward(q, k, v, heads=[0, 1, 2])
    with pytest.raises(ValueError, match=r"heads holds \[3\]"):
        op.module.forward(q, k, v, heads=[0, 1, 2, 3])


def test_a_single_patterns_module_has_no_per_head_code_in_its_kernels():
    single = render_module(BuildSpec(POWER.ir, POWER.source))
    multi = render_module(BuildSpec((POWER.ir, BAND.ir), POWER.source + "\n" + BAND.source))
    assert "HEAD_PATTERN" not in single and "_keep_0" not in single and "crow" not in _kernel(single, "_attn_fwd")
    assert "HEAD_PATTERN" in _kernel(multi, "_attn_fwd") and "UNIT_0 = tl.constexpr(4)" in multi
    assert "UNIT_1 = tl.constexpr(2)" in multi and "PATTERNS = (" in multi


def test_a_per_head_module_defines_every_name_it_uses():
    from tests.test_codegen import EVERY_OP, undefined_globals

    every = spdsl.compile(EVERY_OP)
    text = render_module(BuildSpec((POWER.ir, every.ir, BAND.ir), ""))
    assert undefined_globals(text) == set()
    assert text.count("def _keep_t_") == 3 and "def _tiles_visible(" in text


def _kernel(text: str, name: str) -> str:
    start = text.index(f"def {name}(")
    return text[start : text.index("\n@triton.jit", start)]


def test_the_scale_argument_reaches_every_head(op):
    q, k, v, _ = inputs(1, 6, 2, 20, 20, seed=11)
    want = reference.attention_heads(PATTERNS, HEADS, q, k, v, scale=0.5 / math.sqrt(16))
    torch.testing.assert_close(op(q, k, v, scale=0.5 / math.sqrt(16)).double(), want, atol=1e-5, rtol=0)


def test_torch_compile_fullgraph_forward_backward_and_decode():
    """The per-head op's custom ops (heads bound in them) trace with fullgraph=True: CPU backend."""
    torch._dynamo.reset()
    with scoped_env(TRITON_INTERPRET=None):
        op = spdsl.build(PATTERNS, heads=HEADS, block_m=TILE, block_n=TILE)
        q, k, v, dout = inputs(1, 6, 2, 23, 23, seed=12)

        def loss(q, k, v):
            out, lse = op(q, k, v, return_lse=True)
            return (out * dout).sum() + lse.nan_to_num(0, 0, 0).sum()

        got = [t.clone().requires_grad_() for t in (q, k, v)]
        torch.compile(loss, fullgraph=True, backend="aot_eager")(*got).backward()
        want = [t.clone().requires_grad_() for t in (q, k, v)]
        loss(*want).backward()
        for a, b in zip(got, want):
            torch.testing.assert_close(a.grad, b.grad)
        qd, kc, vc = q[:, :, :1].transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        lens = torch.tensor([23], dtype=torch.int32)
        compiled = torch.compile(lambda *a: op.decode(*a) * 2, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(qd, kc, vc, lens), op.decode(qd, kc, vc, lens) * 2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="gpu: CUDA is not available")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_gpu_per_head_equals_each_pattern_alone(dtype):
    """On CUDA (compiled kernels, one fixed config): each head of a per-head op gives what its pattern's
    own op gives on that head, for prefill (odd lengths), the backward and decode (paged too)."""
    from spdsl.resources import pattern_path

    pats = [
        spdsl.load(pattern_path("power")),
        spdsl.compile("pattern s64 { unit 64 causal attend sink(1) | local(5) }"),
    ]
    heads, cfg = [0, 1, 1, 0, 1, 1, 1, 0], dict(block_m=128, block_n=128, num_warps=8, num_stages=2)
    tol = dict(atol=2e-2, rtol=2e-2)  # the same tiles in the same order; sums over heads and splits may round apart
    with scoped_env(TRITON_INTERPRET=None):
        multi = spdsl.build(pats, heads=heads, **cfg)
        singles = [spdsl.build(p, **cfg) for p in pats]
        g = torch.Generator(device="cuda").manual_seed(0)
        q = torch.randn(1, 8, 3001, 128, device="cuda", dtype=dtype, generator=g, requires_grad=True)
        k, v = (torch.randn(1, 2, 5003, 128, device="cuda", dtype=dtype, generator=g, requires_grad=True) for _ in "kv")
        dout = torch.randn_like(q)
        out = multi(q, k, v)
        grads = torch.autograd.grad(out, (q, k, v), dout)
        want_dk, want_dv = torch.zeros_like(k, dtype=torch.float32), torch.zeros_like(v, dtype=torch.float32)
        for i, single in enumerate(singles):
            qi = torch.tensor([h for h, j in enumerate(heads) if j == i], device="cuda")
            sub = [t.detach().index_select(1, idx).requires_grad_() for t, idx in ((q, qi), (k, qi // 4), (v, qi // 4))]
            o = single(*sub)
            torch.testing.assert_close(out[:, qi], o, **tol)
            dq, dk, dv = torch.autograd.grad(o, sub, dout[:, qi])
            torch.testing.assert_close(grads[0][:, qi], dq, **tol)
            want_dk.index_add_(1, qi // 4, dk.float())
            want_dv.index_add_(1, qi // 4, dv.float())
        torch.testing.assert_close(grads[1].float(), want_dk, **tol)  # a group adds up heads of both patterns
        torch.testing.assert_close(grads[2].float(), want_dv, **tol)
        kc, vc = (t.detach().transpose(1, 2).contiguous() for t in (k, v))  # [B, S, Hkv, D]
        qd = q.detach()[:, :, -1:].transpose(1, 2).contiguous()
        lens = torch.tensor([5003], dtype=torch.int32, device="cuda")
        od = multi.decode(qd, kc, vc, lens)
        kp, vp, bt = to_paged(kc[0:1].cpu().float(), vc[0:1].cpu().float(), 64, torch.Generator().manual_seed(1))
        paged = multi.decode(qd, kp.to(kc), vp.to(vc), lens, block_table=bt.cuda())
        torch.testing.assert_close(paged, od, atol=0, rtol=0)
        for i, single in enumerate(singles):
            qi = torch.tensor([h for h, j in enumerate(heads) if j == i], device="cuda")
            want = single.decode(qd.index_select(2, qi), kc.index_select(2, qi // 4), vc.index_select(2, qi // 4), lens)
            torch.testing.assert_close(od[:, :, qi], want, **tol)


def test_per_head_patterns_with_score_or_select_are_refused():
    massive = spdsl.compile("pattern m { unit 4 causal attend local(1) select all }")
    with pytest.raises(ValueError, match=r"score/select lines yet \(m\)"):
        spdsl.build([POWER, massive], heads=[0, 1])
