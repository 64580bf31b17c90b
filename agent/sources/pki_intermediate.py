"""istiod's intermediate CA from the PKI secrets engine: a key pair made here, a CSR like Istio's tools/certs
(O=Istio, CN=Intermediate CA, L=<cluster>, SAN DNS istiod.istio-system.svc) signed at `<mount>/<path>`
(root/sign-intermediate, or an issuer's sign-intermediate) with use_csr_values, renewed with a fresh key when
renew_before of its lifetime is left, and reused after a restart while it is good and under the mount's root.

The key goes nowhere but ca-key.pem: the request carries the CSR only. Once per poll_interval the source reads
the issuer's chain (and, with `crl`, the CRLs), which needs no policy; a changed root or a revoked intermediate is
renewed at once. root-cert.pem keeps its published bytes while the root stays the same.

During a root rotation, `extra_roots_kv` names a KV secret whose `root_cert` holds more roots to trust (read once
per poll_interval too): root-cert.pem is then the mount's root and those, composed like `rotate` writes KV bundles.
The published bytes stay as they are while the set of roots does not change (the sign phase), a set that grows
gets the new roots appended after them (the trust phase: istiod <= 1.29 needs the old bytes contiguous), and any
other change is written afresh, the mount's root first (the retire phase).
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
from typing import TYPE_CHECKING, Any

from agent.errors import SecretError
from agent.istio_certs import (
    ISTIOD_SAN,
    authority_key_id,
    csr_for,
    generate_key,
    intermediate_subject,
    key_pem,
    key_type_of,
)
from agent.sources.pki import (
    Issued,
    RenewingSource,
    build_chain,
    ders,
    is_self_signed,
    iso,
    key_matches,
    load_certs,
    pem,
    renew_time,
    serial_hex,
    signing_call,
    validity,
)
from agent.text import shown

if TYPE_CHECKING:
    from cryptography import x509

    from agent.config import AgentConfig, BundleConfig, IstioCaBundle
    from agent.config import PkiIntermediateSource as Settings
    from agent.kvstore import KVMount
    from agent.vault import Vault

__all__ = ["PkiIntermediateSource", "csr_for", "generate_key", "open"]

#: how many left-behind issuers and roots are remembered
_SUPERSEDED_KEPT = 16
#: at most this many extra trust anchors (extra_roots_kv)
_EXTRA_ROOTS_MAX = 8

_CRL_BLOCK = re.compile(rb"-----BEGIN X509 CRL-----\r?\n.*?-----END X509 CRL-----\r?\n?", re.DOTALL)


def open(bundle: BundleConfig, vault: Vault, cfg: AgentConfig) -> PkiIntermediateSource:
    """The PKI intermediate source of istio-ca bundle `bundle` (config lets `source.pki_intermediate` on istio-ca
    bundles only)."""
    from agent.config import IstioCaBundle

    assert isinstance(bundle, IstioCaBundle)
    return PkiIntermediateSource(vault, bundle, poll_interval=bundle.interval(cfg.sidecar))


def _own_crl(key: Any, cert: x509.Certificate) -> bytes:
    """An empty CRL signed by the intermediate, valid as long as it is: Envoy wants one from every CA of the chain
    once it is given a CRL, and istiod from every certificate of cert-chain.pem (istiod itself never revokes)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.serialization import Encoding

    aki = authority_key_id(cert, key)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(cert.subject)
        .last_update(cert.not_valid_before_utc)
        .next_update(cert.not_valid_after_utc)
        .add_extension(x509.CRLNumber(1), critical=False)
        .add_extension(aki, critical=False)
    )
    return builder.sign(key, hashes.SHA256()).public_bytes(Encoding.PEM)


def _signed_crl(block: bytes, cert: x509.Certificate) -> Any:
    """The CRL in `block` when `cert` signed it, else None."""
    from cryptography import x509

    try:
        crl = x509.load_pem_x509_crl(block)
        return crl if crl.issuer == cert.subject and crl.is_signature_valid(cert.public_key()) else None  # type: ignore[arg-type]
    except (ValueError, TypeError):
        return None


class PkiIntermediateSource(RenewingSource):
    """ca-key.pem (made here), ca-cert.pem, cert-chain.pem (the intermediate, then its chain up to the root) and
    root-cert.pem (that root), optionally ca-crl.pem, from a PKI mount's sign-intermediate (a `Source`)."""

    refresh = True
    event = "intermediate"

    def __init__(self, vault: Vault, bundle: IstioCaBundle, *, poll_interval: float = 30.0) -> None:
        from agent.config import PkiIntermediateVariant

        super().__init__(vault, bundle, poll_interval=poll_interval)
        assert isinstance(bundle.source, PkiIntermediateVariant)
        settings = bundle.source.pki_intermediate
        self.settings: Settings = settings
        #: istiod caps workload certificates at the intermediate's notAfter: renewal must leave twice this
        self.workload_ttl = bundle.workload_ttl
        self.renew_before = settings.renew_before
        self.mount = settings.mount.strip("/")
        self.path = settings.path.strip("/")
        #: the issuer that signs: the mount's default one for root/sign-intermediate
        self.issuer_ref = "default" if self.path == "root/sign-intermediate" else self.path.split("/")[1]
        #: the published root-cert.pem, to keep its bytes while the root does not change
        self._root_pem: bytes | None = None
        #: CA certificate (DER) -> the Vault path of its CRL, found once per CA
        self._crl_paths: dict[bytes, str] = {}
        #: issuers and roots (DER) this source has moved away from: an answer showing one again lags behind
        self._superseded: list[bytes] = []
        #: the KV mount of extra_roots_kv, found once
        self._extras_mount: KVMount | None = None

    @property
    def _where(self) -> str:
        return f"{self.mount}/{self.path}"

    # -- issuing ---------------------------------------------------------------------------------------------
    async def _issue(self, now: float, *, renewed: bool) -> Issued:
        s, b = self.settings, self.bundle
        key = await asyncio.to_thread(generate_key, s.key_type)  # an RSA key takes a while: not on the loop
        body = {"csr": csr_for(key, s.cluster).decode(), "use_csr_values": True, "ttl": f"{round(s.ttl)}s",
                "format": "pem"}
        action = f"signing istiod's intermediate CSR at {shown(self._where)}"
        hint = (
            f"the agent's policy needs update on {shown(self._where)}, and the issuer must be able to sign this"
            f" ttl; or fix source.pki_intermediate of bundle {b.name}"
        )
        resp = await signing_call(self.vault.request("POST", f"/v1/{self._where}", json=body, action=action,
                                                     hint=hint))
        data = self._field(resp or {}, "data", dict, action)
        leaf, pool = self._issued_certs(data, action)
        new_key = key_pem(key)
        if not key_matches(new_key, leaf):
            raise self._odd(action, "the certificate is not for the key of the CSR")
        chain = build_chain(leaf, pool)
        if not chain or not is_self_signed(chain[-1]):
            chain = build_chain(leaf, [*pool, *await self._issuer_chain(self.mount, self.issuer_ref)])
        self._require_root(leaf, chain)
        own_crl = _own_crl(key, leaf) if s.crl else b""
        files, _ = await self._files(new_key, leaf, chain, own_crl)
        not_before, not_after = validity(leaf)
        if not_after > chain[-1].not_valid_after_utc.timestamp():
            self._log.warning("intermediate_outlives_root", root_expires=iso(chain[-1].not_valid_after_utc.timestamp()),
                              reason="Vault does not cap sign-intermediate at the root's notAfter: rotate the root"
                              " before it expires")
        renew_at = renew_time(not_before, not_after, self.renew_before)
        if not_after - renew_at < 2 * self.workload_ttl:
            # istiod caps workload certificates at the intermediate's notAfter: renewing this late shortens them
            self._log.warning("intermediate_lead_time_short", renew_at=iso(renew_at), expires=iso(not_after),
                              reason=f"renewal leaves {round(not_after - renew_at)}s, less than twice workload_cert_ttl"
                              f" ({round(self.workload_ttl)}s): raise ttl (or the mount's max_lease_ttl) or"
                              " renew_before")
        return Issued(files=files, serial=leaf.serial_number, not_before=not_before, not_after=not_after,
                      renew_at=renew_at, cas=ders(chain), renewed=renewed, extra={"own_crl": own_crl})

    def _require_root(self, leaf: x509.Certificate, chain: list[x509.Certificate]) -> None:
        if chain and is_self_signed(chain[-1]):
            return
        top = chain[-1] if chain else leaf
        raise SecretError(
            f"the chain of issuer {shown(self.issuer_ref)} of PKI mount {shown(self.mount)} stops below"
            f" {shown(top.issuer.rfc4514_string(), 80)}, which the mount does not hold, so there is no root for"
            f" root-cert.pem: import the root into {shown(self.mount)} (bao write {shown(self.mount)}/issuers/import/"
            "cert pem_bundle=@root.pem), or sign at the mount that holds the root"
        )

    async def _files(self, key_pem: bytes, leaf: x509.Certificate, chain: list[x509.Certificate],
               own_crl: bytes, held_crls: bytes = b"") -> tuple[dict[str, bytes], bool]:
        """The bundle's files, and whether a CRL of the chain revokes the intermediate (`held_crls`: the published
        ca-crl.pem, whose CRLs a lagging node's older ones do not replace)."""
        files = {
            "ca-key.pem": key_pem,
            "ca-cert.pem": pem(leaf),
            "cert-chain.pem": b"".join(pem(c) for c in [leaf, *chain]),
            "root-cert.pem": self._compose_root(chain[-1], await self._extra_roots()),
        }
        revoked = False
        if self.settings.crl:
            crls, revoked = await self._chain_crls(leaf, chain, held_crls)
            files["ca-crl.pem"] = own_crl + crls
        return files, revoked

    def _compose_root(self, root: x509.Certificate, extras: list[x509.Certificate]) -> bytes:
        """root-cert.pem for the mount's `root` and the extra trust anchors: the published bytes while the set is
        the same, those bytes then the new roots when it only grew, else the roots afresh (the mount's first)."""
        wanted = [root, *(c for c in dict.fromkeys(extras) if c != root)]
        held = self._root_pem
        out = b"".join(pem(c) for c in wanted)
        if held is not None and (held_certs := load_certs(held)):
            if set(held_certs) == set(wanted):
                out = held
            elif set(held_certs) < set(wanted):
                added = b"".join(pem(c) for c in wanted if c not in held_certs)
                out = held + (b"" if held.endswith(b"\n") else b"\n") + added
        self._root_pem = out
        return out

    async def _extra_roots(self) -> list[x509.Certificate]:
        """The roots in key root_cert of `extra_roots_kv` (KV v1 or v2); none without it, or when the secret, its
        current version or the key is absent or empty (no rotation under way)."""
        kv = self.settings.extra_roots_kv
        if kv is None:
            return []
        from agent import kvstore

        where = kv.strip("/")
        fix = (
            f"check that {shown(where)} is a KV secret and that the agent's policy grants read on it, or fix"
            f" source.pki_intermediate.extra_roots_kv of bundle {self.bundle.name}"
        )
        if self._extras_mount is None:
            self._extras_mount = await kvstore.find_mount(self.vault, where, fix=fix)
        m = self._extras_mount
        action = f"reading the extra trust anchors at {shown(where)}"
        body = await self.vault.request("GET", m.data_url, action=action, hint=fix, missing_ok=True)
        data = self._field(body or {}, "data", dict, action, optional=True) or {}
        if m.version == 2:
            data = self._field(data, "data", dict, action, optional=True) or {}
        text = data.get("root_cert")
        if text is None or text == "":
            return []
        roots = load_certs(text) if isinstance(text, str) else []
        if not roots or len(roots) > _EXTRA_ROOTS_MAX or not all(is_self_signed(c) for c in roots):
            raise SecretError(
                f"key root_cert of KV secret {shown(where)} must hold 1 to {_EXTRA_ROOTS_MAX} PEM root certificates"
                f" (self-signed) and nothing that does not parse; {fix}"
            )
        return roots

    # -- restart reuse ---------------------------------------------------------------------------------------
    async def _reuse(self, published: dict[str, bytes], now: float) -> tuple[Issued | None, str]:
        from cryptography.hazmat.primitives.serialization import load_pem_private_key

        s = self.settings
        self._root_pem = published.get("root-cert.pem")
        if not {"ca-key.pem", "ca-cert.pem", "cert-chain.pem", "root-cert.pem"} <= set(published):
            return None, "the published bundle is incomplete"
        certs = load_certs(published["ca-cert.pem"])
        if not certs:
            return None, "ca-cert.pem holds no certificate"
        leaf = certs[0]
        if not key_matches(published["ca-key.pem"], leaf):
            return None, "ca-key.pem does not match ca-cert.pem"
        key = load_pem_private_key(published["ca-key.pem"], password=None)
        if key_type_of(key) != s.key_type:
            return None, f"its key is not {s.key_type}"
        if leaf.subject != intermediate_subject(s.cluster) or _dns_names(leaf) != {ISTIOD_SAN}:
            return None, f"it was not made for cluster {shown(s.cluster)} (subject or SAN differ)"
        not_before, not_after = validity(leaf)
        renew_at = renew_time(not_before, not_after, self.renew_before)
        if now >= renew_at:
            return None, f"it is due for renewal since {iso(renew_at)}"
        chain = build_chain(leaf, [*load_certs(published["cert-chain.pem"]), *load_certs(published["root-cert.pem"])])
        current = await self._issuer_chain(self.mount, self.issuer_ref)
        if not chain or chain[0] != current[0]:
            return None, f"it was not signed by issuer {shown(self.issuer_ref)} of mount {shown(self.mount)}"
        if chain[-1] != current[-1] or current[-1] not in load_certs(published["root-cert.pem"]):
            return None, f"the root of mount {shown(self.mount)} has changed"
        own_crl = b""
        if s.crl:
            own_crl = next((m.group() for m in _CRL_BLOCK.finditer(published.get("ca-crl.pem", b""))
                            if _signed_crl(m.group(), leaf) is not None), b"") or _own_crl(key, leaf)
        files, revoked = await self._files(published["ca-key.pem"], leaf, chain, own_crl,
                                           published.get("ca-crl.pem", b""))
        if revoked:
            return None, "a CRL of its chain revokes it"
        for name in ("ca-cert.pem", "cert-chain.pem"):
            files[name] = published[name]
        self.kind.validate(files)
        return Issued(files=files, serial=leaf.serial_number, not_before=not_before, not_after=not_after,
                      renew_at=renew_at, cas=ders(chain), extra={"own_crl": own_crl}), ""

    # -- once per poll_interval ------------------------------------------------------------------------------
    async def _refresh(self, issued: Issued, now: float) -> Issued | None:
        from cryptography import x509

        current = await self._issuer_chain(self.mount, self.issuer_ref)
        held = [x509.load_der_x509_certificate(der) for der in issued.cas]
        if current[0] != held[0] or current[-1] != held[-1]:
            shown_ders = ders([current[0], current[-1]])
            if (_older(current[0], held[0]) or _older(current[-1], held[-1])
                    or any(der in self._superseded for der in shown_ders)):
                # never backwards: an older issuer or root than the one just signed under is a node that lags
                # behind (HA standbys serve reads locally); at the next renewal the signing answer decides
                self._log.info("intermediate_chain_stale", reason=f"Vault answered an older chain for issuer"
                               f" {shown(self.issuer_ref)} of mount {shown(self.mount)} than the held one; keeping it")
                return issued
            self._log.warning("intermediate_root_changed", reason=f"the chain of issuer {shown(self.issuer_ref)} of"
                              f" mount {shown(self.mount)} has changed: signing a new intermediate under it")
            # certificates made within the same second have equal notBefore and cannot be ordered by it: remember
            # what was left behind, so that a node still showing it is known to lag (never a signing loop)
            left = [der for der in ders([held[0], held[-1]]) if der not in shown_ders]
            self._superseded = [*self._superseded, *left][-_SUPERSEDED_KEPT:]
            return None
        if self.settings.extra_roots_kv is not None:
            root_pem = self._compose_root(held[-1], await self._extra_roots())
            if root_pem != issued.files["root-cert.pem"]:
                self._log.warning("trust_anchors_changed", roots=len(load_certs(root_pem)),
                                  reason=f"the roots of {shown(self.settings.extra_roots_kv)} changed: publishing"
                                  " root-cert.pem with the mount's root and them")
                issued = dataclasses.replace(issued, files={**issued.files, "root-cert.pem": root_pem},
                                             renewed=False)
        if not self.settings.crl:
            return issued
        leaf = x509.load_pem_x509_certificate(issued.files["ca-cert.pem"])
        crls, revoked = await self._chain_crls(leaf, held, issued.files.get("ca-crl.pem", b""))
        if revoked:
            self._log.warning("intermediate_revoked", serial=serial_hex(issued.serial),
                              reason="a CRL of its chain revokes the intermediate: signing a new one")
            return None
        files = {**issued.files, "ca-crl.pem": issued.extra.get("own_crl", b"") + crls}
        return dataclasses.replace(issued, files=files, renewed=False)

    # -- CRLs ------------------------------------------------------------------------------------------------
    async def _chain_crls(self, leaf: x509.Certificate, chain: list[x509.Certificate],
                    held: bytes = b"") -> tuple[bytes, bool]:
        """The CRL of every CA of `chain`, in chain order, and whether the issuer's CRL revokes `leaf`.

        A CRL with a lower CRL number than the one `held` for that CA (a node that lags behind) is not taken.
        """
        out, revoked = [], False
        below = leaf
        for ca in chain:
            path = await self._crl_path(ca, below)
            block = await self._read_crl(path, ca)
            crl = _signed_crl(block, ca)
            kept = next((m.group() for m in _CRL_BLOCK.finditer(held)
                         if (h := _signed_crl(m.group(), ca)) is not None and _crl_number(h) > _crl_number(crl)), None)
            if kept is not None:
                block, crl = kept, _signed_crl(kept, ca)
            if ca is chain[0]:
                entry = None if crl is None else crl.get_revoked_certificate_by_serial_number(leaf.serial_number)
                revoked = entry is not None
            out.append(block)
            below = ca
        return b"".join(out), revoked

    async def _crl_path(self, ca: x509.Certificate, below: x509.Certificate) -> str:
        """Where `ca`'s CRL is: the mount's issuer with that certificate and a key, else the CRL distribution point
        of the certificate it signed when that is on this Vault."""
        from cryptography import x509

        der = ders([ca])[0]
        if der in self._crl_paths:
            return self._crl_paths[der]
        found = (await self._mount_issuers(self.mount)).get(serial_hex(ca.serial_number))
        path = f"/v1/{self.mount}/issuer/{found[0]}/crl/pem" if found is not None and found[1] else None
        if path is None:
            base = self.vault.address
            try:
                points = below.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
            except x509.ExtensionNotFound:
                points = x509.CRLDistributionPoints([])
            uris = [n.value for p in points for n in (p.full_name or [])
                    if isinstance(n, x509.UniformResourceIdentifier)]
            path = next((u[len(base):] for u in uris if u.startswith(f"{base}/v1/")), None)
        if path is None:
            raise SecretError(
                f"crl: true needs the CRL of every CA above the intermediate, and"
                f" {shown(ca.subject.rfc4514_string(), 80)} is neither an issuer with a key in PKI mount"
                f" {shown(self.mount)} nor named by a CRL distribution point on {shown(self.vault.address)}: set"
                " crl_distribution_points in its mount's config/urls, or turn crl off in source.pki_intermediate"
                f" of bundle {self.bundle.name}"
            )
        self._crl_paths[der] = path
        return path

    async def _read_crl(self, path: str, ca: x509.Certificate) -> bytes:
        from cryptography import x509
        from cryptography.hazmat.primitives.serialization import Encoding

        action = f"reading the CRL of {shown(ca.subject.rfc4514_string(), 80)} at {shown(path)}"
        raw = await self.vault.read_raw(path, action=action, hint=f"check the PKI mount's CRL, or turn crl off in"
                                        f" source.pki_intermediate of bundle {self.bundle.name}")
        if raw.lstrip().startswith(b"{"):  # a JSON answer: {"data": {"crl": PEM}}
            import json

            try:
                body = json.loads(raw)
            except (ValueError, RecursionError):
                raise self._odd(action, "not a CRL") from None
            data = self._field(body if isinstance(body, dict) else {}, "data", dict, action)
            raw = str(self._field(data, "crl", str, action)).encode()
        try:
            crl = x509.load_pem_x509_crl(raw) if b"-----BEGIN X509 CRL-----" in raw else x509.load_der_x509_crl(raw)
        except ValueError:
            raise self._odd(action, "not a CRL") from None
        return crl.public_bytes(Encoding.PEM)


def _older(a: x509.Certificate, b: x509.Certificate) -> bool:
    """True when `a` is another certificate than `b` and was issued before it."""
    return a != b and a.not_valid_before_utc < b.not_valid_before_utc


def _crl_number(crl: Any) -> int:
    """A CRL's number (-1 for none or no CRL)."""
    from cryptography import x509

    if crl is None:
        return -1
    try:
        return int(crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number)
    except x509.ExtensionNotFound:
        return -1


def _dns_names(cert: x509.Certificate) -> set[str]:
    from cryptography import x509

    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    return set(san.get_values_for_type(x509.DNSName))
