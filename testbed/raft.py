"""A real 3-node OpenBao raft cluster on loopback, and a round-robin TCP balancer to put in front of it.

`RaftCluster` runs one `bao server -config=...` per node (integrated storage `raft`, `retry_join` to the other
nodes, plain HTTP on free 127.0.0.1 ports, scratch HOME, no VAULT_*/BAO_* from the caller's environment). The
first `start()` initialises node 1 with one key share, unseals every node and waits until all of them are raft
voters and one is active. `kill(node)` is a SIGKILL; `start(node)` brings the node back on the same ports and
data dir and unseals it (it then serves what it had on disk until the leader catches it up). Each node advertises
a loopback proxy as its cluster_addr, so `isolate(node)` can cut the raft traffic coming in to it (the leader then
cannot catch it up) until `reconnect(node)`. Each node's output goes to `<node dir>/server.log`, appended across
restarts.

`Balancer` is what a cloud load balancer in front of the cluster does, with no health checks: each new client
connection goes to the next backend (round robin) that accepts a TCP connection, and stays there until one side
closes it. It counts connections and bytes per backend and, because the cluster speaks plain HTTP/1.1, frames
the requests and answers it carries: `exchanges` says which node answered what, when, with which status.

    with RaftCluster() as cluster, Balancer(cluster.backends) as lb:
        active = cluster.leader()
        cluster.kill(active)
        cluster.wait_leader(exclude=[active])
        lb.rate(t0, t1)      # requests per second through the balancer
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hvac

from testbed.bao import find_bao

__all__ = ["Balancer", "Exchange", "NodeHealth", "RaftCluster", "RaftNode"]

# Environment variables that would point the server (or a CLI it spawns) somewhere else than our scratch dirs.
_ENV_PREFIXES = ("VAULT_", "BAO_")


def _free_ports(count: int) -> list[int]:
    """`count` distinct free loopback ports (all sockets held open until every port is chosen)."""
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for sock in socks:
            sock.close()


def _http(
    method: str, url: str, *, token: str | None = None, body: Any = None, timeout: float = 2.0
) -> tuple[int, Any]:
    """One JSON request; returns (status, parsed body or None) for any HTTP status. Raises OSError when unreachable."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    if token:
        req.add_header("X-Vault-Token", token)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, raw = int(resp.status), resp.read()
    except urllib.error.HTTPError as exc:
        status, raw = int(exc.code), exc.read()
    try:
        return status, json.loads(raw) if raw else None
    except ValueError:
        return status, raw.decode("utf-8", "replace")


@dataclass(frozen=True)
class NodeHealth:
    """One node's `/v1/sys/health` answer: 200 active, 429 standby, 473 performance standby, 503 sealed, 501
    not initialised."""

    status: int
    body: dict[str, Any]

    @property
    def active(self) -> bool:
        """Unsealed and the active node."""
        return self.status == 200

    @property
    def unsealed(self) -> bool:
        """Initialised and unsealed (active or standby)."""
        return self.status in (200, 429, 473)


class RaftNode:
    """One `bao server` process of a RaftCluster: its ports, directories and log."""

    name: str
    api_port: int
    cluster_port: int
    dir: Path

    def __init__(self, name: str, api_port: int, cluster_port: int, root: Path) -> None:
        self.name = name
        self.api_port = api_port
        self.cluster_port = cluster_port
        # What the other nodes dial (cluster_addr): a proxy in front of cluster_port, so `isolate()` can cut the
        # raft and forwarding traffic that comes in to this node.
        self.cluster_proxy = Balancer([("127.0.0.1", cluster_port)], http=False)
        self.dir = root / name
        self.data_dir = self.dir / "data"
        self.home = self.dir / "home"
        self.config_file = self.dir / "config.hcl"
        self.log_file = self.dir / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.killed = False  # the last run ended by kill(), not on its own
        self.data_dir.mkdir(parents=True)
        self.home.mkdir()

    def __repr__(self) -> str:
        return f"RaftNode({self.name}, {self.address}, {'running' if self.running else 'down'})"

    @property
    def address(self) -> str:
        """The node's API address, http://127.0.0.1:PORT (also its api_addr)."""
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def running(self) -> bool:
        """True while the process is alive."""
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        """Process id while running, else None."""
        return self.proc.pid if self.proc is not None and self.running else None

    def log_text(self) -> str:
        """Everything the node logged, over all its runs (each run starts with a `==== start N` line)."""
        try:
            return self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def raft_index(self, timeout: float = 1.0) -> tuple[int, int] | None:
        """(raft_committed_index, raft_applied_index) as this node reports them in sys/leader, or None."""
        try:
            status, body = _http("GET", f"{self.address}/v1/sys/leader", timeout=timeout)
        except (OSError, ValueError):
            return None
        if status != 200 or not isinstance(body, dict) or "raft_committed_index" not in body:
            return None
        return int(body["raft_committed_index"]), int(body.get("raft_applied_index", 0))

    def health(self, timeout: float = 1.0) -> NodeHealth | None:
        """The node's sys/health, or None when it does not answer."""
        try:
            status, body = _http("GET", f"{self.address}/v1/sys/health", timeout=timeout)
        except (OSError, ValueError):
            return None
        return NodeHealth(status, body if isinstance(body, dict) else {})


class RaftCluster:
    """A 3-node (by default) OpenBao raft cluster on 127.0.0.1, each node in its own scratch directory.

    Attributes set by the first `start()`: `root_token` and `unseal_key` (one key share, threshold one).
    """

    nodes: list[RaftNode]
    root_token: str | None
    unseal_key: str | None

    def __init__(
        self,
        size: int = 3,
        *,
        binary: str | None = None,
        log_level: str = "info",
        performance_multiplier: int | None = None,
    ) -> None:
        """Prepare the nodes (nothing runs yet). `performance_multiplier` is raft's timing knob (OpenBao's default
        when None: 5, which makes failover take 8-16 s)."""
        self.binary = binary or find_bao()
        self.log_level = log_level
        self.performance_multiplier = performance_multiplier
        self._tmp = tempfile.TemporaryDirectory(prefix="bao-raft-")
        self.dir = Path(self._tmp.name)
        ports = _free_ports(2 * size)
        self.nodes = [RaftNode(f"node{i + 1}", ports[2 * i], ports[2 * i + 1], self.dir) for i in range(size)]
        self.root_token = None
        self.unseal_key = None
        self._formed = False
        self._finalizer = weakref.finalize(self, RaftCluster._cleanup, list(self.nodes), self._tmp)

    @staticmethod
    def _cleanup(nodes: list[RaftNode], tmp: tempfile.TemporaryDirectory[str]) -> None:
        for node in nodes:
            _kill(node)
            node.cluster_proxy.close()
        tmp.cleanup()

    def __enter__(self) -> RaftCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------- addresses

    @property
    def backends(self) -> list[tuple[str, int]]:
        """(host, port) of every node's API listener, in node order (what a Balancer takes)."""
        return [("127.0.0.1", n.api_port) for n in self.nodes]

    def node(self, name: str) -> RaftNode:
        """The node called `name` (node1, node2, ...)."""
        return next(n for n in self.nodes if n.name == name)

    def _config(self, node: RaftNode) -> str:
        joins = "".join(
            f'  retry_join {{\n    leader_api_addr = "{other.address}"\n  }}\n'
            for other in self.nodes
            if other is not node
        )
        # Autopilot promotes a joined node to voter after server_stabilization_time (set to 1 s at formation)
        # and checks every autopilot_reconcile_interval (10 s by default): the test bed shortens both, which
        # only speeds up forming the cluster. Failover timing stays OpenBao's unless performance_multiplier is set.
        # No disable_mlock: OpenBao 2.x never mlocks and warns about the field as unknown.
        tuning = '  autopilot_update_interval = "1s"\n  autopilot_reconcile_interval = "2s"\n'
        if self.performance_multiplier:
            tuning += f"  performance_multiplier = {self.performance_multiplier}\n"
        return (
            f'storage "raft" {{\n  path = "{node.data_dir}"\n  node_id = "{node.name}"\n{tuning}{joins}}}\n'
            f'listener "tcp" {{\n  address = "127.0.0.1:{node.api_port}"\n'
            f'  cluster_address = "127.0.0.1:{node.cluster_port}"\n  tls_disable = true\n}}\n'
            f'api_addr = "{node.address}"\n'
            f'cluster_addr = "https://127.0.0.1:{node.cluster_proxy.port}"\n'
            f'log_level = "{self.log_level}"\n'
        )

    # ----------------------------------------------------------------- lifecycle

    def start(self, node: RaftNode | None = None, timeout: float = 90.0) -> RaftCluster:
        """Without `node`: the first call forms the cluster (init node 1, unseal all, wait until every node is a
        voter and one is active); later calls start the nodes that are down, as `start(node)` does. With `node`:
        start that node again on its ports and data dir and unseal it, without waiting for it to catch up.

        Returns self. Raises RuntimeError (with the log tails) when something is not up within `timeout` seconds.
        """
        if node is not None:
            self._launch(node)
            self._unseal(node, timeout)
            return self
        if self._formed:
            for n in self.nodes:
                if not n.running:
                    self._launch(n)
            for n in self.nodes:
                self._unseal(n, timeout)
            return self
        try:
            self._form(timeout)
        except BaseException:
            self.stop()
            raise
        self._formed = True
        return self

    def _form(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for n in self.nodes:
            n.config_file.write_text(self._config(n))
            self._launch(n)
        first = self.nodes[0]
        self._wait(lambda: first.health() is not None, deadline, f"{first.name} to answer sys/health")
        status, body = _http(
            "PUT", f"{first.address}/v1/sys/init", body={"secret_shares": 1, "secret_threshold": 1}, timeout=30
        )
        if status != 200 or not isinstance(body, dict):
            raise RuntimeError(f"sys/init on {first.name} answered {status}: {body}; {self._tails()}")
        self.root_token, self.unseal_key = str(body["root_token"]), str(body["keys_base64"][0])
        self._unseal(first, deadline - time.monotonic())
        self._wait(lambda: self.leader() is first, deadline, f"{first.name} to become active")
        status, body = _http(
            "POST", f"{first.address}/v1/sys/storage/raft/autopilot/configuration", token=self.root_token,
            body={"server_stabilization_time": "1s"},
        )
        if status not in (200, 204):
            raise RuntimeError(f"autopilot configuration on {first.name} answered {status}: {body}")
        # A follower joins through retry_join once it is given the unseal key (the join challenge is sealed with
        # the cluster's keys); until the leader has answered its join request, unseal reports it as sealed.
        for n in self.nodes[1:]:
            self._unseal(n, deadline - time.monotonic())
        self._wait(
            lambda: sorted(self.voters()) == sorted(n.name for n in self.nodes), deadline, "every node to be a voter"
        )

    def _launch(self, node: RaftNode) -> None:
        if node.running:
            return
        env = {k: v for k, v in os.environ.items() if not k.startswith(_ENV_PREFIXES)}
        env["HOME"] = str(node.home)
        node.starts += 1
        node.killed = False
        with node.log_file.open("ab") as log:
            log.write(f"==== start {node.starts} at {time.time():.3f}\n".encode())
            log.flush()
            node.proc = subprocess.Popen(
                [self.binary, "server", f"-config={node.config_file}"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=node.home,
            )

    def _unseal(self, node: RaftNode, timeout: float) -> None:
        """Submit the unseal key until the node reports unsealed (a follower that has not joined yet says sealed)."""
        deadline = time.monotonic() + max(timeout, 1.0)
        submitted_at = 0.0

        def unsealed() -> bool:
            nonlocal submitted_at
            if not node.running:
                raise RuntimeError(f"{node.name} exited; {self._tails([node])}")
            health = node.health()
            if health is not None and health.unsealed:
                return True
            if health is not None and health.status == 503 and time.monotonic() - submitted_at > 1.0:
                with contextlib.suppress(OSError, ValueError):
                    _http("PUT", f"{node.address}/v1/sys/unseal", body={"key": self.unseal_key}, timeout=10)
                submitted_at = time.monotonic()
            return False

        self._wait(unsealed, deadline, f"{node.name} to be unsealed")

    def _wait(self, predicate: Callable[[], bool], deadline: float, what: str) -> None:
        while not predicate():
            exited = [n for n in self.nodes if n.proc is not None and n.proc.poll() is not None and not n.killed]
            if exited:
                raise RuntimeError(f"{exited[0].name} exited while waiting for {what}; {self._tails(exited)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out waiting for {what}; {self._tails()}")
            time.sleep(0.1)

    def _tails(self, nodes: Iterable[RaftNode] | None = None) -> str:
        return "\n".join(f"--- {n.name} log tail:\n{n.log_text()[-1500:]}" for n in (nodes or self.nodes))

    def caught_up(self, node: RaftNode) -> bool:
        """Whether `node` is unsealed and has applied everything the active node had applied a moment ago."""
        leader = self.leader()
        ours = leader.raft_index() if leader is not None else None
        health = node.health() if node.running else None
        theirs = node.raft_index() if health is not None and health.unsealed else None
        return ours is not None and theirs is not None and theirs[1] >= ours[1]

    def heal(self, timeout: float = 90.0) -> RaftCluster:
        """Start every node that is down, then wait until one is active and every node is a caught-up voter
        (what a test that killed nodes calls before the next test). Returns self.

        Raises:
            RuntimeError: not healthy within `timeout` seconds (with the log tails).
        """
        deadline = time.monotonic() + timeout
        self.start(timeout=timeout)
        self._wait(lambda: self.leader() is not None, deadline, "an active node")
        self._wait(
            lambda: sorted(self.voters()) == sorted(n.name for n in self.nodes), deadline, "every node to be a voter"
        )
        for node in self.nodes:
            self._wait(lambda node=node: self.caught_up(node), deadline, f"{node.name} to catch up")
        return self

    def isolate(self, node: RaftNode) -> None:
        """Cut the cluster traffic coming in to `node` (raft replication and heartbeats from the leader, forwarded
        requests): open connections are dropped, new ones closed at once. Its API stays reachable, so a follower
        serves what it has on disk until `reconnect(node)`."""
        node.cluster_proxy.refusing = True
        node.cluster_proxy.reset()

    def reconnect(self, node: RaftNode) -> None:
        """Let cluster traffic in to `node` again (the leader retries on its own backoff schedule)."""
        node.cluster_proxy.refusing = False

    def kill(self, node: RaftNode) -> None:
        """SIGKILL `node` (a crash: no step-down, no raft leave) and reap it."""
        _kill(node)

    def stop(self) -> None:
        """SIGKILL every node (the data dirs stay until `close()`)."""
        for node in self.nodes:
            _kill(node)
            self.reconnect(node)

    def close(self) -> None:
        """Stop every node and delete the scratch directories."""
        self.stop()
        self._finalizer()

    # ----------------------------------------------------------------- state

    def health(self) -> dict[str, NodeHealth | None]:
        """sys/health of every running node, by name (None for a node down or not answering)."""
        return {n.name: n.health() if n.running else None for n in self.nodes}

    def leader(self) -> RaftNode | None:
        """The active node (sys/health 200), or None while there is none (failover, or nothing unsealed)."""
        for node in self.nodes:
            if node.running:
                health = node.health(timeout=0.5)
                if health is not None and health.active:
                    return node
        return None

    def wait_leader(self, timeout: float = 60.0, exclude: Sequence[RaftNode] = ()) -> RaftNode:
        """Wait for an active node other than those in `exclude`; returns it.

        Raises:
            RuntimeError: none within `timeout` seconds (with the log tails).
        """
        deadline = time.monotonic() + timeout
        while True:
            node = self.leader()
            if node is not None and node not in exclude:
                return node
            if time.monotonic() > deadline:
                raise RuntimeError(f"no active node within {timeout:.0f}s; {self._tails()}")
            time.sleep(0.1)

    def raft_servers(self) -> list[dict[str, Any]]:
        """The raft configuration as the active node reports it (node_id, address, leader, voter), or []."""
        leader = self.leader()
        if leader is None:
            return []
        try:
            status, body = _http(
                "GET", f"{leader.address}/v1/sys/storage/raft/configuration", token=self.root_token, timeout=2
            )
        except OSError:
            return []
        if status != 200 or not isinstance(body, dict):
            return []
        return list(body.get("data", {}).get("config", {}).get("servers", []))

    def voters(self) -> list[str]:
        """node_ids of the raft voters (a node that joined counts once autopilot promoted it)."""
        return [str(s["node_id"]) for s in self.raft_servers() if s.get("voter")]

    def client(self, node: RaftNode | None = None, *, token: str | None = None, timeout: float = 5.0) -> hvac.Client:
        """An hvac client for `node` (default: the current active node), with the root token unless `token`.

        Raises:
            RuntimeError: no `node` given and no node is active.
        """
        target = node or self.leader()
        if target is None:
            raise RuntimeError("no active node to talk to")
        return hvac.Client(url=target.address, token=token or self.root_token, timeout=timeout)


def _kill(node: RaftNode) -> None:
    proc = node.proc
    node.killed = True
    if proc is not None and proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGKILL)
    if proc is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)


# ------------------------------------------------------------------------------------------------- balancer


@dataclass
class Exchange:
    """One HTTP request through the balancer and its answer (`status` None when no answer came back)."""

    backend: int
    connection: int
    method: str
    path: str
    sent_at: float
    status: int | None = None
    answered_at: float | None = None


_REQUEST_LINE = re.compile(rb"^([A-Z]+) (\S+) HTTP/1\.[01]$")
_STATUS_LINE = re.compile(rb"^HTTP/1\.[01] (\d{3})")


class _Framer:
    """Splits one direction of an HTTP/1.x byte stream into messages (start line, then Content-Length, chunked
    or until-close body). On anything it cannot frame it gives up (`opaque`) and the bytes are only counted."""

    def __init__(self, on_message: Callable[[bytes], None], *, responses: bool) -> None:
        self.on_message = on_message
        self.responses = responses
        self.buf = b""
        self.state = "head"
        self.remaining = 0
        self.opaque = False

    def feed(self, data: bytes) -> None:
        if self.opaque:
            return
        self.buf += data
        try:
            while self._step():
                pass
        except ValueError:
            self.opaque, self.buf = True, b""

    def _step(self) -> bool:
        if self.state == "head":
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > 65536:
                    raise ValueError("header too long")
                return False
            head, self.buf = self.buf[:end], self.buf[end + 4 :]
            lines = head.split(b"\r\n")
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                headers[name.strip().lower()] = value.strip()
            self.on_message(lines[0])
            if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
                self.state = "chunk-size"
            elif b"content-length" in headers:
                self.remaining = int(headers[b"content-length"])
                self.state = "body" if self.remaining else "head"
            elif self.responses and not lines[0].startswith((b"HTTP/1.1 204", b"HTTP/1.1 304")):
                self.state = "until-close"
            return True
        if self.state == "body":
            take = min(self.remaining, len(self.buf))
            self.buf, self.remaining = self.buf[take:], self.remaining - take
            if self.remaining == 0:
                self.state = "head"
                return True
            return False
        if self.state == "chunk-size":
            end = self.buf.find(b"\r\n")
            if end < 0:
                return False
            size = int(self.buf[:end].split(b";")[0], 16)
            self.buf = self.buf[end + 2 :]
            if size == 0:
                self.state = "trailers"
            else:
                self.remaining, self.state = size + 2, "chunk-data"  # the data and its CRLF
            return True
        if self.state == "chunk-data":
            take = min(self.remaining, len(self.buf))
            self.buf, self.remaining = self.buf[take:], self.remaining - take
            if self.remaining == 0:
                self.state = "chunk-size"
                return True
            return False
        if self.state == "trailers":
            end = self.buf.find(b"\r\n")
            if end < 0:
                return False
            line, self.buf = self.buf[:end], self.buf[end + 2 :]
            if not line:
                self.state = "head"
            return True
        self.buf = b""  # until-close: the rest is body
        return False


@dataclass
class _Conn:
    id: int
    backend: int
    client: socket.socket
    upstream: socket.socket
    pending: list[Exchange] = field(default_factory=list)


class Balancer:
    """A round-robin TCP balancer on 127.0.0.1 (threads): each new client connection goes to the next backend that
    accepts one; no health checks, no retries of requests. Counts per backend; frames HTTP/1.x to record
    `exchanges`.

    Attributes:
        connections: connections handed to each backend (index into `backends`).
        bytes_up / bytes_down: bytes sent to / received from each backend.
        refused: connection attempts each backend refused.
        exchanges: every HTTP request seen, in the order sent, with its answer's status.
    """

    def __init__(
        self, backends: Sequence[tuple[str, int]], *, connect_timeout: float = 1.0, http: bool = True
    ) -> None:
        """Listen on a free loopback port at once; `backends` are (host, port) pairs. `http=False` for traffic that
        is not plain HTTP/1.x (then only connections and bytes are counted)."""
        self.backends = list(backends)
        self.connect_timeout = connect_timeout
        self.http = http
        #: while True, every new connection is closed as soon as it is accepted (a partition, or a dead balancer)
        self.refusing = False
        self.connections = [0] * len(self.backends)
        self.refused = [0] * len(self.backends)
        self.bytes_up = [0] * len(self.backends)
        self.bytes_down = [0] * len(self.backends)
        self.exchanges: list[Exchange] = []
        self._next = 0
        self._conn_ids = 0
        self._lock = threading.Lock()
        self._open: dict[int, _Conn] = {}
        self._closed = False
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(128)
        self.port = int(self._sock.getsockname()[1])
        self._thread = threading.Thread(target=self._accept, daemon=True, name="balancer-accept")
        self._thread.start()

    def __enter__(self) -> Balancer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def address(self) -> str:
        """http://127.0.0.1:PORT, what a client is pointed at."""
        return f"http://127.0.0.1:{self.port}"

    # ----------------------------------------------------------------- steering

    def next_to(self, backend: int) -> None:
        """Make `backend` the next one tried for a new connection (round robin goes on from there)."""
        with self._lock:
            self._next = backend % len(self.backends)

    def reset(self, backend: int | None = None) -> int:
        """Close the open client connections (only those to `backend` if given), as a balancer restart does;
        returns how many were closed."""
        with self._lock:
            conns = [c for c in self._open.values() if backend is None or c.backend == backend]
        for conn in conns:
            for sock in (conn.client, conn.upstream):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        return len(conns)

    def open_backends(self) -> list[int]:
        """The backend of each open client connection."""
        with self._lock:
            return [c.backend for c in self._open.values()]

    # ----------------------------------------------------------------- statistics

    def requests_between(self, start: float, end: float) -> list[Exchange]:
        """Requests sent in [start, end) (time.time() values)."""
        with self._lock:
            return [x for x in self.exchanges if start <= x.sent_at < end]

    def rate(self, start: float, end: float) -> float:
        """Requests per second in [start, end)."""
        return len(self.requests_between(start, end)) / max(end - start, 1e-9)

    def peak_rate(self, start: float, end: float, window: float = 1.0) -> int:
        """The most requests sent within any `window` seconds inside [start, end)."""
        times = sorted(x.sent_at for x in self.requests_between(start, end))
        best, lo = 0, 0
        for hi, t in enumerate(times):
            while t - times[lo] >= window:
                lo += 1
            best = max(best, hi - lo + 1)
        return best

    def summary(self) -> list[dict[str, int]]:
        """Per backend: connections, refused attempts, bytes up/down, requests."""
        with self._lock:
            counts = [0] * len(self.backends)
            for x in self.exchanges:
                counts[x.backend] += 1
            return [
                {
                    "connections": self.connections[i], "refused": self.refused[i], "bytes_up": self.bytes_up[i],
                    "bytes_down": self.bytes_down[i], "requests": counts[i],
                }
                for i in range(len(self.backends))
            ]

    # ----------------------------------------------------------------- plumbing

    def _connect(self) -> tuple[int, socket.socket] | None:
        with self._lock:
            start = self._next
            self._next = (self._next + 1) % len(self.backends)
        for k in range(len(self.backends)):
            index = (start + k) % len(self.backends)
            try:
                upstream = socket.create_connection(self.backends[index], timeout=self.connect_timeout)
            except OSError:
                with self._lock:
                    self.refused[index] += 1
                continue
            upstream.settimeout(None)
            with self._lock:
                self.connections[index] += 1
                if k:  # round robin goes on after the backend that took it
                    self._next = (index + 1) % len(self.backends)
            return index, upstream
        return None

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            if self.refusing:
                client.close()
                continue
            picked = self._connect()
            if picked is None:
                client.close()
                continue
            index, upstream = picked
            with self._lock:
                self._conn_ids += 1
                conn = _Conn(self._conn_ids, index, client, upstream)
                self._open[conn.id] = conn
            threading.Thread(target=self._pump, args=(conn, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(conn, False), daemon=True).start()

    def _on_request(self, conn: _Conn, line: bytes) -> None:
        match = _REQUEST_LINE.match(line)
        method, path = (match.group(1).decode(), match.group(2).decode()) if match else ("?", "?")
        exchange = Exchange(conn.backend, conn.id, method, path, time.time())
        with self._lock:
            self.exchanges.append(exchange)
            conn.pending.append(exchange)

    def _on_response(self, conn: _Conn, line: bytes) -> None:
        match = _STATUS_LINE.match(line)
        with self._lock:
            if match and conn.pending:
                exchange = conn.pending.pop(0)
                exchange.status, exchange.answered_at = int(match.group(1)), time.time()

    def _pump(self, conn: _Conn, up: bool) -> None:
        src, dst = (conn.client, conn.upstream) if up else (conn.upstream, conn.client)
        framer = _Framer(
            (lambda line: self._on_request(conn, line)) if up else (lambda line: self._on_response(conn, line)),
            responses=not up,
        )
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if self.http:
                    framer.feed(data)
                with self._lock:
                    (self.bytes_up if up else self.bytes_down)[conn.backend] += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            if not up:
                with self._lock:
                    self._open.pop(conn.id, None)
                for sock in (conn.client, conn.upstream):
                    with contextlib.suppress(OSError):
                        sock.close()

    def close(self) -> None:
        """Stop accepting and close every open connection."""
        self._closed = True
        with contextlib.suppress(OSError):
            self._sock.close()
        self.reset()


if __name__ == "__main__":  # pragma: no cover - manual helper: `python -m testbed.raft`
    with RaftCluster() as cluster, Balancer(cluster.backends) as lb:
        active = cluster.leader()
        print(f"BAO_ADDR={lb.address} BAO_TOKEN={cluster.root_token} active={active}  (Ctrl-C to stop)", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(1)
