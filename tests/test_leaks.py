"""Secrets never reach a log, an error line or a health answer, even at log level debug; and the leak guard works.

The guard (tests/faultkit.py) is applied to every test of the fault and fuzz suites; these tests check the guard
itself and run the agent at its most verbose through the paths that handle secrets.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from testbed import pki
from tests.faultkit import LeakGuard, Proxy, fixture_leaks  # noqa: F401 - the `leaks` fixture
from tests.support import AgentProc, KV2Layout, agent_config, error_line, live_files, run_cli, wait_until, write_config

# each test runs on a private OpenBao, so the fixed layout (kv2/istio/cacerts, auth mount kubernetes) is safe
LAYOUT = KV2Layout()


@pytest.fixture(name="ca", scope="module")
def fixture_ca() -> tuple[dict[str, bytes], dict[str, bytes]]:
    root = pki.root_ca()
    return pki.istio_ca_files(root, pki.intermediate_ca(root)), pki.istio_ca_files(root, pki.intermediate_ca(root))


class TestGuard:
    def test_it_finds_registered_secrets_and_secret_shapes(self, ca):
        """The guard flags a registered key line, a JWT, a Vault token and a PEM key block, and names none of them."""
        guard = LeakGuard()
        guard.key_files("ca", ca[0])
        line = ca[0]["ca-key.pem"].decode().splitlines()[1]
        for text, what in [
            (f'{{"event": "x", "reason": "bad {line}"}}', "leaks ca ca-key.pem"),
            ("token eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzeXN0ZW0.c2lnbmF0dXJlLXBhcnQ", "a JWT"),
            ("vault said s.AbCdEfGhIjKlMnOpQrStUvWx ok", "a Vault token"),
            ("-----BEGIN EC PRIVATE KEY-----", "a PEM private key"),
        ]:
            with pytest.raises(AssertionError) as info:
                guard.scan(text, "sample")
            assert what in str(info.value)
            assert line not in str(info.value)

    def test_it_passes_an_ordinary_agent_log(self):
        """A normal publish log (paths, serials, accessor-free) is clean."""
        guard = LeakGuard()
        guard.secret("jwt", "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJlLXBhcnQ")
        guard.scan(
            '{"bundle": "istiod-cacerts", "dir": "/var/run/secrets/istio-ca", "serial": "3aacd407afb1", '
            '"event": "bundle_published", "token_path": "/var/run/secrets/tokens/vault-token", "ttl": 3600.0}',
            "sample",
        )

    def test_the_fixture_checks_watched_files(self, tmp_path):
        """`leaks` scans a watched file at the end, so a leak written after registration is caught."""
        guard = LeakGuard()
        log = tmp_path / "agent.log"
        guard.watch("agent log", log)
        guard.secret("vault token", "s.AbCdEfGhIjKlMnOpQrStUvWx")
        guard.check()  # no file yet: nothing to find
        log.write_text('{"event": "oops", "t": "s.AbCdEfGhIjKlMnOpQrStUvWx"}\n')
        with pytest.raises(AssertionError, match="leaks vault token"):
            guard.check()


@pytest.fixture(name="world")
def fixture_world(tmp_path, bao_factory, kube, leaks, sa_token_file, ca) -> Iterator[dict[str, object]]:
    server = bao_factory(start=False)
    server.add_seeder(lambda c: LAYOUT.setup(c, kube, ca[0], token_ttl="1h"), run_now=False)
    server.start()
    proxy = Proxy(server.port)
    token = sa_token_file("istio-system", "istiod")
    leaks.secret("root token", server.root_token)
    leaks.secret("SA token", token.read_text())
    for i, files in enumerate(ca):
        leaks.key_files(f"bundle {i}", files)
    try:
        yield {"server": server, "proxy": proxy, "token": token, "out": tmp_path / "out"}
    finally:
        proxy.close()
        for t in proxy.tokens:
            leaks.secret("a Vault token the agent used", t)


class TestDebugLogs:
    def test_refused_bundles_at_debug_level(self, tmp_path, world, leaks, ca):
        """Init at log level debug with a key that does not match, then a JWT pasted as root-cert.pem:
        one error line each, and neither the key nor the JWT in anything printed."""
        server, token = world["server"], world["token"]
        cfg = write_config(tmp_path / "a.yaml", agent_config(address=world["proxy"].address, token_path=token,
                                                            out=world["out"], kv=LAYOUT.kv, mount=LAYOUT.auth_mount,
                                                            poll="100ms", timeout="1s", level="debug"))
        jwt = token.read_text()
        for files, expect in [({**ca[0], "ca-key.pem": ca[1]["ca-key.pem"]}, "ca-key.pem"),
                              ({**ca[0], "root-cert.pem": jwt.encode()}, "root-cert.pem")]:
            LAYOUT.write(server.client(), files)
            proc = run_cli("run", "--config", str(cfg), "--mode", "init")
            leaks.watch(f"init output ({expect})", proc.stdout + proc.stderr)
            assert proc.returncode == 1
            assert expect in error_line(proc)

    def test_sidecar_at_debug_level(self, tmp_path, world, leaks, ca, kube, sa_token_file):
        """A debug-level sidecar through a rotation, a revoked Vault token and a new SA token logs no secret,
        and its health answers carry none either."""
        server, proxy = world["server"], world["proxy"]
        cfg = write_config(tmp_path / "s.yaml", agent_config(address=proxy.address, token_path=world["token"],
                                                            out=world["out"], kv=LAYOUT.kv, mount=LAYOUT.auth_mount,
                                                            poll="200ms", timeout="1s", level="debug"))
        agent = AgentProc(cfg, tmp_path / "sidecar.log")
        leaks.watch("agent log sidecar.log", agent.log)
        agent.start()
        try:
            agent.wait_event("sidecar_ready")
            root = server.client()
            LAYOUT.write(root, ca[1])
            assert wait_until(lambda: live_files(world["out"]) == ca[1]), "timed out waiting for the rotated bundle"
            for t in set(proxy.tokens) - {server.root_token}:
                root.auth.token.revoke(t)
            new = sa_token_file("istio-system", "istiod")
            leaks.secret("rotated SA token", new.read_text())
            LAYOUT.write(root, ca[0])
            assert wait_until(lambda: live_files(world["out"]) == ca[0]), (
                "timed out waiting for the bundle after new tokens"
            )
            for path in ("/healthz", "/readyz", "/metrics"):
                body = agent.get(path, timeout=10)[1]
                leaks.watch(f"GET {path}", body)
            readyz = json.loads(agent.get("/readyz", timeout=10)[1])
            assert readyz["status"] == "ok"
        finally:
            assert agent.stop()[0] == 0
