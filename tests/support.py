"""Helpers shared by the end-to-end tests and the benchmarks: agent configs, a KV v2 layout, the real CLI in a
subprocess (`run_cli` for one-shot runs, `AgentProc` for a running agent whose log survives restarts), waiting.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hvac
import pytest
import yaml

from testbed.kubeapi import KubeAPI
from testbed.vaultsetup import configure_kubernetes_auth, ensure_secrets_engine

ROOT = Path(__file__).resolve().parent.parent
ISTIO_FILES = ("ca-key.pem", "ca-cert.pem", "root-cert.pem", "cert-chain.pem")


# ---------------------------------------------------------------------------------------------- config


def agent_config(
    *,
    address: str,
    token_path: Path,
    out: Path,
    kv: str,
    mount: str = "kubernetes-cluster1",
    role: str = "istiod",
    method: str = "kubernetes",
    bundle_type: str = "istio-ca",
    init_timeout: str = "10s",
    poll: str | None = None,
    timeout: str | None = None,
    level: str | None = None,
    **bundle_extra: Any,
) -> dict[str, Any]:
    """A config dict shaped like the issue-2 contract, for one bundle.

    `poll` (sidecar.poll_interval), `timeout` (vault.timeout) and `level` (log.level) are written only when given.
    """
    bundle: dict[str, Any] = {"name": "istiod-cacerts", "type": bundle_type, "source": {"kv": kv}, "dir": str(out)}
    bundle.update(bundle_extra)
    cfg: dict[str, Any] = {
        "vault": {"address": address},
        "auth": {"method": method, "mount": mount, "role": role, "token_path": str(token_path)},
        "bundles": [bundle],
        "init": {"timeout": init_timeout},
        "health": {"listen": "127.0.0.1:0"},
    }
    if timeout is not None:
        cfg["vault"]["timeout"] = timeout
    if poll is not None:
        cfg["sidecar"] = {"poll_interval": poll}
    if level is not None:
        cfg["log"] = {"level": level}
    return cfg


def write_config(path: Path, cfg: dict[str, Any]) -> Path:
    """Write `cfg` as YAML to `path`; returns `path`."""
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


# ---------------------------------------------------------------------------------------------- OpenBao layout


@dataclass(frozen=True)
class KV2Layout:
    """A KV v2 mount, read policy and kubernetes auth mount (role `istiod` bound to istio-system/istiod).

    The defaults are a fixed layout for a private server; `KV2Layout.unique(suffix)` gives names a test can own
    on the shared one.
    """

    kv_mount: str = "kv2"
    secret_path: str = "istio/cacerts"
    auth_mount: str = "kubernetes"
    role: str = "istiod"
    policy: str = "istio-ca"

    @classmethod
    def unique(cls, suffix: str) -> KV2Layout:
        """`kv2-SUFFIX`, `k8s-SUFFIX` and policy `istio-ca-SUFFIX`."""
        return cls(kv_mount=f"kv2-{suffix}", auth_mount=f"k8s-{suffix}", policy=f"istio-ca-{suffix}")

    @property
    def kv(self) -> str:
        """`source.kv` for the agent config: MOUNT/PATH."""
        return f"{self.kv_mount}/{self.secret_path}"

    def write(self, client: hvac.Client, files: Mapping[str, bytes]) -> int:
        """Write `files` (file name -> PEM) as a new version; returns the version number."""
        resp = client.secrets.kv.v2.create_or_update_secret(
            path=self.secret_path, secret={k: v.decode() for k, v in files.items()}, mount_point=self.kv_mount
        )
        return int(resp["data"]["version"])

    def setup(
        self,
        client: hvac.Client,
        kube: KubeAPI,
        files: Mapping[str, bytes] | None,
        *,
        token_ttl: str | None = None,
        token_max_ttl: str | None = None,
    ) -> KV2Layout:
        """Mount the KV v2 engine, a read policy on data and metadata, and the kubernetes auth role; write
        `files` as the next version unless None. Idempotent, so it also serves as a seeder. Returns self."""
        ensure_secrets_engine(client, self.kv_mount, kv_version=2)
        client.sys.create_or_update_policy(
            name=self.policy,
            policy=(
                f'path "{self.kv_mount}/data/{self.secret_path}" {{ capabilities = ["read"] }}\n'
                f'path "{self.kv_mount}/metadata/{self.secret_path}" {{ capabilities = ["read"] }}\n'
            ),
        )
        configure_kubernetes_auth(
            client, kube, mount=self.auth_mount, role=self.role, namespace="istio-system",
            service_account="istiod", policies=[self.policy], token_ttl=token_ttl, token_max_ttl=token_max_ttl,
        )
        if files is not None:
            self.write(client, files)
        return self


# ---------------------------------------------------------------------------------------------- one-shot CLI


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without VAULT_*/BAO_*/ISTIO_VAULT_AGENT_* from the developer's shell, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_", "ISTIO_VAULT_AGENT_"))}
    env.update(extra)
    return env


def cli_env(**extra: str) -> dict[str, str]:
    """The environment for a CLI subprocess: `clean_env` with this checkout on PYTHONPATH.

    Under scripts/coverage (COVERAGE_PROCESS_START set) the run's PYTHONPATH stays behind the checkout, so the
    agent subprocesses load its sitecustomize and are measured too."""
    path = str(ROOT)
    if os.environ.get("COVERAGE_PROCESS_START") and os.environ.get("PYTHONPATH"):
        path += os.pathsep + os.environ["PYTHONPATH"]
    return clean_env(PYTHONPATH=path, **extra)


def run_cli(*args: str, timeout: float = 60, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run `istio-vault-agent ARGS` as a user would (python -m agent.cli), capturing output."""
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env or cli_env(),
        cwd=ROOT,
        check=False,
    )


def error_line(proc: subprocess.CompletedProcess[str]) -> str:
    """The single `error:` line on stderr (asserting there is exactly one, and no traceback)."""
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


# ---------------------------------------------------------------------------------------------- waiting


def wait_until(predicate: Callable[[], Any], timeout: float = 15, interval: float = 0.05) -> Any:
    """Poll `predicate` until it returns something truthy (returned) or `timeout` passes (returns the last value).

    A FileNotFoundError counts as "not yet": a poll of a published directory can resolve ..data to a generation that
    the next swap removes before the read (a reader retries, as istiod's watcher does)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = predicate()
        except FileNotFoundError:
            value = None
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def slow_only(request: pytest.FixtureRequest) -> None:
    """Skip unless the run selected slow tests (`-m slow`): the default run must stay fast."""
    markexpr = request.config.getoption("markexpr") or ""
    if "slow" not in markexpr or "not slow" in markexpr:
        pytest.skip("long run: select it with -m slow")


# ---------------------------------------------------------------------------------------------- output dir


def live_files(out: Path) -> dict[str, bytes]:
    """The live generation's files, read through one resolution of ..data (as istiod's reader would)."""
    generation = out / os.readlink(out / "..data")
    return {p.name: p.read_bytes() for p in generation.iterdir()}


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value} (the series line exactly as exposed, without the value)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        series, _, value = line.rpartition(" ")
        out[series] = float(value)
    return out


# ---------------------------------------------------------------------------------------------- the agent


class AgentProc:
    """`python -m agent.cli run --config F --mode M` in a subprocess, stderr (JSON log lines) appended to a file.

    Every (re)start appends to the same log, so events count across restarts and a leak guard can watch the file.
    """

    def __init__(
        self,
        config: Path,
        log: Path | None = None,
        *,
        mode: str = "sidecar",
        env: dict[str, str] | None = None,
        prefix: tuple[str, ...] = (),
    ) -> None:
        """`prefix` goes before the command, e.g. a launcher that lowers a resource limit and execs the rest."""
        self.prefix = prefix
        self.config = config
        self.log = log or config.with_suffix(".log")
        self.mode = mode
        self.env = env or cli_env()
        self.proc: subprocess.Popen[bytes] | None = None
        self._listening_before = 0  # health_listening events of earlier runs
        self._port: int | None = None

    def start(self) -> AgentProc:
        """Start the agent (again); does not wait for anything."""
        self._listening_before = len(self.events("health_listening"))
        self._port = None
        with self.log.open("ab") as err:
            self.proc = subprocess.Popen(
                [*self.prefix, sys.executable, "-m", "agent.cli", "run", "--config", str(self.config),
                 "--mode", self.mode],
                cwd=ROOT, env=self.env, stdout=subprocess.DEVNULL, stderr=err, stdin=subprocess.DEVNULL,
            )
        return self

    def kill(self) -> None:
        """SIGKILL the agent if it runs, and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self, timeout: float = 10) -> tuple[int | None, float]:
        """SIGTERM and wait; SIGKILL if it does not stop. Returns (exit code, seconds it took to exit);
        (None, 0.0) if it never started, (exit code, 0.0) if it had already exited."""
        if self.proc is None:
            return None, 0.0
        if self.proc.poll() is not None:
            return self.proc.returncode, 0.0
        start = time.monotonic()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=timeout)
        return self.proc.returncode, time.monotonic() - start

    # -- log ------------------------------------------------------------------------------------------------
    @property
    def stderr(self) -> str:
        """Everything the agent wrote to stderr, over all runs."""
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def tail(self, chars: int = 3000) -> str:
        """The end of the log, for failure messages."""
        return self.stderr[-chars:]

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """The agent's JSON log events so far (all runs), oldest first; only those named `name` if given."""
        out = []
        for line in self.stderr.splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict) and (name is None or event.get("event") == name):
                out.append(event)
        return out

    def wait_event(self, name: str, *, count: int = 1, timeout: float = 15) -> list[dict[str, Any]]:
        """Wait until `count` events named `name` were logged (all runs); returns them all, oldest first.

        Fails the test with the log's tail on timeout, or at once if the agent exits first.
        """
        def done() -> bool:
            return len(self.events(name)) >= count or (self.proc is not None and self.proc.poll() is not None)

        wait_until(done, timeout, interval=0.02)
        found = self.events(name)
        if len(found) >= count:
            return found
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"agent exited ({self.proc.returncode}) before {name}: {self.tail()}")
        raise AssertionError(f"expected {count} {name!r} event(s) within {timeout}s; log:\n{self.tail(6000)}")

    # -- health server --------------------------------------------------------------------------------------
    @property
    def port(self) -> int:
        """The health server's port in this run (waits for its health_listening event)."""
        if self._port is None:
            listening = self.wait_event("health_listening", count=self._listening_before + 1)
            self._port = int(listening[-1]["port"])
        return self._port

    @property
    def health(self) -> str:
        """Base URL of the health server in this run."""
        return f"http://127.0.0.1:{self.port}"

    def get(self, path: str, timeout: float = 2) -> tuple[int, str]:
        """GET the health server's PATH; returns (status, body) for any HTTP status."""
        try:
            with urllib.request.urlopen(f"{self.health}{path}", timeout=timeout) as resp:
                return int(resp.status), resp.read().decode()
        except urllib.error.HTTPError as exc:
            return int(exc.code), exc.read().decode()

    def ready(self) -> tuple[int, dict[str, Any]]:
        """/readyz as (status, parsed JSON body)."""
        status, body = self.get("/readyz")
        return status, json.loads(body)

    def metrics(self, timeout: float = 2) -> dict[str, float]:
        """/metrics parsed by `parse_metrics`."""
        status, body = self.get("/metrics", timeout=timeout)
        assert status == 200, body
        return parse_metrics(body)

    def metric(self, series: str) -> float:
        """The value of one series, e.g. `istio_vault_agent_publish_total{bundle="istiod-cacerts"}` (0 if absent)."""
        return self.metrics().get(series, 0.0)
