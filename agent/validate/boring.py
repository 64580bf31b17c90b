"""What a workload's Envoy (1.40, BoringSSL) does with the chain istiod and pilot-agent hand it: a model of
BoringSSL's X509_verify_cert as Envoy calls it, used for verdict (b).

Read from BoringSSL's crypto/x509 (x509_vfy.cc, x509_lu.cc, v3_purp.cc, v3_ncons.cc, policy.cc, x_x509.cc) and
confirmed case by case against a real Envoy by tests/test_envoy_verdicts.py:

- what Envoy is given (istio 86c9f01): the certificate chain is the workload leaf, then cert-chain.pem, then
  root-cert.pem, as bytes (istiod's CSR answer, concatenated by pilot-agent); the trust bundle is root-cert.pem
  split into PEM blocks by `pkiutil.PemCertBytestoString` (which stops at the first block with no bytes),
  deduplicated and sorted as strings (`mergeTrustAnchorBytes`); with a non-empty ca-crl.pem, its CRLs are in the
  validation context and Envoy checks every certificate of the chain (X509_V_FLAG_CRL_CHECK_ALL);
- Envoy sets X509_V_FLAG_PARTIAL_CHAIN: any certificate of the trust bundle is an anchor, self-signed or not;
- path building is greedy and never backtracks: from the leaf up, the trust bundle is asked first (the first
  same-name certificate in its order that `X509_check_issued` accepts: name, AKI against SKI, keyCertSign), then
  the peer's chain (the first such certificate in the order sent); no signature is checked while building;
- only the certificates below the anchor (the "untrusted" ones) have their extensions checked: unhandled critical
  extensions, CA-ness, the purpose (an extendedKeyUsage must list serverAuth or clientAuth itself;
  anyExtendedKeyUsage does not count), and pathLenConstraint; a trust anchor's constraints are ignored;
- then CRLs, then signatures and validity of every certificate of the path (a UTCTime with a +hhmm offset parses
  but cannot be compared: "format error"), then name constraints of every CA (the anchor's too), including
  directoryName, which Go ignores, then RFC 5280 policy processing below the anchor.

The workload leaf is modelled as istiod issues it (empty subject, the spiffe URI, serverAuth+clientAuth, AKI =
ca-cert.pem's SKI). Certificates Go cannot parse are left out of the path model (BoringSSL may still load them;
`parse_problem` says whether it can). Names are compared by their DER, which BoringSSL's canonical comparison
would also match.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from agent.validate.certs import EKU, KU, Certificate
from agent.validate.crl import RevocationList, check_crl_signature_from
from agent.validate.der import (
    BOOLEAN,
    GENERALIZED_TIME,
    INTEGER,
    OBJECT_IDENTIFIER,
    OCTET_STRING,
    SEQUENCE,
    UTC_TIME,
    Str,
    ctx,
)
from agent.validate.names import RDN, NameError_, parse_name
from agent.validate.pem import Block, decode
from agent.validate.sig import check_signature

__all__ = [
    "BoringCert",
    "Failure",
    "build",
    "leaf_for",
    "parse_problem",
    "pem_cert_strings",
    "time_offset_fields",
    "trust_bundle_order",
    "verify",
]

#: X509_supported_extension: the critical extensions BoringSSL handles
_SUPPORTED = frozenset({(2, 5, 29, 15), (2, 5, 29, 17), (2, 5, 29, 19), (2, 5, 29, 32), (2, 5, 29, 37),
                        (2, 5, 29, 36), (2, 5, 29, 30), (2, 5, 29, 33), (2, 5, 29, 54)})
_EMAIL_ATTR = (1, 2, 840, 113549, 1, 9, 1)
_UTC = re.compile(rb"(\d\d)(\d\d)(\d\d)(\d\d)(\d\d)(\d\d)(Z|[+-]\d{4})")
_GEN = re.compile(rb"(\d{4})(\d\d)(\d\d)(\d\d)(\d\d)(\d\d)Z")


# --------------------------------------------------------------------------------------------- parsing


def _time_problem(s: Str) -> tuple[str | None, bool]:
    """asn1_parse_time with allow_utc_timezone_offset: (problem, uses an offset)."""
    for tag, pattern in ((UTC_TIME, _UTC), (GENERALIZED_TIME, _GEN)):
        if s.peek(tag):
            body = s.read(tag)
            m = pattern.fullmatch(body.data()) if body is not None else None
            if m is None:
                kind = "UTCTime" if tag == UTC_TIME else "GeneralizedTime"
                return f"a {kind} BoringSSL does not parse (it needs seconds, and a GeneralizedTime ends in Z)", False
            mo, d, h, mi, sec = (int(m[i]) for i in range(2, 7))
            if not (1 <= mo <= 12 and 1 <= d <= 31 and h < 24 and mi < 60 and sec < 60):
                return "a time BoringSSL does not parse", False
            return None, tag == UTC_TIME and m[7] != b"Z"
    return "a validity time that is neither UTCTime nor GeneralizedTime", False


def _scan(der: bytes) -> tuple[str | None, tuple[str, ...]]:
    """X509_parse_from_buffer's structure: (why BoringSSL refuses the DER or None, the validity fields written as
    a UTCTime with a timezone offset)."""
    s = Str(der)
    cert = s.read(SEQUENCE)
    if cert is None or not s.empty():
        return "its DER is not one certificate", ()
    tbs = cert.read(SEQUENCE)
    if tbs is None or cert.read(SEQUENCE) is None or cert.read_any() is None or not cert.empty():
        return "its DER is not a certificate", ()
    version = 0
    if tbs.peek(ctx(0, constructed=True)):
        wrapper = tbs.read(ctx(0, constructed=True))
        v = wrapper.read_int() if wrapper is not None else None
        if v is None or wrapper is None or not wrapper.empty() or v not in (0, 1, 2):
            return "its version is not v1, v2 or v3", ()
        version = v
    if tbs.read(INTEGER) is None or tbs.read(SEQUENCE) is None or tbs.read(SEQUENCE) is None:
        return "its serial, signature algorithm or issuer does not parse", ()
    validity = tbs.read(SEQUENCE)
    if validity is None:
        return "its validity does not parse", ()
    offsets = []
    for field_name in ("notBefore", "notAfter"):
        problem, offset = _time_problem(validity)
        if problem is not None:
            return f"its {field_name} is {problem}", ()
        if offset:
            offsets.append(field_name)
    if not validity.empty():
        return "its validity has extra fields", ()
    if tbs.read(SEQUENCE) is None or tbs.read(SEQUENCE) is None:
        return "its subject or public key does not parse", ()
    for tag in (ctx(1), ctx(2)):
        if version >= 1 and tbs.peek(tag) and tbs.read(tag) is None:
            return "its unique identifier does not parse", ()
    if version >= 2 and tbs.peek(ctx(3, constructed=True)):
        wrapper = tbs.read(ctx(3, constructed=True))
        exts = wrapper.read(SEQUENCE) if wrapper is not None else None
        if exts is None or wrapper is None or not wrapper.empty():
            return "its extensions do not parse", ()
        while not exts.empty():
            ext = exts.read(SEQUENCE)
            if ext is None or ext.read(OBJECT_IDENTIFIER) is None:
                return "an extension does not parse", ()
            if ext.peek(BOOLEAN) and ext.read(BOOLEAN) is None:
                return "an extension does not parse", ()
            if ext.read(OCTET_STRING) is None or not ext.empty():
                return "an extension does not parse", ()
    if not tbs.empty():
        return "it has bytes after the last field of its TBSCertificate, which Go ignores", ()
    return None, tuple(offsets)


def parse_problem(der: bytes) -> str | None:
    """Why BoringSSL's X509_parse_from_buffer refuses `der` (so Envoy refuses the whole file it is in), or None."""
    return _scan(der)[0]


def time_offset_fields(der: bytes) -> tuple[str, ...]:
    """The validity fields of `der` written as a UTCTime with a +hhmm/-hhmm offset, which BoringSSL parses but
    X509_cmp_time cannot compare (verification fails with "format error in certificate's notBefore field")."""
    return _scan(der)[1]


def _chunks(data: bytes) -> list[tuple[bytes, Block]]:
    out: list[tuple[bytes, Block]] = []
    start = 0
    while True:
        block, after = decode(data, start)
        if block is None or not block.der:
            return out
        chunk = data[start:] if after >= len(data) else data[start:after]
        out.append((chunk.removesuffix(b"\n").removeprefix(b"\n"), block))
        if after >= len(data):
            return out
        start = after


def pem_cert_strings(data: bytes) -> list[bytes]:
    """pkiutil.PemCertBytestoString: each PEM block with whatever precedes it, one leading and one trailing newline
    trimmed; stops at the first block pem.Decode does not find or whose body is empty."""
    return [chunk for chunk, _ in _chunks(data)]


def trust_bundle_order(root_cert: bytes) -> list[bytes]:
    """The CERTIFICATE blocks (DER) of the trust bundle pilot-agent gives Envoy, in Envoy's order
    (secretcache.go mergeTrustAnchorBytes: PemCertBytestoString, deduplicated, sorted as strings). Envoy
    parses the sorted text with BoringSSL, which reads each chunk's block as Go found it in root-cert.pem."""
    out: list[bytes] = []
    for _, block in sorted(dict(_chunks(root_cert)).items()):
        if block.label == b"CERTIFICATE" and block.der not in out:
            out.append(block.der)
    return out


# --------------------------------------------------------------------------------------------- the model


@dataclass(eq=False)
class BoringCert:
    """What X509_verify_cert reads of one certificate (x509v3_cache_extensions)."""

    raw: bytes
    subject: bytes
    issuer: bytes
    skid: bytes | None
    akid: bytes | None
    #: Go's KeyUsage bits, None without the extension
    ku: int | None
    bc: bool
    ca: bool
    pathlen: int
    v1: bool
    #: the extendedKeyUsage values Go knows (EKU.*), None without the extension
    eku: frozenset[int] | None
    critical: bool
    not_before: int
    not_after: int
    offsets: tuple[str, ...]
    subject_rdns: list[RDN]
    dns: list[str]
    emails: list[str]
    uris: list[str]
    ips: list[bytes]
    has_policies: bool
    require_explicit: int | None
    serial: int
    #: the Go certificate (None for the modelled workload leaf), for signatures and messages
    cert: Certificate | None = None
    nc: dict[str, tuple[list[object], list[object]]] = field(default_factory=dict)

    @property
    def self_issued(self) -> bool:
        return self.subject == self.issuer

    @property
    def self_signed(self) -> bool:
        """EXFLAG_SS: self-issued, AKI matching its own SKI, keyCertSign allowed."""
        return self.self_issued and _akid_ok(self, self) and not _ku_reject(self, KU.CERT_SIGN)

    @classmethod
    def of(cls, c: Certificate) -> BoringCert:
        ku = c.key_usage if c.has_ext((2, 5, 29, 15)) else None
        eku = frozenset(c.ext_key_usage) if c.has_ext((2, 5, 29, 37)) else None
        req = c.require_explicit_policy if (c.require_explicit_policy or c.require_explicit_policy_zero) else None
        nc: dict[str, tuple[list[object], list[object]]] = {}
        if c.has_name_constraints:
            nc = {
                "dns": (list(c.permitted_dns), list(c.excluded_dns)),
                "email": (list(c.permitted_emails), list(c.excluded_emails)),
                "uri": (list(c.permitted_uris), list(c.excluded_uris)),
                "dir": (list(c.permitted_dirnames), list(c.excluded_dirnames)),
                "ip": (list(c.permitted_ips), list(c.excluded_ips)),
                "other": (list(c.permitted_other), list(c.excluded_other)),
            }
        return cls(
            raw=c.raw, subject=c.raw_subject, issuer=c.raw_issuer, skid=c.subject_key_id, akid=c.authority_key_id,
            ku=ku, bc=c.bc_valid, ca=c.is_ca, pathlen=c.max_path_len if c.bc_valid else -1, v1=c.version == 1,
            eku=eku, critical=any(e.critical and e.oid not in _SUPPORTED for e in c.extensions),
            not_before=c.not_before, not_after=c.not_after, offsets=time_offset_fields(c.raw),
            subject_rdns=c.subject, dns=list(c.dns_names), emails=list(c.emails), uris=[u.raw for u in c.uris],
            ips=list(c.ips), has_policies=c.has_ext((2, 5, 29, 32)), require_explicit=req, serial=c.serial,
            cert=c, nc=nc,
        )


def leaf_for(ca: Certificate, now: int, uri: str | None) -> BoringCert:
    """The workload certificate istiod issues from `ca` (see testbed/mesh.py istiod_sign), with `uri` as its
    spiffe URI (None leaves it out, so that no URI name constraint applies to it)."""
    return BoringCert(
        raw=b"workload", subject=b"\x30\x00", issuer=ca.raw_subject, skid=None, akid=ca.subject_key_id,
        ku=KU.DIGITAL_SIGNATURE | KU.KEY_ENCIPHERMENT, bc=True, ca=False, pathlen=-1, v1=False,
        eku=frozenset({EKU.SERVER_AUTH, EKU.CLIENT_AUTH}), critical=False, not_before=now - 120,
        not_after=min(now + 86400, ca.not_after), offsets=(), subject_rdns=[], dns=[], emails=[],
        uris=[uri] if uri else [], ips=[],
        has_policies=False, require_explicit=None, serial=1,
    )


def _ku_reject(x: BoringCert, usage: int) -> bool:
    return x.ku is not None and not x.ku & usage


def _akid_ok(issuer: BoringCert, subject: BoringCert) -> bool:
    return not (subject.akid and issuer.skid and subject.akid != issuer.skid)


def _check_issued(issuer: BoringCert, subject: BoringCert) -> bool:
    """X509_check_issued: names, AKI against SKI, keyCertSign (no signature check)."""
    return issuer.subject == subject.issuer and _akid_ok(issuer, subject) and not _ku_reject(issuer, KU.CERT_SIGN)


def _check_ca(x: BoringCert) -> bool:
    if _ku_reject(x, KU.CERT_SIGN):
        return False
    if x.v1 and x.self_signed:
        return True
    return x.bc and x.ca


@dataclass(frozen=True)
class Failure:
    """BoringSSL's first error: its X509_verify_cert_error_string, the depth and certificate, and our kind."""

    reason: str
    depth: int
    cert: BoringCert
    kind: str
    #: the path BoringSSL built (leaf first) and how many of it are untrusted
    chain: tuple[BoringCert, ...] = ()


def build(leaf: BoringCert, untrusted: Sequence[BoringCert], trusted: Sequence[BoringCert]
           ) -> tuple[list[BoringCert], int, Failure | None]:
    """X509_verify_cert's path building with PARTIAL_CHAIN: (chain, last_untrusted, trust failure)."""
    def trusted_issuer(x: BoringCert) -> BoringCert | None:
        return next((t for t in trusted if _check_issued(t, x)), None)

    chain = [leaf]
    sk = list(untrusted)
    last_untrusted = 1
    x = leaf
    while len(chain) < 102:  # default depth 100, plus the leaf and the anchor
        if x.self_signed or trusted_issuer(x) is not None:
            break
        issuer = next((c for c in sk if _check_issued(c, x)), None)
        if issuer is None:
            break
        chain.append(issuer)
        sk.remove(issuer)
        last_untrusted += 1
        x = issuer
    chain_ss = None
    if chain[-1].self_signed and len(chain) > 1:
        chain_ss = chain.pop()
        last_untrusted -= 1
        x = chain[-1]
    while len(chain) < 102 and not x.self_signed:
        issuer = trusted_issuer(x)
        if issuer is None:
            break
        chain.append(issuer)
        x = issuer
    if last_untrusted < len(chain):  # check_trust: a trusted certificate is on the path (PARTIAL_CHAIN)
        return chain, last_untrusted, None
    if chain_ss is None or not _check_issued(chain_ss, x):
        reason = ("unable to get local issuer certificate" if last_untrusted >= len(chain)
                  else "unable to get issuer certificate")
        return chain, last_untrusted, Failure(reason, len(chain) - 1, x, "path-building", tuple(chain))
    chain.append(chain_ss)
    return chain, len(chain), Failure("self signed certificate in certificate chain", len(chain) - 1, chain_ss,
                                      "path-building", tuple(chain))


def _extensions(chain: list[BoringCert], last_untrusted: int, client: bool) -> Failure | None:
    """check_chain_extensions, on the certificates below the anchor only."""
    plen = 0
    want = EKU.CLIENT_AUTH if client else EKU.SERVER_AUTH
    for i in range(last_untrusted):
        x = chain[i]
        if x.critical:
            return Failure("unhandled critical extension", i, x, "critical-extension", tuple(chain))
        if i > 0 and not _check_ca(x):
            return Failure("invalid CA certificate", i, x, "not-ca", tuple(chain))
        if x.eku is not None and want not in x.eku:
            return Failure("unsupported certificate purpose", i, x, "eku", tuple(chain))
        if i > 1 and x.pathlen != -1 and plen > x.pathlen + 1:
            return Failure("path length constraint exceeded", i, x, "path-length", tuple(chain))
        if i == 0 or not x.self_issued:
            plen += 1
    return None


def _crls(chain: list[BoringCert], crls: Sequence[RevocationList], now: int) -> Failure | None:
    """check_revocation with X509_V_FLAG_CRL_CHECK_ALL: a CRL from the issuer of every certificate of the path."""
    last = len(chain) - 1
    for i, x in enumerate(chain):
        issuer = chain[i + 1] if i < last else x
        best: tuple[int, RevocationList, BoringCert] | None = None
        for rl in crls:
            if rl.raw_issuer != x.issuer:
                continue
            signer = issuer if not (rl.authority_key_id and issuer.skid and rl.authority_key_id != issuer.skid) \
                else next((c for c in chain[i + 2:] if c.subject == rl.raw_issuer and not (
                    rl.authority_key_id and c.skid and rl.authority_key_id != c.skid)), None)
            if signer is None:
                continue
            timely = rl.this_update <= now and (rl.next_update is None or rl.next_update > now)
            score = 1 if timely else 0
            if best is None or score > best[0]:
                best = (score, rl, signer)
        if best is None:
            return Failure("unable to get certificate CRL", i, x, "crl-missing", tuple(chain))
        _, rl, signer = best
        if _ku_reject(signer, KU.CRL_SIGN):
            return Failure("key usage does not include CRL signing", i, x, "crl-missing", tuple(chain))
        if rl.this_update > now:
            return Failure("CRL is not yet valid", i, x, "crl-expired", tuple(chain))
        if rl.next_update is not None and rl.next_update <= now:
            return Failure("CRL has expired", i, x, "crl-expired", tuple(chain))
        if signer.cert is not None and check_crl_signature_from(rl, signer.cert) is not None:
            return Failure("CRL signature failure", i, x, "crl-missing", tuple(chain))
        if x.serial in rl.revoked and x.cert is not None:
            return Failure("certificate revoked", i, x, "crl-revoked", tuple(chain))
    return None


def _signature_ok(child: BoringCert, parent: BoringCert) -> bool:
    c, p = child.cert, parent.cert
    if c is None or p is None:
        return True  # the workload leaf: istiod signs it with the key that matches ca-cert.pem
    return check_signature(c.sig_alg, c.sig_pub_algo, c.sig_hash, c.raw_tbs, c.signature, p.public_key,
                           p.crypto_key(), allow_sha1=True) is None


def _time(x: BoringCert, depth: int, now: int, chain: list[BoringCert]) -> Failure | None:
    if "notBefore" in x.offsets:
        return Failure("format error in certificate's notBefore field", depth, x, "time-encoding", tuple(chain))
    if x.not_before > now:
        return Failure("certificate is not yet valid", depth, x, "validity", tuple(chain))
    if "notAfter" in x.offsets:
        return Failure("format error in certificate's notAfter field", depth, x, "time-encoding", tuple(chain))
    if x.not_after <= now:
        return Failure("certificate has expired", depth, x, "validity", tuple(chain))
    return None


def _signatures_and_times(chain: list[BoringCert], now: int) -> Failure | None:
    """internal_verify: from the anchor down, each signature (not the anchor's own) and each validity."""
    n = len(chain) - 1
    xi = chain[n]
    xs = xi
    if not _check_issued(xi, xi):  # PARTIAL_CHAIN: a non-self-issued anchor is only checked for its time
        failure = _time(xi, n, now, chain)
        if failure is not None:
            return failure
        n -= 1
        if n < 0:
            return None
        xs = chain[n]
    while n >= 0:
        if xs is not xi and not _signature_ok(xs, xi):
            return Failure("certificate signature failure", n, xs, "signature", tuple(chain))
        failure = _time(xs, n, now, chain)
        if failure is not None:
            return failure
        n -= 1
        if n >= 0:
            xi, xs = xs, chain[n]
    return None


# --------------------------------------------------------------------------------------------- name constraints


def _canon_rdns(rdns: list[RDN]) -> list[tuple[tuple[tuple[int, ...], object], ...]]:
    """X509_NAME's canonical form, roughly: ASCII lower case, whitespace trimmed and collapsed, per RDN."""
    out = []
    for rdn in rdns:
        entries = []
        for oid, value in rdn:
            canon = " ".join(value.split()).translate(_LOWER) if isinstance(value, str) else value
            entries.append((oid, canon))
        out.append(tuple(sorted(entries, key=repr)))
    return out


_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def _dirname_rdns(der: bytes) -> list[RDN] | None:
    try:
        return parse_name(Str(der))
    except NameError_:
        return None


def _eq_case(a: str, b: str) -> bool:
    return a.translate(_LOWER) == b.translate(_LOWER)


def _suffix_case(a: str, b: str) -> bool:
    return len(a) >= len(b) and _eq_case(a[len(a) - len(b):], b)


def _nc_dns(name: str, base: str, excluding: bool) -> bool:
    if not base:
        return True
    name, base = name.removesuffix("."), base.removesuffix(".")
    if excluding and name.startswith("*.") and "." in base and _eq_case(name[2:], base.partition(".")[2]):
        return True
    if base.startswith("."):
        return _suffix_case(name, base)
    if len(name) > len(base):
        if name[len(name) - len(base) - 1] != ".":
            return False
        name = name[len(name) - len(base):]
    return _eq_case(name, base)


def _nc_email(name: str, base: str) -> bool | None:
    local, at, domain = name.partition("@")
    if not at or "@" in domain:
        return None
    if "@" in base and not base.startswith("@"):
        blocal, _, bdomain = base.partition("@")
        return local == blocal and _eq_case(domain, bdomain)
    base = base.removeprefix("@")
    if base.startswith("."):
        return _suffix_case(domain, base)
    return _eq_case(domain, base)


def _uri_host(uri: str) -> str | None:
    scheme, colon, rest = uri.partition(":")
    if not colon or not rest.startswith("//"):
        return None
    rest = rest[2:]
    host = rest.partition(":")[0] if ":" in rest else rest.partition("/")[0]
    return host or None


def _nc_uri(uri: str, base: str) -> bool | None:
    host = _uri_host(uri)
    if host is None:
        return None
    if base.startswith("."):
        return _suffix_case(host, base)
    return _eq_case(base, host)


def _nc_dir(name: list[RDN], base: object) -> bool:
    rdns = _dirname_rdns(base) if isinstance(base, bytes) else None
    if rdns is None:
        return False
    want, have = _canon_rdns(rdns), _canon_rdns(name)
    return have[:len(want)] == want


def _names_of(x: BoringCert) -> list[tuple[str, object]]:
    names: list[tuple[str, object]] = []
    if x.subject_rdns:
        names.append(("dir", x.subject_rdns))
        names += [("email", v) for rdn in x.subject_rdns for oid, v in rdn if oid == _EMAIL_ATTR]
    names += [("dns", v) for v in x.dns] + [("email", v) for v in x.emails] + [("uri", v) for v in x.uris]
    names += [("ip", v) for v in x.ips]
    return names


def _nc_check(x: BoringCert, nc: dict[str, tuple[list[object], list[object]]]) -> str | None:
    """NAME_CONSTRAINTS_check: None, or BoringSSL's error string."""
    for kind, value in _names_of(x):
        permitted, excluded = nc.get(kind, ([], []))
        for subtrees, excluding in ((permitted, False), (excluded, True)):
            if not subtrees:
                continue
            matched = False
            for base in subtrees:
                if kind == "ip":
                    return "unsupported name constraint type"
                if kind == "dir":
                    ok: bool | None = _nc_dir(value, base)  # type: ignore[arg-type]
                elif kind == "dns":
                    ok = _nc_dns(str(value), str(base), excluding)
                elif kind == "email":
                    ok = _nc_email(str(value), str(base))
                else:
                    ok = _nc_uri(str(value), str(base))
                if ok is None:
                    return "unsupported or invalid name syntax"
                if ok:
                    matched = True
                    break
            if excluding and matched:
                return "excluded subtree violation"
            if not excluding and not matched:
                return "permitted subtree violation"
    return None


def _name_constraints(chain: list[BoringCert]) -> Failure | None:
    for i in range(len(chain) - 1, -1, -1):
        x = chain[i]
        if i and x.self_issued:
            continue
        for j in range(len(chain) - 1, i, -1):
            if chain[j].nc:
                reason = _nc_check(x, chain[j].nc)
                if reason is not None:
                    return Failure(reason, i, x, "name-constraints", tuple(chain))
    return None


def _policy(chain: list[BoringCert]) -> Failure | None:
    """X509_policy_check's explicit-policy rule (RFC 5280 6.1), the anchor skipped. The policy graph is reduced
    to whether it is empty: empty from the first certificate without certificatePolicies on (the workload leaf
    has none)."""
    n = len(chain)
    if n <= 1:
        return None
    explicit = n + 1
    empty = False
    culprit = chain[0]
    for i in range(n - 2, -1, -1):
        x = chain[i]
        if not x.has_policies:
            empty = True
        if explicit == 0 and empty:
            return Failure("no explicit policy", i, culprit, "policy", tuple(chain))
        if (i == 0 or not x.self_issued) and explicit > 0:
            explicit -= 1
        if x.require_explicit is not None and x.require_explicit < explicit:
            explicit = x.require_explicit
            culprit = x
    if explicit == 0 and empty:
        return Failure("no explicit policy", 0, culprit, "policy", tuple(chain))
    return None


def verify(leaf: BoringCert, untrusted: Sequence[BoringCert], trusted: Sequence[BoringCert],
           crls: Sequence[RevocationList] | None, now: int, *, client: bool) -> Failure | None:
    """X509_verify_cert as Envoy runs it on a peer's chain (`untrusted`, in the order sent) against the trust
    bundle (`trusted`, in Envoy's order): None when Envoy accepts it, else the first error. `client`: Envoy is
    the server verifying a client certificate (purpose sslclient); else the client verifying a server."""
    chain, last_untrusted, failure = build(leaf, untrusted, trusted)
    if failure is not None:
        return failure
    return (_extensions(chain, last_untrusted, client)
            or (_crls(chain, crls, now) if crls else None)
            or _signatures_and_times(chain, now)
            or _name_constraints(chain)
            or _policy(chain))
