"""Predictions before any training: what each pattern's reach says a model can retrieve.

    python experiments/retrieval/predict.py                   # 8K tokens at unit 64, 4 layers
    python experiments/retrieval/predict.py --seq 16384 --unit-scale 2 --layers 4 --out predictions_16k.json

Every baseline's free parameter is chosen by code (:func:`spdsl.density.match_density`) to match
power's density at the training length. For each pattern: the density, and the fraction of
(probe unit, needle unit) pairs -- probe after needle, needle never in the sink unit -- whose needle
reaches the probe within 1..L layers (:func:`spdsl.reach_sets.reach_within`), the layers to full
reach, and the ordering that predicts. Writes experiments/retrieval/predictions.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

import spdsl  # noqa: E402
from spdsl.density import density_at, match_density  # noqa: E402
from spdsl.reach_sets import hops  # noqa: E402

#: pattern file -> the parameter matched to power's density (None: taken as written)
PATTERNS = {
    "dense": None,
    "power": None,
    "sliding": "window",
    "stride": "step",
    "dilated": "w",
    "longnet": "w",
}


def pair_mask(n: int, sinks: int = 1) -> np.ndarray:
    """bool [n, n]: the scored (probe unit Q, needle unit K) pairs: K < Q, K not a sink unit."""
    q, k = np.arange(n)[:, None], np.arange(n)[None, :]
    return (k < q) & (k >= sinks)


def load_patterns(seq: int, unit_scale: int = 1) -> dict[str, tuple[spdsl.Pattern, dict | None]]:
    """name -> (pattern, how it was matched): every unit divided by ``unit_scale``, each baseline's
    parameter matched to power's density at ``seq``."""
    loaded = {}
    for name in PATTERNS:
        text = (HERE / "patterns" / f"{name}.spd").read_text()
        if unit_scale != 1:
            text = text.replace("unit 64", f"unit {64 // unit_scale}")
        loaded[name] = spdsl.compile(text, filename=f"patterns/{name}.spd")
    target = density_at(loaded["power"], seq)
    out = {}
    for name, param in PATTERNS.items():
        p, match = loaded[name], None
        if param is not None:
            m = match_density(p, param, target, seq)
            p, match = m.pattern, {"param": param, "value": m.value, "out_of_reach": m.out_of_reach}
        out[name] = (p, match)
    return out


def predict(seq: int, layers: int, unit_scale: int = 1) -> dict:
    patterns = load_patterns(seq, unit_scale)
    target = density_at(patterns["power"][0], seq)
    rows = []
    for name, (p, match) in patterns.items():
        h = hops(p, seq, max(layers, 64))
        scored = pair_mask(h.shape[0])
        linked = h[scored]
        by_layer = [float(((linked > 0) & (linked <= L)).mean()) for L in range(1, layers + 1)]
        full = [L for L in range(1, 65) if ((linked > 0) & (linked <= L)).all()]
        rows.append(
            {
                "pattern": name,
                "params": p.params,
                "unit": p.unit,
                "matched": match,
                "density": density_at(p, seq),
                "reachable_fraction_by_layer": by_layer,
                "reachable_fraction": by_layer[-1],
                "layers_to_reach_every_pair": full[0] if full else None,
            }
        )
    order = sorted(rows, key=lambda r: -r["reachable_fraction"])
    return {
        "seq": seq,
        "layers": layers,
        "units": -(-seq // patterns["power"][0].unit),
        "power_density": target,
        "scored_pairs": "probe unit after needle unit; needle never in the sink unit (unit 0)",
        "predicted_order": [r["pattern"] for r in order],
        "prediction": (
            "accuracy on unreachable pairs is chance; the ordering of accuracy on far pairs follows "
            "reachable_fraction (dense first)"
        ),
        "rows": rows,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--unit-scale", type=int, default=1, help="divide every unit by this (2: unit 32)")
    ap.add_argument("--out", default=str(HERE / "predictions.json"))
    args = ap.parse_args()
    doc = predict(args.seq, args.layers, args.unit_scale)
    doc["command"] = "python experiments/retrieval/predict.py " + " ".join(sys.argv[1:])
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    print(f"{'pattern':10s} {'params':28s} {'density':>8s} " + " ".join(f"L={L}" for L in range(1, args.layers + 1)))
    for r in doc["rows"]:
        params = ", ".join(f"{k}={v}" for k, v in r["params"].items())
        fr = " ".join(f"{100 * f:3.0f}%" for f in r["reachable_fraction_by_layer"])
        print(f"{r['pattern']:10s} {params:28s} {100 * r['density']:7.2f}% {fr}")
    print(f"predicted order: {' > '.join(doc['predicted_order'])}\nwrote {args.out}")


if __name__ == "__main__":
    main()
