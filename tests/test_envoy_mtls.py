"""Workload mTLS oracle: which istio-ca bundles istiod would load but Envoy's BoringSSL then refuses between workloads.

Workload certificates are issued from each bundle the way istiod does and handed to Envoy the way pilot-agent does
(testbed/mesh.py), and real Envoys check them both ways: (i) as a MUTUAL server verifying a client's chain,
(ii) as a client verifying a server's chain. These are hand-built bundles that isolate one property each;
tests/test_envoy_verdicts.py runs the corpus itself. `python -m tests.test_envoy_mtls` prints the verdict table.
"""

from __future__ import annotations

import datetime as dt
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from testbed import pki
from testbed.envoy import Envoy, EnvoyNotFound, UpstreamTls, find_envoy, http_get
from testbed.mesh import (
    TRUST_DOMAIN,
    MeshCase,
    MeshOracle,
    PyTlsServer,
    Verdict,
    istiod_sign,
    spiffe_id,
    trust_bundle,
    uri_sans,
)
from tests.support import wait_until

__all__ = ["TRUST_DOMAIN", "build_cases"]


# ---------------------------------------------------------------------------------------------- the cases


def _ago(days: int) -> dt.datetime:
    return dt.datetime.now(dt.UTC) - dt.timedelta(days=days)


def _with(files: dict[str, bytes], **replace: bytes) -> dict[str, bytes]:
    return {**files, **{k.replace("_", "-") + ".pem": v for k, v in replace.items()}}


def build_cases() -> list[MeshCase]:
    """Every bundle the oracle checks, with istiod's expected verdict (Go's x509.Verify of ca-cert.pem against
    root-cert.pem with cert-chain.pem as intermediates, default ServerAuth usage; keycertbundle.go Verify)."""
    eku = ExtendedKeyUsageOID
    nc = x509.NameConstraints
    root = pki.root_ca()
    good = pki.intermediate_ca(root)
    files = pki.istio_ca_files(root, good)
    cases = [MeshCase("good", files, "loads")]

    # (a) pathLenConstraint: Go counts only the intermediates below a CA in the chain it verifies, and the chain
    # istiod verifies ends at ca-cert.pem, so none of these stop istiod.
    root0 = pki.root_ca(path_length=0)
    cases.append(MeshCase("a-root-pathlen0", pki.istio_ca_files(root0, pki.intermediate_ca(root0)),
                          "loads (no intermediate below the root in ca-cert.pem's own chain)"))
    root1 = pki.root_ca(path_length=1)
    mid = pki.intermediate_ca(root1, cn="Mid CA", path_length=None)
    cases.append(MeshCase("a-root-pathlen1-two-below", pki.istio_ca_files(root1, pki.intermediate_ca(mid)),
                          "loads (one intermediate below the root in ca-cert.pem's own chain)"))
    mid0 = pki.intermediate_ca(root, cn="Mid CA", path_length=0)
    cases.append(MeshCase("a-mid-pathlen0", pki.istio_ca_files(root, pki.intermediate_ca(mid0)),
                          "loads (no intermediate below Mid CA in ca-cert.pem's own chain)"))

    # (b) Go does not look at keyUsage when it builds a path; startup only checks IsCA
    cases.append(MeshCase("b-no-keycertsign", pki.istio_ca_files(root, pki.intermediate_ca(root, key_cert_sign=False)),
                          "loads (Go ignores keyUsage on CAs)"))

    # (c) Go's Verify finds ca-cert.pem's issuer in root-cert.pem; cert-chain.pem is only a pool
    cases.append(MeshCase("c-chain-only-root", _with(files, cert_chain=root.cert_pem),
                          "loads (cert-chain.pem is only an intermediates pool)"))
    sibling = pki.intermediate_ca(root, cn="Sibling CA")
    cases.append(MeshCase("c-chain-other-intermediate", _with(files, cert_chain=sibling.cert_pem + root.cert_pem),
                          "loads (ca-cert.pem is not required in cert-chain.pem)"))
    cases.append(MeshCase("c-chain-root-first", _with(files, cert_chain=root.cert_pem + good.cert_pem),
                          "loads"))

    # (d) Go's Verify asks for ServerAuth through the chain
    cases.append(MeshCase("d-ca-eku-serverauth",
                          pki.istio_ca_files(root, pki.intermediate_ca(root, extended_key_usage=[eku.SERVER_AUTH])),
                          "loads (ServerAuth is what Verify asks for)"))
    cases.append(MeshCase("d-ca-eku-clientauth",
                          pki.istio_ca_files(root, pki.intermediate_ca(root, extended_key_usage=[eku.CLIENT_AUTH])),
                          "refuses: incompatible key usage (an (a) verdict; here for symmetry)"))

    # (e) the constraints sit in ca-cert.pem, the leaf of the chain istiod verifies: Go applies none of them
    def constrained(name_constraints: x509.NameConstraints) -> dict[str, bytes]:
        return pki.istio_ca_files(root, pki.intermediate_ca(root, name_constraints=name_constraints))

    cases.append(MeshCase("e-nc-dns-only", constrained(nc([x509.DNSName("example.com")], None)),
                          "loads (constraints in ca-cert.pem bind only what it signs)"))
    cases.append(MeshCase("e-nc-exclude-trust-domain",
                          constrained(nc(None, [x509.UniformResourceIdentifier(TRUST_DOMAIN)])), "loads"))
    cases.append(MeshCase("e-nc-permit-other-uri",
                          constrained(nc([x509.UniformResourceIdentifier("example.com")], None)), "loads"))
    cases.append(MeshCase("e-nc-permit-trust-domain",
                          constrained(nc([x509.UniformResourceIdentifier(TRUST_DOMAIN)], None)), "loads"))

    # (f) controls
    mid_f = pki.intermediate_ca(root, cn="Mid CA", path_length=None)
    deep = pki.intermediate_ca(mid_f)
    deep_files = pki.istio_ca_files(root, deep)
    cases.append(MeshCase("f-unordered-chain",
                          _with(deep_files, cert_chain=pki.pem_certs(root.cert, deep.cert, mid_f.cert)),
                          "loads (Verify builds a path from the pool)"))
    old_other_key = pki.root_ca(not_before=_ago(4000), not_after=_ago(400))
    cases.append(MeshCase("f-expired-root-other-key", _with(files, root_cert=old_other_key.cert_pem + root.cert_pem),
                          "loads (the expired root is not on the path)"))
    # pilot-agent sorts the trust bundle's PEM blocks as text (testbed.mesh.trust_bundle), so the order Envoy
    # sees is drawn, not chosen: one earlier issue that sorts after the live root, one that sorts before it
    renewed = {}
    while len(renewed) < 2:
        old_same_key = pki.root_ca(key=root.key, not_before=_ago(4000), not_after=_ago(400))
        pair = old_same_key.cert_pem + root.cert_pem
        renewed.setdefault(trust_bundle(pair).startswith(old_same_key.cert_pem.rstrip(b"\n")), pair)
    cases.append(MeshCase("f-expired-renewed-root-last", _with(files, root_cert=renewed[False]), "loads"))
    cases.append(MeshCase("f-expired-renewed-root-first", _with(files, root_cert=renewed[True]),
                          "loads (Go tries every candidate root and keeps the valid path)"))
    stranger = pki.root_ca(cn="Unrelated CA", org="Elsewhere")
    cases.append(MeshCase("f-chain-extra-unrelated",
                          _with(files, cert_chain=pki.pem_certs(good.cert, stranger.cert, root.cert)), "loads"))
    return cases


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(name="oracle", scope="module")
def fixture_oracle(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MeshOracle]:
    """One Envoy checking every case of `build_cases` (skipped without envoy)."""
    try:
        find_envoy()
    except EnvoyNotFound as exc:
        pytest.skip(str(exc))
    oracle = MeshOracle(tmp_path_factory.mktemp("mesh"), build_cases())
    yield oracle
    oracle.close()


def accepted(verdict: Verdict) -> bool:
    """Envoy completed the handshake and verified nothing wrong."""
    return verdict.accepted


def refused(verdict: Verdict, reason: str) -> bool:
    """Envoy refused the peer's chain (fail_verify_error) and BoringSSL's report contains `reason`."""
    return verdict.refused(reason)


def both(oracle: MeshOracle, name: str) -> tuple[Verdict, Verdict]:
    """(inbound, outbound) verdicts for case `name`."""
    return oracle.both(name)


# ---------------------------------------------------------------------------------------------- tests


class TestOracle:
    def test_workload_certificate_has_istiods_shape(self):
        """A workload certificate carries what istiod puts in one: the spiffe URI only, critical, and both EKUs."""
        root = pki.root_ca()
        files = pki.istio_ca_files(root, pki.intermediate_ca(root))
        wl = istiod_sign(files, "x")
        assert wl.leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).critical
        assert uri_sans(wl.leaf) == [spiffe_id("x")]
        assert list(wl.leaf.subject) == []
        ekus = wl.leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert list(ekus) == [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
        assert wl.leaf.extensions.get_extension_for_class(x509.KeyUsage).critical
        assert wl.leaf.issuer == x509.load_pem_x509_certificate(files["ca-cert.pem"]).subject
        assert wl.leaf.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "Intermediate CA"
        assert wl.chain_pem == wl.leaf_pem + files["cert-chain.pem"] + files["root-cert.pem"]
        assert wl.trust_pem == files["root-cert.pem"].rstrip(b"\n")  # one root: mergeTrustAnchorBytes trims

    def test_control_good_bundle_passes_both_ways(self, oracle, tmp_path):
        """Control: a bundle shaped like istio's Makefile gives working mTLS in both directions, and outbound
        Envoy presents its own workload certificate (seen by a Python server that requires exactly that one)."""
        inbound, outbound = both(oracle, "good")
        assert accepted(inbound), inbound
        assert accepted(outbound), outbound
        issued = oracle.workloads["good"]
        server = PyTlsServer(tmp_path / "py", issued["x"], issued["envoy"].leaf)
        (tmp_path / "leaf.crt").write_bytes(issued["envoy"].leaf_pem)
        (tmp_path / "leaf.key").write_bytes(issued["envoy"].key_pem)
        (tmp_path / "trust.pem").write_bytes(issued["envoy"].trust_pem)
        try:
            with Envoy(tmp_path / "envoy", upstreams=[
                UpstreamTls("to-py", server.port, tmp_path, cert="leaf.crt", key="leaf.key", ca="trust.pem",
                            match_sans=[spiffe_id("x")], sds="static")
            ]) as envoy:
                assert http_get(envoy.port("to-py")).body == "ok upstream"
        finally:
            server.close()
        seen = server.seen[-1]
        assert isinstance(seen, bytes), seen
        assert uri_sans(x509.load_der_x509_certificate(seen)) == [spiffe_id("envoy")]

    def test_control_outbound_checks_the_spiffe_identity(self, oracle, tmp_path):
        """Control: the outbound side refuses a server whose spiffe URI is not the expected one (fail_verify_san)."""
        d = oracle.workdir / "good"
        with Envoy(tmp_path / "envoy", upstreams=[
            UpstreamTls("wrong-sa", oracle.server_port("good"), d, cert="envoy.crt", key="envoy.key", ca="trust.pem",
                        match_sans=[spiffe_id("someone-else")], sds="static")
        ]) as envoy:
            assert http_get(envoy.port("wrong-sa")).status == 503
            assert wait_until(lambda: envoy.ssl_stats("wrong-sa").get("fail_verify_san") == 1, 5)

    def test_control_inbound_refuses_a_foreign_ca(self, oracle):
        """Control: the inbound side refuses a client whose chain comes from another mesh's CA."""
        other = pki.root_ca(cn="Other mesh")
        foreign = istiod_sign(pki.istio_ca_files(other, pki.intermediate_ca(other)), "a")
        verdict = oracle.inbound("good", client=foreign)
        assert refused(verdict, "at depth 2: self signed certificate in certificate chain"), verdict


class TestPathLength:
    def test_a_root_pathlen0_above_ca_cert_is_ignored_by_envoy(self, oracle):
        """(a) root pathlen:0 directly above ca-cert.pem: Envoy accepts both ways. BoringSSL does not apply a
        self-signed root's pathLenConstraint; OpenSSL 3 and Go's crypto/x509 do ("path length constraint
        exceeded", "too many intermediates"), so Go peers such as pilot-agent verifying istiod's serving
        certificate would still break. Not a (b) case as far as Envoy is concerned."""
        inbound, outbound = both(oracle, "a-root-pathlen0")
        assert accepted(inbound), inbound
        assert accepted(outbound), outbound

    def test_a_root_pathlen1_above_two_intermediates_is_ignored_by_envoy(self, oracle):
        """(a) root pathlen:1 above Mid CA above ca-cert.pem: Envoy accepts both ways, for the same reason."""
        inbound, outbound = both(oracle, "a-root-pathlen1-two-below")
        assert accepted(inbound), inbound
        assert accepted(outbound), outbound

    def test_a_intermediate_pathlen0_above_ca_cert_breaks_both_ways(self, oracle):
        """(a) Mid CA pathlen:0 above ca-cert.pem: istiod loads it, Envoy refuses every workload both ways with
        "certificate verification error at depth 2: path length constraint exceeded". A (b) case."""
        inbound, outbound = both(oracle, "a-mid-pathlen0")
        assert refused(inbound, "at depth 2: path length constraint exceeded"), inbound
        assert refused(outbound, "at depth 2: path length constraint exceeded"), outbound


class TestKeyUsage:
    def test_b_ca_cert_without_keycertsign_breaks_both_ways(self, oracle):
        """(b) ca-cert.pem with keyUsage but no keyCertSign: istiod loads it, Envoy refuses both ways with
        "at depth 0: unable to get local issuer certificate" (BoringSSL does not take it as an issuer). A (b) case."""
        inbound, outbound = both(oracle, "b-no-keycertsign")
        assert refused(inbound, "at depth 0: unable to get local issuer certificate"), inbound
        assert refused(outbound, "at depth 0: unable to get local issuer certificate"), outbound


class TestCertChain:
    def test_c_chain_with_only_the_root_breaks_both_ways(self, oracle):
        """(c) cert-chain.pem holding only the root: istiod loads it, but no workload chain reaches ca-cert.pem;
        Envoy refuses both ways with "at depth 0: unable to get local issuer certificate". A (b) case."""
        inbound, outbound = both(oracle, "c-chain-only-root")
        assert refused(inbound, "at depth 0: unable to get local issuer certificate"), inbound
        assert refused(outbound, "at depth 0: unable to get local issuer certificate"), outbound

    def test_c_chain_starting_with_another_intermediate_breaks_both_ways(self, oracle):
        """(c) cert-chain.pem = a sibling intermediate + root (ca-cert.pem missing): Envoy refuses both ways with
        "at depth 0: unable to get local issuer certificate". A (b) case."""
        inbound, outbound = both(oracle, "c-chain-other-intermediate")
        assert refused(inbound, "at depth 0: unable to get local issuer certificate"), inbound
        assert refused(outbound, "at depth 0: unable to get local issuer certificate"), outbound

    def test_c_chain_starting_with_the_root_still_works(self, oracle):
        """(c) cert-chain.pem = root + ca-cert.pem (not starting with ca-cert.pem): Envoy accepts both ways;
        BoringSSL builds the path whatever the order. Not a (b) case."""
        inbound, outbound = both(oracle, "c-chain-root-first")
        assert accepted(inbound), inbound
        assert accepted(outbound), outbound


class TestExtendedKeyUsage:
    def test_d_ca_cert_eku_serverauth_only_breaks_inbound(self, oracle):
        """(d) ca-cert.pem with EKU serverAuth only: istiod loads it; Envoy as server refuses every client with
        "at depth 1: unsupported certificate purpose", Envoy as client accepts servers. Between two Envoys the
        server side refuses, so mTLS fails. A (b) case."""
        inbound, outbound = both(oracle, "d-ca-eku-serverauth")
        assert refused(inbound, "at depth 1: unsupported certificate purpose"), inbound
        assert accepted(outbound), outbound

    def test_d_ca_cert_eku_clientauth_only_breaks_outbound(self, oracle):
        """(d, mirror) ca-cert.pem with EKU clientAuth only: Envoy as client refuses servers ("at depth 1:
        unsupported certificate purpose"), as server accepts clients. istiod refuses this bundle anyway."""
        inbound, outbound = both(oracle, "d-ca-eku-clientauth")
        assert accepted(inbound), inbound
        assert refused(outbound, "at depth 1: unsupported certificate purpose"), outbound


class TestNameConstraints:
    def test_e_dns_only_constraints_leave_spiffe_uris_alone(self, oracle):
        """(e) ca-cert.pem permitting only DNS:example.com: URIs are another name type, unconstrained; Envoy
        accepts both ways. Not a (b) case."""
        inbound, outbound = both(oracle, "e-nc-dns-only")
        assert accepted(inbound), inbound
        assert accepted(outbound), outbound

    def test_e_excluding_the_trust_domain_breaks_both_ways(self, oracle):
        """(e) ca-cert.pem excluding URI cluster.local: istiod loads it and signs spiffe://cluster.local/...;
        Envoy refuses both ways with "at depth 0: excluded subtree violation". A (b) case."""
        inbound, outbound = both(oracle, "e-nc-exclude-trust-domain")
        assert refused(inbound, "at depth 0: excluded subtree violation"), inbound
        assert refused(outbound, "at depth 0: excluded subtree violation"), outbound

    def test_e_permitting_only_another_uri_domain_breaks_both_ways(self, oracle):
        """(e) ca-cert.pem permitting only URI example.com: Envoy refuses both ways with "at depth 0: permitted
        subtree violation". A (b) case."""
        inbound, outbound = both(oracle, "e-nc-permit-other-uri")
        assert refused(inbound, "at depth 0: permitted subtree violation"), inbound
        assert refused(outbound, "at depth 0: permitted subtree violation"), outbound

    def test_e_permitting_the_trust_domain_works(self, oracle):
        """(e, control) ca-cert.pem permitting URI cluster.local: Envoy accepts both ways."""
        inbound, outbound = both(oracle, "e-nc-permit-trust-domain")
        assert accepted(inbound), inbound
        assert accepted(outbound), outbound


class TestControls:
    def test_f_unordered_chain_works(self, oracle):
        """(f) a three-level cert-chain.pem in the order root, ca-cert.pem, Mid CA: Envoy accepts both ways."""
        inbound, outbound = both(oracle, "f-unordered-chain")
        assert accepted(inbound), inbound
        assert accepted(outbound), outbound

    def test_f_extra_expired_root_with_another_key_works(self, oracle):
        """(f) an expired root of another key before the live root in root-cert.pem: Envoy accepts both ways."""
        inbound, outbound = both(oracle, "f-expired-root-other-key")
        assert accepted(inbound), inbound
        assert accepted(outbound), outbound

    def test_f_expired_renewed_root_after_the_live_one_works(self, oracle):
        """(f) the live root, then an expired earlier issue of it (same name and key): Envoy accepts both ways."""
        inbound, outbound = both(oracle, "f-expired-renewed-root-last")
        assert accepted(inbound), inbound
        assert accepted(outbound), outbound

    def test_f_expired_renewed_root_first_breaks_both_ways(self, oracle):
        """(f, found here) an expired earlier issue of the root (same name and key) *before* the live root:
        istiod loads it, but BoringSSL takes the first matching root and refuses both ways with "at depth 2:
        certificate has expired". A (b) case: after renewing a root with the same key, list the new one first."""
        inbound, outbound = both(oracle, "f-expired-renewed-root-first")
        assert refused(inbound, "at depth 2: certificate has expired"), inbound
        assert refused(outbound, "at depth 2: certificate has expired"), outbound

    def test_f_chain_with_an_extra_unrelated_certificate_works(self, oracle):
        """(f) cert-chain.pem with an unrelated CA certificate in the middle: Envoy accepts both ways."""
        inbound, outbound = both(oracle, "f-chain-extra-unrelated")
        assert accepted(inbound), inbound
        assert accepted(outbound), outbound


def main() -> int:
    """Print the verdict table (markdown) for every case."""
    cases = build_cases()
    with tempfile.TemporaryDirectory(prefix="mesh-oracle-") as tmp:
        oracle = MeshOracle(Path(tmp), cases)
        try:
            print("| case | istiod | Envoy server (inbound) | Envoy client (outbound) |")
            print("|---|---|---|---|")
            for case in cases:
                inbound, outbound = oracle.inbound(case.name), oracle.outbound(case.name)
                print(f"| {case.name} | {case.istiod} | {inbound.describe()} | {outbound.describe()} |")
        finally:
            oracle.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
