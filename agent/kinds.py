"""The bundle kinds the agent publishes (istio-ca, tls, remote-secret): the one place that knows each kind's files,
where it is published and how it is checked.

Config describes a bundle; sources, targets, the worker and the `check` command ask its `Kind` (`of(bundle)`)
instead of testing the kind's name. Each kind's files and validator are in its module of agent.validate (istio_ca.py,
tls.py, kubeconfig.py); which files hold private keys is publish.KEYS.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from agent import validate as checks
from agent.errors import ConfigError
from agent.publish import KEYS
from agent.validate.istio_ca import ISTIO_CA_FILES, OPTIONAL_ISTIO_CA_FILES
from agent.validate.tls import OPTIONAL_TLS_FILES, TLS_FILES

if TYPE_CHECKING:
    from agent.config import BundleConfig
    from agent.istio_version import Mesh

__all__ = ["FILE_KINDS", "ISTIO_CA", "KINDS", "REMOTE_SECRET", "TLS", "Kind", "get", "of"]


@dataclass(frozen=True)
class Kind:
    """What a bundle kind is made of, where it is published and how it is validated (the KV keys that feed its
    files by default are config: `DEFAULT_FIELDS` of its bundle class in agent.config)."""

    #: the `type` of a bundle in the config
    name: str
    #: every file a bundle of this kind may publish
    files: tuple[str, ...]
    #: files a bundle may lack; all others are required
    optional: frozenset[str]
    #: names that must never exist in the bundle's directory (they would change how the consumer reads it)
    forbidden: tuple[str, ...]
    #: why the consumer would abandon a reload from the previous files to new ones (istiod's root-change rules),
    #: or None when it takes them; None for kinds whose consumer reloads anything valid
    reload_problem: Callable[..., str | None] | None = None
    #: where a bundle of this kind goes: "files" (a directory, agent.publish) or "secret" (a Kubernetes Secret)
    target: str = "files"

    @property
    def key_files(self) -> frozenset[str]:
        """The files holding private keys (published with key_mode, never labelled in metrics)."""
        return KEYS & frozenset(self.files)

    def validate(
        self,
        files: Mapping[str, bytes],
        *,
        now: dt.datetime | None = None,
        limits: checks.Limits | None = None,
        ca_signs_cert: bool = True,
        mesh: Mesh | None = None,
    ) -> checks.BundleInfo:
        """Check `files` the way this kind's consumer will (see `agent.validate.validate`; `mesh`: the checks of
        the mesh's Istio version, ambient and compliance policy).

        Raises:
            BundleError: one sentence naming the file and the failed check.
        """
        return checks.validate(self.name, files, now=now, limits=limits, ca_signs_cert=ca_signs_cert, mesh=mesh)

    def validate_dir(
        self,
        path: str | Path,
        *,
        now: dt.datetime | None = None,
        limits: checks.Limits | None = None,
        ca_signs_cert: bool = True,
        mesh: Mesh | None = None,
    ) -> checks.BundleInfo:
        """Read a published directory of this kind and validate it.

        Raises:
            BundleError: a required file is missing or unreadable, or the bundle is invalid.
        """
        return checks.validate_dir(path, self.name, now=now, limits=limits, ca_signs_cert=ca_signs_cert, mesh=mesh)


ISTIO_CA = Kind(
    name="istio-ca",
    files=(*ISTIO_CA_FILES, *OPTIONAL_ISTIO_CA_FILES),
    # istiod 1.27+ loads ca-crl.pem when present (PILOT_ENABLE_CA_CRL)
    optional=frozenset(OPTIONAL_ISTIO_CA_FILES),
    # istiod reads a directory holding tls.crt in the kubernetes.io/tls format instead (istio_ca.go), and one
    # holding istio-generated as its self-signed CA's (with USE_CACERTS_FOR_SELF_SIGNED_CA=true)
    forbidden=("tls.crt", "tls.key", "ca.crt", "istio-generated"),
    reload_problem=checks.reload_problem,
)

TLS = Kind(
    name="tls",
    files=TLS_FILES,
    optional=frozenset(OPTIONAL_TLS_FILES),
    forbidden=(),
)

REMOTE_SECRET = Kind(
    name="remote-secret",
    # one data key, the cluster's name (the `cluster` of the bundle): not known here
    files=(),
    optional=frozenset(),
    forbidden=(),
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


def of(bundle: BundleConfig) -> Kind:
    """The kind of a configured bundle (its `type`)."""
    return get(bundle.type)

