"""IMAP responses on the wire, with no I/O: status responses, mailbox names, small values.

Everything returns bytes ready to write, each response ending in CRLF. Mailbox names go
out in modified UTF-7 (RFC 3501 §5.1.3) unless the client enabled UTF8=ACCEPT or
IMAP4rev2 (RFC 9051 §5.1: UTF-8), and are read back the same way.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable

from tachymail.protocol.imap import quote

#: the hierarchy separator of every mailbox name
SEPARATOR = "/"
#: status-response text is cut to this many characters (a client's words may be echoed)
_TEXT_MAX = 400
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _text(text: str) -> bytes:
    return _CONTROL.sub(" ", text[:_TEXT_MAX]).encode("utf-8", "replace")


def tagged(tag: bytes, status: str, text: str, code: str = "") -> bytes:
    """``tag OK [code] text``: *status* is OK, NO or BAD."""
    if code:
        return b"%s %s [%s] %s\r\n" % (tag, status.encode(), code.encode(), _text(text))
    return b"%s %s %s\r\n" % (tag, status.encode(), _text(text))


def untagged(status: str, text: str, code: str = "") -> bytes:
    """``* OK [code] text`` (also NO, BAD, BYE, PREAUTH)."""
    return tagged(b"*", status, text, code)


def number_list(numbers: Iterable[int]) -> bytes:
    """``1:3,5`` for the sorted *numbers* (COPYUID, VANISHED): runs joined with ``:``."""
    parts: list[bytes] = []
    start = prev = -2
    for n in sorted(set(numbers)):
        if n == prev + 1:
            prev = n
            continue
        if start >= 0:
            parts.append(b"%d" % start if start == prev else b"%d:%d" % (start, prev))
        start = prev = n
    if start >= 0:
        parts.append(b"%d" % start if start == prev else b"%d:%d" % (start, prev))
    return b",".join(parts)


def string(value: str | bytes) -> bytes:
    """*value* as an IMAP string (quoted, or a literal when it must be)."""
    return quote(value.encode() if isinstance(value, str) else value)


# --- mailbox names ------------------------------------------------------------------------


def encode_name(name: str, utf8: bool) -> bytes:
    """A stored mailbox name as the client gets it: an IMAP string, UTF-8 when *utf8* else
    modified UTF-7."""
    return quote(name.encode() if utf8 else utf7_encode(name))


def decode_name(raw: bytes, utf8: bool) -> str:
    """A mailbox name the client sent (astring) as stored; ValueError when it is not valid
    modified UTF-7 (a rev1 client) or UTF-8. A trailing separator is dropped, INBOX in any
    case is INBOX."""
    name = raw.decode("utf-8") if utf8 else utf7_decode(raw)
    if len(name) > 1 and name.endswith(SEPARATOR):
        name = name[:-1]
    return "INBOX" if name.upper() == "INBOX" else name


def decode_pattern(raw: bytes, utf8: bool) -> str:
    """A LIST reference or pattern the client sent, decoded as :func:`decode_name` but kept
    as it is otherwise (a reference's trailing separator matters). Never raises: a pattern
    that is not valid modified UTF-7 is taken as it is (it then matches nothing stored)."""
    try:
        return raw.decode("utf-8") if utf8 else utf7_decode(raw)
    except ValueError:
        return raw.decode("utf-8", "replace")


def utf7_encode(text: str) -> bytes:
    """RFC 3501 §5.1.3 modified UTF-7: printable ASCII as is (``&`` as ``&-``), the rest
    as ``&`` + modified base64 of UTF-16BE + ``-``."""
    out = bytearray()
    pending: list[str] = []

    def close() -> None:
        if pending:
            raw = "".join(pending).encode("utf-16-be")
            out.extend(b"&" + base64.b64encode(raw).rstrip(b"=").replace(b"/", b",") + b"-")
            pending.clear()

    for char in text:
        if 0x20 <= ord(char) <= 0x7E:
            close()
            out.extend(b"&-" if char == "&" else char.encode())
        else:
            pending.append(char)
    close()
    return bytes(out)


def utf7_decode(raw: bytes) -> str:
    """The inverse of :func:`utf7_encode`; ValueError on octets outside printable ASCII or
    a broken ``&...-`` run."""
    out: list[str] = []
    i, size = 0, len(raw)
    while i < size:
        octet = raw[i]
        if not 0x20 <= octet <= 0x7E:
            raise ValueError("mailbox name is not modified UTF-7")
        if octet != 0x26:  # "&"
            out.append(chr(octet))
            i += 1
            continue
        end = raw.find(b"-", i + 1)
        if end < 0:
            raise ValueError("unterminated & in mailbox name")
        chunk = raw[i + 1 : end]
        i = end + 1
        if not chunk:
            out.append("&")
            continue
        padded = chunk.replace(b",", b"/") + b"=" * (-len(chunk) % 4)
        try:
            out.append(base64.b64decode(padded, validate=True).decode("utf-16-be"))
        except (binascii.Error, UnicodeDecodeError) as exc:
            raise ValueError("bad modified base64 in mailbox name") from exc
    return "".join(out)
