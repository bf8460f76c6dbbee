"""Reachability over stacked layers of a pattern, on its exact unit (or node) graph.

**Stacking layers.** Layer after layer, the hidden state of query token q is computed from the
states of the keys it sees *and its own* (the residual stream). Information of token k reaches
q after L layers iff there is a chain q = t0, t1, ..., tL = k where each step either stays
(t_{i+1} = t_i) or is an attention edge (t_i sees t_{i+1}): in matrix terms ``(I | M)**L``
with M the token-level mask. A pair is *allowed* when full attention would link it:
``k <= q`` for causal patterns, every pair otherwise.

**Why the unit graph is exact.** The predicate depends on units only; the causal cut is per
token. Let S_L(Q) be the units K such that some walk of 1..L unit edges leads from Q to K (a
unit edge Q -> K: ``keep(Q, K)``, and ``K <= Q`` when causal). Then for tokens q != k:
q reaches k within L layers iff ``K in S_L(Q)``. Non-causal: tokens of one unit have identical
neighbourhoods (twins), so any unit walk can be realized by tokens and vice versa; for q, k in
the same unit a walk must leave and come back (or use the unit's self-loop). Causal: token
positions never increase along a chain, so a chain from q to a lower unit never needs a step
inside a unit (every token of a lower unit lies before every token of q's unit, so steps
between different units are unconstrained by token order); a pair q > k inside one unit is
reached iff ``keep(Q, Q)`` (one layer), because a chain between them cannot leave the unit.
Where whole groups of ``r`` units (a *node* of ``r * unit`` tokens) are all-or-nothing in the
pattern (e.g. dense ``all``; checked exactly with the IR's ``classify``), the same argument
holds for nodes, and long unit-1 sequences are analyzed on the coarser graph. Otherwise the
unit graph is used, up to the ``reach_nodes`` limit (:mod:`spdsl.core.limits`; SpdError above it).

Reachability runs as a breadth-first search from all nodes at once on bitsets (numpy uint64):
``S_L(Q) = OR over edges Q -> K of (S_{L-1}(K) | {K})``. Each row's neighbours are unions of
runs of consecutive nodes; a run is answered with O(1) gathers from per-layer prefix/suffix
ORs inside 64-row blocks and a sparse table over blocks. Cost per layer O(#runs * n / 64)
words (halved for causal patterns: row Q only has bits <= Q). Measured on a 16-core host:
``power.spd`` at 1M tokens (4096 nodes, 11 layers) 0.2 s, at 4M (16384 nodes) 1.8 s; a
sliding window at 1M (4096 nodes, 512 layers) 2.7 s.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .core.ir import PatternIR, TorchOps
from .core.limits import LIMITS, cost, limit, require
from .core.refine import refine_exact, settle
from .errors import SpdError
from .pattern import as_ir

#: Node count up to which the unit graph is used directly (above it a coarser exact graph is tried).
FINE_NODES = 4096
#: The largest graph the search accepts is the ``reach_nodes`` limit (bitsets: ~ n**2 bytes in all);
#: its work (64-bit word operations, estimated from the graph before the search) the ``reach_words`` limit.
_HINT = "use a smaller --seq, or a pattern with a larger unit"
_BLK = 64  # rows per block of the range-OR structure
_SHORT = 3  # runs up to this long are gathered row by row
_I64 = torch.int64


def refine_within_limit(ir: PatternIR, p0, p1, k0, k1, *, task: str, hint: str, **kw):
    """:func:`~spdsl.core.refine.refine_exact`, refused (``tiles`` limit) before a round would take the
    pieces examined past the limit.

    Refinement can take one piece per unit cell (``every(2)`` at unit 1 is a checkerboard), so its
    work is not known from the tile count: it is added up round by round, each round's pieces
    (twice the previous round's undecided ones) counted before the round runs.
    """
    live, cap = kw.get("live"), limit("tiles")
    examined = p0.numel()
    require("tiles", examined, task, hint)
    for pieces in refine_exact(ir, p0, p1, k0, k1, **kw):
        yield pieces
        todo = pieces.any & ~pieces.all & ~pieces.stuck
        if live is not None:
            todo &= live(pieces)
        examined += 2 * int(todo.sum())
        if examined > cap:  # a lower bound: how many more rounds would follow is not known
            raise SpdError(
                f"{task} needs more than {cost('tiles', examined)} and is still refining, "
                f"over the limit of {cost('tiles', cap)}",
                hint=f"{hint}; or raise the limit, e.g. {LIMITS['tiles'][1]}={4 * examined:d}",
            )


class _Graph:
    """Nodes of ``r`` units; ``runs`` (row, a, b): row's out-edges to nodes a..b (self-loop included)."""

    def __init__(self, seq: int, unit: int, r: int, causal: bool, runs):
        self.seq, self.unit, self.r, self.causal = seq, unit, r, causal
        self.tokens = unit * r  # tokens per node
        self.n = -(-seq // self.tokens)
        starts = np.arange(self.n, dtype=np.int64) * self.tokens
        self.sizes = np.minimum(starts + self.tokens, seq) - starts
        self.rows, self.a, self.b = runs


def _merge_runs(rows, a, b):
    """Sort runs by (row, start) and merge overlapping or touching ones."""
    order = np.lexsort((a, rows))
    rows, a, b = rows[order], a[order], b[order]
    if rows.size == 0:
        return rows, a, b
    new = np.ones(rows.size, dtype=bool)
    new[1:] = (rows[1:] != rows[:-1]) | (a[1:] > b[:-1] + 1)
    starts = np.flatnonzero(new)
    return rows[starts], a[starts], np.maximum.reduceat(b, starts)


def _node_runs(ir: PatternIR, n0: int, r: int):
    """Edge runs between nodes of r units, exact by the refinement engine; None if some node pair is mixed.

    Seeds are the expression's candidate key intervals (as the layout uses); each seed is split
    at node boundaries until it is all kept or none, so the work is O(runs * log n) per row.
    """
    n, N = -(-n0 // r), ir.unit
    i = torch.arange(n, dtype=_I64)
    bound = (i - 1 if r > 1 else i) if ir.causal else torch.full((n,), n - 1, dtype=_I64)
    Qa, Qb = i * r, torch.clamp(i * r + r, max=n0) - 1
    lo, hi = torch.broadcast_tensors(*ir.expr.candidates(Qa, Qb, n0 - 1, max(1, n * n0 >> 23)))  # <= ~8M seeds
    row = i[:, None].expand_as(lo).reshape(-1)
    a, b = lo.reshape(-1).clamp(min=0) // r, torch.minimum(hi.reshape(-1).clamp(max=n0 - 1) // r, bound[row])
    ok = b >= a
    i, a, b = (torch.from_numpy(x) for x in _merge_runs(row[ok].numpy(), a[ok].numpy(), b[ok].numpy()))
    Ka, Kb = a * r, torch.clamp(b * r + r, max=n0) - 1
    Qa, Qb = i * r, torch.clamp(i * r + r, max=n0) - 1
    out = []
    task = f"the reach graph of {ir.name} on {n:,} nodes of {r * N:,} tokens (refined at node boundaries)"
    for p in refine_within_limit(ir, Qa * N, Qb * N + N - 1, Ka * N, Kb * N + N - 1, grain=r, task=task, hint=_HINT):
        if bool(p.stuck.any()):
            return None
        node_a, node_b = p.k0 // N // r, p.k1 // N // r
        out.append((i[p.origin[p.all]], node_a[p.all], node_b[p.all]))
    if r > 1 and ir.causal:
        diag = _diag_loops(ir, n0, r)
        if diag is None:
            return None
        out.append((diag, diag, diag))
    rows, a, b = (torch.cat([o[j] for o in out]).numpy() if out else np.zeros(0, np.int64) for j in range(3))
    return _merge_runs(rows, a, b)


def _lower_rects(m: int):
    """Unit rectangles (qs, qe, ks, ke, is_diag_cell) tiling the lower triangle of an m x m square."""
    out, stack = [], [(0, m - 1)]
    while stack:
        s, e = stack.pop()
        if s == e:
            out.append((s, s, s, s, True))
            continue
        h = s + (e - s + 1) // 2
        out.append((h, e, s, h - 1, False))
        stack += [(s, h - 1), (h, e)]
    return out


def _diag_loops(ir: PatternIR, n0: int, r: int):
    """Causal nodes whose every pair k < q (inside the node) is visible; None if some node is mixed."""
    n = -(-n0 // r)
    i = torch.arange(n, dtype=_I64)
    lo, hi = i * r, torch.clamp(i * r + r, max=n0) - 1
    any_, all_ = (torch.as_tensor(x).expand(lo.shape) for x in ir.expr.classify(TorchOps, lo, hi, lo, hi))
    loop, empty = all_.clone(), ~any_
    todo = (any_ & ~all_).nonzero().flatten()
    for m in sorted(set((hi[todo] - lo[todo] + 1).tolist())):
        nodes = todo[(hi[todo] - lo[todo] + 1) == m]
        rects = torch.tensor([x[:4] for x in _lower_rects(m) if ir.unit > 1 or not x[4]], dtype=_I64)
        if rects.numel() == 0:
            loop[nodes] = True
            continue
        base = lo[nodes][:, None]
        qa, qb, ka, kb = (base + rects[:, j][None, :] for j in range(4))
        N = ir.unit  # exact for set operations too: refined down to units, the causal cut inside them
        kept, miss = (
            x.view(qa.shape)
            for x in settle(
                ir, qa.flatten() * N, qb.flatten() * N + N - 1, ka.flatten() * N, kb.flatten() * N + N - 1, True
            )
        )
        loop[nodes], empty[nodes] = ~miss.any(1), ~kept.any(1)
    if bool((~loop & ~empty).any()):
        return None
    return i[loop]


def unit_graph(pattern, seq: int) -> _Graph:
    """The exact node graph for self-attention over ``seq`` tokens (see the module docstring)."""
    ir = as_ir(pattern)
    n0 = -(-seq // ir.unit)
    if n0 > FINE_NODES:
        r = 1 << math.ceil(math.log2(n0 / FINE_NODES))
        runs = _node_runs(ir, n0, r)
        if runs is not None:
            return _Graph(seq, ir.unit, r, ir.causal, runs)
    require(
        "reach_nodes",
        n0,
        f"reachability of {ir.name} at seq={seq:,} on its unit graph (unit {ir.unit})",
        f"{_HINT} (at most {limit('reach_nodes') * ir.unit:,} tokens at this unit)",
    )
    return _Graph(seq, ir.unit, 1, ir.causal, _node_runs(ir, n0, 1))


def layers_estimate(g: _Graph) -> int:
    """Layers until the last node's reach stops growing: a breadth-first search from it alone.

    O(layers * (runs + n)); the search over every node needs about as many layers (the last query
    is the one farthest from the first keys), so this sizes :func:`reach`'s work before it starts.
    """
    seen = np.zeros(g.n + 1, dtype=bool)
    seen[g.n - 1] = True
    frontier, layers = seen.copy(), 0
    while frontier.any():
        sel = frontier[g.rows]
        cover = np.zeros(g.n + 1, dtype=np.int64)
        np.add.at(cover, g.a[sel], 1)
        np.add.at(cover, g.b[sel] + 1, -1)
        frontier = (np.cumsum(cover) > 0) & ~seen
        seen |= frontier
        layers += 1
    return layers


# ------------------------------------------------------------------------------ bitset BFS
def _pieces(g: _Graph, npad: int, nb: int):
    """(row, source-row) pairs whose OR is each row's new reach (see the module docstring)."""
    rows, a, b = g.rows, g.a, g.b
    ba, bb = a // _BLK, b // _BLK
    same = ba == bb
    head, tail = a % _BLK == 0, (b % _BLK == _BLK - 1) | (b == g.n - 1)
    single = (b - a + 1 <= _SHORT) | (same & ~head & ~tail)
    cnt = (b - a + 1)[single]
    pr = [np.repeat(rows[single], cnt)]
    ps = [np.repeat(a[single], cnt) + np.arange(cnt.sum()) - np.repeat(np.cumsum(cnt) - cnt, cnt)]
    m = ~single & same & head  # P[b]: prefix OR inside b's block
    pr.append(rows[m]), ps.append(npad + b[m])
    m = ~single & same & ~head  # S[a]: suffix OR inside a's block
    pr.append(rows[m]), ps.append(2 * npad + a[m])
    m = ~single & ~same
    pr += [rows[m], rows[m]]
    ps += [2 * npad + a[m], npad + b[m]]
    mid = m & (bb - ba >= 2)  # whole blocks in between: two sparse-table entries
    j = np.floor(np.log2(np.maximum((bb - ba - 1)[mid], 1))).astype(np.int64)
    pr += [rows[mid], rows[mid]]
    ps += [3 * npad + j * nb + ba[mid] + 1, 3 * npad + j * nb + bb[mid] - (1 << j)]
    return np.concatenate(pr), np.concatenate(ps)


def _plans(g: _Graph, pr: np.ndarray, ps: np.ndarray, W: int, chunk: int = 2048):
    """Per chunk of rows: (r0, r1, words used, perm, idx, m). Rows of a chunk are sorted by piece
    count (``perm``, most first) and padded: ``idx[i, j]`` is piece j of row ``r0 + perm[i]``,
    valid for ``i < m[j]``. A causal row Q only has bits <= Q, so only words <= Q // 64 are used."""
    order = np.argsort(pr, kind="stable")
    pr, ps = pr[order], ps[order]
    cnt = np.bincount(pr, minlength=g.n)
    start = np.cumsum(cnt) - cnt
    plans = []
    for r0 in range(0, g.n, chunk):
        r1 = min(g.n, r0 + chunk)
        c = cnt[r0:r1]
        perm = np.argsort(-c, kind="stable")
        inv = np.empty_like(perm)
        inv[perm] = np.arange(perm.size)
        sel = slice(start[r0], start[r1 - 1] + c[-1])
        rows = pr[sel] - r0
        idx = np.zeros((r1 - r0, int(c.max()) if c.size else 0), dtype=np.int64)
        idx[inv[rows], np.arange(rows.size) - np.repeat(start[r0:r1] - start[r0], c)] = ps[sel]
        m = np.searchsorted(-c[perm], -np.arange(idx.shape[1]), side="left").tolist()
        plans.append((r0, r1, ((r1 - 1) >> 6) + 1 if g.causal else W, perm, idx, m))
    return plans


def _bits(n: int, W: int, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    out = np.zeros((n, W), dtype=np.uint64)
    np.bitwise_or.at(out, (rows, cols >> 6), np.left_shift(np.uint64(1), (cols & 63).astype(np.uint64)))
    return out


def _target(g: _Graph, W: int) -> np.ndarray:
    """Allowed node pairs per row (bit K of row Q): tokens q of Q and some k != q of K may be linked."""
    n, q = g.n, np.arange(g.n)
    if g.causal:
        word = q >> 6
        t = np.where(np.arange(W)[None, :] < word[:, None], ~np.uint64(0), np.uint64(0))
        t[q, word] = np.left_shift(np.uint64(1), (q & 63).astype(np.uint64)) - np.uint64(1)
    else:
        t = np.full((n, W), ~np.uint64(0), dtype=np.uint64)
        if n % 64:
            t[:, -1] = np.left_shift(np.uint64(1), np.uint64(n % 64)) - np.uint64(1)
        t &= ~_bits(n, W, q, q)
    t |= _bits(n, W, q[g.sizes >= 2], q[g.sizes >= 2])
    return t


def _unpack(row: np.ndarray, n: int) -> np.ndarray:
    return np.unpackbits(row.view(np.uint8), bitorder="little")[:n].astype(bool)


def _prepare(C: np.ndarray, n: int, nb: int, causal: bool) -> None:
    """Fill the prefix/suffix ORs inside 64-row blocks and the sparse table over blocks from C[:n]."""
    npad, W = nb * _BLK, C.shape[1]
    R = C[:npad].reshape(nb, _BLK, W)
    P = C[npad : 2 * npad].reshape(nb, _BLK, W)
    Sf = C[2 * npad : 3 * npad].reshape(nb, _BLK, W)
    for b0 in range(0, nb, 32):
        b1 = min(nb, b0 + 32)
        w = b1 if causal else W  # block b holds bits of rows <= 64 b + 63: words <= b
        np.bitwise_or.accumulate(R[b0:b1, :, :w], axis=1, out=P[b0:b1, :, :w])
        Sf[b0:b1, :, :w] = np.bitwise_or.accumulate(R[b0:b1, ::-1, :w], axis=1)[:, ::-1]
    J = int(math.log2(nb))
    st = C[3 * npad : 3 * npad + (J + 1) * nb].reshape(J + 1, nb, W)
    st[0] = P[:, -1]
    for j in range(1, J + 1):
        h = 1 << (j - 1)
        st[j] = st[j - 1]
        st[j, : nb - h] |= st[j - 1, h:]


def reach(g: _Graph, max_layers: int | None = None) -> dict:
    """Layer-by-layer reachability on the node graph: full-reach layer, longest path, last row's reach.

    ``S[Q]`` (bits) is the set of nodes reached from Q by walks of 1..L edges; C[:n] holds
    ``S | I``, the rows the next layer ORs together.
    """
    n, W = g.n, (g.n + 63) // 64
    nb = -(-n // _BLK)
    npad = nb * _BLK
    plans = _plans(g, *_pieces(g, npad, nb), W)
    per_layer = sum(sum(m) * w for _, _, w, _, _, m in plans) + (3 * npad + (int(math.log2(nb)) + 2) * nb) * W
    budget = limit("reach_words")
    require(
        "reach_words",
        per_layer * (min(max_layers, n + 2) if max_layers is not None else layers_estimate(g) + 1),
        f"reachability on a graph of {n:,} nodes ({g.tokens} tokens each)",
        _HINT,
    )
    C = np.zeros((3 * npad + (int(math.log2(nb)) + 1) * nb, W), dtype=np.uint64)
    q = np.arange(n)
    qw, qbit = q >> 6, np.left_shift(np.uint64(1), (q & 63).astype(np.uint64))
    C[q, qw] = qbit
    S = np.zeros((n, W), dtype=np.uint64)
    T = _target(g, W)
    remaining = int(np.bitwise_count(T).sum())
    last, own = n - 1, int(g.sizes[-1]) - 1
    curve, full_at, longest, worst = [], (0 if remaining == 0 else None), 0, None
    cap = max_layers if max_layers is not None else n + 2
    L = 0
    while full_at is None and cap > L:
        L += 1
        if L * per_layer > 2 * budget:  # the estimate was low: stop before twice the budget is spent
            require("reach_words", (L + 1) * per_layer, f"reachability (still growing after {L - 1} layers)", _HINT)
        _prepare(C, n, nb, g.causal)
        grew = False
        for r0, r1, w, perm, idx, m in plans:
            o = np.zeros((r1 - r0, w), dtype=np.uint64)
            for j, mj in enumerate(m):
                o[:mj] |= C[idx[:mj, j], :w]
            new = np.empty_like(o)
            new[perm] = o
            fresh = new ^ S[r0:r1, :w]  # new >= old: the bits gained this layer
            if not fresh.any():
                continue
            grew = True
            fresh &= T[r0:r1, :w]
            gained = int(np.bitwise_count(fresh).sum())
            if gained:
                remaining -= gained
                if longest < L:
                    longest, row = L, int(np.flatnonzero(fresh.any(1))[0])
                    worst = (r0 + row, int(np.flatnonzero(_unpack(fresh[row], n))[0]))
            S[r0:r1, :w] = new
        if not grew:
            break
        C[:n] = S
        C[q, qw] |= qbit
        row = _unpack(S[last], n)
        curve.append(1 + int(g.sizes[row].sum()) - (int(g.sizes[last]) - own if row[last] else 0))
        if remaining == 0:
            full_at = L
    if full_at is None and max_layers is not None and cap <= L:
        raise ValueError(f"reachability did not settle within {max_layers} layers")
    return {"S": S, "T": T, "curve": curve, "full_at": full_at, "longest": longest, "worst": worst}


def connected_fraction(g: _Graph, res: dict) -> float:
    """Allowed token pairs that some number of layers links, over all allowed pairs."""
    if res["full_at"] is not None:
        return 1.0
    n, S, T, sizes = g.n, res["S"], res["T"], g.sizes
    total = g.seq  # q == k pairs
    for r0 in range(0, n, 1024):
        r1 = min(n, r0 + 1024)
        bits = np.unpackbits((S[r0:r1] & T[r0:r1]).view(np.uint8), axis=1, bitorder="little")[:, :n].astype(bool)
        idx = np.arange(r0, r1)
        self_bit = bits[idx - r0, idx].copy()
        bits[idx - r0, idx] = False
        total += int((sizes[r0:r1] * (bits.astype(np.int64) @ sizes)).sum())
        s = sizes[r0:r1][self_bit]
        total += int((s * (s - 1) // (2 if g.causal else 1)).sum())
    allowed = g.seq * (g.seq + 1) // 2 if g.causal else g.seq * g.seq
    return total / allowed
