"""`doctor`: check each cluster's Vault/OpenBao side end to end from the operator's seat (auth mount, role,
policy isolation, the stored bundle, expiry) and that every cluster's intermediate chains to a root all trust.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from agent.clusters import BUNDLE_KEYS, ClusterLayout, check_cluster_name
from agent.errors import AgentError, BundleError, ConfigError, PermissionDenied, VaultUnavailable
from agent.kvstore import KVMount
from agent.operator import ENV_HELP
from agent.rotation import certs, fingerprint, issued_by
from agent.text import shown

if TYPE_CHECKING:
    import hvac
    from cryptography import x509

__all__ = ["FAIL", "OK", "WARN", "Check", "Trust", "add_arguments", "diagnose", "exit_code", "render", "rotation_view",
           "run", "trust"]

OK, WARN, FAIL = "ok", "warn", "FAIL"

#: capabilities that let a token read or change a secret
_ACCESS = ("read", "create", "update", "patch", "delete", "sudo", "root")


@dataclass(frozen=True)
class Check:
    """One line of the report."""

    cluster: str
    check: str
    #: ok | warn | FAIL
    status: str
    detail: str


# ---------------------------------------------------------------------------------------------- certificates


@dataclass(frozen=True)
class Trust:
    """What a bundle's certificates say about trust (no key material): the certificate path from ca-cert.pem up to
    the root-cert.pem entry it chains to, and the roots root-cert.pem holds."""

    #: (label, notAfter) of each certificate on the path, ca-cert.pem first
    path: tuple[tuple[str, dt.datetime], ...]
    #: sha256 hex of the root-cert.pem certificate the path ends at; None when it reaches none
    anchor: str | None
    #: sha256 hex of every certificate in root-cert.pem
    roots: frozenset[str]
    #: sha256 hex -> "subject (sha256 12ab34cd)" for each root
    names: dict[str, str] = field(default_factory=dict)


def _label(cert: x509.Certificate) -> str:
    return shown(cert.subject.rfc4514_string() or "empty subject", 120)


def trust(files: dict[str, bytes]) -> Trust:
    """Follow ca-cert.pem's first certificate through cert-chain.pem up to a root in root-cert.pem."""
    roots = certs(files.get("root-cert.pem", b""))
    chain = certs(files.get("cert-chain.pem", b""))
    names = {fingerprint(r): f"{_label(r)} (sha256 {fingerprint(r)[:16]})" for r in roots}
    current = next(iter(certs(files.get("ca-cert.pem", b""))), None)
    if current is None:
        return Trust((), None, frozenset(names), names)
    path = [("ca-cert.pem " + _label(current), current.not_valid_after_utc)]
    anchor = None
    for _ in range(8):  # Go's verifier gives up long before this on any real chain
        root = next((r for r in roots if issued_by(current, r)), None)
        if root is not None:
            anchor = fingerprint(root)
            if fingerprint(current) != anchor:  # ca-cert.pem may itself be the root
                path.append(("root " + _label(root), root.not_valid_after_utc))
            break
        parent = next((c for c in chain if c != current and issued_by(current, c)), None)
        if parent is None:
            break
        path.append(("cert-chain.pem " + _label(parent), parent.not_valid_after_utc))
        current = parent
    return Trust(tuple(path), anchor, frozenset(names), names)


def _expiry(cluster: str, tr: Trust, warn_days: int, now: dt.datetime) -> Check:
    if not tr.path:
        return Check(cluster, "expiry", FAIL, "ca-cert.pem holds no certificate to check")
    label, when = min(tr.path, key=lambda p: p[1])
    days = (when - now).total_seconds() / 86400
    stamp = when.strftime("%Y-%m-%d %H:%M UTC")
    if when <= now:
        return Check(cluster, "expiry", FAIL, f"{label} expired at {stamp}: issue a new intermediate")
    if days < warn_days:
        return Check(cluster, "expiry", WARN, f"{label} expires in {days:.0f} days ({stamp}), within --warn-days "
                     f"{warn_days}: rotate it")
    return Check(cluster, "expiry", OK, f"the path ({len(tr.path)} certificates) is valid until {stamp} "
                 f"({days:.0f} days)")


def _roots(trusts: dict[str, Trust]) -> list[Check]:
    """One `root` line per cluster: the same root everywhere, or overlapping root sets (a rotation), or which
    cluster is on a root the others do not trust."""
    known = {c: t for c, t in trusts.items() if t.anchor is not None}
    out = [Check(c, "root", FAIL, "ca-cert.pem does not chain to any certificate of root-cert.pem")
           for c, t in trusts.items() if t.anchor is None and t.path]
    if not known:
        return out
    counts = Counter(t.anchor for t in known.values())
    # the reference root: the one most clusters chain to, the first named cluster's on a tie
    ref = max(known.values(), key=lambda t: counts[t.anchor]).anchor
    ref_cluster = next(c for c, t in known.items() if t.anchor == ref)
    names = {k: v for t in known.values() for k, v in t.names.items()}
    lines: list[Check] = []
    for c, t in known.items():
        problems = []
        for other, o in known.items():
            if other == c:
                continue
            # a mismatch is the fault of the cluster off the reference root (both, when neither is on it)
            if t.anchor not in o.roots and (t.anchor != ref or o.anchor == ref):
                problems.append(f"{other}'s root-cert.pem does not hold it")
            if o.anchor not in t.roots and (t.anchor != ref or o.anchor == ref):
                problems.append(f"root-cert.pem lacks {other}'s root {names[o.anchor or '']}")
        here = names[t.anchor or ""]
        if problems:
            lead = (f"the intermediate chains to {here}, a different root than {ref_cluster}'s {names[ref or '']}"
                    if t.anchor != ref else f"the intermediate chains to {here}")
            lines.append(Check(c, "root", FAIL, f"{lead}; " + "; ".join(problems)))
        else:
            lines.append(Check(c, "root", OK, f"the intermediate chains to {here}"))
    if any(x.status == FAIL for x in lines):
        return out + lines
    if len(counts) == 1:
        return out + [Check(x.cluster, "root", OK, f"every cluster's intermediate chains to the same root "
                            f"{names[ref or '']}") for x in lines]
    return out + [Check(x.cluster, "root", OK, f"overlapping roots: {x.detail.removeprefix('the ')}, and every "
                        f"cluster's root-cert.pem holds all {len(counts)} roots in use (a root rotation's middle "
                        "state: istiod reloads a changed root-cert.pem only with ISTIO_MULTIROOT_MESH=true)")
                  for x in lines]


# ---------------------------------------------------------------------------------------------- Vault side


class _Vault:
    """The operator's client, every call translated once (hvac_client.call)."""

    def __init__(self, client: hvac.Client) -> None:
        self.client = client
        self._mounts: dict[str, Any] | None = None

    def call(self, fn: Callable[[], Any], action: str) -> Any:
        from agent import hvac_client

        return hvac_client.call(fn, address=self.client.url, action=action)

    def data(self, response: Any, action: str) -> dict[str, Any]:
        from agent import vault

        body = vault.answer(response, address=self.client.url, action=action)
        inner = body.get("data", body)
        return inner if isinstance(inner, dict) else {}

    def read(self, path: str) -> dict[str, Any] | None:
        """`path`'s data, None when nothing is there."""
        import hvac.exceptions

        def read() -> Any:
            try:
                return self.client.read(path)
            except hvac.exceptions.InvalidPath:  # 404: nothing there (any other failure is translated)
                return None

        action = f"reading {shown(path)}"
        response = self.call(read, action)
        return None if response is None else self.data(response, action)

    def mounts(self) -> dict[str, Any]:
        if self._mounts is None:
            self._mounts = self.data(
                self.call(self.client.sys.list_mounted_secrets_engines, "listing the secrets engines"),
                "listing the secrets engines")
        return self._mounts

    def kv_version(self, mount: str) -> int | None:
        """1 or 2 for a KV mount, None when `mount` is not a KV mount."""
        info = self.mounts().get(f"{mount}/")
        if not isinstance(info, dict) or info.get("type") not in {"kv", "generic"}:
            return None
        options = info.get("options") if isinstance(info.get("options"), dict) else {}
        return 2 if str((options or {}).get("version") or "1") == "2" else 1


def _kv_paths(layout: ClusterLayout, version: int | None) -> dict[str, str]:
    """Policy path -> what it is for, as the agent reads the bundle (KV v1: the path; v2: data/ and metadata/)."""
    if version is None:  # not a KV mount (yet): ask for every form an ACL could name
        return {**_kv_paths(layout, 1), **_kv_paths(layout, 2)}
    data, *metadata = _kv(layout, version).read_paths
    return {data: "read", **dict.fromkeys(metadata, "metadata")}


def _kv(layout: ClusterLayout, version: int) -> KVMount:
    """The cluster's bundle secret on its KV mount of `version`."""
    return KVMount(layout.kv_mount, version, layout.kv_path.removeprefix(layout.kv_mount + "/"))


@dataclass
class _Cluster:
    layout: ClusterLayout
    checks: list[Check] = field(default_factory=list)
    role: dict[str, Any] | None = None
    trust: Trust | None = None

    def add(self, check: str, status: str, detail: str) -> None:
        self.checks.append(Check(self.layout.cluster, check, status, detail))


def _auth(v: _Vault, c: _Cluster) -> None:
    lay = c.layout
    methods = v.data(v.call(v.client.sys.list_auth_methods, "listing the auth methods"), "listing the auth methods")
    info = methods.get(f"{lay.auth_mount}/")
    hint = (f"run `istio-vault-agent setup vault --cluster {lay.cluster} --kubernetes-host URL"
            " --kubernetes-ca-cert FILE`")
    if not isinstance(info, dict):
        c.add("auth-mount", FAIL, f"no auth method is mounted at {lay.auth_mount}: {hint}")
        return
    if info.get("type") != "kubernetes":
        c.add("auth-mount", FAIL, f"{lay.auth_mount} is a {shown(info.get('type'), 40)} auth method, not kubernetes")
        return
    c.add("auth-mount", OK, f"{lay.auth_mount} is a kubernetes auth method")
    config = v.read(f"auth/{lay.auth_mount}/config") or {}
    host = config.get("kubernetes_host")
    if isinstance(host, str) and host:
        c.add("auth-config", OK, f"kubernetes_host is {shown(host, 120)}")
    else:
        c.add("auth-config", FAIL, f"auth/{lay.auth_mount}/config has no kubernetes_host: {hint}")
    role = v.read(f"auth/{lay.auth_mount}/role/{lay.role}")
    if role is None:
        c.add("role", FAIL, f"no role {lay.role} in auth/{lay.auth_mount}: {hint}")
        return
    c.role = role
    _binding(c, role)


def _binding(c: _Cluster, role: dict[str, Any]) -> None:
    lay = c.layout
    names = [str(n) for n in role.get("bound_service_account_names") or []]
    spaces = [str(n) for n in role.get("bound_service_account_namespaces") or []]
    where = f"role {lay.role} of {lay.auth_mount}"
    if lay.service_account not in names and "*" not in names:
        c.add("role", FAIL, f"{where} binds service account(s) {shown(', '.join(names) or 'none', 80)}, not "
              f"{lay.service_account}: set bound_service_account_names={lay.service_account}")
    elif lay.namespace not in spaces and "*" not in spaces:
        c.add("role", FAIL, f"{where} binds namespace(s) {shown(', '.join(spaces) or 'none', 80)}, not "
              f"{lay.namespace}: set bound_service_account_namespaces={lay.namespace}")
    elif "*" in names or "*" in spaces:
        c.add("role", WARN, f"{where} binds '*': any service account (or namespace) may log in; bind "
              f"{lay.namespace}/{lay.service_account} only")
    else:
        c.add("role", OK, f"{where} binds {lay.namespace}/{lay.service_account}")
    audience = role.get("audience")
    if audience == lay.audience:
        c.add("audience", OK, f"{where} expects audience {lay.audience}")
    elif not audience:
        c.add("audience", WARN, f"{where} accepts any audience: set audience={lay.audience}, the audience of the "
              "token projected for the agent")
    else:
        c.add("audience", FAIL, f"{where} expects audience '{shown(audience, 60)}', but the agent's projected token "
              f"carries {lay.audience}: set audience={lay.audience}")


def _policies(v: _Vault, c: _Cluster, others: Sequence[ClusterLayout], pki: bool) -> None:
    """The role's policies exist and, through a short-lived token holding exactly them, read this cluster's path
    and nobody else's."""
    lay, role = c.layout, c.role or {}
    names = [str(p) for p in (role.get("token_policies") or role.get("policies") or []) if p != "default"]
    expected = lay.pki_policy if pki else lay.read_policy
    where = f"role {lay.role} of {lay.auth_mount}"
    if not names:
        c.add("policy", FAIL, f"{where} has no policy: add {expected} (token_policies={expected})")
        return
    missing = [p for p in names if v.read(f"sys/policy/{p}") is None]
    if missing:
        c.add("policy", FAIL, f"{where} names policy {shown(', '.join(missing), 120)}, which does not exist: write "
              f"it (bao policy write {expected} ...) or fix the role's token_policies")
    else:
        c.add("policy", OK, f"{where} has policies {shown(', '.join(names), 120)}")
    no_default = bool(role.get("token_no_default_policy"))
    own = {f"{lay.pki_mount}/root/sign-intermediate": "update"} if pki else _kv_paths(lay, v.kv_version(lay.kv_mount))
    foreign = {p: o.cluster for o in others for p in _kv_paths(o, v.kv_version(o.kv_mount))}
    caps = _capabilities(v, names, no_default, [*own, *foreign])
    _own(c, own, caps)
    if foreign:
        leaks = [f"{foreign[p]}'s {p} ({', '.join(sorted(set(caps.get(p, ())) & set(_ACCESS)))})"
                 for p in foreign if set(caps.get(p, ())) & set(_ACCESS)]
        if leaks:
            c.add("other-paths", FAIL, f"the policies of {where} also grant " + shown("; ".join(leaks), 300)
                  + ": limit them to this cluster's own path")
        else:
            clusters = sorted({foreign[p] for p in foreign})
            c.add("other-paths", OK, f"no access to the path of {', '.join(clusters)}")


def _own(c: _Cluster, own: dict[str, str], caps: dict[str, list[str]]) -> None:
    for path, need in own.items():
        have = set(caps.get(path, ()))
        granted = bool(have & {need, "root"}) or (need == "metadata" and bool(have & {"read", "root"}))
        if granted:
            continue
        if need == "metadata":
            c.add("own-path", WARN, f"no read on {path}: the agent then reads the whole secret at every poll "
                  "instead of its metadata")
            continue
        c.add("own-path", FAIL, f"the role's policies do not grant {need} on {path}: istiod's agent could not "
              f"{'read its bundle' if need == 'read' else 'have its intermediate signed'}")
        return
    c.add("own-path", OK, f"the role's policies grant what the agent needs on {', '.join(own)}")


def _capabilities(v: _Vault, policies: list[str], no_default: bool, paths: list[str]) -> dict[str, list[str]]:
    """Ask sys/capabilities-self with a 60 s orphan token holding exactly `policies` (as a login through the role
    would); the token is revoked after, and never shown."""
    created = v.call(lambda: v.client.auth.token.create(
        policies=policies, no_default_policy=no_default, no_parent=True, ttl="60s", renewable=False,
        display_name="istio-vault-agent-doctor"), "creating a 60 s token with the role's policies (the operator "
        "token needs sudo on auth/token/create)")
    token = str(((created or {}).get("auth") or {}).get("client_token") or "")
    if not token:
        raise VaultUnavailable("Vault answered the token creation without a token")
    operator = v.client.token
    try:
        v.client.token = token
        answer = v.data(v.call(lambda: v.client.sys.get_capabilities(paths),
                               "asking sys/capabilities-self"), "asking sys/capabilities-self")
    finally:
        v.client.token = operator
        with contextlib.suppress(AgentError):  # it expires within 60 s anyway
            v.call(lambda: v.client.auth.token.revoke(token), "revoking the doctor's token")
    out: dict[str, list[str]] = {}
    for p in paths:
        value = answer.get(p)
        if value is None and len(paths) == 1:
            value = answer.get("capabilities")
        out[p] = [str(x) for x in value] if isinstance(value, list) else []
    return out


def _bundle(v: _Vault, c: _Cluster, warn_days: int, now: dt.datetime) -> None:
    from agent import hvac_client, kinds

    lay = c.layout
    version = v.kv_version(lay.kv_mount)
    hint = (f"run `istio-vault-agent ca intermediate --cluster {lay.cluster} --root-dir DIR --kv {lay.kv_path}`")
    if version is None:
        # `ca intermediate --kv` cannot write into a mount that does not exist: setup vault makes it
        c.add("bundle", FAIL, f"no KV mount {lay.kv_mount}: run `istio-vault-agent setup vault --cluster {lay.cluster}"
                              f" --kubernetes-host URL --kubernetes-ca-cert FILE` first (it creates the mount), then "
                              f"{hint.removeprefix('run ')}")
        return
    data = hvac_client.kv_read(v.client, _kv(lay, version),
                               hint=f"the operator's token must be able to read {lay.kv_path}")
    if not data:
        extra = ""
        if isinstance(v.mounts().get(f"{lay.pki_mount}/"), dict):
            extra = f" (mount {lay.pki_mount} exists: for PKI mode run doctor with --pki)"
        c.add("bundle", FAIL, f"no secret at {lay.kv_path} (KV v{version}): {hint}{extra}")
        return
    missing = [k for k in BUNDLE_KEYS if not isinstance(data.get(k), str) or not data.get(k)]
    files = {BUNDLE_KEYS[k]: str(data[k]).encode() for k in BUNDLE_KEYS if k not in missing}
    if isinstance(data.get("ca_crl"), str):
        files["ca-crl.pem"] = str(data["ca_crl"]).encode()
    c.trust = trust(files)
    if missing:
        c.add("bundle", FAIL, f"{lay.kv_path} lacks key(s) {', '.join(missing)}: {hint}")
    else:
        try:
            info = kinds.get("istio-ca").validate(files, now=now)
        except BundleError as exc:
            c.add("bundle", FAIL, f"{lay.kv_path}: {exc}")
        else:
            if info.warnings:
                c.add("bundle", WARN, f"{lay.kv_path} is valid, but: {'; '.join(info.warnings)}")
            else:
                c.add("bundle", OK, f"{lay.kv_path} (KV v{version}) has the four keys and passes the validator")
    c.checks.append(_expiry(lay.cluster, c.trust, warn_days, now))


def _pki(v: _Vault, c: _Cluster, warn_days: int, now: dt.datetime) -> None:
    lay = c.layout
    info = v.mounts().get(f"{lay.pki_mount}/")
    hint = f"run `istio-vault-agent setup vault --cluster {lay.cluster} ... --pki`"
    if not isinstance(info, dict) or info.get("type") != "pki":
        c.add("pki-root", FAIL, f"no PKI mount {lay.pki_mount}: {hint}")
        return
    issuer = v.read(f"{lay.pki_mount}/issuer/default/json")
    pem = str((issuer or {}).get("certificate") or "").encode()
    found = certs(pem)
    if not found:
        c.add("pki-root", FAIL, f"the PKI mount {lay.pki_mount} has no default issuer: generate or import the root")
        return
    root = found[0]
    # the intermediates are made by each agent from its CSR: what Vault holds is the root they all chain to
    fp = fingerprint(root)
    c.trust = Trust(((f"{lay.pki_mount}'s root {_label(root)}", root.not_valid_after_utc),), fp, frozenset({fp}),
                    {fp: f"{_label(root)} (sha256 {fp[:16]})"})
    c.add("pki-root", OK, f"{lay.pki_mount}'s default issuer is {_label(root)}")
    if v.read(f"sys/policy/{lay.pki_policy}") is None:
        c.add("pki-policy", FAIL, f"no policy {lay.pki_policy}: {hint}")
    elif c.role is not None and lay.pki_policy not in (c.role.get("token_policies") or []):
        c.add("pki-policy", WARN, f"policy {lay.pki_policy} exists, but role {lay.role} of {lay.auth_mount} does not "
              "name it")
    else:
        c.add("pki-policy", OK, f"policy {lay.pki_policy} exists")
    c.checks.append(_expiry(lay.cluster, c.trust, warn_days, now))


def diagnose(
    client: hvac.Client,
    clusters: Sequence[str],
    *,
    pki: bool = False,
    pki_mount: str = "pki",
    warn_days: int = 30,
    now: dt.datetime | None = None,
) -> list[Check]:
    """Every check for every cluster, then the cross-cluster root check.

    Raises:
        VaultUnavailable: Vault could not be asked at all.
        ConfigError: a cluster name cannot name mounts, or the client's namespace does not exist.
        PermissionDenied: the token may not list the auth methods (invalid, expired, or not an operator's).
    """
    now = now or dt.datetime.now(dt.UTC)
    layouts = [ClusterLayout(check_cluster_name(name), pki_mount=pki_mount) for name in dict.fromkeys(clusters)]
    v = _Vault(client)
    namespace = getattr(client.adapter, "namespace", None)
    try:
        methods = v.read("sys/auth")
    except PermissionDenied:  # every check would fail the same way: one line instead
        raise PermissionDenied(
            "the operator token may not list the auth methods (sys/auth): check that VAULT_TOKEN is valid and not"
            " expired, and that its policy allows read on sys/auth (a root or admin token)"
        ) from None
    if namespace and methods is None:  # 404 at the namespace's own root: no such namespace
        raise ConfigError(
            f"Vault namespace {shown(namespace)!r} does not exist: fix --namespace (or VAULT_NAMESPACE), or create"
            " it and run `istio-vault-agent setup vault` there first"
        )
    out: list[Check] = []
    trusts: dict[str, Trust] = {}
    for lay in layouts:
        c = _Cluster(lay)
        others = [o for o in layouts if o is not lay]
        for step in ("auth", "policies", "material"):
            try:
                if step == "auth":
                    _auth(v, c)
                elif step == "policies" and c.role is not None:
                    _policies(v, c, others, pki)
                elif step == "material":
                    (_pki if pki else _bundle)(v, c, warn_days, now)
            except VaultUnavailable:
                raise
            except AgentError as exc:
                c.add(step, FAIL, f"could not check: {exc}")
        out.extend(c.checks)
        if c.trust is not None:
            trusts[lay.cluster] = c.trust
    return out + _roots(trusts)


def rotation_view(client: hvac.Client, clusters: Sequence[str], now: dt.datetime | None = None) -> list[Check]:
    """One `rotation` line per cluster: its root rotation phase as `rotate status` reads it from KV.

    Raises:
        VaultUnavailable: Vault could not be reached.
    """
    from agent import rotation

    now = now or dt.datetime.now(dt.UTC)
    out = []
    for name in dict.fromkeys(clusters):
        try:
            st = rotation.state_of(rotation.read_stored(client, name, ClusterLayout(name).kv_path), None)
        except VaultUnavailable:
            raise
        except AgentError as exc:
            out.append(Check(name, "rotation", FAIL, f"could not read the phase: {exc}"))
            continue
        out.append(Check(name, "rotation", FAIL if st.phase == rotation.BROKEN else OK, rotation.describe(st, now)))
    return out


def exit_code(checks: Sequence[Check]) -> int:
    """1 when any check failed, else 0."""
    return 1 if any(c.status == FAIL for c in checks) else 0


def render(checks: Sequence[Check], output: str = "text") -> str:
    """The report: one `status  cluster  check: detail` line per check, or a JSON document."""
    if output == "json":
        doc = {"ok": exit_code(checks) == 0, "checks": [asdict(c) for c in checks]}
        return json.dumps(doc, indent=2)
    width = max((len(c.cluster) for c in checks), default=0)
    return "\n".join(f"{c.status:<4}  {c.cluster:<{width}}  {c.check}: {c.detail}" for c in checks)


def _days(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{shown(text, 40)!r} is not a whole number of days") from None
    if value < 0:
        raise argparse.ArgumentTypeError("--warn-days must be 0 or more")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `doctor` options to a (sub)parser; `run` reads them back."""
    parser.description = (
        "Check each cluster's Vault/OpenBao side end to end: the kubernetes auth mount and its config, role istiod"
        " (service account, audience), that its policies read this cluster's bundle and no other cluster's, the"
        " stored bundle (the four keys, the agent's validator), expiry, and that every intermediate chains to a"
        " root every cluster trusts. One line per check; exit 1 on any FAIL. " + ENV_HELP
    )
    parser.add_argument("--cluster", action="append", required=True, metavar="NAME",
                        help="a cluster of the mesh; repeat for each (their paths are checked against each other)")
    parser.add_argument("--output", choices=("text", "json"), default="text", help="text (default) or json")
    parser.add_argument("--namespace", default=None, metavar="NS",
                        help="Vault Enterprise / OpenBao namespace (default: VAULT_NAMESPACE)")
    parser.add_argument("--warn-days", type=_days, default=30, metavar="DAYS",
                        help="warn when a certificate on the path expires within DAYS (default 30)")
    parser.add_argument("--pki", action="store_true",
                        help="PKI mode: check the PKI mount's root and the signing policy instead of a KV bundle")
    parser.add_argument("--rotation", action="store_true",
                        help="also print each cluster's root rotation phase, as `rotate status` reads it from KV")
    parser.add_argument("--pki-mount", default="pki", metavar="MOUNT",
                        help="with --pki: the PKI root mount every cluster's intermediate is signed at (default pki)")


def run(args: argparse.Namespace) -> list[Check]:
    """The checks `args` asks for, with the operator's credentials.

    Raises:
        ConfigError: credentials or a cluster name are missing or wrong.
        VaultUnavailable: Vault could not be reached.
    """
    import re

    from agent.operator import operator_client

    if not re.fullmatch(r"[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*", args.pki_mount.strip("/")):
        raise ConfigError(f"--pki-mount {shown(args.pki_mount, 80)!r} is not a mount path: use e.g. pki")
    client = operator_client(namespace=args.namespace)
    checks = diagnose(client, args.cluster, pki=args.pki, pki_mount=args.pki_mount.strip('/'),
                      warn_days=args.warn_days)
    if getattr(args, "rotation", False) and not args.pki:
        checks += rotation_view(client, args.cluster)
    return checks
