"""Config loading: the issue-2 YAML contract, env overrides, and one clear error per malformed key."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent import config
from agent.config import ExecReload, NoReload, SignalReload, parse_duration
from agent.errors import ConfigError
from tests.support import cli_env, error_line, run_cli

FIXTURES = Path(__file__).parent / "fixtures" / "config"
BAD = sorted(p.stem for p in FIXTURES.glob("bad-*.yaml"))


class TestContract:
    def test_issue_example_loads_with_its_values(self):
        """The example config of the contract loads and keeps every value it names."""
        cfg = config.load(FIXTURES / "good-runbook.yaml", env={})
        assert cfg.vault.address == "https://openbao.example:8200"
        assert cfg.vault.namespace == "production" and cfg.vault.ca_cert == "/vault/tls/ca.crt"
        assert (cfg.auth.method, cfg.auth.mount, cfg.auth.role) == ("kubernetes", "kubernetes-cluster1", "istiod")
        b = cfg.bundles[0]
        assert b.type == "istio-ca" and b.dir == "/var/run/secrets/istio-ca"
        assert b.files["ca-key.pem"] == "ca_key" and b.files["cert-chain.pem"] == "cert_chain"
        assert cfg.init.timeout == 120 and cfg.sidecar.poll_interval == 30
        assert cfg.health.listen == "0.0.0.0:8099"
        assert isinstance(b.reload, NoReload) and b.key_mode == 0o600 and b.file_mode == 0o644

    def test_defaults_for_tls_bundles(self):
        """A tls bundle publishes tls.key, tls.crt and ca.crt from keys of the same names by default."""
        cfg = config.from_mapping(
            {"vault": {"address": "http://v"}, "auth": {"mount": "k", "role": "r"},
             "bundles": [{"name": "gw", "type": "tls", "dir": "/o", "source": {"kv": "s/gw"}}]},
            env={},
        )
        assert cfg.bundles[0].files == {"tls.key": "tls.key", "tls.crt": "tls.crt", "ca.crt": "ca.crt"}

    def test_reload_variants(self):
        """Each reload action of the contract parses into its own typed settings."""
        base = {"vault": {"address": "http://v"}, "auth": {"mount": "k", "role": "r"}}
        cfg = config.from_mapping(
            {**base, "bundles": [
                {"name": "a", "dir": "/a", "source": {"kv": "s/a"},
                 "reload": {"action": "signal", "signal": "SIGHUP", "process": "nginx: master"}},
                {"name": "b", "dir": "/b", "source": {"kv": "s/b"},
                 "reload": {"action": "exec", "command": ["/bin/true"], "timeout": "10s"}},
            ]},
            env={},
        )
        assert cfg.bundles[0].reload == SignalReload(signal="SIGHUP", process="nginx: master")
        assert cfg.bundles[1].reload == ExecReload(command=["/bin/true"], timeout=10)

    def test_env_overrides_file(self):
        """VAULT_ADDR/BAO_ADDR, VAULT_CACERT, VAULT_NAMESPACE and VAULT_SKIP_VERIFY override the file."""
        cfg = config.load(
            FIXTURES / "good-runbook.yaml",
            env={"BAO_ADDR": "http://127.0.0.1:8200", "VAULT_CACERT": "/ca.pem", "VAULT_NAMESPACE": "ns2",
                 "VAULT_SKIP_VERIFY": "true"},
        )
        assert cfg.vault.address == "http://127.0.0.1:8200"
        assert (cfg.vault.ca_cert, cfg.vault.namespace, cfg.vault.skip_verify) == ("/ca.pem", "ns2", True)

    @pytest.mark.parametrize("address", ["https://vault.example:99999", "https://vault.example:http", "http://[::1"])
    def test_an_address_whose_port_or_host_does_not_parse_is_one_config_error(self, address, tmp_path):
        """vault.address with a port out of range, a port that is not a number or a broken IPv6 host: one line
        naming vault.address, not "internal error (ValueError)" from the run path."""
        raw = {"vault": {"address": address}, "auth": {"mount": "k", "role": "r"},
               "bundles": [{"name": "a", "dir": str(tmp_path / "out"), "source": {"kv": "s/a"}}]}
        with pytest.raises(ConfigError, match=r"vault\.address must be an http:// or https:// URL"):
            config.from_mapping(raw, env={})
        path = tmp_path / "agent.yaml"
        path.write_text(
            f"vault: {{address: '{address}'}}\nauth: {{mount: k, role: r, token_path: {tmp_path / 'token'}}}\n"
            f"bundles: [{{name: a, dir: {tmp_path / 'out'}, source: {{kv: s/a}}}}]\ninit: {{timeout: 1s}}\n"
        )
        proc = run_cli("run", "--config", str(path), "--mode", "init", env=cli_env())
        assert proc.returncode == 1
        assert "vault.address" in error_line(proc) and "internal error" not in proc.stderr, proc.stderr

    def test_an_address_with_credentials_is_refused_without_echoing_them(self):
        """vault.address carrying user:password would put the password in every error and log line that names Vault's
        address (and send it as Basic auth): one config error that does not show it."""
        raw = {"vault": {"address": "https://agent:s3cr3t-pw@vault.example:8200"}, "auth": {"mount": "k", "role": "r"},
               "bundles": [{"name": "a", "dir": "/o", "source": {"kv": "s/a"}}]}
        with pytest.raises(ConfigError, match=r"vault\.address") as err:
            config.from_mapping(raw, env={})
        assert "s3cr3t-pw" not in str(err.value)

    def test_config_path_from_env(self):
        """Without --config the path comes from ISTIO_VAULT_AGENT_CONFIG."""
        cfg = config.load(None, env={"ISTIO_VAULT_AGENT_CONFIG": str(FIXTURES / "good-runbook.yaml")})
        assert cfg.bundles[0].name == "istiod-cacerts"

    def test_no_config_at_all(self):
        """No --config and no env says how to give one."""
        with pytest.raises(ConfigError, match="--config FILE or set ISTIO_VAULT_AGENT_CONFIG"):
            config.load(None, env={})

    def test_workload_cert_ttl(self):
        """An istio-ca bundle's workload certificate lifetime is 24h unless workload_cert_ttl says otherwise."""
        base = {"vault": {"address": "http://v"}, "auth": {"mount": "k", "role": "r"}}
        cfg = config.from_mapping(
            {**base, "bundles": [{"name": "a", "dir": "/a", "source": {"kv": "s/a"}},
                                 {"name": "b", "dir": "/b", "source": {"kv": "s/b"}, "workload_cert_ttl": "1h"}]},
            env={},
        )
        assert [b.workload_ttl for b in cfg.bundles] == [86400, 3600]

    @pytest.mark.parametrize(
        ("text", "seconds"), [("30s", 30), ("5m", 300), ("1h30m", 5400), ("500ms", 0.5), (45, 45), ("2", 2)]
    )
    def test_durations(self, text, seconds):
        """Durations take Go-style units or bare seconds."""
        assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("name", BAD)
def test_bad_config_is_one_sentence_naming_the_key(name):
    """Every malformed config gives one ConfigError that names the key at fault."""
    expected = (FIXTURES / f"{name}.expect").read_text().strip()
    with pytest.raises(ConfigError) as info:
        config.load(FIXTURES / f"{name}.yaml", env={})
    message = str(info.value)
    assert expected in message, message
    assert "\n" not in message


@pytest.mark.parametrize("kind", ["istio-ca", "tls"])
def test_istio_generated_is_never_a_field(kind):
    """A KV field mapped to istio-generated (istiod's switch to its self-signed CA) is refused at load, naming it."""
    doc = {"vault": {"address": "http://v"}, "auth": {"mount": "k", "role": "r"},
           "bundles": [{"name": "a", "type": kind, "dir": "/o",
                        "source": {"kv": "s/a", "fields": {"istio-generated": "marker"}}}]}
    with pytest.raises(ConfigError) as info:
        config.from_mapping(doc, env={})
    message = str(info.value)
    assert "istio-generated" in message and "USE_CACERTS_FOR_SELF_SIGNED_CA" in message, message
    assert "\n" not in message


def test_bad_config_on_the_command_line(tmp_path):
    """The CLI prints the config error as one `error:` line and exits 1, without a traceback."""
    proc = run_cli("run", "--config", str(FIXTURES / "bad-unknown-vault.yaml"), env=cli_env())
    assert proc.returncode == 1
    assert "unknown key vault.adress" in error_line(proc)
    missing = run_cli("run", "--config", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 1 and "does not exist" in error_line(missing)


class TestPkiContract:
    def test_default_intermediate_renewal_leaves_twice_the_workload_lifetime(self):
        """PKI mode's defaults renew istiod's intermediate with at least 720h x 0.33 x 0.95 = 225.7h (9.4 days)
        left, well above 2 x 24h: istiod never has to shorten a workload certificate to its notAfter."""
        from agent.sources.pki import JITTER, renew_time

        s = config.PkiIntermediateSource(cluster="c1")
        earliest_left = s.ttl - renew_time(0, s.ttl, s.renew_before, rng=lambda: 0.0)
        assert earliest_left == pytest.approx(720 * 3600 * 0.33 * (1 - JITTER))
        assert earliest_left > 4 * 2 * config.WORKLOAD_CERT_TTL

    def test_issue_11_examples_load(self):
        """The two PKI source variants of issue 11's contract load with the values they name, and defaults."""
        base = {"vault": {"address": "http://v"}, "auth": {"mount": "k", "role": "r"}}
        cfg = config.from_mapping({**base, "bundles": [
            {"name": "istiod", "dir": "/a", "source": {"pki_intermediate": {
                "mount": "pki", "path": "root/sign-intermediate", "cluster": "cluster1", "key_type": "ec-p256",
                "ttl": "720h", "renew_before": 0.33}}},
            {"name": "gw", "type": "tls", "dir": "/b", "source": {"pki": {
                "mount": "pki_int", "role": "ingress", "common_name": "app.example.com",
                "alt_names": ["www.example.com"], "ip_sans": [], "ttl": "24h"}}},
        ]}, env={})
        intermediate, gateway = cfg.bundles[0].source, cfg.bundles[1].source
        assert intermediate.variant == "pki_intermediate" and gateway.variant == "pki"
        assert intermediate.pki_intermediate is not None and gateway.pki is not None
        assert intermediate.pki_intermediate.ttl == 720 * 3600 and intermediate.pki_intermediate.crl is False
        assert gateway.pki.alt_names == ["www.example.com"] and gateway.pki.ttl == 24 * 3600
        minimal = config.from_mapping({**base, "bundles": [
            {"name": "istiod", "dir": "/a", "source": {"pki_intermediate": {"cluster": "c2"}}}]}, env={})
        s = minimal.bundles[0].source.pki_intermediate
        assert s is not None
        assert (s.mount, s.path, s.key_type, s.renew_before) == ("pki", "root/sign-intermediate", "ec-p256", 0.33)


_BASE = {"vault": {"address": "http://v"}, "auth": {"mount": "k", "role": "r"}}
_REMOTE = {"name": "east", "type": "remote-secret", "cluster": "east", "source": {"kv": "kv/remote/east"}}


def _bundle(**bundle: object) -> config.AgentConfig:
    return config.from_mapping({**_BASE, "bundles": [bundle]}, env={})


class TestKindsAsUnions:
    """Each bundle kind has only its own keys (issue 19): a key of another kind is one sentence naming both."""

    def test_documented_example_loads(self):
        """The annotated example of docs/config-file.md, one bundle naming every key, loads as it is written."""
        import yaml

        page = (Path(__file__).parent.parent / "docs" / "config-file.md").read_text()
        block = next(b for b in page.split("```yaml\n")[1:] if "bundles:\n  - name: istiod-cacerts" in b)
        cfg = config.from_mapping(yaml.safe_load(block.split("```")[0]), env={})
        b = cfg.bundles[0]
        assert isinstance(b, config.IstioCaBundle) and b.dir == "/var/run/secrets/istio-ca" and not b.multiroot

    @pytest.mark.parametrize(("bundle", "needle"), [
        ({"name": "a", "dir": "/a", "type": "tls", "cluster": "c", "source": {"kv": "a/b"}},
         "bundles[0].cluster only applies to remote-secret bundles"),
        ({"name": "a", "dir": "/a", "ca_signs_cert": False, "source": {"kv": "a/b"}},
         "bundles[0].ca_signs_cert only applies to tls bundles"),
        ({"name": "a", "dir": "/a", "type": "tls", "on_root_change": "none", "source": {"kv": "a/b"}},
         "bundles[0].on_root_change only applies to istio-ca bundles"),
        ({**_REMOTE, "uid": 1000}, "bundles[0].uid only applies to istio-ca and tls bundles"),
        ({**_REMOTE, "reload": {"action": "signal", "process": "x"}},
         "bundles[0].reload does not apply to remote-secret bundles"),
        ({**_REMOTE, "source": {"pki": {"mount": "p", "role": "r", "common_name": "c"}}},
         "bundles[0].source must be kv for a remote-secret bundle"),
        ({"name": "a", "dir": "/a", "type": "tls",
          "source": {"pki": {"mount": "p", "role": "r", "common_name": "c"}, "fields": {"tls.crt": "x"}}},
         "bundles[0].source.fields only applies to kv sources"),
        ({"name": "a", "dir": "/a", "source": {"kv": "a/b", "variant": "kv"}},
         "unknown key bundles[0].source.variant"),
        ({"name": "a", "dir": "/a", "type": "nope", "source": {"kv": "a/b"}},
         "bundles[0].type has an invalid value 'nope'; use one of istio-ca, tls, remote-secret"),
    ])
    def test_key_of_another_kind_is_one_sentence(self, bundle, needle):
        """A key, source or value that another kind takes names the key and the kinds that take it."""
        with pytest.raises(ConfigError) as info:
            _bundle(**bundle)
        assert needle in str(info.value) and "\n" not in str(info.value), str(info.value)

    def test_keys_of_other_kinds_at_their_default_are_accepted(self):
        """Configs written for the flat record (`ca_signs_cert: true` on istio-ca, nulls from the chart) still load."""
        ca = _bundle(name="a", dir="/a", ca_signs_cert=True, cluster=None, prune=False,
                     source={"kv": "a/b", "pki": None, "pki_intermediate": None}).bundles[0]
        assert isinstance(ca, config.IstioCaBundle) and ca.type == "istio-ca" and ca.source.variant == "kv"
        gw = _bundle(name="g", dir="/g", type="tls", multiroot=False, on_root_change="restart",
                     source={"pki": {"mount": "p", "role": "r", "common_name": "c"}, "fields": {}}).bundles[0]
        assert isinstance(gw, config.TlsBundle) and gw.source.variant == "pki"
        remote = _bundle(**_REMOTE, dir="", reload={"action": "none"}, uid=None, file_mode=0o644).bundles[0]
        assert isinstance(remote, config.RemoteSecretBundle) and remote.cluster == "east"

    def test_config_imports_no_kind_or_validator(self):
        """Loading the config never imports the bundle kinds, the validator or the publisher."""
        import subprocess
        import sys

        code = ("import sys, agent.config; print(sorted(m for m in sys.modules if m.startswith(('agent.validate',"
                " 'agent.kinds', 'agent.publish'))))")
        out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent.parent, capture_output=True,
                             text=True, check=True, timeout=60)
        assert out.stdout.strip() == "[]"

    def test_registries_agree(self):
        """Every source variant has an opener, and a kind's default KV fields name exactly the files it publishes."""
        from agent import kinds, sources

        assert set(sources.OPENERS) == {"kv", "pki", "pki_intermediate"}
        for cls in (config.IstioCaBundle, config.TlsBundle):
            kind = kinds.get(str(cls.__struct_config__.tag))
            assert set(cls.DEFAULT_FIELDS) == set(kind.files)
        assert kinds.get("remote-secret").target == "secret" and not config.RemoteSecretBundle.DEFAULT_FIELDS
