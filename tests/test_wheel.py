"""The built wheel carries the grammar, templates and patterns, and an installed spdsl (not the
checkout) finds them and compiles ``patterns/power.spd``.

Builds the wheel from the checkout (``python -m build --wheel --no-isolation``, no network), or
takes the one named by ``$SPDSL_WHEEL``; installs it with ``pip install --no-deps --target`` into
a temporary folder and runs a fresh interpreter there, away from the checkout.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = sorted(p.name for p in (ROOT / "patterns").glob("*.spd"))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    given = os.environ.get("SPDSL_WHEEL")
    if given:
        return Path(given).resolve()
    if importlib.util.find_spec("build") is None or importlib.util.find_spec("hatchling") is None:
        pytest.skip("needs the `build` and `hatchling` packages (pip install -e '.[test]')")
    out = tmp_path_factory.mktemp("dist")
    res = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    (whl,) = out.glob("spdsl-*.whl")
    return whl


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("site")
    res = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "--target", str(target), str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return target


def test_wheel_carries_data(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "spdsl/_data/grammar/spd.lark" in names
    assert "spdsl/__init__.py" in names
    assert "spdsl/cli.py" in names
    for name in SHIPPED:
        assert f"spdsl/_data/patterns/{name}" in names
    templates = sorted((ROOT / "templates").iterdir())
    assert templates, "templates/ must exist (it keeps a README.md) or the wheel build fails"
    for t in templates:
        if t.is_file():
            assert f"spdsl/_data/templates/{t.name}" in names
    assert not any(n.startswith(("tests/", "benchmarks/")) or "__pycache__" in n for n in names)
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "spdsl = spdsl.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_installed_wheel_loads_power(installed, tmp_path):
    """One fresh interpreter (torch imports are slow): the API, the resources and `python -m spdsl`."""
    work = tmp_path / "elsewhere"
    work.mkdir()
    script = textwrap.dedent(
        """
        import json, runpy, sys
        import spdsl
        from spdsl import resources
        path = resources.data_path("patterns/power.spd")
        p = spdsl.load(path)
        print(json.dumps({
            "spdsl": spdsl.__file__,
            "grammar": str(resources.data_path("grammar/spd.lark")),
            "pattern": str(path),
            "shipped": [q.name for q in resources.shipped_patterns()],
            "nnz": p.layout(8192, 8192).nnz,
            "text": p.text(),
        }), flush=True)
        sys.argv = ["spdsl", "check", str(path)]
        runpy.run_module("spdsl", run_name="__main__")  # what `python -m spdsl check ...` runs
        """
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP", "FORCE_COLOR")}
    env["PYTHONPATH"] = str(installed)
    env["NO_COLOR"] = "1"
    res = subprocess.run([sys.executable, "-c", script], cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    first, *rest = res.stdout.strip().splitlines()
    info = json.loads(first)
    site = installed.resolve()
    assert Path(info["spdsl"]).resolve().is_relative_to(site), info["spdsl"]  # not the checkout
    assert Path(info["grammar"]).resolve() == site / "spdsl" / "_data" / "grammar" / "spd.lark"
    assert Path(info["pattern"]).resolve() == site / "spdsl" / "_data" / "patterns" / "power.spd"
    assert info["shipped"] == SHIPPED
    assert info["nnz"] == 828  # 12.9375 visible 128x128 tiles per q-tile at 8K (paper defaults)
    assert "attend (local(5) | powers(2) | sink(1))" in info["text"]
    summary = "unit=256 causal  attend (local(5) | powers(2) | sink(1))  params window=5 sinks=1"
    assert rest == [f"ok  {info['pattern']}:power  {summary}"]
