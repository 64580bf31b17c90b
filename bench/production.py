"""`python -m bench --production`: the sidecar's memory in the configuration the chart runs, beside `bao agent`.

N instances of istio-vault-agent per checkout (downward API env, Events recorded through the Kubernetes API
stand-in, health and metrics served and probed, chart defaults) and N of `bao agent` at its defaults, all at
once against one OpenBao; per-agent mean RSS and anonymous RSS, and init wall time side by side (issue 18).
`--compare BEFORE AFTER` runs two checkouts' agents in the same run and prints one table.

Our agents run with the interpreter of a venv holding exactly the image's dependencies: the checkout's
requirements.lock installed with `pip install --require-hashes --no-deps` into a venv made without pip, as the
Dockerfile does, built once
per lock hash under bench/results/image-venv/ (`--python` runs them with another interpreter instead). The
development venv would inflate the numbers: it holds the test tools, and e.g. structlog imports `rich` when
it is installed (about 3 MiB of anonymous memory that the image does not have).
"""

from __future__ import annotations

import argparse
import datetime as dt
import fcntl
import hashlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bench.agents import ROOT, AgentProcess, AgentSpec, bao_agent_spec, bao_binary, init_once
from bench.env import Testbed
from bench.procfs import cpu_model, loadavg, sample_tree
from bench.report import MIB, summary
from testbed.bao import free_port
from tests.support import agent_config, clean_env, write_config

__all__ = [
    "CHART_DEFAULTS",
    "Checkout",
    "Fleet",
    "ImageVenv",
    "checkouts_from_args",
    "downward_env",
    "image_venv",
    "interpreters",
    "main",
    "markdown",
    "ours_production_spec",
    "production_config",
    "run",
    "targets",
]

RESULTS = ROOT / "bench" / "results"
#: where the image venvs are cached, one per base Python version and requirements.lock hash (git-ignored)
IMAGE_VENVS = RESULTS / "image-venv"
#: the interpreter image venvs are made from: the one beneath this venv, so only the packages differ
BASE_PYTHON = getattr(sys, "_base_executable", sys.executable)
#: what the chart renders for istiod (charts/istio-vault-agent/values.yaml), with the poll interval the README
#: recommends for istiod (30s; the chart's default, for gateways, is 5m): a window of 35 s then holds a poll
CHART_DEFAULTS = {"init_timeout": "120s", "poll_interval": "30s"}
#: the namespace and service account of the pods (the istiod example's)
NAMESPACE, SERVICE_ACCOUNT = "istio-system", "istiod"
#: issue 18's targets for the sidecar against bao agent, and for init wall time against the checkout before
ANON_TARGET, RSS_TARGET, INIT_GROWTH_TARGET = 2.5, 0.6, 1.25
#: kubelet's probe period in the chart's examples, and the PodMonitor's scrape interval
PROBE_PERIOD, SCRAPE_PERIOD = 10.0, 30.0


def _log(msg: str) -> None:
    print(f"[bench production {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Checkout:
    """A source tree of istio-vault-agent whose agent is measured (`python -m agent.cli` with it on the path)."""

    label: str
    root: Path
    #: the interpreter that runs this checkout's agents
    python: str = sys.executable
    #: what that interpreter is, for the report
    interpreter: str = "the interpreter running the benchmark"

    def describe(self) -> str:
        """The root and its git commit (`+dirty` with uncommitted changes), for the report."""
        def git(*args: str) -> str:
            proc = subprocess.run(["git", "-C", str(self.root), *args], capture_output=True, text=True, check=False)
            return proc.stdout.strip() if proc.returncode == 0 else ""

        sha = git("rev-parse", "--short", "HEAD")
        if not sha:
            return str(self.root)
        dirty = "+dirty" if git("status", "--porcelain", "--untracked-files=no") else ""
        return f"{self.root} ({sha}{dirty})"


def checkouts_from_args(checkout: Path | None, compare: Sequence[Path] | None) -> list[Checkout]:
    """`--compare BEFORE AFTER` -> before, after; `--checkout DIR` -> ours; neither -> this checkout.

    Raises:
        SystemExit: a directory is not a checkout (no agent/cli.py), or both options are given.
    """
    if checkout is not None and compare:
        raise SystemExit("error: give either --checkout DIR or --compare BEFORE AFTER, not both")
    if compare:
        chosen = [Checkout("before", Path(compare[0])), Checkout("after", Path(compare[1]))]
    else:
        chosen = [Checkout("ours", checkout if checkout is not None else ROOT)]
    resolved = []
    for c in chosen:
        root = c.root.expanduser().resolve()
        if not (root / "agent" / "cli.py").is_file():
            raise SystemExit(f"error: {c.root} is not an istio-vault-agent checkout (no agent/cli.py in it)")
        resolved.append(Checkout(c.label, root))
    return resolved


# --------------------------------------------------------------------------------------------- image venv


@dataclass(frozen=True)
class ImageVenv:
    """A venv with exactly the image's dependencies: `lock` installed as the Dockerfile installs it.

    Cached under `cache` in a directory named after the base Python version and the lock's sha256, so a
    changed lock gets a venv of its own; `.complete` is written last, and a directory without it (a build
    that was interrupted or failed) is removed and built again.
    """

    lock: Path
    lock_sha256: str
    base_python: str
    base_version: str
    directory: Path

    @property
    def python(self) -> Path:
        """The venv's interpreter (not resolved: a venv is recognised by the path its interpreter is run by)."""
        return self.directory / "bin" / "python"

    @property
    def marker(self) -> Path:
        """Written once the install has succeeded; holds the lock's hash and the base interpreter."""
        return self.directory / ".complete"

    def commands(self) -> list[list[str]]:
        """The Dockerfile's: a venv without pip (so no pip, and no setuptools with its .pth file run at every
        start on Python < 3.12), filled by an outside pip (this interpreter's) with exactly requirements.lock."""
        return [
            [self.base_python, "-m", "venv", "--without-pip", str(self.directory)],
            [sys.executable, "-m", "pip", "--python", str(self.python), "install", "--disable-pip-version-check",
             "--no-input", "--require-hashes", "--no-deps", "-r", str(self.lock)],
        ]

    def ready(self) -> bool:
        """The venv was built completely from this very lock."""
        try:
            return self.marker.read_text() == self.stamp() and self.python.exists()
        except OSError:
            return False

    def stamp(self) -> str:
        """The marker's content: the lock's hash and the build's commands (a changed recipe rebuilds too)."""
        return json.dumps({"lock_sha256": self.lock_sha256, "python": self.base_version, "commands": self.commands()})

    def ensure(self) -> Path:
        """Build the venv unless a complete one for this lock is cached; returns its interpreter.

        Raises:
            RuntimeError: venv or pip failed (the tail of its output says why; pip needs PyPI).
        """
        self.directory.parent.mkdir(parents=True, exist_ok=True)
        with (self.directory.parent / ".build-lock").open("a") as held:
            fcntl.flock(held, fcntl.LOCK_EX)  # one build at a time, a second benchmark waits and reuses it
            if self.ready():
                return self.python
            shutil.rmtree(self.directory, ignore_errors=True)
            _log(f"building the image venv {self.directory} from {self.lock} (pip --require-hashes --no-deps)")
            for argv in self.commands():
                try:
                    proc = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=900,
                                          env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
                except (OSError, subprocess.TimeoutExpired) as exc:
                    raise RuntimeError(f"building the image venv failed: {argv[0]}: {exc}") from exc
                if proc.returncode != 0:
                    tail = (proc.stdout + proc.stderr)[-3000:]
                    raise RuntimeError(f"building the image venv failed: {' '.join(argv[:4])}...:\n{tail}")
            self.marker.write_text(self.stamp())
        return self.python

    def describe(self) -> str:
        """The report's words for it."""
        return (
            f"{self.python} (Python {self.base_version}), a venv holding exactly {self.lock}"
            f" (sha256 {self.lock_sha256[:12]}) installed with pip --require-hashes --no-deps into a venv made"
            f" --without-pip, as the image does"
        )


def image_venv(lock: Path, *, cache: Path = IMAGE_VENVS, base_python: str = BASE_PYTHON) -> ImageVenv:
    """The image venv for `lock` made from `base_python` (nothing is built until `ensure()`).

    Raises:
        SystemExit: the lock cannot be read or the base interpreter does not run.
    """
    try:
        digest = hashlib.sha256(lock.read_bytes()).hexdigest()
    except OSError as exc:
        raise SystemExit(f"error: cannot read {lock}: {exc.strerror}") from exc
    proc = subprocess.run(
        [base_python, "-c", "import platform; print(platform.python_version())"],
        capture_output=True, text=True, check=False, timeout=60,
    )
    version = proc.stdout.strip()
    if proc.returncode != 0 or not version:
        raise SystemExit(f"error: the base interpreter {base_python} for the image venv does not run")
    return ImageVenv(lock.resolve(), digest, base_python, version, cache / f"py{version}-{digest[:16]}")


def interpreters(
    checkouts: Sequence[Checkout], python: str | None, *, cache: Path = IMAGE_VENVS, base_python: str = BASE_PYTHON
) -> list[Checkout | ImageVenv]:
    """What runs each checkout's agents: `python` when given, else the image venv of the checkout's own
    requirements.lock (this repository's when the checkout has none). Returns, per checkout, the checkout
    with its interpreter set (`python` given) or the ImageVenv still to be ensured."""
    out: list[Checkout | ImageVenv] = []
    for c in checkouts:
        if python is not None:
            out.append(replace(c, python=python, interpreter=f"{python} (given with --python)"))
            continue
        lock = c.root / "requirements.lock"
        out.append(image_venv(lock if lock.is_file() else ROOT / "requirements.lock", cache=cache,
                              base_python=base_python))
    return out


def with_interpreters(checkouts: Sequence[Checkout], python: str | None, base_python: str) -> list[Checkout]:
    """The checkouts with their interpreters set, image venvs built (or reused) as needed."""
    return [
        replace(c, python=str(chosen.ensure()), interpreter=chosen.describe()) if isinstance(chosen, ImageVenv)
        else chosen
        for c, chosen in zip(checkouts, interpreters(checkouts, python, base_python=base_python), strict=True)
    ]


# ------------------------------------------------------------------------------------------------ configs


def production_config(
    *, address: str, token_path: Path, kv: str, out: Path, health_port: int, poll_interval: str | None = None
) -> dict[str, Any]:
    """The agent config the chart renders for mode istiod with default values (health on a loopback port);
    `poll_interval` replaces CHART_DEFAULTS' sidecar.poll_interval when given."""
    cfg = agent_config(
        address=address, token_path=token_path, out=out, kv=kv, init_timeout=CHART_DEFAULTS["init_timeout"]
    )
    cfg["health"] = {"listen": f"127.0.0.1:{health_port}"}
    cfg["sidecar"] = {"poll_interval": poll_interval or CHART_DEFAULTS["poll_interval"]}
    return cfg


def downward_env(checkout: Checkout, *, kubeconfig: Path, pod_name: str, node_name: str) -> dict[str, str]:
    """The container's environment: the downward API the chart's examples set (and POD_UID, NODE_NAME, which
    the agent reads when present), a kubeconfig standing in for the in-cluster service account, the checkout
    on PYTHONPATH, and nothing from the caller's shell that could redirect the agent."""
    env = {k: v for k, v in clean_env().items() if not k.startswith("KUBERNETES_")}
    env.update(
        PYTHONPATH=str(checkout.root),
        KUBECONFIG=str(kubeconfig),
        POD_NAME=pod_name,
        POD_NAMESPACE=NAMESPACE,
        POD_UID=str(uuid.uuid5(uuid.NAMESPACE_DNS, pod_name)),
        NODE_NAME=node_name,
    )
    return env


def ours_production_spec(
    label: str,
    workdir: Path,
    checkout: Checkout,
    *,
    address: str,
    token_path: Path,
    kv: str,
    kubeconfig: Path,
    mode: str,
    python: str | None = None,
    poll_interval: str | None = None,
) -> AgentSpec:
    """istio-vault-agent from `checkout` with the chart's config and a pod's environment; pod name = label.

    It runs with `python`, by default the checkout's interpreter (`Checkout.python`); `poll_interval` as in
    `production_config`.
    """
    base = workdir / label
    base.mkdir(parents=True, exist_ok=True)
    out = base / "out"
    port = free_port()
    cfg = production_config(address=address, token_path=token_path, kv=kv, out=out, health_port=port,
                            poll_interval=poll_interval)
    path = write_config(base / "agent.yaml", cfg)
    argv = [python or checkout.python, "-m", "agent.cli", "run", "--config", str(path), "--mode", mode]
    env = downward_env(checkout, kubeconfig=kubeconfig, pod_name=label, node_name="bench-node")
    return AgentSpec(label, "ours", argv, out, path, health_port=port, env=env, cwd=checkout.root)


def _prepare(checkout: Checkout) -> None:
    """Byte-compile the checkout's agent (as pip does at install) with the interpreter that runs it, and check
    that its agent is the one imported.

    Raises:
        RuntimeError: the interpreter imports `agent` from somewhere else.
    """
    python = checkout.python
    # a read-only checkout stays uncompiled (-qq hides the errors): every start then compiles it again
    subprocess.run([python, "-m", "compileall", "-qq", str(checkout.root / "agent")],
                   capture_output=True, check=False, timeout=300)
    env = downward_env(checkout, kubeconfig=Path(os.devnull), pod_name="probe", node_name="bench-node")
    proc = subprocess.run(
        [python, "-c", "import agent.cli, sys; sys.stdout.write(agent.cli.__file__)"],
        capture_output=True, text=True, env=env, cwd=checkout.root, check=False, timeout=60,
    )
    where = Path(proc.stdout.strip()).resolve() if proc.returncode == 0 else None
    if where is None or checkout.root not in where.parents:
        raise RuntimeError(f"{checkout.label}: {python} imports agent.cli from {where}, not from {checkout.root}")


# ------------------------------------------------------------------------------------------------- init


def measure_init(
    tb: Testbed, workdir: Path, checkouts: Sequence[Checkout], runs: int, *, kubeconfig: Path
) -> dict[str, Any]:
    """`runs` init runs of every checkout's agent and of bao agent, round robin (the first one rotates too)."""
    common = {"address": tb.bao.address, "token_path": tb.token_path, "kv": tb.kv_path}
    specs: dict[str, AgentSpec] = {
        c.label: ours_production_spec(
            f"init-{c.label}", workdir, c, kubeconfig=kubeconfig, mode="init", **common  # type: ignore[arg-type]
        )
        for c in checkouts
    }
    specs["bao"] = bao_agent_spec("init-bao", workdir, mode="init", **common)  # type: ignore[arg-type]
    for spec in specs.values():  # warm the page cache, uncounted
        init_once(spec, tb.bundles[0], timeout=120)
    labels = list(specs)
    samples: dict[str, dict[str, list[float]]] = {k: {"wall": [], "cpu": [], "maxrss": []} for k in labels}
    for i in range(runs):
        for label in labels[i % len(labels) :] + labels[: i % len(labels)]:
            wall, cpu, maxrss = init_once(specs[label], tb.bundles[0], timeout=120)
            samples[label]["wall"].append(wall)
            samples[label]["cpu"].append(cpu)
            samples[label]["maxrss"].append(maxrss)
    return {label: {k: summary(v) | {"samples": v} for k, v in s.items()} for label, s in samples.items()}


# ---------------------------------------------------------------------------------------------- sidecars


@dataclass
class _Member:
    label: str  # the checkout's label, or "bao"
    spec: AgentSpec
    proc: AgentProcess


class Fleet:
    """Every sidecar of the run: `instances` per checkout and as many `bao agent`s, started interleaved."""

    def __init__(self, tb: Testbed, workdir: Path, checkouts: Sequence[Checkout], *, kubeconfig: Path):
        """Nothing runs until `start()`; each checkout's agents run with its interpreter."""
        self.tb, self.workdir, self.checkouts = tb, workdir, list(checkouts)
        self.kubeconfig = kubeconfig
        self.members: list[_Member] = []
        self.probes: dict[str, list[int]] = {"healthz": [0, 0], "readyz": [0, 0], "metrics": [0, 0]}
        self._stop = threading.Event()
        self._prober: threading.Thread | None = None

    def start(self, instances: int, wave: int) -> None:
        """Start the agents `wave` per tool at a time, each wave once the previous one has published.

        Raises:
            RuntimeError: an agent exited or published nothing within 120 s.
        """
        common = {"address": self.tb.bao.address, "token_path": self.tb.token_path, "kv": self.tb.kv_path}
        for first in range(0, instances, wave):
            started: list[_Member] = []
            for i in range(first, min(first + wave, instances)):
                for c in self.checkouts:
                    spec = ours_production_spec(
                        f"istiod-{c.label}-{i}", self.workdir, c, kubeconfig=self.kubeconfig, mode="sidecar",
                        **common,  # type: ignore[arg-type]
                    )
                    started.append(_Member(c.label, spec, AgentProcess(spec)))
                spec = bao_agent_spec(f"bao-{i}", self.workdir, mode="sidecar", **common)  # type: ignore[arg-type]
                started.append(_Member("bao", spec, AgentProcess(spec)))
            self.members += started
            self._wait_published(started, timeout=120)
            _log(f"{len(self.members)} agents running and published")

    def _wait_published(self, members: Sequence[_Member], timeout: float) -> None:
        expected = self.tb.bundles[0]
        pending = list(members)
        deadline = time.monotonic() + timeout
        while pending:
            for m in list(pending):
                if not m.proc.alive():
                    raise RuntimeError(f"{m.spec.label} exited before publishing:\n{m.proc.log_tail()}")
                if _holds(m.spec.out, expected):
                    pending.remove(m)
            if pending and time.monotonic() > deadline:
                m = pending[0]
                raise RuntimeError(f"{m.spec.label} published nothing within {timeout:.0f} s:\n{m.proc.log_tail()}")
            time.sleep(0.2)

    def ours(self) -> list[_Member]:
        """The istio-vault-agent members."""
        return [m for m in self.members if m.label != "bao"]

    def events_per_pod(self) -> dict[str, int]:
        """Events the stand-in received for each of our pods (any POST to the namespace's events naming it)."""
        counts = {m.spec.label: 0 for m in self.ours()}
        for req in self.tb.kube.requests_to("POST", f"/api/v1/namespaces/{NAMESPACE}/events"):
            body = req.body if isinstance(req.body, dict) else {}
            name = (body.get("involvedObject") or {}).get("name")
            if name in counts:
                counts[name] += 1
        return counts

    def wait_events(self, timeout: float) -> dict[str, int]:
        """Wait until every one of our pods has at least one Event recorded (its Kubernetes client loaded).

        Raises:
            RuntimeError: a pod has none by `timeout`: the measurement would miss the Kubernetes client.
        """
        deadline = time.monotonic() + timeout
        while True:
            counts = self.events_per_pod()
            missing = [pod for pod, n in counts.items() if n == 0]
            if not missing:
                return counts
            if time.monotonic() > deadline:
                m = next(m for m in self.ours() if m.spec.label == missing[0])
                raise RuntimeError(
                    f"{len(missing)} of {len(counts)} pods recorded no Event within {timeout:.0f} s (first:"
                    f" {missing[0]}); the Kubernetes client would not be in the measurement:\n{m.proc.log_tail()}"
                )
            time.sleep(0.2)

    def start_probing(self) -> None:
        """Probe /healthz and /readyz every 10 s (kubelet) and scrape /metrics every 30 s (the PodMonitor)."""

        def get(port: int, path: str) -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
                    resp.read()
                    return bool(resp.status == 200)
            except (OSError, urllib.error.URLError):
                return False

        def loop() -> None:
            last_scrape = -SCRAPE_PERIOD
            while not self._stop.is_set():
                now = time.monotonic()
                paths = ["/healthz", "/readyz"]
                if now - last_scrape >= SCRAPE_PERIOD:
                    paths.append("/metrics")
                    last_scrape = now
                for m in self.ours():
                    for path in paths:
                        counter = self.probes[path.strip("/")]
                        counter[0] += 1
                        counter[1] += bool(m.spec.health_port and get(m.spec.health_port, path))
                self._stop.wait(max(0.0, PROBE_PERIOD - (time.monotonic() - now)))

        self._prober = threading.Thread(target=loop, name="prober", daemon=True)
        self._prober.start()

    def sample(self) -> dict[str, dict[str, float]]:
        """Per-agent RSS, anonymous RSS, PSS and CPU seconds of every member, by label.

        Raises:
            RuntimeError: an agent has exited.
        """
        out: dict[str, dict[str, float]] = {}
        for m in self.members:
            if not m.proc.alive():
                raise RuntimeError(f"{m.spec.label} exited during the measurement:\n{m.proc.log_tail()}")
            s = sample_tree(m.proc.pid)
            out[m.spec.label] = {
                "rss": s.rss_bytes, "anon": s.rss_anon_bytes, "pss": s.pss_bytes, "cpu": s.cpu_seconds
            }
        return out

    def stop(self) -> None:
        """Stop probing, SIGTERM every agent at once, then wait for each (SIGKILL after 10 s)."""
        self._stop.set()
        if self._prober is not None:
            self._prober.join(timeout=15)
        for m in self.members:
            if m.proc.alive():
                m.proc.proc.send_signal(signal.SIGTERM)
        for m in self.members:
            m.proc.stop()


def _holds(out: Path, expected: dict[str, bytes]) -> bool:
    try:
        return all((out / name).read_bytes() == data for name, data in expected.items())
    except OSError:
        return False


def measure_fleet(fleet: Fleet, *, settle: float, window: float) -> dict[str, Any]:
    """Memory at the end of `window` seconds of probing (after `settle`); per label: per-agent mean and spread."""
    _log("waiting for every pod's first Event")
    events = fleet.wait_events(timeout=60)
    fleet.start_probing()
    time.sleep(settle)
    first = fleet.sample()
    t0 = time.monotonic()
    _log(f"measuring: {window:.0f} s window (poll interval {CHART_DEFAULTS['poll_interval']})")
    time.sleep(window)
    elapsed = time.monotonic() - t0
    last = fleet.sample()
    by_label: dict[str, list[str]] = {}
    for m in fleet.members:
        by_label.setdefault(m.label, []).append(m.spec.label)
    result: dict[str, Any] = {"window_seconds": elapsed, "settle_seconds": settle, "agents": {}}
    for label, names in by_label.items():
        rss = [last[n]["rss"] for n in names]
        anon = [last[n]["anon"] for n in names]
        pss = [last[n]["pss"] for n in names]
        cpu = [(last[n]["cpu"] - first[n]["cpu"]) / elapsed * 3600 for n in names]
        result["agents"][label] = {
            "instances": len(names),
            "rss": summary(rss),
            "anon": summary(anon),
            "pss": summary(pss),
            "anon_at_window_start": summary([first[n]["anon"] for n in names]),
            "cpu_seconds_per_hour": summary(cpu),
        }
        if label != "bao":
            result["agents"][label]["events"] = summary([events[n] for n in names])
    result["probes"] = {path: {"sent": sent, "ok": ok} for path, (sent, ok) in fleet.probes.items()}
    result["kube_requests"] = len(fleet.tb.kube.requests)
    return result


# ----------------------------------------------------------------------------------------------- report


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def _mean(result: dict[str, Any], label: str, key: str) -> float | None:
    agents = result.get("fleet", {}).get("agents", {})
    value = agents.get(label, {}).get(key, {}).get("mean")
    return float(value) if value is not None else None


def _p50(result: dict[str, Any], label: str, key: str = "wall") -> float | None:
    value = result.get("init", {}).get(label, {}).get(key, {}).get("p50")
    return float(value) if value is not None else None


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 18's memory targets for every checkout, and init growth after/before when two were compared."""
    labels = [c["label"] for c in result["checkouts"]]
    out: list[dict[str, Any]] = []
    for label in labels:
        anon = _ratio(_mean(result, label, "anon"), _mean(result, "bao", "anon"))
        rss = _ratio(_mean(result, label, "rss"), _mean(result, "bao", "rss"))
        out.append({"target": f"{label}: anonymous RSS <= {ANON_TARGET}x bao agent's", "ratio": anon,
                    "met": None if anon is None else anon <= ANON_TARGET})
        out.append({"target": f"{label}: total RSS <= {RSS_TARGET}x bao agent's", "ratio": rss,
                    "met": None if rss is None else rss <= RSS_TARGET})
    if len(labels) == 2:
        growth = _ratio(_p50(result, labels[1]), _p50(result, labels[0]))
        out.append({"target": f"init wall time median {labels[1]} <= {INIT_GROWTH_TARGET}x {labels[0]}",
                    "ratio": growth, "met": None if growth is None else growth <= INIT_GROWTH_TARGET})
    return out


def _mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value / MIB:.1f} MiB"


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 1000:.0f} ms"


def _x(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def markdown(result: dict[str, Any]) -> str:
    """One table: each checkout, bao agent, each checkout / bao, and after / before when two were compared."""
    env = result["environment"]
    labels = [c["label"] for c in result["checkouts"]]
    two = len(labels) == 2
    n = result["instances"]
    head = [*labels, "bao agent", *(f"{label} / bao" for label in labels)]
    if two:
        head.append(f"{labels[1]} / {labels[0]}")
    lines = [
        f"# Production configuration memory: {n} instances of each, side by side",
        "",
        f"Run {env['started']} on {env['cpus']} CPU(s) ({env['cpu_model']}), harness on Python {env['python']},"
        f" {env['bao_version']}; load average {env['loadavg_start']} at start, {env.get('loadavg_end', '?')} at end;"
        f" took {env.get('duration_seconds', 0):.0f} s.",
        "",
        *(f"- {c['label']}: {c['describe']}" for c in result["checkouts"]),
        "",
        "| per agent | " + " | ".join(head) + " |",
        "|---|" + "---:|" * len(head),
    ]

    def row(title: str, values: list[float | None], fmt: Any) -> str:
        ratios = [_ratio(v, values[-1]) for v in values[:-1]]
        if two:
            ratios.append(_ratio(values[1], values[0]))
        return f"| {title} | " + " | ".join([*(fmt(v) for v in values), *(_x(r) for r in ratios)]) + " |"

    every = [*labels, "bao"]
    fleet = result.get("fleet")
    if fleet:
        lines += [
            row("RSS, mean", [_mean(result, k, "rss") for k in every], _mib),
            row("anonymous RSS (RssAnon), mean", [_mean(result, k, "anon") for k in every], _mib),
            row("PSS, mean", [_mean(result, k, "pss") for k in every], _mib),
            row("idle CPU, mean (s/h)", [_mean(result, k, "cpu_seconds_per_hour") for k in every],
                lambda v: "n/a" if v is None else f"{v:.1f}"),
        ]
    if result.get("init"):
        lines += [
            row("init wall time, median", [_p50(result, k) for k in every], _ms),
            row("init CPU time, median", [_p50(result, k, "cpu") for k in every], _ms),
            row("init peak RSS, median", [_p50(result, k, "maxrss") for k in every], _mib),
        ]
    lines.append("")
    if fleet:
        spread = ", ".join(
            f"{k} {_mib(fleet['agents'][k]['anon']['min'])} to {_mib(fleet['agents'][k]['anon']['max'])}" for k in every
        )
        events = ", ".join(f"{k} {fleet['agents'][k]['events']['min']:.0f}" for k in labels)
        probes = ", ".join(f"/{p} {v['ok']}/{v['sent']}" for p, v in fleet["probes"].items())
        lines += [
            f"Memory sampled after a {fleet['window_seconds']:.0f} s window that began {fleet['settle_seconds']:.0f} s"
            f" after every pod had recorded an Event. Anonymous RSS range across instances: {spread}."
            f" Events per pod before the window (least): {events}. Probes answered 200: {probes}.",
            "",
        ]
    lines += ["| target (issue 18) | ratio | met |", "|---|---:|---|"]
    for t in result.get("targets", []):
        met = {True: "yes", False: "**no**", None: "n/a"}[t["met"]]
        lines.append(f"| {t['target']} | {_x(t['ratio'])} | {met} |")
    lines += ["", "## How", "", *METHOD]
    lines += [
        f"- {c['label']}'s agents ran with {c.get('interpreter') or c.get('python') or 'an unrecorded interpreter'}."
        for c in result["checkouts"]
    ]
    lines.append("")
    return "\n".join(lines)


METHOD = [
    "- One `bao server -dev` in the runbook layout and the HTTPS Kubernetes API stand-in (testbed/kubeapi.py,"
    " which answers TokenReviews and records Events). Every agent reads the same KV v1 secret (RSA 4096 bundle).",
    "- istio-vault-agent: `python -m agent.cli run --mode sidecar` from the checkout (PYTHONPATH and working"
    " directory, byte-compiled first as pip does), with the config the chart renders for istiod (init.timeout"
    " 120s, sidecar.poll_interval 30s as the README recommends for istiod, health server with /metrics) and the"
    " pod's environment: POD_NAME,"
    " POD_NAMESPACE (the chart's examples), POD_UID and NODE_NAME (read when present), and KUBECONFIG pointing"
    " at the stand-in in place of the in-cluster service account. Each pod's BundlePublished Event is checked in"
    " the stand-in's records before the window starts, so the Kubernetes client is loaded in every instance.",
    "- `bao agent` at its defaults (kubernetes auto_auth, a file sink, four templates), as in `python -m bench`.",
    "- Agents start interleaved (checkouts and bao agent alternately) in waves, each wave once the previous one"
    " has published. During the window /healthz and /readyz are probed every 10 s (kubelet) and /metrics"
    " scraped every 30 s (the chart's PodMonitor). RSS, RssAnon and PSS are summed over each agent's process"
    " tree from /proc at the end of the window (after at least one 30 s poll) and averaged per tool.",
    "- Init: `--mode init` into an empty directory, the tools round robin (the first rotates), one warm-up each;"
    " wall time from spawn to exit, CPU and peak RSS from wait4().",
]


# ------------------------------------------------------------------------------------------------- main


def _environment() -> dict[str, Any]:
    version = subprocess.run([bao_binary(), "version"], capture_output=True, text=True, check=False).stdout
    return {
        "started": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpus": os.cpu_count(),
        "cpu_model": cpu_model(),
        "python": platform.python_version(),
        "bao_version": " ".join(version.split()[:2]),
        "loadavg_start": loadavg(),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Measure init and the fleet for the chosen checkouts; returns the result dict."""
    checkouts = with_interpreters(checkouts_from_args(args.checkout, args.compare), args.python, args.image_python)
    for c in checkouts:
        _prepare(c)
    result: dict[str, Any] = {
        "environment": _environment(),
        "instances": args.instances,
        "checkouts": [
            {"label": c.label, "root": str(c.root), "describe": c.describe(), "python": c.python,
             "interpreter": c.interpreter}
            for c in checkouts
        ],
    }
    _log("starting OpenBao and the Kubernetes API stand-in")
    with Testbed() as tb:
        kubeconfig = tb.kube.write_kubeconfig(
            tb.workdir / "kubeconfig",
            tb.kube.mint_token(NAMESPACE, SERVICE_ACCOUNT, ttl=24 * 3600),
            namespace=NAMESPACE,
        )
        if args.init_runs > 0:
            _log(f"init: {args.init_runs} runs each of {', '.join(c.label for c in checkouts)} and bao, round robin")
            result["init"] = measure_init(
                tb, tb.workdir, checkouts, args.init_runs, kubeconfig=kubeconfig
            )
        if args.instances > 0:
            fleet = Fleet(tb, tb.workdir, checkouts, kubeconfig=kubeconfig)
            try:
                _log(f"starting {args.instances} sidecars of each ({len(checkouts) + 1} tools), {args.wave} per wave")
                fleet.start(args.instances, args.wave)
                result["fleet"] = measure_fleet(fleet, settle=args.settle, window=args.window)
            finally:
                fleet.stop()
    result["environment"]["loadavg_end"] = loadavg()
    result["targets"] = targets(result)
    return result


def parser() -> argparse.ArgumentParser:
    """The command line of `python -m bench --production`."""
    p = argparse.ArgumentParser(prog="python -m bench --production", description=__doc__)
    p.add_argument("--instances", "-n", type=int, default=10, help="sidecars of each tool (default 10; try 50, 100)")
    p.add_argument("--checkout", type=Path, help="measure the agent of this checkout (default: this one)")
    p.add_argument("--compare", type=Path, nargs=2, metavar=("BEFORE", "AFTER"),
                   help="measure two checkouts' agents side by side with bao agent, in one run")
    p.add_argument("--init-runs", type=int, default=20, help="init runs per tool (default 20; 0 skips init)")
    p.add_argument("--window", type=float, default=35.0,
                   help="seconds of probing before memory is sampled (default 35: at least one 30 s poll)")
    p.add_argument("--settle", type=float, default=5.0, help="seconds after the last first Event (default 5)")
    p.add_argument("--wave", type=int, default=10, help="agents of each tool started at once (default 10)")
    p.add_argument("--python", help="interpreter for our agents (default: the image venv of the checkout's"
                   " requirements.lock, built once under bench/results/image-venv/)")
    p.add_argument("--image-python", default=BASE_PYTHON,
                   help=f"the Python the image venv is made from (default {BASE_PYTHON}; the image runs 3.12)")
    p.add_argument("--out", type=Path, default=RESULTS, help="output directory (default bench/results)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; writes production.json and production.md into `--out` and prints the markdown."""
    args = parser().parse_args(argv)
    if args.instances < 0 or args.wave < 1 or args.init_runs < 0:
        raise SystemExit("error: --instances and --init-runs must be 0 or more, --wave 1 or more")
    started = time.monotonic()
    result = run(args)
    result["environment"]["duration_seconds"] = time.monotonic() - started
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "production.json").write_text(json.dumps(result, indent=2) + "\n")
    text = markdown(result)
    (args.out / "production.md").write_text(text)
    _log(f"wrote {args.out / 'production.json'}, {args.out / 'production.md'}")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
