"""The agent's Kubernetes API session (aiohttp), on the access agent.kube_access loads: `kubectl rollout restart`, the
Secret calls remote secrets need (get, server-side apply, list by label, delete) and best-effort Events.

Every request has one wall-clock deadline (connect, headers and body alike), a cap on the bytes it reads, follows
no redirect and sends the bearer token only to the configured API server; cancelling the task aborts it. aiohttp
and PyYAML are imported on first use, so `import agent.kube` (init mode loads it through agent.reload) stays cheap.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from agent import __version__, aio, kube_access
from agent.config import KubernetesConfig, RolloutTarget
from agent.errors import AgentError, ConfigError, KubeUnavailable, PublishError, ReloadError
from agent.files import FileProblem
from agent.log import get_logger, redact
from agent.text import escape, shown

if TYPE_CHECKING:
    import aiohttp

    from agent.kube_access import Access

__all__ = [
    "ANSWER_LIMIT",
    "EVENT_COMPONENT",
    "EVENT_DEADLINE",
    "FIELD_MANAGER",
    "LIST_LIMIT",
    "RESTARTED_AT",
    "SA_DIR",
    "SECRET_DEADLINE",
    "EventRecorder",
    "Kube",
    "emit_event",
]

#: the pod-template annotation `kubectl rollout restart` sets; a new value makes the controller roll the pods
RESTARTED_AT = "kubectl.kubernetes.io/restartedAt"
#: `source.component` (and reportingComponent) of the Events the agent records
EVENT_COMPONENT = "istio-vault-agent"
#: where kubelet mounts the pod's service-account token, CA and namespace
SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
#: the field manager of everything the agent writes (server-side apply, rollout restarts)
FIELD_MANAGER = "istio-vault-agent"

#: seconds one rollout-restart patch or Secret call may take in all (connect, TLS, headers, body)
SECRET_DEADLINE = 10.0
#: seconds one Event may take in all: Events are best effort and must never hold anything up
EVENT_DEADLINE = 3.0
#: bytes read of one answer (a Secret is at most 1 MiB of data, about 1.4 MiB as base64 in JSON)
ANSWER_LIMIT = 4 * 1024 * 1024
#: bytes read of a Secret list (only the agent's own Secrets, selected by label)
LIST_LIMIT = 16 * 1024 * 1024
_EVENT_ANSWER_LIMIT = 64 * 1024

_PLURALS = {"Deployment": "deployments", "DaemonSet": "daemonsets", "StatefulSet": "statefulsets"}
_STRATEGIC_MERGE = "application/strategic-merge-patch+json"
_APPLY_PATCH = "application/apply-patch+yaml"
_MAX_MESSAGE = 1024
#: how long closing the EventRecorder waits for Events in flight (SIGTERM must still exit within a second)
_CLOSE_GRACE = 0.5
#: what a bearer token may hold: visible ASCII (a JWT is base64url and dots), so it cannot split a header
_unavailable_logged = False


def _now_rfc3339() -> str:
    # kubectl formats with Go's time.RFC3339 (seconds, 'Z' in UTC)
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ------------------------------------------------------------------------------------------------ the client


class _TooLarge(Exception):
    pass


_NOT_JSON = object()


class Kube:
    """The Kubernetes API session of the running agent: in-cluster service account, else a kubeconfig.

    Build it with `await Kube.load()` or `await Kube.maybe()` inside the event loop, and `await close()` it.
    """

    #: namespace of the pod (service-account namespace file) or of the kubeconfig's current context
    namespace: str | None
    #: where the credentials came from, for logs: "in-cluster" or the kubeconfig path(s)
    origin: str
    #: the agent's own pod (downward API), which Events are recorded on
    pod: KubernetesConfig
    #: the API server's URL, for messages
    server: str
    #: seconds each patch or Secret call may take in all; seconds each Event may take
    deadline: float = SECRET_DEADLINE
    event_deadline: float = EVENT_DEADLINE

    def __init__(self, access: Access, *, pod: KubernetesConfig | None = None) -> None:
        """Wrap loaded access; callers want `Kube.load()` or `Kube.maybe()`."""
        self._access = access
        self.namespace = access.namespace
        self.origin = access.origin
        self.server = access.server
        self.pod = pod or KubernetesConfig()
        self._session: aiohttp.ClientSession | None = None
        self._token_warned = False

    @classmethod
    def available(cls) -> bool:
        """True when in-cluster config (KUBERNETES_SERVICE_HOST) or a kubeconfig file is there to load."""
        return bool(os.environ.get("KUBERNETES_SERVICE_HOST")) or kube_access.kubeconfig_paths() is not None

    @classmethod
    async def load(cls, *, sa_dir: Path = SA_DIR, pod: KubernetesConfig | None = None) -> Kube:
        """In-cluster config when KUBERNETES_SERVICE_HOST is set, else the kubeconfig (files read off the loop).

        Raises:
            ConfigError: neither is available, or the one found cannot be loaded.
        """
        return cls(await asyncio.to_thread(kube_access.load_access, sa_dir), pod=pod)

    @classmethod
    async def maybe(cls, *, sa_dir: Path = SA_DIR, pod: KubernetesConfig | None = None) -> Kube | None:
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
            return await cls.load(sa_dir=sa_dir, pod=pod)
        except ConfigError as exc:
            get_logger().warning("kube_config_unusable", error=str(exc))
            return None

    async def close(self) -> None:
        """Close the connections (requests still running are aborted)."""
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    # ------------------------------------------------------------------ one request

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            aiohttp = aio.load()

            from agent.vault import resolver

            connector = aiohttp.TCPConnector(ssl=self._access.ssl or False, limit=8, resolver=resolver())
            self._session = aiohttp.ClientSession(
                connector=connector,
                # the deadline is asyncio.timeout around the whole request; no proxy from the environment, no
                # decompression (a compressed answer could outgrow the byte cap after it was counted)
                timeout=aiohttp.ClientTimeout(total=None),
                trust_env=False,
                auto_decompress=False,
                headers={"User-Agent": f"istio-vault-agent/{__version__}", "Accept": "application/json",
                         "Accept-Encoding": "identity"},
            )
        return self._session

    async def _bearer(self) -> str | None:
        """The token to send: the token file's current content when it changed (rotated), else the last one."""
        access = self._access
        if access.token_file is None:
            return access.token
        path = access.token_file
        try:
            stamp = await asyncio.to_thread(kube_access.stamp, path)
            if stamp != access.token_stamp:
                access.token_stamp, access.token = await asyncio.to_thread(kube_access.read_token_file, path)
                self._token_warned = False
        except OSError as exc:  # kubelet may be rewriting it: keep the token in hand, say so once
            if not self._token_warned:
                self._token_warned = True
                get_logger().warning("kube_token_unreadable", reason=str(exc) if isinstance(exc, FileProblem) else
                                     f"the token file {shown(path)} cannot be read: {exc.strerror}")
        return access.token

    async def _request(
        self,
        method: str,
        path: str,
        *,
        verb: str,
        what: str,
        final: type[AgentError],
        deadline: float | None = None,
        limit: int = ANSWER_LIMIT,
        params: dict[str, str] | None = None,
        body: object = None,
        content_type: str = "application/json",
    ) -> tuple[int, Any]:
        """One call to the API server: (status, the JSON answer or `_NOT_JSON`) for any answer but 3xx, 5xx, 429.

        Raises:
            KubeUnavailable: not reachable, reset, no full answer within `deadline`, 5xx or 429.
            `final`: a redirect, an answer over `limit` bytes, or a certificate that does not verify.
        """
        aiohttp = aio.load()

        access = self._access
        deadline = self.deadline if deadline is None else deadline
        headers: dict[str, str] = {}
        token = await self._bearer()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = content_type
        doing = f"the {verb} of {what}"
        try:
            async with asyncio.timeout(deadline):
                async with self._client().request(
                    method, access.server + path, params=params, data=data, headers=headers, allow_redirects=False,
                    server_hostname=access.tls_server_name,
                ) as resp:
                    status, location = resp.status, resp.headers.get("Location", "")
                    raw = await _read_capped(resp, limit)
        except TimeoutError:
            raise KubeUnavailable(
                f"the Kubernetes API at {self.server} did not answer {doing} within {deadline:g}s"
            ) from None
        except _TooLarge:
            raise final(f"the Kubernetes API at {self.server} answered {doing} with more than {limit} bytes") from None
        except aiohttp.ClientConnectorCertificateError as exc:
            raise final(
                f"the Kubernetes API at {self.server} has a certificate the agent does not trust"
                f" ({_short(exc.certificate_error)}): check the kubeconfig's certificate-authority or the service"
                " account's ca.crt"
            ) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise KubeUnavailable(f"cannot reach the Kubernetes API at {self.server} for {doing}: {_short(exc)}") \
                from None
        if 300 <= status < 400:
            raise final(
                f"the Kubernetes API at {self.server} answered {doing} with a redirect ({status}) to"
                f" {shown(location, 120)!r}, which the agent does not follow: point the kubeconfig or"
                " KUBERNETES_SERVICE_HOST at the API server itself"
            )
        try:
            answer: Any = json.loads(raw) if raw else None
        except (ValueError, RecursionError):  # RecursionError: nesting deeper than the parser goes
            answer = _NOT_JSON
        if status >= 500 or status == 429:
            message = _status_message(answer)
            detail = f": {message}" if message else ""
            raise KubeUnavailable(f"the Kubernetes API at {self.server} answered {status} to {doing}{detail}")
        return status, answer

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

    async def rollout_restart(self, target: RolloutTarget, default_namespace: str | None = None) -> str:
        """Restart the pods of a Deployment, DaemonSet or StatefulSet exactly as `kubectl rollout restart` does.

        Sends a strategic merge patch that sets the pod template annotation `kubectl.kubernetes.io/restartedAt`
        to now (RFC 3339). Returns a short description.

        Raises:
            ReloadError: the workload does not exist, RBAC forbids the patch, or the answer is not the API's.
            KubeUnavailable: the API cannot be reached, times out, or answers 5xx or 429.
        """
        ns = self.resolve_namespace(target, default_namespace)
        what = f"{target.kind} {ns}/{target.name}"
        now = _now_rfc3339()
        body = {"spec": {"template": {"metadata": {"annotations": {RESTARTED_AT: now}}}}}
        plural = _PLURALS[target.kind]
        status, _ = await self._request(
            "PATCH", f"/apis/apps/v1/namespaces/{_seg(ns)}/{plural}/{_seg(target.name)}", verb="rollout restart",
            what=what, final=ReloadError, params={"fieldManager": FIELD_MANAGER}, body=body,
            content_type=_STRATEGIC_MERGE,
        )
        if not 200 <= status < 300:
            raise ReloadError(_api_failure(status, what, plural))
        return f"rollout restart of {what} (restartedAt={now})"

    # ------------------------------------------------------------------------ secrets

    async def _secret_call(
        self, method: str, path: str, verb: str, what: str, *, limit: int = ANSWER_LIMIT,
        params: dict[str, str] | None = None, body: object = None, content_type: str = "application/json",
    ) -> Any:
        """One Secret call; its JSON answer, or None for a 404.

        Raises:
            PublishError: RBAC forbids it, a conflict, or not an answer of the API; one sentence naming `what`.
            KubeUnavailable: as `_request`.
        """
        status, answer = await self._request(method, path, verb=verb, what=what, final=PublishError, limit=limit,
                                              params=params, body=body, content_type=content_type)
        if status == 404:
            return None
        if not 200 <= status < 300:
            raise PublishError(_secret_failure(status, verb, what, _status_message(answer)))
        if answer is _NOT_JSON:
            raise PublishError(f"the Kubernetes API answered the {verb} of {what} with something not JSON")
        return answer

    async def get_secret(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The Secret as the API returns it (data base64), or None when it does not exist.

        Raises:
            PublishError, KubeUnavailable: as `_secret_call`.
        """
        what = f"Secret {namespace}/{name}"
        found = await self._secret_call("GET", f"/api/v1/namespaces/{_seg(namespace)}/secrets/{_seg(name)}",
                                        "get", what)
        # not "absent": the owner check must never be skipped on an odd answer
        return None if found is None else self._object(found, "get", what)

    async def apply_secret(self, secret: dict[str, Any], *, force: bool) -> dict[str, Any]:
        """Server-side apply `secret` (field manager istio-vault-agent); `force` takes over fields another manager
        owns. Returns the Secret the API answered.

        Raises:
            PublishError, KubeUnavailable: as `_secret_call`; a 409 is a field another manager owns (without `force`).
        """
        meta = secret["metadata"]
        what = f"Secret {meta['namespace']}/{meta['name']}"
        answer = await self._secret_call(
            "PATCH", f"/api/v1/namespaces/{_seg(meta['namespace'])}/secrets/{_seg(meta['name'])}", "apply", what,
            params={"fieldManager": FIELD_MANAGER, "force": "true" if force else "false"}, body=secret,
            content_type=_APPLY_PATCH,
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
            f"the Kubernetes API at {self.server} answered the {verb} of {what} with"
            " something that is not an object: check that the agent's kubeconfig or in-cluster config points at"
            " the API server"
        )

    async def list_secrets(self, namespace: str, label_selector: str) -> list[dict[str, Any]]:
        """The Secrets of `namespace` that match `label_selector`.

        Raises:
            PublishError, KubeUnavailable: as `_secret_call`.
        """
        answer = await self._secret_call(
            "GET", f"/api/v1/namespaces/{_seg(namespace)}/secrets", "list", f"Secrets in namespace {namespace}",
            limit=LIST_LIMIT, params={"labelSelector": label_selector},
        )
        items = answer.get("items") if isinstance(answer, dict) else None
        return [i for i in items if isinstance(i, dict)] if isinstance(items, list) else []

    async def delete_secret(self, namespace: str, name: str, *, uid: str | None = None) -> bool:
        """Delete the Secret (only the object with `uid`, when given); False when it was already gone.

        Raises:
            PublishError, KubeUnavailable: as `_secret_call`.
        """
        body = {"kind": "DeleteOptions", "apiVersion": "v1", "preconditions": {"uid": uid}} if uid else None
        answer = await self._secret_call(
            "DELETE", f"/api/v1/namespaces/{_seg(namespace)}/secrets/{_seg(name)}", "delete",
            f"Secret {namespace}/{name}", body=body,
        )
        return answer is not None

    # ------------------------------------------------------------------------ events

    async def event(self, reason: str, message: str, type: str = "Normal") -> bool:
        """Record a core/v1 Event on the agent's pod (`self.pod`: POD_NAME, POD_NAMESPACE, POD_UID); True when created.

        Best effort: without pod name and namespace nothing is sent, and every failure is logged, never raised.
        `message` must already be free of secret material; it is cut to 1024 characters.
        """
        pod, ns = self.pod.pod_name, self.pod.pod_namespace
        if not pod or not ns:
            return False
        now = _now_rfc3339()
        text = escape(str(redact(None, "", {"message": message})["message"]))[:_MAX_MESSAGE]
        involved = {"apiVersion": "v1", "kind": "Pod", "name": pod, "namespace": ns, "uid": self.pod.pod_uid}
        source = {"component": EVENT_COMPONENT, "host": self.pod.node_name}
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            # client-go names events <object>.<unix nanos in hex>
            "metadata": {"name": f"{pod}.{time.time_ns():x}", "namespace": ns},
            "involvedObject": {k: v for k, v in involved.items() if v is not None},
            "reason": reason,
            "message": text,
            "type": type,
            "source": {k: v for k, v in source.items() if v is not None},
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
            "reportingComponent": EVENT_COMPONENT,
            "reportingInstance": pod,
        }
        try:
            status, _ = await self._request(
                "POST", f"/api/v1/namespaces/{_seg(ns)}/events", verb="create", what=f"an Event on pod {ns}/{pod}",
                final=PublishError, deadline=self.event_deadline, limit=_EVENT_ANSWER_LIMIT, body=body,
            )
        except AgentError as exc:  # an Event is never worth failing anything for
            get_logger().warning("kube_event_failed", reason=reason, error=str(exc))
            return False
        if not 200 <= status < 300:
            get_logger().warning("kube_event_failed", reason=reason, status=status)
            return False
        return True


async def emit_event(
    kube: Kube | None,
    reason: str,
    message: str,
    type: str = "Normal",
    *,
    timeout: float = EVENT_DEADLINE,
) -> bool:
    """Record an Event on the agent's pod through `kube` if there is one, waiting at most `timeout` seconds (the
    request is aborted then); never raises, True when created."""
    if kube is None:
        return False
    try:
        async with asyncio.timeout(timeout):
            return await kube.event(reason, message, type)
    except TimeoutError:
        get_logger().warning("kube_event_failed", reason=reason, error=f"no answer within {timeout:g}s")
        return False


async def _read_capped(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """The body of `resp`, read as it streams in; `_TooLarge` as soon as it passes `limit` bytes."""
    if resp.content_length is not None and resp.content_length > limit:
        raise _TooLarge
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_chunked(65536):
        size += len(chunk)
        if size > limit:
            raise _TooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def _seg(name: str) -> str:
    """One URL path segment (a name the API returned may hold anything)."""
    return quote(name, safe="")


def _status_message(answer: object) -> str:
    """The `message` of a metav1.Status answer, escaped and shortened; "" when there is none."""
    message = answer.get("message") if isinstance(answer, dict) else None
    return shown(message, 200) if isinstance(message, str) else ""


def _api_failure(status: int, what: str, plural: str) -> str:
    if status == 404:
        return f"{what} does not exist: check reload.target (kind, name, namespace)"
    if status == 403:
        return f"the agent may not patch {what}: grant its service account RBAC verb patch on apps {plural}"
    if status == 401:
        return f"the Kubernetes API refused the agent's credentials while restarting {what}"
    return f"the Kubernetes API answered {status} to the rollout restart of {what}"


def _secret_failure(status: int, verb: str, what: str, message: str) -> str:
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
    """A one-line reason for a transport failure: the system's words for an errno ("Connection refused")."""
    os_error = getattr(exc, "os_error", exc)
    if isinstance(os_error, OSError) and os_error.errno:
        return os.strerror(os_error.errno)
    text = str(exc) or type(exc).__name__
    return escape(text.splitlines()[0])[:200]


class EventRecorder:
    """Fire-and-forget Events on the agent's pod, and the Kubernetes session of a running agent's reloads.

    The session is loaded on first use (its files read off the loop). Without pod name and namespace no Event is
    sent and nothing is loaded for it. Each Event is a task; closing aborts the ones still running after a moment.
    """

    def __init__(self, pod: KubernetesConfig) -> None:
        self.pod = pod
        self._kube: Kube | None = None
        self._loaded = False
        self._load_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[Any]] = set()

    async def client(self) -> Kube | None:
        """The Kubernetes session, or None without in-cluster config or kubeconfig (looked up once)."""
        async with self._load_lock:
            if not self._loaded:
                self._kube = await Kube.maybe(pod=self.pod)
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
        """Give Events in flight a moment to finish, abort the rest, and close the session."""
        pending = set(self._tasks)
        if pending:
            _, pending = await asyncio.wait(pending, timeout=_CLOSE_GRACE)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        if self._kube is not None:
            await self._kube.close()
