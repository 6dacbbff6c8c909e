"""The reports to queue, as the delivery worker and `queue bounce` get them from the one
DSN module: one per kind, NOTIFY applied, the envelope to queue each under."""

from __future__ import annotations

import pytest
from test_bounce import ARRIVAL, NOW, ORIGINAL, envelope, failed, parse, parts, status_blocks

from tachymail.delivery.bounce import (
    OPERATOR_BOUNCE_STATUS,
    Notification,
    RecipientReport,
    notifications,
    operator_bounce,
)
from tachymail.queue.envelope import Envelope, Recipient


def _notices(env: Envelope, reports: list[RecipientReport]) -> list[Notification]:
    return notifications(env, ORIGINAL, reports, reporting_mta="mta.example.com", now=NOW)


def test_one_report_per_kind_each_to_the_sender_with_the_null_path() -> None:
    bob = Recipient("bob@example.net", {"NOTIFY": "SUCCESS,FAILURE"})
    carol = Recipient("carol@example.org", {"NOTIFY": "SUCCESS,DELAY"})
    env = envelope([bob, carol], ENVID="batch-7")
    relayed = RecipientReport(carol, "relayed", "2.0.0", "250 2.0.0 ok")
    delayed = RecipientReport(carol, "delayed", "4.2.1", "451 4.2.1 busy")
    found = notifications(
        env,
        ORIGINAL,
        [failed(bob), relayed, delayed],
        reporting_mta="mta.example.com",
        now=NOW,
    )
    assert [(n.kind, n.recipients) for n in found] == [
        ("failed", 1),
        ("delivered", 1),
        ("delayed", 1),
    ]
    for notice in found:
        assert notice.envelope.sender == "" and notice.envelope.listener == "dsn"
        assert [r.address for r in notice.envelope.recipients] == ["alice@example.com"]
        assert notice.envelope.size == len(notice.content)
        assert notice.envelope.arrival == NOW
        per_message, _ = status_blocks(parse(notice.content))
        assert per_message["Original-Envelope-Id"] == "batch-7"
    assert len({n.envelope.id for n in found}) == 3


def test_notify_decides_who_is_told() -> None:
    never = Recipient("bob@example.net", {"NOTIFY": "NEVER"})
    default = Recipient("carol@example.org")
    env = envelope([never, default])
    # Without NOTIFY: failures yes, successes no (RFC 3461 §4.1 leaves it to the MTA).
    [notice] = _notices(env, [failed(never), failed(default)])
    _, blocks = status_blocks(parse(notice.content))
    assert [b["Final-Recipient"] for b in blocks] == ["rfc822; carol@example.org"]
    assert _notices(env, [RecipientReport(default, "relayed", "2.0.0", "250 ok")]) == []
    assert _notices(envelope([never, default], sender=""), [failed(default)]) == []


def test_a_utf8_sender_gets_a_report_queued_with_smtputf8() -> None:
    env = envelope([Recipient("bob@example.net")], sender="jörg@example.de")
    [notice] = _notices(env, [failed(env.recipients[0])])
    assert notice.envelope.mail_params == {"BODY": "8BITMIME", "SMTPUTF8": ""}


def test_an_unknown_action_is_refused() -> None:
    env = envelope()
    with pytest.raises(ValueError, match="unknown action"):
        _notices(env, [RecipientReport(env.recipients[0], "vanished", "5.0.0")])


def test_operator_bounce_says_so_with_the_last_attempt() -> None:
    tried = Recipient(
        "bob@example.net",
        {"ORCPT": "rfc822;Bob@Example.NET", "NOTIFY": "FAILURE"},
        attempts=3,
        last_attempt=ARRIVAL + 60,
        last_reply="451 4.7.1 greylisted",
    )
    untried = Recipient("carol@example.org")
    env = envelope([tried, untried], RET="HDRS")
    [(dsn, content)] = operator_bounce(
        env, ORIGINAL, [tried, untried], NOW, reporting_mta="mta.example.com"
    )
    assert dsn.sender == "" and [r.address for r in dsn.recipients] == ["alice@example.com"]
    message = parse(content)
    _, (first, second) = status_blocks(message)
    assert first["Original-Recipient"] == "rfc822;Bob@Example.NET"
    assert first["Action"] == "failed" and first["Status"] == OPERATOR_BOUNCE_STATUS
    assert first["Diagnostic-Code"] == (
        "X-Tachymail; bounced by the operator (tachymail queue bounce); "
        "last attempt: 451 4.7.1 greylisted"
    )
    assert "Last-Attempt-Date" in first and "Remote-MTA" not in first
    assert second["Diagnostic-Code"] == (
        "X-Tachymail; bounced by the operator (tachymail queue bounce)"
    )
    assert "Last-Attempt-Date" not in second, "never tried: no attempt date"
    assert parts(message)[2].get_content_type() == "text/rfc822-headers"  # RET=HDRS


def test_operator_bounce_of_notify_never_recipients_sends_nothing() -> None:
    quiet = Recipient("bob@example.net", {"NOTIFY": "NEVER"})
    env = envelope([quiet])
    assert operator_bounce(env, ORIGINAL, [quiet], NOW, reporting_mta="mta.example.com") == []
