"""HTTP injection (POST /api/v1/messages) through a real `tachymail serve` with an http
listener: what arrives at a real SMTP peer (MIME, per-recipient templates, a DKIM signature
that verifies), what the queue holds (`tachymail queue`), 10,000 recipients in one request,
curl as a client, and the JSON 4xx of each class of bad input (nothing queued)."""

from __future__ import annotations

import base64
import email
import email.policy
import json
import re
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import dkim
import pytest

from tachymail.queue.suppression import SuppressionList

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from test_webhooks import SECRET, Receiver

from server import Server, free_port, metric, run_cli, running_server, wait_until
from smtp_peer import SmtpPeer

URL = "http://127.0.0.1:{port}/api/v1/messages"


def post(
    server: Server,
    body: Any,
    token: str | None,
    *,
    raw: bytes | None = None,
    content_type: str = "application/json",
) -> tuple[int, dict[str, Any]]:
    """POST *body* (or *raw* octets) to the injection route; (status, JSON reply)."""
    data = raw if raw is not None else json.dumps(body).encode()
    request = urllib.request.Request(
        URL.format(port=server.ports["http"]), data=data, method="POST"
    )
    request.add_header("Content-Type", content_type)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def add_token(server: Server, name: str, scope: str) -> str:
    return run_cli("token", "add", name, "--scope", scope, data_dir=server.data_dir).strip()


def queue_json(server: Server) -> list[dict[str, Any]]:
    out = run_cli("queue", "list", "--json", data_dir=server.data_dir)
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def parse(content: bytes) -> EmailMessage:
    message = email.message_from_bytes(content, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


@pytest.fixture(scope="module")
def held(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, str]]:
    """A server holding its queue, small limits (for the 413s), and an inject token."""
    tmp = tmp_path_factory.mktemp("held")
    metrics_port = free_port()
    extra = (
        "[limits]\nmax_message_size = 200000\n[http]\nmax_body_bytes = 2000000\n"
        f'[metrics]\naddress = "127.0.0.1:{metrics_port}"\n'
        '[[egress_source]]\nname = "ip2"\naddress = "127.0.0.2"\n'
        '[[egress_pool]]\nname = "bulk-pool"\nsources = [{ name = "ip2", weight = 1 }]\n'
    )
    with running_server(tmp, extra, roles=("mx", "http")) as server:
        server.extra["metrics"] = str(metrics_port)
        yield server, add_token(server, "app", "inject")


def test_injected_messages_arrive_personalised_mime_and_dkim_signed(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    record = run_cli(
        "dkim", "keygen", "--domain", "sender.test", "--selector", "s1", data_dir=data_dir
    )
    txt = "".join(re.findall(r'"([^"]*)"', record)).encode()

    def published(name: bytes, timeout: int = 5) -> bytes:
        # The key record as DNS would serve it (the keygen's TXT, for s1._domainkey only).
        assert name.rstrip(b".") == b"s1._domainkey.sender.test"
        return txt

    extra = (
        '[dkim]\ndomains = { "sender.test" = "s1" }\n'
        '[delivery]\nsmarthost = "127.0.0.1:{port}"\nsmarthost_tls = "none"\n'
        'resolver = "127.0.0.1:9"\n'
    )
    attachment = bytes(range(256)) * 40
    body = {
        "envelope_sender": "bounces@sender.test",
        "recipients": [
            {"email": "bob@dest.test", "substitutions": {"name": "Bob"}},
            {"email": "zoe@dest.test", "substitutions": {"name": "Zoë <3"}},
        ],
        "content": {
            "from": "News <news@sender.test>",
            "subject": "Hello {{ name }}, {{ offer }}",
            "text_body": "Dear {{ name }},\nyour offer: {{ offer }}\n",
            "html_body": "<p>Dear {{ name }}</p>",
            "headers": {"X-Campaign": "spring"},
            "attachments": [
                {
                    "filename": "prices.bin",
                    "data": base64.b64encode(attachment).decode(),
                }
            ],
        },
        "substitutions": {"offer": "20% off", "name": "friend"},
        "template_dialect": "jinja",
        "tags": ["spring"],
        "metadata": {"campaign": 7},
    }
    with (
        SmtpPeer() as peer,
        running_server(
            tmp_path,
            extra.replace("{port}", str(peer.port)),
            roles=("mx", "http"),
            data_dir=data_dir,
            hold=False,
        ) as server,
    ):
        token = add_token(server, "app", "inject")
        status, reply = post(server, body, token)
        assert status == 200, reply
        assert reply["success_count"] == 2 and reply["fail_count"] == 0
        ids = reply["queue_ids"]
        assert set(ids) == {"bob@dest.test", "zoe@dest.test"}
        assert ids["bob@dest.test"] != ids["zoe@dest.test"]  # personal: one message each
        got = {m.recipients[0]: m for m in peer.wait_for(2)}
    for address, name in (("bob@dest.test", "Bob"), ("zoe@dest.test", "Zoë <3")):
        received = got[address]
        assert received.sender == "bounces@sender.test"
        content = received.content
        assert content.startswith(b"DKIM-Signature:") and b"d=sender.test" in content
        assert dkim.verify(content, dnsfunc=published)
        assert not dkim.verify(content.replace(b"Dear", b"Deer", 1), dnsfunc=published)
        assert f"with HTTP id {ids[address]} (token app)".encode() in content
        msg = parse(content)
        assert msg["Subject"] == f"Hello {name}, 20% off"
        assert msg["To"] == address
        assert msg["Message-ID"] == f"<{ids[address]}@mx.test.example>"
        assert msg["X-Campaign"] == "spring"
        assert msg.get_content_type() == "multipart/mixed"
        alternative, attached = msg.iter_parts()
        text, html = alternative.iter_parts()
        assert text.get_content().replace("\r\n", "\n") == f"Dear {name},\nyour offer: 20% off\n"
        escaped = name.replace("<", "&lt;")
        assert html.get_content().strip() == f"<p>Dear {escaped}</p>"
        assert attached.get_filename() == "prices.bin"
        assert attached.get_payload(decode=True) == attachment


def test_static_content_10000_recipients_one_request(held: tuple[Server, str]) -> None:
    server, token = held
    before = {e["id"] for e in queue_json(server)}
    recipients = [{"email": f"user{i}@dest{i % 7}.test"} for i in range(10_000)]
    raw = "From: app@sender.test\nSubject: bulk\n\n" + "x" * 900 + "\n"
    body = {
        "envelope_sender": "bounces@sender.test",
        "recipients": recipients,
        "content": raw,
        "tags": ["bulk"],
        "metadata": {"batch": "b1"},
        "pool": "bulk-pool",
    }
    status, reply = post(server, body, token)
    assert status == 200, reply
    assert reply["success_count"] == 10_000 and reply["fail_count"] == 0
    ids = set(reply["queue_ids"].values())
    # one content, split into envelopes of [limits] max_recipients (1000) recipients
    assert len(ids) == 10
    queued = [e for e in queue_json(server) if e["id"] not in before]
    assert {e["id"] for e in queued} == ids
    assert sum(len(e["recipients"]) for e in queued) == 10_000
    for envelope in queued:
        assert envelope["listener"] == "http" and envelope["auth"] == "app"
        assert envelope["tags"] == ["bulk"] and envelope["metadata"] == {"batch": "b1"}
        assert envelope["pool"] == "bulk-pool"
        assert envelope["sender"] == "bounces@sender.test"
    shown = run_cli("queue", "show", sorted(ids)[0], "--body", data_dir=server.data_dir)
    assert "Subject: bulk" in shown and "Message-ID: <" in shown and "Date: " in shown


def test_suppressed_and_duplicate_recipients_fail_alone(held: tuple[Server, str]) -> None:
    server, token = held
    suppressions = SuppressionList(server.data_dir)
    try:
        suppressions.add("gone@dest.test", reason="550 5.1.1 no such user", source="cli")
        suppressions.add("brand@dest.test", scope="sender.test", reason="unsubscribed")
    finally:
        suppressions.close()
    body = {
        "envelope_sender": "bounces@sender.test",
        "recipients": [
            {"email": "ok@dest.test"},
            {"email": "GONE@dest.test"},
            {"email": "brand@dest.test"},
            {"email": "ok@DEST.test"},
        ],
        "content": {"from": "app@sender.test", "subject": "s", "text_body": "t"},
    }
    status, reply = post(server, body, token)
    assert status == 200, reply
    assert list(reply["queue_ids"]) == ["ok@dest.test"]
    failed = reply["failed_recipients"]
    assert (
        failed["GONE@dest.test"].startswith("suppressed")
        and "no such user" in failed["GONE@dest.test"]
    )
    assert failed["brand@dest.test"] == "suppressed for sender.test: unsubscribed"
    assert failed["ok@DEST.test"] == "duplicate of an earlier recipient"
    assert reply["fail_count"] == 3 and reply["success_count"] == 1
    port = int(server.extra["metrics"])
    name = "tachymail_http_injected_recipients_total"
    wait_until(lambda: metric(port, name, result="suppressed") == 2)
    assert metric(port, name, result="duplicate") == 1
    assert metric(port, name, result="accepted") >= 1


GOOD = {
    "envelope_sender": "a@sender.test",
    "recipients": [{"email": "b@dest.test"}],
    "content": {"from": "a@sender.test", "subject": "s", "text_body": "t"},
}


def _with(**changes: Any) -> dict[str, Any]:
    return {**GOOD, **changes}


@pytest.mark.parametrize(
    ("body", "raw", "content_type", "status", "code", "names"),
    [
        (None, b'{"envelope_sender": ', "application/json", 400, "bad_json", ""),
        (GOOD, None, "text/plain", 415, "unsupported_media_type", ""),
        (_with(colour="red"), None, "application/json", 422, "invalid_body", "colour"),
        (
            _with(recipients=[{"email": "b@dest.test"}, {"email": "not an address"}]),
            None,
            "application/json",
            422,
            "invalid_address",
            "recipients.1.email",
        ),
        (
            _with(recipients=[{"email": "b@dest.test> NOTIFY=NEVER"}]),
            None,
            "application/json",
            422,
            "invalid_address",
            "recipients.0.email",
        ),
        (_with(envelope_sender=""), None, "application/json", 422, "invalid_address", "null"),
        (
            _with(recipients=[{"email": f"u{i}@d.test"} for i in range(10_001)]),
            None,
            "application/json",
            422,
            "invalid_body",
            "recipients",
        ),
        (_with(recipients=[]), None, "application/json", 422, "invalid_body", "recipients"),
        (_with(pool="no-such-pool"), None, "application/json", 422, "invalid_body", "pool"),
        (
            _with(
                content={"from": "a@x.test", "subject": "{{ ''.__class__ }}", "text_body": "t"},
                template_dialect="jinja",
            ),
            None,
            "application/json",
            422,
            "template_error",
            "b@dest.test",
        ),
        (
            _with(
                content={"from": "a@sender.test", "subject": "Hi {{ name }}", "text_body": "t"},
                template_dialect="jinja",
            ),
            None,
            "application/json",
            422,
            "template_error",
            "name",
        ),
        (
            _with(
                content={
                    "from": "a@sender.test",
                    "subject": "s",
                    "text_body": "t",
                    "headers": {"X-Evil": "x\r\nBcc: victim@x.test"},
                }
            ),
            None,
            "application/json",
            422,
            "invalid_body",
            "content.parts.headers",
        ),
        (_with(content="Subject: no from\r\n\r\nbody"), None, "application/json", 422,
         "invalid_content", "From"),
        (
            _with(
                content={
                    "from": "a@sender.test",
                    "subject": "s",
                    "text_body": "t",
                    "attachments": [
                        {"filename": "big", "data": base64.b64encode(bytes(300_000)).decode()}
                    ],
                }
            ),
            None,
            "application/json",
            413,
            "message_too_large",
            "",
        ),
        (None, b"[" + b'"x",' * 600_000 + b'"x"]', "application/json", 413, "too_large", ""),
    ],
)  # fmt: skip
def test_each_bad_input_gets_its_json_4xx_and_queues_nothing(
    held: tuple[Server, str],
    body: Any,
    raw: bytes | None,
    content_type: str,
    status: int,
    code: str,
    names: str,
) -> None:
    server, token = held
    before = server.queue_count()
    got, reply = post(server, body, token, raw=raw, content_type=content_type)
    assert (got, reply["error"]["code"]) == (status, code), reply
    assert names in json.dumps(reply)
    assert server.queue_count() == before


def test_tokens_and_scopes(held: tuple[Server, str]) -> None:
    server, _ = held
    status, reply = post(server, GOOD, None)
    assert (status, reply["error"]["code"]) == (401, "unauthorized")
    admin = add_token(server, "ops", "admin")
    status, reply = post(server, GOOD, admin)
    assert (status, reply["error"]["code"]) == (403, "forbidden")


def test_curl_injects_raw_content(held: tuple[Server, str], tmp_path: Path) -> None:
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    server, token = held
    body = tmp_path / "body.json"
    body.write_text(
        json.dumps(
            {
                "envelope_sender": "app@sender.test",
                "recipients": [{"email": "carol@dest.test"}],
                "content": "From: app@sender.test\r\nSubject: by curl\r\n\r\nhello\r\n",
            }
        )
    )
    out = subprocess.run(
        [
            curl, "-sS", "--fail-with-body", "-H", f"Authorization: Bearer {token}",
            "-H", "Content-Type: application/json", "--data-binary", f"@{body}",
            URL.format(port=server.ports["http"]),
        ],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    reply = json.loads(out.stdout)
    queue_id = reply["queue_ids"]["carol@dest.test"]
    shown = run_cli("queue", "show", queue_id, "--body", data_dir=server.data_dir)
    assert "Subject: by curl" in shown and f"Message-ID: <{queue_id}@mx.test.example>" in shown
    assert "with HTTP id" in shown


def test_reception_events_carry_the_injected_tags_and_metadata(tmp_path: Path) -> None:
    hook = Receiver(free_port())
    hook.start()
    try:
        with SmtpPeer() as peer:
            extra = (
                f'[[route]]\ndomain = "dest.test"\nhost = "127.0.0.1:{peer.port}"\n'
                'tls = "none"\n[delivery]\nresolver = "127.0.0.1:9"\n'
                f'[[webhook]]\nname = "inject"\nurl = "http://127.0.0.1:{hook.port}/hook"\n'
                f'secret = "{SECRET}"\nbatch_ms = 100\nevents = ["reception"]\n'
            )
            with running_server(tmp_path, extra, roles=("mx", "http"), hold=False) as server:
                token = add_token(server, "app", "inject")
                body = {
                    **GOOD,
                    "recipients": [{"email": "b@dest.test"}, {"email": "c@dest.test"}],
                    "tags": ["welcome"],
                    "metadata": {"user_id": 42},
                }
                status, reply = post(server, body, token)
                assert status == 200, reply
                queue_id = reply["queue_ids"]["b@dest.test"]
                wait_until(lambda: len(hook.of(queue_id, "reception")) == 2, timeout=30)
    finally:
        hook.close()
    events = hook.of(queue_id, "reception")
    assert sorted(e["recipient"] for e in events) == ["b@dest.test", "c@dest.test"]
    for event in events:
        assert event["tags"] == ["welcome"] and event["metadata"] == {"user_id": 42}
        assert event["sender"] == "a@sender.test" and event["remote_ip"] == "127.0.0.1"


def test_full_queue_is_503_try_later_and_nothing_half_queued(tmp_path: Path) -> None:
    # A queue map that cannot grow past 2 MiB: the first requests fill it.
    extra = "[queue]\nmap_size_mb = 2\nmax_map_size_mb = 2\nreserve_mb = 0\n"
    with running_server(tmp_path, extra, roles=("mx", "http")) as server:
        token = add_token(server, "app", "inject")
        big = "From: a@sender.test\r\nSubject: big\r\n\r\n" + ("y" * 998 + "\r\n") * 300
        body = {**GOOD, "content": big}
        replies = []
        for _ in range(12):
            status, reply = post(server, body, token)
            replies.append((status, reply))
            if status != 200:
                break
        status, reply = replies[-1]
        assert status == 503, replies[-1]
        assert reply["error"]["code"] == "storage_full"
        accepted = [r for s, r in replies if s == 200]
        assert accepted and all(r["success_count"] == 1 for r in accepted)
        assert server.queue_count() == len(accepted)
