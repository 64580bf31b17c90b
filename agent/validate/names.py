"""Names as Go's crypto/x509 sees them: distinguished names (pkix), SAN URIs (net/url.Parse), mailboxes and the
domain checks its parser and name-constraint code apply."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from agent.validate.der import (
    BIT_STRING,
    BMP_STRING,
    BOOLEAN,
    GENERALIZED_TIME,
    IA5_STRING,
    INTEGER,
    NULL,
    NUMERIC_STRING,
    OBJECT_IDENTIFIER,
    OCTET_STRING,
    PRINTABLE_STRING,
    SEQUENCE,
    SET,
    T61_STRING,
    UTC_TIME,
    UTF8_STRING,
    Str,
    oid_str,
    read_time,
)

__all__ = [
    "RDN",
    "GoURL",
    "Mailbox",
    "NameError_",
    "domain_name_valid",
    "is_ia5",
    "name_key",
    "name_str",
    "parse_mailbox",
    "parse_name",
    "parse_url",
]

#: (attribute OID, value): the value is a str for string types, else whatever readASN1Any gave
RDN = list[tuple[tuple[int, ...], object]]


class NameError_(ValueError):
    """A malformed name or URI, with Go's message."""


# --------------------------------------------------------------------------------------------- parser.go strings


def _printable(b: int) -> bool:
    """isPrintable: PrintableString plus '*' and '&', which Go tolerates."""
    return (0x61 <= b <= 0x7A or 0x41 <= b <= 0x5A or 0x30 <= b <= 0x39 or 0x27 <= b <= 0x29 or 0x2B <= b <= 0x2F
            or b in b" :=?*&")


def is_ia5(raw: bytes) -> bool:
    """isIA5String: every byte ASCII (a non-ASCII byte is always part of a rune above 0x7f)."""
    return raw.isascii()


def _asn1_string(tag: int, raw: bytes) -> str:
    """parseASN1String."""
    if tag == T61_STRING:
        return raw.decode("latin-1")
    if tag == PRINTABLE_STRING:
        if not all(_printable(b) for b in raw):
            raise NameError_("invalid PrintableString")
        return raw.decode("ascii")
    if tag == UTF8_STRING:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise NameError_("invalid UTF-8 string") from None
    if tag == BMP_STRING:
        if len(raw) % 2:
            raise NameError_("invalid BMPString")
        if len(raw) >= 2 and raw[-2:] == b"\x00\x00":
            raw = raw[:-2]
        units = [raw[i] << 8 | raw[i + 1] for i in range(0, len(raw), 2)]
        if any(u in (0xFFFE, 0xFFFF) or 0xFDD0 <= u <= 0xFDEF or 0xD800 <= u <= 0xDFFF for u in units):
            raise NameError_("invalid BMPString")
        return "".join(chr(u) for u in units)
    if tag == IA5_STRING:
        if not is_ia5(raw):
            raise NameError_("invalid IA5String")
        return raw.decode("ascii")
    if tag == NUMERIC_STRING:
        if raw.translate(None, b"0123456789 "):
            raise NameError_("invalid NumericString")
        return raw.decode("ascii")
    raise NameError_(f"unsupported string type: {tag}")


_STRING_TAGS = frozenset({T61_STRING, PRINTABLE_STRING, UTF8_STRING, BMP_STRING, IA5_STRING, NUMERIC_STRING})


def _read_any(s: Str) -> object:
    """readASN1Any: the value of an AttributeTypeAndValue."""
    r = s.read_any_element()
    if r is None:
        raise NameError_("invalid ASN.1 element")
    tag, full = r
    if tag in _STRING_TAGS:
        inner = full.read(tag)
        if inner is None:
            raise NameError_("invalid ASN.1 element")
        return _asn1_string(tag, inner.data())
    if tag == INTEGER:
        v = full.read_int64()
        if v is None:
            raise NameError_("invalid ASN.1 integer")
        return v
    if tag == BIT_STRING:
        if full.read_bitstring() is None:
            raise NameError_("invalid ASN.1 BIT STRING")
        return full.data()
    if tag == OCTET_STRING:
        inner = full.read(OCTET_STRING)
        if inner is None:
            raise NameError_("invalid ASN.1 OCTET STRING")
        return inner.data()
    if tag == OBJECT_IDENTIFIER:
        oid = full.read_oid()
        if oid is None:
            raise NameError_("invalid ASN.1 OBJECT IDENTIFIER")
        return oid
    if tag in (UTC_TIME, GENERALIZED_TIME):
        t = read_time(full)
        if t is None:
            raise NameError_("x509: malformed UTCTime" if tag == UTC_TIME else "x509: malformed GeneralizedTime")
        return t
    if tag == BOOLEAN:
        b = full.read_bool()
        if b is None:
            raise NameError_("invalid ASN.1 BOOLEAN")
        return b
    if tag == NULL:
        return None
    if full.read_any() is None:
        raise NameError_("invalid ASN.1 element")
    return full.data()


def parse_name(raw: Str, cache: dict[bytes, list[RDN]] | None = None) -> list[RDN]:
    """parseName: an RDNSequence (SEQUENCE OF SET OF AttributeTypeAndValue). Issuer names repeat within a
    bundle, so a caller may pass a cache for one validation (callers never change the result)."""
    if cache is None:
        return _parse_name(raw)
    key = raw.data()
    cached = cache.get(key)
    if cached is None:
        cached = cache[key] = _parse_name(raw)
    return cached


def _parse_name(raw: Str) -> list[RDN]:
    seq = raw.read(SEQUENCE)
    if seq is None:
        raise NameError_("x509: invalid RDNSequence")
    rdns: list[RDN] = []
    while not seq.empty():
        st = seq.read(SET)
        if st is None:
            raise NameError_("x509: invalid RDNSequence")
        rdn: RDN = []
        while not st.empty():
            atv = st.read(SEQUENCE)
            if atv is None:
                raise NameError_("x509: invalid RDNSequence: invalid attribute")
            oid = atv.read_oid()
            if oid is None:
                raise NameError_("x509: invalid RDNSequence: invalid attribute type")
            try:
                value = _read_any(atv)
            except NameError_ as exc:
                raise NameError_(f"x509: invalid RDNSequence: invalid attribute value: {exc}") from None
            rdn.append((oid, value))
        rdns.append(rdn)
    return rdns


# pkix: attributes Name.FillFromRDNSequence turns into fields, in ToRDNSequence's order (C, ST, L, STREET,
# POSTALCODE, O, OU, CN, SERIALNUMBER).
_FIELD_ORDER = (6, 8, 7, 9, 17, 10, 11, 3, 5)
_NAMES = {3: "CN", 5: "SERIALNUMBER", 6: "C", 7: "L", 8: "ST", 9: "STREET", 10: "O", 11: "OU", 17: "POSTALCODE"}


def _fields(rdns: list[RDN]) -> tuple[dict[int, list[str]], list[tuple[tuple[int, ...], object]]]:
    fields: dict[int, list[str]] = {k: [] for k in _FIELD_ORDER}
    other: list[tuple[tuple[int, ...], object]] = []
    for rdn in rdns:
        for oid, value in rdn:
            std = len(oid) == 4 and oid[:3] == (2, 5, 4) and oid[3] in _NAMES
            if std and isinstance(value, str):
                if oid[3] in (3, 5):
                    fields[oid[3]] = [value]  # CommonName and SerialNumber keep the last one
                else:
                    fields[oid[3]].append(value)
            elif not std:
                other.append((oid, value))
    return fields, other


def name_key(rdns: list[RDN]) -> tuple[object, ...]:
    """What makes two names print the same with Go's pkix.Name.String() (istiod keys its CRL check by it)."""
    fields, other = _fields(rdns)
    return (*(tuple(fields[k]) for k in _FIELD_ORDER), tuple((o, repr(v)) for o, v in other))


def name_str(rdns: list[RDN]) -> str:
    """Roughly Go's pkix.Name.String(): RFC 2253 order (most specific first), for messages only."""
    fields, other = _fields(rdns)
    parts = [f"{_NAMES[k]}={v}" for k in _FIELD_ORDER for v in fields[k]]
    parts += [f"{oid_str(o)}={v}" for o, v in other if isinstance(v, str)]
    return ",".join(reversed(parts)) or "an empty name"


# --------------------------------------------------------------------------------------------- domains, mailboxes


def domain_name_valid(s: str, constraint: bool) -> bool:
    """parser.go domainNameValid (Go 1.26+): no trailing dot, no empty label, printable ASCII."""
    if not s:
        return True
    if s[-1] == ".":
        return False
    if constraint and s[0] == ".":
        s = s[1:]
    return all(label and all(33 <= ord(c) <= 126 for c in label) for label in s.split("."))


@dataclass(frozen=True)
class Mailbox:
    local: str
    domain: str

    def __str__(self) -> str:
        return f"{self.local}@{self.domain}"


_ATEXT = frozenset(b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ!#$%&'*+-/=?^_`{|}~.")


def parse_mailbox(s: str) -> Mailbox | None:
    """verify.go parseRFC2821Mailbox."""
    b = s.encode("utf-8", "surrogateescape")
    if not b:
        return None
    local = bytearray()
    i = 0
    if b[0] == 0x22:  # quoted string
        i = 1
        while True:
            if i >= len(b):
                return None
            c = b[i]
            i += 1
            if c == 0x22:
                break
            if c == 0x5C:
                if i >= len(b):
                    return None
                d = b[i]
                if d in (11, 12) or 1 <= d <= 9 or 14 <= d <= 127:
                    local.append(d)
                    i += 1
                else:
                    return None
            elif c in (11, 12, 32, 33, 127) or 1 <= c <= 8 or 14 <= c <= 31 or 35 <= c <= 91 or 93 <= c <= 126:
                local.append(c)
            else:
                return None
    else:
        while i < len(b):
            c = b[i]
            if c == 0x5C:
                i += 1
                if i >= len(b):
                    return None
                local.append(b[i])
                i += 1
            elif c in _ATEXT:
                local.append(c)
                i += 1
            else:
                break
        if not local or local[0] == 0x2E or local[-1] == 0x2E or b".." in local:
            return None
    if i >= len(b) or b[i] != 0x40:
        return None
    domain = b[i + 1:].decode("utf-8", "surrogateescape")
    if not domain_name_valid(domain, False) or "@" in domain:
        return None
    return Mailbox(local.decode("utf-8", "surrogateescape"), domain)


# --------------------------------------------------------------------------------------------- net/url


@dataclass(frozen=True)
class GoURL:
    """The parts of a url.URL that crypto/x509 reads: the scheme, the host (with any port) and the text."""

    raw: str
    scheme: str
    host: str

    def __str__(self) -> str:
        return self.raw


_HOST_OK = frozenset("!\"$&'()*+,-.0123456789:;<=>ABCDEFGHIJKLMNOPQRSTUVWXYZ[]_abcdefghijklmnopqrstuvwxyz~")
_HEX = frozenset("0123456789abcdefABCDEF")
_USERINFO_OK = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._:~!$&'()*+,;=%@")


def _unescape(s: str, mode: str) -> str:
    """url.unescape: validate %XX escapes (and, for hosts, the characters), then decode."""
    i = 0
    n = len(s)
    while i < n:
        c = s[i]
        if c == "%":
            if i + 2 >= n or s[i + 1] not in _HEX or s[i + 2] not in _HEX:
                raise NameError_(f'invalid URL escape "{s[i:i + 3]}"')
            if mode == "host" and int(s[i + 1], 16) < 8 and s[i:i + 3] != "%25":
                raise NameError_(f'invalid URL escape "{s[i:i + 3]}"')
            if mode == "zone":
                v = int(s[i + 1:i + 3], 16)
                if s[i:i + 3] != "%25" and v != 0x20 and chr(v) not in _HOST_OK:
                    raise NameError_(f'invalid URL escape "{s[i:i + 3]}"')
            i += 3
        else:
            if mode in ("host", "zone") and ord(c) < 0x80 and c not in _HOST_OK:
                raise NameError_(f'invalid character "{c}" in host name')
            i += 1
    if "%" not in s:
        return s
    out = bytearray()
    i = 0
    raw = s.encode("utf-8", "surrogateescape")
    while i < len(raw):
        if raw[i] == 0x25:
            out.append(int(raw[i + 1:i + 3], 16))
            i += 3
        else:
            out.append(raw[i])
            i += 1
    return out.decode("utf-8", "surrogateescape")


def _valid_port(port: str) -> bool:
    return port == "" or (port[0] == ":" and all("0" <= c <= "9" for c in port[1:]))


def _parse_host(scheme: str, host: str) -> str:
    """url.parseHost."""
    open_br = host.rfind("[")
    if open_br > 0:
        raise NameError_("invalid IP-literal")
    if open_br == 0:
        close = host.rfind("]")
        if close < 0:
            raise NameError_("missing ']' in host")
        port = host[close + 1:]
        if not _valid_port(port):
            raise NameError_(f'invalid port "{port}" after host')
        port = _unescape(port, "host")
        hostname = host[1:close]
        zone = hostname.find("%25")
        if zone >= 0:
            unescaped = _unescape(hostname[:zone], "host") + _unescape(hostname[zone:], "zone")
        else:
            unescaped = _unescape(hostname, "host")
        try:
            addr = ipaddress.ip_address(unescaped)
        except ValueError:
            raise NameError_(f"invalid host: ParseAddr({unescaped!r})") from None
        if addr.version == 4:
            raise NameError_("invalid IP-literal")
        return "[" + unescaped + "]" + port
    i = host.find(":")
    if i != -1:
        last = host.rfind(":")
        if last != i and scheme not in ("http", "https"):
            i = last
        port = host[i:]
        if not _valid_port(port):
            raise NameError_(f'invalid port "{port}" after host')
    return _unescape(host, "host")


def parse_url(raw: str) -> GoURL:
    """net/url.Parse as crypto/x509's SAN parser calls it; raises NameError_ with Go's message."""
    u, _, frag = raw.partition("#")
    try:
        scheme, host = _parse(u)
    except NameError_ as exc:
        raise NameError_(f'parse "{u}": {exc}') from None
    if frag:
        try:
            _unescape(frag, "fragment")
        except NameError_ as exc:
            raise NameError_(f'parse "{raw}": {exc}') from None
    return GoURL(raw, scheme, host)


def _parse(raw: str) -> tuple[str, str]:
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in raw):
        raise NameError_("net/url: invalid control character in URL")
    if raw == "*":
        return "", ""
    scheme, rest = "", raw
    for i, c in enumerate(raw):
        if "a" <= c <= "z" or "A" <= c <= "Z":
            continue
        if "0" <= c <= "9" or c in "+-.":
            if i == 0:
                break
            continue
        if c == ":":
            if i == 0:
                raise NameError_("missing protocol scheme")
            scheme, rest = raw[:i].lower(), raw[i + 1:]
        break
    rest = rest[:-1] if rest.endswith("?") and rest.count("?") == 1 else rest.partition("?")[0]
    if not rest.startswith("/"):
        if scheme:
            return scheme, ""  # opaque
        if ":" in rest.partition("/")[0]:
            raise NameError_("first path segment in URL cannot contain colon")
    host = ""
    if (scheme or not rest.startswith("///")) and rest.startswith("//"):
        authority, slash, path = rest[2:].partition("/")
        rest = slash + path
        at = authority.rfind("@")
        host = _parse_host(scheme, authority[at + 1:] if at >= 0 else authority)
        if at >= 0:
            userinfo = authority[:at]
            if any(c not in _USERINFO_OK for c in userinfo):
                raise NameError_("net/url: invalid userinfo")
            for part in userinfo.split(":", 1):
                _unescape(part, "userinfo")
    _unescape(rest, "path")
    return scheme, host
