"""Where a worker publishes a bundle: files in a directory (files.py), a Kubernetes Secret (secret.py), or a set of
remote kubeconfigs in a directory (kubeconfigs.py).

The kind of the bundle decides (`Kind.target`); the worker only sees the `Target` interface.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from agent.config import AgentConfig, BundleConfig
    from agent.targets.secret import KubeLoader

__all__ = ["Published", "Target", "open_target"]


@dataclass(frozen=True)
class Published:
    """What one publish did: whether anything was written, and the name of what is live now (for logs)."""

    changed: bool
    generation: str


class Target(Protocol):
    """One bundle's destination. Every method is a coroutine (disk work runs in a thread, Kubernetes calls are
    async and cancellable) and raises AgentErrors only."""

    #: what the bundle is published to, for logs and Events: a directory, or `Secret NAMESPACE/NAME`
    where: str

    async def publish(self, files: Mapping[str, bytes]) -> Published:
        """Make `files` live, unless they already are (then `changed` is False and nothing is written)."""
        ...

    async def damaged(self, files: Mapping[str, bytes]) -> bool:
        """True when what is live no longer holds `files` (deleted or altered by someone else)."""
        ...


def open_target(bundle: BundleConfig, cfg: AgentConfig, kube: KubeLoader) -> Target:
    """The Target of `bundle`: its directory, or its Secret through `kube` (loaded on first use)."""
    from agent.config import RemoteSecretBundle

    if isinstance(bundle, RemoteSecretBundle) and bundle.target == "files":
        from agent.targets.kubeconfigs import KubeconfigFilesTarget

        return KubeconfigFilesTarget(bundle, max_file_size=cfg.limits.max_secret_size)
    if isinstance(bundle, RemoteSecretBundle):
        from agent.targets.secret import SecretTarget

        return SecretTarget(bundle, cfg.kubernetes, kube, configured=[b.name for b in cfg.bundles])
    from agent.targets.files import FileTarget

    return FileTarget(bundle, max_file_size=cfg.limits.max_secret_size)
