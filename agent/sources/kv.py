"""A bundle from a KV secret: KV v1 or v2 detected from the mount, keys mapped to output files.

Change detection: KV v2 through metadata `current_version` and its `created_time` (a version number alone repeats
when a secret is deleted and recreated, or Vault is restored); KV v1 (no versions) through a content digest.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from agent import vault
from agent.errors import SecretError

if TYPE_CHECKING:
    import hvac

    from agent.config import BundleConfig

__all__ = ["Fetched", "KVSource", "digest"]

#: files a bundle may lack; everything else is required
OPTIONAL_FILES = frozenset({"ca.crt", "ca-crl.pem"})


def digest(files: Mapping[str, bytes]) -> str:
    """A stable sha256 over the file names and bytes, to see whether content changed (never logged raw)."""
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(name.encode() + b"\0" + files[name] + b"\0")
    return h.hexdigest()


@dataclass(frozen=True)
class Fetched:
    """What one read returned: output file -> bytes, the KV v2 version (None for v1) and the content digest.

    `revision` is `version@created_time` for KV v2, what `current_revision()` compares against.
    """

    files: dict[str, bytes]
    version: int | None
    digest: str
    revision: str | None = None

    def __repr__(self) -> str:  # the files hold a private key
        return f"Fetched(files={sorted(self.files)}, version={self.version}, digest={self.digest[:12]})"


@dataclass
class _Mount:
    path: str  # mount path without trailing slash
    version: int  # 1 or 2


class KVSource:
    """Reads one bundle's KV secret with an authenticated hvac client."""

    def __init__(self, client: hvac.Client, bundle: BundleConfig) -> None:
        self.client = client
        self.bundle = bundle
        self.kv_path = bundle.source.kv.strip("/")
        self._mount: _Mount | None = None

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
        return Fetched(files=files, version=version, digest=digest(files), revision=revision)

    def _map(self, data: Mapping[str, Any]) -> dict[str, bytes]:
        """Output file -> bytes: the configured key, else a key named like the file (`ca-key.pem`)."""
        files: dict[str, bytes] = {}
        for out, key in self.bundle.files.items():
            chosen = key if key in data else out if out in data else None
            if chosen is None:
                if out in OPTIONAL_FILES:
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
