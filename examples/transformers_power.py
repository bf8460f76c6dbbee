"""PowerAttention inside a Hugging Face model: a small random Llama generating with dense attention and
with ``patterns/power.spd``, on whatever device there is (a laptop CPU runs spdsl's blocked backend).

    pip install -e '.[hf]' && python examples/transformers_power.py [--tokens 32] [--prompt 512]

The three lines a user needs are marked below. With random weights the two generations differ once
the pattern cuts (prompt longer than power's window of 5 units of 256 tokens), which is the point:
the pattern, not the weights, decides what each token sees.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import transformers

import spdsl
from spdsl.integrations.transformers import register

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt", type=int, default=2048, help="prompt tokens (power cuts past 5 x 256)")
    ap.add_argument("--tokens", type=int, default=16, help="tokens to generate")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    cfg = transformers.LlamaConfig(
        vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=args.prompt + args.tokens,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(device, dtype).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, args.prompt), device=device)

    # the three lines: load a pattern, register it (first layer dense), switch the model to it
    power = spdsl.load(ROOT / "patterns" / "power.spd")
    name = register(power, layers={0: None})
    for impl in ("sdpa", name):
        model.set_attn_implementation(impl)
        with torch.no_grad():
            t0 = time.perf_counter()
            out = model.generate(ids, max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False)
            seconds = time.perf_counter() - t0
        print(f"{impl:6s} {seconds:6.2f} s  {out[0, args.prompt :].tolist()}")


if __name__ == "__main__":
    main()
