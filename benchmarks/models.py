"""Model benchmark: a Llama-style model (random weights) with SDPA, FlexAttention and spdsl attention.

    python benchmarks/models.py                       # ~1.2B params, 16 layers, Hq 32 / Hkv 8, D 128, bf16; 32K and 128K
    python benchmarks/models.py --contexts 32768 --decode-steps 16

Per context (B1): prefill time (eager forward over the prompt, DynamicCache) and per-token decode
latency (eager, the cache grown by the prompt), for transformers' SDPA backend (dense causal), spdsl
with ``patterns/power.spd`` (``spdsl.integrations.transformers.register``) and FlexAttention on the
same layout with its Triton and its FLASH (FA4) backends (op-level peers registered the same way:
transformers' own flex backend knows only its causal mask; FLASH reported missing without FA4). Correctness: at every context the spdsl model's last-position logits against the
Flex model's (the same pattern, another kernel). Then the per-call eager cost table (B1, Hq 32, Hkv 8,
D 128, a 4K cache, one new token) and the host setup time of a new prefill length.
Writes benchmarks/results/models.json (or --out).
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import spdsl  # noqa: E402
from benchmarks import peers  # noqa: E402
from benchmarks.common import timed, write_results  # noqa: E402


def model_of(args):
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=args.layers,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=args.max_context,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to("cuda", torch.bfloat16).eval()
    return model, sum(p.numel() for p in model.parameters())


@torch.no_grad()
def run_context(model, impl: str, ctx: int, args, decodes: bool = True) -> dict:
    import transformers

    model.set_attn_implementation(impl)
    ids = torch.randint(0, 32000, (1, ctx), device="cuda", generator=torch.Generator("cuda").manual_seed(ctx))
    prefill_ms = timed(lambda: model(ids, use_cache=False, logits_to_keep=1), args.prefill_reps)
    cache = transformers.DynamicCache(config=model.config)
    out = model(ids, past_key_values=cache, logits_to_keep=1)
    logits = out.logits[0, -1].float()
    nxt = out.logits[:, -1:].argmax(-1)
    decode_ms = None
    if decodes:  # the op-level Flex peers would need a new BlockMask per length: not decode peers here
        model(nxt, past_key_values=cache)  # warm the decode path
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(args.decode_steps):
            nxt = model(nxt, past_key_values=cache).logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()
        decode_ms = (time.perf_counter() - t0) * 1e3 / args.decode_steps
    del cache, out
    torch.cuda.empty_cache()
    return {"prefill_ms": prefill_ms, "decode_ms_per_token": decode_ms, "last_logits": logits}


def eager_call_us(op, reps: int = 2000) -> dict:
    """Host cost per eager call at B1, Hq 32, Hkv 8, D 128, a 4K cache, one new token (calls queued, one sync)."""
    g = torch.Generator("cuda").manual_seed(1)
    q = torch.randn(1, 1, 32, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    kc, vc = (torch.randn(1, 4096, 8, 128, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    lens = torch.full((1,), 4096, dtype=torch.int32, device="cuda")
    qh, kh, vh = q.transpose(1, 2).contiguous(), kc.transpose(1, 2).contiguous(), vc.transpose(1, 2).contiguous()
    sdpa = torch.nn.functional.scaled_dot_product_attention
    calls = {
        "spdsl_decode": lambda: op.decode(q, kc, vc, lens),
        "spdsl_q1": lambda: op(qh, kh, vh),
        "sdpa_gqa": lambda: sdpa(qh, kh, vh, enable_gqa=True),
    }
    out = {}
    with torch.no_grad():
        for name, fn in calls.items():
            out[name] = timed(fn, reps) * 1e3
    return out


def _first_call_extra_ms(fn, new) -> float:
    """ms a call at a new length costs beyond a steady call at that length (host and allocation)."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn(*new)
    torch.cuda.synchronize()
    first = (time.perf_counter() - t0) * 1e3
    return max(first - timed(functools.partial(fn, *new), 5), 0.0)


def new_length_setup_ms(op, seqs) -> dict:
    """Host time a new prefill length adds to its first call (layout and plan), beyond a steady call.

    The op is warmed at ``seq`` itself -- a power of two: its layout is the bucket's, the kernel is
    compiled and tuned, and the caching allocator holds blocks big enough -- and ``seq - 128`` (the
    same Triton specialization: divisible by 16 and 128) is then the new length, cut from the
    bucket's cached layout (``restrict_csr``). ``sdpa_<seq>`` is the same measurement for SDPA
    (dense causal, no layout): what a new length costs any kernel here. ``bucket_<seq>`` is what the
    bucket's own layout cost (once per bucket), on the host. (Until 2026-12-03 the warm-up was at
    ``seq - 256``, so the timed call also paid new, larger allocations: ~2 ms at every length.)
    """
    from spdsl.layout import build_csr

    sdpa = functools.partial(torch.nn.functional.scaled_dot_product_attention, is_causal=True)
    out = {}
    for seq in seqs:
        g = torch.Generator("cuda").manual_seed(seq)
        q, k, v = (torch.randn(1, 32, seq, 128, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
        new = tuple(t[:, :, : seq - 128] for t in (q, k, v))
        with torch.no_grad():
            op(q, k, v)
            out[str(seq)] = _first_call_extra_ms(op, new)
            sdpa(q, k, v)
            out[f"sdpa_{seq}"] = _first_call_extra_ms(sdpa, new)
        t0 = time.perf_counter()
        build_csr(op.pattern.ir, seq, seq, 128, 128, 0)
        out[f"bucket_{seq}"] = (time.perf_counter() - t0) * 1e3
        del q, k, v, new
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--prefill-reps", type=int, default=2)
    ap.add_argument("--calls-only", action="store_true", help="only the eager-call table and the new-length setup")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "models.json"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/models.py needs a CUDA GPU (none found); tests/test_transformers.py covers correctness")
    import transformers

    from spdsl.integrations.transformers import register

    args.max_context = max(args.contexts)
    pattern = spdsl.load(ROOT / "patterns" / "power.spd")
    op = spdsl.build(pattern)
    extra = {"transformers": transformers.__version__}
    extra["eager_call_us"] = eager_call_us(op)
    print("eager call us:", extra["eager_call_us"], flush=True)
    extra["new_length_setup_ms"] = new_length_setup_ms(op, [8192, 32768, 131072])
    print("new length setup ms:", extra["new_length_setup_ms"], flush=True)
    if args.calls_only:
        write_results(args.out, [], **extra)
        print(f"wrote {args.out}")
        return
    model, n_params = model_of(args)
    extra["model"] = {"params": n_params, "layers": args.layers, "hq": 32, "hkv": 8, "head_dim": 128}
    flex, flash = "flex (op-level, Triton backend)", "flex (op-level, FLASH backend)"
    impls = [("sdpa", "sdpa", "dense causal", True), (register(pattern), "spdsl", "power", True)]
    impls.append((peers.register_flex_transformers(pattern), flex, "power", False))
    flash_missing = peers.fa4_missing()
    if not flash_missing:
        # no "flash" in the name: transformers would look for a FlashAttention kernel of that name on the hub
        name = peers.register_flex_transformers(pattern, name="flex_fa4_pattern", backend="FLASH")
        impls.append((name, flash, "power", False))
    rows: list[dict] = []
    for ctx in args.contexts:
        logits = {}
        if flash_missing:
            rows.append({"backend": flash, "pattern": "power", "context": ctx, "error": flash_missing})
        for impl, backend, pat, decodes in impls:
            try:
                r = run_context(model, impl, ctx, args, decodes)
            except Exception as e:  # a peer that cannot run this context is reported, not fatal
                rows.append(
                    {"backend": backend, "pattern": pat, "context": ctx, "error": f"{type(e).__name__}: {e}"[:300]}
                )
                torch.cuda.empty_cache()
                continue
            logits[backend] = r.pop("last_logits")
            rows.append({"backend": backend, "pattern": pat, "context": ctx, "mode": "eager", **r})
            print(rows[-1], flush=True)
        ref = logits.get(flex)
        for row in rows:
            if row["context"] == ctx and row["backend"] == "spdsl" and ref is not None:
                diff = ((logits["spdsl"] - ref).norm() / ref.norm()).item()
                row["logits_rel_diff_vs_flex"], row["correct"] = diff, diff < 5e-2
        sdpa = next((r for r in rows if r["context"] == ctx and r["backend"] == "sdpa" and "error" not in r), None)
        ours = next((r for r in rows if r["context"] == ctx and r["backend"] == "spdsl" and "error" not in r), None)
        if sdpa and ours:
            ours["prefill_speedup_vs_sdpa"] = sdpa["prefill_ms"] / ours["prefill_ms"]
            ours["decode_speedup_vs_sdpa"] = sdpa["decode_ms_per_token"] / ours["decode_ms_per_token"]
        peer = next((r for r in rows if r["context"] == ctx and r["backend"] == flash), None)
        if ours and peer:  # the strongest peer's prefill beside ours, or None with why it did not run
            ours["flex_flash_ms"], ours["flex_flash_error"] = peer.get("prefill_ms"), peer.get("error")
            if ours["flex_flash_ms"]:
                ours["prefill_speedup_vs_flex_flash"] = ours["flex_flash_ms"] / ours["prefill_ms"]
        write_results(args.out, rows, **extra, fa4=flash_missing or "available")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
