"""Configuration: typed, frozen settings from YAML, then env, then flags; validate() checks cross-field rules.

The YAML keys are a contract (issue 2 and 3): tools outside the package write these files.
"""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import msgspec

from agent import kinds
from agent.errors import ConfigError
from agent.text import shown

__all__ = [
    "CONFIG_ENV",
    "SA_TOKEN_PATH",
    "AgentConfig",
    "AuthConfig",
    "BundleConfig",
    "Duration",
    "ExecReload",
    "HealthConfig",
    "HttpReload",
    "InitConfig",
    "KubernetesConfig",
    "LimitsConfig",
    "LogConfig",
    "NoReload",
    "Reload",
    "RolloutRestartReload",
    "RolloutTarget",
    "SidecarConfig",
    "SignalReload",
    "Size",
    "SourceConfig",
    "VaultConfig",
    "from_mapping",
    "load",
    "parse_duration",
    "parse_listen",
    "parse_signal",
    "parse_size",
    "safe_yaml_loader",
    "validate",
]

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
    address: str = ""
    ca_cert: str | None = None
    namespace: str | None = None
    tls_server_name: str | None = None
    skip_verify: bool = False
    #: per-request timeout; hvac blocks, so this bounds every call
    timeout: Duration = Duration(10)


class AuthConfig(_Section, frozen=True):
    method: Literal["kubernetes", "jwt", "token"] = "kubernetes"
    mount: str | None = None
    role: str | None = None
    token_path: str = SA_TOKEN_PATH


class SourceConfig(_Section, frozen=True):
    """Where a bundle's data comes from: exactly one variant key is set.

    A new source is one more variant here (a key holding its settings) plus its module `agent/sources/<key>.py`.
    """

    #: KV v1 or v2 secret, MOUNT/PATH; `fields` maps output files to its keys
    kv: str | None = None
    fields: dict[str, str] = {}

    @property
    def variant(self) -> str:
        """The name of the variant that is set (also the module in agent/sources that reads it)."""
        for name in _SOURCE_VARIANTS:
            if getattr(self, name) is not None:
                return name
        raise ConfigError(f"a bundle source needs one of: {', '.join(_SOURCE_VARIANTS)}")


#: the variant keys of SourceConfig, in the order messages list them
_SOURCE_VARIANTS = ("kv",)


class SignalReload(_Section, frozen=True, tag_field="action", tag="signal"):
    signal: str = "SIGHUP"
    process: str | None = None
    pid_file: str | None = None


class ExecReload(_Section, frozen=True, tag_field="action", tag="exec"):
    command: list[str]
    timeout: Duration = Duration(10)


class HttpReload(_Section, frozen=True, tag_field="action", tag="http"):
    url: str
    method: str = "POST"
    timeout: Duration = Duration(10)


class RolloutTarget(_Section, frozen=True):
    kind: Literal["Deployment", "DaemonSet", "StatefulSet"]
    name: str
    namespace: str | None = None


class RolloutRestartReload(_Section, frozen=True, tag_field="action", tag="rollout-restart"):
    target: RolloutTarget


class NoReload(_Section, frozen=True, tag_field="action", tag="none"):
    pass


Reload = SignalReload | ExecReload | HttpReload | RolloutRestartReload | NoReload


class BundleConfig(_Section, frozen=True):
    name: str
    dir: str
    source: SourceConfig
    type: Literal["istio-ca", "tls"] = "istio-ca"
    file_mode: int = 0o644
    key_mode: int = 0o600
    uid: int | None = None
    gid: int | None = None
    reload: Reload = NoReload()
    multiroot: bool = False
    on_root_change: Literal["restart", "none"] = "restart"
    restart_process: str = "pilot-discovery"
    ready_min_remaining: Duration = Duration(3600)
    #: tls: tls.crt must chain to ca.crt; false when ca.crt is the CA of client certificates (gateway MUTUAL)
    ca_signs_cert: bool = True

    @property
    def kind(self) -> kinds.Kind:
        """What this bundle's `type` is made of and how it is validated."""
        return kinds.get(self.type)

    @property
    def files(self) -> dict[str, str]:
        """Output file -> KV key, the kind's defaults overlaid with `source.fields`."""
        return {**self.kind.kv_fields, **self.source.fields}


class LimitsConfig(_Section, frozen=True):
    """Bounds on what the agent reads: nothing Vault sends can make it use more memory or time than this."""

    #: the largest answer read from Vault (a KV secret with all its fields); never read beyond
    max_secret_size: Size = Size(1 << 20)
    #: the largest bundle file validated (and what `check` reads of a file)
    max_file_size: Size = Size(1 << 20)
    #: PEM blocks per bundle file
    max_certs_per_file: int = 64


class InitConfig(_Section, frozen=True):
    timeout: Duration = Duration(120)


class HealthConfig(_Section, frozen=True):
    listen: str = "0.0.0.0:8099"


class SidecarConfig(_Section, frozen=True):
    poll_interval: Duration = Duration(30)


class LogConfig(_Section, frozen=True):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "console"] = "json"
    #: where a fatal `error:` line is also written, so `kubectl describe pod` shows it (skipped when not writable)
    termination_message_path: str = "/dev/termination-log"


class KubernetesConfig(_Section, frozen=True):
    """The pod the agent runs in, from the downward API (env POD_NAME, POD_NAMESPACE, POD_UID, NODE_NAME).

    Read once at start; Events are recorded on this pod when name and namespace are known.
    """

    pod_name: str | None = None
    pod_namespace: str | None = None
    pod_uid: str | None = None
    node_name: str | None = None


class AgentConfig(_Section, frozen=True):
    bundles: list[BundleConfig]
    vault: VaultConfig = VaultConfig()
    auth: AuthConfig = AuthConfig()
    init: InitConfig = InitConfig()
    health: HealthConfig = HealthConfig()
    sidecar: SidecarConfig = SidecarConfig()
    log: LogConfig = LogConfig()
    kubernetes: KubernetesConfig = KubernetesConfig()
    limits: LimitsConfig = LimitsConfig()


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


_CHOICES = {
    "method": "kubernetes, jwt, token",
    "type": "istio-ca, tls",
    "action": "signal, exec, http, rollout-restart, none",
    "on_root_change": "restart, none",
    "kind": "Deployment, DaemonSet, StatefulSet",
    "level": "debug, info, warning, error",
    "format": "json, console",
}


def _friendly(err: msgspec.ValidationError) -> str:
    """Turn msgspec's message into one sentence that names the key in YAML terms."""
    text = str(err)
    where = ""
    if " - at `$" in text:
        text, _, path = text.rpartition(" - at `$")
        where = path.rstrip("`").lstrip(".")
    prefix = f"{where}." if where else ""
    if m := re.fullmatch(r"Object contains unknown field `(.+)`", text, re.DOTALL):
        return f"unknown key {prefix}{_key(m.group(1))}: remove it or check its spelling"
    if m := re.fullmatch(r"Object missing required field `(.+)`", text, re.DOTALL):
        return f"missing required key {prefix}{m.group(1)}"
    if m := re.fullmatch(r"Expected `(.+)`, got `(.+)`", text):
        want = " or ".join(_TYPE_WORDS.get(t.strip(), t.strip()) for t in m.group(1).split("|"))
        return f"{where or 'the config'} must be {want}, not {_TYPE_WORDS.get(m.group(2), m.group(2))}"
    if m := re.fullmatch(r"Invalid (?:enum )?value '?(.*?)'?", text):
        choices = _CHOICES.get(re.sub(r".*\.", "", where), "")
        use = f"; use one of {choices}" if choices else ""
        return f"{where} has an invalid value {shown(m.group(1), 60)!r}{use}"
    if m := re.fullmatch(r"Expected `(.+)` of length >= (\d+)", text):
        return f"{where} must not be empty"
    text = " ".join(text.split())
    return f"{where}: {text}" if where else text


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


def _apply_env(raw: dict[str, Any], env: Mapping[str, str]) -> None:
    """Env overrides the file, like the vault CLI: VAULT_ADDR (or BAO_ADDR), VAULT_CACERT, ..."""
    vault = raw.setdefault("vault", {})
    if not isinstance(vault, dict):
        return
    addr = env.get("VAULT_ADDR") or env.get("BAO_ADDR")
    if addr:
        vault["address"] = addr
    cacert = env.get("VAULT_CACERT") or env.get("BAO_CACERT")
    if cacert:
        vault["ca_cert"] = cacert
    namespace = env.get("VAULT_NAMESPACE") or env.get("BAO_NAMESPACE")
    if namespace:
        vault["namespace"] = namespace
    skip = env.get("VAULT_SKIP_VERIFY") or env.get("BAO_SKIP_VERIFY")
    if skip is not None and skip != "":
        lowered = skip.strip().lower()
        if lowered not in {"1", "0", "true", "false", "yes", "no"}:
            raise ConfigError(f"VAULT_SKIP_VERIFY must be true or false, not {shown(skip)!r}")
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
        raise ConfigError("missing required key bundles: list at least one bundle to publish")
    try:
        cfg = msgspec.convert(raw, type=AgentConfig, dec_hook=_dec_hook, strict=True)
    except msgspec.ValidationError as exc:
        raise ConfigError(_friendly(exc)) from None
    validate(cfg)
    return cfg


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


def validate(cfg: AgentConfig) -> None:
    """Rules across fields that types cannot express. Raises ConfigError naming the key."""
    _check_strings(cfg, "")
    if not cfg.vault.address:
        raise ConfigError("missing required key vault.address (or set VAULT_ADDR)")
    if not re.match(r"^https?://[^/]+", cfg.vault.address):
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
        norm = os.path.normpath(b.dir)
        if not b.dir or norm in dirs:
            raise ConfigError(f"{key}.dir must be a directory of its own, not {shown(b.dir)!r}")
        dirs.add(norm)
        _validate_bundle(key, b)
    parse_listen(cfg.health.listen)
    if cfg.sidecar.poll_interval < 0.1:
        raise ConfigError("sidecar.poll_interval must be at least 100ms")


def _validate_bundle(key: str, b: BundleConfig) -> None:
    """Rules within one bundle; `key` is its place in the file, such as bundles[0]."""
    set_variants = [name for name in _SOURCE_VARIANTS if getattr(b.source, name) is not None]
    if len(set_variants) != 1:
        raise ConfigError(f"{key}.source needs exactly one of {', '.join(_SOURCE_VARIANTS)}")
    kv = b.source.kv
    if kv is not None and "/" not in kv.strip("/"):
        raise ConfigError(f"{key}.source.kv must be MOUNT/PATH, such as secret/istio/cacerts, not {shown(kv, 80)!r}")
    if kv is None and b.source.fields:
        raise ConfigError(f"{key}.source.fields only applies to kv sources")
    allowed = b.kind.files
    for out in b.source.fields:
        if out not in allowed:
            raise ConfigError(
                f"{key}.source.fields has {shown(out)!r}, which a {b.type} bundle does not publish;"
                f" use {', '.join(allowed)}"
            )
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
    if b.type != "tls" and not b.ca_signs_cert:
        raise ConfigError(f"{key}.ca_signs_cert only applies to tls bundles")
    if b.type != "istio-ca" and b.multiroot:
        raise ConfigError(f"{key}.multiroot only applies to istio-ca bundles")
