"""Which checks depend on the mesh: Istio's version, ambient (ztunnel) and the compliance policy. A pure table that
the validator, the `check` command and the worker's one "skipped" log line read; docs/istio-versions.md explains it.

Every version below was read from source (istio/istio and istio/ztunnel tags, named where used). A version without
a patch ("1.24") is taken as its first patch (1.24.0), so a check that a later patch made unnecessary stays on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from agent.text import shown

__all__ = [
    "CHECKS",
    "COMPLIANCE_POLICIES",
    "FIPS_140_3",
    "FIPS_CHECK",
    "RELOAD_RULE",
    "THREE_LEVEL",
    "ZTUNNEL_ROOTS",
    "Decision",
    "Mesh",
    "Version",
    "fips_applies",
    "parse_version",
    "plan",
    "reload_rule",
    "skipped",
    "three_level_broken",
    "ztunnel_roots",
]

#: the check names, as `check` prints them and docs/istio-versions.md documents them
THREE_LEVEL = "ztunnel-three-level-chain"
ZTUNNEL_ROOTS = "ztunnel-roots"
FIPS_CHECK = "fips-140-3-keys"
RELOAD_RULE = "multiroot-reload-rule"
CHECKS = (THREE_LEVEL, ZTUNNEL_ROOTS, FIPS_CHECK, RELOAD_RULE)

#: istio pkg/features/security.go COMPLIANCE_POLICY values ("" = none); only fips-140-3 changes a verdict
FIPS_140_3 = "fips-140-3"
COMPLIANCE_POLICIES = ("", "fips-140-2", FIPS_140_3, "pqc")

#: ASCII digits only (\d would take fullwidth and other Unicode digits), no leading zero, at most three digits;
#: the chart's _helpers.tpl istio-vault-agent.istio uses the same pattern
_NUMBER = r"(0|[1-9][0-9]{0,2})"
_VERSION = re.compile(rf"{_NUMBER}\.{_NUMBER}(?:\.{_NUMBER})?")


@dataclass(frozen=True, order=True)
class Version:
    """An Istio release, MAJOR.MINOR.PATCH; `exact` is false when the patch was not given (then it is 0)."""

    major: int
    minor: int
    patch: int = 0
    exact: bool = field(default=True, compare=False)

    def at_least(self, *fixed: tuple[int, int, int]) -> bool:
        """Whether this release has a fix released as each of `fixed` (one per minor line; a later minor has it
        when the last one given is older)."""
        me = (self.major, self.minor, self.patch)
        for f in fixed:
            if (self.major, self.minor) == f[:2]:
                return me >= f
        return me > max(fixed)

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.patch}" if self.exact else f"{self.major}.{self.minor}"


def parse_version(text: str) -> Version:
    """`1.29` or `1.29.6` (a leading v is allowed) as a Version; no pre-release or build suffix, no leading zeros.

    Raises:
        ValueError: one sentence saying what form is expected.
    """
    m = _VERSION.fullmatch(text.strip().removeprefix("v"))
    if m is None or int(m[1]) != 1:
        raise ValueError("expected an Istio version such as 1.29 or 1.29.6 (MAJOR.MINOR[.PATCH]), "
                         f"not {shown(text, 40)!r}")
    return Version(int(m[1]), int(m[2]), int(m[3] or 0), exact=m[3] is not None)


@dataclass(frozen=True)
class Mesh:
    """What the agent knows of the mesh it feeds (config `istio:`, or `check`'s flags)."""

    #: None: unknown, so the version-aware checks are skipped (today's verdicts)
    version: Version | None = None
    #: ambient data plane: ztunnel gets its certificates from istiod too
    ambient: bool = False
    #: istiod's COMPLIANCE_POLICY ("" none)
    compliance_policy: str = ""


@dataclass(frozen=True)
class Decision:
    """One version-aware check for one mesh: on or off, and why, in a phrase."""

    check: str
    on: bool
    why: str
    #: off only because the Istio version is unknown (what the one log line names)
    needs_version: bool = False


def three_level_broken(v: Version) -> bool:
    """ztunnel keeps only the first certificate of each element of istiod's CSR answer, and istiod sent all of
    cert-chain.pem as one element until it answered one certificate per element (istio/istio#55383, #55384, for
    istio/ztunnel#1061; in 1.24.4 and 1.25.1): before those, only ca-cert.pem reaches ztunnel's peers."""
    return not v.at_least((1, 24, 4), (1, 25, 1))


def ztunnel_roots(v: Version) -> str:
    """Which certificates of root-cert.pem ztunnel `v` trusts: "first", "last" or "all".

    Before 1.24.4/1.25.1 istiod sent root-cert.pem as one element and ztunnel read its first certificate; 1.24.4
    and 1.25.1 split it too (a regression, istio/istio#55793) and ztunnel took the last element, the last root;
    1.24.5 and 1.25.2 send it whole again (#55850, #55851), read as before: the first root; ztunnel 1.24.6, 1.25.3
    and 1.26.0 read every root (ztunnel#1510, #1546, #1547: `parse_cert_multi`, `add_parsable_certificates`).
    """
    if v.at_least((1, 24, 6), (1, 25, 3), (1, 26, 0)):
        return "all"
    if (v.major, v.minor, v.patch) in ((1, 24, 4), (1, 25, 1)):
        return "last"
    return "first"


def reload_rule(v: Version | None) -> str:
    """How istiod compares a changed root-cert.pem with ISTIO_MULTIROOT_MESH=true (pilot/pkg/bootstrap/istio_ca.go
    handleEvent): "bytes" up to 1.29 (one file's bytes inside the other's), "der-sets" from 1.30.0 (#59909);
    unknown: "der-sets", the agent's verdict before it knew versions."""
    return "bytes" if v is not None and (v.major, v.minor) <= (1, 29) else "der-sets"


def fips_applies(mesh: Mesh) -> bool:
    """COMPLIANCE_POLICY=fips-140-3 makes the istiod chart (1.31+) run istiod with GODEBUG=fips140=only and the
    injection template give every pilot-agent the same (#59847); an istiod known to be older has no such policy."""
    return mesh.compliance_policy == FIPS_140_3 and (mesh.version is None or mesh.version >= Version(1, 31))


def plan(mesh: Mesh) -> tuple[Decision, ...]:
    """Each version-aware check for `mesh`, in CHECKS order."""
    v = mesh.version
    out: list[Decision] = []
    # ztunnel: ambient only, and only with a version
    if not mesh.ambient:
        out += [Decision(c, on=False, why="not ambient") for c in (THREE_LEVEL, ZTUNNEL_ROOTS)]
    elif v is None:
        out += [Decision(c, on=False, why="Istio version unknown", needs_version=True)
                for c in (THREE_LEVEL, ZTUNNEL_ROOTS)]
    else:
        broken = three_level_broken(v)
        out.append(Decision(THREE_LEVEL, on=broken,
                            why=f"ztunnel {v} sends only the first certificate of cert-chain.pem" if broken
                            else f"ztunnel {v} gets every certificate of cert-chain.pem, fixed in 1.24.4 and 1.25.1"))
        roots = ztunnel_roots(v)
        out.append(Decision(ZTUNNEL_ROOTS, on=True, why={
            "first": f"ztunnel {v} trusts only the first certificate of root-cert.pem",
            "last": f"ztunnel {v} trusts only the last certificate of root-cert.pem",
            "all": f"ztunnel {v} trusts every root it can parse and silently drops the others",
        }[roots]))
    if mesh.compliance_policy != FIPS_140_3:
        out.append(Decision(FIPS_CHECK, on=False, why=f"compliance policy {mesh.compliance_policy or 'none'}"))
    elif not fips_applies(mesh):
        out.append(Decision(FIPS_CHECK, on=False, why=f"istiod {v} has no fips-140-3 policy (1.31 and later)"))
    else:
        out.append(Decision(FIPS_CHECK, on=True, why="istiod and pilot-agent run with GODEBUG=fips140=only"))
    if v is None:
        out.append(Decision(RELOAD_RULE, on=False, needs_version=True,
                            why="Istio version unknown, so 1.30's rule: sets of DER certificates"))
    else:
        how = ("root-cert.pem byte for byte, one file inside the other" if reload_rule(v) == "bytes"
               else "sets of DER certificates")
        out.append(Decision(RELOAD_RULE, on=True, why=f"istiod {v} compares {how}"))
    return tuple(out)


def skipped(mesh: Mesh) -> tuple[str, ...]:
    """The checks `mesh` would turn on but that are off because the Istio version is unknown."""
    return tuple(d.check for d in plan(mesh) if d.needs_version)
