"""The agent's Vault I/O is bounded and stays on Vault's origin (issue 18): redirects never carry the token or the
JWT elsewhere, slow answers end within vault.timeout without stopping other bundles or the token renewal, SIGTERM
and init.timeout end a hung request, token files and TLS failures are named, and a rotated Vault CA is picked up.

A real OpenBao; loopback proxies (tests/faultkit.py) alter its answers, stall them, or terminate TLS.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from testbed import pki
from testbed.bao import BaoServer
from tests.faultkit import Answer, HTTPProxy, LeakGuard, Recorder, TLSProxy, drip, fixture_leaks, redirect  # noqa: F401
from tests.support import (
    ROOT,
    AgentProc,
    KV2Layout,
    agent_config,
    cli_env,
    live_files,
    run_cli,
    wait_until,
    write_config,
)


@dataclass
class Lab:
    """A KV v2 layout of its own on the shared OpenBao, a mutating proxy in front, a token file, a temp dir."""

    server: BaoServer
    layout: KV2Layout
    proxy: HTTPProxy
    token: Path
    tmp: Path
    leaks: LeakGuard
    bundles: list[dict[str, bytes]]

    @property
    def data_path(self) -> str:
        return f"/v1/{self.layout.kv_mount}/data/{self.layout.secret_path}"

    @property
    def login_path(self) -> str:
        return f"/v1/auth/{self.layout.auth_mount}/login"

    def config(self, name: str, *, address: str | None = None, **kw: Any) -> Path:
        kw.setdefault("init_timeout", "3s")
        kw.setdefault("timeout", "1s")
        cfg = agent_config(address=address or self.proxy.address, token_path=self.token, out=self.tmp / "out",
                           kv=self.layout.kv, mount=self.layout.auth_mount, **kw)
        return write_config(self.tmp / f"{name}.yaml", cfg)

    def agent(self, name: str, mode: str = "sidecar", **kw: Any) -> AgentProc:
        proc = AgentProc(self.config(name, **kw), self.tmp / f"{name}.log", mode=mode)
        self.leaks.watch(f"{name} log", proc.log)
        return proc

    def init(self, name: str, *, env: dict[str, str] | None = None,
             **kw: Any) -> tuple[subprocess.CompletedProcess[str], float]:
        start = time.monotonic()
        proc = run_cli("run", "--config", str(self.config(name, **kw)), "--mode", "init", env=env, timeout=90)
        self.leaks.watch(f"{name} stderr", proc.stderr)
        return proc, time.monotonic() - start


@pytest.fixture(name="lab")
def fixture_lab(tmp_path, bao, kube, sa_token_file, unique, leaks) -> Iterator[Lab]:
    root = pki.root_ca()
    bundles = [pki.istio_ca_files(root, pki.intermediate_ca(root, cn=f"Intermediate CA {i}")) for i in range(3)]
    layout = KV2Layout.unique(unique).setup(bao.client(), kube, bundles[0])
    proxy = HTTPProxy(bao.port)
    for i, files in enumerate(bundles):
        leaks.key_files(f"bundle {i}", files)
    leaks.secret("root token", bao.root_token)
    token = sa_token_file("istio-system", "istiod")
    leaks.secret("service account token", token.read_text())
    try:
        yield Lab(bao, layout, proxy, token, tmp_path, leaks, bundles)
    finally:
        proxy.close()


def _one_error(proc: subprocess.CompletedProcess[str]) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr, proc.stderr[-3000:]
    return lines[0]


class TestRedirects:
    @pytest.mark.parametrize("status", [301, 302, 307, 308])
    def test_a_redirected_read_sends_no_token_elsewhere(self, lab, status):
        """A redirect of the KV read (after a good login) to another address is not followed: nothing, least of
        all X-Vault-Token, reaches the target, and init ends with one line naming where Vault redirected."""
        elsewhere = Recorder()
        try:
            lab.proxy.mutate = lambda m, p, s, b: (
                redirect(status, elsewhere.address + p) if p == lab.data_path else None)
            proc, _ = lab.init(f"r{status}", init_timeout="1s")
        finally:
            elsewhere.close()
        assert not [r for r in elsewhere.requests if "x-vault-token" in {k.lower() for k in r[2]}], elsewhere.requests
        line = _one_error(proc)
        assert "redirected" in line and elsewhere.address in line and "active node" in line, line

    @pytest.mark.parametrize("status", [307, 308])
    def test_a_redirected_login_does_not_resend_the_jwt(self, lab, status):
        """A 307/308 on the login is not followed: the service-account JWT goes to Vault's address only."""
        elsewhere = Recorder()
        try:
            lab.proxy.mutate = lambda m, p, s, b: (
                redirect(status, elsewhere.address + p) if p == lab.login_path else None)
            proc, _ = lab.init(f"l{status}", init_timeout="1s")
        finally:
            elsewhere.close()
        jwt = lab.token.read_text().strip().encode()
        assert not [r for r in elsewhere.requests if jwt in r[3]], "the JWT was sent to the redirect target"
        assert "redirected" in _one_error(proc)

    def test_same_origin_redirects_are_followed(self, lab):
        """A redirect to another path on Vault's own address is followed (at most 3 hops): init succeeds."""
        moved = f"/v1/{lab.layout.kv_mount}/data/{lab.layout.secret_path}?moved=1"
        lab.proxy.mutate = lambda m, p, s, b: redirect(307, lab.proxy.address + moved) if p == lab.data_path else None
        proc, _ = lab.init("same")
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert live_files(lab.tmp / "out") == lab.bundles[0]


class TestSlowAnswers:
    @pytest.mark.parametrize("how", ["headers", "drip", "chunked"])
    def test_a_slow_answer_ends_within_vault_timeout(self, how):
        """Headers that never come, a body dripped at 1 byte/s and a chunked trickle each end within
        vault.timeout (+ a small margin) with one clear error, counted from the request's start."""
        import asyncio

        from agent.config import Duration, VaultConfig
        from agent.errors import VaultUnavailable
        from agent.vault import Vault

        body = json.dumps({"data": {"x": "y" * 50}}).encode()
        answer = {
            "headers": Answer(200, body, stall=30),
            "drip": drip(body, 1.0),
            "chunked": Answer(200, body, chunked=True, chunk=1, trickle=0.3),
        }[how]
        upstream = Recorder()
        proxy = HTTPProxy(upstream.port)
        proxy.mutate = lambda m, p, s, b: answer

        async def read() -> tuple[float, str]:
            vault = Vault(VaultConfig(address=proxy.address, timeout=Duration(1.5)), env={})
            start = time.monotonic()
            try:
                await vault.request("GET", "secret/x", action="reading x")
            except VaultUnavailable as exc:
                return time.monotonic() - start, str(exc)
            finally:
                await vault.close()
            return time.monotonic() - start, ""

        try:
            elapsed, message = asyncio.run(read())
        finally:
            proxy.close()
            upstream.close()
        assert 1.4 <= elapsed < 2.2, elapsed
        assert "vault.timeout" in message and ("too slowly" in message or "did not answer in time" in message)

    def test_one_slow_bundle_stops_neither_the_other_nor_the_token_renewal(self, lab, bao, kube):
        """With one bundle's path trickling (each read takes its whole vault.timeout), the other bundle's new
        version is published within a second or two, and the token is still renewed on time."""
        other = KV2Layout(kv_mount=lab.layout.kv_mount, secret_path="istio/other", auth_mount=lab.layout.auth_mount,
                          policy=lab.layout.policy + "-b")
        admin = bao.client()
        admin.sys.create_or_update_policy(name=other.policy, policy=(
            f'path "{lab.layout.kv_mount}/*" {{ capabilities = ["read"] }}\n'))
        lab.layout.setup(admin, kube, None, token_ttl="3s", token_max_ttl="1h")
        admin.write(f"auth/{lab.layout.auth_mount}/role/{lab.layout.role}", bound_service_account_names="istiod",
                    bound_service_account_namespaces="istio-system", policies=f"{lab.layout.policy},{other.policy}",
                    token_ttl="3s", token_max_ttl="1h")
        other.write(admin, lab.bundles[0])
        cfg = agent_config(address=lab.proxy.address, token_path=lab.token, out=lab.tmp / "a", kv=lab.layout.kv,
                           mount=lab.layout.auth_mount, timeout="4s", poll="200ms", init_timeout="10s")
        cfg["bundles"].append({"name": "other", "type": "istio-ca", "source": {"kv": other.kv},
                               "dir": str(lab.tmp / "b")})
        agent = AgentProc(write_config(lab.tmp / "two.yaml", cfg), lab.tmp / "two.log")
        lab.leaks.watch("two log", agent.log)
        agent.start()
        try:
            agent.wait_event("sidecar_ready", timeout=20)
            slow = Answer(200, b'{"data": {"data": {}, "metadata": {"version": 99}}}', chunked=True, chunk=1,
                          trickle=0.2)
            lab.proxy.mutate = lambda m, p, s, b: slow if p.startswith(lab.data_path) else None
            lab.layout.write(admin, lab.bundles[1])  # the slow bundle now reads (and trickles) at every poll
            time.sleep(1)
            renewed, logins = len(agent.events("token_renewed")), len(agent.events("vault_login"))
            other.write(admin, lab.bundles[2])
            start = time.monotonic()
            assert wait_until(lambda: live_files(lab.tmp / "b") == lab.bundles[2], timeout=10), agent.tail()
            took = time.monotonic() - start
            # three renewal periods (2/3 of the 3 s TTL): a renewal held up behind a 4 s trickled read would let the
            # token expire and cost a login
            time.sleep(max(0.0, 6.5 - took))
            assert took < 2.0, f"the other bundle waited {took:.1f}s behind the slow one"
            assert len(agent.events("token_renewed")) >= renewed + 2, agent.tail()
            assert len(agent.events("vault_login")) == logins, "the token expired while a renewal waited"
            assert live_files(lab.tmp / "a") == lab.bundles[0]
            assert agent.proc is not None and agent.proc.poll() is None
        finally:
            lab.proxy.mutate = None
            agent.stop()


class TestEndingAHang:
    def test_sigterm_during_a_hung_request_exits_0_within_a_second(self, lab, bao):
        """SIGTERM while a Vault read hangs (headers never come) ends the sidecar with 0 within a second."""
        agent = lab.agent("term", timeout="60s", poll="200ms").start()
        try:
            agent.wait_event("sidecar_ready", timeout=20)
            lab.proxy.mutate = lambda m, p, s, b: Answer(200, b"{}", stall=60) if p.startswith(lab.data_path) else None
            seen = len(lab.proxy.requests)
            lab.layout.write(bao.client(), lab.bundles[1])
            assert wait_until(lambda: any(p.startswith(lab.data_path) for _, p in lab.proxy.requests[seen:]))
            time.sleep(0.3)
            code, took = agent.stop()
        finally:
            lab.proxy.mutate = None
            agent.kill()
        assert code == 0 and took < 1.0, (code, took, agent.tail())
        assert "Traceback" not in agent.stderr

    def test_init_timeout_bounds_a_hung_login(self, lab):
        """A login whose answer never comes (vault.timeout 30s) ends init at init.timeout (2s), in one line."""
        lab.proxy.mutate = lambda m, p, s, b: Answer(200, b"{}", stall=60) if p == lab.login_path else None
        proc, took = lab.init("hang", timeout="30s", init_timeout="2s")
        line = _one_error(proc)
        assert "init.timeout (2s" in line, line
        assert took < 6, took


def _netns_works() -> bool:
    """Whether this test may make a user, network and mount namespace of its own (to give it a DNS of its own)."""
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--net", "--mount", "true"],
                           capture_output=True, check=False, timeout=10)
    return probe.returncode == 0


#: run inside `unshare --user --map-root-user --net --mount`: a nameserver on 127.0.0.1 that never answers, made
#: this namespace's /etc/resolv.conf (a bind mount, seen by nothing outside), then the agent's init
_HUNG_DNS = """
ip link set lo up 2>/dev/null
mount --bind "$1" /etc/resolv.conf || exit 97
"$2" -c 'import socket, time; s = socket.socket(type=socket.SOCK_DGRAM); s.bind(("127.0.0.1", 53)); time.sleep(120)' &
dns=$!
sleep 0.3
"$2" -m agent.cli run --config "$3" --mode init
code=$?
kill "$dns"
exit "$code"
"""


class TestHungDNS:
    @pytest.mark.skipif(not _netns_works(), reason="needs user, network and mount namespaces")
    def test_init_timeout_bounds_a_dns_lookup_that_hangs(self, tmp_path):
        """vault.address is a name and the DNS server never answers (the resolver waits 20 s): init still ends at
        init.timeout, in one line; a lookup the agent gave up on does not hold up the exit."""
        resolv = tmp_path / "resolv.conf"
        resolv.write_text("nameserver 127.0.0.1\noptions timeout:20 attempts:1\n")
        token = tmp_path / "token"
        token.write_text("eyJhbGciOiJSUzI1NiJ9.e30.c2ln\n")
        cfg = agent_config(address="http://vault.example.test:8200", token_path=token, out=tmp_path / "out",
                           kv="secret/x", mount="kubernetes", timeout="5s", init_timeout="2s")
        config = write_config(tmp_path / "agent.yaml", cfg)
        start = time.monotonic()
        proc = subprocess.run(
            ["unshare", "--user", "--map-root-user", "--net", "--mount", "sh", "-c", _HUNG_DNS, "sh", str(resolv),
             sys.executable, str(config)],
            capture_output=True, text=True, env=cli_env(), cwd=ROOT, timeout=60, check=False,
        )
        took = time.monotonic() - start
        assert proc.returncode != 97, proc.stderr
        line = _one_error(proc)
        assert "init.timeout (2s" in line, line
        assert took < 6, (took, line)


class TestTokenFile:
    def test_a_fifo_is_refused_within_init_timeout(self, lab):
        """A FIFO where the service-account token should be is one error line naming the file, at once."""
        fifo = lab.tmp / "fifo-token"
        os.mkfifo(fifo)
        lab.token = fifo
        proc, took = lab.init("fifo", init_timeout="3s")
        line = _one_error(proc)
        assert str(fifo) in line and "not a regular file" in line, line
        assert took < 5, took

    def test_a_link_to_dev_zero_is_refused_without_reading_it(self, lab):
        """A token file linked to /dev/zero is refused in one line (never read: no MemoryError)."""
        link = lab.tmp / "zero-token"
        link.symlink_to("/dev/zero")
        lab.token = link
        proc, took = lab.init("zero")
        line = _one_error(proc)
        assert str(link) in line and "MemoryError" not in proc.stderr, line
        assert took < 5, took

    @pytest.mark.parametrize("damage", ["empty", "mode 000"])
    def test_a_bad_token_file_and_a_revoked_token_do_not_end_the_sidecar(self, lab, bao, sa_token_file, damage):
        """In a running sidecar, a revoked Vault token while the token file is empty (or unreadable) for 4 s is
        retried: the sidecar keeps running and, once kubelet writes a token again, logs in and publishes the next
        version."""
        if damage == "mode 000" and os.geteuid() == 0:
            pytest.skip("root reads a file of mode 000")
        agent = lab.agent("empty", poll="200ms").start()
        try:
            agent.wait_event("sidecar_ready", timeout=20)
            admin = bao.client()
            if damage == "empty":
                lab.token.write_text("")
            else:
                lab.token.chmod(0)
            admin.write(f"sys/leases/revoke-prefix/auth/{lab.layout.auth_mount}/login")
            lab.layout.write(admin, lab.bundles[1])
            time.sleep(4)
            assert agent.proc is not None and agent.proc.poll() is None, agent.tail()
            sa_token_file("istio-system", "istiod")
            assert wait_until(lambda: live_files(lab.tmp / "out") == lab.bundles[1], timeout=20), agent.tail()
            assert agent.proc.poll() is None and agent.get("/healthz")[0] == 200
        finally:
            agent.stop()
        failures = " ".join(e.get("reason", "") for e in agent.events("sync_failed"))
        assert ("is empty" if damage == "empty" else "cannot be opened") in failures, failures

    def test_a_tiny_lease_makes_a_bounded_number_of_renewals(self, lab):
        """A login (and renewal) answer with a 10 ms lease: at most one renewal a second, one warning."""

        def tiny(m: str, p: str, s: int, b: bytes) -> Answer | None:
            if p == lab.login_path or p.endswith("/auth/token/renew-self"):
                doc = json.loads(b)
                if isinstance(doc.get("auth"), dict):
                    doc["auth"]["lease_duration"] = 0.01
                    return Answer(s, json.dumps(doc).encode())
            return None

        lab.proxy.mutate = tiny
        agent = lab.agent("tiny", poll="1s").start()
        try:
            agent.wait_event("sidecar_ready", timeout=20)
            seen = len(lab.proxy.requests)
            time.sleep(5)
            window = lab.proxy.requests[seen:]
            assert agent.proc is not None and agent.proc.poll() is None, agent.tail()
        finally:
            agent.stop()
        renewals = sum(1 for _, p in window if p.endswith("renew-self"))
        logins = sum(1 for _, p in window if p == lab.login_path)
        assert renewals <= 7 and logins <= 8, (renewals, logins)
        assert len(agent.events("token_lease_tiny")) == 1


class TestNamedCauses:
    def test_a_missing_ca_cert_is_a_final_config_error_at_once(self, lab):
        """A vault.ca_cert that does not exist is one config error at once, not 120 s of retries."""
        proxy = TLSProxy(lab.server.port, *_server_cert(pki.root_ca()), lab.tmp)
        try:
            cfg = lab.config("noca", address=proxy.address, init_timeout="60s")
            proc, took = lab.init("noca", address=proxy.address, init_timeout="60s",
                                  env=cli_env(VAULT_CACERT=str(lab.tmp / "missing-ca.pem")))
        finally:
            proxy.close()
        assert cfg.exists()
        line = _one_error(proc)
        assert "vault.ca_cert (from VAULT_CACERT)" in line and "does not exist" in line, line
        assert took < 10, took

    def test_an_expired_server_certificate_says_so_with_its_dates(self, lab):
        """An expired Vault certificate is named as expired, with its validity dates."""
        ca = pki.root_ca(cn="Vault CA")
        start = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)
        proxy = TLSProxy(lab.server.port, *_server_cert(ca, not_before=start, not_after=start + dt.timedelta(days=30)),
                         lab.tmp)
        (lab.tmp / "ca.pem").write_bytes(ca.cert_pem)
        try:
            proc, _ = lab.init("expired", address=proxy.address, init_timeout="30s",
                               env=cli_env(VAULT_CACERT=str(lab.tmp / "ca.pem")))
        finally:
            proxy.close()
        line = _one_error(proc)
        assert "expired" in line and "2020-01-01" in line and "2020-01-31" in line, line

    def test_a_host_name_mismatch_names_the_names(self, lab):
        """A certificate for another name: the line names the expected name and the names in the certificate."""
        ca = pki.root_ca(cn="Vault CA")
        proxy = TLSProxy(lab.server.port, *_server_cert(ca, dns=("vault.other.example",), ips=()), lab.tmp)
        (lab.tmp / "ca.pem").write_bytes(ca.cert_pem)
        try:
            proc, _ = lab.init("mismatch", address=proxy.address, init_timeout="30s",
                               env=cli_env(VAULT_CACERT=str(lab.tmp / "ca.pem")))
        finally:
            proxy.close()
        line = _one_error(proc)
        assert "127.0.0.1" in line and "vault.other.example" in line, line

    def test_https_to_a_plain_http_server_says_it_does_not_speak_tls(self, lab):
        """An https:// address answered by a plain-HTTP listener: the line says the server does not speak TLS."""
        proc, _ = lab.init("plain", address=f"https://127.0.0.1:{lab.proxy.port}", init_timeout="1s")
        line = _one_error(proc)
        assert "does not speak TLS" in line and "vault.address" in line, line

    def test_vault_addr_from_the_environment_is_named(self, lab):
        """An address taken from VAULT_ADDR (over vault.address in the file) is named as such in the error."""
        proc, _ = lab.init("env", init_timeout="1s", env=cli_env(VAULT_ADDR="http://127.0.0.1:9"))
        line = _one_error(proc)
        assert "VAULT_ADDR" in line and "127.0.0.1:9" in line, line

    def test_a_replaced_vault_ca_is_used_without_a_restart(self, lab, bao):
        """Vault's server certificate moves to a new CA and vault.ca_cert is replaced on disk: the running sidecar
        trusts the new CA at its next request, and publishes the next version without a restart."""
        first, second = pki.root_ca(cn="Vault CA 1"), pki.root_ca(cn="Vault CA 2")
        proxy = TLSProxy(lab.server.port, *_server_cert(first), lab.tmp)
        ca_file = lab.tmp / "vault-ca.pem"
        ca_file.write_bytes(first.cert_pem)
        cfg = agent_config(address=proxy.address, token_path=lab.token, out=lab.tmp / "out", kv=lab.layout.kv,
                           mount=lab.layout.auth_mount, poll="200ms", timeout="2s", init_timeout="10s")
        cfg["vault"]["ca_cert"] = str(ca_file)
        agent = AgentProc(write_config(lab.tmp / "rotate.yaml", cfg), lab.tmp / "rotate.log")
        lab.leaks.watch("rotate log", agent.log)
        agent.start()
        try:
            agent.wait_event("sidecar_ready", timeout=20)
            proxy.use(*_server_cert(second))
            tmp = ca_file.with_suffix(".new")
            tmp.write_bytes(second.cert_pem)
            os.replace(tmp, ca_file)
            lab.layout.write(bao.client(), lab.bundles[1])
            assert wait_until(lambda: live_files(lab.tmp / "out") == lab.bundles[1], timeout=15), agent.tail()
            assert agent.events("vault_ca_reloaded")
        finally:
            agent.stop()
            proxy.close()


@pytest.fixture(name="front")
def fixture_front() -> Iterator[HTTPProxy]:
    """A mutating proxy in front of a Recorder (which answers `{}` to everything): no Vault needed."""
    upstream = Recorder()
    proxy = HTTPProxy(upstream.port)
    proxy.upstream = upstream  # type: ignore[attr-defined]
    try:
        yield proxy
    finally:
        proxy.close()
        upstream.close()


def _session(address: str, **kw: Any) -> Any:
    from agent.config import Duration, VaultConfig
    from agent.vault import Vault

    timeout = kw.pop("timeout", 2.0)
    return Vault(VaultConfig(address=address, timeout=Duration(timeout), **kw), env={}, max_response_bytes=1000)


class TestVaultSession:
    def test_each_request_carries_the_token_of_the_moment_and_vaults_headers(self, front):
        """The token is asked for when each request is sent; the namespace and X-Vault-Request go along."""
        import asyncio

        tokens = iter(["first-token", "second-token"])

        async def main() -> None:
            vault = _session(front.address, namespace="team-a")
            vault.token = lambda: next(tokens)
            try:
                await vault.request("GET", "secret/a", action="reading a")
                await vault.request("GET", "secret/b", action="reading b")
                await vault.request("GET", "sys/health", auth=False, action="asking")
            finally:
                await vault.close()

        asyncio.run(main())
        sent = [{k.lower(): v for k, v in h.items()} for h in front.headers]
        assert [h.get("x-vault-token") for h in sent] == ["first-token", "second-token", None]
        assert all(h["x-vault-namespace"] == "team-a" and h["x-vault-request"] == "true" for h in sent)

    def test_a_connection_reset_says_vault_cannot_be_reached(self):
        """A Vault going down resets the connections it had (ClientOSError in aiohttp): the sentence says Vault
        cannot be reached and why, in the system's words, not the name of a library class."""
        import asyncio
        import socket
        import struct
        import threading

        from agent.errors import VaultUnavailable

        listener = socket.create_server(("127.0.0.1", 0))

        def reset_each() -> None:
            while True:
                try:
                    conn, _ = listener.accept()
                except OSError:
                    return
                conn.recv(65536)
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.close()  # an RST, not a FIN

        threading.Thread(target=reset_each, daemon=True).start()

        async def main() -> str:
            vault = _session(f"http://127.0.0.1:{listener.getsockname()[1]}")
            try:
                await vault.request("GET", "secret/a", action="reading a")
            except VaultUnavailable as exc:
                return str(exc)
            finally:
                await vault.close()
            return ""

        try:
            message = asyncio.run(main())
        finally:
            listener.close()
        assert message.startswith("cannot reach Vault at http://127.0.0.1:") and "while reading a" in message
        assert "connection reset by peer" in message and "Error" not in message, message

    def test_same_origin_redirects_stop_after_three_hops(self, front):
        """A redirect loop on Vault's own address is followed 3 times, then one error says so."""
        import asyncio

        from agent.errors import VaultUnavailable

        front.mutate = lambda m, p, s, b: redirect(307, f"{front.address}/v1/loop?{len(front.requests)}")

        async def main() -> str:
            vault = _session(front.address)
            try:
                await vault.request("GET", "loop", action="reading a loop")
            except VaultUnavailable as exc:
                return str(exc)
            finally:
                await vault.close()
            return ""

        assert "more than 3 times" in asyncio.run(main())
        assert len(front.requests) == 4

    def test_https_to_http_is_never_followed(self):
        """A redirect from an https:// address to http:// on the same host and port is another origin."""
        from agent.config import VaultConfig
        from agent.errors import VaultUnavailable
        from agent.vault import Vault

        vault = Vault(VaultConfig(address="https://127.0.0.1:8200"), env={})

        with pytest.raises(VaultUnavailable, match="another address"):
            vault._redirect_target("https://127.0.0.1:8200/v1/x", "http://127.0.0.1:8200/v1/x", "reading x")
        with pytest.raises(VaultUnavailable, match="another address"):
            vault._redirect_target("https://127.0.0.1:8200/v1/x", "https://u@127.0.0.1:8200/v1/x", "reading x")
        assert vault._redirect_target("https://127.0.0.1:8200/v1/x", "/v1/y", "r") == "https://127.0.0.1:8200/v1/y"

    def test_aiohttp_is_loaded_without_its_trust_store_and_the_session_brings_its_own(self):
        """agent.aio imports aiohttp with OpenSSL's default CA paths pointed at nothing (its two import-time
        contexts cost ~40 ms of CPU at every start, unused): the environment is restored at once, aiohttp's own
        default context trusts nothing (a session without a context of its own fails closed), and a Vault session
        on https:// without vault.ca_cert loads the system store for itself."""
        import asyncio
        import ssl

        code = (
            "import os, ssl; from agent import aio; before = dict(os.environ); aio.load();"
            " import aiohttp.connector as c;"
            "print(dict(os.environ) == before, c._SSL_CONTEXT_VERIFIED.cert_store_stats()['x509_ca'],"
            " ssl.create_default_context().cert_store_stats()['x509_ca'])"
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("SSL_CERT")}
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True,
                             cwd=Path(__file__).parent.parent).stdout.split()
        system = ssl.create_default_context().cert_store_stats()["x509_ca"]
        assert out == ["True", "0", str(system)], out

        from agent.config import VaultConfig
        from agent.vault import Vault

        async def main() -> int:
            vault = Vault(VaultConfig(address="https://127.0.0.1:8200"), env={})
            pool = await vault._acquire()
            pool.inflight -= 1
            stats = vault._ssl.cert_store_stats()["x509_ca"] if vault._ssl else -1
            await vault.close()
            return int(stats)

        assert asyncio.run(main()) == system

    @pytest.mark.parametrize("chunked", [False, True])
    def test_an_answer_over_the_cap_is_refused_while_it_streams(self, front, chunked):
        """An answer over max_secret_size is refused, by its Content-Length or while it streams in."""
        import asyncio

        from agent.errors import ResponseTooLarge

        front.mutate = lambda m, p, s, b: Answer(200, b"x" * 5000, chunked=chunked, chunk=100)

        async def main() -> str:
            vault = _session(front.address)
            try:
                await vault.request("GET", "big", action="reading big")
            except ResponseTooLarge as exc:
                return str(exc)
            finally:
                await vault.close()
            return ""

        assert "over limits.max_secret_size (1000 bytes)" in asyncio.run(main())

    def test_dropping_connections_after_a_failure_spares_requests_in_flight(self, front):
        """A VaultUnavailable on one request starts a new session for the next ones; a slow request already in
        flight on the old session still gets its answer."""
        import asyncio

        from agent.errors import VaultUnavailable

        front.mutate = lambda m, p, s, b: (Answer(200, b'{"ok": 1}', stall=0.8) if p.endswith("/slow")
                                           else Answer(503, b"{}") if p.endswith("/down") else None)

        async def main() -> object:
            vault = _session(front.address)
            try:
                slow = asyncio.ensure_future(vault.request("GET", "slow", action="reading slowly"))
                await asyncio.sleep(0.2)
                with pytest.raises(VaultUnavailable):
                    await vault.request("GET", "down", action="reading a sealed node")
                await vault.request("GET", "after", action="reading again")
                return await slow
            finally:
                await vault.close()

        assert asyncio.run(main()) == {"ok": 1}

    def test_cancelling_the_task_aborts_the_request(self, front):
        """Cancelling the awaiting task ends a request whose headers never come, at once."""
        import asyncio

        front.mutate = lambda m, p, s, b: Answer(200, b"{}", stall=30)

        async def main() -> float:
            vault = _session(front.address, timeout=60.0)
            task = asyncio.ensure_future(vault.request("GET", "hang", action="hanging"))
            await asyncio.sleep(0.3)
            start = time.monotonic()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await vault.close()
            return time.monotonic() - start

        assert asyncio.run(main()) < 0.5

    def test_a_name_in_vault_address_is_resolved(self, front):
        """vault.address with a host name (not an IP address): the lookup runs and the request reaches Vault."""
        import asyncio

        async def main() -> object:
            vault = _session(f"http://localhost:{front.port}")
            try:
                return await vault.request("GET", "secret/a", action="reading a")
            finally:
                await vault.close()

        assert asyncio.run(main()) == {}
        assert front.requests

    def test_proxies_come_from_the_environment_and_no_proxy_is_honoured(self):
        """HTTPS_PROXY/HTTP_PROXY apply to vault.address unless NO_PROXY names its host."""
        from agent.config import VaultConfig
        from agent.vault import Vault

        env = {"HTTPS_PROXY": "http://proxy:3128", "NO_PROXY": "vault.internal"}
        assert Vault(VaultConfig(address="https://vault.example:8200"), env=env)._proxy == "http://proxy:3128"
        assert Vault(VaultConfig(address="https://vault.internal:8200"), env=env)._proxy is None
        assert Vault(VaultConfig(address="http://vault.example:8200"), env=env)._proxy is None


class TestCAFileCaughtEmpty:
    """vault.ca_cert read while a writer has truncated it and not written it yet (`cp`, `cat >`, an editor): an
    empty file holds no certificate; it must never become "trust the system's CAs"."""

    def test_an_empty_ca_cert_at_start_is_a_config_error(self, bao, tmp_path):
        import asyncio

        from agent.errors import ConfigError

        proxy = TLSProxy(bao.port, *_server_cert(pki.root_ca(cn="Vault CA")), tmp_path)
        ca_file = tmp_path / "ca.pem"
        ca_file.write_bytes(b"")

        async def main() -> None:
            vault = _session(proxy.address, ca_cert=str(ca_file))
            try:
                await vault.request("GET", "sys/health", auth=False, action="asking Vault for its health")
            finally:
                await vault.close()

        try:
            with pytest.raises(ConfigError, match=r"vault\.ca_cert .* is empty"):
                asyncio.run(main())
        finally:
            proxy.close()

    def test_a_ca_cert_caught_empty_while_rewritten_keeps_the_ca_in_use(self, bao, tmp_path):
        import asyncio

        ca = pki.root_ca(cn="Vault CA")
        proxy = TLSProxy(bao.port, *_server_cert(ca), tmp_path)
        ca_file = tmp_path / "ca.pem"
        ca_file.write_bytes(ca.cert_pem)

        async def main() -> list[object]:
            vault = _session(proxy.address, ca_cert=str(ca_file))
            try:
                first = await vault.request("GET", "sys/health", auth=False, action="asking Vault for its health")
                ca_file.write_bytes(b"")  # truncated by the writer, not written yet
                second = await vault.request("GET", "sys/health", auth=False, action="asking Vault for its health")
                return [first, second]
            finally:
                await vault.close()

        try:
            first, second = asyncio.run(main())
        finally:
            proxy.close()
        assert isinstance(first, dict) and first.get("initialized") is True
        assert isinstance(second, dict) and second.get("initialized") is True


def _server_cert(ca: pki.CertKey, *, dns: tuple[str, ...] = ("localhost",), ips: tuple[str, ...] = ("127.0.0.1",),
                 not_before: dt.datetime | None = None, not_after: dt.datetime | None = None) -> tuple[bytes, bytes]:
    leaf = pki.leaf_cert(ca, dns_names=dns, ip_addresses=ips, cn=(dns or ips)[0], not_before=not_before,
                         not_after=not_after)
    return leaf.cert_pem, leaf.key_pem


def test_the_run_path_imports_no_hvac_or_requests():
    """`import agent.runner` (everything `run` loads) brings in neither hvac nor requests."""
    code = "import agent.runner, sys; print(sorted(m for m in ('hvac', 'requests') if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=cli_env(), capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.stdout.strip() == "[]", proc.stdout + proc.stderr
