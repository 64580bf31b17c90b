"""`istio-vault-agent ca root|intermediate` against a real OpenBao: certificates shaped like Istio's tools/certs,
accepted by `check` and openssl, written to a directory or to KV (v1, v2 with check-and-set), published by the agent.
"""

from __future__ import annotations

import datetime as dt
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from cryptography.x509.oid import NameOID

from agent import ca, hvac_client
from agent.errors import WriteConflict
from testbed.vaultsetup import configure_kubernetes_auth, ensure_secrets_engine
from tests.faultkit import HTTPProxy
from tests.support import ISTIO_FILES, agent_config, cli_env, error_line, run_cli, write_config

RUNBOOK_KEYS = {"ca_key", "ca_cert", "cert_chain", "root_cert"}


def _root(tmp_path: Path, key_type: str = "ec-p256", name: str = "root") -> Path:
    out = tmp_path / name
    proc = run_cli("ca", "root", "--out", str(out), "--key-type", key_type)
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture(name="root_dir")
def fixture_root_dir(tmp_path: Path) -> Path:
    """A root made by `ca root` (EC P-256: quick), in tmp_path/root."""
    return _root(tmp_path)


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _body_lines(pem: bytes | str) -> list[str]:
    """The base64 lines of a PEM block: any one of them showing up somewhere means the key leaked."""
    text = pem.decode() if isinstance(pem, bytes) else pem
    return [ln for ln in text.strip().splitlines()[1:-1] if len(ln) >= 16]


def _assert_no_key(text: str, *pems: bytes | str) -> None:
    assert "PRIVATE KEY" not in text
    for pem in pems:
        assert not any(line in text for line in _body_lines(pem))


def _openssl_verify(directory: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("no openssl")
    proc = subprocess.run(
        ["openssl", "verify", "-CAfile", "root-cert.pem", "-untrusted", "cert-chain.pem", "ca-cert.pem"],
        cwd=directory, capture_output=True, text=True, check=False,
    )
    assert proc.returncode == 0 and "ca-cert.pem: OK" in proc.stdout, proc.stdout + proc.stderr


def _operator_env(bao, address: str | None = None) -> dict[str, str]:
    """The only credentials a test gives the command: this server's address and root token."""
    return cli_env(VAULT_ADDR=address or bao.address, VAULT_TOKEN=bao.root_token)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ---------------------------------------------------------------------------------------------- ca root


def test_help_stays_fast():
    """`istio-vault-agent --help` lists `ca` without loading it (or cryptography): start-up stays fast."""
    import sys

    from tests.support import ROOT

    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "agent.cli", "--help"], cwd=ROOT, env=cli_env(),
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0 and " ca " in proc.stdout
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time")}
    assert "agent.errors" in imported  # the measurement works
    assert not {"agent.ca", "agent.kvstore", "cryptography", "hvac"} & imported


class TestRoot:
    def test_default_root_is_istios_rsa_4096_root(self, tmp_path):
        """`ca root` writes an RSA-4096 O=Istio CN=Root CA, CA:true and keyCertSign (critical), with SKI, 10 years."""
        out = tmp_path / "root"
        proc = run_cli("ca", "root", "--out", str(out))
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.splitlines() == [f"wrote {out}/root-key.pem (0600)", f"wrote {out}/root-cert.pem (0644)"]
        assert (_mode(out / "root-key.pem"), _mode(out / "root-cert.pem")) == (0o600, 0o644)
        _assert_no_key(proc.stdout + proc.stderr, (out / "root-key.pem").read_bytes())
        cert = _cert(out / "root-cert.pem")
        key = load_pem_private_key((out / "root-key.pem").read_bytes(), None)
        assert isinstance(key, rsa.RSAPrivateKey) and key.key_size == 4096
        assert cert.public_key() == key.public_key()
        assert cert.subject == cert.issuer
        assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "Istio"
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "Root CA"
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
        assert bc.critical and bc.value.ca and bc.value.path_length is None
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
        assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign and ku.value.digital_signature
        ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        assert ski == x509.SubjectKeyIdentifier.from_public_key(cert.public_key())
        assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)
        days = (cert.not_valid_after_utc - dt.datetime.now(dt.UTC)).days
        assert 3649 <= days <= 3650

    def test_refuses_to_overwrite_without_force(self, tmp_path, root_dir):
        """A second `ca root` into the same directory exits 1 naming --force and leaves the root alone; --force
        replaces it."""
        before = {p.name: p.read_bytes() for p in root_dir.iterdir()}
        proc = run_cli("ca", "root", "--out", str(root_dir), "--key-type", "ec-p256")
        assert proc.returncode == 1
        line = error_line(proc)
        assert "already exists" in line and "--force" in line
        assert {p.name: p.read_bytes() for p in root_dir.iterdir()} == before
        proc = run_cli("ca", "root", "--out", str(root_dir), "--key-type", "ec-p256", "--force")
        assert proc.returncode == 0, proc.stderr
        assert (root_dir / "root-cert.pem").read_bytes() != before["root-cert.pem"]
        assert _mode(root_dir / "root-key.pem") == 0o600

    def test_bad_days_is_a_usage_error(self, tmp_path):
        """--days 0 is refused by the parser (exit 2) and nothing is written."""
        proc = run_cli("ca", "root", "--out", str(tmp_path / "r"), "--days", "0")
        assert proc.returncode == 2 and "--days" in proc.stderr
        assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------------------------------------- to a directory


class TestIntermediateDir:
    def test_bundle_passes_check_and_openssl_with_tools_certs_shape(self, tmp_path):
        """The default intermediate (RSA 4096) passes `check` and openssl verify, and has the tools/certs
        subject, pathlen:0, SAN, keyUsage, AKI/SKI and SHA-256; the key file is 0600."""
        root_dir = _root(tmp_path, key_type="rsa-2048")
        out = tmp_path / "c1"
        proc = run_cli("ca", "intermediate", "--cluster", "c1", "--root-dir", str(root_dir), "--out", str(out))
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.splitlines() == [f"wrote {out}/{n} ({'0600' if n == 'ca-key.pem' else '0644'})"
                                            for n in ("ca-key.pem", "ca-cert.pem", "cert-chain.pem", "root-cert.pem")]
        assert {p.name: _mode(p) for p in out.iterdir()} == {
            "ca-key.pem": 0o600, "ca-cert.pem": 0o644, "cert-chain.pem": 0o644, "root-cert.pem": 0o644}
        _assert_no_key(proc.stdout + proc.stderr, (root_dir / "root-key.pem").read_bytes(),
                       (out / "ca-key.pem").read_bytes())
        check = run_cli("check", str(out))
        assert check.returncode == 0 and check.stdout.startswith("ok:"), check.stderr
        _openssl_verify(out)

        root, inter = _cert(root_dir / "root-cert.pem"), _cert(out / "ca-cert.pem")
        key = load_pem_private_key((out / "ca-key.pem").read_bytes(), None)
        assert isinstance(key, rsa.RSAPrivateKey) and key.key_size == 4096
        assert [(a.oid, a.value) for a in inter.subject] == [
            (NameOID.ORGANIZATION_NAME, "Istio"), (NameOID.COMMON_NAME, "Intermediate CA"),
            (NameOID.LOCALITY_NAME, "c1")]
        assert inter.issuer == root.subject
        bc = inter.extensions.get_extension_for_class(x509.BasicConstraints)
        assert bc.critical and bc.value.ca and bc.value.path_length == 0
        ku = inter.extensions.get_extension_for_class(x509.KeyUsage)
        assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign and ku.value.digital_signature
        san = inter.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.DNSName) == ["istiod.istio-system.svc"]
        aki = inter.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
        root_ski = root.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        assert aki.key_identifier == root_ski.digest
        ski = inter.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        assert ski == x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        assert isinstance(inter.signature_hash_algorithm, hashes.SHA256)
        assert 729 <= (inter.not_valid_after_utc - dt.datetime.now(dt.UTC)).days <= 730
        # cert-chain.pem: the intermediate, then the root; root-cert.pem: the root's file byte for byte
        chain = x509.load_pem_x509_certificates((out / "cert-chain.pem").read_bytes())
        assert chain == [inter, root]
        assert (out / "root-cert.pem").read_bytes() == (root_dir / "root-cert.pem").read_bytes()

    def test_two_clusters_get_different_intermediates_under_one_root(self, tmp_path, root_dir):
        """Intermediates of c1 and c2 differ (key, serial, L=) and both chain to the same root."""
        root = _cert(root_dir / "root-cert.pem")
        certs = {}
        for cluster in ("c1", "c2"):
            out = tmp_path / cluster
            proc = run_cli("ca", "intermediate", "--cluster", cluster, "--root-dir", str(root_dir), "--out", str(out),
                           "--key-type", "ec-p256")
            assert proc.returncode == 0, proc.stderr
            certs[cluster] = _cert(out / "ca-cert.pem")
            certs[cluster].verify_directly_issued_by(root)
            assert (out / "root-cert.pem").read_bytes() == (root_dir / "root-cert.pem").read_bytes()
            assert run_cli("check", str(out)).returncode == 0
        c1, c2 = certs["c1"], certs["c2"]
        assert c1.public_key() != c2.public_key() and c1.serial_number != c2.serial_number
        assert [c.subject.get_attributes_for_oid(NameOID.LOCALITY_NAME)[0].value for c in (c1, c2)] == ["c1", "c2"]

    @pytest.mark.parametrize(("key_type", "kind", "size"), [
        ("ec-p384", ec.EllipticCurvePrivateKey, 384), ("rsa-3072", rsa.RSAPrivateKey, 3072)])
    def test_key_types(self, tmp_path, root_dir, key_type, kind, size):
        """--key-type picks the intermediate's key; the result still passes `check`."""
        out = tmp_path / "c1"
        proc = run_cli("ca", "intermediate", "--cluster", "c1", "--root-dir", str(root_dir), "--out", str(out),
                       "--key-type", key_type)
        assert proc.returncode == 0, proc.stderr
        key = load_pem_private_key((out / "ca-key.pem").read_bytes(), None)
        assert isinstance(key, kind) and key.key_size == size
        assert run_cli("check", str(out)).returncode == 0

    def test_existing_files_are_not_overwritten_without_force(self, tmp_path, root_dir):
        """A second run into the same directory exits 1 naming --force and changes nothing; --if-missing exits 0."""
        out = tmp_path / "c1"
        args = ("ca", "intermediate", "--cluster", "c1", "--root-dir", str(root_dir), "--out", str(out),
                "--key-type", "ec-p256")
        assert run_cli(*args).returncode == 0
        before = {p.name: p.read_bytes() for p in out.iterdir()}
        proc = run_cli(*args)
        assert proc.returncode == 1
        assert "already exists" in error_line(proc) and "--force" in error_line(proc)
        again = run_cli(*args, "--if-missing")
        assert again.returncode == 0 and again.stdout.startswith(f"already present: {out}"), again.stderr
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
        assert run_cli(*args, "--force").returncode == 0
        assert (out / "ca-key.pem").read_bytes() != before["ca-key.pem"]

    def test_intermediate_is_capped_at_the_roots_end(self, tmp_path):
        """An intermediate asked to outlive its root ends with the root, with a warning saying so."""
        root_dir = tmp_path / "root"
        assert run_cli("ca", "root", "--out", str(root_dir), "--key-type", "ec-p256", "--days", "100").returncode == 0
        out = tmp_path / "c1"
        proc = run_cli("ca", "intermediate", "--cluster", "c1", "--root-dir", str(root_dir), "--out", str(out),
                       "--key-type", "ec-p256", "--days", "365")
        assert proc.returncode == 0, proc.stderr
        assert "warning: the intermediate ends with the root" in proc.stderr
        assert _cert(out / "ca-cert.pem").not_valid_after_utc == _cert(root_dir / "root-cert.pem").not_valid_after_utc

    def test_combined_root_bundle_is_kept_and_the_keys_root_signs(self, tmp_path):
        """A root-cert.pem holding roots A and B with B's key (a root rotation): the intermediate is signed by B,
        cert-chain.pem ends with B, and root-cert.pem keeps the combined bytes, which `check` accepts."""
        a, b = _root(tmp_path, name="a"), _root(tmp_path, name="b")
        both = tmp_path / "ab"
        both.mkdir()
        (both / "root-cert.pem").write_bytes((a / "root-cert.pem").read_bytes() + (b / "root-cert.pem").read_bytes())
        shutil.copy(b / "root-key.pem", both / "root-key.pem")
        out = tmp_path / "east"
        proc = run_cli("ca", "intermediate", "--cluster", "east", "--root-dir", str(both), "--out", str(out),
                       "--key-type", "ec-p256")
        assert proc.returncode == 0, proc.stderr
        assert (out / "root-cert.pem").read_bytes() == (both / "root-cert.pem").read_bytes()
        chain = x509.load_pem_x509_certificates((out / "cert-chain.pem").read_bytes())
        assert chain[1:] == [_cert(b / "root-cert.pem")]
        chain[0].verify_directly_issued_by(_cert(b / "root-cert.pem"))
        assert run_cli("check", str(out)).returncode == 0

    def test_a_key_that_is_not_the_roots_is_refused(self, tmp_path, root_dir):
        """A root-key.pem of another root is one clear error, and nothing is written."""
        other = _root(tmp_path, name="other")
        shutil.copy(other / "root-key.pem", root_dir / "root-key.pem")
        out = tmp_path / "c1"
        proc = run_cli("ca", "intermediate", "--cluster", "c1", "--root-dir", str(root_dir), "--out", str(out))
        assert proc.returncode == 1
        assert "is not the key of any certificate" in error_line(proc)
        assert not out.exists() or not any(out.iterdir())

    def test_if_missing_does_not_take_part_of_a_ca_for_one(self, tmp_path, root_dir):
        """--if-missing with a directory holding only some of the four files is one error line naming what is
        missing, not "already present"; the file there is left alone."""
        out = tmp_path / "out"
        out.mkdir()
        (out / "ca-cert.pem").write_text("left over\n")
        proc = run_cli("ca", "intermediate", "--cluster", "c1", "--root-dir", str(root_dir), "--out", str(out),
                       "--key-type", "ec-p256", "--if-missing")
        assert proc.returncode == 1 and proc.stdout == ""
        line = error_line(proc)
        assert "holds only part of a CA (no ca-key.pem, cert-chain.pem, root-cert.pem)" in line and "--force" in line
        assert sorted(p.name for p in out.iterdir()) == ["ca-cert.pem"]

    def test_written_paths_are_escaped(self, tmp_path, root_dir):
        """A --out with a newline or a terminal escape is shown escaped in the `wrote` lines, one line per file."""
        out = tmp_path / "a\nb\x1b[31m"
        proc = run_cli("ca", "intermediate", "--cluster", "c1", "--root-dir", str(root_dir), "--out", str(out),
                       "--key-type", "ec-p256")
        assert proc.returncode == 0, proc.stderr
        lines = proc.stdout.splitlines()
        assert len(lines) == 4 and all("a\\x0ab\\x1b[31m/" in ln for ln in lines) and "\x1b" not in proc.stdout
        assert (out / "ca-key.pem").exists()

    def test_bad_cluster_name_and_missing_target(self, tmp_path, root_dir):
        """A cluster name unfit for mount names, or no --out/--kv, is one error line."""
        proc = run_cli("ca", "intermediate", "--cluster", "C 1", "--root-dir", str(root_dir), "--out", str(tmp_path))
        assert proc.returncode == 1 and "cluster name" in error_line(proc)
        proc = run_cli("ca", "intermediate", "--cluster", "c1", "--root-dir", str(root_dir))
        assert proc.returncode == 1 and "--out DIR, --kv MOUNT/PATH" in error_line(proc)


# ---------------------------------------------------------------------------------------------- to KV


def _kv_layout(vault_admin, kube, unique: str, version: int) -> tuple[str, str]:
    """The runbook's per-cluster layout with a KV v1 or v2 mount: returns (cluster, MOUNT/PATH)."""
    cluster = f"c{unique}"
    mount, path = f"kubernetes-{cluster}-secrets", "istiod-service/certs"
    ensure_secrets_engine(vault_admin, mount, kv_version=version)
    readable = f"{mount}/data/{path}" if version == 2 else f"{mount}/{path}"
    vault_admin.sys.create_or_update_policy(name=f"istiod-certs-{cluster}",
                                            policy=f'path "{readable}" {{ capabilities = ["read"] }}')
    configure_kubernetes_auth(vault_admin, kube, mount=f"kubernetes-{cluster}", role="istiod",
                              namespace="istio-system", service_account="istiod",
                              policies=[f"istiod-certs-{cluster}"])
    return cluster, f"{mount}/{path}"


def _kv_data(vault_admin, kv: str) -> dict[str, str] | None:
    m = hvac_client.kv_mount(vault_admin, kv, fix="test")
    return hvac_client.kv_read(vault_admin, m, hint="test")


class TestIntermediateKV:
    @pytest.mark.parametrize("version", [1, 2])
    def test_kv_written_with_runbook_keys_and_published_by_the_agent(self, tmp_path, bao, vault_admin, kube, unique,
                                                                     sa_token_file, root_dir, version):
        """`--kv` writes ca_key, ca_cert, cert_chain, root_cert (KV v1 and v2); `run --mode init` then publishes
        exactly that bundle, which `check` accepts."""
        cluster, kv = _kv_layout(vault_admin, kube, unique, version)
        proc = run_cli("ca", "intermediate", "--cluster", cluster, "--root-dir", str(root_dir), "--kv", kv,
                       "--key-type", "ec-p256", env=_operator_env(bao))
        assert proc.returncode == 0, proc.stderr
        expected = f"wrote KV v{version} path {kv}{' version 1' if version == 2 else ''} (keys ca_key, ca_cert,"
        assert proc.stdout.splitlines() == [f"{expected} cert_chain, root_cert)"]
        data = _kv_data(vault_admin, kv)
        assert data is not None and set(data) == RUNBOOK_KEYS
        _assert_no_key(proc.stdout + proc.stderr, data["ca_key"], (root_dir / "root-key.pem").read_bytes())

        token = sa_token_file("istio-system", "istiod")
        cfg = agent_config(address=bao.address, token_path=token, out=tmp_path / "out", kv=kv,
                           mount=f"kubernetes-{cluster}")
        run = run_cli("run", "--config", str(write_config(tmp_path / "agent.yaml", cfg)), "--mode", "init")
        assert run.returncode == 0, run.stderr
        out = tmp_path / "out"
        names = {"ca-key.pem": "ca_key", "ca-cert.pem": "ca_cert", "cert-chain.pem": "cert_chain",
                 "root-cert.pem": "root_cert"}
        for name in ISTIO_FILES:
            assert (out / name).read_text() == data[names[name]]
        assert (out / "root-cert.pem").read_bytes() == (root_dir / "root-cert.pem").read_bytes()
        assert run_cli("check", str(out)).returncode == 0
        _openssl_verify(out)

    @pytest.mark.parametrize("version", [1, 2])
    def test_existing_kv_data_is_not_overwritten_without_force(self, bao, vault_admin, kube, unique, root_dir,
                                                               version):
        """Existing data makes the command exit 1 naming the path and --force, data unchanged; --if-missing exits 0
        with "already present"; --force replaces it."""
        cluster, kv = _kv_layout(vault_admin, kube, unique, version)
        base = ("ca", "intermediate", "--cluster", cluster, "--root-dir", str(root_dir), "--kv", kv,
                "--key-type", "ec-p256")
        assert run_cli(*base, env=_operator_env(bao)).returncode == 0
        before = _kv_data(vault_admin, kv)
        proc = run_cli(*base, env=_operator_env(bao))
        assert proc.returncode == 1
        line = error_line(proc)
        assert kv in line and "--force" in line
        assert _kv_data(vault_admin, kv) == before
        again = run_cli(*base, "--if-missing", env=_operator_env(bao))
        assert again.returncode == 0 and again.stdout.startswith(f"already present: KV v{version} path {kv}")
        assert _kv_data(vault_admin, kv) == before
        forced = run_cli(*base, "--force", env=_operator_env(bao))
        assert forced.returncode == 0, forced.stderr
        after = _kv_data(vault_admin, kv)
        assert after is not None and after["ca_key"] != before["ca_key"]
        assert after["root_cert"] == before["root_cert"]

    @pytest.mark.parametrize("force", [False, True])
    def test_check_and_set_refuses_a_concurrent_write(self, bao, vault_admin, kube, unique, root_dir, force):
        """A version written by someone else between the command's read and its write makes KV v2 check-and-set
        refuse the write: one clear error, and the other writer's data stays."""
        cluster, kv = _kv_layout(vault_admin, kube, unique, 2)
        m = hvac_client.kv_mount(vault_admin, kv, fix="test")
        if force:
            hvac_client.kv_write(vault_admin, m, {"ca_key": "old"}, cas=0)
        theirs = {"ca_key": "theirs", "ca_cert": "theirs", "cert_chain": "theirs", "root_cert": "theirs"}

        def race() -> None:
            vault_admin.secrets.kv.v2.create_or_update_secret(path=m.secret, secret=theirs, mount_point=m.path)

        opts = ca.IntermediateOptions(cluster=cluster, root_dir=str(root_dir), kv=kv, force=force, key_type="ec-p256")
        said: list[str] = []
        with pytest.raises(WriteConflict, match="check-and-set refused the write and nothing was written") as err:
            ca.make_intermediate(opts, say=said.append, warn=said.append, before_write=race,
                                 environ={"VAULT_ADDR": bao.address, "VAULT_TOKEN": bao.root_token})
        assert kv in str(err.value)
        assert _kv_data(vault_admin, kv) == theirs
        assert said == []

    def test_if_missing_run_that_loses_the_race_succeeds(self, bao, vault_admin, kube, unique, root_dir):
        """With --if-missing, a run whose check-and-set loses to another run's write reports "already present"
        and leaves the winner's data: two Jobs at once both succeed, one bundle."""
        cluster, kv = _kv_layout(vault_admin, kube, unique, 2)
        m = hvac_client.kv_mount(vault_admin, kv, fix="test")
        winner = {"ca_key": "w", "ca_cert": "w", "cert_chain": "w", "root_cert": "w"}

        def race() -> None:
            vault_admin.secrets.kv.v2.create_or_update_secret(path=m.secret, secret=winner, mount_point=m.path)

        opts = ca.IntermediateOptions(cluster=cluster, root_dir=str(root_dir), kv=kv, if_missing=True,
                                      key_type="ec-p256")
        said: list[str] = []
        ca.make_intermediate(opts, say=said.append, warn=said.append, before_write=race,
                             environ={"VAULT_ADDR": bao.address, "VAULT_TOKEN": bao.root_token})
        assert said == [f"already present: KV v2 path {kv}; nothing written (--if-missing)"]
        assert _kv_data(vault_admin, kv) == winner

    def test_root_key_never_reaches_vault(self, bao, vault_admin, kube, unique, root_dir):
        """With --root-dir, no request to Vault carries any line of the root key (while the intermediate's key,
        which is meant for KV, is seen by the same recorder), and no output shows it."""
        cluster, kv = _kv_layout(vault_admin, kube, unique, 2)
        proxy = HTTPProxy(bao.port)
        try:
            proc = run_cli("ca", "intermediate", "--cluster", cluster, "--root-dir", str(root_dir), "--kv", kv,
                           "--key-type", "ec-p256", env=_operator_env(bao, proxy.address))
        finally:
            proxy.close()
        assert proc.returncode == 0, proc.stderr
        sent = "\n".join(f"{method} {path} {body.decode(errors='replace')}" for method, path, body in proxy.bodies)
        sent = sent.replace("\\n", "\n")  # PEM inside JSON strings
        data = _kv_data(vault_admin, kv)
        assert data is not None and _body_lines(data["ca_key"])[0] in sent  # the recorder does see key material
        root_key = (root_dir / "root-key.pem").read_bytes()
        assert not any(line in sent for line in _body_lines(root_key))
        _assert_no_key(proc.stdout + proc.stderr, root_key, data["ca_key"])

    def test_root_from_kv(self, tmp_path, bao, vault_admin, kube, unique, root_dir):
        """--root-kv reads root_cert and root_key from a KV path; the intermediate chains to that root."""
        cluster, kv = _kv_layout(vault_admin, kube, unique, 2)
        root_mount = f"root-{unique}"
        ensure_secrets_engine(vault_admin, root_mount, kv_version=2)
        vault_admin.secrets.kv.v2.create_or_update_secret(
            path="istio/root", mount_point=root_mount,
            secret={"root_cert": (root_dir / "root-cert.pem").read_text(),
                    "root_key": (root_dir / "root-key.pem").read_text()})
        out = tmp_path / "c1"
        proc = run_cli("ca", "intermediate", "--cluster", cluster, "--root-kv", f"{root_mount}/istio/root",
                       "--kv", kv, "--out", str(out), "--key-type", "ec-p256", env=_operator_env(bao))
        assert proc.returncode == 0, proc.stderr
        assert len(proc.stdout.splitlines()) == 5  # the KV path and four files
        _cert(out / "ca-cert.pem").verify_directly_issued_by(_cert(root_dir / "root-cert.pem"))
        data = _kv_data(vault_admin, kv)
        assert data is not None and data["ca_cert"] == (out / "ca-cert.pem").read_text()
        _assert_no_key(proc.stdout + proc.stderr, (root_dir / "root-key.pem").read_bytes())

        missing = run_cli("ca", "intermediate", "--cluster", cluster, "--root-kv", f"{root_mount}/nothing",
                          "--kv", kv, "--force", env=_operator_env(bao))
        assert missing.returncode == 1
        assert "has no root_cert or root_key" in error_line(missing)

    def test_kubernetes_auth_login_instead_of_a_token(self, bao, vault_admin, kube, unique, sa_token_file, root_dir):
        """With --auth-mount/--role/--token-path the command logs in as its service account (no VAULT_TOKEN), and
        a policy limited to that cluster's path is enough."""
        cluster, kv = _kv_layout(vault_admin, kube, unique, 2)
        mount, path = kv.split("/", 1)
        vault_admin.sys.create_or_update_policy(name=f"ca-bootstrap-{cluster}", policy=(
            f'path "{mount}/data/{path}" {{ capabilities = ["create", "update"] }}\n'
            f'path "{mount}/metadata/{path}" {{ capabilities = ["read"] }}\n'))
        configure_kubernetes_auth(vault_admin, kube, mount=f"kubernetes-{cluster}", role="ca-bootstrap",
                                  namespace="istio-system", service_account="ca-bootstrap",
                                  policies=[f"ca-bootstrap-{cluster}"])
        token = sa_token_file("istio-system", "ca-bootstrap")
        args = ("ca", "intermediate", "--cluster", cluster, "--root-dir", str(root_dir), "--kv", kv, "--key-type",
                "ec-p256", "--auth-mount", f"kubernetes-{cluster}", "--role", "ca-bootstrap", "--token-path",
                str(token), "--if-missing")
        proc = run_cli(*args, env=cli_env(VAULT_ADDR=bao.address))
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith(f"wrote KV v2 path {kv} version 1")
        again = run_cli(*args, env=cli_env(VAULT_ADDR=bao.address))
        assert again.returncode == 0 and again.stdout.startswith("already present"), again.stderr
        _assert_no_key(proc.stdout + proc.stderr + again.stdout + again.stderr, token.read_text())

    def test_an_out_dir_it_cannot_fill_stops_it_before_kv(self, tmp_path, bao, vault_admin, kube, unique,
                                                          root_dir):
        """--kv with an --out that cannot be created is one error line and leaves KV empty, so a rerun needs no
        --force."""
        cluster, kv = _kv_layout(vault_admin, kube, unique, 2)
        (tmp_path / "file").write_text("x")
        base = ("ca", "intermediate", "--cluster", cluster, "--root-dir", str(root_dir), "--kv", kv, "--key-type",
                "ec-p256")
        proc = run_cli(*base, "--out", str(tmp_path / "file" / "out"), env=_operator_env(bao))
        assert proc.returncode == 1 and "cannot create directory" in error_line(proc) and proc.stdout == ""
        assert _kv_data(vault_admin, kv) is None
        again = run_cli(*base, "--out", str(tmp_path / "out"), env=_operator_env(bao))
        assert again.returncode == 0, again.stderr
        assert _kv_data(vault_admin, kv) is not None and (tmp_path / "out" / "ca-key.pem").exists()

    @pytest.mark.parametrize("suffix", ["?x=1", "#frag", "%2Fother", "\nb"])
    def test_kv_path_that_a_url_would_change_is_refused(self, bao, vault_admin, kube, unique, root_dir, suffix):
        """A --kv with '?', '#', '%' or a newline (which would make the request name another secret) is one error
        line, and the secret it would have hit stays as it was."""
        cluster, kv = _kv_layout(vault_admin, kube, unique, 2)
        proc = run_cli("ca", "intermediate", "--cluster", cluster, "--root-dir", str(root_dir), "--key-type",
                       "ec-p256", "--kv", kv + suffix, "--force", env=_operator_env(bao))
        assert proc.returncode == 1 and "cannot name a KV secret" in error_line(proc) and proc.stdout == ""
        assert _kv_data(vault_admin, kv) is None

    def test_login_errors_name_this_commands_flags(self, tmp_path, bao, vault_admin, kube, unique, root_dir):
        """A login that fails names --token-path / --auth-mount, the flags of this command, not the agent's
        config keys."""
        cluster, kv = _kv_layout(vault_admin, kube, unique, 1)
        base = ("ca", "intermediate", "--cluster", cluster, "--root-dir", str(root_dir), "--kv", kv, "--role",
                "istiod")
        no_file = run_cli(*base, "--auth-mount", f"kubernetes-{cluster}", "--token-path", str(tmp_path / "none"),
                          env=cli_env(VAULT_ADDR=bao.address))
        line = error_line(no_file)
        assert no_file.returncode == 1 and line.endswith("or set --token-path") and "auth.token_path" not in line
        token = tmp_path / "token"
        token.write_text(kube.mint_token("istio-system", "istiod"))
        no_mount = run_cli(*base, "--auth-mount", f"none{unique}", "--token-path", str(token),
                           env=cli_env(VAULT_ADDR=bao.address))
        line = error_line(no_mount)
        assert no_mount.returncode == 1 and f"enabled at auth/none{unique} (--auth-mount)" in line
        _assert_no_key(no_mount.stderr, token.read_text())

    def test_credentials_come_only_from_the_given_environment(self, bao, root_dir):
        """Without VAULT_TOKEN in the command's environment it refuses, saying what to set."""
        proc = run_cli("ca", "intermediate", "--cluster", "c1", "--root-dir", str(root_dir), "--kv", "kv/x",
                       env=cli_env(VAULT_ADDR=bao.address))
        assert proc.returncode == 1 and "set VAULT_TOKEN" in error_line(proc)

    def test_a_token_vault_does_not_accept_is_named(self, bao, root_dir, tmp_path):
        """A mistyped or expired VAULT_TOKEN is one error line saying Vault does not accept the token (not that the
        KV mount is missing or the policy short), nothing is written, and the token is not shown."""
        proc = run_cli("ca", "intermediate", "--cluster", "c1", "--root-dir", str(root_dir), "--kv", "kv/x",
                       "--out", str(tmp_path / "o"), env=cli_env(VAULT_ADDR=bao.address, VAULT_TOKEN="s.n0t-a-t0ken"))
        assert proc.returncode == 1 and error_line(proc) == (
            f"error: Vault at {bao.address} does not accept the token in VAULT_TOKEN: it is invalid, expired or"
            " revoked (it may not even look itself up); set VAULT_TOKEN to a valid operator token"
        )
        assert "n0t-a-t0ken" not in proc.stderr and not (tmp_path / "o").exists()

    def test_unknown_mount_and_namespace_say_what_to_check(self, bao, vault_admin, unique, root_dir, tmp_path):
        """An unknown KV mount (Vault answers 403) and an unknown VAULT_NAMESPACE (404) are one error line each
        saying what to check; a non-KV path inside a real namespace still says it is not KV."""
        base = ("ca", "intermediate", "--cluster", "c1", "--root-dir", str(root_dir), "--out", str(tmp_path / "o"))
        mount = run_cli(*base, "--kv", f"nomount{unique}/x", env=_operator_env(bao))
        assert mount.returncode == 1 and error_line(mount) == (
            f"error: --kv nomount{unique}/x: there is no KV mount nomount{unique} that this token may use (Vault"
            " answers permission denied for both): check the mount's name (bao secrets list) and the token's policy")
        assert not (tmp_path / "o").exists()
        nowhere = run_cli(*base, "--kv", "kv/x", env=_operator_env(bao) | {"VAULT_NAMESPACE": f"none{unique}"})
        assert nowhere.returncode == 1
        assert error_line(nowhere) == f"error: Vault namespace 'none{unique}' does not exist: fix VAULT_NAMESPACE"
        vault_admin.adapter.post(f"/v1/sys/namespaces/ns{unique}")
        not_kv = run_cli(*base, "--kv", "sys/x", env=_operator_env(bao) | {"VAULT_NAMESPACE": f"ns{unique}"})
        assert not_kv.returncode == 1 and "sys/x is not a secret on a KV secrets engine" in error_line(not_kv)
