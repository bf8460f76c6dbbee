"""SpdError (defined in :mod:`spdsl.core.errors`, which generated modules embed) and error hints."""

from __future__ import annotations

import difflib

from .core.errors import SpdError

__all__ = ["SpdError", "did_you_mean"]


def did_you_mean(name: str, choices) -> str | None:
    """'did you mean X?' for the closest choice, or None.

    >>> did_you_mean("locl", ["local", "sink"])
    'did you mean local?'
    """
    best = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f"did you mean {best[0]}?" if best else None
