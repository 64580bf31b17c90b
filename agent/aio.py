"""aiohttp for the long-running agent, imported once and without the cost it has no use for.

At import, aiohttp builds two TLS contexts from the system's trust store (about 20 ms of CPU each, a third of the
import). The agent never uses them: its Vault and Kubernetes sessions always pass a context of their own (the
configured CA, or the system store loaded for that session). So the import runs with OpenSSL's default CA file and
directory pointed at nothing, and the environment is restored at once; a session that is handed no context of
its own would then trust nothing, which fails closed.
"""

from __future__ import annotations

import os
import sys
from types import ModuleType

__all__ = ["load"]

_DEFAULT_PATHS = ("SSL_CERT_FILE", "SSL_CERT_DIR")


def load() -> ModuleType:
    """The aiohttp module (imported on first use)."""
    loaded = sys.modules.get("aiohttp")
    if loaded is not None:
        return loaded
    saved = {name: os.environ.get(name) for name in _DEFAULT_PATHS}
    try:
        for name in _DEFAULT_PATHS:
            os.environ[name] = os.devnull
        import aiohttp
        import aiohttp.connector
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    return aiohttp
