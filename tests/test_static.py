"""Static checks a contributor runs before pushing: ruff on the whole tree, mypy --strict on the package."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support import ROOT


def test_ruff_is_clean():
    """`ruff check` finds nothing in agent/, tests/, testbed/ and bench/."""
    pytest.importorskip("ruff")
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "agent", "tests", "testbed", "bench"], cwd=ROOT,
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:]


def test_mypy_strict_is_clean():
    """`mypy` (strict, configured in pyproject.toml) finds nothing in the agent package."""
    pytest.importorskip("mypy")
    proc = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:]
