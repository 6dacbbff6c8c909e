"""Mail-loop detection at intake: a message that has already made too many hops is
refused after DATA/BDAT with 554 5.4.6 (issue 17, defect 1)."""

from __future__ import annotations

import smtplib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from conftest import RawClient
from server import Server, free_port, metric, running_server, wait_until


def looped(hops: int, delivered_to: int = 0) -> bytes:
    fields = "".join(
        f"Received: from relay{i}.example ([192.0.2.{i % 250}])\r\n"
        f"\tby relay{i + 1}.example with ESMTP id {i:06d};\r\n"
        f"\tTue, 1 Dec 2026 12:00:{i % 60:02d} +0000\r\n"
        for i in range(hops)
    )
    fields += "".join(f"Delivered-To: user{i}@example.com\r\n" for i in range(delivered_to))
    return (
        f"{fields}From: a@example.com\r\nTo: b@example.net\r\nSubject: loop\r\n\r\nbody\r\n"
    ).encode()


def send(port: int, content: bytes) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as client:
        client.ehlo("client.test")
        client.mail("a@example.com")
        assert client.rcpt("b@example.net")[0] == 250
        return client.data(content)


def test_51_received_headers_are_refused_after_data_and_50_accepted(server: Server) -> None:
    code, text = send(server.port, looped(51))
    assert (code, text) == (554, b"5.4.6 Too many hops")
    code, text = send(server.port, looped(50))
    assert code == 250, text
    assert server.queue_count() == 1
    assert "too many hops (51 Received/Delivered-To, limit 50)" in server.log()


def test_delivered_to_fields_count_as_hops(server: Server) -> None:
    assert send(server.port, looped(40, delivered_to=11))[0] == 554
    assert send(server.port, looped(40, delivered_to=10))[0] == 250


def test_bdat_and_a_folded_received_field_count_once(server: Server) -> None:
    client = RawClient(server.port)
    client.cmd(b"EHLO client.test")
    assert client.cmd(b"MAIL FROM:<a@example.com>").startswith(b"250")
    assert client.cmd(b"RCPT TO:<b@example.net>").startswith(b"250")
    content = looped(51)
    client.send(b"BDAT %d LAST\r\n" % len(content) + content)
    assert client.reply() == b"554 5.4.6 Too many hops"
    # The session goes on: the next transaction is accepted.
    assert client.cmd(b"MAIL FROM:<a@example.com>").startswith(b"250")
    assert client.cmd(b"RCPT TO:<b@example.net>").startswith(b"250")
    content = looped(50)
    client.send(b"BDAT %d LAST\r\n" % len(content) + content)
    assert client.reply().startswith(b"250 2.0.0")


def test_hop_limit_is_configurable_and_refusals_are_counted(tmp_path: Path) -> None:
    metrics = free_port()
    extra = f'[policy]\nmax_hops = 3\n[metrics]\naddress = "127.0.0.1:{metrics}"\n'
    with running_server(tmp_path, extra, roles=("mx",)) as srv:
        assert send(srv.port, looped(4))[0] == 554
        assert send(srv.port, looped(5))[0] == 554
        assert send(srv.port, looped(3))[0] == 250
        wait_until(lambda: metric(metrics, "tachymail_messages_rejected_total", reason="loop") == 2)
