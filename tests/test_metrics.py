"""PrometheusMetrics: the exposed names, labels and values are a contract with dashboards and alerts."""

from __future__ import annotations

import datetime as dt
import http.server
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.metrics import METRIC_NAMES, Metrics, PrometheusMetrics
from agent.validate import BundleInfo, validate
from testbed import pki

ROOT = Path(__file__).resolve().parent.parent


def samples(metrics: PrometheusMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the exposition as {(name, sorted labels): value}, parsed the way Prometheus does."""
    body, _ = metrics.render()
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[s.name, tuple(sorted(s.labels.items()))] = s.value
    return out


@pytest.fixture(name="istio_info", scope="module")
def fixture_istio_info() -> BundleInfo:
    """A valid istio-ca bundle whose root outlives its intermediate, validated by agent.bundle."""
    root = pki.root_ca(days=3650)
    inter = pki.intermediate_ca(root, days=400)
    return validate("istio-ca", pki.istio_ca_files(root, inter))


@pytest.fixture(name="tls_info", scope="module")
def fixture_tls_info() -> BundleInfo:
    """A valid tls bundle (leaf + ca.crt)."""
    ca = pki.root_ca(cn="Gateway CA")
    leaf = pki.leaf_cert(ca, days=30)
    return validate("tls", pki.tls_files(leaf, ca))


class TestImport:
    def test_init_mode_does_not_load_prometheus_client(self) -> None:
        """Importing agent.metrics (as init mode does) must not import prometheus_client."""
        code = "import sys, agent.metrics, agent.runner; print('prometheus_client' in sys.modules)"
        out = subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True, timeout=60
        )
        assert out.stdout.strip() == "False"

    def test_constructing_loads_it(self) -> None:
        """PrometheusMetrics imports prometheus_client when built, and is a Metrics."""
        code = (
            "import sys, agent.metrics as m; p = m.PrometheusMetrics(); "
            "print(isinstance(p, m.Metrics), 'prometheus_client' in sys.modules)"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True, timeout=60
        )
        assert out.stdout.split() == ["True", "True"]


class TestExposition:
    def test_workload_cert_ttl_per_istio_ca_bundle(self) -> None:
        """The workload certificate lifetime of each istio-ca bundle it was given, for the lead-time alert."""
        text = PrometheusMetrics({"istiod-cacerts": 86400.0}).render()[0].decode()
        assert 'istio_vault_agent_workload_cert_ttl_seconds{bundle="istiod-cacerts"} 86400.0' in text
        assert "istio_vault_agent_workload_cert_ttl_seconds{" not in PrometheusMetrics().render()[0].decode()

    def test_names_are_the_contract(self) -> None:
        """Every documented name appears as a HELP/TYPE line, counters with exactly one `_total`."""
        m = PrometheusMetrics()
        text = m.render()[0].decode()
        declared = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}
        assert declared == set(METRIC_NAMES)
        assert "# TYPE istio_vault_agent_publish_total counter" in text
        assert "# TYPE istio_vault_agent_errors_total counter" in text
        assert "# TYPE istio_vault_agent_vault_requests_total counter" in text
        assert "_total_total" not in text
        assert "_created" not in text

    def test_content_type_is_prometheus_text(self) -> None:
        """render() returns the text exposition format 0.0.4 content type, which every Prometheus scrapes."""
        _, content_type = PrometheusMetrics().render()
        assert content_type.startswith("text/plain; version=0.0.4")

    def test_fresh_metrics_have_zero_vault_requests(self) -> None:
        """The unlabelled request counter exists at 0 before any request."""
        assert samples(PrometheusMetrics())["istio_vault_agent_vault_requests_total", ()] == 0


class TestPublished:
    def test_cert_expiry_per_certificate_file(self, istio_info: BundleInfo) -> None:
        """One expiry per certificate file with its earliest notAfter; key files get none."""
        m = PrometheusMetrics()
        m.published("istiod-cacerts", istio_info, 1_700_000_000.0)
        got = {
            dict(labels)["file"]: value
            for (name, labels), value in samples(m).items()
            if name == "istio_vault_agent_cert_expiry_timestamp_seconds"
        }
        assert got == {
            "ca-cert.pem": istio_info.not_after["ca-cert.pem"].timestamp(),
            "cert-chain.pem": istio_info.not_after["cert-chain.pem"].timestamp(),
            "root-cert.pem": istio_info.not_after["root-cert.pem"].timestamp(),
        }
        # the intermediate expires first, so the chain reports it, not the root
        assert got["cert-chain.pem"] == got["ca-cert.pem"] < got["root-cert.pem"]
        labels = {
            k for (name, ls), _ in samples(m).items() for k, _v in ls if name.endswith("expiry_timestamp_seconds")
        }
        assert labels == {"bundle", "file"}

    def test_tls_bundle_files(self, tls_info: BundleInfo) -> None:
        """A tls bundle reports tls.crt and ca.crt, never tls.key."""
        m = PrometheusMetrics()
        m.published("gateway", tls_info, 1.0)
        files = {
            dict(labels)["file"]
            for (name, labels), _ in samples(m).items()
            if name == "istio_vault_agent_cert_expiry_timestamp_seconds"
        }
        assert files == {"tls.crt", "ca.crt"}

    def test_publish_total_and_last_publish(self, istio_info: BundleInfo, tls_info: BundleInfo) -> None:
        """publish_total counts generations per bundle; last_publish is the time of the latest one."""
        m = PrometheusMetrics()
        m.published("a", istio_info, 100.0)
        m.published("a", istio_info, 250.5)
        m.published("b", tls_info, 300.0)
        s = samples(m)
        assert s["istio_vault_agent_publish_total", (("bundle", "a"),)] == 2
        assert s["istio_vault_agent_publish_total", (("bundle", "b"),)] == 1
        assert s["istio_vault_agent_last_publish_timestamp_seconds", (("bundle", "a"),)] == 250.5
        assert s["istio_vault_agent_last_publish_timestamp_seconds", (("bundle", "b"),)] == 300.0
        assert s["istio_vault_agent_bundle_expiry_timestamp_seconds", (("bundle", "a"),)] == (
            istio_info.expires_at.timestamp()
        )

    def test_new_generation_replaces_expiries(self, istio_info: BundleInfo) -> None:
        """After a rotation the expiry gauges show the new certificates, not the old ones."""
        m = PrometheusMetrics()
        m.published("a", istio_info, 1.0)
        root = pki.root_ca()
        later = pki.intermediate_ca(root, not_after=dt.datetime.now(dt.UTC) + dt.timedelta(days=900))
        newer = validate("istio-ca", pki.istio_ca_files(root, later))
        m.published("a", newer, 2.0)
        key = ("istio_vault_agent_cert_expiry_timestamp_seconds", (("bundle", "a"), ("file", "ca-cert.pem")))
        assert samples(m)[key] == newer.not_after["ca-cert.pem"].timestamp()
        assert newer.not_after["ca-cert.pem"] != istio_info.not_after["ca-cert.pem"]


class TestIdentity:
    """Expiry and identity of what is live, beyond the per-file expiries (issue 21)."""

    def test_earliest_root_crl_next_update_and_ca_cert_identity(self) -> None:
        """An istio-ca bundle whose root-cert.pem holds an extra root ending sooner than the chain's, and a CRL per
        issuer: the root series shows the extra root's notAfter, the CRL series the earliest nextUpdate, and
        ca_cert_info = 1 carries ca-cert.pem's serial and SHA-256 fingerprint."""
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes

        from testbed import corpus, rawcert

        root = corpus.root(crl_sign=True)
        ca = corpus.inter(root, crl_sign=True)
        soon = corpus.root(cn="Old Root CA", not_after=rawcert.NOW + 90 * rawcert.DAY)
        crl = rawcert.crl(root, next_update=rawcert.NOW + 7 * rawcert.DAY).pem + rawcert.crl(
            ca, next_update=rawcert.NOW + 2 * rawcert.DAY).pem
        files = corpus.files(ca, roots=[soon, root], crl=crl)
        m = PrometheusMetrics()
        m.published("istiod-cacerts", validate("istio-ca", files), 1.0)
        s = samples(m)
        b = (("bundle", "istiod-cacerts"),)
        day = (rawcert.NOW + 90 * rawcert.DAY).timestamp()
        assert s["istio_vault_agent_root_expiry_timestamp_seconds", b] == pytest.approx(day, abs=1)
        assert s["istio_vault_agent_crl_next_update_timestamp_seconds", b] == pytest.approx(
            (rawcert.NOW + 2 * rawcert.DAY).timestamp(), abs=1)
        cert = x509.load_pem_x509_certificate(files["ca-cert.pem"])
        info = [(dict(labels), v) for (name, labels), v in s.items() if name == "istio_vault_agent_ca_cert_info"]
        assert info == [({"bundle": "istiod-cacerts", "serial": format(cert.serial_number, "x"),
                          "fingerprint": cert.fingerprint(hashes.SHA256()).hex()}, 1.0)]

    def test_a_rotation_replaces_the_identity(self, istio_info: BundleInfo) -> None:
        """After a new generation, ca_cert_info shows only the new ca-cert.pem, and a bundle without a CRL has no
        CRL series."""
        m = PrometheusMetrics()
        m.published("a", istio_info, 1.0)
        root = pki.root_ca()
        newer = validate("istio-ca", pki.istio_ca_files(root, pki.intermediate_ca(root, days=500)))
        m.published("a", newer, 2.0)
        s = samples(m)
        info = [dict(labels) for (name, labels), _ in s.items() if name == "istio_vault_agent_ca_cert_info"]
        assert info == [{"bundle": "a", "serial": newer.serial, "fingerprint": newer.fingerprint}]
        assert newer.fingerprint != istio_info.fingerprint
        assert not any(name == "istio_vault_agent_crl_next_update_timestamp_seconds" for name, _ in s)
        assert s["istio_vault_agent_root_expiry_timestamp_seconds", (("bundle", "a"),)] == (
            newer.not_after["root-cert.pem"].timestamp())

    def test_tls_bundle_root_and_no_ca_cert_info(self, tls_info: BundleInfo) -> None:
        """A tls bundle reports ca.crt's root expiry; ca_cert_info is for istio-ca bundles only."""
        m = PrometheusMetrics()
        m.published("gw", tls_info, 1.0)
        s = samples(m)
        assert s["istio_vault_agent_root_expiry_timestamp_seconds", (("bundle", "gw"),)] == (
            tls_info.not_after["ca.crt"].timestamp())
        assert not any(name == "istio_vault_agent_ca_cert_info" for name, _ in s)

    def test_client_certificate_of_a_remote_cluster(self) -> None:
        """A remote-secret bundle whose kubeconfig authenticates with a client certificate reports its notAfter
        under {bundle, cluster}; one with a token reports none."""
        import base64

        import yaml

        api_ca = pki.root_ca(cn="cluster-a apiserver CA")
        client_ca = pki.root_ca(cn="client CA", days=400)
        client = pki.leaf_cert(client_ca, cn="istio-reader", days=20)

        def kubeconfig(user: dict[str, str]) -> bytes:
            return yaml.safe_dump({
                "apiVersion": "v1", "kind": "Config", "current-context": "cluster-a",
                "clusters": [{"name": "cluster-a", "cluster": {
                    "server": "https://10.0.0.1:6443",
                    "certificate-authority-data": base64.b64encode(api_ca.cert_pem).decode()}}],
                "contexts": [{"name": "cluster-a", "context": {"cluster": "cluster-a", "user": "cluster-a"}}],
                "users": [{"name": "cluster-a", "user": user}],
            }).encode()

        m = PrometheusMetrics()
        with_cert = validate("remote-secret", {"cluster-a": kubeconfig({
            "client-certificate-data": base64.b64encode(client.cert_pem).decode(),
            "client-key-data": base64.b64encode(client.key_pem).decode()})})
        m.published("remote-cluster-a", with_cert, 1.0)
        m.published("remote-cluster-b", validate("remote-secret", {"cluster-a": kubeconfig({"token": "t0ken"})}), 1.0)
        got = {labels: v for (name, labels), v in samples(m).items()
               if name == "istio_vault_agent_client_cert_expiry_timestamp_seconds"}
        assert got == {(("bundle", "remote-cluster-a"), ("cluster", "cluster-a")): client.cert.not_valid_after_utc
                       .timestamp()}


class TestErrors:
    def test_errors_by_bundle_and_reason(self) -> None:
        """errors_total has one series per (bundle, reason), counting each failure."""
        m = PrometheusMetrics()
        m.error("a", "invalid_bundle")
        m.error("a", "invalid_bundle")
        m.error("a", "vault_unavailable")
        m.error("b", "tampered")
        got = {labels: v for (name, labels), v in samples(m).items() if name == "istio_vault_agent_errors_total"}
        assert got == {
            (("bundle", "a"), ("reason", "invalid_bundle")): 2,
            (("bundle", "a"), ("reason", "vault_unavailable")): 1,
            (("bundle", "b"), ("reason", "tampered")): 1,
        }

    def test_renewals_start_at_zero_and_count_renewals(self) -> None:
        """renewals_total appears at 0 with a PKI bundle's first issuance and counts each renewal after it; KV
        bundles (which never report one) have no series."""
        m = PrometheusMetrics()
        m.renewal("gw", renewed=False)
        m.renewal("gw", renewed=True)
        m.renewal("gw", renewed=True)
        m.renewal("istiod", renewed=False)
        got = {labels: v for (name, labels), v in samples(m).items() if name == "istio_vault_agent_renewals_total"}
        assert got == {(("bundle", "gw"),): 2, (("bundle", "istiod"),): 0}

    def test_registries_are_independent(self) -> None:
        """Two agents in one process do not share counts (and constructing two does not clash)."""
        first, second = PrometheusMetrics(), PrometheusMetrics()
        first.error("a", "x")
        assert ("istio_vault_agent_errors_total", (("bundle", "a"), ("reason", "x"))) in samples(first)
        assert not any(name == "istio_vault_agent_errors_total" for name, _ in samples(second))


class _Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path == "/slow":
            time.sleep(0.06)
        body = b"hello"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args: object) -> None:
        pass


@pytest.fixture(name="http_url")
def fixture_http_url() -> Iterator[str]:
    """A local HTTP server on 127.0.0.1 answering every GET with `hello`."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hello)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(5)


def _vault_reads(url: str, metrics: Metrics, path: str, times: int) -> None:
    """Read `path` `times` times through the agent's Vault session (the answers are not Vault's: ignored)."""
    import asyncio
    import contextlib

    from agent.config import VaultConfig
    from agent.errors import AgentError
    from agent.vault import Vault

    async def main() -> None:
        vault = Vault(VaultConfig(address=url), metrics=metrics, env={})
        try:
            for _ in range(times):
                with contextlib.suppress(AgentError):
                    await vault.request("GET", path, action="reading")
        finally:
            await vault.close()

    asyncio.run(main())


class TestVaultRequests:
    def test_counts_each_request_the_vault_session_sends(self, http_url: str) -> None:
        """Every request the agent's Vault session gets an answer to is counted once."""
        m = PrometheusMetrics()
        _vault_reads(http_url, m, "/v1/sys/health", 3)
        assert samples(m)["istio_vault_agent_vault_requests_total", ()] == 3

    def test_latency_histogram_sees_a_slow_vault(self, http_url: str) -> None:
        """Each request's time to response headers lands in vault_request_duration_seconds: three answers that
        take 60 ms each are counted above the 50 ms bucket, with their sum, as many as vault_requests_total."""
        m = PrometheusMetrics()
        _vault_reads(http_url, m, "/slow", 3)
        s = samples(m)
        name = "istio_vault_agent_vault_request_duration_seconds"
        assert s[f"{name}_count", ()] == s["istio_vault_agent_vault_requests_total", ()] == 3
        assert s[f"{name}_bucket", (("le", "0.05"),)] == 0
        assert s[f"{name}_bucket", (("le", "+Inf"),)] == 3
        assert 0.18 <= s[f"{name}_sum", ()] < 5

    def test_a_request_without_a_latency_counts_too(self) -> None:
        """vault_request() with no latency counts the request and leaves the histogram alone; the no-op base
        accepts the same call."""
        m = PrometheusMetrics()
        m.vault_request()
        m.vault_request(0.2)
        s = samples(m)
        assert s["istio_vault_agent_vault_requests_total", ()] == 2
        assert s["istio_vault_agent_vault_request_duration_seconds_count", ()] == 1
        Metrics().vault_request(0.1)

    def test_counting_from_threads_loses_nothing(self) -> None:
        """Scrapes and requests may come from different threads: concurrent increments all count."""
        m = PrometheusMetrics()

        def hit() -> None:
            for _ in range(2000):
                m.vault_request()

        threads = [threading.Thread(target=hit) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert samples(m)["istio_vault_agent_vault_requests_total", ()] == 16000


class _Login:
    def __init__(self, expires_at: float) -> None:
        self.expires_at = expires_at
        self.token = "hvs.CAESIsecret-token-value-that-must-not-leak"


class TestExtras:
    def test_token_expiry(self) -> None:
        """token_login exposes the token's lease end; a token without TTL (inf) or a logout removes it."""
        m = PrometheusMetrics()
        assert not any(n == "istio_vault_agent_token_expiry_timestamp_seconds" for n, _ in samples(m))
        m.token_login(_Login(1_800_000_000.0))
        assert samples(m)["istio_vault_agent_token_expiry_timestamp_seconds", ()] == 1_800_000_000.0
        assert b"hvs." not in m.render()[0]
        m.token_login(_Login(float("inf")))
        assert not any(n == "istio_vault_agent_token_expiry_timestamp_seconds" for n, _ in samples(m))
        m.token_login(_Login(5.0))
        m.token_login(None)
        assert not any(n == "istio_vault_agent_token_expiry_timestamp_seconds" for n, _ in samples(m))

    def test_ready_gauge_and_zero_publish_total(self) -> None:
        """set_state exposes readiness per bundle and starts publish_total at 0 for unpublished bundles."""
        m = PrometheusMetrics()
        m.set_state(ready={"a": True, "b": False})
        s = samples(m)
        assert s["istio_vault_agent_bundle_ready", (("bundle", "a"),)] == 1
        assert s["istio_vault_agent_bundle_ready", (("bundle", "b"),)] == 0
        assert s["istio_vault_agent_publish_total", (("bundle", "b"),)] == 0
