"""MIME structure scanner: header/body split, Content-Type and transfer encoding, the tree
of parts with byte offsets, and 8-bit detection — without decoding anything.

The compiled kernel (``ext/mime.pyx``) is used unless ``TACHYMAIL_PURE=1``;
``mime_py`` is its twin with the same API and the same tree.  Used for the
8BITMIME downgrade, content policy and IMAP BODYSTRUCTURE.

``scan(message, max_depth=32) -> Part``
    Never raises, never loops, and runs in time linear in the message size,
    whatever the input: malformed MIME gives a best-effort tree and a
    ``defects`` entry on the part concerned.

``Part``
    ``start`` (offset of the part's first header line), ``body_start``
    (offset just past the blank line ending the headers, or the end of the
    part when there is none), ``end`` (end of the body, exclusive; for a
    multipart child, before the CRLF that precedes the next boundary line).
    ``content_type`` is lower-case ``type/subtype`` (default ``text/plain``,
    or ``message/rfc822`` inside ``multipart/digest``); ``charset`` and
    ``boundary`` come from its parameters (RFC 2231 continuations and
    encodings understood); ``transfer_encoding`` is lower-case, default
    ``7bit``.  ``has_8bit`` is set when the part's own headers or body hold a
    byte >= 0x80.  ``children``: the parts of a multipart, or the single
    encapsulated message of a ``message/rfc822`` / ``message/global`` part
    that is not base64/quoted-printable encoded.  ``depth`` is 0 for the
    root; parts deeper than ``max_depth`` are not split further (defect
    ``"too deep"``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tachymail.protocol._mime import Part, content_type_params, header_value, scan
else:
    from tachymail.protocol._select import load_kernel

    _kernel = load_kernel("mime")
    Part = _kernel.Part
    scan = _kernel.scan
    header_value = _kernel.header_value
    content_type_params = _kernel.content_type_params

__all__ = ["Part", "content_type_params", "header_value", "scan"]
