"""Degrade, don't die: a running sidecar against a hostile or starved node. A generation planted with a huge sparse
file or a directory, inotify exhausted (in a user namespace of the test's own), a FIFO in place of the token file,
a stderr nobody reads or that is closed, SIGHUP/SIGUSR1/SIGUSR2, and a flood of idle health connections."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
import termios
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from testbed import pki
from tests.support import (
    ROOT,
    AgentProc,
    KV2Layout,
    agent_config,
    cli_env,
    live_files,
    wait_until,
    write_config,
)

#: fcntl's F_SETPIPE_SZ (Linux), not exported by Python 3.11's fcntl module
_F_SETPIPE_SZ = 1031


@pytest.fixture(name="bundles", scope="module")
def fixture_bundles() -> list[dict[str, bytes]]:
    """Two good istio-ca bundles under one root (a rotation)."""
    root = pki.root_ca()
    return [pki.istio_ca_files(root, pki.intermediate_ca(root)) for _ in range(2)]


@pytest.fixture(name="layout")
def fixture_layout(vault_admin, kube, unique, bundles) -> KV2Layout:
    """A KV v2 layout of this test's own on the shared server, holding the first bundle."""
    return KV2Layout.unique(unique).setup(vault_admin, kube, bundles[0])


def _config(tmp_path: Path, bao, sa_token_file, layout: KV2Layout, *, poll: str = "1s", **extra: Any) -> Path:
    cfg = agent_config(address=bao.address, token_path=sa_token_file(), out=tmp_path / "ca", kv=layout.kv,
                       mount=layout.auth_mount, poll=poll)
    for section, values in extra.items():
        cfg.setdefault(section, {}).update(values)
    return write_config(tmp_path / "agent.yaml", cfg)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _healthz(port: int, timeout: float = 1.0) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=timeout) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return 0


def _status(pid: int, field: str) -> int:
    """A `VmXXX:` value of /proc/PID/status, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _generation(out: Path) -> Path:
    return out / os.readlink(out / "..data")


def _live(out: Path) -> dict[str, bytes] | None:
    """`live_files`, or None while the live generation holds something that is not a file (planted)."""
    try:
        return live_files(out)
    except OSError:
        return None


def _sidecar(config: Path, **kw: Any) -> AgentProc:
    agent = AgentProc(config, **kw).start()
    agent.wait_event("sidecar_ready", timeout=30)
    return agent


# ------------------------------------------------------------------------------------------- planted generations


class TestPlantedGeneration:
    def test_a_huge_sparse_file_is_never_read(self, tmp_path, bao, sa_token_file, layout, bundles):
        """A 300 MiB sparse file planted in the live generation is replaced by a fresh publish without being read:
        the agent's peak RSS stays well under the chart's 128 MiB limit."""
        out = tmp_path / "ca"
        agent = _sidecar(_config(tmp_path, bao, sa_token_file, layout))
        try:
            assert agent.proc is not None
            old = _generation(out)
            with (old / "planted.bin").open("wb") as f:
                f.truncate(300 << 20)
            agent.wait_event("bundle_repaired", timeout=15)
            assert wait_until(lambda: _generation(out) != old and live_files(out) == bundles[0], 10), agent.tail()
            assert not old.exists()
            peak = _status(agent.proc.pid, "VmHWM")
            assert peak < 100 * 1024, f"peak RSS {peak} KiB"
            assert agent.proc.poll() is None
        finally:
            agent.stop()

    def test_a_subdirectory_neither_blocks_publishing_nor_leaks(
        self, tmp_path, bao, sa_token_file, layout, bundles, vault_admin
    ):
        """A directory planted in the live generation is replaced by a fresh publish, again and again, and the
        agent's open descriptors do not grow; a rotation is still published."""
        out = tmp_path / "ca"
        agent = _sidecar(_config(tmp_path, bao, sa_token_file, layout, poll="200ms"))
        try:
            assert agent.proc is not None
            time.sleep(0.5)
            before = _fds(agent.proc.pid)
            for round_ in range(1, 6):
                old = _generation(out)
                (old / "sub").mkdir()
                agent.wait_event("bundle_repaired", count=round_, timeout=15)
                assert wait_until(lambda old=old: _generation(out) != old, 10), agent.tail()
            assert live_files(out) == bundles[0]
            time.sleep(0.5)
            assert _fds(agent.proc.pid) <= before + 2, (before, os.listdir(f"/proc/{agent.proc.pid}/fd"))
            assert not agent.events("repair_failed"), agent.tail()
            (_generation(out) / "sub").mkdir()
            layout.write(vault_admin, bundles[1])
            assert wait_until(lambda: _live(out) == bundles[1], 10), agent.tail()
        finally:
            agent.stop()


class TestLockedDir:
    def test_a_bundle_dir_locked_by_another_process_does_not_hold_up_the_exit(
        self, tmp_path, bao, sa_token_file, layout
    ):
        """Another process holds the flock on the bundle dir (a second agent on the same volume, a backup tool):
        init mode still ends at init.timeout with one line naming the lock, and exits; it never waits forever in
        a thread that SIGTERM cannot stop."""
        out = tmp_path / "ca"
        out.mkdir()
        cfg = agent_config(address=bao.address, token_path=sa_token_file(), out=out, kv=layout.kv,
                           mount=layout.auth_mount, init_timeout="3s")
        fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            start = time.monotonic()
            proc = subprocess.run(
                [sys.executable, "-m", "agent.cli", "run", "--config", str(write_config(tmp_path / "a.yaml", cfg)),
                 "--mode", "init"], capture_output=True, text=True, timeout=30, env=cli_env(), cwd=ROOT, check=False,
            )
            took = time.monotonic() - start
        finally:
            os.close(fd)
        lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
        assert proc.returncode == 1 and len(lines) == 1, proc.stderr[-2000:]
        assert "lock" in lines[0] and str(out) in lines[0], lines[0]
        assert took < 10, took


# ------------------------------------------------------------------------------------------- file watcher


def _unshare_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "--user", "--map-root-user", "sh", "-c", "echo 8 > /proc/sys/user/max_inotify_instances"],
        capture_output=True, check=False, timeout=10,
    )
    return probe.returncode == 0


class TestInotifyUnavailable:
    @pytest.mark.parametrize("limit", ["max_inotify_instances", "max_inotify_watches"])
    def test_polls_instead(self, tmp_path, bao, sa_token_file, layout, bundles, limit):
        """With inotify instances or watches exhausted (set to 0 in a user namespace of the test's own, never the
        machine's), the sidecar says so once, exports the polling gauge, and still heals tampering."""
        if not _unshare_works():
            pytest.skip("unprivileged user namespaces are not available here")
        out = tmp_path / "ca"
        prefix = ("unshare", "--user", "--map-root-user", "sh", "-c", f'echo 0 > /proc/sys/user/{limit} && exec "$@"',
                  "sh")
        agent = _sidecar(_config(tmp_path, bao, sa_token_file, layout, poll="500ms"), prefix=prefix)
        try:
            warning = agent.wait_event("file_watch_polling", timeout=10)
            assert len(warning) == 1 and "inotify" in warning[0]["reason"], warning
            assert agent.metric("istio_vault_agent_file_watch_polling") == 1
            assert not [e for e in agent.events() if e.get("level") == "error"], agent.tail()
            (out / "ca-cert.pem").unlink()
            agent.wait_event("bundle_repaired", timeout=10)
            assert live_files(out) == bundles[0] and (out / "ca-cert.pem").exists()
            assert agent.proc is not None and agent.proc.poll() is None
            assert len(agent.events("file_watch_polling")) == 1
        finally:
            agent.stop()

    def test_with_inotify_the_gauge_is_zero(self, tmp_path, bao, sa_token_file, layout):
        """On a node with inotify to spare the gauge says 0 and nothing is logged about polling."""
        agent = _sidecar(_config(tmp_path, bao, sa_token_file, layout))
        try:
            assert wait_until(lambda: "istio_vault_agent_file_watch_polling" in agent.metrics(), 5)
            assert agent.metric("istio_vault_agent_file_watch_polling") == 0
            assert not agent.events("file_watch_polling")
        finally:
            agent.stop()

    def test_a_fifo_swapped_in_for_the_token_keeps_health_answering(self, tmp_path, bao, sa_token_file, layout):
        """A FIFO put in place of the service-account token file while the sidecar runs: /healthz keeps answering
        (the token is read off the event loop, never blocking)."""
        agent = _sidecar(_config(tmp_path, bao, sa_token_file, layout))
        try:
            port = agent.port
            token = tmp_path / "serviceaccount" / "token"
            token.unlink()
            os.mkfifo(token)
            time.sleep(0.3)  # the watcher's debounce
            answered = [_healthz(port, timeout=1.0) for _ in range(6)]
            assert answered == [200] * 6, (answered, agent.tail())
        finally:
            agent.stop()


# ------------------------------------------------------------------------------------------- logging


class TestLogPipe:
    def test_a_stderr_nobody_reads_does_not_block_probes(self, tmp_path, bao, sa_token_file, layout):
        """stderr is a 4 KiB pipe nobody reads (a stuck log pipeline) and the sidecar keeps logging: 9 of 9
        /healthz probes are answered in 8 s, and the bundle is still healed."""
        out = tmp_path / "ca"
        port = _free_port()
        cfg = _config(tmp_path, bao, sa_token_file, layout, poll="200ms", health={"listen": f"127.0.0.1:{port}"},
                      log={"level": "debug"})
        read_end, write_end = os.pipe()
        fcntl.fcntl(write_end, _F_SETPIPE_SZ, 4096)
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "run", "--config", str(cfg), "--mode", "sidecar"],
            cwd=ROOT, env=cli_env(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=write_end,
        )
        os.close(write_end)
        try:
            assert wait_until(lambda: _healthz(port) == 200, 20), "the sidecar never answered /healthz"
            assert wait_until((out / "..data").exists, 10)
            # keep it logging (a repair line each time) until the pipe is full
            def full() -> bool:
                with contextlib.suppress(FileNotFoundError):
                    (out / "ca-cert.pem").unlink()
                waiting = fcntl.ioctl(read_end, termios.FIONREAD, b"\0\0\0\0")
                return int.from_bytes(waiting, sys.byteorder) > 3600

            assert wait_until(full, 10, interval=0.05), "the pipe never filled: the test proves nothing"
            answered = 0
            start = time.monotonic()
            for _ in range(9):
                with contextlib.suppress(FileNotFoundError):
                    (out / "ca-cert.pem").unlink()
                answered += _healthz(port, timeout=0.8) == 200
                time.sleep(0.05)
            elapsed = time.monotonic() - start
            assert answered == 9 and elapsed < 8, (answered, elapsed)
            assert proc.poll() is None
        finally:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            os.close(read_end)

    @pytest.mark.parametrize("how", ["read_end_closed", "fds_closed"])
    def test_closed_stdout_and_stderr_change_nothing(self, tmp_path, bao, sa_token_file, layout, bundles, how):
        """With stdout and stderr both closed (or pipes whose reader is gone), the sidecar still publishes and
        answers /healthz, and a fatal error still writes the termination message and exits 1."""
        out = tmp_path / "ca"
        port = _free_port()
        termination = tmp_path / "termination-log"
        cfg = _config(tmp_path, bao, sa_token_file, layout, health={"listen": f"127.0.0.1:{port}"},
                      log={"termination_message_path": str(termination)})

        def spawn(mode: str, config: Path) -> subprocess.Popen[bytes]:
            command = [sys.executable, "-m", "agent.cli", "run", "--config", str(config), "--mode", mode]
            if how == "fds_closed":
                return subprocess.Popen(["sh", "-c", 'exec 1>&- 2>&-; exec "$@"', "sh", *command], cwd=ROOT,
                                        env=cli_env(), stdin=subprocess.DEVNULL)
            read_end, write_end = os.pipe()
            os.close(read_end)
            try:
                return subprocess.Popen(command, cwd=ROOT, env=cli_env(), stdin=subprocess.DEVNULL, stdout=write_end,
                                        stderr=write_end)
            finally:
                os.close(write_end)

        sidecar = spawn("sidecar", cfg)
        try:
            assert wait_until(lambda: (out / "..data").exists() or sidecar.poll() is not None, 20)
            assert sidecar.poll() is None, f"the sidecar exited {sidecar.returncode}"
            assert live_files(out) == bundles[0]
            assert wait_until(lambda: _healthz(port) == 200, 10)
        finally:
            sidecar.terminate()
            assert sidecar.wait(timeout=10) == 0
        # a fatal error (a role Vault does not know) in init mode: the message still reaches the termination log
        bad = _config(tmp_path, bao, sa_token_file, layout, auth={"role": "nobody"}, init={"timeout": "3s"},
                      log={"termination_message_path": str(termination)})
        init = spawn("init", bad)
        assert init.wait(timeout=30) == 1
        text = termination.read_text()
        assert text.startswith("error: ") and text.count("\n") == 1, text


# ------------------------------------------------------------------------------------------- signals


class TestSignals:
    def test_sighup_syncs_every_bundle_now(self, tmp_path, bao, sa_token_file, layout, bundles, vault_admin):
        """SIGHUP on a sidecar that polls every 5 minutes: a changed secret is published within 2 s."""
        out = tmp_path / "ca"
        agent = _sidecar(_config(tmp_path, bao, sa_token_file, layout, poll="300s"))
        try:
            assert agent.proc is not None
            time.sleep(0.3)
            layout.write(vault_admin, bundles[1])
            start = time.monotonic()
            agent.proc.send_signal(signal.SIGHUP)
            assert wait_until(lambda: live_files(out) == bundles[1], 5), agent.tail()
            assert time.monotonic() - start < 2.5
            assert agent.wait_event("resync_requested")[0]["signal"] == "SIGHUP"
            assert agent.proc.poll() is None
        finally:
            agent.stop()

    def test_sigusr1_and_sigusr2_are_logged_and_ignored(self, tmp_path, bao, sa_token_file, layout):
        """SIGUSR1 and SIGUSR2 neither kill nor disturb the sidecar; each is one log line."""
        agent = _sidecar(_config(tmp_path, bao, sa_token_file, layout))
        try:
            assert agent.proc is not None
            for sig in (signal.SIGUSR1, signal.SIGUSR2):
                agent.proc.send_signal(sig)
            events = agent.wait_event("signal_ignored", count=2, timeout=5)
            assert sorted(e["signal"] for e in events) == ["SIGUSR1", "SIGUSR2"]
            assert agent.proc.poll() is None
            assert agent.get("/healthz")[0] == 200
        finally:
            assert agent.stop()[0] == 0


# ------------------------------------------------------------------------------------------- health port


class TestIdleConnectionFlood:
    def test_two_thousand_idle_connections(self, tmp_path, bao, sa_token_file, layout):
        """2,000 connections that never send a request, against a sidecar limited to 1024 open files (its
        connection cap is then 896): 18 probes right after are each answered within 1 s."""
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < 2200:
            if hard != resource.RLIM_INFINITY and hard < 2200:
                pytest.skip("this process may not open 2,200 files")
            resource.setrlimit(resource.RLIMIT_NOFILE, (2200, hard))
        limit = ("import os, resource, sys; resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024));"
                 " os.execv(sys.argv[1], sys.argv[1:])")
        agent = _sidecar(_config(tmp_path, bao, sa_token_file, layout), prefix=(sys.executable, "-c", limit))
        port = agent.port
        held: list[socket.socket] = []
        try:
            for _ in range(2000):
                s = socket.socket()
                s.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    s.connect(("127.0.0.1", port))
                held.append(s)
            time.sleep(0.3)
            slow = []
            for i in range(18):
                start = time.monotonic()
                status = _healthz(port, timeout=1.0)
                took = time.monotonic() - start
                if status != 200 or took > 1.0:
                    slow.append((i, status, round(took, 2)))
            assert not slow, slow
        finally:
            for s in held:
                s.close()
            agent.stop()


class TestKeptAliveFlood:
    def test_connections_idle_after_one_request_do_not_lock_probes_out(self, tmp_path, bao, sa_token_file, layout):
        """1,000 connections that each send one request, get the answer, then stay open and silent (HTTP keep-alive),
        against a sidecar whose connection cap is 896: probes from half a second later are each answered within 1 s
        (before, the silent connections kept every slot for keep-alive + header time, 10 s, refusing every probe)."""
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < 1200:
            if hard != resource.RLIM_INFINITY and hard < 1200:
                pytest.skip("this process may not open 1,200 files")
            resource.setrlimit(resource.RLIMIT_NOFILE, (1200, hard))
        limit = ("import os, resource, sys; resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024));"
                 " os.execv(sys.argv[1], sys.argv[1:])")
        agent = _sidecar(_config(tmp_path, bao, sa_token_file, layout), prefix=(sys.executable, "-c", limit))
        port = agent.port
        held: list[socket.socket] = []
        try:
            for _ in range(1000):
                s = socket.create_connection(("127.0.0.1", port), timeout=5)
                try:
                    s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                    s.recv(4096)
                except OSError:
                    s.close()
                    continue
                held.append(s)
            time.sleep(0.6)
            slow = []
            for i in range(10):
                start = time.monotonic()
                status = _healthz(port, timeout=1.0)
                took = time.monotonic() - start
                if status != 200 or took > 1.0:
                    slow.append((i, status, round(took, 2)))
            assert not slow, (len(held), slow)
        finally:
            for s in held:
                s.close()
            agent.stop()
