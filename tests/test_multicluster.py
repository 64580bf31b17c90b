"""The bootstrap commands together, as the README's Multi-cluster guide runs them against a real OpenBao: `ca root`,
`setup vault` and `ca intermediate --kv` for two clusters, each cluster's agent publishing its own intermediate,
`doctor` passing, and step 3 of the root rotation (an intermediate under B stored with the combined A+B roots).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from cryptography import x509

from tests.support import agent_config, cli_env, run_cli, write_config


def _certs(path: Path) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(path.read_bytes())


def _doctor(env: dict[str, str], *clusters: str) -> tuple[int, dict[str, dict[str, str]]]:
    """Run `doctor --output json`; (exit code, {cluster/check: status + detail})."""
    args = [a for c in clusters for a in ("--cluster", c)]
    proc = run_cli("doctor", *args, "--output", "json", env=env)
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
