"""Resource limits: work is estimated before it is spent, and refused above a stated limit.

Every layout, dense mask, analysis and CPU fallback estimates its cost from the pattern and the
lengths (tile counts are known analytically, before anything is allocated) and calls
:func:`require`, which raises :class:`SpdError` naming the estimate, the limit and how to go
further. A limit is raised for one process with its environment variable, or for a block of code
with :func:`override` (which sets the same variables, so generated modules see it too).

Standard library only: generated modules embed this file.
"""

from __future__ import annotations

import contextlib
import os

from .errors import SpdError

#: name: (default, environment variable, what is counted, bytes and seconds per counted item)
LIMITS: dict[str, tuple[int, str, str, float, float]] = {
    "tiles": (1 << 24, "SPDSL_MAX_TILES", "candidate tiles", 170.0, 1.1e-7),
    "dense": (1 << 28, "SPDSL_MAX_DENSE", "mask elements", 2.0, 2e-9),
    "reach_nodes": (1 << 14, "SPDSL_MAX_REACH_NODES", "graph nodes", 0.0, 0.0),
    "reach_words": (1 << 34, "SPDSL_MAX_REACH_WORDS", "bitset word operations", 0.0, 1.5e-9),
    "cpu_flops": (1 << 38, "SPDSL_MAX_CPU_FLOPS", "floating-point operations on the CPU", 0.0, 2e-10),
}


def limit(name: str) -> int:
    """The limit in force for ``name`` (its environment variable, else the default)."""
    default, env, what, _, _ = LIMITS[name]
    raw = os.environ.get(env, "").strip()
    if not raw:
        return default
    digits = raw.replace("_", "")  # 1_000_000 reads as in Python; "_" alone is not a number
    value = int(digits) if digits.isascii() and digits.isdigit() else 0  # (isdigit alone takes "²": int() refuses)
    if value < 1:
        raise SpdError(
            f"{env}={os.environ[env]!r} is not a positive integer", hint=f"the default is {default:,} {what}"
        )
    return value


def cost(name: str, amount: float) -> str:
    """``'31,000,000 candidate tiles (~4.6 GiB, ~19 s)'``: an amount with the memory and time it takes."""
    _, _, what, per_byte, per_second = LIMITS[name]
    extra = ([f"~{amount * per_byte / 2**30:.3g} GiB"] if per_byte else []) + (
        [f"~{amount * per_second:.3g} s"] if per_second else []
    )
    return f"{amount:,.0f} {what}" + (f" ({', '.join(extra)})" if extra else "")


def require(name: str, amount: float, task: str, hint: str) -> None:
    """Refuse ``task`` when its estimated ``amount`` exceeds the limit ``name``.

    The error says what the task would cost, what the limit is and how to go further: ``hint``
    (a smaller size, a coarser analysis) or a higher limit through the environment variable.
    """
    cap = limit(name)
    if amount > cap:
        env = LIMITS[name][1]
        raise SpdError(
            f"{task} would need about {cost(name, amount)}, over the limit of {cost(name, cap)}",
            hint=f"{hint}; or raise the limit, e.g. {env}={int(min(amount * 1.1, 2**62)):d}",
        )


@contextlib.contextmanager
def override(**limits: int):
    """Raise (or lower) limits inside a ``with`` block: ``with override(tiles=1 << 28): ...``.

    It sets the limits' environment variables for the block (process-wide, so generated modules
    follow it too) and restores them after.
    """
    unknown = set(limits) - set(LIMITS)
    if unknown:
        raise TypeError(f"unknown limit(s) {', '.join(sorted(unknown))}; known: {', '.join(LIMITS)}")
    saved = {name: os.environ.get(LIMITS[name][1]) for name in limits}
    try:
        for name, value in limits.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise TypeError(f"limit {name} must be a positive int, got {value!r}")
            os.environ[LIMITS[name][1]] = str(value)
        yield
    finally:
        for name, old in saved.items():
            if old is None:
                os.environ.pop(LIMITS[name][1], None)
            else:
                os.environ[LIMITS[name][1]] = old
