"""SMTP command lines: incremental line splitting, verb recognition, and the paths and ESMTP
parameters of MAIL FROM / RCPT TO (RFC 5321 §4.1.2, RFC 6531, RFC 1870, RFC 6152, RFC 3030,
RFC 3461, RFC 4954, RFC 8689).

The API and its guarantees are documented in ``tachymail/protocol/commands.py``;
``tachymail/protocol/commands_py.py`` is the pure-Python twin with the same results and the
same SmtpSyntaxError for every input.  The parsers are loops over the octets with a
character-class table; ``LineReader.feed`` reads any buffer in place through the buffer
protocol.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from cpython.unicode cimport PyUnicode_DecodeASCII, PyUnicode_DecodeUTF8
from libc.string cimport memchr, memcpy, memmove, strlen

from commands cimport (
    AT,
    BACKSLASH,
    C_ALPHA,
    C_ATEXT,
    C_DCONTENT,
    C_DIGIT,
    C_HEX,
    C_HEXUP,
    C_HYPHEN,
    C_KEYWORD,
    C_LDH,
    C_LETDIG,
    C_QTEXT,
    C_UTF8,
    C_VALUE,
    C_XCHAR,
    COLON,
    COMMA,
    CR,
    DOMAIN_MAX,
    DOT,
    DQUOTE,
    ENVID_MAX,
    EQUALS,
    F_BARE_CR,
    F_BARE_LF,
    F_TOO_LONG,
    FIRST_CAPACITY,
    GT,
    HYPHEN,
    IPV6_TEXT_MAX,
    KEEP_CAPACITY,
    LBRACKET,
    LF,
    LOCAL_MAX,
    LT,
    P_AUTH,
    P_BODY,
    P_ENVID,
    P_MAIL,
    P_NO_VALUE,
    P_NOTIFY,
    P_ORCPT,
    P_RCPT,
    P_REQUIRETLS,
    P_RET,
    P_SIZE,
    P_SMTPUTF8,
    P_UNKNOWN,
    PATH_DOMAIN_TOO_LONG,
    PATH_LOCAL_TOO_LONG,
    PATH_MAX,
    PATH_OK,
    PATH_SYNTAX,
    PATH_TOO_LONG,
    PLUS,
    RBRACKET,
    SEMICOLON,
    SIZE_DIGITS_MAX,
    SP,
    V_AUTH,
    V_BDAT,
    V_DATA,
    V_EHLO,
    V_EXPN,
    V_HELO,
    V_HELP,
    V_MAIL,
    V_NOOP,
    V_QUIT,
    V_RCPT,
    V_RSET,
    V_STARTTLS,
    V_UNKNOWN,
    V_VRFY,
    PathResult,
)

from tachymail.protocol.errors import SmtpSyntaxError

__all__ = [
    "LINE_BARE_CR",
    "LINE_BARE_LF",
    "LINE_TOO_LONG",
    "VERB_AUTH",
    "VERB_BDAT",
    "VERB_DATA",
    "VERB_EHLO",
    "VERB_EXPN",
    "VERB_HELO",
    "VERB_HELP",
    "VERB_MAIL",
    "VERB_NOOP",
    "VERB_QUIT",
    "VERB_RCPT",
    "VERB_RSET",
    "VERB_STARTTLS",
    "VERB_UNKNOWN",
    "VERB_VRFY",
    "LineReader",
    "parse_command",
    "parse_mail",
    "parse_rcpt",
]

VERB_UNKNOWN = V_UNKNOWN
VERB_HELO = V_HELO
VERB_EHLO = V_EHLO
VERB_MAIL = V_MAIL
VERB_RCPT = V_RCPT
VERB_DATA = V_DATA
VERB_BDAT = V_BDAT
VERB_RSET = V_RSET
VERB_NOOP = V_NOOP
VERB_QUIT = V_QUIT
VERB_VRFY = V_VRFY
VERB_EXPN = V_EXPN
VERB_HELP = V_HELP
VERB_STARTTLS = V_STARTTLS
VERB_AUTH = V_AUTH

LINE_TOO_LONG = F_TOO_LONG
LINE_BARE_LF = F_BARE_LF
LINE_BARE_CR = F_BARE_CR

# The four-letter verbs, most frequent first, and their codes; STARTTLS is the only longer one.
cdef const char* VERBS4 = b"RCPTMAILDATAEHLOQUITRSETNOOPBDATHELOAUTHVRFYEXPNHELP"
cdef int[13] VERB4_CODES = [
    V_RCPT, V_MAIL, V_DATA, V_EHLO, V_QUIT, V_RSET, V_NOOP, V_BDAT, V_HELO, V_AUTH, V_VRFY,
    V_EXPN, V_HELP,
]

cdef unsigned short CLASSES[256]
cdef unsigned char UPPER[256]


cdef void _fill_tables() noexcept:
    cdef int c
    cdef bytes atext_specials = b"!#$%&'*+-/=?^_`{|}~"
    for c in range(256):
        CLASSES[c] = 0
        UPPER[c] = c - 32 if 97 <= c <= 122 else c
        if 65 <= c <= 90 or 97 <= c <= 122:
            CLASSES[c] |= C_ALPHA | C_ATEXT
        if 48 <= c <= 57:
            CLASSES[c] |= C_DIGIT | C_ATEXT | C_HEX | C_HEXUP
        if 65 <= c <= 70:
            CLASSES[c] |= C_HEX | C_HEXUP
        if 97 <= c <= 102:
            CLASSES[c] |= C_HEX
        if c >= 128:
            CLASSES[c] |= C_UTF8 | C_ATEXT | C_QTEXT
        if c in atext_specials:
            CLASSES[c] |= C_ATEXT
        if c == HYPHEN:
            CLASSES[c] |= C_HYPHEN
        if c == 32 or c == 33 or 35 <= c <= 91 or 93 <= c <= 126:
            CLASSES[c] |= C_QTEXT
        if 33 <= c <= 90 or 94 <= c <= 126:
            CLASSES[c] |= C_DCONTENT
        if 33 <= c <= 126 and c != PLUS and c != EQUALS:
            CLASSES[c] |= C_XCHAR
        if 33 <= c <= 126 and c != EQUALS:
            CLASSES[c] |= C_VALUE


_fill_tables()


cdef inline bint iequal(const unsigned char* s, Py_ssize_t n, const char* upper_word) noexcept:
    """True when s[:n] equals the upper-case ASCII word, ignoring ASCII case."""
    cdef Py_ssize_t i
    if n != <Py_ssize_t>strlen(upper_word):
        return False
    for i in range(n):
        if UPPER[s[i]] != <unsigned char>upper_word[i]:
            return False
    return True


# ---------------------------------------------------------------------------------------------
# Line splitting


cdef class LineReader:
    """Splits a byte stream into command lines; see the module docstring of the facade."""

    # Unread bytes are _buf[_start:_end]; _buf[_start:_scan] is known to hold no LF.
    cdef unsigned char* _buf
    cdef Py_ssize_t _capacity
    cdef Py_ssize_t _start
    cdef Py_ssize_t _end
    cdef Py_ssize_t _scan
    cdef bint _skipping          # dropping the rest of an over-long line until its LF
    cdef bint _cut               # the line at _start lost bytes: it is too long, whatever limit
    cdef readonly Py_ssize_t limit
    cdef readonly Py_ssize_t auth_limit
    cdef public bint auth_exchange  # every line is an AUTH exchange line (auth_limit applies)

    def __cinit__(self, Py_ssize_t limit=512, Py_ssize_t auth_limit=0):
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self.limit = limit
        self.auth_limit = max(limit, auth_limit)
        self._buf = <unsigned char*>PyMem_Malloc(FIRST_CAPACITY)
        if self._buf == NULL:
            raise MemoryError()
        self._capacity = FIRST_CAPACITY

    def __dealloc__(self):
        PyMem_Free(self._buf)

    @property
    def pending(self):
        """Bytes buffered and not yet returned by readline()."""
        return self._end - self._start

    cdef void _empty(self) noexcept:
        cdef unsigned char* smaller
        self._start = self._end = self._scan = 0
        if self._capacity > KEEP_CAPACITY:
            # Give back what one large pipelined chunk made us grow to.
            smaller = <unsigned char*>PyMem_Realloc(self._buf, FIRST_CAPACITY)
            if smaller != NULL:
                self._buf = smaller
                self._capacity = FIRST_CAPACITY

    cdef int _reserve(self, Py_ssize_t extra) except -1:
        """Room for extra more bytes at _end, compacting the unread bytes to the front first."""
        cdef Py_ssize_t unread, capacity
        cdef unsigned char* grown
        if self._end + extra <= self._capacity:
            return 0
        if self._start:
            unread = self._end - self._start
            memmove(self._buf, self._buf + self._start, <size_t>unread)
            self._scan -= self._start
            self._end = unread
            self._start = 0
            if self._end + extra <= self._capacity:
                return 0
        capacity = max(self._capacity * 2, self._end + extra)
        grown = <unsigned char*>PyMem_Realloc(self._buf, <size_t>capacity)
        if grown == NULL:
            raise MemoryError()
        self._buf = grown
        self._capacity = capacity
        return 0

    cdef Py_ssize_t _line_limit(self, Py_ssize_t first, Py_ssize_t end) noexcept:
        """The limit of the line starting at first (end: the buffered bytes of it, or its
        end): auth_limit in an AUTH exchange or for "AUTH " (any case), else limit."""
        if self.auth_limit == self.limit:
            return self.limit
        if self.auth_exchange:
            return self.auth_limit
        if (end - first > 4 and self._buf[first + 4] == SP
                and iequal(self._buf + first, 4, b"AUTH")):
            return self.auth_limit
        return self.limit

    cdef void _truncate_if_overlong(self) noexcept:
        """Called when the unread bytes hold no LF: a partial line of its limit or more is
        already too long, so keep only that many of its bytes and drop the rest until its LF."""
        cdef Py_ssize_t limit = self._line_limit(self._start, self._end)
        if self._end - self._start >= limit:
            self._end = self._start + limit
            self._scan = self._end
            self._skipping = True
            self._cut = True

    def feed(self, data):
        """Append a chunk (any contiguous buffer)."""
        cdef Py_buffer view
        cdef const unsigned char* p
        cdef const unsigned char* lf
        cdef Py_ssize_t n
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            p = <const unsigned char*>view.buf
            n = view.len
            if n == 0:
                return
            if self._skipping:
                lf = <const unsigned char*>memchr(p, LF, <size_t>n)
                if lf == NULL:
                    return
                # The over-long line ends here: its kept bytes plus this LF make limit + 1.
                self._skipping = False
                n -= lf - p
                p = lf
            self._reserve(n)
            memcpy(self._buf + self._end, p, <size_t>n)
            self._end += n
            if self._end - self._start >= self.limit:
                lf = <const unsigned char*>memchr(
                    self._buf + self._scan, LF, <size_t>(self._end - self._scan)
                )
                if lf == NULL:
                    self._scan = self._end
                    self._truncate_if_overlong()
                else:
                    self._scan = lf - self._buf
        finally:
            PyBuffer_Release(&view)

    def readline(self):
        """The next complete line as (line, flags), or None when no LF is buffered."""
        cdef unsigned char* buf = self._buf
        cdef Py_ssize_t first = self._start
        cdef Py_ssize_t stop, length
        cdef int flags = 0
        cdef unsigned char* lf
        if first == self._end:
            return None
        lf = <unsigned char*>memchr(buf + self._scan, LF, <size_t>(self._end - self._scan))
        if lf == NULL:
            self._scan = self._end
            self._truncate_if_overlong()
            return None
        stop = lf - buf
        self._start = self._scan = stop + 1
        # Counted as received: a bare LF counts one octet, CRLF two.
        # auth_limit >= limit: only a line over limit needs to know which limit is its own.
        if self._cut or (stop + 1 - first > self.limit
                         and stop + 1 - first > self._line_limit(first, stop)):
            self._cut = False
            line = b""
            flags = F_TOO_LONG
        else:
            if stop > first and buf[stop - 1] == CR:
                stop -= 1
            else:
                flags = F_BARE_LF
            length = stop - first
            if length and memchr(buf + first, CR, <size_t>length) != NULL:
                flags |= F_BARE_CR
            line = PyBytes_FromStringAndSize(<char*>buf + first, length)
        if self._start == self._end:
            self._empty()
        return (line, flags)

    def drain(self):
        """Every buffered byte, partial line included; the reader is empty afterwards."""
        rest = PyBytes_FromStringAndSize(<char*>self._buf + self._start, self._end - self._start)
        self._skipping = False
        self._cut = False
        self._empty()
        return rest


# ---------------------------------------------------------------------------------------------
# Verbs


cdef int verb_code(const unsigned char* s, Py_ssize_t n) noexcept:
    cdef unsigned char word[4]
    cdef int i, k
    if n == 4:
        for i in range(4):
            word[i] = UPPER[s[i]]
        for k in range(13):
            if (word[0] == <unsigned char>VERBS4[4 * k]
                    and word[1] == <unsigned char>VERBS4[4 * k + 1]
                    and word[2] == <unsigned char>VERBS4[4 * k + 2]
                    and word[3] == <unsigned char>VERBS4[4 * k + 3]):
                return VERB4_CODES[k]
        return V_UNKNOWN
    if n == 8 and iequal(s, n, b"STARTTLS"):
        return V_STARTTLS
    return V_UNKNOWN


def parse_command(bytes line not None):
    """(VERB_x, text after the first space) or (VERB_UNKNOWN, line)."""
    cdef const unsigned char* s = <const unsigned char*>PyBytes_AS_STRING(line)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(line)
    cdef const unsigned char* space = <const unsigned char*>memchr(s, SP, <size_t>n)
    cdef Py_ssize_t word = n if space == NULL else space - s
    cdef int verb = verb_code(s, word)
    if verb == V_UNKNOWN:
        return (V_UNKNOWN, line)
    if space == NULL:
        return (verb, b"")
    return (verb, PyBytes_FromStringAndSize(<char*>space + 1, n - word - 1))


# ---------------------------------------------------------------------------------------------
# Paths (RFC 5321 §4.1.2, §4.1.3; RFC 6531 §3.3)


cdef bint utf8_valid(const unsigned char* s, Py_ssize_t n) noexcept:
    """Well-formed UTF-8 as Python's strict decoder sees it (no surrogates, no overlongs)."""
    cdef Py_ssize_t i = 0, k
    cdef unsigned char c, lo, hi
    cdef int follow
    while i < n:
        c = s[i]
        if c < 0x80:
            i += 1
            continue
        lo, hi = 0x80, 0xBF
        if 0xC2 <= c <= 0xDF:
            follow = 1
        elif 0xE0 <= c <= 0xEF:
            follow = 2
            if c == 0xE0:
                lo = 0xA0
            elif c == 0xED:
                hi = 0x9F
        elif 0xF0 <= c <= 0xF4:
            follow = 3
            if c == 0xF0:
                lo = 0x90
            elif c == 0xF4:
                hi = 0x8F
        else:
            return False
        if i + follow >= n:
            return False
        if not (lo <= s[i + 1] <= hi):
            return False
        for k in range(i + 2, i + 1 + follow):
            if not (0x80 <= s[k] <= 0xBF):
                return False
        i += 1 + follow
    return True


cdef bint ipv4_valid(const unsigned char* s, Py_ssize_t n) noexcept:
    """Snum 3("." Snum): four decimal numbers of 1-3 digits, each 0-255."""
    cdef Py_ssize_t i = 0, j
    cdef int value, parts = 0
    while True:
        j = i
        value = 0
        while j < n and j - i < 3 and CLASSES[s[j]] & C_DIGIT:
            value = value * 10 + (s[j] - 48)
            j += 1
        if j == i or value > 255:
            return False
        parts += 1
        if j == n:
            return parts == 4
        if s[j] != DOT or parts == 4:
            return False
        i = j + 1


cdef bint ipv6_valid(const unsigned char* s, Py_ssize_t n) noexcept:
    """IPv6-addr of RFC 5321 §4.1.3: eight groups, or at most six around one "::", where an
    IPv4 tail counts as two groups."""
    cdef unsigned char text[IPV6_TEXT_MAX + 4]
    cdef Py_ssize_t m, i, j, colon
    cdef int groups = 0
    cdef bint compressed = False
    if n > IPV6_TEXT_MAX:
        return False
    colon = n - 1
    while colon >= 0 and s[colon] != COLON:
        colon -= 1
    if colon < 0:
        return False
    memcpy(text, s, <size_t>n)
    m = n
    if memchr(s + colon + 1, DOT, <size_t>(n - colon - 1)) != NULL:
        if not ipv4_valid(s + colon + 1, n - colon - 1):
            return False
        # Check the rest with two zero groups in place of the IPv4 tail.
        memcpy(text + colon + 1, b"0:0", 3)
        m = colon + 4
    i = 0
    if m >= 2 and text[0] == COLON and text[1] == COLON:
        compressed = True
        i = 2
        if i == m:
            return True
    while True:
        j = i
        while j < m and j - i < 4 and CLASSES[text[j]] & C_HEX:
            j += 1
        if j == i:
            return False
        groups += 1
        i = j
        if i == m:
            break
        if text[i] != COLON:
            return False
        i += 1
        if i < m and text[i] == COLON:
            if compressed:
                return False
            compressed = True
            i += 1
            if i == m:
                break
    return groups <= 6 if compressed else groups == 8


cdef bint literal_valid(const unsigned char* s, Py_ssize_t n) noexcept:
    """The inside of an address literal: IPv4, "IPv6:" IPv6-addr, or tag ":" 1*dcontent."""
    cdef const unsigned char* colon = <const unsigned char*>memchr(s, COLON, <size_t>n)
    cdef Py_ssize_t tag, i
    if colon == NULL:
        return ipv4_valid(s, n)
    tag = colon - s
    if iequal(s, tag, b"IPV6"):
        return ipv6_valid(colon + 1, n - tag - 1)
    # General-address-literal: Standardized-tag is an Ldh-str (ends with a letter or digit).
    if tag == 0 or tag == n - 1 or not (CLASSES[s[tag - 1]] & (C_ALPHA | C_DIGIT)):
        return False
    for i in range(tag):
        if not (CLASSES[s[i]] & C_KEYWORD):
            return False
    return True


cdef Py_ssize_t scan_domain(const unsigned char* s, Py_ssize_t i, Py_ssize_t n) noexcept:
    """Domain = sub-domain *("." sub-domain); returns the index after it, or -1."""
    while True:
        if i >= n or not (CLASSES[s[i]] & C_LETDIG):
            return -1
        i += 1
        while i < n and CLASSES[s[i]] & C_LDH:
            i += 1
        if s[i - 1] == HYPHEN:  # a label may not end with "-"
            return -1
        if i < n and s[i] == DOT:
            i += 1
            continue
        return i


cdef Py_ssize_t scan_dot_string(const unsigned char* s, Py_ssize_t i, Py_ssize_t n) noexcept:
    """Dot-string = Atom *("." Atom); returns the index after it, or -1."""
    while True:
        if i >= n or not (CLASSES[s[i]] & C_ATEXT):
            return -1
        i += 1
        while i < n and CLASSES[s[i]] & C_ATEXT:
            i += 1
        if i < n and s[i] == DOT:
            i += 1
            continue
        return i


cdef Py_ssize_t scan_quoted(const unsigned char* s, Py_ssize_t i, Py_ssize_t n) noexcept:
    """Quoted-string starting at s[i] == DQUOTE; returns the index after it, or -1."""
    cdef unsigned char c
    i += 1
    while i < n:
        c = s[i]
        if c == DQUOTE:
            return i + 1
        if c == BACKSLASH:
            if i + 1 >= n or not (32 <= s[i + 1] <= 126):
                return -1
            i += 2
        elif CLASSES[c] & C_QTEXT:
            i += 1
        else:
            return -1
    return -1


cdef Py_ssize_t scan_literal(const unsigned char* s, Py_ssize_t i, Py_ssize_t n) noexcept:
    """address-literal starting at s[i] == "["; returns the index after "]", or -1."""
    cdef Py_ssize_t j = i + 1
    while j < n and CLASSES[s[j]] & C_DCONTENT:
        j += 1
    if j >= n or s[j] != RBRACKET or j == i + 1:
        return -1
    if not literal_valid(s + i + 1, j - i - 1):
        return -1
    return j + 1


cdef PathResult check_path(const unsigned char* s, Py_ssize_t n,
                           Py_ssize_t* mailbox_start, bint* non_ascii) noexcept:
    """Validates [A-d-l ":"] Mailbox, the non-empty text between "<" and ">"."""
    cdef Py_ssize_t i = 0, local_start, local_end, domain_start, k
    if s[0] == AT:
        # Source route: checked, then ignored (RFC 5321 §4.1.2, Appendix C).
        while True:
            i = scan_domain(s, i + 1, n)
            if i < 0 or i >= n:
                return PATH_SYNTAX
            if s[i] == COLON:
                i += 1
                break
            if s[i] != COMMA or i + 1 >= n or s[i + 1] != AT:
                return PATH_SYNTAX
            i += 1
    local_start = i
    if i < n and s[i] == DQUOTE:
        i = scan_quoted(s, i, n)
    else:
        i = scan_dot_string(s, i, n)
    if i < 0 or i >= n or s[i] != AT:
        return PATH_SYNTAX
    local_end = i
    domain_start = i + 1
    if domain_start < n and s[domain_start] == LBRACKET:
        i = scan_literal(s, domain_start, n)
    else:
        i = scan_domain(s, domain_start, n)
    if i != n:
        return PATH_SYNTAX
    non_ascii[0] = False
    for k in range(n):
        if s[k] >= 0x80:
            non_ascii[0] = True
            break
    if non_ascii[0] and not utf8_valid(s, n):
        return PATH_SYNTAX
    if local_end - local_start > LOCAL_MAX:
        return PATH_LOCAL_TOO_LONG
    if n - domain_start > DOMAIN_MAX:
        return PATH_DOMAIN_TOO_LONG
    if n + 2 > PATH_MAX:
        return PATH_TOO_LONG
    mailbox_start[0] = local_start
    return PATH_OK


# ---------------------------------------------------------------------------------------------
# ESMTP parameters (RFC 5321 §4.1.2 esmtp-param; each keyword's own RFC for its value)

cdef int param_id(const unsigned char* s, Py_ssize_t n) noexcept:
    if iequal(s, n, b"SIZE"):
        return P_SIZE
    if iequal(s, n, b"BODY"):
        return P_BODY
    if iequal(s, n, b"NOTIFY"):
        return P_NOTIFY
    if iequal(s, n, b"ORCPT"):
        return P_ORCPT
    if iequal(s, n, b"SMTPUTF8"):
        return P_SMTPUTF8
    if iequal(s, n, b"RET"):
        return P_RET
    if iequal(s, n, b"ENVID"):
        return P_ENVID
    if iequal(s, n, b"AUTH"):
        return P_AUTH
    if iequal(s, n, b"REQUIRETLS"):
        return P_REQUIRETLS
    return P_UNKNOWN


cdef object param_key(int pid):
    """The dictionary key of a known keyword (an interned str constant)."""
    if pid == P_SIZE:
        return "SIZE"
    if pid == P_BODY:
        return "BODY"
    if pid == P_NOTIFY:
        return "NOTIFY"
    if pid == P_ORCPT:
        return "ORCPT"
    if pid == P_SMTPUTF8:
        return "SMTPUTF8"
    if pid == P_RET:
        return "RET"
    if pid == P_ENVID:
        return "ENVID"
    if pid == P_AUTH:
        return "AUTH"
    return "REQUIRETLS"


cdef Py_ssize_t xtext_decode(const unsigned char* s, Py_ssize_t n,
                             unsigned char* out) noexcept:
    """RFC 3461 §4 xtext into out (at least n octets); the decoded text must be printable
    ASCII (graphic or space).  Returns the decoded length, or -1."""
    cdef Py_ssize_t i = 0, o = 0
    cdef unsigned char c, hi, lo
    if n == 0:
        return -1
    while i < n:
        c = s[i]
        if c == PLUS:
            if i + 2 >= n:
                return -1
            hi, lo = s[i + 1], s[i + 2]
            if not (CLASSES[hi] & C_HEXUP and CLASSES[lo] & C_HEXUP):
                return -1
            c = ((hi - 48 if hi <= 57 else hi - 55) << 4) | (lo - 48 if lo <= 57 else lo - 55)
            i += 3
        elif CLASSES[c] & C_XCHAR:
            i += 1
        else:
            return -1
        if not (32 <= c <= 126):
            return -1
        out[o] = c
        o += 1
    return o


cdef object notify_value(const unsigned char* s, Py_ssize_t n):
    """RFC 3461 §4.1: NEVER alone, or a comma list of SUCCESS, FAILURE, DELAY without repeats."""
    cdef Py_ssize_t i = 0, j
    cdef int seen = 0, item
    if iequal(s, n, b"NEVER"):
        return "NEVER"
    while True:
        j = i
        while j < n and s[j] != COMMA:
            j += 1
        if iequal(s + i, j - i, b"SUCCESS"):
            item = 1
        elif iequal(s + i, j - i, b"FAILURE"):
            item = 2
        elif iequal(s + i, j - i, b"DELAY"):
            item = 4
        else:
            return None
        if seen & item:
            return None
        seen |= item
        if j == n:
            break
        i = j + 1
    return PyBytes_FromStringAndSize(<char*>s, n).upper().decode("ascii")


cdef object xtext_value(const unsigned char* s, Py_ssize_t n, Py_ssize_t prefix,
                        Py_ssize_t max_decoded):
    """s[:prefix] as is, then s[prefix:] xtext-decoded; None when the xtext is bad or its
    decoded length is over max_decoded (0: no limit)."""
    cdef unsigned char* out = <unsigned char*>PyMem_Malloc(<size_t>n + 1)
    cdef Py_ssize_t decoded
    if out == NULL:
        raise MemoryError()
    try:
        memcpy(out, s, <size_t>prefix)
        decoded = xtext_decode(s + prefix, n - prefix, out + prefix)
        if decoded < 0 or (max_decoded and decoded > max_decoded):
            return None
        return PyUnicode_DecodeASCII(<char*>out, prefix + decoded, NULL)
    finally:
        PyMem_Free(out)


cdef object param_value(int pid, const unsigned char* s, Py_ssize_t n):
    """The stored value of a known keyword's esmtp-value, or None when it is not valid."""
    cdef Py_ssize_t i
    if pid == P_SIZE:
        # RFC 1870: 1*20DIGIT
        if n > SIZE_DIGITS_MAX:
            return None
        for i in range(n):
            if not (CLASSES[s[i]] & C_DIGIT):
                return None
        return PyUnicode_DecodeASCII(<char*>s, n, NULL)
    if pid == P_BODY:
        # RFC 6152, RFC 3030
        if iequal(s, n, b"8BITMIME"):
            return "8BITMIME"
        if iequal(s, n, b"7BIT"):
            return "7BIT"
        if iequal(s, n, b"BINARYMIME"):
            return "BINARYMIME"
        return None
    if pid == P_NOTIFY:
        return notify_value(s, n)
    if pid == P_ORCPT:
        # RFC 3461 §4.2: addr-type ";" xtext, addr-type an atom
        i = 0
        while i < n and s[i] != SEMICOLON:
            if not (CLASSES[s[i]] & C_ATEXT):
                return None
            i += 1
        if i == 0 or i == n:
            return None
        return xtext_value(s, n, i + 1, 0)
    if pid == P_RET:
        # RFC 3461 §4.3
        if iequal(s, n, b"FULL"):
            return "FULL"
        if iequal(s, n, b"HDRS"):
            return "HDRS"
        return None
    if pid == P_ENVID:
        return xtext_value(s, n, 0, ENVID_MAX)
    # P_AUTH, RFC 4954 §5: xtext of a mailbox, or "<>" (which is its own xtext)
    return xtext_value(s, n, 0, 0)


cdef object param_name(const unsigned char* s, Py_ssize_t n):
    return PyBytes_FromStringAndSize(<char*>s, n).upper().decode("ascii")


cdef dict parse_params(const unsigned char* s, Py_ssize_t i, Py_ssize_t n,
                       int allowed, int* seen):
    """The SP-separated esmtp-params in s[i:n], checked left to right."""
    cdef dict params = {}
    cdef Py_ssize_t start, end, k, j
    cdef int pid
    while True:
        while i < n and s[i] == SP:
            i += 1
        if i >= n:
            return params
        start = i
        while i < n and s[i] != SP:
            i += 1
        end = i
        # esmtp-keyword = (ALPHA / DIGIT) *(ALPHA / DIGIT / "-")
        if not (CLASSES[s[start]] & (C_ALPHA | C_DIGIT)):
            raise SmtpSyntaxError(501, "5.5.4", "Bad parameter syntax")
        k = start + 1
        while k < end and CLASSES[s[k]] & C_KEYWORD:
            k += 1
        if k < end and s[k] != EQUALS:
            raise SmtpSyntaxError(501, "5.5.4", "Bad parameter syntax")
        pid = param_id(s + start, k - start)
        if not (pid & allowed):
            raise SmtpSyntaxError(
                555, "5.5.4", param_name(s + start, k - start) + " parameter not recognised"
            )
        key = param_key(pid)
        if seen[0] & pid:
            raise SmtpSyntaxError(501, "5.5.4", "Duplicate " + key + " parameter")
        seen[0] |= pid
        if pid & P_NO_VALUE:
            if k < end:
                raise SmtpSyntaxError(501, "5.5.4", key + " parameter takes no value")
            params[key] = ""
            continue
        k += 1
        if k >= end:
            raise SmtpSyntaxError(501, "5.5.4", key + " parameter needs a value")
        value = None
        for j in range(k, end):
            if not (CLASSES[s[j]] & C_VALUE):
                break
        else:
            value = param_value(pid, s + k, end - k)
        if value is None:
            raise SmtpSyntaxError(501, "5.5.4", "Bad " + key + " parameter value")
        params[key] = value


# ---------------------------------------------------------------------------------------------
# MAIL FROM / RCPT TO


cdef tuple parse_envelope(bytes args, bint is_mail, bint smtputf8):
    cdef const unsigned char* s = <const unsigned char*>PyBytes_AS_STRING(args)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(args)
    cdef Py_ssize_t i, open_at, close_at = -1, mailbox_start = 0, length
    cdef const unsigned char* path
    cdef bint quoted = False, non_ascii = False
    cdef int seen = 0
    cdef PathResult result
    cdef unsigned char c
    status = "5.1.7" if is_mail else "5.1.3"
    if is_mail:
        if n < 5 or not iequal(s, 5, b"FROM:"):
            raise SmtpSyntaxError(501, "5.5.4", "Syntax: MAIL FROM:<address>")
        i = 5
    else:
        if n < 3 or not iequal(s, 3, b"TO:"):
            raise SmtpSyntaxError(501, "5.5.4", "Syntax: RCPT TO:<address>")
        i = 3
    while i < n and s[i] == SP:  # spaces after the colon, as Postfix allows
        i += 1
    open_at = i
    if i < n and s[i] == LT:
        # The path ends at the first ">" outside a quoted string.
        i += 1
        while i < n:
            c = s[i]
            if quoted:
                if c == BACKSLASH:
                    i += 1
                elif c == DQUOTE:
                    quoted = False
            elif c == DQUOTE:
                quoted = True
            elif c == GT:
                close_at = i
                break
            i += 1
    if close_at < 0 or (close_at + 1 < n and s[close_at + 1] != SP):
        raise SmtpSyntaxError(
            501, "5.5.4", "Syntax: MAIL FROM:<address>" if is_mail else "Syntax: RCPT TO:<address>"
        )
    path = s + open_at + 1
    length = close_at - open_at - 1
    if length == 0:
        if not is_mail:
            raise SmtpSyntaxError(501, status, "Bad recipient address syntax")
        mailbox = ""
    elif not is_mail and iequal(path, length, b"POSTMASTER"):
        mailbox = PyUnicode_DecodeASCII(<char*>path, length, NULL)
    else:
        result = check_path(path, length, &mailbox_start, &non_ascii)
        if result == PATH_SYNTAX:
            raise SmtpSyntaxError(
                501,
                status,
                "Bad sender address syntax" if is_mail else "Bad recipient address syntax",
            )
        if result == PATH_LOCAL_TOO_LONG:
            raise SmtpSyntaxError(501, status, "Local part too long")
        if result == PATH_DOMAIN_TOO_LONG:
            raise SmtpSyntaxError(501, status, "Domain too long")
        if result == PATH_TOO_LONG:
            raise SmtpSyntaxError(501, status, "Path too long")
        mailbox = PyUnicode_DecodeUTF8(<char*>path + mailbox_start, length - mailbox_start, NULL)
    params = parse_params(s, close_at + 1, n, P_MAIL if is_mail else P_RCPT, &seen)
    if non_ascii and not (smtputf8 and (not is_mail or seen & P_SMTPUTF8)):
        raise SmtpSyntaxError(553, "5.6.7", "Non-ASCII address requires SMTPUTF8")
    return (mailbox, params)


def parse_mail(bytes args not None, smtputf8=True):
    """(reverse_path, params) of the text after "MAIL "; raises SmtpSyntaxError."""
    return parse_envelope(args, True, smtputf8)


def parse_rcpt(bytes args not None, smtputf8=False):
    """(forward_path, params) of the text after "RCPT "; raises SmtpSyntaxError."""
    return parse_envelope(args, False, smtputf8)
