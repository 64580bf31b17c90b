"""What ztunnel (the ambient data plane) makes of an istio-ca bundle, by version: the certificates of cert-chain.pem it
sends its peers and the roots of root-cert.pem it trusts (agent/istio_version.py says which version does what).

ztunnel gets both from istiod's CSR answer (security/pkg/server/ca/server.go CreateCertificate), not from the files;
it parses them in src/tls/certificate.rs (WorkloadCertificate::new): rustls-pemfile finds the PEM items,
x509-parser parses each certificate, and rustls' RootCertStore::add_parsable_certificates keeps the roots webpki
takes as trust anchors and drops the others with only a log line. Neither Rust parser is run here: a certificate Go
cannot parse stands for one x509-parser cannot, and webpki's own refusals are modelled by `_anchor_problem`.
"""

from __future__ import annotations

from agent.istio_version import THREE_LEVEL, ZTUNNEL_ROOTS, Version, three_level_broken, ztunnel_roots
from agent.text import shown
from agent.validate.certs import Certificate
from agent.validate.common import Parsed, refuse_b

__all__ = ["ztunnel_checks"]

#: the PEM labels rustls-pemfile 2 returns an item for (rustls-pki-types pem.rs SectionKind); others it skips.
#: WorkloadCertificate::new wants every item of the roots to be a certificate, else ztunnel has no certificate.
_RUSTLS_ITEMS = (b"CERTIFICATE", b"PUBLIC KEY", b"RSA PRIVATE KEY", b"PRIVATE KEY", b"EC PRIVATE KEY", b"X509 CRL",
                 b"CERTIFICATE REQUEST", b"ECHCONFIG")
#: webpki reads a certificate's TBS as a SEQUENCE of at most 2^16 - 1 bytes (signed_data.rs, TWO_BYTE_DER_SIZE)
_WEBPKI_MAX_TBS = 0xFFFF


def _same(a: Certificate, b: Certificate) -> bool:
    """webpki identifies a trust anchor by subject and public key, so another issuance of a root stands for it."""
    return a.raw == b.raw or (a.raw_subject == b.raw_subject and a.raw_spki == b.raw_spki)


def _anchor_problem(c: Certificate) -> str | None:
    """Why webpki's anchor_from_trusted_cert refuses `c` when Go parsed it (None: it takes it). It takes v3 and,
    through a parser of its own, v1 certificates, not v2 ones (cert.rs version3, trust_anchor.rs); it ignores a
    trust anchor's unknown critical extensions (Cert::for_trust_anchor)."""
    if c.version == 2:
        return "it is a version 2 certificate, which webpki does not take as a trust anchor (only v1 and v3)"
    if len(c.raw_tbs) > _WEBPKI_MAX_TBS + 4:
        return "its TBSCertificate is over 64 KiB, more than webpki reads"
    return None


def _each_block_a_certificate(p: Parsed, name: str, v: Version) -> str | None:
    """Why ztunnel `v` cannot load `name` when istiod sends each of its PEM blocks as an element of its own
    (util.PemCertBytestoString) and ztunnel parses every element as a certificate (WorkloadCertificate::new,
    parse_cert: rustls-pemfile's first item must be a certificate that x509-parser parses); None: it can."""
    blocks = p.blocks(name)
    for i, b in enumerate(blocks):
        if b.label != b"CERTIFICATE":
            return (f"{p.nth(name, i, len(blocks))} is a {shown(b.type)} block, and istiod {v} sends each PEM block "
                    f"of {name} on its own, which ztunnel {v} must parse as a certificate")
        if not isinstance(p.cert(b.der), Certificate):
            return (f"{p.nth(name, i, len(blocks))} is a CERTIFICATE block that does not parse, and istiod {v} sends "
                    f"each PEM block of {name} on its own, which ztunnel {v} must parse as a certificate")
    return None


def _roots(p: Parsed, v: Version) -> tuple[list[tuple[int, Certificate]], list[str], str | None]:
    """(the roots ztunnel `v` trusts, with their index among root-cert.pem's blocks; why each other root is not
    trusted; why ztunnel cannot load the certificate at all, or None)."""
    name = "root-cert.pem"
    blocks = p.blocks(name)
    items = [(i, b) for i, b in enumerate(blocks) if b.label in _RUSTLS_ITEMS]
    mode = ztunnel_roots(v)
    if mode == "last" and (fatal := _each_block_a_certificate(p, name, v)) is not None:
        return [], [], fatal
    if mode != "all":
        # one PEM item read (rustls_pemfile::read_one): the first of the file, or of the last element istiod sent,
        # which 1.24.4 and 1.25.1 cut at every PEM block of root-cert.pem (util.PemCertBytestoString)
        pick = items[:1] if mode == "first" else list(enumerate(blocks))[-1:]
        if not pick:
            return [], [], f"{name} holds no certificate ztunnel {v} can read"
        i, b = pick[0]
        if b.label != b"CERTIFICATE":
            return [], [], (f"{p.nth(name, i, len(blocks))} is a {shown(b.type)} block, and ztunnel {v} reads the "
                            f"{mode} PEM block of {name} as its root")
        c = p.cert(b.der)
        if not isinstance(c, Certificate):
            return [], [], f"{p.nth(name, i, len(blocks))}, the root ztunnel {v} reads, is not a certificate it parses"
        others = [p.at(name, j, len(blocks), o) for j, bb in enumerate(blocks) if j != i and bb.label == b"CERTIFICATE"
                  and isinstance(o := p.cert(bb.der), Certificate) and not _same(o, c)]
        left_out = [f"{o} (ztunnel {v} trusts only the {mode} root)" for o in others]
        # that one root goes through add_parsable_certificates too (certificate.rs WorkloadCertificate::new)
        if (why := _anchor_problem(c)) is not None:
            return [], [f"{p.at(name, i, len(blocks), c)} ({why}; ztunnel drops it silently)", *left_out], None
        return [(i, c)], left_out, None
    trusted: list[tuple[int, Certificate]] = []
    dropped: list[str] = []
    for i, b in items:
        if b.label != b"CERTIFICATE":
            return [], [], (f"{p.nth(name, i, len(blocks))} is a {shown(b.type)} block, and ztunnel {v} wants every "
                            f"PEM item of {name} to be a certificate (parse_cert_multi)")
        c = p.cert(b.der)
        if not isinstance(c, Certificate):
            return [], [], (f"{p.nth(name, i, len(blocks))} is a CERTIFICATE block that does not parse, and "
                            f"ztunnel {v} parses every certificate of it (parse_cert_multi)")
        why = _anchor_problem(c)
        if why is None:
            trusted.append((i, c))
        else:
            dropped.append(f"{p.at(name, i, len(blocks), c)} ({why}; ztunnel drops it silently)")
    return trusted, dropped, None


def ztunnel_checks(p: Parsed, ca: Certificate, path: list[Certificate], v: Version) -> list[str]:
    """The ztunnel checks for version `v` on the verified `path` (ca-cert.pem first, the root last): raises the
    verdict (b) BundleError when ambient workloads cannot verify each other, returns warnings otherwise."""
    warnings: list[str] = []
    lead = "istiod would load it, but ambient workloads break"
    if three_level_broken(v) and len(path) > 1:
        chain = [c for b in p.blocks("cert-chain.pem") if b.label == b"CERTIFICATE"
                 and isinstance(c := p.cert(b.der), Certificate)]
        first_ok = bool(chain) and _same(chain[0], ca)
        if len(path) > 2 or not first_ok:
            why = (f"ca-cert.pem's issuer {p.where(path[1])} is not a root" if len(path) > 2
                   else "cert-chain.pem does not start with ca-cert.pem")
            raise refuse_b(f"{lead}: ztunnel {v} sends its peers only the first certificate of cert-chain.pem "
                           f"(istio/ztunnel#1061, fixed in 1.24.4 and 1.25.1), and {why}, so no peer can build "
                           "a path to the root; use root -> ca-cert.pem, or upgrade", THREE_LEVEL)
    # from 1.24.4 and 1.25.1 istiod splits cert-chain.pem at every PEM block (server.go CreateCertificate)
    if not three_level_broken(v) and (split := _each_block_a_certificate(p, "cert-chain.pem", v)) is not None:
        raise refuse_b(f"{lead}: {split}, so no ambient workload gets a certificate; remove the block",
                       ZTUNNEL_ROOTS)
    trusted, dropped, fatal = _roots(p, v)
    if fatal is not None:
        raise refuse_b(f"{lead}: {fatal}, so no ambient workload gets a certificate", ZTUNNEL_ROOTS)
    anchor = path[-1]
    if not any(_same(c, anchor) for _, c in trusted) and (webpki := _anchor_problem(anchor)) is not None:
        raise refuse_b(f"{lead}: ca-cert.pem chains to {p.where(anchor)}, which ztunnel {v} drops from its roots "
                       f"({webpki}); reissue that root", ZTUNNEL_ROOTS)
    if not any(_same(c, anchor) for _, c in trusted):
        mode = ztunnel_roots(v)
        fix = ("or upgrade to 1.24.6, 1.25.3 or 1.26" if mode == "all" else
               f"put that root {mode} in root-cert.pem, or upgrade to 1.24.6, 1.25.3 or 1.26, which trust every root")
        only = (f"it trusts only {', '.join(p.where(c) for _, c in trusted)}" if trusted
                else "it trusts no root of root-cert.pem")
        raise refuse_b(f"{lead}: ca-cert.pem chains to {p.where(anchor)}, which ztunnel {v} does not trust: {only}; "
                       f"{fix}", ZTUNNEL_ROOTS)
    if dropped:
        more = f" and {len(dropped) - 1} more" if len(dropped) > 1 else ""
        warnings.append(f"ztunnel does not trust {dropped[0]}{more}: ambient workloads here refuse peers whose "
                        "certificates chain to it (another cluster, or the next root of a rotation); ztunnel 1.24.6, "
                        "1.25.3 and 1.26 trust every root they parse.")
    return warnings
