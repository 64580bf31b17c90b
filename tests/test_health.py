"""The health server: liveness, readiness from the agent's state, Prometheus metrics, and no secret on any endpoint."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import errno
import json
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent import config, health
from agent.auth import Login
from agent.config import IstioCaBundle, KvVariant, TlsBundle, parse_duration, parse_listen
from agent.errors import ConfigError
from agent.metrics import PrometheusMetrics
from agent.sources import Fetched, digest
from agent.validate import BundleInfo, validate
from agent.worker import BundleState
from testbed import pki

SECRET_TOKEN = "hvs.CAESIJsecretVaultTokenThatMustNeverLeak0123"


@dataclass
class Files:
    """A published bundle: its files (secret key included) and what validate() said about them."""

    files: dict[str, bytes]
    info: BundleInfo


@pytest.fixture(name="istio_ca", scope="module")
def fixture_istio_ca() -> Files:
    """A valid istio-ca bundle from the test PKI, validated by agent.bundle."""
    root = pki.root_ca()
    files = pki.istio_ca_files(root, pki.intermediate_ca(root, days=365))
    return Files(files, validate("istio-ca", files))


@pytest.fixture(name="tls")
def fixture_tls() -> Files:
    """A valid tls bundle from the test PKI."""
    ca = pki.root_ca(cn="Gateway CA")
    files = pki.tls_files(pki.leaf_cert(ca, days=30), ca)
    return Files(files, validate("tls", files))


def bundle_state(
    tmp_path: Path,
    name: str,
    published: Files | None = None,
    *,
    kind: str = "istio-ca",
    ready_min_remaining: str = "1h",
    last_error: str | None = None,
) -> BundleState:
    """A BundleState as the runner leaves it: published (good + info) or not yet."""
    cfg = {"istio-ca": IstioCaBundle, "tls": TlsBundle}[kind](
        name=name,
        dir=str(tmp_path / name),
        source=KvVariant(kv=f"secret/{name}"),
        ready_min_remaining=parse_duration(ready_min_remaining),
    )
    st = BundleState(cfg)
    if published is not None:
        live = Fetched(files=dict(published.files), digest=digest(published.files), revision="3@t", version=3)
        st.live, st.info, st.published_at = live, published.info, time.time()
    st.last_error = last_error
    return st


@dataclass
class AgentStub:
    """The part of runner.Agent the health server reads: the bundles (and a logged-in token)."""

    bundles: list[BundleState]
    login: Login | None = field(default_factory=lambda: Login(SECRET_TOKEN, "accessor-1", 3600, True, time.time()))
    vault_node: tuple[str | None, float | None] = (None, None)


@dataclass
class Server:
    """A started health server and the knobs the tests turn."""

    url: str
    agent: AgentStub
    metrics: PrometheusMetrics
    alive: list[bool]


@asynccontextmanager
async def running(
    agent: AgentStub, *, now: Callable[[], float] = time.time, metrics: PrometheusMetrics | None = None
) -> AsyncIterator[Server]:
    """Serve the health app for `agent` on 127.0.0.1 (free port), through health.start and bound_port."""
    metrics = metrics or PrometheusMetrics()
    alive = [True]
    app = health.make_app(agent, metrics, alive=lambda: alive[0], now=now)
    runner = await health.start(app, "127.0.0.1:0")
    try:
        yield Server(f"http://127.0.0.1:{health.bound_port(runner)}", agent, metrics, alive)
    finally:
        await runner.cleanup()


async def get(url: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    """One request; returns status, headers and body."""
    async with aiohttp.ClientSession() as session, session.request(method, url) as resp:
        return resp.status, dict(resp.headers), await resp.read()


def readyz(agent: AgentStub, *, now: Callable[[], float] = time.time) -> tuple[int, dict[str, Any]]:
    """Status and JSON body of GET /readyz for `agent`."""

    async def main() -> tuple[int, dict[str, Any]]:
        async with running(agent, now=now) as srv:
            status, _, body = await get(f"{srv.url}/readyz")
            return status, json.loads(body)

    return asyncio.run(main())


class TestHealthz:
    def test_alive_then_stopped(self, tmp_path: Path) -> None:
        """/healthz answers 200 {"status":"ok"} while the loop lives and 503 once it has stopped."""

        async def main() -> None:
            async with running(AgentStub([bundle_state(tmp_path, "a")])) as srv:
                status, headers, body = await get(f"{srv.url}/healthz")
                assert (status, json.loads(body)) == (200, {"status": "ok"})
                assert headers["Content-Type"].startswith("application/json")
                srv.alive[0] = False
                status, _, body = await get(f"{srv.url}/healthz")
                assert status == 503
                assert json.loads(body)["status"] == "unhealthy"

        asyncio.run(main())

    def test_liveness_does_not_depend_on_readiness(self, tmp_path: Path) -> None:
        """An unpublished bundle makes the agent unready but not dead (kubelet must not restart it)."""

        async def main() -> None:
            async with running(AgentStub([bundle_state(tmp_path, "a")])) as srv:
                assert (await get(f"{srv.url}/healthz"))[0] == 200
                assert (await get(f"{srv.url}/readyz"))[0] == 503

        asyncio.run(main())

    def test_head_for_probes(self, tmp_path: Path, istio_ca: Files) -> None:
        """HEAD works on every endpoint, with the GET status and no body."""

        async def main() -> None:
            async with running(AgentStub([bundle_state(tmp_path, "a", istio_ca)])) as srv:
                for path in ("/healthz", "/readyz", "/metrics"):
                    status, _, body = await get(f"{srv.url}{path}", "HEAD")
                    assert (path, status, body) == (path, 200, b"")

        asyncio.run(main())

    def test_unknown_path_and_method(self, tmp_path: Path) -> None:
        """Unknown paths are 404 and writes are 405: the server exposes nothing else."""

        async def main() -> None:
            async with running(AgentStub([bundle_state(tmp_path, "a")])) as srv:
                assert (await get(f"{srv.url}/"))[0] == 404
                assert (await get(f"{srv.url}/ca-key.pem"))[0] == 404
                assert (await get(f"{srv.url}/readyz", "POST"))[0] == 405

        asyncio.run(main())


class TestReadyz:
    def test_not_published_yet(self, tmp_path: Path) -> None:
        """Before the first publish /readyz is 503 and says so for that bundle."""
        status, body = readyz(AgentStub([bundle_state(tmp_path, "istiod-cacerts")]))
        assert status == 503
        assert body == {
            "status": "not ready",
            "bundles": {"istiod-cacerts": {"ready": False, "reason": "not published yet"}},
        }

    def test_published_and_valid(self, tmp_path: Path, istio_ca: Files) -> None:
        """A published bundle far from expiry is ready; the body shows its expiry and serial."""
        status, body = readyz(AgentStub([bundle_state(tmp_path, "istiod-cacerts", istio_ca)]))
        assert status == 200
        assert body["status"] == "ok"
        b = body["bundles"]["istiod-cacerts"]
        assert b["ready"] is True
        assert b["reason"].startswith("published, expires in ")
        assert b["serial"] == istio_ca.info.serial
        assert b["expires_at"] == istio_ca.info.expires_at.strftime("%Y-%m-%dT%H:%M:%SZ")

    def test_near_expiry_is_not_ready(self, tmp_path: Path, istio_ca: Files) -> None:
        """40 minutes before expiry with ready_min_remaining 1h, /readyz is 503 with the numbers in the reason."""
        expires = istio_ca.info.expires_at.timestamp()
        status, body = readyz(
            AgentStub([bundle_state(tmp_path, "istiod-cacerts", istio_ca)]), now=lambda: expires - 40 * 60
        )
        assert status == 503
        assert body["bundles"]["istiod-cacerts"]["reason"] == "expires in 40m, below ready_min_remaining 1h"

    def test_ready_just_above_the_threshold(self, tmp_path: Path, istio_ca: Files) -> None:
        """With more than ready_min_remaining left, the bundle is ready."""
        expires = istio_ca.info.expires_at.timestamp()
        status, _ = readyz(
            AgentStub([bundle_state(tmp_path, "a", istio_ca, ready_min_remaining="30m")]),
            now=lambda: expires - 31 * 60,
        )
        assert status == 200

    def test_real_short_lived_certificate(self, tmp_path: Path) -> None:
        """A real CA valid for 40 more minutes is refused readiness by the default 1h, on the real clock."""
        root = pki.root_ca()
        inter = pki.intermediate_ca(root, not_after=dt.datetime.now(dt.UTC) + dt.timedelta(minutes=40, seconds=30))
        files = pki.istio_ca_files(root, inter)
        status, body = readyz(AgentStub([bundle_state(tmp_path, "a", Files(files, validate("istio-ca", files)))]))
        assert status == 503
        assert body["bundles"]["a"]["reason"].startswith("expires in 40m")

    def test_expired(self, tmp_path: Path, istio_ca: Files) -> None:
        """After notAfter the bundle is not ready and the reason says when it expired."""
        expires = istio_ca.info.expires_at.timestamp()
        status, body = readyz(AgentStub([bundle_state(tmp_path, "a", istio_ca)]), now=lambda: expires + 7200)
        assert status == 503
        stamp = istio_ca.info.expires_at.strftime("%Y-%m-%dT%H:%M:%SZ")
        assert body["bundles"]["a"]["reason"] == f"expired 2h ago, at {stamp}"

    def test_refused_update_keeps_readiness(self, tmp_path: Path, istio_ca: Files) -> None:
        """A failed fetch with the old bundle still valid stays 200, and the error is visible."""
        error = "ca-key.pem does not match ca-cert.pem: the certificate's public key belongs to another private key"
        status, body = readyz(AgentStub([bundle_state(tmp_path, "a", istio_ca, last_error=error)]))
        assert status == 200
        assert body["bundles"]["a"]["ready"] is True
        assert body["bundles"]["a"]["last_error"] == error

    def test_error_before_first_publish_is_in_reason(self, tmp_path: Path) -> None:
        """When nothing was published yet, the reason carries the last error so the operator sees why."""
        error = "Vault at http://127.0.0.1:1 is unreachable"
        status, body = readyz(AgentStub([bundle_state(tmp_path, "a", last_error=error)]))
        assert status == 503
        assert body["bundles"]["a"]["reason"] == f"not published yet; last error: {error}"

    def test_every_bundle_must_be_ready(self, tmp_path: Path, istio_ca: Files, tls: Files) -> None:
        """One unready bundle makes /readyz 503, and the body reports each bundle."""
        agent = AgentStub([bundle_state(tmp_path, "istio", istio_ca), bundle_state(tmp_path, "gw", kind="tls")])
        status, body = readyz(agent)
        assert status == 503
        assert {n: b["ready"] for n, b in body["bundles"].items()} == {"istio": True, "gw": False}
        agent.bundles[1] = bundle_state(tmp_path, "gw", tls, kind="tls")
        assert readyz(agent)[0] == 200

    def test_follows_live_state(self, tmp_path: Path, istio_ca: Files) -> None:
        """Readiness turns 200 as soon as the runner publishes, from memory: the bundle dir need not exist."""

        async def main() -> None:
            st = bundle_state(tmp_path, "a")
            async with running(AgentStub([st])) as srv:
                assert (await get(f"{srv.url}/readyz"))[0] == 503
                st.live = Fetched(files=dict(istio_ca.files), digest=digest(istio_ca.files))
                st.info, st.published_at = istio_ca.info, time.time()
                assert (await get(f"{srv.url}/readyz"))[0] == 200
                assert not (tmp_path / "a").exists()

        asyncio.run(main())


def scrape(body: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The samples of a Prometheus text exposition as {(name, sorted labels): value}."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


class TestVaultNodeState:
    def test_a_standby_node_is_a_detail_not_a_failure(self, tmp_path: Path, istio_ca: Files) -> None:
        """When a failure made the agent ask sys/health and the node said standby, /readyz still answers 200
        for a valid published bundle, names the state, and /metrics has it as a 1 among 0s."""
        agent = AgentStub([bundle_state(tmp_path, "a", istio_ca)], vault_node=("standby", time.time()))
        status, body = readyz(agent)
        assert status == 200 and body["vault"]["node_state"] == "standby"

        async def scrape() -> bytes:
            async with running(agent) as srv:
                return (await get(f"{srv.url}/metrics"))[2]

        series = {(m.name, tuple(sorted(s.labels.items()))): s.value
                  for m in text_string_to_metric_families(asyncio.run(scrape()).decode()) for s in m.samples}
        assert series["istio_vault_agent_vault_node_state", (("state", "standby"),)] == 1
        assert series["istio_vault_agent_vault_node_state", (("state", "active"),)] == 0

    def test_never_asked_means_no_detail(self, tmp_path: Path, istio_ca: Files) -> None:
        """Before any failure there is no Vault detail and no node-state series."""
        status, body = readyz(AgentStub([bundle_state(tmp_path, "a", istio_ca)]))
        assert status == 200 and "vault" not in body


class TestMetricsEndpoint:
    def test_metrics_over_http(self, tmp_path: Path, istio_ca: Files) -> None:
        """/metrics serves the agent's counters in Prometheus text format, plus readiness per bundle."""

        async def main() -> None:
            metrics = PrometheusMetrics()
            agent = AgentStub([bundle_state(tmp_path, "a", istio_ca), bundle_state(tmp_path, "b")])
            metrics.published("a", istio_ca.info, 1234.0)
            metrics.error("b", "vault_unavailable")
            metrics.vault_request()
            async with running(agent, metrics=metrics) as srv:
                status, headers, body = await get(f"{srv.url}/metrics")
            assert status == 200
            assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
            s = scrape(body)
            assert s["istio_vault_agent_publish_total", (("bundle", "a"),)] == 1
            assert s["istio_vault_agent_publish_total", (("bundle", "b"),)] == 0
            assert s["istio_vault_agent_last_publish_timestamp_seconds", (("bundle", "a"),)] == 1234.0
            assert s["istio_vault_agent_errors_total", (("bundle", "b"), ("reason", "vault_unavailable"))] == 1
            assert s["istio_vault_agent_vault_requests_total", ()] == 1
            assert s["istio_vault_agent_cert_expiry_timestamp_seconds", (("bundle", "a"), ("file", "ca-cert.pem"))] == (
                istio_ca.info.not_after["ca-cert.pem"].timestamp()
            )
            assert s["istio_vault_agent_bundle_ready", (("bundle", "a"),)] == 1
            assert s["istio_vault_agent_bundle_ready", (("bundle", "b"),)] == 0

        asyncio.run(main())


class TestConcurrency:
    def test_thousand_concurrent_probes_and_scrapes(self, tmp_path: Path, istio_ca: Files) -> None:
        """1000 concurrent /readyz and 1000 concurrent /metrics requests are all answered, quickly."""

        async def main() -> None:
            metrics = PrometheusMetrics()
            metrics.published("a", istio_ca.info, time.time())
            async with running(AgentStub([bundle_state(tmp_path, "a", istio_ca)]), metrics=metrics) as srv:
                connector = aiohttp.TCPConnector(limit=0)
                timeout = aiohttp.ClientTimeout(total=20)
                async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

                    async def one(path: str) -> tuple[int, bytes]:
                        async with session.get(f"{srv.url}{path}") as resp:
                            return resp.status, await resp.read()

                    started = time.monotonic()
                    results = await asyncio.gather(*(one(p) for p in ["/readyz", "/metrics"] * 1000))
                    elapsed = time.monotonic() - started
            assert len(results) == 2000
            assert {status for status, _ in results} == {200}
            assert all(b"istio_vault_agent_publish_total" in body for status, body in results[1::2])
            assert elapsed < 10

        asyncio.run(main())


class TestConnectionCap:
    def test_idle_connections_give_their_slots_to_probes(self) -> None:
        """At the connection cap, 200 connections that never sent a request do not lock probes out: each of 18
        probes takes the slot of the oldest silent one and is answered within 1 s."""

        async def main() -> None:
            app = health.make_app(AgentStub([]), PrometheusMetrics(), alive=lambda: True)
            runner = await health.start(app, "127.0.0.1:0", health.Limits(max_connections=20))
            port = health.bound_port(runner)
            idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(200)]
            try:
                await asyncio.sleep(0.1)
                timeout = aiohttp.ClientTimeout(total=1)
                async with aiohttp.ClientSession(timeout=timeout) as session:
                    for _ in range(18):
                        async with session.get(f"http://127.0.0.1:{port}/healthz") as resp:
                            assert resp.status == 200
            finally:
                for _, writer in idle:
                    writer.close()
                await runner.cleanup()

        asyncio.run(main())

    def test_connections_that_asked_keep_their_slots(self) -> None:
        """Slots held by connections that sent a request are never taken: at the cap, a new connection is closed."""

        async def main() -> None:
            app = health.make_app(AgentStub([]), PrometheusMetrics(), alive=lambda: True)
            runner = await health.start(app, "127.0.0.1:0", health.Limits(max_connections=2))
            port = health.bound_port(runner)
            held = []
            try:
                for _ in range(2):
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                    assert (await reader.readline()).startswith(b"HTTP/1.1 200")
                    held.append(writer)
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                with contextlib.suppress(ConnectionResetError):
                    assert await asyncio.wait_for(reader.read(), 2) == b""
                writer.close()
            finally:
                for writer in held:
                    writer.close()
                await runner.cleanup()

        asyncio.run(main())


class TestNoSecrets:
    def test_no_key_material_or_token_anywhere(self, tmp_path: Path, istio_ca: Files, tls: Files) -> None:
        """No endpoint, in any state, returns PEM, key bytes or the Vault token."""
        key_lines = [
            line
            for f in (istio_ca.files["ca-key.pem"], tls.files["tls.key"])
            for line in f.splitlines()
            if line and not line.startswith(b"-----")
        ]
        assert key_lines
        secrets = [b"-----BEGIN", b"PRIVATE KEY", SECRET_TOKEN.encode(), *key_lines]

        async def main() -> list[bytes]:
            metrics = PrometheusMetrics()
            agent = AgentStub(
                [
                    bundle_state(tmp_path, "istio", istio_ca, last_error="cert-chain.pem ends at an unknown root"),
                    bundle_state(tmp_path, "gw", tls, kind="tls"),
                    bundle_state(tmp_path, "new"),
                ]
            )
            assert agent.login is not None
            metrics.token_login(agent.login)
            metrics.published("istio", istio_ca.info, time.time())
            metrics.published("gw", tls.info, time.time())
            metrics.error("istio", "invalid_bundle")
            bodies = []
            async with running(agent, metrics=metrics) as srv:
                for alive in (True, False):
                    srv.alive[0] = alive
                    for path in ("/healthz", "/readyz", "/metrics", "/", "/ca-key.pem", "/tls.key", "/debug"):
                        status, headers, body = await get(f"{srv.url}{path}")
                        bodies.append(body + json.dumps(headers).encode())
            return bodies

        bodies = asyncio.run(main())
        assert any(b"istio_vault_agent_token_expiry_timestamp_seconds" in b for b in bodies)
        for body in bodies:
            for secret in secrets:
                assert secret not in body


class TestStart:
    def test_bad_listen_is_a_config_error(self) -> None:
        """A malformed health.listen is refused, by the config check and at bind time alike, naming the key."""
        for listen in ("8099", "localhost", "127.0.0.1:http", "127.0.0.1:70000", "::1:8099", "[]:8099"):
            with pytest.raises(ConfigError, match=r"^health\.listen must be HOST:PORT"):
                parse_listen(listen)
            with pytest.raises(ConfigError, match=r"health\.listen must be HOST:PORT"):
                config.from_mapping(
                    {"vault": {"address": "http://v"}, "auth": {"mount": "k", "role": "r"},
                     "health": {"listen": listen}, "bundles": [{"name": "a", "dir": "/a", "source": {"kv": "s/a"}}]},
                    env={},
                )
        assert parse_listen("[::1]:8099") == ("::1", 8099)

    def test_port_alone_listens_on_every_address(self) -> None:
        """`:PORT` passes the config check and then serves on IPv4 and IPv6 loopback alike."""
        port = _free_port()
        assert parse_listen(f":{port}") == (None, port)

        async def main() -> None:
            app = health.make_app(AgentStub([]), PrometheusMetrics(), alive=lambda: True)
            runner = await health.start(app, f":{port}")
            try:
                assert (await get(f"http://127.0.0.1:{port}/healthz"))[0] == 200
                if socket.has_ipv6:
                    assert (await get(f"http://[::1]:{port}/healthz"))[0] == 200
            finally:
                await runner.cleanup()

        asyncio.run(main())

    def test_default_listen_answers_on_ipv4_and_ipv6_loopback(self) -> None:
        """The default health.listen `[::]:PORT` is one dual-stack socket: 127.0.0.1 and ::1 both get /healthz, so
        kubelet probes work on IPv4, IPv6-only and dual-stack pods alike."""
        assert config.HealthConfig().listen == "[::]:8099"
        if not _has_ipv6_loopback():
            pytest.skip("this machine has no IPv6 loopback (::1) to connect over")
        port = _free_port()

        async def main() -> None:
            app = health.make_app(AgentStub([]), PrometheusMetrics(), alive=lambda: True)
            runner = await health.start(app, f"[::]:{port}")
            try:
                # one listening socket, not asyncio's usual IPv4 + IPv6-only pair
                assert len(runner.addresses) == 1
                assert (await get(f"http://127.0.0.1:{port}/healthz"))[0] == 200
                assert (await get(f"http://[::1]:{port}/healthz"))[0] == 200
            finally:
                await runner.cleanup()
            # released: both families refuse connections again
            for url in (f"http://127.0.0.1:{port}/healthz", f"http://[::1]:{port}/healthz"):
                with pytest.raises(aiohttp.ClientConnectionError):
                    await get(url)

        asyncio.run(main())

    def test_default_listen_on_a_kernel_without_ipv6_serves_ipv4(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Where the kernel has no IPv6 at all (an AF_INET6 socket cannot even be made), `[::]:PORT` falls back to
        every IPv4 address instead of failing to start, so the default works there too."""
        real = socket.socket

        class NoIPv6(real):  # type: ignore[misc,valid-type]
            def __init__(self, family: int = -1, *args: Any, **kwargs: Any) -> None:
                if family == socket.AF_INET6:
                    raise OSError(errno.EAFNOSUPPORT, "Address family not supported by protocol")
                super().__init__(family, *args, **kwargs)

        monkeypatch.setattr(socket, "socket", NoIPv6)
        port = _free_port()

        async def main() -> None:
            app = health.make_app(AgentStub([]), PrometheusMetrics(), alive=lambda: True)
            runner = await health.start(app, f"[::]:{port}")
            try:
                assert (await get(f"http://127.0.0.1:{port}/healthz"))[0] == 200
            finally:
                await runner.cleanup()

        asyncio.run(main())

    def test_port_in_use_is_a_config_error(self, tmp_path: Path) -> None:
        """Binding a port that is taken fails with one sentence naming health.listen, not a traceback."""
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]

            async def main() -> None:
                app = health.make_app(AgentStub([]), PrometheusMetrics(), alive=lambda: True)
                await health.start(app, f"127.0.0.1:{port}")

            with pytest.raises(ConfigError, match=rf"^health\.listen 127\.0\.0\.1:{port} cannot be bound"):
                asyncio.run(main())

    def test_serve_until_cancelled(self, tmp_path: Path) -> None:
        """serve() answers once it reported the port and releases the port when its task is cancelled."""
        port = _free_port()

        async def main() -> None:
            started = asyncio.Event()
            reported: list[int] = []

            def listening(bound: int) -> None:
                reported.append(bound)
                started.set()

            app = health.make_app(AgentStub([]), PrometheusMetrics(), alive=lambda: True)
            task = asyncio.create_task(health.serve(app, f"127.0.0.1:{port}", on_listening=listening))
            await asyncio.wait_for(started.wait(), 5)
            assert reported == [port]
            assert (await get(f"http://127.0.0.1:{port}/healthz"))[0] == 200
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            with pytest.raises(aiohttp.ClientConnectionError):
                await get(f"http://127.0.0.1:{port}/healthz")

        asyncio.run(main())


def _has_ipv6_loopback() -> bool:
    """True when a socket can bind ::1 here (containers often run without IPv6)."""
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
