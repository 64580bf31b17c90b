"""The worker's rules (agent/rules.py), without a Vault: which content goes live, when it looks again, what it reports.

Each case is a short story of events and the actions the rules must answer with; the three clock cases of issue 19
(a notBefore a few seconds ahead, a version stamped in 2999, a secret recreated after one) are among them.
"""

from __future__ import annotations

import datetime as dt
import itertools
from dataclasses import replace

import pytest

from agent import rules
from agent.errors import BundleError
from agent.rules import (
    SKEW,
    Checked,
    Content,
    Due,
    Fetch,
    Kept,
    Probe,
    Publish,
    Published,
    Read,
    Report,
    Resync,
    Revision,
    Sleep,
    State,
    Validate,
    decide,
    order,
)

NOW = 1_800_000_000.0
POLL = 300.0
FUTURE = 32_503_680_000.0  # 2999-12-31


def v(version: int | None, created: float | None = None, digest: str | None = None) -> Content:
    """KV v2 content `version` created at `created` (NOW - 1000 by default)."""
    created = NOW - 1000 if created is None else created
    rev = None if version is None else f"{version}@{created}"
    return Content(digest=digest or f"d{version}-{created}", revision=rev, version=version, created_at=created)


def live(content: Content, since: float = NOW - 500, **kw: object) -> State:
    return State(live=content, live_since=since, synced=True, poll_at=NOW + POLL, **kw)  # type: ignore[arg-type]


def kinds(actions: list[rules.Action]) -> list[type]:
    return [type(a) for a in actions]


# ------------------------------------------------------------------------------------------------ ordering


ORDER_CASES = [
    # (live, new, expected)
    (v(3), v(4), "newer"),
    (v(3), v(3), "newer"),
    (v(3), v(2, NOW - 2000), "stale"),  # a node that lags behind
    (v(3), v(1, NOW - 100), "newer"),  # recreated after the live one: version numbers restarted
    (v(3), v(1, FUTURE), "stale"),  # stamped in 2999 while version 3 is live: never wins (issue 19)
    (v(3), v(1, NOW + SKEW - 1), "newer"),  # a stamp within the skew is believed
    (v(3), v(1, NOW + SKEW + 1), "stale"),  # just past the skew is not
    (v(3, FUTURE), v(1, NOW - 10), "newer"),  # the live one stamped in 2999, then the secret was recreated
    (v(3, FUTURE), v(2, NOW - 10_000), "stale"),  # ... but an older version of that life stays stale
    (v(None), v(1), "newer"),  # KV v1 live: no versions to compare (notBefore decides, later)
    (v(3), v(None), "newer"),
    (None, v(1, FUTURE), "newer"),  # nothing live yet: anything valid goes
    (v(3, created=None), v(1), "stale"),  # no live stamp to compare with: a lower version is not taken
]


@pytest.mark.parametrize(("live_c", "new", "expected"), ORDER_CASES)
def test_order(live_c: Content | None, new: Content, expected: str) -> None:
    if live_c is not None and live_c.created_at is None:
        live_c = replace(live_c, created_at=None)
    assert order(live_c, NOW - 500, new, NOW) == expected


def test_a_future_stamp_holds_off_a_recreation_only_until_its_first_sighting_plus_skew() -> None:
    """The live version was stamped in 2999 and first seen at T: a recreated secret made before T + SKEW could be a
    lagging node's answer, after it is taken."""
    t = NOW - 1000
    assert order(v(3, FUTURE), t, v(1, t + SKEW - 1), NOW) == "stale"
    assert order(v(3, FUTURE), t, v(1, t + SKEW + 1), NOW) == "newer"


@pytest.mark.parametrize(("lv", "nv", "dl", "dn"), list(itertools.product(
    [1, 2, 5, 100], [1, 2, 5, 100], [-5000.0, 0.0, 50.0, 1e9], [-5000.0, 0.0, 50.0, 1e9],
)))
def test_order_never_goes_back_to_a_lower_version_with_an_untrusted_or_older_stamp(
    lv: int, nv: int, dl: float, dn: float,
) -> None:
    """Exhaustively: a lower version goes live only with a believable stamp later than the live one's."""
    live_c, new = v(lv, NOW + dl), v(nv, NOW + dn)
    got = order(live_c, NOW, new, NOW)
    if nv >= lv:
        assert got == "newer"
    else:
        believable = NOW + dn <= NOW + SKEW
        later = NOW + dn > min(NOW + dl, NOW + SKEW)
        assert got == ("newer" if believable and later else "stale")


# ------------------------------------------------------------------------------------------------ one look


def test_first_look_reads_in_full() -> None:
    st, actions = decide(State(), Due(NOW, NOW + POLL))
    assert actions == [Fetch()]
    assert st.poll_at == NOW + POLL


def test_unchanged_revision_costs_no_read() -> None:
    st = live(v(3))
    st, actions = decide(st, Due(NOW, NOW + POLL))
    assert actions == [Probe()]
    st, actions = decide(st, Revision(NOW, v(3).revision))
    assert actions == [Kept(), Sleep(NOW + POLL)]


@pytest.mark.parametrize("revision", [None, "4@x", "3@other-stamp"])
def test_changed_or_unknown_revision_reads(revision: str | None) -> None:
    st, _ = decide(live(v(3)), Due(NOW, NOW + POLL))
    assert decide(st, Revision(NOW, revision))[1] == [Fetch()]


def test_a_source_without_a_probe_reads_every_time() -> None:
    st = live(v(None))
    assert decide(st, Due(NOW, NOW + POLL))[1] == [Fetch()]


def test_resync_reads_in_full_even_when_the_probe_would_match() -> None:
    st, actions = decide(live(v(3)), Resync(NOW, NOW + POLL))
    assert actions == [Fetch()]
    assert not st.synced
    assert decide(st, Due(NOW, NOW + POLL))[1] == [Fetch()]


def test_a_read_of_the_live_bytes_keeps_them() -> None:
    st = live(v(3))
    st, actions = decide(st, Read(NOW, v(3)))
    assert actions == [Kept(), Sleep(NOW + POLL)]


def test_new_content_is_validated_then_published() -> None:
    st, actions = decide(live(v(3)), Read(NOW, v(4)))
    assert actions == [Validate(v(4))]
    st, actions = decide(st, Checked(NOW, v(4)))
    assert actions == [Publish(v(4))]
    st, actions = decide(st, Published(NOW, v(4), changed=True))
    assert st.live == v(4) and st.live_since == NOW and st.refused is None
    assert kinds(actions) == [Sleep]


def test_a_stale_read_is_reported_once_and_keeps_the_live_bundle() -> None:
    st = live(v(3))
    st, actions = decide(st, Read(NOW, v(2, NOW - 5000)))
    assert kinds(actions) == [Report, Sleep]
    first = actions[0]
    assert isinstance(first, Report) and first.what == "stale" and first.first
    st, actions = decide(st, Read(NOW + 1, v(2, NOW - 5000)))
    again = actions[0]
    assert isinstance(again, Report) and not again.first
    assert st.live == v(3)


# ------------------------------------------------------------------------------------------------ refusals


def _refused(st: State, content: Content, at: float = NOW, recheck_at: float | None = None) -> State:
    st, actions = decide(st, Read(at, content))
    assert actions == [Validate(content)]
    st, actions = decide(st, Checked(at, content, error=BundleError("bad"), recheck_at=recheck_at))
    report = actions[0]
    assert isinstance(report, Report) and report.what == "refused" and report.first
    return st


def test_a_refusal_is_remembered_and_not_read_again_while_unchanged() -> None:
    st = _refused(live(v(3)), v(4))
    st, _ = decide(st, Due(NOW + POLL, NOW + 2 * POLL))
    st, actions = decide(st, Revision(NOW + POLL, v(4).revision))
    assert actions == [Validate(v(4), again=True)], "the same bytes are validated again, not read again"


def test_a_refusal_validated_again_and_still_refused_is_not_reported_again() -> None:
    st = _refused(live(v(3)), v(4))
    st, actions = decide(st, Checked(NOW + POLL, v(4), error=BundleError("bad")))
    report = actions[0]
    assert isinstance(report, Report) and not report.first


def test_not_yet_valid_rotation_goes_live_once_its_time_comes() -> None:
    """Issue 19: a certificate whose notBefore is 12 s ahead of the agent's clock is refused once, then published
    when it becomes valid, without a new KV version and without reading the secret again."""
    st = _refused(live(v(3)), v(4), recheck_at=NOW + 12)
    _, sleep = decide(st, Checked(NOW, v(4), error=BundleError("not yet valid"), recheck_at=NOW + 12))[1]
    assert sleep == Sleep(NOW + 12), "wakes up when the verdict may change, not at the next poll"
    st, actions = decide(st, Due(NOW + 12, NOW + 12 + POLL))
    assert actions == [Probe()]
    st, actions = decide(st, Revision(NOW + 12, v(4).revision))
    assert actions == [Validate(v(4), again=True)]
    st, actions = decide(st, Checked(NOW + 12, v(4)))
    assert actions == [Publish(v(4))]


def test_a_recheck_time_in_the_past_is_ignored() -> None:
    st = _refused(live(v(3)), v(4), recheck_at=NOW - 1)
    assert st.recheck_at is None


def test_an_answer_too_large_to_read_is_not_read_again_while_its_revision_stays() -> None:
    """Known only by its revision (it was never read): refused again at each poll, not downloaded again."""
    big = Content("unread@4", revision="4@x", version=None, readable=False)
    st, actions = decide(live(v(3)), Checked(NOW, big, error=BundleError("too large")))
    assert isinstance(actions[0], Report) and actions[0].first
    st, _ = decide(st, Due(NOW + POLL, NOW + 2 * POLL))
    st, actions = decide(st, Revision(NOW + POLL, "4@x"))
    assert kinds(actions) == [Report, Sleep]
    assert isinstance(actions[0], Report) and not actions[0].first
    assert decide(st, Revision(NOW + POLL, "5@y"))[1] == [Fetch()]


def test_new_content_after_a_refusal_is_validated() -> None:
    st = _refused(live(v(3)), v(4))
    st, actions = decide(st, Read(NOW + 1, v(5)))
    assert actions == [Validate(v(5))]


def test_the_live_bytes_coming_back_end_a_refusal() -> None:
    st = _refused(live(v(3)), v(4))
    st, actions = decide(st, Read(NOW + 1, v(3)))
    assert actions == [Kept(), Sleep(NOW + POLL)]
    assert st.refused is None


def test_a_refused_first_content_leaves_nothing_live() -> None:
    st = _refused(State(synced=False, poll_at=NOW), v(1))
    assert st.live is None and st.refused == v(1)


# ------------------------------------------------------------------------------------------------ KV v1 order


def _nb(days: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(NOW, dt.UTC) + dt.timedelta(days=days)


def test_kv1_an_older_certificate_is_stale() -> None:
    st = live(Content("a"), live_not_before=_nb(-1))
    st, actions = decide(st, Read(NOW, Content("b")))
    assert actions == [Validate(Content("b"))]
    st, actions = decide(st, Checked(NOW, Content("b"), not_before=_nb(-2)))
    assert isinstance(actions[0], Report) and actions[0].what == "stale"


def test_kv1_a_newer_certificate_goes_live() -> None:
    st = live(Content("a"), live_not_before=_nb(-2))
    st, actions = decide(st, Checked(NOW, Content("b"), not_before=_nb(-1)))
    assert actions == [Publish(Content("b"))]


# ------------------------------------------------------------------------------------------------ the table


def _story(events: list[rules.Event]) -> tuple[State, list[list[rules.Action]]]:
    st = State()
    out = []
    for e in events:
        st, actions = decide(st, e)
        out.append(actions)
    return st, out


@pytest.mark.parametrize("lag", range(0, 200, 7))
@pytest.mark.parametrize("versions", [(1, 2), (2, 5), (5, 2), (3, 1), (1, 1)])
def test_any_two_reads_never_publish_older_over_newer(lag: int, versions: tuple[int, int]) -> None:
    """Two reads of one life of the secret (stamps in version order): the second is published only when its
    version is not lower."""
    a, b = versions
    first, second = v(a, NOW - 10_000 + a), v(b, NOW - 10_000 + b)
    st, _ = _story([Due(NOW, NOW + POLL), Read(NOW, first), Checked(NOW, first), Published(NOW, first, True)])
    st, actions = decide(st, Read(NOW + lag, second))
    if b >= a and second.digest != first.digest:
        assert actions == [Validate(second)]
    elif b < a:
        assert isinstance(actions[0], Report) and actions[0].what == "stale"
        assert st.live == first


# ------------------------------------------------------------------------------------------------ next_change


def test_next_change_is_the_first_validity_edge_ahead() -> None:
    """The validator's verdict on a bundle whose ca-cert.pem starts in 12 s may change in 12 s: the worker wakes
    then; a bundle valid now changes next when its first certificate expires."""
    from agent import kinds
    from agent.validate import next_change
    from testbed import pki

    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    root = pki.root_ca()
    soon = pki.intermediate_ca(root, not_before=now + dt.timedelta(seconds=12), not_after=now + dt.timedelta(days=9))
    files = pki.istio_ca_files(root, soon)
    with pytest.raises(BundleError):
        kinds.get("istio-ca").validate(files, now=now)
    assert next_change(files, now) == now + dt.timedelta(seconds=12)
    kinds.get("istio-ca").validate(files, now=now + dt.timedelta(seconds=12))
    later = next_change(files, now + dt.timedelta(seconds=12))
    assert later == now + dt.timedelta(days=9, seconds=1)
    assert next_change({"ca-key.pem": b"junk", "root-cert.pem": b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END "
                        b"CERTIFICATE-----\n"}, now) is None
