"""The POP3 wire format without sockets: command splitting, replies, and the pieces RETR
and TOP write, checked against a whole-message reference for every way of cutting."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tachymail.pop3.commands import (
    MessageStream,
    err,
    multiline,
    ok,
    parse_number,
    uidl,
    whole_message,
)


def stream_out(message: bytes, body_lines: int = -1, chunk: int = 64 * 1024) -> bytes:
    """What a session writes for *message*: every piece, then the end of the reply."""
    stream = MessageStream(len(message), body_lines, chunk)
    out = []
    while not stream.done:
        offset, length = stream.want()
        assert 0 < length <= chunk
        out.append(stream.take(message[offset : offset + length]))
    out.append(stream.finish())
    wire = b"".join(out)
    assert stream.sent == len(wire) - len(stream.finish())
    return wire


def reference(message: bytes, body_lines: int = -1) -> bytes:
    """RFC 1939 by the book, one whole message at a time."""
    lines = message.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    if body_lines >= 0:
        kept: list[bytes] = []
        for i, line in enumerate(lines):
            kept.append(line)
            if line == b"":
                kept += lines[i + 1 : i + 1 + body_lines]
                break
        lines = kept
    return b"".join(
        (b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines
    ) + (b".\r\n")


def test_numbers_are_plain_decimal() -> None:
    assert parse_number(b"12") == 12
    assert parse_number(b"0") == 0
    for bad in (b"", b"-1", b"+1", b"1 ", b"0x1", b"1234567890", b"\xd9\xa3"):
        assert parse_number(bad) is None


def test_replies() -> None:
    assert ok() == b"+OK\r\n"
    assert err("Maildrop locked", "IN-USE") == b"-ERR [IN-USE] Maildrop locked\r\n"
    assert len(err("x" * 1000)) <= 512
    assert multiline("2 messages", ["1 10", ".hidden"]) == (
        b"+OK 2 messages\r\n1 10\r\n..hidden\r\n.\r\n"
    )
    assert uidl(1700000000, 42) == "1700000000.42"


@pytest.mark.parametrize(
    "message",
    [
        b"",
        b"Subject: x\r\n\r\nbody\r\n",
        b"Subject: x\r\n\r\n.\r\n..\r\n.leading\r\n",
        b"Subject: x\r\n\r\nno final newline",
        b".starts with a dot\r\n",
        b"Subject: x\r\n\r\n" + b"long line " * 20000 + b"\r\n.after\r\n",
        b"bare\nnewlines\r\n.dot\n",
    ],
)
def test_retr_matches_reference(message: bytes) -> None:
    for chunk in (2, 3, 7, 64, 64 * 1024):
        assert stream_out(message, chunk=chunk) == reference(message)
    # The session's shortcut for a message that fits one piece writes the same octets.
    assert whole_message(message) == reference(message)


def test_top_stops_after_the_body_lines() -> None:
    message = b"A: 1\r\nB: 2\r\n\r\none\r\n.two\r\nthree\r\n"
    assert stream_out(message, 0) == b"A: 1\r\nB: 2\r\n\r\n.\r\n"
    assert stream_out(message, 2) == b"A: 1\r\nB: 2\r\n\r\none\r\n..two\r\n.\r\n"
    assert stream_out(message, 99) == reference(message)
    assert stream_out(b"A: 1\r\nB: 2\r\n", 5) == b"A: 1\r\nB: 2\r\n.\r\n"  # no body at all


_lines = st.lists(
    st.one_of(
        st.sampled_from([b"", b".", b"..", b".x", b"Subject: hi", b"\xe9t\xe9 8-bit"]),
        st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
    ),
    max_size=30,
)


@settings(max_examples=300, deadline=None)
@given(
    lines=_lines,
    ending=st.sampled_from([b"\r\n", b""]),
    chunk=st.integers(2, 50),
    top=st.integers(-1, 5),
)
def test_any_message_any_cut(lines: list[bytes], ending: bytes, chunk: int, top: int) -> None:
    message = b"\r\n".join(lines) + (ending if lines else b"")
    assert stream_out(message, top, chunk) == reference(message, top)
    if top < 0:
        assert whole_message(message) == reference(message)


def test_pop3_settings_are_validated() -> None:
    from tachymail.config import ConfigError, from_dict

    with pytest.raises(ConfigError) as caught:
        from_dict({"pop3": {"max_command_line": 100, "idle_timeout": 60.0}})
    text = str(caught.value)
    assert "pop3.max_command_line: between 255 (RFC 2449 §4) and 8192" in text
    assert "pop3.idle_timeout: RFC 1939 §3 requires at least 600 seconds" in text
    assert from_dict({"pop3": {"max_command_line": 1000}}).pop3.max_command_line == 1000
