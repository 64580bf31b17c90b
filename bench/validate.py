"""`python -m bench.validate`: how long one validation takes, worst case over the hostile inputs, the differential
corpus and a typical RSA 4096 bundle (targets: <= 50 ms for any input, <= 5 ms for the typical bundle).

Each input is validated `--runs` times in this process after one warm-up (imports and cryptography's first use
are not what is measured); the table shows the median and the slowest run, and validate.json keeps every number.
"""

from __future__ import annotations

import argparse
import gc
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


def _mutants(seed: int, count: int) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Fuzz-style inputs: a good bundle with one to three files truncated, bit-flipped, spliced, doubled or
    swapped (the operations of tests/test_fuzz.py, from a fixed seed)."""
    import random

    from testbed import corpus as corpus_mod

    rng = random.Random(seed)  # noqa: S311 - reproducible test inputs, not secrets
    base = corpus_mod.build({"ok-ec-p256"})[0].files
    for n in range(count):
        files = dict(base)
        for _ in range(rng.randint(1, 3)):
            name = rng.choice(sorted(files))
            blob = files[name]
            at = rng.randint(0, len(blob))
            op = rng.choice(["truncate", "flip", "splice", "dup", "swap"])
            if op == "truncate":
                files[name] = blob[:at]
            elif op == "flip" and blob:
                i = min(at, len(blob) - 1)
                files[name] = blob[:i] + bytes([blob[i] ^ (1 << rng.randint(0, 7))]) + blob[i + 1:]
            elif op == "splice":
                files[name] = blob[:at] + rng.randbytes(rng.randint(0, 40)) + blob[at + rng.randint(0, 40):]
            elif op == "dup":
                files[name] = blob + blob
            else:
                other = rng.choice(sorted(files))
                files[name], files[other] = files[other], blob
        yield f"mutant-{n}", files


def inputs(*, corpus: bool, mutants: int = 500) -> Iterator[tuple[str, str, str, Mapping[str, bytes]]]:
    """(group, name, kind, files) for every measured input."""
    from testbed import corpus as corpus_mod

    yield "typical", "rsa-4096-makefile-bundle", "istio-ca", _typical_rsa4096()
    for name, kind, files in corpus_mod.hostile():
        yield "hostile", name, kind, files
    if corpus:
        for c in corpus_mod.build():
            yield "corpus", c.name, c.kind, c.files
        for name, files in _mutants(9, mutants):
            yield "fuzz", name, "istio-ca", files


def measure(kind: str, files: Mapping[str, bytes], runs: int) -> tuple[list[float], str]:
    """Seconds per run (after one warm-up run), and the verdict ("ok", "warn", or the refusal's check)."""
    times = []
    verdict = ""
    for _ in range(runs + 1):
        # Collect the bench's own garbage first (it holds the whole corpus), so a full collection of the bench's
        # heap is not charged to one validation; the validation's own allocations still count.
        gc.collect()
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
    p.add_argument("--mutants", type=int, default=500, help="fuzz mutants of a good bundle (default 500)")
    p.add_argument("--out", type=Path, default=RESULTS, help="where validate.json and validate.md go")
    args = p.parse_args(argv)

    rows = []
    for group, name, kind, files in inputs(corpus=not args.no_corpus, mutants=args.mutants):
        times, verdict = measure(kind, files, 1 if group == "fuzz" else args.runs)
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
        if r["group"] in ("corpus", "fuzz"):
            continue
        lines.append(f"| {r['group']} | {r['name']} | {r['bytes']} | {r['verdict']} | {r['median_ms']:.2f} ms | "
                     f"{r['max_ms']:.2f} ms |")
    for group, what in (("corpus", "differential cases"), ("fuzz", "fuzz mutants of a good bundle")):
        group_rows = [r for r in rows if r["group"] == group]
        if group_rows:
            worst = max(group_rows, key=lambda r: r["max_ms"])
            lines.append(f"| {group} | {len(group_rows)} {what}, slowest: {worst['name']} | "
                         f"{worst['bytes']} | {worst['verdict']} | {worst['median_ms']:.2f} ms | "
                         f"{worst['max_ms']:.2f} ms |")
    hostile = [r for r in rows if r["group"] != "typical"]
    typical = next(r for r in rows if r["group"] == "typical")
    lines += [
        "",
        f"Slowest single run over hostile, corpus and fuzz inputs: {max(r['max_ms'] for r in hostile):.2f} ms "
        "(target <= 50 ms); typical RSA 4096 bundle median "
        f"{typical['median_ms']:.2f} ms (target <= 5 ms).",
    ]
    text = "\n".join(lines)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "validate.json").write_text(json.dumps(rows, indent=1))
    (args.out / "validate.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
