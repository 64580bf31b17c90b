"""The README's quick start: the demo publishes a bundle that openssl and `check` accept."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from tests.support import ROOT, cli_env


def test_quick_start_demo_publishes_a_verified_bundle(tmp_path):
    """`python -m testbed.demo` (what scripts/demo runs after setup) seeds OpenBao and publishes into --out."""
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "testbed.demo", "--out", str(out)],
        cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"ok: {out} is a valid istio-ca bundle" in proc.stdout
    if shutil.which("openssl"):
        assert "ca-cert.pem: OK" in proc.stdout
    else:  # pragma: no cover - openssl ships with the test machines
        pytest.skip("no openssl to check the demo's verify step")
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith("..")) == [
        "ca-cert.pem", "ca-key.pem", "cert-chain.pem", "root-cert.pem",
    ]
