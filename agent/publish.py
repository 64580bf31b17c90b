"""Atomic publishing of a bundle into a directory, kubelet AtomicWriter style.

Files go into a fresh hidden generation ``DIR/..<timestamp>``, one rename swaps the ``DIR/..data`` symlink
to it, and each visible ``DIR/<file>`` is a symlink to ``..data/<file>``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shutil
import stat
import tempfile
import time
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from agent.errors import PublishError
from agent.istiod_files import ISTIOD_SWITCHES
from agent.text import shown

__all__ = [
    "DATA",
    "ISTIOD_SWITCHES",
    "KEYS",
    "MAX_FILE_SIZE",
    "PublishResult",
    "check_dirs",
    "is_generation",
    "publish",
    "read_current",
    "repair_needed",
]

#: files written with ``key_mode`` (0600 by default) instead of ``file_mode``
KEYS: frozenset[str] = frozenset({"ca-key.pem", "tls.key"})
#: the symlink that names the live generation; readers resolve it once per read
DATA = "..data"

_DATA_TMP = "..data_tmp"
_LINK_TMP_PREFIX = "..tmp_"
# kubelet's generation names: ..2006_01_02_15_04_05.<random>
_GENERATION = re.compile(r"^\.\.\d{4}(?:_\d{2}){5}\.[A-Za-z0-9_]+$")
# never a bundle dir: the system's own directories
_SYSTEM_DIRS = frozenset({
    "/", "/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib64", "/opt", "/proc", "/root", "/run", "/sbin",
    "/srv", "/sys", "/tmp", "/usr", "/var", "/var/run", "/var/lib", "/var/tmp",
})
# a reader racing a publisher may find the generation it resolved already removed; it then resolves again
_READ_ATTEMPTS = 100
#: how long a publish waits for another process's lock on DIR (a publish holds it for milliseconds); bounded, since
#: the wait runs in a thread that neither SIGTERM nor init.timeout can stop
_LOCK_WAIT = 1.0
#: the largest file read back from a published generation unless the caller says otherwise (limits.max_secret_size's
#: default): a larger one planted there is never read, and counts as damage
MAX_FILE_SIZE = 1 << 20


@dataclass(frozen=True)
class PublishResult:
    """What `publish` did."""

    #: False when the live generation already held identical bytes and modes (nothing written, no swap)
    changed: bool
    #: name of the live ``..<timestamp>`` directory inside `path`
    generation: str
    #: the published directory
    path: Path


@dataclass(frozen=True)
class _Spec:
    """The wanted content of one generation."""

    files: Mapping[str, bytes]
    modes: Mapping[str, int]
    uid: int | None
    gid: int | None

    @classmethod
    def build(
        cls,
        files: Mapping[str, bytes],
        key_files: Collection[str],
        file_mode: int,
        key_mode: int,
        owner: tuple[int | None, int | None],
    ) -> _Spec:
        modes = {name: key_mode if name in key_files else file_mode for name in files}
        return cls(files, modes, owner[0], owner[1])


@dataclass(frozen=True)
class _Entry:
    data: bytes | None  # None: not a regular file
    mode: int
    uid: int
    gid: int


def publish(
    dir: Path,
    files: Mapping[str, bytes],
    *,
    key_files: Collection[str] = KEYS,
    file_mode: int = 0o644,
    key_mode: int = 0o600,
    uid: int | None = None,
    gid: int | None = None,
    forbid: Collection[str] = (),
    limit: int = MAX_FILE_SIZE,
) -> PublishResult:
    """Publish `files` into `dir` as one new generation, unless the live one already matches.

    `dir` is created (0755) if missing. Files named in `key_files` get `key_mode`, the others `file_mode`;
    each is chowned to `uid`/`gid` when given. Visible links for files no longer in `files`, leftovers of an
    interrupted publish and older generations are removed. Readers that resolve ``..data`` once see either
    the old or the new generation, never a mix.

    Raises:
        PublishError: a file name is in `forbid` or is not a plain name, a forbidden file already exists
            in `dir`, or the directory cannot be written; the previous generation then stays live.
    """
    dir = Path(dir)
    _check_names(dir, files, forbid)
    spec = _Spec.build(files, key_files, file_mode, key_mode, (uid, gid))
    try:
        _ensure_dir(dir)
        with _locked(dir) as dir_fd:
            _check_forbidden_entries(dir, forbid)
            live = _snapshot(dir, files, limit)
            if live is not None and _intact(dir, live, spec):
                _cleanup(dir, live[0], files)
                return PublishResult(changed=False, generation=live[0], path=dir)
            # keys first: a watcher that reacts to the first write then finds the key before the cert
            order = sorted(files, key=lambda name: (name not in key_files, name))
            generation = _write_generation(dir, dir_fd, spec, order)
            _link_visible(dir, files)
            _cleanup(dir, generation, files)
            _fsync_dir(dir_fd)
            return PublishResult(changed=True, generation=generation, path=dir)
    except OSError as exc:
        raise PublishError(_describe(dir, exc)) from exc


def read_current(dir: Path, *, limit: int = MAX_FILE_SIZE) -> dict[str, bytes] | None:
    """Return the live generation's regular files (resolved through ``..data`` once), or None if none.

    Anything else in the generation (a directory, a FIFO, a symlink, a file over `limit` bytes) is left out, unread.

    Raises:
        PublishError: the directory cannot be read.
    """
    try:
        live = _snapshot(Path(dir), None, limit)
    except OSError as exc:
        raise PublishError(_describe(Path(dir), exc)) from exc
    if live is None:
        return None
    return {name: entry.data for name, entry in live[1].items() if entry.data is not None}


def repair_needed(
    dir: Path,
    files: Mapping[str, bytes],
    *,
    key_files: Collection[str] = KEYS,
    file_mode: int = 0o644,
    key_mode: int = 0o600,
    uid: int | None = None,
    gid: int | None = None,
    limit: int = MAX_FILE_SIZE,
) -> bool:
    """Return True if ``..data``, a visible link, or a file's bytes, mode or owner differ from `files`.

    The sidecar uses this to notice tampering or loss; `publish` with the same arguments heals it. Pass the
    same `key_files`, modes and owner as to `publish`, or a bundle with custom modes always looks damaged. A live
    generation that cannot be read safely (a directory, a FIFO or an oversized file planted in it) is damaged; no
    file is read further than the bytes it is compared with.

    Raises:
        PublishError: the directory cannot be read.
    """
    dir = Path(dir)
    spec = _Spec.build(files, key_files, file_mode, key_mode, (uid, gid))
    try:
        live = _snapshot(dir, files, limit)
        return live is None or not _intact(dir, live, spec)
    except OSError as exc:
        raise PublishError(_describe(dir, exc)) from exc


def _check_names(dir: Path, files: Mapping[str, bytes], forbid: Collection[str]) -> None:
    for name in files:
        # names starting with '..' are ours (..data, generations, temp links), as in kubelet
        if not name or name == "." or "/" in name or "\0" in name or name.startswith(".."):
            raise PublishError(
                f"cannot publish {name!r} into {dir}: a file name must be a plain name without '/' "
                "that does not start with '..'."
            )
        if name in ISTIOD_SWITCHES:
            raise PublishError(f"refusing to publish {name} into {dir}: {ISTIOD_SWITCHES[name]}.")
        if name in forbid:
            raise PublishError(
                f"refusing to publish {name} into {dir}: istiod would read that directory in the "
                f"kubernetes.io/tls format, so an istio-ca bundle must not contain {name}."
            )


def _ensure_dir(dir: Path) -> None:
    try:
        st = os.stat(dir)  # follows a symlinked DIR; DIR may also be a mount point, which is never renamed
    except FileNotFoundError:
        _make_dirs(dir)
        return
    if not stat.S_ISDIR(st.st_mode):
        raise PublishError(f"cannot publish into {dir}: it exists and is not a directory; point dir at a directory.")


def _make_dirs(dir: Path) -> None:
    """Create `dir` and its missing parents, each 0755 whatever the umask (os.makedirs would leave parents at
    0777 under umask 000: any local user could then swap in a ..data of their own)."""
    missing: list[Path] = []
    here = dir
    while not here.exists():
        if os.path.islink(here):  # a dangling symlink: never create its target
            raise PublishError(f"cannot publish into {dir}: {here} is a symlink to nothing; point dir at a directory.")
        missing.append(here)
        here = here.parent
    for path in reversed(missing):
        with contextlib.suppress(FileExistsError):  # another publisher made it meanwhile
            os.mkdir(path, 0o700)
            # keep the set-group-ID bit inherited from a parent such as an fsGroup emptyDir, so the files below get
            # the pod's shared group (a 0640 key readable by a reader with another uid, as on OpenShift)
            inherited = os.stat(path).st_mode & stat.S_ISGID
            os.chmod(path, 0o755 | inherited)  # noqa: S103 - istiod often runs as another user and must read it


def is_generation(name: str) -> bool:
    """Whether `name`, an entry of a published directory, has the name of a generation ``..<timestamp>`` (the live
    one, or one that the next publish removes)."""
    return bool(_GENERATION.match(name))


def check_dirs(dirs: Sequence[tuple[str, str]]) -> None:
    """Refuse bundle directories that would step on each other or on the system, by their real paths.

    `dirs` holds (config key, dir) pairs, e.g. ("bundles[0].dir", "/var/run/secrets/istio-ca"). Refused: a
    dir that is not a directory, a symlink to nothing, a system directory, a dir inside another bundle's dir
    or inside a generation (``..data``, ``..<timestamp>``), and two names for one directory (a symlink alias).

    Raises:
        PublishError: one sentence naming the key and the conflict.
    """
    resolved: list[tuple[str, str, str]] = []
    for key, raw in dirs:
        label = _shown(raw)
        if os.path.islink(raw) and not os.path.exists(raw):
            raise PublishError(f"{key} {label} is a symlink to nothing; point it at a directory")
        if os.path.exists(raw) and not os.path.isdir(raw):
            raise PublishError(f"{key} {label} exists and is not a directory; point it at a directory")
        real = os.path.realpath(raw)
        parts = Path(real).parts
        if real in _SYSTEM_DIRS:
            raise PublishError(f"{key} {label} is the system directory {real}; use a directory of its own")
        if any(p in (DATA, _DATA_TMP) or _GENERATION.match(p) for p in parts):
            raise PublishError(
                f"{key} {label} lies inside a published generation ({real}); use a directory of its own"
            )
        resolved.append((key, label, real))
    for i, (key, label, real) in enumerate(resolved):
        for other_key, other_label, other_real in resolved[:i]:
            if real == other_real:
                raise PublishError(
                    f"{key} {label} and {other_key} {other_label} are the same directory ({real}); give each bundle"
                    " a directory of its own"
                )
            if real.startswith(other_real + os.sep):
                raise PublishError(f"{key} lies inside {other_key}; give each bundle a directory of its own")
            if other_real.startswith(real + os.sep):
                raise PublishError(f"{other_key} lies inside {key}; give each bundle a directory of its own")


def _shown(value: str) -> str:
    return repr(shown(value))


@contextlib.contextmanager
def _locked(dir: Path) -> Iterator[int]:
    """Hold an exclusive flock on DIR so two publishers never clean up each other's new generation."""
    fd = os.open(dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        deadline = time.monotonic() + _LOCK_WAIT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise PublishError(
                        f"{shown(str(dir))} is locked by another process (flock) for over {_LOCK_WAIT:g}s: stop the"
                        " other agent or tool publishing into that directory"
                    ) from None
                time.sleep(0.02)
                continue
            except OSError:
                pass  # best effort: some network filesystems refuse flock, and one publisher per DIR is the norm
            break
        yield fd
    finally:
        os.close(fd)  # also releases the lock, as SIGKILL would


def _check_forbidden_entries(dir: Path, forbid: Collection[str]) -> None:
    for name in forbid:
        path = dir / name
        try:
            target: str | None = os.readlink(path)
        except FileNotFoundError:
            continue
        except OSError:
            target = None  # exists and is not a symlink
        # our own visible link from an earlier bundle is removed after the swap; anything else is the user's
        if target != f"{DATA}/{name}" and name in ISTIOD_SWITCHES:
            raise PublishError(f"{path} exists, so {ISTIOD_SWITCHES[name]}; remove {path}.")
        if target != f"{DATA}/{name}":
            raise PublishError(
                f"{path} exists, so istiod would read {dir} in the kubernetes.io/tls format instead of "
                f"ca-cert.pem/ca-key.pem; remove {path}."
            )


def _live_generation(dir: Path) -> str | None:
    try:
        target = os.readlink(dir / DATA)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.EINVAL):  # EINVAL: ..data is not a symlink
            return None
        raise
    # only a generation of ours counts: ..data pointing elsewhere is tampering, not content to serve
    return target if _GENERATION.match(target) else None


def _snapshot(
    dir: Path, want: Mapping[str, bytes] | None = None, limit: int = MAX_FILE_SIZE
) -> tuple[str, dict[str, _Entry]] | None:
    """Resolve ``..data`` once and read that generation (see `_read_generation`); None if there is no live one."""
    for _ in range(_READ_ATTEMPTS):
        generation = _live_generation(dir)
        if generation is None:
            return None
        entries = _read_generation(dir / generation, want, limit)
        # a publish that swapped ..data meanwhile may be deleting this generation, and a listing taken during the
        # deletion is partial: take the read only if the generation was still live after it
        if entries is not None and _live_generation(dir) == generation:
            return generation, entries
    return None


def _read_generation(path: Path, want: Mapping[str, bytes] | None, limit: int) -> dict[str, _Entry] | None:
    """Read every entry of a generation; None if it vanished meanwhile (a concurrent publish removed it).

    Only regular files are read (checked on the open descriptor), never a symlink, never blocking (a FIFO), and
    never more than needed: compared with `want`, a file of another size is not read at all and one of the same
    size at most one byte past it; otherwise (`want` None) a file over `limit` bytes is not read. What is not read
    gets no data, which never matches: the generation counts as damaged and a fresh publish replaces it. A
    generation that is not a readable directory reads as empty, so damaged too.
    """
    try:
        names = os.listdir(path)
    except FileNotFoundError:
        return None
    except OSError:  # not a directory (planted), or unreadable
        return {}
    entries: dict[str, _Entry] = {}
    for name in names:
        try:
            # O_NOFOLLOW: never serve a symlink planted in a generation; O_NONBLOCK: never hang on a FIFO
            fd = os.open(path / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
        except FileNotFoundError:
            return None
        except OSError:  # a symlink (ELOOP), a socket (ENXIO), an unreadable file: its metadata only
            try:
                st = os.lstat(path / name)
            except FileNotFoundError:
                return None
            entries[name] = _Entry(None, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid)
            continue
        try:
            st = os.fstat(fd)
            # a name that is not wanted is compared with b"": read only when empty (it is damage either way)
            data = _read_entry(fd, st, None if want is None else want.get(name, b""), limit)
        finally:
            os.close(fd)
        entries[name] = _Entry(data, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid)
    return entries


def _read_entry(fd: int, st: os.stat_result, expected: bytes | None, limit: int) -> bytes | None:
    """The bytes of one open generation entry, or None when it is not read (see `_read_generation`)."""
    if not stat.S_ISREG(st.st_mode) or st.st_size > limit:
        return None
    if expected is not None and st.st_size != len(expected):
        return None  # differs already: never read
    try:
        return _read_at_most(fd, limit if expected is None else len(expected))
    except OSError:  # EIO and the like: unreadable, so damaged
        return None


def _read_at_most(fd: int, limit: int) -> bytes | None:
    """The bytes of `fd`, or None when it holds more than `limit` (it grew since its fstat)."""
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = os.read(fd, min(65536, limit + 1 - size))
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)


def _intact(dir: Path, live: tuple[str, dict[str, _Entry]], spec: _Spec) -> bool:
    _, entries = live
    if entries.keys() != spec.files.keys():
        return False
    for name, data in spec.files.items():
        entry = entries[name]
        if entry.data != data or entry.mode != spec.modes[name]:
            return False
        if (spec.uid is not None and entry.uid != spec.uid) or (spec.gid is not None and entry.gid != spec.gid):
            return False
        try:
            if os.readlink(dir / name) != f"{DATA}/{name}":
                return False
        except OSError:  # missing, or replaced by a regular file
            return False
    return True


def _write_generation(dir: Path, dir_fd: int, spec: _Spec, order: list[str]) -> str:
    """Write a complete new generation, then swap ``..data`` to it; on failure before the swap, remove it."""
    prefix = time.strftime("..%Y_%m_%d_%H_%M_%S.", time.gmtime())
    path = tempfile.mkdtemp(prefix=prefix, dir=dir)
    generation = os.path.basename(path)
    swapped = False
    try:
        for name in order:
            _write_file(Path(path) / name, spec.files[name], spec.modes[name], spec)
        os.chmod(path, 0o755)  # noqa: S103 - mkdtemp makes 0700; istiod may run as another user
        _fsync_path(path)
        tmp = dir / _DATA_TMP
        _remove_ours(tmp)  # left by a killed publish, or planted
        os.symlink(generation, tmp)
        data = dir / DATA
        if data.is_dir() and not data.is_symlink():
            shutil.rmtree(data)  # tampering: rename() cannot replace a real directory with a symlink
        os.rename(tmp, data)  # the one atomic step readers observe
        swapped = True
        _fsync_dir(dir_fd)
    except BaseException:
        if not swapped:
            shutil.rmtree(path, ignore_errors=True)
            with contextlib.suppress(OSError):
                os.unlink(dir / _DATA_TMP)
        raise
    return generation


def _write_file(path: Path, data: bytes, mode: int, spec: _Spec) -> None:
    # written under a name no reader takes, then renamed: a reader that walks into the generation before the swap
    # (istiod's kubeconfig directory reader does, and parses every .yaml file it finds) sees the file whole or not
    tmp = path.with_name(f".{path.name}.part")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fchmod(fd, mode)  # the umask may have cleared bits of mode
        if spec.uid is not None or spec.gid is not None:
            try:
                os.fchown(fd, -1 if spec.uid is None else spec.uid, -1 if spec.gid is None else spec.gid)
            except OSError as exc:
                raise PublishError(
                    f"cannot give {path.name} in {path.parent.parent} to uid {spec.uid} gid {spec.gid}: "
                    f"{_reason(exc)}; run the agent as root (or with CAP_CHOWN) or drop uid/gid from the bundle."
                ) from exc
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)


def _remove_ours(path: Path) -> None:
    """Remove whatever sits at one of our reserved temporary names (a link, a file, or a directory)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return
    except (IsADirectoryError, PermissionError):  # Linux answers EISDIR, POSIX allows EPERM for a directory
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            raise


def _link_visible(dir: Path, files: Mapping[str, bytes]) -> None:
    for name in files:
        link = dir / name
        want = f"{DATA}/{name}"
        with contextlib.suppress(OSError):
            if os.readlink(link) == want:
                continue
        # temp link + rename also replaces a regular file someone put in its place, atomically
        tmp = dir / f"{_LINK_TMP_PREFIX}{name}"
        _remove_ours(tmp)
        os.symlink(want, tmp)
        os.rename(tmp, link)


def _cleanup(dir: Path, live: str, files: Mapping[str, bytes]) -> None:
    """Remove stale visible links, temp links and every generation but the live one."""
    links: list[str] = []
    generations: list[str] = []
    with os.scandir(dir) as it:
        for entry in it:
            name = entry.name
            if name in (live, DATA):
                continue
            if _GENERATION.match(name):
                generations.append(entry.path)
            elif name == _DATA_TMP or name.startswith(_LINK_TMP_PREFIX):
                if entry.is_symlink():
                    links.append(entry.path)
            elif name not in files and entry.is_symlink() and os.readlink(entry.path) == f"{DATA}/{name}":
                links.append(entry.path)
    # links first, as kubelet does: no visible name ever points into a generation being removed
    for path in links:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    for path in generations:
        with contextlib.suppress(FileNotFoundError):
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.unlink(path)


def _fsync_path(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _fsync_dir(fd)
    finally:
        os.close(fd)


def _fsync_dir(fd: int) -> None:
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno != errno.EINVAL:  # some filesystems cannot fsync a directory; the rename still holds
            raise


def _reason(exc: OSError) -> str:
    return os.strerror(exc.errno).lower() if exc.errno else str(exc)


def _describe(dir: Path, exc: OSError) -> str:
    """One sentence naming DIR and what to fix, for an OSError met while publishing."""
    reason = _reason(exc)
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write {dir}: {reason}; mount a writable volume there (emptyDir) or run as a user that owns it."
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return f"cannot write {dir}: {reason}; free space on that volume or raise its size limit."
    if exc.errno in (errno.ENOTDIR, errno.ELOOP):
        return f"cannot use {dir}: {reason} in its path; point dir at a directory."
    return f"cannot publish into {dir}: {reason}; check that the directory is writable."
