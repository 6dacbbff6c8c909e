"""Postfix as the MTA in front, Tachymail as its delivery agent over LMTP.

A private Postfix (benchmarks/peers.py) receives mail by SMTP for example.test and hands
it to Tachymail through ``virtual_transport = lmtp:inet:127.0.0.1:PORT``; the messages
must land in the mailbox store intact, an unknown user must bounce (refused at LMTP RCPT,
never stored), and an over-quota recipient must stay deferred in Postfix's queue.
"""

from __future__ import annotations

import os
import smtplib
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import peers
from server import Server, run_cli, running_server, wait_until
from tachymail.mailbox import MailboxStore

SENDER = "sender@far.example"


def stored(srv: Server, user: str) -> list[bytes]:
    """*user*'s INBOX as the store holds it, in UID order."""
    store = MailboxStore(srv.data_dir / "mailbox", readonly=True)
    try:
        return [store.content(m.content_id) or b"" for m in store.messages(user)]
    finally:
        store.close()


def spool_files(peer: peers.Peer, *queues: str) -> list[bytes]:
    """The files of Postfix's queue directories *queues* (deferred, defer, ...)."""
    assert peer.home is not None
    found = []
    for queue in queues:
        for root, _dirs, files in os.walk(peer.home / "spool" / queue):
            for name in files:
                try:
                    found.append((Path(root) / name).read_bytes())
                except FileNotFoundError:
                    continue  # moved on between the listing and the read
    return found


def message(subject: str, to: str, body: bytes) -> bytes:
    return (
        f"From: Sender <{SENDER}>\r\nTo: <{to}>\r\nSubject: {subject}\r\n"
        f"Date: Tue, 01 Dec 2026 12:00:00 +0000\r\n"
        f"Message-ID: <{subject.replace(' ', '.')}@far.example>\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n\r\n"
    ).encode() + body


def test_postfix_delivers_through_lmtp(tmp_path: Path) -> None:
    why = peers.postfix_available()
    if why:
        pytest.skip(why)
    extra = '[policy]\nlocal_domains = ["example.test"]\n'
    with running_server(tmp_path, extra=extra, roles=("lmtp",)) as srv:
        for name, quota in (("alice@example.test", "0"), ("bob@example.test", "4K")):
            run_cli("user", "add", "-c", str(srv.config_path), name, "--quota", quota, stdin="p\n")
        postfix = peers.start_postfix(
            tmp_path, lmtp_to=srv.ports["lmtp"], lmtp_domains=["example.test"]
        )
        try:
            sent = {
                "plain": message("plain", "alice@example.test", b"Hello Alice.\r\n"),
                "8bit": message("8bit", "alice@example.test", "Grüße aus Köln ✓\r\n".encode()),
                "tagged": message("tagged", "alice+lists@example.test", b"sub-address\r\n"),
                "both": message("both", "alice@example.test", b"for Alice and Bob\r\n"),
                "ghost": message("ghost", "ghost@example.test", b"nobody here\r\n"),
                "big": message("big", "bob@example.test", (b"x" * 78 + b"\r\n") * 80),
            }
            envelopes = {
                "plain": ["alice@example.test"],
                "8bit": ["alice@example.test"],
                "tagged": ["alice+lists@example.test"],
                "both": ["alice@example.test", "bob@example.test"],
                "ghost": ["ghost@example.test"],
                "big": ["bob@example.test"],  # 6.5 KB for a 4K quota
            }
            with smtplib.SMTP("127.0.0.1", postfix.port, timeout=30) as client:
                for key, content in sent.items():
                    options = ["BODY=8BITMIME"] if key == "8bit" else []
                    client.sendmail(SENDER, envelopes[key], content, mail_options=options)
            wait_until(lambda: len(stored(srv, "alice@example.test")) == 4, timeout=60)
            wait_until(lambda: len(stored(srv, "bob@example.test")) == 1, timeout=60)
            alice = stored(srv, "alice@example.test")
            for key in ("plain", "8bit", "tagged", "both"):
                [copy] = [m for m in alice if m.endswith(sent[key])]
                assert copy.startswith(f"Return-Path: <{SENDER}>\r\n".encode())
                assert b"with LMTP id " in copy  # our Received, above Postfix's
                assert b"(Postfix) with ESMTP id " in copy
            assert any(b"Delivered-To: alice+lists@example.test\r\n" in m for m in alice)
            [bobs] = stored(srv, "bob@example.test")
            assert bobs.endswith(sent["both"])
            # ghost@ was refused at RCPT (550 5.1.1): Postfix bounced it to the sender.
            wait_until(
                lambda: any(
                    b"ghost@example.test" in f and b"5.1.1" in f
                    for f in spool_files(postfix, "active", "deferred", "incoming")
                ),
                timeout=60,
            )
            # "big" does not fit bob's quota (452 4.2.2; at RCPT, as Postfix announces SIZE):
            # deferred by Postfix, not bounced, and not stored.
            wait_until(
                lambda: any(b"4.2.2" in f for f in spool_files(postfix, "defer")), timeout=60
            )
            # Postfix logs the deferral before it moves the queue file: wait for the move.
            wait_until(
                lambda: any(b"Subject: big" in f for f in spool_files(postfix, "deferred")),
                timeout=60,
            )
        finally:
            postfix.stop()
    # Nothing stored for the unknown user, nothing beyond his quota for bob.
    assert stored(srv, "ghost@example.test") == []
    assert len(stored(srv, "bob@example.test")) == 1
