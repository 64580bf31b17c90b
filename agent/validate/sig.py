"""Signature checks as crypto/x509 makes them (x509.go checkSignature, CheckSignatureFrom): Go decides which
algorithms, hashes and key sizes count; `cryptography` only does the arithmetic."""

from __future__ import annotations

from typing import TYPE_CHECKING

from agent.validate.certs import KU, Certificate, ECPublic, Ed25519Public, RSAPublic

if TYPE_CHECKING:
    from agent.validate.certs import PublicKey

__all__ = ["SignatureCache", "check_signature", "check_signature_from"]

_ALGO_NAMES = {"md5": "MD5", "sha1": "SHA1"}


def check_signature(alg: str, pub_algo: str, hash_name: str, signed: bytes, signature: bytes,
                    key: PublicKey | None, crypto_key: object, *, allow_sha1: bool) -> str | None:
    """x509.go checkSignature: None when the signature verifies, else Go's error text."""
    if not alg:
        return "x509: cannot verify signature: algorithm unimplemented"
    if not hash_name:
        if pub_algo != "Ed25519":
            return "x509: cannot verify signature: algorithm unimplemented"
    elif hash_name == "md5" or (hash_name == "sha1" and not allow_sha1):
        return f"x509: cannot verify signature: insecure algorithm {alg}"
    if isinstance(key, RSAPublic):
        if pub_algo != "RSA":
            return (f"x509: signature algorithm specifies an {pub_algo} public key, "
                    "but have public key of type *rsa.PublicKey")
        return _rsa(key, alg, hash_name, signed, signature, crypto_key)
    if isinstance(key, ECPublic):
        if pub_algo != "ECDSA":
            return (f"x509: signature algorithm specifies an {pub_algo} public key, "
                    "but have public key of type *ecdsa.PublicKey")
        return _ecdsa(hash_name, signed, signature, crypto_key)
    if isinstance(key, Ed25519Public):
        if pub_algo != "Ed25519":
            return (f"x509: signature algorithm specifies an {pub_algo} public key, "
                    "but have public key of type ed25519.PublicKey")
        return _ed25519(signed, signature, crypto_key)
    return "x509: cannot verify signature: algorithm unimplemented"


def _hash(name: str) -> object:
    from cryptography.hazmat.primitives import hashes

    # SHA-1 only reaches here for CRLs, which Go (and so istiod) still accepts with SHA-1
    table: dict[str, object] = {
        "sha1": hashes.SHA1(),  # noqa: S303
        "sha256": hashes.SHA256(),
        "sha384": hashes.SHA384(),
        "sha512": hashes.SHA512(),
    }
    return table[name]


def _rsa(key: RSAPublic, alg: str, hash_name: str, signed: bytes, sig: bytes, crypto_key: object) -> str | None:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric import padding, rsa

    bits = key.n.bit_length()
    if bits < 1024:  # crypto/rsa checkPublicKeySize: rsa1024min=1 (Go 1.24+)
        return (f"crypto/rsa: {bits}-bit keys are insecure "
                "(see https://go.dev/pkg/crypto/rsa#hdr-Minimum_key_size)")
    # crypto/internal/fips140/rsa checkPublicKey
    if key.n % 2 == 0:
        return "crypto/rsa: public modulus is even"
    if key.e < 2:
        return "crypto/rsa: public exponent too small or negative"
    if key.e % 2 == 0:
        return "crypto/rsa: public exponent is even"
    if key.e > (1 << 31) - 1:
        return "crypto/rsa: public exponent too large"
    if len(sig) != (bits + 7) // 8 or not isinstance(crypto_key, rsa.RSAPublicKey):
        return "crypto/rsa: verification error"
    h = _hash(hash_name)
    pad = padding.PSS(padding.MGF1(h), h.digest_size) if alg.endswith("RSAPSS") else padding.PKCS1v15()  # type: ignore[attr-defined, arg-type]
    try:
        crypto_key.verify(sig, signed, pad, h)  # type: ignore[arg-type]
    except InvalidSignature:
        return "crypto/rsa: verification error"
    return None


def _ecdsa(hash_name: str, signed: bytes, sig: bytes, crypto_key: object) -> str | None:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric import ec

    if not isinstance(crypto_key, ec.EllipticCurvePublicKey) or not _ecdsa_sig_shape(sig):
        return "x509: ECDSA verification failure"
    try:
        crypto_key.verify(sig, signed, ec.ECDSA(_hash(hash_name)))  # type: ignore[arg-type]
    except (InvalidSignature, ValueError):
        return "x509: ECDSA verification failure"
    return None


def _ecdsa_sig_shape(sig: bytes) -> bool:
    """ecdsa parseSignature: SEQUENCE of two non-negative minimal INTEGERs and nothing after it."""
    from agent.validate.der import INTEGER, SEQUENCE, Str, check_integer

    s = Str(sig)
    seq = s.read(SEQUENCE)
    if seq is None or not s.empty():
        return False
    for _ in range(2):
        n = seq.read(INTEGER)
        if n is None:
            return False
        raw = n.data()
        if not check_integer(raw) or raw[0] & 0x80:
            return False
    return seq.empty()


def _ed25519(signed: bytes, sig: bytes, crypto_key: object) -> str | None:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric import ed25519

    if not isinstance(crypto_key, ed25519.Ed25519PublicKey):
        return "x509: Ed25519 verification failure"
    try:
        crypto_key.verify(sig, signed)
    except InvalidSignature:
        return "x509: Ed25519 verification failure"
    return None


class SignatureCache:
    """Signature results per (child, parent) within one validation: Go recomputes them, the answer is the same."""

    def __init__(self) -> None:
        self._results: dict[tuple[int, int], str | None] = {}
        self.checks = 0

    def check(self, child: Certificate, parent: Certificate) -> str | None:
        key = (id(child), id(parent))
        if key not in self._results:
            self.checks += 1
            self._results[key] = check_signature_from(child, parent)
        return self._results[key]


def check_signature_from(child: Certificate, parent: Certificate) -> str | None:
    """x509.go CheckSignatureFrom: the parent must be a CA allowed to sign certificates, then the signature."""
    if (parent.version == 3 and not parent.bc_valid) or (parent.bc_valid and not parent.is_ca):
        return "x509: invalid signature: parent certificate cannot sign this kind of certificate"
    if parent.key_usage != 0 and parent.key_usage & KU.CERT_SIGN == 0:
        return "x509: invalid signature: parent certificate cannot sign this kind of certificate"
    if not parent.pub_algo:
        return "x509: cannot verify signature: algorithm unimplemented"
    return check_signature(child.sig_alg, child.sig_pub_algo, child.sig_hash, child.raw_tbs, child.signature,
                           parent.public_key, parent.crypto_key(), allow_sha1=False)
