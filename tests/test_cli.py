"""The ``spdsl`` command line: check, -D / --pattern, error reports, --debug, --version, main()."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import spdsl
from spdsl import cli

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = sorted((ROOT / "patterns").glob("*.spd"))

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(cli.app, [str(a) for a in args])


def write(tmp_path: Path, text: str, name: str = "x.spd") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


BROKEN = """\
# a typo in a primitive name
pattern p(w = 3) {
    unit 16
    attend locl(w)
}
"""

TWO = """\
pattern first(w = 2) { attend local(w) }
pattern second(s = 1) { causal attend sink(s) | local(4) }
"""


# --------------------------------------------------------------------------------------------
# check


def test_check_every_shipped_pattern():
    assert len(SHIPPED) == 7
    res = invoke("check", *SHIPPED)
    assert res.exit_code == 0, res.output
    ok = [line for line in res.output.splitlines() if line.startswith("ok  ")]
    assert len(ok) == len(SHIPPED)
    for f in SHIPPED:
        assert any(f"{f}:" in line for line in ok), f
    power = next(line for line in ok if "power.spd" in line)
    assert power.split("  ", 1)[1] == (
        f"{ROOT / 'patterns' / 'power.spd'}:power  unit=256 causal  "
        "attend (local(5) | powers(2) | sink(1))  params window=5 sinks=1"
    )


def test_check_as_a_real_process(tmp_path):
    """End to end through main() in a fresh interpreter (one process: torch imports are slow):
    good files print plain 'ok' lines (no colour when not a TTY), a broken one a located report,
    exit status 1 and no traceback. (`python -m spdsl` runs in tests/test_wheel.py.)"""
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "SPDSL_DEBUG")}
    env["NO_COLOR"] = "1"
    bad = write(tmp_path, BROKEN)
    rel = [str(p.relative_to(ROOT)) for p in SHIPPED]
    res = subprocess.run(
        [sys.executable, "-m", "spdsl.cli", "check", *rel, str(bad)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 1, res.stdout + res.stderr
    ok = [line for line in res.stdout.splitlines() if line.startswith("ok  ")]
    assert len(ok) == len(SHIPPED)
    assert "ok  patterns/power.spd:power  unit=256 causal  attend (local(5) | powers(2) | sink(1))" in res.stdout
    assert "\x1b[" not in res.stdout + res.stderr
    assert f"{bad}:4:12: error: unknown primitive" in res.stderr
    assert "1 failed, 7 ok" in res.stderr
    assert "Traceback" not in res.stderr + res.stdout


def test_check_with_define_and_pattern(tmp_path):
    res = invoke("check", ROOT / "patterns" / "power.spd", "-D", "window=8", "-D", "sinks=2")
    assert res.exit_code == 0, res.output
    assert "attend (local(8) | powers(2) | sink(2))  params window=8 sinks=2" in res.output
    two = write(tmp_path, TWO)
    res = invoke("check", two)
    assert res.exit_code == 0, res.output
    assert f"{two}:first  unit=1 bidirectional  attend local(2)  params w=2" in res.output
    assert f"{two}:second  unit=1 causal" in res.output
    res = invoke("check", two, "--pattern", "second", "-D", "s=3")
    assert res.exit_code == 0, res.output
    assert ":first" not in res.output
    assert "sink(3)" in res.output


def test_broken_file_reports_location_caret_hint(tmp_path):
    bad = write(tmp_path, BROKEN)
    res = invoke("check", bad)
    assert res.exit_code == 1
    out = res.output
    assert f"{bad}:4:12:" in out
    assert "locl" in out
    lines = out.splitlines()
    src = next(i for i, line in enumerate(lines) if "attend locl(w)" in line)
    caret = lines[src + 1]
    assert caret.strip().startswith("^")
    assert caret.index("^") == lines[src].index("locl")
    assert "did you mean local?" in out
    assert "Traceback" not in out
    assert res.exception is None or isinstance(res.exception, SystemExit)


def test_syntax_error_is_located(tmp_path):
    bad = write(tmp_path, "pattern p {\n    attend local(3\n}\n")
    res = invoke("check", bad)
    assert res.exit_code == 1
    assert f"{bad}:" in res.output
    assert "^" in res.output
    assert "Traceback" not in res.output


def test_one_bad_file_fails_the_run_but_others_are_checked(tmp_path):
    bad = write(tmp_path, BROKEN)
    res = invoke("check", ROOT / "patterns" / "power.spd", bad, ROOT / "patterns" / "causal.spd")
    assert res.exit_code == 1
    assert res.output.count("ok  ") == 2
    assert "1 failed, 2 ok" in res.output


def test_debug_shows_traceback(tmp_path):
    bad = write(tmp_path, BROKEN)
    res = invoke("check", bad, "--debug")
    assert res.exit_code == 1
    assert "Traceback (most recent call last)" in res.output
    assert "SpdError" in res.output
    assert f"{bad}:4:12:" in res.output


def test_check_a_folder(tmp_path):
    res = invoke("check", ROOT / "patterns")
    assert res.exit_code == 0, res.output
    assert res.output.count("ok  ") == len(SHIPPED)
    res = invoke("check", tmp_path)
    assert res.exit_code == 1
    assert "no .spd files" in res.output


def test_missing_file(tmp_path):
    res = invoke("check", tmp_path / "nope.spd")
    assert res.exit_code == 1
    assert "no such file" in res.output
    assert "Traceback" not in res.output


@pytest.mark.parametrize(
    ("define", "why"),
    [
        ("window", "expected NAME=INTEGER"),
        ("window=abc", "not an integer"),
        ("window=1.5", "not an integer"),
        ("window=", "not an integer"),
        ("1x=3", "not a parameter name"),
        ("=3", "not a parameter name"),
        ("win dow=3", "not a parameter name"),
    ],
)
def test_bad_define_formats(define, why):
    res = invoke("check", ROOT / "patterns" / "power.spd", "-D", define)
    assert res.exit_code == 1
    assert f"bad -D {define!r}" in res.output
    assert why in res.output
    assert "Traceback" not in res.output


def test_define_given_twice():
    res = invoke("check", ROOT / "patterns" / "power.spd", "-D", "window=3", "-D", "window=4")
    assert res.exit_code == 1
    assert "already set to 3" in res.output


def test_unknown_define_name():
    res = invoke("check", ROOT / "patterns" / "power.spd", "-D", "windw=3")
    assert res.exit_code == 1
    assert "windw" in res.output
    assert "Traceback" not in res.output


def test_unknown_pattern_name(tmp_path):
    two = write(tmp_path, TWO)
    res = invoke("check", two, "--pattern", "thrid")
    assert res.exit_code == 1
    assert "thrid" in res.output
    assert "Traceback" not in res.output


def test_version():
    res = invoke("--version")
    assert res.exit_code == 0
    assert res.output.strip() == f"spdsl {spdsl.__version__}"


def test_no_args_shows_help():
    res = invoke()
    assert "check" in res.output


# --------------------------------------------------------------------------------------------
# the shared helpers


def test_parse_defines():
    assert cli.parse_defines(None) == {}
    assert cli.parse_defines(["window=8", " sinks = -2 ", "big=1_000"]) == {"window": 8, "sinks": -2, "big": 1000}
    with pytest.raises(ValueError, match="bad -D"):
        cli.parse_defines(["w=0x10"])


def test_load_from_cli_matches_spdsl_load():
    path = ROOT / "patterns" / "power.spd"
    p = cli.load_from_cli(path, ["window=7"], None)
    assert p == spdsl.load(path, window=7)
    assert p.filename == str(path)


def test_load_from_cli_inside_cli_errors_exits_1(tmp_path, capsys):
    import typer

    with pytest.raises(typer.Exit) as exc, cli.cli_errors(debug=False):
        cli.load_from_cli(write(tmp_path, BROKEN), [], None)
    assert exc.value.exit_code == 1
    err = capsys.readouterr().err
    assert ":4:12:" in err
    assert "Traceback" not in err


def test_main_hides_internal_errors(monkeypatch, capsys):
    def boom(*a, **k):
        raise RuntimeError("kaboom")

    monkeypatch.setattr(cli, "compile", boom)
    monkeypatch.delenv("SPDSL_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exc:
        cli.main(["check", str(ROOT / "patterns" / "power.spd")])
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert "internal error: RuntimeError: kaboom" in err
    assert "--debug" in err
    assert "Traceback" not in err
    with pytest.raises(RuntimeError, match="kaboom"):
        cli.main(["check", str(ROOT / "patterns" / "power.spd"), "--debug"])


def test_main_success_exit_code(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["check", str(ROOT / "patterns" / "power.spd")])
    assert exc.value.code == 0
    assert "ok  " in capsys.readouterr().out


def test_every_command_is_registered():
    names = {c.name or c.callback.__name__ for c in cli.app.registered_commands}
    assert {"check", "show", "analyze", "build"} <= names


@pytest.mark.parametrize(
    ("exc", "message"),
    [
        (PermissionError(13, "Permission denied", "/out/dir"), "spdsl: error: Permission denied: /out/dir"),
        (FileNotFoundError(2, "No such file or directory", "x.spd"), "spdsl: error: no such file: x.spd"),
        (ValueError("q must be 4-D, got 3-D"), "spdsl: error: q must be 4-D, got 3-D"),
        (TypeError("expected a torch.Tensor"), "spdsl: error: expected a torch.Tensor"),
    ],
)
def test_cli_errors_short_reports(exc, message, capsys, monkeypatch):
    import typer

    monkeypatch.delenv("SPDSL_DEBUG", raising=False)
    with pytest.raises(typer.Exit) as info, cli.cli_errors(debug=False):
        raise exc
    assert info.value.exit_code == 1
    err = capsys.readouterr().err
    assert err.strip() == message
    with pytest.raises(typer.Exit), cli.cli_errors(debug=True):
        raise exc
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err
    assert message in err


def test_cli_errors_lets_other_errors_through():
    with pytest.raises(RuntimeError), cli.cli_errors(debug=False):
        raise RuntimeError("a bug, not a user error")
