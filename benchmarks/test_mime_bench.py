"""MIME structure scanner: compiled kernel and pure-Python twin side by side.

Each message is a multipart/mixed with a multipart/alternative (UTF-8 8-bit text and HTML) and
a base64 attachment sized so that the whole message is 1 KiB, 64 KiB or 10 MiB.
"""

from __future__ import annotations

import base64
from typing import Any

import pytest

from kernels import IMPLS, load_impl

SIZES = {"1KiB": 1 << 10, "64KiB": 64 << 10, "10MiB": 10 << 20}


def build_message(total: int) -> bytes:
    """A realistic message of (about) *total* bytes, CRLF line breaks."""
    text = "Grüße aus Köln: the plain text part, with some 8-bit UTF-8.\r\n".encode() * 3
    head = (
        b"From: sender@example.org\r\nTo: rcpt@example.net\r\nSubject: benchmark\r\n"
        b"MIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="==outer=="\r\n'
        b"\r\nThis is a multi-part message in MIME format.\r\n"
        b"--==outer==\r\nContent-Type: multipart/alternative; boundary=inner\r\n\r\n"
        b"--inner\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n\r\n" + text + b"\r\n"
        b"--inner\r\nContent-Type: text/html; charset=us-ascii\r\n\r\n"
        b"<html><body><p>The HTML alternative.</p></body></html>\r\n"
        b"--inner--\r\n\r\n"
        b'--==outer==\r\nContent-Type: application/octet-stream; name="data.bin"\r\n'
        b'Content-Transfer-Encoding: base64\r\nContent-Disposition: attachment; filename="data.bin"'
        b"\r\n\r\n"
    )
    tail = b"\r\n--==outer==--\r\n"
    room = max(total - len(head) - len(tail), 80)
    data = bytes(range(256)) * (room * 3 // 4 // 256 + 2)  # a little more than fits
    encoded = base64.encodebytes(data).replace(b"\n", b"\r\n")
    attachment = encoded[: encoded.rfind(b"\r\n", 0, room)]
    return head + attachment + tail


@pytest.mark.parametrize("label", list(SIZES))
@pytest.mark.parametrize("impl", IMPLS)
def test_scan(benchmark: Any, impl: str, label: str) -> None:
    mime = load_impl("mime", impl)
    message = build_message(SIZES[label])
    benchmark.group = f"mime {label}"
    benchmark.extra_info["bytes"] = len(message)
    tree = benchmark(mime.scan, message)
    alternative, attachment = tree.children
    assert [p.has_8bit for p in alternative.children] == [True, False]
    assert attachment.transfer_encoding == "base64" and not attachment.has_8bit
    assert attachment.end == len(message) - len(b"\r\n--==outer==--\r\n")
