"""`setup vault`: one cluster's Vault/OpenBao side (agent/clusters.py) as the agent needs it. Reads what is there,
compares it with what should be (`plan`: one Step per object), then creates what is missing and, with --fix,
rewrites what drifted; or, with --dry-run, prints the `bao`/`vault` commands that would do it.
"""

from __future__ import annotations

import argparse
import re
import shlex
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent import hvac_client, vault
from agent.clusters import DNS_LABEL, ClusterLayout, check_cluster_name
from agent.errors import ConfigError, PermissionDenied, SecretError
from agent.kvstore import KVMount
from agent.operator import ENV_HELP, operator_client
from agent.text import shown

if TYPE_CHECKING:
    import hvac

__all__ = ["Options", "Step", "add_arguments", "options_from_args", "plan", "run"]

#: the istiod and gateway logins' token lifetime (the runbook's ttl=24h)
TOKEN_TTL = ("24h", 24 * 3600)
#: the shared PKI mount's max lease ttl (10 years: the root's lifetime)
PKI_MAX_TTL = ("87600h", 87600 * 3600)
#: the longest gateway certificate the gateway PKI role issues
GATEWAY_MAX_TTL = ("720h", 720 * 3600)

_SUBDOMAIN = re.compile(r"[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?")
_DOMAIN = re.compile(r"[a-z0-9*]([a-z0-9.-]{0,251}[a-z0-9])?")


@dataclass(frozen=True)
class Options:
    """What `setup vault` was asked for (files already read)."""

    layout: ClusterLayout
    kubernetes_host: str
    ca_file: str
    ca_pem: str
    reviewer_jwt_file: str | None = None
    reviewer_jwt: str | None = field(default=None, repr=False)
    kv_version: int = 1
    pki: bool = False
    gateways: tuple[tuple[str, str], ...] = ()
    gateway_domains: tuple[str, ...] = ()
    #: revisions of istiod (`--set revision=canary` runs as istiod-canary) whose accounts the role also binds
    revisions: tuple[str, ...] = ()
    namespace: str | None = None
    dry_run: bool = False
    fix: bool = False


@dataclass
class Step:
    """One object: its state in Vault, what differs, and how to make it right.

    States: missing (setup creates it), unchanged, drifted (--fix rewrites it), blocked (setup cannot fix it),
    absent (missing, and the operator's to make: the PKI root).
    """

    what: str
    state: str
    diffs: list[str] = field(default_factory=list)
    #: the `bao` command lines that create or fix it
    commands: list[str] = field(default_factory=list)
    #: the same through the API
    write: Callable[[hvac.Client], None] | None = None


# ---------------------------------------------------------------------------------------------- arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `setup vault` options to a (sub)parser; `options_from_args` reads them back."""
    parser.description = (
        "Create what is missing on Vault/OpenBao for one cluster: the kubernetes auth mount and its config, the KV"
        " mount, istiod's read policy and role (with --pki: the shared PKI mount and a signing policy), and a role"
        " per --gateway. A second run changes nothing. Drift is reported (exit 1) and fixed only with --fix. "
        + ENV_HELP
    )
    parser.add_argument("--cluster", required=True, metavar="NAME", help="the cluster's name (kubernetes-NAME, ...)")
    parser.add_argument("--kubernetes-host", required=True, metavar="URL", help="the cluster's API server URL")
    parser.add_argument("--kubernetes-ca-cert", required=True, metavar="FILE", help="PEM CA of the API server")
    parser.add_argument(
        "--token-reviewer-jwt", metavar="FILE",
        help="a JWT of a service account with system:auth-delegator (default: Vault reviews with the login's JWT)",
    )
    parser.add_argument("--kv-version", type=int, choices=(1, 2), default=1, help="KV engine version (default 1)")
    parser.add_argument("--pki", action="store_true", help="also the shared PKI mount and istiod's signing policy")
    parser.add_argument(
        "--gateway", action="append", default=[], metavar="NS/SA",
        help="a gateway service account to give a role (gateway-NS-SA); repeatable",
    )
    parser.add_argument(
        "--gateway-domain", action="append", default=[], metavar="DOMAIN",
        help="with --pki --gateway: a domain (and its subdomains) gateway certificates may name; repeatable",
    )
    parser.add_argument(
        "--revision", action="append", default=[], metavar="REV",
        help="a revisioned istiod (--set revision=REV) whose service account istiod-REV the istiod role also binds;"
        " repeatable",
    )
    parser.add_argument("--namespace", metavar="NS", help="the Vault/OpenBao namespace to work in")
    parser.add_argument("--dry-run", action="store_true", help="print the bao/vault commands; change nothing")
    parser.add_argument("--fix", action="store_true", help="also rewrite what drifted from the expected settings")


def _read_text(path: str, what: str, flag: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise ConfigError(f"cannot read {flag} {shown(path)!r} ({reason}): give the file with {what}") from None


def _gateway(value: str) -> tuple[str, str]:
    ns, _, sa = value.partition("/")
    if not DNS_LABEL.fullmatch(ns) or not _SUBDOMAIN.fullmatch(sa):
        raise ConfigError(
            f"--gateway {shown(value)!r} is not NAMESPACE/SERVICEACCOUNT (lowercase Kubernetes names), e.g."
            " istio-ingress/istio-ingressgateway"
        )
    return ns, sa


def options_from_args(args: argparse.Namespace) -> Options:
    """The Options of parsed arguments; ConfigError for a bad name or an unreadable file."""
    from cryptography import x509

    layout = ClusterLayout(check_cluster_name(args.cluster))
    host = str(args.kubernetes_host)
    parsed = urllib.parse.urlsplit(host)
    # urlsplit drops tabs and newlines before parsing; Vault would store them in kubernetes_host
    if parsed.scheme not in {"https", "http"} or not parsed.netloc or any(c.isspace() or not c.isprintable()
                                                                        for c in host):
        raise ConfigError(f"--kubernetes-host {shown(host)!r} is not a URL: give the API server's https:// URL")
    ca_pem = _read_text(args.kubernetes_ca_cert, "the API server's CA certificate (PEM)", "--kubernetes-ca-cert")
    try:
        x509.load_pem_x509_certificates(ca_pem.encode())
    except ValueError:
        raise ConfigError(
            f"--kubernetes-ca-cert {shown(args.kubernetes_ca_cert)!r} holds no PEM certificate: give the API"
            " server's CA (certificate-authority-data of the kubeconfig, base64-decoded)"
        ) from None
    jwt = None
    if args.token_reviewer_jwt:
        jwt = _read_text(args.token_reviewer_jwt, "a service account token", "--token-reviewer-jwt").strip()
        if jwt.count(".") != 2 or any(c.isspace() for c in jwt):
            raise ConfigError(f"--token-reviewer-jwt {shown(args.token_reviewer_jwt)!r} does not hold one JWT")
    gateways = tuple(dict.fromkeys(_gateway(g) for g in args.gateway))
    domains = tuple(dict.fromkeys(d.lower().rstrip(".") for d in args.gateway_domain))
    for d in domains:
        if not _DOMAIN.fullmatch(d):
            raise ConfigError(f"--gateway-domain {shown(d)!r} is not a DNS domain")
    if args.pki and gateways and not domains:
        raise ConfigError(
            "--pki --gateway needs --gateway-domain DOMAIN (repeatable): the names the gateway PKI role may issue"
            " certificates for"
        )
    revisions = tuple(dict.fromkeys(str(r) for r in args.revision))
    for r in revisions:
        if not DNS_LABEL.fullmatch(r):
            raise ConfigError(f"--revision {shown(r)!r} is not a revision name (lowercase letters, digits and '-')")
    if args.namespace is not None and not re.fullmatch(r"[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*", args.namespace):
        raise ConfigError(f"--namespace {shown(args.namespace)!r} is not a Vault namespace path (a/b)")
    return Options(
        layout=layout, kubernetes_host=host, ca_file=args.kubernetes_ca_cert, ca_pem=ca_pem,
        reviewer_jwt_file=args.token_reviewer_jwt, reviewer_jwt=jwt, kv_version=args.kv_version, pki=args.pki,
        gateways=gateways, gateway_domains=domains, revisions=revisions, namespace=args.namespace,
        dry_run=args.dry_run, fix=args.fix,
    )


# ---------------------------------------------------------------------------------------------- reading Vault


class _Vault:
    """The operator client's reads and writes, each failure translated once into one sentence."""

    def __init__(self, client: hvac.Client) -> None:
        self.client = client

    def get(self, path: str, action: str, *, missing_ok: bool = True, **params: str) -> dict[str, Any] | None:
        """GET /v1/<path>'s `data`; None when Vault has nothing there (404) and `missing_ok`."""
        hint = "the operator token needs read on it (a root or admin token)"
        try:
            resp = hvac_client.call(lambda: self.client.adapter.get(f"/v1/{path}", params=params or None),
                              address=self.client.url, action=action, hint=hint)
        except PermissionDenied:
            raise
        except SecretError:
            if missing_ok:
                return None
            raise
        if resp is None or (hasattr(resp, "status_code") and resp.status_code == 204):
            return None
        data = vault.answer(resp, address=self.client.url, action=action).get("data")
        return data if isinstance(data, dict) else None

    def post(self, path: str, body: dict[str, Any], action: str) -> None:
        hvac_client.call(lambda: self.client.adapter.post(f"/v1/{path}", json=body), address=self.client.url,
                   action=action, hint="the operator token needs write on it (a root or admin token)")


# ---------------------------------------------------------------------------------------------- commands


class _Cli:
    """`bao` command lines, with -namespace when --namespace was given."""

    def __init__(self, namespace: str | None) -> None:
        self.ns = [f"-namespace={namespace}"] if namespace else []

    def line(self, command: str, *args: str, stdin: str | None = None) -> str:
        """`bao COMMAND [-namespace=NS] ARGS`, each word shell-quoted; `stdin` as a quoted here-document."""
        text = " ".join(["bao", command, *(shlex.quote(w) for w in [*self.ns, *args])])
        if stdin is not None:
            text += " - <<'EOF'\n" + stdin.rstrip("\n") + "\nEOF"
        return text

    def write(self, path: str, fields: dict[str, Any]) -> str:
        return self.line("write", path, *(f"{k}={_cli_value(v)}" for k, v in fields.items()))


def _cli_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    return str(value)


# ---------------------------------------------------------------------------------------------- desired state


def _kv_read_policy(opts: Options, kv_path: str, who: str) -> str:
    mount, _, secret = kv_path.partition("/")
    kv = KVMount(mount, opts.kv_version, secret)
    what = "KV v2: the secret and its metadata" if kv.version == 2 else "KV v1"
    rules = "".join(f'path "{path}" {{\n  capabilities = ["read"]\n}}\n' for path in kv.read_paths)
    return f"# {who} reads its own secret ({what}), nothing else\n{rules}"


def _pki_sign_policy(layout: ClusterLayout) -> str:
    return (
        f"# istiod of cluster {layout.cluster} has its intermediate signed by the shared root; the issuer chain and"
        " CRLs it also reads need no policy\n"
        f'path "{layout.pki_mount}/root/sign-intermediate" {{\n  capabilities = ["create", "update"]\n}}\n'
    )


def _gateway_pki_policy(layout: ClusterLayout) -> str:
    return (
        f"# gateways of cluster {layout.cluster} issue their certificates from PKI role {layout.gateway_role}\n"
        f'path "{layout.pki_mount}/issue/{layout.gateway_role}" {{\n  capabilities = ["create", "update"]\n}}\n'
    )


def _gateway_pki_role(opts: Options) -> dict[str, Any]:
    return {
        "allowed_domains": list(opts.gateway_domains), "allow_subdomains": True, "allow_bare_domains": True,
        "allow_glob_domains": False, "allow_any_name": False, "allow_localhost": False, "allow_ip_sans": False,
        "enforce_hostnames": True, "server_flag": True, "client_flag": False, "key_type": "ec", "key_bits": 256,
        "max_ttl": GATEWAY_MAX_TTL[0],
    }


def _role(layout: ClusterLayout, namespace: str, service_accounts: list[str], policies: list[str]) -> dict[str, Any]:
    return {
        "bound_service_account_names": service_accounts, "bound_service_account_namespaces": [namespace],
        "audience": layout.audience, "token_policies": policies, "token_ttl": TOKEN_TTL[0],
    }


# ---------------------------------------------------------------------------------------------- the plan


class _Planner:
    """Builds the Steps in the order they must be applied (a mount before what lives on it)."""

    def __init__(self, client: hvac.Client, opts: Options) -> None:
        self.v = _Vault(client)
        self.opts = opts
        self.cli = _Cli(opts.namespace)
        self.steps: list[Step] = []

    def add(self, step: Step) -> Step:
        self.steps.append(step)
        return step

    # -- mounts --------------------------------------------------------------------------------------------
    def mount(self, kind: str, path: str, engine: str, options: dict[str, str], *, cmd: str,
              enable: dict[str, Any]) -> Step:
        """A secrets engine (`kind` sys/mounts) or auth method (sys/auth) at `path`."""
        table = self.v.get(f"sys/{kind}", f"listing the {'auth methods' if kind == 'auth' else 'secrets engines'}",
                           missing_ok=False) or {}
        what = f"{'auth' if kind == 'auth' else 'secrets'} mount {path} ({engine}" + (
            f" v{options['version']})" if "version" in options else ")")
        entry = table.get(f"{path}/")
        if not isinstance(entry, dict):
            return self.add(Step(what, "missing", commands=[cmd],
                                 write=lambda c: _Vault(c).post(f"sys/{kind}/{path}", enable, f"enabling {what}")))
        have_type = str(entry.get("type"))
        if have_type != engine and not (engine == "kv" and have_type == "generic"):
            return self.add(Step(what, "blocked", [f"{path}/ is a {shown(have_type)} mount, not {engine}: setup"
                                                   " cannot change that; disable it or rename the cluster"]))
        if "version" in options:
            have_opts = entry.get("options") if isinstance(entry.get("options"), dict) else {}
            have = str((have_opts or {}).get("version") or "1")
            if have != options["version"]:
                return self.add(Step(what, "blocked", [
                    f"{path}/ is KV v{shown(have)}, not v{options['version']}: setup cannot change a KV version (move"
                    f" the secrets to a new mount, or run with --kv-version {shown(have)})"]))
        return self.add(Step(what, "unchanged"))

    # -- one object read at `path` and compared field by field ----------------------------------------------
    def fields(self, what: str, path: str, want: dict[str, Any], compare: dict[str, Any], *,
               parent: Step, extra_diffs: Callable[[dict[str, Any]], list[str]] | None = None,
               shown_fields: dict[str, Any] | None = None) -> Step:
        """`compare` holds the values as Vault answers them (seconds, sorted lists); `want` what is written."""
        cmd = self.cli.write(path, shown_fields if shown_fields is not None else want)
        write = _writer(path, want, f"writing {what}")
        if parent.state == "missing":
            return self.add(Step(what, "missing", commands=[cmd], write=write))
        have = self.v.get(path, f"reading {what}")
        if have is None:
            return self.add(Step(what, "missing", commands=[cmd], write=write))
        diffs = [
            f"{k} is {_show(have.get(k))}, want {_show(v)}"
            for k, v in compare.items()
            if _norm(have.get(k)) != _norm(v)
        ]
        if extra_diffs is not None:
            diffs += extra_diffs(have)
        return self.add(Step(what, "drifted" if diffs else "unchanged", diffs, [cmd] if diffs else [], write))

    def policy(self, name: str, text: str) -> Step:
        what = f"policy {name}"
        cmd = self.cli.line("policy write", name, stdin=text)
        write = _writer(f"sys/policies/acl/{name}", {"policy": text}, f"writing {what}")
        have = self.v.get(f"sys/policies/acl/{name}", f"reading {what}")
        if have is None:
            return self.add(Step(what, "missing", commands=[cmd], write=write))
        if str(have.get("policy", "")).strip() == text.strip():
            return self.add(Step(what, "unchanged"))
        return self.add(Step(what, "drifted", ["its rules differ from the least-privilege text setup writes"],
                             [cmd], write))

    # -- the whole cluster ---------------------------------------------------------------------------------
    def build(self) -> list[Step]:
        o, lay, cli = self.opts, self.opts.layout, self.cli
        auth = self.mount("auth", lay.auth_mount, "kubernetes", {},
                          cmd=cli.line("auth enable", f"-path={lay.auth_mount}", "kubernetes"),
                          enable={"type": "kubernetes"})
        if auth.state != "blocked":
            self.auth_config(auth)
        version = str(o.kv_version)
        kv = self.mount("mounts", lay.kv_mount, "kv", {"version": version},
                        cmd=cli.line("secrets enable", f"-path={lay.kv_mount}", f"-version={version}", "kv"),
                        enable={"type": "kv", "options": {"version": version}})
        policies = [lay.read_policy]
        # a KV policy follows the mount's version: none is written while the mount is not the one asked for
        kv_ok = kv.state != "blocked"
        if kv_ok:
            self.policy(lay.read_policy, _kv_read_policy(o, lay.kv_path, f"istiod of cluster {lay.cluster}"))
        if o.pki:
            self.pki()
            policies.append(lay.pki_policy)
        if auth.state != "blocked":
            accounts = [lay.service_account, *(f"{lay.service_account}-{r}" for r in o.revisions)]
            self.role(auth, lay.role, lay.namespace, accounts, policies)
        for ns, sa in o.gateways:
            gw_policy = lay.gateway_policy if o.pki else lay.gateway_read_policy(ns, sa)
            if not o.pki and kv_ok:
                self.policy(gw_policy, _kv_read_policy(o, lay.gateway_kv_path(ns, sa), f"gateway {ns}/{sa}"))
            if auth.state != "blocked":
                self.role(auth, lay.gateway_auth_role(ns, sa), ns, [sa], [gw_policy])
        return self.steps

    def auth_config(self, auth: Step) -> None:
        o, lay = self.opts, self.opts.layout
        path = f"auth/{lay.auth_mount}/config"
        want: dict[str, Any] = {"kubernetes_host": o.kubernetes_host, "kubernetes_ca_cert": o.ca_pem}
        shown_fields: dict[str, Any] = {"kubernetes_host": o.kubernetes_host, "kubernetes_ca_cert": f"@{o.ca_file}"}
        if o.reviewer_jwt is not None:
            want["token_reviewer_jwt"] = o.reviewer_jwt
            shown_fields["token_reviewer_jwt"] = f"@{o.reviewer_jwt_file}"
        want["disable_local_ca_jwt"] = True
        shown_fields["disable_local_ca_jwt"] = True

        def extra(have: dict[str, Any]) -> list[str]:
            out = []
            if str(have.get("kubernetes_ca_cert") or "").strip() != o.ca_pem.strip():
                out.append("kubernetes_ca_cert differs from --kubernetes-ca-cert")
            jwt_set = bool(have.get("token_reviewer_jwt_set"))
            if jwt_set and o.reviewer_jwt is None:
                out.append("a token_reviewer_jwt is set but --token-reviewer-jwt was not given (--fix removes it)")
            if not jwt_set and o.reviewer_jwt is not None:
                out.append("no token_reviewer_jwt is set, --token-reviewer-jwt was given")
            return out

        self.fields(f"kubernetes auth config of {lay.auth_mount}", path, want,
                    {"kubernetes_host": o.kubernetes_host, "disable_local_ca_jwt": True},
                    parent=auth, extra_diffs=extra, shown_fields=shown_fields)

    def role(self, auth: Step, name: str, namespace: str, service_accounts: list[str], policies: list[str]) -> None:
        lay = self.opts.layout
        want = _role(lay, namespace, service_accounts, policies)
        compare = {**want, "token_ttl": TOKEN_TTL[1]}
        self.fields(f"role {name} on {lay.auth_mount} ({', '.join(f'{namespace}/{sa}' for sa in service_accounts)})",
                    f"auth/{lay.auth_mount}/role/{name}", want, compare, parent=auth)

    def pki(self) -> None:
        o, lay, cli = self.opts, self.opts.layout, self.cli
        mount = self.mount("mounts", lay.pki_mount, "pki", {},
                           cmd=cli.line("secrets enable", f"-path={lay.pki_mount}",
                                        f"-max-lease-ttl={PKI_MAX_TTL[0]}", "pki"),
                           enable={"type": "pki", "config": {"max_lease_ttl": PKI_MAX_TTL[0]}})
        if mount.state == "unchanged":
            self.pki_tune(mount)
        if mount.state != "blocked":
            self.pki_root(mount)
        self.policy(lay.pki_policy, _pki_sign_policy(lay))
        if o.gateways and mount.state != "blocked":
            role = _gateway_pki_role(o)
            compare = {**role, "max_ttl": GATEWAY_MAX_TTL[1], "allowed_domains": sorted(o.gateway_domains)}
            self.fields(f"PKI role {lay.gateway_role} on {lay.pki_mount}", f"{lay.pki_mount}/roles/{lay.gateway_role}",
                        role, compare, parent=mount)
            self.policy(lay.gateway_policy, _gateway_pki_policy(lay))

    def pki_tune(self, mount: Step) -> None:
        lay = self.opts.layout
        table = self.v.get("sys/mounts", "listing the secrets engines", missing_ok=False) or {}
        entry = table.get(f"{lay.pki_mount}/") or {}
        config = entry.get("config") if isinstance(entry.get("config"), dict) else {}
        have = (config or {}).get("max_lease_ttl")
        if _norm(have) != PKI_MAX_TTL[1]:
            mount.state = "drifted"
            mount.diffs = [f"max_lease_ttl is {_show(have)}s, want {PKI_MAX_TTL[0]}"]
            mount.commands = [self.cli.line("secrets tune", f"-max-lease-ttl={PKI_MAX_TTL[0]}", lay.pki_mount)]
            mount.write = _writer(f"sys/mounts/{lay.pki_mount}/tune", {"max_lease_ttl": PKI_MAX_TTL[0]},
                                  f"tuning secrets mount {lay.pki_mount}")

    def pki_root(self, mount: Step) -> None:
        m = self.opts.layout.pki_mount
        what = f"root CA in {m}"
        keys: object = None
        if mount.state != "missing":
            listed = self.v.get(f"{m}/issuers", f"listing the issuers of {m}", list="true") or {}
            keys = listed.get("keys")
        if isinstance(keys, list) and keys:
            self.add(Step(what, "unchanged"))
            return
        self.add(Step(what, "absent", [
            "setup does not make or import the root: generate it in OpenBao/Vault"
            f" (bao write {m}/root/generate/internal common_name='Root CA' organization=Istio key_type=ec"
            f" ttl=87000h issuer_name=root) or import yours (bao write {m}/issuers/import/bundle"
            " pem_bundle=@root-with-key.pem)"]))


def _writer(path: str, body: dict[str, Any], action: str) -> Callable[[hvac.Client], None]:
    return lambda c: _Vault(c).post(path, body, action)


def _norm(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return sorted(str(v) for v in value)
    return value


def _show(value: Any) -> str:
    if isinstance(value, list | tuple):
        return "[" + ", ".join(shown(v, 80) for v in value) + "]"
    return repr(shown(value, 80)) if isinstance(value, str) else shown(value, 80)


def plan(client: hvac.Client, opts: Options) -> list[Step]:
    """Every object of the cluster, read from Vault and compared with what setup writes; changes nothing.

    Raises:
        ConfigError: --namespace names a namespace Vault does not have.
    """
    planner = _Planner(client, opts)
    if opts.namespace and planner.v.get("sys/auth", "listing the auth methods") is None:
        raise ConfigError(
            f"Vault namespace {shown(opts.namespace)!r} does not exist: create it first (bao namespace create"
            f" {shlex.quote(opts.namespace)}), or fix --namespace"
        )
    return planner.build()


# ---------------------------------------------------------------------------------------------- run


_FAILED = {"drifted", "blocked", "absent"}


def run(args: argparse.Namespace, emit: Callable[[str], None]) -> int:
    """`setup vault`: plan, then apply (or print the commands, --dry-run); each line goes to `emit`.

    Returns 0 when everything is as it should be now (or would be, --dry-run); 1 when something drifted and
    --fix was not given, cannot be fixed, or is the operator's to make (the PKI root).
    """
    opts = options_from_args(args)
    client = operator_client(namespace=opts.namespace)
    steps = plan(client, opts)
    where = shown(client.url) + (f" namespace {shown(opts.namespace)}" if opts.namespace else "")
    if opts.dry_run:
        emit(f"# setup vault --dry-run for cluster {opts.layout.cluster} at {where}; vault takes the same commands")
    failed = 0
    for step in steps:
        state = step.state
        fixing = state == "drifted" and opts.fix
        if state == "missing" or fixing:
            label = ("would fix" if fixing else "would create") if opts.dry_run else ("fixed" if fixing else "created")
            if opts.dry_run:
                emit(f"# {step.what}: {label}" + (f": {'; '.join(step.diffs)}" if step.diffs else ""))
                for cmd in step.commands:
                    emit(cmd)
            else:
                assert step.write is not None
                step.write(client)
                emit(f"{label:<10} {step.what}" + (f": {'; '.join(step.diffs)}" if step.diffs else ""))
            continue
        if state in _FAILED:
            failed += 1
        detail = "; ".join(step.diffs)
        if state == "drifted":
            detail += " (--fix rewrites it)"
        label = {"blocked": "cannot fix", "absent": "missing"}.get(state, state)
        line = f"{label:<10} {step.what}" + (f": {detail}" if detail else "")
        emit(f"# {line}" if opts.dry_run else line)
    changes = sum(1 for s in steps if s.state == "missing" or (s.state == "drifted" and opts.fix))
    made = f"{changes} change(s) " + ("to make" if opts.dry_run else "made")
    if not changes and not failed:
        summary = "nothing to change: everything is as setup makes it"
    elif failed:
        summary = (f"{made}; " if changes else "") + f"{failed} object(s) need attention (see above)"
    else:
        summary = made
    emit(f"# {summary}" if opts.dry_run else summary)
    return 1 if failed else 0
