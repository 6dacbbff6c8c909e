"""RFC 8621 details of the JMAP server against a real `tachymail serve` (two worker
processes, so that successive requests land in either): EmailSubmission records (/get,
/changes, /query, /queryChanges, /set update and destroy, the retention bound, the
delivery status read from the queue while a recipient is deferred and another bounced),
Mailbox totalThreads/unreadThreads over a conversation in two mailboxes and the Trash,
Thread/changes for replies and expunges, and DKIM-signed vacation replies checked with
dkimpy against the key the test made. Submissions and vacation replies go to a scripted
SMTP peer (tests/smtp_peer.py) that keeps every message whole."""

from __future__ import annotations

import base64
import json
import smtplib
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eventsource import EventStream
from server import Server, running_server, wait_until
from smtp_peer import Script, SmtpPeer
from tachymail.auth.users import UsersFile
from tachymail.mailauth.dkim import keygen

requests = pytest.importorskip("requests")
dkim = pytest.importorskip("dkim")

DOMAIN = "example.test"
PASSWORD = "rfc pass"
SELECTOR = "jm"
CORE = "urn:ietf:params:jmap:core"
MAIL = "urn:ietf:params:jmap:mail"
SUBMISSION = "urn:ietf:params:jmap:submission"
VACATION = "urn:ietf:params:jmap:vacationresponse"
USING = [CORE, MAIL, SUBMISSION]
#: EmailSubmission records kept per user in this server (the retention bound under test)
KEEP = 3


class Env:
    def __init__(self, server: Server, peer: SmtpPeer, txt: bytes) -> None:
        self.server = server
        self.peer = peer
        self.txt = txt  # the DKIM key record DNS would publish
        self.base = f"http://127.0.0.1:{server.ports['http']}"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp_path = tmp_path_factory.mktemp("rfc8621")
    data_dir = tmp_path / "data"
    record = keygen(data_dir, DOMAIN, SELECTOR)
    txt = "".join(record.split('"')[1::2]).encode()
    script = Script(
        rcpt={
            "later@dest.test": "451 4.3.0 Try again later",
            "nobody@dest.test": "550 5.1.1 No such user here",
        }
    )
    with SmtpPeer(script) as peer:
        extra = (
            f'[policy]\nlocal_domains = ["{DOMAIN}"]\n'
            f'[dkim]\ndomains = {{ "{DOMAIN}" = "{SELECTOR}" }}\n'
            f"[jmap]\nsubmission_records = {KEEP}\n"
            f'[delivery]\nresolver = "127.0.0.1:9"\n'
            f'[[route]]\ndomain = "dest.test"\nhost = "127.0.0.1:{peer.port}"\ntls = "none"\n'
        )
        roles = ("mx", "http", "lmtp")
        with running_server(
            tmp_path, extra, workers=2, roles=roles, data_dir=data_dir, hold=False
        ) as srv:
            yield Env(srv, peer, txt)


def make_user(env: Env, name: str) -> tuple[str, str]:
    """A new user and its account id."""
    user = f"{name}@{DOMAIN}"
    UsersFile(env.server.data_dir / "users").add(user, PASSWORD)
    reply = requests.get(f"{env.base}/.well-known/jmap", headers=auth(user), timeout=30)
    assert reply.status_code == 200, reply.text
    return user, reply.json()["primaryAccounts"][MAIL]


def auth(user: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{PASSWORD}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def call(env: Env, user: str, calls: list[Any], using: list[str] = USING) -> list[Any]:
    reply = requests.post(
        f"{env.base}/jmap/api",
        headers=auth(user),
        data=json.dumps({"using": using, "methodCalls": calls}),
        timeout=30,
    )
    assert reply.status_code == 200, reply.text
    responses: list[Any] = reply.json()["methodResponses"]
    return responses


def one(env: Env, user: str, name: str, args: dict[str, Any], using: list[str] = USING) -> Any:
    [response] = call(env, user, [[name, args, "c0"]], using)
    assert response[0] == name, response
    return response[1]


def error(env: Env, user: str, name: str, args: dict[str, Any]) -> str:
    [response] = call(env, user, [[name, args, "c0"]])
    assert response[0] == "error", response
    return str(response[1]["type"])


def roles(env: Env, user: str, account: str) -> dict[str, str]:
    boxes = one(env, user, "Mailbox/get", {"accountId": account})["list"]
    return {b["role"] or b["name"]: b["id"] for b in boxes}


def deliver(env: Env, user: str, ident: str, parent: str = "", lmtp: bool = False) -> None:
    """A message from outside, by SMTP (or LMTP), with Message-ID <ident> and, as a reply,
    In-Reply-To <parent>."""
    reply = f"In-Reply-To: <{parent}>\r\n" if parent else ""
    data = (
        f"From: Friend <friend@dest.test>\r\nTo: {user}\r\nSubject: about {ident}\r\n"
        f"Message-ID: <{ident}>\r\n{reply}\r\nHello.\r\n"
    ).encode()
    client = (
        smtplib.LMTP("127.0.0.1", env.server.ports["lmtp"], timeout=30)
        if lmtp
        else smtplib.SMTP("127.0.0.1", env.server.ports["mx"], timeout=30)
    )
    with client:
        client.sendmail("friend@dest.test", [user], data)


def emails_by_subject(env: Env, user: str, account: str, count: int) -> dict[str, Any]:
    """Wait for *count* emails; subject -> the email (id, threadId, mailboxIds, keywords)."""
    found: list[str] = []

    def enough() -> bool:
        nonlocal found
        found = one(env, user, "Email/query", {"accountId": account})["ids"]
        return len(found) >= count

    wait_until(enough, timeout=30)
    props = ["subject", "threadId", "mailboxIds", "keywords"]
    listed = one(env, user, "Email/get", {"accountId": account, "ids": found, "properties": props})
    return {e["subject"]: e for e in listed["list"]}


def draft(user: str, drafts: str, subject: str, to: list[str]) -> dict[str, Any]:
    return {
        "mailboxIds": {drafts: True},
        "keywords": {"$draft": True, "$seen": True},
        "from": [{"name": None, "email": user}],
        "to": [{"name": None, "email": address} for address in to],
        "subject": subject,
        "textBody": [{"partId": "t", "type": "text/plain"}],
        "bodyValues": {"t": {"value": f"{subject}\n"}},
    }


def submit(
    env: Env, user: str, account: str, subject: str, to: list[str], **extra: Any
) -> list[Any]:
    """Create a draft and submit it in one request; the responses."""
    drafts = roles(env, user, account)["drafts"]
    return call(
        env,
        user,
        [
            [
                "Email/set",
                {"accountId": account, "create": {"d": draft(user, drafts, subject, to)}},
                "0",
            ],
            [
                "EmailSubmission/set",
                {
                    "accountId": account,
                    "create": {"s": {"identityId": "i0", "emailId": "#d"}},
                    **extra,
                },
                "1",
            ],
        ],
    )


def test_email_submissions_are_kept_queried_and_changed(env: Env) -> None:
    user, account = make_user(env, "sender")
    empty = one(env, user, "EmailSubmission/get", {"accountId": account, "ids": None})
    assert empty["list"] == [] and empty["state"] == "0"
    first = submit(
        env, user, account, "First", ["ok@dest.test", "later@dest.test", "nobody@dest.test"]
    )
    created = first[1][1]["created"]["s"]
    sub1 = created["id"]
    email1 = first[0][1]["created"]["d"]["id"]
    assert created["undoStatus"] == "final" and created["dsnBlobIds"] == []
    # the record: every property, from any worker process
    [got] = one(env, user, "EmailSubmission/get", {"accountId": account, "ids": [sub1]})["list"]
    thread1 = first[0][1]["created"]["d"]["threadId"]
    assert got["identityId"] == "i0" and got["emailId"] == email1
    assert got["threadId"] == thread1
    assert got["envelope"]["mailFrom"]["email"] == user
    assert [r["email"] for r in got["envelope"]["rcptTo"]] == [
        "ok@dest.test", "later@dest.test", "nobody@dest.test"
    ]  # fmt: skip
    assert got["undoStatus"] == "final" and got["mdnBlobIds"] == []
    assert got["sendAt"].endswith("Z")
    # deliveryStatus from the queue: relayed (unknown further on), deferred, bounced
    status: dict[str, Any] = {}

    def attempted() -> bool:
        nonlocal status
        listed = one(
            env,
            user,
            "EmailSubmission/get",
            {"accountId": account, "ids": [sub1], "properties": ["deliveryStatus"]},
        )["list"]
        status = listed[0]["deliveryStatus"]
        return all(
            s["smtpReply"][:1] in "45" or s["delivered"] != "queued" for s in status.values()
        )

    wait_until(attempted, timeout=60)
    assert status["ok@dest.test"]["delivered"] == "unknown"
    assert status["ok@dest.test"]["smtpReply"].startswith("250")
    assert status["later@dest.test"]["delivered"] == "queued"
    assert status["later@dest.test"]["smtpReply"].startswith("451 4.3.0 Try again later")
    assert status["nobody@dest.test"]["delivered"] == "no"
    assert status["nobody@dest.test"]["smtpReply"].startswith("550 5.1.1 No such user here")
    assert all(s["displayed"] == "unknown" for s in status.values())
    state1 = one(env, user, "EmailSubmission/get", {"accountId": account, "ids": []})["state"]
    changes = one(env, user, "EmailSubmission/changes", {"accountId": account, "sinceState": "0"})
    assert changes["created"] == [sub1] and changes["newState"] == state1
    assert changes["updated"] == [] and changes["destroyed"] == []
    # a second one, whose draft goes away on success (#creation id reference)
    second = submit(env, user, account, "Second", ["ok@dest.test"], onSuccessDestroyEmail=["#s"])
    sub2 = second[1][1]["created"]["s"]["id"]
    email2 = second[0][1]["created"]["d"]["id"]
    assert second[2][0] == "Email/set" and second[2][1]["destroyed"] == [email2], second
    gone = one(env, user, "Email/get", {"accountId": account, "ids": [email2]})
    assert gone["notFound"] == [email2]

    # /query: filters, sorts, paging
    def query(**args: Any) -> Any:
        return one(env, user, "EmailSubmission/query", {"accountId": account, **args})

    assert query()["ids"] == [sub1, sub2]
    assert query(sort=[{"property": "sentAt", "isAscending": False}])["ids"] == [sub2, sub1]
    assert query(filter={"emailIds": [email1]})["ids"] == [sub1]
    assert query(filter={"threadIds": [thread1]})["ids"] == [sub1]
    assert query(filter={"identityIds": ["i0"]}, calculateTotal=True)["total"] == 2
    assert query(filter={"undoStatus": "pending"})["ids"] == []
    assert query(filter={"operator": "NOT", "conditions": [{"emailIds": [email1]}]})["ids"] == [
        sub2
    ]
    assert query(filter={"after": "2000-01-01T00:00:00Z", "before": "2999-01-01T00:00:00Z"})[
        "ids"
    ] == [sub1, sub2]
    assert query(filter={"before": "2000-01-01T00:00:00Z"})["ids"] == []
    assert query(position=1, limit=5)["ids"] == [sub2]
    assert query(anchor=sub2, anchorOffset=-1, limit=1)["ids"] == [sub1]
    assert error(env, user, "EmailSubmission/query", {"accountId": account, "anchor": "x"}) == (
        "anchorNotFound"
    )
    assert (
        error(
            env, user, "EmailSubmission/query", {"accountId": account, "sort": [{"property": "to"}]}
        )
        == "unsupportedSort"
    )
    assert (
        error(
            env, user, "EmailSubmission/query", {"accountId": account, "filter": {"subject": "x"}}
        )
        == "unsupportedFilter"
    )
    changed = one(
        env,
        user,
        "EmailSubmission/queryChanges",
        {"accountId": account, "sinceQueryState": state1},
    )
    assert changed["removed"] == [sub2] and changed["added"] == [{"id": sub2, "index": 1}]
    # /set: nothing can be unsent; the properties are immutable; destroy drops the record
    state2 = query()["queryState"]
    assert (
        error(
            env,
            user,
            "EmailSubmission/set",
            {"accountId": account, "ifInState": state1, "destroy": [sub1]},
        )
        == "stateMismatch"
    )
    done = one(
        env,
        user,
        "EmailSubmission/set",
        {
            "accountId": account,
            "ifInState": state2,
            "update": {
                sub1: {"undoStatus": "canceled"},
                sub2: {"emailId": email1},
                "nope": {"undoStatus": "canceled"},
            },
            "destroy": [sub1, "nope"],
        },
    )
    assert done["oldState"] == state2 and done["newState"] != state2
    assert done["notUpdated"][sub1]["type"] == "cannotUnsend"
    assert done["notUpdated"][sub2] == {"type": "invalidProperties", "properties": ["emailId"]}
    assert done["notUpdated"]["nope"]["type"] == "notFound"
    assert done["destroyed"] == [sub1] and done["notDestroyed"]["nope"]["type"] == "notFound"
    listed = one(env, user, "EmailSubmission/get", {"accountId": account, "ids": [sub1, sub2]})
    assert [s["id"] for s in listed["list"]] == [sub2] and listed["notFound"] == [sub1]
    changes = one(
        env, user, "EmailSubmission/changes", {"accountId": account, "sinceState": state2}
    )
    assert changes["destroyed"] == [sub1] and changes["created"] == []
    # the retention bound: KEEP records per user, the oldest go (and /changes says so)
    more = [
        submit(env, user, account, f"More {n}", ["ok@dest.test"])[1][1]["created"]["s"]["id"]
        for n in range(KEEP)
    ]
    assert query()["ids"] == more
    changes = one(
        env, user, "EmailSubmission/changes", {"accountId": account, "sinceState": state2}
    )
    assert set(changes["destroyed"]) == {sub1, sub2} and changes["created"] == more
    paged = one(
        env,
        user,
        "EmailSubmission/changes",
        {"accountId": account, "sinceState": state2, "maxChanges": 1},
    )
    assert paged["hasMoreChanges"] and paged["destroyed"] == [sub1] and paged["created"] == []
    assert (
        error(env, user, "EmailSubmission/changes", {"accountId": account, "sinceState": "999"})
        == "cannotCalculateChanges"
    )
    # every message reaches the peer: the records changed nothing of the sending. Delivery
    # runs after the submission is kept, so the last ones may still be on their way.
    sent = {b"First", b"Second", *(f"More {n}".encode() for n in range(KEEP))}

    def subjects() -> set[bytes]:
        return {m.content.split(b"Subject: ")[1].split(b"\r\n")[0] for m in env.peer.messages}

    wait_until(lambda: sent <= subjects(), timeout=60)


def test_push_tells_the_new_email_submission_state(env: Env) -> None:
    """An EventSource client asking for EmailSubmission gets the state at connection, then
    the new one when a submission (made in either worker process) is kept."""
    user, account = make_user(env, "pushed")
    authorization = auth(user)["Authorization"]
    with EventStream(env.server.ports["http"], authorization, "EmailSubmission") as stream:
        wait_until(lambda: len(stream.events) >= 1, timeout=30)
        assert stream.events[0][1]["changed"][account] == {"EmailSubmission": "0"}
        created = submit(env, user, account, "Pushed", ["ok@dest.test"])[1][1]["created"]
        assert "s" in created, created
        wait_until(lambda: len(stream.events) >= 2, timeout=30)
        state = one(env, user, "EmailSubmission/get", {"accountId": account, "ids": []})["state"]
        assert state != "0"
        assert stream.events[1][1]["changed"][account] == {"EmailSubmission": state}


def test_mailbox_thread_counts_over_two_mailboxes_and_the_trash(env: Env) -> None:
    """totalThreads/unreadThreads from the thread index, RFC 8621 §2's way: a thread
    counts as unread in every mailbox it has an email in when any of its emails (outside
    the Trash) is unread; the Trash counts only its own."""
    user, account = make_user(env, "counts")
    deliver(env, user, "root@dest.test")
    emails_by_subject(env, user, account, 1)
    deliver(env, user, "reply@dest.test", "root@dest.test")
    deliver(env, user, "other@dest.test")
    deliver(env, user, "second@dest.test", "root@dest.test")
    emails = emails_by_subject(env, user, account, 4)
    root, reply = emails["about root@dest.test"], emails["about reply@dest.test"]
    other, second = emails["about other@dest.test"], emails["about second@dest.test"]
    assert root["threadId"] == reply["threadId"] == second["threadId"] != other["threadId"]
    box = roles(env, user, account)

    def counts() -> dict[str, tuple[int, int, int, int]]:
        listed = one(env, user, "Mailbox/get", {"accountId": account})["list"]
        found = {
            b["role"] or b["name"]: (
                b["totalEmails"], b["unreadEmails"], b["totalThreads"], b["unreadThreads"]
            )
            for b in listed
        }  # fmt: skip
        return {name: value for name, value in found.items() if any(value)}

    def update(changes: dict[str, Any]) -> None:
        done = one(env, user, "Email/set", {"accountId": account, "update": changes})
        assert set(done["updated"]) == set(changes), done

    assert counts() == {"inbox": (4, 4, 2, 2)}
    # the reply moves to Archive, the root and the second reply are read
    update(
        {
            reply["id"]: {"mailboxIds": {box["archive"]: True}},
            root["id"]: {"keywords/$seen": True},
            second["id"]: {"keywords/$seen": True},
        }
    )
    assert counts() == {"inbox": (3, 1, 2, 2), "archive": (1, 1, 1, 1)}
    update({other["id"]: {"keywords/$seen": True}})
    assert counts() == {"inbox": (3, 0, 2, 1), "archive": (1, 1, 1, 1)}
    # the unread reply goes to the Trash: INBOX no longer counts it, the Trash does
    update({reply["id"]: {"mailboxIds": {box["trash"]: True}}})
    assert counts() == {"inbox": (3, 0, 2, 0), "trash": (1, 1, 1, 1)}
    # read in the Trash: a change there changes nothing of INBOX's own emails, but
    # Mailbox/changes reports INBOX too (its thread counts may have moved); not the
    # empty Archive
    before = one(env, user, "Mailbox/get", {"accountId": account, "ids": []})["state"]
    update({reply["id"]: {"keywords/$seen": True}})
    assert counts() == {"inbox": (3, 0, 2, 0), "trash": (1, 0, 1, 0)}
    changes = one(env, user, "Mailbox/changes", {"accountId": account, "sinceState": before})
    assert {box["inbox"], box["trash"]} <= set(changes["updated"])
    assert box["archive"] not in changes["updated"]
    assert changes["updatedProperties"] == [
        "totalEmails", "unreadEmails", "totalThreads", "unreadThreads"
    ]  # fmt: skip
    # an unseen draft is not unread (RFC 8621 §2: neither $seen nor $draft)
    update({other["id"]: {"keywords/$seen": None}})
    assert counts() == {"inbox": (3, 1, 2, 1), "trash": (1, 0, 1, 0)}
    update({other["id"]: {"keywords/$draft": True}})
    assert counts() == {"inbox": (3, 0, 2, 0), "trash": (1, 0, 1, 0)}


def test_thread_changes_report_replies_and_expunges(env: Env) -> None:
    user, account = make_user(env, "threadchanges")

    def state() -> str:
        return str(one(env, user, "Thread/get", {"accountId": account, "ids": []})["state"])

    def changes(since: str) -> tuple[list[str], list[str], list[str]]:
        got = one(env, user, "Thread/changes", {"accountId": account, "sinceState": since})
        return got["created"], got["updated"], got["destroyed"]

    deliver(env, user, "start@dest.test")
    root = emails_by_subject(env, user, account, 1)["about start@dest.test"]
    thread = root["threadId"]
    s0 = state()
    deliver(env, user, "answer@dest.test", "start@dest.test")
    emails = emails_by_subject(env, user, account, 2)
    answer = emails["about answer@dest.test"]
    assert answer["threadId"] == thread
    assert changes(s0) == ([], [thread], [])  # a reply joined the thread: updated
    s1 = state()
    deliver(env, user, "alone@dest.test", lmtp=True)
    alone = emails_by_subject(env, user, account, 3)["about alone@dest.test"]
    assert changes(s1) == ([alone["threadId"]], [], [])
    s2 = state()
    # flags and moves change no Thread
    one(
        env,
        user,
        "Email/set",
        {"accountId": account, "update": {root["id"]: {"keywords/$flagged": True}}},
    )
    assert changes(s2) == ([], [], [])
    # the only email of a thread expunged: destroyed; one of two: updated
    done = one(
        env, user, "Email/set", {"accountId": account, "destroy": [alone["id"], answer["id"]]}
    )
    assert sorted(done["destroyed"]) == sorted([alone["id"], answer["id"]])
    assert changes(s2) == ([], [thread], [alone["threadId"]])
    # the lone thread was made and expunged since s1: the client never saw it
    assert changes(s1) == ([], [thread], [])
    # since s0, the answer and the lone one came and went: the root's thread has the
    # emailIds it had then, and the client never saw the other
    assert changes(s0) == ([], [], [])
    got = one(env, user, "Thread/get", {"accountId": account, "ids": [thread, alone["threadId"]]})
    assert got["list"] == [{"id": thread, "emailIds": [root["id"]]}]
    assert got["notFound"] == [alone["threadId"]]


def _dkim_verifies(env: Env, content: bytes) -> bool:
    def published(name: bytes, timeout: int = 5) -> bytes:
        assert name.rstrip(b".") == f"{SELECTOR}._domainkey.{DOMAIN}".encode()
        return env.txt

    return bool(dkim.verify(content, dnsfunc=published))


def test_vacation_replies_are_dkim_signed(env: Env) -> None:
    """A vacation reply (local delivery of an SMTP message, and LMTP) reaches the peer with
    a DKIM-Signature of the user's domain that dkimpy verifies with the key's record."""
    user, account = make_user(env, "holiday")
    now = time.time()
    window = {
        "isEnabled": True,
        "subject": "Away",
        "textBody": "Back soon.",
        "fromDate": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now - 3600)),
        "toDate": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now + 86400)),
    }
    done = one(
        env,
        user,
        "VacationResponse/set",
        {"accountId": account, "update": {"singleton": window}},
        [CORE, MAIL, VACATION],
    )
    assert "singleton" in done["updated"], done

    def replies() -> list[bytes]:
        return [
            m.content
            for m in env.peer.messages
            if m.sender == "" and f"From: <{user}>".encode() in m.content
        ]

    deliver(env, user, "note1@dest.test")
    wait_until(lambda: len(replies()) == 1, timeout=60)
    # LMTP: another sender (one reply per sender), the other path that queues replies
    data = (
        f"From: other@dest.test\r\nTo: {user}\r\nSubject: by lmtp\r\n"
        "Message-ID: <note2@dest.test>\r\n\r\nHi.\r\n"
    ).encode()
    with smtplib.LMTP("127.0.0.1", env.server.ports["lmtp"], timeout=30) as client:
        client.sendmail("other@dest.test", [user], data)
    wait_until(lambda: len(replies()) == 2, timeout=60)
    for content in replies():
        assert content.startswith(b"DKIM-Signature:") or b"\r\nDKIM-Signature:" in content
        signature = content.split(b"DKIM-Signature:")[1].split(b"\r\n\r\n")[0]
        assert f"d={DOMAIN};".encode() in signature.replace(b"\r\n ", b" ")
        assert b"Auto-Submitted: auto-replied" in content
        assert _dkim_verifies(env, content)
        # the same reply altered in transit fails: the check is a real one
        assert not _dkim_verifies(env, content.replace(b"Back soon.", b"Back later."))
