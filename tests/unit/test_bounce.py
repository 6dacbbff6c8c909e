"""Delivery status notifications: reports parsed back with Python's email package, field by
field, for failures, delays and successes; NOTIFY and RET rules; 8-bit and long text."""

from __future__ import annotations

import binascii
import email
import email.message
import re
from email import policy
from email.utils import formatdate

import pytest

from tachymail.delivery.bounce import (
    RETURN_FULL_LIMIT,
    RecipientReport,
    build_report,
    report_mail_params,
    report_recipients,
    should_bounce,
)
from tachymail.queue.envelope import Envelope, Recipient

NOW = 1_700_000_600.0
ARRIVAL = 1_700_000_000.0
LAST = 1_700_000_500.0
RETRY_UNTIL = 1_700_432_000.0

ORIGINAL = (
    b"Received: from client.example ([192.0.2.7])\r\n"
    b"\tby mta.example.com (Tachymail) with ESMTP id 0123;\r\n"
    b"\tTue, 14 Nov 2023 22:13:20 -0000\r\n"
    b"From: Alice <alice@example.com>\r\n"
    b"To: bob@example.net, carol@example.org\r\n"
    b"Subject: Quarterly figures\r\n"
    b"Message-ID: <figures-1@example.com>\r\n"
    b"\r\n"
    b"Here are the figures.\r\n"
    b"Regards, Alice\r\n"
)
ORIGINAL_HEADERS = ORIGINAL[: ORIGINAL.index(b"\r\n\r\n") + 2]


def envelope(
    recipients: list[Recipient] | None = None, sender: str = "alice@example.com", **params: str
) -> Envelope:
    return Envelope(
        id="0189abcdef0123450001",
        sender=sender,
        recipients=recipients
        or [
            Recipient("bob@example.net", {"ORCPT": "rfc822;Bob@Example.NET", "NOTIFY": "FAILURE"}),
            Recipient("carol@example.org"),
        ],
        mail_params=params,
        arrival=ARRIVAL,
        size=len(ORIGINAL),
        client_ip="192.0.2.7",
        helo="client.example",
    )


def failed(recipient: Recipient, **changes: object) -> RecipientReport:
    fields: dict[str, object] = {
        "action": "failed",
        "status": "5.1.1",
        "diagnostic": f"550 5.1.1 <{recipient.address}>: Recipient address rejected",
        "remote_mta": "mx1.example.net",
        "last_attempt": LAST,
    }
    fields.update(changes)
    return RecipientReport(recipient, **fields)  # type: ignore[arg-type]


def build(env: Envelope, reports: list[RecipientReport], content: bytes = ORIGINAL) -> bytes:
    raw = build_report(
        env, content, reports, reporting_mta="mta.example.com", now=NOW, queue_id="0189report01"
    )
    check_lines(raw)
    return raw


def check_lines(raw: bytes) -> None:
    """CRLF line ends only, and no line longer than 998 octets (RFC 5322 §2.1.1)."""
    crlf = raw.count(b"\r\n")
    assert raw.count(b"\n") == crlf and raw.count(b"\r") == crlf, "bare CR or LF"
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998


def parse(raw: bytes) -> email.message.EmailMessage:
    message = email.message_from_bytes(raw, policy=policy.default)
    assert isinstance(message, email.message.EmailMessage)
    for part in message.walk():
        assert not part.defects, part.defects
    return message


def parts(message: email.message.EmailMessage) -> list[email.message.EmailMessage]:
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "delivery-status"
    payload = message.get_payload()
    assert isinstance(payload, list)
    return payload


def status_blocks(
    message: email.message.EmailMessage,
) -> tuple[dict[str, str], list[dict[str, str]]]:
    """The per-message fields and the per-recipient blocks of the delivery-status part."""
    part = parts(message)[1]
    assert part.get_content_type() == "message/delivery-status"
    blocks = part.get_payload()
    assert isinstance(blocks, list)
    as_dicts = []
    for block in blocks:
        names = [name.lower() for name in block]
        assert len(names) == len(set(names)), f"repeated field in {names}"
        as_dicts.append({name: str(value) for name, value in block.items()})
    return as_dicts[0], as_dicts[1:]


def text_of(message: email.message.EmailMessage) -> str:
    part = parts(message)[0]
    assert part.get_content_type() == "text/plain"
    content = part.get_content()
    assert isinstance(content, str)
    return content


def test_failure_report_every_field() -> None:
    env = envelope(ENVID="QQ314159", RET="FULL")
    raw = build(env, [failed(r) for r in env.recipients])
    message = parse(raw)

    assert raw.startswith(b'From: "Mail Delivery System" <MAILER-DAEMON@mta.example.com>\r\n')
    assert message["From"].addresses[0].display_name == "Mail Delivery System"
    assert message["From"].addresses[0].addr_spec == "MAILER-DAEMON@mta.example.com"
    assert message["To"] == "alice@example.com"
    assert message["Subject"] == "Undelivered Mail Returned to Sender"
    assert message["Date"] == formatdate(NOW)
    assert message["Message-ID"] == f"<{int(NOW)}.0189report01.dsn@mta.example.com>"
    assert message["Auto-Submitted"] == "auto-replied"
    assert message["MIME-Version"] == "1.0"
    assert message["Content-Transfer-Encoding"] is None  # all 7-bit
    assert report_mail_params(raw) == {}

    text, status, returned = parts(message)
    assert text.get_content_type() == "text/plain"
    assert status.get_content_type() == "message/delivery-status"
    assert returned.get_content_type() == "message/rfc822"

    per_message, recipients = status_blocks(message)
    assert per_message == {
        "Reporting-MTA": "dns; mta.example.com",
        "X-Tachymail-Queue-ID": "0189abcdef0123450001",
        "Original-Envelope-Id": "QQ314159",
        "Received-From-MTA": "dns; client.example ([192.0.2.7])",
        "Arrival-Date": formatdate(ARRIVAL),
    }
    assert recipients == [
        {
            "Original-Recipient": "rfc822;Bob@Example.NET",
            "Final-Recipient": "rfc822; bob@example.net",
            "Action": "failed",
            "Status": "5.1.1",
            "Remote-MTA": "dns; mx1.example.net",
            "Diagnostic-Code": "smtp; 550 5.1.1 <bob@example.net>: Recipient address rejected",
            "Last-Attempt-Date": formatdate(LAST),
        },
        {
            "Final-Recipient": "rfc822; carol@example.org",
            "Action": "failed",
            "Status": "5.1.1",
            "Remote-MTA": "dns; mx1.example.net",
            "Diagnostic-Code": "smtp; 550 5.1.1 <carol@example.org>: Recipient address rejected",
            "Last-Attempt-Date": formatdate(LAST),
        },
    ]

    words = text_of(message)
    assert "mta.example.com" in words
    assert "failed permanently" in words
    assert "<bob@example.net>: delivery failed (5.1.1)" in words
    assert (
        "host mx1.example.net said: 550 5.1.1 <carol@example.org>: Recipient address "
        "rejected" in " ".join(words.split())
    )
    assert "Your message is attached." in words
    assert "0189abcdef0123450001" in words

    # The whole original comes back, byte for byte.
    assert raw.split(b"Content-Description: Undelivered message\r\n\r\n")[1].startswith(ORIGINAL)
    attached = returned.get_payload()
    assert isinstance(attached, list)
    assert attached[0]["Subject"] == "Quarterly figures"
    assert attached[0]["Message-ID"] == "<figures-1@example.com>"
    assert attached[0].get_content() == "Here are the figures.\r\nRegards, Alice\r\n"


def test_ret_hdrs_returns_only_the_header_block() -> None:
    env = envelope(RET="HDRS")
    message = parse(build(env, [failed(env.recipients[0])]))
    returned = parts(message)[2]
    assert returned.get_content_type() == "text/rfc822-headers"
    assert returned.get_payload(decode=True) == ORIGINAL_HEADERS
    assert "Here are the figures" not in returned.as_string()
    assert "The headers of your message are attached." in text_of(message)


def test_without_ret_small_messages_come_back_whole_large_ones_as_headers() -> None:
    env = envelope()
    small = parse(build(env, [failed(env.recipients[0])]))
    assert parts(small)[2].get_content_type() == "message/rfc822"

    large = ORIGINAL + (b"y" * 70 + b"\r\n") * (RETURN_FULL_LIMIT // 72 + 1)
    assert len(large) > RETURN_FULL_LIMIT
    raw = build(env, [failed(env.recipients[0])], content=large)
    assert len(raw) < 10_000
    message = parse(raw)
    assert parts(message)[2].get_content_type() == "text/rfc822-headers"
    assert "larger than 1 MiB" in text_of(message)

    # RET=FULL is honoured whatever the size.
    raw = build(envelope(RET="FULL"), [failed(env.recipients[0])], content=large)
    assert parts(parse(raw))[2].get_content_type() == "message/rfc822"
    assert large in raw


def test_long_lines_are_never_returned_whole() -> None:
    content = ORIGINAL + b"z" * 5000 + b"\r\n"
    env = envelope(RET="FULL")
    message = parse(build(env, [failed(env.recipients[0])], content=content))
    assert parts(message)[2].get_content_type() == "text/rfc822-headers"
    assert "lines too long" in text_of(message)


def test_delay_report() -> None:
    env = envelope(RET="FULL")
    delayed = RecipientReport(
        env.recipients[1],
        action="delayed",
        status="4.4.1",
        diagnostic="connect to mx.example.org[198.51.100.5]:25: Connection timed out",
        last_attempt=LAST,
        will_retry_until=RETRY_UNTIL,
    )
    message = parse(build(env, [delayed]))
    assert message["Subject"] == "Delayed Mail (still being retried)"
    _, recipients = status_blocks(message)
    assert recipients == [
        {
            "Final-Recipient": "rfc822; carol@example.org",
            "Action": "delayed",
            "Status": "4.4.1",
            "Diagnostic-Code": "smtp; connect to mx.example.org[198.51.100.5]:25: Connection "
            "timed out",
            "Last-Attempt-Date": formatdate(LAST),
            "Will-Retry-Until": formatdate(RETRY_UNTIL),
        }
    ]
    words = " ".join(text_of(message).split())
    assert "not been delivered yet" in words
    assert f"retried until {formatdate(RETRY_UNTIL)}" in words
    # RET applies to failures: a delay report returns only the headers.
    returned = parts(message)[2]
    assert returned.get_content_type() == "text/rfc822-headers"
    assert returned.get_payload(decode=True) == ORIGINAL_HEADERS


def test_success_report() -> None:
    rcpt = Recipient("bob@example.net", {"NOTIFY": "SUCCESS", "ORCPT": "rfc822;bob@example.net"})
    env = envelope([rcpt], ENVID="E-77")
    report = RecipientReport(
        rcpt,
        action="delivered",
        status="2.0.0",
        diagnostic="250 2.0.0 Ok: queued as 4XyZ",
        remote_mta="mx1.example.net",
        last_attempt=LAST,
    )
    message = parse(build(env, [report]))
    assert message["Subject"] == "Successful Mail Delivery Report"
    per_message, recipients = status_blocks(message)
    assert per_message["Original-Envelope-Id"] == "E-77"
    assert recipients[0]["Action"] == "delivered"
    assert recipients[0]["Status"] == "2.0.0"
    assert recipients[0]["Original-Recipient"] == "rfc822;bob@example.net"
    assert "Will-Retry-Until" not in recipients[0]
    assert "was delivered" in text_of(message)
    assert parts(message)[2].get_content_type() == "text/rfc822-headers"


def test_mixed_report_is_a_failure_report_and_keeps_order() -> None:
    env = envelope()
    bob, carol = env.recipients
    reports = [
        RecipientReport(carol, "delayed", "4.2.2", "452 4.2.2 Mailbox full", "mx", LAST, NOW),
        failed(bob),
    ]
    message = parse(build(env, reports))
    assert message["Subject"] == "Undelivered Mail Returned to Sender"
    _, recipients = status_blocks(message)
    assert [(r["Final-Recipient"], r["Action"]) for r in recipients] == [
        ("rfc822; carol@example.org", "delayed"),
        ("rfc822; bob@example.net", "failed"),
    ]
    assert recipients[0]["Will-Retry-Until"] == formatdate(NOW)


def test_long_diagnostic_is_folded_and_unfolds_to_the_same_text() -> None:
    env = envelope()
    diagnostic = "550 5.7.1 " + " ".join(f"word{i}" for i in range(400))
    raw = build(env, [failed(env.recipients[0], diagnostic=diagnostic)])
    field = re.search(rb"\r\nDiagnostic-Code: .*?\r\n(?! )", raw, re.DOTALL)
    assert field is not None
    lines = field[0].strip(b"\r\n").split(b"\r\n")
    assert len(lines) > 20
    assert all(len(line) <= 78 for line in lines)
    assert all(line.startswith(b" ") for line in lines[1:])
    _, recipients = status_blocks(parse(raw))
    assert recipients[0]["Diagnostic-Code"] == f"smtp; {diagnostic}"


def test_a_word_longer_than_a_line_is_split() -> None:
    env = envelope()
    diagnostic = "554 5.6.0 " + "A" * 3000 + " end"
    raw = build(env, [failed(env.recipients[0], diagnostic=diagnostic)])
    _, recipients = status_blocks(parse(raw))
    value = recipients[0]["Diagnostic-Code"]
    assert value.startswith("smtp; 554 5.6.0 AAA") and value.endswith(" end")
    assert value.replace(" ", "").count("A") == 3000
    assert "A" * 3000 in "".join(text_of(parse(raw)).split())


def test_8bit_diagnostic_multiline_and_control_characters() -> None:
    env = envelope()
    diagnostic = "550-5.1.1 Empfänger unbekannt\r\n550 5.1.1 Grüße \udcff\x00 bell\x07"
    raw = build(env, [failed(env.recipients[0], diagnostic=diagnostic)])
    message = parse(raw)
    status = parts(message)[1]
    assert status.as_bytes().isascii()  # the delivery-status part stays 7-bit
    _, recipients = status_blocks(message)
    assert recipients[0]["Diagnostic-Code"] == (
        "smtp; 550-5.1.1 Empf?nger unbekannt 550 5.1.1 Gr??e bell"
    )
    # The text part keeps the words, in UTF-8, quoted-printable: the report is 7-bit.
    text = parts(message)[0]
    assert text.get_content_charset() == "utf-8"
    assert text["Content-Transfer-Encoding"] == "quoted-printable"
    assert "Empfänger unbekannt 550 5.1.1 Grüße bell" in " ".join(text_of(message).split())
    assert raw.isascii()
    assert report_mail_params(raw) == {}


def test_8bit_original_body_goes_back_as_8bit_message_rfc822() -> None:
    content = ORIGINAL.replace(b"Here are", "Hier sind die Zahlen für".encode())
    env = envelope(BODY="8BITMIME")
    raw = build(env, [failed(env.recipients[0])], content=content)
    message = parse(raw)
    assert message["Content-Transfer-Encoding"] == "8bit"
    returned = parts(message)[2]
    assert returned.get_content_type() == "message/rfc822"
    assert returned["Content-Transfer-Encoding"] == "8bit"
    assert content in raw
    assert report_mail_params(raw) == {"BODY": "8BITMIME"}


def test_smtputf8_original_and_recipient() -> None:
    rcpt = Recipient("jörg@bücher.example")
    content = "From: Jörg <jörg@bücher.example>\r\nSubject: Grüße\r\n\r\nHallo\r\n".encode()
    env = envelope([rcpt], sender="ünïcode@example.com", SMTPUTF8="", RET="HDRS")
    raw = build(env, [failed(rcpt, diagnostic="550 5.1.1 unknown")], content=content)
    message = parse(raw)
    assert message["To"] == "ünïcode@example.com"
    assert report_mail_params(raw) == {"BODY": "8BITMIME", "SMTPUTF8": ""}
    _, recipients = status_blocks(message)
    # RFC 6533 §3: utf-8 address type, utf-8-addr-xtext form in message/delivery-status.
    assert recipients[0]["Final-Recipient"] == "utf-8; j\\x{F6}rg@b\\x{FC}cher.example"
    assert parts(message)[1].as_bytes().isascii()
    returned = parts(message)[2]
    assert returned.get_content_type() == "message/global-headers"
    assert content[: content.index(b"\r\n\r\n") + 2] in raw

    full = build(envelope([rcpt], sender="a@example.com", RET="FULL"), [failed(rcpt)], content)
    assert parts(parse(full))[2].get_content_type() == "message/global"
    assert content in full


def test_utf8_addr_xtext_escapes_plus_equals_and_backslash() -> None:
    rcpt = Recipient("ü+tag=x\\y@example.com")
    raw = build(envelope([rcpt]), [failed(rcpt)])
    _, recipients = status_blocks(parse(raw))
    assert (
        recipients[0]["Final-Recipient"] == "utf-8; \\x{FC}\\x{2B}tag\\x{3D}x\\x{5C}y@example.com"
    )


def test_without_content_there_is_no_third_part() -> None:
    env = envelope()
    message = parse(build(env, [failed(env.recipients[0])], content=b""))
    assert len(parts(message)) == 2


def test_bare_line_ends_in_the_original_are_made_crlf() -> None:
    content = b"Subject: lf\nX-A: b\n\nline one\nline two\rline three\r\n"
    env = envelope(RET="FULL")
    raw = build(env, [failed(env.recipients[0])], content=content)
    returned = parts(parse(raw))[2]
    attached = returned.get_payload()
    assert isinstance(attached, list)
    assert attached[0]["X-A"] == "b"
    assert attached[0].get_content() == "line one\r\nline two\r\nline three\r\n"


def test_boundary_never_occurs_in_the_parts() -> None:
    env = envelope(RET="FULL")
    first_choice = f"--=_0189report01.{int(NOW)}"
    content = ORIGINAL + first_choice.encode() + b"\r\n"
    raw = build(env, [failed(env.recipients[0])], content=content)
    message = parse(raw)
    assert message.get_boundary() != first_choice[2:]
    assert len(parts(message)) == 3
    attached = parts(message)[2].get_payload()
    assert isinstance(attached, list)
    assert first_choice in attached[0].get_content()


def test_invalid_status_is_replaced_by_the_generic_code(caplog: pytest.LogCaptureFixture) -> None:
    env = envelope()
    raw = build(env, [failed(env.recipients[0], status="550")])
    _, recipients = status_blocks(parse(raw))
    assert recipients[0]["Status"] == "5.0.0"
    assert "invalid status" in caplog.text


def test_null_sender_gets_no_report() -> None:
    env = envelope(sender="")
    assert not should_bounce(env)
    assert should_bounce(envelope())
    assert report_recipients(env, "failed") == []
    with pytest.raises(ValueError, match="null sender"):
        build(env, [failed(env.recipients[0])])


def test_build_report_rejects_bad_input() -> None:
    env = envelope()
    with pytest.raises(ValueError, match="at least one"):
        build(env, [])
    with pytest.raises(ValueError, match="unknown action"):
        build(env, [failed(env.recipients[0], action="bounced")])


@pytest.mark.parametrize(
    ("notify", "failed_", "delayed", "delivered"),
    [
        (None, True, True, False),
        ("NEVER", False, False, False),
        ("SUCCESS", False, False, True),
        ("FAILURE", True, False, False),
        ("DELAY", False, True, False),
        ("FAILURE,DELAY", True, True, False),
        ("SUCCESS,FAILURE,DELAY", True, True, True),
        ("success,failure", True, False, True),
    ],
)
def test_notify_rules(notify: str | None, failed_: bool, delayed: bool, delivered: bool) -> None:
    params = {"NOTIFY": notify} if notify else {}
    rcpt = Recipient("x@example.net", params)
    other = Recipient("never@example.net", {"NOTIFY": "NEVER"})
    env = envelope([other, rcpt])
    assert report_recipients(env, "failed") == ([rcpt] if failed_ else [])
    assert report_recipients(env, "delayed") == ([rcpt] if delayed else [])
    assert report_recipients(env, "delivered") == ([rcpt] if delivered else [])
    assert report_recipients(env, "relayed") == report_recipients(env, "delivered")
    assert report_recipients(env, "expanded") == report_recipients(env, "delivered")


def test_report_recipients_keeps_envelope_order_and_rejects_unknown_outcomes() -> None:
    rcpts = [Recipient(f"r{i}@example.net") for i in range(5)]
    assert report_recipients(envelope(rcpts), "failed") == rcpts
    with pytest.raises(ValueError, match="unknown outcome"):
        report_recipients(envelope(rcpts), "bounced")


def test_quoted_printable_text_part_decodes_exactly() -> None:
    rcpt = Recipient("zoë@example.com")
    raw = build(envelope([rcpt]), [failed(rcpt, diagnostic="550 " + "ö" * 300)])
    text = parts(parse(raw))[0]
    encoded = raw.split(b"Content-Description: Notification\r\n\r\n")[1].split(b"\r\n--=_")[0]
    assert all(len(line) <= 76 for line in encoded.split(b"\r\n"))
    decoded = binascii.a2b_qp(encoded).decode()
    assert decoded == text.get_content()
    assert "<zoë@example.com>: delivery failed (5.1.1)" in decoded
    assert "ö" * 60 in decoded
