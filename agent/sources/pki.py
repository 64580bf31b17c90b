"""A tls bundle from the PKI secrets engine: key and certificate from one `<mount>/issue/<role>` call, renewed at
2/3 of the certificate's lifetime, reused after a restart while it is good.

Also what both PKI sources share (pki_intermediate.py builds on it): `RenewingSource`, the renewal schedule and
reuse of the published generation; chain building; and `signing_call`, where a failed signing request is labelled
`signing`. `cryptography` is imported when a PKI source first works, not when the agent starts.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from agent import kinds, publish
from agent.errors import AgentError, BundleError, VaultUnavailable
from agent.log import get_logger
from agent.sources.base import Fetched, digest
from agent.text import shown
from agent.vault import field as vault_field

if TYPE_CHECKING:
    from cryptography import x509

    from agent.config import AgentConfig, BundleConfig, FileBundle, PkiSource, TlsBundle
    from agent.vault import Vault

__all__ = [
    "Issued",
    "PkiTlsSource",
    "RenewingSource",
    "build_chain",
    "ders",
    "is_self_signed",
    "iso",
    "key_matches",
    "load_certs",
    "open",
    "pem",
    "renew_time",
    "serial_hex",
    "signing_call",
    "validity",
]

T = TypeVar("T")

#: renewal times are jittered by this share of the renewal margin, so a fleet does not renew in step
JITTER = 0.05


def open(bundle: BundleConfig, vault: Vault, cfg: AgentConfig) -> PkiTlsSource:
    """The PKI source of tls bundle `bundle` (config lets `source.pki` on tls bundles only)."""
    from agent.config import TlsBundle

    assert isinstance(bundle, TlsBundle)
    return PkiTlsSource(vault, bundle, poll_interval=bundle.interval(cfg.sidecar))


# ---------------------------------------------------------------------------------------------- certificates


def load_certs(data: bytes | str) -> list[x509.Certificate]:
    """Every CERTIFICATE block of `data`, parsed; [] when there is none or one does not parse."""
    from cryptography import x509

    raw = data.encode() if isinstance(data, str) else data
    if b"-----BEGIN CERTIFICATE-----" not in raw:
        return []
    try:
        return x509.load_pem_x509_certificates(raw)
    except ValueError:
        return []


def pem(cert: x509.Certificate) -> bytes:
    """The canonical PEM of `cert` (the same DER always gives the same bytes)."""
    from cryptography.hazmat.primitives.serialization import Encoding

    return cert.public_bytes(Encoding.PEM)


def serial_hex(serial: int) -> str:
    """A serial number as Vault writes it: colon-separated hex of its bytes (`2b:d0:4e:...`)."""
    return serial.to_bytes(max(1, (serial.bit_length() + 7) // 8), "big").hex(":")


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    if cert.issuer != issuer.subject:
        return False
    try:
        cert.verify_directly_issued_by(issuer)
    except Exception:  # noqa: BLE001 - a bad signature or an unsupported key: not its issuer
        return False
    return True


def is_self_signed(cert: x509.Certificate) -> bool:
    """True for a certificate that names and verifies itself as its issuer (a root)."""
    return _signed_by(cert, cert)


def build_chain(leaf: x509.Certificate, pool: Sequence[x509.Certificate]) -> list[x509.Certificate]:
    """The CA certificates above `leaf`, issuer first, found in `pool` by name and signature; it ends at a root
    or where `pool` has no issuer for the last one. Order, duplicates and extra certificates in `pool` (Vault's
    sign-intermediate answer lists the new certificate itself in ca_chain) do not matter."""
    chain: list[x509.Certificate] = []
    current = leaf
    while not is_self_signed(current) and len(chain) < 8:
        parent = next((c for c in pool if c != leaf and c not in chain and _signed_by(current, c)), None)
        if parent is None:
            break
        chain.append(parent)
        current = parent
    return chain


def renew_time(not_before: float, not_after: float, left: float, rng: Callable[[], float] = random.random) -> float:
    """When renewal is due: when `left` of the lifetime remains, jittered +-5 % of that margin."""
    margin = (not_after - not_before) * left * (1 - JITTER + 2 * JITTER * rng())
    return not_after - margin


# ---------------------------------------------------------------------------------------------- the boundary


async def signing_call(request: Awaitable[T]) -> T:
    """Await one signing or issuing request; every failure is counted as reason `signing` (errors_total).

    Raises:
        VaultUnavailable: transient (retry with backoff); the live bundle stays.
        VaultError: Vault refused the request (role, policy, CSR): final, with its hint saying what to fix.
    """
    try:
        return await request
    except AgentError as exc:
        exc.reason = "signing"
        raise


# ---------------------------------------------------------------------------------------------- the schedule


@dataclass(frozen=True)
class Issued:
    """Material a PKI source holds: the bundle's files, the certificate's serial and validity, and when to renew.

    `cas` is the chain above the certificate (DER, issuer first, the root last when known); `renewed` says the
    material replaced earlier material of this bundle that was due (or unusable after a restart).
    """

    files: dict[str, bytes]
    serial: int
    not_before: float
    not_after: float
    renew_at: float
    cas: tuple[bytes, ...]
    renewed: bool = False
    #: what else the source keeps with the material (pki_intermediate: its own CRL)
    extra: Mapping[str, bytes] = field(default_factory=dict)

    @property
    def digest(self) -> str:
        """The content digest of the files."""
        return digest(self.files)

    @property
    def revision(self) -> str:
        """`serial@notAfter/digest`: what `revision()` answers while nothing is due."""
        return f"{self.serial:x}@{int(self.not_after)}/{self.digest[:16]}"

    def fetched(self) -> Fetched:
        """The worker's view of this material."""
        return Fetched(files=dict(self.files), digest=self.digest, revision=self.revision, renewed=self.renewed)

    def __repr__(self) -> str:  # the files hold a private key
        return f"Issued(serial={self.serial:x}, not_after={self.not_after:.0f}, renew_at={self.renew_at:.0f})"


class RenewingSource:
    """A Source whose content it makes itself and renews (a `Source`): what both PKI sources share.

    `fetch` reads the published generation once, at the first call, and reuses it while `_reuse` accepts it;
    otherwise, and whenever renewal is due, it asks `_issue` for new material. Between renewals `revision()`
    answers from memory (no Vault request) and `fetch` returns the held material again (after a new login);
    with `refresh`, `fetch` also calls `_refresh` once per poll_interval (cheap reads, never a signing request).
    """

    #: the share of the certificate's lifetime left when renewal is due
    renew_before: float = 1 / 3
    #: whether `_refresh` runs once per poll_interval
    refresh: bool = False
    #: the prefix of this source's log events (`certificate_issued`, `..._reused`, `..._not_reused`)
    event: str = "certificate"

    def __init__(self, vault: Vault, bundle: FileBundle, *, poll_interval: float = 30.0) -> None:
        self.vault = vault
        self.bundle = bundle
        self.kind = kinds.of(bundle)
        self.poll_interval = poll_interval
        self._issued: Issued | None = None
        self._looked = False
        #: whether this bundle had material before (published or issued): a new issuance is then a renewal
        self._ever = False
        self._refresh_at = 0.0
        self._log = get_logger(bundle=bundle.name)

    # -- the Source interface ---------------------------------------------------------------------------------
    async def revision(self) -> str | None:
        """The held material's revision while nothing is due; None (fetch) when renewal or a refresh is due."""
        issued, now = self._issued, time.time()
        if issued is None or now >= issued.renew_at or (self.refresh and now >= self._refresh_at):
            return None
        return issued.revision

    def next_check(self, last: Fetched | None, now: float) -> float:
        """At renewal time, or at the next poll if that comes first."""
        poll = now + self.poll_interval
        return poll if self._issued is None else min(self._issued.renew_at, poll)

    def reset(self) -> None:
        """A new login: refresh at the next fetch (Vault may have been restored); the held material stays."""
        self._refresh_at = 0.0

    async def fetch(self) -> Fetched:
        """The held material, reused from the published generation or refreshed; new material when due.

        Raises:
            VaultUnavailable: Vault unreachable or an odd answer (retry; the live bundle stays).
            VaultError: Vault refused the signing request, or the mount cannot give a usable chain (final).
        """
        now = time.time()
        if not self._looked:
            published = await asyncio.to_thread(publish.read_current, Path(self.bundle.dir)) or {}
            self._issued = await self._reuse_published(published, now)
            self._looked, self._ever = True, bool(published)
            self._refresh_at = now + 0.85 * self.poll_interval
        elif self._issued is not None and self.refresh and now >= self._refresh_at:
            self._issued = await self._refresh(self._issued, now)
            self._refresh_at = now + 0.85 * self.poll_interval
        if self._issued is None or now >= self._issued.renew_at:
            renewed = self._ever
            issued = await self._issue(now, renewed=renewed)
            self._issued, self._ever = issued, True
            self._refresh_at = now + 0.85 * self.poll_interval
            self._log.info(
                f"{self.event}_issued", serial=serial_hex(issued.serial), renewed=renewed,
                expires=iso(issued.not_after), renew_at=iso(issued.renew_at),
            )
        return self._issued.fetched()

    async def _reuse_published(self, published: dict[str, bytes], now: float) -> Issued | None:
        if not published:
            return None
        try:
            issued, why = await self._reuse(published, now)
        except BundleError as exc:
            issued, why = None, str(exc)
        if issued is None:
            self._log.info(f"{self.event}_not_reused", reason=why)
            return None
        self._log.info(
            f"{self.event}_reused", serial=serial_hex(issued.serial), expires=iso(issued.not_after),
            renew_at=iso(issued.renew_at),
        )
        return issued

    # -- what a source implements -----------------------------------------------------------------------------
    async def _issue(self, now: float, *, renewed: bool) -> Issued:
        raise NotImplementedError

    async def _reuse(self, published: dict[str, bytes], now: float) -> tuple[Issued | None, str]:
        """The published generation as held material, or None and why it cannot be reused."""
        raise NotImplementedError

    async def _refresh(self, issued: Issued, now: float) -> Issued | None:
        """The held material brought up to date, or None when it must be replaced now."""
        return issued

    # -- shared steps ------------------------------------------------------------------------------------------
    async def _get(self, path: str, action: str, hint: str = "", params: Mapping[str, str] | None = None
                   ) -> dict[str, Any]:
        return await self.vault.request("GET", path, params=params, action=action, hint=hint) or {}

    def _field(self, data: Mapping[str, Any], key: str, kind: type | tuple[type, ...], action: str,
               *, optional: bool = False) -> Any:
        return vault_field(data, key, kind, address=self.vault.address, action=action, optional=optional)

    def _odd(self, action: str, what: str) -> VaultUnavailable:
        return VaultUnavailable(
            f"Vault at {shown(self.vault.address)} answered with something that is not a Vault response while"
            f" {action} ({what})"
        )

    def _issued_certs(self, data: Mapping[str, Any], action: str) -> tuple[x509.Certificate, list[x509.Certificate]]:
        """The certificate of a signing answer and the CA certificates that came with it."""
        leaf_text = self._field(data, "certificate", str, action)
        leaf = load_certs(leaf_text)
        if not leaf:
            raise self._odd(action, "'certificate' is not a PEM certificate")
        pool: list[x509.Certificate] = []
        issuing = self._field(data, "issuing_ca", str, action, optional=True) or ""
        for text in [issuing, *(self._field(data, "ca_chain", list, action, optional=True) or [])]:
            if not isinstance(text, str):
                raise self._odd(action, "'ca_chain' holds something that is not text")
            pool.extend(load_certs(text))
        return leaf[0], pool

    async def _issuer_chain(self, mount: str, ref: str) -> list[x509.Certificate]:
        """The issuer `ref` of `mount` and the chain above it that the mount knows (`issuer/<ref>/json`, which
        needs no policy), issuer first."""
        action = f"reading the chain of issuer {shown(ref)} of PKI mount {shown(mount)}"
        hint = f"check that {shown(mount)} is a PKI mount with an issuer {shown(ref)}"
        body = await self._get(f"/v1/{mount}/issuer/{ref}/json", action, hint)
        data = self._field(body, "data", dict, action)
        certs = load_certs(self._field(data, "certificate", str, action))
        if not certs:
            raise self._odd(action, "'certificate' is not a PEM certificate")
        pool = [c for text in (self._field(data, "ca_chain", list, action, optional=True) or [])
                if isinstance(text, str) for c in load_certs(text)]
        return [certs[0], *build_chain(certs[0], pool)]

    async def _mount_issuers(self, mount: str) -> dict[str, tuple[str, bool]]:
        """serial (Vault's colon hex) -> (issuer id, has a key) for every issuer of `mount` (a list of issuers,
        which needs no policy; GET ?list=true rather than the LIST verb, which some proxies refuse)."""
        action = f"listing the issuers of PKI mount {shown(mount)}"
        body = await self._get(f"/v1/{mount}/issuers", action, f"check that {shown(mount)} is a PKI mount",
                               params={"list": "true"})
        data = self._field(body, "data", dict, action)
        info = self._field(data, "key_info", dict, action, optional=True) or {}
        out: dict[str, tuple[str, bool]] = {}
        for issuer_id, entry in info.items():
            if isinstance(entry, dict) and isinstance(entry.get("serial_number"), str):
                out[entry["serial_number"].lower()] = (str(issuer_id), bool(entry.get("key_id")))
        return out


def iso(when: float) -> str:
    """`when` (Unix seconds) as RFC 3339 UTC, for log fields."""
    import datetime as dt

    return dt.datetime.fromtimestamp(when, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def validity(cert: x509.Certificate) -> tuple[float, float]:
    """notBefore and notAfter of `cert` as Unix seconds."""
    return cert.not_valid_before_utc.timestamp(), cert.not_valid_after_utc.timestamp()


def key_matches(key_pem: bytes, cert: x509.Certificate) -> bool:
    """True when the PEM private key `key_pem` is the key of `cert`."""
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, load_pem_private_key

    try:
        key = load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        return False
    spki = PublicFormat.SubjectPublicKeyInfo
    return bool(key.public_key().public_bytes(Encoding.DER, spki) == cert.public_key().public_bytes(Encoding.DER, spki))


# ---------------------------------------------------------------------------------------------- the tls source


class PkiTlsSource(RenewingSource):
    """tls.key, tls.crt (leaf, then the CAs below the root) and ca.crt (the root) from `<mount>/issue/<role>`.

    ca.crt is the root of the issuing chain (or its top CA when the mount does not know the root), so tls.crt
    verifies to it. Key and certificate come from the same answer and go live in one swap.
    """

    renew_before = 1 / 3

    def __init__(self, vault: Vault, bundle: TlsBundle, *, poll_interval: float = 30.0) -> None:
        from agent.config import PkiVariant

        super().__init__(vault, bundle, poll_interval=poll_interval)
        assert isinstance(bundle.source, PkiVariant)
        settings = bundle.source.pki
        self.settings: PkiSource = settings
        self.ca_signs_cert = bundle.ca_signs_cert
        self.mount = settings.mount.strip("/")

    @property
    def _where(self) -> str:
        return f"{self.mount}/issue/{self.settings.role}"

    async def _issue(self, now: float, *, renewed: bool) -> Issued:
        s, b = self.settings, self.bundle
        body: dict[str, Any] = {"common_name": s.common_name, "ttl": f"{round(s.ttl)}s", "format": "pem"}
        if s.alt_names:
            body["alt_names"] = ",".join(s.alt_names)
        if s.ip_sans:
            body["ip_sans"] = ",".join(s.ip_sans)
        action = f"issuing a certificate for {shown(s.common_name)} at {shown(self._where)}"
        hint = (
            f"the agent's policy needs update on {shown(self._where)} and role {shown(s.role)} must allow these"
            f" names and ttl, or fix source.pki of bundle {b.name}"
        )
        resp = await signing_call(self.vault.request("POST", f"/v1/{self._where}", json=body, action=action,
                                                     hint=hint))
        data = self._field(resp or {}, "data", dict, action)
        key = self._field(data, "private_key", str, action)
        if "PRIVATE KEY-----" not in key:
            raise self._odd(action, "'private_key' is not a PEM private key")
        leaf, pool = self._issued_certs(data, action)
        chain = build_chain(leaf, pool)
        if not chain:
            raise self._odd(action, "no issuing CA for the certificate")
        files = self._files(key.encode() if key.endswith("\n") else (key + "\n").encode(), leaf, chain)
        not_before, not_after = validity(leaf)
        return Issued(files=files, serial=leaf.serial_number, not_before=not_before, not_after=not_after,
                      renew_at=renew_time(not_before, not_after, self.renew_before),
                      cas=ders(chain), renewed=renewed)

    @staticmethod
    def _files(key: bytes, leaf: x509.Certificate, chain: list[x509.Certificate]) -> dict[str, bytes]:
        anchor = chain[-1]
        below = chain[:-1] if is_self_signed(anchor) else chain
        return {"tls.key": key, "tls.crt": b"".join(pem(c) for c in [leaf, *below]), "ca.crt": pem(anchor)}

    async def _reuse(self, published: dict[str, bytes], now: float) -> tuple[Issued | None, str]:
        s = self.settings
        if not {"tls.key", "tls.crt", "ca.crt"} <= set(published):
            return None, "the published bundle lacks tls.key, tls.crt or ca.crt"
        certs = load_certs(published["tls.crt"])
        anchors = load_certs(published["ca.crt"])
        if not certs or not anchors:
            return None, "tls.crt or ca.crt holds no certificate"
        leaf = certs[0]
        if not key_matches(published["tls.key"], leaf):
            return None, "tls.key does not match tls.crt"
        problem = _names_problem(leaf, s.common_name, s.alt_names, s.ip_sans)
        if problem:
            return None, problem
        not_before, not_after = validity(leaf)
        renew_at = renew_time(not_before, not_after, self.renew_before)
        if now >= renew_at:
            return None, f"it is due for renewal since {iso(renew_at)}"
        chain = build_chain(leaf, [*certs[1:], *anchors])
        if not chain:
            return None, "tls.crt does not chain to ca.crt"
        # the issuing CA must still be an issuer of the mount, and its chain end at the published root
        issuers = await self._mount_issuers(self.mount)
        entry = issuers.get(serial_hex(chain[0].serial_number))
        if entry is None or not entry[1]:
            return None, f"its issuing CA is no longer an issuer of mount {shown(self.mount)}"
        current = await self._issuer_chain(self.mount, entry[0])
        if current[0] != chain[0] or current[-1] != chain[-1]:
            return None, f"the chain of its issuing CA in mount {shown(self.mount)} has changed"
        self.kind.validate(published, ca_signs_cert=self.ca_signs_cert)
        files = {name: published[name] for name in ("tls.key", "tls.crt", "ca.crt")}
        return Issued(files=files, serial=leaf.serial_number, not_before=not_before, not_after=not_after,
                      renew_at=renew_at, cas=ders(chain)), ""


def ders(certs: Sequence[x509.Certificate]) -> tuple[bytes, ...]:
    """The DER of each certificate."""
    from cryptography.hazmat.primitives.serialization import Encoding

    return tuple(c.public_bytes(Encoding.DER) for c in certs)


def _names_problem(leaf: x509.Certificate, common_name: str, alt_names: Sequence[str],
                   ip_sans: Sequence[str]) -> str:
    """Why `leaf` was not issued for these names (empty when it was): the config may have changed."""
    import ipaddress

    from cryptography import x509
    from cryptography.x509.oid import NameOID

    cns = [a.value for a in leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if cns != [common_name]:
        return f"it was issued for another common name ({shown(', '.join(map(str, cns)), 80)})"
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = set(san.get_values_for_type(x509.DNSName)) | set(san.get_values_for_type(x509.RFC822Name))
        ips = set(san.get_values_for_type(x509.IPAddress))
    except x509.ExtensionNotFound:
        dns, ips = set(), set()
    if dns - {common_name} != set(alt_names) - {common_name}:
        return "it was issued for other alt_names"
    if ips != {ipaddress.ip_address(ip) for ip in ip_sans}:
        return "it was issued for other ip_sans"
    return ""

