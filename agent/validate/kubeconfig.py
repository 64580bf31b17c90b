"""Remote secrets (multi-primary): the kubeconfig istiod uses to reach another cluster, checked before it is applied.

Pure: parses YAML and certificates, never contacts a cluster. No message ever carries the kubeconfig's content.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from agent.clusters import CLUSTER_NAME
from agent.errors import BundleError
from agent.text import shown
from agent.validate.info import BundleInfo, to_datetime
from agent.validate.limits import LimitExceeded, Limits

__all__ = ["decode_value", "validate_remote_files", "validate_remote_secret"]

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
    if len(files) != 1:
        raise BundleError(f"a remote secret holds one cluster's kubeconfig, not {len(files)}", check="kubeconfig-count")
    ((cluster, data),) = files.items()
    checked = _check(cluster, data, now, limits)
    return _info([checked])


def validate_remote_files(files: Mapping[str, bytes], now: int, limits: Limits) -> BundleInfo:
    """Check the set of a remote-secret bundle with target files: {cluster name: kubeconfig}, each published as
    `<cluster>.yaml` into the directory istiod 1.30+ reads (PILOT_MULTICLUSTER_KUBECONFIG_PATH).

    Each kubeconfig passes `validate_remote_secret`'s checks. istiod's file reader takes the cluster ID from the
    kubeconfig itself, not from the file name (pkg/kube/multicluster/kubeconfig_files.go, clusterIDFromKubeconfig:
    the current context's cluster, else the first context by name with a cluster, else the first cluster name), so
    that ID must be the file's cluster and no two files may share one (getClusterEntry then reports a conflict and
    keeps the cluster as it was). One bad file refuses the whole set: istiod's reader stops at the first file that
    fails to parse (krt/files FolderWatch.readOnce) and keeps its old state, or at start reads nothing at all.

    Raises:
        BundleError: one sentence naming the cluster (file) and what to fix; never the kubeconfig's content.
    """
    if not files:
        raise BundleError("a remote kubeconfig set holds at least one cluster's kubeconfig", check="kubeconfig-count")
    checked = [_check(cluster, data, now, limits) for cluster, data in sorted(files.items())]
    owners: dict[str, str] = {}
    for c in checked:
        if c.cluster_id in owners:
            raise BundleError(
                f"the remote kubeconfigs for clusters {shown(owners[c.cluster_id], 60)} and {shown(c.cluster, 60)} both"
                f" name cluster {shown(c.cluster_id, 60)} in their current context: istiod takes the cluster ID from"
                " there and, finding two files for one cluster, takes neither (one kubeconfig per remote cluster)",
                check="kubeconfig-duplicate",
            )
        owners[c.cluster_id] = c.cluster
    for c in checked:
        if not c.current:
            raise _refuse(
                c.cluster, "has no current-context naming its one context: istiod takes the cluster ID and the"
                " credentials from the current context; set current-context as istioctl create-remote-secret does",
                "kubeconfig-context",
            )
        if c.cluster_id != c.cluster:
            raise _refuse(
                c.cluster,
                f"names cluster {shown(c.cluster_id, 60)} in its current context, and istiod takes the cluster ID from"
                f" there, not from the file name: store it under key {shown(c.cluster_id, 60)} or fix its"
                " current-context and contexts[0].context.cluster",
                "kubeconfig-cluster-id",
            )
    return _info(checked, per_file=True)


@dataclass(frozen=True)
class _Checked:
    """What one kubeconfig that passed the checks holds."""

    cluster: str
    #: the cluster ID istiod's file reader derives from it
    cluster_id: str
    not_after: dict[str, int]
    ca: list[Any]
    serial: int
    #: current-context names the kubeconfig's one context (what istiod's client is built from)
    current: bool


def _cluster_id(cfg: Mapping[str, Any]) -> str:
    """The cluster ID istiod's file reader gives a kubeconfig (clusterIDFromKubeconfig in
    pkg/kube/multicluster/kubeconfig_files.go): the cluster of the current context; else the cluster of the first
    context, by name, that has one; else the first cluster name; "" when there is none."""
    contexts: dict[str, str] = {}
    for item in cfg.get("contexts") or []:
        if isinstance(item, dict) and isinstance(item.get("name"), str):
            ctx = item.get("context")
            contexts[item["name"]] = str(ctx.get("cluster") or "") if isinstance(ctx, dict) else ""
    current = cfg.get("current-context")
    if isinstance(current, str) and contexts.get(current):
        return contexts[current]
    for name in sorted(contexts):
        if contexts[name]:
            return contexts[name]
    names = sorted(
        item["name"] for item in cfg.get("clusters") or []
        if isinstance(item, dict) and isinstance(item.get("name"), str) and item["name"]
    )
    return names[0] if names else ""


def _check(cluster: str, data: bytes, now: int, limits: Limits) -> _Checked:
    """One cluster's kubeconfig through every check (see `validate_remote_secret`)."""
    import yaml

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
    context = cfg["contexts"][0].get("name")
    return _Checked(cluster, _cluster_id(cfg), not_after, ca, serial, cfg.get("current-context") == context)


def _info(checked: list[_Checked], *, per_file: bool = False) -> BundleInfo:
    """The BundleInfo of one or more checked kubeconfigs: the earliest expiry over all of them; with `per_file` each
    expiry is named `<cluster>.yaml/<field>` (the file published for the cluster, then the field)."""
    not_after: dict[str, int] = {}
    for c in checked:
        prefix = f"{c.cluster}.yaml/" if per_file else ""
        not_after.update({prefix + k: v for k, v in c.not_after.items()})
    expires = min(not_after.values())
    client_not_after = {
        c.cluster: to_datetime(c.not_after["client-certificate-data"])
        for c in checked if "client-certificate-data" in c.not_after
    }
    return BundleInfo(
        kind="remote-secret",
        not_after={k: to_datetime(v) for k, v in not_after.items()},
        expires_at=to_datetime(expires),
        root_fingerprints=tuple(ca.fingerprint for c in checked for ca in c.ca),
        serial=f"{checked[0].serial:x}",
        client_not_after=client_not_after,
    )
