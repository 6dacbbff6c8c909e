"""Header and body checks ([[header_check]] / [[body_check]]) over smtplib, end to end:
each action as a client and an operator see it (issue 17, "Header and body checks")."""

from __future__ import annotations

import json
import smtplib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from server import Server, run_cli, running_server, tachymail_cmd, wait_until
from smtp_peer import SmtpPeer

RULES = """
[[header_check]]
pattern = '^Subject: .*\\bviagra\\b'
action = "reject"
text = "Spam is not welcome here"

[[header_check]]
pattern = '^Subject: review me'
action = "hold"

[[header_check]]
pattern = '^Subject: drop me'
action = "discard"

[[header_check]]
pattern = '^X-Internal-Route:'
action = "strip"

[[header_check]]
pattern = '^Subject: tag me'
action = "add"
text = "X-Tagged: by header_check"

[[header_check]]
pattern = 'name="?[^"]*\\.exe"?'
action = "reject"
text = "Executable attachments are refused"

[[body_check]]
pattern = '^Click here to claim your prize$'
action = "reject"
text = "Body refused"

[[body_check]]
pattern = '^wire transfer'
action = "hold"
"""


@pytest.fixture
def srv(tmp_path: Path) -> Iterator[Server]:
    with running_server(tmp_path, RULES, roles=("mx",)) as server:
        yield server


def send(port: int, subject: str, body: str = "Hello.\r\n", headers: str = "") -> tuple[int, str]:
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as client:
        client.ehlo("client.test")
        client.mail("alice@sender.example")
        assert client.rcpt("bob@dest.example")[0] == 250
        content = (
            f"From: alice@sender.example\r\nTo: bob@dest.example\r\nSubject: {subject}\r\n"
            f"{headers}\r\n{body}"
        )
        code, text = client.data(content.encode())
        return code, text.decode()


def queue_ids(srv: Server, *args: str) -> list[dict[str, object]]:
    out = run_cli("queue", "list", "--json", *args, data_dir=srv.data_dir)
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_reject_by_header_refuses_after_data_with_the_rules_text(srv: Server) -> None:
    code, text = send(srv.port, "cheap VIAGRA now")
    assert (code, text) == (550, "5.7.1 Spam is not welcome here")
    assert srv.queue_count() == 0
    assert "message refused: header_check[0]: Subject: cheap VIAGRA now" in srv.log()


def test_reject_by_mime_part_header_and_by_body_line(srv: Server) -> None:
    attachment = (
        "--B\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n"
        '--B\r\nContent-Type: application/octet-stream; name="setup.exe"\r\n'
        "Content-Transfer-Encoding: base64\r\n\r\nTVqQAAMAAAAEAAAA\r\n--B--\r\n"
    )
    mime = "MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=B\r\n"
    assert send(srv.port, "files", attachment, mime) == (
        550,
        "5.7.1 Executable attachments are refused",
    )
    body = "Dear winner,\r\nClick here to claim your prize\r\nBye\r\n"
    assert send(srv.port, "hello", body) == (550, "5.7.1 Body refused")
    # Not a line of its own: accepted.
    assert send(srv.port, "hello", "Do not Click here to claim your prize\r\n")[0] == 250
    assert srv.queue_count() == 1


def test_hold_queues_the_message_on_hold(srv: Server) -> None:
    code, text = send(srv.port, "review me please")
    assert code == 250
    queue_id = text.split()[-1]
    code, text = send(srv.port, "normal", "Hi,\r\nwire transfer of 10000 EUR\r\n")
    assert code == 250
    body_held = text.split()[-1]
    held = {str(m["id"]) for m in queue_ids(srv, "--state", "held")}
    assert held == {queue_id, body_held}
    listing = run_cli("queue", "list", data_dir=srv.data_dir)
    assert all(
        "held" in line for line in listing.splitlines() if queue_id in line or body_held in line
    )
    assert f"{queue_id} content checks: hold by header_check[1]" in srv.log()


def test_discard_answers_250_and_queues_nothing(srv: Server) -> None:
    code, text = send(srv.port, "drop me")
    assert code == 250 and text.startswith("2.0.0 Ok: queued as ")
    queue_id = text.split()[-1]
    assert srv.queue_count() == 0
    assert f"{queue_id} discarded, not queued: from <alice@sender.example>" in srv.log()


def test_strip_and_add_change_the_queued_content(srv: Server) -> None:
    code, text = send(
        srv.port,
        "tag me",
        "X-Internal-Route: in the body stays\r\n",
        "X-Internal-Route: core-7\r\n\tsecond line\r\n",
    )
    assert code == 250
    queue_id = text.split()[-1]
    shown = run_cli("queue", "show", "--body", queue_id, data_dir=srv.data_dir)
    _, _, body = shown.partition("X-Internal-Route: in the body")
    assert "X-Internal-Route: core-7" not in shown and "second line" not in shown
    assert "X-Tagged: by header_check\nSubject: tag me" in shown.replace("\r\n", "\n")
    assert body.startswith(" stays")


def test_delivery_sends_the_rewritten_message_and_keeps_the_held_one(tmp_path: Path) -> None:
    with SmtpPeer() as peer:
        extra = (
            RULES + f'[[route]]\ndomain = "dest.example"\nhost = "127.0.0.1:{peer.port}"\n'
            'tls = "none"\n\n[delivery]\nretry_schedule = [1]\nresolver = "127.0.0.1:9"\n'
        )
        with running_server(tmp_path, extra, roles=("mx",), hold=False) as srv:
            code, text = send(srv.port, "review me")
            assert code == 250
            held = text.split()[-1]
            assert send(srv.port, "tag me", "hi\r\n", "X-Internal-Route: core-7\r\n")[0] == 250
            (got,) = peer.wait_for(1)
            assert b"X-Internal-Route" not in got.content
            assert b"X-Tagged: by header_check\r\nSubject: tag me\r\n" in got.content
            # The held message stays queued, undelivered, until the operator releases it.
            wait_until(lambda: srv.queue_count() == 1)
            assert [m["id"] for m in queue_ids(srv, "--state", "held")] == [held]
            run_cli("queue", "release", held, data_dir=srv.data_dir)
            second = peer.wait_for(2)[1]
            assert b"Subject: review me" in second.content
            wait_until(lambda: srv.queue_count() == 0)


def test_a_bad_rule_is_named_by_config_check(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(
        '[[body_check]]\npattern = "ok"\naction = "hold"\n\n'
        '[[body_check]]\npattern = "(unclosed"\naction = "reject"\n'
    )
    out = subprocess.run(
        [*tachymail_cmd(), "config", "check", str(path)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode != 0
    assert "body_check[1].pattern: not a valid regular expression" in out.stdout + out.stderr
