"""Bad input, systematically: every config key with a wrong type or an unknown neighbour, and hypothesis fuzzing
of the config parser and the bundle validator. A refusal is always one ConfigError/BundleError line, never a crash.
"""

from __future__ import annotations

import base64
import copy
import datetime as dt
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec.inspect as mi
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import config
from agent import validate as bundle
from agent.errors import BundleError, ConfigError
from testbed import pki
from tests.faultkit import LeakGuard, fixture_leaks  # noqa: F401 - the `leaks` fixture
from tests.support import error_line, run_cli, slow_only, write_config

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
SLOW = settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# A valid config that names every section, and one bundle per reload action, so every key has a place to go.
BASE: dict[str, Any] = {
    "vault": {"address": "https://openbao.example:8200", "ca_cert": "/vault/ca.crt", "namespace": "ns",
              "tls_server_name": "openbao", "skip_verify": False, "timeout": "5s"},
    "auth": {"method": "kubernetes", "mount": "kubernetes-cluster1", "role": "istiod", "token_path": "/t/token"},
    "bundles": [
        {"name": "signal", "dir": "/out/a", "source": {"kv": "kv/a", "fields": {"ca-key.pem": "ca_key"}},
         "type": "istio-ca", "file_mode": 0o644, "key_mode": 0o600, "uid": 1337, "gid": 1337,
         "reload": {"action": "signal", "signal": "SIGHUP", "process": "pilot-discovery"},
         "multiroot": False, "on_root_change": "restart", "restart_process": "pilot-discovery",
         "ready_min_remaining": "1h"},
        {"name": "exec", "dir": "/out/b", "source": {"kv": "kv/b"},
         "reload": {"action": "exec", "command": ["/bin/true"], "timeout": "10s"}},
        {"name": "http", "dir": "/out/c", "source": {"kv": "kv/c"},
         "reload": {"action": "http", "url": "http://127.0.0.1:15014/reload", "method": "POST", "timeout": "2s"}},
        {"name": "rollout", "dir": "/out/d", "source": {"kv": "kv/d"},
         "reload": {"action": "rollout-restart",
                    "target": {"kind": "Deployment", "name": "istiod", "namespace": "istio-system"}}},
        {"name": "none", "dir": "/out/e", "type": "tls", "source": {"kv": "kv/e"}, "reload": {"action": "none"}},
    ],
    "init": {"timeout": "2m"},
    "health": {"listen": "127.0.0.1:8099"},
    "sidecar": {"poll_interval": "30s"},
    "log": {"level": "info", "format": "json"},
}

# A wrong value for each kind of type, and the words the message should use for what was expected.
_WRONG: dict[type, list[Any]] = {
    mi.StrType: [12345, ["a"]],
    mi.IntType: ["0644", 1.5, True],
    mi.BoolType: ["yes", 1],
    mi.CustomType: ["soon", [1], -3],  # Duration
    mi.LiteralType: ["no-such-choice", 7],
    mi.ListType: ["not-a-list", {"a": 1}],
    mi.DictType: ["not-a-mapping", ["x"]],
    mi.StructType: ["not-a-mapping", ["x"]],
}


def _get(tree: Any, path: tuple[Any, ...]) -> Any:
    for part in path:
        tree = tree[part]
    return tree


def _dotted(path: tuple[Any, ...]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


def _wrong_values(t: mi.Type) -> list[Any]:
    if isinstance(t, mi.UnionType):
        members = [m for m in t.types if not isinstance(m, mi.NoneType)]
        if all(isinstance(m, mi.StructType) for m in members):
            return ["not-a-mapping", {"action": "no-such-action"}]  # a tagged union (reload)
        return _wrong_values(members[0])
    return list(_WRONG[type(t)])


def _struct_at(t: mi.Type, node: dict[str, Any]) -> mi.StructType | None:
    """The struct type describing `node`: `t` itself, or the tagged-union member its tag names."""
    if isinstance(t, mi.StructType):
        return t
    if isinstance(t, mi.UnionType):
        for m in t.types:
            if not isinstance(m, mi.StructType) or m.tag is None:
                continue
            # a bundle's type defaults to istio-ca; a source's variant is the key that holds its settings
            tag = node.get(m.tag_field, "istio-ca" if m.tag_field == "type" else None)
            if tag == m.tag or (m.tag_field == "variant" and m.tag in node):
                return m
    return None


def _walk(t: mi.StructType, path: tuple[Any, ...]) -> Iterator[tuple[tuple[Any, ...], Any, str]]:
    """Yield (path, bad value, dotted key) for every field of every struct reachable in BASE, and unknown keys."""
    node = _get(BASE, path)
    yield (*path, "bogus_key"), 1, _dotted((*path, "bogus_key"))
    for f in t.fields:
        fpath = (*path, f.name)
        for bad in _wrong_values(f.type):
            yield fpath, bad, _dotted(fpath)
        value = node.get(f.name)
        ftype = f.type
        if isinstance(ftype, mi.ListType) and isinstance(ftype.item_type, mi.StructType | mi.UnionType):
            for i in range(len(value or [])):
                if (item := _struct_at(ftype.item_type, value[i])) is not None:
                    yield from _walk(item, (*fpath, i))
        elif isinstance(value, dict) and (sub := _struct_at(ftype, value)) is not None:
            yield from _walk(sub, fpath)


CASES = list(_walk(mi.type_info(config.AgentConfig), ()))  # type: ignore[arg-type]


def _with(path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    raw = copy.deepcopy(BASE)
    _get(raw, path[:-1])[path[-1]] = value
    return raw


def _assert_one_line(exc: BaseException) -> str:
    message = str(exc)
    assert message and "\n" not in message and "Traceback" not in message, message
    assert len(message) < 400, message
    return message


class TestEveryKey:
    def test_base_config_is_valid_and_reaches_every_struct(self):
        """The base config loads, and the walk reaches every section and reload action of the schema."""
        cfg = config.from_mapping(copy.deepcopy(BASE), env={})
        assert [type(b.reload).__name__ for b in cfg.bundles] == [
            "SignalReload", "ExecReload", "HttpReload", "RolloutRestartReload", "NoReload"]
        keys = {key for _, _, key in CASES}
        assert {"vault.timeout", "bundles[3].reload.target.kind", "bundles[1].reload.command", "log.format",
                "bundles[0].source.fields", "bundles[2].reload.url", "sidecar.poll_interval"} <= keys
        assert len(CASES) > 150

    @pytest.mark.parametrize(("path", "bad", "key"), CASES, ids=[f"{k}={b!r}" for _, b, k in CASES])
    def test_wrong_type_or_unknown_key_names_the_key(self, path, bad, key):
        """A wrong-typed value, or an unknown key, is one ConfigError line that names the key."""
        with pytest.raises(ConfigError) as info:
            config.from_mapping(_with(path, bad), env={})
        message = _assert_one_line(info.value)
        assert key in message, message

    @pytest.mark.parametrize(
        ("path", "bad", "key"),
        [(("vault", "timeout"), "soon", "vault.timeout"),
         (("bundles", 0, "reload", "signal"), ["HUP"], "bundles[0].reload.signal"),
         (("auth", "rolle"), "istiod", "auth.rolle")],
    )
    def test_on_the_command_line(self, tmp_path, leaks, path, bad, key):
        """Through the CLI the same mistakes print one `error:` line naming the key and exit 1, no traceback."""
        cfg = write_config(tmp_path / "agent.yaml", _with(path, bad))
        proc = run_cli("run", "--config", str(cfg), "--mode", "init")
        leaks.watch("cli stderr", proc.stderr)
        assert proc.returncode == 1
        assert key in error_line(proc)
        assert proc.stderr.count("\n") == 1, proc.stderr


class TestOddValues:
    @pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", "1e400", "9" * 400 + "s", str(10**400)])
    @pytest.mark.parametrize("key", ["sidecar.poll_interval", "init.timeout", "vault.timeout"])
    def test_non_finite_durations_are_refused(self, tmp_path, key, value):
        """NaN, infinite or overflowing durations are refused (NaN once made the poll loop spin without sleeping)."""
        section, _, name = key.partition(".")
        raw = copy.deepcopy(BASE)
        raw[section][name] = "PLACEHOLDER"
        path = tmp_path / "agent.yaml"
        path.write_text(yaml.safe_dump(raw, sort_keys=False).replace("PLACEHOLDER", value))
        with pytest.raises(ConfigError) as info:
            config.load(path, env={})
        assert key in _assert_one_line(info.value)


# ------------------------------------------------------------------------------------------- config fuzzing

_SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
_TREES = st.recursive(
    _SCALARS, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8) | st.integers(), c, max_size=4),
    max_leaves=20,
)


def _paths(tree: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    if isinstance(tree, dict):
        for k, v in tree.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            out += _paths(v, (*prefix, i))
    return out


ALL_PATHS = _paths(BASE)


def _durations(cfg: config.AgentConfig) -> list[float]:
    out = [cfg.vault.timeout, cfg.init.timeout, cfg.sidecar.poll_interval]
    for b in cfg.bundles:
        out.append(b.ready_min_remaining)
        out.extend(v for v in (getattr(b.reload, "timeout", None),) if v is not None)
    return out


def _assert_sane(cfg: config.AgentConfig) -> None:
    """What an accepted config promises the runner: finite durations, a poll interval that cannot spin."""
    assert all(0 <= d < float("inf") for d in _durations(cfg)), _durations(cfg)
    assert cfg.sidecar.poll_interval >= 0.1
    assert cfg.bundles and cfg.vault.address.startswith(("http://", "https://"))


def _accepts_or_refuses_cleanly(raw: Any) -> None:
    try:
        cfg = config.from_mapping(raw, env={})
    except ConfigError as exc:
        _assert_one_line(exc)
    else:
        _assert_sane(cfg)


def _load_text(tmp: Path, text: str) -> None:
    path = tmp / "fuzz.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        cfg = config.load(path, env={})
    except ConfigError as exc:
        _assert_one_line(exc)
    else:
        _assert_sane(cfg)


def _mutated_yaml(data: st.DataObject) -> str:
    text = yaml.safe_dump(BASE, sort_keys=False)
    at = data.draw(st.integers(0, len(text)))
    cut = data.draw(st.integers(0, 20))
    return text[:at] + data.draw(st.text(max_size=10)) + text[at + cut :]


class TestConfigFuzz:
    @FAST
    @given(raw=st.dictionaries(st.sampled_from([*BASE, "x"]) | st.text(max_size=6), _TREES, max_size=6))
    def test_random_trees(self, raw):
        """Random nested mappings are accepted or refused with one ConfigError line."""
        _accepts_or_refuses_cleanly(raw)

    @FAST
    @given(data=st.data())
    def test_one_value_of_a_good_config_replaced(self, data):
        """A good config with any one value replaced by random data is accepted or refused with one line."""
        path = data.draw(st.sampled_from(ALL_PATHS))
        _accepts_or_refuses_cleanly(_with(path, data.draw(_TREES)))

    @FAST
    @given(data=st.data())
    def test_yaml_text(self, tmp_path, data):
        """Random YAML text, and a good config's YAML with a random splice, load or fail with one line."""
        _load_text(tmp_path, data.draw(st.text(max_size=200)))
        _load_text(tmp_path, _mutated_yaml(data))

    @pytest.mark.slow
    @pytest.mark.timeout(900)
    @SLOW
    @given(data=st.data())
    def test_many_more(self, request, tmp_path, data):
        """The three config fuzzers with many more examples."""
        slow_only(request)
        _accepts_or_refuses_cleanly(data.draw(st.dictionaries(st.text(max_size=6), _TREES, max_size=6)))
        _accepts_or_refuses_cleanly(_with(data.draw(st.sampled_from(ALL_PATHS)), data.draw(_TREES)))
        _load_text(tmp_path, _mutated_yaml(data))


# ------------------------------------------------------------------------------------------- bundle fuzzing

_ROOT = pki.root_ca()
_INTER = pki.intermediate_ca(_ROOT)
GOOD_CA = pki.istio_ca_files(_ROOT, _INTER)
_LEAF = pki.leaf_cert(_INTER)
GOOD_TLS = pki.tls_files(_LEAF, _ROOT)
_OTHER = pki.istio_ca_files(_ROOT, pki.intermediate_ca(_ROOT, cn="Other", key_type="rsa"))
PEM_PARTS = [b"-----BEGIN CERTIFICATE-----\n", b"-----END CERTIFICATE-----\n", b"-----BEGIN PRIVATE KEY-----\n",
             b"-----END PRIVATE KEY-----\n", b"-----BEGIN EC PRIVATE KEY-----\n", b"Proc-Type: 4,ENCRYPTED\n",
             b"\n", b"MIIB", b"====", b"\r\n", b"\x00", b"\xff\xfe"]


def _mutate(data: st.DataObject, files: dict[str, bytes]) -> dict[str, bytes]:
    """One to three of: truncate, flip, splice, drop, duplicate, swap or empty files; or add PEM fragments."""
    files = dict(files)
    for _ in range(data.draw(st.integers(1, 3))):
        name = data.draw(st.sampled_from(sorted(files)))
        blob = files[name]
        op = data.draw(st.sampled_from(["truncate", "flip", "splice", "drop", "dup", "swap", "empty", "pem",
                                        "other", "random"]))
        at = data.draw(st.integers(0, len(blob)))
        if op == "truncate":
            files[name] = blob[:at]
        elif op == "flip" and blob:
            i = min(at, len(blob) - 1)
            files[name] = blob[:i] + bytes([blob[i] ^ (1 << data.draw(st.integers(0, 7)))]) + blob[i + 1 :]
        elif op == "splice":
            files[name] = blob[:at] + data.draw(st.binary(max_size=40)) + blob[at + data.draw(st.integers(0, 40)) :]
        elif op == "drop":
            del files[name]
            if not files:
                return files
        elif op == "dup":
            files[name] = blob + blob
        elif op == "swap":
            other = data.draw(st.sampled_from(sorted(files)))
            files[name], files[other] = files[other], blob
        elif op == "empty":
            files[name] = b""
        elif op == "pem":
            files[name] = blob[:at] + data.draw(st.sampled_from(PEM_PARTS)) + blob[at:]
        elif op == "other" and name in _OTHER:
            files[name] = _OTHER[name]
        elif op == "random":
            files[name] = data.draw(st.binary(max_size=300))
    return files


def _validates_or_refuses_cleanly(kind: str, files: dict[str, bytes], leaks: LeakGuard) -> None:
    start = time.perf_counter()
    try:
        bundle.validate(kind, files, now=dt.datetime.now(dt.UTC))
    except BundleError as exc:
        leaks.scan(_assert_one_line(exc), f"BundleError for a mutated {kind} bundle")
    # bench/validate.py measures the real times (well under 50 ms); this bound only catches runaway work
    assert time.perf_counter() - start < 1.0


@pytest.fixture(name="keyleaks")
def fixture_keyleaks(leaks: LeakGuard) -> LeakGuard:
    """The leak guard with this module's private keys registered."""
    for label, files in (("istio-ca", GOOD_CA), ("tls", GOOD_TLS), ("other", _OTHER)):
        leaks.key_files(label, files)
    return leaks


class TestBundleFuzz:
    def test_the_unmutated_bundles_are_valid(self):
        """The seeds are good bundles, so every refusal below comes from the mutation."""
        assert bundle.validate("istio-ca", GOOD_CA).kind == "istio-ca"
        assert bundle.validate("tls", GOOD_TLS).kind == "tls"

    @FAST
    @given(data=st.data(), kind=st.sampled_from(["istio-ca", "tls"]))
    def test_mutated_bundles(self, keyleaks, data, kind):
        """Truncated, bit-flipped, spliced, swapped, duplicated or missing files: valid, or one BundleError line."""
        _validates_or_refuses_cleanly(kind, _mutate(data, GOOD_CA if kind == "istio-ca" else GOOD_TLS), keyleaks)

    @FAST
    @given(kind=st.sampled_from(["istio-ca", "tls"]),
           files=st.dictionaries(st.sampled_from([*bundle.ISTIO_CA_FILES, *bundle.TLS_FILES]),
                                 st.binary(max_size=200), max_size=7))
    def test_random_bytes(self, keyleaks, kind, files):
        """Random bytes under the bundle's file names are refused with one BundleError line."""
        with pytest.raises(BundleError) as info:
            bundle.validate(kind, files)
        keyleaks.scan(_assert_one_line(info.value), "BundleError for random bytes")

    def test_key_with_an_unknown_curve(self, keyleaks):
        """A key whose curve OID is unknown (one changed byte) is refused as invalid; it once crashed the agent."""
        lines = GOOD_CA["ca-key.pem"].decode().splitlines()
        der = base64.b64decode("".join(lines[1:-1]))
        p256 = bytes.fromhex("2a8648ce3d030107")
        assert p256 in der
        bad = base64.encodebytes(der.replace(p256, p256[:-1] + b"\x63")).decode()
        files = {**GOOD_CA, "ca-key.pem": f"{lines[0]}\n{bad}{lines[-1]}\n".encode()}
        with pytest.raises(BundleError, match=r"ca-key\.pem holds a PRIVATE KEY block that is not a valid private key"):
            bundle.validate("istio-ca", files)

    @pytest.mark.parametrize("name", ["ca-cert.pem", "root-cert.pem"])
    def test_every_bit_flip_in_the_certificate_header(self, keyleaks, name):
        """Flipping any bit of the first 400 PEM characters (serial, names, validity) gives a clean refusal.

        A corrupt subject once passed the parser (names parse lazily) and escaped later as a ValueError.
        """
        blob = GOOD_CA[name]
        start = blob.index(b"\n") + 1
        for i in range(start, start + 400):
            for bit in range(3):  # the low bits keep a base64 character a base64 character more often
                files = {**GOOD_CA, name: blob[:i] + bytes([blob[i] ^ (1 << bit)]) + blob[i + 1 :]}
                _validates_or_refuses_cleanly("istio-ca", files, keyleaks)

    def test_files_swapped_pairwise(self, keyleaks):
        """Every pair of istio-ca files swapped is refused, naming one of the two files, except the two swaps
        istiod loads (the oracle agrees: corpus cases files-swapped-root-chain and files-swapped-ca-chain), which
        are accepted with a warning."""
        names = list(bundle.ISTIO_CA_FILES)
        loads = {("ca-cert.pem", "cert-chain.pem"), ("root-cert.pem", "cert-chain.pem")}
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                files = dict(GOOD_CA)
                files[a], files[b] = files[b], files[a]
                if files == GOOD_CA:
                    continue
                if (a, b) in loads:
                    assert bundle.validate("istio-ca", files).warnings, (a, b)
                    continue
                with pytest.raises(BundleError) as info:
                    bundle.validate("istio-ca", files)
                message = _assert_one_line(info.value)
                keyleaks.scan(message, f"BundleError for {a} <-> {b}")
                assert a in message or b in message, message

    def test_truncated_at_every_line(self, keyleaks):
        """Each file cut after any of its lines is refused (or, cut at its very end, accepted)."""
        for name, blob in GOOD_CA.items():
            lines = blob.splitlines(keepends=True)
            for n in range(len(lines)):
                files = {**GOOD_CA, name: b"".join(lines[:n])}
                if files == GOOD_CA:
                    continue
                try:
                    bundle.validate("istio-ca", files)
                except BundleError as exc:
                    keyleaks.scan(_assert_one_line(exc), f"BundleError for {name} cut at line {n}")
                else:
                    # only the extra certificates of cert-chain.pem may be cut: istiod also tolerates that
                    assert name == "cert-chain.pem", f"{name} cut to {n} lines was accepted"

    def test_validate_dir_on_odd_files(self, tmp_path, keyleaks):
        """`check DIR` refuses a missing file, a directory or a dangling symlink in place of a file, one line each."""
        for name in bundle.ISTIO_CA_FILES:
            d = tmp_path / name
            d.mkdir()
            pki.write_files(d, GOOD_CA)
            (d / name).unlink()
            for variant in ("missing", "dir", "dangling"):
                if variant == "dir":
                    (d / name).mkdir()
                elif variant == "dangling":
                    (d / name).rmdir()
                    (d / name).symlink_to(d / "nowhere")
                with pytest.raises(BundleError) as info:
                    bundle.validate_dir(d, "istio-ca")
                message = _assert_one_line(info.value)
                assert name in message, message
        proc = run_cli("check", str(d))  # the last one, through the CLI
        keyleaks.watch("check output", proc.stderr + proc.stdout)
        assert proc.returncode == 1 and "cert-chain.pem" in error_line(proc)

    @pytest.mark.slow
    @pytest.mark.timeout(900)
    @SLOW
    @given(data=st.data(), kind=st.sampled_from(["istio-ca", "tls"]))
    def test_many_more_mutations(self, request, keyleaks, data, kind):
        """The mutation fuzzer with many more examples."""
        slow_only(request)
        _validates_or_refuses_cleanly(kind, _mutate(data, GOOD_CA if kind == "istio-ca" else GOOD_TLS), keyleaks)
