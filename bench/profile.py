"""`python -m bench.profile`: where istio-vault-agent's init time goes (imports vs Vault round trips vs work).

Runs the real init against the benchmark test bed three ways: plain (wall time), under `-X importtime`
(import cost per top-level module) and under cProfile (cumulative time per phase); writes profile.json/.md.
"""

from __future__ import annotations

import argparse
import json
import pstats
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.agents import ROOT, AgentSpec, ours_spec
from bench.env import Testbed
from bench.report import percentile

__all__ = ["main", "parse_importtime", "profile"]

RESULTS = ROOT / "bench" / "results"
_IMPORT_LINE = re.compile(r"^import time:\s+(\d+) \|\s+(\d+) \| (\s*)(\S+)$")

#: phases of an init pass, as function names cProfile reports (file fragment, function)
PHASES: dict[str, tuple[str, str]] = {
    "all imports": ("<frozen importlib._bootstrap>", "_find_and_load"),
    "HTTP round trips to Vault (requests Session.send)": ("requests/sessions.py", "send"),
    "config load": ("agent/config.py", "load"),
    "log setup": ("agent/log.py", "configure"),
    "login (incl. its imports)": ("agent/auth.py", "login"),
    "bundle validation (incl. its imports)": ("agent/validate/__init__.py", "validate"),
    "publish (incl. its imports)": ("agent/publish.py", "publish"),
}


def parse_importtime(stderr: str) -> list[dict[str, Any]]:
    """Parse `-X importtime` output into [{module, self_us, cumulative_us, depth}] in import order."""
    rows = []
    for line in stderr.splitlines():
        m = _IMPORT_LINE.match(line)
        if m:
            rows.append(
                {
                    "module": m.group(4),
                    "self_us": int(m.group(1)),
                    "cumulative_us": int(m.group(2)),
                    "depth": len(m.group(3)) // 2,
                }
            )
    return rows


def _run(argv: list[str], spec: AgentSpec) -> tuple[float, subprocess.CompletedProcess[str]]:
    t0 = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, env=spec.env, cwd=ROOT, timeout=120, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}:\n{proc.stderr[-2000:]}")
    return wall, proc


def _median_wall(argv: list[str], spec: AgentSpec, runs: int) -> float:
    return percentile([_run(argv, spec)[0] for _ in range(runs)], 50)


def _phase_times(stats: pstats.Stats) -> dict[str, float]:
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    out = dict.fromkeys(PHASES, 0.0)
    for (filename, _line, func), (_cc, _nc, _tt, ct, _callers) in raw.items():
        for phase, (frag, name) in PHASES.items():
            if func == name and filename.endswith(frag):
                # recursion shows the same function once with its outermost cumulative time
                out[phase] = max(out[phase], ct)
    return out


def profile(runs: int = 5, top: int = 15) -> dict[str, Any]:
    """Profile init start-up against a fresh test bed; returns the findings (times in seconds)."""
    with Testbed() as tb:
        spec = ours_spec(
            "profile", tb.workdir, address=tb.bao.address, token_path=tb.token_path, kv=tb.kv_path, mode="init"
        )
        agent = spec.argv[1:]  # after the interpreter: -m agent.cli run --config F --mode init
        py = sys.executable
        _run([py, *agent], spec)  # warm the page cache
        result: dict[str, Any] = {
            "runs": runs,
            "wall_python_bare": _median_wall([py, "-c", "pass"], spec, runs),
            "wall_cli_version": _median_wall([py, "-m", "agent.cli", "--version"], spec, runs),
            "wall_init": _median_wall([py, *agent], spec, runs),
        }
        # -X importtime: cumulative microseconds per module, nested by import depth
        _, proc = _run([py, "-X", "importtime", *agent], spec)
        rows = parse_importtime(proc.stderr)
        top_level = [r for r in rows if r["depth"] == 0]
        result["import_total"] = sum(r["cumulative_us"] for r in top_level) / 1e6
        result["import_top"] = [
            {"module": r["module"], "seconds": r["cumulative_us"] / 1e6}
            for r in sorted(top_level, key=lambda r: -r["cumulative_us"])[:top]
        ]
        result["import_self_top"] = [
            {"module": r["module"], "seconds": r["self_us"] / 1e6}
            for r in sorted(rows, key=lambda r: -r["self_us"])[:top]
        ]
        # cProfile: cumulative time per phase and the heaviest agent functions
        prof = tb.workdir / "init.prof"
        _run([py, "-m", "cProfile", "-o", str(prof), *agent], spec)
        stats = pstats.Stats(str(prof))
        result["profiled_total"] = stats.total_tt  # type: ignore[attr-defined]
        result["phases"] = _phase_times(stats)
        raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
        agent_funcs = [
            (f"{Path(fn).parent.name}/{Path(fn).name}:{func}", ct)
            for (fn, _line, func), (_cc, _nc, _tt, ct, _callers) in raw.items()
            if f"{ROOT.name}/agent/" in fn or "/agent/" in fn
        ]
        heaviest = sorted(agent_funcs, key=lambda x: -x[1])[:top]
        result["agent_top"] = [{"function": f, "seconds": ct} for f, ct in heaviest]
    return result


def markdown(result: dict[str, Any]) -> str:
    """The profile as markdown: wall times, the phase split, the heaviest imports and functions."""

    def ms(seconds: float) -> str:
        return f"{seconds * 1000:.0f} ms"

    lines = [
        "# istio-vault-agent init profile",
        "",
        f"Median of {result['runs']} runs: `python -c pass` {ms(result['wall_python_bare'])}, "
        f"`python -m agent.cli --version` {ms(result['wall_cli_version'])}, "
        f"`run --mode init` {ms(result['wall_init'])}.",
        "",
        f"`-X importtime`: {ms(result['import_total'])} spent importing (sum of top-level cumulative times).",
        "",
        f"## cProfile phases (profiled run: {ms(result['profiled_total'])}; cProfile inflates Python-heavy parts)",
        "",
        "| phase | cumulative |",
        "|---|---:|",
        *[f"| {k} | {ms(v)} |" for k, v in result["phases"].items()],
        "",
        "## Heaviest top-level imports (cumulative)",
        "",
        "| module | time |",
        "|---|---:|",
        *[f"| {r['module']} | {ms(r['seconds'])} |" for r in result["import_top"]],
        "",
        "## Heaviest single modules (self time)",
        "",
        "| module | time |",
        "|---|---:|",
        *[f"| {r['module']} | {ms(r['seconds'])} |" for r in result["import_self_top"]],
        "",
        "## Heaviest agent functions (cumulative, profiled)",
        "",
        "| function | time |",
        "|---|---:|",
        *[f"| {r['function']} | {ms(r['seconds'])} |" for r in result["agent_top"]],
        "",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m bench.profile`; returns the exit code."""
    p = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    p.add_argument("--runs", type=int, default=5, help="runs per wall-time median (default 5)")
    p.add_argument("--out", type=Path, default=RESULTS, help="output directory (default bench/results)")
    args = p.parse_args(argv)
    result = profile(args.runs)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "profile.json").write_text(json.dumps(result, indent=2) + "\n")
    text = markdown(result)
    (args.out / "profile.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
