"""What every benchmark script shares: the timer, the results file and the table cells."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch


def bench(fn, warmup: int = 100, rep: int = 400) -> float:
    """Median milliseconds of ``fn`` (triton.testing.do_bench; warmup and rep in milliseconds)."""
    import triton

    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def timed(fn, reps: int, warm: int = 1) -> float:
    """Mean wall ms of ``reps`` calls after ``warm`` ones, synchronized (host cost included)."""
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3 / reps


def write_results(path: str | Path, rows: list[dict], **extra) -> None:
    """``{"gpu", "torch", "triton", "spdsl", "command", **extra, "rows"}`` as JSON at ``path``."""
    import triton

    import spdsl

    doc = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "spdsl": spdsl.__version__,
        "command": "python " + " ".join(sys.argv),
        **extra,
        "rows": rows,
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(doc, indent=1))


def cell(x, width: int = 9, digits: int = 3) -> str:
    """A right-aligned table cell: the float to ``digits`` places, or '-' when missing."""
    return f"{x:{width}.{digits}f}" if isinstance(x, float) else f"{'-':>{width}s}"
