"""Log in to Vault: Kubernetes or JWT auth with the service-account token read fresh at every login, or a token file.

Projected service-account tokens rotate (kubelet rewrites the file), so the token is never cached here. Every call
goes through the agent's Vault session, so the JWT is only ever sent to the configured origin.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from agent.errors import AuthError, ConfigError, CredentialUnavailable, VaultUnavailable
from agent.text import shown
from agent.vault import field

if TYPE_CHECKING:
    from agent.config import AuthConfig
    from agent.vault import Vault

__all__ = [
    "TOKEN_FILE_LIMIT",
    "Login",
    "credential_digest",
    "from_login",
    "from_lookup",
    "login",
    "login_hint",
    "lookup_self",
    "may_be_standby",
    "mount_of",
    "read_token_file",
    "renew",
    "seconds",
    "standby_refusal",
]

#: the largest token file read (a projected service-account token is about 1 KiB)
TOKEN_FILE_LIMIT = 64 * 1024


@dataclass(frozen=True)
class Login:
    """A Vault token and its lease, as returned by a login; `token` is secret and never logged."""

    token: str
    accessor: str
    ttl: float
    renewable: bool
    obtained_at: float
    #: sha256 of the token file the login used, to notice a rotated service-account token (None: token method)
    credential_digest: str | None = None

    @property
    def expires_at(self) -> float:
        return self.obtained_at + self.ttl if self.ttl else float("inf")

    def __repr__(self) -> str:  # keep the token out of reprs and tracebacks
        return f"Login(accessor={self.accessor!r}, ttl={self.ttl}, renewable={self.renewable})"


def mount_of(cfg: AuthConfig) -> str:
    """The auth mount without a leading `auth/`: `auth/kubernetes-cluster1` and `kubernetes-cluster1` are the same."""
    mount = (cfg.mount or "").strip("/")
    return mount.removeprefix("auth/")


def credential_digest(token: str) -> str:
    """A fingerprint of a token file's (stripped) content, to tell whether the file now holds another token."""
    return hashlib.sha256(token.encode()).hexdigest()


def read_token_file(path: str, what: str, *, settled: bool = False) -> str:
    """The token in `path`, stripped: a regular file of at most 64 KiB (a FIFO or /dev/zero is refused, never read).
    Blocking: call it off the event loop.

    Raises:
        ConfigError: the file is missing, unreadable or empty, before the agent ever logged in with it (fix it).
        CredentialUnavailable: the same once `settled` (a login worked before): kubelet may be rewriting the file;
            the caller retries and keeps the Vault token it holds.
    """
    from agent.files import FileProblem, read_regular

    error: type[ConfigError | CredentialUnavailable] = CredentialUnavailable if settled else ConfigError
    try:
        raw = read_regular(path, limit=TOKEN_FILE_LIMIT, what=f"{what} file")
    except FileProblem as exc:
        fix = ": mount a projected service account token there or set auth.token_path" if exc.missing else ""
        raise error(f"{exc}{fix}") from None
    try:
        token = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise error(f"{what} file {shown(path)} cannot be read: not text") from None
    if not token:
        raise error(f"{what} file {shown(path)} is empty")
    return token


def login_hint(cfg: AuthConfig, message: str) -> str:
    """What to fix after a refused login, from Vault's message."""
    mount, role, path = shown(mount_of(cfg)), shown(cfg.role or ""), shown(cfg.token_path)
    lowered = message.lower()
    if "role" in lowered and ("invalid" in lowered or "not found" in lowered or "could not be found" in lowered):
        return f"create role {role!r} on auth mount {mount!r}, or fix auth.role"
    if "service account" in lowered or "namespace" in lowered or "not authorized" in lowered:
        return (
            f"bind role {role!r} on auth mount {mount!r} to this pod's service account and namespace"
            " (bound_service_account_names, bound_service_account_namespaces)"
        )
    if "permission denied" in lowered:
        return (
            f"check that a {cfg.method} auth method is enabled at auth/{mount} (auth.mount) and that"
            f" role {role!r} accepts the token in {path}"
        )
    return f"check role {role!r} on auth mount {mount!r} and the token in {path}"


def seconds(data: dict[str, Any], key: str, address: str, action: str) -> float:
    """`data[key]` as a non-negative number of seconds (0 when absent); VaultUnavailable when not a number."""
    value = field(data, key, (int, float), address=address, action=action, optional=True)
    return max(0.0, float(value or 0))


async def login(vault: Vault, cfg: AuthConfig, *, settled: bool = False) -> Login:
    """Log in with the configured method; the token file is read at every login.

    `settled`: a login worked before (see `read_token_file`).

    Raises:
        ConfigError / CredentialUnavailable: the token file cannot be read, or is empty.
        AuthError: Vault refused the login (role, mount, service account or audience).
        VaultUnavailable: Vault could not be reached; retry.
    """
    address = vault.address
    if cfg.method == "token":
        token = await asyncio.to_thread(read_token_file, cfg.token_path, "Vault token", settled=settled)
        action = f"looking up the token in {shown(cfg.token_path)}"
        body = await vault.request(
            "GET", "auth/token/lookup-self", token=token, action=action, login=True,
            hint=f"put a valid Vault token in {shown(cfg.token_path)}",
        )
        return from_lookup(token, body, address=address, action=action)

    jwt = await asyncio.to_thread(read_token_file, cfg.token_path, "service account token", settled=settled)
    digest = credential_digest(jwt)
    mount = mount_of(cfg)
    role = cfg.role or ""
    action = f"logging in to auth/{shown(mount)} as role {shown(role)!r}"
    try:
        body = await vault.request(
            "POST", f"auth/{mount}/login", json={"role": role, "jwt": jwt}, auth=False, action=action, login=True
        )
    except AuthError as exc:
        await _not_ready(vault, str(exc), action)
        hint = login_hint(cfg, str(exc))
        raise AuthError(f"{exc}; {hint}") from exc
    return from_login(body, digest, address=address, action=action, method=cfg.method)


def from_lookup(token: str, body: Any, *, address: str, action: str) -> Login:
    """The Login of a token method: `token` and what auth/token/lookup-self answered about it."""
    data = field(body or {}, "data", dict, address=address, action=action)
    return Login(
        token=token,
        accessor=str(data.get("accessor") or ""),
        ttl=seconds(data, "ttl", address, action),
        renewable=data.get("renewable") is True,
        obtained_at=time.time(),
    )


def from_login(body: Any, digest: str, *, address: str, action: str, method: str) -> Login:
    """The Login in a login answer (`digest`: of the token file it used); AuthError when it carries no token."""
    auth = field(body or {}, "auth", dict, address=address, action=action, optional=True)
    client_token = (auth or {}).get("client_token")
    if not client_token or not isinstance(client_token, str):
        raise AuthError(f"{action} returned no token: check that auth.mount is a {method} auth method")
    return Login(
        token=client_token,
        accessor=str(auth.get("accessor") or ""),
        ttl=seconds(auth, "lease_duration", address, action),
        renewable=auth.get("renewable") is True,
        obtained_at=time.time(),
        credential_digest=digest,
    )


def may_be_standby(message: str) -> bool:
    """A bare "permission denied" on a login is also what a standby answers before it has caught up with the
    auth mount (about 30 s after it was configured), or a node that is not active: then the node's state says
    whether it is worth a retry (`standby_refusal`)."""
    return message.rstrip().endswith("permission denied")


def standby_refusal(action: str, state: str) -> VaultUnavailable | None:
    """The retryable error for a login refused by a node in `state`; None when the node is active (a real refusal)."""
    if state == "active":
        return None
    return VaultUnavailable(
        f"login refused while {action}: permission denied by a node that reports itself {state}; a standby"
        " refuses logins until it has caught up with the auth mount"
    )


async def _not_ready(vault: Vault, message: str, action: str) -> None:
    """Raise `standby_refusal` when a login's "permission denied" came from a node that is not active."""
    if may_be_standby(message) and (error := standby_refusal(action, await vault.node_status())) is not None:
        raise error


async def renew(vault: Vault, current: Login) -> Login:
    """Renew `current`'s token; the returned Login carries the new TTL (shorter than asked near max TTL).

    Raises:
        AuthError: the token was revoked, expired or is not renewable: log in again.
        VaultUnavailable: Vault could not be reached.
    """
    action = "renewing the Vault token"
    body = await vault.request("POST", "auth/token/renew-self", json={}, token=current.token, action=action,
                               login=True)
    data = field(body or {}, "auth", dict, address=vault.address, action=action)
    return Login(
        token=current.token,
        accessor=str(data.get("accessor") or current.accessor),
        ttl=seconds(data, "lease_duration", vault.address, action),
        renewable=data.get("renewable") is True,
        obtained_at=time.time(),
        credential_digest=current.credential_digest,
    )


async def lookup_self(vault: Vault, token: str) -> bool:
    """Whether Vault still accepts `token` (lookup-self, which every token may call); False on a 401/403.

    Raises:
        VaultUnavailable: Vault could not be reached.
    """
    from agent.errors import PermissionDenied

    try:
        await vault.request("GET", "auth/token/lookup-self", token=token, action="looking up the agent's Vault token")
    except PermissionDenied:  # 403: revoked, expired, or unknown to a restarted Vault
        return False
    return True
