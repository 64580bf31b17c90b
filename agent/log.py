"""Logging: structlog events as JSON lines on stderr (console on request), with a last-line redaction guard.

Secrets never reach a log call in the first place; the guard only makes a mistake visible instead of a leak.
A log call never blocks: lines go into a bounded queue that one writer thread empties into stderr; when nobody
reads stderr fast enough, lines are dropped, counted (`dropped_lines`) and reported in one line once it drains.
"""

from __future__ import annotations

import atexit
import collections
import errno
import logging
import os
import re
import select
import sys
import threading
import time
import warnings
from collections.abc import MutableMapping
from typing import Any

import structlog

from agent.text import escape

__all__ = [
    "QUEUE_LINES",
    "RateLimited",
    "configure",
    "dropped_lines",
    "emit_line",
    "escape_fields",
    "get_logger",
    "loop_exception_handler",
    "redact",
    "shutdown",
]

_SENSITIVE_KEYS = re.compile(r"(token|secret|password|private|jwt|key_pem|client_token)", re.IGNORECASE)
# PEM private keys, Vault/OpenBao service tokens (hvs./s./b.), and JWTs
_SENSITIVE_TEXT = re.compile(
    r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?(-----END [A-Z ]*PRIVATE KEY-----|$)"
    r"|\b(hv[sbr]|s|b|r)\.[A-Za-z0-9_-]{20,}"
    r"|\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*",
    re.DOTALL,
)


#: the longest log field value (every piece of outside text in it is already cut to 200 characters)
_MAX_FIELD = 4000
#: lines waiting for stderr at most; more are dropped and counted (about 1 MB of JSON lines)
QUEUE_LINES = 1000
#: how long the exit waits for queued lines to reach stderr (a pipe nobody reads must not hold the exit up)
_EXIT_FLUSH_SECONDS = 1.0


def redact(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Replace values of secret-looking keys, and secret-looking text anywhere, with `[redacted]`."""
    for k, v in list(event.items()):
        if k != "event" and _SENSITIVE_KEYS.search(k) and not k.endswith(("_path", "_file", "_ttl")):
            event[k] = "[redacted]"
        elif isinstance(v, str):
            event[k] = _SENSITIVE_TEXT.sub("[redacted]", v)
    return event


def escape_fields(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Escape control characters in every string field (a newline or a terminal escape from outside text cannot
    fake a line, whatever the renderer) and cap each one."""
    for k, v in list(event.items()):
        if isinstance(v, str):
            event[k] = escape(v)[:_MAX_FIELD]
    return event


def configure(level: str = "info", fmt: str = "json", stream: Any = None) -> None:
    """Configure structlog for the process: one event per line on stderr."""
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=False) if fmt == "console" else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            redact,
            escape_fields,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=_QueueLoggerFactory(_WRITER.open(stream or sys.stderr)),
        cache_logger_on_first_use=False,
    )
    # Python warnings (cryptography warns about odd certificates) become log events, not stray stderr text
    warnings.showwarning = _log_warning
    # Libraries' own logging (asyncio, aiohttp, urllib3) becomes one rate-limited line each, never a traceback:
    # a flood of failing connections must not write a traceback per connection.
    root = logging.getLogger()
    if not any(isinstance(h, _Bridge) for h in root.handlers):
        root.addHandler(_Bridge(logging.WARNING))


class _Writer:
    """A bounded queue of lines and the daemon thread that writes them to one file descriptor.

    The thread writes with os.write on a duplicate of the stream's descriptor: no Python-level lock is shared with
    sys.stderr, so a write blocked on a full pipe never holds up the interpreter's own flush at exit. A stream
    without a descriptor (a StringIO in tests) cannot block and is written at once; no stream at all (the process
    started with stderr closed) discards the lines.
    """

    def __init__(self, capacity: int = QUEUE_LINES) -> None:
        self.capacity = capacity
        self._cond = threading.Condition()
        self._lines: collections.deque[str] = collections.deque()
        self._busy = False
        self._fd: int | None = None
        self._stream: Any = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        #: `open` was called: lines have a destination (or are discarded on purpose)
        self.opened = False
        #: lines lost since the start (queue full, or stderr gone)
        self.dropped = 0
        self._unreported = 0
        atexit.register(self.flush, _EXIT_FLUSH_SECONDS)

    def open(self, stream: Any) -> _Writer:
        """Write to `stream` from now on (lines still queued go to the new one)."""
        fd: int | None = None
        if stream is not None:
            try:
                stream.flush()
                fd = os.dup(stream.fileno())
            except (AttributeError, OSError, ValueError):
                fd = None  # no descriptor: written at once (it cannot block)
        with self._cond:
            old, self._fd, self._stream, self.opened = self._fd, fd, stream, True
        if old is not None:
            os.close(old)
        return self

    def writes_to(self, stream: Any) -> bool:
        """`open` was called with this very stream."""
        with self._cond:
            return self.opened and self._stream is stream

    def put(self, line: str) -> None:
        """Queue one line (without its newline); dropped and counted when the queue is full."""
        with self._cond:
            if self._fd is None:
                if self._stream is not None:
                    self._stream.write(line + "\n")
                    self._stream.flush()
                return
            if len(self._lines) >= self.capacity:
                self.dropped += 1
                self._unreported += 1
                return
            self._lines.append(line)
            self._cond.notify_all()
            if self._thread is None:
                self._stopping = False
                self._thread = threading.Thread(target=self._run, name="log-writer", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._lines and not self._stopping:
                    self._cond.wait()
                if not self._lines:  # stopping, and everything written
                    self._thread = None
                    self._cond.notify_all()
                    return
                line, fd, self._busy = self._lines.popleft(), self._fd, True
            written = fd is not None and _write_all(fd, (line + "\n").encode("utf-8", "replace"))
            with self._cond:
                self._busy = False
                if not written:
                    self.dropped += 1
                report = self._unreported if written and not self._lines else 0
                self._unreported -= report
                self._cond.notify_all()
            if report:
                # the queue drained: say once how many lines were lost (a line of the configured format)
                get_logger().warning("log_lines_dropped", dropped=report, reason="stderr was not read fast enough")

    def flush(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for every queued line to be written; True if they were."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._lines or self._busy:
                left = deadline - time.monotonic()
                if left <= 0 or self._thread is None:
                    return False
                self._cond.wait(left)
        return True

    def stop(self, timeout: float) -> bool:
        """Flush for up to `timeout` seconds and end the writer thread; True when it ended (lines queued later
        start a new one). A thread blocked on a pipe nobody reads is left behind, as a daemon."""
        deadline = time.monotonic() + timeout
        self.flush(timeout)
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(max(0.0, deadline - time.monotonic()))
        return thread is None or not thread.is_alive()


def _write_all(fd: int, data: bytes) -> bool:
    """Write all of `data` to `fd`, waiting while it is full; False when it is gone (closed, EPIPE, EBADF)."""
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:  # someone made the pipe non-blocking: wait until it takes more
            select.select([], [fd], [], 1.0)
        except InterruptedError:
            continue
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EINTR):
                continue
            return False
    return True


_WRITER = _Writer()


class _QueueLogger:
    """structlog's logger for rendered lines: every level method queues the line (see `_Writer`)."""

    def __init__(self, writer: _Writer) -> None:
        self._writer = writer

    def msg(self, message: str) -> None:
        self._writer.put(message)

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg


class _QueueLoggerFactory:
    def __init__(self, writer: _Writer) -> None:
        self._writer = writer

    def __call__(self, *_args: Any) -> _QueueLogger:
        return _QueueLogger(self._writer)


def emit_line(line: str) -> bool:
    """Queue one line of plain text (the `error:` line) behind the log lines, on the same stderr; False (and nothing
    queued) before `configure`, or when sys.stderr is no longer the stream it was configured with (the caller
    then prints the line itself, where stderr is now)."""
    if not _WRITER.writes_to(sys.stderr):
        return False
    _WRITER.put(line)
    return True


def dropped_lines() -> int:
    """How many log lines were dropped since the start (stderr full, or gone)."""
    return _WRITER.dropped


def shutdown(timeout: float = _EXIT_FLUSH_SECONDS) -> bool:
    """Write out the queued lines (waiting at most `timeout` seconds) and end the writer thread; True if it ended."""
    return _WRITER.stop(timeout)


class RateLimited:
    """Lets the same kind of message through once per `every` seconds, counting what it held back."""

    def __init__(self, every: float = 60.0) -> None:
        self.every = every
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def admit(self, key: str) -> int | None:
        """None to drop this one; else how many of its kind were dropped since the last one let through."""
        now = time.monotonic()
        if now - self._last.get(key, -self.every) < self.every:
            self._held[key] = self._held.get(key, 0) + 1
            return None
        self._last[key] = now
        return self._held.pop(key, 0)


_LIMIT = RateLimited()


class _Bridge(logging.Handler):
    """stdlib logging -> one structlog event per kind of message per minute, without tracebacks."""

    def emit(self, record: logging.LogRecord) -> None:
        key = f"{record.name}:{record.msg}"
        held = _LIMIT.admit(key)
        if held is None:
            return
        error = type(record.exc_info[1]).__name__ if record.exc_info and record.exc_info[1] else None
        get_logger().warning(
            "library_log", logger=record.name, message=str(record.msg)[:200], error=error, suppressed=held
        )


def loop_exception_handler(_loop: Any, context: dict[str, Any]) -> None:
    """asyncio's exception handler: one line per kind of failure per minute (accept() on EMFILE would otherwise
    log a traceback per attempt)."""
    exc = context.get("exception")
    message = str(context.get("message") or "asyncio error")[:200]
    held = _LIMIT.admit(f"asyncio:{message}:{type(exc).__name__}")
    if held is not None:
        get_logger().warning(
            "loop_error", message=message, error=type(exc).__name__ if exc else None, suppressed=held
        )


def _log_warning(message: Warning | str, category: type[Warning], *_args: Any, **_kwargs: Any) -> None:
    get_logger().warning("python_warning", category=category.__name__, message=str(message))


def get_logger(**fields: Any) -> Any:
    """A bound logger; modules call this at use time so `configure` takes effect."""
    return structlog.get_logger("istio-vault-agent", **fields)
