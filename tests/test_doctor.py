"""`istio-vault-agent doctor` against a real OpenBao: a good two-cluster setup passes, and each broken piece is
named on a FAIL line; the root rotation playbook's states; nothing secret in the output."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from dataclasses import dataclass

import hvac
import pytest

from agent import cli
from agent.clusters import ClusterLayout
from testbed.bao import BaoServer
from testbed.kubeapi import KubeAPI
from testbed.multicluster import bundle_data, seed_cluster, seed_pki_cluster, write_bundle
from testbed.pki import CertKey, intermediate_ca, istio_ca_files, root_ca, write_files
from testbed.vaultsetup import setup_pki
from tests.support import ROOT, cli_env, error_line, run_cli


@dataclass
class Mesh:
    """Two clusters under one root, as the Multi-cluster guide sets them up."""

    client: hvac.Client
    root: CertKey
    one: ClusterLayout
    two: ClusterLayout
    inter_one: CertKey
    inter_two: CertKey

    @property
    def args(self) -> list[str]:
        return ["doctor", "--cluster", self.one.cluster, "--cluster", self.two.cluster]


@pytest.fixture(name="mesh")
def fixture_mesh(vault_admin: hvac.Client, kube: KubeAPI, unique: str) -> Mesh:
    """A good two-cluster setup on the shared OpenBao: one root, an intermediate per cluster."""
    root = root_ca()
    inter_one, inter_two = intermediate_ca(root, cluster="one"), intermediate_ca(root, cluster="two")
    one = seed_cluster(vault_admin, kube, f"a{unique}", root, intermediate=inter_one)
    two = seed_cluster(vault_admin, kube, f"b{unique}", root, intermediate=inter_two)
    return Mesh(vault_admin, root, one, two, inter_one, inter_two)


@pytest.fixture(name="doctor")
def fixture_doctor(bao: BaoServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    """Run `istio-vault-agent doctor ARGS` in this process with the operator's root token; (exit code, stdout)."""
    monkeypatch.setenv("VAULT_ADDR", bao.address)
    monkeypatch.setenv("VAULT_TOKEN", bao.root_token)

    def run(*args: str) -> tuple[int, str]:
        code = cli.main(list(args))
        out, err = capsys.readouterr()
        assert "Traceback" not in err, err
        return code, out

    return run


def lines(out: str) -> list[tuple[str, str, str, str]]:
    """(status, cluster, check, detail) of each report line."""
    result = []
    for line in out.splitlines():
        status, cluster, rest = line.split(maxsplit=2)
        check, _, detail = rest.partition(": ")
        result.append((status, cluster, check, detail))
    return result


def failed(out: str) -> dict[tuple[str, str], str]:
    """(cluster, check) -> detail of every FAIL line."""
    return {(c, k): d for s, c, k, d in lines(out) if s == "FAIL"}


class TestGoodSetup:
    def test_every_check_passes(self, mesh, bao):
        """A good two-cluster setup: every line is ok, exit 0, and no secret (root token, CA key) is printed."""
        proc = run_cli(*mesh.args, env=cli_env(VAULT_ADDR=bao.address, VAULT_TOKEN=bao.root_token))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        report = lines(proc.stdout)
        assert report and all(s == "ok" for s, *_ in report), proc.stdout
        checks = {(c, k) for _, c, k, _ in report}
        for cluster in (mesh.one.cluster, mesh.two.cluster):
            for check in ("auth-mount", "auth-config", "role", "audience", "policy", "own-path", "other-paths",
                          "bundle", "expiry", "root"):
                assert (cluster, check) in checks, (cluster, check)
        assert "same root" in dict(((c, k), d) for _, c, k, d in report)[(mesh.two.cluster, "root")]
        assert bao.root_token not in proc.stdout + proc.stderr
        assert mesh.inter_one.key_pem.decode().splitlines()[1] not in proc.stdout
        assert "PRIVATE KEY" not in proc.stdout

    def test_json_output(self, mesh, doctor):
        """--output json lists every check with cluster, check, status and detail, and ok: true."""
        code, out = doctor(*mesh.args, "--output", "json")
        doc = json.loads(out)
        assert code == 0 and doc["ok"] is True
        assert {tuple(sorted(c)) for c in doc["checks"]} == {("check", "cluster", "detail", "status")}
        assert {c["status"] for c in doc["checks"]} == {"ok"}
        assert {c["cluster"] for c in doc["checks"]} == {mesh.one.cluster, mesh.two.cluster}

    def test_kv_v2(self, vault_admin, kube, unique, doctor):
        """KV v2 mounts are detected: the policy is checked on data/ and metadata/, the bundle read from data/."""
        root = root_ca()
        a = seed_cluster(vault_admin, kube, f"v{unique}", root, kv_version=2)
        b = seed_cluster(vault_admin, kube, f"w{unique}", root, kv_version=2)
        code, out = doctor("doctor", "--cluster", a.cluster, "--cluster", b.cluster)
        assert code == 0, out
        assert f"{a.kv_mount}/data/istiod-service/certs" in out and "KV v2" in out


class TestBrokenPieces:
    def test_wrong_audience(self, mesh, doctor):
        """A role expecting another audience fails the audience check of that cluster only."""
        path = f"auth/{mesh.two.auth_mount}/role/istiod"
        mesh.client.write_data(path, data={"audience": "kubernetes"})
        code, out = doctor(*mesh.args)
        assert code == 1
        assert set(failed(out)) == {(mesh.two.cluster, "audience")}, out
        assert "'kubernetes'" in failed(out)[(mesh.two.cluster, "audience")]

    def test_outside_text_is_escaped(self, mesh, doctor):
        """Text from Vault (here an audience with a terminal escape) is shown escaped, in text and json output."""
        mesh.client.write_data(f"auth/{mesh.one.auth_mount}/role/istiod", data={"audience": "x\x1b[31mred"})
        code, out = doctor(*mesh.args)
        assert code == 1 and "\x1b" not in out
        assert "x\\x1b[31mred" in failed(out)[(mesh.one.cluster, "audience")]
        code, out = doctor(*mesh.args, "--output", "json")
        detail = next(c["detail"] for c in json.loads(out)["checks"]
                      if c["check"] == "audience" and c["status"] == "FAIL")
        assert "\x1b" not in detail and "x\\x1b[31mred" in detail

    def test_role_without_policy(self, mesh, doctor):
        """A role with no policy fails `policy` and `own-path` (istiod's agent could not read its bundle)."""
        mesh.client.write_data(f"auth/{mesh.one.auth_mount}/role/istiod", data={"token_policies": []})
        code, out = doctor(*mesh.args)
        assert code == 1
        assert "has no policy" in failed(out)[(mesh.one.cluster, "policy")], out
        assert (mesh.two.cluster, "policy") not in failed(out)

    def test_policy_deleted(self, mesh, doctor):
        """A role naming a deleted policy fails `policy` (naming it) and `own-path`."""
        mesh.client.sys.delete_policy(mesh.one.read_policy)
        code, out = doctor(*mesh.args)
        assert code == 1
        fails = failed(out)
        assert mesh.one.read_policy in fails[(mesh.one.cluster, "policy")] and "does not exist" in fails[
            (mesh.one.cluster, "policy")]
        assert "do not grant read" in fails[(mesh.one.cluster, "own-path")]

    def test_policy_not_granting_read(self, mesh, doctor):
        """A policy that names the path without read fails `own-path`."""
        mesh.client.sys.create_or_update_policy(
            name=mesh.one.read_policy, policy=f'path "{mesh.one.kv_path}" {{ capabilities = ["list"] }}\n')
        code, out = doctor(*mesh.args)
        assert code == 1 and set(failed(out)) == {(mesh.one.cluster, "own-path")}, out

    def test_policy_reads_other_cluster(self, mesh, doctor):
        """A policy that also grants read on the other cluster's path fails `other-paths`, naming that path."""
        mesh.client.sys.create_or_update_policy(
            name=mesh.one.read_policy,
            policy='path "kubernetes-*" { capabilities = ["read"] }\n')
        code, out = doctor(*mesh.args)
        assert code == 1
        assert set(failed(out)) == {(mesh.one.cluster, "other-paths")}, out
        detail = failed(out)[(mesh.one.cluster, "other-paths")]
        assert mesh.two.kv_path in detail and mesh.two.cluster in detail

    def test_expired_intermediate(self, mesh, doctor):
        """An expired intermediate fails `expiry` (and the validator's `bundle`) of that cluster."""
        now = dt.datetime.now(dt.UTC)
        old = intermediate_ca(mesh.root, cluster="two", not_before=now - dt.timedelta(days=40),
                              not_after=now - dt.timedelta(days=1))
        write_bundle(mesh.client, mesh.two, bundle_data(mesh.root, old))
        code, out = doctor(*mesh.args)
        assert code == 1
        fails = failed(out)
        assert "expired at" in fails[(mesh.two.cluster, "expiry")]
        assert (mesh.two.cluster, "bundle") in fails
        assert not any(c == mesh.one.cluster for c, _ in fails), out

    def test_expiring_soon_warns(self, mesh, doctor):
        """An intermediate expiring within --warn-days is a warning, not a failure (exit 0); a smaller
        --warn-days makes it ok."""
        soon = intermediate_ca(mesh.root, cluster="two", days=10)
        write_bundle(mesh.client, mesh.two, bundle_data(mesh.root, soon))
        code, out = doctor(*mesh.args)
        assert code == 0
        warned = {(c, k) for s, c, k, _ in lines(out) if s == "warn"}
        assert warned == {(mesh.two.cluster, "expiry")}, out
        code, out = doctor(*mesh.args, "--warn-days", "5")
        assert code == 0 and {s for s, *_ in lines(out)} == {"ok"}, out

    def test_different_root(self, mesh, doctor):
        """A second cluster whose intermediate is under another root fails `root`, naming that cluster."""
        other = root_ca(cn="Other Root CA")
        write_bundle(mesh.client, mesh.two, bundle_data(other, intermediate_ca(other, cluster="two")))
        code, out = doctor(*mesh.args)
        assert code == 1
        assert set(failed(out)) == {(mesh.two.cluster, "root")}, out
        detail = failed(out)[(mesh.two.cluster, "root")]
        assert "CN=Other Root CA" in detail and f"different root than {mesh.one.cluster}" in detail

    def test_bundle_refused_by_validator(self, mesh, doctor):
        """A bundle whose key does not match ca-cert.pem fails `bundle` with the validator's reason."""
        data = bundle_data(mesh.root, mesh.inter_one)
        data["ca_key"] = bundle_data(mesh.root, mesh.inter_two)["ca_key"]
        write_bundle(mesh.client, mesh.one, data)
        code, out = doctor(*mesh.args)
        assert code == 1
        assert set(failed(out)) == {(mesh.one.cluster, "bundle")}, out
        assert "ca-key.pem" in failed(out)[(mesh.one.cluster, "bundle")]
        assert "PRIVATE KEY" not in out

    def test_bundle_missing_key(self, mesh, doctor):
        """A secret without cert_chain fails `bundle`, naming the key."""
        data = bundle_data(mesh.root, mesh.inter_one)
        del data["cert_chain"]
        write_bundle(mesh.client, mesh.one, data)
        code, out = doctor(*mesh.args)
        assert code == 1 and "lacks key(s) cert_chain" in failed(out)[(mesh.one.cluster, "bundle")], out

    def test_missing_auth_mount(self, mesh, doctor, unique):
        """A cluster without its auth mount fails `auth-mount` with the `setup vault` command to run."""
        code, out = doctor(*mesh.args, "--cluster", f"c{unique}")
        assert code == 1
        detail = failed(out)[(f"c{unique}", "auth-mount")]
        assert f"kubernetes-c{unique}" in detail and f"setup vault --cluster c{unique}" in detail
        assert (f"c{unique}", "bundle") in failed(out)

    def test_missing_kv_mount_says_setup_vault_comes_first(self, doctor, unique):
        """A cluster without its KV mount is told to run `setup vault` first (it creates the mount), and only then
        `ca intermediate --kv`, which cannot write into a mount that does not exist."""
        code, out = doctor("doctor", "--cluster", f"c{unique}")
        assert code == 1
        assert failed(out)[(f"c{unique}", "bundle")] == (
            f"no KV mount kubernetes-c{unique}-secrets: run `istio-vault-agent setup vault --cluster c{unique}"
            " --kubernetes-host URL --kubernetes-ca-cert FILE` first (it creates the mount), then `istio-vault-agent"
            f" ca intermediate --cluster c{unique} --root-dir DIR --kv"
            f" kubernetes-c{unique}-secrets/istiod-service/certs`"
        )

    def test_no_credentials(self, mesh, bao):
        """Without VAULT_TOKEN doctor prints one error line saying what to set, exit 1."""
        proc = run_cli(*mesh.args, env=cli_env(VAULT_ADDR=bao.address))
        assert proc.returncode == 1 and proc.stderr.startswith("error: set VAULT_TOKEN"), proc.stderr

    def test_bad_cluster_name(self, bao):
        """A cluster name that cannot name mounts is one error line saying what names are usable, exit 1."""
        proc = run_cli("doctor", "--cluster", "East_1",
                       env=cli_env(VAULT_ADDR=bao.address, VAULT_TOKEN=bao.root_token))
        assert proc.returncode == 1 and proc.stdout == ""
        assert error_line(proc).startswith("error: cluster name 'East_1' is not usable: use lowercase letters")

    def test_vault_unreachable(self, mesh):
        """Vault that cannot be reached is one error line naming the address, exit 1, no report."""
        proc = run_cli(*mesh.args, env=cli_env(VAULT_ADDR="http://127.0.0.1:9", VAULT_TOKEN="t0ken-s3cret"))
        assert proc.returncode == 1 and proc.stdout == ""
        assert proc.stderr.startswith("error: cannot reach Vault at http://127.0.0.1:9"), proc.stderr
        assert "t0ken-s3cret" not in proc.stderr

    def test_token_vault_refuses(self, mesh, bao):
        """A token Vault does not accept is one error line saying to check VAULT_TOKEN, no report, and the token
        is not shown."""
        proc = run_cli(*mesh.args, env=cli_env(VAULT_ADDR=bao.address, VAULT_TOKEN="s.n0t-a-t0ken"))
        assert proc.returncode == 1 and proc.stdout == ""
        assert error_line(proc) == (
            f"error: Vault at {bao.address} does not accept the token in VAULT_TOKEN: it is invalid, expired or"
            " revoked (it may not even look itself up); set VAULT_TOKEN to a valid operator token"
        )
        assert "n0t-a-t0ken" not in proc.stderr

    def test_a_valid_token_without_read_on_sys_auth_is_told_about_its_policy(self, mesh, bao, vault_admin):
        """A valid token whose policy does not cover sys/auth is not called invalid: the line names the policy."""
        token = vault_admin.auth.token.create(policies=["default"], ttl="5m")["auth"]["client_token"]
        proc = run_cli(*mesh.args, env=cli_env(VAULT_ADDR=bao.address, VAULT_TOKEN=token))
        assert proc.returncode == 1 and proc.stdout == ""
        line = error_line(proc)
        assert line.startswith("error: the operator token may not list the auth methods (sys/auth)"), line
        assert token not in proc.stderr

    def test_unknown_namespace(self, mesh, bao, unique):
        """A --namespace (or VAULT_NAMESPACE) Vault does not have is one error line saying so, not FAIL lines."""
        for extra, env in ((("--namespace", f"none{unique}"), {}), ((), {"VAULT_NAMESPACE": f"none{unique}"})):
            proc = run_cli(*mesh.args, *extra,
                           env=cli_env(VAULT_ADDR=bao.address, VAULT_TOKEN=bao.root_token, **env))
            assert proc.returncode == 1 and proc.stdout == "", proc.stdout
            assert error_line(proc) == (f"error: Vault namespace 'none{unique}' does not exist: fix --namespace (or"
                                        " VAULT_NAMESPACE), or create it and run `istio-vault-agent setup vault`"
                                        " there first")

    def test_other_commands_do_not_load_doctor(self, tmp_path):
        """Start-up time: commands other than doctor never import agent.doctor."""
        root = root_ca()
        write_files(tmp_path, istio_ca_files(root, intermediate_ca(root)))
        proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "agent.cli", "check", str(tmp_path)],
                              cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=60, check=False)
        assert proc.returncode == 0, proc.stderr[-2000:]
        imported = {ln.split("|")[-1].strip() for ln in proc.stderr.splitlines() if ln.startswith("import time")}
        assert "agent.kinds" in imported and "agent.doctor" not in imported

    def test_help_names_credentials(self):
        """`doctor --help` says where operator credentials come from."""
        proc = run_cli("doctor", "--help")
        assert proc.returncode == 0 and "VAULT_TOKEN" in proc.stdout and "--warn-days" in proc.stdout


class TestRootRotation:
    def test_middle_state_overlapping_roots(self, mesh, doctor):
        """Rotation's middle state: root-cert.pem = A+B everywhere, one intermediate under A and one under B, passes
        as overlapping roots."""
        new = root_ca(cn="Root CA B")
        both = (mesh.root, new)
        write_bundle(mesh.client, mesh.one, bundle_data(mesh.root, mesh.inter_one, roots=both))
        write_bundle(mesh.client, mesh.two, bundle_data(new, intermediate_ca(new, cluster="two"), roots=both))
        code, out = doctor(*mesh.args)
        assert code == 0, out
        roots = {c: d for s, c, k, d in lines(out) if k == "root"}
        assert all("overlapping roots" in d for d in roots.values()), out
        assert "CN=Root CA B" in roots[mesh.two.cluster]

    def test_only_b_against_only_a_fails(self, mesh, doctor):
        """A cluster whose root-cert.pem holds only B while another holds only A fails `root`."""
        new = root_ca(cn="Root CA B")
        write_bundle(mesh.client, mesh.two, bundle_data(new, intermediate_ca(new, cluster="two"), roots=(new,)))
        code, out = doctor(*mesh.args)
        assert code == 1
        detail = failed(out)[(mesh.two.cluster, "root")]
        assert f"{mesh.one.cluster}'s root-cert.pem does not hold it" in detail
        assert f"root-cert.pem lacks {mesh.one.cluster}'s root" in detail

    def test_new_root_not_yet_everywhere_fails(self, mesh, doctor):
        """Step 3 too early: cluster two's intermediate is under B while cluster one still trusts only A."""
        new = root_ca(cn="Root CA B")
        both = (mesh.root, new)
        write_bundle(mesh.client, mesh.two, bundle_data(new, intermediate_ca(new, cluster="two"), roots=both))
        code, out = doctor(*mesh.args)
        assert code == 1
        assert f"{mesh.one.cluster}'s root-cert.pem does not hold it" in failed(out)[(mesh.two.cluster, "root")]


class TestPkiMode:
    def test_pki_setup_passes_and_missing_policy_fails(self, vault_admin, kube, unique, doctor):
        """--pki: the mount's root and the signing policy are checked instead of a KV bundle; deleting the
        policy fails `pki-policy` and `own-path`."""
        mount = f"pki-{unique}"
        setup_pki(vault_admin, root_mount=mount, int_mount=f"pki-int-{unique}", policy=f"unused-{unique}")
        a = seed_pki_cluster(vault_admin, kube, f"p{unique}", mount)
        b = seed_pki_cluster(vault_admin, kube, f"q{unique}", mount)
        args = ["doctor", "--pki", "--pki-mount", mount, "--cluster", a.cluster, "--cluster", b.cluster]
        code, out = doctor(*args)
        assert code == 0, out
        checks = {(c, k) for _, c, k, _ in lines(out)}
        assert {(a.cluster, "pki-root"), (a.cluster, "pki-policy"), (a.cluster, "own-path")} <= checks
        assert not any(k == "bundle" for _, k in checks)
        vault_admin.sys.delete_policy(a.pki_policy)
        code, out = doctor(*args)
        assert code == 1
        assert {(a.cluster, "pki-policy"), (a.cluster, "own-path")} <= set(failed(out)), out
