"""In-process rigs for the token keeper, the worker and the KV source: the agent's own Vault session and
TokenKeeper, in the test's event loop, against the shared real OpenBao through a counting proxy (no agent
subprocess, no mocked Vault).

A `Rig` owns a KV v2 mount, a read policy and a kubernetes auth role (its token TTLs as asked) on the shared
server, a service-account token file minted by the Kubernetes API stand-in, and an HTTPProxy that records every
request the agent sends, so a test can count logins, renewals and reads.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import hvac

from agent.config import AgentConfig, from_mapping
from agent.keeper import TokenKeeper
from agent.metrics import Metrics
from agent.vault import Vault
from testbed.bao import BaoServer
from tests.faultkit import HTTPProxy
from tests.support import KV2Layout, agent_config

T = TypeVar("T")


class CountingMetrics(Metrics):
    """Metrics that remember what a user would see move: each token login or renewal (when, and its TTL)."""

    def __init__(self) -> None:
        self.tokens: list[tuple[float, float]] = []
        self.errors: list[tuple[str, str]] = []

    def token_login(self, login: object | None) -> None:
        self.tokens.append((time.monotonic(), float(getattr(login, "ttl", 0.0))))

    def error(self, bundle: str, reason: str) -> None:
        self.errors.append((bundle, reason))


@dataclass
class Rig:
    """One test's own layout on the shared OpenBao, the proxy the agent talks through, and its token file."""

    server: BaoServer
    layout: KV2Layout
    proxy: HTTPProxy
    token: Path
    tmp: Path
    admin: hvac.Client
    metrics: CountingMetrics = field(default_factory=CountingMetrics)
    #: where this rig's requests start in the (shared) proxy's log
    start: int = 0
    _bodies_start: int = 0

    def __post_init__(self) -> None:
        self.start = len(self.proxy.requests)
        self._bodies_start = len(self.proxy.bodies)

    # -- what the agent sent ----------------------------------------------------------------------------------
    @property
    def login_path(self) -> str:
        return f"/v1/auth/{self.layout.auth_mount}/login"

    @property
    def data_path(self) -> str:
        return f"/v1/{self.layout.kv_mount}/data/{self.layout.secret_path}"

    @property
    def meta_path(self) -> str:
        return f"/v1/{self.layout.kv_mount}/metadata/{self.layout.secret_path}"

    def mark(self) -> int:
        """A bookmark in the request log: `sent(path, since=mark)` counts only what came after it."""
        return len(self.proxy.requests)

    def requests(self, since: int | None = None) -> list[tuple[str, str]]:
        """(method, path) of each request the agent sent since the bookmark (default: since the rig was made)."""
        return self.proxy.requests[self.start if since is None else since :]

    def sent(self, path: str, since: int | None = None) -> int:
        """How many requests to `path` (query string ignored) the agent sent since the bookmark."""
        return sum(1 for _, p in self.requests(since) if p.split("?")[0] == path)

    def logins(self, since: int | None = None) -> int:
        return self.sent(self.login_path, since)

    def renewals(self, since: int | None = None) -> int:
        return self.sent("/v1/auth/token/renew-self", since)

    def jwts_sent(self) -> list[bytes]:
        """The body of each login request (it carries the service-account JWT)."""
        return [body for _, path, body in self.proxy.bodies[self._bodies_start :] if path == self.login_path]

    # -- the agent's side ----------------------------------------------------------------------------------------
    def config(self, *, poll: str = "300s", out: Path | None = None, kv: str | None = None,
               **bundle: Any) -> AgentConfig:
        raw = agent_config(address=self.proxy.address, token_path=self.token, out=out or self.tmp / "out",
                           kv=kv or self.layout.kv, mount=self.layout.auth_mount, poll=poll, timeout="2s", **bundle)
        return from_mapping(raw, env={})

    def run(self, body: Callable[[Vault, TokenKeeper], Awaitable[T]], cfg: AgentConfig | None = None) -> T:
        """Run `body(vault, keeper)` in a fresh event loop with the agent's Vault session and TokenKeeper."""
        cfg = cfg or self.config()

        async def main() -> T:
            vault = Vault(cfg.vault, metrics=self.metrics, max_response_bytes=cfg.limits.max_secret_size, env={})
            keeper = TokenKeeper(cfg.auth, vault, self.metrics)
            try:
                return await body(vault, keeper)
            finally:
                await vault.close()

        return asyncio.run(main())

    # -- Vault's side -------------------------------------------------------------------------------------------
    def write(self, files: Mapping[str, bytes]) -> int:
        return self.layout.write(self.admin, files)

    def revoke(self, accessor: str) -> None:
        """Revoke the agent's token by its accessor, as an operator (or a Vault restore) would."""
        self.admin.auth.token.revoke_accessor(accessor)


def make_rig(
    server: BaoServer, proxy: HTTPProxy, kube: Any, token: Path, tmp: Path, unique: str,
    files: Mapping[str, bytes] | None, **ttls: str,
) -> Rig:
    """A Rig with its own KV v2 mount and auth role (`token_ttl`, `token_max_ttl` as given) on `server`, reached
    through `proxy` (one per test module: closing one costs half a second)."""
    admin = server.client()
    layout = KV2Layout.unique(unique).setup(admin, kube, files, **ttls)
    return Rig(server, layout, proxy, token, tmp, admin)
