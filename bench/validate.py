"""`python -m bench.validate`: how long one validation takes, worst case over the hostile inputs, the differential
corpus and a typical RSA 4096 bundle (targets: <= 50 ms for any input, <= 5 ms for the typical bundle).

Each input is validated `--runs` times in this process after one warm-up (imports and cryptography's first use
are not what is measured); the table shows the median and the slowest run, and results.json keeps every number.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from agent.errors import BundleError
from agent.validate import validate

__all__ = ["inputs", "main", "measure"]

RESULTS = Path(__file__).resolve().parent / "results"


def _typical_rsa4096() -> dict[str, bytes]:
    """Makefile.selfsigned.mk: RSA 4096 root and intermediate, SHA-256, cert-chain.pem = intermediate + root."""
    from testbed import pki

    root = pki.root_ca(key_type="rsa", bits=4096)
    return pki.istio_ca_files(root, pki.intermediate_ca(root, key_type="rsa", bits=4096))


def inputs(*, corpus: bool) -> Iterator[tuple[str, str, str, Mapping[str, bytes]]]:
    """(group, name, kind, files) for every measured input."""
    from testbed import corpus as corpus_mod

    yield "typical", "rsa-4096-makefile-bundle", "istio-ca", _typical_rsa4096()
    for name, kind, files in corpus_mod.hostile():
        yield "hostile", name, kind, files
    if corpus:
        for c in corpus_mod.build():
            yield "corpus", c.name, c.kind, c.files


def measure(kind: str, files: Mapping[str, bytes], runs: int) -> tuple[list[float], str]:
    """Seconds per run, and the verdict ("ok", "warn", or the refusal's check)."""
    times = []
    verdict = ""
    for _ in range(runs + 1):
        start = time.perf_counter()
        try:
            info = validate(kind, files)
            verdict = "warn" if info.warnings else "ok"
        except BundleError as exc:
            verdict = f"refused: {exc.check or 'input'}"
        times.append(time.perf_counter() - start)
    return times[1:], verdict


def main(argv: Sequence[str] | None = None) -> int:
    """Measure, print a Markdown table, write bench/results/validate.{json,md}."""
    p = argparse.ArgumentParser(prog="python -m bench.validate", description=__doc__)
    p.add_argument("--runs", type=int, default=7, help="timed runs per input (after one warm-up)")
    p.add_argument("--no-corpus", action="store_true", help="only the typical and hostile inputs")
    args = p.parse_args(argv)

    rows = []
    for group, name, kind, files in inputs(corpus=not args.no_corpus):
        times, verdict = measure(kind, files, args.runs)
        size = sum(len(v) for v in files.values())
        rows.append({"group": group, "name": name, "kind": kind, "bytes": size, "verdict": verdict,
                     "median_ms": statistics.median(times) * 1000, "max_ms": max(times) * 1000,
                     "runs_ms": [t * 1000 for t in times]})
    load = os.getloadavg()
    lines = [
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {os.cpu_count()} CPU(s), "
        f"Python {platform.python_version()}, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; "
        f"{args.runs} timed runs per input after one warm-up.",
        "",
        "| group | input | bytes | verdict | median | slowest |",
        "|---|---|---:|---|---:|---:|",
    ]
    for r in rows:
        if r["group"] == "corpus":
            continue
        lines.append(f"| {r['group']} | {r['name']} | {r['bytes']} | {r['verdict']} | {r['median_ms']:.2f} ms | "
                     f"{r['max_ms']:.2f} ms |")
    corpus_rows = [r for r in rows if r["group"] == "corpus"]
    if corpus_rows:
        worst = max(corpus_rows, key=lambda r: r["max_ms"])
        lines.append(f"| corpus | {len(corpus_rows)} differential cases, slowest: {worst['name']} | "
                     f"{worst['bytes']} | {worst['verdict']} | {worst['median_ms']:.2f} ms | "
                     f"{worst['max_ms']:.2f} ms |")
    hostile = [r for r in rows if r["group"] != "typical"]
    typical = next(r for r in rows if r["group"] == "typical")
    lines += [
        "",
        f"Slowest single run over hostile and corpus inputs: {max(r['max_ms'] for r in hostile):.2f} ms "
        "(target <= 50 ms); typical RSA 4096 bundle median "
        f"{typical['median_ms']:.2f} ms (target <= 5 ms).",
    ]
    text = "\n".join(lines)
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "validate.json").write_text(json.dumps(rows, indent=1))
    (RESULTS / "validate.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
