"""`python -m bench --fleet`: N istio-vault-agent sidecars beside N `bao agent`s against one OpenBao (issue 19).

Every agent of both tools is started at once (a start storm) against one `bao server -dev`, each tool with its
defaults: ours with the config the chart renders (sidecar.pollInterval from the chart's values.yaml, 5m) and
the pod's environment, run by the image venv as in `--production`; bao agent with the runbook's template setup
(bench/agents.py) and no template_config, so its static_secret_render_interval default (5m) applies. All read
one KV v2 secret (bao agent re-reads a KV v1 secret only near its ~27-day lease end, see bench/RESULTS.md).

Each tool's requests go through its own loopback counting proxy (bench/proxy.py, which here also keeps each
request's time), so both are counted alike. Over one run:

- Vault requests per minute per agent by kind (login, token renew/lookup, KV metadata, KV data, sys/*) in a
  steady window that begins `--settle` seconds after every agent has published and lasts `--window` seconds,
  nothing written to Vault. The default is one interval: each of ours then looks exactly once in it, and bao
  agent, which re-reads at 85 to 95 % of its interval, once or twice (once when its timer started with the
  storm, as here); a longer window averages more looks;
- the start storm: requests per agent until all had published, and requests per second over the run and over
  the window, busiest second against the mean;
- logins per kubelet token rotation: each agent has its own projected service-account token directory; during
  the window every one gets a new JWT the way kubelet writes it (a new timestamped directory, `..data` swapped
  by rename) and the logins that follow are counted at the proxies (and the TokenReviews at the stand-in);
- rotation to all N: one new version of the secret, written at the window's end; the time until each agent's
  four files hold it (bench/watch.py), waiting up to the interval plus 60 s;
- mixed observations: a reader reads the four files of every output directory over and over and counts the
  reads whose files belong to different bundles (or to none);
- anonymous memory per agent (RssAnon over the process tree, bench/procfs.py) at the end of the steady window.

The mixed-observation reader runs from the first publish of all to the end, token rotation included.

`--interval 30s` runs the shorter variant: ours with sidecar.poll_interval 30s and bao agent with
template_config.static_secret_render_interval 30s, so rotation and the window take seconds, not minutes.
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import random
import re
import shlex
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bench.agents import ROOT, AgentProcess, AgentSpec, bao_agent_spec
from bench.env import FILES, KV2_MOUNT, Testbed
from bench.procfs import loadavg, sample_tree
from bench.production import (
    BASE_PYTHON,
    NAMESPACE,
    RESULTS,
    SERVICE_ACCOUNT,
    _environment,
    _prepare,
    checkouts_from_args,
    ours_production_spec,
    with_interpreters,
)
from bench.proxy import CountingProxy
from bench.report import MIB, summary
from bench.watch import Watcher
from testbed.kubeapi import TOKENREVIEW_PATH

__all__ = [
    "KINDS",
    "MixedReader",
    "RecordingProxy",
    "Settings",
    "chart_poll_interval",
    "classify",
    "kubelet_write",
    "main",
    "markdown",
    "path_kind",
    "rates",
    "run",
    "spread",
    "targets",
]

#: the kinds of Vault request, in report order
KINDS = ("login", "token", "kv-metadata", "kv-data", "sys", "other")
KIND_TITLES = {
    "login": "login (auth/*/login)",
    "token": "token renew/lookup (auth/token/*)",
    "kv-metadata": "KV metadata",
    "kv-data": "KV data",
    "sys": "sys/*",
    "other": "other",
}
TOOLS = ("ours", "bao")
TITLES = {"ours": "istio-vault-agent", "bao": "bao agent"}
NAMES = tuple(FILES)
VALUES_YAML = ROOT / "charts" / "istio-vault-agent" / "values.yaml"
#: bao agent's template_config.static_secret_render_interval when not set (Vault/OpenBao agent docs)
BAO_DEFAULT_RENDER_INTERVAL = "5m"


def _log(msg: str) -> None:
    print(f"[bench fleet {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def chart_poll_interval(values: Path = VALUES_YAML) -> str:
    """sidecar.pollInterval as the chart's values.yaml sets it (what the chart renders when left alone)."""
    data = yaml.safe_load(values.read_text())
    return str(data["sidecar"]["pollInterval"])


def _seconds(text: str) -> float:
    """`30s`, `5m`, `1h`, `1m30s` or a bare number, in seconds."""
    text = text.strip()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"not a duration: {text!r}")
    unit = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(float(n) * unit[u] for n, u in parts)


@dataclass(frozen=True)
class Settings:
    """Each tool's refresh setting for one run: both at their defaults, or both set to `interval`."""

    interval: str | None = None
    chart_poll: str = "5m"

    @property
    def ours_poll(self) -> str:
        """Our sidecar.poll_interval."""
        return self.interval or self.chart_poll

    @property
    def bao_render(self) -> str | None:
        """bao agent's static_secret_render_interval to write into its config (None: not set, its default)."""
        return self.interval

    @property
    def period(self) -> float:
        """The longer of the two refresh periods in seconds (what the window must hold)."""
        return max(_seconds(self.ours_poll), _seconds(self.bao_render or BAO_DEFAULT_RENDER_INTERVAL))

    def describe(self) -> dict[str, str]:
        """The report's words for each tool's setting."""
        if self.interval is None:
            return {
                "ours": f"sidecar.poll_interval {self.ours_poll} (the chart's default), first look at a random phase",
                "bao": "no template_config: static_secret_render_interval at its default"
                       f" ({BAO_DEFAULT_RENDER_INTERVAL})",
            }
        return {
            "ours": f"sidecar.poll_interval {self.interval} (set for this variant; chart default"
                    f" {self.chart_poll})",
            "bao": f"template_config.static_secret_render_interval {self.interval} (set for this variant; default"
                   f" {BAO_DEFAULT_RENDER_INTERVAL})",
        }


# ------------------------------------------------------------------------------------------------- parts


def path_kind(path: str) -> str:
    """The kind of a Vault API request path (query ignored): one of KINDS."""
    p = path.split("?", 1)[0]
    if not p.startswith("/v1/"):
        return "other"
    p = p[len("/v1/") :]
    if p.startswith("auth/token/"):
        return "token"
    if p.startswith("auth/") and p.rstrip("/").endswith("/login"):
        return "login"
    if p.startswith("sys/"):
        return "sys"
    mount, _, rest = p.partition("/")
    if mount == KV2_MOUNT and rest.startswith("metadata/"):
        return "kv-metadata"
    if mount == KV2_MOUNT and rest.startswith("data/"):
        return "kv-data"
    if mount.endswith("-secrets") and rest:
        return "kv-data"  # the runbook's KV v1 mount: a read is the data
    return "other"


class RecordingProxy(CountingProxy):
    """A CountingProxy that also keeps the time and kind of every request (for rates and the per-second spread)."""

    def __init__(self, upstream: str) -> None:
        """As CountingProxy."""
        super().__init__(upstream)
        self.log: list[tuple[float, str]] = []

    def _record(self, method: str, path: str) -> None:
        super()._record(method, path)
        with self._lock:
            self.log.append((time.monotonic(), path_kind(path)))

    def events(self) -> list[tuple[float, str]]:
        """(monotonic time, kind) of every request so far, in arrival order."""
        with self._lock:
            return list(self.log)


def rates(events: Sequence[tuple[float, str]], *, start: float, end: float, agents: int) -> dict[str, float]:
    """Requests per minute per agent in [start, end), by kind, plus "all"."""
    minutes = (end - start) / 60
    counts = dict.fromkeys(KINDS, 0)
    for t, kind in events:
        if start <= t < end:
            counts[kind] += 1
    out = {k: v / minutes / agents if minutes > 0 and agents else 0.0 for k, v in counts.items()}
    out["all"] = sum(out[k] for k in KINDS)
    return out


def count(events: Sequence[tuple[float, str]], *, start: float, end: float, kind: str | None = None) -> int:
    """Requests (of `kind`, or all) in [start, end)."""
    return sum(1 for t, k in events if start <= t < end and (kind is None or k == kind))


def spread(times: Sequence[float], *, start: float, end: float) -> dict[str, float]:
    """Requests per second over [start, end) in whole seconds: the busiest second, the mean, and their ratio."""
    seconds = max(1, int(end - start))
    buckets = [0] * seconds
    ordered = sorted(times)
    for i in range(seconds):
        lo, hi = start + i, start + i + 1
        buckets[i] = bisect.bisect_left(ordered, hi) - bisect.bisect_left(ordered, lo)
    mean = sum(buckets) / seconds
    busiest = max(buckets)
    return {
        "seconds": seconds,
        "busiest": busiest,
        "busiest_at": float(buckets.index(busiest)),
        "mean": mean,
        "ratio": busiest / mean if mean else 0.0,
    }


def kubelet_write(directory: Path, token: str) -> Path:
    """Write `token` into `directory` as kubelet's AtomicWriter does for a projected service-account token.

    The content goes into a new `..<timestamp>` directory, a `..data_tmp` symlink to it is renamed over `..data`
    (one atomic swap), `token` is a symlink to `..data/token`, and the previous timestamped directory is removed.
    Returns the visible path (`directory/token`).
    """
    directory.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("..%Y_%m_%d_%H_%M_%S.", time.gmtime()) + f"{time.time_ns() % 10**9:09d}"
    new = directory / stamp
    new.mkdir()
    (new / "token").write_text(token)
    os.chmod(new / "token", 0o600)
    data, tmp = directory / "..data", directory / "..data_tmp"
    old = os.readlink(data) if data.is_symlink() else None
    if tmp.is_symlink():
        tmp.unlink()
    tmp.symlink_to(stamp)
    os.replace(tmp, data)
    visible = directory / "token"
    if not visible.is_symlink():
        visible.symlink_to("..data/token")
    if old is not None and old != stamp:
        for child in (directory / old).iterdir():
            child.unlink()
        (directory / old).rmdir()
    return visible


def classify(observed: Mapping[str, bytes | None], bundles: Sequence[Mapping[str, bytes]]) -> str:
    """One read of an output directory's four files: "missing" (a file absent), "partial" (a file matches no
    bundle), "mixed" (every file is some bundle's, but no one bundle has them all) or "ok"."""
    if any(observed.get(n) is None for n in NAMES):
        return "missing"
    candidates: set[int] | None = None
    for name in NAMES:
        holders = {i for i, b in enumerate(bundles) if b[name] == observed[name]}
        if not holders:
            return "partial"
        candidates = holders if candidates is None else candidates & holders
    return "ok" if candidates else "mixed"


@dataclass
class _Watched:
    tool: str
    out: Path


@dataclass
class MixedReader:
    """Reads the four files of every output directory over and over in one daemon thread (a pause of `interval`
    seconds between sweeps) and counts each read's classification per tool, two ways:

    - `counts`: as a consumer that wants one bundle reads them: where the directory has a `..data` link (ours,
      like kubelet's volumes) it is resolved once and the four files are read from that generation, the
      publisher's contract; a generation removed between the two is a retry, not a verdict. A directory without
      one (bao agent's four templates) is read through its four visible paths.
    - `visible`: through the four visible paths one after another, as istiod reads them; a swap between two of
      the reads shows up here for either tool.
    """

    bundles: Sequence[Mapping[str, bytes]]
    interval: float = 0.02
    dirs: dict[str, _Watched] = field(default_factory=dict)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    visible: dict[str, dict[str, int]] = field(default_factory=dict)
    retries: int = 0
    examples: list[str] = field(default_factory=list)
    sweeps: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def add(self, label: str, tool: str, out: Path) -> None:
        """Read `out` (the agent `label` of `tool`) from now on."""
        self.dirs[label] = _Watched(tool, out)
        for table in (self.counts, self.visible):
            table.setdefault(tool, {"ok": 0, "mixed": 0, "partial": 0, "missing": 0})

    @staticmethod
    def _read(directory: Path) -> dict[str, bytes | None]:
        observed: dict[str, bytes | None] = {}
        for name in NAMES:
            try:
                observed[name] = (directory / name).read_bytes()
            except OSError:
                observed[name] = None
        return observed

    def _count(self, table: dict[str, dict[str, int]], how: str, label: str, verdict: str) -> None:
        table[self.dirs[label].tool][verdict] += 1
        if verdict != "ok" and len(self.examples) < 20:
            self.examples.append(f"{label} ({how}): {verdict}")

    def read_once(self, label: str) -> str:
        """Read `label`'s four files once each way and count the results; returns the consumer read's verdict."""
        w = self.dirs[label]
        visible = classify(self._read(w.out), self.bundles)
        self._count(self.visible, "visible paths", label, visible)
        try:
            generation = w.out / os.readlink(w.out / "..data")
        except OSError:  # no ..data: the visible paths are all a consumer has
            self._count(self.counts, "visible paths", label, visible)
            return visible
        observed = self._read(generation)
        if any(v is None for v in observed.values()) and not generation.exists():
            self.retries += 1  # cleaned up after a newer swap: read again next sweep
            return "retry"
        verdict = classify(observed, self.bundles)
        self._count(self.counts, "..data once", label, verdict)
        return verdict

    def start(self) -> MixedReader:
        """Start reading; returns self."""

        def loop() -> None:
            while not self._stop.is_set():
                for label in list(self.dirs):
                    self.read_once(label)
                self.sweeps += 1
                self._stop.wait(self.interval)

        self._thread = threading.Thread(target=loop, name="mixed-reader", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop reading."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)


# ------------------------------------------------------------------------------------------------- the run


@dataclass
class _Agent:
    tool: str
    spec: AgentSpec
    proc: AgentProcess
    token_dir: Path


def _wait_all(
    agents: Sequence[_Agent], watcher: Watcher, expected: Mapping[str, bytes], timeout: float
) -> dict[str, float]:
    """Monotonic time each agent first held `expected`. Raises RuntimeError when one exits or is late."""
    seen: dict[str, float] = {}
    deadline = time.monotonic() + timeout
    while len(seen) < len(agents):
        for a in agents:
            if a.spec.label in seen:
                continue
            if not a.proc.alive():
                raise RuntimeError(f"{a.spec.label} exited before publishing:\n{a.proc.log_tail()}")
            t = watcher.wait_for(a.spec.label, expected, timeout=0)
            if t is not None:
                seen[a.spec.label] = t
        if len(seen) < len(agents):
            if time.monotonic() > deadline:
                late = next(a for a in agents if a.spec.label not in seen)
                raise RuntimeError(
                    f"{len(agents) - len(seen)} agents had not published within {timeout:.0f} s (first:"
                    f" {late.spec.label}):\n{late.proc.log_tail()}"
                )
            time.sleep(0.1)
    return seen


def _check_alive(agents: Sequence[_Agent]) -> None:
    for a in agents:
        if not a.proc.alive():
            raise RuntimeError(f"{a.spec.label} exited during the measurement:\n{a.proc.log_tail()}")


def _sleep_until(when: float) -> None:
    delay = when - time.monotonic()
    if delay > 0:
        time.sleep(delay)


def _rotations(
    tb: Testbed, kv: str, agents: Sequence[_Agent], watcher: Watcher, args: argparse.Namespace, *, period: float,
    timeout: float,
) -> tuple[list[float], dict[str, dict[int, float]]]:
    """Write bundles 1..K (`--rotations`), the first at once and each next one after a uniformly random gap of 5 s to
    one interval (seeded by `--seed`), so the writes land at every phase of the agents' timers; watch until every
    agent holds the last one or `timeout` seconds after the last write. Returns the write times and, per agent, when
    each bundle was first seen in all four of its files (a scan every 0.2 s: an agent holds a bundle for at least
    its poll interval, so none is missed)."""
    rng = random.Random(args.seed)  # noqa: S311 - the gaps of a benchmark, not a secret
    gaps = [0.0] + [rng.uniform(5.0, period) for _ in range(args.rotations - 1)]
    start = time.monotonic()
    due = [start + sum(gaps[: k + 1]) for k in range(args.rotations)]
    writes: list[float] = []
    got: dict[str, dict[int, float]] = {a.spec.label: {} for a in agents}
    last = args.rotations
    while True:
        now = time.monotonic()
        if len(writes) < len(due) and now >= due[len(writes)]:
            writes.append(time.monotonic())
            tb.write(kv, len(writes))
            _log(f"bundle version {len(writes)} of {last} written"
                 + (f"; waiting up to {timeout:.0f} s for all {len(agents)} to hold it" if len(writes) == last else ""))
        for a in agents:
            for j in range(1, len(writes) + 1):
                if j not in got[a.spec.label]:
                    t = watcher.wait_for(a.spec.label, tb.bundles[j], timeout=0)
                    if t is not None:
                        got[a.spec.label][j] = t
        if len(writes) == last and (all(last in g for g in got.values()) or now > writes[-1] + timeout):
            return writes, got
        _check_alive(agents)
        time.sleep(0.2)


def _latencies(got: Mapping[str, Mapping[int, float]], labels: Sequence[str], writes: Sequence[float],
               k: int) -> list[float]:
    """Seconds from write `k` (0-based; bundle k + 1) until each agent held it or a later one; agents that held
    neither are left out."""
    out = []
    for label in labels:
        seen = [t for j, t in got[label].items() if j >= k + 1]
        if seen:
            out.append(min(seen) - writes[k])
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:  # noqa: PLR0915 - one timeline, read top to bottom
    """One fleet run; returns the result dict."""
    settings = Settings(args.interval, chart_poll_interval())
    window = args.window if args.window is not None else settings.period
    rotation_timeout = args.rotation_timeout if args.rotation_timeout is not None else settings.period + 60
    checkout = with_interpreters(checkouts_from_args(args.checkout, None), args.python, args.image_python)[0]
    _prepare(checkout)
    n = args.instances
    result: dict[str, Any] = {
        "environment": _environment(),
        "command": args.command,
        "instances": n,
        "settings": {"interval": settings.interval, "ours_poll": settings.ours_poll,
                     "bao_render": settings.bao_render or f"default ({BAO_DEFAULT_RENDER_INTERVAL})",
                     "describe": settings.describe()},
        "checkout": {"describe": checkout.describe(), "interpreter": checkout.interpreter},
        "window_seconds_planned": window,
    }
    _log("starting OpenBao and the Kubernetes API stand-in")
    with Testbed(n_bundles=args.rotations + 1) as tb:
        kv = tb.secret("fleet", kv_version=2)
        kubeconfig = tb.kube.write_kubeconfig(
            tb.workdir / "kubeconfig", tb.kube.mint_token(NAMESPACE, SERVICE_ACCOUNT, ttl=24 * 3600),
            namespace=NAMESPACE,
        )
        proxies = {tool: RecordingProxy(tb.bao.address) for tool in TOOLS}
        for proxy in proxies.values():
            proxy.start()
        watcher = Watcher(interval=args.watch_interval)
        reader = MixedReader(tb.bundles, interval=args.read_interval)
        plans: list[tuple[str, AgentSpec, Path]] = []
        agents: list[_Agent] = []
        token_tool: dict[str, str] = {}
        for i in range(n):
            for tool in TOOLS:
                label = f"fleet-{tool}-{i}"
                token_dir = tb.workdir / label / "serviceaccount"
                token = tb.kube.mint_token(NAMESPACE, SERVICE_ACCOUNT, ttl=24 * 3600)
                token_tool[token] = tool
                common: dict[str, Any] = {"address": proxies[tool].address,
                                          "token_path": kubelet_write(token_dir, token), "kv": kv}
                if tool == "ours":
                    spec = ours_production_spec(label, tb.workdir, checkout, kubeconfig=kubeconfig, mode="sidecar",
                                                poll_interval=settings.ours_poll, **common)
                else:
                    spec = bao_agent_spec(label, tb.workdir, mode="sidecar", render_interval=settings.bao_render,
                                          **common)
                watcher.add(label, spec.out, NAMES)
                plans.append((tool, spec, token_dir))
        watcher.start()
        try:
            _log(f"start storm: {n} istio-vault-agent and {n} bao agent at once ({settings.describe()['ours']};"
                 f" bao: {settings.describe()['bao']})")
            t0 = time.monotonic()
            for tool, spec, token_dir in plans:  # interleaved: ours-0, bao-0, ours-1, ...
                agents.append(_Agent(tool, spec, AgentProcess(spec), token_dir))
            spawned = time.monotonic() - t0
            published = _wait_all(agents, watcher, tb.bundles[0], timeout=args.start_timeout)
            t_ready = time.monotonic()
            _log(f"all {2 * n} published {t_ready - t0:.1f} s after the first spawn")
            for a in agents:
                reader.add(a.spec.label, a.tool, a.spec.out)
            reader.start()
            w0 = t_ready + args.settle
            w1 = w0 + window
            _sleep_until(w0)
            _log(f"steady window: {window:.0f} s, token files rotated at +{args.token_at:.0f} s")
            _sleep_until(w0 + args.token_at)
            kube_mark = len(tb.kube.requests)
            t_tok = time.monotonic()
            for a in agents:
                fresh = tb.kube.mint_token(NAMESPACE, SERVICE_ACCOUNT, ttl=24 * 3600)
                token_tool[fresh] = a.tool
                kubelet_write(a.token_dir, fresh)
            _sleep_until(w1)
            _check_alive(agents)
            memory = {a.spec.label: sample_tree(a.proc.pid) for a in agents}
            writes, got = _rotations(tb, kv, agents, watcher, args, period=settings.period,
                                     timeout=rotation_timeout)
            t_write = writes[0]
            t_end = time.monotonic()
        finally:
            reader.stop()
            watcher.stop()
            for a in agents:  # all at once, then wait for each
                if a.proc.alive():
                    a.proc.proc.terminate()
            for a in agents:
                a.proc.stop()
            for p in proxies.values():
                p.stop()
        reviews_after: dict[str, int] = dict.fromkeys(TOOLS, 0)
        for req in tb.kube.requests[kube_mark:] if kube_mark else []:
            if req.method != "POST" or not req.path.startswith(TOKENREVIEW_PATH):
                continue
            body = req.body if isinstance(req.body, dict) else {}
            whose = token_tool.get(str((body.get("spec") or {}).get("token")))
            if whose is not None:
                reviews_after[whose] += 1
        tools: dict[str, Any] = {}
        for tool in TOOLS:
            events = proxies[tool].events()
            mine = [a for a in agents if a.tool == tool]
            per_rotation = [_latencies(got, [a.spec.label for a in mine], writes, k) for k in range(len(writes))]
            latencies = [x for lat in per_rotation for x in lat]
            to_all = [max(lat) for lat in per_rotation if len(lat) == len(mine)]
            first = [published[a.spec.label] - t0 for a in mine]
            tools[tool] = {
                "instances": len(mine),
                "rates": rates(events, start=w0, end=w1, agents=len(mine)),
                "rates_rotation": rates(events, start=t_write, end=t_end, agents=len(mine)),
                "paths_whole_run": dict(sorted(proxies[tool].paths.items())),
                "start_requests_per_agent": count(events, start=t0, end=t_ready) / len(mine),
                "first_publish": summary(first),
                "logins_after_token_rotation": count(events, start=t_tok, end=t_end, kind="login"),
                "logins_in_window_before_it": count(events, start=w0, end=t_tok, kind="login"),
                "logins_after_bundle_rotation": count(events, start=t_write, end=t_end, kind="login"),
                "tokenreviews_after_token_rotation": reviews_after[tool],
                "spread_run": spread([t for t, _ in events], start=t0, end=t_end),
                "spread_window": spread([t for t, _ in events if w0 <= t < w1], start=w0, end=w1),
                "requests": [[round(t - t0, 3), k] for t, k in events],
                "rotation": summary(per_rotation[0]) | {"seen": len(per_rotation[0])},
                "rotations_pooled": summary(latencies) | {"seen": len(latencies), "expected": len(mine) * len(writes)},
                "rotations_to_all": summary(to_all) | {"reached": len(to_all), "rotations": len(writes)},
                "mixed": dict(reader.counts.get(tool, {})),
                "mixed_visible_paths": dict(reader.visible.get(tool, {})),
                "anon": summary([memory[a.spec.label].rss_anon_bytes for a in mine]),
                "rss": summary([memory[a.spec.label].rss_bytes for a in mine]),
            }
        result["timeline"] = {
            "spawn_seconds": spawned,
            "all_published_after": t_ready - t0,
            "window_start_after": w0 - t0,
            "window_seconds": w1 - w0,
            "bundle_written_at": t_write - w0,
            "rotation_writes_after_first": [w - t_write for w in writes],
            "rotation_phase_seconds": t_end - t_write,
            "rotation_timeout": rotation_timeout,
            "tokens_rotated_at": t_tok - w0,
            "watch_resolution_ms": args.watch_interval * 1000,
            "reader_sweeps": reader.sweeps,
            "reader_retries": reader.retries,
            "mixed_examples": reader.examples,
        }
        result["tools"] = tools
    result["environment"]["loadavg_end"] = loadavg()
    result["targets"] = targets(result)
    return result


# ------------------------------------------------------------------------------------------------- report


def _get(result: Mapping[str, Any], tool: str, *keys: str) -> Any:
    value: Any = result["tools"][tool]
    for k in keys:
        if not isinstance(value, Mapping) or k not in value:
            return None
        value = value[k]
    return value


def targets(result: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Issue 19's fleet targets, each with what was measured and whether it was met (None: not measurable)."""
    n = result["instances"]
    ours_rate, bao_rate = _get(result, "ours", "rates", "all"), _get(result, "bao", "rates", "all")
    ours_p99, bao_p99 = _get(result, "ours", "rotation", "p99"), _get(result, "bao", "rotation", "p99")
    ours_seen, bao_seen = _get(result, "ours", "rotation", "seen") or 0, _get(result, "bao", "rotation", "seen") or 0
    logins = _get(result, "ours", "logins_after_token_rotation")
    mixed = _get(result, "ours", "mixed") or {}
    torn = mixed.get("mixed", 0) + mixed.get("partial", 0)
    if ours_seen < n:
        p99_met: bool | None = False
    elif bao_seen < n:
        p99_met = True  # ours reached all N, bao agent did not within the window
    else:
        p99_met = ours_p99 <= bao_p99
    return [
        {"target": "Vault requests/min/agent <= bao agent's", "measured": f"{ours_rate:.3f} vs {bao_rate:.3f}",
         "met": ours_rate <= bao_rate},
        {"target": "rotation p99 to all N <= bao agent's",
         "measured": f"{_dur(ours_p99)} ({ours_seen}/{n}) vs {_dur(bao_p99)} ({bao_seen}/{n})", "met": p99_met},
        *_pooled_targets(result),
        {"target": "zero logins on a token-file rotation", "measured": f"{logins} logins for {n} rotated files",
         "met": logins == 0},
        {"target": "zero mixed observations", "measured": f"{torn} of {sum(mixed.values())} reads", "met": torn == 0},
    ]


def _pooled_targets(result: Mapping[str, Any]) -> list[dict[str, Any]]:
    """With `--rotations` K > 1, the rotation target over all K: each rotation's time to all N (mean and p99 over the
    rotations) and every agent's latency to every rotation (p99 of the pooled draws)."""
    k = _get(result, "ours", "rotations_to_all", "rotations") or 1
    if k < 2:
        return []
    out = []
    for key, q, title in (("rotations_to_all", "mean", f"rotation to all N, mean of {k} rotations"),
                          ("rotations_to_all", "p99", f"rotation to all N, p99 of {k} rotations"),
                          ("rotations_pooled", "p99", f"one agent's rotation latency, p99 of N x {k}")):
        ours, bao = _get(result, "ours", key, q), _get(result, "bao", key, q)
        met = None if ours is None or bao is None else ours <= bao
        out.append({"target": f"{title} <= bao agent's", "measured": f"{_dur(ours)} vs {_dur(bao)}", "met": met})
    return out


def _busiest(s: Mapping[str, float]) -> str:
    """`busiest / mean = ratio (at +N s)`, the second counted from the start of its span."""
    return (f"{s.get('busiest', 0):.0f} / {_num(s.get('mean'))} = {_num(s.get('ratio'), 1)}"
            f" (at +{s.get('busiest_at', 0):.0f} s)")


def _dur(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    return f"{seconds * 1000:.0f} ms" if seconds < 10 else f"{seconds:.1f} s"


def _num(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "n/a" if a is None or b is None or b == 0 else f"{a / b:.2f}"


def _writes(tl: Mapping[str, Any]) -> str:
    after = tl.get("rotation_writes_after_first") or [0.0]
    if len(after) < 2:
        return "one new version"
    return f"{len(after)} new versions (written at +" + ", +".join(f"{a:.0f}" for a in after) + " s)"


def markdown(result: Mapping[str, Any]) -> str:
    """The fleet table, the targets and how it was measured."""
    env, tl, n, s = result["environment"], result["timeline"], result["instances"], result["settings"]
    variant = "defaults" if s["interval"] is None else f"interval {s['interval']} for both"
    lines = [
        f"## Fleet, {variant}: {n} istio-vault-agent and {n} bao agent, one OpenBao",
        "",
        f"`{result['command']}` — run {env['started']} on {env['cpus']} CPU(s) ({env['cpu_model']}),"
        f" {env['bao_version']}; load average {env['loadavg_start']} at start, {env.get('loadavg_end', '?')} at"
        f" end; took {env.get('duration_seconds', 0):.0f} s.",
        "",
        f"- istio-vault-agent: {s['describe']['ours']}; {result['checkout']['describe']};"
        f" {result['checkout']['interpreter']}.",
        f"- bao agent: {s['describe']['bao']}; kubernetes auto_auth, a token sink and four templates"
        " (bench/agents.py).",
        f"- All {2 * n} spawned at once ({tl['spawn_seconds']:.1f} s to spawn), all published"
        f" {tl['all_published_after']:.1f} s after the first spawn; steady window of {tl['window_seconds']:.0f} s"
        f" from {tl['window_start_after']:.1f} s, nothing written to Vault in it, every token file rotated at"
        f" +{tl['tokens_rotated_at']:.1f} s; at its end {_writes(tl)} of the secret (KV v2), then up to"
        f" {tl['rotation_timeout']:.0f} s for every agent to hold the last ({tl['rotation_phase_seconds']:.0f} s"
        " taken).",
        "",
        "| per agent | istio-vault-agent | bao agent | ours / bao |",
        "|---|---:|---:|---:|",
    ]

    def row(title: str, ours: float | None, bao: float | None, fmt: Any = _num, ratio: bool = True) -> None:
        lines.append(f"| {title} | {fmt(ours)} | {fmt(bao)} | {_ratio(ours, bao) if ratio else ''} |")

    row("**Vault requests/min/agent, steady window**", _get(result, "ours", "rates", "all"),
        _get(result, "bao", "rates", "all"), lambda v: _num(v, 3))
    for kind in KINDS:
        o, b = _get(result, "ours", "rates", kind), _get(result, "bao", "rates", kind)
        if o or b:
            row(f"&nbsp;&nbsp;{KIND_TITLES[kind]}", o, b, lambda v: _num(v, 3))
    row("Vault requests/min/agent, rotation phase", _get(result, "ours", "rates_rotation", "all"),
        _get(result, "bao", "rates_rotation", "all"), lambda v: _num(v, 3))
    row("start: requests per agent until all published", _get(result, "ours", "start_requests_per_agent"),
        _get(result, "bao", "start_requests_per_agent"), lambda v: _num(v, 1))
    row("start: first publish p50", _get(result, "ours", "first_publish", "p50"),
        _get(result, "bao", "first_publish", "p50"), _dur)
    row("start: first publish, last of N", _get(result, "ours", "first_publish", "max"),
        _get(result, "bao", "first_publish", "max"), _dur)
    for key, title in (("spread_run", "whole run"), ("spread_window", "window")):
        o, b = _get(result, "ours", key) or {}, _get(result, "bao", key) or {}
        lines.append(
            f"| requests/s, busiest second / mean ({title}) | {_busiest(o)} | {_busiest(b)} | |"
        )
    row(f"logins after rotating all {n} token files (proxy)", _get(result, "ours", "logins_after_token_rotation"),
        _get(result, "bao", "logins_after_token_rotation"), lambda v: f"{v:.0f}", ratio=False)
    row("TokenReviews of the new tokens (stand-in)", _get(result, "ours", "tokenreviews_after_token_rotation"),
        _get(result, "bao", "tokenreviews_after_token_rotation"), lambda v: f"{v:.0f}", ratio=False)
    for q in ("p50", "p99", "max"):
        row(f"rotation to all N, {q}", _get(result, "ours", "rotation", q), _get(result, "bao", "rotation", q), _dur)
    lines.append(
        f"| rotation: agents holding it by the window's end | {_get(result, 'ours', 'rotation', 'seen')}/{n} |"
        f" {_get(result, 'bao', 'rotation', 'seen')}/{n} | |"
    )
    k = _get(result, "ours", "rotations_to_all", "rotations") or 1
    if k > 1:
        for q in ("p50", "mean", "p99", "max"):
            row(f"rotation to all N over {k} rotations, {q}", _get(result, "ours", "rotations_to_all", q),
                _get(result, "bao", "rotations_to_all", q), _dur)
        for q in ("p50", "p99", "max"):
            row(f"one agent's latency over N x {k} rotations, {q}", _get(result, "ours", "rotations_pooled", q),
                _get(result, "bao", "rotations_pooled", q), _dur)
        lines.append(
            f"| rotations that reached all N | {_get(result, 'ours', 'rotations_to_all', 'reached')}/{k} |"
            f" {_get(result, 'bao', 'rotations_to_all', 'reached')}/{k} | |"
        )
    mo, mb = _get(result, "ours", "mixed") or {}, _get(result, "bao", "mixed") or {}

    def mixed(m: Mapping[str, int]) -> str:
        return (f"{m.get('mixed', 0)} mixed, {m.get('partial', 0)} partial of {sum(m.values())} reads"
                f" ({m.get('missing', 0)} with a file missing)")

    row("logins during the rotation phase", _get(result, "ours", "logins_after_bundle_rotation"),
        _get(result, "bao", "logins_after_bundle_rotation"), lambda v: f"{v:.0f}", ratio=False)
    lines.append(f"| mixed observations, as a consumer reads (ours: `..data` resolved once) | {mixed(mo)} |"
                 f" {mixed(mb)} | |")
    vo, vb = _get(result, "ours", "mixed_visible_paths") or {}, _get(result, "bao", "mixed_visible_paths") or {}
    lines.append(f"| mixed observations, four visible paths one after another (as istiod reads) | {mixed(vo)} |"
                 f" {mixed(vb)} | |")
    row("anonymous memory (RssAnon), mean", _get(result, "ours", "anon", "mean"), _get(result, "bao", "anon", "mean"),
        lambda v: "n/a" if v is None else f"{v / MIB:.1f} MiB")
    row("RSS, mean", _get(result, "ours", "rss", "mean"), _get(result, "bao", "rss", "mean"),
        lambda v: "n/a" if v is None else f"{v / MIB:.1f} MiB")
    lines += ["", "| target (issue 19) | measured (ours vs bao) | met |", "|---|---|---|"]
    for t in result.get("targets", []):
        lines.append(f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else '**no**'} |")
    lines += [
        "",
        f"Watcher resolution {tl['watch_resolution_ms']:.0f} ms; the reader made {tl['reader_sweeps']} sweeps over"
        f" all {2 * n} directories. Requests by path over the whole run: "
        + "; ".join(
            f"{TITLES[t]}: " + ", ".join(f"{k} {v}" for k, v in (_get(result, t, "paths_whole_run") or {}).items())
            for t in TOOLS
        )
        + ".",
        "",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- main


def parser() -> argparse.ArgumentParser:
    """The command line of `python -m bench --fleet`."""
    p = argparse.ArgumentParser(prog="python -m bench --fleet", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--instances", "-n", type=int, default=20, help="agents of each tool (default 20; try 50, 100)")
    p.add_argument("--interval", help="set ours' poll_interval and bao agent's static_secret_render_interval to"
                   " this (e.g. 30s); default: each tool's own default (the chart's 5m; bao agent's 5m)")
    p.add_argument("--window", type=float,
                   help="seconds of steady window (default: the refresh interval, 300 s at the defaults)")
    p.add_argument("--settle", type=float, default=5.0, help="seconds from the last first publish to the window")
    p.add_argument("--rotation-timeout", type=float,
                   help="seconds to wait for every agent to hold the new bundle (default: the longer interval + 60 s)")
    p.add_argument("--rotations", type=int, default=1,
                   help="new bundle versions written after the window, at random gaps of 5 s to one interval"
                   " (default 1); each agent's latency to each is pooled, and each one's time to all N kept")
    p.add_argument("--seed", type=int, default=19, help="seed of the gaps between rotations")
    p.add_argument("--token-at", type=float, default=10.0, help="seconds into the window of the token rotation")
    p.add_argument("--start-timeout", type=float, default=300.0, help="seconds for every agent's first publish")
    p.add_argument("--watch-interval", type=float, default=0.1, help="seconds between the watcher's scans")
    p.add_argument("--read-interval", type=float, default=0.02, help="seconds between the reader's sweeps")
    p.add_argument("--checkout", type=Path, help="measure the agent of this checkout (default: this one)")
    p.add_argument("--python", help="interpreter for our agents (default: the image venv, as --production)")
    p.add_argument("--image-python", default=BASE_PYTHON, help="the Python the image venv is made from")
    p.add_argument("--out", type=Path, default=RESULTS, help="output directory (default bench/results)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; writes fleet[-INTERVAL]-nN.json and .md into `--out` and prints the markdown."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    if args.instances < 1 or (args.window is not None and args.window <= 0):
        raise SystemExit("error: --instances must be 1 or more and --window positive")
    if args.interval is not None:
        try:
            _seconds(args.interval)
        except ValueError:
            raise SystemExit(f"error: --interval {args.interval!r} is not a duration such as 30s or 5m") from None
    args.command = shlex.join(["python", "-m", "bench", "--fleet", *argv])
    started = time.monotonic()
    result = run(args)
    result["environment"]["duration_seconds"] = time.monotonic() - started
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"fleet-{args.interval or 'defaults'}-n{args.instances}"
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    text = markdown(result)
    (args.out / f"{stem}.md").write_text(text)
    _log(f"wrote {args.out / stem}.json and .md")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
