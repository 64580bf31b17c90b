"""Answers that are not what Vault sends (a proxy's page, truncated or reshaped JSON, huge or slow bodies, text
JSON allows and UTF-8 does not) never crash, wedge or roll back the agent: they are retried or refused cleanly.

OpenBao is real; a loopback HTTP proxy in front of it replaces chosen answers, as a broken balancer might.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from testbed import pki
from testbed.bao import BaoServer
from tests.faultkit import Answer, HTTPProxy, LeakGuard, fixture_leaks  # noqa: F401 - the `leaks` fixture
from tests.support import (
    ROOT,
    AgentProc,
    KV2Layout,
    agent_config,
    cli_env,
    live_files,
    slow_only,
    wait_until,
    write_config,
)

LAYOUT = KV2Layout()
DATA_PATH = f"/v1/{LAYOUT.kv_mount}/data/{LAYOUT.secret_path}"
LOGIN_PATH = f"/v1/auth/{LAYOUT.auth_mount}/login"
#: every way a JSON value can be the wrong shape
WRONG = (None, [], 7, "x", {}, True)


def _paths(value: Any, prefix: tuple[str, ...] = (), depth: int = 3) -> Iterator[tuple[str, ...]]:
    """Every key path of a JSON object, down to `depth` levels."""
    if isinstance(value, dict) and depth:
        for key, inner in value.items():
            yield (*prefix, key)
            yield from _paths(inner, (*prefix, key), depth - 1)


def _replace(doc: Any, path: tuple[str, ...], new: Any) -> Any:
    doc = json.loads(json.dumps(doc))
    target = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = new
    return doc


def _json(doc: Any) -> bytes:
    return json.dumps(doc).encode()


Reshape = Callable[[bytes], Answer]


def reshaped(sample: dict[str, Any]) -> list[tuple[str, Reshape]]:
    """Ways to reshape a real answer: not JSON, truncated, a wrong type at the top or at any key path of `sample`
    (an answer of the same shape), each applied to the answer OpenBao really sent."""
    out: list[tuple[str, Reshape]] = [
        ("an HTML page", lambda b: Answer(200, b"<html><body>502 upstream gone</body></html>", "text/html")),
        ("truncated JSON", lambda b: Answer(200, b[: len(b) // 2])),
        ("text with a JSON content type", lambda b: Answer(200, b"upstream connect error")),
        ("an empty 200", lambda b: Answer(200, b"", None)),
        ("a 204", lambda b: Answer(204, b"", None)),
        ("deep nesting", lambda b: Answer(200, b"[" * 100_000 + b"]" * 100_000)),
        ("a lone surrogate in a PEM value",
         lambda b: Answer(200, b.replace(b'"-----BEGIN', b'"\\ud800-----BEGIN', 1))),
    ]
    out += [(f"top level {json.dumps(w)}", lambda b, w=w: Answer(200, _json(w))) for w in WRONG]
    for path in _paths(sample):
        out += [
            (f"{'.'.join(path)} = {json.dumps(w)}",
             lambda b, p=path, w=w: Answer(200, _json(_replace(json.loads(b), p, w))))
            for w in WRONG
        ]
    return out


@dataclass
class World:
    """A private OpenBao behind the mutating proxy, a token file, an output dir, the leak guard."""

    server: BaoServer
    proxy: HTTPProxy
    token: Path
    tmp: Path
    leaks: LeakGuard
    bundles: list[dict[str, bytes]]

    @property
    def out(self) -> Path:
        return self.tmp / "out"

    def agent(self, mode: str, **kw: Any) -> AgentProc:
        cfg = agent_config(address=self.proxy.address, token_path=self.token, out=self.out, kv=LAYOUT.kv,
                           mount=LAYOUT.auth_mount, timeout="1s", **kw)
        proc = AgentProc(write_config(self.tmp / f"{mode}.yaml", cfg), self.tmp / f"{mode}.log", mode=mode)
        self.leaks.watch(f"{mode} log", proc.log)
        return proc


@pytest.fixture(name="world")
def fixture_world(tmp_path, bao_factory, kube, sa_token_file, leaks) -> Iterator[World]:
    server = bao_factory()
    root = pki.root_ca()
    bundles = [pki.istio_ca_files(root, pki.intermediate_ca(root, cn=f"Intermediate CA {i}")) for i in range(2)]
    LAYOUT.setup(server.client(), kube, bundles[0])
    proxy = HTTPProxy(server.port)
    for i, files in enumerate(bundles):
        leaks.key_files(f"bundle {i}", files)
    leaks.secret("root token", server.root_token)
    try:
        yield World(server, proxy, sa_token_file("istio-system", "istiod"), tmp_path, leaks, bundles)
    finally:
        proxy.close()


def _clean(log: str) -> None:
    assert "Traceback" not in log and "internal error" not in log, log[-3000:]


class TestSidecarKeepsGoing:
    def test_reshaped_kv_answers_are_retried_and_the_live_bundle_stays(self, world):
        """Reshaped KV reads (not JSON, truncated, deep nesting, lone surrogates, wrong types at the levels the
        agent reads) are each a clean failure or harmless: the sidecar never exits, /healthz stays 200, the
        published files are always a whole bundle that was written to KV, and the next good answer is published."""
        keep = {("data",), ("data", "data"), ("data", "metadata"), ("data", "metadata", "version"),
                ("data", "metadata", "created_time"), ("data", "data", "ca_key"), ("lease_id",), ("warnings",)}
        self._run(world, lambda name: "=" not in name or tuple(name.split(" = ")[0].split(".")) in keep)

    def test_every_reshaped_kv_answer(self, world, request):
        """The same, for a wrong type at every key path of the answer, three levels deep (long)."""
        slow_only(request)
        self._run(world, lambda name: True)

    @staticmethod
    def _run(world: World, wanted: Callable[[str], bool]) -> None:
        admin = world.server.client()
        sample = admin.secrets.kv.v2.read_secret_version(
            path=LAYOUT.secret_path, mount_point=LAYOUT.kv_mount, raise_on_deleted_version=True
        )
        cases = [(name, reshape) for name, reshape in reshaped(sample) if wanted(name)]
        agent = world.agent("sidecar", poll="100ms").start()
        try:
            agent.wait_event("sidecar_ready")
            for name, reshape in cases:
                world.proxy.mutate = lambda m, p, s, b, r=reshape: r(b) if p.startswith(DATA_PATH) else None
                failed = len(agent.events("sync_failed"))
                # a new version whose content differs from the live one: the agent must read it, and acts on it:
                # the reshaped answer is refused (sync_failed) or harmless (the new version published)
                other = next(b for b in world.bundles if b != live_files(world.out))
                LAYOUT.write(admin, other)
                assert wait_until(lambda: len(agent.events("sync_failed")) > failed or live_files(world.out) == other,
                                  timeout=10), f"{name}: no cycle"
                assert agent.proc is not None and agent.proc.poll() is None, f"{name}: {agent.tail()}"
                assert agent.get("/healthz")[0] == 200, name
                assert live_files(world.out) in world.bundles, f"{name} published something never written"
                # then a good answer again: it is published (and the backoff starts over, as after any success)
                world.proxy.mutate = None
                assert wait_until(lambda: live_files(world.out) == other, timeout=10), f"{name}: {agent.tail()}"
        finally:
            agent.stop()
        _clean(agent.stderr)
        reasons = " ".join(e.get("reason", "") for e in agent.events("sync_failed"))
        assert "not a Vault response" in reasons and "not valid text" in reasons

    def test_huge_and_slow_answers_are_bounded(self, world):
        """A 56 MB answer is never read past limits.max_secret_size, with or without Content-Length, and a body
        that trickles in is given up after twice vault.timeout; the sidecar stays alive and live."""
        big = b'{"data": {"data": {"ca_key": "' + b"A" * 56_000_000 + b'"}}}'
        slow = Answer(200, _json({"data": {"data": {}, "metadata": {"version": 1}}}), trickle=0.4, chunk=4)
        cases = [("Content-Length", Answer(200, big)), ("chunked", Answer(200, big, chunked=True)), ("slow", slow)]
        admin = world.server.client()
        agent = world.agent("sidecar", poll="100ms").start()
        try:
            agent.wait_event("sidecar_ready")
            good = live_files(world.out)
            for name, answer in cases:
                world.proxy.mutate = lambda m, p, s, b, a=answer: a if p.startswith(DATA_PATH) else None
                failed = len(agent.events("sync_failed"))
                LAYOUT.write(admin, world.bundles[1])
                agent.wait_event("sync_failed", count=failed + 1, timeout=15)
                reason = agent.events("sync_failed")[-1]["reason"]
                assert ("max_secret_size" in reason) if name != "slow" else ("too slowly" in reason), reason
                assert agent.get("/healthz")[0] == 200 and live_files(world.out) == good
                rss = _rss_mib(agent.proc.pid) if agent.proc else 0
                assert rss < 96, f"{name}: {rss} MiB"
                LAYOUT.write(admin, world.bundles[0])
        finally:
            agent.stop()
        _clean(agent.stderr)

    def test_an_over_size_secret_is_not_downloaded_at_every_poll(self, world):
        """Once a KV v2 version was refused as too large, the agent only reads its metadata until a new version
        comes, instead of downloading it again at each poll."""
        admin = world.server.client()
        agent = world.agent("sidecar", poll="100ms").start()
        try:
            agent.wait_event("sidecar_ready")
            world.proxy.mutate = lambda m, p, s, b: Answer(200, b"x" * 2_000_000) if p.startswith(DATA_PATH) else None
            LAYOUT.write(admin, world.bundles[1])
            agent.wait_event("sync_failed")
            reads = sum(1 for _, p in world.proxy.requests if p.startswith(DATA_PATH))
            time.sleep(1)  # ten polls
            again = sum(1 for _, p in world.proxy.requests if p.startswith(DATA_PATH))
            assert again == reads, f"{again - reads} more full reads of the refused secret"
            assert len(agent.events("sync_failed")) == 1  # said once
        finally:
            agent.stop()
        _clean(agent.stderr)


class TestInitGivesUpCleanly:
    def test_reshaped_login_answers(self, world):
        """A login answer of the wrong shape is retried until init.timeout, then one `error:` line says what came."""
        cases = [
            ("html", Answer(200, b"<html>login page</html>", "text/html"), "not a Vault response"),
            ("null", Answer(200, b"null"), "not a Vault response"),
            ("auth is a list", Answer(200, _json({"auth": []})), "not a Vault response"),
            ("no token", Answer(200, _json({"auth": {"client_token": ""}})), "returned no token"),
            ("truncated", Answer(200, b'{"auth": {"client_tok'), "not a Vault response"),
        ]
        for name, answer, needle in cases:
            world.proxy.mutate = lambda m, p, s, b, a=answer: a if p == LOGIN_PATH else None
            proc = subprocess.run(
                [sys.executable, "-m", "agent.cli", "run", "--config",
                 str(world.agent("init", init_timeout="2s").config), "--mode", "init"],
                cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=60, check=False,
            )
            world.leaks.watch(f"init {name}", proc.stderr)
            lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
            assert proc.returncode == 1 and len(lines) == 1, f"{name}: {proc.stderr[-2000:]}"
            assert needle in lines[0], f"{name}: {lines[0]}"
            _clean(proc.stderr)

    def test_peak_memory_with_a_56_mb_answer(self, world):
        """Init refuses a 56 MB KV answer while staying far below the chart's 128 MiB limit (peak RSS < 96 MiB)."""
        big = b'{"data": {"data": {"ca_key": "' + b"A" * 56_000_000 + b'"}, "metadata": {"version": 1}}}'
        world.proxy.mutate = lambda m, p, s, b: Answer(200, big, chunked=True) if p.startswith(DATA_PATH) else None
        cfg = world.agent("init").config
        argv = [sys.executable, "-m", "agent.cli", "run", "--config", str(cfg), "--mode", "init"]
        code, peak, stderr = _peak_rss(argv)
        assert code == 1, stderr
        assert "max_secret_size" in stderr
        assert peak < 96, f"peak RSS {peak:.0f} MiB"


# Linux keeps a process's peak RSS across exec, and a child forked from this (large) test process starts at its
# size: so the agent is forked from a small Python process of its own, which reports the child's peak.
_MEASURE = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print(os.waitstatus_to_exitcode(status), usage.ru_maxrss)
"""


def _peak_rss(argv: list[str]) -> tuple[int, float, str]:
    """Run `argv`; returns its exit code, its peak RSS in MiB and its stderr."""
    proc = subprocess.run([sys.executable, "-c", _MEASURE, *argv], cwd=ROOT, env=cli_env(), capture_output=True,
                          text=True, timeout=120, check=False)
    code, kib = proc.stdout.split()[-2:]
    return int(code), int(kib) / 1024, proc.stderr


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):  # the peak resident set so far
            return int(line.split()[1]) / 1024
    return 0.0
