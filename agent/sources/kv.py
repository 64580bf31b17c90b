"""A bundle from a KV secret: KV v1 or v2 detected from the mount, keys mapped to output files.

Change detection: KV v2 through metadata `current_version` and its `created_time` (a version number alone repeats
when a secret is deleted and recreated, or Vault is restored); KV v1 (no versions) through a content digest.
Every answer is checked for the shape Vault sends before it is used: anything else is VaultUnavailable (retry).
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from agent import kinds, kvstore
from agent.errors import SecretError
from agent.kvstore import KVMount
from agent.sources.base import Fetched, digest
from agent.text import shown
from agent.vault import field

if TYPE_CHECKING:
    from agent.config import AgentConfig, BundleConfig
    from agent.vault import Vault

__all__ = ["KVSource", "open"]


def open(bundle: BundleConfig, vault: Vault, cfg: AgentConfig) -> KVSource:
    """The KV source of `bundle`, polled every `sidecar.poll_interval`."""
    return KVSource(vault, bundle, poll_interval=bundle.interval(cfg.sidecar))


#: RFC 3339 as KV v2 writes created_time: seconds, an optional fraction (nanoseconds), Z or an offset
_STAMP = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)?", re.ASCII)


def _timestamp(text: object) -> float | None:
    """KV v2's created_time (RFC 3339 with nanoseconds) as Unix seconds; None when absent or odd (never a guess)."""
    match = _STAMP.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        return None
    head, frac, zone = match.groups()
    try:
        when = dt.datetime.fromisoformat(head + ("+00:00" if zone in (None, "Z") else zone))
    except ValueError:
        return None
    digits = (frac or "")[:9]
    return when.timestamp() + (int(digits) / 10 ** len(digits) if digits else 0.0)


class KVSource:
    """Reads one bundle's KV secret through the agent's Vault session (a `Source`)."""

    def __init__(self, vault: Vault, bundle: BundleConfig, *, poll_interval: float = 30.0) -> None:
        from agent.config import KvVariant, RemoteSecretBundle

        assert isinstance(bundle.source, KvVariant)
        self.vault = vault
        self.bundle = bundle
        self.kind = kinds.of(bundle)
        #: the remote cluster whose kubeconfig this is (remote-secret bundles), else None; "" for the set of a bundle
        #: with target files and no cluster (every key of the secret is a cluster)
        self.cluster = (bundle.cluster or "") if isinstance(bundle, RemoteSecretBundle) else None
        self.kv_path = bundle.source.kv.strip("/")
        self.poll_interval = poll_interval
        self._mount: KVMount | None = None

    def reset(self) -> None:
        """Detect the KV mount and its version again at the next call (Vault may have been restored)."""
        self._mount = None

    def next_check(self, last: Fetched | None, now: float) -> float:
        """Every poll_interval (the worker puts the first look after start at a random phase, which spreads a fleet)."""
        return now + self.poll_interval

    async def revision(self) -> str | None:
        """KV v2: `version@created_time` of the current version, from metadata (no secret bytes); None for KV v1.

        Also None when the policy does not allow reading metadata: the worker then reads the secret.
        """
        m = await self.mount()
        if m.version != 2:
            return None
        action = f"reading the metadata of KV path {shown(self.kv_path)}"
        try:
            body = await self.vault.request("GET", f"/v1/{m.path}/metadata/{m.secret}", action=action)
        except SecretError:
            return None
        data = self._field(body or {}, "data", dict, action)
        current = self._field(data, "current_version", int, action)
        versions = self._field(data, "versions", dict, action, optional=True) or {}
        entry = versions.get(str(current))
        created = entry.get("created_time", "") if isinstance(entry, dict) else ""
        return f"{current}@{created if isinstance(created, str) else ''}"

    def _field(
        self, data: Mapping[str, Any], key: str, kind: type | tuple[type, ...], action: str, *, optional: bool = False
    ) -> Any:
        return field(data, key, kind, address=self.vault.address, action=action, optional=optional)

    # -- reading ----------------------------------------------------------------------------------------------
    async def mount(self) -> KVMount:
        """Find the KV mount and its version (`kvstore.find_mount`), once until `reset`."""
        if self._mount is None:
            first = self.kv_path.split("/")[0]
            fix = (
                f"check that {shown(first)} is a KV mount and that the agent's policy grants read on the path;"
                f" source.kv of bundle {self.bundle.name} must be MOUNT/PATH of a KV v1 or v2 secret"
            )
            self._mount = await kvstore.find_mount(self.vault, self.kv_path, fix=fix)
        return self._mount

    async def fetch(self) -> Fetched:
        """Read the secret and map its keys to the bundle's files.

        Raises:
            SecretError: path missing, permission denied, or a required key missing or not text.
            ResponseTooLarge: the answer is over limits.max_secret_size (it is not read beyond that).
            VaultUnavailable: Vault unreachable or sealed, or an answer that is not Vault's; retry.
        """
        m = await self.mount()
        hint = (
            f"check that the secret exists and that the agent's policy grants read on {shown(m.policy_path)},"
            f" or fix source.kv of bundle {self.bundle.name}"
        )
        action = f"reading KV v{m.version} path {shown(self.kv_path)}"
        version: int | None = None
        revision: str | None = None
        created: float | None = None
        body = await self.vault.request("GET", m.data_url, action=action, hint=hint) or {}
        if m.version == 2:
            inner = self._field(body, "data", dict, action)
            meta = self._field(inner, "metadata", dict, action)
            if meta.get("deletion_time") or meta.get("destroyed") is True:
                raise SecretError(f"the current version of KV secret {shown(self.kv_path)} is deleted; {hint}")
            data = self._field(inner, "data", dict, action, optional=True) or {}
            version = self._field(meta, "version", int, action)
            created_text = meta.get("created_time") if isinstance(meta.get("created_time"), str) else ""
            revision = f"{version}@{created_text}"
            created = _timestamp(created_text)
        else:
            data = self._field(body, "data", dict, action, optional=True) or {}
        files = self._map(data)
        return Fetched(files=files, digest=digest(files), revision=revision, version=version, created_at=created)

    def _map(self, data: Mapping[str, Any]) -> dict[str, bytes]:
        """Output file -> bytes: the configured key, else a key named like the file (`ca-key.pem`)."""
        if self.cluster == "":
            if not data:
                raise SecretError(
                    f"KV secret {shown(self.kv_path)} holds no key: store one key per remote cluster, the `data` of"
                    f" `istioctl create-remote-secret --name=CLUSTER` (bundle {self.bundle.name})"
                )
            return {k: v for key in data for k, v in self._remote_secret(data, key).items()}
        if self.cluster is not None:
            return self._remote_secret(data, self.cluster)
        files: dict[str, bytes] = {}
        for out, key in self.bundle.files.items():
            chosen = key if key in data else out if out in data else None
            if chosen is None:
                if out in self.kind.optional:
                    continue
                raise SecretError(
                    f"KV secret {shown(self.kv_path)} has no key {shown(key)!r} (or {out!r}) for {out}: add it, or"
                    f" map {out} to the right key in source.fields of bundle {self.bundle.name}"
                )
            value = data[chosen]
            if not isinstance(value, str) or not value.strip():
                raise SecretError(
                    f"KV secret {shown(self.kv_path)} key {shown(chosen)!r} for {out} must be non-empty PEM text"
                )
            try:
                raw = value.encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate (\ud800) that JSON allows and UTF-8 does not
                raise SecretError(
                    f"KV secret {shown(self.kv_path)} key {shown(chosen)!r} for {out} is not valid text; store PEM"
                ) from None
            files[out] = raw if raw.endswith(b"\n") else raw + b"\n"
        return files

    def _remote_secret(self, data: Mapping[str, Any], cluster: str) -> dict[str, bytes]:
        """{cluster: kubeconfig}: the `data` map of istioctl's remote secret, its value base64 or plain text."""
        from agent.validate.kubeconfig import decode_value

        value = data.get(cluster)
        if not isinstance(value, str) or not value.strip():
            raise SecretError(
                f"KV secret {shown(self.kv_path)} has no non-empty key {shown(cluster)!r}: store the `data` (or"
                f" `stringData`) of `istioctl create-remote-secret --name={shown(cluster)}` there, or fix cluster"
                f" of bundle {self.bundle.name}"
            )
        try:
            raw = value.encode("utf-8")
        except UnicodeEncodeError:
            raise SecretError(f"KV secret {shown(self.kv_path)} key {shown(cluster)!r} is not valid text") from None
        return {cluster: decode_value(raw)}
