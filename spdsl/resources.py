"""Where the grammar, templates and shipped patterns live: an installed wheel or a checkout."""

from __future__ import annotations

from pathlib import Path

_PKG = Path(__file__).resolve().parent


def data_path(rel: str) -> Path:
    """Path of a data file (``grammar/spd.lark``, ``templates/x.py.jinja``, ``patterns/x.spd``).

    Installed wheels carry the data under ``spdsl/_data/``; a checkout has it at the top level.
    """
    for base in (_PKG / "_data", _PKG.parent):
        p = base / rel
        if p.exists():
            return p
    raise FileNotFoundError(
        f"spdsl data file {rel!r} not found in {_PKG / '_data'} or {_PKG.parent}; "
        "reinstall spdsl (the wheel must carry grammar/ and templates/)"
    )


def grammar_text() -> str:
    return data_path("grammar/spd.lark").read_text(encoding="utf-8")


def template_text(name: str) -> str:
    return data_path(f"templates/{name}").read_text(encoding="utf-8")
