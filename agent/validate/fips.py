"""Go's FIPS 140-only mode (GODEBUG=fips140=only), which istiod and every pilot-agent run with under Istio 1.31's
COMPLIANCE_POLICY=fips-140-3 (istiod chart deployment.yaml, injection-template.yaml; #59847).

Read from Go 1.27's crypto/rsa/fips.go (checkFIPS140OnlyPublicKey, checkFIPS140OnlyPrivateKey), which every RSA
signature and verification goes through, and crypto/tls/defaults_fips140.go (isCertificateAllowedFIPS), which a Go
TLS peer applies to each certificate of the chain it verified. ECDSA on P-224 to P-521 and Ed25519 pass the first;
SHA-1 and MD5 signatures Go refuses in any mode. tests/test_istio_versions.py runs the oracle (tests/oracle) with
GODEBUG=fips140=only against these rules.
"""

from __future__ import annotations

from agent.istio_version import FIPS_CHECK
from agent.validate.certs import KU, Certificate, ECPublic, RSAPublic
from agent.validate.common import Parsed, refuse, refuse_b
from agent.validate.crl import RevocationList, check_crl_signature_from
from agent.validate.keys import PrivateKey, RSAKey

__all__ = ["fips_checks"]

_FIPS = "GODEBUG=fips140=only"


def _rsa_public_problem(n: int, e: int) -> str | None:
    """crypto/rsa checkFIPS140OnlyPublicKey: Go's error text, or None."""
    if n.bit_length() < 2048:
        return "crypto/rsa: use of keys smaller than 2048 bits is not allowed in FIPS 140-only mode"
    if n.bit_length() % 2 == 1:
        return "crypto/rsa: use of keys with odd size is not allowed in FIPS 140-only mode"
    if e <= 1 << 16:
        return "crypto/rsa: use of public exponent <= 2¹⁶ is not allowed in FIPS 140-only mode"
    if e % 2 == 0:
        return "crypto/rsa: use of even public exponent is not allowed in FIPS 140-only mode"
    return None


def _rsa_private_problem(key: RSAKey) -> str | None:
    """crypto/rsa checkFIPS140OnlyPrivateKey."""
    problem = _rsa_public_problem(key.n, key.e)
    if problem is not None:
        return problem
    if len(key.primes) != 2:
        return "crypto/rsa: use of multi-prime keys is not allowed in FIPS 140-only mode"
    if key.primes[0].bit_length() != key.primes[1].bit_length():
        return "crypto/rsa: use of primes of different sizes is not allowed in FIPS 140-only mode"
    return None


def _signer_problem(c: Certificate) -> str | None:
    """Why Go in FIPS-only mode cannot verify a signature made by `c`'s key."""
    k = c.public_key
    return _rsa_public_problem(k.n, k.e) if isinstance(k, RSAPublic) else None


def _tls_refused(c: Certificate) -> bool:
    """crypto/tls isCertificateAllowedFIPS is false: RSA under 2048 bits, or a curve other than P-256/384/521."""
    k = c.public_key
    if isinstance(k, RSAPublic):
        return k.n.bit_length() < 2048
    if isinstance(k, ECPublic):
        return k.curve not in ("P-256", "P-384", "P-521")
    return False


def _hashes_with_sha1(s: Certificate) -> bool:
    """RevocationList.CheckSignatureFrom gets past its checks of the parent (CA, cRLSign, a known key algorithm)
    and hashes the CRL: with a SHA-1 CRL, FIPS 140-only mode then panics (crypto/sha1 checkSum)."""
    if (s.version == 3 and not s.bc_valid) or (s.bc_valid and not s.is_ca):
        return False
    return (s.key_usage == 0 or s.key_usage & KU.CRL_SIGN != 0) and bool(s.pub_algo)


def _sha1_crl_panics(p: Parsed, crls: list[RevocationList] | None) -> bool:
    """keycertbundle.go Verify's CRL loop (see crl.missing_crl_signers) reaches a SHA-1 CRL with a signer it still
    looks for, and hashes it."""
    if not crls:
        return False
    signers = [c for b in p.blocks("cert-chain.pem") if isinstance(c := p.cert(b.der), Certificate)]
    missing = {s.subject_key: s for s in signers}
    for rl in crls:
        if not missing:
            break
        if rl.sig_hash == "sha1" and any(_hashes_with_sha1(s) for s in missing.values()):
            return True
        for k, s in list(missing.items()):
            if check_crl_signature_from(rl, s) is None:
                del missing[k]
    return False


def fips_checks(p: Parsed, chains: list[list[Certificate]], key: PrivateKey,
                crls: list[RevocationList] | None = None) -> None:
    """Raise what istiod and pilot-agent in FIPS 140-only mode do with this bundle: istiod refuses it (verdict a)
    when no path from ca-cert.pem verifies or ca-key.pem cannot sign, pilot-agent refuses istiod's serving chain
    (verdict b) when a certificate on it has a key Go's FIPS TLS does not allow."""
    # keycertbundle.go Verify: x509 tries every path; each signature on it is checked with the issuer's key
    problems = [next(((c, err) for c in chain[1:] if (err := _signer_problem(c))), None) for chain in chains]
    if problems and all(problems):
        first = problems[0]
        assert first is not None
        c, err = first
        raise refuse(f"{p.where(c)} has an RSA key that Go's FIPS 140-only mode will not verify signatures with "
                     f"(COMPLIANCE_POLICY=fips-140-3 runs istiod with {_FIPS})", f"keycertbundle.go Verify, {_FIPS}",
                     f"x509: certificate signed by unknown authority (possibly because of \"{err}\")")
    if _sha1_crl_panics(p, crls):
        raise refuse("ca-crl.pem holds a CRL signed with SHA-1: istiod hashes it to check its signature, and Go's "
                     "FIPS 140-only mode panics on SHA-1, so istiod crashes at startup",
                     f"keycertbundle.go Verify, {_FIPS}",
                     "panic: crypto/sha1: use of SHA-1 is not allowed in FIPS 140-only mode")
    if isinstance(key, RSAKey) and (err := _rsa_private_problem(key)) is not None:
        raise refuse(f"ca-key.pem is an RSA key Go's FIPS 140-only mode will not sign with (COMPLIANCE_POLICY="
                     f"fips-140-3 runs istiod with {_FIPS})", f"GenKeyCert, {_FIPS}",
                     f"failed generating istiod key cert {err}")
    # pilot-agent (GODEBUG=fips140=only from the injection template) dials istiod with Go's TLS, which keeps only
    # verified chains whose every certificate it allows (crypto/tls common.go fipsAllowedChains)
    refused = [next((c for c in chain if _tls_refused(c)), None) for chain in chains]
    if refused and all(refused):
        tls_refused = refused[0]
        assert tls_refused is not None
        raise refuse_b(f"istiod would load it, but {p.where(tls_refused)} has a key Go's FIPS 140-only TLS does not "
                       "allow (RSA under 2048 bits, or an elliptic curve other than P-256, P-384 and P-521), so every "
                       "pilot-agent refuses istiod's serving chain (\"tls: no FIPS compatible certificate chains "
                       "found\") and no workload gets config or certificates", FIPS_CHECK)
