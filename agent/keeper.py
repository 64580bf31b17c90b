"""The TokenKeeper: the one owner of the agent's Vault token.

It logs in when asked for a token and there is none, renews at 2/3 of the TTL, logs in again after max TTL or
when a worker finds the token refused (403). A rotated service-account token file costs no login: the file is
read at the next login the agent needs. Each new login gets a new `generation`.
The Vault session asks it for the token at the moment each request is sent (`token`).
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from agent import auth
from agent.errors import AgentError
from agent.log import get_logger
from agent.supervisor import wait_event

if TYPE_CHECKING:
    from agent.config import AuthConfig
    from agent.metrics import Metrics
    from agent.vault import Vault

__all__ = ["MIN_RENEW_INTERVAL", "TINY_LEASE", "TokenKeeper"]

# A token this close to its lease end is not handed out; a new login is cheaper than a 403 mid-cycle. For short
# leases the margin is a sixth of the lease, so that it starts after the renewal at 2/3 and its round trip: a worker
# asking for a token while that renewal is on its way keeps the token in hand instead of logging in.
_EXPIRY_MARGIN = 1.0
# After a failed re-login in the renewal loop, wait this long before trying again (workers retry on their own).
_RELOGIN_RETRY = 5.0
#: renewals (and re-logins from the renewal loop) are never closer than this, whatever lease Vault grants
MIN_RENEW_INTERVAL = 1.0
#: a lease shorter than this is logged (once): the agent cannot keep such a token alive between its requests
TINY_LEASE = 2.0


class TokenKeeper:
    """Hands out a valid Vault token to the workers; in sidecar mode `run()` keeps it valid.

    Until `settle()` (every bundle published once), a token file that cannot be read is a ConfigError: the
    agent stops and says what to fix. After it, the same problem is CredentialUnavailable: retried, the Vault token
    in hand stays in use until a new login succeeds, and the sidecar never exits for it.
    """

    def __init__(self, cfg: AuthConfig, vault: Vault, metrics: Metrics) -> None:
        self.cfg = cfg
        self.vault = vault
        self.metrics = metrics
        self.login: auth.Login | None = None
        #: increases with every new login
        self.generation = 0
        #: every bundle was published once: token-file problems are retried from now on
        self.settled = False
        self._lock = asyncio.Lock()
        self._changed = asyncio.Event()
        self._last_renewal = float("-inf")
        self._tiny_reported = False
        self._log = get_logger()
        vault.token = self.token

    def token(self) -> str:
        """The current Vault token ("" before the first login); never logged."""
        return self.login.token if self.login is not None else ""

    def settle(self) -> None:
        """Every bundle was published once: from now on a token-file problem is retried, never final."""
        self.settled = True

    async def ensure(self) -> int:
        """Log in unless there is a token far enough from its lease end; returns the login's generation.

        Raises:
            ConfigError / CredentialUnavailable / AuthError / VaultUnavailable: as `auth.login`.
        """
        async with self._lock:
            current = self.login
            if current is None or time.time() >= current.expires_at - min(_EXPIRY_MARGIN, current.ttl / 6):
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
            if self.login is not None and await auth.lookup_self(self.vault, self.login.token):
                return False
            await self._login_locked()
            return True

    async def run(self) -> None:
        """Renew at 2/3 of the TTL; log in again when renewal fails or max TTL is near.

        Renewals and re-logins from here are never closer than MIN_RENEW_INTERVAL apart.
        """
        while True:
            self._changed.clear()
            pause = self._last_renewal + MIN_RENEW_INTERVAL - time.monotonic()
            login = self.login
            if login is None or not login.ttl:
                await self._wait(3600)
                continue
            due = max(login.obtained_at + login.ttl * 2 / 3 - time.time(), pause)
            if due > 0:
                await self._wait(due)
                continue
            self._last_renewal = time.monotonic()
            await self._renew_or_relogin(login)

    # -- internals ----------------------------------------------------------------------------------------
    async def _wait(self, seconds: float) -> None:
        """Sleep `seconds`, or less when the login changed."""
        await wait_event(self._changed, seconds)

    async def _login_locked(self) -> None:
        # the token in hand stays in use (and is sent) until the new login succeeds
        login = await auth.login(self.vault, self.cfg, settled=self.settled)
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
        if login.ttl and login.ttl < TINY_LEASE and not self._tiny_reported:
            self._tiny_reported = True
            self._log.warning(
                "token_lease_tiny", ttl=login.ttl,
                reason=f"Vault grants the agent's token a lease of {login.ttl:g}s; the agent renews at most once a"
                " second and logs in again when needed: raise the role's token_ttl",
            )
        self._changed.set()

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
                renewed = await auth.renew(self.vault, login)
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
