"""IMAP command tokenizer: incremental reading of client commands (atoms, quoted strings,
literals and literal8, lists, FETCH sections), sequence sets and FETCH items (RFC 9051 §9,
RFC 3501 §9, RFC 7888, RFC 3516, RFC 5182, RFC 7162).

The API and its guarantees are documented in ``tachymail/protocol/imap.py``;
``tachymail/protocol/imap_py.py`` is the pure-Python twin with the same results and events for
every input, however it is cut into chunks.  Both return the classes of ``imap_types``.  The
tokenizer is a loop over the octets of one line with a character-class table; lines are found
with memchr in the reader's buffer.
"""

from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.string cimport memchr, memcpy

from imap cimport (
    BACKSLASH,
    C_ATOM,
    C_DIGIT,
    C_TAG,
    C_TOKEN,
    CR,
    DOT,
    DQUOTE,
    GT,
    LBRACE,
    LBRACKET,
    LF,
    LPAREN,
    LT,
    M_LINE,
    M_LITERAL,
    M_SKIP_LINE,
    M_SKIP_LITERAL,
    NUL,
    NUMBER64_DIGITS,
    NUMBER_DIGITS,
    PLUS,
    QUOTE_MAX,
    RBRACE,
    RBRACKET,
    RPAREN,
    SP,
    TILDE,
    ZERO,
)

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
    "parse_fetch_items",
    "fetch_flags_line",
    "fetch_flags_lines",
    "fetch_item_lines",
    "parse_sequence_set",
    "quote",
]

cdef unsigned char CLASSES[256]
cdef unsigned char UPPER[256]
SECTION_NAMES = frozenset((b"BODY", b"BODY.PEEK", b"BINARY", b"BINARY.PEEK", b"BINARY.SIZE"))
cdef unsigned long long NUMBER_MAX = 0xFFFFFFFF
# What the NamedTuples' own __new__ does, without a Python-level call per token.
cdef object tuple_new = tuple.__new__


cdef void _fill_tables() noexcept:
    cdef int c
    cdef bytes atom_specials = b'(){ %*"\\]'
    for c in range(256):
        CLASSES[c] = 0
        UPPER[c] = c - 32 if 97 <= c <= 122 else c
        if 0x21 <= c <= 0x7E:
            if c not in atom_specials:
                CLASSES[c] |= C_ATOM
            if (c not in atom_specials or c == RBRACKET) and c != PLUS:
                CLASSES[c] |= C_TAG
            if c != LPAREN and c != RPAREN and c != LBRACE and c != DQUOTE:
                CLASSES[c] |= C_TOKEN
        if ZERO <= c <= 0x39:
            CLASSES[c] |= C_DIGIT


_fill_tables()


class _Fail(Exception):
    """A reason the command being tokenized is bad (turned into a Bad event)."""


cdef inline bytes upper(const unsigned char* s, Py_ssize_t n):
    cdef bytes out = PyBytes_FromStringAndSize(NULL, n)
    cdef unsigned char* o = <unsigned char*>PyBytes_AS_STRING(out)
    cdef Py_ssize_t i
    for i in range(n):
        o[i] = UPPER[s[i]]
    return out


cdef Py_ssize_t digits(const unsigned char* s, Py_ssize_t i, Py_ssize_t n, int most,
                       unsigned long long* value) except -1:
    """End of 1..most decimal digits at s[i:], their value in *value; raises _Fail."""
    cdef Py_ssize_t start = i
    cdef unsigned long long v = 0
    while i < n and CLASSES[s[i]] & C_DIGIT:
        if i - start < most:
            v = v * 10 + (s[i] - ZERO)
        i += 1
    if i == start or i - start > most:
        raise _Fail("invalid number")
    value[0] = v
    return i


cdef object guess_tag(const unsigned char* s, Py_ssize_t n):
    """The tag of a line of which only s[:n] is known, if it shows a valid one."""
    cdef const unsigned char* space = <const unsigned char*>memchr(s, SP, <size_t>n)
    cdef Py_ssize_t k, end
    if space == NULL or space == s:
        return None
    end = space - s
    for k in range(end):
        if not CLASSES[s[k]] & C_TAG:
            return None
    return PyBytes_FromStringAndSize(<const char*>s, end)


cdef Py_ssize_t nonsync_literal_at_end(bytes segment):
    """The size of a "{n+}" / "~{n+}" ending segment, or -1."""
    cdef const unsigned char* s = <const unsigned char*>PyBytes_AS_STRING(segment)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(segment)
    cdef Py_ssize_t k = n - 3
    cdef unsigned long long v = 0
    cdef Py_ssize_t count
    if n < 4 or s[n - 1] != RBRACE or s[n - 2] != PLUS:
        return -1
    while k >= 0 and CLASSES[s[k]] & C_DIGIT:
        k -= 1
    count = n - 3 - k
    if k < 0 or s[k] != LBRACE or count == 0 or count > NUMBER64_DIGITS:
        return -1
    for k in range(k + 1, n - 2):
        v = v * 10 + (s[k] - ZERO)
    return <Py_ssize_t>v


cdef class CommandReader:
    """Incremental IMAP command reader; see the module docstring of the facade."""

    cdef bytearray _buf
    cdef int _mode
    cdef Py_ssize_t _remaining     # literal octets still to read (or skip)
    cdef bint _binary              # the literal being read is a literal8
    cdef bint _started             # the tag and name of the current command are read
    cdef bint _discarding          # dropping the rest of a bad command (its {n+} literals too)
    cdef bint _after_literal       # the next line continues right after a literal's octets
    cdef object _tag
    cdef bytes _name
    cdef list _stack               # open frames: the arguments, then lists and sections
    cdef list _sections            # per frame: the section name, or None
    cdef Py_ssize_t _text_used
    cdef Py_ssize_t _literal_used
    cdef readonly Py_ssize_t max_line
    cdef readonly Py_ssize_t max_literal

    def __init__(self, Py_ssize_t max_line=8192, Py_ssize_t max_literal=64 * 1024 * 1024):
        if max_line < 1 or max_literal < 0:
            raise ValueError("max_line must be at least 1 and max_literal at least 0")
        self.max_line = max_line
        self.max_literal = max_literal
        self._buf = bytearray()
        self._mode = M_LINE
        self._remaining = 0
        self._binary = False
        self._reset()

    cdef void _reset(self):
        self._started = False
        self._discarding = False
        self._after_literal = False
        self._tag = None
        self._name = b""
        self._stack = [[]]
        self._sections = [None]
        self._text_used = 0
        self._literal_used = 0

    @property
    def pending(self):
        """Octets buffered and not yet consumed."""
        return PyByteArray_GET_SIZE(self._buf)

    def feed(self, data):
        """Append a chunk; octets the reader is skipping are dropped at once."""
        cdef const unsigned char[::1] view
        cdef Py_ssize_t take, n
        cdef const unsigned char* lf
        if (self._mode == M_SKIP_LITERAL or self._mode == M_SKIP_LINE) and not self._buf:
            view = memoryview(data).cast("B")
            n = view.shape[0]
            if n == 0:
                return
            if self._mode == M_SKIP_LITERAL:
                take = min(n, self._remaining)
                self._remaining -= take
                if not self._remaining:
                    self._mode = M_LINE
                self._buf += view[take:]
                return
            lf = <const unsigned char*>memchr(&view[0], LF, <size_t>n)
            if lf == NULL:
                return
            self._mode = M_LINE
            self._buf += view[lf - &view[0] + 1:]
            return
        self._buf += data

    def next(self):
        """The next command or event, or None until more octets are fed."""
        cdef bytearray buf = self._buf
        cdef Py_ssize_t size, take, lf, end, room, avail
        cdef const unsigned char* base
        cdef const unsigned char* hit
        cdef bytes value, segment
        while True:
            mode = self._mode
            avail = PyByteArray_GET_SIZE(buf)
            if mode == M_SKIP_LINE:
                base = <const unsigned char*>PyByteArray_AS_STRING(buf)
                hit = <const unsigned char*>memchr(base, LF, <size_t>avail)
                if hit == NULL:
                    del buf[:]
                    return None
                del buf[: hit - base + 1]
                self._mode = M_LINE
                self._reset()
                continue
            if mode == M_SKIP_LITERAL:
                take = min(avail, self._remaining)
                del buf[:take]
                self._remaining -= take
                if self._remaining:
                    return None
                self._mode = M_LINE
                continue
            if mode == M_LITERAL:
                size = self._remaining
                if avail < size:
                    return None
                value = PyBytes_FromStringAndSize(PyByteArray_AS_STRING(buf), size)
                del buf[:size]
                token = Binary(value) if self._binary else String(value)
                (<list>self._stack[len(self._stack) - 1]).append(token)
                self._mode = M_LINE
                self._after_literal = True
                continue
            base = <const unsigned char*>PyByteArray_AS_STRING(buf)
            room = self.max_line - self._text_used
            # Only the first room octets can hold this line's end.
            hit = <const unsigned char*>memchr(base, LF, <size_t>min(avail, room))
            if hit == NULL:
                if avail < room:
                    return None
                bad = self._too_long(room)
                if bad is None:
                    continue
                return bad
            lf = hit - base
            end = lf - 1 if lf and base[lf - 1] == CR else lf
            segment = PyBytes_FromStringAndSize(<const char*>base, end)
            del buf[: lf + 1]
            self._text_used += lf + 1
            if self._discarding:
                self._discard_segment(segment)
                continue
            item = self._segment(segment)
            if item is not None:
                return item

    def next_line(self):
        """The next line as sent, without its line end, or None until one is complete: the
        answer to IDLE (``DONE``) and to AUTHENTICATE's challenges.  Only between commands."""
        cdef bytearray buf = self._buf
        cdef const unsigned char* base
        cdef const unsigned char* hit
        cdef Py_ssize_t avail = PyByteArray_GET_SIZE(buf)
        cdef Py_ssize_t lf, end
        if self._mode != M_LINE or self._started or self._discarding:
            raise RuntimeError("next_line() in the middle of a command")
        base = <const unsigned char*>PyByteArray_AS_STRING(buf)
        hit = <const unsigned char*>memchr(base, LF, <size_t>min(avail, self.max_line))
        if hit == NULL:
            if avail < self.max_line:
                return None
            bad = self._too_long(self.max_line)
            return Bad(None, bad.reason)
        lf = hit - base
        end = lf - 1 if lf and base[lf - 1] == CR else lf
        line = PyBytes_FromStringAndSize(<const char*>base, end)
        del buf[: lf + 1]
        return line

    cdef object _too_long(self, Py_ssize_t room):
        """The command's text passed max_line: drop it up to the end of this line.  No second
        event for a command already answered (one being discarded)."""
        cdef bytearray buf = self._buf
        cdef const unsigned char* base = <const unsigned char*>PyByteArray_AS_STRING(buf)
        cdef Py_ssize_t avail = PyByteArray_GET_SIZE(buf)
        cdef const unsigned char* hit
        bad = None
        if not self._discarding:
            tag = self._tag if self._started else guess_tag(base, room)
            bad = Bad(tag, "command line too long")
        self._reset()
        hit = <const unsigned char*>memchr(base, LF, <size_t>avail)
        if hit == NULL:
            del buf[:]
            self._mode = M_SKIP_LINE
        else:
            del buf[: hit - base + 1]
        return bad

    cdef void _discard_segment(self, bytes segment):
        """Rest of a bad command: skip the octets of a {n+} ending it, else it is over."""
        cdef Py_ssize_t size = nonsync_literal_at_end(segment)
        if size < 0:
            self._reset()
            return
        self._remaining = size
        self._mode = M_SKIP_LITERAL

    cdef object _fail(self, str reason, bytes segment):
        bad = Bad(self._tag, reason)
        self._reset()
        self._discard_segment(segment)
        if self._mode != M_LINE:
            self._discarding = True
        return bad

    cdef object _segment(self, bytes segment):
        """Tokenize one line of the command (up to its end or to a literal announcement)."""
        cdef const unsigned char* s = <const unsigned char*>PyBytes_AS_STRING(segment)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(segment)
        cdef Py_ssize_t i = 0, k, start
        cdef unsigned long long size
        cdef bint sync, binary, in_section
        cdef unsigned char c
        if not self._started:
            while i < n and s[i] != SP:
                i += 1
            if i == 0:
                return self._fail("empty command line", segment)
            for k in range(i):
                if not CLASSES[s[k]] & C_TAG:
                    return self._fail("invalid tag", segment)
            self._tag = PyBytes_FromStringAndSize(<const char*>s, i)
            i += 1
            start = i
            while i < n and CLASSES[s[i]] & C_ATOM:
                i += 1
            if i <= start:
                return self._fail("missing command name", segment)
            if i < n and s[i] != SP:
                return self._fail("invalid command name", segment)
            name = upper(s + start, i - start)
            if name == b"UID":
                i += 1
                start = i
                while i < n and CLASSES[s[i]] & C_ATOM:
                    i += 1
                if i <= start:
                    return self._fail("missing command after UID", segment)
                name = b"UID " + upper(s + start, i - start)
                if i < n and s[i] != SP:
                    return self._fail("invalid command name", segment)
            self._name = name
            self._started = True
        elif self._after_literal:
            self._after_literal = False
            if i < n:
                c = s[i]
                in_section = self._sections[len(self._sections) - 1] is not None
                if not (c == SP or c == RPAREN or (c == RBRACKET and in_section)):
                    return self._fail("no space after literal", segment)
        try:
            literal = self._tokens(s, i, n)
        except _Fail as exc:
            return self._fail(str(exc), segment)
        if literal is None:
            if len(self._stack) > 1:
                return self._fail(
                    "unterminated section" if self._sections[len(self._sections) - 1] is not None
                    else "unbalanced parenthesis",
                    segment,
                )
            command = tuple_new(Command, (self._tag, self._name, self._stack[0]))
            self._reset()
            return command
        size, sync, binary = literal
        tag = self._tag
        if size > <unsigned long long>(self.max_literal - self._literal_used):
            self._reset()
            if not sync:
                self._remaining = <Py_ssize_t>size
                self._mode = M_SKIP_LITERAL
                self._discarding = True
            return TooLarge(tag, size, sync)
        self._literal_used += <Py_ssize_t>size
        self._remaining = <Py_ssize_t>size
        self._binary = binary
        self._mode = M_LITERAL
        return tuple_new(Continuation, (tag, size)) if sync else None

    cdef object _tokens(self, const unsigned char* s, Py_ssize_t i, Py_ssize_t n):
        """Tokens of s[i:n] into the open frames; (size, sync, binary) when the line ends with
        a literal announcement, None at its end.  Raises _Fail."""
        cdef list stack = self._stack
        cdef list sections = self._sections
        cdef list top = <list>stack[len(stack) - 1]
        cdef bint in_section = sections[len(sections) - 1] is not None
        cdef unsigned char c
        cdef Py_ssize_t start
        cdef unsigned long long size, offset, length
        cdef bint binary, sync
        while True:
            while i < n and s[i] == SP:
                i += 1
            if i >= n:
                return None
            c = s[i]
            if c == LPAREN:
                top = []
                stack.append(top)
                sections.append(None)
                in_section = False
                i += 1
                continue
            if c == RPAREN:
                if len(stack) == 1 or in_section:
                    raise _Fail("unexpected )")
                done = stack.pop()
                sections.pop()
                top = <list>stack[len(stack) - 1]
                in_section = sections[len(sections) - 1] is not None
                top.append(done)
                i += 1
            elif c == RBRACKET and in_section:
                spec = stack.pop()
                section_name = sections.pop()
                top = <list>stack[len(stack) - 1]
                in_section = sections[len(sections) - 1] is not None
                i += 1
                partial = None
                if i < n and s[i] == LT:
                    i = digits(s, i + 1, n, NUMBER_DIGITS, &offset)
                    if i >= n or s[i] != DOT:
                        raise _Fail("invalid partial")
                    i = digits(s, i + 1, n, NUMBER_DIGITS, &length)
                    if i >= n or s[i] != GT or offset > NUMBER_MAX or not 0 < length <= NUMBER_MAX:
                        raise _Fail("invalid partial")
                    i += 1
                    partial = (offset, length)
                top.append(tuple_new(Section, (section_name, spec, partial)))
            elif c == DQUOTE:
                i = self._quoted(s, i + 1, n, top)
            elif c == LBRACE or (c == TILDE and i + 1 < n and s[i + 1] == LBRACE):
                binary = c == TILDE
                i = digits(s, i + 2 if binary else i + 1, n, NUMBER64_DIGITS, &size)
                sync = True
                if i < n and s[i] == PLUS:
                    sync = False
                    i += 1
                if i + 1 != n or s[i] != RBRACE:
                    raise _Fail("invalid literal")
                return (size, sync, binary)
            elif CLASSES[c] & C_TOKEN:
                start = i
                while i < n:
                    c = s[i]
                    if not CLASSES[c] & C_TOKEN or (c == RBRACKET and in_section):
                        break
                    if (c == LBRACKET and not in_section
                            and upper(s + start, i - start) in SECTION_NAMES):
                        break
                    i += 1
                if i < n and s[i] == LBRACKET and not in_section:
                    top = []
                    stack.append(top)
                    sections.append(upper(s + start, i - start))
                    in_section = True
                    i += 1
                    continue
                top.append(PyBytes_FromStringAndSize(<const char*>s + start, i - start))
            else:
                raise _Fail("invalid character")
            # After a token: a space, a closing bracket, or the end of the line.
            if i < n:
                c = s[i]
                if not (c == SP or c == RPAREN or (c == RBRACKET and in_section)):
                    raise _Fail("missing space between arguments")

    cdef Py_ssize_t _quoted(self, const unsigned char* s, Py_ssize_t i, Py_ssize_t n,
                            list top) except -1:
        """Append the quoted string whose text starts at i; the index after its quote."""
        cdef Py_ssize_t start = i
        cdef bint escaped = False
        cdef unsigned char c
        cdef bytearray out
        while i < n:
            c = s[i]
            if c == DQUOTE:
                break
            if c == BACKSLASH:
                if i + 1 >= n or (s[i + 1] != DQUOTE and s[i + 1] != BACKSLASH):
                    raise _Fail("invalid escape in quoted string")
                escaped = True
                i += 2
                continue
            if c == NUL or c == CR:
                raise _Fail("invalid character in quoted string")
            i += 1
        else:
            raise _Fail("unterminated quoted string")
        if not escaped:
            top.append(String(PyBytes_FromStringAndSize(<const char*>s + start, i - start)))
            return i + 1
        # Rare: unescape into a copy.
        out = bytearray()
        k = start
        while k < i:
            if s[k] == BACKSLASH:
                k += 1
            out.append(s[k])
            k += 1
        top.append(String(bytes(out)))
        return i + 1


# ---------------------------------------------------------------------------------------------
# Sequence sets


cdef long long seq_number(const unsigned char* s, Py_ssize_t n) except -2:
    """nz-number or "*" (STAR) of s[:n]; raises ValueError."""
    cdef Py_ssize_t k
    cdef unsigned long long v = 0
    if n == 1 and s[0] == 42:
        return STAR
    if n == 0 or n > NUMBER_DIGITS or s[0] == ZERO:
        raise ValueError(f"invalid sequence number {s[:n]!r}")
    for k in range(n):
        if not CLASSES[s[k]] & C_DIGIT:
            raise ValueError(f"invalid sequence number {s[:n]!r}")
        v = v * 10 + (s[k] - ZERO)
    if v > NUMBER_MAX:
        raise ValueError(
            f"sequence number out of range {s[:n]!r}"
        )
    return <long long>v


def parse_sequence_set(text):
    """Ranges (low, high) of a sequence set; see the facade's docstring."""
    cdef bytes data = bytes(text)
    cdef const unsigned char* s = <const unsigned char*>PyBytes_AS_STRING(data)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
    cdef Py_ssize_t i = 0, start, colon
    cdef long long low, high
    cdef list ranges = []
    if n == 1 and s[0] == 36:
        return [(SEARCHRES, SEARCHRES)]
    while True:
        start = i
        colon = -1
        while i < n and s[i] != 44:
            if s[i] == 58 and colon < 0:
                colon = i
            i += 1
        if colon < 0:
            low = high = seq_number(s + start, i - start)
        else:
            low = seq_number(s + start, colon - start)
            high = seq_number(s + colon + 1, i - colon - 1)
        # "*" is the largest number in use, so it always ends the range.
        if low == STAR or (high != STAR and high < low):
            low, high = high, low
        ranges.append((low, high))
        if i >= n:
            return ranges
        i += 1


# ---------------------------------------------------------------------------------------------
# FETCH items (lists of a few tokens: plain Python is fast enough, compiled for free)

_MACROS = {
    b"ALL": (b"FLAGS", b"INTERNALDATE", b"RFC822.SIZE", b"ENVELOPE"),
    b"FAST": (b"FLAGS", b"INTERNALDATE", b"RFC822.SIZE"),
    b"FULL": (b"FLAGS", b"INTERNALDATE", b"RFC822.SIZE", b"ENVELOPE", b"BODY"),
}
_SIMPLE = {
    name: FetchAtt(name)
    for name in (
        b"FLAGS", b"INTERNALDATE", b"RFC822.SIZE", b"ENVELOPE", b"BODY", b"BODYSTRUCTURE",
        b"UID", b"RFC822", b"RFC822.HEADER", b"RFC822.TEXT", b"MODSEQ",
    )
}


cdef object fetch_section(item):
    cdef bytes name = item[0]
    cdef list spec = item[1]
    cdef object partial = item[2]
    cdef bint binary = name.startswith(b"BINARY")
    cdef list parts = []
    cdef bytes text = b""
    cdef tuple fields = ()
    cdef const unsigned char* s
    cdef Py_ssize_t n, i = 0, start
    if len(spec) > 2:
        raise ValueError("invalid section")
    first = spec[0] if spec else b""
    if type(first) is not bytes:
        raise ValueError("invalid section")
    s = <const unsigned char*>PyBytes_AS_STRING(first)
    n = PyBytes_GET_SIZE(first)
    # Part numbers ("1.2."), then the text of the section (HEADER, TEXT, ...).
    while i < n:
        start = i
        while i < n and CLASSES[s[i]] & C_DIGIT:
            i += 1
        if i == start or (i < n and s[i] != DOT):
            text = upper(s + start, n - start)
            break
        if s[start] == ZERO:
            raise ValueError("invalid section part")
        parts.append(seq_number(s + start, i - start))
        if i < n:
            i += 1
            if i == n:
                raise ValueError("invalid section")
    if text == b"HEADER.FIELDS" or text == b"HEADER.FIELDS.NOT":
        if len(spec) != 2 or type(spec[1]) is not list or not spec[1]:
            raise ValueError("HEADER.FIELDS needs a list of field names")
        names = []
        for field in <list>spec[1]:
            if type(field) is not bytes and type(field) is not String:
                raise ValueError("invalid header field name")
            names.append(bytes(field).upper())
        fields = tuple(names)
    elif len(spec) > 1:
        raise ValueError("invalid section")
    elif not (text == b"" or text == b"HEADER" or text == b"TEXT" or text == b"MIME"):
        raise ValueError("invalid section text")
    if text == b"MIME" and not parts:
        raise ValueError("MIME needs a part number")
    if binary and text:
        raise ValueError("BINARY takes part numbers only")
    if name == b"BINARY.SIZE" and partial is not None:
        raise ValueError("BINARY.SIZE takes no partial")
    return tuple_new(FetchAtt, (name, tuple(parts), text, fields, partial))


cdef object fetch_att(token):
    if type(token) is Section:
        return fetch_section(token)
    if type(token) is not bytes:
        raise ValueError("invalid fetch item")
    att = _SIMPLE.get((<bytes>token).upper())
    if att is None:
        raise ValueError(f"unknown fetch item {token!r}")
    return att


def parse_fetch_items(tokens):
    """The FETCH data items of a command's arguments after the sequence set."""
    if len(tokens) != 1:
        raise ValueError("FETCH takes one item or one list of items")
    token = tokens[0]
    if type(token) is bytes:
        macro = _MACROS.get((<bytes>token).upper())
        if macro is not None:
            return [_SIMPLE[name] for name in macro]
    if type(token) is list:
        if not token:
            raise ValueError("empty fetch item list")
        return [fetch_att(item) for item in <list>token]
    return [fetch_att(token)]


# ---------------------------------------------------------------------------------------------
# Writing


def quote(value):
    """value as an IMAP string: quoted when it is short 7-bit text, else a literal."""
    cdef bytes data = bytes(value)
    cdef const unsigned char* s = <const unsigned char*>PyBytes_AS_STRING(data)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
    cdef Py_ssize_t k
    cdef bint plain = n <= QUOTE_MAX
    cdef bint specials = False
    cdef unsigned char c
    if plain:
        for k in range(n):
            c = s[k]
            if c == 0 or c >= 0x80 or c == CR or c == LF:
                plain = False
                break
            if c == DQUOTE or c == BACKSLASH:
                specials = True
    if not plain:
        return b"{%d}\r\n" % n + data
    if specials:
        data = data.replace(b"\\", b"\\\\").replace(b'"', b'\\"')
    return b'"' + data + b'"'


cdef unsigned long long NUMBER_LIMIT = 1ULL << 63


cdef unsigned long long line_number(object number) except? 0xFFFFFFFFFFFFFFFF:
    """number as an unsigned 64-bit value; ValueError outside 0 .. 2^63-1 (as the twin)."""
    if not 0 <= number < NUMBER_LIMIT:
        raise ValueError(f"number out of range: {number}")
    return <unsigned long long>number


cdef inline Py_ssize_t put_number(char* out, Py_ssize_t i, unsigned long long value) noexcept:
    """Write value's decimal digits at out[i:]; the index after them."""
    cdef char digits[20]
    cdef int n = 0
    while True:
        digits[n] = <char>(ZERO + value % 10)
        n += 1
        value //= 10
        if value == 0:
            break
    while n:
        n -= 1
        out[i] = digits[n]
        i += 1
    return i


cdef inline Py_ssize_t put(char* out, Py_ssize_t i, const char* text, Py_ssize_t n) noexcept:
    memcpy(out + i, text, n)
    return i + n


def fetch_flags_line(seq, uid, flags, size, internaldate, modseq):
    """The FETCH fast path's response line; see the facade's docstring."""
    cdef unsigned long long v_seq = line_number(seq)
    cdef unsigned long long v_uid = line_number(uid)
    cdef unsigned long long v_size = line_number(size)
    cdef unsigned long long v_modseq = line_number(modseq)
    cdef bytes f = bytes(flags)
    cdef bytes d = None if internaldate is None else bytes(internaldate)
    cdef Py_ssize_t nf = PyBytes_GET_SIZE(f)
    cdef Py_ssize_t nd = 0 if d is None else PyBytes_GET_SIZE(d)
    # fixed text, four numbers of at most 20 digits, the flags and the date
    cdef Py_ssize_t most = 80 + 4 * 20 + nf + nd
    cdef bytes out = PyBytes_FromStringAndSize(NULL, most)
    cdef char* o = PyBytes_AS_STRING(out)
    cdef Py_ssize_t i = put(o, 0, b"* ", 2)
    i = put_number(o, i, v_seq)
    i = put(o, i, b" FETCH (UID ", 12)
    i = put_number(o, i, v_uid)
    i = put(o, i, b" FLAGS ", 7)
    i = put(o, i, PyBytes_AS_STRING(f), nf)
    i = put(o, i, b" RFC822.SIZE ", 13)
    i = put_number(o, i, v_size)
    if d is not None:
        i = put(o, i, b" INTERNALDATE ", 14)
        i = put(o, i, PyBytes_AS_STRING(d), nd)
    if v_modseq:
        i = put(o, i, b" MODSEQ (", 9)
        i = put_number(o, i, v_modseq)
        i = put(o, i, b")", 1)
    i = put(o, i, b")\r\n", 3)
    return out[:i]


def fetch_flags_lines(seq, uids, flags, sizes, modseqs):
    """The FETCH fast path's lines for a run of messages; see the facade's docstring."""
    cdef const unsigned int[::1] u = uids
    cdef const unsigned long long[::1] z = sizes
    cdef const unsigned long long[::1] q
    cdef bint with_modseq = modseqs is not None
    cdef Py_ssize_t n = u.shape[0]
    cdef Py_ssize_t k, nf, total, i
    cdef unsigned long long first, number
    cdef object item
    if with_modseq:
        q = modseqs
    if z.shape[0] != n or len(flags) != n or (with_modseq and q.shape[0] != n):
        raise ValueError("columns of different lengths")
    first = line_number(seq)
    # fixed text (at most 42 octets) and four numbers of at most 20 digits each a line
    total = 0
    for k in range(n):
        item = flags[k]
        if type(item) is not bytes:
            raise TypeError("flags must be bytes")
        number = first + <unsigned long long>k
        if number >= NUMBER_LIMIT:
            raise ValueError(f"number out of range: {number}")
        if z[k] >= NUMBER_LIMIT:
            raise ValueError(f"number out of range: {z[k]}")
        if with_modseq and q[k] >= NUMBER_LIMIT:
            raise ValueError(f"number out of range: {q[k]}")
        total += 42 + 80 + PyBytes_GET_SIZE(<bytes>item)
    cdef bytes out = PyBytes_FromStringAndSize(NULL, total)
    cdef char* o = PyBytes_AS_STRING(out)
    i = 0
    for k in range(n):
        item = flags[k]
        nf = PyBytes_GET_SIZE(<bytes>item)
        i = put(o, i, b"* ", 2)
        i = put_number(o, i, first + <unsigned long long>k)
        i = put(o, i, b" FETCH (UID ", 12)
        i = put_number(o, i, u[k])
        i = put(o, i, b" FLAGS ", 7)
        i = put(o, i, PyBytes_AS_STRING(<bytes>item), nf)
        i = put(o, i, b" RFC822.SIZE ", 13)
        i = put_number(o, i, z[k])
        if with_modseq:
            i = put(o, i, b" MODSEQ (", 9)
            i = put_number(o, i, q[k])
            i = put(o, i, b")", 1)
        i = put(o, i, b")\r\n", 3)
    return out[:i]


def fetch_item_lines(seq, parts):
    """``* n FETCH (part)`` lines of a run of messages; see the facade's docstring."""
    cdef Py_ssize_t n = len(parts)
    cdef Py_ssize_t k, i, total = 0
    cdef unsigned long long first = line_number(seq)
    cdef unsigned long long number
    cdef object item
    for k in range(n):
        item = parts[k]
        if type(item) is not bytes:
            raise TypeError("parts must be bytes")
        number = first + <unsigned long long>k
        if number >= NUMBER_LIMIT:
            raise ValueError(f"number out of range: {number}")
        # "* ", at most 20 digits, " FETCH (", the part, ")\r\n"
        total += 2 + 20 + 8 + 3 + PyBytes_GET_SIZE(<bytes>item)
    cdef bytes out = PyBytes_FromStringAndSize(NULL, total)
    cdef char* o = PyBytes_AS_STRING(out)
    i = 0
    for k in range(n):
        item = parts[k]
        i = put(o, i, b"* ", 2)
        i = put_number(o, i, first + <unsigned long long>k)
        i = put(o, i, b" FETCH (", 8)
        i = put(o, i, PyBytes_AS_STRING(<bytes>item), PyBytes_GET_SIZE(<bytes>item))
        i = put(o, i, b")\r\n", 3)
    return out[:i]
