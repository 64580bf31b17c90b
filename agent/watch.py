"""Sidecar mode: watch the published directories (heal tampering or loss) and the service-account token
file (kubelet rotates it: log in again with the new one).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent import auth
from agent.log import get_logger

if TYPE_CHECKING:
    from agent.config import AuthConfig
    from agent.keeper import TokenKeeper
    from agent.worker import BundleWorker

__all__ = ["FileWatcher"]

# kubelet and editors write in several steps: react once the burst is over
_DEBOUNCE = 0.1


class FileWatcher:
    """A watchdog observer over the bundle dirs and the token file's dir, feeding one asyncio task."""

    def __init__(self, auth: AuthConfig, workers: Sequence[BundleWorker], keeper: TokenKeeper) -> None:
        self.auth = auth
        self.workers = workers
        self.keeper = keeper
        self._event = asyncio.Event()
        self._log = get_logger()

    def _observer(self) -> Any:
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

        token_dir = Path(self.auth.token_path).parent
        if self.auth.method != "token" and token_dir.is_dir():
            observer.schedule(Handler(), str(token_dir), recursive=False)
        for worker in self.workers:
            # the first pass published every bundle, so each dir exists
            observer.schedule(Handler(), worker.cfg.dir, recursive=True)
        observer.daemon = True
        observer.start()
        return observer

    async def run(self) -> None:
        """React to file events until cancelled: repair every bundle dir, log in again on a new SA token."""
        observer = self._observer()
        token_path = self.auth.token_path
        reported: str | None = None
        # a first look right away: files may have changed between the first publish and now
        self._event.set()
        try:
            while True:
                await self._event.wait()
                await asyncio.sleep(_DEBOUNCE)
                self._event.clear()
                for worker in self.workers:
                    await worker.repair()
                login = self.keeper.login
                used = login.credential_digest if login is not None else None
                token = _fingerprint(token_path)
                if used is not None and token is not None and token not in (used, reported):
                    reported = token  # once per new file, also while the re-login is still failing
                    self._log.info("sa_token_changed", token_path=token_path, mount=auth.mount_of(self.auth))
                    self.keeper.sa_token_changed()
        finally:
            observer.stop()


def _fingerprint(path: str) -> str | None:
    """The token file's `auth.credential_digest`, or None when it cannot be read (the token is never kept)."""
    try:
        return auth.credential_digest(Path(path).read_text(encoding="utf-8", errors="replace").strip())
    except OSError:
        return None
