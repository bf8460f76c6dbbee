"""``spdsl show`` and ``spdsl analyze``: pictures and figures of patterns (commands on ``cli_common.app``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from .cli_common import DebugOpt, DefinesOpt, PatternOpt, app, cli_errors, load_from_cli, summary

#: Token positions (and so lengths and tile sizes) are int32 throughout (:data:`spdsl.core.ir.INT_LIMIT`).
_MAX_TOKENS = 2**31 - 1
SeqOpt = Annotated[
    int, typer.Option("--seq", "-n", min=1, max=_MAX_TOKENS, metavar="N", help="Sequence length in tokens.")
]
BlockOpt = Annotated[
    int, typer.Option("--block", min=1, max=_MAX_TOKENS, help="Kernel tile size (q and kv), in tokens.")
]
PngOpt = Annotated[Path | None, typer.Option("--png", metavar="PATH", help="Also write a PNG figure here.")]


def _can_print_unicode() -> bool:
    try:
        "█▒·".encode(sys.stdout.encoding or "ascii")
    except (LookupError, UnicodeEncodeError):
        return False
    return True


@app.command()
def show(
    file: Annotated[Path, typer.Argument(metavar="FILE", help=".spd file.", show_default=False)],
    seq: SeqOpt = 8192,
    define: DefinesOpt = None,
    pattern: PatternOpt = None,
    block: BlockOpt = 128,
    width: Annotated[int, typer.Option("--width", min=1, help="Picture width in characters.")] = 80,
    png: PngOpt = None,
    ascii: Annotated[bool, typer.Option("--ascii", help="Draw with # + . instead of block glyphs.")] = False,
    debug: DebugOpt = False,
) -> None:
    """Picture of the tile layout at --seq tokens (full / partial / empty tiles) and its density.

    A character stands for a square of tiles when the grid is wider than --width: full if all
    its tiles are full, partial if any is visible, empty otherwise. --png adds a figure: the
    layout beside the receptive field by layer.
    """
    from .show import render_layout, save_png

    with cli_errors(debug):
        p = load_from_cli(file, define, pattern)
        layout = p.layout(seq, seq, block, block)
        picture = render_layout(layout, width, ascii=ascii or not _can_print_unicode())
        typer.echo(f"{file}: {p.name}  {summary(p)}")
        typer.echo(
            f"seq {seq:,} tokens: {layout.n_q_tiles} x {layout.n_kv_tiles} tiles of {block} tokens, "
            f"{layout.nnz:,} visible ({layout.n_full:,} full)"
        )
        typer.echo(picture)
        if png is not None:
            typer.echo(f"wrote {save_png(p, seq, png, block=block)}")


@app.command()
def analyze(
    files: Annotated[list[Path], typer.Argument(metavar="FILE...", help=".spd files.", show_default=False)],
    seq: SeqOpt = 32768,
    define: DefinesOpt = None,
    pattern: PatternOpt = None,
    block: BlockOpt = 128,
    kv_heads: Annotated[int, typer.Option("--kv-heads", min=1, help="KV heads, for decode bytes.")] = 8,
    head_dim: Annotated[int, typer.Option("--head-dim", min=1, help="Head dimension, for decode bytes.")] = 128,
    dtype_bytes: Annotated[int, typer.Option("--dtype-bytes", min=1, help="Bytes per K/V element.")] = 2,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON: one object per file.")] = False,
    markdown: Annotated[bool, typer.Option("--markdown", help="Print a Markdown table, one row per file.")] = False,
    png: PngOpt = None,
    match: Annotated[
        Path | None,
        typer.Option(
            "--match-density", metavar="REF.spd", help="Set --vary so each FILE's density at --seq meets REF's."
        ),
    ] = None,
    vary: Annotated[
        str | None, typer.Option("--vary", metavar="PARAM", help="The parameter --match-density chooses.")
    ] = None,
    debug: DebugOpt = False,
) -> None:
    """Density, tiles per q-tile, decode bytes, layers to full reach and receptive field at --seq.

    Reach counts stacked layers with the residual stream: the information of key k reaches query
    q after L layers when a chain of at most L attention steps links them. --json prints one
    object per file (a single object for a single file); --png plots every file's receptive
    field curve on one figure.
    """
    from .analyze import analyze as run_analysis
    from .analyze import format_report
    from .show import save_reach_png

    if (match is None) != (vary is None):
        raise typer.BadParameter("give --match-density REF.spd and --vary PARAM together", param_hint="--vary")
    with cli_errors(debug):
        patterns = [(f, load_from_cli(f, define, pattern)) for f in files]
        matched = {}
        if match is not None:
            from .density import density_at, match_density

            target = density_at(load_from_cli(match, None), seq, block)
            for i, (f, p) in enumerate(patterns):
                m = match_density(p, vary, target, seq)
                patterns[i] = (f, m.pattern)
                matched[f] = {
                    "param": vary,
                    "value": m.value,
                    "density": m.density,
                    "target": target,
                    "ref": str(match),
                }
        results = []
        for f, p in patterns:
            res = run_analysis(p, seq, block=block, head_dim=head_dim, kv_heads=kv_heads, dtype_bytes=dtype_bytes)
            if f in matched:
                res["matched"] = matched[f]
                if not (as_json or markdown):
                    m = matched[f]
                    typer.echo(
                        f"{f}: {vary}={m['value']} gives density {100 * m['density']:.3f}% "
                        f"(target {100 * m['target']:.3f}%, {match} at seq {seq:,})"
                        + (f"; no {vary} reaches the target, this is the closest" if m["out_of_reach"] else "")
                    )
            results.append(res | {"file": str(f)})
            if not (as_json or markdown):
                typer.echo(format_report(res, str(f)))
        if as_json:
            typer.echo(json.dumps(results[0] if len(results) == 1 else results, indent=2))
        elif markdown:
            typer.echo(markdown_table(results))
        if png is not None:
            curves = [(f"{r['name']} ({Path(r['file']).name})", r) for r in results]
            out = save_reach_png(curves, png, title=f"receptive field of the last query, seq {seq:,}")
            typer.echo(f"wrote {out}", err=as_json)


def markdown_table(results: list[dict]) -> str:
    """One Markdown row per analyzed file: density, tiles per q-tile, decode bytes, reach."""
    rows = [
        "| file | pattern | seq | density | tiles / q-tile | decode K/V per step | layers to full reach |",
        "|---|---|--:|--:|--:|--:|--:|",
    ]
    for r in results:
        params = ", ".join(f"{k}={v}" for k, v in r["params"].items())
        full = r["layers_to_full_reach"]
        reach = str(full) if full is not None else f"never ({100 * r['connected_fraction']:.1f}% linked)"
        rows.append(
            f"| `{Path(r['file']).name}` | `{r['name']}({params})` | {r['seq']:,} | {100 * r['density']:.2f}% "
            f"| {r['tiles_per_row']:.2f} | {r['decode_bytes'] / 2**20:.2f} MiB | {reach} |"
        )
    return "\n".join(rows)
