"""Static checks a contributor runs before pushing: ruff on the whole tree, mypy --strict on the package."""

from __future__ import annotations

import importlib
import inspect
import subprocess
import sys
from pathlib import Path

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


def test_import_layers_hold():
    """import-linter: imports flow one way (cli -> runner -> workers -> ... -> errors), and the pure checks
    (validation, publishing, config) never import a Vault, HTTP or Kubernetes client."""
    lint = Path(sys.executable).with_name("lint-imports")
    if not lint.exists():
        pytest.skip("import-linter is not installed (pip install -e '.[test]')")
    proc = subprocess.run([str(lint)], cwd=ROOT, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "0 broken" in proc.stdout


def _modules() -> list[str]:
    return sorted(
        ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for path in (ROOT / "agent").rglob("*.py")
    )


@pytest.mark.parametrize("name", _modules())
def test_all_lists_every_public_name(name):
    """Each module's `__all__` names exactly what it defines for others: every public class and function it
    defines is listed, and every listed name exists."""
    module = importlib.import_module(name)
    exported = getattr(module, "__all__", None)
    if name == "agent":
        assert exported is None and module.__version__  # the package root holds the version only
        return
    assert isinstance(exported, list), f"{name} has no __all__"
    missing = [n for n in exported if not hasattr(module, n)]
    assert not missing, f"{name}.__all__ lists names it does not define: {missing}"
    defined = {
        n for n, obj in vars(module).items()
        if not n.startswith("_") and (inspect.isclass(obj) or inspect.isfunction(obj))
        and getattr(obj, "__module__", None) == name
    }
    assert defined <= set(exported), f"{name}.__all__ lacks {sorted(defined - set(exported))}"


def test_no_merge_conflict_markers():
    """No file in the checkout still holds the markers of an unresolved merge."""
    proc = subprocess.run(["git", "grep", "-n", "-E", "^(<<<<<<<|>>>>>>>) "], cwd=ROOT, capture_output=True,
                          text=True, check=False)
    if proc.returncode not in (0, 1):
        pytest.skip("not a git checkout")
    assert proc.stdout == "", proc.stdout[:2000]
