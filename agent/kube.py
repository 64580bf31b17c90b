"""Kubernetes side: `kubectl rollout restart` of a workload, best-effort Events on the agent's own pod, and the
Secret calls remote secrets need (get, server-side apply, list by label, delete).

The `kubernetes` client is imported only inside functions, so init mode (and `import agent.reload`) never loads it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import time
from pathlib import Path
from typing import Any, TypeVar

from agent.config import KubernetesConfig, RolloutTarget
from agent.errors import ConfigError, PublishError, ReloadError
from agent.log import get_logger, redact
from agent.text import escape
from agent.threads import offload

__all__ = ["EVENT_COMPONENT", "FIELD_MANAGER", "RESTARTED_AT", "SA_DIR", "EventRecorder", "Kube", "emit_event"]

#: the pod-template annotation `kubectl rollout restart` sets; a new value makes the controller roll the pods
RESTARTED_AT = "kubectl.kubernetes.io/restartedAt"
#: `source.component` (and reportingComponent) of the Events the agent records
EVENT_COMPONENT = "istio-vault-agent"
#: where kubelet mounts the pod's service-account token, CA and namespace
SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")

_PLURALS = {"Deployment": "deployment", "DaemonSet": "daemon_set", "StatefulSet": "stateful_set"}
_STRATEGIC_MERGE = "application/strategic-merge-patch+json"
_APPLY_PATCH = "application/apply-patch+yaml"
#: the field manager of everything the agent writes (server-side apply, rollout restarts)
FIELD_MANAGER = "istio-vault-agent"
_MAX_MESSAGE = 1024
#: (connect, read) seconds; the client blocks, and a thread cannot be cancelled, so every call is bounded
_PATCH_TIMEOUT = (5.0, 10.0)
_EVENT_TIMEOUT = (2.0, 3.0)
#: how long closing the EventRecorder waits for Events in flight (SIGTERM must still exit within a second)
_CLOSE_GRACE = 0.5
_unavailable_logged = False

T = TypeVar("T")


def _now_rfc3339() -> str:
    # kubectl formats with Go's time.RFC3339 (seconds, 'Z' in UTC)
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _kubeconfig_path() -> str | None:
    """KUBECONFIG (may list several files, as kubectl allows), else ~/.kube/config when it exists."""
    env = os.environ.get("KUBECONFIG", "")
    if env.strip(os.pathsep):
        return env
    default = Path("~/.kube/config").expanduser()
    return str(default) if default.is_file() else None


class Kube:
    """A Kubernetes API client for the agent: in-cluster service account, else a kubeconfig."""

    #: the `kubernetes.client.ApiClient` every call goes through
    api_client: Any
    #: namespace of the pod (service-account namespace file) or of the kubeconfig's current context
    namespace: str | None
    #: where the credentials came from, for logs: "in-cluster" or the kubeconfig path
    origin: str
    #: the agent's own pod (downward API), which Events are recorded on
    pod: KubernetesConfig

    def __init__(
        self,
        api_client: Any,
        *,
        namespace: str | None = None,
        origin: str = "",
        pod: KubernetesConfig | None = None,
    ) -> None:
        """Wrap a ready `kubernetes.client.ApiClient`; most callers want `Kube.load()` or `Kube.maybe()`."""
        self.api_client = api_client
        self.namespace = namespace
        self.origin = origin
        self.pod = pod or KubernetesConfig()

    @classmethod
    def available(cls) -> bool:
        """True when in-cluster config (KUBERNETES_SERVICE_HOST) or a kubeconfig file is there to load."""
        return bool(os.environ.get("KUBERNETES_SERVICE_HOST")) or _kubeconfig_path() is not None

    @classmethod
    def load(cls, *, sa_dir: Path = SA_DIR, pod: KubernetesConfig | None = None) -> Kube:
        """Build a client from in-cluster config when KUBERNETES_SERVICE_HOST is set, else from the kubeconfig.

        Raises:
            ConfigError: neither is available, or the one found cannot be loaded.
        """
        from kubernetes import client, config
        from kubernetes.config.incluster_config import InClusterConfigLoader

        cfg = client.Configuration()
        if os.environ.get("KUBERNETES_SERVICE_HOST"):
            try:
                # the loader re-reads the token file every minute, so a rotated projected token is picked up
                loader = InClusterConfigLoader(  # type: ignore[no-untyped-call]
                    token_filename=str(sa_dir / "token"), cert_filename=str(sa_dir / "ca.crt")
                )
                loader.load_and_set(cfg)  # type: ignore[no-untyped-call]
            except config.ConfigException as exc:
                raise ConfigError(
                    f"in-cluster Kubernetes config cannot be loaded from {sa_dir}: {exc};"
                    " mount a service-account token (automountServiceAccountToken: true)"
                ) from None
            ns_file = sa_dir / "namespace"
            try:
                namespace: str | None = ns_file.read_text(encoding="utf-8").strip() or None
            except OSError:
                namespace = None
            return cls(client.ApiClient(cfg), namespace=namespace, origin="in-cluster", pod=pod)
        path = _kubeconfig_path()
        if path is None:
            raise ConfigError(
                "no Kubernetes API access: run in a pod with a service account, or set KUBECONFIG to a kubeconfig file"
            )
        try:
            config.load_kube_config(  # type: ignore[no-untyped-call]
                config_file=path, client_configuration=cfg, persist_config=False
            )
            _, active = config.list_kube_config_contexts(config_file=path)  # type: ignore[no-untyped-call]
        except (config.ConfigException, OSError, ValueError, TypeError, KeyError) as exc:
            raise ConfigError(f"kubeconfig {path} cannot be loaded: {exc}") from None
        namespace = ((active or {}).get("context") or {}).get("namespace") or None
        return cls(client.ApiClient(cfg), namespace=namespace, origin=path, pod=pod)

    @classmethod
    def maybe(cls, *, sa_dir: Path = SA_DIR, pod: KubernetesConfig | None = None) -> Kube | None:
        """`load()`, or None when there is no Kubernetes config at all (logged once, at debug).

        A config that exists but cannot be loaded is logged as a warning, and None is returned too.
        """
        global _unavailable_logged
        if not cls.available():
            if not _unavailable_logged:
                _unavailable_logged = True
                get_logger().debug("kube_unavailable", detail="no in-cluster config and no kubeconfig")
            return None
        try:
            return cls.load(sa_dir=sa_dir, pod=pod)
        except ConfigError as exc:
            get_logger().warning("kube_config_unusable", error=str(exc))
            return None

    def close(self) -> None:
        """Release the client's connection pool."""
        self.api_client.close()

    # ------------------------------------------------------------------ rollout restart

    def resolve_namespace(self, target: RolloutTarget, default_namespace: str | None = None) -> str:
        """The namespace of `target`: its own, else `default_namespace`, the agent pod's, the service account's or
        the kubeconfig context's.

        Raises:
            ReloadError: none of them is set.
        """
        ns = target.namespace or default_namespace or self.pod.pod_namespace or self.namespace
        if not ns:
            raise ReloadError(
                f"no namespace for rollout-restart of {target.kind} {target.name}: set reload.target.namespace"
            )
        return ns

    def rollout_restart(self, target: RolloutTarget, default_namespace: str | None = None) -> str:
        """Restart the pods of a Deployment, DaemonSet or StatefulSet exactly as `kubectl rollout restart` does.

        Sends a strategic merge patch that sets the pod template annotation `kubectl.kubernetes.io/restartedAt`
        to now (RFC 3339). Blocks; call it through `rollout_restart_async`. Returns a short description.

        Raises:
            ReloadError: the workload does not exist, RBAC forbids the patch, or the API cannot be reached.
        """
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        ns = self.resolve_namespace(target, default_namespace)
        what = f"{target.kind} {ns}/{target.name}"
        now = _now_rfc3339()
        body = {"spec": {"template": {"metadata": {"annotations": {RESTARTED_AT: now}}}}}
        patch = getattr(client.AppsV1Api(self.api_client), f"patch_namespaced_{_PLURALS[target.kind]}")
        try:
            # without _content_type the client picks json-patch+json, which the apiserver rejects for a dict
            patch(
                target.name,
                ns,
                body,
                field_manager=FIELD_MANAGER,
                _content_type=_STRATEGIC_MERGE,
                _request_timeout=_PATCH_TIMEOUT,
            )
        except ApiException as exc:
            raise ReloadError(_api_failure(exc.status, what, f"{target.kind.lower()}s")) from None
        except Exception as exc:  # noqa: BLE001 - urllib3/ssl/socket errors all mean "cannot reach the API"
            raise ReloadError(
                f"cannot reach the Kubernetes API at {self.api_client.configuration.host} to restart {what}:"
                f" {_short(exc)}"
            ) from None
        return f"rollout restart of {what} (restartedAt={now})"

    async def rollout_restart_async(self, target: RolloutTarget, default_namespace: str | None = None) -> str:
        """`rollout_restart` in a daemon thread, for the event loop; raises what it raises."""
        return await offload(self.rollout_restart, target, default_namespace)

    # ------------------------------------------------------------------------ secrets

    def _secret_call(self, verb: str, what: str, call: Any) -> Any:
        """Run one Secret call; its JSON answer, or None for a 404. Blocks.

        Raises:
            PublishError: RBAC forbids it, a conflict, or the API cannot be reached; one sentence naming `what`.
        """
        import json

        from kubernetes.client.exceptions import ApiException

        try:
            resp = call()
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise PublishError(_secret_failure(exc.status, verb, what, _api_message(exc.body))) from None
        except Exception as exc:  # noqa: BLE001 - urllib3/ssl/socket errors all mean "cannot reach the API"
            raise PublishError(
                f"cannot reach the Kubernetes API at {self.api_client.configuration.host} to {verb} {what}:"
                f" {_short(exc)}"
            ) from None
        try:
            return json.loads(resp.data or b"null")
        except ValueError:
            raise PublishError(f"the Kubernetes API answered the {verb} of {what} with something not JSON") from None

    def get_secret(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The Secret as the API returns it (data base64), or None when it does not exist. Blocks.

        Raises:
            PublishError: as `_secret_call`.
        """
        from kubernetes import client

        api = client.CoreV1Api(self.api_client)
        what = f"Secret {namespace}/{name}"
        found = self._secret_call(
            "get", what,
            lambda: api.read_namespaced_secret(name, namespace, _preload_content=False,
                                               _request_timeout=_PATCH_TIMEOUT),
        )
        # not "absent": the owner check must never be skipped on an odd answer
        return None if found is None else self._object(found, "get", what)

    def apply_secret(self, secret: dict[str, Any], *, force: bool) -> dict[str, Any]:
        """Server-side apply `secret` (field manager istio-vault-agent); `force` takes over fields another manager
        owns. Returns the Secret the API answered. Blocks.

        Raises:
            PublishError: as `_secret_call`; a 409 is a field another manager owns (without `force`).
        """
        from kubernetes import client

        meta = secret["metadata"]
        api = client.CoreV1Api(self.api_client)
        what = f"Secret {meta['namespace']}/{meta['name']}"
        answer = self._secret_call(
            "apply", what,
            lambda: api.patch_namespaced_secret(
                meta["name"], meta["namespace"], secret, field_manager=FIELD_MANAGER, force=force,
                _content_type=_APPLY_PATCH, _preload_content=False, _request_timeout=_PATCH_TIMEOUT,
            ),
        )
        return self._object(answer, "apply", what)

    def _object(self, answer: object, verb: str, what: str) -> dict[str, Any]:
        """`answer` when it is a JSON object (a Secret).

        Raises:
            PublishError: anything else (an answer from something that is not a Kubernetes API server).
        """
        if isinstance(answer, dict):
            return answer
        raise PublishError(
            f"the Kubernetes API at {self.api_client.configuration.host} answered the {verb} of {what} with"
            " something that is not an object: check that the agent's kubeconfig or in-cluster config points at"
            " the API server"
        )

    def list_secrets(self, namespace: str, label_selector: str) -> list[dict[str, Any]]:
        """The Secrets of `namespace` that match `label_selector`. Blocks.

        Raises:
            PublishError: as `_secret_call`.
        """
        from kubernetes import client

        api = client.CoreV1Api(self.api_client)
        answer = self._secret_call(
            "list", f"Secrets in namespace {namespace}",
            lambda: api.list_namespaced_secret(namespace, label_selector=label_selector, _preload_content=False,
                                               _request_timeout=_PATCH_TIMEOUT),
        )
        items = answer.get("items") if isinstance(answer, dict) else None
        return [i for i in items if isinstance(i, dict)] if isinstance(items, list) else []

    def delete_secret(self, namespace: str, name: str, *, uid: str | None = None) -> bool:
        """Delete the Secret (only the object with `uid`, when given); False when it was already gone. Blocks.

        Raises:
            PublishError: as `_secret_call`.
        """
        from kubernetes import client

        api = client.CoreV1Api(self.api_client)
        body = client.V1DeleteOptions(preconditions=client.V1Preconditions(uid=uid)) if uid else None
        answer = self._secret_call(
            "delete", f"Secret {namespace}/{name}",
            lambda: api.delete_namespaced_secret(name, namespace, body=body, _preload_content=False,
                                                 _request_timeout=_PATCH_TIMEOUT),
        )
        return answer is not None

    # ------------------------------------------------------------------------ events

    def event(self, reason: str, message: str, type: str = "Normal") -> bool:
        """Record a core/v1 Event on the agent's pod (`self.pod`: POD_NAME, POD_NAMESPACE, POD_UID); True when created.

        Best effort: without pod name and namespace nothing is sent, and every failure is logged, never raised.
        `message` must already be free of secret material; it is cut to 1024 characters. Blocks.
        """
        pod, ns = self.pod.pod_name, self.pod.pod_namespace
        if not pod or not ns:
            return False
        try:
            from kubernetes import client

            now = dt.datetime.now(dt.UTC).replace(microsecond=0)
            text = escape(str(redact(None, "", {"message": message})["message"]))[:_MAX_MESSAGE]
            body = client.CoreV1Event(
                api_version="v1",
                kind="Event",
                # client-go names events <object>.<unix nanos in hex>
                metadata=client.V1ObjectMeta(name=f"{pod}.{time.time_ns():x}", namespace=ns),
                involved_object=client.V1ObjectReference(
                    api_version="v1", kind="Pod", name=pod, namespace=ns, uid=self.pod.pod_uid
                ),
                reason=reason,
                message=text,
                type=type,
                source=client.V1EventSource(component=EVENT_COMPONENT, host=self.pod.node_name),
                first_timestamp=now,
                last_timestamp=now,
                count=1,
                reporting_component=EVENT_COMPONENT,
                reporting_instance=pod,
            )
            client.CoreV1Api(self.api_client).create_namespaced_event(ns, body, _request_timeout=_EVENT_TIMEOUT)
        except Exception as exc:  # noqa: BLE001 - an Event is never worth failing a publish for
            status = getattr(exc, "status", None)
            get_logger().warning(
                "kube_event_failed", reason=reason, status=status, error=_short(exc) if status is None else None
            )
            return False
        return True

    async def emit_event(
        self,
        reason: str,
        message: str,
        type: str = "Normal",
        *,
        timeout: float = 5.0,
    ) -> bool:
        """`event()` in a thread, waiting at most `timeout` seconds; never raises, True when created."""
        try:
            return await asyncio.wait_for(offload(self.event, reason, message, type), timeout)
        except TimeoutError:
            # the thread itself ends within the request timeout; we just stop waiting for it
            get_logger().warning("kube_event_failed", reason=reason, error=f"no answer within {timeout:g}s")
            return False


async def emit_event(
    kube: Kube | None,
    reason: str,
    message: str,
    type: str = "Normal",
    *,
    timeout: float = 5.0,
) -> bool:
    """Record an Event on the agent's pod through `kube` if there is one; never raises, True when created."""
    if kube is None:
        return False
    return await kube.emit_event(reason, message, type, timeout=timeout)


def _api_failure(status: int | None, what: str, plural: str) -> str:
    if status == 404:
        return f"{what} does not exist: check reload.target (kind, name, namespace)"
    if status == 403:
        return f"the agent may not patch {what}: grant its service account RBAC verb patch on apps {plural}"
    if status == 401:
        return f"the Kubernetes API refused the agent's credentials while restarting {what}"
    return f"the Kubernetes API answered {status} to the rollout restart of {what}"


def _api_message(body: object) -> str:
    """The `message` of a metav1.Status body, shortened; "" when there is none."""
    import json

    try:
        status = json.loads(body) if isinstance(body, str | bytes) else None
    except ValueError:
        return ""
    message = status.get("message") if isinstance(status, dict) else None
    return escape(message)[:200] if isinstance(message, str) else ""


def _secret_failure(status: int | None, verb: str, what: str, message: str) -> str:
    if status == 403:
        rbac_verb = "patch" if verb == "apply" else verb
        # the chart grants delete only on the Secrets of remoteSecrets.retiredClusters
        chart = "list its cluster in remoteSecrets.retiredClusters" if verb == "delete" else (
            "rbac.create with a remote-secret bundle")
        return (
            f"the agent may not {verb} {what}: grant its service account RBAC verb {rbac_verb}"
            f" on secrets in that namespace (chart: {chart})"
        )
    if status == 401:
        return f"the Kubernetes API refused the agent's credentials for the {verb} of {what}"
    if status == 409:
        return f"{what} has fields another field manager owns, so the agent did not {verb} it ({message or 'conflict'})"
    detail = f": {message}" if message else ""
    return f"the Kubernetes API answered {status} to the {verb} of {what}{detail}"


def _short(exc: BaseException) -> str:
    """A one-line reason without the urllib3 retry noise."""
    reason = getattr(exc, "reason", None)
    text = str(reason if reason is not None else exc) or type(exc).__name__
    return text.splitlines()[0][:200]


class EventRecorder:
    """Fire-and-forget Events on the agent's pod, and the one Kubernetes client of a running agent.

    The client (and the `kubernetes` package) is loaded in a thread on first use, never on the event loop.
    Without pod name and namespace no Event is sent and nothing is loaded for it.
    """

    def __init__(self, pod: KubernetesConfig) -> None:
        self.pod = pod
        self._kube: Kube | None = None
        self._loaded = False
        self._load_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[Any]] = set()

    async def client(self) -> Kube | None:
        """The Kubernetes client, or None without in-cluster config or kubeconfig (looked up once)."""
        async with self._load_lock:
            if not self._loaded:
                self._kube = await offload(lambda: Kube.maybe(pod=self.pod))
                self._loaded = True
        return self._kube

    def record(self, reason: str, message: str, type: str = "Normal") -> None:
        """Record an Event in the background; failures are logged by `Kube.event`, never raised."""
        if not (self.pod.pod_name and self.pod.pod_namespace):
            return

        async def send() -> None:
            await emit_event(await self.client(), reason, message, type)

        task = asyncio.create_task(send(), name=f"event:{reason}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Give Events in flight a moment to finish, stop the rest, and release the client.

        A cancelled task cannot stop its thread: closing the client (or exiting) under a thread still inside a TLS
        request can abort the process, so the client stays open while one may be left.
        """
        pending = set(self._tasks)
        if pending:
            _, pending = await asyncio.wait(pending, timeout=_CLOSE_GRACE)
        for task in pending:
            task.cancel()
        if self._kube is not None and not pending:
            self._kube.close()
