"""The DATA / BDAT / dot-stuffing kernel: RFC 5321 and RFC 3030 cases, the SMTP smuggling
sequences, and both implementations against a slow reference model under hypothesis."""

from __future__ import annotations

import itertools
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels import IMPLS, both_impls, load_impl

CR, LF, DOT = 0x0D, 0x0A, 0x2E


@pytest.fixture(params=IMPLS)
def impl(request: pytest.FixtureRequest) -> ModuleType:
    return load_impl("data", request.param)


def attributes(reader: Any) -> dict[str, Any]:
    """What a caller reads from a finished (or paused) reader."""
    return {
        "done": reader.done,
        "content": reader.content(),
        "size": reader.size,
        "max_line": reader.max_line,
        "bare_cr": reader.bare_cr,
        "bare_lf": reader.bare_lf,
        "oversize": reader.oversize,
    }


def read(impl: ModuleType, *chunks: bytes, max_size: int = 0, store: bool = True) -> Any:
    """A DataReader fed *chunks*, each of which must be consumed whole."""
    reader = impl.DataReader(max_size, store)
    for chunk in chunks:
        assert reader.feed(chunk) == len(chunk)
    return reader


# --- reference model -----------------------------------------------------------------------


class ReferenceData:
    """The DATA rules applied octet by octet: slow, and right by inspection."""

    def __init__(self, max_size: int = 0, store: bool = True) -> None:
        self.max_size, self.store = max_size, store
        self.line = bytearray()  # raw octets of the line in progress
        self.after_crlf = True  # that line began the body or followed a CRLF
        self.text = bytearray()  # unstuffed content of finished lines
        self.max_line = 0
        self.bare_cr = self.bare_lf = self.done = False
        self.prev = -1

    def feed(self, chunk: bytes) -> int:
        if self.done:
            return 0
        for i, octet in enumerate(chunk):
            if self.prev == CR and octet != LF:
                self.bare_cr = True
            self.prev = octet
            self.line.append(octet)
            if octet != LF:
                continue
            if self.after_crlf and self.line == b".\r\n":
                self.done = True
                self.line = bytearray()  # the end line is not content
                return i + 1
            unstuffed = self.line[1:] if self.line[:1] == b"." else self.line
            self.text += unstuffed
            self.max_line = max(self.max_line, len(unstuffed))
            self.after_crlf = self.line[-2:] == b"\r\n"
            self.bare_lf |= not self.after_crlf
            self.line = bytearray()
        return len(chunk)

    def attributes(self) -> dict[str, Any]:
        text = bytes(self.text)
        # An open line counts unless it may still become the end line.
        if not (self.after_crlf and self.line in (b".", b".\r")):
            text += self.line[1:] if self.line[:1] == b"." else self.line
        oversize = 0 < self.max_size < len(text)
        return {
            "done": self.done,
            "content": text if self.store and not oversize else b"",
            "size": len(text),
            "max_line": self.max_line,
            "bare_cr": self.bare_cr,
            "bare_lf": self.bare_lf,
            "oversize": oversize,
        }


def reference_bdat(chunks: list[bytes], max_size: int = 0, store: bool = True) -> dict[str, Any]:
    """BDAT accounting of a complete message sent as *chunks*, octet by octet."""
    body = b"".join(chunks)
    max_line = line = 0
    bare_cr = bare_lf = False
    for i, octet in enumerate(body):
        line += 1
        if octet == CR and body[i + 1 : i + 2] != b"\n":
            bare_cr = True
        if octet == LF:
            bare_lf |= body[i - 1 : i] != b"\r"
            max_line, line = max(max_line, line), 0
    oversize = 0 < max_size < len(body)
    return {
        "done": True,
        "content": body if store and not oversize else b"",
        "size": len(body),
        "max_line": max(max_line, line),
        "bare_cr": bare_cr,
        "bare_lf": bare_lf,
        "oversize": oversize,
    }


def reference_stuff(data: bytes, dots: bool = True) -> bytes:
    """dot_stuff octet by octet; with dots=False only the line ends are normalised."""
    out = bytearray()
    at_start = True
    i = 0
    while i < len(data):
        octet = data[i]
        if octet in (CR, LF):
            out += b"\r\n"
            i += 2 if data[i : i + 2] == b"\r\n" else 1
            at_start = True
            continue
        if at_start and octet == DOT and dots:
            out.append(DOT)
        out.append(octet)
        at_start = False
        i += 1
    if not at_start:
        out += b"\r\n"
    return bytes(out)


# --- DATA: plain messages --------------------------------------------------------------------


def test_plain_message(impl: ModuleType) -> None:
    body = b"Subject: hello\r\n\r\nHello, world.\r\n"
    reader = impl.DataReader()
    assert reader.feed(body + b".\r\n") == len(body) + 3
    assert attributes(reader) == {
        "done": True,
        "content": body,
        "size": len(body),
        "max_line": len(b"Subject: hello\r\n"),
        "bare_cr": False,
        "bare_lf": False,
        "oversize": False,
    }


def test_empty_message(impl: ModuleType) -> None:
    reader = impl.DataReader()
    assert reader.feed(b".\r\nQUIT\r\n") == 3
    assert attributes(reader) == {
        "done": True,
        "content": b"",
        "size": 0,
        "max_line": 0,
        "bare_cr": False,
        "bare_lf": False,
        "oversize": False,
    }


def test_not_done_until_the_end_line(impl: ModuleType) -> None:
    reader = read(impl, b"line one\r\n", b"line two\r\n")
    assert not reader.done
    assert reader.content() == b"line one\r\nline two\r\n"
    assert reader.feed(b".\r\n") == 3
    assert reader.done


def test_dot_stuffed_lines_lose_one_dot(impl: ModuleType) -> None:
    reader = impl.DataReader()
    stream = b"..\r\n...three\r\n.x\r\nmid.dle\r\n.\r\n"
    assert reader.feed(stream) == len(stream)
    assert reader.content() == b".\r\n..three\r\nx\r\nmid.dle\r\n"
    assert reader.size == len(reader.content())
    assert reader.max_line == len(b"..three\r\n")


def test_dot_after_bare_lf_is_removed_too(impl: ModuleType) -> None:
    reader = read(impl, b"a\n.b\r\n.\r\n")
    assert reader.content() == b"a\nb\r\n"
    assert reader.bare_lf


# --- DATA: SMTP smuggling ----------------------------------------------------------------------

SMUGGLED = b"MAIL FROM:<spoof@evil.example>\r\n"

# (stream, done?, content): the fake end-of-data sequences of SMTP smuggling (SEC Consult,
# smtpsmug; see ../shared/corpus/smtp/SMTP-NOTES.md) must leave the commands after them as
# content; only a ".\r\n" line that starts the body or follows a CRLF ends it.
END_OF_DATA_CASES = [
    pytest.param(b"x\n.\n" + SMUGGLED, False, b"x\n\n" + SMUGGLED, id="lf-lf"),
    pytest.param(b"x\n.\r" + SMUGGLED, False, b"x\n\r" + SMUGGLED, id="lf-cr"),
    pytest.param(b"x\r.\n" + SMUGGLED, False, b"x\r.\n" + SMUGGLED, id="cr-lf"),
    pytest.param(b"x\r.\r" + SMUGGLED, False, b"x\r.\r" + SMUGGLED, id="cr-cr"),
    pytest.param(b"x\n.\r\n" + SMUGGLED, False, b"x\n\r\n" + SMUGGLED, id="lf-crlf"),
    pytest.param(b"x\r.\r\n" + SMUGGLED, False, b"x\r.\r\n" + SMUGGLED, id="cr-crlf"),
    pytest.param(b"x\r\n.\n" + SMUGGLED, False, b"x\r\n\n" + SMUGGLED, id="crlf-lf"),
    pytest.param(b"x\r\n.\r" + SMUGGLED, False, b"x\r\n\r" + SMUGGLED, id="crlf-cr"),
    pytest.param(b"x\r\n.\r\r\n" + SMUGGLED, False, b"x\r\n\r\r\n" + SMUGGLED, id="crlf-crcrlf"),
    pytest.param(
        b"x\r\r\n.\r\r\n" + SMUGGLED, False, b"x\r\r\n\r\r\n" + SMUGGLED, id="crcrlf-crcrlf"
    ),
    pytest.param(
        b"x\r\n\x00.\r\n" + SMUGGLED, False, b"x\r\n\x00.\r\n" + SMUGGLED, id="null-before"
    ),
    pytest.param(b"x\r\n.\x00\r\n" + SMUGGLED, False, b"x\r\n\x00\r\n" + SMUGGLED, id="null-after"),
    pytest.param(b".\r\n", True, b"", id="empty"),
    pytest.param(b"x\r\n.\r\n", True, b"x\r\n", id="crlf-dot-crlf"),
    pytest.param(b"\r\n.\r\n", True, b"\r\n", id="empty-line"),
    pytest.param(b"a\r\r\n.\r\n", True, b"a\r\r\n", id="bare-cr-then-crlf-ends"),
    pytest.param(b"..\r\n.\r\n", True, b".\r\n", id="stuffed-dot-line"),
]


@pytest.mark.parametrize(("stream", "done", "content"), END_OF_DATA_CASES)
def test_end_of_data(impl: ModuleType, stream: bytes, done: bool, content: bytes) -> None:
    reader = impl.DataReader()
    pipelined = b"QUIT\r\n" if done else b""  # after the end only
    assert reader.feed(stream + pipelined) == len(stream)
    assert reader.done is done
    assert reader.content() == content
    assert reader.size == len(content)
    if not done:
        # The real end still works, and the smuggled command stayed in the message.
        assert reader.feed(b".\r\nRSET\r\n") == 3
        assert reader.done
        assert reader.content() == content
        assert content.endswith(SMUGGLED)


@pytest.mark.parametrize(("stream", "done", "content"), END_OF_DATA_CASES)
def test_end_of_data_octet_by_octet(
    impl: ModuleType, stream: bytes, done: bool, content: bytes
) -> None:
    reader = impl.DataReader()
    used = [reader.feed(stream[i : i + 1]) for i in range(len(stream))]
    assert used == [1] * len(stream)
    assert (reader.done, reader.content()) == (done, content)


def test_aiosmtpd_smuggling_case(impl: ModuleType) -> None:
    # aiosmtpd 1.4.6 test_smtpsmuggling: one message, and it keeps "NO SMUGGLING".
    stream = b"Testing\n.\r\nNO SMUGGLING\r\n.\r\n"
    reader = impl.DataReader()
    assert reader.feed(stream) == len(stream)
    assert reader.done
    assert b"NO SMUGGLING" in reader.content()
    assert reader.bare_lf


@pytest.mark.parametrize(
    ("stream", "bare_cr", "bare_lf"),
    [
        (b"a\nb\r\n.\r\n", False, True),
        (b"a\rb\r\n.\r\n", True, False),
        (b"a\r\nb\r\n.\r\n", False, False),
        (b"\n.\r\n.\r\n", False, True),  # the first ".\r\n" follows a bare LF
        (b"a\r\r\n.\r\n", True, False),
    ],
)
def test_bare_flags(impl: ModuleType, stream: bytes, bare_cr: bool, bare_lf: bool) -> None:
    reader = read(impl, stream)
    assert reader.done
    assert (reader.bare_cr, reader.bare_lf) == (bare_cr, bare_lf)


def test_cr_at_chunk_end_waits_for_the_next_octet(impl: ModuleType) -> None:
    reader = read(impl, b"abc\r")
    assert not reader.bare_cr  # not decided yet
    assert reader.feed(b"\n") == 1
    assert not reader.bare_cr and not reader.bare_lf
    reader.feed(b"def\r")
    reader.feed(b"x\r\n")
    assert reader.bare_cr
    assert not reader.bare_lf


# --- DATA: chunk boundaries and pipelining -------------------------------------------------


def test_end_line_split_at_every_boundary(impl: ModuleType) -> None:
    stream = b"Hello\r\n..dots\r\n.\r\nQUIT\r\n"
    end = stream.index(b"\r\n.\r\n") + 5
    for cut in range(len(stream) + 1):
        for cut2 in range(cut, len(stream) + 1):
            reader = impl.DataReader()
            used = [reader.feed(c) for c in (stream[:cut], stream[cut:cut2], stream[cut2:])]
            assert sum(used) == end, (cut, cut2)
            assert reader.done
            assert reader.content() == b"Hello\r\n.dots\r\n"
            assert reader.max_line == 7


def test_pipelined_commands_are_left_unconsumed(impl: ModuleType) -> None:
    reader = impl.DataReader()
    stream = b"Hi\r\n.\r\nQUIT\r\n"
    used = reader.feed(stream)
    assert stream[used:] == b"QUIT\r\n"
    assert reader.feed(b"MAIL FROM:<a@b>\r\n") == 0
    assert reader.content() == b"Hi\r\n"


def test_feed_of_nothing(impl: ModuleType) -> None:
    reader = impl.DataReader()
    assert reader.feed(b"") == 0
    assert reader.feed(b".\r\n") == 3
    assert reader.feed(b"") == 0


# --- DATA: limits and counters ---------------------------------------------------------------


def test_oversize_keeps_scanning_to_the_end(impl: ModuleType) -> None:
    line = b"0123456789\r\n"
    reader = impl.DataReader(max_size=30)
    assert reader.feed(line * 2) == 24
    assert not reader.oversize
    assert reader.content() == line * 2
    assert reader.feed(line) == 12
    assert reader.oversize
    assert reader.content() == b""
    long_line = b"..a much longer line than the others\r\n"
    assert reader.feed(long_line) == len(long_line)
    assert not reader.done
    assert reader.feed(b".\r\nQUIT\r\n") == 3
    assert reader.done
    assert reader.oversize
    assert reader.content() == b""
    assert reader.size == 36 + len(long_line) - 1
    assert reader.max_line == len(long_line) - 1


def test_size_equal_to_max_size_is_not_oversize(impl: ModuleType) -> None:
    reader = read(impl, b"1234\r\n.\r\n", max_size=6)
    assert reader.done and not reader.oversize
    assert reader.content() == b"1234\r\n"


def test_store_false_only_counts(impl: ModuleType) -> None:
    reader = read(impl, b"abc\r\n", b"..defgh\r\n", b".\r\n", store=False)
    assert reader.done
    assert reader.content() == b""
    assert reader.size == len(b"abc\r\n.defgh\r\n")
    assert reader.max_line == len(b".defgh\r\n")
    assert not reader.oversize


@pytest.mark.parametrize(
    ("stream", "max_line"),
    [
        (b"abc\r\n.\r\n", 5),  # CRLF counts
        (b"abcd\n.\r\n", 5),  # a bare LF counts 1 (and the line after it is not the end)
        (b"ab\rcd\r\nx\r\n.\r\n", 7),  # a bare CR does not end a line
        (b"..abc\r\n.\r\n", 6),  # the stuffing dot does not count
        (b"a\r\n" + b"b" * 998 + b"\r\n.\r\n", 1000),
    ],
)
def test_max_line(impl: ModuleType, stream: bytes, max_line: int) -> None:
    reader = impl.DataReader()
    reader.feed(stream)
    if not reader.done:
        reader.feed(b"\r\n.\r\n")
    assert reader.max_line == max_line


def test_negative_max_size_is_refused(impl: ModuleType) -> None:
    with pytest.raises(ValueError, match="max_size"):
        impl.DataReader(max_size=-1)
    with pytest.raises(ValueError, match="max_size"):
        impl.BdatReader(max_size=-1)


# --- every buffer type -------------------------------------------------------------------------


def test_bytearray_and_memoryview_input(impl: ModuleType) -> None:
    backing = bytearray(b"junk" + b"one\r\n..two\r\n.\r\nQUIT\r\n")
    view = memoryview(backing)[4:]
    reader = impl.DataReader()
    assert reader.feed(view[:6]) == 6
    assert reader.feed(bytearray(view[6:10])) == 4
    assert reader.feed(view[10:]) == len(view) - 10 - 6
    backing[4:7] = b"XXX"  # the reader kept a copy, not a view
    assert reader.content() == b"one\r\n.two\r\n"

    bdat = impl.BdatReader()
    bdat.start_chunk(5, last=True)
    assert bdat.feed(memoryview(b"ab\r\ncd")) == 5
    assert bdat.content() == b"ab\r\nc"

    assert impl.dot_stuff(bytearray(b".a\nb")) == b"..a\r\nb\r\n"
    assert impl.dot_stuff(memoryview(b"x.\r\n")[1:]) == b"..\r\n"


def test_non_buffers_and_non_contiguous_views_are_refused(impl: ModuleType) -> None:
    reader = impl.DataReader()
    with pytest.raises(TypeError):
        reader.feed("text")
    with pytest.raises(BufferError):
        reader.feed(memoryview(b"a\r\nb\r\n")[::2])
    with pytest.raises(TypeError):
        impl.dot_stuff("text")


# --- BDAT ------------------------------------------------------------------------------------


def test_bdat_takes_exact_counts(impl: ModuleType) -> None:
    reader = impl.BdatReader()
    assert not reader.chunk_done
    reader.start_chunk(5)
    assert reader.feed(b"Hel") == 3
    assert not reader.chunk_done
    assert reader.feed(b"lo worldQUIT") == 2
    assert reader.chunk_done and not reader.done
    assert reader.feed(b"more") == 0
    reader.start_chunk(8, last=True)
    assert reader.feed(b" world\r\nQUIT\r\n") == 8
    assert reader.chunk_done and reader.done
    assert reader.feed(b"QUIT") == 0
    assert reader.content() == b"Hello world\r\n"
    assert (reader.size, reader.max_line) == (13, 13)
    assert not reader.bare_cr and not reader.bare_lf


def test_bdat_zero_last_is_done_at_once(impl: ModuleType) -> None:
    reader = impl.BdatReader()
    reader.start_chunk(0, last=True)
    assert reader.done and reader.chunk_done
    assert reader.content() == b""
    assert reader.size == 0


def test_bdat_zero_chunk_before_last(impl: ModuleType) -> None:
    reader = impl.BdatReader()
    reader.start_chunk(0)
    assert reader.chunk_done and not reader.done
    reader.start_chunk(3, last=True)
    assert reader.feed(b"abc") == 3
    assert reader.done
    assert reader.content() == b"abc"
    assert reader.max_line == 3  # the unterminated last line counts, without a terminator


def test_bdat_has_no_dot_stuffing_or_end_line(impl: ModuleType) -> None:
    reader = impl.BdatReader()
    reader.start_chunk(12, last=True)
    assert reader.feed(b"..a\r\n.\r\nb\r\n.") == 12
    assert reader.content() == b"..a\r\n.\r\nb\r\n."


def test_bdat_crlf_split_across_commands(impl: ModuleType) -> None:
    reader = impl.BdatReader()
    reader.start_chunk(2)
    reader.feed(b"a\r")
    assert not reader.bare_cr  # the LF may come with the next chunk
    reader.start_chunk(2, last=True)
    reader.feed(b"\nb")
    assert not reader.bare_cr and not reader.bare_lf
    assert reader.max_line == 3
    assert reader.content() == b"a\r\nb"


def test_bdat_final_cr_is_bare(impl: ModuleType) -> None:
    reader = impl.BdatReader()
    reader.start_chunk(3)
    reader.feed(b"ab\r")
    assert not reader.bare_cr
    reader.start_chunk(0, last=True)
    assert reader.bare_cr
    assert reader.max_line == 3


def test_bdat_bare_lf(impl: ModuleType) -> None:
    reader = impl.BdatReader()
    reader.start_chunk(4, last=True)
    reader.feed(b"a\nb\n")
    assert reader.bare_lf and not reader.bare_cr
    assert reader.max_line == 2


def test_bdat_oversize_and_store_false(impl: ModuleType) -> None:
    reader = impl.BdatReader(max_size=4)
    reader.start_chunk(3)
    reader.feed(b"abc")
    assert not reader.oversize and reader.content() == b"abc"
    reader.start_chunk(7, last=True)
    assert reader.feed(b"defghij") == 7
    assert reader.done and reader.oversize
    assert reader.content() == b""
    assert reader.size == 10

    counter = impl.BdatReader(store=False)
    counter.start_chunk(6, last=True)
    counter.feed(b"ab\r\ncd")
    assert counter.content() == b""
    assert (counter.size, counter.max_line, counter.oversize) == (6, 4, False)


def test_bdat_misuse_raises(impl: ModuleType) -> None:
    reader = impl.BdatReader()
    with pytest.raises(ValueError, match="BDAT chunk size"):
        reader.start_chunk(-1)
    reader.start_chunk(4)
    reader.feed(b"ab")
    with pytest.raises(RuntimeError, match="incomplete"):
        reader.start_chunk(1)
    reader.feed(b"cd")
    reader.start_chunk(0, last=True)
    with pytest.raises(RuntimeError, match="already complete"):
        reader.start_chunk(1)
    assert reader.content() == b"abcd"


def test_bdat_feed_before_start_chunk(impl: ModuleType) -> None:
    reader = impl.BdatReader()
    assert reader.feed(b"abc") == 0
    assert reader.size == 0 and not reader.chunk_done


# --- dot_stuff ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "wire"),
    [
        (b"", b""),
        (b"abc", b"abc\r\n"),
        (b"abc\n", b"abc\r\n"),
        (b"abc\r", b"abc\r\n"),
        (b".", b"..\r\n"),
        (b".abc\r\n..x\r\n", b"..abc\r\n...x\r\n"),
        (b"a.b\r\n", b"a.b\r\n"),
        (b"a\rb", b"a\r\nb\r\n"),
        (b"\r\r\n", b"\r\n\r\n"),
        (b"\n\r", b"\r\n\r\n"),
        (b"\n.\n", b"\r\n..\r\n"),  # a smuggled end leaves stuffed and normalised
        (b"x\n.\r\ny", b"x\r\n..\r\ny\r\n"),
        (b"x\r.\ry", b"x\r\n..\r\ny\r\n"),
        (b"x\r\n.\r\r\ny", b"x\r\n..\r\n\r\ny\r\n"),
        (b"x\r\r\n.\r\r\ny", b"x\r\n\r\n..\r\n\r\ny\r\n"),
        (b"x\r\n\x00.\r\ny", b"x\r\n\x00.\r\ny\r\n"),
        (b"x\r\n.\x00\r\ny", b"x\r\n..\x00\r\ny\r\n"),
    ],
)
def test_dot_stuff(impl: ModuleType, data: bytes, wire: bytes) -> None:
    result = impl.dot_stuff(data)
    assert result == wire
    assert (result is data) == (wire == data)


def test_dot_stuff_returns_the_same_object_when_nothing_changes(impl: ModuleType) -> None:
    data = b"Subject: x\r\n\r\nbody. with dots.\r\n"
    assert impl.dot_stuff(data) is data
    copy = impl.dot_stuff(bytearray(data))
    assert type(copy) is bytes and copy == data


@pytest.mark.parametrize("case", [param.values[0] for param in END_OF_DATA_CASES])
def test_dot_stuff_output_has_one_end_only(impl: ModuleType, case: bytes) -> None:
    wire = impl.dot_stuff(case)
    assert wire.count(b"\r") == wire.count(b"\n") == wire.count(b"\r\n")
    reader = impl.DataReader()
    assert reader.feed(wire + b".\r\nQUIT\r\n") == len(wire) + 3
    assert reader.done
    assert reader.content() == reference_stuff(case, dots=False)


N = 300_000


@pytest.mark.parametrize(
    ("data", "wire", "size"),
    [
        (b"\r" * N, b"\r\n" * N, N),
        (b"\n." * N, b"\r\n.." * N + b"\r\n", N),
        (b"\r\n.." * N, b"\r\n..." * N + b"\r\n", 3 * N),
        (b"x" * N, b"x" * N + b"\r\n", N),
    ],
)
def test_pathological_inputs_stay_linear(
    impl: ModuleType, data: bytes, wire: bytes, size: int
) -> None:
    # A quadratic scan would take minutes here; linear code takes milliseconds.
    assert impl.dot_stuff(data) == wire
    reader = impl.DataReader()
    for start in range(0, len(data), 65536):
        reader.feed(data[start : start + 65536])
    assert not reader.done
    assert reader.size == size


# --- real messages ---------------------------------------------------------------------------


def test_corpus_messages_round_trip(corpus: Path) -> None:
    compiled, pure = both_impls("data")
    messages = sorted((corpus / "mime").rglob("*.eml"))
    assert messages
    for path in messages:
        raw = path.read_bytes()
        wire = compiled.dot_stuff(raw)
        assert wire == pure.dot_stuff(raw), path
        stream = wire + b".\r\n"
        normalised = reference_stuff(raw, dots=False)
        for impl in (compiled, pure):
            reader = impl.DataReader()
            for start in range(0, len(stream), 997):
                reader.feed(stream[start : start + 997])
            assert reader.done, path
            assert reader.content() == normalised, path
        # As a client might send it unchanged (bare LFs and all): the twins agree.
        readers = [impl.DataReader() for impl in (compiled, pure)]
        for reader in readers:
            reader.feed(raw)
        assert attributes(readers[0]) == attributes(readers[1]), path


# --- the twins against the reference model --------------------------------------------------

# Weighted towards the octets that matter: line ends, dots, NUL and 8-bit octets.
PIECES = [b"\r"] * 4 + [b"\n"] * 4 + [b"."] * 4 + [b"\x00", b"a", b"a", b"\xff", b"\r\n"] * 2
BODIES = st.lists(st.sampled_from(PIECES), max_size=60).map(b"".join)
ENDINGS = st.sampled_from([b"", b"", b"\r\n.\r\n", b".\r\n", b"\r\n.\r\nQUIT\r\n", b"\r\n."])
LIMITS = st.sampled_from([0, 0, 0, 1, 5, 20])


def chunked(data: st.DataObject, stream: bytes) -> list[bytes]:
    """*stream* cut at random places (empty chunks included)."""
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    bounds = [0, *cuts, len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(bounds)]


@settings(max_examples=700, deadline=None)
@given(body=BODIES, ending=ENDINGS, max_size=LIMITS, store=st.booleans(), data=st.data())
def test_data_reader_matches_reference(
    body: bytes, ending: bytes, max_size: int, store: bool, data: st.DataObject
) -> None:
    compiled, pure = both_impls("data")
    chunks = chunked(data, body + ending)
    fast, twin = compiled.DataReader(max_size, store), pure.DataReader(max_size, store)
    model = ReferenceData(max_size, store)
    for chunk in chunks:
        used = model.feed(chunk)
        assert fast.feed(chunk) == used
        assert twin.feed(memoryview(chunk)) == used
        assert attributes(fast) == attributes(twin) == model.attributes()


@settings(max_examples=500, deadline=None)
@given(body=BODIES, max_size=LIMITS, store=st.booleans(), data=st.data())
def test_bdat_reader_matches_reference(
    body: bytes, max_size: int, store: bool, data: st.DataObject
) -> None:
    compiled, pure = both_impls("data")
    commands = chunked(data, body)
    readers = [compiled.BdatReader(max_size, store), pure.BdatReader(max_size, store)]
    for index, command in enumerate(commands):
        last = index == len(commands) - 1
        pieces = chunked(data, command)
        for reader in readers:
            reader.start_chunk(len(command), last)
            for piece in pieces[:-1]:
                assert reader.feed(piece) == len(piece)
            # The last piece comes with the next command glued on, which must be left alone.
            assert reader.feed(pieces[-1] + b"BDAT 1 LAST\r\n") == len(pieces[-1])
            assert reader.chunk_done
            assert reader.done is last
        assert attributes(readers[0]) == attributes(readers[1])
    assert attributes(readers[0]) == reference_bdat(commands, max_size, store)


@settings(max_examples=500, deadline=None)
@given(body=BODIES)
def test_dot_stuff_matches_reference(body: bytes) -> None:
    compiled, pure = both_impls("data")
    wire = reference_stuff(body)
    for impl in (compiled, pure):
        result = impl.dot_stuff(body)
        assert result == wire
        assert (result is body) == (wire == body)
        # Round trip: the reader gives the message back with its line ends normalised.
        reader = impl.DataReader()
        assert reader.feed(result + b".\r\nQUIT") == len(result) + 3
        assert reader.content() == reference_stuff(body, dots=False)
        assert not reader.bare_cr and not reader.bare_lf
