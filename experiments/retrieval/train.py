"""Train a small decoder with each pattern on the retrieval task, score it against reach.

    python experiments/retrieval/train.py                       # GPU: 8K at unit 64, 4 layers, d 256, 2 seeds
    python experiments/retrieval/train.py --smoke               # CPU: tiny, a few steps (what CI runs)

Every pattern gets the same steps, tokens, learning rate, data seed and init seed (per seed);
the length follows a curriculum over fractions of the step budget. The model is transformers'
Llama (random init) with spdsl's attention registered per pattern (its backward trains it).
Evaluation: fresh sequences at the final length, every probe scored as reachable or not from the
pattern's exact L-layer reach sets (``spdsl.reach_sets``), accuracy with bootstrap intervals over
sequences. Results are appended run by run to results.json; finished runs are skipped when the
command is run again (resumable).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1]))

from predict import load_patterns  # noqa: E402
from task import Vocab, make_batch, score, summarize  # noqa: E402

from spdsl.analyze import pair_density  # noqa: E402
from spdsl.layout import Layout  # noqa: E402
from spdsl.reach_sets import hops as hop_matrix  # noqa: E402


def curriculum(spec: str, steps: int) -> list[int]:
    """``"1024:0.2,2048:0.2,..."`` -> the sequence length of every step."""
    parts = [(int(a), float(b)) for a, b in (p.split(":") for p in spec.split(","))]
    total = sum(f for _, f in parts)
    lengths = []
    for seq, frac in parts:
        lengths += [seq] * round(steps * frac / total)
    return (lengths + [parts[-1][0]] * steps)[:steps]


def model_for(args, vocab: Vocab, attn: str, seed: int):
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=vocab.size, hidden_size=args.d_model, intermediate_size=4 * args.d_model,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
        max_position_embeddings=args.seq, attention_dropout=0.0,
    )  # fmt: skip
    torch.manual_seed(seed)  # the same init for every pattern
    model = transformers.LlamaForCausalLM(cfg).to(args.device)
    model.set_attn_implementation(attn)
    return model


def run(name, pattern, match, seed, args, vocab) -> dict:
    from spdsl.integrations.transformers import register

    attn = register(pattern, name=f"retrieval_{name}")
    model = model_for(args, vocab, attn, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    lengths = curriculum(args.curriculum, args.steps)
    g = torch.Generator(args.device).manual_seed(1000 + seed)  # the same data for every pattern
    amp = (
        torch.autocast("cuda", dtype=torch.bfloat16) if args.device == "cuda" else torch.autocast("cpu", enabled=False)
    )
    t0, tokens = time.perf_counter(), 0
    for step, seq in enumerate(lengths):
        lr = args.lr * min(1.0, (step + 1) / max(1, args.warmup))
        for group in opt.param_groups:
            group["lr"] = lr
        b = make_batch(args.batch, seq, pattern.unit, args.probes, vocab, g, args.device)
        with amp:
            loss = model(b.tokens, labels=b.labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        tokens += b.tokens.numel()
        if step % args.log_every == 0 or step == len(lengths) - 1:
            rate = tokens / (time.perf_counter() - t0)
            where = f"{name} seed {seed} step {step + 1}/{len(lengths)} seq {seq}"
            print(f"  {where} loss {loss.item():.3f} {rate:,.0f} tok/s", flush=True)
    train_s = time.perf_counter() - t0
    reach_hops = hop_matrix(pattern, args.seq, args.layers)
    reach = reach_hops > 0
    eval_g = torch.Generator(args.device).manual_seed(99_000 + seed)
    records = []
    model.eval()
    with torch.no_grad(), amp:
        for _ in range(-(-args.eval_sequences // args.batch)):
            b = make_batch(args.batch, args.seq, pattern.unit, args.probes, vocab, eval_g, args.device)
            pred = model(b.tokens).logits.argmax(-1)
            records += score(b, pred, reach, reach_hops, pattern.unit)
    lay = Layout(pattern.ir, args.seq, args.seq, 128, 128)
    return {
        "pattern": name, "params": pattern.params, "unit": pattern.unit, "matched": match,
        "density": pair_density(lay), "seed": seed, "steps": len(lengths), "tokens": tokens,
        "train_seconds": train_s, "final_loss": loss.item(), "eval_sequences": len(records),
        **summarize(records[: args.eval_sequences], vocab.values),
    }  # fmt: skip


def _ms_per_step(model, batch, lr: float, steps: int) -> float:
    """Training steps (bf16 autocast, AdamW) timed after 3 warm ones (compiles Flex)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(batch.tokens, labels=batch.labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    from benchmarks.common import timed

    return timed(step, steps, warm=3)


def step_times(name, pattern, args, vocab, steps: int) -> dict:
    """ms per training step at the final length with spdsl's kernels and with FlexAttention's (same
    layout, Triton backend), the same model and batch; CUDA only."""
    if args.device != "cuda":
        return {"spdsl_ms": None, "flex_ms": None, "note": "step times are measured on CUDA only"}
    from benchmarks.peers import register_flex_transformers
    from spdsl.integrations.transformers import register

    g = torch.Generator("cuda").manual_seed(7)
    batch = make_batch(args.batch, args.seq, pattern.unit, args.probes, vocab, g, "cuda")
    out = {}
    for kernel, attn in (
        ("spdsl", register(pattern, name=f"retrieval_{name}")),
        ("flex", register_flex_transformers(pattern, name=f"retrieval_flex_{name}")),
    ):
        out[f"{kernel}_ms"] = _ms_per_step(model_for(args, vocab, attn, seed=0), batch, args.lr, steps)
    print(f"  step time {name}: spdsl {out['spdsl_ms']:.1f} ms, flex {out['flex_ms']:.1f} ms", flush=True)
    return out


def write(path: Path, doc: dict) -> None:
    """Rewrite results.json atomically (a run killed mid-write leaves the previous file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(path)


class Clock:
    """``--deadline``: refuses to start work that the longest piece so far says would overrun."""

    def __init__(self, deadline: float | None):
        self.deadline, self.t0, self.longest = deadline, time.perf_counter(), 0.0

    def allows(self, what: str) -> bool:
        left = None if self.deadline is None else self.deadline - (time.perf_counter() - self.t0)
        if left is None or self.longest < left:
            return True
        print(f"stopping before {what}: {left:.0f} s left of --deadline, the longest piece took "
              f"{self.longest:.0f} s; run the same command again to resume", flush=True)  # fmt: skip
        return False

    @contextlib.contextmanager
    def timing(self):
        t = time.perf_counter()
        yield
        self.longest = max(self.longest, time.perf_counter() - t)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patterns", nargs="+", default=["dense", "power", "sliding", "stride", "dilated", "longnet"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--unit-scale", type=int, default=1, help="divide every unit by this")
    ap.add_argument("--curriculum", default="1024:0.2,2048:0.2,4096:0.2,8192:0.4")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--probes", type=int, default=32)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--eval-sequences", type=int, default=1024)
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=str(HERE / "results.json"))
    ap.add_argument("--smoke", action="store_true", help="tiny CPU settings: the pipeline, not a result")
    ap.add_argument("--step-times", type=int, default=20, metavar="N",
                    help="also time N training steps per pattern, spdsl and Flex kernels (CUDA; 0: skip)")  # fmt: skip
    ap.add_argument("--deadline", type=float, default=None, metavar="S",
                    help="stop before starting work that would end later than S seconds after the start "
                         "(judged by the longest run so far); run again to resume")  # fmt: skip
    args = ap.parse_args(argv)
    if args.smoke:
        args.seq, args.unit_scale, args.curriculum, args.steps = 512, 4, "256:0.5,512:0.5", 4
        args.batch, args.probes, args.d_model, args.heads, args.layers = 2, 8, 32, 2, 2
        args.warmup, args.eval_sequences, args.log_every, args.seeds = 1, 8, 1, args.seeds[:1]
    patterns = load_patterns(args.seq, args.unit_scale)
    vocab = Vocab()
    out = Path(args.out)
    doc = json.loads(out.read_text()) if out.exists() else {"config": {}, "runs": []}
    skip = ("out", "patterns", "seeds", "log_every", "step_times", "deadline")
    config = {k: v for k, v in vars(args).items() if k not in skip}
    if doc["runs"] and doc["config"] != config:
        sys.exit(f"{out} holds runs of another configuration; pass another --out (or delete it)")
    doc["config"] = config
    doc["command"] = "python experiments/retrieval/train.py " + " ".join(sys.argv[1:] if argv is None else argv)
    done = {(r["pattern"], r["seed"]) for r in doc["runs"]}
    clock = Clock(args.deadline)
    for seed in args.seeds:
        for name in args.patterns:
            if (name, seed) in done:
                print(f"{name} seed {seed}: done already (in {out})")
                continue
            if not clock.allows(f"{name} seed {seed}"):
                return
            pattern, match = patterns[name]
            with clock.timing():
                row = run(name, pattern, match, seed, args, vocab)
            doc["runs"].append(row)
            write(out, doc)
            r, u = row["reachable"], row["unreachable"]
            print(f"{name} seed {seed}: reachable {r['mean']} [{r['lo']}, {r['hi']}], unreachable {u['mean']} "
                  f"(chance {row['chance']:.3f})", flush=True)  # fmt: skip
    if args.step_times:
        for name in args.patterns:
            if name not in doc.setdefault("step_times", {}):
                if not clock.allows(f"step times of {name}"):
                    return
                with clock.timing():
                    doc["step_times"][name] = step_times(name, patterns[name][0], args, vocab, args.step_times)
                write(out, doc)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
