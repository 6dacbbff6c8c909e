"""Message bodies on the wire: DATA (RFC 5321 §4.1.1.4, §4.5.2), BDAT (RFC 3030), and
outbound dot-stuffing.

The compiled kernel (``ext/data.pyx``) is used unless ``TACHYMAIL_PURE=1``;
``data_py`` is its twin with the same API and byte-for-byte the same results.

``DataReader(max_size=0, store=True)``
    Reads the body that follows a ``354``.  ``feed(chunk)`` returns how many
    bytes of *chunk* it consumed: all of them until the end-of-data line is
    seen, then the offset just past it, with ``done`` set; the caller hands
    the rest of the chunk back to the command reader.  Lines are split at LF.
    Only a line ``".\\r\\n"`` that starts the body or follows a CRLF-ended
    line ends it, so no smuggling sequence (``\\n.\\n``, ``\\n.\\r\\n``,
    ``\\r\\n.\\n``, ``\\r.\\r``, ``\\r\\n\\x00.\\r\\n`` …) does.  A leading dot is
    removed from every other line that starts with one.  ``content()`` is
    the unstuffed message, ending in its last line's terminator; ``size`` its
    length (still counted past ``max_size``); ``max_line`` the longest
    unstuffed line with its terminator (RFC 5321 §4.5.3.1.6 counts CRLF);
    ``bare_lf`` / ``bare_cr`` report an LF not preceded by CR and a CR not
    followed by LF.  Past ``max_size`` (0 = no limit) ``oversize`` is set, what
    was stored is freed, scanning goes on to the end of data and
    ``content()`` is ``b""`` (reply 552 5.3.4).  ``store=False`` only counts.
    Feeding after ``done`` returns 0.  Before ``done`` the attributes cover
    what is decided so far: a "." or ".\\r" that starts a line after a CRLF
    (it may become the end line), and a CR in the last octet fed (bare or
    not), wait for the next octets; ``max_line`` counts finished lines.
    ``max_size < 0`` raises ValueError.

``BdatReader(max_size=0, store=True)``
    One message sent as BDAT chunks.  ``start_chunk(count, last)`` announces
    a chunk of exactly *count* octets; ``feed`` consumes at most what the
    chunk still lacks and returns that number; ``chunk_done`` is set when
    the chunk is complete and ``done`` when the LAST chunk is.  Content is
    taken as is (no dot-stuffing); size, line and bare CR/LF accounting are
    as for DATA, carried across chunk boundaries (a CR ending one chunk and an
    LF starting the next make a CRLF).  When the LAST chunk is complete, an
    unterminated last line counts in ``max_line`` and a final CR is bare.
    ``chunk_done`` is False before the first ``start_chunk``; ``count == 0``
    completes the chunk at once.  ``start_chunk`` raises ValueError for a
    negative count and RuntimeError while a chunk is incomplete or after
    ``done``; ``feed`` with no chunk open returns 0.

``dot_stuff(data) -> bytes``
    The wire form of a message for DATA, without the final ``".\\r\\n"``:
    every line ending becomes CRLF (a bare CR or LF becomes CRLF), a line
    starting with "." gets a second one, and a non-empty message without a
    final line ending gets CRLF.  Returns *data* itself, not a copy, when
    nothing needs changing and *data* is bytes (other buffers then give an
    equal new bytes object); any change makes a new object.  Linear time.

Every input may be bytes, bytearray or a C-contiguous memoryview; the
compiled kernel reads it in place.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tachymail.protocol._data import BdatReader, DataReader, dot_stuff
else:
    from tachymail.protocol._select import load_kernel

    _kernel = load_kernel("data")
    DataReader = _kernel.DataReader
    BdatReader = _kernel.BdatReader
    dot_stuff = _kernel.dot_stuff

__all__ = ["BdatReader", "DataReader", "dot_stuff"]
