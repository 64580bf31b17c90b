"""The hvac client factory, the gate every Vault call goes through, and the one place where hvac/requests
errors become AgentErrors.

Retryable failures (unreachable, sealed, 5xx, 429, timeouts) become VaultUnavailable; final ones VaultError.
The client only ever carries a token the agent obtained itself: never VAULT_TOKEN or ~/.vault-token.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from agent.errors import AgentError, AuthError, PermissionDenied, SecretError, VaultError, VaultUnavailable
from agent.threads import offload

if TYPE_CHECKING:
    import hvac

    from agent.config import VaultConfig

__all__ = ["VaultGate", "call", "make_client", "translate"]

T = TypeVar("T")


def make_client(cfg: VaultConfig, *, on_request: Callable[..., Any] | None = None) -> hvac.Client:
    """An hvac client for `cfg` with its TLS settings and a per-request timeout; `on_request` sees each response.

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


def _vault_message(exc: Exception) -> str:
    errors = getattr(exc, "errors", None)
    if isinstance(errors, list) and errors:
        return "; ".join(str(e) for e in errors)
    return str(exc).split(", on ")[0] or type(exc).__name__


def translate(exc: Exception, *, address: str, action: str, login: bool = False, hint: str = "") -> AgentError:
    """Map an hvac/requests exception from `action` (e.g. "reading KV path a/b") to an AgentError.

    `login` marks the auth call, where 400/403 mean the role or service account is wrong.
    """
    import hvac.exceptions as hx
    import requests

    suffix = f"; {hint}" if hint else ""
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
    return VaultError(f"unexpected error while {action}: {type(exc).__name__}")


def call(fn: Callable[[], T], *, address: str, action: str, login: bool = False, hint: str = "") -> T:
    """Run one hvac call, translating its failure once, here, at the boundary."""
    try:
        return fn()
    except AgentError:
        raise
    except Exception as exc:
        raise translate(exc, address=address, action=action, login=login, hint=hint) from exc


class VaultGate:
    """Runs blocking hvac calls in daemon threads, one at a time, so one client and session serve every task."""

    def __init__(self, client: hvac.Client) -> None:
        self.client = client
        self._lock = asyncio.Lock()

    async def run(self, fn: Callable[[], T]) -> T:
        """`fn()` in a thread once no other Vault call is running; raises what it raises."""
        async with self._lock:
            return await offload(fn)
