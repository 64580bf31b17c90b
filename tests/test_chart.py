"""The istio-vault-agent chart and its example overrides, rendered by Helm's own engine and checked against Kubernetes.

The examples are proven on small fixture charts (tests/fixtures/charts) that template initContainers,
env, volumeMounts and volumes the way the upstream istiod (1.24+) and gateway (1.27+) charts do.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

helm = pytest.importorskip("helm_python", reason="helm-python-sdk (the [test] extra) renders the charts")
kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate checks the objects")

from agent import config as agent_config  # noqa: E402
from agent.errors import ConfigError  # noqa: E402
from agent.inject import CA_VOLUME, InjectOptions, agent_container, agent_volumes, inject  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "istio-vault-agent"
EXAMPLES = CHART / "examples"
FIXTURE_CHARTS = ROOT / "tests" / "fixtures" / "charts"
#: a recent Kubernetes with native sidecars on by default (beta 1.29, GA 1.33)
K8S_VERSION = "1.33"
AGENT = "istio-vault-agent"
PEM = "-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIUZm9v\n-----END CERTIFICATE-----\n"


def render(
    chart: Path, values: dict[str, Any] | None = None, *, name: str = AGENT, namespace: str = "istio-system"
) -> tuple[list[dict[str, Any]], str]:
    """Render a chart offline; return its objects (in template order) and NOTES.txt."""
    with helm.Chart.load(chart) as loaded:
        manifests = loaded.render(values or {}, name=name, namespace=namespace)
    objects: list[dict[str, Any]] = []
    notes = ""
    for path in sorted(manifests):
        if path.endswith("NOTES.txt"):
            notes = manifests[path]
            continue
        objects.extend(d for d in yaml.safe_load_all(manifests[path]) if d)
    return objects, notes


def validate(objects: list[dict[str, Any]]) -> None:
    """Every object must match the Kubernetes schema (strict: no unknown fields)."""
    assert objects
    for obj in objects:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def find(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    matches = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(matches) == 1, f"expected one {kind} {name or ''}, got {len(matches)}"
    return matches[0]


def containers(pod: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield from pod.get("initContainers") or []
    yield from pod["containers"]


def check_pod_wiring(pod: dict[str, Any]) -> None:
    """What the API server or kubelet would reject but a schema cannot see: dangling or duplicate names."""
    volumes = [v["name"] for v in pod.get("volumes") or []]
    assert len(volumes) == len(set(volumes)), f"duplicate volumes: {volumes}"
    names = [c["name"] for c in containers(pod)]
    assert len(names) == len(set(names)), f"duplicate containers: {names}"
    for c in containers(pod):
        paths = [m["mountPath"] for m in c.get("volumeMounts") or []]
        assert len(paths) == len(set(paths)), f"{c['name']} mounts two volumes at one path"
        for m in c.get("volumeMounts") or []:
            assert m["name"] in volumes, f"{c['name']} mounts missing volume {m['name']}"
        for port in c.get("ports") or []:
            assert len(port.get("name", "")) <= 15


def load_values(name: str) -> dict[str, Any]:
    values = yaml.safe_load((EXAMPLES / name).read_text())
    assert isinstance(values, dict)
    return values


def agent_config_of(objects: list[dict[str, Any]]) -> tuple[dict[str, Any], agent_config.AgentConfig]:
    """The rendered config.yaml, raw and as the agent itself loads it (so the chart follows the contract)."""
    configmap = find(objects, "ConfigMap")
    raw = yaml.safe_load(configmap["data"]["config.yaml"])
    return raw, agent_config.from_mapping(raw, env={})


def mount_of(container: dict[str, Any], volume: str) -> dict[str, Any]:
    mounts = [m for m in container.get("volumeMounts") or [] if m["name"] == volume]
    assert len(mounts) == 1, f"{container['name']} should mount {volume} once"
    return mounts[0]


@pytest.fixture(name="rendered_istiod", scope="module")
def fixture_rendered_istiod() -> list[dict[str, Any]]:
    """The istiod-like fixture chart rendered with examples/istiod-values.yaml."""
    objects, _ = render(FIXTURE_CHARTS / "istiod-like", load_values("istiod-values.yaml"), name="istiod")
    return objects


@pytest.fixture(name="pod", scope="module")
def fixture_pod(rendered_istiod: list[dict[str, Any]]) -> dict[str, Any]:
    """The istiod pod spec from that render."""
    pod: dict[str, Any] = find(rendered_istiod, "Deployment", "istiod")["spec"]["template"]["spec"]
    return pod


@pytest.fixture(name="rendered_gateway", scope="module")
def fixture_rendered_gateway() -> list[dict[str, Any]]:
    """The gateway-like fixture chart rendered with examples/gateway-values.yaml."""
    objects, _ = render(
        FIXTURE_CHARTS / "gateway-like",
        load_values("gateway-values.yaml"),
        name="istio-ingressgateway",
        namespace="istio-ingress",
    )
    return objects


class TestAgentChart:
    def test_lint_is_clean(self) -> None:
        """`helm lint --strict` reports no warning or error, in either mode, with RBAC on, on OpenShift and with a
        revisioned istiod's service account."""
        for values in ({}, {"mode": "gateway", "rbac": {"create": True, "rolloutRestart": {"enabled": True}}},
                       {"openshift": True, "extraServiceAccountNames": ["istiod-canary"], "rbac": {"create": True}}):
            report = helm.lint(CHART, values, strict=True, kube_version="v1.33.0")
            assert report["errors"] == []
            assert [m for m in report["messages"] if m["severity"] >= 2] == []

    def test_default_render_is_a_valid_istiod_config(self) -> None:
        """Defaults give one valid ConfigMap whose config.yaml the agent loads: one istio-ca bundle in ROOT_CA_DIR."""
        objects, notes = render(CHART)
        validate(objects)
        assert [o["kind"] for o in objects] == ["ConfigMap"]
        assert find(objects, "ConfigMap")["metadata"]["name"] == AGENT
        raw, cfg = agent_config_of(objects)
        assert [(b.name, b.type, b.dir) for b in cfg.bundles] == [
            ("istiod-cacerts", "istio-ca", "/var/run/secrets/istio-ca")
        ]
        assert cfg.bundles[0].source.kv == "kubernetes-cluster1-secrets/istiod-service/certs"
        assert (cfg.auth.method, cfg.auth.mount, cfg.auth.role) == ("kubernetes", "kubernetes-cluster1", "istiod")
        assert cfg.auth.token_path == "/var/run/secrets/vault/token"
        # dual-stack: kubelet probes reach it on IPv4-only, IPv6-only and dual-stack clusters
        assert cfg.health.listen == "[::]:8099"
        assert "ca_cert" not in raw["vault"]
        assert "Added cacerts files watcher at /var/run/secrets/istio-ca" in notes
        assert "audience=vault" in notes

    def test_default_sources_are_what_setup_vault_grants(self) -> None:
        """The chart's default KV paths, in either mode, are the ones `setup vault --cluster cluster1` (with
        `--gateway istio-ingress/istio-ingressgateway` for a gateway) gives the pod's role read access to: a user
        who keeps the defaults does not meet a permission denied."""
        from agent.clusters import ClusterLayout

        layout = ClusterLayout("cluster1")
        _, istiod = agent_config_of(render(CHART)[0])
        _, gateway = agent_config_of(render(CHART, {"mode": "gateway"})[0])
        assert [b.source.kv for b in istiod.bundles] == [layout.kv_path]
        gateway_path = layout.gateway_kv_path("istio-ingress", "istio-ingressgateway")
        assert [b.source.kv for b in gateway.bundles] == [gateway_path]
        assert istiod.auth.mount == gateway.auth.mount == layout.auth_mount

    def test_vault_settings_reach_the_config(self) -> None:
        """Address, CA PEM, namespace, server name and auth values land under the contract's keys."""
        values = {
            "vault": {
                "address": "https://openbao.example:8200",
                "caCertPEM": PEM,
                "namespace": "production",
                "tlsServerName": "openbao.internal",
            },
            "auth": {"method": "jwt", "mount": "auth/jwt-cluster2", "role": "istiod-c2"},
            "init": {"timeout": "5m"},
            "sidecar": {"pollInterval": "10s"},
        }
        objects, _ = render(CHART, values)
        validate(objects)
        raw, cfg = agent_config_of(objects)
        assert raw["vault"] == {
            "address": "https://openbao.example:8200",
            "ca_cert": "/etc/istio-vault-agent/vault-ca.crt",
            "namespace": "production",
            "tls_server_name": "openbao.internal",
        }
        # The CA file the config points at is in the same ConfigMap, which the examples mount there.
        assert find(objects, "ConfigMap")["data"]["vault-ca.crt"] == PEM
        assert (cfg.auth.method, cfg.auth.mount, cfg.auth.role) == ("jwt", "auth/jwt-cluster2", "istiod-c2")
        assert (cfg.init.timeout, cfg.sidecar.poll_interval) == (300, 10)

    def test_gateway_mode_publishes_tls_bundles(self) -> None:
        """mode=gateway renders tls bundles and NOTES show the Gateway fields pointing at their files."""
        values = {
            "mode": "gateway",
            "auth": {"role": "istio-ingressgateway"},
            "extraBundles": [
                {
                    "name": "api-cert",
                    "type": "tls",
                    "source": {"kv": "secrets/api"},
                    "dir": "/var/run/secrets/istio-ca/api-cert",
                }
            ],
        }
        objects, notes = render(CHART, values, namespace="istio-ingress")
        validate(objects)
        _, cfg = agent_config_of(objects)
        assert [(b.name, b.type) for b in cfg.bundles] == [("ingress-cert", "tls"), ("api-cert", "tls")]
        assert "serverCertificate: /var/run/secrets/istio-ca/ingress-cert/tls.crt" in notes
        assert "privateKey: /var/run/secrets/istio-ca/ingress-cert/tls.key" in notes
        assert "caCertificates: /var/run/secrets/istio-ca/ingress-cert/ca.crt" in notes

    def test_extra_config_is_merged(self) -> None:
        """extraConfig reaches the agent config and per-bundle agent settings pass through."""
        values = {
            "extraConfig": {"log": {"level": "debug"}},
            "istiod": {"bundle": {"multiroot": True, "on_root_change": "none", "workload_cert_ttl": "12h"}},
        }
        objects, _ = render(CHART, values)
        _, cfg = agent_config_of(objects)
        assert cfg.log.level == "debug"
        assert (cfg.bundles[0].multiroot, cfg.bundles[0].on_root_change) == (True, "none")
        assert cfg.bundles[0].workload_ttl == 12 * 3600
        _, default = agent_config_of(render(CHART, {})[0])
        assert default.bundles[0].workload_ttl == 24 * 3600

    def test_pki_sources_pass_through(self) -> None:
        """A PKI source variant replaces kv (set to null) and reaches the agent config as given."""
        values = {
            "istiod": {"bundle": {"source": {"kv": None, "pki_intermediate": {"mount": "pki", "cluster": "c1"}}}},
            "extraBundles": [{"name": "gw", "type": "tls", "dir": "/var/run/secrets/istio-ca/gw", "source": {
                "pki": {"mount": "pki_int", "role": "ingress", "common_name": "app.example.com"}}}],
        }
        objects, _ = render(CHART, values)
        _, cfg = agent_config_of(objects)
        assert [b.source.variant for b in cfg.bundles] == ["pki_intermediate", "pki"]
        assert cfg.bundles[0].source.pki_intermediate is not None
        assert cfg.bundles[0].source.pki_intermediate.cluster == "c1"

    def test_rbac_is_off_by_default_and_grants_only_what_is_asked(self) -> None:
        """rbac.create adds a Role for events (and rollout-restart patches when enabled) bound to the pod's account."""
        objects, _ = render(CHART)
        assert not [o for o in objects if o["kind"] in {"Role", "RoleBinding"}]

        objects, _ = render(CHART, {"rbac": {"create": True}})
        validate(objects)
        rules = find(objects, "Role")["rules"]
        assert all(r["resources"] == ["events"] for r in rules)
        assert {g for r in rules for g in r["apiGroups"]} == {"", "events.k8s.io"}

        values = {
            "serviceAccountName": "istio-ingressgateway",
            "rbac": {
                "create": True,
                "events": False,
                "rolloutRestart": {"enabled": True, "resourceNames": ["istio-ingressgateway"]},
            },
        }
        objects, _ = render(CHART, values, namespace="istio-ingress")
        validate(objects)
        (rule,) = find(objects, "Role")["rules"]
        assert rule == {
            "apiGroups": ["apps"],
            "resources": ["deployments"],
            "resourceNames": ["istio-ingressgateway"],
            "verbs": ["get", "patch"],
        }
        binding = find(objects, "RoleBinding")
        assert binding["roleRef"]["name"] == find(objects, "Role")["metadata"]["name"]
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": "istio-ingressgateway", "namespace": "istio-ingress"}
        ]

    def test_remote_secrets_get_a_narrow_role(self) -> None:
        """remoteSecrets.bundles become remote-secret bundles in the release namespace, and with rbac.create the Role
        grants get/patch on exactly their Secrets, create/list (which resourceNames cannot narrow), and delete only
        on retired clusters' Secrets; without remote secrets no rule names secrets."""
        remote = {"bundles": [{"name": "remote-cluster-b", "cluster": "cluster-b", "prune": True,
                               "source": {"kv": "kv/istio/remote-secrets/cluster-b"}}]}
        objects, _ = render(CHART, {"remoteSecrets": remote})
        assert not [o for o in objects if o["kind"] == "Role"]
        _, cfg = agent_config_of(objects)
        bundle = cfg.bundles[1]
        assert (bundle.type, bundle.cluster, bundle.namespace, bundle.prune) == (
            "remote-secret", "cluster-b", "istio-system", True)

        objects, _ = render(CHART, {"rbac": {"create": True, "events": False}, "remoteSecrets": remote})
        validate(objects)
        assert find(objects, "Role")["rules"] == [
            {"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["istio-remote-secret-cluster-b"],
             "verbs": ["get", "patch"]},
            {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create", "list"]},
        ]
        retired = {**remote, "retiredClusters": ["cluster-c"]}
        objects, _ = render(CHART, {"rbac": {"create": True}, "remoteSecrets": retired})
        validate(objects)
        deletes = [r for r in find(objects, "Role")["rules"] if "delete" in r["verbs"]]
        assert deletes == [{"apiGroups": [""], "resources": ["secrets"],
                            "resourceNames": ["istio-remote-secret-cluster-c"], "verbs": ["delete"]}]
        objects, _ = render(CHART, {"rbac": {"create": True}})
        assert not [r for r in find(objects, "Role")["rules"] if "secrets" in r["resources"]]
        report = helm.lint(CHART, {"rbac": {"create": True}, "remoteSecrets": retired}, strict=True,
                           kube_version="v1.33.0")
        assert report["errors"] == []

    @pytest.mark.parametrize(
        ("values", "message"),
        [
            ({"mode": "ingress"}, 'mode must be istiod or gateway, not "ingress"'),
            ({"remoteSecrets": {"bundles": [{"name": "r", "source": {"kv": "kv/r"}}]}}, "bundle 1 (r) needs cluster"),
            ({"rbac": {"create": True}, "remoteSecrets": {"bundles": [
                {"name": "r", "cluster": "c", "namespace": "other", "source": {"kv": "kv/r"}}]}},
             "the Role covers the release namespace istio-system only"),
            ({"vault": {"address": ""}}, "vault.address is required"),
            ({"auth": {"role": ""}}, "auth.role is required"),
            (
                {"mode": "gateway", "gateway": {"bundles": [{"name": "x", "source": {"kv": "a/b"}}]}},
                "bundle 0 (x) needs dir",
            ),
            ({"mode": "gateway", "gateway": {"bundles": []}}, "gateway.bundles must list at least one tls bundle"),
            ({"istiod": {"bundle": {"source": {"pki_intermediate": {"cluster": "c1"}}}}},
             "bundle 0 (istiod-cacerts) needs exactly one of source.kv"),
            ({"rbac": {"create": True, "events": False}}, "neither rbac.events nor rbac.rolloutRestart.enabled"),
        ],
    )
    def test_bad_values_fail_with_the_key_to_fix(self, values: dict[str, Any], message: str) -> None:
        """A wrong or missing value stops the render with a message naming the values key."""
        with pytest.raises(helm.HelmRenderError, match=message.replace("(", r"\(").replace(")", r"\)")):
            render(CHART, values)


class TestIstiodExample:
    def test_rendered_istiod_is_valid(self, rendered_istiod: list[dict[str, Any]], pod: dict[str, Any]) -> None:
        """The istiod-like chart with the example values gives schema-valid objects and a consistent pod."""
        validate(rendered_istiod)
        check_pod_wiring(pod)

    def test_agent_is_a_native_sidecar_gating_discovery(self, pod: dict[str, Any]) -> None:
        """The agent is an initContainer with restartPolicy Always whose startupProbe waits on /readyz."""
        (agent,) = pod["initContainers"]
        assert agent["name"] == AGENT
        assert agent["restartPolicy"] == "Always"
        assert agent["startupProbe"]["httpGet"] == {"path": "/readyz", "port": 8099}
        assert agent["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": 8099}
        # The startup budget must outlast the agent's init timeout, or the kubelet kills it first.
        probe = agent["startupProbe"]
        assert probe["periodSeconds"] * probe["failureThreshold"] > 120
        assert agent["args"] == ["run", "--config", "/etc/istio-vault-agent/config.yaml", "--mode", "sidecar"]

    def test_discovery_reads_root_ca_dir_from_the_shared_volume(self, pod: dict[str, Any]) -> None:
        """discovery's ROOT_CA_DIR is its mount of the memory emptyDir the agent writes, and the bundle dir."""
        discovery = next(c for c in pod["containers"] if c["name"] == "discovery")
        env = {e["name"]: e.get("value") for e in discovery["env"]}
        root_ca_dir = env["ROOT_CA_DIR"]
        (agent,) = pod["initContainers"]
        shared = next(v for v in pod["volumes"] if "emptyDir" in v)
        assert shared["emptyDir"]["medium"] == "Memory"
        assert mount_of(discovery, shared["name"])["mountPath"] == root_ca_dir
        assert mount_of(discovery, shared["name"]).get("readOnly") is True
        assert mount_of(agent, shared["name"])["mountPath"] == root_ca_dir
        assert root_ca_dir != "/etc/cacerts"
        # The chart's cacerts Secret mount stays where it was, untouched.
        assert mount_of(discovery, "cacerts")["mountPath"] == "/etc/cacerts"
        _, cfg = agent_config_of(render(CHART)[0])
        assert cfg.bundles[0].dir == root_ca_dir

    def test_agent_logs_in_with_a_vault_audience_token(self, pod: dict[str, Any]) -> None:
        """A projected token with audience vault sits where the chart's auth.tokenPath expects it."""
        (agent,) = pod["initContainers"]
        token_volume = next(v for v in pod["volumes"] if "projected" in v and v["name"].startswith(AGENT))
        (source,) = token_volume["projected"]["sources"]
        token = source["serviceAccountToken"]
        assert token["audience"] == "vault"
        assert 600 <= token["expirationSeconds"] <= 86400
        _, cfg = agent_config_of(render(CHART)[0])
        mount = mount_of(agent, token_volume["name"])
        assert posixpath.join(mount["mountPath"], token["path"]) == cfg.auth.token_path
        assert mount["readOnly"] is True

    def test_agent_mounts_the_chart_configmap(self, pod: dict[str, Any]) -> None:
        """The ConfigMap volume names what the chart renders for release istio-vault-agent, at the --config dir."""
        (agent,) = pod["initContainers"]
        configmap_volume = next(v for v in pod["volumes"] if "configMap" in v)
        chart_configmap = find(render(CHART)[0], "ConfigMap")
        assert configmap_volume["configMap"]["name"] == chart_configmap["metadata"]["name"]
        mount = mount_of(agent, configmap_volume["name"])
        config_arg = agent["args"][agent["args"].index("--config") + 1]
        assert posixpath.dirname(config_arg) == mount["mountPath"]
        assert posixpath.basename(config_arg) in chart_configmap["data"]

    def test_agent_runs_locked_down_and_small(self, pod: dict[str, Any]) -> None:
        """Non-root 1337, read-only root, no escalation, no capabilities; CPU far below vault-k8s, memory not above."""
        (agent,) = pod["initContainers"]
        sc = agent["securityContext"]
        assert sc["runAsNonRoot"] is True
        assert (sc["runAsUser"], sc["runAsGroup"]) == (1337, 1337)
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"]
        requests = agent["resources"]["requests"]
        assert requests["cpu"].endswith("m") and int(requests["cpu"][:-1]) < 250
        # memory: the measured 63 MiB RSS (bench/RESULTS.md) fits the request, and the limit leaves headroom
        assert requests["memory"].endswith("Mi") and 63 <= int(requests["memory"][:-2]) <= 64
        limit = agent["resources"]["limits"]["memory"]
        assert limit.endswith("Mi") and int(limit[:-2]) >= 2 * int(requests["memory"][:-2])

    def test_example_matches_what_inject_adds(self, pod: dict[str, Any]) -> None:
        """`istio-vault-agent inject` adds exactly the container and volumes of the example values."""
        example = load_values("istiod-values.yaml")
        assert example["initContainers"] == [agent_container(InjectOptions())]
        assert example["volumes"] == agent_volumes(InjectOptions())


class TestGatewayExample:
    def test_rendered_gateway_is_valid_with_bundles_on_the_proxy(self, rendered_gateway: list[dict[str, Any]]) -> None:
        """The gateway-like chart with the example values is valid and istio-proxy sees every bundle dir."""
        validate(rendered_gateway)
        pod = find(rendered_gateway, "Deployment", "istio-ingressgateway")["spec"]["template"]["spec"]
        check_pod_wiring(pod)
        (agent,) = pod["initContainers"]
        assert agent["restartPolicy"] == "Always"
        assert agent["startupProbe"]["httpGet"] == {"path": "/readyz", "port": 8099}
        proxy = next(c for c in pod["containers"] if c["name"] == "istio-proxy")
        shared = next(v for v in pod["volumes"] if "emptyDir" in v)
        proxy_mount = mount_of(proxy, shared["name"])
        assert proxy_mount["readOnly"] is True
        assert mount_of(agent, shared["name"])["mountPath"] == proxy_mount["mountPath"]
        # Gateways take certificate files, not a CA directory: no ROOT_CA_DIR there.
        assert "env" not in proxy or all(e["name"] != "ROOT_CA_DIR" for e in proxy["env"])
        _, cfg = agent_config_of(render(CHART, {"mode": "gateway"}, namespace="istio-ingress")[0])
        for bundle in cfg.bundles:
            assert bundle.dir.startswith(proxy_mount["mountPath"] + "/")

    def test_gateway_example_is_the_istiod_one_minus_root_ca_dir(self) -> None:
        """Both examples add the same agent container and volumes; only the istiod one sets env."""
        gateway, istiod = load_values("gateway-values.yaml"), load_values("istiod-values.yaml")
        assert gateway["initContainers"] == istiod["initContainers"]
        assert gateway["volumes"] == istiod["volumes"]
        assert gateway["volumeMounts"] == istiod["volumeMounts"]
        assert "env" not in gateway


def check_stream(objects: list[dict[str, Any]], **options: Any) -> None:
    """`istio-vault-agent inject --check` (with `options`) on the rendered objects: raises ConfigError on a gap."""
    inject(yaml.safe_dump_all(objects, sort_keys=False), InjectOptions(check=True, **options))


def merged_with_agent(example: str, key: str, own: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The example's list `key` with the user's own entries appended: what a user of pilot.* must write."""
    return [*load_values(example)[key], *own]


#: a user's own pilot.* entries, one per list the istiod chart (1.24+) copies over the top level
OWN_PILOT = {
    "volumes": [{"name": "plugin-config", "configMap": {"name": "plugin-config"}}],
    "volumeMounts": [{"name": "plugin-config", "mountPath": "/etc/plugin", "readOnly": True}],
    "initContainers": [{"name": "warm-up", "image": "busybox:1.36", "command": ["true"]}],
}


class TestTraps:
    @pytest.mark.parametrize("key", ["volumes", "volumeMounts", "initContainers"])
    def test_own_pilot_lists_drop_the_agent_and_check_says_what_to_do(self, key: str) -> None:
        """istiod 1.24+: the user's own pilot.<key> replaces the example's list, leaving ROOT_CA_DIR without the
        agent's wiring; `inject --check` fails with one sentence saying to put the entries under pilot.* too, and
        passes once the lists are merged there."""
        own = OWN_PILOT[key]
        values = {**load_values("istiod-values.yaml"), "pilot": {key: own}}
        if key == "volumeMounts":  # the user's mount needs the user's volume, as in their own values
            values["pilot"]["volumes"] = merged_with_agent("istiod-values.yaml", "volumes", OWN_PILOT["volumes"])
        objects, _ = render(FIXTURE_CHARTS / "istiod-like", values, name="istiod")
        pod = find(objects, "Deployment", "istiod")["spec"]["template"]["spec"]
        discovery = next(c for c in pod["containers"] if c["name"] == "discovery")
        # the trap: ROOT_CA_DIR (a map, merged) survives while a list of the agent's wiring is gone
        assert {"name": "ROOT_CA_DIR", "value": "/var/run/secrets/istio-ca"} in discovery["env"]
        with pytest.raises(ConfigError) as caught:
            check_stream(objects)
        message = str(caught.value)
        assert message.startswith("Deployment istio-system/istiod has only part of the agent's wiring (")
        assert "put the example's entries into those pilot.* lists too" in message
        assert "\n" not in message

        values["pilot"][key] = merged_with_agent("istiod-values.yaml", key, own)
        objects, _ = render(FIXTURE_CHARTS / "istiod-like", values, name="istiod")
        validate(objects)
        check_pod_wiring(find(objects, "Deployment", "istiod")["spec"]["template"]["spec"])
        check_stream(objects)

    def test_gateway_chart_1_26_drops_init_containers(self) -> None:
        """Gateway charts 1.25/1.26 accept initContainers but render none: the example gives an empty mount and no
        agent, which `inject --check` refuses naming the inject command; without the example, `inject` adds the
        agent and the result is complete and valid."""
        chart = FIXTURE_CHARTS / "gateway-like-1.26"
        objects, _ = render(chart, load_values("gateway-values.yaml"), name="istio-ingressgateway",
                            namespace="istio-ingress")
        pod = find(objects, "Deployment", "istio-ingressgateway")["spec"]["template"]["spec"]
        assert "initContainers" not in pod
        assert CA_VOLUME in {v["name"] for v in pod["volumes"]}
        with pytest.raises(ConfigError, match=(
            r"^Deployment istio-ingress/istio-ingressgateway has only part of the agent's wiring \(it has no "
            r"istio-vault-agent initContainer\): gateway charts 1\.25 and 1\.26 accept initContainers but drop "
            r"them: add the agent with `istio-vault-agent inject --name istio-ingressgateway --container "
            r"istio-proxy` or use gateway chart 1\.27\+$")):
            check_stream(objects, names=("istio-ingressgateway",), container="istio-proxy")

        objects, _ = render(chart, name="istio-ingressgateway", namespace="istio-ingress")
        opts = {"names": ("istio-ingressgateway",), "container": "istio-proxy"}
        injected = list(yaml.safe_load_all(inject(yaml.safe_dump_all(objects), InjectOptions(**opts))))
        validate(injected)
        check_pod_wiring(find(injected, "Deployment", "istio-ingressgateway")["spec"]["template"]["spec"])
        check_stream(injected, **opts)

    def test_revisioned_istiod_service_account_is_bound(self) -> None:
        """istiod with revision=canary runs as istiod-canary; extraServiceAccountNames puts it in NOTES' Vault role
        command and the RoleBinding next to istiod, and NOTES tell istiod users about it."""
        objects, _ = render(FIXTURE_CHARTS / "istiod-like", {**load_values("istiod-values.yaml"),
                                                             "revision": "canary"}, name="istiod")
        pod = find(objects, "Deployment", "istiod-canary")["spec"]["template"]["spec"]
        canary = pod["serviceAccountName"]
        assert canary == "istiod-canary"

        _, notes = render(CHART)
        assert "runs as service account istiod-canary" in notes
        assert "bound_service_account_names=istiod \\" in notes
        objects, notes = render(CHART, {"extraServiceAccountNames": [canary], "rbac": {"create": True}})
        validate(objects)
        assert "bound_service_account_names=istiod,istiod-canary \\" in notes
        assert "runs as service account istiod-canary" not in notes  # no hint once it is bound
        _, notes = render(CHART, {"mode": "gateway"})
        assert "1.25 and 1.26 accept initContainers but drop them" in notes
        assert [s["name"] for s in find(objects, "RoleBinding")["subjects"]] == ["istiod", canary]

    def test_openshift_drops_the_pinned_uid_and_makes_keys_group_readable(self) -> None:
        """openshift=true publishes keys 0640 (a bundle's own key_mode wins); the OpenShift overlay after either
        example runs the agent without runAsUser/runAsGroup, valid, and the same container `inject --no-pin-uid`
        adds."""
        values = {"openshift": True, "extraBundles": [
            {"name": "own", "type": "tls", "source": {"kv": "s/own"}, "dir": "/var/run/secrets/istio-ca/own",
             "key_mode": 0o600}]}
        for mode in ("istiod", "gateway"):
            objects, notes = render(CHART, {**values, "mode": mode})
            _, cfg = agent_config_of(objects)
            assert [b.key_mode for b in cfg.bundles] == [0o640, 0o600]
            assert "--no-pin-uid" in notes
        _, cfg = agent_config_of(render(CHART)[0])
        assert cfg.bundles[0].key_mode == 0o600
        # a remote-secret bundle is a Secret: no key_mode, which its kind would refuse
        remote = {"name": "east", "type": "remote-secret", "cluster": "east", "source": {"kv": "kv/remote/east"}}
        _, cfg = agent_config_of(render(CHART, {"openshift": True, "extraBundles": [remote]})[0])
        assert [b.type for b in cfg.bundles] == ["istio-ca", "remote-secret"]

        overlay = load_values("openshift-values.yaml")
        (agent,) = overlay["initContainers"]
        assert overlay["initContainers"] == [agent_container(InjectOptions(pin_uid=False))]
        (pinned,) = load_values("istiod-values.yaml")["initContainers"]
        for key in ("runAsUser", "runAsGroup"):
            del pinned["securityContext"][key]
        assert agent == pinned
        for chart, example, name in (("istiod-like", "istiod-values.yaml", "istiod"),
                                     ("gateway-like", "gateway-values.yaml", "istio-ingressgateway")):
            objects, _ = render(FIXTURE_CHARTS / chart, {**load_values(example), **overlay}, name=name)
            validate(objects)
            pod = find(objects, "Deployment", name)["spec"]["template"]["spec"]
            check_pod_wiring(pod)
            (rendered,) = pod["initContainers"]
            assert rendered["securityContext"]["runAsNonRoot"] is True
            assert not {"runAsUser", "runAsGroup"} & set(rendered["securityContext"])

    def test_agent_failure_reason_reaches_kubectl_describe(self) -> None:
        """Every way of adding the agent sets terminationMessagePolicy FallbackToLogsOnError, so a crash shows the
        agent's `error:` line (or its log's tail) in `kubectl describe pod`."""
        for example in ("istiod-values.yaml", "gateway-values.yaml", "openshift-values.yaml"):
            (agent,) = load_values(example)["initContainers"]
            assert agent["terminationMessagePolicy"] == "FallbackToLogsOnError", example
        assert agent_container(InjectOptions())["terminationMessagePolicy"] == "FallbackToLogsOnError"


def _ca_args(job: dict[str, Any]) -> Any:
    """The Job's args as the real `istio-vault-agent ca` parser reads them (so the chart follows the CLI)."""
    import argparse

    from agent import ca

    (container,) = job["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    assert args[0] == "ca"
    parser = argparse.ArgumentParser()
    ca.add_arguments(parser)
    return parser.parse_args(args[1:])


class TestBootstrapJob:
    def test_absent_by_default(self) -> None:
        """Without bootstrap.enabled nothing of the Job is rendered: no Job, ServiceAccount or hook."""
        objects, notes = render(CHART)
        assert not [o for o in objects if o["kind"] in {"Job", "ServiceAccount"}]
        assert "Bootstrap:" not in notes

    def test_job_with_root_secret_is_valid_and_least_privileged(self) -> None:
        """With a root Secret the Job is schema-valid, runs `ca intermediate --if-missing --root-dir` on the
        agent's KV path with Kubernetes auth, and its own ServiceAccount has no API token and no RBAC."""
        values = {"bootstrap": {"enabled": True, "cluster": "east", "root": {"secretName": "istio-root"}},
                  "rbac": {"create": True}}
        objects, notes = render(CHART, values)
        validate(objects)
        job = find(objects, "Job")
        pod = job["spec"]["template"]["spec"]
        check_pod_wiring(pod)
        args = _ca_args(job)
        assert (args.ca_command, args.cluster, args.kv, args.if_missing, args.force) == (
            "intermediate", "east", "kubernetes-cluster1-secrets/istiod-service/certs", True, False)
        assert (args.root_dir, args.root_kv, args.key_type, args.days) == ("/etc/istio-ca-root", None, "rsa-4096", 730)
        assert (args.auth_mount, args.role) == ("kubernetes-cluster1", "istio-ca-bootstrap")
        # the token it logs in with is a projected token for Vault, not the API token
        sa = find(objects, "ServiceAccount")
        assert sa["automountServiceAccountToken"] is False and pod["automountServiceAccountToken"] is False
        assert pod["serviceAccountName"] == sa["metadata"]["name"] != "istiod"
        token = next(v for v in pod["volumes"] if v["name"] == "vault-token")["projected"]["sources"][0]
        assert token["serviceAccountToken"]["audience"] == "vault"
        (container,) = pod["containers"]
        assert mount_of(container, "vault-token")["mountPath"] + "/token" == args.token_path
        # no RBAC names the Job's account (the agent's own Role is for istiod's)
        for binding in (o for o in objects if o["kind"] in {"RoleBinding", "ClusterRoleBinding"}):
            assert all(s["name"] != sa["metadata"]["name"] for s in binding["subjects"])
        root = next(v for v in pod["volumes"] if v["name"] == "root-ca")["secret"]
        assert root["secretName"] == "istio-root"
        assert {i["key"] for i in root["items"]} == {"root-cert.pem", "root-key.pem"}
        assert mount_of(container, "root-ca") == {"name": "root-ca", "mountPath": "/etc/istio-ca-root",
                                                  "readOnly": True}
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert pod["securityContext"]["runAsNonRoot"] is True
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env == {"VAULT_ADDR": "https://vault.vault.svc:8200"}  # no VAULT_TOKEN anywhere
        # created before the release's other objects, so the bundle is in KV before istiod starts
        for obj in (job, sa):
            assert obj["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
        assert int(sa["metadata"]["annotations"]["helm.sh/hook-weight"]) < int(
            job["metadata"]["annotations"]["helm.sh/hook-weight"])
        assert 'path "kubernetes-cluster1-secrets/data/istiod-service/certs"' in notes

    def test_job_with_root_in_kv_and_vault_ca(self) -> None:
        """With bootstrap.root.kv the Job passes --root-kv and mounts no Secret; Vault's CA comes from a hook
        ConfigMap of its own (the chart's ConfigMap does not exist yet when pre-install hooks run)."""
        values = {"bootstrap": {"enabled": True, "root": {"kv": "pki-root/istio/root"}, "kv": "kv/c2/certs",
                                "keyType": "ec-p256", "days": 365},
                  "vault": {"caCertPEM": PEM, "namespace": "mesh"}}
        objects, notes = render(CHART, values)
        validate(objects)
        job = find(objects, "Job")
        pod = job["spec"]["template"]["spec"]
        check_pod_wiring(pod)
        args = _ca_args(job)
        assert (args.root_kv, args.root_dir, args.kv, args.key_type, args.days) == (
            "pki-root/istio/root", None, "kv/c2/certs", "ec-p256", 365)
        assert "root-ca" not in {v["name"] for v in pod["volumes"]}
        (container,) = pod["containers"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["VAULT_NAMESPACE"] == "mesh"
        hook_cm = next(o for o in objects if o["kind"] == "ConfigMap" and "helm.sh/hook" in o["metadata"].get(
            "annotations", {}))
        assert hook_cm["data"]["vault-ca.crt"] == PEM
        ca_volume = next(v for v in pod["volumes"] if v["name"] == "vault-ca")
        assert ca_volume["configMap"]["name"] == hook_cm["metadata"]["name"]
        assert env["VAULT_CACERT"] == mount_of(container, "vault-ca")["mountPath"] + "/vault-ca.crt"
        assert 'path "pki-root/data/istio/root" { capabilities = ["read"] }' in notes

    def test_openshift_lets_the_scc_pick_the_ids(self) -> None:
        """openshift: true drops the pinned uid, gid and fsGroup from the Job's pod (the restricted SCC sets them)."""
        values = {"openshift": True, "bootstrap": {"enabled": True, "root": {"secretName": "r"}}}
        objects, _ = render(CHART, values)
        validate(objects)
        security = find(objects, "Job")["spec"]["template"]["spec"]["securityContext"]
        assert security["runAsNonRoot"] is True
        assert not {"runAsUser", "runAsGroup", "fsGroup"} & set(security)

    def test_lint_is_clean_with_the_job(self) -> None:
        """`helm lint --strict` stays clean with the Job on."""
        report = helm.lint(CHART, {"bootstrap": {"enabled": True, "root": {"secretName": "r"}}}, strict=True,
                           kube_version="v1.33.0")
        assert report["errors"] == []
        assert [m for m in report["messages"] if m["severity"] >= 2] == []

    @pytest.mark.parametrize(("values", "message"), [
        ({"bootstrap": {"enabled": True}}, "bootstrap.root needs exactly one of secretName"),
        ({"bootstrap": {"enabled": True, "root": {"secretName": "a", "kv": "b/c"}}},
         "bootstrap.root needs exactly one of secretName"),
        ({"bootstrap": {"enabled": True, "root": {"secretName": "a"}},
          "istiod": {"bundle": {"source": {"kv": None, "pki_intermediate": {"mount": "pki", "cluster": "c"}}}}},
         "bootstrap.kv is required"),
    ])
    def test_bad_bootstrap_values_fail_with_the_key_to_fix(self, values: dict[str, Any], message: str) -> None:
        """No root, two roots, or no KV path to write stops the render naming the values key."""
        with pytest.raises(helm.HelmRenderError, match=message):
            render(CHART, values)
