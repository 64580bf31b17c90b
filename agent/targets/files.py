"""The file target: a bundle published into its directory, kubelet AtomicWriter style (agent.publish), in a thread."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent import kinds, publish
from agent.targets import Published

if TYPE_CHECKING:
    from agent.config import FileBundle

__all__ = ["FileTarget"]


class FileTarget:
    """Publishes one bundle's files into `bundle.dir` with the kind's key files, modes and owner (a `Target`)."""

    def __init__(self, bundle: FileBundle, *, max_file_size: int = publish.MAX_FILE_SIZE) -> None:
        self.bundle = bundle
        self.kind = kinds.of(bundle)
        self.where = bundle.dir
        #: the largest file read back from the live generation (limits.max_secret_size)
        self.max_file_size = max_file_size

    def _options(self) -> dict[str, Any]:
        b, kind = self.bundle, self.kind
        return {"key_files": kind.key_files, "file_mode": b.file_mode, "key_mode": b.key_mode, "uid": b.uid,
                "gid": b.gid, "limit": self.max_file_size}

    async def publish(self, files: Mapping[str, bytes]) -> Published:
        """A new generation unless the live one matches (see `agent.publish.publish`), written in a thread.

        Raises:
            PublishError: the directory cannot be written, or holds a file the kind forbids.
        """
        result = await asyncio.to_thread(
            publish.publish, Path(self.bundle.dir), files, **self._options(), forbid=self.kind.forbidden
        )
        return Published(result.changed, result.generation)

    async def damaged(self, files: Mapping[str, bytes]) -> bool:
        """See `agent.publish.repair_needed` (read in a thread).

        Raises:
            PublishError: the directory cannot be read.
        """
        return await asyncio.to_thread(publish.repair_needed, Path(self.bundle.dir), files, **self._options())
