"""KV secrets by path: which mount and KV version a `MOUNT/PATH` is on (sys/internal/ui/mounts), and whether a
secret holds data and at which version. The shapes and their checks are shared with the admin commands (their hvac
calls are in agent.hvac_client); the async `find_mount` is the agent's, through its Vault session.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from agent.errors import SecretError
from agent.text import shown
from agent.vault import field

if TYPE_CHECKING:
    from agent.vault import Vault

__all__ = ["KVMount", "Presence", "find_mount", "mount_of", "mounts_path", "presence_of"]


@dataclass(frozen=True)
class KVMount:
    """A KV mount (path without slashes, version 1 or 2) and the secret's path inside it."""

    path: str
    version: int
    secret: str

    @property
    def full(self) -> str:
        """MOUNT/PATH, as the user wrote it."""
        return f"{self.path}/{self.secret}"

    @property
    def data_url(self) -> str:
        """The API path that reads and writes the secret's data."""
        return f"/v1/{self.path}/data/{self.secret}" if self.version == 2 else f"/v1/{self.full}"

    @property
    def policy_path(self) -> str:
        """The path a policy must name to read or write the data."""
        return self.data_url.removeprefix("/v1/")

    @property
    def read_paths(self) -> tuple[str, ...]:
        """Every path the agent reads for this secret, so its policy must grant read on each: the data, and on
        KV v2 also the metadata (the cheap change probe)."""
        if self.version == 2:
            return (self.policy_path, f"{self.path}/metadata/{self.secret}")
        return (self.policy_path,)


@dataclass(frozen=True)
class Presence:
    """Whether a secret holds data now, and (KV v2) its current version: the check-and-set value for a write
    (0 when the secret never existed; KV v1 has no versions and reports 0)."""

    live: bool
    version: int


def mounts_path(kv_path: str) -> str:
    """The API path that says which mount `kv_path` is on (readable by any token with access to the path)."""
    return f"/v1/sys/internal/ui/mounts/{kv_path.strip('/')}"


def mount_of(body: dict[str, Any] | None, kv_path: str, *, address: str, action: str, fix: str) -> KVMount:
    """The KVMount that a sys/internal/ui/mounts answer describes for `kv_path`.

    Raises:
        SecretError: the path is not on a KV engine (or the token sees nothing there).
        VaultUnavailable: the answer is not shaped like Vault's.
    """
    kv_path = kv_path.strip("/")
    data = field(body or {}, "data", dict, address=address, action=action, optional=True) or {}
    mount_path = str(data.get("path") or "").strip("/")
    secret = kv_path[len(mount_path):].strip("/")
    if not mount_path or data.get("type") not in {"kv", "generic"} or not secret:
        raise SecretError(f"{shown(kv_path)} is not a secret on a KV secrets engine: {fix}")
    options = data.get("options")
    version = str((options if isinstance(options, dict) else {}).get("version") or "1")
    return KVMount(mount_path, 2 if version == "2" else 1, secret)


def presence_of(body: dict[str, Any] | None, *, address: str, action: str) -> Presence:
    """A KV v2 metadata answer (None: 404) as a Presence."""
    if body is None:
        return Presence(False, 0)
    data = field(body, "data", dict, address=address, action=action)
    current = field(data, "current_version", int, address=address, action=action)
    versions = field(data, "versions", dict, address=address, action=action, optional=True) or {}
    entry = versions.get(str(current))
    live = isinstance(entry, dict) and not entry.get("deletion_time") and entry.get("destroyed") is not True
    return Presence(live, current)


async def find_mount(vault: Vault, kv_path: str, *, fix: str) -> KVMount:
    """The KV mount of `kv_path` and its version. `fix` ends the error sentence (what to check or change).

    Raises:
        SecretError: the path is not on a KV engine (or the token sees nothing there).
        VaultUnavailable: Vault could not be reached or sent something else than an answer.
    """
    action = f"looking up the KV mount of {shown(kv_path.strip('/'))}"
    body = await vault.request("GET", mounts_path(kv_path), action=action, hint=fix)
    return mount_of(body, kv_path, address=vault.address, action=action, fix=fix)
