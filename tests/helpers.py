"""Small helpers shared by test modules."""

from __future__ import annotations

import contextlib
import math
import os

import torch


def _put(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


@contextlib.contextmanager
def scoped_env(**values: str | None):
    """Set (or, with None, unset) environment variables for the duration; restore them after."""
    saved = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            _put(k, v)
        yield
    finally:
        for k, v in saved.items():
            _put(k, v)


class _NaNTorch:
    """Stands in for ``torch`` inside a generated module: ``empty``/``empty_like`` come back NaN-filled."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def _nan(t):
        return t.fill_(math.nan) if t.is_floating_point() else t

    def empty(self, *args, **kwargs):
        return self._nan(torch.empty(*args, **kwargs))

    def empty_like(self, *args, **kwargs):
        return self._nan(torch.empty_like(*args, **kwargs))


@contextlib.contextmanager
def nan_buffers(module):
    """Output buffers allocated by ``module`` start as NaN, so unwritten elements stay NaN."""
    saved = module.torch
    module.torch = _NaNTorch()
    try:
        yield
    finally:
        module.torch = saved
