"""PKI sources (issue 11) against OpenBao's real PKI engine: a root mount and a mount with an intermediate issuer.

istiod's intermediate is made from a CSR (the key never leaves the agent), gateway certificates are issued by a
role; both are reused after a restart, renewed inside a test (TTLs of tens of seconds), and refused requests end
in one `error:` line. Every agent talks to OpenBao through a recording proxy, so tests see what it sends.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from testbed import pki as testpki
from testbed.envoy import Envoy, ServerTls, client_context
from testbed.kubeapi import KubeAPI
from testbed.vaultsetup import PkiLayout, configure_kubernetes_auth, setup_pki
from tests.faultkit import Answer, HTTPProxy, LeakGuard, fixture_leaks  # noqa: F401 - a fixture
from tests.support import AgentProc, cli_env, error_line, live_files, run_cli, slow_only, wait_until, write_config
from tests.test_gateway_envoy import Prober, fingerprint, fixture_envoy_binary  # noqa: F401 - a fixture

SIGN_KEYS = {"csr", "use_csr_values", "ttl", "format"}


def spki(cert: x509.Certificate | x509.CertificateSigningRequest) -> bytes:
    """The SubjectPublicKeyInfo of a certificate or CSR."""
    return cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def certs(data: bytes) -> list[x509.Certificate]:
    """Every certificate in a PEM file."""
    return x509.load_pem_x509_certificates(data)


def current(directory: Path) -> dict[str, bytes]:
    """The live generation's files; resolved again when a renewal removed it between readlink and reading (a
    bundle renewed every few seconds)."""
    for _ in range(50):
        try:
            return live_files(directory)
        except FileNotFoundError:
            continue
    return live_files(directory)


def openssl_verify(directory: Path, *args: str) -> str:
    """`openssl verify ARGS` run in `directory`; returns its output (asserting success)."""
    proc = subprocess.run(["openssl", "verify", *args], cwd=directory, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@dataclass
class PkiLab:
    """The PKI layout on the shared OpenBao, a kubernetes auth role with the minimal policy, and a recording
    proxy the agents use as their Vault address."""

    tmp: Path
    layout: PkiLayout
    proxy: HTTPProxy
    auth_mount: str
    token_path: Path
    admin: Any

    def bundle_istiod(self, name: str = "istiod", **source: Any) -> dict[str, Any]:
        """An istio-ca bundle from `pki_intermediate` (the root mount's root/sign-intermediate by default)."""
        src = {"mount": self.layout.root_mount, "cluster": "cluster1", "ttl": "1h", **source}
        return {"name": name, "type": "istio-ca", "dir": str(self.tmp / name), "ready_min_remaining": "1s",
                "source": {"pki_intermediate": src}}

    def bundle_gateway(self, name: str = "gateway", **source: Any) -> dict[str, Any]:
        """A tls bundle from `pki` (the gateway role of the intermediate mount)."""
        src = {"mount": self.layout.int_mount, "role": self.layout.role, "common_name": "app.example.com",
               "alt_names": ["localhost"], "ip_sans": ["127.0.0.1"], "ttl": "1h", **source}
        return {"name": name, "type": "tls", "dir": str(self.tmp / name), "ready_min_remaining": "1s",
                "source": {"pki": src}}

    def config(self, *bundles: dict[str, Any], poll: str = "0.5s", role: str = "istiod",
               filename: str = "agent.yaml") -> Path:
        """An agent config for `bundles`, logging in through the proxy."""
        return write_config(self.tmp / filename, {
            "vault": {"address": self.proxy.address, "timeout": "5s"},
            "auth": {"method": "kubernetes", "mount": self.auth_mount, "role": role,
                     "token_path": str(self.token_path)},
            "bundles": list(bundles),
            "init": {"timeout": "20s"},
            "health": {"listen": "127.0.0.1:0"},
            "sidecar": {"poll_interval": poll},
        })

    def posts(self, since: int = 0) -> list[tuple[str, dict[str, Any]]]:
        """(path, JSON body) of every POST/PUT the agents sent since request number `since`."""
        return [(path, json.loads(body or b"{}")) for method, path, body in self.proxy.bodies[since:]
                if method in ("POST", "PUT") and "/auth/" not in path]

    def signs(self, since: int = 0) -> list[dict[str, Any]]:
        """The bodies of the signing and issuing requests since `since`."""
        ends = ("/sign-intermediate", f"/issue/{self.layout.role}")
        return [body for path, body in self.posts(since) if path.endswith(ends)]


@pytest.fixture(name="lab")
def fixture_lab(bao, kube: KubeAPI, unique: str, tmp_path: Path, sa_token_file) -> Iterator[PkiLab]:
    """A PkiLab with mounts, role and policy of its own on the shared OpenBao."""
    proxy = HTTPProxy(bao.port)
    admin = bao.client()
    layout = setup_pki(admin, root_mount=f"pki-{unique}", int_mount=f"pki-int-{unique}",
                       policy=f"istio-pki-{unique}", crl_address=proxy.address)
    auth_mount = f"k8s-{unique}"
    configure_kubernetes_auth(admin, kube, mount=auth_mount, role="istiod", namespace="istio-system",
                              service_account="istiod", policies=[layout.policy])
    lab = PkiLab(tmp_path, layout, proxy, auth_mount, sa_token_file("istio-system", "istiod"), admin)
    try:
        yield lab
    finally:
        proxy.close()


def _guard(leaks: LeakGuard, agent_log: str, *dirs: Path) -> None:
    for d in dirs:
        leaks.key_files(d.name, live_files(d))
    leaks.watch("agent log", agent_log)


# ---------------------------------------------------------------------------------------------- init mode


class TestInit:
    def test_signed_intermediates_and_gateway_cert_verify(self, lab: PkiLab, leaks: LeakGuard, oracle: Path):
        """One init run publishes an intermediate signed at the root mount, one signed by the intermediate issuer
        (RSA, with ca-crl.pem) and a gateway certificate: openssl and istiod's own checks (the Go oracle) accept
        all three, the signing requests carry only a CSR for the published key, and no key reaches the log."""
        cfg = lab.config(
            lab.bundle_istiod(),
            lab.bundle_istiod("istiod-mid", mount=lab.layout.int_mount, path=lab.layout.issuer_sign_path,
                              cluster="cluster2", key_type="rsa-2048", crl=True),
            lab.bundle_gateway(),
        )
        proc = run_cli("run", "--config", str(cfg), "--mode", "init", env=cli_env())
        assert proc.returncode == 0, proc.stderr
        istiod, mid, gateway = (lab.tmp / n for n in ("istiod", "istiod-mid", "gateway"))
        _guard(leaks, proc.stderr, istiod, mid, gateway)
        root = certs(lab.layout.root_pem)[0]

        files = live_files(istiod)
        assert sorted(files) == ["ca-cert.pem", "ca-key.pem", "cert-chain.pem", "root-cert.pem"]
        ca = certs(files["ca-cert.pem"])[0]
        assert ca.subject.rfc4514_string() == "L=cluster1,CN=Intermediate CA,O=Istio"
        san = ca.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.DNSName) == ["istiod.istio-system.svc"]
        assert certs(files["cert-chain.pem"]) == [ca, root] and certs(files["root-cert.pem"]) == [root]
        assert (istiod / "..data" / "ca-key.pem").stat().st_mode & 0o777 == 0o600
        assert "ca-cert.pem: OK" in openssl_verify(istiod, "-CAfile", "root-cert.pem", "-untrusted",
                                                   "cert-chain.pem", "ca-cert.pem")

        files = live_files(mid)
        chain = certs(files["cert-chain.pem"])
        assert chain[0].subject.rfc4514_string() == "L=cluster2,CN=Intermediate CA,O=Istio"
        assert chain[1:] == [certs(lab.layout.int_pem)[0], root]
        assert chain[0].public_key().key_size == 2048
        assert files["ca-key.pem"].startswith(b"-----BEGIN PRIVATE KEY-----")
        # ca-crl.pem: an empty CRL of the intermediate itself, then the intermediate issuer's and the root's
        # (the root's found through the CRL distribution point the Gateway CA certificate names)
        crls = [x509.load_pem_x509_crl(b"-----BEGIN X509 CRL-----" + part)
                for part in files["ca-crl.pem"].split(b"-----BEGIN X509 CRL-----")[1:]]
        assert [c.issuer for c in crls] == [c.subject for c in chain]
        assert "ca-cert.pem: OK" in openssl_verify(mid, "-crl_check_all", "-CRLfile", "ca-crl.pem", "-CAfile",
                                                   "root-cert.pem", "-untrusted", "cert-chain.pem", "ca-cert.pem")

        files = live_files(gateway)
        leaf, mid_ca = certs(files["tls.crt"])
        assert certs(files["ca.crt"]) == [root] and mid_ca == certs(lab.layout.int_pem)[0]
        assert set(leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
                   .get_values_for_type(x509.DNSName)) == {"app.example.com", "localhost"}
        assert "tls.crt: OK" in openssl_verify(gateway, "-CAfile", "ca.crt", "-untrusted", "tls.crt", "tls.crt")

        # istiod's startup and reload paths, and pilot-agent's for the gateway, in Go
        request = [{"dir": str(d / "..data"), "kind": k, "ca_signs_cert": True}
                   for d, k in ((istiod, "istio-ca"), (mid, "istio-ca"), (gateway, "tls"))]
        verdicts = json.loads(subprocess.run([str(oracle)], input=json.dumps(request), capture_output=True,
                                             text=True, timeout=60, check=True).stdout)
        for v in verdicts:
            outcome = v.get("startup") or v.get("gateway")
            assert outcome["ok"], v
            assert v.get("reload", {"ok": True})["ok"], v

        # what went to OpenBao: a CSR only, for the key that was published; nothing else asked to be signed
        posts = dict(lab.posts())
        assert len(lab.signs()) == 3
        for path, directory in ((f"{lab.layout.root_mount}/root/sign-intermediate", istiod),
                                (f"{lab.layout.int_mount}/{lab.layout.issuer_sign_path}", mid)):
            body = posts[f"/v1/{path}"]
            assert set(body) == SIGN_KEYS and body["use_csr_values"] is True and body["format"] == "pem"
            csr = x509.load_pem_x509_csr(body["csr"].encode())
            assert spki(csr) == spki(certs(live_files(directory)["ca-cert.pem"])[0])
        issue = posts[f"/v1/{lab.layout.int_mount}/issue/{lab.layout.role}"]
        assert set(issue) == {"common_name", "alt_names", "ip_sans", "ttl", "format"}
        assert not [b for _, _, b in lab.proxy.bodies if b"PRIVATE KEY" in b]

    def test_restart_reuses_the_published_intermediate(self, lab: PkiLab):
        """A second init run signs nothing: the published intermediate and gateway certificate are still good and
        under the mounts' roots, so the same generation stays (ca-crl.pem too); after `cluster` changes, a new one is
        signed."""
        cfg = lab.config(lab.bundle_istiod(crl=True), lab.bundle_gateway())
        assert run_cli("run", "--config", str(cfg), "--mode", "init").returncode == 0
        before = {d: (os.readlink(lab.tmp / d / "..data"), current(lab.tmp / d)) for d in ("istiod", "gateway")}
        mark = len(lab.proxy.bodies)
        again = run_cli("run", "--config", str(cfg), "--mode", "init")
        assert again.returncode == 0, again.stderr
        assert lab.signs(mark) == []
        assert '"intermediate_reused"' in again.stderr and '"certificate_reused"' in again.stderr
        assert before == {d: (os.readlink(lab.tmp / d / "..data"), current(lab.tmp / d))
                          for d in ("istiod", "gateway")}

        changed = lab.config(lab.bundle_istiod(cluster="cluster9"), lab.bundle_gateway())
        mark = len(lab.proxy.bodies)
        third = run_cli("run", "--config", str(changed), "--mode", "init")
        assert third.returncode == 0, third.stderr
        assert "not made for cluster cluster9" in third.stderr
        assert len(lab.signs(mark)) == 1
        files = current(lab.tmp / "istiod")
        assert certs(files["ca-cert.pem"])[0].subject.rfc4514_string().startswith("L=cluster9,")
        assert files["root-cert.pem"] == before["istiod"][1]["root-cert.pem"]

    def test_refused_requests_are_one_error_line(self, lab: PkiLab, kube: KubeAPI):
        """A policy without update on the signing path, and a role that does not allow the name, each end init
        with one `error:` line that names the path or the role and says what to fix."""
        lab.admin.sys.create_or_update_policy(name=f"{lab.layout.policy}-none",
                                              policy='path "x/y" { capabilities = ["read"] }')
        configure_kubernetes_auth(lab.admin, kube, mount=lab.auth_mount, role="nopolicy", namespace="istio-system",
                                  service_account="istiod", policies=[f"{lab.layout.policy}-none"])
        proc = run_cli("run", "--config", str(lab.config(lab.bundle_istiod(), role="nopolicy")), "--mode", "init")
        assert proc.returncode == 1
        line = error_line(proc)
        where = f"{lab.layout.root_mount}/root/sign-intermediate"
        assert f"permission denied while signing istiod's intermediate CSR at {where}" in line, line
        assert f"policy needs update on {where}" in line, line

        proc = run_cli("run", "--config", str(lab.config(lab.bundle_gateway(common_name="app.other.org"))),
                       "--mode", "init")
        assert proc.returncode == 1
        line = error_line(proc)
        assert f"at {lab.layout.int_mount}/issue/{lab.layout.role}" in line, line
        assert "not allowed by this role" in line and f"role {lab.layout.role} must allow" in line, line
        assert not (lab.tmp / "gateway" / "..data").exists()


# ---------------------------------------------------------------------------------------------- sidecar mode


def _issued(agent: AgentProc, event: str, bundle: str) -> list[dict[str, Any]]:
    return [e for e in agent.events(event) if e.get("bundle") == bundle]


class TestSidecar:
    def test_renewal_keeps_root_byte_identical_and_survives_signing_failures(self, lab: PkiLab):
        """With a 20 s intermediate the agent renews every few seconds with a fresh key; root-cert.pem stays
        byte-identical; it signs only when renewal is due; a failing signing endpoint keeps the live bundle
        ready, counts errors_total{reason="signing"} and is retried until it works again."""
        cfg = lab.config(lab.bundle_istiod(ttl="20s"), poll="0.5s")
        agent = AgentProc(cfg).start()
        try:
            agent.wait_event("sidecar_ready", timeout=20)
            first = current(lab.tmp / "istiod")
            wait_until(lambda: len(_issued(agent, "intermediate_issued", "istiod")) >= 3, 25)
            issued = _issued(agent, "intermediate_issued", "istiod")
            assert len(issued) >= 3, agent.tail()
            assert [e["renewed"] for e in issued] == [False] + [True] * (len(issued) - 1)
            now = current(lab.tmp / "istiod")
            assert now["root-cert.pem"] == first["root-cert.pem"]
            assert now["ca-key.pem"] != first["ca-key.pem"] and now["ca-cert.pem"] != first["ca-cert.pem"]

            # OpenBao's signing endpoint fails: the live bundle stays and stays ready, the agent retries
            lab.proxy.mutate = lambda method, path, status, body: (
                Answer(500, b'{"errors":["broken for the test"]}') if path.endswith("/sign-intermediate") else None)
            key = 'istio_vault_agent_errors_total{bundle="istiod",reason="signing"}'
            assert wait_until(lambda: agent.metric(key) >= 2, 15), agent.tail()
            held = current(lab.tmp / "istiod")
            assert agent.ready()[0] == 200
            lab.proxy.mutate = None
            count = len(_issued(agent, "intermediate_issued", "istiod"))
            assert wait_until(lambda: len(_issued(agent, "intermediate_issued", "istiod")) > count, 15), agent.tail()
            assert wait_until(lambda: current(lab.tmp / "istiod")["ca-cert.pem"] != held["ca-cert.pem"], 5)
            assert current(lab.tmp / "istiod")["root-cert.pem"] == first["root-cert.pem"]
            before = len(_issued(agent, "intermediate_issued", "istiod"))
            renewals = agent.metric('istio_vault_agent_renewals_total{bundle="istiod"}')
            assert before - 1 <= renewals <= before  # one more renewal may land between the two reads
            assert agent.ready()[0] == 200
        finally:
            agent.stop()
        failed = [e for e in agent.events("sync_failed") if "broken for the test" in e["reason"]]
        assert failed and all(e["retryable"] for e in failed)
        assert "while signing istiod's intermediate CSR at" in failed[0]["reason"]
        # a 20 s intermediate renews with seconds left, far below 2 x the 24 h workload certificates: said each time
        short = _issued(agent, "intermediate_lead_time_short", "istiod")
        assert short and "less than twice workload_cert_ttl (86400s)" in short[0]["reason"], agent.tail()
        # signing requests: one per issuance and one per failure, none on a poll with nothing due
        issued = _issued(agent, "intermediate_issued", "istiod")
        signs = [p for p, _ in lab.posts() if p.endswith("/sign-intermediate")]
        assert len(signs) == len(issued) + len(failed)
        assert "Traceback" not in agent.stderr

    def test_idle_agent_sends_no_signing_request(self, lab: PkiLab):
        """While nothing is due the gateway bundle costs no Vault request at all, and the intermediate one GET of
        its issuer's chain per poll (no policy needed); nothing is signed."""
        cfg = lab.config(lab.bundle_istiod(), lab.bundle_gateway(), poll="0.3s")
        agent = AgentProc(cfg).start()
        try:
            agent.wait_event("sidecar_ready", timeout=20)
            mark = len(lab.proxy.requests)
            time.sleep(3)
            seen = lab.proxy.requests[mark:]
        finally:
            agent.stop()
        assert [r for r in seen if r[0] != "GET"] == []
        assert {path for _, path in seen} == {f"/v1/{lab.layout.root_mount}/issuer/default/json"}
        assert 4 <= len(seen) <= 14, seen

    def test_revoked_intermediate_is_replaced(self, lab: PkiLab):
        """With crl: true the agent publishes the root's CRL; when the root mount revokes the intermediate, the
        next poll sees it in that CRL and signs a new intermediate (the revoked serial then in ca-crl.pem)."""
        agent = AgentProc(lab.config(lab.bundle_istiod(crl=True))).start()
        try:
            agent.wait_event("sidecar_ready", timeout=20)
            old = certs(current(lab.tmp / "istiod")["ca-cert.pem"])[0]
            serial = old.serial_number.to_bytes((old.serial_number.bit_length() + 7) // 8, "big").hex(":")
            lab.admin.write_data(f"{lab.layout.root_mount}/revoke", data={"serial_number": serial})
            agent.wait_event("intermediate_revoked", timeout=10)
            assert wait_until(lambda: certs(current(lab.tmp / "istiod")["ca-cert.pem"])[0] != old, 10)
            files = current(lab.tmp / "istiod")
            root_crl = x509.load_pem_x509_crl(b"-----BEGIN X509 CRL-----" + files["ca-crl.pem"].split(
                b"-----BEGIN X509 CRL-----")[2])
            assert root_crl.get_revoked_certificate_by_serial_number(old.serial_number) is not None
            assert agent.ready()[0] == 200
        finally:
            agent.stop()


    @pytest.mark.parametrize("same_second", [False, True], ids=["later-root", "root-of-the-same-second"])
    def test_root_change_is_followed_and_a_lagging_answer_is_not(self, lab: PkiLab, same_second: bool):
        """A new default issuer (root) in the mount is seen within a poll and the intermediate is signed under it;
        an answer that still shows the older root afterwards (a lagging node) signs nothing, even when both roots
        have the same notBefore (made within one second) and cannot be ordered by it."""
        root_mount = lab.layout.root_mount
        bundle = {**lab.bundle_istiod(), "on_root_change": "none"}
        agent = AgentProc(lab.config(bundle, poll="0.3s")).start()
        try:
            agent.wait_event("sidecar_ready", timeout=20)
            old_body = json.dumps(lab.admin.adapter.get(f"/v1/{root_mount}/issuer/default/json")).encode()
            if same_second:
                old_root = certs(json.loads(old_body)["data"]["certificate"].encode())[0]
                pem_root, issuer_id = _import_root(lab.admin, root_mount, old_root.not_valid_before_utc)
            else:
                new = lab.admin.write_data(f"{root_mount}/root/generate/internal", data={
                    "common_name": "Root CA 2", "organization": "Istio", "key_type": "ec", "ttl": "8000h"})
                pem_root, issuer_id = new["data"]["certificate"].encode(), new["data"]["issuer_id"]
            lab.admin.write_data(f"{root_mount}/config/issuers", data={"default": issuer_id})
            agent.wait_event("intermediate_root_changed", timeout=10)
            new_root = certs(pem_root)[0]
            assert wait_until(lambda: certs(current(lab.tmp / "istiod")["root-cert.pem"]) == [new_root], 10)
            agent.wait_event("root_changed", timeout=10)  # the worker's root-change guard saw it too
            signed = len([p for p, _ in lab.posts() if p.endswith("/sign-intermediate")])
            assert signed == 2

            lab.proxy.mutate = lambda method, path, status, body: (
                Answer(200, old_body) if path == f"/v1/{root_mount}/issuer/default/json" else None)
            agent.wait_event("intermediate_chain_stale", timeout=10)
            time.sleep(1)
            assert len([p for p, _ in lab.posts() if p.endswith("/sign-intermediate")]) == signed
            assert certs(current(lab.tmp / "istiod")["root-cert.pem"]) == [new_root]
            assert agent.ready()[0] == 200
        finally:
            lab.proxy.mutate = None
            agent.stop()


def _import_root(admin: Any, mount: str, not_before: dt.datetime) -> tuple[bytes, str]:
    """Import a new root CA with the given notBefore into PKI mount `mount`; its PEM and issuer id."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Istio"),
                      x509.NameAttribute(NameOID.COMMON_NAME, "Root CA 2")])
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(not_before)
        .not_valid_after(not_before + dt.timedelta(days=300))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    pem_cert = cert.public_bytes(serialization.Encoding.PEM)
    pem_key = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    answer = admin.write_data(f"{mount}/issuers/import/bundle", data={"pem_bundle": (pem_cert + pem_key).decode()})
    return pem_cert, answer["data"]["imported_issuers"][0]


# ---------------------------------------------------------------------------------------------- a real gateway


def _rotate_under_envoy(lab: PkiLab, envoy_binary: str, renewals: int, ttl: str) -> None:
    cfg = lab.config(lab.bundle_gateway(common_name="localhost", alt_names=[], ttl=ttl), poll="0.5s")
    agent = AgentProc(cfg).start()
    (lab.tmp / "root.pem").write_bytes(lab.layout.root_pem)
    envoy = Envoy(lab.tmp / "envoy", binary=envoy_binary, listeners=[ServerTls("gw", lab.tmp / "gateway")])
    prober: Prober | None = None
    try:
        agent.wait_event("sidecar_ready", timeout=20)
        envoy.start()
        prober = Prober("gw", envoy.port("gw"), client_context(cafile=lab.tmp / "root.pem"), "ok gw").start()
        base = len(_issued(agent, "certificate_issued", "gateway"))  # renewals may come before Envoy is up
        for n in range(renewals):
            wait_until(lambda n=n: len(_issued(agent, "certificate_issued", "gateway")) >= base + n + 1, 30)
            serial = _issued(agent, "certificate_issued", "gateway")[base + n]["serial"].replace(":", "")

            def live(serial: str = serial) -> x509.Certificate | None:
                leaf = certs(current(lab.tmp / "gateway")["tls.crt"])[0]
                return leaf if format(leaf.serial_number, "x").zfill(len(serial)) == serial else None

            leaf = wait_until(live, 10)
            assert leaf is not None, agent.tail()
            assert wait_until(lambda fp=fingerprint(leaf.public_bytes(Encoding.DER)): prober.sees(fp), 10), agent.tail()
        prober.stop()
        assert prober.failures() == [], [r.error for r in prober.failures()[:5]]
        assert len(prober.first_seen) >= renewals
        assert envoy.key_rotation_failures("gw") == 0
        assert agent.metric('istio_vault_agent_renewals_total{bundle="gateway"}') >= base - 1 + renewals
    finally:
        if prober is not None:
            prober.stop()
        envoy.close()
        agent.stop()
    assert "Traceback" not in agent.stderr


class TestGateway:
    def test_envoy_rotates_without_a_failed_handshake(self, lab: PkiLab, envoy_binary: str):
        """A 20 s gateway certificate renewed at 2/3 of its life under a real Envoy: every handshake succeeds and
        Envoy serves each new certificate."""
        _rotate_under_envoy(lab, envoy_binary, renewals=3, ttl="20s")

    @pytest.mark.slow
    @pytest.mark.timeout(300)
    def test_rotation_soak(self, lab: PkiLab, envoy_binary: str, request: pytest.FixtureRequest):
        """The same over 30 renewals."""
        slow_only(request)
        _rotate_under_envoy(lab, envoy_binary, renewals=30, ttl="20s")


# ---------------------------------------------------------------------------------------------- pure parts


class TestSchedule:
    def test_renewal_time_is_jittered_around_the_fraction(self):
        """renew_time lands within +-5 % of the renewal margin around `left` of the lifetime."""
        from agent.sources.pki import renew_time

        assert renew_time(0, 1000, 0.33, rng=lambda: 0.0) == pytest.approx(1000 - 330 * 0.95)
        assert renew_time(0, 1000, 0.33, rng=lambda: 1.0) == pytest.approx(1000 - 330 * 1.05)
        assert renew_time(0, 900, 1 / 3, rng=lambda: 0.5) == pytest.approx(600)

    def test_chain_is_built_by_signature_whatever_the_order(self):
        """build_chain orders a shuffled pool (with the leaf itself in it, as sign-intermediate answers) into
        issuer first, root last."""
        from agent.sources.pki import build_chain

        root = testpki.root_ca()
        mid = testpki.intermediate_ca(root)
        leaf = testpki.leaf_cert(mid)
        other = testpki.root_ca(cn="unrelated")
        assert build_chain(leaf.cert, [root.cert, other.cert, leaf.cert, mid.cert]) == [mid.cert, root.cert]
        assert build_chain(leaf.cert, [mid.cert]) == [mid.cert]
