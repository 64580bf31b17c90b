"""Reload actions against real processes: nginx re-reading a published cert on SIGHUP, commands, HTTP endpoints."""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import web
from cryptography import x509

from agent.config import Duration, ExecReload, HttpReload, IstioCaBundle, KvVariant, NoReload, Reload, SignalReload
from agent.errors import ReloadError
from agent.publish import publish
from agent.reload import STDERR_TAIL, find_processes, reload, restart_on_root_change
from testbed import pki

REPO = Path(__file__).resolve().parent.parent
NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)


def _bundle(action: Reload, **kwargs: object) -> IstioCaBundle:
    return IstioCaBundle(
        name="web", dir="/unused", source=KvVariant(kv="secret/web"), reload=action, **kwargs  # type: ignore[arg-type]
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def _wait(predicate: object, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False


@pytest.fixture(name="sleeper")
def fixture_sleeper() -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """A child process with a distinctive argv, and that marker."""
    marker = f"pilot-discovery-test-{secrets.token_hex(4)}"
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", marker])
    assert _wait(lambda: find_processes(marker) == [proc.pid])
    yield proc, marker
    if proc.poll() is None:
        proc.kill()
    proc.wait()


# ------------------------------------------------------------------------------------------- nginx


@dataclass
class Nginx:
    """A real nginx serving the published tls.crt/tls.key on a loopback port."""

    proc: subprocess.Popen[bytes]
    port: int
    certs: Path
    pid_file: Path
    conf: Path
    ca: pki.CertKey

    def publish_leaf(self) -> int:
        """Publish a new leaf for 127.0.0.1 into the cert dir; returns its serial."""
        leaf = pki.leaf_cert(self.ca)
        result = publish(self.certs, pki.tls_files(leaf, self.ca))
        assert result.changed
        return int(leaf.cert.serial_number)

    def served_serial(self) -> int | None:
        """Serial of the certificate a fresh TLS handshake gets, or None while nginx is not answering."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        try:
            with (
                socket.create_connection(("127.0.0.1", self.port), timeout=2) as sock,
                ctx.wrap_socket(sock) as tls,
            ):
                der = tls.getpeercert(binary_form=True)
        except OSError:
            return None
        assert der is not None
        return int(x509.load_der_x509_certificate(der).serial_number)


@pytest.fixture(name="nginx")
def fixture_nginx(tmp_path: Path) -> Iterator[Nginx]:
    """nginx (master + 1 worker, daemon off) from a temp-dir config whose cert dir is published by the agent."""
    if NGINX is None:
        pytest.skip("nginx is not installed (Debian package nginx; .ci/run installs it)")
    ca = pki.root_ca(cn=f"reload test {secrets.token_hex(3)}")
    certs = tmp_path / "certs"
    first = pki.leaf_cert(ca)
    publish(certs, pki.tls_files(first, ca))
    port = _free_port()
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (tmp_path / "tmp" / sub).mkdir(parents=True)
    pid_file = tmp_path / "nginx.pid"
    conf = tmp_path / "nginx.conf"
    conf.write_text(
        f"""
daemon off;
worker_processes 1;
pid {pid_file};
error_log {tmp_path}/error.log warn;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {tmp_path}/tmp/body;
    proxy_temp_path {tmp_path}/tmp/proxy;
    fastcgi_temp_path {tmp_path}/tmp/fastcgi;
    uwsgi_temp_path {tmp_path}/tmp/uwsgi;
    scgi_temp_path {tmp_path}/tmp/scgi;
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {certs}/tls.crt;
        ssl_certificate_key {certs}/tls.key;
        location / {{ return 200 "ok\\n"; }}
    }}
}}
"""
    )
    proc = subprocess.Popen(
        [NGINX, "-p", str(tmp_path), "-c", str(conf), "-e", str(tmp_path / "error.log")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    server = Nginx(proc, port, certs, pid_file, conf, ca)
    try:
        if not _wait(lambda: server.served_serial() is not None and pid_file.exists(), timeout=10):
            log = (tmp_path / "error.log").read_text() if (tmp_path / "error.log").exists() else ""
            pytest.fail(f"nginx did not start: {log[-500:]}")
        assert server.served_serial() == first.cert.serial_number
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class TestSignalReload:
    def _rotate_and_reload(self, nginx: Nginx, action: SignalReload) -> str:
        old = nginx.served_serial()
        new = nginx.publish_leaf()
        # nginx reads certificates only at (re)load: without the signal the old one is still served
        assert nginx.served_serial() == old
        desc = asyncio.run(reload(_bundle(action)))
        assert _wait(lambda: nginx.served_serial() == new), "nginx still serves the old certificate after SIGHUP"
        assert nginx.proc.poll() is None
        return desc

    def test_sighup_by_process_pattern(self, nginx: Nginx) -> None:
        """SIGHUP to the process whose command line matches makes nginx serve the newly published cert."""
        # the master's argv is "nginx: master process <nginx> -p DIR ..."; the -p DIR part keeps other
        # test runs' nginx out of it
        pattern = f"nginx: master process {NGINX} -p {nginx.conf.parent} "
        desc = self._rotate_and_reload(nginx, SignalReload(signal="SIGHUP", process=pattern))
        assert desc == f"sent SIGHUP to pid {nginx.proc.pid} matching {pattern!r}"

    def test_hup_by_pid_file(self, nginx: Nginx) -> None:
        """The short signal name HUP sent to the pid in nginx's pid file reloads it too."""
        desc = self._rotate_and_reload(nginx, SignalReload(signal="HUP", pid_file=str(nginx.pid_file)))
        assert str(nginx.proc.pid) in desc

    def test_no_matching_process(self) -> None:
        """A pattern nothing matches is an error that points at shareProcessNamespace."""
        pattern = f"nginx: master {secrets.token_hex(6)}"
        with pytest.raises(ReloadError, match="shareProcessNamespace: true") as err:
            asyncio.run(reload(_bundle(SignalReload(process=pattern))))
        assert f"no process matches {pattern!r}" in str(err.value)

    def test_never_signals_itself(self) -> None:
        """The agent's own command line matching the pattern does not make it signal itself."""
        marker = f"self-{secrets.token_hex(4)}"
        code = (
            "import asyncio, sys\n"
            "from agent.config import IstioCaBundle, KvVariant, SignalReload\n"
            "from agent.errors import ReloadError\n"
            "from agent.reload import reload\n"
            "b = IstioCaBundle(name='x', dir='/x', source=KvVariant(kv='a/b'),"
            " reload=SignalReload(signal='SIGTERM', process=sys.argv[1]))\n"
            "try:\n    asyncio.run(reload(b))\nexcept ReloadError as e:\n    print('refused:', e)\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", code, marker], cwd=REPO, capture_output=True, text=True, timeout=30, check=False
        )
        assert out.returncode == 0
        assert out.stdout.startswith("refused: no process matches")

    def test_stale_and_missing_pid_file(self, tmp_path: Path) -> None:
        """A missing pid file, garbage in it, or a pid that is gone each name the pid file."""
        missing = tmp_path / "missing.pid"
        with pytest.raises(ReloadError, match=f"reload.pid_file {missing} does not exist"):
            asyncio.run(reload(_bundle(SignalReload(pid_file=str(missing)))))
        garbage = tmp_path / "garbage.pid"
        garbage.write_text("nginx\n")
        with pytest.raises(ReloadError, match="does not hold a process id"):
            asyncio.run(reload(_bundle(SignalReload(pid_file=str(garbage)))))
        gone = subprocess.Popen(["true"])
        gone.wait()
        stale = tmp_path / "stale.pid"
        stale.write_text(f"{gone.pid}\n")
        with pytest.raises(ReloadError, match=f"pid {gone.pid} from reload.pid_file .* is not running"):
            asyncio.run(reload(_bundle(SignalReload(pid_file=str(stale)))))

    @pytest.mark.parametrize("planted", ["fifo", "dev-zero"])
    def test_a_pid_file_that_is_not_a_regular_file_is_refused_without_blocking(
        self, tmp_path: Path, planted: str
    ) -> None:
        """reload.pid_file swapped for a FIFO (nobody writes) or a link to /dev/zero: one ReloadError at once;
        before, the open of the FIFO blocked the event loop for good (no health answer, SIGTERM unheard) and
        /dev/zero was read until memory ran out."""
        pid_file = tmp_path / "consumer.pid"
        if planted == "fifo":
            os.mkfifo(pid_file)
        else:
            pid_file.symlink_to("/dev/zero")
        code = (
            "import asyncio, sys\n"
            "from agent.config import KvVariant, SignalReload, TlsBundle\n"
            "from agent.errors import ReloadError\n"
            "from agent.reload import reload\n"
            "b = TlsBundle(name='web', dir='/unused', source=KvVariant(kv='secret/web'),"
            " reload=SignalReload(pid_file=sys.argv[1]))\n"
            "try:\n"
            "    asyncio.run(reload(b))\n"
            "except ReloadError as exc:\n"
            "    print('refused:', exc)\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", code, str(pid_file)], cwd=REPO, capture_output=True, text=True, timeout=10,
            check=False,
        )
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.startswith("refused: reload.pid_file") and "not a regular file" in out.stdout, out.stdout

    @pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the agent side as another uid")
    def test_permission_denied_names_uid(self, sleeper: tuple[subprocess.Popen[bytes], str]) -> None:
        """A process of another uid that refuses the signal gives an error about running as the same uid."""
        proc, marker = sleeper
        code = (
            # import everything as root: uid 65534 may not be able to read the interpreter's files
            "import asyncio, concurrent.futures.thread, os, sys\n"
            "from agent.config import IstioCaBundle, KvVariant, SignalReload\n"
            "from agent.errors import ReloadError\n"
            "from agent.reload import reload\n"
            "b = IstioCaBundle(name='x', dir='/x', source=KvVariant(kv='a/b'),"
            " reload=SignalReload(process=sys.argv[1]))\n"
            "os.setgid(65534); os.setuid(65534)\n"
            "try:\n    asyncio.run(reload(b))\nexcept ReloadError as e:\n    print('refused:', e)\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", code, marker], cwd=REPO, capture_output=True, text=True, timeout=30, check=False
        )
        assert f"refused: not allowed to send SIGHUP to pid {proc.pid}" in out.stdout
        assert "same uid" in out.stdout and "65534" in out.stdout
        assert proc.poll() is None


# -------------------------------------------------------------------------------------------- exec


class TestExecReload:
    def test_runs_command(self, tmp_path: Path) -> None:
        """The command runs (no shell added) and its effect is visible."""
        marker = tmp_path / "reloaded"
        action = ExecReload(command=["/bin/sh", "-c", f"echo done > {marker}"])
        assert asyncio.run(reload(_bundle(action))) == "ran /bin/sh"
        assert marker.read_text() == "done\n"

    def test_argv_is_not_shell_parsed(self, tmp_path: Path) -> None:
        """Arguments reach the command verbatim: shell characters in them are not interpreted."""
        out = tmp_path / "args"
        arg = "$(touch pwned); *"
        script = "import sys, pathlib; pathlib.Path(sys.argv[1]).write_text(sys.argv[2])"
        asyncio.run(reload(_bundle(ExecReload(command=[sys.executable, "-c", script, str(out), arg]))))
        assert out.read_text() == arg
        assert not (tmp_path / "pwned").exists() and not Path("pwned").exists()

    def test_timeout_kills_command_and_children(self, tmp_path: Path) -> None:
        """A command that outlives reload.timeout is killed, with what it started, and the error says so."""
        pid_file = tmp_path / "child.pid"
        action = ExecReload(command=["/bin/sh", "-c", f"sleep 30 & echo $! > {pid_file}; wait"], timeout=Duration(0.5))
        start = time.monotonic()
        with pytest.raises(ReloadError, match=r"did not finish within reload.timeout 0.5s and was killed"):
            asyncio.run(reload(_bundle(action)))
        assert time.monotonic() - start < 5
        child = int(pid_file.read_text())
        assert _wait(lambda: not _alive(child), timeout=3), "the command's child survived the timeout"

    def test_nonzero_exit(self) -> None:
        """A failing command is an error with its exit code and the end of its stderr."""
        action = ExecReload(command=["/bin/sh", "-c", "echo 'nginx: [emerg] bad config' >&2; exit 3"])
        with pytest.raises(ReloadError, match=r"failed with exit code 3: nginx: \[emerg\] bad config$"):
            asyncio.run(reload(_bundle(action)))

    def test_stderr_is_bounded_and_redacted(self) -> None:
        """Only the last 200 characters of stderr are kept, and key material in them is redacted."""
        script = (
            "import sys; sys.stderr.write('x' * 5000 + '\\n-----BEGIN PRIVATE KEY-----\\nMIGHAgEAMBMG\\n"
            "-----END PRIVATE KEY-----\\n'); sys.exit(1)"
        )
        with pytest.raises(ReloadError) as err:
            asyncio.run(reload(_bundle(ExecReload(command=[sys.executable, "-c", script]))))
        text = str(err.value)
        assert "exit code 1" in text
        assert "MIGHAgEAMBMG" not in text and "PRIVATE KEY" not in text
        assert len(text) < len(sys.executable) + STDERR_TAIL + 60
        assert "\n" not in text

    def test_a_flood_on_stderr_is_not_kept_in_memory(self) -> None:
        """A reload command that writes 50 MB to stderr before it fails: the agent keeps a bounded part of it (its
        peak memory stays far below the chart's 128Mi limit), and the error is still one short line."""
        code = (
            "import asyncio, sys\n"
            "from agent.config import ExecReload, KvVariant, TlsBundle\n"
            "from agent.errors import ReloadError\n"
            "from agent.reload import reload\n"
            "cmd = ['/bin/sh', '-c', 'head -c 50000000 /dev/zero >&2; echo; echo reloader: bad config >&2; exit 2']\n"
            "b = TlsBundle(name='web', dir='/unused', source=KvVariant(kv='secret/web'),"
            " reload=ExecReload(command=cmd))\n"
            "try:\n"
            "    asyncio.run(reload(b))\n"
            "except ReloadError as exc:\n"
            "    print(len(str(exc)), '\\n' in str(exc))\n"
            # VmHWM: this process's own peak (ru_maxrss would carry over the peak of the pytest process it forked from)
            "print(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')))\n"
        )
        out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60,
                             check=False)
        assert out.returncode == 0, out.stderr[-2000:]
        length, newline, peak_kib = out.stdout.split()
        assert int(length) < 300 and newline == "False", out.stdout
        assert int(peak_kib) < 80 * 1024, f"peak RSS {peak_kib} KiB"

    def test_missing_command(self) -> None:
        """A command that does not exist is named in the error."""
        with pytest.raises(ReloadError, match=r"reload\.command /no/such/reloader does not exist"):
            asyncio.run(reload(_bundle(ExecReload(command=["/no/such/reloader"]))))


# -------------------------------------------------------------------------------------------- http


async def _with_server(
    status: int, action_for: object, delay: float = 0
) -> tuple[list[tuple[str, str]], object, float]:
    """Start a local aiohttp server answering `status`; run reload with the action built from its URL."""
    seen: list[tuple[str, str]] = []

    async def handle(request: web.Request) -> web.Response:
        seen.append((request.method, request.path_qs))
        if delay:
            await asyncio.sleep(delay)
        return web.Response(status=status, text="body not shown")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    start = time.monotonic()
    try:
        result: object = await reload(_bundle(action_for(f"http://127.0.0.1:{port}")))  # type: ignore[operator]
    except ReloadError as exc:
        result = exc
    finally:
        elapsed = time.monotonic() - start
        await runner.cleanup()
    return seen, result, elapsed


class TestHttpReload:
    def test_request_sent(self) -> None:
        """The configured method reaches the configured path; a 2xx answer is success."""
        seen, result, _ = asyncio.run(
            _with_server(204, lambda base: HttpReload(url=f"{base}/reload?x=1", method="PUT"))
        )
        assert seen == [("PUT", "/reload?x=1")]
        assert isinstance(result, str)
        assert result.startswith("PUT http://127.0.0.1:") and result.endswith("/reload answered 204")

    def test_server_error(self) -> None:
        """A 500 answer is an error naming method, URL and status, without the query or the body."""
        seen, result, _ = asyncio.run(
            _with_server(500, lambda base: HttpReload(url=f"{base}/-/reload?token=s3cret"))
        )
        assert seen == [("POST", "/-/reload?token=s3cret")]
        assert isinstance(result, ReloadError)
        assert "answered HTTP 500" in str(result) and "POST http://127.0.0.1:" in str(result)
        assert "s3cret" not in str(result) and "body not shown" not in str(result)

    def test_timeout(self) -> None:
        """An endpoint that does not answer within reload.timeout is an error, reached in time."""
        _, result, elapsed = asyncio.run(
            _with_server(200, lambda base: HttpReload(url=f"{base}/slow", timeout=Duration(0.3)), delay=2)
        )
        assert isinstance(result, ReloadError) and "within reload.timeout 0.3s" in str(result)
        assert elapsed < 1.5

    def test_nothing_listening(self) -> None:
        """A refused connection is an error that points at reload.url."""
        url = f"http://127.0.0.1:{_free_port()}/reload"
        with pytest.raises(ReloadError, match=r"reload request POST .* failed: .*; check reload.url"):
            asyncio.run(reload(_bundle(HttpReload(url=url))))


# ------------------------------------------------------------------------------------ none / root


class TestNoReload:
    def test_none_does_nothing(self) -> None:
        """Action none reports that nothing was done."""
        assert asyncio.run(reload(_bundle(NoReload()))) == "no reload configured"


class TestRestartOnRootChange:
    def test_sigterms_restart_process(self, sleeper: tuple[subprocess.Popen[bytes], str]) -> None:
        """With no signal reload, the process matching restart_process is sent SIGTERM."""
        proc, marker = sleeper
        desc = asyncio.run(restart_on_root_change(_bundle(NoReload(), restart_process=marker)))
        assert proc.wait(timeout=5) == -signal.SIGTERM
        assert f"SIGTERM to pid {proc.pid}" in desc

    def test_prefers_reload_process(self, sleeper: tuple[subprocess.Popen[bytes], str]) -> None:
        """A signal reload's process pattern is what gets restarted, not restart_process."""
        proc, marker = sleeper
        bundle = _bundle(SignalReload(process=marker), restart_process=f"nothing-{secrets.token_hex(4)}")
        asyncio.run(restart_on_root_change(bundle))
        assert proc.wait(timeout=5) == -signal.SIGTERM

    def test_none_found(self) -> None:
        """No matching process is an error naming the pattern."""
        pattern = f"pilot-discovery-{secrets.token_hex(4)}"
        with pytest.raises(ReloadError, match=f"no process matches '{pattern}'"):
            asyncio.run(restart_on_root_change(_bundle(NoReload(), restart_process=pattern)))

    def test_on_root_change_none(self, sleeper: tuple[subprocess.Popen[bytes], str]) -> None:
        """on_root_change: none leaves the process running."""
        proc, marker = sleeper
        asyncio.run(restart_on_root_change(_bundle(NoReload(), restart_process=marker, on_root_change="none")))
        time.sleep(0.2)
        assert proc.poll() is None
