"""Proof of a root rotation on istiod's reload path: every phase (A -> trust -> sign -> retire), in both orders of
clusters, replayed through the Go oracle's `-path reload` (tests/oracle: istiod's handleEvent at 1.29.6 and 1.30.3)
with the root istiod had loaded, under both root-set rules; once with the real agent publishing from a real
OpenBao KV v2. The real Envoys of the same rotation are in tests/test_rotation_envoy.py.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.validate import validate_dir
from agent.validate.istio_ca import reload_problem
from testbed import pki
from testbed.rotation import PHASES, Rotation, after
from tests.support import ISTIO_FILES, AgentProc, KV2Layout, agent_config, live_files, wait_until, write_config

RULES = ("1.29", "1.30")
ORDERS = (("east", "west"), ("west", "east"))


@pytest.fixture(name="rotation", scope="module")
def fixture_rotation() -> Rotation:
    return Rotation()


def write_dir(directory: Path, files: dict[str, bytes]) -> Path:
    pki.write_files(directory, files)
    return directory


def reload(oracle: Path, directory: Path, current_root: bytes, *, rule: str, multiroot: bool = True
           ) -> dict[str, Any]:
    """The oracle's verdict on istiod (rule 1.29 or 1.30) reloading `directory` while it holds `current_root`."""
    held = directory.parent / f"{directory.name}.held-root.pem"
    held.write_bytes(current_root)
    args = [str(oracle), "-path", "reload", "-current-root", str(held), "-rule", rule,
            f"-multiroot={'true' if multiroot else 'false'}", str(directory)]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=60, check=True)
    out: dict[str, Any] = json.loads(proc.stdout)
    return out


def startup(oracle: Path, directory: Path) -> dict[str, Any]:
    """The oracle's start-up verdict on `directory` (stdin mode)."""
    proc = subprocess.run([str(oracle)], input=json.dumps([{"dir": str(directory), "kind": "istio-ca",
                                                             "ca_signs_cert": True}]),
                          capture_output=True, text=True, timeout=60, check=True)
    out: dict[str, Any] = json.loads(proc.stdout)[0]["startup"]
    return out


class TestOraclePhases:
    @pytest.mark.parametrize("order", ORDERS, ids=["east-first", "west-first"])
    def test_every_phase_reloads_under_both_rules(self, oracle, rotation, tmp_path, order):
        """Each cluster's istiod starts on phase A; every later write, cluster by cluster in `order`, is reloaded
        by istiod 1.29 (byte containment) and 1.30 (DER sets) with ISTIO_MULTIROOT_MESH=true, with no error even
        after the reload (istiod's own certificate), and the agent's validator and reload check say the same."""
        held: dict[str, bytes] = {}  # per cluster: the root istiod holds
        previous: dict[str, dict[str, bytes]] = {}
        changed_seen = []
        for n, (phase, cluster, files) in enumerate(rotation.walk(order)):
            d = write_dir(tmp_path / f"{n:02d}-{phase}-{cluster}", files)
            validate_dir(str(d), "istio-ca")  # the agent publishes it (raises if refused)
            if phase == "A":
                assert startup(oracle, d)["ok"], (cluster, startup(oracle, d))
                held[cluster], previous[cluster] = files["root-cert.pem"], files
                continue
            assert reload_problem(previous[cluster], files, multiroot=True) is None, (phase, cluster)
            for rule in RULES:
                v = reload(oracle, d, held[cluster], rule=rule)
                assert v["reload"] == {"ok": True}, (phase, cluster, rule, v)
                assert v["root_changed"] == (phase != "sign"), (phase, cluster, rule, v)
            changed_seen.append((phase, cluster))
            held[cluster], previous[cluster] = files["root-cert.pem"], files
        assert [p for p, c in changed_seen] == ["trust", "trust", "sign", "sign", "retire", "retire"]
        assert [c for p, c in changed_seen][:2] == list(order)
        # the byte rules: trust keeps A's bytes as a prefix, sign keeps trust's bytes, retire is B alone
        a, b = rotation.root_a.cert_pem, rotation.root_b.cert_pem
        assert all(held[c] == b for c in rotation.clusters)
        trust = rotation.files("east", "trust")["root-cert.pem"]
        assert trust == a + b and rotation.files("east", "sign", trust)["root-cert.pem"] == trust

    def test_a_root_without_final_newline_keeps_its_bytes(self, oracle, rotation, tmp_path):
        """Root A stored without its final newline: trust writes A's bytes, a newline, then B; both rules reload it
        (1.29 finds the old bytes contiguous), and sign keeps those bytes."""
        files = rotation.files("east", "A", rotation.root_a.cert_pem.rstrip(b"\n"))
        d0 = write_dir(tmp_path / "a", files)
        assert startup(oracle, d0)["ok"]
        trust = rotation.files("east", "trust", files["root-cert.pem"])
        assert trust["root-cert.pem"] == files["root-cert.pem"] + b"\n" + rotation.root_b.cert_pem
        d1 = write_dir(tmp_path / "trust", trust)
        for rule in RULES:
            assert reload(oracle, d1, files["root-cert.pem"], rule=rule)["reload"]["ok"], rule


def _crlf(pem: bytes) -> bytes:
    return pem.replace(b"\n", b"\r\n")


class TestOracleRules:
    """What separates istiod 1.29 from 1.30: roots re-encoded or reordered keep the same DER set, not the bytes."""

    CASES = {
        # name: (the root istiod holds, root-cert.pem written next) in terms of A and B (PEM bytes)
        "trust written B then A": lambda a, b: (a + b, b + a),
        "trust with A re-encoded CRLF": lambda a, b: (a, _crlf(a) + b),
        "retire with B re-encoded CRLF": lambda a, b: (a + b, _crlf(b)),
        "trust with A re-wrapped at 76 columns": lambda a, b: (a, _rewrap(a, 76) + b),
    }

    @pytest.mark.parametrize("name", list(CASES))
    def test_reencoded_or_reordered_roots_split_the_rules(self, oracle, rotation, tmp_path, name):
        """Same certificates, other bytes: istiod 1.30 reloads, istiod 1.29 logs "Updating new ROOT-CA not
        supported" and keeps the old CA."""
        held, new = self.CASES[name](rotation.root_a.cert_pem, rotation.root_b.cert_pem)
        phase = "retire" if name.startswith("retire") else "trust"
        files = {**rotation.files("east", phase), "root-cert.pem": new}
        d = write_dir(tmp_path / "case", files)
        assert reload(oracle, d, held, rule="1.30") == {
            "dir": str(d), "kind": "istio-ca", "rule": "1.30", "multiroot": True, "root_changed": True,
            "reload": {"ok": True}}
        refused = reload(oracle, d, held, rule="1.29")
        assert refused["reload"] == {"ok": False, "step": "handleEvent", "error": "Updating new ROOT-CA not supported"}
        # the agent's own check follows 1.30 (pemBundleHasSubsetRelation): it raises no root_changed here
        assert reload_problem({"root-cert.pem": held}, files, multiroot=True) is None

    def test_disjoint_roots_are_refused_by_both(self, oracle, rotation, tmp_path):
        """A to B in one step (no overlap): both rules refuse."""
        files = rotation.files("east", "retire")
        d = write_dir(tmp_path / "case", files)
        for rule in RULES:
            v = reload(oracle, d, rotation.root_a.cert_pem, rule=rule)
            assert v["reload"]["error"] == "Updating new ROOT-CA not supported", (rule, v)

    @pytest.mark.parametrize("rule", RULES)
    def test_multiroot_off_refuses_every_root_change(self, oracle, rotation, tmp_path, rule):
        """Without ISTIO_MULTIROOT_MESH every phase that changes root-cert.pem (trust, retire) is refused with
        "Multi root is disabled"; sign, which keeps the root bytes, reloads."""
        held: bytes | None = None
        for n, (phase, cluster, files) in enumerate(rotation.walk(("east",))):
            d = write_dir(tmp_path / f"{n}-{phase}", files)
            if held is not None:
                v = reload(oracle, d, held, rule=rule, multiroot=False)
                if phase == "sign":
                    assert v["reload"] == {"ok": True} and not v["root_changed"], v
                else:
                    assert v["root_changed"] and v["reload"] == {
                        "ok": False, "step": "handleEvent",
                        "error": "Multi root is disabled, updating new ROOT-CA not supported"}, (phase, v)
            held = files["root-cert.pem"]  # as if istiod restarted on each refused root


def _rewrap(pem: bytes, width: int) -> bytes:
    """The same certificate with its base64 wrapped at `width` columns (what another tool writes)."""
    import base64

    lines = pem.strip().splitlines()
    body = base64.b64encode(base64.b64decode(b"".join(lines[1:-1])))
    return b"\n".join([lines[0], *(body[i:i + width] for i in range(0, len(body), width)), lines[-1]]) + b"\n"


# ---------------------------------------------------------------------------------------------- the real agent


@pytest.fixture(name="agent_world")
def fixture_agent_world(bao, kube, unique, tmp_path, sa_token_file) -> Iterator[dict[str, Any]]:
    """A KV v2 layout on the shared OpenBao, holding cluster east's phase-A bundle, and a token file."""
    client = bao.client()
    layout = KV2Layout.unique(unique).setup(client, kube, None)
    world = {"client": client, "layout": layout, "token": sa_token_file("istio-system", "istiod"),
             "agents": []}
    yield world
    for agent in world["agents"]:
        agent.stop()
        assert "Traceback" not in agent.stderr, agent.tail()


@pytest.mark.timeout(120)
def test_real_agent_publishes_what_istiod_reloads(oracle, rotation, bao, agent_world, tmp_path):
    """Cluster east's agent (multiroot: true) reads each phase from a real OpenBao KV v2 and publishes it; istiod
    1.29 and 1.30 reload every published generation with the root they had loaded, and the agent logs no
    root_changed on the way. West, a phase behind in the walk, is the files' side of the same proof above."""
    layout: KV2Layout = agent_world["layout"]
    client = agent_world["client"]
    out = tmp_path / "out"
    steps = [(p, f) for p, c, f in rotation.walk(("east",))]
    layout.write(client, steps[0][1])
    cfg = agent_config(address=bao.address, token_path=agent_world["token"], out=out, kv=layout.kv,
                       mount=layout.auth_mount, role=layout.role, poll="300ms", multiroot=True,
                       on_root_change="none")
    agent = AgentProc(write_config(tmp_path / "agent.yaml", cfg))
    agent_world["agents"].append(agent)
    agent.start().wait_event("sidecar_ready", timeout=30)
    held = live_files(out)["root-cert.pem"]
    assert held == rotation.root_a.cert_pem
    # the lead-time alert's inputs: the workload certificate lifetime (default 24h) and ca-cert.pem's notAfter
    metrics = agent.metrics()
    assert metrics['istio_vault_agent_workload_cert_ttl_seconds{bundle="istiod-cacerts"}'] == 86400
    ca_expiry = metrics['istio_vault_agent_cert_expiry_timestamp_seconds{bundle="istiod-cacerts",file="ca-cert.pem"}']
    assert ca_expiry == rotation.inter_a["east"].cert.not_valid_after_utc.timestamp()
    for phase, files in steps[1:]:
        layout.write(client, files)
        assert wait_until(lambda f=files: _published(out) == {k: f[k] for k in ISTIO_FILES}, 30), (phase, agent.tail())
        for rule in RULES:
            v = reload(oracle, out, held, rule=rule)
            assert v["reload"] == {"ok": True}, (phase, rule, v)
        held = live_files(out)["root-cert.pem"]
    assert held == rotation.root_b.cert_pem
    assert len(agent.events("bundle_published")) == len(PHASES)
    assert not agent.events("root_changed"), agent.tail()


def _published(out: Path) -> dict[str, bytes] | None:
    try:
        return {k: v for k, v in live_files(out).items() if k in ISTIO_FILES}
    except OSError:
        return None


def test_after_keeps_the_old_bytes_as_prefix():
    """The trust rule in testbed.rotation: old bytes untouched, a newline only when they lack one."""
    assert after(b"A\n", b"B\n") == b"A\nB\n"
    assert after(b"A", b"B\n") == b"A\nB\n"
    assert after(b"A\r\n", b"B\n") == b"A\r\nB\n"
