"""The compiled writers of the common FETCH response line (``fetch_flags_line`` and, for a
run of messages, ``fetch_flags_lines`` of ext/imap.pyx) and their pure-Python twins: the
same bytes for every input, as a client reads them, and the same refusal of numbers out of
range; ``fetch_flags_lines`` writes what ``fetch_flags_line`` writes line by line; and
``fetch_response`` gives the same line through it as through its general path."""

from __future__ import annotations

import sys
from array import array
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from imapwire import Atom, read_fetch
from kernels import IMPLS, both_impls, load_impl
from tachymail.imap.fetch import fetch_response, format_flags, format_internaldate
from tachymail.mailbox import MessageInfo
from tachymail.protocol.imap_types import FetchAtt

NUMBER = st.integers(min_value=0, max_value=2**63 - 1)
FLAG = st.sampled_from(["\\Seen", "\\Answered", "\\Flagged", "\\Deleted", "\\Draft"]) | (
    # a keyword "NIL" would read as NIL in a list: no client uses one
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz$_", min_size=1, max_size=12).filter(
        lambda k: k.lower() != "nil"
    )
)


@pytest.fixture(params=IMPLS)
def imap(request: pytest.FixtureRequest) -> ModuleType:
    return load_impl("imap", request.param)


def test_example(imap: ModuleType) -> None:
    line = imap.fetch_flags_line(12, 4827, b"(\\Seen $Junk)", 3028, None, 0)
    assert line == b"* 12 FETCH (UID 4827 FLAGS (\\Seen $Junk) RFC822.SIZE 3028)\r\n"
    line = imap.fetch_flags_line(1, 2, b"()", 0, b'" 7-Jul-1996 02:44:25 +0000"', 2**63 - 1)
    assert read_fetch(line) == (
        1,
        {
            b"UID": Atom(b"2"),
            b"FLAGS": [],
            b"RFC822.SIZE": Atom(b"0"),
            b"INTERNALDATE": b" 7-Jul-1996 02:44:25 +0000",
            b"MODSEQ": [Atom(b"%d" % (2**63 - 1))],
        },
    )


@pytest.mark.parametrize("bad", [-1, 2**63, 2**64 + 5])
def test_numbers_out_of_range(imap: ModuleType, bad: int) -> None:
    for position in range(4):
        numbers = [1, 1, 1, 1]
        numbers[position] = bad
        seq, uid, size, modseq = numbers
        with pytest.raises(ValueError):
            imap.fetch_flags_line(seq, uid, b"()", size, None, modseq)


@settings(max_examples=300, deadline=None)
@given(
    seq=NUMBER,
    uid=NUMBER,
    flags=st.frozensets(FLAG, max_size=6),
    size=NUMBER,
    when=st.none() | st.floats(min_value=0, max_value=4e9),
    modseq=NUMBER,
)
def test_twins_agree(
    seq: int, uid: int, flags: frozenset[str], size: int, when: float | None, modseq: int
) -> None:
    compiled, pure = both_impls("imap")
    date = None if when is None else format_internaldate(when)
    args = (seq, uid, format_flags(flags), size, date, modseq)
    line = compiled.fetch_flags_line(*args)
    assert line == pure.fetch_flags_line(*args)
    number, items = read_fetch(line)
    assert number == seq and items[b"UID"] == Atom(b"%d" % uid)
    assert {bytes(f).decode() for f in items[b"FLAGS"]} == flags
    assert items[b"RFC822.SIZE"] == Atom(b"%d" % size)
    assert (b"INTERNALDATE" in items) == (date is not None)
    assert (b"MODSEQ" in items) == (modseq != 0)


@settings(max_examples=100, deadline=None)
@given(
    uid=st.integers(1, 2**32 - 1),
    flags=st.frozensets(FLAG, max_size=4),
    size=st.integers(0, 2**40),
    modseq=st.integers(1, 2**63 - 1),
    names=st.sampled_from(
        [
            ("UID", "FLAGS", "RFC822.SIZE"),
            ("UID", "FLAGS", "RFC822.SIZE", "INTERNALDATE", "MODSEQ"),
            ("FLAGS", "RFC822.SIZE"),
        ]
    ),
)
def test_fetch_response_fast_path_is_the_general_path(
    uid: int, flags: frozenset[str], size: int, modseq: int, names: tuple[str, ...]
) -> None:
    """The fast path's line equals what the general path writes for the same items (the
    general one is reached by asking INTERNALDATE first, which the fast path does not take)."""
    info = MessageInfo(uid, size, flags, 1e9, modseq, b"")

    def no_summary() -> dict[str, object]:
        raise AssertionError("the fast path needs no summary")

    def no_read(offset: int, length: int) -> bytes:
        raise AssertionError("the fast path reads no content")

    items = [FetchAtt(n.encode()) for n in names]
    fast = fetch_response(5, info, items, no_summary, no_read, uid=True)
    assert len(fast) == 1 and isinstance(fast[0], bytes)
    general = fetch_response(
        5, info, [FetchAtt(b"INTERNALDATE"), *items], no_summary, no_read, uid=True
    )
    _, fast_items = read_fetch(fast[0])
    _, general_items = read_fetch(b"".join(p for p in general if isinstance(p, bytes)))
    general_items.pop(b"INTERNALDATE")
    if "INTERNALDATE" in names:
        fast_items.pop(b"INTERNALDATE")
    assert fast_items == general_items


# --- fetch_flags_lines: a run of messages in one call ------------------------------------------


def columns(
    rows: list[tuple[int, frozenset[str], int, int]],
) -> tuple[array[int], list[bytes], array[int], array[int]]:
    """(uids, flag lists, sizes, modseqs) of rows (uid, flags, size, modseq)."""
    return (
        array("I", [uid for uid, _f, _s, _m in rows]),
        [format_flags(flags) for _u, flags, _s, _m in rows],
        array("Q", [size for _u, _f, size, _m in rows]),
        array("Q", [modseq for _u, _f, _s, modseq in rows]),
    )


def test_lines_example(imap: ModuleType) -> None:
    uids, flags, sizes, modseqs = columns(
        [(4827, frozenset({"\\Seen", "$Junk"}), 3028, 9), (4830, frozenset(), 17, 12)]
    )
    assert imap.fetch_flags_lines(12, uids, flags, sizes, None) == (
        b"* 12 FETCH (UID 4827 FLAGS (\\Seen $Junk) RFC822.SIZE 3028)\r\n"
        b"* 13 FETCH (UID 4830 FLAGS () RFC822.SIZE 17)\r\n"
    )
    assert imap.fetch_flags_lines(1, uids, flags, sizes, modseqs) == (
        b"* 1 FETCH (UID 4827 FLAGS (\\Seen $Junk) RFC822.SIZE 3028 MODSEQ (9))\r\n"
        b"* 2 FETCH (UID 4830 FLAGS () RFC822.SIZE 17 MODSEQ (12))\r\n"
    )
    assert imap.fetch_flags_lines(1, array("I"), [], array("Q"), array("Q")) == b""


def test_lines_refusals(imap: ModuleType) -> None:
    uids, flags, sizes, modseqs = columns([(1, frozenset(), 1, 1), (2, frozenset(), 2, 2)])
    with pytest.raises(ValueError, match="different lengths"):
        imap.fetch_flags_lines(1, uids, flags[:1], sizes, None)
    with pytest.raises(ValueError, match="different lengths"):
        imap.fetch_flags_lines(1, uids, flags, sizes, modseqs[:1])
    with pytest.raises(ValueError, match="out of range"):
        imap.fetch_flags_lines(2**63 - 1, uids, flags, sizes, None)  # the second one's number
    with pytest.raises(ValueError, match="out of range"):
        imap.fetch_flags_lines(-1, array("I"), [], array("Q"), None)
    with pytest.raises(ValueError, match="out of range"):
        imap.fetch_flags_lines(1, uids, flags, array("Q", [1, 2**63]), None)
    with pytest.raises(ValueError, match="out of range"):
        imap.fetch_flags_lines(1, uids, flags, sizes, array("Q", [2**64 - 1, 1]))
    with pytest.raises(TypeError):
        imap.fetch_flags_lines(1, uids, [b"()", "()"], sizes, None)


ROW = st.tuples(
    st.integers(0, 2**32 - 1), st.frozensets(FLAG, max_size=4), NUMBER, st.integers(0, 2**64 - 1)
)


@settings(max_examples=300, deadline=None)
@given(seq=st.integers(0, 2**63 + 5), rows=st.lists(ROW, max_size=12), with_modseq=st.booleans())
def test_lines_twins_agree_and_equal_the_single_lines(
    seq: int, rows: list[tuple[int, frozenset[str], int, int]], with_modseq: bool
) -> None:
    compiled, pure = both_impls("imap")
    uids, flags, sizes, modseqs = columns(rows)
    args = (seq, uids, flags, sizes, modseqs if with_modseq else None)
    results = []
    for impl in (compiled, pure):
        try:
            results.append(("ok", impl.fetch_flags_lines(*args)))
        except ValueError as exc:
            results.append(("raised", exc.args))
    assert results[0] == results[1]
    if results[0][0] == "raised":
        return
    # Line by line, what fetch_flags_line writes for each message (modseq 0 aside: the single
    # line leaves it out, the run writes what it is given).
    expected = b""
    for k, (uid, row_flags, size, modseq) in enumerate(rows):
        line = pure.fetch_flags_line(seq + k, uid, format_flags(row_flags), size, None, 0)
        if with_modseq:
            line = line[:-3] + b" MODSEQ (%d))\r\n" % modseq
        expected += line
    assert results[0][1] == expected


# --- fetch_item_lines: rendered items of a run of messages ------------------------------------


def test_item_lines_example_and_refusals(imap: ModuleType) -> None:
    parts = [b'BODYSTRUCTURE ("TEXT" "PLAIN" NIL NIL NIL "7BIT" 3 1)', b"UID 9 ENVELOPE NIL"]
    assert imap.fetch_item_lines(41, parts) == (
        b'* 41 FETCH (BODYSTRUCTURE ("TEXT" "PLAIN" NIL NIL NIL "7BIT" 3 1))\r\n'
        b"* 42 FETCH (UID 9 ENVELOPE NIL)\r\n"
    )
    assert imap.fetch_item_lines(1, []) == b""
    with pytest.raises(ValueError, match="out of range"):
        imap.fetch_item_lines(2**63 - 1, [b"a", b"b"])
    with pytest.raises(ValueError, match="out of range"):
        imap.fetch_item_lines(-1, [])
    with pytest.raises(TypeError):
        imap.fetch_item_lines(1, [b"a", bytearray(b"b")])


@settings(max_examples=300, deadline=None)
@given(seq=st.integers(-2, 2**63 + 2), parts=st.lists(st.binary(max_size=40), max_size=8))
def test_item_lines_twins_agree(seq: int, parts: list[bytes]) -> None:
    compiled, pure = both_impls("imap")
    results = []
    for impl in (compiled, pure):
        try:
            results.append(("ok", impl.fetch_item_lines(seq, parts)))
        except ValueError as exc:
            results.append(("raised", exc.args))
    assert results[0] == results[1]
    if results[0][0] == "ok":
        lines = results[0][1]
        assert lines == b"".join(b"* %d FETCH (%b)\r\n" % (seq + k, p) for k, p in enumerate(parts))
