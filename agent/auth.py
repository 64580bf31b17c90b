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
from agent.errors import AuthError, ConfigError

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
    mount = mount_of(cfg)
    lowered = message.lower()
    if "role" in lowered and ("invalid" in lowered or "not found" in lowered or "could not be found" in lowered):
        return f"create role {cfg.role!r} on auth mount {mount!r}, or fix auth.role"
    if "service account" in lowered or "namespace" in lowered or "not authorized" in lowered:
        return (
            f"bind role {cfg.role!r} on auth mount {mount!r} to this pod's service account and namespace"
            " (bound_service_account_names, bound_service_account_namespaces)"
        )
    if "permission denied" in lowered:
        return (
            f"check that a {cfg.method} auth method is enabled at auth/{mount} (auth.mount) and that"
            f" role {cfg.role!r} accepts the token in {cfg.token_path}"
        )
    return f"check role {cfg.role!r} on auth mount {mount!r} and the token in {cfg.token_path}"


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
        data = vault.call(
            client.auth.token.lookup_self,
            address=address,
            action=f"looking up the token in {cfg.token_path}",
            login=True,
            hint=f"put a valid Vault token in {cfg.token_path}",
        )["data"]
        return Login(
            token=client.token,
            accessor=data.get("accessor", ""),
            ttl=float(data.get("ttl") or 0),
            renewable=bool(data.get("renewable")),
            obtained_at=time.time(),
        )

    jwt = read_token_file(cfg.token_path, "service account token")
    digest = credential_digest(jwt)
    mount = mount_of(cfg)
    role = cfg.role or ""
    action = f"logging in to auth/{mount} as role {role!r}"

    def do_login() -> dict[str, Any]:
        if cfg.method == "kubernetes":
            return client.auth.kubernetes.login(role, jwt, use_token=False, mount_point=mount)  # type: ignore[no-any-return]
        return client.auth.jwt.jwt_login(role, jwt, use_token=False, path=mount)  # type: ignore[no-any-return]

    try:
        response = vault.call(do_login, address=address, action=action, login=True)
    except AuthError as exc:
        hint = _login_hint(cfg, str(exc))
        raise AuthError(f"{exc}; {hint}") from exc
    auth = (response or {}).get("auth") or {}
    token = auth.get("client_token")
    if not token:
        raise AuthError(f"{action} returned no token: check the auth mount type")
    client.token = token
    return Login(
        token=token,
        accessor=auth.get("accessor", ""),
        ttl=float(auth.get("lease_duration") or 0),
        renewable=bool(auth.get("renewable")),
        obtained_at=time.time(),
        credential_digest=digest,
    )


def renew(client: hvac.Client, current: Login) -> Login:
    """Renew the client's token; the returned Login carries the new TTL (shorter than asked near max TTL).

    Raises:
        AuthError: the token was revoked, expired or is not renewable: log in again.
        VaultUnavailable: Vault could not be reached.
    """
    response = vault.call(
        client.auth.token.renew_self, address=client.url, action="renewing the Vault token", login=True
    )
    data = (response or {}).get("auth") or {}
    return Login(
        token=current.token,
        accessor=data.get("accessor", current.accessor),
        ttl=float(data.get("lease_duration") or 0),
        renewable=bool(data.get("renewable")),
        obtained_at=time.time(),
        credential_digest=current.credential_digest,
    )
