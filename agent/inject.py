"""`istio-vault-agent inject`: a Helm post-renderer and kustomize-friendly filter.

Adds the agent as a native sidecar to istiod (or gateway) Deployments in a YAML manifest stream,
for charts that have no `initContainers` value; every other document passes through byte for byte.
"""

from __future__ import annotations

import argparse
import copy
import fnmatch
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

import yaml

from agent import __version__
from agent.config import safe_yaml_loader
from agent.errors import AgentError, ConfigError
from agent.text import shown

__all__ = [
    "InjectOptions",
    "add_arguments",
    "agent_container",
    "agent_volumes",
    "inject",
    "main",
    "options_from_args",
    "run",
]

AGENT_CONTAINER = "istio-vault-agent"
CA_VOLUME = "istio-vault-agent-ca"
TOKEN_VOLUME = "istio-vault-agent-token"
CONFIG_VOLUME = "istio-vault-agent-config"
CONFIG_DIR = "/etc/istio-vault-agent"
TOKEN_DIR = "/var/run/secrets/vault"
HEALTH_PORT = 8099
DEFAULT_IMAGE = f"istio-vault-agent:{__version__}"
DEFAULT_MOUNT_PATH = "/var/run/secrets/istio-ca"
DEFAULT_NAMES = ("istiod", "istiod-*")

# A document starts at a `---` line in column 0. Inside a block scalar such a line would have
# to be indented, so splitting on it never cuts a document in two; _split() double-checks.
_DOC_START = re.compile(r"^---(?:[ \t].*)?$", re.MULTILINE)

# the C loader/dumper is several times faster on a full istiod chart when libyaml is present
_Loader = safe_yaml_loader()
_Dumper: type[yaml.SafeDumper] = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


@dataclass(frozen=True)
class InjectOptions:
    """What to inject and where; the defaults match charts/istio-vault-agent/examples/istiod-values.yaml."""

    names: tuple[str, ...] = ()
    selector: Mapping[str, str] = field(default_factory=dict)
    image: str = DEFAULT_IMAGE
    config_map: str = AGENT_CONTAINER
    audience: str = "vault"
    container: str = "discovery"
    mount_path: str = DEFAULT_MOUNT_PATH
    token_expiration: int = 3600
    #: set ROOT_CA_DIR on the target container; None means "only when it is istiod's discovery"
    root_ca_dir_env: bool | None = None
    #: run the agent as uid/gid 1337 (istio-proxy's); False leaves the uid to the platform (OpenShift's SCC)
    pin_uid: bool = True
    #: change nothing: fail when a selected Deployment lacks any part of the agent's wiring
    check: bool = False

    @property
    def sets_root_ca_dir(self) -> bool:
        """Whether ROOT_CA_DIR is set on the target container."""
        if self.root_ca_dir_env is None:
            return self.container == "discovery"
        return self.root_ca_dir_env


def agent_container(opts: InjectOptions) -> dict[str, Any]:
    """The agent's native-sidecar initContainer, the same one the example values add."""
    return {
        "name": AGENT_CONTAINER,
        "image": opts.image,
        "imagePullPolicy": "IfNotPresent",
        # restartPolicy Always makes it a native sidecar: started before the main containers,
        # which wait for its startupProbe, and kept running to follow rotations.
        "restartPolicy": "Always",
        # the agent's fatal `error:` line, else the log's tail, is what `kubectl describe pod` shows
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "args": ["run", "--config", f"{CONFIG_DIR}/config.yaml", "--mode", "sidecar"],
        "env": [
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        ],
        "ports": [{"name": "agent-health", "containerPort": HEALTH_PORT, "protocol": "TCP"}],
        # 2 s x 75 = 150 s: longer than the agent's default init.timeout (120 s).
        "startupProbe": {
            "httpGet": {"path": "/readyz", "port": HEALTH_PORT},
            "periodSeconds": 2,
            "timeoutSeconds": 2,
            "failureThreshold": 75,
        },
        "livenessProbe": {
            "httpGet": {"path": "/healthz", "port": HEALTH_PORT},
            "periodSeconds": 10,
            "timeoutSeconds": 2,
            "failureThreshold": 3,
        },
        # Measured sizes (bench/RESULTS.md), kept equal to the chart's example values (a test checks it).
        "resources": {"requests": {"cpu": "5m", "memory": "64Mi"}, "limits": {"memory": "128Mi"}},
        "securityContext": _security_context(opts),
        "volumeMounts": [
            {"name": CA_VOLUME, "mountPath": opts.mount_path},
            {"name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": True},
            {"name": CONFIG_VOLUME, "mountPath": CONFIG_DIR, "readOnly": True},
        ],
    }


def _security_context(opts: InjectOptions) -> dict[str, Any]:
    pinned = {"runAsUser": 1337, "runAsGroup": 1337} if opts.pin_uid else {}
    return {
        "runAsNonRoot": True,
        # istiod and istio-proxy run as 1337 too, so the 0600 key stays readable to them; OpenShift's restricted
        # SCC assigns a uid from the namespace's range instead, and readers get the key through fsGroup (0640)
        **pinned,
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def agent_volumes(opts: InjectOptions) -> list[dict[str, Any]]:
    """The pod volumes the agent needs: shared memory emptyDir, Vault-audience token, its ConfigMap."""
    return [
        {"name": CA_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": "4Mi"}},
        {
            "name": TOKEN_VOLUME,
            "projected": {
                "sources": [
                    {
                        "serviceAccountToken": {
                            "audience": opts.audience,
                            "expirationSeconds": opts.token_expiration,
                            "path": "token",
                        }
                    }
                ]
            },
        },
        {"name": CONFIG_VOLUME, "configMap": {"name": opts.config_map}},
    ]


def _upsert(items: list[Any], new: dict[str, Any]) -> None:
    """Replace the entry with new's name in place, or append it: re-running yields the same list."""
    for i, item in enumerate(items):
        if isinstance(item, dict) and item.get("name") == new["name"]:
            items[i] = new
            return
    items.append(new)


def _list_at(obj: dict[str, Any], key: str, where: str) -> list[Any]:
    value = obj.get(key)
    if value is None:
        value = obj[key] = []
    if not isinstance(value, list):
        raise ConfigError(f"{where}: {key} is not a list")
    return value


def _mapping(value: Any) -> dict[str, Any]:
    """`value` when it is a mapping, else {} (a rendered manifest can hold anything where a mapping belongs)."""
    return value if isinstance(value, dict) else {}


def _describe(doc: Mapping[str, Any]) -> str:
    meta = _mapping(doc.get("metadata"))
    ns, name = meta.get("namespace"), shown(meta.get("name"), 80)
    return f"Deployment {shown(ns, 80)}/{name}" if ns else f"Deployment {name}"


def _matches(doc: Any, opts: InjectOptions) -> bool:
    if not isinstance(doc, dict) or doc.get("kind") != "Deployment":
        return False
    if not str(doc.get("apiVersion", "")).startswith("apps/"):
        return False
    meta = _mapping(doc.get("metadata"))
    name = str(meta.get("name", ""))
    patterns = opts.names or (DEFAULT_NAMES if not opts.selector else ("*",))
    if not any(fnmatch.fnmatchcase(name, p) for p in patterns):
        return False
    labels = _mapping(meta.get("labels"))
    return all(k in labels and str(labels[k]) == v for k, v in opts.selector.items())


def _inject_deployment(doc: dict[str, Any], opts: InjectOptions) -> None:
    """Add the agent to one Deployment in place; raise ConfigError naming what is missing."""
    where = _describe(doc)
    pod = _mapping(_mapping(doc.get("spec")).get("template")).get("spec")
    if not isinstance(pod, dict):
        raise ConfigError(f"{where} has no spec.template.spec to add the agent to")
    containers = _list_at(pod, "containers", where)
    target = next((c for c in containers if isinstance(c, dict) and c.get("name") == opts.container), None)
    if target is None:
        found = ", ".join(str(c.get("name")) for c in containers if isinstance(c, dict)) or "none"
        raise ConfigError(
            f"{where} has no container named {opts.container!r} (it has: {found}); pick one with --container"
        )
    mounts = _list_at(target, "volumeMounts", where)
    for m in mounts:
        if isinstance(m, dict) and m.get("mountPath") == opts.mount_path and m.get("name") != CA_VOLUME:
            raise ConfigError(
                f"{where}: container {opts.container} already mounts volume {m.get('name')!r} at "
                f"{opts.mount_path}; choose another --mount-path"
            )
    _upsert(_list_at(pod, "initContainers", where), agent_container(opts))
    for volume in agent_volumes(opts):
        _upsert(_list_at(pod, "volumes", where), volume)
    _upsert(mounts, {"name": CA_VOLUME, "mountPath": opts.mount_path, "readOnly": True})
    if opts.sets_root_ca_dir:
        _upsert(_list_at(target, "env", where), {"name": "ROOT_CA_DIR", "value": opts.mount_path})


def _named(items: Any) -> list[dict[str, Any]]:
    return [i for i in items or [] if isinstance(i, dict)] if isinstance(items, list) else []


def _root_ca_dir(container: dict[str, Any]) -> str | None:
    for env in _named(container.get("env")):
        if env.get("name") == "ROOT_CA_DIR" and isinstance(env.get("value"), str):
            return str(env["value"]).rstrip("/") or "/"
    return None


def _wiring_gaps(doc: dict[str, Any], opts: InjectOptions) -> tuple[bool, list[str]]:
    """Whether the Deployment carries any of the agent's wiring, and what of it is missing.

    Wiring: the agent initContainer, its volumes, a container mounting the shared volume, or ROOT_CA_DIR naming
    the agent's directory (the agent's own mount of the shared volume, else --mount-path) with nothing else
    mounted there.
    """
    pod = _mapping(_mapping(doc.get("spec")).get("template")).get("spec")
    if not isinstance(pod, dict):
        return False, ["it has no spec.template.spec"]
    agent = next((c for c in _named(pod.get("initContainers")) if c.get("name") == AGENT_CONTAINER), None)
    volumes = {v.get("name") for v in _named(pod.get("volumes"))}
    ours = [CA_VOLUME, TOKEN_VOLUME, CONFIG_VOLUME]
    agent_dir = next((str(m.get("mountPath", "")).rstrip("/") for m in _named((agent or {}).get("volumeMounts"))
                      if m.get("name") == CA_VOLUME), opts.mount_path)
    readers: list[str] = []
    gaps: list[str] = []
    touched = agent is not None or any(v in volumes for v in ours)
    for c in _named(pod.get("containers")):
        name = shown(c.get("name"), 60)
        mounts = {str(m.get("mountPath", "")).rstrip("/"): m.get("name") for m in _named(c.get("volumeMounts"))}
        if CA_VOLUME in mounts.values():
            readers.append(name)
            touched = True
        root_ca_dir = _root_ca_dir(c)
        if root_ca_dir is None or mounts.get(root_ca_dir, CA_VOLUME) != CA_VOLUME:
            continue
        if root_ca_dir == agent_dir or mounts.get(root_ca_dir) == CA_VOLUME:
            touched = True
            if mounts.get(root_ca_dir) != CA_VOLUME:
                gaps.append(f"its {name} container sets ROOT_CA_DIR={shown(root_ca_dir, 80)} without mounting "
                            f"volume {CA_VOLUME} there")
    if agent is None:
        gaps.insert(0, f"it has no {AGENT_CONTAINER} initContainer")
    missing = [v for v in ours if v not in volumes]
    if missing:
        gaps.append(f"it lacks volume{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
    if not readers and not any("ROOT_CA_DIR" in g for g in gaps):
        gaps.append(f"no container besides the agent mounts volume {CA_VOLUME}")
    return touched, gaps


def _half_wired(doc: dict[str, Any], gaps: list[str], opts: InjectOptions) -> ConfigError:
    """The one-sentence error for a Deployment that has part of the agent's wiring: what is missing, what to do."""
    where = _describe(doc)
    pod = doc["spec"]["template"]["spec"]
    names = [c.get("name") for c in _named(pod.get("containers"))]
    istiod = "discovery" in names or any(_root_ca_dir(c) for c in _named(pod.get("containers")))
    if istiod:
        advice = (
            "istiod charts 1.24+ copy pilot.* over the top-level values, so your own pilot.initContainers, "
            "pilot.volumes or pilot.volumeMounts replace the example's lists: put the example's entries into those "
            "pilot.* lists too (one merged list each)"
        )
    elif gaps[0].startswith("it has no "):
        proxy = next((n for n in names if n == "istio-proxy"), names[0] if names else opts.container)
        name = _mapping(doc.get("metadata")).get("name")
        advice = (
            "gateway charts 1.25 and 1.26 accept initContainers but drop them: add the agent with "
            f"`istio-vault-agent inject --name {shown(name, 80)} --container {shown(proxy, 60)}` "
            "or use gateway chart 1.27+"
        )
    else:
        advice = "Helm replaces lists: merge your own volumes, volumeMounts and initContainers with the example's"
    return ConfigError(f"{where} has only part of the agent's wiring ({'; '.join(gaps)}): {advice}")


def _check(doc: dict[str, Any], opts: InjectOptions, *, selected: bool) -> bool:
    """Raise ConfigError for a Deployment that is half-wired (or, when `selected`, not wired at all).

    Returns whether the Deployment carries the agent's wiring (then, having passed, all of it).
    """
    touched, gaps = _wiring_gaps(doc, opts)
    if gaps and (touched or selected):
        if not touched:
            raise ConfigError(
                f"{_describe(doc)} has no {AGENT_CONTAINER} initContainer, volumes or mount: add the example values "
                "(chart 1.24+ for istiod, 1.27+ for gateways) or run inject without --check to add them"
            )
        raise _half_wired(doc, gaps, opts)
    if touched or selected:
        _check_remote_files(doc)
    return touched


#: istiod's switch to remote kubeconfigs read from files (pilot/pkg/features/pilot.go, istio/istio#58927, 1.30.0)
KUBECONFIG_PATH_ENV = "PILOT_MULTICLUSTER_KUBECONFIG_PATH"
#: the volume the example values share between the agent and discovery for them
REMOTE_VOLUME = "istio-vault-agent-remote-kubeconfigs"
# the version in an image tag: pilot:1.29.2, pilot:1.30.0-distroless (a tag such as master or latest says none)
_TAG_VERSION = re.compile(r":(\d+)\.(\d+)(?:[.\-][^/@]*)?(?:@.*)?$")


def _check_remote_files(doc: dict[str, Any]) -> None:
    """A container that sets PILOT_MULTICLUSTER_KUBECONFIG_PATH must be istiod 1.30+ (older ones ignore it and
    would never see a remote cluster) and mount the agent's kubeconfig volume at that path.

    Raises:
        ConfigError: one sentence naming the Deployment, the container and what to change.
    """
    pod = _mapping(_mapping(doc.get("spec")).get("template")).get("spec")
    for c in _named(_mapping(pod).get("containers")):
        path = next((str(e.get("value", "")) for e in _named(c.get("env")) if e.get("name") == KUBECONFIG_PATH_ENV),
                    None)
        if path is None:
            continue
        where, name = _describe(doc), shown(c.get("name"), 60)
        image = str(c.get("image", ""))
        version = _TAG_VERSION.search(image)
        if version is not None and (int(version.group(1)), int(version.group(2))) < (1, 30):
            raise ConfigError(
                f"{where} sets {KUBECONFIG_PATH_ENV} on its {name} container, which runs {shown(image, 120)}: istiod"
                " reads remote kubeconfigs from files only from 1.30, so upgrade istiod or publish the remote"
                " clusters as Secrets (target: secret)"
            )
        mounts = {str(m.get("mountPath", "")).rstrip("/"): m.get("name") for m in _named(c.get("volumeMounts"))}
        if mounts.get(path.rstrip("/")) != REMOTE_VOLUME:
            raise ConfigError(
                f"{where} sets {KUBECONFIG_PATH_ENV}={shown(path, 80)} on its {name} container without mounting volume"
                f" {REMOTE_VOLUME} there: add the volume and mounts of examples/istiod-remote-files-values.yaml"
            )


def _split(text: str) -> list[str]:
    """Split a YAML stream into chunks, each holding its own `---` line, so untouched ones can be echoed."""
    starts = [m.start() for m in _DOC_START.finditer(text)]
    if not starts or starts[0] != 0:
        starts.insert(0, 0)
    return [text[a:b] for a, b in zip(starts, [*starts[1:], len(text)], strict=True)]


def _load(chunk: str, index: int) -> Any:
    try:
        return yaml.load(chunk, Loader=_Loader)  # noqa: S506 - a safe loader (CSafeLoader or SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" near line {mark.line + 1} of document {index + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "not valid YAML"
        raise ConfigError(f"the manifests on stdin are not valid YAML{where}: {problem}") from exc


def _dump(doc: Any) -> str:
    # A huge width keeps long strings (annotations, args) on one line, as they came in.
    return str(
        yaml.dump(doc, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=1 << 30, allow_unicode=True)
    )


def _head(chunk: str) -> str:
    """The chunk's `---` line and leading comments (e.g. Helm's `# Source:`), kept on rewritten documents."""
    keep: list[str] = []
    for i, line in enumerate(chunk.splitlines()):
        stripped = line.strip()
        if i == 0 and _DOC_START.match(line):
            # `--- !tag` or `--- {a: 1}` carries document content, which the dump re-emits.
            rest = line[3:].strip()
            keep.append(line if not rest or rest.startswith("#") else "---")
        elif not stripped or stripped.startswith("#"):
            keep.append(line)
        else:
            break
    return "".join(f"{line}\n" for line in keep)


def _process(doc: Any, opts: InjectOptions) -> tuple[Any, int]:
    """Return (new document, number of Deployments injected); lists and ResourceLists are walked."""
    if isinstance(doc, dict) and doc.get("kind") in {"List", "ResourceList"} and isinstance(doc.get("items"), list):
        new = copy.deepcopy(doc)
        count = 0
        for i, item in enumerate(new["items"]):
            new["items"][i], n = _process(item, opts)
            count += n
        return new, count
    if _matches(doc, opts):
        if opts.check:
            _check(doc, opts, selected=True)
            return doc, 1
        new = copy.deepcopy(doc)
        _inject_deployment(new, opts)
        return new, 1
    if isinstance(doc, dict) and doc.get("kind") == "Deployment":
        # not ours to change, but a Deployment left half-wired by values would start without its CA or bundles
        wired = _check(doc, opts, selected=False)
        if wired and opts.check and not opts.names and not opts.selector:
            # `--check` alone checks whatever carries the agent: a gateway (any name) as well as istiod
            return doc, 1
    return doc, 0


def _no_match(opts: InjectOptions) -> str:
    parts = [f"--name {n}" for n in opts.names] + [f"--selector {k}={v}" for k, v in opts.selector.items()]
    if parts:
        return f"no Deployment matched {' '.join(parts)}"
    if opts.check:
        return ("no Deployment named istiod or istiod-* and none with the agent's wiring in the input: add the example "
                "values, or select the Deployment to check with --name or --selector")
    return "no Deployment named istiod or istiod-* in the input; select one with --name or --selector"


def inject(text: str, opts: InjectOptions) -> str:
    """Return the manifest stream with the agent added to every matching Deployment.

    Documents that are not changed come back byte for byte; running the result through again
    gives the same text. Raises ConfigError when nothing matches, the input is not YAML, or a
    matching Deployment lacks the target container.
    """
    chunks = _split(text)
    docs = [_load(c, i) for i, c in enumerate(chunks)]
    # Guard the text-level split with the real parser: the two must see the same documents.
    whole = [d for d in yaml.load_all(text, Loader=_Loader) if d is not None]
    if whole != [d for d in docs if d is not None]:
        raise ConfigError("the manifests on stdin could not be split into documents at their `---` lines")
    out: list[str] = []
    total = 0
    for chunk, doc in zip(chunks, docs, strict=True):
        new, count = _process(doc, opts)
        total += count
        if count and new != doc:
            out.append(_head(chunk) + _dump(new))
        else:
            out.append(chunk)
    if total == 0:
        raise ConfigError(_no_match(opts))
    return "".join(out)


def _selector(value: str) -> tuple[str, str]:
    key, sep, val = value.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, got {value!r}")
    return key, val


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `inject` options to a (sub)parser; `run` reads them back."""
    parser.description = (
        "Read Kubernetes manifests on stdin (Helm post-renderer, kustomize or a pipe), add istio-vault-agent as "
        "a native sidecar to the selected Deployments, write all manifests to stdout. Idempotent."
    )
    parser.add_argument(
        "--name",
        action="append",
        default=[],
        metavar="NAME",
        help="Deployment name or glob to change; repeatable (default: istiod and istiod-*)",
    )
    parser.add_argument(
        "--selector",
        action="append",
        default=[],
        type=_selector,
        metavar="KEY=VALUE",
        help="only Deployments carrying this label; repeatable, all must match",
    )
    parser.add_argument("--image", default=DEFAULT_IMAGE, help=f"agent image (default: {DEFAULT_IMAGE})")
    parser.add_argument(
        "--config-map",
        default=AGENT_CONTAINER,
        help="ConfigMap rendered by the istio-vault-agent chart (default: %(default)s)",
    )
    parser.add_argument(
        "--audience",
        default="vault",
        help="audience of the projected token the agent logs in with (default: %(default)s)",
    )
    parser.add_argument(
        "--container",
        default="discovery",
        help="container that reads the files: discovery for istiod, istio-proxy for gateways (default: %(default)s)",
    )
    parser.add_argument(
        "--mount-path",
        default=DEFAULT_MOUNT_PATH,
        help="where the shared volume is mounted; not /etc/cacerts (default: %(default)s)",
    )
    parser.add_argument(
        "--pin-uid",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run the agent as uid/gid 1337 like istio-proxy; --no-pin-uid on OpenShift, whose SCC assigns the uid "
        "(then give the bundles key_mode 0640: the chart's openshift=true does) (default: pinned)",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="change nothing: fail when a selected Deployment (default: istiod, istiod-* and every Deployment with "
        "part of the agent's wiring, gateways included) lacks the agent container, its volumes or the reader's mount "
        "(a post-renderer for the example values)",
    )
    parser.add_argument(
        "--root-ca-dir-env",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="set ROOT_CA_DIR on the container (default: only when it is discovery)",
    )


def options_from_args(args: argparse.Namespace) -> InjectOptions:
    """Build InjectOptions from parsed `inject` arguments; raise ConfigError for unusable values."""
    mount_path = str(args.mount_path).rstrip("/") or "/"
    if not mount_path.startswith("/"):
        raise ConfigError(f"--mount-path must be an absolute path, got {args.mount_path!r}")
    if mount_path == "/etc/cacerts":
        raise ConfigError("--mount-path /etc/cacerts is where the istiod chart mounts the cacerts Secret; pick another")
    return InjectOptions(
        names=tuple(args.name),
        selector=dict(args.selector),
        image=args.image,
        config_map=args.config_map,
        audience=args.audience,
        container=args.container,
        mount_path=mount_path,
        root_ca_dir_env=args.root_ca_dir_env,
        pin_uid=args.pin_uid,
        check=args.check,
    )


def run(
    args: argparse.Namespace, stdin: TextIO | None = None, stdout: TextIO | None = None, stderr: TextIO | None = None
) -> int:
    """Filter stdin to stdout; on a user error print one `error:` line to stderr and return 1."""
    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    try:
        result = inject(stdin.read(), options_from_args(args))
    except AgentError as exc:
        print(f"error: {exc}", file=stderr)
        return 1
    stdout.write(result)
    stdout.flush()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run `inject` on its own (`python -m agent.inject`); returns the exit code."""
    parser = argparse.ArgumentParser(prog="istio-vault-agent inject")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
