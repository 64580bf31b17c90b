"""The workload mTLS oracle: workload certificates issued from an istio-ca bundle the way istiod issues them,
handed to Envoy the way pilot-agent hands them over, and a real Envoy checking them both ways.

For each bundle, `MeshOracle` gives one Envoy (1.40, BoringSSL) per bundle an inbound MUTUAL listener (Envoy as the
server verifying a Python client presenting workload `a`) and an outbound upstream (Envoy as the client verifying
a Python server presenting workload `x`, and its spiffe URI, as Istio does), both with the bundle's trust bundle and,
when the bundle has a non-empty ca-crl.pem, its CRLs in the validation context (Istio's CA CRL, checked for every
certificate of the chain). All secrets are static and inline, as pilot-agent's SDS sends them, so one Envoy serves
hundreds of bundles without file watches (inotify instances are capped at 128 per user).

What reaches Envoy, from istio 86c9f01:

- istiod (security/pkg/server/ca/server.go CreateCertificate) answers a CSR with [leaf, cert-chain.pem,
  root-cert.pem], the last two as the bytes of the files (cert-chain.pem left out when empty);
- pilot-agent (security/pkg/nodeagent/cache/secretcache.go generateNewSecret) concatenates all of it as the
  certificate chain (`concatCerts`) and takes the last element, root-cert.pem, as the root; the trust bundle Envoy
  gets (`mergeTrustAnchorBytes`) is that root split into PEM blocks (`pkiutil.PemCertBytestoString`, which stops at
  the first block with no bytes), deduplicated and **sorted as strings**, so the order of root-cert.pem's blocks is
  not the order Envoy sees.

`python -m testbed.mesh CASEDIR...` prints Envoy's verdict both ways for corpus case directories
(`python -m testbed.corpus OUTDIR NAME...` writes them).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import secrets
import socket
import ssl
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from agent.validate.certs import CertificateError, parse_certificate
from agent.validate.keys import ECKey, Ed25519Key, RSAKey, parse_pem_encoded_key
from agent.validate.pem import Block, decode
from testbed import pki
from testbed import rawcert as rc
from testbed.envoy import Envoy, ServerTls, UpstreamTls, http_get, tls_errors, tls_get

__all__ = [
    "CASE_FILES",
    "CLOCK_SKEW_GRACE",
    "TRUST_DOMAIN",
    "WORKLOAD_TTL",
    "MeshCase",
    "MeshOracle",
    "PyTlsServer",
    "SecretLoad",
    "Verdict",
    "Workload",
    "concat_certs",
    "envoy_loads",
    "istiod_sign",
    "pem_cert_strings",
    "read_case",
    "spiffe_id",
    "trust_bundle",
]

TRUST_DOMAIN = "cluster.local"
#: istiod's default workload TTL is 24 h; a short one is enough here
WORKLOAD_TTL = dt.timedelta(hours=1)
#: ClockSkewGracePeriod in security/pkg/pki/util/generate_cert.go
CLOCK_SKEW_GRACE = dt.timedelta(minutes=2)
#: the files of an istio-ca case directory (ca-crl.pem only when present)
CASE_FILES = ("ca-key.pem", "ca-cert.pem", "root-cert.pem", "cert-chain.pem", "ca-crl.pem")


def spiffe_id(service_account: str, namespace: str = "default", trust_domain: str = TRUST_DOMAIN) -> str:
    """The identity istiod puts in a workload certificate's URI SAN."""
    return f"spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"


def read_case(directory: Path) -> dict[str, bytes]:
    """The files of an istio-ca bundle directory (a corpus case): the four files, plus ca-crl.pem when present."""
    return {name: (directory / name).read_bytes() for name in CASE_FILES if (directory / name).exists()}


# ---------------------------------------------------------------------------------------------- what Envoy is given


def _first_block(data: bytes) -> Block:
    block, _ = decode(data)
    if block is None:
        raise ValueError("no PEM block")
    return block


def concat_certs(parts: Sequence[bytes]) -> bytes:
    """secretcache.go concatCerts: the parts joined, a newline added after each one but the last that lacks it."""
    out = b""
    for i, part in enumerate(parts):
        out += part
        if i < len(parts) - 1 and not part.endswith(b"\n"):
            out += b"\n"
    return out


def pem_cert_strings(data: bytes) -> list[bytes]:
    """pkiutil.PemCertBytestoString: each PEM block with whatever precedes it, one leading and one trailing
    newline trimmed; stops at the first block pem.Decode does not find, or whose body is empty."""
    out: list[bytes] = []
    start = 0
    while True:
        block, after = decode(data, start)
        if block is None or not block.der:
            return out
        chunk = data[start:] if after >= len(data) else data[start:after]
        chunk = chunk.removesuffix(b"\n").removeprefix(b"\n")
        out.append(chunk)
        if after >= len(data):
            return out
        start = after


def trust_bundle(root_cert: bytes) -> bytes:
    """secretcache.go mergeTrustAnchorBytes with no mesh-configured trust anchors: root-cert.pem's blocks,
    deduplicated, sorted as strings and joined by pkiutil.AppendCertByte (a newline between two)."""
    out = b""
    for chunk in sorted(set(pem_cert_strings(root_cert))):
        if out:
            out = out.removesuffix(b"\n") + b"\n"
        out += chunk
    return out


# ---------------------------------------------------------------------------------------------- istiod's CA


@dataclass(frozen=True)
class Workload:
    """What pilot-agent hands its Envoy after a CSR: a key, the certificate chain and the trust bundle."""

    key_pem: bytes
    #: leaf, then cert-chain.pem, then root-cert.pem (concatCerts of istiod's answer)
    chain_pem: bytes
    #: mergeTrustAnchorBytes(root-cert.pem)
    trust_pem: bytes
    leaf_pem: bytes

    @property
    def leaf(self) -> x509.Certificate:
        """The workload certificate, parsed by `cryptography` (which refuses some issuer names Go and BoringSSL
        take, such as a PrintableString with '*')."""
        return x509.load_pem_x509_certificate(self.leaf_pem)


def _crypto_key(block: Block) -> rc.SignKey:
    """The CA key as istiod parses it (ParsePemEncodedKey on ca-key.pem's first block), as a `cryptography` key."""
    key = parse_pem_encoded_key(block)
    if isinstance(key, ECKey):
        curve = {"P-224": ec.SECP224R1(), "P-256": ec.SECP256R1(), "P-384": ec.SECP384R1(),
                 "P-521": ec.SECP521R1()}[key.curve]
        return ec.derive_private_key(key.d, curve)
    if isinstance(key, Ed25519Key):
        return ed25519.Ed25519PrivateKey.from_private_bytes(key.seed)
    if isinstance(key, RSAKey) and len(key.primes) == 2:
        p, q = key.primes
        numbers = rsa.RSAPrivateNumbers(p, q, key.d, key.d % (p - 1), key.d % (q - 1), pow(q, -1, p),
                                        rsa.RSAPublicNumbers(key.e, key.n))
        return numbers.private_key(unsafe_skip_rsa_key_validation=True)
    raise ValueError(f"istiod cannot sign with a {type(key).__name__}")


def istiod_sign(files: dict[str, bytes], service_account: str, ttl: dt.timedelta = WORKLOAD_TTL, *,
                trust_domain: str = TRUST_DOMAIN) -> Workload:
    """Issue a workload certificate from an istio-ca bundle the way istiod 1.2x does (istio/istio 86c9f01).

    - signer: the first PEM block of ca-cert.pem and of ca-key.pem (security/pkg/pki/util/keycertbundle.go
      setAllFromPem: ParsePemEncodedCertificate / ParsePemEncodedKey), parsed as Go parses them;
    - template (security/pkg/pki/util/generate_cert.go, genCertTemplateFromCSR for a non-CA CSR): empty subject,
      random 128-bit serial, NotBefore now - ClockSkewGracePeriod, NotAfter now + ttl clamped to the signer's
      NotAfter, keyUsage digitalSignature|keyEncipherment, extKeyUsage serverAuth+clientAuth, CA:false;
    - the SAN extension is the spiffe URI and critical because the subject is empty (san.go BuildSANExtension);
    - Go's x509.CreateCertificate: issuer = the signer's raw subject, keyUsage and basicConstraints critical, the
      signer's SKI as the AKI, no SKI on a non-CA certificate, the signature algorithm Go picks for the key
      (ECDSA with SHA-256/384/512 by curve, SHA256WithRSA, Ed25519);
    - the chain and trust bundle as istiod answers and pilot-agent concatenates (see the module docstring).

    The workload key is EC P-256 (pilot-agent with ECC_SIGNATURE_ALGORITHM=ECDSA; its default is RSA 2048).
    """
    signer_der = _first_block(files["ca-cert.pem"]).der
    signer = parse_certificate(signer_der)
    if isinstance(signer, CertificateError):
        raise ValueError(f"ca-cert.pem: {signer}")
    issuer = rc.Issued(signer_der, _crypto_key(_first_block(files["ca-key.pem"])), signer.raw_subject,
                       signer.raw_spki, signer.subject_key_id or None)
    key = pki.make_key("ec")
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    not_after = min(now + ttl, dt.datetime.fromtimestamp(signer.not_after, dt.UTC))
    exts = [
        rc.key_usage("digitalSignature", "keyEncipherment"),
        rc.eku("serverAuth", "clientAuth"),
        rc.basic_constraints(False),
        *([rc.aki(signer.subject_key_id)] if signer.subject_key_id else []),
        rc.san(("uri", spiffe_id(service_account, trust_domain=trust_domain)), critical=True),
    ]
    issued = rc.cert(rc.seq(), key, issuer, exts=exts, serial=secrets.randbits(127) | (1 << 126),
                     not_before=now - CLOCK_SKEW_GRACE, not_after=not_after)
    answer = [issued.pem, *([files["cert-chain.pem"]] if files["cert-chain.pem"] else []), files["root-cert.pem"]]
    return Workload(pki.pem_key(key), concat_certs(answer), trust_bundle(files["root-cert.pem"]), issued.pem)


def uri_sans(cert: x509.Certificate) -> list[str]:
    """The URI SANs of `cert`."""
    return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.UniformResourceIdentifier
    )


# ---------------------------------------------------------------------------------------------- the peers


def _lenient(ctx: ssl.SSLContext) -> ssl.SSLContext:
    # OpenSSL's security level would make the Python peer itself refuse to send a chain with an RSA 1024 or SHA-1
    # certificate; only Envoy's verdict counts here
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    return ctx


def client_context(certfile: Path, keyfile: Path) -> ssl.SSLContext:
    """A Python client presenting `certfile` (leaf first) and accepting any server: only Envoy's verdict counts."""
    ctx = _lenient(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.load_cert_chain(certfile, keyfile)
    return ctx


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
        self.ctx = _lenient(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
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
        """`handshake ok`, or Envoy's error text (BoringSSL's verify error, without the routine prefix)."""
        if self.ok:
            return "handshake ok"
        if self.error is None:
            return f"failed without a TLS error: {self.moved}"
        return self.error.rpartition("X509_verify_cert: ")[2] or self.error

    @property
    def accepted(self) -> bool:
        """Envoy completed the handshake and verified nothing wrong."""
        return self.ok and self.error is None and self.moved == {"handshake": 1}

    def refused(self, reason: str = "") -> bool:
        """Envoy refused the peer's chain (fail_verify_error) and BoringSSL's report contains `reason`."""
        return (not self.ok and self.moved.get("fail_verify_error") == 1 and self.error is not None
                and "CERTIFICATE_VERIFY_FAILED" in self.error and reason in self.error)


_COUNTED = ("handshake", "connection_error", "fail_verify_error", "fail_verify_san", "fail_verify_no_cert",
            "no_certificate")


@dataclass(frozen=True)
class MeshCase:
    """One bundle under test: its name, its files and, optionally, what istiod does with it and the trust domain
    istiod signs workload certificates for."""

    name: str
    files: dict[str, bytes]
    istiod: str = ""
    trust_domain: str = TRUST_DOMAIN

    @classmethod
    def from_dir(cls, directory: Path, name: str | None = None, trust_domain: str = TRUST_DOMAIN) -> MeshCase:
        """A corpus case directory."""
        return cls(name or directory.name, read_case(directory), trust_domain=trust_domain)


def _wait(fn: Callable[[], object], timeout: float) -> object:
    import time

    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.01)


class MeshOracle:
    """Two Envoys checking, per case, both directions of workload mTLS with that case's CA.

    Envoy "servers" holds, per case, the inbound MUTUAL listener `<case>-in` (serving workload `envoy`, verifying
    clients against the trust bundle and CRLs) and a SIMPLE listener `<case>-srv` serving workload `x`. Envoy
    "clients" holds, per case, the outbound upstream `<case>-out` (presenting workload `envoy`, verifying `<case>-srv`
    and its spiffe URI) and an upstream `<case>-cli` that presents workload `a` to `<case>-in` and verifies nothing.
    So every chain is sent by a BoringSSL peer loading it from the same bytes pilot-agent would hand it, and each
    direction's verdict is read where it is made: inbound at the servers' `<case>-in` listener, outbound at the
    clients' `<case>-out` cluster.
    """

    def __init__(self, workdir: Path, cases: Iterable[MeshCase]) -> None:
        self.cases = {case.name: case for case in cases}
        self.workdir = workdir
        self.workloads: dict[str, dict[str, Workload]] = {}
        listeners: list[ServerTls] = []
        self._crl: dict[str, str | None] = {}
        try:
            for case in self.cases.values():
                d = workdir / case.name
                d.mkdir(parents=True)
                issued = {sa: istiod_sign(case.files, sa, trust_domain=case.trust_domain) for sa in ("envoy", "a", "x")}
                self.workloads[case.name] = issued
                for sa, wl in issued.items():
                    (d / f"{sa}.crt").write_bytes(wl.chain_pem)
                    (d / f"{sa}.key").write_bytes(wl.key_pem)
                (d / "trust.pem").write_bytes(issued["envoy"].trust_pem)
                crl = None
                if case.files.get("ca-crl.pem"):
                    (d / "crl.pem").write_bytes(case.files["ca-crl.pem"])
                    crl = "crl.pem"
                self._crl[case.name] = crl
                listeners.append(ServerTls(f"{case.name}-in", d, mode="MUTUAL", cert="envoy.crt", key="envoy.key",
                                           ca="trust.pem", sds="inline", crl=crl))
                listeners.append(ServerTls(f"{case.name}-srv", d, cert="x.crt", key="x.key", sds="inline"))
            self.servers = Envoy(workdir / "servers", listeners=listeners).start(timeout=60)
            upstreams: list[UpstreamTls] = []
            for case in self.cases.values():
                d = workdir / case.name
                upstreams.append(UpstreamTls(f"{case.name}-out", self.servers.port(f"{case.name}-srv"), d,
                                             cert="envoy.crt", key="envoy.key", ca="trust.pem", sds="inline",
                                             crl=self._crl[case.name],
                                             match_sans=[spiffe_id("x", trust_domain=case.trust_domain)]))
                upstreams.append(UpstreamTls(f"{case.name}-cli", self.servers.port(f"{case.name}-in"), d,
                                             cert="a.crt", key="a.key", ca=None, sds="inline"))
            self.clients = Envoy(workdir / "clients", upstreams=upstreams).start(timeout=60)
        except BaseException:
            self.close()
            raise

    def server_port(self, name: str) -> int:
        """The port of `<name>-srv`, the SIMPLE listener serving workload `x` of case `name`."""
        return self.servers.port(f"{name}-srv")

    @staticmethod
    def _exchange(envoy: Envoy, name: str, run: Callable[[], bool]) -> Verdict:
        before = envoy.ssl_stats(name)
        mark = envoy.log_mark()
        ok = run()

        def moved() -> dict[str, int]:
            now = envoy.ssl_stats(name)
            return {k: now.get(k, 0) - before.get(k, 0) for k in _COUNTED if now.get(k, 0) != before.get(k, 0)}

        # Envoy counts the handshake's outcome on its worker thread; wait for it rather than guess a delay
        changes = _wait(moved, timeout=5)
        assert isinstance(changes, dict)
        failed = any(k != "handshake" for k in changes)
        errors = _wait(lambda: tls_errors(envoy.log_text(mark)), timeout=5) if failed else []
        assert isinstance(errors, list)
        return Verdict(ok and not failed, errors[0] if errors else None, changes)

    def inbound(self, name: str, client: Workload | None = None) -> Verdict:
        """Envoy as server (MUTUAL) verifying the client chain of workload `a`, sent by an Envoy; or, with
        `client`, that workload's chain sent by a Python (OpenSSL) client."""
        if client is not None:
            d = self.workdir / name
            (d / "other-client.crt").write_bytes(client.chain_pem)
            (d / "other-client.key").write_bytes(client.key_pem)
            ctx = client_context(d / "other-client.crt", d / "other-client.key")
            port = self.servers.port(f"{name}-in")

            def run() -> bool:
                result = tls_get(port, context=ctx)
                return result.ok and result.body == f"ok {name}-in"
        else:
            entry = self.clients.port(f"{name}-cli")

            def run() -> bool:
                result = http_get(entry)
                return result.ok and result.body == f"ok {name}-in"

        return self._exchange(self.servers, f"{name}-in", run)

    def outbound(self, name: str) -> Verdict:
        """Envoy as client verifying the server chain of workload `x` (and its spiffe URI), presenting its own."""
        entry = self.clients.port(f"{name}-out")

        def run() -> bool:
            result = http_get(entry)
            return result.ok and result.body == f"ok {name}-srv"

        return self._exchange(self.clients, f"{name}-out", run)

    def both(self, name: str) -> tuple[Verdict, Verdict]:
        """(inbound, outbound) verdicts for case `name`."""
        return self.inbound(name), self.outbound(name)

    def config_dump_text(self) -> str:
        """The servers' admin /config_dump (static secrets, inline as pilot-agent sends them) as text."""
        import json

        return json.dumps(self.servers.config_dump())

    def close(self) -> None:
        """Stop both Envoys."""
        for attr in ("clients", "servers"):
            envoy = getattr(self, attr, None)
            if envoy is not None:
                envoy.close()


# ---------------------------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class SecretLoad:
    """Whether Envoy accepts one secret built from a bundle, and what it said."""

    ok: bool
    output: str

    @property
    def error(self) -> str:
        """Envoy's `error initializing configuration` reason, or ''."""
        for line in self.output.splitlines():
            if "error initializing configuration" in line:
                return line.partition("': ")[2] or line
        return ""


def envoy_loads(workdir: Path, files: dict[str, bytes]) -> dict[str, SecretLoad]:
    """`envoy --mode validate` on the two secrets a workload's Envoy gets from this bundle: "certificate" (the
    workload chain, leaf + cert-chain.pem + root-cert.pem, with its key) and "trust" (the trust bundle, and the
    CRLs when ca-crl.pem is not empty). Nothing runs; each validation takes about 0.1 s."""
    wl = istiod_sign(files, "envoy")
    d = workdir / "secrets"
    d.mkdir(parents=True, exist_ok=True)
    (d / "workload-chain.pem").write_bytes(wl.chain_pem)
    (d / "workload-key.pem").write_bytes(wl.key_pem)
    (d / "trust-bundle.pem").write_bytes(wl.trust_pem)
    (d / "only-leaf.pem").write_bytes(wl.leaf_pem)
    crl = None
    if files.get("ca-crl.pem"):
        (d / "ca-crl.pem").write_bytes(files["ca-crl.pem"])
        crl = "ca-crl.pem"
    out = {}
    # the certificate alone (SIMPLE) and the trust bundle alone (MUTUAL around a certificate Envoy surely loads)
    certificate = ServerTls("certificate", d, cert="workload-chain.pem", key="workload-key.pem", sds="static")
    trust = ServerTls("trust", d, mode="MUTUAL", cert="only-leaf.pem", key="workload-key.pem", ca="trust-bundle.pem",
                      sds="static", crl=crl)
    for spec in (certificate, trust):
        ok, output = Envoy(workdir / f"validate-{spec.name}", listeners=[spec]).validate_config()
        out[spec.name] = SecretLoad(ok, output)
    return out


def main(argv: list[str] | None = None) -> int:
    """Print Envoy's verdict both ways (markdown) for each case directory given."""
    dirs = [Path(a) for a in (sys.argv[1:] if argv is None else argv)]
    with tempfile.TemporaryDirectory(prefix="mesh-oracle-") as tmp:
        oracle = MeshOracle(Path(tmp), [MeshCase.from_dir(d) for d in dirs])
        try:
            print("| case | Envoy server (inbound) | Envoy client (outbound) |")
            print("|---|---|---|")
            for name in oracle.cases:
                inbound, outbound = oracle.both(name)
                print(f"| {name} | {inbound.describe()} | {outbound.describe()} |")
        finally:
            oracle.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
