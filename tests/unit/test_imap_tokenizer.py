"""IMAP command tokenizer: CommandReader, parse_sequence_set, parse_fetch_items, quote.

Every test runs against the compiled kernel and its pure-Python twin; the hypothesis tests at
the end feed both the same random bytes in random chunks and require the same commands and
events, and check that a generated command, written out and fed in pieces, comes back.
Examples are from RFC 9051 §6 and §8, RFC 3501 §6 and §8, RFC 7888 and RFC 3516.
"""

from __future__ import annotations

from types import ModuleType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels import IMPLS, both_impls, load_impl
from tachymail.protocol import imap_types
from tachymail.protocol.imap_types import (
    SEARCHRES,
    STAR,
    Bad,
    Binary,
    Command,
    Continuation,
    FetchAtt,
    Section,
    String,
    TooLarge,
)

Item = Command | Continuation | Bad | TooLarge


@pytest.fixture(params=IMPLS)
def imap(request: pytest.FixtureRequest) -> ModuleType:
    return load_impl("imap", request.param)


def read_all(reader: object) -> list[Item]:
    items = []
    while (item := reader.next()) is not None:  # type: ignore[attr-defined]
        items.append(item)
    return items


def run(imap: ModuleType, data: bytes, **limits: int) -> list[Item]:
    reader = imap.CommandReader(**limits)
    reader.feed(data)
    return read_all(reader)


def one(imap: ModuleType, line: bytes) -> Item:
    items = run(imap, line)
    assert len(items) == 1, items
    return items[0]


def test_public_names_and_shared_types(imap: ModuleType) -> None:
    facade = pytest.importorskip("tachymail.protocol.imap")
    assert set(imap.__all__) == set(facade.__all__)
    for name in ("String", "Binary", "Section", "Command", "Bad", "FetchAtt"):
        assert getattr(imap, name) is getattr(imap_types, name)
    assert (imap.STAR, imap.SEARCHRES) == (0, -1)


# --- commands from the RFCs -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"a002 NOOP", Command(b"a002", b"NOOP", [])),
        (b"abcd CAPABILITY", Command(b"abcd", b"CAPABILITY", [])),
        (
            b"a001 login SMITH SESAME",
            Command(b"a001", b"LOGIN", [b"SMITH", b"SESAME"]),
        ),
        (
            b"A142 SELECT INBOX",
            Command(b"A142", b"SELECT", [b"INBOX"]),
        ),
        (
            b'A682 LIST "" *',
            Command(b"A682", b"LIST", [String(b""), b"*"]),
        ),
        (
            b"A202 LIST ~/Mail/ %",
            Command(b"A202", b"LIST", [b"~/Mail/", b"%"]),
        ),
        (
            b"A042 STATUS blurdybloop (UIDNEXT MESSAGES)",
            Command(b"A042", b"STATUS", [b"blurdybloop", [b"UIDNEXT", b"MESSAGES"]]),
        ),
        (
            b"A003 STORE 2:4 +FLAGS (\\Deleted)",
            Command(b"A003", b"STORE", [b"2:4", b"+FLAGS", [b"\\Deleted"]]),
        ),
        (
            b'A282 SEARCH FLAGGED SINCE 1-Feb-1994 NOT FROM "Smith"',
            Command(
                b"A282",
                b"SEARCH",
                [b"FLAGGED", b"SINCE", b"1-Feb-1994", b"NOT", b"FROM", String(b"Smith")],
            ),
        ),
        (
            b"A999 UID FETCH 4827313:4828442 FLAGS",
            Command(b"A999", b"UID FETCH", [b"4827313:4828442", b"FLAGS"]),
        ),
        (
            b"a uid search $",
            Command(b"a", b"UID SEARCH", [b"$"]),
        ),
        (
            b"A654 FETCH 2:4 (FLAGS BODY[HEADER.FIELDS (DATE FROM)])",
            Command(
                b"A654",
                b"FETCH",
                [
                    b"2:4",
                    [
                        b"FLAGS",
                        Section(b"BODY", [b"HEADER.FIELDS", [b"DATE", b"FROM"]], None),
                    ],
                ],
            ),
        ),
        (
            b"a FETCH 1 (body.peek[]<0.2048> BINARY[1.2] BINARY.SIZE[3])",
            Command(
                b"a",
                b"FETCH",
                [
                    b"1",
                    [
                        Section(b"BODY.PEEK", [], (0, 2048)),
                        Section(b"BINARY", [b"1.2"], None),
                        Section(b"BINARY.SIZE", [b"3"], None),
                    ],
                ],
            ),
        ),
        (
            b"a FETCH 1 BODY[1.2.MIME]",
            Command(b"a", b"FETCH", [b"1", Section(b"BODY", [b"1.2.MIME"], None)]),
        ),
        (
            b'a LIST "" [Gmail]/%',
            Command(b"a", b"LIST", [String(b""), b"[Gmail]/%"]),
        ),
        (
            b'a LOGIN "fred \\"the\\" foo" "back\\\\slash"',
            Command(b"a", b"LOGIN", [String(b'fred "the" foo'), String(b"back\\slash")]),
        ),
        (
            b'a SELECT "Entw\xc3\xbcrfe"',
            Command(b"a", b"SELECT", [String(b"Entw\xc3\xbcrfe")]),
        ),
        (b"a X ()", Command(b"a", b"X", [[]])),
        (b"a X ((a) (b c)) d", Command(b"a", b"X", [[[b"a"], [b"b", b"c"]], b"d"])),
        (b"a X  b   c  ", Command(b"a", b"X", [b"b", b"c"])),
        (b"a NOOP\n", Command(b"a", b"NOOP", [])),
    ],
)
def test_commands(imap: ModuleType, line: bytes, expected: Command) -> None:
    data = line if line.endswith(b"\n") else line + b"\r\n"
    assert one(imap, data) == expected


def test_nil_atom_is_not_a_string(imap: ModuleType) -> None:
    got = one(imap, b'a X NIL "NIL"\r\n')
    assert isinstance(got, Command)
    assert got.args == [b"NIL", String(b"NIL")]
    assert got.args[0] != got.args[1]
    assert type(got.args[1]) is String and got.args[1] == String(b"NIL")


def test_synchronizing_literal(imap: ModuleType) -> None:
    # RFC 9051 §6.3.12: APPEND with a synchronizing literal.
    reader = imap.CommandReader()
    reader.feed(b"A003 APPEND saved-messages (\\Seen) {23}\r\n")
    assert reader.next() == Continuation(b"A003", 23)
    assert reader.next() is None
    reader.feed(b"Subject: hi\r\n\r\nHello.\r\n")
    assert reader.next() is None  # the rest of the command line is still to come
    reader.feed(b"\r\n")
    assert reader.next() == Command(
        b"A003",
        b"APPEND",
        [b"saved-messages", [b"\\Seen"], String(b"Subject: hi\r\n\r\nHello.\r\n")],
    )
    assert reader.next() is None
    assert reader.pending == 0


def test_non_synchronizing_literals(imap: ModuleType) -> None:
    # RFC 7888: "{n+}" needs no continuation; LITERAL- uses the same syntax.
    items = run(imap, b"a LOGIN {4+}\r\nfred {3+}\r\nabc\r\nb NOOP\r\n")
    assert items == [
        Command(b"a", b"LOGIN", [String(b"fred"), String(b"abc")]),
        Command(b"b", b"NOOP", []),
    ]


def test_multiappend_and_literal8(imap: ModuleType) -> None:
    data = b"a APPEND box {2+}\r\nhi (\\Seen) ~{3+}\r\n\x00\r\x01 ~{0}\r\n\r\n"
    reader = imap.CommandReader()
    reader.feed(data)
    assert read_all(reader) == [
        Continuation(b"a", 0),
        Command(
            b"a",
            b"APPEND",
            [b"box", String(b"hi"), [b"\\Seen"], Binary(b"\x00\r\x01"), Binary(b"")],
        ),
    ]


def test_literal_inside_list_and_section(imap: ModuleType) -> None:
    got = one(imap, b"a FETCH 1 BODY[HEADER.FIELDS ({7+}\r\nSubject)]\r\n")
    assert got == Command(
        b"a", b"FETCH", [b"1", Section(b"BODY", [b"HEADER.FIELDS", [String(b"Subject")]], None)]
    )


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"\r\n", Bad(None, "empty command line")),
        (b" NOOP\r\n", Bad(None, "empty command line")),
        (b"a+b NOOP\r\n", Bad(None, "invalid tag")),
        (b"* NOOP\r\n", Bad(None, "invalid tag")),
        (b"a\r\n", Bad(b"a", "missing command name")),
        (b"a (NOOP)\r\n", Bad(b"a", "missing command name")),
        (b'a NO"OP\r\n', Bad(b"a", "invalid command name")),
        (b"a UID\r\n", Bad(b"a", "missing command after UID")),
        (b"a UID FETCH(1)\r\n", Bad(b"a", "invalid command name")),
        (b"a X (b\r\n", Bad(b"a", "unbalanced parenthesis")),
        (b"a X b)\r\n", Bad(b"a", "unexpected )")),
        (b"a FETCH 1 BODY[TEXT\r\n", Bad(b"a", "unterminated section")),
        (b"a FETCH 1 BODY[TEXT)]\r\n", Bad(b"a", "unexpected )")),
        (b"a FETCH 1 BODY[]<1>\r\n", Bad(b"a", "invalid partial")),
        (b"a FETCH 1 BODY[]<1.0>\r\n", Bad(b"a", "invalid partial")),
        (b"a FETCH 1 BODY[]<1.2\r\n", Bad(b"a", "invalid partial")),
        (b"a FETCH 1 BODY[]<x.2>\r\n", Bad(b"a", "invalid number")),
        (b"a FETCH 1 BODY[]x\r\n", Bad(b"a", "missing space between arguments")),
        (b'a X "b\r\n', Bad(b"a", "unterminated quoted string")),
        (b'a X "b\\c"\r\n', Bad(b"a", "invalid escape in quoted string")),
        (b'a X "b\x00"\r\n', Bad(b"a", "invalid character in quoted string")),
        (b'a X "b\rc"\r\n', Bad(b"a", "invalid character in quoted string")),
        (b'a X "b"c\r\n', Bad(b"a", "missing space between arguments")),
        (b'a X b"c"\r\n', Bad(b"a", "missing space between arguments")),
        (b"a X b(c)\r\n", Bad(b"a", "missing space between arguments")),
        (b"a X \xff\r\n", Bad(b"a", "invalid character")),
        (b"a X b\xff\r\n", Bad(b"a", "missing space between arguments")),
        (b"a X \x01\r\n", Bad(b"a", "invalid character")),
        (b"a X {}\r\n", Bad(b"a", "invalid number")),
        (b"a X {5-}\r\n", Bad(b"a", "invalid literal")),
        (b"a X {5} x\r\n", Bad(b"a", "invalid literal")),
        (b"a X {12345678901234567890}\r\n", Bad(b"a", "invalid number")),
        (b"a X ~{5\r\n", Bad(b"a", "invalid literal")),
    ],
)
def test_bad_commands(imap: ModuleType, data: bytes, expected: Bad) -> None:
    # The reader answers once, then reads the next command as usual.
    assert run(imap, data + b"z NOOP\r\n") == [expected, Command(b"z", b"NOOP", [])]


def test_no_space_after_literal(imap: ModuleType) -> None:
    items = run(imap, b"a X {1+}\r\nbc\r\nz NOOP\r\n")
    assert items == [Bad(b"a", "no space after literal"), Command(b"z", b"NOOP", [])]


def test_bad_command_skips_its_non_synchronizing_literals(imap: ModuleType) -> None:
    # The client sends a {n+} literal's octets whatever we answer: they are not a command.
    items = run(imap, b"a X ) {5+}\r\nz BAD\r{3+}\r\nb\r\n\r\nz NOOP\r\n")
    assert items == [Bad(b"a", "unexpected )"), Command(b"z", b"NOOP", [])]


def test_line_too_long(imap: ModuleType) -> None:
    reader = imap.CommandReader(max_line=16)
    reader.feed(b"a1 SEARCH " + b"x" * 20)
    assert reader.next() == Bad(b"a1", "command line too long")
    reader.feed(b"y" * 100)
    assert reader.next() is None
    assert reader.pending == 0
    reader.feed(b"yyy\r\nb NOOP\r\n")
    assert read_all(reader) == [Command(b"b", b"NOOP", [])]
    # The limit counts CRLF; exactly max_line octets fit.
    assert run(imap, b"a NOOP 12345678\r\n", max_line=17) == [Command(b"a", b"NOOP", [b"12345678"])]
    assert run(imap, b"a NOOP 123456789\r\n", max_line=17) == [Bad(b"a", "command line too long")]
    # No tag when the first max_line octets do not show one.
    assert run(imap, b"x" * 40 + b" NOOP\r\n", max_line=16) == [Bad(None, "command line too long")]


def test_command_text_counts_all_lines(imap: ModuleType) -> None:
    data = b"a LOGIN {3+}\r\nabc {3+}\r\ndef\r\n"
    assert run(imap, data, max_line=23) == [
        Command(b"a", b"LOGIN", [String(b"abc"), String(b"def")])
    ]
    assert run(imap, data, max_line=22) == [Bad(b"a", "command line too long")]


def test_literal_too_large(imap: ModuleType) -> None:
    reader = imap.CommandReader(max_literal=10)
    reader.feed(b"a APPEND box {11}\r\n")
    assert reader.next() == TooLarge(b"a", 11, True)
    reader.feed(b"b NOOP\r\n")
    assert reader.next() == Command(b"b", b"NOOP", [])
    # A {n+} literal's octets are skipped as they arrive, never kept.
    reader.feed(b"c APPEND box {25+}\r\n" + b"x" * 10)
    assert reader.next() == TooLarge(b"c", 25, False)
    assert reader.next() is None and reader.pending == 0
    reader.feed(b"x" * 10)
    assert reader.next() is None and reader.pending == 0
    reader.feed(b"x" * 5 + b" (rest)\r\nd NOOP\r\n")
    assert read_all(reader) == [Command(b"d", b"NOOP", [])]
    # All literals of a command count together.
    assert run(imap, b"e X {6+}\r\n123456 {5+}\r\n12345\r\nf NOOP\r\n", max_literal=10) == [
        TooLarge(b"e", 5, False),
        Command(b"f", b"NOOP", []),
    ]


def test_next_line_for_idle_and_authenticate(imap: ModuleType) -> None:
    reader = imap.CommandReader(max_line=16)
    reader.feed(b"a IDLE\r\nDO")
    assert reader.next() == Command(b"a", b"IDLE", [])
    assert reader.next_line() is None
    reader.feed(b"NE\r\nb NOOP\r\ndGVzdA==\n" + b"x" * 20)
    assert reader.next_line() == b"DONE"
    assert reader.next() == Command(b"b", b"NOOP", [])
    assert reader.next_line() == b"dGVzdA=="
    assert reader.next_line() == Bad(None, "command line too long")
    reader.feed(b"yy\r\nc NOOP\r\n")
    assert read_all(reader) == [Command(b"c", b"NOOP", [])]
    reader.feed(b"d LOGIN {3}\r\n")
    assert reader.next() == Continuation(b"d", 3)
    with pytest.raises(RuntimeError):
        reader.next_line()


def test_constructor_limits(imap: ModuleType) -> None:
    reader = imap.CommandReader()
    assert (reader.max_line, reader.max_literal) == (8192, 64 * 1024 * 1024)
    with pytest.raises(ValueError):
        imap.CommandReader(max_line=0)
    with pytest.raises(ValueError):
        imap.CommandReader(max_literal=-1)


def test_feed_takes_any_buffer(imap: ModuleType) -> None:
    reader = imap.CommandReader()
    reader.feed(bytearray(b"a NO"))
    reader.feed(memoryview(b"xxOP\r\n")[2:])
    assert read_all(reader) == [Command(b"a", b"NOOP", [])]


# --- sequence sets ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (b"1", [(1, 1)]),
        (b"2,4:7,9,12:*", [(2, 2), (4, 7), (9, 9), (12, STAR)]),
        (b"*:4,5:7", [(4, STAR), (5, 7)]),
        (b"7:5", [(5, 7)]),
        (b"*", [(STAR, STAR)]),
        (b"*:*", [(STAR, STAR)]),
        (b"$", [(SEARCHRES, SEARCHRES)]),
        (b"4294967295", [(4294967295, 4294967295)]),
    ],
)
def test_sequence_sets(imap: ModuleType, text: bytes, expected: list[tuple[int, int]]) -> None:
    assert imap.parse_sequence_set(text) == expected
    # A quoted sequence set (as some clients send) parses the same.
    assert imap.parse_sequence_set(String(text)) == expected


@pytest.mark.parametrize(
    "text",
    [
        b"",
        b"0",
        b"01",
        b"1,",
        b",1",
        b"1:",
        b":1",
        b"1:2:3",
        b"a",
        b"4294967296",
        b"$,1",
        b"1 2",
        b"-1",
        b"+1",
    ],
)
def test_bad_sequence_sets(imap: ModuleType, text: bytes) -> None:
    with pytest.raises(ValueError):
        imap.parse_sequence_set(text)


# --- FETCH items --------------------------------------------------------------------------------


def fetch_args(imap: ModuleType, text: bytes) -> list[object]:
    got = one(imap, b"a FETCH 1 " + text + b"\r\n")
    assert isinstance(got, Command), got
    return got.args[1:]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            b"ALL",
            [
                FetchAtt(b"FLAGS"),
                FetchAtt(b"INTERNALDATE"),
                FetchAtt(b"RFC822.SIZE"),
                FetchAtt(b"ENVELOPE"),
            ],
        ),
        (b"fast", [FetchAtt(b"FLAGS"), FetchAtt(b"INTERNALDATE"), FetchAtt(b"RFC822.SIZE")]),
        (
            b"FULL",
            [
                FetchAtt(b"FLAGS"),
                FetchAtt(b"INTERNALDATE"),
                FetchAtt(b"RFC822.SIZE"),
                FetchAtt(b"ENVELOPE"),
                FetchAtt(b"BODY"),
            ],
        ),
        (b"uid", [FetchAtt(b"UID")]),
        (
            b"(UID FLAGS RFC822.SIZE BODYSTRUCTURE RFC822 RFC822.HEADER RFC822.TEXT MODSEQ)",
            [
                FetchAtt(n)
                for n in (
                    b"UID",
                    b"FLAGS",
                    b"RFC822.SIZE",
                    b"BODYSTRUCTURE",
                    b"RFC822",
                    b"RFC822.HEADER",
                    b"RFC822.TEXT",
                    b"MODSEQ",
                )
            ],
        ),
        (b"BODY[]", [FetchAtt(b"BODY", ())]),
        (b"BODY.PEEK[]<0.1024>", [FetchAtt(b"BODY.PEEK", (), partial=(0, 1024))]),
        (b"BODY[HEADER]", [FetchAtt(b"BODY", (), b"HEADER")]),
        (b"body[text]", [FetchAtt(b"BODY", (), b"TEXT")]),
        (b"BODY[1]", [FetchAtt(b"BODY", (1,))]),
        (b"BODY[4.2.2.1]", [FetchAtt(b"BODY", (4, 2, 2, 1))]),
        (b"BODY[3.HEADER]", [FetchAtt(b"BODY", (3,), b"HEADER")]),
        (b"BODY[4.2.MIME]", [FetchAtt(b"BODY", (4, 2), b"MIME")]),
        (b"BODY[4.2.TEXT]", [FetchAtt(b"BODY", (4, 2), b"TEXT")]),
        (
            b'(BODY.PEEK[HEADER.FIELDS (Date From "Subject")])',
            [FetchAtt(b"BODY.PEEK", (), b"HEADER.FIELDS", (b"DATE", b"FROM", b"SUBJECT"))],
        ),
        (
            b"BODY[1.HEADER.FIELDS.NOT (X-Spam)]<10.20>",
            [FetchAtt(b"BODY", (1,), b"HEADER.FIELDS.NOT", (b"X-SPAM",), (10, 20))],
        ),
        (b"BINARY[1.2]", [FetchAtt(b"BINARY", (1, 2))]),
        (b"BINARY.PEEK[1]<0.100>", [FetchAtt(b"BINARY.PEEK", (1,), partial=(0, 100))]),
        (b"BINARY.SIZE[2]", [FetchAtt(b"BINARY.SIZE", (2,))]),
    ],
)
def test_fetch_items(imap: ModuleType, text: bytes, expected: list[FetchAtt]) -> None:
    assert imap.parse_fetch_items(fetch_args(imap, text)) == expected


@pytest.mark.parametrize(
    "text",
    [
        b"",
        b"FLAGS UID",
        b"()",
        b"(ALL)",
        b"NONSENSE",
        b'"FLAGS"',
        b"(FLAGS (UID))",
        b"BODY[0]",
        b"BODY[01]",
        b"BODY[1.]",
        b"BODY[.1]",
        b"BODY[MIME]",
        b"BODY[HEADER.FIELDS]",
        b"BODY[HEADER.FIELDS ()]",
        b"BODY[HEADER.FIELDS ((A))]",
        b"BODY[HEADER (A)]",
        b"BODY[TEXT TEXT TEXT]",
        b"BODY[FOO]",
        b'BODY["TEXT"]',
        b"BINARY[HEADER]",
        b"BINARY.SIZE[1]<0.1>",
        b"BODY[4294967296]",
    ],
)
def test_bad_fetch_items(imap: ModuleType, text: bytes) -> None:
    with pytest.raises(ValueError):
        imap.parse_fetch_items(fetch_args(imap, text))


# --- writing ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (b"", b'""'),
        (b"INBOX", b'"INBOX"'),
        (b'say "hi" \\o/', b'"say \\"hi\\" \\\\o/"'),
        (b"two\r\nlines", b"{10}\r\ntwo\r\nlines"),
        (b"caf\xc3\xa9", b"{5}\r\ncaf\xc3\xa9"),
        (b"nul\x00", b"{4}\r\nnul\x00"),
        (b"x" * 1024, b'"' + b"x" * 1024 + b'"'),
        (b"x" * 1025, b"{1025}\r\n" + b"x" * 1025),
    ],
)
def test_quote(imap: ModuleType, value: bytes, expected: bytes) -> None:
    assert imap.quote(value) == expected
    # What we write, the tokenizer reads back as the same string.
    got = [i for i in run(imap, b"a X " + expected + b"\r\n") if type(i) is not Continuation]
    assert got == [Command(b"a", b"X", [String(value)])]


# --- the twins agree; round trips ---------------------------------------------------------------

PIECES = [
    b"a",
    b"A1",
    b"*",
    b" ",
    b"  ",
    b"\r\n",
    b"\n",
    b"\r",
    b"NOOP",
    b"UID",
    b"FETCH",
    b"1:*",
    b"(",
    b")",
    b"[",
    b"]",
    b"BODY",
    b"BODY.PEEK[",
    b"BINARY[",
    b"HEADER.FIELDS",
    b"<0.10>",
    b"<",
    b">",
    b".",
    b'"',
    b'\\"',
    b"\\",
    b"{",
    b"}",
    b"{3}",
    b"{3+}",
    b"~{2+}",
    b"{0}",
    b"{4",
    b"+",
    b"-",
    b"x",
    b"\x00",
    b"\xff",
    b"%",
    b"NIL",
    b"$",
    b"12",
]


def chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted(min(c, len(data)) for c in cuts)
    out, last = [], 0
    for point in points:
        out.append(data[last:point])
        last = point
    out.append(data[last:])
    return out


def feed_and_read(
    imap: ModuleType, pieces: list[bytes], max_line: int, max_literal: int
) -> list[Item]:
    reader = imap.CommandReader(max_line, max_literal)
    items: list[Item] = []
    for piece in pieces:
        reader.feed(piece)
        items += read_all(reader)
        # Bounded memory whatever the input.
        assert reader.pending < max(max_line, max_literal)
    return items


streams = st.one_of(
    st.binary(max_size=200),
    st.lists(st.sampled_from(PIECES), max_size=40).map(b"".join),
)


@settings(max_examples=500, deadline=None)
@given(
    data=streams,
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=12),
    max_line=st.sampled_from([1, 8, 20, 8192]),
    max_literal=st.sampled_from([0, 3, 100]),
)
def test_twins_agree_on_any_stream(
    data: bytes, cuts: list[int], max_line: int, max_literal: int
) -> None:
    compiled, pure = both_impls("imap")
    whole = feed_and_read(pure, [data], max_line, max_literal)
    assert feed_and_read(compiled, chunks(data, cuts), max_line, max_literal) == whole
    assert feed_and_read(pure, chunks(data, cuts), max_line, max_literal) == whole


@settings(max_examples=300, deadline=None)
@given(
    text=st.one_of(
        st.binary(max_size=30),
        st.lists(st.sampled_from([b"1", b"*", b":", b",", b"$", b"0", b"42"]), max_size=8).map(
            b"".join
        ),
    )
)
def test_twins_agree_on_sequence_sets(text: bytes) -> None:
    compiled, pure = both_impls("imap")
    results = []
    for impl in (compiled, pure):
        try:
            results.append(("ok", impl.parse_sequence_set(text)))
        except ValueError:
            results.append(("ValueError", None))
    assert results[0] == results[1]


# A generated command: atoms, strings (quoted or literal), lists and sections.
atoms = st.from_regex(
    rb"\A[A-Za-z0-9\\.:*%$&'+,/;<=>?@^_`|~-][A-Za-z0-9\\.:*%$&'+,/;<=>?@^_`|~\[\]-]{0,8}\Z"
).filter(
    lambda a: (
        a.upper().split(b"[")[0]
        not in {b"BODY", b"BODY.PEEK", b"BINARY", b"BINARY.PEEK", b"BINARY.SIZE"}
        and not a.startswith(b"~{")
    )
)
strings = st.binary(max_size=20).map(String)
tokens = st.recursive(
    st.one_of(atoms, strings),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.builds(
            Section,
            st.sampled_from([b"BODY", b"BODY.PEEK", b"BINARY"]),
            st.lists(
                st.one_of(
                    atoms.filter(lambda a: b"]" not in a), strings, st.lists(inner, max_size=3)
                ),
                max_size=3,
            ),
            st.one_of(st.none(), st.tuples(st.integers(0, 2**32 - 1), st.integers(1, 2**32 - 1))),
        ),
    ),
    max_leaves=12,
)


def write(token: object, literals: list[bool]) -> bytes:
    """token as a client writes it; literals says, string by string, {n+} or quoted."""
    if isinstance(token, String):
        use_literal = literals.pop() if literals else True
        if not use_literal and all(0 < c < 0x80 and c not in (0x0D, 0x0A) for c in token):
            return b'"' + bytes(token).replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
        return b"{%d+}\r\n" % len(token) + bytes(token)
    if isinstance(token, Section):
        partial = b"" if token.partial is None else b"<%d.%d>" % token.partial
        return (
            token.name + b"[" + b" ".join(write(t, literals) for t in token.spec) + b"]" + partial
        )
    if isinstance(token, list):
        return b"(" + b" ".join(write(t, literals) for t in token) + b")"
    assert isinstance(token, bytes)
    return token


@settings(max_examples=400, deadline=None)
@given(
    args=st.lists(tokens, max_size=5),
    literals=st.lists(st.booleans(), max_size=30),
    cuts=st.lists(st.integers(min_value=0, max_value=600), max_size=10),
)
def test_round_trip(args: list[object], literals: list[bool], cuts: list[int]) -> None:
    line = b"t1 UID X" + b"".join(b" " + write(a, literals) for a in args) + b"\r\n"
    expected = [Command(b"t1", b"UID X", args)]
    for impl in both_impls("imap"):
        assert feed_and_read(impl, chunks(line, cuts), 8192, 10**6) == expected


def read_mixed(imap: ModuleType, pieces: list[bytes], lines: list[bool]) -> list[object]:
    """Read with next() or next_line() as *lines* says, step by step (what a session in IDLE
    or AUTHENTICATE does); a RuntimeError is recorded, not raised."""
    reader = imap.CommandReader(20, 10)
    out: list[object] = []
    step = 0
    for piece in pieces:
        reader.feed(piece)
        while True:
            use_line = lines[step % len(lines)] if lines else False
            step += 1
            try:
                item = reader.next_line() if use_line else reader.next()
            except RuntimeError:
                out.append("RuntimeError")
                item = reader.next()
            if item is None:
                break
            out.append(item)
        assert reader.pending < 20
    return out


@settings(max_examples=300, deadline=None)
@given(
    data=streams,
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=12),
    lines=st.lists(st.booleans(), max_size=8),
)
def test_twins_agree_with_next_line(data: bytes, cuts: list[int], lines: list[bool]) -> None:
    compiled, pure = both_impls("imap")
    pieces = chunks(data, cuts)
    assert read_mixed(compiled, pieces, lines) == read_mixed(pure, pieces, lines)
