"""Resource limits (see :mod:`spdsl.core.limits`): ``spdsl.limits.override(tiles=1 << 28)``, ``limit("tiles")``."""

from __future__ import annotations

from .core.limits import LIMITS, cost, limit, override, require

__all__ = ["LIMITS", "cost", "limit", "override", "require"]
