"""``spdsl build``: write a pattern's standalone module (torch + triton only), optionally check it.

Adds its command to :data:`spdsl.cli_common.app` (:mod:`spdsl.cli` imports it).

``spdsl build FILE [-D k=v] [--pattern NAME] [-o DIR] [--check]`` renders the module with
:func:`spdsl.codegen.render_module` (the runtime's default tile configs), writes ``DIR/<pattern>.py``
atomically (temp file in ``DIR`` + ``os.replace``), and prints where it wrote, the module's size and
the pattern's density at a typical length. ``--check`` imports the written file and runs it on a
small input against the fp64 reference: on CUDA when present, else under the Triton interpreter.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Annotated

import typer

from .cli_common import DebugOpt, DefinesOpt, PatternOpt, app, cli_errors, console, debug_enabled, load_from_cli
from .errors import SpdError

#: Sequence length at which ``build`` reports the pattern's density (128 x 128 tiles).
DENSITY_SEQ = 8192
DENSITY_BLOCK = 128

#: ``--check`` input: B, Hq, Hkv, S, D.
CHECK_SHAPE = (1, 2, 1, 300, 64)
#: Max abs error allowed against the fp64 reference (outputs are O(1): softmax-weighted N(0, 1) values).
CHECK_TOL = {"float32": 1e-4, "float16": 4e-3}


class CheckFailed(ValueError):
    """The generated module's output is off the reference by more than the tolerance."""


def density_line(pattern, seq: int = DENSITY_SEQ, block: int = DENSITY_BLOCK) -> str:
    """``density at 8192 tokens (128x128 tiles): 9.4 of 64 kv tiles per q-tile (max 12), ...``."""
    from .analyze import NOT_COUNTED, pair_density

    lay = pattern.layout(seq, seq, block, block)
    counts = lay.counts()
    mean = lay.nnz / max(lay.n_q_tiles, 1)
    most = int(counts.max()) if counts.numel() else 0
    kind = "causal pairs" if pattern.causal else "pairs"
    frac = pair_density(lay)
    share = f"{100 * frac:.2f}% of {kind}" if frac is not None else f"{kind} {NOT_COUNTED}"
    return (
        f"density at {seq} tokens ({block}x{block} tiles): {mean:.1f} of {lay.n_kv_tiles} kv tiles per q-tile "
        f"(max {most}; {lay.n_full} of {lay.nnz} tiles full), {share}"
    )


@contextlib.contextmanager
def _interpreter_env(on: bool):
    """``TRITON_INTERPRET=1`` while inside (only when ``on``); the previous value comes back after."""
    old = os.environ.get("TRITON_INTERPRET")
    if on:
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if on:
            if old is None:
                os.environ.pop("TRITON_INTERPRET", None)
            else:
                os.environ["TRITON_INTERPRET"] = old


def run_check(path: Path, pattern) -> dict:
    """Import the module at ``path`` and compare it with the fp64 reference on a small input.

    CUDA (fp16) when available, else the Triton interpreter (fp32) on CPU. Returns a dict with
    ``device``, ``dtype``, ``shape``, ``max_abs``, ``rel``, ``lse_abs``, ``tol``, ``ok``.
    """
    import torch

    from . import reference

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = torch.float16 if cuda else torch.float32
    B, Hq, Hkv, S, D = CHECK_SHAPE
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, h, S, D, generator=g) for h in (Hq, Hkv, Hkv))
    q, k, v = (t.to(device=device, dtype=dtype) for t in (q, k, v))
    with _interpreter_env(not cuda):
        # the interpreter must be on before the module's kernels are defined (import) and at call time
        from .cache import import_generated

        module = import_generated(path, f"_spdsl_check_{pattern.name}_{os.getpid()}_{id(path)}")
        out, lse = module.attention(q, k, v, return_lse=True)
        if cuda:
            torch.cuda.synchronize()
    ref, ref_lse = reference.attention(pattern, q.cpu(), k.cpu(), v.cpu(), return_lse=True)
    out, lse = out.detach().cpu().double(), lse.detach().cpu().double()
    max_abs = float((out - ref).abs().max()) if out.numel() else 0.0
    finite = torch.isfinite(ref_lse)
    same_empty = bool(torch.equal(finite, torch.isfinite(lse)))
    lse_abs = float((lse[finite] - ref_lse[finite]).abs().max()) if bool(finite.any()) else 0.0
    rel = max_abs / max(float(ref.abs().max()) if ref.numel() else 0.0, 1e-30)
    tol = CHECK_TOL[str(dtype).removeprefix("torch.")]
    ok = bool(torch.isfinite(out).all()) and same_empty and max_abs <= tol and lse_abs <= tol
    return {
        "device": "cuda" if cuda else "cpu (Triton interpreter)",
        "dtype": str(dtype).removeprefix("torch."),
        "shape": f"B{B} H{Hq} Hkv{Hkv} S{S} D{D}",
        "max_abs": max_abs,
        "rel": rel,
        "lse_abs": lse_abs,
        "empty_rows_match": same_empty,
        "tol": tol,
        "ok": ok,
    }


def _write_module(target: Path, text: str) -> None:
    """Write the module atomically; an output folder that cannot be made or written is an SpdError."""
    from .cache import write_atomic

    folder = target.parent
    how = "-o names the folder to write into (created if missing)"
    if folder.exists() and not folder.is_dir():
        raise SpdError(f"cannot write {target}: {folder} is a file, not a folder", hint=how)
    try:
        write_atomic(target, text)
    except OSError as e:
        raise SpdError(f"cannot write {target}: {e.strerror or e}", hint=f"{how}; pick one you can write") from None


@app.command()
def build(
    file: Annotated[Path, typer.Argument(help="The .spd file.", show_default=False)],
    define: DefinesOpt = None,
    pattern: PatternOpt = None,
    out: Annotated[
        Path,
        typer.Option("--out", "-o", metavar="DIR", help="Folder to write <pattern>.py into (created if missing)."),
    ] = Path("."),
    check: Annotated[
        bool,
        typer.Option("--check", help="Run the written module on a small input against the fp64 reference."),
    ] = False,
    debug: DebugOpt = False,
) -> None:
    """Write a standalone Python module (torch + triton only) with the pattern's Triton kernels."""
    from .codegen import BuildSpec, render_module
    from .runtime import DEFAULT_CONFIGS

    debug = debug_enabled(debug)
    con = console()
    with cli_errors(debug):
        p = load_from_cli(file, define, pattern)
        text = render_module(BuildSpec(p.ir, p.source, DEFAULT_CONFIGS))
        target = Path(out) / f"{p.name}.py"
        _write_module(target, text)
        n_lines = text.count("\n") + (not text.endswith("\n"))
        kib = len(text.encode("utf-8")) / 1024
        con.print(f"wrote {target} ({n_lines} lines, {kib:.1f} KiB)")
        con.print(density_line(p))
        if check:
            res = run_check(target, p)
            con.print(
                f"check on {res['device']}, {res['dtype']}, {res['shape']}: max abs error {res['max_abs']:.3g}, "
                f"relative {res['rel']:.3g}, LSE abs error {res['lse_abs']:.3g} (tolerance {res['tol']:g})"
            )
            if not res["ok"]:
                why = "empty rows differ from the reference" if not res["empty_rows_match"] else "error above tolerance"
                raise CheckFailed(f"check failed for {target}: {why}")
            con.print("check ok")
