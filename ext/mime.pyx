"""Compiled MIME structure scanner: see tachymail.protocol.mime for the contract.

tachymail.protocol.mime_py is the pure-Python twin and gives the same tree for every input.
The scan reads the message in place (any buffer) once, with an explicit stack of open parts:
header lines one by one with memchr, bodies by jumping with memchr from one line starting with
"--" to the next, and 8-bit detection eight bytes at a time.  Python objects are made per part
and per candidate boundary line, never per byte.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_FromStringAndSize
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.pyport cimport PY_SSIZE_T_MAX
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.stdint cimport uint64_t
from libc.string cimport memchr, memcmp, memcpy, memmove

from mime cimport (
    EPILOGUE,
    HEADERS,
    LEAF,
    MESSAGE,
    PARTS,
    PREAMBLE,
    any_8bit,
    eol_before,
    field_colon,
    find_lf,
    is_field_line,
    lower_ascii,
    read_quoted,
    skip_comment,
)

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

# Byte classes for Content-Type parsing (bit flags in _CLASS; mime.pxd tests the others inline).
cdef enum:
    C_WSP = 1         # white space between tokens: SP HT CR LF
    C_TOKEN_END = 2   # RFC 2045 tspecials and white space
    C_NAME_END = 4    # ends a parameter name
    C_VALUE_END = 8   # ends a bare parameter value

cdef unsigned char _CLASS[256]


cdef void _init_classes() noexcept:
    cdef int c
    for c in range(256):
        _CLASS[c] = 0
    for c in b" \t\r\n":
        _CLASS[c] |= C_WSP | C_TOKEN_END | C_NAME_END | C_VALUE_END
    for c in b'()<>@,;:\\"/[]?=':
        _CLASS[c] |= C_TOKEN_END
    for c in b';=("':
        _CLASS[c] |= C_NAME_END
    for c in b';("':
        _CLASS[c] |= C_VALUE_END


_init_classes()

_SECTIONED = re.compile(rb"([^*]+)\*(?:([0-9]{1,9})(\*?))?")
_PERCENT = re.compile(rb"%([0-9A-Fa-f]{2})")


cdef class Part:
    """One node of the MIME tree; offsets index the scanned message (see the facade)."""

    cdef public Py_ssize_t start
    cdef public Py_ssize_t body_start
    cdef public Py_ssize_t end
    cdef public str content_type
    cdef public str charset
    cdef public str boundary
    cdef public str transfer_encoding
    cdef public bint has_8bit
    cdef public Py_ssize_t depth
    cdef public list children
    cdef public list defects
    # Scanner state, invisible from Python.
    cdef int _mode
    cdef bytes _key
    cdef bint _digest_child

    def __cinit__(self):
        self.content_type = "text/plain"
        self.transfer_encoding = "7bit"
        self.children = []
        self.defects = []
        self._mode = HEADERS

    def __init__(self, Py_ssize_t start=0, Py_ssize_t depth=0):
        self.start = start
        self.body_start = start
        self.end = start
        self.depth = depth

    def header_bytes(self, message):
        """The header block, with the blank line that ends it: ``message[start:body_start]``."""
        return bytes(message[self.start:self.body_start])

    def body_bytes(self, message):
        """The body, still transfer-encoded: ``message[body_start:end]``."""
        return bytes(message[self.body_start:self.end])

    def __repr__(self):
        # Children are counted, not shown: a deep tree must not make repr recurse.
        return (
            f"Part({self.content_type!r}, start={self.start}, body_start={self.body_start}, "
            f"end={self.end}, depth={self.depth}, children={len(self.children)}, "
            f"has_8bit={'True' if self.has_8bit else 'False'}, defects={self.defects!r})"
        )


cdef inline Part _new_part(Py_ssize_t start, Py_ssize_t depth):
    cdef Part part = Part.__new__(Part)
    part.start = start
    part.body_start = start
    part.end = start
    part.depth = depth
    return part


# ---------------------------------------------------------------------------------------------
# Header fields


cdef object _field_value(const unsigned char* h, Py_ssize_t n, const unsigned char* name,
                         Py_ssize_t name_len):
    """header_value() on a raw header block."""
    cdef Py_ssize_t pos = 0, line_end, following, colon, i, value_start = -1, value_end = -1
    cdef Py_ssize_t cur, lf, stop, out_len = 0, a, b
    cdef unsigned char first
    cdef unsigned char* out
    while pos < n:
        lf = find_lf(h, pos, n)
        following = n if lf == n else lf + 1
        line_end = lf
        if line_end > pos and h[line_end - 1] == 13:
            line_end -= 1
        if line_end == pos:
            break
        first = h[pos]
        if first == 32 or first == 9:
            if value_start >= 0:
                value_end = line_end
            pos = following
            continue
        if value_start >= 0:
            break
        if not (line_end - pos >= 5 and memcmp(h + pos, b"From ", 5) == 0):
            colon = field_colon(h, pos, line_end)
            if colon < 0:
                break
            if colon - pos == name_len and name_len > 0:
                i = 0
                while i < name_len and lower_ascii(h[pos + i]) == lower_ascii(name[i]):
                    i += 1
                if i == name_len:
                    value_start = colon + 1
                    value_end = line_end
        pos = following
    if value_start < 0:
        return None
    # Unfold: copy the lines of the field without their line breaks, then strip.
    out = <unsigned char*>PyMem_Malloc(<size_t>(value_end - value_start + 1))
    if out == NULL:
        raise MemoryError()
    try:
        cur = value_start
        while True:
            lf = find_lf(h, cur, value_end)
            if lf == value_end:
                memcpy(out + out_len, h + cur, <size_t>(value_end - cur))
                out_len += value_end - cur
                break
            stop = lf
            if stop > cur and h[stop - 1] == 13:
                stop -= 1
            memcpy(out + out_len, h + cur, <size_t>(stop - cur))
            out_len += stop - cur
            cur = lf + 1
        a = 0
        b = out_len
        while a < b and (out[a] == 32 or out[a] == 9 or out[a] == 13):
            a += 1
        while b > a and (out[b - 1] == 32 or out[b - 1] == 9 or out[b - 1] == 13):
            b -= 1
        return PyBytes_FromStringAndSize(<char*>out + a, b - a)
    finally:
        PyMem_Free(out)


def header_value(headers, name):
    """The first *name* field of the header block *headers*, unfolded and stripped, or None.

    *name* is matched case-insensitively.  Reading stops at the end of the header block: a blank
    line, or a line that is neither a field (``name:``), a continuation (leading space or tab)
    nor an mbox ``From `` line.  Unfolding drops the line breaks (CRLF or LF) and keeps the
    white space after them; leading and trailing spaces, tabs and CRs are stripped.
    """
    cdef Py_buffer hbuf
    cdef Py_buffer nbuf
    PyObject_GetBuffer(headers, &hbuf, PyBUF_SIMPLE)
    try:
        PyObject_GetBuffer(name, &nbuf, PyBUF_SIMPLE)
        try:
            return _field_value(<const unsigned char*>hbuf.buf, hbuf.len,
                                <const unsigned char*>nbuf.buf, nbuf.len)
        finally:
            PyBuffer_Release(&nbuf)
    finally:
        PyBuffer_Release(&hbuf)


# ---------------------------------------------------------------------------------------------
# Content-Type and its parameters


cdef inline Py_ssize_t _skip_cfws(const unsigned char* v, Py_ssize_t i, Py_ssize_t n) noexcept nogil:
    """Index of the first byte at or after *i* that is neither white space nor in a comment."""
    while i < n:
        if _CLASS[v[i]] & C_WSP:
            i += 1
        elif v[i] == 40:
            i = skip_comment(v, i, n)
        else:
            break
    return i


cdef inline Py_ssize_t _skip_to_semicolon(const unsigned char* v, Py_ssize_t i, Py_ssize_t n) noexcept nogil:
    """Index of the next ";" that is not inside a quoted string or a comment (or *n*)."""
    while i < n:
        if v[i] == 59:
            break
        if v[i] == 34:
            i = read_quoted(v, i, n, NULL, NULL)
        elif v[i] == 40:
            i = skip_comment(v, i, n)
        else:
            i += 1
    return i


cdef inline Py_ssize_t _token_end(const unsigned char* v, Py_ssize_t i, Py_ssize_t n) noexcept nogil:
    while i < n and not (_CLASS[v[i]] & C_TOKEN_END):
        i += 1
    return i


cdef bytes _lower_bytes(const unsigned char* v, Py_ssize_t start, Py_ssize_t end):
    cdef bytes result = PyBytes_FromStringAndSize(NULL, end - start)
    cdef unsigned char* out = <unsigned char*><char*>result
    cdef Py_ssize_t i
    for i in range(end - start):
        out[i] = lower_ascii(v[start + i])
    return result


cdef tuple _parse_content_type(const unsigned char* v, Py_ssize_t n):
    """(lower-case "type/subtype" or None when invalid, parameters)."""
    cdef Py_ssize_t i, start, main_start, main_end, sub_start = 0, sub_end = 0, name_end, k
    cdef bint starred = False
    cdef object ctype = None
    cdef list raw = []
    cdef bytes name, value, joined
    cdef unsigned char* scratch = NULL
    cdef unsigned char* out
    i = _skip_cfws(v, 0, n)
    main_start = i
    i = _token_end(v, i, n)
    main_end = i
    i = _skip_cfws(v, i, n)
    if i < n and v[i] == 47:
        i = _skip_cfws(v, i + 1, n)
        sub_start = i
        i = _token_end(v, i, n)
        sub_end = i
    if main_end > main_start and sub_end > sub_start:
        joined = PyBytes_FromStringAndSize(NULL, main_end - main_start + 1 + sub_end - sub_start)
        out = <unsigned char*><char*>joined
        k = 0
        for start in range(main_start, main_end):
            out[k] = lower_ascii(v[start])
            k += 1
        out[k] = 47
        k += 1
        for start in range(sub_start, sub_end):
            out[k] = lower_ascii(v[start])
            k += 1
        ctype = PyUnicode_DecodeUTF8(<char*>out, k, "replace")
    # Anything between the subtype and the first ";" is ignored.
    i = _skip_to_semicolon(v, i, n)
    try:
        while i < n:
            i = _skip_cfws(v, i + 1, n)
            start = i
            while i < n and not (_CLASS[v[i]] & C_NAME_END):
                i += 1
            name_end = i
            i = _skip_cfws(v, i, n)
            if name_end > start and i < n and v[i] == 61:
                name = _lower_bytes(v, start, name_end)
                if memchr(v + start, 42, <size_t>(name_end - start)) != NULL:
                    starred = True
                i = _skip_cfws(v, i + 1, n)
                if i < n and v[i] == 34:
                    if scratch == NULL:
                        scratch = <unsigned char*>PyMem_Malloc(<size_t>n)
                        if scratch == NULL:
                            raise MemoryError()
                    i = read_quoted(v, i, n, scratch, &k)
                    value = PyBytes_FromStringAndSize(<char*>scratch, k)
                else:
                    start = i
                    while i < n and not (_CLASS[v[i]] & C_VALUE_END):
                        i += 1
                    value = PyBytes_FromStringAndSize(<char*>v + start, i - start)
                raw.append((name, value))
            i = _skip_to_semicolon(v, i, n)
    finally:
        PyMem_Free(scratch)
    return ctype, _resolve_params(raw, starred)


cdef dict _resolve_params(list raw, bint starred):
    """Parameter values by name: first occurrence wins, RFC 2231 sections joined and decoded."""
    cdef dict params = {}
    cdef dict groups
    cdef list entries, sections, pieces
    cdef bytes name, value, base
    cdef object charset, match, text, key
    cdef Py_ssize_t position, last, number
    if not starred:
        for name, value in raw:
            key = name.decode("utf-8", "replace")
            if key not in params:
                params[key] = value.decode("utf-8", "replace")
        return params
    # name -> [(section or None, extended, value)], in order of first appearance
    groups = {}
    for name, value in raw:
        match = _SECTIONED.fullmatch(name)
        if match is None:
            groups.setdefault(name, []).append((None, False, value))
        elif match.group(2) is None:
            groups.setdefault(match.group(1), []).append((None, True, value))
        else:
            groups.setdefault(match.group(1), []).append(
                (int(match.group(2)), bool(match.group(3)), value))
    for base, entries in groups.items():
        section, extended, value = entries[0]
        if section is None:
            if extended:
                charset, value = _split_charset(value)
                text = _sanitize(_decode_bytes(_unpercent(value), charset))
            else:
                text = value.decode("utf-8", "replace")
        else:
            sections = [entry for entry in entries if entry[0] is not None]
            sections.sort(key=_section_number)  # stable: equal sections keep their order
            pieces = []
            charset = None
            last = -1
            for position in range(len(sections)):
                section, extended, value = sections[position]
                number = section
                if number == last:
                    continue  # a repeated section: the first one wins
                last = number
                if not extended:
                    pieces.append(value.decode("ascii", "surrogateescape"))
                    continue
                if position == 0:
                    charset, value = _split_charset(value)
                pieces.append(_decode_bytes(_unpercent(value), charset))
            text = _sanitize("".join(pieces))
        params[base.decode("utf-8", "replace")] = text
    return params


def _section_number(entry):
    return entry[0]


cdef tuple _split_charset(bytes value):
    """Split RFC 2231 ``charset'language'text``; no charset when the two quotes are missing."""
    if value.count(b"'") < 2:
        return None, value
    charset, _language, text = value.split(b"'", 2)
    return charset, text


def _percent_byte(match):
    return bytes((int(match.group(1), 16),))


cdef bytes _unpercent(bytes value):
    if b"%" not in value:
        return value
    return _PERCENT.sub(_percent_byte, value)


cdef str _decode_bytes(bytes data, object charset):
    """Decode with *charset* when Python knows it; undecodable bytes stay surrogate-escaped."""
    if charset is not None:
        try:
            return data.decode(charset.decode("ascii"), "surrogateescape")
        except Exception:  # unknown or unusable codec: fall back as email does
            pass
    return data.decode("ascii", "surrogateescape")


cdef str _sanitize(str text):
    """Escaped bytes become UTF-8 where they form it, U+FFFD elsewhere (as email does)."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def content_type_params(value):
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
    cdef Py_buffer buf
    PyObject_GetBuffer(value, &buf, PyBUF_SIMPLE)
    try:
        ctype, params = _parse_content_type(<const unsigned char*>buf.buf, buf.len)
    finally:
        PyBuffer_Release(&buf)
    return (ctype or "text/plain"), params


cdef str _transfer_encoding(bytes value):
    """The Content-Transfer-Encoding mechanism token, lower-case; "7bit" when absent/empty."""
    cdef const unsigned char* v
    cdef Py_ssize_t n, i, end
    if value is None:
        return "7bit"
    v = <const unsigned char*><char*>value
    n = len(value)
    i = _skip_cfws(v, 0, n)
    end = _token_end(v, i, n)
    if end == i:
        return "7bit"
    return _lower_bytes(v, i, end).decode("utf-8", "replace")


# ---------------------------------------------------------------------------------------------
# The scanner


cdef inline Py_ssize_t _bucket(Py_ssize_t length) noexcept nogil:
    return length if length < 255 else 255


cdef class _Scanner:
    """One scan: the message buffer, the stack of open parts and the listened-for boundaries."""

    cdef const unsigned char* data
    cdef Py_ssize_t n
    cdef Py_ssize_t max_depth
    cdef list stack
    # boundary -> stack index of the outermost multipart listening for it
    cdef dict listening
    # How many listened-for boundaries have each length (the last bucket: that length or more).
    cdef Py_ssize_t lengths[256]

    def __cinit__(self):
        cdef int i
        self.stack = []
        self.listening = {}
        for i in range(256):
            self.lengths[i] = 0

    cdef Part run(self):
        cdef const unsigned char* data = self.data
        cdef Py_ssize_t n = self.n
        cdef Py_ssize_t pos = 0, line_end, following, index, line, i
        cdef bint close = False
        cdef const void* hit
        cdef Part part
        cdef Part root = _new_part(0, 0)
        self.stack.append(root)
        part = root
        while pos < n:
            if part._mode == HEADERS:
                line_end = find_lf(data, pos, n)
                following = n if line_end == n else line_end + 1
                if self.listening and pos + 1 < n and data[pos] == 45 and data[pos + 1] == 45:
                    index = self._claimer(pos, line_end, &close)
                    if index >= 0:
                        pos = self._boundary_line(index, close, pos, following)
                        part = self._top()
                        continue
                if line_end > pos and data[line_end - 1] == 13:
                    line_end -= 1
                if line_end == pos:  # the blank line ending the header block
                    part.body_start = following
                    pos = self._begin_body(part, following)
                    part = self._top()
                    continue
                if data[pos] == 32 or data[pos] == 9 or is_field_line(data, pos, line_end):
                    pos = following
                    continue
                # Neither a field nor a continuation: the body starts with this line.
                part.body_start = pos
                part.defects.append("missing blank line after headers")
                pos = self._begin_body(part, pos)
                part = self._top()
                continue
            # In a body only a boundary line of an enclosing multipart matters.
            if not self.listening:
                break
            # The next line starting with "--": memchr for "-", then look around it.
            if pos + 1 < n and data[pos] == 45 and data[pos + 1] == 45:
                line = pos
            else:
                line = -1
                i = pos + 1
                while i < n:
                    hit = memchr(data + i, 45, <size_t>(n - i))
                    if hit == NULL:
                        break
                    i = <const unsigned char*>hit - data
                    if data[i - 1] == 10 and i + 1 < n and data[i + 1] == 45:
                        line = i
                        break
                    i += 1
                if line < 0:
                    break
            line_end = find_lf(data, line, n)
            following = n if line_end == n else line_end + 1
            index = self._claimer(line, line_end, &close)
            if index < 0:
                pos = following
            else:
                pos = self._boundary_line(index, close, line, following)
                part = self._top()
        self._close_all()
        return root

    cdef inline Part _top(self):
        """The innermost open part; run() asks again after every call that may push or pop."""
        return <Part>PyList_GET_ITEM(self.stack, PyList_GET_SIZE(self.stack) - 1)

    cdef Py_ssize_t _claimer(self, Py_ssize_t line, Py_ssize_t line_end, bint* close) except -2:
        """Stack index of the multipart whose boundary line this is, or -1; sets *close*."""
        cdef const unsigned char* data = self.data
        cdef Py_ssize_t end = line_end, length, index = -1, outer = -1
        cdef object found
        close[0] = False
        if end > line and data[end - 1] == 13:
            end -= 1
        while end > line + 2 and (data[end - 1] == 32 or data[end - 1] == 9):
            end -= 1
        length = end - line - 2
        # Lengths first: most lines starting with "--" cannot be a listened-for boundary.
        if self.lengths[_bucket(length)]:
            found = self.listening.get(PyBytes_FromStringAndSize(<char*>data + line + 2, length))
            if found is not None:
                index = found
        if length >= 2 and data[end - 1] == 45 and data[end - 2] == 45 \
                and self.lengths[_bucket(length - 2)]:
            found = self.listening.get(
                PyBytes_FromStringAndSize(<char*>data + line + 2, length - 2))
            if found is not None:
                outer = found
                # An outer multipart's boundary wins, as in email.feedparser.
                if index < 0 or outer < index:
                    index = outer
                    close[0] = True
        return index

    cdef Py_ssize_t _boundary_line(self, Py_ssize_t index, bint close, Py_ssize_t line,
                                   Py_ssize_t following) except -1:
        """Handle a boundary line of the multipart at stack[index]; return where to go on."""
        cdef const unsigned char* data = self.data
        cdef Py_ssize_t n = self.n
        cdef Py_ssize_t end = line - eol_before(data, line), floor = 0, pos, line_end
        cdef bint dummy = False
        cdef Part parent, child
        while len(self.stack) - 1 > index:
            floor = self._close(<Part>self.stack.pop(), end, floor)
        parent = <Part>self.stack[index]
        if close:
            if parent._mode == PREAMBLE:
                parent.defects.append("start boundary not found")
            self._stop_listening(parent, index)
            parent._mode = EPILOGUE
            return following
        parent._mode = PARTS
        # Repeated boundary lines open no empty parts (email.feedparser does the same).
        pos = following
        while pos + 1 < n and data[pos] == 45 and data[pos + 1] == 45:
            line_end = find_lf(data, pos, n)
            if self._claimer(pos, line_end, &dummy) != index:
                break
            pos = n if line_end == n else line_end + 1
        child = _new_part(pos, parent.depth + 1)
        child._digest_child = parent.content_type == "multipart/digest"
        parent.children.append(child)
        self.stack.append(child)
        return pos

    cdef int _classify(self, Part part) except -1:
        """Read the part's header block into its attributes; return the body's mode."""
        cdef Py_ssize_t start = part.start
        cdef Py_ssize_t length = part.body_start - start
        cdef const unsigned char* headers = self.data + start
        cdef object value, parsed, charset, boundary
        cdef dict params
        cdef str ctype, cte
        value = _field_value(headers, length, b"content-type", 12)
        if value is None:
            ctype = "message/rfc822" if part._digest_child else "text/plain"
            params = {}
        else:
            parsed, params = _parse_content_type(<const unsigned char*><char*>value,
                                                 len(<bytes>value))
            if parsed is None:
                part.defects.append("invalid content-type")
                ctype = "text/plain"
            else:
                ctype = parsed
        part.content_type = ctype
        charset = params.get("charset")
        part.charset = charset.lower() if charset is not None and charset.isascii() else None
        boundary = params.get("boundary")
        part.boundary = boundary.rstrip() if boundary is not None else None
        cte = _transfer_encoding(
            _field_value(headers, length, b"content-transfer-encoding", 25))
        part.transfer_encoding = cte
        if ctype.startswith("multipart/"):
            if part.depth >= self.max_depth:
                part.defects.append("too deep")
            elif part.boundary is None:
                part.defects.append("no boundary")
            else:
                return PREAMBLE
        elif (ctype == "message/rfc822" or ctype == "message/global") \
                and cte != "base64" and cte != "quoted-printable":
            if part.depth >= self.max_depth:
                part.defects.append("too deep")
            else:
                return MESSAGE
        return LEAF

    cdef Py_ssize_t _begin_body(self, Part part, Py_ssize_t body_start) except -1:
        """The header block has ended: set up the body's mode; return where to go on."""
        cdef int mode = self._classify(part)
        cdef bytes key
        cdef Part child
        part._mode = mode
        if mode == PREAMBLE:
            key = part.boundary.encode("utf-8")
            part._key = key
            if key not in self.listening:  # else an outer multipart's lines shadow ours
                self.listening[key] = len(self.stack) - 1
                self.lengths[_bucket(len(key))] += 1
        elif mode == MESSAGE:
            child = _new_part(body_start, part.depth + 1)
            part.children.append(child)
            self.stack.append(child)
        return body_start

    cdef int _stop_listening(self, Part part, Py_ssize_t index) except -1:
        cdef object found
        if part._key is not None:
            found = self.listening.get(part._key)
            if found is not None and <Py_ssize_t>found == index:
                del self.listening[part._key]
                self.lengths[_bucket(len(part._key))] -= 1
        part._key = None
        return 0

    cdef Py_ssize_t _close(self, Part part, Py_ssize_t end, Py_ssize_t floor) except -1:
        """Close the part just popped off the stack at *end* (not before *floor*)."""
        cdef int mode
        cdef Part child
        if floor > end:
            end = floor
        if part.start > end:
            end = part.start
        if part._mode == HEADERS:
            # The part ends inside its header block: no body.
            part.body_start = end
            mode = self._classify(part)
            if mode == PREAMBLE:
                part.defects.append("start boundary not found")
            elif mode == MESSAGE:
                child = _new_part(end, part.depth + 1)
                part.children.append(child)
        else:
            if part.body_start > end:
                end = part.body_start
            if part._mode == PREAMBLE:
                part.defects.append("start boundary not found")
            elif part._mode == PARTS:
                part.defects.append("close boundary not found")
            self._stop_listening(part, len(self.stack))
        part.end = end
        part.has_8bit = self._own_8bit(part)
        return end

    cdef int _close_all(self) except -1:
        """End of input: close every open part.  Inside a multipart the final line break
        belongs to the (missing) boundary, as email.feedparser has it."""
        cdef Py_ssize_t n = self.n
        cdef Py_ssize_t cut = n - eol_before(self.data, n)
        cdef Py_ssize_t first_inner = len(self.stack), index, floor = 0
        for index in range(len(self.stack)):
            if (<Part>self.stack[index])._mode == PARTS:
                first_inner = index + 1
                break
        while self.stack:
            index = len(self.stack) - 1
            floor = self._close(<Part>self.stack.pop(), cut if index >= first_inner else n, floor)
        return 0

    cdef bint _own_8bit(self, Part part) noexcept:
        """A byte >= 0x80 in the part outside its children (headers, preamble, epilogue...)."""
        cdef Py_ssize_t start = part.start
        cdef Part child
        for child in part.children:
            if child.start > start and any_8bit(self.data, start, child.start):
                return True
            start = child.end
        return part.end > start and any_8bit(self.data, start, part.end)


def scan(message, max_depth=32):
    """The MIME tree of *message* (any bytes-like object, read in place); never raises on any
    content."""
    cdef Py_buffer buf
    cdef _Scanner scanner
    # Any integer: negative means 0, beyond the message's length it cannot matter.
    max_depth = min(max(0, operator.index(max_depth)), PY_SSIZE_T_MAX)
    PyObject_GetBuffer(message, &buf, PyBUF_SIMPLE)
    try:
        scanner = _Scanner.__new__(_Scanner)
        scanner.data = <const unsigned char*>buf.buf
        scanner.n = buf.len
        scanner.max_depth = max_depth
        return scanner.run()
    finally:
        PyBuffer_Release(&buf)


cdef inline uint64_t _zero_bytes(uint64_t x) noexcept nogil:
    """The high bit of each byte of *x* that is zero, exactly (no false positives)."""
    cdef uint64_t low7 = 0x7F7F7F7F7F7F7F7FULL
    return ~(((x & low7) + low7) | x | low7)


cdef extern from *:
    """
    /* Sixteen octets at a time, with the compiler's vector extension (SSE2 on x86-64,
       NEON on arm64); elsewhere every block is a candidate and the word loop decides. */
    #if defined(__GNUC__) || defined(__clang__)
    typedef unsigned char tm_u8x16 __attribute__((vector_size(16)));
    /* Whether relaxing may change something at p[0..15]: a tab, or a space followed by a
       space, a tab or a CR (p[1..16] is read too). */
    static inline int tm_relax_candidates16(const unsigned char *p) {
        const tm_u8x16 sp = {32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32};
        const tm_u8x16 ht = {9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9};
        const tm_u8x16 cr = {13, 13, 13, 13, 13, 13, 13, 13, 13, 13, 13, 13, 13, 13, 13, 13};
        tm_u8x16 w, a, m;
        uint64_t lo, hi;
        memcpy(&w, p, 16);
        memcpy(&a, p + 1, 16);
        m = (tm_u8x16)((w == ht) | ((w == sp) & ((a == sp) | (a == ht) | (a == cr))));
        memcpy(&lo, &m, 8);
        memcpy(&hi, (const unsigned char *)&m + 8, 8);
        return (lo | hi) != 0;
    }
    #define TM_VECTOR_SCAN 1
    #else
    static inline int tm_relax_candidates16(const unsigned char *p) { (void)p; return 1; }
    #define TM_VECTOR_SCAN 0
    #endif

    /* Thirty-two octets at a time where the CPU has AVX2 (asked once, at run time: the
       module is built for any x86-64): the same test as tm_relax_candidates16, for the
       64 KiB bodies whose scan is a tenth of their DKIM check. */
    #if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
    typedef unsigned char tm_u8x32 __attribute__((vector_size(32)));
    /* From i on, the start of the first 32-octet block that may change something, or the
       first i past which fewer than 33 octets are left (p[32] is read too). */
    __attribute__((target("avx2")))
    static Py_ssize_t tm_relax_skip32(const unsigned char *d, Py_ssize_t i, Py_ssize_t n) {
        const tm_u8x32 zero = {0};
        const tm_u8x32 sp = zero + 32, ht = zero + 9, cr = zero + 13;
        tm_u8x32 w, a, m;
        uint64_t q[4];
        for (; i + 33 <= n; i += 32) {
            memcpy(&w, d + i, 32);
            memcpy(&a, d + i + 1, 32);
            m = (tm_u8x32)((w == ht) | ((w == sp) & ((a == sp) | (a == ht) | (a == cr))));
            memcpy(q, &m, 32);
            if (q[0] | q[1] | q[2] | q[3])
                break;
        }
        return i;
    }
    static int tm_avx2_known = 0, tm_avx2_has = 0;
    static inline int tm_avx2(void) {
        if (!tm_avx2_known) {
            __builtin_cpu_init();
            tm_avx2_has = __builtin_cpu_supports("avx2") != 0;
            tm_avx2_known = 1;
        }
        return tm_avx2_has;
    }
    #else
    static Py_ssize_t tm_relax_skip32(const unsigned char *d, Py_ssize_t i, Py_ssize_t n) {
        (void)d; (void)n; return i;
    }
    static inline int tm_avx2(void) { return 0; }
    #endif
    """
    bint tm_relax_candidates16(const unsigned char* p) noexcept nogil
    const bint TM_VECTOR_SCAN
    Py_ssize_t tm_relax_skip32(const unsigned char* d, Py_ssize_t i, Py_ssize_t n) noexcept nogil
    bint tm_avx2() noexcept nogil


cdef Py_ssize_t _next_change(const unsigned char* d, Py_ssize_t i, Py_ssize_t n) noexcept nogil:
    """The first position from *i* on where relaxed body canonicalization changes something
    in d[0:n] (``_changes_at``: a tab, a space followed by a space or tab, a space before
    CRLF), or *n*: always the first blank of a run.  Thirty-two octets at a time where the
    CPU has AVX2, sixteen where the compiler has vectors, then eight: the spaces of one
    word against the blanks and CRs of the word one octet on."""
    cdef uint64_t w, after, spaces, blanks_after, mask
    cdef uint64_t SP = 0x2020202020202020ULL
    cdef uint64_t HT = 0x0909090909090909ULL
    cdef uint64_t CR = 0x0D0D0D0D0D0D0D0DULL
    cdef Py_ssize_t k
    if tm_avx2():
        while True:
            i = tm_relax_skip32(d, i, n)
            if i + 33 > n:
                break
            for k in range(i, i + 32):
                if _changes_at(d, k, n):
                    return k
            i += 32
    if TM_VECTOR_SCAN:
        while i + 17 <= n:
            if tm_relax_candidates16(d + i):
                for k in range(i, i + 16):
                    if _changes_at(d, k, n):
                        return k
            i += 16
    while i + 9 <= n:
        memcpy(&w, d + i, 8)
        memcpy(&after, d + i + 1, 8)
        spaces = _zero_bytes(w ^ SP)
        blanks_after = _zero_bytes(after ^ SP) | _zero_bytes(after ^ HT) | _zero_bytes(after ^ CR)
        mask = _zero_bytes(w ^ HT) | (spaces & blanks_after)
        if mask:
            for k in range(i, i + 8):  # a CR after a space matters only before an LF
                if _changes_at(d, k, n):
                    return k
        i += 8
    while i < n:
        if _changes_at(d, i, n):
            return i
        i += 1
    return n


cdef inline bint _changes_at(const unsigned char* d, Py_ssize_t i, Py_ssize_t n) noexcept nogil:
    if d[i] == 9:
        return True
    if d[i] != 32 or i + 1 >= n:
        return False
    if d[i + 1] == 32 or d[i + 1] == 9:
        return True
    return d[i + 1] == 13 and i + 2 < n and d[i + 2] == 10


def canonical_body(body, relaxed):
    """The DKIM canonical form of a message body (RFC 6376 §3.4.3 simple, §3.4.4 relaxed),
    byte for byte as dkimpy computes it; see tachymail.protocol.mime for the contract.

    One pass finds whether the relaxed form changes anything inside the body (a tab, two
    blanks in a row, a blank before CRLF); a clean body, the usual one, is then only cut at
    its last line, and a body that is already canonical is returned as it is. Otherwise the
    octets between two changes are copied in one piece (format=flowed text has one at
    every line end), not one at a time."""
    cdef Py_buffer buf
    cdef const unsigned char* d
    cdef unsigned char* out
    cdef Py_ssize_t n, i, j, end, run, change
    cdef bint relax = bool(relaxed)
    PyObject_GetBuffer(body, &buf, PyBUF_SIMPLE)
    try:
        d = <const unsigned char*>buf.buf
        n = buf.len
        change = n
        if relax:
            with nogil:
                change = _next_change(d, 0, n)
        if change == n:
            end = n
            while end >= 2 and d[end - 2] == 13 and d[end - 1] == 10:
                end -= 2
            if end == 0:
                return b"" if relax else b"\r\n"
            if end + 2 == n and (
                type(body) is bytes or type(body) is memoryview and type(body.obj) is bytes
            ):
                # already ends with exactly one empty-line-free CRLF; a view of bytes (the
                # body of a message, not cut out of it) is as unchanging as bytes
                return body
            out = <unsigned char*>PyMem_Malloc(end + 2)
            if out == NULL:
                raise MemoryError()
            try:
                memcpy(out, d, end)
                out[end] = 13
                out[end + 1] = 10
                return PyBytes_FromStringAndSize(<char*>out, end + 2)
            finally:
                PyMem_Free(out)
        out = <unsigned char*>PyMem_Malloc(n + 2)
        if out == NULL:
            raise MemoryError()
        try:
            with nogil:
                # the octets up to each change are copied as they are, in one piece
                i = j = 0
                while True:
                    memcpy(out + j, d + i, change - i)
                    j += change - i
                    if change == n:
                        break
                    run = change
                    while run < n and (d[run] == 32 or d[run] == 9):
                        run += 1
                    # blanks before CRLF go; any other run of blanks is one space
                    if not (run + 1 < n and d[run] == 13 and d[run + 1] == 10):
                        out[j] = 32
                        j += 1
                    i = run
                    change = _next_change(d, i, n)
                end = j
                while end >= 2 and out[end - 2] == 13 and out[end - 1] == 10:
                    end -= 2
            if end == 0:
                return b""
            out[end] = 13
            out[end + 1] = 10
            return PyBytes_FromStringAndSize(<char*>out, end + 2)
        finally:
            PyMem_Free(out)
    finally:
        PyBuffer_Release(&buf)


def header_fields(text):
    """The fields of a plain header block (see tachymail.protocol.mime): one pass over the
    bytes, a Python object per field and none per byte."""
    cdef Py_buffer buf
    PyObject_GetBuffer(text, &buf, PyBUF_SIMPLE)
    try:
        return _header_list(<const unsigned char*>buf.buf, buf.len, None)
    finally:
        PyBuffer_Release(&buf)


def header_block(message):
    """The plain header block of a message, read once (see tachymail.protocol.mime):
    blank_line's search, then header_fields of the block, in one call."""
    cdef Py_buffer buf
    cdef const unsigned char* d
    cdef Py_ssize_t start, end
    cdef list lower = []
    PyObject_GetBuffer(message, &buf, PyBUF_SIMPLE)
    try:
        d = <const unsigned char*>buf.buf
        if not _blank_at(d, buf.len, &start, &end):
            return None
        if end - start != 3 or start == 0 or d[start - 1] != 13:
            return None  # the header must end CR LF CR LF
        fields = _header_list(d, start - 1, lower)
        return None if fields is None else (fields, lower, end)
    finally:
        PyBuffer_Release(&buf)


cdef object _header_list(const unsigned char* d, Py_ssize_t n, list lower):
    """header_fields of the n octets at d; the names lower-cased (ASCII) appended to
    *lower* too, unless it is None."""
    cdef Py_ssize_t pos, start
    cdef unsigned char c
    if n == 0 or d[0] == 9 or d[0] == 32:
        return None
    fields = []
    start = pos = 0
    while pos < n:
        c = d[pos]
        if c == 10:
            return None  # a bare LF
        if c != 13:
            pos += 1
            continue
        if pos + 1 >= n or d[pos + 1] != 10:
            return None  # a bare CR
        if pos + 2 < n and (d[pos + 2] == 9 or d[pos + 2] == 32):
            pos += 3  # a continuation line: still the same field
            continue
        field = _plain_field(d, start, pos)
        if field is None:
            return None
        fields.append(field)
        if lower is not None:
            lower.append(_ascii_lower(field[0]))
        start = pos = pos + 2
    field = _plain_field(d, start, n)  # the last field (empty after a final CRLF: None)
    if field is None:
        return None
    fields.append(field)
    if lower is not None:
        lower.append(_ascii_lower(field[0]))
    return fields


cdef bytes _ascii_lower(bytes name):
    """bytes.lower() of *name*: the same object when it has no upper-case letter."""
    cdef const unsigned char* d = <const unsigned char*>(<char*>name)
    cdef Py_ssize_t n = len(name), i
    cdef char* out
    for i in range(n):
        if 65 <= d[i] <= 90:
            break
    else:
        return name
    lowered = PyBytes_FromStringAndSize(NULL, n)
    out = <char*>lowered
    for i in range(n):
        out[i] = d[i] + 32 if 65 <= d[i] <= 90 else d[i]
    return lowered


cdef object _plain_field(const unsigned char* d, Py_ssize_t start, Py_ssize_t end):
    """(name, value + CRLF) of the field d[start:end], or None when its first line is not
    a name of printable ASCII (the first octet may be a colon) then a colon."""
    cdef Py_ssize_t colon = start + 1
    cdef char* out
    if end <= start or not (33 <= d[start] <= 126):
        return None
    while colon < end and d[colon] != 58:
        if not (33 <= d[colon] <= 126):
            return None
        colon += 1
    if colon >= end:
        return None
    value = PyBytes_FromStringAndSize(NULL, end - colon + 1)
    out = <char*>value
    memcpy(out, d + colon + 1, end - colon - 1)
    out[end - colon - 1] = 13
    out[end - colon] = 10
    return (PyBytes_FromStringAndSize(<const char*>d + start, colon - start), value)


def relaxed_header_value(value):
    """A field value in DKIM's relaxed form (see tachymail.protocol.mime)."""
    cdef Py_buffer buf
    PyObject_GetBuffer(value, &buf, PyBUF_SIMPLE)
    try:
        return _relaxed(<const unsigned char*>buf.buf, buf.len)
    finally:
        PyBuffer_Release(&buf)


cdef bytes _relaxed(const unsigned char* d, Py_ssize_t n):
    """relaxed_header_value of the n octets at d."""
    cdef unsigned char* out
    cdef Py_ssize_t j
    out = <unsigned char*>PyMem_Malloc(n + 2)
    if out == NULL:
        raise MemoryError()
    try:
        j = _relaxed_into(out, 0, d, n)
        out[j] = 13
        out[j + 1] = 10
        return PyBytes_FromStringAndSize(<char*>out, j + 2)
    finally:
        PyMem_Free(out)


cdef Py_ssize_t _relaxed_into(unsigned char* out, Py_ssize_t j, const unsigned char* d,
                              Py_ssize_t n) noexcept nogil:
    """The relaxed form of the n octets at d, without its CRLF, written at out + j (room
    for n octets); where it ends."""
    cdef Py_ssize_t i = 0, start = j, first
    cdef bint blank = False
    cdef unsigned char c
    while i < n:
        c = d[i]
        if c == 13 and i + 1 < n and d[i + 1] == 10:
            i += 2  # unfolded: the line break goes, the blanks around it stay
            continue
        if c == 10:
            i += 1
            continue
        if c == 32 or c == 9:
            if not blank:
                out[j] = 32
                j += 1
                blank = True
        else:
            out[j] = c
            j += 1
            blank = False
        i += 1
    # stripped of ASCII white space (bytes.strip: space, \t, \n, \r, \v, \f)
    first = start
    while first < j and _ascii_space(out[first]):
        first += 1
    while j > first and _ascii_space(out[j - 1]):
        j -= 1
    if first > start:
        memmove(out + start, out + first, j - first)
        j -= first - start
    return j


cdef inline bint _ascii_space(unsigned char c) noexcept nogil:
    """White space as bytes.strip() and bytes.split() see it: space, \t, \n, \v, \f, \r."""
    return c == 32 or 9 <= c <= 13


cdef inline bint _base64_char(unsigned char c) noexcept nogil:
    return (65 <= c <= 90) or (97 <= c <= 122) or (48 <= c <= 57) or c == 43 or c == 47


def dkim_tag_list(value):
    """A DKIM tag=value list as a dict, or None (see tachymail.protocol.mime)."""
    cdef Py_buffer buf
    PyObject_GetBuffer(value, &buf, PyBUF_SIMPLE)
    try:
        return _tag_list(<const unsigned char*>buf.buf, buf.len)
    finally:
        PyBuffer_Release(&buf)


cdef dict _tag_list(const unsigned char* d, Py_ssize_t n):
    """dkim_tag_list of the n octets at d."""
    cdef Py_ssize_t start, end, spec
    cdef Py_ssize_t at[5]
    cdef dict tags = {}
    _strip(d, 0, n, &start, &end)
    spec = start
    while spec < end:  # spec == end: no more, or an empty last spec (a final ";")
        if not _tag_at(d, spec, end, at):
            return None
        name = PyBytes_FromStringAndSize(<const char*>d + at[0], at[1] - at[0])
        if name in tags:
            return None  # a tag given twice
        tags[name] = PyBytes_FromStringAndSize(<const char*>d + at[2], at[3] - at[2])
        if at[4] == end:
            break
        spec = at[4] + 1
    return tags


cdef inline void _strip(const unsigned char* d, Py_ssize_t a, Py_ssize_t b, Py_ssize_t* start,
                        Py_ssize_t* end) noexcept nogil:
    """Where the octets d[a:b] start and end without their ASCII white space."""
    while a < b and _ascii_space(d[a]):
        a += 1
    while b > a and _ascii_space(d[b - 1]):
        b -= 1
    start[0], end[0] = a, b


cdef bint _tag_at(const unsigned char* d, Py_ssize_t spec, Py_ssize_t end,
                  Py_ssize_t* at) noexcept nogil:
    """The tag spec of a tag list (ending at end) that starts at spec, as dkimpy reads it:
    at = name start, name end, value start, value end (both stripped), where the spec
    stops (its ";" or end). False for a spec without "=" (an empty one too) or a name that
    does not start with a letter."""
    cdef Py_ssize_t stop = spec, eq
    while stop < end and d[stop] != 59:  # ";"
        stop += 1
    eq = spec
    while eq < stop and d[eq] != 61:  # "="
        eq += 1
    if eq == stop:
        return False
    _strip(d, spec, eq, &at[0], &at[1])
    if at[0] == at[1] or not ((65 <= d[at[0]] <= 90) or (97 <= d[at[0]] <= 122)):
        return False
    _strip(d, eq + 1, stop, &at[2], &at[3])
    at[4] = stop
    return True


def dkim_plain_base64(value):
    """Whether value is base64 as a DKIM b= or bh= is checked (see tachymail.protocol.mime)."""
    cdef Py_buffer buf
    PyObject_GetBuffer(value, &buf, PyBUF_SIMPLE)
    try:
        return _plain_base64(<const unsigned char*>buf.buf, buf.len)
    finally:
        PyBuffer_Release(&buf)


cdef bint _plain_base64(const unsigned char* d, Py_ssize_t n) noexcept nogil:
    """dkim_plain_base64 of the n octets at d."""
    cdef Py_ssize_t i, count = 0
    cdef bint padded = False
    cdef unsigned char c
    if n == 0 or d[0] == 61:
        return False
    for i in range(n):
        c = d[i]
        if _ascii_space(c):
            continue
        if c == 61:  # "=": only padding and white space after it
            padded = True
        elif not _base64_char(c) or padded:
            return False
        count += 1
    return count % 4 == 0


def dkim_empty_b(value):
    """A DKIM-Signature field value with its b= value taken out (see
    tachymail.protocol.mime)."""
    cdef Py_buffer buf
    PyObject_GetBuffer(value, &buf, PyBUF_SIMPLE)
    try:
        return _empty_b(<const unsigned char*>buf.buf, buf.len)
    finally:
        PyBuffer_Release(&buf)


cdef bytes _empty_b(const unsigned char* d, Py_ssize_t n):
    """dkim_empty_b of the n octets at d."""
    cdef unsigned char* out
    out = <unsigned char*>PyMem_Malloc(n + 1)
    if out == NULL:
        raise MemoryError()
    try:
        return PyBytes_FromStringAndSize(<char*>out, _empty_b_into(out, d, n))
    finally:
        PyMem_Free(out)


cdef Py_ssize_t _empty_b_into(unsigned char* out, const unsigned char* d,
                              Py_ssize_t n) noexcept nogil:
    """dkim_empty_b of the n octets at d written at out (room for n octets); its length."""
    cdef Py_ssize_t i, j, k, end
    cdef unsigned char c
    i = j = 0
    while i < n:
        c = d[i]
        if (c == 59 or _ascii_space(c)) and i + 1 < n and d[i + 1] == 98:  # ";b", " b"
            k = i + 2
            while k < n and _ascii_space(d[k]):
                k += 1
            if k < n and d[k] == 61:  # "=": the tag's name and "=" stay
                memcpy(out + j, d + i, k + 1 - i)
                j += k + 1 - i
                # the value: base64 and white space, up to its last non-blank
                end = k = k + 1
                while k < n and (_ascii_space(d[k]) or _base64_char(d[k]) or d[k] == 61):
                    k += 1
                    if not _ascii_space(d[k - 1]):
                        end = k
                # and the field's line end, when the value is last
                if end + 2 == n and d[end] == 13 and d[end + 1] == 10:
                    end = n
                elif end + 1 == n and d[end] == 10:
                    end = n
                i = end
                continue
        out[j] = c
        j += 1
        i += 1
    return j


def dkim_signed_fields(list fields, list lower, tuple names, bint relaxed):
    """The header fields a DKIM signature's h= names select, as they are hashed (see
    tachymail.protocol.mime)."""
    return _signed_fields(fields, lower, names, relaxed)


cdef bytes _signed_fields(list fields, list lower, tuple names, bint relaxed):
    cdef Py_ssize_t wanted = len(names), size
    cdef Py_ssize_t* chosen = <Py_ssize_t*>PyMem_Malloc((wanted + 1) * sizeof(Py_ssize_t))
    cdef unsigned char* out = NULL
    if chosen == NULL:
        raise MemoryError()
    try:
        size = _choose_fields(fields, lower, names, chosen)
        out = <unsigned char*>PyMem_Malloc(size + 1)
        if out == NULL:
            raise MemoryError()
        size = _write_fields(out, fields, lower, chosen, wanted, relaxed)
        return PyBytes_FromStringAndSize(<char*>out, size)
    finally:
        PyMem_Free(chosen)
        PyMem_Free(out)


cdef Py_ssize_t _choose_fields(list fields, list lower, tuple names,
                               Py_ssize_t* chosen) except -1:
    """The field each of the h= *names* selects, into chosen (its index in *fields*, or
    -1: none), bottom-up, each mention of a name above the field its previous mention took
    (RFC 6376 §5.4.2); the room they take when written (name, ":", value, CRLF)."""
    cdef Py_ssize_t count = PyList_GET_SIZE(lower), size = 0, i, k, m
    cdef bytes want
    for k in range(len(names)):
        want = names[k]
        i = count  # below the instance the last mention of this name took, if any
        for m in range(k - 1, -1, -1):
            if names[m] == want:
                i = chosen[m] if chosen[m] >= 0 else 0
                break
        while i > 0:
            i -= 1
            if lower[i] == want:
                chosen[k] = i
                size += len(fields[i][0]) + len(fields[i][1]) + 3
                break
        else:
            chosen[k] = -1  # none: a later mention of the name finds none either
    return size


cdef Py_ssize_t _write_fields(unsigned char* out, list fields, list lower, Py_ssize_t* chosen,
                              Py_ssize_t wanted, bint relaxed) except -1:
    """The *chosen* fields (:func:`_choose_fields`) written at out as a DKIM header hash
    takes them in; the octets written."""
    cdef Py_ssize_t j = 0, i, k
    cdef bytes fname, fvalue
    for k in range(wanted):
        i = chosen[k]
        if i < 0:
            continue
        fvalue = fields[i][1]
        fname = lower[i] if relaxed else fields[i][0]
        memcpy(out + j, <const char*>fname, len(fname))
        j += len(fname)
        out[j] = 58  # ":"
        j += 1
        if relaxed:
            j = _relaxed_into(out, j, <const unsigned char*>(<char*>fvalue), len(fvalue))
            out[j] = 13
            out[j + 1] = 10
            j += 2
        else:
            memcpy(out + j, <const char*>fvalue, len(fvalue))
            j += len(fvalue)
    return j


def dkim_plain_signature(value, latest):
    """A plain DKIM-Signature field value read for its check (see tachymail.protocol.mime):
    (its tags but b=, bh=, t=, each name=value; in order; b=; bh=), the two without white
    space; None when it is not plain. One pass over the tags as _tag_list reads them,
    three objects made."""
    cdef Py_buffer buf
    cdef const unsigned char* d
    cdef Py_ssize_t n
    cdef Py_ssize_t* spans = NULL  # per tag: name start, name end
    cdef unsigned char* out = NULL
    cdef Py_ssize_t count = 0, j = 0, start, end, spec, a, b, va, vb, k
    cdef Py_ssize_t at[5]
    cdef Py_ssize_t b_at = -1, b_end = 0, bh_at = -1, bh_end = 0, t_at = -1, t_end = 0
    PyObject_GetBuffer(value, &buf, PyBUF_SIMPLE)
    try:
        d = <const unsigned char*>buf.buf
        n = buf.len
        spans = <Py_ssize_t*>PyMem_Malloc((2 * n + 2) * sizeof(Py_ssize_t))
        out = <unsigned char*>PyMem_Malloc(n + 2)
        if spans == NULL or out == NULL:
            raise MemoryError()
        _strip(d, 0, n, &start, &end)
        spec = start
        while spec < end:  # as _tag_list reads the tags
            if not _tag_at(d, spec, end, at):
                return None
            a, b, va, vb = at[0], at[1], at[2], at[3]
            for k in range(count):
                if spans[2 * k + 1] - spans[2 * k] == b - a and memcmp(d + a, d + spans[2 * k], b - a) == 0:
                    return None  # a tag given twice
            spans[2 * count] = a
            spans[2 * count + 1] = b
            count += 1
            if b - a == 1 and d[a] == 98:  # b=
                b_at, b_end = va, vb
            elif b - a == 2 and d[a] == 98 and d[a + 1] == 104:  # bh=
                bh_at, bh_end = va, vb
            elif b - a == 1 and d[a] == 116:  # t=
                t_at, t_end = va, vb
            else:  # one of the tags a signer's signatures share: name=value;
                memcpy(out + j, d + a, b - a)
                j += b - a
                out[j] = 61
                memcpy(out + j + 1, d + va, vb - va)
                j += 1 + vb - va
                out[j] = 59
                j += 1
            if at[4] == end:
                break
            spec = at[4] + 1
        if b_at < 0 or bh_at < 0:
            return None
        if not _plain_base64(d + b_at, b_end - b_at) or not _plain_base64(d + bh_at, bh_end - bh_at):
            return None
        if t_at >= 0 and not _time_at_most(d + t_at, t_end - t_at, latest):
            return None
        return (
            PyBytes_FromStringAndSize(<char*>out, j),
            _unblank_span(d + b_at, b_end - b_at),
            _unblank_span(d + bh_at, bh_end - bh_at),
        )
    finally:
        PyMem_Free(spans)
        PyMem_Free(out)
        PyBuffer_Release(&buf)


cdef bint _time_at_most(const unsigned char* d, Py_ssize_t n, object latest):
    """Whether the n octets at d are ASCII digits (one at least) naming a number not
    above *latest*."""
    cdef Py_ssize_t i
    cdef unsigned long long value = 0
    if n == 0:
        return False
    for i in range(n):
        if not 48 <= d[i] <= 57:
            return False
    if n > 18:  # past what the sum below holds: Python's int compares it
        return int(PyBytes_FromStringAndSize(<const char*>d, n)) <= latest
    for i in range(n):
        value = value * 10 + (d[i] - 48)
    return value <= latest


cdef bytes _unblank_span(const unsigned char* d, Py_ssize_t n):
    """The n octets at d without their ASCII white space, as bytes."""
    cdef Py_ssize_t i, j = 0
    cdef char* out
    for i in range(n):
        if _ascii_space(d[i]):
            j += 1
    result = PyBytes_FromStringAndSize(NULL, n - j)
    out = <char*>result
    j = 0
    for i in range(n):
        if not _ascii_space(d[i]):
            out[j] = d[i]
            j += 1
    return result


def dkim_header_input(list fields, list lower, tuple names, bint relaxed, tuple field):
    """What a DKIM signature's header hash takes in: the fields its h= names select and
    its own field without its b= value and final line end (see tachymail.protocol.mime).
    Written into one buffer: the signed fields as dkim_signed_fields writes them
    (_choose_fields, _write_fields), then the field itself."""
    cdef bytes name = field[0]
    cdef bytes value = field[1]
    cdef Py_ssize_t wanted = len(names)
    cdef Py_ssize_t size, i, m, j, start
    cdef Py_ssize_t* chosen
    cdef unsigned char* out
    cdef unsigned char* emptied
    cdef const unsigned char* v
    cdef unsigned char c
    chosen = <Py_ssize_t*>PyMem_Malloc((wanted + 1) * sizeof(Py_ssize_t))
    if chosen == NULL:
        raise MemoryError()
    out = NULL
    emptied = NULL
    try:
        size = _choose_fields(fields, lower, names, chosen) + len(name) + len(value) + 3
        out = <unsigned char*>PyMem_Malloc(size)
        emptied = <unsigned char*>PyMem_Malloc(len(value) + 1)
        if out == NULL or emptied == NULL:
            raise MemoryError()
        j = _write_fields(out, fields, lower, chosen, wanted, relaxed)
        v = <const unsigned char*>(<char*>name)
        for i in range(len(name)):
            c = v[i]
            out[j] = c + 32 if relaxed and 65 <= c <= 90 else c  # bytes.lower(): ASCII
            j += 1
        out[j] = 58
        j += 1
        m = _empty_b_into(emptied, <const unsigned char*>(<char*>value), len(value))
        start = j
        if relaxed:
            j = _relaxed_into(out, j, emptied, m)
        else:
            memcpy(out + j, emptied, m)
            j += m
            while j > start and _ascii_space(out[j - 1]):  # own.rstrip()
                j -= 1
        return PyBytes_FromStringAndSize(<char*>out, j)
    finally:
        PyMem_Free(chosen)
        PyMem_Free(out)
        PyMem_Free(emptied)


def blank_line(message):
    """Where the empty line that ends the header block is (see tachymail.protocol.mime):
    one pass from LF to LF."""
    cdef Py_buffer buf
    cdef Py_ssize_t start, end
    cdef bint found
    PyObject_GetBuffer(message, &buf, PyBUF_SIMPLE)
    try:
        found = _blank_at(<const unsigned char*>buf.buf, buf.len, &start, &end)
    finally:
        PyBuffer_Release(&buf)
    return (start, end) if found else None


cdef bint _blank_at(const unsigned char* d, Py_ssize_t n, Py_ssize_t* start,
                    Py_ssize_t* end) noexcept nogil:
    """blank_line of the n octets at d, into start and end; whether there is one."""
    cdef Py_ssize_t i
    if n >= 1 and d[0] == 10:
        start[0], end[0] = 0, 1
        return True
    if n >= 2 and d[0] == 13 and d[1] == 10:
        start[0], end[0] = 0, 2
        return True
    i = find_lf(d, 0, n)
    while i < n:
        if i + 1 < n and d[i + 1] == 10:
            start[0], end[0] = i, i + 2
            return True
        if i + 2 < n and d[i + 1] == 13 and d[i + 2] == 10:
            start[0], end[0] = i, i + 3
            return True
        i = find_lf(d, i + 1, n)
    return False
