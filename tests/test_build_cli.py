"""``spdsl build``: the standalone module it writes, what it prints, -D / --pattern, --check, errors."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import spdsl
from spdsl import cli, cli_build, reference

ROOT = Path(__file__).resolve().parent.parent
POWER = ROOT / "patterns" / "power.spd"

runner = CliRunner()


def invoke(*args):
    return runner.invoke(cli.app, [str(a) for a in args])


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    monkeypatch.delenv("SPDSL_DEBUG", raising=False)


def test_build_is_registered():
    names = {c.name or c.callback.__name__ for c in cli.app.registered_commands}
    assert "build" in names


def test_build_writes_the_module_and_reports(tmp_path):
    out_dir = tmp_path / "gen" / "deeper"  # created when missing
    res = invoke("build", POWER, "-o", out_dir)
    assert res.exit_code == 0, res.output
    target = out_dir / "power.py"
    assert target.is_file()
    text = target.read_text()
    assert sorted(p.name for p in out_dir.iterdir()) == ["power.py"], "no temp files left behind"
    lines, kib = text.count("\n"), len(text.encode()) / 1024
    assert f"wrote {target} ({lines} lines, {kib:.1f} KiB)" in res.output
    m = re.search(
        r"density at 8192 tokens \(128x128 tiles\): ([\d.]+) of 64 kv tiles per q-tile.*?([\d.]+)% of causal pairs",
        res.output,
    )
    assert m, res.output
    lay = spdsl.load(POWER).layout(8192, 8192)
    assert float(m.group(1)) == pytest.approx(lay.nnz / lay.n_q_tiles, abs=0.05)
    assert 0 < float(m.group(2)) < 100
    # readable, documented, no trace of the build machinery
    assert text.startswith('"""Sparse attention for pattern `power`')
    assert "attend sink(sinks) | local(window) | powers(2)" in text  # the .spd source in the docstring
    assert spdsl.__version__ in text
    assert "# spdsl-sha256" not in text  # a plain file, not a sealed cache entry
    assert "def attention(" in text and "def attention_varlen(" in text
    assert oct(target.stat().st_mode & 0o777) != oct(0o600)


def test_default_out_dir_is_the_current_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = invoke("build", POWER)
    assert res.exit_code == 0, res.output
    assert (tmp_path / "power.py").is_file()


def test_overwrites_an_existing_module(tmp_path):
    (tmp_path / "power.py").write_text("stale")
    assert invoke("build", POWER, "-o", tmp_path).exit_code == 0
    assert (tmp_path / "power.py").read_text().startswith('"""Sparse attention')


def _pattern_line(path: Path) -> str:
    return next(line for line in path.read_text().splitlines() if line.startswith("PATTERN = "))


def test_define_changes_the_embedded_pattern(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert invoke("build", POWER, "-o", a).exit_code == 0
    res = invoke("build", POWER, "-D", "window=8", "-D", "sinks=2", "-o", b)
    assert res.exit_code == 0, res.output
    pa, pb = _pattern_line(a / "power.py"), _pattern_line(b / "power.py")
    assert "Local(5)" in pa and "Sink(1)" in pa
    assert "Local(8)" in pb and "Sink(2)" in pb
    assert pa != pb
    assert "pattern power(window=8, sinks=2)" in (b / "power.py").read_text()  # the normalized IR, in the docstring


def test_pattern_option_picks_one_of_several(tmp_path):
    spd = tmp_path / "two.spd"
    spd.write_text("pattern first { attend local(2) }\npattern second { causal attend sink(1) | local(4) }\n")
    res = invoke("build", spd, "--pattern", "second", "-o", tmp_path)
    assert res.exit_code == 0, res.output
    assert (tmp_path / "second.py").is_file() and not (tmp_path / "first.py").exists()
    assert "Local(4)" in _pattern_line(tmp_path / "second.py")
    res = invoke("build", spd, "-o", tmp_path)  # default: the first
    assert res.exit_code == 0 and (tmp_path / "first.py").is_file()
    assert "% of pairs" in res.output  # bidirectional: the fraction of all pairs


BROKEN = "pattern p(w = 3) {\n    unit 16\n    attend locl(w)\n}\n"


def test_broken_spd_is_a_located_error(tmp_path):
    spd = tmp_path / "broken.spd"
    spd.write_text(BROKEN)
    res = invoke("build", spd, "-o", tmp_path)
    assert res.exit_code == 1
    assert f"{spd}:3:12:" in res.output
    assert "did you mean local" in res.output
    assert "Traceback" not in res.output
    assert list(tmp_path.glob("*.py")) == []


@pytest.mark.parametrize(
    "args,match",
    [
        (["-D", "window"], r"bad -D 'window'"),
        (["-D", "nope=3"], r"nope"),
        (["--pattern", "nosuch"], r"nosuch"),
    ],
)
def test_bad_options_are_reported(tmp_path, args, match):
    res = invoke("build", POWER, *args, "-o", tmp_path)
    assert res.exit_code == 1
    assert re.search(match, res.output), res.output
    assert "Traceback" not in res.output


def test_missing_file_and_unwritable_out_dir(tmp_path):
    res = invoke("build", tmp_path / "missing.spd", "-o", tmp_path)
    assert res.exit_code == 1 and "no such file" in res.output and "Traceback" not in res.output
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    res = invoke("build", POWER, "-o", blocker / "sub")
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert "a_file" in res.output


def test_broken_spd_as_a_real_process(tmp_path):
    spd = tmp_path / "broken.spd"
    spd.write_text(BROKEN)
    env = {k: v for k, v in os.environ.items() if k not in ("SPDSL_DEBUG", "FORCE_COLOR")}
    env["NO_COLOR"] = "1"
    res = subprocess.run(
        [sys.executable, "-m", "spdsl.cli", "build", str(spd), "-o", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 1
    assert f"{spd}:3:12:" in res.stderr
    assert "Traceback" not in res.stderr + res.stdout
    res = subprocess.run(
        [sys.executable, "-m", "spdsl.cli", "build", str(spd), "-o", str(tmp_path), "--debug"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 1 and "Traceback" in res.stderr


# --------------------------------------------------------------------------------------------
# --check


def test_check_passes_on_this_machine(tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    res = invoke("build", POWER, "-o", tmp_path, "--check")
    assert res.exit_code == 0, res.output
    where = "cuda" if torch.cuda.is_available() else r"cpu \(Triton interpreter\)"
    assert re.search(
        rf"check on {where}, float(16|32), B1 H2 Hkv1 S300 D64: max abs error \S+, relative \S+", res.output
    )
    assert res.output.rstrip().endswith("check ok")
    assert "TRITON_INTERPRET" not in os.environ, "--check must restore the environment"


def test_check_on_a_sparse_pattern(tmp_path, monkeypatch):
    """A unit-16 pattern is sparse at S=300 (power.spd's 256-token units are dense there)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    spd = tmp_path / "sparse.spd"
    spd.write_text("pattern sparse { unit 16 causal attend sink(1) | local(2) | powers(2) }\n")
    p = spdsl.load(spd)
    assert not p.dense_mask(300, 300).tril().all()
    res = invoke("build", spd, "-o", tmp_path, "--check")
    assert res.exit_code == 0, res.output
    assert "check ok" in res.output


def test_check_failure_exits_1(tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(cli_build, "CHECK_TOL", {"float32": -1.0, "float16": -1.0})
    res = invoke("build", POWER, "-o", tmp_path, "--check")
    assert res.exit_code == 1
    assert "check failed" in res.output and "Traceback" not in res.output


# --------------------------------------------------------------------------------------------
# the module stands alone

STANDALONE = textwrap.dedent(
    """
    import importlib.util, io, os, sys, contextlib
    sys.modules["spdsl"] = None          # `import spdsl` now raises ImportError, installed or not
    path, out = sys.argv[1], sys.argv[2]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        spec = importlib.util.spec_from_file_location("power", path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules["power"] = mod
        spec.loader.exec_module(mod)
    assert buf.getvalue() == "", "import printed: " + repr(buf.getvalue())
    bad = sorted(m for m in sys.modules if m == "spdsl" or m.startswith("spdsl."))
    assert bad == ["spdsl"] and sys.modules["spdsl"] is None, bad
    import torch
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 45, 16, generator=g)
    k = torch.randn(1, 1, 45, 16, generator=g)
    v = torch.randn(1, 1, 45, 16, generator=g)
    o, lse = mod.attention(q, k, v, return_lse=True)
    torch.save({"q": q, "k": k, "v": v, "o": o, "lse": lse}, out)
    print("ok", mod.PATTERN.name)
    """
)


def test_generated_module_needs_only_torch_and_triton(tmp_path):
    sparse = tmp_path / "p.spd"
    sparse.write_text("pattern power(window = 2) { unit 4 causal attend sink(1) | local(window) | powers(2) }\n")
    assert invoke("build", sparse, "-o", tmp_path).exit_code == 0
    target = tmp_path / "power.py"
    text = target.read_text()
    assert not re.search(r"^\s*(import spdsl|from spdsl|from \.)", text, re.M)
    imports = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            imports |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "no relative imports"
            imports.add(node.module.split(".")[0])
    assert imports <= {
        "__future__",
        "torch",
        "triton",
        "functools",
        "math",
        "os",
        "time",
        "dataclasses",
        "hashlib",
        "itertools",
        "typing",
        "collections",
        "operator",
        "re",
        "warnings",
        "sys",
        "types",
        "numbers",
        "contextlib",
    }, imports
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["TRITON_INTERPRET"] = "1"
    res = subprocess.run(
        [sys.executable, "-I", "-c", STANDALONE, str(target), str(tmp_path / "out.pt")],
        cwd=run_dir,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok power"
    got = torch.load(tmp_path / "out.pt")
    pat = spdsl.load(sparse)
    ref, ref_lse = reference.attention(pat, got["q"], got["k"], got["v"], return_lse=True)
    assert (got["o"].double() - ref).abs().max() < 1e-4
    assert (got["lse"].double() - ref_lse).abs().max() < 1e-4
