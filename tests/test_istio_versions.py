"""Version-aware verdicts (docs/istio-versions.md): the table in agent/istio_version.py, each check before and after
the version that changed it, the FIPS 140-only limits and 1.29's reload rule against Go (tests/oracle run with
GODEBUG=fips140=only, and its reload path), the config section, `check`'s flags, and the agent's one log line."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from agent import config as agent_config
from agent.errors import BundleError, ConfigError
from agent.istio_version import (
    COMPLIANCE_POLICIES,
    FIPS_CHECK,
    RELOAD_RULE,
    THREE_LEVEL,
    ZTUNNEL_ROOTS,
    Mesh,
    Version,
    fips_applies,
    parse_version,
    plan,
    reload_rule,
    skipped,
    three_level_broken,
    ztunnel_roots,
)
from agent.validate import reload_problem, validate, validate_dir
from testbed import corpus as c
from testbed import rawcert as rc
from tests.support import AgentProc, cli_env, error_line, run_cli, write_config


def _v(text: str) -> Version:
    return parse_version(text)


def _ambient(version: str) -> Mesh:
    return Mesh(_v(version), ambient=True)


FIPS = Mesh(_v("1.31.0"), compliance_policy="fips-140-3")


def _verdict(files: dict[str, bytes], mesh: Mesh | None) -> str:
    """"ok", "a" or "b:<check>" for `files` under `mesh`."""
    try:
        validate("istio-ca", files, mesh=mesh)
    except BundleError as exc:
        return f"b:{exc.check}" if exc.istiod_loads else "a"
    return "ok"


def _warnings(files: dict[str, bytes], mesh: Mesh | None) -> tuple[str, ...]:
    return validate("istio-ca", files, mesh=mesh).warnings


# ------------------------------------------------------------------------------------------------- the table


class TestTable:
    @pytest.mark.parametrize(("text", "want"), [
        ("1.29", Version(1, 29, 0)), ("1.29.6", Version(1, 29, 6)), ("v1.30.3", Version(1, 30, 3)),
        (" 1.31.0 ", Version(1, 31, 0)),
    ])
    def test_versions_parse(self, text: str, want: Version) -> None:
        """MAJOR.MINOR[.PATCH], a leading v allowed; without a patch, the first patch."""
        assert parse_version(text) == want

    @pytest.mark.parametrize("text", ["1", "1.x", "2.0", "1.29.6-distroless", "latest", "", "1.2.3.4",
                                      "1.30.0-rc.1", "1.30.0+build", "01.030", "1.030", "1.29.06", "1.1000",
                                      "1.\uff13\uff10", "\u0661.\u0662\u0669"])
    def test_bad_versions_say_the_form(self, text: str) -> None:
        """Anything else is one sentence naming the expected form: pre-releases and build metadata, leading
        zeros (01.030 is not obviously 1.30, and 1.03 would be 1.3), more than three digits (the chart refuses
        them too) and digits other than ASCII ones (fullwidth, Arabic-Indic: Python's \\d takes them)."""
        with pytest.raises(ValueError, match=r"MAJOR\.MINOR\[\.PATCH\]") as err:
            parse_version(text)
        assert "\n" not in str(err.value)

    @pytest.mark.parametrize(("version", "broken"), [
        ("1.23.9", True), ("1.24", True), ("1.24.3", True), ("1.24.4", False), ("1.24.6", False),
        ("1.25.0", True), ("1.25.1", False), ("1.26.0", False), ("1.31.0", False),
    ])
    def test_three_level_fix_versions(self, version: str, broken: bool) -> None:
        """ztunnel#1061's fix: istiod answers one certificate per element from 1.24.4 and 1.25.1 (#55383/#55384)."""
        assert three_level_broken(_v(version)) is broken

    @pytest.mark.parametrize(("version", "mode"), [
        ("1.23.5", "first"), ("1.24.3", "first"), ("1.24.4", "last"), ("1.24.5", "first"), ("1.24.6", "all"),
        ("1.25.0", "first"), ("1.25.1", "last"), ("1.25.2", "first"), ("1.25.3", "all"), ("1.26.0", "all"),
        ("1.30", "all"),
    ])
    def test_roots_ztunnel_trusts(self, version: str, mode: str) -> None:
        """Which roots of root-cert.pem ztunnel trusts, release by release."""
        assert ztunnel_roots(_v(version)) == mode

    @pytest.mark.parametrize(("version", "rule"), [
        (None, "der-sets"), ("1.28.9", "bytes"), ("1.29", "bytes"), ("1.29.6", "bytes"), ("1.30.0", "der-sets"),
        ("1.31", "der-sets"),
    ])
    def test_reload_rule(self, version: str | None, rule: str) -> None:
        """istiod compares root-cert.pem's bytes up to 1.29 and DER sets from 1.30.0; unknown keeps 1.30's."""
        assert reload_rule(_v(version) if version else None) == rule

    @pytest.mark.parametrize(("mesh", "on", "skip"), [
        (Mesh(), set(), {RELOAD_RULE}),
        (Mesh(ambient=True), set(), {THREE_LEVEL, ZTUNNEL_ROOTS, RELOAD_RULE}),
        (Mesh(compliance_policy="fips-140-3"), {FIPS_CHECK}, {RELOAD_RULE}),
        (Mesh(_v("1.24.3"), ambient=True), {THREE_LEVEL, ZTUNNEL_ROOTS, RELOAD_RULE}, set()),
        (Mesh(_v("1.24.4"), ambient=True), {ZTUNNEL_ROOTS, RELOAD_RULE}, set()),
        (Mesh(_v("1.24.3")), {RELOAD_RULE}, set()),
        (Mesh(_v("1.30.3"), compliance_policy="fips-140-3"), {RELOAD_RULE}, set()),
        (Mesh(_v("1.31.0"), compliance_policy="fips-140-3"), {FIPS_CHECK, RELOAD_RULE}, set()),
        (Mesh(_v("1.31.0"), compliance_policy="fips-140-2"), {RELOAD_RULE}, set()),
    ])
    def test_plan(self, mesh: Mesh, on: set[str], skip: set[str]) -> None:
        """Which checks a mesh turns on, and which an unknown version skips (what the log line names)."""
        decisions = plan(mesh)
        assert [d.check for d in decisions] == [THREE_LEVEL, ZTUNNEL_ROOTS, FIPS_CHECK, RELOAD_RULE]
        assert {d.check for d in decisions if d.on} == on
        assert set(skipped(mesh)) == skip
        assert all(d.why for d in decisions)

    def test_fips_policy_needs_1_31(self) -> None:
        """fips-140-3 exists from istiod 1.31 (#59847); an unknown version takes the policy's word for it."""
        assert not fips_applies(Mesh(_v("1.30.3"), compliance_policy="fips-140-3"))
        assert fips_applies(Mesh(_v("1.31"), compliance_policy="fips-140-3"))
        assert fips_applies(Mesh(compliance_policy="fips-140-3"))


# ------------------------------------------------------------------------------------------------- ztunnel


def _three_level() -> dict[str, bytes]:
    mid = c.inter(c.root(), "Mid CA", pathlen=1)
    return c.files(c.inter(mid))


class TestThreeLevelChain:
    @pytest.mark.parametrize(("version", "want"), [
        ("1.24.3", f"b:{THREE_LEVEL}"), ("1.24.4", "ok"), ("1.25.0", f"b:{THREE_LEVEL}"), ("1.25.1", "ok"),
        ("1.26.0", "ok"),
    ])
    def test_refused_on_ambient_before_the_fix(self, version: str, want: str) -> None:
        """root -> mid -> ca-cert.pem: ambient workloads on ztunnel before 1.24.4/1.25.1 cannot verify each other."""
        assert _verdict(_three_level(), _ambient(version)) == want

    def test_sidecars_and_unknown_versions_keep_todays_verdict(self) -> None:
        """Without ambient, or without a version, the same bundle is accepted as before."""
        files = _three_level()
        assert _verdict(files, Mesh(_v("1.24.3"))) == "ok"
        assert _verdict(files, Mesh(ambient=True)) == "ok"
        assert _verdict(files, None) == "ok"

    def test_two_levels_pass_on_old_ztunnel(self) -> None:
        """root -> ca-cert.pem is what old ztunnel can send: accepted on 1.24.3."""
        assert _verdict(c.files(c.inter(c.root())), _ambient("1.24.3")) == "ok"

    def test_the_refusal_says_why_and_what_to_do(self) -> None:
        """One sentence: the issue, the fixed versions and the way out."""
        with pytest.raises(BundleError) as err:
            validate("istio-ca", _three_level(), mesh=_ambient("1.24.3"))
        text = str(err.value)
        assert "ztunnel 1.24.3" in text and "1.24.4 and 1.25.1" in text and "upgrade" in text
        assert "Mid CA" in text and "\n" not in text


def _two_roots(anchor_first: bool) -> dict[str, bytes]:
    a = c.root("Root A")
    ca = c.inter(a)
    b = c.root("Root B")
    return c.files(ca, roots=[a, b] if anchor_first else [b, a])


class TestZtunnelRoots:
    @pytest.mark.parametrize(("version", "anchor_first", "want"), [
        ("1.24.3", True, "ok"), ("1.24.3", False, f"b:{ZTUNNEL_ROOTS}"),
        ("1.24.4", True, f"b:{ZTUNNEL_ROOTS}"), ("1.24.4", False, "ok"),
        ("1.24.5", False, f"b:{ZTUNNEL_ROOTS}"), ("1.24.6", False, "ok"), ("1.24.6", True, "ok"),
        ("1.25.2", False, f"b:{ZTUNNEL_ROOTS}"), ("1.25.3", False, "ok"), ("1.26.0", False, "ok"),
    ])
    def test_the_anchor_must_be_a_root_ztunnel_trusts(self, version: str, anchor_first: bool, want: str) -> None:
        """Two roots (a rotation's trust phase): refused when ca-cert.pem chains to the root that ztunnel of that
        version leaves out; without ambient both orders pass."""
        files = _two_roots(anchor_first)
        assert _verdict(files, _ambient(version)) == want
        assert _verdict(files, Mesh(_v(version))) == "ok"

    def test_a_root_left_out_is_a_warning(self) -> None:
        """The anchor trusted, the other root not: a warning naming it and the versions that trust every root."""
        warnings = [w for w in _warnings(_two_roots(True), _ambient("1.24.3")) if "ztunnel" in w]
        assert len(warnings) == 1 and "Root B" in warnings[0] and "1.24.6" in warnings[0]
        assert not [w for w in _warnings(_two_roots(True), _ambient("1.26.0")) if "ztunnel" in w]

    def test_every_root_must_parse_not_just_the_first(self) -> None:
        """From 1.24.6/1.25.3/1.26 ztunnel parses every PEM item of root-cert.pem: a CRL block after the roots
        leaves ambient workloads without certificates, as on 1.24.4, which takes the last block for the root;
        1.24.3, reading only the first root, is not hurt."""
        r = c.root()
        files = c.files(c.inter(r))
        crl = rc.crl(r, [])
        files["root-cert.pem"] += crl.pem
        assert _verdict(files, _ambient("1.26.0")) == f"b:{ZTUNNEL_ROOTS}"
        assert _verdict(files, _ambient("1.24.4")) == f"b:{ZTUNNEL_ROOTS}"  # the last block is its root
        assert _verdict(files, _ambient("1.24.3")) == "ok"
        assert _verdict(files, None) == "ok"

    def test_every_block_of_root_cert_is_a_certificate_on_1_24_4(self) -> None:
        """1.24.4 and 1.25.1 send each PEM block of root-cert.pem as its own element (PemCertBytestoString) and
        that ztunnel parses every element as a certificate (WorkloadCertificate::new, parse_cert): a CRL block
        between the roots leaves ambient workloads without certificates, though the last block is the anchor."""
        a, b = c.root("Root A"), c.root("Root B")
        files = c.files(c.inter(a), roots=[b, a])
        files["root-cert.pem"] = b.pem + rc.crl(b, []).pem + a.pem
        assert _verdict(files, None) == "ok"
        assert _verdict(files, _ambient("1.24.4")) == f"b:{ZTUNNEL_ROOTS}"
        assert _verdict(files, _ambient("1.25.1")) == f"b:{ZTUNNEL_ROOTS}"
        with pytest.raises(BundleError, match="X509 CRL"):
            validate("istio-ca", files, mesh=_ambient("1.24.4"))

    def test_every_block_of_cert_chain_is_a_certificate_from_1_24_4(self) -> None:
        """From 1.24.4 and 1.25.1 istiod sends each PEM block of cert-chain.pem as its own element, and ztunnel
        parses each as a certificate: a CRL block in cert-chain.pem, which istiod itself skips, leaves ambient
        workloads without certificates; before (one element, its first certificate read) it does not matter."""
        r = c.root()
        files = c.files(c.inter(r))
        files["cert-chain.pem"] += rc.crl(r, []).pem
        assert _verdict(files, None) == "ok"
        for version in ("1.24.4", "1.24.6", "1.25.2", "1.26.0", "1.30.3"):
            assert _verdict(files, _ambient(version)) == f"b:{ZTUNNEL_ROOTS}", version
        assert _verdict(files, _ambient("1.24.3")) == "ok"
        assert _verdict(files, Mesh(_v("1.26.0"))) == "ok"

    def test_a_root_webpki_drops(self) -> None:
        """A v2 root Go trusts but webpki does not take as an anchor: dropped silently by ztunnel, so a warning
        when it is an extra root and a refusal when ca-cert.pem chains to it."""
        v2 = rc.cert(rc.name(("O", "Istio"), ("CN", "V2 Root")), c.k(), version=1)
        good = c.root("Root A")
        extra = c.files(c.inter(good), roots=[good, v2])
        assert _verdict(extra, _ambient("1.26.0")) == "ok"
        assert any("V2 Root" in w and "version 2" in w for w in _warnings(extra, _ambient("1.26.0")))
        anchored = c.files(c.inter(v2), roots=[good, v2])
        assert _verdict(anchored, None) == "ok"  # Go and the Envoy model accept a v2 anchor
        assert _verdict(anchored, _ambient("1.26.0")) == f"b:{ZTUNNEL_ROOTS}"
        # older ztunnel reads one root and hands it to the same add_parsable_certificates (certificate.rs)
        alone = c.files(c.inter(v2), roots=[v2])
        assert _verdict(alone, None) == "ok"
        for version in ("1.24.3", "1.24.4", "1.25.2"):
            assert _verdict(alone, _ambient(version)) == f"b:{ZTUNNEL_ROOTS}", version


# ------------------------------------------------------------------------------------------------- FIPS 140-3


def _odd_size_key() -> rsa.RSAPrivateKey:
    """A 2049-bit RSA key, from a 1025-bit and a 1024-bit prime of keys OpenSSL made (fast)."""
    while True:
        p = rsa.generate_private_key(65537, 2050).private_numbers().p
        q = rsa.generate_private_key(65537, 2048).private_numbers().q
        if (p * q).bit_length() == 2049:
            return rc.rsa_key_from_primes(p, q)


def _fips_cases() -> dict[str, dict[str, bytes]]:
    """Bundles each refused by one rule of Go's FIPS 140-only mode, and two it takes."""
    unequal = rc.rsa_key_from_primes(rc._prime(1000, 65537), rc._prime(1048, 65537))
    return {
        "fips-rsa1536-ca-key": c.files(c.inter(c.root(), key=rsa.generate_private_key(65537, 1536))),
        "fips-rsa1536-root": c.files(c.inter(c.root(key=rsa.generate_private_key(65537, 1536)))),
        "fips-e3-root": c.files(c.inter(c.root(key=rsa.generate_private_key(3, 2048)))),
        "fips-e3-ca-key": c.files(c.inter(c.root(), key=rsa.generate_private_key(3, 2048))),
        "fips-odd-size-root": c.files(c.inter(c.root(key=_odd_size_key()))),
        "fips-unequal-primes-ca-key": c.files(c.inter(c.root(), key=unequal)),
        "fips-p224-ca": c.files(c.inter(c.root(), key=ec.generate_private_key(ec.SECP224R1()))),
        "fips-ok-rsa2048": c.files(c.inter(c.root(key=c.rsa_key(2048)), key=c.rsa_key(2048))),
        "fips-ok-p384": c.files(c.inter(c.root(key=c.k(ec.SECP384R1())))),
    }


@pytest.fixture(name="fips_cases", scope="module")
def fixture_fips_cases() -> dict[str, dict[str, bytes]]:
    return _fips_cases()


class TestFips:
    @pytest.mark.parametrize(("name", "want"), [
        ("fips-rsa1536-ca-key", "a"), ("fips-rsa1536-root", "a"), ("fips-e3-root", "a"), ("fips-e3-ca-key", "a"),
        ("fips-odd-size-root", "a"), ("fips-unequal-primes-ca-key", "a"), ("fips-p224-ca", f"b:{FIPS_CHECK}"),
        ("fips-ok-rsa2048", "ok"), ("fips-ok-p384", "ok"),
    ])
    def test_limits(self, fips_cases: dict[str, dict[str, bytes]], name: str, want: str) -> None:
        """Under fips-140-3 each limit refuses its bundle; without the policy, or on istiod 1.30, all pass."""
        files = fips_cases[name]
        assert _verdict(files, FIPS) == want
        assert _verdict(files, None) == "ok"
        assert _verdict(files, Mesh(_v("1.30.3"), compliance_policy="fips-140-3")) == "ok"

    def test_refusal_quotes_go(self, fips_cases: dict[str, dict[str, bytes]]) -> None:
        """The sentence names the file and carries Go's own error."""
        with pytest.raises(BundleError) as err:
            validate("istio-ca", fips_cases["fips-e3-root"], mesh=FIPS)
        assert "root-cert.pem" in str(err.value) and "public exponent" in str(err.value)
        assert "fips140=only" in str(err.value)


def _oracle(oracle: Path, dirs: list[Path], *, fips: bool) -> list[dict[str, Any]]:
    env = {k: v for k, v in os.environ.items() if k != "GODEBUG"}
    if fips:
        env["GODEBUG"] = "fips140=only"
    req = [{"dir": str(d), "kind": "istio-ca", "ca_signs_cert": True} for d in dirs]
    proc = subprocess.run([str(oracle)], input=json.dumps(req), capture_output=True, text=True, timeout=300,
                          check=True, env=env)
    out: list[dict[str, Any]] = json.loads(proc.stdout)
    return out


def _dir_verdict(d: Path, mesh: Mesh | None) -> str:
    try:
        validate_dir(d, "istio-ca", mesh=mesh)
    except BundleError as exc:
        return f"b:{exc.check}" if exc.istiod_loads else "a"
    return "ok"


@pytest.mark.timeout(300)
def test_fips_refuses_what_go_fips_only_refuses(oracle: Path, fips_cases: dict[str, dict[str, bytes]],
                                                 tmp_path: Path) -> None:
    """Every istio-ca bundle of the corpus and the FIPS cases through istiod's startup in Go, once as it runs and
    once with GODEBUG=fips140=only: the bundles only FIPS mode refuses are exactly those the agent refuses only
    under compliance_policy fips-140-3; its verdict-(b) FIPS refusals are bundles FIPS istiod loads."""
    built = {x.name: x.files for x in c.build() if x.kind == "istio-ca"} | fips_cases
    dirs = []
    for name, files in built.items():
        d = tmp_path / name
        d.mkdir()
        for fname, data in files.items():
            (d / fname).write_bytes(data)
        dirs.append(d)
    plain, fips = _oracle(oracle, dirs, fips=False), _oracle(oracle, dirs, fips=True)
    go_fips_only, agent_fips_only, b_refused = set(), set(), []
    for d, p, f in zip(dirs, plain, fips, strict=True):
        if p["startup"]["ok"] and not f["startup"]["ok"]:
            go_fips_only.add(d.name)
        before, after = _dir_verdict(d, None), _dir_verdict(d, FIPS)
        if before != "a" and after == "a":
            agent_fips_only.add(d.name)
        if after == f"b:{FIPS_CHECK}":
            b_refused.append((d.name, f["startup"]["ok"]))
    assert go_fips_only == agent_fips_only
    assert {n for n in fips_cases if n.startswith("fips-") and "ok" not in n and "p224" not in n} <= go_fips_only
    assert b_refused and all(loads for _, loads in b_refused), b_refused


# ------------------------------------------------------------------------------------------------- reload rule


class TestReloadRule:
    @staticmethod
    def _rotation() -> tuple[dict[str, bytes], dict[str, dict[str, bytes]]]:
        """istiod holds roots A then B (a rotation's trust phase); the next root-cert.pem, five ways."""
        a, b, n = c.root("Root A"), c.root("Root B"), c.root("Root N")
        ca = c.inter(a)
        before = c.files(ca, roots=[a, b])
        return before, {
            "append": c.files(ca, roots=[a, b, n]),
            "retire": c.files(ca, roots=[a]),
            "reorder": c.files(ca, roots=[b, a]),
            "crlf": {**before, "root-cert.pem": before["root-cert.pem"].replace(b"\n", b"\r\n")},
            "unrelated": c.files(ca, roots=[a, n]),
        }

    @pytest.mark.parametrize(("new", "version", "taken"), [
        ("append", "1.29.6", True), ("append", "1.30.3", True), ("append", None, True),
        ("retire", "1.29.6", True), ("retire", "1.30.3", True),
        ("reorder", "1.29.6", False), ("reorder", "1.30.3", True), ("reorder", None, True),
        ("crlf", "1.29", False), ("crlf", "1.30.0", True),
        ("unrelated", "1.29.6", False), ("unrelated", "1.30.3", False),
    ])
    def test_each_version_uses_its_rule(self, new: str, version: str | None, taken: bool) -> None:
        """istiod <= 1.29 needs one file's bytes inside the other's; 1.30 compares sets of certificates; an unknown
        version gets 1.30's rule, the agent's verdict before it knew versions."""
        before, after = self._rotation()
        problem = reload_problem(before, after[new], multiroot=True, version=_v(version) if version else None)
        assert (problem is None) is taken, problem

    def test_agrees_with_istiods_reload(self, oracle: Path, tmp_path: Path) -> None:
        """The same rotations through the oracle's reload path (istio_ca.go handleEvent at 1.29.6 and 1.30.3)."""
        before, after = self._rotation()
        current = tmp_path / "current-root.pem"
        current.write_bytes(before["root-cert.pem"])
        for new, files in after.items():
            d = tmp_path / new
            d.mkdir()
            for fname, data in files.items():
                (d / fname).write_bytes(data)
            for rule, version in (("1.29", "1.29.6"), ("1.30", "1.30.3")):
                proc = subprocess.run([str(oracle), "-path", "reload", "-current-root", str(current), "-rule", rule,
                                       "-multiroot", str(d)], capture_output=True, text=True, timeout=60, check=True)
                istiod = json.loads(proc.stdout)["reload"]["ok"]
                ours = reload_problem(before, files, multiroot=True, version=_v(version)) is None
                assert ours == istiod, (new, rule)


# ------------------------------------------------------------------------------------------------- config and CLI


_BASE = {"vault": {"address": "http://127.0.0.1:8200"}, "auth": {"method": "token"},
         "bundles": [{"name": "a", "type": "istio-ca", "dir": "/tmp/x", "source": {"kv": "kv/a"}}]}


class TestConfig:
    def test_istio_section(self) -> None:
        """istio.version, istio.ambient and istio.compliance_policy reach the mesh the checks read."""
        cfg = agent_config.from_mapping(
            {**_BASE, "istio": {"version": "1.24.3", "ambient": True, "compliance_policy": "fips-140-3"}}, env={})
        assert cfg.istio.mesh == Mesh(Version(1, 24, 3), ambient=True, compliance_policy="fips-140-3")
        assert agent_config.from_mapping(dict(_BASE), env={}).istio.mesh == Mesh()

    @pytest.mark.parametrize(("istio", "message"), [
        ({"version": 1.30}, "istio.version must be quoted"),
        ({"version": "1.x"}, "istio.version: expected an Istio version such as 1.29"),
        ({"compliance_policy": "fips"}, "istio.compliance_policy must be one of fips-140-2, fips-140-3, pqc"),
        ({"ambiant": True}, "unknown key istio.ambiant"),
        ({"ambient": "yes"}, "istio.ambient"),
    ])
    def test_bad_values_are_one_sentence(self, istio: dict[str, Any], message: str) -> None:
        """Each mistake is one line naming the key."""
        with pytest.raises(ConfigError) as err:
            agent_config.from_mapping({**_BASE, "istio": istio}, env={})
        assert message in str(err.value) and "\n" not in str(err.value)


def _write(d: Path, files: dict[str, bytes]) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (d / name).write_bytes(data)
    return d


class TestCheckCommand:
    def test_flags_turn_checks_on_and_say_which(self, tmp_path: Path) -> None:
        """`check --istio-version 1.24.3 --ambient` refuses a three-level chain and lists each check it changed;
        with 1.26.0 the same directory passes; without flags the output is today's one line."""
        d = _write(tmp_path / "b", _three_level())
        old = run_cli("check", str(d), "--istio-version", "1.24.3", "--ambient")
        assert old.returncode == 1
        assert f"check {THREE_LEVEL}: on (ztunnel 1.24.3 sends only the first certificate" in old.stdout
        assert f"check {FIPS_CHECK}: off (compliance policy none)" in old.stdout
        assert "ztunnel-three-level-chain" in error_line(old)
        new = run_cli("check", str(d), "--istio-version", "1.26.0", "--ambient")
        assert new.returncode == 0, new.stderr
        assert f"check {THREE_LEVEL}: off" in new.stdout and f"check {ZTUNNEL_ROOTS}: on" in new.stdout
        # check reads one directory and never sees a root change: it must not claim the reload rule ran
        assert f"check {RELOAD_RULE}: not run by check (istiod 1.26.0 compares root-cert.pem byte" in new.stdout
        plain = run_cli("check", str(d))
        assert plain.returncode == 0 and plain.stdout.count("\n") == 1 and plain.stdout.startswith("ok: ")

    def test_flags_on_a_tls_bundle_say_they_change_nothing(self, tmp_path: Path) -> None:
        """The version-aware checks are istio-ca checks: a tls bundle gets a note and today's verdict."""
        (case,) = c.build({"tls-ok"})
        proc = run_cli("check", str(_write(tmp_path / "tls", case.files)), "--type", "tls", "--ambient")
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith("note: --istio-version, --ambient and --compliance-policy change no check")

    def test_bad_version_is_a_usage_error(self, tmp_path: Path) -> None:
        """A version that does not parse: exit 2 with the expected form."""
        proc = run_cli("check", str(tmp_path), "--istio-version", "1.x")
        assert proc.returncode == 2 and "MAJOR.MINOR[.PATCH]" in proc.stderr


class TestChart:
    @staticmethod
    def _istio(values: dict[str, Any]) -> Any:
        pytest.importorskip("helm_python", reason="helm-python-sdk (the [test] extra) renders the chart")
        import yaml

        from tests.test_chart import CHART, find, render

        objects, _ = render(CHART, values)
        return yaml.safe_load(find(objects, "ConfigMap")["data"]["config.yaml"]).get("istio")

    def test_values_reach_the_config(self) -> None:
        """istio.version, ambient and compliancePolicy become the agent's istio: section, which it loads."""
        istio = self._istio({"istio": {"version": "1.29.6", "ambient": True, "compliancePolicy": "fips-140-3"},
                             "global": {"tag": "1.30.3"}})  # an explicit version wins over the tag
        assert istio == {"version": "1.29.6", "ambient": True, "compliance_policy": "fips-140-3"}
        cfg = agent_config.from_mapping({**_BASE, "istio": istio}, env={})
        assert cfg.istio.mesh == Mesh(Version(1, 29, 6), ambient=True, compliance_policy="fips-140-3")

    def test_version_defaults_from_a_release_tag(self) -> None:
        """Without istio.version the chart takes global.tag when it is a release (a variant suffix dropped);
        a tag like latest, or no tag, leaves the version unknown and the section out (today's config)."""
        assert self._istio({"global": {"tag": "1.30.3-distroless"}}) == {"version": "1.30.3"}
        assert self._istio({"global": {"tag": "latest"}}) is None
        assert self._istio({"global": {"tag": "1.1000"}}) is None  # not a version the agent would load

    @pytest.mark.parametrize(("version", "message"), [
        (1.3, "istio.version must be quoted"), ("1.x", "istio.version must be an Istio version such as 1.29"),
        ("1.1000", "istio.version must be an Istio version"), ("01.30", "istio.version must be an Istio version"),
    ])
    def test_bad_versions_fail_the_render(self, version: object, message: str) -> None:
        """A number or a non-version fails `helm template` with the key to fix."""
        with pytest.raises(Exception, match=message):
            self._istio({"istio": {"version": version}})

    def test_an_unknown_compliance_policy_fails_the_render(self) -> None:
        """A misspelt policy (fips140-3) fails `helm template`, not the agent's start in every istiod pod."""
        with pytest.raises(Exception, match="compliancePolicy"):
            self._istio({"istio": {"compliancePolicy": "fips140-3"}})
        assert self._istio({"istio": {"compliancePolicy": ""}}) is None
        from tests.test_chart import CHART

        schema = json.loads((Path(CHART) / "values.schema.json").read_text())
        assert schema["properties"]["istio"]["properties"]["compliancePolicy"]["enum"] == list(COMPLIANCE_POLICIES)


# ------------------------------------------------------------------------------------------------- the agent


@pytest.fixture(name="kv")
def fixture_kv(bao: Any, unique: str) -> tuple[Any, str]:
    """A KV v2 mount of this test's own on the shared OpenBao; (client, mount)."""
    from testbed.vaultsetup import ensure_secrets_engine

    client = bao.client()
    mount = f"kv-{unique}"
    ensure_secrets_engine(client, mount, kv_version=2)
    return client, mount


def _agent_config(tmp_path: Path, bao: Any, mount: str, istio: dict[str, Any] | None, poll: str = "0.2s",
                  multiroot: bool = False) -> Path:
    token = tmp_path / "token"
    token.write_text(bao.root_token)
    cfg: dict[str, Any] = {
        "vault": {"address": bao.address}, "auth": {"method": "token", "token_path": str(token)},
        "bundles": [{"name": "istiod-cacerts", "type": "istio-ca", "dir": str(tmp_path / "out"),
                     "source": {"kv": f"{mount}/ca"}, "multiroot": multiroot}],
        "init": {"timeout": "10s"}, "health": {"listen": "127.0.0.1:0"}, "sidecar": {"poll_interval": poll},
    }
    if istio is not None:
        cfg["istio"] = istio
    return write_config(tmp_path / "agent.yaml", cfg)


def _store(client: Any, mount: str, files: dict[str, bytes]) -> None:
    client.secrets.kv.v2.create_or_update_secret(path="ca", secret={k: v.decode() for k, v in files.items()},
                                                 mount_point=mount)


class TestAgent:
    def test_unknown_version_logs_the_skipped_checks_once(self, tmp_path: Path, bao: Any,
                                                          kv: tuple[Any, str]) -> None:
        """Without istio.version the sidecar publishes as before and says once, not at every poll, which checks
        it skipped."""
        client, mount = kv
        _store(client, mount, c.files(c.inter(c.root())))
        proc = AgentProc(_agent_config(tmp_path, bao, mount, {"ambient": True}, multiroot=True),
                         env=cli_env()).start()
        try:
            proc.wait_event("sidecar_ready")
            time.sleep(1.2)  # six more polls at 0.2 s
        finally:
            proc.stop()
        lines = proc.events("istio_checks_skipped")
        assert len(lines) == 1, proc.tail()
        assert set(lines[0]["checks"]) == {THREE_LEVEL, ZTUNNEL_ROOTS, RELOAD_RULE}

    def test_no_line_when_nothing_was_skipped(self, tmp_path: Path, bao: Any, kv: tuple[Any, str]) -> None:
        """The reload rule only matters with multiroot: true (without it every root change is refused whatever
        the version), so the default config (no istio:, multiroot: false) logs no istio_checks_skipped line, and a
        multiroot bundle's line names the rule."""
        client, mount = kv
        _store(client, mount, c.files(c.inter(c.root())))
        plain = run_cli("run", "--config", str(_agent_config(tmp_path, bao, mount, None)), "--mode", "init")
        assert plain.returncode == 0, plain.stderr
        assert "istio_checks_skipped" not in plain.stderr
        multi = run_cli("run", "--config", str(_agent_config(tmp_path, bao, mount, None, multiroot=True)), "--mode",
                        "init")
        assert multi.returncode == 0, multi.stderr
        (line,) = [json.loads(ln) for ln in multi.stderr.splitlines() if "istio_checks_skipped" in ln]
        assert line["checks"] == [RELOAD_RULE]

    def test_no_line_for_a_tls_bundle(self, tmp_path: Path, bao: Any, kv: tuple[Any, str]) -> None:
        """The version-aware checks are istio-ca checks: a tls bundle next to an istio-ca one logs no line of its
        own, whatever istio: says."""
        client, mount = kv
        _store(client, mount, c.files(c.inter(c.root())))
        (case,) = c.build({"tls-ok"})
        client.secrets.kv.v2.create_or_update_secret(path="gw", secret={k: v.decode() for k, v in case.files.items()},
                                                     mount_point=mount)
        path = _agent_config(tmp_path, bao, mount, {"ambient": True}, multiroot=True)
        cfg = yaml.safe_load(path.read_text())
        cfg["bundles"].append({"name": "gw", "type": "tls", "dir": str(tmp_path / "gw"),
                               "source": {"kv": f"{mount}/gw"}})
        write_config(path, cfg)
        proc = run_cli("run", "--config", str(path), "--mode", "init")
        assert proc.returncode == 0, proc.stderr
        assert (tmp_path / "gw" / "tls.crt").exists()
        lines = [json.loads(ln) for ln in proc.stderr.splitlines() if "istio_checks_skipped" in ln]
        assert [ln["bundle"] for ln in lines] == ["istiod-cacerts"]

    def test_known_version_changes_the_verdict(self, tmp_path: Path, bao: Any, kv: tuple[Any, str]) -> None:
        """istio.version 1.24.3 with ambient refuses a three-level chain at init; 1.26.0 publishes it."""
        client, mount = kv
        _store(client, mount, _three_level())
        old = run_cli("run", "--config", str(_agent_config(tmp_path, bao, mount, {"version": "1.24.3",
                                                                                "ambient": True})), "--mode", "init")
        assert old.returncode == 1 and THREE_LEVEL in error_line(old), old.stderr
        assert not (tmp_path / "out" / "ca-cert.pem").exists()
        new = run_cli("run", "--config", str(_agent_config(tmp_path, bao, mount, {"version": "1.26.0",
                                                                                "ambient": True})), "--mode", "init")
        assert new.returncode == 0, new.stderr
        assert (tmp_path / "out" / "ca-cert.pem").exists()
