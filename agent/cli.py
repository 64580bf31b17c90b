"""Command line: `run`, `check`, `inject`, `ca`, `rotate`, `setup vault`, `doctor`. The only module that prints;
errors become one `error:` line and exit 1."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Sequence
from typing import Any

from agent import __version__
from agent.errors import AgentError

__all__ = ["main"]

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2
#: 128 + SIGPIPE, what a shell reports for a writer whose reader went away
EXIT_SIGPIPE = 141


def _parser(command: str | None = None) -> argparse.ArgumentParser:
    """The argument parser; `inject`'s and `ca`'s options are loaded only when that command runs (start-up time)."""
    p = argparse.ArgumentParser(
        prog="istio-vault-agent",
        description="Give Istio its CA from Vault or OpenBao: log in with Kubernetes auth, read the CA bundle,"
        " validate it like istiod, publish it atomically, keep it current.",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="publish the configured bundles (init: once; sidecar: and keep them current)")
    run.add_argument("--config", help="config file (default: $ISTIO_VAULT_AGENT_CONFIG)")
    run.add_argument("--mode", choices=("init", "sidecar"), default="init", help="init: one pass then exit (default)")

    from agent.kinds import FILE_KINDS

    check = sub.add_parser("check", help="validate a published directory the way its consumer (istiod) will")
    check.add_argument("dir", help="the directory holding the published files")
    check.add_argument("--type", choices=tuple(FILE_KINDS), default="istio-ca", dest="kind", help="the bundle type")
    check.add_argument(
        "--ca-signs-cert",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="tls: tls.crt must chain to ca.crt (default); --no-ca-signs-cert for a gateway in MUTUAL mode,"
        " where ca.crt is the CA of client certificates",
    )
    check.add_argument("--istio-version", type=_istio_version, metavar="MAJOR.MINOR[.PATCH]",
                       help="istio-ca: istiod's version, which turns on the checks that depend on it (config"
                       " istio.version; docs/istio-versions.md)")
    check.add_argument("--ambient", action=argparse.BooleanOptionalAction, default=None,
                       help="istio-ca: the mesh runs ambient, so ztunnel's rules apply too (config istio.ambient)")
    check.add_argument("--compliance-policy", choices=("fips-140-2", "fips-140-3", "pqc"), default=None,
                       help="istio-ca: istiod's COMPLIANCE_POLICY; fips-140-3 adds Go's FIPS 140-only limits")

    inject = sub.add_parser(
        "inject", help="Helm post-renderer: add the agent to istiod/gateway Deployments read on stdin"
    )
    if command == "inject":
        from agent import inject as inject_mod

        inject_mod.add_arguments(inject)

    ca = sub.add_parser("ca", help="bootstrap the mesh's trust: a root CA, and each cluster's intermediate (to a"
                        " directory or KV)")
    if command == "ca":
        from agent import ca as ca_mod

        ca_mod.add_arguments(ca)

    rotate = sub.add_parser("rotate", help="rotate the mesh's root across clusters in phases: status, trust, sign,"
                            " retire (operator credentials)")
    if command == "rotate":
        from agent import rotate as rotate_mod

        rotate_mod.add_arguments(rotate)

    doctor = sub.add_parser(
        "doctor", help="check each cluster's Vault/OpenBao side end to end (operator credentials)"
    )
    if command == "doctor":
        from agent import doctor as doctor_mod

        doctor_mod.add_arguments(doctor)
    setup = sub.add_parser("setup", help="create what one cluster needs on Vault/OpenBao (`setup vault --help`)")
    setup_sub = setup.add_subparsers(dest="target", required=True, metavar="TARGET")
    setup_vault = setup_sub.add_parser("vault", help="auth mount, KV mount, policies and roles for one cluster")
    if command == "setup":
        from agent import setup_vault as setup_vault_mod

        setup_vault_mod.add_arguments(setup_vault)
    return p


#: where Kubernetes reads a container's termination message unless the config names another file
_TERMINATION_LOG = "/dev/termination-log"
#: the longest error line printed (every piece of outside text in it is already cut to 200 characters)
_MAX_LINE = 4000


def _error(message: str, termination_log: str | None = None) -> int:
    """Print the one `error:` line; for `run`, also write it where `kubectl describe pod` shows it."""
    from agent.text import escape

    # one line whatever the message carries: control characters from outside text are shown as \xNN
    line = f"error: {escape(message)[:_MAX_LINE]}"
    if termination_log:
        # first, so that a stderr nobody reads cannot keep it from being written; best effort: the file exists
        # only in a container, and may not be writable
        try:
            with open(termination_log, "w", encoding="utf-8") as out:
                out.write(line[:4096] + "\n")  # the kubelet keeps at most 4096 bytes
        except OSError:
            pass
    log = sys.modules.get("agent.log")
    if log is not None and log.emit_line(line):
        # behind the log lines already queued, written out within a short deadline whatever stderr does
        log.shutdown()
    elif sys.stderr is not None:
        with contextlib.suppress(OSError):
            print(line, file=sys.stderr, flush=True)
    return EXIT_ERROR


class _Run:
    """`run`: remembers the config's termination message path, so a later failure can be written there."""

    termination_log = _TERMINATION_LOG

    def __call__(self, args: argparse.Namespace) -> int:
        from agent import config, hardening, log, runner

        hardening.apply()  # before the config, the token or a key is read
        cfg = config.load(args.config)
        self.termination_log = cfg.log.termination_message_path
        log.configure(cfg.log.level, cfg.log.format)
        code = runner.run(cfg, once=args.mode == "init")
        log.shutdown()  # every line out before the exit (init mode), within a short deadline
        return code


def _istio_version(text: str) -> object:
    from agent.istio_version import parse_version

    try:
        return parse_version(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _check(args: argparse.Namespace) -> int:
    from agent import kinds
    from agent.istio_version import RELOAD_RULE, Mesh, plan

    mesh = None
    if args.istio_version is not None or args.ambient is not None or args.compliance_policy is not None:
        mesh = Mesh(args.istio_version, bool(args.ambient), args.compliance_policy or "")
        if args.kind != "istio-ca":
            print(f"note: --istio-version, --ambient and --compliance-policy change no check of a {args.kind} bundle")
        else:
            # what the flags changed, before the verdict, so that a refusal shows them too
            for d in plan(mesh):
                # the reload rule compares the live root-cert.pem with the next one; check reads one directory
                state = "not run by check" if d.check == RELOAD_RULE and d.on else "on" if d.on else "off"
                print(f"check {d.check}: {state} ({d.why})")
    info = kinds.get(args.kind).validate_dir(args.dir, ca_signs_cert=args.ca_signs_cert, mesh=mesh)
    for warning in info.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"ok: {args.dir} is a valid {args.kind} bundle; it expires {info.expires_at.isoformat()}")
    return EXIT_OK


def _ca(args: argparse.Namespace) -> int:
    from agent import ca, hardening

    hardening.apply()  # it holds the root key: no core dump may write it to disk
    return ca.run(args, say=print, warn=lambda line: print(f"warning: {line}", file=sys.stderr))


def _rotate(args: argparse.Namespace) -> int:
    from agent import hardening, rotate

    hardening.apply()  # it holds the new root's key: no core dump may write it to disk
    return rotate.run(args, say=lambda line: print(line, flush=True),
                      warn=lambda line: print(f"warning: {line}", file=sys.stderr, flush=True))


def _setup(args: argparse.Namespace) -> int:
    from agent import setup_vault

    return setup_vault.run(args, print)


def _doctor(args: argparse.Namespace) -> int:
    from agent import doctor

    checks = doctor.run(args)
    print(doctor.render(checks, args.output))
    return doctor.exit_code(checks)


def _open_std_fds() -> None:
    """Put /dev/null on descriptors 0, 1 and 2 if the process started with them closed: otherwise the first files
    and sockets the agent opens would get those numbers, and anything written to stdout or stderr (by a library,
    or a reload command it runs) would land in them."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)  # the lowest free number: fd itself, as the lower ones are open
            if null != fd:
                os.dup2(null, fd)
                os.close(null)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `istio-vault-agent` console script; returns the exit code."""
    _open_std_fds()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser(next((a for a in argv if not a.startswith("-")), None)).parse_args(argv)
    run = _Run()
    handlers: dict[str, Any] = {"run": run, "check": _check, "ca": _ca, "setup": _setup, "doctor": _doctor,
                                "rotate": _rotate}
    try:
        if args.command == "inject":
            from agent import inject

            return int(inject.run(args))
        return int(handlers[args.command](args))
    except AgentError as exc:
        return _error(str(exc), run.termination_log if args.command == "run" else None)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # the reader left (`setup vault --dry-run | head`): stop quietly, as a process killed by SIGPIPE would;
        # stdout now points at /dev/null so that the flush at exit does not fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_SIGPIPE
    except Exception as exc:  # noqa: BLE001 - a bug: say so in one line; the traceback only with log.level debug
        import traceback

        from agent.log import get_logger

        get_logger().debug("internal_error", traceback=traceback.format_exc())
        message = f"internal error ({type(exc).__name__}); please report it with the debug log"
        return _error(message, run.termination_log if args.command == "run" else None)


if __name__ == "__main__":
    sys.exit(main())
