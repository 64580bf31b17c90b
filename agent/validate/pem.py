"""A linear port of Go's encoding/pem Decode (Go 1.26/1.27): which blocks Go finds, their labels, headers and bytes.

Go looks for the first END line, then the last BEGIN line before it, so repeated BEGIN lines cost nothing; lines
may end in spaces or tabs; base64 is Go's StdEncoding (padding required, CR/LF ignored).
"""

from __future__ import annotations

import binascii
from dataclasses import dataclass

from agent.validate.limits import LimitExceeded

__all__ = ["Block", "decode", "decode_all"]

_PEM_BEGIN = b"-----BEGIN "  # pemStart without its leading newline
_PEM_END = b"\n-----END "
_DASHES = b"-----"
_B64 = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
# A real PEM block has at most a few RFC 1421 header lines; scanning more is the agent's limit, not Go's.
_MAX_HEADER_LINES = 4096


@dataclass(frozen=True)
class Block:
    """A pem.Block: the label between BEGIN and the dashes, the headers and the decoded bytes."""

    label: bytes
    headers: dict[bytes, bytes]
    der: bytes

    @property
    def type(self) -> str:
        return self.label.decode("latin-1")


def _get_line(data: bytes, i: int) -> tuple[bytes, int]:
    """getLine: the line at i without CR/LF and trailing spaces or tabs, and the index after its newline."""
    j = data.find(b"\n", i)
    if j < 0:
        return data[i:].rstrip(b" \t"), len(data)
    k = j - 1 if j > i and data[j - 1] == 0x0D else j
    return data[i:k].rstrip(b" \t"), j + 1


def _b64(body: bytes) -> bytes | None:
    """encoding/base64 StdEncoding.Decode after pem's removeSpacesAndTabs (CR and LF are skipped)."""
    s = body.translate(None, b" \t\r\n")
    if len(s) % 4:
        return None
    pad = len(s) - len(s.rstrip(b"="))
    if pad > 2 or s[: len(s) - pad].translate(None, _B64):
        return None
    try:
        return binascii.a2b_base64(s)
    except binascii.Error:
        return None


class _Budget:
    __slots__ = ("header_lines",)

    def __init__(self) -> None:
        self.header_lines = 0


def decode(data: bytes, start: int = 0, budget: _Budget | None = None) -> tuple[Block | None, int]:
    """pem.Decode on data[start:]: the next block and where the rest begins, or (None, start) when there is none."""
    budget = budget or _Budget()
    n = len(data)
    rest = start  # Go's `rest` is data[rest:]; the indices below are relative to it, as in Go
    end_trailer = 0
    while True:
        if end_trailer < 0 or end_trailer > n - rest:
            return None, start
        rest += end_trailer
        end_abs = data.find(_PEM_END, rest)
        if end_abs < 0:
            return None, start
        end_index = end_abs - rest
        end_trailer = end_index + len(_PEM_END)
        begin_abs = data.rfind(_PEM_BEGIN, rest, end_abs)
        if begin_abs < 0 or (begin_abs > rest and data[begin_abs - 1] != 0x0A):
            continue
        adv = begin_abs - rest + len(_PEM_BEGIN)
        rest += adv
        end_index -= adv
        end_trailer -= adv

        type_line, nxt = _get_line(data, rest)
        consumed = nxt - rest
        rest = nxt
        end_index -= consumed
        end_trailer -= consumed
        if not type_line.endswith(_DASHES):
            continue
        label = type_line[: -len(_DASHES)]

        headers: dict[bytes, bytes] = {}
        while True:
            if rest >= n:
                return None, start
            line, nxt = _get_line(data, rest)
            key, sep, val = line.partition(b":")
            if not sep:
                break
            budget.header_lines += 1
            if budget.header_lines > _MAX_HEADER_LINES:
                raise LimitExceeded(f"more than {_MAX_HEADER_LINES} PEM header lines")
            headers[key.strip()] = val.strip()
            consumed = nxt - rest
            rest = nxt
            end_index -= consumed
            end_trailer -= consumed

        if headers and end_index < 0:
            continue
        trailer_at = rest + end_trailer
        trailer_len = len(label) + len(_DASHES)
        if n - trailer_at < trailer_len:
            continue
        trailer = data[trailer_at:trailer_at + trailer_len]
        if not trailer.startswith(label) or not trailer.endswith(_DASHES):
            continue
        if _get_line(data, trailer_at + trailer_len)[0]:
            continue

        der = b""
        if end_index > 0:
            decoded = _b64(data[rest:rest + end_index])
            if decoded is None:
                continue
            der = decoded
        # the -1: the END may sit right after the BEGIN line when the block is empty
        _, after = _get_line(data, rest + end_index + len(_PEM_END) - 1)
        return Block(label, headers, der), after


def decode_all(data: bytes, *, limit: int) -> list[Block]:
    """Every block, as Go's loops over pem.Decode find them; at most `limit` + 1 (so a caller can see the excess)."""
    out: list[Block] = []
    budget = _Budget()
    pos = 0
    while pos < len(data) and len(out) <= limit:
        block, pos2 = decode(data, pos, budget)
        if block is None:
            break
        out.append(block)
        pos = pos2
    return out
