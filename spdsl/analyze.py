"""Pattern analysis: density, tiles per row, decode bytes and reachability over stacked layers.

Everything is computed exactly, without an N x N array:

* **density** -- visible (q, k) token pairs / allowed pairs (``seq*(seq+1)/2`` for causal
  patterns, ``seq**2`` otherwise). Pairs are counted tile by tile on the :class:`Layout`: a full
  tile adds its in-range area; a partial tile is refined at unit boundaries (as the layout
  itself does) until each piece is all-kept or all-dropped by the IR, and an all-kept piece
  adds its area -- or, for causal patterns, its count of ``k <= q`` cells in closed form.
* **decode** -- one decode step of the query at position ``seq - 1`` reads the K and V of its
  visible keys: ``decode_bytes = decode_keys * 2 * kv_heads * head_dim * dtype_bytes`` where
  ``decode_keys`` is the number of visible key *tokens* (the minimum any kernel must read).
  ``decode_tile_bytes`` is the same for a tiled kernel that reads whole ``block``-token kv
  tiles (the last row of the layout; tiles clipped to the sequence).

Reachability over stacked layers (``layers_to_full_reach``, ``receptive_field``) lives in
:mod:`spdsl.reach`.
"""

from __future__ import annotations

import torch

from .core.ir import PatternIR
from .core.layout import Layout
from .errors import SpdError
from .pattern import as_ir
from .reach import connected_fraction, reach, refine_within_limit, unit_graph

_I64 = torch.int64


# ------------------------------------------------------------------------------------ counting
def _causal_area(a, b, c, d):
    """Number of cells (q, k) in [a, b] x [c, d] with k <= q (int64 tensors, elementwise)."""
    lo, hi = torch.maximum(a, c), torch.minimum(b, d)
    n1 = (hi - lo + 1).clamp(min=0)
    s1 = n1 * ((lo - c + 1) + (hi - c + 1)) // 2
    n2 = (b - torch.maximum(a, d + 1) + 1).clamp(min=0)
    return s1 + n2 * (d - c + 1)


def _count_rects(ir: PatternIR, p0, p1, k0, k1) -> int:
    """Visible token pairs in the given token rectangles (refined at unit boundaries)."""
    total = 0
    live = (lambda r: _causal_area(r.p0, r.p1, r.k0, r.k1) > 0) if ir.causal else None
    task = f"counting the visible pairs of {ir.name} ({p0.numel():,} partial tiles refined at unit boundaries)"
    hint = "use a shorter sequence (--seq)"
    for r in refine_within_limit(ir, p0, p1, k0, k1, live=live, task=task, hint=hint):
        a, b, c, d = r.p0[r.all], r.p1[r.all], r.k0[r.all], r.k1[r.all]
        total += int((_causal_area(a, b, c, d) if ir.causal else (b - a + 1) * (d - c + 1)).sum())
    return total


def visible_pairs(layout: Layout) -> int:
    """Exact number of visible (query row, key) pairs of a layout, in O(nnz + partial-tile work)."""
    rows = torch.repeat_interleave(torch.arange(layout.n_q_tiles, dtype=_I64), layout.counts())
    tiles = layout.kv_idx.long()
    i0 = rows * layout.block_q
    p0 = layout.q_offset + i0
    p1 = layout.q_offset + torch.clamp(i0 + layout.block_q, max=layout.q_len) - 1
    k0 = tiles * layout.block_kv
    k1 = torch.clamp(k0 + layout.block_kv, max=layout.kv_len) - 1
    full = layout.kv_full
    total = int(((p1 - p0 + 1) * (k1 - k0 + 1))[full].sum())
    part = ~full
    return total + _count_rects(layout.ir, p0[part], p1[part], k0[part], k1[part])


def allowed_pairs(layout: Layout) -> int:
    """Pairs full attention would allow: ``k <= q`` (within the keys) for causal patterns, else all."""
    if not layout.ir.causal:
        return layout.q_len * layout.kv_len
    # the sum over query positions p of clamp(p + 1, 0, kv_len), in closed form: O(1), not O(q_len)
    a, b, n = layout.q_offset + 1, layout.q_offset + layout.q_len, layout.kv_len
    lo, hi = max(a, 1), min(b, n - 1)
    ramp = (lo + hi) * (hi - lo + 1) // 2 if hi >= lo else 0
    return ramp + max(0, b - max(a, n) + 1) * n


def pair_density(layout: Layout) -> float | None:
    """Visible over allowed pairs of ``layout``, or None when counting them is refused (the ``tiles``
    limit; see :func:`_count_rects`): pictures and ``spdsl build`` then print without it."""
    try:
        vis = visible_pairs(layout)
    except SpdError:
        return None
    allowed = allowed_pairs(layout)
    return vis / allowed if allowed else 0.0


#: What :func:`pair_density`'s callers print when it is None.
NOT_COUNTED = "not counted (over the SPDSL_MAX_TILES limit)"


# ------------------------------------------------------------------------- the node graph
def _check_int(name: str, v, least: int) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < least:
        raise ValueError(f"{name} must be an integer >= {least}, got {v!r}")
    return v


def receptive_points(curve: list[int], seq: int, cap: int = 1 << 20) -> list[dict]:
    """``[{layers: L, fraction: f}]`` for L = 1, 2, 4, ... until the fraction stops growing."""
    out, L = [], 1
    while cap >= L:
        count = curve[min(L, len(curve)) - 1] if curve else 1
        out.append({"layers": L, "fraction": count / seq})
        if count == seq or len(curve) <= L:
            break
        L *= 2
    return out


def analyze(
    pattern, seq: int, *, block: int = 128, head_dim: int = 128, kv_heads: int = 8, dtype_bytes: int = 2
) -> dict:
    """Density, tiles per row, decode bytes and reachability of ``pattern`` at ``seq`` tokens.

    Keys: ``density``, ``visible_pairs``, ``allowed_pairs``, ``tiles_per_row`` (mean visible kv
    tiles per q-tile at ``block`` x ``block`` tiles), ``decode_keys``, ``decode_bytes``,
    ``decode_tile_bytes``, ``layers_to_full_reach`` (None when some allowed pair is never linked),
    ``longest_shortest_path`` (max over linked allowed pairs of the fewest layers linking them),
    ``worst_pair`` ([q, k]: last token of the query's node, first token of the key's node) and
    ``worst_distance`` (q - k), ``connected_fraction``, ``receptive_field`` (``[{layers, fraction}]``
    for L = 1, 2, 4, ...: the fraction of positions 0..seq-1 whose information reaches the query at
    seq - 1), ``receptive_by_layer`` (that fraction for L = 1, 2, 3, ... until it stops growing),
    and ``name``, ``params``, ``unit``, ``causal``, ``seq``, ``block``, ``graph_nodes``,
    ``node_tokens`` (the reach graph's nodes). See the module docstring for the exact semantics.
    """
    ir = as_ir(pattern)
    seq, block = _check_int("seq", seq, 1), _check_int("block", block, 1)
    for name, v in (("head_dim", head_dim), ("kv_heads", kv_heads), ("dtype_bytes", dtype_bytes)):
        _check_int(name, v, 1)
    per_key = 2 * kv_heads * head_dim * dtype_bytes
    lay = Layout(ir, seq, seq, block, block)
    vis, allowed = visible_pairs(lay), allowed_pairs(lay)
    # decode: the last query row's visible keys, counted on its layout (O(its tiles), not O(seq))
    row = Layout(ir, 1, seq, block, block)
    decode_keys = visible_pairs(row)
    t0 = row.kv_idx.long() * block
    decode_tile_keys = int((torch.clamp(t0 + block, max=seq) - t0).sum())
    g = unit_graph(ir, seq)
    res = reach(g)
    curve = [1, *res["curve"]]  # the last query's reach by layer from L = 0, without its final plateau
    while len(curve) > 1 and curve[-1] == curve[-2]:
        curve.pop()
    curve = curve[1:]
    worst = res["worst"]
    pair = None
    if worst is not None:
        pair = [min(seq, (worst[0] + 1) * g.tokens) - 1, worst[1] * g.tokens]
    return {
        "name": ir.name,
        "params": dict(ir.params),
        "unit": ir.unit,
        "causal": ir.causal,
        "seq": seq,
        "block": block,
        "density": vis / allowed,
        "visible_pairs": vis,
        "allowed_pairs": allowed,
        "tiles_per_row": float(lay.counts().double().mean()),
        "decode_keys": decode_keys,
        "decode_bytes": decode_keys * per_key,
        "decode_tile_bytes": decode_tile_keys * per_key,
        "layers_to_full_reach": res["full_at"],
        "longest_shortest_path": res["longest"],
        "worst_pair": pair,
        "worst_distance": None if pair is None else pair[0] - pair[1],
        "connected_fraction": connected_fraction(g, res),
        "receptive_field": receptive_points(curve, seq),
        "receptive_by_layer": [c / seq for c in curve],
        "graph_nodes": g.n,
        "node_tokens": g.tokens,
    }


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def format_report(results: dict, name: str) -> str:
    """A short multi-line terminal report of :func:`analyze` results."""
    r = results
    params = ", ".join(f"{k}={v}" for k, v in r["params"].items())
    mode = "causal" if r["causal"] else "bidirectional"
    of = "causal pairs" if r["causal"] else "all pairs"
    full = r["layers_to_full_reach"]
    lines = [
        f"{name}  {r['name']}({params})  unit {r['unit']}, {mode}, seq {r['seq']:,}, tiles {r['block']}",
        f"  density                {100 * r['density']:.3f}% of {of} ({r['visible_pairs']:,} visible)",
        f"  tiles per q-tile       {r['tiles_per_row']:.2f}",
        f"  decode step reads      {_bytes(r['decode_bytes'])} of K/V ({r['decode_keys']:,} keys); "
        f"{_bytes(r['decode_tile_bytes'])} in whole {r['block']}-token tiles",
        "  layers to full reach   "
        + (str(full) if full is not None else f"never ({100 * r['connected_fraction']:.2f}% of allowed pairs linked)"),
    ]
    if r["worst_pair"] is not None:
        (q, k), n = r["worst_pair"], r["longest_shortest_path"]
        lines.append(
            f"  longest shortest path  {n} layer{'s' if n != 1 else ''} "
            f"(e.g. key {k:,} -> query {q:,}, distance {r['worst_distance']:,})"
        )
    rf = "  ".join(f"L={p['layers']}: {100 * p['fraction']:.1f}%" for p in r["receptive_field"])
    lines.append(f"  receptive field        {rf}")
    return "\n".join(lines)
