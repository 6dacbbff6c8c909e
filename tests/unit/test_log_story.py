"""Reading log lines back (`tachymail log`): every format gives the event's fields."""

from __future__ import annotations

import logging

import pytest

from tachymail.metrics.logs import formatter, parse_line, story

QID = "0192f3a4b5c6d7e8f901"


def line(kind: str, msg: str, fields: dict[str, object]) -> str:
    record = logging.LogRecord("tachymail.x", logging.INFO, __file__, 1, msg, (), None)
    record.fields = fields
    return formatter(kind).format(record)


INTAKE = {
    "event": "message_accepted",
    "queue_id": QID,
    "message_id": '<a "b"=c@example.com>',
    "sender": "s@example.com",
    "recipients": ["r1@example.net", "r2@example.net"],
    "size": 321,
    "client": "127.0.0.1:4000",
    "listener": "mx",
}
INTAKE_TEXT = (
    f"{QID} queued: from <s@example.com> to <r1@example.net>, <r2@example.net>; 321 octets;"
    ' client 127.0.0.1:4000; message-id <a "b"=c@example.com>'
)
ATTEMPT = {
    "event": "delivery_attempt",
    "queue_id": QID,
    "recipient": "r1@example.net",
    "result": "deferred",
    "reply": '451 4.7.1 "greylisted" try=later',
}
ATTEMPT_TEXT = (
    f'{QID} to <r1@example.net> via mx.example.net: deferred: 451 4.7.1 "greylisted" try=later'
)


@pytest.mark.parametrize("kind", ["text", "json", "logfmt"])
def test_intake_and_attempt_lines_read_back(kind: str) -> None:
    intake = parse_line(line(kind, INTAKE_TEXT, INTAKE))
    attempt = parse_line(line(kind, ATTEMPT_TEXT, ATTEMPT))
    for key in ("event", "queue_id", "message_id", "sender", "recipients"):
        assert intake[key] == INTAKE[key], key
    for key in ("event", "queue_id", "recipient", "result", "reply"):
        assert attempt[key] == ATTEMPT[key], key


@pytest.mark.parametrize("kind", ["text", "json", "logfmt"])
def test_a_story_behind_a_syslog_prefix(kind: str) -> None:
    prefix = "Dec  1 15:09:09 host tachymail[42]: "
    lines = [
        prefix + line(kind, "unrelated 0192f3a4b5c6d7e8f999 queued", {}),
        prefix + line(kind, INTAKE_TEXT, INTAKE),
        prefix + line(kind, ATTEMPT_TEXT, ATTEMPT),
    ]
    [found] = story(lines, 'a "b"=c@example.com')
    assert found.lines == lines[1:]
    assert found.summary()[-1] == "outcome: still queued (2 recipient(s) pending)"
    assert story(lines, QID)[0].lines == lines[1:]
