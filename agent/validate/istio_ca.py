"""The istio-ca verdict: what istiod (istio 86c9f01) does with a plugged-in ROOT_CA_DIR at startup, then what
breaks for workloads although istiod loads it (verdict b), then what is merely worth a warning (verdict c).

Startup (createIstioCA) runs every check the reload handler (handleEvent) runs, plus IsCA, minTTL and signing
istiod's own certificate, so a bundle is judged by startup: a reload that passes would fail the next restart.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping

from agent.errors import BundleError
from agent.istio_version import Mesh, Version, fips_applies, reload_rule
from agent.text import shown
from agent.validate import boring
from agent.validate.certs import EKU, KU, Certificate, CertificateError
from agent.validate.chain import CertPool, VerifyError, verify
from agent.validate.common import Parsed, refuse, refuse_b, stamp
from agent.validate.crl import CRLError, RevocationList, missing_crl_signers, parse_crl
from agent.validate.info import BundleInfo, to_datetime
from agent.validate.keys import (
    ECKey,
    Ed25519Key,
    KeyError_,
    PrivateKey,
    RSAKey,
    key_pair_problem,
    parse_pem_encoded_key,
)
from agent.validate.limits import Limits
from agent.validate.pem import Block
from agent.validate.sig import SignatureCache

__all__ = ["ISTIO_CA_FILES", "OPTIONAL_ISTIO_CA_FILES", "reload_problem", "validate_istio_ca"]

ISTIO_CA_FILES = ("ca-key.pem", "ca-cert.pem", "root-cert.pem", "cert-chain.pem")
OPTIONAL_ISTIO_CA_FILES = ("ca-crl.pem",)
_NEEDS = "an istio-ca bundle needs ca-key.pem, ca-cert.pem, root-cert.pem and cert-chain.pem"
_SHARED = ("root-cert.pem", "cert-chain.pem")  # istiod sends both to every workload


def _blank(data: bytes) -> bool:
    return not data.strip()


def _first(p: Parsed, name: str) -> Block:
    """pem.Decode's first block of `name`, or the refusal istiod's parsers give for a file without one."""
    blocks = p.blocks(name)
    if blocks:
        return blocks[0]
    data = p.files[name]
    if _blank(data):
        what = f"{name} is empty; {_NEEDS}, each holding PEM data"
    elif b"-----BEGIN" in data:
        what = (f"{name} has a PEM block that Go's pem.Decode cannot decode (corrupt base64, or an indented or "
                "mismatched header or footer line)")
    else:
        what = f"{name} holds no PEM block"
    go = "invalid PEM-encoded key" if name == "ca-key.pem" else "invalid PEM encoded certificate"
    step = "crypto.go ParsePemEncodedKey" if name == "ca-key.pem" else "crypto.go ParsePemEncodedCertificate"
    raise refuse(what, step, go)


# --------------------------------------------------------------------------------------------- verdict (a)


def _completeness(files: Mapping[str, bytes]) -> None:
    """istio_ca.go checkCABundleCompleteness: all four files exist (else "incomplete signing CA bundle")."""
    if "tls.crt" in files:
        raise BundleError("tls.crt must not be in an istio-ca bundle: istiod would switch to the kubernetes.io/tls "
                          "layout (istio_ca.go detectSigningCABundleAndCRL).", check="detectSigningCABundleAndCRL")
    for name in ISTIO_CA_FILES:
        if name not in files:
            raise BundleError(f"{name} is missing; {_NEEDS} (istio_ca.go checkCABundleCompleteness: incomplete "
                              "signing CA bundle detected).", check="checkCABundleCompleteness")


def _ca_cert(p: Parsed) -> Certificate:
    """ParsePemEncodedCertificate(ca-cert.pem): the first block, whatever its label."""
    first = _first(p, "ca-cert.pem")
    c = p.cert(first.der)
    if isinstance(c, CertificateError):
        kind = "" if first.label == b"CERTIFICATE" else f" starts with a block labelled {shown(first.type)}, which"
        what = (f"ca-cert.pem{kind} is not a valid X.509 certificate ({shown(str(c))})" if kind
                else f"ca-cert.pem is not a valid X.509 certificate ({shown(str(c))})")
        raise refuse(what, "keycertbundle.go Verify", "failed to parse cert PEM: failed to parse X.509 certificate")
    return c


def _verify_chain(p: Parsed, ca: Certificate, roots: CertPool, root_skips: list[str], inters: CertPool,
                  sigs: SignatureCache) -> list[list[Certificate]]:
    try:
        return verify(ca, roots, inters, p.now, budget=p.limits.max_signature_checks, sigs=sigs)
    except VerifyError as err:
        go = err.go  # istiod wraps it: "cannot verify the cert with the provided root chain and cert pool ..."
        if not roots.certs:
            data = p.files["root-cert.pem"]
            if _blank(data):
                lead = "root-cert.pem is empty"
            elif not p.blocks("root-cert.pem"):
                lead = "root-cert.pem holds no PEM block Go's pem.Decode accepts"
            else:
                lead = "root-cert.pem holds no certificate istiod can use: " + "; ".join(root_skips[:3])
            raise refuse(f"{lead}, so ca-cert.pem cannot chain to a root", "keycertbundle.go Verify", go) from None
        raise refuse(p.verify_reason(err, "ca-cert.pem", "root-cert.pem"), "keycertbundle.go Verify", go) from None


def _key(p: Parsed) -> PrivateKey:
    """ParsePemEncodedKey(ca-key.pem)."""
    first = _first(p, "ca-key.pem")
    try:
        return parse_pem_encoded_key(first)
    except KeyError_ as exc:
        go = f"failed to parse private key PEM: {exc}"
        proc = first.headers.get(b"Proc-Type", b"")
        if first.label == b"ENCRYPTED PRIVATE KEY" or b"ENCRYPTED" in proc:
            what = "ca-key.pem is encrypted with a passphrase; istiod needs an unencrypted private key"
        elif first.label not in (b"PRIVATE KEY", b"RSA PRIVATE KEY", b"EC PRIVATE KEY"):
            what = (f"ca-key.pem starts with a block labelled {shown(first.type)}; istiod reads only the first block "
                    "and needs a PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY there")
        elif "crypto/rsa:" in str(exc):
            what = "ca-key.pem holds an RSA key whose numbers are inconsistent, which Go's crypto/rsa refuses"
        else:
            what = (f"ca-key.pem holds a {shown(first.type)} block that is not a valid private key: Go picks the "
                    "parser from the label, and this one does not parse")
        raise refuse(what, "crypto.go ParsePemEncodedKey", go) from None


def _key_pair(p: Parsed) -> None:
    problem = key_pair_problem(p.blocks("ca-cert.pem"), p.blocks("ca-key.pem"))
    if problem is None:
        return
    if "does not match" in problem or "type does not match" in problem:
        what = ("ca-key.pem does not match ca-cert.pem: the certificate's public key belongs to another private key; "
                "store the key that was issued with ca-cert.pem")
    elif "CERTIFICATE" in problem or "certificate input" in problem:
        what = "ca-cert.pem has no block labelled CERTIFICATE, which tls.X509KeyPair needs"
    elif "key input" in problem or "rather than a key" in problem:
        what = "ca-key.pem has no block labelled ... PRIVATE KEY, which tls.X509KeyPair needs"
    else:
        what = f"ca-key.pem and ca-cert.pem are not a key pair tls.X509KeyPair accepts ({shown(problem)})"
    raise refuse(what, "keycertbundle.go Verify (tls.X509KeyPair)", f"the cert does not match the key: {problem}")


def _crls(p: Parsed) -> list[RevocationList] | None:
    """The CRL part of Verify, when ca-crl.pem is present and not empty."""
    data = p.files.get("ca-crl.pem")
    if not data:
        return None
    signers = []
    chain_blocks = p.blocks("cert-chain.pem")
    for i, b in enumerate(chain_blocks):
        c = p.cert(b.der)
        if isinstance(c, CertificateError):
            raise refuse(f"with ca-crl.pem present istiod parses every block of cert-chain.pem as a certificate, and "
                         f"{p.nth('cert-chain.pem', i, len(chain_blocks))} (labelled {shown(b.type)}) is not one",
                         "keycertbundle.go Verify", f"failed to parse cert chain: {c}")
        signers.append(c)
    crls = []
    blocks = p.blocks("ca-crl.pem")
    for i, b in enumerate(blocks):
        try:
            crls.append(parse_crl(b.der))
        except CRLError as exc:
            raise refuse(f"{p.nth('ca-crl.pem', i, len(blocks))} is not a CRL Go can parse ({shown(str(exc))})",
                         "keycertbundle.go Verify", f"failed to parse CRL PEM: {exc}") from None
    missing = missing_crl_signers(signers, crls)
    if missing:
        names = ", ".join(shown(c.subject_str, 80) for c in missing[:3])
        raise refuse(f"ca-crl.pem has no CRL signed by {names} from cert-chain.pem (istiod wants one from every "
                     "certificate there, signed by a CA with cRLSign)", "keycertbundle.go Verify",
                     f"missing CRL signed by certificates: [{names}]")
    return crls


def _is_ca(ca: Certificate) -> None:
    """ca.go NewPluggedCertIstioCAOptions: the signing certificate must be a CA (startup only)."""
    if ca.is_ca:
        return
    why = "basicConstraints CA is false" if ca.bc_valid else "no basicConstraints extension"
    raise refuse(f"ca-cert.pem cannot be istiod's signing CA: it is not a CA ({why}), so istiod refuses it at "
                 "startup (a reload would accept it and then sign with a non-CA)", "ca.go NewPluggedCertIstioCAOptions",
                 "certificate is not authorized to sign other certificates")


def _min_ttl(p: Parsed) -> None:
    """ca.go NewIstioCA -> minTTL: cert-chain.pem's first block must be a certificate that has not expired."""
    data = p.files["cert-chain.pem"]
    if not data:
        return
    blocks = p.blocks("cert-chain.pem")
    if not blocks:
        what = ("cert-chain.pem is empty (only whitespace)" if _blank(data)
                else "cert-chain.pem holds no PEM block Go's pem.Decode accepts")
        raise refuse(f"{what}, and istiod's startup reads its first block as a certificate", "ca.go minTTL",
                     "failed to get cert chain TTL: invalid PEM encoded certificate")
    c = p.cert(blocks[0].der)
    if isinstance(c, CertificateError):
        raise refuse(f"cert-chain.pem starts with a block labelled {shown(blocks[0].type)} that is not a certificate, "
                     "and istiod's startup reads the first block as one", "ca.go minTTL",
                     "failed to get cert chain TTL: failed to parse X.509 certificate")
    if c.not_after <= p.now:
        raise refuse(f"cert-chain.pem starts with {p.where(c)}, which expired at {stamp(c.not_after)}, and istiod's "
                     "startup takes the chain's lifetime from its first certificate", "ca.go minTTL",
                     "cert chain has expired")


def _gen_key_cert(p: Parsed, ca: Certificate, key: PrivateKey) -> None:
    """certcontroller.go initDNSCertsIstiod -> GenKeyCert -> x509.CreateCertificate with the CA key."""
    if ca.public_key is not None:
        from agent.validate.keys import public_key_mismatch

        if public_key_mismatch(ca, key) is not None:
            raise refuse("ca-key.pem's first block is not the key of ca-cert.pem's first block, which istiod signs "
                         "with", "GenKeyCert (x509.CreateCertificate)",
                         "x509: provided PrivateKey doesn't match parent's PublicKey")
    if isinstance(key, RSAKey) and key.bits < 1024:
        raise refuse(f"ca-key.pem is a {key.bits}-bit RSA key: it parses and matches, but Go refuses to sign with "
                     "fewer than 1024 bits, so istiod cannot issue its own certificate",
                     "GenKeyCert (x509.CreateCertificate)",
                     f"crypto/rsa: {key.bits}-bit keys are insecure (see https://go.dev/pkg/crypto/rsa#hdr-Minimum_key_size)")


# --------------------------------------------------------------------------------------------- verdict (b)


def _self_issued(c: Certificate) -> bool:
    return c.raw_issuer == c.raw_subject


def _key_leak(p: Parsed) -> None:
    for name in _SHARED:
        data = p.files[name]
        if b"PRIVATE KEY-----" in data:
            raise refuse_b(f"istiod would load it, but {name} carries a PRIVATE KEY block, and istiod sends {name} "
                           "as it is to every workload: remove the key", "key-in-public-file")


def _envoy_unparsable(p: Parsed) -> None:
    """Every workload's Envoy loads all of cert-chain.pem and root-cert.pem (its certificate chain ends with
    both); a CERTIFICATE block BoringSSL cannot parse makes it refuse the whole secret, whether Go skipped the block
    or parsed it (Go ignores bytes after a TBSCertificate's extensions and a UTCTime without seconds)."""
    for name in _SHARED:
        blocks = p.blocks(name)
        for i, b in enumerate(blocks):
            if b.label != b"CERTIFICATE":
                continue
            problem = boring.parse_problem(b.der)
            if problem is None:
                continue
            go = isinstance(p.cert(b.der), Certificate)
            lead = ("istiod would load it" if go else "istiod would load it (Go skips the block)")
            raise refuse_b(
                f"{lead}, but {p.nth(name, i, len(blocks))} is a CERTIFICATE block BoringSSL cannot parse ({problem}), "
                f"and istiod hands {name} to every workload, whose Envoy refuses the whole file",
                "unparsable-cert-for-envoy")


#: Failure.kind -> the check that names it in a verdict (b)
_CHECKS = {
    "eku": "workload-eku-client-auth", "path-length": "workload-path-length", "crl-missing": "workload-crl-missing",
    "crl-expired": "workload-crl-expired", "crl-revoked": "workload-crl-revoked",
    "critical-extension": "workload-critical-extension", "validity": "workload-path-validity",
    "time-encoding": "workload-time-encoding", "name-constraints": "workload-name-constraints",
    "policy": "workload-policy",
}
_DIRECTIONS = {
    ("client",): "as client certificates (inbound)",
    ("server",): "as server certificates (outbound)",
    ("client", "server"): "both ways",
}


class _Envoy:
    """The boring model's inputs for this bundle: what a workload's Envoy is given (see agent/validate/boring.py)."""

    def __init__(self, p: Parsed, ca: Certificate, crls: list[RevocationList] | None) -> None:
        self.p = p
        self.ca = ca
        self.crls = crls
        self.untrusted = [boring.BoringCert.of(c) for name in _SHARED for b in p.blocks(name)
                          if b.label == b"CERTIFICATE" and isinstance(c := p.cert(b.der), Certificate)]
        self.trusted = [boring.BoringCert.of(c) for der in boring.trust_bundle_order(p.files["root-cert.pem"])
                        if isinstance(c := p.cert(der), Certificate)]

    def verify(self, uri: str | None, *, client: bool) -> boring.Failure | None:
        leaf = boring.leaf_for(self.ca, self.p.now, uri)
        return boring.verify(leaf, self.untrusted, self.trusted, self.crls, self.p.now, client=client)

    def path(self) -> tuple[list[boring.BoringCert], int]:
        """The path BoringSSL builds for a workload certificate, leaf first, and how many of it are untrusted."""
        chain, last_untrusted, _ = boring.build(boring.leaf_for(self.ca, self.p.now, None), self.untrusted,
                                                self.trusted)
        return chain, last_untrusted

    def where(self, x: boring.BoringCert) -> str:
        return "the workload certificate" if x.cert is None else self.p.where(x.cert)


def _envoy_problem(env: _Envoy) -> BundleError | None:
    """Verdict (b) from the model of Envoy's BoringSSL: what Envoy refuses, in which direction. The workload's
    spiffe URI is left out: the trust domain is not in the bundle (URI name constraints are a warning)."""
    failures = {d: env.verify(None, client=d == "client") for d in ("client", "server")}
    broken = tuple(d for d, f in failures.items() if f is not None)
    if not broken:
        return None
    f = failures[broken[0]]
    assert f is not None
    check = _CHECKS.get(f.kind, "workload-path-building")
    who = env.where(f.cert)
    how = _DIRECTIONS[broken]
    at = f"\"{f.reason}\" at depth {f.depth}"
    if f.kind == "eku":
        what = (f"{who} has an extendedKeyUsage without "
                f"{'clientAuth' if 'client' in broken else 'serverAuth'}"
                f"{' or serverAuth' if len(broken) == 2 else ''} (BoringSSL checks every CA below the anchor; "
                "anyExtendedKeyUsage does not count)")
    elif f.kind == "path-length":
        what = (f"{who} has pathlen:{f.cert.pathlen} and is not the trust anchor, so BoringSSL counts ca-cert.pem "
                "below it")
    elif f.kind == "critical-extension":
        what = f"{who} has a critical extension BoringSSL does not handle"
    elif f.kind == "validity":
        what = (f"its path goes through {who}, outside its validity: Envoy takes the first matching root of the "
                "trust bundle as pilot-agent sorts it and never backtracks")
    elif f.kind == "time-encoding":
        what = (f"{who} writes its validity as a UTCTime with a timezone offset, which BoringSSL parses but cannot "
                "compare")
    elif f.kind == "name-constraints":
        what = (f"{who} violates the name constraints of a CA above it as BoringSSL applies them (directoryName "
                "constraints too, which Go ignores)")
    elif f.kind == "policy":
        what = (f"{who} requires an explicit certificate policy (requireExplicitPolicy="
                f"{f.cert.require_explicit}), and workload certificates carry none")
    elif f.kind == "crl-missing":
        what = (f"ca-crl.pem has no usable CRL for {who} from its issuer, and Envoy, once given a CRL, needs one "
                "from every CA of the chain")
    elif f.kind == "crl-expired":
        what = f"the CRL in ca-crl.pem that covers {who} is outside its thisUpdate..nextUpdate window"
    elif f.kind == "crl-revoked":
        what = f"ca-crl.pem revokes {who}"
    else:
        what = (f"building its path greedily (the first certificate whose name and key id match, no backtracking), "
                f"Envoy gets stuck at {who}")
    return refuse_b(f"istiod would load it, but Envoy refuses every workload certificate {how}: {what} ({at})", check)


def _same_ca(a: Certificate, b: Certificate) -> bool:
    """`a` is `b` or another issuance of it: the same subject and public key, so it verifies what `b` signs."""
    return a.raw == b.raw or (a.raw_subject == b.raw_subject and a.raw_spki == b.raw_spki)


def _workload_checks(p: Parsed, ca: Certificate, roots: CertPool, crls: list[RevocationList] | None) -> _Envoy:
    """Verdict (b); returns the Envoy model for the warnings."""
    _key_leak(p)
    _envoy_unparsable(p)
    chain_certs = [c for b in p.blocks("cert-chain.pem") if b.label == b"CERTIFICATE"
                   and isinstance(c := p.cert(b.der), Certificate)]
    # another issuance of ca-cert.pem (same subject and key, another serial: what a rotation or a re-issue makes)
    # verifies workload certificates as well as ca-cert.pem itself: istio's own testdata pairs them so
    if not roots.contains(ca) and not any(_same_ca(c, ca) for c in chain_certs):
        lead = ("cert-chain.pem is empty" if not p.files["cert-chain.pem"].strip()
                else "cert-chain.pem lacks ca-cert.pem")
        raise refuse_b(
            f"istiod would load it, but {lead}: istiod hands cert-chain.pem to workloads as the chain above their "
            "certificates, so cert-chain.pem must hold ca-cert.pem's certificate (first, then its issuers), else "
            "peers cannot verify workload certificates", "chain-lacks-ca-cert")
    if ca.key_usage != 0 and ca.key_usage & KU.CERT_SIGN == 0:
        raise refuse_b(
            "istiod would load it, but ca-cert.pem's keyUsage lacks keyCertSign: Go ignores keyUsage on the "
            "certificate it signs with, Envoy does not, and refuses every workload certificate istiod issues",
            "workload-key-cert-sign")
    env = _Envoy(p, ca, crls)
    problem = _envoy_problem(env)
    if problem is not None:
        raise problem
    return env


def _serving_problem(p: Parsed, chains: list[list[Certificate]]) -> None:
    """Verdict (b) from Go's side: istiod signs its own serving certificate (DNS istiod.istio-system.svc) with
    ca-cert.pem and sends it with cert-chain.pem (ca.go signWithCertChain); pilot-agent verifies it with Go against
    root-cert.pem (pilot/pkg/grpc/tls.go getTLSDialOption). That certificate sits one level below ca-cert.pem, so
    a pathLenConstraint that admits ca-cert.pem can still refuse it (verify.go isValid: "too many intermediates"),
    and ca-cert.pem's own name constraints apply to it. Go accepts it if any of ca-cert.pem's paths does."""
    from agent.validate.constraints import dns_name_refused

    problems: list[str] = []
    for chain in chains:
        # chain[j] has j CA certificates (ca-cert.pem included) between it and the serving certificate
        tight = next((c for j, c in enumerate(chain) if j and c.bc_valid and 0 <= c.max_path_len < j), None)
        refusing = next(((c, err) for c in chain if (err := dns_name_refused([c], _ISTIOD_DNS))), None)
        if tight is not None:
            problems.append(f"{p.where(tight)} has pathlen:{tight.max_path_len}, which leaves no room below "
                            "ca-cert.pem (\"too many intermediates for path length constraint\")")
        elif refusing is not None:
            problems.append(f"the name constraints of {p.where(refusing[0])} refuse {_ISTIOD_DNS}"
                            f" ({shown(refusing[1])})")
        else:
            return
    if problems:
        raise refuse_b(
            f"istiod would load it, but {problems[0]}: pilot-agent (Go's x509) refuses the serving certificate "
            "istiod signs for itself, so no workload gets config or certificates", "istiod-serving-cert")


#: the first name istiod signs its serving certificate for (certcontroller.go getDNSNames)
_ISTIOD_DNS = "istiod.istio-system.svc"


# --------------------------------------------------------------------------------------------- verdict (c)


def _group(out: list[str], items: list[str], one: str, many: str) -> None:
    """One warning per kind and file: the first item named, the rest counted."""
    if len(items) == 1:
        out.append(one.format(items[0]))
    elif items:
        out.append(many.format(len(items), items[0]))


#: the trust domain istiod uses unless meshConfig.trustDomain says otherwise
_DEFAULT_TRUST_DOMAIN = "cluster.local"


def _envoy_warnings(env: _Envoy) -> list[str]:
    """Verdict (c) from the Envoy model: what Envoy accepts but depends on something outside the bundle, or what
    Go and OpenSSL peers would refuse although Envoy accepts it."""
    out: list[str] = []
    path, last_untrusted = env.path()
    uri = f"spiffe://{_DEFAULT_TRUST_DOMAIN}/ns/default/sa/default"
    constrained = [x for x in path[1:] if x.nc and (x.nc["uri"][0] or x.nc["uri"][1])]
    if constrained:
        f = env.verify(uri, client=True) or env.verify(uri, client=False)
        who = env.where(constrained[-1])
        if f is not None and f.kind == "name-constraints" and f.depth == 0:
            out.append(f"{who} constrains URI names so that Envoy refuses every workload certificate of trust domain "
                       f"{_DEFAULT_TRUST_DOMAIN} (Istio's default), both ways (BoringSSL: \"{f.reason}\"); the bundle "
                       "is right only for a mesh whose meshConfig.trustDomain these constraints permit.")
        else:
            out.append(f"{who} constrains URI names; Envoy applies them to every workload's "
                       "spiffe://<trust domain>/... URI, so make sure the mesh's trust domain is permitted (trust "
                       f"domain {_DEFAULT_TRUST_DOMAIN} is).")
    for i in range(max(last_untrusted, 2), len(path)):
        x = path[i]
        if x.pathlen != -1 and i - 1 > x.pathlen:
            out.append(f"{env.where(x)} is the trust anchor and has pathlen:{x.pathlen}, which leaves no room for "
                       "the certificates istiod issues under ca-cert.pem: Envoy ignores a trust anchor's constraints "
                       "and accepts them, but Go's crypto/x509 and OpenSSL do not (\"too many intermediates for path "
                       "length constraint\"), so pilot-agent verifying istiod's own serving certificate and every "
                       "Go or OpenSSL peer of the mesh would refuse them.")
        if x.eku is not None and EKU.ANY not in x.eku and EKU.CLIENT_AUTH not in x.eku:
            out.append(f"{env.where(x)} is the trust anchor and its extendedKeyUsage lacks clientAuth: Envoy ignores "
                       "a trust anchor's extendedKeyUsage, but Go peers verifying client certificates would refuse "
                       "workload certificates.")
    anchor = path[-1]
    if last_untrusted < len(path) and not anchor.self_signed:
        out.append(f"the trust anchor {env.where(anchor)} is not a self-signed root; istiod, Go and Envoy (which "
                   "verifies partial chains) trust it, but TLS stacks that verify only up to self-signed roots will "
                   "not.")
    return out


def _warnings(p: Parsed, ca: Certificate, key: PrivateKey, chain: list[Certificate], env: _Envoy) -> list[str]:
    out: list[str] = []
    # another issuance of a certificate on the path (same subject and key) stands for it, as `_same_ca` says
    on_path = {(c.raw_subject, c.raw_spki) for c in chain}
    for name in ("ca-cert.pem", "ca-key.pem"):
        n = len(p.blocks(name))
        if n > 1:
            out.append(f"{name} holds {n} PEM blocks; istiod reads only the first, so remove the others.")
    for name in _SHARED:
        blocks = p.blocks(name)
        skipped, expired, future, extra = [], [], [], []
        for i, b in enumerate(blocks):
            nth = p.nth(name, i, len(blocks))
            c = p.cert(b.der) if b.label == b"CERTIFICATE" else None
            if b.label != b"CERTIFICATE":
                skipped.append(f"{nth} (labelled {shown(b.type)})")
            elif isinstance(c, CertificateError):
                skipped.append(f"{nth} ({shown(str(c))})")
            elif b.headers:
                skipped.append(f"{nth} (it carries PEM headers)")
            elif c is not None and (c.raw_subject, c.raw_spki) not in on_path:
                here = p.at(name, i, len(blocks), c)
                if c.not_after < p.now:
                    expired.append(f"{here} expired at {stamp(c.not_after)}")
                elif c.not_before > p.now:
                    future.append(f"{here} is valid only from {stamp(c.not_before)}")
                elif name == "cert-chain.pem":
                    extra.append(here)
        _group(out, skipped, "istiod skips {}; remove or fix it.",
               f"istiod skips {{}} blocks of {name} ({{}}, ...); remove or fix them.")
        _group(out, expired, "{} and is not on ca-cert.pem's chain; istiod ignores it, remove it once no workload "
               "needs it.", f"{name} holds {{}} expired certificates off ca-cert.pem's chain ({{}}, ...); remove them "
               "once no workload needs them.")
        _group(out, future, "{} and is not on ca-cert.pem's chain yet.",
               f"{name} holds {{}} not-yet-valid certificates off ca-cert.pem's chain ({{}}, ...).")
        _group(out, extra, "{} is not on ca-cert.pem's chain; istiod still sends it to every workload, so remove it.",
               "cert-chain.pem holds {} certificates that are not on ca-cert.pem's chain ({}, ...); istiod still "
               "sends them to every workload, so remove them.")
    chain_blocks = [b for b in p.blocks("cert-chain.pem") if b.label == b"CERTIFICATE"]
    if chain_blocks and chain_blocks[0].der != ca.raw and any(b.der == ca.raw for b in chain_blocks):
        out.append("cert-chain.pem does not start with ca-cert.pem's certificate; Go and Envoy build the path "
                   "anyway, but put it first (then its issuers, root last).")
    if isinstance(key, Ed25519Key):
        out.append("ca-key.pem is an Ed25519 key: Go and BoringSSL accept it, other TLS stacks in the mesh may not.")
    if isinstance(key, ECKey) and key.curve == "P-224":
        out.append("ca-key.pem is a P-224 key (112-bit security); use P-256 or stronger.")
    if isinstance(key, RSAKey) and key.bits < 2048:
        out.append(f"ca-key.pem is a {key.bits}-bit RSA key; use 2048 bits or more.")
    out += _envoy_warnings(env)
    if "ca-crl.pem" in p.files and not p.files["ca-crl.pem"]:
        out.append("ca-crl.pem is empty, so istiod checks no CRL; remove it or fill it.")
    return out


# --------------------------------------------------------------------------------------------- entry points


def validate_istio_ca(files: Mapping[str, bytes], now: int, limits: Limits, mesh: Mesh | None = None) -> BundleInfo:
    """The istio-ca verdict; `mesh` adds the checks of its Istio version, data plane and compliance policy
    (agent/istio_version.py). Raises BundleError (verdict a, or b with istiod_loads=True)."""
    _completeness(files)
    p = Parsed(files, limits, now, ("ca-cert.pem", "root-cert.pem", "cert-chain.pem", "ca-key.pem", "ca-crl.pem"))
    sigs = SignatureCache()
    # keycertbundle.go Verify, in its order
    roots, root_skips = p.pool("root-cert.pem")
    inters, _ = p.pool("cert-chain.pem")
    ca = _ca_cert(p)
    chains = _verify_chain(p, ca, roots, root_skips, inters, sigs)
    key = _key(p)
    _key_pair(p)
    crls = _crls(p)
    # the rest of createIstioCA
    _is_ca(ca)
    _min_ttl(p)
    _gen_key_cert(p, ca, key)
    if mesh is not None and fips_applies(mesh):
        from agent.validate.fips import fips_checks

        fips_checks(p, chains, key, crls)
    env = _workload_checks(p, ca, roots, crls)
    _serving_problem(p, chains)
    path = [x.raw for x in env.path()[0][1:]]
    chain = next((c for c in chains if [x.raw for x in c] == path), chains[0])
    warnings = _warnings(p, ca, key, chain, env)
    if mesh is not None and mesh.ambient and mesh.version is not None:
        from agent.validate.ztunnel import ztunnel_checks

        warnings += ztunnel_checks(p, ca, chain, mesh.version)
    chain_raws = {b.der for b in p.blocks("cert-chain.pem")}
    in_chain = [c.not_after for c in chain if c.raw in chain_raws] or [ca.not_after]
    not_after = {
        "ca-cert.pem": to_datetime(ca.not_after),
        "cert-chain.pem": to_datetime(min(in_chain)),
        "root-cert.pem": to_datetime(chain[-1].not_after),
    }
    return BundleInfo(
        kind="istio-ca",
        not_after=not_after,
        expires_at=to_datetime(min(c.not_after for c in chain)),
        root_fingerprints=tuple(c.fingerprint for c in roots.certs),
        serial=format(ca.serial, "x"),
        warnings=tuple(dict.fromkeys(warnings)),
        not_before=to_datetime(ca.not_before),
        fingerprint=ca.fingerprint,
        root_expires_at=to_datetime(min(c.not_after for c in roots.certs)) if roots.certs else None,
        crl_next_update=_next_update(crls),
    )


def _next_update(crls: list[RevocationList] | None) -> dt.datetime | None:
    """The earliest nextUpdate of `crls`, for the metrics."""
    times = [rl.next_update for rl in crls or () if rl.next_update is not None]
    return to_datetime(min(times)) if times else None


def reload_problem(previous: Mapping[str, bytes], files: Mapping[str, bytes], *, multiroot: bool,
                   version: Version | None = None) -> str | None:
    """What istiod's reload handler (istio_ca.go handleEvent) does with a new bundle after `previous`: None when it
    loads it, else why it abandons the reload (the startup checks, see validate, apply as well).

    Without ISTIO_MULTIROOT_MESH a changed root-cert.pem abandons the reload; with it, one root set must contain
    the other, as istiod `version` compares them (agent.istio_version.reload_rule: up to 1.29 the file's bytes,
    `bytes.Contains` either way; from 1.30 sets of DER certificates, pemBundleHasSubsetRelation; unknown: 1.30's),
    and the first root must be a CA (trustbundle.go verifyTrustAnchor).
    """
    old, new = previous.get("root-cert.pem", b""), files.get("root-cert.pem", b"")
    if old != new:
        if not multiroot:
            return ("root-cert.pem changed and ISTIO_MULTIROOT_MESH is off: istiod logs \"Multi root is disabled, "
                    "updating new ROOT-CA not supported\" and keeps the old CA until it restarts")
        if reload_rule(version) == "bytes":
            if not (old in new or new in old):  # Go's bytes.Contains: an empty file is in any other
                return (f"root-cert.pem changed and neither file holds the other's bytes, which istiod {version} "
                        "wants (up to 1.29 it compares the files byte for byte): istiod logs \"Updating new ROOT-CA "
                        "not supported\" and keeps the old CA; keep the old bytes and append the new root")
        else:
            a, b = _cert_set(old), _cert_set(new)
            if not a or not b or not (a <= b or b <= a):
                return ("root-cert.pem changed and neither root set contains the other: istiod logs \"Updating new "
                        "ROOT-CA not supported\" and keeps the old CA")
    if multiroot:
        from agent.validate.pem import decode

        block, _ = decode(new)
        cert = None
        if block is not None:
            from agent.validate.certs import parse_certificate

            try:
                cert = parse_certificate(block.der)
            except CertificateError:
                cert = None
        if cert is None or not cert.is_ca:
            return ("root-cert.pem's first block is not a CA certificate, which ISTIO_MULTIROOT_MESH's trust bundle "
                    "requires (trustbundle.go verifyTrustAnchor)")
    return None


def _cert_set(data: bytes) -> set[bytes]:
    """istio_ca.go pemToRawCertSet: the DER of every CERTIFICATE block."""
    from agent.validate.pem import decode_all

    return {b.der for b in decode_all(data, limit=1 << 30) if b.label == b"CERTIFICATE"}
