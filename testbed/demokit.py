"""What every variant of the quick-start demo (`scripts/demo`, testbed.demo) shares: the run's Session (the processes
it started, stopped in reverse order), its output directory and lock, Ctrl-C handling, and the steps each variant
begins with (OpenBao and the Kubernetes stand-in, the agent's config, the published layout).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import FrameType
from typing import IO, Any

import yaml

from testbed.bao import BaoServer, free_port, stop_process
from testbed.kubeapi import KubeAPI

ROOT = Path(__file__).resolve().parent.parent

#: the file that marks (and, locked, guards) a directory as a demo's output
LOCK_NAME = ".demo.lock"
#: how long the demo waits for the agent to publish, or to pick up a change written to OpenBao
WAIT = 30.0


class DemoFailed(Exception):
    """A step of the demo did not happen; the message is one sentence for the user."""


class State:
    interrupted = ""  # "Ctrl-C" or "SIGTERM" once one came
    closing = False
    quiet = threading.Event()


def on_signal(signum: int, frame: FrameType | None) -> None:
    """Ctrl-C (or SIGTERM): from now on nothing the demo started prints, and the run unwinds once."""
    State.interrupted = "SIGTERM" if signum == signal.SIGTERM else "Ctrl-C"
    State.quiet.set()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    if not State.closing:
        raise KeyboardInterrupt


def say(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def shown(path: Path) -> str:
    """`path` relative to the working directory when it is below it (as the user typed it), else absolute."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def serial_of(text: str) -> int:
    """A serial number written as hex, with or without colons (`/readyz` and openssl write it either way)."""
    return int(text.replace(":", ""), 16)


def cert_serial(pem: bytes) -> int:
    """The serial number of the first certificate in `pem`."""
    from cryptography import x509

    return int(x509.load_pem_x509_certificate(pem).serial_number)


def _children(parent: int) -> list[int]:
    """Process ids whose parent is `parent` (from /proc; empty where there is none)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        if len(fields) > 1 and fields[1] == str(parent) and fields[0] != "Z":
            found.append(int(entry.name))
    return found


def _reap(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return True
        if done:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def sweep() -> None:
    """Stop any child process still running (one started just as Ctrl-C came, before it was recorded)."""
    for pid in _children(os.getpid()):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        if not _reap(pid, 5):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            _reap(pid, 5)


def _relay(stream: IO[str], to: IO[str]) -> None:
    """Copy the agent's log lines to the terminal until Ctrl-C (then its shutdown lines stay unsaid)."""
    with contextlib.suppress(OSError, ValueError):
        for line in stream:
            if not State.quiet.is_set():
                to.write(line)
                to.flush()


class Session:
    """What one demo run started (OpenBao, the Kubernetes stand-in, agents, Envoy), stopped in reverse order
    however the run ends."""

    def __init__(self, out: Path) -> None:
        """A run publishing below `out` (already claimed and emptied)."""
        self.out = out
        self.stack = contextlib.ExitStack()
        self.started: list[str] = []
        self.health = free_port()
        self.relays: list[threading.Thread] = []

    def bao(self) -> BaoServer:
        """A `bao server -dev` with root token `root` on a free port."""
        server = BaoServer(root_token="root", own_group=True)
        self.stack.callback(server.close)
        self.started.append("OpenBao")
        return server.start()

    def kube(self) -> KubeAPI:
        """The Kubernetes TokenReview stand-in (a thread of this process)."""
        kube = self.stack.enter_context(KubeAPI())
        self.started.append("the Kubernetes API stand-in")
        return kube

    @staticmethod
    def _command(*args: str) -> list[str]:
        # `istio-vault-agent ARGS`, from this checkout whatever copy the venv may have installed
        return [sys.executable, "-m", "agent.cli", *args]

    @staticmethod
    def _env() -> dict[str, str]:
        return {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_", "ISTIO_VAULT_AGENT_"))}

    def agent(self, config: Path, mode: str) -> subprocess.Popen[str]:
        """`istio-vault-agent run --config CONFIG --mode MODE`, its log relayed to stderr."""
        say(f"istio-vault-agent run --config {shown(config)} --mode {mode}")
        proc = subprocess.Popen(self._command("run", "--config", str(config), "--mode", mode), cwd=ROOT,
                                env=self._env(), text=True, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                process_group=0)
        self.stack.callback(stop_process, proc)
        if "the agent" not in self.started:
            self.started.append("the agent")
        assert proc.stderr is not None
        relay = threading.Thread(target=_relay, args=(proc.stderr, sys.stderr), name="agent-log", daemon=True)
        relay.start()
        self.relays.append(relay)
        return proc

    def flush_log(self) -> None:
        """Wait (briefly) until the log of the agents that exited is on the terminal."""
        for relay in self.relays:
            relay.join(timeout=2)

    def run(self, *args: str, cwd: Path | None = None) -> None:
        """Run a short command (`istio-vault-agent check`, openssl) to completion, its output on the terminal."""
        cmd = self._command(*args[1:]) if args[0] == "istio-vault-agent" else list(args)
        with subprocess.Popen(cmd, cwd=cwd or ROOT, env=self._env(), stdin=subprocess.DEVNULL,
                              process_group=0) as proc:
            try:
                proc.wait(timeout=30)
            finally:
                stop_process(proc, 5)

    def get(self, path: str) -> tuple[int, str]:
        """GET the agent's health endpoint `path`: (status, body), status 0 when it does not answer."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health}{path}", timeout=2) as r:
                return int(r.status), r.read().decode()
        except urllib.error.HTTPError as exc:
            return int(exc.code), exc.read().decode(errors="replace")
        except OSError:
            return 0, ""

    def serials(self) -> dict[str, int]:
        """What this run's agent says it has published: bundle name -> serial (ca-cert.pem, or the tls.crt leaf)."""
        status, body = self.get("/readyz")
        if status not in (200, 503):
            return {}
        with contextlib.suppress(ValueError, AttributeError, TypeError):
            bundles = json.loads(body)["bundles"]
            return {name: serial_of(b["serial"]) for name, b in bundles.items() if b.get("serial")}
        return {}

    def wait_published(self, proc: subprocess.Popen[str], want: dict[str, int], timeout: float = WAIT) -> float:
        """Wait until this run's agent says it published each bundle of `want` with that serial (the one the demo
        wrote to OpenBao, or PKI issued); returns the seconds it took.

        Raises:
            DemoFailed: if the agent exits first, or the time is up.
        """
        started = time.monotonic()
        while True:
            if proc.poll() is not None:
                raise DemoFailed(f"the agent exited with code {proc.returncode} before it published")
            have = self.serials()
            if all(have.get(name) == serial for name, serial in want.items()):
                return time.monotonic() - started
            if time.monotonic() - started > timeout:
                raise DemoFailed(f"the agent did not publish {', '.join(want)} within {timeout:.0f} s")
            time.sleep(0.1)

    def wait_ready(self, proc: subprocess.Popen[str], timeout: float = WAIT) -> dict[str, int]:
        """Wait until this run's agent answers /readyz 200; returns the serials it published.

        Raises:
            DemoFailed: if the agent exits first, or the time is up.
        """
        deadline = time.monotonic() + timeout
        while self.get("/readyz")[0] != 200:
            if proc.poll() is not None:
                raise DemoFailed(f"the agent exited with code {proc.returncode} before it was ready")
            if time.monotonic() > deadline:
                raise DemoFailed(f"the agent was not ready within {timeout:.0f} s")
            time.sleep(0.1)
        return self.serials()

    def show_readyz(self) -> None:
        """Print GET /readyz as the agent answers it."""
        status, body = self.get("/readyz")
        say(f"GET http://127.0.0.1:{self.health}/readyz -> {status}")
        with contextlib.suppress(ValueError):
            body = json.dumps(json.loads(body), indent=2)
        print("".join(f"    {line}\n" for line in body.splitlines()), end="")

    def show_metrics(self, prefixes: tuple[str, ...]) -> None:
        """Print the lines of GET /metrics that start with `prefixes`."""
        say(f"GET http://127.0.0.1:{self.health}/metrics (excerpt)")
        print("\n".join(f"    {m}" for m in self.get("/metrics")[1].splitlines() if m.startswith(prefixes)))

    def keep_running(self, proc: subprocess.Popen[str], what: str) -> int:
        """--sidecar after the tour: wait for Ctrl-C; returns 1 if the agent stops on its own first."""
        say(f"{what} Ctrl-C stops it.")
        proc.wait()
        print(f"error: the agent exited with code {proc.returncode}", file=sys.stderr)
        return 1

    def close(self) -> None:
        """Stop everything, in reverse order; Ctrl-C from now on is ignored."""
        State.closing = True
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        try:
            self.stack.close()
        finally:
            sweep()


def claim(out: Path) -> int:
    """Make `out` this run's empty output directory: create it, or empty a previous demo's output there.

    Returns the descriptor of the lock held for the run.

    Raises:
        DemoFailed: if `out` holds files the demo did not make, or another demo is using it.
    """
    if out.exists() and not out.is_dir():
        raise DemoFailed(f"--out {shown(out)} is a file; pass a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / LOCK_NAME).exists():
        raise DemoFailed(f"--out {shown(out)} holds files that no demo made; pass a new or empty directory")
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise DemoFailed(f"another scripts/demo is running with --out {shown(out)}; stop it or pass another --out"
                         ) from None
    for entry in out.iterdir():
        if entry.name == LOCK_NAME:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    return fd


def start_openbao(session: Session) -> tuple[BaoServer, KubeAPI]:
    """OpenBao and the Kubernetes stand-in, announced."""
    say("Starting OpenBao (bao server -dev) and a Kubernetes TokenReview stand-in on 127.0.0.1")
    bao = session.bao()
    kube = session.kube()
    print(f"    OpenBao: {bao.address}   Kubernetes API stand-in: {kube.url}", flush=True)
    return bao, kube


def write_config(session: Session, name: str, address: str, auth: dict[str, Any], bundles: list[dict[str, Any]],
                 poll: str) -> Path:
    """The agent's configuration `name` in the output directory, with this run's health port."""
    config = {
        "vault": {"address": address},
        "auth": {"method": "kubernetes", **auth},
        "bundles": bundles,
        "init": {"timeout": "30s"},
        "health": {"listen": f"127.0.0.1:{session.health}"},
        "sidecar": {"poll_interval": poll},
        "log": {"format": "console"},
    }
    path = session.out / name
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def show_dir(session: Session, directory: Path, note: str = "") -> None:
    """The published layout: the files, their modes and the ..data links."""
    say(f"Published into {shown(directory)}{note}")
    for p in sorted(directory.iterdir(), key=lambda p: p.name):
        target = f" -> {os.readlink(p)}" if p.is_symlink() else ""
        mode = oct(p.stat().st_mode & 0o777) if p.exists() else "-"
        print(f"    {p.name:<16} {mode}{target}", flush=True)
