"""The L-layer reach sets of every unit: which key units' information reaches which query units.

:mod:`spdsl.reach` answers "how many layers until everything is linked" with a bitset search; this
module answers, for a fixed number of layers, the whole matrix -- what an experiment needs to score
each (query, key) pair as reachable or not. It is built from the same exact unit graph
(:func:`spdsl.reach.unit_graph`, semantics in that module's docstring): for tokens q != k in units
Q and K, q's state after L layers depends on k iff ``within(L)[Q, K]``.

>>> import spdsl
>>> from spdsl.reach_sets import reach_within
>>> p = spdsl.compile("pattern w() { unit 4 causal attend local(2) }")
>>> reach_within(p, 16, 2).astype(int).tolist()
[[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [0, 1, 1, 1]]
"""

from __future__ import annotations

import numpy as np

from .pattern import as_ir
from .reach import unit_graph

#: Dense boolean matrices: n**2 bytes and n**3 per layer; the experiment's graphs hold a few hundred units.
MAX_UNITS = 4096


def unit_edges(pattern, seq: int) -> np.ndarray:
    """bool [n, n]: unit Q attends unit K (``keep(Q, K)``, and ``K <= Q`` when causal)."""
    ir = as_ir(pattern)
    n = -(-seq // ir.unit)
    if n > MAX_UNITS:
        raise ValueError(f"{n:,} units at seq={seq:,} (unit {ir.unit}): reach sets are dense, at most {MAX_UNITS:,}")
    g = unit_graph(ir, seq)
    if g.r != 1:  # pragma: no cover - only above FINE_NODES, which MAX_UNITS stays under
        raise ValueError("reach sets need the unit graph")
    edges = np.zeros((g.n, g.n), dtype=bool)
    for row, a, b in zip(g.rows.tolist(), g.a.tolist(), g.b.tolist()):
        edges[row, a : b + 1] = True
    return edges


def reach_within(pattern, seq: int, layers: int) -> np.ndarray:
    """bool [n, n]: K's information reaches Q within ``layers`` layers (walks of 1..layers unit edges).

    Parameters
    ----------
    pattern: a Pattern or PatternIR.
    seq: tokens (the units are ``ceil(seq / unit)``).
    layers: stacked attention layers, >= 1.

    Returns
    -------
    The reach matrix; row Q, column K. The diagonal says whether a unit's tokens see each other.
    """
    return hops(pattern, seq, layers) > 0


def hops(pattern, seq: int, max_layers: int) -> np.ndarray:
    """int [n, n]: the fewest layers linking K to Q (0 where ``max_layers`` do not)."""
    if not isinstance(max_layers, int) or isinstance(max_layers, bool) or max_layers < 1:
        raise ValueError(f"layers must be an integer >= 1, got {max_layers!r}")
    edges = unit_edges(pattern, seq)
    step = edges.astype(np.float32)
    out = np.where(edges, 1, 0).astype(np.int32)
    within = edges.copy()
    for layer in range(2, max_layers + 1):
        grown = within | ((within.astype(np.float32) @ step) > 0)
        out[grown & ~within] = layer
        if np.array_equal(grown, within):
            break
        within = grown
    return out
