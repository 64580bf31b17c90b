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
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from testbed import pki
from testbed.demokit import (
    ROOT,
    WAIT,
    DemoFailed,
    Session,
    State,
    cert_serial,
    claim,
    on_signal,
    say,
    show_dir,
    shown,
    start_openbao,
    stop_process,
    sweep,
    write_config,
)
from testbed.vaultsetup import configure_kubernetes_auth, seed_runbook_layout, setup_pki


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
        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        if early:
            raise KeyboardInterrupt
        args = _parse(argv)
    except KeyboardInterrupt:
        State.interrupted = State.interrupted or ("SIGTERM" if signal.SIGTERM in early else "Ctrl-C")
        print(f"\n==> {State.interrupted}: nothing was running yet", flush=True)
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
        State.quiet.set()
        print(f"error: {exc}", file=sys.stderr, flush=True)
        code = 1
    finally:
        if session is not None:
            session.close()
        sweep()
        if lock >= 0:
            os.close(lock)
    if State.interrupted:
        started = session.started if session is not None else []
        what = (", ".join(started[:-1]) + " and " + started[-1]) if len(started) > 1 else "".join(started)
        print(f"\n==> {State.interrupted}: {'stopped ' + what if what else 'nothing was running yet'}", flush=True)
        return 0
    return code


def _variant(args: argparse.Namespace) -> Callable[..., int]:
    if args.pki:
        return _pki_demo
    if args.gateway:
        from testbed.gatewaydemo import gateway_demo

        return gateway_demo
    return _kv_demo


def _verify_istio_ca(session: Session, directory: Path) -> None:
    if shutil.which("openssl"):
        say("openssl verify -CAfile root-cert.pem -untrusted cert-chain.pem ca-cert.pem")
        session.run("openssl", "verify", "-CAfile", "root-cert.pem", "-untrusted", "cert-chain.pem", "ca-cert.pem",
                    cwd=directory)
    say(f"istio-vault-agent check {shown(directory)} --type istio-ca")
    session.run("istio-vault-agent", "check", str(directory), "--type", "istio-ca")


def _kv_demo(session: Session, *, sidecar: bool) -> int:
    bao, kube = start_openbao(session)
    say("Seeding the runbook's layout: kv v1 kubernetes-cluster1-secrets/istiod-service/certs,"
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
    say("Rotating the intermediate in OpenBao (same root); the agent picks it up within poll_interval (2 s)")
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
    say("PKI: root CA in mount pki; intermediate issuer gateway-ca in mount pki_int; role pki_int/roles/ingress")
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
    say(f"The gateway certificate in {shown(gateway)}")
    if shutil.which("openssl"):
        session.run("openssl", "x509", "-in", "tls.crt", "-noout", "-serial", "-subject", "-issuer", "-dates", "-ext",
                    "subjectAltName", cwd=gateway)
        session.run("openssl", "verify", "-CAfile", "ca.crt", "-untrusted", "tls.crt", "tls.crt", cwd=gateway)
    before = published["ingress-cert"]
    say(f"Waiting for the agent to renew the gateway certificate (ttl {ttl}): it renews when a third of the"
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
    say("Stopping the agent (SIGTERM)")
    return stop_process(proc)


if __name__ == "__main__":
    sys.exit(main())
