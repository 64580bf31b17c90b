"""What the agent counts. `Metrics` is the no-op used in init mode; sidecar mode uses the Prometheus one.

prometheus_client is imported only by PrometheusMetrics, so init mode never pays for it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from agent.bundle import BundleInfo

__all__ = ["Metrics"]


class Metrics:
    """The interface every component reports through; this base records nothing."""

    def published(self, bundle: str, info: BundleInfo, when: float) -> None:
        """A new generation of `bundle` went live at `when`."""

    def error(self, bundle: str, reason: str) -> None:
        """A failure of `bundle`, labelled by a short reason such as invalid_bundle or vault_unavailable."""

    def vault_request(self, *_args: object, **_kwargs: object) -> None:
        """One HTTP request was sent to Vault (a requests response hook)."""
