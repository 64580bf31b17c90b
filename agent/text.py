"""Echo text that came from outside (KV keys and values, certificate names, config values, Vault's messages)
safely: control characters escaped, and cut to a bounded length with a marker.
"""

from __future__ import annotations

import re

__all__ = ["LIMIT", "escape", "shown"]

#: the longest piece of outside text any message carries
LIMIT = 200

# C0 and C1 controls, DEL, and the Unicode line/paragraph separators and bidi controls a terminal may act on
_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _escape_char(m: re.Match[str]) -> str:
    code = ord(m.group())
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def escape(text: str) -> str:
    """`text` with every control character written as \\xNN (\\uNNNN above 0xff), so it stays one plain line."""
    return _UNSAFE.sub(_escape_char, text)


def shown(value: object, limit: int = LIMIT) -> str:
    """`value` as text fit to echo: escaped, and cut to `limit` characters plus a marker `...[+N]` (N cut).

    Surrogates that cannot be encoded (a lone surrogate from JSON) are shown as \\udXXX escapes too.
    """
    if isinstance(value, bytes):
        value = value.decode("utf-8", "backslashreplace")
    text = value if isinstance(value, str) else str(value)
    cut = len(text) > limit
    head = text[:limit]
    head = head.encode("utf-8", "backslashreplace").decode("utf-8")
    head = escape(head)
    return f"{head}...[+{len(text) - limit}]" if cut else head
