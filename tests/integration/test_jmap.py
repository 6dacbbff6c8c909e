"""JMAP (RFC 8620/8621) against a real `tachymail serve` with an http listener (plain, and
one with TLS for the jmapc client library), a local domain with users, an imap listener
for the cross-protocol checks, mail delivered over SMTP, and submissions routed to a
recording SMTP sink.

Covers: the session object and authentication (Basic, login token, 401 problem bodies);
jmapc's Mailbox/get, Email/query + Email/get and Email/set; raw JSON error cases
(notJSON, notRequest, unknownCapability, unknownMethod, invalidArguments, wrong types,
limits, result references, an oversize upload); IMAP <-> JMAP (flags set over IMAP show
in keywords and Email/changes, and the reverse); push (a StateChange within 100 ms of an
SMTP delivery); EmailSubmission reaching the SMTP peer, the sent email moved to Sent.
"""

from __future__ import annotations

import base64
import imaplib
import json
import smtplib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eventsource import EventStream
from recording_sink import RecordingSink, recording_sink
from server import Server, free_port, running_server, tachymail_cmd, wait_until
from tachymail.auth.users import UsersFile

requests = pytest.importorskip("requests")

DOMAIN = "example.test"
PASSWORD = "jmap pass"
CORE = "urn:ietf:params:jmap:core"
MAIL = "urn:ietf:params:jmap:mail"
SUBMISSION = "urn:ietf:params:jmap:submission"
USING = [CORE, MAIL]


class Env:
    def __init__(self, server: Server, sink: RecordingSink, tls_port: int) -> None:
        self.server = server
        self.sink = sink
        self.tls_port = tls_port
        self.base = f"http://127.0.0.1:{server.ports['http']}"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp_path = tmp_path_factory.mktemp("jmap")
    with recording_sink(tmp_path) as sink:
        tls_port = free_port()
        extra = (
            f'[policy]\nlocal_domains = ["{DOMAIN}"]\n[auth]\nfailure_delay = 0.2\n'
            f"[jmap]\nmax_size_request = 200000\nmax_size_upload = 100000\n"
            f"max_calls_in_request = 16\nmax_objects_in_get = 500\n"
            f'[delivery]\nresolver = "127.0.0.1:9"\n'
            f'[[route]]\ndomain = "dest.test"\nhost = "127.0.0.1:{sink.port}"\ntls = "none"\n\n'
            f'[[listener]]\naddress = "127.0.0.1:{tls_port}"\nrole = "http"\ntls = true\n'
            '[[body_check]]\npattern = "XYZZY-FORBIDDEN"\naction = "reject"\n'
            'text = "No magic words here"\n'
            "[[header_check]]\npattern = '^Subject: .*HOLD-ME'\naction = \"hold\"\n"
        )
        roles = ("mx", "imap", "http", "lmtp")
        with running_server(tmp_path, extra, roles=roles, hold=False) as srv:
            yield Env(srv, sink, tls_port)


def make_user(env: Env, name: str) -> str:
    user = f"{name}@{DOMAIN}"
    UsersFile(env.server.data_dir / "users").add(user, PASSWORD)
    return user


def basic(user: str, password: str = PASSWORD) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def send(
    env: Env, user: str, subject: str, body: str = "Hello there.\r\n", extra: str = ""
) -> None:
    data = (
        f"From: Alice Example <alice@example.org>\r\nTo: {user}\r\nSubject: {subject}\r\n"
        f"Message-ID: <{subject.replace(' ', '.')}@example.org>\r\n{extra}\r\n{body}"
    ).encode()
    with smtplib.SMTP("127.0.0.1", env.server.ports["mx"], timeout=30) as smtp:
        smtp.sendmail("alice@example.org", [user], data)


def session(env: Env, user: str) -> dict[str, Any]:
    reply = requests.get(f"{env.base}/.well-known/jmap", headers=basic(user), timeout=30)
    assert reply.status_code == 200, reply.text
    return reply.json()


def call(env: Env, user: str, calls: list[Any], using: list[str] = USING) -> list[Any]:
    reply = requests.post(
        f"{env.base}/jmap/api",
        headers=basic(user),
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


def inbox_emails(env: Env, user: str, account: str, count: int) -> list[dict[str, Any]]:
    """Wait for *count* emails in the user's mailboxes; them, newest first."""
    found: list[Any] = []

    def enough() -> bool:
        nonlocal found
        found = one(env, user, "Email/query", {"accountId": account})["ids"]
        return len(found) >= count

    wait_until(enough, timeout=30)
    return list(
        one(env, user, "Email/get", {"accountId": account, "ids": found, "properties": None})[
            "list"
        ]
    )


def raw_post(env: Env, user: str, body: bytes) -> requests.Response:
    return requests.post(f"{env.base}/jmap/api", headers=basic(user), data=body, timeout=30)


# --- session and authentication ------------------------------------------------------------


def test_session_object_and_authentication(env: Env) -> None:
    user = make_user(env, "sess")
    none = requests.get(f"{env.base}/.well-known/jmap", timeout=30)
    assert none.status_code == 401
    assert none.headers["Content-Type"].startswith("application/problem+json")
    assert none.json()["status"] == 401
    wrong = requests.get(f"{env.base}/.well-known/jmap", headers=basic(user, "nope"), timeout=30)
    assert wrong.status_code == 401 and "detail" in wrong.json()
    found = session(env, user)
    assert set(found["capabilities"]) >= {
        CORE, MAIL, SUBMISSION, "urn:ietf:params:jmap:vacationresponse"
    }  # fmt: skip
    assert found["apiUrl"].endswith("/jmap/api")
    assert found["uploadUrl"].endswith("/jmap/upload/{accountId}")
    assert "{blobId}" in found["downloadUrl"] and "{types}" in found["eventSourceUrl"]
    account = found["primaryAccounts"][MAIL]
    assert account in found["accounts"]
    assert found["capabilities"][CORE]["maxSizeRequest"] == 200000
    # the web page's login: a bearer token
    login = requests.post(
        f"{env.base}/jmap/login", json={"username": user, "password": PASSWORD}, timeout=30
    )
    assert login.status_code == 200
    token = login.json()["token"]
    assert login.json()["accountId"] == account
    bearer = requests.get(
        f"{env.base}/.well-known/jmap", headers={"Authorization": f"Bearer {token}"}, timeout=30
    )
    assert bearer.status_code == 200 and bearer.json()["username"] == user
    forged = requests.get(
        f"{env.base}/.well-known/jmap",
        headers={"Authorization": f"Bearer {token[:-2]}xx"},
        timeout=30,
    )
    assert forged.status_code == 401
    bad_login = requests.post(
        f"{env.base}/jmap/login", data={"username": user, "password": "no"}, timeout=30
    )
    assert bad_login.status_code == 401 and bad_login.json()["status"] == 401


# --- jmapc --------------------------------------------------------------------------------


def test_jmapc_mailboxes_query_get_and_set(env: Env) -> None:
    jmapc = pytest.importorskip("jmapc")
    from jmapc.methods import EmailGet, EmailQuery, EmailSet, MailboxGet

    user = make_user(env, "client")
    send(env, user, "first note", "One.\r\n")
    send(env, user, "second note", "Two.\r\n")
    account = session(env, user)["primaryAccounts"][MAIL]
    inbox_emails(env, user, account, 2)

    client = jmapc.Client.create_with_password(f"127.0.0.1:{env.tls_port}", user, PASSWORD)
    # the listener's certificate is self-signed: no verification, whatever the environment
    # says (REQUESTS_CA_BUNDLE would override a session's verify=False)
    client.requests_session.trust_env = False
    client.requests_session.verify = False
    import urllib3

    urllib3.disable_warnings()
    boxes = client.request(MailboxGet(ids=None), single_response=True, raise_errors=True)
    by_role = {box.role: box for box in boxes.data}
    assert {"inbox", "drafts", "sent", "trash", "junk", "archive"} <= set(by_role)
    inbox = by_role["inbox"]
    assert inbox.total_emails == 2 and inbox.unread_emails == 2

    from jmapc import Comparator, EmailQueryFilterCondition

    query = client.request(
        EmailQuery(
            filter=EmailQueryFilterCondition(in_mailbox=inbox.id),
            sort=[Comparator(property="receivedAt", is_ascending=False)],
            limit=50,
        ),
        single_response=True,
        raise_errors=True,
    )
    assert len(query.ids) == 2
    got = client.request(
        EmailGet(ids=query.ids, properties=["subject", "from", "keywords", "preview"]),
        single_response=True,
        raise_errors=True,
    )
    assert [e.subject for e in got.data] == ["second note", "first note"]
    assert got.data[0].mail_from[0].email == "alice@example.org"
    assert got.data[0].preview == "Two."
    updated = client.request(
        EmailSet(update={query.ids[0]: {"keywords/$seen": True}}),
        single_response=True,
        raise_errors=True,
    )
    assert query.ids[0] in (updated.updated or {})
    boxes = client.request(MailboxGet(ids=[inbox.id]), single_response=True, raise_errors=True)
    assert boxes.data[0].unread_emails == 1


# --- bodies, headers, search --------------------------------------------------------------


MULTIPART = (
    'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="b1"\r\n',
    '--b1\r\nContent-Type: multipart/alternative; boundary="b2"\r\n\r\n'
    "--b2\r\nContent-Type: text/plain; charset=iso-8859-1\r\n"
    "Content-Transfer-Encoding: quoted-printable\r\n\r\nGr=FC=DFe aus K=F6ln\r\n"
    "--b2\r\nContent-Type: text/html; charset=utf-8\r\n\r\n<p>Gr\xc3\xbc\xc3\x9fe</p>\r\n--b2--\r\n"
    '--b1\r\nContent-Type: application/pdf; name="report.pdf"\r\n'
    'Content-Disposition: attachment; filename="report.pdf"\r\n'
    "Content-Transfer-Encoding: base64\r\n\r\nJVBERi0xLjQK\r\n--b1--\r\n",
)


def test_email_get_bodies_headers_and_blob_download(env: Env) -> None:
    user = make_user(env, "bodies")
    data = (
        "From: =?utf-8?q?J=C3=BCrgen?= <j@example.org>\r\nTo: " + user + "\r\n"
        "Subject: =?iso-8859-1?q?Gr=FC=DFe?=\r\nMessage-ID: <multi@example.org>\r\n"
        "X-Custom: one\r\nX-Custom: two\r\n" + MULTIPART[0] + "\r\n" + MULTIPART[1]
    ).encode("latin-1")
    with smtplib.SMTP("127.0.0.1", env.server.ports["mx"], timeout=30) as smtp:
        smtp.sendmail("j@example.org", [user], data)
    account = session(env, user)["primaryAccounts"][MAIL]
    [email] = inbox_emails(env, user, account, 1)
    got = one(
        env,
        user,
        "Email/get",
        {
            "accountId": account,
            "ids": [email["id"]],
            "properties": [
                "subject",
                "from",
                "messageId",
                "textBody",
                "htmlBody",
                "attachments",
                "bodyValues",
                "hasAttachment",
                "bodyStructure",
                "header:X-Custom:all",
                "header:Subject:asText",
                "header:From:asAddresses",
                "preview",
            ],
            "fetchTextBodyValues": True,
            "fetchHTMLBodyValues": True,
            "maxBodyValueBytes": 8,
        },
    )["list"][0]
    assert got["subject"] == "Grüße" and got["header:Subject:asText"] == "Grüße"
    assert got["from"] == [{"name": "Jürgen", "email": "j@example.org"}]
    assert got["header:From:asAddresses"] == got["from"]
    assert got["messageId"] == ["multi@example.org"]
    assert got["header:X-Custom:all"] == [" one", " two"]
    assert [p["type"] for p in got["textBody"]] == ["text/plain"]
    assert [p["type"] for p in got["htmlBody"]] == ["text/html"]
    assert got["hasAttachment"] is True
    [pdf] = got["attachments"]
    assert pdf["name"] == "report.pdf" and pdf["type"] == "application/pdf"
    text_part = got["textBody"][0]["partId"]
    value = got["bodyValues"][text_part]
    assert value["value"] == "Grüße " and value["isTruncated"] is True  # 8 octets of UTF-8
    assert got["preview"] == "Grüße aus Köln"
    assert got["bodyStructure"]["type"] == "multipart/mixed"
    assert len(got["bodyStructure"]["subParts"]) == 2
    url = f"{env.base}/jmap/download/{account}/{pdf['blobId']}/report.pdf?type=application/pdf"
    download = requests.get(url, headers=basic(user), timeout=30)
    assert download.status_code == 200 and download.content == b"%PDF-1.4\n"
    assert download.headers["Content-Type"] == "application/pdf"
    # another user cannot read it
    other = make_user(env, "bodies-other")
    other_account = session(env, other)["primaryAccounts"][MAIL]
    url = f"{env.base}/jmap/download/{other_account}/{pdf['blobId']}/x?type=a/b"
    assert requests.get(url, headers=basic(other), timeout=30).status_code == 404


def test_email_query_filters_sorts_and_snippets(env: Env) -> None:
    user = make_user(env, "query")
    for subject, body in (("apples", "red fruit"), ("bananas", "yellow fruit"), ("cars", "fast")):
        send(env, user, subject, body + "\r\n")
    account = session(env, user)["primaryAccounts"][MAIL]
    emails = inbox_emails(env, user, account, 3)
    ids = {e["subject"]: e["id"] for e in emails}

    def query(**args: Any) -> list[str]:
        return list(one(env, user, "Email/query", {"accountId": account, **args})["ids"])

    assert query(filter={"body": "fruit"}, sort=[{"property": "subject", "isAscending": True}]) == [
        ids["apples"], ids["bananas"]
    ]  # fmt: skip
    assert query(filter={"subject": "car"}) == [ids["cars"]]
    assert query(filter={"from": "alice@example.org"}, limit=1, position=1) == [ids["bananas"]]
    assert query(filter={"operator": "NOT", "conditions": [{"text": "fruit"}]}) == [ids["cars"]]
    one(
        env,
        user,
        "Email/set",
        {"accountId": account, "update": {ids["cars"]: {"keywords": {"$flagged": True}}}},
    )
    assert query(filter={"hasKeyword": "$flagged"}) == [ids["cars"]]
    assert query(filter={"notKeyword": "$flagged"}, sort=[{"property": "subject"}]) == [
        ids["apples"], ids["bananas"]
    ]  # fmt: skip
    paged = one(
        env, user, "Email/query",
        {"accountId": account, "anchor": ids["bananas"], "limit": 1, "calculateTotal": True},
    )  # fmt: skip
    assert paged["total"] == 3 and paged["ids"] == [ids["bananas"]]
    snippets = one(
        env,
        user,
        "SearchSnippet/get",
        {"accountId": account, "filter": {"text": "yellow"}, "emailIds": [ids["bananas"]]},
    )["list"]
    assert snippets[0]["preview"] and "<mark>yellow</mark>" in snippets[0]["preview"]
    threads = one(env, user, "Thread/get", {"accountId": account, "ids": [emails[0]["threadId"]]})
    assert threads["list"][0]["emailIds"] == [emails[0]["id"]]


# --- errors -------------------------------------------------------------------------------


def test_request_level_errors_are_problem_details_never_500(env: Env) -> None:
    user = make_user(env, "errors")
    not_json = raw_post(env, user, b"{nope")
    assert not_json.status_code == 400
    assert not_json.json()["type"] == "urn:ietf:params:jmap:error:notJSON"
    for body in (b"[]", b'{"using": "x", "methodCalls": []}', b'{"using": [], "methodCalls": [1]}'):
        reply = raw_post(env, user, body)
        assert reply.status_code == 400
        assert reply.json()["type"] == "urn:ietf:params:jmap:error:notRequest"
    unknown = raw_post(env, user, json.dumps({"using": ["urn:x"], "methodCalls": []}).encode())
    assert unknown.json()["type"] == "urn:ietf:params:jmap:error:unknownCapability"
    calls = [["Core/echo", {}, str(i)] for i in range(17)]
    many = raw_post(env, user, json.dumps({"using": [CORE], "methodCalls": calls}).encode())
    assert many.status_code == 400
    assert many.json()["type"] == "urn:ietf:params:jmap:error:limit"
    assert many.json()["limit"] == "maxCallsInRequest"
    big = json.dumps({"using": [CORE], "methodCalls": [["Core/echo", {"x": "y" * 300000}, "0"]]})
    too_large = raw_post(env, user, big.encode())
    assert too_large.json()["type"] == "urn:ietf:params:jmap:error:limit"
    assert too_large.json()["limit"] == "maxSizeRequest"
    log = env.server.log()
    assert "Traceback" not in log


def test_method_level_errors_and_result_references(env: Env) -> None:
    user = make_user(env, "methods")
    send(env, user, "referenced")
    account = session(env, user)["primaryAccounts"][MAIL]
    inbox_emails(env, user, account, 1)
    responses = call(
        env,
        user,
        [
            ["Core/echo", {"hello": [1, 2]}, "echo"],
            ["Nope/get", {}, "unknown"],
            ["Email/get", {"accountId": "nobody", "ids": []}, "account"],
            ["Email/get", {"accountId": account, "ids": "not-a-list"}, "types"],
            ["Email/query", {"accountId": account, "limit": -1}, "negative"],
            ["Email/query", {"accountId": account, "sort": [{"property": "color"}]}, "sort"],
            ["Email/query", {"accountId": account, "filter": {"shoeSize": 3}}, "filter"],
            ["Email/query", {"accountId": account}, "q"],
            [
                "Email/get",
                {
                    "accountId": account,
                    "#ids": {"resultOf": "q", "name": "Email/query", "path": "/ids"},
                    "properties": ["subject", "threadId"],
                },
                "g",
            ],
            [
                "Thread/get",
                {
                    "accountId": account,
                    "#ids": {"resultOf": "g", "name": "Email/get", "path": "/list/*/threadId"},
                },
                "t",
            ],
            [
                "Email/get",
                {
                    "accountId": account,
                    "#ids": {"resultOf": "zz", "name": "Email/query", "path": "/ids"},
                },
                "badref",
            ],
            ["Email/get", {"accountId": account, "ids": ["e1"] * 501}, "toolarge"],
            ["Mailbox/get", {"accountId": account, "properties": ["colour"]}, "props"],
        ],
    )
    by_id = {r[2]: r for r in responses}
    assert by_id["echo"] == ["Core/echo", {"hello": [1, 2]}, "echo"]
    assert by_id["unknown"][1]["type"] == "unknownMethod"
    assert by_id["account"][1]["type"] == "accountNotFound"
    assert by_id["types"][1]["type"] == "invalidArguments"
    assert by_id["negative"][1]["type"] == "invalidArguments"
    assert by_id["sort"][1]["type"] == "unsupportedSort"
    assert by_id["filter"][1]["type"] == "unsupportedFilter"
    assert by_id["g"][1]["list"][0]["subject"] == "referenced"
    assert by_id["t"][1]["list"][0]["emailIds"] == by_id["q"][1]["ids"]
    assert by_id["badref"][1]["type"] == "invalidResultReference"
    assert by_id["toolarge"][1]["type"] == "requestTooLarge"
    assert by_id["props"][1]["type"] == "invalidArguments"
    state = by_id["g"][1]["state"]
    [mismatch] = call(
        env, user, [["Email/set", {"accountId": account, "ifInState": state + "x"}, "s"]]
    )
    assert mismatch[0] == "error" and mismatch[1]["type"] == "stateMismatch"
    # a raw header whose name is no field name (a space, a colon) is refused, not sent
    drafts = {
        b["role"]: b["id"] for b in one(env, user, "Mailbox/get", {"accountId": account})["list"]
    }
    made = one(
        env,
        user,
        "Email/set",
        {
            "accountId": account,
            "create": {
                name: {"mailboxIds": {drafts["drafts"]: True}, f"header:{name}": "v"}
                for name in ("X Bad", "X-Good")
            },
        },
    )
    assert made["notCreated"]["X Bad"]["type"] == "invalidProperties"
    assert set(made["created"]) == {"X-Good"}
    assert "Traceback" not in env.server.log()


def test_upload_limits_import_and_parse(env: Env) -> None:
    user = make_user(env, "upload")
    account = session(env, user)["primaryAccounts"][MAIL]
    url = f"{env.base}/jmap/upload/{account}"
    big = requests.post(url, headers=basic(user), data=b"x" * 100001, timeout=30)
    assert big.status_code == 413
    assert big.json()["type"] == "urn:ietf:params:jmap:error:limit"
    assert big.json()["limit"] == "maxSizeUpload"
    message = (
        f"From: bob@example.org\r\nTo: {user}\r\nSubject: imported\r\n"
        "Message-ID: <imported@example.org>\r\n\r\nImported body.\r\n"
    ).encode()
    uploaded = requests.post(
        url, headers={**basic(user), "Content-Type": "message/rfc822"}, data=message, timeout=30
    )
    assert uploaded.status_code == 201
    blob = uploaded.json()["blobId"]
    parsed = one(env, user, "Email/parse", {"accountId": account, "blobIds": [blob, "Unope"]})
    assert parsed["parsed"][blob]["subject"] == "imported"
    assert parsed["notFound"] == ["Unope"]
    boxes = one(env, user, "Mailbox/get", {"accountId": account})["list"]
    archive = next(b["id"] for b in boxes if b["role"] == "archive")
    imported = one(
        env,
        user,
        "Email/import",
        {
            "accountId": account,
            "emails": {
                "k1": {
                    "blobId": blob,
                    "mailboxIds": {archive: True},
                    "keywords": {"$seen": True},
                    "receivedAt": "2024-01-02T03:04:05Z",
                }
            },
        },
    )
    email_id = imported["created"]["k1"]["id"]
    got = one(
        env,
        user,
        "Email/get",
        {
            "accountId": account,
            "ids": [email_id],
            "properties": ["mailboxIds", "keywords", "receivedAt", "size"],
        },
    )["list"][0]
    assert got["mailboxIds"] == {archive: True}
    assert got["keywords"] == {"$seen": True}
    assert got["receivedAt"] == "2024-01-02T03:04:05Z"
    assert got["size"] == len(message)
    whole = requests.get(
        f"{env.base}/jmap/download/{account}/{imported['created']['k1']['blobId']}/m.eml",
        headers=basic(user),
        timeout=30,
    )
    assert whole.content == message


# --- cross-protocol -----------------------------------------------------------------------


def test_imap_and_jmap_see_the_same_flags_and_states(env: Env) -> None:
    user = make_user(env, "cross")
    send(env, user, "shared")
    account = session(env, user)["primaryAccounts"][MAIL]
    [email] = inbox_emails(env, user, account, 1)
    state = one(env, user, "Email/get", {"accountId": account, "ids": []})["state"]
    imap = imaplib.IMAP4("127.0.0.1", env.server.ports["imap"], timeout=30)
    try:
        imap.login(user, PASSWORD)
        imap.select("INBOX")
        typ, _ = imap.uid("STORE", "1", "+FLAGS", "(\\Seen $Important)")
        assert typ == "OK"
        changes = one(env, user, "Email/changes", {"accountId": account, "sinceState": state})
        assert changes["updated"] == [email["id"]] and changes["created"] == []
        assert changes["newState"] != state
        got = one(
            env,
            user,
            "Email/get",
            {"accountId": account, "ids": [email["id"]], "properties": ["keywords"]},
        )["list"][0]
        assert got["keywords"] == {"$seen": True, "$important": True}
        # the reverse: JMAP sets keywords, IMAP FETCH shows the flags
        one(
            env,
            user,
            "Email/set",
            {
                "accountId": account,
                "update": {email["id"]: {"keywords/$seen": None, "keywords/$flagged": True}},
            },
        )
        # no NOOP first: the FETCH itself answers with the flags JMAP just set
        typ, data = imap.uid("FETCH", "1", "(FLAGS)")
        assert typ == "OK" and data and data[0] is not None
        for flags in map(str, data):  # every FETCH response of it, none with the old flags
            assert "\\Flagged" in flags and "\\Seen" not in flags and "$Important" in flags
        # a move over JMAP is a move in IMAP; Email/changes reports it as an update
        state = one(env, user, "Email/get", {"accountId": account, "ids": []})["state"]
        boxes = one(env, user, "Mailbox/get", {"accountId": account})["list"]
        trash = next(b["id"] for b in boxes if b["role"] == "trash")
        one(
            env,
            user,
            "Email/set",
            {"accountId": account, "update": {email["id"]: {"mailboxIds": {trash: True}}}},
        )
        typ, data = imap.uid("SEARCH", "ALL")  # a UID command may announce the expunge
        assert data[0] == b""
        imap.select("Trash")
        typ, data = imap.uid("FETCH", "1:*", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        assert b"shared" in data[0][1]
        changes = one(env, user, "Email/changes", {"accountId": account, "sinceState": state})
        assert changes["updated"] == [email["id"]] and changes["destroyed"] == []
        # an IMAP expunge destroys it
        state = changes["newState"]
        imap.uid("STORE", "1:*", "+FLAGS", "(\\Deleted)")
        imap.expunge()
        changes = one(env, user, "Email/changes", {"accountId": account, "sinceState": state})
        assert changes["destroyed"] == [email["id"]]
        # new mail shows as created
        send(env, user, "newer")
        wait_until(
            lambda: one(
                env,
                user,
                "Email/changes",
                {"accountId": account, "sinceState": changes["newState"]},
            )["created"],
            timeout=30,
        )
    finally:
        imap.logout()


# --- push ---------------------------------------------------------------------------------


def test_push_state_change_within_100ms_of_smtp_delivery(env: Env) -> None:
    user = make_user(env, "push")
    send(env, user, "before push")
    account = session(env, user)["primaryAccounts"][MAIL]
    inbox_emails(env, user, account, 1)
    with EventStream(env.server.ports["http"], basic(user)["Authorization"]) as stream:
        events = stream.events
        wait_until(lambda: len(events) >= 1, timeout=30)  # the state at connection
        first = events[0][1]["changed"][account]
        assert {"Email", "Mailbox"} <= set(first)
        # the delivery is committed when the LMTP/SMTP side is done: measure from the
        # moment the new email is visible in the store, not from the SMTP 250 (the
        # queue's delivery worker runs it a moment later)
        from tachymail.mailbox import MailboxStore

        store = MailboxStore(env.server.data_dir / "mailbox", readonly=True)
        try:
            before = len(store.messages(user))
            send(env, user, "pushed")
            deadline = time.monotonic() + 30
            while len(store.messages(user)) == before and time.monotonic() < deadline:
                time.sleep(0.002)
            visible = time.monotonic()
        finally:
            store.close()
        wait_until(lambda: len(events) >= 2, timeout=30)
        arrived, event = events[1]
        assert event["@type"] == "StateChange"
        assert "Email" in event["changed"][account]
        assert arrived - visible < 0.1, f"push after {arrived - visible:.3f} s"
        assert (
            event["changed"][account]["Email"]
            == one(env, user, "Email/get", {"accountId": account, "ids": []})["state"]
        )


# --- submission ---------------------------------------------------------------------------


def test_email_submission_reaches_the_smtp_peer_and_moves_to_sent(env: Env) -> None:
    user = make_user(env, "sender")
    account = session(env, user)["primaryAccounts"][MAIL]
    boxes = one(env, user, "Mailbox/get", {"accountId": account})["list"]
    role = {b["role"]: b["id"] for b in boxes}
    responses = call(
        env,
        user,
        [
            [
                "Email/set",
                {
                    "accountId": account,
                    "create": {
                        "draft": {
                            "mailboxIds": {role["drafts"]: True},
                            "keywords": {"$draft": True, "$seen": True},
                            "from": [{"name": "Sender", "email": user}],
                            "to": [{"name": "Dest", "email": "someone@dest.test"}],
                            "bcc": [{"name": None, "email": "hidden@dest.test"}],
                            "subject": "Sent over JMAP",
                            "textBody": [{"partId": "t", "type": "text/plain"}],
                            "bodyValues": {"t": {"value": "Hello from JMAP.\n"}},
                        }
                    },
                },
                "0",
            ],
            ["Identity/get", {"accountId": account}, "1"],
            [
                "EmailSubmission/set",
                {
                    "accountId": account,
                    "create": {"s1": {"identityId": "i0", "emailId": "#draft"}},
                    "onSuccessUpdateEmail": {
                        "#s1": {
                            f"mailboxIds/{role['drafts']}": None,
                            f"mailboxIds/{role['sent']}": True,
                            "keywords/$draft": None,
                        }
                    },
                },
                "2",
            ],
        ],
        [CORE, MAIL, SUBMISSION],
    )
    assert responses[0][0] == "Email/set" and "draft" in responses[0][1]["created"], responses
    assert responses[1][1]["list"][0]["email"] == user
    assert responses[2][0] == "EmailSubmission/set", responses
    assert "s1" in responses[2][1]["created"], responses[2]
    assert responses[3][0] == "Email/set" and responses[3][1]["updated"], responses
    messages = env.sink.wait_for_messages(1, timeout=60)
    mine = [m for m in messages if "someone@dest.test" in m["rcpts"]]
    assert mine and sorted(mine[0]["rcpts"]) == ["hidden@dest.test", "someone@dest.test"]
    assert mine[0]["sender"] == user
    headers = json.dumps(mine[0].get("headers", ""))
    assert "Sent over JMAP" in headers and "hidden@dest.test" not in headers
    email_id = responses[0][1]["created"]["draft"]["id"]
    got = one(
        env,
        user,
        "Email/get",
        {"accountId": account, "ids": [email_id], "properties": ["mailboxIds", "keywords"]},
    )["list"][0]
    assert got["mailboxIds"] == {role["sent"]: True}
    assert got["keywords"] == {"$seen": True}
    # sending as somebody else is refused
    refused = one(
        env,
        user,
        "EmailSubmission/set",
        {
            "accountId": account,
            "create": {
                "s2": {
                    "identityId": "i0",
                    "emailId": email_id,
                    "envelope": {
                        "mailFrom": {"email": "boss@elsewhere.test"},
                        "rcptTo": [{"email": "x@dest.test"}],
                    },
                }
            },
        },
        [CORE, MAIL, SUBMISSION],
    )
    assert refused["notCreated"]["s2"]["type"] == "forbiddenMailFrom"


def test_mailbox_set_create_rename_destroy(env: Env) -> None:
    user = make_user(env, "boxes")
    account = session(env, user)["primaryAccounts"][MAIL]
    state = one(env, user, "Mailbox/get", {"accountId": account})["state"]
    made = one(
        env,
        user,
        "Mailbox/set",
        {
            "accountId": account,
            "create": {
                "p": {"name": "Projects"},
                "c": {"name": "Alpha", "parentId": "#p"},
            },
        },
    )
    parent, child = made["created"]["p"]["id"], made["created"]["c"]["id"]
    listed = {b["id"]: b for b in one(env, user, "Mailbox/get", {"accountId": account})["list"]}
    assert listed[child]["parentId"] == parent and listed[child]["name"] == "Alpha"
    changes = one(env, user, "Mailbox/changes", {"accountId": account, "sinceState": state})
    assert set(changes["created"]) == {parent, child}
    renamed = one(
        env, user, "Mailbox/set", {"accountId": account, "update": {child: {"name": "Beta"}}}
    )
    assert child in renamed["updated"]
    refused = one(env, user, "Mailbox/set", {"accountId": account, "destroy": [parent]})
    assert refused["notDestroyed"][parent]["type"] == "mailboxHasChild"
    gone = one(env, user, "Mailbox/set", {"accountId": account, "destroy": [child, parent]})
    assert gone["destroyed"] == [child, parent]
    imap = imaplib.IMAP4("127.0.0.1", env.server.ports["imap"], timeout=30)
    try:
        imap.login(user, PASSWORD)
        _typ, data = imap.list()
        names = b" ".join(data)
        assert b"Projects" not in names and b"INBOX" in names
    finally:
        imap.logout()


def test_query_changes_vacation_and_access_token(env: Env) -> None:
    user = make_user(env, "misc")
    send(env, user, "older")
    account = session(env, user)["primaryAccounts"][MAIL]
    [older] = inbox_emails(env, user, account, 1)
    query = {"accountId": account, "sort": [{"property": "receivedAt", "isAscending": False}]}
    before = one(env, user, "Email/query", query)
    send(env, user, "newer")
    emails = inbox_emails(env, user, account, 2)
    newer = next(e for e in emails if e["subject"] == "newer")
    changes = one(
        env, user, "Email/queryChanges", {**query, "sinceQueryState": before["queryState"]}
    )
    assert changes["added"] == [{"id": newer["id"], "index": 0}]
    assert changes["removed"] == [newer["id"]]
    bad = call(
        env,
        user,
        [["Email/queryChanges", {**query, "sinceQueryState": "garbage"}, "x"]],
    )[0]
    assert bad[0] == "error" and bad[1]["type"] == "cannotCalculateChanges"
    assert older["id"] != newer["id"]
    # VacationResponse: a singleton the user can set
    vacation = [CORE, MAIL, "urn:ietf:params:jmap:vacationresponse"]
    got = one(env, user, "VacationResponse/get", {"accountId": account}, vacation)
    assert got["list"][0]["id"] == "singleton" and got["list"][0]["isEnabled"] is False
    patch = {"isEnabled": True, "subject": "Away", "textBody": "Back on Monday."}
    done = one(
        env,
        user,
        "VacationResponse/set",
        {"accountId": account, "update": {"singleton": patch}},
        vacation,
    )
    assert "singleton" in done["updated"]
    got = one(env, user, "VacationResponse/get", {"accountId": account}, vacation)
    assert got["list"][0]["isEnabled"] is True and got["list"][0]["subject"] == "Away"
    wrong = one(
        env,
        user,
        "VacationResponse/set",
        {"accountId": account, "update": {"singleton": {"isEnabled": "yes"}}},
        vacation,
    )
    assert wrong["notUpdated"]["singleton"]["type"] == "invalidProperties"
    # a browser's download link carries the login token in the query
    token = requests.post(
        f"{env.base}/jmap/login", json={"username": user, "password": PASSWORD}, timeout=30
    ).json()["token"]
    url = f"{env.base}/jmap/download/{account}/{newer['blobId']}/m.eml"
    assert requests.get(url, timeout=30).status_code == 401
    download = requests.get(url, params={"access_token": token}, timeout=30)
    assert download.status_code == 200 and b"Subject: newer" in download.content


@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")
def test_passwords_only_over_tls_for_untrusted_clients(tmp_path: Path) -> None:
    """With no trusted network, Basic over plain HTTP is refused (whatever the password)
    and accepted over the TLS listener; a login token then works over either."""
    tls_port = free_port()
    extra = (
        f'[policy]\nlocal_domains = ["{DOMAIN}"]\ntrusted_networks = []\n'
        f"[auth]\nfailure_delay = 0.1\n"
        f'[[listener]]\naddress = "127.0.0.1:{tls_port}"\nrole = "http"\ntls = true\n'
    )
    with running_server(tmp_path, extra, roles=("http",)) as srv:
        user = f"tls@{DOMAIN}"
        UsersFile(srv.data_dir / "users").add(user, PASSWORD)
        plain = f"http://127.0.0.1:{srv.ports['http']}"
        secure = f"https://127.0.0.1:{tls_port}"
        http = requests.Session()
        http.trust_env = False
        refused = http.get(f"{plain}/.well-known/jmap", headers=basic(user), timeout=30)
        assert refused.status_code == 401 and "TLS" in refused.json()["detail"]
        login = http.post(
            f"{plain}/jmap/login", json={"username": user, "password": PASSWORD}, timeout=30
        )
        assert login.status_code == 401
        accepted = http.get(
            f"{secure}/.well-known/jmap", headers=basic(user), timeout=30, verify=False
        )
        assert accepted.status_code == 200
        assert accepted.json()["apiUrl"] == f"{secure}/jmap/api"
        token = http.post(
            f"{secure}/jmap/login",
            json={"username": user, "password": PASSWORD},
            timeout=30,
            verify=False,
        ).json()["token"]
        bearer = http.get(
            f"{plain}/.well-known/jmap", headers={"Authorization": f"Bearer {token}"}, timeout=30
        )
        assert bearer.status_code == 200


# --- threads ------------------------------------------------------------------------------


def test_threads_group_a_conversation_across_mailboxes(env: Env) -> None:
    """Original, a reply with In-Reply-To, a reply to the reply with References naming only
    its parent, all by SMTP, and an unrelated message: one Thread of three (and a reply
    imported into Sent joins it), one of one; collapseThreads gives one per thread."""
    user = make_user(env, "threads")
    account = session(env, user)["primaryAccounts"][MAIL]
    state = one(env, user, "Thread/get", {"accountId": account, "ids": []})["state"]
    send(env, user, "thread root")
    inbox_emails(env, user, account, 1)  # the original first: receivedAt orders the thread
    send(env, user, "re root", extra="In-Reply-To: <thread.root@example.org>\r\n")
    inbox_emails(env, user, account, 2)
    send(env, user, "re re root", extra="References: <re.root@example.org>\r\n")
    send(env, user, "unrelated", extra="References: <somewhere@else.example>\r\n")
    emails = inbox_emails(env, user, account, 4)
    by_subject = {e["subject"]: e for e in emails}
    conversation = [by_subject[s] for s in ("thread root", "re root", "re re root")]
    thread = conversation[0]["threadId"]
    assert all(e["threadId"] == thread for e in conversation), emails
    assert by_subject["unrelated"]["threadId"] != thread
    got = one(
        env,
        user,
        "Thread/get",
        {"accountId": account, "ids": [thread, by_subject["unrelated"]["threadId"], "tnope"]},
    )
    assert got["list"][0] == {"id": thread, "emailIds": [e["id"] for e in conversation]}
    assert got["list"][1]["emailIds"] == [by_subject["unrelated"]["id"]]
    assert got["notFound"] == ["tnope"]
    # a reply kept in Sent (another mailbox) is in the same thread
    message = (
        f"From: {user}\r\nTo: alice@example.org\r\nSubject: Re: thread root\r\n"
        "Message-ID: <my.reply@example.test>\r\nIn-Reply-To: <re.re.root@example.org>\r\n"
        "References: <thread.root@example.org> <re.root@example.org> <re.re.root@example.org>"
        "\r\n\r\nMy answer.\r\n"
    ).encode()
    blob = requests.post(
        f"{env.base}/jmap/upload/{account}",
        headers={**basic(user), "Content-Type": "message/rfc822"},
        data=message,
        timeout=30,
    ).json()["blobId"]
    boxes = one(env, user, "Mailbox/get", {"accountId": account})["list"]
    sent = next(b["id"] for b in boxes if b["role"] == "sent")
    imported = one(
        env,
        user,
        "Email/import",
        {"accountId": account, "emails": {"r": {"blobId": blob, "mailboxIds": {sent: True}}}},
    )["created"]["r"]
    assert imported["threadId"] == thread
    got = one(env, user, "Thread/get", {"accountId": account, "ids": [thread]})["list"][0]
    assert got["emailIds"] == [*(e["id"] for e in conversation), imported["id"]]
    # Thread/changes: the conversation's thread and the unrelated one were made since
    changes = one(env, user, "Thread/changes", {"accountId": account, "sinceState": state})
    assert sorted(changes["created"]) == sorted([thread, by_subject["unrelated"]["threadId"]])
    assert changes["destroyed"] == []
    # collapseThreads: one email per thread, the newest of each (the sort's first)
    query = {
        "accountId": account,
        "sort": [{"property": "receivedAt", "isAscending": False}],
        "collapseThreads": True,
        "calculateTotal": True,
    }
    collapsed = one(env, user, "Email/query", query)
    assert collapsed["total"] == 2
    assert set(collapsed["ids"]) == {imported["id"], by_subject["unrelated"]["id"]}
    plain = one(env, user, "Email/query", {**query, "collapseThreads": False})
    assert plain["total"] == 5
    # the thread keyword filters look at the whole conversation
    one(
        env,
        user,
        "Email/set",
        {
            "accountId": account,
            "update": {by_subject["re root"]["id"]: {"keywords/$flagged": True}},
        },
    )
    members = {*(e["id"] for e in conversation), imported["id"]}

    def matching(condition: dict[str, str]) -> set[str]:
        return set(
            one(env, user, "Email/query", {"accountId": account, "filter": condition})["ids"]
        )

    assert matching({"someInThreadHaveKeyword": "$flagged"}) == members
    assert matching({"allInThreadHaveKeyword": "$flagged"}) == set()
    assert matching({"noneInThreadHaveKeyword": "$flagged"}) == {by_subject["unrelated"]["id"]}
    assert matching({"hasKeyword": "$flagged"}) == {by_subject["re root"]["id"]}


# --- vacation replies -----------------------------------------------------------------------


def _send_from(
    env: Env, sender: str, user: str, subject: str, extra: str = "", lmtp: bool = False
) -> None:
    data = (
        f"From: {sender}\r\nTo: {user}\r\nSubject: {subject}\r\n"
        f"Message-ID: <{subject.replace(' ', '.')}@dest.test>\r\n{extra}\r\nHi.\r\n"
    ).encode()
    if lmtp:
        with smtplib.LMTP("127.0.0.1", env.server.ports["lmtp"], timeout=30) as client:
            client.sendmail(sender, [user], data)
        return
    with smtplib.SMTP("127.0.0.1", env.server.ports["mx"], timeout=30) as smtp:
        smtp.sendmail(sender, [user], data)


def _header(block: str, name: str) -> str | None:
    unfolded = block.replace("\r\n ", " ").replace("\r\n\t", " ")
    for line in unfolded.split("\r\n"):
        field, _, value = line.partition(":")
        if field.lower() == name.lower():
            return value.strip()
    return None


def test_vacation_replies_once_per_sender_and_never_to_automatic_mail(env: Env) -> None:
    """A VacationResponse set over JMAP: mail delivered by SMTP (and by LMTP) from outside
    gets one reply, with RFC 3834's fields, to the recording peer; a second message from
    the same sender gets none, and neither do bulk, list or auto-generated mail."""
    user = make_user(env, "away")
    account = session(env, user)["primaryAccounts"][MAIL]
    using = [CORE, MAIL, "urn:ietf:params:jmap:vacationresponse"]
    now = time.time()
    window = {
        "fromDate": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now - 3600)),
        "toDate": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now + 86400)),
    }
    bad = one(
        env,
        user,
        "VacationResponse/set",
        {"accountId": account, "update": {"singleton": {"fromDate": "next monday"}}},
        using,
    )
    assert bad["notUpdated"]["singleton"]["properties"] == ["fromDate"]
    patch = {"isEnabled": True, "subject": "Out of office", "textBody": "Back Monday."}
    done = one(
        env,
        user,
        "VacationResponse/set",
        {"accountId": account, "update": {"singleton": {**patch, **window}}},
        using,
    )
    assert "singleton" in done["updated"], done

    def replies_to(address: str) -> list[dict[str, Any]]:
        return [m for m in env.sink.messages() if m["rcpts"] == [address]]

    _send_from(env, "friend@dest.test", user, "first note")
    wait_until(lambda: replies_to("friend@dest.test"), timeout=60)
    [reply] = replies_to("friend@dest.test")
    headers = reply["headers"]
    assert reply["sender"] == ""  # the null sender: its bounces go nowhere (RFC 3834 §3.3)
    assert _header(headers, "Auto-Submitted") == "auto-replied"
    assert _header(headers, "Subject") == "Out of office"
    assert _header(headers, "From") == f"<{user}>"
    assert _header(headers, "To") == "friend@dest.test"
    assert _header(headers, "In-Reply-To") == "<first.note@dest.test>"
    assert _header(headers, "References") == "<first.note@dest.test>"
    # none of these gets a reply: the same sender again, bulk, a list, a robot, the null sender
    _send_from(env, "friend@dest.test", user, "second note")
    _send_from(env, "news@dest.test", user, "bulk news", "Precedence: bulk\r\n")
    _send_from(env, "member@dest.test", user, "list post", "List-Id: <l.dest.test>\r\n")
    _send_from(env, "robot@dest.test", user, "robot", "Auto-Submitted: auto-generated\r\n")
    _send_from(env, "", user, "bounce")
    # and a new sender over LMTP does (a reply queued after these were delivered)
    _send_from(env, "other@dest.test", user, "over lmtp", lmtp=True)
    inbox_emails(env, user, account, 7)
    wait_until(lambda: replies_to("other@dest.test"), timeout=60)
    assert _header(replies_to("other@dest.test")[0]["headers"], "Subject") == "Out of office"
    time.sleep(1.0)  # what a wrongly queued reply would need to arrive as well
    assert len(replies_to("friend@dest.test")) == 1
    for address in ("news@dest.test", "member@dest.test", "robot@dest.test"):
        assert replies_to(address) == [], address
    # disabled: no reply any more
    one(
        env,
        user,
        "VacationResponse/set",
        {"accountId": account, "update": {"singleton": {"isEnabled": False}}},
        using,
    )
    _send_from(env, "third@dest.test", user, "after vacation")
    inbox_emails(env, user, account, 8)
    time.sleep(1.0)
    assert replies_to("third@dest.test") == []


def _submit(env: Env, user: str, subject: str, body: str) -> dict[str, Any]:
    """Create a draft and submit it in one request; the EmailSubmission/set response."""
    account = session(env, user)["primaryAccounts"][MAIL]
    boxes = one(env, user, "Mailbox/get", {"accountId": account})["list"]
    drafts = next(b["id"] for b in boxes if b["role"] == "drafts")
    draft = {
        "mailboxIds": {drafts: True},
        "keywords": {"$draft": True},
        "from": [{"name": None, "email": user}],
        "to": [{"name": None, "email": "checked@dest.test"}],
        "subject": subject,
        "textBody": [{"partId": "t", "type": "text/plain"}],
        "bodyValues": {"t": {"value": body}},
    }
    submission = {"identityId": "i0", "emailId": "#d"}
    responses = call(
        env,
        user,
        [
            ["Email/set", {"accountId": account, "create": {"d": draft}}, "0"],
            ["EmailSubmission/set", {"accountId": account, "create": {"s": submission}}, "1"],
        ],
        [CORE, MAIL, SUBMISSION],
    )
    assert responses[1][0] == "EmailSubmission/set", responses
    result: dict[str, Any] = responses[1][1]
    return result


def test_submissions_pass_the_operators_content_checks(env: Env) -> None:
    user = make_user(env, "checked")
    refused = _submit(env, user, "Hello", "This has XYZZY-FORBIDDEN in it.\n")
    assert "s" not in (refused.get("created") or {}), refused
    error = refused["notCreated"]["s"]
    assert error["type"] == "forbiddenToSend" and "No magic words here" in error["description"]
    held = _submit(env, user, "Please HOLD-ME for review", "Fine words.\n")
    queue_id = held["created"]["s"]["id"]
    listing = subprocess.run(
        [*tachymail_cmd(), "queue", "list", "--state", "held", "-c", str(env.server.config_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert queue_id in listing.stdout, listing.stdout + listing.stderr
    time.sleep(1)  # a held message is not delivered; the refused one was never queued
    sent = [m for m in env.sink.messages() if "checked@dest.test" in m["rcpts"]]
    assert sent == []
