"""`python -m bench.hostile`: peak memory when Vault (or a proxy in front of it) answers the KV read with a huge
body, for istio-vault-agent (init and sidecar) and `bao agent` (init) in the same run. Target: under 96 MiB.

A loopback HTTP proxy in front of a real OpenBao replaces the KV secret's answer with SIZE bytes of JSON, sent
with a Content-Length or chunked. Peak RSS of an init run is the child's ru_maxrss, measured from a small
launcher process (Linux keeps a process's peak across exec, so forking from this large process would count it);
the sidecar's is VmHWM after it has polled the huge answer for a while.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.agents import AgentProcess, bao_agent_spec, ours_spec
from bench.env import Testbed
from tests.faultkit import Answer, HTTPProxy

__all__ = ["main", "measure"]

RESULTS = Path(__file__).resolve().parent / "results"

_LAUNCHER = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execve(sys.argv[1], sys.argv[1:], dict(os.environ))
_, status, usage = os.wait4(pid, 0)
print(os.waitstatus_to_exitcode(status), usage.ru_maxrss)
"""


def _huge(size: int) -> bytes:
    return b'{"data": {"ca_key": "' + b"A" * size + b'"}, "lease_duration": 2764800}'


def _peak(argv: list[str], env: dict[str, str], timeout: float) -> tuple[int, float]:
    """Exit code and peak RSS (MiB) of `argv`, run from a small launcher."""
    proc = subprocess.run([sys.executable, "-c", _LAUNCHER, *argv], env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)
    code, kib = proc.stdout.split()[-2:]
    return int(code), int(kib) / 1024


def _vmhwm(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def measure(size: int, sidecar_seconds: float) -> dict[str, Any]:
    """Run every variant once against a proxy that answers the KV read with `size` bytes; returns the numbers."""
    results: dict[str, Any] = {"size": size, "variants": {}}
    with Testbed() as tb:
        proxy = HTTPProxy(tb.bao.port)
        data_path = f"/v1/{tb.kv_path}"
        body = _huge(size)
        common = {"address": proxy.address, "token_path": tb.token_path, "kv": tb.kv_path}
        try:
            for chunked in (False, True):
                proxy.mutate = lambda m, p, s, b, c=chunked: Answer(200, body, chunked=c) if p == data_path else None
                how = "chunked" if chunked else "Content-Length"
                ours = ours_spec(f"ours-init-{how}", tb.workdir, mode="init", **common)  # type: ignore[arg-type]
                code, peak = _peak(ours.argv, ours.env, 120)
                results["variants"][f"istio-vault-agent init, {how}"] = {"exit": code, "peak_mib": peak}
                bao = bao_agent_spec(f"bao-init-{how}", tb.workdir, mode="init", **common)  # type: ignore[arg-type]
                code, peak = _peak(["/usr/bin/timeout", "60", *bao.argv], bao.env, 120)
                wrote = sum(f.stat().st_size for f in bao.out.glob("*")) if bao.out.exists() else 0
                results["variants"][f"bao agent init, {how}"] = {"exit": code, "peak_mib": peak, "wrote": wrote}
            spec = ours_spec("ours-sidecar", tb.workdir, mode="sidecar", poll_interval="1s",
                             **common)  # type: ignore[arg-type]
            proxy.mutate = None
            agent = AgentProcess(spec)
            try:
                deadline = time.monotonic() + 30
                while not (spec.out / "..data").exists() and time.monotonic() < deadline:
                    time.sleep(0.1)
                proxy.mutate = lambda m, p, s, b: Answer(200, body, chunked=True) if p == data_path else None
                tb.write(tb.kv_path, 1)
                time.sleep(sidecar_seconds)
                alive = agent.alive()
                peak = _vmhwm(agent.pid)
            finally:
                agent.stop()
            reads = sum(1 for _, p in proxy.requests if p == data_path)
            results["variants"]["istio-vault-agent sidecar, polling it"] = {
                "alive": alive, "peak_mib": peak, "full_reads": reads, "seconds": sidecar_seconds,
            }
        finally:
            proxy.close()
    return results


def _markdown(result: dict[str, Any]) -> str:
    lines = [
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {platform.processor() or platform.machine()},"
        f" Python {platform.python_version()}; the KV read answered with {result['size'] / 1e6:.0f} MB.",
        "",
        "| variant | outcome | peak RSS |",
        "|---|---|---:|",
    ]
    for name, v in result["variants"].items():
        if "exit" in v:
            outcome = f"exit {v['exit']}" + (f", wrote {v['wrote'] / 1e6:.0f} MB" if v.get("wrote") else "")
        else:
            state = "alive" if v["alive"] else "DEAD"
            outcome = (f"{state} after {v['seconds']:g} s, {v['full_reads']} reads of it, each stopped at 1 MiB"
                       " (KV v1: no version to remember)")
        lines.append(f"| {name} | {outcome} | {v['peak_mib']:.1f} MiB |")
    ours = [v["peak_mib"] for n, v in result["variants"].items() if n.startswith("istio")]
    baos = [v["peak_mib"] for n, v in result["variants"].items() if n.startswith("bao")]
    lines += ["", f"Worst peak: istio-vault-agent {max(ours):.1f} MiB (target < 96 MiB, "
              f"{'met' if max(ours) < 96 else 'NOT met'}); bao agent {max(baos):.1f} MiB;"
              f" ratio ours/bao {max(ours) / max(baos):.2f}."]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the measurement and write bench/results/hostile.{json,md}."""
    p = argparse.ArgumentParser(prog="python -m bench.hostile", description=__doc__)
    p.add_argument("--size", type=int, default=56_000_000, help="bytes of the huge answer (default 56 MB)")
    p.add_argument("--sidecar-seconds", type=float, default=10.0, help="how long the sidecar polls it")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    result = measure(args.size, args.sidecar_seconds)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "hostile.json").write_text(json.dumps(result, indent=2))
    text = _markdown(result)
    (args.out / "hostile.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
