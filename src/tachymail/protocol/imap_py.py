"""Pure-Python twin of the IMAP command tokenizer kernel (``ext/imap.pyx``).

Same API, results and events for every input and every way of cutting it into chunks; the API
is documented in ``tachymail/protocol/imap.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

from tachymail.protocol.imap_types import (
    SEARCHRES,
    STAR,
    Bad,
    Binary,
    Command,
    Continuation,
    FetchAtt,
    Section,
    String,
    TooLarge,
)

__all__ = [
    "SEARCHRES",
    "STAR",
    "Bad",
    "Binary",
    "Command",
    "CommandReader",
    "Continuation",
    "FetchAtt",
    "Section",
    "String",
    "TooLarge",
    "fetch_flags_line",
    "fetch_flags_lines",
    "fetch_item_lines",
    "parse_fetch_items",
    "parse_sequence_set",
    "quote",
]

# RFC 9051 §9: ATOM-CHAR is any CHAR except atom-specials; ASTRING-CHAR adds "]"; a tag is any
# ASTRING-CHAR but "+".  Atoms here also take list-wildcards, "\" and "]" (sequence sets,
# flags, LIST patterns and mailbox names are all read as atoms; the command decides).
_ATOM_SPECIALS = b'(){ %*"\\]'
ATOM_CHAR = frozenset(c for c in range(0x21, 0x7F) if c not in _ATOM_SPECIALS)
TAG_CHAR = frozenset((ATOM_CHAR | {0x5D}) - {0x2B})
TOKEN_CHAR = frozenset(c for c in range(0x21, 0x7F) if c not in b'(){"')
SECTION_NAMES = frozenset((b"BODY", b"BODY.PEEK", b"BINARY", b"BINARY.PEEK", b"BINARY.SIZE"))
NUMBER64_DIGITS = 19  # number64 is at most 2^63 - 1
NUMBER_MAX = 0xFFFFFFFF  # number and nz-number are 32-bit unsigned

# reader modes
_LINE, _LITERAL, _SKIP_LITERAL, _SKIP_LINE = range(4)


class _Fail(Exception):
    """A reason the command being tokenized is bad (turned into a Bad event)."""


class CommandReader:
    """Incremental IMAP command reader; see the facade's docstring."""

    def __init__(self, max_line: int = 8192, max_literal: int = 64 * 1024 * 1024) -> None:
        if max_line < 1 or max_literal < 0:
            raise ValueError("max_line must be at least 1 and max_literal at least 0")
        self._max_line = max_line
        self._max_literal = max_literal
        self._buf = bytearray()
        self._mode = _LINE
        self._remaining = 0  # literal octets still to read (or skip)
        self._binary = False  # the literal being read is a literal8
        self._reset()

    def _reset(self) -> None:
        self._started = False  # the tag and name of the current command are read
        self._discarding = False  # dropping the rest of a bad command (its {n+} literals too)
        self._tag: bytes | None = None
        self._name = b""
        self._stack: list[list[object]] = [[]]
        self._sections: list[bytes | None] = [None]  # per frame: section name or None
        self._text_used = 0
        self._literal_used = 0
        self._after_literal = False

    @property
    def max_line(self) -> int:
        return self._max_line

    @property
    def max_literal(self) -> int:
        return self._max_literal

    @property
    def pending(self) -> int:
        """Octets buffered and not yet consumed."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Append a chunk; octets the reader is skipping are dropped at once."""
        if self._mode == _SKIP_LITERAL and not self._buf:
            view = memoryview(data).cast("B")
            take = min(len(view), self._remaining)
            self._remaining -= take
            if not self._remaining:
                self._mode = _LINE
            self._buf += view[take:]
            return
        if self._mode == _SKIP_LINE and not self._buf:
            view = memoryview(data).cast("B")
            lf = bytes(view).find(b"\n")
            if lf < 0:
                return
            self._mode = _LINE
            self._buf += view[lf + 1 :]
            return
        self._buf += data

    def next(self) -> Command | Continuation | Bad | TooLarge | None:
        """The next command or event, or None until more octets are fed."""
        buf = self._buf
        while True:
            mode = self._mode
            if mode == _SKIP_LINE:
                lf = buf.find(b"\n")
                if lf < 0:
                    buf.clear()
                    return None
                del buf[: lf + 1]
                self._mode = _LINE
                self._reset()
                continue
            if mode == _SKIP_LITERAL:
                take = min(len(buf), self._remaining)
                del buf[:take]
                self._remaining -= take
                if self._remaining:
                    return None
                self._mode = _LINE
                continue
            if mode == _LITERAL:
                size = self._remaining
                if len(buf) < size:
                    return None
                value = bytes(buf[:size])
                del buf[:size]
                self._stack[-1].append(Binary(value) if self._binary else String(value))
                self._mode = _LINE
                self._after_literal = True
                continue
            lf = buf.find(b"\n")
            room = self._max_line - self._text_used
            if lf < 0 and len(buf) < room:
                return None
            if lf < 0 or lf + 1 > room:
                bad = self._too_long(room)
                if bad is None:
                    continue
                return bad
            end = lf - 1 if lf and buf[lf - 1] == 0x0D else lf
            segment = bytes(buf[:end])
            del buf[: lf + 1]
            self._text_used += lf + 1
            if self._discarding:
                self._discard_segment(segment)
                continue
            item = self._segment(segment)
            if item is not None:
                return item

    def next_line(self) -> bytes | Bad | None:
        """The next line as sent, without its line end, or None until one is complete: the
        answer to IDLE (``DONE``) and to AUTHENTICATE's challenges.  Only between commands."""
        if self._mode != _LINE or self._started or self._discarding:
            raise RuntimeError("next_line() in the middle of a command")
        buf = self._buf
        lf = buf.find(b"\n")
        if lf < 0 and len(buf) < self._max_line:
            return None
        if lf < 0 or lf + 1 > self._max_line:
            bad = self._too_long(self._max_line)
            assert bad is not None
            return Bad(None, bad.reason)
        end = lf - 1 if lf and buf[lf - 1] == 0x0D else lf
        line = bytes(buf[:end])
        del buf[: lf + 1]
        return line

    def _too_long(self, room: int) -> Bad | None:
        """The command's text passed max_line: drop it up to the end of this line.  No second
        event for a command already answered (one being discarded)."""
        bad = None
        if not self._discarding:
            tag = self._tag if self._started else _guess_tag(bytes(self._buf[:room]))
            bad = Bad(tag, "command line too long")
        self._reset()
        buf = self._buf
        lf = buf.find(b"\n")
        if lf < 0:
            buf.clear()
            self._mode = _SKIP_LINE
        else:
            del buf[: lf + 1]
        return bad

    def _discard_segment(self, segment: bytes) -> None:
        """Rest of a bad command: skip the octets of a {n+} ending it, else it is over."""
        size = _nonsync_literal_at_end(segment)
        if size < 0:
            self._reset()
            return
        self._remaining = size
        self._mode = _SKIP_LITERAL

    def _fail(self, reason: str, segment: bytes) -> Bad:
        bad = Bad(self._tag, reason)
        self._reset()
        self._discard_segment(segment)
        if self._mode != _LINE:
            self._discarding = True
        return bad

    def _segment(self, s: bytes) -> Command | Continuation | Bad | TooLarge | None:
        """Tokenize one line of the command (up to its end or to a literal announcement)."""
        i = 0
        n = len(s)
        if not self._started:
            i = s.find(b" ")
            if i < 0:
                i = n
            tag = s[:i]
            if not tag or any(c not in TAG_CHAR for c in tag):
                return self._fail("invalid tag" if tag else "empty command line", s)
            self._tag = tag
            i, name = _command_name(s, i + 1)
            if not name:
                return self._fail("missing command name", s)
            if i < n and s[i] != 0x20:
                return self._fail("invalid command name", s)
            name = name.upper()
            if name == b"UID":
                i, second = _command_name(s, i + 1)
                if not second:
                    return self._fail("missing command after UID", s)
                name = b"UID " + second.upper()
            self._name = name
            self._started = True
            if i < n and s[i] != 0x20:
                return self._fail("invalid command name", s)
        elif self._after_literal:
            self._after_literal = False
            if (
                i < n
                and s[i] != 0x20
                and s[i] != 0x29
                and not (s[i] == 0x5D and self._sections[-1])
            ):
                return self._fail("no space after literal", s)
        try:
            literal = self._tokens(s, i)
        except _Fail as exc:
            return self._fail(str(exc), s)
        if literal is None:
            if len(self._stack) > 1:
                return self._fail(
                    "unterminated section" if self._sections[-1] else "unbalanced parenthesis", s
                )
            command = Command(self._tag or b"", self._name, self._stack[0])
            self._reset()
            return command
        size, sync, binary = literal
        owner = self._tag
        if size > self._max_literal - self._literal_used:
            self._reset()
            if not sync:
                self._remaining = size
                self._mode = _SKIP_LITERAL
                self._discarding = True
            return TooLarge(owner, size, sync)
        self._literal_used += size
        self._remaining = size
        self._binary = binary
        self._mode = _LITERAL
        return Continuation(owner or b"", size) if sync else None

    def _tokens(self, s: bytes, i: int) -> tuple[int, bool, bool] | None:
        """Tokens of s from i into the open frames; (size, sync, binary) when s ends with a
        literal announcement, None at the end of the line.  Raises _Fail."""
        n = len(s)
        stack, sections = self._stack, self._sections
        while True:
            while i < n and s[i] == 0x20:
                i += 1
            if i >= n:
                return None
            c = s[i]
            if c == 0x28:  # (
                stack.append([])
                sections.append(None)
                i += 1
                continue
            if c == 0x29:  # )
                if len(stack) == 1 or sections[-1] is not None:
                    raise _Fail("unexpected )")
                done = stack.pop()
                sections.pop()
                stack[-1].append(done)
                i += 1
            elif c == 0x5D and sections[-1] is not None:  # ] closing a section
                spec = stack.pop()
                section_name = sections.pop()
                assert section_name is not None
                i += 1
                partial = None
                if i < n and s[i] == 0x3C:  # <
                    i, partial = _partial(s, i + 1)
                stack[-1].append(Section(section_name, spec, partial))
            elif c == 0x22:  # "
                i, value = _quoted(s, i + 1)
                stack[-1].append(String(value))
            elif c == 0x7B or (c == 0x7E and i + 1 < n and s[i + 1] == 0x7B):  # { or ~{
                return _literal_spec(s, i + 1 if c == 0x7B else i + 2, c == 0x7E)
            elif c in TOKEN_CHAR:
                start = i
                in_section = sections[-1] is not None
                while i < n:
                    c = s[i]
                    if c not in TOKEN_CHAR or (c == 0x5D and in_section):
                        break
                    if c == 0x5B and not in_section and s[start:i].upper() in SECTION_NAMES:
                        break
                    i += 1
                if i < n and s[i] == 0x5B and not in_section:
                    stack.append([])
                    sections.append(s[start:i].upper())
                    i += 1
                    continue
                stack[-1].append(s[start:i])
            else:
                raise _Fail("invalid character")
            # After a token: a space, a closing bracket, or the end of the line.
            if i < n:
                c = s[i]
                if not (c == 0x20 or c == 0x29 or (c == 0x5D and sections[-1] is not None)):
                    raise _Fail("missing space between arguments")


def _guess_tag(head: bytes) -> bytes | None:
    """The tag of a line of which only head is known, if head shows a valid one."""
    space = head.find(b" ")
    if space <= 0:
        return None
    tag = head[:space]
    return tag if all(c in TAG_CHAR for c in tag) else None


def _command_name(s: bytes, i: int) -> tuple[int, bytes]:
    """(end, atom) of the atom at s[i:]; an empty atom when there is none."""
    start = i
    n = len(s)
    while i < n and s[i] in ATOM_CHAR:
        i += 1
    return i, s[start:i]


def _quoted(s: bytes, i: int) -> tuple[int, bytes]:
    """(index after the closing quote, value) of the quoted string whose text starts at i."""
    out = bytearray()
    n = len(s)
    while i < n:
        c = s[i]
        if c == 0x22:
            return i + 1, bytes(out)
        if c == 0x5C:
            if i + 1 >= n or s[i + 1] not in (0x22, 0x5C):
                raise _Fail("invalid escape in quoted string")
            out.append(s[i + 1])
            i += 2
            continue
        if c == 0 or c == 0x0D:
            raise _Fail("invalid character in quoted string")
        out.append(c)
        i += 1
    raise _Fail("unterminated quoted string")


def _digits(s: bytes, i: int, most: int) -> tuple[int, int]:
    """(end, value) of 1..most decimal digits at s[i:]; raises _Fail."""
    start = i
    n = len(s)
    while i < n and 0x30 <= s[i] <= 0x39:
        i += 1
    if i == start or i - start > most:
        raise _Fail("invalid number")
    return i, int(s[start:i])


def _literal_spec(s: bytes, i: int, binary: bool) -> tuple[int, bool, bool]:
    """(size, sync, binary) of "{n}" / "{n+}" at s[i:] (after "{"), which must end s."""
    i, size = _digits(s, i, NUMBER64_DIGITS)
    sync = True
    if i < len(s) and s[i] == 0x2B:
        sync = False
        i += 1
    if i + 1 != len(s) or s[i] != 0x7D:
        raise _Fail("invalid literal")
    return size, sync, binary


def _nonsync_literal_at_end(s: bytes) -> int:
    """The size of a "{n+}" / "~{n+}" ending s, or -1 (used to skip a bad command's data)."""
    if not s.endswith(b"+}"):
        return -1
    brace = s.rfind(b"{")
    digits = s[brace + 1 : -2]
    if brace < 0 or not digits or len(digits) > NUMBER64_DIGITS or not digits.isdigit():
        return -1
    return int(digits)


def _partial(s: bytes, i: int) -> tuple[int, tuple[int, int]]:
    """(end, (offset, length)) of "<offset.length>" whose text starts at i."""
    i, offset = _digits(s, i, 10)
    if i >= len(s) or s[i] != 0x2E:
        raise _Fail("invalid partial")
    i, length = _digits(s, i + 1, 10)
    if i >= len(s) or s[i] != 0x3E or offset > NUMBER_MAX or not 0 < length <= NUMBER_MAX:
        raise _Fail("invalid partial")
    return i + 1, (offset, length)


# ---------------------------------------------------------------------------------------------
# Sequence sets


def _seq_number(text: bytes) -> int:
    if text == b"*":
        return STAR
    if not text or len(text) > 10 or not text.isdigit() or text[0] == 0x30:
        raise ValueError(f"invalid sequence number {text!r}")
    value = int(text)
    if value > NUMBER_MAX:
        raise ValueError(f"sequence number out of range {text!r}")
    return value


def parse_sequence_set(text: bytes) -> list[tuple[int, int]]:
    """Ranges (low, high) of a sequence set; see the facade's docstring."""
    data = bytes(text)
    if data == b"$":
        return [(SEARCHRES, SEARCHRES)]
    ranges = []
    for item in data.split(b","):
        first, colon, last = item.partition(b":")
        low = _seq_number(first)
        high = _seq_number(last) if colon else low
        # "*" is the largest number in use, so it always ends the range.
        if low == STAR or (high != STAR and high < low):
            low, high = high, low
        ranges.append((low, high))
    return ranges


# ---------------------------------------------------------------------------------------------
# FETCH items

_MACROS = {
    b"ALL": (b"FLAGS", b"INTERNALDATE", b"RFC822.SIZE", b"ENVELOPE"),
    b"FAST": (b"FLAGS", b"INTERNALDATE", b"RFC822.SIZE"),
    b"FULL": (b"FLAGS", b"INTERNALDATE", b"RFC822.SIZE", b"ENVELOPE", b"BODY"),
}
_SIMPLE = frozenset(
    (
        b"FLAGS",
        b"INTERNALDATE",
        b"RFC822.SIZE",
        b"ENVELOPE",
        b"BODY",
        b"BODYSTRUCTURE",
        b"UID",
        b"RFC822",
        b"RFC822.HEADER",
        b"RFC822.TEXT",
        b"MODSEQ",
    )
)


def _section(item: Section) -> FetchAtt:
    binary = item.name.startswith(b"BINARY")
    spec = item.spec
    if len(spec) > 2:
        raise ValueError("invalid section")
    first = spec[0] if spec else b""
    if type(first) is not bytes:
        raise ValueError("invalid section")
    parts: list[int] = []
    text = b""
    rest = first.upper()
    while rest:
        head, dot, tail = rest.partition(b".")
        if head.isdigit() and not text:
            number = _seq_number(head) if head[0] != 0x30 else 0
            if number < 1:
                raise ValueError("invalid section part")
            parts.append(number)
            rest = tail
            if dot and not tail:
                raise ValueError("invalid section")
            continue
        text = rest
        break
    fields: tuple[bytes, ...] = ()
    if text in (b"HEADER.FIELDS", b"HEADER.FIELDS.NOT"):
        if len(spec) != 2 or type(spec[1]) is not list or not spec[1]:
            raise ValueError("HEADER.FIELDS needs a list of field names")
        names = []
        for name in spec[1]:
            if type(name) is not bytes and type(name) is not String:
                raise ValueError("invalid header field name")
            names.append(bytes(name).upper())
        fields = tuple(names)
    elif len(spec) > 1:
        raise ValueError("invalid section")
    elif text not in (b"", b"HEADER", b"TEXT", b"MIME"):
        raise ValueError("invalid section text")
    if text == b"MIME" and not parts:
        raise ValueError("MIME needs a part number")
    if binary and text:
        raise ValueError("BINARY takes part numbers only")
    if item.name == b"BINARY.SIZE" and item.partial is not None:
        raise ValueError("BINARY.SIZE takes no partial")
    return FetchAtt(item.name, tuple(parts), text, fields, item.partial)


def _fetch_att(token: object) -> FetchAtt:
    if type(token) is Section:
        return _section(token)
    if type(token) is not bytes:
        raise ValueError("invalid fetch item")
    name = token.upper()
    if name not in _SIMPLE:
        raise ValueError(f"unknown fetch item {token!r}")
    return FetchAtt(name)


def parse_fetch_items(tokens: list[object]) -> list[FetchAtt]:
    """The FETCH data items of a command's arguments after the sequence set."""
    if len(tokens) != 1:
        raise ValueError("FETCH takes one item or one list of items")
    token = tokens[0]
    if type(token) is bytes:
        macro = _MACROS.get(token.upper())
        if macro is not None:
            return [FetchAtt(name) for name in macro]
    if type(token) is list:
        if not token:
            raise ValueError("empty fetch item list")
        return [_fetch_att(item) for item in token]
    return [_fetch_att(token)]


# ---------------------------------------------------------------------------------------------
# Writing

QUOTE_MAX = 1024  # longer strings go as literals: no client has to scan a huge quoted string


def quote(value: bytes) -> bytes:
    """value as an IMAP string: quoted when it is short 7-bit text, else a literal."""
    if len(value) <= QUOTE_MAX and all(0 < c < 0x80 and c != 0x0D and c != 0x0A for c in value):
        return b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
    return b"{%d}\r\n" % len(value) + value


_NUMBER_LIMIT = 1 << 63  # numbers of the fast FETCH line: 0 .. 2^63-1 (mod-sequence's range)


def fetch_flags_line(
    seq: int, uid: int, flags: bytes, size: int, internaldate: bytes | None, modseq: int
) -> bytes:
    """``* seq FETCH (UID uid FLAGS flags RFC822.SIZE size[ INTERNALDATE d][ MODSEQ (m)])``
    and CRLF: the response of the ``FETCH 1:* (UID FLAGS RFC822.SIZE)`` fast path.

    *flags* is the flag list as sent (``(\\Seen)``), *internaldate* the quoted date-time or
    None (left out), *modseq* 0 to leave MODSEQ out. ValueError for a number outside
    0 .. 2^63-1."""
    for number in (seq, uid, size, modseq):
        if not 0 <= number < _NUMBER_LIMIT:
            raise ValueError(f"number out of range: {number}")
    line = b"* %d FETCH (UID %d FLAGS %b RFC822.SIZE %d" % (seq, uid, bytes(flags), size)
    if internaldate is not None:
        line += b" INTERNALDATE " + bytes(internaldate)
    if modseq:
        line += b" MODSEQ (%d)" % modseq
    return line + b")\r\n"


def fetch_flags_lines(
    seq: int,
    uids: Sequence[int],
    flags: Sequence[bytes],
    sizes: Sequence[int],
    modseqs: Sequence[int] | None,
) -> bytes:
    """The lines of :func:`fetch_flags_line` for a run of messages numbered from *seq*:
    message k is ``* seq+k FETCH (UID uids[k] FLAGS flags[k] RFC822.SIZE sizes[k]`` then
    `` MODSEQ (modseqs[k])`` unless *modseqs* is None, and ``)`` CRLF.

    ValueError when the columns differ in length or a number is outside 0 .. 2^63-1;
    TypeError when a flag list is not bytes."""
    n = len(uids)
    if len(sizes) != n or len(flags) != n or (modseqs is not None and len(modseqs) != n):
        raise ValueError("columns of different lengths")
    if not 0 <= seq < _NUMBER_LIMIT:
        raise ValueError(f"number out of range: {seq}")
    for k in range(n):
        if type(flags[k]) is not bytes:
            raise TypeError("flags must be bytes")
        for number in (seq + k, sizes[k], *(() if modseqs is None else (modseqs[k],))):
            if not 0 <= number < _NUMBER_LIMIT:
                raise ValueError(f"number out of range: {number}")
    if modseqs is None:
        return b"".join(
            b"* %d FETCH (UID %d FLAGS %b RFC822.SIZE %d)\r\n"
            % (seq + k, uids[k], flags[k], sizes[k])
            for k in range(n)
        )
    return b"".join(
        b"* %d FETCH (UID %d FLAGS %b RFC822.SIZE %d MODSEQ (%d))\r\n"
        % (seq + k, uids[k], flags[k], sizes[k], modseqs[k])
        for k in range(n)
    )


def fetch_item_lines(seq: int, parts: Sequence[bytes]) -> bytes:
    """``* seq+k FETCH (parts[k])`` and CRLF for each part: the lines of a run of messages
    whose items are rendered already. ValueError for a message number outside
    0 .. 2^63-1; TypeError when a part is not bytes."""
    if not 0 <= seq < _NUMBER_LIMIT:
        raise ValueError(f"number out of range: {seq}")
    for k, part in enumerate(parts):
        if type(part) is not bytes:
            raise TypeError("parts must be bytes")
        if seq + k >= _NUMBER_LIMIT:
            raise ValueError(f"number out of range: {seq + k}")
    return b"".join(b"* %d FETCH (%b)\r\n" % (seq + k, part) for k, part in enumerate(parts))
