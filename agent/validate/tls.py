"""The tls verdict: what pilot-agent does with file-mounted gateway certificates (secretcache.go
generateKeyCertFromExistingFiles, generateRootCertFromExistingFile), then what Envoy or clients would refuse."""

from __future__ import annotations

from collections.abc import Mapping

from agent.errors import BundleError
from agent.text import shown
from agent.validate.certs import Certificate, CertificateError
from agent.validate.chain import CertPool, VerifyError, verify
from agent.validate.common import Parsed, refuse_b, stamp
from agent.validate.info import BundleInfo, to_datetime
from agent.validate.keys import KeyError_, parse_private_key
from agent.validate.limits import Limits

__all__ = ["OPTIONAL_TLS_FILES", "TLS_FILES", "validate_tls"]

TLS_FILES = ("tls.key", "tls.crt", "ca.crt")
OPTIONAL_TLS_FILES = ("ca.crt",)
_NEEDS = "a tls bundle needs tls.key and tls.crt (ca.crt is optional)"


def _refuse(what: str, step: str, go: str) -> BundleError:
    from agent.validate.common import refuse

    return refuse(what, step, go, "pilot-agent would refuse it")


def validate_tls(files: Mapping[str, bytes], now: int, limits: Limits, *, ca_signs_cert: bool) -> BundleInfo:
    """The tls verdict. Raises BundleError (verdict a, or b with istiod_loads=True)."""
    for name in ("tls.key", "tls.crt"):
        if name not in files:
            raise BundleError(f"{name} is missing; {_NEEDS}.", check="generateKeyCertFromExistingFiles")
        if not files[name].strip():
            raise BundleError(f"{name} is empty; {_NEEDS}, each holding PEM data.",
                              check="generateKeyCertFromExistingFiles")
    p = Parsed(files, limits, now, ("tls.crt", "ca.crt", "tls.key"))
    leaf = _key_pair(p)
    has_ca = bool(files.get("ca.crt", b"").strip())
    roots = _roots(p) if has_ca else CertPool()
    if has_ca and ca_signs_cert:
        inters, _ = p.pool("tls.crt")
        try:
            verify(leaf, roots, inters, now, budget=limits.max_signature_checks)
        except VerifyError as err:
            from agent.validate.common import refuse

            raise refuse(f"tls.crt does not verify to ca.crt: {p.verify_reason(err, 'tls.crt', 'ca.crt')}",
                         "ca_signs_cert, x509 Verify", err.go,
                         "the agent refuses it, or set ca_signs_cert: false if ca.crt is the CA of client "
                         "certificates") from None
    _envoy_checks(p, leaf)
    warnings = _warnings(p, roots)
    certs = [c for b in p.blocks("tls.crt")
             if b.label == b"CERTIFICATE" and isinstance(c := p.cert(b.der), Certificate)]
    not_after = {"tls.crt": to_datetime(min(c.not_after for c in [leaf, *certs]))}
    if roots.certs:
        current = [c.not_after for c in roots.certs if c.not_before <= now <= c.not_after]
        not_after["ca.crt"] = to_datetime(min(current or [c.not_after for c in roots.certs]))
    return BundleInfo(
        kind="tls",
        not_after=not_after,
        expires_at=min(not_after.values()),
        root_fingerprints=tuple(c.fingerprint for c in roots.certs),
        serial=format(leaf.serial, "x"),
        warnings=tuple(dict.fromkeys(warnings)),
        not_before=to_datetime(leaf.not_before),
        fingerprint=leaf.fingerprint,
        root_expires_at=to_datetime(min(c.not_after for c in roots.certs)) if roots.certs else None,
    )


def _key_pair(p: Parsed) -> Certificate:
    """tls.LoadX509KeyPair, then util.ParseCertAndGetExpiryTimestamp (the first PEM block of tls.crt)."""
    from agent.validate.keys import key_pair_problem

    problem = key_pair_problem(p.blocks("tls.crt"), p.blocks("tls.key"))
    if problem is not None:
        if "does not match" in problem:
            what = "tls.key does not match tls.crt: the first certificate's public key belongs to another private key"
        elif "certificate input" in problem or "CERTIFICATE" in problem:
            what = "tls.crt has no PEM block labelled CERTIFICATE that Go's pem.Decode accepts"
        elif "key input" in problem or "rather than a key" in problem:
            what = "tls.key has no PEM block labelled ... PRIVATE KEY that Go's pem.Decode accepts"
        else:
            what = f"tls.key and tls.crt are not a key pair Go accepts ({shown(problem)})"
        raise _refuse(what, "secretcache.go generateKeyCertFromExistingFiles", problem)
    first = p.blocks("tls.crt")[0]
    c = p.cert(first.der)
    if isinstance(c, CertificateError):
        raise _refuse(f"tls.crt starts with a {shown(first.type)} block that is not a certificate",
                      "util.ParseCertAndGetExpiryTimestamp", f"failed to parse certificate: {c}")
    return c


def _roots(p: Parsed) -> CertPool:
    """istio crypto.go ParseRootCerts: every block parsed as a certificate, bad ones skipped; one must be left."""
    pool = CertPool()
    for b in p.blocks("ca.crt"):
        c = p.cert(b.der)
        if isinstance(c, Certificate):
            pool.add(c)
    if not pool.certs:
        raise _refuse("ca.crt holds no certificate Go can parse", "secretcache.go generateRootCertFromExistingFile",
                      "failed to parse root certs from file")
    return pool


def _envoy_checks(p: Parsed, leaf: Certificate) -> None:
    """Verdict (b) for gateways: Envoy loads all of tls.crt, clients refuse a certificate outside its validity."""
    from agent.validate.boring import parse_problem

    blocks = p.blocks("tls.crt")
    for i, b in enumerate(blocks):
        if b.label != b"CERTIFICATE":
            continue
        problem = parse_problem(b.der)
        if problem is not None:
            raise refuse_b(f"pilot-agent would load it (Go reads only the first certificate), but "
                           f"{p.nth('tls.crt', i, len(blocks))} is a CERTIFICATE block BoringSSL cannot parse "
                           f"({problem}), and Envoy refuses the whole chain", "unparsable-cert-for-envoy")
    if p.now > leaf.not_after:
        raise refuse_b(f"pilot-agent would serve it, but tls.crt expired at {stamp(leaf.not_after)}: every client "
                       "refuses it; issue a new certificate", "tls-leaf-validity")
    if p.now < leaf.not_before:
        raise refuse_b(f"pilot-agent would serve it, but tls.crt is not valid yet: notBefore is "
                       f"{stamp(leaf.not_before)}, so every client refuses it", "tls-leaf-validity")


def _warnings(p: Parsed, roots: CertPool) -> list[str]:
    out = []
    key_blocks = p.blocks("tls.key")
    if len(key_blocks) > 1:
        out.append(f"tls.key holds {len(key_blocks)} PEM blocks; Go uses the first PRIVATE KEY block, remove the "
                   "others.")
    first_key = next((b for b in key_blocks if b.label == b"PRIVATE KEY" or b.label.endswith(b" PRIVATE KEY")), None)
    if first_key is not None and first_key.label in (b"EC PRIVATE KEY", b"RSA PRIVATE KEY"):
        from agent.validate.keys import parse_ec, parse_pkcs1

        try:
            (parse_ec if first_key.label == b"EC PRIVATE KEY" else parse_pkcs1)(first_key.der)
        except KeyError_:
            try:
                parse_private_key(first_key.der)
                out.append(f"tls.key's {first_key.type} label does not match its encoding; Go tries every format, "
                           "other readers may not, so relabel it.")
            except KeyError_:
                pass
    ca_blocks = p.blocks("ca.crt") if "ca.crt" in p.files else []
    for i, b in enumerate(ca_blocks):
        c = p.cert(b.der)
        nth = p.nth("ca.crt", i, len(ca_blocks))
        if isinstance(c, CertificateError):
            out.append(f"{nth} is skipped by pilot-agent ({shown(str(c))}); remove it or fix it.")
        elif c.not_after < p.now:
            out.append(f"{p.where(c)} expired at {stamp(c.not_after)}; remove it once no client needs it.")
    return out
