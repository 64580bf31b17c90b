"""Path building as Go's x509 Verify does it (verify.go, cert_pool.go): candidate order, loop detection, the
budget of signature checks (maxChainSignatureChecks), isValid, then policies, EKU and name constraints."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from agent.validate.certs import EKU, Certificate
from agent.validate.constraints import check_chain_constraints
from agent.validate.der import oid_str
from agent.validate.policies import policies_valid
from agent.validate.sig import SignatureCache

__all__ = ["CertPool", "VerifyError", "verify"]

LEAF, INTERMEDIATE, ROOT = 0, 1, 2

# verify.go distrustedSPKIHashes
_DISTRUSTED = frozenset({
    "ebed6475c2c2d80fcb199f3fe8dd6e6b3ce60b77eb15d4e42c3dec0c6f5b5105",
    "49dd353dc2b919a3770645117d0e60c16115e7d1bc259eefe734b00ea434fe5f",
    "e0254c7fcdc265e2f0f8a428dabb75ab4ae039b4872d62f5ee57f0877d5a8a41",
    "5c0660a2b164910d8ff589c18e14552e9e0ec237dcefe2cb736d41a4811f81a0",
    "43bffa19d6ef651451f6841e019931e96f6f2eaeff28ab4b6f1ce4576de2717b",
    "63ecefee431d49523bc1136c4e72d0206a477086caf606cd5cf025686c109cf8",
    "ec4ffa1ad0ac88081314b7aaffef6a91f97cd57291bb5ba686c5415f5eb4f6b6",
    "92c063d67e8f14db71d288e11266ffdaf69cbf115f7bab14f3bc2f68d25e0e30",
})


class VerifyError(Exception):
    """x509 Verify failed; `go` is Go's error text, `cert` the certificate the error is about (when Go names one)."""

    def __init__(self, go: str, cert: Certificate | None = None, *, kind: str = "",
                 hint: tuple[str, Certificate] | None = None, culprit: Certificate | None = None) -> None:
        super().__init__(go)
        self.go = go
        self.cert = cert
        #: buildChains' hint: the error met on a candidate issuer, and that candidate
        self.hint = hint
        #: the certificate that made a chain fail a later filter (EKU)
        self.culprit = culprit
        #: "expired", "unknown-authority", "not-ca", "pathlen", "eku", "policy", "name-constraints",
        #: "critical-extension", "signature-budget", "no-valid-chains", ""
        self.kind = kind


class CertPool:
    """x509.CertPool filled by AppendCertsFromPEM: de-duplicated by content, indexed by raw subject."""

    def __init__(self, certs: Iterable[Certificate] = ()) -> None:
        self.certs: list[Certificate] = []
        self._by_name: dict[bytes, list[Certificate]] = {}
        self._have: set[bytes] = set()
        for c in certs:
            self.add(c)

    def add(self, c: Certificate) -> None:
        if c.raw in self._have:
            return
        self._have.add(c.raw)
        self.certs.append(c)
        self._by_name.setdefault(c.raw_subject, []).append(c)

    def contains(self, c: Certificate) -> bool:
        return c.raw in self._have

    def potential_parents(self, c: Certificate) -> list[Certificate]:
        """findPotentialParents: same-name certificates, matching key IDs first."""
        match, one, mismatch = [], [], []
        akid = c.authority_key_id or b""
        for cand in self._by_name.get(c.raw_issuer, ()):
            skid = cand.subject_key_id or b""
            if skid == akid:
                match.append(cand)
            elif (not skid and akid) or (skid and not akid):
                one.append(cand)
            else:
                mismatch.append(cand)
        return match + one + mismatch


def _fmt_time(t: int) -> str:
    import datetime as dt

    try:
        return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, OSError, ValueError):
        return f"{t} (seconds since 1970)"


def _is_valid(c: Certificate, cert_type: int, chain: Sequence[Certificate], now: int) -> VerifyError | None:
    """verify.go isValid: critical extensions, names, validity, CA flag of intermediates, path length."""
    if c.unhandled_critical:
        return VerifyError("x509: unhandled critical extension", c, kind="critical-extension")
    if chain and chain[-1].raw_issuer != c.raw_subject:
        return VerifyError("x509: issuer name does not match subject from issuing certificate", c)
    if now < c.not_before:
        return VerifyError("x509: certificate has expired or is not yet valid: current time "
                           f"{_fmt_time(now)} is before {_fmt_time(c.not_before)}", c, kind="expired")
    if now > c.not_after:
        return VerifyError("x509: certificate has expired or is not yet valid: current time "
                           f"{_fmt_time(now)} is after {_fmt_time(c.not_after)}", c, kind="expired")
    if cert_type == INTERMEDIATE and (not c.bc_valid or not c.is_ca):
        return VerifyError("x509: certificate is not authorized to sign other certificates", c, kind="not-ca")
    if c.bc_valid and c.max_path_len >= 0 and len(chain) - 1 > c.max_path_len:
        return VerifyError("x509: too many intermediates for path length constraint", c, kind="pathlen")
    return None


def _already_in_chain(cand: Certificate, chain: Sequence[Certificate]) -> bool:
    """alreadyInChain: same subject, same SPKI and same SAN (or both without one)."""
    cand_san = cand.ext((2, 5, 29, 17))
    for c in chain:
        if cand.raw_subject != c.raw_subject or cand.raw_spki != c.raw_spki:
            continue
        san = c.ext((2, 5, 29, 17))
        if cand_san is None and san is None:
            return True
        if cand_san is None or san is None:
            return False
        if cand_san.value == san.value:
            return True
    return False


@dataclass
class _Build:
    roots: CertPool
    inters: CertPool
    now: int
    budget: int
    sigs: SignatureCache
    checks: int = 0


_SIG_LIMIT = VerifyError("x509: signature check attempts limit reached while verifying certificate chain",
                         kind="signature-budget")


def _build_chains(
    c: Certificate, chain: list[Certificate], b: _Build
) -> tuple[list[list[Certificate]], VerifyError | None]:
    """buildChains, including how Go's named `err` is overwritten by the last candidate it considered."""
    chains: list[list[Certificate]] = []
    err: VerifyError | None = None
    hint: tuple[str, Certificate] | None = None
    for cert_type, parents in ((ROOT, b.roots.potential_parents(c)), (INTERMEDIATE, b.inters.potential_parents(c))):
        for cand in parents:
            b.checks += 1
            if b.checks > b.budget:
                err = _SIG_LIMIT
                break
            if cand.public_key is None or _already_in_chain(cand, chain):
                continue
            sig_err = b.sigs.check(c, cand)
            if sig_err is not None:
                hint = hint or (sig_err, cand)
                continue
            err = _is_valid(cand, cert_type, chain, b.now)
            if err is not None:
                hint = hint or (err.go, cand)
                continue
            if cert_type == ROOT:
                chains.append([*chain, cand])
            else:
                child_chains, err = _build_chains(cand, [*chain, cand], b)
                chains.extend(child_chains)
            if err is _SIG_LIMIT:
                break
        if err is _SIG_LIMIT:
            break
    if chains:
        err = None
    if not chains and err is None:
        text = "x509: certificate signed by unknown authority"
        if hint is not None:
            name = hint[1].common_name or hint[1].subject_str
            text += (f' (possibly because of "{hint[0]}" while trying to verify candidate authority certificate'
                     f' "{name}")')
        err = VerifyError(text, c, kind="unknown-authority", hint=hint)
    return chains, err


def _eku_culprit(chain: Sequence[Certificate], usages: Sequence[int]) -> Certificate | None:
    """checkChainForKeyUsage, walking down from the root: the certificate that crosses out the last requested
    usage, or None when the chain allows one of them."""
    remaining = list(usages)
    for cert in reversed(chain):
        if not cert.ext_key_usage and not cert.unknown_eku:
            continue
        if EKU.ANY in cert.ext_key_usage:
            continue
        remaining = [u for u in remaining if u in cert.ext_key_usage]
        if not remaining:
            return cert
    return None


def verify(leaf: Certificate, roots: CertPool, inters: CertPool, now: int, *, budget: int = 100,
           key_usages: Sequence[int] = (), sigs: SignatureCache | None = None) -> list[list[Certificate]]:
    """x509.Certificate.Verify with explicit Roots: the valid chains (leaf first), or VerifyError as Go words it."""
    err = _is_valid(leaf, LEAF, [], now)
    if err is not None:
        raise err
    if roots.contains(leaf):
        candidates = [[leaf]]
    else:
        candidates, err = _build_chains(leaf, [leaf], _Build(roots, inters, now, budget, sigs or SignatureCache()))
        if err is not None:
            raise err
    any_usage = EKU.ANY in key_usages
    usages = list(key_usages) or [EKU.SERVER_AUTH]
    bad_policy = bad_usage = 0
    culprit: Certificate | None = None
    constraint_err: str | None = None
    valid = []
    for chain in candidates:
        if not policies_valid(chain):
            bad_policy += 1
            continue
        if not any_usage and (bad := _eku_culprit(chain, usages)) is not None:
            bad_usage += 1
            culprit = culprit or bad
            continue
        ce = check_chain_constraints(chain)
        if ce is not None:
            constraint_err = constraint_err or ce
            continue
        if any(hashlib.sha256(c.raw_spki).hexdigest() in _DISTRUSTED for c in chain):
            continue
        valid.append(chain)
    if valid:
        return valid
    if constraint_err is not None:
        raise VerifyError("x509: a root or intermediate certificate is not authorized to sign for this name: "
                          + constraint_err, leaf, kind="name-constraints")
    details = []
    if bad_usage:
        if not bad_policy:
            raise VerifyError("x509: certificate specifies an incompatible key usage", leaf, kind="eku",
                              culprit=culprit)
        details.append(f"{bad_usage} candidate chains with incompatible key usage")
    if bad_policy:
        details.append(f"{bad_policy} candidate chains with invalid policies")
    text = "x509: no valid chains built" + (": " + ", ".join(details) if details else "")
    raise VerifyError(text, leaf, kind="policy" if bad_policy else "no-valid-chains")


def _describe_oids(oids: Iterable[tuple[int, ...]]) -> str:
    return ", ".join(oid_str(o) for o in oids)
