"""Key pairs and CA certificates shaped like Istio's tools/certs (Makefile.selfsigned.mk, common.mk): the root,
the intermediate's subject and SAN, its CSR (for PKI signing) and its certificate (signed here by `ca`).

`cryptography` is imported inside the functions: the PKI source imports this module on the agent's run path.
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cryptography import x509

__all__ = [
    "INTERMEDIATE_DAYS",
    "ISTIOD_SAN",
    "ROOT_DAYS",
    "authority_key_id",
    "csr_for",
    "generate_key",
    "intermediate_cert",
    "intermediate_subject",
    "key_pem",
    "key_type_of",
    "root_cert",
]

#: the DNS SAN Istio's tools/certs puts on an intermediate
ISTIOD_SAN = "istiod.istio-system.svc"
#: common.mk: ROOTCA_DAYS and INTERMEDIATE_DAYS
ROOT_DAYS = 3650
INTERMEDIATE_DAYS = 730
#: not-before is set this far back, so a node whose clock is a little behind does not see "not yet valid"
_BACKDATE = dt.timedelta(minutes=5)


def generate_key(key_type: str) -> Any:
    """A new private key of `key_type` (ec-p256, ec-p384, rsa-2048, rsa-3072, rsa-4096)."""
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    if key_type.startswith("ec-"):
        curve = ec.SECP384R1() if key_type == "ec-p384" else ec.SECP256R1()
        return ec.generate_private_key(curve)
    return rsa.generate_private_key(public_exponent=65537, key_size=int(key_type.removeprefix("rsa-")))


def key_type_of(key: Any) -> str | None:
    """The key type name of a private key (`rsa-4096`, `ec-p256`, ...), None for any other kind of key."""
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    if isinstance(key, ec.EllipticCurvePrivateKey):
        return {"secp256r1": "ec-p256", "secp384r1": "ec-p384"}.get(key.curve.name)
    if isinstance(key, rsa.RSAPrivateKey):
        return f"rsa-{key.key_size}"
    return None


def key_pem(key: Any) -> bytes:
    """`key` as unencrypted PKCS#8 PEM (label PRIVATE KEY, which istiod parses for RSA and EC alike)."""
    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

    return bytes(key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))


def intermediate_subject(cluster: str) -> x509.Name:
    """O=Istio, CN=Intermediate CA, L=<cluster>: the subject tools/certs gives a cluster's intermediate."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Istio"),
        x509.NameAttribute(NameOID.COMMON_NAME, "Intermediate CA"),
        x509.NameAttribute(NameOID.LOCALITY_NAME, cluster),
    ])


def csr_for(key: Any, cluster: str) -> bytes:
    """The PEM CSR Istio's tools/certs makes for an intermediate of `cluster`, signed with `key`."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.serialization import Encoding

    builder = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(intermediate_subject(cluster))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(ISTIOD_SAN)]), critical=False)
    )
    return builder.sign(key, hashes.SHA256()).public_bytes(Encoding.PEM)


def _ca_usage() -> x509.KeyUsage:
    """keyCertSign, cRLSign and digitalSignature, critical.

    tools/certs asks for digitalSignature, nonRepudiation, keyEncipherment and keyCertSign; keyEncipherment means
    nothing for an EC key, and without cRLSign neither CA could sign the CRLs istiod (1.27+) loads from ca-crl.pem.
    """
    from cryptography import x509

    return x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
        key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False,
    )


def authority_key_id(issuer: x509.Certificate, issuer_key: Any) -> x509.AuthorityKeyIdentifier:
    """The AKI of what `issuer` signs: its SKI when it has one, else one derived from its public key."""
    from cryptography import x509

    try:
        ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key())


def root_cert(key: Any, *, days: int = ROOT_DAYS, now: dt.datetime | None = None) -> x509.Certificate:
    """A self-signed root for `key`: O=Istio, CN=Root CA, CA:true (critical), the CA keyUsage, SKI; SHA-256."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    start = (now or dt.datetime.now(dt.UTC)) - _BACKDATE
    name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Istio"),
        x509.NameAttribute(NameOID.COMMON_NAME, "Root CA"),
    ])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + _BACKDATE + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_ca_usage(), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    return builder.sign(key, hashes.SHA256())


def intermediate_cert(
    key: Any,
    cluster: str,
    issuer: x509.Certificate,
    issuer_key: Any,
    *,
    not_after: dt.datetime,
    now: dt.datetime | None = None,
) -> x509.Certificate:
    """`cluster`'s intermediate for `key`, signed by `issuer` (the root) with `issuer_key`: the tools/certs subject
    and SAN, CA:true pathlen:0 (critical), the CA keyUsage, SKI and AKI; SHA-256."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    aki = authority_key_id(issuer, issuer_key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(intermediate_subject(cluster))
        .issuer_name(issuer.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before((now or dt.datetime.now(dt.UTC)) - _BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_ca_usage(), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(ISTIOD_SAN)]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(aki, critical=False)
    )
    return builder.sign(issuer_key, hashes.SHA256())
