"""The three clock cases of issue 19, end to end against a real OpenBao: a rotation whose notBefore is a few seconds
ahead of the agent's clock goes live once it is valid; a version stamped in 2999 never rolls the CA back; and a
secret recreated after such a stamp is still picked up.

KV v2 stamps `created_time` with the server's clock, so the stamps of the last two cases are written by a loopback
proxy in front of OpenBao, as a Vault node with a wrong clock (or a restored backup) would answer.
"""

from __future__ import annotations

import datetime as dt
import json
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from testbed import pki
from testbed.bao import BaoServer
from tests.faultkit import Answer, HTTPProxy
from tests.support import AgentProc, KV2Layout, agent_config, live_files, wait_until, write_config

LAYOUT = KV2Layout()
DATA = f"/v1/{LAYOUT.kv_mount}/data/{LAYOUT.secret_path}"
META = f"/v1/{LAYOUT.kv_mount}/metadata/{LAYOUT.secret_path}"
FUTURE = "2999-01-01T00:00:00.000000000Z"


@dataclass
class World:
    server: BaoServer
    proxy: HTTPProxy
    token: Path
    tmp: Path
    root: pki.CertKey

    @property
    def out(self) -> Path:
        return self.tmp / "out"

    def bundle(self, cn: str, **kw: Any) -> dict[str, bytes]:
        return pki.istio_ca_files(self.root, pki.intermediate_ca(self.root, cn=cn, **kw))

    def write(self, files: dict[str, bytes]) -> int:
        return LAYOUT.write(self.server.client(), files)

    def agent(self, poll: str) -> AgentProc:
        cfg = agent_config(address=self.proxy.address, token_path=self.token, out=self.out, kv=LAYOUT.kv,
                           mount=LAYOUT.auth_mount, poll=poll, timeout="2s")
        return AgentProc(write_config(self.tmp / "agent.yaml", cfg), self.tmp / "agent.log").start()


@pytest.fixture(name="world")
def fixture_world(tmp_path, bao_factory, kube, sa_token_file) -> Iterator[World]:
    server = bao_factory()
    root = pki.root_ca()
    first = pki.istio_ca_files(root, pki.intermediate_ca(root, cn="Intermediate CA 0"))
    LAYOUT.setup(server.client(), kube, first)
    proxy = HTTPProxy(server.port)
    world = World(server, proxy, sa_token_file("istio-system", "istiod"), tmp_path, root)
    try:
        yield world
    finally:
        proxy.close()


def _restamp(body: bytes, stamp: str, version: int | None = None) -> Answer:
    """A KV v2 data or metadata answer with every created_time (and, for data, the version) rewritten."""
    doc = json.loads(body)
    data = doc.get("data") or {}
    if "metadata" in data:
        data["metadata"]["created_time"] = stamp
        if version is not None:
            data["metadata"]["version"] = version
    for entry in (data.get("versions") or {}).values():
        entry["created_time"] = stamp
    if "current_version" in data and version is not None:
        data["versions"] = {str(version): {"created_time": stamp, "deletion_time": "", "destroyed": False}}
        data["current_version"] = version
    return Answer(200, json.dumps(doc).encode())


def _stamp(seconds_from_now: float) -> str:
    when = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=seconds_from_now)
    return when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def test_a_rotation_not_yet_valid_goes_live_when_its_notbefore_passes(world):
    """A freshly minted intermediate whose notBefore is 5 s ahead of the node's clock is refused once, then
    published when it becomes valid: no new KV version, no wait for the next poll (60 s here)."""
    agent = world.agent("60s")
    try:
        agent.wait_event("bundle_published")
        now = dt.datetime.now(dt.UTC).replace(microsecond=0)
        soon = world.bundle("Intermediate CA 1", not_before=now + dt.timedelta(seconds=5))
        world.write(soon)
        agent.proc.send_signal(signal.SIGHUP)  # look now rather than in 60 s
        agent.wait_event("bundle_refused", timeout=5)
        assert live_files(world.out) != soon
        assert wait_until(lambda: live_files(world.out) == soon, 12), agent.tail()
        assert time.time() - now.timestamp() < 12
        assert len(agent.events("bundle_refused")) == 1, "the same refusal is reported once"
    finally:
        agent.stop()


def test_a_version_stamped_in_the_future_never_rolls_the_ca_back(world):
    """Version 3 is live; a node answers with version 1 stamped 2999 (a wrong clock, an old backup): the agent keeps
    version 3 and reports a stale read instead of publishing version 1 over it."""
    second, third = world.bundle("Intermediate CA 1"), world.bundle("Intermediate CA 2")
    first_answer: dict[str, bytes] = {}
    world.proxy.mutate = lambda m, p, s, b: first_answer.setdefault(p, b) and None
    agent = world.agent("500ms")
    try:
        agent.wait_event("bundle_published")
        old_data = first_answer[DATA]
        world.write(second)
        world.write(third)
        assert wait_until(lambda: live_files(world.out) == third, 5), agent.tail()

        def lagging(method: str, path: str, status: int, body: bytes) -> Answer | None:
            if path.startswith(DATA):
                return _restamp(old_data, FUTURE, 1)
            if path.startswith(META):
                return _restamp(body, FUTURE, 1)
            return None

        world.proxy.mutate = lagging
        agent.wait_event("stale_read", timeout=5)
        time.sleep(2)  # four more polls
        assert live_files(world.out) == third, "version 1 stamped in 2999 was published over version 3"
    finally:
        agent.stop()


def test_a_secret_recreated_after_a_future_stamp_is_picked_up(world):
    """The live version was stamped in 2999; the secret is then deleted and recreated (version numbers restart) by
    a Vault whose clock runs a minute ahead: the recreated secret goes live, not `stale_read` for ever."""
    world.write(world.bundle("Intermediate CA 1"))
    world.write(world.bundle("Intermediate CA 2"))  # version 3

    def future(method: str, path: str, status: int, body: bytes) -> Answer | None:
        return _restamp(body, FUTURE) if path.startswith((DATA, META)) and status == 200 else None

    world.proxy.mutate = future
    agent = world.agent("500ms")
    try:
        agent.wait_event("bundle_published")
        client = world.server.client()
        client.secrets.kv.v2.delete_metadata_and_all_versions(path=LAYOUT.secret_path, mount_point=LAYOUT.kv_mount)
        recreated = world.bundle("Intermediate CA recreated")
        assert world.write(recreated) == 1
        ahead = _stamp(61)  # the recreating node's clock: 61 s ahead, within what the agent believes

        def recreated_stamp(method: str, path: str, status: int, body: bytes) -> Answer | None:
            return _restamp(body, ahead) if path.startswith((DATA, META)) and status == 200 else None

        world.proxy.mutate = recreated_stamp
        assert wait_until(lambda: live_files(world.out) == recreated, 6), agent.tail()
    finally:
        agent.stop()
