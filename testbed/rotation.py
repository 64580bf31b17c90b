"""A root rotation's material for tests: root A, new root B, and per cluster an intermediate under each.

The four phases and what each cluster's bundle holds in them (issue 20; the byte rules are exact):

- ``A``: root-cert.pem = A; ca-cert.pem = I_A(C); cert-chain.pem = I_A(C), A.
- ``trust``: root-cert.pem = the current bytes, then B's PEM (the old bytes a byte-for-byte prefix, a newline put
  between only when they lack one); the intermediate unchanged.
- ``sign``: root-cert.pem unchanged (A+B); ca-cert.pem = I_B(C); cert-chain.pem = I_B(C), B.
- ``retire``: root-cert.pem = B alone; the intermediate of ``sign``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from testbed import pki

__all__ = ["PHASES", "Rotation", "after"]

#: the phases in order
PHASES = ("A", "trust", "sign", "retire")


def after(current_root: bytes, extra: bytes) -> bytes:
    """`current_root` byte for byte, then `extra`: the trust phase's rule (a newline between only when missing)."""
    return current_root + (b"" if current_root.endswith(b"\n") else b"\n") + extra


@dataclass
class Rotation:
    """Roots A and B and, per cluster, the intermediates I_A(C) and I_B(C) (EC P-256, made once)."""

    clusters: tuple[str, ...] = ("east", "west")
    root_a: pki.CertKey = field(default_factory=lambda: pki.root_ca(cn="Root A"))
    root_b: pki.CertKey = field(default_factory=lambda: pki.root_ca(cn="Root B"))
    inter_a: dict[str, pki.CertKey] = field(default_factory=dict)
    inter_b: dict[str, pki.CertKey] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for c in self.clusters:
            self.inter_a.setdefault(c, pki.intermediate_ca(self.root_a, cluster=c))
            self.inter_b.setdefault(c, pki.intermediate_ca(self.root_b, cluster=c))

    @staticmethod
    def _intermediate(inter: pki.CertKey, root: pki.CertKey, root_cert: bytes) -> dict[str, bytes]:
        return {
            "ca-key.pem": inter.key_pem,
            "ca-cert.pem": inter.cert_pem,
            "cert-chain.pem": pki.pem_certs(inter.cert, root.cert),
            "root-cert.pem": root_cert,
        }

    def files(self, cluster: str, phase: str, current_root: bytes | None = None) -> dict[str, bytes]:
        """Cluster `cluster`'s bundle in `phase`; `current_root` is its root-cert.pem of the phase before (the
        trust and sign phases keep those bytes; default: what the phases before would have written)."""
        if phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r}; use one of {PHASES}")
        if current_root is None and phase in ("trust", "sign"):
            current_root = self.files(cluster, PHASES[PHASES.index(phase) - 1])["root-cert.pem"]
        a, b = self.root_a, self.root_b
        if phase == "A":
            return self._intermediate(self.inter_a[cluster], a, current_root or a.cert_pem)
        if phase == "trust":
            assert current_root is not None
            return self._intermediate(self.inter_a[cluster], a, after(current_root, b.cert_pem))
        if phase == "sign":
            assert current_root is not None
            return self._intermediate(self.inter_b[cluster], b, current_root)
        return self._intermediate(self.inter_b[cluster], b, b.cert_pem)

    def walk(self, order: Iterable[str]) -> list[tuple[str, str, dict[str, bytes]]]:
        """Every write of a whole rotation, cluster by cluster in `order` within each phase: (phase, cluster,
        files), starting with phase A."""
        current = {c: self.files(c, "A") for c in self.clusters}
        steps = [("A", c, current[c]) for c in order]
        for phase in PHASES[1:]:
            for c in order:
                current[c] = self.files(c, phase, current[c]["root-cert.pem"])
                steps.append((phase, c, current[c]))
        return steps
