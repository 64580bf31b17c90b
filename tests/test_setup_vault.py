"""`istio-vault-agent setup vault` against the real OpenBao and the Kubernetes API stand-in: creation, a second run
that changes nothing, drift reported and fixed, --dry-run replayed with the real `bao` CLI, two clusters whose
agents each read only their own bundle, --pki with a real intermediate signed, --namespace, and user errors.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import hvac
import hvac.exceptions
import pytest

from testbed import pki
from tests.support import ISTIO_FILES, agent_config, cli_env, error_line, run_cli, write_config


@pytest.fixture(name="ca", scope="module")
def fixture_ca() -> tuple[pki.CertKey, pki.CertKey, pki.CertKey]:
    """One root and two intermediates under it (cluster a and cluster b)."""
    root = pki.root_ca()
    return root, pki.intermediate_ca(root, cluster="a"), pki.intermediate_ca(root, cluster="b")


@pytest.fixture(name="files")
def fixture_files(tmp_path, kube) -> dict[str, Path]:
    """The API server's CA and a reviewer JWT, as files the operator would pass."""
    ca = tmp_path / "k8s-ca.pem"
    ca.write_bytes(kube.ca_pem)
    jwt = tmp_path / "reviewer.jwt"
    jwt.write_text(kube.mint_token("kube-system", "bao-token-reviewer", ttl=7 * 24 * 3600))
    return {"ca": ca, "jwt": jwt}


def _setup(bao, kube, files, cluster: str, *extra: str, env: dict[str, str] | None = None):
    """Run `setup vault` for `cluster` with the operator's root token."""
    return run_cli(
        "setup", "vault", "--cluster", cluster, "--kubernetes-host", kube.url,
        "--kubernetes-ca-cert", str(files["ca"]), "--token-reviewer-jwt", str(files["jwt"]), *extra,
        env=env or cli_env(VAULT_ADDR=bao.address, VAULT_TOKEN=bao.root_token),
    )


def _states(stdout: str) -> dict[str, str]:
    """object -> first word of its line (created / unchanged / drifted / fixed ...)."""
    out = {}
    for line in stdout.splitlines():
        word = "cannot fix" if line.startswith("cannot fix") else line.split(" ")[0]
        if word in {"created", "unchanged", "drifted", "fixed", "missing", "cannot fix"}:
            out[line[len(word):].strip().split(":")[0]] = word
    return out


def _seed(admin: hvac.Client, cluster: str, root: pki.CertKey, inter: pki.CertKey) -> None:
    data = {k: v.decode() for k, v in pki.istio_ca_files(root, inter).items()}
    secret = {"ca_key": data["ca-key.pem"], "ca_cert": data["ca-cert.pem"], "cert_chain": data["cert-chain.pem"],
              "root_cert": data["root-cert.pem"]}
    admin.secrets.kv.v1.create_or_update_secret(path="istiod-service/certs", secret=secret,
                                                mount_point=f"kubernetes-{cluster}-secrets")


def _agent(tmp_path, bao, token: Path, *, mount: str, kv: str, name: str, **vault_extra: str):
    out = tmp_path / f"out-{name}"
    cfg = agent_config(address=bao.address, token_path=token, out=out, kv=kv, mount=mount, role="istiod")
    cfg["vault"].update(vault_extra)
    proc = run_cli("run", "--config", str(write_config(tmp_path / f"{name}.yaml", cfg)), "--mode", "init")
    return proc, out


class TestIdempotence:
    def test_second_run_changes_nothing_and_says_so(self, bao, kube, files, unique):
        """The first run creates every object; the second reports each one unchanged and exits 0."""
        first = _setup(bao, kube, files, f"c{unique}", "--gateway", "istio-ingress/istio-ingressgateway")
        assert first.returncode == 0, first.stderr
        states = _states(first.stdout)
        assert set(states.values()) == {"created"} and len(states) == 7, first.stdout
        second = _setup(bao, kube, files, f"c{unique}", "--gateway", "istio-ingress/istio-ingressgateway")
        assert second.returncode == 0, second.stderr
        assert set(_states(second.stdout).values()) == {"unchanged"}, second.stdout
        assert second.stdout.strip().splitlines()[-1].startswith("nothing to change")
        for proc in (first, second):
            assert bao.root_token not in proc.stdout + proc.stderr
            assert files["jwt"].read_text() not in proc.stdout + proc.stderr

    def test_objects_are_the_runbooks(self, bao, kube, files, unique, vault_admin):
        """What it writes is the runbook's layout: KV v1, config with disable_local_ca_jwt, role istiod 24h."""
        c = f"c{unique}"
        assert _setup(bao, kube, files, c).returncode == 0
        config = vault_admin.read(f"auth/kubernetes-{c}/config")["data"]
        assert config["kubernetes_host"] == kube.url and config["disable_local_ca_jwt"] is True
        assert config["token_reviewer_jwt_set"] is True
        role = vault_admin.read(f"auth/kubernetes-{c}/role/istiod")["data"]
        assert role["bound_service_account_names"] == ["istiod"]
        assert role["bound_service_account_namespaces"] == ["istio-system"]
        assert role["audience"] == "vault" and role["token_policies"] == [f"istiod-certs-{c}"]
        assert role["token_ttl"] == 24 * 3600
        mounts = vault_admin.sys.list_mounted_secrets_engines()["data"]
        assert mounts[f"kubernetes-{c}-secrets/"]["type"] == "kv"
        assert mounts[f"kubernetes-{c}-secrets/"]["options"]["version"] == "1"
        rules = vault_admin.sys.read_policy(f"istiod-certs-{c}")["data"]["rules"]
        assert f'path "kubernetes-{c}-secrets/istiod-service/certs"' in rules and '"read"' in rules


class TestDrift:
    def test_changed_role_and_policy_are_reported_then_fixed(self, bao, kube, files, unique, vault_admin):
        """Another audience, another bound SA and edited policy text: exit 1 naming them; --fix restores them."""
        c = f"c{unique}"
        assert _setup(bao, kube, files, c).returncode == 0
        vault_admin.write_data(f"auth/kubernetes-{c}/role/istiod", data={
            "audience": "other", "bound_service_account_names": ["intruder"]})
        vault_admin.sys.create_or_update_policy(name=f"istiod-certs-{c}", policy='path "*" { capabilities = ["read"] }')
        drifted = _setup(bao, kube, files, c)
        assert drifted.returncode == 1
        states = _states(drifted.stdout)
        assert states[f"role istiod on kubernetes-{c} (istio-system/istiod)"] == "drifted"
        assert states[f"policy istiod-certs-{c}"] == "drifted"
        assert "audience is 'other', want 'vault'" in drifted.stdout
        assert "bound_service_account_names is [intruder], want [istiod]" in drifted.stdout
        assert vault_admin.read(f"auth/kubernetes-{c}/role/istiod")["data"]["audience"] == "other"  # not fixed
        fixed = _setup(bao, kube, files, c, "--fix")
        assert fixed.returncode == 0, fixed.stdout
        assert sorted(v for v in _states(fixed.stdout).values() if v != "unchanged") == ["fixed", "fixed"]
        assert vault_admin.read(f"auth/kubernetes-{c}/role/istiod")["data"]["audience"] == "vault"
        again = _setup(bao, kube, files, c)
        assert again.returncode == 0 and set(_states(again.stdout).values()) == {"unchanged"}

    def test_other_kubernetes_host_is_drift(self, bao, kube, files, unique, vault_admin):
        """A config pointing at another API server is reported, and --fix points it back."""
        c = f"c{unique}"
        assert _setup(bao, kube, files, c).returncode == 0
        vault_admin.write_data(f"auth/kubernetes-{c}/config", data={
            "kubernetes_host": "https://elsewhere.example:6443", "kubernetes_ca_cert": kube.ca_pem.decode(),
            "disable_local_ca_jwt": True})
        drifted = _setup(bao, kube, files, c)
        assert drifted.returncode == 1
        assert "kubernetes_host is 'https://elsewhere.example:6443'" in drifted.stdout
        assert "no token_reviewer_jwt is set, --token-reviewer-jwt was given" in drifted.stdout
        assert _setup(bao, kube, files, c, "--fix").returncode == 0
        assert vault_admin.read(f"auth/kubernetes-{c}/config")["data"]["kubernetes_host"] == kube.url

    def test_kv_version_cannot_be_fixed(self, bao, kube, files, unique):
        """A KV v1 mount asked to be v2 is reported as not fixable, even with --fix (exit 1)."""
        c = f"c{unique}"
        assert _setup(bao, kube, files, c).returncode == 0
        proc = _setup(bao, kube, files, c, "--kv-version", "2", "--fix")
        assert proc.returncode == 1
        assert _states(proc.stdout)[f"secrets mount kubernetes-{c}-secrets (kv v2)"] == "cannot fix"
        assert "is KV v1, not v2" in proc.stdout
        assert f"policy istiod-certs-{c}" not in _states(proc.stdout)  # left as it is: it fits the v1 mount


class TestTwoClusters:
    def test_each_agent_reads_its_own_bundle_and_not_the_other(self, tmp_path, bao, kube, files, unique,
                                                                 vault_admin, sa_token_file, ca):
        """Two clusters set up on one OpenBao: each istiod publishes its own intermediate; cluster a's login
        reading cluster b's path is refused (403), which the agent reports as one error line."""
        root, inter_a, inter_b = ca
        a, b = f"a{unique}", f"b{unique}"
        # one API server stand-in for both: the isolation under test is Vault's (mount, role, policy)
        for cluster, inter in ((a, inter_a), (b, inter_b)):
            assert _setup(bao, kube, files, cluster).returncode == 0
            _seed(vault_admin, cluster, root, inter)
        tokens = {cluster: sa_token_file("istio-system", "istiod", audience="vault", filename=f"token-{cluster}")
                  for cluster in (a, b)}
        for cluster, inter in ((a, inter_a), (b, inter_b)):
            proc, out = _agent(tmp_path, bao, tokens[cluster], mount=f"kubernetes-{cluster}",
                               kv=f"kubernetes-{cluster}-secrets/istiod-service/certs", name=cluster)
            assert proc.returncode == 0, proc.stderr
            assert sorted(p.name for p in out.iterdir() if not p.name.startswith("..")) == sorted(ISTIO_FILES)
            assert (out / "ca-cert.pem").read_bytes() == inter.cert_pem
        proc, out = _agent(tmp_path, bao, tokens[a], mount=f"kubernetes-{a}",
                           kv=f"kubernetes-{b}-secrets/istiod-service/certs", name="cross")
        assert proc.returncode == 1
        assert "permission denied" in error_line(proc)
        assert not (out / "ca-key.pem").exists()

    def test_token_without_audience_vault_cannot_log_in(self, tmp_path, bao, kube, files, unique, sa_token_file,
                                                          vault_admin, ca):
        """The role expects audience `vault`: a token for the API server's default audience is refused."""
        root, inter_a, _ = ca
        c = f"c{unique}"
        assert _setup(bao, kube, files, c).returncode == 0
        _seed(vault_admin, c, root, inter_a)
        token = sa_token_file("istio-system", "istiod")  # audience: the issuer
        proc, _ = _agent(tmp_path, bao, token, mount=f"kubernetes-{c}",
                         kv=f"kubernetes-{c}-secrets/istiod-service/certs", name="noaud")
        assert proc.returncode == 1 and "login refused" in error_line(proc)


class TestRevision:
    def test_canary_istiod_logs_in_and_a_rerun_without_it_is_drift(self, tmp_path, bao, kube, files, unique,
                                                                     vault_admin, sa_token_file, ca):
        """`--revision canary` binds istiod-canary next to istiod, so a revisioned control plane's agent logs in;
        running setup again without the flag reports the extra binding as drift instead of silently dropping it."""
        root, inter, _ = ca
        c = f"c{unique}"
        assert _setup(bao, kube, files, c, "--revision", "canary").returncode == 0
        _seed(vault_admin, c, root, inter)
        for account in ("istiod", "istiod-canary"):
            token = sa_token_file("istio-system", account, audience="vault", filename=f"token-{account}")
            proc, out = _agent(tmp_path, bao, token, mount=f"kubernetes-{c}",
                               kv=f"kubernetes-{c}-secrets/istiod-service/certs", name=account)
            assert proc.returncode == 0, proc.stderr
            assert (out / "ca-cert.pem").read_bytes() == inter.cert_pem
        again = _setup(bao, kube, files, c, "--revision", "canary")
        assert again.returncode == 0 and set(_states(again.stdout).values()) == {"unchanged"}, again.stdout
        without = _setup(bao, kube, files, c)
        assert without.returncode == 1
        drifted = [line for line in without.stdout.splitlines() if line.startswith("drifted")]
        assert len(drifted) == 1 and "role istiod" in drifted[0] and "istiod-canary" in drifted[0], without.stdout

    def test_bad_revision_is_one_error_line(self, bao, kube, files, unique):
        """A revision that cannot be part of a service account name is refused before anything is written."""
        proc = _setup(bao, kube, files, f"c{unique}", "--revision", "Canary!")
        assert proc.returncode == 1 and "--revision" in error_line(proc)


class TestDryRun:
    @pytest.mark.parametrize("in_namespace", [False, True], ids=["root", "namespace"])
    def test_replayed_commands_give_what_a_real_run_gives(self, tmp_path, bao, kube, files, unique, vault_admin,
                                                           in_namespace):
        """--dry-run changes nothing; its output run by bash with the real `bao` CLI leaves a state that a real
        `setup vault` then finds unchanged, object for object (also inside a Vault namespace)."""
        c = f"c{unique}"
        args: tuple[str, ...] = ("--kv-version", "2", "--gateway", "istio-ingress/istio-ingressgateway")
        if in_namespace:
            vault_admin.adapter.post(f"/v1/sys/namespaces/ns{unique}", json={})
            args = (*args, "--namespace", f"ns{unique}")
        dry = _setup(bao, kube, files, c, "--dry-run", *args)
        assert dry.returncode == 0, dry.stderr
        assert files["jwt"].read_text() not in dry.stdout and f"token_reviewer_jwt=@{files['jwt']}" in dry.stdout
        assert bao.root_token not in dry.stdout
        again = _setup(bao, kube, files, c, "--dry-run", *args)
        assert again.stdout.count("would create") == dry.stdout.count("would create") == 7  # nothing was made
        bin_dir = Path(sys.executable).parent
        env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), "BAO_ADDR": bao.address,
               "BAO_TOKEN": bao.root_token}
        replay = subprocess.run(["bash", "-euo", "pipefail"], input=dry.stdout, env=env, capture_output=True,
                                text=True, timeout=60, check=False, cwd=tmp_path)
        assert replay.returncode == 0, replay.stderr
        real = _setup(bao, kube, files, c, *args)
        assert real.returncode == 0, real.stdout
        states = _states(real.stdout)
        assert len(states) == 7 and set(states.values()) == {"unchanged"}, real.stdout

    def test_drift_with_fix_prints_the_fix(self, bao, kube, files, unique, vault_admin):
        """--dry-run --fix prints the command that would rewrite a drifted role, and leaves the role as it is."""
        c = f"c{unique}"
        assert _setup(bao, kube, files, c).returncode == 0
        vault_admin.write_data(f"auth/kubernetes-{c}/role/istiod", data={"audience": "other"})
        dry = _setup(bao, kube, files, c, "--dry-run", "--fix")
        assert dry.returncode == 0
        assert f"bao write auth/kubernetes-{c}/role/istiod " in dry.stdout and "audience=vault" in dry.stdout
        assert vault_admin.read(f"auth/kubernetes-{c}/role/istiod")["data"]["audience"] == "other"

    def test_reader_that_goes_away_gets_no_traceback(self, bao, kube, files, unique):
        """`--dry-run | head` with the reader gone before the output: exit 141 like SIGPIPE, nothing on stderr."""
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "setup", "vault", "--cluster", f"c{unique}", "--kubernetes-host",
             kube.url, "--kubernetes-ca-cert", str(files["ca"]), "--dry-run"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env(VAULT_ADDR=bao.address,
                                                                      VAULT_TOKEN=bao.root_token),
        )
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()  # before the command prints anything
        stderr = proc.stderr.read().decode()
        assert proc.wait(timeout=60) == 141
        assert stderr == ""


class TestPki:
    def test_istiod_signs_its_intermediate_and_reads_no_other_kv(self, tmp_path, bao, kube, files, unique,
                                                                  vault_admin, sa_token_file, ca):
        """In a Vault namespace of its own: --pki reports the missing root; once the operator made it, the istiod
        role's token gets an intermediate signed by a real agent run, and cannot read another cluster's KV."""
        ns = f"ns{unique}"
        vault_admin.adapter.post(f"/v1/sys/namespaces/{ns}", json={})
        admin = hvac.Client(url=bao.address, token=bao.root_token, namespace=ns)
        c, other = f"c{unique}", f"o{unique}"
        extra = ("--pki", "--namespace", ns, "--gateway", "istio-ingress/gw", "--gateway-domain", "example.com")
        first = _setup(bao, kube, files, c, *extra)
        assert first.returncode == 1
        assert _states(first.stdout)["root CA in pki"] == "missing"
        admin.write_data("pki/root/generate/internal", data={
            "common_name": "Root CA", "organization": "Istio", "key_type": "ec", "ttl": "87000h"})
        second = _setup(bao, kube, files, c, *extra)
        assert second.returncode == 0, second.stdout
        assert set(_states(second.stdout).values()) == {"unchanged"}
        assert _setup(bao, kube, files, other, "--namespace", ns).returncode == 0
        _seed(admin, other, ca[0], ca[2])

        token = sa_token_file("istio-system", "istiod", audience="vault")
        out = tmp_path / "out"
        cfg = agent_config(address=bao.address, token_path=token, out=out, kv="unused/x", mount=f"kubernetes-{c}")
        cfg["vault"]["namespace"] = ns
        # crl: the issuer chain and every CA's CRL are read too, with no more policy than the signing path
        cfg["bundles"][0]["source"] = {"pki_intermediate": {"mount": "pki", "cluster": c, "ttl": "1h", "crl": True}}
        cfg["bundles"][0]["ready_min_remaining"] = "1s"
        proc = run_cli("run", "--config", str(write_config(tmp_path / "pki.yaml", cfg)), "--mode", "init")
        assert proc.returncode == 0, proc.stderr
        check = run_cli("check", str(out), "--type", "istio-ca")
        assert check.returncode == 0, check.stderr
        assert (out / "ca-crl.pem").read_bytes().count(b"BEGIN X509 CRL") == 2  # its own and the root's

        login = hvac.Client(url=bao.address, namespace=ns)
        login.auth.kubernetes.login(role="istiod", jwt=token.read_text(), mount_point=f"kubernetes-{c}")
        with pytest.raises(hvac.exceptions.Forbidden):
            login.secrets.kv.v1.read_secret(path="istiod-service/certs", mount_point=f"kubernetes-{other}-secrets")
        with pytest.raises(hvac.exceptions.Forbidden):
            login.write_data("pki/root/generate/internal", data={"common_name": "evil"})

    def test_gateway_needs_domains(self, bao, kube, files, unique):
        """--pki --gateway without --gateway-domain is one error line saying to add it."""
        proc = _setup(bao, kube, files, f"c{unique}", "--pki", "--gateway", "istio-ingress/gw", "--dry-run")
        assert proc.returncode == 1 and "--gateway-domain" in error_line(proc)


class TestErrors:
    def test_missing_credentials(self, bao, kube, files, unique):
        """Without VAULT_ADDR, or without a token, it is one error line naming the variable."""
        no_addr = _setup(bao, kube, files, f"c{unique}", env=cli_env(VAULT_TOKEN=bao.root_token))
        assert no_addr.returncode == 1 and "VAULT_ADDR" in error_line(no_addr)
        no_token = _setup(bao, kube, files, f"c{unique}", env=cli_env(BAO_ADDR=bao.address))
        assert no_token.returncode == 1 and "VAULT_TOKEN" in error_line(no_token)

    def test_a_token_vault_does_not_accept_is_named(self, bao, kube, files, unique):
        """A mistyped or expired token is one error line saying the token is not accepted (not that it lacks
        permissions on the auth methods), naming the variable it came from and never the token."""
        proc = _setup(bao, kube, files, f"c{unique}", env=cli_env(BAO_ADDR=bao.address, BAO_TOKEN="s.n0t-a-t0ken"))
        assert proc.returncode == 1 and proc.stdout == ""
        assert error_line(proc) == (
            f"error: Vault at {bao.address} does not accept the token in BAO_TOKEN: it is invalid, expired or revoked"
            " (it may not even look itself up); set BAO_TOKEN to a valid operator token"
        )
        assert "n0t-a-t0ken" not in proc.stderr

    def test_unreadable_ca_file(self, tmp_path, bao, kube, files, unique):
        """A CA file that does not exist, or holds no certificate, is one error line naming the flag."""
        missing = run_cli("setup", "vault", "--cluster", f"c{unique}", "--kubernetes-host", kube.url,
                          "--kubernetes-ca-cert", str(tmp_path / "nope.pem"),
                          env=cli_env(VAULT_ADDR=bao.address, VAULT_TOKEN=bao.root_token))
        assert missing.returncode == 1 and "cannot read --kubernetes-ca-cert" in error_line(missing)
        bad = tmp_path / "bad.pem"
        bad.write_text("not a certificate\n")
        garbage = run_cli("setup", "vault", "--cluster", f"c{unique}", "--kubernetes-host", kube.url,
                          "--kubernetes-ca-cert", str(bad),
                          env=cli_env(VAULT_ADDR=bao.address, VAULT_TOKEN=bao.root_token))
        assert garbage.returncode == 1 and "holds no PEM certificate" in error_line(garbage)

    @pytest.mark.parametrize("host", ["https://k8s.example:6443/\nbao secrets disable x", "https://k8s .example",
                                      "https://k8s.example:6443\t", "not a url"])
    def test_kubernetes_host_with_whitespace_is_refused(self, bao, kube, files, unique, host):
        """A --kubernetes-host with a newline, space or tab is one error line, and nothing is created."""
        proc = run_cli("setup", "vault", "--cluster", f"c{unique}", "--kubernetes-host", host,
                       "--kubernetes-ca-cert", str(files["ca"]),
                       env=cli_env(VAULT_ADDR=bao.address, VAULT_TOKEN=bao.root_token))
        assert proc.returncode == 1 and proc.stdout == ""
        assert error_line(proc).startswith("error: --kubernetes-host ") and "is not a URL" in proc.stderr

    def test_bad_cluster_name(self, bao, kube, files):
        """A cluster name that cannot name a mount is one error line saying what is allowed."""
        proc = _setup(bao, kube, files, "Cluster_1")
        assert proc.returncode == 1 and "lowercase letters, digits" in error_line(proc)

    def test_unknown_namespace(self, bao, kube, files, unique):
        """A --namespace Vault does not have is one error line saying to create it."""
        proc = _setup(bao, kube, files, f"c{unique}", "--namespace", f"none{unique}")
        assert proc.returncode == 1 and "does not exist" in error_line(proc)
