"""BINARY APPEND's conversion (tachymail.imap.binary): binary parts become base64 at APPEND,
the rest of the message is kept byte for byte, and the stored message's summary describes
the converted parts (what BODY[n], BODY[n.MIME] and BODYSTRUCTURE are served from)."""

from __future__ import annotations

import base64

from hypothesis import given, settings
from hypothesis import strategies as st

from tachymail.imap.binary import encode_binary_parts
from tachymail.mailbox.summary import build_summary

OCTETS = b"\x00-\xe4\n\r\n\n"


def leaves(content: bytes) -> list[tuple[str, bytes]]:
    """(encoding, decoded body) of each leaf part of the stored message."""
    found = []
    stack = [build_summary(content)["body"]]
    while stack:
        part = stack.pop(0)
        if part.get("parts"):
            stack[:0] = part["parts"]
            continue
        body = content[part["body_start"] : part["end"]]
        encoding = part["encoding"]
        found.append((encoding, base64.b64decode(body) if encoding == "base64" else body))
    return found


def test_single_part_binary_body_becomes_base64() -> None:
    # imaptest append-binary: the body holds a NUL, an 8-bit octet and bare line feeds
    message = (
        b"From: user@domain.org\r\nMime-Version: 1.0\r\n"
        b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: binary\r\n\r\n"
        + OCTETS
    )
    stored = encode_binary_parts(message)
    assert b"\x00" not in stored
    assert stored.startswith(b"From: user@domain.org\r\nMime-Version: 1.0\r\n")
    assert b"Content-Transfer-Encoding: base64\r\n\r\n" in stored
    assert b"binary" not in stored.lower()
    assert leaves(stored) == [("base64", OCTETS)]


def test_only_binary_parts_of_a_multipart_change() -> None:
    message = (
        b"From: a@b\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\npreamble\r\n"
        b"--b\r\nContent-Type: text/plain\r\n\r\nplain text\r\n"
        b"--b\r\nContent-Type: image/png\r\nContent-Transfer-Encoding:\r\n  Binary\r\n\r\n"
        + OCTETS
        + b"\r\n--b\r\n\r\nno\x00fields\r\n--b--\r\n"
    )
    stored = encode_binary_parts(message)
    assert b"\x00" not in stored
    assert stored.startswith(message[: message.index(b"--b\r\nContent-Type: image/png")])
    assert stored.endswith(b"\r\n--b--\r\n")
    assert leaves(stored) == [
        ("7bit", b"plain text"),
        ("base64", OCTETS),
        ("base64", b"no\x00fields"),
    ]


def test_messages_without_binary_parts_are_kept_as_they_are() -> None:
    message = b"From: a@b\r\nContent-Transfer-Encoding: 8bit\r\n\r\nGr\xc3\xbc\xc3\x9fe\r\n"
    assert encode_binary_parts(message) is message
    mentioned = b"From: a@b\r\nSubject: binary\r\n\r\nnothing binary here\r\n"
    assert encode_binary_parts(mentioned) == mentioned


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400), st.sampled_from([b"binary", b"base64", b"7bit"]))
def test_any_content_is_served_best_effort(body: bytes, encoding: bytes) -> None:
    message = b"Content-Type: multipart/mixed; boundary=x\r\n\r\n--x\r\n"
    message += b"Content-Transfer-Encoding: " + encoding + b"\r\n\r\n" + body + b"\r\n--x--\r\n"
    stored = encode_binary_parts(message)
    assert isinstance(stored, bytes)
    if encoding == b"binary" and b"\r\n--x" not in body and b"\n--x" not in body:
        assert b"\x00" not in stored
