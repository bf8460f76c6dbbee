"""A tiny stand-in for ``cutlass``, ``cutlass.cute`` and ``flash_attn.cute.utils``, enough to run an
emitted FA4 ``mask_mod`` (spdsl.codegen.cute) on torch integer tensors: the same source FA4 would
compile, evaluated elementwise-vectorized on the CPU to check its semantics against the dense mask.

CuTe DSL semantics kept: signed ``//`` floors (``arith.floordivsi``); ``%`` truncates
(``arith.remsi``) -- the shim's integers raise on ``%`` so emitted code must not rely on it.
"""

from __future__ import annotations

import types
from contextlib import contextmanager

import torch


class _NoMod(torch.Tensor):
    """int64 tensors whose ``%`` raises (CuTe's signed ``%`` truncates: emitted code must avoid it)."""

    def __mod__(self, other):
        raise AssertionError("emitted CuTe code used %, which truncates in CuTe DSL")

    __rmod__ = __mod__


def ints(x) -> torch.Tensor:
    """An int64 tensor as the shim's integer type."""
    return torch.as_tensor(x, dtype=torch.int64).as_subclass(_NoMod)


def _minmax(fn):
    def op(a, b):
        a, b = torch.as_tensor(a), torch.as_tensor(b)
        return fn(a, b).as_subclass(_NoMod)

    return op


def modules() -> dict[str, types.ModuleType]:
    """Fake ``cutlass``, ``cutlass.cute``, ``flash_attn``, ``flash_attn.cute``, ``flash_attn.cute.utils``."""
    cutlass = types.ModuleType("cutlass")
    cutlass.min, cutlass.max = _minmax(torch.minimum), _minmax(torch.maximum)
    cutlass.Boolean, cutlass.Int32 = bool, int
    cute = types.ModuleType("cutlass.cute")
    cute.jit = lambda fn: fn
    cutlass.cute = cute
    utils = types.ModuleType("flash_attn.cute.utils")
    utils.ssa_to_scalar = lambda x: x
    utils.scalar_to_ssa = lambda x, dtype: x
    fa = types.ModuleType("flash_attn")
    fa_cute = types.ModuleType("flash_attn.cute")
    fa_cute.utils, fa.cute = utils, fa_cute
    return {"cutlass": cutlass, "cutlass.cute": cute, "flash_attn": fa, "flash_attn.cute": fa_cute,
            "flash_attn.cute.utils": utils}  # fmt: skip


@contextmanager
def installed(monkeypatch):
    """The fake modules in ``sys.modules`` for the duration."""
    with monkeypatch.context() as m:
        for name, mod in modules().items():
            m.setitem(__import__("sys").modules, name, mod)
        yield


def run_mask(source: str, q_len: int, kv_len: int, monkeypatch) -> torch.Tensor:
    """Execute emitted mask source under the shim; bool [q_len, kv_len] from one vectorized call."""
    with installed(monkeypatch):
        namespace: dict = {}
        exec(compile(source, "<emitted cute mask>", "exec"), namespace)
        seqlen_info = types.SimpleNamespace(seqlen_q=q_len, seqlen_k=kv_len)
        q = ints(torch.arange(q_len)[:, None])
        k = ints(torch.arange(kv_len)[None, :])
        out = namespace["mask_mod"](ints(0), ints(0), q, k, seqlen_info, None)
    return torch.broadcast_to(torch.as_tensor(out).as_subclass(torch.Tensor), (q_len, kv_len)).bool()
