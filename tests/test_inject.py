"""`istio-vault-agent inject`: the post-renderer adds the agent to istiod and gateway Deployments and nothing else."""

from __future__ import annotations

import argparse
import copy
import io
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.inject import AGENT_CONTAINER, CA_VOLUME, CONFIG_VOLUME, TOKEN_VOLUME, add_arguments, run

kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate checks the output")

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = ROOT / "tests" / "fixtures" / "manifests"
ISTIOD = (MANIFESTS / "istiod.yaml").read_text()
GATEWAY = (MANIFESTS / "gateway.yaml").read_text()
K8S_VERSION = "1.33"
AGENT_VOLUMES = {CA_VOLUME, TOKEN_VOLUME, CONFIG_VOLUME}


def invoke(text: str, *argv: str) -> tuple[int, str, str]:
    """Run `inject` with argv on text as stdin; return (exit code, stdout, stderr)."""
    parser = argparse.ArgumentParser(prog="istio-vault-agent inject")
    add_arguments(parser)
    out, err = io.StringIO(), io.StringIO()
    code = run(parser.parse_args(list(argv)), stdin=io.StringIO(text), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def inject_ok(text: str, *argv: str) -> str:
    code, out, err = invoke(text, *argv)
    assert (code, err) == (0, ""), err
    return out


def documents(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def chunks(text: str) -> list[str]:
    """The stream's documents as text, each with its `---` line."""
    return [c for c in re.split(r"(?m)^(?=---$)", text) if c]


def deployment(text: str, name: str) -> dict[str, Any]:
    (found,) = [d for d in documents(text) if d["kind"] == "Deployment" and d["metadata"]["name"] == name]
    return found


def pod_of(doc: dict[str, Any]) -> dict[str, Any]:
    pod: dict[str, Any] = doc["spec"]["template"]["spec"]
    return pod


def without_agent(doc: dict[str, Any]) -> dict[str, Any]:
    """The Deployment with everything inject adds taken out again."""
    doc = copy.deepcopy(doc)
    pod = pod_of(doc)
    pod["initContainers"] = [c for c in pod.get("initContainers", []) if c["name"] != AGENT_CONTAINER]
    if not pod["initContainers"]:
        del pod["initContainers"]
    pod["volumes"] = [v for v in pod.get("volumes", []) if v["name"] not in AGENT_VOLUMES]
    if not pod["volumes"]:
        del pod["volumes"]
    for c in pod["containers"]:
        if "volumeMounts" in c:
            c["volumeMounts"] = [m for m in c["volumeMounts"] if m["name"] != CA_VOLUME]
            if not c["volumeMounts"]:
                del c["volumeMounts"]
        if c.get("env"):
            c["env"] = [e for e in c["env"] if e["name"] != "ROOT_CA_DIR"]
    return doc


def validate_all(text: str) -> None:
    for doc in documents(text):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def check_pod_wiring(pod: dict[str, Any]) -> None:
    """No dangling or duplicate volume and container names (the API server would refuse them)."""
    volumes = [v["name"] for v in pod.get("volumes") or []]
    assert len(volumes) == len(set(volumes))
    all_containers = (pod.get("initContainers") or []) + pod["containers"]
    assert len({c["name"] for c in all_containers}) == len(all_containers)
    for c in all_containers:
        for m in c.get("volumeMounts") or []:
            assert m["name"] in volumes


class TestIstiod:
    def test_istiod_gets_the_agent_as_a_native_sidecar(self) -> None:
        """The istiod Deployment gains the agent initContainer, its volumes, the discovery mount and ROOT_CA_DIR."""
        out = inject_ok(ISTIOD)
        validate_all(out)
        pod = pod_of(deployment(out, "istiod"))
        check_pod_wiring(pod)
        (agent,) = pod["initContainers"]
        assert (agent["name"], agent["restartPolicy"]) == (AGENT_CONTAINER, "Always")
        assert agent["startupProbe"]["httpGet"] == {"path": "/readyz", "port": 8099}
        discovery = pod["containers"][0]
        env = {e["name"]: e.get("value") for e in discovery["env"]}
        assert env["ROOT_CA_DIR"] == "/var/run/secrets/istio-ca"
        ca_mount = next(m for m in discovery["volumeMounts"] if m["name"] == CA_VOLUME)
        assert ca_mount == {"name": CA_VOLUME, "mountPath": "/var/run/secrets/istio-ca", "readOnly": True}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes[CA_VOLUME]["emptyDir"]["medium"] == "Memory"
        token = volumes[TOKEN_VOLUME]["projected"]["sources"][0]["serviceAccountToken"]
        assert token["audience"] == "vault"
        assert volumes[CONFIG_VOLUME]["configMap"]["name"] == "istio-vault-agent"
        # The chart's optional cacerts Secret mount is left alone.
        assert {"name": "cacerts", "mountPath": "/etc/cacerts", "readOnly": True} in discovery["volumeMounts"]

    def test_everything_else_is_unchanged(self) -> None:
        """Other documents come out byte for byte; the Deployment keeps its comment and every other field."""
        out = inject_ok(ISTIOD)
        before, after = chunks(ISTIOD), chunks(out)
        assert len(before) == len(after) == 5
        changed = [i for i, (a, b) in enumerate(zip(before, after, strict=True)) if a != b]
        assert changed == [3]
        assert after[3].startswith("---\n# Source: istiod/templates/deployment.yaml\n")
        assert without_agent(deployment(out, "istiod")) == deployment(ISTIOD, "istiod")

    def test_running_twice_is_running_once(self) -> None:
        """Injecting already-injected manifests gives the same bytes, and a new image replaces the old one."""
        once = inject_ok(ISTIOD)
        assert inject_ok(once) == once
        updated = inject_ok(once, "--image", "registry.example.com/istio-vault-agent:0.2.0")
        (agent,) = pod_of(deployment(updated, "istiod"))["initContainers"]
        assert agent["image"] == "registry.example.com/istio-vault-agent:0.2.0"
        assert len(pod_of(deployment(updated, "istiod"))["volumes"]) == len(
            pod_of(deployment(once, "istiod"))["volumes"]
        )

    def test_options_shape_what_is_added(self) -> None:
        """--config-map, --audience and --mount-path end up in the volumes, mounts and ROOT_CA_DIR."""
        out = inject_ok(ISTIOD, "--config-map", "agent-cfg", "--audience", "openbao", "--mount-path", "/var/run/ca/")
        validate_all(out)
        pod = pod_of(deployment(out, "istiod"))
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes[CONFIG_VOLUME]["configMap"]["name"] == "agent-cfg"
        assert volumes[TOKEN_VOLUME]["projected"]["sources"][0]["serviceAccountToken"]["audience"] == "openbao"
        env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
        assert env["ROOT_CA_DIR"] == "/var/run/ca"
        (agent,) = pod["initContainers"]
        assert {"name": CA_VOLUME, "mountPath": "/var/run/ca"} in agent["volumeMounts"]

    def test_revisions_and_selectors(self) -> None:
        """istiod-<revision> is matched by default; --selector and --name pick Deployments by label or name."""
        canary = ISTIOD.replace("name: istiod\n  namespace", "name: istiod-canary\n  namespace").replace(
            "istio.io/rev: default", "istio.io/rev: canary"
        )
        stream = ISTIOD + canary
        out = inject_ok(stream)
        for name in ("istiod", "istiod-canary"):
            assert pod_of(deployment(out, name))["initContainers"][0]["name"] == AGENT_CONTAINER

        out = inject_ok(stream, "--selector", "istio.io/rev=canary")
        assert "initContainers" not in pod_of(deployment(out, "istiod"))
        assert pod_of(deployment(out, "istiod-canary"))["initContainers"]

        out = inject_ok(stream, "--name", "istiod")
        assert pod_of(deployment(out, "istiod"))["initContainers"]
        assert "initContainers" not in pod_of(deployment(out, "istiod-canary"))

    def test_kustomize_resource_list(self) -> None:
        """A kustomize KRM ResourceList comes back as one, with the istiod item injected."""
        resource_list = {"apiVersion": "config.kubernetes.io/v1", "kind": "ResourceList", "items": documents(ISTIOD)}
        out = inject_ok(yaml.safe_dump(resource_list, sort_keys=False))
        (result,) = documents(out)
        assert result["kind"] == "ResourceList"
        assert [i["kind"] for i in result["items"]] == [d["kind"] for d in documents(ISTIOD)]
        (dep,) = [i for i in result["items"] if i["kind"] == "Deployment"]
        assert pod_of(dep)["initContainers"][0]["name"] == AGENT_CONTAINER
        kubernetes_validate.validate(dep, K8S_VERSION, strict=True)


class TestGateway:
    def test_gateway_proxy_gets_the_shared_volume_without_root_ca_dir(self) -> None:
        """--container istio-proxy mounts the bundles into the proxy and sets no ROOT_CA_DIR."""
        out = inject_ok(GATEWAY, "--name", "istio-ingressgateway", "--container", "istio-proxy")
        validate_all(out)
        pod = pod_of(deployment(out, "istio-ingressgateway"))
        check_pod_wiring(pod)
        (proxy,) = pod["containers"]
        assert proxy["volumeMounts"] == [
            {"name": CA_VOLUME, "mountPath": "/var/run/secrets/istio-ca", "readOnly": True}
        ]
        assert proxy["env"] is None  # as the gateway chart rendered it
        assert pod["initContainers"][0]["restartPolicy"] == "Always"
        assert without_agent(deployment(out, "istio-ingressgateway")) == deployment(GATEWAY, "istio-ingressgateway")
        assert inject_ok(out, "--name", "istio-ingressgateway", "--container", "istio-proxy") == out

    def test_gateway_by_label(self) -> None:
        """--selector istio=ingressgateway finds the gateway without naming it."""
        out = inject_ok(GATEWAY, "--selector", "istio=ingressgateway", "--container", "istio-proxy")
        assert pod_of(deployment(out, "istio-ingressgateway"))["initContainers"][0]["name"] == AGENT_CONTAINER


class TestErrors:
    @pytest.mark.parametrize(
        ("text", "argv", "message"),
        [
            (ISTIOD, ["--name", "foo"], "error: no Deployment matched --name foo"),
            (
                GATEWAY,
                [],
                "error: no Deployment named istiod or istiod-* in the input; select one with --name or --selector",
            ),
            (
                GATEWAY,
                ["--name", "istio-ingressgateway"],
                "error: Deployment istio-ingress/istio-ingressgateway has no container named 'discovery'"
                " (it has: istio-proxy); pick one with --container",
            ),
            (
                ISTIOD,
                ["--mount-path", "/var/run/secrets/tokens"],
                "error: Deployment istio-system/istiod: container discovery already mounts volume 'istio-token' at"
                " /var/run/secrets/tokens; choose another --mount-path",
            ),
            (
                ISTIOD,
                ["--mount-path", "/etc/cacerts"],
                "error: --mount-path /etc/cacerts is where the istiod chart mounts the cacerts Secret; pick another",
            ),
            ("kind: Deployment\nmetadata: {name: istiod\n", [], "error: the manifests on stdin are not valid YAML"),
        ],
    )
    def test_one_error_line_and_no_output(self, text: str, argv: list[str], message: str) -> None:
        """A user error is one `error:` line on stderr, exit 1, and nothing half-written on stdout."""
        code, out, err = invoke(text, *argv)
        assert (code, out) == (1, "")
        assert err.count("\n") == 1
        assert err.startswith(message)

    @pytest.mark.parametrize(
        "odd", ["metadata: oops\nspec: oops", "metadata: {name: x, labels: [1]}\nspec: {template: [1]}"]
    )
    def test_a_malformed_deployment_beside_istiod_is_passed_through(self, odd: str) -> None:
        """A Deployment whose metadata or spec is not a mapping (a broken render) is echoed unchanged, with and
        without --check, while istiod still gets the agent: no internal error."""
        stray = f"---\napiVersion: apps/v1\nkind: Deployment\n{odd}\n"
        out = inject_ok(ISTIOD + stray)
        assert out.endswith(stray)
        istiod = out[: -len(stray)]
        assert pod_of(deployment(istiod, "istiod"))["initContainers"][0]["name"] == AGENT_CONTAINER
        assert inject_ok(out, "--check") == out

    def test_check_refuses_a_selected_deployment_without_a_pod_spec(self) -> None:
        """--check on an istiod Deployment whose spec is not a mapping fails with one sentence."""
        code, out, err = invoke("apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: istiod}\nspec: 5\n", "--check")
        assert (code, out) == (1, "")
        assert err.startswith("error: Deployment istiod has no istio-vault-agent initContainer")
        assert err.count("\n") == 1

    def test_cli_subcommand_filters_stdin(self) -> None:
        """`istio-vault-agent inject` works as a pipe (as Helm 3 --post-renderer runs it) and fails cleanly."""
        cmd = [sys.executable, "-m", "agent.cli", "inject"]
        done = subprocess.run(cmd, input=ISTIOD, capture_output=True, text=True, cwd=ROOT, timeout=60, check=False)
        assert (done.returncode, done.stderr) == (0, "")
        assert done.stdout == inject_ok(ISTIOD)
        done = subprocess.run(
            [*cmd, "--name", "foo"], input=ISTIOD, capture_output=True, text=True, cwd=ROOT, timeout=60, check=False
        )
        assert (done.returncode, done.stdout, done.stderr) == (1, "", "error: no Deployment matched --name foo\n")


def half_wired(text: str, name: str, drop: str) -> str:
    """`text` after inject, with one part of the agent's wiring on Deployment `name` taken out again."""
    docs = documents(text)
    pod = pod_of(next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == name))
    if drop == "agent":
        pod["initContainers"] = [c for c in pod["initContainers"] if c["name"] != AGENT_CONTAINER]
    elif drop == "volumes":
        pod["volumes"] = [v for v in pod["volumes"] if v["name"] not in AGENT_VOLUMES]
    else:
        for c in pod["containers"]:
            c["volumeMounts"] = [m for m in c.get("volumeMounts") or [] if m["name"] != CA_VOLUME]
    return yaml.safe_dump_all(docs, sort_keys=False)


class TestCheck:
    def test_check_passes_wired_manifests_through_unchanged(self) -> None:
        """`inject --check` on a complete istiod or gateway gives the input back byte for byte, exit 0."""
        istiod = inject_ok(ISTIOD)
        assert inject_ok(istiod, "--check") == istiod
        gateway = inject_ok(GATEWAY, "--name", "istio-ingressgateway", "--container", "istio-proxy")
        assert inject_ok(gateway, "--check", "--name", "istio-ingressgateway", "--container", "istio-proxy") == gateway

    def test_check_alone_checks_a_wired_gateway(self) -> None:
        """Plain `inject --check`, as the README's gateway step runs it, passes a gateway rendered with the agent (no
        --name needed) and fails, naming both ways out, when the input has no istiod and nothing wired."""
        gateway = inject_ok(GATEWAY, "--name", "istio-ingressgateway", "--container", "istio-proxy")
        assert inject_ok(gateway, "--check") == gateway
        code, out, err = invoke(GATEWAY, "--check")
        assert (code, out) == (1, "")
        assert err == (
            "error: no Deployment named istiod or istiod-* and none with the agent's wiring in the input: add the "
            "example values, or select the Deployment to check with --name or --selector\n"
        )
        # a half-wired gateway still fails plain --check with the fix
        code, _, err = invoke(half_wired(gateway, "istio-ingressgateway", "volumes"), "--check")
        assert code == 1
        assert err.startswith("error: Deployment istio-ingress/istio-ingressgateway has only part of the agent's")

    @pytest.mark.parametrize(("drop", "gap"), [
        ("agent", "it has no istio-vault-agent initContainer"),
        ("volumes", "it lacks volumes istio-vault-agent-ca, istio-vault-agent-token, istio-vault-agent-config"),
        ("mounts", "its discovery container sets ROOT_CA_DIR=/var/run/secrets/istio-ca without mounting volume"
                   " istio-vault-agent-ca there"),
    ])
    def test_check_refuses_an_istiod_whose_pilot_lists_replaced_the_agent(self, drop: str, gap: str) -> None:
        """istiod 1.24+ with the user's own pilot.* list: ROOT_CA_DIR without the agent, its volumes or the mount
        is one `error:` line naming the gap and telling to put the entries under pilot.* too; nothing is printed."""
        code, out, err = invoke(half_wired(inject_ok(ISTIOD), "istiod", drop), "--check")
        assert (code, out) == (1, "")
        assert err.startswith(f"error: Deployment istio-system/istiod has only part of the agent's wiring ({gap}")
        assert err.endswith("put the example's entries into those pilot.* lists too (one merged list each)\n")
        assert err.count("\n") == 1

    def test_check_refuses_an_istiod_without_the_agent(self) -> None:
        """A selected istiod with no trace of the agent fails `--check` with what to add."""
        code, out, err = invoke(ISTIOD, "--check")
        assert (code, out) == (1, "")
        assert err.startswith("error: Deployment istio-system/istiod has no istio-vault-agent initContainer, volumes"
                              " or mount: add the example values")

    def test_half_wired_gateway_fails_even_when_not_selected(self) -> None:
        """Gateway charts 1.25/1.26 drop initContainers: a gateway with the agent's volume and mount but no agent
        fails `inject` (which injects istiod here) with the command that adds the agent to it."""
        gateway = half_wired(inject_ok(GATEWAY, "--name", "istio-ingressgateway", "--container", "istio-proxy"),
                             "istio-ingressgateway", "agent")
        code, out, err = invoke(ISTIOD + "---\n" + gateway)
        assert (code, out) == (1, "")
        assert err == (
            "error: Deployment istio-ingress/istio-ingressgateway has only part of the agent's wiring (it has no "
            "istio-vault-agent initContainer): gateway charts 1.25 and 1.26 accept initContainers but drop them: add "
            "the agent with `istio-vault-agent inject --name istio-ingressgateway --container istio-proxy` or use "
            "gateway chart 1.27+\n"
        )
        # selecting it repairs it: the agent is added and the result passes --check
        args = ("--name", "istio-ingressgateway", "--container", "istio-proxy")
        fixed = inject_ok(gateway, *args)
        check_pod_wiring(pod_of(deployment(fixed, "istio-ingressgateway")))
        assert inject_ok(fixed, "--check", *args) == fixed


class TestOpenShift:
    def test_no_pin_uid_leaves_the_uid_to_the_platform(self) -> None:
        """--no-pin-uid drops runAsUser/runAsGroup 1337 (OpenShift's SCC assigns them) and keeps everything else."""
        pinned = pod_of(deployment(inject_ok(ISTIOD), "istiod"))["initContainers"][0]["securityContext"]
        out = inject_ok(ISTIOD, "--no-pin-uid")
        validate_all(out)
        context = pod_of(deployment(out, "istiod"))["initContainers"][0]["securityContext"]
        assert (pinned["runAsUser"], pinned["runAsGroup"]) == (1337, 1337)
        assert context == {k: v for k, v in pinned.items() if k not in {"runAsUser", "runAsGroup"}}
        assert context["runAsNonRoot"] is True
