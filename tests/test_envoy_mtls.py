"""Workload mTLS oracle: which istio-ca bundles istiod would load but Envoy's BoringSSL then refuses between workloads.

Workload certificates are issued from each bundle the way istiod does, and a real Envoy checks them both ways:
(i) as a MUTUAL server verifying a Python client's chain, (ii) as a client verifying a Python server's chain.
`python -m tests.test_envoy_mtls` prints the verdict table.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import socket
import ssl
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from testbed import pki
from testbed.envoy import Envoy, EnvoyNotFound, ServerTls, UpstreamTls, find_envoy, http_get, tls_get
from tests.support import wait_until

TRUST_DOMAIN = "cluster.local"
#: istiod's default workload TTL is 24 h; a short one is enough here
WORKLOAD_TTL = dt.timedelta(hours=1)
#: ClockSkewGracePeriod in security/pkg/pki/util/generate_cert.go
CLOCK_SKEW_GRACE = dt.timedelta(minutes=2)


def spiffe_id(service_account: str, namespace: str = "default") -> str:
    """The identity istiod puts in a workload certificate's URI SAN."""
    return f"spiffe://{TRUST_DOMAIN}/ns/{namespace}/sa/{service_account}"


# ---------------------------------------------------------------------------------------------- istiod's CA


@dataclass(frozen=True)
class Workload:
    """What pilot-agent hands its Envoy after a CSR: a key, the certificate chain and the trust bundle."""

    key_pem: bytes
    #: leaf, then every certificate of cert-chain.pem, then root-cert.pem
    chain_pem: bytes
    #: root-cert.pem
    trust_pem: bytes
    leaf: x509.Certificate


def istiod_sign(files: dict[str, bytes], service_account: str, ttl: dt.timedelta = WORKLOAD_TTL) -> Workload:
    """Issue a workload certificate from an istio-ca bundle the way istiod 1.2x does (istio/istio 86c9f01).

    - signer: the first certificate of ca-cert.pem and ca-key.pem (security/pkg/pki/util/keycertbundle.go,
      setAllFromPem: ParsePemEncodedCertificate / ParsePemEncodedKey take the first PEM block);
    - template (security/pkg/pki/util/generate_cert.go, genCertTemplateFromCSR for a non-CA CSR): empty subject,
      random serial, NotBefore now - ClockSkewGracePeriod, NotAfter now + ttl clamped to the signer's NotAfter,
      keyUsage digitalSignature|keyEncipherment, extKeyUsage serverAuth+clientAuth, basicConstraints CA:false;
    - the SAN extension is the spiffe URI and critical because the subject is empty (san.go BuildSANExtension);
    - Go's x509.CreateCertificate marks keyUsage and basicConstraints critical, copies the signer's SKI into
      the AKI and adds no SKI to a non-CA certificate;
    - the chain: security/pkg/server/ca/server.go CreateCertificate answers [leaf, cert-chain.pem..., root-cert.pem]
      and pilot-agent (security/pkg/nodeagent/cache/secretcache.go generateNewSecret) concatenates all of it as
      the certificate chain and takes the last element, root-cert.pem, as the trust bundle.

    The workload key is EC P-256 (pilot-agent with ECC_SIGNATURE_ALGORITHM=ECDSA; its default is RSA 2048).
    """
    signer = x509.load_pem_x509_certificate(files["ca-cert.pem"])
    signer_key = serialization.load_pem_private_key(files["ca-key.pem"], password=None)
    assert isinstance(signer_key, pki.PrivateKey)
    key = pki.make_key("ec")
    now = dt.datetime.now(dt.UTC)
    not_after = min(now + ttl, signer.not_valid_after_utc)
    usage = x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=True, data_encipherment=False,
        key_agreement=False, key_cert_sign=False, crl_sign=False, encipher_only=False, decipher_only=False,
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(signer.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number() >> 32)  # genSerialNum: 128 random bits
        .not_valid_before(now - CLOCK_SKEW_GRACE)
        .not_valid_after(not_after)
        .add_extension(usage, critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id(service_account))]), critical=True
        )
    )
    try:
        ski = signer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        pass
    else:
        builder = builder.add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), False)
    leaf = builder.sign(signer_key, hashes.SHA256())
    chain = pki.pem_cert(leaf) + _ends_with_newline(files["cert-chain.pem"]) + files["root-cert.pem"]
    return Workload(pki.pem_key(key), chain, files["root-cert.pem"], leaf)


def uri_sans(cert: x509.Certificate) -> list[str]:
    """The URI SANs of `cert`."""
    return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.UniformResourceIdentifier
    )


def _ends_with_newline(pem: bytes) -> bytes:
    # secretcache.go concatCerts starts every certificate on a new line
    return pem if pem.endswith(b"\n") else pem + b"\n"


# ---------------------------------------------------------------------------------------------- the peers


class PyTlsServer:
    """A Python (OpenSSL) TLS server on 127.0.0.1 presenting one workload's chain and answering HTTP 200.

    It asks for a client certificate but trusts exactly the one leaf it expects (a partial-chain anchor, so the
    client must send that leaf alone): OpenSSL never refuses Envoy, only Envoy's own verification of this
    server's chain decides the outbound direction.
    """

    def __init__(self, workdir: Path, workload: Workload, expected_client: x509.Certificate) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "server.crt").write_bytes(workload.chain_pem)
        (workdir / "server.key").write_bytes(workload.key_pem)
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(workdir / "server.crt", workdir / "server.key")
        self.ctx.verify_mode = ssl.CERT_REQUIRED
        self.ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
        self.ctx.load_verify_locations(cadata=pki.pem_cert(expected_client).decode())
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.5)
        self.port = int(self.sock.getsockname()[1])
        #: the client certificate of each completed handshake, or the error of each failed one
        self.seen: list[bytes | str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=f"pytls-{self.port}", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(5)
            try:
                with self.ctx.wrap_socket(conn, server_side=True) as tls:
                    self.seen.append(tls.getpeercert(binary_form=True) or b"")
                    tls.recv(65536)
                    tls.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 11\r\nconnection: close\r\n\r\nok upstream")
            except (OSError, ValueError) as exc:
                self.seen.append(f"{type(exc).__name__}: {exc}")

    def close(self) -> None:
        """Stop accepting and close the socket."""
        self._stop.set()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept() at once on Linux
        self._thread.join(timeout=5)
        self.sock.close()


# ---------------------------------------------------------------------------------------------- the oracle


@dataclass(frozen=True)
class Verdict:
    """Envoy's verdict on its peer's chain in one direction."""

    #: Envoy completed the handshake and the request went through
    ok: bool
    #: BoringSSL's report from Envoy's log when the handshake failed (None when it did not)
    error: str | None
    #: the listener's or cluster's ssl.* counters that moved during the exchange
    moved: dict[str, int] = field(default_factory=dict)

    def describe(self) -> str:
        """`handshake ok`, or Envoy's error text."""
        return "handshake ok" if self.ok else (self.error or f"failed without a TLS error: {self.moved}")


_COUNTED = ("handshake", "connection_error", "fail_verify_error", "fail_verify_san", "fail_verify_no_cert",
            "no_certificate")


@dataclass(frozen=True)
class MeshCase:
    """One bundle under test: its name, its files and what istiod does with it (from reading istiod and Go)."""

    name: str
    files: dict[str, bytes]
    istiod: str


class MeshOracle:
    """One Envoy with, per case, an inbound MUTUAL listener and an outbound TLS upstream, all from that case's CA.

    Envoy plays workload `envoy`: inbound it serves its chain and verifies a Python client presenting workload
    `a`; outbound it verifies a Python server presenting workload `x` (and its spiffe URI, as Istio does) while
    presenting its own workload certificate.
    """

    def __init__(self, workdir: Path, cases: list[MeshCase]) -> None:
        self.cases = {case.name: case for case in cases}
        self.workdir = workdir
        self.servers: dict[str, PyTlsServer] = {}
        listeners, upstreams = [], []
        try:
            for case in cases:
                d = workdir / case.name
                d.mkdir(parents=True)
                own, client, server = (istiod_sign(case.files, sa) for sa in ("envoy", "a", "x"))
                (d / "tls.crt").write_bytes(own.chain_pem)
                (d / "tls.key").write_bytes(own.key_pem)
                # outbound, Envoy presents only its leaf: the Python server trusts exactly that leaf, and given the
                # whole chain OpenSSL would check the CAs too and could refuse first (inbound covers the full chain)
                (d / "leaf.crt").write_bytes(pki.pem_cert(own.leaf))
                (d / "ca.crt").write_bytes(own.trust_pem)
                (d / "client.crt").write_bytes(client.chain_pem)
                (d / "client.key").write_bytes(client.key_pem)
                self.servers[case.name] = PyTlsServer(d / "server", server, own.leaf)
                # static secrets: these files never change, and file-based SDS would need inotify instances
                # (128 per user) for every one of them
                listeners.append(ServerTls(f"{case.name}-in", d, mode="MUTUAL", sds="static"))
                upstreams.append(UpstreamTls(f"{case.name}-out", self.servers[case.name].port, d, cert="leaf.crt",
                                             key="tls.key", ca="ca.crt", match_sans=[spiffe_id("x")], sds="static"))
            self.envoy = Envoy(workdir / "envoy", listeners=listeners, upstreams=upstreams).start()
        except BaseException:
            self.close()
            raise

    def _exchange(self, name: str, run: Callable[[], bool]) -> Verdict:
        before = self.envoy.ssl_stats(name)
        mark = self.envoy.log_mark()
        ok = run()

        def moved() -> dict[str, int]:
            now = self.envoy.ssl_stats(name)
            return {k: now.get(k, 0) - before.get(k, 0) for k in _COUNTED if now.get(k, 0) != before.get(k, 0)}

        # Envoy counts the handshake's outcome on its worker thread; wait for it rather than guess a delay
        changes = wait_until(moved, timeout=5)
        failed = any(k != "handshake" for k in changes)
        errors = wait_until(lambda: self.envoy.tls_errors(mark), timeout=5) if failed else []
        return Verdict(ok and not failed, errors[0] if errors else None, changes)

    def inbound(self, name: str, client: Workload | None = None) -> Verdict:
        """Envoy as server (MUTUAL) verifying the client chain of workload `a` (or of `client`)."""
        d = self.workdir / name
        port = self.envoy.port(f"{name}-in")
        certfile, keyfile = d / "client.crt", d / "client.key"
        if client is not None:
            certfile, keyfile = d / "other-client.crt", d / "other-client.key"
            certfile.write_bytes(client.chain_pem)
            keyfile.write_bytes(client.key_pem)

        def run() -> bool:
            result = tls_get(port, certfile=certfile, keyfile=keyfile)
            return result.ok and result.body == f"ok {name}-in"

        return self._exchange(f"{name}-in", run)

    def outbound(self, name: str) -> Verdict:
        """Envoy as client verifying the server chain of workload `x`, presenting its own workload chain."""
        port = self.envoy.port(f"{name}-out")

        def run() -> bool:
            result = http_get(port)
            return result.ok and result.body == "ok upstream"

        return self._exchange(f"{name}-out", run)

    def close(self) -> None:
        """Stop Envoy and the Python servers."""
        if hasattr(self, "envoy"):
            self.envoy.close()
        for server in self.servers.values():
            server.close()


# ---------------------------------------------------------------------------------------------- the cases


def _ago(days: int) -> dt.datetime:
    return dt.datetime.now(dt.UTC) - dt.timedelta(days=days)


def _with(files: dict[str, bytes], **replace: bytes) -> dict[str, bytes]:
    return {**files, **{k.replace("_", "-") + ".pem": v for k, v in replace.items()}}


def build_cases() -> list[MeshCase]:
    """Every bundle the oracle checks, with istiod's expected verdict (Go's x509.Verify of ca-cert.pem against
    root-cert.pem with cert-chain.pem as intermediates, default ServerAuth usage; keycertbundle.go Verify)."""
    eku = ExtendedKeyUsageOID
    nc = x509.NameConstraints
    root = pki.root_ca()
    good = pki.intermediate_ca(root)
    files = pki.istio_ca_files(root, good)
    cases = [MeshCase("good", files, "loads")]

    # (a) pathLenConstraint: Go counts only the intermediates below a CA in the chain it verifies, and the chain
    # istiod verifies ends at ca-cert.pem, so none of these stop istiod.
    root0 = pki.root_ca(path_length=0)
    cases.append(MeshCase("a-root-pathlen0", pki.istio_ca_files(root0, pki.intermediate_ca(root0)),
                          "loads (no intermediate below the root in ca-cert.pem's own chain)"))
    root1 = pki.root_ca(path_length=1)
    mid = pki.intermediate_ca(root1, cn="Mid CA", path_length=None)
    cases.append(MeshCase("a-root-pathlen1-two-below", pki.istio_ca_files(root1, pki.intermediate_ca(mid)),
                          "loads (one intermediate below the root in ca-cert.pem's own chain)"))
    mid0 = pki.intermediate_ca(root, cn="Mid CA", path_length=0)
    cases.append(MeshCase("a-mid-pathlen0", pki.istio_ca_files(root, pki.intermediate_ca(mid0)),
                          "loads (no intermediate below Mid CA in ca-cert.pem's own chain)"))

    # (b) Go does not look at keyUsage when it builds a path; startup only checks IsCA
    cases.append(MeshCase("b-no-keycertsign", pki.istio_ca_files(root, pki.intermediate_ca(root, key_cert_sign=False)),
                          "loads (Go ignores keyUsage on CAs)"))

    # (c) Go's Verify finds ca-cert.pem's issuer in root-cert.pem; cert-chain.pem is only a pool
    cases.append(MeshCase("c-chain-only-root", _with(files, cert_chain=root.cert_pem),
                          "loads (cert-chain.pem is only an intermediates pool)"))
    sibling = pki.intermediate_ca(root, cn="Sibling CA")
    cases.append(MeshCase("c-chain-other-intermediate", _with(files, cert_chain=sibling.cert_pem + root.cert_pem),
                          "loads (ca-cert.pem is not required in cert-chain.pem)"))
    cases.append(MeshCase("c-chain-root-first", _with(files, cert_chain=root.cert_pem + good.cert_pem),
                          "loads"))

    # (d) Go's Verify asks for ServerAuth through the chain
    cases.append(MeshCase("d-ca-eku-serverauth",
                          pki.istio_ca_files(root, pki.intermediate_ca(root, extended_key_usage=[eku.SERVER_AUTH])),
                          "loads (ServerAuth is what Verify asks for)"))
    cases.append(MeshCase("d-ca-eku-clientauth",
                          pki.istio_ca_files(root, pki.intermediate_ca(root, extended_key_usage=[eku.CLIENT_AUTH])),
                          "refuses: incompatible key usage (an (a) verdict; here for symmetry)"))

    # (e) the constraints sit in ca-cert.pem, the leaf of the chain istiod verifies: Go applies none of them
    def constrained(name_constraints: x509.NameConstraints) -> dict[str, bytes]:
        return pki.istio_ca_files(root, pki.intermediate_ca(root, name_constraints=name_constraints))

    cases.append(MeshCase("e-nc-dns-only", constrained(nc([x509.DNSName("example.com")], None)),
                          "loads (constraints in ca-cert.pem bind only what it signs)"))
    cases.append(MeshCase("e-nc-exclude-trust-domain",
                          constrained(nc(None, [x509.UniformResourceIdentifier(TRUST_DOMAIN)])), "loads"))
    cases.append(MeshCase("e-nc-permit-other-uri",
                          constrained(nc([x509.UniformResourceIdentifier("example.com")], None)), "loads"))
    cases.append(MeshCase("e-nc-permit-trust-domain",
                          constrained(nc([x509.UniformResourceIdentifier(TRUST_DOMAIN)], None)), "loads"))

    # (f) controls
    mid_f = pki.intermediate_ca(root, cn="Mid CA", path_length=None)
    deep = pki.intermediate_ca(mid_f)
    deep_files = pki.istio_ca_files(root, deep)
    cases.append(MeshCase("f-unordered-chain",
                          _with(deep_files, cert_chain=pki.pem_certs(root.cert, deep.cert, mid_f.cert)),
                          "loads (Verify builds a path from the pool)"))
    old_other_key = pki.root_ca(not_before=_ago(4000), not_after=_ago(400))
    cases.append(MeshCase("f-expired-root-other-key", _with(files, root_cert=old_other_key.cert_pem + root.cert_pem),
                          "loads (the expired root is not on the path)"))
    old_same_key = pki.root_ca(key=root.key, not_before=_ago(4000), not_after=_ago(400))
    cases.append(MeshCase("f-expired-renewed-root-last", _with(files, root_cert=root.cert_pem + old_same_key.cert_pem),
                          "loads"))
    cases.append(MeshCase("f-expired-renewed-root-first",
                          _with(files, root_cert=old_same_key.cert_pem + root.cert_pem),
                          "loads (Go tries every candidate root and keeps the valid path)"))
    stranger = pki.root_ca(cn="Unrelated CA", org="Elsewhere")
    cases.append(MeshCase("f-chain-extra-unrelated",
                          _with(files, cert_chain=pki.pem_certs(good.cert, stranger.cert, root.cert)), "loads"))
    return cases


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(name="oracle", scope="module")
def fixture_oracle(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MeshOracle]:
    """One Envoy checking every case of `build_cases` (skipped without envoy)."""
    try:
        find_envoy()
    except EnvoyNotFound as exc:
        pytest.skip(str(exc))
    oracle = MeshOracle(tmp_path_factory.mktemp("mesh"), build_cases())
    yield oracle
    oracle.close()


def accepted(verdict: Verdict) -> bool:
    """Envoy completed the handshake and verified nothing wrong."""
    return verdict.ok and verdict.error is None and verdict.moved == {"handshake": 1}


def refused(verdict: Verdict, reason: str) -> bool:
    """Envoy refused the peer's chain (fail_verify_error) and BoringSSL's report contains `reason`."""
    return (not verdict.ok and verdict.moved.get("fail_verify_error") == 1 and verdict.error is not None
            and "CERTIFICATE_VERIFY_FAILED" in verdict.error and reason in verdict.error)


def both(oracle: MeshOracle, name: str) -> tuple[Verdict, Verdict]:
    """(inbound, outbound) verdicts for case `name`."""
    return oracle.inbound(name), oracle.outbound(name)


# ---------------------------------------------------------------------------------------------- tests


class TestOracle:
    def test_workload_certificate_has_istiods_shape(self):
        """A workload certificate carries what istiod puts in one: the spiffe URI only, critical, and both EKUs."""
        root = pki.root_ca()
        files = pki.istio_ca_files(root, pki.intermediate_ca(root))
        wl = istiod_sign(files, "x")
        assert wl.leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).critical
        assert uri_sans(wl.leaf) == [spiffe_id("x")]
        assert list(wl.leaf.subject) == []
        ekus = wl.leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert list(ekus) == [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
        assert wl.leaf.extensions.get_extension_for_class(x509.KeyUsage).critical
        assert wl.leaf.issuer == x509.load_pem_x509_certificate(files["ca-cert.pem"]).subject
        assert wl.leaf.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "Intermediate CA"
        assert wl.chain_pem == wl.leaf.public_bytes(serialization.Encoding.PEM) + files["cert-chain.pem"] + \
            files["root-cert.pem"]

    def test_control_good_bundle_passes_both_ways(self, oracle):
        """Control: a bundle shaped like istio's Makefile gives working mTLS in both directions."""
        inbound, outbound = both(oracle, "good")
        assert accepted(inbound), inbound
        assert accepted(outbound), outbound
        seen = oracle.servers["good"].seen[-1]  # what Envoy presented outbound: its own workload certificate
        assert isinstance(seen, bytes), seen
        assert uri_sans(x509.load_der_x509_certificate(seen)) == [spiffe_id("envoy")]

    def test_control_outbound_checks_the_spiffe_identity(self, oracle, tmp_path):
        """Control: the outbound side refuses a server whose spiffe URI is not the expected one (fail_verify_san)."""
        d = oracle.workdir / "good"
        with Envoy(tmp_path / "envoy", upstreams=[
            UpstreamTls("wrong-sa", oracle.servers["good"].port, d, cert="leaf.crt", key="tls.key", ca="ca.crt",
                        match_sans=[spiffe_id("someone-else")], sds="static")
        ]) as envoy:
            assert http_get(envoy.port("wrong-sa")).status == 503
            assert wait_until(lambda: envoy.ssl_stats("wrong-sa").get("fail_verify_san") == 1, 5)

    def test_control_inbound_refuses_a_foreign_ca(self, oracle):
        """Control: the inbound side refuses a client whose chain comes from another mesh's CA."""
        other = pki.root_ca(cn="Other mesh")
        foreign = istiod_sign(pki.istio_ca_files(other, pki.intermediate_ca(other)), "a")
        verdict = oracle.inbound("good", client=foreign)
        assert refused(verdict, "at depth 2: self signed certificate in certificate chain"), verdict


class TestPathLength:
    def test_a_root_pathlen0_above_ca_cert_is_ignored_by_envoy(self, oracle):
        """(a) root pathlen:0 directly above ca-cert.pem: Envoy accepts both ways. BoringSSL does not apply a
        self-signed root's pathLenConstraint; OpenSSL 3 and Go's crypto/x509 do ("path length constraint
        exceeded", "too many intermediates"), so Go peers such as pilot-agent verifying istiod's serving
        certificate would still break. Not a (b) case as far as Envoy is concerned."""
        inbound, outbound = both(oracle, "a-root-pathlen0")
        assert accepted(inbound), inbound
        assert accepted(outbound), outbound

    def test_a_root_pathlen1_above_two_intermediates_is_ignored_by_envoy(self, oracle):
        """(a) root pathlen:1 above Mid CA above ca-cert.pem: Envoy accepts both ways, for the same reason."""
        inbound, outbound = both(oracle, "a-root-pathlen1-two-below")
        assert accepted(inbound), inbound
        assert accepted(outbound), outbound

    def test_a_intermediate_pathlen0_above_ca_cert_breaks_both_ways(self, oracle):
        """(a) Mid CA pathlen:0 above ca-cert.pem: istiod loads it, Envoy refuses every workload both ways with
        "certificate verification error at depth 2: path length constraint exceeded". A (b) case."""
        inbound, outbound = both(oracle, "a-mid-pathlen0")
        assert refused(inbound, "at depth 2: path length constraint exceeded"), inbound
        assert refused(outbound, "at depth 2: path length constraint exceeded"), outbound


class TestKeyUsage:
    def test_b_ca_cert_without_keycertsign_breaks_both_ways(self, oracle):
        """(b) ca-cert.pem with keyUsage but no keyCertSign: istiod loads it, Envoy refuses both ways with
        "at depth 0: unable to get local issuer certificate" (BoringSSL does not take it as an issuer). A (b) case."""
        inbound, outbound = both(oracle, "b-no-keycertsign")
        assert refused(inbound, "at depth 0: unable to get local issuer certificate"), inbound
        assert refused(outbound, "at depth 0: unable to get local issuer certificate"), outbound


class TestCertChain:
    def test_c_chain_with_only_the_root_breaks_both_ways(self, oracle):
        """(c) cert-chain.pem holding only the root: istiod loads it, but no workload chain reaches ca-cert.pem;
        Envoy refuses both ways with "at depth 0: unable to get local issuer certificate". A (b) case."""
        inbound, outbound = both(oracle, "c-chain-only-root")
        assert refused(inbound, "at depth 0: unable to get local issuer certificate"), inbound
        assert refused(outbound, "at depth 0: unable to get local issuer certificate"), outbound

    def test_c_chain_starting_with_another_intermediate_breaks_both_ways(self, oracle):
        """(c) cert-chain.pem = a sibling intermediate + root (ca-cert.pem missing): Envoy refuses both ways with
        "at depth 0: unable to get local issuer certificate". A (b) case."""
        inbound, outbound = both(oracle, "c-chain-other-intermediate")
        assert refused(inbound, "at depth 0: unable to get local issuer certificate"), inbound
        assert refused(outbound, "at depth 0: unable to get local issuer certificate"), outbound

    def test_c_chain_starting_with_the_root_still_works(self, oracle):
        """(c) cert-chain.pem = root + ca-cert.pem (not starting with ca-cert.pem): Envoy accepts both ways;
        BoringSSL builds the path whatever the order. Not a (b) case."""
        inbound, outbound = both(oracle, "c-chain-root-first")
        assert accepted(inbound), inbound
        assert accepted(outbound), outbound


class TestExtendedKeyUsage:
    def test_d_ca_cert_eku_serverauth_only_breaks_inbound(self, oracle):
        """(d) ca-cert.pem with EKU serverAuth only: istiod loads it; Envoy as server refuses every client with
        "at depth 1: unsupported certificate purpose", Envoy as client accepts servers. Between two Envoys the
        server side refuses, so mTLS fails. A (b) case."""
        inbound, outbound = both(oracle, "d-ca-eku-serverauth")
        assert refused(inbound, "at depth 1: unsupported certificate purpose"), inbound
        assert accepted(outbound), outbound

    def test_d_ca_cert_eku_clientauth_only_breaks_outbound(self, oracle):
        """(d, mirror) ca-cert.pem with EKU clientAuth only: Envoy as client refuses servers ("at depth 1:
        unsupported certificate purpose"), as server accepts clients. istiod refuses this bundle anyway."""
        inbound, outbound = both(oracle, "d-ca-eku-clientauth")
        assert accepted(inbound), inbound
        assert refused(outbound, "at depth 1: unsupported certificate purpose"), outbound


class TestNameConstraints:
    def test_e_dns_only_constraints_leave_spiffe_uris_alone(self, oracle):
        """(e) ca-cert.pem permitting only DNS:example.com: URIs are another name type, unconstrained; Envoy
        accepts both ways. Not a (b) case."""
        inbound, outbound = both(oracle, "e-nc-dns-only")
        assert accepted(inbound), inbound
        assert accepted(outbound), outbound

    def test_e_excluding_the_trust_domain_breaks_both_ways(self, oracle):
        """(e) ca-cert.pem excluding URI cluster.local: istiod loads it and signs spiffe://cluster.local/...;
        Envoy refuses both ways with "at depth 0: excluded subtree violation". A (b) case."""
        inbound, outbound = both(oracle, "e-nc-exclude-trust-domain")
        assert refused(inbound, "at depth 0: excluded subtree violation"), inbound
        assert refused(outbound, "at depth 0: excluded subtree violation"), outbound

    def test_e_permitting_only_another_uri_domain_breaks_both_ways(self, oracle):
        """(e) ca-cert.pem permitting only URI example.com: Envoy refuses both ways with "at depth 0: permitted
        subtree violation". A (b) case."""
        inbound, outbound = both(oracle, "e-nc-permit-other-uri")
        assert refused(inbound, "at depth 0: permitted subtree violation"), inbound
        assert refused(outbound, "at depth 0: permitted subtree violation"), outbound

    def test_e_permitting_the_trust_domain_works(self, oracle):
        """(e, control) ca-cert.pem permitting URI cluster.local: Envoy accepts both ways."""
        inbound, outbound = both(oracle, "e-nc-permit-trust-domain")
        assert accepted(inbound), inbound
        assert accepted(outbound), outbound


class TestControls:
    def test_f_unordered_chain_works(self, oracle):
        """(f) a three-level cert-chain.pem in the order root, ca-cert.pem, Mid CA: Envoy accepts both ways."""
        inbound, outbound = both(oracle, "f-unordered-chain")
        assert accepted(inbound), inbound
        assert accepted(outbound), outbound

    def test_f_extra_expired_root_with_another_key_works(self, oracle):
        """(f) an expired root of another key before the live root in root-cert.pem: Envoy accepts both ways."""
        inbound, outbound = both(oracle, "f-expired-root-other-key")
        assert accepted(inbound), inbound
        assert accepted(outbound), outbound

    def test_f_expired_renewed_root_after_the_live_one_works(self, oracle):
        """(f) the live root, then an expired earlier issue of it (same name and key): Envoy accepts both ways."""
        inbound, outbound = both(oracle, "f-expired-renewed-root-last")
        assert accepted(inbound), inbound
        assert accepted(outbound), outbound

    def test_f_expired_renewed_root_first_breaks_both_ways(self, oracle):
        """(f, found here) an expired earlier issue of the root (same name and key) *before* the live root:
        istiod loads it, but BoringSSL takes the first matching root and refuses both ways with "at depth 2:
        certificate has expired". A (b) case: after renewing a root with the same key, list the new one first."""
        inbound, outbound = both(oracle, "f-expired-renewed-root-first")
        assert refused(inbound, "at depth 2: certificate has expired"), inbound
        assert refused(outbound, "at depth 2: certificate has expired"), outbound

    def test_f_chain_with_an_extra_unrelated_certificate_works(self, oracle):
        """(f) cert-chain.pem with an unrelated CA certificate in the middle: Envoy accepts both ways."""
        inbound, outbound = both(oracle, "f-chain-extra-unrelated")
        assert accepted(inbound), inbound
        assert accepted(outbound), outbound


def main() -> int:
    """Print the verdict table (markdown) for every case."""
    cases = build_cases()
    with tempfile.TemporaryDirectory(prefix="mesh-oracle-") as tmp:
        oracle = MeshOracle(Path(tmp), cases)
        try:
            print("| case | istiod | Envoy server (inbound) | Envoy client (outbound) |")
            print("|---|---|---|---|")
            for case in cases:
                inbound, outbound = oracle.inbound(case.name), oracle.outbound(case.name)
                print(f"| {case.name} | {case.istiod} | {inbound.describe()} | {outbound.describe()} |")
        finally:
            oracle.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
