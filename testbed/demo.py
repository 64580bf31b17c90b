"""The quick-start demo (`scripts/demo`): a local OpenBao seeded like the vault-agent-init runbook, and the agent
publishing from it into out/demo.

- no flag: the runbook's KV layout, the agent in init mode (publish once, exit), openssl and `check` on the result;
- --sidecar: the same in sidecar mode, one rotation of the intermediate in OpenBao, then the agent keeps running
  until Ctrl-C;
- --pki: OpenBao's PKI engine signs istiod's intermediate from a CSR (the key made by the agent) and issues a
  gateway certificate of 20 s that the agent renews while you watch;
- --gateway: a real Envoy serves the gateway certificate the agent publishes from OpenBao, through one rotation
  while a client keeps handshaking.

--sidecar also keeps --pki or --gateway running after their tour; --pki and --gateway cannot be combined.

Every run starts from an empty --out (a previous demo's output there is removed; a directory that the demo did not
make is refused), waits for what this run's agent published (its /readyz, and the serial the demo just wrote to
OpenBao), uses free loopback ports, and on Ctrl-C at any moment stops everything it started, prints one line and
exits 0. Every number printed is measured in this run.

Everything is real except the Kubernetes API, which a small stand-in serves (TokenReview for OpenBao's
kubernetes auth method), because no kube-apiserver runs on a laptop without a cluster.
"""

from __future__ import annotations

import argparse
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
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import IO, Any

import yaml

from testbed import pki
from testbed.bao import BaoServer, free_port
from testbed.kubeapi import KubeAPI
from testbed.vaultsetup import configure_kubernetes_auth, seed_runbook_layout, setup_pki

ROOT = Path(__file__).resolve().parent.parent

#: the file that marks (and, locked, guards) a directory as a demo's output
LOCK_NAME = ".demo.lock"
#: how long the demo waits for the agent to publish, or to pick up a change written to OpenBao
WAIT = 30.0


class DemoFailed(Exception):
    """A step of the demo did not happen; the message is one sentence for the user."""


class _State:
    interrupted = ""  # "Ctrl-C" or "SIGTERM" once one came
    closing = False
    quiet = threading.Event()


def _on_signal(signum: int, frame: FrameType | None) -> None:
    """Ctrl-C (or SIGTERM): from now on nothing the demo started prints, and the run unwinds once."""
    _State.interrupted = "SIGTERM" if signum == signal.SIGTERM else "Ctrl-C"
    _State.quiet.set()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    if not _State.closing:
        raise KeyboardInterrupt


def _say(text: str) -> None:
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


def _sweep() -> None:
    """Stop any child process still running (one started just as Ctrl-C came, before it was recorded)."""
    for pid in _children(os.getpid()):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        if not _reap(pid, 5):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            _reap(pid, 5)


def _stop(proc: subprocess.Popen[Any], timeout: float = 10) -> int:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)
    return int(proc.returncode)


def _relay(stream: IO[str], to: IO[str]) -> None:
    """Copy the agent's log lines to the terminal until Ctrl-C (then its shutdown lines stay unsaid)."""
    with contextlib.suppress(OSError, ValueError):
        for line in stream:
            if not _State.quiet.is_set():
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
        _say(f"istio-vault-agent run --config {shown(config)} --mode {mode}")
        proc = subprocess.Popen(self._command("run", "--config", str(config), "--mode", mode), cwd=ROOT,
                                env=self._env(), text=True, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                process_group=0)
        self.stack.callback(_stop, proc)
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
                _stop(proc, 5)

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
        _say(f"GET http://127.0.0.1:{self.health}/readyz -> {status}")
        with contextlib.suppress(ValueError):
            body = json.dumps(json.loads(body), indent=2)
        print("".join(f"    {line}\n" for line in body.splitlines()), end="")

    def show_metrics(self, prefixes: tuple[str, ...]) -> None:
        """Print the lines of GET /metrics that start with `prefixes`."""
        _say(f"GET http://127.0.0.1:{self.health}/metrics (excerpt)")
        print("\n".join(f"    {m}" for m in self.get("/metrics")[1].splitlines() if m.startswith(prefixes)))

    def keep_running(self, proc: subprocess.Popen[str], what: str) -> int:
        """--sidecar after the tour: wait for Ctrl-C; returns 1 if the agent stops on its own first."""
        _say(f"{what} Ctrl-C stops it.")
        proc.wait()
        print(f"error: the agent exited with code {proc.returncode}", file=sys.stderr)
        return 1

    def close(self) -> None:
        """Stop everything, in reverse order; Ctrl-C from now on is ignored."""
        _State.closing = True
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        try:
            self.stack.close()
        finally:
            _sweep()


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


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    # no abbreviations: scripts/demo picks what to install from the exact flags (`--gate` would get no Envoy)
    parser = argparse.ArgumentParser(prog="scripts/demo", description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="out/demo",
                        help="the demo's output directory, emptied at the start (default out/demo)")
    parser.add_argument("--sidecar", action="store_true",
                        help="sidecar mode: rotate the intermediate once, then keep the agent running until Ctrl-C"
                             " (with --pki or --gateway: keep them running after their tour)")
    parser.add_argument("--pki", action="store_true",
                        help="OpenBao's PKI engine signs istiod's intermediate and issues (and renews) a gateway cert")
    parser.add_argument("--gateway", action="store_true",
                        help="a real Envoy serves a gateway certificate from OpenBao; rotate it and watch a TLS"
                             " client get the new serial")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None, *, early: Sequence[int] = ()) -> int:
    """Run the demo; returns its exit code (0 also after Ctrl-C).

    `early`: the signals that came while Python imported this module (scripts/demo records them from its first
    line of Python, as importing OpenBao's, Kubernetes' and the PKI helpers takes a while): the demo then starts
    nothing and says so in one line.
    """
    try:
        signal.signal(signal.SIGINT, _on_signal)
        signal.signal(signal.SIGTERM, _on_signal)
        if early:
            raise KeyboardInterrupt
        args = _parse(argv)
    except KeyboardInterrupt:
        _State.interrupted = _State.interrupted or ("SIGTERM" if signal.SIGTERM in early else "Ctrl-C")
        print(f"\n==> {_State.interrupted}: nothing was running yet", flush=True)
        return 0
    if args.pki and args.gateway:
        print("error: --pki and --gateway are two separate demos; run `scripts/demo --pki` or"
              " `scripts/demo --gateway`", file=sys.stderr)
        return 2
    out = (ROOT / args.out).resolve()
    session: Session | None = None
    lock = -1
    code = 1
    try:
        lock = claim(out)
        session = Session(out)
        code = _variant(args)(session, sidecar=args.sidecar)
    except KeyboardInterrupt:
        pass
    except DemoFailed as exc:
        _State.quiet.set()
        print(f"error: {exc}", file=sys.stderr, flush=True)
        code = 1
    finally:
        if session is not None:
            session.close()
        _sweep()
        if lock >= 0:
            os.close(lock)
    if _State.interrupted:
        started = session.started if session is not None else []
        what = (", ".join(started[:-1]) + " and " + started[-1]) if len(started) > 1 else "".join(started)
        print(f"\n==> {_State.interrupted}: {'stopped ' + what if what else 'nothing was running yet'}", flush=True)
        return 0
    return code


def _variant(args: argparse.Namespace) -> Callable[..., int]:
    if args.pki:
        return _pki_demo
    if args.gateway:
        from testbed.gatewaydemo import gateway_demo

        return gateway_demo
    return _kv_demo


def start_openbao(session: Session) -> tuple[BaoServer, KubeAPI]:
    """OpenBao and the Kubernetes stand-in, announced."""
    _say("Starting OpenBao (bao server -dev) and a Kubernetes TokenReview stand-in on 127.0.0.1")
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
    _say(f"Published into {shown(directory)}{note}")
    for p in sorted(directory.iterdir(), key=lambda p: p.name):
        target = f" -> {os.readlink(p)}" if p.is_symlink() else ""
        mode = oct(p.stat().st_mode & 0o777) if p.exists() else "-"
        print(f"    {p.name:<16} {mode}{target}", flush=True)


def _verify_istio_ca(session: Session, directory: Path) -> None:
    if shutil.which("openssl"):
        _say("openssl verify -CAfile root-cert.pem -untrusted cert-chain.pem ca-cert.pem")
        session.run("openssl", "verify", "-CAfile", "root-cert.pem", "-untrusted", "cert-chain.pem", "ca-cert.pem",
                    cwd=directory)
    _say(f"istio-vault-agent check {shown(directory)} --type istio-ca")
    session.run("istio-vault-agent", "check", str(directory), "--type", "istio-ca")


def _kv_demo(session: Session, *, sidecar: bool) -> int:
    bao, kube = start_openbao(session)
    _say("Seeding the runbook's layout: kv v1 kubernetes-cluster1-secrets/istiod-service/certs,"
         " auth/kubernetes-cluster1 role istiod bound to istio-system/istiod")
    root = pki.root_ca(key_type="rsa")
    intermediate = pki.intermediate_ca(root, key_type="rsa", cluster="cluster1")
    layout = seed_runbook_layout(bao.client(), kube, pki.istio_ca_files(root, intermediate))
    token_file = session.out / "token"
    token_file.write_text(kube.mint_token(layout.namespace, layout.service_account))
    out = session.out / "istiod-cacerts"
    config = write_config(
        session, "agent.yaml",
        bao.address, {"mount": layout.auth_mount, "role": layout.role, "token_path": str(token_file)},
        [{"name": "istiod-cacerts", "type": "istio-ca", "source": {"kv": f"{layout.kv_mount}/{layout.secret_path}"},
          "dir": str(out)}],
        poll="2s",
    )
    seeded = int(intermediate.cert.serial_number)
    proc = session.agent(config, "sidecar" if sidecar else "init")
    if not sidecar:
        try:
            code = proc.wait(timeout=WAIT + 30)
        except subprocess.TimeoutExpired:
            raise DemoFailed(f"the agent did not finish within {WAIT + 30:.0f} s") from None
        session.flush_log()
        if code != 0:
            return code
        published = cert_serial((out / "ca-cert.pem").read_bytes())
        if published != seeded:
            raise DemoFailed(f"the agent published serial {published:x}, not the {seeded:x} just written to OpenBao")
        show_dir(session, out, f" (ca-cert.pem serial {seeded:x}, the intermediate just written to OpenBao)")
        _verify_istio_ca(session, out)
        return 0

    took = session.wait_published(proc, {"istiod-cacerts": seeded})
    session.show_readyz()
    show_dir(session, out, f" ({took:.1f} s after the agent started; ca-cert.pem serial {seeded:x})")
    _verify_istio_ca(session, out)
    _say("Rotating the intermediate in OpenBao (same root); the agent picks it up within poll_interval (2 s)")
    second = pki.intermediate_ca(root, key_type="rsa", cluster="cluster1")
    seed_runbook_layout(bao.client(), kube, pki.istio_ca_files(root, second))
    new = int(second.cert.serial_number)
    took = session.wait_published(proc, {"istiod-cacerts": new}, timeout=15)
    on_disk = cert_serial((out / "ca-cert.pem").read_bytes())
    print(f"    ca-cert.pem serial {seeded:x} -> {on_disk:x}: published {took:.1f} s after the write", flush=True)
    session.show_metrics(("istio_vault_agent_publish_total", "istio_vault_agent_cert"))
    return session.keep_running(
        proc, f"The agent keeps running in sidecar mode (health: http://127.0.0.1:{session.health}/readyz), reading"
              " kubernetes-cluster1-secrets/istiod-service/certs every 2 s (poll_interval).")


def _pki_demo(session: Session, *, sidecar: bool) -> int:
    ttl = "20s"
    bao, kube = start_openbao(session)
    _say("PKI: root CA in mount pki; intermediate issuer gateway-ca in mount pki_int; role pki_int/roles/ingress")
    layout = setup_pki(bao.client(), crl_address=bao.address)
    configure_kubernetes_auth(bao.client(), kube, mount="kubernetes-cluster1", role="istiod",
                              namespace="istio-system", service_account="istiod", policies=[layout.policy])
    print(f"    the agent's whole policy ({layout.policy}):")
    print("".join(f"      {line}\n" for line in layout.policy_text().splitlines()), end="", flush=True)
    token_file = session.out / "token"
    token_file.write_text(kube.mint_token("istio-system", "istiod"))
    istiod, gateway = session.out / "istiod-cacerts", session.out / "ingress-cert"
    config = write_config(
        session, "agent-pki.yaml",
        bao.address, {"mount": "kubernetes-cluster1", "role": "istiod", "token_path": str(token_file)},
        [
            # workload_cert_ttl 5m: the 1 h intermediate, renewed with 20 min left, covers workload certificates
            # of that lifetime twice (with istiod's default 24 h the agent warns, rightly: intermediate_lead_time_short)
            {"name": "istiod-cacerts", "type": "istio-ca", "dir": str(istiod), "ready_min_remaining": "5m",
             "workload_cert_ttl": "5m",
             "source": {"pki_intermediate": {"mount": "pki", "path": "root/sign-intermediate",
                                             "cluster": "cluster1", "key_type": "ec-p256", "ttl": "1h",
                                             "renew_before": 0.33}}},
            {"name": "ingress-cert", "type": "tls", "dir": str(gateway), "ready_min_remaining": "1s",
             "source": {"pki": {"mount": "pki_int", "role": "ingress", "common_name": "app.example.com",
                                "alt_names": ["www.example.com"], "ip_sans": [], "ttl": ttl}}},
        ],
        poll="2s",
    )
    proc = session.agent(config, "sidecar")
    published = session.wait_ready(proc)
    # what PKI signed in this run is what the agent says it published, and what is on disk
    if published.get("istiod-cacerts") != cert_serial((istiod / "ca-cert.pem").read_bytes()):
        raise DemoFailed("the ca-cert.pem on disk is not the one the agent says it published")
    session.show_readyz()
    show_dir(session, istiod, f" (ca-cert.pem serial {published['istiod-cacerts']:x}, signed from the agent's CSR by"
                              " the pki mount in this run)")
    _verify_istio_ca(session, istiod)
    _say(f"The gateway certificate in {shown(gateway)}")
    if shutil.which("openssl"):
        session.run("openssl", "x509", "-in", "tls.crt", "-noout", "-serial", "-subject", "-issuer", "-dates", "-ext",
                    "subjectAltName", cwd=gateway)
        session.run("openssl", "verify", "-CAfile", "ca.crt", "-untrusted", "tls.crt", "tls.crt", cwd=gateway)
    before = published["ingress-cert"]
    _say(f"Waiting for the agent to renew the gateway certificate (ttl {ttl}): it renews when a third of the"
         " validity is left (OpenBao backdates notBefore by 30 s)")
    started = time.monotonic()
    deadline = started + WAIT
    while session.serials().get("ingress-cert", before) == before:
        if proc.poll() is not None:
            raise DemoFailed(f"the agent exited with code {proc.returncode} before it renewed the certificate")
        if time.monotonic() > deadline:
            raise DemoFailed(f"the agent did not renew the gateway certificate within {WAIT:.0f} s")
        time.sleep(0.2)
    after = session.serials()["ingress-cert"]
    on_file = cert_serial((gateway / "tls.crt").read_bytes())
    print(f"    serial {before:x} -> {after:x}: renewed: {after != before and on_file == after}"
          f" ({time.monotonic() - started:.1f} s into the wait)", flush=True)
    session.show_metrics(("istio_vault_agent_renewals_total", "istio_vault_agent_bundle_expiry",
                          "istio_vault_agent_errors"))
    if sidecar:
        return session.keep_running(
            proc, f"The agent keeps running in sidecar mode, renewing the gateway certificate (ttl {ttl}) whenever"
                  f" a third of its validity is left (health: http://127.0.0.1:{session.health}/readyz).")
    _say("Stopping the agent (SIGTERM)")
    return _stop(proc)


if __name__ == "__main__":
    sys.exit(main())
