"""Fault tools for the fault, fuzz and leak tests: a leak guard, a sniffing/delaying proxy, publish debris.

The leak guard is the reusable part: register the secrets a test uses and the logs it captured; it fails the
test if any secret (or anything shaped like a private key, a JWT or a Vault token) shows up in them.
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import os
import re
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

# Shapes of secrets, whatever their value: a PEM private key, a JWT (SA tokens), a Vault/OpenBao token.
_SHAPES = {
    "a PEM private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "a JWT": re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"),
    "a Vault token": re.compile(r"\b(?:hv[sbr]|s|b|r)\.[A-Za-z0-9]{24,}\b"),
}
_CLIENT_TOKEN = re.compile(rb'"client_token"\s*:\s*"([^"]+)"')
_TOKEN_HEADER = re.compile(rb"(?im)^x-vault-token:\s*(\S+)\r?$")


class QuietHTTPServer(http.server.ThreadingHTTPServer):
    """A threaded HTTP server for the test doubles that stays quiet when a client goes away mid-request.

    The agent resets connections it gave up on (deadlines, shutdown); socketserver would print each
    ConnectionResetError or BrokenPipeError with a traceback from the handler thread into the test run's output.
    Anything else is still reported.
    """

    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        if isinstance(sys.exc_info()[1], OSError):  # resets, broken pipes, timeouts: the client went away
            return
        super().handle_error(request, client_address)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- leak guard


class LeakGuard:
    """Collects the secrets a test used and the text it captured; `check()` fails on any secret in that text."""

    def __init__(self) -> None:
        self.secrets: dict[str, str] = {}
        self.logs: list[tuple[str, Callable[[], str]]] = []

    def secret(self, label: str, value: str | bytes) -> None:
        """Register a secret; a PEM private key is registered by each line of its base64 body."""
        text = value.decode("ascii", "replace") if isinstance(value, bytes) else value
        text = text.strip()
        if not text:
            return
        if text.startswith("-----BEGIN"):
            for n, line in enumerate(text.splitlines()[1:-1]):
                if len(line) >= 16:
                    self.secrets[f"{label} (PEM body line {n + 1})"] = line
            return
        self.secrets[label] = text
        if text.count(".") == 2 and text.startswith("eyJ"):
            self.secrets[f"{label} (signature)"] = text.rsplit(".", 1)[1]

    def key_files(self, label: str, files: Mapping[str, bytes]) -> None:
        """Register the private key of a bundle (ca-key.pem or tls.key)."""
        for name in ("ca-key.pem", "tls.key"):
            if name in files:
                self.secret(f"{label} {name}", files[name])

    def watch(self, name: str, source: Path | Callable[[], str] | str) -> None:
        """Scan `source` (a file such as an `AgentProc` log, a text, or a callable giving text) at `check()`."""
        if isinstance(source, Path):
            path = source
            self.logs.append((name, lambda: path.read_text(errors="replace") if path.exists() else ""))
        elif isinstance(source, str):
            text = source
            self.logs.append((name, lambda: text))
        else:
            self.logs.append((name, source))

    def scan(self, text: str, where: str) -> None:
        """Fail if `text` holds a registered secret or anything shaped like one (never printing the secret)."""
        for label, value in self.secrets.items():
            assert value not in text, f"{where} leaks {label}"
        for shape, pattern in _SHAPES.items():
            found = pattern.search(text)
            assert found is None, f"{where} holds {shape} at offset {found.start() if found else -1}"

    def check(self) -> None:
        """Scan every watched source."""
        for name, read in self.logs:
            self.scan(read(), name)


@pytest.fixture(name="leaks")
def fixture_leaks() -> Iterator[LeakGuard]:
    """A LeakGuard checked when the test ends: everything it watched must be free of the registered secrets."""
    guard = LeakGuard()
    yield guard
    guard.check()


# ---------------------------------------------------------------------------------------------- proxy


class Proxy:
    """A TCP proxy on 127.0.0.1 in front of OpenBao: `delay` holds back each answer; it records Vault tokens.

    Plain HTTP only (the dev server), so it can read the `client_token` of each login and the X-Vault-Token
    of each request: the exact tokens the agent used, for the leak guard.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.delay = 0.0
        self.tokens: set[str] = set()
        self._lock = threading.Lock()
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(256)
        self.port = int(self._sock.getsockname()[1])
        self._closed = False
        self._conns: set[socket.socket] = set()
        threading.Thread(target=self._accept, daemon=True, name="proxy-accept").start()

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns |= {client, upstream}
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, answer: bool) -> None:
        seen = b""
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                seen = (seen + data)[-65536:]
                self._harvest(seen)
                if answer and self.delay:
                    time.sleep(self.delay)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    s.close()
            with self._lock:
                self._conns -= {src, dst}

    def _harvest(self, data: bytes) -> None:
        for pattern in (_CLIENT_TOKEN, _TOKEN_HEADER):
            for m in pattern.finditer(data):
                self.tokens.add(m.group(1).decode("ascii", "replace"))

    def drop_connections(self) -> None:
        """Close every open connection (as an OpenBao restart would)."""
        with self._lock:
            conns = list(self._conns)
        for s in conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._closed = True
        self._sock.close()
        self.drop_connections()


# ---------------------------------------------------------------------------------------------- the output dir


def debris(out: Path) -> list[str]:
    """Entries that a finished publish leaves no trace of: temp links and generations other than the live one."""
    live = os.readlink(out / "..data") if (out / "..data").is_symlink() else None
    return sorted(
        p.name for p in out.iterdir()
        if p.name.startswith("..") and p.name not in ("..data", live)
    )



# ---------------------------------------------------------------------------------------------- answers


@dataclass
class Answer:
    """What the HTTP proxy sends back instead of OpenBao's answer; `trickle` seconds pass between chunks, `stall`
    seconds before the status line (headers that never come in time); `headers` are added (a Location)."""

    status: int
    body: bytes
    content_type: str | None = "application/json"
    chunked: bool = False
    trickle: float = 0.0
    chunk: int = 65536
    stall: float = 0.0
    headers: dict[str, str] | None = None


def redirect(status: int, location: str) -> Answer:
    """A redirect to `location`, as a standby without request forwarding (or a hostile balancer) sends."""
    return Answer(status, b"", None, headers={"Location": location})


def drip(body: bytes, every: float = 1.0) -> Answer:
    """A 200 whose body comes one byte per `every` seconds (with its Content-Length)."""
    return Answer(200, body, trickle=every, chunk=1)


Mutation = Callable[[str, str, int, bytes], "Answer | None"]


class HTTPProxy:
    """An HTTP reverse proxy in front of OpenBao that can replace its answers, as a broken balancer might.

    `mutate(method, path, status, body)` sees each real answer and returns an Answer to send instead, or None to
    pass it through. `requests` counts what came in, by path; `bodies` also keeps what each request carried.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.mutate: Mutation | None = None
        self.requests: list[tuple[str, str]] = []
        #: (method, path, request body) of each request, for tests of what the agent sends
        self.bodies: list[tuple[str, str, bytes]] = []
        #: the headers of each request, in the same order
        self.headers: list[dict[str, str]] = []
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_args: object) -> None:
                pass

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                proxy.requests.append((self.command, self.path))
                proxy.bodies.append((self.command, self.path, body))
                proxy.headers.append(dict(self.headers.items()))
                conn = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                answer = proxy.mutate(self.command, self.path, resp.status, data) if proxy.mutate else None
                if answer is None:
                    answer = Answer(resp.status, data, resp.getheader("Content-Type"))
                self._send(answer)

            def _send(self, answer: Answer) -> None:
                if answer.stall:
                    time.sleep(answer.stall)
                self.send_response(answer.status)
                if answer.content_type:
                    self.send_header("Content-Type", answer.content_type)
                for name, value in (answer.headers or {}).items():
                    self.send_header(name, value)
                if answer.chunked:
                    self.send_header("Transfer-Encoding", "chunked")
                else:
                    self.send_header("Content-Length", str(len(answer.body)))
                self.end_headers()
                try:
                    for i in range(0, len(answer.body), answer.chunk):
                        part = answer.body[i : i + answer.chunk]
                        self.wfile.write(f"{len(part):x}\r\n".encode() + part + b"\r\n" if answer.chunked else part)
                        self.wfile.flush()
                        if answer.trickle:
                            time.sleep(answer.trickle)
                    if answer.chunked:
                        self.wfile.write(b"0\r\n\r\n")
                except OSError:
                    self.close_connection = True  # the agent gave up on this answer

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _forward

        self._server = QuietHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        threading.Thread(target=self._server.serve_forever, daemon=True, name="http-proxy").start()

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


# ---------------------------------------------------------------------------------------------- other ends


class Recorder:
    """A plain HTTP server on 127.0.0.1 that answers every request 200 `{}` and records it: the place a redirect
    points to, to see what reached it (`requests`: method, path, headers, body)."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, dict[str, str], bytes]] = []
        recorder = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_args: object) -> None:
                pass

            def _record(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                recorder.requests.append((self.command, self.path, dict(self.headers.items()), body))
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _record

        self._server = QuietHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        threading.Thread(target=self._server.serve_forever, daemon=True, name="recorder").start()

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class TLSProxy:
    """A TLS-terminating TCP proxy on 127.0.0.1 in front of a plain-HTTP OpenBao, with a server certificate the
    test chooses (expired, for another name, from another CA); `use(cert_pem, key_pem)` changes it for the
    connections that come next, as a Vault certificate rotation would."""

    def __init__(self, upstream_port: int, cert_pem: bytes, key_pem: bytes, workdir: Path) -> None:
        self.upstream_port = upstream_port
        self._dir = workdir
        self._n = 0
        self._context = self._make(cert_pem, key_pem)
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.port = int(self._sock.getsockname()[1])
        self._closed = False
        threading.Thread(target=self._accept, daemon=True, name="tls-proxy").start()

    @property
    def address(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def _make(self, cert_pem: bytes, key_pem: bytes) -> ssl.SSLContext:
        self._n += 1
        cert, key = self._dir / f"tls-proxy-{self._n}.crt", self._dir / f"tls-proxy-{self._n}.key"
        cert.write_bytes(cert_pem)
        key.write_bytes(key_pem)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        return context

    def use(self, cert_pem: bytes, key_pem: bytes) -> None:
        self._context = self._make(cert_pem, key_pem)

    def _accept(self) -> None:
        while not self._closed:
            try:
                raw, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(raw, self._context), daemon=True).start()

    def _serve(self, raw: socket.socket, context: ssl.SSLContext) -> None:
        try:
            raw.settimeout(10)
            client = context.wrap_socket(raw, server_side=True)
            client.settimeout(None)
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=5)
            upstream.settimeout(None)
        except OSError:  # the client gave up on the handshake (an untrusted certificate)
            with contextlib.suppress(OSError):
                raw.close()
            return
        threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()
        self._pump(client, upstream)

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.close()

    def close(self) -> None:
        self._closed = True
        self._sock.close()
