"""Remote kubeconfigs as files (issue 21, item 1): a remote-secret bundle with `target: files` publishes its set of
remote clusters as `<cluster>.yaml` files in one generation of a directory that istiod 1.30+ reads
(PILOT_MULTICLUSTER_KUBECONFIG_PATH); a set with one bad file is refused whole and the live set stays."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent import kinds
from agent.config import from_mapping
from agent.errors import BundleError, ConfigError, PublishError
from agent.targets.kubeconfigs import KubeconfigFilesTarget
from tests.faultkit import fixture_leaks  # noqa: F401 - the `leaks` fixture
from tests.test_remote_secret import (  # noqa: F401 - the `remote` and `remote_ca` fixtures
    Remote,
    fixture_remote,
    fixture_remote_ca,
    kubeconfig,
)

# ---- helpers ---------------------------------------------------------------------------------------------------


def snapshot(directory: Path) -> dict[str, Any]:
    """Every entry below `directory`: a symlink's target, a file's bytes and mode (what istiod could ever see)."""
    out: dict[str, Any] = {}
    for root, dirs, files in os.walk(directory):
        for name in dirs + files:
            path = Path(root) / name
            rel = str(path.relative_to(directory))
            if path.is_symlink():
                out[rel] = ("link", os.readlink(path))
            elif path.is_dir():
                out[rel] = ("dir", stat.S_IMODE(path.stat().st_mode))
            else:
                out[rel] = ("file", path.read_bytes(), stat.S_IMODE(path.stat().st_mode))
    return out


def istiod_reads(oracle: Path, directory: Path) -> dict[str, Any]:
    """What istiod's folder reader would read from `directory` (tests/oracle/kubeconfig_dir.go, Go's filepath.Walk)."""
    proc = subprocess.run([str(oracle), "-path", "kubeconfig-dir", str(directory)], capture_output=True, text=True,
                          timeout=60, check=True)
    return json.loads(proc.stdout)


def cluster_id(data: bytes) -> str:
    """istiod's clusterIDFromKubeconfig (pkg/kube/multicluster/kubeconfig_files.go) on a parsed kubeconfig: the
    current context's cluster, else the first context by name with a cluster, else the first cluster name."""
    cfg = yaml.safe_load(data)
    contexts = {c["name"]: (c.get("context") or {}).get("cluster", "") for c in cfg.get("contexts") or []}
    if contexts.get(cfg.get("current-context", "")):
        return str(contexts[cfg["current-context"]])
    for name in sorted(contexts):
        if contexts[name]:
            return str(contexts[name])
    names = sorted(c["name"] for c in cfg.get("clusters") or [] if c.get("name"))
    return names[0] if names else ""


def retarget(config: bytes, cluster: str) -> bytes:
    """The same kubeconfig with its cluster, context and user renamed to `cluster` (a kubeconfig of another ID)."""
    cfg = yaml.safe_load(config)
    cfg["clusters"][0]["name"] = cluster
    cfg["contexts"][0] = {"name": cluster, "context": {"cluster": cluster, "user": cluster}}
    cfg["current-context"] = cluster
    cfg["users"][0]["name"] = cluster
    return yaml.safe_dump(cfg).encode()


@pytest.fixture(name="ca_pem", scope="module")
def fixture_ca_pem(remote_ca) -> bytes:
    return remote_ca.cert_pem


@pytest.fixture(name="good_set")
def fixture_good_set(ca_pem: bytes) -> dict[str, bytes]:
    return {c: kubeconfig(c, ca_pem, token=f"token-of-{c}") for c in ("cluster-b", "cluster-c")}


#: one bad kubeconfig per check of today's remote-secret validation, with a word of the refusal
BAD = {
    "insecure": ({"cluster_extra": {"insecure-skip-tls-verify": True}}, "insecure-skip-tls-verify"),
    "http": ({"server": "http://10.0.0.1:6443"}, "https:// server URL"),
    "no-ca": ({"cluster_extra": {"certificate-authority-data": None}}, "certificate-authority-data"),
    "exec": ({"user": {"exec": {"command": "aws"}}}, "exec credential plugin"),
    "auth-provider": ({"user": {"auth-provider": {"name": "gcp"}}}, "auth-provider plugin"),
    "token-file": ({"user": {"tokenFile": "/var/run/token"}}, "tokenFile path"),
    "cert-path": ({"user": {"client-certificate": "/c.pem", "client-key": "/k.pem"}}, "client-certificate path"),
    "no-credentials": ({"user": {}}, "no credentials"),
    "two-clusters": ({"clusters": 2}, "exactly one entry in clusters"),
}


def bad_kubeconfig(cluster: str, ca_pem: bytes, which: str) -> bytes:
    kw = dict(BAD[which][0])
    if which == "no-ca":
        data = yaml.safe_load(kubeconfig(cluster, ca_pem, token="t"))
        del data["clusters"][0]["cluster"]["certificate-authority-data"]
        return yaml.safe_dump(data).encode()
    return kubeconfig(cluster, ca_pem, token="t", **kw)


# ---- the set's checks (pure) ---------------------------------------------------------------------------------


class TestSetChecks:
    def test_a_good_set_passes_and_reports_each_cluster(self, good_set):
        """Two kubeconfigs whose current context names their own cluster: accepted, the expiry is over both."""
        info = kinds.REMOTE_FILES.validate(good_set)
        assert info.kind == "remote-secret"
        assert set(info.not_after) == {"cluster-b.yaml/certificate-authority-data",
                                       "cluster-c.yaml/certificate-authority-data"}
        assert info.expires_at == min(info.not_after.values())

    @pytest.mark.parametrize("which", sorted(BAD))
    def test_one_bad_file_refuses_the_whole_set(self, good_set, ca_pem, which):
        """Each of today's checks, failed by one file of three, refuses the set in one sentence naming the cluster."""
        files = {**good_set, "cluster-d": bad_kubeconfig("cluster-d", ca_pem, which)}
        with pytest.raises(BundleError) as err:
            kinds.REMOTE_FILES.validate(files)
        assert "cluster-d" in str(err.value) and BAD[which][1] in str(err.value)
        assert "\n" not in str(err.value) and "token-of" not in str(err.value)

    def test_cluster_id_must_match_the_file(self, good_set, ca_pem):
        """A kubeconfig stored under cluster-c whose current context names cluster-x: istiod would register it as
        cluster-x, so the set is refused."""
        files = {**good_set, "cluster-c": retarget(good_set["cluster-c"], "cluster-x")}
        with pytest.raises(BundleError, match=r"cluster-c names cluster cluster-x in its current context") as err:
            kinds.REMOTE_FILES.validate(files)
        assert err.value.check == "kubeconfig-cluster-id"

    def test_duplicate_cluster_ids_are_refused(self, good_set):
        """Two files naming one cluster: istiod reports a conflict for both (getClusterEntry), so refused."""
        files = {**good_set, "cluster-c": good_set["cluster-b"]}
        with pytest.raises(BundleError, match=r"cluster-b and cluster-c both name cluster cluster-b") as err:
            kinds.REMOTE_FILES.validate(files)
        assert err.value.check == "kubeconfig-duplicate"

    def test_current_context_is_required(self, good_set):
        """No current-context: istiod would fall back to guessing the ID, and its client has no context."""
        data = yaml.safe_load(good_set["cluster-b"])
        del data["current-context"]
        with pytest.raises(BundleError, match="no current-context"):
            kinds.REMOTE_FILES.validate({**good_set, "cluster-b": yaml.safe_dump(data).encode()})

    def test_our_cluster_id_is_istiods(self, good_set, ca_pem):
        """The agent's cluster ID agrees with clusterIDFromKubeconfig's order on every fallback."""
        from agent.validate.kubeconfig import _cluster_id

        cases = [good_set["cluster-b"], retarget(good_set["cluster-b"], "x")]
        no_current = yaml.safe_load(good_set["cluster-b"])
        no_current["current-context"] = "missing"
        cases.append(yaml.safe_dump(no_current).encode())
        no_context = yaml.safe_load(good_set["cluster-b"])
        no_context["contexts"] = []
        cases.append(yaml.safe_dump(no_context).encode())
        for data in cases:
            assert _cluster_id(yaml.safe_load(data)) == cluster_id(data)


# ---- the published layout, as istiod reads it ------------------------------------------------------------------


def files_bundle(directory: Path, **extra: Any) -> Any:
    cfg = from_mapping({
        "vault": {"address": "http://127.0.0.1:1"},
        "auth": {"method": "token"},
        "bundles": [{"name": "remote-clusters", "type": "remote-secret", "target": "files", "dir": str(directory),
                     "source": {"kv": "kv/istio/remote-secrets/mesh"}, **extra}],
    })
    return cfg.bundles[0]


class TestLayout:
    def test_istiod_reads_exactly_the_set_from_one_generation(self, oracle, tmp_path, good_set):
        """Go's filepath.Walk, as istiod's FolderWatch.readOnce runs it, reads one <cluster>.yaml per cluster from
        the live generation, and nothing else (..data and the visible names are symlinks, which it skips); the
        cluster ID of each is its file's name."""
        directory = tmp_path / "remote-kubeconfigs"
        target = KubeconfigFilesTarget(files_bundle(directory))
        first = asyncio.run(target.publish(good_set))
        seen = istiod_reads(oracle, directory)
        assert not seen.get("error")
        assert sorted(f["path"] for f in seen["files"]) == [f"{first.generation}/cluster-b.yaml",
                                                             f"{first.generation}/cluster-c.yaml"]
        for f in seen["files"]:
            data = (directory / f["path"]).read_bytes()
            assert cluster_id(data) == Path(f["path"]).stem
            assert data == good_set[Path(f["path"]).stem]
        # a new set: one generation again, the old one gone
        changed = {"cluster-b": good_set["cluster-b"]}
        second = asyncio.run(target.publish(changed))
        seen = istiod_reads(oracle, directory)
        assert [f["path"] for f in seen["files"]] == [f"{second.generation}/cluster-b.yaml"]
        assert not (directory / "cluster-c.yaml").exists()

    def test_a_bare_cluster_name_would_never_be_read(self, oracle, tmp_path, good_set):
        """Why the files are <cluster>.yaml: istiod parses only .yaml and .yml files (krt/files supportedExtensions)."""
        (tmp_path / "cluster-b").write_bytes(good_set["cluster-b"])
        assert istiod_reads(oracle, tmp_path)["files"] == []

    @pytest.mark.parametrize(("key_mode", "gid"), [(0o600, None), (0o640, os.getgid())])
    def test_modes_are_the_key_mode(self, tmp_path, good_set, key_mode, gid):
        """Each kubeconfig is a credential: written with key_mode (0600, or 0640 with a gid), never world-readable."""
        directory = tmp_path / "d"
        extra = {"key_mode": key_mode} | ({"gid": gid} if gid is not None else {})
        result = asyncio.run(KubeconfigFilesTarget(files_bundle(directory, **extra)).publish(good_set))
        for cluster in good_set:
            st = (directory / result.generation / f"{cluster}.yaml").stat()
            assert stat.S_IMODE(st.st_mode) == key_mode
            assert (directory / f"{cluster}.yaml").read_bytes() == good_set[cluster]

    @pytest.mark.parametrize("planted", ["stray.yaml", "sub/", "..tmp_stray.yaml", "..tmp_sub/", "..data_tmp/"])
    def test_an_entry_istiod_would_also_read_is_refused(self, oracle, tmp_path, good_set, planted):
        """A .yaml file or a subdirectory the agent did not publish would be read by istiod too (one bad file stops
        all its updates), also under a name of the publisher's temporary links: the publish is refused in one
        sentence naming it and nothing is written."""
        directory = tmp_path / "d"
        directory.mkdir()
        if planted.endswith("/"):
            (directory / planted).mkdir()
            (directory / planted / "x.yaml").write_text("not a kubeconfig")
        else:
            (directory / planted).write_text("not a kubeconfig")
        assert istiod_reads(oracle, directory)["files"], "premise: istiod reads the planted entry"
        before = snapshot(directory)
        with pytest.raises(PublishError, match="istiod") as err:
            asyncio.run(KubeconfigFilesTarget(files_bundle(directory)).publish(good_set))
        assert planted.rstrip("/") in str(err.value)
        assert "\n" not in str(err.value)
        assert snapshot(directory) == before

    @pytest.mark.parametrize("planted", ["..tmp_stray.yaml", "..data_tmp/"])
    def test_an_entry_planted_beside_a_live_set_is_damage(self, oracle, tmp_path, good_set, planted):
        """The same entries planted next to a published set: the sidecar's damage check sees them (so the agent
        names them), where istiod would read them beside the set."""
        directory = tmp_path / "d"
        target = KubeconfigFilesTarget(files_bundle(directory))
        asyncio.run(target.publish(good_set))
        assert not asyncio.run(target.damaged(good_set))
        if planted.endswith("/"):
            (directory / planted).mkdir()
            (directory / planted / "x.yaml").write_text("not a kubeconfig")
        else:
            (directory / planted).write_text("not a kubeconfig")
        assert len(istiod_reads(oracle, directory)["files"]) == 3, "premise: istiod reads the planted entry"
        assert asyncio.run(target.damaged(good_set))

    def test_a_stale_generation_is_removed(self, oracle, tmp_path, good_set):
        """A generation left beside the live one (a publish killed after its swap, or planted) is read by istiod
        too: its clusters conflict with the live ones. The damage check sees it and the repair removes it, so istiod
        reads exactly the set again."""
        directory = tmp_path / "d"
        target = KubeconfigFilesTarget(files_bundle(directory))
        live = asyncio.run(target.publish(good_set)).generation
        stale = directory / "..2020_01_01_00_00_00.abcdef"
        stale.mkdir()
        (stale / "cluster-b.yaml").write_bytes(good_set["cluster-c"])
        assert len(istiod_reads(oracle, directory)["files"]) == 3, "premise: istiod reads the stale generation"
        assert asyncio.run(target.damaged(good_set))
        asyncio.run(target.publish(good_set))
        assert sorted(f["path"] for f in istiod_reads(oracle, directory)["files"]) == [
            f"{live}/cluster-b.yaml", f"{live}/cluster-c.yaml"]
        assert not asyncio.run(target.damaged(good_set))

    def test_a_symlinked_dir_is_refused(self, oracle, tmp_path, good_set):
        """istiod's walk does not follow a symlink at PILOT_MULTICLUSTER_KUBECONFIG_PATH (Go's filepath.Walk lstats
        its root): a set published through a symlinked dir would show istiod no cluster at all. Refused in one
        sentence naming the real directory; nothing is written."""
        real = tmp_path / "real"
        real.mkdir()
        (tmp_path / "link").symlink_to(real)
        # premise: a set published into the real directory, read through the symlink, shows istiod nothing
        asyncio.run(KubeconfigFilesTarget(files_bundle(tmp_path / "other")).publish(good_set))
        (tmp_path / "other-link").symlink_to(tmp_path / "other")
        assert istiod_reads(oracle, tmp_path / "other-link")["files"] == []
        target = KubeconfigFilesTarget(files_bundle(tmp_path / "link"))
        with pytest.raises(PublishError, match="is a symlink") as err:
            asyncio.run(target.publish(good_set))
        assert str(real) in str(err.value) and "\n" not in str(err.value)
        assert list(real.iterdir()) == []
        assert asyncio.run(target.damaged(good_set))


# ---- config ------------------------------------------------------------------------------------------------


class TestConfig:
    BASE: dict[str, Any] = {"vault": {"address": "http://127.0.0.1:1"}, "auth": {"method": "token"}}

    def load(self, *bundles: dict[str, Any]) -> Any:
        return from_mapping({**self.BASE, "bundles": list(bundles)})

    def bundle(self, **extra: Any) -> dict[str, Any]:
        return {"name": "remote", "type": "remote-secret", "source": {"kv": "kv/istio/remote-secrets/mesh"}, **extra}

    def test_target_files_needs_no_cluster(self):
        """Without cluster, every key of the KV secret is one remote cluster of the set."""
        b = self.load(self.bundle(target="files", dir="/var/run/secrets/remote-kubeconfigs")).bundles[0]
        assert b.target == "files" and b.cluster is None and kinds.of(b) is kinds.REMOTE_FILES

    @pytest.mark.parametrize(("bundles", "message"), [
        ([{"target": "files"}], "missing required key bundles[0].dir: the directory istiod reads remote kubeconfigs"),
        ([{"cluster": "b", "dir": "/x"}], "bundles[0].dir only applies with target: files"),
        ([{"target": "files", "dir": "/x", "prune": True}], "bundles[0].prune only applies to target: secret"),
        ([{"target": "files", "dir": "/x"}, {"name": "r2", "target": "files", "dir": "/y"}],
         "bundles[1].target files is also the target of bundle remote"),
        ([{"target": "files", "dir": "/x", "cluster": "Bad_Name"}], "bundles[0].cluster must be lower-case"),
        ([{"target": "secret"}], "missing required key bundles[0].cluster"),
    ])
    def test_errors_are_one_sentence(self, bundles, message):
        """Each config error names the key and is one line."""
        with pytest.raises(ConfigError) as err:
            self.load(*[self.bundle(**b) for b in bundles])
        assert message in str(err.value)
        assert "\n" not in str(err.value)


# ---- end to end, real OpenBao ----------------------------------------------------------------------------------


class MeshStore:
    """The set of a primary: one KV secret holding one key per remote cluster (istioctl's `data`, base64)."""

    def __init__(self, remote: Remote) -> None:
        self.remote = remote
        self.directory = remote.tmp / "remote-kubeconfigs"

    def put(self, configs: dict[str, bytes]) -> None:
        for config in configs.values():
            self.remote.leaks.secret("a kubeconfig (base64)", base64.b64encode(config).decode())
        self.remote.client.secrets.kv.v2.create_or_update_secret(
            path="istio/remote-secrets/mesh", mount_point=self.remote.kv_mount,
            secret={c: base64.b64encode(v).decode() for c, v in configs.items()},
        )

    def bundle(self, **extra: Any) -> dict[str, Any]:
        return {"name": "remote-clusters", "type": "remote-secret", "target": "files", "dir": str(self.directory),
                "source": {"kv": f"{self.remote.kv_mount}/istio/remote-secrets/mesh"}, **extra}


@pytest.fixture(name="mesh")
def fixture_mesh(remote: Remote) -> MeshStore:
    return MeshStore(remote)


class TestEndToEnd:
    def test_the_set_is_published_and_a_bad_file_keeps_the_live_set(self, remote, mesh, oracle):
        """The agent publishes both clusters as one generation (0640 with the bundle's gid); a new KV version with
        one bad kubeconfig is refused whole in one sentence: the live directory stays byte for byte, /readyz stays
        200 and names the refusal; no Secret is written."""
        good = {c: remote.kubeconfig(c) for c in ("cluster-b", "cluster-c")}
        mesh.put(good)
        agent = remote.agent(mesh.bundle(key_mode=0o640, gid=os.getgid()))
        seen = istiod_reads(oracle, mesh.directory)
        assert sorted(Path(f["path"]).name for f in seen["files"]) == ["cluster-b.yaml", "cluster-c.yaml"]
        generation = {Path(f["path"]).parent.name for f in seen["files"]}
        assert len(generation) == 1
        for f in seen["files"]:
            path = mesh.directory / f["path"]
            assert path.read_bytes() == good[path.stem]
            assert stat.S_IMODE(path.stat().st_mode) == 0o640
        before = snapshot(mesh.directory)
        insecure = remote.kubeconfig("cluster-c", cluster_extra={"insecure-skip-tls-verify": True})
        mesh.put({**good, "cluster-c": insecure})
        refused = agent.wait_event("bundle_refused")[-1]
        assert "cluster-c sets insecure-skip-tls-verify" in refused["reason"]
        assert snapshot(mesh.directory) == before
        status, body = agent.ready()
        assert status == 200, body
        assert "insecure-skip-tls-verify" in body["bundles"]["remote-clusters"]["last_error"]
        assert remote.kube.requests_to("PATCH", f"/api/v1/namespaces/{remote.namespace}/secrets") == []

    def test_a_deleted_file_is_restored_and_a_planted_one_is_named(self, remote, mesh):
        """Someone deletes a published kubeconfig: the agent restores it. Someone drops a .yaml file istiod would
        also read into the directory: the agent says so in one sentence and leaves the file alone."""
        good = {c: remote.kubeconfig(c) for c in ("cluster-b", "cluster-c")}
        mesh.put(good)
        agent = remote.agent(mesh.bundle())
        (mesh.directory / "cluster-b.yaml").unlink()
        agent.wait_event("bundle_repaired")
        assert (mesh.directory / "cluster-b.yaml").read_bytes() == good["cluster-b"]
        (mesh.directory / "stray.yaml").write_text("kind: Config\n")
        failed = agent.wait_event("repair_failed")[-1]
        assert "stray.yaml is a file the agent did not publish, and istiod would read it" in failed["reason"]
        assert (mesh.directory / "stray.yaml").read_text() == "kind: Config\n"

    def test_moving_a_cluster_to_files_prunes_its_secret(self, remote, mesh):
        """cluster-a moves from a Secret-form bundle (prune: true) to the files bundle: its Secret is pruned, since a
        files bundle claims no Secret, and the Secret of a cluster still in Secret form stays."""
        from tests.support import wait_until

        for cluster in ("cluster-a", "cluster-c"):
            remote.store(cluster, remote.kubeconfig(cluster))
        first = remote.agent(remote.bundle("cluster-a", prune=True), remote.bundle("cluster-c"))
        assert wait_until(lambda: remote.event_reasons().count("BundlePublished") == 2, 5)
        assert first.stop()[0] == 0
        files = mesh.bundle(cluster="cluster-a", source={"kv": f"{remote.kv_mount}/istio/remote-secrets/cluster-a"})
        second = remote.agent(files, remote.bundle("cluster-c"))
        second.wait_event("remote_secret_pruned")
        assert wait_until(lambda: remote.secret("cluster-a") is None, 3)
        assert remote.secret("cluster-c") is not None
        assert (mesh.directory / "cluster-a.yaml").exists()

    def test_init_refuses_a_set_with_a_misnamed_cluster(self, remote, mesh):
        """A kubeconfig of cluster-b stored under key cluster-c: init exits 1 with the one sentence, nothing is
        published."""
        b = remote.kubeconfig("cluster-b")
        mesh.put({"cluster-b": b, "cluster-c": b})
        proc = remote.init(mesh.bundle())
        assert proc.returncode == 1
        assert "cluster-b and cluster-c both name cluster cluster-b" in proc.stderr
        assert not mesh.directory.exists() or not any(mesh.directory.iterdir())
        mesh.put({"cluster-c": b})
        proc = remote.init(mesh.bundle())
        assert proc.returncode == 1
        assert "cluster-c names cluster cluster-b in its current context" in proc.stderr


    def test_init_refuses_a_symlinked_dir_in_one_sentence(self, remote, mesh):
        """dir is a symlink (istiod would read no cluster through it): init exits 1 with the one sentence naming the
        real directory, no traceback, and nothing is published there."""
        real = remote.tmp / "real-kubeconfigs"
        real.mkdir()
        mesh.directory.symlink_to(real)
        mesh.put({"cluster-b": remote.kubeconfig("cluster-b")})
        proc = remote.init(mesh.bundle())
        assert proc.returncode == 1, proc.stderr
        assert "is a symlink" in proc.stderr and str(real) in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
        assert list(real.iterdir()) == []


class TestRacingReader:
    def test_a_reader_racing_publishes_only_ever_sees_whole_files_of_either_set(self, oracle, tmp_path, ca_pem):
        """istiod's reader walking the directory while the agent swaps between two sets, thousands of times: every
        file it reads is a whole kubeconfig of the old or the new set (never a partial or empty one), and every
        cluster in both sets is always there; when the publishing stops, it reads exactly the last set."""
        import threading

        directory = tmp_path / "d"
        target = KubeconfigFilesTarget(files_bundle(directory))
        big = {"user": {"token": "t" * 100_000}}  # large files widen the window a partial write would show in
        sets = [
            {"cluster-b": kubeconfig("cluster-b", ca_pem, **big), "cluster-c": kubeconfig("cluster-c", ca_pem, **big)},
            {"cluster-b": kubeconfig("cluster-b", ca_pem, token="b2"), "cluster-d": kubeconfig("cluster-d", ca_pem,
                                                                                              **big)},
        ]
        import hashlib

        whole = {hashlib.sha256(d).hexdigest(): c for s in sets for c, d in s.items()}
        asyncio.run(target.publish(sets[0]))
        stop = threading.Event()
        published = [0]

        def publisher() -> None:
            async def loop() -> None:
                while not stop.is_set():
                    await target.publish(sets[published[0] % 2])
                    published[0] += 1

            asyncio.run(loop())

        thread = threading.Thread(target=publisher)
        thread.start()
        try:
            proc = subprocess.run([str(oracle), "-path", "kubeconfig-dir", str(directory), "1500"],
                                  capture_output=True, text=True, timeout=120, check=True)
        finally:
            stop.set()
            thread.join()
        reads = json.loads(proc.stdout)
        assert published[0] > 20
        failed = 0
        for read in reads:
            if read.get("error"):
                failed += 1  # a generation removed under the walk: istiod keeps what it had
                continue
            for f in read["files"]:
                assert f["size"] > 0, f"an empty file was visible: {f}"
                assert whole.get(f["sha256"]) == Path(f["path"]).stem, f"a partial or foreign file was read: {f}"
            assert "cluster-b" in {Path(f["path"]).stem for f in read["files"]}
        assert failed < len(reads)
        last = sets[(published[0] - 1) % 2]
        final = istiod_reads(oracle, directory)
        assert sorted(Path(f["path"]).stem for f in final["files"]) == sorted(last)
