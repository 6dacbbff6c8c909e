"""Fuzz the MIME kernel: scan, header_value, content_type_params, canonical_body (DKIM body
canonicalization), header_fields and relaxed_header_value (DKIM's header reading), and the
DKIM signature helpers (dkim_tag_list, dkim_plain_base64, dkim_empty_b, dkim_signed_fields,
dkim_plain_signature, dkim_header_input), blank_line (the header's end) and header_block
(the header read once) on arbitrary bytes, compiled kernel against its pure twin.

Invariants: nothing raises; every part's offsets are ordered and inside its parent's range,
depths grow by one and stay within ``max_depth``; some part has ``has_8bit`` exactly when the
message holds an octet >= 0x80; compiled == twin (the whole tree).  A loop would show as a
libFuzzer timeout (``-timeout``).
"""

from __future__ import annotations

import sys
from typing import Any

from _common import agree, load_twins, main, option

COMPILED, PURE = load_twins("mime")
DEPTHS = [32, 0, 1, 2, 3]
NAMES = [b"Content-Type", b"content-transfer-encoding", b"Date", b"Message-ID", b"From", b"X"]


def flatten(root: Any, message: bytes, max_depth: int) -> list[tuple[Any, ...]]:
    """The tree as a list of tuples, checking the structural invariants on the way."""
    nodes = []
    stack = [(root, None)]
    while stack:
        part, parent = stack.pop()
        assert 0 <= part.start <= part.body_start <= part.end <= len(message), part
        assert part.depth <= max_depth, (part.depth, max_depth)
        if parent is None:
            assert part.depth == 0 and part.start == 0, part
        else:
            assert part.depth == parent.depth + 1, (part, parent)
            assert parent.start <= part.start and part.end <= parent.end, (part, parent)
        assert part.header_bytes(message) == message[part.start : part.body_start]
        assert part.body_bytes(message) == message[part.body_start : part.end]
        nodes.append(
            (
                part.start,
                part.body_start,
                part.end,
                part.content_type,
                part.charset,
                part.boundary,
                part.transfer_encoding,
                part.has_8bit,
                part.depth,
                len(part.children),
                list(part.defects),
            )
        )
        stack.extend((child, part) for child in reversed(part.children))
    return nodes


def test_one_input(data: bytes) -> None:
    # Input: 2 option bytes (max_depth, header name), then the message.
    max_depth = DEPTHS[option(data, 0) % len(DEPTHS)]
    name = NAMES[option(data, 1) % len(NAMES)]
    message = data[2:]
    got = flatten(COMPILED.scan(message, max_depth), message, max_depth)
    agree("scan", got, flatten(PURE.scan(message, max_depth), message, max_depth), data)
    view = memoryview(b"<" + message + b">")[1:-1]
    agree(
        "scan(memoryview)",
        flatten(COMPILED.scan(view, max_depth), message, max_depth),
        got,
        data,
    )
    agree(
        "scan(bytearray)",
        flatten(COMPILED.scan(bytearray(message), max_depth), message, max_depth),
        got,
        data,
    )
    eight_bit = any(byte >= 0x80 for byte in message)
    assert any(node[7] for node in got) == eight_bit, ("has_8bit", got, data)
    value = COMPILED.header_value(message, name)
    agree("header_value", value, PURE.header_value(message, name), data)
    for text in (message, value or b""):
        agree(
            "content_type_params",
            COMPILED.content_type_params(text),
            PURE.content_type_params(text),
            data,
        )
    for relaxed in (False, True):
        canonical = COMPILED.canonical_body(message, relaxed)
        agree("canonical_body", canonical, PURE.canonical_body(message, relaxed), data)
        assert canonical.endswith(b"\r\n") or (relaxed and canonical == b""), canonical
        assert not canonical.endswith(b"\r\n\r\n"), canonical
    fields = COMPILED.header_fields(message)
    agree("header_fields", fields, PURE.header_fields(message), data)
    if fields is not None:
        # the fields are the block again: each name, its colon, its value less the CRLF added
        assert b"\r\n".join(n + b":" + v[:-2] for n, v in fields) == message, fields
    relaxed_value = COMPILED.relaxed_header_value(message)
    agree("relaxed_header_value", relaxed_value, PURE.relaxed_header_value(message), data)
    assert relaxed_value.endswith(b"\r\n") and b"\n" not in relaxed_value[:-1], relaxed_value
    agree("dkim_tag_list", COMPILED.dkim_tag_list(message), PURE.dkim_tag_list(message), data)
    agree(
        "dkim_plain_base64",
        COMPILED.dkim_plain_base64(message),
        PURE.dkim_plain_base64(message),
        data,
    )
    emptied = COMPILED.dkim_empty_b(message)
    agree("dkim_empty_b", emptied, PURE.dkim_empty_b(message), data)
    assert len(emptied) <= len(message), emptied
    for latest in (0, 1_800_000_000, 1e30):
        agree(
            "dkim_plain_signature",
            COMPILED.dkim_plain_signature(message, latest),
            PURE.dkim_plain_signature(message, latest),
            data,
        )
    blank = COMPILED.blank_line(message)
    agree("blank_line", blank, PURE.blank_line(message), data)
    agree("header_block", COMPILED.header_block(message), PURE.header_block(message), data)
    if blank is not None:
        start, end = blank
        assert message[start:end] in (b"\n", b"\r\n", b"\n\n", b"\n\r\n"), blank
    if fields is not None:
        lower = [name.lower() for name, _value in fields]
        # the names signed: those of the block's fields, backwards, a name twice and one absent
        names = (*lower[::-1], *lower[:1], b"x-absent", b"from")
        for relaxed in (False, True):
            agree(
                "dkim_signed_fields",
                COMPILED.dkim_signed_fields(fields, lower, names, relaxed),
                PURE.dkim_signed_fields(fields, lower, names, relaxed),
                data,
            )
            for field in fields[:2]:  # a field of the block as the signature's own
                agree(
                    "dkim_header_input",
                    COMPILED.dkim_header_input(fields, lower, names, relaxed, field),
                    PURE.dkim_header_input(fields, lower, names, relaxed, field),
                    data,
                )


if __name__ == "__main__":
    main(test_one_input)
    sys.exit(0)
