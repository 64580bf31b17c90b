"""What the agent counts. `Metrics` is the no-op used in init mode; sidecar mode uses the Prometheus one.

prometheus_client is imported only by PrometheusMetrics, so init mode never pays for it.
"""

from __future__ import annotations

import bisect
import itertools
import math
import threading
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agent.validate import BundleInfo

__all__ = ["METRIC_NAMES", "NODE_STATES", "Metrics", "PrometheusMetrics"]

#: what the Vault node can say of itself (sys/health), the `state` label values of ..._vault_node_state
NODE_STATES = ("active", "standby", "sealed", "uninitialized", "unreachable")

#: Exposed metric names (a contract with dashboards and alerts; counters are shown with their `_total` suffix).
METRIC_NAMES = (
    "istio_vault_agent_cert_expiry_timestamp_seconds",
    "istio_vault_agent_last_publish_timestamp_seconds",
    "istio_vault_agent_publish_total",
    "istio_vault_agent_errors_total",
    "istio_vault_agent_vault_requests_total",
    "istio_vault_agent_bundle_expiry_timestamp_seconds",
    "istio_vault_agent_bundle_ready",
    "istio_vault_agent_token_expiry_timestamp_seconds",
    "istio_vault_agent_vault_node_state",
    "istio_vault_agent_renewals_total",
    "istio_vault_agent_vault_request_duration_seconds",
    "istio_vault_agent_file_watch_polling",
    "istio_vault_agent_log_lines_dropped_total",
    "istio_vault_agent_workload_cert_ttl_seconds",
    # expiry and identity of what is published (issue 21)
    "istio_vault_agent_root_expiry_timestamp_seconds",
    "istio_vault_agent_crl_next_update_timestamp_seconds",
    "istio_vault_agent_client_cert_expiry_timestamp_seconds",
    "istio_vault_agent_ca_cert_info",
)

#: upper bounds (seconds) of the Vault request latency histogram; vault.timeout defaults to 10 s
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# Never label a series with a key file, even if a BundleInfo ever listed one.
_KEY_SUFFIXES = ("key.pem", ".key")


class Metrics:
    """The interface every component reports through; this base records nothing."""

    def published(self, bundle: str, info: BundleInfo, when: float) -> None:
        """A new generation of `bundle` went live at `when`."""

    def error(self, bundle: str, reason: str) -> None:
        """A failure of `bundle`, labelled by a short reason such as invalid_bundle or vault_unavailable."""

    def vault_request(self, seconds: float | None = None) -> None:
        """Vault answered one HTTP request; `seconds` from sending it to the response headers."""

    def renewal(self, bundle: str, *, renewed: bool) -> None:
        """A generation that its source issued went live: a renewal when `renewed`, else a first issuance."""

    def token_login(self, login: object | None) -> None:
        """The agent holds a new (or renewed) Vault token, an `auth.Login`."""

    def file_watch_polling(self, polling: bool) -> None:
        """The file watcher finds changes by polling (inotify unavailable) when `polling`, else through inotify."""


class PrometheusMetrics(Metrics):
    """Prometheus metrics in a registry of their own, so several agents can live in one process.

    Series (all timestamps are Unix epoch seconds):

    - ``istio_vault_agent_cert_expiry_timestamp_seconds{bundle,file}`` gauge: earliest notAfter of the
      certificates in each published certificate file (key files have none).
    - ``istio_vault_agent_last_publish_timestamp_seconds{bundle}`` gauge: when a new generation last went live.
    - ``istio_vault_agent_publish_total{bundle}`` counter: generations published.
    - ``istio_vault_agent_errors_total{bundle,reason}`` counter: failures by short reason.
    - ``istio_vault_agent_vault_requests_total`` counter: HTTP requests answered by Vault.
    - ``istio_vault_agent_vault_request_duration_seconds`` histogram (extra): time from sending each request to
      Vault's response headers, for latency panels.
    - ``istio_vault_agent_bundle_expiry_timestamp_seconds{bundle}`` gauge (extra): earliest notAfter of the
      whole published bundle; alert on it minus time().
    - ``istio_vault_agent_bundle_ready{bundle}`` gauge (extra): 1 when /readyz counts the bundle as ready;
      set by the health server through `set_state` at each scrape.
    - ``istio_vault_agent_token_expiry_timestamp_seconds`` gauge (extra): end of the current Vault token's
      lease, set through `token_login`; absent before the first login and for tokens without a TTL.
    - ``istio_vault_agent_vault_node_state{state}`` gauge (extra): 1 for what the Vault node said of itself
      (sys/health: active, standby, sealed, uninitialized, unreachable) the last time a failure made the agent
      ask, 0 for the other states; absent until then.
    - ``istio_vault_agent_renewals_total{bundle}`` counter (extra): renewed certificates published, for bundles
      whose source issues them (PKI); 0 from their first publish, absent for KV bundles. Failed signing
      requests count in errors_total with reason ``signing``.
    - ``istio_vault_agent_file_watch_polling`` gauge (extra): 1 when the file watcher polls every
      ``sidecar.poll_interval`` because inotify is unavailable (instances or watches exhausted), 0 with inotify;
      absent until the watcher starts.
    - ``istio_vault_agent_log_lines_dropped_total`` counter (extra): log lines dropped because stderr was not
      read fast enough (or was closed); the agent never waits for its log.
    - ``istio_vault_agent_workload_cert_ttl_seconds{bundle}`` gauge (extra): for istio-ca bundles, the workload
      certificate lifetime of the config (`workload_cert_ttl`, 24h by default). istiod caps a workload
      certificate at its intermediate's notAfter (1.28.7, 1.29.3, 1.30.0 and later), so alert when
      ``cert_expiry_timestamp_seconds{file="ca-cert.pem"} - time()`` is below twice this.
    - ``istio_vault_agent_root_expiry_timestamp_seconds{bundle}`` gauge (extra): earliest notAfter of the roots in
      root-cert.pem / ca.crt, every root Go parses and not only the one the chain ends at.
    - ``istio_vault_agent_crl_next_update_timestamp_seconds{bundle}`` gauge (extra): earliest nextUpdate of the
      CRLs in ca-crl.pem; absent without a CRL.
    - ``istio_vault_agent_client_cert_expiry_timestamp_seconds{bundle,cluster}`` gauge (extra): notAfter of the
      client certificate in a remote cluster's kubeconfig; absent for kubeconfigs with a token.
    - ``istio_vault_agent_ca_cert_info{bundle,serial,fingerprint}`` gauge (extra): 1, labelled with the serial
      (hex) and SHA-256 fingerprint of the live ca-cert.pem (istio-ca bundles), so that replicas serving
      different CA certificates show.

    The leaf's notAfter (ca-cert.pem, tls.crt) is ``cert_expiry_timestamp_seconds{file=...}``. All expiry and
    identity series of a bundle are replaced at each publish.

    Counters are built at scrape time by one collector, so there are no `_created` series and every
    method is a dict update under a lock (scrapes may come from another thread).
    """

    def __init__(self, workload_cert_ttl: Mapping[str, float] | None = None) -> None:
        """`workload_cert_ttl`: istio-ca bundle name -> its workload certificate lifetime in seconds."""
        from prometheus_client import CollectorRegistry

        self._lock = threading.Lock()
        self._cert_expiry: dict[str, dict[str, float]] = {}
        self._bundle_expiry: dict[str, float] = {}
        self._last_publish: dict[str, float] = {}
        self._publish_total: dict[str, int] = {}
        self._errors_total: dict[tuple[str, str], int] = {}
        self._renewals_total: dict[str, int] = {}
        self._vault_requests = 0
        #: latency histogram: count per bucket (the last one is +Inf), and the sum
        self._latency_buckets = [0] * (len(_LATENCY_BUCKETS) + 1)
        self._latency_sum = 0.0
        self._ready: dict[str, bool] = {}
        self._token_expiry: float | None = None
        self._vault_node: str | None = None
        self._watch_polling: bool | None = None
        self._workload_ttl = dict(workload_cert_ttl or {})
        self._identity: dict[str, BundleInfo] = {}
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_collector(self))

    # -- the Metrics interface ------------------------------------------------------------------------------
    def published(self, bundle: str, info: BundleInfo, when: float) -> None:
        """Record a new generation of `bundle`: publish count, publish time and certificate expiries."""
        expiry = {name: at.timestamp() for name, at in info.not_after.items() if not name.endswith(_KEY_SUFFIXES)}
        with self._lock:
            # Replace, not merge: a file that left the bundle must not keep reporting its old expiry.
            self._cert_expiry[bundle] = expiry
            self._bundle_expiry[bundle] = info.expires_at.timestamp()
            self._last_publish[bundle] = when
            self._publish_total[bundle] = self._publish_total.get(bundle, 0) + 1
            self._identity[bundle] = info

    def error(self, bundle: str, reason: str) -> None:
        """Count one failure of `bundle` under `reason`."""
        with self._lock:
            self._errors_total[bundle, reason] = self._errors_total.get((bundle, reason), 0) + 1

    def vault_request(self, seconds: float | None = None) -> None:
        """Count one Vault HTTP request and its latency to the response headers (`seconds`, when known)."""
        with self._lock:
            self._vault_requests += 1
            if seconds is not None and seconds >= 0:
                self._latency_buckets[bisect.bisect_left(_LATENCY_BUCKETS, seconds)] += 1
                self._latency_sum += seconds

    def renewal(self, bundle: str, *, renewed: bool) -> None:
        """Start `bundle`'s renewals_total at 0 (first issuance) or count one renewal."""
        with self._lock:
            self._renewals_total[bundle] = self._renewals_total.get(bundle, 0) + (1 if renewed else 0)

    # -- extras, fed by the sidecar and the health server ---------------------------------------------------
    def token_login(self, login: object | None) -> None:
        """Record the current Vault token (an `auth.Login`, or None after a logout): its lease end, if finite."""
        expires_at = getattr(login, "expires_at", None)
        value = float(expires_at) if isinstance(expires_at, int | float) and math.isfinite(expires_at) else None
        with self._lock:
            self._token_expiry = value

    def file_watch_polling(self, polling: bool) -> None:
        """Record whether the file watcher polls (1) or uses inotify (0)."""
        with self._lock:
            self._watch_polling = polling

    def set_state(self, *, ready: Mapping[str, bool], vault_node: str | None = None) -> None:
        """Set readiness per bundle, as /readyz sees it, and the Vault node's last known state; the health
        server calls this before each scrape.

        Every bundle in `ready` also gets a publish_total series (0 until its first publish).
        """
        with self._lock:
            self._ready = dict(ready)
            self._vault_node = vault_node
            # A series that exists at 0 lets rate() and increase() see the first publish.
            for bundle in ready:
                self._publish_total.setdefault(bundle, 0)

    def render(self) -> tuple[bytes, str]:
        """The exposition in Prometheus text format 0.0.4, and its Content-Type."""
        from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_PLAIN_0_0_4

    def _families(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        with self._lock:
            cert_expiry = {b: dict(files) for b, files in self._cert_expiry.items()}
            bundle_expiry = dict(self._bundle_expiry)
            last_publish = dict(self._last_publish)
            publish_total = dict(self._publish_total)
            errors_total = dict(self._errors_total)
            renewals_total = dict(self._renewals_total)
            vault_requests = self._vault_requests
            latency_buckets, latency_sum = list(self._latency_buckets), self._latency_sum
            ready = dict(self._ready)
            token_expiry = self._token_expiry
            vault_node = self._vault_node
            watch_polling = self._watch_polling
            identity = dict(self._identity)

        g = GaugeMetricFamily(
            "istio_vault_agent_cert_expiry_timestamp_seconds",
            "Earliest notAfter of the certificates in each published file, in Unix seconds.",
            labels=["bundle", "file"],
        )
        for bundle, files in sorted(cert_expiry.items()):
            for name, value in sorted(files.items()):
                g.add_metric([bundle, name], value)
        yield g

        g = GaugeMetricFamily(
            "istio_vault_agent_last_publish_timestamp_seconds",
            "When the current generation of the bundle was published, in Unix seconds.",
            labels=["bundle"],
        )
        for bundle, value in sorted(last_publish.items()):
            g.add_metric([bundle], value)
        yield g

        c = CounterMetricFamily("istio_vault_agent_publish", "Bundle generations published.", labels=["bundle"])
        for bundle, count in sorted(publish_total.items()):
            c.add_metric([bundle], count)
        yield c

        c = CounterMetricFamily(
            "istio_vault_agent_errors", "Failures by bundle and reason.", labels=["bundle", "reason"]
        )
        for (bundle, reason), count in sorted(errors_total.items()):
            c.add_metric([bundle, reason], count)
        yield c

        yield CounterMetricFamily(
            "istio_vault_agent_vault_requests", "HTTP requests answered by Vault.", value=vault_requests
        )

        cumulative = list(itertools.accumulate(latency_buckets))
        yield HistogramMetricFamily(
            "istio_vault_agent_vault_request_duration_seconds",
            "Time from sending a request to Vault to its response headers, in seconds.",
            buckets=[*zip([repr(b) for b in _LATENCY_BUCKETS], cumulative, strict=False), ("+Inf", cumulative[-1])],
            sum_value=latency_sum,
        )

        c = CounterMetricFamily(
            "istio_vault_agent_renewals", "Renewed certificates published, for PKI sources.", labels=["bundle"]
        )
        for bundle, count in sorted(renewals_total.items()):
            c.add_metric([bundle], count)
        yield c

        g = GaugeMetricFamily(
            "istio_vault_agent_bundle_expiry_timestamp_seconds",
            "Earliest notAfter over the whole published bundle, in Unix seconds.",
            labels=["bundle"],
        )
        for bundle, value in sorted(bundle_expiry.items()):
            g.add_metric([bundle], value)
        yield g

        g = GaugeMetricFamily(
            "istio_vault_agent_bundle_ready", "1 when /readyz counts the bundle as ready, else 0.", labels=["bundle"]
        )
        for bundle, ok in sorted(ready.items()):
            g.add_metric([bundle], 1.0 if ok else 0.0)
        yield g

        g = GaugeMetricFamily(
            "istio_vault_agent_token_expiry_timestamp_seconds",
            "When the current Vault token's lease ends, in Unix seconds.",
        )
        if token_expiry is not None:
            g.add_metric([], token_expiry)
        yield g

        g = GaugeMetricFamily(
            "istio_vault_agent_vault_node_state",
            "1 for the state the Vault node reported of itself (sys/health) when last asked, else 0.",
            labels=["state"],
        )
        if vault_node is not None:
            for state in NODE_STATES:
                g.add_metric([state], 1.0 if state == vault_node else 0.0)
        yield g
        yield from _degraded_families(watch_polling)
        yield from _identity_families(identity)
        yield _workload_ttl_family(self._workload_ttl)


def _workload_ttl_family(ttls: Mapping[str, float]) -> Any:
    """The configured workload certificate lifetime per istio-ca bundle (the lead-time alert needs 2 x it)."""
    from prometheus_client.core import GaugeMetricFamily

    g = GaugeMetricFamily(
        "istio_vault_agent_workload_cert_ttl_seconds",
        "Lifetime of the workload certificates istiod signs (workload_cert_ttl), for istio-ca bundles: an"
        " intermediate needs twice this left.",
        labels=["bundle"],
    )
    for bundle, value in sorted(ttls.items()):
        g.add_metric([bundle], value)
    return g


def _degraded_families(watch_polling: bool | None) -> Iterator[Any]:
    """The agent's own fallbacks: file watching by polling, log lines dropped."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    from agent.log import dropped_lines

    g = GaugeMetricFamily(
        "istio_vault_agent_file_watch_polling",
        "1 when the file watcher polls every sidecar.poll_interval because inotify is unavailable, else 0.",
    )
    if watch_polling is not None:
        g.add_metric([], 1.0 if watch_polling else 0.0)
    yield g

    yield CounterMetricFamily(
        "istio_vault_agent_log_lines_dropped",
        "Log lines dropped because stderr was not read fast enough, or was closed.",
        value=dropped_lines(),
    )


def _identity_families(infos: Mapping[str, BundleInfo]) -> Iterator[Any]:
    """What the live generation of each bundle is: the expiry of its roots, CRLs and client certificates, and which
    ca-cert.pem it serves."""
    from prometheus_client.core import GaugeMetricFamily

    roots = GaugeMetricFamily(
        "istio_vault_agent_root_expiry_timestamp_seconds",
        "Earliest notAfter of the roots in root-cert.pem or ca.crt, in Unix seconds.",
        labels=["bundle"],
    )
    crl = GaugeMetricFamily(
        "istio_vault_agent_crl_next_update_timestamp_seconds",
        "Earliest nextUpdate of the CRLs in ca-crl.pem, in Unix seconds.",
        labels=["bundle"],
    )
    client = GaugeMetricFamily(
        "istio_vault_agent_client_cert_expiry_timestamp_seconds",
        "notAfter of the client certificate in a remote cluster's kubeconfig, in Unix seconds.",
        labels=["bundle", "cluster"],
    )
    ca_cert = GaugeMetricFamily(
        "istio_vault_agent_ca_cert_info",
        "1, labelled with the serial (hex) and SHA-256 fingerprint of the live ca-cert.pem.",
        labels=["bundle", "serial", "fingerprint"],
    )
    for bundle, info in sorted(infos.items()):
        if info.root_expires_at is not None:
            roots.add_metric([bundle], info.root_expires_at.timestamp())
        if info.crl_next_update is not None:
            crl.add_metric([bundle], info.crl_next_update.timestamp())
        for cluster, at in sorted(info.client_not_after.items()):
            client.add_metric([bundle, cluster], at.timestamp())
        if info.kind == "istio-ca" and info.fingerprint:
            ca_cert.add_metric([bundle, info.serial, info.fingerprint], 1.0)
    yield from (roots, crl, client, ca_cert)


def _collector(metrics: PrometheusMetrics) -> Any:
    """A prometheus_client Collector over `metrics` (defined here so the import stays lazy)."""
    from prometheus_client.registry import Collector

    class _Collector(Collector):
        def collect(self) -> Iterator[Any]:
            return metrics._families()

    return _Collector()
