"""Reload actions run after a publish (signal, exec, http, rollout-restart, none), and the root-change guard.

Every failure is a ReloadError whose one sentence says what to fix; command output never reaches a log in full.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from pathlib import Path

from agent import aio
from agent.config import (
    ExecReload,
    FileBundle,
    HttpReload,
    IstioCaBundle,
    NoReload,
    RolloutRestartReload,
    SignalReload,
    parse_signal,
)
from agent.errors import ConfigError, ReloadError
from agent.kube import Kube
from agent.log import get_logger, redact
from agent.text import shown

__all__ = ["STDERR_TAIL", "find_processes", "reload", "restart_on_root_change"]

#: at most this many characters of a failed exec command's stderr go into the error (output may hold secrets)
STDERR_TAIL = 200
_PROC = Path("/proc")
#: the largest reload.pid_file read (a pid and a newline)
_PID_FILE_LIMIT = 4096
#: bytes of an exec command's stderr kept for its error (the rest is read and dropped)
_STDERR_KEEP = 64 * 1024


async def reload(bundle: FileBundle, *, kube: Kube | None = None) -> str:
    """Run `bundle.reload` after a publish and return a short description of what it did, for logs.

    signal: sends the signal to every process whose command line (arguments joined by spaces) contains
    `process` as a plain substring (never to the agent itself), or to the pid in `pid_file`.
    exec: runs `command` without a shell, stdin and stdout discarded, killed (with its process group) after
    `timeout`. http: one request with `method` to `url`, any 2xx is success. rollout-restart: patches the
    target's pod template like `kubectl rollout restart`, through `kube` (or `Kube.maybe()`). none: nothing.

    Raises:
        ReloadError: no process matched, a signal was refused, the command failed or timed out, the URL did
            not answer 2xx, or the workload could not be patched.
    """
    action = bundle.reload
    if isinstance(action, NoReload):
        return "no reload configured"
    if isinstance(action, SignalReload):
        return await _signal(action)
    if isinstance(action, ExecReload):
        return await _exec(action)
    if isinstance(action, HttpReload):
        return await _http(action)
    if isinstance(action, RolloutRestartReload):
        return await _rollout_restart(action, kube)
    raise ReloadError(f"bundle {bundle.name}: unknown reload action {type(action).__name__}")  # pragma: no cover


async def restart_on_root_change(bundle: IstioCaBundle) -> str:
    """SIGTERM the consumer after root-cert.pem changed, so Kubernetes restarts its container with the new root.

    The processes matched are those of `reload.process` when the reload is a signal action with a process
    pattern, else those of `restart_process` (default `pilot-discovery`, istiod). With `on_root_change: none`
    nothing is done. The pod needs shareProcessNamespace: true for the agent to see the process.

    Raises:
        ReloadError: no process matches the pattern, or the signal was refused.
    """
    if bundle.on_root_change == "none":
        return "on_root_change is none: nothing restarted"
    action = bundle.reload
    if isinstance(action, SignalReload) and action.process:
        pattern, key = action.process, f"reload.process of bundle {bundle.name}"
    else:
        pattern, key = bundle.restart_process, f"restart_process of bundle {bundle.name}"
    pids = await _signal_matching(pattern, signal.SIGTERM, key=key)
    return f"sent SIGTERM to {_pids(pids)} matching {shown(pattern)!r} so the container restarts with the new root"


def find_processes(pattern: str) -> list[int]:
    """Pids (not this process) whose /proc/PID/cmdline, NUL separators read as spaces, contains `pattern`."""
    me = os.getpid()
    found: list[int] = []
    try:
        entries = list(_PROC.iterdir())
    except OSError:
        return found
    for entry in entries:
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            raw = (entry / "cmdline").read_bytes()
        except OSError:  # the process exited while we looked, or hidepid hides it
            continue
        # kernel threads and zombies have an empty cmdline
        cmdline = raw.rstrip(b"\0").replace(b"\0", b" ").decode("utf-8", "replace")
        if cmdline and pattern in cmdline:
            found.append(int(entry.name))
    return sorted(found)


def _parse_signal(name: str) -> signal.Signals:
    try:
        return parse_signal(name)
    except ConfigError as exc:
        raise ReloadError(str(exc)) from None


def _pids(pids: list[int]) -> str:
    return f"pid {pids[0]}" if len(pids) == 1 else f"pids {', '.join(map(str, pids))}"


def _kill(pid: int, sig: signal.Signals) -> bool:
    """Send `sig`; False when the process is already gone. Raises ReloadError on EPERM."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:
        raise ReloadError(
            f"not allowed to send {sig.name} to pid {pid}: run the agent with the same uid as that process"
            f" (securityContext.runAsUser {os.geteuid()} here) or give it CAP_KILL"
        ) from None
    return True


async def _signal_matching(pattern: str, sig: signal.Signals, *, key: str) -> list[int]:
    pids = await asyncio.to_thread(find_processes, pattern)
    sent = [pid for pid in pids if _kill(pid, sig)]
    if not sent:
        raise ReloadError(
            f"no process matches {shown(pattern)!r} ({key}); set shareProcessNamespace: true on the pod so the agent"
            " can see the other containers' processes, and check the pattern against their command lines"
        )
    return sent


async def _signal(action: SignalReload) -> str:
    sig = _parse_signal(action.signal)
    if action.pid_file:
        pid = await asyncio.to_thread(_read_pid_file, action.pid_file)
        if not _kill(pid, sig):
            raise ReloadError(f"pid {pid} from reload.pid_file {action.pid_file} is not running")
        return f"sent {sig.name} to pid {pid} from {action.pid_file}"
    if not action.process:
        raise ReloadError("reload needs one of process or pid_file for action signal")
    pids = await _signal_matching(action.process, sig, key="reload.process")
    return f"sent {sig.name} to {_pids(pids)} matching {shown(action.process)!r}"


def _read_pid_file(path: str) -> int:
    """The pid in `path`, read as a file the agent does not own (a regular file, bounded, never blocking). Blocks:
    call it off the event loop."""
    from agent.files import FileProblem, read_regular

    try:
        text = read_regular(path, limit=_PID_FILE_LIMIT, what="reload.pid_file").decode("utf-8", "replace").strip()
    except FileProblem as exc:
        if exc.missing:
            raise ReloadError(
                f"reload.pid_file {shown(path)} does not exist: is the process running and writing it?"
            ) from None
        raise ReloadError(str(exc)) from None
    if not text.isdigit() or int(text) <= 0:
        raise ReloadError(f"reload.pid_file {path} does not hold a process id")
    pid = int(text)
    if pid == os.getpid():
        raise ReloadError(f"reload.pid_file {path} names the agent itself: point it at the consumer's pid file")
    return pid


async def _exec(action: ExecReload) -> str:
    argv = action.command
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            # own process group, so a timeout also kills what a shell command started
            start_new_session=True,
            env=_child_env(),
        )
    except FileNotFoundError:
        raise ReloadError(f"reload.command {argv[0]} does not exist: use an absolute path in the image") from None
    except PermissionError:
        raise ReloadError(f"reload.command {argv[0]} is not executable") from None
    except OSError as exc:
        raise ReloadError(f"reload.command {argv[0]} cannot be started: {exc.strerror}") from None

    async def finish() -> bytes:
        assert proc.stderr is not None
        kept = await _bounded(proc.stderr, _STDERR_KEEP)
        await proc.wait()
        return kept

    try:
        async with asyncio.timeout(action.timeout):  # not wait_for: it can swallow a cancellation (Python 3.11)
            stderr = await finish()
    except TimeoutError:
        _kill_group(proc.pid)
        await proc.wait()
        raise ReloadError(
            f"reload.command {argv[0]} did not finish within reload.timeout {action.timeout:g}s and was killed"
        ) from None
    except asyncio.CancelledError:
        # the agent is stopping: kill the command and reap it, so no transport is left for after the loop
        _kill_group(proc.pid)
        with contextlib.suppress(TimeoutError, ProcessLookupError):
            async with asyncio.timeout(2):
                await proc.wait()
        raise
    if proc.returncode != 0:
        how = f"exit code {proc.returncode}" if proc.returncode and proc.returncode > 0 else "a signal"
        tail = _tail(stderr)
        raise ReloadError(f"reload.command {argv[0]} failed with {how}" + (f": {tail}" if tail else ""))
    return f"ran {argv[0]}"


async def _bounded(stream: asyncio.StreamReader, keep: int) -> bytes:
    """The first `keep` bytes of `stream`, read to its end (the rest is dropped, so the writer never blocks on a
    full pipe). When some was dropped, what is kept ends at its last newline: no token or key is cut in two, which
    would let its first characters past the redaction."""
    kept = bytearray()
    dropped = False
    while chunk := await stream.read(65536):
        room = keep - len(kept)
        if len(chunk) > room:
            dropped = True
        if room > 0:
            kept += chunk[:room]
    if dropped:
        del kept[kept.rfind(b"\n") + 1 :]
    return bytes(kept)


def _child_env() -> dict[str, str]:
    """The agent's environment without any Vault token a pod spec may have put there."""
    return {k: v for k, v in os.environ.items() if k not in ("VAULT_TOKEN", "BAO_TOKEN")}


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _tail(stderr: bytes | None) -> str:
    """The last STDERR_TAIL characters of stderr on one line, with secret-looking text redacted."""
    text = (stderr or b"").decode("utf-8", "replace")
    text = str(redact(None, "", {"stderr": text})["stderr"])
    text = " ".join(text.split())
    return text if len(text) <= STDERR_TAIL else "..." + text[-STDERR_TAIL:]


def _safe_url(url: str) -> str:
    """The URL without credentials or query string, for messages."""
    from yarl import URL

    try:
        u = URL(url)
        return str(u.with_user(None).with_query(None).with_fragment(None))
    except (ValueError, TypeError):
        return "reload.url"


async def _http(action: HttpReload) -> str:
    aiohttp = aio.load()

    where = f"{action.method.upper()} {_safe_url(action.url)}"
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=action.timeout)) as session,
            session.request(action.method.upper(), action.url) as resp,
        ):
            status = resp.status
    except TimeoutError:
        raise ReloadError(f"reload request {where} got no answer within reload.timeout {action.timeout:g}s") from None
    except (aiohttp.ClientError, ValueError) as exc:
        raise ReloadError(f"reload request {where} failed: {_one_line(exc)}; check reload.url") from None
    if not 200 <= status < 300:
        raise ReloadError(f"reload request {where} answered HTTP {status}; check reload.url and reload.method")
    return f"{where} answered {status}"


def _one_line(exc: BaseException) -> str:
    return (str(exc) or type(exc).__name__).splitlines()[0][:200]


async def _rollout_restart(action: RolloutRestartReload, kube: Kube | None) -> str:
    owned = kube is None
    if kube is None:
        kube = await Kube.maybe()
    if kube is None:
        raise ReloadError(
            "reload action rollout-restart needs Kubernetes API access: run in a pod with a service account"
            " (automountServiceAccountToken: true) or set KUBECONFIG"
        )
    try:
        result = await kube.rollout_restart(action.target)
    finally:
        if owned:
            await kube.close()
    get_logger().debug("rollout_restarted", kind=action.target.kind, name=action.target.name)
    return result
