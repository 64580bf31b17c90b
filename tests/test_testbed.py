"""The stand-ins behave the way the agent depends on: real OpenBao logins against the Kubernetes API stand-in."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path

import hvac
import hvac.exceptions
import pytest
from kubernetes import client as k8s
from kubernetes import config as k8s_config

from testbed.bao import BaoServer
from testbed.kubeapi import KubeAPI
from testbed.vaultsetup import RunbookLayout, configure_kubernetes_auth, seed_runbook_layout

BUNDLE = {
    "ca-key.pem": b"-----BEGIN PRIVATE KEY-----\nkey\n-----END PRIVATE KEY-----\n",
    "ca-cert.pem": b"-----BEGIN CERTIFICATE-----\nintermediate\n-----END CERTIFICATE-----\n",
    "cert-chain.pem": b"-----BEGIN CERTIFICATE-----\nchain\n-----END CERTIFICATE-----\n",
    "root-cert.pem": b"-----BEGIN CERTIFICATE-----\nroot\n-----END CERTIFICATE-----\n",
}


@pytest.fixture(name="layout")
def fixture_layout(vault_admin: hvac.Client, kube: KubeAPI, unique: str) -> RunbookLayout:
    """The runbook layout for a cluster named after this test."""
    return seed_runbook_layout(vault_admin, kube, BUNDLE, cluster=f"c{unique}")


BaoFactory = Callable[..., BaoServer]


def _api_client(kube: KubeAPI, kubeconfig: Path, token: str) -> k8s.ApiClient:
    """An official-client ApiClient configured only from a kubeconfig written by the stand-in."""
    cfg = k8s.Configuration()
    k8s_config.load_kube_config(  # type: ignore[no-untyped-call]
        config_file=str(kube.write_kubeconfig(kubeconfig, token)), client_configuration=cfg
    )
    return k8s.ApiClient(cfg)


def _login(bao: BaoServer, layout: RunbookLayout, jwt: str) -> hvac.Client:
    user = bao.client(token="none")
    user.auth.kubernetes.login(layout.role, jwt, mount_point=layout.auth_mount)
    return user


class TestKubernetesLogin:
    def test_valid_token_reads_seeded_secret(self, bao: BaoServer, kube: KubeAPI, layout: RunbookLayout) -> None:
        """The istiod service account logs in and reads the four PEMs the runbook stored."""
        user = _login(bao, layout, kube.mint_token("istio-system", "istiod"))
        data = user.secrets.kv.v1.read_secret(layout.secret_path, mount_point=layout.kv_mount)["data"]
        assert data == {
            "ca_key": BUNDLE["ca-key.pem"].decode(),
            "ca_cert": BUNDLE["ca-cert.pem"].decode(),
            "cert_chain": BUNDLE["cert-chain.pem"].decode(),
            "root_cert": BUNDLE["root-cert.pem"].decode(),
        }
        # the policy grants that one path only
        with pytest.raises(hvac.exceptions.Forbidden):
            user.secrets.kv.v1.create_or_update_secret(layout.secret_path, {"x": "y"}, mount_point=layout.kv_mount)

    def test_wrong_service_account_is_refused(self, bao: BaoServer, kube: KubeAPI, layout: RunbookLayout) -> None:
        """A token for another service account in the right namespace gets 403."""
        with pytest.raises(hvac.exceptions.Forbidden, match="service account name not authorized"):
            _login(bao, layout, kube.mint_token("istio-system", "not-istiod"))

    def test_wrong_namespace_is_refused(self, bao: BaoServer, kube: KubeAPI, layout: RunbookLayout) -> None:
        """A token for istiod in another namespace gets 403."""
        with pytest.raises(hvac.exceptions.Forbidden, match="namespace not authorized"):
            _login(bao, layout, kube.mint_token("default", "istiod"))

    def test_revoked_service_account_is_refused(
        self, bao: BaoServer, kube: KubeAPI, vault_admin: hvac.Client, unique: str
    ) -> None:
        """Deleting the service account makes its existing token fail TokenReview, hence permission denied."""
        sa = f"sa-{unique}"
        configure_kubernetes_auth(
            vault_admin,
            kube,
            mount=f"k8s-{unique}",
            role="r",
            namespace="ns",
            service_account=sa,
            policies=["default"],
        )
        jwt = kube.mint_token("ns", sa)
        bao.client(token="none").auth.kubernetes.login("r", jwt, mount_point=f"k8s-{unique}")
        kube.revoke("ns", sa)
        with pytest.raises(hvac.exceptions.Forbidden, match="permission denied"):
            bao.client(token="none").auth.kubernetes.login("r", jwt, mount_point=f"k8s-{unique}")
        # recreating the account (new uid) does not revive the old token
        fresh = kube.mint_token("ns", sa)
        assert kube.review(jwt)["authenticated"] is False
        assert kube.review(fresh)["authenticated"] is True

    def test_revoked_single_token_is_refused(self, bao: BaoServer, kube: KubeAPI, layout: RunbookLayout) -> None:
        """Revoking one token leaves other tokens of the same service account working."""
        old, new = kube.mint_token("istio-system", "istiod"), kube.mint_token("istio-system", "istiod")
        kube.revoke_token(old)
        with pytest.raises(hvac.exceptions.Forbidden):
            _login(bao, layout, old)
        _login(bao, layout, new)

    def test_role_audience_is_enforced(
        self, bao: BaoServer, kube: KubeAPI, vault_admin: hvac.Client, unique: str
    ) -> None:
        """A role with `audience` accepts a token minted for it and refuses one for the default audience."""
        mount = f"k8s-{unique}"
        configure_kubernetes_auth(
            vault_admin,
            kube,
            mount=mount,
            role="r",
            namespace="ns",
            service_account="sa",
            policies=["default"],
            audience="openbao",
            token_ttl="90s",
        )
        login = bao.client(token="none").auth.kubernetes.login(
            "r", kube.mint_token("ns", "sa", audience="openbao"), mount_point=mount
        )
        assert login["auth"]["lease_duration"] == 90
        with pytest.raises(hvac.exceptions.Forbidden):
            bao.client(token="none").auth.kubernetes.login("r", kube.mint_token("ns", "sa"), mount_point=mount)

    def test_tokenreviews_are_recorded(self, bao: BaoServer, kube: KubeAPI, layout: RunbookLayout) -> None:
        """Each login shows up as a TokenReview carrying the login JWT, sent with the reviewer's bearer."""
        jwt = kube.mint_token("istio-system", "istiod")
        before = len(kube.tokenreviews())
        _login(bao, layout, jwt)
        reviews = kube.tokenreviews()[before:]
        assert [r.body["spec"]["token"] for r in reviews] == [jwt]
        assert reviews[0].user == "system:serviceaccount:kube-system:bao-token-reviewer"


class TestKubeAPI:
    def test_expired_token_is_not_authenticated(self, kube: KubeAPI) -> None:
        """An expired token fails review while a fresh one passes with the projected-token identity."""
        assert kube.review(kube.mint_token("ns", "a", ttl=-1))["authenticated"] is False
        status = kube.review(kube.mint_token("ns", "a"))
        assert status["authenticated"] is True
        assert status["user"]["username"] == "system:serviceaccount:ns:a"
        assert status["user"]["uid"] == kube.service_account_uid("ns", "a")
        assert "system:serviceaccounts:ns" in status["user"]["groups"]

    def test_foreign_signature_is_not_authenticated(self, kube: KubeAPI) -> None:
        """A token signed by another cluster's key is refused."""
        with KubeAPI() as other:
            assert kube.review(other.mint_token("ns", "a"))["authenticated"] is False

    def test_official_client_via_kubeconfig(self, kube: KubeAPI, tmp_path: Path) -> None:
        """The `kubernetes` client, loaded from write_kubeconfig, creates events and patches workloads."""
        with _api_client(kube, tmp_path / "kubeconfig", kube.mint_token("istio-system", "agent")) as api:
            event = k8s.CoreV1Api(api).create_namespaced_event(
                "istio-system",
                k8s.CoreV1Event(
                    metadata=k8s.V1ObjectMeta(generate_name="istiod."),
                    involved_object=k8s.V1ObjectReference(kind="Pod", name="istiod-0", namespace="istio-system"),
                    reason="CAPublished",
                    message="published",
                    type="Normal",
                    event_time=dt.datetime.now(dt.UTC),
                    reporting_component="istio-vault-agent",
                    reporting_instance="istiod-0",
                    action="Publish",
                ),
            )
            assert event.reason == "CAPublished"
            assert event.metadata.namespace == "istio-system"
            patch = {"spec": {"template": {"metadata": {"annotations": {"restartedAt": "now"}}}}}
            dep = k8s.AppsV1Api(api).patch_namespaced_deployment("istiod", "istio-system", patch)
            assert dep.metadata is not None
            assert dep.metadata.name == "istiod"
            assert dep.spec is not None
            assert dep.spec.template.metadata is not None
            assert dep.spec.template.metadata.annotations == {"restartedAt": "now"}
        patches = kube.requests_to("PATCH", "/apis/apps/v1/namespaces/istio-system/deployments/istiod")
        assert patches[-1].body == patch
        assert patches[-1].user == "system:serviceaccount:istio-system:agent"

    def test_unauthenticated_request_gets_401(self, kube: KubeAPI, tmp_path: Path) -> None:
        """A revoked bearer token is rejected with 401 like the real API server."""
        token = kube.mint_token("istio-system", "gone")
        kube.revoke("istio-system", "gone")
        with _api_client(kube, tmp_path / "kc", token) as api, pytest.raises(k8s.ApiException) as info:
            k8s.AppsV1Api(api).patch_namespaced_daemon_set("x", "istio-system", {"spec": {}})
        assert info.value.status == 401

    def test_custom_handler_overrides_default(self, kube: KubeAPI, tmp_path: Path) -> None:
        """A handler added by a test answers instead of the default, until removed."""
        remove = kube.add_handler(
            "PATCH",
            "/apis/apps/v1/namespaces/{namespace}/statefulsets/{name}",
            lambda req: (403, {"kind": "Status", "status": "Failure", "code": 403, "reason": "Forbidden"}),
        )
        with _api_client(kube, tmp_path / "kc", kube.mint_token("ns", "agent")) as api:
            apps = k8s.AppsV1Api(api)
            with pytest.raises(k8s.ApiException) as info:
                apps.patch_namespaced_stateful_set("db", "ns", {"spec": {}})
            assert info.value.status == 403
            remove()
            restored = apps.patch_namespaced_stateful_set("db", "ns", {"spec": {}})
            assert restored.metadata is not None
            assert restored.metadata.name == "db"


class TestBaoServer:
    def test_stop_then_start_on_same_port_reseeds(self, bao_factory: BaoFactory, kube: KubeAPI) -> None:
        """A stopped server is unreachable; a new one on the same port comes back empty and the seeder refills it."""
        server: BaoServer = bao_factory()
        server.add_seeder(lambda c: seed_runbook_layout(c, kube, BUNDLE))
        layout = seed_runbook_layout(server.client(), kube, BUNDLE)
        address = server.address
        server.stop()
        assert server.health() is None
        with pytest.raises(Exception):
            server.client(timeout=1).sys.read_health_status(method="GET")
        server.start()
        assert server.address == address
        user = _login(server, layout, kube.mint_token("istio-system", "istiod"))
        assert user.secrets.kv.v1.read_secret(layout.secret_path, mount_point=layout.kv_mount)["data"]

    def test_seal_and_unseal(self, bao_factory: BaoFactory) -> None:
        """seal() makes the server answer 503; unseal() with the captured dev key restores it."""
        server: BaoServer = bao_factory()
        server.seal()
        assert server.health() == 503
        with pytest.raises(hvac.exceptions.VaultDown):
            server.client().sys.list_mounted_secrets_engines()
        server.unseal()
        assert server.health() == 200

    def test_tls_dev_server(self, bao_factory: BaoFactory) -> None:
        """With tls=True the server speaks HTTPS and ca_file verifies it."""
        server: BaoServer = bao_factory(tls=True)
        assert server.address.startswith("https://")
        assert server.client().sys.is_initialized()


class TestWorkloadPatches:
    @pytest.mark.parametrize(
        ("kind", "method"),
        [
            ("Deployment", "patch_namespaced_deployment"),
            ("DaemonSet", "patch_namespaced_daemon_set"),
            ("StatefulSet", "patch_namespaced_stateful_set"),
        ],
    )
    def test_patch_keeps_state(self, kube: KubeAPI, tmp_path: Path, unique: str, kind: str, method: str) -> None:
        """Successive restart annotations accumulate on the stored object and bump its generation."""
        name = f"w-{unique}"
        with _api_client(kube, tmp_path / "kc", kube.mint_token("ns", "agent")) as api:
            patch = getattr(k8s.AppsV1Api(api), method)
            patch(name, "ns", {"spec": {"template": {"metadata": {"annotations": {"a": "1"}}}}})
            obj = patch(name, "ns", {"spec": {"template": {"metadata": {"annotations": {"b": "2"}}}}})
        assert obj.kind == kind
        assert obj.spec.template.metadata.annotations == {"a": "1", "b": "2"}
        stored = kube.workload(kind, "ns", name)
        assert stored is not None
        assert stored["metadata"]["generation"] == 3
