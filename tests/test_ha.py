"""HA: the sidecar behind a round-robin balancer in front of a real 3-node OpenBao raft cluster, through failovers.

The intermediate is rotated every 2 s through the active node; each KV v2 version carries its number in the
certificate (CN "Intermediate CA vN"), so a reader polling the published directory every 20 ms knows which version
is live. One scenario run per class feeds several tests, one per guarantee: no torn read, probes 200 throughout,
every acknowledged rotation published, never backwards, no retry storm while there is no active node.

- `TestFailover` (default run): the active node is killed; once a new one leads and two rotations went through it,
  the killed node comes back from its data dir (down about 15 s) and the balancer's next connection lands on it.
- `TestFailoverLong` (`-m slow`): the active node is killed and restarted after 30 s (the balancer steered onto it
  the same way); once it caught up, the next leader is killed.
- `TestInit`: init through the balancer onto a standby right after the auth mount was configured, while standbys
  still refuse kubernetes logins with 403 (about 30 s): it must publish within init.timeout.

Made deterministic: the agent's first connection goes to the active node (so killing it breaks the agent's
connection in the middle of the outage); after a restart the balancer drops its connections and the next one goes
to the restarted node (one of the placements round robin makes, made every time); and the leader's raft traffic to
the restarted node is held back for 3 s, so it serves its old data for at least that long (left alone, raft's
replication backoff decides, anywhere from 0 to 10 s).
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hvac
import hvac.exceptions
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from testbed import pki
from testbed.kubeapi import KubeAPI
from testbed.raft import Balancer, Exchange, RaftCluster, RaftNode
from tests.faultkit import LeakGuard
from tests.support import ISTIO_FILES, AgentProc, KV2Layout, agent_config, cli_env, run_cli, slow_only, write_config

#: sidecar.poll_interval: well under the rotation period, so every version is live for at least two polls
POLL = 0.8
#: the agent's jitter is +-10 %
POLL_MAX = POLL * 1.1
ROTATE_EVERY = 2.0
READ_EVERY = 0.02
PROBE_EVERY = 0.1
#: a version superseded sooner than this after its write was acknowledged may be skipped (one poll, plus a
#: fetch and publish)
SKIP_ALLOWED = POLL_MAX + 0.3
#: requests per second through the balancer while there is no active node
MAX_OUTAGE_RATE = 2.0
#: standbys refuse kubernetes logins for about 30 s after the auth mount is configured (OpenBao 2.7): the HA runs
#: wait that out before they start, so only TestInit meets it
STANDBY_LOGIN_WINDOW = 60.0
#: seconds a restarted node is kept from catching up (see Scenario.restart)
HOLD_STALE = 3.0

_VERSION_CN = re.compile(r"Intermediate CA v(\d+)$")


# ---------------------------------------------------------------------------------------------- fixtures


@dataclass
class HALayout:
    """The KV v2 secret and kubernetes auth mount the HA runs share, and the root every bundle chains to."""

    layout: KV2Layout
    root: pki.CertKey


@pytest.fixture(name="ha", scope="module")
def fixture_ha(raft: RaftCluster, kube: KubeAPI) -> HALayout:
    """The HA layout on the raft cluster, configured once per module (its 403 window runs out during TestInit)."""
    raft.heal()
    layout = KV2Layout.unique("ha").setup(raft.client(), kube, None)
    return HALayout(layout, pki.root_ca())


def _jwt_file(kube: KubeAPI, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(kube.mint_token("istio-system", "istiod"))
    return path


def _login_status(node: RaftNode, layout: KV2Layout, jwt: str) -> int | str:
    """200 when `node` accepts a kubernetes login for the layout's role, else the HTTP status or error."""
    client = hvac.Client(url=node.address, timeout=3)
    try:
        client.auth.kubernetes.login(layout.role, jwt, mount_point=layout.auth_mount)
    except hvac.exceptions.Forbidden:
        return 403
    except hvac.exceptions.InternalServerError as exc:
        return f"500 {exc}"
    except (hvac.exceptions.VaultError, OSError) as exc:
        return f"{type(exc).__name__} {exc}"
    return 200


def _wait_logins_accepted(raft: RaftCluster, layout: KV2Layout, kube: KubeAPI, timeout: float) -> None:
    """Wait until every node accepts a kubernetes login (standbys refuse for ~30 s after the mount is configured)."""
    jwt = kube.mint_token("istio-system", "istiod")
    deadline = time.monotonic() + timeout
    pending = list(raft.nodes)
    while pending:
        pending = [n for n in pending if _login_status(n, layout, jwt) != 200]
        if pending and time.monotonic() > deadline:
            raise AssertionError(f"{[n.name for n in pending]} still refuse kubernetes logins after {timeout:.0f}s")
        if pending:
            time.sleep(0.5)


# ---------------------------------------------------------------------------------------------- bundles


def _bundle(root: pki.CertKey, version: int) -> dict[str, bytes]:
    """An istio-ca bundle whose intermediate names KV version `version` in its CN."""
    return pki.istio_ca_files(root, pki.intermediate_ca(root, cn=f"Intermediate CA v{version}"))


def _version_of(cert: x509.Certificate) -> int | None:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    match = _VERSION_CN.search(str(names[0].value)) if names else None
    return int(match.group(1)) if match else None


def _spki(key: Any) -> bytes:
    return bytes(key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))


def _first_pem(data: bytes) -> bytes:
    end = data.find(b"-----END CERTIFICATE-----")
    return data[: end + len(b"-----END CERTIFICATE-----")] if end >= 0 else data


# ---------------------------------------------------------------------------------------------- actors


@dataclass
class Write:
    """One rotation attempt: the version it was written as, when it was sent, when (and whether) it was
    acknowledged, and whether it turned out applied without an acknowledgement."""

    version: int
    sent: float
    acked: float | None = None
    applied: bool = False
    error: str | None = None


class Rotator:
    """Writes a new bundle version every ROTATE_EVERY seconds through the active node, with check-and-set, so each
    write's version number is known before it is sent and an unacknowledged write can be told applied or not."""

    def __init__(self, raft: RaftCluster, layout: KV2Layout, root: pki.CertKey, timeline: Timeline) -> None:
        self.raft, self.layout, self.root, self.timeline = raft, layout, root, timeline
        self.writes: list[Write] = []
        #: every content written as version N (two when an unacknowledged attempt raced a retry)
        self.candidates: dict[int, list[dict[str, bytes]]] = {}
        self.lock = threading.Lock()
        self.acked = threading.Condition(self.lock)
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="rotator")
        self._leader: RaftNode | None = None
        self.current = 0

    # -- vault ----------------------------------------------------------------------------------------------
    def _client(self) -> hvac.Client | None:
        if self._leader is None or not self._leader.running:
            self._leader = self.raft.leader()
        return self.raft.client(self._leader, timeout=3) if self._leader is not None else None

    def current_version(self, client: hvac.Client) -> int:
        """The secret's current_version as the node behind `client` answers it."""
        meta = client.secrets.kv.v2.read_secret_metadata(
            path=self.layout.secret_path, mount_point=self.layout.kv_mount
        )
        return int(meta["data"]["current_version"])

    def rotate_once(self) -> Write | None:
        """Write the next version through the active node; None when there is no active node to write to."""
        client = self._client()
        if client is None:
            return None
        try:
            current = self.current_version(client)
        except hvac.exceptions.InvalidPath:
            current = 0
        except Exception as exc:
            self._leader = None
            self.timeline.add(f"rotator: reading the current version failed: {type(exc).__name__}")
            return None
        with self.lock:
            # Only an attempt for version N (cas N-1) can create N: an unacknowledged attempt for a version that
            # now exists, with no acknowledged attempt for it, was applied.
            acked = {w.version for w in self.writes if w.acked is not None}
            for w in self.writes:
                if w.acked is None and w.version <= current and w.version not in acked:
                    w.applied = True
                    acked.add(w.version)
            self.current = current
        version = current + 1
        files = _bundle(self.root, version)
        write = Write(version, time.time())
        with self.lock:
            self.candidates.setdefault(version, []).append(files)
            self.writes.append(write)
        try:
            resp = client.secrets.kv.v2.create_or_update_secret(
                path=self.layout.secret_path, secret={k: v.decode() for k, v in files.items()},
                mount_point=self.layout.kv_mount, cas=current,
            )
        except Exception as exc:
            self._leader = None
            with self.lock:
                write.error = f"{type(exc).__name__}: {str(exc)[:120]}"
            self.timeline.add(f"rotator: write of v{version} not acknowledged ({write.error})")
            return write
        got = int(resp["data"]["version"])
        with self.acked:
            write.version, write.acked = got, time.time()
            self.current = got
            self.acked.notify_all()
        return write

    # -- thread ---------------------------------------------------------------------------------------------
    def _run(self) -> None:
        next_at = time.monotonic() + ROTATE_EVERY
        while not self.stop_event.wait(max(0.0, next_at - time.monotonic())):
            self.rotate_once()
            # a slow attempt (no active node to find) skips ticks rather than bunching writes together
            next_at += ROTATE_EVERY
            while next_at < time.monotonic() + ROTATE_EVERY / 2:
                next_at += ROTATE_EVERY

    def start(self) -> Rotator:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stop_event.set()
        if self.thread.ident is not None:  # started
            self.thread.join(timeout=15)

    def acknowledged(self) -> list[Write]:
        """The acknowledged writes, oldest first."""
        with self.lock:
            return [w for w in self.writes if w.acked is not None]

    def versions(self) -> list[Write]:
        """One write per version that exists in OpenBao (acknowledged, or applied without an acknowledgement)."""
        with self.lock:
            return sorted((w for w in self.writes if w.acked is not None or w.applied), key=lambda w: w.version)

    def wait_acks(self, count: int, timeout: float = 60) -> Write:
        """Wait for `count` more acknowledged writes; returns the last one."""
        deadline = time.monotonic() + timeout
        with self.acked:
            target = len([w for w in self.writes if w.acked is not None]) + count
            while len([w for w in self.writes if w.acked is not None]) < target:
                if not self.acked.wait(timeout=max(0.0, deadline - time.monotonic())):
                    raise AssertionError(f"fewer than {count} rotations acknowledged within {timeout:.0f}s")
            return [w for w in self.writes if w.acked is not None][-1]


@dataclass
class Seen:
    """The reader saw `version` live from `at` on (generation `generation`)."""

    at: float
    version: int | None
    generation: str


class Reader:
    """Reads the published directory the way istiod would, every READ_EVERY seconds: resolve `..data` once, read
    the four files from that generation, check they are one bundle, and note which version is live."""

    def __init__(self, out: Path, root_pem: bytes, candidates: Callable[[int], list[dict[str, bytes]]]) -> None:
        self.out, self.root_pem, self.candidates = out, root_pem, candidates
        self.seen: list[Seen] = []
        self.torn: list[str] = []
        self.samples = 0
        self.vanished = 0  # generations cleaned up between resolving ..data and reading (a retry, not torn)
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="reader")

    def read_once(self) -> None:
        now = time.time()
        try:
            generation = os.readlink(self.out / "..data")
        except OSError as exc:
            self.torn.append(f"{_ts(now)} ..data cannot be resolved: {exc}")
            return
        gen_dir = self.out / generation
        files: dict[str, bytes] = {}
        for name in ISTIO_FILES:
            try:
                files[name] = (gen_dir / name).read_bytes()
            except FileNotFoundError:
                if not gen_dir.exists():
                    self.vanished += 1
                    return
                self.torn.append(f"{_ts(now)} generation {generation} has no {name}")
                return
        self.samples += 1
        problem, version = self._check(files)
        if problem:
            self.torn.append(f"{_ts(now)} generation {generation} (v{version}): {problem}")
        if not self.seen or self.seen[-1].version != version:
            self.seen.append(Seen(now, version, generation))

    def _check(self, files: dict[str, bytes]) -> tuple[str | None, int | None]:
        try:
            cert = x509.load_pem_x509_certificate(files["ca-cert.pem"])
            key = serialization.load_pem_private_key(files["ca-key.pem"], password=None)
        except ValueError as exc:
            return f"unparsable PEM: {exc}", None
        version = _version_of(cert)
        if _spki(key.public_key()) != _spki(cert.public_key()):
            return "ca-key.pem does not match ca-cert.pem", version
        if _first_pem(files["cert-chain.pem"]) != _first_pem(files["ca-cert.pem"]):
            return "cert-chain.pem does not start with ca-cert.pem", version
        if files["root-cert.pem"] != self.root_pem:
            return "root-cert.pem is not the test root", version
        candidates = self.candidates(version) if version is not None else []
        if candidates and files not in candidates:
            return f"the files are not the bundle written as v{version}", version
        return None, version

    def _run(self) -> None:
        while not self.stop_event.wait(READ_EVERY):
            self.read_once()

    def start(self) -> Reader:
        self.read_once()
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stop_event.set()
        if self.thread.ident is not None:  # started
            self.thread.join(timeout=10)

    def live(self) -> int | None:
        return self.seen[-1].version if self.seen else None


class Prober:
    """GETs /healthz and /readyz every PROBE_EVERY seconds, as the kubelet would, and keeps every non-200."""

    def __init__(self, agent: AgentProc) -> None:
        self.agent = agent
        self.failures: list[str] = []
        self.probes = 0
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="prober")

    def _run(self) -> None:
        while not self.stop_event.wait(PROBE_EVERY):
            for path in ("/healthz", "/readyz"):
                now = time.time()
                try:
                    status, body = self.agent.get(path, timeout=1)
                except OSError as exc:
                    status, body = 0, f"{type(exc).__name__}: {exc}"
                self.probes += 1
                if status != 200:
                    self.failures.append(f"{_ts(now)} {path} -> {status} {body[:200]}")

    def start(self) -> Prober:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stop_event.set()
        if self.thread.ident is not None:  # started
            self.thread.join(timeout=10)


class Timeline:
    """What the scenario did, when (wall clock, to line up with the agent's log and the balancer's record)."""

    def __init__(self) -> None:
        self.lines: list[tuple[float, str]] = []
        self.lock = threading.Lock()

    def add(self, text: str, at: float | None = None) -> float:
        at = at or time.time()
        with self.lock:
            self.lines.append((at, text))
        return at


def _ts(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%H:%M:%S.%f")[:-3]


def _event_time(event: dict[str, Any]) -> float:
    return dt.datetime.fromisoformat(str(event["timestamp"]).replace("Z", "+00:00")).timestamp()


# ---------------------------------------------------------------------------------------------- one run


@dataclass
class Outage:
    """No active node from `start` (the kill) to `end` (a new active node answered sys/health)."""

    killed: str
    start: float
    end: float
    leader: str = ""


@dataclass
class HARun:
    """Everything one scenario run recorded, for the tests to check."""

    name: str
    raft: RaftCluster
    balancer: Balancer
    agent: AgentProc
    rotator: Rotator
    reader: Reader
    prober: Prober
    timeline: Timeline
    outages: list[Outage] = field(default_factory=list)
    restarts: list[tuple[str, float]] = field(default_factory=list)
    final_version: int | None = None
    final_live: int | None = None
    metrics_at: dict[str, float] = field(default_factory=dict)
    report_file: Path | None = None
    agent_token: str = ""

    # -- what the tests read -----------------------------------------------------------------------------
    def published(self) -> list[dict[str, Any]]:
        """The agent's bundle_published events (kv_version, timestamp, ...)."""
        return self.agent.events("bundle_published")

    def backend_of(self, at: float) -> str:
        """The node that answered the agent's last KV read (data or metadata) sent before `at`."""
        reads = [x for x in self.balancer.exchanges if x.sent_at <= at and not x.path.startswith(("/v1/sys/",
                                                                                                   "/v1/auth/"))]
        return self._node(reads[-1]) if reads else "?"

    def _node(self, exchange: Exchange) -> str:
        return self.raft.nodes[exchange.backend].name

    def report(self) -> str:
        """The whole run as text: timeline, rotations, versions seen, agent events, balancer statistics."""
        lines = [f"== HA run {self.name}"]
        for at, text in sorted(self.timeline.lines):
            lines.append(f"{_ts(at)} {text}")
        lines.append("-- rotations (version, sent, acked, applied, error)")
        for w in self.rotator.writes:
            lines.append(
                f"v{w.version} sent {_ts(w.sent)} acked {_ts(w.acked) if w.acked else '-'}"
                f"{' applied' if w.applied else ''}{' ' + w.error if w.error else ''}"
            )
        lines.append("-- versions the reader saw live (from)")
        lines += [f"{_ts(s.at)} v{s.version} {s.generation}" for s in self.reader.seen]
        lines.append("-- agent events")
        for event in self.agent.events():
            if event.get("event") in {"bundle_published", "sync_failed", "vault_login", "token_relogin",
                                      "login_failed", "stale_read", "bundle_repaired"}:
                extra = {k: v for k, v in event.items() if k in {"kv_version", "reason", "generation"}}
                lines.append(f"{str(event.get('timestamp', ''))[11:23]} {event['event']} {json.dumps(extra)[:300]}")
        lines.append("-- balancer per node: " + json.dumps(
            {self.raft.nodes[i].name: s for i, s in enumerate(self.balancer.summary())}
        ))
        for o in self.outages:
            xs = self.balancer.requests_between(o.start, o.end)
            lines.append(
                f"-- outage after killing {o.killed}: {o.end - o.start:.1f}s, {len(xs)} requests"
                f" ({len(xs) / max(o.end - o.start, 1e-9):.2f}/s, peak {self.balancer.peak_rate(o.start, o.end)}"
                f" in 1 s), new leader {o.leader}"
            )
            lines += [f"   {_ts(x.sent_at)} {self._node(x)} {x.method} {x.path} -> {x.status}" for x in xs]
        lines.append(f"-- metrics: {json.dumps(self.metrics_at)}")
        lines.append(f"-- reader: {self.reader.samples} reads, {self.reader.vanished} retried (generation cleaned up)")
        lines.append(f"-- prober: {self.prober.probes} probes, {len(self.prober.failures)} not 200")
        return "\n".join(lines)


VAULT_REQUESTS = "istio_vault_agent_vault_requests_total"


class Scenario:
    """Sets up one run (agent behind a fresh balancer, reader, prober, rotator) and gives the steps to script it."""

    def __init__(self, name: str, raft: RaftCluster, ha: HALayout, kube: KubeAPI, tmp: Path) -> None:
        self.raft, self.ha, self.kube, self.tmp = raft, ha, kube, tmp
        self.timeline = Timeline()
        self.balancer = Balancer(raft.backends)
        out = tmp / "out"
        token = _jwt_file(kube, tmp / "serviceaccount" / "token")
        cfg = agent_config(
            address=self.balancer.address, token_path=token, out=out, kv=ha.layout.kv,
            mount=ha.layout.auth_mount, poll=f"{int(POLL * 1000)}ms", timeout="3s", level="info",
        )
        home = tmp / "home"
        home.mkdir()
        self.agent = AgentProc(write_config(tmp / "agent.yaml", cfg), env=cli_env(HOME=str(home)))
        self.rotator = Rotator(raft, ha.layout, ha.root, self.timeline)
        self.reader = Reader(out, ha.root.cert_pem, self._candidates)
        self.prober = Prober(self.agent)
        self.run = HARun(name, raft, self.balancer, self.agent, self.rotator, self.reader, self.prober, self.timeline)
        self.run.agent_token = token.read_text()

    def _candidates(self, version: int) -> list[dict[str, bytes]]:
        with self.rotator.lock:
            return list(self.rotator.candidates.get(version, []))

    def start(self) -> None:
        """Heal the cluster, wait for standbys to take logins, write a first version, start everything."""
        self.raft.heal()
        _wait_logins_accepted(self.raft, self.ha.layout, self.kube, timeout=STANDBY_LOGIN_WINDOW)
        first = self.rotator.rotate_once()
        assert first is not None and first.acked is not None, "the first version could not be written"
        leader = self.raft.leader()
        assert leader is not None
        self.balancer.next_to(self.raft.nodes.index(leader))
        self.timeline.add(f"agent starts, its first connection steered to the active node {leader.name}")
        self.agent.start()
        self.agent.wait_event("sidecar_ready", timeout=30)
        self.timeline.add(f"sidecar ready (v{first.version} published)")
        self.reader.start()
        self.prober.start()
        self.rotator.start()

    def metrics(self, label: str) -> None:
        try:
            self.run.metrics_at[label] = self.agent.metric(VAULT_REQUESTS)
        except (OSError, AssertionError):
            self.run.metrics_at[label] = -1

    def kill_leader(self) -> RaftNode:
        """Wait for a rotation, then kill the active node 1.5 s after it was acknowledged (the agent has polled
        since, and the next rotation is 0.5 s away), and wait for a new active node; the time between is an
        outage."""
        last = self.rotator.wait_acks(1)
        assert last.acked is not None
        time.sleep(max(0.0, last.acked + 1.5 - time.time()))
        victim = self.raft.leader()
        assert victim is not None, "no active node to kill"
        self.metrics(f"kill {victim.name}")
        start = self.timeline.add(f"SIGKILL active node {victim.name}")
        self.raft.kill(victim)
        new = self.raft.wait_leader(timeout=90, exclude=[victim])
        end = self.timeline.add(f"{new.name} active: {time.time() - start:.1f}s without an active node")
        self.metrics(f"{new.name} active")
        self.run.outages.append(Outage(victim.name, start, end, new.name))
        return victim

    def restart(self, node: RaftNode) -> None:
        """Start `node` again from its data dir and unseal it; the balancer's next connection goes to it.

        The leader's raft traffic to the node is held back for HOLD_STALE seconds after the unseal: a restarted
        node serves its old data until the leader's next replication attempt, which raft's backoff puts anywhere
        from 0 to 10 s later; holding it makes every run see at least HOLD_STALE seconds of it.
        """
        self.raft.isolate(node)
        at = self.timeline.add(f"restart {node.name} (raft traffic to it held back {HOLD_STALE:g}s)")
        try:
            self.raft.start(node)
            self.run.restarts.append((node.name, at))
            self.balancer.next_to(self.raft.nodes.index(node))
            dropped = self.balancer.reset()
            self.timeline.add(
                f"{node.name} unsealed, serving v{self._local_version(node)} (current v{self.rotator.current});"
                f" balancer dropped {dropped} connection(s), next one to {node.name}"
            )
            time.sleep(HOLD_STALE)
        finally:
            self.raft.reconnect(node)
        self.timeline.add(f"raft traffic to {node.name} let through (it serves v{self._local_version(node)})")

    def _local_version(self, node: RaftNode) -> int | str:
        """The current version of the secret as `node` itself answers it (a standby reads locally)."""
        try:
            return self.rotator.current_version(self.raft.client(node, timeout=2))
        except Exception as exc:
            return type(exc).__name__

    def wait_caught_up(self, node: RaftNode, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not self.raft.caught_up(node):
            assert time.monotonic() < deadline, f"{node.name} did not catch up within {timeout:.0f}s"
            time.sleep(0.2)
        self.timeline.add(f"{node.name} caught up with the active node")

    def finish(self) -> HARun:
        """Stop rotating, give the agent time to publish the last version, stop everything, write the report."""
        self.rotator.stop()
        self.timeline.add("rotations stopped")
        client = None
        for _ in range(100):
            with_leader = self.raft.leader()
            if with_leader is not None:
                client = self.raft.client(with_leader)
                break
            time.sleep(0.2)
        assert client is not None, "no active node at the end"
        final = self.rotator.current_version(client)
        self.run.final_version = final
        deadline = time.monotonic() + 10 * POLL_MAX + 5
        while self.reader.live() != final and time.monotonic() < deadline:
            time.sleep(0.05)
        self.timeline.add(f"end: v{final} current in OpenBao, v{self.reader.live()} live")
        self.metrics("end")
        self.run.final_live = self.reader.live()
        self.prober.stop()
        self.reader.stop()
        self.agent.stop()
        self.balancer.close()
        self.run.report_file = self.tmp / "ha-report.txt"
        self.run.report_file.write_text(self.run.report())
        print(self.run.report())
        return self.run

    def abort(self) -> None:
        for actor in (self.rotator, self.prober, self.reader):
            actor.stop()
        self.agent.stop()
        self.balancer.close()


def _run(name: str, script: Callable[[Scenario], None], raft, ha, kube, tmp: Path) -> HARun:
    scenario = Scenario(name, raft, ha, kube, tmp)
    try:
        scenario.start()
        script(scenario)
        return scenario.finish()
    except BaseException:
        scenario.abort()
        print(scenario.run.report())
        raise


def short_script(s: Scenario) -> None:
    """Kill the active node; two rotations through the new leader; restart the killed node (down about 15 s) and
    steer the agent onto it; rotate until it caught up and three more versions went through."""
    s.rotator.wait_acks(2)
    victim = s.kill_leader()
    s.rotator.wait_acks(2)
    s.restart(victim)
    s.wait_caught_up(victim)
    s.rotator.wait_acks(3)


def long_script(s: Scenario) -> None:
    """Kill the active node, restart it 30 s later (the agent steered onto it), then kill the next leader."""
    s.rotator.wait_acks(3)
    victim = s.kill_leader()
    killed_at = s.run.outages[-1].start
    time.sleep(max(0.0, killed_at + 30 - time.time()))
    s.restart(victim)
    s.wait_caught_up(victim)
    s.rotator.wait_acks(2)
    s.kill_leader()
    s.rotator.wait_acks(5)


# ---------------------------------------------------------------------------------------------- the checks


class _HAChecks:
    """The guarantees, checked on one run (the class fixture `run`)."""

    def test_no_torn_read(self, run: HARun) -> None:
        """Every read of the live generation found one whole bundle: the key matches the cert, cert-chain.pem starts
        with ca-cert.pem, the root is the test root and the files are what was written as that version."""
        times = [at for at, _ in run.timeline.lines]
        duration = max(times) - min(times)
        assert run.reader.samples > duration / (READ_EVERY * 5), f"the reader hardly ran: {run.reader.samples} reads"
        assert not run.reader.torn, f"{len(run.reader.torn)} torn reads:\n" + "\n".join(run.reader.torn[:20])

    def test_probes_stay_200(self, run: HARun) -> None:
        """/healthz and /readyz answered 200 at every probe, through every kill and restart."""
        assert run.prober.probes > 0
        assert not run.prober.failures, (
            f"{len(run.prober.failures)} of {run.prober.probes} probes were not 200:\n"
            + "\n".join(run.prober.failures[:20]) + f"\n(report: {run.report_file})"
        )

    def test_last_version_is_live_at_the_end(self, run: HARun) -> None:
        """The version current in OpenBao when rotations stop (the last acknowledged one) is what ends up live."""
        acked = run.rotator.acknowledged()
        assert acked and run.final_version is not None and run.final_version >= acked[-1].version
        assert run.final_live == run.final_version, (
            f"v{run.final_version} is current in OpenBao (last acknowledged v{acked[-1].version}) but"
            f" v{run.final_live} is live {10 * POLL_MAX + 5:.0f}s after rotations stopped\n{_published_tail(run)}"
        )

    def test_no_acknowledged_version_skipped(self, run: HARun) -> None:
        """Each acknowledged version that stayed current longer than one poll (plus a fetch) was live at some
        point: the agent polls every 0.8 s and a version stays current for about 2 s."""
        seen = {s.version for s in run.reader.seen}
        skipped = []
        writes = run.rotator.versions()
        for w, nxt in itertools.pairwise(writes):
            if w.acked is None or w.version in seen:
                continue
            current_for = nxt.sent - w.acked
            if current_for >= SKIP_ALLOWED:
                node = run.backend_of(nxt.sent)
                skipped.append(f"v{w.version} (acknowledged {_ts(w.acked)}, current for {current_for:.1f}s;"
                               f" the agent was reading from {node})")
        assert not skipped, (
            f"{len(skipped)} acknowledged version(s) never went live:\n" + "\n".join(skipped)
            + f"\nversions seen live: {[s.version for s in run.reader.seen]}\n(report: {run.report_file})"
        )

    def test_never_backwards(self, run: HARun) -> None:
        """No version is ever published after a newer one (what the reader saw, and what the agent logged)."""
        backwards = []
        for before, after in itertools.pairwise(run.reader.seen):
            if before.version is not None and after.version is not None and after.version < before.version:
                restarted = [f"{name} restarted {after.at - at:.1f}s earlier" for name, at in run.restarts
                             if at <= after.at]
                backwards.append(
                    f"{_ts(after.at)} v{before.version} -> v{after.version} (read from {run.backend_of(after.at)}"
                    f"{'; ' + ', '.join(restarted) if restarted else ''})"
                )
        logged = [e.get("kv_version") for e in run.published()]
        assert not backwards, (
            "the live version went backwards:\n" + "\n".join(backwards)
            + f"\nbundle_published kv_version sequence: {logged}\n{_published_tail(run)}"
        )
        assert logged == sorted(logged), f"bundle_published kv_version sequence goes backwards: {logged}"

    def test_log_has_no_secret_or_traceback(self, run: HARun) -> None:
        """The agent's log holds no traceback, no CA key, no service-account token and no Vault token."""
        text = run.agent.stderr
        assert "Traceback" not in text, run.agent.tail()
        guard = LeakGuard()
        with run.rotator.lock:
            for version, contents in run.rotator.candidates.items():
                for files in contents:
                    guard.key_files(f"v{version}", files)
        guard.secret("the service account token", run.agent_token)
        guard.scan(text, "the agent's log")

    def test_request_rate_during_outage(self, run: HARun) -> None:
        """While there is no active node, the agent sends at most 2 requests per second (no retry storm)."""
        assert run.outages
        storms = []
        for o in run.outages:
            rate = run.balancer.rate(o.start, o.end)
            if rate > MAX_OUTAGE_RATE:
                statuses: dict[str, int] = {}
                for x in run.balancer.requests_between(o.start, o.end):
                    key = f"{run._node(x)} {x.status}"
                    statuses[key] = statuses.get(key, 0) + 1
                storms.append(f"after killing {o.killed}: {rate:.2f}/s over {o.end - o.start:.1f}s, {statuses}")
        assert not storms, "\n".join(storms) + f"\n(report: {run.report_file})"


def _published_tail(run: HARun) -> str:
    lines = []
    for event in run.published()[-12:]:
        at = _event_time(event)
        lines.append(f"  {str(event['timestamp'])[11:23]} bundle_published kv_version={event.get('kv_version')}"
                     f" (data read from {run.backend_of(at)})")
    return "agent log, last publishes:\n" + "\n".join(lines) + f"\n(report: {run.report_file})"


class TestReader:
    def test_mixed_generation_is_a_torn_read(self, tmp_path: Path) -> None:
        """The reader flags a generation whose key belongs to another bundle, and accepts a whole one."""
        root = pki.root_ca()
        one, two = _bundle(root, 1), _bundle(root, 2)
        for name, files in (("..gen1", one), ("..gen2", {**two, "ca-key.pem": one["ca-key.pem"]})):
            (tmp_path / name).mkdir()
            for file, data in files.items():
                (tmp_path / name / file).write_bytes(data)
        written = {1: [one], 2: [two]}
        reader = Reader(tmp_path, root.cert_pem, lambda version: written.get(version, []))
        os.symlink("..gen1", tmp_path / "..data")
        reader.read_once()
        assert not reader.torn
        assert [s.version for s in reader.seen] == [1]
        os.replace(tmp_path / "..data", tmp_path / "..old")
        os.symlink("..gen2", tmp_path / "..data")
        reader.read_once()
        assert len(reader.torn) == 1 and "ca-key.pem does not match ca-cert.pem" in reader.torn[0]
        assert [s.version for s in reader.seen] == [1, 2]

    def test_cleaned_up_generation_is_retried(self, tmp_path: Path) -> None:
        """A generation removed between resolving ..data and reading it counts as a retry, not a torn read."""
        root = pki.root_ca()
        os.symlink("..gone", tmp_path / "..data")
        reader = Reader(tmp_path, root.cert_pem, lambda _version: [])
        reader.read_once()
        assert reader.vanished == 1 and not reader.torn and reader.samples == 0


class TestInit:
    def test_init_at_a_standby_right_after_the_auth_mount_is_configured(
        self, raft: RaftCluster, kube: KubeAPI, ha: HALayout, tmp_path: Path, unique: str
    ) -> None:
        """Init through the balancer onto a standby that still refuses kubernetes logins (403 for ~30 s after
        the auth mount was configured) retries and publishes within init.timeout instead of exiting at once."""
        raft.heal()
        layout = KV2Layout.unique(f"init{unique}")
        admin = raft.client()
        layout.setup(admin, kube, None)
        _write_when_mounted(admin, layout, _bundle(ha.root, 1))
        configured = time.monotonic()
        standby = next(n for n in raft.nodes if n is not raft.leader())
        jwt = kube.mint_token("istio-system", "istiod")
        refused = _login_status(standby, layout, jwt)
        assert refused == 403, f"precondition: the standby {standby.name} should refuse the login now, got {refused}"
        token = _jwt_file(kube, tmp_path / "serviceaccount" / "token")
        out = tmp_path / "out"
        with Balancer(raft.backends) as lb:
            lb.next_to(raft.nodes.index(standby))
            cfg = agent_config(address=lb.address, token_path=token, out=out, kv=layout.kv, mount=layout.auth_mount,
                               init_timeout="60s", timeout="3s", level="info")
            home = tmp_path / "home"
            home.mkdir()
            started = time.monotonic()
            proc = run_cli("run", "--config", str(write_config(tmp_path / "init.yaml", cfg)), "--mode", "init",
                           timeout=90, env=cli_env(HOME=str(home)))
            took = time.monotonic() - started
            served = sorted({raft.nodes[x.backend].name for x in lb.exchanges})
        errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
        assert proc.returncode == 0, (
            f"init exited {proc.returncode} after {took:.1f}s ({time.monotonic() - configured:.1f}s after the auth"
            f" mount was configured; talked to {served}): {errors or proc.stderr[-2000:]}"
        )
        assert took < 60
        published = {p.name: p.read_bytes() for p in (out / os.readlink(out / "..data")).iterdir()}
        assert published == _bundle_written(raft, layout)


def _write_when_mounted(admin: hvac.Client, layout: KV2Layout, files: dict[str, bytes]) -> None:
    """Write `files`, waiting out a new KV v2 mount's upgrade (400 "Upgrading from non-versioned ...")."""
    deadline = time.monotonic() + 15
    while True:
        try:
            layout.write(admin, files)
            return
        except hvac.exceptions.InvalidRequest:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _bundle_written(raft: RaftCluster, layout: KV2Layout) -> dict[str, bytes]:
    data = raft.client().secrets.kv.v2.read_secret_version(
        path=layout.secret_path, mount_point=layout.kv_mount, raise_on_deleted_version=True
    )["data"]["data"]
    return {k: v.encode() for k, v in data.items()}


@pytest.fixture(name="short_run", scope="module")
def fixture_short_run(raft: RaftCluster, ha: HALayout, kube: KubeAPI, tmp_path_factory) -> HARun:
    """The short scenario, run once for the TestFailover checks."""
    return _run("short", short_script, raft, ha, kube, tmp_path_factory.mktemp("ha-short"))


@pytest.fixture(name="long_run", scope="module")
def fixture_long_run(request, raft: RaftCluster, ha: HALayout, kube: KubeAPI, tmp_path_factory) -> HARun:
    """The long scenario, run once for the TestFailoverLong checks (only with -m slow)."""
    slow_only(request)
    return _run("long", long_script, raft, ha, kube, tmp_path_factory.mktemp("ha-long"))


@pytest.mark.timeout(300)
class TestFailover(_HAChecks):
    """Short form (default run): one leader kill, the killed node back after about 15 s, held stale 3 s."""

    @pytest.fixture(name="run")
    def fixture_run(self, short_run: HARun) -> HARun:
        return short_run


@pytest.mark.slow
@pytest.mark.timeout(600)
class TestFailoverLong(_HAChecks):
    """Long form (`-m slow`): kill the active node, restart it after 30 s (held stale 3 s), kill the next leader."""

    @pytest.fixture(name="run")
    def fixture_run(self, long_run: HARun) -> HARun:
        return long_run
