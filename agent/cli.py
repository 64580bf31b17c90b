"""Command line: `run`, `check`, `inject`. The only module that prints; errors become one `error:` line and exit 1."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from agent import __version__
from agent.errors import AgentError

__all__ = ["main"]

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2


def _parser(command: str | None = None) -> argparse.ArgumentParser:
    """The argument parser; `inject`'s options are loaded only when that command runs (start-up time)."""
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

    check = sub.add_parser("check", help="validate a published directory the way istiod will")
    check.add_argument("dir", help="the directory holding the published files")
    check.add_argument("--type", choices=("istio-ca", "tls"), default="istio-ca", dest="kind")

    inject = sub.add_parser(
        "inject", help="Helm post-renderer: add the agent to istiod/gateway Deployments read on stdin"
    )
    if command == "inject":
        from agent import inject as inject_mod

        inject_mod.add_arguments(inject)
    return p


def _error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return EXIT_ERROR


def _run(args: argparse.Namespace) -> int:
    from agent import config, log

    cfg = config.load(args.config)
    log.configure(cfg.log.level, cfg.log.format)
    if args.mode == "init":
        from agent.runner import run_init

        run_init(cfg)
        return EXIT_OK
    from agent.sidecar import run_sidecar

    return run_sidecar(cfg)


def _check(args: argparse.Namespace) -> int:
    from pathlib import Path

    from agent import validate as bundle

    info = bundle.validate_dir(Path(args.dir), args.kind)
    for warning in info.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"ok: {args.dir} is a valid {args.kind} bundle; it expires {info.expires_at.isoformat()}")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `istio-vault-agent` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser(next((a for a in argv if not a.startswith("-")), None)).parse_args(argv)
    handlers: dict[str, Any] = {"run": _run, "check": _check}
    try:
        if args.command == "inject":
            from agent import inject

            return int(inject.run(args))
        return int(handlers[args.command](args))
    except AgentError as exc:
        return _error(str(exc))
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - a bug: say so in one line; the traceback only with log.level debug
        import traceback

        from agent.log import get_logger

        get_logger().debug("internal_error", traceback=traceback.format_exc())
        return _error(f"internal error ({type(exc).__name__}); please report it with the debug log")


if __name__ == "__main__":
    sys.exit(main())
