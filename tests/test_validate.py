"""agent.validate beyond the corpus: the three verdicts in the API, the caps, hostile inputs refused quickly, Go's PEM
rules, the reload rules, and how external text is echoed."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

import agent.validate as v
from agent.errors import BundleError
from agent.text import shown
from agent.validate.pem import decode, decode_all
from testbed import corpus
from testbed import rawcert as rc

# Generous, so a loaded CI machine cannot flake them; bench/validate.py measures the real times.
FAST = 1.0


def _timed(kind: str, files: dict[str, bytes], limits: v.Limits | None = None) -> tuple[float, BundleError | None]:
    start = time.perf_counter()
    try:
        v.validate(kind, files, limits=limits)
        err = None
    except BundleError as exc:
        err = exc
    return time.perf_counter() - start, err


@pytest.fixture(name="hostile", scope="module")
def fixture_hostile() -> dict[str, tuple[str, dict[str, bytes]]]:
    return {name: (kind, files) for name, kind, files in corpus.hostile()}


@pytest.fixture(name="good", scope="module")
def fixture_good() -> dict[str, bytes]:
    return corpus.build({"ok-ec-p256"})[0].files


class TestVerdicts:
    def test_accepted_bundle_has_no_warnings(self, good: dict[str, bytes]) -> None:
        """Verdict ok: a Makefile-shaped bundle validates with no warnings."""
        info = v.validate("istio-ca", good)
        assert info.kind == "istio-ca" and info.warnings == ()

    def test_verdict_c_is_accepted_with_a_warning(self) -> None:
        """Verdict (c): istiod loads an unordered cert-chain.pem, so it is accepted, with one warning sentence."""
        (case,) = corpus.build({"chain-unordered"})
        (warning,) = v.validate("istio-ca", case.files).warnings
        assert "cert-chain.pem" in warning and warning.endswith(".") and "\n" not in warning

    def test_verdict_b_says_istiod_would_load_it(self) -> None:
        """Verdict (b): refused, flagged istiod_loads, with the check named and the reason in one sentence."""
        (case,) = corpus.build({"ku-no-certsign-ca"})
        with pytest.raises(BundleError) as info:
            v.validate("istio-ca", case.files)
        assert info.value.istiod_loads and info.value.check == "workload-key-cert-sign"
        assert "istiod would load it" in str(info.value) and "keyCertSign" in str(info.value)

    def test_verdict_a_names_the_go_check(self) -> None:
        """Verdict (a): refused, not flagged, naming the file and istiod's function."""
        (case,) = corpus.build({"cert-negative-serial-ca"})
        with pytest.raises(BundleError) as info:
            v.validate("istio-ca", case.files)
        assert not info.value.istiod_loads
        assert "ca-cert.pem" in str(info.value) and "negative serial number" in str(info.value)
        assert "keycertbundle.go Verify" in str(info.value)

    def test_duplicate_extension_is_a_clean_refusal(self, hostile: dict[str, tuple[str, dict[str, bytes]]]) -> None:
        """A repeated extension (cryptography's DuplicateExtension once escaped as an internal error) is refused."""
        kind, files = hostile["duplicate-extension"]
        _, err = _timed(kind, files)
        assert err is not None and "duplicate extension" in str(err)

    def test_public_api(self) -> None:
        """The names the orchestration imports, and the optional files per kind."""
        from agent import kinds

        assert set(v.__all__) >= {"validate", "validate_dir", "Limits", "BundleInfo", "ISTIO_CA_FILES", "TLS_FILES"}
        optional = {k.name: k.optional for k in kinds.FILE_KINDS.values()}
        assert optional == {"istio-ca": {"ca-crl.pem"}, "tls": {"ca.crt"}}
        assert {k.name: k.key_files for k in kinds.KINDS.values()} == {
            "istio-ca": {"ca-key.pem"}, "tls": {"tls.key"}, "remote-secret": set()}
        assert v.Limits().max_signature_checks == 100


class TestHostile:
    @pytest.mark.parametrize("name", ["cross-sign-loops", "fanout-over-budget"])
    def test_chain_building_has_go_budget(self, hostile: dict[str, tuple[str, dict[str, bytes]]], name: str) -> None:
        """Cross-signing loops and same-name decoys stop at Go's 100 signature checks: a quick clean refusal."""
        elapsed, err = _timed(*hostile[name])
        assert err is not None and "100 signature checks" in str(err), err
        assert elapsed < FAST

    @pytest.mark.parametrize("name", ["repeated-begin-280k", "repeated-end-280k", "repeated-begin-then-cert"])
    def test_pem_scan_is_linear(self, hostile: dict[str, tuple[str, dict[str, bytes]]], name: str) -> None:
        """280 KB of repeated BEGIN (or END) lines takes milliseconds (the old regex took 18 s)."""
        elapsed, _ = _timed(*hostile[name])
        assert elapsed < FAST

    @pytest.mark.parametrize("name", ["5000-cert-chain", "5000-cert-roots", "1mib-plus-one", "tls-5000-chain"])
    def test_over_the_size_cap(self, hostile: dict[str, tuple[str, dict[str, bytes]]], name: str) -> None:
        """A file over 1 MiB (a 5,000-certificate chain is) is refused unread, naming the file and the cap."""
        elapsed, err = _timed(*hostile[name])
        assert err is not None and "over the agent's limit" in str(err) and err.check == "limit-file-size"
        assert elapsed < FAST

    def test_5000_certificates_under_a_raised_size_cap(self, hostile: dict[str, tuple[str, dict[str, bytes]]]) -> None:
        """With max_file_bytes raised, a 5,000-certificate chain hits the 64-block cap after 65 blocks."""
        kind, files = hostile["5000-cert-chain"]
        elapsed, err = _timed(kind, files, v.Limits(max_file_bytes=8 << 20))
        assert err is not None and err.check == "limit-certs-per-file" and "cert-chain.pem" in str(err)
        assert elapsed < FAST

    def test_over_the_names_cap(self, hostile: dict[str, tuple[str, dict[str, bytes]]]) -> None:
        """3,000 name constraints in the root: refused, naming the file."""
        _, err = _timed(*hostile["huge-name-constraints"])
        assert err is not None and err.check == "limit-names" and "root-cert.pem" in str(err), err

    @pytest.mark.parametrize("name", ["1mib-file", "colon-lines", "huge-name-constraints", "64-distinct-roots"])
    def test_big_inputs_within_the_caps(self, hostile: dict[str, tuple[str, dict[str, bytes]]], name: str) -> None:
        """Inputs at the caps are judged quickly too."""
        elapsed, _ = _timed(*hostile[name])
        assert elapsed < FAST

    def test_limits_are_configurable(self, good: dict[str, bytes]) -> None:
        """A smaller cap refuses what the default accepts."""
        with pytest.raises(BundleError, match=r"Limits\.max_certs_per_file"):
            v.validate("istio-ca", good, limits=v.Limits(max_certs_per_file=1))

    def test_validate_dir_reads_at_most_the_cap(self, tmp_path: Path, good: dict[str, bytes]) -> None:
        """validate_dir reads max_file_bytes + 1 bytes of a huge file, then refuses it."""
        for name, data in good.items():
            (tmp_path / name).write_bytes(data)
        (tmp_path / "root-cert.pem").write_bytes(b"x" * (64 << 20))
        start = time.perf_counter()
        with pytest.raises(BundleError, match=r"root-cert\.pem is 1048577 bytes"):
            v.validate_dir(tmp_path, "istio-ca")
        assert time.perf_counter() - start < FAST


class TestGoPem:
    """encoding/pem Decode's rules, as read in Go 1.27's pem.go."""

    BODY = b"AAEC\n"

    def test_begin_must_start_a_line(self) -> None:
        """An indented BEGIN line is not a block."""
        assert decode(b"  -----BEGIN X-----\nAAEC\n-----END X-----\n")[0] is None

    def test_trailing_spaces_and_crlf(self) -> None:
        """Spaces and tabs after BEGIN, body and END lines are ignored, and so are CRs."""
        block, _ = decode(b"-----BEGIN X----- \t\r\nAA EC\t\r\n-----END X-----  \r\n")
        assert block is not None and block.der == b"\x00\x01\x02"

    def test_last_begin_before_the_first_end(self) -> None:
        """Repeated BEGIN lines: the block starts at the last BEGIN before the first END."""
        block, _ = decode(b"-----BEGIN A-----\n-----BEGIN B-----\nAAEC\n-----END B-----\n")
        assert block is not None and block.type == "B"

    def test_end_must_end_its_line(self) -> None:
        """An END line followed by the next BEGIN on the same line is no block, and hides the next one too."""
        data = b"-----BEGIN X-----\nAAEC\n-----END X----------BEGIN X-----\nAAEC\n-----END X-----\n"
        assert decode_all(data, limit=10) == []

    def test_headers(self) -> None:
        """Key: value lines before the body are headers."""
        block, _ = decode(b"-----BEGIN X-----\nProc-Type: 4,ENCRYPTED\n\nAAEC\n-----END X-----\n")
        assert block is not None and block.headers == {b"Proc-Type": b"4,ENCRYPTED"}

    @pytest.mark.parametrize("body", [b"AAE", b"AAE=C", b"A===", b"AAEC=", b"AA!C"])
    def test_strict_base64(self, body: bytes) -> None:
        """Go's StdEncoding: padding required, nothing after it, only the base64 alphabet."""
        assert decode(b"-----BEGIN X-----\n" + body + b"\n-----END X-----\n")[0] is None

    def test_no_final_newline(self) -> None:
        """The END line may end the file."""
        block, rest = decode(b"-----BEGIN X-----\nAAEC\n-----END X-----")
        assert block is not None and rest == len(b"-----BEGIN X-----\nAAEC\n-----END X-----")


class TestReload:
    def test_same_root_reloads(self, good: dict[str, bytes]) -> None:
        """An intermediate rotation with a byte-identical root-cert.pem is loaded by handleEvent."""
        assert v.reload_problem(good, good, multiroot=False) is None

    def test_root_change_without_multiroot(self, good: dict[str, bytes]) -> None:
        """A changed root-cert.pem without ISTIO_MULTIROOT_MESH abandons the reload."""
        other = corpus.build({"ok-multi-root"})[0].files
        assert "Multi root is disabled" in (v.reload_problem(good, other, multiroot=False) or "")

    def test_root_change_with_multiroot_needs_a_subset(self, good: dict[str, bytes]) -> None:
        """With multiroot, adding a root (A -> A+B) reloads; replacing it by an unrelated set does not."""
        old_root = good["root-cert.pem"]
        added = {**good, "root-cert.pem": old_root + rc.cert(rc.name(("CN", "B")), corpus.k()).pem}
        replaced = {**good, "root-cert.pem": rc.cert(rc.name(("CN", "C")), corpus.k()).pem}
        assert v.reload_problem(good, added, multiroot=True) is None
        assert "not supported" in (v.reload_problem(good, replaced, multiroot=True) or "")


class TestEcho:
    def test_control_characters_are_escaped(self) -> None:
        """Subject names and labels are echoed with control bytes as \\xNN."""
        assert shown("CN=a\x1b[31mb\n") == "CN=a\\x1b[31mb\\x0a"
        assert shown(b"CN=\xff\x00") == "CN=\\xff\\x00"
        assert shown("lone \ud800 surrogate\u202e") == "lone \\ud800 surrogate\\u202e"

    def test_long_text_is_cut_with_a_marker(self) -> None:
        """Over 200 characters, the text is cut and marked."""
        out = shown("x" * 500)
        assert out == "x" * 200 + "...[+300]"

    def test_a_hostile_subject_stays_in_one_line(self) -> None:
        """A CN full of newlines and escape sequences cannot break the one-line error."""
        r = corpus.root()
        evil = rc.cert(rc.name(("O", "Istio"), ("CN", "x\n\x1b[2Jerror: fake" + "y" * 400)), corpus.k(), r,
                       pathlen=0, not_before=rc.NOW - 400 * rc.DAY, not_after=rc.NOW - rc.DAY)
        with pytest.raises(BundleError) as info:
            v.validate("istio-ca", corpus.files(evil))
        msg = str(info.value)
        assert "\n" not in msg and "\x1b" not in msg and len(msg) < 400, msg


def test_bench_validate_smoke(tmp_path: Path) -> None:
    """`python -m bench.validate` runs and reports the typical bundle and every hostile input."""
    from bench import validate as bench_validate

    assert bench_validate.main(["--runs", "1", "--no-corpus", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "validate.md").read_text()
    assert "rsa-4096-makefile-bundle" in text and "cross-sign-loops" in text
