"""SEARCH, ESEARCH, SORT and THREAD: parse the command's arguments, evaluate them on the
selected mailbox, and write the untagged response.

Grammar and semantics: RFC 9051 §6.4.4 (every search key), RFC 3501 (NEW, OLD, RECENT: on
the session's \\Recent messages, :meth:`SearchContext.is_recent`),
RFC 4731 / RFC 9051 (ESEARCH: RETURN MIN MAX ALL COUNT), RFC 5182 (SAVE and ``$``),
RFC 7162 (the MODSEQ key and the ``(MODSEQ n)`` it adds to the response), RFC 5032 (YOUNGER,
OLDER), RFC 5256 (SORT, THREAD=ORDEREDSUBJECT, THREAD=REFERENCES, base subjects) and
RFC 5957 (SORT DISPLAY).

What callers may rely on:

- :func:`parse_search`, :func:`parse_sort` and :func:`parse_thread` take the tokenizer's
  arguments after the command name (atoms are bytes, strings ``String``, lists ``list``) and
  raise :class:`SearchError`: ``bad`` for a syntax error (answer ``tag BAD text``), else
  ``tag NO [code] text`` (``BADCHARSET (UTF-8 US-ASCII)`` for a charset other than those two).
- :func:`run_search` never raises on stored content: broken MIME, bad encodings and unknown
  charsets are searched best effort. Strings match as case-insensitive (Unicode casefold)
  substrings: header keys on the header values with RFC 2047 encoded words decoded (FROM,
  TO, CC, BCC, SUBJECT on the first such field, HEADER on every field of that name; an
  address also matches on its addr-spec with RFC 5322 comments and CFWS removed); BODY
  on the text/* parts of the body decoded (quoted-printable, base64, then their charset:
  other parts, attachments, are not text); TEXT on the header block, the header blocks of
  the body's parts and attached messages, and that body text. Dovecot (the anchor,
  tests/integration/test_imap_search_dovecot.py) answers the same.
- BEFORE/ON/SINCE compare the UTC date of the INTERNALDATE; SENT* the date written in the
  Date field (in its own time zone); a message without a valid Date field is SENTBEFORE
  every date (as Dovecot). SORT DATE and THREAD use the Date field's instant, or the
  INTERNALDATE without one (RFC 5256). A sequence range ending in ``*`` holds the last UID
  even when it starts past it (RFC 9051 §9), but ``100:*`` in a mailbox of 42 messages holds
  no sequence number (as Dovecot).
- Each message's content and summary are read at most once per run, and only when a key
  needs them (flags, sizes, dates and UIDs come from the index alone); cheap keys of an AND
  are tried first; decoded text is shared by messages of one content_id within a run.
- Runs are synchronous and CPU-bound: the session runs them off the event loop.
"""

from __future__ import annotations

import binascii
import bisect
import calendar
import codecs
import datetime
import email.utils
import re
import time
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from tachymail.mailbox import MessageInfo
from tachymail.protocol.imap import SEARCHRES, STAR, String, parse_sequence_set

__all__ = [
    "SearchContext",
    "SearchError",
    "SearchQuery",
    "SortQuery",
    "ThreadQuery",
    "base_subject",
    "parse_search",
    "parse_sort",
    "parse_thread",
    "run_search",
    "run_sort",
    "run_thread",
    "saved_uids",
    "search_response",
    "sequence_set",
    "sort_response",
]

#: the charsets SEARCH accepts (CHARSET); anything else is NO [BADCHARSET (...)]
CHARSETS = ("UTF-8", "US-ASCII")
#: how deeply NOT / OR / parentheses may nest (the evaluator recurses)
MAX_DEPTH = 64
#: THREAD algorithms (CAPABILITY THREAD=...)
THREAD_ALGORITHMS = ("ORDEREDSUBJECT", "REFERENCES")
#: SORT criteria (CAPABILITY SORT, SORT=DISPLAY)
SORT_KEYS = ("ARRIVAL", "CC", "DATE", "FROM", "SIZE", "SUBJECT", "TO", "DISPLAY")


class SearchError(Exception):
    """A SEARCH the session answers with ``tag BAD text`` (bad syntax) or, when code is set,
    ``tag NO [code] text`` (e.g. BADCHARSET, with the supported list in the code's text)."""

    def __init__(self, text: str, *, code: str | None = None) -> None:
        super().__init__(text)
        self.text = text
        self.code = code
        self.bad = code is None


class SearchContext(Protocol):
    """The selected mailbox as the search sees it."""

    #: the selected mailbox, index = seq - 1
    messages: Sequence[MessageInfo]
    #: UIDs of the saved result ($, RFC 5182)
    saved: Sequence[int]

    def content(self, info: MessageInfo) -> bytes: ...

    def summary(self, info: MessageInfo) -> dict[str, Any]: ...

    def is_recent(self, uid: int) -> bool:
        """Whether the message is \\Recent in this session (RFC 3501 §2.3.2; never under
        IMAP4rev2)."""
        ...


# ---------------------------------------------------------------------------------------------
# decoding: RFC 2047 words, transfer encodings, charsets


_ENCODED_WORD = re.compile(r"=\?([^?\s]+)\?([bBqQ])\?([^?\s]*)\?=")
_QP_HEADER_ESCAPE = re.compile(rb"=([0-9A-Fa-f]{2})")


def _codec(charset: str | None) -> str | None:
    """The Python codec of a MIME charset name, or None when Python does not know it."""
    if not charset:
        return None
    name = charset.strip().strip('"').split("*", 1)[0]  # RFC 2231 language suffix
    try:
        return codecs.lookup(name).name
    except (LookupError, ValueError):
        return None


def _decode_text(data: bytes, charset: str | None) -> str:
    """*data* as text in *charset*; undeclared or unknown: UTF-8 if it is valid, else
    Windows-1252 (what mislabelled mail nearly always is)."""
    codec = _codec(charset)
    if codec is not None and codec not in ("ascii", "us-ascii"):
        try:
            return data.decode(codec, "replace")
        except Exception:  # a codec that cannot run incrementally on junk: fall through
            pass
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("cp1252", "replace")


def _b64(data: bytes) -> bytes:
    """Base64 decoded best effort: junk octets skipped, a short last quantum padded."""
    try:
        return binascii.a2b_base64(data)  # skips line breaks and junk; fails on bad padding
    except binascii.Error:
        pass
    clean = re.sub(rb"[^A-Za-z0-9+/]", b"", data)
    extra = len(clean) % 4
    if extra == 1:
        clean = clean[:-1]
    elif extra:
        clean += b"=" * (4 - extra)
    try:
        return binascii.a2b_base64(clean)
    except binascii.Error:
        return b""


def _word(charset: str, kind: str, text: str) -> bytes:
    raw = text.encode("ascii", "replace")
    if kind in "bB":
        return _b64(raw)
    raw = raw.replace(b"_", b" ")
    return _QP_HEADER_ESCAPE.sub(lambda m: bytes((int(m.group(1), 16),)), raw)


def decode_words(value: str) -> str:
    """A header value with its RFC 2047 encoded words decoded (white space between two
    adjacent words dropped, adjacent words of one charset joined before decoding so that a
    character split across them survives); unknown charsets best effort."""
    if "=?" not in value:
        return value
    out: list[str] = []
    pending: bytes = b""
    pending_charset: str | None = None
    position = 0
    for match in _ENCODED_WORD.finditer(value):
        between = value[position : match.start()]
        charset = match.group(1)
        if pending_charset is not None and between.strip(" \t\r\n") == "":
            between = ""  # RFC 2047 §6.2: white space between encoded words is dropped
        if between or (pending_charset is not None and charset.lower() != pending_charset):
            if pending_charset is not None:
                out.append(_decode_text(pending, pending_charset))
                pending, pending_charset = b"", None
            out.append(between)
        pending += _word(charset, match.group(2), match.group(3))
        pending_charset = charset.lower()
        position = match.end()
    if pending_charset is not None:
        out.append(_decode_text(pending, pending_charset))
    out.append(value[position:])
    return "".join(out)


def _body_octets(data: bytes, encoding: str) -> bytes:
    if encoding == "base64":
        return _b64(data)
    if encoding == "quoted-printable":
        try:
            return binascii.a2b_qp(data)
        except (binascii.Error, ValueError):
            return data
    return data


_FIELD_NAME = re.compile(rb"[\x21-\x39\x3b-\x7e]+:")


_FIELD_BREAK = re.compile(rb"\r?\n(?![ \t])")
_FOLD = re.compile(r"\r?\n(?=[ \t])")


def header_fields(block: bytes) -> list[tuple[str, str]]:
    """(lower-case name, unfolded raw value) of each field of a header block, in order; it
    ends at a blank line or at a line that is not a field."""
    fields: list[tuple[str, str]] = []
    for raw in _FIELD_BREAK.split(block):
        match = _FIELD_NAME.match(raw)
        if match is None:
            if not fields and (raw.startswith(b"From ") or raw[:1] in (b" ", b"\t")):
                continue  # an mbox separator line, or a continuation of nothing
            break  # the blank line (or junk) ending the header block
        value = raw[match.end() :].decode("utf-8", "replace")
        fields.append(
            (
                raw[: match.end() - 1].decode("ascii").lower(),
                _FOLD.sub("", value).strip(" \t\r"),
            )
        )
    return fields


def _unfolded_text(block: bytes) -> str:
    """A header block as text: folds joined, encoded words decoded, casefolded (TEXT)."""
    return decode_words(_FOLD.sub("", block.decode("utf-8", "replace"))).casefold()


# ---------------------------------------------------------------------------------------------
# one message as the evaluator sees it


class _Decoded:
    """The decoded text of one stored content, built on first use."""

    __slots__ = ("body", "fields", "folded_headers", "inner_headers")

    def __init__(self) -> None:
        self.fields: list[tuple[str, str]] | None = None  # name, raw value
        self.folded_headers: str | None = None
        self.body: str | None = None
        self.inner_headers: str | None = None  # of parts and attached messages: TEXT only


class _Message:
    """One message during a run: the index entry, and its summary, content and decoded text
    fetched lazily (so a flag-only search never reads a message)."""

    __slots__ = ("_content", "_decoded", "_summary", "cache", "ctx", "info", "seq")

    def __init__(
        self, seq: int, info: MessageInfo, ctx: SearchContext, cache: dict[bytes, _Decoded]
    ) -> None:
        self.seq = seq
        self.info = info
        self.ctx = ctx
        self.cache = cache
        self._summary: dict[str, Any] | None = None
        self._content: bytes | None = None
        self._decoded: _Decoded | None = None

    def summary(self) -> dict[str, Any]:
        if self._summary is None:
            try:
                self._summary = self.ctx.summary(self.info) or {}
            except Exception:  # a missing summary searches as an empty message
                self._summary = {}
        return self._summary

    def content(self) -> bytes:
        if self._content is None:
            try:
                self._content = bytes(self.ctx.content(self.info) or b"")
            except Exception:
                self._content = b""
        return self._content

    def decoded(self) -> _Decoded:
        if self._decoded is None:
            key = self.info.content_id
            found = self.cache.get(key)
            if found is None:
                if len(self.cache) >= 256:
                    self.cache.clear()  # bounded: only repeats of one content matter
                found = self.cache[key] = _Decoded()
            self._decoded = found
        return self._decoded

    def envelope(self, name: str) -> str | None:
        value = (self.summary().get("envelope") or {}).get(name)
        return value if isinstance(value, str) else None

    def header_block(self) -> bytes:
        """The top-level header block, from the summary's offsets."""
        body = self.summary().get("body") or {}
        content = self.content()
        end = body.get("body_start")
        return content[: end if isinstance(end, int) else len(content)]

    def fields(self) -> list[tuple[str, str]]:
        """The top-level header fields (lower-case name, unfolded raw value)."""
        decoded = self.decoded()
        if decoded.fields is None:
            decoded.fields = header_fields(self.header_block())
        return decoded.fields

    def folded_headers(self) -> str:
        """The top-level header block unfolded, decoded and casefolded (TEXT)."""
        decoded = self.decoded()
        if decoded.folded_headers is None:
            decoded.folded_headers = _unfolded_text(self.header_block())
        return decoded.folded_headers

    def body_text(self) -> str:
        """The decoded, casefolded text of the body's text parts, parts separated by a line
        feed."""
        decoded = self.decoded()
        if decoded.body is None:
            self._decode_body(decoded)
        assert decoded.body is not None
        return decoded.body

    def inner_headers(self) -> str:
        """The decoded, casefolded header fields of the body's parts and attached messages
        (message/rfc822): TEXT searches them, BODY does not (as Dovecot)."""
        decoded = self.decoded()
        if decoded.inner_headers is None:
            self._decode_body(decoded)
        assert decoded.inner_headers is not None
        return decoded.inner_headers

    def _decode_body(self, decoded: _Decoded) -> None:
        content = self.content()
        pieces: list[str] = []
        headers: list[str] = []
        root = self.summary().get("body")
        if isinstance(root, dict):
            stack: list[tuple[dict[str, Any], bool]] = [(root, True)]
            while stack:
                part, top = stack.pop()
                _collect_part(content, part, top, pieces, headers, stack)
        else:  # no summary: the octets after the first blank line, as they are
            cut = content.find(b"\r\n\r\n")
            pieces.append(_decode_text(content[cut + 4 :] if cut >= 0 else b"", None))
        decoded.body = "\n".join(pieces).casefold()
        decoded.inner_headers = "\n".join(headers)  # each already casefolded

    def sent_date(self) -> datetime.date:
        """The date written in the Date field; 1 Jan 1970 without a valid one (as Dovecot:
        such a message is SENTBEFORE any date, never SENTON or SENTSINCE)."""
        parsed = _parse_date_field(self.envelope("date"))
        if parsed is not None:
            return datetime.date(parsed[0], parsed[1], parsed[2])
        return _EPOCH


def _collect_part(
    content: bytes,
    part: dict[str, Any],
    top: bool,
    pieces: list[str],
    headers: list[str],
    stack: list[tuple[dict[str, Any], bool]],
) -> None:
    if not top:
        # the header blocks of parts and attached messages: TEXT searches them, BODY not
        start, body_start = part.get("start"), part.get("body_start")
        if isinstance(start, int) and isinstance(body_start, int) and body_start > start:
            headers.append(_unfolded_text(content[start:body_start]))
    children = part.get("parts")
    if isinstance(children, list):
        stack.extend((child, False) for child in reversed(children) if isinstance(child, dict))
        return
    message = part.get("message")
    if isinstance(message, dict) and isinstance(message.get("body"), dict):
        stack.append((message["body"], False))
        return
    kind = part.get("type")
    if kind != "text" and not (top and kind in (None, "")):
        return  # attachments (images, archives, ...) are not text to search
    start, end = part.get("body_start"), part.get("end")
    if not isinstance(start, int) or not isinstance(end, int):
        return
    octets = _body_octets(content[start:end], str(part.get("encoding") or "7bit"))
    params = part.get("params")
    charset = params.get("charset") if isinstance(params, dict) else None
    pieces.append(_decode_text(octets, charset if isinstance(charset, str) else None))


_EPOCH = datetime.date(1970, 1, 1)


def _parse_date_field(value: str | None) -> tuple[int, ...] | None:
    if not value:
        return None
    try:
        parsed = email.utils.parsedate_tz(value)
    except Exception:
        return None
    if parsed is None or not 1 <= parsed[1] <= 12 or not 1 <= parsed[2] <= 31:
        return None
    try:
        datetime.date(parsed[0], parsed[1], parsed[2])
    except ValueError:
        return None
    return tuple(x if x is not None else 0 for x in parsed)


def _sent_timestamp(value: str | None) -> float | None:
    """The Date field as a UTC timestamp, or None when absent or invalid."""
    parsed = _parse_date_field(value)
    if parsed is None:
        return None
    try:
        return float(calendar.timegm((*parsed[:6], 0, 1, -1)) - (parsed[9] or 0))
    except (OverflowError, ValueError):
        return None


def _utc_date(when: float) -> datetime.date:
    try:
        return datetime.datetime.fromtimestamp(when, datetime.UTC).date()
    except (OverflowError, OSError, ValueError):
        return datetime.date(1970, 1, 1)


# ---------------------------------------------------------------------------------------------
# the search program


class _Run:
    """What every key may need during one run: the mailbox's largest numbers, `$`."""

    __slots__ = ("max_seq", "max_uid", "now", "saved")

    def __init__(self, ctx: SearchContext) -> None:
        messages = ctx.messages
        self.max_seq = len(messages)
        self.max_uid = messages[-1].uid if messages else 0
        self.saved = frozenset(ctx.saved)
        self.now = time.time()


class _Key:
    #: 0 index only, 1 summary, 2 content (headers), 3 content (decoded body)
    cost = 0

    def match(self, msg: _Message, run: _Run) -> bool:
        raise NotImplementedError


class _All(_Key):
    def match(self, msg: _Message, run: _Run) -> bool:
        return True


@dataclass
class _And(_Key):
    keys: list[_Key]

    def __post_init__(self) -> None:
        self.keys.sort(key=lambda k: k.cost)  # cheap keys first: the rest often never runs
        self.cost = max((k.cost for k in self.keys), default=0)

    def match(self, msg: _Message, run: _Run) -> bool:
        return all(key.match(msg, run) for key in self.keys)


@dataclass
class _Or(_Key):
    left: _Key
    right: _Key

    def __post_init__(self) -> None:
        if self.right.cost < self.left.cost:
            self.left, self.right = self.right, self.left
        self.cost = self.right.cost

    def match(self, msg: _Message, run: _Run) -> bool:
        return self.left.match(msg, run) or self.right.match(msg, run)


@dataclass
class _Not(_Key):
    key: _Key

    def __post_init__(self) -> None:
        self.cost = self.key.cost

    def match(self, msg: _Message, run: _Run) -> bool:
        return not self.key.match(msg, run)


@dataclass
class _Flag(_Key):
    flag: str  # casefolded
    present: bool

    def match(self, msg: _Message, run: _Run) -> bool:
        found = any(f.casefold() == self.flag for f in msg.info.flags)
        return found == self.present


@dataclass
class _Recent(_Key):
    present: bool

    def match(self, msg: _Message, run: _Run) -> bool:
        return msg.ctx.is_recent(msg.info.uid) == self.present


@dataclass
class _Numbers(_Key):
    ranges: list[tuple[int, int]]
    uid: bool
    #: for one value of "*": the ranges resolved, merged and sorted (starts, ends)
    _resolved: tuple[int, list[int], list[int]] | None = field(default=None, repr=False)

    def _intervals(self, top: int) -> tuple[list[int], list[int]]:
        if self._resolved is not None and self._resolved[0] == top:
            return self._resolved[1], self._resolved[2]
        spans = []
        for low, high in self.ranges:
            if low == SEARCHRES:
                continue
            if high == STAR:
                if top == 0:
                    continue
                if low > top and not self.uid:
                    continue  # 100:* in 42 messages: no such sequence number (as Dovecot)
                low, high = (top, top) if low == STAR else (min(low, top), max(low, top))
            spans.append((low, high))
        spans.sort()
        starts: list[int] = []
        ends: list[int] = []
        for low, high in spans:
            if ends and low <= ends[-1] + 1:
                ends[-1] = max(ends[-1], high)
            else:
                starts.append(low)
                ends.append(high)
        self._resolved = (top, starts, ends)
        return starts, ends

    def match(self, msg: _Message, run: _Run) -> bool:
        # a long set (1,3,5,...) against a big mailbox: a binary search, not a scan
        if self.ranges and self.ranges[0][0] == SEARCHRES and msg.info.uid in run.saved:
            return True
        starts, ends = self._intervals(run.max_uid if self.uid else run.max_seq)
        number = msg.info.uid if self.uid else msg.seq
        index = bisect.bisect_right(starts, number) - 1
        return index >= 0 and number <= ends[index]


@dataclass
class _Size(_Key):
    larger: bool
    size: int

    def match(self, msg: _Message, run: _Run) -> bool:
        size = msg.info.size
        return size > self.size if self.larger else size < self.size


@dataclass
class _Date(_Key):
    op: str  # "before", "on", "since"
    date: datetime.date
    sent: bool

    def __post_init__(self) -> None:
        self.cost = 1 if self.sent else 0

    def match(self, msg: _Message, run: _Run) -> bool:
        day = msg.sent_date() if self.sent else _utc_date(msg.info.internaldate)
        if self.op == "before":
            return day < self.date
        if self.op == "on":
            return day == self.date
        return day >= self.date


@dataclass
class _Age(_Key):
    younger: bool
    seconds: int

    def match(self, msg: _Message, run: _Run) -> bool:
        age = run.now - msg.info.internaldate
        return age <= self.seconds if self.younger else age > self.seconds


@dataclass
class _ModSeq(_Key):
    modseq: int

    def match(self, msg: _Message, run: _Run) -> bool:
        return msg.info.modseq >= self.modseq


@dataclass
class _Envelope(_Key):
    """FROM / TO / CC / BCC / SUBJECT: on the summary's field, decoded."""

    name: str
    needle: str

    def __post_init__(self) -> None:
        self.cost = 1

    def match(self, msg: _Message, run: _Run) -> bool:
        value = msg.envelope(self.name)
        if value is None:
            return False
        if self.needle in decode_words(value).casefold():
            return True
        # an address written with comments or folding white space inside it
        # ("<user (c)@ (c) domain.org>") matches on its addr-spec without them (as Dovecot)
        return self.name != "subject" and any(
            self.needle in address.casefold() for address in _addr_specs(value)
        )


def _addr_specs(value: str) -> list[str]:
    """The addr-specs of an address field, RFC 5322 comments and CFWS removed; [] when
    the field has none or does not parse."""
    try:
        pairs = email.utils.getaddresses([value])
    except Exception:  # a broken field searches on its raw value only
        return []
    return [address for _name, address in pairs if address]


@dataclass
class _Header(_Key):
    name: str  # lower case
    needle: str

    def __post_init__(self) -> None:
        self.cost = 2

    def match(self, msg: _Message, run: _Run) -> bool:
        return any(
            n == self.name and self.needle in decode_words(v).casefold() for n, v in msg.fields()
        )


@dataclass
class _Body(_Key):
    needle: str
    text: bool  # TEXT: the header fields too

    def __post_init__(self) -> None:
        self.cost = 3

    def match(self, msg: _Message, run: _Run) -> bool:
        if self.text and (
            self.needle in msg.folded_headers() or self.needle in msg.inner_headers()
        ):
            return True
        return self.needle in msg.body_text()


# ---------------------------------------------------------------------------------------------
# parsing


@dataclass
class SearchQuery:
    """A parsed SEARCH (also the search part of SORT and THREAD)."""

    #: "UTF-8" when not given
    charset: str = "UTF-8"
    #: ESEARCH RETURN options upper-cased (MIN MAX ALL COUNT SAVE); () = plain SEARCH
    returns: tuple[str, ...] = ()
    #: RETURN was given (or IMAP4rev2 is enabled): the answer is ESEARCH
    esearch: bool = False
    #: a MODSEQ key: responses carry (MODSEQ n), RFC 7162 §3.1.5
    uses_modseq: bool = False
    #: the keys can only be evaluated with the saved result ($)
    uses_saved: bool = False
    program: _Key = field(default_factory=_All, repr=False)


_MONTHS = {
    name: number
    for number, name in enumerate(
        ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"), 1
    )
}
_DATE = re.compile(rb"([0-9]{1,2})-([A-Za-z]{3})-([0-9]{4})")
_NUMBER = re.compile(rb"[0-9]{1,19}")
_SEQUENCE = re.compile(rb"[0-9*:,$]+")

_FLAG_KEYS = {
    b"ANSWERED": ("\\answered", True),
    b"DELETED": ("\\deleted", True),
    b"DRAFT": ("\\draft", True),
    b"FLAGGED": ("\\flagged", True),
    b"SEEN": ("\\seen", True),
    b"UNANSWERED": ("\\answered", False),
    b"UNDELETED": ("\\deleted", False),
    b"UNDRAFT": ("\\draft", False),
    b"UNFLAGGED": ("\\flagged", False),
    b"UNSEEN": ("\\seen", False),
}
_ENVELOPE_KEYS = {
    b"BCC": "bcc",
    b"CC": "cc",
    b"FROM": "from",
    b"SUBJECT": "subject",
    b"TO": "to",
}
_DATE_KEYS = {
    b"BEFORE": ("before", False),
    b"ON": ("on", False),
    b"SINCE": ("since", False),
    b"SENTBEFORE": ("before", True),
    b"SENTON": ("on", True),
    b"SENTSINCE": ("since", True),
}


class _Parser:
    def __init__(self, tokens: list[object], charset: str) -> None:
        self.tokens = tokens
        self.position = 0
        self.charset = charset
        self.uses_modseq = False
        self.uses_saved = False

    def next(self, what: str) -> object:
        if self.position >= len(self.tokens):
            raise SearchError(f"missing {what}")
        token = self.tokens[self.position]
        self.position += 1
        return token

    def atom(self, what: str) -> bytes:
        token = self.next(what)
        if type(token) is not bytes:
            raise SearchError(f"expected {what}")
        return token

    def astring(self, what: str) -> bytes:
        token = self.next(what)
        if not isinstance(token, bytes):
            raise SearchError(f"expected {what}")
        return bytes(token)

    def text(self, what: str) -> str:
        """A search string in the query's charset, casefolded (how it is compared)."""
        raw = self.astring(what)
        return raw.decode("utf-8", "replace").casefold()

    def number(self, what: str, *, nonzero: bool = False) -> int:
        token = self.next(what)
        if not isinstance(token, bytes) or not _NUMBER.fullmatch(token):
            raise SearchError(f"expected a number for {what}")
        value = int(token)
        if nonzero and value == 0:
            raise SearchError(f"{what} must not be 0")
        return value

    def date(self, what: str) -> datetime.date:
        token = self.next(what)
        match = _DATE.fullmatch(token) if isinstance(token, bytes) else None
        month = _MONTHS.get(match.group(2).decode().upper()) if match else None
        if match is None or month is None:
            raise SearchError(f"expected a date (d-Mon-yyyy) for {what}")
        try:
            return datetime.date(int(match.group(3)), month, int(match.group(1)))
        except ValueError:
            raise SearchError(f"invalid date for {what}") from None

    def sequence(self, token: bytes) -> list[tuple[int, int]]:
        try:
            ranges = parse_sequence_set(token)
        except ValueError:
            raise SearchError("invalid sequence set") from None
        if any(low == SEARCHRES for low, _ in ranges):
            self.uses_saved = True
        return ranges

    def keys(self, tokens: list[object], depth: int) -> _Key:
        """All of *tokens* as one AND."""
        saved, saved_position = self.tokens, self.position
        self.tokens, self.position = tokens, 0
        try:
            found = []
            while self.position < len(self.tokens):
                found.append(self.key(depth))
        finally:
            self.tokens, self.position = saved, saved_position
        if not found:
            raise SearchError("missing search key")
        return found[0] if len(found) == 1 else _And(found)

    def key(self, depth: int) -> _Key:
        if depth > MAX_DEPTH:
            raise SearchError("search keys nested too deeply")
        token = self.next("search key")
        if isinstance(token, list):
            return self.keys(token, depth + 1)
        if type(token) is not bytes:
            raise SearchError("expected a search key")
        name = token.upper()
        if name == b"ALL":
            return _All()
        flag = _FLAG_KEYS.get(name)
        if flag is not None:
            return _Flag(*flag)
        envelope = _ENVELOPE_KEYS.get(name)
        if envelope is not None:
            return _Envelope(envelope, self.text(name.decode()))
        dated = _DATE_KEYS.get(name)
        if dated is not None:
            return _Date(dated[0], self.date(name.decode()), dated[1])
        if name in (b"BODY", b"TEXT"):
            return _Body(self.text(name.decode()), name == b"TEXT")
        if name == b"HEADER":
            field_name = self.astring("header field name")
            if not field_name or not _FIELD_NAME.fullmatch(field_name + b":"):
                raise SearchError("invalid header field name")
            return _Header(field_name.decode("ascii").lower(), self.text("HEADER string"))
        if name in (b"KEYWORD", b"UNKEYWORD"):
            keyword = self.atom(name.decode())
            return _Flag(keyword.decode("utf-8", "replace").casefold(), name == b"KEYWORD")
        if name in (b"LARGER", b"SMALLER"):
            return _Size(name == b"LARGER", self.number(name.decode()))
        if name in (b"YOUNGER", b"OLDER"):
            return _Age(name == b"YOUNGER", self.number(name.decode(), nonzero=True))
        if name == b"NOT":
            return _Not(self.key(depth + 1))
        if name == b"OR":
            return _Or(self.key(depth + 1), self.key(depth + 1))
        if name == b"UID":
            return _Numbers(self.sequence(self.atom("UID sequence set")), uid=True)
        if name == b"RECENT":
            return _Recent(True)
        if name == b"NEW":  # RFC 3501: RECENT UNSEEN
            return _And([_Recent(True), _Flag("\\seen", False)])
        if name == b"OLD":
            return _Recent(False)
        if name == b"MODSEQ":
            return self.modseq()
        if _SEQUENCE.fullmatch(token):
            return _Numbers(self.sequence(token), uid=False)
        raise SearchError(f"unknown search key {token.decode('ascii', 'replace')}")

    def modseq(self) -> _Key:
        # MODSEQ [entry-name entry-type-req] mod-sequence-valzer (RFC 7162 §3.1.5); flags
        # have no modseq of their own here: the message's is used for every entry
        if self.position < len(self.tokens) and isinstance(self.tokens[self.position], String):
            self.position += 1
            kind = self.atom("MODSEQ entry type").lower()
            if kind not in (b"priv", b"shared", b"all"):
                raise SearchError("MODSEQ entry type must be priv, shared or all")
        self.uses_modseq = True
        return _ModSeq(self.number("MODSEQ value"))


_RETURN_OPTIONS = ("MIN", "MAX", "ALL", "COUNT", "SAVE")


def _charset(token: object) -> str:
    if not isinstance(token, bytes):
        raise SearchError("expected a charset name")
    name = token.decode("ascii", "replace").upper()
    if name in ("UTF8", "UTF-8"):
        return "UTF-8"
    if name in ("US-ASCII", "ASCII"):
        return "US-ASCII"
    raise SearchError(
        f"charset {name} is not supported", code="BADCHARSET (" + " ".join(CHARSETS) + ")"
    )


def _option_name(token: object) -> str:
    """An atom naming an option (a RETURN option, a THREAD algorithm) in upper case; "" for
    a list. Decoded as latin-1: any octet decodes, and a non-ASCII name is simply unknown."""
    return token.upper().decode("latin-1") if type(token) is bytes else ""


def parse_search(args: list[object], *, rev2: bool) -> SearchQuery:
    """The arguments after SEARCH (or UID SEARCH): ``[RETURN (options)] [CHARSET name]
    keys``. Raises SearchError (bad: syntax; BADCHARSET: unknown charset)."""
    tokens = list(args)
    position = 0
    returns: tuple[str, ...] = ()
    esearch = rev2
    if len(tokens) > position and _is_atom(tokens[position], b"RETURN"):
        options = tokens[position + 1] if len(tokens) > position + 1 else None
        if not isinstance(options, list):
            raise SearchError("RETURN needs a list of options")
        names = []
        for option in options:
            name = _option_name(option)
            if name not in _RETURN_OPTIONS:
                raise SearchError("unknown RETURN option")
            if name not in names:
                names.append(name)
        returns = tuple(names) or ("ALL",)  # RETURN () means ALL (RFC 4731 §3.1)
        esearch = True
        position += 2
    charset = "UTF-8"
    if len(tokens) > position and _is_atom(tokens[position], b"CHARSET"):
        if len(tokens) <= position + 1:
            raise SearchError("CHARSET needs a name")
        charset = _charset(tokens[position + 1])
        position += 2
    parser = _Parser([], charset)
    program = parser.keys(tokens[position:], 0)
    return SearchQuery(
        charset=charset,
        returns=returns,
        esearch=esearch,
        uses_modseq=parser.uses_modseq,
        uses_saved=parser.uses_saved,
        program=program,
    )


def _is_atom(token: object, name: bytes) -> bool:
    return type(token) is bytes and token.upper() == name


# ---------------------------------------------------------------------------------------------
# evaluation and responses


def _matching(query: SearchQuery, ctx: SearchContext) -> list[_Message]:
    run = _Run(ctx)
    program = query.program
    cache: dict[bytes, _Decoded] = {}
    found = []
    for index, info in enumerate(ctx.messages):
        msg = _Message(index + 1, info, ctx, cache)
        if program.match(msg, run):
            found.append(msg)
    return found


def run_search(query: SearchQuery, ctx: SearchContext) -> list[int]:
    """The sequence numbers of the messages that match, ascending."""
    return [msg.seq for msg in _matching(query, ctx)]


def sequence_set(numbers: Iterable[int]) -> bytes:
    """The numbers as an IMAP sequence set, ranges joined: ``[1, 2, 3, 5]`` -> ``b"1:3,5"``
    (sorted, duplicates dropped); b"" for none."""
    ordered = sorted(set(numbers))
    out: list[str] = []
    index = 0
    while index < len(ordered):
        start = end = ordered[index]
        index += 1
        while index < len(ordered) and ordered[index] == end + 1:
            end = ordered[index]
            index += 1
        out.append(str(start) if start == end else f"{start}:{end}")
    return ",".join(out).encode()


def _effective_returns(query: SearchQuery) -> tuple[str, ...]:
    return query.returns or ("ALL",)


def saved_uids(query: SearchQuery, seqs: list[int], ctx: SearchContext) -> list[int] | None:
    """The UIDs the session saves as ``$`` after this search (RFC 5182), or None when the
    query has no RETURN SAVE. With MIN and/or MAX and neither ALL nor COUNT only those are
    saved (RFC 5182 §2.4)."""
    returns = query.returns
    if "SAVE" not in returns:
        return None
    uids = [ctx.messages[seq - 1].uid for seq in seqs]
    if (
        uids
        and ("MIN" in returns or "MAX" in returns)
        and not ("ALL" in returns or "COUNT" in returns)
    ):
        chosen = []
        if "MIN" in returns:
            chosen.append(min(uids))
        if "MAX" in returns and max(uids) not in chosen:
            chosen.append(max(uids))
        return sorted(chosen)
    return uids


def search_response(
    query: SearchQuery, seqs: list[int], ctx: SearchContext, *, uid: bool, tag: bytes
) -> bytes:
    """``* SEARCH 2 5\\r\\n`` (rev1, no RETURN) or ``* ESEARCH (TAG "a1") UID COUNT 2 ALL
    3:5\\r\\n``; with (MODSEQ n) when the query used MODSEQ and something matched; UIDs when
    *uid*. b"" when SAVE is the only RETURN option (RFC 5182: no ESEARCH then)."""
    messages = ctx.messages
    numbers = [messages[seq - 1].uid for seq in seqs] if uid else list(seqs)
    if not query.esearch:
        text = b"* SEARCH" + b"".join(b" %d" % n for n in numbers)
        if query.uses_modseq and seqs:
            text += b" (MODSEQ %d)" % max(messages[seq - 1].modseq for seq in seqs)
        return text + b"\r\n"
    returns = _effective_returns(query)
    if returns == ("SAVE",):
        return b""
    out = [b'* ESEARCH (TAG "' + tag + b'")']
    if uid:
        out.append(b" UID")
    modseq_of: list[int] = []
    if numbers:
        low, high = min(numbers), max(numbers)
        if "MIN" in returns:
            out.append(b" MIN %d" % low)
        if "MAX" in returns:
            out.append(b" MAX %d" % high)
        if "ALL" in returns:
            out.append(b" ALL " + sequence_set(numbers))
        if "ALL" in returns or "COUNT" in returns:
            modseq_of = list(seqs)
        else:  # MIN / MAX only: the mod-sequence of the messages returned (RFC 4731 §3.2)
            wanted = {low if "MIN" in returns else None, high if "MAX" in returns else None}
            modseq_of = [s for s, n in zip(seqs, numbers, strict=True) if n in wanted]
    if "COUNT" in returns:
        out.append(b" COUNT %d" % len(numbers))
    if query.uses_modseq and modseq_of:
        out.append(b" MODSEQ %d" % max(messages[seq - 1].modseq for seq in modseq_of))
    return b"".join(out) + b"\r\n"


# ---------------------------------------------------------------------------------------------
# base subject (RFC 5256 §2.1)


_WSP_RUN = re.compile(r"[ \t\r\n]+")
_TRAILER = re.compile(r"(?:\(fwd\)|[ \t])+$", re.IGNORECASE)
_BLOB = r"\[[^\[\]]*\][ \t]*"
_LEADER = re.compile(r"(?:[ \t]+|(?:" + _BLOB + r")*(?:re|fwd?)[ \t]*(?:" + _BLOB + r")?:)", re.I)
_BLOB_RE = re.compile(_BLOB)


def base_subject(subject: str | None) -> tuple[str, bool]:
    """The RFC 5256 base subject of a Subject value (encoded words decoded, upper-cased for
    comparison: i;ascii-casemap and beyond), and whether the subject was a reply or forward
    (a ``Re:``/``Fwd:`` leader, a ``(fwd)`` trailer or a ``[fwd: ...]`` wrapper removed)."""
    text = _WSP_RUN.sub(" ", decode_words(subject or ""))
    reply = False
    while True:
        # (2) trailers
        trimmed = _TRAILER.sub("", text)
        if trimmed != text and "(fwd)" in text[len(trimmed) :].lower():
            reply = True
        text = trimmed
        # (3)-(5) leaders and blobs
        while True:
            before = text
            while True:
                match = _LEADER.match(text)
                if match is None or not match.group(0):
                    break
                if match.group(0).strip(" \t"):
                    reply = True
                text = text[match.end() :]
            match = _BLOB_RE.match(text)
            if match is not None and text[match.end() :]:
                text = text[match.end() :]
            if text == before:
                break
        # (6) [fwd: ...]
        if text[:5].lower() == "[fwd:" and text.endswith("]"):
            text = text[5:-1]
            reply = True
            continue
        break
    return text.upper(), reply


# ---------------------------------------------------------------------------------------------
# SORT (RFC 5256, RFC 5957)


@dataclass
class SortQuery:
    """A parsed SORT: criteria as (key, reverse), in order, and the search."""

    criteria: list[tuple[str, bool]]
    search: SearchQuery


def _criteria(token: object) -> list[tuple[str, bool]]:
    if not isinstance(token, list) or not token:
        raise SearchError("SORT needs a list of sort criteria")
    criteria: list[tuple[str, bool]] = []
    reverse = False
    for item in token:
        if type(item) is not bytes:
            raise SearchError("invalid sort criterion")
        name = item.upper().decode("ascii", "replace")
        if name == "REVERSE":
            if reverse:
                raise SearchError("REVERSE REVERSE")
            reverse = True
            continue
        if name not in SORT_KEYS:
            raise SearchError(f"unknown sort criterion {name}")
        criteria.append((name, reverse))
        reverse = False
    if reverse or not criteria:
        raise SearchError("REVERSE must precede a sort criterion")
    return criteria


def parse_sort(args: list[object], *, rev2: bool = False) -> SortQuery:
    """The arguments after SORT: ``(criteria) charset keys`` (the charset is required).
    Raises SearchError as :func:`parse_search` does."""
    if len(args) < 3:
        raise SearchError("SORT needs criteria, a charset and search keys")
    criteria = _criteria(args[0])
    charset = _charset(args[1])
    search = parse_search([b"CHARSET", args[1], *args[2:]], rev2=False)
    search.charset = charset
    return SortQuery(criteria, search)


_QUOTED_OR_COMMENT = re.compile(r'"(?:[^"\\]|\\.)*"|\([^()]*\)')


def _first_address(value: str | None) -> tuple[str, str]:
    """(display name decoded, addr-spec) of the first address in an address field; a
    group (``undisclosed-recipients:;``) is its name with no addr-spec, as ENVELOPE's group
    start (RFC 3501 §7.4.2) that SORT reads."""
    if not value:
        return "", ""
    plain = _QUOTED_OR_COMMENT.sub("", value)
    colon = plain.find(":")
    if colon > 0 and not any(c in plain[:colon] for c in "<@,"):
        return "", plain[:colon].strip()
    try:
        pairs = email.utils.getaddresses([value])
    except Exception:
        return "", ""
    for name, address in pairs:
        if name or address:
            return decode_words(name), address
    return "", ""


def _collate(text: str) -> str:
    """A sort key close to i;unicode-casemap (RFC 5051): upper case, then decomposed, so
    that "É" sorts with "E"."""
    return unicodedata.normalize("NFKD", text.upper()) if not text.isascii() else text.upper()


def _sort_key(name: str, msg: _Message) -> Any:
    info = msg.info
    if name == "ARRIVAL":
        return info.internaldate
    if name == "SIZE":
        return info.size
    if name == "DATE":
        sent = _sent_timestamp(msg.envelope("date"))
        return info.internaldate if sent is None else sent
    if name == "SUBJECT":
        return _collate(base_subject(msg.envelope("subject"))[0])
    if name in ("FROM", "TO", "CC"):
        # RFC 5256: the addr-mailbox (local part) of the first address
        address = _first_address(msg.envelope(name.lower()))[1]
        return _collate(address.rpartition("@")[0] if "@" in address else address)
    # DISPLAY (RFC 5957): the first From's display name, else its addr-spec
    display, address = _first_address(msg.envelope("from"))
    return _collate(display.strip() or address)


class _Reversed:
    """Inverts the order of a sort key (REVERSE)."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __lt__(self, other: _Reversed) -> bool:
        return bool(other.value < self.value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Reversed) and bool(self.value == other.value)

    __hash__ = None  # type: ignore[assignment]


def run_sort(query: SortQuery, ctx: SearchContext) -> list[int]:
    """The matching sequence numbers in the requested order (ties by sequence number)."""
    found = _matching(query.search, ctx)

    def order(msg: _Message) -> tuple[Any, ...]:
        keys: list[Any] = []
        for name, reverse in query.criteria:
            value = _sort_key(name, msg)
            keys.append(_Reversed(value) if reverse else value)
        keys.append(msg.seq)
        return tuple(keys)

    found.sort(key=order)
    return [msg.seq for msg in found]


def sort_response(query: SortQuery, seqs: list[int], ctx: SearchContext, *, uid: bool) -> bytes:
    """``* SORT 3 1 2\\r\\n`` (UIDs when *uid*), with ``(MODSEQ n)`` after a MODSEQ key."""
    messages = ctx.messages
    numbers = [messages[seq - 1].uid for seq in seqs] if uid else seqs
    text = b"* SORT" + b"".join(b" %d" % n for n in numbers)
    if query.search.uses_modseq and seqs:
        text += b" (MODSEQ %d)" % max(messages[seq - 1].modseq for seq in seqs)
    return text + b"\r\n"


# ---------------------------------------------------------------------------------------------
# THREAD (RFC 5256 §3)


@dataclass
class ThreadQuery:
    """A parsed THREAD: the algorithm (ORDEREDSUBJECT or REFERENCES) and the search."""

    algorithm: str
    search: SearchQuery


def parse_thread(args: list[object], *, rev2: bool = False) -> ThreadQuery:
    """The arguments after THREAD: ``algorithm charset keys``. Raises SearchError."""
    if len(args) < 3:
        raise SearchError("THREAD needs an algorithm, a charset and search keys")
    algorithm = args[0]
    name = _option_name(algorithm)
    if name not in THREAD_ALGORITHMS:
        raise SearchError("unknown THREAD algorithm")
    charset = _charset(args[1])
    search = parse_search([b"CHARSET", args[1], *args[2:]], rev2=False)
    search.charset = charset
    return ThreadQuery(name, search)


class _Node:
    """A thread container: a message (None for a dummy) and its children."""

    __slots__ = ("children", "id", "msg", "parent")

    def __init__(self, msg: _Message | None = None, ident: str = "") -> None:
        self.msg = msg
        self.id = ident
        self.parent: _Node | None = None
        self.children: list[_Node] = []

    def is_ancestor_of(self, other: _Node) -> bool:
        node: _Node | None = other
        while node is not None:
            if node is self:
                return True
            node = node.parent
        return False


def _unlink(node: _Node) -> None:
    if node.parent is not None:
        node.parent.children.remove(node)
        node.parent = None


def _link(parent: _Node, child: _Node) -> None:
    _unlink(child)
    child.parent = parent
    parent.children.append(child)


_MSG_ID = re.compile(r"<[^<>\s]*>")


def _date_key(msg: _Message) -> tuple[float, int]:
    sent = _sent_timestamp(msg.envelope("date"))
    return (msg.info.internaldate if sent is None else sent, msg.seq)


def _thread_orderedsubject(found: list[_Message]) -> list[_Node]:
    groups: dict[str, list[_Message]] = {}
    for msg in found:
        groups.setdefault(base_subject(msg.envelope("subject"))[0], []).append(msg)
    roots = []
    for members in groups.values():
        members.sort(key=_date_key)
        root = _Node(members[0])
        for other in members[1:]:
            _link(root, _Node(other))
        roots.append(root)
    roots.sort(key=lambda node: _date_key(node.msg) if node.msg else (0.0, 0))
    return roots


def _header_ids(msg: _Message, name: str) -> list[str]:
    for field_name, value in msg.fields():
        if field_name == name:
            return _MSG_ID.findall(value)
    return []


def _thread_references(found: list[_Message]) -> list[_Node]:
    table: dict[str, _Node] = {}
    order: list[_Node] = []  # every container, in creation order (the root set's order)

    def container(ident: str) -> _Node:
        node = table.get(ident)
        if node is None:
            node = table[ident] = _Node(None, ident)
            order.append(node)
        return node

    for msg in found:
        own = _MSG_ID.findall(msg.envelope("message-id") or "")
        ident = own[0].casefold() if own else ""
        references = [r.casefold() for r in _header_ids(msg, "references")]
        if not references:
            references = [r.casefold() for r in _header_ids(msg, "in-reply-to")[:1]]
        # (1A) link the references, each the parent of the next, never making a loop
        previous: _Node | None = None
        for ref in references:
            node = container(ref)
            if (
                previous is not None
                and node.parent is None
                and node is not previous
                and not node.is_ancestor_of(previous)
            ):
                _link(previous, node)
            previous = node
        # (1B) this message's container (a duplicate or missing Message-ID gets its own)
        existing = table.get(ident) if ident else None
        if existing is None or existing.msg is not None:
            ident = ident if ident and ident not in table else f"\0{msg.seq}"
            existing = container(ident)
        node = existing
        node.msg = msg
        # (1C) its parent is the last reference, unless that makes a loop
        _unlink(node)
        if previous is not None and previous is not node and not node.is_ancestor_of(previous):
            _link(previous, node)
    # (2) the root set
    roots = [node for node in order if node.parent is None]
    # (4) prune dummies, from the leaves up
    roots = _prune(roots)
    # (5) gather threads by base subject
    roots = _gather_subjects(roots)
    return roots


def _prune(roots: list[_Node]) -> list[_Node]:
    """(4) Empty dummies dropped; a dummy's children promoted to its level (to the root
    level only when it has a single child). Bottom-up without recursion."""
    order: list[_Node] = []
    stack = list(roots)
    while stack:  # parents before children; walked backwards below: children first
        node = stack.pop()
        order.append(node)
        stack.extend(node.children)
    for node in reversed(order):
        node.children = _pruned(node.children, top=False)
        for child in node.children:
            child.parent = node
    kept = _pruned(roots, top=True)
    for node in kept:
        node.parent = None
    return kept


def _pruned(nodes: list[_Node], *, top: bool) -> list[_Node]:
    kept: list[_Node] = []
    for node in nodes:
        if node.msg is None:
            if not node.children:
                continue  # (4A) an empty dummy is dropped
            if not top or len(node.children) == 1:
                kept.extend(node.children)  # (4B) its children take its place
                continue
        kept.append(node)
    return kept


def _subject_of(node: _Node) -> tuple[str, bool]:
    target = node if node.msg is not None else (node.children[0] if node.children else node)
    if target.msg is None:
        return "", False
    return base_subject(target.msg.envelope("subject"))


def _gather_subjects(roots: list[_Node]) -> list[_Node]:
    """(5) Threads whose roots share a base subject are joined."""
    table: dict[str, _Node] = {}
    for node in roots:
        subject, _ = _subject_of(node)
        if not subject:
            continue
        old = table.get(subject)
        # the table keeps a dummy over a message, and an original over a reply
        if old is None or (
            old.msg is not None
            and (node.msg is None or (_subject_of(old)[1] and not _subject_of(node)[1]))
        ):
            table[subject] = node
    result: list[_Node | None] = list(roots)
    where = {id(node): index for index, node in enumerate(roots)}
    for node in roots:
        if node.parent is not None:
            continue  # already merged into another thread
        subject, reply = _subject_of(node)
        current = table.get(subject) if subject else None
        if current is None or current is node:
            continue
        if current.msg is None and node.msg is None:
            for child in node.children:
                child.parent = current
            current.children.extend(node.children)
            node.children = []
        elif current.msg is None or (reply and not _subject_of(current)[1]):
            node.parent = current
            current.children.append(node)
        else:
            dummy = _Node(None)
            index = where[id(current)]
            result[index] = dummy
            where[id(dummy)] = index
            for child in (current, node):
                child.parent = dummy
                dummy.children.append(child)
            table[subject] = dummy
        result[where[id(node)]] = None
    return [node for node in result if node is not None]


def _sort_tree(roots: list[_Node]) -> list[_Node]:
    """(6) Siblings sorted by sent date, children before their parents' level (a dummy
    sorts by its first child)."""

    def key(node: _Node) -> tuple[float, int]:
        while node.msg is None and node.children:
            node = node.children[0]
        return _date_key(node.msg) if node.msg is not None else (0.0, 0)

    # post-order without recursion: a deep thread must not exhaust the stack
    stack: list[tuple[_Node, bool]] = [(root, False) for root in roots]
    while stack:
        node, done = stack.pop()
        if done:
            node.children.sort(key=key)
            continue
        stack.append((node, True))
        stack.extend((child, False) for child in node.children)
    return sorted(roots, key=key)


def _format_threads(roots: list[_Node], number: Callable[[_Message], int]) -> bytes:
    out: list[str] = []
    stack: list[_Node | str] = []
    for root in reversed(roots):
        stack.extend((")", root, "("))
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            out.append(item)
            continue
        node: _Node = item
        while True:  # a chain of only children is written flat: "1 2 3"
            text = str(number(node.msg)) if node.msg is not None else ""
            out.append(text)
            if len(node.children) == 1:
                if text:
                    out.append(" ")
                node = node.children[0]
                continue
            if node.children:
                if text:
                    out.append(" ")
                for child in reversed(node.children):
                    stack.extend((")", child, "("))
            break
    return "".join(out).encode()


def run_thread(query: ThreadQuery, ctx: SearchContext, *, uid: bool) -> bytes:
    """The THREAD response: ``* THREAD (2)(3 6 (4 23)(44 7 96))\\r\\n`` (UIDs when *uid*),
    ``* THREAD\\r\\n`` when nothing matched."""
    found = _matching(query.search, ctx)
    if query.algorithm == "ORDEREDSUBJECT":
        roots = _thread_orderedsubject(found)
    else:
        roots = _thread_references(found)
    roots = _sort_tree(roots)
    messages = ctx.messages
    if uid:
        text = _format_threads(roots, lambda msg: messages[msg.seq - 1].uid)
    else:
        text = _format_threads(roots, lambda msg: msg.seq)
    return b"* THREAD" + (b" " + text if text else b"") + b"\r\n"
