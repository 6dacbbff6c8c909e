"""Pure-Python twin of the compiled DATA / BDAT / dot-stuffing kernel (``ext/data.pyx``).

Same API and byte-for-byte the same results; see ``tachymail.protocol.data`` for what a caller
may rely on.  Every step is a C-level bytes operation (find, count, replace, split) over a whole
chunk, never a Python loop per line or per octet, and each chunk is scanned a fixed number of
times, so a long unterminated line costs linear time.
"""

from __future__ import annotations

__all__ = ["BdatReader", "DataReader", "dot_stuff"]

Buffer = bytes | bytearray | memoryview

_END = b"\r\n.\r\n"  # a ".\r\n" line after a CRLF-ended line: the only end of data
_CR = 0x0D
_LF = 0x0A
_DOT = 0x2E


def _as_bytes(data: Buffer) -> bytes:
    """The octets of *data* as bytes (a copy unless it is bytes already)."""
    if type(data) is bytes:
        return data
    view = memoryview(data)  # TypeError for anything that is not a buffer
    if not view.c_contiguous:
        raise BufferError("memoryview: underlying buffer is not C-contiguous")
    return view.tobytes()


class _MessageBody:
    """Stored content and the counters DATA and BDAT share."""

    __slots__ = (
        "_bare_cr",
        "_bare_lf",
        "_done",
        "_line_len",
        "_max_line",
        "_max_size",
        "_oversize",
        "_parts",
        "_prev_cr",
        "_size",
        "_storing",
    )

    def __init__(self, max_size: int = 0, store: bool = True) -> None:
        if max_size < 0:
            raise ValueError("max_size must be >= 0")
        self._max_size = max_size
        self._storing = bool(store)
        self._parts: list[bytes] = []
        self._done = False
        self._size = 0
        self._max_line = 0
        self._line_len = 0  # octets of the line in progress
        self._bare_cr = False
        self._bare_lf = False
        self._oversize = False
        self._prev_cr = False  # the last octet fed was a CR whose successor is not known yet

    def content(self) -> bytes:
        """The content so far (b"" when not stored or over max_size)."""
        if not self._storing:
            return b""
        parts = self._parts
        if len(parts) > 1:
            parts[:] = [b"".join(parts)]
        return parts[0] if parts else b""

    @property
    def done(self) -> bool:
        return self._done

    @property
    def size(self) -> int:
        return self._size

    @property
    def max_line(self) -> int:
        return self._max_line

    @property
    def bare_cr(self) -> bool:
        return self._bare_cr

    @property
    def bare_lf(self) -> bool:
        return self._bare_lf

    @property
    def oversize(self) -> bool:
        return self._oversize

    def _count_bare(self, octets: bytes) -> None:
        """Bare CR / LF flags over *octets* (non-empty), which continue the stream."""
        if not (self._bare_cr and self._bare_lf):
            joined = self._prev_cr and octets[0] == _LF  # a CRLF split between two chunks
            crlf = octets.count(b"\r\n") + joined
            if not self._bare_lf and octets.count(b"\n") > crlf:
                self._bare_lf = True
            if not self._bare_cr:
                # A CR in the last octet is decided by the next chunk; one left before, now.
                decided = octets.count(b"\r") - (octets[-1] == _CR) + self._prev_cr
                if decided > crlf:
                    self._bare_cr = True
        self._prev_cr = octets[-1] == _CR

    def _count_lines(self, content: bytes) -> None:
        """Line lengths over *content* (non-empty), which continues the content."""
        lines = content.split(b"\n")
        if len(lines) == 1:
            self._line_len += len(content)
            return
        rest = lines.pop()
        # lines[0] finishes the line in progress; counting it alone too does no harm.
        longest = max(self._line_len + len(lines[0]), max(map(len, lines))) + 1
        if longest > self._max_line:
            self._max_line = longest
        self._line_len = len(rest)

    def _keep(self, content: bytes) -> None:
        """Count *content*, and store it unless storing is off or max_size is passed."""
        self._size += len(content)
        if self._max_size and self._size > self._max_size and not self._oversize:
            # Past the limit: free what was kept, keep counting to the end of the message.
            self._oversize = True
            self._storing = False
            self._parts = []
        if self._storing:
            self._parts.append(content)


class DataReader(_MessageBody):
    """The body after ``354``: finds the end-of-data line and removes dot-stuffing."""

    __slots__ = ("_hold", "_hold_proper", "_tail")

    def __init__(self, max_size: int = 0, store: bool = True) -> None:
        super().__init__(max_size, store)
        # The last 4 octets of the stream, to find an end line split across chunks; the body
        # starts as if after a CRLF.
        self._tail = b"\r\n"
        # Octets not yet turned into content when the stream stops at a line start: the LF
        # (already content, or virtual at the body start), then "" or, after a CRLF, "." or
        # ".\r", which the next octets may turn into the end line.  b"" when mid-line.
        self._hold = b"\n"
        self._hold_proper = True  # that LF ends a CRLF (or is the virtual one)

    def feed(self, data: Buffer) -> int:
        """Consume *data*; return how many octets were used (fewer only at the end of data)."""
        if self._done:
            return 0
        data = _as_bytes(data)
        if not data:
            return 0
        tail = self._tail
        # Position in data of the end line's ".", or None; it may lie in an earlier chunk.
        dot: int | None = None
        at = (tail + data[:4]).find(_END)
        if at >= 0:
            dot = at - len(tail) + 2
        else:
            at = data.find(_END)
            if at >= 0:
                dot = at + 2
        hold = self._hold
        if dot is None:
            used = len(data)
            prev_cr = self._prev_cr
            self._count_bare(data)
            self._tail = (tail + data[-4:])[-4:]
            text = hold + data if hold else data
            lf = text.rfind(b"\n")
            keep = len(text) - lf - 1  # octets after the last LF
            if lf < 0 or keep > 2:
                self._hold = b""
            else:
                # Whether the last LF ends a CRLF; at text[0] it is the held one or the
                # first octet of data.
                proper = text[lf - 1] == _CR if lf else (self._hold_proper if hold else prev_cr)
                if keep == 0:
                    self._hold = b"\n"
                    self._hold_proper = proper
                elif proper and text[lf + 1] == _DOT and (keep == 1 or text[-1] == _CR):
                    # "." or ".\r" after a CRLF may start the end line: wait for more.
                    self._hold = text[lf:]
                    self._hold_proper = True
                else:
                    self._hold = b""
            if self._hold:
                text = text[: lf + 1]
        else:
            used = dot + 3
            self._count_bare(data[:used])
            self._done = True
            # A "." before this chunk was held, not content; otherwise content ends at its LF.
            text = hold + data[:dot] if dot > 0 else b""
        if len(text) > len(hold):
            # A leading dot on every line is stuffing; hold's first octet (an LF) is not new.
            content = b"\n".join(text.split(b"\n."))
            if hold:
                content = content[1:]
            if content:
                self._count_lines(content)
                self._keep(content)
        return used


class BdatReader(_MessageBody):
    """One message sent in BDAT chunks (RFC 3030): content is taken octet for octet."""

    __slots__ = ("_last", "_remaining", "_started")

    def __init__(self, max_size: int = 0, store: bool = True) -> None:
        super().__init__(max_size, store)
        self._remaining = 0  # octets the current chunk still lacks
        self._last = False
        self._started = False

    @property
    def chunk_done(self) -> bool:
        return self._started and self._remaining == 0

    def start_chunk(self, count: int, last: bool = False) -> None:
        """Announce the next chunk of *count* octets (the final one when *last*)."""
        if count < 0:
            raise ValueError("BDAT chunk size must be >= 0")
        if self._done:
            raise RuntimeError("BDAT message already complete")
        if self._remaining:
            raise RuntimeError("BDAT chunk still incomplete")
        self._started = True
        self._remaining = count
        self._last = bool(last)
        if count == 0:
            self._complete_chunk()

    def feed(self, data: Buffer) -> int:
        """Consume at most what the current chunk still lacks; return that number."""
        if self._done:
            return 0
        data = _as_bytes(data)
        take = min(len(data), self._remaining)
        if take == 0:
            return 0
        part = data[:take]
        self._count_bare(part)
        self._count_lines(part)
        self._keep(part)
        self._remaining -= take
        if self._remaining == 0:
            self._complete_chunk()
        return take

    def _complete_chunk(self) -> None:
        if not self._last:
            return
        self._done = True
        # The message ends here: a CR still waiting for its LF is bare, an open line counts.
        if self._prev_cr:
            self._bare_cr = True
        if self._line_len > self._max_line:
            self._max_line = self._line_len


def dot_stuff(data: Buffer) -> bytes:
    """The DATA wire form of *data* without the final ".\\r\\n"; *data* itself if unchanged.

    A bytes input that needs no change is returned as is (same object); any other input that
    needs no change is returned as a new bytes object with the same octets.
    """
    raw = _as_bytes(data)
    crlf = raw.count(b"\r\n")
    normal = raw.count(b"\n") == crlf and raw.count(b"\r") == crlf
    if normal and (not raw or (raw[0] != _DOT and b"\n." not in raw and raw[-2:] == b"\r\n")):
        return raw
    out = raw
    if not normal:
        # CRLF first, so that only bare CRs are left to become line ends of their own.
        out = out.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    out = out.replace(b"\r\n.", b"\r\n..")
    if out[0] == _DOT:
        out = b"." + out
    if out[-1] != _LF:
        out += b"\r\n"
    return out
