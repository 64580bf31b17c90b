"""Envoy's own verdict on every corpus bundle istiod loads: each verdict (b) the agent gives must be a real Envoy
refusing workload mTLS, and each bundle it accepts (verdicts ok and c) must give working mTLS both ways.

The corpus cases (testbed/corpus.py) are written to directories and read back from them; workload certificates are
issued from each the way istiod does and handed to two Envoys the way pilot-agent does (testbed/mesh.py): Envoy
as the server of an mTLS connection verifying a client ("inbound", the `client` purpose) and Envoy as the client
verifying a server ("outbound"), with the bundle's CRLs when ca-crl.pem is not empty. One pair of Envoys serves
every case (static inline secrets, no file watches).

Shapes other than "refused in at least one direction" / "works both ways":

- `key-in-public-file` is a leak, not a breakage: mTLS works, and istiod's signing key sits in every workload's
  Envoy (its admin /config_dump shows it);
- `unparsable-cert-for-envoy`: Envoy refuses to load the secret at all (`envoy --mode validate`);
- URI name constraints depend on the mesh's trust domain, which is not in the bundle: checked for cluster.local and
  for another trust domain;
- `tls-leaf-validity` is for gateways: an Envoy client refusing the expired certificate an Envoy gateway serves.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.errors import BundleError
from agent.validate import validate
from testbed import corpus
from testbed.envoy import Envoy, EnvoyNotFound, ServerTls, UpstreamTls, find_envoy, http_get, tls_errors
from testbed.mesh import MeshCase, MeshOracle, Verdict, envoy_loads, read_case

CATALOG = corpus.catalog()
ISTIO_CA = [c for c in CATALOG if c["kind"] == "istio-ca" and c["cls"] in ("ok", "b", "c")]
#: Envoy cannot load the secret: no handshake to look at
LOAD_REFUSED = {c["name"] for c in ISTIO_CA if c["check"] == "unparsable-cert-for-envoy"}
#: a leak: mTLS works, the key travels
LEAKS = {c["name"] for c in ISTIO_CA if c["check"] == "key-in-public-file"}
#: verdict (c) whose Envoy verdict depends on the mesh's trust domain: (the trust domain that breaks, one that works)
TRUST_DOMAIN_DEPENDENT = {"nc-uri-excluded": ("cluster.local", "example.org"),
                          "nc-uri-permitted": ("example.org", "cluster.local")}
#: verdict (b) proven on Go's side (tests/test_differential.py: the oracle verifies istiod's serving certificate as
#: pilot-agent does): Envoy itself works
GO_SIDE = {c["name"] for c in ISTIO_CA if c["check"] == "istiod-serving-cert"}
BROKEN = [c["name"] for c in ISTIO_CA if c["cls"] == "b" and c["name"] not in LOAD_REFUSED | LEAKS | GO_SIDE]
WORKING = [c["name"] for c in ISTIO_CA if c["cls"] in ("ok", "c") and c["name"] not in TRUST_DOMAIN_DEPENDENT]
GATEWAY_CASES = ("tls-expired-leaf", "tls-leaf-plus-root")


def _td(name: str, trust_domain: str) -> str:
    return f"{name}--td-{trust_domain.replace('.', '-')}"


@pytest.fixture(name="corpus_dirs", scope="module")
def fixture_corpus_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The istio-ca cases istiod loads, and the gateway cases, each written to its own directory."""
    names = {c["name"] for c in ISTIO_CA} | set(GATEWAY_CASES) | {"tls-crt-corrupt-extra"}
    manifest = corpus.write(tmp_path_factory.mktemp("corpus"), corpus.build(names))
    return {str(m["name"]): Path(str(m["dir"])) for m in manifest}


@pytest.fixture(name="oracle", scope="module")
def fixture_oracle(tmp_path_factory: pytest.TempPathFactory, corpus_dirs: dict[str, Path]) -> Iterator[MeshOracle]:
    """Two Envoys checking every case that Envoy can load (skipped without envoy)."""
    try:
        find_envoy()
    except EnvoyNotFound as exc:
        pytest.skip(str(exc))
    cases = [MeshCase.from_dir(corpus_dirs[c["name"]]) for c in ISTIO_CA if c["name"] not in LOAD_REFUSED]
    for name, domains in TRUST_DOMAIN_DEPENDENT.items():
        cases += [MeshCase.from_dir(corpus_dirs[name], _td(name, td), trust_domain=td) for td in domains]
    oracle = MeshOracle(tmp_path_factory.mktemp("mesh"), cases)
    yield oracle
    oracle.close()


def _claim(name: str, corpus_dirs: dict[str, Path]) -> BundleError:
    with pytest.raises(BundleError) as info:
        validate("istio-ca", read_case(corpus_dirs[name]))
    assert info.value.istiod_loads, str(info.value)
    return info.value


def _claimed_directions(message: str) -> set[str] | None:
    """The directions a verdict (b) from the Envoy model names ("both ways", "(inbound)", "(outbound)")."""
    if "refuses every workload certificate both ways" in message:
        return {"inbound", "outbound"}
    if "as client certificates (inbound)" in message:
        return {"inbound"}
    if "as server certificates (outbound)" in message:
        return {"outbound"}
    return None


def test_the_cases_cover_the_corpus() -> None:
    """Every istio-ca corpus case istiod loads is checked here, in exactly one shape."""
    shapes = [set(BROKEN), set(WORKING), LOAD_REFUSED, LEAKS, set(TRUST_DOMAIN_DEPENDENT), GO_SIDE]
    assert sum(len(s) for s in shapes) == len(ISTIO_CA) == len(set().union(*shapes))
    assert {"chain-mid-as-anchor", "key-ed25519", "ec-p224-ca-key", "ok-sha1-root", "pem-crlf",
            "cert-negative-serial-extra-root", "pem-root-other-block-first"} <= set(WORKING)
    assert {"crl-expired", "crl-revokes-intermediate", "crl-missing-for-root", "root-expired-same-key-first",
            "pathlen-mid-0"} <= set(BROKEN)


def test_the_agents_trust_bundle_order_is_the_one_envoy_gets(corpus_dirs: dict[str, Path]) -> None:
    """The agent's model orders the trust bundle as the oracle hands it to Envoy (pilot-agent's sort), for every
    root-cert.pem of the corpus."""
    from agent.validate.boring import trust_bundle_order
    from testbed.mesh import trust_bundle

    for c in ISTIO_CA:
        root = read_case(corpus_dirs[c["name"]])["root-cert.pem"]
        given = re.findall(rb"-----BEGIN CERTIFICATE-----(.*?)-----END CERTIFICATE-----", trust_bundle(root), re.DOTALL)
        ders = [base64.b64decode(b"".join(g.split())) for g in given]
        assert [d for d in ders if d] == trust_bundle_order(root), c["name"]


@pytest.mark.parametrize("name", BROKEN)
def test_verdict_b_is_envoy_refusing_workload_mtls(name: str, oracle: MeshOracle,
                                                    corpus_dirs: dict[str, Path]) -> None:
    """Verdict (b): istiod loads it and Envoy refuses workload mTLS in at least one direction; where the agent
    names the direction(s) and BoringSSL's reason, Envoy agrees on both."""
    claim = _claim(name, corpus_dirs)
    verdicts = dict(zip(("inbound", "outbound"), oracle.both(name), strict=True))
    broken = {d for d, v in verdicts.items() if v.refused()}
    assert broken, verdicts
    assert all(v.accepted for d, v in verdicts.items() if d not in broken), verdicts
    directions = _claimed_directions(str(claim))
    if directions is not None:
        assert broken == directions, (str(claim), verdicts)
    reason = re.search(r'\("([^"]+)" at depth (\d+)\)', str(claim))
    if reason is not None:
        # Envoy puts "certificate revocation check against provided CRLs failed: " before a CRL reason
        said = re.compile(rf"at depth {reason[2]}: (certificate revocation check against provided CRLs failed: )?"
                          rf"{re.escape(reason[1])}")
        for d in broken:
            assert said.search(str(verdicts[d].error)), (str(claim), verdicts[d])


@pytest.mark.parametrize("name", WORKING)
def test_accepted_bundle_gives_working_mtls_both_ways(name: str, oracle: MeshOracle) -> None:
    """Verdicts ok and (c): the agent accepts the bundle, and Envoy completes workload mTLS both ways."""
    inbound, outbound = oracle.both(name)
    assert inbound.accepted, inbound
    assert outbound.accepted, outbound


@pytest.mark.parametrize("name", sorted(GO_SIDE))
def test_go_side_refusals_are_not_envoys(name: str, oracle: MeshOracle) -> None:
    """`istiod-serving-cert`: Envoy ignores a trust anchor's pathlen and works both ways; the refusal rests on Go
    (pilot-agent refusing istiod's serving certificate), which the differential test checks."""
    inbound, outbound = oracle.both(name)
    assert inbound.accepted and outbound.accepted, (inbound, outbound)


@pytest.mark.parametrize("name", sorted(TRUST_DOMAIN_DEPENDENT))
def test_uri_name_constraints_depend_on_the_trust_domain(name: str, oracle: MeshOracle,
                                                         corpus_dirs: dict[str, Path]) -> None:
    """URI name constraints: Envoy applies them to the workload's spiffe URI, so the same bundle breaks both ways
    for one trust domain and works for another; the agent, which does not know the trust domain, accepts it and
    warns (naming cluster.local when it is the one that breaks)."""
    info = validate("istio-ca", read_case(corpus_dirs[name]))
    assert any("constrains URI names" in w for w in info.warnings), info.warnings
    breaks, works = TRUST_DOMAIN_DEPENDENT[name]
    reason = "excluded subtree violation" if name == "nc-uri-excluded" else "permitted subtree violation"
    for verdict in oracle.both(_td(name, breaks)):
        assert verdict.refused(f"at depth 0: {reason}"), verdict
    for verdict in oracle.both(_td(name, works)):
        assert verdict.accepted, verdict
    if breaks == "cluster.local":
        assert any("refuses every workload certificate of trust domain cluster.local" in w for w in info.warnings)


def _inline_bytes(dump: object) -> Iterator[bytes]:
    if isinstance(dump, dict):
        for key, value in dump.items():
            if key == "inline_bytes" and isinstance(value, str):
                yield base64.b64decode(value)
            else:
                yield from _inline_bytes(value)
    elif isinstance(dump, list):
        for item in dump:
            yield from _inline_bytes(item)


@pytest.mark.parametrize("name", sorted(LEAKS))
def test_key_in_public_file_is_a_leak_to_every_workload(name: str, oracle: MeshOracle,
                                                        corpus_dirs: dict[str, Path]) -> None:
    """`key-in-public-file`: nothing breaks (mTLS works both ways), but the private key in cert-chain.pem or
    root-cert.pem reaches every workload's Envoy: its admin /config_dump shows it in the certificate chain or the
    trust bundle (Envoy redacts only the secret's own private_key)."""
    _claim(name, corpus_dirs)
    inbound, outbound = oracle.both(name)
    assert inbound.accepted and outbound.accepted, (inbound, outbound)
    files = read_case(corpus_dirs[name])
    leaked = [f for f in ("cert-chain.pem", "root-cert.pem") if b"PRIVATE KEY-----" in files[f]]
    (source,) = leaked
    key_block = re.search(rb"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?-----END [A-Z ]*PRIVATE KEY-----", files[source],
                          re.DOTALL)
    assert key_block is not None
    dump = oracle.servers.config_dump("static_secrets")
    secrets = [b for b in _inline_bytes(dump) if key_block[0] in b]
    assert secrets, f"the key of {source} is not in Envoy's config dump"
    assert b"[redacted]" in list(_inline_bytes(dump))  # what Envoy does hide: the secret's own private_key


@pytest.mark.parametrize("name", sorted(LOAD_REFUSED))
def test_unparsable_certificate_makes_envoy_refuse_the_secret(name: str, corpus_dirs: dict[str, Path],
                                                              tmp_path: Path) -> None:
    """`unparsable-cert-for-envoy`: Envoy refuses to load the workload's certificate chain (leaf, cert-chain.pem,
    root-cert.pem), and for a bad root-cert.pem block also the trust bundle, so it has no TLS context at all."""
    _claim(name, corpus_dirs)
    loads = envoy_loads(tmp_path, read_case(corpus_dirs[name]))
    assert not loads["certificate"].ok, loads["certificate"].output[-500:]
    assert "Failed to load certificate chain" in loads["certificate"].error, loads["certificate"].error
    if not loads["trust"].ok:
        assert "Failed to load trusted CA certificates" in loads["trust"].error, loads["trust"].error


def test_loadable_secrets_control(corpus_dirs: dict[str, Path], tmp_path: Path) -> None:
    """Control for the shape above: a bundle the agent accepts loads in Envoy's validate mode."""
    loads = envoy_loads(tmp_path, read_case(corpus_dirs["ok-ec-p256"]))
    assert loads["certificate"].ok and loads["trust"].ok, {k: v.output[-300:] for k, v in loads.items()}


# ---------------------------------------------------------------------------------------------- gateways


def _last_certificate(pem: bytes) -> bytes:
    blocks = re.findall(rb"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----\n?", pem, re.DOTALL)
    return blocks[-1]


@pytest.fixture(name="gateway", scope="module")
def fixture_gateway(tmp_path_factory: pytest.TempPathFactory, corpus_dirs: dict[str, Path]
                    ) -> Iterator[tuple[Envoy, Envoy]]:
    """An Envoy gateway serving each gateway case's tls.crt/tls.key (as pilot-agent hands them over), and an Envoy
    client trusting the root at the end of that tls.crt."""
    try:
        find_envoy()
    except EnvoyNotFound as exc:
        pytest.skip(str(exc))
    work = tmp_path_factory.mktemp("gateway")
    for name in GATEWAY_CASES:
        served = (corpus_dirs[name] / "tls.crt").read_bytes()
        (corpus_dirs[name] / "client-ca.crt").write_bytes(_last_certificate(served))
    with Envoy(work / "gateway", listeners=[ServerTls(n, corpus_dirs[n], sds="static") for n in GATEWAY_CASES]) as gw:
        clients = [UpstreamTls(f"{n}-client", gw.port(n), corpus_dirs[n], cert="tls.crt", key="tls.key",
                               ca="client-ca.crt", sds="static") for n in GATEWAY_CASES]
        with Envoy(work / "clients", upstreams=clients) as client:
            yield gw, client


def _gateway_verdict(client: Envoy, name: str) -> Verdict:
    mark = client.log_mark()
    result = http_get(client.port(f"{name}-client"))
    stats = client.ssl_stats(f"{name}-client")
    errors = tls_errors(client.log_text(mark))
    moved = {k: v for k, v in stats.items() if k in ("handshake", "fail_verify_error") and v}
    return Verdict(result.ok and result.body == f"ok {name}", errors[0] if errors else None, moved)


def test_gateway_serving_an_expired_certificate_is_refused_by_envoy_clients(
        gateway: tuple[Envoy, Envoy], corpus_dirs: dict[str, Path]) -> None:
    """`tls-leaf-validity`: pilot-agent would serve the expired tls.crt (it loads), and an Envoy client trusting
    its issuer refuses it: "certificate has expired" at depth 0."""
    with pytest.raises(BundleError) as info:
        validate("tls", {f: (corpus_dirs["tls-expired-leaf"] / f).read_bytes() for f in ("tls.crt", "tls.key")})
    assert info.value.check == "tls-leaf-validity"
    _, client = gateway
    verdict = _gateway_verdict(client, "tls-expired-leaf")
    assert not verdict.ok and verdict.error is not None, verdict
    assert "at depth 0: certificate has expired" in verdict.error, verdict


def test_gateway_control_a_valid_certificate_is_accepted(gateway: tuple[Envoy, Envoy]) -> None:
    """Control: the same setup with a valid leaf and its root (corpus tls-leaf-plus-root) works."""
    _, client = gateway
    verdict = _gateway_verdict(client, "tls-leaf-plus-root")
    assert verdict.ok and verdict.error is None, verdict


def test_gateway_unparsable_certificate_is_refused_by_envoy(corpus_dirs: dict[str, Path], tmp_path: Path) -> None:
    """`unparsable-cert-for-envoy` for gateways: Envoy refuses to load a tls.crt with a block that is not a
    certificate."""
    d = corpus_dirs["tls-crt-corrupt-extra"]
    ok, output = Envoy(tmp_path / "gw", listeners=[ServerTls("gw", d, sds="static")]).validate_config()
    assert not ok and "Failed to load certificate chain" in output, output[-500:]
