"""The inbound SMTP server with real clients over loopback: commands, ESMTP, limits."""

from __future__ import annotations

import json
import smtplib
import ssl
from email.message import EmailMessage
from email.policy import SMTP
from pathlib import Path

import pytest

from conftest import RawClient
from server import Server, run_cli, running_server


def message(subject: str = "hello", body: str = "Hi there.\n") -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "alice@example.com"
    msg["To"] = "bob@example.net"
    msg["Subject"] = subject
    msg.set_content(body)
    return msg


def queued(server: Server) -> list[dict[str, object]]:
    out = run_cli("queue", "list", "--json", data_dir=server.data_dir)
    return [json.loads(line) for line in out.splitlines()]


def content_of(server: Server, queue_id: str) -> str:
    return run_cli("queue", "show", queue_id, "--body", data_dir=server.data_dir)


def test_smtplib_message_is_queued_with_its_envelope(server: Server) -> None:
    with smtplib.SMTP("127.0.0.1", server.port) as client:
        code, _ = client.ehlo("client.example")
        assert code == 250
        refused = client.sendmail(
            "alice@example.com",
            ["bob@example.net", "carol@example.org"],
            message().as_bytes(policy=SMTP),
        )
        assert refused == {}
    [entry] = queued(server)
    assert entry["sender"] == "alice@example.com"
    assert [r["address"] for r in entry["recipients"]] == ["bob@example.net", "carol@example.org"]  # type: ignore[attr-defined, index]
    assert entry["helo"] == "client.example"
    assert entry["client_ip"] == "127.0.0.1"
    text = content_of(server, str(entry["id"]))
    assert "Received: from client.example ([127.0.0.1])" in text
    assert f"by mx.test.example (Tachymail) with ESMTP id {entry['id']}" in text
    assert "Subject: hello" in text and "Hi there." in text
    assert server.queue_count() == 1


def test_reply_names_the_queue_id(server: Server) -> None:
    with smtplib.SMTP("127.0.0.1", server.port) as client:
        client.ehlo()
        client.mail("a@example.com")
        client.rcpt("b@example.net")
        code, text = client.data(message().as_bytes(policy=SMTP))
    assert code == 250
    assert text.startswith(b"2.0.0 Ok: queued as ")
    queue_id = text.split()[-1].decode()
    assert [e["id"] for e in queued(server)] == [queue_id]


def test_ehlo_advertises_extensions(server: Server) -> None:
    with smtplib.SMTP("127.0.0.1", server.port) as client:
        client.ehlo()
        for ext in (
            "pipelining",
            "size",
            "8bitmime",
            "smtputf8",
            "enhancedstatuscodes",
            "chunking",
            "dsn",
            "starttls",
        ):
            assert client.has_extn(ext), ext
        assert not client.has_extn("auth"), "AUTH must not be offered before TLS"
        assert client.esmtp_features["size"] == str(35 * 1024 * 1024)


def test_starttls_then_auth_is_offered_and_received_header_shows_tls(
    server: Server, client_tls: ssl.SSLContext
) -> None:
    with smtplib.SMTP("127.0.0.1", server.port) as client:
        client.starttls(context=client_tls)
        client.ehlo()
        assert client.has_extn("auth")
        assert "PLAIN" in client.esmtp_features["auth"]
        client.sendmail("a@example.com", ["b@example.net"], message().as_bytes(policy=SMTP))
    [entry] = queued(server)
    assert str(entry["tls"]).startswith("TLSv1.")
    text = content_of(server, str(entry["id"]))
    assert "with ESMTPS id" in text and "(using TLSv1." in text


def test_pipelined_batch_gets_every_reply_in_order(raw: RawClient) -> None:
    raw.send(
        b"EHLO x\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\n"
        b"RCPT TO:<c@example.net>\r\nDATA\r\n"
    )
    ehlo, mail, rcpt1, rcpt2, data = raw.replies(5)
    assert ehlo.startswith(b"250-") and b"PIPELINING" in ehlo
    assert mail == b"250 2.1.0 Ok"
    assert rcpt1 == rcpt2 == b"250 2.1.5 Ok"
    assert data.startswith(b"354 ")
    raw.send(b"Subject: x\r\n\r\nbody\r\n.\r\nQUIT\r\n")
    assert raw.reply().startswith(b"250 2.0.0 Ok: queued as ")
    assert raw.reply() == b"221 2.0.0 Bye"
    assert raw.closed()


@pytest.mark.parametrize(
    ("commands", "expected"),
    [
        ([b"MAIL FROM:<a@example.com>"], b"503 5.5.1"),
        ([b"EHLO x", b"RCPT TO:<b@example.net>"], b"503 5.5.1"),
        ([b"EHLO x", b"DATA"], b"503 5.5.1"),
        ([b"EHLO x", b"MAIL FROM:<a@example.com>", b"MAIL FROM:<a@example.com>"], b"503 5.5.1"),
        ([b"EHLO x", b"MAIL FROM:<a@example.com>", b"DATA"], b"503 5.5.1"),
        ([b"FOO bar"], b"500 5.5.2"),
        ([b"EHLO"], b"501 5.5.4"),
        ([b"EHLO x", b"MAIL FROM:a@example.com"], b"501 5.5.4"),
        ([b"EHLO x", b"MAIL FROM:<a@@example.com>"], b"501 5.1.7"),
        ([b"EHLO x", b"MAIL FROM:<a@example.com> FOO=bar"], b"555 5.5.4"),
        ([b"EHLO x", b"MAIL FROM:<a@example.com>", b"RCPT TO:<>"], b"501 5.1.3"),
        ([b"EHLO x", b"MAIL FROM:<a@example.com> SIZE=999999999999"], b"552 5.3.4"),
        ([b"EHLO x", b"MAIL FROM:<\xc3\xa9@example.com>"], b"553 5.6.7"),
        ([b"HELO x", b"MAIL FROM:<a@example.com> SIZE=10"], b"555 5.5.4"),
        ([b"VRFY bob"], b"252 2.5.0"),
        ([b"EXPN list"], b"502 5.5.1"),
        ([b"NOOP"], b"250 2.0.0"),
        ([b"RSET"], b"250 2.0.0"),
        ([b"HELP"], b"214"),
        ([b"EHLO x", b"AUTH PLAIN AGEAYg=="], b"538 5.7.11"),
    ],
)
def test_command_replies(raw: RawClient, commands: list[bytes], expected: bytes) -> None:
    for command in commands[:-1]:
        assert raw.cmd(command).startswith(b"250")
    reply = raw.cmd(commands[-1])
    assert reply.startswith(expected), reply
    assert raw.cmd(b"NOOP") == b"250 2.0.0 Ok", "the session goes on after a refusal"


def test_utf8_address_with_smtputf8(server: Server, raw: RawClient) -> None:
    raw.cmd(b"EHLO x")
    assert raw.cmd("MAIL FROM:<élodie@exemple.fr> SMTPUTF8".encode()) == b"250 2.1.0 Ok"
    assert raw.cmd("RCPT TO:<józef@przykład.pl>".encode()) == b"250 2.1.5 Ok"
    assert raw.cmd(b"DATA").startswith(b"354")
    raw.send("Subject: é\r\n\r\nż\r\n.\r\n".encode())
    assert raw.reply().startswith(b"250 2.0.0")
    [entry] = queued(server)
    assert entry["sender"] == "élodie@exemple.fr"
    assert "with UTF8ESMTP id" in content_of(server, str(entry["id"]))


def test_dsn_parameters_are_stored_with_the_envelope(server: Server, raw: RawClient) -> None:
    raw.cmd(b"EHLO x")
    assert raw.cmd(b"MAIL FROM:<a@example.com> RET=HDRS ENVID=QQ+2B314 BODY=8BITMIME").startswith(
        b"250"
    )
    assert raw.cmd(
        b"RCPT TO:<b@example.net> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;b+2Bx@example.net"
    ).startswith(b"250")
    raw.cmd(b"DATA")
    raw.send(b"Subject: dsn\r\n\r\nx\r\n.\r\n")
    assert raw.reply().startswith(b"250")
    [entry] = queued(server)
    assert entry["mail_params"] == {"RET": "HDRS", "ENVID": "QQ+314", "BODY": "8BITMIME"}
    [rcpt] = entry["recipients"]  # type: ignore[misc]
    assert rcpt["params"] == {"NOTIFY": "SUCCESS,FAILURE", "ORCPT": "rfc822;b+x@example.net"}


def test_bdat_chunks(server: Server, raw: RawClient) -> None:
    raw.cmd(b"EHLO x")
    raw.cmd(b"MAIL FROM:<a@example.com>")
    raw.cmd(b"RCPT TO:<b@example.net>")
    first = b"Subject: bdat\r\n\r\nline one\r\n"
    raw.send(b"BDAT %d\r\n" % len(first) + first)
    assert raw.reply() == b"250 2.0.0 %d octets received" % len(first)
    last = b".line two starts with a dot\r\n"
    raw.send(b"BDAT %d LAST\r\n" % len(last) + last)
    assert raw.reply().startswith(b"250 2.0.0 Ok: queued as")
    [entry] = queued(server)
    text = content_of(server, str(entry["id"]))
    assert "line one\n.line two starts with a dot" in text.replace("\r\n", "\n")


def test_bdat_zero_last_and_data_after_bdat(raw: RawClient) -> None:
    raw.cmd(b"EHLO x")
    raw.cmd(b"MAIL FROM:<a@example.com>")
    raw.cmd(b"RCPT TO:<b@example.net>")
    raw.send(b"BDAT 3\r\nabc")
    assert raw.reply() == b"250 2.0.0 3 octets received"
    assert raw.cmd(b"DATA").startswith(b"503 5.5.1")
    assert raw.cmd(b"BDAT 0 LAST").startswith(b"250 2.0.0 Ok: queued as")


def test_bdat_without_transaction_reads_the_chunk_then_refuses(raw: RawClient) -> None:
    raw.cmd(b"EHLO x")
    raw.send(b"BDAT 10 LAST\r\nMAIL FROM:")  # 10 octets of chunk that must not run as a command
    assert raw.reply().startswith(b"503 5.5.1")
    assert raw.cmd(b"NOOP") == b"250 2.0.0 Ok"


def test_oversize_message_is_refused_after_the_data(tmp_path: Path) -> None:
    with running_server(tmp_path, "[limits]\nmax_message_size = 65536\n", roles=("mx",)) as srv:
        client = RawClient(srv.port)
        client.cmd(b"EHLO x")
        assert client.cmd(b"MAIL FROM:<a@example.com> SIZE=70000").startswith(b"552 5.3.4")
        client.cmd(b"MAIL FROM:<a@example.com>")
        client.cmd(b"RCPT TO:<b@example.net>")
        client.cmd(b"DATA")
        client.send(b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 100 + b".\r\n")
        assert client.reply().startswith(b"552 5.3.4")
        assert client.cmd(b"NOOP") == b"250 2.0.0 Ok"
        client.close()
        assert srv.queue_count() == 0
        assert "too big" in srv.log()


def test_overlong_command_line(raw: RawClient) -> None:
    assert raw.cmd(b"NOOP " + b"x" * 600).startswith(b"500 5.5.0")
    assert raw.cmd(b"NOOP") == b"250 2.0.0 Ok"


def test_too_many_recipients(tmp_path: Path) -> None:
    with running_server(tmp_path, "[limits]\nmax_recipients = 100\n", roles=("mx",)) as srv:
        client = RawClient(srv.port)
        client.cmd(b"EHLO x")
        client.cmd(b"MAIL FROM:<a@example.com>")
        client.send(b"".join(b"RCPT TO:<r%d@example.net>\r\n" % i for i in range(101)))
        replies = client.replies(101)
        assert replies[:100] == [b"250 2.1.5 Ok"] * 100
        assert replies[100].startswith(b"452 4.5.3")
        client.close()


def test_too_many_errors_closes_with_421(tmp_path: Path) -> None:
    with running_server(tmp_path, "[limits]\nmax_errors = 3\n", roles=("mx",)) as srv:
        client = RawClient(srv.port)
        for _ in range(3):
            assert client.cmd(b"BOGUS").startswith(b"500 5.5.2")
        assert client.cmd(b"BOGUS").startswith(b"421 4.7.0")
        assert client.closed()


def test_early_talker_is_refused(tmp_path: Path) -> None:
    with running_server(tmp_path, "[limits]\ngreeting_delay = 1.0\n", roles=("mx",)) as srv:
        client = RawClient(srv.port, greet=False)
        client.send(b"EHLO impatient\r\n")
        assert client.reply().startswith(b"554 5.5.1")
        assert client.closed()
        assert "early talker" in srv.log()
        patient = RawClient(srv.port)  # waits for the greeting, then talks
        assert patient.cmd(b"EHLO patient").startswith(b"250")
        patient.close()


def test_idle_timeout(tmp_path: Path) -> None:
    with running_server(tmp_path, "[limits]\ncommand_timeout = 1.0\n", roles=("mx",)) as srv:
        client = RawClient(srv.port)
        assert client.reply().startswith(b"421 4.4.2")
        assert client.closed()


def test_connection_limit_per_ip(tmp_path: Path) -> None:
    extra = "[limits]\nmax_connections_per_ip = 2\n[policy]\ntrusted_networks = []\n"
    with running_server(tmp_path, extra, roles=("mx",)) as srv:
        first, second = RawClient(srv.port), RawClient(srv.port)
        third = RawClient(srv.port, greet=False)
        assert third.reply().startswith(b"421 4.7.0")
        assert third.closed()
        first.close()
        second.close()


def test_relay_denied_for_untrusted_clients(tmp_path: Path) -> None:
    extra = '[policy]\ntrusted_networks = []\nrelay_domains = ["relay.example"]\n'
    with running_server(tmp_path, extra, roles=("mx",)) as srv:
        client = RawClient(srv.port)
        client.cmd(b"EHLO x")
        client.cmd(b"MAIL FROM:<a@example.com>")
        assert client.cmd(b"RCPT TO:<b@elsewhere.example>").startswith(b"554 5.7.1")
        assert client.cmd(b"RCPT TO:<b@RELAY.example>") == b"250 2.1.5 Ok"
        # No local mailboxes yet, postmaster included: refused, never bounced later.
        assert client.cmd(b"RCPT TO:<postmaster>").startswith(b"550 5.1.1")
        client.close()


def test_swaks_sends_a_message(server: Server) -> None:
    import shutil
    import subprocess

    swaks = shutil.which("swaks")
    if swaks is None:
        pytest.skip("swaks is not installed (./dev test installs it as root)")
    out = subprocess.run(
        [
            swaks,
            "--server",
            "127.0.0.1",
            "--port",
            str(server.port),
            "--from",
            "a@example.com",
            "--to",
            "b@example.net",
            "--header",
            "Subject: from swaks",
            "--pipeline",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "250 2.0.0 Ok: queued as" in out.stdout
    [entry] = queued(server)
    assert "Subject: from swaks" in content_of(server, str(entry["id"]))


def test_storage_full_gets_452_and_harms_nothing_queued(tmp_path: Path) -> None:
    extra = "[queue]\nmap_size_mb = 1\nmax_map_size_mb = 2\n"
    with running_server(tmp_path, extra, roles=("mx",)) as srv:
        client = RawClient(srv.port)
        client.cmd(b"EHLO x")
        body = b"Subject: filler\r\n\r\n" + (b"y" * 78 + b"\r\n") * 800  # ~64 KiB
        accepted, final = 0, b""
        for _ in range(100):
            client.cmd(b"MAIL FROM:<a@example.com>")
            client.cmd(b"RCPT TO:<b@example.net>")
            client.cmd(b"DATA")
            client.send(body + b".\r\n")
            final = client.reply()
            if not final.startswith(b"250"):
                break
            accepted += 1
        assert final.startswith(b"452 4.3.1"), final
        assert 0 < accepted < 100
        assert client.cmd(b"NOOP") == b"250 2.0.0 Ok", "the server keeps running"
        client.close()
        assert srv.queue_count() == accepted
        assert "queue full" in srv.log()
        assert "growing the queue map from 1 MiB to 2 MiB" in srv.log()


def test_text_line_limit_when_configured(tmp_path: Path) -> None:
    with running_server(tmp_path, "[limits]\nmax_text_line = 1000\n", roles=("mx",)) as srv:
        client = RawClient(srv.port)
        client.cmd(b"EHLO x")
        for line, expected in ((b"x" * 998, b"250 2.0.0"), (b"x" * 999, b"550 5.6.0")):
            client.cmd(b"MAIL FROM:<a@example.com>")
            client.cmd(b"RCPT TO:<b@example.net>")
            client.cmd(b"DATA")
            client.send(b"Subject: long\r\n\r\n" + line + b"\r\n.\r\n")
            assert client.reply().startswith(expected)
        client.close()
        assert srv.queue_count() == 1
