"""hvac for the operator commands (`setup vault`, `doctor`, `ca`): the client factory, the one place where hvac and
requests errors become AgentErrors, the sync login of `ca intermediate --auth-mount`, and KV reads and writes.

The long-running agent never imports this module (agent.vault is its Vault session); these commands are short,
synchronous and run at a terminal or in a Job. The client only ever carries a token it was given: never
VAULT_TOKEN or ~/.vault-token picked up by hvac itself.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from agent.auth import (
    Login,
    credential_digest,
    from_login,
    from_lookup,
    login_hint,
    may_be_standby,
    mount_of,
    read_token_file,
    standby_refusal,
)
from agent.errors import (
    AgentError,
    AuthError,
    PermissionDenied,
    ResponseTooLarge,
    SecretError,
    VaultError,
    VaultUnavailable,
    WriteConflict,
)
from agent.kvstore import KVMount, Presence, mounts_path, presence_of
from agent.kvstore import mount_of as kv_mount_of
from agent.text import shown
from agent.vault import answer, field, health_state

if TYPE_CHECKING:
    import hvac

    from agent.config import AuthConfig, VaultConfig

__all__ = [
    "call",
    "kv_mount",
    "kv_presence",
    "kv_read",
    "kv_write",
    "login",
    "make_client",
    "node_state",
    "translate",
]

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


def node_state(client: hvac.Client) -> str:
    """What the node answering this client says of itself (sys/health, which needs no token): one of
    metrics.NODE_STATES."""
    try:
        response = client.adapter.get(
            "/v1/sys/health",
            params={"standbyok": "true", "perfstandbyok": "true", "sealedcode": "200", "uninitcode": "200"},
        )
    except Exception:  # noqa: BLE001 - any failure here means we cannot tell
        return "unreachable"
    return health_state(response)


def call(fn: Callable[[], T], *, address: str, action: str, login: bool = False, hint: str = "") -> T:
    """Run one hvac call, translating its failure once, here, at the boundary."""
    try:
        return fn()
    except AgentError:
        raise
    except Exception as exc:
        raise translate(exc, address=address, action=action, login=login, hint=hint) from exc


def login(client: hvac.Client, cfg: AuthConfig) -> Login:
    """Log in with the configured method and set the client's token (`ca intermediate --auth-mount`).

    Raises:
        ConfigError: the token file is missing or empty.
        AuthError: Vault refused the login (role, mount, service account or audience).
        VaultUnavailable: Vault could not be reached; retry.
    """
    address = client.url
    client.token = ""  # a login never carries an earlier token along
    if cfg.method == "token":
        client.token = read_token_file(cfg.token_path, "Vault token")
        action = f"looking up the token in {shown(cfg.token_path)}"
        response = call(
            client.auth.token.lookup_self,
            address=address,
            action=action,
            login=True,
            hint=f"put a valid Vault token in {shown(cfg.token_path)}",
        )
        return from_lookup(client.token, answer(response, address=address, action=action), address=address,
                           action=action)

    jwt = read_token_file(cfg.token_path, "service account token")
    digest = credential_digest(jwt)
    mount = mount_of(cfg)
    role = cfg.role or ""
    action = f"logging in to auth/{shown(mount)} as role {shown(role)!r}"

    def do_login() -> dict[str, Any]:
        if cfg.method == "kubernetes":
            return client.auth.kubernetes.login(role, jwt, use_token=False, mount_point=mount)  # type: ignore[no-any-return]
        return client.auth.jwt.jwt_login(role, jwt, use_token=False, path=mount)  # type: ignore[no-any-return]

    try:
        response = call(do_login, address=address, action=action, login=True)
    except AuthError as exc:
        _not_ready(client, str(exc), action)
        hint = login_hint(cfg, str(exc))
        raise AuthError(f"{exc}; {hint}") from exc
    done = from_login(answer(response, address=address, action=action), digest, address=address, action=action,
                      method=cfg.method)
    client.token = done.token
    return done


def _not_ready(client: hvac.Client, message: str, action: str) -> None:
    """A bare "permission denied" on a login is also what a standby answers before it has caught up with the
    auth mount (about 30 s after it was configured), or a node that is not active: then it is worth a retry."""
    if may_be_standby(message) and (error := standby_refusal(action, node_state(client))) is not None:
        raise error


def kv_mount(client: hvac.Client, kv_path: str, *, fix: str) -> KVMount:
    """The KV mount of `kv_path` and its version, from sys/internal/ui/mounts, which any token with access to the
    path can read. `fix` ends the error sentence (what to check or change).

    Raises:
        SecretError: the path is not on a KV engine (or the token sees nothing there).
        VaultUnavailable: Vault could not be reached or sent something else than an answer.
    """
    action = f"looking up the KV mount of {shown(kv_path.strip('/'))}"
    resp = call(lambda: client.adapter.get(mounts_path(kv_path)), address=client.url, action=action, hint=fix)
    body = answer(resp, address=client.url, action=action)
    return kv_mount_of(body, kv_path, address=client.url, action=action, fix=fix)


def _get(client: hvac.Client, url: str, action: str, hint: str) -> dict[str, Any] | None:
    """GET `url` as a Vault answer; None for a 404."""
    import hvac.exceptions as hx

    def get() -> object:
        try:
            return client.adapter.get(url)
        except hx.InvalidPath:
            return None

    resp = call(get, address=client.url, action=action, hint=hint)
    return None if resp is None else answer(resp, address=client.url, action=action)


def kv_presence(client: hvac.Client, m: KVMount) -> Presence:
    """Whether `m`'s secret holds data, and its current version (KV v2: from metadata, no secret bytes read).

    Raises:
        PermissionDenied: the token may not read the metadata (KV v2) or the secret (KV v1).
        VaultUnavailable: Vault could not be reached.
    """
    if m.version == 1:
        action = f"reading KV v1 path {shown(m.full)}"
        return Presence(_get(client, m.data_url, action, f"grant read on {shown(m.full)}") is not None, 0)
    action = f"reading the metadata of KV v2 path {shown(m.full)}"
    body = _get(client, f"/v1/{m.path}/metadata/{m.secret}", action,
                f"grant read on {shown(f'{m.path}/metadata/{m.secret}')}")
    return presence_of(body, address=client.url, action=action)


def kv_read(client: hvac.Client, m: KVMount, *, hint: str) -> dict[str, Any] | None:
    """The current data of `m`'s secret; None when there is none (absent, or its current KV v2 version deleted).

    Raises:
        PermissionDenied: the token may not read it.
        VaultUnavailable: Vault could not be reached.
    """
    action = f"reading KV v{m.version} path {shown(m.full)}"
    body = _get(client, m.data_url, action, hint)
    if body is None:
        return None
    data = field(body, "data", dict, address=client.url, action=action, optional=True) or {}
    if m.version == 2:
        data = field(data, "data", dict, address=client.url, action=action, optional=True) or {}
    return dict(data)


def kv_write(client: hvac.Client, m: KVMount, data: Mapping[str, str], *, cas: int | None) -> int | None:
    """Write `data` as `m`'s secret; returns the new KV v2 version (None on KV v1).

    On KV v2 `cas` is the version the caller saw (0: none): Vault refuses the write when the secret has moved on
    since. KV v1 has no check-and-set; `cas` is ignored there.

    Raises:
        WriteConflict: check-and-set refused the write (someone else wrote the secret meanwhile).
        PermissionDenied: the token may not write the path.
        VaultUnavailable: Vault could not be reached.
    """
    import hvac.exceptions as hx

    action = f"writing KV v{m.version} path {shown(m.full)}"
    hint = f"grant create and update on {shown(m.policy_path)}"
    body: dict[str, Any] = dict(data) if m.version == 1 else {"data": dict(data)}
    if m.version == 2 and cas is not None:
        body["options"] = {"cas": cas}

    def post() -> object:
        try:
            return client.adapter.post(m.data_url, json=body)
        except hx.InvalidRequest as exc:
            if m.version == 2 and "check-and-set" in str(exc):
                raise WriteConflict(
                    f"KV path {shown(m.full)} changed while this command ran (another writer made a version after"
                    f" version {cas}), so check-and-set refused the write and nothing was written: look at what is"
                    " there now before running again"
                ) from None
            raise

    resp = call(post, address=client.url, action=action, hint=hint)
    if m.version == 1:
        return None
    body = answer(resp, address=client.url, action=action)
    result = field(body, "data", dict, address=client.url, action=action)
    return int(field(result, "version", int, address=client.url, action=action))
