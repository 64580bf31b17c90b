"""Private keys as istiod reads them: crypto.go ParsePemEncodedKey picks one parser from the PEM label, Go's
x509 parsers (PKCS#1, PKCS#8, SEC 1) and crypto/rsa's validation decide, and crypto/tls X509KeyPair matches."""

from __future__ import annotations

from dataclasses import dataclass

from agent.validate.certs import CURVES, Certificate, CertificateError, ECPublic, Ed25519Public, RSAPublic
from agent.validate.der import GoASN1, GoASN1Error
from agent.validate.ecmath import CURVE_ORDER
from agent.validate.pem import Block

__all__ = [
    "ECKey",
    "Ed25519Key",
    "KeyError_",
    "RSAKey",
    "X25519Key",
    "key_pair_problem",
    "parse_ec",
    "parse_pem_encoded_key",
    "parse_pkcs1",
    "parse_private_key",
    "public_key_mismatch",
]

_RSA, _EC = (1, 2, 840, 113549, 1, 1, 1), (1, 2, 840, 10045, 2, 1)
_ED25519, _X25519 = (1, 3, 101, 112), (1, 3, 101, 110)
_SIZE = {"P-224": 28, "P-256": 32, "P-384": 48, "P-521": 66}


class KeyError_(ValueError):
    """A key Go refuses; the message is Go's."""


@dataclass(frozen=True)
class RSAKey:
    n: int
    e: int
    d: int
    primes: tuple[int, ...]

    @property
    def bits(self) -> int:
        return self.n.bit_length()


@dataclass(frozen=True)
class ECKey:
    curve: str
    d: int

    def public_point(self) -> bytes:
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        curve = {"P-224": ec.SECP224R1(), "P-256": ec.SECP256R1(), "P-384": ec.SECP384R1(),
                 "P-521": ec.SECP521R1()}[self.curve]
        return ec.derive_private_key(self.d, curve).public_key().public_bytes(Encoding.X962,
                                                                             PublicFormat.UncompressedPoint)


@dataclass(frozen=True)
class Ed25519Key:
    seed: bytes

    def public_raw(self) -> bytes:
        from cryptography.hazmat.primitives.asymmetric import ed25519

        return ed25519.Ed25519PrivateKey.from_private_bytes(self.seed).public_key().public_bytes_raw()


@dataclass(frozen=True)
class X25519Key:
    raw: bytes


PrivateKey = RSAKey | ECKey | Ed25519Key | X25519Key


# --------------------------------------------------------------------------------------------- crypto/rsa


def _rsa_precompute(n: int, e: int, d: int, p: int, q: int, crt: tuple[int, int, int] | None) -> str | None:
    """rsa.PrivateKey Precompute+Validate (Go 1.24+, crypto/internal/fips140/rsa): None, or Go's error."""
    if n <= 1 or p <= 1 or q <= 1:
        return "modulus must be > 1"
    if d >= n:
        return "input overflows the modulus size"
    if crt is None:
        if p - 1 <= 1 or q - 1 <= 1:
            return "modulus must be > 1"
        if p % 2 == 0:
            return "crypto/rsa: p is even"
        dp, dq, qinv = d % (p - 1), d % (q - 1), pow(q % p, p - 2, p)
    else:
        dp, dq, qinv = crt
        if qinv >= p:
            return "input overflows the modulus size"
    # checkPublicKey
    if n % 2 == 0:
        return "crypto/rsa: public modulus is even"
    if e < 2:
        return "crypto/rsa: public exponent too small or negative"
    if e % 2 == 0:
        return "crypto/rsa: public exponent is even"
    if e > (1 << 31) - 1:
        return "crypto/rsa: public exponent too large"
    # checkPrivateKey
    if p >= n or q >= n:
        return "crypto/rsa: invalid prime"
    if (p * q) % n != 0:
        return "crypto/rsa: p * q != n"
    if p - 1 <= 1 or q - 1 <= 1:
        return "crypto/rsa: invalid prime"
    if dp >= p - 1 or (e * dp) % (p - 1) != 1:
        return "crypto/rsa: invalid CRT exponent"
    if dq >= q - 1 or (e * dq) % (q - 1) != 1:
        return "crypto/rsa: invalid CRT exponent"
    if ((q % p) * qinv) % p != 1:
        return "crypto/rsa: invalid CRT coefficient"
    if d % (p - 1) != dp:
        return "crypto/rsa: d does not match dP"
    if d % (q - 1) != dq:
        return "crypto/rsa: d does not match dQ"
    if p == q:
        return "crypto/rsa: p == q"
    if abs(p - q).bit_length() <= n.bit_length() // 2 - 100:
        return "crypto/rsa: |p - q| too small"
    if d.bit_length() <= n.bit_length() // 2:
        return "crypto/rsa: d too small"
    return None


def _rsa_legacy(n: int, e: int, d: int, primes: tuple[int, ...]) -> str | None:
    """precomputeLegacy for multi-prime keys: NewPrivateKeyWithoutCRT checks only the public part and d < n."""
    if n <= 1:
        return "modulus must be > 1"
    if d >= n:
        return "input overflows the modulus size"
    for check, msg in ((n % 2 == 0, "crypto/rsa: public modulus is even"),
                       (e < 2, "crypto/rsa: public exponent too small or negative"),
                       (e % 2 == 0, "crypto/rsa: public exponent is even"),
                       (e > (1 << 31) - 1, "crypto/rsa: public exponent too large")):
        if check:
            return msg
    if any(pr <= 1 for pr in primes):
        return "crypto/rsa: prime factor is <= 1"
    import math

    r = primes[0] * primes[1]
    if math.gcd(primes[1], primes[0]) != 1:
        return "crypto/rsa: prime factors are not relatively prime"
    for pr in primes[2:]:
        if math.gcd(r, pr) != 1:
            return "crypto/rsa: prime factors are not relatively prime"
        r *= pr
    return None


# --------------------------------------------------------------------------------------------- crypto/x509


def _use(parser: str) -> str:
    return f"x509: failed to parse private key (use {parser} instead for this key format)"


def _probe_ec(der: bytes) -> bool:
    try:
        b, _ = GoASN1.unmarshal_sequence(der)
        b.int64()
        b.octets()
        b.oid(optional=True, explicit=0)
        b.bitstring(optional=True, explicit=1)
    except GoASN1Error:
        return False
    return True


def _probe_pkcs8(der: bytes) -> bool:
    try:
        b, _ = GoASN1.unmarshal_sequence(der)
        b.int64()
        ai = b.sequence()
        assert ai is not None
        ai.oid()
        ai.element(optional=True)
        b.octets()
    except (GoASN1Error, AssertionError):
        return False
    return True


def _probe_pkcs1(der: bytes) -> bool:
    try:
        _pkcs1_fields(der)
    except GoASN1Error:
        return False
    return True


def _pkcs1_fields(der: bytes) -> tuple[list[int | None], list[int], bytes]:
    b, rest = GoASN1.unmarshal_sequence(der)
    version = b.int64()
    n = b.bigint()
    e = b.int64()
    d, p, q = b.bigint(), b.bigint(), b.bigint()
    dp, dq, qinv = b.bigint(optional=True), b.bigint(optional=True), b.bigint(optional=True)
    extra: list[int] = []
    seq = b.sequence(optional=True)
    if seq is not None:
        while not seq.at_end():
            one = seq.sequence()
            assert one is not None
            prime = one.bigint()
            one.bigint()
            one.bigint()
            assert prime is not None
            extra.append(prime)
    return [version, n, e, d, p, q, dp, dq, qinv], extra, rest


def parse_pkcs1(der: bytes) -> RSAKey:
    """x509.ParsePKCS1PrivateKey."""
    try:
        fields, extra, rest = _pkcs1_fields(der)
    except GoASN1Error as exc:
        if _probe_ec(der):
            raise KeyError_(_use("ParseECPrivateKey")) from None
        if _probe_pkcs8(der):
            raise KeyError_(_use("ParsePKCS8PrivateKey")) from None
        raise KeyError_(str(exc)) from None
    if rest:
        raise KeyError_("asn1: syntax error: trailing data")
    version, n, e, d, p, q, dp, dq, qinv = fields
    assert version is not None and n is not None and e is not None and d is not None and p is not None and \
        q is not None
    if version > 1:
        raise KeyError_("x509: unsupported private key version")
    if n <= 0 or d <= 0 or p <= 0 or q <= 0 or any(v is not None and v <= 0 for v in (dp, dq, qinv)):
        raise KeyError_("x509: private key contains zero or negative value")
    if any(pr <= 0 for pr in extra):
        raise KeyError_("x509: private key contains zero or negative prime")
    primes = (p, q, *extra)
    if extra:
        err = _rsa_legacy(n, e, d, primes)
    else:
        crt = (dp, dq, qinv) if dp is not None and dq is not None and qinv is not None else None
        err = _rsa_precompute(n, e, d, p, q, crt)
    if err is not None:
        raise KeyError_(err)
    return RSAKey(n, e, d, primes)


def parse_ec(der: bytes, curve_oid: tuple[int, ...] | None = None) -> ECKey:
    """x509.ParseECPrivateKey (parseECPrivateKey): the embedded public key is ignored, the point is recomputed."""
    try:
        b, _ = GoASN1.unmarshal_sequence(der)
        version = b.int64()
        priv = b.octets()
        named = b.oid(optional=True, explicit=0)
        b.bitstring(optional=True, explicit=1)
    except GoASN1Error as exc:
        if _probe_pkcs8(der):
            raise KeyError_(_use("ParsePKCS8PrivateKey")) from None
        if _probe_pkcs1(der):
            raise KeyError_(_use("ParsePKCS1PrivateKey")) from None
        raise KeyError_(f"x509: failed to parse EC private key: {exc}") from None
    if version != 1:
        raise KeyError_(f"x509: unknown EC private key version {version}")
    curve = CURVES.get(curve_oid if curve_oid is not None else named or ())
    if curve is None:
        raise KeyError_("x509: unknown elliptic curve")
    size = _SIZE[curve]
    while len(priv) > size:
        if priv[0] != 0:
            raise KeyError_("x509: invalid private key length")
        priv = priv[1:]
    d = int.from_bytes(priv, "big")
    if d >= CURVE_ORDER[curve]:
        raise KeyError_("input overflows the modulus")
    if d == 0:
        raise KeyError_("ecdsa: private key is zero")
    return ECKey(curve, d)


def _parse_pkcs8(der: bytes) -> PrivateKey:
    """x509.ParsePKCS8PrivateKey (ML-DSA left unknown, as in Go 1.26)."""
    try:
        b, _ = GoASN1.unmarshal_sequence(der)
        b.int64()
        ai = b.sequence()
        assert ai is not None
        alg = ai.oid()
        params = ai.element(optional=True)
        inner = b.octets()
    except (GoASN1Error, AssertionError) as exc:
        if _probe_ec(der):
            raise KeyError_(_use("ParseECPrivateKey")) from None
        if _probe_pkcs1(der):
            raise KeyError_(_use("ParsePKCS1PrivateKey")) from None
        raise KeyError_(str(exc) or "asn1: structure error") from None
    if alg == _RSA:
        try:
            return parse_pkcs1(inner)
        except KeyError_ as exc:
            raise KeyError_(f"x509: failed to parse RSA private key embedded in PKCS#8: {exc}") from None
    if alg == _EC:
        named: tuple[int, ...] | None
        try:
            top = GoASN1(params or b"")
            named = top.oid()
        except GoASN1Error:
            named = None
        try:
            return parse_ec(inner, named)
        except KeyError_ as exc:
            raise KeyError_(f"x509: failed to parse EC private key embedded in PKCS#8: {exc}") from None
    if alg in (_ED25519, _X25519):
        kind = "Ed25519" if alg == _ED25519 else "X25519"
        if params:
            raise KeyError_(f"x509: invalid {kind} private key parameters")
        try:
            top = GoASN1(inner)
            raw = top.octets()
        except GoASN1Error as exc:
            raise KeyError_(f"x509: invalid {kind} private key: {exc}") from None
        if alg == _ED25519:
            if len(raw) != 32:
                raise KeyError_(f"x509: invalid Ed25519 private key length: {len(raw)}")
            return Ed25519Key(raw)
        if len(raw) != 32:
            raise KeyError_("crypto/ecdh: invalid private key size")
        return X25519Key(raw)
    dotted = ".".join(str(a) for a in alg or ())
    raise KeyError_(f"x509: PKCS#8 wrapping contained private key with unknown algorithm: {dotted}")


def parse_pem_encoded_key(block: Block) -> PrivateKey:
    """security/pkg/pki/util/crypto.go ParsePemEncodedKey: the label picks exactly one parser."""
    label = block.label
    if label == b"EC PRIVATE KEY":
        try:
            return parse_ec(block.der)
        except KeyError_ as exc:
            raise KeyError_(f"failed to parse the ECDSA private key: {exc}") from None
    if label == b"RSA PRIVATE KEY":
        try:
            return parse_pkcs1(block.der)
        except KeyError_ as exc:
            raise KeyError_(f"failed to parse the RSA private key: {exc}") from None
    if label == b"PRIVATE KEY":
        try:
            return _parse_pkcs8(block.der)
        except KeyError_ as exc:
            raise KeyError_(f"failed to parse the PKCS8 private key: {exc}") from None
    raise KeyError_(f"unsupported PEM block type for a private key: {block.type}")


def parse_private_key(der: bytes) -> PrivateKey:
    """crypto/tls parsePrivateKey: PKCS#8, then PKCS#1, then SEC 1, whatever the label says."""
    try:
        key: PrivateKey = _parse_pkcs8(der)
    except KeyError_ as pkcs8_err:
        try:
            key = parse_pkcs1(der)
        except KeyError_:
            try:
                key = parse_ec(der)
            except KeyError_:
                raise KeyError_(f"tls: failed to parse private key: {pkcs8_err}") from None
    if isinstance(key, X25519Key):
        raise KeyError_("tls: found unknown private key type in PKCS#8 wrapping")
    return key


def key_pair_problem(cert_blocks: list[Block], key_blocks: list[Block]) -> str | None:
    """crypto/tls X509KeyPair on already-decoded PEM blocks: None when the first certificate matches the key."""
    from agent.validate.certs import parse_certificate

    certs = [b for b in cert_blocks if b.label == b"CERTIFICATE"]
    if not certs:
        skipped = [b.type for b in cert_blocks]
        if not skipped:
            return "tls: failed to find any PEM data in certificate input"
        if len(skipped) == 1 and skipped[0].endswith("PRIVATE KEY"):
            return ("tls: failed to find certificate PEM data in certificate input, but did find a private key; "
                    "PEM inputs may have been switched")
        return ('tls: failed to find "CERTIFICATE" PEM block in certificate input after skipping PEM blocks of '
                f"the following types: [{' '.join(skipped)}]")
    key_block = None
    skipped = []
    for b in key_blocks:
        if b.label == b"PRIVATE KEY" or b.label.endswith(b" PRIVATE KEY"):
            key_block = b
            break
        skipped.append(b.type)
    if key_block is None:
        if not skipped:
            return "tls: failed to find any PEM data in key input"
        if skipped == ["CERTIFICATE"]:
            return "tls: found a certificate rather than a key in the PEM for the private key"
        return ('tls: failed to find PEM block with type ending in "PRIVATE KEY" in key input after skipping PEM '
                f"blocks of the following types: [{' '.join(skipped)}]")
    try:
        cert = parse_certificate(certs[0].der)
    except CertificateError as exc:
        return str(exc)
    try:
        key = parse_private_key(key_block.der)
    except KeyError_ as exc:
        return str(exc)
    return public_key_mismatch(cert, key)


def public_key_mismatch(cert: Certificate, key: PrivateKey) -> str | None:
    """The tail of X509KeyPair: the private key must be of the certificate's key type and match it."""
    pub = cert.public_key
    if isinstance(pub, RSAPublic):
        if not isinstance(key, RSAKey):
            return "tls: private key type does not match public key type"
        return None if (key.n, key.e) == (pub.n, pub.e) else "tls: private key does not match public key"
    if isinstance(pub, ECPublic):
        if not isinstance(key, ECKey):
            return "tls: private key type does not match public key type"
        if key.curve != pub.curve or key.public_point() != pub.point:
            return "tls: private key does not match public key"
        return None
    if isinstance(pub, Ed25519Public):
        if not isinstance(key, Ed25519Key):
            return "tls: private key type does not match public key type"
        return None if key.public_raw() == pub.raw else "tls: private key does not match public key"
    return "tls: unknown public key algorithm"
