"""JMAP pieces without a server: request checks and result references (RFC 8620 §3),
method dispatch errors, header forms and the textBody/htmlBody/attachments algorithm
(RFC 8621 §4.1), states and email ids on a real store (Email/changes' inputs)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from tachymail.jmap.core import (
    CORE,
    Call,
    Limits,
    MethodError,
    RequestError,
    check_request,
    resolve_references,
    run_calls,
)
from tachymail.jmap.render import (
    BodyView,
    as_addresses,
    as_date,
    as_message_ids,
    as_text,
    header_fields,
    parse_header_property,
)
from tachymail.jmap.view import Views, email_state, parse_email_state
from tachymail.mailbox import (
    MailboxStore,
    copy_messages,
    deliver,
    expunge,
    move_messages,
    prepare_delivery,
    set_flags,
)
from tachymail.mailbox.summary import build_summary


def test_check_request_refuses_what_is_not_a_request() -> None:
    limits = Limits(max_calls_in_request=2)
    for bad in ([], {"using": "x", "methodCalls": []}, {"using": [], "methodCalls": [["a"]]}):
        with pytest.raises(RequestError) as caught:
            check_request(bad, limits)
        assert caught.value.kind == "notRequest"
    with pytest.raises(RequestError) as caught:
        check_request({"using": ["urn:nope"], "methodCalls": []}, limits)
    assert caught.value.kind == "unknownCapability"
    calls = [["Core/echo", {}, str(i)] for i in range(3)]
    with pytest.raises(RequestError) as caught:
        check_request({"using": [CORE], "methodCalls": calls}, limits)
    assert caught.value.problem()["limit"] == "maxCallsInRequest"
    assert caught.value.problem()["type"] == "urn:ietf:params:jmap:error:limit"


def test_result_references_follow_paths_with_stars() -> None:
    responses = [
        ["Email/query", {"ids": ["a", "b"]}, "q"],
        ["Email/get", {"list": [{"threadId": "t1"}, {"threadId": "t2"}]}, "g"],
        ["Thread/get", {"list": [{"emailIds": ["x", "y"]}, {"emailIds": ["z"]}]}, "t"],
    ]
    ref = {"resultOf": "g", "name": "Email/get", "path": "/list/*/threadId"}
    assert resolve_references({"#ids": ref, "other": 1}, responses) == {
        "ids": ["t1", "t2"],
        "other": 1,
    }
    ref = {"resultOf": "t", "name": "Thread/get", "path": "/list/*/emailIds"}
    assert resolve_references({"#ids": ref}, responses) == {"ids": ["x", "y", "z"]}
    for bad in (
        {"resultOf": "q", "name": "Email/get", "path": "/ids"},  # wrong name
        {"resultOf": "zz", "name": "Email/query", "path": "/ids"},
        {"resultOf": "q", "name": "Email/query", "path": "/nope"},
        "not an object",
    ):
        with pytest.raises(MethodError) as caught:
            resolve_references({"#ids": bad}, responses)
        assert caught.value.kind == "invalidResultReference"
    with pytest.raises(MethodError) as caught:
        resolve_references({"#ids": ref, "ids": []}, responses)
    assert caught.value.kind == "invalidArguments"


def test_run_calls_turns_failures_into_method_errors() -> None:
    async def echo(call: Call) -> dict[str, Any]:
        return call.args

    async def broken(call: Call) -> dict[str, Any]:
        raise RuntimeError("a bug")

    methods = {"Core/echo": (CORE, echo), "X/broken": (CORE, broken), "M/x": ("urn:m", echo)}
    calls = [
        ["Core/echo", {"a": 1}, "0"],
        ["X/broken", {}, "1"],
        ["Nope/get", {}, "2"],
        ["M/x", {}, "3"],  # its capability was not in "using"
        ["Core/echo", {"#a": {"resultOf": "0", "name": "Core/echo", "path": "/a"}}, "4"],
    ]
    out = asyncio.run(run_calls(calls, [CORE], methods, {}))
    assert out[0] == ["Core/echo", {"a": 1}, "0"]
    assert out[1] == ["error", {"type": "serverFail"}, "1"]
    assert out[2][1]["type"] == "unknownMethod" and out[3][1]["type"] == "unknownMethod"
    assert out[4] == ["Core/echo", {"a": 1}, "4"]


def test_header_forms() -> None:
    block = (
        b'Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\n  again\r\nTo: "A, B" <a@x.test>, c@y.test\r\n'
        b"References: <1@x> <2@x>\r\nDate: Tue, 1 Oct 2024 10:00:00 +0200\r\n\r\nbody"
    )
    fields = header_fields(block)
    assert [name for name, _ in fields] == ["Subject", "To", "References", "Date"]
    assert fields[0][1] == " =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\n  again"
    assert as_text(fields[0][1]) == "Grüße again"
    assert as_addresses(fields[1][1]) == [
        {"name": "A, B", "email": "a@x.test"},
        {"name": None, "email": "c@y.test"},
    ]
    assert as_message_ids(fields[2][1]) == ["1@x", "2@x"]
    assert as_date(fields[3][1]) == "2024-10-01T10:00:00+02:00"
    assert as_date(" not a date") is None
    assert parse_header_property("header:X-A:asAddresses:all") == ("X-A", "Addresses", True)
    assert parse_header_property("header:X-A") == ("X-A", "Raw", False)
    assert parse_header_property("header:X-A:asNothing") is None


def _lists(message: bytes) -> tuple[list[str], list[str], list[str]]:
    summary = build_summary(message)
    view = BodyView(1, summary, lambda o, n: message[o : o + n], ["type"])
    text, html, attachments = view.lists()
    return (
        [view.part(p)["type"] for p in text],
        [view.part(p)["type"] for p in html],
        [view.part(p)["type"] for p in attachments],
    )


def test_text_html_and_attachments_as_rfc_8621_sorts_them() -> None:
    alternative = (
        b'Content-Type: multipart/mixed; boundary="m"\r\n\r\n--m\r\n'
        b'Content-Type: multipart/alternative; boundary="a"\r\n\r\n'
        b"--a\r\nContent-Type: text/plain\r\n\r\nplain\r\n"
        b"--a\r\nContent-Type: text/html\r\n\r\n<b>html</b>\r\n--a--\r\n"
        b"--m\r\nContent-Type: image/png\r\nContent-Disposition: attachment\r\n\r\nPNG\r\n--m--\r\n"
    )
    assert _lists(alternative) == (["text/plain"], ["text/html"], ["image/png"])
    plain = b"Content-Type: text/plain\r\n\r\nhello\r\n"
    assert _lists(plain) == (["text/plain"], ["text/plain"], [])
    inline_image = (
        b'Content-Type: multipart/mixed; boundary="m"\r\n\r\n--m\r\n'
        b"Content-Type: text/plain\r\n\r\nsee\r\n"
        b"--m\r\nContent-Type: image/jpeg\r\n\r\nJPG\r\n--m--\r\n"
    )
    assert _lists(inline_image) == (
        ["text/plain", "image/jpeg"],
        ["text/plain", "image/jpeg"],
        [],
    )


def test_states_and_changes_inputs_on_a_real_store(tmp_path: Path) -> None:
    store = MailboxStore(tmp_path / "mailbox")
    try:
        user = "u@example.test"
        message = b"Subject: s\r\n\r\nbody\r\n"
        store.apply([deliver(prepare_delivery(user, message)) for _ in range(3)])
        views = Views(store)
        first = views.snapshot(user)
        assert len(first.emails) == 3
        assert parse_email_state(first.state) is not None
        assert views.snapshot(user) is first  # nothing changed: the cached snapshot
        inbox = store.mailbox(user, "INBOX")
        assert inbox is not None
        contents = sorted(first.emails)
        store.apply([expunge(user, "INBOX", [1])])
        store.apply([move_messages(user, "INBOX", "Trash", [2])])
        assert store.expunged_contents_since(inbox.id, inbox.highestmodseq) == contents[:2]
        second = views.snapshot(user)
        assert (
            second.state != first.state == email_state([i for i in first.infos])
        )  # the state is made of the mailbox records
        moved = second.emails[contents[1]]
        trash = store.mailbox(user, "Trash")
        assert trash is not None and moved.places == {trash.id: 1}
        assert contents[0] not in second.emails
    finally:
        store.close()


def test_snapshots_patched_incrementally_match_a_fresh_read(tmp_path: Path) -> None:
    store = MailboxStore(tmp_path / "mailbox")
    try:
        user = "p@example.test"
        store.apply(
            [deliver(prepare_delivery(user, b"Subject: %d\r\n\r\nx\r\n" % i)) for i in range(20)]
        )
        views = Views(store)
        views.snapshot(user)  # cached columns, patched from here on
        store.apply(
            [
                set_flags(user, "INBOX", [3, 4], ["\\Seen", "Custom"], "add"),
                expunge(user, "INBOX", [5, 19]),
                move_messages(user, "INBOX", "Archive", [7]),
                copy_messages(user, "INBOX", "Trash", [8]),
                deliver(prepare_delivery(user, b"Subject: new\r\n\r\nx\r\n")),
            ]
        )
        patched = views.snapshot(user).emails
        fresh = Views(store).snapshot(user).emails
        assert sorted(patched) == sorted(fresh) and len(patched) == 19
        for content in fresh:
            assert patched[content] == fresh[content]
        trash = store.mailbox(user, "Trash")
        [copied] = [e for e in fresh.values() if len(e.places) == 2]  # in INBOX and Trash
        assert trash is not None and trash.id in copied.places
    finally:
        store.close()
