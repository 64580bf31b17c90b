"""Local stand-ins shared by tests, the demo and benchmarks: a real OpenBao dev server, a Kubernetes API
stand-in (the only fake), and helpers that configure OpenBao the way the runbook does.
"""

from testbed.bao import BaoNotFound, BaoServer, find_bao, free_port, start_bao
from testbed.kubeapi import DEFAULT_ISSUER, KubeAPI, KubeRequest
from testbed.vaultsetup import (
    BUNDLE_KEYS,
    RunbookLayout,
    configure_kubernetes_auth,
    ensure_auth_method,
    ensure_secrets_engine,
    seed_runbook_layout,
)

__all__ = [
    "BUNDLE_KEYS",
    "DEFAULT_ISSUER",
    "BaoNotFound",
    "BaoServer",
    "KubeAPI",
    "KubeRequest",
    "RunbookLayout",
    "configure_kubernetes_auth",
    "ensure_auth_method",
    "ensure_secrets_engine",
    "find_bao",
    "free_port",
    "seed_runbook_layout",
    "start_bao",
]
