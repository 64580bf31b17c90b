"""The bundle kinds the agent publishes (istio-ca, tls, remote-secret): the one place that knows each kind's files,
where it is published and how it is checked.

Config, sources, publishing and the `check` command ask a `Kind` instead of testing the kind's name.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from agent import validate as checks
from agent.errors import ConfigError

__all__ = ["FILE_KINDS", "ISTIO_CA", "KINDS", "REMOTE_SECRET", "TLS", "Kind", "get"]


@dataclass(frozen=True)
class Kind:
    """What a bundle kind is made of, where its data comes from in KV, and how it is validated."""

    #: the `type` of a bundle in the config
    name: str
    #: every file a bundle of this kind may publish
    files: tuple[str, ...]
    #: files a bundle may lack; all others are required
    optional: frozenset[str]
    #: files holding private keys (published with key_mode, never labelled in metrics)
    key_files: frozenset[str]
    #: names that must never exist in the bundle's directory (they would change how the consumer reads it)
    forbidden: tuple[str, ...]
    #: output file -> KV key, the default mapping
    kv_fields: Mapping[str, str]
    #: why the consumer would abandon a reload from the previous files to new ones (istiod's root-change rules),
    #: or None when it takes them; None for kinds whose consumer reloads anything valid
    reload_problem: Callable[..., str | None] | None = None
    #: where a bundle of this kind goes: "files" (a directory, agent.publish) or "secret" (a Kubernetes Secret)
    target: str = "files"

    def validate(
        self,
        files: Mapping[str, bytes],
        *,
        now: dt.datetime | None = None,
        limits: checks.Limits | None = None,
        ca_signs_cert: bool = True,
    ) -> checks.BundleInfo:
        """Check `files` the way this kind's consumer will (see `agent.validate.validate`).

        Raises:
            BundleError: one sentence naming the file and the failed check.
        """
        return checks.validate(self.name, files, now=now, limits=limits, ca_signs_cert=ca_signs_cert)

    def validate_dir(
        self,
        path: str | Path,
        *,
        now: dt.datetime | None = None,
        limits: checks.Limits | None = None,
        ca_signs_cert: bool = True,
    ) -> checks.BundleInfo:
        """Read a published directory of this kind and validate it.

        Raises:
            BundleError: a required file is missing or unreadable, or the bundle is invalid.
        """
        return checks.validate_dir(path, self.name, now=now, limits=limits, ca_signs_cert=ca_signs_cert)


ISTIO_CA = Kind(
    name="istio-ca",
    files=checks.KINDS["istio-ca"],
    # istiod 1.27+ loads ca-crl.pem when present (PILOT_ENABLE_CA_CRL)
    optional=frozenset(checks.OPTIONAL_FILES["istio-ca"]),
    key_files=frozenset({"ca-key.pem"}),
    # istiod reads a directory holding tls.crt in the kubernetes.io/tls format instead (istio_ca.go), and one
    # holding istio-generated as its self-signed CA's (with USE_CACERTS_FOR_SELF_SIGNED_CA=true)
    forbidden=("tls.crt", "tls.key", "ca.crt", "istio-generated"),
    # the runbook's keys (seeds/003)
    kv_fields={"ca-key.pem": "ca_key", "ca-cert.pem": "ca_cert", "root-cert.pem": "root_cert",
               "cert-chain.pem": "cert_chain", "ca-crl.pem": "ca_crl"},
    reload_problem=checks.reload_problem,
)

TLS = Kind(
    name="tls",
    files=checks.KINDS["tls"],
    optional=frozenset(checks.OPTIONAL_FILES["tls"]),
    key_files=frozenset({"tls.key"}),
    forbidden=(),
    kv_fields={"tls.key": "tls.key", "tls.crt": "tls.crt", "ca.crt": "ca.crt"},
)

REMOTE_SECRET = Kind(
    name="remote-secret",
    # one data key, the cluster's name (the `cluster` of the bundle): not known here
    files=(),
    optional=frozenset(),
    # the kubeconfig holds the remote cluster's credentials
    key_files=frozenset(),
    forbidden=(),
    kv_fields={},
    target="secret",
)

#: every kind, by its config name
KINDS: Mapping[str, Kind] = {k.name: k for k in (ISTIO_CA, TLS, REMOTE_SECRET)}
#: the kinds published as files into a directory (what `check DIR` validates)
FILE_KINDS: Mapping[str, Kind] = {name: k for name, k in KINDS.items() if k.target == "files"}


def get(name: str) -> Kind:
    """The kind called `name`.

    Raises:
        ConfigError: there is no such kind.
    """
    try:
        return KINDS[name]
    except KeyError:
        raise ConfigError(f"unknown bundle type {name!r}; use one of: {', '.join(KINDS)}") from None
