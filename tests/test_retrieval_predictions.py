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


def load_script(name: str):
    """experiments/retrieval/<name>.py as the module <name> (train.py imports task and predict so)."""
    import sys

    if str(SCRIPT.parent) not in sys.path:
        sys.path.insert(0, str(SCRIPT.parent))
    return importlib.import_module(name)


def test_task_never_shows_the_value_elsewhere_and_labels_follow_probes():
    import torch

    task = load_script("task")
    vocab = task.Vocab(values=8, filler=50)
    b = task.make_batch(4, 300, 16, 12, vocab, torch.Generator().manual_seed(0))
    for i in range(4):
        assert b.needle[i] >= 16  # never in the sink unit
        values = (b.tokens[i] >= 1) & (b.tokens[i] <= vocab.values)
        assert values.nonzero().flatten().tolist() == [b.needle[i].item()]
        assert (b.tokens[i, b.probes[i]] == vocab.PROBE).all() and (b.probes[i] > b.needle[i]).all()
        assert (b.labels[i, b.probes[i] + 1] == b.value[i]).all()
        assert int((b.labels[i] != -100).sum()) == len(set(b.probes[i].tolist()))


def test_scoring_uses_the_brute_force_reach():
    """score() marks a probe reachable exactly when a token-level walk links needle to probe."""
    import torch

    from tests.test_reach_sets import token_reach

    task, predict = load_script("task"), load()
    pattern, _ = predict.load_patterns(512, unit_scale=4)["sliding"]
    from spdsl.reach_sets import hops

    h = hops(pattern, 512, 2)
    b = task.make_batch(6, 512, pattern.unit, 16, task.Vocab(), torch.Generator().manual_seed(1))
    records = task.score(b, b.tokens, h > 0, h, pattern.unit)
    walk = token_reach(pattern, 512, 2)
    for i, r in enumerate(records):
        pos = sorted(set(b.probes[i].tolist()))
        assert r["reachable"].tolist() == [bool(walk[p, b.needle[i]]) for p in pos]
        assert not r["correct"].any()  # the tokens at probes are PROBE, never the value


def test_the_pipeline_runs_on_the_cpu(tmp_path, capsys):
    train = load_script("train")
    out = tmp_path / "results.json"
    train.main(["--smoke", "--patterns", "dense", "sliding", "--out", str(out)])
    doc = json.loads(out.read_text())
    assert [r["pattern"] for r in doc["runs"]] == ["dense", "sliding"]
    for r in doc["runs"]:
        assert r["steps"] == 4 and r["tokens"] > 0 and r["reachable"]["probes"] > 0
        assert {"by_hops", "by_distance_log2", "unreachable", "density", "matched"} <= set(r)
    train.main(["--smoke", "--patterns", "dense", "sliding", "--out", str(out)])  # resumed: nothing to do
    assert "done already" in capsys.readouterr().out
    assert len(json.loads(out.read_text())["runs"]) == 2
    load_script("plot").main(["--results", str(out)])
    assert (tmp_path / "accuracy_vs_distance.png").stat().st_size > 0
    assert (tmp_path / "accuracy_vs_hops.png").stat().st_size > 0


def test_deadline_stops_before_a_run_that_would_overrun(tmp_path, capsys):
    train = load_script("train")
    out = tmp_path / "results.json"
    # the first run always starts; with a 0.01 s deadline the second one (a run took longer) does not
    train.main(["--smoke", "--patterns", "dense", "sliding", "--out", str(out), "--deadline", "0.01"])
    assert [r["pattern"] for r in json.loads(out.read_text())["runs"]] == ["dense"]
    assert "run the same command again to resume" in capsys.readouterr().out
    train.main(["--smoke", "--patterns", "dense", "sliding", "--out", str(out)])  # resumes where it stopped
    assert [r["pattern"] for r in json.loads(out.read_text())["runs"]] == ["dense", "sliding"]
    assert not (tmp_path / "results.json.tmp").exists()
