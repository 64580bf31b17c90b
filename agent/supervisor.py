"""Run the agent's components as named tasks: the first one to fail stops the others and names itself.

The shape of kopf's `run_tasks`/`guard`: no ExceptionGroup ever reaches the user, and a bug in one
component is reported as one sentence naming the component.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine, Mapping
from typing import Any

from agent.errors import AgentError
from agent.log import get_logger

__all__ = ["TaskFailed", "supervise", "wait_event"]


class TaskFailed(AgentError):
    """A component stopped with an unexpected exception or returned when it should run until cancelled."""

    reason = "internal"


async def supervise(
    tasks: Mapping[str, Coroutine[Any, Any, None]], *, stop: asyncio.Event, until_all_done: bool
) -> None:
    """Run `tasks` (name -> coroutine) until `stop` is set, or until they are all done if `until_all_done`.

    Otherwise (the long-running mode) a task that returns is a failure too. On the first failure every
    other task is cancelled and awaited, then the failure is raised: an AgentError as it is, anything
    else as a TaskFailed naming the task. Cancelling `supervise` cancels every task.

    Raises:
        AgentError: the first failure.
    """
    log = get_logger()
    running: dict[asyncio.Task[Any], str] = {
        asyncio.create_task(coro, name=name): name for name, coro in tasks.items()
    }
    stopper: asyncio.Task[Any] = asyncio.create_task(stop.wait(), name="stop")
    failure: BaseException | None = None
    try:
        pending = set(running)
        while pending and failure is None:
            done, _ = await asyncio.wait({*pending, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if stopper in done:
                break
            for task in done:
                pending.discard(task)
                name = running[task]
                exc = task.exception()
                if isinstance(exc, AgentError):
                    failure = exc
                elif exc is not None:
                    log.error("task_failed", task=name, error=type(exc).__name__)
                    log.debug("task_traceback", task=name, exc_info=exc)  # tracebacks only at log.level debug
                    failure = TaskFailed(f"internal error in {name} ({type(exc).__name__}); please report it")
                elif not until_all_done:
                    failure = TaskFailed(f"internal error: {name} stopped unexpectedly; please report it")
                if failure is not None:
                    break
    finally:
        stopper.cancel()
        for task in running:
            task.cancel()
        for task in running:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
    if failure is not None:
        raise failure


async def wait_event(event: asyncio.Event, timeout: float) -> bool:
    """Wait until `event` is set (True) or `timeout` seconds pass (False).

    Not `asyncio.wait_for`: on Python 3.11 it swallows a cancellation that arrives just as the event is set, and a
    loop around it then never stops (SIGTERM left a sidecar running). `asyncio.timeout` tells its own cancellation
    from the caller's.
    """
    try:
        async with asyncio.timeout(max(0.0, timeout)):
            await event.wait()
    except TimeoutError:
        return False
    return True
