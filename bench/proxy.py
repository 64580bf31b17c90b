"""A counting HTTP reverse proxy on loopback, put in front of OpenBao so both agents' requests are counted alike.

Each agent under measurement gets its own proxy; `count` is the number of requests it forwarded.
"""

from __future__ import annotations

import http.client
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

__all__ = ["CountingProxy"]

# Hop-by-hop headers (RFC 9110 section 7.6.1) are not forwarded.
_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer", "upgrade"}
)


class _QuietServer(ThreadingHTTPServer):
    """Quiet when a client goes away mid-request (an agent stopped at the end of a measurement resets its
    connections): no traceback from the handler thread in the output."""

    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        if isinstance(sys.exc_info()[1], OSError):
            return
        super().handle_error(request, client_address)  # type: ignore[arg-type]


class CountingProxy:
    """Forwards every request to `upstream` (plain HTTP on loopback) and counts it, with keep-alive on both sides."""

    def __init__(self, upstream: str) -> None:
        """Prepare a proxy to `upstream` (e.g. http://127.0.0.1:8200); `start()` binds a free loopback port."""
        parts = urlsplit(upstream)
        if parts.scheme != "http" or parts.hostname is None or parts.port is None:
            raise ValueError(f"upstream must be http://HOST:PORT, not {upstream!r}")
        self.upstream_host: str = parts.hostname
        self.upstream_port: int = parts.port
        self._lock = threading.Lock()
        self._count = 0
        self.paths: dict[str, int] = {}
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def count(self) -> int:
        """Requests forwarded so far."""
        with self._lock:
            return self._count

    @property
    def address(self) -> str:
        """The proxy's base URL, to give the agent as its Vault address."""
        if self._server is None:
            raise RuntimeError("the proxy is not started")
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def _record(self, method: str, path: str) -> None:
        key = f"{method} {path.split('?', 1)[0]}"
        with self._lock:
            self._count += 1
            self.paths[key] = self.paths.get(key, 0) + 1

    def start(self) -> CountingProxy:
        """Listen on 127.0.0.1 in a daemon thread; returns self."""
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            upstream: http.client.HTTPConnection | None = None

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                proxy._record(self.command, self.path)
                for attempt in range(2):
                    if self.upstream is None:
                        self.upstream = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port, timeout=60)
                    try:
                        self.upstream.request(self.command, self.path, body=body, headers=headers)
                        resp = self.upstream.getresponse()
                        data = resp.read()
                        break
                    except (OSError, http.client.HTTPException):
                        # a kept-alive upstream connection may have been closed by OpenBao: reconnect once
                        self.upstream.close()
                        self.upstream = None
                        if attempt:
                            self.send_error(502)
                            return
                self.send_response(resp.status, resp.reason)
                for key, value in resp.getheaders():
                    if key.lower() not in _HOP_BY_HOP and key.lower() not in ("content-length", "transfer-encoding"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_PATCH = do_HEAD = do_LIST = _forward

            def log_message(self, format: str, *args: object) -> None:
                return

            def finish(self) -> None:
                super().finish()
                if self.upstream is not None:
                    self.upstream.close()

        server = _QuietServer(("127.0.0.1", 0), Handler)
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="counting-proxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
