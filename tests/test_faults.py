"""Faults at the agent level: SIGKILL mid-publish, a full disk, OpenBao restarted/sealed/slow, revoked tokens, load.

The agent runs as a real subprocess (`python -m agent.cli run`) against a real OpenBao reached through a loopback
proxy that can delay answers and records the Vault tokens in use; every test ends with a leak scan of its logs.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import hvac
import pytest

from agent import cli
from agent import validate as bundle
from testbed import pki
from testbed.bao import BaoNotFound, BaoServer, find_bao
from testbed.kubeapi import KubeAPI
from tests.faultkit import LeakGuard, Proxy, debris, fixture_leaks  # noqa: F401 - the `leaks` fixture
from tests.support import (
    ISTIO_FILES,
    AgentProc,
    KV2Layout,
    agent_config,
    error_line,
    live_files,
    run_cli,
    slow_only,
    wait_until,
    write_config,
)

# every test here runs on a private OpenBao, so the fixed layout (kv2/istio/cacerts, auth mount kubernetes) is safe
LAYOUT = KV2Layout()


@pytest.fixture(name="ca", scope="module")
def fixture_ca() -> tuple[pki.CertKey, list[dict[str, bytes]]]:
    """One root and six bundles signed by it (the root never changes, so no restart-on-root-change kicks in)."""
    root = pki.root_ca()
    return root, [pki.istio_ca_files(root, pki.intermediate_ca(root, cn=f"Intermediate CA {i}")) for i in range(6)]


@pytest.fixture(name="server", scope="module")
def fixture_server(kube: KubeAPI, ca) -> Iterator[BaoServer]:
    """A private OpenBao for this module (tests here write fixed paths and record every token in use)."""
    try:
        server = BaoServer(binary=find_bao())
    except BaoNotFound as exc:
        pytest.skip(str(exc))
    server.add_seeder(lambda c: LAYOUT.setup(c, kube, ca[1][0], token_ttl="1h"), run_now=False)
    server.start()
    yield server
    server.close()


@dataclass
class Lab:
    """One test's world: OpenBao behind a proxy, a service-account token file, an output dir, the leak guard."""

    server: BaoServer
    proxy: Proxy
    root: hvac.Client
    token: Path
    out: Path
    tmp: Path
    leaks: LeakGuard
    bundles: list[dict[str, bytes]]
    agents: list[AgentProc] = field(default_factory=list)

    def agent(
        self, mode: str = "sidecar", *, poll: str = "100ms", timeout: str = "1s", prefix: tuple[str, ...] = (),
        **cfg: str,
    ) -> AgentProc:
        """An agent (not started) on the proxy with vault.timeout `timeout`; its log is watched by the leak guard."""
        config = write_config(
            self.tmp / f"agent-{len(self.agents)}.yaml",
            agent_config(address=self.proxy.address, token_path=self.token, out=self.out, kv=LAYOUT.kv,
                         mount=LAYOUT.auth_mount, poll=poll, timeout=timeout, level="info", **cfg),
        )
        proc = AgentProc(config, mode=mode, prefix=prefix)
        self.leaks.watch(f"agent log {proc.log.name}", proc.log)
        self.agents.append(proc)
        return proc


def _lab(tmp_path: Path, server: BaoServer, kube: KubeAPI, leaks: LeakGuard, sa_token_file, bundles) -> Iterator[Lab]:
    root = server.client()
    LAYOUT.write(root, bundles[0])
    proxy = Proxy(server.port)
    token = sa_token_file("istio-system", "istiod")
    lab = Lab(server, proxy, root, token, tmp_path / "out", tmp_path, leaks, bundles)
    leaks.secret("root token", server.root_token)
    for i, files in enumerate(bundles):
        leaks.key_files(f"bundle {i}", files)
    try:
        yield lab
    finally:
        for agent in lab.agents:
            agent.stop()
        proxy.close()
        for t in proxy.tokens:
            leaks.secret("a Vault token the agent used", t)
        for t in kube.tokenreviews():
            leaks.secret("a service account token", t.body["spec"]["token"])


@pytest.fixture(name="lab")
def fixture_lab(tmp_path, server, kube, leaks, sa_token_file, ca) -> Iterator[Lab]:
    yield from _lab(tmp_path, server, kube, leaks, sa_token_file, ca[1])


def _assert_complete_generation(out: Path, bundles: list[dict[str, bytes]], capsys: pytest.CaptureFixture[str]) -> int:
    """..data names one whole bundle we wrote (no mix), its key matches its cert, `check` accepts it; its index."""
    files = live_files(out)
    assert sorted(files) == sorted(ISTIO_FILES), sorted(files)
    matches = [i for i, b in enumerate(bundles) if b == files]
    assert len(matches) == 1, "the live generation is not exactly one bundle that was written (mixed or partial)"
    bundle.validate("istio-ca", files)  # raises BundleError when ca-key.pem does not match ca-cert.pem
    for name in ISTIO_FILES:
        assert os.readlink(out / name) == f"..data/{name}"
        assert (out / name).read_bytes() == files[name]
    assert cli.main(["check", str(out)]) == 0
    assert capsys.readouterr().out.startswith("ok:")
    return matches[0]


class _Rotator:
    """Writes the bundles to KV v2 in turn, every few ms, until stopped: the agent publishes all the time."""

    def __init__(self, client: hvac.Client, bundles: list[dict[str, bytes]], every: float = 0.03) -> None:
        self.client, self.bundles, self.every = client, bundles, every
        self.stop_event = threading.Event()
        self.last = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        i = 0
        while not self.stop_event.is_set():
            i = (i + 1) % len(self.bundles)
            LAYOUT.write(self.client, self.bundles[i])
            self.last = i
            self.stop_event.wait(self.every)

    def __enter__(self) -> _Rotator:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        self.thread.join(timeout=10)


def _await_publish_in_progress(out: Path, timeout: float) -> None:
    """Return as soon as a publish is half-way (a new generation or temp link exists beside the live one)."""
    wait_until(lambda: debris(out), timeout, interval=0.0005)


def _kill_cycles(lab: Lab, kills: int, capsys: pytest.CaptureFixture[str]) -> None:
    rng = random.Random()
    agent = lab.agent(poll="100ms")
    seen: set[int] = set()
    interrupted = 0  # kills that caught a publish half-way (it left a temp link or a spare generation)
    with _Rotator(lab.root, lab.bundles) as rotator:
        for n in range(kills):
            published = len(agent.events("bundle_published"))
            agent.start()
            agent.wait_event("bundle_published", count=published + 1, timeout=20)
            if n % 2:
                time.sleep(rng.uniform(0.0, 0.4))  # a random moment: the agent publishes ~10 times a second
            else:
                _await_publish_in_progress(lab.out, timeout=1.0)  # or right inside a publish
            agent.kill()
            interrupted += bool(debris(lab.out))
            seen.add(_assert_complete_generation(lab.out, lab.bundles, capsys))
    # the last kill may have left a partial generation; plant one more, as a kill mid-write would leave it
    planted = lab.out / "..2001_01_01_00_00_00.planted"
    planted.mkdir()
    (planted / "ca-key.pem").write_bytes(lab.bundles[1]["ca-key.pem"][:40])
    for name in ("..data_tmp", "..tmp_ca-cert.pem"):
        (lab.out / name).unlink(missing_ok=True)
        os.symlink(planted.name, lab.out / name)
    last = lab.bundles[rotator.last]
    agent.start()
    assert wait_until(lambda: live_files(lab.out) == last and not debris(lab.out)), (
        "timed out waiting for the last bundle, cleaned up"
    )
    assert len(agent.events("bundle_published")) >= kills + 1
    assert len(seen) > 1, "every kill found the same bundle: the agent was not publishing"
    print(f"{kills} kills, {interrupted} of them mid-publish, {len(seen)} different bundles found live")
    assert agent.stop()[0] == 0
    entries = sorted(p.name for p in lab.out.iterdir())
    assert entries == sorted(["..data", os.readlink(lab.out / "..data"), *ISTIO_FILES]), entries
    check = run_cli("check", str(lab.out))
    assert check.returncode == 0, check.stderr
    lab.leaks.watch("check output", check.stdout + check.stderr)


class TestSigkill:
    def test_kills_during_publishes_leave_a_whole_generation(self, lab, capsys):
        """8 SIGKILLs at random moments of rapid publishing: always one whole, valid bundle; restart cleans up
        (100 with -m slow)."""
        _kill_cycles(lab, 8, capsys)

    @pytest.mark.slow
    def test_a_hundred_kills(self, lab, capsys, request):
        """The same with 100 SIGKILLs."""
        slow_only(request)
        _kill_cycles(lab, 100, capsys)


def _mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    try:
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
                              capture_output=True, text=True, check=False, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"cannot mount a tmpfs for the full-disk test: {exc}")
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs for the full-disk test (needs root or CAP_SYS_ADMIN): {proc.stderr.strip()}")


def _fill(path: Path) -> None:
    """Write `path` until the filesystem is full."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC, exc
    finally:
        os.close(fd)


def _errors_total(agent: AgentProc, reason: str) -> float:
    """istio_vault_agent_errors_total for `reason`, summed over bundles."""
    return sum(value for series, value in agent.metrics(timeout=10).items()
               if series.startswith("istio_vault_agent_errors_total{") and f'reason="{reason}"' in series)


class TestFullDisk:
    def test_full_disk_keeps_the_last_good_generation(self, lab):
        """With the output volume full the old bundle stays live and ready, the error is logged and counted;
        once space is freed the new bundle is published."""
        _mount_tmpfs(lab.out, "64k")
        try:
            agent = lab.agent(poll="200ms").start()
            agent.wait_event("sidecar_ready")
            assert live_files(lab.out) == lab.bundles[0]
            # leave two pages free: the new generation gets two of its four files written, then ENOSPC
            (lab.out / "reserve").write_bytes(b"\0" * 8192)
            _fill(lab.out / "filler")
            (lab.out / "reserve").unlink()
            LAYOUT.write(lab.root, lab.bundles[1])
            failed = agent.wait_event("sync_failed")[-1]
            assert "free space" in failed["reason"] and str(lab.out) in failed["reason"], failed
            time.sleep(0.5)
            assert live_files(lab.out) == lab.bundles[0]
            # the agent keeps retrying: one attempt may be writing right now, but none stays behind
            assert wait_until(lambda: debris(lab.out) == [], 3), "a failed publish left a partial generation behind"
            assert bundle.validate_dir(lab.out, "istio-ca")
            status, body = agent.get("/readyz", timeout=10)
            assert status == 200 and "free space" in body, body
            assert _errors_total(agent, "publish") >= 1
            (lab.out / "filler").unlink()
            assert wait_until(lambda: live_files(lab.out) == lab.bundles[1], 15), (
                "timed out waiting for the new bundle after freeing"
            )
            assert debris(lab.out) == []
        finally:
            for a in lab.agents:
                a.stop()
            subprocess.run(["umount", "-l", str(lab.out)], check=False, capture_output=True)


class TestHealthUnderLoad:
    def test_a_thousand_concurrent_requests(self, lab):
        """1000 concurrent probes and scrapes are all answered, and no answer carries a key or a token."""
        import aiohttp

        agent = lab.agent(poll="1s").start()
        agent.wait_event("sidecar_ready")
        health = agent.health
        paths = ["/healthz", "/readyz", "/metrics", "/nothing-here"]
        want = {"/healthz": 200, "/readyz": 200, "/metrics": 200, "/nothing-here": 404}

        async def burst() -> list[tuple[str, int, str]]:
            connector = aiohttp.TCPConnector(limit=0, force_close=True)
            timeout = aiohttp.ClientTimeout(total=60)
            async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

                async def one(path: str) -> tuple[str, int, str]:
                    async with session.get(f"{health}{path}") as resp:
                        return path, resp.status, await resp.text()

                return await asyncio.gather(*(one(paths[i % 4]) for i in range(1000)))

        answers = asyncio.run(burst())
        assert len(answers) == 1000
        wrong = [(p, s) for p, s, _ in answers if s != want[p]]
        assert not wrong, wrong[:5]
        for path, _, body in answers[:8]:
            lab.leaks.scan(body, f"GET {path}")
        for _, _, body in answers:
            assert "PRIVATE KEY" not in body and "eyJ" not in body
        lab.leaks.watch("health answers", "\n".join(b for _, _, b in answers))
        assert agent.get("/healthz", timeout=10)[0] == 200

    def test_twelve_hundred_half_open_connections_under_a_1024_file_limit(self, lab):
        """1200 connections that never send a request, against an agent limited to 1024 open files: the excess is
        closed at once, the silent ones after the header timeout, /healthz answers again within seconds, a
        rotation is still published, and the log gets a few lines, not a traceback per connection."""
        import socket

        limit = ("import os, resource, sys; resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024));"
                 " os.execv(sys.argv[1], sys.argv[1:])")
        agent = lab.agent(poll="200ms", prefix=(sys.executable, "-c", limit)).start()
        agent.wait_event("sidecar_ready")
        port = agent.port
        held: list[socket.socket] = []
        try:
            start = time.monotonic()
            for _ in range(1200):
                s = socket.socket()
                s.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    s.connect(("127.0.0.1", port))
                held.append(s)
            LAYOUT.write(lab.root, lab.bundles[1])
            answered = wait_until(lambda: _probe(agent) == 200, timeout=15, interval=0.2)
            recovered = time.monotonic() - start
            assert answered, agent.tail()
            assert recovered < 10, recovered
            assert wait_until(lambda: live_files(lab.out) == lab.bundles[1], 10), agent.tail()
            assert all(_probe(agent) == 200 for _ in range(10))
        finally:
            for s in held:
                s.close()
        log = agent.stderr
        assert "Traceback" not in log
        assert len(log) < 64 * 1024 and len(log.splitlines()) < 200, len(log)


def _probe(agent: AgentProc) -> int:
    try:
        return agent.get("/healthz", timeout=2)[0]
    except OSError:
        return 0


# ------------------------------------------------------------------------------------------- OpenBao faults


@pytest.fixture(name="private")
def fixture_private(tmp_path, bao_factory, kube, leaks, sa_token_file, ca) -> Iterator[Lab]:
    """A Lab on an OpenBao of this test's own, which it may stop, seal and restart."""
    server = bao_factory(start=False)
    server.add_seeder(lambda c: LAYOUT.setup(c, kube, ca[1][0], token_ttl="1h"), run_now=False)
    server.start()
    yield from _lab(tmp_path, server, kube, leaks, sa_token_file, ca[1])


class TestSlowVault:
    def test_init_gives_up_with_one_line_when_vault_is_too_slow(self, private):
        """Answers slower than vault.timeout are retried until init.timeout, then one line names the cause."""
        private.proxy.delay = 2.5
        agent = private.agent(mode="init", timeout="1s", init_timeout="3s")
        start = time.monotonic()
        proc = run_cli("run", "--config", str(agent.config), "--mode", "init", timeout=60)
        elapsed = time.monotonic() - start
        private.leaks.watch("init stderr", proc.stderr)
        assert proc.returncode == 1, proc.stderr
        line = error_line(proc)
        assert "did not answer in time" in line and "init.timeout (3s" in line, line
        assert private.proxy.address in line
        assert 3 <= elapsed < 10, elapsed
        assert not private.out.exists() or not any(private.out.iterdir())

    def test_init_succeeds_once_vault_answers_in_time(self, private):
        """Init retries through slow answers and publishes as soon as OpenBao answers within vault.timeout."""
        private.proxy.delay = 2.5
        agent = private.agent(mode="init", timeout="1s", init_timeout="30s").start()
        agent.wait_event("sync_failed", timeout=20)
        private.proxy.delay = 0
        assert agent.proc is not None
        assert agent.proc.wait(timeout=30) == 0, agent.tail()
        first = agent.events("sync_failed")[0]
        assert "did not answer in time" in first["reason"] and first["retryable"] is True
        assert live_files(private.out) == private.bundles[0]


class TestSidecarThroughFaults:
    def test_slow_sealed_and_restarted_vault(self, private):
        """The sidecar keeps serving the last bundle while OpenBao is slow, sealed or restarted, and catches up."""
        lab = private
        agent = lab.agent(poll="100ms", timeout="1s").start()
        agent.wait_event("sidecar_ready")

        def still_serving(index: int, why: str) -> None:
            failed = agent.wait_event("sync_failed", count=len(agent.events("sync_failed")) + 1, timeout=20)[-1]
            assert why in failed["reason"], failed
            assert live_files(lab.out) == lab.bundles[index]
            assert agent.get("/readyz", timeout=10)[0] == 200
            assert agent.get("/healthz", timeout=10)[0] == 200

        # slow: every answer takes longer than vault.timeout
        lab.proxy.delay = 1.5
        LAYOUT.write(lab.root, lab.bundles[1])
        still_serving(0, "did not answer in time")
        lab.proxy.delay = 0
        assert wait_until(lambda: live_files(lab.out) == lab.bundles[1]), (
            "timed out waiting for bundle 1 after the slowness"
        )

        # sealed, then unsealed
        lab.server.seal()
        still_serving(1, "sealed")
        lab.server.unseal()
        LAYOUT.write(lab.root, lab.bundles[2])
        assert wait_until(lambda: live_files(lab.out) == lab.bundles[2]), (
            "timed out waiting for bundle 2 after unsealing"
        )

        # restarted: a dev server comes back empty, with new tokens; the seeder writes bundle 0 again
        logins = len(agent.events("vault_login"))
        lab.server.stop()
        lab.proxy.drop_connections()
        still_serving(2, "cannot reach Vault")
        lab.server.start()
        LAYOUT.write(lab.server.client(), lab.bundles[3])
        assert wait_until(lambda: live_files(lab.out) == lab.bundles[3], 20), (
            "timed out waiting for bundle 3 after the restart"
        )
        assert len(agent.events("vault_login")) > logins, "the agent did not log in to the new server"
        assert agent.proc is not None and agent.proc.poll() is None
        assert agent.stop()[0] == 0


class TestTokens:
    def test_revoked_vault_token_and_rotated_service_account_token(self, private, kube, sa_token_file):
        """The agent's Vault token revoked and its SA token rotated (old one revoked): it logs in again, carries on."""
        lab = private
        agent = lab.agent(poll="200ms").start()
        agent.wait_event("sidecar_ready")
        old_jwt = lab.token.read_text()
        revoked = set(lab.proxy.tokens) - {lab.server.root_token}
        assert revoked, "the proxy saw no token of the agent"
        for token in revoked:
            lab.root.auth.token.revoke(token)
        kube.revoke_token(old_jwt)
        sa_token_file("istio-system", "istiod")
        LAYOUT.write(lab.root, lab.bundles[4])
        assert wait_until(lambda: live_files(lab.out) == lab.bundles[4], 20), (
            "timed out waiting for bundle 4 with new tokens"
        )
        assert len(agent.events("vault_login")) >= 2
        assert agent.proc is not None and agent.proc.poll() is None

    def test_init_with_a_revoked_service_account_token(self, private, kube):
        """Init with a revoked SA token fails at once with one line naming the role and the token file."""
        kube.revoke_token(private.token.read_text())
        agent = private.agent(mode="init")
        start = time.monotonic()
        proc = run_cli("run", "--config", str(agent.config), "--mode", "init")
        private.leaks.watch("init stderr", proc.stderr)
        assert proc.returncode == 1 and time.monotonic() - start < 10
        line = error_line(proc)
        assert "login refused" in line and "'istiod'" in line and str(private.token) in line, line

    def test_init_with_a_garbage_token_file(self, private):
        """A token file holding garbage is refused with one line, without echoing the file's content."""
        private.token.write_text("not-a-jwt-" + "x" * 40)
        agent = private.agent(mode="init")
        proc = run_cli("run", "--config", str(agent.config), "--mode", "init")
        private.leaks.secret("garbage token", "x" * 40)
        private.leaks.watch("init stderr", proc.stderr)
        assert proc.returncode == 1
        assert "login refused" in error_line(proc)



class TestQuietDoubles:
    def test_a_client_that_resets_mid_request_prints_no_traceback(self, capfd: pytest.CaptureFixture[str]) -> None:
        """The HTTP test doubles (faultkit's proxy and recorder) say nothing when a client resets its connection
        mid-request, as the agent does with a request it gave up on: the run's output stays free of tracebacks."""
        import socket
        import struct

        from tests.faultkit import Recorder

        recorder = Recorder()
        try:
            for _ in range(3):
                with socket.create_connection(("127.0.0.1", recorder.port), timeout=5) as sock:
                    sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\npartial")
                    time.sleep(0.05)  # the handler is now reading the body
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = RST
            time.sleep(0.3)
        finally:
            recorder.close()
        err = capfd.readouterr().err
        assert "Traceback" not in err and "ConnectionResetError" not in err, err
