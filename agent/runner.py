"""One run path for both modes: `Agent.run()` starts a worker per bundle; `once` (init mode) ends after each
bundle's first publish, otherwise the token keeper, file watcher and health server join them.

Every component is a named task under `supervise`: the first to fail stops the rest and is reported once.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Awaitable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any

from agent import kinds, publish
from agent.config import FileBundle, IstioCaBundle
from agent.keeper import TokenKeeper
from agent.log import get_logger
from agent.sources import open_source
from agent.supervisor import supervise
from agent.targets import open_target
from agent.targets.secret import KubeLoader
from agent.validate import Limits
from agent.vault import Vault
from agent.worker import BundleState, BundleWorker

if TYPE_CHECKING:
    from agent.config import AgentConfig
    from agent.kube import EventRecorder
    from agent.metrics import Metrics

__all__ = ["EXIT_STOPPED", "Agent", "run"]

#: exit code when SIGTERM/SIGINT ends init mode before every bundle was published (128 + SIGTERM)
EXIT_STOPPED = 143
#: how long shutdown waits for Kubernetes calls in flight (each is bounded by its own request timeout, far longer);
#: short, and spent alongside the Events' grace, so that SIGTERM still exits within a second (docs/concepts.md)
_DRAIN_SECONDS = 0.5


class Agent:
    """The components of one agent process and the state they share; build it inside the event loop."""

    def __init__(self, cfg: AgentConfig, *, once: bool) -> None:
        from agent.metrics import Metrics

        self.cfg = cfg
        self.once = once
        self.metrics: Metrics
        self.events: EventRecorder | None
        if once:
            # init mode: no health server, no Events, no reloads (the consumer has not started yet)
            self.metrics, self.events = Metrics(), None
        else:
            from agent.kube import EventRecorder
            from agent.metrics import PrometheusMetrics

            workload_ttl = {b.name: b.workload_ttl for b in cfg.bundles if isinstance(b, IstioCaBundle)}
            self.metrics, self.events = PrometheusMetrics(workload_ttl), EventRecorder(cfg.kubernetes)
        self.vault = Vault(cfg.vault, metrics=self.metrics, max_response_bytes=cfg.limits.max_secret_size)
        self.keeper = TokenKeeper(cfg.auth, self.vault, self.metrics)
        limits = Limits(max_file_bytes=cfg.limits.max_file_size, max_certs_per_file=cfg.limits.max_certs_per_file)
        #: the Kubernetes client of remote-secret bundles (loaded only when one publishes)
        self.kube = KubeLoader(cfg.kubernetes)
        self.workers = [
            BundleWorker(
                b,
                source=open_source(b, self.vault, cfg),
                target=open_target(b, cfg, self.kube),
                vault=self.vault,
                keeper=self.keeper,
                metrics=self.metrics,
                init_timeout=cfg.init.timeout,
                retry_interval=b.interval(cfg.sidecar),
                limits=limits,
                events=self.events,
                mesh=cfg.istio.mesh,
            )
            for b in cfg.bundles
        ]
        # before anything is written: bundle dirs that alias, nest or point into a generation are refused
        publish.check_dirs(
            [(f"bundles[{i}].dir", b.dir) for i, b in enumerate(cfg.bundles) if isinstance(b, FileBundle)]
        )
        self.stop = asyncio.Event()
        self.health_port: int | None = None
        self._log = get_logger()

    @property
    def bundles(self) -> Sequence[BundleState]:
        """Each bundle's state, for the health server."""
        return [w.state for w in self.workers]

    @property
    def vault_node(self) -> tuple[str | None, float | None]:
        """What the Vault node said of itself when a failure last made a worker ask (sys/health), and when."""
        return self.vault.node_state, self.vault.node_state_at

    def alive(self) -> bool:
        """False once stopping, or when a worker's cycle has run for 9 x vault.timeout (a wedge): a cycle is a handful
        of requests, each bounded by vault.timeout, so its length does not grow with the poll interval."""
        limit = 9 * self.cfg.vault.timeout
        now = time.monotonic()
        return not self.stop.is_set() and not any(w.stalled(now, limit) for w in self.workers)

    async def run(self) -> bool:
        """Publish every bundle (and, unless `once`, keep them current) until done or `stop` is set.

        Returns False when `stop` ended init mode before every bundle was published.

        Raises:
            AgentError: a final failure (init mode), no first publish within init.timeout, or a component
                that failed; the message is the one line to show.
        """
        tasks: dict[str, Coroutine[Any, Any, None]] = {
            f"worker {w.cfg.name}": w.run(once=self.once) for w in self.workers
        }
        if self.once:
            try:
                await supervise(tasks, stop=self.stop, until_all_done=True)
            finally:
                await self.kube.drain(_DRAIN_SECONDS)
                await self.vault.close()
            if self.stop.is_set():
                return False
            self._log.info("init_done", bundles=[b.name for b in self.cfg.bundles])
            return True
        tasks["health server"] = self._serve_health()
        tasks["sidecar"] = self._after_first_pass()
        try:
            await supervise(tasks, stop=self.stop, until_all_done=False)
        finally:
            # at the same time, not one after the other: each waits up to half a second for calls in flight
            closing: list[Awaitable[object]] = [self.kube.drain(_DRAIN_SECONDS)]
            if self.events is not None:
                closing.append(self.events.close())
            closing.append(self.vault.close())
            await asyncio.gather(*closing)
            self._log.info("sidecar_stopped")
        return True

    async def _serve_health(self) -> None:
        from agent import aio

        aio.load()  # before agent.health imports aiohttp.web: without the TLS contexts aiohttp builds at import
        from agent import health
        from agent.metrics import PrometheusMetrics

        assert isinstance(self.metrics, PrometheusMetrics)
        app = health.make_app(self, self.metrics, alive=self.alive)

        def listening(port: int) -> None:
            self.health_port = port
            self._log.info("health_listening", listen=self.cfg.health.listen, port=port)

        await health.serve(app, self.cfg.health.listen, on_listening=listening)

    async def _after_first_pass(self) -> None:
        """Once every bundle is published: renew the token and watch the files, as long as the workers run."""
        from agent.watch import FileWatcher

        await asyncio.gather(*(w.published.wait() for w in self.workers))
        self.keeper.settle()  # from now on a token-file problem is retried, never final
        self._log.info("sidecar_ready", bundles=[b.name for b in self.cfg.bundles])
        await self._prune_remote_secrets()
        watcher = FileWatcher(
            [w for w in self.workers if w.kind.target == "files"],
            poll_interval=self.cfg.sidecar.poll_interval, metrics=self.metrics,
        )
        await supervise(
            {"token keeper": self.keeper.run(), "file watcher": watcher.run()},
            stop=asyncio.Event(),
            until_all_done=False,
        )

    async def _prune_remote_secrets(self) -> None:
        """Once every bundle is live: delete the agent's Secrets whose bundle left the config with prune: true.

        Only with remote-secret bundles configured (the agent then has the RBAC); a failure is logged, not fatal.
        """
        from agent.errors import AgentError
        from agent.targets.secret import prune

        if not any(kinds.of(b).target == "secret" for b in self.cfg.bundles):
            return
        try:
            deleted = await prune(self.kube, self.cfg.bundles, self.cfg.kubernetes)
        except AgentError as exc:
            self.metrics.error("-", exc.reason)
            self._log.warning("remote_secret_prune_failed", reason=str(exc))
            return
        for name in deleted:
            self._log.info("remote_secret_pruned", object=name)
            if self.events is not None:
                self.events.record("RemoteSecretPruned", f"Secret {name} deleted: its bundle left the config")


def _resync(agent: Agent) -> None:
    get_logger().info("resync_requested", signal="SIGHUP", bundles=[w.cfg.name for w in agent.workers])
    for worker in agent.workers:
        worker.resync()


def _ignored(sig: signal.Signals) -> None:
    get_logger().info("signal_ignored", signal=sig.name)


def run(cfg: AgentConfig, *, once: bool) -> int:
    """Run the agent until done (init mode) or SIGTERM/SIGINT (sidecar mode); returns the exit code.

    Raises:
        AgentError: as `Agent.run`.
    """

    async def main() -> int:
        from agent.log import loop_exception_handler

        agent = Agent(cfg, once=once)
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(loop_exception_handler)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, agent.stop.set)
        # SIGHUP: what a user sends for a reload: every bundle is synced now; SIGUSR1/2: said and ignored (their
        # default action would kill the agent without a word)
        loop.add_signal_handler(signal.SIGHUP, _resync, agent)
        for sig in (signal.SIGUSR1, signal.SIGUSR2):
            loop.add_signal_handler(sig, _ignored, sig)
        finished = await agent.run()
        return 0 if finished else EXIT_STOPPED

    return asyncio.run(main())
