"""The TokenKeeper in-process against a real OpenBao and the Kubernetes API stand-in: when it logs in, renews, and
keeps the token it holds; counted as the requests Vault receives (a loopback proxy records them).

Lease times are real (the role's token_ttl of 1-3 s), so the few tests about renewal sleep a couple of seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
from collections.abc import Callable, Iterator

import pytest
import structlog

from agent.errors import ConfigError, CredentialUnavailable, PermissionDenied
from agent.keeper import MIN_RENEW_INTERVAL, TokenKeeper
from agent.vault import Vault
from tests.faultkit import Answer, HTTPProxy
from tests.inproc import Rig, make_rig

SECRET = {"hello": b"world"}


@pytest.fixture(name="proxy", scope="module")
def fixture_proxy(bao) -> Iterator[HTTPProxy]:
    """The recording proxy in front of the shared OpenBao, for this module's tests (each counts its own part)."""
    proxy = HTTPProxy(bao.port)
    yield proxy
    proxy.close()


@pytest.fixture(name="make")
def fixture_make(bao, proxy, kube, sa_token_file, tmp_path, unique) -> Callable[..., Rig]:
    """`make(token_ttl=..., token_max_ttl=...)`: a Rig whose role grants tokens with these TTLs."""

    def make(**ttls: str) -> Rig:
        return make_rig(bao, proxy, kube, sa_token_file("istio-system", "istiod"), tmp_path, unique, SECRET, **ttls)

    return make


async def _read(vault: Vault, rig: Rig) -> None:
    """Read the rig's secret with the token the keeper holds now (raises PermissionDenied when Vault refuses it)."""
    await vault.request("GET", rig.data_path, action="reading the test secret")


async def _run_for(keeper: TokenKeeper, seconds: float) -> None:
    """Run the keeper's renewal loop for `seconds`, then stop it."""
    task = asyncio.ensure_future(keeper.run())
    await asyncio.sleep(seconds)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def test_ensure_logs_in_once_and_reuses_the_token(make):
    """Three workers asking for a token at once, and again later, cost one login; the token reads the secret."""
    rig = make()

    async def body(vault: Vault, keeper: TokenKeeper) -> list[int]:
        generations = await asyncio.gather(keeper.ensure(), keeper.ensure(), keeper.ensure())
        generations.append(await keeper.ensure())
        await _read(vault, rig)
        return generations

    assert rig.run(body) == [1, 1, 1, 1]
    assert rig.logins() == 1
    assert b"jwt" in rig.jwts_sent()[0]


def test_a_token_near_its_lease_end_is_not_handed_out(make):
    """A 2 s token is reused while it has more than its margin left; within the last 1/3 s (a sixth of the lease)
    a new login is made first, so no worker sends a token that expires on the way."""
    rig = make(token_ttl="2s", token_max_ttl="1h")

    async def body(vault: Vault, keeper: TokenKeeper) -> tuple[int, int, int]:
        first = await keeper.ensure()
        old = keeper.token()
        again = await keeper.ensure()
        logins_before = rig.logins()
        await asyncio.sleep(1.75)  # now within min(1 s, ttl/6) of the lease end
        later = await keeper.ensure()
        assert keeper.token() != old
        await _read(vault, rig)
        return first, again, later * 10 + logins_before

    first, again, later = rig.run(body)
    assert (first, again, later) == (1, 1, 21)
    assert rig.logins() == 2


def test_recover_logs_in_again_after_the_token_was_revoked(make):
    """A revoked token: recover() asks lookup-self, which refuses it, logs in again, and the new token reads."""
    rig = make()

    async def body(vault: Vault, keeper: TokenKeeper) -> tuple[bool, int]:
        generation = await keeper.ensure()
        assert keeper.login is not None
        rig.revoke(keeper.login.accessor)
        with pytest.raises(PermissionDenied):
            await _read(vault, rig)
        replaced = await keeper.recover(generation)
        await _read(vault, rig)
        return replaced, keeper.generation

    assert rig.run(body) == (True, 2)
    assert rig.logins() == 2
    assert rig.sent("/v1/auth/token/lookup-self") == 1


def test_recover_keeps_the_token_after_a_policy_403(make):
    """A 403 from a path the policy does not grant (the token is fine): no new login, no new lease; a worker that
    raced with another login (an older generation) is told to retry without a login either."""
    rig = make()
    other = f"/v1/{rig.layout.kv_mount}/data/not-granted"

    async def body(vault: Vault, keeper: TokenKeeper) -> tuple[bool, bool, int]:
        generation = await keeper.ensure()
        token = keeper.token()
        with pytest.raises(PermissionDenied):
            await vault.request("GET", other, action="reading a path the policy does not grant")
        replaced = await keeper.recover(generation)
        assert keeper.token() == token
        stale = await keeper.recover(generation - 1)
        return replaced, stale, keeper.generation

    assert rig.run(body) == (False, True, 1)
    assert rig.logins() == 1


def test_renewal_at_two_thirds_of_the_ttl_keeps_the_token(make):
    """A 3 s token is renewed once at 2 s (renew-self, no login, same generation) and still reads after its first
    lease would have ended."""
    rig = make(token_ttl="3s", token_max_ttl="1h")

    async def body(vault: Vault, keeper: TokenKeeper) -> tuple[int, str, str]:
        await keeper.ensure()
        token = keeper.token()
        await _run_for(keeper, 3.3)
        await _read(vault, rig)  # the first lease ended at 3 s
        return keeper.generation, token, keeper.token()

    generation, before, after = rig.run(body)
    assert generation == 1 and before == after
    assert rig.renewals() == 1
    assert rig.logins() == 1
    assert [ttl for _, ttl in rig.metrics.tokens] == [3.0, 3.0]
    renewed_at = rig.metrics.tokens[1][0] - rig.metrics.tokens[0][0]
    assert 1.9 <= renewed_at <= 2.5, renewed_at


def test_a_worker_asking_while_the_renewal_is_on_its_way_costs_no_login(make, proxy):
    """A 3 s token whose renewals take 0.3 s to answer, and a worker asking for a token every 50 ms: every renewal
    keeps the token and no worker logs in meanwhile (a margin that starts at the renewal point made one login per
    renewal, most often on a loaded machine)."""
    rig = make(token_ttl="3s", token_max_ttl="1h")
    proxy.mutate = lambda m, p, s, b: Answer(s, b, stall=0.3) if p.endswith("/auth/token/renew-self") else None

    async def body(vault: Vault, keeper: TokenKeeper) -> int:
        await keeper.ensure()

        async def worker() -> None:
            while True:
                await keeper.ensure()
                await asyncio.sleep(0.05)

        task = asyncio.ensure_future(worker())
        try:
            await _run_for(keeper, 6.5)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await _read(vault, rig)
        return keeper.generation

    try:
        generation = rig.run(body)
    finally:
        proxy.mutate = None
    assert rig.logins() == 1 and generation == 1
    assert rig.renewals() >= 2


def test_a_renewal_cut_short_by_max_ttl_makes_a_new_login(make):
    """With token_max_ttl equal to token_ttl (3 s), the renewal at 2 s comes back with about 1 s left: the keeper
    logs in again at once (a new generation), before the token runs out."""
    rig = make(token_ttl="3s", token_max_ttl="3s")

    async def body(vault: Vault, keeper: TokenKeeper) -> int:
        await keeper.ensure()
        old = keeper.token()
        await _run_for(keeper, 2.8)
        assert keeper.token() != old
        await _read(vault, rig)
        return keeper.generation

    assert rig.run(body) == 2
    assert rig.renewals() == 1
    assert rig.logins() == 2


def test_a_tiny_lease_is_renewed_at_most_once_a_second_and_said_once(make):
    """A 1 s lease would have the keeper renew every 2/3 s; it renews at most once a second (a renewal that came
    too late is followed by one login), so its token changes at most once a second, and it says once that the
    lease is too short."""
    rig = make(token_ttl="1s", token_max_ttl="1h")

    async def body(vault: Vault, keeper: TokenKeeper) -> None:
        await keeper.ensure()
        await _run_for(keeper, 3.2)

    with structlog.testing.capture_logs() as logs:
        rig.run(body)
    tiny = [e for e in logs if e["event"] == "token_lease_tiny"]
    assert len(tiny) == 1, logs
    assert "raise the role's token_ttl" in tiny[0]["reason"]
    # the login, then renewals (or re-logins when one came too late) from 2/3 s on, each a second after the last
    times = [t for t, _ in rig.metrics.tokens[1:]]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert 2 <= len(times) <= 3, rig.requests()
    assert min(gaps) >= MIN_RENEW_INTERVAL - 0.1, gaps
    # one renew-self a second at most; when it comes too late for a 1 s lease, a login in the same slot
    assert rig.renewals() <= 3 and rig.logins() <= 1 + rig.renewals(), rig.requests()


def test_after_settle_a_token_file_problem_is_retried_and_the_token_kept(make, tmp_path):
    """Once settled, a missing, empty or FIFO token file at a needed login is CredentialUnavailable (retried), the
    Vault token in hand is still sent and works, and no login request reaches Vault."""
    rig = make(token_ttl="6s", token_max_ttl="1h")
    jwt = rig.token.read_text()

    def missing() -> None:
        rig.token.unlink()

    def empty() -> None:
        rig.token.write_text("\n")

    def fifo() -> None:
        rig.token.unlink()
        os.mkfifo(rig.token)

    async def body(vault: Vault, keeper: TokenKeeper) -> list[str]:
        await keeper.ensure()
        keeper.settle()
        token = keeper.token()
        await asyncio.sleep(5.05)  # the token has less than a second left: ensure() wants a new login
        messages = []
        for spoil in (missing, empty, fifo):
            spoil()
            with pytest.raises(CredentialUnavailable) as caught:
                await keeper.ensure()
            messages.append(str(caught.value))
            assert keeper.token() == token
            await _read(vault, rig)
            rig.token.unlink(missing_ok=True)
            rig.token.write_text(jwt)
        await keeper.ensure()  # the file is back: a new login
        return messages

    messages = rig.run(body)
    assert "does not exist" in messages[0] or "missing" in messages[0], messages[0]
    assert "empty" in messages[1], messages[1]
    assert "regular file" in messages[2] or "not a file" in messages[2], messages[2]
    assert all(jwt not in m and "\n" not in m for m in messages)
    assert rig.logins() == 2


@pytest.mark.parametrize("spoil", ["missing", "empty", "fifo"])
def test_before_settle_a_token_file_problem_is_a_config_error(make, spoil):
    """Before the first publish, a token file that cannot be read is a ConfigError: the agent stops and says
    what to fix; nothing is sent to Vault."""
    rig = make()
    rig.token.unlink()
    if spoil == "empty":
        rig.token.write_text("")
    elif spoil == "fifo":
        os.mkfifo(rig.token)

    async def body(vault: Vault, keeper: TokenKeeper) -> str:
        with pytest.raises(ConfigError) as caught:
            await asyncio.wait_for(keeper.ensure(), 5)
        return str(caught.value)

    message = rig.run(body)
    assert str(rig.token) in message
    if spoil == "missing":
        assert "auth.token_path" in message, message
    assert rig.requests() == []


def test_a_rotated_token_file_costs_no_login_until_one_is_needed(make, sa_token_file):
    """kubelet rewrites the projected token: no login for it (same generation, no request); the next login the
    agent needs (here after a revocation) sends the new JWT."""
    rig = make()
    old_jwt = rig.token.read_text()

    async def body(vault: Vault, keeper: TokenKeeper) -> tuple[int, int]:
        generation = await keeper.ensure()
        rotated = sa_token_file("istio-system", "istiod")  # atomically replaces the same file, like kubelet
        assert rotated == rig.token and rotated.read_text() != old_jwt
        for _ in range(3):
            assert await keeper.ensure() == generation
            await _read(vault, rig)
        assert rig.logins() == 1
        assert keeper.login is not None
        rig.revoke(keeper.login.accessor)
        assert await keeper.recover(generation)
        return generation, keeper.generation

    assert rig.run(body) == (1, 2)
    first, second = rig.jwts_sent()
    assert old_jwt.strip().encode() in first
    assert rig.token.read_text().strip().encode() in second


def test_the_token_is_never_in_the_keepers_repr(make):
    """A Login in a log line or a traceback shows its accessor and TTL, never the token."""
    rig = make()

    async def body(vault: Vault, keeper: TokenKeeper) -> tuple[str, str]:
        await keeper.ensure()
        assert keeper.login is not None
        return keeper.token(), repr(keeper.login)

    token, shown = rig.run(body)
    assert token and token not in shown
