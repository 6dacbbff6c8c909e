"""MIME structure scanner: header/body split, Content-Type and transfer encoding, the tree
of parts with byte offsets, and 8-bit detection — without decoding anything.

The compiled kernel (``ext/mime.pyx``) is used unless ``TACHYMAIL_PURE=1``;
``mime_py`` is its twin with the same API and the same tree.  Used for the
8BITMIME downgrade, content policy and IMAP BODYSTRUCTURE.

``scan(message, max_depth=32) -> Part``
    *message* is any bytes-like object (the compiled kernel reads it in
    place).  Never raises on any content, never loops, and runs in time
    linear in the message size, whatever the input: malformed MIME gives a
    best-effort tree and a ``defects`` entry on the part concerned.
    Python's ``email`` package (``policy.default``) is the oracle: on
    well-formed and most malformed mail the tree, types, charsets,
    boundaries, encodings and body bytes are the ones it finds.

    Lines end at LF; a CR just before it belongs to the line break, so CRLF,
    LF and mixed messages scan alike (a bare CR is not a line break).  A
    header block ends at the first blank line, or at the first line that is
    neither a field (a name of printable ASCII without spaces, then ``:``),
    a continuation (leading space or tab) nor an mbox ``From `` line: that
    line starts the body (defect ``"missing blank line after headers"``).
    A part that ends inside its header block has an empty body.

    A boundary line is ``"--" boundary``, then ``"--"`` for the close line,
    then optional spaces/tabs (transport padding), at the start of a line;
    ``boundary`` is matched as UTF-8.  Like ``email``: a line that is a
    boundary line of several enclosing multiparts belongs to the outermost
    one and ends every part nested in it; repeated delimiter lines open no
    empty parts; after its close line (in the epilogue) a multipart's own
    boundary means nothing.  Preamble and epilogue are not parts.

``Part``
    ``start`` (offset of the part's first header line), ``body_start``
    (offset just past the blank line ending the headers, or the end of the
    part when there is none), ``end`` (end of the body, exclusive; for a
    part inside a multipart, before the line break that precedes the next
    boundary line — or the end of the input when the close line is
    missing).  ``header_bytes(message)`` / ``body_bytes(message)`` slice
    *message* with them.
    ``content_type`` is lower-case ``type/subtype`` (default ``text/plain``,
    or ``message/rfc822`` inside ``multipart/digest``; ``text/plain`` when
    the header is unparsable, defect ``"invalid content-type"``);
    ``charset`` (lower-case; None when absent or not ASCII) and ``boundary``
    (trailing white space removed) come from its parameters, read as
    ``content_type_params`` does (RFC 2231 continuations and encodings
    understood); ``transfer_encoding`` is the lower-case mechanism token,
    default ``7bit``.
    ``has_8bit`` is set when a byte >= 0x80 is among the part's *own*
    bytes, those of its range that are not in a child's range: headers and
    body for a leaf; headers, preamble, boundary lines and epilogue for a
    multipart; the headers for a ``message/rfc822``.  So a leaf's flag says
    whether its headers or body need 8BITMIME, and some part has it exactly
    when the message holds an 8-bit byte.
    ``children``: the parts of a multipart, or the single encapsulated
    message (``start == body_start`` of its parent, same ``end``) of a
    ``message/rfc822`` / ``message/global`` part that is not
    base64/quoted-printable encoded; other ``message/*`` types are leaves.
    ``depth`` is 0 for the root; no part is deeper than ``max_depth``: a
    multipart or message at that depth is a leaf (defect ``"too deep"``).
    ``defects`` also names ``"no boundary"`` (a multipart without one: a
    leaf), ``"start boundary not found"`` (no delimiter line: no children)
    and ``"close boundary not found"`` (the last part runs to the end of its
    parent).

``header_value(headers, name) -> bytes | None``
    The first *name* field (case-insensitive) of the header block
    *headers*, unfolded (line breaks dropped, the white space after them
    kept) with leading/trailing spaces, tabs and CRs stripped; None when
    absent.  Reading stops where ``scan`` ends a header block.

``content_type_params(value) -> (str, dict[str, str])``
    Lower-case ``type/subtype`` (``text/plain`` when invalid) and the
    parameters by lower-case name: comments skipped, quoted strings
    unquoted, text between the subtype and the first ``;`` ignored, a bare
    value ending at white space, ``;``, ``(`` or ``"`` (``=`` and ``/`` are
    kept: ``boundary=----=_Part_1`` is common), the first occurrence of a
    name winning.  RFC 2231 sections are joined in section order and
    ``charset'lang'%XX`` values decoded with that charset when Python knows
    it, else as UTF-8; undecodable bytes (and invalid UTF-8 in plain values)
    become U+FFFD, as ``email`` does.  RFC 2047 encoded words are not
    decoded.

``canonical_body(body, relaxed) -> bytes``
    The DKIM canonical form of a message body with CRLF line ends (RFC 6376
    §3.4.3 "simple", §3.4.4 "relaxed"), byte for byte what dkimpy makes:
    relaxed drops the spaces and tabs before each CRLF and makes every other
    run of them one space; both drop the CRLF pairs at the end and add one
    CRLF, except that an empty relaxed body stays empty (a bare CR is an
    ordinary octet).  May return *body* itself when it is already canonical and
    bytes or a memoryview of bytes (a message's body, not copied out of it).

``header_fields(text) -> list[(bytes, bytes)] | None``
    The fields of a plain header block, *text* being the block without the
    line end of its last line: (name, value) pairs as DKIM reads them, the
    value being everything after the colon with its continuation lines and a
    CRLF after each of its lines.  None unless the block is plain: not empty,
    CRLF line ends only (no bare CR or LF), a first line that is not a
    continuation, and every field's first line a name of printable ASCII
    (33-126; the first octet may itself be a colon) followed by a colon.

``blank_line(message) -> tuple[int, int] | None``
    Where the empty line that ends the header block of *message* is, as dkimpy
    finds it: the first match of ``(?:\\A|\\n)(\\r?\\n)``, as (start, end) of the
    whole match; None when there is none.

``header_block(message) -> tuple[list[(bytes, bytes)], list[bytes], int] | None``
    The plain header block of *message* read once: when the empty line
    ``blank_line`` finds is CR LF after a CR LF (the block ends with CR LF CR
    LF) and ``header_fields`` reads the block without its last line end,
    (those fields, their names lower-cased, where the body starts: the end of
    the empty line); else None.

``relaxed_header_value(value) -> bytes``
    A field value in DKIM's relaxed form (RFC 6376 §3.4.2), byte for byte what
    dkimpy makes: CRLF pairs, then any other LF, removed (unfolding); every run
    of spaces and tabs one space; ASCII white space (space, tab, LF, VT, FF,
    CR) stripped at both ends; CRLF added.

``dkim_tag_list(value) -> dict[bytes, bytes] | None``
    A DKIM tag=value list (RFC 6376 §3.2) as ``dkim.util.parse_tag_value``
    reads it: the value stripped of ASCII white space, cut at each ``;`` (one
    final ``;`` allowed), each piece at its first ``=``, names and values
    stripped; None where dkimpy raises (a piece without ``=``, a name not
    starting with an ASCII letter, a name given twice).

``dkim_plain_base64(value) -> bool``
    Whether *value* passes dkimpy's test of a b= or bh= value: the regular
    expression ``[\\s0-9A-Za-z+/]+[\\s=]*`` matches it whole and its octets
    other than white space are a multiple of four.

``dkim_empty_b(value) -> bytes``
    A DKIM-Signature field value with its b= value emptied, as the signature's
    own field goes into its header hash (RFC 6376 §3.7), exactly as dkimpy's
    ``RE_BTAG`` substitution does it: wherever ``;`` or white space, ``b``,
    white space, ``=`` appear, the base64 and white space after them, up to
    the last octet that is not white space, are removed, and the line end
    after them when they end the value; the rest stays as it is.

``dkim_signed_fields(fields, lower, names, relaxed) -> bytes``
    The header fields a DKIM signature's ``h=`` *names* (lower case) select,
    as they go into its header hash, joined: each name takes the last field of
    that name (*lower*: the names of *fields*, lower-cased) above the one it
    took before, and a name with none left takes nothing (RFC 6376 §5.4.2);
    each field is ``name:value`` as in *fields* (from ``header_fields``), or in
    relaxed form ``lowername:`` plus ``relaxed_header_value(value)``.

``dkim_plain_signature(value, latest) -> tuple[bytes, bytes, bytes] | None``
    A DKIM-Signature field value read for the check of a plain signature: when
    ``dkim_tag_list(value)`` reads it, with ``b=`` and ``bh=`` that pass
    ``dkim_plain_base64`` and a ``t=``, if any, of ASCII digits naming a time
    not after *latest*: (the other tags in the order written, each as
    ``name=value;``, joined: what a signer's signatures share, which
    ``dkim_tag_list`` reads back; ``b=``; ``bh=``), those two with their white
    space removed; else None.

``dkim_header_input(fields, lower, names, relaxed, field) -> bytes``
    What a DKIM signature's header hash takes in: ``dkim_signed_fields(fields,
    lower, names, relaxed)``, then the signature's own *field* (name, value):
    its name (lower case when *relaxed*), ``:``, and its value after
    ``dkim_empty_b`` (and ``relaxed_header_value`` when *relaxed*) with the
    ASCII white space at its end removed (RFC 6376 §3.7: no final line end).

Deliberate differences from ``email``: ``=`` and ``/`` in bare parameter
values (email cuts the value there); comments and junk around the type
(email keeps them in ``get_content_type()``); a bare CR (email ends a line
there); a ``From `` line at the end of a header block (email moves it to
the body).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tachymail.protocol._mime import (
        Part,
        blank_line,
        canonical_body,
        content_type_params,
        dkim_empty_b,
        dkim_header_input,
        dkim_plain_base64,
        dkim_plain_signature,
        dkim_signed_fields,
        dkim_tag_list,
        header_block,
        header_fields,
        header_value,
        relaxed_header_value,
        scan,
    )
else:
    from tachymail.protocol._select import load_kernel

    _kernel = load_kernel("mime")
    Part = _kernel.Part
    blank_line = _kernel.blank_line
    scan = _kernel.scan
    header_value = _kernel.header_value
    content_type_params = _kernel.content_type_params
    canonical_body = _kernel.canonical_body
    header_fields = _kernel.header_fields
    header_block = _kernel.header_block
    relaxed_header_value = _kernel.relaxed_header_value
    dkim_tag_list = _kernel.dkim_tag_list
    dkim_plain_base64 = _kernel.dkim_plain_base64
    dkim_empty_b = _kernel.dkim_empty_b
    dkim_signed_fields = _kernel.dkim_signed_fields
    dkim_plain_signature = _kernel.dkim_plain_signature
    dkim_header_input = _kernel.dkim_header_input

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
    "header_block",
    "header_fields",
    "header_value",
    "relaxed_header_value",
    "scan",
]
