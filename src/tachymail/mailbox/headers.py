"""The trace fields of local delivery: Return-Path and Delivered-To, and loop detection.

Postfix's local(8) and virtual(8) prepend the same two fields; a message that already
carries ``Delivered-To: <recipient>`` has been here before and is a mail loop (RFC 5321
§6.3): delivery refuses it with 554 5.4.6 and it bounces.
"""

from __future__ import annotations

import re

# a header field line ("name:"), the way tachymail.protocol.mime reads one
_FIELD = re.compile(rb"[\x21-\x39\x3b-\x7e]+:")


def delivery_headers(sender: str, recipient: str) -> bytes:
    """``Return-Path: <sender>`` (``<>`` for the null sender) and
    ``Delivered-To: recipient``, CRLF-terminated, to prepend to the message."""
    return f"Return-Path: <{sender}>\r\nDelivered-To: {recipient}\r\n".encode()


def _header_fields(content: bytes) -> list[tuple[bytes, bytes]]:
    """(lower-case name, unfolded value) of each field of the header block."""
    fields: list[tuple[bytes, bytes]] = []
    position = 0
    size = len(content)
    while position < size:
        end = content.find(b"\n", position)
        end = size if end < 0 else end + 1
        line = content[position:end].rstrip(b"\r\n")
        position = end
        if not line:
            break  # the blank line ending the header block
        if line[:1] in (b" ", b"\t"):
            if fields:
                name, value = fields[-1]
                fields[-1] = (name, value + line)
            continue
        match = _FIELD.match(line)
        if match is None:
            break  # not a field: the body starts here (no blank line)
        fields.append((line[: match.end() - 1].lower(), line[match.end() :]))
    return fields


def delivered_to(content: bytes, recipient: str) -> bool:
    """Whether a ``Delivered-To:`` field of the header block holds *recipient*
    (case-insensitive, angle brackets and white space ignored): a mail loop."""
    wanted = recipient.strip().strip("<>").lower().encode()
    for name, value in _header_fields(content):
        if name == b"delivered-to" and value.strip().strip(b"<>").strip().lower() == wanted:
            return True
    return False
