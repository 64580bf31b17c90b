"""Certificate policy validation as Go's verify.go policiesValid does it (RFC 5280 6.1 as updated by RFC 9618), with
Verify's defaults: any policy acceptable, no explicit policy, mapping and anyPolicy allowed."""

from __future__ import annotations

from collections.abc import Sequence

from agent.validate.certs import Certificate

__all__ = ["policies_valid"]

ANY_POLICY = bytes([0x55, 0x1D, 0x20, 0x00])  # 2.5.29.32.0, as OID contents


class _Node:
    __slots__ = ("children", "expected", "parents", "valid")

    def __init__(self, valid: bytes, parents: Sequence[_Node] = ()) -> None:
        self.valid = valid
        self.expected: list[bytes] = [valid]
        self.parents: dict[int, _Node] = {}
        self.children: dict[int, _Node] = {}
        for p in parents:
            p.children[id(self)] = self
            self.parents[id(p)] = p


class _Graph:
    def __init__(self) -> None:
        self.strata: list[dict[bytes, _Node]] = [{ANY_POLICY: _Node(ANY_POLICY)}]
        self.parent_index: dict[bytes, list[_Node]] = {}
        self.depth = 0

    def insert(self, n: _Node) -> None:
        self.strata[self.depth][n.valid] = n

    def parents_with_expected(self, expected: bytes) -> list[_Node]:
        return [] if self.depth == 0 else self.parent_index.get(expected, [])

    def parent_with_any(self) -> _Node | None:
        return None if self.depth == 0 else self.strata[self.depth - 1].get(ANY_POLICY)

    def parents(self) -> list[_Node]:
        return [] if self.depth == 0 else list(self.strata[self.depth - 1].values())

    def leaves(self) -> dict[bytes, _Node]:
        return self.strata[self.depth]

    def leaf(self, policy: bytes) -> _Node | None:
        return self.strata[self.depth].get(policy)

    def delete_leaf(self, policy: bytes) -> None:
        n = self.strata[self.depth].get(policy)
        if n is None:
            return
        for p in n.parents.values():
            p.children.pop(id(n), None)
        for ch in n.children.values():
            ch.parents.pop(id(n), None)
        del self.strata[self.depth][policy]

    def valid_nodes(self) -> list[_Node]:
        out = []
        for i in range(self.depth, -1, -1):
            for n in self.strata[i].values():
                if n.valid == ANY_POLICY:
                    continue
                if len(n.parents) == 1 and next(iter(n.parents.values())).valid == ANY_POLICY:
                    out.append(n)
        return out

    def prune(self) -> None:
        for i in range(self.depth - 1, 0, -1):
            for key, n in list(self.strata[i].items()):
                if not n.children:
                    for p in n.parents.values():
                        p.children.pop(id(n), None)
                    del self.strata[i][key]

    def incr_depth(self) -> None:
        self.parent_index = {}
        for n in self.strata[self.depth].values():
            for e in n.expected:
                self.parent_index.setdefault(e, []).append(n)
        self.depth += 1
        self.strata.append({})


def policies_valid(chain: Sequence[Certificate]) -> bool:
    """verify.go policiesValid with default VerifyOptions."""
    if len(chain) == 1:
        return True
    n = len(chain) - 1
    pg: _Graph | None = _Graph()
    inhibit_any = explicit = mapping = n + 1
    for i in range(n - 1, -1, -1):
        cert = chain[i]
        self_signed = cert.raw_issuer == cert.raw_subject
        if not cert.policies:
            pg = None
        if explicit == 0 and pg is None:
            return False
        if pg is not None:
            pg.incr_depth()
            policies: set[bytes] = set()
            for policy in cert.policies:
                policies.add(policy)
                if policy == ANY_POLICY:
                    continue
                parents = pg.parents_with_expected(policy)
                if not parents:
                    anyp = pg.parent_with_any()
                    if anyp is not None:
                        parents = [anyp]
                if parents:
                    pg.insert(_Node(policy, parents))
            if ANY_POLICY in policies and (inhibit_any > 0 or (n - i < n and self_signed)):
                missing: dict[bytes, list[_Node]] = {}
                leaves = pg.leaves()
                for p in pg.parents():
                    for expected in p.expected:
                        if expected not in leaves:
                            missing.setdefault(expected, []).append(p)
                for oid, parents in missing.items():
                    pg.insert(_Node(oid, parents))
            pg.prune()
            if i != 0 and cert.policy_mappings:
                mappings: dict[bytes, list[bytes]] = {}
                for issuer_policy, subject_policy in cert.policy_mappings:
                    if mapping > 0:
                        if ANY_POLICY in (issuer_policy, subject_policy):
                            return False
                        mappings.setdefault(issuer_policy, []).append(subject_policy)
                    else:
                        pg.delete_leaf(issuer_policy)
                pg.prune()
                for issuer_policy, subjects in mappings.items():
                    matching = pg.leaf(issuer_policy)
                    if matching is not None:
                        matching.expected = subjects
                    else:
                        anyp = pg.leaf(ANY_POLICY)
                        if anyp is not None:
                            node = _Node(issuer_policy, [anyp])
                            node.expected = subjects
                            pg.insert(node)
        if i != 0:
            if not self_signed:
                explicit = max(explicit - 1, 0) if explicit > 0 else explicit
                mapping = max(mapping - 1, 0) if mapping > 0 else mapping
                inhibit_any = max(inhibit_any - 1, 0) if inhibit_any > 0 else inhibit_any
            if (cert.require_explicit_policy > 0 or cert.require_explicit_policy_zero) and \
                    cert.require_explicit_policy < explicit:
                explicit = cert.require_explicit_policy
            if (cert.inhibit_policy_mapping > 0 or cert.inhibit_policy_mapping_zero) and \
                    cert.inhibit_policy_mapping < mapping:
                mapping = cert.inhibit_policy_mapping
            if (cert.inhibit_any_policy > 0 or cert.inhibit_any_policy_zero) and cert.inhibit_any_policy < inhibit_any:
                inhibit_any = cert.inhibit_any_policy
    if explicit > 0:
        explicit -= 1
    if chain[0].require_explicit_policy_zero:
        explicit = 0
    valid: list[_Node] = []
    if pg is not None:
        valid = pg.valid_nodes()
        anyp = pg.leaf(ANY_POLICY)
        if anyp is not None:
            valid.append(anyp)
    authority = {nd.valid for nd in valid}
    # initial user policy set is {anyPolicy}: the user-constrained set equals the authority-constrained one
    return not (explicit == 0 and not authority)
