"""Safe echoes of external text (subject names, PEM labels) in messages: control bytes escaped, length capped."""

from __future__ import annotations

__all__ = ["echo"]

_MAX = 200


def echo(value: str | bytes, limit: int = _MAX) -> str:
    """`value` with control characters (and DEL, and non-UTF-8 bytes) as \\xNN, cut to `limit` characters."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "backslashreplace")
    out = []
    for ch in value:
        o = ord(ch)
        out.append(f"\\x{o:02x}" if o < 0x20 or o == 0x7F or 0x80 <= o < 0xA0 else ch)
    s = "".join(out)
    if len(s) > limit:
        s = s[:limit] + "…[cut]"
    return s
