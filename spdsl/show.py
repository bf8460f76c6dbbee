"""Pictures of a pattern: the tile layout in the terminal, and PNG figures (matplotlib, lazy).

The terminal picture has one character per *cell*; a cell is a square of ``f x f`` tiles
(q-tiles down, kv-tiles across), ``f = ceil(max(n_q_tiles, n_kv_tiles) / width)`` (1 when the
grid fits). A cell shows

* full (``█``, ASCII ``#``) when every tile in it is visible and full (no element masked),
* partial (``▒``, ASCII ``+``) when at least one tile in it is visible but not all are full,
* empty (``·``, ASCII ``.``) when no tile in it is visible.

Cells at the right and bottom edges cover fewer tiles; the rule applies to the tiles they
cover. The grid is built from the layout's CSR in O(nnz) (a bincount over cells); no
tile-by-tile or token-by-token array is made, so 1M-token layouts draw instantly.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .core.layout import Layout
from .core.limits import require
from .errors import SpdError

GLYPHS = {"unicode": ("·", "▒", "█"), "ascii": (".", "+", "#")}  # empty, partial, full
COLOURS = ("#f7f7f7", "#f4a261", "#264653")  # empty, partial, full (PNG)


def cell_grid(layout: Layout, width: int) -> tuple[torch.Tensor, int]:
    """(grid int8 [rows, cols] with 0 empty / 1 partial / 2 full, f tiles per cell side)."""
    if not isinstance(width, int) or width < 1:
        raise ValueError(f"width must be an integer >= 1, got {width!r}")
    nq, nk = layout.n_q_tiles, layout.n_kv_tiles
    f = max(1, -(-max(nq, nk) // width))
    rows, cols = -(-nq // f), -(-nk // f)
    require("dense", rows * cols, f"a picture of {rows:,} x {cols:,} cells", "use a smaller --width")
    tile_row = torch.repeat_interleave(torch.arange(nq), layout.counts())
    cell = (tile_row // f) * cols + layout.kv_idx.long() // f
    seen = torch.bincount(cell, minlength=rows * cols)
    full = torch.bincount(cell[layout.kv_full], minlength=rows * cols)
    h = torch.clamp(nq - torch.arange(rows) * f, max=f)  # tiles per cell, by row and by column
    w = torch.clamp(nk - torch.arange(cols) * f, max=f)
    capacity = (h[:, None] * w[None, :]).reshape(-1)
    grid = torch.where(full == capacity, 2, torch.where(seen > 0, 1, 0)).to(torch.int8)
    return grid.view(rows, cols), f


def legend(layout: Layout, f: int, *, ascii: bool = False) -> str:
    """One line: glyphs, cell size, density of visible pairs and visible tiles per q-tile."""
    from .analyze import NOT_COUNTED, pair_density

    empty, partial, full = GLYPHS["ascii" if ascii else "unicode"]
    density = pair_density(layout)
    of = "causal pairs" if layout.ir.causal else "all pairs"
    share = f"{100 * density:.2f}% of {of}" if density is not None else NOT_COUNTED
    per_row = float(layout.counts().double().mean()) if layout.n_q_tiles else 0.0
    cell = f"1 char = {f}x{f} tiles" if f > 1 else "1 char = 1 tile"
    return (
        f"{full} full  {partial} partial  {empty} empty  ({cell} of {layout.block_q}x{layout.block_kv} tokens)  "
        f"density {share}, {per_row:.2f} of {layout.n_kv_tiles} kv tiles per q-tile"
    )


def render_layout(layout: Layout, width: int = 80, *, ascii: bool = False) -> str:
    """The tile layout as text: one line per cell row, then the legend line (see the module doc)."""
    grid, f = cell_grid(layout, width)
    glyphs = GLYPHS["ascii" if ascii else "unicode"]
    lines = ["".join(glyphs[v] for v in row) for row in grid.tolist()]
    return "\n".join([*lines, legend(layout, f, ascii=ascii)])


# ------------------------------------------------------------------------------------- PNG
def _matplotlib():
    """matplotlib, or an SpdError that says how to get it (it is an optional extra)."""
    try:
        import matplotlib
    except ImportError:
        raise SpdError(
            "PNG figures need matplotlib, which is not installed", hint="pip install 'spdsl[plot]'"
        ) from None
    return matplotlib


def _figure(width_in: float = 10, height_in: float = 4.5, dpi: int = 100):
    _matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def _plot_curves(ax, curves: list[tuple[str, dict]]) -> None:
    for label, res in curves:
        ys = [100 * f for f in res.get("receptive_by_layer", [])]
        xs = list(range(1, len(ys) + 1))
        if not ys:  # nothing grows: the query sees only itself
            xs, ys = [1], [100 * res["receptive_field"][0]["fraction"]]
        full = res.get("layers_to_full_reach")
        tag = f" (full reach: {full} layer{'s' if full != 1 else ''})" if full is not None else " (never full)"
        ax.plot(xs, ys, marker="o" if len(xs) < 40 else None, markersize=3, label=label + tag)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("layers")
    ax.set_ylabel("receptive field of the last query (% of tokens)")
    ax.set_ylim(0, 102)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")


def save_png(pattern, seq: int, path: str | Path, *, block: int = 128, results: dict | None = None) -> Path:
    """A 1000x450 px figure: the tile layout (axes in tokens) beside the receptive field by layer."""
    _matplotlib()
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    from .analyze import analyze

    ir = pattern.ir
    res = results if results is not None else analyze(pattern, seq, block=block)
    layout = pattern.layout(seq, seq, block, block)
    grid, f = cell_grid(layout, 400)
    fig = _figure()
    ax0, ax1 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.25]})
    span = f * block
    ax0.imshow(
        grid.numpy(),
        cmap=ListedColormap(COLOURS),
        vmin=0,
        vmax=2,
        interpolation="nearest",
        extent=(0, grid.shape[1] * span, grid.shape[0] * span, 0),
    )
    ax0.set_xlim(0, seq)
    ax0.set_ylim(seq, 0)
    ax0.set_xlabel("key position (tokens)")
    ax0.set_ylabel("query position (tokens)")
    ax0.set_title(f"{ir.name}: {block}x{block} tiles, density {100 * res['density']:.2f}%", fontsize=9)
    ax0.legend(
        handles=[Patch(color=c, label=t) for c, t in zip(COLOURS, ("empty", "partial", "full"))],
        fontsize=7,
        loc="upper right",
    )
    _plot_curves(ax1, [(ir.name, res)])
    ax1.set_title(f"seq {seq:,}", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def save_reach_png(curves: list[tuple[str, dict]], path: str | Path, *, title: str = "") -> Path:
    """Several patterns' receptive-field curves (``(label, analyze results)``) on one plot."""
    fig = _figure()
    ax = fig.subplots()
    _plot_curves(ax, curves)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    """Write ``fig`` to exactly ``path``: PNG unless its suffix names another format matplotlib writes."""
    path = Path(path)
    if path.is_dir():
        raise SpdError(f"cannot write a figure to {path}: it is a folder", hint=f"name a file: {path / 'figure.png'}")
    if path.parent and not path.parent.exists():
        raise FileNotFoundError(f"cannot write {path}: no such directory {path.parent}")
    kinds = fig.canvas.get_supported_filetypes()
    kind = path.suffix[1:].lower()
    if kind and kind not in kinds:
        raise SpdError(
            f"cannot write a figure to {path}: matplotlib does not write {path.suffix!r} files",
            hint=f"end the name in .png (or one of {', '.join('.' + k for k in sorted(kinds))})",
        )
    fig.savefig(path, dpi=fig.dpi, format=kind or "png")  # no suffix: PNG at exactly this path (not path.png)
    return path
