"""Configure a real OpenBao for tests: kubernetes auth against the KubeAPI stand-in, and the runbook layout.

The runbook layout reproduces the "Vaulted Istio Certificates" blog post (KV v1 per cluster, one policy, one role).
"""

from __future__ import annotations

from dataclasses import dataclass

import hvac

from testbed.kubeapi import KubeAPI

__all__ = [
    "BUNDLE_KEYS",
    "PkiLayout",
    "RunbookLayout",
    "configure_kubernetes_auth",
    "ensure_auth_method",
    "ensure_secrets_engine",
    "seed_runbook_layout",
    "setup_pki",
]

#: KV key -> file name istiod reads from ROOT_CA_DIR
BUNDLE_KEYS = {
    "ca_key": "ca-key.pem",
    "ca_cert": "ca-cert.pem",
    "cert_chain": "cert-chain.pem",
    "root_cert": "root-cert.pem",
}

#: the service account whose token the auth backend uses to call TokenReview
REVIEWER_NAMESPACE = "kube-system"
REVIEWER_NAME = "bao-token-reviewer"


def ensure_auth_method(client: hvac.Client, mount: str, method_type: str = "kubernetes") -> None:
    """Enable auth method `method_type` at `mount` unless something is already mounted there."""
    mounts = client.sys.list_auth_methods()
    data = mounts.get("data", mounts)
    if f"{mount.strip('/')}/" not in data:
        client.sys.enable_auth_method(method_type, path=mount)


def ensure_secrets_engine(client: hvac.Client, mount: str, *, kv_version: int = 1) -> None:
    """Enable a KV engine (version 1 or 2) at `mount` unless something is already mounted there."""
    mounts = client.sys.list_mounted_secrets_engines()
    data = mounts.get("data", mounts)
    if f"{mount.strip('/')}/" not in data:
        client.sys.enable_secrets_engine("kv", path=mount, options={"version": str(kv_version)})


def configure_kubernetes_auth(
    client: hvac.Client,
    kube: KubeAPI,
    *,
    mount: str,
    role: str,
    namespace: str,
    service_account: str,
    policies: list[str],
    audience: str | None = None,
    token_ttl: str | None = None,
    token_max_ttl: str | None = None,
) -> None:
    """Enable kubernetes auth at `mount` (if needed), point it at `kube`, and write `role`.

    The config is what an operator writes for an external Vault: `kubernetes_host`, the API server
    CA (OpenBao refuses to start TokenReviews without it), a reviewer JWT, `disable_local_ca_jwt`,
    and the issuer the stand-in signs with (so the `iss` check stays on, as in production).
    """
    ensure_auth_method(client, mount)
    reviewer_jwt = kube.mint_token(REVIEWER_NAMESPACE, REVIEWER_NAME, ttl=7 * 24 * 3600)
    client.write_data(
        f"auth/{mount}/config",
        data={
            "kubernetes_host": kube.url,
            "kubernetes_ca_cert": kube.ca_pem.decode("ascii"),
            "token_reviewer_jwt": reviewer_jwt,
            "disable_local_ca_jwt": True,
            "issuer": kube.issuer,
            "disable_iss_validation": False,
        },
    )
    role_data: dict[str, object] = {
        "bound_service_account_names": [service_account],
        "bound_service_account_namespaces": [namespace],
        "token_policies": list(policies),
    }
    if audience is not None:
        role_data["audience"] = audience
    if token_ttl is not None:
        role_data["token_ttl"] = token_ttl
    if token_max_ttl is not None:
        role_data["token_max_ttl"] = token_max_ttl
    client.write_data(f"auth/{mount}/role/{role}", data=role_data)


@dataclass(frozen=True)
class RunbookLayout:
    """Where `seed_runbook_layout` put things: what the agent's config must name."""

    cluster: str
    kv_mount: str
    secret_path: str
    policy: str
    auth_mount: str
    role: str
    namespace: str
    service_account: str

    @property
    def login_path(self) -> str:
        """The auth path as the blog's `vault.hashicorp.com/auth-path` annotation spells it."""
        return f"auth/{self.auth_mount}"


def _kv_key(name: str) -> str:
    # accept both the blog's file names ("ca-key.pem") and its KV keys ("ca_key")
    return name.removesuffix(".pem").replace("-", "_")


def seed_runbook_layout(
    client: hvac.Client,
    kube: KubeAPI,
    bundle_files: dict[str, bytes],
    *,
    cluster: str = "cluster1",
    token_ttl: str = "24h",
) -> RunbookLayout:
    """Reproduce the runbook: KV v1 `kubernetes-{cluster}-secrets`, secret `istiod-service/certs`,
    policy `istiod-certs-{cluster}`, kubernetes auth `kubernetes-{cluster}` with role `istiod` bound
    to istio-system/istiod. Idempotent, so it can re-seed a restarted dev server.

    `bundle_files` maps the four file names (ca-key.pem, ...) or KV keys (ca_key, ...) to PEM bytes.

    Raises:
        ValueError: if one of the four entries is missing.
    """
    data = {_kv_key(k): v.decode("ascii") for k, v in bundle_files.items()}
    missing = sorted(set(BUNDLE_KEYS) - set(data))
    if missing:
        raise ValueError(f"bundle_files lacks {', '.join(BUNDLE_KEYS[m] for m in missing)}.")
    layout = RunbookLayout(
        cluster=cluster,
        kv_mount=f"kubernetes-{cluster}-secrets",
        secret_path="istiod-service/certs",
        policy=f"istiod-certs-{cluster}",
        auth_mount=f"kubernetes-{cluster}",
        role="istiod",
        namespace="istio-system",
        service_account="istiod",
    )
    ensure_secrets_engine(client, layout.kv_mount, kv_version=1)
    client.secrets.kv.v1.create_or_update_secret(path=layout.secret_path, secret=data, mount_point=layout.kv_mount)
    client.sys.create_or_update_policy(
        name=layout.policy,
        policy=f'path "{layout.kv_mount}/{layout.secret_path}" {{\n  capabilities = ["read"]\n}}\n',
    )
    configure_kubernetes_auth(
        client,
        kube,
        mount=layout.auth_mount,
        role=layout.role,
        namespace=layout.namespace,
        service_account=layout.service_account,
        policies=[layout.policy],
        token_ttl=token_ttl,
    )
    return layout


# ---------------------------------------------------------------------------------------------- PKI (issue 11)


@dataclass(frozen=True)
class PkiLayout:
    """What `setup_pki` made: a root mount, a mount with an intermediate issuer under that root, a gateway role
    there, and the agent's minimal policy."""

    #: holds the root CA as its default issuer: istiod's intermediate is signed at `root_mount/root/sign-intermediate`
    root_mount: str
    #: holds an intermediate issuer (`int_issuer`, signed by the root, which is imported too) and the gateway role
    int_mount: str
    int_issuer: str
    role: str
    policy: str
    root_pem: bytes
    int_pem: bytes

    @property
    def issuer_sign_path(self) -> str:
        """`source.pki_intermediate.path` for signing with the intermediate issuer."""
        return f"issuer/{self.int_issuer}/sign-intermediate"

    def policy_text(self) -> str:
        """The minimal policy (measured on OpenBao 2.7.2): update on the two signing paths and the role."""
        return (
            f'path "{self.root_mount}/root/sign-intermediate" {{ capabilities = ["update"] }}\n'
            f'path "{self.int_mount}/{self.issuer_sign_path}" {{ capabilities = ["update"] }}\n'
            f'path "{self.int_mount}/issue/{self.role}" {{ capabilities = ["update"] }}\n'
        )


def _ensure_pki_mount(client: hvac.Client, mount: str, max_ttl: str) -> bool:
    """Enable a PKI engine at `mount` unless it exists; True when it was enabled now."""
    mounts = client.sys.list_mounted_secrets_engines()
    data = mounts.get("data", mounts)
    if f"{mount}/" in data:
        return False
    client.sys.enable_secrets_engine("pki", path=mount, config={"max_lease_ttl": max_ttl})
    return True


def setup_pki(
    client: hvac.Client,
    *,
    root_mount: str = "pki",
    int_mount: str = "pki_int",
    role: str = "ingress",
    policy: str = "istio-pki",
    domains: tuple[str, ...] = ("example.com",),
    crl_address: str | None = None,
) -> PkiLayout:
    """A root CA (EC P-256, O=Istio CN=Root CA) at `root_mount`, an intermediate issuer `gateway-ca` under it at
    `int_mount` (its chain imported, so the mount knows the root), the gateway role `role` (subdomains of
    `domains`, localhost, IP SANs) and `policy`, the agent's minimal policy. With `crl_address` (this Vault's
    address), certificates the root signs name its CRL as their distribution point. Idempotent per mount."""
    if _ensure_pki_mount(client, root_mount, "87600h"):
        if crl_address is not None:
            client.write_data(f"{root_mount}/config/urls", data={
                "crl_distribution_points": [f"{crl_address}/v1/{root_mount}/crl"]})
        client.write_data(f"{root_mount}/root/generate/internal", data={
            "common_name": "Root CA", "organization": "Istio", "key_type": "ec", "key_bits": 256,
            "ttl": "87000h", "issuer_name": "root"})
    root_pem = client.adapter.get(f"/v1/{root_mount}/issuer/default/json")["data"]["certificate"].encode()
    if _ensure_pki_mount(client, int_mount, "43800h"):
        csr = client.write_data(f"{int_mount}/intermediate/generate/internal", data={
            "common_name": "Gateway CA", "organization": "Istio", "key_type": "ec", "key_bits": 256})["data"]["csr"]
        signed = client.write_data(f"{root_mount}/root/sign-intermediate", data={
            "csr": csr, "format": "pem", "ttl": "43000h"})["data"]["certificate"]
        answer = client.write_data(f"{int_mount}/intermediate/set-signed", data={
            "certificate": signed + "\n" + root_pem.decode()})
        mapping = answer["data"]["mapping"]
        with_key = next(i for i, key in mapping.items() if key)
        client.adapter.request("patch", f"/v1/{int_mount}/issuer/{with_key}", json={"issuer_name": "gateway-ca"},
                               headers={"Content-Type": "application/merge-patch+json"})
    int_pem = client.adapter.get(f"/v1/{int_mount}/issuer/gateway-ca/json")["data"]["certificate"].encode()
    client.write_data(f"{int_mount}/roles/{role}", data={
        "allowed_domains": list(domains), "allow_subdomains": True, "allow_localhost": True, "allow_ip_sans": True,
        "max_ttl": "720h", "key_type": "ec", "key_bits": 256, "issuer_ref": "gateway-ca"})
    layout = PkiLayout(root_mount=root_mount, int_mount=int_mount, int_issuer="gateway-ca", role=role,
                       policy=policy, root_pem=root_pem, int_pem=int_pem)
    client.sys.create_or_update_policy(name=policy, policy=layout.policy_text())
    return layout
