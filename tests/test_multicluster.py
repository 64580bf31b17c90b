"""The bootstrap commands together, as docs/multi-cluster.md runs them against a real OpenBao: `ca root`,
`setup vault` and `ca intermediate --kv` for two clusters, each cluster's agent publishing its own intermediate,
`doctor` passing, step 3 of the hand-run root rotation (an intermediate under B stored with the combined A+B
roots), and docs/root-rotation.md's rotation with `rotate` end to end (status, trust, sign killed between two clusters'
writes and resumed, retire) with both agents running and istiod's side read through the Kubernetes API stand-in.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

from cryptography import x509

from testbed.kubeapi import KubeAPI
from tests.faultkit import HTTPProxy
from tests.support import (
    ISTIO_FILES,
    ROOT,
    AgentProc,
    agent_config,
    cli_env,
    live_files,
    run_cli,
    wait_until,
    write_config,
)


def _certs(path: Path) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(path.read_bytes())


def _doctor(env: dict[str, str], *clusters: str, extra: tuple[str, ...] = ()) -> tuple[int, dict[str, dict[str, str]]]:
    """Run `doctor --output json`; (exit code, {cluster/check: status + detail})."""
    args = [a for c in clusters for a in ("--cluster", c)]
    proc = run_cli("doctor", *args, "--output", "json", *extra, env=env)
    assert proc.returncode in (0, 1), proc.stderr
    report = json.loads(proc.stdout)
    return proc.returncode, {f"{c['cluster']}/{c['check']}": c for c in report["checks"]}


class TestGuide:
    def test_two_clusters_one_root_then_a_rotation_step(self, tmp_path, bao, kube, unique, sa_token_file):
        """Every command of the guide succeeds; both agents publish intermediates that differ and chain to one root;
        doctor passes; after step 3 of the rotation (east under root B, root-cert.pem A+B everywhere) doctor
        reports overlapping roots and east's agent publishes the new intermediate with root-cert.pem unchanged."""
        env = cli_env(VAULT_ADDR=bao.address, VAULT_TOKEN=bao.root_token)
        east, west = f"e{unique}", f"w{unique}"
        api_ca = tmp_path / "api-ca.pem"
        api_ca.write_bytes(kube.ca_pem)
        reviewer = tmp_path / "reviewer.jwt"
        reviewer.write_text(kube.mint_token("kube-system", "bao-token-reviewer", ttl=7 * 24 * 3600))

        def ok(*args: str) -> str:
            proc = run_cli(*args, env=env, timeout=120)
            assert proc.returncode == 0, f"{args[:2]}: {proc.stdout}{proc.stderr}"
            assert bao.root_token not in proc.stdout + proc.stderr
            return proc.stdout

        ok("ca", "root", "--out", str(tmp_path / "root-a"), "--key-type", "ec-p256")
        for c in (east, west):
            ok("setup", "vault", "--cluster", c, "--kubernetes-host", kube.url, "--kubernetes-ca-cert", str(api_ca),
               "--token-reviewer-jwt", str(reviewer))
            ok("ca", "intermediate", "--cluster", c, "--root-dir", str(tmp_path / "root-a"), "--key-type", "ec-p256",
               "--kv", f"kubernetes-{c}-secrets/istiod-service/certs")

        def publish(c: str) -> Path:
            out = tmp_path / f"out-{c}"
            token = sa_token_file("istio-system", "istiod", audience="vault", filename=f"token-{c}")
            cfg = agent_config(address=bao.address, token_path=token, out=out, mount=f"kubernetes-{c}",
                               kv=f"kubernetes-{c}-secrets/istiod-service/certs")
            proc = run_cli("run", "--config", str(write_config(tmp_path / f"{c}.yaml", cfg)), "--mode", "init")
            assert proc.returncode == 0, proc.stderr
            return out

        outs = {c: publish(c) for c in (east, west)}
        root_a = _certs(tmp_path / "root-a" / "root-cert.pem")[0]
        inters = {c: _certs(outs[c] / "ca-cert.pem")[0] for c in outs}
        assert inters[east] != inters[west]
        for c, inter in inters.items():
            assert _certs(outs[c] / "root-cert.pem") == [root_a]
            assert inter.issuer == root_a.subject
            inter.verify_directly_issued_by(root_a)
            assert c in inter.subject.rfc4514_string()  # L=<cluster>

        code, checks = _doctor(env, east, west)
        assert code == 0, checks
        assert {v["status"] for v in checks.values()} == {"ok"}, checks
        assert "same root" in checks[f"{east}/root"]["detail"]

        # rotation step 1-3: root B, A+B in both clusters, east's intermediate under B with the combined roots
        ok("ca", "root", "--out", str(tmp_path / "root-b"), "--key-type", "ec-p256")
        roots_ab = (tmp_path / "root-a" / "root-cert.pem").read_bytes() + (
            tmp_path / "root-b" / "root-cert.pem").read_bytes()
        (tmp_path / "root-ab").mkdir(mode=0o700)
        (tmp_path / "root-ab" / "root-cert.pem").write_bytes(roots_ab)
        shutil.copy(tmp_path / "root-b" / "root-key.pem", tmp_path / "root-ab" / "root-key.pem")
        (tmp_path / "root-wa").mkdir(mode=0o700)
        (tmp_path / "root-wa" / "root-cert.pem").write_bytes(roots_ab)
        shutil.copy(tmp_path / "root-a" / "root-key.pem", tmp_path / "root-wa" / "root-key.pem")
        ok("ca", "intermediate", "--cluster", west, "--root-dir", str(tmp_path / "root-wa"), "--key-type", "ec-p256",
           "--kv", f"kubernetes-{west}-secrets/istiod-service/certs", "--force")
        ok("ca", "intermediate", "--cluster", east, "--root-dir", str(tmp_path / "root-ab"), "--key-type", "ec-p256",
           "--kv", f"kubernetes-{east}-secrets/istiod-service/certs", "--force")
        code, checks = _doctor(env, east, west)
        assert code == 0, checks
        assert "overlapping roots" in checks[f"{east}/root"]["detail"], checks[f"{east}/root"]
        east_out = publish(east)
        root_b = _certs(tmp_path / "root-b" / "root-cert.pem")[0]
        assert (east_out / "root-cert.pem").read_bytes() == roots_ab
        _certs(east_out / "ca-cert.pem")[0].verify_directly_issued_by(root_b)

        # west still trusting A alone while east is under B: doctor names the cluster whose root-cert.pem lacks B
        ok("ca", "intermediate", "--cluster", west, "--root-dir", str(tmp_path / "root-a"), "--key-type", "ec-p256",
           "--kv", f"kubernetes-{west}-secrets/istiod-service/certs", "--force")
        code, checks = _doctor(env, east, west)
        assert code == 1
        failed = {k for k, v in checks.items() if v["status"] == "FAIL"}
        assert failed and all(k.endswith("/root") for k in failed), checks


def _istiod_side(api: KubeAPI, agent: AgentProc) -> None:
    """istiod in one cluster as docs/root-rotation.md step 0 leaves it: ISTIO_MULTIROOT_MESH=true,
    PROXY_CONFIG_XDS_AGENT in the mesh config, and one pod whose agent (port 8099 through the pod proxy) is `agent`."""
    api.put_workload("Deployment", {
        "metadata": {"name": "istiod", "namespace": "istio-system"},
        "spec": {"selector": {"matchLabels": {"app": "istiod"}}, "template": {"spec": {"containers": [
            {"name": "discovery", "image": "docker.io/istio/pilot:1.29.6",
             "env": [{"name": "ISTIO_MULTIROOT_MESH", "value": "true"}]}]}}},
    })
    api.put_configmap("istio-system", "istio", {
        "mesh": "defaultConfig:\n  proxyMetadata:\n    PROXY_CONFIG_XDS_AGENT: \"true\"\n"})
    api.put_pod("istio-system", "istiod-0", {"app": "istiod"}, proxy={8099: agent.health})


class TestRotate:
    def test_readme_rotation_with_rotate(self, tmp_path, bao, kube, unique, sa_token_file):
        """docs/root-rotation.md with `rotate`, two clusters, both agents running: after trust both publish
        A+B (A's bytes first) with their A intermediates; a `rotate sign` SIGKILLed after the first cluster's write
        leaves one cluster under B, and running it again finishes the other; after sign both publish B's
        intermediates with A+B, after retire B alone; doctor passes at every step."""
        env = cli_env(VAULT_ADDR=bao.address, VAULT_TOKEN=bao.root_token)
        east, west = f"e{unique}", f"w{unique}"
        api_ca = tmp_path / "api-ca.pem"
        api_ca.write_bytes(kube.ca_pem)
        reviewer = tmp_path / "reviewer.jwt"
        reviewer.write_text(kube.mint_token("kube-system", "bao-token-reviewer", ttl=7 * 24 * 3600))

        def ok(*args: str, environ: dict[str, str] | None = None) -> str:
            proc = run_cli(*args, env=environ or env, timeout=120)
            assert proc.returncode == 0, f"{args[:2]}: {proc.stdout}{proc.stderr}"
            text = proc.stdout + proc.stderr
            assert bao.root_token not in text and "PRIVATE KEY" not in text
            return proc.stdout

        ok("ca", "root", "--out", str(tmp_path / "root-a"), "--key-type", "ec-p256")
        for c in (east, west):
            ok("setup", "vault", "--cluster", c, "--kubernetes-host", kube.url, "--kubernetes-ca-cert", str(api_ca),
               "--token-reviewer-jwt", str(reviewer))
            ok("ca", "intermediate", "--cluster", c, "--root-dir", str(tmp_path / "root-a"), "--key-type", "ec-p256",
               "--kv", f"kubernetes-{c}-secrets/istiod-service/certs")

        outs = {c: tmp_path / f"out-{c}" for c in (east, west)}
        agents = {}
        for c in (east, west):
            token = sa_token_file("istio-system", "istiod", audience="vault", filename=f"token-{c}")
            cfg = agent_config(address=bao.address, token_path=token, out=outs[c], mount=f"kubernetes-{c}",
                               kv=f"kubernetes-{c}-secrets/istiod-service/certs", poll="1s", multiroot=True)
            agents[c] = AgentProc(write_config(tmp_path / f"{c}.yaml", cfg), env=cli_env()).start()
        root_a = _certs(tmp_path / "root-a" / "root-cert.pem")[0]
        a_bytes = (tmp_path / "root-a" / "root-cert.pem").read_bytes()

        def published(c: str, roots: bytes, issuer: x509.Certificate) -> bool:
            try:
                files = live_files(outs[c])
                inter = x509.load_pem_x509_certificate(files["ca-cert.pem"])
            except (OSError, KeyError, ValueError):
                return False
            return files["root-cert.pem"] == roots and inter.issuer == issuer.subject and _signed(inter, issuer)

        def doctor_passes(*phases: str) -> str:
            code, checks = _doctor(env, east, west, extra=("--rotation",))
            assert code == 0, checks
            for c, phase in zip((east, west), phases, strict=True):
                assert checks[f"{c}/rotation"]["detail"].startswith(f"phase {phase}:"), checks[f"{c}/rotation"]
            return checks[f"{east}/root"]["detail"]

        try:
            assert wait_until(lambda: all(published(c, a_bytes, root_a) for c in outs), timeout=20)
            doctor_passes("A", "A")
            with KubeAPI() as kube_east, KubeAPI() as kube_west:
                configs = []
                for c, api in ((east, kube_east), (west, kube_west)):
                    _istiod_side(api, agents[c])
                    configs.append(str(api.write_kubeconfig(tmp_path / f"kubeconfig-{c}",
                                                            api.mint_token("kube-system", "operator"), context=c)))
                env["KUBECONFIG"] = ":".join(configs)
                clusters = ["--cluster", east, "--cluster", west]
                new = [*clusters, "--root-dir", str(tmp_path / "root-b"), "--context", f"{east}={east}",
                       "--context", f"{west}={west}"]

                ok("ca", "root", "--out", str(tmp_path / "root-b"), "--key-type", "ec-p256")
                root_b = _certs(tmp_path / "root-b" / "root-cert.pem")[0]
                status = ok("rotate", "status", *clusters)
                assert status.count("phase A:") == 2 and "every cluster is in phase A" in status, status

                # trust: A+B everywhere, A's bytes first; the intermediates stay under A
                out = ok("rotate", "trust", *new)
                assert "istiod 1.29.6" in out and "publish what KV holds" in out, out
                ab = a_bytes + (tmp_path / "root-b" / "root-cert.pem").read_bytes()
                assert wait_until(lambda: all(published(c, ab, root_a) for c in outs), timeout=20)
                assert "same root" in doctor_passes("trust", "trust")
                assert "run again after" in run_cli("rotate", "sign", *new, env=env).stderr  # the 24h wait

                # sign, killed after the first cluster's write (its answer held back by a proxy), then resumed
                proxy = HTTPProxy(bao.port)
                written, release = threading.Event(), threading.Event()

                def hold(method: str, path: str, status: int, body: bytes) -> None:
                    if method == "POST" and "istiod-service/certs" in path and not written.is_set():
                        written.set()
                        release.wait(30)

                proxy.mutate = hold
                killed = subprocess.Popen(
                    [sys.executable, "-m", "agent.cli", "rotate", "sign", *new, "--wait-at-least", "0s"],
                    env={**env, "VAULT_ADDR": proxy.address}, cwd=ROOT, stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE)
                try:
                    assert written.wait(60), killed.communicate(timeout=5)
                    killed.kill()
                    killed.wait(10)
                finally:
                    release.set()
                    proxy.close()
                status = ok("rotate", "status", *clusters, "--root-dir", str(tmp_path / "root-b"))
                assert f"{east}  " in status and "phase sign" in status.split(f"{west}  ")[0], status
                assert "phase trust" in status.split(f"{west}  ")[1], status
                assert wait_until(lambda: published(east, ab, root_b), timeout=20)
                assert "overlapping roots" in doctor_passes("sign", "trust")
                out = ok("rotate", "sign", *new, "--wait-at-least", "0s")
                assert f"{east}: already done (sign)" in out and f"{west}: wrote" in out, out
                assert wait_until(lambda: all(published(c, ab, root_b) for c in outs), timeout=20)
                assert "same root" in doctor_passes("sign", "sign")
                assert ok("rotate", "sign", *new, "--wait-at-least", "0s").startswith("already done")

                # retire: B alone, which A+B contains byte for byte
                ok("rotate", "retire", *new, "--wait-at-least", "0s")
                b_bytes = (tmp_path / "root-b" / "root-cert.pem").read_bytes()
                assert wait_until(lambda: all(published(c, b_bytes, root_b) for c in outs), timeout=20)
                assert "same root" in doctor_passes("retire", "retire")
                status = ok("rotate", "status", *clusters)
                assert "every cluster is in phase retire" in status, status
            for c, out_dir in outs.items():
                assert set(live_files(out_dir)) == set(ISTIO_FILES)  # the rotation record is never published
                assert not agents[c].events("root_changed"), agents[c].tail()
        finally:
            for agent in agents.values():
                agent.stop()


def _signed(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except Exception:  # a bad signature or a name mismatch: not its issuer
        return False
    return True
