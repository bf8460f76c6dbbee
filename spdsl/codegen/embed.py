"""Tree-shaken copies of :mod:`spdsl.core` for generated modules.

A generated module must run without spdsl, so it carries the core code it calls -- and only that.
Each core file is parsed (:mod:`ast`) into its top-level definitions; starting from the names the
templates use and the classes of the pattern's expression, a definition is kept when a kept one
refers to it by name, and a method when a kept definition uses an attribute of that name (dunders
that Python calls implicitly are kept with their class). Definitions are copied by their source
lines with comments; docstrings stay in spdsl/core, where the copy's header points. Relative
imports disappear, since everything they imported is inlined, and stdlib/torch imports are kept
where used.
"""

from __future__ import annotations

import ast
import builtins
from dataclasses import dataclass
from pathlib import Path

from .. import core

#: Core files in dependency order (a definition only uses earlier files' names).
CORE_FILES = ("errors", "limits", "ir", "primitives", "refine", "layout", "checks")
#: Methods Python calls without naming them that generated code relies on; kept with every kept class.
_IMPLICIT = {"__init__", "__init_subclass__", "__getattr__", "__new__"}


@dataclass
class _Def:
    file: str
    names: tuple[str, ...]  # names bound at module level
    node: ast.stmt
    lines: list[str]  # the file's lines


def _annotations(node: ast.AST) -> set[int]:
    """ids of annotation subtrees (never evaluated: core modules use ``from __future__ import annotations``)."""
    out = set()
    for n in ast.walk(node):
        notes = []
        if isinstance(n, ast.FunctionDef):
            notes.append(n.returns)
        elif isinstance(n, ast.arg | ast.AnnAssign):
            notes.append(n.annotation)
        out |= {id(x) for note in notes if note is not None for x in ast.walk(note)}
    return out


def _refs(node: ast.AST) -> tuple[set[str], set[str]]:
    """(names loaded, attribute names) anywhere under ``node``, annotations aside."""
    names, attrs, skip = set(), set(), _annotations(node)
    for n in ast.walk(node):
        if id(n) in skip:
            continue
        if isinstance(n, ast.Name):
            names.add(n.id)
        elif isinstance(n, ast.Attribute):
            attrs.add(n.attr)
    return names, attrs


def _bound(stmt: ast.stmt) -> tuple[str, ...]:
    if isinstance(stmt, ast.FunctionDef | ast.ClassDef):
        return (stmt.name,)
    if isinstance(stmt, ast.Import | ast.ImportFrom):
        return tuple((a.asname or a.name).split(".")[0] for a in stmt.names)
    if isinstance(stmt, ast.Assign | ast.AnnAssign):
        targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
        return tuple(n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name))
    raise ValueError(f"spdsl.core may hold only imports, functions, classes and assignments at top level, got {stmt!r}")


def _definitions() -> list[_Def]:
    out = []
    for file in CORE_FILES:
        text = (Path(core.__file__).parent / f"{file}.py").read_text(encoding="utf-8")
        tree = ast.parse(text)
        lines = text.splitlines()
        for stmt in tree.body:
            if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant):  # the module docstring
                continue
            if isinstance(stmt, ast.ImportFrom) and (stmt.level or stmt.module == "__future__"):
                continue  # relative imports are inlined; the module has its own __future__ import
            out.append(_Def(file, _bound(stmt), stmt, lines))
    seen: dict[str, str] = {}
    for d in out:
        if isinstance(d.node, ast.Import | ast.ImportFrom):
            continue
        for name in d.names:
            if name in seen:
                raise ValueError(
                    f"spdsl.core defines {name} twice ({seen[name]}.py, {d.file}.py): an embed has one namespace"
                )
            seen[name] = d.file
    return out


def _is_stub(m: ast.FunctionDef) -> bool:
    """An abstract method: its body (after a docstring) is only ``raise NotImplementedError``."""
    body = m.body[1:] if _docstring(m) is not None else m.body
    return len(body) == 1 and isinstance(body[0], ast.Raise) and "NotImplementedError" in ast.unparse(body[0])


def _members(cls: ast.ClassDef):
    """A class's methods, abstract stubs aside (documentation only: subclasses define them)."""
    return [m for m in cls.body if isinstance(m, ast.FunctionDef) and not _is_stub(m)]


def _stubs(cls: ast.ClassDef):
    return [m for m in cls.body if isinstance(m, ast.FunctionDef) and _is_stub(m)]


def _attributes(cls: ast.ClassDef) -> list[ast.stmt]:
    """Class attributes (``doc = "..."``, ``name: ClassVar[str]``); a NamedTuple's fields are structure."""
    fields = any(isinstance(b, ast.Name) and b.id == "NamedTuple" for b in cls.bases)
    return [s for s in cls.body if isinstance(s, ast.Assign) or (isinstance(s, ast.AnnAssign) and not fields)]


def _unused(stmt: ast.stmt, used_attrs: set[str]) -> bool:
    targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
    names = {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
    return not (names & used_attrs) and not any(n.startswith("__") for n in names)


def _docstring(node: ast.AST) -> ast.stmt | None:
    body = node.body if isinstance(node, ast.FunctionDef | ast.ClassDef) else None
    first = body[0] if body else None
    is_doc = (
        isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str)
    )
    return first if is_doc and len(body) > 1 else None


def _source(d: _Def, drop: list[ast.stmt]) -> str:
    """The definition's lines without the dropped members and without docstrings."""
    first = min([d.node.lineno] + [x.lineno for x in getattr(d.node, "decorator_list", [])])
    while first > 1 and d.lines[first - 2].startswith("#"):  # its comment lines (``#: ...``) come along
        first -= 1
    keep = [True] * (d.node.end_lineno - first + 1)

    def cut(start: int, end: int, blank_before: bool) -> None:
        for i in range(start, end + 1):
            keep[i - first] = False
        j = start - 1  # the blank lines before a dropped method go too
        while blank_before and j > first and not d.lines[j - 1].strip():
            keep[j - first] = False
            j -= 1

    for m in drop:
        cut(min([m.lineno] + [x.lineno for x in getattr(m, "decorator_list", [])]), m.end_lineno, True)
    for node in ast.walk(d.node):
        doc = _docstring(node)
        if doc is not None:
            end = doc.end_lineno + (not d.lines[doc.end_lineno].strip())  # and a blank line after it
            cut(doc.lineno, end, False)
    lines = [line for i, line in enumerate(d.lines[first - 1 : d.node.end_lineno]) if keep[i]]
    if isinstance(d.node, ast.ClassDef):
        head = next(i for i, line in enumerate(lines) if line.startswith("class "))
        while head + 1 < len(lines) and not lines[head + 1].strip():  # what followed the docstring
            del lines[head + 1]
        if head == len(lines) - 1:  # every member dropped
            lines.append("    pass")
    return "\n".join(lines)


def embed(roots: set[str], attrs: set[str] = frozenset(), have: set[str] = frozenset()) -> str:
    """Source of the core definitions reachable from ``roots`` (names) and ``attrs`` (methods used).

    ``have``: names the embedding module already imports (their imports are not repeated).
    """
    defs = _definitions()
    by_name = {n: d for d in defs for n in d.names}
    unknown = set(roots) - set(by_name)
    if unknown:
        raise ValueError(f"not defined in spdsl.core: {', '.join(sorted(unknown))}")
    kept: set[int] = set()
    want, used_attrs = set(roots), set(attrs)
    while True:
        before = (len(kept), len(want), len(used_attrs))
        for i, d in enumerate(defs):
            if i not in kept and want & set(d.names):
                kept.add(i)
        for i in kept:
            d = defs[i]
            parts = [d.node]
            if isinstance(d.node, ast.ClassDef):
                methods = _members(d.node)
                live = [m for m in methods if m.name in _IMPLICIT or m.name in used_attrs]
                attributes = _attributes(d.node)
                others = [
                    s
                    for s in d.node.body
                    if not isinstance(s, ast.FunctionDef) and not (s in attributes and _unused(s, used_attrs))
                ]
                parts = [*d.node.bases, *d.node.decorator_list, *others, *live]
            for part in parts:
                names, attr = _refs(part)
                want |= names & set(by_name)
                used_attrs |= attr
        if (len(kept), len(want), len(used_attrs)) == before:
            break
    chunks, imports, current = [], [], None
    for i, d in enumerate(defs):
        if i not in kept:
            continue
        if isinstance(d.node, ast.Import | ast.ImportFrom):
            if not set(d.names) <= set(have) | set(dir(builtins)):
                imports.append(ast.get_source_segment("\n".join(d.lines), d.node))
            continue
        if d.file != current:
            chunks.append(f"# {'-' * 16} from spdsl/core/{d.file}.py (tree-shaken; documented there) {'-' * 16}")
            current = d.file
        drop = []
        if isinstance(d.node, ast.ClassDef):
            drop = [m for m in _members(d.node) if m.name not in _IMPLICIT and m.name not in used_attrs]
            drop += _stubs(d.node) + [a for a in _attributes(d.node) if _unused(a, used_attrs)]
        chunks.append(_source(d, drop))
    return "\n".join(sorted(set(imports), key=imports.index)) + "\n\n\n" + "\n\n".join(chunks) + "\n"
