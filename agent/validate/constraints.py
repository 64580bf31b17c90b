"""Name constraints as Go 1.26+ checks them (crypto/x509 constraints.go checkChainConstraints): each certificate's
SANs against the constraints of every certificate above it, with Go's sorted-set matching."""

from __future__ import annotations

import bisect
import ipaddress
from collections.abc import Callable, Sequence
from functools import cmp_to_key

from agent.validate.certs import Certificate
from agent.validate.names import Mailbox, domain_name_valid, parse_mailbox

__all__ = ["check_chain_constraints", "dns_name_refused"]

_TABLE = bytes(0 if c == 0x2E else (c + 32 if 0x41 <= c <= 0x5A else c) for c in range(256))


def _dns_compare(a: str, b: str) -> int:
    """dnsCompare: case-insensitive comparison of the reversed strings, '.' sorting first."""
    ra = a.encode("latin-1", "replace")[::-1].translate(_TABLE)
    rb = b.encode("latin-1", "replace")[::-1].translate(_TABLE)
    return (ra > rb) - (ra < rb)


def _dns_has_suffix(a: str, b: str) -> bool:
    """dnsHasSuffix(a, b): a is a label suffix of b; ".x" only matches names below x."""
    if len(a) > len(b):
        return False
    if b[len(b) - len(a):].encode("latin-1", "replace").lower() != a.encode("latin-1", "replace").lower():
        return False
    return not (a and a[0] != "." and len(b) > len(a) and b[len(b) - len(a) - 1] != ".")


def _trim_first_label(name: str) -> str:
    i = name.find(".")
    return "" if i < 0 else name[i:]


class _DNS:
    """dnsConstraints: a sorted, pruned set of DNS-like constraints, permitted or excluded."""

    def __init__(self, names: Sequence[str], permitted: bool) -> None:
        self.all = any(len(n) == 0 for n in names)
        self.permitted = permitted
        items = sorted(names, key=cmp_to_key(_dns_compare))
        pruned: list[str] = []
        for n in items:
            if not pruned or not _dns_has_suffix(pruned[-1], n):
                pruned.append(n)
        self.set = pruned
        self.keys = [n.encode("latin-1", "replace")[::-1].translate(_TABLE) for n in pruned]
        self.parents: dict[str, str] = {}
        if not permitted:
            for n in pruned:
                low = n.lower()
                t = _trim_first_label(low)
                if t:
                    self.parents[t] = low

    def query(self, s: str) -> str | None:
        if self.all:
            return ""
        found = _search(self.set, self.keys, s, _dns_has_suffix)
        if found is not None:
            return found
        if not self.permitted and s.startswith("*"):
            return self.parents.get(_trim_first_label(s.lower()))
        return None


def _search(items: list[str], keys: list[bytes], s: str, match: Callable[[str, str], bool]) -> str | None:
    """nameConstraintsSet.search: binary search for the lower bound, then test the element before it."""
    if not items:
        return None
    key = s.encode("latin-1", "replace")[::-1].translate(_TABLE)
    i = bisect.bisect_left(keys, key)
    if i < len(keys) and keys[i] == key:
        return items[i]
    cand = items[0] if i == 0 else items[i - 1]
    return cand if match(cand, s) else None


class _Email:
    def __init__(self, names: Sequence[str], permitted: bool) -> None:
        self.full: set[tuple[str, str]] = set()
        domains = []
        for c in names:
            if "@" not in c:
                domains.append(c)
                continue
            mb = parse_mailbox(c)
            if mb is not None:
                self.full.add((mb.local, mb.domain.lower()))
        self.dns = _DNS(domains, permitted) if domains else None

    def query(self, m: Mailbox) -> str | None:
        if (m.local, m.domain) in self.full:
            return f"{m.local}@{m.domain}"
        return self.dns.query(m.domain) if self.dns is not None else None


class _IP:
    def __init__(self, nets: Sequence[tuple[bytes, bytes]]) -> None:
        v4: list[tuple[bytes, bytes]] = []
        v6: list[tuple[bytes, bytes]] = []
        for ip, mask in nets:
            masked = bytes(a & b for a, b in zip(ip, mask, strict=True))
            (v4 if len(ip) == 4 else v6).append((masked, mask))
        self.v4 = self._prune(v4)
        self.v6 = self._prune(v6)

    @staticmethod
    def _prune(nets: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        nets.sort()
        out: list[tuple[bytes, bytes]] = []
        for n in nets:
            if not out or not _ip_subset(out[-1], n):
                out.append(n)
        return out

    def query(self, ip: bytes) -> tuple[bytes, bytes] | None:
        nets = self.v4 if len(ip) == 4 else self.v6
        if not nets:
            return None
        i = bisect.bisect_left([n[0] for n in nets], ip)
        if i < len(nets) and nets[i][0] == ip:
            return nets[i]
        cand = nets[0] if i == 0 else nets[i - 1]
        return cand if _ip_contains(cand, ip) else None


def _ip_contains(net: tuple[bytes, bytes], ip: bytes) -> bool:
    """net.IPNet.Contains (same address family only)."""
    base, mask = net
    if len(ip) != len(base):
        return False
    return all((a & m) == (b & m) for a, b, m in zip(ip, base, mask, strict=True))


def _ip_subset(a: tuple[bytes, bytes], b: tuple[bytes, bytes]) -> bool:
    if not _ip_contains(a, b[0]):
        return False
    broadcast = bytes(x | (~m & 0xFF) for x, m in zip(b[0], b[1], strict=True))
    return _ip_contains(a, broadcast)


def _ip_str(ip: bytes) -> str:
    return str(ipaddress.ip_address(ip))


class _Constraints:
    """One certificate's chainConstraints."""

    def __init__(self, c: Certificate) -> None:
        self.ip = (_IP(c.permitted_ips) if c.permitted_ips else None, _IP(c.excluded_ips) if c.excluded_ips else None)
        self.dns = (_DNS(c.permitted_dns, True) if c.permitted_dns else None,
                    _DNS(c.excluded_dns, False) if c.excluded_dns else None)
        self.uri = (_DNS(c.permitted_uris, True) if c.permitted_uris else None,
                    _DNS(c.excluded_uris, False) if c.excluded_uris else None)
        self.email = (_Email(c.permitted_emails, True) if c.permitted_emails else None,
                      _Email(c.excluded_emails, False) if c.excluded_emails else None)

    def check(self, dns: Sequence[str], uris: Sequence[tuple[str, str]], emails: Sequence[Mailbox],
              ips: Sequence[bytes]) -> str | None:
        for ip in ips:
            p, e = self.ip
            if p is not None and p.query(ip) is None:
                return f'IP address "{_ip_str(ip)}" is not permitted by any constraint'
            if e is not None and (hit := e.query(ip)) is not None:
                return f'IP address "{_ip_str(ip)}" is excluded by constraint "{_ip_str(hit[0])}"'
        for d in dns:
            if not domain_name_valid(d, False):
                return f'x509: cannot parse dnsName "{d}"'
            err = _check("DNS name", self.dns, d, d)
            if err:
                return err
        for raw, domain in uris:
            if not domain_name_valid(domain, False):
                return f'x509: internal error: URI SAN "{raw}" failed to parse'
            err = _check("URI", self.uri, domain, raw)
            if err:
                return err
        for m in emails:
            if not domain_name_valid(m.domain, False):
                return f'x509: cannot parse rfc822Name "{m}"'
            p2, e2 = self.email
            if p2 is not None and p2.query(m) is None:
                return f'email address "{m}" is not permitted by any constraint'
            if e2 is not None and (hit2 := e2.query(m)) is not None:
                return f'email address "{m}" is excluded by constraint "{hit2}"'
        return None


def _check(kind: str, pair: tuple[_DNS | None, _DNS | None], value: str, shown: str) -> str | None:
    p, e = pair
    if p is not None and p.query(value) is None:
        return f'{kind} "{shown}" is not permitted by any constraint'
    if e is not None and (hit := e.query(value)) is not None:
        return f'{kind} "{shown}" is excluded by constraint "{hit}"'
    return None


def _split_host_port(hostport: str) -> str | None:
    """net.SplitHostPort's host, or None on its errors."""
    i = hostport.rfind(":")
    if i < 0:
        return None
    j = k = 0
    if hostport.startswith("["):
        end = hostport.find("]")
        if end < 0 or end + 1 == len(hostport) or end + 1 != i:
            return None
        host, j, k = hostport[1:end], 1, end + 1
    else:
        host = hostport[:i]
        if ":" in host:
            return None
    if "[" in hostport[j:] or "]" in hostport[k:]:
        return None
    return host


def _parse_uris(c: Certificate) -> list[tuple[str, str]] | str:
    """constraints.go parseURIs: (text, host without port); a host that is an IP cannot be matched."""
    out = []
    for u in c.uris:
        host = u.host.lower()
        if not host:
            return f'URI with empty host ("{u}") cannot be matched against constraints'
        if ":" in host and not host.endswith("]"):
            split = _split_host_port(u.host)
            if split is None:
                return f'cannot parse URI host "{u.host}"'
            host = split
        ip_like = host.startswith("[") and host.endswith("]")
        if not ip_like:
            try:
                ipaddress.ip_address(host)
                ip_like = True
            except ValueError:
                pass
        if ip_like:
            return f'URI with IP ("{u}") cannot be matched against constraints'
        out.append((str(u), host))
    return out


def dns_name_refused(chain: Sequence[Certificate], name: str) -> str | None:
    """Go's reason when a certificate for DNS `name`, issued by chain[0], is refused by a name constraint of a CA
    in `chain` (checkNameConstraints as Verify applies it to the leaf), else None."""
    for c in chain:
        if c.has_name_constraints and (err := _Constraints(c).check([name], [], [], [])) is not None:
            return err
    return None


def check_chain_constraints(chain: Sequence[Certificate]) -> str | None:
    """checkChainConstraints: None when every name is allowed, else Go's reason."""
    constrained = [(i, _Constraints(c)) for i, c in enumerate(chain) if c.has_name_constraints]
    if not constrained:
        return None
    for i, c in enumerate(chain):
        if not c.has_san:
            continue
        above = [cc for idx, cc in constrained if idx > i]
        if not above:
            return None
        uris = _parse_uris(c)
        if isinstance(uris, str):
            return uris
        emails = []
        for e in c.emails:
            mb = parse_mailbox(e)
            if mb is None:
                return f'cannot parse rfc822Name "{e}"'
            emails.append(Mailbox(mb.local, mb.domain.lower()))
        for cc in above:
            err = cc.check(c.dns_names, uris, emails, c.ips)
            if err is not None:
                return err
    return None
