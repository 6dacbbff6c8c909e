"""`tachymail sink --record` and its scripted replies per client address, with real clients.

Clients are smtplib (and raw sockets where smtplib hides the bytes) connecting
from 127.0.0.1 and from other loopback addresses (source_address), as the
delivery workers' egress sources do; the sink is a real process, stopped by PID.
"""

from __future__ import annotations

import json
import smtplib
import socket
import subprocess
import sys
from email.message import EmailMessage
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from recording_sink import RecordingSink, recording_sink
from server import free_port, run_cli, tachymail_cmd
from tachymail.loadtest.options import parse_scripted_reply
from tachymail.loadtest.sink import RECORD_HEADERS_MAX, ScriptedReplies, header_block

RATE_421 = "421 4.7.28 Our system has detected an unusual rate"
TSS04 = "451 4.7.0 [TSS04] Messages from 127.0.0.4 temporarily deferred"


def client(sink: RecordingSink, source: str, name: str) -> smtplib.SMTP:
    """An smtplib session from *source* that has said EHLO *name*."""
    smtp = smtplib.SMTP(
        "127.0.0.1", sink.port, local_hostname=name, source_address=(source, 0), timeout=20
    )
    smtp.ehlo()
    return smtp


def message(subject: str, body: str = "Hello there.\n") -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "sender@example.org"
    msg["To"] = "a@dest.test"
    msg["Subject"] = subject
    msg["X-Tachymail-Test"] = "recorded"
    msg.set_content(body)
    return msg


def raw_reply(sock: socket.socket) -> bytes:
    """One whole reply (multi-line included) from *sock*; b"" at EOF."""
    data = b""
    while True:
        chunk = sock.recv(4096)
        if not chunk:
            return data
        data += chunk
        lines = data.split(b"\r\n")
        if len(lines) > 1 and len(lines[-2]) >= 4 and lines[-2][3:4] == b" ":
            return data


def test_record_shows_peer_ehlo_recipients_and_headers(tmp_path: Path) -> None:
    with recording_sink(tmp_path) as sink:
        one = client(sink, "127.0.0.1", "one.example.test")
        one.send_message(
            message("from one", "body line\n" * 50),
            from_addr="bounce@one.example",
            to_addrs=["a@dest.test", "b@dest.test"],
        )
        one.quit()
        two = client(sink, "127.0.0.2", "two.example.test")
        two.send_message(message("from two"), from_addr="", to_addrs=["c@dest.test"])
        two.quit()
        # BDAT in two chunks, from a third address.
        with socket.create_connection(
            ("127.0.0.1", sink.port), timeout=20, source_address=("127.0.0.3", 0)
        ) as raw:
            assert raw_reply(raw).startswith(b"220 ")
            raw.sendall(b"EHLO three.example.test\r\n")
            assert b"CHUNKING" in raw_reply(raw)
            first = b"Subject: chunked\r\nX-Part: 1\r\n"
            second = b"\r\nbody\r\n"
            raw.sendall(b"MAIL FROM:<x@three.example>\r\n")
            assert raw_reply(raw).startswith(b"250 ")
            raw.sendall(b"RCPT TO:<d@dest.test>\r\n")
            assert raw_reply(raw).startswith(b"250 ")
            raw.sendall(b"BDAT %d\r\n%s" % (len(first), first))
            assert raw_reply(raw).startswith(b"250 ")
            raw.sendall(b"BDAT %d LAST\r\n%s" % (len(second), second))
            assert raw_reply(raw).startswith(b"250 ")
            raw.sendall(b"QUIT\r\n")
            assert raw_reply(raw).startswith(b"221 ")
        # The record is readable while the sink runs.
        assert len(sink.wait_for_messages(3)) == 3
        counters = sink.stop()

    assert counters["messages"] == 3 and counters["connections"] == 3
    connects = sink.connections()
    assert [c["peer"] for c in connects] == ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
    assert len({c["conn"] for c in connects}) == 3
    assert all(isinstance(c["port"], int) and c["port"] > 0 for c in connects)
    names = sink.helo_names()
    assert [names[c["conn"]] for c in connects] == [
        "one.example.test",
        "two.example.test",
        "three.example.test",
    ]

    by_peer = sink.by_peer()
    (first_msg,) = by_peer["127.0.0.1"]
    assert first_msg["ehlo"] == "one.example.test"
    assert first_msg["sender"] == "bounce@one.example"
    assert first_msg["rcpts"] == ["a@dest.test", "b@dest.test"]
    assert "Subject: from one\r\n" in first_msg["headers"]
    assert "X-Tachymail-Test: recorded\r\n" in first_msg["headers"]
    assert first_msg["headers"].endswith("\r\n") and "body line" not in first_msg["headers"]
    assert first_msg["size"] > 50 * len("body line\r\n")
    assert first_msg["conn"] == connects[0]["conn"]

    (second_msg,) = by_peer["127.0.0.2"]
    assert second_msg["ehlo"] == "two.example.test"
    assert second_msg["sender"] == "" and second_msg["rcpts"] == ["c@dest.test"]
    assert "Subject: from two\r\n" in second_msg["headers"]

    (third,) = by_peer["127.0.0.3"]
    assert third["headers"] == "Subject: chunked\r\nX-Part: 1\r\n"
    assert third["size"] == len(first) + len(second)
    assert counters["bytes"] == sum(m["size"] for m in sink.messages())

    # Each connection: connect, helo, message, close, in that order and time.
    events = sink.events()
    for connect in connects:
        mine = [e for e in events if e["conn"] == connect["conn"]]
        assert [e["event"] for e in mine] == ["connect", "helo", "message", "close"]
        assert [e["t"] for e in mine] == sorted(e["t"] for e in mine)
    assert sink.arrivals() == sorted(m["t"] for m in sink.messages())


def test_reply_for_refuses_one_source_and_accepts_the_others(tmp_path: Path) -> None:
    args = (
        *("--reply-for", f"127.0.0.2={RATE_421}"),
        *("--reply-for", "127.0.0.3=550 5.7.1 Not you"),
        *("--reply-for", f"127.0.0.4@rcpt={TSS04}"),
        *("--reply-for", "127.0.0.5@data=421 4.7.0 Closing at data"),
    )
    with recording_sink(tmp_path, *args) as sink:
        refused = client(sink, "127.0.0.2", "ip2.example.test")
        code, text = refused.mail("sender@example.org")
        assert (code, text.decode()) == (421, RATE_421[4:])
        # A 421 closes the connection after the reply (RFC 5321 3.8).
        with pytest.raises(smtplib.SMTPServerDisconnected):
            refused.noop()
        refused.close()

        # A 550 is only the reply: the session goes on.
        other = client(sink, "127.0.0.3", "ip3.example.test")
        assert other.mail("sender@example.org") == (550, b"5.7.1 Not you")
        assert other.noop()[0] == 250
        other.quit()

        # Other stages: RCPT from 127.0.0.4, the end of data from 127.0.0.5 (with a 421).
        at_rcpt = client(sink, "127.0.0.4", "ip4.example.test")
        assert at_rcpt.mail("sender@example.org")[0] == 250
        assert at_rcpt.rcpt("a@dest.test") == (451, TSS04[4:].encode())
        at_rcpt.quit()
        at_data = client(sink, "127.0.0.5", "ip5.example.test")
        with pytest.raises(smtplib.SMTPDataError) as refused_data:
            at_data.send_message(message("refused at data"), to_addrs=["a@dest.test"])
        assert refused_data.value.smtp_code == 421
        with pytest.raises(smtplib.SMTPServerDisconnected):
            at_data.noop()
        at_data.close()

        accepted = client(sink, "127.0.0.1", "ip1.example.test")
        accepted.send_message(message("accepted"), to_addrs=["a@dest.test"])
        accepted.quit()
        counters = sink.stop()

    assert {m["peer"] for m in sink.messages()} == {"127.0.0.1"}
    assert counters["recipients_rejected"] == 1 and counters["messages_rejected"] == 1
    refusals = sink.refusals()
    conn_peer = {c["conn"]: c["peer"] for c in sink.connections()}
    assert [(conn_peer[r["conn"]], r["stage"], r["reply"]) for r in refusals] == [
        ("127.0.0.2", "mail", RATE_421),
        ("127.0.0.3", "mail", "550 5.7.1 Not you"),
        ("127.0.0.4", "rcpt", TSS04),
        ("127.0.0.5", "data", "421 4.7.0 Closing at data"),
    ]


def test_greeting_for_a_network_closes_or_refuses_until_quit(tmp_path: Path) -> None:
    args = (
        "--greeting-for",
        "127.0.0.1=220 custom.example.test ESMTP",
        "--greeting-for",
        "127.0.0.4=421 4.3.2 Not now",
        "--greeting-for",
        "127.0.0.0/29=554 5.7.1 No service for you",
    )
    with recording_sink(tmp_path, *args) as sink:
        # The first match wins: 127.0.0.4 gets the 421, then EOF.
        with socket.create_connection(
            ("127.0.0.1", sink.port), timeout=20, source_address=("127.0.0.4", 0)
        ) as raw:
            assert raw_reply(raw) == b"421 4.3.2 Not now\r\n"
            assert raw.recv(100) == b""
        # Elsewhere in 127.0.0.0/29: 554, then 503 to all but QUIT (RFC 5321 3.1).
        with socket.create_connection(
            ("127.0.0.1", sink.port), timeout=20, source_address=("127.0.0.5", 0)
        ) as raw:
            assert raw_reply(raw) == b"554 5.7.1 No service for you\r\n"
            for command in (b"EHLO five.example.test\r\n", b"MAIL FROM:<a@b.example>\r\n"):
                raw.sendall(command)
                assert raw_reply(raw).startswith(b"503 5.5.1 ")
            raw.sendall(b"QUIT\r\n")
            assert raw_reply(raw).startswith(b"221 ")
            assert raw.recv(100) == b""
        # A 220 only changes the greeting's text.
        with socket.create_connection(("127.0.0.1", sink.port), timeout=20) as raw:
            assert raw_reply(raw) == b"220 custom.example.test ESMTP\r\n"
            raw.sendall(b"QUIT\r\n")
            assert raw_reply(raw).startswith(b"221 ")
        ok = smtplib.SMTP("127.0.0.1", sink.port, timeout=20)
        assert ok.ehlo_resp is None and ok.ehlo()[0] == 250
        ok.send_message(message("after the greeting"), to_addrs=["a@dest.test"])
        ok.quit()
        # smtplib, as a delivery client would, sees the refusal at connect.
        with pytest.raises(smtplib.SMTPConnectError) as refused:
            smtplib.SMTP("127.0.0.1", sink.port, source_address=("127.0.0.6", 0), timeout=20)
        assert refused.value.smtp_code == 554
        counters = sink.stop()

    assert counters["connections"] == 5 and counters["connections_refused"] == 1
    assert [m["peer"] for m in sink.messages()] == ["127.0.0.1"]
    assert [(r["stage"], r["reply"][:3]) for r in sink.refusals()] == [
        ("greeting", "421"),
        ("greeting", "554"),
        ("greeting", "554"),
    ]
    assert len(sink.events("close")) == 5


def test_concurrent_connections_are_counted(tmp_path: Path) -> None:
    with recording_sink(tmp_path) as sink:
        sessions = [client(sink, f"127.0.0.{n}", f"c{n}.example.test") for n in (1, 2, 3)]
        for n, smtp in enumerate(sessions):
            smtp.send_message(message(f"parallel {n}"), to_addrs=[f"p{n}@dest.test"])
        for smtp in sessions:
            smtp.quit()
        # Once they are closed, a new connection counts one open again.
        sink.wait_for_messages(3)
        later = client(sink, "127.0.0.1", "later.example.test")
        later.quit()
        sink.stop()

    assert sink.max_concurrent() == 3
    assert max(c["open"] for c in sink.connections()) == 3
    assert [m["open"] for m in sink.messages()] == [3, 3, 3]
    assert sink.connections()[-1]["open"] == 1


def test_several_processes_append_whole_lines(tmp_path: Path) -> None:
    with recording_sink(tmp_path, "--procs", "2") as sink:
        for n in range(8):
            smtp = client(sink, f"127.0.0.{n % 3 + 1}", f"n{n}.example.test")
            smtp.send_message(message(f"message {n}"), to_addrs=[f"r{n}@dest.test"])
            smtp.quit()
        counters = sink.stop()

    # Every line parses (none torn by the other process), and connection numbers are unique.
    lines = sink.record.read_text().splitlines()
    assert all(json.loads(line) for line in lines)
    assert counters["messages"] == len(sink.messages()) == 8
    conns = [c["conn"] for c in sink.connections()]
    assert len(conns) == len(set(conns)) == 8
    assert sorted(m["rcpts"][0] for m in sink.messages()) == [f"r{n}@dest.test" for n in range(8)]
    assert sink.max_concurrent() == 1


def test_scripted_reply_syntax_and_usage_errors(tmp_path: Path) -> None:
    assert parse_scripted_reply("127.0.0.2=421 4.7.28 Slow down") == (
        "127.0.0.2/32",
        "mail",
        421,
        "421 4.7.28 Slow down",
    )
    assert parse_scripted_reply("::1@RCPT=450") == (
        "::1/128",
        "rcpt",
        450,
        "450 4.0.0 Sink says 450",
    )
    assert parse_scripted_reply("10.0.0.0/8@data=554 no").stage == "data"
    assert parse_scripted_reply("127.0.0.1=220 hi", greeting=True).line == "220 hi"
    for bad, why in [
        ("127.0.0.2", "ADDR=REPLY"),
        ("nowhere=421 x", "not an IP address"),
        ("127.0.0.2=250 ok", "4xx or 5xx"),
        ("127.0.0.2=220 hi", "4xx or 5xx"),
        ("127.0.0.2=4xx", "CODE"),
        ("127.0.0.2=421 caf\u00e9", "printable ASCII"),
        ("127.0.0.2@helo=421", "stage must be one of mail, rcpt, data"),
    ]:
        with pytest.raises(ValueError, match=why):
            parse_scripted_reply(bad)
    with pytest.raises(ValueError, match="no @STAGE"):
        parse_scripted_reply("127.0.0.2@mail=421", greeting=True)
    # The command line reports them as usage errors (exit 2) and an unwritable record too.
    out = subprocess.run(
        [*tachymail_cmd(), "sink", "127.0.0.1:1", "--reply-for", "127.0.0.2=250 ok"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "4xx or 5xx" in out.stderr
    missing = tmp_path / "no-such-dir" / "r.jsonl"
    out = subprocess.run(
        [*tachymail_cmd(), "sink", f"127.0.0.1:{free_port()}", "--record", str(missing)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "r.jsonl" in out.stderr


def test_header_block_and_address_matching() -> None:
    assert header_block(b"A: 1\r\nB: 2\r\n\r\nbody\r\n") == "A: 1\r\nB: 2\r\n"
    assert header_block(b"\r\nbody only\r\n") == ""
    assert header_block(b"A: 1\r\nno blank line\r\n") == "A: 1\r\nno blank line\r\n"
    assert header_block(b"A: \xff\r\n\r\n") == "A: \ufffd\r\n"
    big = b"X: " + b"y" * 20000 + b"\r\n\r\nbody"
    assert header_block(big) == big[:RECORD_HEADERS_MAX].decode()
    replies = ScriptedReplies(
        [
            parse_scripted_reply("127.0.0.2=421 4.7.28 Slow"),
            parse_scripted_reply("127.0.0.0/8=450 later"),
            parse_scripted_reply("127.0.0.0/8@rcpt=550 no"),
        ]
    )
    slow, later, no = (
        (b"421 4.7.28 Slow\r\n", True),
        (b"450 later\r\n", False),
        (b"550 no\r\n", False),
    )
    assert replies.lookup("127.0.0.2") == {"mail": slow, "rcpt": no}
    assert replies.lookup("::ffff:127.0.0.2") == {"mail": slow, "rcpt": no}
    assert replies.lookup("127.9.9.9") == {"mail": later, "rcpt": no}
    assert replies.lookup("::1") is None and replies.lookup("") is None


def test_record_with_store_names_the_queue_id(tmp_path: Path) -> None:
    with recording_sink(tmp_path, "--store", str(tmp_path / "store")) as sink:
        smtp = client(sink, "127.0.0.2", "stored.example.test")
        smtp.send_message(message("stored"), to_addrs=["s@dest.test"])
        smtp.quit()
        sink.stop()
    (recorded,) = sink.messages()
    assert recorded["peer"] == "127.0.0.2" and recorded["rcpts"] == ["s@dest.test"]
    assert "Subject: stored\r\n" in recorded["headers"]
    # The id the sink answered with is the one in its queue.
    ids = run_cli("queue", "list", "--json", data_dir=tmp_path / "store")
    assert recorded["queue_id"] in ids
