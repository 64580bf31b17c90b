"""The multi-cluster layout on the Vault/OpenBao side: the names `ca`, `setup vault` and `doctor` agree on.

One auth mount, one KV mount, one read policy per cluster (as in the "Vaulted Istio Certificates" runbook);
one PKI root mount shared by all clusters, so every cluster's intermediate chains to the same root.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from agent.errors import ConfigError
from agent.text import shown

__all__ = ["BUNDLE_KEYS", "CLUSTER_NAME", "DNS_LABEL", "ClusterLayout", "check_cluster_name"]

#: KV key -> file name istiod reads from ROOT_CA_DIR (the runbook's key names)
BUNDLE_KEYS = {
    "ca_key": "ca-key.pem",
    "ca_cert": "ca-cert.pem",
    "cert_chain": "cert-chain.pem",
    "root_cert": "root-cert.pem",
}

#: a DNS-1123 label (a Kubernetes namespace name); a cluster name becomes part of mount, policy and role names, so
#: it is kept to the same, which every one of them accepts
DNS_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
#: a remote cluster's name as istiod's remote secrets carry it (the data key, and the Secret istio-remote-secret-NAME)
CLUSTER_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]{0,200}[a-z0-9])?")


def check_cluster_name(name: str) -> str:
    """`name` if it can name a cluster's mounts and policies; ConfigError otherwise."""
    if not DNS_LABEL.fullmatch(name):
        raise ConfigError(
            f"cluster name {shown(name)!r} is not usable: use lowercase letters, digits and '-' "
            "(at most 63, starting and ending with a letter or digit)"
        )
    return name


@dataclass(frozen=True)
class ClusterLayout:
    """Where one cluster's pieces live in Vault/OpenBao."""

    cluster: str
    #: the service account istiod runs as, and the audience its projected token carries
    namespace: str = "istio-system"
    service_account: str = "istiod"
    audience: str = "vault"
    #: the shared PKI root mount (`setup vault --pki`, `source.pki_intermediate`)
    pki_mount: str = "pki"

    def __post_init__(self) -> None:
        check_cluster_name(self.cluster)

    @property
    def auth_mount(self) -> str:
        """The kubernetes auth mount of this cluster's API server."""
        return f"kubernetes-{self.cluster}"

    @property
    def kv_mount(self) -> str:
        """The KV mount that holds this cluster's CA bundle."""
        return f"kubernetes-{self.cluster}-secrets"

    @property
    def kv_path(self) -> str:
        """The secret with the four bundle keys, as `MOUNT/PATH` (the runbook's `istiod-service/certs`)."""
        return f"{self.kv_mount}/istiod-service/certs"

    @property
    def read_policy(self) -> str:
        """The policy that lets istiod read its own cluster's bundle and nothing else."""
        return f"istiod-certs-{self.cluster}"

    @property
    def role(self) -> str:
        """The kubernetes auth role istiod logs in with."""
        return "istiod"

    @property
    def pki_policy(self) -> str:
        """The policy that lets this cluster's istiod have its intermediate signed (`--pki`)."""
        return f"istiod-pki-{self.cluster}"

    @property
    def gateway_role(self) -> str:
        """The PKI role gateways of this cluster issue their certificates from (`--pki --gateway`)."""
        return f"gateway-{self.cluster}"

    @property
    def gateway_policy(self) -> str:
        """The policy that lets this cluster's gateways issue from their PKI role."""
        return f"gateway-pki-{self.cluster}"

    def gateway_auth_role(self, namespace: str, service_account: str) -> str:
        """The kubernetes auth role of one gateway service account (`setup vault --gateway NS/SA`)."""
        return f"gateway-{namespace}-{service_account}"

    def gateway_kv_path(self, namespace: str, service_account: str) -> str:
        """The KV secret (`tls.key`, `tls.crt`, `ca.crt`) one gateway service account reads, as `MOUNT/PATH`."""
        return f"{self.kv_mount}/{namespace}/{service_account}/certs"

    def gateway_read_policy(self, namespace: str, service_account: str) -> str:
        """The policy that lets one gateway service account read its own KV secret and nothing else."""
        return f"gateway-certs-{self.cluster}-{namespace}-{service_account}"
