"""8BITMIME downgrade: the result is 7-bit, parses with Python's email package, and every
part decodes to the bytes it held; impossible conversions return None. Run over both MIME
scanner implementations (compiled and pure-Python twin)."""

from __future__ import annotations

import binascii
import email
import email.message
import re
from email import policy
from types import ModuleType

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kernels import IMPLS, load_impl
from tachymail.delivery import eightbit
from tachymail.delivery.eightbit import downgrade, needs_8bit, qp_encode

HYPOTHESIS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

UTF8_TEXT = "Grüße aus Köln — naïve café, 東京\r\n".encode()


@pytest.fixture(params=IMPLS, autouse=True)
def scanner(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """Every test runs once with the compiled scanner and once with its twin."""
    module: ModuleType = load_impl("mime", request.param)
    monkeypatch.setattr(eightbit, "scan", module.scan)
    return module


def parse(raw: bytes) -> email.message.EmailMessage:
    message = email.message_from_bytes(raw, policy=policy.default)
    assert isinstance(message, email.message.EmailMessage)
    return message


def leaves(raw: bytes) -> list[tuple[str, bytes]]:
    """(content type, decoded body) of every leaf part, in order, as a mail reader sees them."""
    out = []
    for part in parse(raw).walk():
        if part.is_multipart() or part.get_content_type() == "message/rfc822":
            continue
        payload = part.get_payload(decode=True)
        assert isinstance(payload, bytes)
        out.append((part.get_content_type(), payload))
    return out


def check_7bit(raw: bytes) -> None:
    """What a 7-bit peer needs: ASCII, CRLF line ends only, no line over 998 octets."""
    assert raw.isascii()
    crlf = raw.count(b"\r\n")
    assert raw.count(b"\n") == crlf and raw.count(b"\r") == crlf, "bare CR or LF"
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998


def check_qp_lines(raw: bytes, body: bytes) -> None:
    """The quoted-printable *body* inside *raw*: no line over 76 characters."""
    assert body in raw
    assert all(len(line) <= 76 for line in body.split(b"\r\n"))


def test_needs_8bit() -> None:
    assert needs_8bit(b"Subject: x\r\n\r\n\x80\r\n")
    assert needs_8bit(UTF8_TEXT)
    assert not needs_8bit(b"Subject: x\r\n\r\nplain\r\n")
    assert not needs_8bit(b"")


def test_7bit_message_is_returned_unchanged() -> None:
    raw = b"From: a@example.com\r\nSubject: hi\r\n\r\nplain ascii\r\n"
    assert downgrade(raw) is raw


def test_single_part_8bit_body_becomes_quoted_printable() -> None:
    body = UTF8_TEXT * 3 + b"trailing space kept \r\n"
    raw = (
        b"From: a@example.com\r\nTo: b@example.net\r\nSubject: hi\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n"
        b"\r\n" + body
    )
    out = downgrade(raw)
    assert out is not None
    check_7bit(out)
    message = parse(out)
    assert message.get_all("Content-Transfer-Encoding") == ["quoted-printable"]
    assert message["Subject"] == "hi" and message["To"] == "b@example.net"
    assert message.get_payload(decode=True) == body
    assert message.get_content() == body.decode()
    head, _, encoded = out.partition(b"\r\n\r\n")
    check_qp_lines(out, encoded)
    assert binascii.a2b_qp(encoded) == body
    # The other header fields are untouched, in order.
    assert head.startswith(b"From: a@example.com\r\nTo: b@example.net\r\nSubject: hi\r\n")


def test_missing_transfer_encoding_and_mime_version_are_added() -> None:
    raw = b"From: a@example.com\r\nSubject: mislabelled\r\n\r\n" + UTF8_TEXT
    out = downgrade(raw)
    assert out is not None
    check_7bit(out)
    message = parse(out)
    assert message["MIME-Version"] == "1.0"
    assert message["Content-Transfer-Encoding"] == "quoted-printable"
    assert message.get_payload(decode=True) == UTF8_TEXT


def test_8bit_label_with_7bit_body_is_left_alone() -> None:
    raw = (
        b"Subject: x\r\nContent-Transfer-Encoding: 8bit\r\n\r\nascii\r\n"
        b"--no\r\n"  # an 8-bit byte elsewhere would force a conversion; here there is none
    )
    assert downgrade(raw) is raw


def test_long_8bit_line_is_wrapped_with_soft_breaks() -> None:
    body = ("é" * 3000 + "\r\n").encode()
    raw = b"Content-Type: text/plain; charset=utf-8\r\nMIME-Version: 1.0\r\n\r\n" + body
    out = downgrade(raw)
    assert out is not None
    check_7bit(out)
    encoded = out.partition(b"\r\n\r\n")[2]
    check_qp_lines(out, encoded)
    assert parse(out).get_payload(decode=True) == body


def test_binary_like_body_round_trips_exactly() -> None:
    # Bare LF, bare CR and NUL: encoded as data, so decoding gives the very same bytes.
    body = b"\xff\xfe\x00 line\nbare\rcr\r\nend \xe9"
    raw = b"MIME-Version: 1.0\r\nContent-Type: application/octet-stream\r\n\r\n" + body
    out = downgrade(raw)
    assert out is not None
    check_7bit(out)
    assert parse(out).get_payload(decode=True) == body


MULTIPART = (
    b"From: a@example.com\r\n"
    b"Subject: parts\r\n"
    b"MIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed; boundary="outer"\r\n'
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"\r\n"
    b"This is a multi-part message.\r\n"
    b"--outer\r\n"
    b"Content-Type: text/plain; charset=us-ascii\r\n"
    b"\r\n"
    b"The 7-bit part stays byte for byte.\r\n"
    b"--outer\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"Content-Disposition: inline\r\n"
    b"\r\n" + UTF8_TEXT + b"--outer\r\n"
    b"Content-Type: application/octet-stream\r\n"
    b"Content-Transfer-Encoding: base64\r\n"
    b"\r\n"
    b"AAECAwQF\r\n"
    b"--outer--\r\n"
    b"epilogue\r\n"
)


def test_multipart_converts_only_the_8bit_part() -> None:
    out = downgrade(MULTIPART)
    assert out is not None
    check_7bit(out)
    assert leaves(out) == leaves(MULTIPART)
    assert leaves(out)[1] == ("text/plain", UTF8_TEXT.removesuffix(b"\r\n"))
    # The 7-bit and base64 parts, the preamble and epilogue are copied unchanged.
    for unchanged in (
        b"This is a multi-part message.\r\n--outer\r\nContent-Type: text/plain; charset=us-ascii"
        b"\r\n\r\nThe 7-bit part stays byte for byte.\r\n--outer\r\n",
        b"--outer\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64"
        b"\r\n\r\nAAECAwQF\r\n--outer--\r\nepilogue\r\n",
    ):
        assert unchanged in out
    parts = parse(out).get_payload()
    assert isinstance(parts, list)
    assert parts[1]["Content-Transfer-Encoding"] == "quoted-printable"
    assert parts[1]["Content-Disposition"] == "inline"
    # The multipart said "8bit"; its content is 7-bit now.
    assert parse(out)["Content-Transfer-Encoding"] == "7bit"


def test_nested_multiparts() -> None:
    html = "<p>Grüße</p>\r\n".encode()
    raw = (
        b"MIME-Version: 1.0\r\n"
        b"Content-Type: multipart/mixed; boundary=a\r\n"
        b"\r\n"
        b"--a\r\n"
        b"Content-Type: multipart/alternative; boundary=b\r\n"
        b"\r\n"
        b"--b\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n"
        b"\r\n" + UTF8_TEXT + b"--b\r\n"
        b"Content-Type: multipart/related; boundary=c\r\n"
        b"\r\n"
        b"--c\r\n"
        b"Content-Type: text/html; charset=utf-8\r\n"
        b"\r\n" + html + b"--c--\r\n"
        b"--b--\r\n"
        b"--a\r\n"
        b"Content-Type: text/plain\r\n"
        b"\r\n"
        b"attachment\r\n"
        b"--a--\r\n"
    )
    out = downgrade(raw)
    assert out is not None
    check_7bit(out)
    assert leaves(out) == leaves(raw)
    assert [body for _, body in leaves(out)] == [
        UTF8_TEXT.removesuffix(b"\r\n"),
        html.removesuffix(b"\r\n"),
        b"attachment",
    ]


def test_message_rfc822_with_8bit_body() -> None:
    inner = b"From: c@example.org\r\nSubject: inner\r\n\r\n" + UTF8_TEXT
    raw = (
        b"MIME-Version: 1.0\r\n"
        b"Content-Type: multipart/mixed; boundary=z\r\n"
        b"\r\n"
        b"--z\r\n"
        b"Content-Type: text/plain\r\n"
        b"\r\n"
        b"see attached\r\n"
        b"--z\r\n"
        b"Content-Type: message/rfc822\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n"
        b"\r\n" + inner + b"--z--\r\n"
    )
    out = downgrade(raw)
    assert out is not None
    check_7bit(out)
    parts = parse(out).get_payload()
    assert isinstance(parts, list)
    attached = parts[1]
    assert attached.get_content_type() == "message/rfc822"
    assert attached["Content-Transfer-Encoding"] == "7bit"
    encapsulated = attached.get_payload()[0]
    assert encapsulated["Subject"] == "inner"
    assert encapsulated["MIME-Version"] == "1.0"  # its QP body needs it
    assert encapsulated["Content-Transfer-Encoding"] == "quoted-printable"
    assert encapsulated.get_payload(decode=True) == UTF8_TEXT.removesuffix(b"\r\n")


def test_message_global_is_encoded_whole() -> None:
    # RFC 6532 §3.5 lets message/global be encoded, 8-bit header fields included.
    inner = "Subject: Grüße\r\n\r\nbody \xe9\r\n".encode()
    raw = (
        b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=q\r\n\r\n--q\r\n"
        b"Content-Type: message/global\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
        + inner
        + b"--q--\r\n"
    )
    out = downgrade(raw)
    assert out is not None
    check_7bit(out)
    parts = parse(out).get_payload()
    assert isinstance(parts, list)
    assert parts[0].get_content_type() == "message/global"
    assert parts[0]["Content-Transfer-Encoding"] == "quoted-printable"
    qp = out.split(b"quoted-printable\r\n\r\n")[1].split(b"\r\n--q--")[0]
    assert binascii.a2b_qp(qp) == inner.removesuffix(b"\r\n")


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param("Subject: Grüße\r\n\r\nascii body\r\n".encode(), id="8bit-subject"),
        pytest.param(
            "From: Jörg <j@example.de>\r\n\r\n".encode() + UTF8_TEXT, id="8bit-header-and-body"
        ),
        pytest.param(b"Content-Transfer-Encoding: binary\r\n\r\n\x00\xff binary\r\n", id="binary"),
        pytest.param(
            b"Content-Transfer-Encoding: base64\r\n\r\n\xff\xfe==\r\n", id="8bit-in-base64"
        ),
        pytest.param(
            b"Content-Transfer-Encoding: quoted-printable\r\n\r\ncaf\xe9=\r\n", id="8bit-in-qp"
        ),
        pytest.param(
            b"Content-Transfer-Encoding: x-uuencode\r\n\r\n\xe9\r\n", id="unknown-encoding"
        ),
        pytest.param(
            b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n"
            b"Content-Type: text/plain; name=\xe9.txt\r\n\r\nx\r\n--b--\r\n",
            id="8bit-part-header",
        ),
        pytest.param(
            b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n"
            b"Content-Type: message/rfc822\r\n\r\n"
            b"Subject: \xc3\xa9\r\n\r\nbody\r\n--b--\r\n",
            id="8bit-header-inside-message-rfc822",
        ),
        pytest.param(
            b"Content-Type: multipart/mixed; boundary=b\r\n\r\npr\xc3\xa9amble\r\n--b\r\n"
            b"Content-Type: text/plain\r\n\r\nx\r\n--b--\r\n",
            id="8bit-preamble",
        ),
        pytest.param(
            b"Content-Type: multipart/mixed\r\n\r\n--b\r\n\r\n\xc3\xa9\r\n--b--\r\n",
            id="multipart-without-boundary",
        ),
        pytest.param(
            b"Content-Type: multipart/mixed; boundary=b\r\n\r\nno delimiter \xc3\xa9\r\n",
            id="start-boundary-not-found",
        ),
        pytest.param(
            b"Content-Type: message/partial; id=1; number=1\r\n\r\n\xc3\xa9\r\n",
            id="message-partial",
        ),
    ],
)
def test_impossible_conversions_return_none(raw: bytes) -> None:
    assert downgrade(raw) is None


def test_too_deep_nesting_returns_none(scanner: ModuleType) -> None:
    # Deeper than the scanner looks (32 levels): the innermost 8-bit part cannot be found.
    depth = 40
    head = b"".join(
        b"Content-Type: multipart/mixed; boundary=b%d\r\n\r\n--b%d\r\n" % (i, i)
        for i in range(depth)
    )
    tail = b"".join(b"\r\n--b%d--" % i for i in reversed(range(depth)))
    raw = head + b"Content-Type: text/plain\r\n\r\n\xc3\xa9" + tail + b"\r\n"
    assert "too deep" in [d for p in _walk(scanner.scan(raw)) for d in p.defects]
    assert downgrade(raw) is None


def _walk(part: object) -> list[object]:
    out, stack = [], [part]
    while stack:
        node = stack.pop()
        out.append(node)
        stack.extend(node.children)  # type: ignore[attr-defined]
    return out


def test_close_boundary_missing_still_converts() -> None:
    raw = (
        b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n\r\n" + UTF8_TEXT
    )
    out = downgrade(raw)
    assert out is not None
    check_7bit(out)
    assert leaves(out) == leaves(raw)


def test_qp_encode_uses_crlf_everywhere() -> None:
    # No line break at all: binascii would use bare LF for its soft breaks.
    encoded = qp_encode(b"\xe9" * 100)
    assert b"\n" in encoded and encoded.count(b"\n") == encoded.count(b"\r\n")
    assert binascii.a2b_qp(encoded) == b"\xe9" * 100
    assert qp_encode(b"a \r\nb\t\r\n") == b"a=20\r\nb=09\r\n"


_body_text = st.lists(
    st.sampled_from(
        ["a", "Z", " ", "\t", "=", ".", "é", "東", "\r\n", "--", "From ", "\U0001f600", "x" * 90]
    ),
    max_size=60,
).map(lambda items: "".join(items).encode())


@HYPOTHESIS
@given(first=_body_text, second=st.binary(max_size=200), third=_body_text)
def test_random_bodies_round_trip(first: bytes, second: bytes, third: bytes) -> None:
    if second.isascii():  # 7-bit parts are copied as they are: give them queue-style CRLFs
        second = re.sub(rb"\r\n|\r|\n", b"\r\n", second)
    raw = (
        b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="=_b"\r\n\r\n'
        b"--=_b\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n" + first + b"\r\n"
        b"--=_b\r\nContent-Type: application/octet-stream\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n\r\n" + second + b"\r\n"
        b"--=_b\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n" + third + b"\r\n--=_b--\r\n"
    )
    # A random body could hold the boundary line itself; then it is not three parts.
    if any(re.search(rb"(?:^|\n)--=_b", body) for body in (first, second, third)):
        return
    out = downgrade(raw)
    assert out is not None
    if raw.isascii():
        assert out is raw
        return
    check_7bit(out)
    assert [body for _, body in leaves(out)] == [first, second, third]
