"""One run path for both modes: failure semantics, the termination message, ambient credentials, supervision."""

from __future__ import annotations

import asyncio
import time
import tomllib
from pathlib import Path

import pytest

from agent.errors import SecretError
from agent.supervisor import TaskFailed, supervise
from testbed import pki
from testbed.vaultsetup import seed_runbook_layout
from tests.faultkit import Proxy
from tests.support import ROOT, AgentProc, agent_config, cli_env, error_line, live_files, run_cli, write_config


@pytest.fixture(name="ca", scope="module")
def fixture_ca() -> tuple[pki.CertKey, pki.CertKey]:
    root = pki.root_ca()
    return root, pki.intermediate_ca(root)


@pytest.fixture(name="runbook")
def fixture_runbook(vault_admin, kube, unique, ca):
    """The runbook's layout on the shared server, under a cluster name of this test's own."""
    return seed_runbook_layout(vault_admin, kube, pki.istio_ca_files(*ca), cluster=f"c{unique}")


def _config(tmp_path: Path, address: str, token: Path, runbook, **kw) -> Path:
    termination = kw.pop("termination", None)
    cfg = agent_config(address=address, token_path=token, out=tmp_path / "out",
                       kv=f"{runbook.kv_mount}/{runbook.secret_path}", mount=runbook.auth_mount, **kw)
    if termination is not None:
        cfg.setdefault("log", {})["termination_message_path"] = str(termination)
    return write_config(tmp_path / "agent.yaml", cfg)


class TestSidecarFirstPass:
    def test_wrong_role_ends_with_the_error_line_in_the_termination_message(
        self, tmp_path, bao, sa_token_file, runbook
    ):
        """A sidecar whose role is wrong keeps retrying while /readyz says why, then after init.timeout exits 1
        with one `error:` line, which it also writes to the termination message file for `kubectl describe`."""
        token = sa_token_file("istio-system", "istiod")
        termination = tmp_path / "termination-log"
        cfg = _config(tmp_path, bao.address, token, runbook, role="nope", init_timeout="4s", termination=termination)
        agent = AgentProc(cfg, mode="sidecar").start()
        try:
            status, body = agent.ready()
            assert status == 503
            assert body["bundles"]["istiod-cacerts"]["reason"].startswith("not published yet")
            assert agent.proc is not None
            rc = agent.proc.wait(timeout=20)
        finally:
            agent.kill()
        assert rc == 1
        lines = [ln for ln in agent.stderr.splitlines() if ln.startswith("error:")]
        assert len(lines) == 1 and "Traceback" not in agent.stderr, agent.tail()
        assert "'nope'" in lines[0] and "init.timeout (4s" in lines[0]
        assert termination.read_text() == lines[0] + "\n"
        assert len(agent.events("sync_failed")) >= 2  # retried, not given up at once

    def test_readyz_names_the_reason_while_retrying(self, tmp_path, bao, sa_token_file, runbook):
        """During the first pass /readyz answers 503 with the last error as its JSON reason."""
        token = sa_token_file("istio-system", "istiod")
        cfg = _config(tmp_path, bao.address, token, runbook, role="nope", init_timeout="30s")
        agent = AgentProc(cfg, mode="sidecar").start()
        try:
            agent.wait_event("sync_failed")
            status, body = agent.ready()
        finally:
            agent.stop()
        assert status == 503
        assert "'nope'" in body["bundles"]["istiod-cacerts"]["reason"]

    def test_init_mode_writes_the_termination_message_too(self, tmp_path, bao, sa_token_file, runbook):
        """Init mode exits at once on a final error, and the same line goes to the termination message file."""
        token = sa_token_file("istio-system", "istiod")
        termination = tmp_path / "termination-log"
        proc = run_cli("run", "--config", str(_config(tmp_path, bao.address, token, runbook, role="nope",
                                                      termination=termination)))
        assert proc.returncode == 1
        assert termination.read_text() == error_line(proc) + "\n"

    def test_unwritable_termination_message_path_is_ignored(self, tmp_path, bao, sa_token_file, runbook):
        """A termination message path that cannot be written changes nothing but the file: one error line."""
        token = sa_token_file("istio-system", "istiod")
        cfg = _config(tmp_path, bao.address, token, runbook, role="nope", termination=tmp_path / "no" / "dir" / "f")
        proc = run_cli("run", "--config", str(cfg))
        assert proc.returncode == 1 and "'nope'" in error_line(proc)


class TestAmbientCredentials:
    def test_the_agent_never_sends_a_token_it_did_not_obtain(self, tmp_path, bao, sa_token_file, runbook):
        """VAULT_TOKEN, BAO_TOKEN and ~/.vault-token of the machine never reach OpenBao, not even on the login."""
        home = tmp_path / "home"
        home.mkdir()
        ambient = bao.root_token
        (home / ".vault-token").write_text(ambient)
        (home / ".netrc").write_text("machine 127.0.0.1 login user password netrc-secret\n")
        proxy = Proxy(bao.port)
        try:
            token = sa_token_file("istio-system", "istiod")
            cfg = _config(tmp_path, proxy.address, token, runbook)
            env = cli_env(HOME=str(home), VAULT_TOKEN=ambient, BAO_TOKEN=ambient)
            proc = run_cli("run", "--config", str(cfg), env=env)
        finally:
            proxy.close()
        assert proc.returncode == 0, proc.stderr
        assert proxy.tokens, "the proxy saw no token at all: the check would prove nothing"
        assert ambient not in proxy.tokens
        assert ambient not in proc.stderr
        assert live_files(tmp_path / "out")["ca-key.pem"]


class TestCheckCommand:
    def test_mutual_gateway_bundle_published_by_the_agent(self, tmp_path, bao, vault_admin, kube, unique,
                                                          sa_token_file):
        """`check --type tls --no-ca-signs-cert` accepts a gateway MUTUAL bundle the agent published, whose ca.crt is
        the client CA; without the flag the same directory is refused, naming ca.crt."""
        from tests.support import KV2Layout

        server_ca, client_ca = pki.root_ca(cn="Server CA"), pki.root_ca(cn="Client CA")
        files = pki.tls_files(pki.leaf_cert(server_ca, days=30), client_ca)
        layout = KV2Layout.unique(unique).setup(vault_admin, kube, files)
        token = sa_token_file("istio-system", "istiod")
        cfg = agent_config(address=bao.address, token_path=token, out=tmp_path / "out", kv=layout.kv,
                           mount=layout.auth_mount, bundle_type="tls", ca_signs_cert=False)
        proc = run_cli("run", "--config", str(write_config(tmp_path / "a.yaml", cfg)))
        assert proc.returncode == 0, proc.stderr
        ok = run_cli("check", str(tmp_path / "out"), "--type", "tls", "--no-ca-signs-cert")
        assert ok.returncode == 0 and ok.stdout.startswith("ok:"), ok.stderr
        strict = run_cli("check", str(tmp_path / "out"), "--type", "tls")
        assert strict.returncode == 1 and "ca.crt" in error_line(strict)


class TestLiveness:
    def test_a_wedged_cycle_fails_healthz(self, tmp_path):
        """/healthz's `alive` turns false once a worker's cycle has run for 3 x max(poll_interval, 3 x
        vault.timeout), and true again when it returns."""
        from agent import config
        from agent.runner import Agent

        cfg = config.from_mapping({
            "vault": {"address": "http://127.0.0.1:9", "timeout": "1s"}, "auth": {"mount": "k", "role": "r"},
            "sidecar": {"poll_interval": "2s"},
            "bundles": [{"name": "a", "dir": str(tmp_path / "a"), "source": {"kv": "s/a"}}],
        }, env={})

        async def main() -> list[bool]:
            agent = Agent(cfg, once=False)
            state = agent.workers[0].state
            seen = [agent.alive()]
            state.busy_since = time.monotonic() - 8  # limit: 3 x max(2 s, 3 x 1 s) = 9 s
            seen.append(agent.alive())
            state.busy_since = time.monotonic() - 10
            seen.append(agent.alive())
            state.busy_since = None
            seen.append(agent.alive())
            return seen

        assert asyncio.run(main()) == [True, True, False, True]


class TestSupervisor:
    def test_a_crashed_task_is_named_and_stops_the_others(self):
        """A bug in one component stops every other one and is reported as one sentence naming it."""
        cancelled = []

        async def crash() -> None:
            await asyncio.sleep(0.01)
            raise KeyError("boom")

        async def forever() -> None:
            try:
                await asyncio.Event().wait()
            finally:
                cancelled.append(True)

        async def main() -> None:
            await supervise({"worker a": crash(), "health server": forever()}, stop=asyncio.Event(),
                            until_all_done=False)

        with pytest.raises(TaskFailed, match=r"^internal error in worker a \(KeyError\)"):
            asyncio.run(main())
        assert cancelled == [True]

    def test_a_loop_cancelled_as_its_event_fires_stops(self):
        """SIGTERM cancels every component; a component that waits on an event in a loop (the watcher, the keeper,
        the worker's sleep) must stop even when the event is set in the same instant. asyncio.wait_for on Python
        3.11 swallowed that cancellation and a sidecar ran on after SIGTERM (seen in tests/test_degrade.py)."""
        from agent.supervisor import wait_event

        async def main() -> str:
            event = asyncio.Event()

            async def component() -> None:
                while True:
                    await wait_event(event, 100)
                    event.clear()

            task = asyncio.create_task(component())
            await asyncio.sleep(0.01)
            event.set()
            task.cancel()
            try:
                async with asyncio.timeout(2):
                    await task
            except asyncio.CancelledError:
                return "stopped"
            except TimeoutError:
                return "still running"
            return "returned"

        assert asyncio.run(main()) == "stopped"

    def test_an_agent_error_passes_through_unchanged(self):
        """A component's AgentError is the message the user sees, not wrapped in a group or a TaskFailed."""

        async def fail() -> None:
            raise SecretError("nothing found while reading KV path a/b")

        async def main() -> None:
            await supervise({"worker a": fail()}, stop=asyncio.Event(), until_all_done=True)

        with pytest.raises(SecretError, match=r"^nothing found"):
            asyncio.run(main())

    def test_a_long_running_task_that_returns_is_a_failure(self):
        """In sidecar mode a component that returns on its own is a bug, named as such."""

        async def done() -> None:
            return

        async def main() -> None:
            await supervise({"file watcher": done()}, stop=asyncio.Event(), until_all_done=False)

        with pytest.raises(TaskFailed, match="file watcher stopped unexpectedly"):
            asyncio.run(main())

    def test_stop_ends_every_task(self):
        """Setting `stop` returns promptly and cancels what still runs."""

        async def main() -> float:
            stop = asyncio.Event()
            asyncio.get_running_loop().call_later(0.05, stop.set)
            start = time.monotonic()
            await supervise({"a": asyncio.Event().wait(), "b": asyncio.sleep(60)}, stop=stop, until_all_done=True)
            return time.monotonic() - start

        assert asyncio.run(main()) < 1


def test_every_runtime_dependency_is_used():
    """Each dependency in pyproject.toml is imported by the agent (an unused one only costs install size)."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    modules = {"pyyaml": "yaml", "prometheus-client": "prometheus_client"}
    source = "\n".join(p.read_text() for p in (ROOT / "agent").rglob("*.py"))
    # kept for operator commands that read a cluster (issue 18); the run path talks to the API through agent.kube
    reserved = {"kubernetes"}
    for dep in deps:
        name = dep.split(">")[0].split("=")[0].split("[")[0].strip().lower()
        if name in reserved:
            continue
        module = modules.get(name, name.replace("-", "_"))
        assert f"import {module}" in source or f"from {module}" in source, f"{name} is never imported"
