"""SMTP command lines: LineReader, parse_command, parse_mail and parse_rcpt.

Every test runs against the compiled kernel and its pure-Python twin; the hypothesis tests at
the end feed both the same random input and require identical results, replies included.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from types import ModuleType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels import IMPLS, both_impls, load_impl
from tachymail.protocol.errors import SmtpSyntaxError

PUBLIC = {
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
}

BATCH = (
    b"EHLO client.example.org\r\n"
    b"MAIL FROM:<sender@example.org> SIZE=12345 BODY=8BITMIME\r\n"
    b"RCPT TO:<a@example.net>\r\n"
    b"RCPT TO:<b@example.net> NOTIFY=SUCCESS,FAILURE\r\n"
    b"RCPT TO:<Postmaster>\r\n"
    b"DATA\r\n"
    b"RSET\r\n"
    b"NOOP\r\n"
    b"QUIT\r\n"
)
BATCH_LINES = [(line, 0) for line in BATCH.split(b"\r\n")[:-1]]


@pytest.fixture(params=IMPLS)
def cmd(request: pytest.FixtureRequest) -> ModuleType:
    return load_impl("commands", request.param)


def read_all(reader: Any) -> list[tuple[bytes, int]]:
    lines = []
    while (item := reader.readline()) is not None:
        lines.append(item)
    return lines


def outcome(parse: Callable[..., Any], *args: Any) -> Any:
    """The result, or ("error", code, status, text) for a refusal."""
    try:
        return parse(*args)
    except SmtpSyntaxError as exc:
        return ("error", exc.code, exc.status, exc.text)


def refusal(parse: Callable[..., Any], *args: Any) -> tuple[int, str, str]:
    with pytest.raises(SmtpSyntaxError) as caught:
        parse(*args)
    return caught.value.code, caught.value.status, caught.value.text


# --- module surface --------------------------------------------------------------------------


def test_both_modules_export_the_same_names_and_values() -> None:
    compiled, pure = both_impls("commands")
    assert set(compiled.__all__) == set(pure.__all__) == PUBLIC
    for name in PUBLIC:
        if name.startswith(("VERB_", "LINE_")):
            assert getattr(compiled, name) == getattr(pure, name), name


def test_constant_values(cmd: ModuleType) -> None:
    assert cmd.VERB_UNKNOWN == 0
    verbs = [getattr(cmd, name) for name in PUBLIC if name.startswith("VERB_")]
    assert len(set(verbs)) == len(verbs) == 15
    assert (cmd.LINE_TOO_LONG, cmd.LINE_BARE_LF, cmd.LINE_BARE_CR) == (1, 2, 4)


# --- LineReader: splitting -------------------------------------------------------------------


def test_batch_in_one_chunk(cmd: ModuleType) -> None:
    reader = cmd.LineReader()
    reader.feed(BATCH)
    assert read_all(reader) == BATCH_LINES
    assert reader.pending == 0
    assert reader.readline() is None


@pytest.mark.parametrize("size", range(1, len(BATCH) + 1))
def test_batch_in_chunks_of_every_size(cmd: ModuleType, size: int) -> None:
    reader = cmd.LineReader()
    lines = []
    for at in range(0, len(BATCH), size):
        reader.feed(BATCH[at : at + size])
        lines += read_all(reader)
    assert lines == BATCH_LINES
    assert reader.pending == 0


def test_batch_split_at_every_offset(cmd: ModuleType) -> None:
    for at in range(len(BATCH) + 1):
        reader = cmd.LineReader()
        reader.feed(BATCH[:at])
        first = read_all(reader)
        assert reader.pending == at - sum(len(line) + 2 for line, _ in first)
        reader.feed(BATCH[at:])
        assert first + read_all(reader) == BATCH_LINES, at


def test_feed_accepts_any_buffer(cmd: ModuleType) -> None:
    reader = cmd.LineReader()
    reader.feed(bytearray(b"NOOP\r"))
    reader.feed(memoryview(b"xx\nQUIT\r\nyy")[2:9])
    reader.feed(b"")
    reader.feed(memoryview(b"AA\r\n").cast("H"))  # 16-bit items: read as their raw bytes
    assert read_all(reader) == [(b"NOOP", 0), (b"QUIT", 0), (b"AA", 0)]
    with pytest.raises(TypeError):
        reader.feed("NOOP\r\n")


def test_limit_is_validated_and_readable(cmd: ModuleType) -> None:
    assert cmd.LineReader().limit == 512
    assert cmd.LineReader(limit=1000).limit == 1000
    with pytest.raises(ValueError):
        cmd.LineReader(0)
    with pytest.raises(TypeError):
        cmd.LineReader("512")


# --- LineReader: flags -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"\r\n", [(b"", 0)]),
        (b"\n", [(b"", 2)]),
        (b"a\nb\r\n", [(b"a", 2), (b"b", 0)]),
        (b"a\rb\r\n", [(b"a\rb", 4)]),
        (b"a\r\r\n", [(b"a\r", 4)]),
        (b"a\rb\n", [(b"a\rb", 4 | 2)]),
        (b"\r\r\n\r", [(b"\r", 4)]),
        (b"NOOP\r", []),
    ],
)
def test_bare_cr_and_bare_lf(cmd: ModuleType, data: bytes, expected: list[Any]) -> None:
    reader = cmd.LineReader()
    reader.feed(data)
    assert read_all(reader) == expected


def test_crlf_split_between_chunks_is_not_bare(cmd: ModuleType) -> None:
    reader = cmd.LineReader()
    reader.feed(b"NOOP\r")
    assert reader.readline() is None
    reader.feed(b"\n")
    assert reader.readline() == (b"NOOP", 0)


# --- LineReader: length limit ----------------------------------------------------------------


@pytest.mark.parametrize("limit", [1, 2, 10, 512])
def test_limit_counts_the_terminator(cmd: ModuleType, limit: int) -> None:
    reader = cmd.LineReader(limit)
    fits, over = b"x" * (limit - 2), b"y" * (limit - 1)
    if limit >= 2:
        reader.feed(fits + b"\r\n")
        assert reader.readline() == (fits, 0)
    reader.feed(over + b"\r\n")
    assert reader.readline() == (b"", cmd.LINE_TOO_LONG)
    # A bare LF counts one octet, as received: limit - 1 octets and LF just fit.
    reader.feed(over + b"\n")
    assert reader.readline() == (over, cmd.LINE_BARE_LF)
    reader.feed(over + b"z\n")
    assert reader.readline() == (b"", cmd.LINE_TOO_LONG)
    assert reader.readline() is None
    assert reader.pending == 0


def test_512_octet_command_line(cmd: ModuleType) -> None:
    reader = cmd.LineReader()
    line = b"RCPT TO:<" + b"a" * 500 + b">"
    assert len(line) == 510
    reader.feed(line + b"\r\n" + b"X" + line + b"\r\nQUIT\r\n")
    assert read_all(reader) == [(line, 0), (b"", cmd.LINE_TOO_LONG), (b"QUIT", 0)]


def test_huge_line_in_small_chunks_keeps_memory_bounded(cmd: ModuleType) -> None:
    reader = cmd.LineReader(100)
    reader.feed(b"NOOP\r\n")
    assert reader.readline() == (b"NOOP", 0)
    for _ in range(5000):
        reader.feed(b"0123456")
        assert reader.readline() is None
        assert reader.pending <= 100
    reader.feed(b"789\r\nQUIT\r\n")
    assert read_all(reader) == [(b"", cmd.LINE_TOO_LONG), (b"QUIT", 0)]
    assert reader.pending == 0


def test_huge_partial_line_in_one_chunk_is_cut_at_feed(cmd: ModuleType) -> None:
    reader = cmd.LineReader(64)
    reader.feed(b"A" * 1_000_000)
    assert reader.pending == 64
    reader.feed(b"B" * 1000 + b"\nQUIT\r\n")
    assert read_all(reader) == [(b"", cmd.LINE_TOO_LONG), (b"QUIT", 0)]


def test_long_content_after_a_complete_line_is_kept_for_drain(cmd: ModuleType) -> None:
    # BDAT pipelines its chunk right behind the command: nothing may be cut before drain().
    body = bytes(range(256)) * 40
    reader = cmd.LineReader()
    reader.feed(b"BDAT 10240 LAST\r\n" + body)
    assert reader.readline() == (b"BDAT 10240 LAST", 0)
    assert reader.pending == len(body)
    assert reader.drain() == body


def test_long_line_byte_by_byte_within_limit(cmd: ModuleType) -> None:
    # Linear work per byte: quadratic rescanning would make this take minutes.
    reader = cmd.LineReader(200_001)
    for _ in range(100_000):
        reader.feed(b"ab")
        assert reader.readline() is None
    reader.feed(b"\n")
    line, flags = reader.readline()
    assert (len(line), flags) == (200_000, cmd.LINE_BARE_LF)


# --- LineReader: AUTH lines (RFC 4954: 12,288 octets) ----------------------------------------


def test_auth_command_line_may_reach_auth_limit(cmd: ModuleType) -> None:
    reader = cmd.LineReader(512, auth_limit=12288)
    assert (reader.limit, reader.auth_limit) == (512, 12288)
    fits = b"AUTH PLAIN " + b"A" * (12288 - 13)
    lower = b"auth plain " + b"B" * 5000
    reader.feed(fits + b"\r\n" + lower + b"\r\n")
    assert read_all(reader) == [(fits, 0), (lower, 0)]
    # Other commands keep the 512-octet limit; an AUTH line past 12,288 is too long.
    reader.feed(b"NOOP " + b"x" * 600 + b"\r\n" + fits + b"x\r\nQUIT\r\n")
    assert read_all(reader) == [(b"", cmd.LINE_TOO_LONG)] * 2 + [(b"QUIT", 0)]
    assert reader.pending == 0


def test_auth_line_in_small_chunks_is_cut_at_auth_limit(cmd: ModuleType) -> None:
    reader = cmd.LineReader(512, auth_limit=12288)
    reader.feed(b"AUTH PLAIN ")
    for _ in range(2000):
        reader.feed(b"0123456789")
        assert reader.readline() is None
        assert reader.pending <= 12288
    assert reader.pending == 12288
    reader.feed(b"\r\nNOOP\r\n")
    assert read_all(reader) == [(b"", cmd.LINE_TOO_LONG), (b"NOOP", 0)]


def test_auth_exchange_lines_may_reach_auth_limit(cmd: ModuleType) -> None:
    reader = cmd.LineReader(512, auth_limit=12288)
    assert reader.auth_exchange is False
    reader.auth_exchange = True
    response = b"Q" * 12000
    reader.feed(response + b"\r\n")
    assert reader.readline() == (response, 0)
    reader.feed(b"R" * 13000 + b"\r\n")
    assert reader.readline() == (b"", cmd.LINE_TOO_LONG)
    reader.auth_exchange = False
    reader.feed(b"S" * 600 + b"\r\n")
    assert reader.readline() == (b"", cmd.LINE_TOO_LONG)


def test_a_line_cut_before_the_exchange_began_stays_too_long(cmd: ModuleType) -> None:
    reader = cmd.LineReader(16, auth_limit=64)
    reader.feed(b"x" * 30)
    assert reader.readline() is None and reader.pending == 16
    reader.auth_exchange = True  # its 16 kept octets would now fit: it must not look whole
    reader.feed(b"\r\nok\r\n")
    assert read_all(reader) == [(b"", cmd.LINE_TOO_LONG), (b"ok", 0)]


def test_auth_limit_defaults_to_limit(cmd: ModuleType) -> None:
    reader = cmd.LineReader(100)
    assert reader.auth_limit == 100
    assert cmd.LineReader(600, auth_limit=100).auth_limit == 600
    reader.feed(b"AUTH PLAIN " + b"x" * 100 + b"\r\n")
    assert reader.readline() == (b"", cmd.LINE_TOO_LONG)


# --- LineReader: drain -----------------------------------------------------------------------


def test_drain_hands_over_the_rest(cmd: ModuleType) -> None:
    reader = cmd.LineReader()
    rest = b"Subject: hi\r\n\r\nbody without end"
    reader.feed(b"DATA\r\n" + rest)
    assert reader.readline() == (b"DATA", 0)
    assert reader.pending == len(rest)
    assert reader.drain() == rest
    assert reader.pending == 0
    assert reader.readline() is None
    assert reader.drain() == b""
    reader.feed(b"QUIT\r\n")
    assert reader.readline() == (b"QUIT", 0)


def test_drain_while_dropping_an_overlong_line_resets(cmd: ModuleType) -> None:
    reader = cmd.LineReader(16)
    reader.feed(b"x" * 100)
    assert reader.drain() == b"x" * 16
    reader.feed(b"NOOP\r\n")  # a fresh line, not the end of the dropped one
    assert reader.readline() == (b"NOOP", 0)


# --- parse_command ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "verb", "args"),
    [
        (b"MAIL FROM:<a@b>", "VERB_MAIL", b"FROM:<a@b>"),
        (b"mail FROM:<a@b> SIZE=1", "VERB_MAIL", b"FROM:<a@b> SIZE=1"),
        (b"rCpT TO:<x@y>", "VERB_RCPT", b"TO:<x@y>"),
        (b"EHLO host.example", "VERB_EHLO", b"host.example"),
        (b"helo  two spaces", "VERB_HELO", b" two spaces"),
        (b"DATA", "VERB_DATA", b""),
        (b"Data ", "VERB_DATA", b""),
        (b"BDAT 100 LAST", "VERB_BDAT", b"100 LAST"),
        (b"RSET", "VERB_RSET", b""),
        (b"noop", "VERB_NOOP", b""),
        (b"QUIT", "VERB_QUIT", b""),
        (b"VRFY postmaster", "VERB_VRFY", b"postmaster"),
        (b"expn list", "VERB_EXPN", b"list"),
        (b"Help", "VERB_HELP", b""),
        (b"StartTLS", "VERB_STARTTLS", b""),
        (b"AUTH PLAIN AGFAYg==", "VERB_AUTH", b"PLAIN AGFAYg=="),
    ],
)
def test_known_verbs(cmd: ModuleType, line: bytes, verb: str, args: bytes) -> None:
    assert cmd.parse_command(line) == (getattr(cmd, verb), args)


@pytest.mark.parametrize(
    "line",
    [b"", b" MAIL FROM:<a@b>", b"MAILFROM:<a@b>", b"MAIL\tFROM:<a@b>", b"MAI", b"STARTTLSX",
     b"START TLS", b"MA\xc3\x8dL x", b"HELLO there", b"\x00\x00\x00\x00"],
)  # fmt: skip
def test_unknown_verbs_return_the_whole_line(cmd: ModuleType, line: bytes) -> None:
    assert cmd.parse_command(line) == (cmd.VERB_UNKNOWN, line)


def test_parse_command_needs_bytes(cmd: ModuleType) -> None:
    with pytest.raises(TypeError):
        cmd.parse_command("NOOP")
    with pytest.raises(TypeError):
        cmd.parse_mail("FROM:<>")


# --- paths: valid ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "path"),
    [
        (b"FROM:<user@example.com>", "user@example.com"),
        (b"from:<user@example.com>", "user@example.com"),
        (b"FROM: <user@example.com>", "user@example.com"),
        (b"FROM:   <user@example.com>  ", "user@example.com"),
        (b"FROM:<>", ""),
        (b"FROM:<> ", ""),
        (b"FROM:<First.Last@Sub.Example.CO.uk>", "First.Last@Sub.Example.CO.uk"),
        (b"FROM:<!#$%&'*+-/=?^_`{|}~@example.com>", "!#$%&'*+-/=?^_`{|}~@example.com"),
        (b"FROM:<a@123.example>", "a@123.example"),
        (b"FROM:<a@x-1--2.example>", "a@x-1--2.example"),
        (b"FROM:<a@localhost>", "a@localhost"),
        (b'FROM:<"john doe"@example.com>', '"john doe"@example.com'),
        (b'FROM:<"a\\"b\\\\c"@example.com>', '"a\\"b\\\\c"@example.com'),
        (b'FROM:<"a>b@c"@example.com>', '"a>b@c"@example.com'),
        (b'FROM:<""@example.com>', '""@example.com'),
        (b"FROM:<a@[192.0.2.1]>", "a@[192.0.2.1]"),
        (b"FROM:<a@[0.0.0.0]>", "a@[0.0.0.0]"),
        (b"FROM:<a@[255.255.255.255]>", "a@[255.255.255.255]"),
        (b"FROM:<a@[010.1.1.1]>", "a@[010.1.1.1]"),
        (b"FROM:<a@[IPv6:2001:db8::1]>", "a@[IPv6:2001:db8::1]"),
        (b"FROM:<a@[IPv6:::1]>", "a@[IPv6:::1]"),
        (b"FROM:<a@[IPv6:::]>", "a@[IPv6:::]"),
        (b"FROM:<a@[ipv6:1:2:3:4:5:6:7:8]>", "a@[ipv6:1:2:3:4:5:6:7:8]"),
        (b"FROM:<a@[IPv6:1:2:3:4:5:6::]>", "a@[IPv6:1:2:3:4:5:6::]"),
        (b"FROM:<a@[IPv6:::ffff:192.0.2.1]>", "a@[IPv6:::ffff:192.0.2.1]"),
        (b"FROM:<a@[IPv6:1:2:3:4:5:6:192.0.2.1]>", "a@[IPv6:1:2:3:4:5:6:192.0.2.1]"),
        (b"FROM:<a@[IPv6:1:2:3::4:10.0.0.1]>", "a@[IPv6:1:2:3::4:10.0.0.1]"),
        (b"FROM:<a@[x-tag:any:content!]>", "a@[x-tag:any:content!]"),
        (b"FROM:<@relay.example:user@example.com>", "user@example.com"),
        (b"FROM:<@a.example,@b.example:user@example.com>", "user@example.com"),
    ],
)
def test_valid_reverse_paths(cmd: ModuleType, args: bytes, path: str) -> None:
    assert cmd.parse_mail(args) == (path, {})
    if path:
        assert cmd.parse_rcpt(b"TO:" + args[5:]) == (path, {})


@pytest.mark.parametrize(
    ("args", "path"),
    [
        (b"TO:<Postmaster>", "Postmaster"),
        (b"to:<postmaster>", "postmaster"),
        (b"TO: <POSTMASTER> ", "POSTMASTER"),
        (b"TO:<postmaster@example.com>", "postmaster@example.com"),
    ],
)
def test_valid_forward_paths(cmd: ModuleType, args: bytes, path: str) -> None:
    assert cmd.parse_rcpt(args) == (path, {})


def test_utf8_paths_with_smtputf8(cmd: ModuleType) -> None:
    mailbox = "jörg.ö@bücher.example"
    raw = mailbox.encode()
    assert cmd.parse_mail(b"FROM:<" + raw + b"> SMTPUTF8") == (mailbox, {"SMTPUTF8": ""})
    assert cmd.parse_mail(b'FROM:<"\xc3\xa9 x"@example.com> smtputf8')[0] == '"é x"@example.com'
    assert cmd.parse_rcpt(b"TO:<" + raw + b">", True) == (mailbox, {})
    assert cmd.parse_rcpt(b"TO:<@r\xc3\xa9.example:a@b.example>", True) == ("a@b.example", {})


# --- paths: refused --------------------------------------------------------------------------

MAIL_SYNTAX = (501, "5.5.4", "Syntax: MAIL FROM:<address>")
RCPT_SYNTAX = (501, "5.5.4", "Syntax: RCPT TO:<address>")
BAD_SENDER = (501, "5.1.7", "Bad sender address syntax")
BAD_RECIPIENT = (501, "5.1.3", "Bad recipient address syntax")
NEEDS_SMTPUTF8 = (553, "5.6.7", "Non-ASCII address requires SMTPUTF8")
MAIL_LOCAL_TOO_LONG = (501, "5.1.7", "Local part too long")
RCPT_LOCAL_TOO_LONG = (501, "5.1.3", "Local part too long")
MAIL_DOMAIN_TOO_LONG = (501, "5.1.7", "Domain too long")
RCPT_DOMAIN_TOO_LONG = (501, "5.1.3", "Domain too long")
MAIL_PATH_TOO_LONG = (501, "5.1.7", "Path too long")
RCPT_PATH_TOO_LONG = (501, "5.1.3", "Path too long")


@pytest.mark.parametrize(
    "args",
    [b"", b"FROM:", b"FROM:user@example.com", b"FROM<a@b.c>", b"FROM :<a@b.c>", b" FROM:<a@b.c>",
     b"FROM:\t<a@b.c>", b"TO:<a@b.c>", b"FROM:<a@b.c", b"FROM:<a@b.c>x", b"FROM:<a@b.c>\tSIZE=1",
     b'FROM:<"a@b.c>', b'FROM:<"a\\">', b"FROM:a@b.c>"],
)  # fmt: skip
def test_mail_command_syntax(cmd: ModuleType, args: bytes) -> None:
    assert refusal(cmd.parse_mail, args) == MAIL_SYNTAX


@pytest.mark.parametrize("args", [b"", b"TO:a@b.c", b"FROM:<a@b.c>", b"TO:<a@b.c>>", b"TO:<"])
def test_rcpt_command_syntax(cmd: ModuleType, args: bytes) -> None:
    assert refusal(cmd.parse_rcpt, args) == RCPT_SYNTAX


BAD_PATHS = [
    b"<a>", b"<@a.b>", b"<a@>", b"<a@b@c.d>", b"<a..b@c.d>", b"<.a@c.d>", b"<a.@c.d>",
    b"<a b@c.d>", b"<a@-b.c>", b"<a@b-.c>", b"<a@b..c>", b"<a@b.c.>", b"<a@.b.c>", b"<a@b_c.d>",
    b"<a@b\\c.d>", b"<a(b)@c.d>", b"<a@[1.2.3]>", b"<a@[1.2.3.256]>", b"<a@[1.2.3.4.5]>",
    b"<a@[1.2.3.1234]>", b"<a@[1..2.3]>", b"<a@[]>", b"<a@[a\\b]>", b"<a@[1.2.3.4>",
    b"<a@[IPv6:1:2:3:4:5:6:7]>", b"<a@[IPv6:1:2:3:4:5:6:7:8:9]>", b"<a@[IPv6:1::2::3]>",
    b"<a@[IPv6:1:2:3:4:5:6:7::]>", b"<a@[IPv6:12345::]>", b"<a@[IPv6:::1.2.3.999]>",
    b"<a@[IPv6::1]>", b"<a@[IPv6:1:]>", b"<a@[IPv6:1.2.3.4]>", b"<a@[IPv6:::g]>",
    b"<a@[IPv6:1:2:3:4:5:6:7:1.2.3.4]>", b"<a@[IPv6:1::2:3:4:5:1.2.3.4]>",
    b"<a@[IPv6:1.2.3.4::]>", b"<a@[IPv6:::1%eth0]>", b"<a@[tag-:x]>", b"<a@[tag:]>",
    b"<a@[:x]>", b"<a@[ta_g:x]>", b'<"a\x01"@c.d>', b'<"a\x7f"@c.d>', b'<"a\\\xc3\xa9"@c.d>',
    b'<"a\\\x01"@c.d>', b'<"a"b@c.d>', b'<a"b"@c.d>', b"<@a.b:>", b"<@a.b,c.d:u@e.f>",
    b"<@a.b u@c.d>", b"<@a.b,:u@c.d>", b"<@[1.2.3.4]:u@c.d>", b"<@:u@c.d>", b"<a@b.c:>",
    b"<a@b.c\x00>", b"<a\x00@b.c>", b"<a@b.c\xff>", b"<\xc3@b.c>", b"<a@\xed\xa0\x80.c>",
    b"<a@\xf4\x90\x80\x80.c>", b"<a@\xc0\xaf.c>",
]  # fmt: skip


@pytest.mark.parametrize("path", BAD_PATHS)
def test_bad_paths(cmd: ModuleType, path: bytes) -> None:
    assert refusal(cmd.parse_mail, b"FROM:" + path + b" SMTPUTF8") == BAD_SENDER
    assert refusal(cmd.parse_rcpt, b"TO:" + path, True) == BAD_RECIPIENT


def test_null_path_and_postmaster_are_command_specific(cmd: ModuleType) -> None:
    assert refusal(cmd.parse_rcpt, b"TO:<>") == BAD_RECIPIENT
    assert refusal(cmd.parse_mail, b"FROM:<Postmaster>") == BAD_SENDER
    assert refusal(cmd.parse_rcpt, b"TO:<@a.b:Postmaster>") == BAD_RECIPIENT


def test_non_ascii_needs_smtputf8(cmd: ModuleType) -> None:
    sender = b"FROM:<j\xc3\xb6rg@example.com>"
    assert refusal(cmd.parse_mail, sender) == NEEDS_SMTPUTF8  # no SMTPUTF8 parameter
    assert refusal(cmd.parse_mail, sender + b" SMTPUTF8", False) == NEEDS_SMTPUTF8  # not offered
    assert refusal(cmd.parse_mail, b"FROM:<a@b\xc3\xbccher.example> BODY=8BITMIME") == (
        NEEDS_SMTPUTF8
    )
    assert refusal(cmd.parse_mail, b"FROM:<@\xc3\xa9.example:a@b.c>") == NEEDS_SMTPUTF8
    assert refusal(cmd.parse_rcpt, b"TO:<j\xc3\xb6rg@example.com>") == NEEDS_SMTPUTF8
    assert refusal(cmd.parse_rcpt, b"TO:<j\xc3\xb6rg@example.com>", False) == NEEDS_SMTPUTF8
    # Bad UTF-8 is bad syntax whether or not SMTPUTF8 is in force.
    assert refusal(cmd.parse_mail, b"FROM:<j\xf6rg@example.com>") == BAD_SENDER
    # Checks run in order: path syntax, parameters, then the SMTPUTF8 requirement.
    assert refusal(cmd.parse_mail, sender + b" SIZE=x") == (
        501,
        "5.5.4",
        "Bad SIZE parameter value",
    )


# --- paths: length limits (RFC 5321 §4.5.3.1) ------------------------------------------------


def domain_of(length: int) -> bytes:
    """A valid domain of exactly length octets (labels of at most 63)."""
    labels, left = [], length
    while left > 63:
        labels.append(b"d" * 62)
        left -= 63
    labels.append(b"e" * left)
    domain = b".".join(labels)
    assert len(domain) == length
    return domain


def test_local_part_limit(cmd: ModuleType) -> None:
    assert cmd.parse_mail(b"FROM:<" + b"a" * 64 + b"@b.c>")[0] == "a" * 64 + "@b.c"
    assert refusal(cmd.parse_mail, b"FROM:<" + b"a" * 65 + b"@b.c>") == MAIL_LOCAL_TOO_LONG
    assert refusal(cmd.parse_rcpt, b"TO:<" + b"a.b" * 22 + b"@b.c>") == RCPT_LOCAL_TOO_LONG
    # A quoted local part is counted as received, quotes and backslashes included.
    quoted = b'"' + b"\\x" * 31 + b'"'
    assert len(quoted) == 64
    assert cmd.parse_rcpt(b"TO:<" + quoted + b"@b.c>")[0] == quoted.decode() + "@b.c"
    longer = b"TO:<" + quoted[:-1] + b'x"@b.c>'
    assert refusal(cmd.parse_rcpt, longer) == RCPT_LOCAL_TOO_LONG


def test_domain_limit(cmd: ModuleType) -> None:
    assert cmd.parse_mail(b"FROM:<a@" + domain_of(252) + b">")[0] == "a@" + domain_of(252).decode()
    # 255 octets pass the domain limit but make a 259-octet path.
    assert refusal(cmd.parse_mail, b"FROM:<a@" + domain_of(255) + b">") == MAIL_PATH_TOO_LONG
    assert refusal(cmd.parse_mail, b"FROM:<a@" + domain_of(256) + b">") == MAIL_DOMAIN_TOO_LONG
    assert refusal(cmd.parse_rcpt, b"TO:<a@" + domain_of(256) + b">") == RCPT_DOMAIN_TOO_LONG


def test_path_limit(cmd: ModuleType) -> None:
    route = b"@" + domain_of(100) + b":"
    # "<" route local "@" domain ">" = 1 + 102 + 64 + 1 + 86 + 1 = 255, then 256 and 257
    for domain_length, fits in ((86, True), (87, True), (88, False)):
        args = b"FROM:<" + route + b"x" * 64 + b"@" + domain_of(domain_length) + b">"
        if fits:
            path, _ = cmd.parse_mail(args)
            assert len(path) == 64 + 1 + domain_length
        else:
            assert refusal(cmd.parse_mail, args) == MAIL_PATH_TOO_LONG
            assert refusal(cmd.parse_rcpt, b"TO:" + args[5:]) == RCPT_PATH_TOO_LONG


# --- parameters ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        (b"SIZE=0", {"SIZE": "0"}),
        (b"size=12345678901234567890", {"SIZE": "12345678901234567890"}),
        (b"BODY=7bit", {"BODY": "7BIT"}),
        (b"BODY=8BITMIME", {"BODY": "8BITMIME"}),
        (b"body=BinaryMIME", {"BODY": "BINARYMIME"}),
        (b"SMTPUTF8", {"SMTPUTF8": ""}),
        (b"RET=full", {"RET": "FULL"}),
        (b"RET=HDRS", {"RET": "HDRS"}),
        (b"ENVID=QQ314159", {"ENVID": "QQ314159"}),
        (b"ENVID=a+2Bb+3Dc+20d", {"ENVID": "a+b=c d"}),
        (b"ENVID=" + b"+41" * 100, {"ENVID": "A" * 100}),
        (b"AUTH=<>", {"AUTH": "<>"}),
        (b"AUTH=e+3Dmc2@example.com", {"AUTH": "e=mc2@example.com"}),
        (b"REQUIRETLS", {"REQUIRETLS": ""}),
        (
            b"SIZE=10  BODY=8BITMIME SMTPUTF8 RET=HDRS ENVID=x AUTH=<> REQUIRETLS  ",
            {"SIZE": "10", "BODY": "8BITMIME", "SMTPUTF8": "", "RET": "HDRS", "ENVID": "x",
             "AUTH": "<>", "REQUIRETLS": ""},
        ),
    ],
)  # fmt: skip
def test_mail_parameters(cmd: ModuleType, params: bytes, expected: dict[str, str]) -> None:
    assert cmd.parse_mail(b"FROM:<a@b.c> " + params) == ("a@b.c", expected)


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        (b"NOTIFY=NEVER", {"NOTIFY": "NEVER"}),
        (b"notify=never", {"NOTIFY": "NEVER"}),
        (b"NOTIFY=success,Failure,DELAY", {"NOTIFY": "SUCCESS,FAILURE,DELAY"}),
        (b"NOTIFY=DELAY,SUCCESS", {"NOTIFY": "DELAY,SUCCESS"}),
        (b"ORCPT=rfc822;user+40example.com", {"ORCPT": "rfc822;user@example.com"}),
        (b"ORCPT=RFC822;a+2Bb@c.d", {"ORCPT": "RFC822;a+b@c.d"}),
        (b"ORCPT=x-local;Joe+20Bloggs", {"ORCPT": "x-local;Joe Bloggs"}),
        (
            b"NOTIFY=FAILURE ORCPT=rfc822;a@b.c",
            {"NOTIFY": "FAILURE", "ORCPT": "rfc822;a@b.c"},
        ),
    ],
)
def test_rcpt_parameters(cmd: ModuleType, params: bytes, expected: dict[str, str]) -> None:
    assert cmd.parse_rcpt(b"TO:<a@b.c> " + params) == ("a@b.c", expected)


@pytest.mark.parametrize(
    ("params", "text"),
    [
        (b"SIZE=", "SIZE parameter needs a value"),
        (b"SIZE", "SIZE parameter needs a value"),
        (b"SIZE=123456789012345678901", "Bad SIZE parameter value"),
        (b"SIZE=1a", "Bad SIZE parameter value"),
        (b"SIZE=-1", "Bad SIZE parameter value"),
        (b"SIZE=1=2", "Bad SIZE parameter value"),
        (b"SIZE=\xd9\xa1", "Bad SIZE parameter value"),
        (b"SIZE=1\tBODY=7BIT", "Bad SIZE parameter value"),
        (b"BODY=8BIT", "Bad BODY parameter value"),
        (b"BODY=", "BODY parameter needs a value"),
        (b"SMTPUTF8=yes", "SMTPUTF8 parameter takes no value"),
        (b"SMTPUTF8=", "SMTPUTF8 parameter takes no value"),
        (b"REQUIRETLS=1", "REQUIRETLS parameter takes no value"),
        (b"RET=ALL", "Bad RET parameter value"),
        (b"ENVID=" + b"x" * 101, "Bad ENVID parameter value"),
        (b"ENVID=" + b"+41" * 101, "Bad ENVID parameter value"),
        (b"ENVID=a+2b", "Bad ENVID parameter value"),
        (b"ENVID=a+2", "Bad ENVID parameter value"),
        (b"ENVID=a+", "Bad ENVID parameter value"),
        (b"ENVID=a+0A", "Bad ENVID parameter value"),
        (b"ENVID=a+7F", "Bad ENVID parameter value"),
        (b"ENVID=a+C3+A9", "Bad ENVID parameter value"),
        (b"AUTH=a+zz", "Bad AUTH parameter value"),
        (b"AUTH", "AUTH parameter needs a value"),
        (b"SIZE=1 SIZE=1", "Duplicate SIZE parameter"),
        (b"body=7BIT BODY=8BITMIME", "Duplicate BODY parameter"),
        (b"SMTPUTF8 smtputf8", "Duplicate SMTPUTF8 parameter"),
        (b"=1", "Bad parameter syntax"),
        (b"-X=1", "Bad parameter syntax"),
        (b"SI_ZE=1", "Bad parameter syntax"),
        (b"\xc3\xa9=1", "Bad parameter syntax"),
        (b"SIZE=x FOO=1", "Bad SIZE parameter value"),
    ],
)
def test_bad_mail_parameters(cmd: ModuleType, params: bytes, text: str) -> None:
    assert refusal(cmd.parse_mail, b"FROM:<a@b.c> " + params) == (501, "5.5.4", text)


@pytest.mark.parametrize(
    ("params", "text"),
    [
        (b"NOTIFY=NEVER,SUCCESS", "Bad NOTIFY parameter value"),
        (b"NOTIFY=SUCCESS,SUCCESS", "Bad NOTIFY parameter value"),
        (b"NOTIFY=SUCCESS,", "Bad NOTIFY parameter value"),
        (b"NOTIFY=,DELAY", "Bad NOTIFY parameter value"),
        (b"NOTIFY=sometimes", "Bad NOTIFY parameter value"),
        (b"NOTIFY", "NOTIFY parameter needs a value"),
        (b"ORCPT=rfc822", "Bad ORCPT parameter value"),
        (b"ORCPT=;a@b.c", "Bad ORCPT parameter value"),
        (b"ORCPT=rfc822;", "Bad ORCPT parameter value"),
        (b"ORCPT=rfc822;a+zz", "Bad ORCPT parameter value"),
        (b"ORCPT=rfc(822);a", "Bad ORCPT parameter value"),
        (b"ORCPT=rfc822;a;b+0D", "Bad ORCPT parameter value"),
        (b"NOTIFY=NEVER notify=DELAY", "Duplicate NOTIFY parameter"),
    ],
)
def test_bad_rcpt_parameters(cmd: ModuleType, params: bytes, text: str) -> None:
    assert refusal(cmd.parse_rcpt, b"TO:<a@b.c> " + params) == (501, "5.5.4", text)


@pytest.mark.parametrize(
    ("parse", "args", "keyword"),
    [
        ("parse_mail", b"FROM:<a@b.c> FOO=bar", "FOO"),
        ("parse_mail", b"FROM:<a@b.c> x-vendor", "X-VENDOR"),
        ("parse_mail", b"FROM:<> NOTIFY=NEVER", "NOTIFY"),
        ("parse_mail", b"FROM:<> ORCPT=rfc822;a@b.c", "ORCPT"),
        ("parse_mail", b"FROM:<> FOO=1 SIZE=x", "FOO"),
        ("parse_rcpt", b"TO:<a@b.c> SIZE=10", "SIZE"),
        ("parse_rcpt", b"TO:<a@b.c> smtputf8", "SMTPUTF8"),
        ("parse_rcpt", b"TO:<a@b.c> BODY=7BIT", "BODY"),
    ],
)
def test_unknown_parameters(cmd: ModuleType, parse: str, args: bytes, keyword: str) -> None:
    assert refusal(getattr(cmd, parse), args) == (
        555,
        "5.5.4",
        f"{keyword} parameter not recognised",
    )


def test_refusals_are_value_errors(cmd: ModuleType) -> None:
    with pytest.raises(ValueError, match=r"501 5\.1\.7"):
        cmd.parse_mail(b"FROM:<nobody>")


def test_results_are_fresh_objects(cmd: ModuleType) -> None:
    first = cmd.parse_mail(b"FROM:<a@b.c> SIZE=1")
    first[1]["SIZE"] = "2"  # the session rewrites params (AUTH); nothing is shared
    assert cmd.parse_mail(b"FROM:<a@b.c> SIZE=1") == ("a@b.c", {"SIZE": "1"})


# --- the twins agree -------------------------------------------------------------------------

FRAGMENTS = [
    b"FROM:", b"TO:", b"<", b">", b"@", b" ", b" SIZE=", b"+2B", b"+", b'"', b"\\", b"[", b"]",
    b"\xc3\xa9", b"\xff", b"\xed\xa0\x80", b"0", b"7", b"255", b"256", b"a", b"Z", b"-", b".",
    b",", b":", b"::", b"=", b"IPv6:", b"ffff", b"1.2.3.4", b"x-tag:", b"postmaster",
    b" BODY=", b"8bitmime", b" SMTPUTF8", b" NOTIFY=", b"success", b",delay", b"never",
    b" ORCPT=", b"rfc822;", b" ENVID=", b" AUTH=", b"<>", b" RET=hdrs", b" REQUIRETLS",
    b"@a.b,@c:", b"\r", b"\n", b"\x00", b"\t", b"example.com", b"user",
]  # fmt: skip
fragments = st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.binary(max_size=2)), max_size=16).map(
    b"".join
)
envelopes = st.tuples(
    st.sampled_from([b"FROM:<", b"TO:<", b"FROM: <", b"from:<", b"FROM:", b""]),
    fragments,
    st.sampled_from([b">", b"> ", b"", b">SIZE=1 "]),
    fragments,
).map(b"".join)
# Mostly well-formed addresses, so that the accepting paths are compared as well.
ATOM = rb"[a-zA-Z0-9!#+=_-]{1,6}"
LABEL = rb"[a-z0-9]([a-z0-9-]{0,5}[a-z0-9])?"
local_parts = st.one_of(
    st.from_regex(ATOM + rb"(\." + ATOM + rb"){0,2}", fullmatch=True),
    st.from_regex(rb'"([ a-z@>.]|\\[ -~])*"', fullmatch=True),
    st.sampled_from([b"j\xc3\xb6rg", b'"\xc3\xa9 t"', b"a" * 64, b"a" * 65, b"a..b", b"\xff"]),
)
domains = st.one_of(
    st.from_regex(LABEL + rb"(\." + LABEL + rb"){0,3}", fullmatch=True),
    st.from_regex(rb"\[[0-9]{1,3}(\.[0-9]{1,3}){3}\]", fullmatch=True),
    st.from_regex(rb"\[IPv6:[0-9a-f:]{2,20}(:[0-9]{1,3}(\.[0-9]{1,3}){3})?\]", fullmatch=True),
    st.from_regex(rb"\[[a-z0-9-]{1,5}:[!-Z^-~]{1,6}\]", fullmatch=True),
    st.sampled_from([b"b\xc3\xbccher.example", b"-x.example", b"x-.example", b"d" * 64]),
)
routes = st.sampled_from([b"", b"", b"", b"@relay.example:", b"@a,@b.c:", b"@-x:"])


def param_lists(valid: list[bytes]) -> st.SearchStrategy[bytes]:
    """SP-separated params: mostly valid ones for the command, sometimes anything."""
    anything = st.from_regex(rb"[A-Za-z0-9=+;,<>-]{1,12}", fullmatch=True)
    one = st.one_of(st.sampled_from(valid), st.sampled_from(valid), anything)
    return st.lists(one, max_size=3, unique=True).map(b" ".join)


mail_params = param_lists(
    [b"SIZE=100", b"BODY=8BITMIME", b"SMTPUTF8", b"RET=FULL", b"ENVID=a+2Bb", b"AUTH=<>",
     b"REQUIRETLS", b"smtputf8", b"SIZE="]
)  # fmt: skip
rcpt_params = param_lists([b"NOTIFY=SUCCESS,DELAY", b"ORCPT=rfc822;a+40b", b"notify=never"])


def address(command: bytes, route: bytes, local: bytes, domain: bytes, extra: bytes) -> bytes:
    return command + b"<" + route + local + b"@" + domain + b"> " + extra


addresses = st.one_of(
    st.builds(address, st.just(b"FROM:"), routes, local_parts, domains, mail_params),
    st.builds(address, st.just(b"TO:"), routes, local_parts, domains, rcpt_params),
)


def assert_twins_agree(args: bytes) -> None:
    compiled, pure = both_impls("commands")
    for smtputf8 in (True, False):
        assert outcome(compiled.parse_mail, args, smtputf8) == outcome(
            pure.parse_mail, args, smtputf8
        )
        assert outcome(compiled.parse_rcpt, args, smtputf8) == outcome(
            pure.parse_rcpt, args, smtputf8
        )
    assert compiled.parse_command(args) == pure.parse_command(args)


@settings(max_examples=600, deadline=None)
@given(envelopes)
def test_twins_agree_on_smtp_like_bytes(args: bytes) -> None:
    assert_twins_agree(args)


@settings(max_examples=400, deadline=None)
@given(addresses)
def test_twins_agree_on_near_valid_addresses(args: bytes) -> None:
    assert_twins_agree(args)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=40))
def test_twins_agree_on_any_bytes(args: bytes) -> None:
    assert_twins_agree(args)
    assert_twins_agree(b"FROM:<" + args)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(FRAGMENTS[:40]), max_size=6).map(b"".join))
def test_twins_agree_on_address_literals(inner: bytes) -> None:
    assert_twins_agree(b"TO:<a@[" + inner + b"]>")
    assert_twins_agree(b"TO:<a@[IPv6:" + inner + b"]>")


LINE_PIECES = [b"MAIL FROM:<a@b>", b"RCPT TO:<c@d>", b"DATA", b"x" * 40, b"\r\n", b"\n", b"\r",
               b"", b"QUIT", b" "]  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(
    data=st.lists(st.sampled_from(LINE_PIECES), max_size=30).map(b"".join),
    limit=st.integers(min_value=1, max_value=64),
    cuts=st.lists(st.integers(min_value=0, max_value=1500), max_size=12),
    drain_at=st.one_of(st.none(), st.integers(min_value=0, max_value=12)),
)
def test_twins_agree_on_any_chunking(
    data: bytes, limit: int, cuts: list[int], drain_at: int | None
) -> None:
    compiled, pure = both_impls("commands")
    bounds = [0, *sorted(c for c in cuts if c < len(data)), len(data)]
    chunks = [data[a:b] for a, b in itertools.pairwise(bounds)]
    traces = []
    for module in (compiled, pure):
        reader = module.LineReader(limit)
        trace: list[Any] = []
        for index, chunk in enumerate(chunks):
            reader.feed(chunk)
            trace.append(reader.pending)
            trace += read_all(reader)
            assert reader.pending <= limit  # what is left is one partial line, cut at limit
            if index == drain_at:
                trace.append(reader.drain())
        trace.append(reader.drain())
        traces.append(trace)
    assert traces[0] == traces[1]


AUTH_PIECES = [b"AUTH PLAIN ", b"auth x", b"AUTH", b" ", b"y" * 30, b"\r\n", b"\n", b"NOOP"]


@settings(max_examples=300, deadline=None)
@given(
    data=st.lists(st.sampled_from(AUTH_PIECES), max_size=30).map(b"".join),
    limit=st.integers(min_value=1, max_value=40),
    extra=st.integers(min_value=0, max_value=80),
    cuts=st.lists(st.integers(min_value=0, max_value=1000), max_size=12),
    exchange=st.lists(st.booleans(), min_size=13, max_size=13),
)
def test_twins_agree_on_auth_lines(
    data: bytes, limit: int, extra: int, cuts: list[int], exchange: list[bool]
) -> None:
    compiled, pure = both_impls("commands")
    bounds = [0, *sorted(c for c in cuts if c < len(data)), len(data)]
    chunks = [data[a:b] for a, b in itertools.pairwise(bounds)]
    traces = []
    for module in (compiled, pure):
        reader = module.LineReader(limit, auth_limit=limit + extra)
        trace: list[Any] = []
        for index, chunk in enumerate(chunks):
            reader.auth_exchange = exchange[index]
            reader.feed(chunk)
            trace.append(reader.pending)
            trace += read_all(reader)
            assert reader.pending <= limit + extra
        trace.append(reader.drain())
        traces.append(trace)
    assert traces[0] == traces[1]


@settings(max_examples=300, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=len(BATCH)), max_size=20))
def test_random_chunkings_of_the_batch_give_its_lines(cuts: list[int]) -> None:
    bounds = [0, *sorted(cuts), len(BATCH)]
    for module in both_impls("commands"):
        reader = module.LineReader()
        lines = []
        for a, b in itertools.pairwise(bounds):
            reader.feed(BATCH[a:b])
            lines += read_all(reader)
        assert lines == BATCH_LINES
