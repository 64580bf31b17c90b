"""Certificates and CRLs assembled from raw DER, signed with `cryptography` keys, for the differential corpus.

cryptography's builders refuse what the corpus needs (negative serials, duplicate or critical-by-mistake
extensions, v1 certificates, odd time and string encodings), so every field here is encoded by hand.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import secrets
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

__all__ = [
    "CA_KU",
    "CRL",
    "Ext",
    "Issued",
    "aki",
    "basic_constraints",
    "cert",
    "cert_policies",
    "crl",
    "eku",
    "generic",
    "inhibit_any",
    "key_usage",
    "name",
    "name_constraints",
    "pem",
    "policy_constraints",
    "policy_mappings",
    "rsa_key_from_primes",
    "rsa_small_key",
    "san",
    "ski",
]

SignKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey

# ------------------------------------------------------------------------------------------------- DER


def _len(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    b = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(b)]) + b


def tlv(tag: int, content: bytes) -> bytes:
    """One DER element with a single-byte tag."""
    return bytes([tag]) + _len(len(content)) + content


def seq(*items: bytes) -> bytes:
    return tlv(0x30, b"".join(items))


def set_of(*items: bytes) -> bytes:
    return tlv(0x31, b"".join(sorted(items)))


def integer(n: int, *, raw: bytes | None = None) -> bytes:
    """A minimal two's-complement INTEGER (or `raw` content bytes, to encode it badly on purpose)."""
    if raw is not None:
        return tlv(0x02, raw)
    length = max(1, (n + (n < 0)).bit_length() // 8 + 1)
    return tlv(0x02, n.to_bytes(length, "big", signed=True))


def oid(dotted: str) -> bytes:
    parts = [int(p) for p in dotted.split(".")]
    body = bytearray()
    for arc in [parts[0] * 40 + parts[1], *parts[2:]]:
        v = arc
        chunk = [v & 0x7F]
        v >>= 7
        while v:
            chunk.append(0x80 | (v & 0x7F))
            v >>= 7
        body += bytes(reversed(chunk))
    return tlv(0x06, bytes(body))


def octet(b: bytes) -> bytes:
    return tlv(0x04, b)


def bitstring(b: bytes, unused: int = 0) -> bytes:
    return tlv(0x03, bytes([unused]) + b)


def boolean(v: bool) -> bytes:
    return tlv(0x01, b"\xff" if v else b"\x00")


NULL = b"\x05\x00"


def utctime(t: dt.datetime) -> bytes:
    return tlv(0x17, t.astimezone(dt.UTC).strftime("%y%m%d%H%M%SZ").encode())


def gentime(t: dt.datetime) -> bytes:
    return tlv(0x18, t.astimezone(dt.UTC).strftime("%Y%m%d%H%M%SZ").encode())


def x509_time(t: dt.datetime) -> bytes:
    """UTCTime before 2050, GeneralizedTime from then on (RFC 5280 4.1.2.5)."""
    return utctime(t) if t.astimezone(dt.UTC).year < 2050 else gentime(t)


# ------------------------------------------------------------------------------------------------- names

_ATTR = {"C": "2.5.4.6", "O": "2.5.4.10", "OU": "2.5.4.11", "CN": "2.5.4.3", "L": "2.5.4.7", "ST": "2.5.4.8"}


def name(*attrs: tuple[str, str] | tuple[str, str, int] | bytes) -> bytes:
    """An RDNSequence, one attribute per RDN: ("CN", "x") as UTF8String, ("C", "US", 0x13) with an explicit
    string tag, or raw AttributeTypeAndValue bytes."""
    rdns = []
    for a in attrs:
        if isinstance(a, bytes):
            rdns.append(set_of(a))
            continue
        key, value = a[0], a[1]
        tag = a[2] if len(a) == 3 else (0x13 if key == "C" else 0x0C)  # type: ignore[misc]
        raw = value.encode("latin-1") if tag in (0x13, 0x16, 0x14) else value.encode("utf-8", "surrogateescape")
        rdns.append(set_of(seq(oid(_ATTR.get(key, key)), tlv(tag, raw))))
    return seq(*rdns)


# ------------------------------------------------------------------------------------------------- extensions


@dataclass(frozen=True)
class Ext:
    """A raw extension: OID, criticality and the DER value inside the OCTET STRING."""

    oid: str
    value: bytes
    critical: bool = False

    def der(self) -> bytes:
        return seq(oid(self.oid), *([boolean(True)] if self.critical else []), octet(self.value))


def basic_constraints(ca: bool = True, pathlen: int | None = None, *, critical: bool = True) -> Ext:
    body = (boolean(True) if ca else b"") + (integer(pathlen) if pathlen is not None else b"")
    return Ext("2.5.29.19", seq(body), critical)


_KU_BITS = ["digitalSignature", "nonRepudiation", "keyEncipherment", "dataEncipherment", "keyAgreement",
            "keyCertSign", "cRLSign", "encipherOnly", "decipherOnly"]
#: Makefile.selfsigned.mk's CA key usage
CA_KU = ("digitalSignature", "nonRepudiation", "keyEncipherment", "keyCertSign")


def key_usage(*usages: str, critical: bool = True) -> Ext:
    bits = 0
    for u in usages:
        bits |= 1 << (15 - _KU_BITS.index(u))
    data = bits.to_bytes(2, "big")
    if not data[1]:
        data = data[:1]
    last = data[-1]
    unused = (last & -last).bit_length() - 1 if last else 0
    return Ext("2.5.29.15", bitstring(data, unused), critical)


def ski(keyid: bytes, *, critical: bool = False) -> Ext:
    return Ext("2.5.29.14", octet(keyid), critical)


def aki(keyid: bytes, *, critical: bool = False) -> Ext:
    return Ext("2.5.29.35", seq(tlv(0x80, keyid)), critical)


_EKU = {"serverAuth": "1.3.6.1.5.5.7.3.1", "clientAuth": "1.3.6.1.5.5.7.3.2", "codeSigning": "1.3.6.1.5.5.7.3.3",
        "any": "2.5.29.37.0", "nsSGC": "2.16.840.1.113730.4.1", "msSGC": "1.3.6.1.4.1.311.10.3.3"}


def eku(*usages: str, critical: bool = False) -> Ext:
    return Ext("2.5.29.37", seq(*(oid(_EKU.get(u, u)) for u in usages)), critical)


def _general_name(kind: str, value: str | bytes) -> bytes:
    tags = {"email": 0x81, "dns": 0x82, "uri": 0x86, "ip": 0x87}
    if kind == "ip":
        raw = value if isinstance(value, bytes) else ipaddress.ip_address(value).packed
        return tlv(0x87, raw)
    if kind == "dir":
        return tlv(0xA4, value if isinstance(value, bytes) else name(("CN", value)))
    if kind == "other":
        return tlv(0xA0, oid("1.3.6.1.4.1.311.20.2.3") + tlv(0xA0, tlv(0x0C, str(value).encode())))
    raw = value if isinstance(value, bytes) else value.encode("latin-1")
    return tlv(tags[kind], raw)


def san(*names: tuple[str, str | bytes], critical: bool = False) -> Ext:
    return Ext("2.5.29.17", seq(*(_general_name(k, v) for k, v in names)), critical)


def _subtree(kind: str, value: str | bytes) -> bytes:
    if kind == "ip":
        net = ipaddress.ip_network(value) if isinstance(value, str) else None
        raw = net.network_address.packed + net.netmask.packed if net is not None else bytes(value)
        return seq(tlv(0x87, raw))
    return seq(_general_name(kind, value))


def name_constraints(
    permitted: Sequence[tuple[str, str | bytes]] = (),
    excluded: Sequence[tuple[str, str | bytes]] = (),
    *,
    critical: bool = True,
    empty: bool = False,
) -> Ext:
    body = b""
    if permitted or empty:
        body += tlv(0xA0, b"".join(_subtree(k, v) for k, v in permitted))
    if excluded:
        body += tlv(0xA1, b"".join(_subtree(k, v) for k, v in excluded))
    return Ext("2.5.29.30", seq(body), critical)


def cert_policies(*oids: str, critical: bool = False) -> Ext:
    return Ext("2.5.29.32", seq(*(seq(oid(o)) for o in oids)), critical)


def policy_constraints(require: int | None = None, inhibit: int | None = None, *, critical: bool = True) -> Ext:
    body = b""
    if require is not None:
        body += tlv(0x80, integer(require)[2:])
    if inhibit is not None:
        body += tlv(0x81, integer(inhibit)[2:])
    return Ext("2.5.29.36", seq(body), critical)


def policy_mappings(*pairs: tuple[str, str], critical: bool = True) -> Ext:
    return Ext("2.5.29.33", seq(*(seq(oid(a), oid(b)) for a, b in pairs)), critical)


def inhibit_any(skip: int, *, critical: bool = True) -> Ext:
    return Ext("2.5.29.54", integer(skip), critical)


def generic(dotted: str, value: bytes = NULL, *, critical: bool = False) -> Ext:
    return Ext(dotted, value, critical)


# ------------------------------------------------------------------------------------------------- keys and signing


def spki_of(key: SignKey | rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey) -> bytes:
    pub = key.public_key() if hasattr(key, "public_key") else key
    return pub.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _spki_bits(spki: bytes) -> bytes:
    """The subjectPublicKey BIT STRING content (without the unused-bits byte), as RFC 5280 hashes it."""
    i = 1 + (1 if spki[1] < 0x80 else 1 + (spki[1] & 0x7F))  # inside the outer SEQUENCE
    alg_len_at = i + 1
    alg_len = spki[alg_len_at]
    i = alg_len_at + 1 + alg_len
    assert spki[i] == 0x03
    hdr = 2 if spki[i + 1] < 0x80 else 2 + (spki[i + 1] & 0x7F)
    return spki[i + hdr + 1:]


def key_id(spki: bytes) -> bytes:
    return hashlib.sha1(_spki_bits(spki)).digest()


_HASHES: dict[str, hashes.HashAlgorithm] = {
    "sha1": hashes.SHA1(), "sha256": hashes.SHA256(), "sha384": hashes.SHA384(), "sha512": hashes.SHA512(),
    "md5": hashes.MD5(),
}
_RSA_OIDS = {"md5": "1.2.840.113549.1.1.4", "sha1": "1.2.840.113549.1.1.5", "sha256": "1.2.840.113549.1.1.11",
             "sha384": "1.2.840.113549.1.1.12", "sha512": "1.2.840.113549.1.1.13"}
_EC_OIDS = {"sha1": "1.2.840.10045.4.1", "sha256": "1.2.840.10045.4.3.2", "sha384": "1.2.840.10045.4.3.3",
            "sha512": "1.2.840.10045.4.3.4"}
_HASH_OIDS = {"sha256": "2.16.840.1.101.3.4.2.1", "sha384": "2.16.840.1.101.3.4.2.2",
              "sha512": "2.16.840.1.101.3.4.2.3"}


def _sig_alg(key: SignKey, alg: str) -> bytes:
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return seq(oid("1.3.101.112"))
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return seq(oid(_EC_OIDS[alg]))
    if alg.startswith("pss"):
        h = "sha" + alg[3:]
        hash_ai = seq(oid(_HASH_OIDS[h]), NULL)
        params = seq(tlv(0xA0, hash_ai), tlv(0xA1, seq(oid("1.2.840.113549.1.1.8"), hash_ai)),
                     tlv(0xA2, integer(_HASHES[h].digest_size)))
        return seq(oid("1.2.840.113549.1.1.10"), params)
    return seq(oid(_RSA_OIDS[alg]), NULL)


def _sign(key: SignKey, alg: str, tbs: bytes) -> bytes:
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(tbs)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(tbs, ec.ECDSA(_HASHES[alg]))
    if alg.startswith("pss"):
        h = _HASHES["sha" + alg[3:]]
        return key.sign(tbs, padding.PSS(padding.MGF1(h), h.digest_size), h)
    return key.sign(tbs, padding.PKCS1v15(), _HASHES[alg])


def _default_alg(key: SignKey) -> str:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return {256: "sha256", 384: "sha384", 521: "sha512"}.get(key.curve.key_size, "sha256")
    return "sha256"


# ------------------------------------------------------------------------------------------------- certificates


@dataclass
class Issued:
    """A certificate with its private key: what signs the next one down."""

    der: bytes
    key: SignKey
    subject: bytes
    spki: bytes
    keyid: bytes | None
    serial: int = 0
    chain: list[Issued] = field(default_factory=list)

    @property
    def pem(self) -> bytes:
        return pem("CERTIFICATE", self.der)

    def key_pem(self, fmt: str = "pkcs8") -> bytes:
        f = serialization.PrivateFormat.PKCS8 if fmt == "pkcs8" else serialization.PrivateFormat.TraditionalOpenSSL
        return self.key.private_bytes(serialization.Encoding.PEM, f, serialization.NoEncryption())


def pem(label: str, der: bytes, headers: Iterable[tuple[str, str]] = ()) -> bytes:
    import base64

    body = base64.encodebytes(der).replace(b"\n", b"")
    lines = [body[i:i + 64] for i in range(0, len(body), 64)]
    head = b"".join(f"{k}: {v}\n".encode() for k, v in headers)
    if head:
        head += b"\n"
    return f"-----BEGIN {label}-----\n".encode() + head + b"\n".join(lines) + f"\n-----END {label}-----\n".encode()


NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)
DAY = dt.timedelta(days=1)


def cert(
    subject: bytes,
    key: SignKey,
    issuer: Issued | None = None,
    *,
    ca: bool = True,
    pathlen: int | None = None,
    ku: Sequence[str] | None = CA_KU,
    crl_sign: bool = False,
    exts: Sequence[Ext] | None = None,
    extra: Sequence[Ext] = (),
    serial: int | None = None,
    serial_raw: bytes | None = None,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
    validity: bytes | None = None,
    version: int | None = 2,
    alg: str | None = None,
    spki: bytes | None = None,
    issuer_name: bytes | None = None,
    signer: SignKey | None = None,
    outer_alg: bytes | None = None,
    tbs_suffix: bytes = b"",
    der_suffix: bytes = b"",
    mutate: Callable[[bytes], bytes] | None = None,
) -> Issued:
    """A certificate for `key`, signed by `issuer` (self-signed when None).

    Defaults follow istio's Makefile.selfsigned.mk: critical CA:true (pathlen when given), critical keyUsage,
    SKI, and an AKI when issued by another CA. `exts` replaces that profile, `extra` appends to it; the other
    keywords break one field each.
    """
    spki = spki if spki is not None else spki_of(key)
    kid = key_id(spki)
    signer = signer if signer is not None else (issuer.key if issuer else key)
    alg = alg or _default_alg(signer)
    if exts is None:
        usages = tuple(ku) + (("cRLSign",) if crl_sign else ()) if ku is not None else None
        exts = [e for e in (
            basic_constraints(ca, pathlen if ca else None),
            key_usage(*usages) if usages is not None else None,
            ski(kid),
            aki(issuer.keyid) if issuer is not None and issuer.keyid else None,
        ) if e is not None]
    all_exts = [*exts, *extra]
    start = not_before or NOW - dt.timedelta(minutes=5)
    end = not_after or start + 3650 * DAY
    serial = serial if serial is not None else secrets.randbits(120) | (1 << 119)
    sig_alg = _sig_alg(signer, alg)
    tbs_items = [
        tlv(0xA0, integer(version)) if version is not None else b"",
        integer(serial, raw=serial_raw),
        sig_alg,
        issuer_name if issuer_name is not None else (issuer.subject if issuer else subject),
        validity if validity is not None else seq(x509_time(start), x509_time(end)),
        subject,
        spki,
    ]
    if all_exts and version is not None and version >= 2:
        tbs_items.append(tlv(0xA3, seq(*(e.der() for e in all_exts))))
    tbs = seq(*tbs_items, tbs_suffix)
    if mutate is not None:
        tbs = mutate(tbs)
    signature = _sign(signer, alg, tbs)
    der = seq(tbs, outer_alg if outer_alg is not None else sig_alg, bitstring(signature)) + der_suffix
    chain = [issuer, *issuer.chain] if issuer is not None else []
    return Issued(der, key, subject, spki, kid, serial, chain)


# ------------------------------------------------------------------------------------------------- CRLs


@dataclass(frozen=True)
class CRL:
    der: bytes

    @property
    def pem(self) -> bytes:
        return pem("X509 CRL", self.der)


def crl(
    issuer: Issued,
    revoked: Sequence[int] = (),
    *,
    this_update: dt.datetime | None = None,
    next_update: dt.datetime | None = None,
    version: int | None = 1,
    signer: SignKey | None = None,
    alg: str | None = None,
    number: int = 1,
) -> CRL:
    """A CRL from `issuer` (v2 unless version=None), listing `revoked` serial numbers."""
    signer = signer if signer is not None else issuer.key
    alg = alg or _default_alg(signer)
    sig_alg = _sig_alg(signer, alg)
    this = this_update or NOW - dt.timedelta(hours=1)
    nxt = next_update or NOW + 30 * DAY
    entries = b"".join(seq(integer(s), x509_time(this)) for s in revoked)
    exts = seq(
        seq(oid("2.5.29.35"), octet(seq(tlv(0x80, issuer.keyid or b"")))),
        seq(oid("2.5.29.20"), octet(integer(number))),
    )
    tbs = seq(
        integer(version) if version is not None else b"",
        sig_alg,
        issuer.subject,
        x509_time(this),
        x509_time(nxt),
        seq(entries) if revoked else b"",
        tlv(0xA0, exts),
    )
    der = seq(tbs, sig_alg, bitstring(_sign(signer, alg, tbs)))
    return CRL(der)


# ------------------------------------------------------------------------------------------------- odd RSA keys


_SMALL_PRIMES = [p for p in range(2, 2000) if all(p % q for q in range(2, int(p**0.5) + 1))]


def _is_probable_prime(n: int) -> bool:
    if n < 2:
        return False
    for p in _SMALL_PRIMES:
        if n % p == 0:
            return n == p
    d, r = n - 1, 0
    while d % 2 == 0:
        d //= 2
        r += 1
    for _ in range(24):
        a = secrets.randbelow(n - 3) + 2
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = pow(x, 2, n)
            if x == n - 1:
                break
        else:
            return False
    return True


def _prime(bits: int, e: int, start: int | None = None) -> int:
    n = start if start is not None else secrets.randbits(bits) | (1 << (bits - 1)) | (1 << (bits - 2)) | 1
    n |= 1
    while not (_is_probable_prime(n) and (n - 1) % e != 0 and _gcd(e, n - 1) == 1):
        n += 2
    return n


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


def rsa_key_from_primes(p: int, q: int, e: int = 65537) -> rsa.RSAPrivateKey:
    """An RSA key from its primes, skipping OpenSSL's checks (so odd keys can be built)."""
    lam = (p - 1) * (q - 1) // _gcd(p - 1, q - 1)
    d = pow(e, -1, lam)
    nums = rsa.RSAPrivateNumbers(p, q, d, d % (p - 1), d % (q - 1), pow(q, -1, p), rsa.RSAPublicNumbers(e, p * q))
    return nums.private_key(unsafe_skip_rsa_key_validation=True)


def rsa_small_key(bits: int, e: int = 65537, *, close_primes: bool = False) -> rsa.RSAPrivateKey:
    """An RSA key of any size (cryptography refuses < 1024 bits), optionally with p and q close together."""
    half = bits // 2
    p = _prime(half, e)
    q = _prime(half, e, p + 2) if close_primes else _prime(half, e)
    while not close_primes and (p * q).bit_length() != bits:
        q = _prime(half, e)
    return rsa_key_from_primes(p, q, e)
