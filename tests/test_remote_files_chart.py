"""Remote kubeconfigs as files in the chart and the istiod wiring (issue 21, item 1): the chart renders a
`target: files` bundle without Secret RBAC; examples/istiod-remote-files-values.yaml mounts the directory into
discovery and sets PILOT_MULTICLUSTER_KUBECONFIG_PATH; `inject --check` refuses that wiring on istiod before 1.30."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

pytest.importorskip("helm_python", reason="helm-python-sdk (the [test] extra) renders the charts")

from agent.errors import ConfigError
from agent.inject import REMOTE_VOLUME, InjectOptions, inject
from tests.test_chart import (
    CHART,
    FIXTURE_CHARTS,
    agent_config_of,
    check_pod_wiring,
    find,
    load_values,
    mount_of,
    render,
    validate,
)

BUNDLE = {"name": "remote-clusters", "target": "files", "source": {"kv": "kv/istio/remote-secrets/for-cluster-a"}}


def istiod(tag: str) -> tuple[list[dict[str, Any]], str]:
    """The istiod-like chart rendered with the files example at image tag `tag`; also the manifest text."""
    values = {**load_values("istiod-remote-files-values.yaml"), "tag": tag}
    objects, _ = render(FIXTURE_CHARTS / "istiod-like", values, name="istiod")
    return objects, "---\n".join(yaml.safe_dump(o) for o in objects)


class TestAgentChart:
    def test_a_files_bundle_gets_the_directory_and_no_secret_rbac(self):
        """remoteSecrets.bundles with target files: the agent config has it with remoteSecrets.filesDir, no
        namespace, and the Role grants nothing on Secrets."""
        objects, _ = render(CHART, {"remoteSecrets": {"bundles": [BUNDLE]}, "rbac": {"create": True, "events": True}})
        raw, cfg = agent_config_of(objects)
        b = cfg.bundles[-1]
        assert (b.type, b.target, b.dir, b.cluster) == ("remote-secret", "files", "/var/run/secrets/remote-kubeconfigs",
                                                        None)
        assert "namespace" not in raw["bundles"][-1]
        role = find(objects, "Role")
        assert not any("secrets" in r.get("resources", []) for r in role["rules"])

    def test_openshift_makes_the_kubeconfigs_group_readable(self):
        """openshift=true: the kubeconfigs are published 0640 like keys (the reader shares the pod's fsGroup)."""
        objects, _ = render(CHART, {"openshift": True, "remoteSecrets": {"bundles": [BUNDLE]}})
        assert agent_config_of(objects)[1].bundles[-1].key_mode == 0o640


class TestIstiodWiring:
    def test_discovery_mounts_the_directory_istiod_reads(self):
        """With the example on istiod 1.30: the agent and discovery mount one volume at the bundle's dir, and
        PILOT_MULTICLUSTER_KUBECONFIG_PATH names it; inject --check passes the manifest through unchanged."""
        objects, text = istiod("1.30.0")
        validate(objects)
        pod = find(objects, "Deployment", "istiod")["spec"]["template"]["spec"]
        check_pod_wiring(pod)
        discovery = next(c for c in pod["containers"] if c["name"] == "discovery")
        agent = next(c for c in pod["initContainers"] if c["name"] == "istio-vault-agent")
        env = {e["name"]: e.get("value") for e in discovery["env"]}
        path = env["PILOT_MULTICLUSTER_KUBECONFIG_PATH"]
        assert path == "/var/run/secrets/remote-kubeconfigs"
        assert mount_of(discovery, REMOTE_VOLUME) == {"name": REMOTE_VOLUME, "mountPath": path, "readOnly": True}
        assert mount_of(agent, REMOTE_VOLUME)["mountPath"] == path
        assert not mount_of(agent, REMOTE_VOLUME).get("readOnly")
        assert inject(text, InjectOptions(check=True)) == text

    @pytest.mark.parametrize("tag", ["1.29.3", "1.24.0", "1.29.0-distroless"])
    def test_check_refuses_the_mode_before_1_30(self, tag):
        """istiod before 1.30 ignores PILOT_MULTICLUSTER_KUBECONFIG_PATH and would see no remote cluster: one
        sentence naming the image and what to do."""
        _, text = istiod(tag)
        with pytest.raises(ConfigError) as err:
            inject(text, InjectOptions(check=True))
        message = str(err.value)
        assert f"pilot:{tag}" in message and "only from 1.30" in message and "target: secret" in message
        assert "\n" not in message

    @pytest.mark.parametrize("tag", ["1.31.0", "master", "latest"])
    def test_check_accepts_newer_and_unversioned_tags(self, tag):
        """1.30+ and tags that name no version (a dev build) pass."""
        _, text = istiod(tag)
        assert inject(text, InjectOptions(check=True)) == text

    def test_check_refuses_the_variable_without_the_mount(self):
        """The variable without the agent's volume at that path (a user's own pilot.volumeMounts replaced the
        example's): refused, naming the example to merge."""
        values = {**load_values("istiod-remote-files-values.yaml"), "tag": "1.30.0"}
        values["volumeMounts"] = [m for m in values["volumeMounts"] if m["name"] != REMOTE_VOLUME]
        objects, _ = render(FIXTURE_CHARTS / "istiod-like", values, name="istiod")
        text = "---\n".join(yaml.safe_dump(o) for o in objects)
        with pytest.raises(ConfigError, match="without mounting volume istio-vault-agent-remote-kubeconfigs there"):
            inject(text, InjectOptions(check=True))
