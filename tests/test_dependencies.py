"""The wheel's declared dependencies cover every import the README's main-job command makes.

The command (``spdsl build patterns/power.spd -o generated --check``, read from the README) runs in
a fresh interpreter through :func:`spdsl.cli.main`; the top-level modules it imported -- beyond
those the interpreter had loaded before it started -- are mapped to the distributions that provide
them (``importlib.metadata.packages_distributions``). The standard library and spdsl itself aside,
each must lie in the transitive closure of ``[project].dependencies`` in pyproject.toml (walked
through the installed metadata, with the markers and extras that apply here). So dropping numpy
from pyproject.toml fails this test: neither torch nor triton requires it, yet the reach analysis
and Triton's CPU interpreter import it.
"""

from __future__ import annotations

import importlib.metadata as metadata
import json
import os
import shlex
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
DECLARED: list[str] = PYPROJECT["project"]["dependencies"]
PROJECT = canonicalize_name(PYPROJECT["project"]["name"])

#: Runs ``spdsl <argv>`` in-process and prints the exit status and the top-level modules it imported
#: (name -> file), leaving out those loaded before it started (site hooks, the probe's own imports).
PROBE = r"""
import os, sys
blocked = set(filter(None, os.environ.get("PROBE_BLOCK", "").split(",")))
class Block:  # makes the named top-level modules unimportable, as if not installed
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in blocked:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the probe)", name=name)
sys.meta_path.insert(0, Block())
before = {name.partition(".")[0] for name in sys.modules}
import json
import spdsl.cli
try:
    spdsl.cli.main(sys.argv[1:])
    status = 0
except SystemExit as e:
    status = e.code
files = {}
for name in list(sys.modules):
    top = name.partition(".")[0]
    if top not in before and top != "json" and top not in files:
        files[top] = getattr(sys.modules.get(top), "__file__", None)
print(json.dumps({"status": status, "modules": files}))
"""


def main_job_argv(out: Path) -> list[str]:
    """The README's first command (``spdsl build ... --check``), writing into ``out``."""
    line = next(ln for ln in (ROOT / "README.md").read_text(encoding="utf-8").splitlines() if "&& spdsl build" in ln)
    argv = shlex.split(line.split("&& spdsl ", 1)[1])
    assert argv[:2] == ["build", "patterns/power.spd"] and "--check" in argv, line
    i = argv.index("-o")
    return [*argv[: i + 1], str(out), *argv[i + 2 :]]


def run_main_job(out: Path, blocked=()) -> tuple[dict[str, str | None], str]:
    """(top-level module -> file, stdout) of the main-job command in a fresh interpreter, writing into
    ``out``; ``blocked`` top-level modules cannot be imported there (as if not installed)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SPDSL_", "TRITON_"))}
    env["SPDSL_CACHE_DIR"] = str(out / "cache")
    env["PROBE_BLOCK"] = ",".join(blocked)
    res = subprocess.run(
        [sys.executable, "-c", PROBE, *main_job_argv(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    *printed, last = res.stdout.strip().splitlines()
    report = json.loads(last)
    assert report["status"] == 0, res.stdout + res.stderr
    return report["modules"], "\n".join(printed)


@pytest.fixture(scope="module")
def main_job(tmp_path_factory) -> tuple[dict[str, str | None], Path, str]:
    """(top-level module -> file, output folder, stdout) of the main-job command in a fresh interpreter."""
    out = tmp_path_factory.mktemp("generated")
    modules, printed = run_main_job(out)
    return modules, out, printed


def _applies(req: Requirement, extras=()) -> bool:
    return req.marker is None or any(req.marker.evaluate({"extra": e}) for e in ("", *extras))


def closure(requirements: list[str]) -> set[str]:
    """Canonical names of the distributions ``requirements`` bring, transitively (installed metadata)."""
    todo = [Requirement(r) for r in requirements]
    todo = [r for r in todo if _applies(r)]
    seen: set[str] = set()
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in seen:
            continue
        seen.add(name)
        try:
            nested = [Requirement(r) for r in metadata.requires(name) or []]
        except metadata.PackageNotFoundError:  # declared but not installed: nothing below it to walk
            continue
        todo += [r for r in nested if _applies(r, req.extras)]
    return seen


def _is_stdlib(top: str, file: str | None) -> bool:
    if top in sys.stdlib_module_names or top in sys.builtin_module_names:
        return True
    if file is None:  # __main__, __mp_main__: the interpreter's own
        return top.startswith("__")
    stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
    path = Path(file).resolve()
    return path.is_relative_to(stdlib) and "site-packages" not in path.parts  # e.g. _sysconfigdata_*


def uncovered(modules: dict[str, str | None], out: Path, requirements: list[str]) -> dict[str, list[str]]:
    """Imported top-level modules (-> their distributions) that ``requirements`` do not bring."""
    provided = metadata.packages_distributions()
    allowed = closure(requirements) | {PROJECT}
    missing = {}
    for top, file in sorted(modules.items()):
        if _is_stdlib(top, file):
            continue
        if file is not None and (Path(file).resolve().is_relative_to(out.resolve()) or top == "spdsl"):
            continue  # the project itself (an editable install has no mapping) and the module it generated
        dists = [canonicalize_name(d) for d in provided.get(top, [])]
        if not dists or not allowed & set(dists):
            missing[top] = dists or [f"<no distribution provides {file}>"]
    return missing


def test_the_main_job_ran_and_imported_the_stack(main_job):
    modules, out, printed = main_job
    assert (out / "power.py").is_file()
    assert printed.splitlines()[-1] == "check ok", printed
    assert {"torch", "triton", "numpy", "lark", "jinja2", "typer", "rich"} <= set(modules)


def test_declared_dependencies_cover_every_import_of_the_main_job(main_job, tmp_path):
    """Undeclared imports are allowed only where they are optional: with them made unimportable the
    command still succeeds (lark imports regex, torch.hub tqdm, when they happen to be installed)."""
    modules, out, _ = main_job
    extra = uncovered(modules, out, DECLARED)
    if extra:
        again, printed = run_main_job(tmp_path, blocked=sorted(extra))
        assert printed.splitlines()[-1] == "check ok", (extra, printed)
        assert not set(extra) & set(again), f"imported although blocked: {extra}"
        assert uncovered(again, tmp_path, DECLARED) == {}


@pytest.mark.parametrize("dropped", ["numpy", "lark", "typer"])
def test_a_dependency_missing_from_pyproject_would_be_caught(main_job, dropped):
    """Each is imported by the command and required by no other dependency (numpy: not by torch, not by
    triton), so leaving it out of pyproject.toml must be reported."""
    modules, out, _ = main_job
    fewer = [r for r in DECLARED if canonicalize_name(Requirement(r).name) != dropped]
    assert len(fewer) == len(DECLARED) - 1
    assert dropped in uncovered(modules, out, fewer)


def test_the_closure_follows_requirements_and_their_markers():
    got = closure(["jinja2>=3.1", "lark>=1.1; python_version < '3'"])
    assert "markupsafe" in got and "jinja2" in got
    assert "lark" not in got  # its marker does not apply
    assert "babel" not in got  # jinja2[i18n] only
    assert "babel" in closure(["jinja2[i18n]"])  # an extra that is asked for is followed


def test_blocking_a_needed_module_fails_the_job(tmp_path):
    """The probe's blocker is real: the command cannot run without jinja2."""
    with pytest.raises(AssertionError, match="jinja2"):
        run_main_job(tmp_path, blocked=["jinja2"])
