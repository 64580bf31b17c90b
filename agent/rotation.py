"""A root rotation's phases, read from what each cluster's KV secret holds (no state store): the pure rules
(`phase_of`, istiod's two reload rules, the next bundle of each phase) and the one read `rotate` and `doctor` share.

Phases of a cluster against the new root N: `A` (N not in root_cert), `trust` (root_cert holds the old roots and
N, the intermediate under an old root), `sign` (the same root_cert, the intermediate under N), `retire` (root_cert
is N alone, the intermediate under N).
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from agent.errors import ConfigError
from agent.kvstore import KVMount
from agent.text import shown

if TYPE_CHECKING:
    import hvac
    from cryptography import x509

__all__ = [
    "BROKEN",
    "PHASES",
    "RECORD_KEY",
    "ClusterState",
    "Record",
    "Stored",
    "accepted_by_bytes",
    "accepted_by_der_sets",
    "append_root",
    "block_bytes",
    "cert_set",
    "certs",
    "describe",
    "fingerprint",
    "issued_by",
    "parse_record",
    "phase_of",
    "read_stored",
    "record_text",
    "state_of",
    "states",
]

#: the phases in order; each command moves every named cluster from the one before to its own
PHASES = ("A", "trust", "sign", "retire")
#: what a cluster is in when its intermediate chains to none of root_cert's roots (no command moves it)
BROKEN = "broken"
#: the KV key that records which phase was written when (the agent publishes only the bundle's configured keys)
RECORD_KEY = "rotation"
#: the longest record read back (it is a few dozen bytes when `rotate` writes it)
_MAX_RECORD = 1000
_BLOCK = re.compile(rb"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----(?:\r?\n)?", re.DOTALL)


# ---------------------------------------------------------------------------------------------- certificates


def certs(data: bytes) -> list[x509.Certificate]:
    """Every CERTIFICATE block cryptography parses, in file order (others skipped, like Go's cert pools)."""
    from cryptography import x509

    out = []
    for m in _BLOCK.finditer(data):
        try:
            out.append(x509.load_pem_x509_certificate(m.group()))
        except ValueError:
            continue
    return out


def fingerprint(cert: x509.Certificate) -> str:
    """sha256 hex of the certificate's DER."""
    from cryptography.hazmat.primitives import hashes

    return cert.fingerprint(hashes.SHA256()).hex()


def issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """`issuer` signed `cert` directly (names and signature)."""
    try:
        cert.verify_directly_issued_by(issuer)
    except Exception:  # noqa: BLE001 - name mismatch, bad signature, unsupported key: not its issuer
        return False
    return True


def _anchor(ca: x509.Certificate, chain: list[x509.Certificate], roots: list[x509.Certificate]) -> str | None:
    """The fingerprint of the root `ca` chains to through `chain`, None when it reaches none."""
    current = ca
    for _ in range(8):
        root = next((r for r in roots if issued_by(current, r)), None)
        if root is not None:
            return fingerprint(root)
        parent = next((c for c in chain if c != current and issued_by(current, c)), None)
        if parent is None:
            return None
        current = parent
    return None


def cert_set(data: bytes) -> frozenset[bytes]:
    """The DER of every CERTIFICATE block, as istiod >= 1.30 compares root sets (istio_ca.go pemToRawCertSet)."""
    from agent.validate.pem import decode_all

    return frozenset(b.der for b in decode_all(data, limit=1 << 20) if b.label == b"CERTIFICATE")


def accepted_by_bytes(current: bytes, new: bytes) -> bool:
    """istiod <= 1.29 with ISTIO_MULTIROOT_MESH: a changed root-cert.pem is reloaded only when one file's exact bytes
    appear, contiguous, in the other (`bytes.Contains(current, new) || bytes.Contains(new, current)`)."""
    return current == new or (bool(current) and bool(new) and (current in new or new in current))


def accepted_by_der_sets(current: bytes, new: bytes) -> bool:
    """istiod >= 1.30 with ISTIO_MULTIROOT_MESH: one set of DER certificates contains the other (#59909)."""
    a, b = cert_set(current), cert_set(new)
    return bool(a) and bool(b) and (a <= b or b <= a)


def append_root(current: bytes, root_pem: bytes) -> bytes:
    """`current` byte for byte, then `root_pem` (a newline between when `current` lacks its last one)."""
    sep = b"" if current.endswith(b"\n") else b"\n"
    return current + sep + (root_pem if root_pem.endswith(b"\n") else root_pem + b"\n")


def block_bytes(data: bytes, fp: str) -> bytes | None:
    """The exact bytes of the PEM block of `data` whose certificate has sha256 `fp` (with its line end): what to
    keep alone so that the old file contains the new one byte for byte."""
    from cryptography import x509

    for m in _BLOCK.finditer(data):
        try:
            cert = x509.load_pem_x509_certificate(m.group())
        except ValueError:
            continue
        if fingerprint(cert) == fp:
            block = m.group()
            return block if block.endswith(b"\n") else block + b"\n"
    return None


# ---------------------------------------------------------------------------------------------- the record


@dataclass(frozen=True)
class Record:
    """Which phase `rotate` wrote into a cluster's secret, for which new root, and when."""

    phase: str
    root: str
    at: dt.datetime


def record_text(phase: str, root: str, at: dt.datetime) -> str:
    """The value of the record key."""
    return json.dumps({"phase": phase, "root": root, "at": at.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")},
                      separators=(",", ":"))


def parse_record(value: object) -> Record | None:
    """The record in `value`, None when there is none or it is not one `rotate` wrote (it is then ignored)."""
    if not isinstance(value, str) or len(value) > _MAX_RECORD:
        return None
    try:
        doc = json.loads(value)
    except ValueError:
        return None
    if not isinstance(doc, dict) or doc.get("phase") not in PHASES or not isinstance(doc.get("root"), str):
        return None
    try:
        at = dt.datetime.strptime(str(doc.get("at")), "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)
    except ValueError:
        return None
    if not re.fullmatch(r"[0-9a-f]{64}", doc["root"]):
        return None
    return Record(doc["phase"], doc["root"], at)


# ---------------------------------------------------------------------------------------------- phases


def phase_of(roots: list[str], anchor: str | None, new: str | None) -> str:
    """The phase of a cluster whose root_cert holds `roots` (fingerprints, in order) and whose intermediate chains to
    `anchor`, against the new root `new` (None: the last root of a root_cert that holds several)."""
    if anchor is None or anchor not in roots:
        return BROKEN
    if new is None:
        if len(roots) == 1:
            return "A"
        new = roots[-1]
    if new not in roots:
        return "A"
    if len(roots) == 1:
        return "retire"
    return "sign" if anchor == new else "trust"


@dataclass(frozen=True)
class Stored:
    """One cluster's secret as read (it holds the intermediate's key: never printed or logged)."""

    cluster: str
    mount: KVMount
    data: dict[str, Any]
    #: KV v2: the version read (the check-and-set value of the write); KV v1: 0
    version: int
    #: KV v2: when that version was written (Vault's clock); KV v1: None
    created: dt.datetime | None

    def __repr__(self) -> str:  # keep the key out of reprs and tracebacks
        return f"Stored(cluster={self.cluster!r}, path={self.mount.full!r}, version={self.version})"

    def files(self) -> dict[str, bytes]:
        """istiod's files from the runbook's keys (the ones present)."""
        from agent.clusters import BUNDLE_KEYS

        data = self.data
        return {name: str(data[k]).encode() for k, name in BUNDLE_KEYS.items() if isinstance(data.get(k), str)}


@dataclass(frozen=True)
class ClusterState:
    """A cluster's phase and the facts it rests on (no key material)."""

    cluster: str
    phase: str
    #: (fingerprint, subject) of every root of root_cert, in file order
    roots: tuple[tuple[str, str], ...]
    #: the fingerprint of the root the intermediate chains to, None when none
    anchor: str | None
    #: the intermediate: subject, serial (hex), notAfter; None when ca_cert holds none
    intermediate: tuple[str, str, dt.datetime] | None
    #: the new root the phase is judged against (given, or the last root of a root_cert holding several)
    new_root: str | None
    record: Record | None
    #: KV v2: when the current version was written
    created: dt.datetime | None

    def written_at(self, phase: str) -> dt.datetime | None:
        """When `phase` was written in this cluster: the record's time, else (KV v2) the current version's."""
        if self.record is not None and self.record.phase == phase and self.record.root == self.new_root:
            return self.record.at
        return self.created if self.record is None else None


def state_of(stored: Stored, new_root: str | None) -> ClusterState:
    """The phase of `stored` against `new_root` (a fingerprint; None: inferred from the record or root_cert)."""
    files = stored.files()
    roots = certs(files.get("root-cert.pem", b""))
    chain = certs(files.get("cert-chain.pem", b""))
    ca = next(iter(certs(files.get("ca-cert.pem", b""))), None)
    record = parse_record(stored.data.get(RECORD_KEY))
    fps = [fingerprint(r) for r in roots]
    if new_root is None and record is not None and record.root in fps:
        new_root = record.root
    if new_root is None and len(fps) > 1:
        new_root = fps[-1]
    anchor = _anchor(ca, chain, roots) if ca is not None else None
    inter = None if ca is None else (shown(ca.subject.rfc4514_string(), 120), format(ca.serial_number, "x"),
                                     ca.not_valid_after_utc)
    phase = phase_of(fps, anchor, new_root)
    named = tuple((fingerprint(r), shown(r.subject.rfc4514_string(), 120)) for r in roots)
    return ClusterState(stored.cluster, phase, named, anchor, inter, new_root, record, stored.created)


def _short(fp: str | None) -> str:
    return f"sha256 {fp[:16]}" if fp else "no root"


def describe(st: ClusterState, now: dt.datetime) -> str:
    """One line: the phase, the roots, what the intermediate chains to, and when the phase was written."""
    roots = ", ".join(_short(fp) + (" (new)" if fp == st.new_root and len(st.roots) > 1 else "")
                      for fp, _ in st.roots) or "none"
    if st.intermediate is None:
        inter = "ca_cert holds no certificate"
    else:
        subject, serial, not_after = st.intermediate
        inter = f"intermediate {subject} serial {serial[:16]} until {not_after:%Y-%m-%d} under {_short(st.anchor)}"
    line = f"phase {st.phase}: root_cert holds {len(st.roots)} root(s) [{roots}]; {inter}"
    when = st.written_at(st.phase)
    if when is not None and st.phase in PHASES[1:]:
        line += f"; {st.phase} written {when:%Y-%m-%d %H:%M} UTC ({_ago(now - when)} ago)"
    if st.phase == BROKEN:
        line += "; the intermediate chains to no root of root_cert: istiod would refuse it, fix it first"
    return line


def _ago(delta: dt.timedelta) -> str:
    seconds = max(0, int(delta.total_seconds()))
    if seconds >= 86400:
        return f"{seconds // 86400}d{seconds % 86400 // 3600}h"
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60}m"
    return f"{seconds // 60}m{seconds % 60}s"


# ---------------------------------------------------------------------------------------------- reading


def _created(text: object) -> dt.datetime | None:
    if not isinstance(text, str) or not text:
        return None
    head = text.rstrip("Z").partition(".")[0]
    try:
        return dt.datetime.fromisoformat(head).replace(tzinfo=dt.UTC)
    except ValueError:
        return None


def read_stored(client: hvac.Client, cluster: str, kv_path: str) -> Stored:
    """Read `cluster`'s secret at `kv_path` (KV v1 or v2) with its version, in one request.

    Raises:
        ConfigError: the path cannot name a KV secret.
        SecretError: the path is not on a KV mount, or holds no secret (or its current version is deleted).
        PermissionDenied, VaultUnavailable: from Vault.
    """
    import hvac.exceptions as hx

    from agent import hvac_client, vault
    from agent.errors import SecretError

    if any(c in "?#%" or not c.isprintable() for c in kv_path):
        raise ConfigError(f"KV path {shown(kv_path)!r} of cluster {cluster} cannot name a KV secret: leave out '?',"
                          " '#', '%' and control characters")
    fix = (f"the KV path of cluster {cluster} must be MOUNT/PATH of a secret on a KV v1 or v2 mount (`ca intermediate"
           " --kv` writes it); pass --kv CLUSTER=MOUNT/PATH for another layout")
    m = hvac_client.kv_mount(client, kv_path, fix=fix)
    action = f"reading KV v{m.version} path {shown(m.full)}"

    def get() -> object:
        try:
            return client.adapter.get(m.data_url)
        except hx.InvalidPath:
            return None

    resp = hvac_client.call(get, address=client.url, action=action,
                            hint=f"the operator's token needs read on {shown(m.policy_path)}")
    missing = f"there is no CA at KV path {shown(m.full)} of cluster {cluster}: write one with `ca intermediate`"
    if resp is None:
        raise SecretError(missing)
    body = vault.answer(resp, address=client.url, action=action)
    data = vault.field(body, "data", dict, address=client.url, action=action, optional=True) or {}
    version, created = 0, None
    if m.version == 2:
        meta = vault.field(data, "metadata", dict, address=client.url, action=action, optional=True) or {}
        if meta.get("deletion_time") or meta.get("destroyed") is True:
            raise SecretError(missing)
        version = vault.field(meta, "version", int, address=client.url, action=action)
        created = _created(meta.get("created_time"))
        data = vault.field(data, "data", dict, address=client.url, action=action, optional=True) or {}
    return Stored(cluster, m, dict(data), version, created)


def states(stored: Mapping[str, Stored], new_root: str | None) -> dict[str, ClusterState]:
    """`state_of` for every cluster."""
    return {c: state_of(s, new_root) for c, s in stored.items()}
