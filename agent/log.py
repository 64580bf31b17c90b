"""Logging: structlog events as JSON lines on stderr (console on request), with a last-line redaction guard.

Secrets never reach a log call in the first place; the guard only makes a mistake visible instead of a leak.
"""

from __future__ import annotations

import logging
import re
import sys
import warnings
from collections.abc import MutableMapping
from typing import Any

import structlog

__all__ = ["configure", "get_logger", "redact"]

_SENSITIVE_KEYS = re.compile(r"(token|secret|password|private|jwt|key_pem|client_token)", re.IGNORECASE)
# PEM private keys, Vault/OpenBao service tokens (hvs./s./b.), and JWTs
_SENSITIVE_TEXT = re.compile(
    r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?(-----END [A-Z ]*PRIVATE KEY-----|$)"
    r"|\b(hv[sbr]|s|b|r)\.[A-Za-z0-9_-]{20,}"
    r"|\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*",
    re.DOTALL,
)


def redact(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Replace values of secret-looking keys, and secret-looking text anywhere, with `[redacted]`."""
    for k, v in list(event.items()):
        if k != "event" and _SENSITIVE_KEYS.search(k) and not k.endswith(("_path", "_file", "_ttl")):
            event[k] = "[redacted]"
        elif isinstance(v, str):
            event[k] = _SENSITIVE_TEXT.sub("[redacted]", v)
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
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(stream or sys.stderr),
        cache_logger_on_first_use=False,
    )
    # Python warnings (cryptography warns about odd certificates) become log events, not stray stderr text
    warnings.showwarning = _log_warning


def _log_warning(message: Warning | str, category: type[Warning], *_args: Any, **_kwargs: Any) -> None:
    get_logger().warning("python_warning", category=category.__name__, message=str(message))


def get_logger(**fields: Any) -> Any:
    """A bound logger; modules call this at use time so `configure` takes effect."""
    return structlog.get_logger("istio-vault-agent", **fields)
