"""A bundle from a KV secret: KV v1 or v2 detected from the mount, keys mapped to output files.

Change detection: KV v2 through metadata `current_version` and its `created_time` (a version number alone repeats
when a secret is deleted and recreated, or Vault is restored); KV v1 (no versions) through a content digest.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from agent import vault
from agent.errors import SecretError
from agent.sources.base import Fetched, digest

if TYPE_CHECKING:
    import hvac

    from agent.config import AgentConfig, BundleConfig

__all__ = ["KVSource", "open"]


def open(bundle: BundleConfig, client: hvac.Client, cfg: AgentConfig) -> KVSource:
    """The KV source of `bundle`, polled every `sidecar.poll_interval`."""
    return KVSource(client, bundle, poll_interval=cfg.sidecar.poll_interval)


@dataclass
class _Mount:
    path: str  # mount path without trailing slash
    version: int  # 1 or 2


class KVSource:
    """Reads one bundle's KV secret with an authenticated hvac client (a `Source`)."""

    def __init__(self, client: hvac.Client, bundle: BundleConfig, *, poll_interval: float = 30.0) -> None:
        self.client = client
        self.bundle = bundle
        self.kv_path = (bundle.source.kv or "").strip("/")
        self.poll_interval = poll_interval
        self._mount: _Mount | None = None

    def reset(self) -> None:
        """Detect the KV mount and its version again at the next call (Vault may have been restored)."""
        self._mount = None

    def next_check(self, last: Fetched | None, now: float) -> float:
        """Every poll_interval, +-10 % jitter so a fleet of agents does not poll in step."""
        return now + self.poll_interval * random.uniform(0.9, 1.1)  # noqa: S311 - jitter, not crypto

    def changed(self, last: Fetched) -> bool | None:
        """KV v2: compare the metadata's current revision with `last`; None for KV v1 (no versions)."""
        if last.revision is None:
            return None
        revision = self.current_revision()
        return None if revision is None else revision != last.revision

    def _call(self, fn: Any, action: str, hint: str = "") -> Any:
        return vault.call(fn, address=self.client.url, action=action, hint=hint)

    def mount(self) -> _Mount:
        """Find the KV mount and its version from sys/internal/ui/mounts, which any token with access can read."""
        if self._mount is None:
            first = self.kv_path.split("/")[0]
            hint = f"check that {first} is a KV mount and that the agent's policy grants read on the path"
            resp = self._call(
                lambda: self.client.adapter.get(f"/v1/sys/internal/ui/mounts/{self.kv_path}"),
                f"looking up the KV mount of {self.kv_path}",
                hint,
            )
            data = (resp or {}).get("data") or {}
            mount_path = str(data.get("path") or "").strip("/")
            if not mount_path or data.get("type") not in {"kv", "generic"}:
                raise SecretError(
                    f"{self.kv_path} is not on a KV secrets engine: bundles[{self.bundle.name}].source.kv must be"
                    " MOUNT/PATH of a KV v1 or v2 secret"
                )
            version = str((data.get("options") or {}).get("version") or "1")
            self._mount = _Mount(mount_path, 2 if version == "2" else 1)
        return self._mount

    @property
    def secret_path(self) -> str:
        return self.kv_path[len(self.mount().path) :].strip("/")

    def current_revision(self) -> str | None:
        """KV v2: `version@created_time` of the current version, from metadata (no secret bytes); None for KV v1.

        Also None when the policy does not allow reading metadata: the caller then falls back to the digest.
        """
        m = self.mount()
        if m.version != 2:
            return None
        try:
            resp = self._call(
                lambda: self.client.secrets.kv.v2.read_secret_metadata(path=self.secret_path, mount_point=m.path),
                f"reading the metadata of KV path {self.kv_path}",
            )
        except SecretError:
            return None
        data = resp["data"]
        current = int(data["current_version"])
        created = ((data.get("versions") or {}).get(str(current)) or {}).get("created_time", "")
        return f"{current}@{created}"

    def fetch(self) -> Fetched:
        """Read the secret and map its keys to the bundle's files.

        Raises:
            SecretError: path missing, permission denied, or a required key missing or not text.
            VaultUnavailable: Vault unreachable or sealed; retry.
        """
        m = self.mount()
        policy_path = f"{m.path}/data/{self.secret_path}" if m.version == 2 else self.kv_path
        hint = (
            f"check that the secret exists and that the agent's policy grants read on {policy_path},"
            f" or fix source.kv of bundle {self.bundle.name}"
        )
        action = f"reading KV v{m.version} path {self.kv_path}"
        version: int | None = None
        revision: str | None = None
        if m.version == 2:
            resp = self._call(
                lambda: self.client.secrets.kv.v2.read_secret_version(
                    path=self.secret_path, mount_point=m.path, raise_on_deleted_version=True
                ),
                action,
                hint,
            )
            data = resp["data"]["data"] or {}
            meta = resp["data"]["metadata"]
            version = int(meta["version"])
            revision = f"{version}@{meta.get('created_time', '')}"
        else:
            resp = self._call(
                lambda: self.client.secrets.kv.v1.read_secret(path=self.secret_path, mount_point=m.path),
                action,
                hint,
            )
            data = resp.get("data") or {}
        files = self._map(data)
        return Fetched(files=files, digest=digest(files), revision=revision, version=version)

    def _map(self, data: Mapping[str, Any]) -> dict[str, bytes]:
        """Output file -> bytes: the configured key, else a key named like the file (`ca-key.pem`)."""
        files: dict[str, bytes] = {}
        for out, key in self.bundle.files.items():
            chosen = key if key in data else out if out in data else None
            if chosen is None:
                if out in self.bundle.kind.optional:
                    continue
                raise SecretError(
                    f"KV secret {self.kv_path} has no key {key!r} (or {out!r}) for {out}: add it, or map"
                    f" {out} to the right key in source.fields of bundle {self.bundle.name}"
                )
            value = data[chosen]
            if not isinstance(value, str) or not value.strip():
                raise SecretError(
                    f"KV secret {self.kv_path} key {chosen!r} for {out} must be non-empty PEM text"
                )
            text = value if value.endswith("\n") else value + "\n"
            files[out] = text.encode("utf-8")
        return files
