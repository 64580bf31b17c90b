"""Process hardening at start: no core dumps, not dumpable (the process holds a CA key and a Vault token).

A crash must never write the key to disk, and another process of the same uid must not ptrace or read
/proc/PID/mem. Best effort: where the calls are refused (not Linux), the agent runs on and says so at debug.
"""

from __future__ import annotations

import ctypes
import resource

from agent.log import get_logger

__all__ = ["PR_GET_DUMPABLE", "PR_SET_DUMPABLE", "apply", "dumpable"]

#: prctl(2) options
PR_GET_DUMPABLE, PR_SET_DUMPABLE = 3, 4


def _libc() -> ctypes.CDLL | None:
    # the interpreter's own symbols include libc's (ctypes.util.find_library would spawn ldconfig: slow)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    return libc if hasattr(libc, "prctl") else None


def apply() -> None:
    """RLIMIT_CORE 0 and prctl(PR_SET_DUMPABLE, 0) for this process (inherited by nothing it execs)."""
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (OSError, ValueError) as exc:
        get_logger().debug("core_limit_not_set", error=type(exc).__name__)
    libc = _libc()
    if libc is None or libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        get_logger().debug("not_dumpable_not_set", errno=ctypes.get_errno() if libc else None)


def dumpable() -> int | None:
    """prctl(PR_GET_DUMPABLE) of this process (0: not dumpable), or None where it cannot be asked."""
    libc = _libc()
    return None if libc is None else int(libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0))
