"""Sidecar mode: watch the published directories (heal tampering or loss).

The service-account token file is not watched: kubelet rotates it about every 48 minutes, and a login per rotation
would cost a TokenReview for nothing. The keeper reads the file at the next login it needs (expiry, revocation).

inotify first; where the node has none to spare (instances or watches exhausted), the same checks run every
`sidecar.poll_interval` instead, said once in the log and in `istio_vault_agent_file_watch_polling`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from agent.config import FileBundle, RemoteSecretBundle
from agent.log import get_logger
from agent.supervisor import wait_event

if TYPE_CHECKING:
    from agent.metrics import Metrics
    from agent.worker import BundleWorker

__all__ = ["FileWatcher"]

# kubelet and editors write in several steps: react once the burst is over
_DEBOUNCE = 0.1
#: inotify's limits, named in the warning so that an operator knows which sysctl ran out
_LIMITS = {errno.EMFILE: "fs.inotify.max_user_instances", errno.ENOSPC: "fs.inotify.max_user_watches"}


class FileWatcher:
    """A watchdog observer over the bundle dirs, feeding one asyncio task; polling every `poll_interval` seconds
    instead when inotify is unavailable."""

    def __init__(
        self,
        workers: Sequence[BundleWorker],
        *,
        poll_interval: float = 30.0,
        metrics: Metrics | None = None,
    ) -> None:
        self.workers = workers
        self.poll_interval = poll_interval
        self.metrics = metrics
        self._event = asyncio.Event()
        self._log = get_logger()

    def _observer(self) -> Any:
        """A started inotify observer over every watched dir, or None (after one warning) when inotify is
        unavailable."""
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer

        loop = asyncio.get_running_loop()
        observer = Observer()
        wake = self._event.set

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event: Any) -> None:
                if event.event_type in {"opened", "closed_no_write"}:
                    return
                with contextlib.suppress(RuntimeError):  # the loop is closing
                    loop.call_soon_threadsafe(wake)

        try:
            for worker in self.workers:
                # the runner watches file bundles only; the first pass published every bundle, so each dir exists
                assert isinstance(worker.cfg, FileBundle | RemoteSecretBundle)
                observer.schedule(Handler(), worker.cfg.dir, recursive=True)
            observer.daemon = True
            observer.start()
        except OSError as exc:
            with contextlib.suppress(Exception):
                observer.stop()
            self._polling(exc)
            return None
        return observer

    def _polling(self, exc: OSError | None) -> None:
        """Say once that changes are now found by polling, and why."""
        if exc is None:
            reason = "the inotify watcher stopped"
        else:
            limit = _LIMITS.get(exc.errno or 0)
            cause = os.strerror(exc.errno).lower() if exc.errno else type(exc).__name__
            reason = f"inotify is unavailable ({cause}" + (f"; raise {limit} on the node" if limit else "") + ")"
        self._log.warning("file_watch_polling", reason=reason, poll_interval=self.poll_interval)
        if self.metrics is not None:
            self.metrics.file_watch_polling(True)

    async def run(self) -> None:
        """React to file events until cancelled: repair every bundle dir."""
        observer = self._observer()
        if observer is not None and self.metrics is not None:
            self.metrics.file_watch_polling(False)
        # a first look right away: files may have changed between the first publish and now
        self._event.set()
        try:
            while True:
                # with inotify, the timeout only checks that the observer still runs; polling, it is the tick
                await wait_event(self._event, self.poll_interval)
                if observer is not None and not self._event.is_set():
                    if _running(observer):
                        continue
                    with contextlib.suppress(Exception):
                        observer.stop()
                    observer = None
                    self._polling(None)
                await asyncio.sleep(_DEBOUNCE)
                self._event.clear()
                for worker in self.workers:
                    await worker.repair()
        finally:
            if observer is not None:
                observer.stop()


def _running(observer: Any) -> bool:
    """The observer thread and each of its emitters are alive (an emitter dies when inotify fails later)."""
    return bool(observer.is_alive()) and all(emitter.is_alive() for emitter in observer.emitters)
