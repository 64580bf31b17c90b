"""Turn a benchmark result (a JSON-able dict) into a markdown table and a PNG plot of propagation latencies."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["markdown", "percentile", "plot", "summary"]

MIB = 1024 * 1024


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation between order statistics (numpy's default)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summary(values: Sequence[float]) -> dict[str, float | int]:
    """n, min, median (p50), p90, p99, max and mean of `values`."""
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "min": min(values),
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
        "max": max(values),
        "mean": sum(values) / len(values),
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0 or math.isnan(a) or math.isnan(b):
        return None
    return a / b


def _fmt(value: float | None, unit: str = "", digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}{unit}"


def _ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1000:.0f} ms"


def _latency(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    return f"{seconds * 1000:.0f} ms" if seconds < 10 else f"{seconds:.1f} s"


def markdown(result: dict[str, Any]) -> str:
    """The human-readable report: init, sidecar idle, propagation, targets, and how it was measured."""
    env = result["environment"]
    lines = [
        "# istio-vault-agent vs bao agent",
        "",
        f"Run {env['started']} on {env['cpus']} CPU(s) ({env['cpu_model']}), Python {env['python']}, "
        f"{env['bao_version']}; load average {env['loadavg_start']} at start, {env['loadavg_end']} at end."
        + (" **Quick run (`--quick`): short windows and few samples; for development only.**" if env["quick"] else ""),
        "",
    ]
    init = result.get("init")
    if init:
        o, b = init["ours"], init["bao"]
        lines += [
            f"## Init: wall time to publish the four files and exit ({o['wall']['n']} runs each, alternating)",
            "",
            "| | istio-vault-agent | bao agent | ours / bao |",
            "|---|---:|---:|---:|",
            f"| median | {_ms(o['wall']['p50'])} | {_ms(b['wall']['p50'])} | {_fmt(init['ratio_p50'])} |",
            f"| p90 | {_ms(o['wall']['p90'])} | {_ms(b['wall']['p90'])} | {_fmt(init['ratio_p90'])} |",
            f"| CPU time (user+sys), median | {_ms(o['cpu']['p50'])} | {_ms(b['cpu']['p50'])} | "
            f"{_fmt(_ratio(o['cpu']['p50'], b['cpu']['p50']))} |",
            f"| peak RSS, median | {_fmt(o['maxrss']['p50'] / MIB, ' MiB', 1)} | "
            f"{_fmt(b['maxrss']['p50'] / MIB, ' MiB', 1)} | {_fmt(_ratio(o['maxrss']['p50'], b['maxrss']['p50']))} |",
            f"| Vault requests per run | {o.get('vault_requests', 'n/a')} | {b.get('vault_requests', 'n/a')} | |",
            "",
        ]
    idle = result.get("idle")
    if idle:
        lines += [
            f"## Sidecar mode, idle: {idle['window_seconds']:.0f} s window from {idle['started_after_seconds']:.0f} s"
            " after start, secret unchanged",
            "",
            "| variant | RSS | of which anon | idle CPU | Vault requests / min | redundant writes |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for v in idle["variants"].values():
            req = _fmt(v["vault_requests_per_min"], "", 1)
            if v.get("metrics_requests_per_min") is not None:
                req += f" (own /metrics: {_fmt(v['metrics_requests_per_min'], '', 1)})"
            lines.append(
                f"| {v['title']} | {_fmt(v['rss_bytes'] / MIB, ' MiB', 1)} "
                f"| {_fmt(v['rss_anon_bytes'] / MIB, ' MiB', 1)} | {_fmt(v['cpu_seconds_per_hour'], ' s/h', 1)} "
                f"| {req} | {v['redundant_writes']} |"
            )
        tick = 0.01 / idle["window_seconds"] * 3600
        lines += ["", f"Idle CPU resolution: {tick:.1f} s/h (one 10 ms clock tick over the window)."]
        h = idle.get("headline")
        if h:
            lines += [
                "",
                f"Defaults side by side ({h['ours']} vs {h['bao']}): RSS ratio ours/bao **{_fmt(h['rss_ratio'])}**, "
                f"anonymous RSS ratio {_fmt(h['rss_anon_ratio'])}, idle CPU ratio {_fmt(h['cpu_ratio'])}.",
            ]
        lines.append("")
    prop = result.get("propagation")
    if prop:
        lines += [
            "## Propagation: KV write to all four new files on disk",
            "",
            "| variant | rotations seen | p50 | p99 | max | note |",
            "|---|---:|---:|---:|---:|---|",
        ]
        for _name, v in prop["variants"].items():
            s = v["latency"]
            seen = f"{s.get('n', 0)} / {v['attempted']}"
            lines.append(
                f"| {v['title']} | {seen} | {_latency(s.get('p50'))} | {_latency(s.get('p99'))} "
                f"| {_latency(s.get('max'))} | {v['note']} |"
            )
        lines += ["", f"Watcher resolution {prop['resolution_ms']:.0f} ms; p99 of 20 samples is close to the max.", ""]
    targets = result.get("targets")
    if targets:
        lines += ["## Targets (issue 5)", "", "| target | measured | met |", "|---|---|---|"]
        for t in targets:
            met = {True: "yes", False: "**no**", None: "n/a"}[t["met"]]
            lines.append(f"| {t['target']} | {t['measured']} | {met} |")
        lines.append("")
    lines += ["## How", "", *result.get("method", []), ""]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> Path | None:
    """A PNG of every propagation latency per variant (log scale); None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    prop = result.get("propagation")
    if not prop:
        return None
    variants = list(prop["variants"].values())
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(variants)), 4.5), dpi=110)
    for i, v in enumerate(variants):
        xs = v["latencies"]
        if xs:
            ax.boxplot([xs], positions=[i], widths=0.5, showfliers=False)
            jitter = [i + 0.18 * ((k * 7919) % 11 - 5) / 5 for k in range(len(xs))]
            ax.scatter(jitter, xs, s=10, alpha=0.6, color="tab:blue" if v["tool"] == "ours" else "tab:orange")
        else:
            ax.annotate(
                f"not within\n{v['window_seconds']:.0f} s",
                (i, 1.0),
                ha="center",
                va="center",
                fontsize=8,
                color="tab:red",
            )
    ax.set_yscale("log")
    ax.set_xticks(range(len(variants)))
    ax.set_xticklabels([v["title"] for v in variants], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("KV write -> files on disk (s, log scale)")
    ax.set_title("Propagation latency per rotation")
    ax.grid(axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
