"""The BundleWorker driven in-process: a real KV source (agent.sources.kv), a FileTarget into tmp_path, the real
TokenKeeper and Vault session, against the shared OpenBao through a recording proxy. What is asserted is what a user
sees: the requests Vault receives per look, the files published, the logins made, the Events recorded, and what
/readyz reads (BundleState).

Also the source-level half of KV ordering (the rules are table-tested in tests/test_rules.py): the version and
created_time that KVSource hands to the rules, its revision probe, and KV v1 (no versions: notBefore orders).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import math
import random
import time
from collections.abc import Iterator, Mapping

import pytest

from agent.config import AgentConfig
from agent.errors import BundleError, StaleRead
from agent.health import Readiness, bundle_readiness
from agent.keeper import TokenKeeper
from agent.sources import open_source
from agent.sources.kv import KVSource, _timestamp
from agent.targets.files import FileTarget
from agent.vault import Vault
from agent.worker import BundleWorker
from testbed import pki
from testbed.vaultsetup import configure_kubernetes_auth, ensure_secrets_engine
from tests.faultkit import HTTPProxy
from tests.inproc import Rig, make_rig
from tests.support import live_files

INTERVAL = 300.0


class Events:
    """Records what the worker would send to Kubernetes as Events (the EventRecorder's `record`)."""

    def __init__(self) -> None:
        self.recorded: list[tuple[str, str, str]] = []

    def record(self, reason: str, message: str, type: str = "Normal") -> None:
        self.recorded.append((reason, message, type))

    async def client(self) -> None:
        return None

    def reasons(self) -> list[str]:
        return [reason for reason, _, _ in self.recorded]


@pytest.fixture(scope="module", name="ca")
def fixture_ca() -> dict[str, object]:
    """A root, three good bundles under it, and one it must refuse (ca-key.pem of another intermediate)."""
    root = pki.root_ca()
    good = [pki.istio_ca_files(root, pki.intermediate_ca(root, cn=f"Intermediate CA {i}")) for i in range(3)]
    bad = {**good[0], "ca-key.pem": good[1]["ca-key.pem"]}
    return {"root": root, "good": good, "bad": bad}


@pytest.fixture(name="proxy", scope="module")
def fixture_proxy(bao) -> Iterator[HTTPProxy]:
    proxy = HTTPProxy(bao.port)
    yield proxy
    proxy.close()


@pytest.fixture(name="rig")
def fixture_rig(bao, proxy, kube, sa_token_file, tmp_path, unique, ca) -> Rig:
    """Its own KV v2 secret (version 1 = the first good bundle) and kubernetes role on the shared OpenBao."""
    good: list[dict[str, bytes]] = ca["good"]  # type: ignore[assignment]
    return make_rig(bao, proxy, kube, sa_token_file("istio-system", "istiod"), tmp_path, unique, good[0])


def _worker(rig: Rig, vault: Vault, keeper: TokenKeeper, cfg: AgentConfig, events: Events | None = None,
            ) -> BundleWorker:
    """A worker wired as the runner wires it (open_source, the bundle's interval), publishing into files."""
    b = cfg.bundles[0]
    return BundleWorker(
        b, source=open_source(b, vault, cfg), target=FileTarget(b), vault=vault, keeper=keeper, metrics=rig.metrics,
        init_timeout=10, retry_interval=b.interval(cfg.sidecar), events=events,  # type: ignore[arg-type]
    )


def _ready(worker: BundleWorker) -> bool:
    """What /readyz answers for the bundle now (agent.health reads the worker's BundleState)."""
    return _readyz(worker).ready


def _readyz(worker: BundleWorker) -> Readiness:
    return bundle_readiness(worker.state, time.time())


# ---------------------------------------------------------------------------------------------- the worker


def test_first_publish_then_a_look_costs_one_metadata_read_until_a_new_version(rig, ca):
    """First look: one full read, published, ready. An unchanged secret then costs exactly one metadata read per
    look (no secret bytes, no login); a new version is read once and published."""
    good: list[dict[str, bytes]] = ca["good"]
    out = rig.tmp / "out"

    async def body(vault: Vault, keeper: TokenKeeper) -> None:
        w = _worker(rig, vault, keeper, rig.config())
        assert not _ready(w) and _readyz(w).reason == "not published yet" and w.state.published_at is None
        m = rig.mark()
        assert await w.cycle() is True
        assert live_files(out) == good[0]
        assert _ready(w) and w.state.live is not None and w.state.live.version == 1 and w.state.last_error is None
        assert rig.sent(rig.data_path, m) == 1 and rig.logins(m) == 1
        first_published = w.state.published_at
        assert first_published is not None

        for _ in range(3):
            m = rig.mark()
            assert await w.cycle() is False
            assert rig.requests(m) == [("GET", rig.meta_path)]
        assert w.state.published_at == first_published

        assert rig.write(good[1]) == 2
        m = rig.mark()
        assert await w.cycle() is True
        assert rig.sent(rig.meta_path, m) == 1 and rig.sent(rig.data_path, m) == 1 and len(rig.requests(m)) == 2
        assert live_files(out) == good[1]
        assert w.state.live is not None and w.state.live.version == 2
        assert w.state.published_at is not None and w.state.published_at > first_published
        assert _ready(w) and w.state.last_error is None

    rig.run(body)
    assert rig.logins() == 1


def test_a_refused_bundle_is_reported_once_and_not_read_again(rig, ca):
    """A version the validator refuses: one Event and one counted error, the live bundle stays published and ready
    with the reason in last_error; later looks read only metadata and stay quiet; the next good version ends it."""
    good: list[dict[str, bytes]] = ca["good"]
    out = rig.tmp / "out"
    events = Events()

    async def body(vault: Vault, keeper: TokenKeeper) -> None:
        w = _worker(rig, vault, keeper, rig.config(), events)
        assert await w.cycle() is True
        rig.write(ca["bad"])  # type: ignore[arg-type]
        m = rig.mark()
        with pytest.raises(BundleError) as refused:
            await w.cycle()
        assert rig.sent(rig.data_path, m) == 1
        assert events.reasons() == ["BundleRefused"] and events.recorded[0][2] == "Warning"
        assert str(refused.value) in events.recorded[0][1]
        assert live_files(out) == good[0]
        assert _ready(w) and w.state.live is not None and w.state.live.version == 1
        assert w.state.last_error == str(refused.value)
        assert "; last error: " in _readyz(w).reason
        errors = len(rig.metrics.errors)

        for _ in range(2):
            m = rig.mark()
            with pytest.raises(BundleError):
                await w.cycle()
            assert rig.requests(m) == [("GET", rig.meta_path)]
        assert events.reasons() == ["BundleRefused"]
        assert len(rig.metrics.errors) == errors
        assert live_files(out) == good[0] and _ready(w)

        rig.write(good[2])
        assert await w.cycle() is True
        assert live_files(out) == good[2]
        assert w.state.last_error is None and w.state.live is not None and w.state.live.version == 3
        assert _ready(w) and "last error" not in _readyz(w).reason

    rig.run(body)


def test_resync_reads_in_full(rig, ca):
    """resync() (SIGHUP): the next look finds the mount again and reads the secret, even though the metadata
    says nothing changed; the same bytes publish no new generation."""
    out = rig.tmp / "out"

    async def body(vault: Vault, keeper: TokenKeeper) -> None:
        w = _worker(rig, vault, keeper, rig.config())
        await w.cycle()
        generation = (out / "..data").readlink()
        published = w.state.published_at
        w.resync()
        m = rig.mark()
        assert await w.cycle() is False
        assert rig.sent(rig.data_path, m) == 1 and rig.sent(rig.meta_path, m) == 0
        assert rig.sent(f"/v1/sys/internal/ui/mounts/{rig.layout.kv}", m) == 1
        assert (out / "..data").readlink() == generation and w.state.published_at == published
        m = rig.mark()
        await w.cycle()  # and back to the cheap probe
        assert rig.requests(m) == [("GET", rig.meta_path)]

    rig.run(body)


def test_a_new_login_does_not_read_the_secret_again(rig, ca):
    """The token is revoked: the look's metadata read gets a 403 (and so does the data read a policy without
    metadata access falls back to: no bytes), the keeper finds the token refused and logs in once, and the look
    goes on with the metadata probe only: no mount lookup, no secret read with the new token (issue 19)."""

    async def body(vault: Vault, keeper: TokenKeeper) -> None:
        w = _worker(rig, vault, keeper, rig.config())
        await w.cycle()
        assert keeper.login is not None and keeper.generation == 1
        revoked = keeper.token()
        rig.revoke(keeper.login.accessor)
        m = rig.mark()
        assert await w.cycle() is False
        sent = rig.requests(m)
        assert keeper.generation == 2 and rig.logins(m) == 1, sent
        after_login = sent[sent.index(("POST", rig.login_path)) + 1 :]
        assert after_login == [("GET", rig.meta_path)], sent
        tokens = [h.get("X-Vault-Token") for h in rig.proxy.headers[m:]]
        assert all(tok == revoked for (_, p), tok in zip(sent, tokens, strict=True) if p == rig.data_path), sent
        assert [p for _, p in sent if "/ui/mounts/" in p] == []
        assert _ready(w) and w.state.last_error is None

    rig.run(body)


def test_the_first_look_after_the_first_publish_is_at_a_random_phase(rig, ca, tmp_path):
    """Workers that publish together (a rolling restart) schedule their next look at uniformly random points of
    the interval, not all at +interval; after that look the schedule is the regular interval, no jitter."""
    async def body(vault: Vault, keeper: TokenKeeper) -> tuple[list[float], float, float, float]:
        workers = [_worker(rig, vault, keeper, rig.config(out=tmp_path / f"out{i}")) for i in range(8)]
        start = time.time()
        for w in workers:
            assert await w.cycle() is True
        end = time.time()
        wakes = [w._wake_at for w in workers]
        second_start = time.time()
        await workers[0].cycle()
        return wakes, start, end, workers[0]._wake_at - second_start

    saved = random.getstate()
    random.seed(19)  # the same draws every run (8 uniform draws all within 30 s: about one chance in a million)
    try:
        wakes, start, end, regular = rig.run(body)
    finally:
        random.setstate(saved)
    assert all(start <= t <= end + INTERVAL for t in wakes), [t - start for t in wakes]
    assert max(wakes) - min(wakes) > INTERVAL / 10, [round(t - start, 1) for t in wakes]
    assert INTERVAL - 1 <= regular <= INTERVAL + 1, regular


def test_the_run_loop_polls_at_the_interval_with_metadata_only(rig, ca):
    """worker.run() in sidecar mode with poll_interval 1 s, for 1.6 s: one login, one full read and one publish
    (one BundlePublished Event), then a metadata read at each look, the first within the interval, no faster."""
    out = rig.tmp / "out"
    events = Events()

    async def body(vault: Vault, keeper: TokenKeeper) -> None:
        w = _worker(rig, vault, keeper, rig.config(poll="1s"), events)
        task = asyncio.ensure_future(w.run(once=False))
        await asyncio.sleep(1.6)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    rig.run(body)
    assert rig.logins() == 1 and rig.sent(rig.data_path) == 1
    assert 1 <= rig.sent(rig.meta_path) <= 2, rig.requests()
    assert events.reasons() == ["BundlePublished"]
    assert live_files(out) == ca["good"][0]


# ---------------------------------------------------------------------------------------------- the KV source


def test_kv2_fetch_reports_version_and_created_time_as_the_probe_does(rig, ca):
    """fetch() returns the current version and its created_time (nanoseconds kept) exactly as the metadata probe
    names it, so an unchanged secret is recognised without reading it."""
    good: list[dict[str, bytes]] = ca["good"]
    rig.write(good[1])
    meta = rig.admin.secrets.kv.v2.read_secret_metadata(path=rig.layout.secret_path, mount_point=rig.layout.kv_mount)
    stamp = meta["data"]["versions"]["2"]["created_time"]

    async def body(vault: Vault, keeper: TokenKeeper) -> tuple[object, str | None]:
        await keeper.ensure()
        cfg = rig.config()
        source = open_source(cfg.bundles[0], vault, cfg)
        assert isinstance(source, KVSource)
        return await source.fetch(), await source.revision()

    fetched, revision = rig.run(body)
    assert fetched.version == 2 and fetched.files == good[1]  # type: ignore[attr-defined]
    assert fetched.revision == revision == f"2@{stamp}"  # type: ignore[attr-defined]
    whole, _, frac = stamp.rstrip("Z").partition(".")
    expected = dt.datetime.fromisoformat(whole).replace(tzinfo=dt.UTC).timestamp() + float(f"0.{frac or 0}")
    assert math.isclose(fetched.created_at, expected, abs_tol=1e-6)  # type: ignore[attr-defined]
    assert abs(fetched.created_at - time.time()) < 60  # type: ignore[attr-defined]


BASE = dt.datetime(2026, 12, 7, 8, 54, 15, tzinfo=dt.UTC).timestamp()


@pytest.mark.parametrize(
    ("stamp", "expected"),
    [
        ("2026-12-07T08:54:15.123456789Z", BASE + 0.123456789),
        ("2026-12-07T08:54:15.5Z", BASE + 0.5),
        ("2026-12-07T08:54:15Z", BASE),
        ("2026-12-07T08:54:15.1234567891234Z", BASE + 0.123456789),  # past nanoseconds: cut, not misread
        ("2026-12-07T10:54:15.25+02:00", BASE + 0.25),  # an offset is honoured, not taken for fraction digits
        ("2026-12-07T10:54:15+02:00", BASE),
        ("2026-12-07T08:54:15.000000000+00:00", BASE),
        ("2999-01-01T00:00:00Z", dt.datetime(2999, 1, 1, tzinfo=dt.UTC).timestamp()),
        ("", None),
        ("garbage", None),
        ("2026-13-07T08:54:15Z", None),
        ("2026-12-07T08:54:15.12x4Z", None),
        (None, None),
        (1796633655, None),
    ],
)
def test_created_time_is_parsed_to_the_nanosecond_and_odd_stamps_are_none(stamp: object, expected: float | None):
    """KV v2's created_time as Unix seconds (what orders a recreated secret); anything odd is None (unknown), never
    a wrong time."""
    got = _timestamp(stamp)
    if expected is None:
        assert got is None
    else:
        assert got is not None and math.isclose(got, expected, abs_tol=1e-6), (got, expected)


@pytest.fixture(name="kv1")
def fixture_kv1(rig, kube, unique) -> str:
    """A KV v1 secret `kv1-SUFFIX/istio/cacerts` that the rig's role may read; returns its source.kv."""
    mount = f"kv1-{unique}"
    ensure_secrets_engine(rig.admin, mount, kv_version=1)
    policy = f"{rig.layout.policy}-v1"
    rig.admin.sys.create_or_update_policy(name=policy, policy=f'path "{mount}/*" {{ capabilities = ["read"] }}\n')
    configure_kubernetes_auth(rig.admin, kube, mount=rig.layout.auth_mount, role=rig.layout.role,
                              namespace="istio-system", service_account="istiod",
                              policies=[rig.layout.policy, policy])
    return f"{mount}/istio/cacerts"


def _write_v1(rig: Rig, kv: str, files: Mapping[str, bytes]) -> None:
    mount, _, path = kv.partition("/")
    rig.admin.secrets.kv.v1.create_or_update_secret(path=path, secret={k: v.decode() for k, v in files.items()},
                                                    mount_point=mount)


def test_kv1_has_no_version_so_an_older_certificate_is_never_published_over_a_newer_one(rig, ca, kv1):
    """KV v1 has no versions or probe: every look reads the secret, and fetch() reports no version, revision or
    created_time. What orders it is the certificate's notBefore: an older intermediate written back is a stale
    read, reported, and the live files stay."""
    root = ca["root"]
    now = dt.datetime.now(dt.UTC)
    newer = pki.istio_ca_files(root, pki.intermediate_ca(root, cn="Newer"))  # type: ignore[arg-type]
    older = pki.istio_ca_files(root, pki.intermediate_ca(  # type: ignore[arg-type]
        root, cn="Older", not_before=now - dt.timedelta(days=30), not_after=now + dt.timedelta(days=300)))
    _write_v1(rig, kv1, newer)
    out = rig.tmp / "v1"
    cfg = rig.config(out=out, kv=kv1)

    async def body(vault: Vault, keeper: TokenKeeper) -> None:
        await keeper.ensure()
        source = open_source(cfg.bundles[0], vault, cfg)
        fetched = await source.fetch()
        assert (fetched.version, fetched.revision, fetched.created_at) == (None, None, None)
        assert await source.revision() is None

        w = _worker(rig, vault, keeper, cfg)
        assert await w.cycle() is True
        m = rig.mark()
        assert await w.cycle() is False
        assert rig.requests(m) == [("GET", f"/v1/{kv1}")]  # no cheap probe on KV v1: a full read
        _write_v1(rig, kv1, older)
        with pytest.raises(StaleRead):
            await w.cycle()
        assert live_files(out) == newer
        assert _ready(w)  # a stale read keeps the live bundle, and it stays ready

    rig.run(body)
