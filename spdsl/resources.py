"""Where the grammar, templates and shipped patterns live: an installed wheel or a checkout.

The wheel carries ``grammar/``, ``templates/`` and ``patterns/`` under ``spdsl/_data/``
(``pyproject.toml``: hatch ``force-include``), found through :mod:`importlib.resources`; a
checkout (or an editable install) has them at the repository's top level. Every module finds them
through :func:`data_path`, so both give the same answer.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path, PurePosixPath

#: Searched in this order: the installed package's data, then the checkout's top level.
_BASES = (Path(str(importlib.resources.files("spdsl") / "_data")), Path(__file__).resolve().parent.parent)


def data_path(rel: str) -> Path:
    """Path of a data file or folder (``grammar/spd.lark``, ``templates/x.py.jinja``, ``patterns``).

    Installed wheels carry the data under ``spdsl/_data/``; a checkout has it at the top level.
    """
    parts = PurePosixPath(rel.replace("\\", "/")).parts
    if not parts or parts[0] not in ("grammar", "templates", "patterns") or ".." in parts:
        raise ValueError(f"not a spdsl data path: {rel!r} (expected grammar/..., templates/... or patterns/...)")
    for base in _BASES:
        p = base.joinpath(*parts)
        if p.exists():
            return p
    raise FileNotFoundError(
        f"spdsl data file {rel!r} not found in {_BASES[0]} or {_BASES[1]}; "
        "reinstall spdsl (the wheel must carry grammar/, templates/ and patterns/)"
    )


def grammar_text() -> str:
    return data_path("grammar/spd.lark").read_text(encoding="utf-8")


def template_text(name: str) -> str:
    return data_path(f"templates/{name}").read_text(encoding="utf-8")


def patterns_dir() -> Path:
    """The folder of the shipped ``.spd`` patterns."""
    return data_path("patterns")


def shipped_patterns() -> list[Path]:
    """The shipped patterns (``patterns/*.spd``), sorted by file name."""
    return sorted(patterns_dir().glob("*.spd"))


def pattern_path(name: str) -> Path:
    """A shipped pattern by file stem: ``pattern_path("power")`` -> ``.../patterns/power.spd``."""
    stem = name[:-4] if name.endswith(".spd") else name
    return data_path(f"patterns/{stem}.spd")


def jinja_env(load=None):
    """The Jinja environment every code template renders in: templates by name through ``load``
    (default :func:`template_text`), strict undefined."""
    import jinja2

    return jinja2.Environment(
        loader=jinja2.FunctionLoader(load or template_text),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
