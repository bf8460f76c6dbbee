"""What every ``spdsl`` command shares: the Typer ``app``, option types, reading patterns, reporting errors.

* :func:`parse_defines` -- ``-D name=value`` strings to a dict of integers;
* :func:`load_from_cli` -- read and compile one ``.spd`` file with overrides and a pattern name;
* :func:`cli_errors` -- a context manager: a :class:`~spdsl.SpdError` (or an ``OSError``,
  ``ValueError`` or ``TypeError`` from user input) becomes ``file:line:col: message``, a caret
  and a hint on stderr and exit status 1; with ``--debug`` the traceback is shown first.

The command modules (:mod:`spdsl.cli` for ``check``, :mod:`spdsl.cli_analysis`, :mod:`spdsl.cli_build`)
import this one and add their commands to :data:`app`; :mod:`spdsl.cli` imports them all.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.text import Text

from .errors import SpdError
from .pattern import compile, read_source

app = typer.Typer(
    name="spdsl",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

#: ``-D name=value``: a pattern parameter; the value an integer (sign and ``_`` separators allowed),
#: in ASCII digits as in a .spd file (``\d`` alone would take any script's digits: ``int("١")`` is 1).
_DEFINE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*([+-]?\d[\d_]*)\s*$", re.ASCII)

# Option types shared by the command modules (Annotated, so defaults stay plain Python values).
DefinesOpt = Annotated[
    list[str] | None,
    typer.Option("--define", "-D", metavar="NAME=INT", help="Override a pattern parameter (repeatable)."),
]
PatternOpt = Annotated[
    str | None,
    typer.Option("--pattern", "-p", metavar="NAME", help="Which pattern of the file (default: its first)."),
]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show Python tracebacks instead of short error reports.")]


class DefineError(ValueError):
    """A malformed ``-D`` option (reported like any other user error)."""


def console(stderr: bool = False) -> Console:
    # Made per call: the streams may be swapped (tests, redirection). Plain text when not a TTY;
    # soft_wrap keeps long lines (and carets under them) unbroken.
    return Console(stderr=stderr, soft_wrap=True, highlight=False, markup=False, emoji=False)


def parse_defines(defines: list[str] | None) -> dict[str, int]:
    """``["window=8", "sinks=2"]`` -> ``{"window": 8, "sinks": 2}``.

    Raises :class:`DefineError` (a ``ValueError``) for anything but ``NAME=INTEGER`` and for a
    name given twice. Whether the pattern has such a parameter is checked when it is compiled.
    """
    out: dict[str, int] = {}
    for d in defines or []:
        m = _DEFINE.match(d)
        if m is None:
            if "=" not in d:
                why = "expected NAME=INTEGER, e.g. -D window=8"
            else:
                name, _, value = d.partition("=")
                if not re.fullmatch(r"\s*[A-Za-z_][A-Za-z0-9_]*\s*", name):
                    why = f"{name.strip()!r} is not a parameter name (letters, digits and _, not starting with a digit)"
                else:
                    why = f"the value {value.strip()!r} is not an integer (parameters are integers)"
            raise DefineError(f"bad -D {d!r}: {why}")
        name, value = m.group(1), int(m.group(2))
        if name in out:
            raise DefineError(f"bad -D {d!r}: {name} is already set to {out[name]}")
        out[name] = value
    return out


def load_from_cli(file: Path, defines: list[str] | None, pattern: str | None = None):
    """Read and compile ``file`` for a command: ``-D`` strings and ``--pattern`` as given.

    Same result as ``spdsl.load(file, pattern=pattern, **overrides)``; the overrides are passed
    as a dict, so a parameter may have any name. Raises :class:`~spdsl.SpdError` /
    :class:`DefineError`; call it inside :func:`cli_errors`.
    """
    overrides = parse_defines(defines)
    return compile(read_source(file), pattern=pattern, filename=str(file), params=overrides)


def _report(err: BaseException) -> Text:
    """The short, located report of a user error (rich Text; plain when not a TTY)."""
    if isinstance(err, SpdError):
        out = Text()
        lines = err.format().splitlines()
        head, msg = (err.location, lines[0][len(err.location) + 2 :]) if err.location else ("spdsl", lines[0])
        out.append(head + ":", style="bold")
        out.append(" error: ", style="bold red")
        out.append(msg)
        for line in lines[1:]:
            out.append("\n")
            if line.strip() and set(line.strip()) == {"^"}:
                out.append(line, style="bold green")
            elif line.startswith("hint: "):
                out.append("hint: ", style="bold cyan")
                out.append(line[len("hint: ") :])
            else:
                out.append(line)
        return out
    if isinstance(err, FileNotFoundError) and err.filename:
        msg = f"no such file: {err.filename}"
    elif isinstance(err, OSError) and err.filename and err.strerror:
        msg = f"{err.strerror}: {err.filename}"
    else:
        msg = str(err) or type(err).__name__
    out = Text("spdsl: ")
    out.append("error: ", style="bold red")
    out.append(msg)
    return out


def report_error(err: BaseException, debug: bool = False) -> None:
    """Print ``err`` to stderr: the short report, or with ``debug`` the traceback and then the report."""
    con = console(stderr=True)
    if debug:
        sys.stderr.write("".join(traceback.format_exception(type(err), err, err.__traceback__)))
        sys.stderr.flush()
    con.print(_report(err))


def debug_enabled(debug: bool) -> bool:
    return bool(debug) or os.environ.get("SPDSL_DEBUG", "") not in ("", "0")


@contextlib.contextmanager
def cli_errors(debug: bool = False) -> Iterator[None]:
    """Turn user errors into a short report on stderr and exit status 1.

    Handles :class:`~spdsl.SpdError` (``file:line:col: message``, the source line, a caret and
    a hint), and ``OSError`` (a missing file, a folder one cannot write), ``ValueError`` and
    ``TypeError`` raised on user input.
    With ``debug`` (or ``SPDSL_DEBUG=1``) the traceback is printed first.
    """
    try:
        yield
    except (SpdError, OSError, ValueError, TypeError) as err:
        report_error(err, debug_enabled(debug))
        raise typer.Exit(1) from None


def summary(p) -> str:
    """One line: ``unit=256 causal  attend (local(5) | powers(2) | sink(1))  params window=5 sinks=1``.

    v1.1 lines follow the attend: ``score relu(2)  select all  (layouts and pictures: attend only)``.
    """
    params = " ".join(f"{k}={v}" for k, v in p.params.items()) or "-"
    mode = "causal" if p.causal else "bidirectional"
    extra = "" if p.ir.score is None else f"  score {p.ir.score[0]}({p.ir.score[1]})"
    extra += "" if p.ir.select is None else f"  select {p.ir.select.text()}"
    if extra:
        extra += "  (layouts and pictures: attend only)"
    return f"unit={p.unit} {mode}  attend {p.ir.expr.text()}{extra}  params {params}"
