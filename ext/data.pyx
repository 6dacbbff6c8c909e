"""Message bodies on the wire: DATA end-of-data search with dot-unstuffing, BDAT chunk
framing, and dot-stuffing for outbound DATA.

The API and its guarantees are documented in ``tachymail/protocol/data.py``;
``tachymail/protocol/data_py.py`` is the pure-Python twin with byte-for-byte the same results.
Every input (bytes, bytearray, memoryview) is read in place through the buffer protocol.
"""

cimport cython
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_FromStringAndSize
from libc.string cimport memchr, memcpy

# data.pxd: constants, scan states and the content buffer (see there why it is cimported).
from data cimport (
    CR,
    DOT,
    DOT_CR_PENDING,
    DOT_PENDING,
    LF,
    MID_LINE,
    START_BARE,
    START_PROPER,
    ContentBuffer,
    LineState,
    buffer_append,
    buffer_free,
    has_cr,
)

__all__ = ["BdatReader", "DataReader", "dot_stuff"]

# The CR of a pending ".\r" that turns out not to end the data: it is content then.
cdef unsigned char CR_OCTET = CR


cdef class _MessageBody:
    """Stored content and the counters DATA and BDAT share."""

    cdef ContentBuffer buf
    cdef Py_ssize_t max_size
    cdef Py_ssize_t total      # content octets seen, stored or not
    cdef Py_ssize_t longest    # longest finished line, terminator included
    cdef Py_ssize_t line_len   # octets of the line in progress
    cdef bint storing
    cdef bint finished
    cdef bint saw_bare_cr
    cdef bint saw_bare_lf
    cdef bint too_big
    cdef bint prev_cr          # the last octet fed was a CR whose successor is not known yet

    def __cinit__(self, Py_ssize_t max_size=0, bint store=True):
        if max_size < 0:
            raise ValueError("max_size must be >= 0")
        self.max_size = max_size
        self.storing = store

    def __dealloc__(self):
        buffer_free(&self.buf)

    cdef int emit(self, const unsigned char* p, Py_ssize_t n) except -1:
        """Add n content octets: count them, and store them unless storing is off."""
        if n <= 0:
            return 0
        self.total += n
        if self.max_size and self.total > self.max_size and not self.too_big:
            # Past the limit: free what was kept, keep counting to the end of the message.
            self.too_big = True
            self.storing = False
            buffer_free(&self.buf)
        if self.storing:
            buffer_append(&self.buf, p, n)
        return 0

    def content(self):
        """The content so far (b"" when not stored or over max_size), as a new bytes object."""
        if not self.storing or self.buf.length == 0:
            return b""
        return PyBytes_FromStringAndSize(<char*>self.buf.data, self.buf.length)

    @property
    def done(self):
        return self.finished

    @property
    def size(self):
        return self.total

    @property
    def max_line(self):
        return self.longest

    @property
    def bare_cr(self):
        return self.saw_bare_cr

    @property
    def bare_lf(self):
        return self.saw_bare_lf

    @property
    def oversize(self):
        return self.too_big


@cython.final
cdef class DataReader(_MessageBody):
    """The body after ``354``: finds the end-of-data line and removes dot-stuffing."""

    cdef LineState state

    def feed(self, data):
        """Consume *data*; return how many octets were used (fewer only at the end of data)."""
        cdef Py_buffer view
        cdef Py_ssize_t used
        if self.finished:
            return 0
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            if view.len == 0:
                return 0
            used = self.scan(<const unsigned char*>view.buf, view.len)
        finally:
            PyBuffer_Release(&view)
        return used

    cdef Py_ssize_t scan(self, const unsigned char* p, Py_ssize_t n) except -1:
        cdef Py_ssize_t pos = 0, run = 0, lf
        cdef const unsigned char* hit
        cdef bint proper_start = False
        cdef bint prev_cr = self.prev_cr

        if prev_cr and p[0] != LF:
            self.saw_bare_cr = True
        # Resolve what the previous chunk left undecided.
        if self.state == DOT_CR_PENDING:
            if p[0] == LF:
                self.finished = True
                return 1
            # ".\r" then something else: the dot is stuffing, the CR is content (and bare).
            self.emit(&CR_OCTET, 1)
            self.line_len += 1
        elif self.state == DOT_PENDING:
            if p[0] == CR:
                if n == 1:
                    self.state = DOT_CR_PENDING
                    self.prev_cr = True
                    return 1
                if p[1] == LF:
                    self.finished = True
                    return 2
        elif self.state == START_BARE:
            if p[0] == DOT:
                pos = run = 1
        elif self.state == START_PROPER:
            proper_start = True
        self.state = MID_LINE

        while True:
            if proper_start:
                if pos == n:
                    self.state = START_PROPER
                    break
                if p[pos] == DOT:
                    # The end line, or a stuffed dot: decide on the next two octets.
                    if pos + 1 == n:
                        self.emit(p + run, pos - run)
                        self.state = DOT_PENDING
                        self.prev_cr = False
                        return n
                    if p[pos + 1] == CR:
                        if pos + 2 == n:
                            self.emit(p + run, pos - run)
                            self.state = DOT_CR_PENDING
                            self.prev_cr = True
                            return n
                        if p[pos + 2] == LF:
                            self.emit(p + run, pos - run)
                            self.finished = True
                            return pos + 3
                    self.emit(p + run, pos - run)
                    pos += 1
                    run = pos
            # Inside a line: find its LF.
            hit = <const unsigned char*>memchr(p + pos, LF, <size_t>(n - pos))
            if hit == NULL:
                # A CR in the last octet waits for the next chunk.
                if not self.saw_bare_cr and has_cr(p + pos, n - 1 - pos):
                    self.saw_bare_cr = True
                self.line_len += n - pos
                pos = n
                break
            lf = hit - p
            if not self.saw_bare_cr and has_cr(p + pos, lf - 1 - pos):
                self.saw_bare_cr = True
            self.line_len += lf + 1 - pos
            if self.line_len > self.longest:
                self.longest = self.line_len
            self.line_len = 0
            proper_start = p[lf - 1] == CR if lf > 0 else prev_cr
            pos = lf + 1
            if not proper_start:
                self.saw_bare_lf = True
                # After a bare LF nothing ends the data, but a leading dot is still stuffing.
                if pos == n:
                    self.state = START_BARE
                    break
                if p[pos] == DOT:
                    self.emit(p + run, pos - run)
                    pos += 1
                    run = pos
        self.emit(p + run, n - run)
        self.prev_cr = p[n - 1] == CR
        return n


@cython.final
cdef class BdatReader(_MessageBody):
    """One message sent in BDAT chunks (RFC 3030): content is taken octet for octet."""

    cdef Py_ssize_t remaining  # octets the current chunk still lacks
    cdef bint last
    cdef bint started

    def start_chunk(self, Py_ssize_t count, bint last=False):
        """Announce the next chunk of *count* octets (the final one when *last*)."""
        if count < 0:
            raise ValueError("BDAT chunk size must be >= 0")
        if self.finished:
            raise RuntimeError("BDAT message already complete")
        if self.remaining:
            raise RuntimeError("BDAT chunk still incomplete")
        self.started = True
        self.remaining = count
        self.last = last
        if count == 0:
            self.complete_chunk()

    def feed(self, data):
        """Consume at most what the current chunk still lacks; return that number."""
        cdef Py_buffer view
        cdef Py_ssize_t take
        if self.finished:
            return 0
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            take = min(view.len, self.remaining)
            if take == 0:
                return 0
            self.account(<const unsigned char*>view.buf, take)
            self.emit(<const unsigned char*>view.buf, take)
        finally:
            PyBuffer_Release(&view)
        self.remaining -= take
        if self.remaining == 0:
            self.complete_chunk()
        return take

    @property
    def chunk_done(self):
        return self.started and self.remaining == 0

    cdef void complete_chunk(self) noexcept:
        if not self.last:
            return
        self.finished = True
        # The message ends here: a CR still waiting for its LF is bare, an open line counts.
        if self.prev_cr:
            self.saw_bare_cr = True
        if self.line_len > self.longest:
            self.longest = self.line_len

    cdef void account(self, const unsigned char* p, Py_ssize_t n) noexcept:
        """Line lengths and bare CR / LF over n >= 1 octets that continue the message."""
        cdef Py_ssize_t pos = 0, lf
        cdef const unsigned char* hit
        if self.prev_cr and p[0] != LF:
            self.saw_bare_cr = True
        while True:
            hit = <const unsigned char*>memchr(p + pos, LF, <size_t>(n - pos))
            if hit == NULL:
                if not self.saw_bare_cr and has_cr(p + pos, n - 1 - pos):
                    self.saw_bare_cr = True
                self.line_len += n - pos
                break
            lf = hit - p
            if not self.saw_bare_cr and has_cr(p + pos, lf - 1 - pos):
                self.saw_bare_cr = True
            if not self.saw_bare_lf and not (p[lf - 1] == CR if lf > 0 else self.prev_cr):
                self.saw_bare_lf = True
            self.line_len += lf + 1 - pos
            if self.line_len > self.longest:
                self.longest = self.line_len
            self.line_len = 0
            pos = lf + 1
            if pos == n:
                break
        self.prev_cr = p[n - 1] == CR


cdef Py_ssize_t stuffed_length(const unsigned char* p, Py_ssize_t n,
                               unsigned char* out) noexcept nogil:
    """Length of the dot-stuffed form of p[:n]; also writes it to out unless out is NULL.

    Lines end at CRLF, a bare CR or a bare LF; each ending becomes CRLF, a leading "." is
    doubled and an unterminated last line gets CRLF.
    """
    cdef Py_ssize_t pos = 0, o = 0, next_lf = -1, end, step
    cdef const unsigned char* hit
    while pos < n:
        if p[pos] == DOT:
            if out != NULL:
                out[o] = DOT
            o += 1
        # The next LF is remembered: many bare CRs before it must not rescan the line.
        if next_lf < pos:
            hit = <const unsigned char*>memchr(p + pos, LF, <size_t>(n - pos))
            next_lf = hit - p if hit != NULL else n
        hit = <const unsigned char*>memchr(p + pos, CR, <size_t>(next_lf - pos))
        if hit != NULL:
            end = hit - p
            step = 2 if end + 1 < n and p[end + 1] == LF else 1
        else:
            end = next_lf
            step = 1
        if out != NULL:
            memcpy(out + o, p + pos, <size_t>(end - pos))
            out[o + end - pos] = CR
            out[o + end - pos + 1] = LF
        o += end - pos + 2
        pos = end + step
    return o


def dot_stuff(data):
    """The DATA wire form of *data* without the final ".\\r\\n"; *data* itself if unchanged.

    A bytes input that needs no change is returned as is (same object); any other input that
    needs no change is returned as a new bytes object with the same octets.
    """
    cdef Py_buffer view
    cdef Py_ssize_t size
    cdef bytes result
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        size = stuffed_length(<const unsigned char*>view.buf, view.len, NULL)
        if size == view.len:
            # Every change adds octets, so an equal length means nothing to change.
            if PyBytes_CheckExact(data):
                return data
            return PyBytes_FromStringAndSize(<char*>view.buf, view.len)
        result = PyBytes_FromStringAndSize(NULL, size)
        stuffed_length(<const unsigned char*>view.buf, view.len,
                       <unsigned char*>PyBytes_AS_STRING(result))
        return result
    finally:
        PyBuffer_Release(&view)
