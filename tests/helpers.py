"""Small helpers shared by test modules."""

from __future__ import annotations

import contextlib
import math
import os

import torch


@contextlib.contextmanager
def scoped_env(**values: str | None):
    """Set (or, with None, unset) environment variables for the duration; restore them after."""
    saved = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


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
