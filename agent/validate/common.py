"""What istio_ca.py and tls.py share: the files of one bundle decoded once (PEM blocks, certificates by content),
the caps, and how a certificate is named in a message."""

from __future__ import annotations

from collections.abc import Mapping

from agent.errors import BundleError
from agent.text import shown
from agent.validate.certs import Certificate, CertificateError, parse_certificate
from agent.validate.chain import CertPool, VerifyError
from agent.validate.limits import LimitExceeded, Limits
from agent.validate.names import RDN
from agent.validate.pem import Block, decode_all

__all__ = ["Parsed", "refuse", "refuse_b", "stamp"]

_NAME = 80  # characters of a subject name in a message


def stamp(t: int) -> str:
    from agent.validate.info import to_datetime

    return to_datetime(t).strftime("%Y-%m-%dT%H:%M:%SZ")


_MAX_MESSAGE = 390


def refuse(what: str, step: str, go: str, consumer: str = "istiod would refuse the bundle") -> BundleError:
    """Verdict (a): the consumer refuses it. `what` names the file; `step` the upstream function, `go` its error
    (shortened so the sentence stays readable; a long `what` is cut too, so that Go's text keeps 60 characters
    and the whole sentence, shown's `...[+N]` marker included, stays within _MAX_MESSAGE)."""
    room_for_what = _MAX_MESSAGE - len(consumer) - len(step) - 6 - 72
    if len(what) > room_for_what:
        what = what[:room_for_what].rstrip() + "..."
    head = f"{what}; {consumer} ({step}: "
    room = max(_MAX_MESSAGE - len(head) - 12, 20)  # 12: the closing parenthesis and a cut marker
    return BundleError(f"{head}{shown(go, room)})", check=step)


def refuse_b(what: str, check: str) -> BundleError:
    """Verdict (b): the consumer would load it, but something downstream breaks; `what` says what."""
    return BundleError(f"{what} (check {check})", check=check, istiod_loads=True)


class Parsed:
    """One bundle's files, decoded the way Go does, each certificate parsed once."""

    def __init__(self, files: Mapping[str, bytes], limits: Limits, now: int, order: tuple[str, ...]) -> None:
        self.files = files
        self.limits = limits
        self.now = now
        self._blocks: dict[str, list[Block]] = {}
        self._certs: dict[bytes, Certificate | CertificateError] = {}
        self._names: dict[bytes, list[RDN]] = {}
        self.origin: dict[int, tuple[str, int, int]] = {}
        for name, data in files.items():
            if len(data) > limits.max_file_bytes:
                raise BundleError(
                    f"{name} is {len(data)} bytes, over the agent's limit of {limits.max_file_bytes} bytes per file "
                    "(Limits.max_file_bytes); the agent refuses it unread.", check="limit-file-size")
        for name in order:
            if name in files:
                self.blocks(name)

    def blocks(self, name: str) -> list[Block]:
        """Every PEM block Go finds in `name` (at most the cap)."""
        if name not in self._blocks:
            try:
                blocks = decode_all(self.files.get(name, b""), limit=self.limits.max_certs_per_file)
            except LimitExceeded as exc:
                raise BundleError(f"{name} is refused: {exc} (the agent's limit).", check="limit-pem") from None
            if len(blocks) > self.limits.max_certs_per_file:
                raise BundleError(
                    f"{name} holds more than {self.limits.max_certs_per_file} PEM blocks, over the agent's limit "
                    "(Limits.max_certs_per_file).", check="limit-certs-per-file")
            self._blocks[name] = blocks
            for i, b in enumerate(blocks):
                if b.label == b"CERTIFICATE":
                    c = self.cert(b.der, self.nth(name, i, len(blocks)))
                    if isinstance(c, Certificate):
                        self.origin.setdefault(id(c), (name, i, len(blocks)))
        return self._blocks[name]

    def cert(self, der: bytes, where: str = "a certificate") -> Certificate | CertificateError:
        """x509.ParseCertificate, once per distinct DER; `where` names the block if it is over a cap."""
        if der not in self._certs:
            try:
                self._certs[der] = parse_certificate(der, self.limits, self._names)
            except CertificateError as exc:
                self._certs[der] = exc
            except LimitExceeded as exc:
                raise BundleError(f"{where} is refused: it has {exc} (the agent's limit, Limits.max_names_per_cert).",
                                  check="limit-names") from None
        return self._certs[der]

    def pool(self, name: str) -> tuple[CertPool, list[str]]:
        """AppendCertsFromPEM: the CERTIFICATE blocks without headers that parse; and why the others were skipped."""
        pool = CertPool()
        skipped = []
        blocks = self.blocks(name)
        for i, b in enumerate(blocks):
            nth = self.nth(name, i, len(blocks))
            if b.label != b"CERTIFICATE":
                skipped.append(f"{nth} is a {shown(b.type)} block")
            elif b.headers:
                skipped.append(f"{nth} carries PEM headers")
            else:
                c = self.cert(b.der)
                if isinstance(c, Certificate):
                    pool.add(c)
                else:
                    skipped.append(f"{nth} is not a valid X.509 certificate ({c})")
        return pool, skipped

    @staticmethod
    def nth(name: str, i: int, count: int) -> str:
        return name if count == 1 else f"block {i + 1} of {count} in {name}"

    def at(self, name: str, i: int, count: int, c: Certificate) -> str:
        """Like `where`, but for the copy of `c` at position i of `name`."""
        place = name if count == 1 else f"certificate {i + 1} of {count} in {name}"
        return f"{place} ({shown(c.subject_str, _NAME)})"

    def where(self, c: Certificate) -> str:
        """How to point at a certificate: its file (and position), and its subject."""
        subject = shown(c.subject_str, _NAME)
        name, i, count = self.origin.get(id(c), ("", 0, 1))
        if not name:
            return f"the certificate {subject}"
        if count == 1:
            return f"{name} ({subject})"
        return f"certificate {i + 1} of {count} in {name} ({subject})"

    def verify_reason(self, err: VerifyError, leaf_file: str, roots_file: str) -> str:
        """A sentence (without the Go text) saying why Go's Verify refused the leaf in `leaf_file`."""
        c = err.cert
        if err.kind == "signature-budget":
            return (f"{leaf_file}'s issuers could not be found within Go's budget of "
                    f"{self.limits.max_signature_checks} signature checks (cross-signing loops or many certificates "
                    "with the same name)")
        if c is None:
            return f"{leaf_file} does not verify"
        if err.kind == "expired":
            if self.now < c.not_before:
                return f"{self.where(c)} is not valid yet: notBefore is {stamp(c.not_before)}"
            return f"{self.where(c)} expired at {stamp(c.not_after)}"
        if err.kind == "not-ca":
            return (f"{self.where(c)} is an intermediate without basicConstraints CA:true, so it may not issue "
                    "certificates")
        if err.kind == "pathlen":
            return f"{self.where(c)} has pathlen:{c.max_path_len}, too small for the CA certificates below it"
        if err.kind == "critical-extension":
            return f"{self.where(c)} has a critical extension Go does not handle ({_oids(c)})"
        if err.kind == "eku":
            bad = err.culprit or c
            return (f"{self.where(bad)} has an extendedKeyUsage without serverAuth, which Go's Verify (called by "
                    "istiod with its default ServerAuth usage) requires of every certificate on the chain")
        if err.kind == "name-constraints":
            return f"a CA above {leaf_file} has name constraints its names violate ({shown(err.go.split(': ', 2)[-1])})"
        if err.kind == "policy":
            return f"the certificate policies on {leaf_file}'s chain are not valid under RFC 5280"
        if err.kind == "unknown-authority":
            if err.hint is not None:
                return self._hint_reason(c, err.hint, roots_file)
            if c.raw_issuer == c.raw_subject:
                return (f"{self.where(c)} is a self-signed root that is not in {roots_file}, so {leaf_file} does not "
                        f"chain to {roots_file}")
            return (f"{self.where(c)} was issued by {shown(_issuer(c), _NAME)}, which is in neither {roots_file} "
                    f"nor the chain, so {leaf_file} does not chain to {roots_file}")
        return f"{self.where(c)} does not verify"

    def _hint_reason(self, child: Certificate, hint: tuple[str, Certificate], roots_file: str) -> str:
        go, cand = hint
        who = self.where(cand)
        if "cannot sign this kind of certificate" in go:
            if cand.bc_valid and not cand.is_ca:
                why = "it is not a CA (basicConstraints CA is false)"
            elif not cand.bc_valid:
                why = "it is a v3 certificate without basicConstraints, so it is not a CA"
            else:
                why = "its keyUsage lacks keyCertSign"
            return f"{who} may not issue {self.where(child)}: {why}"
        if "insecure algorithm" in go:
            return f"{self.where(child)} is signed with {child.sig_alg}, which Go refuses in certificate chains"
        if "keys are insecure" in go:
            return f"{who} has an RSA key below Go's 1024-bit minimum, so its signatures do not verify"
        if "expired or is not yet valid" in go:
            when = (f"is not valid yet (notBefore {stamp(cand.not_before)})" if self.now < cand.not_before
                    else f"expired at {stamp(cand.not_after)}")
            return f"{who}, the issuer of {self.where(child)}, {when}"
        if "not authorized to sign" in go:
            return f"{who} is an intermediate without basicConstraints CA:true"
        if "path length" in go:
            return f"{who} has pathlen:{cand.max_path_len}, too small for the CA certificates below it"
        if "unhandled critical extension" in go:
            return f"{who} has a critical extension Go does not handle ({_oids(cand)})"
        if "algorithm unimplemented" in go:
            return f"Go cannot check {self.where(child)}'s signature ({child.sig_alg or 'unknown algorithm'})"
        return (f"{self.where(child)} is not signed by {who} (same name, different key), so it does not chain to "
                f"{roots_file}")


def _oids(c: Certificate) -> str:
    return ", ".join(".".join(str(a) for a in o) for o in c.unhandled_critical)


def _issuer(c: Certificate) -> str:
    from agent.validate.names import name_str

    return name_str(c.issuer)
