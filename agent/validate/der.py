"""DER readers with Go's exact strictness: `Str` ports golang.org/x/crypto/cryptobyte (crypto/x509's parser), and
`GoASN1` ports the parts of encoding/asn1 that Go's private-key parsers use."""

from __future__ import annotations

import re

__all__ = [
    "GoASN1",
    "GoASN1Error",
    "Str",
    "check_integer",
    "ctx",
    "decode_oid",
    "epoch",
    "oid_str",
    "parse_generalized_time",
    "parse_utc_time",
    "read_time",
]

# cryptobyte_asn1 tags (single byte: class | constructed | number)
BOOLEAN, INTEGER, BIT_STRING, OCTET_STRING, NULL, OBJECT_IDENTIFIER, ENUM = 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x0A
UTF8_STRING, SEQUENCE, SET, PRINTABLE_STRING, T61_STRING, IA5_STRING = 0x0C, 0x30, 0x31, 0x13, 0x14, 0x16
UTC_TIME, GENERALIZED_TIME, NUMERIC_STRING, BMP_STRING = 0x17, 0x18, 0x12, 0x1E


def ctx(n: int, *, constructed: bool = False) -> int:
    """cryptobyte_asn1.Tag(n).ContextSpecific() (and .Constructed())."""
    return 0x80 | (0x20 if constructed else 0) | n


class Str:
    """A cryptobyte.String: a window [pos, end) over a shared buffer; every read returns None where Go returns false."""

    __slots__ = ("buf", "end", "pos")

    def __init__(self, buf: bytes, pos: int = 0, end: int | None = None) -> None:
        self.buf = buf
        self.pos = pos
        self.end = len(buf) if end is None else end

    def __len__(self) -> int:
        return self.end - self.pos

    def empty(self) -> bool:
        return self.pos >= self.end

    def data(self) -> bytes:
        return self.buf[self.pos:self.end]

    def peek(self, tag: int) -> bool:
        """PeekASN1Tag."""
        return self.pos < self.end and self.buf[self.pos] == tag

    def _read(self, skip_header: bool) -> tuple[int, Str] | None:
        """readASN1: low-tag-number form only, definite minimal lengths of at most 4 bytes."""
        buf, pos, end = self.buf, self.pos, self.end
        if end - pos < 2:
            return None
        tag, len_byte = buf[pos], buf[pos + 1]
        if tag & 0x1F == 0x1F:
            return None
        if len_byte & 0x80 == 0:
            header, length = 2, len_byte
        else:
            n = len_byte & 0x7F
            if n == 0 or n > 4 or end - pos < 2 + n:
                return None
            length = int.from_bytes(buf[pos + 2:pos + 2 + n], "big")
            if length < 128 or length >> ((n - 1) * 8) == 0:
                return None
            header = 2 + n
        total = header + length
        if total > end - pos:
            return None
        self.pos = pos + total
        return tag, Str(buf, pos + (header if skip_header else 0), pos + total)

    def read_any(self) -> tuple[int, Str] | None:
        """ReadAnyASN1: (tag, contents)."""
        return self._read(True)

    def read_any_element(self) -> tuple[int, Str] | None:
        """ReadAnyASN1Element: (tag, element including its header)."""
        return self._read(False)

    def _span(self, tag: int) -> tuple[int, int] | None:
        """readASN1 for one expected tag, inlined (the parser's hot path): the contents' [start, stop), advancing."""
        buf, pos, end = self.buf, self.pos, self.end
        if end - pos < 2 or buf[pos] != tag or tag & 0x1F == 0x1F:
            if end - pos >= 2 and buf[pos] != tag:
                self._read(True)  # cryptobyte consumes a well-formed element of another tag before saying no
            return None
        len_byte = buf[pos + 1]
        if len_byte < 0x80:
            start = pos + 2
            stop = start + len_byte
        else:
            n = len_byte & 0x7F
            if n == 0 or n > 4 or end - pos < 2 + n:
                return None
            length = int.from_bytes(buf[pos + 2:pos + 2 + n], "big")
            if length < 128 or length >> ((n - 1) * 8) == 0:
                return None
            start = pos + 2 + n
            stop = start + length
        if stop > end:
            return None
        self.pos = stop
        return start, stop

    def read(self, tag: int) -> Str | None:
        """ReadASN1: the contents of the next element, which must have `tag`."""
        span = self._span(tag)
        return None if span is None else Str(self.buf, span[0], span[1])

    def read_element(self, tag: int) -> Str | None:
        """ReadASN1Element."""
        pos = self.pos
        span = self._span(tag)
        return None if span is None else Str(self.buf, pos, span[1])

    def read_optional(self, tag: int) -> tuple[bool, Str | None] | None:
        """ReadOptionalASN1: None on a malformed element, else (present, contents)."""
        if not self.peek(tag):
            return False, None
        r = self.read(tag)
        return None if r is None else (True, r)

    def skip_optional(self, tag: int) -> bool:
        """SkipOptionalASN1."""
        return not self.peek(tag) or self._span(tag) is not None

    def read_bool(self) -> bool | None:
        """ReadASN1Boolean: one byte, 0x00 or 0xff."""
        span = self._span(BOOLEAN)
        if span is None or span[1] - span[0] != 1:
            return None
        b = self.buf[span[0]]
        return True if b == 0xFF else False if b == 0 else None

    def read_int(self, tag: int = INTEGER) -> int | None:
        """readASN1BigInt (or ReadASN1Int64WithTag's bytes): a minimally encoded two's-complement integer."""
        span = self._span(tag)
        if span is None:
            return None
        raw = self.buf[span[0]:span[1]]
        if not check_integer(raw):
            return None
        return int.from_bytes(raw, "big", signed=True)

    def read_int64(self, tag: int = INTEGER) -> int | None:
        v = self.read_int(tag)
        return v if v is not None and -(1 << 63) <= v < (1 << 63) else None

    def read_uint(self) -> int | None:
        """ReadASN1Integer into a Go uint: non-negative and below 2^64."""
        v = self.read_int()
        return v if v is not None and 0 <= v < (1 << 64) else None

    def read_oid(self) -> tuple[int, ...] | None:
        """ReadASN1ObjectIdentifier: each arc below 2^31, minimally encoded."""
        span = self._span(OBJECT_IDENTIFIER)
        if span is None or span[0] == span[1]:
            return None
        raw = self.buf[span[0]:span[1]]
        oid = _OIDS.get(raw)
        if oid is None:
            oid = decode_oid(raw, limit31=True)
            if oid is not None and len(raw) <= 32 and len(_OIDS) < 4096:
                _OIDS[raw] = oid
        return oid

    def read_bitstring(self) -> tuple[bytes, int] | None:
        """ReadASN1BitString: (bytes, bit length); padding bits must be zero."""
        span = self._span(BIT_STRING)
        if span is None or span[0] == span[1]:
            return None
        buf = self.buf
        pad = buf[span[0]]
        body = buf[span[0] + 1:span[1]]
        if pad > 7 or (not body and pad != 0) or (body and body[-1] & ((1 << pad) - 1)):
            return None
        return body, len(body) * 8 - pad


#: OIDs repeat across certificates (attribute types, extension IDs): each short one is decoded once per process
_OIDS: dict[bytes, tuple[int, ...]] = {}


def check_integer(raw: bytes) -> bool:
    """checkASN1Integer: at least one byte, minimally encoded."""
    if not raw:
        return False
    if len(raw) == 1:
        return True
    return not ((raw[0] == 0 and raw[1] & 0x80 == 0) or (raw[0] == 0xFF and raw[1] & 0x80 == 0x80))


def decode_oid(raw: bytes, *, limit31: bool) -> tuple[int, ...] | None:
    """The arcs of an OID's contents, or None: a non-minimal or truncated arc, or (limit31, as cryptobyte's
    readBase128Int and encoding/asn1's parseBase128Int) an arc of more than 5 bytes or above 2^31 - 1."""
    if not raw:
        return None
    arcs: list[int] = []
    v = n = 0
    for b in raw:
        if n == 0 and b == 0x80:
            return None
        v = (v << 7) | (b & 0x7F)
        n += 1
        if limit31 and (n > 5 or v >= 1 << 31):
            return None
        if b & 0x80 == 0:
            arcs.append(v)
            v = n = 0
    if n:
        return None
    first = arcs[0]
    head = (first // 40, first % 40) if first < 80 else (2, first - 80)
    return (*head, *arcs[1:])


def oid_str(oid: tuple[int, ...]) -> str:
    return ".".join(str(a) for a in oid)


# --------------------------------------------------------------------------------------------- times

_DAYS = (31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)


def _leap(y: int) -> bool:
    return y % 4 == 0 and (y % 100 != 0 or y % 400 == 0)


def epoch(y: int, mo: int, d: int, h: int = 0, mi: int = 0, s: int = 0) -> int:
    """Seconds since 1970 for a proleptic Gregorian UTC time (any year, unlike datetime)."""
    yy = y - (mo <= 2)
    era = (yy if yy >= 0 else yy - 399) // 400
    yoe = yy - era * 400
    doy = (153 * (mo + (-3 if mo > 2 else 9)) + 2) // 5 + d - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    days = era * 146097 + doe - 719468
    return days * 86400 + h * 3600 + mi * 60 + s


def _time(y: int, mo: int, d: int, h: int, mi: int, s: int, zone: str) -> int | None:
    """Go's time.Parse range checks, then the instant; `zone` is "Z" or "+hhmm"/"-hhmm"."""
    if not (1 <= mo <= 12) or d < 1 or d > (29 if mo == 2 and _leap(y) else _DAYS[mo - 1]):
        return None
    if h > 23 or mi > 59 or s > 59:
        return None
    offset = 0
    if zone != "Z":
        zh, zm = int(zone[1:3]), int(zone[3:5])
        if zh > 24 or zm > 60:
            return None
        offset = (zh * 3600 + zm * 60) * (1 if zone[0] == "+" else -1)
        if offset == 0:
            return None  # Format writes a zero offset as "Z", so "+0000" fails cryptobyte's round trip
    return epoch(y, mo, d, h, mi, s) - offset


_UTC = re.compile(rb"(\d\d)(\d\d)(\d\d)(\d\d)(\d\d)(\d\d)?(Z|[+-]\d{4})")
_GEN = re.compile(rb"(\d{4})(\d\d)(\d\d)(\d\d)(\d\d)(\d\d)(Z|[+-]\d{4})")


def parse_utc_time(raw: bytes) -> int | None:
    """cryptobyte ReadASN1UTCTime: "YYMMDDhhmm[ss]" then Z or an offset; years >= 50 are 19xx."""
    m = _UTC.fullmatch(raw)
    if m is None:
        return None
    yy = int(m[1])
    year = 1900 + yy if yy >= 50 else 2000 + yy  # "06" parses 69-99 as 19xx, then years >= 2050 lose a century
    return _time(year, int(m[2]), int(m[3]), int(m[4]), int(m[5]), int(m[6] or b"0"), m[7].decode())


def parse_generalized_time(raw: bytes) -> int | None:
    """cryptobyte ReadASN1GeneralizedTime: "YYYYMMDDhhmmss" then Z or an offset, no fraction."""
    m = _GEN.fullmatch(raw)
    if m is None:
        return None
    return _time(int(m[1]), int(m[2]), int(m[3]), int(m[4]), int(m[5]), int(m[6]), m[7].decode())


_TIMES: dict[tuple[int, bytes], int | None] = {}


def read_time(s: Str) -> int | None:
    """parser.go readASN1Time: UTCTime or GeneralizedTime (each distinct encoding parsed once per process)."""
    for tag, parse in ((UTC_TIME, parse_utc_time), (GENERALIZED_TIME, parse_generalized_time)):
        if s.peek(tag):
            span = s._span(tag)
            if span is None:
                return None
            key = (tag, s.buf[span[0]:span[1]])
            if key not in _TIMES:
                value = parse(key[1])
                if len(key[1]) > 24 or len(_TIMES) >= 4096:
                    return value
                _TIMES[key] = value
            return _TIMES[key]
    return None


# --------------------------------------------------------------------------------------------- encoding/asn1


class GoASN1Error(ValueError):
    """An encoding/asn1 error, with Go's message."""


class GoASN1:
    """encoding/asn1's parseField for the shapes Go's key parsers use: a cursor over one SEQUENCE's contents."""

    __slots__ = ("buf", "end", "pos")

    def __init__(self, buf: bytes, pos: int = 0, end: int | None = None) -> None:
        self.buf, self.pos, self.end = buf, pos, len(buf) if end is None else end

    def at_end(self) -> bool:
        return self.pos >= self.end

    def _tag_length(self) -> tuple[int, bool, int, int, int]:
        """parseTagAndLength: (class, compound, tag, header end, length)."""
        buf, off, end = self.buf, self.pos, self.end
        if off >= end:
            raise GoASN1Error("asn1: internal error in parseTagAndLength")
        b = buf[off]
        off += 1
        cls, compound, tag = b >> 6, bool(b & 0x20), b & 0x1F
        if tag == 0x1F:
            tag = 0
            for shifted in range(6):
                if off >= end:
                    raise GoASN1Error("asn1: syntax error: truncated base 128 integer")
                if shifted == 5:
                    raise GoASN1Error("asn1: structure error: base 128 integer too large")
                c = buf[off]
                if shifted == 0 and c == 0x80:
                    raise GoASN1Error("asn1: syntax error: integer is not minimally encoded")
                tag = (tag << 7) | (c & 0x7F)
                off += 1
                if c & 0x80 == 0:
                    break
            if tag < 0x1F:
                raise GoASN1Error("asn1: syntax error: non-minimal tag")
        if off >= end:
            raise GoASN1Error("asn1: syntax error: truncated tag or length")
        b = buf[off]
        off += 1
        if b & 0x80 == 0:
            length = b
        else:
            n = b & 0x7F
            if n == 0:
                raise GoASN1Error("asn1: syntax error: indefinite length found (not DER)")
            length = 0
            for _ in range(n):
                if off >= end:
                    raise GoASN1Error("asn1: syntax error: truncated tag or length")
                if length >= 1 << 23:
                    raise GoASN1Error("asn1: structure error: length too large")
                length = (length << 8) | buf[off]
                off += 1
                if length == 0:
                    raise GoASN1Error("asn1: structure error: superfluous leading zeros in length")
            if length < 0x80:
                raise GoASN1Error("asn1: structure error: non-minimal length")
        return cls, compound, tag, off, length

    def _field(self, tag: int, compound: bool, *, optional: bool = False, explicit: int | None = None,
               any_type: bool = False) -> bytes | None:
        """One field's contents; None when an optional field is absent (the cursor does not move)."""
        if self.pos >= self.end:
            if optional:
                return None
            raise GoASN1Error("asn1: syntax error: sequence truncated")
        start = self.pos
        cls, comp, t, off, length = self._tag_length()
        if explicit is not None:
            if off >= self.end:
                raise GoASN1Error("asn1: structure error: explicit tag has no child")
            if cls == 2 and t == explicit and (length == 0 or comp):
                if length == 0:
                    raise GoASN1Error("asn1: structure error: zero length explicit tag was not an asn1.Flag")
                self.pos = off
                cls, comp, t, off, length = self._tag_length()
            else:
                if optional:
                    return None
                raise GoASN1Error("asn1: structure error: explicitly tagged member didn't match")
        if not any_type and (cls != 0 or t != tag or comp != compound):
            if optional:
                self.pos = start
                return None
            raise GoASN1Error("asn1: structure error: tags don't match")
        if off + length > self.end:
            raise GoASN1Error("asn1: syntax error: data truncated")
        self.pos = off + length
        return self.buf[off:off + length]

    def element(self, *, optional: bool = False) -> bytes | None:
        """A RawValue field: the whole next element (FullBytes)."""
        if self.pos >= self.end:
            if optional:
                return None
            raise GoASN1Error("asn1: syntax error: sequence truncated")
        start = self.pos
        self._field(0, False, any_type=True)
        return self.buf[start:self.pos]

    def sequence(self, *, optional: bool = False, explicit: int | None = None) -> GoASN1 | None:
        body = self._field(0x10, True, optional=optional, explicit=explicit)
        if body is None:
            return None
        return GoASN1(self.buf, self.pos - len(body), self.pos)

    def int64(self, *, optional: bool = False, explicit: int | None = None) -> int | None:
        raw = self._field(0x02, False, optional=optional, explicit=explicit)
        if raw is None:
            return None
        if not check_integer(raw):
            raise GoASN1Error("asn1: structure error: integer not minimally-encoded" if raw else
                              "asn1: structure error: empty integer")
        if len(raw) > 8:
            raise GoASN1Error("asn1: structure error: integer too large")
        return int.from_bytes(raw, "big", signed=True)

    def bigint(self, *, optional: bool = False) -> int | None:
        raw = self._field(0x02, False, optional=optional)
        if raw is None:
            return None
        if not check_integer(raw):
            raise GoASN1Error("asn1: structure error: integer not minimally-encoded" if raw else
                              "asn1: structure error: empty integer")
        return int.from_bytes(raw, "big", signed=True)

    def octets(self) -> bytes:
        raw = self._field(0x04, False)
        assert raw is not None
        return raw

    def oid(self, *, optional: bool = False, explicit: int | None = None) -> tuple[int, ...] | None:
        raw = self._field(0x06, False, optional=optional, explicit=explicit)
        if raw is None:
            return None
        if not raw:
            raise GoASN1Error("asn1: syntax error: zero length OBJECT IDENTIFIER")
        arcs = decode_oid(raw, limit31=True)
        if arcs is None:
            raise GoASN1Error("asn1: structure error: base 128 integer too large")
        return arcs

    def bitstring(self, *, optional: bool = False, explicit: int | None = None) -> bytes | None:
        raw = self._field(0x03, False, optional=optional, explicit=explicit)
        if raw is None:
            return None
        if not raw or raw[0] > 7 or (len(raw) == 1 and raw[0]) or raw[-1] & ((1 << raw[0]) - 1):
            raise GoASN1Error("asn1: syntax error: invalid padding bits in BIT STRING")
        return raw[1:]

    @classmethod
    def unmarshal_sequence(cls, der: bytes) -> tuple[GoASN1, bytes]:
        """asn1.Unmarshal into a struct: the SEQUENCE's contents, and the rest after it."""
        top = cls(der)
        body = top.sequence()
        assert body is not None
        return body, der[top.pos:]
