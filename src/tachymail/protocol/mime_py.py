"""Pure-Python twin of the compiled MIME structure scanner (``ext/mime.pyx``).

Same API and, for every input, the same tree; see ``tachymail.protocol.mime`` for the
contract.  The scan walks the message once, line by line while reading headers and from one
``"--"`` line to the next in bodies, with an explicit stack of open parts (no recursion), so
its time is linear in the message size whatever the nesting.
"""

from __future__ import annotations

import operator
import re

__all__ = [
    "Part",
    "blank_line",
    "canonical_body",
    "content_type_params",
    "dkim_empty_b",
    "dkim_header_input",
    "dkim_plain_base64",
    "dkim_plain_signature",
    "dkim_signed_fields",
    "dkim_tag_list",
    "header_fields",
    "header_value",
    "relaxed_header_value",
    "scan",
]

Buffer = bytes | bytearray | memoryview

# What the scanner does with the bytes after a part's header block.
_HEADERS = 0  # still reading header lines
_LEAF = 1  # body not split: only ancestors' boundary lines matter
_PREAMBLE = 2  # multipart before its first boundary line
_PARTS = 3  # multipart with a child part open
_EPILOGUE = 4  # multipart after its closing boundary line
_MESSAGE = 5  # message/rfc822 whose encapsulated message is open

_CR = 13
_LF = 10

# A header field line as email.feedparser sees one: printable ASCII name (no space) + ":".
_FIELD_NAME = re.compile(rb"[\x21-\x39\x3b-\x7e]*:")
# RFC 2045 tspecials and white space end a token; everything else (8-bit too) belongs to it.
_WSP = frozenset(b" \t\r\n")
_TOKEN_ENDS = frozenset(b' \t\r\n()<>@,;:\\"/[]?=')
_NAME_ENDS = frozenset(b' \t\r\n;=("')
_VALUE_ENDS = frozenset(b' \t\r\n;("')
# Quoted string: backslash quotes any byte; a lone backslash at the very end is dropped.
_QUOTED = re.compile(rb'"((?:[^"\\]|\\.)*)"?', re.DOTALL)
_QUOTED_PAIR = re.compile(rb"\\(.)", re.DOTALL)
# RFC 2231 parameter names: name*  name*N  name*N*
_SECTIONED = re.compile(rb"([^*]+)\*(?:([0-9]{1,9})(\*?))?")
_PERCENT = re.compile(rb"%([0-9A-Fa-f]{2})")


class Part:
    """One node of the MIME tree; offsets index the scanned message (see the facade)."""

    __slots__ = (
        "body_start",
        "boundary",
        "charset",
        "children",
        "content_type",
        "defects",
        "depth",
        "end",
        "has_8bit",
        "start",
        "transfer_encoding",
    )

    def __init__(self, start: int = 0, depth: int = 0) -> None:
        self.start = start
        self.body_start = start
        self.end = start
        self.content_type = "text/plain"
        self.charset: str | None = None
        self.boundary: str | None = None
        self.transfer_encoding = "7bit"
        self.has_8bit = False
        self.depth = depth
        self.children: list[Part] = []
        self.defects: list[str] = []

    def header_bytes(self, message: Buffer) -> bytes:
        """The header block, with the blank line that ends it: ``message[start:body_start]``."""
        return bytes(message[self.start : self.body_start])

    def body_bytes(self, message: Buffer) -> bytes:
        """The body, still transfer-encoded: ``message[body_start:end]``."""
        return bytes(message[self.body_start : self.end])

    def __repr__(self) -> str:
        # Children are counted, not shown: a deep tree must not make repr recurse.
        return (
            f"Part({self.content_type!r}, start={self.start}, body_start={self.body_start}, "
            f"end={self.end}, depth={self.depth}, children={len(self.children)}, "
            f"has_8bit={self.has_8bit}, defects={self.defects!r})"
        )


# ---------------------------------------------------------------------------------------------
# Header fields


def header_value(headers: Buffer, name: Buffer) -> bytes | None:
    """The first *name* field of the header block *headers*, unfolded and stripped, or None.

    *name* is matched case-insensitively.  Reading stops at the end of the header block: a blank
    line, or a line that is neither a field (``name:``), a continuation (leading space or tab)
    nor an mbox ``From `` line.  Unfolding drops the line breaks (CRLF or LF) and keeps the
    white space after them; leading and trailing spaces, tabs and CRs are stripped.
    """
    if not isinstance(headers, bytes):
        headers = bytes(headers)
    want = bytes(name).lower()
    n = len(headers)
    pos = 0
    pieces: list[bytes] | None = None
    while pos < n:
        nl = headers.find(b"\n", pos)
        line_end = n if nl < 0 else nl
        following = n if nl < 0 else nl + 1
        if line_end > pos and headers[line_end - 1] == _CR:
            line_end -= 1
        if line_end == pos:
            break
        first = headers[pos]
        if first == 32 or first == 9:
            if pieces is not None:
                pieces.append(headers[pos:line_end])
            pos = following
            continue
        if pieces is not None:
            break
        if not headers.startswith(b"From ", pos):
            match = _FIELD_NAME.match(headers, pos, line_end)
            if match is None:
                break
            colon = match.end() - 1
            if colon > pos and headers[pos:colon].lower() == want:
                pieces = [headers[colon + 1 : line_end]]
        pos = following
    if pieces is None:
        return None
    return b"".join(pieces).strip(b" \t\r")


# ---------------------------------------------------------------------------------------------
# Content-Type and its parameters


def _skip_cfws(value: bytes, i: int, n: int) -> int:
    """Index of the first byte at or after *i* that is neither white space nor in a comment."""
    while i < n:
        c = value[i]
        if c in _WSP:
            i += 1
        elif c == 40:  # "(" opens a comment, which may nest
            i = _skip_comment(value, i, n)
        else:
            break
    return i


def _skip_comment(value: bytes, i: int, n: int) -> int:
    depth = 0
    while i < n:
        c = value[i]
        if c == 92:  # backslash: the next byte is quoted
            i += 2
            continue
        if c == 40:
            depth += 1
        elif c == 41:
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return n


def _skip_quoted(value: bytes, i: int) -> int:
    match = _QUOTED.match(value, i)
    assert match is not None  # value[i] is '"'
    return match.end()


def _skip_to_semicolon(value: bytes, i: int, n: int) -> int:
    """Index of the next ";" that is not inside a quoted string or a comment (or *n*)."""
    while i < n:
        c = value[i]
        if c == 59:
            break
        if c == 34:
            i = _skip_quoted(value, i)
        elif c == 40:
            i = _skip_comment(value, i, n)
        else:
            i += 1
    return i


def _token_end(value: bytes, i: int, n: int) -> int:
    while i < n and value[i] not in _TOKEN_ENDS:
        i += 1
    return i


def _parse_content_type(value: bytes) -> tuple[str | None, dict[str, str]]:
    """(lower-case "type/subtype" or None when invalid, parameters)."""
    n = len(value)
    i = _skip_cfws(value, 0, n)
    start = i
    i = _token_end(value, i, n)
    maintype = value[start:i]
    subtype = b""
    i = _skip_cfws(value, i, n)
    if i < n and value[i] == 47:  # "/"
        i = _skip_cfws(value, i + 1, n)
        start = i
        i = _token_end(value, i, n)
        subtype = value[start:i]
    ctype = None
    if maintype and subtype:
        ctype = (maintype.lower() + b"/" + subtype.lower()).decode("utf-8", "replace")
    # Anything between the subtype and the first ";" is ignored.
    i = _skip_to_semicolon(value, i, n)
    raw: list[tuple[bytes, bytes]] = []
    while i < n:
        i = _skip_cfws(value, i + 1, n)
        start = i
        while i < n and value[i] not in _NAME_ENDS:
            i += 1
        name = value[start:i]
        i = _skip_cfws(value, i, n)
        if name and i < n and value[i] == 61:  # "="
            i = _skip_cfws(value, i + 1, n)
            if i < n and value[i] == 34:
                match = _QUOTED.match(value, i)
                assert match is not None
                raw.append((name.lower(), _QUOTED_PAIR.sub(rb"\1", match.group(1))))
                i = match.end()
            else:
                start = i
                while i < n and value[i] not in _VALUE_ENDS:
                    i += 1
                raw.append((name.lower(), value[start:i]))
        i = _skip_to_semicolon(value, i, n)
    return ctype, _resolve_params(raw)


def _resolve_params(raw: list[tuple[bytes, bytes]]) -> dict[str, str]:
    """Parameter values by name: first occurrence wins, RFC 2231 sections joined and decoded."""
    params: dict[str, str] = {}
    if not any(b"*" in name for name, _ in raw):
        for name, value in raw:
            key = name.decode("utf-8", "replace")
            if key not in params:
                params[key] = value.decode("utf-8", "replace")
        return params
    # name -> [(section or None, extended, value)], in order of first appearance
    groups: dict[bytes, list[tuple[int | None, bool, bytes]]] = {}
    for name, value in raw:
        match = _SECTIONED.fullmatch(name)
        if match is None:
            groups.setdefault(name, []).append((None, False, value))
        elif match.group(2) is None:
            groups.setdefault(match.group(1), []).append((None, True, value))
        else:
            number = int(match.group(2))
            groups.setdefault(match.group(1), []).append((number, bool(match.group(3)), value))
    for base, entries in groups.items():
        first_section, extended, value = entries[0]
        if first_section is None:
            text = _decode_extended(value) if extended else value.decode("utf-8", "replace")
        else:
            sections: list[tuple[int, bool, bytes]] = []
            for sec, ext, val in entries:
                if sec is not None:
                    sections.append((sec, ext, val))
            sections.sort(key=lambda entry: entry[0])  # stable: equal sections keep their order
            pieces: list[str] = []
            charset: bytes | None = None
            last = -1
            for index, (number, extended, value) in enumerate(sections):
                if number == last:
                    continue  # a repeated section: the first one wins
                last = number
                if not extended:
                    pieces.append(value.decode("ascii", "surrogateescape"))
                    continue
                if index == 0:
                    charset, value = _split_charset(value)
                pieces.append(_decode_bytes(_unpercent(value), charset))
            text = _sanitize("".join(pieces))
        params[base.decode("utf-8", "replace")] = text
    return params


def _split_charset(value: bytes) -> tuple[bytes | None, bytes]:
    """Split RFC 2231 ``charset'language'text``; no charset when the two quotes are missing."""
    if value.count(b"'") < 2:
        return None, value
    charset, _language, text = value.split(b"'", 2)
    return charset, text


def _unpercent(value: bytes) -> bytes:
    if b"%" not in value:
        return value
    return _PERCENT.sub(lambda m: bytes((int(m.group(1), 16),)), value)


def _decode_bytes(data: bytes, charset: bytes | None) -> str:
    """Decode with *charset* when Python knows it; undecodable bytes stay surrogate-escaped."""
    if charset is not None:
        try:
            return data.decode(charset.decode("ascii"), "surrogateescape")
        except Exception:  # unknown or unusable codec: fall back as email does
            pass
    return data.decode("ascii", "surrogateescape")


def _sanitize(text: str) -> str:
    """Escaped bytes become UTF-8 where they form it, U+FFFD elsewhere (as email does)."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _decode_extended(value: bytes) -> str:
    charset, text = _split_charset(value)
    return _sanitize(_decode_bytes(_unpercent(text), charset))


def content_type_params(value: Buffer) -> tuple[str, dict[str, str]]:
    """Parse a Content-Type value: (lower-case "type/subtype", {lower-case name: value}).

    An invalid type gives ``"text/plain"`` (RFC 2045 §5.2); its parameters are still read.
    Comments are skipped, quoted strings unquoted, text between the subtype and the first
    ";" ignored.  A bare value ends at white space, ";", "(" or '"' (so ``=`` and ``/`` may
    appear in it); a quoted one that is not closed runs to the end.  The first occurrence of a
    name wins.  RFC 2231 sections (``name*0``, ``name*1*``) are joined in section order and
    ``charset'lang'%XX`` values decoded with that charset when Python knows it, otherwise as
    UTF-8; undecodable bytes become U+FFFD, as do invalid UTF-8 bytes in plain values.
    RFC 2047 encoded words are not decoded.
    """
    ctype, params = _parse_content_type(bytes(value))
    return ctype or "text/plain", params


def _transfer_encoding(value: bytes | None) -> str:
    """The Content-Transfer-Encoding mechanism token, lower-case; "7bit" when absent/empty."""
    if value is None:
        return "7bit"
    n = len(value)
    i = _skip_cfws(value, 0, n)
    token = value[i : _token_end(value, i, n)]
    return token.lower().decode("utf-8", "replace") if token else "7bit"


# ---------------------------------------------------------------------------------------------
# The scanner


class _Frame:
    """A part being scanned, with what the scanner needs to know about it."""

    __slots__ = ("digest_child", "key", "mode", "part")

    def __init__(self, part: Part, digest_child: bool) -> None:
        self.part = part
        self.mode = _HEADERS
        self.key: bytes | None = None  # boundary bytes while this multipart listens for them
        self.digest_child = digest_child


class _Scanner:
    def __init__(self, data: bytes, max_depth: int) -> None:
        self.data = data
        self.n = len(data)
        self.max_depth = max_depth
        self.stack: list[_Frame] = []
        # boundary -> stack index of the outermost multipart listening for it
        self.listening: dict[bytes, int] = {}

    def run(self) -> Part:
        data = self.data
        n = self.n
        root = Part(0, 0)
        stack = self.stack
        stack.append(_Frame(root, False))
        pos = 0
        while pos < n:
            frame = stack[-1]
            if frame.mode == _HEADERS:
                nl = data.find(b"\n", pos)
                line_end = n if nl < 0 else nl
                following = n if nl < 0 else nl + 1
                if self.listening and data.startswith(b"--", pos):
                    index, close = self._claimer(pos, line_end)
                    if index >= 0:
                        pos = self._boundary_line(index, close, pos, following)
                        continue
                if line_end > pos and data[line_end - 1] == _CR:
                    line_end -= 1
                if line_end == pos:  # the blank line ending the header block
                    frame.part.body_start = following
                    pos = self._begin_body(frame, following)
                    continue
                first = data[pos]
                if (
                    first == 32
                    or first == 9
                    or data.startswith(b"From ", pos)
                    or _FIELD_NAME.match(data, pos, line_end)
                ):
                    pos = following
                    continue
                # Neither a field nor a continuation: the body starts with this line.
                frame.part.body_start = pos
                frame.part.defects.append("missing blank line after headers")
                pos = self._begin_body(frame, pos)
                continue
            # In a body only a boundary line of an enclosing multipart matters.
            if not self.listening:
                break
            if data.startswith(b"--", pos):
                line = pos
            else:
                found = data.find(b"\n--", pos)
                if found < 0:
                    break
                line = found + 1
            nl = data.find(b"\n", line)
            line_end = n if nl < 0 else nl
            following = n if nl < 0 else nl + 1
            index, close = self._claimer(line, line_end)
            pos = following if index < 0 else self._boundary_line(index, close, line, following)
        self._close_all()
        return root

    def _claimer(self, line: int, line_end: int) -> tuple[int, bool]:
        """(stack index of the multipart whose boundary line this is or -1, is a close line)."""
        data = self.data
        end = line_end
        if end > line and data[end - 1] == _CR:
            end -= 1
        while end > line + 2 and data[end - 1] in (32, 9):
            end -= 1
        key = data[line + 2 : end]
        listening = self.listening
        index = listening.get(key, -1)
        close = False
        if key.endswith(b"--"):
            outer = listening.get(key[:-2], -1)
            # An outer multipart's boundary wins, as in email.feedparser.
            if outer >= 0 and (index < 0 or outer < index):
                index, close = outer, True
        return index, close

    def _boundary_line(self, index: int, close: bool, line: int, following: int) -> int:
        """Handle a boundary line of the multipart at stack[index]; return where to go on."""
        stack = self.stack
        end = line - _eol_before(self.data, line, 0)
        floor = 0
        while len(stack) - 1 > index:
            floor = self._close(stack.pop(), end, floor)
        frame = stack[index]
        if close:
            if frame.mode == _PREAMBLE:
                frame.part.defects.append("start boundary not found")
            self._stop_listening(frame, index)
            frame.mode = _EPILOGUE
            return following
        frame.mode = _PARTS
        # Repeated boundary lines open no empty parts (email.feedparser does the same).
        data = self.data
        n = self.n
        pos = following
        while pos < n and data.startswith(b"--", pos):
            nl = data.find(b"\n", pos)
            line_end = n if nl < 0 else nl
            if self._claimer(pos, line_end)[0] != index:
                break
            pos = n if nl < 0 else nl + 1
        parent = frame.part
        child = Part(pos, parent.depth + 1)
        parent.children.append(child)
        stack.append(_Frame(child, parent.content_type == "multipart/digest"))
        return pos

    def _classify(self, frame: _Frame) -> int:
        """Read the part's header block into its attributes; return the body's mode."""
        part = frame.part
        headers = self.data[part.start : part.body_start]
        value = header_value(headers, b"content-type")
        params: dict[str, str] = {}
        if value is None:
            ctype = "message/rfc822" if frame.digest_child else "text/plain"
        else:
            parsed, params = _parse_content_type(value)
            if parsed is None:
                part.defects.append("invalid content-type")
            ctype = parsed or "text/plain"
        part.content_type = ctype
        charset = params.get("charset")
        part.charset = charset.lower() if charset is not None and charset.isascii() else None
        boundary = params.get("boundary")
        part.boundary = boundary.rstrip() if boundary is not None else None
        cte = _transfer_encoding(header_value(headers, b"content-transfer-encoding"))
        part.transfer_encoding = cte
        if ctype.startswith("multipart/"):
            if part.depth >= self.max_depth:
                part.defects.append("too deep")
            elif part.boundary is None:
                part.defects.append("no boundary")
            else:
                return _PREAMBLE
        elif ctype in ("message/rfc822", "message/global") and cte not in (
            "base64",
            "quoted-printable",
        ):
            if part.depth >= self.max_depth:
                part.defects.append("too deep")
            else:
                return _MESSAGE
        return _LEAF

    def _begin_body(self, frame: _Frame, body_start: int) -> int:
        """The header block has ended: set up the body's mode; return where to go on."""
        mode = self._classify(frame)
        frame.mode = mode
        part = frame.part
        if mode == _PREAMBLE:
            assert part.boundary is not None
            key = part.boundary.encode("utf-8")
            frame.key = key
            if key not in self.listening:  # else an outer multipart's lines shadow ours
                self.listening[key] = len(self.stack) - 1
        elif mode == _MESSAGE:
            child = Part(body_start, part.depth + 1)
            part.children.append(child)
            self.stack.append(_Frame(child, False))
        return body_start

    def _stop_listening(self, frame: _Frame, index: int) -> None:
        if frame.key is not None and self.listening.get(frame.key) == index:
            del self.listening[frame.key]
        frame.key = None

    def _close(self, frame: _Frame, end: int, floor: int) -> int:
        """Close the part on top of the stack at *end* (not before *floor*); return its end."""
        part = frame.part
        end = max(end, floor, part.start)
        if frame.mode == _HEADERS:
            # The part ends inside its header block: no body.
            part.body_start = end
            mode = self._classify(frame)
            if mode == _PREAMBLE:
                part.defects.append("start boundary not found")
            elif mode == _MESSAGE:
                child = Part(end, part.depth + 1)
                child.body_start = child.end = end
                part.children.append(child)
        else:
            end = max(end, part.body_start)
            if frame.mode == _PREAMBLE:
                part.defects.append("start boundary not found")
            elif frame.mode == _PARTS:
                part.defects.append("close boundary not found")
            self._stop_listening(frame, len(self.stack))
        part.end = end
        part.has_8bit = self._own_8bit(part)
        return end

    def _close_all(self) -> None:
        """End of input: close every open part.  Inside a multipart the final line break
        belongs to the (missing) boundary, as email.feedparser has it."""
        stack = self.stack
        n = self.n
        cut = n - _eol_before(self.data, n, 0)
        first_inner = len(stack)
        for index, frame in enumerate(stack):
            if frame.mode == _PARTS:
                first_inner = index + 1
                break
        floor = 0
        while stack:
            end = cut if len(stack) - 1 >= first_inner else n
            floor = self._close(stack.pop(), end, floor)

    def _own_8bit(self, part: Part) -> bool:
        """A byte >= 0x80 in the part outside its children (headers, preamble, epilogue...)."""
        data = self.data
        start = part.start
        for child in part.children:
            if not data[start : child.start].isascii():
                return True
            start = child.end
        return not data[start : part.end].isascii()


def _eol_before(data: bytes, pos: int, floor: int) -> int:
    """Length of the line break (CRLF, LF or CR) just before *pos*, not reaching below *floor*."""
    if pos <= floor:
        return 0
    last = data[pos - 1]
    if last == _LF:
        return 2 if pos - 2 >= floor and data[pos - 2] == _CR else 1
    return 1 if last == _CR else 0


def scan(message: Buffer, max_depth: int = 32) -> Part:
    """The MIME tree of *message* (any bytes-like object); never raises on any content."""
    data = message if isinstance(message, bytes) else bytes(message)
    return _Scanner(data, max(0, operator.index(max_depth))).run()


_TRAILING_BLANKS = re.compile(rb"[\t ]+\r\n")
_BLANK_RUN = re.compile(rb"[\t ]{2,}|\t")


def canonical_body(body: Buffer, relaxed: bool) -> bytes:
    """The DKIM canonical form of *body* (CRLF line ends; see ``mime.canonical_body``)."""
    data = bytes(body)
    if relaxed and (b"\t" in data or b"  " in data or b" \r\n" in data):
        data = _BLANK_RUN.sub(b" ", _TRAILING_BLANKS.sub(b"\r\n", data))
    end = len(data)
    while data.endswith(b"\r\n", 0, end):
        end -= 2
    if relaxed and not end:
        return b""
    return data[:end] + b"\r\n"


# header_fields: a line end not followed by a folded line; a field's first line up to its
# colon, as DKIM reads it (a name of one octet at least: the scanner's _FIELD_NAME differs)
_DKIM_FIELD_START = re.compile(rb"\r\n(?![\t ])")
_DKIM_FIELD_NAME = re.compile(rb"[\x21-\x7e]+?:")
_BLANKS = re.compile(rb"[\t ]+")


def header_fields(text: Buffer) -> list[tuple[bytes, bytes]] | None:
    """The fields of a plain header block (see ``mime.header_fields``)."""
    data = bytes(text)
    if not data or data[0] in (9, 32):
        return None
    if not data.count(b"\r\n") == data.count(b"\n") == data.count(b"\r"):
        return None
    fields = []
    for chunk in _DKIM_FIELD_START.split(data):
        match = _DKIM_FIELD_NAME.match(chunk)
        if match is None:
            return None
        colon = match.end()
        fields.append((chunk[: colon - 1], chunk[colon:] + b"\r\n"))
    return fields


def relaxed_header_value(value: Buffer) -> bytes:
    """A field value in DKIM's relaxed form (see ``mime.relaxed_header_value``)."""
    data = bytes(value).replace(b"\r\n", b"").replace(b"\n", b"")
    return _BLANKS.sub(b" ", data).strip() + b"\r\n"


def dkim_tag_list(value: Buffer) -> dict[bytes, bytes] | None:
    """A DKIM tag=value list as a dict, or None (see ``mime.dkim_tag_list``)."""
    tags: dict[bytes, bytes] = {}
    specs = bytes(value).strip().split(b";")
    if not specs[-1]:
        specs.pop()  # a final ";" is allowed
    for spec in specs:
        name, equals, tag_value = spec.partition(b"=")
        name = name.strip()
        if not equals or not name[:1].isalpha() or name in tags:
            return None
        tags[name] = tag_value.strip()
    return tags


# dkimpy's test of a b= or bh= value (validate_signature_fields)
_DKIM_BASE64 = re.compile(rb"[\s0-9A-Za-z+/]+[\s=]*")


def dkim_plain_base64(value: Buffer) -> bool:
    """Whether *value* is base64 as a DKIM b= or bh= is checked (see
    ``mime.dkim_plain_base64``)."""
    data = bytes(value)
    return bool(_DKIM_BASE64.fullmatch(data)) and len(b"".join(data.split())) % 4 == 0


def dkim_signed_fields(
    fields: list[tuple[bytes, bytes]], lower: list[bytes], names: tuple[bytes, ...], relaxed: bool
) -> bytes:
    """The header fields *names* select, as a DKIM signature hashes them (see
    ``mime.dkim_signed_fields``)."""
    parts: list[bytes] = []
    below: dict[bytes, int] = {}
    for name in names:
        i = below.get(name, len(lower))
        while i > 0:
            i -= 1
            if lower[i] == name:
                field_name, value = fields[i]
                if relaxed:
                    parts += (lower[i], b":", relaxed_header_value(value))
                else:
                    parts += (field_name, b":", value)
                break
        below[name] = i
    return b"".join(parts)


# dkimpy's RE_BTAG (b= and its value), its folding white space written as \s*: the same
# strings, scanned without nested optional groups
_DKIM_BTAG = re.compile(rb"([;\s]b\s*=)(?:[\sa-zA-Z0-9+/=]*[a-zA-Z0-9+/=])?(?:\r?\n\Z)?")


def dkim_empty_b(value: Buffer) -> bytes:
    """A DKIM-Signature field value with its b= value taken out (see
    ``mime.dkim_empty_b``)."""
    return _DKIM_BTAG.sub(_btag_name, bytes(value))


def _btag_name(match: re.Match[bytes]) -> bytes:
    return match[1]


def dkim_plain_signature(value: Buffer, latest: float) -> tuple[bytes, bytes, bytes] | None:
    """A plain DKIM-Signature field value read for its check (see
    ``mime.dkim_plain_signature``)."""
    tags = dkim_tag_list(value)
    if tags is None:
        return None
    b, bh, t = tags.pop(b"b", None), tags.pop(b"bh", None), tags.pop(b"t", None)
    if b is None or bh is None or not dkim_plain_base64(b) or not dkim_plain_base64(bh):
        return None
    if t is not None and not (t.isdigit() and int(t) <= latest):
        return None
    static = b"".join(name + b"=" + text + b";" for name, text in tags.items())
    return static, b"".join(b.split()), b"".join(bh.split())


def dkim_header_input(
    fields: list[tuple[bytes, bytes]],
    lower: list[bytes],
    names: tuple[bytes, ...],
    relaxed: bool,
    field: tuple[bytes, bytes],
) -> bytes:
    """What a DKIM signature's header hash takes in (see ``mime.dkim_header_input``)."""
    name, value = field
    value = dkim_empty_b(value)
    if relaxed:
        name, value = name.lower(), relaxed_header_value(value)
    signed = dkim_signed_fields(fields, lower, names, relaxed)
    return b"".join((signed, name, b":", value.rstrip()))


def header_block(message: Buffer) -> tuple[list[tuple[bytes, bytes]], list[bytes], int] | None:
    """The plain header block of *message* read once (see ``mime.header_block``)."""
    data = bytes(message)
    blank = blank_line(data)
    if blank is None or blank[1] - blank[0] != 3 or data[blank[0] - 1 : blank[0]] != b"\r":
        return None
    fields = header_fields(data[: blank[0] - 1])
    if fields is None:
        return None
    return fields, [name.lower() for name, _value in fields], blank[1]


def blank_line(message: Buffer) -> tuple[int, int] | None:
    """Where the empty line that ends the header block is (see ``mime.blank_line``). Two
    substring searches: a CRLF message's empty line is its first LF CR LF, and an LF LF
    can only come first if it is before that one."""
    data = bytes(message)
    if data[:1] == b"\n":
        return 0, 1
    if data[:2] == b"\r\n":
        return 0, 2
    crlf = data.find(b"\n\r\n")
    lf = data.find(b"\n\n", 0, len(data) if crlf < 0 else crlf + 1)
    if lf >= 0:
        return lf, lf + 2
    if crlf >= 0:
        return crlf, crlf + 3
    return None
