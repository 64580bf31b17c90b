"""The agent's Kubernetes API session (agent.kube) against the API stand-in over HTTPS: loading (in-cluster and
kubeconfig), rollout restart, Secrets, Events, and the bounds of every request (deadline, bytes, redirects)."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

from agent.config import IstioCaBundle, KubernetesConfig, KvVariant, RolloutRestartReload, RolloutTarget
from agent.errors import ConfigError, KubeUnavailable, PublishError, ReloadError
from agent.kube import RESTARTED_AT, Kube, emit_event
from agent.reload import reload
from testbed import pki
from testbed.kubeapi import KubeAPI, KubeRequest

REPO = Path(__file__).resolve().parent.parent
T = TypeVar("T")


def run(make: Callable[[], Awaitable[T]]) -> T:
    """Run one coroutine on a fresh loop (the session is built inside it and closed by the caller)."""

    async def main() -> T:
        return await make()

    return asyncio.run(main())


@pytest.fixture(name="kube_env")
def fixture_kube_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """No in-cluster env, no pod identity, and a HOME without ~/.kube/config."""
    for var in ("KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT", "KUBECONFIG", "POD_NAME", "POD_NAMESPACE",
                "POD_UID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return monkeypatch


@pytest.fixture(name="kubeconfig")
def fixture_kubeconfig(kube: KubeAPI, kube_env: pytest.MonkeyPatch, tmp_path: Path, unique: str) -> Path:
    """KUBECONFIG pointing at the stand-in with a valid token of istio-system/agent-<unique>, namespace ctx-<unique>."""
    token = kube.mint_token("istio-system", f"agent-{unique}")
    path = kube.write_kubeconfig(tmp_path / "kubeconfig", token, namespace=f"ctx-{unique}")
    kube_env.setenv("KUBECONFIG", str(path))
    return path


def with_kube(body: Callable[[Kube], Awaitable[T]], *, pod: KubernetesConfig | None = None, **attrs: Any) -> T:
    """Load a session from the environment, run `body` with it, close it."""

    async def main() -> T:
        kube = await Kube.load(pod=pod)
        for name, value in attrs.items():
            setattr(kube, name, value)
        try:
            return await body(kube)
        finally:
            await kube.close()

    return asyncio.run(main())


def _patches(kube: KubeAPI, path: str) -> list[KubeRequest]:
    return kube.requests_to("PATCH", path)


def _restarted_at(req: KubeRequest) -> dt.datetime:
    value = req.body["spec"]["template"]["metadata"]["annotations"][RESTARTED_AT]
    assert value.endswith("Z")
    return dt.datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)


def _in_cluster(kube: KubeAPI, env: pytest.MonkeyPatch, sa: Path, namespace: str, name: str = "agent") -> Path:
    sa.mkdir(exist_ok=True)
    (sa / "token").write_text(kube.mint_token(namespace, name))
    (sa / "ca.crt").write_bytes(kube.ca_pem)
    (sa / "namespace").write_text(f"{namespace}\n")
    env.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    env.setenv("KUBERNETES_SERVICE_PORT", str(kube.port))
    return sa


@pytest.fixture(name="silent")
def fixture_silent() -> Iterator[socket.socket]:
    """A TCP port that accepts connections (the kernel's backlog) and never answers: a hung API server."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    yield sock
    sock.close()


def _point_at(env: pytest.MonkeyPatch, tmp_path: Path, kube: KubeAPI, server: str) -> None:
    """A kubeconfig like the stand-in's, but with another server URL."""
    path = kube.write_kubeconfig(tmp_path / "other-kubeconfig", kube.mint_token("istio-system", "agent"))
    doc = yaml.safe_load(path.read_text())
    doc["clusters"][0]["cluster"]["server"] = server
    path.write_text(yaml.safe_dump(doc))
    env.setenv("KUBECONFIG", str(path))


class TestLoading:
    def test_in_cluster_config(self, kube: KubeAPI, kube_env: pytest.MonkeyPatch, tmp_path: Path, unique: str) -> None:
        """In a pod: host from KUBERNETES_SERVICE_HOST/PORT, token and CA from the SA dir, its namespace as default."""
        sa = _in_cluster(kube, kube_env, tmp_path / "sa", f"ns-{unique}")

        async def body() -> str:
            client = await Kube.load(sa_dir=sa)
            try:
                assert client.origin == "in-cluster" and client.namespace == f"ns-{unique}"
                return await client.rollout_restart(RolloutTarget(kind="DaemonSet", name=f"ds-{unique}"))
            finally:
                await client.close()

        run(body)
        [req] = _patches(kube, f"/apis/apps/v1/namespaces/ns-{unique}/daemonsets/ds-{unique}")
        assert req.user == f"system:serviceaccount:ns-{unique}:agent"

    def test_a_rotated_token_is_picked_up(
        self, kube: KubeAPI, kube_env: pytest.MonkeyPatch, tmp_path: Path, unique: str
    ) -> None:
        """kubelet replaces the projected token file: the next request already carries the new token."""
        sa = _in_cluster(kube, kube_env, tmp_path / "sa", f"rot-{unique}", "first")

        async def body() -> None:
            client = await Kube.load(sa_dir=sa)
            try:
                await client.get_secret(f"rot-{unique}", "a")
                new = sa / "token.new"
                new.write_text(kube.mint_token(f"rot-{unique}", "second"))
                new.replace(sa / "token")
                await client.get_secret(f"rot-{unique}", "b")
            finally:
                await client.close()

        run(body)
        users = [r.user for r in kube.requests_to("GET", f"/api/v1/namespaces/rot-{unique}/secrets/")]
        assert users == [f"system:serviceaccount:rot-{unique}:first", f"system:serviceaccount:rot-{unique}:second"]

    @pytest.mark.parametrize("problem", ["missing", "empty", "fifo"])
    def test_in_cluster_without_a_usable_token(
        self, kube: KubeAPI, kube_env: pytest.MonkeyPatch, tmp_path: Path, problem: str
    ) -> None:
        """A missing, empty or FIFO token file is one ConfigError sentence at once (a FIFO never hangs the load)."""
        sa = _in_cluster(kube, kube_env, tmp_path / "sa", "ns")
        (sa / "token").unlink()
        if problem == "empty":
            (sa / "token").write_text("")
        elif problem == "fifo":
            os.mkfifo(sa / "token")
        start = time.monotonic()
        with pytest.raises(ConfigError, match="in-cluster Kubernetes config cannot be loaded") as err:
            run(lambda: Kube.load(sa_dir=sa))
        assert time.monotonic() - start < 2
        assert "automountServiceAccountToken" in str(err.value) and "\n" not in str(err.value)

    def test_an_empty_ca_crt_is_refused_not_the_system_trust_store(
        self, kube: KubeAPI, kube_env: pytest.MonkeyPatch, tmp_path: Path
    ) -> None:
        """An empty ca.crt (kubelet caught mid-write, a broken mount) holds no CA: the load is refused, never turned
        into a session that trusts every public CA with the pod's bearer token."""
        sa = _in_cluster(kube, kube_env, tmp_path / "sa", "ns")
        (sa / "ca.crt").write_bytes(b"")
        with pytest.raises(ConfigError, match=r"ca\.crt holds no PEM certificate"):
            run(lambda: Kube.load(sa_dir=sa))

    def test_an_empty_certificate_authority_file_is_refused(
        self, kube: KubeAPI, kube_env: pytest.MonkeyPatch, tmp_path: Path
    ) -> None:
        """A kubeconfig whose certificate-authority file is empty names no CA: refused, not the system's store."""
        path = kube.write_kubeconfig(tmp_path / "kubeconfig", kube.mint_token("istio-system", "agent"))
        doc = yaml.safe_load(path.read_text())
        (tmp_path / "empty-ca.pem").write_bytes(b"")
        cluster = doc["clusters"][0]["cluster"]
        del cluster["certificate-authority-data"]
        cluster["certificate-authority"] = str(tmp_path / "empty-ca.pem")
        path.write_text(yaml.safe_dump(doc))
        kube_env.setenv("KUBECONFIG", str(path))
        with pytest.raises(ConfigError, match="holds no PEM certificate"):
            run(Kube.load)

    def test_nothing_to_load(self, kube_env: pytest.MonkeyPatch) -> None:
        """No in-cluster env and no kubeconfig: `maybe` is None and `load` says what to set."""
        assert run(Kube.maybe) is None
        with pytest.raises(ConfigError, match="set KUBECONFIG"):
            run(Kube.load)

    def test_kubeconfig_list_merges_like_kubectl(
        self, kube: KubeAPI, kubeconfig: Path, kube_env: pytest.MonkeyPatch, tmp_path: Path, unique: str
    ) -> None:
        """KUBECONFIG may list several files: a missing one is skipped and the first current-context wins."""
        kube_env.setenv("KUBECONFIG", os.pathsep.join([str(tmp_path / "absent"), str(kubeconfig)]))
        assert with_kube(lambda k: asyncio.sleep(0, k.namespace)) == f"ctx-{unique}"

    @pytest.mark.parametrize(("change", "needle"), [
        ({"cluster": {"insecure-skip-tls-verify": True}}, "sets insecure-skip-tls-verify"),
        ({"user": {"exec": {"command": "aws"}}}, "exec credential plugin"),
        ({"user": {"client-certificate-data": "eA=="}}, "needs both client-certificate and client-key"),
        ({"current-context": "nope"}, "context 'nope' does not exist"),
    ])
    def test_kubeconfig_refusals(
        self, kubeconfig: Path, change: dict[str, Any], needle: str
    ) -> None:
        """What the agent will not use is one ConfigError sentence naming the kubeconfig and what to give."""
        doc = yaml.safe_load(kubeconfig.read_text())
        doc["clusters"][0]["cluster"].update(change.get("cluster", {}))
        doc["users"][0]["user"].update(change.get("user", {}))
        doc["current-context"] = change.get("current-context", doc["current-context"])
        kubeconfig.write_text(yaml.safe_dump(doc))
        with pytest.raises(ConfigError, match=needle) as err:
            run(Kube.load)
        assert str(kubeconfig) in str(err.value) and "\n" not in str(err.value)

    @pytest.mark.parametrize("good", [True, False])
    def test_client_certificate_leaves_no_temp_files(
        self, kube: KubeAPI, kubeconfig: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, good: bool
    ) -> None:
        """client-certificate-data and client-key-data are loaded through a private temp dir that is gone right
        after (also when they do not load); requests then go out with the certificate configured."""
        scratch = tmp_path / "tmp"
        scratch.mkdir()
        monkeypatch.setattr(tempfile, "tempdir", str(scratch))
        ca = pki.root_ca(cn="client CA")
        leaf = pki.leaf_cert(ca, cn="agent")
        doc = yaml.safe_load(kubeconfig.read_text())
        key = leaf.key_pem if good else b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"
        doc["users"][0]["user"].update({"client-certificate-data": base64.b64encode(leaf.cert_pem).decode(),
                                        "client-key-data": base64.b64encode(key).decode()})
        kubeconfig.write_text(yaml.safe_dump(doc))
        if good:
            assert with_kube(lambda k: k.get_secret("certs", "none")) is None
        else:
            with pytest.raises(ConfigError, match="do not load as a PEM certificate and its key") as err:
                run(Kube.load)
            assert "AAAA" not in str(err.value)
        assert list(scratch.iterdir()) == []


class TestRolloutRestart:
    @pytest.mark.parametrize(
        ("kind", "plural"),
        [("Deployment", "deployments"), ("DaemonSet", "daemonsets"), ("StatefulSet", "statefulsets")],
    )
    def test_patches_pod_template_like_kubectl(
        self, kube: KubeAPI, kubeconfig: Path, unique: str, kind: str, plural: str
    ) -> None:
        """A strategic merge patch sets only the restartedAt pod-template annotation to now, as kubectl does."""
        target = RolloutTarget(kind=kind, name=f"istiod-{unique}", namespace="istio-system")  # type: ignore[arg-type]
        before = dt.datetime.now(dt.UTC).replace(microsecond=0)
        desc = with_kube(lambda k: k.rollout_restart(target))
        path = f"/apis/apps/v1/namespaces/istio-system/{plural}/istiod-{unique}"
        [req] = _patches(kube, path)
        assert req.headers["content-type"] == "application/strategic-merge-patch+json"
        assert "fieldManager=istio-vault-agent" in req.query
        assert req.user == f"system:serviceaccount:istio-system:agent-{unique}"
        assert set(req.body) == {"spec"}
        assert set(req.body["spec"]["template"]["metadata"]["annotations"]) == {RESTARTED_AT}
        assert before <= _restarted_at(req) <= dt.datetime.now(dt.UTC)
        assert f"{kind} istio-system/istiod-{unique}" in desc

    def test_namespace_falls_back_to_pod_namespace(self, kube: KubeAPI, kubeconfig: Path, unique: str) -> None:
        """A target without namespace is restarted in the pod's namespace, else in the kubeconfig context's."""
        target = RolloutTarget(kind="Deployment", name=f"gw-{unique}")

        async def body(k: Kube) -> None:
            await k.rollout_restart(target)
            k.pod = KubernetesConfig(pod_namespace=f"pod-{unique}")
            await k.rollout_restart(target)

        with_kube(body)
        assert _patches(kube, f"/apis/apps/v1/namespaces/ctx-{unique}/deployments/gw-{unique}")
        assert _patches(kube, f"/apis/apps/v1/namespaces/pod-{unique}/deployments/gw-{unique}")

    def test_reload_action_uses_kube(self, kube: KubeAPI, kubeconfig: Path, unique: str) -> None:
        """`reload` with action rollout-restart patches the target through the given session, or its own."""
        bundle = IstioCaBundle(
            name="gw",
            dir="/unused",
            source=KvVariant(kv="secret/gw"),
            reload=RolloutRestartReload(
                target=RolloutTarget(kind="StatefulSet", name=f"db-{unique}", namespace="apps")
            ),
        )
        desc = with_kube(lambda k: reload(bundle, kube=k))
        assert "StatefulSet apps/db-" in desc
        run(lambda: reload(bundle))
        assert len(_patches(kube, f"/apis/apps/v1/namespaces/apps/statefulsets/db-{unique}")) == 2

    @pytest.mark.parametrize(
        ("status", "error", "needle"), [
            (404, ReloadError, "does not exist"), (403, ReloadError, "RBAC verb patch"),
            (401, ReloadError, "refused the agent's credentials"), (500, KubeUnavailable, "answered 500"),
            (429, KubeUnavailable, "answered 429"),
        ]
    )
    def test_api_refusal_is_one_sentence(
        self, kube: KubeAPI, kubeconfig: Path, unique: str, status: int, error: type[Exception], needle: str
    ) -> None:
        """A missing workload, RBAC or credentials refused: a ReloadError saying what to fix; 5xx and 429 are
        KubeUnavailable (retryable)."""
        remove = kube.add_handler(
            "PATCH",
            f"/apis/apps/v1/namespaces/{{namespace}}/deployments/bad-{unique}",
            lambda _r: (status, {"kind": "Status", "code": status, "message": "no"}),
        )
        try:
            with pytest.raises(error, match=needle) as err:
                with_kube(lambda k: k.rollout_restart(RolloutTarget(kind="Deployment", name=f"bad-{unique}",
                                                                   namespace="x")))
        finally:
            remove()
        assert f"Deployment x/bad-{unique}" in str(err.value)
        assert "\n" not in str(err.value)

    def test_without_kubernetes_access_reload_says_so(self, kube_env: pytest.MonkeyPatch) -> None:
        """With no in-cluster config and no kubeconfig, rollout-restart fails naming what to set."""
        bundle = IstioCaBundle(
            name="gw",
            dir="/unused",
            source=KvVariant(kv="secret/gw"),
            reload=RolloutRestartReload(target=RolloutTarget(kind="Deployment", name="x", namespace="y")),
        )
        with pytest.raises(ReloadError, match="KUBECONFIG"):
            run(lambda: reload(bundle))


def _secret(ns: str, name: str, value: bytes, **labels: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": ns, "labels": labels},
            "type": "Opaque", "data": {"k": base64.b64encode(value).decode()}}


class TestSecrets:
    def test_apply_get_list_delete(self, kube: KubeAPI, kubeconfig: Path, unique: str) -> None:
        """Server-side apply (field manager istio-vault-agent), get, list by label and delete with a uid
        precondition, as the remote-secret target and prune use them."""
        ns = f"sec-{unique}"

        async def body(k: Kube) -> tuple[Any, ...]:
            absent = await k.get_secret(ns, "a")
            applied = await k.apply_secret(_secret(ns, "a", b"one", team="x"), force=False)
            await k.apply_secret(_secret(ns, "b", b"two", team="y"), force=False)
            got = await k.get_secret(ns, "a")
            listed = await k.list_secrets(ns, "team=x")
            wrong = None
            try:
                await k.delete_secret(ns, "a", uid="not-its-uid")
            except PublishError as exc:
                wrong = str(exc)
            deleted = await k.delete_secret(ns, "a", uid=got["metadata"]["uid"])
            again = await k.delete_secret(ns, "a")
            return absent, applied, got, listed, wrong, deleted, again

        absent, applied, got, listed, wrong, deleted, again = with_kube(body)
        assert absent is None
        assert base64.b64decode(got["data"]["k"]) == b"one" and applied["metadata"]["uid"] == got["metadata"]["uid"]
        assert [s["metadata"]["name"] for s in listed] == ["a"]
        assert wrong is not None and "another field manager" in wrong
        assert (deleted, again) == (True, False)
        [patch] = kube.requests_to("PATCH", f"/api/v1/namespaces/{ns}/secrets/a")
        assert patch.headers["content-type"] == "application/apply-patch+yaml"
        assert "fieldManager=istio-vault-agent" in patch.query and "force=false" in patch.query
        assert kube.secret(ns, "a") is None and kube.secret(ns, "b") is not None

    def test_a_conflict_without_force_is_final(self, kube: KubeAPI, kubeconfig: Path, unique: str) -> None:
        """A field another manager owns: 409 without force (a PublishError naming it), taken over with force."""
        ns = f"ssa-{unique}"
        kube.put_secret(_secret(ns, "s", b"theirs"), manager="kubectl-edit")
        with pytest.raises(PublishError, match="has fields another field manager owns"):
            with_kube(lambda k: k.apply_secret(_secret(ns, "s", b"ours"), force=False))
        with_kube(lambda k: k.apply_secret(_secret(ns, "s", b"ours"), force=True))
        assert base64.b64decode(kube.secret(ns, "s")["data"]["k"]) == b"ours"

    @pytest.mark.parametrize(("status", "error", "needle"), [
        (403, PublishError, "grant its service account RBAC verb get"),
        (401, PublishError, "refused the agent's credentials"),
        (503, KubeUnavailable, "answered 503 to the get of Secret"),
        (429, KubeUnavailable, "answered 429"),
    ])
    def test_refusals_and_unavailability(
        self, kube: KubeAPI, kubeconfig: Path, unique: str, status: int, error: type[Exception], needle: str
    ) -> None:
        """RBAC and credential refusals are final sentences; 5xx and 429 are KubeUnavailable naming the API."""
        ns = f"ref-{unique}"
        kube.add_handler("GET", f"/api/v1/namespaces/{ns}/secrets/{{name}}",
                         lambda _r: (status, {"kind": "Status", "code": status, "message": "busy"}))
        with pytest.raises(error, match=needle) as err:
            with_kube(lambda k: k.get_secret(ns, "s"))
        assert "\n" not in str(err.value)
        if error is KubeUnavailable:
            assert kube.url in str(err.value)


class TestBounds:
    def test_a_hung_api_is_unavailable_after_the_deadline(
        self, kube: KubeAPI, kubeconfig: Path, kube_env: pytest.MonkeyPatch, tmp_path: Path, silent: socket.socket
    ) -> None:
        """A server that accepts and never answers (not even TLS) ends the request at its deadline, as
        KubeUnavailable naming the API address."""
        _point_at(kube_env, tmp_path, kube, f"https://127.0.0.1:{silent.getsockname()[1]}")
        start = time.monotonic()
        with pytest.raises(KubeUnavailable, match=r"did not answer the get of Secret ns/s within 1s") as err:
            with_kube(lambda k: k.get_secret("ns", "s"), deadline=1.0)
        assert time.monotonic() - start < 2.5
        assert f"127.0.0.1:{silent.getsockname()[1]}" in str(err.value)

    def test_a_hung_request_is_really_cancelled(
        self, kube: KubeAPI, kubeconfig: Path, kube_env: pytest.MonkeyPatch, tmp_path: Path, silent: socket.socket
    ) -> None:
        """Cancelling the task (what SIGTERM does) ends a hung request at once and closes its connection."""
        _point_at(kube_env, tmp_path, kube, f"https://127.0.0.1:{silent.getsockname()[1]}")

        async def body(k: Kube) -> float:
            task = asyncio.create_task(k.get_secret("ns", "s"))
            await asyncio.sleep(0.3)
            start = time.monotonic()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            return time.monotonic() - start

        assert with_kube(body) < 0.1
        conn, _ = silent.accept()
        conn.settimeout(2)
        try:
            assert conn.recv(4096).startswith(b"\x16")  # the TLS hello it sent, then nothing: closed
            assert conn.recv(4096) == b""
        finally:
            conn.close()

    def test_refused_connections_are_unavailable(
        self, kube: KubeAPI, kubeconfig: Path, kube_env: pytest.MonkeyPatch, tmp_path: Path
    ) -> None:
        """Nothing listening: KubeUnavailable at once, naming the address it could not reach."""
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()
        _point_at(kube_env, tmp_path, kube, f"https://127.0.0.1:{port}")
        with pytest.raises(KubeUnavailable, match=f"cannot reach the Kubernetes API at https://127.0.0.1:{port}"):
            with_kube(lambda k: k.get_secret("ns", "s"))

    def test_no_redirect_is_followed(
        self, kube: KubeAPI, kubeconfig: Path, unique: str, silent: socket.socket
    ) -> None:
        """A 307 to another address is a final error naming where it pointed; the token never goes there."""
        ns = f"redir-{unique}"
        elsewhere = f"https://127.0.0.1:{silent.getsockname()[1]}/api/v1/namespaces/{ns}/secrets/s"
        kube.add_handler("GET", f"/api/v1/namespaces/{ns}/secrets/{{name}}",
                         lambda _r: (307, {"kind": "Status"}, {"Location": elsewhere}))
        with pytest.raises(PublishError, match=r"redirect \(307\) to .*which the agent does not follow") as err:
            with_kube(lambda k: k.get_secret(ns, "s"))
        assert elsewhere in str(err.value)
        silent.setblocking(False)
        with pytest.raises(BlockingIOError):
            silent.accept()  # nobody connected there

    def test_an_oversized_answer_is_refused(self, kube: KubeAPI, kubeconfig: Path, unique: str) -> None:
        """An answer over the cap (4 MiB for one Secret) is not read whole: a final error saying so."""
        ns = f"big-{unique}"
        kube.add_handler("GET", f"/api/v1/namespaces/{ns}/secrets/{{name}}",
                         lambda _r: (200, {"kind": "Secret", "data": {"k": "A" * (5 * 1024 * 1024)}}))
        with pytest.raises(PublishError, match=r"with more than 4194304 bytes"):
            with_kube(lambda k: k.get_secret(ns, "s"))

    @pytest.mark.parametrize(("answer", "needle"), [
        ((200, b"<html>login</html>", {}), "something not JSON"),
        ((200, b"[" * 200_000, {}), "something not JSON"),
        ((200, "<html>login</html>"), "something that is not an object"),
    ])
    def test_an_answer_that_is_not_a_secret(
        self, kube: KubeAPI, kubeconfig: Path, unique: str, answer: Any, needle: str
    ) -> None:
        """A 200 that is not JSON, or JSON that is not an object, is a final error (not the API server)."""
        ns = f"odd-{unique}"
        kube.add_handler("GET", f"/api/v1/namespaces/{ns}/secrets/{{name}}", lambda _r: answer)
        with pytest.raises(PublishError, match=needle):
            with_kube(lambda k: k.get_secret(ns, "s"))


class TestEvents:
    def test_event_on_own_pod(self, kube: KubeAPI, kubeconfig: Path, unique: str) -> None:
        """With the pod's name, namespace and uid known, an Event about that pod is created with reason and source."""
        ns = f"ev-{unique}"
        pod = KubernetesConfig(pod_name="istiod-abc", pod_namespace=ns, pod_uid="1234-uid")
        assert with_kube(lambda k: emit_event(k, "BundlePublished", "published bundle istio-ca (generation 2)"),
                         pod=pod)
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

    def test_warning_message_truncated_and_redacted(self, kube: KubeAPI, kubeconfig: Path, unique: str) -> None:
        """A Warning event keeps its type; a long message is cut to 1024 characters and key material never leaves."""
        ns = f"ev-{unique}"
        leak = "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMG\n-----END PRIVATE KEY-----"
        assert with_kube(lambda k: k.event("BundleRefused", f"refused: {leak} " + "x" * 3000, type="Warning"),
                         pod=KubernetesConfig(pod_name="p", pod_namespace=ns))
        [req] = kube.requests_to("POST", f"/api/v1/namespaces/{ns}/events")
        assert req.body["type"] == "Warning"
        assert len(req.body["message"]) == 1024
        assert "PRIVATE KEY" not in req.body["message"] and "MIGHAgEAMBMG" not in req.body["message"]

    def test_no_pod_identity_no_event(self, kube: KubeAPI, kubeconfig: Path) -> None:
        """Without POD_NAME/POD_NAMESPACE nothing is sent."""
        before = len(kube.requests_to("POST", "/api/v1/namespaces/"))
        assert with_kube(lambda k: emit_event(k, "RootChanged", "root changed")) is False
        assert run(lambda: emit_event(None, "RootChanged", "root changed")) is False
        assert len(kube.requests_to("POST", "/api/v1/namespaces/")) == before

    def test_server_error_never_raises(self, kube: KubeAPI, kubeconfig: Path, unique: str) -> None:
        """An apiserver that answers 500 makes emit_event return False, not raise."""
        ns = f"ev-{unique}"
        remove = kube.add_handler("POST", f"/api/v1/namespaces/{ns}/events", lambda _r: (500, {"kind": "Status"}))
        try:
            assert with_kube(lambda k: emit_event(k, "BundlePublished", "m"),
                             pod=KubernetesConfig(pod_name="p", pod_namespace=ns)) is False
        finally:
            remove()
        assert kube.requests_to("POST", f"/api/v1/namespaces/{ns}/events")

    def test_hanging_server_returns_within_timeout(
        self, kube: KubeAPI, kubeconfig: Path, kube_env: pytest.MonkeyPatch, tmp_path: Path, silent: socket.socket
    ) -> None:
        """An apiserver that does not answer holds an Event no longer than its deadline (3 s), or the caller's
        shorter timeout."""
        _point_at(kube_env, tmp_path, kube, f"https://127.0.0.1:{silent.getsockname()[1]}")
        pod = KubernetesConfig(pod_name="p", pod_namespace="ns")
        start = time.monotonic()
        assert with_kube(lambda k: emit_event(k, "BundlePublished", "m", timeout=0.5), pod=pod) is False
        assert time.monotonic() - start < 1.5
        start = time.monotonic()
        assert with_kube(lambda k: k.event("BundlePublished", "m"), pod=pod) is False
        assert 2.5 < time.monotonic() - start < 4.5

    def test_down_server_never_raises(self, kube_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
        """An apiserver that is not listening makes emit_event return False quickly."""
        down = KubeAPI().start()
        path = down.write_kubeconfig(tmp_path / "kubeconfig", down.mint_token("ns", "agent"))
        down.stop()
        kube_env.setenv("KUBECONFIG", str(path))
        start = time.monotonic()
        assert with_kube(lambda k: emit_event(k, "BundlePublished", "m", timeout=3),
                         pod=KubernetesConfig(pod_name="p", pod_namespace="ns")) is False
        assert time.monotonic() - start < 3.5


class TestLazyImport:
    def test_the_run_path_does_not_import_kubernetes(self) -> None:
        """Importing the run path (runner, the Kubernetes session, the Secret target, reload) leaves the kubernetes
        package unloaded."""
        code = ("import sys, agent.runner, agent.kube, agent.targets.secret, agent.reload;"
                " print('kubernetes' in sys.modules)")
        out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == "False"
