"""The quick-start demo: a local OpenBao seeded like the vault-agent-init runbook, and the agent publishing into ./out.

With --gateway, a real Envoy serving a gateway certificate the agent publishes from OpenBao, through one rotation.
With --pki, OpenBao's PKI engine instead: istiod's intermediate signed from a CSR (the key made by the agent) and a
gateway certificate issued and renewed (20 s TTL), into ./out/istiod-cacerts and ./out/ingress-cert.

Everything is real except the Kubernetes API, which a small stand-in serves (TokenReview for OpenBao's
kubernetes auth method), because no kube-apiserver runs on a laptop without a cluster.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import yaml

from testbed import pki
from testbed.bao import start_bao
from testbed.kubeapi import KubeAPI
from testbed.vaultsetup import configure_kubernetes_auth, seed_runbook_layout, setup_pki

ROOT = Path(__file__).resolve().parent.parent


def _say(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def _agent(*args: str, **kwargs: object) -> subprocess.Popen[str]:
    exe = shutil.which("istio-vault-agent", path=str(Path(sys.executable).parent)) or ""
    cmd = [exe] if exe else [sys.executable, "-m", "agent.cli"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
    return subprocess.Popen([*cmd, *args], cwd=ROOT, env=env, text=True, **kwargs)  # type: ignore[call-overload]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; returns the agent's exit code."""
    parser = argparse.ArgumentParser(prog="scripts/demo", description=__doc__)
    parser.add_argument("--out", default="out", help="where the agent publishes the CA files (default ./out)")
    parser.add_argument("--sidecar", action="store_true", help="keep the agent running and rotate the CA once")
    parser.add_argument("--pki", action="store_true",
                        help="OpenBao's PKI engine signs istiod's intermediate and issues (and renews) a gateway cert")
    parser.add_argument("--gateway", action="store_true",
                        help="a real Envoy serves a gateway certificate from ./out/ingress-cert; rotate it in OpenBao"
                             " and watch a TLS client get the new serial")
    args = parser.parse_args(argv)
    out = (ROOT / args.out).resolve()
    work = ROOT / ".demo"
    work.mkdir(exist_ok=True)
    if args.pki:
        return _pki_demo(out, work)
    if args.gateway:
        from testbed.gatewaydemo import run_gateway_demo

        return run_gateway_demo(out / "ingress-cert", work, _agent, ROOT)

    _say("Starting OpenBao (bao server -dev) and a Kubernetes TokenReview stand-in on 127.0.0.1")
    bao = start_bao(root_token="root")
    with KubeAPI() as kube:
        print(f"    OpenBao: {bao.address}   Kubernetes API stand-in: {kube.url}")
        _say("Seeding the runbook's layout: kv v1 kubernetes-cluster1-secrets/istiod-service/certs,"
             " auth/kubernetes-cluster1 role istiod bound to istio-system/istiod")
        root = pki.root_ca(key_type="rsa")
        intermediate = pki.intermediate_ca(root, key_type="rsa", cluster="cluster1")
        layout = seed_runbook_layout(bao.client(), kube, pki.istio_ca_files(root, intermediate))
        token_file = work / "token"
        token_file.write_text(kube.mint_token(layout.namespace, layout.service_account))
        config = {
            "vault": {"address": bao.address},
            "auth": {"method": "kubernetes", "mount": layout.auth_mount, "role": layout.role,
                     "token_path": str(token_file)},
            "bundles": [{"name": "istiod-cacerts", "type": "istio-ca",
                         "source": {"kv": f"{layout.kv_mount}/{layout.secret_path}"}, "dir": str(out)}],
            "init": {"timeout": "30s"},
            "health": {"listen": "127.0.0.1:8099"},
            "sidecar": {"poll_interval": "2s"},
            "log": {"format": "console"},
        }
        config_file = work / "agent.yaml"
        config_file.write_text(yaml.safe_dump(config, sort_keys=False))
        mode = "sidecar" if args.sidecar else "init"
        _say(f"istio-vault-agent run --config {config_file.relative_to(ROOT)} --mode {mode}")
        proc = _agent("run", "--config", str(config_file), "--mode", mode)
        if args.sidecar:
            code = _sidecar_tour(proc, bao, kube, root, layout, out)
        else:
            code = proc.wait(timeout=60)
            if code == 0:
                _show(out)
    bao.close()
    return code


def _show(out: Path) -> None:
    _say(f"Published into {out}")
    for p in sorted(out.iterdir(), key=lambda p: p.name):
        target = f" -> {os.readlink(p)}" if p.is_symlink() else ""
        mode = oct(p.stat().st_mode & 0o777) if p.exists() else "-"
        print(f"    {p.name:<16} {mode}{target}")
    if shutil.which("openssl"):
        _say("openssl verify -CAfile root-cert.pem -untrusted cert-chain.pem ca-cert.pem")
        subprocess.run(["openssl", "verify", "-CAfile", "root-cert.pem", "-untrusted", "cert-chain.pem",
                        "ca-cert.pem"], cwd=out, check=False)
    _say(f"istio-vault-agent check {out} --type istio-ca")
    _agent("check", str(out), "--type", "istio-ca").wait()


def _sidecar_tour(proc: subprocess.Popen[str], bao: object, kube: KubeAPI, root: pki.CertKey,
                  layout: object, out: Path) -> int:
    import urllib.request

    def get(path: str) -> str:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:8099{path}", timeout=2) as r:
                return f"{r.status} {r.read().decode()}"
        except Exception as exc:
            return str(exc)

    deadline = time.monotonic() + 30
    while not get("/readyz").startswith("200") and time.monotonic() < deadline:
        time.sleep(0.2)
    _say(f"GET /readyz -> {get('/readyz')[:300]}")
    _show(out)
    _say("Rotating the intermediate in OpenBao (same root); the agent picks it up within poll_interval")
    before = (out / "ca-cert.pem").read_bytes()
    rotated = pki.istio_ca_files(root, pki.intermediate_ca(root, key_type="rsa"))
    seed_runbook_layout(bao.client(), kube, rotated)  # type: ignore[attr-defined]
    deadline = time.monotonic() + 15
    while (out / "ca-cert.pem").read_bytes() == before and time.monotonic() < deadline:
        time.sleep(0.2)
    print("    rotated:", (out / "ca-cert.pem").read_bytes() != before)
    metrics = get("/metrics").splitlines()
    _say("GET /metrics (excerpt)")
    wanted = ("istio_vault_agent_publish_total", "istio_vault_agent_cert")
    print("\n".join(f"    {m}" for m in metrics if m.startswith(wanted)))
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=10)


def _get(path: str) -> str:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:8099{path}", timeout=2) as r:
            return f"{r.status} {r.read().decode()}"
    except Exception as exc:
        return str(exc)


def _serial(path: Path) -> str:
    from cryptography import x509

    return format(x509.load_pem_x509_certificate(path.read_bytes()).serial_number, "x")


def _pki_demo(out: Path, work: Path) -> int:
    _say("Starting OpenBao (bao server -dev) and a Kubernetes TokenReview stand-in on 127.0.0.1")
    bao = start_bao(root_token="root")
    with KubeAPI() as kube:
        print(f"    OpenBao: {bao.address}   Kubernetes API stand-in: {kube.url}")
        _say("PKI: root CA in mount pki; intermediate issuer gateway-ca in mount pki_int; role pki_int/roles/ingress")
        layout = setup_pki(bao.client(), crl_address=bao.address)
        configure_kubernetes_auth(bao.client(), kube, mount="kubernetes-cluster1", role="istiod",
                                  namespace="istio-system", service_account="istiod", policies=[layout.policy])
        print(f"    the agent's whole policy ({layout.policy}):")
        print("".join(f"      {line}\n" for line in layout.policy_text().splitlines()), end="")
        token_file = work / "token"
        token_file.write_text(kube.mint_token("istio-system", "istiod"))
        istiod, gateway = out / "istiod-cacerts", out / "ingress-cert"
        config = {
            "vault": {"address": bao.address},
            "auth": {"method": "kubernetes", "mount": "kubernetes-cluster1", "role": "istiod",
                     "token_path": str(token_file)},
            "bundles": [
                {"name": "istiod-cacerts", "type": "istio-ca", "dir": str(istiod), "ready_min_remaining": "5m",
                 "source": {"pki_intermediate": {"mount": "pki", "path": "root/sign-intermediate",
                                                 "cluster": "cluster1", "key_type": "ec-p256", "ttl": "1h",
                                                 "renew_before": 0.33}}},
                {"name": "ingress-cert", "type": "tls", "dir": str(gateway), "ready_min_remaining": "1s",
                 "source": {"pki": {"mount": "pki_int", "role": "ingress", "common_name": "app.example.com",
                                    "alt_names": ["www.example.com"], "ip_sans": [], "ttl": "20s"}}},
            ],
            "init": {"timeout": "30s"},
            "health": {"listen": "127.0.0.1:8099"},
            "sidecar": {"poll_interval": "2s"},
            "log": {"format": "console"},
        }
        config_file = work / "agent-pki.yaml"
        config_file.write_text(yaml.safe_dump(config, sort_keys=False))
        _say(f"istio-vault-agent run --config {config_file.relative_to(ROOT)} --mode sidecar")
        proc = _agent("run", "--config", str(config_file), "--mode", "sidecar")
        deadline = time.monotonic() + 30
        while not _get("/readyz").startswith("200") and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        if proc.poll() is not None:
            bao.close()
            return proc.returncode
        _say(f"GET /readyz -> {_get('/readyz')[:300]}")
        _show(istiod)
        _say(f"The gateway certificate in {gateway}")
        subprocess.run(["openssl", "x509", "-in", "tls.crt", "-noout", "-subject", "-issuer", "-dates", "-ext",
                        "subjectAltName"], cwd=gateway, check=False)
        if shutil.which("openssl"):
            subprocess.run(["openssl", "verify", "-CAfile", "ca.crt", "-untrusted", "tls.crt", "tls.crt"],
                           cwd=gateway, check=False)
        before = _serial(gateway / "tls.crt")
        _say("Waiting for the agent to renew the 20 s gateway certificate at 2/3 of its lifetime")
        deadline = time.monotonic() + 30
        while _serial(gateway / "tls.crt") == before and time.monotonic() < deadline:
            time.sleep(0.2)
        after = _serial(gateway / "tls.crt")
        print(f"    serial {before} -> {after}: renewed: {after != before}")
        _say("GET /metrics (excerpt)")
        wanted = ("istio_vault_agent_renewals_total", "istio_vault_agent_bundle_expiry", "istio_vault_agent_errors")
        print("\n".join(f"    {m}" for m in _get("/metrics").splitlines() if m.startswith(wanted)))
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=10)
    bao.close()
    return code


if __name__ == "__main__":
    sys.exit(main())
