"""FETCH data items (RFC 9051 §6.4.5, §7.5.2; RFC 3516 BINARY; RFC 7162 MODSEQ).

Everything a ``* n FETCH (...)`` response holds, built from what the store keeps: the
message's flags and dates (:class:`~tachymail.mailbox.MessageInfo`), its stored MIME summary
(``tachymail.mailbox.summary``: ENVELOPE and BODYSTRUCTURE are never re-parsed from the
message) and its stored octets, read by range.

What callers may rely on:

- :func:`fetch_response` returns the response as pieces: ``bytes``, and :class:`ContentRange`
  for section data that are the stored octets unchanged (``BODY[]``, ``BODY[TEXT]``,
  ``BODY[1]``, ``RFC822``, ``BODY[HEADER]``, ``BODY[1.MIME]``, ``BINARY`` of a part with an
  identity encoding...), which the session streams from the store in pieces. The ``{n}\\r\\n``
  of such a literal ends the bytes piece before it. Items come in the order asked (an item
  asked twice is answered once); ``UID`` comes first when *uid* is set and it was not asked,
  ``MODSEQ`` last when *modseq* is set and it was not asked. Exception: exactly
  ``UID FLAGS RFC822.SIZE`` (with INTERNALDATE and MODSEQ or not), in any order, is one
  call into the compiled ``fetch_flags_line`` and comes in that order.
- The response item names are RFC 9051's: ``BODY[...]`` for ``BODY.PEEK[...]``,
  ``BODY[...]<offset>`` for a partial, ``BINARY[1]``, ``BINARY.SIZE[1]``, header field names
  as asked (upper-cased by the tokenizer).
- Section addressing follows RFC 9051 §6.4.5: part 1 of a non-multipart message is its body;
  HEADER, HEADER.FIELDS (.NOT) and TEXT after part numbers address the message encapsulated
  in a message/rfc822 (or message/global) part, and are empty for another part; a part
  number that does not exist gives an empty string (as Dovecot does), never an error.
  A partial whose origin is past the end gives ``""``.
- BINARY decodes base64 (leniently: stray characters skipped, missing padding supplied) and
  quoted-printable; 7bit, 8bit and binary are served as stored; any other encoding raises
  :class:`FetchError` with code ``UNKNOWN-CTE`` (the session answers ``NO [UNKNOWN-CTE]``).
  Decoded octets holding a NUL go out as a literal8 ``~{n}``.
- Header strings in ENVELOPE and BODYSTRUCTURE are quoted strings when they are short 7-bit
  text, else literals; with *utf8* (UTF8=ACCEPT enabled, RFC 6855) 8-bit UTF-8 text may be a
  quoted string too. The summary keeps header values as text (invalid UTF-8 became U+FFFD),
  so an 8-bit header is sent as UTF-8.
- Nothing here raises on broken MIME or odd summaries but :class:`FetchError`.
"""

from __future__ import annotations

import binascii
import re
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

from tachymail.mailbox import MessageInfo
from tachymail.protocol.imap import fetch_flags_line, quote
from tachymail.protocol.imap_types import FetchAtt

__all__ = [
    "ContentRange",
    "FetchError",
    "Piece",
    "bodystructure",
    "envelope",
    "fetch_response",
    "format_flags",
    "format_internaldate",
    "render_structures",
    "sets_seen",
]


class ContentRange(NamedTuple):
    """Octets [start, start + length) of the stored message, sent as they are: the session
    streams them from the store in pieces (a big BODY[] is never built in memory)."""

    start: int
    length: int


Piece = bytes | ContentRange


class FetchError(Exception):
    """A section that cannot be served: the session answers ``tag NO [code] text``
    (``tag NO text`` when *code* is None)."""

    def __init__(self, text: str, code: str | None = None) -> None:
        super().__init__(text)
        self.text = text
        self.code = code


# ---------------------------------------------------------------------------------------------
# Flags, dates, strings

#: system flags in the order they are listed (keywords follow, sorted)
_SYSTEM_FLAGS = ("\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft", "\\Recent")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_NIL = b"NIL"


def format_flags(flags: Iterable[str]) -> bytes:
    """The flag list ``(\\Seen $Junk)``: system flags first in a fixed order, then keywords
    sorted."""
    given = set(flags)
    ordered = [flag for flag in _SYSTEM_FLAGS if flag in given]
    ordered += sorted(given.difference(_SYSTEM_FLAGS))
    return b"(" + " ".join(ordered).encode("utf-8", "replace") + b")"


def format_internaldate(when: float) -> bytes:
    """INTERNALDATE as RFC 9051's quoted date-time, in UTC: ``" 7-Jul-1996 02:44:25 +0000"``
    (the day is space-padded to two characters)."""
    t = time.gmtime(max(0.0, when))
    return b'"%2d-%s-%04d %02d:%02d:%02d +0000"' % (
        t.tm_mday,
        _MONTHS[t.tm_mon - 1].encode(),
        t.tm_year,
        t.tm_hour,
        t.tm_min,
        t.tm_sec,
    )


def _string(data: bytes, utf8: bool) -> bytes:
    """*data* as an IMAP string; 8-bit text quoted only when *utf8* (RFC 6855 §3)."""
    if (
        utf8
        and len(data) <= 1024
        and not data.isascii()
        and b"\0" not in data
        and b"\r" not in data
        and b"\n" not in data
    ):
        return b'"' + data.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
    return quote(data)


def _nstring(value: str | None, utf8: bool) -> bytes:
    if value is None:
        return _NIL
    return _string(value.encode("utf-8", "replace"), utf8)


# ---------------------------------------------------------------------------------------------
# ENVELOPE (RFC 9051 §7.5.2) and its addresses (RFC 5322 §3.4, leniently)

# tokens of an address header: quoted string, comment start, domain literal, specials, atoms
_SPECIALS = frozenset('()<>@,;:"[]')
_WSP = " \t\r\n"


class _Token(NamedTuple):
    kind: str  # "atom", "quoted", "literal" (domain literal), "special"
    text: str


def _tokenize(value: str) -> tuple[list[_Token], list[str]]:
    """The tokens of an address header and, per token index, the comment that preceded it
    (comments are dropped from the token stream; the last one names a bare addr-spec)."""
    tokens: list[_Token] = []
    comments: list[str] = []
    pending_comment = ""
    i, n = 0, len(value)
    while i < n:
        c = value[i]
        if c in _WSP:
            i += 1
        elif c == "(":
            depth, j, text = 1, i + 1, []
            while j < n and depth:
                d = value[j]
                if d == "\\" and j + 1 < n:
                    text.append(value[j + 1])
                    j += 2
                    continue
                if d == "(":
                    depth += 1
                elif d == ")":
                    depth -= 1
                    if not depth:
                        break
                text.append(d)
                j += 1
            pending_comment = "".join(text).strip()
            i = j + 1
        elif c == '"':
            j, text = i + 1, []
            while j < n and value[j] != '"':
                if value[j] == "\\" and j + 1 < n:
                    j += 1
                text.append(value[j])
                j += 1
            tokens.append(_Token("quoted", "".join(text)))
            comments.append(pending_comment)
            pending_comment = ""
            i = j + 1
        elif c == "[":
            j = value.find("]", i)
            j = n if j < 0 else j + 1
            tokens.append(_Token("literal", value[i:j]))
            comments.append(pending_comment)
            pending_comment = ""
            i = j
        elif c in _SPECIALS:
            tokens.append(_Token("special", c))
            comments.append(pending_comment)
            pending_comment = ""
            i += 1
        else:
            j = i
            while j < n and value[j] not in _WSP and value[j] not in _SPECIALS:
                j += 1
            tokens.append(_Token("atom", value[i:j]))
            comments.append(pending_comment)
            pending_comment = ""
            i = j
    comments.append(pending_comment)  # a comment after the last token
    return tokens, comments


#: one address of an ENVELOPE list: (name, adl, mailbox, host); a group start is
#: (None, None, name, None) and a group end (None, None, None, None)
Address = tuple[str | None, str | None, str | None, str | None]

_MISSING_MAILBOX = "MISSING_MAILBOX"
_MISSING_DOMAIN = "MISSING_DOMAIN"


class _AddressParser:
    def __init__(self, value: str) -> None:
        self.tokens, self.comments = _tokenize(value)
        self.i = 0

    def peek(self, offset: int = 0) -> _Token | None:
        j = self.i + offset
        return self.tokens[j] if j < len(self.tokens) else None

    def is_special(self, text: str, offset: int = 0) -> bool:
        token = self.peek(offset)
        return token is not None and token.kind == "special" and token.text == text

    def phrase(self) -> str:
        """Words (atoms, quoted strings, dots) up to the next other special, joined by
        single spaces, as RFC 9051 wants an ENVELOPE name."""
        words: list[str] = []
        while (token := self.peek()) is not None and token.kind in ("atom", "quoted"):
            words.append(token.text)
            self.i += 1
        return " ".join(words)

    def parse(self) -> list[Address]:
        out: list[Address] = []
        while self.peek() is not None:
            if self.is_special(",") or self.is_special(";") or self.is_special(">"):
                self.i += 1
                continue
            start = self.i
            name = self.phrase()
            if self.is_special(":") and name:
                self.i += 1
                out.append((None, None, name, None))
                while self.peek() is not None and not self.is_special(";"):
                    if self.is_special(",") or self.is_special(">") or self.is_special(":"):
                        self.i += 1
                        continue
                    self.mailbox(out)
                if self.is_special(";"):
                    self.i += 1
                out.append((None, None, None, None))
                continue
            self.i = start
            self.mailbox(out)
        return out

    def mailbox(self, out: list[Address]) -> None:
        """One name-addr or addr-spec (RFC 5322 §3.4), appended to *out* when it holds
        anything."""
        start = self.i
        name = self.phrase()
        if self.is_special("<"):
            self.i += 1
            adl = self.route()
            local, domain = self.addr_spec(stop=">")
            if self.is_special(">"):
                self.i += 1
            out.append(self.address(name or None, adl, local, domain))
            return
        self.i = start
        local, domain = self.addr_spec(stop=None)
        if local is None and domain is None:
            if self.i == start:  # a token no address starts with: skip it
                self.i += 1
            return
        # a bare addr-spec takes its name from a comment after it: "bob@example.com (Bob)"
        comment = self.comments[self.i]
        if domain is None and local is not None and " " in local:
            out.append(self.address(local, None, None, None))
            return
        out.append(self.address(comment or None, None, local, domain))

    def route(self) -> str | None:
        """An obsolete source route ``@a,@b:`` (RFC 5322 obs-route) as the ENVELOPE adl."""
        j = self.i
        if not self.is_special("@"):
            return None
        parts: list[str] = []
        while self.is_special("@", j - self.i):
            j += 1
            host = []
            while j < len(self.tokens) and (
                self.tokens[j].kind in ("atom", "literal")
                or (self.tokens[j].kind == "special" and self.tokens[j].text == ".")
            ):
                host.append(self.tokens[j].text)
                j += 1
            parts.append("@" + "".join(host))
            while j < len(self.tokens) and self.tokens[j] == _Token("special", ","):
                j += 1
        if j < len(self.tokens) and self.tokens[j] == _Token("special", ":"):
            self.i = j + 1
            return ",".join(parts)
        return None

    def addr_spec(self, stop: str | None) -> tuple[str | None, str | None]:
        """local-part ["@" domain] up to *stop*, ``,``, ``;`` or the end; (None, None) when
        there is neither."""
        words: list[str] = []
        while (token := self.peek()) is not None and token.kind in ("atom", "quoted"):
            # a quoted local part is sent unquoted, as Dovecot does
            words.append(token.text)
            self.i += 1
        # words without "@" (a display name whose address is missing) are kept apart by spaces
        local = ("" if self.is_special("@") else " ").join(words) or None
        domain: str | None = None
        if self.is_special("@"):
            self.i += 1
            parts = []
            while (token := self.peek()) is not None and token.kind in ("atom", "literal"):
                parts.append(token.text)
                self.i += 1
            domain = "".join(parts) or None
            if domain is None:
                domain = _MISSING_DOMAIN
            if local is None:
                local = _MISSING_MAILBOX
        # skip what cannot belong to this address (junk before the next separator)
        while (token := self.peek()) is not None and not (
            token.kind == "special" and token.text in (",", ";", stop or ",")
        ):
            if token.kind == "special" and token.text == "<":
                break
            self.i += 1
        return local, domain

    @staticmethod
    def address(
        name: str | None, adl: str | None, local: str | None, domain: str | None
    ) -> Address:
        # an address always has a host: NIL there marks group syntax (RFC 9051 §7.5.2)
        return (
            name or None,
            adl,
            local if local is not None else _MISSING_MAILBOX,
            domain if domain is not None else _MISSING_DOMAIN,
        )


def parse_addresses(value: str | None) -> list[Address]:
    """The ENVELOPE addresses of one header value (empty when None or it holds none)."""
    if not value:
        return []
    return _AddressParser(value).parse()


def _address_list(addresses: list[Address], utf8: bool) -> bytes:
    if not addresses:
        return _NIL
    out = bytearray(b"(")
    for name, adl, mailbox, host in addresses:
        out += b"("
        out += b" ".join(_nstring(v, utf8) for v in (name, adl, mailbox, host))
        out += b")"
    out += b")"
    return bytes(out)


def envelope(raw: dict[str, str | None], *, utf8: bool = False) -> bytes:
    """ENVELOPE (RFC 9051 §7.5.2) of the summary's raw header fields: date, subject,
    in-reply-to and message-id as given (NIL when absent), address lists parsed with groups,
    sender and reply-to defaulting to from (RFC 3501) when absent or empty."""
    lists = {
        name: parse_addresses(raw.get(name))
        for name in ("from", "sender", "reply-to", "to", "cc", "bcc")
    }
    for name in ("sender", "reply-to"):
        if not lists[name]:
            lists[name] = lists["from"]
    fields = [
        _nstring(raw.get("date"), utf8),
        _nstring(raw.get("subject"), utf8),
        *(_address_list(lists[n], utf8) for n in ("from", "sender", "reply-to", "to", "cc", "bcc")),
        _nstring(raw.get("in-reply-to"), utf8),
        _nstring(raw.get("message-id"), utf8),
    ]
    return b"(" + b" ".join(fields) + b")"


# ---------------------------------------------------------------------------------------------
# BODYSTRUCTURE / BODY (RFC 9051 §7.5.2 body grammar)


def _upper(value: str) -> bytes:
    return quote(value.upper().encode("utf-8", "replace"))


def _params(params: dict[str, str], utf8: bool) -> bytes:
    if not params:
        return _NIL
    items = []
    for name, text in params.items():
        value = text.encode("utf-8", "replace")
        if not utf8 and not value.isascii():
            # the summary holds RFC 2231 values decoded: send them encoded again, the form
            # clients decode (RFC 2231 §4), rather than 8-bit octets a client may misread
            name += "*"
            value = b"utf-8''" + _percent(value)
        items.append(_string(name.upper().encode("utf-8", "replace"), utf8))
        items.append(_string(value, utf8))
    return b"(" + b" ".join(items) + b")"


_ATTRIBUTE_CHARS = frozenset(
    b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$&+-.^_`|~"
)


def _percent(value: bytes) -> bytes:
    return b"".join(bytes((c,)) if c in _ATTRIBUTE_CHARS else b"%%%02X" % c for c in value)


def _disposition(part: dict[str, Any], utf8: bool) -> bytes:
    kind = part.get("disposition")
    if not kind:
        return _NIL
    params = _params(part.get("disposition_params") or {}, utf8)
    return b"(" + _upper(kind) + b" " + params + b")"


def _language(part: dict[str, Any], utf8: bool) -> bytes:
    value = part.get("language")
    tags = [tag for tag in re.split(r"[\s,]+", value) if tag] if value else []
    if not tags:
        return _NIL
    # always a list, as Dovecot sends it (the grammar allows a single string too)
    return b"(" + b" ".join(_string(t.encode("utf-8", "replace"), utf8) for t in tags) + b")"


def _is_message(part: dict[str, Any]) -> bool:
    """Whether *part* encapsulates a message that sections can address."""
    return "message" in part and part.get("type") == "message"


def _lines(part: dict[str, Any]) -> int:
    # line feeds, as Dovecot counts; summaries from before "newlines" have "lines" only
    return int(part.get("newlines", part.get("lines")) or 0)


def bodystructure(
    part: dict[str, Any], *, extensible: bool, utf8: bool = False, rev2: bool = False
) -> bytes:
    """BODYSTRUCTURE (*extensible*) or BODY of a summary PART tree (RFC 9051 §7.5.2).

    Types, subtypes, parameter names and encodings are upper-cased; a text part without a
    charset gets ``"CHARSET" "US-ASCII"`` after its parameters (RFC 2045 §5.2's default, as
    Dovecot does); body-fld-lines counts line feeds (as Dovecot does). A multipart without
    parts (broken MIME) gets one empty text/plain part, as the grammar needs one. A
    message/rfc822 whose content was not parsed (it is base64 or quoted-printable encoded)
    gets an all-NIL envelope and an empty text/plain body. message/global has its envelope
    and body only with *rev2* (RFC 9051's grammar); RFC 3501's has no such type, so an
    IMAP4rev1 client gets it as a basic part, like Dovecot 2.3 sends it."""
    out = bytearray()
    _body(part, extensible, utf8, rev2, out)
    return bytes(out)


_EMPTY_TEXT: dict[str, Any] = {
    "type": "text",
    "subtype": "plain",
    "params": {},
    "encoding": "7bit",
    "octets": 0,
    "newlines": 0,
}
_EMPTY_ENVELOPE: dict[str, str | None] = {}


def _body(part: dict[str, Any], extensible: bool, utf8: bool, rev2: bool, out: bytearray) -> None:
    kind = str(part.get("type") or "text")
    subtype = str(part.get("subtype") or "plain")
    if kind == "multipart":
        out += b"("
        for child in part.get("parts") or [_EMPTY_TEXT]:
            _body(child, extensible, utf8, rev2, out)
        out += b" " + _upper(subtype)
        if extensible:
            out += b" " + _params(part.get("params") or {}, utf8)
            out += b" " + _disposition(part, utf8)
            out += b" " + _language(part, utf8)
            out += b" " + _nstring(part.get("location"), utf8)
        out += b")"
        return
    params = dict(part.get("params") or {})
    if kind == "text" and "charset" not in params:
        params["charset"] = "us-ascii"
    out += b"(" + _upper(kind) + b" " + _upper(subtype)
    out += b" " + _params(params, utf8)
    out += b" " + _nstring(part.get("id"), utf8)
    out += b" " + _nstring(part.get("description"), utf8)
    out += b" " + _upper(str(part.get("encoding") or "7bit"))
    out += b" %d" % int(part.get("octets") or 0)
    if kind == "message" and (subtype == "rfc822" or (subtype == "global" and rev2)):
        inner = part.get("message") or {}
        out += b" " + envelope(inner.get("envelope") or _EMPTY_ENVELOPE, utf8=utf8)
        out += b" "
        _body(inner.get("body") or _EMPTY_TEXT, extensible, utf8, rev2, out)
        out += b" %d" % _lines(part)
    elif kind == "text":
        out += b" %d" % _lines(part)
    if extensible:
        out += b" " + _nstring(part.get("md5"), utf8)
        out += b" " + _disposition(part, utf8)
        out += b" " + _language(part, utf8)
        out += b" " + _nstring(part.get("location"), utf8)
    out += b")"


def render_structures(summary: dict[str, Any], *, utf8: bool, rev2: bool) -> dict[bytes, bytes]:
    """The BODYSTRUCTURE (key b"S"), BODY (b"B") and ENVELOPE (b"E") of a message's
    summary, byte for byte what :func:`fetch_response` sends for those items."""
    body = summary.get("body") or _EMPTY_TEXT
    return {
        b"S": bodystructure(body, extensible=True, utf8=utf8, rev2=rev2),
        b"B": bodystructure(body, extensible=False, utf8=utf8, rev2=rev2),
        b"E": envelope(summary.get("envelope") or {}, utf8=utf8),
    }


# ---------------------------------------------------------------------------------------------
# Sections (RFC 9051 §6.4.5)

_IDENTITY_ENCODINGS = frozenset({"7bit", "8bit", "binary", ""})
#: NUL is looked for in pieces of this size when BINARY serves stored octets unchanged
_SCAN_CHUNK = 1 << 20


def sets_seen(items: Sequence[FetchAtt]) -> bool:
    """Whether fetching *items* sets \\Seen (BODY[..] and BINARY[..] without .PEEK, RFC822,
    RFC822.TEXT), RFC 9051 §6.4.5."""
    for item in items:
        if item.name in (b"RFC822", b"RFC822.TEXT", b"BINARY"):
            return True
        if item.name == b"BODY" and item.part is not None:
            return True
    return False


class _Locator:
    """Where a section's octets are: found by walking the summary tree once."""

    def __init__(self, summary: dict[str, Any], size: int) -> None:
        self.root: dict[str, Any] = summary.get("body") or {}
        self.size = size

    def part(self, numbers: tuple[int, ...]) -> dict[str, Any] | None:
        """The part *numbers* address, or None when there is none."""
        node = self.root
        in_message = True  # node is the body of a message: the root or an encapsulated one
        for n in numbers:
            if n < 1:
                return None
            if not in_message and _is_message(node):
                node = node["message"].get("body") or {}
                in_message = True
            if node.get("type") == "multipart":
                children = node.get("parts") or []
                if n > len(children):
                    return None
                node = children[n - 1]
            elif not (in_message and n == 1):  # part 1 of a non-multipart message is its body
                return None
            in_message = False
        return node

    def range(self, item: FetchAtt) -> tuple[int, int] | None:
        """Start and end of the section's octets before HEADER.FIELDS filtering; None for a
        section that does not exist."""
        numbers = item.part or ()
        text = item.text
        message: dict[str, Any] = self.root
        if not numbers:
            if not text:
                return 0, self.size
        else:
            node = self.part(numbers)
            if node is None:
                return None
            if text == b"MIME":
                return _int(node, "start"), _int(node, "body_start")
            if text == b"":
                return _int(node, "body_start"), _int(node, "end")
            if not _is_message(node):  # HEADER and TEXT need an encapsulated message
                return None
            message = node["message"].get("body") or {}
        end = self.size if not numbers else _int(message, "end")
        if text == b"TEXT":
            return _int(message, "body_start"), end
        # HEADER, HEADER.FIELDS, HEADER.FIELDS.NOT
        return _int(message, "start"), _int(message, "body_start")


def _int(node: dict[str, Any], key: str) -> int:
    return max(0, int(node.get(key) or 0))


def _section_name(item: FetchAtt) -> bytes:
    """The section spec as the response names it: ``1.2.HEADER.FIELDS (FROM SUBJECT)``."""
    spec = [b"%d" % n for n in item.part or ()]
    if item.text:
        spec.append(item.text)
    text = b".".join(spec)
    if item.fields:
        text += b" (" + b" ".join(item.fields) + b")"
    return text


def _field_name(line: bytes) -> bytes:
    return line.split(b":", 1)[0].strip().upper()


def filter_header(header: bytes, fields: Iterable[bytes], keep: bool) -> bytes:
    """The fields of *header* whose names are (*keep*) or are not in *fields*
    (case-insensitive), as they are (folded lines kept), followed by the empty line."""
    wanted = {f.upper() for f in fields}
    out = bytearray()
    current = b""
    lines = header.splitlines(keepends=True)
    selected = False
    for line in lines:
        if line in (b"\r\n", b"\n"):
            break  # the blank line that ends the header block
        if line[:1] in (b" ", b"\t") and current:
            if selected:
                out += line
            continue
        if b":" not in line:
            current = b""
            selected = False
            continue
        current = _field_name(line)
        selected = (current in wanted) == keep
        if selected:
            out += line
    if out and not out.endswith(b"\n"):
        out += b"\r\n"
    return bytes(out) + b"\r\n"


_NOT_BASE64 = re.compile(rb"[^A-Za-z0-9+/]")
_QP_TRAILING_SPACE = re.compile(rb"[ \t]+(?=\r?\n|$)")


def _decode_base64(data: bytes) -> bytes:
    """base64 leniently: the text up to the first "=", other octets outside the alphabet
    skipped, padding supplied, a lone trailing character (no whole octet) dropped."""
    cleaned = _NOT_BASE64.sub(b"", data.split(b"=", 1)[0])
    if len(cleaned) % 4 == 1:
        cleaned = cleaned[:-1]
    return binascii.a2b_base64(cleaned + b"=" * (-len(cleaned) % 4))


def _decode_qp(data: bytes) -> bytes:
    # white space at the end of an encoded line was added in transport (RFC 2045 §6.7 (3))
    return binascii.a2b_qp(_QP_TRAILING_SPACE.sub(b"", data))


def decode_transfer(encoding: str, data: bytes) -> bytes:
    """*data* decoded from Content-Transfer-Encoding *encoding* (lower case); FetchError
    UNKNOWN-CTE for an encoding other than 7bit, 8bit, binary, base64, quoted-printable."""
    if encoding in _IDENTITY_ENCODINGS:
        return data
    if encoding == "base64":
        return _decode_base64(data)
    if encoding == "quoted-printable":
        return _decode_qp(data)
    raise FetchError(f"unknown Content-Transfer-Encoding {encoding!r}", "UNKNOWN-CTE")


def _clip(start: int, end: int, partial: tuple[int, int] | None) -> tuple[int, int]:
    """The [start, end) range of a partial ``<offset.length>`` of [start, end)."""
    if partial is None:
        return start, end
    offset, length = partial
    first = min(end, start + offset)
    return first, min(end, first + length)


# ---------------------------------------------------------------------------------------------
# The response


class _Response:
    """Bytes accumulated into pieces, a ContentRange ending the bytes piece before it."""

    def __init__(self, seq: int) -> None:
        self.pieces: list[Piece] = []
        self.buf = bytearray(b"* %d FETCH (" % seq)
        self.first = True

    def item(self, name: bytes) -> None:
        if not self.first:
            self.buf += b" "
        self.first = False
        self.buf += name + b" "

    def add(self, data: bytes) -> None:
        self.buf += data

    def literal(self, data: bytes) -> None:
        if not data:
            self.buf += b'""'
        elif b"\0" in data:
            self.buf += b"~{%d}\r\n" % len(data)
            self.buf += data
        else:
            self.buf += b"{%d}\r\n" % len(data)
            self.buf += data

    def stored(self, start: int, length: int, binary: bool = False) -> None:
        if length <= 0:
            self.buf += b'""'
            return
        self.buf += (b"~{%d}\r\n" if binary else b"{%d}\r\n") % length
        self.pieces.append(bytes(self.buf))
        self.buf = bytearray()
        self.pieces.append(ContentRange(start, length))

    def finish(self) -> list[Piece]:
        self.buf += b")\r\n"
        self.pieces.append(bytes(self.buf))
        return self.pieces


#: the item sets fetch_flags_line answers (in its order: UID FLAGS RFC822.SIZE ...)
_FAST_ITEMS = frozenset(
    frozenset(names)
    for names in (
        (b"UID", b"FLAGS", b"RFC822.SIZE"),
        (b"UID", b"FLAGS", b"RFC822.SIZE", b"INTERNALDATE"),
        (b"UID", b"FLAGS", b"RFC822.SIZE", b"MODSEQ"),
        (b"UID", b"FLAGS", b"RFC822.SIZE", b"INTERNALDATE", b"MODSEQ"),
    )
)


def fetch_response(
    seq: int,
    info: MessageInfo,
    items: Sequence[FetchAtt],
    summary: Callable[[], dict[str, Any]],
    read: Callable[[int, int], bytes],
    *,
    uid: bool = False,
    modseq: bool = False,
    utf8: bool = False,
    rev2: bool = False,
) -> list[Piece]:
    """The untagged response ``* seq FETCH (...)\\r\\n`` as pieces: bytes, and ContentRange
    for section octets that are the stored octets unchanged (the literal's ``{n}\\r\\n`` is in
    the bytes before it). Items in the order asked. Raises FetchError(text) for a section
    that cannot be served in a way the session answers with ``NO`` (e.g. BINARY of an unknown
    encoding: ``NO [UNKNOWN-CTE]``).

    *info*: flags as they are after any \\Seen the session set. *summary* is called at most
    once, and only for items that need the MIME structure; *read(offset, length)* reads the
    stored message. *uid*: UID FETCH, UID is included even if not asked (RFC 9051 §6.4.9);
    *modseq*: CONDSTORE is active, MODSEQ is included (RFC 7162 §3.1.4.1); *utf8*:
    UTF8=ACCEPT is enabled, header strings may be sent as 8-bit quoted strings; *rev2*:
    IMAP4rev2 is enabled (message/global parts get RFC 9051's structure)."""
    cache: list[dict[str, Any]] = []

    def tree() -> dict[str, Any]:
        if not cache:
            cache.append(summary())
        return cache[0]

    wanted = list(dict.fromkeys(items))  # an item asked twice is answered once
    names = {item.name for item in wanted}
    if uid and b"UID" not in names:
        wanted.insert(0, FetchAtt(b"UID"))
    if modseq and b"MODSEQ" not in names:
        wanted.append(FetchAtt(b"MODSEQ"))
    fast = frozenset(item.name for item in wanted)
    if len(fast) == len(wanted) and fast in _FAST_ITEMS:
        # the common "FETCH 1:* (UID FLAGS RFC822.SIZE)": one call into the compiled writer
        date = format_internaldate(info.internaldate) if b"INTERNALDATE" in fast else None
        stamp = info.modseq if b"MODSEQ" in fast else 0
        if stamp or b"MODSEQ" not in fast:
            flags = format_flags(info.flags)
            return [fetch_flags_line(seq, info.uid, flags, info.size, date, stamp)]
    out = _Response(seq)
    for item in wanted:
        _item(out, item, info, tree, read, utf8, rev2)
    return out.finish()


def _item(
    out: _Response,
    item: FetchAtt,
    info: MessageInfo,
    tree: Callable[[], dict[str, Any]],
    read: Callable[[int, int], bytes],
    utf8: bool,
    rev2: bool,
) -> None:
    name = item.name
    if name == b"UID":
        out.item(b"UID")
        out.add(b"%d" % info.uid)
    elif name == b"FLAGS":
        out.item(b"FLAGS")
        out.add(format_flags(info.flags))
    elif name == b"INTERNALDATE":
        out.item(b"INTERNALDATE")
        out.add(format_internaldate(info.internaldate))
    elif name == b"RFC822.SIZE":
        out.item(b"RFC822.SIZE")
        out.add(b"%d" % info.size)
    elif name == b"MODSEQ":
        out.item(b"MODSEQ")
        out.add(b"(%d)" % info.modseq)
    elif name == b"ENVELOPE":
        out.item(b"ENVELOPE")
        out.add(envelope(tree().get("envelope") or {}, utf8=utf8))
    elif name == b"BODYSTRUCTURE" or (name == b"BODY" and item.part is None):
        out.item(name)
        body = tree().get("body") or _EMPTY_TEXT
        structure = bodystructure(body, extensible=name == b"BODYSTRUCTURE", utf8=utf8, rev2=rev2)
        out.add(structure)
    elif name == b"RFC822":
        out.item(b"RFC822")
        out.stored(0, info.size)
    elif name in (b"RFC822.HEADER", b"RFC822.TEXT"):
        section = FetchAtt(b"BODY", (), b"HEADER" if name == b"RFC822.HEADER" else b"TEXT")
        located = _Locator(tree(), info.size).range(section)
        start, end = located or (0, 0)
        out.item(name)
        out.stored(start, end - start)
    elif name in (b"BODY", b"BODY.PEEK"):
        _body_section(out, item, info, tree, read)
    elif name in (b"BINARY", b"BINARY.PEEK", b"BINARY.SIZE"):
        _binary_section(out, item, info, tree, read)
    else:  # the tokenizer gives no other names
        raise FetchError(f"unknown FETCH item {name.decode('ascii', 'replace')}")


def _origin(item: FetchAtt) -> bytes:
    return b"<%d>" % item.partial[0] if item.partial is not None else b""


def _body_section(
    out: _Response,
    item: FetchAtt,
    info: MessageInfo,
    tree: Callable[[], dict[str, Any]],
    read: Callable[[int, int], bytes],
) -> None:
    out.item(b"BODY[" + _section_name(item) + b"]" + _origin(item))
    if not item.part and not item.text:
        # the whole message: no need for the MIME structure
        start, end = _clip(0, info.size, item.partial)
        out.stored(start, end - start)
        return
    located = _Locator(tree(), info.size).range(item)
    if located is None:
        out.add(b'""')
        return
    start, end = located
    end = max(start, min(end, info.size))
    if item.text in (b"HEADER.FIELDS", b"HEADER.FIELDS.NOT"):
        header = read(start, end - start)
        data = filter_header(header, item.fields, keep=item.text == b"HEADER.FIELDS")
        if item.partial is not None:
            first, last = _clip(0, len(data), item.partial)
            data = data[first:last]
        out.literal(data)
        return
    start, end = _clip(start, end, item.partial)
    out.stored(start, end - start)


def _binary_section(
    out: _Response,
    item: FetchAtt,
    info: MessageInfo,
    tree: Callable[[], dict[str, Any]],
    read: Callable[[int, int], bytes],
) -> None:
    numbers = item.part or ()
    label = b"BINARY.SIZE" if item.name == b"BINARY.SIZE" else b"BINARY"
    label += b"[" + b".".join(b"%d" % n for n in numbers) + b"]"
    if numbers:
        node = _Locator(tree(), info.size).part(numbers)
        if node is None:
            out.item(label + _origin(item))
            out.add(b"NIL" if item.name != b"BINARY.SIZE" else b"0")
            return
        start, end = _int(node, "body_start"), min(_int(node, "end"), info.size)
        encoding = str(node.get("encoding") or "7bit").lower()
        if node.get("type") in ("multipart", "message"):
            encoding = "binary"  # composite types are never decoded (RFC 2045 §6.4)
    else:
        start, end, encoding = 0, info.size, "binary"
    end = max(start, end)
    if encoding in _IDENTITY_ENCODINGS:
        if item.name == b"BINARY.SIZE":
            out.item(label)
            out.add(b"%d" % (end - start))
            return
        first, last = _clip(start, end, item.partial)
        has_nul = any(
            b"\0" in read(pos, min(_SCAN_CHUNK, last - pos))
            for pos in range(first, last, _SCAN_CHUNK)
        )
        out.item(label + _origin(item))
        out.stored(first, last - first, binary=has_nul)
        return
    data = decode_transfer(encoding, read(start, end - start))
    if item.name == b"BINARY.SIZE":
        out.item(label)
        out.add(b"%d" % len(data))
        return
    first, last = _clip(0, len(data), item.partial)
    out.item(label + _origin(item))
    out.literal(data[first:last])
