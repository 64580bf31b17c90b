"""The agent's verdict against istiod's own code paths: every corpus bundle through the Go oracle (tests/oracle, Go's
standard library only) and through the CLI's `check` (its `main`, in this process; a sample of the corpus also as
`python -m agent.cli check` subprocesses, which must agree); any disagreement that is not a documented verdict (b)
fails the test."""

from __future__ import annotations

import contextlib
import io
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from testbed import corpus
from tests.support import ROOT, cli_env

# verdict (b): the checks docs/checks.md ("What it checks") documents, each a refusal although istiod loads the bundle
DOCUMENTED_B = {
    "key-in-public-file", "unparsable-cert-for-envoy", "chain-lacks-ca-cert", "workload-key-cert-sign",
    "workload-path-building", "workload-path-validity", "workload-path-length", "workload-eku-client-auth",
    "workload-critical-extension", "workload-time-encoding", "workload-name-constraints", "workload-policy",
    "workload-crl-missing", "workload-crl-expired", "workload-crl-revoked", "tls-leaf-validity",
    "istiod-serving-cert",
}


@pytest.fixture(name="cases", scope="module")
def fixture_cases(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, object]]:
    """The corpus, written one directory per case."""
    return corpus.write(tmp_path_factory.mktemp("corpus"), corpus.build())


def _oracle_verdicts(oracle: Path, cases: list[dict[str, object]]) -> list[dict[str, object]]:
    req = [{"dir": c["dir"], "kind": c["kind"], "ca_signs_cert": c["ca_signs_cert"]} for c in cases]
    proc = subprocess.run([str(oracle)], input=json.dumps(req), capture_output=True, text=True, timeout=300,
                          check=True)
    out: list[dict[str, object]] = json.loads(proc.stdout)
    return out


def _check(case: dict[str, object]) -> subprocess.CompletedProcess[str]:
    """The agent's verdict on one directory, through the real CLI (a subprocess)."""
    args = [sys.executable, "-m", "agent.cli", "check", str(case["dir"]), "--type", str(case["kind"])]
    return subprocess.run(args, capture_output=True, text=True, timeout=60, env=cli_env(), cwd=ROOT, check=False)


def _check_here(case: dict[str, object]) -> tuple[int, str]:
    """The same verdict through the CLI's `main` in this process (an agent start costs ~0.4 s of imports, times the
    corpus): (exit code, stderr)."""
    from agent import cli

    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = cli.main(["check", str(case["dir"]), "--type", str(case["kind"])])
    return code, err.getvalue()


def _timeless(line: str) -> str:
    return re.sub(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", "<time>", line)


def _checks_of(case: dict[str, object]) -> Iterator[str]:
    """For a refusal, the check id the validator reports (the CLI prints only the sentence)."""
    from agent.errors import BundleError
    from agent.validate import validate_dir

    try:
        validate_dir(str(case["dir"]), str(case["kind"]), ca_signs_cert=bool(case["ca_signs_cert"]))
    except BundleError as exc:
        yield exc.check
        yield "istiod_loads" if exc.istiod_loads else ""


@pytest.mark.timeout(300)
def test_agent_agrees_with_istiod(oracle: Path, cases: list[dict[str, object]]) -> None:
    """Every corpus bundle: the CLI accepts exactly what istiod loads, except documented verdict-(b) refusals."""
    assert len(cases) >= 120
    verdicts = _oracle_verdicts(oracle, cases)
    no_ca_signs_cert = [c for c in cases if not c["ca_signs_cert"]]
    # ca_signs_cert: false is a bundle setting, not a CLI flag: those few go through validate_dir directly
    results: dict[str, tuple[bool, str]] = {}
    for c in [c for c in cases if c["ca_signs_cert"]]:
        code, err = _check_here(c)
        assert code in (0, 1), (c["name"], err)
        assert code == 0 or err.startswith("error: "), (c["name"], err)
        results[str(c["name"])] = (code == 0, err.strip())
    # the subprocess a user runs gives the same verdicts and the same lines: every eighth case of each kind
    sample = [c for kind in sorted({str(c["kind"]) for c in cases})
              for c in [c for c in cases if c["kind"] == kind and c["ca_signs_cert"]][::8]]
    with ThreadPoolExecutor(max_workers=2) as pool:
        procs = list(pool.map(_check, sample))
    for c, p in zip(sample, procs, strict=True):  # (but a "current time" in a line moved on)
        assert (p.returncode == 0, _timeless(p.stderr.strip())) == (
            results[str(c["name"])][0], _timeless(results[str(c["name"])][1])), (c["name"], p.stderr)
    for c in no_ca_signs_cert:
        checks = list(_checks_of(c))
        results[str(c["name"])] = (not checks, checks[0] if checks else "")

    disagreements = []
    for c, v in zip(cases, verdicts, strict=True):
        istiod = v.get("startup") or v.get("gateway")
        assert isinstance(istiod, dict)
        loads, (accepted, err) = bool(istiod["ok"]), results[str(c["name"])]
        if loads == accepted:
            if c["cls"] == "b":
                disagreements.append(f"{c['name']}: documented as (b) but the agent accepts it")
            continue
        if loads and not accepted:
            check, flag = list(_checks_of(c))
            if flag == "istiod_loads" and check in DOCUMENTED_B and c["cls"] == "b" and check == c["check"]:
                assert "would load it" in err or "would serve it" in err, err
                continue
            disagreements.append(f"{c['name']}: istiod loads it, the agent refuses it ({err})")
        else:
            disagreements.append(f"{c['name']}: istiod refuses it ({istiod.get('error')}), the agent accepts it")
    # istiod starts, but pilot-agent (Go) refuses the serving certificate it signs for itself: nothing works
    for c, v in zip(cases, verdicts, strict=True):
        serving = v.get("serving")
        if isinstance(serving, dict) and not serving["ok"] and results[str(c["name"])][0]:
            disagreements.append(
                f"{c['name']}: pilot-agent refuses istiod's serving certificate ({serving['error']}), the agent"
                " accepts the bundle"
            )
    assert not disagreements, "\n".join(disagreements)


def test_every_refusal_names_a_file(oracle: Path, cases: list[dict[str, object]]) -> None:
    """Every refusal of the corpus is one sentence that names one of the bundle's files, without PEM or base64."""
    from agent.errors import BundleError
    from agent.validate import validate_dir

    for c in cases:
        try:
            validate_dir(str(c["dir"]), str(c["kind"]), ca_signs_cert=bool(c["ca_signs_cert"]))
        except BundleError as exc:
            msg = str(exc)
            assert "\n" not in msg and "BEGIN" not in msg, (c["name"], msg)
            assert any(f in msg for f in ("ca-key.pem", "ca-cert.pem", "root-cert.pem", "cert-chain.pem",
                                          "ca-crl.pem", "tls.key", "tls.crt", "ca.crt")), (c["name"], msg)
            assert len(msg) < 400, (c["name"], msg)


def test_documented_b_is_the_docs_table() -> None:
    """DOCUMENTED_B is exactly the checks of the verdict (b) table in docs/checks.md (What it checks)."""
    page = (ROOT / "docs" / "checks.md").read_text()
    section = page[page.index("Verdict (b), refused although istiod loads the bundle"):]
    section = section[:section.index("\n\n", section.index("| check |"))]
    assert set(re.findall(r"^\| `([a-z0-9-]+)` \|", section, re.MULTILINE)) == DOCUMENTED_B
