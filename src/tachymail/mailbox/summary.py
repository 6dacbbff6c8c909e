"""The per-message summary kept beside each message: its MIME structure and the header
fields IMAP's ENVELOPE needs, so that BODYSTRUCTURE, ENVELOPE and partial fetches are
answered without parsing the message again.

Built from ``tachymail.protocol.mime.scan`` (the compiled kernel); :func:`build_summary`
never raises, whatever the content (broken MIME gives a best-effort tree, and an internal
failure a one-part summary with a ``"summary failed"`` defect). Stored as orjson.

Layout (version 1)::

    {"v": 1, "envelope": ENVELOPE, "body": PART}

``ENVELOPE``: the raw (unfolded, undecoded) values of ``date``, ``subject``, ``from``,
``sender``, ``reply-to``, ``to``, ``cc``, ``bcc``, ``in-reply-to``, ``message-id``, each a
str or None; bytes that are not UTF-8 become U+FFFD. IMAP applies RFC 3501's defaults
(sender and reply-to fall back to from) and parses the addresses.

``PART``: ``type``, ``subtype`` (lower case), ``params`` (Content-Type parameters, names
lower case), ``id``, ``description``, ``encoding`` (lower case, default "7bit"), ``md5``,
``disposition`` (lower case or None), ``disposition_params``, ``language``, ``location``,
``start``, ``body_start``, ``end`` (byte offsets into the stored message, as the scanner
gives them), ``octets`` (body size), ``lines`` (body lines: line feeds, plus one for a last
line without one), ``newlines`` (line feeds only: IMAP's body-fld-lines, as Dovecot counts;
absent from older summaries), ``defects``; a multipart has ``parts`` (its children), a
message/rfc822 part has ``message``: {"envelope": ..., "body": PART} of the encapsulated
message.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson

from tachymail.protocol.mime import Part, content_type_params, header_value, scan

log = logging.getLogger(__name__)

SUMMARY_VERSION = 1

#: the header fields of IMAP's ENVELOPE (RFC 3501 §7.4.2), in its order
ENVELOPE_FIELDS = (
    "date",
    "subject",
    "from",
    "sender",
    "reply-to",
    "to",
    "cc",
    "bcc",
    "in-reply-to",
    "message-id",
)


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("utf-8", "replace")


def envelope(headers: bytes) -> dict[str, str | None]:
    """The raw ENVELOPE fields of a header block (None for each one absent)."""
    return {name: _text(header_value(headers, name.encode())) for name in ENVELOPE_FIELDS}


def _lines(content: bytes, start: int, end: int) -> int:
    if end <= start:
        return 0
    count = content.count(b"\n", start, end)
    return count if content[end - 1 : end] == b"\n" else count + 1


def _part(content: bytes, part: Part) -> dict[str, Any]:
    headers = part.header_bytes(content)
    _, params = content_type_params(header_value(headers, b"content-type") or b"")
    disposition: str | None = None
    disposition_params: dict[str, str] = {}
    raw_disposition = header_value(headers, b"content-disposition")
    if raw_disposition:
        # the Content-Type parser reads "type/subtype; params": give the token a type
        kind, disposition_params = content_type_params(b"x/" + raw_disposition.lstrip())
        disposition = kind[2:] or None
    kind, _, subtype = part.content_type.partition("/")
    node: dict[str, Any] = {
        "type": kind,
        "subtype": subtype,
        "params": params,
        "id": _text(header_value(headers, b"content-id")),
        "description": _text(header_value(headers, b"content-description")),
        "encoding": part.transfer_encoding,
        "md5": _text(header_value(headers, b"content-md5")),
        "disposition": disposition,
        "disposition_params": disposition_params,
        "language": _text(header_value(headers, b"content-language")),
        "location": _text(header_value(headers, b"content-location")),
        "start": part.start,
        "body_start": part.body_start,
        "end": part.end,
        "octets": part.end - part.body_start,
        "lines": _lines(content, part.body_start, part.end),
        # IMAP's body-fld-lines as Dovecot counts it: the line feeds (a last line without
        # one is not counted); absent from summaries stored before it was added
        "newlines": content.count(b"\n", part.body_start, part.end),
        "defects": list(part.defects),
    }
    if kind == "multipart":
        node["parts"] = [_part(content, child) for child in part.children]
    elif part.children:  # message/rfc822 (or global) with its encapsulated message
        inner = part.children[0]
        node["message"] = {
            "envelope": envelope(inner.header_bytes(content)),
            "body": _part(content, inner),
        }
    return node


def build_summary(content: bytes) -> dict[str, Any]:
    """The summary of *content* (see the module doc); never raises."""
    try:
        root = scan(content)
        return {
            "v": SUMMARY_VERSION,
            "envelope": envelope(root.header_bytes(content)),
            "body": _part(content, root),
        }
    except Exception:  # a bug here must not refuse a delivery: keep a minimal summary
        log.exception("mailbox: could not summarise a message of %d bytes", len(content))
        return {
            "v": SUMMARY_VERSION,
            "envelope": dict.fromkeys(ENVELOPE_FIELDS),
            "body": {
                "type": "text",
                "subtype": "plain",
                "params": {},
                "id": None,
                "description": None,
                "encoding": "7bit",
                "md5": None,
                "disposition": None,
                "disposition_params": {},
                "language": None,
                "location": None,
                "start": 0,
                "body_start": 0,
                "end": len(content),
                "octets": len(content),
                "lines": _lines(content, 0, len(content)),
                "defects": ["summary failed"],
            },
        }


def encode_summary(content: bytes) -> bytes:
    """The stored (orjson) form of :func:`build_summary`."""
    return orjson.dumps(build_summary(content))
