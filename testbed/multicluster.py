"""A multi-cluster Vault layout for tests, built with hvac (ClusterLayout's names: auth mount, KV mount, policy,
role per cluster). A stand-in for `setup vault` and `ca intermediate --kv` until tests can run those commands.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import hvac

from agent.clusters import BUNDLE_KEYS, ClusterLayout
from testbed.kubeapi import KubeAPI
from testbed.pki import CertKey, intermediate_ca, istio_ca_files, pem_certs
from testbed.vaultsetup import configure_kubernetes_auth, ensure_secrets_engine

__all__ = ["bundle_data", "read_policy_text", "seed_cluster", "seed_pki_cluster", "write_bundle"]


def read_policy_text(layout: ClusterLayout, kv_version: int = 1) -> str:
    """The read policy `setup vault` writes: read on this cluster's bundle (KV v2: data/ and metadata/)."""
    if kv_version == 2:
        secret = layout.kv_path.removeprefix(layout.kv_mount + "/")
        return (f'path "{layout.kv_mount}/data/{secret}" {{ capabilities = ["read"] }}\n'
                f'path "{layout.kv_mount}/metadata/{secret}" {{ capabilities = ["read"] }}\n')
    return f'path "{layout.kv_path}" {{ capabilities = ["read"] }}\n'


def bundle_data(root: CertKey, intermediate: CertKey, *, roots: Sequence[CertKey] = ()) -> dict[str, str]:
    """The four KV keys for `intermediate` under `root`; `roots` replaces root-cert.pem (a combined root bundle)."""
    files = istio_ca_files(root, intermediate)
    if roots:
        files["root-cert.pem"] = pem_certs(*(r.cert for r in roots))
    return {key: files[name].decode() for key, name in BUNDLE_KEYS.items()}


def write_bundle(client: hvac.Client, layout: ClusterLayout, data: Mapping[str, str], kv_version: int = 1) -> None:
    """Store `data` (KV key -> PEM text) at the cluster's KV path."""
    secret = layout.kv_path.removeprefix(layout.kv_mount + "/")
    if kv_version == 2:
        client.secrets.kv.v2.create_or_update_secret(path=secret, secret=dict(data), mount_point=layout.kv_mount)
    else:
        client.secrets.kv.v1.create_or_update_secret(path=secret, secret=dict(data), mount_point=layout.kv_mount)


def seed_cluster(
    client: hvac.Client,
    kube: KubeAPI,
    cluster: str,
    root: CertKey,
    *,
    intermediate: CertKey | None = None,
    kv_version: int = 1,
) -> ClusterLayout:
    """One cluster's side, as `setup vault --cluster` and `ca intermediate --kv` make it: kubernetes auth at
    `kubernetes-<cluster>` pointing at `kube`, role `istiod` (istio-system/istiod, audience vault) with the read
    policy, a KV mount and a bundle with an intermediate under `root` (or `intermediate`)."""
    layout = ClusterLayout(cluster)
    ensure_secrets_engine(client, layout.kv_mount, kv_version=kv_version)
    client.sys.create_or_update_policy(name=layout.read_policy, policy=read_policy_text(layout, kv_version))
    configure_kubernetes_auth(
        client, kube, mount=layout.auth_mount, role=layout.role, namespace=layout.namespace,
        service_account=layout.service_account, policies=[layout.read_policy], audience=layout.audience,
        token_ttl="1h",
    )
    inter = intermediate or intermediate_ca(root, cluster=cluster)
    write_bundle(client, layout, bundle_data(root, inter), kv_version)
    return layout


def seed_pki_cluster(client: hvac.Client, kube: KubeAPI, cluster: str, pki_mount: str) -> ClusterLayout:
    """One cluster in PKI mode (`setup vault --pki`): the auth mount and role as above, bound to the signing policy
    `istiod-pki-<cluster>` (update on `<pki_mount>/root/sign-intermediate`); no KV mount."""
    layout = ClusterLayout(cluster, pki_mount=pki_mount)
    client.sys.create_or_update_policy(
        name=layout.pki_policy, policy=f'path "{pki_mount}/root/sign-intermediate" {{ capabilities = ["update"] }}\n')
    configure_kubernetes_auth(
        client, kube, mount=layout.auth_mount, role=layout.role, namespace=layout.namespace,
        service_account=layout.service_account, policies=[layout.pki_policy], audience=layout.audience,
        token_ttl="1h",
    )
    return layout
