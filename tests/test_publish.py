"""Tests for agent.publish: the ..data layout, modes, change detection, healing, failures and crash safety."""

from __future__ import annotations

import errno
import os
import random
import re
import resource
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.errors import PublishError
from agent.kinds import ISTIO_CA
from agent.publish import DATA, publish, read_current, repair_needed

REPO = Path(__file__).resolve().parents[1]
GENERATION = re.compile(r"^\.\.\d{4}(?:_\d{2}){5}\.\w+$")
NAMES = ("ca-key.pem", "ca-cert.pem", "root-cert.pem", "cert-chain.pem")


def bundle(gen: int, size: int = 1) -> dict[str, bytes]:
    """Four files that all carry generation number `gen`, `size` lines each."""
    return {name: f"{name} {gen:012d}\n".encode() * size for name in NAMES}


def generation_of(files: dict[str, bytes], size: int = 1) -> int:
    """The one generation number all files carry; fails on a mix or a truncated file."""
    gens = set()
    for name, data in files.items():
        line = data.split(b"\n", 1)[0]
        gen = int(line.split()[1])
        assert data == f"{name} {gen:012d}\n".encode() * size, f"{name} is partial or mixed"
        gens.add(gen)
    assert len(gens) == 1, f"files from different generations: {sorted(gens)}"
    return gens.pop()


def generations(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if GENERATION.match(p.name))


def leftovers(out: Path) -> list[str]:
    """Hidden entries that are neither ..data nor the live generation."""
    live = os.readlink(out / DATA)
    return sorted(p.name for p in out.iterdir() if p.name.startswith("..") and p.name not in (DATA, live))


@pytest.fixture(name="out")
def fixture_out(tmp_path: Path) -> Path:
    return tmp_path / "istio-ca"


class TestLayout:
    def test_creates_dir_hidden_generation_and_visible_links(self, out: Path) -> None:
        """A first publish creates DIR (0755), one hidden generation, ..data and one visible link per file."""
        result = publish(out, bundle(1))
        assert result.changed
        assert result.path == out
        assert stat.S_IMODE(out.stat().st_mode) == 0o755
        assert generations(out) == [result.generation]
        assert os.readlink(out / DATA) == result.generation
        for name in NAMES:
            assert os.readlink(out / name) == f"{DATA}/{name}"
            assert (out / name).read_bytes() == bundle(1)[name]
        assert sorted(p.name for p in out.iterdir()) == sorted([DATA, result.generation, *NAMES])
        assert stat.S_IMODE((out / result.generation).stat().st_mode) == 0o755

    def test_new_content_swaps_generation_and_removes_old(self, out: Path) -> None:
        """Changed content goes into a new generation, ..data moves to it and the old one is removed."""
        first = publish(out, bundle(1))
        second = publish(out, bundle(2))
        assert second.changed
        assert second.generation != first.generation
        assert generations(out) == [second.generation]
        assert read_current(out) == bundle(2)
        assert (out / "ca-cert.pem").read_bytes() == bundle(2)["ca-cert.pem"]

    def test_removed_file_loses_its_visible_link(self, out: Path) -> None:
        """A file dropped from the bundle disappears from DIR; a new one appears."""
        publish(out, {"ca-key.pem": b"k", "ca-crl.pem": b"crl"})
        publish(out, {"ca-key.pem": b"k", "root-cert.pem": b"r"})
        assert not os.path.lexists(out / "ca-crl.pem")
        assert (out / "root-cert.pem").read_bytes() == b"r"
        assert read_current(out) == {"ca-key.pem": b"k", "root-cert.pem": b"r"}

    def test_unrelated_files_are_left_alone(self, out: Path) -> None:
        """Files the agent did not create stay where they are."""
        out.mkdir()
        (out / "README").write_text("mine")
        publish(out, bundle(1))
        publish(out, bundle(2))
        assert (out / "README").read_text() == "mine"

    def test_dir_may_be_an_existing_mount_point(self, out: Path) -> None:
        """An existing DIR (such as an emptyDir mount) keeps its inode and mode: it is never renamed."""
        out.mkdir(mode=0o770)
        os.chmod(out, 0o770)
        inode = out.stat().st_ino
        publish(out, bundle(1))
        publish(out, bundle(2))
        assert out.stat().st_ino == inode
        assert stat.S_IMODE(out.stat().st_mode) == 0o770

    def test_read_current_without_generation(self, out: Path) -> None:
        """read_current is None for a missing or never-published directory."""
        assert read_current(out) is None
        out.mkdir()
        assert read_current(out) is None

    @pytest.mark.parametrize("name", ["../evil", "..data", "a/b", ""])
    def test_bad_file_name_is_refused(self, out: Path, name: str) -> None:
        """A file name that could escape DIR or clash with ..data is refused before anything is written."""
        with pytest.raises(PublishError, match="plain name"):
            publish(out, {name: b"x"})
        assert not out.exists()


class TestModes:
    def test_keys_0600_others_0644(self, out: Path) -> None:
        """ca-key.pem and tls.key are 0600, everything else 0644, whatever the umask."""
        old = os.umask(0o077)
        try:
            result = publish(out, {**bundle(1), "tls.key": b"k", "ca.crt": b"c"})
        finally:
            os.umask(old)
        gen = out / result.generation
        assert stat.S_IMODE((gen / "ca-key.pem").stat().st_mode) == 0o600
        assert stat.S_IMODE((gen / "tls.key").stat().st_mode) == 0o600
        for name in ("ca-cert.pem", "root-cert.pem", "cert-chain.pem", "ca.crt"):
            assert stat.S_IMODE((gen / name).stat().st_mode) == 0o644, name

    def test_custom_modes(self, out: Path) -> None:
        """key_mode, file_mode and key_files are honoured."""
        result = publish(out, bundle(1), key_mode=0o640, file_mode=0o444, key_files={"root-cert.pem"})
        gen = out / result.generation
        assert stat.S_IMODE((gen / "root-cert.pem").stat().st_mode) == 0o640
        assert stat.S_IMODE((gen / "ca-key.pem").stat().st_mode) == 0o444

    def test_mode_change_alone_republishes(self, out: Path) -> None:
        """Same bytes with a different key_mode is a change."""
        publish(out, bundle(1))
        result = publish(out, bundle(1), key_mode=0o640)
        assert result.changed
        assert stat.S_IMODE((out / DATA / "ca-key.pem").stat().st_mode) == 0o640

    @pytest.mark.skipif(os.getuid() != 0, reason="chown to another user needs root")
    def test_uid_gid(self, out: Path) -> None:
        """uid/gid are applied to every file, and a different owner is a change."""
        publish(out, bundle(1), uid=1234, gid=5678)
        for name in NAMES:
            st = (out / DATA / name).stat()
            assert (st.st_uid, st.st_gid) == (1234, 5678)
        assert not publish(out, bundle(1), uid=1234, gid=5678).changed
        assert not repair_needed(out, bundle(1), uid=1234, gid=5678)
        assert repair_needed(out, bundle(1), uid=1337, gid=5678)
        assert publish(out, bundle(1), uid=1337).changed
        assert (out / DATA / "ca-key.pem").stat().st_uid == 1337


@pytest.fixture(name="shared_group_dir")
def fixture_shared_group_dir() -> Iterator[Path]:
    """A directory like kubelet's emptyDir for a pod with an fsGroup: set-group-ID, owned by group 5555, traversable
    by other users (pytest's tmp_path is not)."""
    base = Path(tempfile.mkdtemp(prefix="fsgroup-"))
    try:
        base.chmod(0o711)
        shared = base / "istio-ca"
        shared.mkdir()
        os.chown(shared, 0, FS_GROUP)
        shared.chmod(0o2775)
        yield shared
    finally:
        shutil.rmtree(base)


#: the pod's fsGroup in TestSharedGroup, and two reader uids (OpenShift assigns uids from a namespace range)
FS_GROUP = 5555
READER_UID = 1000670000


@pytest.mark.skipif(os.getuid() != 0, reason="a group and readers other than the test's own need root")
class TestSharedGroup:
    def test_key_0640_in_an_fsgroup_volume_is_readable_by_another_uid_in_the_group(self, shared_group_dir):
        """OpenShift's way (no pinned uid, key_mode 0640): a bundle published into a subdirectory of the fsGroup
        volume carries the pod's group, so a reader with another uid but that group reads the key, and a reader
        outside the group cannot."""
        out = shared_group_dir / "ingress-cert"
        publish(out, {"tls.key": b"key", "tls.crt": b"crt"}, key_mode=0o640)
        assert out.stat().st_mode & stat.S_ISGID, "the bundle dir dropped the set-group-ID bit it inherited"
        for name in ("tls.key", "tls.crt"):
            assert (out / DATA / name).stat().st_gid == FS_GROUP, name
        key = str(out / "tls.key")
        inside = subprocess.run(["cat", key], user=READER_UID, group=READER_UID, extra_groups=[FS_GROUP],
                                capture_output=True, timeout=10, check=False)
        assert (inside.returncode, inside.stdout) == (0, b"key"), inside.stderr
        outside = subprocess.run(["cat", key], user=READER_UID, group=READER_UID, extra_groups=[],
                                 capture_output=True, timeout=10, check=False)
        assert outside.returncode != 0 and b"Permission denied" in outside.stderr


class TestUnchanged:
    def test_identical_content_writes_nothing(self, out: Path) -> None:
        """Publishing identical bytes again keeps the generation and all mtimes."""
        first = publish(out, bundle(1))
        gen = out / first.generation
        before = {p.name: p.stat().st_mtime_ns for p in gen.iterdir()}
        gen_mtime = gen.stat().st_mtime_ns
        data_mtime = os.lstat(out / DATA).st_mtime_ns
        second = publish(out, bundle(1))
        assert not second.changed
        assert second.generation == first.generation
        assert {p.name: p.stat().st_mtime_ns for p in gen.iterdir()} == before
        assert gen.stat().st_mtime_ns == gen_mtime
        assert os.lstat(out / DATA).st_mtime_ns == data_mtime
        assert not repair_needed(out, bundle(1))

    def test_different_content_needs_publish(self, out: Path) -> None:
        """repair_needed reports a bundle that differs from the live one."""
        publish(out, bundle(1))
        assert repair_needed(out, bundle(2))
        assert repair_needed(out, {**bundle(1), "ca-crl.pem": b"crl"})


class TestTamper:
    def test_deleted_visible_link_is_healed(self, out: Path) -> None:
        """A deleted visible link is noticed and a new generation restores it."""
        first = publish(out, bundle(1))
        (out / "ca-cert.pem").unlink()
        assert repair_needed(out, bundle(1))
        result = publish(out, bundle(1))
        assert result.changed
        assert result.generation != first.generation
        assert (out / "ca-cert.pem").read_bytes() == bundle(1)["ca-cert.pem"]
        assert not repair_needed(out, bundle(1))

    def test_visible_link_replaced_by_regular_file_is_healed(self, out: Path) -> None:
        """A regular file put in place of a visible link is replaced by the link again."""
        publish(out, bundle(1))
        (out / "root-cert.pem").unlink()
        (out / "root-cert.pem").write_bytes(b"forged")
        assert repair_needed(out, bundle(1))
        publish(out, bundle(1))
        assert os.readlink(out / "root-cert.pem") == f"{DATA}/root-cert.pem"
        assert (out / "root-cert.pem").read_bytes() == bundle(1)["root-cert.pem"]

    def test_deleted_data_link_is_healed(self, out: Path) -> None:
        """A deleted ..data is noticed; publish makes a new generation and removes the orphaned one."""
        first = publish(out, bundle(1))
        (out / DATA).unlink()
        assert read_current(out) is None
        assert repair_needed(out, bundle(1))
        result = publish(out, bundle(1))
        assert result.changed
        assert generations(out) == [result.generation] != [first.generation]
        assert read_current(out) == bundle(1)

    def test_data_replaced_by_directory_is_healed(self, out: Path) -> None:
        """A real directory named ..data is replaced by the symlink."""
        publish(out, bundle(1))
        (out / DATA).unlink()
        (out / DATA).mkdir()
        (out / DATA / "ca-key.pem").write_bytes(b"forged")
        assert repair_needed(out, bundle(1))
        publish(out, bundle(1))
        assert (out / DATA).is_symlink()
        assert read_current(out) == bundle(1)

    def test_altered_file_is_healed(self, out: Path) -> None:
        """A file whose bytes were changed in place is noticed and republished."""
        publish(out, bundle(1))
        (out / DATA / "ca-key.pem").write_bytes(b"forged")
        assert repair_needed(out, bundle(1))
        assert publish(out, bundle(1)).changed
        assert (out / "ca-key.pem").read_bytes() == bundle(1)["ca-key.pem"]

    def test_chmod_key_is_healed(self, out: Path) -> None:
        """A key made world-readable is noticed and republished 0600."""
        publish(out, bundle(1))
        os.chmod(out / DATA / "ca-key.pem", 0o644)
        assert repair_needed(out, bundle(1))
        publish(out, bundle(1))
        assert stat.S_IMODE((out / DATA / "ca-key.pem").stat().st_mode) == 0o600

    def test_extra_file_in_generation_is_healed(self, out: Path) -> None:
        """A file planted in the live generation is noticed and dropped."""
        publish(out, bundle(1))
        (out / DATA / "tls.crt").write_bytes(b"planted")
        assert repair_needed(out, bundle(1))
        publish(out, bundle(1))
        assert read_current(out) == bundle(1)

    def test_missing_dir_needs_repair(self, out: Path) -> None:
        """A directory that does not exist needs a publish."""
        assert repair_needed(out, bundle(1))


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class TestUnreadableGeneration:
    def test_a_planted_subdirectory_is_damage_not_an_error(self, out: Path) -> None:
        """A directory planted in the live generation makes it damaged (no error, no descriptor left open), and
        a publish replaces it; read_current leaves it out."""
        publish(out, bundle(1))
        (out / DATA / "sub").mkdir()
        assert read_current(out) == bundle(1)
        before = _open_fds()
        for _ in range(20):
            assert repair_needed(out, bundle(1))
        assert _open_fds() == before
        result = publish(out, bundle(1))
        assert result.changed and read_current(out) == bundle(1)
        assert not (out / DATA / "sub").exists() and not repair_needed(out, bundle(1))
        assert _open_fds() == before

    def test_a_planted_sparse_file_is_never_read(self, out: Path) -> None:
        """A 300 MiB sparse file planted in the live generation is damage found without reading it: the peak of
        Python allocations during the check and the publish stays far below its size."""
        import tracemalloc

        publish(out, bundle(1))
        with (out / DATA / "ca-cert.pem.bak").open("wb") as f:
            f.truncate(300 << 20)
        with (out / DATA / "ca-cert.pem").open("r+b") as f:  # the same name too, now huge
            f.truncate(300 << 20)
        tracemalloc.start()
        try:
            assert repair_needed(out, bundle(1))
            assert "ca-cert.pem" not in (read_current(out) or {})
            assert publish(out, bundle(1)).changed
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 4 << 20, peak
        assert read_current(out) == bundle(1)

    def test_a_file_over_the_limit_is_left_out(self, out: Path) -> None:
        """read_current reads no file over its `limit`, and a file of the wanted size is read up to it only."""
        publish(out, bundle(1, size=100))
        assert read_current(out, limit=100) == {}
        assert read_current(out) == bundle(1, size=100)
        assert not repair_needed(out, bundle(1, size=100), limit=1 << 20)

    @pytest.mark.parametrize("what", ["fifo", "file"])
    def test_a_generation_that_is_not_a_directory(self, out: Path, what: str) -> None:
        """..data pointing at a FIFO or a regular file named like a generation is damage, healed by a publish."""
        publish(out, bundle(1))
        fake = out / "..2020_01_01_00_00_00.planted"
        if what == "fifo":
            os.mkfifo(fake)
        else:
            fake.write_bytes(b"x")
        os.symlink(fake.name, out / "..data_new")
        os.rename(out / "..data_new", out / DATA)
        assert repair_needed(out, bundle(1))
        assert publish(out, bundle(1)).changed
        assert read_current(out) == bundle(1) and not fake.exists()


class TestForbid:
    def test_tls_crt_in_bundle_is_refused(self, out: Path) -> None:
        """An istio-ca bundle carrying tls.crt is refused and nothing is written."""
        with pytest.raises(PublishError, match=r"tls\.crt.*kubernetes\.io/tls"):
            publish(out, {**bundle(1), "tls.crt": b"c"}, forbid=("tls.crt",))
        assert not out.exists()

    def test_existing_tls_crt_file_is_refused(self, out: Path) -> None:
        """A user's regular tls.crt in the directory stops the publish with a message to remove it."""
        publish(out, bundle(1), forbid=("tls.crt",))
        (out / "tls.crt").write_bytes(b"old")
        with pytest.raises(PublishError, match=r"remove .*tls\.crt"):
            publish(out, bundle(2), forbid=("tls.crt",))
        assert read_current(out) == bundle(1)

    def test_own_tls_link_from_earlier_bundle_is_removed(self, out: Path) -> None:
        """Switching a directory from a tls bundle to an istio-ca bundle removes the old tls.crt link."""
        publish(out, {"tls.crt": b"c", "tls.key": b"k", "ca.crt": b"r"})
        publish(out, bundle(1), forbid=("tls.crt",))
        assert not os.path.lexists(out / "tls.crt")
        assert not os.path.lexists(out / "tls.key")
        assert read_current(out) == bundle(1)


    @pytest.mark.parametrize("forbid", [(), ("tls.crt",)])
    def test_istio_generated_is_never_published(self, out: Path, forbid: tuple[str, ...]) -> None:
        """A file set holding istio-generated (istiod's switch away from the plugged-in CA) is refused whatever
        the bundle, in one sentence, and the live generation stays."""
        publish(out, bundle(1))
        with pytest.raises(PublishError) as info:
            publish(out, {**bundle(2), "istio-generated": b""}, forbid=forbid)
        message = str(info.value)
        assert "istio-generated" in message and "USE_CACERTS_FOR_SELF_SIGNED_CA" in message, message
        assert "\n" not in message
        assert read_current(out) == bundle(1) and not os.path.lexists(out / "istio-generated")

    def test_existing_istio_generated_file_is_refused(self, out: Path) -> None:
        """An istio-generated file someone left in an istio-ca directory stops the publish, saying to remove it."""
        publish(out, bundle(1), forbid=ISTIO_CA.forbidden)
        (out / "istio-generated").write_bytes(b"")
        with pytest.raises(PublishError, match=r"USE_CACERTS_FOR_SELF_SIGNED_CA.*remove .*istio-generated"):
            publish(out, bundle(2), forbid=ISTIO_CA.forbidden)
        assert read_current(out) == bundle(1)


class TestErrors:
    def test_dir_under_regular_file(self, tmp_path: Path) -> None:
        """A DIR whose parent is a regular file gives one sentence naming DIR."""
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "out"
        with pytest.raises(PublishError) as info:
            publish(out, bundle(1))
        message = str(info.value)
        assert message == f"cannot use {out}: not a directory in its path; point dir at a directory."
        assert isinstance(info.value.__cause__, OSError)
        assert info.value.__cause__.errno == errno.ENOTDIR

    def test_dir_is_a_regular_file(self, tmp_path: Path) -> None:
        """A DIR that is a regular file is refused with a sentence naming it."""
        out = tmp_path / "out"
        out.write_text("x")
        with pytest.raises(PublishError, match=f"cannot publish into {out}: it exists and is not a directory"):
            publish(out, bundle(1))

    def test_permission_denied(self) -> None:
        """An unwritable DIR gives the permission message; as root, a child drops to nobody to get a real EACCES."""
        with tempfile.TemporaryDirectory(dir="/tmp") as top:
            out = Path(top) / "out"
            out.mkdir()
            os.chmod(top, 0o755)
            os.chmod(out, 0o555)
            if os.getuid() == 0:
                message = run_child(
                    """
                    import os, sys
                    from pathlib import Path
                    from agent.errors import PublishError
                    from agent.publish import publish
                    os.setgid(65534); os.setuid(65534)
                    try:
                        publish(Path(sys.argv[1]), {"ca-cert.pem": b"c"})
                    except PublishError as err:
                        print(err)
                    """,
                    str(out),
                )
            else:
                with pytest.raises(PublishError) as info:
                    publish(out, {"ca-cert.pem": b"c"})
                message = str(info.value)
            assert message == (
                f"cannot write {out}: permission denied; mount a writable volume there (emptyDir) "
                "or run as a user that owns it."
            )
            assert os.listdir(out) == []

    @pytest.mark.skipif(os.getuid() != 0, reason="needs root to drop to another user")
    def test_chown_refused(self) -> None:
        """A non-root agent asked to chown gets a sentence saying to run as root or drop uid/gid."""
        with tempfile.TemporaryDirectory(dir="/tmp") as top:
            os.chmod(top, 0o777)
            out = Path(top) / "out"
            message = run_child(
                """
                import os, sys
                from pathlib import Path
                from agent.errors import PublishError
                from agent.publish import publish
                os.setgid(65534); os.setuid(65534)
                try:
                    publish(Path(sys.argv[1]), {"ca-cert.pem": b"c"}, uid=0)
                except PublishError as err:
                    print(err)
                print(sorted(os.listdir(sys.argv[1])))
                """,
                str(out),
            )
            assert message.splitlines() == [
                f"cannot give ca-cert.pem in {out} to uid 0 gid None: operation not permitted; "
                "run the agent as root (or with CAP_CHOWN) or drop uid/gid from the bundle.",
                "[]",
            ]

    def test_failure_mid_write_keeps_previous_generation(self, out: Path) -> None:
        """A write that fails half-way (file size limit: EFBIG) leaves the old generation live and no leftovers."""
        first = publish(out, bundle(1))
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, hard))
        try:
            with pytest.raises(PublishError) as info:
                publish(out, {**bundle(2), "cert-chain.pem": b"x" * (4 << 20)})
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            signal.signal(signal.SIGXFSZ, old_handler)
        assert str(info.value) == (
            f"cannot write {out}: file too large; free space on that volume or raise its size limit."
        )
        assert generations(out) == [first.generation]
        assert leftovers(out) == []
        assert read_current(out) == bundle(1)
        assert not repair_needed(out, bundle(1))


def run_child(code: str, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return proc.stdout.strip()


class TestConcurrentReader:
    def test_a_generation_deleted_while_it_is_listed_is_read_again(self, out: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
        """The agent's own read of the live bundle (change detection, repair, restart reuse) never returns part of a
        generation that a concurrent publish swapped out and was deleting while it was listed."""
        import agent.publish as publish_mod

        publish(out, bundle(0, size=64))
        real_listdir = os.listdir
        raced: list[str] = []

        def listdir(path: os.PathLike[str] | str) -> list[str]:
            names = real_listdir(path)
            old = Path(path)
            if not raced and old.parent == out and old.name.startswith("..") and old.name != DATA:
                # what a concurrent publish does between this reader's resolve and its listing: a new generation,
                # ..data swapped to it, and the old generation's files being unlinked one by one
                raced.append(old.name)
                new = out / "..2030_01_01_00_00_00.racing"
                new.mkdir()
                for name, data in bundle(1, size=64).items():
                    (new / name).write_bytes(data)
                os.symlink(new.name, out / "..data_race")
                os.replace(out / "..data_race", out / DATA)
                (old / "ca-key.pem").unlink()
                names = [n for n in names if n != "ca-key.pem"]
            return names

        monkeypatch.setattr(publish_mod.os, "listdir", listdir)
        current = read_current(out)
        monkeypatch.undo()
        assert raced, "the race was not staged"
        assert current is not None and set(current) == set(NAMES)
        assert generation_of(current, size=64) == 1

    def test_reader_never_sees_a_mix(self, out: Path) -> None:
        """A reader resolving ..data once per read never pairs ca-key.pem and ca-cert.pem of different generations."""
        publish(out, bundle(0, size=64))
        stop = threading.Event()
        seen: set[int] = set()
        mixes: list[tuple[bytes, bytes]] = []
        pairs = 0

        def reader() -> None:
            nonlocal pairs
            while not stop.is_set():
                try:
                    fd = os.open(out / DATA, os.O_RDONLY | os.O_DIRECTORY)
                except FileNotFoundError:
                    continue
                try:
                    key = read_at(fd, "ca-key.pem")
                    cert = read_at(fd, "ca-cert.pem")
                except FileNotFoundError:
                    continue  # the generation was removed after we resolved ..data: read again
                finally:
                    os.close(fd)
                pairs += 1
                try:
                    seen.add(generation_of({"ca-key.pem": key, "ca-cert.pem": cert}, size=64))
                except AssertionError:
                    mixes.append((key[:40], cert[:40]))
                current = read_current(out)
                try:
                    assert current is not None
                    assert set(current) == set(NAMES)
                    seen.add(generation_of(current, size=64))
                except AssertionError as exc:
                    mixes.append((b"read_current", str(exc).encode()))

        thread = threading.Thread(target=reader)
        thread.start()
        try:
            for gen in range(1, 201):
                publish(out, bundle(gen, size=64))
        finally:
            stop.set()
            thread.join(timeout=30)
        assert mixes == []
        assert pairs > 50
        assert len(seen) > 10, "the reader should have observed many generations"
        assert generations(out) == [os.readlink(out / DATA)]


def read_at(dir_fd: int, name: str) -> bytes:
    fd = os.open(name, os.O_RDONLY, dir_fd=dir_fd)
    with open(fd, "rb") as handle:
        return handle.read()


CHILD_LOOP = """
import sys
from pathlib import Path
from agent.publish import publish
out, gen = Path(sys.argv[1]), int(sys.argv[2])
names = ("ca-key.pem", "ca-cert.pem", "root-cert.pem", "cert-chain.pem")
while True:
    publish(out, {name: f"{name} {gen:012d}\\n".encode() * 4096 for name in names})
    if gen % 1000 == 0:
        print("ready", flush=True)
    gen += 1
"""


@pytest.fixture(name="rng")
def fixture_rng() -> Iterator[random.Random]:
    yield random.Random(20261126)


class TestCrashSafety:
    def test_sigkill_at_random_moments(self, out: Path, rng: random.Random) -> None:
        """A publisher SIGKILLed 20 times leaves one complete generation; the next publish cleans up."""
        publish(out, bundle(0, size=4096))
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        dirty = 0
        for round_ in range(1, 21):
            with subprocess.Popen(
                [sys.executable, "-c", CHILD_LOOP, str(out), str(round_ * 1000)],
                env=env,
                stdout=subprocess.PIPE,
                text=True,
            ) as child:
                try:
                    assert child.stdout is not None
                    assert child.stdout.readline().strip() == "ready"
                    threading.Event().wait(rng.uniform(0, 0.05))
                finally:
                    child.send_signal(signal.SIGKILL)
                    child.wait(timeout=10)
            current = read_current(out)
            assert current is not None
            assert set(current) == set(NAMES)
            gen = generation_of(current, size=4096)
            assert round_ * 1000 <= gen, "the child published at least once"
            for name in NAMES:  # the visible links show the same complete generation
                assert generation_of({name: (out / name).read_bytes()}, size=4096) == gen
            dirty += bool(leftovers(out))
            result = publish(out, bundle(gen + 1, size=4096))
            assert result.changed
            assert leftovers(out) == []
            assert generations(out) == [result.generation]
            assert sorted(p.name for p in out.iterdir()) == sorted([DATA, result.generation, *NAMES])
        # most kills land while a generation is being written, so some rounds must have left debris to clean
        assert dirty > 0
