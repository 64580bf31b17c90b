"""The rules of one bundle worker, as a pure function: `decide(state, event) -> (state, actions)`.

No I/O, no clock, no randomness: the worker (worker.py) performs the actions (probe Vault, read, validate, publish,
report, sleep) and feeds their results back as events, each carrying the time it happened. Everything a worker
must get right about *which* content goes live and *when* it looks again is decided here, and unit-tested in
tests/test_rules.py without a Vault.

The rules:
- A revision probe (KV v2 metadata) that matches what was last seen costs no read; a changed or unknown revision
  is read in full. A resync (SIGHUP, a new bundle) reads in full once.
- Never older over newer. Within one secret's life the KV v2 version number is the order. A lower version is a
  stale read (a node that lags behind), unless the secret was recreated: its created_time is newer than the live
  one's, and neither stamp is trusted past the agent's clock plus `SKEW` (a version stamped in 2999 never wins over
  a newer version, and after it, a recreated secret is still taken as soon as its own stamp passes the live one's
  first sighting). Without versions (KV v1) "older" is the certificate's notBefore.
- A refused content is never read again while the backend's revision says it is unchanged; its verdict may depend
  on the time, so it is validated again (the same bytes, not read again) at each poll, and at the moment its
  verdict may change (`Checked.recheck_at`, e.g. a notBefore still ahead of the clock) when that comes first.
- The same refusal, stale read or failure is reported once (`Report.first`), counted every time.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from agent.errors import AgentError

__all__ = [
    "SKEW",
    "Checked",
    "Content",
    "Due",
    "Fetch",
    "Kept",
    "Probe",
    "Publish",
    "Published",
    "Read",
    "Report",
    "Resync",
    "Revision",
    "Sleep",
    "State",
    "Validate",
    "decide",
    "order",
]

#: how far past the agent's clock a backend's timestamp (KV v2 created_time) is still believed
SKEW = 60.0


# ---------------------------------------------------------------------------------------------------- content


@dataclass(frozen=True)
class Content:
    """One read of the bundle's data, as the rules see it; `files` travel along, never looked at here.

    `revision` is what the source's probe reports for this content (None: the source has no probe); `version` and
    `created_at` (Unix seconds) are the backend's version number and creation time, when it has them.
    """

    digest: str
    revision: str | None = None
    version: int | None = None
    created_at: float | None = None
    files: Mapping[str, bytes] = field(default_factory=dict, compare=False, repr=False)
    #: False for content known only by its revision, never read (an answer over the size cap): it cannot be
    #: validated again, only refused again while the revision stays
    readable: bool = True
    #: for sources that issue what they return (PKI): whether this replaces content due for renewal (metrics)
    renewed: bool | None = field(default=None, compare=False)


# ---------------------------------------------------------------------------------------------------- state


@dataclass(frozen=True)
class State:
    """What one worker knows of its bundle between events."""

    #: the content that is published, and when it was first seen live (caps how far its created_at is trusted)
    live: Content | None = None
    live_since: float | None = None
    #: notBefore of the live certificate (ca-cert.pem / tls.crt): the order of backends without versions
    live_not_before: dt.datetime | None = None
    #: the newest content seen that is not live because it was refused, and why
    refused: Content | None = None
    refused_error: AgentError | None = None
    #: when the refusal may change (a time-dependent verdict); None: only new content changes it
    recheck_at: float | None = None
    #: a full read was made since start or the last resync (a probe alone is trusted only after one)
    synced: bool = False
    #: when the next regular look is due (set by every `Due`)
    poll_at: float = 0.0
    #: what was last reported once, so the same thing is not reported again
    reported: str | None = None

    @property
    def seen(self) -> Content | None:
        """The newest content seen: the refused one, else the live one."""
        return self.refused or self.live


# ---------------------------------------------------------------------------------------------------- events


@dataclass(frozen=True)
class Due:
    """The worker's timer fired (or the worker started): a regular look. `poll_at` is when the next one is due."""

    now: float
    poll_at: float


@dataclass(frozen=True)
class Resync:
    """Read in full now (SIGHUP, or a new login that may face a restored Vault)."""

    now: float
    poll_at: float


@dataclass(frozen=True)
class Revision:
    """The source's probe answered: the current revision, None when it cannot tell."""

    now: float
    revision: str | None


@dataclass(frozen=True)
class Read:
    """A full read returned `content`."""

    now: float
    content: Content


@dataclass(frozen=True)
class Checked:
    """The validator's verdict on `content`: `error` None when it passes. `not_before` is the certificate's
    notBefore (for the order without versions); `recheck_at` when a refusal may change with time (None: never)."""

    now: float
    content: Content
    error: AgentError | None = None
    not_before: dt.datetime | None = None
    recheck_at: float | None = None


@dataclass(frozen=True)
class Published:
    """`content` is live (`changed` False: what was published already held these bytes)."""

    now: float
    content: Content
    changed: bool
    not_before: dt.datetime | None = None


Event = Due | Resync | Revision | Read | Checked | Published


# ---------------------------------------------------------------------------------------------------- actions


@dataclass(frozen=True)
class Probe:
    """Ask the source for its current revision (cheap: no secret bytes)."""


@dataclass(frozen=True)
class Fetch:
    """Read the bundle in full."""


@dataclass(frozen=True)
class Validate:
    """Validate `content` (again, without reading it again, when `again`)."""

    content: Content
    again: bool = False


@dataclass(frozen=True)
class Publish:
    """Publish `content`, which passed validation."""

    content: Content


@dataclass(frozen=True)
class Kept:
    """Nothing new: what is published stays (the worker checks it was not tampered with)."""


@dataclass(frozen=True)
class Report:
    """Tell the user: `what` is "refused", "stale" or "recreated"; `first` when not reported before."""

    what: str
    message: str
    first: bool
    error: AgentError | None = None


@dataclass(frozen=True)
class Sleep:
    """Nothing more to do until `until` (a time on the events' clock)."""

    until: float


Action = Probe | Fetch | Validate | Publish | Kept | Report | Sleep


# ---------------------------------------------------------------------------------------------------- order


def _trusted(stamp: float | None, now: float) -> float | None:
    """A backend timestamp, unless it lies further ahead of the agent's clock than `SKEW`."""
    return stamp if stamp is not None and stamp <= now + SKEW else None


def order(live: Content | None, live_since: float | None, new: Content, now: float) -> str:
    """How `new` compares with the live content: "newer" (may go live) or "stale" (never published over the live
    one). Only versioned content is ordered here; the rest is "newer" (see `_older_by_date`)."""
    if live is None or new.version is None or live.version is None:
        return "newer"
    if new.version >= live.version:
        return "newer"
    return "newer" if _recreated(live, live_since, new, now) else "stale"


def _recreated(live: Content, live_since: float | None, new: Content, now: float) -> bool:
    """`new` starts a new life of the secret: its own stamp is believable and later than the live one's.

    The live stamp counts for no more than the moment the live content was first seen plus `SKEW`, so a live
    version stamped in the future does not hold off a real recreation for ever.
    """
    created = _trusted(new.created_at, now)
    if created is None:
        return False
    live_created = live.created_at
    if live_created is None:
        return False
    if live_since is not None:
        live_created = min(live_created, live_since + SKEW)
    return created > live_created


def _older_by_date(st: State, not_before: dt.datetime | None, content: Content) -> bool:
    """Without versions: a certificate issued before the live one is an older bundle written back (or a node
    that lags behind)."""
    return (
        content.version is None and st.live is not None and st.live_not_before is not None
        and not_before is not None and not_before < st.live_not_before
    )


# ---------------------------------------------------------------------------------------------------- decide


def _next(st: State) -> Sleep:
    """Sleep until the next regular look, or until a time-dependent refusal may change, whichever is first."""
    until = st.poll_at
    if st.refused is not None and st.recheck_at is not None:
        until = min(until, st.recheck_at)
    return Sleep(until)


def _report(st: State, what: str, message: str, error: AgentError | None = None) -> tuple[State, Report]:
    key = f"{what}:{message}"
    return replace(st, reported=key), Report(what, message, first=st.reported != key, error=error)


def decide(st: State, event: Event) -> tuple[State, list[Action]]:
    """The next state and what to do, for `event` in state `st`."""
    if isinstance(event, Resync):
        return replace(st, synced=False, poll_at=event.poll_at), [Fetch()]
    if isinstance(event, Due):
        st = replace(st, poll_at=event.poll_at)
        seen = st.seen
        if not st.synced or seen is None or seen.revision is None:
            return st, [Fetch()]
        return st, [Probe()]
    if isinstance(event, Revision):
        seen = st.seen
        if event.revision is None or seen is None or event.revision != seen.revision:
            return st, [Fetch()]
        return _unchanged(st)
    if isinstance(event, Read):
        return _read(st, event)
    if isinstance(event, Checked):
        return _checked(st, event)
    # Published
    st = replace(
        st, live=event.content, live_since=st.live_since if not event.changed and st.live else event.now,
        live_not_before=event.not_before or st.live_not_before, refused=None, refused_error=None, recheck_at=None,
        synced=True, reported=None,
    )
    return st, [_next(st)]


def _unchanged(st: State) -> tuple[State, list[Action]]:
    """The backend still holds what was seen last."""
    refused = st.refused
    if refused is not None:
        if not refused.readable:
            st, report = _report(st, "refused", str(st.refused_error), st.refused_error)
            return st, [report, _next(st)]
        # a verdict may depend on the time (a notBefore still ahead): the same bytes are validated again, not read
        return st, [Validate(refused, again=True)]
    return st, [Kept(), _next(st)]


def _read(st: State, event: Read) -> tuple[State, list[Action]]:
    new = event.content
    st = replace(st, synced=True)
    verdict = order(st.live, st.live_since, new, event.now)
    if verdict == "stale":
        assert st.live is not None
        st, report = _report(
            st, "stale",
            f"Vault answered version {new.version} while version {st.live.version} is live: a node that lags"
            f" behind (or a version stamped ahead of the clock); keeping version {st.live.version} and reading again",
        )
        return st, [report, _next(st)]
    if st.live is not None and new.digest == st.live.digest:
        # the live bytes again (perhaps under a new revision): nothing to publish; a refusal seen since is over
        st = replace(st, live=new, refused=None, refused_error=None, recheck_at=None, reported=None)
        return st, [Kept(), _next(st)]
    if st.refused is not None and new.digest == st.refused.digest:
        st = replace(st, refused=new)
        return _unchanged(st)
    return st, [Validate(new)]


def _checked(st: State, event: Checked) -> tuple[State, list[Action]]:
    content = event.content
    if event.error is not None:
        recheck = event.recheck_at if event.recheck_at is not None and event.recheck_at > event.now else None
        st = replace(st, refused=content, refused_error=event.error, recheck_at=recheck)
        st, report = _report(st, "refused", str(event.error), event.error)
        return st, [report, _next(st)]
    if _older_by_date(st, event.not_before, content):
        assert st.live_not_before is not None and event.not_before is not None
        st, report = _report(
            st, "stale",
            f"Vault answered with a certificate issued at {event.not_before:%Y-%m-%dT%H:%M:%SZ}, before the live"
            f" one ({st.live_not_before:%Y-%m-%dT%H:%M:%SZ}): a node that lags behind, or an older certificate"
            " written back; keeping the live bundle (to roll back on purpose, issue the certificate anew)",
        )
        return st, [report, _next(st)]
    return st, [Publish(content)]
