"""Helpers shared by the end-to-end tests: write an agent config, run the real CLI in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent


def agent_config(
    *,
    address: str,
    token_path: Path,
    out: Path,
    kv: str,
    mount: str = "kubernetes-cluster1",
    role: str = "istiod",
    method: str = "kubernetes",
    bundle_type: str = "istio-ca",
    init_timeout: str = "10s",
    **bundle_extra: Any,
) -> dict[str, Any]:
    """A config dict shaped like the issue-2 contract, for one bundle."""
    bundle: dict[str, Any] = {"name": "istiod-cacerts", "type": bundle_type, "source": {"kv": kv}, "dir": str(out)}
    bundle.update(bundle_extra)
    return {
        "vault": {"address": address},
        "auth": {"method": method, "mount": mount, "role": role, "token_path": str(token_path)},
        "bundles": [bundle],
        "init": {"timeout": init_timeout},
        "health": {"listen": "127.0.0.1:0"},
    }


def write_config(path: Path, cfg: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def cli_env(**extra: str) -> dict[str, str]:
    """The environment for a CLI subprocess: no VAULT_*/BAO_* leaking in from the developer's shell."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_", "ISTIO_VAULT_AGENT_"))}
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


def run_cli(*args: str, timeout: float = 60, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run `istio-vault-agent ARGS` as a user would (python -m agent.cli), capturing output."""
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env or cli_env(),
        cwd=ROOT,
        check=False,
    )


def error_line(proc: subprocess.CompletedProcess[str]) -> str:
    """The single `error:` line on stderr (asserting there is exactly one, and no traceback)."""
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    return lines[0]
