"""Remote secrets (multi-primary): the kubeconfig in OpenBao KV v2 becomes Secret istio-remote-secret-<cluster>.

A real OpenBao, the Kubernetes API stand-in (Secrets with server-side apply, every request recorded) and the real
agent in a subprocess. Every agent log is scanned for the kubeconfig's token and content at teardown.
"""

from __future__ import annotations

import base64
import json
import select
import socket
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hvac
import pytest
import yaml

from agent.errors import BundleError
from agent.validate import validate
from agent.validate.kubeconfig import decode_value
from testbed import pki
from testbed.kubeapi import KubeAPI
from testbed.vaultsetup import configure_kubernetes_auth, ensure_secrets_engine
from tests.faultkit import LeakGuard, fixture_leaks  # noqa: F401 - the `leaks` fixture
from tests.support import AgentProc, cli_env, error_line, run_cli, wait_until, write_config

MANAGED = "app.kubernetes.io/managed-by"


@pytest.fixture(name="remote_ca", scope="module")
def fixture_remote_ca() -> pki.CertKey:
    """The remote cluster's API server CA."""
    return pki.root_ca(cn="cluster-a apiserver CA")


def kubeconfig(
    cluster: str, ca_pem: bytes, *, token: str | None = "", server: str = "https://10.0.0.1:6443",
    cluster_extra: dict[str, Any] | None = None, user: dict[str, Any] | None = None, clusters: int = 1,
) -> bytes:
    """A kubeconfig shaped like the one `istioctl create-remote-secret` writes."""
    entry: dict[str, Any] = {"server": server, "certificate-authority-data": base64.b64encode(ca_pem).decode()}
    entry.update(cluster_extra or {})
    cfg = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": f"{cluster}-{i}" if i else cluster, "cluster": entry} for i in range(clusters)],
        "contexts": [{"name": cluster, "context": {"cluster": cluster, "user": cluster}}],
        "current-context": cluster,
        "preferences": {},
        "users": [{"name": cluster, "user": user if user is not None else {"token": token}}],
    }
    return yaml.safe_dump(cfg).encode()


class Remote:
    """One test's OpenBao layout (KV v2 like the seed's kv/istio/remote-secrets/<cluster>), namespace and agents."""

    def __init__(self, client: hvac.Client, kube: KubeAPI, unique: str, tmp: Path, token_file: Path,
                 address: str, leaks: LeakGuard, remote_ca: pki.CertKey) -> None:
        self.client, self.kube, self.tmp, self.address, self.leaks = client, kube, tmp, address, leaks
        self.ca = remote_ca
        self.kv_mount, self.auth_mount = f"kv-{unique}", f"k8s-{unique}"
        self.namespace = f"ns-{unique}"
        self.token_path = token_file
        self.agents: list[AgentProc] = []
        ensure_secrets_engine(client, self.kv_mount, kv_version=2)
        client.sys.create_or_update_policy(
            name=f"remote-{unique}",
            policy=f'path "{self.kv_mount}/data/istio/remote-secrets/*" {{ capabilities = ["read"] }}\n'
                   f'path "{self.kv_mount}/metadata/istio/remote-secrets/*" {{ capabilities = ["read"] }}\n',
        )
        configure_kubernetes_auth(client, kube, mount=self.auth_mount, role="istiod", namespace="istio-system",
                                  service_account="istiod", policies=[f"remote-{unique}"])
        leaks.secret("SA token", token_file.read_text())
        self.kubeconfig_file = kube.write_kubeconfig(tmp / "kubeconfig", kube.mint_token("istio-system", "istiod"))

    def kubeconfig(self, cluster: str = "cluster-a", **kw: Any) -> bytes:
        """A good kubeconfig for `cluster` with a fresh reader token (registered with the leak guard)."""
        token = self.kube.mint_token("istio-system", f"istio-reader-{cluster}", ttl=30 * 86400)
        self.leaks.secret(f"reader token of {cluster}", token)
        return kubeconfig(cluster, self.ca.cert_pem, token=token, **kw)

    def store(self, cluster: str, config: bytes, *, plain: bool = False) -> None:
        """`bao kv put kv/istio/remote-secrets/<cluster>` of istioctl's `data` map (base64 unless `plain`)."""
        value = config.decode() if plain else base64.b64encode(config).decode()
        self.leaks.secret(f"kubeconfig of {cluster} (base64)", base64.b64encode(config).decode())
        self.client.secrets.kv.v2.create_or_update_secret(
            path=f"istio/remote-secrets/{cluster}", secret={cluster: value}, mount_point=self.kv_mount
        )

    def bundle(self, cluster: str = "cluster-a", **extra: Any) -> dict[str, Any]:
        return {"name": f"remote-{cluster}", "type": "remote-secret", "cluster": cluster,
                "source": {"kv": f"{self.kv_mount}/istio/remote-secrets/{cluster}"}, **extra}

    def config(self, *bundles: dict[str, Any], poll: str = "300ms") -> Path:
        cfg = {
            "vault": {"address": self.address},
            "auth": {"method": "kubernetes", "mount": self.auth_mount, "role": "istiod",
                     "token_path": str(self.token_path)},
            "bundles": list(bundles) or [self.bundle()],
            "init": {"timeout": "10s"},
            "health": {"listen": "127.0.0.1:0"},
            "sidecar": {"poll_interval": poll},
        }
        return write_config(self.tmp / f"agent-{len(self.agents)}.yaml", cfg)

    def env(self) -> dict[str, str]:
        return cli_env(KUBECONFIG=str(self.kubeconfig_file), POD_NAME="istiod-0", POD_NAMESPACE=self.namespace)

    def agent(self, *bundles: dict[str, Any], ready: bool = True) -> AgentProc:
        proc = AgentProc(self.config(*bundles), env=self.env())
        self.agents.append(proc)
        self.leaks.watch(f"agent log {proc.log.name}", proc.log)
        proc.start().wait_event("health_listening")
        if ready:
            proc.wait_event("sidecar_ready")
        return proc

    def init(self, *bundles: dict[str, Any]) -> Any:
        proc = run_cli("run", "--config", str(self.config(*bundles)), "--mode", "init", env=self.env())
        self.leaks.watch("init output", proc.stdout + proc.stderr)
        return proc

    def secret(self, cluster: str = "cluster-a") -> dict[str, Any] | None:
        return self.kube.secret(self.namespace, f"istio-remote-secret-{cluster}")

    def data(self, cluster: str = "cluster-a") -> bytes | None:
        secret = self.secret(cluster)
        return None if secret is None else base64.b64decode(secret["data"][cluster])

    def event_reasons(self) -> list[str]:
        """The reasons of the Events recorded in the test's namespace so far."""
        posts = self.kube.requests_to("POST", f"/api/v1/namespaces/{self.namespace}/events")
        return [r.body.get("reason") for r in posts]

    def writes(self, cluster: str = "cluster-a") -> int:
        """PATCH (apply), POST and DELETE requests the agent sent for the cluster's Secret."""
        path = f"/api/v1/namespaces/{self.namespace}/secrets"
        return sum(len(self.kube.requests_to(m, f"{path}/istio-remote-secret-{cluster}")) for m in ("PATCH", "DELETE"))

    def close(self) -> None:
        for proc in self.agents:
            proc.stop()
        for proc in self.agents:
            assert "Traceback" not in proc.stderr, proc.tail()


@pytest.fixture(name="remote")
def fixture_remote(bao, kube, unique, tmp_path, sa_token_file, leaks, remote_ca) -> Iterator[Remote]:
    world = Remote(bao.client(), kube, unique, tmp_path, sa_token_file("istio-system", "istiod"), bao.address,
                   leaks, remote_ca)
    yield world
    world.close()


@pytest.fixture(name="ca_pem", scope="module")
def fixture_ca_pem(remote_ca) -> bytes:
    return remote_ca.cert_pem


def publish_total(agent: AgentProc, bundle: str = "remote-cluster-a") -> float:
    return agent.metric(f'istio_vault_agent_publish_total{{bundle="{bundle}"}}')


class TestApply:
    def test_the_secret_appears_with_label_and_annotation(self, remote):
        """The sidecar applies Secret istio-remote-secret-cluster-a in the pod's namespace: istiod's label and
        annotation, the owner labels, the kubeconfig decoded from KV's base64, applied by field manager
        istio-vault-agent; counted as a publish and recorded as an Event."""
        config = remote.kubeconfig()
        remote.store("cluster-a", config)
        agent = remote.agent()
        secret = remote.secret()
        assert secret is not None, agent.tail()
        meta = secret["metadata"]
        assert meta["labels"]["istio/multiCluster"] == "true"
        assert meta["annotations"]["networking.istio.io/cluster"] == "cluster-a"
        assert meta["labels"][MANAGED] == "istio-vault-agent"
        assert meta["labels"]["istio-vault-agent/bundle"] == "remote-cluster-a"
        assert remote.data() == config
        assert "istio-vault-agent" in remote.kube.secret_managers(remote.namespace, meta["name"])
        patch = remote.kube.requests_to("PATCH", f"/api/v1/namespaces/{remote.namespace}/secrets/")[-1]
        assert patch.headers["content-type"] == "application/apply-patch+yaml"
        assert publish_total(agent) == 1
        status, body = agent.ready()
        assert status == 200 and body["bundles"]["remote-cluster-a"]["ready"], body
        assert wait_until(lambda: "BundlePublished" in remote.event_reasons(), 5)

    def test_plain_kubeconfig_is_accepted_too(self, remote):
        """A kubeconfig stored as plain text instead of base64 gives the same Secret."""
        config = remote.kubeconfig()
        remote.store("cluster-a", config, plain=True)
        proc = remote.init()
        assert proc.returncode == 0, proc.stderr
        assert remote.data() == config

    def test_an_update_in_kv_updates_the_secret(self, remote):
        """A new KV version with a new kubeconfig is applied to the Secret within a few polls."""
        remote.store("cluster-a", remote.kubeconfig())
        agent = remote.agent()
        new = remote.kubeconfig()
        remote.store("cluster-a", new)
        assert wait_until(lambda: remote.data() == new, 5), agent.tail()
        assert wait_until(lambda: publish_total(agent) == 2, 2)

    def test_identical_content_makes_no_write(self, remote):
        """The same kubeconfig written again as a new KV version, and an agent restart, send no write to the API:
        the agent compares with what it applied and with what the API returns."""
        config = remote.kubeconfig()
        remote.store("cluster-a", config)
        agent = remote.agent()
        assert remote.writes() == 1
        remote.store("cluster-a", config)  # version 2, same data
        reads = len(remote.kube.requests_to("GET", f"/api/v1/namespaces/{remote.namespace}/secrets/"))
        assert wait_until(lambda: len(remote.kube.requests_to(
            "GET", f"/api/v1/namespaces/{remote.namespace}/secrets/")) >= reads + 3, 5)  # a few polls went by
        assert remote.writes() == 1
        assert agent.stop()[0] == 0
        restarted = remote.agent()
        assert remote.writes() == 1
        assert publish_total(restarted) == 1  # counted as live, not written

    def test_a_deleted_secret_is_restored(self, remote):
        """Someone deletes the Secret: the agent applies it again at the next poll."""
        config = remote.kubeconfig()
        remote.store("cluster-a", config)
        agent = remote.agent()
        assert remote.kube.remove_secret(remote.namespace, "istio-remote-secret-cluster-a")
        assert wait_until(lambda: remote.data() == config, 5), agent.tail()
        agent.wait_event("bundle_repaired")

    def test_a_hand_edit_is_taken_back(self, remote):
        """Someone else's manager rewrites the kubeconfig in the agent's Secret: the agent applies with force and
        owns the field again."""
        config = remote.kubeconfig()
        remote.store("cluster-a", config)
        agent = remote.agent()
        edited = remote.secret()
        edited["data"]["cluster-a"] = base64.b64encode(b"edited by hand").decode()
        remote.kube.put_secret(edited, manager="kubectl-edit")
        assert wait_until(lambda: remote.data() == config, 5), agent.tail()
        owners = remote.kube.secret_managers(remote.namespace, "istio-remote-secret-cluster-a")
        assert ("data", "cluster-a") in owners["istio-vault-agent"]
        assert ("data", "cluster-a") not in owners.get("kubectl-edit", set())

    def test_init_mode_publishes_once(self, remote):
        """`run --mode init` applies the Secret with one write and exits 0."""
        config = remote.kubeconfig()
        remote.store("cluster-a", config)
        proc = remote.init()
        assert proc.returncode == 0, proc.stderr
        assert remote.data() == config
        assert remote.writes() == 1


class TestRefusals:
    def test_a_bad_kubeconfig_is_refused_and_the_old_secret_stays(self, remote):
        """insecure-skip-tls-verify in a new version: refused in one sentence, the old Secret stays, /readyz stays
        200 and names the refusal, errors_total counts it; init mode exits 1 with that sentence."""
        good = remote.kubeconfig()
        remote.store("cluster-a", good)
        agent = remote.agent()
        remote.store("cluster-a", remote.kubeconfig(cluster_extra={"insecure-skip-tls-verify": True}))
        refused = agent.wait_event("bundle_refused")[-1]
        assert "insecure-skip-tls-verify" in refused["reason"]
        assert remote.data() == good
        assert remote.writes() == 1
        status, body = agent.ready()
        assert status == 200, body
        assert "insecure-skip-tls-verify" in body["bundles"]["remote-cluster-a"]["last_error"]
        assert agent.metric('istio_vault_agent_errors_total{bundle="remote-cluster-a",reason="invalid_bundle"}') >= 1
        proc = remote.init()
        assert proc.returncode == 1
        assert "cluster-a sets insecure-skip-tls-verify" in error_line(proc)

    def test_an_unmanaged_secret_is_not_overwritten(self, remote):
        """A Secret of the same name that the agent does not manage is left as it is, with a clear error."""
        theirs = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                  "metadata": {"name": "istio-remote-secret-cluster-a", "namespace": remote.namespace,
                               "labels": {"istio/multiCluster": "true"}},
                  "data": {"cluster-a": base64.b64encode(b"theirs").decode()}}
        remote.kube.put_secret(theirs)
        remote.store("cluster-a", remote.kubeconfig())
        proc = remote.init()
        assert proc.returncode == 1
        line = error_line(proc)
        assert "exists and is not managed by istio-vault-agent" in line
        assert remote.data() == b"theirs"
        assert remote.writes() == 0


    def test_a_secret_of_a_bundle_still_configured_is_refused(self, remote):
        """A Secret the agent manages for a bundle that is still in the config (here relabelled by hand to
        cluster-b's bundle) is not taken over: init exits 1 naming that bundle, and the Secret stays as it is."""
        remote.store("cluster-a", remote.kubeconfig())
        remote.store("cluster-b", remote.kubeconfig("cluster-b"))
        theirs = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                  "metadata": {"name": "istio-remote-secret-cluster-a", "namespace": remote.namespace,
                               "labels": {"istio/multiCluster": "true", MANAGED: "istio-vault-agent",
                                          "istio-vault-agent/bundle": "remote-cluster-b"}},
                  "data": {"cluster-a": base64.b64encode(b"theirs").decode()}}
        remote.kube.put_secret(theirs)
        proc = remote.init(remote.bundle("cluster-a"), remote.bundle("cluster-b"))
        assert proc.returncode == 1
        assert "is managed by bundle 'remote-cluster-b', not remote-cluster-a" in error_line(proc)
        assert remote.data() == b"theirs"
        assert remote.writes() == 0

    @pytest.mark.parametrize("method", ["GET", "PATCH"])
    def test_an_answer_that_is_not_a_secret_is_an_error(self, remote, method):
        """A Secret read or apply answered 200 with something that is not an object: init exits 1 with one sentence
        instead of reporting success, and an unmanaged Secret of that name is not written (an odd read is never
        taken for "absent")."""
        if method == "GET":
            meta = {"name": "istio-remote-secret-cluster-a", "namespace": remote.namespace}
            remote.kube.put_secret({"apiVersion": "v1", "kind": "Secret", "type": "Opaque", "metadata": meta,
                                    "data": {"cluster-a": base64.b64encode(b"theirs").decode()}})
        remote.store("cluster-a", remote.kubeconfig())
        remote.kube.add_handler(method, f"/api/v1/namespaces/{remote.namespace}/secrets/{{name}}",
                                lambda _req: (200, "<html>login</html>"))
        proc = remote.init()
        assert proc.returncode == 1
        assert "with something that is not an object" in error_line(proc)
        assert remote.data() == (b"theirs" if method == "GET" else None)


class TestRename:
    def test_a_renamed_bundle_takes_its_secret_over(self, remote):
        """Restarted with the cluster's bundle under a new name, the sidecar relabels the Secret to the new bundle
        (one apply, same kubeconfig) and becomes ready, instead of refusing until init.timeout; the old name's
        Secret is not pruned."""
        config = remote.kubeconfig()
        remote.store("cluster-a", config)
        first = remote.agent(remote.bundle(prune=True))
        assert first.stop()[0] == 0
        renamed = {**remote.bundle(), "name": "cluster-a-primary"}
        second = remote.agent(renamed)
        secret = remote.secret()
        assert secret is not None, second.tail()
        assert secret["metadata"]["labels"]["istio-vault-agent/bundle"] == "cluster-a-primary"
        assert secret["metadata"]["annotations"]["istio-vault-agent/prune"] == "false"
        assert remote.data() == config
        assert remote.writes() == 2
        taken = second.wait_event("remote_secret_taken_over")[-1]
        assert (taken["previous"], taken["bundle"]) == ("remote-cluster-a", "cluster-a-primary")
        status, body = second.ready()
        assert status == 200 and body["bundles"]["cluster-a-primary"]["ready"], body

    def test_init_takes_over_too(self, remote):
        """`run --mode init` with the renamed bundle exits 0 and leaves the Secret labelled with the new name."""
        remote.store("cluster-a", remote.kubeconfig())
        assert remote.init().returncode == 0
        proc = remote.init({**remote.bundle(), "name": "cluster-a-primary"})
        assert proc.returncode == 0, proc.stderr
        assert remote.secret()["metadata"]["labels"]["istio-vault-agent/bundle"] == "cluster-a-primary"

    def test_two_bundles_for_one_secret_are_refused_at_load(self, remote):
        """Old and new name side by side for one cluster is a config error, also when one of them spells out the
        pod's namespace and the other leaves it implicit."""
        remote.store("cluster-a", remote.kubeconfig())
        proc = remote.init(remote.bundle(), {**remote.bundle(), "name": "cluster-a-primary",
                                             "namespace": remote.namespace})
        assert proc.returncode == 1
        assert "one bundle per remote cluster" in error_line(proc)
        assert remote.secret() is None


class TestUnavailableAPI:
    @pytest.mark.parametrize("fault", ["refused", "500"])
    def test_init_retries_until_the_api_recovers(self, remote, tmp_path, fault):
        """In init mode a Kubernetes API that refuses connections, or answers 500, for about 3 s is retried with the
        same backoff as an unavailable Vault (logged retryable, naming the API address), and the Secret is applied
        once it recovers: exit 0."""
        config = remote.kubeconfig()
        remote.store("cluster-a", config)
        with KubeAPI() as api:  # a private API server: the shared one also answers OpenBao's TokenReviews
            token = api.mint_token("istio-system", "istiod")
            remote.leaks.secret("private API token", token)
            remote.kubeconfig_file = api.write_kubeconfig(tmp_path / "private-kubeconfig", token)
            if fault == "refused":
                api.pause()
                recover = api.start
            else:
                recover = api.add_handler("GET", "/api/v1/namespaces/{namespace}/secrets/{name}", lambda _req: (
                    500, {"kind": "Status", "code": 500, "message": "etcdserver: leader changed"}))
            timer = threading.Timer(3.0, recover)
            timer.start()
            try:
                proc = remote.init()
            finally:
                timer.cancel()
            assert proc.returncode == 0, proc.stderr[-3000:]
            secret = api.secret(remote.namespace, "istio-remote-secret-cluster-a")
        assert secret is not None and base64.b64decode(secret["data"]["cluster-a"]) == config
        failures = [json.loads(line) for line in proc.stderr.splitlines() if '"sync_failed"' in line]
        assert failures, proc.stderr[-3000:]
        assert all(f["retryable"] is True for f in failures), failures
        assert all(api.url in f["reason"] for f in failures), failures
        assert "500" in failures[0]["reason"] if fault == "500" else "cannot reach" in failures[0]["reason"]


class TestPrune:
    def test_prune_on_removal(self, remote):
        """Restarted without two of its bundles, the agent deletes the Secret whose bundle had prune: true and keeps
        the one without it, and never an unmanaged Secret."""
        for cluster in ("cluster-a", "cluster-b", "cluster-c"):
            remote.store(cluster, remote.kubeconfig(cluster))
        other = {"apiVersion": "v1", "kind": "Secret",
                 "metadata": {"name": "istio-remote-secret-cluster-x", "namespace": remote.namespace,
                              "labels": {"istio/multiCluster": "true"}}, "data": {"cluster-x": "eA=="}}
        remote.kube.put_secret(other)
        bundles = [remote.bundle("cluster-a", prune=True), remote.bundle("cluster-b"),
                   remote.bundle("cluster-c", prune=True)]
        first = remote.agent(*bundles)
        assert all(remote.secret(c) for c in ("cluster-a", "cluster-b", "cluster-c"))
        # let the three BundlePublished Events finish: stopping with one in flight is another matter
        assert wait_until(lambda: remote.event_reasons().count("BundlePublished") == 3, 5)
        assert first.stop()[0] == 0
        second = remote.agent(bundles[2])
        second.wait_event("remote_secret_pruned")
        assert wait_until(lambda: remote.secret("cluster-a") is None, 3)
        assert remote.secret("cluster-b") is not None  # no prune: kept
        assert remote.secret("cluster-c") is not None  # still configured
        assert remote.secret("cluster-x") is not None  # not the agent's
        assert [e["object"] for e in second.events("remote_secret_pruned")] == [
            f"{remote.namespace}/istio-remote-secret-cluster-a"]


    def test_a_forbidden_delete_names_the_chart_value_that_grants_it(self, remote):
        """When RBAC forbids deleting a pruned Secret (the chart grants delete only on retired clusters), the warning
        says to list the cluster in remoteSecrets.retiredClusters, and the Secret stays."""
        for cluster in ("cluster-a", "cluster-b"):
            remote.store(cluster, remote.kubeconfig(cluster))
        bundles = [remote.bundle("cluster-a", prune=True), remote.bundle("cluster-b")]
        first = remote.agent(*bundles)
        assert wait_until(lambda: remote.event_reasons().count("BundlePublished") == 2, 5)
        assert first.stop()[0] == 0
        remote.kube.add_handler("DELETE", f"/api/v1/namespaces/{remote.namespace}/secrets/{{name}}", lambda _req: (
            403, {"kind": "Status", "code": 403, "reason": "Forbidden", "message": "secrets is forbidden"}))
        second = remote.agent(bundles[1])
        failed = second.wait_event("remote_secret_prune_failed")[-1]
        assert "may not delete Secret" in failed["reason"]
        assert "remoteSecrets.retiredClusters" in failed["reason"]
        assert remote.secret("cluster-a") is not None


class TestShutdown:
    @pytest.mark.parametrize("call", ["secret GET", "Event POST"])
    def test_sigterm_with_a_hung_kubernetes_call_exits_0_within_a_second(self, remote, call):
        """SIGTERM while a Secret read or an Event hangs in the Kubernetes API: exit 0 within a second
        (docs/concepts.md), and no SIGABRT when the abandoned call returns while the agent exits."""
        remote.store("cluster-a", remote.kubeconfig())
        agent = remote.agent()
        entered, release = threading.Event(), threading.Event()

        def hang(_req: Any) -> tuple[int, Any]:
            entered.set()
            release.wait(30)
            return 500, {"kind": "Status", "message": "late"}

        if call == "secret GET":
            remote.kube.add_handler("GET", f"/api/v1/namespaces/{remote.namespace}/secrets/{{name}}", hang)
        else:
            remote.kube.add_handler("POST", f"/api/v1/namespaces/{remote.namespace}/events", hang)
            remote.store("cluster-a", remote.kubeconfig())  # a new version: published, then a BundlePublished Event
        assert entered.wait(10)
        # the call returns just after the agent stopped waiting for it, while it exits
        timer = threading.Timer(0.6, release.set)
        timer.start()
        try:
            rc, took = agent.stop()
        finally:
            timer.cancel()
            release.set()
        assert rc == 0 and took < 1.0, (rc, took, agent.tail())
        assert agent.events("sidecar_stopped")


    def test_sigterm_while_the_api_never_answers_exits_0_within_a_second(self, remote, tmp_path):
        """SIGTERM while the first Secret read waits on an API server that accepted the connection and never
        answers (not even TLS): the request is aborted and the agent exits 0 within a second."""
        remote.store("cluster-a", remote.kubeconfig())
        with socket.socket() as silent:
            silent.bind(("127.0.0.1", 0))
            silent.listen(16)
            config = yaml.safe_load(remote.kubeconfig_file.read_text())
            config["clusters"][0]["cluster"]["server"] = f"https://127.0.0.1:{silent.getsockname()[1]}"
            remote.kubeconfig_file = tmp_path / "silent-kubeconfig"
            remote.kubeconfig_file.write_text(yaml.safe_dump(config))
            agent = remote.agent(ready=False)
            assert select.select([silent], [], [], 10)[0], agent.tail()  # the agent's connection is waiting
            rc, took = agent.stop()
        assert rc == 0 and took < 1.0, (rc, took, agent.tail())
        assert agent.events("sidecar_stopped")


class TestKubeconfigCheck:
    """The validator alone (pure): what istiod needs of a remote secret, one sentence per refusal."""

    def check(self, config: bytes) -> Any:
        return validate("remote-secret", {"cluster-a": config})

    @pytest.mark.parametrize(("change", "expect"), [
        ({"server": "http://10.0.0.1:6443"}, "needs an https:// server URL"),
        ({"cluster_extra": {"insecure-skip-tls-verify": True}}, "sets insecure-skip-tls-verify"),
        ({"user": {"exec": {"command": "aws"}}}, "uses an exec credential plugin"),
        ({"user": {"auth-provider": {"name": "gcp"}}}, "uses an auth-provider plugin"),
        ({"user": {"tokenFile": "/var/run/token"}}, "uses a tokenFile path"),
        ({"user": {}}, "has no credentials"),
        ({"clusters": 2}, "exactly one entry in clusters, not 2"),
        ({"cluster_extra": {"certificate-authority-data": "bm90IGEgY2VydA=="}}, "no PEM certificate"),
    ])
    def test_refusals(self, ca_pem, change, expect):
        """Each problem is refused with one sentence that names the cluster and what to fix."""
        with pytest.raises(BundleError) as info:
            self.check(kubeconfig("cluster-a", ca_pem, token="t0ken", **change))
        message = str(info.value)
        assert expect in message and "cluster-a" in message
        assert "t0ken" not in message and "\n" not in message

    @pytest.mark.parametrize(("value", "expect"), [
        (bytes(range(256)) * 64, "is not valid YAML"),
        (b"a: &a [x, x, x, x, x, x, x, x, x]\n" + b"".join(
            f"{n}: &{n} [{', '.join([f'*{p}'] * 9)}]\n".encode() for p, n in zip("abcdefgh", "bcdefghi", strict=True)
        ) + b"kind: Config\nclusters: *i\n", "exactly one entry in clusters, not 9"),
        (b"[" * 50_000 + b"]" * 50_000, "is not valid YAML"),
        (b"kind: Config\nx: " + b"y" * 2_000_000, "over the agent's limit"),
    ], ids=["binary", "alias-bomb", "deep", "huge"])
    def test_hostile_values_are_refused_quickly(self, value, expect):
        """Binary data, a YAML alias bomb, deep nesting or a 2 MB value is one refusal sentence within seconds."""
        started = time.monotonic()
        with pytest.raises(BundleError, match=expect) as info:
            self.check(decode_value(value))
        assert time.monotonic() - started < 5
        assert "\n" not in str(info.value) and len(str(info.value)) < 300

    def test_missing_ca_and_not_yaml(self, ca_pem):
        """No certificate-authority-data, or text that is not YAML, is refused without echoing the content."""
        config = yaml.safe_load(kubeconfig("cluster-a", ca_pem, token="t0ken"))
        del config["clusters"][0]["cluster"]["certificate-authority-data"]
        with pytest.raises(BundleError, match="needs certificate-authority-data"):
            self.check(yaml.safe_dump(config).encode())
        with pytest.raises(BundleError, match="is not valid YAML") as info:
            self.check(b"token: s3cr3t: [")
        assert "s3cr3t" not in str(info.value)

    def test_accepts_token_and_client_certificate(self, ca_pem):
        """A token, or inline client certificate and key, is accepted; expiry is the earliest of CA and client."""
        root = pki.root_ca(cn="client CA", days=400)
        client = pki.leaf_cert(root, cn="istio-reader", days=20)
        info = self.check(kubeconfig("cluster-a", ca_pem, token="t0ken"))
        assert info.kind == "remote-secret"
        user = {"client-certificate-data": base64.b64encode(client.cert_pem).decode(),
                "client-key-data": base64.b64encode(client.key_pem).decode()}
        info = self.check(kubeconfig("cluster-a", ca_pem, user=user))
        assert info.expires_at == info.not_after["client-certificate-data"]

    def test_an_expired_token_is_refused(self, ca_pem, kube):
        """A reader token whose `exp` has passed is refused, naming the token but never showing it."""
        token = kube.mint_token("istio-system", "istio-reader", ttl=-60)
        with pytest.raises(BundleError, match="has an expired token") as info:
            self.check(kubeconfig("cluster-a", ca_pem, token=token))
        assert token.split(".")[1] not in str(info.value)

    def test_base64_or_plain(self, ca_pem):
        """A KV value is decoded from base64 when it is base64, and taken as it is otherwise."""
        config = kubeconfig("cluster-a", ca_pem, token="t0ken")
        assert decode_value(base64.b64encode(config)) == config
        assert decode_value(config) == config


def test_kube_secret_stand_in_conflicts_without_force(kube, unique):
    """The stand-in's server-side apply over HTTPS: YAML bodies are taken, another manager's field with a different
    value conflicts (409) unless force, a no-op apply keeps the resourceVersion, DELETE checks the uid."""
    ns, name = f"ssa-{unique}", "s"
    url = f"{kube.url}/api/v1/namespaces/{ns}/secrets/{name}"
    token = kube.mint_token("istio-system", "istiod")
    context = ssl.create_default_context(cafile=str(kube.ca_file))

    def call(method: str, query: str = "", body: bytes | None = None) -> tuple[int, Any]:
        request = urllib.request.Request(f"{url}?{query}", data=body, method=method, headers={
            "Authorization": f"Bearer {token}", "Content-Type": "application/apply-patch+yaml"})
        try:
            with urllib.request.urlopen(request, context=context, timeout=5) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def apply(data: str, manager: str, force: bool = False) -> tuple[int, Any]:
        body = f"apiVersion: v1\nkind: Secret\nmetadata: {{name: {name}}}\ndata: {{k: {data}}}\n".encode()
        return call("PATCH", f"fieldManager={manager}&force={'true' if force else 'false'}", body)

    assert apply("YQ==", "a")[0] == 201
    status, first = apply("YQ==", "a")
    assert status == 200
    assert apply("Yg==", "b")[0] == 409
    status, forced = apply("Yg==", "b", force=True)
    assert status == 200 and forced["data"]["k"] == "Yg=="
    assert int(forced["metadata"]["resourceVersion"]) == int(first["metadata"]["resourceVersion"]) + 1
    wrong_uid = json.dumps({"preconditions": {"uid": "not-the-uid"}}).encode()
    assert call("DELETE", body=wrong_uid)[0] == 409
    assert call("DELETE")[0] == 200
    assert call("GET")[0] == 404
