"""Kubernetes side against the API stand-in: rollout restart patches, Events on the agent's pod, lazy import."""

from __future__ import annotations

import asyncio
import datetime as dt
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.config import BundleConfig, KubernetesConfig, RolloutRestartReload, RolloutTarget, SourceConfig
from agent.errors import ReloadError
from agent.kube import RESTARTED_AT, Kube, emit_event
from agent.reload import reload
from testbed.kubeapi import KubeAPI, KubeRequest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(name="kube_env")
def fixture_kube_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """No in-cluster env, no pod identity, and a HOME without ~/.kube/config."""
    for var in ("KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT", "KUBECONFIG", "POD_NAME", "POD_NAMESPACE",
                "POD_UID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return monkeypatch


@pytest.fixture(name="client")
def fixture_client(kube: KubeAPI, kube_env: pytest.MonkeyPatch, tmp_path: Path, unique: str) -> Iterator[Kube]:
    """A Kube loaded from a kubeconfig (KUBECONFIG) that points at the stand-in with a valid token."""
    token = kube.mint_token("istio-system", f"agent-{unique}")
    path = kube.write_kubeconfig(tmp_path / "kubeconfig", token, namespace=f"ctx-{unique}")
    kube_env.setenv("KUBECONFIG", str(path))
    client = Kube.maybe()
    assert client is not None
    yield client
    client.close()


def _patches(kube: KubeAPI, path: str) -> list[KubeRequest]:
    return kube.requests_to("PATCH", path)


def _restarted_at(req: KubeRequest) -> dt.datetime:
    value = req.body["spec"]["template"]["metadata"]["annotations"][RESTARTED_AT]
    assert value.endswith("Z")
    return dt.datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)


class TestRolloutRestart:
    @pytest.mark.parametrize(
        ("kind", "plural"),
        [("Deployment", "deployments"), ("DaemonSet", "daemonsets"), ("StatefulSet", "statefulsets")],
    )
    def test_patches_pod_template_like_kubectl(
        self, kube: KubeAPI, client: Kube, unique: str, kind: str, plural: str
    ) -> None:
        """A strategic merge patch sets only the restartedAt pod-template annotation to now, as kubectl does."""
        target = RolloutTarget(kind=kind, name=f"istiod-{unique}", namespace="istio-system")  # type: ignore[arg-type]
        before = dt.datetime.now(dt.UTC).replace(microsecond=0)
        desc = client.rollout_restart(target)
        path = f"/apis/apps/v1/namespaces/istio-system/{plural}/istiod-{unique}"
        [req] = _patches(kube, path)
        assert req.headers["content-type"] == "application/strategic-merge-patch+json"
        assert req.user == f"system:serviceaccount:istio-system:agent-{unique}"
        assert set(req.body) == {"spec"}
        assert set(req.body["spec"]["template"]["metadata"]["annotations"]) == {RESTARTED_AT}
        assert before <= _restarted_at(req) <= dt.datetime.now(dt.UTC)
        assert f"{kind} istio-system/istiod-{unique}" in desc

    def test_namespace_falls_back_to_pod_namespace(
        self, kube: KubeAPI, client: Kube, kube_env: pytest.MonkeyPatch, unique: str
    ) -> None:
        """A target without namespace is restarted in the pod's namespace, else in the kubeconfig context's."""
        target = RolloutTarget(kind="Deployment", name=f"gw-{unique}")
        client.rollout_restart(target)
        assert _patches(kube, f"/apis/apps/v1/namespaces/ctx-{unique}/deployments/gw-{unique}")
        client.pod = KubernetesConfig(pod_namespace=f"pod-{unique}")
        client.rollout_restart(target)
        assert _patches(kube, f"/apis/apps/v1/namespaces/pod-{unique}/deployments/gw-{unique}")

    def test_reload_action_uses_kube(self, kube: KubeAPI, client: Kube, unique: str) -> None:
        """`reload` with action rollout-restart patches the target through the given client."""
        bundle = BundleConfig(
            name="gw",
            dir="/unused",
            source=SourceConfig(kv="secret/gw"),
            reload=RolloutRestartReload(
                target=RolloutTarget(kind="StatefulSet", name=f"db-{unique}", namespace="apps")
            ),
        )
        desc = asyncio.run(reload(bundle, kube=client))
        assert _patches(kube, f"/apis/apps/v1/namespaces/apps/statefulsets/db-{unique}")
        assert "StatefulSet apps/db-" in desc

    @pytest.mark.parametrize(
        ("status", "needle"), [(404, "does not exist"), (403, "RBAC verb patch"), (500, "answered 500")]
    )
    def test_api_refusal_is_one_sentence(
        self, kube: KubeAPI, client: Kube, unique: str, status: int, needle: str
    ) -> None:
        """A missing workload, an RBAC refusal or a server error becomes a ReloadError that says what to fix."""
        remove = kube.add_handler(
            "PATCH",
            f"/apis/apps/v1/namespaces/{{namespace}}/deployments/bad-{unique}",
            lambda _r: (status, {"kind": "Status", "code": status, "message": "no"}),
        )
        try:
            with pytest.raises(ReloadError, match=needle) as err:
                client.rollout_restart(RolloutTarget(kind="Deployment", name=f"bad-{unique}", namespace="x"))
        finally:
            remove()
        assert f"Deployment x/bad-{unique}" in str(err.value)
        assert "\n" not in str(err.value)

    def test_without_kubernetes_access_reload_says_so(self, kube_env: pytest.MonkeyPatch) -> None:
        """With no in-cluster config and no kubeconfig, rollout-restart fails naming what to set."""
        bundle = BundleConfig(
            name="gw",
            dir="/unused",
            source=SourceConfig(kv="secret/gw"),
            reload=RolloutRestartReload(target=RolloutTarget(kind="Deployment", name="x", namespace="y")),
        )
        assert Kube.maybe() is None
        with pytest.raises(ReloadError, match="KUBECONFIG"):
            asyncio.run(reload(bundle))

    def test_in_cluster_config(self, kube: KubeAPI, kube_env: pytest.MonkeyPatch, tmp_path: Path, unique: str) -> None:
        """In a pod: host from KUBERNETES_SERVICE_HOST/PORT, token and CA from the SA dir, its namespace as default."""
        sa = tmp_path / "sa"
        sa.mkdir()
        (sa / "token").write_text(kube.mint_token(f"ns-{unique}", "agent"))
        (sa / "ca.crt").write_bytes(kube.ca_pem)
        (sa / "namespace").write_text(f"ns-{unique}\n")
        kube_env.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
        kube_env.setenv("KUBERNETES_SERVICE_PORT", str(kube.port))
        client = Kube.maybe(sa_dir=sa)
        assert client is not None and client.origin == "in-cluster"
        try:
            client.rollout_restart(RolloutTarget(kind="DaemonSet", name=f"ds-{unique}"))
        finally:
            client.close()
        [req] = _patches(kube, f"/apis/apps/v1/namespaces/ns-{unique}/daemonsets/ds-{unique}")
        assert req.user == f"system:serviceaccount:ns-{unique}:agent"


class TestEvents:
    def test_event_on_own_pod(self, kube: KubeAPI, client: Kube, kube_env: pytest.MonkeyPatch, unique: str) -> None:
        """With the pod's name, namespace and uid known, an Event about that pod is created with reason and source."""
        ns = f"ev-{unique}"
        client.pod = KubernetesConfig(pod_name="istiod-abc", pod_namespace=ns, pod_uid="1234-uid")
        assert asyncio.run(emit_event(client, "BundlePublished", "published bundle istio-ca (generation 2)"))
        [req] = kube.requests_to("POST", f"/api/v1/namespaces/{ns}/events")
        body = req.body
        assert body["involvedObject"] == {
            "apiVersion": "v1", "kind": "Pod", "name": "istiod-abc", "namespace": ns, "uid": "1234-uid"
        }
        assert (body["reason"], body["type"], body["count"]) == ("BundlePublished", "Normal", 1)
        assert body["message"] == "published bundle istio-ca (generation 2)"
        assert body["source"]["component"] == "istio-vault-agent"
        assert body["metadata"]["name"].startswith("istiod-abc.")
        assert body["firstTimestamp"] and body["firstTimestamp"] == body["lastTimestamp"]

    def test_warning_message_truncated_and_redacted(
        self, kube: KubeAPI, client: Kube, kube_env: pytest.MonkeyPatch, unique: str
    ) -> None:
        """A Warning event keeps its type; a long message is cut to 1024 characters and key material never leaves."""
        ns = f"ev-{unique}"
        client.pod = KubernetesConfig(pod_name="p", pod_namespace=ns)
        leak = "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMG\n-----END PRIVATE KEY-----"
        assert client.event("BundleRefused", f"refused: {leak} " + "x" * 3000, type="Warning")
        [req] = kube.requests_to("POST", f"/api/v1/namespaces/{ns}/events")
        assert req.body["type"] == "Warning"
        assert len(req.body["message"]) == 1024
        assert "PRIVATE KEY" not in req.body["message"] and "MIGHAgEAMBMG" not in req.body["message"]

    def test_no_pod_identity_no_event(self, kube: KubeAPI, client: Kube, unique: str) -> None:
        """Without POD_NAME/POD_NAMESPACE nothing is sent."""
        before = len(kube.requests_to("POST", "/api/v1/namespaces/"))
        assert asyncio.run(emit_event(client, "RootChanged", "root changed")) is False
        assert asyncio.run(emit_event(None, "RootChanged", "root changed")) is False
        assert len(kube.requests_to("POST", "/api/v1/namespaces/")) == before

    def test_server_error_never_raises(
        self, kube: KubeAPI, client: Kube, kube_env: pytest.MonkeyPatch, unique: str
    ) -> None:
        """An apiserver that answers 500 makes emit_event return False, not raise."""
        ns = f"ev-{unique}"
        client.pod = KubernetesConfig(pod_name="p", pod_namespace=ns)
        remove = kube.add_handler("POST", f"/api/v1/namespaces/{ns}/events", lambda _r: (500, {"kind": "Status"}))
        try:
            assert asyncio.run(emit_event(client, "BundlePublished", "m")) is False
        finally:
            remove()
        assert kube.requests_to("POST", f"/api/v1/namespaces/{ns}/events")

    def test_hanging_server_returns_within_timeout(
        self, kube: KubeAPI, client: Kube, kube_env: pytest.MonkeyPatch, unique: str
    ) -> None:
        """An apiserver that does not answer holds emit_event no longer than its timeout."""
        ns = f"ev-{unique}"
        client.pod = KubernetesConfig(pod_name="p", pod_namespace=ns)

        def hang(_r: KubeRequest) -> tuple[int, object]:
            time.sleep(4)
            return 201, {}

        remove = kube.add_handler("POST", f"/api/v1/namespaces/{ns}/events", hang)
        try:
            start = time.monotonic()
            assert asyncio.run(emit_event(client, "BundlePublished", "m", timeout=0.5)) is False
            assert time.monotonic() - start < 2.0
        finally:
            remove()

    def test_down_server_never_raises(self, kube_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
        """An apiserver that is not listening makes emit_event return False quickly."""
        down = KubeAPI().start()
        path = down.write_kubeconfig(tmp_path / "kubeconfig", down.mint_token("ns", "agent"))
        down.stop()
        kube_env.setenv("KUBECONFIG", str(path))
        client = Kube.maybe(pod=KubernetesConfig(pod_name="p", pod_namespace="ns"))
        assert client is not None
        start = time.monotonic()
        assert asyncio.run(emit_event(client, "BundlePublished", "m", timeout=3)) is False
        assert time.monotonic() - start < 3.5
        client.close()


class TestLazyImport:
    def test_reload_does_not_import_kubernetes(self) -> None:
        """Importing agent.reload (what init mode loads) leaves the kubernetes client unloaded."""
        code = "import sys, agent.reload, agent.kube; print('kubernetes' in sys.modules)"
        out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == "False"
