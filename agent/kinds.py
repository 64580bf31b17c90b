"""The bundle kinds the agent publishes (istio-ca, tls): the one place that knows each kind's files and checks.

Config, sources, publishing and the `check` command ask a `Kind` instead of testing the kind's name.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from agent import bundle
from agent.errors import ConfigError

__all__ = ["ISTIO_CA", "KINDS", "TLS", "Kind", "get"]


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
    #: what a bundle needs, for messages
    needs: str
    #: what the consumer is, for messages
    consumer: str
    #: the trust-bundle file whose change the consumer cannot take in a reload (istiod without multiroot)
    root_file: str | None = None

    @property
    def required(self) -> tuple[str, ...]:
        """The files a bundle of this kind cannot do without."""
        return tuple(f for f in self.files if f not in self.optional)

    def validate(
        self, files: Mapping[str, bytes], *, now: dt.datetime | None = None, ca_signs_cert: bool = True
    ) -> bundle.BundleInfo:
        """Check `files` the way this kind's consumer will (see `agent.bundle.validate`).

        Raises:
            BundleError: one sentence naming the file and the failed check.
        """
        return bundle.validate(self.name, files, now=now, chain_to_ca=ca_signs_cert)

    def validate_dir(
        self, path: str | Path, *, now: dt.datetime | None = None, ca_signs_cert: bool = True
    ) -> bundle.BundleInfo:
        """Read a published directory of this kind and validate it.

        Raises:
            BundleError: a required file is missing or unreadable, or the bundle is invalid.
        """
        return bundle.validate_dir(path, self.name, now=now, chain_to_ca=ca_signs_cert)


ISTIO_CA = Kind(
    name="istio-ca",
    files=bundle.ISTIO_CA_FILES,
    optional=frozenset(),
    key_files=frozenset({"ca-key.pem"}),
    # istiod reads a directory holding tls.crt in the kubernetes.io/tls format instead (istio_ca.go)
    forbidden=("tls.crt", "tls.key", "ca.crt"),
    # the runbook's keys (seeds/003)
    kv_fields={"ca-key.pem": "ca_key", "ca-cert.pem": "ca_cert", "root-cert.pem": "root_cert",
               "cert-chain.pem": "cert_chain"},
    needs="an istio-ca bundle needs ca-key.pem, ca-cert.pem, root-cert.pem and cert-chain.pem",
    consumer="istiod",
    root_file="root-cert.pem",
)

TLS = Kind(
    name="tls",
    files=bundle.TLS_FILES,
    optional=frozenset({"ca.crt"}),
    key_files=frozenset({"tls.key"}),
    forbidden=(),
    kv_fields={"tls.key": "tls.key", "tls.crt": "tls.crt", "ca.crt": "ca.crt"},
    needs="a tls bundle needs tls.key and tls.crt (ca.crt is optional)",
    consumer="the gateway",
)

#: every kind, by its config name
KINDS: Mapping[str, Kind] = {k.name: k for k in (ISTIO_CA, TLS)}


def get(name: str) -> Kind:
    """The kind called `name`.

    Raises:
        ConfigError: there is no such kind.
    """
    try:
        return KINDS[name]
    except KeyError:
        raise ConfigError(f"unknown bundle type {name!r}; use one of: {', '.join(KINDS)}") from None
