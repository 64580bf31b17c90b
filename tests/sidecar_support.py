"""Helpers for the sidecar end-to-end tests: a KV v2 layout of a test's own, and the agent as a subprocess.

`SidecarProc` runs `python -m agent.cli run --mode sidecar`, collects its JSON log lines from stderr in a
thread, learns the health port from the `health_listening` event, and stops the agent with SIGTERM.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hvac
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from testbed.kubeapi import KubeAPI
from testbed.vaultsetup import configure_kubernetes_auth, ensure_secrets_engine
from tests.support import ROOT, cli_env

__all__ = ["KV2Layout", "SidecarProc", "key_matches_cert", "parse_metrics", "setup_kv2", "wait_until"]


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.05) -> Any:
    """Poll `predicate` until it returns something truthy (returned) or `timeout` passes (returns the last value)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def key_matches_cert(key_pem: bytes, cert_pem: bytes) -> bool:
    """True when the private key in `key_pem` belongs to the (first) certificate in `cert_pem`."""
    key = serialization.load_pem_private_key(key_pem, password=None)
    cert = x509.load_pem_x509_certificate(cert_pem)
    der = serialization.Encoding.DER
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    return bool(key.public_key().public_bytes(der, spki) == cert.public_key().public_bytes(der, spki))


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value} (the series line exactly as exposed, without the value)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        series, _, value = line.rpartition(" ")
        out[series] = float(value)
    return out


@dataclass(frozen=True)
class KV2Layout:
    """A KV v2 mount, policy and kubernetes auth mount of one test (names carry the test's suffix)."""

    kv_mount: str
    secret_path: str
    auth_mount: str
    role: str
    policy: str

    @property
    def kv(self) -> str:
        """`source.kv` for the agent config: MOUNT/PATH."""
        return f"{self.kv_mount}/{self.secret_path}"

    def write(self, client: hvac.Client, files: dict[str, bytes]) -> int:
        """Write `files` (file name -> PEM) as a new version; returns the version number."""
        resp = client.secrets.kv.v2.create_or_update_secret(
            path=self.secret_path, secret={k: v.decode() for k, v in files.items()}, mount_point=self.kv_mount
        )
        return int(resp["data"]["version"])


def setup_kv2(
    client: hvac.Client,
    kube: KubeAPI,
    unique: str,
    files: dict[str, bytes] | None,
    *,
    token_ttl: str | None = None,
    token_max_ttl: str | None = None,
) -> KV2Layout:
    """Mount KV v2 `kv2-UNIQUE`, a read policy on data and metadata, and kubernetes auth `k8s-UNIQUE` with
    role `istiod` bound to istio-system/istiod; write `files` as version 1 unless None. Idempotent (a seeder)."""
    layout = KV2Layout(
        kv_mount=f"kv2-{unique}", secret_path="istio/cacerts", auth_mount=f"k8s-{unique}", role="istiod",
        policy=f"istio-ca-{unique}",
    )
    ensure_secrets_engine(client, layout.kv_mount, kv_version=2)
    client.sys.create_or_update_policy(
        name=layout.policy,
        policy=(
            f'path "{layout.kv_mount}/data/{layout.secret_path}" {{ capabilities = ["read"] }}\n'
            f'path "{layout.kv_mount}/metadata/{layout.secret_path}" {{ capabilities = ["read"] }}\n'
        ),
    )
    configure_kubernetes_auth(
        client, kube, mount=layout.auth_mount, role=layout.role, namespace="istio-system",
        service_account="istiod", policies=[layout.policy], token_ttl=token_ttl, token_max_ttl=token_max_ttl,
    )
    if files is not None:
        layout.write(client, files)
    return layout


class SidecarProc:
    """The agent in sidecar mode as a real subprocess; use as a context manager (SIGTERM on exit)."""

    def __init__(self, config: Path, *, env: dict[str, str] | None = None) -> None:
        self.config = config
        self.env = env or cli_env()
        self.lines: list[str] = []
        self.port: int | None = None
        self.proc: subprocess.Popen[str] | None = None
        self._lock = threading.Lock()
        self._reader: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------------------------------
    def start(self, timeout: float = 15) -> SidecarProc:
        """Start the agent and wait until its health server listens."""
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "run", "--config", str(self.config), "--mode", "sidecar"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            env=self.env, cwd=ROOT,
        )
        self._reader = threading.Thread(target=self._read, name="sidecar-stderr", daemon=True)
        self._reader.start()
        found = wait_until(lambda: self.events("health_listening") or self.proc.poll() is not None, timeout)
        listening = self.events("health_listening")
        assert found and listening, f"the agent did not start its health server:\n{self.stderr}"
        self.port = int(listening[0]["port"])
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._lock:
                self.lines.append(line.rstrip("\n"))

    def stop(self, timeout: float = 10) -> tuple[int, float]:
        """SIGTERM the agent; returns (exit code, seconds it took to exit)."""
        assert self.proc is not None
        if self.proc.poll() is not None:
            return self.proc.returncode, 0.0
        start = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait(timeout=5)
        elapsed = time.monotonic() - start
        if self._reader is not None:
            self._reader.join(timeout=5)
        return rc, elapsed

    def __enter__(self) -> SidecarProc:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- logs -----------------------------------------------------------------------------------------------
    @property
    def stderr(self) -> str:
        """Everything the agent wrote to stderr so far."""
        with self._lock:
            return "\n".join(self.lines)

    def all_events(self) -> list[dict[str, Any]]:
        """Every JSON log line so far (non-JSON lines are skipped)."""
        with self._lock:
            lines = list(self.lines)
        out = []
        for line in lines:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict):
                out.append(event)
        return out

    def events(self, name: str) -> list[dict[str, Any]]:
        """Log events whose `event` is `name`, oldest first."""
        return [e for e in self.all_events() if e.get("event") == name]

    def wait_event(self, name: str, count: int = 1, timeout: float = 10) -> list[dict[str, Any]]:
        """Wait until at least `count` `name` events were logged; fails the test with the log otherwise."""
        got = wait_until(lambda: len(self.events(name)) >= count, timeout)
        assert got, f"expected {count} {name!r} event(s) within {timeout}s; log:\n{self.stderr[-6000:]}"
        return self.events(name)

    # -- health server --------------------------------------------------------------------------------------
    def get(self, path: str, timeout: float = 2) -> tuple[int, str]:
        """GET http://127.0.0.1:PORT/PATH; returns (status, body) for any HTTP status."""
        url = f"http://127.0.0.1:{self.port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:
                return int(resp.status), resp.read().decode()
        except urllib.error.HTTPError as exc:
            return int(exc.code), exc.read().decode()

    def ready(self) -> tuple[int, dict[str, Any]]:
        """/readyz as (status, parsed JSON body)."""
        status, body = self.get("/readyz")
        return status, json.loads(body)

    def metrics(self) -> dict[str, float]:
        """/metrics parsed by `parse_metrics`."""
        status, body = self.get("/metrics")
        assert status == 200, body
        return parse_metrics(body)

    def metric(self, series: str) -> float:
        """The value of one series, e.g. `istio_vault_agent_publish_total{bundle="istiod-cacerts"}` (0 if absent)."""
        return self.metrics().get(series, 0.0)
