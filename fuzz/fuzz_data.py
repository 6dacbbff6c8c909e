"""Fuzz the DATA / BDAT kernel and dot_stuff, compiled kernel against its pure twin.

DataReader and BdatReader get the same fragmented input; after every feed the consumed count
and every attribute must be equal in both.  Invariants besides: nothing but the documented
ValueError / RuntimeError; stored content never exceeds ``max_size`` (an oversize message is
flagged and ``content()`` is empty); ``dot_stuff`` output followed by ``.\\r\\n`` reads back
through DataReader as the CRLF-normalised message (round trip).
"""

from __future__ import annotations

import re
import sys
from functools import partial
from typing import Any

import atheris
from _common import agree, as_buffer, fragments, load_twins, main, option, outcome

COMPILED, PURE = load_twins("data")
NEWLINE = re.compile(rb"\r\n|\r|\n")
MAX_SIZES = [0, 1, 2, 7, 64, 1000]


def attributes(reader: Any, bdat: bool) -> dict[str, Any]:
    values = {
        "done": reader.done,
        "content": reader.content(),
        "size": reader.size,
        "max_line": reader.max_line,
        "bare_cr": reader.bare_cr,
        "bare_lf": reader.bare_lf,
        "oversize": reader.oversize,
    }
    if bdat:
        values["chunk_done"] = reader.chunk_done
    return values


def check_bounded(values: dict[str, Any], max_size: int, store: bool, data: bytes) -> None:
    content = values["content"]
    if values["oversize"] or not store:
        assert content == b"", (values, data)
    if max_size:
        assert len(content) <= max_size, (len(content), max_size, data)
        assert values["oversize"] == (values["size"] > max_size), (values, max_size, data)


def compare(compiled: Any, pure: Any, bdat: bool, max_size: int, store: bool, data: bytes) -> None:
    got = attributes(compiled, bdat)
    agree("attributes", got, attributes(pure, bdat), data)
    check_bounded(got, max_size, store, data)


def fuzz_data(cuts: bytes, body: bytes, max_size: int, store: bool, kind: int, data: bytes) -> None:
    compiled, pure = COMPILED.DataReader(max_size, store), PURE.DataReader(max_size, store)
    cut = atheris.FuzzedDataProvider(cuts)
    for piece in fragments(cut, body):
        used = compiled.feed(as_buffer(piece, kind))
        agree("DataReader.feed", used, pure.feed(piece), data)
        compare(compiled, pure, False, max_size, store, data)


def fuzz_bdat(
    fdp: atheris.FuzzedDataProvider, max_size: int, store: bool, kind: int, data: bytes
) -> None:
    allowed = (ValueError, RuntimeError)
    compiled, pure = COMPILED.BdatReader(max_size, store), PURE.BdatReader(max_size, store)
    while fdp.remaining_bytes():
        count = fdp.ConsumeIntInRange(-1, 300)
        last = fdp.ConsumeBool()
        started = outcome(partial(compiled.start_chunk, count, last), allowed)
        agree(
            "start_chunk", started, outcome(partial(pure.start_chunk, count, last), allowed), data
        )
        chunk = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 400))
        cut = atheris.FuzzedDataProvider(chunk[:8])
        for piece in fragments(cut, chunk, 4):
            used = compiled.feed(as_buffer(piece, kind))
            agree("BdatReader.feed", used, pure.feed(piece), data)
            compare(compiled, pure, True, max_size, store, data)


def fuzz_dot_stuff(message: bytes, data: bytes) -> None:
    stuffed = COMPILED.dot_stuff(message)
    agree("dot_stuff", stuffed, PURE.dot_stuff(message), data)
    for kind in (1, 2):
        agree(
            f"dot_stuff(kind {kind})", COMPILED.dot_stuff(as_buffer(message, kind)), stuffed, data
        )
        agree(
            f"pure dot_stuff(kind {kind})", PURE.dot_stuff(as_buffer(message, kind)), stuffed, data
        )
    normal = NEWLINE.sub(b"\r\n", message)
    if normal and not normal.endswith(b"\r\n"):
        normal += b"\r\n"
    for impl in (COMPILED, PURE):
        reader = impl.DataReader()
        wire = stuffed + b".\r\n"
        assert reader.feed(wire) == len(wire), (impl.__name__, data)
        assert reader.done and not reader.bare_cr and not reader.bare_lf, (impl.__name__, data)
        agree(f"round trip ({impl.__name__})", reader.content(), normal, data)


def test_one_input(data: bytes) -> None:
    # Input: 3 option bytes (mode, max_size, store), then per mode: DATA 24 bytes of split
    # points and the body; BDAT chunk sizes, flags and contents; dot_stuff the message.
    mode = option(data, 0) % 3
    max_size = MAX_SIZES[option(data, 1) % len(MAX_SIZES)]
    store = option(data, 2) != 0xFF
    kind = option(data, 1) // len(MAX_SIZES) % 3  # bytes, bytearray or memoryview
    if mode == 0:
        fuzz_data(data[3:27], data[27:], max_size, store, kind, data)
    elif mode == 1:
        fuzz_bdat(atheris.FuzzedDataProvider(data[3:]), max_size, store, kind, data)
    else:
        fuzz_dot_stuff(data[3:], data)


if __name__ == "__main__":
    main(test_one_input)
    sys.exit(0)
