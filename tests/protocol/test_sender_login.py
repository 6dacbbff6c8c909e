"""The sender-login policy (issue 16, finding 11): an authenticated user may use only a
MAIL FROM it owns on the listeners the policy covers (submission and smtps by default),
and its mail is DKIM-signed only for a From: address it owns.

Real server, smtplib over STARTTLS (submission) and implicit TLS (smtps), real AUTH.
"""

from __future__ import annotations

import json
import smtplib
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from server import Server, run_cli, running_server

SENDERS = """
[auth]
failure_delay = 0.05
senders = {{ bob = ["Bob@Example.org", "@example.net"] }}
{more}
[dkim]
domains = {{ "example.com" = "s1", "example.net" = "s1" }}
"""


@contextmanager
def start(tmp_path: Path, more: str = "") -> Iterator[Server]:
    data_dir = tmp_path / "data"
    for domain in ("example.com", "example.net"):
        run_cli("dkim", "keygen", "--domain", domain, "--selector", "s1", data_dir=data_dir)
    with running_server(tmp_path, SENDERS.format(more=more), data_dir=data_dir) as srv:
        for name in ("alice@example.com", "bob"):
            run_cli("user", "add", name, "--password-stdin", data_dir=srv.data_dir, stdin="pw\n")
        yield srv


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    with start(tmp_path) as srv:
        yield srv


def submission(srv: Server, context: ssl.SSLContext, user: str) -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", srv.ports["submission"], timeout=15)
    client.starttls(context=context)
    client.login(user, "pw")
    return client


def mail_from(client: smtplib.SMTP, sender: str) -> tuple[int, bytes]:
    reply = client.mail(sender)
    client.rset()
    return reply


def test_a_login_that_is_an_address_owns_that_address_only(
    server: Server, client_tls: ssl.SSLContext
) -> None:
    with submission(server, client_tls, "alice@example.com") as client:
        assert mail_from(client, "alice@example.com")[0] == 250
        assert mail_from(client, "ALICE@example.COM")[0] == 250
        code, text = mail_from(client, "ceo@example.com")
        assert code == 553
        assert text == (
            b"5.7.1 <ceo@example.com>: Sender address rejected: not owned by user alice@example.com"
        )
        # A refused MAIL leaves no transaction behind.
        with pytest.raises(smtplib.SMTPSenderRefused):
            client.sendmail("ceo@example.com", ["x@example.org"], b"Subject: s\r\n\r\nb\r\n")
    assert server.queue_count() == 0
    assert "MAIL FROM <ceo@example.com> not owned by alice@example.com" in server.log()


def test_configured_addresses_and_domains(server: Server, client_tls: ssl.SSLContext) -> None:
    with submission(server, client_tls, "bob") as client:
        assert mail_from(client, "bob@example.org")[0] == 250
        assert mail_from(client, "anyone@EXAMPLE.net")[0] == 250
        assert mail_from(client, "x@sub.example.net")[0] == 553  # no subdomains
        assert mail_from(client, "bob@example.com")[0] == 553
        assert mail_from(client, "alice@example.com")[0] == 553  # someone else's


def test_null_sender_is_allowed_by_default(server: Server, client_tls: ssl.SSLContext) -> None:
    with submission(server, client_tls, "bob") as client:
        assert mail_from(client, "")[0] == 250  # read receipts (RFC 8098) use it


def test_null_sender_can_be_refused(tmp_path: Path, client_tls: ssl.SSLContext) -> None:
    with (
        start(tmp_path, "null_sender = false") as srv,
        submission(srv, client_tls, "bob") as client,
    ):
        code, text = mail_from(client, "")
        assert (code, text[:5]) == (553, b"5.7.1")


def test_smtps_is_covered_and_mx_is_not_by_default(
    server: Server, client_tls: ssl.SSLContext
) -> None:
    with smtplib.SMTP_SSL("127.0.0.1", server.ports["smtps"], context=client_tls) as client:
        client.login("bob", "pw")
        assert mail_from(client, "ceo@example.com")[0] == 553
    with smtplib.SMTP("127.0.0.1", server.port) as client:
        client.starttls(context=client_tls)
        client.login("bob", "pw")
        assert mail_from(client, "ceo@example.com")[0] == 250


def test_listeners_are_configurable(tmp_path: Path, client_tls: ssl.SSLContext) -> None:
    with start(tmp_path, 'sender_login = ["mx"]') as srv:
        with smtplib.SMTP("127.0.0.1", srv.port) as client:
            client.starttls(context=client_tls)
            client.login("bob", "pw")
            assert mail_from(client, "ceo@example.com")[0] == 553
            # Unauthenticated mail on mx is not the policy's business.
        with smtplib.SMTP("127.0.0.1", srv.port) as client:
            client.ehlo()
            assert mail_from(client, "ceo@example.com")[0] == 250
        with submission(srv, client_tls, "bob") as client:
            assert mail_from(client, "ceo@example.com")[0] == 250


def queued_headers(srv: Server) -> dict[str, str]:
    """The header block of each queued message, by its From line."""
    out = {}
    for line in run_cli("queue", "list", "--json", data_dir=srv.data_dir).splitlines():
        queue_id = json.loads(line)["id"]
        shown = run_cli("queue", "show", queue_id, data_dir=srv.data_dir)
        sender = next(h for h in shown.splitlines() if h.startswith("From: "))
        out[sender] = shown
    return out


def test_dkim_signs_only_a_from_address_the_user_owns(
    server: Server, client_tls: ssl.SSLContext
) -> None:
    with submission(server, client_tls, "bob") as client:
        for author in ("Bob <news@example.net>", "The CEO <ceo@example.com>"):
            message = f"From: {author}\r\nSubject: s\r\n\r\nbody\r\n".encode()
            client.sendmail("bob@example.net", ["x@example.org"], message)
    headers = queued_headers(server)
    assert "DKIM-Signature:" in headers["From: Bob <news@example.net>"]
    # The envelope is bob's, the From: is not: queued, but not signed for example.com.
    assert "DKIM-Signature:" not in headers["From: The CEO <ceo@example.com>"]
    assert "not DKIM-signed: From: <ceo@example.com> is not owned by bob" in server.log()
