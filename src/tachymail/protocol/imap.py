"""IMAP commands: incremental tokenizing of client commands, sequence sets, FETCH items.

The compiled kernel (``ext/imap.pyx``) is used unless ``TACHYMAIL_PURE=1``; ``imap_py`` is its
twin with the same API, the same results and the same events for every input, however it is
cut into chunks.  The values returned are the classes of ``imap_types`` in both.  Grammar:
RFC 9051 §9 (and RFC 3501 §9), RFC 7888 (LITERAL+ / LITERAL-), RFC 3516 (literal8),
RFC 5182 (``$``), RFC 7162 (MODSEQ).

``CommandReader(max_line=8192, max_literal=67108864)``
    ``feed(data)`` appends any bytes-like chunk; ``next()`` returns the next item, or None
    until more octets arrive.  Items, in the order the client's bytes call for them:

    ``Command(tag, name, args)``
        ``tag`` as sent; ``name`` upper-cased, and ``UID`` joined with the command it
        prefixes: ``b"UID FETCH"``.  ``args`` are the tokens after the name: an atom is
        ``bytes`` (as sent: ``NIL``, numbers, sequence sets like ``1:*``, flags like
        ``\\Seen``, LIST patterns with ``%`` and ``*``, search keys); a quoted string or a
        literal is ``String`` (a ``bytes`` subclass that never equals an atom), a literal8
        ``~{n}`` is ``Binary`` (a ``String``); ``( ... )`` is a ``list`` of tokens;
        ``BODY[...]<o.n>`` (and BODY.PEEK, BINARY, BINARY.PEEK, BINARY.SIZE, any case) is one
        ``Section(name, spec, partial)`` whose ``spec`` holds the tokens between the brackets.
        After any other atom ``[`` and ``]`` are ordinary atom octets (``[Gmail]/Sent``).
    ``Continuation(tag, size)``
        The line ended with a synchronizing literal ``{size}``: send ``+ ...``; the reader
        then waits for ``size`` octets and the rest of the command.  ``{n+}`` (LITERAL+ and
        LITERAL-, which share that syntax) gives no event.
    ``Bad(tag, reason)``
        The command is malformed: answer ``tag BAD reason`` (``* BAD reason`` when ``tag`` is
        None: the line had no valid tag).  The rest of the command is dropped, including the
        octets of a ``{n+}`` literal that ends one of its lines, and the reader goes on with
        the next command.  (The octets of a ``{n+}`` literal at the end of a line that was too
        long are not known to be one, and are read as the next command: that client gets a
        second ``BAD``.)
    ``TooLarge(tag, size, synchronizing)``
        A literal of more than ``max_literal`` octets (all literals of one command together
        count): the command is dropped.  The octets of a ``{n+}`` literal are skipped as they
        arrive, without being kept; a client that sent ``{n}`` waits for the answer instead.

    ``next_line()`` returns the next line as sent (line end removed), or None until one is
    complete, for what is not a command: IDLE's ``DONE`` and the client's answers to
    AUTHENTICATE.  Only between commands: RuntimeError in the middle of one (also while the
    rest of a bad one is dropped).  A line of more than ``max_line`` octets with its line end
    is ``Bad(None, "command line too long")`` and is dropped.

    Octets: tokens are separated by one or more spaces; lines end with CRLF (a bare LF is
    accepted); after a token comes a space, a closing bracket or the end of the line.  Atoms
    are 7-bit graphic octets other than ``(){"``; quoted strings take any octet but NUL, CR
    and LF (8-bit octets for UTF-8, RFC 9051 / RFC 6855) with ``\\"`` and ``\\\\`` escapes;
    a literal announcement ends its line.  Numbers in literals have at most 19 digits.

    Bounds: ``max_line`` (at least 1) counts the command's text, all its lines and their
    CRLFs, literal octets excluded; a longer command gets ``Bad(tag, "command line too
    long")`` (``tag`` when the first ``max_line`` octets show it) as soon as that many octets
    are buffered without a line end, and is dropped to the end of its line.  ``max_literal``
    bounds a command's literal octets.  So after ``next()`` returned None, ``pending`` (octets
    buffered and not yet consumed) is below ``max(max_line, max_literal)``, and the tokens of
    the command being read hold at most ``max_line + max_literal`` octets.

``parse_sequence_set(text) -> list[tuple[int, int]]``
    ``1,3:5,7:*`` -> ``[(1, 1), (3, 5), (7, STAR)]``: each range as ``(low, high)`` with the
    ends put in order (``5:3`` is ``(3, 5)``, ``*:4`` is ``(4, STAR)``, ``*`` is
    ``(STAR, STAR)``); ``STAR`` (0) stands for the largest number in use.  ``$`` alone is
    ``[(SEARCHRES, SEARCHRES)]`` (-1: the saved search result, RFC 5182).  Numbers are
    nz-number (1 .. 2^32-1, no leading zero).  ValueError on anything else.

``parse_fetch_items(tokens) -> list[FetchAtt]``
    ``tokens``: a FETCH command's arguments after the sequence set (one atom, one Section or
    one list of them, plus nothing, as RFC 9051 allows; CHANGEDSINCE modifiers are the
    caller's).  Macros ALL / FAST / FULL (alone only) expand to their items.  Items:
    FLAGS, INTERNALDATE, RFC822.SIZE, ENVELOPE, BODY, BODYSTRUCTURE, UID, RFC822,
    RFC822.HEADER, RFC822.TEXT, MODSEQ, and the section items: section = part numbers
    (``1.2``) and/or HEADER, HEADER.FIELDS (list), HEADER.FIELDS.NOT (list), TEXT, MIME
    (after part numbers only); BINARY* take part numbers only, BINARY.SIZE no partial.
    Upper-cased in the result; ValueError on anything else.

``fetch_flags_line(seq, uid, flags, size, internaldate, modseq) -> bytes``
    The response line of the ``FETCH 1:* (UID FLAGS RFC822.SIZE [INTERNALDATE] [MODSEQ])``
    fast path: ``* seq FETCH (UID uid FLAGS flags RFC822.SIZE size`` then `` INTERNALDATE
    d`` unless *internaldate* is None, `` MODSEQ (m)`` unless *modseq* is 0, and ``)`` CRLF.
    *flags* is the flag list as sent (``(\\Seen $Junk)``), *internaldate* the quoted
    date-time; both are copied as they are. ValueError for a number outside 0 .. 2^63-1.

``fetch_flags_lines(seq, uids, flags, sizes, modseqs) -> bytes``
    The lines of ``fetch_flags_line`` for a run of messages numbered from *seq*, in one
    call: message k is ``* seq+k FETCH (UID uids[k] FLAGS flags[k] RFC822.SIZE sizes[k]``,
    then `` MODSEQ (modseqs[k])`` unless *modseqs* is None, and ``)`` CRLF (no
    INTERNALDATE). *uids* is an ``array("I")``, *sizes* and *modseqs* ``array("Q")`` (the
    twin takes any sequences of ints), *flags* a list of flag lists as sent, all of one
    length. ValueError when the lengths differ or a number is outside 0 .. 2^63-1 (checked
    message by message: sequence number, size, modseq); TypeError when a flag list is not
    bytes.

``fetch_item_lines(seq, parts) -> bytes``
    ``* seq+k FETCH (parts[k])`` and CRLF for each part of the list *parts* (the items of
    message k, rendered already, e.g. ``BODYSTRUCTURE (...)``), in one call. ValueError
    for a message number outside 0 .. 2^63-1; TypeError when a part is not bytes.

``quote(value) -> bytes``
    ``value`` as an IMAP string for a response: a quoted string (``"`` and ``\\`` escaped)
    when it is at most 1024 octets of 7-bit text without NUL, CR or LF, else a literal
    ``{n}\\r\\n`` followed by the octets.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tachymail.protocol._imap import (
        SEARCHRES,
        STAR,
        Bad,
        Binary,
        Command,
        CommandReader,
        Continuation,
        FetchAtt,
        Section,
        String,
        TooLarge,
        fetch_flags_line,
        fetch_flags_lines,
        fetch_item_lines,
        parse_fetch_items,
        parse_sequence_set,
        quote,
    )
else:
    from tachymail.protocol._select import load_kernel

    _kernel = load_kernel("imap")
    globals().update({name: getattr(_kernel, name) for name in _kernel.__all__})

__all__ = [
    "SEARCHRES",
    "STAR",
    "Bad",
    "Binary",
    "Command",
    "CommandReader",
    "Continuation",
    "FetchAtt",
    "Section",
    "String",
    "TooLarge",
    "fetch_flags_line",
    "fetch_flags_lines",
    "fetch_item_lines",
    "parse_fetch_items",
    "parse_sequence_set",
    "quote",
]
