"""A root rotation in PKI mode against a real OpenBao (issue 20, item 3): docs/pki.md's `bao` commands, run as
written, and an agent whose `pki_intermediate` bundle carries extra trust anchors from KV (`extra_roots_kv`).

Each phase the agent publishes is replayed through the Go oracle's reload path (istiod 1.29 and 1.30, with the
root istiod had loaded), as in tests/test_rotation_proof.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from testbed.bao import find_bao
from testbed.vaultsetup import configure_kubernetes_auth, ensure_secrets_engine
from tests.support import AgentProc, wait_until
from tests.test_pki import PkiLab, current, fixture_lab  # noqa: F401 - a fixture
from tests.test_rotation_proof import RULES, reload


def _bao(lab_env: dict[str, str], workdir: Path, command: str) -> str:
    """One docs/pki.md command line (`bao ...`, with shell redirections) in `workdir`; returns its stdout."""
    proc = subprocess.run(command, shell=True, env=lab_env, cwd=workdir, capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 0, (command, proc.stdout, proc.stderr)
    return proc.stdout


@pytest.fixture(name="rot")
def fixture_rot(lab: PkiLab, bao, kube, unique: str, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """The lab's root mount (root A, issuer `root`), a KV v2 mount for the extra roots, the agent's read policy
    on it, and an environment for the `bao` CLI with the root token."""
    kv = f"kv-rot-{unique}"
    ensure_secrets_engine(lab.admin, kv, kv_version=2)
    policy = f"extra-roots-{unique}"
    lab.admin.sys.create_or_update_policy(
        name=policy, policy=f'path "{kv}/data/istio/extra-roots" {{ capabilities = ["read"] }}\n')
    configure_kubernetes_auth(lab.admin, kube, mount=lab.auth_mount, role="istiod", namespace="istio-system",
                              service_account="istiod", policies=[lab.layout.policy, policy])
    work = tmp_path / "ops"
    work.mkdir()
    env = {"PATH": f"{Path(find_bao()).parent}:{os.environ.get('PATH', '')}", "HOME": str(tmp_path),
           "BAO_ADDR": bao.address, "BAO_TOKEN": bao.root_token}
    yield {"kv": f"{kv}/istio/extra-roots", "env": env, "work": work, "pki": lab.layout.root_mount}


@pytest.mark.timeout(120)
def test_pki_mode_rotation_with_extra_trust_anchors(lab: PkiLab, rot, oracle, tmp_path):
    """trust: B in extra_roots_kv -> root-cert.pem = A's published bytes, then B; sign: B made the mount's default
    issuer -> a new intermediate under B, root-cert.pem byte-identical; retire: the extra roots emptied -> B alone.
    istiod 1.29 and 1.30 (ISTIO_MULTIROOT_MESH=true) reload every phase; the agent never logs root_changed."""
    pki, kv, work = rot["pki"], rot["kv"], rot["work"]

    def run(cmd: str) -> str:
        return _bao(rot["env"], work, cmd)

    bundle = lab.bundle_istiod(extra_roots_kv=kv)
    bundle["multiroot"] = True
    agent = AgentProc(lab.config(bundle, poll="0.3s")).start()
    out = lab.tmp / "istiod"
    try:
        agent.wait_event("sidecar_ready", timeout=30)
        first = current(out)
        root_a = x509.load_pem_x509_certificate(first["root-cert.pem"])
        assert first["root-cert.pem"] == lab.layout.root_pem or root_a.subject.rfc4514_string() == "CN=Root CA,O=Istio"
        held = first["root-cert.pem"]

        # hostile: not a certificate in the extra roots -> one sentence, retried; the live bundle stays
        run(f"bao kv put {kv} root_cert=not-a-certificate")
        said = f"key root_cert of KV secret {kv} must hold 1 to 8 PEM root certificates"
        assert wait_until(lambda: [e for e in agent.events("sync_failed") if said in e["reason"]], 30), agent.tail()
        failed = next(e for e in agent.events("sync_failed") if said in e["reason"])
        assert "\n" not in failed["reason"] and current(out) == first and agent.ready()[0] == 200

        # trust (docs/pki.md): a second root in the mount, not yet signing; both roots as the extra anchors
        run(f'bao write -field=certificate {pki}/root/rotate/internal common_name="Root CA B" organization=Istio'
            f" key_type=ec ttl=87000h issuer_name=root-b > root-b.pem")
        run(f"bao read -field=certificate {pki}/issuer/root > root-a.pem")
        run("{ cat root-a.pem; echo; cat root-b.pem; echo; } > roots-ab.pem")
        run(f"bao kv put {kv} root_cert=@roots-ab.pem")
        root_b = x509.load_pem_x509_certificate((work / "root-b.pem").read_bytes())
        trust = _wait_root(out, lambda r: r.startswith(held) and r != held, agent)
        assert x509.load_pem_x509_certificates(trust) == [root_a, root_b]
        assert current(out)["ca-cert.pem"] == first["ca-cert.pem"]  # the intermediate stays
        _reloads(oracle, out, held, changed=True)
        held = trust

        # sign: B signs from now on; every agent re-signs its intermediate at its next poll
        run(f"bao write {pki}/root/replace default=root-b")
        assert wait_until(lambda: current(out)["ca-cert.pem"] != first["ca-cert.pem"], 30), agent.tail()
        signed = current(out)
        assert x509.load_pem_x509_certificate(signed["ca-cert.pem"]).issuer == root_b.subject
        assert signed["root-cert.pem"] == trust  # byte for byte
        _reloads(oracle, out, held, changed=False)

        # retire: no extra anchors; the old issuer goes
        run(f"bao kv put {kv} root_cert=")
        retired = _wait_root(out, lambda r: r != trust, agent)
        assert x509.load_pem_x509_certificates(retired) == [root_b]
        _reloads(oracle, out, held, changed=True)
        run(f"bao delete {pki}/issuer/root")
        assert not agent.events("root_changed"), agent.tail()
        assert len(agent.events("trust_anchors_changed")) == 2
    finally:
        agent.stop()
    assert "Traceback" not in agent.stderr


def _wait_root(out: Path, ok: Any, agent: AgentProc) -> bytes:
    assert wait_until(lambda: ok(current(out)["root-cert.pem"]), 30), agent.tail()
    return current(out)["root-cert.pem"]


def _reloads(oracle: Path, out: Path, held: bytes, *, changed: bool) -> None:
    snapshot = out.parent / f"{out.name}-snapshot"
    shutil.rmtree(snapshot, ignore_errors=True)
    snapshot.mkdir()
    for name, data in current(out).items():
        (snapshot / name).write_bytes(data)
    for rule in RULES:
        v = reload(oracle, snapshot, held, rule=rule)
        assert v["reload"] == {"ok": True} and v["root_changed"] == changed, (rule, v)
