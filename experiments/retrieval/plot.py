"""Plots of results.json: accuracy vs needle distance per pattern (predicted reach dashed), and vs hops.

    python experiments/retrieval/plot.py [--results experiments/retrieval/results.json]

Writes accuracy_vs_distance.png and accuracy_vs_hops.png beside the results (needs matplotlib:
``pip install 'spdsl[plot]'``). Accuracy is the mean over seeds of each run's probe accuracy; the
dashed line is the fraction of (probe unit, needle unit) pairs in that distance bin whose needle
reaches the probe within the model's layers -- the prediction the solid line is held to.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1]))

from predict import load_patterns, pair_mask  # noqa: E402

from spdsl.reach_sets import reach_within  # noqa: E402


def predicted_by_distance(pattern, seq: int, layers: int) -> dict[int, float]:
    """log2 token-distance bin -> fraction of scored unit pairs reachable within ``layers``."""
    reach = reach_within(pattern, seq, layers)
    n = reach.shape[0]
    scored = pair_mask(n)
    q, k = np.nonzero(scored)
    bins = np.log2(np.maximum((q - k) * pattern.unit, 1)).astype(int)
    return {int(b): float(reach[q[bins == b], k[bins == b]].mean()) for b in np.unique(bins)}


def mean_over_seeds(runs: list[dict], key: str) -> dict[str, dict[int, float]]:
    """pattern -> {bin: mean accuracy over seeds} for ``key`` (by_distance_log2 or by_hops)."""
    acc = defaultdict(lambda: defaultdict(list))
    for r in runs:
        for b, a in r[key].items():
            if a["mean"] is not None:
                acc[r["pattern"]][int(b)].append(a["mean"])
    return {p: {b: float(np.mean(v)) for b, v in sorted(d.items())} for p, d in acc.items()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default=str(HERE / "results.json"))
    args = ap.parse_args(argv)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("plot.py needs matplotlib: pip install 'spdsl[plot]'")
    path = Path(args.results)
    doc = json.loads(path.read_text())
    cfg, runs = doc["config"], doc["runs"]
    patterns = load_patterns(cfg["seq"], cfg["unit_scale"])
    chance = runs[0]["chance"]

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, (name, acc) in enumerate(mean_over_seeds(runs, "by_distance_log2").items()):
        color = f"C{i}"
        ax.plot([2**b for b in acc], list(acc.values()), "o-", color=color, label=name)
        pred = predicted_by_distance(patterns[name][0], cfg["seq"], cfg["layers"])
        ax.plot([2**b for b in pred], list(pred.values()), "--", color=color, alpha=0.6)
    ax.axhline(chance, color="gray", lw=0.8, ls=":", label="chance")
    title = f"retrieval after training, {cfg['layers']} layers, seq {cfg['seq']:,} (dashed: predicted reach)"
    ax.set(xscale="log", xlabel="needle distance (tokens, log2 bins)", ylabel="probe accuracy", title=title)
    ax.legend(fontsize=8)
    out_d = path.with_name("accuracy_vs_distance.png")
    fig.savefig(out_d, dpi=120, bbox_inches="tight")

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, acc in mean_over_seeds(runs, "by_hops").items():
        ax.plot(list(acc), list(acc.values()), "o-", label=name)
    ax.axhline(chance, color="gray", lw=0.8, ls=":")
    ax.set(xlabel="fewest layers linking needle to probe (0: not within the model's layers)", ylabel="probe accuracy")
    ax.legend(fontsize=8)
    out_h = path.with_name("accuracy_vs_hops.png")
    fig.savefig(out_h, dpi=120, bbox_inches="tight")
    print(f"wrote {out_d}\nwrote {out_h}")


if __name__ == "__main__":
    main()
