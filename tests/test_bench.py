"""Smoke tests of the benchmark harness (bench/): a tiny real run against OpenBao, plus its measuring parts.

The full comparison (`python -m bench`) takes minutes; `python -m bench --quick` runs behind the slow marker.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from bench.report import percentile
from bench.watch import Watcher
from testbed.bao import BaoNotFound, find_bao
from tests.support import ROOT, cli_env

TINY = [
    "--init-runs", "2",
    "--idle-seconds", "2",
    "--settle", "0.5",
    "--rotations", "2",
    "--slow-rotations", "1",
    "--min-window", "1",
    "--variants", "ours-1s,bao-kv2-1s",
]  # fmt: skip


def _need_bao() -> None:
    try:
        find_bao()
    except BaoNotFound as exc:
        pytest.skip(str(exc))


@pytest.fixture(name="tiny_run", scope="module")
def fixture_tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """One tiny benchmark run (2 init runs each, 2 s idle, 2 rotations of two 1 s variants); its output dir."""
    _need_bao()
    from bench.run import main

    out = tmp_path_factory.mktemp("bench")
    assert main([*TINY, "--out", str(out)]) == 0
    return out, json.loads((out / "results.json").read_text())


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


class TestTinyRun:
    def test_init_has_samples_and_numeric_ratios(self, tiny_run: tuple[Path, dict[str, Any]]) -> None:
        """Both tools ran init twice and the ours/bao ratios are positive numbers."""
        _, result = tiny_run
        init = result["init"]
        for tool in ("ours", "bao"):
            assert init[tool]["wall"]["n"] == 2
            assert all(_number(s) and s > 0 for s in init[tool]["wall"]["samples"])
            assert init[tool]["vault_requests"] >= 2  # at least a login and a read, counted by the proxy
        assert _number(init["ratio_p50"]) and init["ratio_p50"] > 0
        assert _number(init["ratio_p90"]) and init["ratio_p90"] > 0

    def test_idle_window_measures_both_tools(self, tiny_run: tuple[Path, dict[str, Any]]) -> None:
        """Each sidecar variant has RSS, CPU and request rates, and ours rewrote nothing while idle."""
        _, result = tiny_run
        variants = result["idle"]["variants"]
        assert set(variants) == {"ours-1s", "bao-kv2-1s"}
        for v in variants.values():
            assert v["rss_bytes"] > 1024 * 1024
            assert _number(v["cpu_seconds_per_hour"]) and v["cpu_seconds_per_hour"] >= 0
            assert _number(v["vault_requests_per_min"])
        assert _number(variants["ours-1s"]["metrics_requests_per_min"])
        assert variants["ours-1s"]["redundant_writes"] == 0

    def test_every_rotation_reaches_disk(self, tiny_run: tuple[Path, dict[str, Any]]) -> None:
        """With 1 s refresh, both tools put each new bundle on disk within a few seconds."""
        _, result = tiny_run
        for name in ("ours-1s", "bao-kv2-1s"):
            v = result["propagation"]["variants"][name]
            assert v["attempted"] == 2 and len(v["latencies"]) == 2, v
            assert 0 <= v["latency"]["max"] < 5

    def test_writes_markdown_and_plot(self, tiny_run: tuple[Path, dict[str, Any]]) -> None:
        """The markdown report has the init and propagation tables; the plot is a PNG when matplotlib exists."""
        out, _ = tiny_run
        text = (out / "results.md").read_text()
        assert "| median |" in text and "## Propagation" in text and "## Targets" in text
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            pytest.skip("matplotlib is not installed: no plot to check")
        assert (out / "latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class TestMeasuringParts:
    def test_percentile_interpolates(self) -> None:
        """Percentiles interpolate between order statistics like numpy's default."""
        values = [float(v) for v in range(1, 21)]
        assert percentile(values, 50) == pytest.approx(10.5)
        assert percentile(values, 90) == pytest.approx(18.1)
        assert math.isnan(percentile([], 50))

    def test_watcher_tells_redundant_from_changing_writes(self, tmp_path: Path) -> None:
        """Rewriting identical bytes counts as redundant; new bytes count as a change and are waited for."""
        target = tmp_path / "ca-cert.pem"
        target.write_bytes(b"one")
        watcher = Watcher(interval=0.005)
        watcher.add("d", tmp_path, ("ca-cert.pem",))
        watcher.start()
        try:
            assert watcher.wait_for("d", {"ca-cert.pem": b"one"}, timeout=2) is not None
            tmp = tmp_path / ".tmp"
            tmp.write_bytes(b"one")
            os.replace(tmp, target)  # same bytes, new inode: what a needless re-render does
            deadline = time.monotonic() + 2
            while watcher.counts("d")[0] == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            tmp.write_bytes(b"two")
            os.replace(tmp, target)
            assert watcher.wait_for("d", {"ca-cert.pem": b"two"}, timeout=2) is not None
            assert watcher.counts("d") == (1, 1)
        finally:
            watcher.stop()


@pytest.mark.slow
def test_quick_benchmark_command(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """The documented `python -m bench --quick` finishes and reports every target (about two minutes)."""
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("takes about two minutes; run with -m slow")
    _need_bao()
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        env=cli_env(),
        cwd=ROOT,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "results.json").read_text())
    assert len(result["targets"]) == 4
    assert all(t["met"] in (True, False) for t in result["targets"])
