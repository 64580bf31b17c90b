"""The Markdown the project ships renders as written (no fence swallowing prose, no dead anchors or file links), and
the README's install commands give each agent what it needs to log in (Vault's CA, the role `setup vault` made)."""

from __future__ import annotations

import itertools
import re
import shlex
import subprocess
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from markdown_it import MarkdownIt
from markdown_it.token import Token

from agent.clusters import ClusterLayout
from tests.support import ROOT

EXAMPLES = ROOT / "charts" / "istio-vault-agent" / "examples"


def markdown_files() -> list[Path]:
    """Every Markdown file git tracks in the checkout (README.md, bench/RESULTS.md, docs/ when there is one)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", "*.md"],
        cwd=ROOT, capture_output=True, text=True, check=False, timeout=30,
    )
    found = [ROOT / p for p in listed.stdout.split("\0") if p] if listed.returncode == 0 else []
    return sorted(p for p in found if p.is_file()) or [ROOT / "README.md"]


def parse(text: str) -> list[Token]:
    """The token stream GitHub's renderer would build (CommonMark plus tables)."""
    return MarkdownIt("commonmark").enable("table").parse(text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation other than '-' and '_' dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(tokens: list[Token]) -> set[str]:
    """The `#fragment`s a file offers: heading slugs (repeats get -1, -2, ... as on GitHub) and HTML ids."""
    seen: dict[str, int] = {}
    found: set[str] = set()
    for i, tok in enumerate(tokens):
        if tok.type == "heading_open":
            inline = tokens[i + 1]
            text = "".join(c.content for c in inline.children or [] if c.type in {"text", "code_inline"})
            base = slug(text)
            n = seen.get(base, 0)
            seen[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
        if tok.type in {"html_block", "html_inline", "inline"}:
            found.update(re.findall(r"""<a\s[^>]*(?:id|name)=["']([^"']+)["']""", tok.content))
    return found


def links(tokens: list[Token]) -> Iterator[tuple[int, str]]:
    """(line, href) of every link outside code, inline and reference style alike."""
    for tok in tokens:
        if tok.type != "inline":
            continue
        line = (tok.map[0] + 1) if tok.map else 0
        for child in tok.children or []:
            if child.type == "link_open":
                yield line, str(child.attrGet("href") or "")


def text_of(path: Path) -> str:
    return path.read_text(encoding="utf-8")


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
class TestMarkdown:
    def test_every_code_block_is_closed_where_it_should_be(self, path: Path) -> None:
        """No fence runs on into prose: a closing fence with text after it (``` The ...) does not close the
        block in CommonMark, so everything up to the next fence would render as code; nor may a block stay open
        to the end of the file."""
        text = text_of(path)
        lines = text.splitlines()
        problems = []
        for tok in parse(text):
            if tok.type != "fence" or not tok.map:
                continue
            start, end = tok.map
            fence = tok.markup
            for n, line in enumerate(tok.content.splitlines(), start=start + 2):
                if line.lstrip().startswith(fence[0] * 3):
                    problems.append(f"line {n}: a fence line inside a code block: {line[:60]!r}")
            last = lines[end - 1].strip() if end - 1 < len(lines) else ""
            if end - start < 2 or not last.startswith(fence):
                problems.append(f"line {start + 1}: the code block opened here is never closed")
        assert problems == []

    def test_every_link_points_at_something_that_exists(self, path: Path) -> None:
        """Each `#anchor` names a heading of the file it points into, and each relative link a file of the
        checkout, so no link in the rendered page leads nowhere."""
        own = anchors(parse(text_of(path)))
        dead = []
        for line, href in links(parse(text_of(path))):
            parts = urlsplit(href)
            if parts.scheme or parts.netloc:
                continue
            target = (path.parent / unquote(parts.path)).resolve() if parts.path else path
            if not target.exists():
                dead.append(f"line {line}: {href} (no file {parts.path})")
                continue
            if parts.fragment and target.suffix == ".md":
                offered = own if target == path else anchors(parse(text_of(target)))
                if unquote(parts.fragment) not in offered:
                    dead.append(f"line {line}: {href} (no heading with that anchor)")
        assert dead == []


def helm_commands(text: str) -> Iterator[tuple[str, list[str]]]:
    """(first line, words) of every `helm install|upgrade ... charts/istio-vault-agent` command in text, its `\\`
    continuation lines joined; `# ` comment prefixes (as in the example values' headers) are taken off first."""
    lines = [re.sub(r"^#\s?", "", line).strip() for line in text.splitlines()]
    i = 0
    while i < len(lines):
        command = lines[i]
        first = command
        while command.endswith("\\") and i + 1 < len(lines):
            i += 1
            command = command[:-1] + " " + lines[i]
        i += 1
        if not first.startswith("helm "):
            continue
        words = shlex.split(command.split(" # ")[0], posix=True)
        if "charts/istio-vault-agent" in words and {"install", "upgrade"} & set(words[:3]):
            yield first, words


def settings(words: list[str]) -> dict[str, str]:
    """The `--set`/`--set-file` values and the namespace of one helm command."""
    found: dict[str, str] = {}
    for flag, value in itertools.pairwise(words):
        if flag in {"--set", "--set-file", "--set-string"}:
            for item in value.split(","):
                key, _, val = item.partition("=")
                found[key] = val
        elif flag in {"-n", "--namespace"}:
            found["-n"] = value
    return found


def install_docs() -> list[tuple[str, str]]:
    """README.md, the pages of docs/ and the example values' headers: everywhere an install command is shown."""
    docs = [("README.md", text_of(ROOT / "README.md"))]
    docs += [(f"docs/{p.name}", text_of(p)) for p in sorted((ROOT / "docs").glob("*.md"))]
    docs += [(f"examples/{p.name}", text_of(p)) for p in sorted(EXAMPLES.glob("*.yaml"))]
    return docs


INSTALL_DOCS = install_docs()


class TestInstallCommands:
    def test_commands_are_found(self) -> None:
        """The README, the install page and the gateway example each show the chart's install command (so the
        checks below bite)."""
        where = {name for name, text in INSTALL_DOCS for _ in helm_commands(text)}
        assert {"README.md", "docs/install.md", "examples/gateway-values.yaml"} <= where

    @pytest.mark.parametrize(("name", "text"), INSTALL_DOCS, ids=[name for name, _ in INSTALL_DOCS])
    def test_an_https_vault_comes_with_its_ca(self, name: str, text: str) -> None:
        """Every install that points the agent at an https Vault also passes Vault's CA (as istiod's step does):
        without it a gateway agent trusts only the image's system CAs, never logs in, and the pod stays in Init."""
        missing = [
            first for first, words in helm_commands(text)
            if settings(words).get("vault.address", "").startswith("https://")
            and not {"vault.caCertPEM", "vault.caCertPath"} & settings(words).keys()
        ]
        assert missing == [], f"{name}: https vault.address without vault.caCertPEM"

    @pytest.mark.parametrize(("name", "text"), INSTALL_DOCS, ids=[name for name, _ in INSTALL_DOCS])
    def test_a_gateway_logs_in_with_the_role_setup_vault_made(self, name: str, text: str) -> None:
        """A mode=gateway install names the role `setup vault --gateway NS/SA` creates for its namespace and
        service account (gateway-NS-SA), not one that does not exist."""
        for first, words in helm_commands(text):
            values = settings(words)
            if values.get("mode") != "gateway":
                continue
            namespace, account = values.get("-n", "default"), values.get("serviceAccountName", "istiod")
            expected = ClusterLayout("cluster1").gateway_auth_role(namespace, account)
            assert values.get("auth.role") == expected, f"{name}: {first}"
