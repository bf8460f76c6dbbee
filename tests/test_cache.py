"""The on-disk module cache: atomic writes, self-checking entries, rebuilds, concurrency, errors, keys."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import spdsl
from spdsl import cache, runtime

ROOT = Path(__file__).resolve().parent.parent
TEXT = "pattern cached { unit 2 causal attend sink(1) | local(3) }"
CFG = dict(block_m=16, block_n=16, num_warps=4, num_stages=1)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("SPDSL_CACHE_DIR", str(d))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(runtime, "_OPS", {})  # no in-process reuse: every build goes to the disk
    return d


def leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if not p.name.endswith(".py"))


# --------------------------------------------------------------------------------------------
# entries


def test_write_entry_is_sealed_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "sub" / "m_0123.py"
    cache.write_entry(path, "x = 1\n")
    assert cache.read_entry(path) == "x = 1\n"
    text = path.read_text()
    assert text.startswith("x = 1\n") and text.splitlines()[-1].startswith("# spdsl-sha256: ")
    assert sorted(p.name for p in path.parent.iterdir()) == ["m_0123.py"]


def test_write_entry_adds_the_missing_newline(tmp_path):
    path = tmp_path / "m.py"
    cache.write_entry(path, "x = 1")
    assert cache.read_entry(path) == "x = 1\n"


@pytest.mark.parametrize(
    "damage",
    [
        lambda t: t[: len(t) // 2],  # truncated in the body
        lambda t: t[:-10],  # truncated in the footer
        lambda t: t.rpartition("# spdsl-sha256:")[0],  # footer gone
        lambda t: t.replace("x = 1", "x = 2"),  # edited
        lambda t: "",  # empty
    ],
)
def test_read_entry_rejects_damaged_entries(tmp_path, damage):
    path = tmp_path / "m.py"
    cache.write_entry(path, "x = 1\n" + "y = 2\n" * 100)
    path.write_text(damage(path.read_text()))
    assert cache.read_entry(path) is None


def test_read_entry_missing_and_not_utf8(tmp_path):
    assert cache.read_entry(tmp_path / "nope.py") is None
    bad = tmp_path / "bad.py"
    bad.write_bytes(b"\xff\xfe\x00garbage")
    assert cache.read_entry(bad) is None


def test_get_or_create_renders_once(tmp_path):
    path = tmp_path / "m.py"
    calls = []

    def render():
        calls.append(1)
        return "z = 3\n"

    assert cache.get_or_create(path, render) == ("z = 3\n", True)
    assert cache.get_or_create(path, render) == ("z = 3\n", False)
    assert len(calls) == 1


def test_failed_write_removes_its_temp_file(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(cache.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        cache.write_entry(tmp_path / "m.py", "x = 1\n")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------
# spdsl.build and the cache


def test_build_writes_one_intact_entry(cache_dir):
    op = spdsl.build(spdsl.compile(TEXT), **CFG)
    assert op.path.parent == cache_dir
    assert [p.name for p in cache_dir.iterdir()] == [op.path.name]
    assert op.path.name == f"cached_{op.key}.py"
    body = cache.read_entry(op.path)
    assert body is not None and "def attention(" in body


def test_truncated_entry_is_rebuilt(cache_dir):
    op = spdsl.build(spdsl.compile(TEXT), **CFG)
    good = op.path.read_text()
    op.path.write_text(good[: len(good) // 3])  # a crash mid-write by some older writer, a full disk...
    assert cache.read_entry(op.path) is None
    runtime._OPS.clear()
    op2 = spdsl.build(spdsl.compile(TEXT), **CFG)
    assert op2.path == op.path
    assert op2.path.read_text() == good
    assert cache.read_entry(op2.path) is not None
    assert leftovers(cache_dir) == []


def test_intact_entry_is_reused_not_rewritten(cache_dir):
    op = spdsl.build(spdsl.compile(TEXT), **CFG)
    old = time.time() - 1000
    os.utime(op.path, (old, old))
    runtime._OPS.clear()
    spdsl.build(spdsl.compile(TEXT), **CFG)
    assert op.path.stat().st_mtime == pytest.approx(old)


def test_in_process_reuse(cache_dir):
    a = spdsl.build(spdsl.compile(TEXT), **CFG)
    assert spdsl.build(spdsl.compile(TEXT), **CFG) is a


# --------------------------------------------------------------------------------------------
# cache keys


def key_of(**cfg):
    return spdsl.build(spdsl.compile(TEXT), **{**CFG, **cfg}).key


def test_key_changes_with_the_config(cache_dir):
    base = key_of()
    assert key_of() == base
    changed = {key_of(block_m=32), key_of(block_n=32), key_of(num_warps=8), key_of(num_stages=2)}
    assert base not in changed and len(changed) == 4
    assert len(list(cache_dir.glob("*.py"))) == 5


def test_key_changes_with_the_pattern_parameters(cache_dir):
    src = "pattern w(n = 3) { causal attend local(n) }"
    a = spdsl.build(spdsl.compile(src), **CFG)
    b = spdsl.build(spdsl.compile(src, n=4), **CFG)
    assert a.key != b.key and a.path != b.path


def test_key_changes_with_templates_and_versions(cache_dir, monkeypatch):
    base = key_of()
    monkeypatch.setattr(runtime, "template_texts", lambda: "something else")
    assert key_of() != base
    monkeypatch.undo()
    monkeypatch.setattr(runtime, "_OPS", {})
    monkeypatch.setattr(runtime, "_versions", lambda: "spdsl=0 triton=0 torch=0")
    assert key_of() != base


def test_key_changes_with_the_interpreter_flag(cache_dir, monkeypatch):
    base = key_of()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert key_of() != base


# --------------------------------------------------------------------------------------------
# unwritable cache


def test_write_entry_under_a_file_is_a_cache_error(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(cache.CacheError, match=r"cannot write the spdsl cache.*SPDSL_CACHE_DIR"):
        cache.write_entry(blocker / "sub" / "m.py", "x = 1\n")


def test_cache_dir_under_a_file_is_a_clear_error(tmp_path, monkeypatch):
    """A path under a regular file cannot be created, even by root."""
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("SPDSL_CACHE_DIR", str(blocker / "sub"))
    monkeypatch.setattr(runtime, "_OPS", {})
    with pytest.raises(cache.CacheError, match=r"SPDSL_CACHE_DIR") as info:
        spdsl.build(spdsl.compile(TEXT), **CFG)
    assert isinstance(info.value, OSError)
    assert str(blocker / "sub") in str(info.value)


def test_read_only_cache_dir_is_a_clear_error(tmp_path, monkeypatch):
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o500)
    try:
        probe = d / "probe"
        try:
            probe.write_text("x")
        except OSError:
            pass
        else:
            probe.unlink()
            pytest.skip("permissions do not stop writes here (running as root)")
        monkeypatch.setenv("SPDSL_CACHE_DIR", str(d))
        monkeypatch.setattr(runtime, "_OPS", {})
        with pytest.raises(cache.CacheError, match=r"SPDSL_CACHE_DIR"):
            spdsl.build(spdsl.compile(TEXT), **CFG)
    finally:
        d.chmod(0o700)


def test_cache_dir_default_locations(monkeypatch, tmp_path):
    monkeypatch.delenv("SPDSL_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache.cache_dir() == tmp_path / "spdsl"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache.cache_dir() == Path.home() / ".cache" / "spdsl"
    monkeypatch.setenv("SPDSL_CACHE_DIR", "~/x")
    assert cache.cache_dir() == Path.home() / "x"


# --------------------------------------------------------------------------------------------
# concurrency

WORKER = textwrap.dedent(
    """
    import os, sys, time
    import spdsl
    gate = sys.argv[1]
    pat = spdsl.compile({text!r})
    open(gate + "." + str(os.getpid()), "w").close()   # ready
    while not os.path.exists(gate):                    # start together
        time.sleep(0.005)
    op = spdsl.build(pat, block_m=16, block_n=16, num_warps=4, num_stages=1)
    print(op.path)
    """
)


def test_concurrent_builds_from_four_processes(tmp_path):
    d = tmp_path / "cache"
    gate = tmp_path / "go"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["SPDSL_CACHE_DIR"] = str(d)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    script = WORKER.format(text=TEXT)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(gate)],
            env=env,
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    try:
        deadline = time.time() + 120
        while len(list(tmp_path.glob("go.*"))) < 4:
            if time.time() > deadline or any(p.poll() is not None for p in procs):
                break
            time.sleep(0.02)
        gate.write_text("")
        outs = [p.communicate(timeout=180) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err
    paths = {out.strip() for out, _ in outs}
    assert len(paths) == 1, paths
    entries = list(d.iterdir())
    assert [e.name for e in entries] == [Path(paths.pop()).name], "exactly one entry, no temp files"
    assert cache.read_entry(entries[0]) is not None
