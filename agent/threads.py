"""Blocking calls that may hang (the kubernetes client, a Secret target's publish, reload actions) from asyncio, in
daemon threads of their own. Vault is not among them: agent.vault is async and cancellable.

Unlike `asyncio.to_thread`, an abandoned call never holds up `asyncio.run`'s executor shutdown: a cancelled
task cannot stop a thread, so a SIGTERM exit stays prompt while a hanging request runs out its own timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import threading
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["exit_now_if_abandoned", "offload"]

T = TypeVar("T")


async def offload(fn: Callable[..., T], *args: Any, name: str | None = None) -> T:
    """Run `fn(*args)` in a new daemon thread and await its result (or its exception)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if not future.done():
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)

    def run() -> None:
        try:
            result: Any = (True, fn(*args))
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task
            result = (False, exc)
        if not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed between the check and the call
                loop.call_soon_threadsafe(settle, *result)

    threading.Thread(target=run, name=name or getattr(fn, "__name__", "blocking-call"), daemon=True).start()
    return await future


def exit_now_if_abandoned(code: int) -> None:
    """Exit with `code` at once, skipping interpreter finalization, while a daemon thread still runs a call.

    An abandoned call (a hung Vault or Kubernetes API) that returns while the interpreter finalizes aborts the
    process (SIGABRT), so a clean SIGTERM would end in a crash; without such a thread this returns.
    """
    if not any(t.daemon and t.is_alive() for t in threading.enumerate()):
        return
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)
