"""Watch output directories the same way for both agents: stat the four visible files every few milliseconds.

A file counts as rewritten when what its visible path resolves to gets a new inode, mtime or size; the new
content then tells a real change from a redundant write (identical bytes). One thread serves every directory.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["DirState", "Watcher"]

_Key = tuple[int, int, int]


@dataclass
class DirState:
    """What the watcher knows of one output directory."""

    path: Path
    names: tuple[str, ...]
    keys: dict[str, _Key] = field(default_factory=dict)
    content: dict[str, bytes] = field(default_factory=dict)
    #: rewrites whose bytes equal the previous content (nothing changed in Vault)
    redundant: int = 0
    #: rewrites that brought new bytes
    changed: int = 0
    #: monotonic time of the last scan that changed anything
    last_change: float = 0.0


class Watcher:
    """Polls every registered directory each `interval` seconds in one daemon thread."""

    def __init__(self, interval: float = 0.01) -> None:
        """Create a watcher (not running); `start()` it."""
        self.interval = interval
        self._dirs: dict[str, DirState] = {}
        self._lock = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, label: str, path: Path, names: tuple[str, ...]) -> DirState:
        """Watch `names` in `path` under `label`; returns its state (read it under `snapshot()`)."""
        with self._lock:
            state = DirState(path, names)
            self._dirs[label] = state
            return state

    def start(self) -> Watcher:
        """Start polling; returns self."""
        self._thread = threading.Thread(target=self._run, name="dir-watcher", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop polling."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def counts(self, label: str) -> tuple[int, int]:
        """(redundant rewrites, changing rewrites) seen so far in `label`'s directory."""
        with self._lock:
            st = self._dirs[label]
            return st.redundant, st.changed

    def wait_for(self, label: str, expected: Mapping[str, bytes], timeout: float) -> float | None:
        """Block until every file of `label` holds `expected`; returns the monotonic time it was first seen.

        None when `timeout` seconds pass first. The time is the scan that saw it, so it is late by at most
        one polling interval.
        """
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                st = self._dirs[label]
                if all(st.content.get(n) == expected[n] for n in expected):
                    return st.last_change
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._stop.is_set():
                    return None
                self._lock.wait(min(remaining, 0.5))

    def _scan(self, st: DirState, now: float) -> bool:
        touched = False
        for name in st.names:
            path = os.path.join(st.path, name)
            try:
                s = os.stat(path)  # follows the ..data symlink of an AtomicWriter layout
            except OSError:
                continue
            key = (s.st_ino, s.st_mtime_ns, s.st_size)
            if st.keys.get(name) == key:
                continue
            try:
                with open(path, "rb") as fh:
                    data = fh.read()
            except OSError:
                continue
            had = name in st.keys
            st.keys[name] = key
            if had:
                if st.content.get(name) == data:
                    st.redundant += 1
                else:
                    st.changed += 1
            st.content[name] = data
            touched = True
        if touched:
            st.last_change = now
        return touched

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            with self._lock:
                if any([self._scan(st, now) for st in self._dirs.values()]):
                    self._lock.notify_all()
            self._stop.wait(self.interval)
