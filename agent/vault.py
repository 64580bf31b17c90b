"""The hvac client factory, the gate every Vault call goes through, and the one place where hvac/requests
errors become AgentErrors.

Retryable failures (unreachable, sealed, 5xx, 429, timeouts) become VaultUnavailable; final ones VaultError.
The client only ever carries a token the agent obtained itself: never VAULT_TOKEN or ~/.vault-token.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from agent.errors import (
    AgentError,
    AuthError,
    PermissionDenied,
    ResponseTooLarge,
    SecretError,
    VaultError,
    VaultUnavailable,
)
from agent.text import shown
from agent.threads import offload

if TYPE_CHECKING:
    import hvac

    from agent.config import VaultConfig

__all__ = ["VaultGate", "answer", "call", "field", "make_client", "node_state", "translate"]

_CHUNK = 65536

T = TypeVar("T")


def make_client(
    cfg: VaultConfig, *, on_request: Callable[..., Any] | None = None, max_response_bytes: int = 1 << 20
) -> hvac.Client:
    """An hvac client for `cfg` with its TLS settings and a per-request timeout; `on_request` sees each response.

    No answer is read beyond `max_response_bytes` (ResponseTooLarge) or for longer than twice vault.timeout
    in all (VaultUnavailable), whatever Vault or a proxy in front of it sends.

    The client starts without a token. hvac would otherwise read VAULT_TOKEN or ~/.vault-token and send it
    along (even on the login request); requests would add ~/.netrc credentials. Proxies still come from
    HTTPS_PROXY/NO_PROXY, as for any HTTP client in a pod.
    """
    import hvac
    import requests

    session = requests.Session()
    session.trust_env = False  # no ~/.netrc, no REQUESTS_CA_BUNDLE: TLS trust is vault.ca_cert alone
    session.proxies.update(requests.utils.get_environ_proxies(cfg.address))
    if on_request is not None:
        session.hooks["response"].append(on_request)
    # requests calls response hooks before it reads the body: read it here, bounded in size and time
    session.hooks["response"].append(_bounded_body(max_response_bytes, 2 * cfg.timeout, cfg.address))
    if cfg.tls_server_name:
        session.mount(cfg.address.rstrip("/") + "/", _ServerNameAdapter(cfg.tls_server_name))
    verify: bool | str = False if cfg.skip_verify else (cfg.ca_cert or True)
    # hvac takes verify from a session it is given (hvac#991) and ignores its own argument then
    session.verify = verify
    return hvac.Client(
        url=cfg.address,
        token="",  # not None: None makes hvac look for an ambient token
        verify=verify,
        timeout=cfg.timeout,
        namespace=cfg.namespace,
        session=session,
    )


def _ServerNameAdapter(server_name: str) -> Any:
    """A requests adapter that sends SNI `server_name` and checks the certificate against it."""
    from requests.adapters import HTTPAdapter

    class Adapter(HTTPAdapter):
        def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
            kwargs["server_hostname"] = server_name
            kwargs["assert_hostname"] = server_name
            super().init_poolmanager(*args, **kwargs)

    return Adapter()


def _bounded_body(limit: int, seconds: float, address: str) -> Callable[..., None]:
    """A requests response hook that reads the body itself: at most `limit` bytes, within `seconds`."""

    def read(response: Any, *_args: Any, **_kwargs: Any) -> None:
        where = f"Vault at {shown(address)}"
        length = response.headers.get("Content-Length", "")
        if length.isdigit() and int(length) > limit:
            response.close()
            raise ResponseTooLarge(
                f"{where} sent an answer of {int(length)} bytes, over limits.max_secret_size ({limit} bytes);"
                " store less under that path or raise the limit"
            )
        deadline = time.monotonic() + seconds
        chunks: list[bytes] = []
        size = 0
        while True:
            chunk = response.raw.read(_CHUNK, decode_content=True)
            if not chunk:
                break
            size += len(chunk)
            if size > limit:
                response.close()
                raise ResponseTooLarge(
                    f"{where} sent an answer over limits.max_secret_size ({limit} bytes);"
                    " store less under that path or raise the limit"
                )
            chunks.append(chunk)
            if time.monotonic() > deadline:
                response.close()
                raise VaultUnavailable(f"{where} sent its answer too slowly (over {seconds:g}s)")
        response._content = b"".join(chunks)
        response._content_consumed = True

    return read


def _vault_message(exc: Exception) -> str:
    errors = getattr(exc, "errors", None)
    if isinstance(errors, list) and errors:
        return shown("; ".join(str(e) for e in errors))
    return shown(str(exc).split(", on ")[0] or type(exc).__name__)


def translate(exc: Exception, *, address: str, action: str, login: bool = False, hint: str = "") -> AgentError:
    """Map an hvac/requests exception from `action` (e.g. "reading KV path a/b") to an AgentError.

    `login` marks the auth call, where 400/403 mean the role or service account is wrong.
    """
    import hvac.exceptions as hx
    import requests

    suffix = f"; {hint}" if hint else ""
    address = shown(address)
    if isinstance(exc, AgentError):
        return exc
    if isinstance(exc, requests.exceptions.SSLError):
        return VaultError(
            f"TLS verification failed while {action} at {address}: set vault.ca_cert (VAULT_CACERT) to the CA"
            " that signed Vault's certificate, or vault.tls_server_name to the name in it"
        )
    if isinstance(exc, requests.exceptions.Timeout):
        return VaultUnavailable(f"Vault at {address} did not answer in time while {action}")
    if isinstance(exc, requests.exceptions.ConnectionError):
        return VaultUnavailable(f"cannot reach Vault at {address} while {action}: is it running and reachable?")
    if isinstance(exc, hx.VaultDown):
        return VaultUnavailable(f"Vault at {address} is sealed or in standby while {action}")
    if isinstance(exc, hx.VaultNotInitialized):
        return VaultUnavailable(f"Vault at {address} is not initialized while {action}")
    if isinstance(exc, hx.InternalServerError | hx.BadGateway | hx.RateLimitExceeded | hx.UnexpectedError):
        return VaultUnavailable(f"Vault at {address} failed while {action}: {_vault_message(exc)}")
    message = _vault_message(exc)
    if login and isinstance(exc, hx.InvalidRequest | hx.Forbidden | hx.Unauthorized):
        return AuthError(f"login refused while {action}: {message}{suffix}")
    if isinstance(exc, hx.Forbidden | hx.Unauthorized):
        return PermissionDenied(f"permission denied while {action}{suffix}")
    if isinstance(exc, hx.InvalidPath):
        return SecretError(f"nothing found while {action}{suffix}")
    if isinstance(exc, hx.VaultError):
        return VaultError(f"Vault refused {action}: {message}{suffix}")
    if isinstance(exc, requests.exceptions.RequestException):
        return VaultUnavailable(f"request to Vault at {address} failed while {action}: {type(exc).__name__}")
    # hvac met an answer of a shape it does not expect (a proxy's page, null, a list, undecodable text)
    return VaultUnavailable(
        f"Vault at {address} answered with something that is not a Vault response while {action}"
        f" ({type(exc).__name__})"
    )


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


def node_state(client: hvac.Client) -> str:
    """What the node answering this client says of itself (sys/health, which needs no token): one of
    metrics.NODE_STATES.

    Asked over the client's pooled connection, so behind an L4 balancer it is the node that answered last.
    """
    try:
        response = client.adapter.get(
            "/v1/sys/health",
            params={"standbyok": "true", "perfstandbyok": "true", "sealedcode": "200", "uninitcode": "200"},
        )
    except Exception:  # noqa: BLE001 - any failure here means we cannot tell
        return "unreachable"
    if not isinstance(response, dict):
        return "unreachable"
    if response.get("initialized") is False:
        return "uninitialized"
    if response.get("sealed") is True:
        return "sealed"
    if response.get("standby") is True or response.get("performance_standby") is True:
        return "standby"
    return "active"


def call(fn: Callable[[], T], *, address: str, action: str, login: bool = False, hint: str = "") -> T:
    """Run one hvac call, translating its failure once, here, at the boundary."""
    try:
        return fn()
    except AgentError:
        raise
    except Exception as exc:
        raise translate(exc, address=address, action=action, login=login, hint=hint) from exc


class VaultGate:
    """Runs blocking hvac calls in daemon threads, one at a time, so one client and session serve every task.

    After a failure that may be one node's (unavailable, stale), the pooled connections are dropped: behind a
    balancer the next call then opens a connection that may reach another node.
    """

    #: at most one sys/health probe per this many seconds
    PROBE_EVERY = 10.0

    def __init__(self, client: hvac.Client) -> None:
        self.client = client
        self._lock = asyncio.Lock()
        #: the last node state reported by sys/health (None: never asked) and when (time.time())
        self.node_state: str | None = None
        self.node_state_at: float | None = None
        self._probed = 0.0

    async def run(self, fn: Callable[[], T]) -> T:
        """`fn()` in a thread once no other Vault call is running; raises what it raises."""
        async with self._lock:
            try:
                return await offload(fn)
            except VaultUnavailable:
                await offload(self._drop_connections)
                raise

    def _drop_connections(self) -> None:
        self.client.adapter.session.close()  # the session stays usable: it opens new connections on demand

    async def leave_node(self) -> None:
        """Drop the pooled connections, so the next call may reach another node."""
        async with self._lock:
            await offload(self._drop_connections)

    async def probe_node(self) -> str | None:
        """After a failure: ask sys/health what the answering node is (rate limited); returns the state."""
        now = time.monotonic()
        if now - self._probed < self.PROBE_EVERY:
            return self.node_state
        self._probed = now
        async with self._lock:
            self.node_state = await offload(lambda: node_state(self.client))
        self.node_state_at = time.time()
        return self.node_state
