"""KV secrets by path, for the agent and the admin commands: which mount and KV version a `MOUNT/PATH` is on
(sys/internal/ui/mounts), whether a secret holds data and at which version, reading its keys, and writing it
with KV v2 check-and-set, so that two writers cannot both believe they created it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from agent import vault
from agent.errors import SecretError, WriteConflict
from agent.text import shown

if TYPE_CHECKING:
    import hvac

__all__ = ["KVMount", "Presence", "find_mount", "presence", "read", "write"]


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


def find_mount(client: hvac.Client, kv_path: str, *, fix: str) -> KVMount:
    """The KV mount of `kv_path` and its version, from sys/internal/ui/mounts, which any token with access to the
    path can read. `fix` ends the error sentence (what to check or change).

    Raises:
        SecretError: the path is not on a KV engine (or the token sees nothing there).
        VaultUnavailable: Vault could not be reached or sent something else than an answer.
    """
    kv_path = kv_path.strip("/")
    action = f"looking up the KV mount of {shown(kv_path)}"
    resp = vault.call(lambda: client.adapter.get(f"/v1/sys/internal/ui/mounts/{kv_path}"), address=client.url,
                      action=action, hint=fix)
    data = vault.field(vault.answer(resp, address=client.url, action=action), "data", dict, address=client.url,
                       action=action, optional=True) or {}
    mount_path = str(data.get("path") or "").strip("/")
    secret = kv_path[len(mount_path):].strip("/")
    if not mount_path or data.get("type") not in {"kv", "generic"} or not secret:
        raise SecretError(f"{shown(kv_path)} is not a secret on a KV secrets engine: {fix}")
    options = data.get("options")
    version = str((options if isinstance(options, dict) else {}).get("version") or "1")
    return KVMount(mount_path, 2 if version == "2" else 1, secret)


def _get(client: hvac.Client, url: str, action: str, hint: str) -> dict[str, Any] | None:
    """GET `url` as a Vault answer; None for a 404."""
    import hvac.exceptions as hx

    def get() -> object:
        try:
            return client.adapter.get(url)
        except hx.InvalidPath:
            return None

    resp = vault.call(get, address=client.url, action=action, hint=hint)
    return None if resp is None else vault.answer(resp, address=client.url, action=action)


def presence(client: hvac.Client, m: KVMount) -> Presence:
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
    if body is None:
        return Presence(False, 0)
    data = vault.field(body, "data", dict, address=client.url, action=action)
    current = vault.field(data, "current_version", int, address=client.url, action=action)
    versions = vault.field(data, "versions", dict, address=client.url, action=action, optional=True) or {}
    entry = versions.get(str(current))
    live = isinstance(entry, dict) and not entry.get("deletion_time") and entry.get("destroyed") is not True
    return Presence(live, current)


def read(client: hvac.Client, m: KVMount, *, hint: str) -> dict[str, Any] | None:
    """The current data of `m`'s secret; None when there is none (absent, or its current KV v2 version deleted).

    Raises:
        PermissionDenied: the token may not read it.
        VaultUnavailable: Vault could not be reached.
    """
    action = f"reading KV v{m.version} path {shown(m.full)}"
    body = _get(client, m.data_url, action, hint)
    if body is None:
        return None
    data = vault.field(body, "data", dict, address=client.url, action=action, optional=True) or {}
    if m.version == 2:
        data = vault.field(data, "data", dict, address=client.url, action=action, optional=True) or {}
    return dict(data)


def write(client: hvac.Client, m: KVMount, data: Mapping[str, str], *, cas: int | None) -> int | None:
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

    resp = vault.call(post, address=client.url, action=action, hint=hint)
    if m.version == 1:
        return None
    answer = vault.answer(resp, address=client.url, action=action)
    result = vault.field(answer, "data", dict, address=client.url, action=action)
    return int(vault.field(result, "version", int, address=client.url, action=action))
