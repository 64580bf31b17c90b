"""A small HTTPS stand-in for the kube-apiserver: mints service-account JWTs and answers TokenReviews; keeps
Secrets with server-side apply semantics (field managers, conflicts, force) for the remote-secret tests; serves
the Deployments, ConfigMaps, Pods and pod proxy reads `rotate --context` looks at.

It is the only thing the test bed fakes; OpenBao is always a real `bao server -dev`.
"""

from __future__ import annotations

import base64
import copy
import datetime as dt
import hashlib
import json
import re
import secrets
import ssl
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from testbed import pki

__all__ = [
    "DEFAULT_ISSUER",
    "KubeAPI",
    "KubeRequest",
    "KubeResponse",
    "merge_patch",
]

#: the `iss` (and default audience) of tokens minted by a real cluster with default flags
DEFAULT_ISSUER = "https://kubernetes.default.svc.cluster.local"

TOKENREVIEW_PATH = "/apis/authentication.k8s.io/v1/tokenreviews"


@dataclass(frozen=True)
class KubeRequest:
    """One request the stand-in received, as recorded in `KubeAPI.requests`."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: Any
    params: dict[str, str] = field(default_factory=dict)
    #: the `system:serviceaccount:NS:NAME` the bearer token authenticated as, or None
    user: str | None = None


#: (HTTP status, JSON-serialisable body or raw bytes), or (status, body, extra response headers)
KubeResponse = tuple[int, Any] | tuple[int, Any, dict[str, str]]
Handler = Callable[[KubeRequest], KubeResponse]


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _k8s_time(when: dt.datetime | None = None) -> str:
    return (when or _now()).strftime("%Y-%m-%dT%H:%M:%SZ")


def _status(code: int, reason: str, message: str) -> KubeResponse:
    """A metav1.Status failure body, the way the apiserver reports errors."""
    return code, {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


def _make_tls(tmpdir: Path) -> tuple[bytes, Path, Path, Path]:
    """A CA and a server cert for 127.0.0.1/localhost from the test PKI; returns (ca_pem, ca, cert, key)."""
    ca = pki.root_ca(cn="kubeapi-standin-ca", org="testbed", days=2)
    server = pki.leaf_cert(ca, cn="kube-apiserver", dns_names=("localhost",), ip_addresses=("127.0.0.1",), days=1)
    ca_file, cert_file, key_file = tmpdir / "ca.crt", tmpdir / "tls.crt", tmpdir / "tls.key"
    ca_file.write_bytes(ca.cert_pem)
    cert_file.write_bytes(server.cert_pem)
    key_file.write_bytes(server.key_pem)
    key_file.chmod(0o600)
    return ca.cert_pem, ca_file, cert_file, key_file


def _compile(pattern: str) -> re.Pattern[str]:
    """Turn '/api/v1/namespaces/{namespace}/events' into a regex with named groups."""
    parts = re.split(r"(\{[a-zA-Z_]+\})", pattern)
    regex = "".join(f"(?P<{p[1:-1]}>[^/]+)" if p.startswith("{") else re.escape(p) for p in parts)
    return re.compile(f"^{regex}$")


class _TLSServer(ThreadingHTTPServer):
    """HTTPS with the TLS handshake in each connection's own thread (a client that connects and never speaks holds
    up only its thread), and quiet about clients that go away mid-handshake or mid-request (the agent aborting a
    request it gave up on is not a stand-in failure)."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], ctx: ssl.SSLContext) -> None:
        super().__init__(address, handler)
        self.ctx = ctx

    def get_request(self) -> tuple[Any, Any]:
        sock, address = self.socket.accept()
        return self.ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), address

    def finish_request(self, request: Any, client_address: Any) -> None:
        request.settimeout(10)
        request.do_handshake()
        request.settimeout(None)
        super().finish_request(request, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], OSError):  # ssl.SSLError, resets, timeouts: the client went away
            return
        super().handle_error(request, client_address)


class KubeAPI:
    """A threaded HTTPS server that behaves like the parts of the kube-apiserver the agent uses.

    Tokens are RS256 JWTs shaped like projected service-account tokens. A token is valid while its
    signature checks, it has not expired, it was not revoked, and its service account still exists
    with the same uid (deleting and recreating a service account invalidates old tokens, as in a
    real cluster). Every request needs a valid bearer token unless `require_auth=False`.
    """

    issuer: str
    requests: list[KubeRequest]

    def __init__(self, *, issuer: str = DEFAULT_ISSUER, require_auth: bool = True) -> None:
        """Create the stand-in (not yet listening); `start()` or use it as a context manager."""
        self.issuer = issuer
        self.require_auth = require_auth
        self.requests = []
        self._lock = threading.Lock()
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pub_der = self._key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self._kid = _b64url(hashlib.sha256(pub_der).digest())
        self._service_accounts: dict[tuple[str, str], str] = {}
        self._revoked_jti: set[str] = set()
        self._handlers: list[tuple[str, re.Pattern[str], Handler]] = []
        self._workloads = _Workloads()
        self._secrets = _Secrets()
        self._configmaps: dict[tuple[str, str], dict[str, Any]] = {}
        self._pods: dict[tuple[str, str], dict[str, Any]] = {}
        self._proxies: dict[tuple[str, str], dict[int, str | Handler]] = {}
        self._tmp = tempfile.TemporaryDirectory(prefix="kubeapi-")
        self._tmpdir = Path(self._tmp.name)
        self._ca_pem, self._ca_file, self._cert_file, self._key_file = _make_tls(self._tmpdir)
        self._server: ThreadingHTTPServer | None = None
        self._port = 0
        self._thread: threading.Thread | None = None
        self._install_defaults()

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> KubeAPI:
        """Listen on a free loopback port (the same one again after `pause()`) in a daemon thread; returns self."""
        if self._server is not None:
            return self
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self._cert_file, self._key_file)
        server = _TLSServer(("127.0.0.1", self._port), self._handler_class(), ctx)
        self._port = int(server.server_address[1])
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="kubeapi-standin", daemon=True)
        self._thread.start()
        return self

    def pause(self) -> None:
        """Stop listening but keep the port, state and TLS files: connections are refused until `start()`."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def stop(self) -> None:
        """Stop listening and remove the temporary TLS files."""
        self.pause()
        self._tmp.cleanup()

    def __enter__(self) -> KubeAPI:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The TCP port the server listens on (and listens on again after `pause()`)."""
        if not self._port:
            raise RuntimeError("KubeAPI is not started; call start() first.")
        return self._port

    @property
    def url(self) -> str:
        """Base URL, e.g. https://127.0.0.1:40123 (the server cert has SAN IP:127.0.0.1)."""
        return f"https://127.0.0.1:{self.port}"

    @property
    def ca_pem(self) -> bytes:
        """PEM of the CA that signed the server certificate (what `kubernetes_ca_cert` needs)."""
        return self._ca_pem

    @property
    def ca_file(self) -> Path:
        """Path of a file holding `ca_pem`."""
        return self._ca_file

    @property
    def public_key_pem(self) -> bytes:
        """PEM of the token-signing public key (usable as `pem_keys` in the kubernetes auth config)."""
        return self._key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    # -------------------------------------------------------------- service accounts

    def mint_token(
        self,
        namespace: str,
        name: str,
        *,
        audience: str | list[str] | None = None,
        ttl: int = 3600,
        uid: str | None = None,
    ) -> str:
        """Return a signed projected service-account token for NAMESPACE/NAME.

        The service account is created on first use. Passing a `uid` different from the current one
        recreates the service account, which invalidates its older tokens. `audience=None` gives the
        API server's default audience (the issuer). A negative `ttl` mints an already expired token.
        """
        with self._lock:
            current = self._service_accounts.get((namespace, name))
            sa_uid = uid or current or str(uuid.uuid4())
            self._service_accounts[(namespace, name)] = sa_uid
        if audience is None:
            aud = [self.issuer]
        elif isinstance(audience, str):
            aud = [audience]
        else:
            aud = list(audience)
        now = int(time.time())
        claims = {
            "aud": aud,
            "exp": now + ttl,
            "iat": min(now, now + ttl),
            "nbf": min(now, now + ttl),
            "iss": self.issuer,
            "jti": str(uuid.uuid4()),
            "sub": f"system:serviceaccount:{namespace}:{name}",
            "kubernetes.io": {
                "namespace": namespace,
                "serviceaccount": {"name": name, "uid": sa_uid},
            },
        }
        header = {"alg": "RS256", "kid": self._kid}
        signing_input = (
            _b64url(json.dumps(header, separators=(",", ":")).encode())
            + "."
            + _b64url(json.dumps(claims, separators=(",", ":")).encode())
        )
        signature = self._key.sign(signing_input.encode("ascii"), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input}.{_b64url(signature)}"

    def revoke(self, namespace: str, name: str) -> None:
        """Delete the service account NAMESPACE/NAME: every token minted for it stops authenticating."""
        with self._lock:
            self._service_accounts.pop((namespace, name), None)

    def revoke_token(self, token: str) -> None:
        """Invalidate one token (as when its bound pod or secret is deleted)."""
        claims = self._verify(token, check_state=False)
        if claims is None:
            return
        with self._lock:
            self._revoked_jti.add(str(claims.get("jti", "")))

    def service_account_uid(self, namespace: str, name: str) -> str | None:
        """The current uid of NAMESPACE/NAME, or None if it does not exist."""
        with self._lock:
            return self._service_accounts.get((namespace, name))

    def review(self, token: str, audiences: list[str] | None = None) -> dict[str, Any]:
        """Compute a TokenReview `status` for `token`, exactly as the HTTP endpoint answers it."""
        claims = self._verify(token)
        if claims is None:
            return {"authenticated": False, "error": "[invalid bearer token, service account token is not valid]"}
        token_aud = claims.get("aud", [])
        token_aud = [token_aud] if isinstance(token_aud, str) else list(token_aud)
        wanted = audiences or [self.issuer]
        matched = [a for a in wanted if a in token_aud]
        if not matched:
            return {
                "authenticated": False,
                "error": "[invalid bearer token, token audiences "
                f"{json.dumps(token_aud)} is invalid for the target audiences {json.dumps(wanted)}]",
            }
        k8s = claims["kubernetes.io"]
        ns, sa = k8s["namespace"], k8s["serviceaccount"]
        return {
            "authenticated": True,
            "user": {
                "username": f"system:serviceaccount:{ns}:{sa['name']}",
                "uid": sa["uid"],
                "groups": [
                    "system:serviceaccounts",
                    f"system:serviceaccounts:{ns}",
                    "system:authenticated",
                ],
                "extra": {"authentication.kubernetes.io/credential-id": [f"JTI={claims.get('jti', '')}"]},
            },
            "audiences": matched,
        }

    def _verify(self, token: str, *, check_state: bool = True) -> dict[str, Any] | None:
        """Claims of a token this server signed that is still valid, else None."""
        try:
            header_b64, claims_b64, sig_b64 = token.strip().split(".")
            header = json.loads(_b64url_decode(header_b64))
            if header.get("alg") != "RS256":
                return None
            self._key.public_key().verify(
                _b64url_decode(sig_b64),
                f"{header_b64}.{claims_b64}".encode("ascii"),
                padding.PKCS1v15(),
                hashes.SHA256(),
            )
            claims: dict[str, Any] = json.loads(_b64url_decode(claims_b64))
        except (ValueError, InvalidSignature, UnicodeError):
            return None
        if not check_state:
            return claims
        now = time.time()
        if claims.get("iss") != self.issuer or now >= claims.get("exp", 0) or now < claims.get("nbf", 0):
            return None
        k8s = claims.get("kubernetes.io", {})
        key = (k8s.get("namespace"), k8s.get("serviceaccount", {}).get("name"))
        with self._lock:
            if claims.get("jti") in self._revoked_jti:
                return None
            if self._service_accounts.get(key) != k8s.get("serviceaccount", {}).get("uid"):
                return None
        return claims

    # -------------------------------------------------------------- request handling

    def add_handler(self, method: str, pattern: str, handler: Handler) -> Callable[[], None]:
        """Answer METHOD on paths matching `pattern` ('{name}' matches one segment) with `handler`.

        Handlers added later win over earlier ones (and over the defaults). Returns a function
        that removes the handler again.
        """
        entry = (method.upper(), _compile(pattern), handler)
        with self._lock:
            self._handlers.insert(0, entry)

        def remove() -> None:
            with self._lock:
                if entry in self._handlers:
                    self._handlers.remove(entry)

        return remove

    def workload(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        """The current state of a Deployment/DaemonSet/StatefulSet after the PATCHes it received, or None."""
        with self._workloads.lock:
            obj = self._workloads.objects.get((kind, namespace, name))
            return copy.deepcopy(obj) if obj is not None else None

    def secret(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The Secret NAMESPACE/NAME as the API would return it, or None."""
        with self._secrets.lock:
            obj = self._secrets.objects.get((namespace, name))
            return copy.deepcopy(obj) if obj is not None else None

    def secret_managers(self, namespace: str, name: str) -> dict[str, set[tuple[str, ...]]]:
        """Field manager -> the field paths it owns in the Secret (server-side apply bookkeeping)."""
        with self._secrets.lock:
            return copy.deepcopy(self._secrets.owners.get((namespace, name), {}))

    def put_secret(self, obj: dict[str, Any], *, manager: str = "kubectl-create") -> dict[str, Any]:
        """Create or replace a Secret directly (as someone else would with kubectl); `manager` owns every field."""
        meta = obj["metadata"]
        with self._secrets.lock:
            return self._secrets.store(meta["namespace"], meta["name"], copy.deepcopy(obj), {manager: _leaves(obj)})

    def remove_secret(self, namespace: str, name: str) -> bool:
        """Delete a Secret directly (as someone else would); False when there was none."""
        with self._secrets.lock:
            self._secrets.owners.pop((namespace, name), None)
            return self._secrets.objects.pop((namespace, name), None) is not None

    def clear_requests(self) -> None:
        """Forget the recorded requests."""
        with self._lock:
            self.requests.clear()

    def requests_to(self, method: str, path_prefix: str) -> list[KubeRequest]:
        """Recorded requests with this method whose path starts with `path_prefix`."""
        with self._lock:
            return [r for r in self.requests if r.method == method.upper() and r.path.startswith(path_prefix)]

    def tokenreviews(self) -> list[KubeRequest]:
        """Recorded TokenReview requests."""
        return self.requests_to("POST", TOKENREVIEW_PATH)

    def put_workload(self, kind: str, obj: dict[str, Any]) -> dict[str, Any]:
        """Create or replace a Deployment/DaemonSet/StatefulSet as given (GET answers it; PATCHes apply to it)."""
        meta = obj["metadata"]
        full = merge_patch(_workload(kind, meta["namespace"], meta["name"]), copy.deepcopy(obj))
        with self._workloads.lock:
            self._workloads.objects[(kind, meta["namespace"], meta["name"])] = full
        return copy.deepcopy(full)

    def put_configmap(self, namespace: str, name: str, data: dict[str, str]) -> None:
        """Create or replace the ConfigMap NAMESPACE/NAME with `data`."""
        with self._lock:
            self._configmaps[(namespace, name)] = {
                "apiVersion": "v1", "kind": "ConfigMap", "data": dict(data),
                "metadata": {"name": name, "namespace": namespace, "uid": str(uuid.uuid4()), "resourceVersion": "1"},
            }

    def put_pod(
        self,
        namespace: str,
        name: str,
        labels: dict[str, str],
        *,
        phase: str = "Running",
        proxy: dict[int, str | Handler] | None = None,
    ) -> None:
        """Create or replace a Pod; `proxy` maps a container port to the base URL the API server's pod proxy
        forwards GET /api/v1/namespaces/NS/pods/NAME:PORT/proxy/PATH to, or to a handler answering it."""
        with self._lock:
            self._pods[(namespace, name)] = {
                "apiVersion": "v1", "kind": "Pod", "status": {"phase": phase},
                "metadata": {"name": name, "namespace": namespace, "labels": dict(labels), "uid": str(uuid.uuid4())},
                "spec": {"containers": [{"name": "discovery", "image": "example.invalid/pilot:latest"}]},
            }
            self._proxies[(namespace, name)] = dict(proxy or {})

    def remove_pod(self, namespace: str, name: str) -> None:
        """Delete a Pod (and its proxy targets)."""
        with self._lock:
            self._pods.pop((namespace, name), None)
            self._proxies.pop((namespace, name), None)

    def write_kubeconfig(
        self, path: str | Path, token: str, *, namespace: str = "default", context: str = "standin"
    ) -> Path:
        """Write a kubeconfig that points at this server with `token` as the bearer; returns the path. `context`
        names its cluster, user and context (so that kubeconfigs of several stand-ins can be merged)."""
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": context,
                    "cluster": {
                        "server": self.url,
                        "certificate-authority-data": base64.b64encode(self._ca_pem).decode("ascii"),
                    },
                }
            ],
            "users": [{"name": context, "user": {"token": token}}],
            "contexts": [
                {"name": context, "context": {"cluster": context, "user": context, "namespace": namespace}}
            ],
            "current-context": context,
        }
        out = Path(path)
        out.write_text(yaml.safe_dump(config))
        out.chmod(0o600)
        return out

    def _get_workload(self, kind: str) -> Handler:
        def get(req: KubeRequest) -> KubeResponse:
            ns, name = req.params["namespace"], req.params["name"]
            with self._workloads.lock:
                obj = self._workloads.objects.get((kind, ns, name))
            if obj is None:
                return _status(404, "NotFound", f'{kind.lower()}s.apps "{name}" not found')
            return 200, copy.deepcopy(obj)

        return get

    def _get_configmap(self, req: KubeRequest) -> KubeResponse:
        ns, name = req.params["namespace"], req.params["name"]
        with self._lock:
            obj = self._configmaps.get((ns, name))
        if obj is None:
            return _status(404, "NotFound", f'configmaps "{name}" not found')
        return 200, copy.deepcopy(obj)

    def _list_pods(self, req: KubeRequest) -> KubeResponse:
        from urllib.parse import parse_qs

        ns = req.params["namespace"]
        selector = (parse_qs(req.query).get("labelSelector") or [""])[0]
        with self._lock:
            items = [copy.deepcopy(p) for (n, _), p in sorted(self._pods.items())
                     if n == ns and _selected(p["metadata"]["labels"], selector)]
        return 200, {"kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": "1"}, "items": items}

    def _pod_proxy(self, req: KubeRequest) -> KubeResponse:
        """GET through the pod proxy: to the pod's registered target for that port (503 when there is none, as
        the API server answers for a pod that does not listen)."""
        import urllib.error
        import urllib.request
        from urllib.parse import unquote

        ns = req.params["namespace"]
        name, _, port = unquote(req.params["name"]).partition(":")
        with self._lock:
            pod = self._pods.get((ns, name))
            target = self._proxies.get((ns, name), {}).get(int(port) if port.isdigit() else 80)
        if pod is None:
            return _status(404, "NotFound", f'pods "{name}" not found')
        if target is None:
            return _status(503, "ServiceUnavailable", f"error trying to reach service: dial tcp: port {port}")
        if callable(target):
            return target(req)
        url = target.rstrip("/") + "/" + req.params["path"]
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                return resp.status, resp.read(1 << 22)
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read(1 << 22)
        except OSError as exc:
            return _status(503, "ServiceUnavailable", f"error trying to reach service: {exc}")

    def _install_defaults(self) -> None:
        self._secrets.install(self)
        self.add_handler("GET", "/api/v1/namespaces/{namespace}/configmaps/{name}", self._get_configmap)
        self.add_handler("GET", "/api/v1/namespaces/{namespace}/pods", self._list_pods)
        self.add_handler("GET", "/api/v1/namespaces/{namespace}/pods/{name}/proxy/{path}", self._pod_proxy)
        self.add_handler("POST", TOKENREVIEW_PATH, self._tokenreview)
        self.add_handler("POST", "/api/v1/namespaces/{namespace}/events", _create_event)
        for plural, kind in (
            ("deployments", "Deployment"),
            ("daemonsets", "DaemonSet"),
            ("statefulsets", "StatefulSet"),
        ):
            self.add_handler(
                "PATCH",
                f"/apis/apps/v1/namespaces/{{namespace}}/{plural}/{{name}}",
                self._workloads.patcher(kind),
            )
            self.add_handler("GET", f"/apis/apps/v1/namespaces/{{namespace}}/{plural}/{{name}}",
                             self._get_workload(kind))

    def _tokenreview(self, req: KubeRequest) -> KubeResponse:
        spec = req.body.get("spec", {}) if isinstance(req.body, dict) else {}
        token = spec.get("token")
        if not isinstance(token, str) or not token:
            return _status(
                400, "BadRequest", "TokenReview.authentication.k8s.io is invalid: spec.token: Required value"
            )
        return 201, {
            "kind": "TokenReview",
            "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"creationTimestamp": None},
            "spec": {"token": token, **({"audiences": spec["audiences"]} if spec.get("audiences") else {})},
            "status": self.review(token, spec.get("audiences") or None),
        }

    def _dispatch(self, method: str, raw_path: str, headers: dict[str, str], raw_body: bytes) -> KubeResponse:
        path, _, query = raw_path.partition("?")
        try:
            body: Any = json.loads(raw_body) if raw_body else None
        except ValueError:
            body = raw_body.decode("utf-8", "replace")
        user = None
        auth = headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            claims = self._verify(auth[7:])
            if claims is not None:
                user = claims["sub"]
        with self._lock:
            handlers = list(self._handlers)
        handler: Handler | None = None
        params: dict[str, str] = {}
        for h_method, regex, h in handlers:
            match = regex.match(path)
            if h_method == method and match:
                handler, params = h, match.groupdict()
                break
        req = KubeRequest(method, path, query, headers, body, params, user)
        with self._lock:
            self.requests.append(req)
        if self.require_auth and user is None:
            return _status(401, "Unauthorized", "Unauthorized")
        if handler is None:
            return _status(404, "NotFound", f"the server could not find the requested resource ({method} {path})")
        try:
            return handler(req)
        except Exception as exc:  # a broken test handler must show up as a 500, not a hung client
            return _status(500, "InternalError", f"stand-in handler failed: {exc!r}")

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        api = self

        class _Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                headers = {k.lower(): v for k, v in self.headers.items()}
                answer = api._dispatch(self.command, self.path, headers, raw)
                status, body, extra = (*answer, {}) if len(answer) == 2 else answer
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in extra.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

            def log_message(self, format: str, *args: Any) -> None:
                # silence the per-request stderr lines; `requests` is the record
                return

        return _Handler


def _create_event(req: KubeRequest) -> KubeResponse:
    body = dict(req.body) if isinstance(req.body, dict) else {}
    meta = dict(body.get("metadata") or {})
    meta.setdefault("name", f"event.{secrets.token_hex(8)}")
    meta.update(
        namespace=req.params["namespace"],
        uid=str(uuid.uuid4()),
        resourceVersion=str(int(time.time() * 1000)),
        creationTimestamp=_k8s_time(),
    )
    body.update(kind="Event", apiVersion="v1", metadata=meta)
    return 201, body


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch (null deletes a key); used for both merge and strategic-merge patches."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _workload(kind: str, namespace: str, name: str) -> dict[str, Any]:
    """A minimal but complete apps/v1 object, so typed clients can deserialize the PATCH answer."""
    labels = {"app": name}
    spec: dict[str, Any] = {
        "selector": {"matchLabels": labels},
        "template": {
            "metadata": {"labels": labels},
            "spec": {"containers": [{"name": name, "image": f"example.invalid/{name}:latest"}]},
        },
    }
    status: dict[str, Any] = {"observedGeneration": 1}
    if kind == "DaemonSet":
        status.update(currentNumberScheduled=1, desiredNumberScheduled=1, numberMisscheduled=0, numberReady=1)
    else:
        spec["replicas"] = 1
        status.update(replicas=1, readyReplicas=1, availableReplicas=1, updatedReplicas=1)
    if kind == "StatefulSet":
        spec["serviceName"] = name
    return {
        "apiVersion": "apps/v1",
        "kind": kind,
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": str(uuid.uuid4()),
            "resourceVersion": "1",
            "generation": 1,
            "creationTimestamp": _k8s_time(),
            "labels": labels,
        },
        "spec": spec,
        "status": status,
    }


class _Workloads:
    """Deployments/DaemonSets/StatefulSets that exist as soon as they are patched, keeping their state."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}

    def patcher(self, kind: str) -> Handler:
        def patch(req: KubeRequest) -> KubeResponse:
            if not isinstance(req.body, dict):
                return _status(400, "BadRequest", "the patch body must be a JSON object")
            ns, name = req.params["namespace"], req.params["name"]
            with self.lock:
                obj = self.objects.get((kind, ns, name)) or _workload(kind, ns, name)
                patched = merge_patch(obj, req.body)
                # identity fields are the server's, whatever the patch says
                patched["metadata"].update(
                    name=name,
                    namespace=ns,
                    uid=obj["metadata"]["uid"],
                    resourceVersion=str(int(obj["metadata"]["resourceVersion"]) + 1),
                )
                if patched.get("spec") != obj.get("spec"):
                    patched["metadata"]["generation"] = obj["metadata"]["generation"] + 1
                patched.update(kind=kind, apiVersion="apps/v1")
                self.objects[(kind, ns, name)] = patched
                return 200, copy.deepcopy(patched)

        return patch


# ---------------------------------------------------------------------------------------------- Secrets

_APPLY = "application/apply-patch+yaml"
# fields the server sets or that identify the object: never owned by a field manager
_SERVER_FIELDS = {("apiVersion",), ("kind",), ("metadata", "name"), ("metadata", "namespace"),
                  ("metadata", "uid"), ("metadata", "resourceVersion"), ("metadata", "creationTimestamp"),
                  ("metadata", "managedFields")}


def _leaves(obj: Any, prefix: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    """The field paths of `obj`'s leaves (a list is one leaf), without the server's own fields."""
    if isinstance(obj, dict) and obj:
        out: set[tuple[str, ...]] = set()
        for key, value in obj.items():
            out |= _leaves(value, (*prefix, str(key)))
        return out - _SERVER_FIELDS
    return {prefix} - _SERVER_FIELDS


def _get(obj: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(obj, dict) or key not in obj:
            return None
        obj = obj[key]
    return obj


def _set(obj: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        obj = obj.setdefault(key, {})
    obj[path[-1]] = copy.deepcopy(value)


def _unset(obj: dict[str, Any], path: tuple[str, ...]) -> None:
    parents = []
    for key in path[:-1]:
        if not isinstance(obj.get(key), dict):
            return
        parents.append((obj, key))
        obj = obj[key]
    obj.pop(path[-1], None)
    for parent, key in reversed(parents):  # drop maps left empty
        if parent[key] == {}:
            del parent[key]


def _selected(labels: dict[str, str], selector: str) -> bool:
    """Equality (`k=v`, `k==v`), inequality (`k!=v`) and existence (`k`, `!k`) terms, comma-separated."""
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            key, _, value = term.partition("!=")
            if labels.get(key) == value:
                return False
        elif "=" in term:
            key, _, value = term.replace("==", "=").partition("=")
            if labels.get(key) != value:
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


class _Secrets:
    """core/v1 Secrets: GET, LIST (labelSelector), POST, PATCH (server-side apply and merge patch), DELETE.

    Server-side apply keeps, per Secret, the fields each field manager owns: an apply sets its fields, drops the
    ones the same manager applied before and no longer sends, and fails with 409 when another manager owns a field
    with a different value, unless `force=true` (then the field changes hands).
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.owners: dict[tuple[str, str], dict[str, set[tuple[str, ...]]]] = {}

    def install(self, api: KubeAPI) -> None:
        base = "/api/v1/namespaces/{namespace}/secrets"
        api.add_handler("GET", base, self.list)
        api.add_handler("POST", base, self.create)
        api.add_handler("GET", base + "/{name}", self.get)
        api.add_handler("PATCH", base + "/{name}", self.patch)
        api.add_handler("DELETE", base + "/{name}", self.delete)

    def store(self, ns: str, name: str, obj: dict[str, Any], owners: dict[str, set[tuple[str, ...]]]) -> dict[str, Any]:
        """Keep `obj` as NS/NAME (identity fields filled in, resourceVersion bumped); the caller holds the lock."""
        old = self.objects.get((ns, name))
        meta = obj.setdefault("metadata", {})
        meta.update(name=name, namespace=ns)
        if old is None:
            meta.update(uid=str(uuid.uuid4()), creationTimestamp=_k8s_time(), resourceVersion="1")
        else:
            meta.update(uid=old["metadata"]["uid"], creationTimestamp=old["metadata"]["creationTimestamp"],
                        resourceVersion=str(int(old["metadata"]["resourceVersion"]) + 1))
        obj.update(apiVersion="v1", kind="Secret")
        obj.setdefault("type", "Opaque")
        meta["managedFields"] = [
            {"manager": m, "operation": "Apply" if m != "kubectl-create" else "Update", "fieldsType": "FieldsV1"}
            for m in sorted(owners) if owners[m]
        ]
        self.objects[(ns, name)] = obj
        self.owners[(ns, name)] = {m: set(f) for m, f in owners.items() if f}
        return copy.deepcopy(obj)

    def get(self, req: KubeRequest) -> KubeResponse:
        ns, name = req.params["namespace"], req.params["name"]
        with self.lock:
            obj = self.objects.get((ns, name))
            if obj is None:
                return _status(404, "NotFound", f'secrets "{name}" not found')
            return 200, copy.deepcopy(obj)

    def list(self, req: KubeRequest) -> KubeResponse:
        ns = req.params["namespace"]
        from urllib.parse import parse_qs

        selector = (parse_qs(req.query).get("labelSelector") or [""])[0]
        with self.lock:
            items = [copy.deepcopy(o) for (n, _), o in sorted(self.objects.items())
                     if n == ns and _selected(o["metadata"].get("labels") or {}, selector)]
        return 200, {"kind": "SecretList", "apiVersion": "v1", "metadata": {"resourceVersion": "1"}, "items": items}

    def create(self, req: KubeRequest) -> KubeResponse:
        from urllib.parse import parse_qs

        if not isinstance(req.body, dict) or not (req.body.get("metadata") or {}).get("name"):
            return _status(400, "BadRequest", "Secret in version v1 cannot be handled: metadata.name is required")
        ns, name = req.params["namespace"], req.body["metadata"]["name"]
        manager = (parse_qs(req.query).get("fieldManager") or ["kubectl-create"])[0]
        with self.lock:
            if (ns, name) in self.objects:
                return _status(409, "AlreadyExists", f'secrets "{name}" already exists')
            return 201, self.store(ns, name, copy.deepcopy(req.body), {manager: _leaves(req.body)})

    def patch(self, req: KubeRequest) -> KubeResponse:
        from urllib.parse import parse_qs

        query = parse_qs(req.query)
        manager = (query.get("fieldManager") or [""])[0]
        force = (query.get("force") or ["false"])[0] == "true"
        body = req.body
        if isinstance(body, str):  # YAML text
            body = yaml.safe_load(body)
        if not isinstance(body, dict):
            return _status(400, "BadRequest", "the patch body must be an object")
        ns, name = req.params["namespace"], req.params["name"]
        content_type = req.headers.get("content-type", "").split(";")[0].strip()
        with self.lock:
            old = self.objects.get((ns, name))
            owners = copy.deepcopy(self.owners.get((ns, name), {}))
            if content_type != _APPLY:
                if old is None:
                    return _status(404, "NotFound", f'secrets "{name}" not found')
                patched = merge_patch(old, body)
                manager = manager or "kubectl-patch"
                owners.setdefault(manager, set()).update(_leaves(body))
                return 200, self.store(ns, name, patched, owners)
            if not manager:
                return _status(422, "Invalid", "PATCH, application/apply-patch+yaml: fieldManager is required")
            if (body.get("metadata") or {}).get("name", name) != name:
                return _status(400, "BadRequest", "the name of the object does not match the name on the URL")
            current = copy.deepcopy(old) if old is not None else {"metadata": {}}
            fields = _leaves(body)
            conflicts = sorted(
                (m, f) for m, owned in owners.items() if m != manager for f in owned & fields
                if _get(current, f) != _get(body, f)
            )
            if conflicts and not force:
                text = "; ".join(f'conflict with "{m}": .{".".join(f)}' for m, f in conflicts)
                return 409, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                             "message": f"Apply failed with {len(conflicts)} conflict(s): {text}",
                             "reason": "Conflict", "code": 409}
            for m in owners:
                if m != manager:
                    owners[m] -= fields if force else {f for f in fields if _get(current, f) != _get(body, f)}
            for f in owners.get(manager, set()) - fields:  # applied before, not any more: removed unless shared
                if not any(f in owned for m, owned in owners.items() if m != manager):
                    _unset(current, f)
            for f in fields:
                _set(current, f, _get(body, f))
            owners[manager] = fields
            if old is not None and current == old and owners == self.owners.get((ns, name)):
                return 200, copy.deepcopy(old)  # a no-op apply changes nothing, resourceVersion included
            return (201 if old is None else 200), self.store(ns, name, current, owners)

    def delete(self, req: KubeRequest) -> KubeResponse:
        ns, name = req.params["namespace"], req.params["name"]
        uid = ((req.body or {}).get("preconditions") or {}).get("uid") if isinstance(req.body, dict) else None
        with self.lock:
            obj = self.objects.get((ns, name))
            if obj is None:
                return _status(404, "NotFound", f'secrets "{name}" not found')
            if uid and uid != obj["metadata"]["uid"]:
                return _status(409, "Conflict", f"Precondition failed: UID in precondition: {uid}")
            del self.objects[(ns, name)]
            self.owners.pop((ns, name), None)
        return 200, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"}

