"""Fuzz the SMTP command-line kernel: LineReader on fragmented input, parse_command,
parse_mail and parse_rcpt (both SMTPUTF8 flags), compiled kernel against its pure twin.

Invariants: no exception but SmtpSyntaxError from the parsers; every line at most
``limit - 1`` octets (its terminator makes ``limit``), ``auth_limit - 1`` for an ``AUTH ``
line or while ``auth_exchange`` is set; ``pending <= auth_limit`` whenever ``readline()``
returned None; a path the parser accepted parses again to itself; compiled == twin for
every call.
"""

from __future__ import annotations

import sys
from functools import partial
from typing import Any

import atheris
from _common import agree, as_buffer, fragments, load_twins, main, option, outcome

from tachymail.protocol.errors import SmtpSyntaxError

COMPILED, PURE = load_twins("commands")
SYNTAX = (SmtpSyntaxError,)
LIMITS = [512, 1, 2, 3, 8, 64, 512, 512]
#: 0 means "same as limit"; 12288 is what the session uses (RFC 4954)
AUTH_LIMITS = [0, 12288, 7, 600, 0]


def parse_line(line: bytes, data: bytes) -> None:
    """parse_command, then parse_mail / parse_rcpt on its arguments, in both twins."""
    verb = outcome(lambda: COMPILED.parse_command(line), ())
    agree("parse_command", verb, outcome(lambda: PURE.parse_command(line), ()), data)
    args = verb[1][1]
    for smtputf8 in (False, True):
        for name in ("parse_mail", "parse_rcpt"):
            compiled, pure = getattr(COMPILED, name), getattr(PURE, name)
            got = outcome(partial(compiled, args, smtputf8), SYNTAX)
            want = outcome(partial(pure, args, smtputf8), SYNTAX)
            agree(f"{name}(smtputf8={smtputf8})", got, want, data)
            if got[0] == "raised":
                # Every refusal is a 5xx reply with a 5.x.x status the session sends as is.
                code, status = got[1][1][0].split(" ")[:2]
                assert code[0] == "5" and status.startswith("5."), got
            else:
                round_trip(name, compiled, smtputf8, got[1], data)


def round_trip(name: str, parse: Any, smtputf8: bool, parsed: Any, data: bytes) -> None:
    """A path the parser accepted, written back as ``<path>``, parses to the same path: the
    returned path is what the server stores and later sends in its own MAIL/RCPT."""
    path, params = parsed
    keyword = b"FROM:<" if name == "parse_mail" else b"TO:<"
    utf8 = b" SMTPUTF8" if "SMTPUTF8" in params else b""
    again = parse(keyword + path.encode() + b">" + utf8, smtputf8)
    agree(f"{name} round trip", again[0], path, data)


def read_lines(reader: Any, data: bytes) -> list[tuple[bytes, int]]:
    """Every complete line, checking the length bounds, then ``pending`` once it is None."""
    lines = []
    while True:
        item = reader.readline()
        if item is None:
            assert reader.pending <= reader.auth_limit, (reader.pending, data)
            return lines
        line, _flags = item
        # auth_limit only for an "AUTH " line or during an AUTH exchange; limit otherwise.
        auth = reader.auth_exchange or line[:5].upper() == b"AUTH "
        assert len(line) < (reader.auth_limit if auth else reader.limit), (len(line), data)
        lines.append(item)


def test_one_input(data: bytes) -> None:
    # Input: 4 option bytes (limit and buffer type, auth_limit, drain point, auth_exchange
    # per fragment), 24 bytes of split points, the stream.
    # Small limits reach the too-long paths with short inputs; 512 is the server's default.
    limit = LIMITS[option(data, 0) % len(LIMITS)]
    kind = option(data, 0) // len(LIMITS) % 3
    auth_limit = AUTH_LIMITS[option(data, 1) % len(AUTH_LIMITS)]
    drain_at = option(data, 2)
    exchange = option(data, 3)
    cut = atheris.FuzzedDataProvider(data[4:28])
    stream = data[28:]
    compiled = COMPILED.LineReader(limit, auth_limit)
    pure = PURE.LineReader(limit, auth_limit)
    assert compiled.limit == pure.limit == limit
    assert compiled.auth_limit == pure.auth_limit == max(limit, auth_limit)
    for index, piece in enumerate(fragments(cut, stream)):
        # As the session does while it waits for an AUTH continuation line.
        compiled.auth_exchange = pure.auth_exchange = bool(exchange >> (index % 8) & 1)
        compiled.feed(as_buffer(piece, kind))
        pure.feed(piece)
        agree("pending after feed", compiled.pending, pure.pending, data)
        got = read_lines(compiled, data)
        agree("lines", got, read_lines(pure, data), data)
        for line, _flags in got:
            parse_line(line, data)
        if index == drain_at:
            agree("drain", compiled.drain(), pure.drain(), data)
            agree("pending after drain", (compiled.pending, pure.pending), (0, 0), data)
    agree("final drain", compiled.drain(), pure.drain(), data)
    # The parsers also see what no LineReader would hand them (CR, LF, any length).
    parse_line(stream, data)


if __name__ == "__main__":
    main(test_one_input)
    sys.exit(0)
