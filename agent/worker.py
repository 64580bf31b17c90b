"""One BundleWorker per bundle: schedule, fetch, validate, publish (to its Target), reload; and the bundle's state.

The same loop serves both modes. Until its first publish a worker has init semantics (retry while Vault is
unavailable, give up after init.timeout, which bounds the whole first pass whatever hangs); `once` ends it there.
Vault calls are async (agent.vault); validation and disk work run in `asyncio.to_thread` and return results; only
the event loop changes `BundleState`, which /readyz reads.
"""

from __future__ import annotations

import asyncio
import copy
import datetime as dt
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from agent import rules
from agent.errors import (
    AgentError,
    BundleError,
    ConfigError,
    PermissionDenied,
    ResponseTooLarge,
    StaleRead,
    Unavailable,
)
from agent.log import get_logger
from agent.sources import Fetched
from agent.supervisor import wait_event

if TYPE_CHECKING:
    from agent.config import BundleConfig
    from agent.istio_version import Mesh
    from agent.keeper import TokenKeeper
    from agent.kube import EventRecorder
    from agent.metrics import Metrics
    from agent.sources import Source
    from agent.targets import Target
    from agent.validate import BundleInfo, Limits
    from agent.vault import Vault

__all__ = ["BundleState", "BundleWorker", "backoff_delays"]


def backoff_delays(
    initial: float = 0.5, cap: float = 10.0, rng: Callable[[], float] = random.random
) -> Iterator[float]:
    """Capped exponential backoff with jitter: initial*2^n, capped, times a random factor in [0.5, 1]."""
    n = 0
    while True:
        yield min(cap, initial * (2**n)) * (0.5 + 0.5 * rng())
        n += 1


def _again(err: AgentError) -> AgentError:
    """A fresh copy of a remembered error to raise once more (raising one object again grows its traceback)."""
    return copy.copy(err).with_traceback(None)


@dataclass
class BundleState:
    """What the health server and metrics read of one bundle: what is live, and the last failure."""

    cfg: BundleConfig
    #: the content that is published, as the source returned it
    live: Fetched | None = None
    info: BundleInfo | None = None
    #: when the live content was published (time.time())
    published_at: float | None = None
    last_error: str | None = None
    #: time.monotonic() when the running cycle started; None between cycles
    busy_since: float | None = None

    @property
    def good(self) -> dict[str, bytes] | None:
        """The live files, or None before the first publish."""
        return None if self.live is None else self.live.files

    def __repr__(self) -> str:
        version = None if self.live is None else self.live.version
        return f"BundleState({self.cfg.name}, version={version}, error={self.last_error!r})"


def _content(fetched: Fetched) -> rules.Content:
    return rules.Content(
        digest=fetched.digest, revision=fetched.revision, version=fetched.version, created_at=fetched.created_at,
        files=fetched.files, renewed=fetched.renewed,
    )


def _fetched(content: rules.Content) -> Fetched:
    return Fetched(
        files=dict(content.files), digest=content.digest, revision=content.revision, version=content.version,
        created_at=content.created_at, renewed=content.renewed,
    )


class BundleWorker:
    """Keeps one bundle published: a cycle whenever its source says to look again, backoff on failures."""

    def __init__(
        self,
        cfg: BundleConfig,
        *,
        source: Source,
        target: Target,
        vault: Vault,
        keeper: TokenKeeper,
        metrics: Metrics,
        init_timeout: float,
        retry_interval: float,
        limits: Limits | None = None,
        events: EventRecorder | None = None,
        mesh: Mesh | None = None,
    ) -> None:
        from agent import kinds
        from agent.config import TlsBundle

        self.cfg = cfg
        self.kind = kinds.of(cfg)
        #: tls.crt must chain to ca.crt (false only for a tls bundle whose ca.crt is a client CA)
        self._ca_signs_cert = cfg.ca_signs_cert if isinstance(cfg, TlsBundle) else True
        self.state = BundleState(cfg)
        self.source = source
        #: where the bundle is published: its directory, or a Kubernetes Secret
        self.target = target
        self.vault = vault
        self.keeper = keeper
        self.metrics = metrics
        self.init_timeout = init_timeout
        #: the steady-state interval: backoff after the first publish caps at max(this, 5 s)
        self.retry_interval = retry_interval
        self.limits = limits
        #: the mesh (config `istio:`): its Istio version, ambient and compliance policy add checks to istio-ca bundles
        self.mesh = mesh
        #: sidecar mode: record Events and run reload actions after a publish (None in init mode)
        self.events = events
        #: set once the bundle was first published
        self.published = asyncio.Event()
        self._publish_lock = asyncio.Lock()
        #: set by `resync` (SIGHUP): ends the wait before the next check
        self._resync = asyncio.Event()
        self._log = get_logger(bundle=cfg.name)
        #: what the rules know (agent/rules.py): the live and refused content, when to look again
        self.core = rules.State()
        #: when the rules want the next look (time.time()), set by their `Sleep`
        self._wake_at = 0.0
        #: a resync (SIGHUP) was asked for: the next look reads in full
        self._resync_requested = False
        #: the error `_report` raised last (reported already: `_failed` does not report it again)
        self._raised: AgentError | None = None
        #: why the consumer would not take the last publish in a reload (the root-change guard acts on it)
        self._reload_problem: str | None = None
        #: the "istio_checks_skipped" line was logged (once per bundle, not per poll)
        self._skipped_said = False

    def _say_skipped_checks(self) -> None:
        """One log line per istio-ca bundle, once, naming the version-aware checks an unknown Istio version skips
        (docs/istio-versions.md); the verdicts stay what they were without them. The reload rule is named only for
        a multiroot bundle: without multiroot every root change is refused, whatever the version."""
        from agent.config import IstioCaBundle
        from agent.istio_version import RELOAD_RULE, Mesh, skipped

        if self.kind.name != "istio-ca" or self._skipped_said:
            return
        self._skipped_said = True
        multiroot = isinstance(self.cfg, IstioCaBundle) and self.cfg.multiroot
        names = [n for n in skipped(self.mesh or Mesh()) if n != RELOAD_RULE or multiroot]
        if names:
            self._log.info("istio_checks_skipped", checks=list(names),
                           reason="istio.version is not set; set it (and istio.ambient) to turn them on")

    # -- the loop -----------------------------------------------------------------------------------------
    async def run(self, *, once: bool) -> None:
        """Cycle until cancelled; with `once`, return after the first good cycle.

        Raises:
            AgentError: before the first publish, a final failure in init mode (`once`), or any failure that
                is still there after init.timeout.
        """
        self._say_skipped_checks()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.init_timeout
        delays: Iterator[float] | None = None
        attempt = 0
        while True:
            attempt += 1
            timed_out = False
            try:
                if self.state.live is None:
                    # before the first publish init.timeout bounds everything, whatever hangs (a call, a file)
                    try:
                        async with asyncio.timeout(max(deadline - loop.time(), 0.0)):
                            changed = await self.cycle()
                    except TimeoutError:
                        timed_out = True
                else:
                    changed = await self.cycle()
            except ConfigError:
                raise
            except AgentError as exc:
                first = self.state.live is None
                retryable = isinstance(exc, Unavailable)
                remaining = deadline - loop.time()
                if first and ((once and not retryable) or remaining <= 0):
                    if remaining <= 0:
                        raise type(exc)(
                            f"{exc}; gave up after init.timeout ({self.init_timeout:g}s, {attempt} attempts)"
                        ) from exc
                    raise
                if delays is None:
                    delays = (
                        backoff_delays() if first
                        else backoff_delays(initial=min(1.0, self.retry_interval), cap=max(self.retry_interval, 5.0))
                    )
                delay = next(delays)
                if exc is self._raised and not isinstance(exc, StaleRead) and not first:
                    # refused content: look again when the rules say (the next poll, or when its verdict may change)
                    delay = max(delay, self._wake_at - time.time())
                if first:
                    delay = min(delay, max(remaining, 0.0))
                await self._failed(exc, retryable=retryable, attempt=attempt, retry_in=delay)
                await asyncio.sleep(delay)
                continue
            if timed_out:
                raise self._gave_up(attempt)
            delays, attempt = None, 0
            if once:
                return
            if changed and self.events is not None:
                await self._after_publish()
            wait = max(0.0, self._wake_at - time.time())
            await wait_event(self._resync, wait)
            self._resync.clear()

    def resync(self) -> None:
        """Read the source in full now instead of at the next poll (SIGHUP)."""
        self._resync_requested = True
        self._resync.set()

    def _gave_up(self, attempt: int) -> AgentError:
        """The error that ends the first pass when init.timeout ran out in the middle of a cycle."""
        last = self.state.last_error
        cause = f"{last}; " if last else "a call to Vault did not finish in time; "
        return Unavailable(f"{cause}gave up after init.timeout ({self.init_timeout:g}s, {attempt} attempts)")

    def stalled(self, now: float, limit: float) -> bool:
        """True when a cycle has been running for more than `limit` seconds (monotonic `now`): a wedge."""
        since = self.state.busy_since
        return since is not None and now - since > limit

    # -- one cycle ----------------------------------------------------------------------------------------
    async def cycle(self) -> bool:
        """Log in if needed, then sync; a 403 caused by a refused token logs in once more and retries.

        Returns True when a new generation went live.
        """
        self.state.busy_since = time.monotonic()
        try:
            generation = await self.keeper.ensure()
            try:
                return await self._sync()
            except PermissionDenied:
                if not await self.keeper.recover(generation):
                    raise
                await self.keeper.ensure()
                return await self._sync()
        finally:
            self.state.busy_since = None

    async def _sync(self) -> bool:
        """One look at the source, as the rules decide (agent/rules.py); returns True when a new generation went live.

        A refusal or a stale read is raised (after it was reported), so that `run` applies the init semantics and
        the backoff; everything else ends in the rules' `Sleep`, which says when to look again.
        """
        now = time.time()
        if self._resync_requested:
            self._resync_requested = False
            self.source.reset()
            event: rules.Event | None = rules.Resync(now, self._poll_at(now))
        else:
            event = rules.Due(now, self._poll_at(now))
        checked: BundleInfo | None = None
        changed = False
        while event is not None:
            self.core, actions = rules.decide(self.core, event)
            event = None
            # the rules' Sleep first: a Report raises, and `run` then waits for the time the rules asked for
            for action in sorted(actions, key=lambda a: not isinstance(a, rules.Sleep)):
                if isinstance(action, rules.Probe):
                    event = rules.Revision(time.time(), await self.source.revision())
                elif isinstance(action, rules.Fetch):
                    event = await self._read()
                elif isinstance(action, rules.Validate):
                    event, checked = await self._validate(action.content)
                elif isinstance(action, rules.Publish):
                    assert checked is not None
                    changed = await self._publish(_fetched(action.content), checked)
                    event = rules.Published(time.time(), action.content, changed, checked.not_before)
                elif isinstance(action, rules.Kept):
                    self.state.last_error = None
                    await self._repair_if_damaged()
                elif isinstance(action, rules.Report):
                    self._report(action)
                elif isinstance(action, rules.Sleep):
                    # the source may know more now than when the look began (a PKI source's renewal time)
                    self._wake_at = min(action.until, self.source.next_check(self.state.live, time.time()))
        return changed

    def _poll_at(self, now: float) -> float:
        """When the next regular look is due: a uniformly random phase of the interval for the first one after the
        first publish (agents started together then do not poll in step), the source's schedule after that.

        Until the first publish every look asks with a random phase: the look that publishes first sleeps until it.
        """
        if self.state.live is None:
            return min(now + random.uniform(0.0, self.retry_interval), self.source.next_check(None, now))  # noqa: S311
        return self.source.next_check(self.state.live, now)

    async def _read(self) -> rules.Event:
        """Read the source in full; an answer over the size cap is remembered by its revision, not read again."""
        try:
            fetched = await self.source.fetch()
        except ResponseTooLarge as exc:
            revision = await self.source.revision() if self.state.live is not None else None
            if revision is None:
                raise
            unread = rules.Content(digest=f"unread@{revision}", revision=revision, readable=False)
            return rules.Checked(time.time(), unread, error=exc)
        return rules.Read(time.time(), _content(fetched))

    async def _validate(self, content: rules.Content) -> tuple[rules.Event, BundleInfo | None]:
        files = dict(content.files)
        now = dt.datetime.now(dt.UTC)
        try:
            info = await asyncio.to_thread(
                lambda: self.kind.validate(files, now=now, limits=self.limits, ca_signs_cert=self._ca_signs_cert,
                                           mesh=self.mesh)
            )
        except BundleError as exc:
            from agent.validate import next_change

            change = next_change(files, now, limits=self.limits, key_files=self.kind.key_files)
            recheck = change.timestamp() if change is not None else None
            return rules.Checked(now.timestamp(), content, error=exc, recheck_at=recheck), None
        for warning in info.warnings:  # verdict (c): the consumer loads it, but it is worth fixing
            self._log.warning("bundle_warning", warning=warning, kv_version=content.version)
        return rules.Checked(now.timestamp(), content, not_before=info.not_before), info

    def _report(self, report: rules.Report) -> None:
        """Say a refusal or a stale read (once each), then raise it for `run`'s retry and init semantics."""
        name = self.cfg.name
        if report.what == "stale":
            exc: AgentError = StaleRead(f"bundle {name}: {report.message}")
            self.metrics.error(name, exc.reason)  # counted every time; the live bundle stays and stays ready
            if report.first:
                self._log.warning("stale_read", reason=str(exc))
            raise exc
        error = report.error
        assert error is not None
        self.state.last_error = str(error)
        if report.first:
            self.metrics.error(name, error.reason)
            if isinstance(error, BundleError):
                self._log.warning("bundle_refused", reason=str(error), kv_version=self.core.refused and
                                  self.core.refused.version)
                if self.events is not None:
                    self.events.record("BundleRefused", f"bundle {name}: {error}", "Warning")
            else:
                self._log.warning("sync_failed", reason=str(error), retryable=False)
        self._raised = _again(error)
        raise self._raised

    async def _publish(self, fetched: Fetched, info: BundleInfo) -> bool:
        from agent.config import IstioCaBundle

        st, b = self.state, self.cfg
        async with self._publish_lock:
            result = await self.target.publish(fetched.files)
        previous, check = st.live, self.kind.reload_problem
        self._reload_problem = (
            check(previous.files, fetched.files, multiroot=isinstance(b, IstioCaBundle) and b.multiroot,
                  version=self.mesh.version if self.mesh is not None else None)
            if check is not None and previous is not None and result.changed else None
        )
        st.live, st.info, st.last_error = fetched, info, None
        self.published.set()
        now = time.time()
        if result.changed or st.published_at is None:
            st.published_at = now
            self.metrics.published(b.name, info, now)
            if fetched.renewed is not None:
                self.metrics.renewal(b.name, renewed=fetched.renewed)
            self._log.info(
                "bundle_published", dir=self.target.where, type=b.type, kv_version=fetched.version,
                generation=result.generation, changed=result.changed,
                expires=info.expires_at.isoformat(), serial=info.serial, renewed=fetched.renewed,
            )
        return result.changed

    # -- what is published ----------------------------------------------------------------------------------
    async def _repair_if_damaged(self) -> bool:
        """Publish the live generation again when what is published (files on disk, or the Secret) was deleted or
        altered."""
        async with self._publish_lock:
            # read under the lock: a cycle may have published newer content while this waited for it
            live = self.state.live
            if live is None or not await self.target.damaged(live.files):
                return False
            files = live.files
            await self.target.publish(files)
        where = self.target.where
        self.metrics.error(self.cfg.name, "tampered")
        self._log.warning("bundle_repaired", dir=where, reason=f"{where} was changed or deleted by someone else")
        if self.events is not None:
            self.events.record("BundleRepaired", f"bundle {self.cfg.name}: {where} was changed; restored")
        return True

    async def repair(self) -> None:
        """Heal the published directory if it was tampered with (the file watcher calls this)."""
        try:
            await self._repair_if_damaged()
        except AgentError as exc:
            self._log.error("repair_failed", reason=str(exc))

    # -- reporting ----------------------------------------------------------------------------------------
    async def _failed(self, exc: AgentError, *, retryable: bool, attempt: int, retry_in: float) -> None:
        if isinstance(exc, StaleRead):
            # reported by `_report`; behind a balancer the next read may reach another node
            await self.vault.leave_node()
            return
        if isinstance(exc, BundleError) or exc is self._raised:
            return  # reported once by `_report`
        self.state.last_error = str(exc)
        self.metrics.error(self.cfg.name, exc.reason)
        self._log.warning(
            "sync_failed", reason=str(exc), retryable=retryable, attempt=attempt, retry_in=round(retry_in, 2)
        )
        if retryable:
            await self.vault.probe_node()

    async def _after_publish(self) -> None:
        """Sidecar mode, after a new generation went live: Event, reload action, root-change guard."""
        from agent import reload
        from agent.config import IstioCaBundle, NoReload, RemoteSecretBundle, RolloutRestartReload

        assert self.events is not None
        b, st = self.cfg, self.state
        serial = st.info.serial if st.info else "?"
        self.events.record("BundlePublished", f"bundle {b.name} published to {self.target.where} (serial {serial})")
        if isinstance(b, RemoteSecretBundle):  # istiod watches its Secrets: no reload, no root-change guard
            return
        if not isinstance(b.reload, NoReload):
            kube = await self.events.client() if isinstance(b.reload, RolloutRestartReload) else None
            try:
                done = await reload.reload(b, kube=kube)
                self._log.info("bundle_reloaded", action=done)
            except AgentError as exc:
                self.metrics.error(b.name, exc.reason)
                self._log.error("reload_failed", reason=str(exc))
        if self._reload_problem is not None and isinstance(b, IstioCaBundle):
            self._log.warning(
                "root_changed",
                reason=f"{self._reload_problem}; set multiroot: true with an overlapping root bundle"
                " (and ISTIO_MULTIROOT_MESH=true), or let on_root_change restart istiod",
                on_root_change=b.on_root_change,
            )
            self.events.record("RootChanged", f"bundle {b.name}: root-cert.pem changed", "Warning")
            if b.on_root_change == "restart":
                try:
                    done = await reload.restart_on_root_change(b)
                    self._log.warning("consumer_restarted", action=done)
                except AgentError as exc:
                    self.metrics.error(b.name, exc.reason)
                    self._log.error("restart_failed", reason=str(exc))
