"""`scripts/demo --gateway`: a real Envoy serving a gateway certificate that the agent publishes from OpenBao.

The README's Gateways layout (KV v1 `kubernetes-cluster1-secrets/istio-ingressgateway/certs` with tls.key, tls.crt,
ca.crt; role `istio-ingressgateway` bound to istio-ingress/istio-ingressgateway), the agent in sidecar mode, and
Envoy reading the bundle through file SDS; then one rotation in OpenBao while a client handshakes continuously.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from testbed import pki
from testbed.bao import free_port, start_bao
from testbed.envoy import ClientResult, Envoy, EnvoyNotFound, ServerTls, client_context, find_envoy, tls_get
from testbed.kubeapi import KubeAPI
from testbed.vaultsetup import configure_kubernetes_auth, ensure_secrets_engine

if TYPE_CHECKING:
    import hvac

__all__ = ["run_gateway_demo"]

KV_MOUNT = "kubernetes-cluster1-secrets"
SECRET = "istio-ingressgateway/certs"
POLICY = "ingress-certs-cluster1"
ROLE = "istio-ingressgateway"
NAMESPACE = "istio-ingress"


def _say(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def _serial(result: ClientResult) -> str | None:
    """The hex serial of the certificate a handshake was served, or None if it failed."""
    from cryptography import x509

    if not result.ok or result.peer_der is None:
        return None
    return format(x509.load_der_x509_certificate(result.peer_der).serial_number, "x")


def _wait(check: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _openssl_serial(port: int, ca_file: Path) -> None:
    """Show what `openssl s_client` is served: the verify result and the certificate's serial."""
    if not shutil.which("openssl"):
        return
    print(f"    $ openssl s_client -connect 127.0.0.1:{port} -servername localhost -CAfile ca.crt"
          " | openssl x509 -noout -serial")
    hello = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "localhost", "-CAfile", str(ca_file),
         "-verify_return_error"],
        input="", capture_output=True, text=True, timeout=10, check=False,
    )
    verified = [line.strip() for line in hello.stdout.splitlines() if line.strip().startswith("Verify return code")]
    serial = subprocess.run(["openssl", "x509", "-noout", "-serial"], input=hello.stdout, capture_output=True,
                            text=True, timeout=10, check=False)
    print(f"    {serial.stdout.strip() or serial.stderr.strip()}   ({verified[0] if verified else 'no verify result'})")


class _Client(threading.Thread):
    """Handshakes with the gateway in a loop, as traffic does, counting the handshakes and the failed ones."""

    def __init__(self, port: int, ca_file: Path) -> None:
        super().__init__(name="demo-client", daemon=True)
        self.port, self.context = port, client_context(cafile=ca_file)
        self.done = threading.Event()
        self.results: list[ClientResult] = []

    def run(self) -> None:
        while not self.done.is_set():
            self.results.append(tls_get(self.port, context=self.context))
            self.done.wait(0.02)

    def stop(self) -> tuple[int, int]:
        """Stop; returns (handshakes, failed)."""
        self.done.set()
        self.join(timeout=10)
        return len(self.results), sum(1 for r in self.results if not r.ok)


def _write(client: hvac.Client, files: dict[str, bytes]) -> None:
    """A new version of the gateway secret, as an operator's `bao kv put` writes it."""
    client.write_data(f"{KV_MOUNT}/{SECRET}", data={k: v.decode() for k, v in files.items()})


def run_gateway_demo(out: Path, work: Path, agent: Callable[..., subprocess.Popen[str]], root: Path) -> int:
    """Run the gateway demo into `out` (the bundle dir), with scratch files in `work`; returns the exit code.

    `agent(*args)` starts `istio-vault-agent` with those arguments.
    """
    try:
        envoy_binary = find_envoy()
    except EnvoyNotFound as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    _say("Starting OpenBao (bao server -dev) and a Kubernetes TokenReview stand-in on 127.0.0.1")
    bao = start_bao(root_token="root")
    code = 1
    with KubeAPI() as kube:
        print(f"    OpenBao: {bao.address}   Kubernetes API stand-in: {kube.url}")
        _say(f"Seeding kv v1 {KV_MOUNT}/{SECRET} (tls.key, tls.crt, ca.crt), policy {POLICY},"
             f" auth/kubernetes-cluster1 role {ROLE} bound to {NAMESPACE}/{ROLE}")
        ca = pki.root_ca(cn="demo ingress CA")
        first = pki.leaf_cert(ca)
        client = bao.client()
        ensure_secrets_engine(client, KV_MOUNT, kv_version=1)
        _write(client, pki.tls_files(first, ca))
        client.sys.create_or_update_policy(
            name=POLICY, policy=f'path "{KV_MOUNT}/{SECRET}" {{ capabilities = ["read"] }}\n')
        configure_kubernetes_auth(client, kube, mount="kubernetes-cluster1", role=ROLE, namespace=NAMESPACE,
                                  service_account=ROLE, policies=[POLICY], audience="vault")
        token_file = work / "gateway-token"
        token_file.write_text(kube.mint_token(NAMESPACE, ROLE, audience="vault"))
        health = free_port()
        config = {
            "vault": {"address": bao.address},
            "auth": {"method": "kubernetes", "mount": "kubernetes-cluster1", "role": ROLE,
                     "token_path": str(token_file)},
            "bundles": [{"name": "ingress-cert", "type": "tls", "source": {"kv": f"{KV_MOUNT}/{SECRET}"},
                         "dir": str(out)}],
            "init": {"timeout": "30s"},
            "health": {"listen": f"127.0.0.1:{health}"},
            "sidecar": {"poll_interval": "1s"},
            "log": {"format": "console"},
        }
        config_file = work / "agent-gateway.yaml"
        config_file.write_text(yaml.safe_dump(config, sort_keys=False))
        _say(f"istio-vault-agent run --config {config_file.relative_to(root)} --mode sidecar")
        proc = agent("run", "--config", str(config_file), "--mode", "sidecar")
        envoy = Envoy(work / "envoy", binary=envoy_binary, listeners=[ServerTls("ingress", out)])
        try:
            code = _tour(proc, envoy, client, ca, out)
        finally:
            envoy.close()
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            agent_code = proc.wait(timeout=10)
            code = code or agent_code
    bao.close()
    return code


def _tour(proc: subprocess.Popen[str], envoy: Envoy, client: hvac.Client, ca: pki.CertKey, out: Path) -> int:
    """Envoy on the published bundle, one rotation under traffic; 0 when the new serial is served with no failure."""
    if not _wait(lambda: proc.poll() is not None or (out / "tls.crt").exists(), 30) or proc.poll() is not None:
        print("error: the agent did not publish the gateway bundle", file=sys.stderr)
        return 1
    _say(f"Published into {out}")
    for p in sorted(out.iterdir(), key=lambda p: p.name):
        target = f" -> {os.readlink(p)}" if p.is_symlink() else ""
        mode = oct(p.stat().st_mode & 0o777) if p.exists() else "-"
        print(f"    {p.name:<10} {mode}{target}")
    envoy.start()
    port = envoy.port("ingress")
    ca_file = out / "ca.crt"
    _say(f"Envoy {envoy.binary} serves it on 127.0.0.1:{port} (file SDS, watched_directory {out})")
    _openssl_serial(port, ca_file)
    before = _serial(tls_get(port, cafile=ca_file))
    print(f"    Python ssl client: serial {before} (verified against ca.crt)")
    traffic = _Client(port, ca_file)
    traffic.start()
    _say("Rotating the certificate in OpenBao; the agent publishes it with one ..data swap, Envoy reloads it")
    second = pki.leaf_cert(ca)
    new = format(second.cert.serial_number, "x")
    started = time.monotonic()
    _write(client, pki.tls_files(second, ca))
    seen = _wait(lambda: _serial(tls_get(port, cafile=ca_file)) == new, 15)
    took = time.monotonic() - started
    time.sleep(0.5)
    handshakes, failed = traffic.stop()
    after = _serial(tls_get(port, cafile=ca_file))
    _openssl_serial(port, ca_file)
    print(f"    Python ssl client: serial {before} -> {after}: new serial served: {seen and after == new}"
          f" ({took:.1f} s after the write, poll_interval 1 s)")
    print(f"    handshakes while rotating: {handshakes}, failed: {failed}")
    print(f"    Envoy: ssl_context_update_by_sds={envoy.ssl_context_updates('ingress')}"
          f" key_rotation_failed={envoy.key_rotation_failures('ingress')}")
    return 0 if seen and failed == 0 else 1
