"""End to end: `istio-vault-agent run --mode init` against a real OpenBao, in the runbook's layout and KV v2."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from testbed import pki
from testbed.vaultsetup import configure_kubernetes_auth, ensure_secrets_engine, seed_runbook_layout
from tests.support import ISTIO_FILES, ROOT, AgentProc, agent_config, cli_env, error_line, run_cli, write_config

NOW = dt.datetime.now(dt.UTC)


@pytest.fixture(name="ca", scope="module")
def fixture_ca() -> tuple[pki.CertKey, pki.CertKey]:
    root = pki.root_ca()
    return root, pki.intermediate_ca(root)


@pytest.fixture(name="runbook")
def fixture_runbook(vault_admin, kube, unique, ca):
    """The runbook's layout on the shared server, under a cluster name of this test's own."""
    root, inter = ca
    return seed_runbook_layout(vault_admin, kube, pki.istio_ca_files(root, inter), cluster=f"c{unique}")


def _config(tmp_path, bao, token_file, layout, **kw) -> Path:
    cfg = agent_config(
        address=bao.address,
        token_path=token_file,
        out=tmp_path / "out",
        kv=f"{layout.kv_mount}/{layout.secret_path}",
        mount=kw.pop("mount", layout.auth_mount),
        role=kw.pop("role", layout.role),
        **kw,
    )
    return write_config(tmp_path / "agent.yaml", cfg)


def _assert_no_secrets(text: str, *secrets: str | bytes) -> None:
    for secret in secrets:
        s = secret.decode() if isinstance(secret, bytes) else secret
        body = s.strip().splitlines()[1] if s.startswith("-----BEGIN") else s
        assert body not in text


class TestRunbookLayout:
    def test_publishes_a_bundle_that_openssl_and_check_accept(self, tmp_path, bao, sa_token_file, runbook, ca):
        """Init mode against the runbook's KV v1 layout publishes four files openssl verifies, then exits 0."""
        token = sa_token_file("istio-system", "istiod")
        proc = run_cli("run", "--config", str(_config(tmp_path, bao, token, runbook)), "--mode", "init")
        assert proc.returncode == 0, proc.stderr
        out = tmp_path / "out"
        assert sorted(p.name for p in out.iterdir() if not p.name.startswith("..")) == sorted(ISTIO_FILES)
        assert (out / "ca-key.pem").read_bytes() == ca[1].key_pem
        if shutil.which("openssl"):
            verify = subprocess.run(
                ["openssl", "verify", "-CAfile", "root-cert.pem", "-untrusted", "cert-chain.pem", "ca-cert.pem"],
                cwd=out, capture_output=True, text=True, check=False,
            )
            assert verify.returncode == 0 and "ca-cert.pem: OK" in verify.stdout, verify.stderr
        check = run_cli("check", str(out), "--type", "istio-ca")
        assert check.returncode == 0 and check.stdout.startswith("ok:"), check.stderr
        _assert_no_secrets(proc.stderr, ca[1].key_pem, token.read_text())

    def test_data_layout_and_file_modes(self, tmp_path, bao, sa_token_file, runbook):
        """Files are symlinks into ..data, which points at a hidden generation; the key is 0600, the rest 0644."""
        token = sa_token_file("istio-system", "istiod")
        assert run_cli("run", "--config", str(_config(tmp_path, bao, token, runbook))).returncode == 0
        out = tmp_path / "out"
        data = out / "..data"
        assert data.is_symlink() and os.readlink(data).startswith("..") and os.readlink(data) != "..data"
        for name in ISTIO_FILES:
            assert (out / name).is_symlink() and os.readlink(out / name) == f"..data/{name}"
            mode = stat.S_IMODE((out / name).stat().st_mode)
            assert mode == (0o600 if name == "ca-key.pem" else 0o644), (name, oct(mode))
        assert not (out / "tls.crt").exists()

    def test_auth_prefixed_mount_and_env_config_path(self, tmp_path, bao, sa_token_file, runbook):
        """`auth.mount: auth/<mount>` works, and the config path can come from ISTIO_VAULT_AGENT_CONFIG."""
        token = sa_token_file("istio-system", "istiod")
        cfg = _config(tmp_path, bao, token, runbook, mount=f"auth/{runbook.auth_mount}")
        proc = run_cli("run", "--mode", "init", env=cli_env(ISTIO_VAULT_AGENT_CONFIG=str(cfg)))
        assert proc.returncode == 0, proc.stderr
        assert (tmp_path / "out" / "ca-cert.pem").exists()

    def test_vault_addr_env_overrides_the_file(self, tmp_path, bao, sa_token_file, runbook):
        """VAULT_ADDR wins over vault.address in the file, like the vault CLI."""
        token = sa_token_file("istio-system", "istiod")
        cfg = agent_config(address="http://127.0.0.1:1", token_path=token, out=tmp_path / "out",
                           kv=f"{runbook.kv_mount}/{runbook.secret_path}", mount=runbook.auth_mount)
        path = write_config(tmp_path / "agent.yaml", cfg)
        proc = run_cli("run", "--config", str(path), env=cli_env(VAULT_ADDR=bao.address))
        assert proc.returncode == 0, proc.stderr


class TestKV2:
    def test_kv_v2_with_file_named_keys(self, tmp_path, bao, vault_admin, kube, unique, sa_token_file, ca):
        """A KV v2 secret whose keys are named like the files (ca-key.pem, ...) is detected and published."""
        mount, auth_mount = f"kv2-{unique}", f"k8s-{unique}"
        ensure_secrets_engine(vault_admin, mount, kv_version=2)
        files = pki.istio_ca_files(*ca)
        vault_admin.secrets.kv.v2.create_or_update_secret(
            path="istio/cacerts", secret={k: v.decode() for k, v in files.items()}, mount_point=mount
        )
        vault_admin.sys.create_or_update_policy(
            name=f"p-{unique}", policy=f'path "{mount}/data/istio/cacerts" {{ capabilities = ["read"] }}'
        )
        configure_kubernetes_auth(vault_admin, kube, mount=auth_mount, role="istiod", namespace="istio-system",
                                  service_account="istiod", policies=[f"p-{unique}"])
        token = sa_token_file("istio-system", "istiod")
        cfg = agent_config(address=bao.address, token_path=token, out=tmp_path / "out",
                           kv=f"{mount}/istio/cacerts", mount=auth_mount)
        proc = run_cli("run", "--config", str(write_config(tmp_path / "a.yaml", cfg)))
        assert proc.returncode == 0, proc.stderr
        for name in ISTIO_FILES:
            assert (tmp_path / "out" / name).read_bytes() == files[name]


class TestFinalFailures:
    """Failures that no retry can fix exit 1 at once with one `error:` line saying what to fix."""

    def test_wrong_role(self, tmp_path, bao, sa_token_file, runbook):
        token = sa_token_file("istio-system", "istiod")
        start = time.monotonic()
        proc = run_cli("run", "--config", str(_config(tmp_path, bao, token, runbook, role="nope")))
        assert proc.returncode == 1 and time.monotonic() - start < 10
        line = error_line(proc)
        assert "'nope'" in line and runbook.auth_mount in line
        assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())

    def test_wrong_service_account(self, tmp_path, bao, sa_token_file, runbook):
        token = sa_token_file("istio-system", "not-istiod")
        proc = run_cli("run", "--config", str(_config(tmp_path, bao, token, runbook)))
        assert proc.returncode == 1
        line = error_line(proc)
        assert "service account" in line and "'istiod'" in line
        _assert_no_secrets(proc.stderr, token.read_text())

    def test_missing_token_file(self, tmp_path, bao, runbook):
        proc = run_cli("run", "--config", str(_config(tmp_path, bao, tmp_path / "absent", runbook)))
        assert proc.returncode == 1
        assert "token file" in error_line(proc) and "absent" in error_line(proc)

    def test_missing_path(self, tmp_path, bao, sa_token_file, runbook):
        token = sa_token_file("istio-system", "istiod")
        cfg = agent_config(address=bao.address, token_path=token, out=tmp_path / "out",
                           kv=f"{runbook.kv_mount}/istiod-service/nothing-here", mount=runbook.auth_mount)
        proc = run_cli("run", "--config", str(write_config(tmp_path / "a.yaml", cfg)))
        assert proc.returncode == 1
        line = error_line(proc)
        assert f"{runbook.kv_mount}/istiod-service/nothing-here" in line

    def test_missing_key(self, tmp_path, bao, vault_admin, sa_token_file, runbook, ca):
        files = pki.istio_ca_files(*ca)
        data = {"ca_key": files["ca-key.pem"].decode(), "ca_cert": files["ca-cert.pem"].decode(),
                "root_cert": files["root-cert.pem"].decode()}
        vault_admin.secrets.kv.v1.create_or_update_secret(path=runbook.secret_path, secret=data,
                                                          mount_point=runbook.kv_mount)
        token = sa_token_file("istio-system", "istiod")
        proc = run_cli("run", "--config", str(_config(tmp_path, bao, token, runbook)))
        assert proc.returncode == 1
        line = error_line(proc)
        assert "'cert_chain'" in line and "cert-chain.pem" in line
        _assert_no_secrets(proc.stderr, files["ca-key.pem"])


def _seed_bad(vault_admin, runbook, files):
    vault_admin.secrets.kv.v1.create_or_update_secret(
        path=runbook.secret_path,
        secret={k.removesuffix(".pem").replace("-", "_"): v.decode() for k, v in files.items()},
        mount_point=runbook.kv_mount,
    )


def _bad_bundles():
    root = pki.root_ca()
    other_root = pki.root_ca(cn="Other Root CA")
    good = pki.intermediate_ca(root)
    mismatched = dict(pki.istio_ca_files(root, good))
    mismatched["ca-key.pem"] = pki.intermediate_ca(root).key_pem
    expired = pki.intermediate_ca(root, not_before=NOW - dt.timedelta(days=30), not_after=NOW - dt.timedelta(days=1))
    not_ca = pki.intermediate_ca(root, is_ca=False)
    return {
        "mismatched key and cert": (mismatched, "ca-key.pem"),
        "expired intermediate": (pki.istio_ca_files(root, expired), "expired"),
        "intermediate that is not a CA": (pki.istio_ca_files(root, not_ca), "not a CA"),
        "chain to another root": (pki.istio_ca_files(other_root, good), "root-cert.pem"),
    }


BAD = _bad_bundles()


@pytest.mark.parametrize("case", sorted(BAD))
def test_invalid_bundle_is_refused_and_nothing_is_written(case, tmp_path, bao, vault_admin, sa_token_file, runbook):
    """A bundle istiod would reject exits 1 naming the file and check, and writes nothing."""
    files, expected = BAD[case]
    _seed_bad(vault_admin, runbook, files)
    token = sa_token_file("istio-system", "istiod")
    proc = run_cli("run", "--config", str(_config(tmp_path, bao, token, runbook)))
    assert proc.returncode == 1, proc.stderr
    line = error_line(proc)
    assert expected in line, line
    out = tmp_path / "out"
    assert not out.exists() or not [p for p in out.iterdir()], list(out.iterdir())
    _assert_no_secrets(proc.stderr, files["ca-key.pem"])


def _init_across_outage(
    tmp_path: Path, address: str, token: Path, *, down_for: float, recover: Callable[[], object], timeout: int
) -> tuple[int | None, str]:
    """Run init against the Vault at `address` (the runbook layout) while it cannot answer; after `down_for`
    seconds check that the agent is still retrying, call `recover()`, and wait up to `timeout` (also init.timeout)
    seconds for the exit. Returns (exit code, the agent's log)."""
    cfg = agent_config(address=address, token_path=token, out=tmp_path / "out",
                       kv="kubernetes-cluster1-secrets/istiod-service/certs", init_timeout=f"{timeout}s")
    agent = AgentProc(write_config(tmp_path / "a.yaml", cfg), mode="init").start()
    try:
        time.sleep(down_for)
        assert agent.proc is not None and agent.proc.poll() is None, "the agent gave up while Vault was down"
        recover()
        agent.proc.wait(timeout=timeout)
    finally:
        agent.kill()
    return agent.proc.returncode, agent.stderr


class TestVaultAvailability:
    def test_vault_down_then_up_inside_the_timeout(self, tmp_path, bao_factory, kube, sa_token_file, ca):
        """Init retries with backoff while OpenBao is down and publishes once it comes up."""
        from testbed.bao import free_port
        from tests.faultkit import Proxy

        server = bao_factory(start=False)
        files = pki.istio_ca_files(*ca)
        # The agent talks to a proxy whose upstream is closed until OpenBao is up *and* seeded, as a restarted
        # production Vault comes back with its data; an empty dev server would refuse the login for good.
        proxy = Proxy(free_port())

        def recover() -> None:
            server.start()
            seed_runbook_layout(server.client(), kube, files)
            proxy.upstream_port = server.port

        token = sa_token_file("istio-system", "istiod")
        try:
            rc, err = _init_across_outage(tmp_path, proxy.address, token, down_for=2.5, recover=recover, timeout=40)
        finally:
            proxy.close()
        assert rc == 0, err
        assert '"event": "sync_failed"' in err and '"retryable": true' in err
        assert (tmp_path / "out" / "ca-cert.pem").read_bytes() == files["ca-cert.pem"]

    def test_vault_down_past_the_timeout(self, tmp_path, sa_token_file):
        """With nothing listening, init gives up after init.timeout with exit 1 and a clear reason."""
        from testbed.bao import free_port

        token = sa_token_file("istio-system", "istiod")
        cfg = agent_config(address=f"http://127.0.0.1:{free_port()}", token_path=token, out=tmp_path / "out",
                           kv="kv/istio", init_timeout="3s")
        start = time.monotonic()
        proc = run_cli("run", "--config", str(write_config(tmp_path / "a.yaml", cfg)))
        elapsed = time.monotonic() - start
        assert proc.returncode == 1
        assert 3 <= elapsed < 12, elapsed
        line = error_line(proc)
        assert "cannot reach Vault" in line and "init.timeout" in line

    def test_sealed_vault_is_retried(self, tmp_path, bao_factory, kube, sa_token_file, ca):
        """A sealed OpenBao is retried like an unreachable one, and init succeeds once it is unsealed."""
        server = bao_factory()
        files = pki.istio_ca_files(*ca)
        seed_runbook_layout(server.client(), kube, files)
        server.seal()
        token = sa_token_file("istio-system", "istiod")
        rc, err = _init_across_outage(tmp_path, server.address, token, down_for=2, recover=server.unseal, timeout=30)
        assert rc == 0, err
        assert "sealed" in err


class TestTokenFile:
    def test_token_file_is_reread_at_every_login(self, tmp_path, bao, kube, sa_token_file, runbook):
        """A rotated projected token is used at the next login; the old one is never cached."""
        import asyncio

        from agent import auth
        from agent.config import AuthConfig, VaultConfig
        from agent.vault import Vault

        token = sa_token_file("istio-system", "istiod")
        cfg = AuthConfig(method="kubernetes", mount=runbook.auth_mount, role="istiod", token_path=str(token))

        async def twice() -> tuple[auth.Login, auth.Login]:
            vault = Vault(VaultConfig(address=bao.address), env={})
            try:
                first = await auth.login(vault, cfg)
                kube.revoke_token(token.read_text())
                sa_token_file("istio-system", "istiod")  # kubelet writes a fresh token
                return first, await auth.login(vault, cfg)
            finally:
                await vault.close()

        first, second = asyncio.run(twice())
        assert second.token != first.token and second.ttl > 0
        reviewed = [r.body["spec"]["token"] for r in kube.tokenreviews()]
        assert token.read_text() in reviewed


class TestOtherAuthMethods:
    def test_jwt_method_with_the_same_token_file(self, tmp_path, bao, vault_admin, kube, unique, sa_token_file,
                                                 runbook):
        """`auth.method: jwt` logs in through a jwt auth mount that trusts the cluster's signing key."""
        mount = f"jwt-{unique}"
        vault_admin.sys.enable_auth_method("jwt", path=mount)
        vault_admin.write_data(f"auth/{mount}/config", data={"jwt_validation_pubkeys": [kube.public_key_pem.decode()],
                                                            "bound_issuer": kube.issuer})
        vault_admin.write_data(f"auth/{mount}/role/istiod", data={
            "role_type": "jwt", "user_claim": "sub", "bound_audiences": ["vault"],
            "bound_subject": "system:serviceaccount:istio-system:istiod", "token_policies": [runbook.policy]})
        token = sa_token_file("istio-system", "istiod", audience="vault")
        cfg = _config(tmp_path, bao, token, runbook, mount=mount, method="jwt")
        proc = run_cli("run", "--config", str(cfg))
        assert proc.returncode == 0, proc.stderr
        assert (tmp_path / "out" / "ca-key.pem").exists()

    def test_token_method_for_development(self, tmp_path, bao, vault_admin, runbook):
        """`auth.method: token` reads a Vault token from a file (development), and a bad one is refused."""
        child = vault_admin.auth.token.create(policies=[runbook.policy], ttl="1h")["auth"]["client_token"]
        token_file = tmp_path / "vault-token"
        token_file.write_text(child + "\n")
        cfg = _config(tmp_path, bao, token_file, runbook, method="token")
        proc = run_cli("run", "--config", str(cfg))
        assert proc.returncode == 0, proc.stderr
        token_file.write_text("not-a-token")
        bad = run_cli("run", "--config", str(cfg))
        assert bad.returncode == 1 and "put a valid Vault token in" in error_line(bad)
        assert child not in proc.stderr + bad.stderr


class TestTLS:
    def test_vault_over_tls_with_ca_cert_and_a_wrong_ca(self, tmp_path, bao_factory, kube, sa_token_file, ca):
        """With vault.ca_cert (or VAULT_CACERT) init works over TLS; a wrong CA is one final error naming the fix."""
        server = bao_factory(tls=True)
        seed_runbook_layout(server.client(), kube, pki.istio_ca_files(*ca))
        token = sa_token_file("istio-system", "istiod")
        cfg = agent_config(address=server.address, token_path=token, out=tmp_path / "out",
                           kv="kubernetes-cluster1-secrets/istiod-service/certs")
        path = write_config(tmp_path / "a.yaml", cfg)
        ok = run_cli("run", "--config", str(path), env=cli_env(VAULT_CACERT=str(server.ca_file)))
        assert ok.returncode == 0, ok.stderr
        wrong = tmp_path / "other-ca.pem"
        wrong.write_bytes(pki.root_ca(cn="Not Vault's CA").cert_pem)
        bad = run_cli("run", "--config", str(path), env=cli_env(VAULT_CACERT=str(wrong)))
        assert bad.returncode == 1
        assert "TLS verification failed" in error_line(bad) and "vault.ca_cert" in error_line(bad)

    def test_tls_server_name_is_checked(self, tmp_path, bao_factory, kube, sa_token_file, ca):
        """vault.tls_server_name is the name the certificate must carry: one it has works, another is refused."""
        server = bao_factory(tls=True)
        seed_runbook_layout(server.client(), kube, pki.istio_ca_files(*ca))
        token = sa_token_file("istio-system", "istiod")
        results = {}
        for name in ("localhost", "openbao.wrong.example"):
            cfg = agent_config(address=server.address, token_path=token, out=tmp_path / name,
                               kv="kubernetes-cluster1-secrets/istiod-service/certs")
            cfg["vault"].update(ca_cert=str(server.ca_file), tls_server_name=name)
            results[name] = run_cli("run", "--config", str(write_config(tmp_path / f"{name}.yaml", cfg)))
        assert results["localhost"].returncode == 0, results["localhost"].stderr
        assert results["openbao.wrong.example"].returncode == 1
        assert "TLS verification failed" in error_line(results["openbao.wrong.example"])


def test_init_imports_nothing_it_does_not_use(tmp_path, bao, sa_token_file, runbook):
    """Start-up time: an init pass imports aiohttp (its Vault session) but never hvac, requests, the sidecar's
    prometheus_client or watchdog, or the kubernetes client."""
    token = sa_token_file("istio-system", "istiod")
    cfg = _config(tmp_path, bao, token, runbook)
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "agent.cli", "run", "--config", str(cfg)],
                          cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time")}
    assert "aiohttp" in imported  # the measurement works
    for heavy in ("hvac", "requests", "prometheus_client", "watchdog", "kubernetes", "agent.inject",
                  "agent.setup_vault", "agent.ca"):
        assert heavy not in imported, heavy
