"""The Source interface: what a bundle's data source must do, and the `Fetched` result it returns.

Sources are async: their Vault requests go through the agent's Vault session (agent.vault), bounded and
cancellable, side by side with other bundles'; CPU or disk work inside them runs in `asyncio.to_thread`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

__all__ = ["Fetched", "Source", "digest"]


def digest(files: Mapping[str, bytes]) -> str:
    """A stable sha256 over the file names and bytes, to see whether content changed (never logged raw)."""
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(name.encode() + b"\0" + files[name] + b"\0")
    return h.hexdigest()


@dataclass(frozen=True)
class Fetched:
    """What one read returned: output file -> bytes, and how to recognise this content again.

    `revision` is what the source's `revision()` probe says of this content (KV v2: `version@created_time`),
    None when the source has no cheap probe. `version` and `created_at` (Unix seconds) are the backend's
    version number and its creation time, when it has them: a lower version that is not newer is a stale read.

    `renewed` is for sources that make their content and renew it (PKI): True when this content replaces
    content that was due for renewal, False for a first or reused issuance; None (the default) for sources that
    only read (KV). The worker counts renewals it publishes (istio_vault_agent_renewals_total).
    """

    files: dict[str, bytes]
    digest: str
    revision: str | None = None
    version: int | None = None
    created_at: float | None = None
    renewed: bool | None = None

    def __repr__(self) -> str:  # the files hold a private key
        return f"Fetched(files={sorted(self.files)}, version={self.version}, digest={self.digest[:12]})"


class Source(Protocol):
    """One bundle's data source. `fetch` and `revision` raise AgentErrors only (VaultUnavailable: retry)."""

    async def fetch(self) -> Fetched:
        """Read the bundle's files now."""
        ...

    async def revision(self) -> str | None:
        """The current revision by a cheap probe without reading secret bytes (compared with Fetched.revision).

        None when the source cannot tell (no probe, or the probe is not allowed): the worker then fetches.
        """
        ...

    def next_check(self, last: Fetched | None, now: float) -> float:
        """When (a time.time() value) the worker should look again after a good cycle that ended at `now`.

        A source that renews what it returns says here when renewal is due, so the worker wakes up for it.
        """
        ...

    def reset(self) -> None:
        """Forget what was learnt of the backend (a new login may face a restarted or restored Vault).

        A source keeps content it made itself (a key it generated): the worker calls `fetch` after every new
        login, and `fetch` returns that content again without a new issuance while nothing is due.
        """
        ...
