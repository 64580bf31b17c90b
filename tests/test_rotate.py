"""`rotate`: the phase rules and istiod's two reload rules (pure), then each phase against a real OpenBao (KV v1 and
v2): the order, the wait, check-and-set, dry runs, re-runs, and the istiod gates through the Kubernetes API
stand-in.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import hvac
import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from agent import ca, cli, rotate, rotation
from agent.errors import BundleError, ConfigError, WriteConflict
from agent.operator import operator_client
from testbed.kubeapi import KubeAPI
from testbed.vaultsetup import ensure_secrets_engine
from tests.support import cli_env, error_line, run_cli, wait_until

NOW = dt.datetime.now(dt.UTC)


def _pem(cert: Any) -> bytes:
    return bytes(cert.public_bytes(Encoding.PEM))


@pytest.fixture(name="roots", scope="module")
def fixture_roots(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two roots (A, B) as `ca root` writes them."""
    base = tmp_path_factory.mktemp("roots")
    for name in ("a", "b"):
        ca.make_root(base / name, key_type="ec-p256", say=lambda _: None, warn=lambda _: None)
    return {"a": base / "a", "b": base / "b"}


# ---------------------------------------------------------------------------------------------- pure rules


class TestReloadRules:
    def test_trust_keeps_the_old_bytes_as_a_prefix(self, roots):
        """trust appends the new root after the current bytes, so both istiod rules accept A -> A+B and A+B -> B."""
        a = (roots["a"] / "root-cert.pem").read_bytes()
        b_root = ca.load_root_dir(roots["b"])
        ab = rotation.append_root(a, _pem(b_root.cert))
        assert ab.startswith(a)
        assert rotation.accepted_by_bytes(a, ab) and rotation.accepted_by_der_sets(a, ab)
        b_alone = rotation.block_bytes(ab, rotation.fingerprint(b_root.cert))
        assert b_alone is not None
        assert rotation.accepted_by_bytes(ab, b_alone) and rotation.accepted_by_der_sets(ab, b_alone)

    def test_a_missing_last_newline_is_added_between_not_in_the_old_bytes(self, roots):
        """Old bytes without their last newline stay a byte-exact prefix; a newline separates the new root."""
        a = (roots["a"] / "root-cert.pem").read_bytes().rstrip(b"\n")
        b = (roots["b"] / "root-cert.pem").read_bytes()
        ab = rotation.append_root(a, b)
        assert ab == a + b"\n" + b
        assert len(rotation.cert_set(ab)) == 2

    def test_reencoding_breaks_the_129_rule_but_not_the_130_rule(self, roots):
        """Re-wrapping the old root's base64 (or reordering) keeps the DER set but breaks bytes.Contains: what a
        hand-made bundle gets wrong on istiod <= 1.29."""
        a = (roots["a"] / "root-cert.pem").read_bytes()
        b = (roots["b"] / "root-cert.pem").read_bytes()
        rewrapped = a.replace(b"\n", b"\r\n")
        assert not rotation.accepted_by_bytes(a, rewrapped + b)
        assert rotation.accepted_by_der_sets(a, rewrapped + b)
        assert rotation.accepted_by_bytes(a, b + a)  # A inside B+A: contained, so 1.29 takes it
        assert not rotation.accepted_by_bytes(a, b) and not rotation.accepted_by_der_sets(a, b)

    def test_reload_rule_by_version(self):
        """<= 1.29 byte containment, >= 1.30 DER sets, and the #59766 cap from 1.28.7 / 1.29.3 / 1.30.0."""
        assert "bytes" in rotate.reload_rule((1, 29, 6)) and "59766" in rotate.reload_rule((1, 29, 6))
        assert "DER" in rotate.reload_rule((1, 30, 3))
        assert "59766" not in rotate.reload_rule((1, 29, 2))
        assert "59766" not in rotate.reload_rule((1, 28, 6)) and "59766" in rotate.reload_rule((1, 28, 7))
        assert "both rules" in rotate.reload_rule(None)


class TestPhases:
    @pytest.mark.parametrize(
        ("roots", "anchor", "new", "phase"),
        [
            (["a"], "a", None, "A"),
            (["a"], "a", "b", "A"),
            (["a", "b"], "a", "b", "trust"),
            (["a", "b"], "b", "b", "sign"),
            (["a", "b"], "a", None, "trust"),
            (["a", "b"], "b", None, "sign"),
            (["b"], "b", "b", "retire"),
            (["b"], "a", "b", rotation.BROKEN),
            (["a", "b"], None, "b", rotation.BROKEN),
        ],
    )
    def test_phase_of(self, roots, anchor, new, phase):
        """The phase follows from root_cert's roots and the intermediate's issuer alone."""
        assert rotation.phase_of(roots, anchor, new) == phase

    @pytest.mark.parametrize(
        "value",
        [None, 5, "", "{", "[]", '{"phase":"evil","root":"' + "0" * 64 + '","at":"2026-01-01T00:00:00Z"}',
         '{"phase":"trust","root":"xyz","at":"2026-01-01T00:00:00Z"}',
         '{"phase":"trust","root":"' + "0" * 64 + '","at":"yesterday"}', "x" * 5000],
    )
    def test_a_record_rotate_did_not_write_is_ignored(self, value):
        """Hostile or hand-edited records count as no record."""
        assert rotation.parse_record(value) is None

    def test_record_round_trip(self):
        """What `rotate` writes it reads back."""
        rec = rotation.parse_record(rotation.record_text("sign", "ab" * 32, NOW))
        assert rec is not None and rec.phase == "sign" and rec.root == "ab" * 32
        assert abs((rec.at - NOW).total_seconds()) < 1

    def test_readyz_problem(self):
        """An agent's /readyz shows KV's bundle when a bundle has its serial and root set."""
        body = {"bundles": {"istiod-cacerts": {"serial": "ab", "roots": ["r1", "r2"]}}}
        assert rotate._readyz_problem(body, "ab", ["r1", "r2"]) == ""
        assert "not what KV holds" in rotate._readyz_problem(body, "ab", ["r2"])
        assert "not what KV holds" in rotate._readyz_problem(body, "cd", ["r1", "r2"])
        assert "no bundle" in rotate._readyz_problem({"bundles": {}}, "ab", [])


# ---------------------------------------------------------------------------------------------- against OpenBao


class Mesh:
    """Two clusters' KV secrets (one KV v2, one KV v1) under root A, and `rotate` run in this process."""

    def __init__(self, bao: Any, unique: str, roots: dict[str, Path], tmp_path: Path) -> None:
        self.bao, self.roots, self.tmp = bao, roots, tmp_path
        self.env = {"VAULT_ADDR": bao.address, "VAULT_TOKEN": bao.root_token}
        self.client = operator_client(environ=self.env)
        self.clusters = {f"e{unique}": 2, f"w{unique}": 1}
        self.admin = bao.client()
        for c, version in self.clusters.items():
            ensure_secrets_engine(self.admin, f"kubernetes-{c}-secrets", kv_version=version)
            if version == 2:  # a new KV v2 mount answers "Upgrading from non-versioned..." for a moment
                assert wait_until(lambda c=c: self._kv2_ready(f"kubernetes-{c}-secrets"), timeout=15)
            opts = ca.IntermediateOptions(cluster=c, root_dir=str(roots["a"]), kv=self.path(c), key_type="ec-p256")
            ca.make_intermediate(opts, say=lambda _: None, warn=lambda _: None, environ=self.env)
        self.out: list[str] = []
        self.warnings: list[str] = []

    def _kv2_ready(self, mount: str) -> bool:
        try:
            self.admin.secrets.kv.v2.read_secret_metadata(path="probe", mount_point=mount)
        except hvac.exceptions.InvalidPath:
            return True
        except hvac.exceptions.VaultError:
            return False
        return True

    @staticmethod
    def path(c: str) -> str:
        return f"kubernetes-{c}-secrets/istiod-service/certs"

    def args(self, *extra: str) -> list[str]:
        return [a for c in self.clusters for a in ("--cluster", c)] + list(extra)

    def rotate(self, phase: str, *extra: str, now: dt.datetime | None = None, **kw: Any) -> int:
        flags = [] if phase == "status" else ["--root-dir", str(self.roots["b"]), "--multiroot-mesh", "--xds-agent"]
        ns = cli._parser("rotate").parse_args(["rotate", phase, *self.args(*flags, *extra)])
        self.out.clear()
        self.warnings.clear()
        return rotate.run(ns, self.out.append, self.warnings.append, client=self.client, now=now, **kw)

    def stored(self, c: str) -> rotation.Stored:
        return rotation.read_stored(self.client, c, self.path(c))

    def phases(self) -> dict[str, str]:
        return {c: rotation.state_of(self.stored(c), None).phase for c in self.clusters}


@pytest.fixture(name="mesh")
def fixture_mesh(bao, unique, roots, tmp_path) -> Mesh:
    return Mesh(bao, unique, roots, tmp_path)


LATER = NOW + dt.timedelta(hours=25)
MUCH_LATER = NOW + dt.timedelta(hours=50)


class TestPhasesAgainstOpenBao:
    def test_the_whole_rotation(self, mesh):
        """trust, sign, retire in turn: root_cert A -> A+B (A's bytes kept) -> B alone; intermediates under B with
        the cluster's key type after sign; each phase run twice is a no-op."""
        before = {c: mesh.stored(c).data for c in mesh.clusters}
        assert set(mesh.phases().values()) == {"A"}
        assert mesh.rotate("trust", now=NOW) == 0
        b_root = ca.load_root_dir(mesh.roots["b"])
        for c in mesh.clusters:
            data = mesh.stored(c).data
            assert data["root_cert"].startswith(before[c]["root_cert"])
            assert data["ca_cert"] == before[c]["ca_cert"] and data["ca_key"] == before[c]["ca_key"]
        assert set(mesh.phases().values()) == {"trust"}
        versions = {c: mesh.stored(c).version for c in mesh.clusters}
        assert mesh.rotate("trust", now=NOW) == 0
        assert any("already done" in line for line in mesh.out)
        assert {c: mesh.stored(c).version for c in mesh.clusters} == versions

        trusted = {c: mesh.stored(c).data for c in mesh.clusters}
        assert mesh.rotate("sign", now=LATER) == 0
        for c in mesh.clusters:
            data = mesh.stored(c).data
            assert data["root_cert"] == trusted[c]["root_cert"]  # byte for byte
            assert data["ca_key"] != trusted[c]["ca_key"]
            from cryptography import x509

            inter = x509.load_pem_x509_certificate(data["ca_cert"].encode())
            inter.verify_directly_issued_by(b_root.cert)
            assert inter.public_key().curve.name == "secp256r1"  # the cluster's key type, kept
            assert f"L={c}" in inter.subject.rfc4514_string()
        assert set(mesh.phases().values()) == {"sign"}

        assert mesh.rotate("retire", now=MUCH_LATER) == 0
        for c in mesh.clusters:
            data = mesh.stored(c).data
            assert data["root_cert"].encode() == _pem(b_root.cert)
            assert data["root_cert"] in trusted[c]["root_cert"]  # what istiod <= 1.29 needs
        assert mesh.rotate("retire", now=MUCH_LATER) == 0
        assert any("already done" in line for line in mesh.out)
        assert mesh.rotate("status") == 0
        assert all(" retire:" not in line or "phase retire" in line for line in mesh.out)
        assert "every cluster is in phase retire" in mesh.out[-1]

    def test_phase_order_is_refused_and_nothing_is_written(self, mesh):
        """sign before trust, retire before sign: one error naming the cluster and the command to run first."""
        before = {c: mesh.stored(c).data for c in mesh.clusters}
        with pytest.raises(ConfigError, match=r"cannot sign: cluster e\w+ is not ready .*run `rotate trust` first"):
            mesh.rotate("sign", "--wait-at-least", "0s")
        assert {c: mesh.stored(c).data for c in mesh.clusters} == before
        mesh.rotate("trust", now=NOW)
        trusted = {c: mesh.stored(c).data for c in mesh.clusters}
        with pytest.raises(ConfigError, match=r"cannot retire: .*run `rotate sign` first"):
            mesh.rotate("retire", now=MUCH_LATER)
        assert {c: mesh.stored(c).data for c in mesh.clusters} == trusted
        mesh.rotate("sign", now=LATER)
        with pytest.raises(ConfigError, match="already in phase sign, past trust"):
            mesh.rotate("trust", now=LATER)
        assert set(mesh.phases().values()) == {"sign"}

    def test_one_cluster_behind_blocks_the_next_phase(self, mesh):
        """trust written in one cluster only (--cluster east): sign for both is refused, naming the other."""
        east, west = list(mesh.clusters)
        ns = cli._parser("rotate").parse_args(["rotate", "trust", "--cluster", east, "--root-dir",
                                               str(mesh.roots["b"]), "--multiroot-mesh", "--xds-agent"])
        rotate.run(ns, print, print, client=mesh.client, now=NOW)
        with pytest.raises(ConfigError, match=f"cluster {west} is not ready"):
            mesh.rotate("sign", now=LATER)
        assert mesh.phases() == {east: "trust", west: "A"}

    def test_only_writes_one_cluster_after_checking_all(self, mesh):
        """--only east: every named cluster must trust B, but only east gets its intermediate under B."""
        east, west = list(mesh.clusters)
        with pytest.raises(ConfigError, match=f"cluster {east} is not ready"):
            mesh.rotate("sign", "--only", east, now=LATER)
        mesh.rotate("trust", now=NOW)
        assert mesh.rotate("sign", "--only", east, now=LATER) == 0
        assert mesh.out[-1] == f"next: `rotate sign` for {west}"
        assert mesh.phases() == {east: "sign", west: "trust"}
        assert mesh.rotate("sign", "--only", east, now=LATER) == 0
        assert "already done" in mesh.out[-1]
        with pytest.raises(ConfigError, match="--only names cluster nope"):
            mesh.rotate("sign", "--only", "nope", now=LATER)

    def test_the_wait_is_refused_until_it_has_passed(self, mesh):
        """sign within 24h of trust is refused with the time to come back; after it, or with 0s (warned), it runs."""
        mesh.rotate("trust", now=NOW)
        with pytest.raises(ConfigError, match=r"cannot sign yet: trust was written .* run again after"):
            mesh.rotate("sign", now=NOW + dt.timedelta(hours=23))
        with pytest.raises(ConfigError, match="cannot sign yet"):
            mesh.rotate("sign", "--wait-at-least", "48h", now=LATER)
        assert set(mesh.phases().values()) == {"trust"}
        assert mesh.rotate("sign", "--wait-at-least", "0s", now=NOW) == 0
        assert any("--wait-at-least 0s" in w for w in mesh.warnings)

    def test_the_wait_counts_from_the_last_cluster_to_trust(self, mesh):
        """east trusted B a day before west: signing east alone (--only) must still wait 24h from WEST's trust,
        or west's workloads, still trusting only A, refuse east's new certificates
        (tests/test_rotation_envoy.py shows that failure with real Envoys)."""
        east, west = list(mesh.clusters)
        for c, when in ((east, NOW), (west, NOW + dt.timedelta(hours=24))):
            ns = cli._parser("rotate").parse_args(["rotate", "trust", "--cluster", c, "--root-dir",
                                                   str(mesh.roots["b"]), "--multiroot-mesh", "--xds-agent"])
            rotate.run(ns, print, print, client=mesh.client, now=when)
        with pytest.raises(ConfigError, match=f"cannot sign yet: trust was written in cluster {west}"):
            mesh.rotate("sign", "--only", east, now=NOW + dt.timedelta(hours=25))
        assert mesh.phases() == {east: "trust", west: "trust"}
        assert mesh.rotate("sign", "--only", east, now=NOW + dt.timedelta(hours=48, minutes=1)) == 0

    def test_no_record_needs_an_explicit_zero_wait_on_kv_v1(self, mesh):
        """trust done by hand (no record): on KV v1 nothing says when, so sign asks for --wait-at-least 0s."""
        mesh.rotate("trust", now=NOW)
        for c, version in mesh.clusters.items():
            data = dict(mesh.stored(c).data)
            data.pop(rotation.RECORD_KEY)
            if version == 1:
                mesh.admin.write(mesh.path(c), **data)
            else:
                mesh.admin.secrets.kv.v2.create_or_update_secret(
                    path="istiod-service/certs", secret=data, mount_point=f"kubernetes-{c}-secrets")
        with pytest.raises(ConfigError, match=r"no record of when trust was written in cluster w\w+ .* 0s"):
            mesh.rotate("sign", now=LATER)
        assert mesh.rotate("sign", "--wait-at-least", "0s", now=LATER) == 0

    def test_check_and_set_refuses_a_write_after_someone_elses(self, mesh):
        """A write to the KV v2 secret between rotate's read and its write: check-and-set refuses it and the other
        writer's data stays; running again resumes from what is there."""
        east = next(c for c, v in mesh.clusters.items() if v == 2)

        def meddle(cluster: str) -> None:
            if cluster == east:
                data = dict(mesh.stored(east).data)
                mesh.admin.secrets.kv.v2.create_or_update_secret(
                    path="istiod-service/certs", secret={**data, "note": "someone else"},
                    mount_point=f"kubernetes-{east}-secrets")

        with pytest.raises(WriteConflict, match="check-and-set refused"):
            mesh.rotate("trust", now=NOW, before_write=meddle)
        assert mesh.stored(east).data.get("note") == "someone else"
        assert mesh.phases()[east] == "A"
        assert mesh.rotate("trust", now=NOW) == 0
        assert set(mesh.phases().values()) == {"trust"}
        assert mesh.stored(east).data.get("note") == "someone else"  # keys rotate does not own are kept

    def test_a_bundle_the_validator_refuses_stops_every_write(self, mesh):
        """One cluster's bundle fails the agent's validator (its cert_chain is not PEM): the error names the file and
        no cluster is written, not even the ones before it."""
        east, west = list(mesh.clusters)
        data = dict(mesh.stored(west).data)
        data["cert_chain"] = "not a certificate"
        mesh.admin.write(mesh.path(west), **data)
        before = mesh.stored(east).data
        with pytest.raises(BundleError, match=r"cert-chain\.pem"):
            mesh.rotate("trust", now=NOW)
        assert mesh.stored(east).data == before

    def test_dry_run_writes_nothing_and_shows_no_key(self, mesh):
        """--dry-run prints per cluster what it would get (fingerprints, subjects), never key material."""
        mesh.rotate("trust", now=NOW)
        mesh.rotate("sign", "--dry-run", now=LATER)
        text = "\n".join(mesh.out + mesh.warnings)
        assert "would write" in text and "dry run: nothing written" in text
        assert "PRIVATE KEY" not in text and "BEGIN" not in text
        assert set(mesh.phases().values()) == {"trust"}

    def test_without_the_facts_a_phase_is_refused(self, mesh):
        """No --context and no --multiroot-mesh: refused, saying how to check it; with the flags: a warning that
        they were not checked."""
        ns = cli._parser("rotate").parse_args(["rotate", "trust", *mesh.args("--root-dir", str(mesh.roots["b"]))])
        with pytest.raises(ConfigError, match=r"ISTIO_MULTIROOT_MESH=true.*--context"):
            rotate.run(ns, print, print, client=mesh.client)
        ns = cli._parser("rotate").parse_args(
            ["rotate", "trust", *mesh.args("--root-dir", str(mesh.roots["b"]), "--multiroot-mesh")])
        with pytest.raises(ConfigError, match="PROXY_CONFIG_XDS_AGENT"):
            rotate.run(ns, print, print, client=mesh.client)
        assert set(mesh.phases().values()) == {"A"}
        mesh.rotate("trust", now=NOW)
        assert any("not checked" in w for w in mesh.warnings)

    def test_cli_refusal_is_one_error_line(self, mesh):
        """The command line: exit 1, one `error:` line, no traceback, no token."""
        proc = run_cli("rotate", "sign", *mesh.args("--root-dir", str(mesh.roots["b"]), "--multiroot-mesh",
                                                    "--xds-agent"), env=cli_env(**mesh.env))
        assert proc.returncode == 1
        assert "run `rotate trust` first" in error_line(proc)
        assert mesh.bao.root_token not in proc.stdout + proc.stderr
        proc = run_cli("rotate", "status", *mesh.args(), env=cli_env(**mesh.env))
        assert proc.returncode == 0, proc.stderr
        assert "every cluster is in phase A" in proc.stdout


class TestDoctorRotation:
    def test_doctor_shows_each_clusters_phase(self, mesh):
        """doctor's rotation view: one line per cluster with the phase `rotate status` reads; a bundle whose
        intermediate chains to no root of root_cert is a FAIL."""
        from agent import doctor

        mesh.rotate("trust", now=NOW)
        checks = doctor.rotation_view(mesh.client, list(mesh.clusters))
        assert [(c.check, c.status) for c in checks] == [("rotation", "ok")] * 2
        assert all(c.detail.startswith("phase trust:") for c in checks)
        east = next(c for c, v in mesh.clusters.items() if v == 2)
        data = dict(mesh.stored(east).data)
        data["root_cert"] = (mesh.roots["b"] / "root-cert.pem").read_text()
        mesh.admin.secrets.kv.v2.create_or_update_secret(path="istiod-service/certs", secret=data,
                                                         mount_point=f"kubernetes-{east}-secrets")
        broken = {c.cluster: c for c in doctor.rotation_view(mesh.client, list(mesh.clusters))}
        assert broken[east].status == "FAIL" and "chains to no root" in broken[east].detail
        with pytest.raises(ConfigError, match=f"cannot sign: cluster {east} is not ready"):
            mesh.rotate("sign", now=LATER)


# ---------------------------------------------------------------------------------------------- gates (stand-in)


def _istiod(kube: KubeAPI, *, multiroot: str = "true", image: str = "docker.io/istio/pilot:1.29.6",
            xds: str = "true") -> None:
    kube.put_workload("Deployment", {
        "metadata": {"name": "istiod", "namespace": "istio-system"},
        "spec": {"selector": {"matchLabels": {"app": "istiod"}}, "template": {"spec": {"containers": [
            {"name": "discovery", "image": image, "env": [{"name": "ISTIO_MULTIROOT_MESH", "value": multiroot}]}]}}},
    })
    mesh_yaml = f"defaultConfig:\n  proxyMetadata:\n    PROXY_CONFIG_XDS_AGENT: \"{xds}\"\ntrustDomain: cluster.local\n"
    kube.put_configmap("istio-system", "istio", {"mesh": mesh_yaml})


class TestGates:
    @pytest.fixture(name="standin")
    def fixture_standin(self, tmp_path, monkeypatch):
        with KubeAPI() as api:
            config = api.write_kubeconfig(tmp_path / "kubeconfig", api.mint_token("kube-system", "operator"),
                                          context="east-ctx")
            monkeypatch.setenv("KUBECONFIG", str(config))
            yield api

    def _readyz(self, stored: rotation.Stored) -> Any:
        st = rotation.state_of(stored, None)
        body = {"status": "ok", "bundles": {"istiod-cacerts": {
            "ready": True, "serial": st.intermediate[1], "roots": [fp for fp, _ in st.roots]}}}
        return lambda _req: (200, body)

    def test_facts_read_through_the_context(self, mesh, standin):
        """With --context: ISTIO_MULTIROOT_MESH from the Deployment, PROXY_CONFIG_XDS_AGENT from the mesh config,
        the version from the image tag, and each istiod pod's /readyz through the pod proxy."""
        east, west = list(mesh.clusters)
        _istiod(standin)
        standin.put_pod("istio-system", "istiod-1", {"app": "istiod"}, proxy={8099: self._readyz(mesh.stored(east))})
        standin.put_pod("istio-system", "istiod-2", {"app": "other"})  # not istiod's: not asked
        ns = cli._parser("rotate").parse_args(["rotate", "trust", "--cluster", east, "--root-dir",
                                               str(mesh.roots["b"]), "--context", f"{east}=east-ctx"])
        out: list[str] = []
        warnings: list[str] = []
        assert rotate.run(ns, out.append, warnings.append, client=mesh.client, now=NOW) == 0
        assert any("1.29.6" in line and "bytes" in line for line in out), out
        assert any("1 istiod pod(s) publish what KV holds" in line for line in out), out
        assert not warnings
        proxied = standin.requests_to("GET", "/api/v1/namespaces/istio-system/pods/istiod-1")
        assert proxied and "readyz" in proxied[0].path
        del west

    def test_the_kubeconfig_leaves_no_temp_files(self, standin, tmp_path, monkeypatch):
        """The context's certificate-authority-data is kept in memory: reading istiod's side leaves no file in the
        temp dir (the kubernetes package would leave its CA file behind a killed `rotate`), and a second context
        with the same CA in the same process still verifies the API server."""
        import tempfile

        scratch = tmp_path / "tmp"
        scratch.mkdir()
        monkeypatch.setattr(tempfile, "tempdir", str(scratch))
        _istiod(standin)
        for _ in range(2):
            facts = rotate.istiod_facts("east-ctx", namespace="istio-system", deployment="istiod", port=8099,
                                        serial="00", roots=[])
            assert facts.version == (1, 29, 6)
            assert list(scratch.iterdir()) == []

    @pytest.mark.parametrize(
        ("change", "message"),
        [
            ({"multiroot": "false"}, "does not set ISTIO_MULTIROOT_MESH=true"),
            ({"xds": "false"}, "PROXY_CONFIG_XDS_AGENT"),
        ],
    )
    def test_istiod_not_ready_is_refused(self, mesh, standin, change, message):
        """Multiroot off or PROXY_CONFIG_XDS_AGENT unset in the cluster: refused, nothing written."""
        east = next(iter(mesh.clusters))
        _istiod(standin, **change)
        standin.put_pod("istio-system", "istiod-1", {"app": "istiod"}, proxy={8099: self._readyz(mesh.stored(east))})
        ns = cli._parser("rotate").parse_args(["rotate", "trust", "--cluster", east, "--root-dir",
                                               str(mesh.roots["b"]), "--context", f"{east}=east-ctx"])
        with pytest.raises(ConfigError, match=message):
            rotate.run(ns, print, print, client=mesh.client, now=NOW)
        assert mesh.phases()[east] == "A"

    def test_a_pod_whose_agent_lags_is_refused(self, mesh, standin):
        """An istiod pod whose agent still publishes an older bundle (or does not answer) blocks the phase."""
        east = next(iter(mesh.clusters))
        _istiod(standin, image="gcr.io/istio-release/pilot:1.30.3-distroless")
        stale = {"status": "ok", "bundles": {"istiod-cacerts": {"ready": True, "serial": "1234", "roots": []}}}
        standin.put_pod("istio-system", "istiod-1", {"app": "istiod"}, proxy={8099: self._readyz(mesh.stored(east))})
        standin.put_pod("istio-system", "istiod-2", {"app": "istiod"},
                        proxy={8099: lambda _req: (503, json.dumps(stale).encode())})
        ns = cli._parser("rotate").parse_args(["rotate", "trust", "--cluster", east, "--root-dir",
                                               str(mesh.roots["b"]), "--context", f"{east}=east-ctx"])
        with pytest.raises(ConfigError, match="istiod pod istiod-2: its agent publishes serial 1234"):
            rotate.run(ns, print, print, client=mesh.client, now=NOW)
        standin.put_pod("istio-system", "istiod-2", {"app": "istiod"})  # no agent listening
        with pytest.raises(ConfigError, match="istiod-2: its agent's /readyz answered HTTP 503"):
            rotate.run(ns, print, print, client=mesh.client, now=NOW)
        standin.remove_pod("istio-system", "istiod-2")
        assert rotate.run(ns, print, print, client=mesh.client, now=NOW) == 0

    def test_a_deployment_of_another_shape_is_not_a_crash(self, mesh, standin):
        """A Deployment whose pod template is not an object: multiroot counts as not set (refused, one sentence)."""
        east = next(iter(mesh.clusters))
        _istiod(standin)
        standin.put_workload("Deployment", {"metadata": {"name": "istiod", "namespace": "istio-system"},
                                            "spec": {"template": "nonsense"}})
        standin.put_configmap("istio-system", "istio", {"mesh": "- [unbalanced"})
        ns = cli._parser("rotate").parse_args(["rotate", "trust", "--cluster", east, "--root-dir",
                                               str(mesh.roots["b"]), "--context", f"{east}=east-ctx"])
        with pytest.raises(ConfigError, match="is not YAML"):
            rotate.run(ns, print, print, client=mesh.client, now=NOW)
        standin.put_configmap("istio-system", "istio", {"mesh": "defaultConfig: 7"})
        with pytest.raises(ConfigError, match="does not set ISTIO_MULTIROOT_MESH=true"):
            rotate.run(ns, print, print, client=mesh.client, now=NOW)
        assert mesh.phases()[east] == "A"

    def test_an_unknown_context_is_one_sentence(self, mesh, standin):
        """A context the kubeconfig lacks: ConfigError naming it."""
        east = next(iter(mesh.clusters))
        ns = cli._parser("rotate").parse_args(["rotate", "trust", "--cluster", east, "--root-dir",
                                               str(mesh.roots["b"]), "--context", f"{east}=nope"])
        with pytest.raises(ConfigError, match="cannot use kubeconfig context 'nope'"):
            rotate.run(ns, print, print, client=mesh.client, now=NOW)
