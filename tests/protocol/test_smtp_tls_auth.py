"""STARTTLS (RFC 3207), implicit TLS (RFC 8314) and AUTH (RFC 4954) against a real server."""

from __future__ import annotations

import base64
import smtplib
import socket
import ssl
import time

import pytest

from conftest import RawClient
from server import Server, run_cli


@pytest.fixture
def alice(server: Server) -> tuple[str, str]:
    run_cli("user", "add", "alice", "--password-stdin", data_dir=server.data_dir, stdin="wonder\n")
    return "alice", "wonder"


def test_submission_requires_tls_then_auth(server: Server, client_tls: ssl.SSLContext) -> None:
    with smtplib.SMTP("127.0.0.1", server.ports["submission"]) as client:
        client.ehlo()
        code, text = client.mail("a@example.com")
        assert (code, text[:5]) == (530, b"5.7.0") and b"STARTTLS" in text
        client.starttls(context=client_tls)
        client.ehlo()
        code, text = client.mail("a@example.com")
        assert (code, text[:5]) == (530, b"5.7.0")


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_auth_then_submit(
    server: Server, client_tls: ssl.SSLContext, alice: tuple[str, str], mechanism: str
) -> None:
    with smtplib.SMTP("127.0.0.1", server.ports["submission"]) as client:
        client.starttls(context=client_tls)
        client.ehlo()
        client.user, client.password = alice
        code, _ = client.auth(mechanism, getattr(client, f"auth_{mechanism.lower()}"))
        assert code == 235
        client.sendmail("alice@example.com", ["bob@example.net"], b"Subject: sub\r\n\r\nbody\r\n")
    listing = run_cli("queue", "list", "--json", data_dir=server.data_dir)
    assert '"auth": "alice"' in listing
    queue_id = listing.split('"id": "')[1].split('"')[0]
    shown = run_cli("queue", "show", queue_id, data_dir=server.data_dir)
    assert "with ESMTPSA id" in shown and "(authenticated)" in shown
    # Submission adds what the client left out (RFC 6409 §8).
    assert "Date: " in shown and f"Message-ID: <{queue_id}@mx.test.example>" in shown


def test_wrong_password_is_refused_slowly_and_counted(
    server: Server, client_tls: ssl.SSLContext, alice: tuple[str, str]
) -> None:
    with smtplib.SMTP_SSL("127.0.0.1", server.ports["smtps"], context=client_tls) as client:
        client.ehlo()
        with pytest.raises(smtplib.SMTPAuthenticationError) as failure:
            client.login("alice", "wrong")
        assert failure.value.smtp_code == 535
        assert failure.value.smtp_error.startswith(b"5.7.8")
    assert "AUTH failed for 'alice'" in server.log()


def test_too_many_auth_failures_close_the_session(
    server: Server, client_tls: ssl.SSLContext, alice: tuple[str, str]
) -> None:
    raw = socket.create_connection(("127.0.0.1", server.ports["smtps"]))
    tls = client_tls.wrap_socket(raw)
    reader = tls.makefile("rb")
    assert reader.readline().startswith(b"220")
    tls.sendall(b"EHLO x\r\n")
    while reader.readline()[3:4] == b"-":
        pass
    bad = base64.b64encode(b"\x00alice\x00nope")
    replies = []
    for _ in range(3):
        tls.sendall(b"AUTH PLAIN " + bad + b"\r\n")
        replies.append(reader.readline())
    assert all(r.startswith(b"535 5.7.8") for r in replies)
    assert reader.readline().startswith(b"421 4.7.0")
    assert reader.readline() == b""
    tls.close()


def test_implicit_tls_listener(
    server: Server, client_tls: ssl.SSLContext, alice: tuple[str, str]
) -> None:
    with smtplib.SMTP_SSL("127.0.0.1", server.ports["smtps"], context=client_tls) as client:
        client.ehlo()
        assert client.has_extn("auth") and not client.has_extn("starttls")
        client.login(*alice)
        client.sendmail("alice@example.com", ["x@example.net"], b"Subject: s\r\n\r\nb\r\n")
    assert server.queue_count() == 1


def test_starttls_discards_pipelined_plaintext(server: Server, client_tls: ssl.SSLContext) -> None:
    """CVE-2011-0411: commands sent with STARTTLS in one packet must not run after TLS."""
    raw = RawClient(server.port)
    raw.cmd(b"EHLO x")
    raw.send(b"STARTTLS\r\nMAIL FROM:<injected@example.com>\r\n")
    assert raw.reply().startswith(b"220 2.0.0")
    tls = client_tls.wrap_socket(raw.sock)
    reader = tls.makefile("rb")
    tls.sendall(b"EHLO x\r\n")
    while reader.readline()[3:4] == b"-":
        pass
    # Had the injected MAIL run, this would be "503 nested MAIL".
    tls.sendall(b"MAIL FROM:<real@example.com>\r\n")
    assert reader.readline() == b"250 2.1.0 Ok\r\n"
    tls.close()
    assert "discarded" in server.log()


def test_bad_tls_handshake_is_logged_and_harmless(server: Server) -> None:
    raw = RawClient(server.port)
    raw.cmd(b"EHLO x")
    assert raw.cmd(b"STARTTLS").startswith(b"220")
    raw.send(b"this is not a TLS client hello\r\n" * 4)
    assert raw.closed()
    deadline = time.monotonic() + 10
    while "TLS handshake failed" not in server.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "TLS handshake failed" in server.log()
    with smtplib.SMTP("127.0.0.1", server.port) as client:  # the worker is fine
        assert client.noop()[0] == 250


def test_auth_without_tls_is_refused(server: Server) -> None:
    raw = RawClient(server.ports["submission"])
    raw.cmd(b"EHLO x")
    assert raw.cmd(b"AUTH PLAIN " + base64.b64encode(b"\x00alice\x00wonder")).startswith(
        b"538 5.7.11"
    )
