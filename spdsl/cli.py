"""The ``spdsl`` command line (Typer + rich).

Besides the ``app`` and its ``check`` command, this module holds the helpers every command
module uses, so they all read files, take ``-D``/``--pattern`` and report errors the same way:

* :func:`parse_defines` -- ``-D name=value`` strings to a dict of integers;
* :func:`load_from_cli` -- read and compile one ``.spd`` file with overrides and a pattern name;
* :func:`cli_errors` -- a context manager: a :class:`~spdsl.SpdError` (or an ``OSError``,
  ``ValueError`` or ``TypeError`` from user input) becomes ``file:line:col: message``, a caret
  and a hint on stderr and exit status 1; with ``--debug`` the traceback is shown first.

Other command modules (``cli_analysis``: ``show``/``analyze``; ``cli_build``: ``build``) add their
commands with ``@app.command()`` and are imported at the bottom of this file when they exist.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
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

from ._version import __version__
from .errors import SpdError

app = typer.Typer(
    name="spdsl",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

#: ``-D name=value``: a pattern parameter; the value an integer (sign and ``_`` separators allowed).
_DEFINE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*([+-]?\d[\d_]*)\s*$")

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


def _console(stderr: bool = False) -> Console:
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


def _read_source(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpdError(
            f"no such file: {file}", file=str(file), hint="check the path; shipped patterns are in patterns/*.spd"
        ) from None
    except IsADirectoryError:
        raise SpdError(f"{file} is a folder with no .spd files in it", file=str(file)) from None
    except UnicodeDecodeError as e:
        raise SpdError(f"cannot read {file}: not UTF-8 text ({e.reason})", file=str(file)) from None
    except OSError as e:
        raise SpdError(f"cannot read {file}: {e.strerror or e}", file=str(file)) from None


def _compile_text(text: str, file: Path, overrides: dict[str, int], pattern: str | None):
    from .lower import compile_ir
    from .pattern import Pattern

    ir = compile_ir(text, filename=str(file), pattern=pattern, overrides=overrides)
    return Pattern(ir, text, str(file))


def load_from_cli(file: Path, defines: list[str] | None, pattern: str | None = None):
    """Read and compile ``file`` for a command: ``-D`` strings and ``--pattern`` as given.

    Same result as ``spdsl.load(file, pattern=pattern, **overrides)``; the overrides are passed
    as a dict, so a parameter may have any name. Raises :class:`~spdsl.SpdError` /
    :class:`DefineError`; call it inside :func:`cli_errors`.
    """
    overrides = parse_defines(defines)
    file = Path(file)
    return _compile_text(_read_source(file), file, overrides, pattern)


def _report(err: BaseException) -> Text:
    """The short, located report of a user error (rich Text; plain when not a TTY)."""
    if isinstance(err, SpdError):
        out = Text()
        lines = err.format().splitlines()
        head, _, msg = lines[0].partition(": ")
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
    con = _console(stderr=True)
    if debug:
        sys.stderr.write("".join(traceback.format_exception(type(err), err, err.__traceback__)))
        sys.stderr.flush()
    con.print(_report(err))


def _debug_enabled(debug: bool) -> bool:
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
        report_error(err, _debug_enabled(debug))
        raise typer.Exit(1) from None


def summary(p) -> str:
    """One line: ``unit=256 causal  attend (local(5) | powers(2) | sink(1))  params window=5 sinks=1``."""
    params = " ".join(f"{k}={v}" for k, v in p.params.items()) or "-"
    mode = "causal" if p.causal else "bidirectional"
    return f"unit={p.unit} {mode}  attend {p.ir.expr.text()}  params {params}"


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

    debug = _debug_enabled(debug)
    with cli_errors(debug):
        overrides = parse_defines(define)
    out = _console()
    n_ok = n_failed = 0
    for file in _expand(files):
        try:
            text = _read_source(file)
            names = [pattern] if pattern else pattern_names(text, str(file))
        except SpdError as err:
            report_error(err, debug)
            n_failed += 1
            continue
        for name in names:
            try:
                p = _compile_text(text, file, overrides, name)
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
        _console(stderr=True).print(Text(f"{n_failed} failed, {n_ok} ok", style="bold red"))
        raise typer.Exit(1)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry: no Python traceback reaches a user without ``--debug``."""
    args = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in args or _debug_enabled(False)
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
            _console(stderr=True).print(Text(msg, style="red"))
        sys.exit(1)


def _register_command_modules() -> None:
    """Import the optional command modules that exist (they add their commands to ``app``).

    A missing module is skipped; an error *inside* an existing one is not swallowed.
    """
    for mod in ("cli_analysis", "cli_build"):
        name = f"{__package__ or 'spdsl'}.{mod}"
        if importlib.util.find_spec(name) is not None:
            importlib.import_module(name)


if __name__ == "__main__":  # python -m spdsl.cli: run the package's module, where commands register
    from spdsl.cli import main as _main

    _main()
else:
    _register_command_modules()
