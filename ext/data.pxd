# Declarations for the DATA / BDAT / dot-stuffing kernel, cimported by ext/data.pyx
# (`from data cimport ...`).
#
# setup.py names the module tachymail.protocol._data, so Cython does not take this file as the
# module's own .pxd (it would look for tachymail/protocol/_data.pxd). It therefore holds only
# what needs no runtime module: constants, the scan state, and the content buffer with its
# inline helpers. The extension types are declared in data.pyx.

from libc.stdlib cimport free, realloc
from libc.string cimport memchr, memcpy


cdef enum:
    CR = 13
    LF = 10
    DOT = 46
    FIRST_CAPACITY = 16384   # first allocation of a content buffer, in octets


cdef enum LineState:
    # Where the DATA scan stands between two chunks.
    START_PROPER = 0  # at a line start after CRLF, or at the body start: ".\r\n" here ends data
    START_BARE = 1    # at a line start after a bare LF: a leading "." is only removed
    DOT_PENDING = 2   # "." seen at a START_PROPER line start
    DOT_CR_PENDING = 3  # ".\r" seen at a START_PROPER line start
    MID_LINE = 4      # inside a line


cdef struct ContentBuffer:
    # Stored message content: malloc'd, grown geometrically, NULL until the first octet.
    unsigned char* data
    Py_ssize_t length
    Py_ssize_t capacity


cdef inline int buffer_append(ContentBuffer* buf, const unsigned char* p,
                              Py_ssize_t n) except -1 nogil:
    """Append n > 0 octets; -1 (with MemoryError set) when memory runs out."""
    cdef Py_ssize_t need = buf.length + n
    cdef Py_ssize_t capacity
    cdef unsigned char* grown
    if need > buf.capacity:
        capacity = buf.capacity * 2
        if capacity < need:
            capacity = need
        if capacity < FIRST_CAPACITY:
            capacity = FIRST_CAPACITY
        grown = <unsigned char*>realloc(buf.data, <size_t>capacity)
        if grown == NULL:
            with gil:
                raise MemoryError()
        buf.data = grown
        buf.capacity = capacity
    memcpy(buf.data + buf.length, p, <size_t>n)
    buf.length = need
    return 0


cdef inline void buffer_free(ContentBuffer* buf) noexcept nogil:
    free(buf.data)
    buf.data = NULL
    buf.length = 0
    buf.capacity = 0


cdef inline bint has_cr(const unsigned char* p, Py_ssize_t n) noexcept nogil:
    """True when p[:n] holds a CR (False for n <= 0)."""
    return n > 0 and memchr(p, CR, <size_t>n) != NULL
