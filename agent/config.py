"""Configuration: typed, frozen settings from YAML, then env, then flags; validate() checks cross-field rules.

The YAML keys are a contract (issue 2 and 3): tools outside the package write these files.
"""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args

import msgspec

from agent.clusters import CLUSTER_NAME, DNS_LABEL
from agent.errors import ConfigError
from agent.istio_version import COMPLIANCE_POLICIES, Mesh, parse_version
from agent.istiod_files import ISTIOD_SWITCHES
from agent.text import shown

__all__ = [
    "CONFIG_ENV",
    "KEY_TYPES",
    "SA_TOKEN_PATH",
    "WORKLOAD_CERT_TTL",
    "AgentConfig",
    "AuthConfig",
    "BundleConfig",
    "Duration",
    "ExecReload",
    "FileBundle",
    "HealthConfig",
    "HttpReload",
    "InitConfig",
    "IstioCaBundle",
    "IstioConfig",
    "KubernetesConfig",
    "KvVariant",
    "LimitsConfig",
    "LogConfig",
    "NoReload",
    "PkiIntermediateSource",
    "PkiIntermediateVariant",
    "PkiSource",
    "PkiVariant",
    "Reload",
    "RemoteSecretBundle",
    "RolloutRestartReload",
    "RolloutTarget",
    "SidecarConfig",
    "SignalReload",
    "Size",
    "SourceConfig",
    "TlsBundle",
    "VaultConfig",
    "env_sources",
    "from_mapping",
    "load",
    "parse_duration",
    "parse_listen",
    "parse_signal",
    "parse_size",
    "safe_yaml_loader",
    "validate",
]

#: istiod's DEFAULT_WORKLOAD_CERT_TTL and pilot-agent's SECRET_TTL: the lifetime of a workload certificate
WORKLOAD_CERT_TTL = 24 * 3600.0
#: the environment variable naming the config file when --config is not given
CONFIG_ENV = "ISTIO_VAULT_AGENT_CONFIG"
#: where kubelet mounts the pod's service-account token
SA_TOKEN_PATH = "/var/run/secrets/kubernetes.io/serviceaccount/token"


class Size(int):
    """Bytes, written in YAML as `1MiB`, `512KiB`, `64KB` or a bare number of bytes."""


_SIZE = re.compile(r"(\d+)\s*(B|KB|KiB|MB|MiB|GB|GiB)?")
_SIZE_UNITS = {None: 1, "B": 1, "KB": 1000, "KiB": 1024, "MB": 1000**2, "MiB": 1024**2, "GB": 1000**3, "GiB": 1024**3}


def parse_size(value: object) -> Size:
    """Parse a size such as `1MiB` into bytes; raise ValueError with the accepted forms."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return Size(value)
    if isinstance(value, str) and (m := _SIZE.fullmatch(value.strip())) and int(m.group(1)) > 0:
        return Size(int(m.group(1)) * _SIZE_UNITS[m.group(2)])
    raise ValueError(f"expected a size such as 1MiB, 512KiB or a number of bytes, got {shown(repr(value), 60)}")


class Duration(float):
    """Seconds, written in YAML as `30s`, `5m`, `1h`, `500ms`, `1h30m` or a bare number of seconds."""


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


# YAML's .nan/.inf, or 400 digits, would make a poll loop spin (NaN sleeps 0) or a deadline never come.
_MAX_SECONDS = 100 * 366 * 86400.0


def _bounded(seconds: float) -> Duration:
    if not 0 <= seconds <= _MAX_SECONDS:  # also false for NaN; int comparison never overflows
        raise ValueError("expected a finite duration such as 30s, 5m or 1h (at most 100 years)")
    return Duration(seconds)


def parse_duration(value: object) -> Duration:
    """Parse a duration such as `120s` or `1h30m` into seconds; raise ValueError with the accepted forms."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30s, 5m or 1h")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return _bounded(value)
    if isinstance(value, str):
        text = value.strip()
        if re.fullmatch(r"\d+(\.\d+)?", text):
            return _bounded(float(text))
        parts = _DURATION_PART.findall(text)
        if parts and "".join(n + u for n, u in parts) == text:
            return _bounded(sum(float(n) * _UNIT_SECONDS[u] for n, u in parts))
    # a big nested value would make a huge line
    raise ValueError(f"expected a duration such as 30s, 5m or 1h, got {shown(repr(value), 60)}")


class _Section(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """Base of every config section: unknown keys are errors, values are immutable.

    Subclasses inherit these options; they repeat `frozen=True` only so type checkers see it too.
    """


class VaultConfig(_Section, frozen=True):
    """Where Vault or OpenBao is, and how the agent trusts it."""

    #: Vault's URL, such as `https://openbao.example:8200` (required; the token and the JWT go to this origin only)
    address: str = ""
    #: PEM file of the CA that signed Vault's server certificate (reloaded when it changes); null: the system CAs
    ca_cert: str | None = None
    #: the Vault Enterprise / OpenBao namespace to work in
    namespace: str | None = None
    #: the name to send (SNI) and check in Vault's certificate when the address is an IP or an alias
    tls_server_name: str | None = None
    #: do not verify Vault's certificate: development only
    skip_verify: bool = False
    #: the wall-clock bound of one request to Vault: connect, headers and body together
    timeout: Duration = Duration(10)


class AuthConfig(_Section, frozen=True):
    """How the agent logs in to Vault."""

    #: kubernetes: the kubernetes auth method; jwt: the same token file at a jwt mount; token: a Vault token file (dev)
    method: Literal["kubernetes", "jwt", "token"] = "kubernetes"
    #: the auth method's mount path, such as kubernetes-cluster1 (`auth/kubernetes-cluster1` works too)
    mount: str | None = None
    #: the role to log in as (kubernetes, jwt)
    role: str | None = None
    #: the token file, read afresh at every login: the projected service-account token (or a Vault token for token)
    token_path: str = SA_TOKEN_PATH


#: the private key types an intermediate CA key can have (generated by the agent, never sent anywhere)
KEY_TYPES = ("ec-p256", "ec-p384", "rsa-2048", "rsa-3072", "rsa-4096")


class PkiIntermediateSource(_Section, frozen=True):
    """`source.pki_intermediate` (istio-ca bundles): istiod's intermediate CA from a CSR that a PKI mount signs.

    The key pair is generated in the agent; only the CSR goes to Vault (issue 11).
    """

    #: the cluster's name, the certificate's L= (Istio's tools/certs)
    cluster: str
    #: the PKI mount that signs (its default issuer with root/sign-intermediate)
    mount: str = "pki"
    #: the signing endpoint under the mount: `root/sign-intermediate` or `issuer/<ref>/sign-intermediate`
    path: str = "root/sign-intermediate"
    #: the intermediate's key, generated in the agent and sent nowhere
    key_type: Literal["ec-p256", "ec-p384", "rsa-2048", "rsa-3072", "rsa-4096"] = "ec-p256"
    #: the lifetime asked for (Vault may grant less)
    ttl: Duration = Duration(720 * 3600)
    #: renew with a fresh key when this fraction of the lifetime is left (jittered +-5 %)
    renew_before: float = 0.33
    #: also publish ca-crl.pem: the mount's CRLs for the chain and an empty one signed by the intermediate
    crl: bool = False
    #: during a root rotation: MOUNT/PATH of a KV secret whose key root_cert holds more roots to trust
    #: (root-cert.pem = the mount's root, then these; published bytes kept while the set only grows or stays)
    extra_roots_kv: str | None = None


class PkiSource(_Section, frozen=True):
    """`source.pki` (tls bundles): a certificate and key from `<mount>/issue/<role>`, renewed at 2/3 of its life."""

    #: the PKI mount that issues
    mount: str
    #: the PKI role to issue with (`<mount>/issue/<role>`)
    role: str
    #: the certificate's common name
    common_name: str
    #: more DNS names (or emails) for the certificate
    alt_names: list[str] = []
    #: IP addresses for the certificate
    ip_sans: list[str] = []
    #: the lifetime asked for (the role may grant less)
    ttl: Duration = Duration(24 * 3600)


class _Source(_Section, frozen=True, tag_field="variant"):
    """Where a bundle's data comes from: one variant, written as the one key that holds its settings.

    The YAML names the variant by its key (`source: {kv: ...}`); `from_mapping` turns that key into the tag
    msgspec decodes by. A new source is one more variant here plus its opener in agent/sources/__init__.py.
    """

    @property
    def variant(self) -> str:
        """The variant's name: its key in the YAML, and the key of its opener in agent.sources.OPENERS."""
        return str(self.__struct_config__.tag)


class KvVariant(_Source, frozen=True, tag="kv"):
    """`source.kv`: a KV v1 or v2 secret, MOUNT/PATH; `fields` maps output files to its keys."""

    #: MOUNT/PATH of the KV secret; KV v1 or v2 is detected
    kv: str
    #: output file -> KV key, over the bundle type's defaults (the runbook's keys for istio-ca)
    fields: dict[str, str] = {}


class PkiIntermediateVariant(_Source, frozen=True, tag="pki_intermediate"):
    """`source.pki_intermediate` (istio-ca bundles): an intermediate CA signed by a PKI mount from a CSR."""

    #: istiod's intermediate, signed from a CSR (PKI mode)
    pki_intermediate: PkiIntermediateSource


class PkiVariant(_Source, frozen=True, tag="pki"):
    """`source.pki` (tls bundles): a certificate issued by a PKI role."""

    #: a gateway's certificate from a PKI role (PKI mode)
    pki: PkiSource


SourceConfig = KvVariant | PkiIntermediateVariant | PkiVariant
#: the variant keys, in the order messages list them
_SOURCE_VARIANTS: tuple[str, ...] = tuple(str(v.__struct_config__.tag) for v in get_args(SourceConfig))


class SignalReload(_Section, frozen=True, tag_field="action", tag="signal"):
    """Send a signal to the consumer's process."""

    #: the signal to send, such as SIGHUP
    signal: str = "SIGHUP"
    #: a pattern matched against the command lines of the pod's processes (needs shareProcessNamespace: true)
    process: str | None = None
    #: a file holding the process id (instead of process)
    pid_file: str | None = None


class ExecReload(_Section, frozen=True, tag_field="action", tag="exec"):
    """Run a command."""

    #: the command and its arguments (no shell unless you name one)
    command: list[str]
    #: the command is killed after this long
    timeout: Duration = Duration(10)


class HttpReload(_Section, frozen=True, tag_field="action", tag="http"):
    """Send an HTTP request."""

    #: the http:// or https:// URL to call
    url: str
    #: the HTTP method
    method: str = "POST"
    #: the request fails after this long
    timeout: Duration = Duration(10)


class RolloutTarget(_Section, frozen=True):
    """The workload a rollout-restart reload restarts."""

    #: the workload's kind
    kind: Literal["Deployment", "DaemonSet", "StatefulSet"]
    #: the workload's name
    name: str
    #: its namespace; default the pod's (POD_NAMESPACE)
    namespace: str | None = None


class RolloutRestartReload(_Section, frozen=True, tag_field="action", tag="rollout-restart"):
    """Restart a workload through the Kubernetes API, as `kubectl rollout restart` does (sidecar mode)."""

    #: the workload to restart
    target: RolloutTarget


class NoReload(_Section, frozen=True, tag_field="action", tag="none"):
    pass


Reload = SignalReload | ExecReload | HttpReload | RolloutRestartReload | NoReload


class _Bundle(_Section, frozen=True, tag_field="type"):
    """What every bundle kind has; `type` picks the kind (istio-ca when omitted), and each kind adds its own keys."""

    #: the bundle's name: in logs, metrics, Events and /readyz; unique
    name: str
    #: where the bundle's data comes from
    source: SourceConfig
    #: seconds left on the bundle's certificates below which /readyz fails
    ready_min_remaining: Duration = Duration(3600)
    #: how often this bundle's source is looked at; default sidecar.poll_interval
    poll_interval: Duration | None = None

    #: output file -> KV key, what `source.fields` overlays (the files a kv source may map); none for a Secret
    DEFAULT_FIELDS: ClassVar[Mapping[str, str]] = {}

    @property
    def type(self) -> str:
        """The bundle's kind, as the config names it (agent.kinds.get(type) says what it is made of)."""
        return str(self.__struct_config__.tag)

    @property
    def files(self) -> dict[str, str]:
        """Output file -> KV key: the kind's defaults overlaid with `source.fields` of a kv source."""
        fields = self.source.fields if isinstance(self.source, KvVariant) else {}
        return {**self.DEFAULT_FIELDS, **fields}

    def interval(self, sidecar: SidecarConfig) -> float:
        """Seconds between two looks at this bundle's source: its own poll_interval, else sidecar.poll_interval."""
        return float(self.poll_interval if self.poll_interval is not None else sidecar.poll_interval)


class _FileBundle(_Bundle, frozen=True, kw_only=True):
    """A bundle published as files into a directory (istio-ca, tls)."""

    #: the directory the files are published into (required)
    dir: str = ""
    #: the mode of the published files other than the key (octal)
    file_mode: int = 0o644
    #: the mode of the key file, ca-key.pem or tls.key (octal)
    key_mode: int = 0o600
    #: chown the published files to this uid (needs root or CAP_CHOWN)
    uid: int | None = None
    #: chown the published files to this gid
    gid: int | None = None
    #: what to do after each publish (sidecar mode); none: istiod >= 1.19 and pilot-agent watch the files
    reload: Reload = NoReload()


class IstioCaBundle(_FileBundle, frozen=True, kw_only=True, tag="istio-ca"):
    """istiod's plugged-in CA (ROOT_CA_DIR): from KV, or an intermediate a PKI mount signs."""

    source: KvVariant | PkiIntermediateVariant
    # the runbook's keys (seeds/003)
    DEFAULT_FIELDS: ClassVar[Mapping[str, str]] = {
        "ca-key.pem": "ca_key", "ca-cert.pem": "ca_cert", "root-cert.pem": "root_cert",
        "cert-chain.pem": "cert_chain", "ca-crl.pem": "ca_crl",
    }
    #: istiod runs with ISTIO_MULTIROOT_MESH=true, so it takes a root change where one root set holds the other
    multiroot: bool = False
    #: a root change istiod would not take: restart SIGTERMs restart_process (needs shareProcessNamespace), none
    #: leaves istiod alone
    on_root_change: Literal["restart", "none"] = "restart"
    #: the process `restart` SIGTERMs when reload.process is not set
    restart_process: str = "pilot-discovery"
    #: the lifetime of the workload certificates istiod signs (pilot-agent's SECRET_TTL, 24h by default); an
    #: intermediate needs 2 x this left, since istiod caps workload certificates at its notAfter
    workload_cert_ttl: Duration | None = None

    @property
    def workload_ttl(self) -> float:
        """`workload_cert_ttl` in seconds (default 24h, istiod's and pilot-agent's)."""
        return float(self.workload_cert_ttl) if self.workload_cert_ttl is not None else WORKLOAD_CERT_TTL


class TlsBundle(_FileBundle, frozen=True, kw_only=True, tag="tls"):
    """A gateway's or workload's certificate, key and CA (kubernetes.io/tls names): from KV or a PKI role."""

    source: KvVariant | PkiVariant
    DEFAULT_FIELDS: ClassVar[Mapping[str, str]] = {"tls.key": "tls.key", "tls.crt": "tls.crt", "ca.crt": "ca.crt"}
    #: tls.crt must chain to ca.crt; false when ca.crt is the CA of client certificates (gateway MUTUAL)
    ca_signs_cert: bool = True


class RemoteSecretBundle(_Bundle, frozen=True, kw_only=True, tag="remote-secret"):
    """A remote cluster's kubeconfig from KV, published as istiod's Secret istio-remote-secret-CLUSTER."""

    source: KvVariant
    #: the remote cluster's name, the KV key holding its kubeconfig (Secret istio-remote-secret-NAME)
    cluster: str | None = None
    #: the Secret's namespace (istiod's); default the pod's namespace (POD_NAMESPACE), else istio-system
    namespace: str | None = None
    #: delete the Secret once this bundle is gone from the config (recorded on the Secret)
    prune: bool = False


FileBundle = IstioCaBundle | TlsBundle
BundleConfig = IstioCaBundle | TlsBundle | RemoteSecretBundle
#: bundle type -> its class, in the order messages list them
_BUNDLE_TYPES: dict[str, type[_Bundle]] = {str(c.__struct_config__.tag): c for c in get_args(BundleConfig)}


class LimitsConfig(_Section, frozen=True):
    """Bounds on what the agent reads: nothing Vault sends can make it use more memory or time than this."""

    #: the largest answer read from Vault (a KV secret with all its fields); never read beyond
    max_secret_size: Size = Size(1 << 20)
    #: the largest bundle file validated (and what `check` reads of a file)
    max_file_size: Size = Size(1 << 20)
    #: PEM blocks per bundle file
    max_certs_per_file: int = 64


class InitConfig(_Section, frozen=True):
    """The first pass, in both modes."""

    #: every bundle must be published within this long, else exit 1 with the last error
    timeout: Duration = Duration(120)


class HealthConfig(_Section, frozen=True):
    """The health server of sidecar mode: /healthz, /readyz, /metrics."""

    #: HOST:PORT to listen on; [::] takes IPv4 too (one dual-stack socket)
    listen: str = "[::]:8099"


class SidecarConfig(_Section, frozen=True):
    """Sidecar mode: keeping the bundles current."""

    #: how often each source is looked at: 5 minutes, as bao agent and vault-k8s re-read static secrets; the first
    #: look after start comes at a random phase of it, so agents started together do not poll in step. SIGHUP looks
    #: at once.
    poll_interval: Duration = Duration(300)


class LogConfig(_Section, frozen=True):
    """The agent's log on stderr."""

    #: the lowest level written
    level: Literal["debug", "info", "warning", "error"] = "info"
    #: json lines, or console for people
    format: Literal["json", "console"] = "json"
    #: where a fatal `error:` line is also written, so `kubectl describe pod` shows it (skipped when not writable)
    termination_message_path: str = "/dev/termination-log"


class KubernetesConfig(_Section, frozen=True):
    """The pod the agent runs in, from the downward API (env POD_NAME, POD_NAMESPACE, POD_UID, NODE_NAME).

    Read once at start; Events are recorded on this pod when name and namespace are known.
    """

    #: the pod's name (Events are recorded on it)
    pod_name: str | None = None
    #: the pod's namespace (and the default namespace of remote secrets and rollout-restart targets)
    pod_namespace: str | None = None
    #: the pod's UID (Events name the pod by it)
    pod_uid: str | None = None
    #: the node's name (Events say where they come from)
    node_name: str | None = None


class IstioConfig(_Section, frozen=True):
    """The mesh the agent feeds: what turns on the version-aware checks (docs/istio-versions.md)."""

    #: istiod's (and ztunnel's) version, MAJOR.MINOR[.PATCH]; unset: unknown, the version-aware checks are skipped.
    #: A string: YAML reads an unquoted 1.30 as the number 1.3
    version: str | float | None = None
    #: ambient data plane: ztunnel takes its certificates from istiod as well
    ambient: bool = False
    #: istiod's COMPLIANCE_POLICY; fips-140-3 adds the limits of Go's FIPS 140-only mode
    compliance_policy: str = ""

    @property
    def mesh(self) -> Mesh:
        """The section as agent.istio_version reads it (validate() has checked the version)."""
        v = parse_version(self.version) if isinstance(self.version, str) else None
        return Mesh(version=v, ambient=self.ambient, compliance_policy=self.compliance_policy)


class AgentConfig(_Section, frozen=True):
    """The whole config file."""

    #: what to publish: at least one bundle
    bundles: list[BundleConfig]
    #: where Vault is, and how to trust it
    vault: VaultConfig = VaultConfig()
    #: how to log in
    auth: AuthConfig = AuthConfig()
    #: the first pass
    init: InitConfig = InitConfig()
    #: the health server (sidecar mode)
    health: HealthConfig = HealthConfig()
    #: keeping the bundles current (sidecar mode)
    sidecar: SidecarConfig = SidecarConfig()
    #: the agent's log
    log: LogConfig = LogConfig()
    #: the pod the agent runs in
    kubernetes: KubernetesConfig = KubernetesConfig()
    #: bounds on what the agent reads
    limits: LimitsConfig = LimitsConfig()
    #: the Istio version, data plane and compliance policy the bundles are checked for (docs/istio-versions.md)
    istio: IstioConfig = IstioConfig()


def _dec_hook(type_: type, obj: Any) -> Any:
    if type_ is Duration:
        return parse_duration(obj)
    if type_ is Size:
        return parse_size(obj)
    raise NotImplementedError


_TYPE_WORDS = {
    "str": "a string",
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "array": "a list",
    "object": "a mapping",
    "null": "null",
}


def _choices(key: str) -> str:
    """The values a Literal or tagged-union key (`type`, `action`, `level`...) accepts, from the types themselves."""
    found: list[str] = []

    def walk(t: Any, seen: set[Any]) -> None:
        if isinstance(t, msgspec.inspect.StructType):
            if t.cls in seen:
                return
            seen.add(t.cls)
            for f in t.fields:
                if f.name == key and isinstance(f.type, msgspec.inspect.LiteralType):
                    found.extend(str(v) for v in f.type.values if str(v) not in found)
                walk(f.type, seen)
        elif isinstance(t, msgspec.inspect.UnionType):
            for m in t.types:
                if isinstance(m, msgspec.inspect.StructType) and m.tag_field == key and str(m.tag) not in found:
                    found.append(str(m.tag))
                walk(m, seen)
        elif isinstance(t, msgspec.inspect.ListType):
            walk(t.item_type, seen)
        elif isinstance(t, msgspec.inspect.DictType):
            walk(t.value_type, seen)

    walk(msgspec.inspect.type_info(AgentConfig), set())
    return ", ".join(found)


def _friendly(err: msgspec.ValidationError) -> str:
    """Turn msgspec's message into one sentence that names the key in YAML terms."""
    text = str(err)
    where = ""
    if " - at `$" in text:
        text, _, path = text.rpartition(" - at `$")
        where = path.rstrip("`").lstrip(".")
    prefix = f"{where}." if where else ""
    if m := re.fullmatch(r"Object contains unknown field `(.+)`", text, re.DOTALL):
        hint = "" if where else _did_you_mean(m.group(1), AgentConfig.__struct_fields__)
        return f"unknown key {prefix}{_key(m.group(1))}{hint}: remove it or check its spelling"
    if m := re.fullmatch(r"Object missing required field `(.+)`", text, re.DOTALL):
        return f"missing required key {prefix}{m.group(1)}"
    if m := re.fullmatch(r"Expected `(.+)`, got `(.+)`", text):
        want = " or ".join(_TYPE_WORDS.get(t.strip(), t.strip()) for t in m.group(1).split("|"))
        return f"{where or 'the config'} must be {want}, not {_TYPE_WORDS.get(m.group(2), m.group(2))}"
    if m := re.fullmatch(r"Invalid (?:enum )?value '?(.*?)'?", text):
        choices = _choices(re.sub(r".*\.", "", where))
        use = f"; use one of {choices}" if choices else ""
        return f"{where} has an invalid value {shown(m.group(1), 60)!r}{use}"
    if m := re.fullmatch(r"Expected `(.+)` of length >= (\d+)", text):
        return f"{where} must not be empty"
    text = " ".join(text.split())
    return f"{where}: {text}" if where else text


def _did_you_mean(name: str, known: Sequence[str]) -> str:
    """` (did you mean 'bundles'?)` when `name` is a likely typo of one of `known`, else nothing."""
    import difflib

    close = difflib.get_close_matches(name[:60], known, n=1, cutoff=0.75)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _key(name: str) -> str:
    """A key as the user can find it: quoted when it holds spaces or odd characters, and never too long."""
    return name if re.fullmatch(r"[\w.-]{1,60}", name) else repr(name[:60])


def safe_yaml_loader() -> Any:
    """PyYAML's safe loader, the C one when libyaml is there (several times faster on a whole chart)."""
    import yaml

    return getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _loads_yaml(text: str, source: str) -> Any:
    import yaml

    try:
        return yaml.load(text, Loader=safe_yaml_loader())  # noqa: S506 - SafeLoader / CSafeLoader only
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{source} is not valid YAML{at}: {problem}") from None


#: vault.<key> -> the environment variables that override it, first found wins (like the vault CLI)
_VAULT_ENV = {
    "address": ("VAULT_ADDR", "BAO_ADDR"),
    "ca_cert": ("VAULT_CACERT", "BAO_CACERT"),
    "namespace": ("VAULT_NAMESPACE", "BAO_NAMESPACE"),
    "skip_verify": ("VAULT_SKIP_VERIFY", "BAO_SKIP_VERIFY"),
}


def env_sources(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """`vault.<key>` -> the environment variable that set it (`{"vault.address": "VAULT_ADDR"}`), for the keys
    that `load` took from the environment rather than the config file; errors name that variable."""
    env = os.environ if env is None else env
    found: dict[str, str] = {}
    for key, names in _VAULT_ENV.items():
        name = next((n for n in names if env.get(n)), None)
        if name is not None:
            found[f"vault.{key}"] = name
    return found


def _apply_env(raw: dict[str, Any], env: Mapping[str, str]) -> None:
    """Env overrides the file, like the vault CLI: VAULT_ADDR (or BAO_ADDR), VAULT_CACERT, ..."""
    vault = raw.setdefault("vault", {})
    if not isinstance(vault, dict):
        return
    sources = env_sources(env)
    for key in ("address", "ca_cert", "namespace"):
        name = sources.get(f"vault.{key}")
        if name is not None:
            vault[key] = env[name]
    name = sources.get("vault.skip_verify")
    if name is not None:
        skip = env[name]
        lowered = skip.strip().lower()
        if lowered not in {"1", "0", "true", "false", "yes", "no"}:
            raise ConfigError(f"{name} must be true or false, not {shown(skip)!r}")
        vault["skip_verify"] = lowered in {"1", "true", "yes"}
    # the downward API: the pod the agent runs in, for Events
    pod = {key: env[var] for var, key in _POD_ENV.items() if env.get(var)}
    kube = raw.setdefault("kubernetes", {})
    if pod and isinstance(kube, dict):
        kube.update(pod)


_POD_ENV = {"POD_NAME": "pod_name", "POD_NAMESPACE": "pod_namespace", "POD_UID": "pod_uid", "NODE_NAME": "node_name"}


def load(
    path: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> AgentConfig:
    """Load and validate the config file (path, else $ISTIO_VAULT_AGENT_CONFIG); env then flags override it.

    Raises:
        ConfigError: the file is missing or unreadable, or a key is unknown, mistyped or missing.
    """
    env = os.environ if env is None else env
    path = path or env.get(CONFIG_ENV)
    if not path:
        raise ConfigError(f"no config file given: pass --config FILE or set {CONFIG_ENV}")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} cannot be read: {getattr(exc, 'strerror', None) or exc}") from None
    raw = _loads_yaml(text, f"config file {path}")
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must be a YAML mapping at the top level")
    return from_mapping(raw, env=env, overrides=overrides)


def from_mapping(
    raw: dict[str, Any], *, env: Mapping[str, str] | None = None, overrides: Mapping[str, Any] | None = None
) -> AgentConfig:
    """Build an AgentConfig from parsed YAML, applying env and flag overrides, then validate it."""
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    _apply_env(raw, os.environ if env is None else env)
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        target = raw.setdefault(section, {})
        if isinstance(target, dict):
            target[key] = value
    if "bundles" not in raw:
        unknown = [str(k) for k in raw if k not in AgentConfig.__struct_fields__]
        if unknown:
            # a typo of the one required key would otherwise read as if nothing had been written
            raise ConfigError(
                f"unknown key {_key(unknown[0])!r}{_did_you_mean(unknown[0], AgentConfig.__struct_fields__)}: the "
                "config lists no bundles to publish (key bundles)"
            )
        raise ConfigError("missing required key bundles: list at least one bundle to publish")
    if isinstance(raw["bundles"], list):
        raw["bundles"] = [_tagged(f"bundles[{i}]", b) for i, b in enumerate(raw["bundles"])]
    try:
        cfg = msgspec.convert(raw, type=AgentConfig, dec_hook=_dec_hook, strict=True)
    except msgspec.ValidationError as exc:
        raise ConfigError(_misplaced(exc, raw["bundles"]) or _friendly(exc)) from None
    validate(cfg)
    return cfg


def _tagged(key: str, bundle: object) -> object:
    """A bundle as msgspec decodes it: `type` istio-ca when omitted, and its source's variant key as a tag.

    A variant set to null is no variant (the chart writes the others as null); an empty `fields` of a pki source
    is no fields.
    """
    if not isinstance(bundle, dict):
        return bundle
    bundle = {"type": "istio-ca", **bundle}
    own = _BUNDLE_TYPES.get(bundle["type"]) if isinstance(bundle["type"], str) else None
    if own is not None:
        bundle = {k: v for k, v in bundle.items() if not _foreign_default(own, k, v)}
    source = bundle.get("source")
    if isinstance(source, dict):
        if "variant" in source:
            raise ConfigError(f"unknown key {key}.source.variant: remove it or check its spelling")
        source = {k: v for k, v in source.items() if not (k in _SOURCE_VARIANTS and v is None)}
        chosen = [name for name in _SOURCE_VARIANTS if name in source]
        if len(chosen) != 1:
            raise ConfigError(f"{key}.source needs exactly one of {', '.join(_SOURCE_VARIANTS)}")
        if chosen[0] != "kv" and source.get("fields") == {}:
            del source["fields"]
        bundle["source"] = {**source, "variant": chosen[0]}
    return bundle


def _foreign_default(own: type[_Bundle], key: object, value: object) -> bool:
    """True for a key of another bundle kind that holds that kind's default (`ca_signs_cert: true` on an istio-ca
    bundle): configs written for the one flat bundle record of before set them, and they mean nothing here."""
    if not isinstance(key, str) or key in own.__struct_fields__:
        return False
    for cls in _BUNDLE_TYPES.values():
        for f in msgspec.structs.fields(cls):
            if f.name == key and f.default is not msgspec.NODEFAULT:
                try:
                    decoded = msgspec.convert(value, type=f.type, dec_hook=_dec_hook, strict=True)
                except (msgspec.ValidationError, ValueError):
                    return False
                if decoded == f.default:
                    return True
    return False


def _variants(cls: type[_Bundle]) -> tuple[str, ...]:
    """The source variants a bundle kind takes, from the type of its `source`."""
    (source,) = (f.type for f in msgspec.structs.fields(cls) if f.name == "source")
    return tuple(str(v.__struct_config__.tag) for v in (get_args(source) or (source,)))


def _misplaced(err: msgspec.ValidationError, bundles: object) -> str | None:
    """A key or source that belongs to another bundle kind, as one sentence naming the key and the kind; None
    for any other error."""
    m = re.fullmatch(r"(.*) - at `\$\.bundles\[(\d+)\](\.source(?:\.variant)?)?`", str(err), re.DOTALL)
    if m is None or not isinstance(bundles, list):
        return None
    text, i, below = m.group(1), int(m.group(2)), m.group(3) or ""
    kind = str(bundles[i].get("type")) if isinstance(bundles[i], dict) else ""
    if kind not in _BUNDLE_TYPES:
        return None
    key, article = f"bundles[{i}]", "an" if kind[0] in "aeiou" else "a"
    v = re.fullmatch(r"Invalid value '(.*)'|Object contains unknown field `(.*)`", text, re.DOTALL)
    variant = (v.group(1) or v.group(2)) if v is not None and below.startswith(".source") else None
    if variant in _SOURCE_VARIANTS:  # the variant of another kind (a single-variant source names its key unknown)
        allowed = _variants(_BUNDLE_TYPES[kind])
        if allowed == ("kv",):
            return f"{key}.source must be kv for {article} {kind} bundle (the KV path of the remote secret)"
        owners = [name for name, cls in _BUNDLE_TYPES.items() if variant in _variants(cls)]
        uses = " or ".join(f"source.{a}" for a in allowed if a != "kv")
        return (
            f"{key}.source.{variant} only applies to {' and '.join(owners)} bundles;"
            f" {article} {kind} bundle uses {uses}"
        )
    u = re.fullmatch(r"Object contains unknown field `(.+)`", text, re.DOTALL)
    if u is None:
        return None
    name = u.group(1)
    if below == ".source" and name == "fields":
        return f"{key}.source.fields only applies to kv sources"
    owners = [n for n, cls in _BUNDLE_TYPES.items() if name in cls.__struct_fields__]
    if below or not owners:
        return None
    if name == "dir":
        return f"{key}.dir does not apply to {kind} bundles: they are published as a Secret"
    if name == "reload":
        return f"{key}.reload does not apply to {kind} bundles: istiod watches its Secrets"
    return f"{key}.{name} only applies to {' and '.join(owners)} bundles"


#: the signals a reload action may send
_SIGNALS = ("SIGHUP", "SIGINT", "SIGKILL", "SIGQUIT", "SIGTERM", "SIGUSR1", "SIGUSR2")


def parse_signal(name: str) -> signal.Signals:
    """`SIGHUP`, `hup` or `HUP` as a signal a reload action may send.

    Raises:
        ConfigError: not one of the allowed signal names.
    """
    upper = name.strip().upper()
    upper = upper if upper.startswith("SIG") else f"SIG{upper}"
    if upper not in _SIGNALS:
        raise ConfigError(f"reload.signal must be one of {', '.join(_SIGNALS)}, not {shown(name, 40)!r}")
    return signal.Signals[upper]


def parse_listen(listen: str) -> tuple[str | None, int]:
    """Split `health.listen` into host and port: "HOST:PORT", "[::]:PORT", or ":PORT" (every address, None).

    Port 0 picks a free port.

    Raises:
        ConfigError: the value is not HOST:PORT with a port in 0-65535.
    """
    host, sep, port = listen.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    host = host[1:-1] if bracketed else host
    bad_host = (":" in host and not bracketed) or (bracketed and not host)
    if not sep or not port.isdigit() or int(port) > 65535 or bad_host:
        raise ConfigError(
            f"health.listen must be HOST:PORT such as [::]:8099, 0.0.0.0:8099 or :8099, not {shown(listen, 80)!r}"
        )
    return host or None, int(port)


#: the longest string any config value may be (a URL, a path, a pattern)
_MAX_STRING = 4096


def _check_strings(value: object, key: str) -> None:
    """No string anywhere in the config may hold a NUL (paths and arguments are cut there by the OS) or be
    longer than _MAX_STRING characters."""
    if isinstance(value, str):
        if "\0" in value:
            raise ConfigError(f"{key} must not contain a NUL character")
        if len(value) > _MAX_STRING:
            raise ConfigError(f"{key} is {len(value)} characters long; at most {_MAX_STRING} are allowed")
    elif isinstance(value, msgspec.Struct):
        for name in value.__struct_fields__:
            _check_strings(getattr(value, name), f"{key}.{name}" if key else name)
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _check_strings(item, f"{key}[{i}]")
    elif isinstance(value, dict):
        for k, item in value.items():
            _check_strings(k, key)
            _check_strings(item, f"{key}.{shown(k, 60)}")


def _host_and_port(url: str) -> bool:
    """Whether `url` has a host and, if it names one, a port that is a number from 0 to 65535."""
    import urllib.parse

    try:
        parts = urllib.parse.urlsplit(url)
        return bool(parts.hostname) and (parts.port is None or parts.port >= 0)
    except ValueError:  # a port out of range or not a number, a broken [IPv6] host
        return False


def validate(cfg: AgentConfig) -> None:
    """Rules across fields that types cannot express. Raises ConfigError naming the key."""
    _check_strings(cfg, "")
    if not cfg.vault.address:
        raise ConfigError("missing required key vault.address (or set VAULT_ADDR)")
    if "@" in re.split(r"[/?#]", cfg.vault.address.split("://", 1)[-1], maxsplit=1)[0]:
        # never echoed: the password would be in this line; every later line naming Vault's address would carry it
        raise ConfigError(
            "vault.address must not hold a user name or password (user:password@): the agent authenticates with its"
            " Vault token, and the address is shown in logs and errors"
        )
    if not re.match(r"^https?://[^/]+", cfg.vault.address) or not _host_and_port(cfg.vault.address):
        raise ConfigError(f"vault.address must be an http:// or https:// URL, not {shown(cfg.vault.address)!r}")
    auth = cfg.auth
    if auth.method in {"kubernetes", "jwt"}:
        if not auth.role:
            raise ConfigError(f"missing required key auth.role: the {auth.method} auth role to log in with")
        if not auth.mount:
            raise ConfigError(f"missing required key auth.mount: the path the {auth.method} auth method is mounted at")
    if not cfg.bundles:
        raise ConfigError("bundles must list at least one bundle to publish")
    names: set[str] = set()
    dirs: set[str] = set()
    for i, b in enumerate(cfg.bundles):
        key = f"bundles[{i}]"
        if not b.name or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", b.name):
            raise ConfigError(f"{key}.name must be letters, digits, '.', '_' or '-', not {shown(b.name)!r}")
        if b.name in names:
            raise ConfigError(f"{key}.name {shown(b.name)!r} is used by another bundle: names must be unique")
        names.add(b.name)
        if isinstance(b, RemoteSecretBundle):
            _validate_remote_secret(key, b)
            continue
        if not b.dir:
            raise ConfigError(f"missing required key {key}.dir: the directory the {b.type} bundle is published into")
        norm = os.path.normpath(b.dir)
        if norm in dirs:
            raise ConfigError(f"{key}.dir must be a directory of its own, not {shown(b.dir)!r}")
        dirs.add(norm)
        _validate_bundle(key, b)
    _check_remote_secrets_unique(cfg)
    _validate_istio(cfg.istio)
    parse_listen(cfg.health.listen)
    if cfg.sidecar.poll_interval < 0.1:
        raise ConfigError("sidecar.poll_interval must be at least 100ms")
    for i, b in enumerate(cfg.bundles):
        if b.poll_interval is not None and b.poll_interval < 0.1:
            raise ConfigError(f"bundles[{i}].poll_interval must be at least 100ms")


def _validate_istio(istio: IstioConfig) -> None:
    if isinstance(istio.version, float | int):
        raise ConfigError(f"istio.version must be quoted, such as \"1.30.3\": YAML reads the unquoted {istio.version!r}"
                          " as a number, in which 1.30 is 1.3")
    if istio.version is not None:
        try:
            parse_version(istio.version)
        except ValueError as exc:
            raise ConfigError(f"istio.version: {exc}") from None
    if istio.compliance_policy not in COMPLIANCE_POLICIES:
        raise ConfigError(f"istio.compliance_policy must be one of {', '.join(p for p in COMPLIANCE_POLICIES if p)}"
                          f" (or empty), as istiod's COMPLIANCE_POLICY, not {shown(istio.compliance_policy)!r}")


def _validate_bundle(key: str, b: FileBundle) -> None:
    """Rules within one file bundle; `key` is its place in the file, such as bundles[0]."""
    if isinstance(b.source, KvVariant):
        kv = b.source.kv
        if "/" not in kv.strip("/"):
            raise ConfigError(
                f"{key}.source.kv must be MOUNT/PATH, such as secret/istio/cacerts, not {shown(kv, 80)!r}"
            )
        for out in b.source.fields:
            if out in ISTIOD_SWITCHES:
                raise ConfigError(f"{key}.source.fields must not publish {out}: {ISTIOD_SWITCHES[out]}")
            if out not in b.DEFAULT_FIELDS:
                raise ConfigError(
                    f"{key}.source.fields has {shown(out)!r}, which a {b.type} bundle does not publish;"
                    f" use {', '.join(b.DEFAULT_FIELDS)}"
                )
    if isinstance(b, IstioCaBundle) and b.workload_cert_ttl is not None and b.workload_cert_ttl < 1:
        raise ConfigError(f"{key}.workload_cert_ttl must be at least 1s, such as 24h (pilot-agent's SECRET_TTL)")
    for mode_key in ("file_mode", "key_mode"):
        mode = getattr(b, mode_key)
        if not 0 <= mode <= 0o777:
            raise ConfigError(f"{key}.{mode_key} must be a file mode such as 0640 (octal in YAML), not {mode}")
    r = b.reload
    if isinstance(r, SignalReload):
        try:
            parse_signal(r.signal)
        except ConfigError as exc:
            raise ConfigError(f"{key}.{exc}") from None
        if bool(r.process) == bool(r.pid_file):
            raise ConfigError(f"{key}.reload needs exactly one of process or pid_file for action signal")
    if isinstance(r, ExecReload) and not r.command:
        raise ConfigError(f"{key}.reload.command must not be empty for action exec")
    if isinstance(r, HttpReload) and not re.match(r"^https?://", r.url):
        raise ConfigError(f"{key}.reload.url must be an http:// or https:// URL")
    if isinstance(b.source, PkiIntermediateVariant):
        _validate_pki_intermediate(f"{key}.source.pki_intermediate", b, b.source.pki_intermediate)
    if isinstance(b.source, PkiVariant):
        _validate_pki(f"{key}.source.pki", b, b.source.pki)


#: a label value, as the API server checks it
_LABEL_VALUE = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?")


def _validate_remote_secret(key: str, b: RemoteSecretBundle) -> None:
    """A remote-secret bundle: a KV path without fields, and a cluster name."""
    if "/" not in b.source.kv.strip("/"):
        raise ConfigError(
            f"{key}.source.kv must be MOUNT/PATH, such as kv/istio/remote-secrets/cluster-a,"
            f" not {shown(b.source.kv, 80)!r}"
        )
    if b.source.fields:
        raise ConfigError(f"{key}.source.fields does not apply to remote-secret bundles; set cluster instead")
    if not b.cluster:
        raise ConfigError(
            f"missing required key {key}.cluster: the remote cluster's name, the key of its kubeconfig in KV"
            " (istioctl create-remote-secret --name)"
        )
    if not CLUSTER_NAME.fullmatch(b.cluster):
        raise ConfigError(
            f"{key}.cluster must be lower-case letters, digits, '-' or '.' (it names the Secret"
            f" istio-remote-secret-CLUSTER), not {shown(b.cluster, 80)!r}"
        )
    if b.namespace is not None and not DNS_LABEL.fullmatch(b.namespace):
        raise ConfigError(f"{key}.namespace must be a Kubernetes namespace name, not {shown(b.namespace, 80)!r}")
    if not _LABEL_VALUE.fullmatch(b.name):
        raise ConfigError(
            f"{key}.name of a remote-secret bundle labels its Secret: at most 63 letters, digits, '-', '_' or '.',"
            f" starting and ending with a letter or digit, not {shown(b.name)!r}"
        )


def _check_remote_secrets_unique(cfg: AgentConfig) -> None:
    """Two bundles must never write the same Secret."""
    seen: dict[tuple[str | None, str], str] = {}
    for i, b in enumerate(cfg.bundles):
        if not isinstance(b, RemoteSecretBundle) or b.cluster is None:
            continue
        # the namespace the Secret lands in (agent.targets.secret.namespace_of): an explicit namespace equal to the
        # pod's is the same Secret
        where = (b.namespace or cfg.kubernetes.pod_namespace or "istio-system", b.cluster)
        if where in seen:
            raise ConfigError(
                f"bundles[{i}].cluster {b.cluster!r} is also the cluster of bundle {seen[where]}:"
                " one bundle per remote cluster"
            )
        seen[where] = b.name


_MOUNT = re.compile(r"[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*")
_SIGN_PATH = re.compile(r"root/sign-intermediate|issuer/[A-Za-z0-9_.-]+/sign-intermediate")


def _check_mount(key: str, mount: str) -> None:
    if not _MOUNT.fullmatch(mount.strip("/")):
        raise ConfigError(f"{key}.mount must be the path of a PKI mount such as pki, not {shown(mount, 80)!r}")


def _check_renewal_margin(key: str, b: FileBundle, left: float) -> None:
    """/readyz fails inside ready_min_remaining: renewal must come before that, or the bundle is never ready."""
    if left <= b.ready_min_remaining:
        raise ConfigError(
            f"{key}.ttl leaves {left:g}s at renewal, not more than ready_min_remaining ({b.ready_min_remaining:g}s),"
            " so /readyz would fail before each renewal: raise the ttl or lower ready_min_remaining"
        )


def _validate_pki_intermediate(key: str, b: FileBundle, s: PkiIntermediateSource) -> None:
    _check_mount(key, s.mount)
    if not _SIGN_PATH.fullmatch(s.path.strip("/")):
        raise ConfigError(
            f"{key}.path must be root/sign-intermediate or issuer/<ref>/sign-intermediate, not {shown(s.path, 80)!r}"
        )
    if not s.cluster.strip():
        raise ConfigError(f"{key}.cluster must name the cluster (the intermediate's L=)")
    if not 0 < s.renew_before < 1:
        raise ConfigError(f"{key}.renew_before must be a fraction of the lifetime between 0 and 1, such as 0.33")
    if s.ttl < 1:
        raise ConfigError(f"{key}.ttl must be at least 1s")
    if s.extra_roots_kv is not None and "/" not in s.extra_roots_kv.strip("/"):
        raise ConfigError(
            f"{key}.extra_roots_kv must be MOUNT/PATH of a KV secret, such as secret/istio/extra-roots,"
            f" not {shown(s.extra_roots_kv, 80)!r}"
        )
    _check_renewal_margin(key, b, s.ttl * s.renew_before * 0.95)


def _validate_pki(key: str, b: FileBundle, s: PkiSource) -> None:
    import ipaddress

    _check_mount(key, s.mount)
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", s.role):
        raise ConfigError(f"{key}.role must be the name of a role of the PKI mount, not {shown(s.role, 80)!r}")
    if not s.common_name.strip():
        raise ConfigError(f"{key}.common_name must not be empty")
    for i, name in enumerate(s.alt_names):
        if not name.strip() or "," in name:
            raise ConfigError(f"{key}.alt_names[{i}] must be a DNS name or email, not {shown(name, 80)!r}")
    for i, ip in enumerate(s.ip_sans):
        try:
            ipaddress.ip_address(ip)
        except ValueError:
            raise ConfigError(f"{key}.ip_sans[{i}] must be an IP address, not {shown(ip, 80)!r}") from None
    if s.ttl < 1:
        raise ConfigError(f"{key}.ttl must be at least 1s")
    _check_renewal_margin(key, b, s.ttl / 3 * 0.95)
