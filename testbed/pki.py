"""Test and demo PKI: roots, Istio intermediates and TLS leaves shaped like istio's Makefile.selfsigned.mk.

EC P-256 by default so tests stay fast; RSA on request. Knobs produce every bad bundle the agent must refuse.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "CertKey",
    "PrivateKey",
    "intermediate_ca",
    "istio_ca_files",
    "leaf_cert",
    "main",
    "make_key",
    "pem_cert",
    "pem_certs",
    "pem_key",
    "root_ca",
    "tls_files",
]

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

#: istio's Makefile.selfsigned.mk uses 3650 days for both root and intermediate.
DEFAULT_DAYS = 3650
#: back-dating avoids "not yet valid" failures from small clock skews between processes.
_BACKDATE = dt.timedelta(minutes=5)


@dataclass(frozen=True)
class CertKey:
    """A certificate, its private key and the issuer chain above it (nearest issuer first, root last)."""

    cert: x509.Certificate
    key: PrivateKey
    chain: tuple[x509.Certificate, ...] = ()

    @property
    def cert_pem(self) -> bytes:
        """The certificate alone, PEM encoded."""
        return pem_cert(self.cert)

    @property
    def key_pem(self) -> bytes:
        """The private key as unencrypted PKCS#8 PEM."""
        return pem_key(self.key)


def make_key(key_type: str = "ec", bits: int = 2048) -> PrivateKey:
    """Generate a private key: "ec" (P-256, fast) or "rsa" with `bits`."""
    if key_type == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=bits)
    raise ValueError(f"unknown key_type {key_type!r}; use 'ec' or 'rsa'")


def pem_cert(cert: x509.Certificate) -> bytes:
    """One certificate as PEM."""
    return cert.public_bytes(serialization.Encoding.PEM)


def pem_certs(*certs: x509.Certificate) -> bytes:
    """Several certificates concatenated as PEM, in the given order."""
    return b"".join(pem_cert(c) for c in certs)


def pem_key(key: PrivateKey, fmt: str = "pkcs8", password: bytes | None = None) -> bytes:
    """A private key as PEM: "pkcs8" (PRIVATE KEY) or "traditional" (RSA/EC PRIVATE KEY); encrypted with `password`."""
    formats = {
        "pkcs8": serialization.PrivateFormat.PKCS8,
        "traditional": serialization.PrivateFormat.TraditionalOpenSSL,
    }
    if fmt not in formats:
        raise ValueError(f"unknown key format {fmt!r}; use 'pkcs8' or 'traditional'")
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
    )
    return key.private_bytes(serialization.Encoding.PEM, formats[fmt], encryption)


def _window(
    not_before: dt.datetime | None, not_after: dt.datetime | None, days: int
) -> tuple[dt.datetime, dt.datetime]:
    start = not_before or dt.datetime.now(dt.UTC) - _BACKDATE
    end = not_after or start + _BACKDATE + dt.timedelta(days=days)
    return start, end


def _ca_key_usage(key_cert_sign: bool) -> x509.KeyUsage:
    # Makefile.selfsigned.mk: digitalSignature, nonRepudiation, keyEncipherment, keyCertSign.
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=True,
        key_encipherment=True,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def _builder(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey,
    start: dt.datetime,
    end: dt.datetime,
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def _name(org: str, cn: str, locality: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, org), x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if locality:
        attrs.append(x509.NameAttribute(NameOID.LOCALITY_NAME, locality))
    return x509.Name(attrs)


def _aki(issuer: CertKey) -> x509.AuthorityKeyIdentifier:
    return x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key())


def _eku(usages: Sequence[x509.ObjectIdentifier]) -> x509.ExtendedKeyUsage:
    return x509.ExtendedKeyUsage(list(usages))


def root_ca(
    *,
    cn: str = "Root CA",
    org: str = "Istio",
    key_type: str = "ec",
    bits: int = 2048,
    days: int = DEFAULT_DAYS,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
    is_ca: bool = True,
    key_cert_sign: bool = True,
    path_length: int | None = None,
    key: PrivateKey | None = None,
) -> CertKey:
    """A self-signed root like istio's root-ca.conf: O=Istio CN=Root CA, critical CA:true and keyUsage, SKI.

    `path_length` adds a pathLenConstraint; `key` re-issues a root for an existing key (a renewed root).
    """
    key = key or make_key(key_type, bits)
    start, end = _window(not_before, not_after, days)
    name = _name(org, cn)
    cert = (
        _builder(name, name, key.public_key(), start, end)
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=path_length if is_ca else None), critical=True)
        .add_extension(_ca_key_usage(key_cert_sign), critical=True)
        .sign(key, hashes.SHA256())
    )
    return CertKey(cert, key)


def intermediate_ca(
    issuer: CertKey,
    *,
    cluster: str = "cluster1",
    cn: str = "Intermediate CA",
    org: str = "Istio",
    key_type: str = "ec",
    bits: int = 2048,
    days: int = DEFAULT_DAYS,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
    is_ca: bool = True,
    key_cert_sign: bool = True,
    path_length: int | None = 0,
    extended_key_usage: Sequence[x509.ObjectIdentifier] | None = None,
    name_constraints: x509.NameConstraints | None = None,
) -> CertKey:
    """An istiod signing CA like istio's intermediate.conf: CA:true pathlen:0, SAN istiod.istio-system.svc, AKI.

    `is_ca=False`, `key_cert_sign=False`, a past/future window, an `extended_key_usage` or `name_constraints`
    (added critical, as RFC 5280 asks) make the bad cases. `issuer` may itself be an intermediate (deeper chains).
    """
    key = make_key(key_type, bits)
    start, end = _window(not_before, not_after, days)
    builder = (
        _builder(_name(org, cn, cluster), issuer.cert.subject, key.public_key(), start, end)
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=path_length if is_ca else None), critical=True)
        .add_extension(_ca_key_usage(key_cert_sign), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("istiod.istio-system.svc")]), critical=False)
        .add_extension(_aki(issuer), critical=False)
    )
    if extended_key_usage is not None:
        builder = builder.add_extension(_eku(extended_key_usage), critical=False)
    if name_constraints is not None:
        builder = builder.add_extension(name_constraints, critical=True)
    cert = builder.sign(issuer.key, hashes.SHA256())
    return CertKey(cert, key, (issuer.cert, *issuer.chain))


def leaf_cert(
    issuer: CertKey,
    *,
    dns_names: Iterable[str] = ("localhost",),
    ip_addresses: Iterable[str] = ("127.0.0.1",),
    cn: str = "localhost",
    org: str = "Istio",
    key_type: str = "ec",
    bits: int = 2048,
    days: int = 365,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
    extended_key_usage: Sequence[x509.ObjectIdentifier] = (ExtendedKeyUsageOID.SERVER_AUTH,),
) -> CertKey:
    """A TLS server certificate (serverAuth, CA:false) for the `tls` bundle kind.

    `extended_key_usage=(ExtendedKeyUsageOID.CLIENT_AUTH,)` makes a client certificate (gateway MUTUAL mode).
    """
    key = make_key(key_type, bits)
    start, end = _window(not_before, not_after, days)
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns_names]
    sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in ip_addresses]
    cert = (
        _builder(_name(org, cn), issuer.cert.subject, key.public_key(), start, end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=True,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(_eku(extended_key_usage), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(_aki(issuer), critical=False)
        .sign(issuer.key, hashes.SHA256())
    )
    return CertKey(cert, key, (issuer.cert, *issuer.chain))


def _is_self_signed(cert: x509.Certificate) -> bool:
    return cert.issuer == cert.subject


def istio_ca_files(root: CertKey, intermediate: CertKey) -> dict[str, bytes]:
    """The four files istiod reads from ROOT_CA_DIR.

    cert-chain.pem is the intermediate then its issuers up to its own root (`cat ca-cert.pem root-cert.pem`);
    root-cert.pem is `root`, so passing a different root than the one that signed gives a bundle to refuse.
    """
    chain = [intermediate.cert, *intermediate.chain] if intermediate.chain else [intermediate.cert, root.cert]
    return {
        "ca-key.pem": intermediate.key_pem,
        "ca-cert.pem": intermediate.cert_pem,
        "root-cert.pem": root.cert_pem,
        "cert-chain.pem": pem_certs(*chain),
    }


def tls_files(leaf: CertKey, ca: CertKey) -> dict[str, bytes]:
    """kubernetes.io/tls files: tls.crt is the leaf plus any intermediates above it, ca.crt is `ca`'s cert."""
    intermediates = [c for c in leaf.chain if not _is_self_signed(c)]
    return {
        "tls.key": leaf.key_pem,
        "tls.crt": pem_certs(leaf.cert, *intermediates),
        "ca.crt": ca.cert_pem,
    }


def write_files(outdir: Path, files: dict[str, bytes]) -> None:
    """Write `files` into `outdir` (created if needed); key files get mode 0600."""
    outdir.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        path = outdir / name
        mode = 0o600 if name.endswith(("key.pem", ".key")) else 0o644
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: `python -m testbed.pki istio-ca OUTDIR [--cluster cluster1] [--rsa]` writes the four istiod files."""
    parser = argparse.ArgumentParser(prog="python -m testbed.pki", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    ca = sub.add_parser("istio-ca", help="write ca-key.pem, ca-cert.pem, root-cert.pem, cert-chain.pem")
    ca.add_argument("outdir", type=Path)
    ca.add_argument("--cluster", default="cluster1", help="L= of the intermediate (default cluster1)")
    ca.add_argument("--rsa", action="store_true", help="RSA keys instead of EC P-256")
    ca.add_argument("--bits", type=int, default=4096, help="RSA key size with --rsa (default 4096, as istio)")
    args = parser.parse_args(argv)

    key_type = "rsa" if args.rsa else "ec"
    root = root_ca(key_type=key_type, bits=args.bits)
    inter = intermediate_ca(root, cluster=args.cluster, key_type=key_type, bits=args.bits)
    files = istio_ca_files(root, inter)
    write_files(args.outdir, files)
    print(f"wrote {', '.join(sorted(files))} to {args.outdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
