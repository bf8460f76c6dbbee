"""On-disk cache of generated modules: content-addressed, written atomically, self-checking.

An entry is ``<dir>/<pattern>_<key>.py`` whose last line is ``# spdsl-sha256: <digest of the rest>``.
Writers render to a temporary file in the same directory and ``os.replace`` it into place, so
readers see a whole entry or none; a truncated or edited entry fails its digest and is rebuilt.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import sys
import tempfile
from pathlib import Path

_FOOTER = "# spdsl-sha256: "


class CacheError(OSError):
    """The cache directory cannot be created or written."""


def cache_dir() -> Path:
    """``$SPDSL_CACHE_DIR``, else ``$XDG_CACHE_HOME/spdsl``, else ``~/.cache/spdsl``."""
    env = os.environ.get("SPDSL_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME")
    return (Path(base).expanduser() if base else Path.home() / ".cache") / "spdsl"


def cache_key(*parts: str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode())
        h.update(b"\0")
    return h.hexdigest()[:20]


def _seal(text: str) -> str:
    body = text if text.endswith("\n") else text + "\n"
    return body + _FOOTER + hashlib.sha256(body.encode()).hexdigest() + "\n"


def read_entry(path: Path) -> str | None:
    """The entry's text if present and intact, else None."""
    try:
        data = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):  # missing, unreadable, or under a non-directory: a miss
        return None
    body, sep, tail = data.rpartition(_FOOTER)
    if not sep or tail.strip() != hashlib.sha256(body.encode()).hexdigest():
        return None
    return body


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temp file in the same folder, fsync and ``os.replace``.

    Readers see the old file or the new one, never a partial one; the temp file is removed on any
    error (which propagates: ``OSError`` when the folder cannot be created or written).
    """
    directory = path.parent
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; the result is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_entry(path: Path, text: str) -> None:
    """Write a cache entry atomically, sealed with its checksum footer (:class:`CacheError` if unwritable)."""
    try:
        write_atomic(path, _seal(text))
    except OSError as e:
        raise CacheError(
            f"cannot write the spdsl cache at {path.parent}: {e.strerror or e}; "
            "set SPDSL_CACHE_DIR to a writable directory"
        ) from None


def get_or_create(path: Path, render) -> tuple[str, bool]:
    """(text, created): the intact entry at ``path``, rendering and writing it when missing or corrupt."""
    text = read_entry(path)
    if text is not None:
        return text, False
    text = render()
    write_entry(path, text)
    return text, True


def import_generated(path: Path, name: str):
    """Import a generated module from ``path`` as ``name`` (registered in sys.modules)."""
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module
