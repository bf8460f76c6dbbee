"""Shared pytest setup: import paths, Hypothesis profiles, the ``slow`` and ``gpu`` markers.

* ``slow`` tests run only with ``SPDSL_SLOW=1`` (or when selected explicitly with ``-m slow``).
* ``gpu`` tests are skipped when CUDA is not available.
* Hypothesis profiles: ``default`` (no deadline: CPU CI cores are slow and noisy), ``ci``
  (derandomized, for reproducible CI runs) and ``thorough`` (1000 examples where a test does not
  set its own); pick one with ``SPDSL_HYPOTHESIS_PROFILE=name`` or ``pytest --hypothesis-profile=name``.
  Tests that set ``max_examples=n_examples(n)`` (tests/strategies.py) scale with
  ``SPDSL_EXAMPLES_SCALE`` (e.g. 10 for a bug hunt).
* torch runs single-threaded in tests (``SPDSL_TEST_THREADS`` overrides).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

_TESTS = Path(__file__).resolve().parent
_ROOT = _TESTS.parent
for _p in (str(_ROOT), str(_TESTS)):  # `from tests.strategies import ...` works from any cwd
    if _p not in sys.path:
        sys.path.insert(0, _p)

_QUIET = [HealthCheck.too_slow, HealthCheck.data_too_large]
settings.register_profile("default", deadline=None, suppress_health_check=_QUIET)
settings.register_profile("ci", deadline=None, derandomize=True, print_blob=True, suppress_health_check=_QUIET)
settings.register_profile("thorough", deadline=None, max_examples=1000, suppress_health_check=_QUIET)
settings.load_profile(os.environ.get("SPDSL_HYPOTHESIS_PROFILE", "default"))

# Tests run many small tensor ops: torch's intra-op threads only add barrier waits, which become
# catastrophic (10-30x) when the CI cores are oversubscribed. SPDSL_TEST_THREADS overrides.
torch.set_num_threads(max(1, int(os.environ.get("SPDSL_TEST_THREADS", "1"))))


def _import_triton_for_the_interpreter() -> None:
    """Triton fixes interpreted-or-compiled for each ``@triton.jit`` function when it is defined --
    its own standard library (``tl.zeros``...) at first import. On a CPU-only machine import it in
    interpreter mode before any test (or torch's Flex) does, so tests that switch
    ``TRITON_INTERPRET=1`` on later get a working interpreter; the variable itself is restored, so
    the op still routes CPU tensors to the reference unless a test asks for the interpreter."""
    if torch.cuda.is_available():
        return
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton.language  # noqa: F401
    except ImportError:  # no triton on this platform: interpreter tests skip or fail on their own
        pass
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET")
        else:
            os.environ["TRITON_INTERPRET"] = saved


_import_triton_for_the_interpreter()

ROOT = _ROOT  # the checkout root, for tests that read patterns/ or templates/


def _slow_enabled(config: pytest.Config) -> bool:
    if os.environ.get("SPDSL_SLOW", "").strip() not in ("", "0"):
        return True
    expr = config.getoption("markexpr", default="") or ""
    return "slow" in expr and "not slow" not in expr


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    run_slow = _slow_enabled(config)
    has_cuda = None
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(pytest.mark.skip(reason="slow: set SPDSL_SLOW=1 to run"))
        if "gpu" in item.keywords:
            if has_cuda is None:
                has_cuda = torch.cuda.is_available()
            if not has_cuda:
                item.add_marker(pytest.mark.skip(reason="gpu: CUDA is not available"))


@pytest.fixture
def repo_root() -> Path:
    """The checkout root (holds patterns/, grammar/, templates/)."""
    return _ROOT
