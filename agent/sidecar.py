"""Sidecar mode: the init pass, then keep every bundle current until SIGTERM.

Root tasks in one TaskGroup: a poll loop per bundle, the token renewer, the file watchers and the health
server. hvac blocks, so Vault calls run in daemon threads under one lock (a cancelled task cannot stop a
thread, and a daemon thread cannot hold up the exit); publishes and repairs share that lock too.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from agent.config import NoReload, RolloutRestartReload
from agent.errors import AgentError, AuthError, BundleError, ConfigError, SecretError, VaultError, VaultUnavailable
from agent.log import get_logger
from agent.runner import Agent, BundleState, SyncResult, backoff_delays
from agent.threads import in_daemon_thread

if TYPE_CHECKING:
    from agent.config import AgentConfig

__all__ = ["Sidecar", "run_sidecar"]

T = TypeVar("T")


class Sidecar:
    """Keeps the bundles of one Agent current; `run()` returns when `stop` is set."""

    def __init__(self, cfg: AgentConfig, agent: Agent | None = None) -> None:
        from agent.metrics import PrometheusMetrics

        self.cfg = cfg
        self.metrics = PrometheusMetrics()
        self.agent = agent or Agent(cfg, self.metrics)
        self.stop = asyncio.Event()
        self.lock = asyncio.Lock()
        self.relogin = asyncio.Event()
        self.login_changed = asyncio.Event()
        self.wake: dict[str, asyncio.Event] = {b.name: asyncio.Event() for b in cfg.bundles}
        self.log = get_logger()
        self.health_port: int | None = None
        self.started = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []
        self._kube: Any = None
        self._background: set[asyncio.Task[Any]] = set()
        self.tamper_or_token = asyncio.Event()
        #: the token accessor each bundle was last synced with (a new login forces a full read)
        self._synced_with: dict[str, str] = {}
        self._refused_reported: dict[str, str | None] = {}

    # -- helpers ----------------------------------------------------------------------------------------
    async def _sleep(self, seconds: float, *also: asyncio.Event) -> None:
        """Sleep `seconds`, or less when stop (or one of `also`) is set."""
        waiters = [asyncio.ensure_future(e.wait()) for e in (self.stop, *also)]
        try:
            await asyncio.wait(waiters, timeout=max(0.0, seconds), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()

    def alive(self) -> bool:
        return not self.stop.is_set() and all(not t.done() for t in self._tasks)

    async def vault(self, fn: Callable[[], T]) -> T:
        async with self.lock:
            return await in_daemon_thread(fn)

    async def _login(self) -> None:
        await self.vault(lambda: self.agent.ensure_login(force=True))
        self.metrics.token_login(self.agent.login)
        self.login_changed.set()

    def _token_accepted(self) -> bool:
        """Whether Vault still accepts the agent's token (lookup-self, which every token may call)."""
        from agent import vault

        client = self.agent.client
        try:
            vault.call(client.auth.token.lookup_self, address=client.url, action="looking up the agent's Vault token")
        except SecretError:  # 403: revoked, expired, or unknown to a restarted Vault
            return False
        return True

    # -- per bundle -------------------------------------------------------------------------------------
    async def _sync(self, st: BundleState) -> SyncResult:
        first = st.good is None
        before = self.agent.login
        name = st.cfg.name

        def sync() -> SyncResult:
            login = self.agent.ensure_login()
            # After a new login, read in full: Vault may have been restored or restarted, or the secret
            # recreated, so an equal KV v2 version number no longer proves the content is the same.
            same_login = self._synced_with.get(name) == login.accessor
            result = self.agent.sync(st, check_version=not first and same_login)
            self._synced_with[name] = login.accessor
            return result

        try:
            return await self.vault(sync)
        except VaultError as exc:
            # A revoked or expired token reads as permission denied: log in again once, then retry. Only then:
            # a missing secret or a policy gap would otherwise mint a new token (and lease) at every retry.
            if isinstance(exc, AuthError) or await self.vault(self._token_accepted):
                raise
            await self._login()
            return await self.vault(sync)
        finally:
            if self.agent.login is not before:
                self.metrics.token_login(self.agent.login)
                self.login_changed.set()

    async def poll_bundle(self, st: BundleState) -> None:
        """Sync one bundle every poll_interval (+-10 % jitter); back off on failures, never storm."""
        interval = self.cfg.sidecar.poll_interval
        delays = None
        while not self.stop.is_set():
            try:
                result = await self._sync(st)
            except ConfigError:
                raise
            except AgentError as exc:
                delays = delays or backoff_delays(initial=min(1.0, interval), cap=max(interval, 5.0))
                retryable = isinstance(exc, VaultUnavailable)
                if not isinstance(exc, BundleError):
                    st.last_error = str(exc)
                    self.metrics.error(st.cfg.name, exc.reason)
                    self.log.warning("sync_failed", bundle=st.cfg.name, reason=str(exc), retryable=retryable)
                elif self._refused_reported.get(st.cfg.name) != st.refused_digest:
                    # one Event per refused content, not one per poll
                    self._refused_reported[st.cfg.name] = st.refused_digest
                    await self._event("BundleRefused", f"bundle {st.cfg.name}: {exc}", "Warning")
                delay = next(delays) if not isinstance(exc, BundleError) else interval
                await self._sleep(delay, self.wake[st.cfg.name])
                self.wake[st.cfg.name].clear()
                continue
            delays = None
            if result.changed:
                await self._after_publish(st, result)
            if not self.started.is_set() and all(b.good is not None for b in self.agent.bundles):
                self.started.set()
                self.log.info("sidecar_ready", bundles=[b.cfg.name for b in self.agent.bundles])
            await self._sleep(interval * random.uniform(0.9, 1.1), self.wake[st.cfg.name])  # noqa: S311 - jitter
            self.wake[st.cfg.name].clear()

    async def _after_publish(self, st: BundleState, result: SyncResult) -> None:
        from agent import reload

        b = st.cfg
        serial = st.info.serial if st.info else "?"
        await self._event("BundlePublished", f"bundle {b.name} published to {b.dir} (serial {serial})")
        if not isinstance(b.reload, NoReload):
            kube = self._kube_client() if isinstance(b.reload, RolloutRestartReload) else None
            try:
                done = await reload.reload(b, kube=kube)
                self.log.info("bundle_reloaded", bundle=b.name, action=done)
            except AgentError as exc:
                self.metrics.error(b.name, exc.reason)
                self.log.error("reload_failed", bundle=b.name, reason=str(exc))
        if result.root_changed and b.type == "istio-ca" and not b.multiroot:
            self.log.warning(
                "root_changed",
                bundle=b.name,
                reason="root-cert.pem changed: istiod abandons a reload whose root differs unless"
                " ISTIO_MULTIROOT_MESH=true ('Multi root is disabled, updating new ROOT-CA not supported');"
                " set multiroot: true with an overlapping root bundle, or let on_root_change restart istiod",
                on_root_change=b.on_root_change,
            )
            await self._event("RootChanged", f"bundle {b.name}: root-cert.pem changed", "Warning")
            if b.on_root_change == "restart":
                try:
                    done = await reload.restart_on_root_change(b)
                    self.log.warning("consumer_restarted", bundle=b.name, action=done)
                except AgentError as exc:
                    self.metrics.error(b.name, exc.reason)
                    self.log.error("restart_failed", bundle=b.name, reason=str(exc))

    def _kube_client(self) -> Any:
        if self._kube is None:
            from agent.kube import Kube

            self._kube = Kube.maybe() or False
        return self._kube or None

    async def _event(self, reason: str, message: str, kind: str = "Normal") -> None:
        import os

        if not (os.environ.get("POD_NAME") and os.environ.get("POD_NAMESPACE")):
            return
        from agent import kube

        task = asyncio.create_task(kube.emit_event(self._kube_client(), reason, message, kind))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- token ------------------------------------------------------------------------------------------
    async def renew_token(self) -> None:
        """Renew the Vault token at 2/3 of its TTL; log in again when renewal fails or max TTL is near."""
        while not self.stop.is_set():
            self.login_changed.clear()
            if self.relogin.is_set():
                await self._relogin("service account token changed")
                continue
            login = self.agent.login
            if login is None or not login.ttl:
                await self._sleep(3600, self.login_changed, self.relogin)
                continue
            due = login.obtained_at + login.ttl * 2 / 3 - time.time()
            if due > 0:
                await self._sleep(due, self.login_changed, self.relogin)
                continue
            await self._renew_or_relogin(login)

    async def _relogin(self, why: str) -> None:
        self.relogin.clear()
        try:
            await self._login()
            self.log.info("token_relogin", reason=why)
        except AgentError as exc:
            self.metrics.error("-", exc.reason)
            self.log.warning("login_failed", reason=str(exc))
            await self._sleep(5)

    async def _renew_or_relogin(self, login: Any) -> None:
        from agent import auth

        if login.renewable:
            try:
                renewed = await self.vault(lambda: auth.renew(self.agent.client, login))
            except AgentError as exc:
                self.log.info("token_renew_failed", reason=str(exc))
            else:
                if renewed.ttl >= login.ttl / 2:
                    self.agent.login = renewed
                    self.metrics.token_login(renewed)
                    self.log.info("token_renewed", ttl=renewed.ttl)
                    return
                self.agent.login = renewed  # still valid for renewed.ttl; max TTL is near
        await self._relogin("token renewal not possible")

    # -- watchers ---------------------------------------------------------------------------------------
    def _watch(self) -> Any:
        """watchdog observers: the SA token file (kubelet rotates it) and each bundle dir (tamper or loss)."""
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer

        loop = asyncio.get_running_loop()
        observer = Observer()

        class Handler(FileSystemEventHandler):
            def __init__(self, on_event: Callable[[], None]) -> None:
                self.on_event = on_event

            def on_any_event(self, event: Any) -> None:
                if event.event_type in {"opened", "closed_no_write"}:
                    return
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(self.on_event)

        token_path = Path(self.cfg.auth.token_path)
        if self.cfg.auth.method != "token" and token_path.parent.is_dir():
            observer.schedule(Handler(self.tamper_or_token.set), str(token_path.parent), recursive=False)
        for st in self.agent.bundles:
            d = Path(st.cfg.dir)
            d.mkdir(parents=True, exist_ok=True)
            observer.schedule(Handler(self.tamper_or_token.set), str(d), recursive=True)
        observer.daemon = True
        observer.start()
        return observer

    async def watch_files(self) -> None:
        """React to file events: heal tampered bundle dirs, log in again when the SA token changed."""
        from agent import auth

        token_path = self.cfg.auth.token_path
        last_token = self._token_fingerprint(token_path)
        while not self.stop.is_set():
            await self._sleep(3600, self.tamper_or_token)
            if self.stop.is_set():
                return
            await asyncio.sleep(0.1)  # debounce: kubelet and editors write in several steps
            self.tamper_or_token.clear()
            async with self.lock:
                for st in self.agent.bundles:
                    try:
                        if await in_daemon_thread(functools.partial(self.agent.repair, st)):
                            await self._event("BundleRepaired", f"bundle {st.cfg.name} was changed on disk; restored")
                    except AgentError as exc:
                        self.log.error("repair_failed", bundle=st.cfg.name, reason=str(exc))
            token = self._token_fingerprint(token_path)
            if self.cfg.auth.method != "token" and token != last_token and token is not None:
                last_token = token
                self.log.info("sa_token_changed", token_path=token_path, mount=auth.mount_of(self.cfg.auth))
                self.relogin.set()

    @staticmethod
    def _token_fingerprint(path: str) -> str | None:
        import hashlib

        try:
            return hashlib.sha256(Path(path).read_bytes()).hexdigest()
        except OSError:
            return None

    # -- lifecycle --------------------------------------------------------------------------------------
    async def run(self) -> None:
        """Serve health, then poll, renew and watch until `stop` is set."""
        from agent import health

        app = health.make_app(self.agent, self.metrics, alive=self.alive)
        runner = await health.start(app, self.cfg.health.listen)
        self.health_port = health.bound_port(runner)
        self.log.info("health_listening", listen=self.cfg.health.listen, port=self.health_port)
        observer = self._watch()
        try:
            async with asyncio.TaskGroup() as tg:
                self._tasks = [tg.create_task(self.poll_bundle(st), name=f"poll:{st.cfg.name}")
                               for st in self.agent.bundles]
                self._tasks.append(tg.create_task(self.renew_token(), name="renew-token"))
                self._tasks.append(tg.create_task(self.watch_files(), name="watch-files"))
                await self.stop.wait()
                for t in self._tasks:
                    t.cancel()
        finally:
            observer.stop()
            await runner.cleanup()
            for t in list(self._background):
                t.cancel()
            self.log.info("sidecar_stopped")


def run_sidecar(cfg: AgentConfig) -> int:
    """Run sidecar mode until SIGTERM/SIGINT; returns the exit code (0 on a clean stop)."""

    async def main() -> int:
        sidecar = Sidecar(cfg)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, sidecar.stop.set)
        try:
            await sidecar.run()
        except* ConfigError as eg:
            raise eg.exceptions[0] from None
        return 0

    return asyncio.run(main())
