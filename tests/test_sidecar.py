"""End to end: `istio-vault-agent run --mode sidecar` as a subprocess against a real OpenBao.

Each test gets its own KV v2 mount and kubernetes auth mount; the agent polls every second or faster.
Every captured log is scanned at teardown for CA keys and tokens, which must never appear.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import hvac
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from testbed import pki
from testbed.bao import BaoServer
from testbed.kubeapi import KubeAPI
from tests.support import (
    ISTIO_FILES,
    AgentProc,
    KV2Layout,
    agent_config,
    cli_env,
    slow_only,
    wait_until,
    write_config,
)

BUNDLE = "istiod-cacerts"
PUBLISH_TOTAL = f'istio_vault_agent_publish_total{{bundle="{BUNDLE}"}}'
# OpenBao/Vault service tokens (s., hvs., b.) as they would appear if leaked into a log
VAULT_TOKEN = re.compile(r"\b(hv[sb]|s|b)\.[A-Za-z0-9]{20,}")


def errors_total(reason: str) -> str:
    return f'istio_vault_agent_errors_total{{bundle="{BUNDLE}",reason="{reason}"}}'


def key_matches_cert(key_pem: bytes, cert_pem: bytes) -> bool:
    """True when the private key in `key_pem` belongs to the (first) certificate in `cert_pem`."""
    key = serialization.load_pem_private_key(key_pem, password=None)
    cert = x509.load_pem_x509_certificate(cert_pem)
    der = serialization.Encoding.DER
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    return bool(key.public_key().public_bytes(der, spki) == cert.public_key().public_bytes(der, spki))


@pytest.fixture(name="root", scope="module")
def fixture_root() -> pki.CertKey:
    return pki.root_ca()


class World:
    """One test's OpenBao layout, SA token, generated bundles and running agents (stopped and scanned at the end)."""

    def __init__(
        self, bao: BaoServer, kube: KubeAPI, unique: str, tmp_path: Path, sa_token_file: Callable[..., Path],
        root: pki.CertKey, *, seed: bool = True, **auth_kw: Any,
    ) -> None:
        self.bao, self.kube, self.unique, self.tmp = bao, kube, unique, tmp_path
        self.client: hvac.Client = bao.client()
        self.root = root
        self.secrets: list[str] = []
        self.agents: list[AgentProc] = []
        self._sa_token_file = sa_token_file
        self.current = self.bundle()
        self.layout = KV2Layout.unique(unique).setup(self.client, kube, self.current if seed else None, **auth_kw)
        self.token_path = self.token()
        self.out = tmp_path / "out"

    def bundle(self, root: pki.CertKey | None = None) -> dict[str, bytes]:
        """Four files of a fresh intermediate under `root` (default: the test root); its key is remembered."""
        root = root or self.root
        files = pki.istio_ca_files(root, pki.intermediate_ca(root))
        self.secrets.append(files["ca-key.pem"].decode())
        return files

    def rotate(self, files: dict[str, bytes] | None = None) -> dict[str, bytes]:
        """Write a new KV v2 version (a fresh bundle unless `files`); returns what was written."""
        files = files or self.bundle()
        self.layout.write(self.client, files)
        self.current = files
        return files

    def token(self) -> Path:
        """(Re)write the SA token file with a fresh istio-system/istiod token; it is remembered as a secret."""
        path = self._sa_token_file("istio-system", "istiod")
        self.secrets.append(path.read_text())
        return path

    def config(self, poll: str = "1s", **bundle_extra: Any) -> Path:
        cfg = agent_config(
            address=self.bao.address, token_path=self.token_path, out=self.out, kv=self.layout.kv,
            mount=self.layout.auth_mount, role=self.layout.role, poll=poll, **bundle_extra,
        )
        return write_config(self.tmp / f"agent-{len(self.agents)}.yaml", cfg)

    def agent(
        self, poll: str = "1s", *, ready: bool = True, env: dict[str, str] | None = None, **bundle_extra: Any
    ) -> AgentProc:
        """Start the sidecar and wait until its health server listens; with `ready`, wait for its first publish."""
        proc = AgentProc(self.config(poll, **bundle_extra), env=env)
        self.agents.append(proc)
        proc.start().wait_event("health_listening", timeout=15)
        if ready:
            proc.wait_event("sidecar_ready", timeout=15)
        return proc

    def files(self) -> dict[str, bytes]:
        """The published files as a reader sees them through the visible links."""
        return {name: (self.out / name).read_bytes() for name in ISTIO_FILES}

    def published(self, files: dict[str, bytes], timeout: float) -> bool:
        """Wait until the visible files equal `files`."""
        def same() -> bool:
            try:
                return self.files() == files
            except OSError:
                return False

        return bool(wait_until(same, timeout))

    def close(self) -> None:
        """Stop every agent and check its log: no traceback, no key, no token."""
        for proc in self.agents:
            proc.stop()
        for proc in self.agents:
            text = proc.stderr
            assert "Traceback" not in text, text
            for secret in self.secrets:
                body = secret.strip().splitlines()[1] if secret.startswith("-----BEGIN") else secret.strip()
                assert body not in text, "a CA key or SA token appears in the agent's log"
            assert not VAULT_TOKEN.search(text), "a Vault token appears in the agent's log"


@pytest.fixture(name="make_world")
def fixture_make_world(kube, unique, tmp_path, sa_token_file, root) -> Iterator[Callable[..., World]]:
    """Factory: `make_world(bao, seed=True, token_ttl=..., token_max_ttl=...)`; closed at teardown."""
    worlds: list[World] = []

    def make(bao: BaoServer, **kw: Any) -> World:
        world = World(bao, kube, unique, tmp_path, sa_token_file, root, **kw)
        worlds.append(world)
        return world

    yield make
    for world in worlds:
        world.close()


@pytest.fixture(name="world")
def fixture_world(bao, make_world) -> World:
    """A World on the shared OpenBao dev server, with version 1 of the bundle written."""
    return make_world(bao)


class TestRotation:
    def test_kv2_rotation_published_within_interval(self, world):
        """A new KV v2 version shows up as new files within poll_interval + 1 s, each one a valid bundle."""
        agent = world.agent("1s")
        assert world.files() == world.current
        for _ in range(2):
            new = world.rotate()
            # the contract: published within poll_interval + 1 s
            assert world.published(new, timeout=2.0), agent.stderr[-3000:]
        assert wait_until(lambda: agent.metric(PUBLISH_TOTAL) == 3, 1)  # counted just after the swap

    def test_kv1_rotation_by_content_hash(self, world):
        """A KV v1 secret has no versions: rewriting it with new content is picked up through its digest."""
        client, mount = world.client, f"kv1-{world.unique}"
        client.sys.enable_secrets_engine("kv", path=mount, options={"version": "1"})
        kv1 = lambda files: client.secrets.kv.v1.create_or_update_secret(  # noqa: E731
            path="istio/cacerts", secret={k: v.decode() for k, v in files.items()}, mount_point=mount
        )
        kv1(world.current)
        client.sys.create_or_update_policy(
            name=world.layout.policy, policy=f'path "{mount}/istio/cacerts" {{ capabilities = ["read"] }}'
        )
        world.layout = KV2Layout(mount, "istio/cacerts", world.layout.auth_mount, world.layout.role,
                                 world.layout.policy)
        agent = world.agent("1s")
        assert world.files() == world.current
        new = world.bundle()
        kv1(new)
        assert world.published(new, timeout=2.5), agent.stderr[-3000:]
        assert wait_until(lambda: agent.metric(PUBLISH_TOTAL) == 2, 1)  # counted just after the swap


    def test_secret_recreated_with_the_same_version_number(self, world):
        """A KV v2 secret deleted and written again restarts at version 1; the new content is still published."""
        agent = world.agent("1s")
        client, layout = world.client, world.layout
        client.secrets.kv.v2.delete_metadata_and_all_versions(path=layout.secret_path, mount_point=layout.kv_mount)
        new = world.bundle()
        assert layout.write(client, new) == 1  # the same number as the published version
        assert world.published(new, timeout=2.5), agent.stderr[-3000:]


class TestConsistency:
    @staticmethod
    def _run(world: World, rotations: int) -> None:
        bundles = [world.bundle() for _ in range(rotations)]
        world.agent("100ms")
        stop = threading.Event()
        seen: set[str] = set()
        mismatches: list[str] = []
        reads = [0]

        def reader() -> None:
            while not stop.is_set():
                try:
                    # resolve ..data once, then read both files through that one generation, as istiod does
                    generation = world.out / os.readlink(world.out / "..data")
                    key = (generation / "ca-key.pem").read_bytes()
                    cert = (generation / "ca-cert.pem").read_bytes()
                except OSError:
                    continue  # that generation was cleaned up under us: a reader retries, like istiod
                reads[0] += 1
                seen.add(generation.name)
                if not key_matches_cert(key, cert):
                    mismatches.append(generation.name)

        thread = threading.Thread(target=reader, daemon=True)
        thread.start()
        try:
            for files in bundles:
                world.rotate(files)
                time.sleep(0.06)
            assert world.published(bundles[-1], timeout=3)
        finally:
            stop.set()
            thread.join(timeout=5)
        assert not mismatches, f"ca-key.pem and ca-cert.pem from different generations in {mismatches[:3]}"
        # the test only means something if the reader really saw many swaps
        assert len(seen) >= rotations // 4, (len(seen), reads[0])

    def test_reader_never_sees_mixed_generations(self, world):
        """A reader resolving ..data once never gets a key and a cert of different generations (100 rotations;
        1000 with -m slow)."""
        self._run(world, 100)

    @pytest.mark.slow
    def test_reader_never_sees_mixed_generations_soak(self, world, request):
        """The same over 1000 rotations."""
        slow_only(request)
        self._run(world, 1000)


class TestRefusal:
    def test_bad_rotation_refused_then_good_one_published(self, world):
        """A mismatched key is refused: old files stay byte-identical, /readyz stays 200, the error is counted."""
        agent = world.agent("500ms")
        good = world.files()
        before = agent.metric(errors_total("invalid_bundle"))
        other = world.bundle()
        bad = {**world.bundle(), "ca-key.pem": other["ca-key.pem"]}
        world.layout.write(world.client, bad)
        refused = agent.wait_event("bundle_refused", timeout=3)
        assert refused[0]["reason"] and "ca-key.pem" in refused[0]["reason"], refused
        time.sleep(1.2)  # a few more polls of the same bad version
        assert world.files() == good
        status, body = agent.ready()
        assert status == 200 and body["status"] == "ok", body
        assert agent.metric(errors_total("invalid_bundle")) == before + 1
        assert len(agent.events("bundle_refused")) == 1, "the same bad version is reported once, not every poll"
        assert agent.metric(PUBLISH_TOTAL) == 1
        new = world.rotate()
        assert world.published(new, timeout=2), agent.stderr[-3000:]
        cleared = lambda: (r := agent.ready())[0] == 200 and "last_error" not in r[1]["bundles"][BUNDLE]  # noqa: E731
        assert wait_until(cleared, 1), agent.ready()


class TestVaultOutage:
    def test_openbao_stopped_and_started_again(self, bao_factory, make_world):
        """While OpenBao is down the files stay and /readyz stays 200 with few, backed-off retries; then it recovers."""
        server = bao_factory()
        world = make_world(server)
        server.add_seeder(lambda c: world.layout.setup(c, world.kube, world.current), run_now=False)
        agent = world.agent("1s")
        new = world.rotate()
        assert world.published(new, timeout=2.5)
        failed_before = len(agent.events("sync_failed"))
        server.stop()
        down_for = 6.0
        deadline = time.monotonic() + down_for
        while time.monotonic() < deadline:
            status, body = agent.ready()
            assert status == 200, body
            assert world.files() == new
            time.sleep(0.5)
        failures = len(agent.events("sync_failed")) - failed_before
        # backoff 1s doubling (jitter 0.5-1x, capped at 5s): at most 5 attempts in 6 s; a storm would be hundreds
        assert 1 <= failures <= 6, agent.stderr[-4000:]
        assert agent.metric(errors_total("vault_unavailable")) >= 1
        status, body = agent.ready()
        assert "last_error" in body["bundles"][BUNDLE], body
        server.start()  # an empty dev server; the seeder writes the layout and the current bundle again
        after = world.rotate()
        assert world.published(after, timeout=8), agent.stderr[-4000:]
        assert len(agent.events("vault_login")) >= 2


def _login_accessors(client: hvac.Client, mount: str) -> list[str]:
    """The accessors of the tokens logins on `mount` made; tokens of other tests on the shared server come and go
    while this looks (an accessor listed may be gone by its lookup)."""
    mine = []
    for accessor in client.auth.token.list_accessors()["data"]["keys"]:
        try:
            path = client.auth.token.lookup_accessor(accessor)["data"].get("path")
        except hvac.exceptions.InvalidRequest:
            continue
        if path == f"auth/{mount}/login":
            mine.append(accessor)
    return mine


class TestToken:
    def test_revoked_token_logs_in_again(self, world):
        """When the agent's Vault token is revoked, it logs in again and keeps publishing rotations."""
        agent = world.agent("500ms")
        client = world.client
        mine = _login_accessors(client, world.layout.auth_mount)
        assert len(mine) == 1, mine
        client.auth.token.revoke_accessor(mine[0])
        new = world.rotate()
        assert world.published(new, timeout=3), agent.stderr[-3000:]
        assert len(agent.events("vault_login")) == 2
        status, _ = agent.ready()
        assert status == 200

    def test_short_ttl_renewed_then_new_login_at_max_ttl(self, bao, make_world):
        """With token_ttl 4s and token_max_ttl 12s the token is renewed, then replaced by a new login."""
        world = make_world(bao, token_ttl="4s", token_max_ttl="12s")
        agent = world.agent("500ms")
        end = time.monotonic() + 12.5
        while time.monotonic() < end:
            new = world.rotate()
            assert world.published(new, timeout=2), agent.stderr[-4000:]
            time.sleep(1.5)
        assert len(agent.events("token_renewed")) >= 2, agent.stderr[-4000:]
        assert len(agent.events("vault_login")) >= 2, agent.stderr[-4000:]
        # never a login per poll: 12.5 s of polling every 0.5 s with a 12 s max TTL needs two
        assert len(agent.events("vault_login")) <= 4

    def test_sa_token_file_rotation_costs_no_login(self, world):
        """kubelet rotating the SA token file costs no login (no TokenReview): the Vault token in hand keeps
        working, and the new file is read at the next login the agent needs (here: its Vault token revoked)."""
        agent = world.agent("500ms")
        old = world.token_path.read_text()
        reviews = len(world.kube.tokenreviews())
        new_token = world.token().read_text()
        world.kube.revoke_token(old)
        rotated = world.rotate()
        assert world.published(rotated, timeout=3), agent.stderr[-3000:]
        time.sleep(1.5)  # three more polls
        assert len(agent.events("vault_login")) == 1, "a login per token-file rotation"
        assert len(world.kube.tokenreviews()) == reviews
        client = world.client
        for accessor in _login_accessors(client, world.layout.auth_mount):
            client.auth.token.revoke_accessor(accessor)
        again = world.rotate()
        assert world.published(again, timeout=5), agent.stderr[-3000:]
        reviewed = [r.body.get("spec", {}).get("token") for r in world.kube.tokenreviews()]
        assert reviewed[reviews:] == [new_token], "the next login reads the rotated file"


class TestTamper:
    @pytest.mark.parametrize("damage", ["visible_file", "data_link", "key_content"])
    def test_damage_is_restored(self, world, damage):
        """A deleted file, a deleted ..data or an altered key is restored within 2 s, byte-identical."""
        agent = world.agent("1s")
        good = world.files()
        if damage == "visible_file":
            (world.out / "ca-cert.pem").unlink()
        elif damage == "data_link":
            (world.out / "..data").unlink()
        else:
            (world.out / "..data" / "ca-key.pem").write_bytes(b"not a key\n")
        assert world.published(good, timeout=2), agent.stderr[-3000:]
        agent.wait_event("bundle_repaired", timeout=1)
        assert agent.metric(errors_total("tampered")) >= 1


class TestQuiet:
    def test_nothing_rewritten_when_nothing_changed(self, world):
        """Polls without a KV change rewrite nothing: same generation, same inodes and mtimes, one publish."""
        agent = world.agent("100ms")

        def snapshot() -> tuple[str, list[tuple[int, int]]]:
            stats = [os.stat(world.out / name) for name in ISTIO_FILES]
            return os.readlink(world.out / "..data"), [(s.st_ino, s.st_mtime_ns) for s in stats]

        first = snapshot()
        requests = agent.metric("istio_vault_agent_vault_requests_total")
        time.sleep(2)  # twenty polls
        assert snapshot() == first
        assert agent.metric(PUBLISH_TOTAL) == 1
        assert agent.metric("istio_vault_agent_vault_requests_total") >= requests + 10, "the agent did not poll"
        assert len(agent.events("bundle_published")) == 1


class TestReload:
    def test_exec_reload_after_publish_only(self, world, tmp_path):
        """The exec reload runs after each publish and not when a poll finds nothing new."""
        marker = tmp_path / "reloads"
        command = ["/bin/sh", "-c", f"echo reloaded >> {marker}"]
        agent = world.agent("100ms", reload={"action": "exec", "command": command})
        count = lambda: len(marker.read_text().splitlines()) if marker.exists() else 0  # noqa: E731
        assert wait_until(lambda: count() == 1, 2), agent.stderr[-3000:]
        world.rotate()
        assert wait_until(lambda: count() == 2, 2), agent.stderr[-3000:]
        time.sleep(1)  # ten polls that find nothing new
        assert count() == 2

    def test_sigterm_during_a_reload_command(self, world, tmp_path):
        """SIGTERM while an exec reload runs: the command is killed and reaped, the agent exits 0 promptly, and
        nothing is left to print a traceback after the event loop is gone."""
        started = tmp_path / "started"
        command = ["/bin/sh", "-c", f"echo $$ > {started}; exec sleep 30"]
        agent = world.agent("300ms", reload={"action": "exec", "command": command})
        assert wait_until(started.exists, 5), agent.stderr[-3000:]
        pid = int(wait_until(lambda: started.read_text().strip(), 2))
        code, took = agent.stop()
        assert code == 0 and took < 5, (code, took)
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
        assert "Traceback" not in agent.stderr and "Exception ignored" not in agent.stderr, agent.stderr[-3000:]

    def test_reload_command_gets_no_token_or_key(self, world, tmp_path):
        """The exec reload's argv and environment hold neither a Vault token (not even one the pod spec set in
        VAULT_TOKEN), a service-account token nor any key."""
        from tests.faultkit import LeakGuard

        dump = tmp_path / "child"
        script = "import os, sys, json; print(json.dumps({'argv': sys.argv, 'env': dict(os.environ)}))"
        command = ["/bin/sh", "-c", f'{sys.executable} -c "{script}" >> {dump}']
        agent = world.agent("300ms", reload={"action": "exec", "command": command},
                            env=cli_env(VAULT_TOKEN="s.AmbientTokenFromThePodSpec0123456789"))
        assert wait_until(dump.exists, 3), agent.stderr[-3000:]
        guard = LeakGuard()
        guard.secret("a VAULT_TOKEN in the pod's env", "s.AmbientTokenFromThePodSpec0123456789")
        guard.key_files("published bundle", world.current)
        for review in world.kube.tokenreviews():
            guard.secret("a service account token", review.body["spec"]["token"])
        guard.scan(dump.read_text(), "the reload command's argv and environment")  # also any token-shaped text

    def test_root_change_restarts_the_consumer(self, world, root):
        """A new root without multiroot logs root_changed and SIGTERMs the restart_process."""
        pattern = f"root-change-dummy-{world.unique}"
        dummy = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", pattern])
        try:
            agent = world.agent("500ms", multiroot=False, on_root_change="restart", restart_process=pattern)
            time.sleep(0.5)
            assert dummy.poll() is None, "a publish with the same root must not restart the consumer"
            new = world.rotate(world.bundle(pki.root_ca(cn="Second Root CA")))
            assert world.published(new, timeout=2.5)
            warning = agent.wait_event("root_changed", timeout=2)[0]
            assert warning["level"] == "warning" and "ISTIO_MULTIROOT_MESH" in warning["reason"]
            assert dummy.wait(timeout=3) == -signal.SIGTERM
        finally:
            dummy.kill()
            dummy.wait()

    def test_root_rotation_with_multiroot_restarts_nothing(self, world):
        """With multiroot: true the playbook's steps (root A, then A+B, then B's intermediate with A+B, then B
        only) each publish without a warning or a restart: istiod takes a root set that contains or is
        contained in the previous one."""
        pattern = f"root-change-dummy-{world.unique}"
        dummy = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", pattern])
        try:
            agent = world.agent("500ms", multiroot=True, on_root_change="restart", restart_process=pattern)
            root_b = pki.root_ca(cn="Second Root CA")
            both = world.root.cert_pem + root_b.cert_pem
            steps = [{**world.current, "root-cert.pem": both}, {**world.bundle(root_b), "root-cert.pem": both},
                     world.bundle(root_b)]
            for files in steps:
                new = world.rotate(files)
                assert world.published(new, timeout=2.5)
            time.sleep(1)
            assert dummy.poll() is None
            assert not agent.events("root_changed")
        finally:
            dummy.kill()
            dummy.wait()

    def test_disjoint_root_with_multiroot_restarts_the_consumer(self, world):
        """With multiroot: true a root set that neither contains nor is contained in the previous one is what
        istiod refuses on reload ("Updating new ROOT-CA not supported"): root_changed, and the restart."""
        pattern = f"root-change-dummy-{world.unique}"
        dummy = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", pattern])
        try:
            agent = world.agent("500ms", multiroot=True, on_root_change="restart", restart_process=pattern)
            new = world.rotate(world.bundle(pki.root_ca(cn="Second Root CA")))
            assert world.published(new, timeout=2.5)
            assert wait_until(lambda: dummy.poll() is not None, 5), agent.stderr[-3000:]
            assert "neither root set contains the other" in agent.events("root_changed")[0]["reason"]
        finally:
            dummy.kill()
            dummy.wait()


class TestKubernetes:
    """The agent's own calls to the Kubernetes API (the stand-in records them): Events and rollout-restart."""

    def test_events_on_the_pod_and_rollout_restart(self, world, kube, tmp_path):
        """With POD_NAME/POD_NAMESPACE it records BundlePublished, BundleRefused (once) and restarts the target."""
        kubeconfig = kube.write_kubeconfig(tmp_path / "kubeconfig", kube.mint_token("istio-system", "istiod"))
        pod = f"istiod-{world.unique}"
        env = cli_env(KUBECONFIG=str(kubeconfig), POD_NAME=pod, POD_NAMESPACE="istio-system")
        target = {"kind": "Deployment", "name": f"gw-{world.unique}", "namespace": "istio-system"}
        agent = world.agent("500ms", env=env, reload={"action": "rollout-restart", "target": target})
        new = world.rotate()
        # the first Event loads the kubernetes client (about a second of imports on a busy machine)
        assert world.published(new, timeout=5)
        other = world.bundle()
        world.layout.write(world.client, {**world.bundle(), "ca-key.pem": other["ca-key.pem"]})
        agent.wait_event("bundle_refused", timeout=3)
        time.sleep(1.5)  # more polls of the same refused version

        def reasons() -> list[str]:
            return [r.body.get("reason") for r in kube.requests_to("POST", "/api/v1/namespaces/istio-system/events")
                    if (r.body.get("involvedObject") or {}).get("name") == pod]

        assert wait_until(lambda: reasons().count("BundlePublished") == 2, 3), reasons()
        assert reasons().count("BundleRefused") == 1, reasons()
        patches = kube.requests_to("PATCH", f"/apis/apps/v1/namespaces/istio-system/deployments/{target['name']}")
        assert len(patches) == 2  # the first publish and the rotation
        annotations = patches[-1].body["spec"]["template"]["metadata"]["annotations"]
        assert "kubectl.kubernetes.io/restartedAt" in annotations


class TestLifecycle:
    def test_sigterm_exits_quickly_and_leaves_files(self, world):
        """/healthz answers 200 while running; SIGTERM exits 0 within 1 s and the files stay in place."""
        agent = world.agent("1s")
        status, body = agent.get("/healthz")
        assert status == 200, body
        published = world.files()
        rc, took = agent.stop()
        assert rc == 0 and took < 1.0, (rc, took, agent.stderr[-2000:])
        assert world.files() == published
        assert agent.events("sidecar_stopped")

    def test_not_ready_until_the_secret_exists(self, bao, make_world):
        """Before the secret exists /readyz is 503 with a JSON reason; the agent keeps retrying and turns ready."""
        world = make_world(bao, seed=False)
        agent = world.agent("500ms", ready=False)
        agent.wait_event("sync_failed", timeout=5)
        status, body = agent.ready()
        assert status == 503 and body["status"] == "not ready", body
        reason = body["bundles"][BUNDLE]["reason"]
        assert "not published yet" in reason and world.layout.kv in reason, reason
        assert agent.get("/healthz")[0] == 200
        assert agent.proc is not None and agent.proc.poll() is None
        files = world.rotate()
        assert world.published(files, timeout=8), agent.stderr[-3000:]
        assert wait_until(lambda: agent.ready()[0] == 200, 2)
        # a missing secret is not a token problem: no new Vault token (lease) per retry
        assert len(agent.events("vault_login")) == 1, agent.stderr[-3000:]
