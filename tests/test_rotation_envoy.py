"""Proof of a root rotation between real Envoys: workloads of two clusters, each holding a certificate issued by its
cluster's istiod in some phase and the trust bundle that phase hands out (testbed/mesh.py: istiod's signing, pilot-
agent's chain and trust bundle), talk mTLS both ways at every step of A -> trust -> sign -> retire, cluster by
cluster in both orders, with zero failed handshakes; and the two mistakes the gates of `rotate` prevent fail here.

A workload is named by its cluster and the phase its certificate and trust bundle come from. At each step the
workloads alive are those of each cluster's current phase, plus those of its previous phase that have not renewed
yet: the wait between phases (one workload certificate lifetime, counted from the last cluster's write) is what
makes a phase's workloads all gone before the next phase is written anywhere.

`test_live_...` runs the same rotation with four long-lived workloads whose files the agent's publisher swaps under
running Envoys (file-watched SDS), so the certificates and trust bundles change in place as pilot-agent changes them.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.envoy import Envoy, EnvoyNotFound, ServerTls, UpstreamTls, find_envoy, http_get
from testbed.mesh import Workload, istiod_sign, spiffe_id
from testbed.rotation import PHASES, Rotation
from tests.support import wait_until

CLUSTERS = ("east", "west")
KINDS = [f"{c}-{p}" for c in CLUSTERS for p in PHASES]
_FAILED = ("connection_error", "fail_verify_error", "fail_verify_san", "fail_verify_no_cert", "no_certificate")


class Mesh:
    """One Envoy with a MUTUAL listener per workload kind (`<kind>-in`: its certificate, its trust bundle) and one
    Envoy with an upstream per ordered pair (`<client>--<server>`: the client's certificate and trust bundle, the
    server's spiffe identity checked), so every pair of kinds can be tried both ways with fresh handshakes."""

    def __init__(self, workdir: Path, rotation: Rotation) -> None:
        self.workloads: dict[str, Workload] = {}
        for cluster in CLUSTERS:
            for phase, c, files in rotation.walk((cluster,)):
                kind = f"{c}-{phase}"
                wl = istiod_sign(files, kind)
                self.workloads[kind] = wl
                d = workdir / kind
                d.mkdir(parents=True)
                (d / "cert.pem").write_bytes(wl.chain_pem)
                (d / "key.pem").write_bytes(wl.key_pem)
                (d / "trust.pem").write_bytes(wl.trust_pem)
        listeners = [ServerTls(f"{k}-in", workdir / k, mode="MUTUAL", cert="cert.pem", key="key.pem", ca="trust.pem",
                               sds="inline") for k in KINDS]
        self.servers = Envoy(workdir / "servers", listeners=listeners)
        self.clients: Envoy | None = None
        try:
            self.servers.start(timeout=60)
            upstreams = [UpstreamTls(f"{a}--{b}", self.servers.port(f"{b}-in"), workdir / a, cert="cert.pem",
                                     key="key.pem", ca="trust.pem", sds="inline", match_sans=[spiffe_id(b)])
                         for a, b in itertools.product(KINDS, KINDS)]
            self.clients = Envoy(workdir / "clients", upstreams=upstreams).start(timeout=60)
        except BaseException:
            self.close()
            raise
        self.requests = 0

    def call(self, client: str, server: str) -> bool:
        """Workload `client` calls workload `server` (a fresh mTLS handshake): True when it got the answer."""
        assert self.clients is not None
        self.requests += 1
        result = http_get(self.clients.port(f"{client}--{server}"))
        return result.ok and result.body == f"ok {server}-in"

    def failures(self) -> dict[str, int]:
        """Every failed-handshake counter that is not 0, on both Envoys."""
        assert self.clients is not None
        out = {}
        for envoy in (self.servers, self.clients):
            for name, value in envoy.stats(r"\.ssl\.").items():
                if value and name.rpartition(".")[2] in _FAILED:
                    out[name] = value
        return out

    def handshakes(self) -> tuple[int, int]:
        """Completed handshakes counted by the servers' listeners and by the clients' upstreams."""
        assert self.clients is not None
        return (sum(v for n, v in self.servers.stats(r"^listener\..*\.ssl\.handshake$").items()),
                sum(v for n, v in self.clients.stats(r"^cluster\..*\.ssl\.handshake$").items()))

    def close(self) -> None:
        for envoy in (self.clients, self.servers):
            if envoy is not None:
                envoy.close()


@pytest.fixture(name="mesh", scope="module")
def fixture_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    try:
        find_envoy()
    except EnvoyNotFound as exc:
        pytest.skip(str(exc))
    mesh = Mesh(tmp_path_factory.mktemp("rotation-mesh"), Rotation(clusters=CLUSTERS))
    yield mesh
    mesh.close()


def steps(order: tuple[str, str]) -> list[tuple[str, set[str]]]:
    """(what was just written, the workload kinds alive) at each step of a rotation written cluster by cluster in
    `order`: after a cluster's write, its workloads of the previous phase live on until they renew."""
    phase = dict.fromkeys(CLUSTERS, 0)
    out = [("both clusters in phase A", {f"{c}-A" for c in CLUSTERS})]
    for n in range(1, len(PHASES)):
        for c in order:
            phase[c] = n
            alive = {f"{x}-{PHASES[phase[x]]}" for x in CLUSTERS} | {f"{x}-{PHASES[n - 1]}" for x in CLUSTERS}
            out.append((f"{PHASES[n]} written in {c}", alive))
        # the wait: one workload certificate lifetime after the last cluster's write, the previous phase is gone
        out.append((f"every workload renewed in phase {PHASES[n]}", {f"{x}-{PHASES[n]}" for x in CLUSTERS}))
    return out


@pytest.mark.timeout(120)
@pytest.mark.parametrize("order", [("east", "west"), ("west", "east")], ids=["east-first", "west-first"])
def test_every_step_of_the_rotation_keeps_mtls_working(mesh, order):
    """At every step every live workload calls every live workload (itself included), both ways: all answer,
    and neither Envoy counts one failed handshake."""
    assert not mesh.failures()
    before = mesh.handshakes()
    calls = 0
    broken = []
    for what, alive in steps(order):
        for a, b in itertools.product(sorted(alive), repeat=2):
            calls += 1
            if not mesh.call(a, b):
                broken.append(f"{what}: {a} -> {b}")
    assert not broken, broken
    assert calls == 91  # 4 + 3 phases x (9 + 16 + 4)
    expected = (before[0] + calls, before[1] + calls)
    assert wait_until(lambda: mesh.handshakes() == expected, 15), (mesh.handshakes(), expected)
    assert not mesh.failures(), mesh.failures()


def _refused(mesh: Mesh, client: str, server: str) -> str:
    """The call fails: returns the one listener or upstream whose Envoy refused the peer's chain
    (fail_verify_error); the other side only sees the connection end (connection_error)."""
    before = mesh.failures()
    assert not mesh.call(client, server), f"{client} -> {server} should fail"

    def moved() -> dict[str, int]:
        now = mesh.failures()
        changed = {k: v - before.get(k, 0) for k, v in now.items() if v != before.get(k, 0)}
        return changed if len(changed) == 2 else {}

    changed = wait_until(moved, 15)
    refusing = [k for k, v in changed.items() if k.endswith(".ssl.fail_verify_error") and v == 1]
    others = [k for k in changed if k not in refusing]
    assert len(refusing) == 1 and all(k.endswith(".ssl.connection_error") for k in others), changed
    return refusing[0].removesuffix(".ssl.fail_verify_error")


def test_retire_before_every_workload_was_reissued_breaks_mtls(mesh):
    """The retire gate: east writes B alone while a workload still holds a certificate under A's intermediate
    (west's, or east's own not yet renewed since trust): east's new workloads refuse it as a client and as a
    server (BoringSSL fail_verify_error), both ways."""
    for lagging in ("west-trust", "east-trust"):
        assert _refused(mesh, lagging, "east-retire") == "listener.east-retire-in"
        assert _refused(mesh, "east-retire", lagging) == f"cluster.east-retire--{lagging}"


def test_sign_before_every_cluster_trusts_b_breaks_mtls(mesh):
    """The sign gate: east signs under B while west's workloads still trust A alone: west refuses east's new
    certificates as a client and as a server; east (trusting A and B) still takes west's."""
    assert _refused(mesh, "east-sign", "west-A") == "listener.west-A-in"
    assert _refused(mesh, "west-A", "east-sign") == "cluster.west-A--east-sign"
    assert mesh.call("west-A", "east-trust") and mesh.call("east-trust", "west-A")  # control: trust, then sign


# ---------------------------------------------------------------------------------------------- live workloads


class LiveMesh:
    """Four long-lived workloads, two per cluster (`<cluster>1` renews at once after its cluster's write,
    `<cluster>2` lags until the wait is over), each a directory published by the agent's own publisher (a
    `..data` swap, as a kubelet-mounted volume) that the Envoys watch: a MUTUAL listener per workload and an
    upstream per ordered pair, all following their files through every change."""

    NAMES = ("east1", "east2", "west1", "west2")

    def __init__(self, workdir: Path, rotation: Rotation) -> None:
        self.workdir, self.rotation = workdir, rotation
        self.phase = dict.fromkeys(self.NAMES, "A")
        self.files = {c: {p: f for p, _, f in rotation.walk((c,))} for c in CLUSTERS}
        for name in self.NAMES:
            self._publish(name)
        listeners = [ServerTls(f"{n}-in", workdir / n, mode="MUTUAL", cert="cert.pem", key="key.pem", ca="trust.pem")
                     for n in self.NAMES]
        self.servers = Envoy(workdir / "servers", listeners=listeners)
        self.clients: Envoy | None = None
        try:
            self.servers.start(timeout=60)
            upstreams = [UpstreamTls(f"{a}--{b}", self.servers.port(f"{b}-in"), workdir / a, cert="cert.pem",
                                     key="key.pem", ca="trust.pem", match_sans=[spiffe_id(b)])
                         for a, b in itertools.permutations(self.NAMES, 2)]
            self.clients = Envoy(workdir / "clients", upstreams=upstreams).start(timeout=60)
        except BaseException:
            self.close()
            raise

    def _publish(self, name: str) -> int:
        """Issue and publish `name`'s files for its phase; returns how many of its two secrets changed."""
        from agent.publish import publish

        wl = istiod_sign(self.files[name[:-1]][self.phase[name]], name)
        trust = self.workdir / name / "trust.pem"
        changed = 1 + (not trust.exists() or trust.read_bytes() != wl.trust_pem)  # the leaf is always new
        publish(self.workdir / name, {"cert.pem": wl.chain_pem, "key.pem": wl.key_pem, "trust.pem": wl.trust_pem},
                key_files={"key.pem"})
        return changed

    def _uses(self, name: str) -> list[tuple[Envoy, str]]:
        assert self.clients is not None
        return [(self.servers, f"{name}-in"),
                *((self.clients, f"{name}--{b}") for b in self.NAMES if b != name)]

    def renew(self, name: str, phase: str) -> None:
        """Workload `name` gets a certificate and trust bundle of `phase` from its istiod; returns once every
        listener and upstream using them has rebuilt its TLS context."""
        before = {(id(e), n): e.ssl_context_updates(n) for e, n in self._uses(name)}
        self.phase[name] = phase
        changed = self._publish(name)  # one context rebuild per changed secret (certificate, trust bundle)
        for envoy, n in self._uses(name):
            want = before[id(envoy), n] + changed
            assert wait_until(lambda e=envoy, n=n, w=want: e.ssl_context_updates(n) >= w, 30), (name, n, want)

    def everyone_calls_everyone(self) -> list[str]:
        """Every workload calls every other one: the pairs that failed."""
        assert self.clients is not None
        failed = []
        for a, b in itertools.permutations(self.NAMES, 2):
            result = http_get(self.clients.port(f"{a}--{b}"))
            if not (result.ok and result.body == f"ok {b}-in"):
                failed.append(f"{a}({self.phase[a]}) -> {b}({self.phase[b]}): {result.status} {result.error}")
        return failed

    def failures(self) -> dict[str, int]:
        assert self.clients is not None
        return {n: v for e in (self.servers, self.clients) for n, v in e.stats(r"\.ssl\.").items()
                if v and n.rpartition(".")[2] in _FAILED}

    def close(self) -> None:
        for envoy in (self.clients, self.servers):
            if envoy is not None:
                envoy.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("order", [("east", "west"), ("west", "east")], ids=["east-first", "west-first"])
def test_live_workloads_follow_the_rotation_without_a_failed_handshake(tmp_path, order):
    """The same rotation with long-lived workloads whose files change under running Envoys: after each write one
    workload of that cluster renews at once and the other only after the wait; every workload calls every other
    one after each change, and no Envoy ever counts a failed handshake."""
    try:
        find_envoy()
    except EnvoyNotFound as exc:
        pytest.skip(str(exc))
    mesh = LiveMesh(tmp_path, Rotation(clusters=CLUSTERS))
    try:
        assert mesh.everyone_calls_everyone() == []
        changes = 0
        for phase in PHASES[1:]:
            for cluster in order:
                mesh.renew(f"{cluster}1", phase)
                changes += 1
                assert mesh.everyone_calls_everyone() == [], (phase, cluster)
            for cluster in order:  # the wait: the laggards renew too
                mesh.renew(f"{cluster}2", phase)
                changes += 1
                assert mesh.everyone_calls_everyone() == [], (phase, cluster)
        assert changes == 12 and set(mesh.phase.values()) == {"retire"}
        assert mesh.failures() == {}
    finally:
        mesh.close()
