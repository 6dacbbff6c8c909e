"""The LMTP listener (RFC 2033) against a real `tachymail serve`: smtplib.LMTP and raw bytes.

Every test reads what arrived from the mailbox store itself (the LMDB environment the
server writes), as a POP3 or IMAP session would.
"""

from __future__ import annotations

import json
import smtplib
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import RawClient
from server import Server, run_cli, running_server
from tachymail.mailbox import MailboxStore

EXTRA = '[policy]\nlocal_domains = ["example.test"]\n'
SENDER = "sender@far.example"


def add_user(srv: Server, name: str, quota: str = "0") -> None:
    run_cli("user", "add", "-c", str(srv.config_path), name, "--quota", quota, stdin="pw\n")


def mailbox(srv: Server, user: str) -> list[bytes]:
    """The INBOX of *user* as stored, in UID order."""
    store = MailboxStore(srv.data_dir / "mailbox", readonly=True)
    try:
        found = [store.content(info.content_id) for info in store.messages(user)]
    finally:
        store.close()
    assert None not in found
    return [content for content in found if content is not None]


def message(subject: str, body: bytes = b"Hello.\r\n") -> bytes:
    return (
        f"From: <{SENDER}>\r\nTo: <alice@example.test>\r\nSubject: {subject}\r\n"
        f"Message-ID: <{subject.replace(' ', '-')}@far.example>\r\n\r\n"
    ).encode() + body


@pytest.fixture
def lmtp(tmp_path: Path) -> Iterator[Server]:
    """A server with an lmtp listener, local domain example.test, users alice (no quota)
    and bob (4K), and the alias team@ -> alice, bob."""
    with running_server(tmp_path, extra=EXTRA, roles=("mx", "lmtp")) as srv:
        add_user(srv, "alice@example.test")
        add_user(srv, "bob@example.test", "4K")
        run_cli(
            "alias", "add", "-c", str(srv.config_path), "team@example.test",
            "alice@example.test", "bob@example.test",
        )  # fmt: skip
        yield srv


def connect(srv: Server) -> smtplib.LMTP:
    client = smtplib.LMTP("127.0.0.1", srv.ports["lmtp"], timeout=30)
    code, _ = client.ehlo("mta.far.example")  # smtplib.LMTP sends LHLO
    assert code == 250
    return client


def test_lhlo_advertises_lmtp_extensions_and_helo_is_refused(lmtp: Server) -> None:
    raw = RawClient(lmtp.ports["lmtp"], greet=False)
    try:
        assert raw.reply().startswith(b"220 mx.test.example LMTP")
        assert raw.cmd(b"HELO mta.far.example").startswith(b"500 5.5.1 ")
        assert raw.cmd(b"EHLO mta.far.example").startswith(b"500 5.5.1 ")
        assert raw.cmd(b"MAIL FROM:<a@far.example>").startswith(b"503 5.5.1 ")
        lhlo = raw.cmd(b"LHLO mta.far.example")
        lines = lhlo.split(b"\r\n")
        assert lines[0] == b"250-mx.test.example"
        keywords = {line[4:].split(b" ")[0] for line in lines[1:]}
        for wanted in (b"PIPELINING", b"8BITMIME", b"ENHANCEDSTATUSCODES", b"SIZE", b"CHUNKING"):
            assert wanted in keywords
        assert b"STARTTLS" in keywords  # the server has a (self-signed) certificate
        assert b"AUTH" not in keywords and b"DSN" not in keywords
        assert raw.cmd(b"AUTH PLAIN AGFsaWNlAHB3").startswith(b"502 5.5.1 ")
        assert raw.cmd(b"QUIT").startswith(b"221 ")
    finally:
        raw.close()
    with connect(lmtp) as client:
        for feature in ("pipelining", "8bitmime", "enhancedstatuscodes", "size", "chunking"):
            assert client.has_extn(feature)


def test_one_reply_per_recipient_after_data(lmtp: Server) -> None:
    body = b"x" * 70 + b"\r\n"
    big = message("big", body * 80)  # about 5.7 KB: over bob's 4K quota
    with connect(lmtp) as client:
        assert client.mail(SENDER)[0] == 250
        assert client.rcpt("alice@example.test")[0] == 250
        code, text = client.rcpt("nobody@example.test")
        assert (code, text[:5]) == (550, b"5.1.1")
        code, text = client.rcpt("someone@elsewhere.example")  # LMTP does not relay
        assert (code, text[:5]) == (550, b"5.1.1")
        assert client.rcpt("bob@example.test")[0] == 250
        code, text = client.data(big)  # the first reply: alice's
        assert (code, text[:5]) == (250, b"2.0.0")
        code, text = client.getreply()  # bob's: over quota, retry later
        assert (code, text[:5]) == (452, b"4.2.2")
        assert client.noop()[0] == 250  # no third reply was owed
    [stored] = mailbox(lmtp, "alice@example.test")
    assert stored.startswith(
        f"Return-Path: <{SENDER}>\r\nDelivered-To: alice@example.test\r\nReceived: ".encode()
    )
    assert b"by mx.test.example (Tachymail) with LMTP id " in stored
    assert stored.endswith(big)
    assert mailbox(lmtp, "bob@example.test") == []
    log = lmtp.log()  # a line per delivery, with the outcome
    assert "LMTP <alice@example.test> to <alice@example.test>: delivered (uid 1," in log
    assert "LMTP <bob@example.test> to <bob@example.test>: not delivered (bob@" in log


def test_full_mailbox_refused_at_rcpt(lmtp: Server) -> None:
    with connect(lmtp) as client:
        client.sendmail(SENDER, ["bob@example.test"], message("fills bob", b"y" * 3000 + b"\r\n"))
        # 3 KB of 4K used: a message announced at 2000 octets would not fit.
        assert client.mail(SENDER, ["SIZE=2000"])[0] == 250
        code, text = client.rcpt("bob@example.test")
        assert (code, text[:5]) == (452, b"4.2.2")
        client.rset()
    run_cli("user", "quota", "-c", str(lmtp.config_path), "bob@example.test", "2K")
    with connect(lmtp) as client:  # now bob holds more than his quota: full at RCPT
        assert client.mail(SENDER)[0] == 250
        code, text = client.rcpt("bob@example.test")
        assert (code, text[:5]) == (452, b"4.2.2")
        assert client.rcpt("alice@example.test")[0] == 250
    assert len(mailbox(lmtp, "bob@example.test")) == 1


def test_pipelined_transactions(lmtp: Server) -> None:
    raw = RawClient(lmtp.ports["lmtp"])
    try:
        raw.send(
            b"LHLO mta.far.example\r\nMAIL FROM:<a@far.example>\r\n"
            b"RCPT TO:<alice@example.test>\r\nRCPT TO:<ghost@example.test>\r\n"
            b"RCPT TO:<bob@example.test>\r\nDATA\r\n"
        )
        assert raw.reply().startswith(b"250-mx.test.example")
        lhlo_after = raw.replies(5)
        assert [r[:3] for r in lhlo_after] == [b"250", b"250", b"550", b"250", b"354"]
        # The body, a second whole transaction and QUIT in one write.
        raw.send(
            b"Subject: one\r\n\r\nfirst\r\n.\r\n"
            b"MAIL FROM:<b@far.example>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n"
        )
        first = raw.replies(2)  # alice, bob: two accepted RCPTs, two replies
        assert [r[:9] for r in first] == [b"250 2.0.0"] * 2
        assert b"<alice@example.test>" in first[0] and b"<bob@example.test>" in first[1]
        assert [r[:3] for r in raw.replies(3)] == [b"250", b"250", b"354"]
        raw.send(b"Subject: two\r\n\r\nsecond\r\n.\r\nQUIT\r\n")
        assert raw.reply().startswith(b"250 2.0.0 <bob@example.test>")
        assert raw.reply().startswith(b"221 ")
    finally:
        raw.close()
    assert [
        m.endswith(b"Subject: one\r\n\r\nfirst\r\n") for m in mailbox(lmtp, "alice@example.test")
    ] == [True]
    bobs = mailbox(lmtp, "bob@example.test")
    assert [m.rsplit(b"\r\n\r\n", 1)[1] for m in bobs] == [b"first\r\n", b"second\r\n"]


def test_bdat_chunks_and_an_alias_delivered_once(lmtp: Server) -> None:
    raw = RawClient(lmtp.ports["lmtp"])
    part1 = b"Subject: chunked\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
    part2 = "Grüße, ünïcode 8-bit body\r\n".encode()
    try:
        raw.cmd(b"LHLO mta.far.example")
        assert raw.cmd(b"MAIL FROM:<c@far.example> BODY=8BITMIME").startswith(b"250 ")
        assert raw.cmd(b"RCPT TO:<alice@example.test>").startswith(b"250 ")
        assert raw.cmd(b"RCPT TO:<team@example.test>").startswith(b"250 ")  # alice and bob
        raw.send(b"BDAT %d\r\n" % len(part1) + part1)
        assert raw.reply() == b"250 2.0.0 %d octets received" % len(part1)
        raw.send(b"BDAT %d LAST\r\n" % len(part2) + part2)
        replies = raw.replies(2)
        assert replies[0].startswith(b"250 2.0.0 <alice@example.test>")
        assert replies[1].startswith(b"250 2.0.0 <team@example.test>")
    finally:
        raw.close()
    # alice was named twice (herself, and through team@) and gets one copy.
    for user in ("alice@example.test", "bob@example.test"):
        [stored] = mailbox(lmtp, user)
        assert stored.endswith(part1 + part2)
        assert f"Delivered-To: {user}\r\n".encode() in stored


def test_a_loop_is_refused_for_its_recipient_only(lmtp: Server) -> None:
    looped = b"Delivered-To: alice@example.test\r\n" + message("loop")
    with connect(lmtp) as client:
        assert client.mail(SENDER)[0] == 250
        assert client.rcpt("alice@example.test")[0] == 250
        assert client.rcpt("bob@example.test")[0] == 250
        code, text = client.data(looped)
        assert (code, text[:5]) == (554, b"5.4.6")
        code, text = client.getreply()
        assert (code, text[:5]) == (250, b"2.0.0")
        # Only the looping recipient: nothing to commit at all, the one reply is 554.
        assert client.mail(SENDER)[0] == 250
        assert client.rcpt("alice@example.test")[0] == 250
        code, text = client.data(looped)
        assert (code, text[:5]) == (554, b"5.4.6")
        assert client.noop()[0] == 250
    assert mailbox(lmtp, "alice@example.test") == []
    [stored] = mailbox(lmtp, "bob@example.test")
    assert stored.endswith(looped)
    assert "LMTP <alice@example.test>: refused: mail loop" in lmtp.log()


def test_smuggling_refusal_repeated_for_each_recipient(lmtp: Server) -> None:
    raw = RawClient(lmtp.ports["lmtp"])
    try:
        raw.cmd(b"LHLO mta.far.example")
        raw.cmd(b"MAIL FROM:<d@far.example>")
        raw.cmd(b"RCPT TO:<alice@example.test>")
        raw.cmd(b"RCPT TO:<bob@example.test>")
        assert raw.cmd(b"DATA").startswith(b"354 ")
        # A bare LF in the body: refused by the smuggling guard, once per recipient.
        raw.send(b"Subject: smuggle\r\n\r\nline\n.\nMAIL FROM:<x@y>\r\n.\r\n")
        assert [r[:9] for r in raw.replies(2)] == [b"550 5.6.0"] * 2
        assert raw.cmd(b"NOOP").startswith(b"250 ")
    finally:
        raw.close()
    assert mailbox(lmtp, "alice@example.test") == []
    assert mailbox(lmtp, "bob@example.test") == []


def test_size_limit_answered_per_recipient(tmp_path: Path) -> None:
    extra = EXTRA + "[limits]\nmax_message_size = 65536\n"
    with running_server(tmp_path, extra=extra, roles=("lmtp",)) as srv:
        add_user(srv, "alice@example.test")
        add_user(srv, "bob@example.test")
        with connect(srv) as client:
            assert client.mail(SENDER)[0] == 250
            assert client.rcpt("alice@example.test")[0] == 250
            assert client.rcpt("bob@example.test")[0] == 250
            code, text = client.data(message("huge", b"z" * 998 + b"\r\n") * 70)
            assert (code, text[:5]) == (552, b"5.3.4")
            code, text = client.getreply()
            assert (code, text[:5]) == (552, b"5.3.4")
            assert client.noop()[0] == 250
        assert mailbox(srv, "alice@example.test") == []


def test_remote_alias_target_is_queued(lmtp: Server) -> None:
    run_cli(
        "alias", "add", "-c", str(lmtp.config_path), "list@example.test",
        "alice@example.test", "friend@remote.example",
    )  # fmt: skip
    with connect(lmtp) as client:
        refused = client.sendmail(SENDER, ["list@example.test"], message("to the list"))
        assert refused == {}
    assert len(mailbox(lmtp, "alice@example.test")) == 1
    assert lmtp.queue_count() == 1  # the server holds delivery: friend@'s copy waits
    [queued] = [
        json.loads(line)
        for line in run_cli("queue", "list", "--json", "-c", str(lmtp.config_path)).splitlines()
    ]
    assert queued["sender"] == SENDER
    # Only the remote target is queued (alice has her copy), with the address the client gave.
    [friend] = queued["recipients"]
    assert friend["address"] == "friend@remote.example"
    assert friend["params"]["ORCPT"] == "rfc822;list@example.test"


def test_untrusted_clients_are_refused(tmp_path: Path) -> None:
    extra = EXTRA + 'trusted_networks = ["192.0.2.0/24"]\n'
    with running_server(tmp_path, extra=extra, roles=("lmtp",)) as srv:
        raw = RawClient(srv.ports["lmtp"], greet=False)
        try:
            assert raw.reply().startswith(b"554 5.7.1 ")
            assert raw.closed()
        finally:
            raw.close()


def test_full_store_defers_with_452_4_3_1(tmp_path: Path) -> None:
    # A 1 MiB map that may not grow: a 1.5 MB message cannot be stored, a small one can.
    extra = EXTRA + "[mailbox]\nmap_size_mb = 1\nmax_map_size_mb = 1\n"
    with running_server(tmp_path, extra=extra, roles=("lmtp",)) as srv:
        add_user(srv, "alice@example.test")
        with connect(srv) as client:
            assert client.mail(SENDER)[0] == 250
            assert client.rcpt("alice@example.test")[0] == 250
            code, text = client.data(message("too much", (b"w" * 998 + b"\r\n") * 1500))
            assert (code, text[:5]) == (452, b"4.3.1")
            refused = client.sendmail(SENDER, ["alice@example.test"], message("small"))
            assert refused == {}
        [kept] = mailbox(srv, "alice@example.test")
        assert kept.endswith(message("small"))
        assert "no room" in srv.log() or "maximum size" in srv.log()


def test_header_checks_hold_or_reject_for_every_recipient(tmp_path: Path) -> None:
    extra = EXTRA + (
        "[[header_check]]\npattern = '^Subject: hold me'\naction = \"hold\"\n\n"
        "[[header_check]]\npattern = '^Subject: reject me'\naction = \"reject\"\n"
    )
    with running_server(tmp_path, extra=extra, roles=("lmtp",)) as srv:
        add_user(srv, "alice@example.test")
        add_user(srv, "bob@example.test")
        with connect(srv) as client:
            for subject, expected in (("reject me", (550, b"5.7.1")), ("hold me", (250, b"2.0.0"))):
                assert client.mail(SENDER)[0] == 250
                assert client.rcpt("alice@example.test")[0] == 250
                assert client.rcpt("bob@example.test")[0] == 250
                code, text = client.data(message(subject))
                assert (code, text[:5]) == expected
                code, text = client.getreply()
                assert (code, text[:5]) == expected
        # Held: in the queue for both users, not in their mailboxes until released.
        lines = run_cli("queue", "list", "--json", "--state", "held", "-c", str(srv.config_path))
        [held] = [json.loads(line) for line in lines.splitlines()]
        assert sorted(r["address"] for r in held["recipients"]) == [
            "alice@example.test",
            "bob@example.test",
        ]
        assert mailbox(srv, "alice@example.test") == []
        assert mailbox(srv, "bob@example.test") == []


def test_starttls_then_lhlo_again(lmtp: Server, client_tls: ssl.SSLContext) -> None:
    with connect(lmtp) as client:
        assert client.starttls(context=client_tls)[0] == 220
        client.ehlo("mta.far.example")  # LHLO again, inside TLS
        assert not client.has_extn("starttls")
        assert client.sendmail(SENDER, ["alice@example.test"], message("secret")) == {}
    [stored] = mailbox(lmtp, "alice@example.test")
    assert b"with LMTPS id " in stored and b"(using TLSv1." in stored


@pytest.mark.parametrize("commit", ["thread", "inline"])
def test_concurrent_sessions_get_every_message_stored(tmp_path: Path, commit: str) -> None:
    """Sessions whose messages finish together share group commits, with the commit in a
    thread (the default) or in the event loop: each 250 means the message is stored."""
    extra = f'{EXTRA}[mailbox]\ncommit = "{commit}"\n'
    with running_server(tmp_path, extra=extra, roles=("mx", "lmtp")) as srv:
        users = [f"user{n}@example.test" for n in range(4)]
        for user in users:
            add_user(srv, user)
        refused: list[object] = []

        def send(user: str) -> None:
            with connect(srv) as client:
                for n in range(10):
                    refused.append(client.sendmail(SENDER, [user], message(f"{user} {n}")))

        threads = [threading.Thread(target=send, args=(user,)) for user in users]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert refused == [{}] * 40
        for user in users:
            stored = mailbox(srv, user)
            assert [m.count(f"Subject: {user} ".encode()) for m in stored] == [1] * 10
            assert sorted(m.rsplit(b"Subject: ", 1)[1].split(b"\r\n", 1)[0] for m in stored) == [
                f"{user} {n}".encode() for n in range(10)
            ]
