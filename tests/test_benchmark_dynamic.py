"""benchmarks/dynamic.py (issue 12) without a GPU: --help works, and one row of each kind is
computed on tiny CPU sizes (the torch backend, a trivial timer)."""

from __future__ import annotations

import subprocess
import sys

import pytest

import spdsl
from benchmarks import dynamic as bench
from spdsl import dynamic
from tests.conftest import ROOT


def test_help():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "dynamic.py"), "--help"], capture_output=True)
    assert done.returncode == 0 and b"--concentrations" in done.stdout


@pytest.mark.parametrize("kind, conc", [("iid", 0.0), ("clustered", 0.05)])
def test_one_row_on_cpu(kind, conc):
    args = bench.parse_args(["--q-heads", "4", "--kv-heads", "2", "--head-dim", "16", "--dtype", "float32"])
    args.device, args.block = "cpu", 16
    rows = []
    op = spdsl.build(spdsl.compile(bench.PATTERN.replace("unit 64", "unit 16")))

    def once(fn, reps, warm=1):
        fn()
        return 1.0

    bench.run_case(op, args, kind, conc, 2, 700, rows, dynamic.TORCH, timer=once)
    (row,) = rows
    assert row["correct"] and 0 < row["blocks_read_frac"] <= 1 and row["err_bound"] <= args.eps
    assert set(row) >= {"phase", "data", "seq", "batch", "eps", "spdsl_ms", "full_ms", "err_measured", "topk_err"}
    assert row["flex_flash_ms"] is None and "CUDA" in row["flex_flash_error"]  # the strongest peer: null with why
    assert row["fa4_dense_ms"] is None and row["fa4_dense_error"] and row["speedup_vs_flex_flash"] is None


@pytest.mark.parametrize("kind, conc", [("iid", 0.0), ("clustered", 0.05)])
def test_one_prefill_row_on_cpu(kind, conc):
    args = bench.parse_args(["--q-heads", "4", "--kv-heads", "2", "--head-dim", "16", "--dtype", "float32"])
    args.device = "cpu"
    rows = []
    op = spdsl.build(spdsl.compile(bench.PATTERN.replace("unit 64", "unit 16")))
    dense = spdsl.build(spdsl.compile("pattern c { unit 16 causal attend all }"))

    def once(fn, reps, warm=1):
        fn()
        return 1.0

    bench.run_prefill(op, dense, args, kind, conc, 200, rows, timer=once)
    (row,) = rows
    assert row["phase"] == "prefill" and row["correct"] and row["err_bound"] <= args.eps
    assert row["flex_flash_ms"] is None and "CUDA" in row["flex_flash_error"]
