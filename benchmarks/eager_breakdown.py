"""Where an eager decode call's host time goes (issue 11): each stage of ``op.decode`` timed alone.

B1, Hq 32, Hkv 8, D 128, bf16, a 4K cache, one new token -- the shape of ``models.py``'s eager table.
Calls are queued and synchronized once per stage (``benchmarks.common.timed``), so a stage that
launches work is bounded below by its GPU time. Writes ``benchmarks/results/eager_breakdown.json``.

    python benchmarks/eager_breakdown.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import spdsl
from benchmarks.common import timed, write_results

ROOT = Path(__file__).resolve().parents[1]


def stages(op, reps: int) -> dict:
    g = torch.Generator("cuda").manual_seed(1)
    q = torch.randn(1, 1, 32, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    kc, vc = (torch.randn(1, 4096, 8, 128, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    lens = torch.full((1,), 4096, dtype=torch.int32, device="cuda")
    qh, kh, vh = q.transpose(1, 2).contiguous(), kc.transpose(1, 2).contiguous(), vc.transpose(1, 2).contiguous()
    m = op.module
    op.decode(q, kc, vc, lens)
    key = m._decode_key(q, kc, vc, lens, None, None, None)
    plan = m._DECODE_PLANS[key]
    dev = q.device
    sdpa = torch.nn.functional.scaled_dot_product_attention
    calls = {
        "sdpa_gqa": lambda: sdpa(qh, kh, vh, enable_gqa=True),
        "op_decode": lambda: op.decode(q, kc, vc, lens),
        "op_q1": lambda: op(qh, kh, vh),
        "module_decode": lambda: m.decode(q, kc, vc, lens),
        "plan_call": lambda: plan(q, kc, vc, lens, None),
        "decode_key": lambda: m._decode_key(q, kc, vc, lens, None, None, None),
        "two_empties": lambda: (
            torch.empty(plan.o_shape, dtype=q.dtype, device=dev),
            torch.empty(plan.lse_shape, device=dev),
        ),
        "scratch_x4": lambda: [m._scratch(n, 64, torch.float32, dev) for n in ("opart", "lpart", "counter", "tiles")],
        "current_stream": lambda: torch.cuda.current_stream(dev).cuda_stream,
        "is_capturing": lambda: torch.cuda.is_current_stream_capturing(),
        "empty_kernel_launch": lambda: torch.cuda._sleep(0),
    }
    out = {}
    with torch.no_grad():
        for name, fn in calls.items():
            out[name] = timed(fn, reps, warm=20) * 1e3
            print(f"{name:22s} {out[name]:8.2f} us", flush=True)
    out["nsplit"] = plan.nsplit
    out["fast_launch"] = plan.runner is not None
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3000)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "eager_breakdown.json"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("eager_breakdown.py needs a CUDA GPU")
    op = spdsl.build(spdsl.load(ROOT / "patterns" / "power.spd"))
    us = stages(op, args.reps)
    write_results(args.out, [], eager_us=us, shape={"batch": 1, "hq": 32, "hkv": 8, "head_dim": 128, "cache": 4096})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
