"""IMAP command tokenizer: a batch of typical client commands read and parsed.

The workload is what the server does with one client write: the batch goes into a
CommandReader as one chunk, every command is read, FETCH sequence sets and items are parsed.
"1 batch" is one client's typical mix (FETCH, UID FETCH, SEARCH, STORE, APPEND with a
non-synchronizing literal, NOOP); "100 batches" is 100 of them in a single chunk, for the
steady-state rate.  Throughput is reported per command (items).
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from kernels import IMPLS, load_impl

MESSAGE = b"From: a@example.org\r\nSubject: hello\r\n\r\n" + b"body line\r\n" * 20
BATCH = (
    b"a1 FETCH 1:* (UID FLAGS RFC822.SIZE)\r\n"
    b"a2 UID FETCH 4827313:4828442 (FLAGS BODY.PEEK[HEADER.FIELDS (DATE FROM SUBJECT TO CC "
    b"MESSAGE-ID)])\r\n"
    b"a3 UID FETCH 4828442 (BODY.PEEK[]<0.16384> BODYSTRUCTURE)\r\n"
    b'a4 UID SEARCH SINCE 1-Feb-2024 NOT DELETED TEXT "quarterly report"\r\n'
    b"a5 UID STORE 4828442 +FLAGS.SILENT (\\Seen)\r\n"
    b"a6 APPEND Sent (\\Seen) {%d+}\r\n" % len(MESSAGE) + MESSAGE + b"\r\n"
    b"a7 FETCH 2,4:7,9 ALL\r\n"
    b"a8 NOOP\r\n"
)
COMMANDS = 8
SIZES = {"1 batch": 1, "100 batches": 100}


def session_reader(imap: ModuleType) -> Callable[[bytes], tuple[int, int]]:
    """What the server does with one chunk; returns (commands, fetch items) as a check."""
    reader_class = imap.CommandReader
    parse_sequence_set, parse_fetch_items = imap.parse_sequence_set, imap.parse_fetch_items

    def run(chunk: bytes) -> tuple[int, int]:
        reader = reader_class()
        reader.feed(chunk)
        commands = items = 0
        while (item := reader.next()) is not None:
            if item.name in (b"FETCH", b"UID FETCH"):
                parse_sequence_set(item.args[0])
                items += len(parse_fetch_items(item.args[1:]))
            commands += 1
        return commands, items

    return run


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("impl", IMPLS)
def test_command_batch(benchmark: BenchmarkFixture, impl: str, size: str) -> None:
    imap = load_impl("imap", impl)
    chunk = BATCH * SIZES[size]
    benchmark.group = f"imap {size}"
    benchmark.extra_info["bytes"] = len(chunk)
    benchmark.extra_info["items"] = COMMANDS * SIZES[size]
    result = benchmark(session_reader(imap), chunk)
    assert result == (COMMANDS * SIZES[size], 11 * SIZES[size])


# --- the FETCH writers: a run of 2,048 messages, as the session's fast paths call them --------

RUN = 2048


@pytest.mark.parametrize("impl", IMPLS)
def test_fetch_flags_lines(benchmark: BenchmarkFixture, impl: str) -> None:
    """``FETCH 1:* (UID FLAGS RFC822.SIZE MODSEQ)``: one call per run of messages."""
    from array import array

    imap = load_impl("imap", impl)
    uids = array("I", range(100_001, 100_001 + RUN))
    sizes = array("Q", (1000 + 37 * k for k in range(RUN)))
    modseqs = array("Q", (5_000 + k for k in range(RUN)))
    flags = [(b"(\\Seen)", b"()", b"(\\Seen \\Flagged $Work)")[k % 3] for k in range(RUN)]
    benchmark.group = "imap fetch writers"
    benchmark.extra_info["items"] = RUN
    lines = benchmark(imap.fetch_flags_lines, 1, uids, flags, sizes, modseqs)
    assert lines.count(b"\r\n") == RUN


@pytest.mark.parametrize("impl", IMPLS)
def test_fetch_item_lines(benchmark: BenchmarkFixture, impl: str) -> None:
    """``FETCH 1:* (BODYSTRUCTURE)`` from kept renderings: one call per run of messages."""
    imap = load_impl("imap", impl)
    part = (
        b'BODYSTRUCTURE ("TEXT" "PLAIN" ("CHARSET" "us-ascii") NIL NIL "7BIT" 1234 30 '
        b"NIL NIL NIL NIL)"
    )
    parts = [part] * RUN
    benchmark.group = "imap fetch writers"
    benchmark.extra_info["items"] = RUN
    lines = benchmark(imap.fetch_item_lines, 1, parts)
    assert lines.count(b"\r\n") == RUN
