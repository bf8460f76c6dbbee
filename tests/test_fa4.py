"""The FA4 backend on the CPU: block lists equal the Triton layout's, the emitted CuTe mask parses and
(run through tests/cute_shim.py) equals the dense mask, and backend selection falls back cleanly.

GPU tests at the end run only with CUDA, a Hopper+ GPU and flash_attn.cute installed.
"""

from __future__ import annotations

import ast
import json

import pytest
import torch

import spdsl
from spdsl import backend as backend_mod
from spdsl import runtime
from spdsl.codegen.cute import check_source, mask_source
from spdsl.integrations import fa4
from tests.conftest import ROOT
from tests.cute_shim import run_mask

PATTERNS = sorted(p.stem for p in (ROOT / "patterns").glob("*.spd"))
# (q_len, kv_len, q_offset): odd lengths, the default offset, explicit ones, q_len > kv_len (negative positions)
SHAPES = [(77, 77, None), (45, 131, None), (64, 200, 17), (150, 90, None), (33, 70, -5)]


def _pattern(name: str, unit: int | None = None):
    # units scaled down so the small shapes cut through many units
    text = (ROOT / "patterns" / f"{name}.spd").read_text()
    p = spdsl.compile(text)
    return spdsl.compile(text.replace(f"unit {p.unit}", "unit 4")) if unit is None and p.unit > 4 else p


def _rows_of(num, idx):
    return [sorted(idx[0, 0, r, : num[0, 0, r]].tolist()) for r in range(num.shape[2])]


@pytest.mark.parametrize("name", PATTERNS)
@pytest.mark.parametrize("shape", SHAPES)
def test_block_lists_equal_the_layout(name, shape):
    q_len, kv_len, off = shape
    lay = _pattern(name).layout(q_len, kv_len, 16, 16, q_offset=off)
    fwd, bwd = fa4.block_lists(lay)
    for lists, (ptr, idx, full) in ((fwd, (lay.kv_ptr, lay.kv_idx, lay.kv_full)), (bwd, lay.kv_major())):
        assert all(t.dtype == torch.int32 for t in lists.tensors())
        want_p = [sorted(idx[ptr[r] : ptr[r + 1]][~full[ptr[r] : ptr[r + 1]]].tolist()) for r in range(ptr.numel() - 1)]
        want_f = [sorted(idx[ptr[r] : ptr[r + 1]][full[ptr[r] : ptr[r + 1]]].tolist()) for r in range(ptr.numel() - 1)]
        assert _rows_of(lists.partial_cnt, lists.partial_idx) == want_p
        assert _rows_of(lists.full_cnt, lists.full_idx) == want_f
        # rows stay ascending as stored (FA4 walks them in order); widths are compact
        for num, ix in ((lists.partial_cnt, lists.partial_idx), (lists.full_cnt, lists.full_idx)):
            assert ix.shape[-1] == max(int(num.max()), 1)
            for r in range(num.shape[2]):
                row = ix[0, 0, r, : num[0, 0, r]].tolist()
                assert row == sorted(row)
    grid = lay.tile_grid()  # the dense tile grid, small here: the lists cover exactly its nonzeros
    assert int((grid == 1).sum()) == int(fwd.partial_cnt.sum()) == int(bwd.partial_cnt.sum())
    assert int((grid == 2).sum()) == int(fwd.full_cnt.sum()) == int(bwd.full_cnt.sum())


def test_block_lists_shipped_units_at_fa4_blocks():
    lay = spdsl.load(ROOT / "patterns" / "power.spd").layout(4097, 4097, *fa4.BLOCK)
    fwd, bwd = fa4.block_lists(lay)
    assert fwd.partial_idx.shape[2] == lay.n_q_tiles and bwd.partial_idx.shape[2] == lay.n_kv_tiles
    assert fwd.full_idx.shape[-1] < lay.n_kv_tiles  # compact, not [n_q_tiles, n_kv_tiles]
    assert int(fwd.partial_cnt.sum() + fwd.full_cnt.sum()) == lay.nnz


@pytest.mark.parametrize("name", PATTERNS)
@pytest.mark.parametrize("shape", SHAPES)
def test_emitted_mask_equals_dense_mask(name, shape, monkeypatch):
    q_len, kv_len, off = shape
    p = _pattern(name)
    src = mask_source(p.ir, off)
    ast.parse(src)
    got = run_mask(src, q_len, kv_len, monkeypatch)
    assert torch.equal(got, p.dense_mask(q_len, kv_len, q_offset=off))


def test_emitted_mask_shipped_units(monkeypatch):
    for name in PATTERNS:
        p = spdsl.load(ROOT / "patterns" / f"{name}.spd")
        got = run_mask(mask_source(p.ir), 700, 1300, monkeypatch)
        assert torch.equal(got, p.dense_mask(700, 1300)), name


@pytest.mark.parametrize("base", [2, 3])
def test_emitted_floor_pow_over_the_int32_range(base, monkeypatch):
    # base 2 is a bit smear, other bases a chain: both equal the IR's floor_pow from x <= 0 to 2**31 - 1
    from spdsl.core.ir import TorchOps
    from tests.cute_shim import installed, ints

    text = f"pattern p() {{ unit 1\n causal\n attend powers({base}) }}"
    src = mask_source(spdsl.compile(text).ir)
    x = torch.cat([torch.arange(-5, 5000), torch.tensor([base**k + d for k in range(1, 20) for d in (-1, 0, 1)])])
    x = torch.cat([x, torch.tensor([2**30 - 1, 2**30, 2**30 + 1, 2**31 - 1])])
    x = x[x < 2**31]
    with installed(monkeypatch):
        ns: dict = {}
        exec(compile(src, "<emitted cute mask>", "exec"), ns)
        got = torch.as_tensor(ns[f"_floor_pow{base}"](ints(x))).as_subclass(torch.Tensor)
    assert torch.equal(got, torch.as_tensor(TorchOps.floor_pow(x, base)))


def test_emitted_source_is_checked():
    src = mask_source(spdsl.load(ROOT / "patterns" / "power.spd").ir, q_offset=3)
    assert not [n for n in ast.walk(ast.parse(src)) if isinstance(n, ast.Mod)]  # CuTe's % truncates
    assert "def mask_mod(b_idx, h_idx, q_idx, kv_idx, seqlen_info, aux_tensors):" in src
    hashes = {line for s in (src, mask_source(spdsl.load(ROOT / "patterns" / "power.spd").ir)) for line in
              s.splitlines() if line.startswith("mask_mod.__cute_hash__")}  # fmt: skip
    assert len(hashes) == 2  # FA4's compile cache key changes with the emitted text
    with pytest.raises(ValueError, match="unknown name"):
        check_source(src + "\nx = os.system\n")
    with pytest.raises(ValueError, match="non-integer"):
        check_source(src + "\nx = 1.5\n")
    with pytest.raises(ValueError):
        mask_source(spdsl.load(ROOT / "patterns" / "power.spd").ir, q_offset="1; import os")


def test_fa4_backend_without_fa4_is_a_clear_error(monkeypatch):
    p = spdsl.compile("pattern w() { causal attend local(16) }")
    monkeypatch.setattr(fa4, "unavailable", lambda device=None: "flash_attn.cute does not import (ImportError)")
    with pytest.raises(RuntimeError, match=r"backend='fa4' is unavailable.*pip install 'spdsl\[fa4\]'.*sm90"):
        spdsl.build(p, backend="fa4")
    with pytest.raises(ValueError, match="backend must be one of"):
        spdsl.build(p, backend="cuda")


def test_unavailable_on_cpu():
    assert "CUDA" in fa4.unavailable("cpu")


def test_auto_falls_back_to_triton_without_fa4(tmp_path, monkeypatch):
    monkeypatch.setenv("SPDSL_CACHE_DIR", str(tmp_path))
    p = spdsl.compile("pattern w() { causal attend local(16) }")
    op = spdsl.build(p, backend="auto")
    q = k = v = torch.randn(1, 2, 40, 16)
    assert op.choose(q, k, v) == "triton"
    ref = spdsl.reference.attention(p, q, k, v)
    assert (op(q, k, v).double() - ref).abs().max() < 1e-5
    assert op.varlen == op.triton.varlen and op.pattern is op.triton.pattern
    assert not backend_mod.choices_path().exists()  # nothing measured


def test_auto_measures_once_and_caches_on_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("SPDSL_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(fa4, "unavailable", lambda device=None: None)  # pretend FA4 runs here
    monkeypatch.setattr(runtime, "_OPS", {})
    calls = []
    monkeypatch.setattr(fa4, "attention", lambda ir, q, *a: calls.append("fa4") or torch.zeros_like(q))
    speed = {"triton": 2.0, "fa4": 1.0}

    def fake_timer(fn):  # which backend fn runs: look at what it calls
        before = len(calls)
        fn()
        return speed["fa4" if len(calls) > before else "triton"]

    p = spdsl.compile("pattern w() { causal attend local(16) }")
    op = backend_mod.AutoAttention(spdsl.build(p), timer=fake_timer)
    q = k = v = torch.randn(1, 2, 40, 16)
    assert op.choose(q, k, v) == "fa4"
    data = json.loads(backend_mod.choices_path().read_text())
    (key,) = data
    assert data[key] == "fa4" and "float32" in key and "q64_kv64_d16_g1" in key
    speed.update(triton=0.5)  # cached: not measured again
    assert op.choose(q, k, v) == "fa4"
    assert op.choose(torch.randn(1, 2, 300, 16), *(torch.randn(1, 2, 300, 16),) * 2) == "triton"  # new bucket
    assert len(json.loads(backend_mod.choices_path().read_text())) == 2
    assert not list(tmp_path.glob("*.tmp*"))
    reads = []
    monkeypatch.setattr(backend_mod, "load_choices", lambda path: reads.append(path) or {})
    assert op.choose(q, k, v) == "fa4" and reads == []  # a seen bucket: no file read on the call path
    fresh = backend_mod.AutoAttention(op.triton, timer=fake_timer)
    assert fresh.choose(q, k, v) in ("triton", "fa4") and reads  # another op reads (here: an empty) file


def test_pick_skips_a_failing_candidate(tmp_path):
    def boom():
        raise RuntimeError("shape not supported")

    path = tmp_path / "c.json"
    assert backend_mod.pick("k", {"fa4": boom, "triton": lambda: None}, lambda fn: fn() or 1.0, path) == "triton"
    path.write_text("not json")  # a corrupt file is ignored and replaced
    assert backend_mod.pick("k2", {"triton": lambda: None}, lambda fn: 1.0, path) == "triton"
    assert json.loads(path.read_text()) == {"k2": "triton"}


def _fa4_ready() -> bool:
    return torch.cuda.is_available() and fa4.unavailable() is None


gpu_fa4 = pytest.mark.skipif(not torch.cuda.is_available() or not _fa4_ready(), reason="needs CUDA sm90+ and FA4")


@pytest.mark.gpu
@gpu_fa4
@pytest.mark.parametrize("name", PATTERNS)
@pytest.mark.parametrize(("q_len", "kv_len", "off", "hq", "hkv"), [(1000, 1000, None, 4, 4), (333, 1111, None, 8, 2),
                                                                  (515, 700, 60, 4, 1)])  # fmt: skip
def test_gpu_fa4_matches_reference(name, q_len, kv_len, off, hq, hkv):
    p = spdsl.load(ROOT / "patterns" / f"{name}.spd")
    op = spdsl.build(p, backend="fa4")
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(2, hq, q_len, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    k, v = (torch.randn(2, hkv, kv_len, 128, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    ref = spdsl.reference.attention(p, q.double(), k.double(), v.double(), q_offset=off)
    out, lse = op(q, k, v, q_offset=off, return_lse=True)
    assert torch.isfinite(out).all()
    assert (out.double() - ref).abs().max() < 2e-2
    visible = p.dense_mask(q_len, kv_len, q_offset=off).any(1).cuda()
    assert (out[:, :, ~visible] == 0).all()  # empty rows are zeros, not NaN
    assert torch.isneginf(lse[:, :, ~visible]).all() and torch.isfinite(lse[:, :, visible]).all()


@pytest.mark.gpu
@gpu_fa4
def test_gpu_fa4_backward_matches_triton():
    p = spdsl.load(ROOT / "patterns" / "power.spd")
    g = torch.Generator(device="cuda").manual_seed(1)
    q, k, v = (torch.randn(1, 4, 2048, 128, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    grads = []
    for be in ("fa4", "triton"):
        x = [t.clone().requires_grad_() for t in (q, k, v)]
        spdsl.build(p, backend=be)(*x).float().square().sum().backward()
        grads.append([t.grad.float() for t in x])
    for a, b in zip(*grads):
        assert ((a - b).norm() / b.norm()) < 2e-2


def _fake_flash_attn(monkeypatch, seen: dict):
    """A CPU stand-in for ``flash_attn.cute.flash_attn_func``: builds the mask FA4 would apply from
    the block lists it is given (full blocks: all kept; partial: the emitted mask_mod, through the
    shim) and runs dense attention on it, in FA4's [B, S, H, D] layout with GQA."""
    import types
    from collections import namedtuple

    from tests.cute_shim import ints

    fields = "mask_block_cnt mask_block_idx full_block_cnt full_block_idx block_size"
    Bst = namedtuple("BlockSparseTensorsTorch", fields)
    Bst.__new__.__defaults__ = (None,)

    def flash_attn_func(q, k, v, *, softmax_scale, mask_mod=None, block_sparse_tensors=None,
                        block_sparse_tensors_bwd=None, causal=False, **kw):  # fmt: skip
        seen.update(kw, bwd=block_sparse_tensors_bwd, fwd=block_sparse_tensors, causal=causal)
        Sq, Hq, Skv = q.shape[1], q.shape[2], k.shape[1]
        keep = torch.ones(Sq, Skv, dtype=torch.bool)
        if causal:  # FA4's causal: bottom-right aligned
            keep = torch.arange(Skv)[None, :] <= torch.arange(Sq)[:, None] + (Skv - Sq)
        cnt = torch.zeros(1, 1, 0, dtype=torch.int32)
        if block_sparse_tensors is not None:
            bq, bk = block_sparse_tensors.block_size
            keep = torch.zeros(Sq, Skv, dtype=torch.bool)
            cnt, idx, fcnt, fidx = block_sparse_tensors[:4]
        info = types.SimpleNamespace(seqlen_q=Sq, seqlen_k=Skv)
        for r in range(cnt.shape[2]):
            rows = slice(r * bq, min((r + 1) * bq, Sq))
            for j in fidx[0, 0, r, : fcnt[0, 0, r]].tolist():
                keep[rows, j * bk : (j + 1) * bk] = True
            for j in idx[0, 0, r, : cnt[0, 0, r]].tolist():
                qi, ki = torch.arange(Sq)[rows, None], torch.arange(Skv)[None, j * bk : (j + 1) * bk]
                m = mask_mod(ints(0), ints(0), ints(qi), ints(ki), info, None)
                keep[rows, j * bk : (j + 1) * bk] = torch.broadcast_to(torch.as_tensor(m), (qi.shape[0], ki.shape[1]))
        rep = Hq // k.shape[2]
        qh, kh, vh = (t.transpose(1, 2).double() for t in (q, k, v))
        kh, vh = kh.repeat_interleave(rep, 1), vh.repeat_interleave(rep, 1)
        s = (qh @ kh.transpose(-1, -2) * softmax_scale).masked_fill(~keep, float("-inf"))
        out = torch.softmax(s, -1).nan_to_num(0.0) @ vh
        return out.transpose(1, 2).to(q.dtype), torch.logsumexp(s, -1)

    bs = types.ModuleType("flash_attn.cute.block_sparsity")
    bs.BlockSparseTensorsTorch = Bst
    monkeypatch.setitem(__import__("sys").modules, "flash_attn.cute.block_sparsity", bs)
    return flash_attn_func


def _run_on_fake_fa4(p, hq, hkv, q_len, kv_len, off, seed, tmp_path, monkeypatch, return_lse=False):
    """``fa4.attention`` of pattern ``p`` on random inputs with FA4 replaced by the CPU stand-in:
    ``(q, k, v, result, seen)`` (``seen``: what the stand-in was called with)."""
    from tests.cute_shim import installed

    monkeypatch.setenv("SPDSL_CACHE_DIR", str(tmp_path))
    seen: dict = {}
    with installed(monkeypatch):
        fake = _fake_flash_attn(monkeypatch, seen)
        monkeypatch.setattr(__import__("sys").modules["flash_attn.cute"], "flash_attn_func", fake, raising=False)
        monkeypatch.setattr(fa4, "unavailable", lambda device=None: None)
        fa4.mask_mod.cache_clear()
        try:
            g = torch.Generator().manual_seed(seed)
            q = torch.randn(1, hq, q_len, 16, generator=g)
            k, v = (torch.randn(1, hkv, kv_len, 16, generator=g) for _ in range(2))
            res = fa4.attention(p.ir, q, k, v, 0.25, off, return_lse=return_lse)
        finally:
            fa4.mask_mod.cache_clear()
    return q, k, v, res, seen


@pytest.mark.parametrize("name", ["power", "longnet", "stride_slash", "dilated"])
@pytest.mark.parametrize(("q_len", "kv_len", "off", "hq", "hkv"), [(300, 300, None, 2, 2), (130, 389, None, 4, 2),
                                                                  (200, 260, 33, 2, 1)])  # fmt: skip
def test_fa4_call_path_on_a_fake_fa4(name, q_len, kv_len, off, hq, hkv, tmp_path, monkeypatch):
    """The whole FA4 path (block lists at FA4's 128 blocks, emitted mask, layouts, GQA, q_offset)
    against the fp64 reference, with FA4 itself replaced by tests' CPU stand-in."""
    p = _pattern(name)
    q, k, v, (out, lse), seen = _run_on_fake_fa4(p, hq, hkv, q_len, kv_len, off, 0, tmp_path, monkeypatch, True)
    ref = spdsl.reference.attention(p, q.double(), k.double(), v.double(), scale=0.25, q_offset=off)
    assert out.shape == q.shape and lse.shape == q.shape[:3]
    assert (out.double() - ref).abs().max() < 1e-5
    assert seen["fwd"] is not None and not seen["causal"]  # a sparse pattern: block lists and the mask
    fwd_pairs = {(r, j) for r, row in enumerate(_rows_of(seen["fwd"][0], seen["fwd"][1])) for j in row}
    bwd_pairs = {(j, r) for r, row in enumerate(_rows_of(seen["bwd"][0], seen["bwd"][1])) for j in row}
    assert fwd_pairs == bwd_pairs and seen["bwd"].block_size == fa4.BLOCK == seen["fwd"].block_size


DENSE_CASES = [(300, 300, None, True), (130, 389, None, True), (389, 130, None, False), (200, 260, 33, False)]


@pytest.mark.parametrize(("q_len", "kv_len", "off", "dense"), DENSE_CASES)
def test_fa4_dense_causal_runs_fa4s_own_causal_kernel(q_len, kv_len, off, dense, tmp_path, monkeypatch):
    """causal.spd (attend all) calls FA4 with causal=True and no block lists where FA4's bottom-right
    alignment is spdsl's; otherwise (an explicit offset, empty rows) the block-sparse path."""
    p = spdsl.load(ROOT / "patterns" / "causal.spd")
    q, k, v, out, seen = _run_on_fake_fa4(p, 4, 2, q_len, kv_len, off, 1, tmp_path, monkeypatch)
    ref = spdsl.reference.attention(p, q.double(), k.double(), v.double(), scale=0.25, q_offset=off)
    assert (out.double() - ref).abs().max() < 1e-5
    assert seen["causal"] is dense and (seen["fwd"] is None) is dense


def test_fa4_calls_get_the_triton_ops_input_checks(monkeypatch):
    """backend='fa4' validates as the Triton op does (one front, SparseAttention.checked) before FA4."""
    op = spdsl.build(spdsl.load(ROOT / "patterns" / "power.spd"))
    seen = []
    monkeypatch.setattr(fa4, "attention", lambda ir, q, k, v, scale, off, lse: seen.append((q.dtype, scale, off)))
    wrapped = backend_mod.FA4Attention(op)
    q, k = torch.randn(1, 4, 32, 64), torch.randn(1, 2, 40, 64)
    with pytest.raises(ValueError, match="head dim"):
        wrapped(q, torch.randn(1, 2, 40, 32), torch.randn(1, 2, 40, 32))
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        wrapped(q.long(), k, k)
    with pytest.raises((TypeError, ValueError), match="q_offset"):
        wrapped(q, k, k, q_offset=1.5)
    wrapped(q, k, k, q_offset=5)
    assert seen == [(torch.float32, 0.125, 5)]  # checks passed, the scale resolved: FA4 called once
