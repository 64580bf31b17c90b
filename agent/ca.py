"""`istio-vault-agent ca root|intermediate`: make the mesh's root, and a cluster's intermediate signed by it (shaped
like Istio's tools/certs), into the files istiod reads and/or a KV secret with the runbook's keys. Everything is
validated like istiod first, then written; nothing overwrites existing data without --force.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent import hvac_client, istio_certs, kinds, kvstore
from agent.clusters import BUNDLE_KEYS, check_cluster_name
from agent.config import KEY_TYPES, SA_TOKEN_PATH
from agent.errors import AuthError, ConfigError, SecretError, WriteConflict
from agent.operator import ENV_HELP
from agent.text import shown

if TYPE_CHECKING:
    import hvac
    from cryptography import x509

__all__ = ["IntermediateOptions", "Root", "add_arguments", "load_root_dir", "make_intermediate", "make_root", "run"]

#: what `ca root` writes, and what --root-dir must hold
ROOT_CERT, ROOT_KEY = "root-cert.pem", "root-key.pem"
#: the keys --root-kv reads
ROOT_KV_KEYS = ("root_cert", "root_key")
_KEY_FILES = frozenset({ROOT_KEY, "ca-key.pem"})
#: the file names of istiod's bundle (BUNDLE_KEYS order), as a mapping for the existence checks
_BUNDLE_FILES = dict.fromkeys(BUNDLE_KEYS.values(), b"")

Say = Callable[[str], None]


# ---------------------------------------------------------------------------------------------- arguments


def _days(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 36500:
        raise argparse.ArgumentTypeError(f"expected a number of days from 1 to 36500, got {shown(text, 40)!r}")
    return int(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `root` and `intermediate` to the `ca` (sub)parser; `run` reads them back."""
    parser.description = (
        "Bootstrap the mesh's trust like Istio's tools/certs: a root CA (kept offline), then one intermediate per"
        " cluster signed by it, for istiod's ROOT_CA_DIR or a KV secret the agent publishes from."
    )
    sub = parser.add_subparsers(dest="ca_command", required=True, metavar="COMMAND")
    root = sub.add_parser("root", help="make a root CA: root-cert.pem (0644) and root-key.pem (0600) in --out")
    root.add_argument("--out", required=True, metavar="DIR", help="directory to write (created 0700 if missing)")
    root.add_argument("--key-type", choices=KEY_TYPES, default="rsa-4096", help="default: %(default)s")
    root.add_argument("--days", type=_days, default=istio_certs.ROOT_DAYS, help="validity (default: %(default)s)")
    root.add_argument("--force", action="store_true", help="replace existing files")

    inter = sub.add_parser(
        "intermediate",
        help="make a cluster's intermediate signed by the root, into --out and/or KV (--kv)",
        epilog=f"{ENV_HELP} With --auth-mount the command logs in with Kubernetes auth instead (no VAULT_TOKEN)."
        " Vault is used only for --kv and --root-kv: with --root-dir and --out alone nothing is sent anywhere.",
    )
    inter.add_argument("--cluster", required=True, help="cluster name: the L= of the subject (O=Istio, CN=Intermediate"
                       " CA, L=<cluster>)")
    roots = inter.add_mutually_exclusive_group(required=True)
    roots.add_argument("--root-dir", metavar="DIR", help=f"directory with {ROOT_CERT} and {ROOT_KEY} (`ca root`)")
    roots.add_argument("--root-kv", metavar="MOUNT/PATH", help="KV secret with keys root_cert and root_key")
    inter.add_argument("--out", metavar="DIR", help="write ca-key.pem (0600), ca-cert.pem, cert-chain.pem and"
                       " root-cert.pem here")
    inter.add_argument("--kv", metavar="MOUNT/PATH", help="write the KV secret (v1 or v2) with keys ca_key, ca_cert,"
                       " cert_chain, root_cert")
    existing = inter.add_mutually_exclusive_group()
    existing.add_argument("--force", action="store_true", help="replace existing files or KV data")
    existing.add_argument("--if-missing", action="store_true", help="when every target already holds data, change"
                          " nothing and exit 0 (\"already present\"): for Jobs that run on every install")
    inter.add_argument("--key-type", choices=KEY_TYPES, default="rsa-4096", help="default: %(default)s")
    inter.add_argument("--days", type=_days, default=istio_certs.INTERMEDIATE_DAYS,
                       help="validity, capped at the root's (default: %(default)s)")
    inter.add_argument("--auth-mount", metavar="MOUNT", help="log in with Kubernetes auth at this mount")
    inter.add_argument("--role", help="the Kubernetes auth role (with --auth-mount)")
    inter.add_argument("--token-path", default=SA_TOKEN_PATH, help="service account token for --auth-mount"
                       " (default: %(default)s)")


@dataclass(frozen=True)
class IntermediateOptions:
    """What `ca intermediate` makes and where it writes."""

    cluster: str
    root_dir: str | None = None
    root_kv: str | None = None
    out: str | None = None
    kv: str | None = None
    force: bool = False
    if_missing: bool = False
    key_type: str = "rsa-4096"
    days: int = istio_certs.INTERMEDIATE_DAYS
    auth_mount: str | None = None
    role: str | None = None
    token_path: str = SA_TOKEN_PATH


def run(args: argparse.Namespace, say: Say, warn: Say) -> int:
    """Carry out `ca root` or `ca intermediate`; `say` gets one line per file or path written, `warn` warnings."""
    if args.ca_command == "root":
        make_root(Path(args.out), key_type=args.key_type, days=args.days, force=args.force, say=say, warn=warn)
        return 0
    opts = IntermediateOptions(
        cluster=args.cluster, root_dir=args.root_dir, root_kv=args.root_kv, out=args.out, kv=args.kv,
        force=args.force, if_missing=args.if_missing, key_type=args.key_type, days=args.days,
        auth_mount=args.auth_mount, role=args.role, token_path=args.token_path,
    )
    make_intermediate(opts, say=say, warn=warn)
    return 0


# ---------------------------------------------------------------------------------------------- files


def _pem(cert: x509.Certificate) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding

    return cert.public_bytes(Encoding.PEM)


def _existing(directory: Path, names: Mapping[str, bytes]) -> list[str]:
    return [n for n in names if (directory / n).exists() or (directory / n).is_symlink()]


def _refuse_existing(directory: Path, names: Mapping[str, bytes]) -> None:
    found = _existing(directory, names)
    if found:
        raise ConfigError(
            f"{directory / found[0]} already exists: nothing was written; pass --force to replace"
            f" {'it' if len(found) == 1 else 'the ' + str(len(found)) + ' files there'}"
        )


def _make_dir(directory: Path, *, probe: bool = False) -> None:
    """Create `directory` (0700) if missing; with `probe`, also create and remove a file there, so that a
    directory that cannot be written fails before anything else is written (the KV secret)."""
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create directory {directory}: {exc.strerror or exc}") from None
    if probe:
        tmp = directory / f".probe.{secrets.token_hex(4)}.tmp"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600))
            tmp.unlink()
        except OSError as exc:
            raise ConfigError(f"cannot write in {directory}: {exc.strerror or exc}: nothing was written") from None


def _write_files(directory: Path, files: Mapping[str, bytes], *, force: bool, say: Say) -> None:
    """Write each file beside its target and move it in (replace only with `force`); keys 0600, the rest 0644.

    Key files go first, so a reader that watches the certificate never sees it before its key.
    """
    _make_dir(directory)
    if not force:
        _refuse_existing(directory, files)
    for name in sorted(files, key=lambda n: n not in _KEY_FILES):
        mode = 0o600 if name in _KEY_FILES else 0o644
        target = directory / name
        tmp = directory / f".{name}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, mode)
            try:
                os.fchmod(fd, mode)  # whatever the umask
                os.write(fd, files[name])
                os.fsync(fd)
            finally:
                os.close(fd)
            if force:
                os.replace(tmp, target)
            else:
                os.link(tmp, target)  # fails if the target appeared meanwhile: never overwrite without --force
        except FileExistsError:
            raise ConfigError(f"{target} appeared while this command ran: pass --force to replace it") from None
        except OSError as exc:
            raise ConfigError(f"cannot write {target}: {exc.strerror or exc}") from None
        finally:
            tmp.unlink(missing_ok=True)
        say(f"wrote {shown(target, 1000)} ({mode:04o})")


# ---------------------------------------------------------------------------------------------- root


def make_root(directory: Path, *, key_type: str = "rsa-4096", days: int = istio_certs.ROOT_DAYS, force: bool = False,
              say: Say, warn: Say) -> None:
    """Make a root CA and write root-cert.pem and root-key.pem in `directory`.

    Raises:
        ConfigError: a file exists (without `force`) or cannot be written.
        BundleError: the root would not serve istiod as a CA (never expected).
    """
    if not force:
        _refuse_existing(directory, {ROOT_CERT: b"", ROOT_KEY: b""})
    key = istio_certs.generate_key(key_type)
    cert = _pem(istio_certs.root_cert(key, days=days))
    key_bytes = istio_certs.key_pem(key)
    # the root alone is a bundle istiod would take as its CA: the same checks, the key and cert as a pair
    info = kinds.get("istio-ca").validate({"ca-key.pem": key_bytes, "ca-cert.pem": cert, "cert-chain.pem": cert,
                                           "root-cert.pem": cert})
    for warning in info.warnings:
        warn(warning)
    _write_files(directory, {ROOT_CERT: cert, ROOT_KEY: key_bytes}, force=force, say=say)


@dataclass(frozen=True)
class Root:
    """The signing root: its certificate, its key, and root-cert.pem's bytes exactly as given (kept byte for
    byte across intermediate rotations; it may hold more roots for a multi-root mesh)."""

    cert: x509.Certificate
    key: Any
    bundle: bytes

    def __repr__(self) -> str:  # keep the key out of reprs and tracebacks
        return f"Root(subject={self.cert.subject.rfc4514_string()!r})"


def _root(cert_pem: bytes, key_pem: bytes, where: str) -> Root:
    """The root whose key `key_pem` is, from root-cert.pem's certificates; ConfigError naming `where`."""
    from cryptography import x509
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, load_pem_private_key

    try:
        certs = x509.load_pem_x509_certificates(cert_pem)
    except ValueError:
        raise ConfigError(f"the root certificate in {where} is not PEM certificates: give `ca root`'s"
                          f" {ROOT_CERT}") from None
    try:
        key = load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise ConfigError(f"the root key in {where} is encrypted: decrypt it for this command"
                          " (openssl pkey -in root-key.pem -out <file>)") from None
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigError(f"the root key in {where} is not a PEM private key") from None
    if istio_certs.key_type_of(key) is None:
        raise ConfigError(f"the root key in {where} is neither RSA nor EC P-256/P-384")
    spki = PublicFormat.SubjectPublicKeyInfo
    mine = key.public_key().public_bytes(Encoding.DER, spki)
    signer = next((c for c in certs if c.public_key().public_bytes(Encoding.DER, spki) == mine), None)
    if signer is None:
        raise ConfigError(f"the root key in {where} is not the key of any certificate in its root certificate:"
                          " give the root's own key")
    if signer.not_valid_after_utc <= dt.datetime.now(dt.UTC):
        raise ConfigError(f"the root in {where} expired at {signer.not_valid_after_utc:%Y-%m-%d %H:%M} UTC: make a"
                          " new one with `ca root`")
    return Root(signer, key, cert_pem if cert_pem.endswith(b"\n") else cert_pem + b"\n")


def load_root_dir(directory: Path) -> Root:
    """The root from root-cert.pem and root-key.pem in `directory` (read here; the key goes nowhere else).

    Raises:
        ConfigError: a file is missing or unreadable, or the two do not make a usable root.
    """
    data: dict[str, bytes] = {}
    for name in (ROOT_CERT, ROOT_KEY):
        try:
            data[name] = (directory / name).read_bytes()
        except FileNotFoundError:
            raise ConfigError(f"{directory / name} does not exist: point --root-dir at the directory `ca root`"
                              " wrote (root-cert.pem and root-key.pem)") from None
        except OSError as exc:
            raise ConfigError(f"cannot read {directory / name}: {exc.strerror or exc}") from None
    return _root(data[ROOT_CERT], data[ROOT_KEY], str(directory))


def _find_kv(client: hvac.Client, path: str, flag: str, fix: str) -> kvstore.KVMount:
    """hvac_client.kv_mount, with what a 403 or 404 of the mount lookup means to the operator.

    Vault answers 403 for a mount that does not exist (as for one the token may not use), and 404 when the
    namespace does not exist.
    """
    from agent.errors import PermissionDenied

    if any(c in "?#%" or not c.isprintable() for c in path):
        # in a URL these would cut the path (a query, a fragment) or be decoded: another secret would be written
        raise ConfigError(f"{flag} {shown(path)!r} cannot name a KV secret: leave out '?', '#', '%' and control"
                          " characters")
    try:
        return hvac_client.kv_mount(client, path, fix=fix)
    except PermissionDenied:
        mount = shown(path.strip("/").split("/")[0])
        raise PermissionDenied(
            f"{flag} {shown(path)}: there is no KV mount {mount} that this token may use (Vault answers permission"
            f" denied for both): check the mount's name (bao secrets list) and the token's policy"
        ) from None
    except SecretError:
        namespace = getattr(client.adapter, "namespace", None)
        if namespace and not _namespace_exists(client):
            raise ConfigError(f"Vault namespace {shown(namespace)!r} does not exist: fix VAULT_NAMESPACE") from None
        raise


def _namespace_exists(client: hvac.Client) -> bool:
    """False when the client's namespace answers 404 at its root (sys/internal/ui/mounts needs no policy)."""
    import hvac.exceptions as hx

    try:
        client.adapter.get("/v1/sys/internal/ui/mounts")
    except hx.InvalidPath:
        return False
    except Exception:  # noqa: BLE001 - only a 404 says no; anything else leaves the first error to be reported
        return True
    return True


def _load_root_kv(client: hvac.Client, path: str) -> Root:
    fix = "--root-kv must be MOUNT/PATH of a KV secret with keys root_cert and root_key"
    m = _find_kv(client, path, "--root-kv", fix)
    data = hvac_client.kv_read(client, m, hint=f"grant read on {shown(m.policy_path)}")
    missing = [k for k in ROOT_KV_KEYS if not isinstance((data or {}).get(k), str) or not (data or {})[k].strip()]
    if data is None or missing:
        raise SecretError(f"KV path {shown(m.full)} has no {' or '.join(missing or ROOT_KV_KEYS)}: {fix}")
    return _root(data["root_cert"].encode(), data["root_key"].encode(), f"KV path {shown(m.full)}")


# ---------------------------------------------------------------------------------------------- intermediate


def _client(opts: IntermediateOptions, environ: Mapping[str, str] | None) -> hvac.Client:
    from agent.operator import operator_client

    if not opts.auth_mount:
        return operator_client(environ=environ)
    if not opts.role:
        raise ConfigError("--auth-mount needs --role: the Kubernetes auth role this service account logs in as")
    from agent.config import AuthConfig
    from agent.hvac_client import login

    client = operator_client(environ=environ, login=True)
    try:
        login(client, AuthConfig(method="kubernetes", mount=opts.auth_mount, role=opts.role,
                                 token_path=opts.token_path))
    except (AuthError, ConfigError) as exc:
        # the agent's login names its config keys; here the user set flags
        raise type(exc)(_flags_for_keys(str(exc))) from None
    return client


#: the agent's auth config keys, as `ca intermediate` spells them
_AUTH_FLAGS = {"auth.token_path": "--token-path", "auth.mount": "--auth-mount", "auth.role": "--role"}


def _flags_for_keys(message: str) -> str:
    for key, flag in _AUTH_FLAGS.items():
        message = message.replace(key, flag)
    return message


def _files(root: Root, key: Any, cert: x509.Certificate) -> dict[str, bytes]:
    """istiod's four files: cert-chain.pem is the intermediate, then the root that signed it."""
    return {
        "ca-key.pem": istio_certs.key_pem(key),
        "ca-cert.pem": _pem(cert),
        "cert-chain.pem": _pem(cert) + _pem(root.cert),
        "root-cert.pem": root.bundle,
    }


def _check_targets(
    opts: IntermediateOptions, client: hvac.Client | None, out: Path | None, say: Say
) -> tuple[kvstore.KVMount | None, kvstore.Presence] | None:
    """The KV target and what it holds now; None when --if-missing finds every target holding data already.

    Raises:
        ConfigError: a target holds data (without --force), or only some do (with --if-missing).
    """
    target: kvstore.KVMount | None = None
    seen = kvstore.Presence(False, 0)
    if opts.kv and client is not None:
        target = _find_kv(client, opts.kv, "--kv", "--kv must be MOUNT/PATH of a secret on a KV v1 or v2 mount")
        seen = hvac_client.kv_presence(client, target)
    held = {f"KV v{target.version} path {shown(target.full)}": seen.live} if target else {}
    if out is not None:
        found = _existing(out, _BUNDLE_FILES)
        if opts.if_missing and found and len(found) < len(_BUNDLE_FILES):
            lack = ", ".join(n for n in _BUNDLE_FILES if n not in found)
            raise ConfigError(f"{out} holds only part of a CA (no {lack}): nothing was written; pass --force (instead"
                              " of --if-missing) to replace it with a whole new intermediate")
        held[str(out)] = bool(found)
    if opts.if_missing and any(held.values()):
        if all(held.values()):
            for where in held:
                say(f"already present: {where}; nothing written (--if-missing)")
            return None
        have = ", ".join(w for w, v in held.items() if v)
        lack = ", ".join(w for w, v in held.items() if not v)
        raise ConfigError(f"{have} already holds a CA but {lack} does not: write them separately, or pass --force"
                          " (instead of --if-missing) to replace all with one new intermediate")
    if not opts.force:
        if target is not None and seen.live:
            raise ConfigError(f"KV path {shown(target.full)} already holds data: nothing was written; pass --force to"
                              " replace it (or --if-missing to leave it as it is)")
        if out is not None:
            _refuse_existing(out, _BUNDLE_FILES)
    if out is not None and target is not None:
        _make_dir(out, probe=True)  # before the KV write: a directory it cannot fill must not leave KV alone written
    return target, seen


def make_intermediate(
    opts: IntermediateOptions,
    *,
    say: Say,
    warn: Say,
    environ: Mapping[str, str] | None = None,
    before_write: Callable[[], None] | None = None,
) -> None:
    """Make `opts.cluster`'s intermediate under the root and write it to `opts.out` and/or `opts.kv`.

    Targets are checked before anything is made; the bundle is validated like istiod before anything is written.
    On KV v2 the write carries check-and-set with the version seen at the start, so a write by someone else in
    between is refused. `environ` stands for os.environ (credentials); `before_write` runs just before the KV write.

    Raises:
        ConfigError: bad options, a missing or unusable root, or existing data without --force.
        SecretError: the KV path is not KV, or holds no root (--root-kv).
        WriteConflict: the KV path changed after it was read (check-and-set refused the write).
        AuthError, PermissionDenied, VaultUnavailable: from Vault.
        BundleError: the result would not pass istiod's checks.
    """
    check_cluster_name(opts.cluster)
    if not opts.out and not opts.kv:
        raise ConfigError("say where to write the intermediate: --out DIR, --kv MOUNT/PATH, or both")
    if bool(opts.root_dir) == bool(opts.root_kv):
        raise ConfigError("give the root with exactly one of --root-dir DIR or --root-kv MOUNT/PATH")
    client = _client(opts, environ) if opts.kv or opts.root_kv else None
    out = Path(opts.out) if opts.out else None

    # -- targets first: refuse (or skip) before any key is made ----------------------------------------------
    checked = _check_targets(opts, client, out, say)
    if checked is None:
        return
    target, seen = checked

    # -- make and validate -----------------------------------------------------------------------------------
    if opts.root_dir:
        root = load_root_dir(Path(opts.root_dir))
    else:
        assert client is not None and opts.root_kv
        root = _load_root_kv(client, opts.root_kv)
    now = dt.datetime.now(dt.UTC)
    not_after = now + dt.timedelta(days=opts.days)
    if not_after > root.cert.not_valid_after_utc:
        not_after = root.cert.not_valid_after_utc
        warn(f"the intermediate ends with the root on {not_after:%Y-%m-%d} (before --days {opts.days}): plan the"
             " root's rotation")
    key = istio_certs.generate_key(opts.key_type)
    cert = istio_certs.intermediate_cert(key, opts.cluster, root.cert, root.key, not_after=not_after, now=now)
    files = _files(root, key, cert)
    info = kinds.get("istio-ca").validate(files)
    for warning in info.warnings:
        warn(warning)

    # -- write: KV first (check-and-set can still refuse it), then the directory ----------------------------
    if target is not None and client is not None:
        if before_write is not None:
            before_write()
        data = {k: files[name].decode() for k, name in BUNDLE_KEYS.items()}
        try:
            version = hvac_client.kv_write(client, target, data, cas=seen.version)
        except WriteConflict:
            if opts.if_missing and hvac_client.kv_presence(client, target).live:  # another run of the Job won the race
                say(f"already present: KV v2 path {shown(target.full)}; nothing written (--if-missing)")
                return
            raise
        suffix = f" version {version}" if version is not None else ""
        say(f"wrote KV v{target.version} path {shown(target.full)}{suffix} (keys {', '.join(BUNDLE_KEYS)})")
    if out is not None:
        _write_files(out, files, force=opts.force, say=say)
