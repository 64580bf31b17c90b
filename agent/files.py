"""Reading a file the agent does not own (the service-account token, vault.ca_cert, a published generation) safely.

Only a regular file is read: the type is checked on the open descriptor (no race between a check and the open),
the open never blocks (O_NONBLOCK: a FIFO swapped in neither hangs the open nor the read), at most `limit` bytes are
read (a link to /dev/zero or a planted sparse file cannot grow memory), and the descriptor is closed whatever
happens. Symbolic links are followed: kubelet publishes projected tokens and ConfigMaps through `..data` links.

Blocking (a read of a local file): call it off the event loop (`asyncio.to_thread`).
"""

from __future__ import annotations

import errno
import os
import stat

from agent.text import shown

__all__ = ["FileProblem", "read_regular"]


class FileProblem(OSError):
    """A file that cannot be read safely; `str()` is one sentence naming it (`what` and the path) and the cause."""

    def __init__(self, message: str, *, missing: bool = False) -> None:
        super().__init__(message)
        self.message = message
        #: the file (or a directory on its path) does not exist
        self.missing = missing

    def __str__(self) -> str:
        return self.message


def read_regular(path: str, *, limit: int, what: str) -> bytes:
    """The bytes of the regular file `path`, at most `limit` of them.

    Raises:
        FileProblem: missing, not a regular file (FIFO, device, directory, socket), unreadable, or over `limit`
            bytes; the message names `what` and the (escaped) path.
    """
    where = f"{what} {shown(path)}"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except FileNotFoundError:
        raise FileProblem(f"{where} does not exist", missing=True) from None
    except OSError as exc:
        if exc.errno == errno.ENOTDIR:
            raise FileProblem(f"{where} does not exist (a part of its path is not a directory)", missing=True) from None
        raise FileProblem(f"{where} cannot be opened: {exc.strerror or type(exc).__name__}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise FileProblem(f"{where} is not a regular file ({_kind(info.st_mode)})")
        if info.st_size > limit:
            raise FileProblem(f"{where} is {info.st_size} bytes, over the {limit} bytes allowed")
        chunks: list[bytes] = []
        size = 0
        while True:
            chunk = os.read(fd, min(65536, limit + 1 - size))
            if not chunk:
                break
            size += len(chunk)
            if size > limit:
                raise FileProblem(f"{where} is over the {limit} bytes allowed")
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError as exc:
        if isinstance(exc, FileProblem):
            raise
        raise FileProblem(f"{where} cannot be read: {exc.strerror or type(exc).__name__}") from None
    finally:
        os.close(fd)


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISFIFO, "a FIFO"), (stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"
