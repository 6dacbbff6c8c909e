# Constants and inline byte helpers of the MIME scanner, cimported by ext/mime.pyx
# (`from mime cimport ...`).
#
# setup.py names the module tachymail.protocol._mime, so Cython does not take this file as the
# module's own .pxd (it would look for tachymail/protocol/_mime.pxd).  It therefore holds only
# what needs no runtime module; the extension types (Part, _Scanner) are declared in mime.pyx.

from libc.stdint cimport uint64_t
from libc.string cimport memchr, memcmp, memcpy


# What the scanner does with the bytes after a part's header block (Part._mode).
cdef enum:
    HEADERS = 0   # still reading header lines
    LEAF = 1      # body not split: only ancestors' boundary lines matter
    PREAMBLE = 2  # multipart before its first boundary line
    PARTS = 3     # multipart with a child part open
    EPILOGUE = 4  # multipart after its closing boundary line
    MESSAGE = 5   # message/rfc822 whose encapsulated message is open


cdef inline unsigned char lower_ascii(unsigned char c) noexcept nogil:
    return c + 32 if 65 <= c <= 90 else c


cdef inline Py_ssize_t find_lf(const unsigned char* d, Py_ssize_t pos, Py_ssize_t n) noexcept nogil:
    """Index of the next LF at or after *pos*, or *n*."""
    cdef const void* hit
    if pos >= n:
        return n
    hit = memchr(d + pos, 10, <size_t>(n - pos))
    return n if hit == NULL else <const unsigned char*>hit - d


cdef inline bint is_field_line(const unsigned char* d, Py_ssize_t pos, Py_ssize_t end) noexcept nogil:
    """An mbox "From " line or a field "name:" (the header lines email.feedparser accepts)."""
    cdef Py_ssize_t i = pos
    if end - pos >= 5 and memcmp(d + pos, b"From ", 5) == 0:
        return True
    while i < end:
        if d[i] == 0x3A:
            return True
        if d[i] < 0x21 or d[i] > 0x7E:
            return False
        i += 1
    return False


cdef inline Py_ssize_t field_colon(const unsigned char* d, Py_ssize_t pos, Py_ssize_t end) noexcept nogil:
    """Index of the colon ending a field name that starts at *pos*, or -1."""
    cdef Py_ssize_t i = pos
    while i < end:
        if d[i] == 0x3A:
            return i
        if d[i] < 0x21 or d[i] > 0x7E:
            return -1
        i += 1
    return -1


cdef inline bint any_8bit(const unsigned char* d, Py_ssize_t start, Py_ssize_t end) noexcept nogil:
    """True when a byte in d[start:end] is >= 0x80; reads eight bytes at a time."""
    cdef uint64_t w0, w1, w2, w3
    while end - start >= 32:
        memcpy(&w0, d + start, 8)
        memcpy(&w1, d + start + 8, 8)
        memcpy(&w2, d + start + 16, 8)
        memcpy(&w3, d + start + 24, 8)
        if (w0 | w1 | w2 | w3) & 0x8080808080808080ULL:
            return True
        start += 32
    while end - start >= 8:
        memcpy(&w0, d + start, 8)
        if w0 & 0x8080808080808080ULL:
            return True
        start += 8
    while start < end:
        if d[start] & 0x80:
            return True
        start += 1
    return False


cdef inline Py_ssize_t eol_before(const unsigned char* d, Py_ssize_t pos) noexcept nogil:
    """Length of the line break (CRLF, LF or CR) just before *pos*."""
    if pos <= 0:
        return 0
    if d[pos - 1] == 10:
        return 2 if pos >= 2 and d[pos - 2] == 13 else 1
    return 1 if d[pos - 1] == 13 else 0


cdef inline Py_ssize_t skip_comment(const unsigned char* v, Py_ssize_t i, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t depth = 0
    while i < n:
        if v[i] == 92:  # backslash: the next byte is quoted
            i += 2
            continue
        if v[i] == 40:
            depth += 1
        elif v[i] == 41:
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return n


cdef inline Py_ssize_t read_quoted(const unsigned char* v, Py_ssize_t i, Py_ssize_t n,
                               unsigned char* out, Py_ssize_t* out_len) noexcept nogil:
    """Read the quoted string at v[i] == '"'; unquoted text goes to *out* when not NULL.

    A backslash quotes any byte; a lone backslash at the very end is left unread; a string
    that is not closed runs to the end.  Returns the index after the string.
    """
    cdef Py_ssize_t k = 0
    i += 1
    while i < n:
        if v[i] == 34:
            i += 1
            break
        if v[i] == 92:
            if i + 1 >= n:
                break
            i += 1
        if out != NULL:
            out[k] = v[i]
        k += 1
        i += 1
    if out_len != NULL:
        out_len[0] = k
    return i
