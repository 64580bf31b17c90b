"""Logging: structlog events as JSON lines on stderr (console on request), with a last-line redaction guard.

Secrets never reach a log call in the first place; the guard only makes a mistake visible instead of a leak.
"""

from __future__ import annotations

import logging
import re
import sys
import time
import warnings
from collections.abc import MutableMapping
from typing import Any

import structlog

from agent.text import escape

__all__ = ["RateLimited", "configure", "escape_fields", "get_logger", "loop_exception_handler", "redact"]

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
        logger_factory=structlog.PrintLoggerFactory(stream or sys.stderr),
        cache_logger_on_first_use=False,
    )
    # Python warnings (cryptography warns about odd certificates) become log events, not stray stderr text
    warnings.showwarning = _log_warning
    # Libraries' own logging (asyncio, aiohttp, urllib3) becomes one rate-limited line each, never a traceback:
    # a flood of failing connections must not write a traceback per connection.
    root = logging.getLogger()
    if not any(isinstance(h, _Bridge) for h in root.handlers):
        root.addHandler(_Bridge(logging.WARNING))


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
