"""ca-crl.pem as istiod 1.27+ checks it (keycertbundle.go Verify): every PEM block is a v2 CRL (x509
ParseRevocationList), and every certificate of cert-chain.pem must have signed one of them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from agent.validate.certs import KU, Certificate, CertificateError, _ext, _parse_ai, signature_algorithm
from agent.validate.der import ENUM, INTEGER, OCTET_STRING, SEQUENCE, Str, ctx, read_time
from agent.validate.names import NameError_, parse_name
from agent.validate.sig import check_signature

__all__ = ["CRLError", "RevocationList", "check_crl_signature_from", "missing_crl_signers", "parse_crl"]


class CRLError(ValueError):
    """x509.ParseRevocationList failed; the message is Go's."""


@dataclass(eq=False)
class RevocationList:
    raw: bytes
    raw_tbs: bytes = b""
    raw_issuer: bytes = b""
    sig_alg: str = ""
    sig_pub_algo: str = ""
    sig_hash: str = ""
    signature: bytes = b""
    this_update: int = 0
    next_update: int | None = None
    revoked: list[int] = field(default_factory=list)
    authority_key_id: bytes | None = None


def parse_crl(der: bytes) -> RevocationList:
    """x509.ParseRevocationList."""
    s = Str(der)
    elem = s.read_element(SEQUENCE)
    if elem is None:
        raise CRLError("x509: malformed crl")
    rl = RevocationList(raw=elem.data())
    inp = elem.read(SEQUENCE)
    if inp is None:
        raise CRLError("x509: malformed crl")
    tbs_el = inp.read_element(SEQUENCE)
    if tbs_el is None:
        raise CRLError("x509: malformed tbs crl")
    rl.raw_tbs = tbs_el.data()
    tbs = tbs_el.read(SEQUENCE)
    if tbs is None:
        raise CRLError("x509: malformed tbs crl")
    if not tbs.peek(INTEGER):
        raise CRLError("x509: unsupported crl version")
    version = tbs.read_int64()
    if version is None:
        raise CRLError("x509: malformed crl")
    if version != 1:
        raise CRLError(f"x509: unsupported crl version: {version}")
    sig_el = tbs.read_element(SEQUENCE)
    sig_ai = sig_el.read(SEQUENCE) if sig_el is not None else None
    if sig_ai is None:
        raise CRLError("x509: malformed signature algorithm identifier")
    outer = inp.read(SEQUENCE)
    if outer is None:
        raise CRLError("x509: malformed algorithm identifier")
    if outer.data() != sig_ai.data():
        raise CRLError("x509: inner and outer signature algorithm identifiers don't match")
    try:
        oid, params = _parse_ai(sig_ai)
    except CertificateError as exc:
        raise CRLError(str(exc)) from None
    rl.sig_alg, rl.sig_pub_algo, rl.sig_hash = signature_algorithm(oid, params)
    sig = inp.read_bitstring()
    if sig is None:
        raise CRLError("x509: malformed signature")
    rl.signature = sig[0]
    issuer_el = tbs.read_element(SEQUENCE)
    if issuer_el is None:
        raise CRLError("x509: malformed issuer")
    rl.raw_issuer = issuer_el.data()
    try:
        parse_name(Str(rl.raw_issuer))
    except NameError_ as exc:
        raise CRLError(str(exc)) from None
    this = read_time(tbs)
    if this is None:
        raise CRLError("x509: malformed UTCTime or GeneralizedTime")
    rl.this_update = this
    if tbs.peek(0x18) or tbs.peek(0x17):
        nxt = read_time(tbs)
        if nxt is None:
            raise CRLError("x509: malformed UTCTime or GeneralizedTime")
        rl.next_update = nxt
    if tbs.peek(SEQUENCE):
        revoked = tbs.read(SEQUENCE)
        if revoked is None:
            raise CRLError("x509: malformed crl")
        while not revoked.empty():
            entry = revoked.read(SEQUENCE)
            if entry is None:
                raise CRLError("x509: malformed crl")
            serial = entry.read_int()
            if serial is None:
                raise CRLError("x509: malformed serial number")
            if read_time(entry) is None:
                raise CRLError("x509: malformed UTCTime or GeneralizedTime")
            opt = entry.read_optional(SEQUENCE)
            if opt is None:
                raise CRLError("x509: malformed extensions")
            present, exts = opt
            if present and exts is not None:
                while not exts.empty():
                    one = exts.read(SEQUENCE)
                    if one is None:
                        raise CRLError("x509: malformed extension")
                    try:
                        ext = _ext(one)
                    except CertificateError as exc:
                        raise CRLError(str(exc)) from None
                    if ext.oid == (2, 5, 29, 21):
                        reason = Str(ext.value).read_int64(ENUM)
                        if reason is None or not -(1 << 63) <= reason < (1 << 63):
                            raise CRLError("x509: malformed reasonCode extension")
            rl.revoked.append(serial)
    opt = tbs.read_optional(ctx(0, constructed=True))
    if opt is None:
        raise CRLError("x509: malformed extensions")
    present, exts = opt
    if present and exts is not None:
        seq = exts.read(SEQUENCE)
        if seq is None:
            raise CRLError("x509: malformed extensions")
        while not seq.empty():
            one = seq.read(SEQUENCE)
            if one is None:
                raise CRLError("x509: malformed extension")
            try:
                ext = _ext(one)
            except CertificateError as exc:
                raise CRLError(str(exc)) from None
            if ext.oid == (2, 5, 29, 35):
                if ext.critical:
                    raise CRLError("x509: authority key identifier incorrectly marked critical")
                akid = Str(ext.value).read(SEQUENCE)
                if akid is None:
                    raise CRLError("x509: invalid authority key identifier")
                if akid.peek(ctx(0)):
                    kid = akid.read(ctx(0))
                    if kid is None:
                        raise CRLError("x509: invalid authority key identifier")
                    rl.authority_key_id = kid.data()
            elif ext.oid == (2, 5, 29, 20) and Str(ext.value).read_int() is None:
                raise CRLError("x509: malformed crl number")
    _ = OCTET_STRING
    return rl


def check_crl_signature_from(rl: RevocationList, parent: Certificate) -> str | None:
    """RevocationList.CheckSignatureFrom: a CA parent with cRLSign (when keyUsage is present); SHA-1 allowed."""
    if (parent.version == 3 and not parent.bc_valid) or (parent.bc_valid and not parent.is_ca):
        return "x509: invalid signature: parent certificate cannot sign this kind of certificate"
    if parent.key_usage != 0 and parent.key_usage & KU.CRL_SIGN == 0:
        return "x509: invalid signature: parent certificate cannot sign this kind of certificate"
    if not parent.pub_algo:
        return "x509: cannot verify signature: algorithm unimplemented"
    return check_signature(rl.sig_alg, rl.sig_pub_algo, rl.sig_hash, rl.raw_tbs, rl.signature, parent.public_key,
                           parent.crypto_key(), allow_sha1=True)


def missing_crl_signers(signers: Sequence[Certificate], crls: Sequence[RevocationList]) -> list[Certificate]:
    """The keycertbundle.go loop: signers keyed by Subject.String() (a later same-name certificate replaces an
    earlier one); each needs a CRL it signed."""
    missing: dict[object, Certificate] = {}
    for s in signers:
        missing[s.subject_key] = s
    for rl in crls:
        for key, s in list(missing.items()):
            if check_crl_signature_from(rl, s) is None:
                del missing[key]
        if not missing:
            break
    return list(missing.values())
