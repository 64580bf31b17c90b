"""The TokenKeeper: the one owner of the agent's Vault token.

It logs in when asked for a token and there is none, renews at 2/3 of the TTL, logs in again after max TTL,
when the service-account token file changes, or when a worker finds the token refused (403). Each new
login gets a new `generation`, so a worker knows whether its last full read was made under the same login.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from agent import auth
from agent.errors import AgentError, PermissionDenied
from agent.log import get_logger

if TYPE_CHECKING:
    from agent.config import AuthConfig
    from agent.metrics import Metrics
    from agent.vault import VaultGate

__all__ = ["TokenKeeper"]

# A token this close to its lease end is not handed out; a new login is cheaper than a 403 mid-cycle.
_EXPIRY_MARGIN = 1.0
# After a failed re-login in the renewal loop, wait this long before trying again (workers retry on their own).
_RELOGIN_RETRY = 5.0


class TokenKeeper:
    """Hands out a valid Vault token to the workers; in sidecar mode `run()` keeps it valid."""

    def __init__(self, cfg: AuthConfig, gate: VaultGate, metrics: Metrics) -> None:
        self.cfg = cfg
        self.gate = gate
        self.metrics = metrics
        self.login: auth.Login | None = None
        #: increases with every new login
        self.generation = 0
        self._lock = asyncio.Lock()
        self._changed = asyncio.Event()
        self._relogin = asyncio.Event()
        self._log = get_logger()

    async def ensure(self) -> int:
        """Log in unless there is a token far enough from its lease end; returns the login's generation.

        Raises:
            ConfigError / AuthError / VaultUnavailable: as `auth.login`.
        """
        async with self._lock:
            current = self.login
            if current is None or time.time() >= current.expires_at - _EXPIRY_MARGIN:
                await self._login_locked()
            return self.generation

    async def recover(self, generation: int) -> bool:
        """After a 403 under `generation`: True when the token itself was refused and a new login replaced it.

        A missing path or a policy gap also reads as 403; only a token that lookup-self refuses is replaced,
        so such a failure does not mint a new token (and lease) at every retry.
        """
        async with self._lock:
            if generation != self.generation:
                return True  # someone logged in meanwhile: retry with that token
            if self.login is not None and await self.gate.run(self._token_accepted):
                return False
            await self._login_locked()
            return True

    def sa_token_changed(self) -> None:
        """The service-account token file changed: log in again with the new one (kubelet rotated it)."""
        self._relogin.set()

    async def run(self) -> None:
        """Renew at 2/3 of the TTL; log in again when renewal fails, max TTL is near, or the SA token changed."""
        while True:
            self._changed.clear()
            if self._relogin.is_set():
                self._relogin.clear()
                await self._relogin_now("service account token changed")
                continue
            login = self.login
            if login is None or not login.ttl:
                await self._wait(3600)
                continue
            due = login.obtained_at + login.ttl * 2 / 3 - time.time()
            if due > 0:
                await self._wait(due)
                continue
            await self._renew_or_relogin(login)

    # -- internals ----------------------------------------------------------------------------------------
    async def _wait(self, seconds: float) -> None:
        """Sleep `seconds`, or less when the login changed or a re-login was asked for."""
        changed = asyncio.ensure_future(self._changed.wait())
        relogin = asyncio.ensure_future(self._relogin.wait())
        try:
            await asyncio.wait((changed, relogin), timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            changed.cancel()
            relogin.cancel()

    async def _login_locked(self) -> None:
        self.login = None
        login = await self.gate.run(lambda: auth.login(self.gate.client, self.cfg))
        self._set(login)
        self._log.info(
            "vault_login", method=self.cfg.method, mount=auth.mount_of(self.cfg), role=self.cfg.role,
            ttl=login.ttl, renewable=login.renewable,
        )

    def _set(self, login: auth.Login, *, new: bool = True) -> None:
        self.login = login
        if new:
            self.generation += 1
        self.metrics.token_login(login)
        self._changed.set()

    def _token_accepted(self) -> bool:
        """Whether Vault still accepts the agent's token (lookup-self, which every token may call). Blocks."""
        from agent import vault

        client = self.gate.client
        try:
            vault.call(client.auth.token.lookup_self, address=client.url, action="looking up the agent's Vault token")
        except PermissionDenied:  # 403: revoked, expired, or unknown to a restarted Vault
            return False
        return True

    async def _relogin_now(self, why: str) -> None:
        try:
            async with self._lock:
                await self._login_locked()
            self._log.info("token_relogin", reason=why)
        except AgentError as exc:
            self.metrics.error("-", exc.reason)
            self._log.warning("login_failed", reason=str(exc))
            await self._wait(_RELOGIN_RETRY)

    async def _renew_or_relogin(self, login: auth.Login) -> None:
        if login.renewable:
            try:
                renewed = await self.gate.run(lambda: auth.renew(self.gate.client, login))
            except AgentError as exc:
                self._log.info("token_renew_failed", reason=str(exc))
            else:
                async with self._lock:
                    if self.login is not login:
                        return  # a worker logged in meanwhile
                    self._set(renewed, new=False)
                if renewed.ttl >= login.ttl / 2:
                    self._log.info("token_renewed", ttl=renewed.ttl)
                    return
                # still valid for renewed.ttl, but max TTL is near: log in again now
        await self._relogin_now("token renewal not possible")
