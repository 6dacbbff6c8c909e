"""8BITMIME downgrade (RFC 6152 §3): re-encode a message for a peer that only takes 7-bit.

``needs_8bit(content)`` says whether a message holds any byte >= 0x80; ``downgrade(content)``
turns every 8-bit leaf body into quoted-printable, or says the conversion is impossible.
The MIME structure comes from the compiled scanner (``tachymail.protocol.mime.scan``): the
message is never parsed into objects, only the byte ranges that change are rewritten.

What ``downgrade`` does, part by part (the tree ``scan`` returns):

- A leaf whose body has 8-bit bytes and whose Content-Transfer-Encoding is ``8bit`` or
  absent/``7bit`` (mislabelled) gets a quoted-printable body (RFC 2045 §6.7): lines of at most
  76 characters, CRLF line ends, its Content-Transfer-Encoding field replaced (or added at the
  end of its header block). A body whose line breaks are all CRLF keeps them as hard line
  breaks; one with a bare CR, a bare LF or NUL is encoded as binary data (every CR and LF as
  ``=0D``/``=0A``), so in both cases decoding gives back exactly the original bytes.
  When the 8-bit leaf is the top-level part of the message (or of an encapsulated one) and
  has no MIME-Version field, ``MIME-Version: 1.0`` is added: the encoding means nothing
  without it.
- A multipart or ``message/rfc822`` part labelled ``8bit`` or ``binary`` is relabelled
  ``7bit`` (its content is 7-bit once its leaves are converted).
- A ``message/global`` part (RFC 6532) holding 8-bit bytes, in its headers or anywhere
  below, is quoted-printable encoded whole, as RFC 6532 §3.5 allows.
- Nothing else changes: 7-bit parts, headers and boundaries are copied byte for byte.

It returns None, and the caller must bounce (RFC 6152: "return the message as
undeliverable") or find another route, when the conversion is impossible or unsafe:

- an 8-bit byte in any header block, including the headers of an encapsulated message
  (that message needs SMTPUTF8, RFC 6531; headers cannot be re-encoded without changing
  what the recipient sees);
- an 8-bit byte in a multipart's preamble, epilogue or boundary lines (not content any
  reader shows, but not ours to rewrite either);
- an 8-bit leaf body labelled ``binary``, ``base64``, ``quoted-printable`` or an unknown
  encoding (invalid or not convertible to a 7-bit encoding without guessing);
- an 8-bit body in a part that may not be encoded (RFC 2045 §6.4): a ``multipart/*`` or a
  ``message/*`` type other than ``message/global*`` (RFC 6532 §3.5 allows encoding those)
  that the scanner left as a leaf. That is where the scanner's defects that make the
  structure unsafe end up: ``"no boundary"`` and ``"start boundary not found"`` (a multipart
  whose parts cannot be found) and ``"too deep"`` (a part nested beyond the scan depth).
  The other defects are harmless here: ``"close boundary not found"`` (the last part runs to
  the end, as every reader sees it), ``"invalid content-type"`` (read as text/plain, as
  readers do) and ``"missing blank line after headers"`` (the rewritten part gets one).
"""

from __future__ import annotations

import binascii
import re

from tachymail.protocol.mime import Part, scan

__all__ = ["downgrade", "needs_8bit", "qp_encode"]

# Encodings whose 8-bit body we may re-encode: "7bit" is the default when the field is absent.
_CONVERTIBLE = frozenset({"7bit", "8bit"})
# Labels of a multipart or message that are wrong once its content is 7-bit.
_RELABEL = frozenset({"8bit", "binary"})
# A header field starting at a line start, with its continuation lines.
_CTE_FIELD = re.compile(rb"^content-transfer-encoding[ \t]*:.*(?:\r?\n[ \t].*)*\r?\n?", re.I | re.M)
_MIME_VERSION = re.compile(rb"^mime-version[ \t]*:", re.I | re.M)
_QP = b"Content-Transfer-Encoding: quoted-printable\r\n"
_7BIT = b"Content-Transfer-Encoding: 7bit\r\n"


class _Impossible(Exception):
    """The message cannot be made 7-bit; downgrade returns None."""


def needs_8bit(content: bytes) -> bool:
    """True when *content* holds any byte >= 0x80 (it needs 8BITMIME or a downgrade)."""
    return not content.isascii()


def qp_encode(data: bytes) -> bytes:
    """*data* as quoted-printable (RFC 2045 §6.7) with CRLF line ends and lines <= 76 chars.

    When every line break of *data* is CRLF (and it holds no NUL) they stay hard line breaks;
    otherwise every CR and LF is encoded. ``binascii.a2b_qp`` of the result is *data*.
    """
    # Text lines only when every line break is CRLF and there is no NUL; else binary data.
    crlf = data.count(b"\r\n")
    text = data.count(b"\n") == crlf and data.count(b"\r") == crlf and b"\x00" not in data
    encoded = binascii.b2a_qp(data, quotetabs=False, istext=text, header=False)
    # b2a_qp picks LF or CRLF for its soft breaks from the first line break it sees; every
    # raw CR or LF left in its output is a line break, so make them all CRLF.
    if b"\n" in encoded:
        encoded = encoded.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    return encoded


def downgrade(content: bytes) -> bytes | None:
    """*content* made 7-bit for a peer without 8BITMIME, or None when that is impossible.

    An all-ASCII message is returned as is (the same object). Otherwise the result is pure
    ASCII, every converted part decodes to its original bytes, and everything else is
    unchanged; see the module docstring for exactly what changes and when None is returned
    (the caller then bounces with 5.6.3 "conversion required but not supported", RFC 3463).
    """
    if content.isascii():
        return content
    root = scan(content)
    edits: list[tuple[int, int, bytes]] = []
    try:
        _plan(content, root, edits)
    except _Impossible:
        return None
    edits.sort()
    out: list[bytes] = []
    at = 0
    for start, end, replacement in edits:
        out.append(content[at:start])
        out.append(replacement)
        at = end
    out.append(content[at:])
    result = b"".join(out)
    if not result.isascii():  # a case the rules above missed: never send 8-bit to this peer
        return None
    return result


def _plan(content: bytes, root: Part, edits: list[tuple[int, int, bytes]]) -> None:
    """Add (start, end, replacement) edits for every part of the tree under *root*."""
    stack = [(root, True)]  # (part, whether it is the top-level part of a message)
    while stack:  # no recursion: trees may be deep
        part, top = stack.pop()
        headers = part.header_bytes(content)
        if not headers.isascii():
            raise _Impossible("8-bit header")
        if part.children and part.content_type == "message/global":
            body = part.body_bytes(content)
            if not body.isascii():  # RFC 6532 §3.5: a message/global may be encoded whole
                edits.append((part.start, part.end, _relabel(headers, _QP) + qp_encode(body)))
                continue
        if part.children:
            if part.has_8bit:  # not the headers: preamble, epilogue or boundary lines
                raise _Impossible("8-bit bytes outside the parts of a multipart")
            if part.transfer_encoding in _RELABEL:
                edits.append((part.start, part.body_start, _relabel(headers, _7BIT)))
            encapsulates = part.content_type.startswith("message/")
            stack.extend((child, encapsulates) for child in part.children)
            continue
        if not part.has_8bit:
            continue
        if part.transfer_encoding not in _CONVERTIBLE:
            raise _Impossible(f"8-bit body with transfer encoding {part.transfer_encoding}")
        major = part.content_type.partition("/")[0]
        if major == "multipart" or (
            major == "message" and not part.content_type.startswith("message/global")
        ):
            raise _Impossible(f"8-bit {part.content_type} that cannot be encoded")
        if top and _MIME_VERSION.search(headers) is None:
            headers = _relabel(headers, b"MIME-Version: 1.0\r\n", remove=False)
        new_headers = _relabel(headers, _QP)
        edits.append((part.start, part.end, new_headers + qp_encode(part.body_bytes(content))))


def _relabel(headers: bytes, field: bytes, remove: bool = True) -> bytes:
    """*headers* (a header block, maybe with its blank line) without any
    Content-Transfer-Encoding field (when *remove*), *field* added last, and a blank line."""
    if headers.endswith(b"\r\n\r\n"):
        block = headers[:-2]
    elif headers.endswith(b"\n\n"):
        block = headers[:-1]
    elif headers in (b"\r\n", b"\n"):
        block = b""  # an empty header block: the part starts with its blank line
    else:
        block = headers  # no blank line (the part has no body, or a defect): add one
    if remove:
        block = _CTE_FIELD.sub(b"", block)
    if block and not block.endswith(b"\n"):
        block += b"\r\n"
    return block + field + b"\r\n"
