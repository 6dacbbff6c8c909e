"""SMTP command lines: incremental line splitting, verbs, paths and ESMTP parameters.

The compiled kernel (``ext/commands.pyx``) is used unless ``TACHYMAIL_PURE=1``;
``commands_py`` is its twin with the same API and the same replies.

``LineReader(limit=512, auth_limit=0)``
    ``feed(data)`` appends any bytes-like chunk; ``readline()`` returns the
    next complete line as ``(line, flags)`` with the line terminator removed,
    or ``None`` when no complete line is buffered.  ``limit`` (at least 1,
    read-only) counts the CRLF (RFC 5321 §4.5.3.1.4: 512 octets); lines are
    counted as received, so a bare LF counts one octet and ``limit - 1``
    octets ended by a bare LF still fit.  A longer line comes back once, at
    its end, as ``(b"", LINE_TOO_LONG)`` (reply 500 5.5.0).  ``LINE_BARE_LF``
    marks a line ended by LF alone, ``LINE_BARE_CR`` a CR not followed by LF
    inside it (the CR stays in the line); a CR at the end of one chunk and
    the LF at the start of the next are an ordinary CRLF.

    ``auth_limit`` (read-only; never below ``limit``, which it is when given
    as 0) is the limit instead for a line that starts with ``"AUTH "`` in any
    case (an AUTH command with an initial response), and for every line while
    the writable ``auth_exchange`` flag is true (the caller sets it while it
    waits for an AUTH continuation line): RFC 4954 allows those 12,288
    octets.  The limit is chosen from the line's first five octets when they
    are buffered, and from ``auth_exchange`` as it is when the line is cut or
    returned; a line once cut always comes back as ``LINE_TOO_LONG``.

    Memory stays bounded: once a line's limit of octets with no LF before
    them are buffered, only those octets are kept and the rest of the line
    is dropped as it arrives, so after ``readline()`` returned ``None``,
    ``pending <= auth_limit`` (``<= limit`` unless the partial line is an
    AUTH line).  Octets behind a complete buffered line
    are never dropped: ``drain()`` hands over every buffered byte (the start
    of a DATA or BDAT body, which may have long lines) and empties the
    reader, including any line being dropped; ``pending`` counts buffered
    bytes.

``parse_command(line) -> (verb, args)``
    ``verb`` is one of the ``VERB_*`` codes, matched case-insensitively on the
    text before the first space; ``args`` is everything after that space
    (``b""`` without one).  An unrecognised verb gives ``(VERB_UNKNOWN, line)``.
    ``line`` must be ``bytes``.

``parse_mail(args, smtputf8=True) -> (reverse_path, params)``
``parse_rcpt(args, smtputf8=False) -> (forward_path, params)``
    ``args`` is what follows ``"MAIL "`` / ``"RCPT "`` (``bytes``): ``FROM:`` /
    ``TO:`` in any case, optional spaces, ``<path>``, then SP-separated ESMTP
    parameters (runs of spaces and trailing spaces are accepted).  The path
    ends at the first ``>`` outside a quoted string.  The path comes back as
    ``str`` without angle brackets and source route (``""`` for the null
    path, MAIL only); a quoted local part keeps its quotes and backslashes, an
    address literal its brackets, and RCPT's ``<Postmaster>`` (any case, no
    domain) comes back as written.  ``params`` maps upper-case ESMTP keywords
    to values, xtext decoded (``ENVID``, ``ORCPT``, ``AUTH``), ``""`` for
    keywords without a value.  For MAIL, ``smtputf8`` says whether the server
    offers SMTPUTF8: a UTF-8 path is accepted only when it does and the
    SMTPUTF8 parameter is present.  For RCPT it says whether this
    transaction's MAIL carried SMTPUTF8.  Every refusal raises
    ``SmtpSyntaxError`` with the reply.

    The grammar is RFC 5321 §4.1.2: Dot-string or Quoted-string local part;
    sub-domains of letters, digits and inner hyphens, or an address literal
    (IPv4 dotted quad, ``IPv6:`` in the full §4.1.3 syntax, or a
    Standardized-tag ``:`` dcontent literal); a source route is checked and
    dropped.  RFC 6531: UTF-8 octets count as atext, qtext and sub-domain
    letters, and the path must be well-formed UTF-8.  Limits are octets as
    received: local part 64 (quotes included), domain 255 (brackets
    included), path 256 including ``<`` and ``>``.  Values: ``SIZE`` 1-20
    digits, kept as given; ``BODY`` 7BIT, 8BITMIME or BINARYMIME and ``RET``
    FULL or HDRS, upper-cased; ``NOTIFY`` NEVER or a comma list of SUCCESS,
    FAILURE, DELAY without repeats, upper-cased; ``ORCPT`` an atom, ``;``
    and xtext, kept as ``"type;decoded"``; ``ENVID`` (at most 100 decoded
    characters) and ``AUTH`` are xtext.  Decoded xtext must be printable
    ASCII (graphic or space), as RFC 3461 asks of ENVID and ORCPT.  Whether
    the server offers an extension is for the caller to check.

    Checks run in this order and the first failure is the reply:

    ========================================  =============================
    no ``FROM:`` / ``TO:``, no ``<...>``, or   501 5.5.4 "Syntax: MAIL
    something other than SP after ``>``         FROM:<address>" / "Syntax:
                                                RCPT TO:<address>"
    path syntax or bad UTF-8; null RCPT path   501 5.1.7 (MAIL) / 5.1.3
                                                (RCPT) "Bad sender address
                                                syntax" / "Bad recipient
                                                address syntax"
    local part, domain, then path too long     501 5.1.7 / 5.1.3 "Local part
                                                too long", "Domain too
                                                long", "Path too long"
    each parameter, left to right: bad         501 5.5.4 "Bad parameter
    keyword syntax                              syntax"
    keyword unknown, or of the other command   555 5.5.4 "KW parameter not
                                                recognised"
    keyword repeated                           501 5.5.4 "Duplicate KW
                                                parameter"
    value given to SMTPUTF8 / REQUIRETLS       501 5.5.4 "KW parameter
                                                takes no value"
    value missing or empty                     501 5.5.4 "KW parameter
                                                needs a value"
    value invalid                              501 5.5.4 "Bad KW parameter
                                                value"
    non-ASCII path without SMTPUTF8            553 5.6.7 "Non-ASCII address
                                                requires SMTPUTF8"
    ========================================  =============================
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tachymail.protocol._commands import (
        LINE_BARE_CR,
        LINE_BARE_LF,
        LINE_TOO_LONG,
        VERB_AUTH,
        VERB_BDAT,
        VERB_DATA,
        VERB_EHLO,
        VERB_EXPN,
        VERB_HELO,
        VERB_HELP,
        VERB_MAIL,
        VERB_NOOP,
        VERB_QUIT,
        VERB_RCPT,
        VERB_RSET,
        VERB_STARTTLS,
        VERB_UNKNOWN,
        VERB_VRFY,
        LineReader,
        parse_command,
        parse_mail,
        parse_rcpt,
    )
else:
    from tachymail.protocol._select import load_kernel

    _kernel = load_kernel("commands")
    globals().update({name: getattr(_kernel, name) for name in _kernel.__all__})

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
