"""Bundle validation: good Istio CA and TLS bundles pass, everything istiod or Envoy would reject is refused."""

from __future__ import annotations

import datetime as dt
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from cryptography.x509.oid import ExtendedKeyUsageOID

from agent.errors import BundleError, ConfigError
from agent.publish import KEYS as KEY_FILES
from agent.validate import ISTIO_CA_FILES, TLS_FILES, BundleInfo, validate, validate_dir
from testbed import pki
from testbed.pki import CertKey, intermediate_ca, istio_ca_files, leaf_cert, pem_certs, pem_key, root_ca, tls_files
from tests.support import cli_env, error_line

NOW = dt.datetime.now(dt.UTC)
DAY = dt.timedelta(days=1)
# Long base64 runs only come from PEM bodies or raw key bytes; a message must never contain one.
_BASE64_RUN = re.compile(r"[A-Za-z0-9+/=]{40,}")


@pytest.fixture(name="root", scope="module")
def fixture_root() -> CertKey:
    return root_ca()


@pytest.fixture(name="inter", scope="module")
def fixture_inter(root: CertKey) -> CertKey:
    return intermediate_ca(root)


@pytest.fixture(name="other_root", scope="module")
def fixture_other_root() -> CertKey:
    """A second root with the same name as `root` but another key: the classic mix-up."""
    return root_ca()


@pytest.fixture(name="good", scope="module")
def fixture_good(root: CertKey, inter: CertKey) -> dict[str, bytes]:
    return istio_ca_files(root, inter)


@pytest.fixture(name="leaf", scope="module")
def fixture_leaf(inter: CertKey) -> CertKey:
    return leaf_cert(inter)


def refused(kind: str, files: dict[str, bytes], *fragments: str, now: dt.datetime | None = None) -> str:
    """Validate, expect a BundleError, and check its message is one clean sentence naming the problem."""
    with pytest.raises(BundleError) as info:
        validate(kind, files, now=now)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert "\n" not in message
    assert "BEGIN" not in message
    assert not _BASE64_RUN.search(message), message
    for name in KEY_FILES & files.keys():
        for line in files[name].splitlines():
            if len(line) > 16 and not line.startswith(b"-----"):
                assert line.decode(errors="replace") not in message
    return message


class TestIstioCaAccepted:
    def test_ec_bundle(self, root: CertKey, inter: CertKey, good: dict[str, bytes]) -> None:
        """A Makefile.selfsigned.mk-shaped EC bundle passes and is described for metrics."""
        info = validate("istio-ca", good)
        assert isinstance(info, BundleInfo)
        assert info.kind == "istio-ca"
        assert info.serial == format(inter.cert.serial_number, "x")
        assert info.root_fingerprints == (root.cert.fingerprint(hashes.SHA256()).hex(),)
        assert set(info.not_after) == {"ca-cert.pem", "cert-chain.pem", "root-cert.pem"}
        assert info.not_after["ca-cert.pem"] == inter.cert.not_valid_after_utc
        assert info.expires_at == min(root.cert.not_valid_after_utc, inter.cert.not_valid_after_utc)

    def test_rsa_bundle_with_pkcs1_key(self) -> None:
        """An RSA bundle passes, with the key in PKCS#1 (RSA PRIVATE KEY) form as openssl genrsa writes it."""
        root = root_ca(key_type="rsa")
        inter = intermediate_ca(root, key_type="rsa")
        files = istio_ca_files(root, inter)
        files["ca-key.pem"] = pem_key(inter.key, "traditional")
        assert files["ca-key.pem"].startswith(b"-----BEGIN RSA PRIVATE KEY-----")
        assert validate("istio-ca", files).serial == format(inter.cert.serial_number, "x")

    def test_sec1_ec_key(self, good: dict[str, bytes], inter: CertKey) -> None:
        """An EC key in SEC1 (EC PRIVATE KEY) form is accepted like PKCS#8."""
        files = {**good, "ca-key.pem": pem_key(inter.key, "traditional")}
        assert files["ca-key.pem"].startswith(b"-----BEGIN EC PRIVATE KEY-----")
        validate("istio-ca", files)

    def test_multi_root(self, root: CertKey, inter: CertKey, other_root: CertKey, good: dict[str, bytes]) -> None:
        """root-cert.pem may carry several roots (rotation A -> A+B); the chain may end at either."""
        files = {**good, "root-cert.pem": pem_certs(other_root.cert, root.cert)}
        info = validate("istio-ca", files)
        assert info.root_fingerprints == (
            other_root.cert.fingerprint(hashes.SHA256()).hex(),
            root.cert.fingerprint(hashes.SHA256()).hex(),
        )

    def test_only_first_block_of_ca_cert_counts(self, good: dict[str, bytes], root: CertKey) -> None:
        """Like istiod, a root appended to ca-cert.pem is ignored rather than refused."""
        validate("istio-ca", {**good, "ca-cert.pem": good["ca-cert.pem"] + pem_certs(root.cert)})

    def test_three_level_chain(self) -> None:
        """root -> pathlen:1 intermediate -> istiod CA verifies through the full cert-chain.pem."""
        root = root_ca()
        mid = intermediate_ca(root, cn="Mid CA", path_length=1)
        ca = intermediate_ca(mid)
        files = istio_ca_files(root, ca)
        assert files["cert-chain.pem"].count(b"BEGIN CERTIFICATE") == 3
        validate("istio-ca", files)

    def test_root_as_signing_ca(self, root: CertKey) -> None:
        """Plugging the root itself in as istiod's CA is valid: the chain is just the root."""
        files = {
            "ca-key.pem": root.key_pem,
            "ca-cert.pem": root.cert_pem,
            "root-cert.pem": root.cert_pem,
            "cert-chain.pem": root.cert_pem,
        }
        validate("istio-ca", files)

    def test_intermediate_eku_with_server_auth(self, root: CertKey) -> None:
        """An extendedKeyUsage that includes serverAuth is fine for istiod's Go verifier."""
        inter = intermediate_ca(
            root, extended_key_usage=[ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
        )
        validate("istio-ca", istio_ca_files(root, inter))

    def test_validate_dir(self, tmp_path: Path, good: dict[str, bytes]) -> None:
        """A bundle written by `python -m testbed.pki istio-ca` validates from its directory."""
        assert pki.main(["istio-ca", str(tmp_path), "--cluster", "east"]) == 0
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(ISTIO_CA_FILES)
        assert validate_dir(tmp_path, "istio-ca").kind == "istio-ca"

    def test_naive_now_is_utc(self, good: dict[str, bytes]) -> None:
        """A naive `now` is read as UTC instead of crashing on comparison."""
        validate("istio-ca", good, now=dt.datetime.now(dt.UTC).replace(tzinfo=None))

    @pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
    def test_openssl_agrees(self, tmp_path: Path, good: dict[str, bytes], inter: CertKey, other_root: CertKey) -> None:
        """openssl verify accepts what we accept, and rejects a bundle chained to another root as we do."""
        pki.write_files(tmp_path / "good", good)
        bad = {**good, "root-cert.pem": other_root.cert_pem}
        pki.write_files(tmp_path / "bad", bad)
        refused("istio-ca", bad, "root-cert.pem")

        def openssl_verify(d: Path) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [
                    "openssl",
                    "verify",
                    "-CAfile",
                    d / "root-cert.pem",
                    "-untrusted",
                    d / "cert-chain.pem",
                    d / "ca-cert.pem",
                ],
                capture_output=True,
                text=True,
                check=False,
            )

        ok = openssl_verify(tmp_path / "good")
        assert ok.returncode == 0, ok.stdout + ok.stderr
        assert ok.stdout.strip().endswith(": OK")
        assert openssl_verify(tmp_path / "bad").returncode != 0


class TestIstioCaRefused:
    def test_key_does_not_match(self, good: dict[str, bytes], root: CertKey) -> None:
        """A ca-key.pem from another issuance is refused, as istiod's tls.X509KeyPair would."""
        other = intermediate_ca(root)
        refused("istio-ca", {**good, "ca-key.pem": other.key_pem}, "ca-key.pem does not match ca-cert.pem")

    def test_expired_intermediate(self, root: CertKey) -> None:
        """An expired ca-cert.pem is refused with its expiry date."""
        inter = intermediate_ca(root, not_before=NOW - 400 * DAY, not_after=NOW - DAY)
        msg = refused("istio-ca", istio_ca_files(root, inter), "ca-cert.pem", "expired at")
        assert (NOW - DAY).strftime("%Y-%m-%d") in msg

    def test_expired_at_given_now(self, good: dict[str, bytes]) -> None:
        """`now` is honoured: eleven years on, the root has expired too, and the first expired file is named."""
        refused("istio-ca", good, "ca-cert.pem", "expired", now=NOW + 4000 * DAY)

    def test_expired_extra_root(self, good: dict[str, bytes], root: CertKey) -> None:
        """An expired root beside the one in use is accepted, as istiod does after a root rotation, with a warning
        naming its position (istiod-correct since the oracle: corpus case root-expired-extra)."""
        old = root_ca(cn="Old Root", not_before=NOW - 10 * DAY, not_after=NOW - DAY)
        files = {**good, "root-cert.pem": pem_certs(root.cert, old.cert)}
        info = validate("istio-ca", files)
        assert info.not_after["root-cert.pem"] == root.cert.not_valid_after_utc
        (warning,) = info.warnings
        for fragment in ("certificate 2 of 2 in root-cert.pem", "Old Root", "expired"):
            assert fragment in warning, warning

    def test_not_yet_valid(self, root: CertKey) -> None:
        """A ca-cert.pem whose notBefore is in the future is refused."""
        inter = intermediate_ca(root, not_before=NOW + DAY, not_after=NOW + 30 * DAY)
        refused("istio-ca", istio_ca_files(root, inter), "ca-cert.pem", "not valid yet")

    def test_intermediate_not_a_ca(self, root: CertKey) -> None:
        """A ca-cert.pem with CA:false is refused: istiod would not sign with it."""
        inter = intermediate_ca(root, is_ca=False)
        refused("istio-ca", istio_ca_files(root, inter), "ca-cert.pem", "CA is false", "istiod")

    def test_no_key_cert_sign(self, root: CertKey) -> None:
        """A ca-cert.pem whose keyUsage lacks keyCertSign is refused (Envoy would reject what it signs)."""
        inter = intermediate_ca(root, key_cert_sign=False)
        refused("istio-ca", istio_ca_files(root, inter), "ca-cert.pem", "keyCertSign")

    def test_mid_ca_not_a_ca(self) -> None:
        """A certificate in the middle of the chain that is not a CA breaks the chain."""
        root = root_ca()
        mid = intermediate_ca(root, cn="Mid CA", is_ca=False)
        ca = intermediate_ca(mid)
        refused("istio-ca", istio_ca_files(root, ca), "cert-chain.pem", "Mid CA", "not a CA")

    def test_path_length_counts_signing_ca(self) -> None:
        """A pathlen:0 CA above ca-cert.pem is refused: workload certs would sit two CAs below it."""
        root = root_ca()
        mid = intermediate_ca(root, cn="Mid CA", path_length=0)
        ca = intermediate_ca(mid)
        refused("istio-ca", istio_ca_files(root, ca), "Mid CA", "pathlen:0")

    def test_chain_to_another_root_same_name(self, good: dict[str, bytes], other_root: CertKey) -> None:
        """A root-cert.pem whose root has the right name but another key is refused."""
        refused("istio-ca", {**good, "root-cert.pem": other_root.cert_pem}, "root-cert.pem", "does not chain")

    def test_signed_by_same_name_other_key(self, good: dict[str, bytes], inter: CertKey, other_root: CertKey) -> None:
        """With no root in the chain, a look-alike root in root-cert.pem is named as the wrong signer."""
        files = {**good, "cert-chain.pem": inter.cert_pem, "root-cert.pem": other_root.cert_pem}
        refused("istio-ca", files, "ca-cert.pem", "is not signed by root-cert.pem", "different key")

    def test_ed25519_key(self, good: dict[str, bytes]) -> None:
        """An Ed25519 key beside an EC certificate is refused: it is not that certificate's key (tls.X509KeyPair)."""
        key = ed25519.Ed25519PrivateKey.generate()
        pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
        refused("istio-ca", {**good, "ca-key.pem": pem}, "ca-key.pem does not match ca-cert.pem")

    def test_chain_to_unrelated_root(self, inter: CertKey) -> None:
        """A ca-cert.pem from a root that is neither in the chain nor in root-cert.pem is refused."""
        stranger = root_ca(cn="Stranger Root")
        files = istio_ca_files(stranger, inter)
        files["cert-chain.pem"] = inter.cert_pem
        refused("istio-ca", files, "ca-cert.pem", "root-cert.pem", "CN=Root CA")

    def test_eku_without_server_auth(self, root: CertKey) -> None:
        """An intermediate limited to clientAuth fails Go's default ServerAuth check, so istiod refuses it."""
        inter = intermediate_ca(root, extended_key_usage=[ExtendedKeyUsageOID.CLIENT_AUTH])
        refused("istio-ca", istio_ca_files(root, inter), "ca-cert.pem", "serverAuth")

    def test_mid_ca_eku_without_server_auth(self) -> None:
        """Go checks extendedKeyUsage on every certificate of the chain, so a clientAuth-only mid CA is refused."""
        root = root_ca()
        mid = intermediate_ca(root, cn="Mid CA", path_length=1, extended_key_usage=[ExtendedKeyUsageOID.CLIENT_AUTH])
        refused("istio-ca", istio_ca_files(root, intermediate_ca(mid)), "Mid CA", "serverAuth")

    def test_cert_chain_not_starting_with_ca_cert(self, good: dict[str, bytes], root: CertKey) -> None:
        """A cert-chain.pem holding only the root is refused although istiod loads it (verdict b): workloads would
        get no intermediate."""
        with pytest.raises(BundleError) as info:
            validate("istio-ca", {**good, "cert-chain.pem": root.cert_pem})
        assert info.value.istiod_loads and info.value.check == "chain-lacks-ca-cert"
        refused("istio-ca", {**good, "cert-chain.pem": root.cert_pem}, "cert-chain.pem must hold", "istiod would load")

    def test_cert_chain_not_ending_at_root(self, good: dict[str, bytes], inter: CertKey) -> None:
        """A cert-chain.pem without the root is accepted: istiod loads it and workloads get the root from
        root-cert.pem (istiod-correct since the oracle: corpus case ok-chain-without-root)."""
        assert validate("istio-ca", {**good, "cert-chain.pem": inter.cert_pem}).warnings == ()

    def test_cert_chain_ending_at_foreign_root(
        self, good: dict[str, bytes], inter: CertKey, other_root: CertKey
    ) -> None:
        """A cert-chain.pem that ends at a root missing from root-cert.pem is accepted with a warning: Go builds the
        path through root-cert.pem and ignores the extra root (corpus case chain-ends-at-foreign-root)."""
        files = {**good, "cert-chain.pem": pem_certs(inter.cert, other_root.cert)}
        (warning,) = validate("istio-ca", files).warnings
        assert "certificate 2 of 2 in cert-chain.pem" in warning and "not on ca-cert.pem's chain" in warning

    @pytest.mark.parametrize("name", ["ca-cert.pem", "cert-chain.pem", "root-cert.pem", "ca-key.pem"])
    def test_garbage(self, good: dict[str, bytes], name: str) -> None:
        """A file with no PEM in it is refused by name."""
        refused("istio-ca", {**good, name: b"not a pem file\n"}, f"{name} holds no PEM block")

    def test_corrupt_base64(self, good: dict[str, bytes]) -> None:
        """A PEM block whose body is damaged is refused."""
        damaged = good["ca-cert.pem"].replace(b"M", b"!", 3)
        refused("istio-ca", {**good, "ca-cert.pem": damaged}, "ca-cert.pem", "corrupt")

    def test_certificate_that_does_not_parse(self, good: dict[str, bytes]) -> None:
        """Valid base64 that is not a certificate is refused as such."""
        bogus = b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
        refused("istio-ca", {**good, "root-cert.pem": bogus}, "root-cert.pem", "not a valid X.509 certificate")

    def test_files_swapped(self, good: dict[str, bytes]) -> None:
        """Key and certificate swapped is refused naming both block types."""
        files = {**good, "ca-cert.pem": good["ca-key.pem"], "ca-key.pem": good["ca-cert.pem"]}
        refused("istio-ca", files, "ca-cert.pem", "PRIVATE KEY")

    def test_ec_parameters_first(self, good: dict[str, bytes], inter: CertKey) -> None:
        """`openssl ecparam -genkey` output (EC PARAMETERS first) is refused: istiod reads only the first block."""
        params = b"-----BEGIN EC PARAMETERS-----\nBggqhkjOPQMBBw==\n-----END EC PARAMETERS-----\n"
        files = {**good, "ca-key.pem": params + pem_key(inter.key, "traditional")}
        refused("istio-ca", files, "ca-key.pem", "EC PARAMETERS")

    def test_two_keys(self, good: dict[str, bytes]) -> None:
        """A key file with a second block is accepted with a warning: istiod reads only the first block (corpus
        case key-twice)."""
        (warning,) = validate("istio-ca", {**good, "ca-key.pem": good["ca-key.pem"] * 2}).warnings
        assert "ca-key.pem holds 2 PEM blocks" in warning

    @pytest.mark.parametrize("fmt", ["pkcs8", "traditional"])
    def test_encrypted_key(self, good: dict[str, bytes], inter: CertKey, fmt: str) -> None:
        """A passphrase-protected key (PKCS#8 or legacy Proc-Type) is refused: istiod cannot decrypt it."""
        files = {**good, "ca-key.pem": pem_key(inter.key, fmt, password=b"hunter22")}
        msg = refused("istio-ca", files, "ca-key.pem", "encrypted")
        assert "hunter22" not in msg

    @pytest.mark.parametrize("name", ISTIO_CA_FILES)
    def test_missing_file(self, good: dict[str, bytes], name: str) -> None:
        """Each of the four files is required, and the missing one is named."""
        files = {k: v for k, v in good.items() if k != name}
        refused("istio-ca", files, f"{name} is missing")

    @pytest.mark.parametrize("name", ISTIO_CA_FILES)
    def test_empty_file(self, good: dict[str, bytes], name: str) -> None:
        """An empty (or whitespace-only) file is refused by name."""
        refused("istio-ca", {**good, name: b"\n"}, f"{name} is empty")

    def test_missing_file_in_dir(self, tmp_path: Path, good: dict[str, bytes]) -> None:
        """validate_dir names the missing file and the directory."""
        pki.write_files(tmp_path, {k: v for k, v in good.items() if k != "root-cert.pem"})
        with pytest.raises(BundleError, match=r"root-cert\.pem is missing from"):
            validate_dir(tmp_path, "istio-ca")

    def test_unknown_kind(self, good: dict[str, bytes]) -> None:
        """An unknown bundle kind is a configuration error that lists the valid kinds."""
        with pytest.raises(ConfigError, match="istio-ca"):
            validate("pkcs12", good)


class TestTls:
    def test_good_with_intermediate(self, leaf: CertKey, root: CertKey, inter: CertKey) -> None:
        """A leaf plus its intermediate in tls.crt verifies to the root in ca.crt."""
        files = tls_files(leaf, root)
        assert files["tls.crt"].count(b"BEGIN CERTIFICATE") == 2
        info = validate("tls", files)
        assert info.kind == "tls"
        assert info.serial == format(leaf.cert.serial_number, "x")
        assert info.root_fingerprints == (root.cert.fingerprint(hashes.SHA256()).hex(),)
        assert info.expires_at == leaf.cert.not_valid_after_utc

    def test_rsa_leaf_from_root(self) -> None:
        """An RSA leaf signed directly by the CA in ca.crt passes."""
        ca = root_ca(key_type="rsa")
        validate("tls", tls_files(leaf_cert(ca, key_type="rsa"), ca))

    @pytest.mark.parametrize("ca_crt", [None, b"", b"\n"])
    def test_ca_optional(self, leaf: CertKey, other_root: CertKey, ca_crt: bytes | None) -> None:
        """Without a ca.crt (absent or empty) the chain is not checked, only key and dates."""
        files = tls_files(leaf, other_root)
        if ca_crt is None:
            del files["ca.crt"]
        else:
            files["ca.crt"] = ca_crt
        info = validate("tls", files)
        assert info.root_fingerprints == ()
        assert "ca.crt" not in info.not_after

    def test_key_mismatch(self, leaf: CertKey, root: CertKey, inter: CertKey) -> None:
        """A tls.key from another certificate is refused."""
        files = {**tls_files(leaf, root), "tls.key": leaf_cert(inter).key_pem}
        refused("tls", files, "tls.key does not match tls.crt")

    def test_wrong_ca(self, leaf: CertKey, other_root: CertKey) -> None:
        """A tls.crt that does not chain to ca.crt is refused."""
        refused("tls", tls_files(leaf, other_root), "tls.crt", "ca.crt")

    def test_expired_leaf(self, root: CertKey) -> None:
        """An expired tls.crt is refused."""
        leaf = leaf_cert(root, not_before=NOW - 10 * DAY, not_after=NOW - DAY)
        refused("tls", tls_files(leaf, root), "tls.crt", "expired")

    def test_not_yet_valid_leaf(self, root: CertKey) -> None:
        """A tls.crt from the future is refused."""
        leaf = leaf_cert(root, not_before=NOW + DAY)
        refused("tls", tls_files(leaf, root), "tls.crt", "not valid yet")

    @pytest.mark.parametrize("name", ["tls.key", "tls.crt"])
    def test_missing(self, leaf: CertKey, root: CertKey, name: str) -> None:
        """tls.key and tls.crt are required."""
        files = {k: v for k, v in tls_files(leaf, root).items() if k != name}
        refused("tls", files, f"{name} is missing")

    def test_validate_dir_without_ca(self, tmp_path: Path, leaf: CertKey, root: CertKey) -> None:
        """validate_dir accepts a tls directory that has no ca.crt file."""
        pki.write_files(tmp_path, {k: v for k, v in tls_files(leaf, root).items() if k != "ca.crt"})
        assert validate_dir(tmp_path, "tls").kind == "tls"
        assert set(TLS_FILES) - {p.name for p in tmp_path.iterdir()} == {"ca.crt"}


class TestCheckCommand:
    """`istio-vault-agent check DIR` names what is wrong with DIR itself before any file in it."""

    def test_a_directory_that_does_not_exist_is_named_as_such(self, tmp_path: Path) -> None:
        """`check nonexist` says the directory does not exist (not that ca-key.pem is missing from it)."""
        proc = subprocess.run(
            [sys.executable, "-m", "agent.cli", "check", "nonexist"], cwd=tmp_path, env=cli_env(),
            capture_output=True, text=True, timeout=60, check=False,
        )
        assert proc.returncode == 1
        assert error_line(proc) == "error: the directory nonexist does not exist."

    def test_a_file_is_not_a_directory(self, tmp_path: Path) -> None:
        """A file given as the directory is named as not a directory."""
        (tmp_path / "tls.crt").write_text("x")
        with pytest.raises(BundleError, match=r"tls\.crt is not a directory: give the directory a bundle is"):
            validate_dir(tmp_path / "tls.crt", "istio-ca")

    def test_a_tls_directory_checked_as_istio_ca_gets_the_type_hint(
        self, tmp_path: Path, leaf: CertKey, root: CertKey, good: dict[str, bytes]
    ) -> None:
        """A gateway's tls directory checked with the default type says it holds a tls bundle and how to check it;
        an istio-ca directory checked as tls gets the reverse hint."""
        pki.write_files(tmp_path / "tls", tls_files(leaf, root))
        with pytest.raises(BundleError) as caught:
            validate_dir(tmp_path / "tls", "istio-ca")
        assert str(caught.value) == (
            f"ca-key.pem is missing from {tmp_path / 'tls'}, which holds a tls bundle (tls.key, tls.crt): "
            "check it with --type tls."
        )
        pki.write_files(tmp_path / "ca", good)
        with pytest.raises(BundleError, match=r"tls\.key is missing from .*, which holds an istio-ca bundle .*: "
                                              r"check it with --type istio-ca\.$"):
            validate_dir(tmp_path / "ca", "tls")


def test_tls_with_an_unrelated_client_ca_when_ca_signs_cert_is_false():
    """A gateway in MUTUAL mode: ca.crt is the clients' CA, so it need not have signed tls.crt."""
    server_root = pki.root_ca()
    client_root = pki.root_ca(cn="Client CA")
    files = pki.tls_files(pki.leaf_cert(server_root), client_root)
    with pytest.raises(BundleError, match=r"ca\.crt"):
        validate("tls", files)
    info = validate("tls", files, ca_signs_cert=False)
    assert info.kind == "tls" and "ca.crt" in info.not_after


def test_check_refuses_a_fifo_instead_of_hanging(tmp_path):
    """`check` on a directory whose file is a FIFO says so instead of blocking on the read."""
    import os

    files = pki.istio_ca_files(pki.root_ca(), pki.intermediate_ca(pki.root_ca()))
    pki.write_files(tmp_path, files)
    (tmp_path / "ca-cert.pem").unlink()
    os.mkfifo(tmp_path / "ca-cert.pem")
    with pytest.raises(BundleError, match="not a regular file"):
        validate_dir(tmp_path, "istio-ca")


class TestRSAKeys:
    """RSA 4096 is Istio's default CA key: checked like Go's rsa.Validate, without OpenSSL's slow prime tests."""

    def test_inconsistent_rsa_key_is_refused(self):
        """A key whose private exponent does not fit its primes is refused, as istiod's parser would."""
        from cryptography.hazmat.primitives.asymmetric import rsa

        root = pki.root_ca()
        inter = pki.intermediate_ca(root, key_type="rsa")
        good = inter.key.private_numbers()
        broken = rsa.RSAPrivateNumbers(good.p, good.q, good.d + 2, good.dmp1, good.dmq1, good.iqmp,
                                       good.public_numbers).private_key(unsafe_skip_rsa_key_validation=True)
        bad_crt = rsa.RSAPrivateNumbers(good.p, good.q, good.d, good.dmp1 + 2, good.dmq1, good.iqmp,
                                        good.public_numbers).private_key(unsafe_skip_rsa_key_validation=True)
        for key in (broken, bad_crt):
            files = {**pki.istio_ca_files(root, inter), "ca-key.pem": pki.pem_key(key)}
            with pytest.raises(BundleError, match=r"ca-key\.pem holds an RSA key whose numbers are inconsistent"):
                validate("istio-ca", files)

    def test_rsa_4096_bundle_validates_quickly(self):
        """An RSA 4096 bundle validates in well under 0.2 s (OpenSSL's prime tests alone took about 0.4 s)."""
        import time

        root = pki.root_ca(key_type="rsa", bits=4096)
        files = pki.istio_ca_files(root, pki.intermediate_ca(root, key_type="rsa", bits=4096))
        validate("istio-ca", files)  # warm the imports
        start = time.perf_counter()
        validate("istio-ca", files)
        assert time.perf_counter() - start < 0.2
