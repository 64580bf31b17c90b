"""The agent's Vault session (aiohttp): address, TLS, namespace, token, deadlines, redirects, typed answers, and the
one place where transport and HTTP failures become AgentErrors.

Every request is bounded: one wall-clock deadline (vault.timeout) covers connect, headers and body; the body is
never read past limits.max_secret_size; cancelling the awaiting task aborts the request. There is no lock: bundles'
calls run side by side, each taking the current token when it is sent. Nothing is ever sent off the configured
origin: a redirect to another scheme, host or port is not followed (a standby without request forwarding), and
same-origin redirects are followed at most 3 times. Retryable failures (unreachable, sealed, 5xx, 429, timeouts,
odd answers, redirects away) are VaultUnavailable; final ones VaultError or ConfigError.
"""

from __future__ import annotations

import asyncio
import contextlib
import json as jsonlib
import os
import socket
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from agent import aio
from agent.errors import (
    AgentError,
    AuthError,
    ConfigError,
    PermissionDenied,
    ResponseTooLarge,
    SecretError,
    VaultError,
    VaultUnavailable,
)
from agent.log import get_logger
from agent.text import shown

if TYPE_CHECKING:
    import ssl

    import aiohttp

    from agent.config import VaultConfig
    from agent.metrics import Metrics

__all__ = ["MAX_REDIRECTS", "Vault", "answer", "field", "health_state", "resolver", "ssl_default"]

#: same-origin redirects followed for one request
MAX_REDIRECTS = 3
#: the largest vault.ca_cert file read
_CA_LIMIT = 1 << 20
_CHUNK = 65536
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
#: what the TLS library says when the other side answered a handshake with something that is not TLS
_NOT_TLS = ("wrong version number", "wrong_version_number", "record layer failure", "packet length too long",
            "http request", "unknown protocol", "record_layer_failure")


def answer(response: object, *, address: str, action: str) -> dict[str, Any]:
    """`response` as the JSON object Vault sends, else VaultUnavailable saying what came instead.

    hvac hands back a requests Response when a 200 is not JSON (an HTML page from a proxy), and a list,
    number or None when the JSON is not an object.
    """
    if isinstance(response, dict):
        return response
    what = type(response).__name__
    if hasattr(response, "status_code"):
        ctype = str(getattr(response, "headers", {}).get("Content-Type") or "no content type")
        what = f"HTTP {response.status_code} with {shown(ctype.split(';', maxsplit=1)[0], 60)}"
    elif response is None:
        what = "null"
    raise VaultUnavailable(
        f"Vault at {shown(address)} answered with something that is not a Vault response while {action} ({what})"
    )


def field(
    data: Mapping[str, Any],
    key: str,
    kind: type | tuple[type, ...],
    *,
    address: str,
    action: str,
    optional: bool = False,
) -> Any:
    """`data[key]` checked to be a `kind` (None when `optional` and absent or null), else VaultUnavailable.

    A bool never counts as a number.
    """
    value = data.get(key)
    if value is None and optional:
        return None
    if (isinstance(value, kind) and not isinstance(value, bool)) or (kind is bool and isinstance(value, bool)):
        return value
    shape = "missing" if key not in data else f"a {type(value).__name__}"
    names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
    raise VaultUnavailable(
        f"Vault at {shown(address)} answered with something that is not a Vault response while {action}"
        f" ({key!r} is {shape}, not {names})"
    )


def health_state(body: object) -> str:
    """What a sys/health answer (asked with standbyok, sealedcode and uninitcode 200) says of the node: one of
    metrics.NODE_STATES."""
    if not isinstance(body, dict):
        return "unreachable"
    if body.get("initialized") is False:
        return "uninitialized"
    if body.get("sealed") is True:
        return "sealed"
    if body.get("standby") is True or body.get("performance_standby") is True:
        return "standby"
    return "active"


#: DNS lookups running at once at most (each holds a thread until the resolver answers or gives up)
_MAX_LOOKUPS = 8
_lookups = 0
_lookups_lock = threading.Lock()


def resolver() -> aiohttp.abc.AbstractResolver:
    """aiohttp's resolver, its lookups in threads of their own that the exit does not wait for.

    A getaddrinfo cannot be cancelled. In asyncio's default executor, one the agent gave up on (init.timeout,
    SIGTERM) held up the exit until the resolver itself gave up (its timeouts times its search domains: tens of
    seconds), since asyncio.run joins that executor's threads.
    """
    resolver: aiohttp.abc.AbstractResolver = aio.load().ThreadedResolver(loop=_Lookups())
    return resolver


class _Lookups:
    """The two calls aiohttp's ThreadedResolver makes of its loop, each run in a daemon thread."""

    async def getaddrinfo(self, *args: Any, **kwargs: Any) -> Any:
        return await _abandonable(socket.getaddrinfo, *args, **kwargs)

    async def getnameinfo(self, *args: Any) -> Any:
        return await _abandonable(socket.getnameinfo, *args)


async def _abandonable(call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    global _lookups
    with _lookups_lock:
        if _lookups >= _MAX_LOOKUPS:
            raise socket.gaierror(socket.EAI_AGAIN, "too many DNS lookups unanswered")
        _lookups += 1
    loop = asyncio.get_running_loop()
    done: asyncio.Future[Any] = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if done.done():  # given up on
            return
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(result)

    def work() -> None:
        global _lookups
        result: Any = None
        error: BaseException | None = None
        try:
            result = call(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - handed to the awaiting task
            error = exc
        finally:
            with _lookups_lock:
                _lookups -= 1
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            loop.call_soon_threadsafe(settle, result, error)

    try:
        threading.Thread(target=work, name="dns-lookup", daemon=True).start()
    except RuntimeError:  # no thread to be had
        with _lookups_lock:
            _lookups -= 1
        raise socket.gaierror(socket.EAI_AGAIN, "no thread for a DNS lookup") from None
    return await done


def _origin(url: urllib.parse.SplitResult) -> tuple[str, str, int]:
    scheme = url.scheme.lower()
    return scheme, (url.hostname or "").lower(), url.port or (443 if scheme == "https" else 80)


def _messages(body: bytes) -> str:
    """Vault's `errors` list from an error answer, joined and escaped ('' when there is none)."""
    try:
        data = jsonlib.loads(body)
    except (ValueError, RecursionError):
        return ""
    errors = data.get("errors") if isinstance(data, dict) else None
    if isinstance(errors, list) and errors:
        return shown("; ".join(str(e) for e in errors))
    return ""


class _Pool:
    """One aiohttp session and the requests using it; a retired pool closes once the last of them ends."""

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self.session = session
        self.inflight = 0
        self.retired = False


class _Answer:
    """What one exchange brought back: status, headers that matter, the body (bounded)."""

    def __init__(self, status: int, content_type: str, location: str | None, body: bytes) -> None:
        self.status = status
        self.content_type = content_type
        self.location = location
        self.body = body


class Vault:
    """The agent's access to Vault: `request` sends one bounded request and returns Vault's JSON answer.

    `token` (set by the token keeper) gives the token to send at the moment each request goes out. After a
    VaultUnavailable the pooled connections are dropped (a new session; the old one closes when its requests end),
    so behind a balancer the next request may reach another node. `close()` ends it.
    """

    #: at most one sys/health probe per this many seconds
    PROBE_EVERY = 10.0

    def __init__(
        self,
        cfg: VaultConfig,
        *,
        metrics: Metrics | None = None,
        max_response_bytes: int = 1 << 20,
        env: Mapping[str, str] | None = None,
    ) -> None:
        from agent.config import env_sources

        self.cfg = cfg
        self.address = cfg.address.rstrip("/")
        self.timeout = float(cfg.timeout)
        self.max_response_bytes = max_response_bytes
        self.metrics = metrics
        #: the token each authenticated request carries, asked for when it is sent ("" for none)
        self.token: Callable[[], str] = lambda: ""
        #: the last node state reported by sys/health (None: never asked) and when (time.time())
        self.node_state: str | None = None
        self.node_state_at: float | None = None
        self._probed = 0.0
        self._url = urllib.parse.urlsplit(self.address)
        self._origin = _origin(self._url)
        self._from_env = env_sources(env)
        self._proxy = self._proxy_for(env)
        #: SNI and the name the certificate must carry, when vault.tls_server_name is set (https only)
        self._server_name = cfg.tls_server_name if cfg.tls_server_name and self._url.scheme == "https" else None
        self._pool: _Pool | None = None
        self._closing: set[asyncio.Task[None]] = set()
        self._ca_stamp: tuple[int, int, int] | None = None
        self._ssl: ssl.SSLContext | bool | None = None
        self._log = get_logger()

    # -- naming -----------------------------------------------------------------------------------------------
    def key(self, name: str) -> str:
        """`vault.<name>`, with the environment variable that set it: `vault.address (from VAULT_ADDR)`."""
        full = f"vault.{name}"
        var = self._from_env.get(full)
        return f"{full} (from {var})" if var else full

    @property
    def _where(self) -> str:
        where = f"Vault at {shown(self.address)}"
        var = self._from_env.get("vault.address")
        return f"{where} ({var})" if var else where

    # -- the public surface -----------------------------------------------------------------------------------
    async def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, str] | None = None,
        auth: bool = True,
        token: str | None = None,
        action: str,
        hint: str = "",
        login: bool = False,
        missing_ok: bool = False,
    ) -> dict[str, Any] | None:
        """Send one request to `path` (`/v1/...`, or relative to /v1/) and return Vault's JSON object.

        `auth` sends the current token (or `token`); `login` marks the auth call, where 400/401/403 mean the role
        or service account is wrong; with `missing_ok` a 404 returns None. A 204 returns {}.

        Raises:
            ConfigError: vault.ca_cert cannot be read.
            AuthError: a login was refused.
            PermissionDenied: 401/403 on any other call.
            SecretError: 404 (unless `missing_ok`); ResponseTooLarge: over limits.max_secret_size.
            VaultError: Vault refused the request (4xx): final.
            VaultUnavailable: unreachable, sealed, 5xx, 429, too slow, redirected away, or not a Vault answer.
        """
        got = await self._send(method, path, json=json, params=params, auth=auth, token=token, action=action)
        if got.status == 404 and missing_ok:
            return None
        self._check_status(got, action=action, hint=hint, login=login)
        if got.status == 204 or not got.body:
            return {}
        return answer(self._decode(got, action), address=self.address, action=action)

    async def read_raw(self, path: str, *, action: str, hint: str = "") -> bytes:
        """GET `path` (a token-bearing read) and return the body as it came (a PEM or DER CRL), bounded the same."""
        got = await self._send("GET", path, json=None, params=None, auth=True, token=None, action=action)
        self._check_status(got, action=action, hint=hint, login=False)
        return got.body

    async def node_status(self) -> str:
        """What the node answering now says of itself (sys/health, sent without a token): metrics.NODE_STATES."""
        params = {"standbyok": "true", "perfstandbyok": "true", "sealedcode": "200", "uninitcode": "200"}
        try:
            got = await self._send("GET", "/v1/sys/health", json=None, params=params, auth=False, token=None,
                                   action="asking Vault for its health")
        except AgentError:
            return "unreachable"
        if got.status != 200:
            return "unreachable"
        try:
            return health_state(jsonlib.loads(got.body))
        except (ValueError, RecursionError):
            return "unreachable"

    async def probe_node(self) -> str | None:
        """After a failure: ask sys/health what the answering node is (rate limited); returns the state."""
        now = time.monotonic()
        if now - self._probed < self.PROBE_EVERY:
            return self.node_state
        self._probed = now
        self.node_state = await self.node_status()
        self.node_state_at = time.time()
        return self.node_state

    async def leave_node(self) -> None:
        """Drop the pooled connections, so the next request may reach another node (requests in flight finish)."""
        self._retire()

    async def close(self) -> None:
        """Close every session (requests still in flight are aborted)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.session.close()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    # -- one exchange -------------------------------------------------------------------------------------------
    async def _send(
        self, method: str, path: str, *, json: Any, params: Mapping[str, str] | None, auth: bool, token: str | None,
        action: str,
    ) -> _Answer:
        """The answer to one request, after same-origin redirects; VaultUnavailable drops the pooled connections."""
        try:
            return await self._follow(method, path, json=json, params=params, auth=auth, token=token, action=action)
        except VaultUnavailable:
            self._retire()
            raise

    async def _follow(
        self, method: str, path: str, *, json: Any, params: Mapping[str, str] | None, auth: bool, token: str | None,
        action: str,
    ) -> _Answer:
        path = path if path.startswith("/") else f"/v1/{path}"
        url = self.address + path
        if params:
            url += "?" + urllib.parse.urlencode(params)
        headers = {"X-Vault-Request": "true", "Accept-Encoding": "identity"}
        if self.cfg.namespace:
            headers["X-Vault-Namespace"] = self.cfg.namespace
        if auth:
            sent = token if token is not None else self.token()
            if sent:
                headers["X-Vault-Token"] = sent
        for hop in range(MAX_REDIRECTS + 1):
            got = await self._exchange(method, url, json=json, headers=headers, action=action)
            if got.status not in _REDIRECTS:
                return got
            target = self._redirect_target(url, got.location, action)
            if hop == MAX_REDIRECTS:
                break
            url = target
            if got.status in {301, 302, 303} and method not in {"GET", "HEAD"}:
                method, json = "GET", None
        raise VaultUnavailable(
            f"{self._where} redirected more than {MAX_REDIRECTS} times while {action}: point vault.address at the"
            " active node or a forwarding balancer"
        )

    def _redirect_target(self, url: str, location: str | None, action: str) -> str:
        """The URL a same-origin redirect leads to; VaultUnavailable for anything else (never followed)."""
        if not location:
            raise VaultUnavailable(f"{self._where} answered a redirect without a Location while {action}")
        target = urllib.parse.urljoin(url, location)
        try:
            parsed = urllib.parse.urlsplit(target)
            # credentials in the Location would be sent as a Basic header: not Vault's own address either
            same = _origin(parsed) == self._origin and parsed.username is None
        except ValueError:
            same = False
        if not same:
            raise VaultUnavailable(
                f"{self._where} redirected {action} to {shown(target, 120)}, another address, which the agent does"
                " not follow (its token goes nowhere else): a standby without request forwarding; point"
                " vault.address at the active node or a forwarding balancer"
            )
        return target

    async def _exchange(self, method: str, url: str, *, json: Any, headers: dict[str, str], action: str) -> _Answer:
        """One HTTP exchange under one deadline, the body read at most to the byte cap."""
        aiohttp = aio.load()

        pool = await self._acquire()
        headers_at: float | None = None
        sent_at = time.monotonic()
        try:
            async with asyncio.timeout(self.timeout):
                async with pool.session.request(
                    method, url, json=json, headers=headers, allow_redirects=False, proxy=self._proxy,
                    server_hostname=self._server_name,
                ) as resp:
                    headers_at = time.monotonic()
                    if self.metrics is not None:
                        self.metrics.vault_request(headers_at - sent_at)
                    location = resp.headers.get("Location")
                    ctype = resp.headers.get("Content-Type") or ""
                    encoding = resp.headers.get("Content-Encoding", "identity").strip().lower()
                    if resp.status in _REDIRECTS:
                        return _Answer(resp.status, ctype, location, b"")
                    body = await self._body(resp)
                    if encoding not in {"", "identity"} and body:
                        raise VaultUnavailable(
                            f"{self._where} answered with something that is not a Vault response while {action}"
                            f" (a {shown(encoding, 40)}-encoded body)"
                        )
                    return _Answer(resp.status, ctype, location, body)
        except AgentError:
            raise
        except TimeoutError:
            if headers_at is not None:
                raise VaultUnavailable(
                    f"{self._where} sent its answer too slowly (over {self.timeout:g}s, vault.timeout) while"
                    f" {action}"
                ) from None
            raise VaultUnavailable(
                f"{self._where} did not answer in time ({self.timeout:g}s, vault.timeout) while {action}"
            ) from None
        except aiohttp.ClientError as exc:
            raise await self._transport_error(exc, action) from None
        except OSError as exc:  # a socket error aiohttp did not wrap
            raise VaultUnavailable(
                f"cannot reach {self._where} while {action}: {shown(exc.strerror or type(exc).__name__, 80)}"
            ) from None
        finally:
            self._release(pool)

    async def _body(self, resp: aiohttp.ClientResponse) -> bytes:
        """The response body, refused past the byte cap (by Content-Length before reading, else while streaming)."""
        limit = self.max_response_bytes
        length = resp.content_length
        if length is not None and length > limit:
            raise ResponseTooLarge(
                f"{self._where} sent an answer of {length} bytes, over limits.max_secret_size ({limit} bytes);"
                " store less under that path or raise the limit"
            )
        chunks: list[bytes] = []
        size = 0
        while True:
            chunk = await resp.content.read(_CHUNK)
            if not chunk:
                break
            size += len(chunk)
            if size > limit:
                raise ResponseTooLarge(
                    f"{self._where} sent an answer over limits.max_secret_size ({limit} bytes);"
                    " store less under that path or raise the limit"
                )
            chunks.append(chunk)
        return b"".join(chunks)

    # -- status and shape ---------------------------------------------------------------------------------------
    def _check_status(self, got: _Answer, *, action: str, hint: str, login: bool) -> None:
        status = got.status
        if 200 <= status < 300:
            return
        suffix = f"; {hint}" if hint else ""
        message = _messages(got.body) or f"HTTP {status}"
        if status == 503:
            raise VaultUnavailable(f"{self._where} is sealed or in standby while {action}")
        if status == 501:
            raise VaultUnavailable(f"{self._where} is not initialized while {action}")
        if status == 429 or status >= 500 or status < 200 or (300 <= status < 400):
            raise VaultUnavailable(f"{self._where} failed while {action}: {message}")
        if login and status in {400, 401, 403}:
            raise AuthError(f"login refused while {action}: {message}{suffix}")
        if status in {401, 403}:
            raise PermissionDenied(f"permission denied while {action}{suffix}")
        if status == 404:
            raise SecretError(f"nothing found while {action}{suffix}")
        raise VaultError(f"Vault refused {action}: {message}{suffix}")

    def _decode(self, got: _Answer, action: str) -> object:
        try:
            return jsonlib.loads(got.body)
        except (ValueError, RecursionError):  # not JSON, or nested deeper than the parser goes
            ctype = shown(got.content_type.split(";", maxsplit=1)[0] or "no content type", 60)
            raise VaultUnavailable(
                f"{self._where} answered with something that is not a Vault response while {action}"
                f" (HTTP {got.status} with {ctype})"
            ) from None

    # -- sessions and TLS ---------------------------------------------------------------------------------------
    async def _acquire(self) -> _Pool:
        await self._check_ca()
        if self._pool is None:
            aiohttp = aio.load()
            if self._ssl is None and self._url.scheme == "https":
                # the system's trust store, for this session: aiohttp's own default context is left empty (agent.aio)
                self._ssl = await asyncio.to_thread(ssl_default)
            connector = aiohttp.TCPConnector(ssl=self._ssl if self._ssl is not None else False, limit=64,
                                             resolver=resolver())
            session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=self.timeout, sock_connect=self.timeout),
                trust_env=False,  # no ~/.netrc: proxies are computed here from the environment
                auto_decompress=False,
                cookie_jar=aiohttp.DummyCookieJar(),
            )
            self._pool = _Pool(session)
        pool = self._pool
        pool.inflight += 1
        return pool

    def _release(self, pool: _Pool) -> None:
        pool.inflight -= 1
        if pool.retired and pool.inflight == 0:
            self._close_later(pool)

    def _retire(self) -> None:
        """Start a new session at the next request; the current one closes once its requests have ended."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        pool.retired = True
        if pool.inflight == 0:
            self._close_later(pool)

    def _close_later(self, pool: _Pool) -> None:
        task = asyncio.get_running_loop().create_task(pool.session.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _check_ca(self) -> None:
        """Load vault.ca_cert into a TLS context, again whenever the file changes on disk (a rotated Vault CA)."""
        if self._url.scheme != "https":
            return
        if self.cfg.skip_verify:
            self._ssl = False
            return
        path = self.cfg.ca_cert
        if not path:
            return  # the system's trust store
        try:
            info = os.stat(path)
            stamp: tuple[int, int, int] | None = (info.st_mtime_ns, info.st_size, info.st_ino)
        except OSError:
            stamp = None
        if stamp is not None and stamp == self._ca_stamp:
            return
        try:
            context = await asyncio.to_thread(self._load_ca, path)
        except ConfigError as exc:
            if self._ssl is None:
                raise
            # the CA that worked so far stays in use while the file is being replaced or is broken
            self._log.warning("vault_ca_unreadable", reason=str(exc))
            return
        if self._ssl is not None:
            self._log.info("vault_ca_reloaded", ca_cert=path)
        self._ssl, self._ca_stamp = context, stamp
        self._retire()

    def _load_ca(self, path: str) -> ssl.SSLContext:
        """An SSL context trusting the PEM certificates in `path`; ConfigError naming the key when it cannot."""
        import ssl

        from agent.files import FileProblem, read_regular

        what = self.key("ca_cert")
        try:
            pem = read_regular(path, limit=_CA_LIMIT, what=what)
        except FileProblem as exc:
            raise ConfigError(f"{exc}: set it to the PEM file of the CA that signed Vault's certificate") from None
        if not pem.strip():
            # never cadata="": ssl would load the system's trust store instead (a file caught while it is rewritten)
            raise ConfigError(
                f"{what} {shown(path)} is empty: set it to the PEM file of the CA that signed Vault's certificate"
            )
        try:
            context = ssl.create_default_context(cadata=pem.decode("ascii", "replace"))
        except (ssl.SSLError, ValueError):
            raise ConfigError(
                f"{what} {shown(path)} holds no PEM certificate: set it to the PEM file of the CA that signed"
                " Vault's certificate"
            ) from None
        return context

    def _proxy_for(self, env: Mapping[str, str] | None) -> str | None:
        """The proxy for vault.address from HTTPS_PROXY/HTTP_PROXY/NO_PROXY (as any HTTP client in a pod)."""
        if env is not None:
            lowered = {k.lower(): v for k, v in env.items() if k.lower().endswith("_proxy") and v}
            proxies = {k[:-6]: v for k, v in lowered.items() if k != "no_proxy"}
            no_proxy = lowered.get("no_proxy", "")
        else:
            proxies = urllib.request.getproxies_environment()
            no_proxy = proxies.pop("no", "")
        host = self._url.hostname or ""
        bypass = urllib.request.proxy_bypass_environment  # type: ignore[attr-defined]
        if no_proxy and bypass(host, {"no": no_proxy}):
            return None
        return proxies.get(self._url.scheme)

    # -- naming the cause of a transport failure ------------------------------------------------------------------
    async def _transport_error(self, exc: Exception, action: str) -> AgentError:
        aiohttp = aio.load()

        if isinstance(exc, aiohttp.ClientConnectorCertificateError):
            return await self._certificate_error(exc.certificate_error, action)
        if isinstance(exc, aiohttp.ClientSSLError | aiohttp.ClientConnectorSSLError):
            text = str(exc).lower()
            if any(marker in text for marker in _NOT_TLS):
                return VaultUnavailable(
                    f"TLS handshake failed while {action}: the server at {shown(self.address)} does not speak TLS;"
                    f" check the scheme of {self.key('address')} (http:// for a plain-HTTP listener)"
                )
            return VaultUnavailable(f"TLS handshake with {self._where} failed while {action}: {shown(str(exc), 120)}")
        if isinstance(exc, aiohttp.ClientConnectorError):
            return VaultUnavailable(
                f"cannot reach {self._where} while {action}: is it running and reachable? ({self.key('address')})"
            )
        if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientPayloadError):
            return VaultUnavailable(
                f"cannot reach {self._where} while {action}: it closed the connection; is it running and reachable?"
            )
        if isinstance(exc, aiohttp.ClientOSError):  # reset or broken on the way, as a Vault going down does
            cause = os.strerror(exc.errno) if isinstance(exc.errno, int) else "the connection failed"
            return VaultUnavailable(
                f"cannot reach {self._where} while {action}: {shown(cause, 80).lower()}; is it running and reachable?"
            )
        if isinstance(exc, aiohttp.ClientResponseError):
            return VaultUnavailable(
                f"{self._where} answered with something that is not a Vault response while {action}"
                f" ({shown(exc.message, 80)})"
            )
        return VaultUnavailable(f"request to {self._where} failed while {action}: {type(exc).__name__}")

    async def _certificate_error(self, error: Exception, action: str) -> AgentError:
        """The one sentence for a server certificate that did not verify, naming the cause."""
        code = getattr(error, "verify_code", None)
        name = self.cfg.tls_server_name or self._url.hostname or ""
        head = f"TLS verification failed while {action} at {shown(self.address)}"
        if code in {9, 10}:  # X509_V_ERR_CERT_NOT_YET_VALID, X509_V_ERR_CERT_HAS_EXPIRED
            dates = await self._peer_dates()
            state = "has expired" if code == 10 else "is not valid yet"
            return VaultError(
                f"{head}: Vault's server certificate {state}{dates}; renew Vault's certificate (or check this"
                " machine's clock)"
            )
        if code in {62, 64}:  # X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH
            names = await self._peer_names()
            return VaultError(
                f"{head}: Vault's server certificate is not for {shown(name)!r} (it names {names}); set"
                f" vault.tls_server_name to one of its names, or {self.key('address')} to a name it carries"
            )
        ca = self.key("ca_cert")
        return VaultError(
            f"{head}: {shown(getattr(error, 'verify_message', '') or str(error), 80)}; set {ca} to the CA that signed"
            " Vault's certificate, or vault.tls_server_name to the name in it"
        )

    async def _peer_certificate(self) -> Any:
        """Vault's server certificate, read over a second connection without verification and without sending
        anything (no token, no request); None when it cannot be had."""
        import ssl

        from cryptography import x509

        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        host = self._url.hostname or ""
        try:
            async with asyncio.timeout(min(self.timeout, 5.0)):
                _, writer = await asyncio.open_connection(
                    host, self._origin[2], ssl=context, server_hostname=self.cfg.tls_server_name or host
                )
            try:
                der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
            finally:
                writer.close()
            return x509.load_der_x509_certificate(der) if der else None
        except Exception:  # noqa: BLE001 - only a better message is lost
            return None

    async def _peer_dates(self) -> str:
        cert = await self._peer_certificate()
        if cert is None:
            return ""
        fmt = "%Y-%m-%dT%H:%M:%SZ"
        return (f" (valid from {cert.not_valid_before_utc.strftime(fmt)} to"
                f" {cert.not_valid_after_utc.strftime(fmt)})")

    async def _peer_names(self) -> str:
        from cryptography import x509
        from cryptography.x509.oid import NameOID

        cert = await self._peer_certificate()
        if cert is None:
            return "names that could not be read"
        names: list[str] = []
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            names += [str(n) for n in san.get_values_for_type(x509.DNSName)]
            names += [str(n) for n in san.get_values_for_type(x509.IPAddress)]
        except x509.ExtensionNotFound:
            names += [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
        return shown(", ".join(names) or "no names", 160)


def ssl_default() -> Any:
    """A TLS context trusting the system's store (vault.ca_cert unset). Blocking: it reads the store."""
    import ssl

    return ssl.create_default_context()
