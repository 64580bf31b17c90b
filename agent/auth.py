"""Log in to Vault: Kubernetes or JWT auth with the service-account token read fresh at every login, or a token file.

Projected service-account tokens rotate (kubelet rewrites the file), so the token is never cached here.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent import vault
from agent.errors import AuthError, ConfigError, VaultUnavailable
from agent.text import shown

if TYPE_CHECKING:
    import hvac

    from agent.config import AuthConfig

__all__ = ["Login", "credential_digest", "login", "mount_of", "read_token_file", "renew"]


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


def read_token_file(path: str, what: str) -> str:
    """The token in `path`, stripped; ConfigError naming the file when it is missing or empty."""
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise ConfigError(
            f"{what} file {path} does not exist: mount a projected service account token there or set auth.token_path"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or "not text"
        raise ConfigError(f"{what} file {path} cannot be read: {reason}") from None
    if not token:
        raise ConfigError(f"{what} file {path} is empty")
    return token


def _login_hint(cfg: AuthConfig, message: str) -> str:
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


def login(client: hvac.Client, cfg: AuthConfig) -> Login:
    """Log in with the configured method and set the client's token.

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
        response = vault.call(
            client.auth.token.lookup_self,
            address=address,
            action=action,
            login=True,
            hint=f"put a valid Vault token in {shown(cfg.token_path)}",
        )
        data = vault.field(vault.answer(response, address=address, action=action), "data", dict,
                           address=address, action=action)
        return Login(
            token=client.token,
            accessor=str(data.get("accessor") or ""),
            ttl=_seconds(data, "ttl", address, action),
            renewable=data.get("renewable") is True,
            obtained_at=time.time(),
        )

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
        response = vault.call(do_login, address=address, action=action, login=True)
    except AuthError as exc:
        _not_ready(client, str(exc), action)
        hint = _login_hint(cfg, str(exc))
        raise AuthError(f"{exc}; {hint}") from exc
    auth = vault.field(vault.answer(response, address=address, action=action), "auth", dict,
                       address=address, action=action, optional=True)
    token = (auth or {}).get("client_token")
    if not token or not isinstance(token, str):
        raise AuthError(f"{action} returned no token: check that auth.mount is a {cfg.method} auth method")
    client.token = token
    return Login(
        token=token,
        accessor=str(auth.get("accessor") or ""),
        ttl=_seconds(auth, "lease_duration", address, action),
        renewable=auth.get("renewable") is True,
        obtained_at=time.time(),
        credential_digest=digest,
    )


def _seconds(data: dict[str, Any], key: str, address: str, action: str) -> float:
    value = vault.field(data, key, (int, float), address=address, action=action, optional=True)
    return max(0.0, float(value or 0))


def _not_ready(client: hvac.Client, message: str, action: str) -> None:
    """A bare "permission denied" on a login is also what a standby answers before it has caught up with the
    auth mount (about 30 s after it was configured), or a node that is not active: then it is worth a retry."""
    if not message.rstrip().endswith("permission denied"):
        return
    state = vault.node_state(client)
    if state != "active":
        raise VaultUnavailable(
            f"login refused while {action}: permission denied by a node that reports itself {state}; a standby"
            " refuses logins until it has caught up with the auth mount"
        )


def renew(client: hvac.Client, current: Login) -> Login:
    """Renew the client's token; the returned Login carries the new TTL (shorter than asked near max TTL).

    Raises:
        AuthError: the token was revoked, expired or is not renewable: log in again.
        VaultUnavailable: Vault could not be reached.
    """
    action = "renewing the Vault token"
    response = vault.call(client.auth.token.renew_self, address=client.url, action=action, login=True)
    data = vault.field(vault.answer(response, address=client.url, action=action), "auth", dict,
                       address=client.url, action=action)
    return Login(
        token=current.token,
        accessor=str(data.get("accessor") or current.accessor),
        ttl=_seconds(data, "lease_duration", client.url, action),
        renewable=data.get("renewable") is True,
        obtained_at=time.time(),
        credential_digest=current.credential_digest,
    )
