"""Per-head patterns: ``spdsl.build([p_full, p_stream], heads=[0] * 8 + [1] * 24)``.

Several patterns go into one generated module; ``heads[h]`` is the index of the pattern query head
``h`` uses. The kernels walk each head's own pattern's layout in one launch (see
``templates/triton``); this module checks what the user gives and splits the heads by pattern for
the CPU backend (:mod:`spdsl.blocked`) and the reference.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .pattern import Pattern, as_pattern

#: Patterns one module may serve (the decode kernel keeps a GQA group's patterns in an int32 bitmask).
MAX_PATTERNS = 16


def resolve(pattern, heads: Sequence[int] | None) -> tuple[tuple[Pattern, ...], tuple[int, ...] | None]:
    """(patterns, heads) from ``spdsl.build``'s arguments: one pattern (``heads`` None, or all 0) or a
    list of patterns with ``heads``, one pattern index per query head. ``heads`` comes back None when
    one pattern serves every head. Raises TypeError / ValueError that say what is expected."""
    if isinstance(pattern, list | tuple):
        if not pattern:
            raise ValueError("spdsl.build got an empty list of patterns; give at least one")
        if len(pattern) > MAX_PATTERNS:
            raise ValueError(f"spdsl.build takes at most {MAX_PATTERNS} patterns per op, got {len(pattern)}")
        patterns = tuple(as_pattern(p) for p in pattern)
        if heads is None and len(patterns) > 1:
            raise ValueError(
                f"spdsl.build got {len(patterns)} patterns but no heads: pass heads=[pattern index of each "
                "query head], e.g. heads=[0] * 8 + [1] * 24"
            )
    else:
        patterns = (as_pattern(pattern),)
    if heads is None:
        return patterns, None
    heads = check(heads, len(patterns))
    if len(patterns) > 1 and any(p.ir.dynamic for p in patterns):
        dyn = ", ".join(p.name for p in patterns if p.ir.dynamic)
        raise ValueError(
            f"per-head patterns cannot include patterns with score/select lines yet ({dyn}): build those as "
            "an op of their own"
        )
    return patterns, (heads if len(patterns) > 1 else None)


def check(heads, n_patterns: int) -> tuple[int, ...]:
    """``heads`` as a tuple of ints in ``range(n_patterns)`` (its length is checked at call time, against Hq)."""
    if isinstance(heads, torch.Tensor):
        heads = heads.tolist()
    if isinstance(heads, str | bytes) or not isinstance(heads, Sequence):
        raise TypeError(
            f"heads must be a sequence of ints (one pattern index per query head), got {type(heads).__name__}"
        )
    if not heads:
        raise ValueError("heads is empty: give one pattern index per query head")
    if any(not isinstance(h, int) or isinstance(h, bool) for h in heads):
        raise TypeError(f"heads must hold ints (pattern indices), got {list(heads)!r}")
    bad = sorted({h for h in heads if not 0 <= h < n_patterns})
    if bad:
        hint = "the only pattern is 0" if n_patterns == 1 else f"indices run from 0 to {n_patterns - 1}"
        raise ValueError(f"heads holds {bad}, but there are {n_patterns} pattern(s): {hint}")
    return tuple(heads)


def check_count(heads: tuple[int, ...] | None, n_q_heads: int) -> None:
    """One entry of ``heads`` per query head (ValueError)."""
    if heads is not None and len(heads) != n_q_heads:
        raise ValueError(
            f"this op was built with heads of length {len(heads)}, but q has {n_q_heads} heads; "
            "build it with one pattern index per query head"
        )


def split(patterns: tuple[Pattern, ...], heads: tuple[int, ...] | None, n_q: int, n_kv: int):
    """Per pattern in use: (pattern, its query heads, their kv heads) as index tensors (GQA: query
    head h reads kv head h // (n_q // n_kv)); one (pattern, None, None) when it serves every head."""
    if heads is None:
        return [(patterns[0], None, None)]
    check_count(heads, n_q)
    group = n_q // n_kv
    out = []
    for i, p in enumerate(patterns):
        q_idx = torch.tensor([h for h, j in enumerate(heads) if j == i], dtype=torch.long)
        if q_idx.numel():
            out.append((p, q_idx, q_idx // group))
    return out
