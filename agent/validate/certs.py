"""X.509 certificates parsed exactly as Go's crypto/x509 parser.go (Go 1.26/1.27 defaults) parses them: negative
serials, duplicate extensions, unhandled critical extensions and malformed known extensions all as Go decides."""

from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

from agent.validate.der import (
    BIT_STRING,
    INTEGER,
    OBJECT_IDENTIFIER,
    OCTET_STRING,
    SEQUENCE,
    GoASN1,
    GoASN1Error,
    Str,
    ctx,
    decode_oid,
    oid_str,
    read_time,
)
from agent.validate.limits import LimitExceeded, Limits
from agent.validate.names import (
    RDN,
    GoURL,
    NameError_,
    domain_name_valid,
    is_ia5,
    name_key,
    name_str,
    parse_mailbox,
    parse_url,
)

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

__all__ = [
    "EKU",
    "KU",
    "Certificate",
    "CertificateError",
    "ECPublic",
    "Ed25519Public",
    "RSAPublic",
    "parse_certificate",
    "signature_algorithm",
]


class CertificateError(ValueError):
    """x509.ParseCertificate failed; the message is Go's."""


# KeyUsage bits as Go numbers them (KeyUsageDigitalSignature = 1 << 0, ...)
class KU:
    DIGITAL_SIGNATURE, CONTENT_COMMITMENT, KEY_ENCIPHERMENT, DATA_ENCIPHERMENT, KEY_AGREEMENT = 1, 2, 4, 8, 16
    CERT_SIGN, CRL_SIGN, ENCIPHER_ONLY, DECIPHER_ONLY = 32, 64, 128, 256


# ExtKeyUsage values (Go's iota order) and their OIDs
class EKU:
    ANY, SERVER_AUTH, CLIENT_AUTH = 0, 1, 2


_EKU_OIDS: dict[tuple[int, ...], int] = {
    (2, 5, 29, 37, 0): 0, (1, 3, 6, 1, 5, 5, 7, 3, 1): 1, (1, 3, 6, 1, 5, 5, 7, 3, 2): 2,
    (1, 3, 6, 1, 5, 5, 7, 3, 3): 3, (1, 3, 6, 1, 5, 5, 7, 3, 4): 4, (1, 3, 6, 1, 5, 5, 7, 3, 5): 5,
    (1, 3, 6, 1, 5, 5, 7, 3, 6): 6, (1, 3, 6, 1, 5, 5, 7, 3, 7): 7, (1, 3, 6, 1, 5, 5, 7, 3, 8): 8,
    (1, 3, 6, 1, 5, 5, 7, 3, 9): 9, (1, 3, 6, 1, 4, 1, 311, 10, 3, 3): 10, (2, 16, 840, 1, 113730, 4, 1): 11,
    (1, 3, 6, 1, 4, 1, 311, 2, 1, 22): 12, (1, 3, 6, 1, 4, 1, 311, 61, 1, 1): 13,
}

_PK_RSA, _PK_DSA, _PK_EC, _PK_ED25519 = (1, 2, 840, 113549, 1, 1, 1), (1, 2, 840, 10040, 4, 1), \
    (1, 2, 840, 10045, 2, 1), (1, 3, 101, 112)
_PK_X25519 = (1, 3, 101, 110)
_MLDSA = {(2, 16, 840, 1, 101, 3, 4, 3, 17), (2, 16, 840, 1, 101, 3, 4, 3, 18), (2, 16, 840, 1, 101, 3, 4, 3, 19)}
#: namedCurveFromOID
CURVES: dict[tuple[int, ...], str] = {(1, 3, 132, 0, 33): "P-224", (1, 2, 840, 10045, 3, 1, 7): "P-256",
                                      (1, 3, 132, 0, 34): "P-384", (1, 3, 132, 0, 35): "P-521"}
_CURVE_BYTES = {"P-224": 28, "P-256": 32, "P-384": 48, "P-521": 66}
_AIA = (1, 3, 6, 1, 5, 5, 7, 1, 1)
_AIA_OCSP, _AIA_ISSUERS = (1, 3, 6, 1, 5, 5, 7, 48, 1), (1, 3, 6, 1, 5, 5, 7, 48, 2)
_NULL = b"\x05\x00"

# signatureAlgorithmDetails: OID -> (name, public key algorithm, hash)
SIG_ALGS: dict[tuple[int, ...], tuple[str, str, str]] = {
    (1, 2, 840, 113549, 1, 1, 4): ("MD5-RSA", "RSA", "md5"),
    (1, 2, 840, 113549, 1, 1, 5): ("SHA1-RSA", "RSA", "sha1"),
    (1, 3, 14, 3, 2, 29): ("SHA1-RSA", "RSA", "sha1"),
    (1, 2, 840, 113549, 1, 1, 11): ("SHA256-RSA", "RSA", "sha256"),
    (1, 2, 840, 113549, 1, 1, 12): ("SHA384-RSA", "RSA", "sha384"),
    (1, 2, 840, 113549, 1, 1, 13): ("SHA512-RSA", "RSA", "sha512"),
    (1, 2, 840, 10040, 4, 3): ("DSA-SHA1", "DSA", "sha1"),
    (2, 16, 840, 1, 101, 3, 4, 3, 2): ("DSA-SHA256", "DSA", "sha256"),
    (1, 2, 840, 10045, 4, 1): ("ECDSA-SHA1", "ECDSA", "sha1"),
    (1, 2, 840, 10045, 4, 3, 2): ("ECDSA-SHA256", "ECDSA", "sha256"),
    (1, 2, 840, 10045, 4, 3, 3): ("ECDSA-SHA384", "ECDSA", "sha384"),
    (1, 2, 840, 10045, 4, 3, 4): ("ECDSA-SHA512", "ECDSA", "sha512"),
    (1, 3, 101, 112): ("Ed25519", "Ed25519", ""),
}
_RSA_PSS = (1, 2, 840, 113549, 1, 1, 10)
_MGF1 = (1, 2, 840, 113549, 1, 1, 8)
_HASH_OIDS: dict[tuple[int, ...], tuple[str, int]] = {
    (2, 16, 840, 1, 101, 3, 4, 2, 1): ("sha256", 32),
    (2, 16, 840, 1, 101, 3, 4, 2, 2): ("sha384", 48),
    (2, 16, 840, 1, 101, 3, 4, 2, 3): ("sha512", 64),
}


@dataclass(frozen=True)
class RSAPublic:
    n: int
    e: int


@dataclass(frozen=True)
class ECPublic:
    curve: str
    point: bytes


@dataclass(frozen=True)
class Ed25519Public:
    raw: bytes


@dataclass(frozen=True)
class _DSAPublic:
    y: int


PublicKey = RSAPublic | ECPublic | Ed25519Public | _DSAPublic


class _Extension(NamedTuple):
    oid: tuple[int, ...]
    critical: bool
    value: bytes


@dataclass(eq=False)
class Certificate:
    """The fields of Go's x509.Certificate that istiod's checks read."""

    raw: bytes
    raw_tbs: bytes = b""
    raw_issuer: bytes = b""
    raw_subject: bytes = b""
    raw_spki: bytes = b""
    version: int = 0
    serial: int = 0
    sig_alg: str = ""  # Go's SignatureAlgorithm name, "" when unknown
    sig_pub_algo: str = ""
    sig_hash: str = ""
    signature: bytes = b""
    pub_algo: str = ""  # "RSA" | "ECDSA" | "Ed25519" | "DSA" | "" (unknown)
    public_key: PublicKey | None = None
    not_before: int = 0
    not_after: int = 0
    subject: list[RDN] = field(default_factory=list)
    issuer: list[RDN] = field(default_factory=list)
    extensions: list[_Extension] = field(default_factory=list)
    key_usage: int = 0
    bc_valid: bool = False
    is_ca: bool = False
    max_path_len: int = -1
    dns_names: list[str] = field(default_factory=list)
    emails: list[str] = field(default_factory=list)
    ips: list[bytes] = field(default_factory=list)
    uris: list[GoURL] = field(default_factory=list)
    permitted_dns: list[str] = field(default_factory=list)
    excluded_dns: list[str] = field(default_factory=list)
    permitted_ips: list[tuple[bytes, bytes]] = field(default_factory=list)
    excluded_ips: list[tuple[bytes, bytes]] = field(default_factory=list)
    permitted_emails: list[str] = field(default_factory=list)
    excluded_emails: list[str] = field(default_factory=list)
    permitted_uris: list[str] = field(default_factory=list)
    excluded_uris: list[str] = field(default_factory=list)
    # constraints Go does not handle but BoringSSL applies (agent/validate/boring.py): directoryName subtrees as the
    # DER of their Name, and the tags of other name types
    permitted_dirnames: list[bytes] = field(default_factory=list)
    excluded_dirnames: list[bytes] = field(default_factory=list)
    permitted_other: list[int] = field(default_factory=list)
    excluded_other: list[int] = field(default_factory=list)
    ext_key_usage: list[int] = field(default_factory=list)
    unknown_eku: list[tuple[int, ...]] = field(default_factory=list)
    authority_key_id: bytes | None = None
    subject_key_id: bytes | None = None
    policies: list[bytes] = field(default_factory=list)  # certificate policy OIDs as DER contents
    policy_mappings: list[tuple[bytes, bytes]] = field(default_factory=list)
    require_explicit_policy: int = 0
    require_explicit_policy_zero: bool = False
    inhibit_policy_mapping: int = 0
    inhibit_policy_mapping_zero: bool = False
    inhibit_any_policy: int = 0
    inhibit_any_policy_zero: bool = False
    unhandled_critical: list[tuple[int, ...]] = field(default_factory=list)
    _crypto_key: object = None

    # -- what messages and later checks need --------------------------------------------------------------
    @property
    def subject_str(self) -> str:
        return name_str(self.subject)

    @property
    def subject_key(self) -> tuple[object, ...]:
        return name_key(self.subject)

    @property
    def common_name(self) -> str:
        """Subject.CommonName: the last CN string attribute."""
        cns = [v for rdn in self.subject for oid, v in rdn if oid == (2, 5, 4, 3) and isinstance(v, str)]
        return cns[-1] if cns else ""

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self.raw).hexdigest()

    def has_ext(self, oid: tuple[int, ...]) -> bool:
        return any(e.oid == oid for e in self.extensions)

    def ext(self, oid: tuple[int, ...]) -> _Extension | None:
        for e in self.extensions:
            if e.oid == oid:
                return e
        return None

    @property
    def has_name_constraints(self) -> bool:
        return self.has_ext((2, 5, 29, 30))

    @property
    def has_san(self) -> bool:
        return self.has_ext((2, 5, 29, 17))

    def crypto_key(self) -> PublicKeyTypes | None:
        """The public key as a `cryptography` object (None when it cannot be built), for signature checks."""
        if self._crypto_key is None:
            self._crypto_key = _to_crypto(self.public_key) or False
        return self._crypto_key or None  # type: ignore[return-value]


def _to_crypto(pub: PublicKey | None) -> PublicKeyTypes | None:
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    try:
        if isinstance(pub, RSAPublic):
            return rsa.RSAPublicNumbers(pub.e, pub.n).public_key()
        if isinstance(pub, ECPublic):
            curve = {"P-224": ec.SECP224R1(), "P-256": ec.SECP256R1(), "P-384": ec.SECP384R1(),
                     "P-521": ec.SECP521R1()}[pub.curve]
            return ec.EllipticCurvePublicKey.from_encoded_point(curve, pub.point)
        if isinstance(pub, Ed25519Public):
            return ed25519.Ed25519PublicKey.from_public_bytes(pub.raw)
    except (ValueError, TypeError):
        return None
    return None


# --------------------------------------------------------------------------------------------- parser.go


def _parse_ai(s: Str) -> tuple[tuple[int, ...], bytes | None]:
    """parseAI: the algorithm OID and the parameters' full encoding (None when absent)."""
    oid = s.read_oid()
    if oid is None:
        raise CertificateError("x509: malformed OID")
    if s.empty():
        return oid, None
    r = s.read_any_element()
    if r is None:
        raise CertificateError("x509: malformed parameters")
    return oid, r[1].data()


def signature_algorithm(oid: tuple[int, ...], params: bytes | None) -> tuple[str, str, str]:
    """getSignatureAlgorithmFromAI: (name, public key algorithm, hash), ("", "", "") when unknown."""
    if oid == (1, 3, 101, 112) and params:
        return "", "", ""
    if oid != _RSA_PSS:
        return SIG_ALGS.get(oid, ("", "", ""))
    try:
        body, _ = GoASN1.unmarshal_sequence(params or b"")  # pssParameters
        h = body.sequence(explicit=0)
        mgf = body.sequence(explicit=1)
        salt = body.int64(explicit=2)
        trailer = body.int64(optional=True, explicit=3)
        assert h is not None and mgf is not None and salt is not None
        hash_oid = h.oid()
        hash_params = h.element(optional=True)
        mgf_oid = mgf.oid()
        inner, _ = GoASN1.unmarshal_sequence(mgf.element(optional=True) or b"")  # mgf1HashFunc
        mgf_hash = inner.oid()
        mgf_hash_params = inner.element(optional=True)
    except (GoASN1Error, AssertionError):
        return "", "", ""
    trailer = 1 if trailer is None else trailer
    if ((hash_params and hash_params != _NULL) or mgf_oid != _MGF1 or mgf_hash != hash_oid
            or (mgf_hash_params and mgf_hash_params != _NULL) or trailer != 1):
        return "", "", ""
    known = _HASH_OIDS.get(hash_oid or ())
    if known is None or salt != known[1]:
        return "", "", ""
    return f"{known[0].upper()}-RSAPSS", "RSA", known[0]


def _public_key(oid: tuple[int, ...], params: bytes | None, data: bytes) -> PublicKey:
    """parsePublicKey."""
    if oid == _PK_RSA:
        if params != _NULL:
            raise CertificateError("x509: RSA key missing NULL parameters")
        s = Str(data)
        seq = s.read(SEQUENCE)
        if seq is None:
            raise CertificateError("x509: invalid RSA public key")
        n = seq.read_int()
        if n is None:
            raise CertificateError("x509: invalid RSA modulus")
        e = seq.read_int64()
        if e is None:
            raise CertificateError("x509: invalid RSA public exponent")
        if n <= 0:
            raise CertificateError("x509: RSA modulus is not a positive number")
        if e <= 0:
            raise CertificateError("x509: RSA public exponent is not a positive number")
        return RSAPublic(n, e)
    if oid == _PK_EC:
        curve_oid = Str(params or b"").read_oid()
        if curve_oid is None:
            raise CertificateError("x509: invalid ECDSA parameters")
        curve = CURVES.get(curve_oid)
        if curve is None:
            raise CertificateError("x509: unsupported elliptic curve")
        size = _CURVE_BYTES[curve]
        if len(data) != 1 + 2 * size or data[0] != 4:
            raise CertificateError("ecdsa: invalid public key")
        from agent.validate.ecmath import on_curve

        if not on_curve(curve, int.from_bytes(data[1:1 + size], "big"), int.from_bytes(data[1 + size:], "big")):
            raise CertificateError("ecdsa: invalid public key")
        return ECPublic(curve, data)
    if oid == _PK_ED25519:
        if params:
            raise CertificateError("x509: Ed25519 key encoded with illegal parameters")
        if len(data) != 32:
            raise CertificateError("x509: wrong Ed25519 public key size")
        return Ed25519Public(data)
    if oid == _PK_DSA:
        y = Str(data).read_int()
        if y is None:
            raise CertificateError("x509: invalid DSA public key")
        p = Str(params or b"")
        seq = p.read(SEQUENCE)
        vals = [seq.read_int() for _ in range(3)] if seq is not None else [None]
        if any(v is None for v in vals):
            raise CertificateError("x509: invalid DSA parameters")
        if y <= 0 or any(v is not None and v <= 0 for v in vals):
            raise CertificateError("x509: zero or negative DSA parameter")
        return _DSAPublic(y)
    raise CertificateError("x509: unknown public key algorithm")


def _known_pub_algo(oid: tuple[int, ...]) -> str:
    """getPublicKeyAlgorithmFromOID. ML-DSA is left unknown, as in Go 1.26 (istiod's go.mod), which lacks it."""
    return {_PK_RSA: "RSA", _PK_DSA: "DSA", _PK_EC: "ECDSA", _PK_ED25519: "Ed25519"}.get(oid, "")


def _ext(der: Str) -> _Extension:
    """parseExtension."""
    oid = der.read_oid()
    if oid is None:
        raise CertificateError("x509: malformed extension OID field")
    critical = False
    if der.peek(0x01):
        b = der.read_bool()
        if b is None:
            raise CertificateError("x509: malformed extension critical field")
        critical = b
    val = der.read(OCTET_STRING)
    if val is None:
        raise CertificateError("x509: malformed extension value field")
    return _Extension(oid, critical, val.data())


def _valid_ip_mask(mask: bytes) -> bool:
    seen_zero = False
    for b in mask:
        if seen_zero:
            if b:
                return False
            continue
        if b in (0x00, 0x80, 0xC0, 0xE0, 0xF0, 0xF8, 0xFC, 0xFE):
            seen_zero = True
        elif b != 0xFF:
            return False
    return True


def _is_ipv4_mapped(ip16: bytes) -> bool:
    """net.IP.To4() != nil for a 16-byte address."""
    return ip16[:10] == bytes(10) and ip16[10:12] == b"\xff\xff"


def _san(c: Certificate, value: bytes, limits: Limits) -> None:
    """parseSANExtension (forEachSAN)."""
    s = Str(value)
    seq = s.read(SEQUENCE)
    if seq is None:
        raise CertificateError("x509: invalid subject alternative names")
    count = 0
    while not seq.empty():
        r = seq.read_any()
        if r is None:
            raise CertificateError("x509: invalid subject alternative name")
        count += 1
        if count > limits.max_names_per_cert:
            raise LimitExceeded(f"more than {limits.max_names_per_cert} subject alternative names")
        tag, body = r[0] ^ 0x80, r[1].data()
        if tag == 1:
            if not is_ia5(body):
                raise CertificateError("x509: SAN rfc822Name is malformed")
            c.emails.append(body.decode())
        elif tag == 2:
            if not is_ia5(body):
                raise CertificateError("x509: SAN dNSName is malformed")
            c.dns_names.append(body.decode())
        elif tag == 6:
            if not is_ia5(body):
                raise CertificateError("x509: SAN uniformResourceIdentifier is malformed")
            text = body.decode()
            try:
                uri = parse_url(text)
            except NameError_ as exc:
                raise CertificateError(f'x509: cannot parse URI "{text}": {exc}') from None
            if uri.host and not domain_name_valid(uri.host, False):
                raise CertificateError(f'x509: cannot parse URI "{text}": invalid domain')
            c.uris.append(uri)
        elif tag == 7:
            if len(body) == 16:
                if _is_ipv4_mapped(body):
                    raise CertificateError("x509: SAN iPAddress contains IPv4-mapped IPv6 address")
                c.ips.append(body)
            elif len(body) == 4:
                c.ips.append(body)
            else:
                raise CertificateError(f"x509: cannot parse IP address of length {len(body)}")


def _name_constraints(c: Certificate, e: _Extension, limits: Limits) -> bool:
    """parseNameConstraintsExtension; returns `unhandled`."""
    outer = Str(e.value)
    top = outer.read(SEQUENCE)
    if top is None or not outer.empty():
        raise CertificateError("x509: invalid NameConstraints extension")
    perm = top.read_optional(ctx(0, constructed=True))
    excl = top.read_optional(ctx(1, constructed=True)) if perm is not None else None
    if perm is None or excl is None or not top.empty():
        raise CertificateError("x509: invalid NameConstraints extension")
    (have_p, permitted), (have_e, excluded) = perm, excl
    if (not have_p and not have_e) or (len(permitted or b"") == 0 and len(excluded or b"") == 0):
        raise CertificateError("x509: empty name constraints extension")
    unhandled = False
    count = 0

    def values(subtrees: Str | None, dns: list[str], ips: list[tuple[bytes, bytes]], emails: list[str],
               uris: list[str], dirnames: list[bytes], other: list[int]) -> None:
        nonlocal unhandled, count
        if subtrees is None:
            return
        while not subtrees.empty():
            seq = subtrees.read(SEQUENCE)
            r = seq.read_any() if seq is not None else None
            if r is None:
                raise CertificateError("x509: invalid NameConstraints extension")
            count += 1
            if count > limits.max_names_per_cert:
                raise LimitExceeded(f"more than {limits.max_names_per_cert} name constraints")
            tag, raw = r[0], r[1].data()
            if tag == ctx(2):
                if not is_ia5(raw):
                    raise CertificateError("x509: invalid constraint value: not an IA5String")
                d = raw.decode()
                if not domain_name_valid(d, True):
                    raise CertificateError(f'x509: failed to parse dnsName constraint "{d}"')
                dns.append(d)
            elif tag == ctx(7):
                if len(raw) == 8:
                    ip, mask = raw[:4], raw[4:]
                elif len(raw) == 32:
                    ip, mask = raw[:16], raw[16:]
                else:
                    raise CertificateError(f"x509: IP constraint contained value of length {len(raw)}")
                if not _valid_ip_mask(mask):
                    raise CertificateError(f"x509: IP constraint contained invalid mask {mask.hex()}")
                if len(ip) == 16 and _is_ipv4_mapped(ip):
                    raise CertificateError("x509: IP constraint contained IPv4-mapped IPv6 address")
                ips.append((ip, mask))
            elif tag == ctx(1):
                if not is_ia5(raw):
                    raise CertificateError("x509: invalid constraint value: not an IA5String")
                v = raw.decode()
                if "@" in v:
                    if parse_mailbox(v) is None:
                        raise CertificateError(f'x509: failed to parse rfc822Name constraint "{v}"')
                elif not domain_name_valid(v, True):
                    raise CertificateError(f'x509: failed to parse rfc822Name constraint "{v}"')
                emails.append(v)
            elif tag == ctx(6):
                if not is_ia5(raw):
                    raise CertificateError("x509: invalid constraint value: not an IA5String")
                v = raw.decode()
                if _parses_as_ip(v):
                    raise CertificateError(f'x509: failed to parse URI constraint "{v}": cannot be IP address')
                if not domain_name_valid(v, True):
                    raise CertificateError(f'x509: failed to parse URI constraint "{v}"')
                uris.append(v)
            else:
                unhandled = True
                if tag == ctx(4, constructed=True):
                    dirnames.append(raw)
                else:
                    other.append(tag)

    values(permitted, c.permitted_dns, c.permitted_ips, c.permitted_emails, c.permitted_uris, c.permitted_dirnames,
           c.permitted_other)
    values(excluded, c.excluded_dns, c.excluded_ips, c.excluded_emails, c.excluded_uris, c.excluded_dirnames,
           c.excluded_other)
    return unhandled


def _parses_as_ip(s: str) -> bool:
    """net.ParseIP(s) != nil."""
    try:
        ipaddress.ip_address(s)
    except ValueError:
        return False
    return "%" not in s


def _oid_der_valid(raw: bytes) -> bool:
    """newOIDFromDER: any size of arc, but minimal and not truncated."""
    return decode_oid(raw, limit31=False) is not None


def _process_extensions(c: Certificate, limits: Limits) -> None:
    """processExtensions."""
    for e in c.extensions:
        unhandled = False
        oid = e.oid
        if len(oid) == 4 and oid[:3] == (2, 5, 29):
            n = oid[3]
            v = Str(e.value)
            if n == 15:
                bits = v.read_bitstring()
                if bits is None:
                    raise CertificateError("x509: invalid key usage")
                data, bitlen = bits
                usage = 0
                for i in range(9):
                    if i < bitlen and data[i // 8] & (0x80 >> (i % 8)):
                        usage |= 1 << i
                c.key_usage = usage
            elif n == 19:
                seq = v.read(SEQUENCE)
                if seq is None:
                    raise CertificateError("x509: invalid basic constraints")
                is_ca = False
                if seq.peek(0x01):
                    b = seq.read_bool()
                    if b is None:
                        raise CertificateError("x509: invalid basic constraints")
                    is_ca = b
                max_path = -1
                if seq.peek(INTEGER):
                    mpl = seq.read_uint()
                    if mpl is None or mpl > (1 << 63) - 1:
                        raise CertificateError("x509: invalid basic constraints")
                    max_path = mpl
                c.is_ca, c.max_path_len, c.bc_valid = is_ca, max_path, True
            elif n == 17:
                _san(c, e.value, limits)
                if not (c.dns_names or c.emails or c.ips or c.uris):
                    unhandled = True
            elif n == 30:
                unhandled = _name_constraints(c, e, limits)
            elif n == 31:
                _crl_distribution_points(v)
            elif n == 35:
                c.authority_key_id = _aki(e)
            elif n == 36:
                _policy_constraints(c, v)
            elif n == 37:
                seq = v.read(SEQUENCE)
                if seq is None:
                    raise CertificateError("x509: invalid extended key usages")
                while not seq.empty():
                    eku = seq.read_oid()
                    if eku is None:
                        raise CertificateError("x509: invalid extended key usages")
                    if eku in _EKU_OIDS:
                        c.ext_key_usage.append(_EKU_OIDS[eku])
                    else:
                        c.unknown_eku.append(eku)
            elif n == 14:
                if e.critical:
                    raise CertificateError("x509: subject key identifier incorrectly marked critical")
                skid = v.read(OCTET_STRING)
                if skid is None:
                    raise CertificateError("x509: invalid subject key identifier")
                c.subject_key_id = skid.data()
            elif n == 32:
                seq = v.read(SEQUENCE)
                if seq is None:
                    raise CertificateError("x509: invalid certificate policies")
                seen: set[bytes] = set()
                while not seq.empty():
                    cp = seq.read(SEQUENCE)
                    oid_raw = cp.read(OBJECT_IDENTIFIER) if cp is not None else None
                    if oid_raw is None:
                        raise CertificateError("x509: invalid certificate policies")
                    raw = oid_raw.data()
                    if raw in seen or not _oid_der_valid(raw):
                        raise CertificateError("x509: invalid certificate policies")
                    seen.add(raw)
                    c.policies.append(raw)
            elif n == 33:
                seq = v.read(SEQUENCE)
                if seq is None:
                    raise CertificateError("x509: invalid policy mappings extension")
                while not seq.empty():
                    m = seq.read(SEQUENCE)
                    a = m.read(OBJECT_IDENTIFIER) if m is not None else None
                    b2 = m.read(OBJECT_IDENTIFIER) if m is not None and a is not None else None
                    if a is None or b2 is None:
                        raise CertificateError("x509: invalid policy mappings extension")
                    c.policy_mappings.append((a.data(), b2.data()))
            elif n == 54:
                skip = v.read_int64()
                if skip is None:
                    raise CertificateError("x509: invalid inhibit any policy extension")
                c.inhibit_any_policy, c.inhibit_any_policy_zero = skip, skip == 0
            else:
                unhandled = True
        elif oid == _AIA:
            if e.critical:
                raise CertificateError("x509: authority info access incorrectly marked critical")
            _aia(Str(e.value))
        else:
            unhandled = True
        if e.critical and unhandled:
            c.unhandled_critical.append(oid)


def _crl_distribution_points(v: Str) -> None:
    seq = v.read(SEQUENCE)
    if seq is None:
        raise CertificateError("x509: invalid CRL distribution points")
    while not seq.empty():
        dp = seq.read(SEQUENCE)
        if dp is None:
            raise CertificateError("x509: invalid CRL distribution point")
        opt = dp.read_optional(ctx(0, constructed=True))
        if opt is None:
            raise CertificateError("x509: invalid CRL distribution point")
        present, name = opt
        if not present or name is None:
            continue
        inner = name.read(ctx(0, constructed=True))
        if inner is None:
            raise CertificateError("x509: invalid CRL distribution point")
        while not inner.empty():
            if not inner.peek(ctx(6)):
                break
            if inner.read(ctx(6)) is None:
                raise CertificateError("x509: invalid CRL distribution point")


def _aki(e: _Extension) -> bytes | None:
    """parseAuthorityKeyIdentifier."""
    if e.critical:
        raise CertificateError("x509: authority key identifier incorrectly marked critical")
    akid = Str(e.value).read(SEQUENCE)
    if akid is None:
        raise CertificateError("x509: invalid authority key identifier")
    if akid.peek(ctx(0)):
        kid = akid.read(ctx(0))
        if kid is None:
            raise CertificateError("x509: invalid authority key identifier")
        return kid.data()
    return None


def _policy_constraints(c: Certificate, v: Str) -> None:
    seq = v.read(SEQUENCE)
    if seq is None:
        raise CertificateError("x509: invalid policy constraints extension")
    if seq.peek(ctx(0)):
        r = seq.read_int64(ctx(0))
        if r is None:
            raise CertificateError("x509: invalid policy constraints extension")
        c.require_explicit_policy, c.require_explicit_policy_zero = r, r == 0
    if seq.peek(ctx(1)):
        r = seq.read_int64(ctx(1))
        if r is None:
            raise CertificateError("x509: invalid policy constraints extension")
        c.inhibit_policy_mapping, c.inhibit_policy_mapping_zero = r, r == 0


def _aia(v: Str) -> None:
    seq = v.read(SEQUENCE)
    if seq is None:
        raise CertificateError("x509: invalid authority info access")
    while not seq.empty():
        a = seq.read(SEQUENCE)
        if a is None or a.read_oid() is None:
            raise CertificateError("x509: invalid authority info access")
        if not a.peek(ctx(6)):
            continue
        if a.read(ctx(6)) is None:
            raise CertificateError("x509: invalid authority info access")


def parse_certificate(der: bytes, limits: Limits | None = None,
                      names: dict[bytes, list[RDN]] | None = None) -> Certificate:
    """x509.ParseCertificate. Raises CertificateError with Go's message, or LimitExceeded. `names`: a cache of
    parsed names for one validation."""
    from agent.validate.names import parse_name

    limits = limits or Limits()
    s = Str(der)
    elem = s.read_element(SEQUENCE)
    if elem is None:
        raise CertificateError("x509: malformed certificate")
    c = Certificate(raw=elem.data())
    inp = elem.read(SEQUENCE)
    if inp is None:
        raise CertificateError("x509: malformed certificate")
    tbs_el = inp.read_element(SEQUENCE)
    if tbs_el is None:
        raise CertificateError("x509: malformed tbs certificate")
    c.raw_tbs = tbs_el.data()
    tbs = tbs_el.read(SEQUENCE)
    if tbs is None:
        raise CertificateError("x509: malformed tbs certificate")

    version = 0
    if tbs.peek(ctx(0, constructed=True)):
        wrapped = tbs.read(ctx(0, constructed=True))
        v = wrapped.read_int64() if wrapped is not None else None
        if v is None or wrapped is None or not wrapped.empty():
            raise CertificateError("x509: malformed version")
        version = v
    if version < 0:
        raise CertificateError("x509: malformed version")
    c.version = version + 1
    if c.version > 3:
        raise CertificateError("x509: invalid version")

    serial = tbs.read_int()
    if serial is None:
        raise CertificateError("x509: malformed serial number")
    if serial < 0:
        raise CertificateError("x509: negative serial number")  # x509negativeserial=0 since Go 1.23
    c.serial = serial

    sig_el = tbs.read_element(SEQUENCE)
    if sig_el is None:
        raise CertificateError("x509: malformed signature algorithm identifier")
    sig_ai = Str(sig_el.buf, sig_el.pos, sig_el.end).read(SEQUENCE)
    if sig_ai is None:
        raise CertificateError("x509: malformed signature algorithm identifier")
    outer = inp.read(SEQUENCE)
    if outer is None:
        raise CertificateError("x509: malformed algorithm identifier")
    if outer.data() != sig_ai.data():
        raise CertificateError("x509: inner and outer signature algorithm identifiers don't match")
    alg_oid, alg_params = _parse_ai(sig_ai)
    c.sig_alg, c.sig_pub_algo, c.sig_hash = signature_algorithm(alg_oid, alg_params)

    issuer_el = tbs.read_element(SEQUENCE)
    if issuer_el is None:
        raise CertificateError("x509: malformed issuer")
    c.raw_issuer = issuer_el.data()
    try:
        c.issuer = parse_name(Str(c.raw_issuer), names)
    except NameError_ as exc:
        raise CertificateError(str(exc)) from None

    validity = tbs.read(SEQUENCE)
    if validity is None:
        raise CertificateError("x509: malformed validity")
    nb = _time_or_error(validity)
    na = _time_or_error(validity)
    c.not_before, c.not_after = nb, na

    subject_el = tbs.read_element(SEQUENCE)
    if subject_el is None:
        raise CertificateError("x509: malformed issuer")
    c.raw_subject = subject_el.data()
    try:
        c.subject = parse_name(Str(c.raw_subject), names)
    except NameError_ as exc:
        raise CertificateError(str(exc)) from None

    spki_el = tbs.read_element(SEQUENCE)
    if spki_el is None:
        raise CertificateError("x509: malformed spki")
    c.raw_spki = spki_el.data()
    spki = spki_el.read(SEQUENCE)
    if spki is None:
        raise CertificateError("x509: malformed spki")
    pk_ai = spki.read(SEQUENCE)
    if pk_ai is None:
        raise CertificateError("x509: malformed public key algorithm identifier")
    pk_oid, pk_params = _parse_ai(pk_ai)
    c.pub_algo = _known_pub_algo(pk_oid)
    bits = spki.read_bitstring()
    if bits is None:
        raise CertificateError("x509: malformed subjectPublicKey")
    if c.pub_algo:
        # BitString.RightAlign: whole bytes for every real key
        c.public_key = _public_key(pk_oid, pk_params, bits[0] if bits[1] % 8 == 0 else _right_align(*bits))

    if c.version > 1:
        if not tbs.skip_optional(ctx(1)):
            raise CertificateError("x509: malformed issuerUniqueID")
        if not tbs.skip_optional(ctx(2)):
            raise CertificateError("x509: malformed subjectUniqueID")
        if c.version == 3:
            opt = tbs.read_optional(ctx(3, constructed=True))
            if opt is None:
                raise CertificateError("x509: malformed extensions")
            present, exts = opt
            if present and exts is not None:
                seq = exts.read(SEQUENCE)
                if seq is None:
                    raise CertificateError("x509: malformed extensions")
                seen: set[tuple[int, ...]] = set()
                while not seq.empty():
                    one = seq.read(SEQUENCE)
                    if one is None:
                        raise CertificateError("x509: malformed extension")
                    ext = _ext(one)
                    if ext.oid in seen:
                        raise CertificateError(
                            f'x509: certificate contains duplicate extension with OID "{oid_str(ext.oid)}"')
                    seen.add(ext.oid)
                    c.extensions.append(ext)
                _process_extensions(c, limits)

    sig = inp.read_bitstring()
    if sig is None:
        raise CertificateError("x509: malformed signature")
    c.signature = sig[0] if sig[1] % 8 == 0 else _right_align(*sig)
    if len(der) != len(c.raw):
        raise CertificateError("x509: trailing data")
    return c


def _time_or_error(s: Str) -> int:
    if s.peek(0x17):
        t = read_time(s)
        if t is None:
            raise CertificateError("x509: malformed UTCTime")
        return t
    if s.peek(0x18):
        t = read_time(s)
        if t is None:
            raise CertificateError("x509: malformed GeneralizedTime")
        return t
    raise CertificateError("x509: unsupported time format")


def _right_align(data: bytes, bitlen: int) -> bytes:
    """asn1.BitString.RightAlign."""
    shift = 8 - bitlen % 8
    if shift == 8 or not data:
        return data
    value = int.from_bytes(data, "big") >> shift
    return value.to_bytes((bitlen + 7) // 8, "big")


BIT_STRING_TAG = BIT_STRING
