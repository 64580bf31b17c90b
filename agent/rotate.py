"""`istio-vault-agent rotate status|trust|sign|retire`: rotate the mesh's root from A to a new root N across every
named cluster, in phases read back from KV each time (so a killed run is resumed by running it again).

trust: root_cert = the current bytes then N (both of istiod's reload rules take it); sign: a new intermediate
under N per cluster, root_cert unchanged; retire: root_cert = N alone. Each phase needs the previous one done in
every named cluster, `--wait-at-least` since it was written, and istiod's side ready (`--context`, or the facts as
flags). Every bundle is validated like istiod before it is written with check-and-set.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent import hvac_client, istio_certs, kinds, rotation
from agent.clusters import BUNDLE_KEYS, ClusterLayout, check_cluster_name
from agent.config import KEY_TYPES, parse_duration
from agent.errors import AgentError, ConfigError, KubeUnavailable
from agent.operator import ENV_HELP
from agent.rotation import PHASES, ClusterState, Stored
from agent.text import shown

if TYPE_CHECKING:
    import hvac

    from agent.ca import Root

__all__ = ["Facts", "add_arguments", "istiod_facts", "reload_rule", "run"]

Say = Callable[[str], None]

#: the phase each command writes, and the one every named cluster must be in (or past) first
_COMMANDS = {"trust": "A", "sign": "trust", "retire": "sign"}
#: the istiod container of the Deployment, and the agent's health port (inject.HEALTH_PORT)
_DISCOVERY, _AGENT_PORT = "discovery", 8099
#: the largest answer read from the Kubernetes API (a Deployment, a ConfigMap, a pod list, a /readyz)
_MAX_KUBE_BODY = 4 << 20
_KUBE_TIMEOUT = (5.0, 20.0)


# ---------------------------------------------------------------------------------------------- arguments


def _wait(text: str) -> float:
    try:
        return float(parse_duration(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--wait-at-least {shown(text, 40)!r}: {exc}") from None


def _pair(flag: str) -> Callable[[str], tuple[str, str]]:
    def parse(text: str) -> tuple[str, str]:
        name, sep, value = text.partition("=")
        if not sep or not name or not value:
            raise argparse.ArgumentTypeError(f"{flag} takes CLUSTER=VALUE, not {shown(text, 80)!r}")
        return name, value

    return parse


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"--agent-port takes a port from 1 to 65535, not {shown(text, 40)!r}")
    return int(text)


def _version(text: str) -> tuple[int, int, int]:
    found = _parse_version(text)
    if found is None:
        raise argparse.ArgumentTypeError(f"--istio-version takes a version such as 1.29.6, not {shown(text, 40)!r}")
    return found


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `status`, `trust`, `sign` and `retire` to the `rotate` (sub)parser; `run` reads them back."""
    parser.description = (
        "Rotate the mesh's root CA without downtime, one phase at a time across every cluster: trust (root_cert ="
        " old + new), sign (new intermediates under the new root), retire (root_cert = new only). Each phase is"
        " read back from KV, so running a command again resumes it. " + ENV_HELP
    )
    sub = parser.add_subparsers(dest="rotate_command", required=True, metavar="PHASE")
    helps = {
        "status": "each cluster's phase, read from KV (nothing is written)",
        "trust": "root_cert becomes the current bytes followed by the new root; intermediates unchanged",
        "sign": "a new intermediate per cluster signed by the new root's key; root_cert unchanged",
        "retire": "root_cert becomes the new root alone",
    }
    for name, text in helps.items():
        p = sub.add_parser(name, help=text, description=text + ". " + ENV_HELP)
        p.add_argument("--cluster", action="append", required=True, metavar="NAME",
                       help="a cluster of the mesh; repeat for each (every phase needs all of them)")
        p.add_argument("--kv", action="append", type=_pair("--kv"), default=[], metavar="CLUSTER=MOUNT/PATH",
                       help="the cluster's KV secret (default: kubernetes-<cluster>-secrets/istiod-service/certs)")
        p.add_argument("--namespace", default=None, metavar="NS",
                       help="Vault Enterprise / OpenBao namespace (default: VAULT_NAMESPACE)")
        p.add_argument("--root-dir", required=name != "status", metavar="DIR",
                       help="the new root, as `ca root` wrote it (root-cert.pem, root-key.pem; status reads only"
                       " root-cert.pem); its key never leaves this machine")
        if name == "status":
            continue
        p.add_argument("--wait-at-least", type=_wait, default=86400.0, metavar="DURATION",
                       help="refuse until this long since the previous phase was written (default 24h: one workload"
                       " certificate lifetime); 0s is allowed, with a warning")
        p.add_argument("--only", action="append", default=[], metavar="NAME",
                       help="write only this cluster (repeatable; e.g. sign one cluster at a time), after checking"
                       " every --cluster is ready for the phase")
        p.add_argument("--dry-run", action="store_true", help="print what each cluster would get; write nothing")
        p.add_argument("--context", action="append", type=_pair("--context"), default=[],
                       metavar="CLUSTER=KUBECONTEXT", help="check istiod in this kubeconfig context (KUBECONFIG)")
        p.add_argument("--multiroot-mesh", action="store_true",
                       help="without --context: istiod runs with ISTIO_MULTIROOT_MESH=true (not checked)")
        p.add_argument("--xds-agent", action="store_true", help="without --context: the mesh config sets"
                       " defaultConfig.proxyMetadata.PROXY_CONFIG_XDS_AGENT=\"true\" (not checked)")
        p.add_argument("--istio-version", type=_version, default=None, metavar="X.Y.Z",
                       help="without --context: istiod's version, which decides its reload rule (not checked)")
        p.add_argument("--istio-namespace", default="istio-system", metavar="NS", help="istiod's namespace")
        p.add_argument("--istiod", default="istiod", metavar="NAME", help="istiod's Deployment (default istiod)")
        p.add_argument("--agent-port", type=_port, default=_AGENT_PORT, metavar="PORT",
                       help="the agent's health port in istiod's pods (default 8099)")
        if name == "sign":
            p.add_argument("--days", type=int, default=istio_certs.INTERMEDIATE_DAYS,
                           help="the new intermediates' validity, capped at the root's (default: %(default)s)")
            p.add_argument("--key-type", choices=KEY_TYPES, default=None,
                           help="the new intermediates' key type (default: each cluster's current one)")


# ---------------------------------------------------------------------------------------------- istiod's side


@dataclass(frozen=True)
class Facts:
    """What a phase needs of one cluster's istiod, and whether it was looked at (--context) or asserted by flags."""

    multiroot: bool
    xds_agent: bool
    version: tuple[int, int, int] | None
    checked: bool
    #: per istiod pod: why its agent has not published what KV holds, or "" when it has (empty when not checked)
    pods: dict[str, str] = field(default_factory=dict)


def _parse_version(text: str) -> tuple[int, int, int] | None:
    m = re.match(r"v?(\d{1,3})\.(\d{1,3})(?:\.(\d{1,3}))?", text)
    return None if m is None else (int(m[1]), int(m[2]), int(m[3] or 0))


def reload_rule(version: tuple[int, int, int] | None) -> str:
    """How istiod of `version` compares a changed root-cert.pem with ISTIO_MULTIROOT_MESH=true (istio_ca.go)."""
    if version is None:
        return "version unknown: the bundles satisfy both rules (<= 1.29 byte containment, >= 1.30 DER sets)"
    name = ".".join(map(str, version))
    if version[:2] <= (1, 29):
        rule = f"istiod {name} reloads a changed root-cert.pem only when one file's bytes contain the other's"
    else:
        rule = f"istiod {name} reloads a changed root-cert.pem when one set of DER certificates contains the other"
    capped = version >= (1, 30, 0) or (version[:2] == (1, 29) and version >= (1, 29, 3)) or (
        version[:2] == (1, 28) and version >= (1, 28, 7))
    if capped:
        rule += ("; it caps workload certificates at the intermediate's notAfter and stops signing once it has"
                 " expired (#59766): renew an intermediate at least two workload lifetimes before it ends")
    return rule


def _kube_json(call: Callable[..., Any], what: str, context: str, **kwargs: Any) -> Any:
    """One Kubernetes API read as JSON, bounded in size and time; errors as one sentence."""
    from kubernetes.client.exceptions import ApiException

    try:
        resp = call(_preload_content=False, _request_timeout=_KUBE_TIMEOUT, **kwargs)
        status, raw = resp.status, resp.read(_MAX_KUBE_BODY + 1)
    except ApiException as exc:
        status, raw = int(exc.status or 0), (exc.body or b"")
        if isinstance(raw, str):
            raw = raw.encode()
        if status == 0:
            raise KubeUnavailable(f"cannot reach the Kubernetes API of context {shown(context)} while reading {what}")\
                from None
    except AgentError:
        raise
    except Exception as exc:  # noqa: BLE001 - urllib3/ssl failures: the API is not reachable
        raise KubeUnavailable(f"cannot reach the Kubernetes API of context {shown(context)} while reading {what}"
                              f" ({type(exc).__name__})") from None
    if len(raw) > _MAX_KUBE_BODY:
        raise KubeUnavailable(f"the Kubernetes API of context {shown(context)} sent over {_MAX_KUBE_BODY} bytes for"
                              f" {what}")
    try:
        body = json.loads(raw) if raw else None
    except ValueError:
        body = None
    return status, body


def _kube_api(context: str) -> Any:
    import shutil
    import tempfile

    from kubernetes import client as k8s
    from kubernetes import config as kconfig
    from kubernetes.config.config_exception import ConfigException

    # The kubernetes package writes *-data fields to files it removes only at a clean exit: load them into a private
    # directory, keep the CA in memory and remove what it wrote, so a killed `rotate` leaves nothing in /tmp.
    scratch = tempfile.mkdtemp(prefix="istio-vault-agent-kube-")
    keep = False
    try:
        cfg = k8s.Configuration()
        # KUBECONFIG read now: the kubernetes package reads it once, at its import
        files = os.environ.get("KUBECONFIG") or None
        kconfig.load_kube_config(config_file=files, context=context,  # type: ignore[no-untyped-call]
                                 client_configuration=cfg, temp_file_path=scratch)
        if cfg.ssl_ca_cert and str(cfg.ssl_ca_cert).startswith(scratch + os.sep):
            cfg.ca_cert_data = Path(cfg.ssl_ca_cert).read_text(encoding="ascii")
            cfg.ssl_ca_cert = None
        # a client certificate and key are read again at each new connection: they stay until the process exits
        keep = any(str(f or "").startswith(scratch + os.sep) for f in (cfg.cert_file, cfg.key_file))
        return k8s.ApiClient(cfg)
    except ConfigException as exc:
        raise ConfigError(f"cannot use kubeconfig context {shown(context)!r} (KUBECONFIG or ~/.kube/config):"
                          f" {shown(str(exc), 200)}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the kubeconfig for context {shown(context)!r}:"
                          f" {getattr(exc, 'strerror', None) or exc}") from None
    finally:
        _forget_temp_files(scratch)
        if keep:
            import atexit

            atexit.register(shutil.rmtree, scratch, ignore_errors=True)
        else:
            shutil.rmtree(scratch, ignore_errors=True)


def _forget_temp_files(scratch: str) -> None:
    """Drop the kubernetes package's cache entries for files under `scratch` (it hands a cached path out again for
    the same content, which would name a file removed with `scratch`)."""
    from kubernetes.config import kube_config

    cache = getattr(kube_config, "_temp_files", None)
    if isinstance(cache, dict):
        for key in [k for k, v in cache.items() if str(v).startswith(scratch + os.sep)]:
            del cache[key]


def _refused(status: int, what: str, context: str) -> ConfigError:
    if status == 404:
        return ConfigError(f"there is no {what} in context {shown(context)}: fix --istio-namespace or --istiod")
    if status in (401, 403):
        return ConfigError(f"context {shown(context)} may not read {what} (HTTP {status}): use a kubeconfig user that"
                           " can get deployments, configmaps and pods/proxy in istiod's namespace")
    return ConfigError(f"the Kubernetes API of context {shown(context)} answered HTTP {status} for {what}")


def _dig(obj: Any, *keys: str) -> Any:
    """obj[k1][k2]... where each level is a mapping; {} as soon as one is not (an answer of another shape)."""
    for key in keys:
        obj = obj.get(key) if isinstance(obj, dict) else None
    return {} if obj is None else obj


def _env_value(container: Mapping[str, Any], name: str) -> str | None:
    for env in container.get("env") or []:
        if isinstance(env, dict) and env.get("name") == name:
            value = env.get("value")
            return value if isinstance(value, str) else None
    return None


def _readyz_problem(body: Any, serial: str, roots: list[str]) -> str:
    """Why an agent's /readyz does not show the bundle KV holds ("" when some bundle shows it)."""
    bundles = body.get("bundles") if isinstance(body, dict) else None
    if not isinstance(bundles, dict) or not bundles:
        return "its agent's /readyz lists no bundle"
    seen = []
    for b in bundles.values():
        if not isinstance(b, dict):
            continue
        got_roots = b.get("roots")
        if b.get("serial") == serial and (not isinstance(got_roots, list) or got_roots == roots):
            return ""
        seen.append(f"serial {shown(str(b.get('serial')), 40)}"
                    + (f" with {len(got_roots)} root(s)" if isinstance(got_roots, list) else ""))
    return (f"its agent publishes {'; '.join(seen) or 'nothing'}, not what KV holds (serial {serial[:16]} with"
            f" {len(roots)} root(s)) yet")


def _xds_agent(core: Any, namespace: str, context: str) -> bool:
    """Whether the mesh config (ConfigMap istio, key mesh) sets defaultConfig.proxyMetadata.PROXY_CONFIG_XDS_AGENT."""
    import yaml

    what = f"ConfigMap {namespace}/istio"
    status, cm = _kube_json(core.read_namespaced_config_map, what, context, name="istio", namespace=namespace)
    if status != 200 or not isinstance(cm, dict):
        raise _refused(status, what, context)
    text = _dig(cm, "data", "mesh")
    try:
        mesh = yaml.safe_load(text[:_MAX_KUBE_BODY]) if isinstance(text, str) else None
    except yaml.YAMLError:
        raise ConfigError(f"the key mesh of {what} in context {shown(context)} is not YAML") from None
    flag = _dig(mesh, "defaultConfig", "proxyMetadata", "PROXY_CONFIG_XDS_AGENT")
    return isinstance(flag, str | bool) and str(flag).lower() == "true"


def _pods(core: Any, dep: dict[str, Any], *, namespace: str, deployment: str, context: str, port: int, serial: str,
          roots: list[str]) -> dict[str, str]:
    """Each running pod of the Deployment: why its agent's /readyz does not show KV's bundle ("" when it does)."""
    labels = _dig(dep, "spec", "selector", "matchLabels")
    if not isinstance(labels, dict) or not labels:
        raise ConfigError(f"Deployment {namespace}/{deployment} in context {shown(context)} has no"
                          " spec.selector.matchLabels to find its pods by")
    selector = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
    what = f"the pods of {deployment} in {namespace}"
    status, pods = _kube_json(core.list_namespaced_pod, what, context, namespace=namespace, label_selector=selector)
    if status != 200 or not isinstance(pods, dict):
        raise _refused(status, what, context)
    out: dict[str, str] = {}
    items = pods.get("items")
    for pod in items if isinstance(items, list) else []:
        name = _dig(pod, "metadata", "name")
        if not isinstance(name, str) or not name or _dig(pod, "status", "phase") != "Running":
            continue
        what = f"the agent's /readyz in pod {namespace}/{name}"
        status, body = _kube_json(core.connect_get_namespaced_pod_proxy_with_path, what, context,
                                  name=f"{name}:{port}", namespace=namespace, path="readyz")
        if status not in (200, 503) or not isinstance(body, dict) or "bundles" not in body:
            out[name] = f"its agent's /readyz answered HTTP {status} through the pod proxy (port {port})"
        else:
            out[name] = _readyz_problem(body, serial, roots)
    if not out:
        out[""] = f"no running pod of Deployment {namespace}/{deployment}"
    return out


def istiod_facts(context: str, *, namespace: str, deployment: str, port: int, serial: str, roots: list[str]) -> Facts:
    """Read istiod's side through kubeconfig `context`: ISTIO_MULTIROOT_MESH in the Deployment, PROXY_CONFIG_XDS_AGENT
    in the mesh config, the version from the image tag, and each running istiod pod's agent's /readyz (through the
    API server's pod proxy) against the intermediate `serial` and `roots` KV holds.

    Raises:
        ConfigError: the context, the Deployment or the ConfigMap cannot be used.
        KubeUnavailable: the API server could not be reached.
    """
    from kubernetes import client as k8s

    api = _kube_api(context)
    try:
        apps, core = k8s.AppsV1Api(api), k8s.CoreV1Api(api)
        what = f"Deployment {namespace}/{deployment}"
        status, dep = _kube_json(apps.read_namespaced_deployment, what, context, name=deployment, namespace=namespace)
        if status != 200 or not isinstance(dep, dict):
            raise _refused(status, what, context)
        listed = _dig(dep, "spec", "template", "spec", "containers")
        containers = [c for c in (listed if isinstance(listed, list) else []) if isinstance(c, dict)]
        discovery = next((c for c in containers if c.get("name") == _DISCOVERY), containers[0] if containers else {})
        multiroot = (_env_value(discovery, "ISTIO_MULTIROOT_MESH") or "").lower() == "true"
        image = str(discovery.get("image") or "")
        version = _parse_version(image.rsplit("/", 1)[-1].partition("@")[0].partition(":")[2])
        xds_agent = _xds_agent(core, namespace, context)
        pods = _pods(core, dep, namespace=namespace, deployment=deployment, context=context, port=port,
                     serial=serial, roots=roots)
        return Facts(multiroot, xds_agent, version, True, pods)
    finally:
        api.close()


# ---------------------------------------------------------------------------------------------- the phases


@dataclass(repr=False)
class _Plan:
    """What one cluster gets: the new data (with the record) and the lines that describe it (no secrets)."""

    cluster: str
    stored: Stored
    data: dict[str, Any]
    lines: list[str]

    def __repr__(self) -> str:  # data holds the new intermediate's key: keep it out of reprs and tracebacks
        return f"_Plan(cluster={self.cluster!r}, lines={self.lines!r})"


def _root_pem(root: Root) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding

    return root.cert.public_bytes(Encoding.PEM)


def _load_new_root(directory: str, *, with_key: bool) -> tuple[str, Root | None]:
    """The new root's fingerprint, and (with_key) the root with its key, from `ca root`'s directory."""
    from agent import ca

    if with_key:
        root = ca.load_root_dir(Path(directory))
        return rotation.fingerprint(root.cert), root
    from cryptography import x509

    path = Path(directory) / ca.ROOT_CERT
    from agent.files import FileProblem, read_regular

    try:
        data = read_regular(str(path), limit=1 << 20, what="the new root certificate")
    except FileProblem as exc:
        raise ConfigError(f"{exc}: point --root-dir at the directory `ca root` wrote") from None
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise ConfigError(f"{shown(str(path))} is not PEM certificates: give `ca root`'s {ca.ROOT_CERT}") from None
    if len(certs) != 1:
        raise ConfigError(f"{shown(str(path))} holds {len(certs)} certificates: --root-dir must hold the new root"
                          " alone")
    return rotation.fingerprint(certs[0]), None


def _key_type(stored: Stored) -> str:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    try:
        pub = x509.load_pem_x509_certificates(stored.files().get("ca-cert.pem", b""))[0].public_key()
    except (ValueError, IndexError):
        pub = None
    name = None
    if isinstance(pub, rsa.RSAPublicKey):
        name = f"rsa-{pub.key_size}"
    elif isinstance(pub, ec.EllipticCurvePublicKey):
        name = {"secp256r1": "ec-p256", "secp384r1": "ec-p384"}.get(pub.curve.name)
    if name not in KEY_TYPES:
        raise ConfigError(f"cluster {stored.cluster}'s intermediate has a key type rotate cannot copy: pass --key-type")
    return str(name)


def _check_bundle(cluster: str, before: Mapping[str, bytes], files: Mapping[str, bytes], warn: Say) -> None:
    """The agent's validator on `files`, and both of istiod's reload rules from `before` (never expected to fail)."""
    kind = kinds.get("istio-ca")
    info = kind.validate(files)
    for w in info.warnings:
        warn(f"{cluster}: {w}")
    old, new = before.get("root-cert.pem", b""), files.get("root-cert.pem", b"")
    problem = kind.reload_problem(before, files, multiroot=True) if kind.reload_problem else None
    if problem is None and not rotation.accepted_by_bytes(old, new):
        problem = "istiod <= 1.29 would not reload it: neither root-cert.pem holds the other's bytes"
    if problem is None and not rotation.accepted_by_der_sets(old, new):
        problem = "istiod >= 1.30 would not reload it: neither root set contains the other"
    if problem:
        raise ConfigError(f"refusing to write cluster {cluster}'s bundle: {problem}; nothing was written")


def _plan(phase: str, st: ClusterState, *, stored: Stored, new_fp: str, root: Root | None, args: argparse.Namespace,
          now: dt.datetime, warn: Say) -> _Plan:
    """The data `phase` writes for one cluster, validated."""
    data: dict[str, Any] = dict(stored.data)  # keys rotate does not own are written back as they were
    before = stored.files()
    current = before.get("root-cert.pem", b"")
    short = f"sha256 {new_fp[:16]}"
    if phase == "trust":
        assert root is not None
        data["root_cert"] = rotation.append_root(current, _root_pem(root)).decode()
        lines = [f"root_cert: its {len(current)} bytes unchanged, then the new root {short}",
                 "intermediate unchanged"]
    elif phase == "sign":
        assert root is not None
        days = int(getattr(args, "days", istio_certs.INTERMEDIATE_DAYS))
        if not 1 <= days <= 36500:
            raise ConfigError("--days must be from 1 to 36500")
        issued = dt.datetime.now(dt.UTC)  # the clock, whatever `now` the waits are judged at
        not_after = min(issued + dt.timedelta(days=days), root.cert.not_valid_after_utc)
        key_type = getattr(args, "key_type", None) or _key_type(stored)
        key = istio_certs.generate_key(key_type)
        cert = istio_certs.intermediate_cert(key, st.cluster, root.cert, root.key, not_after=not_after, now=issued)
        from cryptography.hazmat.primitives.serialization import Encoding

        pem = cert.public_bytes(Encoding.PEM)
        if data.pop("ca_crl", None) is not None:
            warn(f"{st.cluster}: ca_crl was issued by the old intermediate and is not carried over; store a CRL of the"
                 " new intermediate as ca_crl if istiod should load one")
        data.update(ca_key=istio_certs.key_pem(key).decode(), ca_cert=pem.decode(),
                    cert_chain=(pem + _root_pem(root)).decode())
        lines = [f"intermediate {shown(cert.subject.rfc4514_string(), 120)} ({key_type}) serial"
                 f" {format(cert.serial_number, 'x')[:16]} until {not_after:%Y-%m-%d}, signed by the new root {short}",
                 "root_cert unchanged (byte for byte)"]
    else:
        block = rotation.block_bytes(current, new_fp)
        if block is None:  # phase_of said sign: the root is in root_cert
            raise ConfigError(f"cluster {st.cluster}'s root_cert does not hold the new root {short}")
        data["root_cert"] = block.decode()
        lines = [f"root_cert: the new root {short} alone (its bytes as they stand in the current root_cert)",
                 "intermediate unchanged"]
    data[rotation.RECORD_KEY] = rotation.record_text(phase, new_fp, now)
    files = {name: str(data[k]).encode() for k, name in BUNDLE_KEYS.items() if isinstance(data.get(k), str)}
    if isinstance(data.get("ca_crl"), str):
        files["ca-crl.pem"] = data["ca_crl"].encode()
    _check_bundle(st.cluster, before, files, warn)
    return _Plan(st.cluster, stored, data, lines)


def _order(phase: str, states: Mapping[str, ClusterState]) -> list[str]:
    """The clusters `phase` still has to write; ConfigError when one is not ready for it."""
    prev = _COMMANDS[phase]
    for c, st in states.items():
        if st.phase not in (prev, phase):
            if st.phase == rotation.BROKEN:
                why = "its intermediate chains to no root of its root_cert"
            elif PHASES.index(st.phase) < PHASES.index(prev):
                why = f"it is in phase {st.phase}: run `rotate {PHASES[PHASES.index(st.phase) + 1]}` first"
            else:
                why = f"it is already in phase {st.phase}, past {phase}"
            raise ConfigError(f"cannot {phase}: cluster {c} is not ready ({why}); nothing was written")
    return [c for c, st in states.items() if st.phase == prev]


def _check_wait(phase: str, states: Mapping[str, ClusterState], todo: Sequence[str], *, wait: float,
                now: dt.datetime, warn: Say) -> None:
    prev = _COMMANDS[phase]
    if prev == "A":
        return
    if wait <= 0:
        warn(f"--wait-at-least 0s: not waiting after {prev}; workloads that have not picked up the {prev} phase"
             " yet (one workload certificate lifetime, 24h by default) may fail mTLS")
        return
    # from the LAST cluster's write of the previous phase: a workload of a cluster that trusted the new root late
    # must have had its certificate lifetime too (signing east under B right after west trusted B breaks west->east)
    latest: tuple[dt.datetime, str] | None = None
    for c in states:
        when = states[c].written_at(prev)
        if when is None and c not in todo:
            continue  # already past the previous phase: its own record moved on
        if when is None:
            raise ConfigError(f"cannot {phase}: there is no record of when {prev} was written in cluster {c} (done by"
                              f" hand, or the record key {rotation.RECORD_KEY} was removed): once at least one"
                              " workload certificate lifetime has passed since, pass --wait-at-least 0s; nothing"
                              " was written")
        if latest is None or when > latest[0]:
            latest = (when, c)
    if latest is not None and (now - latest[0]).total_seconds() < wait:
        until = latest[0] + dt.timedelta(seconds=wait)
        raise ConfigError(f"cannot {phase} yet: {prev} was written in cluster {latest[1]} at"
                          f" {latest[0]:%Y-%m-%d %H:%M:%S} UTC, less than --wait-at-least {_human(wait)} ago; run"
                          f" again after {until:%Y-%m-%d %H:%M:%S} UTC; nothing was written")


def _human(seconds: float) -> str:
    s = int(seconds)
    parts = [(s // 3600, "h"), (s % 3600 // 60, "m"), (s % 60, "s")]
    return "".join(f"{n}{u}" for n, u in parts if n) or "0s"


def _gates(args: argparse.Namespace, clusters: Sequence[str], states: Mapping[str, ClusterState], say: Say,
           warn: Say) -> None:
    """istiod's side in every cluster: checked through --context, else taken from the flags with a warning."""
    contexts = dict(args.context)
    unknown = sorted(set(contexts) - set(clusters))
    if unknown:
        raise ConfigError(f"--context names cluster {shown(unknown[0])}, which is not one of the --cluster")
    for c in clusters:
        st = states[c]
        if c in contexts:
            facts = istiod_facts(contexts[c], namespace=args.istio_namespace, deployment=args.istiod,
                                 port=args.agent_port, serial=st.intermediate[1] if st.intermediate else "",
                                 roots=[fp for fp, _ in st.roots])
            where = f"istiod in cluster {c} (context {shown(contexts[c])})"
        else:
            facts = Facts(args.multiroot_mesh, args.xds_agent, args.istio_version, False)
            where = f"cluster {c}"
        if not facts.multiroot:
            how = ("its Deployment does not set ISTIO_MULTIROOT_MESH=true" if facts.checked else
                   f"pass --context {c}=KUBECONTEXT to check istiod, or --multiroot-mesh once it runs with"
                   " ISTIO_MULTIROOT_MESH=true")
            raise ConfigError(f"cannot {args.rotate_command}: {where}: istiod keeps its old CA on a root change"
                              f" without ISTIO_MULTIROOT_MESH=true; {how} (docs/root-rotation.md, step 0);"
                              " nothing was written")
        if not facts.xds_agent:
            how = ("the mesh config (ConfigMap istio, key mesh) does not set it" if facts.checked else
                   f"pass --context {c}=KUBECONTEXT to check it, or --xds-agent once it is set")
            raise ConfigError(f"cannot {args.rotate_command}: {where}: proxies need"
                              f" meshConfig.defaultConfig.proxyMetadata.PROXY_CONFIG_XDS_AGENT=\"true\" to take a new"
                              f" trust bundle as Istio's own rotation test does; {how}; nothing was written")
        late = {pod: why for pod, why in facts.pods.items() if why}
        if late:
            pod, why = next(iter(late.items()))
            raise ConfigError(f"cannot {args.rotate_command}: {where}: istiod pod {shown(pod)}: {why}; wait for its"
                              " agent to publish (sidecar.poll_interval) and run again; nothing was written")
        say(f"{c}: {reload_rule(facts.version)}")
        if facts.checked:
            say(f"{c}: istiod runs with ISTIO_MULTIROOT_MESH=true, the mesh sets PROXY_CONFIG_XDS_AGENT=true, and"
                f" {len(facts.pods)} istiod pod(s) publish what KV holds (checked through context"
                f" {shown(contexts[c])})")
        else:
            warn(f"{c}: not checked (no --context): ISTIO_MULTIROOT_MESH=true, PROXY_CONFIG_XDS_AGENT=true, the"
                 " istiod version, and that every istiod's agent has published what KV holds (see"
                 " istio_vault_agent_last_publish_timestamp_seconds)")


def _paths(args: argparse.Namespace) -> dict[str, str]:
    clusters = [check_cluster_name(c) for c in dict.fromkeys(args.cluster)]
    overrides = dict(args.kv)
    unknown = sorted(set(overrides) - set(clusters))
    if unknown:
        raise ConfigError(f"--kv names cluster {shown(unknown[0])}, which is not one of the --cluster")
    return {c: overrides.get(c) or ClusterLayout(c).kv_path for c in clusters}


def run(
    args: argparse.Namespace,
    say: Say,
    warn: Say,
    *,
    client: hvac.Client | None = None,
    now: dt.datetime | None = None,
    before_write: Callable[[str], None] | None = None,
) -> int:
    """Carry out `rotate <phase>`; `say` gets the report, `warn` warnings. `before_write(cluster)` runs before each
    KV write (tests).

    Raises:
        ConfigError: a cluster is not ready for the phase, the wait is not over, istiod's side is not ready, or the
            root or options are wrong; nothing was written.
        WriteConflict: a secret changed while this ran (check-and-set); the clusters written before it stay written.
        SecretError, PermissionDenied, VaultUnavailable: from Vault.
    """
    from agent.operator import operator_client

    phase = args.rotate_command
    paths = _paths(args)
    now = now or dt.datetime.now(dt.UTC)
    new_fp: str | None = None
    root: Root | None = None
    if args.root_dir:
        new_fp, root = _load_new_root(args.root_dir, with_key=phase != "status")
    client = client or operator_client(namespace=args.namespace)
    stored = {c: rotation.read_stored(client, c, p) for c, p in paths.items()}
    states = rotation.states(stored, new_fp)
    if phase == "status":
        width = max(len(c) for c in states)
        for c, st in states.items():
            say(f"{c:<{width}}  {shown(stored[c].mount.full)}: {rotation.describe(st, now)}")
        say(_summary(states))
        return 0

    assert new_fp is not None
    only = list(dict.fromkeys(args.only)) or list(states)
    unknown = sorted(set(only) - set(states))
    if unknown:
        raise ConfigError(f"--only names cluster {shown(unknown[0])}, which is not one of the --cluster")
    todo = [c for c in _order(phase, states) if c in only]
    if not todo:
        say(f"already done: {'every cluster' if len(only) == len(states) else 'cluster'} ({', '.join(only)}) is in"
            f" phase {phase} for the new root sha256 {new_fp[:16]}; nothing written")
        return 0
    for c in only:
        if c not in todo:
            say(f"{c}: already done ({phase}); not written again")
    _check_wait(phase, states, todo, wait=float(args.wait_at_least), now=now, warn=warn)
    _gates(args, list(states), states, say, warn)
    plans = [_plan(phase, states[c], stored=stored[c], new_fp=new_fp, root=root, args=args, now=now, warn=warn)
             for c in todo]
    for p in plans:
        m = p.stored.mount
        verb = "would write" if args.dry_run else "writing"
        say(f"{p.cluster}: {verb} KV v{m.version} path {shown(m.full)}: {'; '.join(p.lines)}")
    if args.dry_run:
        say("dry run: nothing written")
        return 0
    for p in plans:
        if before_write is not None:
            before_write(p.cluster)
        m = p.stored.mount
        version = hvac_client.kv_write(client, m, p.data, cas=p.stored.version if m.version == 2 else None)
        suffix = f" version {version}" if version is not None else ""
        say(f"{p.cluster}: wrote KV v{m.version} path {shown(m.full)}{suffix}: phase {phase}")
    behind = [c for c, st in states.items() if st.phase != phase and c not in todo]
    say(f"next: `rotate {phase}` for {', '.join(behind)}" if behind else _next(phase))
    return 0


def _summary(states: Mapping[str, ClusterState]) -> str:
    phases = {st.phase for st in states.values()}
    if len(phases) == 1:
        phase = next(iter(phases))
        nxt = {"A": "rotate trust --root-dir NEW", "trust": "rotate sign (after the wait)",
               "sign": "rotate retire (after the wait)", "retire": "nothing: the rotation is complete",
               rotation.BROKEN: "fix the bundles first"}[phase]
        return f"mesh: every cluster is in phase {phase}; next: {nxt}"
    listed = ", ".join(f"{c} {st.phase}" for c, st in states.items())
    return f"mesh: clusters in different phases ({listed}): run the later phase's command again to finish it"


def _next(phase: str) -> str:
    if phase == "retire":
        return "done: every cluster trusts and signs under the new root alone; keep the old root until no certificate" \
               " under it is in use"
    nxt = {"trust": "sign", "sign": "retire"}[phase]
    return f"next: wait at least one workload certificate lifetime (--wait-at-least), then `rotate {nxt}`"
