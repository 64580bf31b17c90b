"""The documentation site cannot rot: `mkdocs build --strict` (dead links and anchors fail), a Markdown lint, the
configuration reference equal to what the schema generates, and every `error:` line the code can raise listed
in docs/troubleshooting.md."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from markdown_it import MarkdownIt

from agent import config_reference
from agent.errors import AgentError
from tests.support import ROOT

DOCS = ROOT / "docs"
BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    found = BIN / name
    if not found.exists():
        found = Path(shutil.which(name) or "")
    if not found.name:
        pytest.skip(f"{name} is not installed (pip install -e '.[test]')")
    return str(found)


class TestSite:
    def test_mkdocs_builds_strictly(self, tmp_path: Path) -> None:
        """`mkdocs build --strict` passes: every page is in the nav, every link and #anchor leads somewhere
        (mkdocs.yml's validation settings make each of these a warning, and --strict a failure; not --quiet, which
        hides the warnings from --strict too)."""
        proc = subprocess.run(
            [_tool("mkdocs"), "build", "--strict", "--site-dir", str(tmp_path / "site")],
            cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
            env={"PATH": str(BIN), "NO_MKDOCS_2_WARNING": "1", "HOME": str(tmp_path)},
        )
        assert proc.returncode == 0, proc.stderr[-4000:] + proc.stdout[-2000:]
        assert (tmp_path / "site" / "troubleshooting" / "index.html").exists()

    def test_markdown_lint_is_clean(self) -> None:
        """pymarkdown (rules configured in .pymarkdown) finds nothing in README.md and docs/."""
        proc = subprocess.run([_tool("pymarkdown"), "scan", "README.md", "docs"], cwd=ROOT, capture_output=True,
                              text=True, timeout=120, check=False)
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]

    @pytest.mark.parametrize("path", sorted(DOCS.glob("*.md")), ids=lambda p: p.name)
    def test_blocks_inside_list_items_are_indented_for_python_markdown(self, path: Path) -> None:
        """A list, table or code block inside a list item is indented 4 spaces per level: mkdocs' Markdown
        (Python-Markdown) would otherwise render it outside the item, as a flat list or plain text."""
        text = path.read_text(encoding="utf-8")
        lines = text.splitlines()
        depth, wrong = 0, []
        for tok in MarkdownIt("commonmark").enable("table").parse(text):
            if tok.type == "list_item_open":
                depth += 1
            elif tok.type == "list_item_close":
                depth -= 1
            elif depth and tok.map and tok.type in {"bullet_list_open", "ordered_list_open", "table_open", "fence"}:
                line = lines[tok.map[0]]
                if len(line) - len(line.lstrip(" ")) < 4 * depth:
                    wrong.append(f"line {tok.map[0] + 1}: {line.strip()[:60]}")
        assert wrong == []


class TestConfigurationReference:
    def test_page_is_what_the_schema_generates(self) -> None:
        """docs/configuration.md is exactly `python -m agent.config_reference`'s output: a key added, removed or
        changed in agent/config.py without regenerating the page fails here."""
        page = (DOCS / "configuration.md").read_text(encoding="utf-8")
        assert page == config_reference.render(), (
            "docs/configuration.md is out of date: run python -m agent.config_reference > docs/configuration.md")

    def test_every_key_has_a_description(self) -> None:
        """Each field of the schema carries a `#:` comment, which becomes its description in the reference."""
        assert config_reference.missing_descriptions() == []

    def test_every_key_and_allowed_value_is_listed(self) -> None:
        """The reference names the keys and values a user writes: a sample of nested, inherited and tagged ones."""
        page = (DOCS / "configuration.md").read_text(encoding="utf-8")
        for needle in ("`vault.address`", "`bundles[].source.pki_intermediate.renew_before`", "`0.33`",
                       "`bundles[].reload.target.kind`", "`rollout-restart`", "`bundles[].ca_signs_cert`",
                       "`limits.max_secret_size`", "`1MiB`", "`bundles[].key_mode`", "`0600`", "`VAULT_ADDR`",
                       "`remote-secret`", "`bundles[].prune`", "`health.listen`"):
            assert needle in page, needle

    def test_check_mode_says_when_the_page_is_stale(self, tmp_path: Path) -> None:
        """`python -m agent.config_reference --check FILE` exits 1 for a stale page and 0 for a current one."""
        stale = tmp_path / "configuration.md"
        stale.write_text("# Configuration reference\n")
        assert config_reference.main(["--check", str(stale)]) == 1
        stale.write_text(config_reference.render())
        assert config_reference.main(["--check", str(stale)]) == 0


# ---------------------------------------------------------------------------------------------------------------
# Every error a user can hit: the messages of the AgentError tree (and FileProblem, the OSError that names a file
# the agent does not own), read from their raise sites in agent/. A message is a string literal or an f-string
# (its placeholders become "…"), or comes from a helper that builds it (a function of the same module returning
# such strings, or one that passes a parameter on: then every call of that helper is a site).


def _user_errors() -> set[str]:
    """Every AgentError subclass in agent/, whatever the tests before this one imported (every module is imported
    first, so the set does not depend on the order the tests run in)."""
    import importlib
    import pkgutil

    import agent

    for info in pkgutil.walk_packages(agent.__path__, "agent."):
        if info.name != "agent.__main__":
            importlib.import_module(info.name)
    found, todo = set(), [AgentError]
    while todo:
        cls = todo.pop()
        found.add(cls.__name__)
        todo.extend(cls.__subclasses__())
    return found | {"FileProblem"}


USER_ERRORS = _user_errors()


def _template(node: ast.AST | None) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else "…" for v in node.values)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _template(node.left), _template(node.right)
        return None if left is None and right is None else (left or "…") + (right or "…")
    return None


def _name(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


class _Module:
    """One source file: its functions, and which function encloses each node."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tree = ast.parse(path.read_text(encoding="utf-8"))
        self.functions = {n.name: n for n in ast.walk(self.tree)
                          if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}
        self.parent: dict[ast.AST, ast.AST] = {}
        for node in ast.walk(self.tree):
            for child in ast.iter_child_nodes(node):
                self.parent[child] = node

    def enclosing(self, node: ast.AST) -> ast.FunctionDef | ast.AsyncFunctionDef | None:
        while node in self.parent:
            node = self.parent[node]
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                return node
        return None

    def returned(self, func: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
        """The message templates a helper function returns."""
        found = []
        for node in ast.walk(func):
            if isinstance(node, ast.Return) and node.value is not None:
                found.extend(self.resolve(node.value, func) or [])
        return found

    def resolve(self, node: ast.AST, func: ast.FunctionDef | ast.AsyncFunctionDef | None,
                depth: int = 0) -> list[str] | None:
        """Templates `node` can evaluate to; None when it cannot be read."""
        if depth > 4:
            return None
        if isinstance(node, ast.JoinedStr) and func is not None:
            # a value named in the f-string and assigned once in the function (`head = f"TLS ..."`) is spelled out
            parts = []
            for v in node.values:
                inner = (self.resolve(v.value, func, depth + 1)
                         if isinstance(v, ast.FormattedValue) and isinstance(v.value, ast.Name) else None)
                if inner and len(inner) == 1:
                    parts.append(inner[0])
                else:
                    parts.append(v.value if isinstance(v, ast.Constant) and isinstance(v.value, str) else "…")
            return ["".join(parts)]
        if (text := _template(node)) is not None:
            return [text]
        if isinstance(node, ast.IfExp):
            a, b = self.resolve(node.body, func, depth + 1), self.resolve(node.orelse, func, depth + 1)
            return None if a is None or b is None else a + b
        if isinstance(node, ast.BoolOp):
            parts_ = [self.resolve(v, func, depth + 1) for v in node.values]
            return None if any(p is None for p in parts_) else [t for p in parts_ for t in p or []]
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in self.functions:
            return self.returned(self.functions[node.func.id]) or None
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in _METHODS:
            owner, method = _METHODS[node.func.attr]  # a method of another module's class, such as Parsed's
            return owner.returned(method) or None
        if isinstance(node, ast.Name) and func is not None:
            values = [a.value for a in ast.walk(func) if isinstance(a, ast.Assign)
                      and any(isinstance(t, ast.Name) and t.id == node.id for t in a.targets)]
            found = [self.resolve(v, func, depth + 1) for v in values]
            if values and all(f is not None for f in found):
                return [t for f in found for t in f or []]
        return None


def _shape(node: ast.AST | None, mod: _Module, func: ast.AST, depth: int = 0) -> str:
    """The message `node` builds, with the parameter `what` as "\0" and every other value as "…" (names assigned
    in the function followed, so `head = f"{what}; ..."` counts)."""
    if node is None or depth > 5:
        return "…"
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(_shape(v if isinstance(v, ast.Constant) else v.value, mod, func, depth)
                       for v in node.values if isinstance(v, ast.Constant | ast.FormattedValue))
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _shape(node.left, mod, func, depth) + _shape(node.right, mod, func, depth)
    if isinstance(node, ast.Name):
        if node.id == "what":
            return "\0"
        values = [a.value for a in ast.walk(func) if isinstance(a, ast.Assign)
                  and any(isinstance(x, ast.Name) and x.id == node.id for x in a.targets)]
        return _shape(values[0], mod, func, depth + 1) if len(values) == 1 else "…"
    return "…"


class _Helpers(dict[str, dict[Path, int]]):
    """name -> {module: position of `what`}; a call finds the helper of its own module first."""

    def at(self, mod: _Module, name: str | None) -> int | None:
        found = self.get(name or "", {})
        if mod.path in found:
            return found[mod.path]
        return next(iter(found.values())) if len(set(found.values())) == 1 else None


def _helpers(modules: list[_Module]) -> _Helpers:
    """Functions whose user error is their parameter `what` with a head or tail added (validate's refuse and
    refuse_b: `f"{what} (check {check})"`), directly or through another such function: name -> the position of
    `what` among the call's arguments."""
    helpers = _Helpers()
    changed = True
    while changed:
        changed = False
        for mod in modules:
            for func in mod.functions.values():
                params = [a.arg for a in func.args.args]
                if "what" not in params or mod.path in helpers.get(func.name, {}):
                    continue
                for node in ast.walk(func):
                    if not isinstance(node, ast.Call):
                        continue
                    name = _name(node.func)
                    if name in USER_ERRORS and node.args:
                        shape = _shape(node.args[0], mod, func)
                        if not (shape.startswith("\0") or shape.rstrip(").").endswith("\0")):
                            continue
                    elif (index := helpers.at(mod, name)) is None or _shape(_argument(node, index), mod, func) != "\0":
                        continue
                    helpers.setdefault(func.name, {})[mod.path] = params.index("what") - (params[:1] == ["self"])
                    changed = True
                    break
    return helpers


def _argument(call: ast.Call, index: int) -> ast.AST | None:
    if len(call.args) > index:
        return call.args[index]
    return next((k.value for k in call.keywords if k.arg == "what"), None)


#: method name -> (its module, its definition), for the names defined once in agent/
_METHODS: dict[str, tuple[_Module, ast.FunctionDef | ast.AsyncFunctionDef]] = {}


def _sites() -> tuple[list[tuple[str, str]], list[str]]:
    """(where, template) of every user-facing message, and the raise sites whose message cannot be read."""
    modules = [_Module(p) for p in sorted((ROOT / "agent").rglob("*.py"))]
    seen: dict[str, int] = {}
    for mod in modules:
        for name, func in mod.functions.items():
            seen[name] = seen.get(name, 0) + 1
            _METHODS[name] = (mod, func)
    for name, count in seen.items():
        if count > 1:
            del _METHODS[name]
    helpers = _helpers(modules)
    found: list[tuple[str, str]] = []
    unreadable: list[str] = []
    for mod in modules:
        for node in ast.walk(mod.tree):
            if not isinstance(node, ast.Call):
                continue
            name = _name(node.func)
            where = f"{mod.path.relative_to(ROOT)}:{node.lineno}"
            func = mod.enclosing(node)
            if name in USER_ERRORS and node.args:
                arg: ast.AST | None = node.args[0]
            elif (index := helpers.at(mod, name)) is not None:
                arg = _argument(node, index)
            else:
                continue
            if isinstance(arg, ast.Call) and _name(arg.func) == "str":
                continue  # passes on another user error's message, listed where that one is raised
            if func is not None and helpers.at(mod, func.name) is not None and isinstance(arg, ast.Name) and (
                    arg.id == "what"):
                continue  # a helper passing `what` on: its callers' messages are the sites
            texts = mod.resolve(arg, func) if arg is not None else None
            if texts is None:
                unreadable.append(f"{where}: {ast.unparse(node)[:100]}")
            found.extend((where, text) for text in texts or [])
    return found, unreadable


SITES, UNREADABLE = _sites()


def _fragments(template: str) -> list[str]:
    """The constant parts of a template that say something (a bare ': ' or ')' between placeholders does not)."""
    return [" ".join(f.split()) for f in template.split("…") if len(f.strip(" .,;:()'\"")) >= 3]


def _documented() -> list[str]:
    """The code spans and code blocks of docs/troubleshooting.md, whitespace collapsed."""
    text = (DOCS / "troubleshooting.md").read_text(encoding="utf-8")
    spans: list[str] = []
    for tok in MarkdownIt("commonmark").enable("table").parse(text):
        if tok.type == "fence":
            spans.extend(tok.content.splitlines())
        for child in tok.children or []:
            if child.type == "code_inline":
                spans.append(child.content)
    return [" ".join(s.split()) for s in spans]


def _listed(template: str, spans: list[str]) -> bool:
    """Some code span holds every fragment of the template, in order."""
    parts = _fragments(template)
    for span in spans:
        at = 0
        for part in parts:
            at = span.find(part, at)
            if at < 0:
                break
            at += len(part)
        else:
            return True
    return not parts


class TestTroubleshooting:
    def test_the_extraction_reads_the_messages(self) -> None:
        """The raise sites are found (a few hundred), including messages built by helpers, and every raise site's
        message can be read: write it as a literal or f-string (or in a helper returning one) so it can be listed."""
        assert len(SITES) > 250
        texts = {t for _, t in SITES}
        assert "no config file given: pass --config FILE or set …" in texts
        assert any(t.startswith("unknown key …") for t in texts)  # config._friendly, a helper returning messages
        assert any("istiod would load it, but" in t for t in texts)  # validate's refuse_b, a helper passing it on
        assert UNREADABLE == []

    def test_every_error_line_is_in_the_troubleshooting_page(self) -> None:
        """Each message a user can get as an `error:` line is listed in docs/troubleshooting.md (as a code span,
        its variable parts written freely), so the page says what it means and what to do."""
        spans = _documented()
        missing = sorted({f"{where}: {text}" for where, text in SITES if not _listed(text, spans)})
        assert missing == [], "add these to docs/troubleshooting.md:\n" + "\n".join(missing)


def _by_module() -> Iterator[tuple[str, list[str]]]:
    """For writing the page: the templates of each module, once each (python -m tests.test_docs)."""
    seen: dict[str, list[str]] = {}
    for where, text in SITES:
        module = where.split(":")[0]
        if text not in seen.setdefault(module, []):
            seen[module].append(text)
    yield from seen.items()


if __name__ == "__main__":
    for module, texts in _by_module():
        print(f"\n{module}")
        for text in texts:
            fence = "``" if "`" in text else "`"
            print(f"- {fence}{text}{fence}")


# ---------------------------------------------------------------------------------------------------------------
# The commands the README and the docs show exist, with the flags they pass.


def _shown_commands() -> Iterator[tuple[str, list[str]]]:
    """(where, words after `istio-vault-agent`) of every command line in the code blocks of README.md and docs/,
    continuation lines joined and comments dropped."""
    for path in [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]:
        text = path.read_text(encoding="utf-8")
        for tok in MarkdownIt("commonmark").parse(text):
            if tok.type != "fence" or tok.info.strip() not in {"console", "sh", "bash", "shell"}:
                continue
            lines = tok.content.splitlines()
            i = 0
            while i < len(lines):
                line = lines[i]
                while line.rstrip().endswith("\\") and i + 1 < len(lines):
                    i += 1
                    line = line.rstrip()[:-1] + " " + lines[i].strip()
                i += 1
                line = re.sub(r"\s#\s.*$", "", line.removeprefix("$ "))
                for part in re.split(r"\|\s*|&&\s*", line):
                    words = part.split()
                    if words[:1] == ["istio-vault-agent"] and len(words) > 1:
                        yield f"{path.relative_to(ROOT)}: {part.strip()[:80]}", words[1:]


def _options(words: list[str]) -> tuple[list[str], set[str]] | None:
    """The sub-command path `words` names, and the options its parser takes (None: no such command)."""
    from agent import cli

    parser = cli._parser(words[0])
    path: list[str] = []
    for word in words:
        actions = parser._subparsers._group_actions if parser._subparsers else []
        if not actions:
            break
        choices = actions[0].choices or {}
        if word not in choices:
            return None if not path or actions[0].required else (path, set(parser._option_string_actions))
        parser = choices[word]
        path.append(word)
    return path, set(parser._option_string_actions)


def test_every_shown_command_and_flag_exists() -> None:
    """Each `istio-vault-agent ...` line in README.md's and docs/' code blocks names a real sub-command, and every
    `--flag` it passes is one that sub-command takes (checked against the CLI's own parser)."""
    shown = list(_shown_commands())
    assert len(shown) > 30
    wrong = []
    for where, words in shown:
        found = _options(words)
        if found is None:
            wrong.append(f"{where}: no such command")
            continue
        path, options = found
        for word in words[len(path):]:
            flag = word.strip("[]").split("=")[0]
            if flag.startswith("--") and "$" not in flag and flag not in options:
                wrong.append(f"{where}: {' '.join(path)} has no {flag}")
    assert wrong == []
