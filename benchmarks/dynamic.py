"""Certified dynamic decode benchmark (issue 12): blocks read, time and error of ``select`` decode.

    python benchmarks/dynamic.py                      # B8 Hq32 Hkv8 D128 bf16 at 32K and 128K
    python benchmarks/dynamic.py --seqs 1048576 --batch 1

Pattern ``massive``: ``unit 64``, ``causal``, ``attend sink(1) | local(4)``, ``select all``. Data:
(a) i.i.d. Gaussian keys (the worst case: little can be skipped); (b) clustered keys, the
queries near one cluster that a fraction (``--concentrations``, e.g. 1%, 5%, 20%) of the blocks
hold. For each: the fraction of candidate blocks read, the time of ``op.decode`` with the
certificate (``spdsl_ms``) and of the same kernels reading every candidate block (``full_ms``),
the certified bound ``err_bound`` (max over rows) and the measured error ``err_measured`` against
fp32 exact attention (max over rows and coordinates of ``|o - exact| / value range``), and a
Quest-style top-K over the same summaries at the same number of blocks (``topk_err``, no
certificate), and the strongest peers on the candidates' layout (dense causal here): Flex's FLASH
backend (FA4) and FA4 dense causal (``flex_flash_ms``, ``fa4_dense_ms``; None with the reason
without CUDA or FA4). Wall-clock ms, synchronized: the block choice synchronizes with the host.
Prefill rows (``--prefill-seq``, B1): ``op(q, k, v, eps=)`` on the same kinds of data with every
position a query (the certified prefill: the decode over chunks of rows, torch backend), against
spdsl's dense causal kernel (``causal.spd``: every candidate block, since ``select all``) as
``full_ms``; ``err_measured`` on the last 64 rows against that kernel in fp32.
Writes benchmarks/results/dynamic.json (or --out). Needs CUDA.
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
from benchmarks.common import timed, write_results  # noqa: E402
from spdsl import dynamic  # noqa: E402
from spdsl import dynamic_reference as dref  # noqa: E402
from spdsl.layout import Layout  # noqa: E402

PATTERN = """pattern massive(window = 4, sinks = 1) {
    unit 64
    causal
    attend sink(sinks) | local(window)
    select all
}"""


def make_data(kind, conc, B, S, Hq, Hkv, D, dtype, seed, device="cuda", noise=0.3, nq=1):
    """q [B, nq, Hq, D], caches [B, S, Hkv, D]: i.i.d. Gaussian, or clustered (a fraction ``conc`` of
    the 64-token blocks drawn around the queries' cluster, the rest around 63 others; keys and
    queries are their center plus ``noise`` x Gaussian per channel)."""
    g = torch.Generator(device=device).manual_seed(seed)
    v = torch.randn(B, S, Hkv, D, device=device, generator=g)
    if kind == "iid":
        q = torch.randn(B, nq, Hq, D, device=device, generator=g)
        k = torch.randn(B, S, Hkv, D, device=device, generator=g)
        return q.to(dtype), k.to(dtype), v.to(dtype)
    centers = torch.randn(Hkv, 64, D, device=device, generator=g)
    blocks = -(-S // 64)
    hot = torch.rand(B, blocks, device=device, generator=g) < conc
    cluster = torch.where(hot, 0, torch.randint(1, 64, (B, blocks), device=device, generator=g))
    cluster = cluster.repeat_interleave(64, 1)[:, :S]  # [B, S]
    k = centers[torch.arange(Hkv, device=device)[None, None], cluster[..., None]]  # [B, S, Hkv, D]
    k = k + noise * torch.randn(B, S, Hkv, D, device=device, generator=g)
    q = centers[:, 0].repeat_interleave(Hq // Hkv, 0)[None, None].expand(B, nq, Hq, D)
    q = q + noise * torch.randn(B, nq, Hq, D, device=device, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def exact(pattern, q, kc, vc, seqlens, scale):
    """fp32 softmax over the candidates, and each row's value range over them: ([B,1,Hq,D], same)."""
    B, _, Hq, D = q.shape
    G = Hq // kc.shape[2]
    out, vrange = torch.empty(B, 1, Hq, D, device=q.device), torch.empty(B, 1, Hq, D, device=q.device)
    for b, n in enumerate(seqlens.tolist()):
        mask = dref.candidate_mask(pattern, 1, n)[0].to(q.device)
        k = kc[b, :n][mask].float().transpose(0, 1).repeat_interleave(G, 0)  # [Hq, m, D]
        v = vc[b, :n][mask].float().transpose(0, 1).repeat_interleave(G, 0)
        p = torch.softmax((q[b, 0].float()[:, None] @ k.transpose(-1, -2)) * scale, -1)  # [Hq, 1, m]
        out[b, 0] = (p @ v)[:, 0]
        vrange[b, 0] = v.amax(1) - v.amin(1)
    return out, vrange


def strongest_peers(row, pattern, q, k, v, scale, time_one) -> None:
    """Flex's FLASH backend (FA4) on the candidates' layout (``attend | select``; here dense causal)
    and FA4 dense causal, timed as spdsl is (``time_one(fn)``): ``flex_flash_ms`` / ``fa4_dense_ms``
    and ``speedup_vs_flex_flash``, or None with the reason. q ``[B, Hq, Sq, D]``, k / v ``[B, Hkv, S, D]``."""
    Sq, S = q.shape[2], k.shape[2]
    reason = "the FLASH peers need CUDA" if q.device.type != "cuda" else peers.fa4_missing()
    if reason:
        row.update(flex_flash_ms=None, flex_flash_error=reason, fa4_dense_ms=None, fa4_dense_error=reason)
    else:
        lay = Layout(dref.candidate_ir(pattern), Sq, S, 128, 128, q_offset=S - Sq)
        flash = peers.flex(lay.to_block_mask(device=q.device), q, k, v, scale, backend="FLASH")
        row["flex_flash_ms"], row["flex_flash_error"] = peers.try_time(time_one, flash)
        row["fa4_dense_ms"], row["fa4_dense_error"] = peers.try_time(time_one, peers.fa4_dense_causal(q, k, v, scale))
    row["speedup_vs_flex_flash"] = row["flex_flash_ms"] / row["spdsl_ms"] if row["flex_flash_ms"] else None


def measured(out, ref, vrange) -> float:
    return float(((out.float() - ref).abs() / vrange.clamp(min=1e-12)).max())


def run_case(op, args, kind, conc, B, S, rows, backend, timer=timed) -> None:
    """One row: the data, the certified decode, the full read, the top-K baseline, their times."""
    Hq, Hkv, D, dtype = args.q_heads, args.kv_heads, args.head_dim, getattr(torch, args.dtype)
    scale = 1.0 / math.sqrt(D)
    q, kc, vc = make_data(kind, conc, B, S, Hq, Hkv, D, dtype, S + B, args.device, args.noise)
    seqlens = torch.full((B,), S, dtype=torch.int32, device=args.device)
    s = op.summaries(kc, seqlens, block_size=args.block)
    ir = op.pattern.ir

    def call(**kw):
        return dynamic.decode(ir, q, kc, vc, seqlens, s, scale=scale, eps=args.eps, backend=backend, **kw)

    out, err, chosen = call()
    candidates = dynamic.candidate_blocks(ir, seqlens, 1, s)[:, None].expand_as(chosen)
    read = float(chosen.sum() / candidates.sum())
    n_ref = min(B, 2)
    ref, vrange = exact(op.pattern, q[:n_ref], kc[:n_ref], vc[:n_ref], seqlens[:n_ref], scale)
    err_measured = measured(out[:n_ref], ref, vrange)
    full_out = call(topk=s.num_blocks)[0]
    k_blocks = max(1, math.ceil(float((chosen & candidates).sum(-1).float().mean())) - 2)  # minus sink, local
    topk_out = call(topk=k_blocks)[0]
    tol = 1e-2 if dtype != torch.float32 else 1e-5
    row = {
        "phase": "decode",
        "data": kind if kind == "iid" else f"clustered_{conc:g}",
        "seq": S,
        "batch": B,
        "eps": args.eps,
        "noise": None if kind == "iid" else args.noise,
        "blocks_read_frac": read,
        "spdsl_ms": timer(lambda: op.decode(q, kc, vc, seqlens, summaries=s, eps=args.eps), args.reps, 3),
        "full_ms": timer(lambda: call(topk=s.num_blocks), args.reps, 3),
        "topk_ms": timer(lambda: call(topk=k_blocks), args.reps, 3),
        "topk_blocks": k_blocks,
        "err_bound": float(err.max()),
        "err_measured": err_measured,
        "full_err_measured": measured(full_out[:n_ref], ref, vrange),
        "topk_err": measured(topk_out[:n_ref], ref, vrange),
        "summaries_ms": timer(lambda: op.summaries(kc, seqlens, block_size=args.block), 3, 1),
    }
    row["correct"] = bool(torch.isfinite(out).all()) and row["err_bound"] <= args.eps
    row["correct"] &= err_measured <= row["err_bound"] + row["full_err_measured"] + tol
    row["speedup_vs_full"] = row["full_ms"] / row["spdsl_ms"]
    strongest_peers(row, op.pattern, q.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2), scale,
                    lambda fn: timer(fn, args.reps, 3))  # fmt: skip
    rows.append(row)
    print(
        f"  {row['data']:16s} B{B} {S:8d} read {read:6.1%} spdsl {row['spdsl_ms']:.3f} ms full {row['full_ms']:.3f} ms "
        f"(x{row['speedup_vs_full']:.2f}) bound {row['err_bound']:.1e} measured {err_measured:.1e} "
        f"topk {row['topk_err']:.1e} {'ok' if row['correct'] else 'WRONG'}",
        flush=True,
    )


def run_prefill(op, dense, args, kind, conc, S, rows, timer=timed) -> None:
    """One prefill row (B1): certified ``op(q, k, v, eps=)`` vs the dense causal kernel."""
    Hq, Hkv, D, dtype = args.q_heads, args.kv_heads, args.head_dim, getattr(torch, args.dtype)
    q, k, v = make_data(kind, conc, 1, S, Hq, Hkv, D, dtype, S + 7, args.device, args.noise, nq=S)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()
    out, err = op(q, k, v, eps=args.eps, return_error=True)
    ref = dense(q.float(), k.float(), v.float())
    vf = v.float().repeat_interleave(Hq // Hkv, 1)[0]  # [Hq, S, D]: causal value range of the last rows
    last = torch.arange(S - 64, S, device=q.device)
    vrange = torch.stack([vf[:, : int(i) + 1].amax(1) - vf[:, : int(i) + 1].amin(1) for i in last], 1)
    err_measured = float(((out[0, :, last].float() - ref[0, :, last]).abs() / vrange.clamp(min=1e-12)).max())
    row = {
        "phase": "prefill", "data": kind if kind == "iid" else f"clustered_{conc:g}", "seq": S, "batch": 1,
        "eps": args.eps, "noise": None if kind == "iid" else args.noise, "blocks_read_frac": None,
        "spdsl_ms": timer(lambda: op(q, k, v, eps=args.eps), args.prefill_reps, 1),
        "full_ms": timer(lambda: dense(q, k, v), args.reps, 3),
        "err_bound": float(err.max()), "err_measured": err_measured, "topk_err": None,
    }  # fmt: skip
    tol = 1e-2 if dtype != torch.float32 else 1e-5
    row["correct"] = bool(torch.isfinite(out).all()) and row["err_bound"] <= args.eps
    row["correct"] &= err_measured <= row["err_bound"] + tol
    row["speedup_vs_full"] = row["full_ms"] / row["spdsl_ms"]
    strongest_peers(row, op.pattern, q, k, v, 1.0 / math.sqrt(D), lambda fn: timer(fn, args.reps, 3))
    rows.append(row)
    print(f"  prefill {row['data']:16s} {S:8d} spdsl {row['spdsl_ms']:.1f} ms dense causal {row['full_ms']:.2f} ms "
          f"bound {row['err_bound']:.1e} measured {err_measured:.1e} {'ok' if row['correct'] else 'WRONG'}", flush=True)  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seqs", type=int, nargs="+", default=[32768, 131072], help="cache lengths")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--q-heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--eps", type=float, default=1e-3)
    ap.add_argument("--block", type=int, default=64, help="tokens per summarized block")
    ap.add_argument("--concentrations", type=float, nargs="+", default=[0.01, 0.05, 0.2])
    ap.add_argument("--noise", type=float, default=0.3, help="per-channel spread of clustered keys around their center")
    ap.add_argument("--reps", type=int, default=20, help="timed calls per measurement")
    ap.add_argument("--prefill-seq", type=int, nargs="*", default=[32768], help="prefill lengths (B1); none: skip")
    ap.add_argument("--prefill-reps", type=int, default=3, help="timed calls of the certified prefill")
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # cpu: the CI smoke test only
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "dynamic.json"))
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/dynamic.py needs a CUDA GPU", file=sys.stderr)
        return 2
    from spdsl.dynamic_kernels import TRITON

    op = spdsl.build(spdsl.compile(PATTERN))
    rows: list[dict] = []
    for S in args.seqs:
        run_case(op, args, "iid", 0.0, args.batch, S, rows, TRITON)
        torch.cuda.empty_cache()
        for conc in args.concentrations:
            run_case(op, args, "clustered", conc, args.batch, S, rows, TRITON)
            torch.cuda.empty_cache()
    dense = spdsl.build(spdsl.load(ROOT / "patterns" / "causal.spd"))
    for S in args.prefill_seq:
        for kind, conc in [("iid", 0.0)] + [("clustered", c) for c in args.concentrations]:
            run_prefill(op, dense, args, kind, conc, S, rows)
            torch.cuda.empty_cache()
    write_results(
        args.out, rows, notes="prefill rows: the certified prefill runs on the torch backend (no tiled kernel yet)"
    )
    print(f"wrote {args.out}")
    return 0 if all(r["correct"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
