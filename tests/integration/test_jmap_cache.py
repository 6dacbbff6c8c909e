"""What the JMAP request path remembers per worker process, against a real `tachymail
serve` (mx and http listeners, mail delivered over SMTP): the Email properties made from
a message's octets (from, subject, preview, hasAttachment...) served again from the cache
must be what the message says, keywords must follow changes at once, a cached message
stays invisible to users who do not have it, and a remembered Basic login ends with a
password change."""

from __future__ import annotations

import base64
import json
import smtplib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from server import Server, running_server, wait_until
from tachymail.auth.users import UsersFile

requests = pytest.importorskip("requests")

DOMAIN = "example.test"
PASSWORD = "cache pass"
USING = ["urn:ietf:params:jmap:core", "urn:ietf:params:jmap:mail"]
LIST_PROPERTIES = [
    "id", "threadId", "mailboxIds", "keywords", "size", "receivedAt", "from", "subject",
    "preview", "hasAttachment",
]  # fmt: skip


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp_path = tmp_path_factory.mktemp("jmap-cache")
    extra = (
        f'[policy]\nlocal_domains = ["{DOMAIN}"]\n[auth]\nfailure_delay = 0.1\n'
        '[delivery]\nresolver = "127.0.0.1:9"\n'
    )
    with running_server(tmp_path, extra, roles=("mx", "http"), hold=False) as srv:
        yield srv


def make_user(server: Server, name: str) -> str:
    user = f"{name}@{DOMAIN}"
    UsersFile(server.data_dir / "users").add(user, PASSWORD)
    return user


def basic(user: str, password: str = PASSWORD) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def base(server: Server) -> str:
    return f"http://127.0.0.1:{server.ports['http']}"


def call(server: Server, user: str, calls: list[Any]) -> list[Any]:
    reply = requests.post(
        f"{base(server)}/jmap/api",
        headers=basic(user),
        data=json.dumps({"using": USING, "methodCalls": calls}),
        timeout=30,
    )
    assert reply.status_code == 200, reply.text
    responses: list[Any] = reply.json()["methodResponses"]
    return responses


def account_of(server: Server, user: str) -> str:
    reply = requests.get(f"{base(server)}/.well-known/jmap", headers=basic(user), timeout=30)
    assert reply.status_code == 200, reply.text
    found: str = reply.json()["primaryAccounts"]["urn:ietf:params:jmap:mail"]
    return found


def send(server: Server, recipients: list[str], message: str) -> None:
    with smtplib.SMTP("127.0.0.1", server.ports["mx"], timeout=30) as smtp:
        smtp.sendmail("alice@example.org", recipients, message.encode())


def page(server: Server, user: str, account: str) -> list[dict[str, Any]]:
    """The webmail's first page: Email/query by receivedAt and Email/get of its ids."""
    responses = call(
        server,
        user,
        [
            [
                "Email/query",
                {"accountId": account, "sort": [{"property": "receivedAt", "isAscending": False}]},
                "q",
            ],
            [
                "Email/get",
                {
                    "accountId": account,
                    "#ids": {"resultOf": "q", "name": "Email/query", "path": "/ids"},
                    "properties": LIST_PROPERTIES,
                },
                "g",
            ],
        ],
    )
    assert responses[1][0] == "Email/get", responses
    emails: list[dict[str, Any]] = responses[1][1]["list"]
    return emails


PLAIN = (
    "From: Alice Example <alice@example.org>\r\nTo: {to}\r\nSubject: Plain one\r\n"
    "Message-ID: <plain-one@example.org>\r\n\r\n"
    "Hello   there,\r\n\r\n\t  how are\r\n you?\r\n"
)
ENCODED = (
    "From: =?utf-8?q?J=C3=BCrgen?= <juergen@example.org>\r\nTo: {to}\r\n"
    "Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\nMessage-ID: <encoded@example.org>\r\n"
    "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
    "Content-Transfer-Encoding: quoted-printable\r\n\r\n"
    "Gr=C3=BC=C3=9Fe aus =\r\nK=C3=B6ln\r\n"
)
ATTACHED = (
    "From: bob@example.org\r\nTo: {to}\r\nSubject: With a file\r\n"
    "Message-ID: <attached@example.org>\r\nMIME-Version: 1.0\r\n"
    'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
    "--b\r\nContent-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n\r\n"
    + base64.encodebytes(("see the file " * 40).encode()).decode().replace("\n", "\r\n")
    + "--b\r\nContent-Type: application/octet-stream\r\n"
    'Content-Disposition: attachment; filename="a.bin"\r\n'
    "Content-Transfer-Encoding: base64\r\n\r\nAAECAw==\r\n--b--\r\n"
)


def test_list_pages_from_the_cache_say_what_the_messages_say(server: Server) -> None:
    user, other = make_user(server, "pages"), make_user(server, "other")
    account = account_of(server, user)
    for template in (PLAIN, ENCODED, ATTACHED):
        send(server, [user], template.format(to=user))
    wait_until(lambda: len(page(server, user, account)) == 3, timeout=30)
    first = page(server, user, account)  # made from the summaries, then kept
    by_subject = {email["subject"]: email for email in first}
    assert set(by_subject) == {"Plain one", "Grüße", "With a file"}
    plain, encoded, attached = (by_subject[s] for s in ("Plain one", "Grüße", "With a file"))
    assert plain["preview"] == "Hello there, how are you?"
    assert plain["from"] == [{"name": "Alice Example", "email": "alice@example.org"}]
    assert encoded["preview"] == "Grüße aus Köln"
    assert encoded["from"] == [{"name": "Jürgen", "email": "juergen@example.org"}]
    assert attached["preview"] == ("see the file " * 40).strip()[:256]
    assert [e["hasAttachment"] for e in (plain, encoded, attached)] == [False, False, True]
    assert page(server, user, account) == first  # served again: the same answer

    # every property at once (the cached ones beside the body values made now)
    [[name, got, _]] = call(
        server,
        user,
        [
            [
                "Email/get",
                {
                    "accountId": account,
                    "ids": [encoded["id"]],
                    "properties": None,
                    "fetchTextBodyValues": True,
                },
                "a",
            ]
        ],
    )
    assert name == "Email/get"
    [full] = got["list"]
    assert full["subject"] == "Grüße" and full["preview"] == "Grüße aus Köln"
    assert full["from"] == encoded["from"] and full["hasAttachment"] is False
    assert full["messageId"] == ["encoded@example.org"]
    assert [v["value"] for v in full["bodyValues"].values()] == ["Grüße aus Köln\n"]

    # keywords are never cached: a change shows in the next page
    [[name, _set, _]] = call(
        server,
        user,
        [
            [
                "Email/set",
                {"accountId": account, "update": {plain["id"]: {"keywords/$seen": True}}},
                "s",
            ]
        ],
    )
    assert name == "Email/set" and plain["id"] in _set["updated"]
    after = {email["id"]: email for email in page(server, user, account)}
    assert after[plain["id"]]["keywords"] == {"$seen": True}
    assert after[plain["id"]]["preview"] == plain["preview"]
    assert after[encoded["id"]] == encoded

    # a message in the cache is still only its owners': another user cannot get it
    other_account = account_of(server, other)
    [[name, theirs, _]] = call(
        server,
        other,
        [["Email/get", {"accountId": other_account, "ids": [plain["id"]]}, "o"]],
    )
    assert name == "Email/get" and theirs["list"] == [] and theirs["notFound"] == [plain["id"]]


def test_a_remembered_basic_login_ends_with_a_password_change(server: Server) -> None:
    user = make_user(server, "changer")
    url = f"{base(server)}/.well-known/jmap"
    assert requests.get(url, headers=basic(user), timeout=30).status_code == 200
    assert requests.get(url, headers=basic(user), timeout=30).status_code == 200  # remembered
    assert requests.get(url, headers=basic(user, "wrong"), timeout=30).status_code == 401
    assert UsersFile(server.data_dir / "users").passwd(user, "a new one")
    refused = requests.get(url, headers=basic(user), timeout=30)
    assert refused.status_code == 401, refused.text
    assert requests.get(url, headers=basic(user, "a new one"), timeout=30).status_code == 200
