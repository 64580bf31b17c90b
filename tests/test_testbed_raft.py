"""The raft test bed behaves the way the HA tests depend on: a real 3-node cluster that fails over, and a balancer
that spreads connections round robin, skips a dead backend and frames the HTTP it carries."""

from __future__ import annotations

import http.client
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import hvac
import hvac.exceptions
import pytest

from testbed.raft import Balancer, RaftCluster


def _kv2_mount(admin: hvac.Client) -> None:
    """Mount KV v2 at selftest/ unless it is there, and wait out its upgrade (a new KV v2 mount answers 400
    "Upgrading from non-versioned to versioned data" for a moment)."""
    if "selftest/" not in admin.sys.list_mounted_secrets_engines()["data"]:
        admin.sys.enable_secrets_engine("kv", path="selftest", options={"version": "2"})

    def ready() -> bool:
        try:
            admin.secrets.kv.v2.read_configuration(mount_point="selftest")
        except hvac.exceptions.InvalidRequest:
            return False
        return True

    assert wait_for(ready, timeout=15)


class TestRaftCluster:
    def test_cluster_forms(self, raft: RaftCluster) -> None:
        """Three voters, exactly one active node, the other two unsealed standbys (sys/health 429)."""
        raft.heal()
        assert sorted(raft.voters()) == ["node1", "node2", "node3"]
        health = raft.health()
        codes = sorted(h.status for h in health.values() if h is not None)
        assert codes == [200, 429, 429], health
        assert raft.leader() is not None

    def test_leader_failover_and_restart(self, raft: RaftCluster) -> None:
        """Killing the active node makes another one active with the data intact; the killed node comes back from
        its data dir, unsealed, and catches up."""
        raft.heal()
        active = raft.leader()
        assert active is not None
        admin = raft.client(active)
        _kv2_mount(admin)
        admin.secrets.kv.v2.create_or_update_secret(path="probe", secret={"n": "1"}, mount_point="selftest")
        killed_at = time.monotonic()
        raft.kill(active)
        assert not active.running
        new = raft.wait_leader(timeout=60, exclude=[active])
        print(f"failover took {time.monotonic() - killed_at:.1f}s: {active.name} -> {new.name}")
        data = raft.client(new).secrets.kv.v2.read_secret_version(
            path="probe", mount_point="selftest", raise_on_deleted_version=True
        )
        assert data["data"]["data"] == {"n": "1"}
        raft.client(new).secrets.kv.v2.create_or_update_secret(path="probe", secret={"n": "2"}, mount_point="selftest")
        raft.start(active)
        health = active.health()
        assert health is not None and health.unsealed and not health.active
        assert "==== start 2" in active.log_text()
        raft.heal()
        standby = raft.client(active).secrets.kv.v2.read_secret_version(
            path="probe", mount_point="selftest", raise_on_deleted_version=True
        )
        assert standby["data"]["data"] == {"n": "2"}


    def test_isolated_follower_serves_stale_reads(self, raft: RaftCluster) -> None:
        """A follower cut off from the leader's raft traffic keeps serving its old data; reconnected, it catches up."""
        raft.heal()
        leader = raft.leader()
        assert leader is not None
        follower = next(n for n in raft.nodes if n is not leader)
        admin = raft.client(leader)
        _kv2_mount(admin)
        before = admin.secrets.kv.v2.create_or_update_secret(path="stale", secret={"n": "a"}, mount_point="selftest")
        assert wait_for(lambda: raft.caught_up(follower))
        raft.isolate(follower)
        try:
            after = admin.secrets.kv.v2.create_or_update_secret(path="stale", secret={"n": "b"}, mount_point="selftest")
            time.sleep(1)
            local = raft.client(follower).secrets.kv.v2.read_secret_metadata(path="stale", mount_point="selftest")
            assert local["data"]["current_version"] == before["data"]["version"] < after["data"]["version"]
        finally:
            raft.reconnect(follower)
        raft.heal()
        local = raft.client(follower).secrets.kv.v2.read_secret_metadata(path="stale", mount_point="selftest")
        assert local["data"]["current_version"] == after["data"]["version"]


class _Backend:
    """A tiny HTTP/1.1 server (keep-alive) that answers with its own name, by Content-Length or chunked."""

    def __init__(self, name: str) -> None:
        self.name = name

        backend = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                body = backend.name.encode()
                if self.path == "/chunked":
                    self.send_response(201)
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    self.wfile.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["Content-Length"]))
                self.do_GET()

            def log_message(self, format: str, *args: Any) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self.server.server_address[1])
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(name="backends")
def fixture_backends() -> Iterator[list[_Backend]]:
    """Three HTTP backends named b0, b1, b2."""
    servers = [_Backend(f"b{i}") for i in range(3)]
    yield servers
    for server in servers:
        server.close()


def _get(port: int, path: str = "/", conn: http.client.HTTPConnection | None = None) -> tuple[int, str]:
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.request("GET", path)
    resp = conn.getresponse()
    return resp.status, resp.read().decode()


class TestBalancer:
    def test_round_robin_per_connection(self, backends: list[_Backend]) -> None:
        """Each new connection goes to the next backend; requests on one keep-alive connection stay put."""
        with Balancer([("127.0.0.1", b.port) for b in backends]) as lb:
            names = [_get(lb.port)[1] for _ in range(6)]
            assert names == ["b0", "b1", "b2", "b0", "b1", "b2"]
            conn = http.client.HTTPConnection("127.0.0.1", lb.port, timeout=5)
            assert {_get(lb.port, conn=conn)[1] for _ in range(4)} == {"b0"}
            conn.close()
            assert wait_for(lambda: [s["connections"] for s in lb.summary()] == [3, 2, 2])
            assert [s["requests"] for s in lb.summary()] == [6, 2, 2]
            assert all(s["bytes_up"] > 0 and s["bytes_down"] > 0 for s in lb.summary())

    def test_dead_backend_is_skipped(self, backends: list[_Backend]) -> None:
        """A backend that refuses connections is passed over (and counted); `next_to` steers the next one."""
        with Balancer([("127.0.0.1", b.port) for b in backends]) as lb:
            backends[1].close()
            assert [_get(lb.port)[1] for _ in range(4)] == ["b0", "b2", "b0", "b2"]
            assert lb.refused[1] == 2
            lb.next_to(2)
            assert _get(lb.port)[1] == "b2"

    def test_exchanges_and_rate(self, backends: list[_Backend]) -> None:
        """Requests and answers are framed (Content-Length, chunked, POST bodies): statuses and a rate per second."""
        with Balancer([("127.0.0.1", backends[0].port)]) as lb:
            start = time.time()
            conn = http.client.HTTPConnection("127.0.0.1", lb.port, timeout=5)
            assert _get(lb.port, "/chunked", conn) == (201, "b0")
            conn.request("POST", "/login", body=b'{"jwt": "x"}', headers={"Content-Type": "application/json"})
            assert conn.getresponse().read() == b"b0"
            assert _get(lb.port, "/plain", conn) == (200, "b0")
            assert lb.reset() == 1
            conn.close()
            end = time.time()
            assert wait_for(lambda: all(x.status for x in lb.exchanges))
            assert [(x.method, x.path, x.status) for x in lb.exchanges] == [
                ("GET", "/chunked", 201), ("POST", "/login", 200), ("GET", "/plain", 200),
            ]
            assert len({x.connection for x in lb.exchanges}) == 1
            assert lb.rate(start, end) == pytest.approx(3 / (end - start))
            assert lb.peak_rate(start, end) == 3


def wait_for(predicate: Any, timeout: float = 5.0) -> bool:
    """Poll `predicate` for up to `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True
