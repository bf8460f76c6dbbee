"""Decode benchmark: spdsl sparse decode vs FlexAttention decode, Triton and FLASH backends (identical layout), vs dense FA4 / SDPA.

    python benchmarks/decode.py        # Hq32 Hkv8 D128 bf16; power + streaming; B8 at 32K/128K, B1/B64 at 32K; paged too

Correctness first (fp32 reference on the GPU, paged vs contiguous, CUDA-graph replay with
changing cache_seqlens), then triton.testing.do_bench medians in one process, each peer timed
twice: eagerly (``*_eager_ms``: includes Python launch overhead, which dominates at these sizes)
and replayed from a CUDA graph of 20 calls (``*_ms``: the GPU time, as served decoding runs it). The floor is the
K/V bytes of the tiles the pattern keeps divided by the device copy bandwidth measured here.
Writes benchmarks/results/decode.json (or --out).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import spdsl  # noqa: E402
from benchmarks import peers  # noqa: E402
from benchmarks.common import bench, cell, write_results  # noqa: E402
from spdsl.core.ir import TorchOps  # noqa: E402

CASES = [(8, 32768), (8, 131072), (1, 32768), (64, 32768)]


def bench_graph(fn, calls: int = 20) -> float:
    """Per-call time of ``fn`` replayed from a CUDA graph holding ``calls`` calls (no host overhead)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    return bench(g.replay) / calls


def timed(row, key, fn):
    """Eager and CUDA-graph medians of one peer; errors are recorded, not fatal."""
    try:
        row[key + "_eager_ms"] = bench(fn)
        row[key + "_ms"] = bench_graph(fn)
    except Exception as e:
        row.setdefault(key + "_ms", None)
        row[key + "_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    return row[key + "_ms"]


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second."""
    x = torch.empty(2 * 1024**3 // 2, dtype=torch.bfloat16, device="cuda").normal_()
    y = torch.empty_like(x)
    ms = bench(lambda: y.copy_(x))
    return 2 * x.numel() * x.element_size() / (ms * 1e-3)


def reference(pattern, q, kc, vc, seqlens, scale):
    """fp32 decode for Sq query rows per sequence (positions seqlen - Sq + j)."""
    B, Sq, Hq, D = q.shape
    Hkv = kc.shape[2]
    out = torch.empty(B, Sq, Hq, D, device=q.device)
    for b, n in enumerate(seqlens.tolist()):
        k = kc[b, :n].float().transpose(0, 1).repeat_interleave(Hq // Hkv, 0)
        v = vc[b, :n].float().transpose(0, 1).repeat_interleave(Hq // Hkv, 0)
        p = torch.arange(n - Sq, n, device=q.device)[:, None]
        kk = torch.arange(n, device=q.device)[None, :]
        m = torch.as_tensor(pattern.ir.expr.keep(TorchOps, p // pattern.unit, kk // pattern.unit))
        if pattern.causal:
            m = m & (kk <= p)
        s = (q[b].float().transpose(0, 1) @ k.transpose(-1, -2)) * scale
        out[b] = (torch.softmax(s.masked_fill(~m, float("-inf")), -1).nan_to_num(0.0) @ v).transpose(0, 1)
    return out


def rel_err(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def paged_copy(kc, vc, page):
    B, S, H, D = kc.shape
    npg = S // page
    perm = torch.randperm(B * npg, device=kc.device)
    kp = torch.empty(B * npg, page, H, D, dtype=kc.dtype, device=kc.device)
    vp = torch.empty_like(kp)
    kp[perm] = kc.reshape(B * npg, page, H, D)
    vp[perm] = vc.reshape(B * npg, page, H, D)
    return kp, vp, perm.view(B, npg).to(torch.int32)


def graph_check(op, q, kc, vc, seqlens) -> float:
    """Capture op.decode in a CUDA graph, replay with new cache_seqlens, compare to eager."""
    static_len = seqlens.clone()
    op.decode(q, kc, vc, static_len)  # compile outside the capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = op.decode(q, kc, vc, static_len)
    worst = 0.0
    for shrink in (1, 7, 1000):
        static_len.copy_(
            torch.clamp(
                seqlens - shrink * torch.arange(1, seqlens.numel() + 1, device=q.device, dtype=torch.int32), min=1
            )
        )
        g.replay()
        torch.cuda.synchronize()
        worst = max(worst, rel_err(out, op.decode(q, kc, vc, static_len)))
    return worst


def run(name, B, seq, paged, args, bw, rows):
    pattern = spdsl.load(ROOT / "patterns" / f"{name}.spd")
    Hq, Hkv, D = args.q_heads, args.kv_heads, args.head_dim
    dtype = getattr(torch, args.dtype)
    scale = 1.0 / math.sqrt(D)
    g = torch.Generator(device="cuda").manual_seed(seq + B)
    q = torch.randn(B, 1, Hq, D, device="cuda", dtype=dtype, generator=g)
    kc = torch.randn(B, seq, Hkv, D, device="cuda", dtype=dtype, generator=g)
    vc = torch.randn(B, seq, Hkv, D, device="cuda", dtype=dtype, generator=g)
    seqlens = torch.full((B,), seq, dtype=torch.int32, device="cuda")
    op = spdsl.build(pattern)
    row = {"pattern": name, "seq": seq, "batch": B, "q_heads": Hq, "kv_heads": Hkv, "head_dim": D, "paged": paged}
    kargs = {}
    if paged:
        kp, vp, bt = paged_copy(kc, vc, args.page)
        kargs = {"block_table": bt}
        k_in, v_in = kp, vp
        row["page_size"] = args.page
    else:
        k_in, v_in = kc, vc
    out = op.decode(q, k_in, v_in, seqlens, **kargs)
    ref_b = min(B, 2)  # reference on two sequences keeps memory and time small
    err = rel_err(out[:ref_b], reference(pattern, q[:ref_b], kc[:ref_b], vc[:ref_b], seqlens[:ref_b], scale))
    row["rel_err"] = err
    row["correct"] = bool(torch.isfinite(out).all()) and err < 2e-2
    if paged:
        row["paged_vs_contiguous_max_abs"] = (out.float() - op.decode(q, kc, vc, seqlens).float()).abs().max().item()
    elif B == 8 and seq == 32768:
        row["cuda_graph_rel_err"] = graph_check(op, q, kc, vc, seqlens)
    timed(row, "spdsl", lambda: op.decode(q, k_in, v_in, seqlens, **kargs))

    lay = pattern.layout(1, seq, 128, 128, seq - 1)
    row["visible_tiles"] = lay.nnz
    row["touched_bytes"] = lay.nnz * 128 * Hkv * D * 2 * q.element_size() * B
    row["floor_ms"] = row["touched_bytes"] / bw * 1e3
    qf = q.transpose(1, 2)
    kf, vf = kc.transpose(1, 2), vc.transpose(1, 2)
    bm = lay.to_block_mask(device="cuda")
    flex = peers.compiled_flex()
    for key, options in (("flex", None), ("flex_flash", {"BACKEND": "FLASH"})):
        if options and peers.fa4_missing():
            row[f"{key}_ms"], row[f"{key}_error"] = None, peers.fa4_missing()
            continue
        kw = dict(block_mask=bm, scale=scale, enable_gqa=True, **({"kernel_options": options} if options else {}))
        for kk, vv in ((kf, vf), (kf.contiguous(), vf.contiguous())):  # strided view first, then a copy
            row.pop(f"{key}_error", None)
            try:
                fo = flex(qf, kk, vv, **kw)
                row[f"{key}_rel_err"] = rel_err(fo.transpose(1, 2)[:ref_b], out[:ref_b].float())
            except Exception as e:
                row[f"{key}_ms"], row[f"{key}_error"] = None, f"{type(e).__name__}: {str(e)[:200]}"
                continue
            timed(row, key, lambda kk=kk, vv=vv, kw=kw: flex(qf, kk, vv, **kw))
            break
    if peers.fa4_missing():
        row["fa4_dense_ms"], row["fa4_dense_error"] = None, peers.fa4_missing()
    else:  # one query row at the end of the cache sees every key: dense causal, bottom-right aligned
        timed(row, "fa4_dense", peers.fa4_dense_causal(qf, kf, vf, scale))
    timed(
        row,
        "sdpa_dense",
        lambda: torch.nn.functional.scaled_dot_product_attention(qf, kf, vf, scale=scale, enable_gqa=True),
    )
    ms = row["spdsl_ms"]
    for key in ("flex", "flex_flash"):
        row[f"speedup_vs_{key}"] = row[f"{key}_ms"] / ms if row.get(f"{key}_ms") else None
    row["x_floor"] = ms / row["floor_ms"]
    row["achieved_GBps"] = row["touched_bytes"] / (ms * 1e-3) / 1e9
    rows.append(row)
    print(
        f"  {name:10s} B{B:<3d} {seq:7d} paged={paged!s:5s} spdsl {ms:.4f} ms (eager {row['spdsl_eager_ms']:.4f}) "
        f"flex {row['flex_ms']} (eager {row.get('flex_eager_ms')}) flash {row['flex_flash_ms']} floor {row['floor_ms']:.4f} "
        f"err {err:.2e} {'graph ' + format(row['cuda_graph_rel_err'], '.1e') if 'cuda_graph_rel_err' in row else ''}",
        flush=True,
    )

    torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patterns", nargs="+", default=["power", "streaming"])
    ap.add_argument("--q-heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--page", type=int, default=64)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "decode.json"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/decode.py needs a CUDA GPU (none found); the CPU tests cover correctness")
    bw = copy_bandwidth()
    print(f"device copy bandwidth: {bw / 1e12:.2f} TB/s", flush=True)
    rows: list[dict] = []
    for name in args.patterns:
        for B, seq in CASES:
            for paged in (False, True):
                run(name, B, seq, paged, args, bw, rows)
                write_results(args.out, rows, copy_bandwidth_Bps=bw, fa4=peers.fa4_missing() or "available")
    print(
        f"\n{'pattern':10s} {'B':>3s} {'seq':>7s} {'paged':>5s} {'spdsl':>8s} {'flex':>8s} {'x flex':>6s} "
        f"{'flash':>8s} {'x flash':>7s} {'floor':>8s} "
        f"{'x floor':>7s} {'sdpa':>8s} ok"
    )
    for r in rows:
        print(
            f"{r['pattern']:10s} {r['batch']:3d} {r['seq']:7d} {r['paged']!s:>5s} {cell(r['spdsl_ms'], 8, 4)} {cell(r['flex_ms'], 8, 4)} "
            f"{cell(r['speedup_vs_flex'], 6, 2)} "
            f"{cell(r['flex_flash_ms'], 8, 4)} {cell(r['speedup_vs_flex_flash'], 7, 2)} {cell(r['floor_ms'], 8, 4)} {cell(r['x_floor'], 7, 2)} {cell(r['sdpa_dense_ms'], 8, 4)} {r['correct']}"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
