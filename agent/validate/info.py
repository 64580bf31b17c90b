"""What a valid bundle holds, for logs, readiness and expiry metrics (never key material)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

__all__ = ["BundleInfo", "to_datetime"]


@dataclass(frozen=True)
class BundleInfo:
    """A validated bundle, described."""

    #: "istio-ca" or "tls"
    kind: str
    #: per certificate file, the earliest notAfter of the certificates in it that the consumer uses
    not_after: dict[str, dt.datetime]
    #: earliest notAfter over what the consumer uses
    expires_at: dt.datetime
    #: sha256 hex of each certificate Go parses in root-cert.pem / ca.crt, in file order
    root_fingerprints: tuple[str, ...]
    #: serial number (hex) of ca-cert.pem / the tls.crt leaf
    serial: str
    #: verdict (c): istiod (or pilot-agent) loads it and nothing breaks, but this is worth fixing; one sentence each
    warnings: tuple[str, ...] = field(default=())
    #: notBefore of ca-cert.pem / the tls.crt leaf: when the backend has no versions, what "newer" means
    not_before: dt.datetime | None = None
    #: sha256 hex of ca-cert.pem / the tls.crt leaf (the identity an info metric shows, with `serial`)
    fingerprint: str = ""
    #: earliest notAfter of the roots in root-cert.pem / ca.crt (not only the one anchoring the chain); None without
    root_expires_at: dt.datetime | None = None
    #: earliest nextUpdate of the CRLs in ca-crl.pem; None without a CRL or when none sets nextUpdate
    crl_next_update: dt.datetime | None = None
    #: per remote cluster, the notAfter of its kubeconfig's client certificate (remote-secret bundles using one)
    client_not_after: dict[str, dt.datetime] = field(default_factory=dict)


def to_datetime(seconds: int) -> dt.datetime:
    """Epoch seconds as an aware UTC datetime, clamped to what datetime can hold."""
    lo, hi = dt.datetime(1, 1, 1, tzinfo=dt.UTC), dt.datetime(9999, 12, 31, 23, 59, 59, tzinfo=dt.UTC)
    epoch = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    try:
        return min(max(epoch + dt.timedelta(seconds=seconds), lo), hi)
    except OverflowError:
        return lo if seconds < 0 else hi
