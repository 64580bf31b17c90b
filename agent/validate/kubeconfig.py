"""Remote secrets (multi-primary): the kubeconfig istiod uses to reach another cluster, checked before it is applied.

Pure: parses YAML and certificates, never contacts a cluster. No message ever carries the kubeconfig's content.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from typing import Any

from agent.clusters import CLUSTER_NAME
from agent.errors import BundleError
from agent.text import shown
from agent.validate.info import BundleInfo, to_datetime
from agent.validate.limits import LimitExceeded, Limits

__all__ = ["decode_value", "validate_remote_secret"]

_BASE64 = re.compile(rb"[A-Za-z0-9+/=\s]+")


def decode_value(raw: bytes) -> bytes:
    """A KV value as the kubeconfig it holds: base64 (the Secret's `data` as istioctl prints it) or plain text.

    A YAML or JSON kubeconfig always holds ':' or '{', which base64 never does, so the two cannot be mistaken.
    """
    if _BASE64.fullmatch(raw):
        try:
            return base64.b64decode(b"".join(raw.split()), validate=True)
        except (binascii.Error, ValueError):
            return raw
    return raw


def _refuse(cluster: str, what: str, check: str) -> BundleError:
    return BundleError(f"the remote secret's kubeconfig for cluster {shown(cluster, 60)} {what}", check=check)


def _one(cfg: Mapping[str, Any], key: str, inner: str, cluster: str) -> Mapping[str, Any]:
    """The single entry of list `key` (clusters, users, contexts), as its `inner` mapping."""
    items = cfg.get(key)
    if not isinstance(items, list) or len(items) != 1 or not isinstance(items[0], dict):
        count = len(items) if isinstance(items, list) else 0
        raise _refuse(
            cluster, f"must have exactly one entry in {key}, not {count}: istioctl create-remote-secret writes one",
            f"kubeconfig-{key}",
        )
    entry = items[0].get(inner)
    if not isinstance(entry, dict):
        raise _refuse(cluster, f"has no {key}[0].{inner} mapping", f"kubeconfig-{key}")
    return entry


def _pem_data(value: object, cluster: str, key: str) -> bytes:
    """A `*-data` field: base64 of PEM."""
    if not isinstance(value, str) or not value.strip():
        raise _refuse(cluster, f"has an empty {key}", "kubeconfig-data")
    try:
        return base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError):
        raise _refuse(cluster, f"has a {key} that is not base64", "kubeconfig-data") from None


def _certificates(pem: bytes, cluster: str, key: str, limits: Limits) -> list[Any]:
    """The certificates in `pem` (at least one), parsed as Go parses them."""
    from agent.validate.certs import CertificateError, parse_certificate
    from agent.validate.pem import decode_all

    try:
        blocks = [b for b in decode_all(pem, limit=limits.max_certs_per_file) if b.label == b"CERTIFICATE"]
        certs = [parse_certificate(b.der, limits) for b in blocks[: limits.max_certs_per_file]]
    except (CertificateError, LimitExceeded) as exc:
        raise _refuse(cluster, f"has a {key} that does not parse ({shown(str(exc), 80)})", "kubeconfig-cert") from None
    if not certs:
        raise _refuse(cluster, f"has no PEM certificate in {key}", "kubeconfig-cert")
    return certs


def _jwt_expiry(token: str) -> int | None:
    """`exp` of a JWT token (unverified: istiod sends it as is; the remote API server judges it), else None."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, binascii.Error):
        return None
    exp = claims.get("exp") if isinstance(claims, dict) else None
    return exp if isinstance(exp, int) and not isinstance(exp, bool) else None


#: user fields that make istiod read a file or run a program on its own host; it refuses them by default
_REFUSED_USER = {
    "exec": "an exec credential plugin",
    "auth-provider": "an auth-provider plugin",
    "tokenFile": "a tokenFile path",
    "client-certificate": "a client-certificate path",
    "client-key": "a client-key path",
    "username": "basic auth (username)",
    "password": "basic auth (password)",
}


def validate_remote_secret(files: Mapping[str, bytes], now: int, limits: Limits) -> BundleInfo:
    """Check one cluster's remote secret: {cluster name: kubeconfig} as istiod will load it.

    One cluster, user and context; an https server; the API server's CA as certificate-authority-data (never
    insecure-skip-tls-verify); a token or an inline client certificate and key (istiod refuses exec and
    auth-provider plugins and file paths unless told otherwise). The expiry is the earliest of the CA, the client
    certificate and the token's `exp`.

    Raises:
        BundleError: one sentence naming the cluster and what to fix; never the kubeconfig's content.
    """
    import yaml

    if len(files) != 1:
        raise BundleError(f"a remote secret holds one cluster's kubeconfig, not {len(files)}", check="kubeconfig-count")
    ((cluster, data),) = files.items()
    if not CLUSTER_NAME.fullmatch(cluster):
        raise BundleError(
            f"remote secret key {shown(cluster, 60)!r} is not a cluster name (lower-case letters, digits, '-', '.')",
            check="kubeconfig-cluster",
        )
    if len(data) > limits.max_file_bytes:
        raise _refuse(cluster, f"is {len(data)} bytes, over the agent's limit of {limits.max_file_bytes}",
                      "limit-file-size")
    try:
        cfg = yaml.load(data, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # noqa: S506 - safe loaders only
    except yaml.YAMLError:
        raise _refuse(cluster, "is not valid YAML", "kubeconfig-yaml") from None
    if not isinstance(cfg, dict) or cfg.get("kind", "Config") != "Config":
        raise _refuse(cluster, "is not a kubeconfig (a mapping of kind Config)", "kubeconfig-yaml")
    server_cfg = _one(cfg, "clusters", "cluster", cluster)
    user = _one(cfg, "users", "user", cluster)
    _one(cfg, "contexts", "context", cluster)
    server = server_cfg.get("server")
    if not isinstance(server, str) or not re.fullmatch(r"https://[^/\s]+(/\S*)?", server):
        raise _refuse(cluster, "needs an https:// server URL in clusters[0].cluster.server", "kubeconfig-server")
    if server_cfg.get("insecure-skip-tls-verify") is True:
        raise _refuse(
            cluster, "sets insecure-skip-tls-verify: istiod would trust any server; give certificate-authority-data",
            "kubeconfig-insecure",
        )
    if "certificate-authority-data" not in server_cfg:
        raise _refuse(
            cluster, "needs certificate-authority-data (the remote API server's CA) in clusters[0].cluster",
            "kubeconfig-ca",
        )
    not_after: dict[str, int] = {}
    ca = _certificates(
        _pem_data(server_cfg["certificate-authority-data"], cluster, "certificate-authority-data"),
        cluster, "certificate-authority-data", limits,
    )
    not_after["certificate-authority-data"] = min(c.not_after for c in ca)
    for key, what in _REFUSED_USER.items():
        if user.get(key):
            raise _refuse(
                cluster, f"uses {what}, which istiod refuses in a remote secret; use a token or inline client"
                " certificate data",
                "kubeconfig-credentials",
            )
    token = user.get("token")
    serial = ca[0].serial
    if isinstance(token, str) and token.strip():
        exp = _jwt_expiry(token.strip())
        if exp is not None:
            not_after["token"] = exp
    elif "client-certificate-data" in user and "client-key-data" in user:
        client = _certificates(
            _pem_data(user["client-certificate-data"], cluster, "client-certificate-data"),
            cluster, "client-certificate-data", limits,
        )
        _pem_data(user["client-key-data"], cluster, "client-key-data")
        not_after["client-certificate-data"] = client[0].not_after
        serial = client[0].serial
    else:
        raise _refuse(
            cluster, "has no credentials: users[0].user needs a token, or client-certificate-data and client-key-data",
            "kubeconfig-credentials",
        )
    expires = min(not_after.values())
    if expires <= now:
        which = min(not_after, key=lambda k: not_after[k])
        raise _refuse(cluster, f"has an expired {which} (at {to_datetime(expires):%Y-%m-%dT%H:%M:%SZ})",
                      "kubeconfig-expired")
    client_at = not_after.get("client-certificate-data")
    client_not_after = {} if client_at is None else {cluster: to_datetime(client_at)}
    return BundleInfo(
        kind="remote-secret",
        not_after={k: to_datetime(v) for k, v in not_after.items()},
        expires_at=to_datetime(expires),
        root_fingerprints=tuple(c.fingerprint for c in ca),
        serial=f"{serial:x}",
        client_not_after=client_not_after,
    )
