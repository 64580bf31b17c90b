"""`scripts/demo --gateway`: a real Envoy serving a gateway certificate that the agent publishes from OpenBao.

The README's Gateways layout (KV v1 `kubernetes-cluster1-secrets/istio-ingressgateway/certs` with tls.key, tls.crt,
ca.crt; role `istio-ingressgateway` bound to istio-ingress/istio-ingressgateway), the agent in sidecar mode, and
Envoy reading the bundle through file SDS once this run's agent says it published the certificate the demo wrote;
then one rotation in OpenBao while a client handshakes continuously.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from testbed import pki
from testbed.demokit import DemoFailed, Session, show_dir, shown, start_openbao, write_config
from testbed.envoy import ClientResult, Envoy, EnvoyNotFound, ServerTls, client_context, find_envoy, tls_get
from testbed.vaultsetup import configure_kubernetes_auth, ensure_secrets_engine

if TYPE_CHECKING:
    import hvac

__all__ = ["gateway_demo"]

KV_MOUNT = "kubernetes-cluster1-secrets"
SECRET = "istio-ingressgateway/certs"
POLICY = "ingress-certs-cluster1"
ROLE = "istio-ingressgateway"
NAMESPACE = "istio-ingress"


def say(text: str) -> None:
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
        input="", capture_output=True, text=True, timeout=10, check=False, process_group=0,
    )
    verified = [line.strip() for line in hello.stdout.splitlines() if line.strip().startswith("Verify return code")]
    serial = subprocess.run(["openssl", "x509", "-noout", "-serial"], input=hello.stdout, capture_output=True,
                            text=True, timeout=10, check=False, process_group=0)
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


def gateway_demo(session: Session, *, sidecar: bool) -> int:
    """Run the gateway demo below `session.out` (the bundle in ingress-cert/, Envoy's files in envoy/); returns the
    exit code. With `sidecar`, the agent and Envoy keep running after the tour until Ctrl-C."""
    try:
        envoy_binary = find_envoy()
    except EnvoyNotFound as exc:
        raise DemoFailed(str(exc)) from None
    bao, kube = start_openbao(session)
    say(f"Seeding kv v1 {KV_MOUNT}/{SECRET} (tls.key, tls.crt, ca.crt), policy {POLICY},"
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
    token_file = session.out / "token"
    token_file.write_text(kube.mint_token(NAMESPACE, ROLE, audience="vault"))
    out = session.out / "ingress-cert"
    config = write_config(
        session, "agent-gateway.yaml", bao.address,
        {"mount": "kubernetes-cluster1", "role": ROLE, "token_path": str(token_file)},
        [{"name": "ingress-cert", "type": "tls", "source": {"kv": f"{KV_MOUNT}/{SECRET}"}, "dir": str(out)}],
        poll="1s",
    )
    proc = session.agent(config, "sidecar")
    took = session.wait_published(proc, {"ingress-cert": int(first.cert.serial_number)})
    show_dir(session, out, f" ({took:.1f} s after the agent started; tls.crt serial {first.cert.serial_number:x},"
                           " the one just written to OpenBao)")
    envoy = Envoy(session.out / "envoy", binary=envoy_binary, listeners=[ServerTls("ingress", out)], own_group=True)
    session.stack.callback(envoy.close)
    session.started.append("Envoy")
    envoy.start()
    code = _tour(session, envoy, client, ca, out)
    if sidecar:
        port = envoy.port("ingress")
        return session.keep_running(
            proc, f"The agent and Envoy keep running: `openssl s_client -connect 127.0.0.1:{port} -servername"
                  f" localhost -CAfile {shown(out / 'ca.crt')}` is served the current certificate; the agent reads"
                  f" {KV_MOUNT}/{SECRET} every 1 s (poll_interval).")
    return code


def _tour(session: Session, envoy: Envoy, client: hvac.Client, ca: pki.CertKey, out: Path) -> int:
    """Envoy on the published bundle, one rotation under traffic; 0 when the new serial is served with no failure."""
    port = envoy.port("ingress")
    ca_file = out / "ca.crt"
    say(f"Envoy {envoy.binary} serves it on 127.0.0.1:{port} (file SDS, watched_directory {shown(out)})")
    _openssl_serial(port, ca_file)
    before = _serial(tls_get(port, cafile=ca_file))
    print(f"    Python ssl client: serial {before} (verified against ca.crt)", flush=True)
    traffic = _Client(port, ca_file)
    traffic.start()
    say("Rotating the certificate in OpenBao; the agent publishes it with one ..data swap, Envoy reloads it")
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
          f" key_rotation_failed={envoy.key_rotation_failures('ingress')}", flush=True)
    return 0 if seen and failed == 0 else 1
