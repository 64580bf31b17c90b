#!/usr/bin/env python3
"""Build every release artifact into one directory: wheel, sdist, chart archive, CycloneDX SBOM, SHA256SUMS.

    .venv/bin/python scripts/release_artifacts.py dist/ [--expect-version 0.1.0]

The release workflow (.github/workflows/release.yml) and tests/test_release.py run this same script, so what is
tested is what is published. Nothing is downloaded: the build backend (setuptools, as in requirements-build.lock),
build, twine, cyclonedx-bom and helm-python-sdk (Helm's own Go code for `helm lint --strict` and `helm package`)
come from the environment, as the [release] extra installs them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "istio-vault-agent"
LOCK = ROOT / "requirements.lock"
NAME = "istio-vault-agent"
#: what the sdist is built from: the package and the files pyproject.toml refers to (as in .dockerignore)
SOURCES = ("pyproject.toml", "README.md", "agent")
#: each tool gets this long; the whole run takes a few seconds
STEP_TIMEOUT = 300


class ReleaseError(Exception):
    """A release artifact could not be built or did not pass its check (one sentence: what to fix)."""


def project_version() -> str:
    """[project] version from pyproject.toml."""
    import tomllib

    with (ROOT / "pyproject.toml").open("rb") as f:
        return str(tomllib.load(f)["project"]["version"])


def chart_metadata() -> dict[str, Any]:
    import yaml

    meta: dict[str, Any] = yaml.safe_load((CHART / "Chart.yaml").read_text())
    return meta


def check_versions(expected: str | None) -> str:
    """The package, the agent, the chart and its appVersion carry one version (and the tag's, when given)."""
    version = project_version()
    init = (ROOT / "agent" / "__init__.py").read_text()
    found = re.search(r"""^__version__\s*=\s*["']([^"']+)["']""", init, re.MULTILINE)
    meta = chart_metadata()
    versions = {
        "pyproject.toml [project] version": version,
        "agent/__init__.py __version__": found.group(1) if found else "(none)",
        "Chart.yaml version": str(meta.get("version")),
        "Chart.yaml appVersion": str(meta.get("appVersion")),
    }
    if expected is not None:
        versions["the release tag"] = expected.removeprefix("v")
    if len(set(versions.values())) != 1:
        listed = ", ".join(f"{where} {value}" for where, value in versions.items())
        raise ReleaseError(f"versions differ ({listed}): set them all to the release's version")
    return version


def run(args: list[str], what: str, env: dict[str, str] | None = None) -> str:
    """Run one tool; its output becomes part of the error when it fails."""
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=STEP_TIMEOUT, check=False, env=env)
    except FileNotFoundError as exc:
        raise ReleaseError(f"{what}: {args[0]} is not installed (pip install -e '.[release]')") from exc
    except subprocess.TimeoutExpired as exc:
        raise ReleaseError(f"{what} took longer than {STEP_TIMEOUT}s") from exc
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-20:])
        raise ReleaseError(f"{what} failed (exit {proc.returncode}):\n{tail}")
    return proc.stdout


def python_package(out: Path, version: str) -> list[Path]:
    """Wheel and sdist with `python -m build` (no isolation: no download), then `twine check --strict`."""
    with tempfile.TemporaryDirectory(prefix="release-src-") as scratch:
        # A copy, so building never writes egg-info or build/ into the checkout, and nothing stray gets in.
        src = Path(scratch) / "src"
        src.mkdir()
        for name in SOURCES:
            path = ROOT / name
            if path.is_dir():
                shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                shutil.copy2(path, src / name)
        run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(src)],
            "python -m build (needs setuptools>=77 and build installed)")
    stem = NAME.replace("-", "_") + "-" + version
    built = [out / f"{stem}-py3-none-any.whl", out / f"{stem}.tar.gz"]
    for path in built:
        if not path.is_file():
            raise ReleaseError(f"python -m build did not produce {path.name}")
    run([sys.executable, "-m", "twine", "check", "--strict", *map(str, built)], "twine check --strict")
    return built


def chart_archive(out: Path, version: str) -> Path:
    """`helm lint --strict` (the schema included), then `helm package`, with Helm's own Go code."""
    import helm_python as helm

    report = helm.lint(CHART, strict=True)
    problems = [str(m["error"]).strip() for m in report["messages"] if m["severity"] >= 2] + [
        str(e).strip() for e in report["errors"]
    ]
    if problems:
        raise ReleaseError(f"helm lint --strict {CHART.relative_to(ROOT)} failed: {'; '.join(problems)}")
    if not (CHART / "values.schema.json").is_file():
        raise ReleaseError("the chart has no values.schema.json: a misspelled value would go unnoticed")
    archive = Path(helm.package(CHART, destination=out))
    if archive.name != f"{NAME}-{version}.tgz":
        raise ReleaseError(f"helm package wrote {archive.name}, expected {NAME}-{version}.tgz")
    return archive


_REQUIREMENT = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")
_VIA = re.compile(r"^\s+#\s+(?:via\s+)?([A-Za-z0-9][A-Za-z0-9._-]*)(\s+\(pyproject\.toml\))?\s*$")


def normalized(name: str) -> str:
    """PEP 503 name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def locked(lock: Path = LOCK) -> dict[str, tuple[str, set[str]]]:
    """requirements.lock as {name: (version, the names that require it)}; our own project is NAME."""
    packages: dict[str, tuple[str, set[str]]] = {}
    current: str | None = None
    for line in lock.read_text().splitlines():
        requirement = _REQUIREMENT.match(line)
        if requirement:
            current = normalized(requirement.group(1))
            packages[current] = (requirement.group(2), set())
            continue
        via = _VIA.match(line)
        if via and current is not None and via.group(1) != "via":
            packages[current][1].add(normalized(via.group(1)))
    return packages


def sbom(out: Path, version: str) -> Path:
    """CycloneDX 1.6 JSON of the image's Python packages (requirements.lock) with the lock's dependency graph."""
    from cyclonedx.schema import SchemaVersion
    from cyclonedx.validation.json import JsonStrictValidator

    path = out / f"{NAME}-{version}.cdx.json"
    # cyclonedx-py warns that the root has no dependencies: the graph is added below, from the lock's `# via`,
    # and the result validated once, at the end
    env = {**os.environ, "PYTHONWARNINGS": "ignore::UserWarning"}
    run([sys.executable, "-m", "cyclonedx_py", "requirements", str(LOCK), "--pyproject", str(ROOT / "pyproject.toml"),
         "--of", "JSON", "--sv", "1.6", "--output-reproducible", "--no-validate", "-o", str(path)],
        "cyclonedx-py requirements requirements.lock", env=env)
    bom: dict[str, Any] = json.loads(path.read_text())
    root_ref = bom["metadata"]["component"]["bom-ref"]
    refs = {normalized(c["name"]): c["bom-ref"] for c in bom["components"]}
    packages = locked()
    missing = sorted(set(packages) - set(refs))
    if missing:
        raise ReleaseError(f"the SBOM lacks {', '.join(missing)} from requirements.lock")
    graph: dict[str, set[str]] = {root_ref: set(), **{ref: set() for ref in refs.values()}}
    for name, (_, required_by) in packages.items():
        for parent in required_by:
            graph[root_ref if parent == NAME else refs[parent]].add(refs[name])
    bom["dependencies"] = [{"ref": ref, "dependsOn": sorted(deps)} for ref, deps in sorted(graph.items())]
    text = json.dumps(bom, indent=2, sort_keys=True) + "\n"
    error = JsonStrictValidator(SchemaVersion.V1_6).validate_str(text)
    if error is not None:
        raise ReleaseError(f"the SBOM does not match the CycloneDX 1.6 schema: {error}")
    path.write_text(text)
    return path


def checksums(out: Path, artifacts: list[Path]) -> Path:
    """SHA256SUMS in `sha256sum -c` format."""
    lines = [f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.name}\n" for p in sorted(artifacts)]
    path = out / "SHA256SUMS"
    path.write_text("".join(lines))
    return path


def build_all(out: Path, expected_version: str | None = None) -> list[Path]:
    """Every artifact into `out` (created; must hold no artifacts of another build)."""
    version = check_versions(expected_version)
    out.mkdir(parents=True, exist_ok=True)
    if any(out.iterdir()):
        raise ReleaseError(f"{out} is not empty: give an empty or new directory")
    artifacts = [*python_package(out, version), chart_archive(out, version), sbom(out, version)]
    return [*artifacts, checksums(out, artifacts)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("outdir", type=Path, help="where the artifacts go (empty or new)")
    parser.add_argument("--expect-version", help="fail unless every version is this one (the tag, v prefix allowed)")
    args = parser.parse_args(argv)
    try:
        artifacts = build_all(args.outdir.resolve(), args.expect_version)
    except ReleaseError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for path in artifacts:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
