"""BINARY APPEND (RFC 3516 §4.4, RFC 9051 §6.3.12): a message APPENDed as a literal8
(``~{n}``) may hold parts in Content-Transfer-Encoding ``binary``, NUL octets included.

The server may store such content encoded. :func:`encode_binary_parts` does that once, at
APPEND: each such leaf part's body becomes base64 and its Content-Transfer-Encoding field
says so. Everything served later is then consistent without any conversion per FETCH:
BODY[n] (base64 text, never raw NULs, which IMAP4rev1 strings cannot hold), BODY[n.MIME],
BODYSTRUCTURE and RFC822.SIZE describe the stored message, and BINARY[n] decodes the base64
back to exactly the octets appended (as Dovecot answers).
"""

from __future__ import annotations

import base64
import re
from typing import Any

from tachymail.mailbox.summary import build_summary

__all__ = ["encode_binary_parts"]

# a Content-Transfer-Encoding field with its folded continuation lines, at a line start
_CTE_FIELD = re.compile(rb"(?im)^content-transfer-encoding[ \t]*:[^\n]*\n(?:[ \t][^\n]*\n)*")
# base64 line length (RFC 2045 §6.8: at most 76 characters)
_LINE = 76


def encode_binary_parts(content: bytes) -> bytes:
    """*content* with every leaf part whose Content-Transfer-Encoding is ``binary``, or whose
    body holds a NUL octet, re-encoded as base64 (header field replaced or added); the
    rest of the message is kept byte for byte. *content* itself when there is none. Never
    raises on broken MIME (the summary's best-effort tree is used)."""
    if b"\0" not in content and b"binary" not in content.lower():
        return content  # the common case costs a scan, not a parse
    edits: list[tuple[int, int, bytes]] = []
    _collect(content, build_summary(content).get("body") or {}, edits)
    if not edits:
        return content
    out = []
    position = 0
    for start, end, replacement in sorted(edits):
        out.append(content[position:start])
        out.append(replacement)
        position = end
    out.append(content[position:])
    return b"".join(out)


def _collect(content: bytes, part: dict[str, Any], edits: list[tuple[int, int, bytes]]) -> None:
    """Add the (start, end, replacement) edits that encode *part*'s binary leaves."""
    children = part.get("parts")
    if isinstance(children, list):
        for child in children:
            if isinstance(child, dict):
                _collect(content, child, edits)
        return
    inner = part.get("message")
    if isinstance(inner, dict) and isinstance(inner.get("body"), dict):
        _collect(content, inner["body"], edits)
        return
    start, body_start, end = part.get("start"), part.get("body_start"), part.get("end")
    if not (isinstance(start, int) and isinstance(body_start, int) and isinstance(end, int)):
        return
    if not 0 <= start <= body_start <= end <= len(content):
        return
    body = content[body_start:end]
    if part.get("encoding") != "binary" and b"\0" not in body:
        return
    encoded = base64.b64encode(body)
    lines = [encoded[i : i + _LINE] for i in range(0, len(encoded), _LINE)]
    # inside a multipart the CRLF before the next boundary is the boundary's own
    tail = b"\r\n" if end == len(content) else b""
    edits.append((body_start, end, b"\r\n".join(lines) + tail))
    header = content[start:body_start]
    field = _CTE_FIELD.search(header)
    line = b"Content-Transfer-Encoding: base64\r\n"
    if field is not None:
        edits.append((start + field.start(), start + field.end(), line))
    elif header in (b"\r\n", b"\n"):  # a part with no fields: the blank line alone
        edits.append((start, start, line))
    elif header.endswith(b"\r\n\r\n") or header.endswith(b"\n\n"):
        # before the blank line that ends the header block
        blank = start + len(header) - (2 if header.endswith(b"\r\n\r\n") else 1)
        edits.append((blank, blank, line))
    else:  # no blank line (a body-less part): the field and the blank line before the body
        edits.append((body_start, body_start, line + b"\r\n"))
