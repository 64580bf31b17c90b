"""Configure a real OpenBao for tests: kubernetes auth against the KubeAPI stand-in, and the runbook layout.

The runbook layout reproduces the "Vaulted Istio Certificates" blog post (KV v1 per cluster, one policy, one role).
"""

from __future__ import annotations

from dataclasses import dataclass

import hvac

from testbed.kubeapi import KubeAPI

__all__ = [
    "BUNDLE_KEYS",
    "RunbookLayout",
    "configure_kubernetes_auth",
    "ensure_auth_method",
    "ensure_secrets_engine",
    "seed_runbook_layout",
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
