"""Bundle validation that mirrors istiod (istio-ca) and pilot-agent/Envoy (tls): three verdicts, bounded work.

(a) the consumer would refuse it: BundleError; (b) it would load it but workloads or clients break: BundleError
with istiod_loads=True; (c) it loads and nothing breaks: BundleInfo, with `warnings` worth fixing.
"""

from __future__ import annotations

import datetime as dt
import os
import stat
from collections.abc import Collection, Mapping
from pathlib import Path

from agent.errors import BundleError, ConfigError
from agent.istio_version import Mesh
from agent.text import shown
from agent.validate.info import BundleInfo
from agent.validate.istio_ca import ISTIO_CA_FILES, OPTIONAL_ISTIO_CA_FILES, reload_problem
from agent.validate.limits import Limits
from agent.validate.tls import OPTIONAL_TLS_FILES, TLS_FILES

__all__ = [
    "ISTIO_CA_FILES",
    "TLS_FILES",
    "BundleInfo",
    "Limits",
    "next_change",
    "reload_problem",
    "validate",
    "validate_dir",
]

#: the kinds `validate` checks; what each is made of is in its module (istio_ca.py, tls.py, kubeconfig.py), and
#: agent.kinds is the registry the rest of the agent asks
_VALIDATED = ("istio-ca", "tls", "remote-secret")
#: the kinds `validate_dir` reads from a directory: kind -> (every file, the optional ones), from each kind's module
_DIR_FILES: Mapping[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "istio-ca": ((*ISTIO_CA_FILES, *OPTIONAL_ISTIO_CA_FILES), OPTIONAL_ISTIO_CA_FILES),
    "tls": (TLS_FILES, OPTIONAL_TLS_FILES),
}


def _epoch(now: dt.datetime | None) -> int:
    when = dt.datetime.now(dt.UTC) if now is None else now
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return int(when.timestamp())


def validate(
    kind: str,
    files: Mapping[str, bytes],
    *,
    now: dt.datetime | None = None,
    limits: Limits | None = None,
    ca_signs_cert: bool = True,
    mesh: Mesh | None = None,
) -> BundleInfo:
    """Check a bundle the way its consumer will, and describe it.

    istio-ca: istiod's startup with a plugged-in ROOT_CA_DIR (which includes every reload check), then what
    breaks for workloads (verdict b), then warnings (verdict c); `mesh` adds the checks of its Istio version,
    ztunnel and compliance policy (agent.istio_version.plan says which). tls: pilot-agent's file certificates; with
    `ca_signs_cert` false ca.crt is the CA of client certificates (gateway MUTUAL mode) and need not sign tls.crt.
    remote-secret: {cluster name: kubeconfig} as istiod's multicluster controller loads it (kubeconfig.py).

    Raises:
        BundleError: one sentence naming the file and the check; `istiod_loads` marks verdict (b).
        ConfigError: `kind` is not a known bundle kind.
    """
    from agent.validate.istio_ca import validate_istio_ca
    from agent.validate.tls import validate_tls

    lim = limits or Limits()
    when = _epoch(now)
    if kind == "istio-ca":
        return validate_istio_ca(files, when, lim, mesh)
    if kind == "tls":
        return validate_tls(files, when, lim, ca_signs_cert=ca_signs_cert)
    if kind == "remote-secret":
        from agent.validate.kubeconfig import validate_remote_secret

        return validate_remote_secret(files, when, lim)
    raise ConfigError(f"unknown bundle kind {kind!r}; use one of: {', '.join(_VALIDATED)}.")


def _read(path: Path, name: str, limit: int) -> bytes | None:
    """At most limit+1 bytes of a regular file, without blocking on FIFOs; None when it does not exist.

    The published names are symlinks into ..data (like kubelet's), so the name itself may be a symlink; what it
    points to must be a regular file.
    """
    try:
        fd = os.open(path / name, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise BundleError(f"{name} in {path} cannot be read: {exc.strerror or exc}.") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise BundleError(f"{name} in {path} is not a regular file.")
        chunks = []
        left = limit + 1
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 16))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    except OSError as exc:
        raise BundleError(f"{name} in {path} cannot be read: {exc.strerror or exc}.") from None
    finally:
        os.close(fd)


def _check_directory(directory: Path) -> None:
    """BundleError when `directory` does not exist or is no directory: what to fix, not a missing file."""
    try:
        mode = directory.stat().st_mode
    except FileNotFoundError:
        raise BundleError(f"the directory {shown(directory)} does not exist.") from None
    except OSError as exc:
        raise BundleError(f"the directory {shown(directory)} cannot be read: {exc.strerror or exc}.") from None
    if not stat.S_ISDIR(mode):
        raise BundleError(f"{shown(directory)} is not a directory: give the directory a bundle is published into.")


def _other_kind_hint(directory: Path, kind: str) -> str:
    """`, which holds a tls bundle: check it with --type tls` when every required file of another kind is there."""
    for other, (names, optional) in _DIR_FILES.items():
        required = [n for n in names if n not in optional]
        if other != kind and all((directory / n).is_file() for n in required):
            article = "an" if other[0] in "aeiou" else "a"
            return f", which holds {article} {other} bundle ({', '.join(required)}): check it with --type {other}"
    return ""


def validate_dir(
    path: str | Path,
    kind: str,
    *,
    now: dt.datetime | None = None,
    limits: Limits | None = None,
    ca_signs_cert: bool = True,
    mesh: Mesh | None = None,
) -> BundleInfo:
    """Read a published bundle from `path` and validate it (see `validate`).

    Raises:
        BundleError: a required file is missing, unreadable or not a regular file, or the bundle is refused.
        ConfigError: `kind` is not a known bundle kind.
    """
    if kind not in _DIR_FILES:
        raise ConfigError(f"unknown bundle kind {kind!r}; use one of: {', '.join(_DIR_FILES)}.")
    names, optional = _DIR_FILES[kind]
    lim = limits or Limits()
    directory = Path(path)
    _check_directory(directory)
    files: dict[str, bytes] = {}
    for name in names:
        data = _read(directory, name, lim.max_file_bytes)
        if data is None:
            if name in optional:
                continue
            raise BundleError(f"{name} is missing from {shown(directory)}{_other_kind_hint(directory, kind)}.")
        files[name] = data
    return validate(kind, files, now=now, limits=lim, ca_signs_cert=ca_signs_cert, mesh=mesh)


def next_change(
    files: Mapping[str, bytes], now: dt.datetime, *, limits: Limits | None = None, key_files: Collection[str] = ()
) -> dt.datetime | None:
    """The first moment after `now` at which a verdict on `files` may change with the clock alone: the earliest
    notBefore, notAfter, CRL thisUpdate or nextUpdate still ahead, over every certificate and CRL in them; None
    when there is none. Unparsable blocks are skipped (they refuse the bundle whatever the time); `key_files`
    (the kind's private keys) are not even decoded."""
    from agent.validate.certs import parse_certificate
    from agent.validate.crl import parse_crl
    from agent.validate.info import to_datetime
    from agent.validate.pem import decode_all

    limits = limits or Limits()
    epoch = _epoch(now)
    ahead: list[int] = []
    for name, data in files.items():
        if name in key_files or len(data) > limits.max_file_bytes:
            continue
        for block in decode_all(data, limit=limits.max_certs_per_file):
            try:
                if block.label == b"CERTIFICATE":
                    c = parse_certificate(block.der, limits)
                    times = [c.not_before, c.not_after + 1]
                elif block.label == b"X509 CRL":
                    rl = parse_crl(block.der)
                    times = [rl.this_update, *([] if rl.next_update is None else [rl.next_update + 1])]
                else:
                    continue
            except Exception:  # noqa: BLE001, S112 - a block that does not parse refuses the bundle at any time
                continue
            ahead.extend(t for t in times if t > epoch)
    return to_datetime(min(ahead)) if ahead else None
