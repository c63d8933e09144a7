"""Shared by the tests and the benchmarks: PyTorch reference builders and test inputs.

Modules here import the reference packages (torch, torchvision, timm, transformers,
segment_anything; the `test` extra) at module level; the rest of segjax never imports
this package.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType


def in_ci() -> bool:
    """True where the CI runs (the `CI` environment variable set and not 0/false)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def importorskip(name: str) -> ModuleType:
    """Imports a reference package for a parity test.

    Locally a missing package skips the test (pytest shows the reason); in CI it is an
    error, so a machine without the references cannot pass with the parity tests skipped.
    """
    import pytest

    if in_ci():
        try:
            return importlib.import_module(name)
        except ImportError as e:
            raise ImportError(f"{name} is required in CI for parity tests (pip install -e '.[test]'): {e}") from e
    return pytest.importorskip(name, reason=f"{name} is not installed (pip install -e '.[test]')")
