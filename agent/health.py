"""The health server: /healthz (the loop is alive), /readyz (every bundle published and far from expiry), /metrics.

Answers come from in-memory state only (no Vault call, no disk read per request) and never carry file contents.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import errno
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from aiohttp import web

from agent.config import parse_listen
from agent.errors import ConfigError
from agent.text import escape

if TYPE_CHECKING:
    from agent.metrics import PrometheusMetrics
    from agent.worker import BundleState

__all__ = [
    "AgentView",
    "Limits",
    "Readiness",
    "bound_port",
    "bundle_readiness",
    "make_app",
    "readiness",
    "serve",
    "start",
]

# Probes and scrapers must never cache an answer; nosniff because bodies are JSON or plain text only.
_HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}
# The longest error text in an answer (every piece of outside text in it is already cut to 200 characters).
_MAX_TEXT = 4000
# Room for a burst of probe and scrape connections (the kernel default of 128 drops SYNs under load).
_BACKLOG = 1024
# Connections accepted per turn of the event loop (asyncio takes `backlog` of them at once): small against the
# descriptor reserve of `_fd_budget`, since sockets closed at the cap are only released a turn later; a flood
# accepted 1024 at a time would run out of descriptors and make asyncio stop accepting for a second.
_ACCEPT_BATCH = 32
#: at the cap, a connection whose last request came this many seconds ago or more may lose its slot to a new one
#: (the endpoints answer in milliseconds: it is idle on keep-alive; its client reconnects when it asks again)
_IDLE_RECLAIM = 0.5


@dataclass(frozen=True)
class Limits:
    """What one client may hold of the health server: it never starves the probes or the publish path."""

    #: open connections at most; one more takes the slot of the oldest connection that has not sent a complete
    #: request, or is closed at once when there is none. None: 128 below the process's file limit (RLIMIT_NOFILE),
    #: so the health port alone can never use up the descriptors publishing needs.
    max_connections: int | None = None
    #: a request's headers must arrive within this many seconds of the connection or of the previous request
    header_timeout: float = 5.0
    #: an idle keep-alive connection is closed after this many seconds
    keepalive_timeout: float = 5.0
    #: the longest request line or header line accepted (the endpoints take no body)
    max_line: int = 4096


class AgentView(Protocol):
    """What the health server reads from the agent: each bundle's state, and what the Vault node said of itself
    the last time a failure made the agent ask (state, time.time()), or (None, None)."""

    @property
    def bundles(self) -> Sequence[BundleState]: ...

    @property
    def vault_node(self) -> tuple[str | None, float | None]: ...


@dataclass(frozen=True)
class Readiness:
    """Whether one bundle counts as ready, and why, in one short sentence."""

    ready: bool
    reason: str


AGENT_KEY = web.AppKey("agent", AgentView)
METRICS_KEY: web.AppKey[PrometheusMetrics] = web.AppKey("metrics")
ALIVE_KEY: web.AppKey[Callable[[], bool]] = web.AppKey("alive")
NOW_KEY: web.AppKey[Callable[[], float]] = web.AppKey("now")


def _human(seconds: float) -> str:
    """A duration as its two largest units: 45s, 40m, 1h, 1h30m, 3d2h."""
    total = int(max(0.0, seconds))
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        count, total = divmod(total, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts[:2]) or "0s"


def _stamp(when: dt.datetime) -> str:
    return when.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def bundle_readiness(st: BundleState, now: float) -> Readiness:
    """Ready when `st` has a published, validated bundle with more than `ready_min_remaining` left.

    A failed update does not make a bundle unready: the agent refused the bad data and kept the old,
    which workloads can keep using; the failure is only mentioned in the reason.
    """
    error = f"; last error: {escape(st.last_error)[:_MAX_TEXT]}" if st.last_error else ""
    if st.info is None or st.good is None:
        return Readiness(False, f"not published yet{error}")
    expires = st.info.expires_at
    remaining = expires.timestamp() - now
    minimum = float(st.cfg.ready_min_remaining)
    if remaining <= 0:
        return Readiness(False, f"expired {_human(-remaining)} ago, at {_stamp(expires)}{error}")
    if remaining <= minimum:
        return Readiness(False, f"expires in {_human(remaining)}, below ready_min_remaining {_human(minimum)}{error}")
    return Readiness(True, f"published, expires in {_human(remaining)}{error}")


def readiness(agent: AgentView, now: float) -> dict[str, Readiness]:
    """`bundle_readiness` for every bundle of `agent`, by bundle name."""
    return {st.cfg.name: bundle_readiness(st, now) for st in agent.bundles}


def _bundle_json(st: BundleState, r: Readiness) -> dict[str, Any]:
    # Only facts that are public anyway (expiry, serial, published time); never file contents.
    out: dict[str, Any] = {"ready": r.ready, "reason": r.reason}
    if st.info is not None:
        out["expires_at"] = _stamp(st.info.expires_at)
        out["serial"] = st.info.serial
        # the published roots (sha256 of each certificate of root-cert.pem): what `rotate` checks each istiod has
        out["roots"] = list(st.info.root_fingerprints)
    if st.published_at is not None:
        out["published_at"] = _stamp(dt.datetime.fromtimestamp(st.published_at, dt.UTC))
    if st.last_error:
        out["last_error"] = escape(st.last_error)[:_MAX_TEXT]
    return out


async def _healthz(request: web.Request) -> web.Response:
    if request.app[ALIVE_KEY]():
        return web.json_response({"status": "ok"}, headers=_HEADERS)
    return web.json_response(
        {"status": "unhealthy", "reason": "the agent's sync loop has stopped"}, status=503, headers=_HEADERS
    )


async def _readyz(request: web.Request) -> web.Response:
    agent = request.app[AGENT_KEY]
    now = request.app[NOW_KEY]()
    states = {st.cfg.name: st for st in agent.bundles}
    result = readiness(agent, now)
    ok = all(r.ready for r in result.values())
    body: dict[str, Any] = {
        "status": "ok" if ok else "not ready",
        "bundles": {name: _bundle_json(states[name], r) for name, r in result.items()},
    }
    state, at = agent.vault_node
    if state is not None and at is not None:
        # a detail only: a published bundle that is valid keeps /readyz at 200 whatever Vault's state
        body["vault"] = {"node_state": state, "checked_at": _stamp(dt.datetime.fromtimestamp(at, dt.UTC))}
    return web.json_response(body, status=200 if ok else 503, headers=_HEADERS)


async def _metrics(request: web.Request) -> web.Response:
    metrics = request.app[METRICS_KEY]
    result = readiness(request.app[AGENT_KEY], request.app[NOW_KEY]())
    node = request.app[AGENT_KEY].vault_node[0]
    metrics.set_state(ready={name: r.ready for name, r in result.items()}, vault_node=node)
    body, content_type = metrics.render()
    return web.Response(body=body, headers={**_HEADERS, "Content-Type": content_type})


def make_app(
    agent: AgentView,
    metrics: PrometheusMetrics,
    *,
    alive: Callable[[], bool],
    now: Callable[[], float] = time.time,
) -> web.Application:
    """The aiohttp application: GET (and HEAD) /healthz, /readyz and /metrics; anything else is 404.

    `alive` says whether the agent's loop still runs; `now` is the clock readiness is judged by.
    """
    app = web.Application()
    app[AGENT_KEY] = agent
    app[METRICS_KEY] = metrics
    app[ALIVE_KEY] = alive
    app[NOW_KEY] = now
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/metrics", _metrics)
    return app


class _Guard(asyncio.Protocol):
    """Wraps aiohttp's protocol for one connection: counts it against the cap, closes it when a request's
    headers do not arrive in time (a half-open or slowloris client), and otherwise passes everything through.

    At the cap, a new connection takes the slot of the oldest one that has not sent a complete request yet (an
    idle or slow client), else of the one whose last request is the oldest, at least `_IDLE_RECLAIM` seconds ago
    (kept alive and silent since its answer), so that a flood of silent connections can never lock the probes
    out; it is closed only when every slot holds a connection that has asked for something within that time.
    """

    def __init__(self, inner: asyncio.Protocol, site: _GuardedSite) -> None:
        self.inner = inner
        self.site = site
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.tail = b""
        #: handed to aiohttp (connection_made was passed on)
        self.counted = False
        #: holds one of the site's slots
        self.holding = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if self.site.open >= self.site.max_connections and not self.site.reclaim():
            self.site.rejected += 1
            transport.abort()  # excess: closed at once, never handed to aiohttp
            return
        self.site.open += 1
        self.holding = self.counted = True
        self.site.waiting[self] = None
        self._arm(self.site.limits.header_timeout)
        self.inner.connection_made(transport)

    def release(self) -> None:
        """Give the slot back (at most once) and close the connection at once."""
        self.site.waiting.pop(self, None)
        self.site.idle.pop(self, None)
        if self.holding:
            self.holding = False
            self.site.open -= 1
        if self.transport is not None:
            self.transport.abort()

    def _arm(self, seconds: float) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer = asyncio.get_running_loop().call_later(seconds, self._expire)

    def _expire(self) -> None:
        self.site.expired += 1
        if self.transport is not None:
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        # each end of a header block is a request: the next one must come within keep-alive + header time
        seen = self.tail + data
        if b"\r\n\r\n" in seen:
            self.site.waiting.pop(self, None)  # it asked for something: no longer a slot to reclaim at once
            self.site.idle.pop(self, None)  # the latest request last: the dict stays oldest first
            self.site.idle[self] = asyncio.get_running_loop().time()
            self._arm(self.site.limits.keepalive_timeout + self.site.limits.header_timeout)
        self.tail = seen[-3:]
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.site.waiting.pop(self, None)
        self.site.idle.pop(self, None)
        if self.holding:
            self.holding = False
            self.site.open -= 1
        if self.counted:
            self.inner.connection_lost(exc)


def _fd_budget(reserve: int = 128) -> int:
    """How many descriptors the health server may hold: the soft RLIMIT_NOFILE minus a reserve for the rest."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(16, soft - reserve) if soft != resource.RLIM_INFINITY else 1 << 20


class _GuardedSite(web.TCPSite):
    """A TCPSite whose connections go through `_Guard`."""

    def __init__(self, runner: web.AppRunner, host: str | None, port: int, limits: Limits) -> None:
        super().__init__(runner, host, port, backlog=_BACKLOG)
        self.app_runner = runner
        self.bind = (host, port)
        self.limits = limits
        budget = _fd_budget()
        self.max_connections = budget if limits.max_connections is None else min(limits.max_connections, budget)
        self.open = 0
        self.rejected = 0
        self.expired = 0
        #: slots taken back from connections without a complete request, for new ones
        self.reclaimed = 0
        #: connections that have not sent a complete request yet, oldest first
        self.waiting: dict[_Guard, None] = {}
        #: the others, with the loop time of their last request, the oldest request first
        self.idle: dict[_Guard, float] = {}

    def reclaim(self) -> bool:
        """Free the slot of the oldest connection that has not sent a complete request yet, else of the one whose
        last request is the oldest if that was `_IDLE_RECLAIM` seconds ago or more; False if none."""
        oldest = next(iter(self.waiting), None)  # dicts keep insertion order: the first is the oldest
        if oldest is None:
            last = next(iter(self.idle.items()), None)
            if last is None or asyncio.get_running_loop().time() - last[1] < _IDLE_RECLAIM:
                return False
            oldest = last[0]
        oldest.release()
        self.reclaimed += 1
        return True

    async def start(self) -> None:
        await web.BaseSite.start(self)
        server = self.app_runner.server
        assert server is not None
        loop = asyncio.get_running_loop()
        host, port = self.bind
        sock = _dual_stack_socket(port) if host == "::" else None
        if sock is not None:
            self._server = await loop.create_server(lambda: _Guard(server(), self), sock=sock, backlog=_ACCEPT_BATCH)
        else:
            if host == "::":  # no IPv6 in this kernel: every IPv4 address instead
                host = "0.0.0.0"
            self._server = await loop.create_server(
                lambda: _Guard(server(), self), host, port, backlog=_ACCEPT_BATCH, reuse_address=True
            )
        # asyncio listens with the batch size: give the kernel's queue its full length again (the same socket)
        for listening in self._server.sockets:
            with listening.dup() as again:
                again.listen(_BACKLOG)


def _dual_stack_socket(port: int) -> socket.socket | None:
    """A socket bound to [::]:port that also accepts IPv4 (IPV6_V6ONLY off), or None on a host without IPv6.

    asyncio turns IPV6_V6ONLY on for every IPv6 socket it binds, so `[::]` would miss 127.0.0.1 (kubelet probes on an
    IPv4 pod IP) unless the socket is made here; a kernel without IPv6 falls back to asyncio's IPv4 `0.0.0.0`.

    Raises:
        OSError: the port cannot be bound (in use, no permission).
    """
    try:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    except OSError:
        return None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(("::", port))
    except OSError as exc:
        sock.close()
        if exc.errno in {errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL}:
            return None
        raise
    sock.setblocking(False)
    return sock


async def start(app: web.Application, listen: str, limits: Limits | None = None) -> web.AppRunner:
    """Serve `app` on `listen` (HOST:PORT) and return the runner; the caller must `await runner.cleanup()`.

    Connections are bounded by `limits` (default `Limits()`): a cap, a header timeout, short keep-alive and
    short request lines.

    Raises:
        ConfigError: `listen` is malformed, or the address cannot be bound (in use, not local, no permission).
    """
    host, port = parse_listen(listen)
    limits = limits or Limits()
    # Probes every few seconds would flood the log; failures show up in the probes themselves.
    runner = web.AppRunner(
        app, handle_signals=False, access_log=None, keepalive_timeout=limits.keepalive_timeout,
        max_line_size=limits.max_line, max_field_size=limits.max_line,
    )
    await runner.setup()
    try:
        site = _GuardedSite(runner, host, port, limits)
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise ConfigError(
            f"health.listen {listen} cannot be bound ({exc.strerror or exc}); choose a free local address and port"
        ) from None
    except BaseException:
        await runner.cleanup()
        raise
    return runner


def bound_port(runner: web.AppRunner) -> int:
    """The TCP port `runner` listens on (useful when health.listen asked for port 0)."""
    addresses = runner.addresses
    if not addresses:
        raise RuntimeError("the health server is not listening")
    return int(addresses[0][1])


async def serve(app: web.Application, listen: str, *, on_listening: Callable[[int], None]) -> None:
    """Serve `app` on `listen` until cancelled, as a task of its own; `on_listening(port)` once bound.

    Raises:
        ConfigError: as `start`.
    """
    runner = await start(app, listen)
    try:
        on_listening(bound_port(runner))
        await asyncio.Event().wait()  # until cancelled
    finally:
        await runner.cleanup()
