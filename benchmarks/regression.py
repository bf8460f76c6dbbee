"""Kernel regression check: the generated modules of a baseline commit vs today's, same inputs, one process.

    git worktree add /tmp/base <commit>   # then, with that checkout's spdsl:
    (cd /tmp/base && python -m spdsl build patterns/power.spd -o /path/to/.baseline)   # likewise other patterns
    python benchmarks/regression.py --baseline .baseline

Each case is checked for equal results first (both against each other, within bf16 noise), then
the kernels are timed A/B/A/B/A/B -- the baseline module's ``attention`` / ``decode`` against
today's module's ``forward`` / ``decode`` (``spdsl.build(p).module``), both called directly with their
input checks -- with ``do_bench`` medians (prefill) or CUDA-graph replays (decode); the best median of
each side counts. ``ratio`` = today / baseline: above 1.02 is a regression. For scale, every row
also times FlexAttention on the same layout with its Triton and FLASH (FA4) backends (``flex_ms``,
``flex_flash_ms``; paged decode rows: none, Flex takes no pages; null with the reason when FA4 is absent).
Writes benchmarks/results/regression.json (or --out).
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import spdsl  # noqa: E402
from benchmarks import peers  # noqa: E402
from benchmarks.common import bench, write_results  # noqa: E402
from benchmarks.decode import bench_graph, paged_copy  # noqa: E402

PREFILL = (
    [("power", s) for s in (8192, 32768, 131072)]
    + [("sliding_window", s) for s in (8192, 32768, 131072)]
    + [("causal", s) for s in (8192, 32768)]
)
DECODE = [
    ("power", 8, 32768),
    ("power", 8, 131072),
    ("power", 1, 32768),
    ("power", 64, 32768),
    ("streaming", 8, 131072),
]
MODULE_NAMES = {"causal": "dense_causal"}


def load_baseline(folder: Path, name: str):
    path = folder / f"{MODULE_NAMES.get(name, name)}.py"
    spec = importlib.util.spec_from_file_location(f"baseline_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ab(timer, old, new, rounds: int = 3):
    """Best median per side, timed old, new, old, new, ... (``rounds`` each): the kernels' own time,
    robust to the +-1.5% drift seen between repeats of one kernel on this machine."""
    t = [(timer(old), timer(new)) for _ in range(rounds)]
    return min(a for a, _ in t), min(b for _, b in t)


def per_config(old, new, q, run_old, run_new) -> list[dict]:
    """Both modules A/B under each prefill config in turn, pinned (the first-call tuner times 3
    calls with a host clock: the two modules can pick different configs by noise, which made past
    rows compare different kernels). The row's times are each side's best config."""
    key_old, key_new = (q.shape[-1], q.dtype, q.device), (False, q.shape[-1], q.dtype, q.device)
    tuned_old, tuned_new = old._TUNED.get(key_old), new._TUNED.get(key_new)
    out = []
    for cfg in new.CONFIGS:
        as_tuple = tuple(cfg.values())
        new._TUNED[key_new] = cfg
        if as_tuple in old.CONFIGS:
            old._TUNED[key_old] = as_tuple
            old_ms, new_ms = ab(bench, run_old, run_new)
        else:  # a config the baseline did not have: today's side only
            old_ms, new_ms = None, min(bench(run_new) for _ in range(3))
        out.append({"config": cfg, "baseline_ms": old_ms, "ms": new_ms, "ratio": new_ms / old_ms if old_ms else None})
    old._TUNED[key_old], new._TUNED[key_new] = tuned_old, tuned_new
    return out


SAME = 1e-2  # relative norm difference below which two outputs count as equal


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def record(rows: list[dict], args, shape: dict, t_old: float, t_new: float, diff: float, label: str) -> None:
    """Append one row (shape, both times, ratio, relative difference), print it, rewrite the JSON."""
    equal = diff < SAME  # bf16 outputs of two kernels differ by ~1e-3 in norm; a wrong tile by far more
    rows.append({**shape, "baseline_ms": t_old, "ms": t_new, "ratio": t_new / t_old, "rel_diff": diff, "equal": equal})
    flag = "" if equal else f"  RESULTS DIFFER (relative {diff:.1e} >= {SAME})"
    print(f"{label} baseline {t_old:.4f} ms  now {t_new:.4f} ms  ratio {t_new / t_old:.3f}  diff {diff:.1e}{flag}")
    write_results(args.out, rows, baseline_commit=args.commit, fa4=peers.fa4_missing() or "available")


def flex_peers(layout, q, k, v, timer) -> dict:
    """``flex_ms`` / ``flex_flash_ms`` (None with ``*_error``): FlexAttention's Triton and FLASH (FA4)
    backends on the same layout, for scale beside the two spdsl columns."""
    bm, out = layout.to_block_mask(device="cuda"), {}
    for key, backend in (("flex", "TRITON"), ("flex_flash", "FLASH")):
        try:
            fn = peers.flex(bm, q, k, v, 1.0 / q.shape[-1] ** 0.5, backend=backend)
        except RuntimeError as e:  # FA4 not installed
            out[f"{key}_ms"], out[f"{key}_error"] = None, str(e)
            continue
        out[f"{key}_ms"], error = peers.try_time(timer, fn)
        if error:
            out[f"{key}_error"] = error
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", type=Path, required=True, help="folder of the baseline's generated modules")
    ap.add_argument("--commit", default="", help="the baseline commit, recorded in the JSON")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "regression.json"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/regression.py needs a CUDA GPU")
    rows: list[dict] = []
    H, Hkv, D, dtype = 32, 8, 128, torch.bfloat16
    for name, seq in PREFILL:
        old = load_baseline(args.baseline, name)
        new = spdsl.build(spdsl.load(ROOT / "patterns" / f"{name}.spd"))
        g = torch.Generator(device="cuda").manual_seed(seq)
        q, k, v = (torch.randn(1, H, seq, D, device="cuda", dtype=dtype, generator=g) for _ in range(3))
        # the kernel with its checks, like the baseline's attention; neither writes the LSE (the
        # 2026-12-03 runs timed today's with it and the baseline's without: not the same work)
        fwd = functools.partial(new.module.forward, return_lse=False)
        a, b = old.attention(q, k, v), fwd(q, k, v)
        shape = {"kind": "prefill", "pattern": name, "seq": seq, "batch": 1, "heads": H, "head_dim": D}
        shape["config"] = new.module.tuned_config(D, dtype, q.device)  # chosen on the first call (per dtype, D)
        shape["baseline_config"] = old._TUNED.get((D, dtype, q.device))
        shape["per_config"] = per_config(
            old, new.module, q, functools.partial(old.attention, q, k, v), functools.partial(fwd, q, k, v)
        )
        t_old = min(c["baseline_ms"] for c in shape["per_config"] if c["baseline_ms"] is not None)
        t_new = min(c["ms"] for c in shape["per_config"])
        shape |= flex_peers(new.pattern.layout(seq, seq, 128, 128), q, k, v, bench)
        record(rows, args, shape, t_old, t_new, rel(b, a), f"prefill {name:15s} {seq:7d}")
        del q, k, v
        torch.cuda.empty_cache()
    for name, B, seq in DECODE:
        old = load_baseline(args.baseline, name)
        new = spdsl.build(spdsl.load(ROOT / "patterns" / f"{name}.spd"))
        g = torch.Generator(device="cuda").manual_seed(seq + B)
        q = torch.randn(B, 1, H, D, device="cuda", dtype=dtype, generator=g)
        kc, vc = (torch.randn(B, seq, Hkv, D, device="cuda", dtype=dtype, generator=g) for _ in range(2))
        lens = torch.full((B,), seq, dtype=torch.int32, device="cuda")
        for paged in (False, True):
            if paged:
                kp, vp, bt = paged_copy(kc, vc, 64)
                args_ = (q, kp, vp, lens)
                kw = {"block_table": bt}
            else:
                args_, kw = (q, kc, vc, lens), {}
            a, b = old.decode(*args_, **kw), new.decode(*args_, **kw)
            t_old, t_new = ab(
                bench_graph,
                lambda old=old, x=args_, kw=kw: old.decode(*x, **kw),
                lambda new=new, x=args_, kw=kw: new.decode(*x, **kw),
            )
            shape = {"kind": "decode", "pattern": name, "seq": seq, "batch": B, "paged": paged}
            shape |= {"q_heads": H, "kv_heads": Hkv, "head_dim": D}
            if not paged:  # Flex reads [B, H, S, D] caches (not pages): copies, made once
                qf, kf, vf = q.transpose(1, 2), kc.transpose(1, 2).contiguous(), vc.transpose(1, 2).contiguous()
                shape |= flex_peers(new.pattern.layout(1, seq, 128, 128, seq - 1), qf, kf, vf, bench_graph)
                del kf, vf
            record(
                rows, args, shape, t_old, t_new, rel(b, a), f"decode  {name:15s} B{B:<3d} {seq:7d} paged={paged!s:5s}"
            )
        q = kc = vc = args_ = None
        torch.cuda.empty_cache()
    worst = max(rows, key=lambda r: r["ratio"])
    print(
        f"\nworst ratio {worst['ratio']:.3f} ({worst['kind']} {worst['pattern']} {worst['seq']}); "
        f"{sum(r['ratio'] > 1.02 for r in rows)} of {len(rows)} rows above 1.02; "
        f"{sum(not r['equal'] for r in rows)} with different results"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
