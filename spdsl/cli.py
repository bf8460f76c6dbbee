"""The ``spdsl`` command line (Typer + rich): the ``check`` command and the entry point.

Shared helpers live in :mod:`spdsl.cli_common`; ``show`` / ``analyze`` in :mod:`spdsl.cli_analysis`,
``build`` in :mod:`spdsl.cli_build`. Importing this module assembles the whole ``app``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.text import Text

from . import cli_analysis, cli_build  # noqa: F401  (they add their commands to app)
from ._version import __version__
from .cli_common import (
    DebugOpt,
    DefinesOpt,
    PatternOpt,
    app,
    cli_errors,
    console,
    debug_enabled,
    load_from_cli,
    parse_defines,
    report_error,
    summary,
)
from .errors import SpdError
from .pattern import compile, read_source

__all__ = ["app", "cli_errors", "load_from_cli", "main", "parse_defines"]


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"spdsl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", "-V", callback=_version_callback, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    """Sparse attention patterns (.spd files) compiled to specialized Triton kernels.

    Errors are reported as FILE:LINE:COL, the source line, a caret and a hint (exit status 1).

    Add --debug (or set SPDSL_DEBUG=1) for a Python traceback.
    """


def _expand(files: list[Path]) -> list[Path]:
    """A folder stands for the ``.spd`` files in it (sorted); anything else is kept as given."""
    out: list[Path] = []
    for f in files:
        spd = sorted(f.glob("*.spd")) if f.is_dir() else []
        out.extend(spd or [f])
    return out


@app.command()
def check(
    files: Annotated[
        list[Path],
        typer.Argument(help=".spd files (or folders of them) to check.", show_default=False),
    ],
    define: DefinesOpt = None,
    pattern: PatternOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Parse and check .spd files: one 'ok' line per pattern, or located errors (exit status 1)."""
    from .lower import pattern_names

    debug = debug_enabled(debug)
    with cli_errors(debug):
        overrides = parse_defines(define)
    out = console()
    n_ok = n_failed = 0
    for file in _expand(files):
        try:
            text = read_source(file)
            names = [pattern] if pattern else pattern_names(text, str(file))
        except SpdError as err:
            report_error(err, debug)
            n_failed += 1
            continue
        for name in names:
            try:
                p = compile(text, pattern=name, filename=str(file), params=overrides)
            except (SpdError, ValueError, TypeError) as err:
                report_error(err, debug)
                n_failed += 1
                continue
            n_ok += 1
            line = Text()
            line.append("ok", style="bold green")
            line.append(f"  {file}:{p.name}  ", style="")
            line.append(summary(p), style="dim")
            out.print(line)
    if n_failed:
        console(stderr=True).print(Text(f"{n_failed} failed, {n_ok} ok", style="bold red"))
        raise typer.Exit(1)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry: no Python traceback reaches a user without ``--debug``."""
    args = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in args or debug_enabled(False)
    try:
        app(args=args, prog_name="spdsl")
    except KeyboardInterrupt:
        sys.stderr.write("spdsl: interrupted\n")
        sys.exit(130)
    except Exception as err:  # an error no command turned into a report
        if debug:
            raise
        if isinstance(err, SpdError | OSError | ValueError | TypeError):
            report_error(err)
        else:
            msg = f"spdsl: internal error: {type(err).__name__}: {err}\n(run again with --debug for the traceback)"
            console(stderr=True).print(Text(msg, style="red"))
        sys.exit(1)


if __name__ == "__main__":
    main()
