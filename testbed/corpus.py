"""The differential corpus: bundles in every class istiod or pilot-agent treats specially, each with a name, a class and
a one-line description, for tests/test_differential.py (agent vs the Go oracle) and the hostile-input benchmark.

Classes: "ok" istiod loads it; "a" istiod refuses it; "b" istiod loads it but workloads would break, so the agent
refuses it; "c" istiod loads it and nothing breaks, the agent accepts it with a warning.
`python -m testbed.corpus OUTDIR` writes one directory per case plus manifest.json.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa, x25519

from testbed import rawcert as rc
from testbed.rawcert import DAY, NOW, Issued, cert, name

__all__ = ["CASES", "Case", "build", "catalog", "hostile", "main", "write"]


@dataclass(frozen=True)
class Case:
    """One corpus entry: its files and what we expect of istiod and of the agent."""

    name: str
    kind: str
    cls: str
    desc: str
    files: dict[str, bytes]
    ca_signs_cert: bool = True
    #: for class "b": the agent's check id that refuses it
    check: str = ""


@dataclass(frozen=True)
class _Spec:
    name: str
    kind: str
    cls: str
    desc: str
    make: Callable[[], dict[str, bytes]]
    ca_signs_cert: bool = True
    check: str = ""


_SPECS: list[_Spec] = []


def case(name: str, cls: str, desc: str, *, kind: str = "istio-ca", ca_signs_cert: bool = True,
         check: str = "") -> Callable[[Callable[[], dict[str, bytes]]], Callable[[], dict[str, bytes]]]:
    def register(fn: Callable[[], dict[str, bytes]]) -> Callable[[], dict[str, bytes]]:
        _SPECS.append(_Spec(name, kind, cls, desc, fn, ca_signs_cert, check))
        return fn

    return register


# ------------------------------------------------------------------------------------------------- building blocks

ISTIOD_SAN = rc.san(("dns", "istiod.istio-system.svc"))


def k(curve: ec.EllipticCurve | None = None) -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(curve or ec.SECP256R1())


_RSA: dict[int, rsa.RSAPrivateKey] = {}


def rsa_key(bits: int = 2048) -> rsa.RSAPrivateKey:
    """RSA keys are slow to make: one per size, shared by every case that needs that size."""
    if bits not in _RSA:
        _RSA[bits] = rsa.generate_private_key(65537, bits) if bits >= 1024 else rc.rsa_small_key(bits)
    return _RSA[bits]


def root(cn: str = "Root CA", key: rc.SignKey | None = None, **kw: object) -> Issued:
    return cert(name(("O", "Istio"), ("CN", cn)), key or k(), **kw)  # type: ignore[arg-type]


def inter(issuer: Issued, cn: str = "Intermediate CA", key: rc.SignKey | None = None, *, pathlen: int | None = 0,
          extra: tuple[rc.Ext, ...] = (), **kw: object) -> Issued:
    return cert(name(("O", "Istio"), ("CN", cn), ("L", "cluster1")), key or k(), issuer, pathlen=pathlen,
                extra=(ISTIOD_SAN, *extra), **kw)  # type: ignore[arg-type]


def files(ca: Issued, *, roots: list[Issued] | None = None, chain: list[Issued] | None = None,
          key: bytes | None = None, crl: bytes | None = None) -> dict[str, bytes]:
    """The four istiod files: chain defaults to ca-cert then its issuers up to the root (Makefile order)."""
    top = ca.chain[-1] if ca.chain else ca
    out = {
        "ca-key.pem": key if key is not None else ca.key_pem(),
        "ca-cert.pem": ca.pem,
        "root-cert.pem": b"".join(r.pem for r in (roots if roots is not None else [top])),
        "cert-chain.pem": b"".join(c.pem for c in (chain if chain is not None else [ca, *ca.chain])),
    }
    if crl is not None:
        out["ca-crl.pem"] = crl
    return out


def good() -> tuple[Issued, Issued]:
    r = root()
    return r, inter(r)


def relabel(pem_bytes: bytes, label: str) -> bytes:
    lines = pem_bytes.strip().split(b"\n")
    return b"\n".join([f"-----BEGIN {label}-----".encode(), *lines[1:-1], f"-----END {label}-----".encode()]) + b"\n"


def der_of(pem_bytes: bytes) -> bytes:
    return base64.b64decode(b"".join(pem_bytes.strip().split(b"\n")[1:-1]))


def leaf(issuer: Issued, *, not_before: dt.datetime | None = None, not_after: dt.datetime | None = None,
         key: rc.SignKey | None = None) -> Issued:
    return cert(name(("O", "Istio"), ("CN", "localhost")), key or k(), issuer, ca=False,
                ku=("digitalSignature", "keyEncipherment"),
                extra=(rc.eku("serverAuth"), rc.san(("dns", "localhost"), ("ip", "127.0.0.1"))),
                not_before=not_before, not_after=not_after or (not_before or NOW) + 365 * DAY)


# ================================================================================================= istio-ca: accepted


@case("ok-ec-p256", "ok", "Makefile.selfsigned.mk-shaped bundle, EC P-256")
def _ok_p256() -> dict[str, bytes]:
    return files(good()[1])


@case("ok-ec-p384", "ok", "EC P-384 root and intermediate (GenKeyCert then asks for a P-384 CSR)")
def _ok_p384() -> dict[str, bytes]:
    r = root(key=k(ec.SECP384R1()))
    return files(inter(r, key=k(ec.SECP384R1())))


@case("ok-ec-p521", "ok", "EC P-521 intermediate: Go signs with ECDSA-SHA512")
def _ok_p521() -> dict[str, bytes]:
    return files(inter(root(), key=k(ec.SECP521R1())))


@case("ok-rsa-pkcs8", "ok", "RSA 2048 intermediate, key in PKCS#8 (PRIVATE KEY)")
def _ok_rsa8() -> dict[str, bytes]:
    return files(inter(root(key=rsa_key(2048)), key=rsa_key(2048)))


@case("ok-rsa-pkcs1", "ok", "RSA 2048 intermediate, key in PKCS#1 (RSA PRIVATE KEY) as openssl genrsa writes it")
def _ok_rsa1() -> dict[str, bytes]:
    ca = inter(root(), key=rsa_key(2048))
    return files(ca, key=ca.key_pem("traditional"))


@case("ok-ec-sec1", "ok", "EC key in SEC1 (EC PRIVATE KEY) form")
def _ok_sec1() -> dict[str, bytes]:
    ca = good()[1]
    return files(ca, key=ca.key_pem("traditional"))


@case("ok-three-level", "ok", "root -> pathlen:1 mid CA -> istiod CA, full cert-chain.pem")
def _ok_three() -> dict[str, bytes]:
    mid = inter(root(), "Mid CA", pathlen=1)
    return files(inter(mid))


@case("ok-chain-reissued-ca", "ok",
      "cert-chain.pem holds an earlier issuance of ca-cert.pem (same subject and key, another serial), as istio's"
      " own testdata (security/pkg/pki/testdata/cert-chain.pem with multilevelpki/int2-cert.pem) and a rotation make")
def _ok_chain_reissued() -> dict[str, bytes]:
    r = root()
    key = k()
    earlier, current = inter(r, key=key, serial=1001), inter(r, key=key, serial=1002)
    return files(current, chain=[earlier, r])


@case("chain-reissued-ca-expired", "a",
      "cert-chain.pem starts with an expired earlier issuance of ca-cert.pem (same subject and key): istiod takes"
      " the chain's lifetime from its first certificate")
def _chain_reissued_expired() -> dict[str, bytes]:
    r = root()
    key = k()
    earlier = inter(r, key=key, serial=1003, not_before=NOW - 20 * DAY, not_after=NOW - DAY)
    return files(inter(r, key=key, serial=1004), chain=[earlier, r])


@case("ok-root-as-ca", "ok", "the root itself plugged in as istiod's CA (ca-cert.pem is in root-cert.pem)")
def _ok_root_as_ca() -> dict[str, bytes]:
    r = root()
    return files(r, chain=[r])


@case("ok-multi-root", "ok", "root-cert.pem holds two roots (rotation A -> A+B)")
def _ok_multi() -> dict[str, bytes]:
    r, ca = good()
    return files(ca, roots=[root("Root B"), r])


@case("ok-eku-server-client", "ok", "intermediate EKU serverAuth+clientAuth")
def _ok_eku() -> dict[str, bytes]:
    return files(inter(root(), extra=(rc.eku("serverAuth", "clientAuth"),)))


@case("eku-any-only-ca", "b",
      "ca-cert.pem EKU anyExtendedKeyUsage only: Go accepts it, Envoy wants serverAuth/clientAuth on every CA "
      "below the anchor", check="workload-eku-client-auth")
def _ok_eku_any() -> dict[str, bytes]:
    return files(inter(root(), extra=(rc.eku("any"),)))


@case("ok-rsa-pss", "ok", "intermediate signed with RSASSA-PSS SHA-256 by an RSA root")
def _ok_pss() -> dict[str, bytes]:
    return files(inter(root(key=rsa_key(2048)), alg="pss256"))


@case("ok-v1-root", "ok", "a v1 root (no extensions): Go trusts it, CheckSignatureFrom only demands CA on v3")
def _ok_v1_root() -> dict[str, bytes]:
    r = cert(name(("O", "Istio"), ("CN", "V1 Root")), k(), version=None)
    return files(inter(r))


@case("ok-rsa-1024-root", "ok", "RSA 1024 root: Go's minimum, still allowed")
def _ok_rsa1024() -> dict[str, bytes]:
    return files(inter(root(key=rsa_key(1024))))


@case("ok-sha1-root", "ok", "root self-signed with SHA-1: Go never checks a root's own signature")
def _ok_sha1_root() -> dict[str, bytes]:
    r = root(key=rsa_key(2048), alg="sha1")
    return files(inter(r))


@case("ok-serial-zero", "ok", "intermediate with serial number 0 (Go only refuses negative ones)")
def _ok_serial0() -> dict[str, bytes]:
    return files(inter(root(), serial=0))


@case("ok-serial-long", "ok", "intermediate with a 40-byte serial number (Go has no length limit)")
def _ok_serial_long() -> dict[str, bytes]:
    return files(inter(root(), serial=(1 << 319) + 12345))


@case("ok-generalized-time", "ok", "validity encoded as GeneralizedTime before 2050 (Go accepts either)")
def _ok_gentime() -> dict[str, bytes]:
    start, end = NOW - DAY, NOW + 3650 * DAY
    return files(inter(root(), validity=rc.seq(rc.gentime(start), rc.gentime(end))))


@case("cert-utctime-offset", "b",
      "ca-cert.pem's notBefore is a UTCTime with a +0100 offset: Go accepts it, BoringSSL cannot compare it",
      check="workload-time-encoding")
def _ok_utc_offset() -> dict[str, bytes]:
    start = (NOW - DAY).astimezone(dt.timezone(dt.timedelta(hours=1)))
    nb = rc.tlv(0x17, start.strftime("%y%m%d%H%M%S+0100").encode())
    return files(inter(root(), validity=rc.seq(nb, rc.utctime(NOW + 3650 * DAY))))


@case("ok-noncritical-unknown-ext", "ok", "intermediate with an unknown non-critical extension")
def _ok_unknown_ext() -> dict[str, bytes]:
    return files(inter(root(), extra=(rc.generic("1.3.6.1.4.1.99999.1"),)))


@case("ok-nc-permitted-svc", "ok", "mid CA name constraints permit DNS svc, which covers istiod.istio-system.svc")
def _ok_nc_svc() -> dict[str, bytes]:
    mid = inter(root(), "Mid CA", pathlen=1, extra=(rc.name_constraints([("dns", "svc")]),))
    return files(inter(mid))


@case("nc-dirname-noncritical", "b",
      "mid CA permits only directoryName CN=Somewhere (non-critical): Go ignores it, BoringSSL applies it to "
      "ca-cert.pem",
      check="workload-name-constraints")
def _ok_nc_dir() -> dict[str, bytes]:
    nc = rc.name_constraints([("dir", "Somewhere")], critical=False)
    mid = inter(root(), "Mid CA", pathlen=1, extra=(nc,))
    return files(inter(mid))


@case("nc-on-ca-excludes-istiod", "b",
      "ca-cert.pem's own name constraints exclude its own SAN: istiod loads it (they bind only below it), but the"
      " serving certificate istiod signs for istiod.istio-system.svc is below it", check="istiod-serving-cert")
def _nc_self() -> dict[str, bytes]:
    return files(inter(root(), extra=(rc.name_constraints([], [("dns", "istio-system.svc")]),)))


@case("ok-nc-email", "ok", "root permits only an email domain; ca-cert.pem has no email names")
def _ok_nc_email() -> dict[str, bytes]:
    r = root(extra=(rc.name_constraints([("email", "example.com")]),))
    return files(inter(r))


@case("policy-explicit-workloads-without", "b",
      "mid CA requireExplicitPolicy=0 and the CAs below assert that policy: workload certificates carry no policy",
      check="workload-policy")
def _ok_policy() -> dict[str, bytes]:
    p = "1.3.6.1.4.1.99999.7"
    mid = inter(root(), "Mid CA", pathlen=1, extra=(rc.cert_policies(p), rc.policy_constraints(require=0)))
    return files(inter(mid, extra=(rc.cert_policies(p),)))


@case("ok-policy-mapping", "ok", "mid CA maps one policy to another, as RFC 5280 allows")
def _ok_mapping() -> dict[str, bytes]:
    a, b = "1.3.6.1.4.1.99999.7", "1.3.6.1.4.1.99999.8"
    mid = inter(root(), "Mid CA", pathlen=1, extra=(rc.cert_policies(a), rc.policy_mappings((a, b))))
    return files(inter(mid, extra=(rc.cert_policies(b),)))


@case("ok-same-name-roots", "ok", "root-cert.pem also holds a same-name root with another key; Go tries both")
def _ok_lookalike() -> dict[str, bytes]:
    r, ca = good()
    return files(ca, roots=[root(), r])


@case("ok-chain-without-root", "ok", "cert-chain.pem is just ca-cert.pem: workloads get the root from root-cert.pem")
def _ok_chain_no_root() -> dict[str, bytes]:
    ca = good()[1]
    return files(ca, chain=[ca])


@case("ok-ec-embedded-pubkey-mismatch", "ok",
      "SEC1 key whose optional embedded public key is another key's: Go ignores it")
def _ok_sec1_pub() -> dict[str, bytes]:
    ca = good()[1]
    assert isinstance(ca.key, ec.EllipticCurvePrivateKey)
    d = ca.key.private_numbers().private_value.to_bytes(32, "big")
    other = k().public_key().public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    der = rc.seq(rc.integer(1), rc.octet(d), rc.tlv(0xA0, rc.oid("1.2.840.10045.3.1.7")),
                 rc.tlv(0xA1, rc.bitstring(other)))
    return files(ca, key=rc.pem("EC PRIVATE KEY", der))


# --------------------------------------------------------------------------------------------- PEM details


@case("pem-crlf", "ok", "every file with CRLF line endings")
def _pem_crlf() -> dict[str, bytes]:
    return {n: v.replace(b"\n", b"\r\n") for n, v in files(good()[1]).items()}


@case("pem-trailing-spaces", "ok", "trailing spaces and tabs on BEGIN, body and END lines (Go trims them)")
def _pem_spaces() -> dict[str, bytes]:
    return {n: v.replace(b"\n", b" \t\n") for n, v in files(good()[1]).items()}


@case("pem-no-final-newline", "ok", "cert-chain.pem and root-cert.pem without a final newline")
def _pem_no_nl() -> dict[str, bytes]:
    f = files(good()[1])
    f["cert-chain.pem"] = f["cert-chain.pem"].rstrip(b"\n")
    f["root-cert.pem"] = f["root-cert.pem"].rstrip(b"\n")
    return f


@case("pem-text-around", "ok", "openssl x509 -text style prose before and after the PEM blocks")
def _pem_text() -> dict[str, bytes]:
    f = files(good()[1])
    return {n: b"Certificate:\n    Data: something\n" + v + b"trailing words\n" for n, v in f.items()}


@case("pem-repeated-begin", "ok", "200 unmatched BEGIN lines before ca-cert.pem's block (Go takes the last BEGIN)")
def _pem_repeat() -> dict[str, bytes]:
    f = files(good()[1])
    f["ca-cert.pem"] = b"-----BEGIN CERTIFICATE-----\n" * 200 + f["ca-cert.pem"]
    return f


@case("pem-indented-begin", "a", "ca-cert.pem's BEGIN line is indented: Go's pem.Decode finds no block")
def _pem_indent() -> dict[str, bytes]:
    f = files(good()[1])
    f["ca-cert.pem"] = b"  " + f["ca-cert.pem"]
    return f


@case("pem-end-label-mismatch", "a", "ca-cert.pem BEGIN CERTIFICATE but END X509 CERTIFICATE")
def _pem_end() -> dict[str, bytes]:
    f = files(good()[1])
    f["ca-cert.pem"] = f["ca-cert.pem"].replace(b"END CERTIFICATE", b"END X509 CERTIFICATE")
    return f


@case("pem-bad-base64-ca", "a", "ca-cert.pem body is not base64")
def _pem_b64() -> dict[str, bytes]:
    f = files(good()[1])
    f["ca-cert.pem"] = f["ca-cert.pem"].replace(b"M", b"!", 3)
    return f


@case("pem-bad-padding-ca", "a", "ca-cert.pem body loses its final base64 character (bad length)")
def _pem_pad() -> dict[str, bytes]:
    f = files(good()[1])
    lines = f["ca-cert.pem"].split(b"\n")
    lines[-3] = lines[-3][:-1]
    f["ca-cert.pem"] = b"\n".join(lines)
    return f


@case("pem-trusted-certificate-label", "a",
      "ca-cert.pem labelled TRUSTED CERTIFICATE: ParsePemEncodedCertificate reads it, tls.X509KeyPair does not")
def _pem_trusted() -> dict[str, bytes]:
    f = files(good()[1])
    f["ca-cert.pem"] = relabel(f["ca-cert.pem"], "TRUSTED CERTIFICATE")
    return f


@case("pem-headers-on-root", "a", "root-cert.pem's block carries an RFC 1421 header: AppendCertsFromPEM skips it")
def _pem_hdr_root() -> dict[str, bytes]:
    r, ca = good()
    f = files(ca)
    f["root-cert.pem"] = rc.pem("CERTIFICATE", r.der, [("Comment", "root")])
    return f


@case("pem-headers-on-ca-cert", "ok", "ca-cert.pem's block carries a header: istiod's parsers ignore headers")
def _pem_hdr_ca() -> dict[str, bytes]:
    ca = good()[1]
    f = files(ca)
    f["ca-cert.pem"] = rc.pem("CERTIFICATE", ca.der, [("Comment", "intermediate")])
    return f


@case("pem-ca-cert-two-blocks", "c", "ca-cert.pem holds the intermediate then the root: istiod reads the first")
def _pem_two() -> dict[str, bytes]:
    r, ca = good()
    f = files(ca)
    f["ca-cert.pem"] = ca.pem + r.pem
    return f


@case("pem-root-other-block-first", "c", "root-cert.pem starts with a PUBLIC KEY block, which AppendCertsFromPEM skips")
def _pem_root_other() -> dict[str, bytes]:
    r, ca = good()
    f = files(ca)
    f["root-cert.pem"] = rc.pem("PUBLIC KEY", r.spki) + r.pem
    return f


@case("pem-chain-other-block-first", "a",
      "cert-chain.pem starts with an EC PARAMETERS block: startup's minTTL parses the first block as a certificate")
def _pem_chain_first() -> dict[str, bytes]:
    f = files(good()[1])
    f["cert-chain.pem"] = b"-----BEGIN EC PARAMETERS-----\nBggqhkjOPQMBBw==\n-----END EC PARAMETERS-----\n" + f[
        "cert-chain.pem"]
    return f


@case("pem-chain-other-block-last", "c", "cert-chain.pem ends with a PUBLIC KEY block, which istiod skips")
def _pem_chain_last() -> dict[str, bytes]:
    r, ca = good()
    f = files(ca)
    f["cert-chain.pem"] += rc.pem("PUBLIC KEY", r.spki)
    return f


@case("pem-chain-private-key", "b", "cert-chain.pem carries a PRIVATE KEY block: istiod sends it to every workload",
      check="key-in-public-file")
def _pem_chain_key() -> dict[str, bytes]:
    ca = good()[1]
    f = files(ca)
    f["cert-chain.pem"] += ca.key_pem()
    return f


@case("pem-root-private-key", "b", "root-cert.pem carries an EC PRIVATE KEY block: it is the mesh's trust bundle",
      check="key-in-public-file")
def _pem_root_key() -> dict[str, bytes]:
    r, ca = good()
    f = files(ca)
    f["root-cert.pem"] = r.pem + r.key_pem("traditional")
    return f


@case("pem-root-corrupt-extra", "b",
      "root-cert.pem: a good root plus a CERTIFICATE block whose DER is garbage (Go skips it, Envoy cannot)",
      check="unparsable-cert-for-envoy")
def _pem_root_garbage() -> dict[str, bytes]:
    r, ca = good()
    f = files(ca)
    f["root-cert.pem"] = r.pem + rc.pem("CERTIFICATE", b"\x30\x03\x02\x01\x00")
    return f


@case("pem-chain-corrupt-extra", "b", "cert-chain.pem: the chain plus a CERTIFICATE block whose DER is garbage",
      check="unparsable-cert-for-envoy")
def _pem_chain_garbage() -> dict[str, bytes]:
    f = files(good()[1])
    f["cert-chain.pem"] += rc.pem("CERTIFICATE", b"\x30\x03\x02\x01\x00")
    return f


@case("pem-chain-whitespace-only", "a", "cert-chain.pem is a newline: startup's minTTL finds no PEM block in it")
def _pem_chain_ws() -> dict[str, bytes]:
    f = files(good()[1])
    f["cert-chain.pem"] = b"\n"
    return f


@case("pem-chain-empty", "b", "cert-chain.pem is empty: istiod loads it, workloads get no intermediate",
      check="chain-lacks-ca-cert")
def _pem_chain_empty() -> dict[str, bytes]:
    f = files(good()[1])
    f["cert-chain.pem"] = b""
    return f


@case("missing-root-cert", "a", "root-cert.pem absent: incomplete signing CA bundle")
def _missing_root() -> dict[str, bytes]:
    f = files(good()[1])
    del f["root-cert.pem"]
    return f


@case("missing-ca-key", "a", "ca-key.pem absent: incomplete signing CA bundle")
def _missing_key() -> dict[str, bytes]:
    f = files(good()[1])
    del f["ca-key.pem"]
    return f


@case("empty-ca-key", "a", "ca-key.pem is empty")
def _empty_key() -> dict[str, bytes]:
    f = files(good()[1])
    f["ca-key.pem"] = b""
    return f


@case("files-swapped", "a", "ca-key.pem and ca-cert.pem swapped")
def _swapped() -> dict[str, bytes]:
    f = files(good()[1])
    f["ca-key.pem"], f["ca-cert.pem"] = f["ca-cert.pem"], f["ca-key.pem"]
    return f


# --------------------------------------------------------------------------------------------- keys


def _key_case(label: str, body: Callable[[Issued], bytes]) -> Callable[[], dict[str, bytes]]:
    def make() -> dict[str, bytes]:
        ca = good()[1]
        return files(ca, key=rc.pem(label, body(ca)))

    return make


def _pkcs8(ca: Issued) -> bytes:
    return der_of(ca.key_pem("pkcs8"))


def _sec1(ca: Issued) -> bytes:
    return der_of(ca.key_pem("traditional"))


case("key-label-ec-holds-pkcs8", "a", "EC PRIVATE KEY label around a PKCS#8 body: ParseECPrivateKey refuses it")(
    _key_case("EC PRIVATE KEY", _pkcs8))
case("key-label-pkcs8-holds-sec1", "a", "PRIVATE KEY label around a SEC1 body: ParsePKCS8PrivateKey refuses it")(
    _key_case("PRIVATE KEY", _sec1))
case("key-label-unknown", "a", "the key block is labelled PRIVATE KEY DATA, which ParsePemEncodedKey does not know")(
    _key_case("PRIVATE KEY DATA", _pkcs8))


@case("key-label-rsa-holds-pkcs8", "a", "RSA PRIVATE KEY label around a PKCS#8 body")
def _key_rsa_pkcs8() -> dict[str, bytes]:
    ca = inter(root(), key=rsa_key(2048))
    return files(ca, key=relabel(ca.key_pem("pkcs8"), "RSA PRIVATE KEY"))


@case("key-label-pkcs8-holds-pkcs1", "a", "PRIVATE KEY label around a PKCS#1 RSA body")
def _key_pkcs8_pkcs1() -> dict[str, bytes]:
    ca = inter(root(), key=rsa_key(2048))
    return files(ca, key=relabel(ca.key_pem("traditional"), "PRIVATE KEY"))


@case("key-encrypted-pkcs8", "a", "ENCRYPTED PRIVATE KEY: istiod cannot decrypt it")
def _key_enc8() -> dict[str, bytes]:
    ca = good()[1]
    enc = ca.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                               serialization.BestAvailableEncryption(b"hunter22"))
    return files(ca, key=enc)


@case("key-encrypted-legacy", "a", "legacy Proc-Type: 4,ENCRYPTED EC PRIVATE KEY")
def _key_enc_legacy() -> dict[str, bytes]:
    ca = good()[1]
    enc = ca.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                               serialization.BestAvailableEncryption(b"hunter22"))
    return files(ca, key=enc)


@case("key-ec-parameters-first", "a", "openssl ecparam -genkey output: EC PARAMETERS block before the key")
def _key_params() -> dict[str, bytes]:
    ca = good()[1]
    params = b"-----BEGIN EC PARAMETERS-----\nBggqhkjOPQMBBw==\n-----END EC PARAMETERS-----\n"
    return files(ca, key=params + ca.key_pem("traditional"))


@case("key-twice", "c", "ca-key.pem holds the same key twice: istiod reads the first block")
def _key_twice() -> dict[str, bytes]:
    ca = good()[1]
    return files(ca, key=ca.key_pem() * 2)


@case("key-trailing-cert", "c", "ca-key.pem holds the key then ca-cert.pem's certificate")
def _key_trailing() -> dict[str, bytes]:
    ca = good()[1]
    return files(ca, key=ca.key_pem() + ca.pem)


@case("key-mismatch", "a", "ca-key.pem from another issuance: tls.X509KeyPair refuses it")
def _key_mismatch() -> dict[str, bytes]:
    r, ca = good()
    return files(ca, key=inter(r).key_pem())


@case("key-ed25519", "c", "Ed25519 intermediate (signed by an EC root): Go signs workload certificates with it")
def _key_ed25519() -> dict[str, bytes]:
    return files(inter(root(), key=ed25519.Ed25519PrivateKey.generate()))


@case("key-ed25519-for-ec-cert", "a", "an Ed25519 key beside an EC certificate")
def _key_ed_mismatch() -> dict[str, bytes]:
    ca = good()[1]
    key = ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return files(ca, key=key)


@case("key-x25519", "a", "an X25519 PKCS#8 key: ParsePemEncodedKey accepts it, tls.X509KeyPair does not")
def _key_x25519() -> dict[str, bytes]:
    ca = good()[1]
    key = x25519.X25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return files(ca, key=key)


def _rsa_variant(change: Callable[[dict[str, int]], None]) -> Callable[[], dict[str, bytes]]:
    """An RSA 2048 bundle whose PKCS#1 key has one number changed (encoded by hand: OpenSSL refuses some)."""
    def make() -> dict[str, bytes]:
        ca = inter(root(), key=rsa_key(2048))
        assert isinstance(ca.key, rsa.RSAPrivateKey)
        n = ca.key.private_numbers()
        v = {"n": n.public_numbers.n, "e": n.public_numbers.e, "d": n.d, "p": n.p, "q": n.q, "dp": n.dmp1,
             "dq": n.dmq1, "qinv": n.iqmp}
        change(v)
        fields = ("n", "e", "d", "p", "q", "dp", "dq", "qinv")
        der = rc.seq(rc.integer(v.get("version", 0)), *(rc.integer(v[f]) for f in fields if f in v))
        return files(ca, key=rc.pem("RSA PRIVATE KEY", der))

    return make


def _set(**kw: Callable[[dict[str, int]], int]) -> Callable[[dict[str, int]], None]:
    def change(v: dict[str, int]) -> None:
        for f, fn in kw.items():
            v[f] = fn(v)

    return change


case("rsa-bad-d", "a", "RSA key whose d does not fit its primes")(_rsa_variant(_set(d=lambda v: v["d"] + 2)))
case("rsa-bad-dp", "a", "RSA key with a wrong CRT exponent dP (Go 1.24+ checks it)")(
    _rsa_variant(_set(dp=lambda v: v["dp"] + 2)))
case("rsa-bad-qinv", "a", "RSA key with a wrong CRT coefficient qInv")(
    _rsa_variant(_set(qinv=lambda v: (v["qinv"] + 1) % v["p"])))
case("rsa-d-too-big", "a", "RSA key whose d is larger than n")(_rsa_variant(_set(d=lambda v: v["d"] + v["n"])))
case("rsa-no-crt", "ok", "PKCS#1 key without the optional CRT values after q: Go computes them")(
    _rsa_variant(lambda v: [v.pop(f) for f in ("dp", "dq", "qinv")] and None))
case("rsa-version-2", "a", "PKCS#1 key with version 2")(_rsa_variant(_set(version=lambda v: 2)))


@case("rsa-close-primes", "a", "RSA 1024 key whose primes are neighbours: Go refuses |p - q| too small")
def _rsa_close() -> dict[str, bytes]:
    return files(inter(root(), key=rc.rsa_small_key(1024, close_primes=True)))


@case("rsa-huge-exponent", "a", "RSA key with e = 2^32 + 15: Go caps e at 2^31 - 1")
def _rsa_big_e() -> dict[str, bytes]:
    return files(inter(root(), key=rc.rsa_small_key(1024, e=(1 << 32) + 15)))


@case("rsa-exponent-3", "ok", "RSA 2048 key with e = 3, which Go accepts")
def _rsa_e3() -> dict[str, bytes]:
    return files(inter(root(), key=rc.rsa_small_key(2048, e=3)))


@case("rsa-512-ca-key", "a", "RSA 512 istiod CA key: parses and matches, but Go refuses to sign with it")
def _rsa512_ca() -> dict[str, bytes]:
    return files(inter(root(), key=rsa_key(512)))


@case("rsa-768-root", "a", "RSA 768 root: Go refuses to verify its signature on the intermediate")
def _rsa768_root() -> dict[str, bytes]:
    return files(inter(root(key=rsa_key(768))))


@case("ec-p224-ca-key", "c", "P-224 istiod CA key: Go verifies and signs with it (weak, but it works)")
def _p224() -> dict[str, bytes]:
    return files(inter(root(), key=k(ec.SECP224R1())))


@case("ec-secp256k1-ca", "a", "secp256k1 intermediate: Go does not know the curve")
def _k1() -> dict[str, bytes]:
    return files(inter(root(), key=k(ec.SECP256K1())))


@case("ec-key-scalar-zero", "a", "SEC1 key whose private scalar is zero")
def _ec_zero() -> dict[str, bytes]:
    ca = good()[1]
    der = rc.seq(rc.integer(1), rc.octet(bytes(32)), rc.tlv(0xA0, rc.oid("1.2.840.10045.3.1.7")))
    return files(ca, key=rc.pem("EC PRIVATE KEY", der))


@case("ec-compressed-point", "a", "intermediate's public key is a compressed EC point, which Go's parser refuses")
def _ec_compressed() -> dict[str, bytes]:
    key = k()
    point = key.public_key().public_bytes(serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint)
    spki = rc.seq(rc.seq(rc.oid("1.2.840.10045.2.1"), rc.oid("1.2.840.10045.3.1.7")), rc.bitstring(point))
    return files(inter(root(), key=key, spki=spki))


# --------------------------------------------------------------------------------------------- certificate parsing


@case("cert-negative-serial-ca", "a", "ca-cert.pem with a negative serial number (refused by Go since 1.23)")
def _neg_ca() -> dict[str, bytes]:
    return files(inter(root(), serial=-12345))


@case("cert-negative-serial-extra-root", "c", "an extra root with a negative serial: Go's pool skips it")
def _neg_extra() -> dict[str, bytes]:
    r, ca = good()
    return files(ca, roots=[r, root("Old Root", serial=-7)])


@case("cert-negative-serial-root", "a", "the only root has a negative serial")
def _neg_root() -> dict[str, bytes]:
    return files(inter(root(serial=-7)))


@case("cert-negative-serial-mid", "a", "the mid CA in cert-chain.pem has a negative serial, so no chain builds")
def _neg_mid() -> dict[str, bytes]:
    return files(inter(inter(root(), "Mid CA", pathlen=1, serial=-99)))


@case("cert-serial-non-minimal", "a", "ca-cert.pem serial encoded with a redundant leading zero byte")
def _serial_nonmin() -> dict[str, bytes]:
    return files(inter(root(), serial_raw=b"\x00\x01\x02"))


@case("cert-duplicate-extension-ca", "a", "ca-cert.pem repeats the SAN extension")
def _dup_ca() -> dict[str, bytes]:
    return files(inter(root(), extra=(ISTIOD_SAN,)))


@case("cert-duplicate-extension-extra-root", "c", "an extra root repeating an extension, which Go skips")
def _dup_extra() -> dict[str, bytes]:
    r, ca = good()
    return files(ca, roots=[r, root("Dup Root", extra=(rc.generic("1.3.6.1.4.1.99999.1"),) * 2)])


@case("cert-critical-unknown-ca", "a", "ca-cert.pem carries an unknown critical extension")
def _crit_ca() -> dict[str, bytes]:
    return files(inter(root(), extra=(rc.generic("1.3.6.1.4.1.99999.1", critical=True),)))


@case("cert-critical-unknown-root", "a", "the root carries an unknown critical extension")
def _crit_root() -> dict[str, bytes]:
    return files(inter(root(extra=(rc.generic("1.3.6.1.4.1.99999.1", critical=True),))))


@case("cert-critical-unknown-mid", "a", "the mid CA carries an unknown critical extension")
def _crit_mid() -> dict[str, bytes]:
    mid = inter(root(), "Mid CA", pathlen=1, extra=(rc.generic("1.3.6.1.4.1.99999.1", critical=True),))
    return files(inter(mid))


@case("cert-critical-ski", "a", "ca-cert.pem marks its subjectKeyIdentifier critical (Go's parser refuses)")
def _crit_ski() -> dict[str, bytes]:
    r = root()
    key = k()
    kid = rc.key_id(rc.spki_of(key))
    exts = [rc.basic_constraints(True, 0), rc.key_usage(*rc.CA_KU), rc.ski(kid, critical=True), rc.aki(r.keyid or b"")]
    return files(inter(r, key=key, exts=exts))


@case("cert-critical-aki", "a", "ca-cert.pem marks its authorityKeyIdentifier critical")
def _crit_aki() -> dict[str, bytes]:
    r = root()
    exts = [rc.basic_constraints(True, 0), rc.key_usage(*rc.CA_KU), rc.aki(r.keyid or b"", critical=True)]
    return files(inter(r, exts=exts))


@case("cert-critical-san-othername", "a", "a critical SAN holding only an otherName: nothing Go parses, so unhandled")
def _crit_san() -> dict[str, bytes]:
    return _with_san(rc.san(("other", "x"), critical=True))


@case("cert-critical-nc-dirname", "a", "critical name constraints of directoryName type only: unhandled by Go")
def _crit_nc_dir() -> dict[str, bytes]:
    mid = inter(root(), "Mid CA", pathlen=1, extra=(rc.name_constraints([("dir", "Somewhere")]),))
    return files(inter(mid))


@case("cert-root-v3-no-basic-constraints", "a", "a v3 root without basicConstraints may not verify signatures")
def _root_no_bc() -> dict[str, bytes]:
    key = k()
    kid = rc.key_id(rc.spki_of(key))
    r = cert(name(("O", "Istio"), ("CN", "Root CA")), key, exts=[rc.key_usage(*rc.CA_KU), rc.ski(kid)])
    return files(inter(r))


@case("cert-v1-mid", "a", "a v1 mid CA: Go requires basicConstraints on intermediates")
def _v1_mid() -> dict[str, bytes]:
    mid = cert(name(("O", "Istio"), ("CN", "Mid CA")), k(), root(), version=None)
    return files(inter(mid))


@case("cert-version-4", "a", "ca-cert.pem claims version 4")
def _v4() -> dict[str, bytes]:
    return files(inter(root(), version=3))


@case("cert-trailing-data", "a", "ca-cert.pem's DER has a byte after the certificate")
def _trailing() -> dict[str, bytes]:
    ca = inter(root(), der_suffix=b"\x00")
    return files(ca)


@case("cert-tbs-trailing-data", "b",
      "bytes after the extensions inside ca-cert.pem's TBS: Go's parser ignores them, BoringSSL refuses the "
      "certificate",
      check="unparsable-cert-for-envoy")
def _tbs_trailing() -> dict[str, bytes]:
    return files(inter(root(), tbs_suffix=rc.tlv(0x04, b"x")))


@case("cert-sigalg-mismatch", "a", "ca-cert.pem's outer signature algorithm differs from the TBS one")
def _sigalg() -> dict[str, bytes]:
    return files(inter(root(), outer_alg=rc.seq(rc.oid("1.2.840.10045.4.3.3"))))


@case("cert-utctime-plus-zero", "a", "UTCTime written with +0000 instead of Z (Go's round trip refuses it)")
def _utc0() -> dict[str, bytes]:
    nb = rc.tlv(0x17, (NOW - DAY).strftime("%y%m%d%H%M%S+0000").encode())
    return files(inter(root(), validity=rc.seq(nb, rc.utctime(NOW + 3650 * DAY))))


@case("cert-utctime-no-seconds", "b",
      "ca-cert.pem's notBefore is a UTCTime without seconds: Go accepts it, BoringSSL refuses the certificate",
      check="unparsable-cert-for-envoy")
def _utc_min() -> dict[str, bytes]:
    nb = rc.tlv(0x17, (NOW - DAY).strftime("%y%m%d%H%MZ").encode())
    return files(inter(root(), validity=rc.seq(nb, rc.utctime(NOW + 3650 * DAY))))


@case("cert-gentime-fraction", "a", "GeneralizedTime with fractional seconds")
def _gen_frac() -> dict[str, bytes]:
    nb = rc.tlv(0x18, (NOW - DAY).strftime("%Y%m%d%H%M%S.5Z").encode())
    return files(inter(root(), validity=rc.seq(nb, rc.utctime(NOW + 3650 * DAY))))


@case("cert-bad-printable-string", "a", "ca-cert.pem's subject has '@' in a PrintableString")
def _printable() -> dict[str, bytes]:
    r = root()
    ca = cert(name(("O", "Istio"), ("CN", "ops@example", 0x13)), k(), r, pathlen=0, extra=(ISTIOD_SAN,))
    return files(ca)


@case("cert-printable-star-amp", "ok", "PrintableString with '*' and '&', which Go tolerates")
def _printable_ok() -> dict[str, bytes]:
    r = root()
    ca = cert(name(("O", "Istio & Co", 0x13), ("CN", "*.mesh", 0x13)), k(), r, pathlen=0, extra=(ISTIOD_SAN,))
    return files(ca)


@case("cert-bad-utf8", "a", "ca-cert.pem's subject CN is invalid UTF-8")
def _utf8() -> dict[str, bytes]:
    r = root()
    bad = rc.seq(rc.oid("2.5.4.3"), rc.tlv(0x0C, b"\xff\xfe"))
    ca = cert(name(("O", "Istio"), bad), k(), r, pathlen=0, extra=(ISTIOD_SAN,))
    return files(ca)


@case("cert-bmpstring-name", "ok", "a BMPString subject attribute, which Go decodes")
def _bmp() -> dict[str, bytes]:
    r = root()
    attr = rc.seq(rc.oid("2.5.4.11"), rc.tlv(0x1E, "Mesh".encode("utf-16-be")))
    return files(cert(name(("O", "Istio"), attr, ("CN", "Intermediate CA")), k(), r, pathlen=0, extra=(ISTIOD_SAN,)))


@case("cert-san-dns-not-ia5", "a", "ca-cert.pem SAN dNSName with a byte over 0x7f")
def _san_ia5() -> dict[str, bytes]:
    return _with_san(rc.san(("dns", b"istiod\xc3\xa9.svc")))


def _with_san(san_ext: rc.Ext, issuer: Issued | None = None) -> dict[str, bytes]:
    r = issuer or root()
    exts = [rc.basic_constraints(True, 0), rc.key_usage(*rc.CA_KU), rc.aki(r.keyid or b""), san_ext]
    return files(cert(name(("O", "Istio"), ("CN", "Intermediate CA")), k(), r, exts=exts))


@case("cert-san-uri-spiffe", "ok", "ca-cert.pem SAN URI spiffe://cluster.local/ns/istio-system/sa/istiod")
def _san_uri() -> dict[str, bytes]:
    return _with_san(rc.san(("uri", "spiffe://cluster.local/ns/istio-system/sa/istiod")))


@case("cert-san-uri-bad-escape", "a", "SAN URI with an invalid percent escape: url.Parse refuses it")
def _san_uri_esc() -> dict[str, bytes]:
    return _with_san(rc.san(("uri", "spiffe://cluster.local/ns/%zz")))


@case("cert-san-uri-no-scheme", "a", "SAN URI starting with a colon: missing protocol scheme")
def _san_uri_scheme() -> dict[str, bytes]:
    return _with_san(rc.san(("uri", "://cluster.local/x")))


@case("cert-san-uri-space-in-host", "a", "SAN URI with a space in its host")
def _san_uri_space() -> dict[str, bytes]:
    return _with_san(rc.san(("uri", "spiffe://cluster local/x")))


@case("cert-san-uri-trailing-dot-host", "a", "SAN URI whose host ends with a dot: Go's domainNameValid refuses it")
def _san_uri_dot() -> dict[str, bytes]:
    return _with_san(rc.san(("uri", "spiffe://cluster.local./x")))


@case("cert-san-ip-5-bytes", "a", "SAN iPAddress of 5 bytes")
def _san_ip5() -> dict[str, bytes]:
    return _with_san(rc.san(("ip", b"\x0a\x00\x00\x01\x02")))


@case("cert-san-ip-v4-mapped", "a", "SAN iPAddress is an IPv4-mapped IPv6 address")
def _san_ip_mapped() -> dict[str, bytes]:
    return _with_san(rc.san(("ip", b"\x00" * 10 + b"\xff\xff\x0a\x00\x00\x01")))


@case("cert-san-email", "ok", "ca-cert.pem SAN with an email address")
def _san_email() -> dict[str, bytes]:
    return _with_san(rc.san(("dns", "istiod.istio-system.svc"), ("email", "mesh@example.com")))


@case("cert-bc-pathlen-negative", "a", "basicConstraints pathLenConstraint of -1")
def _bc_neg() -> dict[str, bytes]:
    r = root()
    bc = rc.Ext("2.5.29.19", rc.seq(rc.boolean(True), rc.integer(-1)), True)
    return files(inter(r, exts=[bc, rc.key_usage(*rc.CA_KU), rc.aki(r.keyid or b"")]))


@case("cert-bc-boolean-not-der", "a", "basicConstraints cA encoded as 0x01 instead of 0xff")
def _bc_bool() -> dict[str, bytes]:
    r = root()
    bc = rc.Ext("2.5.29.19", rc.seq(rc.tlv(0x01, b"\x01")), True)
    return files(inter(r, exts=[bc, rc.key_usage(*rc.CA_KU), rc.aki(r.keyid or b"")]))


@case("cert-ku-bad-padding", "a", "keyUsage BIT STRING with non-zero padding bits")
def _ku_pad() -> dict[str, bytes]:
    r = root()
    ku = rc.Ext("2.5.29.15", rc.tlv(0x03, b"\x01\x87"), True)
    return files(inter(r, exts=[rc.basic_constraints(True, 0), ku, rc.aki(r.keyid or b"")]))


# --------------------------------------------------------------------------------------------- EKU, KU, CA flags


@case("eku-client-only-ca", "a", "ca-cert.pem EKU clientAuth only: Go's default ServerAuth check fails")
def _eku_client() -> dict[str, bytes]:
    return files(inter(root(), extra=(rc.eku("clientAuth"),)))


@case("eku-server-only-ca", "b",
      "ca-cert.pem EKU serverAuth only: Envoy refuses it as an issuer of client certificates",
      check="workload-eku-client-auth")
def _eku_server() -> dict[str, bytes]:
    return files(inter(root(), extra=(rc.eku("serverAuth"),)))


@case("eku-server-only-root", "c",
      "root EKU serverAuth only: Go's ServerAuth check passes, Envoy ignores a trust anchor's extendedKeyUsage")
def _eku_server_root() -> dict[str, bytes]:
    return files(inter(root(extra=(rc.eku("serverAuth"),))))


@case("crldp-critical-ca", "b",
      "ca-cert.pem marks its CRL distribution points critical: Go handles the extension, BoringSSL does not",
      check="workload-critical-extension")
def _crldp_critical() -> dict[str, bytes]:
    dp = rc.seq(rc.seq(rc.tlv(0xA0, rc.tlv(0xA0, rc.tlv(0x86, b"http://crl.example/ca.crl")))))
    return files(inter(root(), extra=(rc.Ext("2.5.29.31", dp, True),)))


@case("eku-netscape-sgc", "a", "ca-cert.pem EKU Netscape SGC only: Go no longer treats it as serverAuth")
def _eku_ns() -> dict[str, bytes]:
    return files(inter(root(), extra=(rc.eku("nsSGC"),)))


@case("eku-microsoft-sgc", "a", "ca-cert.pem EKU Microsoft SGC only")
def _eku_ms() -> dict[str, bytes]:
    return files(inter(root(), extra=(rc.eku("msSGC"),)))


@case("eku-unknown-only", "a", "ca-cert.pem EKU with one unknown OID")
def _eku_unknown() -> dict[str, bytes]:
    return files(inter(root(), extra=(rc.eku("1.3.6.1.4.1.99999.3"),)))


@case("eku-client-only-mid", "a", "mid CA EKU clientAuth only")
def _eku_mid() -> dict[str, bytes]:
    return files(inter(inter(root(), "Mid CA", pathlen=1, extra=(rc.eku("clientAuth"),))))


@case("eku-codesigning-root", "a", "root EKU codeSigning only")
def _eku_root() -> dict[str, bytes]:
    return files(inter(root(extra=(rc.eku("codeSigning"),))))


@case("ku-no-certsign-ca", "b", "ca-cert.pem keyUsage without keyCertSign: Go ignores it, Envoy does not",
      check="workload-key-cert-sign")
def _ku_ca() -> dict[str, bytes]:
    return files(inter(root(), ku=("digitalSignature", "keyEncipherment")))


@case("ku-no-certsign-mid", "a", "mid CA keyUsage without keyCertSign: CheckSignatureFrom refuses it")
def _ku_mid() -> dict[str, bytes]:
    return files(inter(inter(root(), "Mid CA", pathlen=1, ku=("digitalSignature",))))


@case("ku-no-certsign-root", "a", "root keyUsage without keyCertSign")
def _ku_root() -> dict[str, bytes]:
    return files(inter(root(ku=("digitalSignature", "cRLSign"))))


@case("ca-false", "a", "ca-cert.pem basicConstraints CA:false: startup's IsCA check refuses it")
def _ca_false() -> dict[str, bytes]:
    return files(inter(root(), ca=False))


@case("ca-no-basic-constraints", "a", "ca-cert.pem without basicConstraints")
def _ca_no_bc() -> dict[str, bytes]:
    r = root()
    return files(inter(r, exts=[rc.key_usage(*rc.CA_KU), rc.aki(r.keyid or b"")]))


@case("mid-ca-false", "a", "mid CA with CA:false")
def _mid_false() -> dict[str, bytes]:
    return files(inter(inter(root(), "Mid CA", ca=False)))


@case("pathlen-root-0", "b",
      "root pathlen:0 with ca-cert.pem directly below: Envoy ignores a trust anchor's pathlen, but Go (pilot-agent"
      " dialling istiod) refuses istiod's own serving certificate", check="istiod-serving-cert")
def _pl_root() -> dict[str, bytes]:
    return files(inter(root(pathlen=0)))


@case("pathlen-mid-0", "b", "mid CA pathlen:0 above ca-cert.pem: Go verifies ca-cert.pem, Envoy refuses workloads",
      check="workload-path-length")
def _pl_mid() -> dict[str, bytes]:
    return files(inter(inter(root(), "Mid CA", pathlen=0)))


@case("pathlen-root-0-two-below", "a", "root pathlen:0 with a mid CA and ca-cert.pem below: Go refuses")
def _pl_root2() -> dict[str, bytes]:
    return files(inter(inter(root(pathlen=0), "Mid CA", pathlen=1)))


@case("pathlen-ca-0", "ok", "ca-cert.pem pathlen:0: workload leaves below it are fine")
def _pl_ca() -> dict[str, bytes]:
    return files(good()[1])


# --------------------------------------------------------------------------------------------- name constraints


@case("nc-permitted-other-domain", "a", "mid CA permits only .example.com; ca-cert.pem names istiod.istio-system.svc")
def _nc_perm() -> dict[str, bytes]:
    return files(inter(inter(root(), "Mid CA", pathlen=1, extra=(rc.name_constraints([("dns", ".example.com")]),))))


@case("nc-excluded-istio-system", "a", "root excludes DNS istio-system.svc")
def _nc_excl() -> dict[str, bytes]:
    return files(inter(root(extra=(rc.name_constraints([], [("dns", "istio-system.svc")]),))))


@case("nc-permitted-ip", "a", "root permits 10.0.0.0/8 but ca-cert.pem has IP SAN 192.168.1.1")
def _nc_ip() -> dict[str, bytes]:
    r = root(extra=(rc.name_constraints([("ip", "10.0.0.0/8")]),))
    return _with_san(rc.san(("dns", "istiod.istio-system.svc"), ("ip", "192.168.1.1")), r)


@case("nc-empty", "a", "name constraints with an empty permittedSubtrees: Go's parser refuses it")
def _nc_empty() -> dict[str, bytes]:
    return files(inter(root(extra=(rc.name_constraints(empty=True),))))


@case("nc-bad-ip-mask", "a", "IP name constraint with a non-contiguous mask")
def _nc_mask() -> dict[str, bytes]:
    return files(inter(root(extra=(rc.name_constraints([("ip", b"\x0a\x00\x00\x00\xff\x00\xff\x00")]),))))


@case("nc-uri-permitted", "c", "mid CA permits URIs under cluster.local only (workload SPIFFE IDs depend on it)")
def _nc_uri_perm() -> dict[str, bytes]:
    return files(inter(inter(root(), "Mid CA", pathlen=1, extra=(rc.name_constraints([("uri", "cluster.local")]),))))


@case("nc-uri-excluded", "c", "root excludes URIs under cluster.local: fine for istiod, fatal for that trust domain")
def _nc_uri_excl() -> dict[str, bytes]:
    return files(inter(root(extra=(rc.name_constraints([], [("uri", "cluster.local")]),))))


@case("nc-san-double-dot", "a", "ca-cert.pem SAN istiod..svc under a name-constrained root: cannot parse dnsName")
def _nc_dd() -> dict[str, bytes]:
    r = root(extra=(rc.name_constraints([("dns", "svc")]),))
    return _with_san(rc.san(("dns", "istiod..svc")), r)


@case("san-double-dot-unconstrained", "ok", "ca-cert.pem SAN istiod..svc with no name constraints above it")
def _san_dd() -> dict[str, bytes]:
    return _with_san(rc.san(("dns", "istiod..svc")))


# --------------------------------------------------------------------------------------------- policies


@case("policy-require-explicit-root", "ok",
      "root requireExplicitPolicy=0 and no policies: a trust anchor's constraints do not apply (RFC 5280 6.1)")
def _pol_root() -> dict[str, bytes]:
    return files(inter(inter(root(extra=(rc.policy_constraints(require=0),)), "Mid CA", pathlen=1)))


@case("policy-require-explicit-mid", "a", "mid CA requireExplicitPolicy=0 and ca-cert.pem asserts none")
def _pol_mid() -> dict[str, bytes]:
    return files(inter(inter(root(), "Mid CA", pathlen=1, extra=(rc.policy_constraints(require=0),))))


@case("policy-duplicate-oid", "a", "ca-cert.pem lists the same certificate policy twice")
def _pol_dup() -> dict[str, bytes]:
    return files(inter(root(), extra=(rc.cert_policies("1.3.6.1.4.1.99999.7", "1.3.6.1.4.1.99999.7"),)))


@case("policy-map-any", "a", "mid CA maps a policy to anyPolicy, which RFC 5280 forbids")
def _pol_any() -> dict[str, bytes]:
    a = "1.3.6.1.4.1.99999.7"
    mid = inter(root(), "Mid CA", pathlen=1, extra=(rc.cert_policies(a), rc.policy_mappings((a, "2.5.29.32.0"))))
    return files(inter(mid, extra=(rc.cert_policies(a),)))


@case("policy-inhibit-any", "a",
      "mid CA requires explicit policy and inhibits anyPolicy; the CAs assert only anyPolicy")
def _pol_inhibit() -> dict[str, bytes]:
    any_policy = rc.cert_policies("2.5.29.32.0")
    mid = inter(root(), "Mid CA", pathlen=1, extra=(any_policy, rc.policy_constraints(require=0), rc.inhibit_any(0)))
    return files(inter(mid, extra=(any_policy,)))


# --------------------------------------------------------------------------------------------- chain shape and validity


@case("chain-unordered", "c", "cert-chain.pem lists the root before ca-cert.pem: Go builds the path anyway")
def _unordered() -> dict[str, bytes]:
    r, ca = good()
    return files(ca, chain=[r, ca])


@case("chain-root-only", "b", "cert-chain.pem holds only the root: workloads would get no intermediate",
      check="chain-lacks-ca-cert")
def _chain_root() -> dict[str, bytes]:
    r, ca = good()
    return files(ca, chain=[r])


@case("chain-old-intermediate", "b", "cert-chain.pem still holds the previous intermediate, not ca-cert.pem",
      check="chain-lacks-ca-cert")
def _chain_old() -> dict[str, bytes]:
    r, ca = good()
    return files(ca, chain=[inter(r, "Old Intermediate"), r])


@case("chain-extra-unrelated", "c", "cert-chain.pem also holds an unrelated CA certificate")
def _chain_extra() -> dict[str, bytes]:
    r, ca = good()
    return files(ca, chain=[ca, r, inter(root("Other Root"), "Other CA")])


@case("chain-ends-at-foreign-root", "c", "cert-chain.pem is ca-cert.pem then a root that is not in root-cert.pem")
def _chain_foreign() -> dict[str, bytes]:
    r, ca = good()
    return files(ca, chain=[ca, root()])


@case("files-swapped-root-chain", "c",
      "root-cert.pem and cert-chain.pem swapped: ca-cert.pem is then itself a trust anchor, which Go accepts")
def _swap_root_chain() -> dict[str, bytes]:
    f = files(good()[1])
    f["root-cert.pem"], f["cert-chain.pem"] = f["cert-chain.pem"], f["root-cert.pem"]
    return f


@case("files-swapped-ca-chain", "c",
      "ca-cert.pem and cert-chain.pem swapped: ca-cert.pem's first block is still the CA")
def _swap_ca_chain() -> dict[str, bytes]:
    f = files(good()[1])
    f["ca-cert.pem"], f["cert-chain.pem"] = f["cert-chain.pem"], f["ca-cert.pem"]
    return f


@case("aki-mismatch", "b",
      "ca-cert.pem's authorityKeyIdentifier names another key: Go still tries the issuer, BoringSSL does not",
      check="workload-path-building")
def _aki_mismatch() -> dict[str, bytes]:
    r = root()
    exts = [rc.basic_constraints(True, 0), rc.key_usage(*rc.CA_KU), rc.aki(b"\x01" * 20)]
    return files(inter(r, exts=exts))


@case("root-valid-past-2050", "ok", "a root valid until 2060 (GeneralizedTime, as RFC 5280 wants after 2049)")
def _root_2060() -> dict[str, bytes]:
    r = root(not_after=dt.datetime(2060, 1, 1, tzinfo=dt.UTC))
    return files(inter(r))


@case("pem-empty-cert-block", "b",
      "root-cert.pem: the root plus an empty CERTIFICATE block (Go skips it, Envoy cannot)",
      check="unparsable-cert-for-envoy")
def _pem_empty_block() -> dict[str, bytes]:
    r, ca = good()
    f = files(ca)
    f["root-cert.pem"] = r.pem + b"-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n"
    return f


@case("ca-also-in-root-cert", "c", "root-cert.pem holds the root and ca-cert.pem: Go then trusts ca-cert.pem directly")
def _ca_in_roots() -> dict[str, bytes]:
    r, ca = good()
    return files(ca, roots=[r, ca])


@case("chain-missing-mid", "a", "three levels, but cert-chain.pem lacks the mid CA, so Go builds no path")
def _chain_mid() -> dict[str, bytes]:
    mid = inter(root(), "Mid CA", pathlen=1)
    ca = inter(mid)
    return files(ca, chain=[ca, mid.chain[0]])


@case("chain-mid-as-anchor", "c", "root-cert.pem holds the mid CA (not self-signed) as the trust anchor")
def _chain_anchor() -> dict[str, bytes]:
    mid = inter(root(), "Mid CA", pathlen=1)
    ca = inter(mid)
    return files(ca, roots=[mid], chain=[ca])


@case("root-expired-extra", "c", "root-cert.pem keeps an expired old root after a rotation")
def _root_expired_extra() -> dict[str, bytes]:
    r, ca = good()
    old = root("Old Root", not_before=NOW - 400 * DAY, not_after=NOW - DAY)
    return files(ca, roots=[r, old])


def _expired_same_key(expired_sorts_first: bool) -> dict[str, bytes]:
    """root-cert.pem = an expired earlier issue of the root (same subject and key), then the live root. pilot-agent
    sorts the trust bundle's PEM blocks as strings before Envoy reads them, so which one Envoy tries first depends on
    the text: draw the expired one until it sorts where wanted."""
    r, ca = good()
    while True:
        old = root(key=r.key, not_before=NOW - 400 * DAY, not_after=NOW - DAY)
        if (old.pem.rstrip(b"\n") < r.pem.rstrip(b"\n")) == expired_sorts_first:
            return files(ca, roots=[old, r])


@case("root-expired-same-key-first", "b",
      "root-cert.pem lists an expired earlier issue of the root (same subject and key) first, and it sorts first in "
      "pilot-agent's trust bundle: Go tries every root, BoringSSL takes that one", check="workload-path-validity")
def _root_same_key_first() -> dict[str, bytes]:
    return _expired_same_key(True)


@case("root-expired-same-key-sorts-last", "c",
      "the same expired earlier issue listed first in root-cert.pem, but sorting after the live root in pilot-agent's "
      "trust bundle: Envoy takes the live one")
def _root_same_key_last() -> dict[str, bytes]:
    return _expired_same_key(False)


@case("root-expired-only", "a", "the only root has expired")
def _root_expired() -> dict[str, bytes]:
    r = root(not_before=NOW - 400 * DAY, not_after=NOW - DAY)
    return files(inter(r, not_before=NOW - 10 * DAY))


@case("ca-expired", "a", "ca-cert.pem has expired")
def _ca_expired() -> dict[str, bytes]:
    return files(inter(root(), not_before=NOW - 400 * DAY, not_after=NOW - DAY))


@case("ca-not-yet-valid", "a", "ca-cert.pem is valid only from tomorrow")
def _ca_future() -> dict[str, bytes]:
    return files(inter(root(), not_before=NOW + DAY, not_after=NOW + 30 * DAY))


@case("mid-expired", "a", "the mid CA has expired")
def _mid_expired() -> dict[str, bytes]:
    mid = inter(root(), "Mid CA", pathlen=1, not_before=NOW - 400 * DAY, not_after=NOW - DAY)
    return files(inter(mid, not_before=NOW - 10 * DAY))


@case("chain-first-expired", "a", "cert-chain.pem starts with an expired old intermediate: startup's minTTL refuses it")
def _chain_first_expired() -> dict[str, bytes]:
    r, ca = good()
    old = inter(r, "Old Intermediate", not_before=NOW - 400 * DAY, not_after=NOW - DAY)
    return files(ca, chain=[old, ca, r])


@case("chain-expired-extra-last", "c", "cert-chain.pem ends with an expired old intermediate that is off the path")
def _chain_expired_last() -> dict[str, bytes]:
    r, ca = good()
    old = inter(r, "Old Intermediate", not_before=NOW - 400 * DAY, not_after=NOW - DAY)
    return files(ca, chain=[ca, r, old])


@case("root-lookalike-only", "a", "root-cert.pem holds a root with the right name but another key")
def _lookalike_only() -> dict[str, bytes]:
    r, ca = good()
    return files(ca, roots=[root()])


@case("root-unrelated", "a", "root-cert.pem holds a root that did not sign anything here")
def _unrelated() -> dict[str, bytes]:
    return files(good()[1], roots=[root("Stranger Root")])


@case("sig-sha1-ca", "a", "ca-cert.pem signed with SHA-1 RSA: Go refuses SHA-1 signatures in chains")
def _sha1() -> dict[str, bytes]:
    return files(inter(root(key=rsa_key(2048)), alg="sha1"))


@case("sig-ecdsa-sha1-ca", "a", "ca-cert.pem signed with ECDSA-SHA1")
def _ecsha1() -> dict[str, bytes]:
    return files(inter(root(), alg="sha1"))


@case("sig-md5-ca", "a", "ca-cert.pem signed with MD5 RSA")
def _md5() -> dict[str, bytes]:
    return files(inter(root(key=rsa_key(2048)), alg="md5"))


@case("sig-bad-signature", "a", "ca-cert.pem's signature does not verify (one bit flipped)")
def _badsig() -> dict[str, bytes]:
    r = root()
    ca = inter(r)
    der = bytearray(ca.der)
    der[-5] ^= 1
    return files(Issued(bytes(der), ca.key, ca.subject, ca.spki, ca.keyid, 0, ca.chain))


@case("ca-cert-is-other-root", "a", "ca-cert.pem is the root while ca-key.pem is the intermediate's key")
def _ca_is_root() -> dict[str, bytes]:
    r, ca = good()
    f = files(ca)
    f["ca-cert.pem"] = r.pem
    return f


def _loop_pool(n_pairs: int) -> tuple[list[Issued], Issued]:
    """Two CAs with names A and B, each cross-signing the other, n_pairs times with fresh keys."""
    an, bn = name(("O", "Loop"), ("CN", "A")), name(("O", "Loop"), ("CN", "B"))
    ka, kb = k(), k()
    seed_a = cert(an, ka)
    seed_b = cert(bn, kb)
    pool = []
    for _ in range(n_pairs):
        pool.append(cert(an, ka, seed_b))
        pool.append(cert(bn, kb, seed_a))
    return pool, seed_a


@case("loop-cross-signed-no-root", "a", "cert-chain.pem: two CAs cross-signing each other in loops, no way to the root")
def _loop() -> dict[str, bytes]:
    pool, a = _loop_pool(20)
    ca = cert(name(("O", "Istio"), ("CN", "Intermediate CA")), k(), pool[0], pathlen=0, extra=(ISTIOD_SAN,))
    return files(ca, roots=[root("Unrelated")], chain=[ca, *pool])


@case("loop-with-direct-root", "c", "loops in cert-chain.pem, but ca-cert.pem's issuer is in root-cert.pem")
def _loop_ok() -> dict[str, bytes]:
    pool, _ = _loop_pool(10)
    r, ca = good()
    return files(ca, chain=[ca, *pool, r])


def _fanout(root_decoys: int, mid_decoys: int) -> dict[str, bytes]:
    """Same-name decoys (other keys) before the real issuers: `mid_decoys` "Mid CA"s in cert-chain.pem and
    `root_decoys` "Root CA"s in root-cert.pem. No certificate carries an AKI, so Go's findPotentialParents ranks
    every same-name candidate alike and tries them in file order, one signature check each (budget: 100)."""
    def ca_cert(cn: str, issuer: Issued | None) -> Issued:
        key = k()
        exts = [rc.basic_constraints(True), rc.key_usage(*rc.CA_KU), rc.ski(rc.key_id(rc.spki_of(key))), ISTIOD_SAN]
        return cert(name(("O", "Istio"), ("CN", cn)), key, issuer, exts=exts)

    r = ca_cert("Root CA", None)
    mid = ca_cert("Mid CA", r)
    ca = ca_cert("Intermediate CA", mid)
    decoy_issuer = ca_cert("Decoy", None)
    mids = [ca_cert("Mid CA", decoy_issuer) for _ in range(mid_decoys)]
    roots = [ca_cert("Root CA", None) for _ in range(root_decoys)]
    return files(ca, roots=[*roots, r], chain=[ca, *mids, mid])


@case("fanout-within-budget", "b",
      "40 same-name decoys before the real mid CA and 40 before the root (82 checks): Go finds the path, BoringSSL "
      "takes the first decoy", check="workload-path-building")
def _fan_ok() -> dict[str, bytes]:
    return _fanout(40, 40)


@case("fanout-over-budget", "a", "50 same-name decoys before the mid CA and 50 before the root: over Go's 100 checks")
def _fan_over() -> dict[str, bytes]:
    return _fanout(50, 50)


# --------------------------------------------------------------------------------------------- CRL


def _crl_pki() -> tuple[Issued, Issued]:
    r = root(crl_sign=True)
    return r, inter(r, crl_sign=True)


@case("crl-ok", "ok", "ca-crl.pem with a CRL from the root and one from the intermediate")
def _crl_ok() -> dict[str, bytes]:
    r, ca = _crl_pki()
    return files(ca, crl=rc.crl(r).pem + rc.crl(ca).pem)


@case("crl-missing-for-intermediate", "a",
      "ca-crl.pem has only the root's CRL: istiod wants one per cert-chain.pem entry")
def _crl_missing() -> dict[str, bytes]:
    r, ca = _crl_pki()
    return files(ca, crl=rc.crl(r).pem)


@case("crl-signer-without-crlsign", "a", "the root's keyUsage lacks cRLSign, so its CRL does not count")
def _crl_ku() -> dict[str, bytes]:
    r = root()
    ca = inter(r, crl_sign=True)
    return files(ca, crl=rc.crl(r).pem + rc.crl(ca).pem)


@case("crl-garbage", "a", "ca-crl.pem holds an X509 CRL block that does not parse")
def _crl_garbage() -> dict[str, bytes]:
    return files(_crl_pki()[1], crl=rc.pem("X509 CRL", b"\x30\x03\x02\x01\x01"))


@case("crl-empty-file", "c", "ca-crl.pem exists but is empty: istiod skips the CRL checks")
def _crl_empty() -> dict[str, bytes]:
    return files(_crl_pki()[1], crl=b"")


@case("crl-whitespace", "a", "ca-crl.pem is a newline: no CRL parsed, so every chain certificate lacks one")
def _crl_ws() -> dict[str, bytes]:
    return files(_crl_pki()[1], crl=b"\n")


@case("crl-v1", "a", "a v1 CRL (no version field): Go only parses v2")
def _crl_v1() -> dict[str, bytes]:
    r, ca = _crl_pki()
    return files(ca, crl=rc.crl(r, version=None).pem + rc.crl(ca).pem)


@case("crl-wrong-signer", "a", "the intermediate's CRL is signed by another key")
def _crl_wrong() -> dict[str, bytes]:
    r, ca = _crl_pki()
    return files(ca, crl=rc.crl(r).pem + rc.crl(ca, signer=k()).pem)


@case("crl-chain-has-other-block", "a", "with a CRL, istiod parses every cert-chain.pem block as a certificate")
def _crl_chain_block() -> dict[str, bytes]:
    r, ca = _crl_pki()
    f = files(ca, crl=rc.crl(r).pem + rc.crl(ca).pem)
    f["cert-chain.pem"] += rc.pem("PUBLIC KEY", r.spki)
    return f


@case("crl-expired", "b",
      "a CRL whose nextUpdate has passed: istiod loads it, Envoy refuses every workload certificate",
      check="workload-crl-expired")
def _crl_expired() -> dict[str, bytes]:
    r, ca = _crl_pki()
    old = rc.crl(ca, this_update=NOW - 40 * DAY, next_update=NOW - DAY)
    return files(ca, crl=rc.crl(r).pem + old.pem)


@case("crl-revokes-intermediate", "b", "the root's CRL revokes ca-cert.pem itself", check="workload-crl-revoked")
def _crl_revoked() -> dict[str, bytes]:
    r, ca = _crl_pki()
    return files(ca, crl=rc.crl(r, [ca.serial]).pem + rc.crl(ca).pem)


@case("crl-missing-for-root", "b",
      "cert-chain.pem without the root, ca-crl.pem with only the intermediate's CRL: istiod is content, Envoy not",
      check="workload-crl-missing")
def _crl_no_root() -> dict[str, bytes]:
    _, ca = _crl_pki()
    return files(ca, chain=[ca], crl=rc.crl(ca).pem)


@case("crl-sha1-signed", "ok", "CRLs signed with ECDSA-SHA1: Go allows SHA-1 for CRLs")
def _crl_sha1() -> dict[str, bytes]:
    r, ca = _crl_pki()
    return files(ca, crl=rc.crl(r, alg="sha1").pem + rc.crl(ca, alg="sha1").pem)


# ================================================================================================= tls (gateways)


def tls(leaf_ci: Issued, ca: Issued | None, *, chain: list[Issued] | None = None) -> dict[str, bytes]:
    out = {"tls.key": leaf_ci.key_pem(), "tls.crt": b"".join(c.pem for c in [leaf_ci, *(chain or [])])}
    if ca is not None:
        out["ca.crt"] = ca.pem
    return out


@case("tls-ok", "ok", "leaf plus intermediate in tls.crt, root in ca.crt", kind="tls")
def _tls_ok() -> dict[str, bytes]:
    r, ca = good()
    return tls(leaf(ca), r, chain=[ca])


@case("tls-ok-no-ca", "ok", "tls.key and tls.crt only", kind="tls")
def _tls_noca() -> dict[str, bytes]:
    return {k2: v for k2, v in tls(leaf(root()), None).items()}


@case("tls-key-mismatch", "a", "tls.key from another certificate", kind="tls")
def _tls_mismatch() -> dict[str, bytes]:
    r = root()
    f = tls(leaf(r), r)
    f["tls.key"] = leaf(r).key_pem()
    return f


@case("tls-crt-no-newline-plus-ca", "a",
      "tls.crt without a final newline with ca.crt appended: the END and next BEGIN share a line, Go finds no PEM",
      kind="tls")
def _tls_concat() -> dict[str, bytes]:
    r = root()
    lf = leaf(r)
    f = tls(lf, r)
    f["tls.crt"] = lf.pem.rstrip(b"\n") + r.pem
    return f


@case("tls-crt-no-final-newline", "ok", "tls.crt without a final newline", kind="tls")
def _tls_nonl() -> dict[str, bytes]:
    r = root()
    f = tls(leaf(r), r)
    f["tls.crt"] = f["tls.crt"].rstrip(b"\n")
    return f


@case("tls-expired-leaf", "b",
      "an expired tls.crt (the leaf, then the root that issued it): pilot-agent serves it, every client refuses it",
      kind="tls", check="tls-leaf-validity")
def _tls_expired() -> dict[str, bytes]:
    r = root()
    return tls(leaf(r, not_before=NOW - 400 * DAY, not_after=NOW - DAY), None, chain=[r])


@case("tls-ca-one-bad-one-good", "c", "ca.crt holds an unparsable certificate and a good root: ParseRootCerts skips",
      kind="tls", ca_signs_cert=False)
def _tls_ca_mixed() -> dict[str, bytes]:
    r = root()
    f = tls(leaf(r), r)
    f["ca.crt"] = rc.pem("CERTIFICATE", rc.seq(rc.integer(1))) + r.pem
    return f


@case("tls-ca-garbage", "a", "ca.crt holds no certificate Go can parse", kind="tls")
def _tls_ca_garbage() -> dict[str, bytes]:
    r = root()
    f = tls(leaf(r), r)
    f["ca.crt"] = rc.pem("CERTIFICATE", rc.seq(rc.integer(1)))
    return f


@case("tls-client-ca-unrelated", "ok", "MUTUAL gateway: ca.crt is the clients' CA (ca_signs_cert false)", kind="tls",
      ca_signs_cert=False)
def _tls_client_ca() -> dict[str, bytes]:
    return tls(leaf(root()), root("Client CA"))


@case("tls-ca-does-not-sign", "a", "ca_signs_cert: tls.crt does not verify to ca.crt", kind="tls")
def _tls_wrong_ca() -> dict[str, bytes]:
    return tls(leaf(root()), root("Client CA"))


@case("tls-key-ec-params-first", "c", "tls.key starts with EC PARAMETERS: tls.X509KeyPair looks for the key block",
      kind="tls")
def _tls_params() -> dict[str, bytes]:
    r = root()
    lf = leaf(r)
    f = tls(lf, r)
    f["tls.key"] = b"-----BEGIN EC PARAMETERS-----\nBggqhkjOPQMBBw==\n-----END EC PARAMETERS-----\n" + lf.key_pem(
        "traditional")
    return f


@case("tls-crt-corrupt-extra", "b",
      "tls.crt: the leaf then a CERTIFICATE block that does not parse (Envoy loads it all)",
      kind="tls", check="unparsable-cert-for-envoy")
def _tls_garbage() -> dict[str, bytes]:
    r = root()
    f = tls(leaf(r), r)
    f["tls.crt"] += rc.pem("CERTIFICATE", b"\x30\x03\x02\x01\x00")
    return f


@case("tls-ca-first-in-crt", "a", "tls.crt lists the CA before the leaf: the key matches the second certificate",
      kind="tls")
def _tls_order() -> dict[str, bytes]:
    r, ca = good()
    lf = leaf(ca)
    f = tls(lf, r)
    f["tls.crt"] = ca.pem + lf.pem
    return f


@case("tls-leaf-plus-root", "ok", "tls.crt holds the leaf and its root", kind="tls")
def _tls_with_root() -> dict[str, bytes]:
    r = root()
    return tls(leaf(r), r, chain=[r])


@case("tls-key-pkcs8-in-ec-label", "c", "tls.key: PKCS#8 body under an EC PRIVATE KEY label (Go tries PKCS#8 first)",
      kind="tls")
def _tls_label() -> dict[str, bytes]:
    r = root()
    lf = leaf(r)
    f = tls(lf, r)
    f["tls.key"] = relabel(lf.key_pem("pkcs8"), "EC PRIVATE KEY")
    return f


@case("tls-rsa", "ok", "RSA 2048 leaf signed by an RSA root", kind="tls")
def _tls_rsa() -> dict[str, bytes]:
    r = root(key=rsa_key(2048))
    return tls(leaf(r, key=rsa_key(2048)), r)


# ================================================================================================= building


def build(names: set[str] | None = None) -> list[Case]:
    """Build every case (or those named), in definition order."""
    out = []
    for s in _SPECS:
        if names is None or s.name in names:
            out.append(Case(s.name, s.kind, s.cls, s.desc, s.make(), s.ca_signs_cert, s.check))
    return out


CASES = [s.name for s in _SPECS]


def catalog() -> list[dict[str, str]]:
    """Every case's name, kind, class, check and description, without building it (for test parametrization)."""
    return [{"name": s.name, "kind": s.kind, "cls": s.cls, "check": s.check, "desc": s.desc} for s in _SPECS]


def write(outdir: Path, cases: list[Case]) -> list[dict[str, object]]:
    """Write each case into outdir/NAME and return the manifest (also written as outdir/manifest.json)."""
    manifest = []
    for c in cases:
        d = outdir / c.name
        d.mkdir(parents=True, exist_ok=True)
        for fname, data in c.files.items():
            (d / fname).write_bytes(data)
        manifest.append({"name": c.name, "dir": str(d), "kind": c.kind, "cls": c.cls, "desc": c.desc,
                         "ca_signs_cert": c.ca_signs_cert, "check": c.check})
    (outdir / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


# ================================================================================================= hostile inputs


def hostile() -> Iterator[tuple[str, str, dict[str, bytes]]]:
    """Inputs built to make a validator slow: (name, kind, files), for bench/validate.py and the regression tests."""
    r, ca = good()
    base = files(ca)
    pool, _ = _loop_pool(31)  # 62 cross-signed CAs + ca-cert.pem: just under the 64-block cap
    loop_ca = cert(name(("O", "Istio"), ("CN", "Intermediate CA")), k(), pool[0], pathlen=0, extra=(ISTIOD_SAN,))
    yield "cross-sign-loops", "istio-ca", files(loop_ca, roots=[root("Unrelated")], chain=[loop_ca, *pool])
    yield "fanout-over-budget", "istio-ca", _fanout(63, 62)  # 64 roots, 64 chain blocks: both files at the cap
    yield "repeated-begin-280k", "istio-ca", {**base, "ca-cert.pem": b"-----BEGIN CERTIFICATE-----\n" * 10000}
    yield "repeated-end-280k", "istio-ca", {**base, "ca-cert.pem": b"\n-----END CERTIFICATE-----" * 10000}
    yield "repeated-begin-then-cert", "istio-ca", {
        **base, "ca-cert.pem": b"-----BEGIN CERTIFICATE-----\n" * 9000 + base["ca-cert.pem"]}
    one = ca.pem
    yield "5000-cert-chain", "istio-ca", {**base, "cert-chain.pem": one * 5000}
    yield "5000-cert-roots", "istio-ca", {**base, "root-cert.pem": r.pem * 5000}
    blob = b"A" * (1 << 20)
    yield "1mib-file", "istio-ca", {**base, "root-cert.pem": b"-----BEGIN CERTIFICATE-----\n" + blob[:1048000] +
                                    b"\n-----END CERTIFICATE-----\n"}
    yield "1mib-plus-one", "istio-ca", {**base, "cert-chain.pem": base["cert-chain.pem"] + b"x" * (1 << 20)}
    many_roots = b"".join(root(f"R{i}").pem for i in range(63)) + r.pem
    yield "64-distinct-roots", "istio-ca", {**base, "root-cert.pem": many_roots}
    yield "duplicate-extension", "istio-ca", files(inter(r, extra=(ISTIOD_SAN,)))
    yield "colon-lines", "istio-ca", {**base, "ca-cert.pem": b"-----BEGIN CERTIFICATE-----\n" + b"a: b\n" * 30000 +
                                      b"-----END CERTIFICATE-----\n"}
    yield "huge-name-constraints", "istio-ca", files(inter(root(extra=(
        rc.name_constraints([("dns", f"d{i}.example.com") for i in range(3000)]),))))
    yield "tls-5000-chain", "tls", {**tls(leaf(r), r), "tls.crt": leaf(r).pem + r.pem * 5000}


def main(argv: list[str] | None = None) -> int:
    """`python -m testbed.corpus OUTDIR [NAME...]`: write the corpus, one directory per case."""
    p = argparse.ArgumentParser(prog="python -m testbed.corpus", description=__doc__)
    p.add_argument("outdir", type=Path)
    p.add_argument("names", nargs="*")
    args = p.parse_args(argv)
    manifest = write(args.outdir, build(set(args.names) if args.names else None))
    print(f"wrote {len(manifest)} cases to {args.outdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
