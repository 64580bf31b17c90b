"""How the agent reaches the Kubernetes API: in-cluster service account, else the kubeconfig's current context (as
kubectl merges KUBECONFIG). Everything here blocks and runs off the event loop; agent.kube makes the requests.

A kubeconfig's credentials are a token, a tokenFile (read again whenever it changes: kubelet rotates projected
tokens) or a client certificate; exec and auth-provider plugins, insecure-skip-tls-verify and an empty CA are
refused, because the agent sends credentials only to a verified API server.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import os
import re
import shutil
import ssl
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.errors import ConfigError
from agent.files import FileProblem, read_regular
from agent.text import shown

__all__ = ["Access", "kubeconfig_paths", "load_access", "read_token_file", "stamp"]

#: a kubeconfig (and each CA or client certificate file it names)
_CONFIG_LIMIT = 4 * 1024 * 1024
#: the service-account token (a JWT) and other small files kubelet mounts
_TOKEN_LIMIT = 64 * 1024
_TOKEN_CHARS = re.compile(r"[\x21-\x7e]+")


def kubeconfig_paths() -> list[str] | None:
    """KUBECONFIG (may list several files, as kubectl allows), else ~/.kube/config when it exists."""
    env = os.environ.get("KUBECONFIG", "")
    if env.strip(os.pathsep):
        return [p for p in env.split(os.pathsep) if p]
    default = Path("~/.kube/config").expanduser()
    return [str(default)] if default.is_file() else None


# ------------------------------------------------------------------------------------------ access (config)


@dataclass
class Access:
    """Where the API server is and how the agent proves who it is; built once, off the event loop."""

    server: str
    ssl: ssl.SSLContext | None
    origin: str
    namespace: str | None = None
    token: str | None = None
    #: a file the token is read from again whenever it changes (kubelet rotates projected tokens)
    token_file: str | None = None
    token_stamp: tuple[int, int, int] | None = None
    tls_server_name: str | None = None


def _token_text(raw: bytes, what: str) -> str:
    token = raw.decode("ascii", "replace").strip()
    if not token:
        raise FileProblem(f"{what} is empty")
    if not _TOKEN_CHARS.fullmatch(token):
        raise FileProblem(f"{what} holds something that is not a bearer token")
    return token


def stamp(path: str) -> tuple[int, int, int]:
    st = os.stat(path)
    return st.st_ino, st.st_mtime_ns, st.st_size


def read_token_file(path: str) -> tuple[tuple[int, int, int], str]:
    """The token file's (inode, mtime, size) and its token. Blocks.

    Raises:
        FileProblem: missing, not a regular file, over 64 KiB, empty or not a token.
    """
    try:
        seen = stamp(path)
    except OSError:
        seen = (0, 0, 0)
    what = f"the token file {shown(path)}"
    return seen, _token_text(read_regular(path, limit=_TOKEN_LIMIT, what="the token file"), what)


def _in_cluster(sa_dir: Path) -> Access:
    """The pod's service account: KUBERNETES_SERVICE_HOST/PORT, token, CA and namespace from `sa_dir`. Blocks."""

    def refuse(reason: str) -> ConfigError:
        return ConfigError(
            f"in-cluster Kubernetes config cannot be loaded from {sa_dir}: {reason};"
            " mount a service-account token (automountServiceAccountToken: true)"
        )

    host = os.environ.get("KUBERNETES_SERVICE_HOST", "").strip()
    port = os.environ.get("KUBERNETES_SERVICE_PORT", "").strip()
    if not host or not port.isdigit():
        raise refuse("KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT must both be set")
    token_file = str(sa_dir / "token")
    try:
        stamp, token = read_token_file(token_file)
        ca_pem = read_regular(str(sa_dir / "ca.crt"), limit=_CONFIG_LIMIT, what="the service account's CA file")
    except FileProblem as exc:
        raise refuse(str(exc)) from None
    if not ca_pem.strip():  # cadata="" would mean the system's trust store
        raise refuse(f"{sa_dir / 'ca.crt'} holds no PEM certificate")
    try:
        ctx = ssl.create_default_context(cadata=ca_pem.decode("ascii", "replace"))
    except (ssl.SSLError, ValueError):
        raise refuse(f"{sa_dir / 'ca.crt'} holds no PEM certificate") from None
    try:
        namespace: str | None = read_regular(
            str(sa_dir / "namespace"), limit=1024, what="the namespace file"
        ).decode("utf-8", "replace").strip() or None
    except FileProblem:
        namespace = None
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # an IPv6 service address
    return Access(server=f"https://{host}:{int(port)}", ssl=ctx, origin="in-cluster", namespace=namespace,
                   token=token, token_file=token_file, token_stamp=stamp)


def _named(entries: object, kind: str, path: str) -> dict[str, tuple[dict[str, Any], str]]:
    """`name -> (the entry's inner map, the file it came from)` of a kubeconfig's clusters, users or contexts."""
    inner = {"clusters": "cluster", "users": "user", "contexts": "context"}[kind]
    out: dict[str, tuple[dict[str, Any], str]] = {}
    for entry in entries if isinstance(entries, list) else []:
        if isinstance(entry, dict) and isinstance(entry.get("name"), str):
            value = entry.get(inner)
            out.setdefault(entry["name"], (value if isinstance(value, dict) else {}, path))
    return out


def _data_or_file(entry: dict[str, Any], key: str, origin: str) -> bytes | None:
    """The bytes of `<key>-data` (base64) or of the file `<key>` (relative to the kubeconfig that names it)."""
    data = entry.get(f"{key}-data")
    if data:
        try:
            return base64.b64decode(str(data), validate=False)
        except (binascii.Error, ValueError):
            raise FileProblem(f"{key}-data is not base64") from None
    name = entry.get(key)
    if not name:
        return None
    file = Path(str(name)).expanduser()
    if not file.is_absolute():
        file = Path(origin).parent / file
    return read_regular(str(file), limit=_CONFIG_LIMIT, what=key)


def _load_client_cert(ctx: ssl.SSLContext, cert_pem: bytes, key_pem: bytes) -> None:
    """`ctx.load_cert_chain` wants files: write them to a private directory and remove it at once. Blocks."""
    tmp = tempfile.mkdtemp(prefix="istio-vault-agent-kube-")  # mode 0700
    try:
        paths = []
        for name, data in (("client.crt", cert_pem), ("client.key", key_pem)):
            path = os.path.join(tmp, name)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "wb") as out:
                out.write(data)
            paths.append(path)
        ctx.load_cert_chain(paths[0], paths[1])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


_Entries = dict[str, tuple[dict[str, Any], str]]


def _merge(paths: list[str], refuse: Callable[[str], ConfigError]) -> tuple[dict[str, _Entries], str | None]:
    """The clusters, users and contexts of the kubeconfig files `paths` and the current context, merged as kubectl
    does (the first file to set a name or the current context wins; missing files are skipped). Blocks."""
    import yaml

    merged: dict[str, _Entries] = {"clusters": {}, "users": {}, "contexts": {}}
    current: str | None = None
    found = False
    for path in paths:
        try:
            raw = read_regular(path, limit=_CONFIG_LIMIT, what="kubeconfig")
        except FileProblem as exc:
            if exc.missing and len(paths) > 1:
                continue
            raise refuse(str(exc)) from None
        try:
            doc = yaml.safe_load(raw) or {}
        except yaml.YAMLError:
            raise refuse(f"{shown(path)} is not valid YAML") from None
        if not isinstance(doc, dict):
            raise refuse(f"{shown(path)} is not a kubeconfig (not a map)")
        found = True
        for kind, into in merged.items():
            for entry_name, value in _named(doc.get(kind), kind, path).items():
                into.setdefault(entry_name, value)
        if current is None and isinstance(doc.get("current-context"), str) and doc["current-context"]:
            current = doc["current-context"]
    if not found:
        raise refuse("no configuration found")
    return merged, current


def _from_kubeconfig(paths: list[str]) -> Access:
    """The current context of the kubeconfig files `paths`: server, CA, credentials, namespace. Blocks."""
    where = os.pathsep.join(paths)

    def refuse(reason: str) -> ConfigError:
        return ConfigError(f"kubeconfig {shown(where)} cannot be loaded: {reason}")

    merged, current = _merge(paths, refuse)
    if current is None or current not in merged["contexts"]:
        raise refuse("no current-context is set" if current is None else f"context {shown(current)!r} does not exist")
    context = merged["contexts"][current][0]
    cluster_name, user_name = str(context.get("cluster") or ""), str(context.get("user") or "")
    if cluster_name not in merged["clusters"]:
        raise refuse(f"cluster {shown(cluster_name)!r} of context {shown(current)!r} does not exist")
    cluster, cluster_origin = merged["clusters"][cluster_name]
    server = str(cluster.get("server") or "").rstrip("/")
    if not server.startswith(("https://", "http://")):
        raise refuse(f"cluster {shown(cluster_name)!r} has no https:// server URL")
    if cluster.get("insecure-skip-tls-verify"):
        raise refuse(
            f"cluster {shown(cluster_name)!r} sets insecure-skip-tls-verify, and the agent sends its credentials only"
            " to a verified API server: give certificate-authority or certificate-authority-data"
        )
    user, user_origin = merged["users"].get(user_name, ({}, ""))
    if user.get("exec") or user.get("auth-provider"):
        plugin = "an exec credential plugin" if user.get("exec") else "an auth-provider plugin"
        raise refuse(
            f"user {shown(user_name)!r} uses {plugin}, which the agent does not run: give it a token, tokenFile or"
            " client certificate"
        )
    server_name, namespace = cluster.get("tls-server-name"), context.get("namespace")
    access = Access(server=server, ssl=None, origin=where, namespace=str(namespace) if namespace else None,
                     tls_server_name=str(server_name) if server_name else None)
    try:
        if server.startswith("https://"):
            ca_pem = _data_or_file(cluster, "certificate-authority", cluster_origin)
            trust: ssl.SSLContext | None = None
            # a CA file named but empty is no CA: cadata="" would be the system's trust store
            if ca_pem is None or ca_pem.strip():
                with contextlib.suppress(ssl.SSLError, ValueError):
                    trust = ssl.create_default_context(cadata=ca_pem.decode("ascii", "replace") if ca_pem else None)
            if trust is None:
                raise refuse(f"the certificate authority of cluster {shown(cluster_name)!r} holds no PEM"
                             " certificate")
            access.ssl = trust
            _client_cert(trust, user, user_origin, f"user {shown(user_name)!r}", refuse)
        _token(access, user, user_origin, f"user {shown(user_name)!r}")
    except FileProblem as exc:
        raise refuse(str(exc)) from None
    return access


def _client_cert(
    ctx: ssl.SSLContext, user: dict[str, Any], origin: str, who: str, refuse: Callable[[str], ConfigError]
) -> None:
    """Load the user's client certificate and key into `ctx`, when it has them. Blocks."""
    cert_pem = _data_or_file(user, "client-certificate", origin)
    key_pem = _data_or_file(user, "client-key", origin)
    if (cert_pem is None) != (key_pem is None):
        raise refuse(f"{who} needs both client-certificate and client-key")
    if cert_pem is not None and key_pem is not None:
        try:
            _load_client_cert(ctx, cert_pem, key_pem)
        except (ssl.SSLError, ValueError):
            raise refuse(f"the client certificate and key of {who} do not load as a PEM certificate and its"
                         " key") from None


def _token(access: Access, user: dict[str, Any], origin: str, who: str) -> None:
    """The user's token, or its tokenFile (read again whenever it changes). Blocks."""
    token = user.get("token")
    if token:
        access.token = _token_text(str(token).encode(), f"the token of {who}")
    elif user.get("tokenFile"):
        token_file = Path(str(user["tokenFile"])).expanduser()
        if not token_file.is_absolute():
            token_file = Path(origin).parent / token_file
        access.token_file = str(token_file)
        access.token_stamp, access.token = read_token_file(access.token_file)


def load_access(sa_dir: Path) -> Access:
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        return _in_cluster(sa_dir)
    paths = kubeconfig_paths()
    if paths is None:
        raise ConfigError(
            "no Kubernetes API access: run in a pod with a service account, or set KUBECONFIG to a kubeconfig file"
        )
    return _from_kubeconfig(paths)
