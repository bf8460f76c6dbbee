"""experiments/retrieval/predict.py end to end at a small size, and its committed predictions."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "retrieval" / "predict.py"


def load():
    spec = importlib.util.spec_from_file_location("retrieval_predict", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_small_prediction_is_consistent():
    doc = load().predict(seq=2048, layers=3)
    rows = {r["pattern"]: r for r in doc["rows"]}
    assert rows["dense"]["reachable_fraction_by_layer"] == [1.0, 1.0, 1.0]
    for r in doc["rows"]:
        f = r["reachable_fraction_by_layer"]
        assert f == sorted(f) and 0 < f[0] <= 1  # more layers never reach less
        if r["matched"]:
            assert abs(r["density"] - doc["power_density"]) < 0.5 * doc["power_density"]
    assert doc["predicted_order"][0] == "dense"


def test_committed_predictions_match_the_code():
    committed = json.loads((SCRIPT.parent / "predictions.json").read_text())
    again = load().predict(committed["seq"], committed["layers"])
    assert [r["reachable_fraction_by_layer"] for r in again["rows"]] == [
        r["reachable_fraction_by_layer"] for r in committed["rows"]
    ]
    assert again["predicted_order"] == committed["predicted_order"]
