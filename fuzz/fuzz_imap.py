"""Fuzz the IMAP command tokenizer: CommandReader on fragmented input, then parse_sequence_set
and parse_fetch_items on what it returns, quote and the FETCH writers (fetch_flags_line,
fetch_flags_lines, fetch_item_lines), compiled kernel against its pure twin.

Invariants: no exception but ValueError from the parsers; the same commands and events from
both twins, however the stream is cut; ``pending < max(max_line, max_literal)`` whenever
``next()`` returned None (bounded memory); whatever ``quote`` writes reads back as the string.
"""

from __future__ import annotations

import sys
from array import array

import atheris
from _common import agree, as_buffer, fragments, load_twins, main, option, outcome

COMPILED, PURE = load_twins("imap")
#: small limits reach the too-long paths with short inputs; 8192 is the server's default
MAX_LINES = [8192, 1, 4, 16, 64, 8192]
MAX_LITERALS = [1 << 20, 0, 3, 64]


def read_items(reader: object, data: bytes, lines: int = 0) -> list[object]:
    """Every item; ``lines`` bit k set: the k-th call (mod 8) is next_line(), as a session in
    IDLE or AUTHENTICATE calls it (a RuntimeError mid-command is recorded, then next())."""
    items: list[object] = []
    step = 0
    while True:
        item = None
        if lines >> (step % 8) & 1:
            try:
                item = reader.next_line()  # type: ignore[attr-defined]
            except RuntimeError:
                items.append("RuntimeError")
                item = reader.next()  # type: ignore[attr-defined]
        else:
            item = reader.next()  # type: ignore[attr-defined]
        step += 1
        if item is None:
            bound = max(reader.max_line, reader.max_literal)  # type: ignore[attr-defined]
            assert reader.pending < bound, (reader.pending, data)  # type: ignore[attr-defined]
            return items
        items.append(item)


def check_command(item: object, data: bytes) -> None:
    """The parsers a FETCH or STORE runs on the arguments, in both twins."""
    args = getattr(item, "args", None)
    if not args:
        return
    first = args[0]
    if type(first) is bytes:
        got = outcome(lambda: COMPILED.parse_sequence_set(first), (ValueError,))
        agree(
            "parse_sequence_set",
            got,
            outcome(lambda: PURE.parse_sequence_set(first), (ValueError,)),
            data,
        )
    rest = args[1:]
    got = outcome(lambda: COMPILED.parse_fetch_items(rest), (ValueError,))
    agree(
        "parse_fetch_items", got, outcome(lambda: PURE.parse_fetch_items(rest), (ValueError,)), data
    )


def test_one_input(data: bytes) -> None:
    # Input: 2 option bytes (max_line and buffer type; max_literal and the next_line() calls),
    # 24 bytes of split points, the stream.
    max_line = MAX_LINES[option(data, 0) % len(MAX_LINES)]
    kind = option(data, 0) // len(MAX_LINES) % 3
    max_literal = MAX_LITERALS[option(data, 1) % len(MAX_LITERALS)]
    lines = option(data, 1) // len(MAX_LITERALS)  # which reads are next_line()
    cut = atheris.FuzzedDataProvider(data[2:26])
    stream = data[26:]
    compiled = COMPILED.CommandReader(max_line, max_literal)
    pure = PURE.CommandReader(max_line, max_literal)
    for piece in fragments(cut, stream):
        compiled.feed(as_buffer(piece, kind))
        pure.feed(piece)
        got = read_items(compiled, data, lines)
        agree("items", got, read_items(pure, data, lines), data)
        for item in got:
            check_command(item, data)
    # The writer: what it writes, a reader reads back as the same string.
    head = stream[:64]
    written = COMPILED.quote(head)
    agree("quote", written, PURE.quote(head), data)
    reader = COMPILED.CommandReader(8192, 1 << 20)
    reader.feed(b"t X " + written + b"\r\n")
    items = [i for i in read_items(reader, data) if type(i) is not COMPILED.Continuation]
    agree("quote read back", items, [COMPILED.Command(b"t", b"X", [COMPILED.String(head)])], data)
    # The FETCH fast-path writer: both twins write the same line, or refuse the same numbers.
    numbers = [int.from_bytes(stream[i : i + 8], "big") >> (option(data, 0) % 8) for i in (0, 8)]
    args = (numbers[0], numbers[1], head[:16], len(stream), head[16:40] or None, numbers[0] % 3)
    agree(
        "fetch_flags_line",
        outcome(lambda: COMPILED.fetch_flags_line(*args), (ValueError,)),
        outcome(lambda: PURE.fetch_flags_line(*args), (ValueError,)),
        data,
    )
    # The run writer: columns cut from the stream (a short flags list or sizes column makes
    # the lengths differ); both twins write the same lines or refuse alike.
    count = len(head) // 8
    uids = array("I", (int.from_bytes(head[i * 4 : i * 4 + 4], "big") for i in range(count)))
    sizes = array("Q", (int.from_bytes(stream[i * 8 : i * 8 + 8], "big") for i in range(count)))
    modseqs = array("Q", reversed(sizes)) if numbers[1] % 3 else None
    flags = [head[i : i + numbers[1] % 9] for i in range(count - (numbers[0] % 7 == 0))]
    run = (numbers[0], uids, flags, sizes, modseqs)
    agree(
        "fetch_flags_lines",
        outcome(lambda: COMPILED.fetch_flags_lines(*run), (ValueError,)),
        outcome(lambda: PURE.fetch_flags_lines(*run), (ValueError,)),
        data,
    )
    parts = [head[i : i + 5] for i in range(0, len(head), 5)]
    agree(
        "fetch_item_lines",
        outcome(lambda: COMPILED.fetch_item_lines(numbers[1], parts), (ValueError,)),
        outcome(lambda: PURE.fetch_item_lines(numbers[1], parts), (ValueError,)),
        data,
    )
    # The sequence-set parser also sees raw text no tokenizer would hand it.
    got = outcome(lambda: COMPILED.parse_sequence_set(head), (ValueError,))
    agree(
        "parse_sequence_set raw",
        got,
        outcome(lambda: PURE.parse_sequence_set(head), (ValueError,)),
        data,
    )


if __name__ == "__main__":
    main(test_one_input)
    sys.exit(0)
