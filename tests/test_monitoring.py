"""The chart's monitoring objects: PodMonitor/ServiceMonitor, PrometheusRule and Grafana dashboard, rendered by Helm.

Rules are checked and unit-tested with promtool (each alert fires on synthetic series and stays silent on
healthy ones), the custom resources against prometheus-operator's CRD schemas (tests/fixtures/crds), and the
dashboard against Grafana's schema as grafana-foundation-sdk models it. Every metric an alert or a panel uses
must appear in what the agent really exports.
"""

from __future__ import annotations

import base64
import copy
import datetime as dt
import inspect
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

helm = pytest.importorskip("helm_python", reason="helm-python-sdk (the [test] extra) renders the charts")
kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate checks the objects")
jsonschema = pytest.importorskip("jsonschema", reason="jsonschema checks the custom resources")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from agent import errors  # noqa: E402
from agent.metrics import PrometheusMetrics  # noqa: E402
from agent.validate import validate as validate_bundle  # noqa: E402
from testbed import corpus, pki, rawcert  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "istio-vault-agent"
CRDS = ROOT / "tests" / "fixtures" / "crds"
K8S_VERSION = "1.33"
NS = "istio-system"
ALL_ON = {
    "monitoring": {
        "podMonitor": {"enabled": True},
        "prometheusRule": {"enabled": True},
        "dashboard": {"enabled": True},
    }
}
#: the labels a PodMonitor scrape gives the agent's series (job set by the chart's relabeling)
SCRAPED = {"job": "istio-vault-agent", "namespace": NS, "pod": "istiod-7d9f-x2x1", "container": "istio-vault-agent"}
METRIC = re.compile(r"\b(istio_vault_agent_[a-z_]+)\b")


def render(values: dict[str, Any] | None = None, *, name: str = "istio-vault-agent") -> list[dict[str, Any]]:
    """Render the chart offline; its objects in template order."""
    with helm.Chart.load(CHART) as loaded:
        manifests = loaded.render(values or {}, name=name, namespace=NS)
    return [
        d
        for path in sorted(manifests)
        if not path.endswith("NOTES.txt")
        for d in yaml.safe_load_all(manifests[path])
        if d
    ]


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    matches = [o for o in objects if o["kind"] == kind]
    assert len(matches) == 1, f"expected one {kind}, got {len(matches)}"
    return matches[0]


def merged(*layers: dict[str, Any]) -> dict[str, Any]:
    """Values dicts merged deeply, later layers winning."""
    out: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = merged(out[key], value)
            else:
                out[key] = copy.deepcopy(value)
    return out


def strict(schema: Any) -> Any:
    """A CRD's structural schema with unknown fields rejected, as `kubectl apply --validate=strict` does."""
    if isinstance(schema, dict):
        out = {k: strict(v) for k, v in schema.items() if k != "properties"}
        if "properties" in schema:
            out["properties"] = {k: strict(v) for k, v in schema["properties"].items()}
            if "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
                out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


def check_against_crd(obj: dict[str, Any]) -> None:
    """Validate a custom resource against prometheus-operator's CRD schema for its kind."""
    crd = json.loads((CRDS / f"{obj['kind'].lower()}.json").read_text())
    assert obj["apiVersion"] == crd["apiVersion"]
    # Not jsonschema.validate: its meta-check rejects the CRD's Go regex `^(?i)(abort|warn)?$`, which the
    # API server accepts; the objects here never set that field.
    jsonschema.Draft7Validator(strict(crd["openAPIV3Schema"])).validate(obj)


def exported_names() -> set[str]:
    """The metric names a sidecar agent exports once every series exists, read from its real exposition."""
    metrics = PrometheusMetrics({"istiod-cacerts": 86400.0})
    root = pki.root_ca(days=3650)
    info = validate_bundle("istio-ca", pki.istio_ca_files(root, pki.intermediate_ca(root, days=400)))
    metrics.published("istiod-cacerts", info, dt.datetime.now(dt.UTC).timestamp())
    # a CRL and a remote cluster's client certificate, for the series only such bundles have
    crl_root = corpus.root(crl_sign=True)
    crl_ca = corpus.inter(crl_root, crl_sign=True)
    with_crl = corpus.files(crl_ca, crl=rawcert.crl(crl_root).pem + rawcert.crl(crl_ca).pem)
    metrics.published("with-crl", validate_bundle("istio-ca", with_crl), 1.0)
    client = pki.leaf_cert(root, cn="istio-reader", days=20)
    b64 = lambda data: base64.b64encode(data).decode()  # noqa: E731
    kubeconfig = {
        "apiVersion": "v1", "kind": "Config", "current-context": "cluster-a",
        "clusters": [{"name": "cluster-a", "cluster": {
            "server": "https://10.0.0.1:6443", "certificate-authority-data": b64(root.cert_pem)}}],
        "contexts": [{"name": "cluster-a", "context": {"cluster": "cluster-a", "user": "cluster-a"}}],
        "users": [{"name": "cluster-a", "user": {"client-certificate-data": b64(client.cert_pem),
                                                 "client-key-data": b64(client.key_pem)}}],
    }
    remote = validate_bundle("remote-secret", {"cluster-a": yaml.safe_dump(kubeconfig).encode()})
    metrics.published("remote-cluster-a", remote, 1.0)
    metrics.renewal("istiod-cacerts", renewed=False)
    metrics.error("istiod-cacerts", "vault_unavailable")
    metrics.vault_request()

    class Login:
        expires_at = 4102444800.0

    metrics.token_login(Login())
    metrics.set_state(ready={"istiod-cacerts": True}, vault_node="active")
    body, _ = metrics.render()
    return {s.name for family in text_string_to_metric_families(body.decode()) for s in family.samples}


def error_reasons() -> set[str]:
    """Every `reason` label value the agent counts in errors_total."""
    reasons = {
        cls.reason for _, cls in inspect.getmembers(errors, inspect.isclass) if issubclass(cls, errors.AgentError)
    }
    return reasons | {"signing", "tampered", "internal"}


def rules_of(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for g in one(objects, "PrometheusRule")["spec"]["groups"] for r in g["rules"]]


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool not installed (scripts/setup installs Debian's prometheus package as root)")
    return path


def run_promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False, env={"PATH": "/usr/bin"}
    )


def series(name: str, values: str, **labels: str) -> dict[str, str]:
    """One promtool input series with the scrape labels, plus `labels`."""
    all_labels = {**SCRAPED, **labels}
    text = ",".join(f'{k}="{v}"' for k, v in sorted(all_labels.items()))
    return {"series": f"{name}{{{text}}}", "values": values}


def firing(alert: str, severity: str, *, bundle: bool = True, **extra: str) -> dict[str, Any]:
    """The labels an alert carries: severity plus what its aggregation keeps."""
    labels = {"severity": severity, "namespace": NS, "pod": SCRAPED["pod"], **extra}
    if bundle:
        labels["bundle"] = "istiod-cacerts"
    return {"alertname": alert, "labels": labels}


B = {"bundle": "istiod-cacerts"}
DAY = 86400
#: (what it shows, input series, eval time, alert name, labels of the expected alert or None for silence)
SCENARIOS: list[tuple[str, list[dict[str, str]], str, str, dict[str, Any] | None]] = [
    (
        "bundle ends in 3 days",
        [series("istio_vault_agent_bundle_expiry_timestamp_seconds", f"{3 * DAY}x60", **B)],
        "30m",
        "IstioVaultAgentBundleExpiringSoon",
        firing("IstioVaultAgentBundleExpiringSoon", "warning"),
    ),
    (
        "bundle ends in 30 days",
        [series("istio_vault_agent_bundle_expiry_timestamp_seconds", f"{30 * DAY}x60", **B)],
        "30m",
        "IstioVaultAgentBundleExpiringSoon",
        None,
    ),
    (
        "bundle ends in 12 hours",
        [series("istio_vault_agent_bundle_expiry_timestamp_seconds", f"{DAY // 2}x60", **B)],
        "30m",
        "IstioVaultAgentBundleExpiryCritical",
        firing("IstioVaultAgentBundleExpiryCritical", "critical"),
    ),
    (
        "bundle ends in 3 days is not critical",
        [series("istio_vault_agent_bundle_expiry_timestamp_seconds", f"{3 * DAY}x60", **B)],
        "30m",
        "IstioVaultAgentBundleExpiryCritical",
        None,
    ),
    (
        "istiod's intermediate ends in 36 hours, workload certificates last 24",
        [
            series("istio_vault_agent_cert_expiry_timestamp_seconds", f"{DAY * 3 // 2}x60", file="ca-cert.pem", **B),
            series("istio_vault_agent_cert_expiry_timestamp_seconds", f"{30 * DAY}x60", file="root-cert.pem", **B),
            series("istio_vault_agent_workload_cert_ttl_seconds", f"{DAY}x60", **B),
        ],
        "30m",
        "IstioVaultAgentIntermediateLeadTimeShort",
        firing("IstioVaultAgentIntermediateLeadTimeShort", "warning"),
    ),
    (
        "istiod's intermediate ends in 36 hours, workload certificates last 1 hour",
        [
            series("istio_vault_agent_cert_expiry_timestamp_seconds", f"{DAY * 3 // 2}x60", file="ca-cert.pem", **B),
            series("istio_vault_agent_workload_cert_ttl_seconds", "3600x60", **B),
        ],
        "30m",
        "IstioVaultAgentIntermediateLeadTimeShort",
        None,
    ),
    (
        "istiod's intermediate renewed 20 minutes in: 30 days left",
        [
            series("istio_vault_agent_cert_expiry_timestamp_seconds", f"{DAY}x20 {30 * DAY}x40", file="ca-cert.pem",
                   **B),
            series("istio_vault_agent_workload_cert_ttl_seconds", f"{DAY}x60", **B),
        ],
        "30m",
        "IstioVaultAgentIntermediateLeadTimeShort",
        None,
    ),
    (
        "a tls bundle ending in a day has no workload certificate lifetime",
        [series("istio_vault_agent_cert_expiry_timestamp_seconds", f"{DAY}x60", file="ca-cert.pem",
                bundle="gateway")],
        "30m",
        "IstioVaultAgentIntermediateLeadTimeShort",
        None,
    ),
    (
        "the earliest root ends in 60 days",
        [series("istio_vault_agent_root_expiry_timestamp_seconds", f"{60 * DAY}x60", **B)],
        "30m",
        "IstioVaultAgentRootExpiringSoon",
        firing("IstioVaultAgentRootExpiringSoon", "warning"),
    ),
    (
        "the earliest root ends in 2 years",
        [series("istio_vault_agent_root_expiry_timestamp_seconds", f"{730 * DAY}x60", **B)],
        "30m",
        "IstioVaultAgentRootExpiringSoon",
        None,
    ),
    (
        "a CRL reaches nextUpdate in 6 hours",
        [series("istio_vault_agent_crl_next_update_timestamp_seconds", f"{DAY // 4}x60", **B)],
        "30m",
        "IstioVaultAgentCRLNextUpdateSoon",
        firing("IstioVaultAgentCRLNextUpdateSoon", "warning"),
    ),
    (
        "the CRLs are fresh for 6 more days",
        [series("istio_vault_agent_crl_next_update_timestamp_seconds", f"{6 * DAY}x60", **B)],
        "30m",
        "IstioVaultAgentCRLNextUpdateSoon",
        None,
    ),
    (
        "cluster-a's client certificate ends in 5 days",
        [series("istio_vault_agent_client_cert_expiry_timestamp_seconds", f"{5 * DAY}x60", cluster="cluster-a",
                **B)],
        "30m",
        "IstioVaultAgentClientCertExpiringSoon",
        firing("IstioVaultAgentClientCertExpiringSoon", "warning", cluster="cluster-a"),
    ),
    (
        "cluster-a's client certificate ends in 60 days",
        [series("istio_vault_agent_client_cert_expiry_timestamp_seconds", f"{60 * DAY}x60", cluster="cluster-a",
                **B)],
        "30m",
        "IstioVaultAgentClientCertExpiringSoon",
        None,
    ),
    (
        "a new ca-cert.pem went live 10 minutes ago",
        [series("istio_vault_agent_ca_cert_info", "1x10", serial="1a", fingerprint="aa", **B),
         series("istio_vault_agent_ca_cert_info", "_x10 1x30", serial="2b", fingerprint="bb", **B)],
        "20m",
        "IstioVaultAgentCACertChanged",
        firing("IstioVaultAgentCACertChanged", "info"),
    ),
    (
        "the same ca-cert.pem for 40 minutes",
        [series("istio_vault_agent_ca_cert_info", "1x40", serial="1a", fingerprint="aa", **B)],
        "40m",
        "IstioVaultAgentCACertChanged",
        None,
    ),
    (
        "the change was 2 hours ago",
        [series("istio_vault_agent_ca_cert_info", "1x10", serial="1a", fingerprint="aa", **B),
         series("istio_vault_agent_ca_cert_info", "_x10 1x150", serial="2b", fingerprint="bb", **B)],
        "150m",
        "IstioVaultAgentCACertChanged",
        None,
    ),
    (
        "bundle not ready for 30 minutes",
        [series("istio_vault_agent_bundle_ready", "0x40", **B)],
        "30m",
        "IstioVaultAgentBundleNotReady",
        firing("IstioVaultAgentBundleNotReady", "critical"),
    ),
    (
        "bundle not ready for 2 minutes only",
        [series("istio_vault_agent_bundle_ready", "0 0 1x40", **B)],
        "30m",
        "IstioVaultAgentBundleNotReady",
        None,
    ),
    (
        "publishes failing for 20 minutes",
        [series("istio_vault_agent_errors_total", "0+2x40", reason="publish", **B)],
        "20m",
        "IstioVaultAgentPublishFailing",
        firing("IstioVaultAgentPublishFailing", "critical"),
    ),
    (
        "publishes failing for 8 minutes: still pending",
        [series("istio_vault_agent_errors_total", "0+2x40", reason="publish", **B)],
        "8m",
        "IstioVaultAgentPublishFailing",
        None,
    ),
    (
        "Vault refuses the read (policy) for 20 minutes",
        [series("istio_vault_agent_errors_total", "0+2x40", reason="secret", **B)],
        "20m",
        "IstioVaultAgentPublishFailing",
        firing("IstioVaultAgentPublishFailing", "critical"),
    ),
    (
        "a bundle was refused 9 minutes ago",
        [series("istio_vault_agent_errors_total", "0 1x40", reason="invalid_bundle", **B)],
        "10m",
        "IstioVaultAgentBundleRefused",
        firing("IstioVaultAgentBundleRefused", "warning"),
    ),
    (
        "a bundle was refused 19 minutes ago",
        [series("istio_vault_agent_errors_total", "0 1x40", reason="invalid_bundle", **B)],
        "20m",
        "IstioVaultAgentBundleRefused",
        None,
    ),
    (
        "logins denied for 15 minutes",
        [series("istio_vault_agent_errors_total", "0+1x40", reason="auth", bundle="-")],
        "15m",
        "IstioVaultAgentTokenRenewalFailing",
        firing("IstioVaultAgentTokenRenewalFailing", "warning", bundle=False),
    ),
    (
        "the token ends at 20 minutes and is never renewed",
        [series("istio_vault_agent_token_expiry_timestamp_seconds", "1200x40")],
        "20m",
        "IstioVaultAgentTokenRenewalFailing",
        firing("IstioVaultAgentTokenRenewalFailing", "warning", bundle=False),
    ),
    (
        "the token is renewed and always has an hour left",
        [series("istio_vault_agent_token_expiry_timestamp_seconds", "3600+60x40")],
        "30m",
        "IstioVaultAgentTokenRenewalFailing",
        None,
    ),
    (
        "Vault unreachable for 15 minutes",
        [series("istio_vault_agent_errors_total", "0+2x40", reason="vault_unavailable", **B)],
        "15m",
        "IstioVaultAgentVaultUnreachable",
        firing("IstioVaultAgentVaultUnreachable", "warning", bundle=False),
    ),
    (
        "one Vault hiccup long ago",
        [series("istio_vault_agent_errors_total", "0 1x40", reason="vault_unavailable", **B)],
        "25m",  # older than the default window (15m): a failing agent retries every poll_interval (5m) at most
        "IstioVaultAgentVaultUnreachable",
        None,
    ),
    (
        "agent not scraped for 10 minutes",
        [series("up", "0x20", instance="10.0.0.7:8099")],
        "10m",
        "IstioVaultAgentDown",
        firing("IstioVaultAgentDown", "warning", bundle=False, instance="10.0.0.7:8099", **SCRAPED),
    ),
    (
        "another release's agents are not this rule's business",
        [
            {
                "series": 'istio_vault_agent_bundle_ready{job="other",namespace="istio-system",pod="p",bundle="b"}',
                "values": "0x40",
            }
        ],
        "30m",
        "IstioVaultAgentBundleNotReady",
        None,
    ),
]


class TestMonitors:
    def test_everything_is_off_by_default(self) -> None:
        """Without monitoring values the chart renders only its ConfigMap, in either mode."""
        for values in ({}, {"mode": "gateway"}):
            assert [o["kind"] for o in render(values)] == ["ConfigMap"]

    def test_lint_is_clean_with_monitoring_on(self) -> None:
        """`helm lint --strict` reports nothing with every monitoring object on (PodMonitor, then ServiceMonitor)."""
        for monitor in ("podMonitor", "serviceMonitor"):
            values = merged(ALL_ON, {"monitoring": {"podMonitor": {"enabled": False}, monitor: {"enabled": True}}})
            report = helm.lint(CHART, values, strict=True, kube_version="v1.33.0")
            assert report["errors"] == []
            assert [m for m in report["messages"] if m["severity"] >= 2] == []

    def test_pod_monitor_scrapes_the_agent_port_of_the_example_pods(self) -> None:
        """The PodMonitor selects istiod's pods and the health port the istiod example declares, under one job."""
        pm = one(render(ALL_ON), "PodMonitor")
        check_against_crd(pm)
        assert pm["spec"]["selector"] == {"matchLabels": {"app": "istiod"}}
        assert pm["spec"]["namespaceSelector"] == {"matchNames": [NS]}
        (endpoint,) = pm["spec"]["podMetricsEndpoints"]
        example = yaml.safe_load((CHART / "examples" / "istiod-values.yaml").read_text())
        agent = next(c for c in example["initContainers"] if c["name"] == "istio-vault-agent")
        assert endpoint["port"] in [p["name"] for p in agent["ports"]]
        assert endpoint["path"] == "/metrics"
        assert {"action": "replace", "targetLabel": "job", "replacement": "istio-vault-agent"} in endpoint[
            "relabelings"
        ]

    def test_gateway_mode_selects_the_gateway_pods(self) -> None:
        """In gateway mode the monitors select app=<the gateway's service account>, or monitoring.podSelector."""
        values = merged(ALL_ON, {"mode": "gateway", "serviceAccountName": "istio-ingressgateway"})
        pm = one(render(values), "PodMonitor")
        assert pm["spec"]["selector"] == {"matchLabels": {"app": "istio-ingressgateway"}}
        values = merged(values, {"monitoring": {"podSelector": {"istio": "ingressgateway"}}})
        assert one(render(values), "PodMonitor")["spec"]["selector"] == {"matchLabels": {"istio": "ingressgateway"}}

    def test_service_monitor_goes_through_a_headless_service_on_the_agent_port(self) -> None:
        """serviceMonitor adds a headless Service on port 8099 of the same pods and a ServiceMonitor selecting it."""
        values = {"monitoring": {"serviceMonitor": {"enabled": True}, "labels": {"release": "kube-prometheus-stack"}}}
        objects = render(values)
        svc, sm = one(objects, "Service"), one(objects, "ServiceMonitor")
        kubernetes_validate.validate(svc, K8S_VERSION, strict=True)
        check_against_crd(sm)
        assert svc["spec"]["clusterIP"] == "None"
        assert svc["spec"]["selector"] == {"app": "istiod"}
        (port,) = svc["spec"]["ports"]
        assert (port["port"], port["targetPort"]) == (8099, 8099)
        selected = sm["spec"]["selector"]["matchLabels"]
        assert selected.items() <= svc["metadata"]["labels"].items()
        (endpoint,) = sm["spec"]["endpoints"]
        assert endpoint["port"] == port["name"]
        assert {"action": "replace", "targetLabel": "job", "replacement": "istio-vault-agent"} in endpoint[
            "relabelings"
        ]
        assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"

    def test_both_monitors_at_once_fail_with_the_key_to_fix(self) -> None:
        """Enabling the PodMonitor and the ServiceMonitor together would scrape twice: the render says which to drop."""
        values = {"monitoring": {"podMonitor": {"enabled": True}, "serviceMonitor": {"enabled": True}}}
        with pytest.raises(helm.HelmRenderError, match="enable one of them"):
            render(values)

    def test_crd_check_catches_a_misspelled_field(self) -> None:
        """The CRD schema check rejects a field prometheus-operator does not know (so passing it means something)."""
        pm = one(render(ALL_ON), "PodMonitor")
        pm["spec"]["podMetricsEndpoints"][0]["intervall"] = "30s"
        with pytest.raises(jsonschema.ValidationError, match="intervall"):
            check_against_crd(pm)


class TestRules:
    def test_rule_matches_the_crd_and_carries_extra_labels(self) -> None:
        """The PrometheusRule fits its CRD; monitoring.labels and alertLabels reach the object and every alert."""
        values = merged(
            ALL_ON, {"monitoring": {"labels": {"release": "kps"}, "prometheusRule": {"alertLabels": {"team": "mesh"}}}}
        )
        objects = render(values)
        rule = one(objects, "PrometheusRule")
        check_against_crd(rule)
        assert rule["metadata"]["labels"]["release"] == "kps"
        assert all(r["labels"]["team"] == "mesh" and r["labels"]["severity"] for r in rules_of(objects))

    def test_alerts_use_only_what_the_agent_exports(self) -> None:
        """Every metric and errors_total reason an alert reads is one the agent really exports."""
        exported, reasons = exported_names(), error_reasons()
        used: set[str] = set()
        for r in rules_of(render(ALL_ON)):
            used |= set(METRIC.findall(r["expr"]))
            for match in re.findall(r'reason=~?"([^"]+)"', r["expr"]):
                assert set(match.split("|")) <= reasons, f"{r['alert']}: reason {match} is never counted"
        assert used and used <= exported, used - exported

    def test_thresholds_and_selector_come_from_values(self) -> None:
        """expiryWarningDays, the token threshold, the window and a custom selector reach the expressions."""
        values = merged(
            ALL_ON,
            {
                "monitoring": {
                    "prometheusRule": {
                        "expiryWarningDays": 14,
                        "tokenMinRemainingSeconds": 300,
                        "window": "10m",
                        "selector": 'app="custom"',
                    }
                }
            },
        )
        exprs = {r["alert"]: r["expr"] for r in rules_of(render(values))}
        assert "< 1209600" in exprs["IstioVaultAgentBundleExpiringSoon"]
        assert "< 300" in exprs["IstioVaultAgentTokenRenewalFailing"]
        values = merged(values, {"monitoring": {"prometheusRule": {
            "rootExpiryWarningDays": 30, "crlNextUpdateWarningHours": 12, "clientCertExpiryWarningDays": 3,
            "caCertChangeWindow": "2h"}}})
        exprs = {r["alert"]: r["expr"] for r in rules_of(render(values))}
        assert "< 2592000" in exprs["IstioVaultAgentRootExpiringSoon"]
        assert "< 43200" in exprs["IstioVaultAgentCRLNextUpdateSoon"]
        assert "< 259200" in exprs["IstioVaultAgentClientCertExpiringSoon"]
        assert "[2h]" in exprs["IstioVaultAgentCACertChanged"]
        assert "[10m]" in exprs["IstioVaultAgentVaultUnreachable"]
        assert all('{app="custom"' in e for e in exprs.values()), exprs

    def test_promtool_accepts_the_rules(self, tmp_path: Path) -> None:
        """`promtool check rules` parses every expression and annotation template of the rendered rule."""
        rule = one(render(ALL_ON), "PrometheusRule")
        (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rule["spec"]))
        done = run_promtool("check", "rules", "rules.yaml", cwd=tmp_path)
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"SUCCESS: {len(rules_of([rule]))} rules found" in done.stdout

    def test_each_alert_fires_on_its_condition_and_only_then(self, tmp_path: Path) -> None:
        """promtool's rule unit tests: each alert fires on synthetic series of its failure, not on healthy ones."""
        objects = render(ALL_ON)
        spec = copy.deepcopy(one(objects, "PrometheusRule")["spec"])
        for group in spec["groups"]:
            for r in group["rules"]:
                r.pop("annotations")  # promtool compares annotations verbatim; `check rules` covers their templates
        (tmp_path / "rules.yaml").write_text(yaml.safe_dump(spec))
        alerts = {r["alert"] for r in rules_of(objects)}
        assert {s[3] for s in SCENARIOS} == alerts
        assert {s[3] for s in SCENARIOS if s[4]} == alerts, "every alert needs a scenario where it fires"
        tests = [
            {
                "name": what,
                "interval": "1m",
                "input_series": inputs,
                "alert_rule_test": [
                    {"eval_time": at, "alertname": alert, "exp_alerts": [{"exp_labels": expected["labels"]}]}
                    if expected
                    else {"eval_time": at, "alertname": alert, "exp_alerts": []}
                ],
            }
            for what, inputs, at, alert, expected in SCENARIOS
        ]
        (tmp_path / "tests.yaml").write_text(
            yaml.safe_dump({"rule_files": ["rules.yaml"], "evaluation_interval": "1m", "tests": tests})
        )
        done = run_promtool("test", "rules", "tests.yaml", cwd=tmp_path)
        assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
        assert "SUCCESS" in done.stdout


def dashboard_of(objects: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    cm = next(o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"].endswith("-dashboard"))
    return cm, json.loads(cm["data"]["istio-vault-agent.json"])


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def concrete(expr: str) -> str:
    """A panel query with Grafana's variables filled in, as Grafana sends it to Prometheus."""
    return expr.replace("$__rate_interval", "2m").replace("$namespace", ".*").replace("$pod", ".*")


class TestDashboard:
    def test_configmap_is_labelled_for_the_grafana_sidecar(self) -> None:
        """The dashboard ConfigMap is valid, carries grafana_dashboard: "1" and holds one JSON dashboard."""
        values = merged(ALL_ON, {"monitoring": {"dashboard": {"namespace": "monitoring", "annotations": {"f": "x"}}}})
        cm, dashboard = dashboard_of(render(values))
        kubernetes_validate.validate(cm, K8S_VERSION, strict=True)
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert (cm["metadata"]["namespace"], cm["metadata"]["annotations"]) == ("monitoring", {"f": "x"})
        assert dashboard["uid"] == "istio-vault-agent"

    def test_every_panel_queries_prometheus_through_the_datasource_variable(self) -> None:
        """A `datasource` variable of type prometheus; every panel and query uses it; ids are unique; no overlap."""
        _, dashboard = dashboard_of(render(ALL_ON))
        variables = {v["name"]: v for v in dashboard["templating"]["list"]}
        assert (variables["datasource"]["type"], variables["datasource"]["query"]) == ("datasource", "prometheus")
        ids = [p["id"] for p in dashboard["panels"]]
        assert len(ids) == len(set(ids))
        cells: set[tuple[int, int]] = set()
        for p in dashboard["panels"]:
            g = p["gridPos"]
            assert g["x"] + g["w"] <= 24, p["title"]
            area = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
            assert not area & cells, f"{p['title']} overlaps another panel"
            cells |= area
        for p in panels(dashboard):
            assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
            assert p["targets"], p["title"]
            for t in p["targets"]:
                assert t["datasource"] == p["datasource"] and t["expr"], p["title"]

    def test_queries_use_exported_metrics_and_cover_what_operators_watch(self) -> None:
        """Panels read only exported metrics and show expiry, publishes, refusals, errors, Vault requests and their
        latency."""
        _, dashboard = dashboard_of(render(ALL_ON))
        exprs = [t["expr"] for p in panels(dashboard) for t in p["targets"]]
        exprs += [v["query"]["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
        used = {m for e in exprs for m in METRIC.findall(e)}
        assert used <= exported_names(), used - exported_names()
        joined = "\n".join(exprs)
        for needed in (
            "istio_vault_agent_bundle_expiry_timestamp_seconds",
            "istio_vault_agent_cert_expiry_timestamp_seconds",
            "istio_vault_agent_publish_total",
            'reason="invalid_bundle"',
            "istio_vault_agent_vault_requests_total",
            "istio_vault_agent_vault_request_duration_seconds_bucket",
            "istio_vault_agent_vault_node_state",
            "istio_vault_agent_root_expiry_timestamp_seconds",
            "istio_vault_agent_crl_next_update_timestamp_seconds",
            "istio_vault_agent_client_cert_expiry_timestamp_seconds",
            "istio_vault_agent_ca_cert_info",
        ):
            assert needed in joined

    def test_promtool_parses_every_panel_query(self, tmp_path: Path) -> None:
        """Each panel query, with Grafana's variables filled in, parses as PromQL (checked as recording rules)."""
        _, dashboard = dashboard_of(render(ALL_ON))
        records = [
            {"record": f"dashboard:panel_{p['id']}_{t['refId'].lower()}", "expr": concrete(t["expr"])}
            for p in panels(dashboard)
            for t in p["targets"]
        ]
        (tmp_path / "queries.yaml").write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": records}]}))
        done = run_promtool("check", "rules", "queries.yaml", cwd=tmp_path)
        assert done.returncode == 0, done.stdout + done.stderr

    def test_fields_are_grafanas_own(self) -> None:
        """Decoded with Grafana's schema models, every field survives: no key Grafana's schema does not define."""
        sdk = pytest.importorskip("grafana_foundation_sdk", reason="grafana-foundation-sdk models Grafana's schema")
        from grafana_foundation_sdk.cog import plugins
        from grafana_foundation_sdk.cog.encoder import JSONEncoder
        from grafana_foundation_sdk.models.dashboard import Dashboard, RowPanel

        plugins.register_default_plugins()
        _, dashboard = dashboard_of(render(ALL_ON))

        def dropped(ours: Any, theirs: Any, path: str = "") -> list[str]:
            if isinstance(ours, dict):
                return [
                    d
                    for k, v in ours.items()
                    for d in ([f"{path}/{k}"] if k not in theirs else dropped(v, theirs[k], f"{path}/{k}"))
                ]
            if isinstance(ours, list):
                return [
                    d for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) for d in dropped(a, b, f"{path}[{i}]")
                ]
            return []

        def round_trip(d: dict[str, Any]) -> dict[str, Any]:
            return json.loads(json.dumps(Dashboard.from_json(d), cls=JSONEncoder))  # type: ignore[no-any-return]

        assert dropped(dashboard, round_trip(dashboard)) == []
        # Each panel's options decode into its panel type's own model: the types are Grafana's.
        decoded = Dashboard.from_json(dashboard)
        for p in decoded.panels or []:
            if not isinstance(p, RowPanel):
                assert type(p.options).__module__.startswith(sdk.__name__ + ".models."), p.type
        # ... and the check can fail: a misspelt key does not survive.
        broken = copy.deepcopy(dashboard)
        broken["panels"][1]["gridpos"] = broken["panels"][1].pop("gridPos")
        assert "/panels[1]/gridpos" in dropped(broken, round_trip(broken))
