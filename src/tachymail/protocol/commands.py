"""SMTP command lines: incremental line splitting, verbs, paths and ESMTP parameters.

The compiled kernel (``ext/commands.pyx``) is used unless ``TACHYMAIL_PURE=1``;
``commands_py`` is its twin with the same API and the same replies.

``LineReader(limit=512)``
    ``feed(data)`` appends any bytes-like chunk; ``readline()`` returns the
    next complete line as ``(line, flags)`` with the line terminator removed,
    or ``None`` when no complete line is buffered.  ``limit`` counts the
    CRLF (RFC 5321 §4.5.3.1.4: 512 octets).  A longer line comes back once, at
    its end, as ``(b"", LINE_TOO_LONG)`` (reply 500 5.5.6); its bytes are
    dropped as they arrive, so memory stays bounded.  ``LINE_BARE_LF`` marks a
    line ended by LF alone, ``LINE_BARE_CR`` a CR not followed by LF inside
    it.  ``drain()`` hands over every buffered byte (the start of a DATA or
    BDAT body) and empties the reader; ``pending`` counts buffered bytes.

``parse_command(line) -> (verb, args)``
    ``verb`` is one of the ``VERB_*`` codes, matched case-insensitively on the
    text before the first space; ``args`` is everything after that space.
    An unrecognised verb gives ``(VERB_UNKNOWN, line)``.

``parse_mail(args, smtputf8=True) -> (reverse_path, params)``
``parse_rcpt(args, smtputf8=False) -> (forward_path, params)``
    ``args`` is what follows ``"MAIL "`` / ``"RCPT "``.  The path comes back
    without angle brackets and source route (``""`` for the null path, MAIL
    only).  ``params`` maps upper-case ESMTP keywords to values, xtext
    decoded (``ENVID``, ``ORCPT``, ``AUTH``), ``""`` for keywords without a
    value.  For MAIL, ``smtputf8`` says whether the server offers SMTPUTF8:
    a UTF-8 path is accepted only when it does and the SMTPUTF8 parameter is
    present.  For RCPT it says whether this transaction's MAIL carried
    SMTPUTF8.  Every refusal raises ``SmtpSyntaxError`` with the reply.
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
