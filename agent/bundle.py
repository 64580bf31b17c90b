"""Pure checks on PEM bundles: refuse, before istiod or a gateway sees it, CA material they would reject.

Mirrors istiod's plugged-in CA checks (keycertbundle.go Verify, IsCA at startup); never imports hvac.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from agent.errors import BundleError, ConfigError

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

__all__ = [
    "ISTIO_CA_FILES",
    "KEY_FILES",
    "KINDS",
    "TLS_FILES",
    "BundleInfo",
    "validate",
    "validate_dir",
]

ISTIO_CA_FILES = ("ca-key.pem", "ca-cert.pem", "root-cert.pem", "cert-chain.pem")
TLS_FILES = ("tls.key", "tls.crt", "ca.crt")
KEY_FILES = frozenset({"ca-key.pem", "tls.key"})
#: bundle kind -> the files it is made of
KINDS: Mapping[str, tuple[str, ...]] = {"istio-ca": ISTIO_CA_FILES, "tls": TLS_FILES}

# Bounds path building on hostile input (Go caps signature checks instead); real meshes use 2-4 levels.
_MAX_DEPTH = 10
# Go counts these legacy "server gated crypto" usages as serverAuth.
_SGC_OIDS = frozenset({"2.16.840.1.113730.4.1", "1.3.6.1.4.1.311.10.3.3"})
_SERVER_AUTH = "1.3.6.1.5.5.7.3.1"
_ANY_EKU = "2.5.29.37.0"

_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n(.*?)-----END ([A-Z0-9 ]+)-----", re.DOTALL)


@dataclass(frozen=True)
class BundleInfo:
    """What a valid bundle holds, for logs and expiry metrics (never key material)."""

    #: "istio-ca" or "tls"
    kind: str
    #: per certificate file, the earliest notAfter of the certificates in it
    not_after: dict[str, dt.datetime]
    #: earliest notAfter over the whole bundle
    expires_at: dt.datetime
    #: sha256 hex of each certificate in root-cert.pem / ca.crt, in file order
    root_fingerprints: tuple[str, ...]
    #: serial number (hex) of ca-cert.pem / the tls.crt leaf
    serial: str


@dataclass(frozen=True)
class _Block:
    type: str
    headers: dict[str, str]
    der: bytes


@dataclass(frozen=True)
class _Cert:
    """A parsed certificate and where it came from, so messages can point at it."""

    cert: x509.Certificate
    file: str
    index: int
    count: int

    @property
    def der(self) -> bytes:
        from cryptography.hazmat.primitives.serialization import Encoding

        return self.cert.public_bytes(Encoding.DER)

    @property
    def label(self) -> str:
        subject = self.cert.subject.rfc4514_string() or "empty subject"
        if self.count == 1:
            return f"{self.file} ({subject})"
        return f"certificate {self.index + 1} of {self.count} in {self.file} ({subject})"


def _utc(when: dt.datetime) -> dt.datetime:
    return when.replace(tzinfo=dt.UTC) if when.tzinfo is None else when.astimezone(dt.UTC)


def _stamp(when: dt.datetime) -> str:
    return _utc(when).strftime("%Y-%m-%dT%H:%M:%SZ")


def _pem_blocks(name: str, data: bytes) -> list[_Block]:
    """Split PEM text into blocks; text between blocks is ignored, as Go's pem.Decode does."""
    blocks = []
    for match in _PEM_BLOCK.finditer(data):
        kind, body, end_kind = match.group(1).decode(), match.group(2), match.group(3).decode()
        if kind != end_kind:
            raise BundleError(f"{name} has a PEM block that begins as {kind} but ends as {end_kind}; fix the file.")
        headers: dict[str, str] = {}
        lines = body.splitlines()
        # RFC 1421 headers ("Proc-Type: 4,ENCRYPTED") come before a blank line; only legacy encrypted keys use them.
        if lines and b":" in lines[0]:
            while lines and lines[0].strip():
                key, _, value = lines.pop(0).decode(errors="replace").partition(":")
                headers[key.strip()] = value.strip()
        try:
            der = base64.b64decode(b"".join(line.strip() for line in lines), validate=True)
        except (binascii.Error, ValueError):
            raise BundleError(f"{name} has a {kind} PEM block whose base64 body is corrupt; re-export it.") from None
        blocks.append(_Block(kind, headers, der))
    return blocks


def _parse_certs(name: str, data: bytes, *, first_only: bool = False) -> list[_Cert]:
    """Parse every certificate in a file (or only the first, as istiod does for ca-cert.pem)."""
    from cryptography import x509
    from cryptography.exceptions import UnsupportedAlgorithm

    blocks = _pem_blocks(name, data)
    if not blocks:
        raise BundleError(f"{name} holds no PEM block; it must contain PEM-encoded CERTIFICATE blocks.")
    if first_only:
        blocks = blocks[:1]
    for block in blocks:
        if block.type != "CERTIFICATE" and first_only:
            raise BundleError(
                f"{name} starts with a PEM block of type {block.type}; istiod reads only the first block and "
                "needs the CA CERTIFICATE there."
            )
        if block.type != "CERTIFICATE":
            raise BundleError(f"{name} holds a PEM block of type {block.type}; only CERTIFICATE blocks belong there.")
    certs = []
    for i, block in enumerate(blocks):
        try:
            cert = x509.load_der_x509_certificate(block.der)
            # Extensions, the public key and the names parse lazily: touch them so a malformed certificate fails here.
            _ = (cert.extensions, cert.public_key(), cert.subject, cert.issuer)
        except (ValueError, TypeError, UnsupportedAlgorithm, x509.InvalidVersion) as exc:
            nth = "" if len(blocks) == 1 else f"certificate {i + 1} of {len(blocks)} in "
            raise BundleError(f"{nth}{name} is not a valid X.509 certificate ({_short(exc)}); re-export it.") from None
        certs.append(_Cert(cert, name, i, len(blocks)))
    return certs


def _short(exc: Exception) -> str:
    # cryptography's parse errors are Rust debug dumps: show short ones, summarise the rest.
    if type(exc).__name__ == "UnsupportedAlgorithm":
        return "its public key algorithm is not supported"
    if isinstance(exc, ValueError) and "asn1" not in str(exc) and 0 < len(str(exc)) < 80:
        return str(exc)
    return "its DER encoding does not parse"


def _parse_key(name: str, data: bytes) -> PrivateKeyTypes:
    """Parse the single unencrypted RSA or EC private key a key file must hold, the way istiod does."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.hazmat.primitives.serialization import load_der_private_key

    blocks = _pem_blocks(name, data)
    if not blocks:
        raise BundleError(f"{name} holds no PEM block; it must contain one PEM private key.")
    first = blocks[0]
    if first.type == "ENCRYPTED PRIVATE KEY" or "ENCRYPTED" in first.headers.get("Proc-Type", ""):
        raise BundleError(f"{name} is encrypted with a passphrase; istiod needs an unencrypted private key.")
    if first.type not in ("PRIVATE KEY", "RSA PRIVATE KEY", "EC PRIVATE KEY"):
        # istiod reads only the first PEM block (openssl ecparam without -noout puts EC PARAMETERS first).
        raise BundleError(
            f"{name} starts with a PEM block of type {first.type}; istiod reads only the first block and needs "
            "a PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY there."
        )
    if len(blocks) > 1:
        kinds = ", ".join(b.type for b in blocks)
        raise BundleError(
            f"{name} must hold exactly one PEM block, the private key, but holds {len(blocks)} ({kinds})."
        )
    try:
        # OpenSSL's RSA check tests p and q for primality: about 0.4 s for an RSA 4096 key (Istio's default).
        # istiod (Go's rsa.Validate) checks only the arithmetic, which _check_rsa_arithmetic does the same way.
        key = load_der_private_key(first.der, password=None, unsafe_skip_rsa_key_validation=True)
    except TypeError:
        raise BundleError(f"{name} is encrypted with a passphrase; istiod needs an unencrypted private key.") from None
    except (ValueError, UnsupportedAlgorithm):  # UnsupportedAlgorithm: an unknown curve or key OID
        raise BundleError(f"{name} holds a {first.type} block that is not a valid private key.") from None
    expected = {"RSA PRIVATE KEY": rsa.RSAPrivateKey, "EC PRIVATE KEY": ec.EllipticCurvePrivateKey}.get(first.type)
    if expected is not None and not isinstance(key, expected):
        raise BundleError(f"{name} is labelled {first.type} but holds a different key type; istiod would not parse it.")
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        algorithm = type(key).__name__.lstrip("_")
        raise BundleError(f"{name} holds a {algorithm}; istiod and Envoy support only RSA and ECDSA keys.")
    if isinstance(key, rsa.RSAPrivateKey):
        _check_rsa_arithmetic(name, key)
    return key


def _check_rsa_arithmetic(name: str, key: rsa.RSAPrivateKey) -> None:
    """What Go checks when istiod parses the key: n = p*q, d*e = 1 mod (p-1) and (q-1), and (Go 1.24+) the CRT
    values encoded beside them. No primality tests: those are what made OpenSSL's check slow."""
    numbers = key.private_numbers()
    n, e = numbers.public_numbers.n, numbers.public_numbers.e
    p, q, d = numbers.p, numbers.q, numbers.d
    consistent = e >= 2 and p > 1 and q > 1 and p * q == n
    consistent = consistent and (d * e) % (p - 1) == 1 and (d * e) % (q - 1) == 1
    crt = numbers.dmp1 == d % (p - 1) and numbers.dmq1 == d % (q - 1) and (numbers.iqmp * q) % p == 1
    if not (consistent and crt):
        raise BundleError(f"{name} holds an RSA key whose numbers are inconsistent; istiod would refuse to parse it.")


def _check_key_matches(key_name: str, key: PrivateKeyTypes, cert: _Cert) -> None:
    """Like Go's tls.X509KeyPair: the certificate's public key must be the key file's public key."""
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    spki = cert.cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    if key.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo) != spki:
        raise BundleError(
            f"{key_name} does not match {cert.file}: the certificate's public key belongs to another private key; "
            f"store the key that was issued with {cert.file}."
        )


def _basic_constraints(cert: x509.Certificate) -> x509.BasicConstraints | None:
    from cryptography import x509

    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return None


def _key_usage(cert: x509.Certificate) -> x509.KeyUsage | None:
    from cryptography import x509

    try:
        return cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return None


def _ca_problem(cert: x509.Certificate) -> str | None:
    """Why `cert` may not issue certificates, or None.

    CA:true is what istiod checks. keyCertSign (when keyUsage is present) is stricter than istiod, whose Go
    verifier ignores keyUsage, but Envoy (BoringSSL) rejects every workload certificate signed by such a CA,
    which breaks mTLS mesh-wide, so it is refused here too.
    """
    bc = _basic_constraints(cert)
    if bc is None:
        return "it has no basicConstraints extension, so it is not a CA certificate"
    if not bc.ca:
        return "basicConstraints CA is false, so it is not a CA certificate"
    ku = _key_usage(cert)
    if ku is not None and not ku.key_cert_sign:
        return "its keyUsage lacks keyCertSign, so it may not sign certificates"
    return None


def _eku_problem(cert: x509.Certificate) -> str | None:
    """Go's x509.Verify (istiod) requires serverAuth, or no EKU, or anyExtendedKeyUsage, on every chain cert."""
    from cryptography import x509

    try:
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return None
    dotted = {oid.dotted_string for oid in usages}
    if dotted & ({_SERVER_AUTH, _ANY_EKU} | _SGC_OIDS):
        return None
    return "its extendedKeyUsage excludes serverAuth, which istiod's x509 verification requires on every chain cert"


def _check_validity(certs: Sequence[_Cert], now: dt.datetime) -> None:
    for c in certs:
        if now < c.cert.not_valid_before_utc:
            raise BundleError(
                f"{c.label} is not valid yet: notBefore is {_stamp(c.cert.not_valid_before_utc)}; "
                "check the issuer's clock or wait until then."
            )
        if now > c.cert.not_valid_after_utc:
            raise BundleError(f"{c.label} expired at {_stamp(c.cert.not_valid_after_utc)}; issue a new certificate.")


def _signed_by(child: x509.Certificate, issuer: x509.Certificate) -> bool:
    from cryptography.exceptions import InvalidSignature

    try:
        child.verify_directly_issued_by(issuer)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def _self_signed(cert: x509.Certificate) -> bool:
    return cert.issuer == cert.subject and _signed_by(cert, cert)


class _ChainBuilder:
    """Path building in the style of Go's x509.Verify: leaf, then issuers from a pool, until a trust anchor.

    Every hop's signature is really verified. Besides Go's rules (issuers are CAs, validity, EKU) the issuing
    CAs need keyCertSign and their pathLenConstraint counts the leaf itself when `leaf_issues` is set, because
    ca-cert.pem goes on to sign workload certificates that Envoy verifies through this same chain.
    """

    def __init__(
        self, anchors: Sequence[_Cert], pool: Sequence[_Cert], *, leaf_issues: bool, check_eku: bool, roots_file: str
    ) -> None:
        anchor_ders = {a.der for a in anchors}
        self.anchors = list(anchors)
        # A root that also appears in the pool (cert-chain.pem ends with it) is a trust anchor, not an intermediate.
        self.pool = [p for p in pool if p.der not in anchor_ders]
        self.anchor_ders = anchor_ders
        self.leaf_issues = leaf_issues
        self.check_eku = check_eku
        self.roots_file = roots_file
        self.best: tuple[int, str] | None = None

    def _note(self, depth: int, problem: str) -> None:
        if self.best is None or depth > self.best[0]:
            self.best = (depth, problem)

    def build(self, leaf: _Cert) -> list[_Cert]:
        """Return leaf..anchor, or raise BundleError with the problem found deepest down the best path."""
        path = self._search([leaf])
        if path is not None:
            return path
        assert self.best is not None
        raise BundleError(self.best[1])

    def _search(self, path: list[_Cert]) -> list[_Cert] | None:
        current = path[-1]
        if current.der in self.anchor_ders:
            return path
        depth = len(path)
        if depth > _MAX_DEPTH:
            self._note(depth, f"{path[0].label} has a chain longer than {_MAX_DEPTH} certificates.")
            return None
        # A self-signed certificate that is not a trust anchor ends the path: it is some other root.
        if _self_signed(current.cert):
            self._note(
                depth,
                f"{current.label} is a self-signed root that is not in {self.roots_file}, so "
                f"{path[0].file} does not chain to {self.roots_file}.",
            )
            return None
        seen = {p.der for p in path}
        # Go tries the trust anchors first, then the intermediates pool.
        candidates = [
            c for c in (*self.anchors, *self.pool) if c.cert.subject == current.cert.issuer and c.der not in seen
        ]
        if not candidates:
            issuer = current.cert.issuer.rfc4514_string()
            self._note(
                depth,
                f"{current.label} was issued by {issuer}, which is in neither "
                f"{self.roots_file} nor the chain, so {path[0].file} does not chain to {self.roots_file}.",
            )
            return None
        for cand in candidates:
            problem = self._hop_problem(path, cand)
            if problem is not None:
                self._note(depth, problem)
                continue
            found = self._search([*path, cand])
            if found is not None:
                return found
        return None

    def _hop_problem(self, path: list[_Cert], issuer: _Cert) -> str | None:
        child = path[-1]
        if not _signed_by(child.cert, issuer.cert):
            return (
                f"{child.label} is not signed by {issuer.label} (same name, different key), so "
                f"{path[0].file} does not chain to {self.roots_file}."
            )
        is_anchor = issuer.der in self.anchor_ders
        # Go trusts anchors without CA checks; self-signed v1 roots still exist, so do the same for anchors.
        if not is_anchor or _basic_constraints(issuer.cert) is not None:
            problem = _ca_problem(issuer.cert)
            if problem is not None:
                return f"{issuer.label} cannot issue {child.label}: {problem}."
        bc = _basic_constraints(issuer.cert)
        below = len(path) - (0 if self.leaf_issues else 1)
        if bc is not None and bc.path_length is not None and below > bc.path_length:
            return (
                f"{issuer.label} has pathlen:{bc.path_length} but {below} CA certificate(s) would sit below it; "
                "Envoy would reject the certificates issued through it."
            )
        if self.check_eku:
            problem = _eku_problem(issuer.cert)
            if problem is not None:
                return f"{issuer.label} is refused: {problem}."
        return None


_NEEDS = {
    "istio-ca": "an istio-ca bundle needs ca-key.pem, ca-cert.pem, root-cert.pem and cert-chain.pem",
    "tls": "a tls bundle needs tls.key and tls.crt (ca.crt is optional)",
}


def _require(kind: str, files: Mapping[str, bytes], names: Sequence[str]) -> None:
    for name in names:
        if name not in files:
            raise BundleError(f"{name} is missing; {_NEEDS[kind]}.")
        if not files[name].strip():
            raise BundleError(f"{name} is empty; {_NEEDS[kind]}, each holding PEM data.")


def _validate_istio_ca(files: Mapping[str, bytes], now: dt.datetime) -> BundleInfo:
    _require("istio-ca", files, ISTIO_CA_FILES)
    # istiod parses only the first PEM block of ca-cert.pem; anything after it is ignored, so do the same.
    ca_cert = _parse_certs("ca-cert.pem", files["ca-cert.pem"], first_only=True)[0]
    chain = _parse_certs("cert-chain.pem", files["cert-chain.pem"])
    roots = _parse_certs("root-cert.pem", files["root-cert.pem"])
    key = _parse_key("ca-key.pem", files["ca-key.pem"])

    _check_key_matches("ca-key.pem", key, ca_cert)
    problem = _ca_problem(ca_cert.cert)
    if problem is not None:
        raise BundleError(f"ca-cert.pem cannot be istiod's signing CA: {problem}; istiod would refuse to sign with it.")
    _check_validity([ca_cert, *chain, *roots], now)
    problem = _eku_problem(ca_cert.cert)
    if problem is not None:
        raise BundleError(f"ca-cert.pem is refused: {problem}.")

    _ChainBuilder(roots, chain, leaf_issues=True, check_eku=True, roots_file="root-cert.pem").build(ca_cert)

    # istiod hands cert-chain.pem to workloads as the chain above their certificate: it must start at
    # ca-cert.pem and end at the root they trust.
    if chain[0].der != ca_cert.der:
        raise BundleError(
            f"cert-chain.pem must start with the certificate in ca-cert.pem, but starts with {chain[0].label}."
        )
    last = chain[-1]
    if not _self_signed(last.cert):
        raise BundleError(
            f"cert-chain.pem must end at a self-signed root, but ends with {last.label}; append the root."
        )
    if last.der not in {r.der for r in roots}:
        raise BundleError(f"cert-chain.pem ends at {last.label}, a root that is not in root-cert.pem.")

    not_after = {
        "ca-cert.pem": ca_cert.cert.not_valid_after_utc,
        "cert-chain.pem": min(c.cert.not_valid_after_utc for c in chain),
        "root-cert.pem": min(c.cert.not_valid_after_utc for c in roots),
    }
    return BundleInfo(
        kind="istio-ca",
        not_after=not_after,
        expires_at=min(not_after.values()),
        root_fingerprints=tuple(_fingerprint(r) for r in roots),
        serial=format(ca_cert.cert.serial_number, "x"),
    )


def _validate_tls(files: Mapping[str, bytes], now: dt.datetime, *, chain_to_ca: bool = True) -> BundleInfo:
    _require("tls", files, ("tls.key", "tls.crt"))
    certs = _parse_certs("tls.crt", files["tls.crt"])
    key = _parse_key("tls.key", files["tls.key"])
    has_ca = bool(files.get("ca.crt", b"").strip())
    cas = _parse_certs("ca.crt", files["ca.crt"]) if has_ca else []

    _check_key_matches("tls.key", key, certs[0])
    _check_validity([*certs, *cas], now)
    if cas and chain_to_ca:
        builder = _ChainBuilder(cas, [*certs[1:], *cas], leaf_issues=False, check_eku=False, roots_file="ca.crt")
        builder.build(certs[0])

    not_after = {"tls.crt": min(c.cert.not_valid_after_utc for c in certs)}
    if cas:
        not_after["ca.crt"] = min(c.cert.not_valid_after_utc for c in cas)
    return BundleInfo(
        kind="tls",
        not_after=not_after,
        expires_at=min(not_after.values()),
        root_fingerprints=tuple(_fingerprint(c) for c in cas),
        serial=format(certs[0].cert.serial_number, "x"),
    )


def _fingerprint(c: _Cert) -> str:
    from cryptography.hazmat.primitives import hashes

    return c.cert.fingerprint(hashes.SHA256()).hex()


def validate(
    kind: str, files: Mapping[str, bytes], *, now: dt.datetime | None = None, chain_to_ca: bool = True
) -> BundleInfo:
    """Check a bundle the way its consumer will, and describe it.

    istio-ca: all four files parse; ca-key.pem is one unencrypted RSA/EC key matching ca-cert.pem (first PEM
    block only, like istiod); ca-cert.pem is a CA with keyCertSign; it verifies through cert-chain.pem to a
    root in root-cert.pem (which may hold several roots); cert-chain.pem starts with ca-cert.pem and ends at
    a root from root-cert.pem; every certificate is valid at `now`.
    tls: tls.key matches the first certificate of tls.crt; when ca.crt is non-empty, tls.crt (with any
    intermediates after the leaf) verifies to it, unless `chain_to_ca` is false (a gateway in MUTUAL mode,
    where ca.crt is the CA of client certificates); every certificate is valid at `now`.

    Raises:
        BundleError: one sentence naming the file and the failed check; never key material.
        ConfigError: `kind` is not a known bundle kind.
    """
    when = _utc(now) if now is not None else dt.datetime.now(dt.UTC)
    if kind == "istio-ca":
        return _validate_istio_ca(files, when)
    if kind == "tls":
        return _validate_tls(files, when, chain_to_ca=chain_to_ca)
    raise ConfigError(f"unknown bundle kind {kind!r}; use one of: {', '.join(KINDS)}.")


def validate_dir(
    path: str | Path, kind: str, *, now: dt.datetime | None = None, chain_to_ca: bool = True
) -> BundleInfo:
    """Read a published bundle from `path` and validate it (see `validate`).

    Raises:
        BundleError: a required file is missing or unreadable, or the bundle is invalid.
        ConfigError: `kind` is not a known bundle kind.
    """
    if kind not in KINDS:
        raise ConfigError(f"unknown bundle kind {kind!r}; use one of: {', '.join(KINDS)}.")
    directory = Path(path)
    files: dict[str, bytes] = {}
    for name in KINDS[kind]:
        try:
            if (directory / name).exists() and not (directory / name).is_file():
                raise BundleError(f"{name} in {directory} is not a regular file.")
            files[name] = (directory / name).read_bytes()
        except FileNotFoundError:
            if kind == "tls" and name == "ca.crt":
                continue  # ca.crt is optional for kubernetes.io/tls material
            raise BundleError(f"{name} is missing from {directory}.") from None
        except OSError as exc:
            raise BundleError(f"{name} in {directory} cannot be read: {exc.strerror or exc}.") from None
    return validate(kind, files, now=now, chain_to_ca=chain_to_ca)
