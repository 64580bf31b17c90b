"""Hostile or mistaken setups the agent refuses cleanly, the same way in both modes: directories that alias,
nest or point into a generation; umask 000; debris at reserved names; NUL and huge config values; outside text
that tries to fake an error line; and a process that never dumps core with a key in memory."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from agent import config, hardening
from agent.errors import ConfigError
from testbed import pki
from tests.support import (
    ROOT,
    AgentProc,
    KV2Layout,
    agent_config,
    cli_env,
    error_line,
    live_files,
    run_cli,
    write_config,
)


@pytest.fixture(name="layout")
def fixture_layout(vault_admin, kube, unique) -> KV2Layout:
    """A KV v2 layout of this test's own on the shared server, holding one good bundle."""
    root = pki.root_ca()
    return KV2Layout.unique(unique).setup(vault_admin, kube, pki.istio_ca_files(root, pki.intermediate_ca(root)))


def _cfg(tmp_path: Path, bao, token: Path, layout: KV2Layout, dirs: list[Path | str], **kw: Any) -> Path:
    cfg = agent_config(address=bao.address, token_path=token, out=Path(dirs[0]), kv=layout.kv,
                       mount=layout.auth_mount, init_timeout="3s", **kw)
    first = cfg["bundles"][0]
    cfg["bundles"] = [{**first, "name": f"b{i}", "dir": str(d)} for i, d in enumerate(dirs)]
    return write_config(tmp_path / "agent.yaml", cfg)


def _both_modes(cfg: Path) -> tuple[str, str]:
    """The error line of an init run and of a sidecar run of `cfg` (each must exit 1 with one line)."""
    init = run_cli("run", "--config", str(cfg), "--mode", "init")
    sidecar = run_cli("run", "--config", str(cfg), "--mode", "sidecar", timeout=30)
    assert init.returncode == 1 and sidecar.returncode == 1, (init.stderr, sidecar.stderr)
    return error_line(init), error_line(sidecar)


class TestBundleDirs:
    def test_a_symlink_alias_of_another_bundle_dir(self, tmp_path, bao, sa_token_file, layout):
        """Two bundle dirs that are one directory through a symlink are refused before anything is written."""
        real = tmp_path / "ca"
        real.mkdir()
        (tmp_path / "alias").symlink_to(real)
        cfg = _cfg(tmp_path, bao, sa_token_file(), layout, [real, tmp_path / "alias"])
        init, sidecar = _both_modes(cfg)
        assert init == sidecar
        assert "bundles[1].dir" in init and "bundles[0].dir" in init and "same directory" in init
        assert not any(real.iterdir())

    @pytest.mark.parametrize("inner", ["..data", "..2026_12_02_10_00_00.abcd1234", "sub"])
    def test_a_dir_inside_another_bundle_or_its_generation(self, tmp_path, bao, sa_token_file, layout, inner):
        """A bundle dir inside another's dir, or inside its `..data` generation, is refused, naming both keys."""
        outer = tmp_path / "ca"
        cfg = _cfg(tmp_path, bao, sa_token_file(), layout, [outer, outer / inner])
        init, sidecar = _both_modes(cfg)
        assert init == sidecar
        assert "bundles[1].dir" in init and ("inside bundles[0].dir" in init or "generation" in init)

    def test_a_dir_through_a_symlink_into_a_generation(self, tmp_path, bao, sa_token_file, layout):
        """A bundle dir that is a symlink into another bundle's live generation is refused by its real path."""
        outer = tmp_path / "ca"
        token = sa_token_file()
        assert run_cli("run", "--config", str(_cfg(tmp_path, bao, token, layout, [outer]))).returncode == 0
        (tmp_path / "sneaky").symlink_to(outer / "..data")
        init, _ = _both_modes(_cfg(tmp_path, bao, token, layout, [tmp_path / "sneaky"]))
        assert "generation" in init

    @pytest.mark.parametrize("where", ["/", "/etc", "/tmp"])
    def test_system_directories(self, tmp_path, bao, sa_token_file, layout, where):
        """`/`, `/etc` and the like are never a bundle dir."""
        init, sidecar = _both_modes(_cfg(tmp_path, bao, sa_token_file(), layout, [where]))
        assert init == sidecar and "system directory" in init

    def test_a_file_or_a_dangling_symlink(self, tmp_path, bao, sa_token_file, layout):
        """A dir that is a regular file or a symlink to nothing gets the same one sentence in both modes."""
        token = sa_token_file()
        (tmp_path / "file").write_text("x")
        (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
        for target, needle in ((tmp_path / "file", "not a directory"), (tmp_path / "dangling", "symlink to nothing")):
            init, sidecar = _both_modes(_cfg(tmp_path, bao, token, layout, [target]))
            assert init == sidecar and needle in init
        assert not (tmp_path / "nowhere").exists()

    def test_umask_000_still_gives_0755_directories(self, tmp_path, bao, sa_token_file, layout):
        """Under umask 000 every directory the agent creates (parents, the dir, the generation) is 0755, so no
        other local user can plant a `..data` of their own; files keep their explicit modes."""
        out = tmp_path / "a" / "b" / "ca"
        launcher = "import os, sys; os.umask(0); os.execv(sys.argv[1], sys.argv[1:])"
        proc = subprocess.run(
            [sys.executable, "-c", launcher, sys.executable, "-m", "agent.cli", "run", "--config",
             str(_cfg(tmp_path, bao, sa_token_file(), layout, [out]))],
            cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=60, check=False,
        )
        assert proc.returncode == 0, proc.stderr
        generation = out / os.readlink(out / "..data")
        for d in (tmp_path / "a", tmp_path / "a" / "b", out, generation):
            assert stat.S_IMODE(d.stat().st_mode) == 0o755, d
        assert stat.S_IMODE((generation / "ca-key.pem").stat().st_mode) == 0o600
        assert stat.S_IMODE((generation / "ca-cert.pem").stat().st_mode) == 0o644

    def test_a_stray_data_tmp_directory_is_cleaned(self, tmp_path, bao, sa_token_file, layout):
        """A directory left at the reserved name `..data_tmp` (or `..tmp_<file>`) no longer blocks publishing."""
        out = tmp_path / "ca"
        (out / "..data_tmp" / "junk").mkdir(parents=True)
        (out / "..tmp_ca-cert.pem").mkdir()
        proc = run_cli("run", "--config", str(_cfg(tmp_path, bao, sa_token_file(), layout, [out])))
        assert proc.returncode == 0, proc.stderr
        assert live_files(out)["ca-cert.pem"].startswith(b"-----BEGIN CERTIFICATE")
        assert not (out / "..data_tmp").exists() and not (out / "..tmp_ca-cert.pem").exists()


class TestConfigValues:
    @pytest.mark.parametrize("key", ["dir", "token_path"])
    def test_nul_is_refused(self, tmp_path, key):
        """A NUL in a path is one config error naming the key, not `internal error (ValueError)`."""
        raw: dict[str, Any] = {"vault": {"address": "http://v"}, "auth": {"mount": "k", "role": "r"},
                               "bundles": [{"name": "a", "dir": "/var/x", "source": {"kv": "s/a"}}]}
        if key == "dir":
            raw["bundles"][0]["dir"] = "/var/x\0y"
        else:
            raw["auth"]["token_path"] = "/var/run/t\0ok"
        with pytest.raises(ConfigError, match="must not contain a NUL character"):
            config.from_mapping(raw, env={})
        path = tmp_path / "nul.yaml"
        path.write_text('vault: {address: "http://v"}\nauth: {mount: k, role: r, token_path: "/t\\0"}\n'
                        'bundles: [{name: a, dir: /var/x, source: {kv: s/a}}]\n')
        line = error_line(run_cli("run", "--config", str(path)))
        assert "auth.token_path must not contain a NUL character" in line

    def test_a_megabyte_vault_address_is_not_echoed(self, tmp_path):
        """A 1 MB vault.address is refused in one short line, not echoed whole."""
        path = tmp_path / "big.yaml"
        path.write_text(f'vault: {{address: "http://{"a" * 1_000_000}"}}\nauth: {{mount: k, role: r}}\n'
                        f'bundles: [{{name: a, dir: /var/x, source: {{kv: s/a}}}}]\n')
        line = error_line(run_cli("run", "--config", str(path)))
        assert "vault.address is 1000007 characters long" in line and len(line) < 300


class TestOutsideText:
    def test_a_hostile_certificate_name_cannot_fake_an_error_line(self, tmp_path, bao, vault_admin, sa_token_file,
                                                                  layout):
        """A CN of "Evil\\nerror: bundle is fine\\x1b[2J" in a refused bundle gives one `error:` line with the
        newline and the escape shown as \\x0a and \\x1b, nothing raw."""
        import datetime as dt

        root = pki.root_ca()
        now = dt.datetime.now(dt.UTC)
        evil = pki.intermediate_ca(root, cn="Evil\nerror: bundle is fine\x1b[2J",
                                   not_before=now - dt.timedelta(days=10), not_after=now - dt.timedelta(days=1))
        layout.write(vault_admin, pki.istio_ca_files(root, evil))
        proc = run_cli("run", "--config", str(_cfg(tmp_path, bao, sa_token_file(), layout, [tmp_path / "ca"])))
        assert proc.returncode == 1
        lines = [ln for ln in proc.stderr.splitlines() if "error:" in ln and not ln.startswith("{")]
        assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
        assert "\x1b" not in proc.stderr and "Evil\\x0aerror: bundle is fine\\x1b[2J" in lines[0]

    def test_a_huge_pem_label_is_cut(self, tmp_path):
        """A 200 KB PEM label in a checked file is echoed as at most 200 characters and a marker."""
        out = tmp_path / "ca"
        out.mkdir()
        root = pki.root_ca()
        files = pki.istio_ca_files(root, pki.intermediate_ca(root))
        label = "X" * 200_000
        files["ca-key.pem"] = f"-----BEGIN {label}-----\nAAAA\n-----END {label}-----\n".encode()
        for name, data in files.items():
            (out / name).write_bytes(data)
        line = error_line(run_cli("check", str(out)))
        assert len(line) < 1000 and "...[+" in line, line[:300]


class TestHardening:
    def test_not_dumpable_and_no_core_limit(self):
        """After hardening the process cannot dump core (RLIMIT_CORE 0) and is not dumpable (no ptrace by the
        same uid, /proc/PID/mem closed)."""
        code = ("import resource; from agent import hardening; hardening.apply();"
                " print(hardening.dumpable(), resource.getrlimit(resource.RLIMIT_CORE))")
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
        assert out.stdout.split(maxsplit=1) == ["0", "(0, 0)\n"]
        assert hardening.dumpable() != 0  # the test process itself is untouched

    def test_a_running_sidecar_has_core_dumps_off(self, tmp_path, bao, sa_token_file, layout):
        """The real sidecar runs with a core file size limit of 0."""
        agent = AgentProc(_cfg(tmp_path, bao, sa_token_file(), layout, [tmp_path / "ca"]), mode="sidecar").start()
        try:
            agent.wait_event("sidecar_ready")
            assert agent.proc is not None
            limits = Path(f"/proc/{agent.proc.pid}/limits").read_text()
        finally:
            agent.stop()
        core = next(line for line in limits.splitlines() if line.startswith("Max core file size"))
        assert core.split()[4:6] == ["0", "0"], core
