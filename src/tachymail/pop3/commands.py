"""POP3 on the wire, with no I/O: command lines, replies, and a message cut into dot-stuffed
pieces for RETR and TOP (RFC 1939, RFC 2449 extensions and response codes, RFC 3206).

Command lines are split by the compiled SMTP line reader
(:class:`tachymail.protocol.commands.LineReader`), which bounds memory the same way for
both protocols; this module turns one line into a keyword and its arguments, formats the
``+OK`` / ``-ERR`` replies, and cuts a stored message into the pieces the session writes.
"""

from __future__ import annotations

from typing import Final

from tachymail.protocol.data import dot_stuff

#: RFC 2449 §4: a command line is at most 255 octets, its CRLF included
MAX_COMMAND_LINE: Final = 255
#: longest SASL continuation line (RFC 5034 lifts the 255-octet limit for them); as SMTP's
AUTH_LINE_LIMIT: Final = 12288
#: octets read from the store per piece of a RETR/TOP (cut back to the last line end)
CHUNK: Final = 64 * 1024
#: RFC 2449 §4: a reply line, CRLF included, is at most 512 octets
_REPLY_TEXT_MAX = 490
_LF = 10
_CR = 13

# RFC 2449 §8 / RFC 3206 response codes
IN_USE: Final = "IN-USE"
AUTH: Final = "AUTH"
SYS_TEMP: Final = "SYS/TEMP"
SYS_PERM: Final = "SYS/PERM"


def parse_number(text: bytes) -> int | None:
    """A message number or line count: decimal digits only (no sign, no spaces), at most
    nine of them; None for anything else."""
    if not 1 <= len(text) <= 9 or not text.isdigit():
        return None
    return int(text)


def ok(text: str = "") -> bytes:
    """A one-line positive reply: ``+OK text``."""
    return f"+OK {text}\r\n".encode() if text else b"+OK\r\n"


def err(text: str, code: str = "") -> bytes:
    """A one-line negative reply, with an RFC 2449/3206 response code when given:
    ``-ERR [IN-USE] text``. The text is cut to fit the 512-octet reply line."""
    text = text[:_REPLY_TEXT_MAX]
    return f"-ERR [{code}] {text}\r\n".encode() if code else f"-ERR {text}\r\n".encode()


def whole_message(data: bytes) -> bytes:
    """The wire form of a whole message that fits one piece (RETR's usual case): dot-stuffed,
    every line ending in CRLF, then the terminating ``.`` line. The same octets as
    :class:`MessageStream` writes for it."""
    return dot_stuff(data) + b".\r\n"


def multiline(first: str, lines: list[str]) -> bytes:
    """``+OK first``, then *lines* (dot-stuffed), then the terminating ``.`` line."""
    body = "".join(f".{line}\r\n" if line.startswith(".") else f"{line}\r\n" for line in lines)
    return f"+OK {first}\r\n{body}.\r\n".encode()


def uidl(uidvalidity: int, uid: int) -> str:
    """A message's unique-id: stable across sessions and restarts while the INBOX keeps its
    UIDVALIDITY, never reused for another message (RFC 1939 §7: 0x21-0x7E, <= 70 chars)."""
    return f"{uidvalidity}.{uid}"


class MessageStream:
    """Cuts a stored message of *size* octets into pieces for RETR, or for TOP when
    *body_lines* >= 0 (the header, the blank line, then that many body lines).

    The caller reads ``want()`` = (offset, length) from the store, hands the bytes to
    :meth:`take`, writes what it returns, and stops when ``done``; then writes
    :meth:`finish`. Pieces end at a line end where one is within reach, so that each is
    dot-stuffed on its own by the compiled kernel; a line longer than a piece is cut and
    continued correctly. Every line on the wire ends in CRLF, and the last one before the
    terminating dot always does. At most one piece is held at a time.
    """

    __slots__ = (
        "_at_line_start",
        "_in_header",
        "_lines_left",
        "chunk",
        "done",
        "offset",
        "sent",
        "size",
    )

    def __init__(self, size: int, body_lines: int = -1, chunk: int = CHUNK) -> None:
        self.size = size
        self.chunk = max(chunk, 2)
        self.offset = 0
        #: octets written so far (wire form, before the terminating dot line)
        self.sent = 0
        self.done = size == 0
        self._lines_left = body_lines
        self._in_header = body_lines >= 0
        self._at_line_start = True  # the wire output so far ends at a line start

    def want(self) -> tuple[int, int]:
        """The (offset, length) of the store to read next."""
        return self.offset, min(self.chunk, self.size - self.offset)

    def take(self, data: bytes) -> bytes:
        """The wire form of the next piece of *data* (read at ``want()``); sets ``done``."""
        if not data:  # the content is shorter than its recorded size: end here
            self.done = True
            return b""
        last = self.offset + len(data) >= self.size
        end = len(data)
        if not last:
            end = data.rfind(b"\n") + 1
            if end == 0:  # one line longer than a piece: cut it, never after a CR
                end = len(data) - 1 if data[-1] == _CR else len(data)
        piece = data[:end] if end < len(data) else data
        if self._lines_left >= 0:
            cut = self._top_cut(piece)
            if cut is not None:
                piece = piece[:cut]
                last = True
        self.offset += end
        if last:
            self.done = True
        if not piece:
            return b""
        # A piece that continues a line: its first octet is no line start.
        wire = dot_stuff(piece) if self._at_line_start else dot_stuff(b"x" + piece)[1:]
        if piece[-1] != _LF and piece[-1] != _CR:
            wire = wire[:-2]  # dot_stuff ended the unfinished line, which goes on
            self._at_line_start = False
        else:
            self._at_line_start = True  # dot_stuff made a final bare CR a CRLF
        self.sent += len(wire)
        return wire

    def finish(self) -> bytes:
        """The end of the multi-line reply: a CRLF if the last line lacked one, then ``.``."""
        return b".\r\n" if self._at_line_start else b"\r\n.\r\n"

    def _top_cut(self, piece: bytes) -> int | None:
        """Where TOP's output ends inside *piece*, or None when it goes on past it."""
        pos, size = 0, len(piece)
        line_start = self._at_line_start
        if self._in_header:
            while pos < size:
                if line_start and (piece.startswith(b"\r\n", pos) or piece.startswith(b"\n", pos)):
                    pos = piece.index(b"\n", pos) + 1  # the blank line ends the header
                    self._in_header = False
                    break
                end = piece.find(b"\n", pos)
                if end < 0:
                    return None  # a header line continues in the next piece
                pos = end + 1
                line_start = True
            else:
                return None
        left = self._lines_left
        if left == 0:
            return pos
        found = piece.count(b"\n", pos)
        if found < left:
            self._lines_left = left - found
            return None
        for _ in range(left):
            pos = piece.index(b"\n", pos) + 1
        self._lines_left = 0
        return pos
