"""The FA4 target: the IR's ``keep`` as a CuTe-DSL ``mask_mod`` (``templates/cute/mask.py.jinja``).

:class:`CuteOps` is the ops backend the IR's ``keep`` runs on, beside
:class:`~spdsl.codegen.triton.TritonOps`: the same traversal, the same :mod:`.expr` DAG, other
function names. The emitted code uses only integer ``+ - * //``, comparisons, ``& |`` and
``cutlass.min`` / ``cutlass.max`` (no ``%``: CuTe DSL's signed ``%`` is ``arith.remsi``, which
truncates; its ``//`` is ``arith.floordivsi``, which floors, as the IR means it), so the same source
also runs on torch integer tensors through a small shim (``tests/cute_shim.py``).

The signature is FA4's and torch's ``flex_flash_attention`` bridge's:
``mask_mod(b_idx, h_idx, q_idx, kv_idx, seqlen_info, aux_tensors)`` with ``q_idx`` / ``kv_idx``
Int32 ``TensorSSA`` of shape (1,), returning a Boolean ``TensorSSA`` of shape (1,).
"""

from __future__ import annotations

import ast
import hashlib

from .._version import __version__
from ..core.ir import INT_LIMIT, MAX_NAME_LENGTH, PatternIR
from ..resources import jinja_env
from .expr import EmitOps, call, positive, render, var

#: Names the mask template binds around the emitted code (never chosen for a subexpression).
RESERVED = {"qu", "ku", "qpos", "kpos", "keep", "b_idx", "h_idx", "q_idx", "kv_idx", "seqlen_info", "aux_tensors"}
#: Every name the emitted module may read besides what it assigns itself.
ALLOWED_NAMES = {"cutlass", "cute", "utils", "max", "min"}


def powers(b: int) -> list[int]:
    """``b, b**2, ...`` below 2**31: the candidates of ``_floor_pow{b}``."""
    out, p = [], positive(b, "a power base")
    while p < INT_LIMIT:
        out.append(p)
        p *= b
    return out


class CuteOps(EmitOps):
    """Ops backend emitting CuTe-DSL scalar code: helper calls ``_fdiv`` / ``_fmod`` / ``_abs`` /
    ``_floor_pow{b}`` (defined by the template) and ``cutlass.min`` / ``cutlass.max``."""

    ABS, MIN, MAX = "_abs", "cutlass.min", "cutlass.max"

    def where(self, c, a, b):
        raise NotImplementedError("the CuTe mask emits keep() only, which needs no where()")

    def floor_pow(self, x, b: int):
        self.pow_bases.add(positive(b, "a power base"))
        return call(f"_floor_pow{b}", x, hint=f"pow{b}")


def check_source(text: str) -> ast.Module:
    """Parse emitted source and check it reads only names it assigns or :data:`ALLOWED_NAMES`, and
    holds no constants but ints, bools, None and strings (its docstring and ``__cute_hash__``).

    Returns
    -------
    The parsed module. Raises ValueError when a check fails (a bug in the emitter, not user input).
    """
    tree = ast.parse(text)
    bound = set(ALLOWED_NAMES)
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            bound.add(node.id)
        elif isinstance(node, ast.alias):
            bound.add((node.asname or node.name).split(".")[0])
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id not in bound:
            raise ValueError(f"emitted CuTe source reads an unknown name {node.id!r}")
        if isinstance(node, ast.Constant) and not isinstance(node.value, (int, bool, str, type(None))):
            raise ValueError(f"emitted CuTe source holds a non-integer constant {node.value!r}")
        if isinstance(node, ast.Constant) and isinstance(node.value, int) and abs(node.value) >= INT_LIMIT:
            raise ValueError(f"emitted CuTe source holds an integer out of range: {node.value}")
    return tree


def keeps_all(pat: PatternIR) -> bool:
    """True when the attend expression keeps every (query, key) pair before the causal cut (it folds
    to ``True``, as ``all`` does): FA4's own dense (causal) kernel then runs the pattern, no mask."""
    _, (expr,) = render([pat.expr.keep(CuteOps(), var("qu"), var("ku"))], RESERVED)
    return expr is True


def mask_source(pat: PatternIR, q_offset: int | None = None) -> str:
    """The CuTe-DSL module defining ``mask_mod`` for ``pat`` (attend expression, units, causal cut).

    Parameters
    ----------
    pat: the pattern.
    q_offset: the absolute position of query row 0, baked in as a constant; None reads
        ``seqlen_info.seqlen_k - seqlen_info.seqlen_q`` at run time (spdsl's default offset: one
        compiled mask for every shape).

    Returns
    -------
    Python source (checked by :func:`check_source`): imports ``cutlass``, ``cutlass.cute`` and
    ``flash_attn.cute.utils``; defines ``mask_mod`` with FA4's signature and ``__cute_hash__``.
    """
    if q_offset is not None and (not isinstance(q_offset, int) or isinstance(q_offset, bool)):
        raise ValueError(f"q_offset must be an int or None, got {q_offset!r}")
    if q_offset is not None and not -INT_LIMIT < q_offset < INT_LIMIT:
        raise ValueError(f"q_offset {q_offset} out of range for generated code")
    if not pat.name.isidentifier() or len(pat.name) > MAX_NAME_LENGTH:
        raise ValueError(f"not a valid identifier for generated code: {pat.name!r}")
    ops = CuteOps()
    lines, (expr,) = render([pat.expr.keep(ops, var("qu"), var("ku"))], RESERVED)
    text = (
        jinja_env()
        .get_template("cute/mask.py.jinja")
        .render(
            name=pat.name,
            version=__version__,
            unit=pat.unit,
            causal=pat.causal,
            q_offset=q_offset,
            lines=lines,
            expr=expr,
            pow_bases=[(b, powers(b)) for b in sorted(ops.pow_bases)],
            cute_hash="@HASH@",
        )
    )
    # FA4 caches compiled kernels by __cute_hash__: it covers the whole emitted text (template included)
    digest = hashlib.sha256(f"{__version__}\n{text}".encode()).hexdigest()[:24]
    text = text.replace('"@HASH@"', f'"spdsl_{pat.name}_{digest}"')
    check_source(text)
    return text
