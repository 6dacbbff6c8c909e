"""Messages built for HTTP injection (http/compose.py), parsed back with the email package:
MIME structure, attachments, encoded words, Date and Message-ID, and the Jinja2 sandbox."""

from __future__ import annotations

import base64
import email
import email.policy
from email.message import EmailMessage
from typing import Any

import pytest
from pydantic import ValidationError

from tachymail.http.compose import (
    ContentProblem,
    MessageParts,
    TemplateProblem,
    Templates,
    build_message,
    prepare_raw,
)

NOW = 1_700_000_000.0


def parts(**fields: Any) -> MessageParts:
    return MessageParts.model_validate(
        {"from": "Alice <alice@sender.test>", "subject": "Hello", **fields}
    )


def build(content: MessageParts, variables: dict[str, Any] | None = None, **kw: Any) -> bytes:
    dialect = "jinja" if variables is not None else "static"
    rendered = Templates(content, dialect).render("bob@dest.test", variables or {})
    return build_message(
        content, rendered, to=kw.get("to", "bob@dest.test"), msgid="<q1@mx.test>", now=NOW
    )


def parse(raw: bytes) -> EmailMessage:
    assert b"\n" not in raw.replace(b"\r\n", b""), "every line ends in CRLF"
    message = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def test_text_only_is_a_single_seven_bit_part_with_date_and_message_id() -> None:
    raw = build(parts(text_body="Grüße\nzweite Zeile\n"))
    assert raw.isascii()
    msg = parse(raw)
    assert msg.get_content_type() == "text/plain"
    assert msg["Content-Transfer-Encoding"] == "quoted-printable"
    assert msg.get_content().replace("\r\n", "\n") == "Grüße\nzweite Zeile\n"
    assert msg["Message-ID"] == "<q1@mx.test>"
    assert msg["Date"].datetime.timestamp() == NOW
    assert msg["To"] == "bob@dest.test"
    assert str(msg["From"]) == "Alice <alice@sender.test>"


def test_html_only() -> None:
    msg = parse(build(parts(html_body="<p>hi</p>")))
    assert msg.get_content_type() == "text/html"
    assert msg.get_content().strip() == "<p>hi</p>"


def test_text_and_html_make_multipart_alternative() -> None:
    msg = parse(build(parts(text_body="plain", html_body="<b>rich</b>")))
    assert msg.get_content_type() == "multipart/alternative"
    kinds = [p.get_content_type() for p in msg.iter_parts()]
    assert kinds == ["text/plain", "text/html"]
    # MIME-Version belongs on the top only (the email package adds it to every new part)
    assert all("MIME-Version" not in p for p in msg.iter_parts())
    assert msg["MIME-Version"] == "1.0"


def test_attachments_make_multipart_mixed_and_round_trip() -> None:
    blob = bytes(range(256)) * 10
    content = parts(
        text_body="see attached",
        html_body="<p>see attached</p>",
        attachments=[
            {"filename": "data.bin", "data": base64.b64encode(blob).decode()},
            {
                "filename": "résumé.pdf",
                "content_type": "application/PDF",
                # wrapped base64, as many encoders write it
                "data": base64.encodebytes(b"%PDF-1.4 fake").decode(),
            },
        ],
    )
    msg = parse(build(content))
    assert msg.get_content_type() == "multipart/mixed"
    body, first, second = msg.iter_parts()
    assert body.get_content_type() == "multipart/alternative"
    assert first.get_filename() == "data.bin"
    assert first.get_content_type() == "application/octet-stream"
    assert first.get_payload(decode=True) == blob
    assert second.get_filename() == "résumé.pdf"
    assert second.get_content_type() == "application/pdf"
    assert second.get_payload(decode=True) == b"%PDF-1.4 fake"


def test_non_ascii_subject_and_name_are_encoded_words() -> None:
    content = MessageParts.model_validate(
        {"from": "Jürgen Groß <j@sender.test>", "subject": "Grüße aus Köln", "text_body": "x"}
    )
    raw = build(content)
    head = raw.split(b"\r\n\r\n", 1)[0]
    assert b"=?utf-8?" in head and head.isascii()
    msg = parse(raw)
    assert msg["Subject"] == "Grüße aus Köln"
    assert msg["From"].addresses[0].display_name == "Jürgen Groß"


def test_caller_headers_win_and_are_checked() -> None:
    content = parts(
        text_body="x",
        headers={"Message-ID": "<own@app.test>", "To": "Bob <bob@dest.test>", "X-Campaign": "é"},
    )
    msg = parse(build(content))
    assert msg["Message-ID"] == "<own@app.test>"
    assert msg.get_all("To") == ["Bob <bob@dest.test>"]
    assert msg["X-Campaign"] == "é"
    with pytest.raises(ContentProblem, match=r"content\.headers\.Date"):
        build(parts(text_body="x", headers={"Date": "not a date"}))


@pytest.mark.parametrize(
    "headers",
    [
        {"X-Evil": "a\r\nBcc: victim@x.test"},
        {"Content-Type": "text/html"},
        {"From": "other@x.test"},
        {"Bad Name": "x"},
        {"X-A": "1", "x-a": "2"},
    ],
)
def test_header_injection_and_structural_duplicates_are_refused(headers: dict[str, str]) -> None:
    with pytest.raises(ValidationError):
        parts(text_body="x", headers=headers)


def test_bad_base64_and_missing_body_are_refused() -> None:
    with pytest.raises(ValidationError, match="base64"):
        parts(text_body="x", attachments=[{"filename": "a", "data": "not*base64"}])
    with pytest.raises(ValidationError, match="text_body"):
        parts()


def test_substitutions_recipient_wins_and_html_is_escaped() -> None:
    content = parts(
        subject="Hi {{ name }}",
        text_body="{{ name }} / {{ plan }}",
        html_body="<p>{{ name }}</p>",
    )
    templates = Templates(content, "jinja")
    shared = {"name": "friend", "plan": "basic"}
    rendered = templates.render("bob@dest.test", {**shared, **{"name": "<Bob>"}})
    assert rendered[:3] == ("Hi <Bob>", "<Bob> / basic", "<p>&lt;Bob&gt;</p>")
    assert templates.render("x@dest.test", shared)[1] == "friend / basic"
    msg = parse(build(content, {**shared, "name": "Zoë"}))
    assert msg["Subject"] == "Hi Zoë"


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ cycler.__init__.__globals__ }}",
        "{{ 'x' * 100000000 }}",
        "{{ 10 ** 100000 }}",
        "{% for i in range(100000000) %}{% endfor %}",
        "{{ missing_variable }}",
    ],
)
def test_sandbox_refuses_escapes_and_huge_values(template: str) -> None:
    templates = Templates(parts(text_body=template), "jinja")
    with pytest.raises(TemplateProblem) as info:
        templates.render("bob@dest.test", {})
    assert info.value.recipient == "bob@dest.test"
    assert info.value.field == "content.text_body"


def test_template_syntax_error_names_the_field() -> None:
    with pytest.raises(TemplateProblem, match=r"content\.subject"):
        Templates(parts(subject="{{ broken", text_body="x"), "jinja")


def test_static_dialect_renders_nothing() -> None:
    templates = Templates(parts(text_body="{{ ''.__class__ }}"), "static")
    assert not templates.personal
    assert templates.render("a@b.test", {})[1] == "{{ ''.__class__ }}"


def test_raw_content_line_ends_and_added_fields() -> None:
    raw = prepare_raw("From: a@sender.test\nSubject: raw\r\rbody\n", msgid="<q2@mx.test>", now=NOW)
    assert raw.startswith(b"Date: ") and b"\r\nMessage-ID: <q2@mx.test>\r\nFrom:" in raw
    assert raw.endswith(b"Subject: raw\r\n\r\nbody\r\n")
    kept = prepare_raw(
        "From: a@sender.test\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\nMessage-ID: <x@y>\r\n\r\nb",
        msgid="<q3@mx.test>",
        now=NOW,
    )
    assert kept.startswith(b"From: ") and kept.count(b"Message-ID") == 1
    with pytest.raises(ContentProblem, match="From"):
        prepare_raw("Subject: no from\r\n\r\nbody\r\n", msgid="<q4@mx.test>", now=NOW)
