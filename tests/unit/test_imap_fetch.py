"""FETCH data items (tachymail.imap.fetch) on real messages: RFC 9051's examples, nested
multiparts, message/rfc822 parts, group addresses, partials, HEADER.FIELDS, BINARY.

Summaries come from tachymail.mailbox.summary.build_summary, as the store keeps them; the
responses are read back by the independent parser of tests/imapwire.py and compared with
values worked out by hand from the messages below.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from imapwire import Atom, read_fetch, read_value
from tachymail.imap.fetch import (
    ContentRange,
    FetchError,
    Piece,
    bodystructure,
    envelope,
    fetch_response,
    format_flags,
    format_internaldate,
    sets_seen,
)
from tachymail.mailbox import MessageInfo
from tachymail.mailbox.summary import ENVELOPE_FIELDS, build_summary
from tachymail.protocol.imap import Command, CommandReader, FetchAtt, parse_fetch_items


def crlf(text: bytes) -> bytes:
    return text.replace(b"\n", b"\r\n")


def atts(items: str) -> list[FetchAtt]:
    """The FetchAtts of ``FETCH 1 items`` as the tokenizer gives them."""
    reader = CommandReader()
    reader.feed(f"t FETCH 1 {items}\r\n".encode())
    command = reader.next()
    assert isinstance(command, Command)
    return parse_fetch_items(command.args[1:])


def pieces_for(content: bytes, items: str, **options: Any) -> list[Piece]:
    summary = build_summary(content)
    info = MessageInfo(
        options.pop("uid_value", 7),
        len(content),
        frozenset(options.pop("flags", ())),
        options.pop("internaldate", 0.0),
        options.pop("modseq_value", 12),
        b"",
    )
    return fetch_response(
        3,
        info,
        atts(items),
        lambda: summary,
        lambda offset, length: content[offset : offset + length],
        **options,
    )


def joined(content: bytes, pieces: list[Piece]) -> bytes:
    return b"".join(
        content[p.start : p.start + p.length] if isinstance(p, ContentRange) else p for p in pieces
    )


def fetch(content: bytes, items: str, **options: Any) -> dict[bytes, Any]:
    """The FETCH response's items, as a client reads them."""
    seq, found = read_fetch(joined(content, pieces_for(content, items, **options)))
    assert seq == 3
    return found


# ---------------------------------------------------------------------------------------------
# RFC 9051 §7.5.2's example message: its ENVELOPE and BODY, to the octet

RFC_BODY = b"".join(b"%-31d\r\n" % i for i in range(91)) + b"last line of 23 octets!\r\n"
RFC_MESSAGE = (
    crlf(
        b"Date: Wed, 17 Jul 1996 02:23:25 -0700 (PDT)\n"
        b"From: Terry Gray <gray@cac.washington.edu>\n"
        b"Subject: IMAP4rev2 WG mtg summary and minutes\n"
        b"To: imap@cac.washington.edu\n"
        b"cc: minutes@CNRI.Reston.VA.US, John Klensin <KLENSIN@MIT.EDU>\n"
        b"Message-Id: <B27397-0100000@cac.washington.edu>\n"
        b"MIME-Version: 1.0\n"
        b"Content-Type: TEXT/PLAIN; CHARSET=US-ASCII\n\n"
    )
    + RFC_BODY
)


def test_rfc_9051_example_envelope_and_body() -> None:
    assert len(RFC_BODY) == 3028 and RFC_BODY.count(b"\n") == 92
    found = fetch(RFC_MESSAGE, "(ENVELOPE BODY FLAGS RFC822.SIZE)", flags={"\\Seen"})
    gray = [b"Terry Gray", None, b"gray", b"cac.washington.edu"]
    assert found[b"ENVELOPE"] == [
        b"Wed, 17 Jul 1996 02:23:25 -0700 (PDT)",
        b"IMAP4rev2 WG mtg summary and minutes",
        [gray],
        [gray],  # sender and reply-to default to from (RFC 3501)
        [gray],
        [[None, None, b"imap", b"cac.washington.edu"]],
        [
            [None, None, b"minutes", b"CNRI.Reston.VA.US"],
            [b"John Klensin", None, b"KLENSIN", b"MIT.EDU"],
        ],
        None,
        None,
        b"<B27397-0100000@cac.washington.edu>",
    ]
    assert found[b"BODY"] == [
        b"TEXT",
        b"PLAIN",
        [b"CHARSET", b"US-ASCII"],
        None,
        None,
        b"7BIT",
        Atom(b"3028"),
        Atom(b"92"),
    ]
    assert found[b"FLAGS"] == [Atom(b"\\Seen")]
    assert found[b"RFC822.SIZE"] == Atom(b"%d" % len(RFC_MESSAGE))


def test_items_come_in_the_order_asked_with_uid_first_and_modseq_last() -> None:
    raw = joined(
        RFC_MESSAGE,
        pieces_for(RFC_MESSAGE, "(RFC822.SIZE FLAGS BODY.PEEK[]<0.4>)", uid=True, modseq=True),
    )
    assert raw == (
        b"* 3 FETCH (UID 7 RFC822.SIZE %d FLAGS () BODY[]<0> {4}\r\nDate MODSEQ (12))\r\n"
        % len(RFC_MESSAGE)
    )
    # asked for: not repeated
    raw = joined(RFC_MESSAGE, pieces_for(RFC_MESSAGE, "(FLAGS UID UID BODY.PEEK[]<99999.1>)"))
    assert raw == b'* 3 FETCH (FLAGS () UID 7 BODY[]<99999> "")\r\n'
    # the fast path (one compiled call) answers UID FLAGS RFC822.SIZE in its own order
    raw = joined(RFC_MESSAGE, pieces_for(RFC_MESSAGE, "(RFC822.SIZE FLAGS)", uid=True))
    assert raw == b"* 3 FETCH (UID 7 FLAGS () RFC822.SIZE %d)\r\n" % len(RFC_MESSAGE)


def test_summary_is_read_only_when_needed_and_once() -> None:
    calls = []

    def summary() -> dict[str, Any]:
        calls.append(1)
        return build_summary(RFC_MESSAGE)

    info = MessageInfo(1, len(RFC_MESSAGE), frozenset(), 0.0, 1, b"")
    read = lambda o, n: RFC_MESSAGE[o : o + n]  # noqa: E731
    fetch_response(1, info, atts("(UID FLAGS RFC822.SIZE BODY.PEEK[] RFC822)"), summary, read)
    assert calls == []
    items = "(ENVELOPE BODYSTRUCTURE BODY[TEXT] BODY[HEADER.FIELDS (FROM)] BODY[1])"
    fetch_response(1, info, atts(items), summary, read)
    assert calls == [1]


def test_internaldate_and_flags() -> None:
    when = time.mktime(time.strptime("1996-07-07 02:44:25", "%Y-%m-%d %H:%M:%S")) - time.timezone
    assert format_internaldate(when) == b'" 7-Jul-1996 02:44:25 +0000"'
    assert read_value(format_internaldate(0)) == b" 1-Jan-1970 00:00:00 +0000"
    assert format_flags([]) == b"()"
    assert (
        format_flags(["$Junk", "\\Seen", "\\Answered", "$Aa"]) == b"(\\Answered \\Seen $Aa $Junk)"
    )
    found = fetch(RFC_MESSAGE, "(INTERNALDATE)", internaldate=when)
    assert found[b"INTERNALDATE"] == b" 7-Jul-1996 02:44:25 +0000"


# ---------------------------------------------------------------------------------------------
# A nested message: multipart/mixed with an alternative, a message/rfc822 holding a multipart,
# and an attachment

NESTED = crlf(
    b"From: a@example.com\n"
    b"To: b@example.com\n"
    b"Subject: nested\n"
    b"MIME-Version: 1.0\n"
    b'Content-Type: multipart/mixed; boundary="outer"\n'
    b"\n"
    b"preamble\n"
    b"--outer\n"
    b'Content-Type: multipart/alternative; boundary="alt"\n'
    b"\n"
    b"--alt\n"
    b"Content-Type: text/plain; charset=utf-8\n"
    b"Content-Transfer-Encoding: quoted-printable\n"
    b"\n"
    b"caf=C3=A9   \n"
    b"soft=\n"
    b"break\n"
    b"--alt\n"
    b"Content-Type: text/html\n"
    b"\n"
    b"<p>hi</p>\n"
    b"--alt--\n"
    b"--outer\n"
    b"Content-Type: message/rfc822\n"
    b"Content-Description: forwarded\n"
    b"\n"
    b"From: Inner Person <inner@example.org>\n"
    b"Subject: inner subject\n"
    b"Content-Type: multipart/mixed; boundary=in\n"
    b"\n"
    b"--in\n"
    b"\n"
    b"inner text\n"
    b"--in\n"
    b"Content-Type: application/octet-stream\n"
    b"Content-Transfer-Encoding: base64\n"
    b"\n"
    b"AAECAw==\n"
    b"--in--\n"
    b"--outer\n"
    b'Content-Type: image/png; name="a.png"\n'
    b'Content-Disposition: attachment; filename="a.png"\n'
    b"Content-Transfer-Encoding: base64\n"
    b"Content-Language: en\n"
    b"\n"
    b"iVBORw0KGgo=\n"
    b"--outer--\n"
)


def test_nested_bodystructure() -> None:
    found = fetch(NESTED, "(BODYSTRUCTURE)")
    structure = found[b"BODYSTRUCTURE"]
    alternative, message, image, subtype, params, dsp, lang, loc = structure
    assert (subtype, params, dsp, lang, loc) == (
        b"MIXED",
        [b"BOUNDARY", b"outer"],
        None,
        None,
        None,
    )
    plain, html, alt_subtype, *_ = alternative
    assert alt_subtype == b"ALTERNATIVE"
    # text: type, subtype, params, id, description, encoding, octets, lines, md5, dsp, lang, loc
    assert plain[:8] == [
        b"TEXT",
        b"PLAIN",
        [b"CHARSET", b"utf-8"],
        None,
        None,
        b"QUOTED-PRINTABLE",
        Atom(b"26"),
        Atom(b"2"),
    ]
    # no charset: RFC 2045's default, spelled as Dovecot spells it
    assert html[:8] == [
        b"TEXT",
        b"HTML",
        [b"CHARSET", b"us-ascii"],
        None,
        None,
        b"7BIT",
        Atom(b"9"),
        Atom(b"0"),
    ]
    assert message[:7] == [
        b"MESSAGE",
        b"RFC822",
        None,
        None,
        b"forwarded",
        b"7BIT",
        Atom(b"%d" % (NESTED.index(b"--in--") + 6 - NESTED.index(b"From: Inner"))),
    ]
    inner_envelope, inner_body, inner_lines = message[7:10]
    assert inner_envelope[1] == b"inner subject"
    assert inner_envelope[2] == [[b"Inner Person", None, b"inner", b"example.org"]]
    assert inner_body[0][:2] == [b"TEXT", b"PLAIN"] and inner_body[1][:2] == [
        b"APPLICATION",
        b"OCTET-STREAM",
    ]
    assert inner_lines == Atom(b"12")  # line feeds: the last line has none
    assert image == [
        b"IMAGE",
        b"PNG",
        [b"NAME", b"a.png"],
        None,
        None,
        b"BASE64",
        Atom(b"12"),
        None,
        [b"ATTACHMENT", [b"FILENAME", b"a.png"]],
        [b"en"],
        None,
    ]
    # BODY: the same without extension data
    body = fetch(NESTED, "(BODY)")[b"BODY"]
    assert body[-1] == b"MIXED" and body[2] == [
        b"IMAGE",
        b"PNG",
        [b"NAME", b"a.png"],
        None,
        None,
        b"BASE64",
        Atom(b"12"),
    ]


def test_nested_sections() -> None:
    items = (
        "(BODY.PEEK[1] BODY.PEEK[1.1] BODY.PEEK[1.2.MIME] BODY.PEEK[2.HEADER] BODY.PEEK[2.TEXT]"
        " BODY.PEEK[2.1] BODY.PEEK[2.2.MIME] BODY.PEEK[2.MIME] BODY.PEEK[3] BODY.PEEK[4]"
        " BODY.PEEK[1.HEADER] BODY.PEEK[2.HEADER.FIELDS (subject)] BODY.PEEK[2.1.1])"
    )
    found = fetch(NESTED, items)
    assert found[b"BODY[1.1]"] == b"caf=C3=A9   \r\nsoft=\r\nbreak"
    assert found[b"BODY[1.2.MIME]"] == b"Content-Type: text/html\r\n\r\n"
    assert found[b"BODY[1]"].startswith(b"--alt\r\n") and found[b"BODY[1]"].endswith(b"--alt--")
    assert found[b"BODY[2.HEADER]"] == (
        b"From: Inner Person <inner@example.org>\r\nSubject: inner subject\r\n"
        b"Content-Type: multipart/mixed; boundary=in\r\n\r\n"
    )
    assert found[b"BODY[2.TEXT]"].startswith(b"--in\r\n\r\ninner text")
    assert found[b"BODY[2.1]"] == b"inner text"  # part 1 of the encapsulated multipart
    assert found[b"BODY[2.2.MIME]"] == (
        b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n"
    )
    assert found[b"BODY[2.MIME]"] == (
        b"Content-Type: message/rfc822\r\nContent-Description: forwarded\r\n\r\n"
    )
    assert found[b"BODY[3]"] == b"iVBORw0KGgo="
    assert found[b"BODY[2.HEADER.FIELDS (SUBJECT)]"] == b"Subject: inner subject\r\n\r\n"
    # parts that do not exist, and HEADER of a part that is no message: empty, no error
    assert found[b"BODY[4]"] == b""
    assert found[b"BODY[1.HEADER]"] == b""
    assert found[b"BODY[2.1.1]"] == b""


def test_part_one_of_a_single_part_message_is_its_body() -> None:
    found = fetch(RFC_MESSAGE, "(BODY.PEEK[1] BODY.PEEK[1.MIME] BODY.PEEK[2] BODY.PEEK[TEXT])")
    assert found[b"BODY[1]"] == RFC_BODY == found[b"BODY[TEXT]"]
    assert found[b"BODY[1.MIME]"] == RFC_MESSAGE[: -len(RFC_BODY)]
    assert found[b"BODY[2]"] == b""


def test_whole_sections_are_content_ranges() -> None:
    """Stored octets sent unchanged are ContentRange pieces after their literal's {n}."""
    pieces = pieces_for(NESTED, "(UID BODY[] BODY.PEEK[3] RFC822.HEADER)")
    start3 = NESTED.index(b"iVBOR")
    header_end = NESTED.index(b"\r\n\r\n") + 4
    assert pieces == [
        b"* 3 FETCH (UID 7 BODY[] {%d}\r\n" % len(NESTED),
        ContentRange(0, len(NESTED)),
        b" BODY[3] {12}\r\n",
        ContentRange(start3, 12),
        b" RFC822.HEADER {%d}\r\n" % header_end,
        ContentRange(0, header_end),
        b")\r\n",
    ]


# ---------------------------------------------------------------------------------------------
# Partials, HEADER.FIELDS


def test_partials() -> None:
    found = fetch(
        NESTED,
        "(BODY.PEEK[]<0.4> BODY.PEEK[]<1000000.10> BODY.PEEK[3]<2.3>"
        " BODY.PEEK[3]<10.100> BODY.PEEK[HEADER.FIELDS (TO)]<4.100>)",
    )
    assert found[b"BODY[]<0>"] == b"From"
    assert found[b"BODY[]<1000000>"] == b""  # origin past the end: an empty string
    assert found[b"BODY[3]<2>"] == b"BOR"
    assert found[b"BODY[3]<10>"] == b"o="  # length past the end: what there is
    assert found[b"BODY[HEADER.FIELDS (TO)]<4>"] == b"b@example.com\r\n\r\n"
    raw = joined(NESTED, pieces_for(NESTED, "BODY.PEEK[]<1000000.10>"))
    assert raw == b'* 3 FETCH (BODY[]<1000000> "")\r\n'


FOLDED = crlf(
    b"Received: from a\n\tby b\n"
    b"Subject: a folded\n subject line\n"
    b"X-Other: 1\n"
    b"from: Lower <l@example.com>\n"
    b"SUBJECT: second\n"
    b"\n"
    b"body\n"
)


def test_header_fields_case_insensitive_with_the_empty_line() -> None:
    found = fetch(
        FOLDED,
        "(BODY.PEEK[HEADER.FIELDS (Subject FROM)] BODY.PEEK[HEADER.FIELDS "
        "(X-None)] BODY.PEEK[HEADER.FIELDS.NOT (subject received)])",
    )
    assert found[b"BODY[HEADER.FIELDS (SUBJECT FROM)]"] == (
        b"Subject: a folded\r\n subject line\r\nfrom: Lower <l@example.com>\r\n"
        b"SUBJECT: second\r\n\r\n"
    )
    assert found[b"BODY[HEADER.FIELDS (X-NONE)]"] == b"\r\n"
    assert found[b"BODY[HEADER.FIELDS.NOT (SUBJECT RECEIVED)]"] == (
        b"X-Other: 1\r\nfrom: Lower <l@example.com>\r\n\r\n"
    )


def test_rfc822_items() -> None:
    found = fetch(FOLDED, "(RFC822 RFC822.HEADER RFC822.TEXT)")
    assert found[b"RFC822"] == FOLDED
    assert found[b"RFC822.TEXT"] == b"body\r\n"
    assert found[b"RFC822.HEADER"] + found[b"RFC822.TEXT"] == FOLDED


def test_sets_seen() -> None:
    assert sets_seen(atts("(BODY[TEXT])"))
    assert sets_seen(atts("(FLAGS RFC822)"))
    assert sets_seen(atts("RFC822.TEXT"))
    assert sets_seen(atts("BINARY[1]"))
    assert not sets_seen(atts("(BODY.PEEK[TEXT] BINARY.PEEK[1] BINARY.SIZE[1] RFC822.HEADER)"))
    assert not sets_seen(atts("(BODY BODYSTRUCTURE ENVELOPE FLAGS UID)"))
    assert not sets_seen(atts("FULL"))


# ---------------------------------------------------------------------------------------------
# BINARY


def test_binary_decodes_qp_and_base64() -> None:
    found = fetch(NESTED, "(BINARY.PEEK[1.1] BINARY.SIZE[1.1] BINARY.PEEK[3]<1.3> BINARY[1.2])")
    # quoted-printable: =XX, soft line breaks, transport white space at line ends dropped
    assert found[b"BINARY[1.1]"] == "café\r\nsoftbreak".encode()
    assert found[b"BINARY.SIZE[1.1]"] == Atom(b"%d" % len("café\r\nsoftbreak".encode()))
    assert found[b"BINARY[3]<1>"] == b"PNG"
    assert found[b"BINARY[1.2]"] == b"<p>hi</p>"  # 7bit: as stored


def test_binary_with_nul_is_a_literal8() -> None:
    raw = joined(NESTED, pieces_for(NESTED, "BINARY.PEEK[2.2]"))
    assert raw == b"* 3 FETCH (BINARY[2.2] ~{4}\r\n\x00\x01\x02\x03)\r\n"
    assert fetch(NESTED, "BINARY.SIZE[2.2]")[b"BINARY.SIZE[2.2]"] == Atom(b"4")


def test_binary_of_broken_base64_is_best_effort() -> None:
    message = crlf(b"Content-Transfer-Encoding: base64\n\nVGVz\xe9\xe9dAo\n!!")
    assert fetch(message, "BINARY.PEEK[1]")[b"BINARY[1]"] == b"Test\n"


def test_binary_of_an_unknown_encoding_is_refused() -> None:
    message = crlf(
        b"Content-Type: multipart/mixed; boundary=b\n\n--b\n"
        b"Content-Transfer-Encoding: x-uuencode\n\nbegin 644 x\n--b\n\nplain\n--b--\n"
    )
    with pytest.raises(FetchError) as caught:
        pieces_for(message, "BINARY.PEEK[1]")
    assert caught.value.code == "UNKNOWN-CTE"
    with pytest.raises(FetchError):
        pieces_for(message, "BINARY.SIZE[1]")
    # the other part, and BODY[] of the same part, are served
    assert fetch(message, "BINARY.PEEK[2]")[b"BINARY[2]"] == b"plain"
    assert fetch(message, "BODY.PEEK[1]")[b"BODY[1]"] == b"begin 644 x"


# ---------------------------------------------------------------------------------------------
# ENVELOPE addresses


def env(**fields: str) -> list[Any]:
    value = read_value(envelope(fields))
    assert isinstance(value, list) and len(value) == 10
    return value


def test_group_addresses() -> None:
    e = env(
        **{
            "from": "a@example.com",
            "to": "undisclosed-recipients:;",
            "cc": "Team: x@example.com, Y <y@example.com>;, z@example.com",
        }
    )
    assert e[5] == [[None, None, b"undisclosed-recipients", None], [None, None, None, None]]
    assert e[6] == [
        [None, None, b"Team", None],
        [None, None, b"x", b"example.com"],
        [b"Y", None, b"y", b"example.com"],
        [None, None, None, None],
        [None, None, b"z", b"example.com"],
    ]


def test_address_forms() -> None:
    e = env(
        **{
            "from": '"Doe, John" <john.doe@example.com>, ann@example.org (Ann Comment)',
            "sender": "",
            "reply-to": "bare",
            "to": '"quoted local"@example.net, <@route.example,@two.example:r@example.com>',
            "cc": "Name Only <>, =?utf-8?q?caf=C3=A9?= <c@example.com>",
        }
    )
    from_ = [
        [b"Doe, John", None, b"john.doe", b"example.com"],
        [b"Ann Comment", None, b"ann", b"example.org"],
    ]
    assert e[2] == from_ and e[3] == from_  # an empty Sender is the From
    assert e[4] == [[None, None, b"bare", b"MISSING_DOMAIN"]]
    assert e[5] == [
        [None, None, b"quoted local", b"example.net"],
        [None, b"@route.example,@two.example", b"r", b"example.com"],
    ]
    assert e[6] == [
        [b"Name Only", None, b"MISSING_MAILBOX", b"MISSING_DOMAIN"],
        [b"=?utf-8?q?caf=C3=A9?=", None, b"c", b"example.com"],
    ]
    # absent fields are NIL
    assert env()[:] == [None] * 10


def test_eight_bit_header_strings() -> None:
    fields = {"subject": "café", "from": "Zoë <z@example.com>"}
    plain = envelope(fields)
    assert b"{5}\r\ncaf\xc3\xa9" in plain  # a literal: 8-bit text is no quoted string in IMAP4
    assert read_value(plain)[1] == "café".encode()
    accepted = envelope(fields, utf8=True)
    assert b'"caf\xc3\xa9"' in accepted  # UTF8=ACCEPT: a quoted string may hold UTF-8
    assert read_value(accepted) == read_value(plain)


# ---------------------------------------------------------------------------------------------
# BODYSTRUCTURE corner cases


def test_message_global_and_encoded_rfc822() -> None:
    message = crlf(
        b"Content-Type: multipart/mixed; boundary=b\n\n--b\n"
        b"Content-Type: message/global\n\nFrom: g@example.com\nSubject: g\n\nglobal body\n--b\n"
        b"Content-Type: message/rfc822\nContent-Transfer-Encoding: base64\n\nRnJvbTog\n--b--\n"
    )
    tree = build_summary(message)["body"]
    rev1 = read_value(bodystructure(tree, extensible=False))
    # IMAP4rev1 has no message/global: a basic part
    assert rev1[0] == [b"MESSAGE", b"GLOBAL", None, None, None, b"7BIT", Atom(b"46")]
    rev2 = read_value(bodystructure(tree, extensible=False, rev2=True))
    assert rev2[0][7][1] == b"g" and rev2[0][8][:2] == [b"TEXT", b"PLAIN"]
    # an encoded message/rfc822 is not parsed: an empty envelope and body, as the grammar needs
    assert rev1[1][7] == [None] * 10
    assert rev1[1][8] == [
        b"TEXT",
        b"PLAIN",
        [b"CHARSET", b"us-ascii"],
        None,
        None,
        b"7BIT",
        Atom(b"0"),
        Atom(b"0"),
    ]
    # sections still reach into message/global (RFC 9051 §6.4.5)
    assert (
        fetch(message, "BODY.PEEK[1.HEADER.FIELDS (SUBJECT)]")[b"BODY[1.HEADER.FIELDS (SUBJECT)]"]
        == b"Subject: g\r\n\r\n"
    )


def test_rfc2231_parameters_are_sent_encoded() -> None:
    message = crlf(
        b"Content-Type: application/pdf; name*=utf-8''%E2%82%AC.pdf\n"
        b"Content-Disposition: attachment; filename*0*=utf-8''%E2%82%AC; filename*1=.pdf\n\n"
        b"x\n"
    )
    found = fetch(message, "BODYSTRUCTURE")[b"BODYSTRUCTURE"]
    assert found[2] == [b"NAME*", b"utf-8''%E2%82%AC.pdf"]
    assert found[8] == [b"ATTACHMENT", [b"FILENAME*", b"utf-8''%E2%82%AC.pdf"]]
    accepted = fetch(message, "BODYSTRUCTURE", utf8=True)[b"BODYSTRUCTURE"]
    assert accepted[2] == [b"NAME", "€.pdf".encode()]


def test_broken_mime_is_served() -> None:
    """Whatever the content, a response (never an exception but FetchError)."""
    for content in (
        b"",
        b"no header at all",
        b"Content-Type: multipart/mixed\r\n\r\nno boundary",
        b"Content-Type: multipart/mixed; boundary=x\r\n\r\nno delimiter line",
        b'From: <<<@@@>>>, ,;:"unterminated\r\nTo: (((\r\n\r\n',
        b"\x00\xff\r\n\r\n\x00",
    ):
        found = fetch(
            content,
            "(ENVELOPE BODYSTRUCTURE BODY[1] BODY[1.MIME] BODY[TEXT] "
            "BINARY.PEEK[1] BODY[HEADER.FIELDS (FROM)])",
        )
        assert len(found) == 7


# ---------------------------------------------------------------------------------------------
# Any input: a response a client can read, never an exception but FetchError

HEADER_TEXT = st.text(alphabet=st.sampled_from(list('ab @.,;:<>()"\\[]é\t')), max_size=40)


@settings(max_examples=300, deadline=None)
@given(fields=st.dictionaries(st.sampled_from(ENVELOPE_FIELDS), HEADER_TEXT), utf8=st.booleans())
def test_any_header_values_give_a_readable_envelope(fields: dict[str, str], utf8: bool) -> None:
    value = read_value(envelope(fields, utf8=utf8))
    assert isinstance(value, list) and len(value) == 10
    for addresses in value[2:8]:
        assert addresses is None or all(len(a) == 4 for a in addresses)


MIME_PIECES = st.sampled_from(
    [
        b"Content-Type: multipart/mixed; boundary=b\r\n",
        b"Content-Type: message/rfc822\r\n",
        b"Content-Transfer-Encoding: base64\r\n",
        b"Content-Transfer-Encoding: quoted-printable\r\n",
        b"\r\n",
        b"--b\r\n",
        b"--b--\r\n",
        b"From: x@y\r\n",
        b"text=\r\n",
        b"QUJD\r\n",
        b"\x00\xff",
    ]
)


@settings(max_examples=200, deadline=None)
@given(
    content=st.lists(MIME_PIECES, max_size=14).map(b"".join),
    section=st.sampled_from(["", "1", "2", "1.1", "2.1", "1.MIME", "2.HEADER", "TEXT", "1.TEXT"]),
    partial=st.sampled_from(["", "<0.3>", "<5.100>"]),
)
def test_any_content_gives_a_readable_response(content: bytes, section: str, partial: str) -> None:
    items = f"(ENVELOPE BODYSTRUCTURE BODY.PEEK[{section}]{partial} RFC822.SIZE)"
    found = fetch(content, items)
    assert found[b"RFC822.SIZE"] == Atom(b"%d" % len(content))
    binary = section.replace(".MIME", "").replace(".HEADER", "").replace(".TEXT", "")
    if binary in ("TEXT", "1.TEXT"):
        return
    try:
        found = fetch(content, f"(BINARY.PEEK[{binary}]{partial} BINARY.SIZE[{binary}])")
    except FetchError as exc:
        assert exc.code == "UNKNOWN-CTE"
