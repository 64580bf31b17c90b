"""The Secret target: a remote-secret bundle server-side applied as Secret istio-remote-secret-<cluster> (label
istio/multiCluster=true), and the prune sweep of Secrets whose bundle is gone. Only Secrets carrying the agent's
owner labels are ever written or deleted."""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import AsyncIterator, Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from agent.errors import PublishError
from agent.log import get_logger
from agent.targets import Published
from agent.text import shown

if TYPE_CHECKING:
    from agent.config import BundleConfig, KubernetesConfig, RemoteSecretBundle
    from agent.kube import Kube

__all__ = [
    "BUNDLE_LABEL",
    "CLUSTER_ANNOTATION",
    "DEFAULT_NAMESPACE",
    "MANAGED_BY",
    "MULTICLUSTER_LABEL",
    "PRUNE_ANNOTATION",
    "KubeLoader",
    "SecretTarget",
    "manifest",
    "namespace_of",
    "prune",
    "secret_name",
]

#: the label istiod selects remote secrets by
MULTICLUSTER_LABEL = "istio/multiCluster"
#: the annotation naming the cluster a remote secret is for
CLUSTER_ANNOTATION = "networking.istio.io/cluster"
#: owner labels: the agent manages a Secret only when both are there and the bundle is its own
MANAGED_BY = "app.kubernetes.io/managed-by"
AGENT = "istio-vault-agent"
BUNDLE_LABEL = "istio-vault-agent/bundle"
#: "true" when the bundle asked for its Secret to be deleted once the bundle leaves the config
PRUNE_ANNOTATION = "istio-vault-agent/prune"
#: where a remote secret goes without `namespace` in the bundle and without POD_NAMESPACE
DEFAULT_NAMESPACE = "istio-system"


def secret_name(cluster: str) -> str:
    """`istio-remote-secret-<cluster>`, the name istioctl create-remote-secret gives it."""
    return f"istio-remote-secret-{cluster}"


def namespace_of(bundle: RemoteSecretBundle, pod: KubernetesConfig) -> str:
    """The bundle's `namespace`, else the agent pod's (istiod's), else istio-system."""
    return bundle.namespace or pod.pod_namespace or DEFAULT_NAMESPACE


def manifest(bundle: RemoteSecretBundle, namespace: str, files: Mapping[str, bytes]) -> dict[str, Any]:
    """The apply configuration of the bundle's Secret: only the fields the agent owns."""
    cluster = bundle.cluster or ""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": secret_name(cluster),
            "namespace": namespace,
            "labels": {MULTICLUSTER_LABEL: "true", MANAGED_BY: AGENT, BUNDLE_LABEL: bundle.name},
            "annotations": {CLUSTER_ANNOTATION: cluster, PRUNE_ANNOTATION: "true" if bundle.prune else "false"},
        },
        "type": "Opaque",
        "data": {name: base64.b64encode(data).decode("ascii") for name, data in files.items()},
    }


def _meta(obj: Mapping[str, Any], key: str) -> dict[str, Any]:
    meta = obj.get("metadata")
    value = meta.get(key) if isinstance(meta, dict) else None
    return value if isinstance(value, dict) else {}


def _holds(current: Mapping[str, Any], want: Mapping[str, Any]) -> bool:
    """True when `current` already has every field of `want` (the agent's fields) with the same value."""
    data = current.get("data")
    data = data if isinstance(data, dict) else {}
    return (
        all(data.get(k) == v for k, v in want["data"].items())
        and all(_meta(current, "labels").get(k) == v for k, v in want["metadata"]["labels"].items())
        and all(_meta(current, "annotations").get(k) == v for k, v in want["metadata"]["annotations"].items())
    )


class KubeLoader:
    """The Kubernetes session of the Secret targets, loaded once, on first use.

    It counts the calls in flight, so that shutdown can give them a moment before it closes the session (which
    aborts whatever is still running).
    """

    def __init__(self, pod: KubernetesConfig) -> None:
        self.pod = pod
        self._kube: Kube | None = None
        self._lock = asyncio.Lock()
        self._idle = asyncio.Event()
        self._idle.set()
        self._busy = 0

    async def get(self) -> Kube:
        """The session (in-cluster config, else KUBECONFIG).

        Raises:
            ConfigError: there is no Kubernetes API access to load.
        """
        from agent.kube import Kube

        async with self._lock:
            if self._kube is None:
                self._kube = await Kube.load(pod=self.pod)
            return self._kube

    @contextlib.asynccontextmanager
    async def using(self) -> AsyncIterator[Kube]:
        """`get()`, counted as a call in flight until the block ends."""
        self._busy += 1
        self._idle.clear()
        try:
            yield await self.get()
        finally:
            self._busy -= 1
            if self._busy == 0:
                self._idle.set()

    async def drain(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for the calls in flight to end, then close the session; True when none was
        left (the rest are aborted by the close)."""
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
            done = True
        except TimeoutError:
            done = False
        if self._kube is not None:
            await self._kube.close()
        return done


class SecretTarget:
    """Applies one remote-secret bundle as its Secret (a `Target`); never touches a Secret it does not manage."""

    def __init__(
        self, bundle: RemoteSecretBundle, pod: KubernetesConfig, kube: KubeLoader, *, configured: Collection[str]
    ) -> None:
        self.bundle = bundle
        self.kube = kube
        #: the names of every bundle in the agent's config: a Secret owned by a bundle not among them is handed over
        self.configured = frozenset(configured)
        self.namespace = namespace_of(bundle, pod)
        self.name = secret_name(bundle.cluster or "")
        self.where = f"Secret {self.namespace}/{self.name}"

    def _check_ours(self, current: Mapping[str, Any]) -> None:
        labels = _meta(current, "labels")
        if labels.get(MANAGED_BY) != AGENT:
            raise PublishError(
                f"{self.where} exists and is not managed by istio-vault-agent (no label {MANAGED_BY}={AGENT}), so"
                f" bundle {self.bundle.name} leaves it alone: delete it, or label it {MANAGED_BY}={AGENT} and"
                f" {BUNDLE_LABEL}={self.bundle.name} to hand it over"
            )
        owner = labels.get(BUNDLE_LABEL)
        if owner != self.bundle.name and owner not in self.configured:
            # a renamed bundle (or one moved between agents) for the same cluster: its old name is gone from the
            # config, so nothing else claims the Secret and the apply below relabels it
            get_logger().info("remote_secret_taken_over", object=f"{self.namespace}/{self.name}",
                              previous=shown(owner, 63), bundle=self.bundle.name)
            return
        if owner != self.bundle.name:
            raise PublishError(
                f"{self.where} is managed by bundle {shown(owner, 63)!r}, not {self.bundle.name}: give each remote"
                " cluster one bundle, or relabel the Secret"
            )

    async def publish(self, files: Mapping[str, bytes]) -> Published:
        """Apply the Secret unless it already holds `files` (then no write at all).

        Raises:
            PublishError: the Secret exists and another owner's, RBAC forbids it, or not an answer of the API.
            KubeUnavailable: the API cannot be reached, times out, or answers 5xx or 429 (retried).
            ConfigError: there is no Kubernetes API access.
        """
        want = manifest(self.bundle, self.namespace, files)
        async with self.kube.using() as kube:
            current = await kube.get_secret(self.namespace, self.name)
            if current is not None:
                self._check_ours(current)
                if _holds(current, want):
                    return Published(False, str(_meta_value(current, "resourceVersion")))
            # force only on a Secret the agent owns: it takes back fields someone edited by hand; a new Secret that
            # appeared since the read (another owner) then fails with a conflict instead
            applied = await kube.apply_secret(want, force=current is not None)
        return Published(True, str(_meta_value(applied, "resourceVersion")))

    async def damaged(self, files: Mapping[str, bytes]) -> bool:
        """True when the Secret is gone, or no longer holds `files`, labels and annotations.

        Raises:
            PublishError / KubeUnavailable / ConfigError: as `publish`.
        """
        async with self.kube.using() as kube:
            current = await kube.get_secret(self.namespace, self.name)
        return current is None or not _holds(current, manifest(self.bundle, self.namespace, files))


def _meta_value(obj: Mapping[str, Any], key: str) -> object:
    meta = obj.get("metadata")
    return meta.get(key, "") if isinstance(meta, dict) else ""


async def prune(loader: KubeLoader, bundles: Sequence[BundleConfig], pod: KubernetesConfig) -> list[str]:
    """Delete the agent's Secrets that no configured remote-secret bundle claims and whose bundle asked for pruning
    (annotation istio-vault-agent/prune=true), in the namespaces of the configured remote-secret bundles.

    Returns what was deleted (`NAMESPACE/NAME`).

    Raises:
        PublishError / KubeUnavailable: listing or deleting failed (RBAC; API unreachable).
    """
    from agent.config import RemoteSecretBundle

    # a bundle with target files claims no Secret: the Secret of its cluster, left from the Secret form, is pruned
    remote = [b for b in bundles if isinstance(b, RemoteSecretBundle) and b.target == "secret"]
    claimed = {(namespace_of(b, pod), secret_name(b.cluster or "")) for b in remote}
    async with loader.using() as kube:
        return await _sweep(kube, claimed)


async def _sweep(kube: Kube, claimed: set[tuple[str, str]]) -> list[str]:
    deleted: list[str] = []
    for namespace in sorted({ns for ns, _ in claimed}):
        for secret in await kube.list_secrets(namespace, f"{MANAGED_BY}={AGENT},{BUNDLE_LABEL}"):
            name = str(_meta_value(secret, "name"))
            labels, annotations = _meta(secret, "labels"), _meta(secret, "annotations")
            if (namespace, name) in claimed or labels.get(MANAGED_BY) != AGENT:
                continue
            if annotations.get(PRUNE_ANNOTATION) != "true":
                get_logger().info("remote_secret_kept", object=f"{namespace}/{name}",
                                  reason="its bundle is gone from the config and did not set prune: true")
                continue
            uid = _meta_value(secret, "uid")
            if await kube.delete_secret(namespace, name, uid=uid if isinstance(uid, str) and uid else None):
                deleted.append(f"{namespace}/{name}")
    return deleted
