"""The quick-start demo: a local OpenBao seeded like the vault-agent-init runbook, and the agent publishing into ./out.

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
from testbed.vaultsetup import seed_runbook_layout

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
    args = parser.parse_args(argv)
    out = (ROOT / args.out).resolve()
    work = ROOT / ".demo"
    work.mkdir(exist_ok=True)

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


if __name__ == "__main__":
    sys.exit(main())
