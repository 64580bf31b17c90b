"""The kubeconfig-files target: a remote-secret bundle with target files, its set of remote kubeconfigs published as
`<cluster>.yaml` files in one generation of its directory (agent.publish), which istiod 1.30+ reads as
PILOT_MULTICLUSTER_KUBECONFIG_PATH.

How istiod reads that directory (pkg/kube/krt/files/files.go, FolderWatch.readOnce; pkg/kube/multicluster/
kubeconfig_files.go, NewKubeconfigCollection): `filepath.Walk` from the directory, which descends into every real
subdirectory, dot-names included, and never follows a symlink; it parses each regular file whose extension is
`.yaml` or `.yml` and skips every other entry; the first file that fails makes the whole read fail. A debounced
fsnotify watch on the directory and its subdirectories triggers each read. So of the publisher's layout istiod reads
exactly the regular files inside the generation directories ``..<timestamp>/<cluster>.yaml``: ``..data`` and the
visible ``<cluster>.yaml`` names are symlinks, which it skips. A read that falls inside a publish may see the old and
the new generation side by side; istiod then keeps each cluster as it was (two files for one cluster ID: a conflict,
getClusterEntry; a file being written: a failed read), and the read the swap's cleanup triggers sees the new set
alone. Hence the file names (`.yaml`: a bare `<cluster>` would never be read) and the refusal of anything else in the
directory that istiod would read too.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from agent import publish
from agent.errors import PublishError
from agent.targets import Published
from agent.text import shown

if TYPE_CHECKING:
    from agent.config import RemoteSecretBundle

__all__ = ["KubeconfigFilesTarget", "file_name", "foreign_entry", "stale_generations", "symlinked"]

#: the extensions istiod's folder reader parses (krt/files supportedExtensions)
READ_EXTENSIONS = (".yaml", ".yml")


def file_name(cluster: str) -> str:
    """`<cluster>.yaml`: the file a remote cluster's kubeconfig is published as (istiod reads .yaml and .yml only)."""
    return f"{cluster}.yaml"


def foreign_entry(directory: Path) -> str | None:
    """One sentence naming an entry of `directory` that istiod would read as a kubeconfig besides the agent's
    (a regular .yaml/.yml file, whatever its name, or a real subdirectory other than a generation or ``..data``),
    or None when there is none.

    Symlinks are never foreign: istiod's walk neither reads nor follows one. A regular file or a directory under a
    name of the publisher's temporary links (``..tmp_<file>``, ``..data_tmp``) is: istiod reads it, and a publish
    never removes it.
    """
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise PublishError(f"cannot read {shown(str(directory))}: {exc.strerror or exc}; check that it is a"
                           " directory the agent may read.") from None
    for entry in sorted(entries, key=lambda e: e.name):
        if entry.is_symlink():
            continue
        path = shown(str(directory / entry.name))
        if entry.is_dir(follow_symlinks=False):
            # a generation, live or stale (the next publish removes it), or a real ..data (a publish replaces it)
            if entry.name == publish.DATA or publish.is_generation(entry.name):
                continue
            return (f"{path} is a directory, and istiod reads every .yaml file below PILOT_MULTICLUSTER_KUBECONFIG_PATH"
                    f" as a remote kubeconfig: remove it, or publish into a directory of its own")
        if entry.is_file(follow_symlinks=False) and entry.name.endswith(READ_EXTENSIONS):
            return (f"{path} is a file the agent did not publish, and istiod would read it as a remote kubeconfig"
                    f" (one bad file stops all its updates): remove it, or publish into a directory of its own")
    return None


def symlinked(directory: Path) -> str | None:
    """One sentence when `directory` itself is a symlink, else None: istiod's walk of
    PILOT_MULTICLUSTER_KUBECONFIG_PATH does not follow a symlink there (Go's filepath.Walk lstats its root), so it
    would read no remote cluster at all."""
    if not os.path.islink(directory):
        return None
    return (f"{shown(str(directory))} is a symlink (to {shown(os.path.realpath(directory))}), and istiod does not"
            " follow a symlink at PILOT_MULTICLUSTER_KUBECONFIG_PATH, so it would read no remote cluster: point dir"
            " and PILOT_MULTICLUSTER_KUBECONFIG_PATH at the real directory")


def stale_generations(directory: Path) -> bool:
    """Whether `directory` holds more than one generation: istiod reads the files of every one (a stale generation's
    clusters conflict with the live ones), and a publish removes all but the live one."""
    try:
        return sum(1 for e in os.scandir(directory)
                   if publish.is_generation(e.name) and e.is_dir(follow_symlinks=False)) > 1
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise PublishError(f"cannot read {shown(str(directory))}: {exc.strerror or exc}; check that it is a"
                           " directory the agent may read.") from None


class KubeconfigFilesTarget:
    """Publishes a remote-secret bundle's set {cluster: kubeconfig} into `bundle.dir` as one generation (a `Target`).

    Every file is a credential: it gets `key_mode` (0600 by default; 0640 with a gid the reader shares).
    """

    def __init__(self, bundle: RemoteSecretBundle, *, max_file_size: int = publish.MAX_FILE_SIZE) -> None:
        self.bundle = bundle
        self.where = bundle.dir
        self.max_file_size = max_file_size

    def _files(self, files: Mapping[str, bytes]) -> dict[str, bytes]:
        return {file_name(cluster): data for cluster, data in files.items()}

    def _publish(self, files: Mapping[str, bytes]) -> publish.PublishResult:
        problem = symlinked(Path(self.bundle.dir)) or foreign_entry(Path(self.bundle.dir))
        if problem is not None:
            raise PublishError(problem)
        names, b = self._files(files), self.bundle
        return publish.publish(Path(b.dir), names, key_files=frozenset(names), file_mode=b.key_mode,
                               key_mode=b.key_mode, uid=b.uid, gid=b.gid, limit=self.max_file_size)

    def _damaged(self, files: Mapping[str, bytes]) -> bool:
        directory = Path(self.bundle.dir)
        if symlinked(directory) or foreign_entry(directory) is not None:
            return True  # the publish that follows says what istiod would also read, and refuses
        if stale_generations(directory):
            return True  # the publish that follows removes it
        names, b = self._files(files), self.bundle
        return publish.repair_needed(Path(b.dir), names, key_files=frozenset(names), file_mode=b.key_mode,
                                     key_mode=b.key_mode, uid=b.uid, gid=b.gid, limit=self.max_file_size)

    async def publish(self, files: Mapping[str, bytes]) -> Published:
        """Publish the whole set as one new generation unless the live one matches (`agent.publish.publish`).

        Raises:
            PublishError: the directory cannot be written, or holds an entry istiod would also read.
        """
        result = await asyncio.to_thread(self._publish, files)
        return Published(result.changed, result.generation)

    async def damaged(self, files: Mapping[str, bytes]) -> bool:
        """See `agent.publish.repair_needed` (read in a thread); also True when the directory holds an entry istiod
        would read besides the set (the publish then refuses, naming it).

        Raises:
            PublishError: the directory cannot be read.
        """
        return await asyncio.to_thread(self._damaged, files)
