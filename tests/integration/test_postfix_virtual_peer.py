"""The Postfix virtual(8) peer of the mailbox benchmark (benchmarks/peers.py) delivers into
Maildir: SMTP in, one file per message in the user's new/, unknown users refused at RCPT."""

from __future__ import annotations

import smtplib
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import peers


def maildir_files(peer: peers.Peer, user: str) -> list[Path]:
    new = peers.postfix_maildir(peer, user) / "new"
    return sorted(new.iterdir()) if new.is_dir() else []


def test_postfix_virtual_delivers_into_maildir(tmp_path: Path) -> None:
    why = peers.postfix_available()
    if why:
        pytest.skip(why)
    users = ["alice@example.test", "bob@example.test"]
    postfix = peers.start_postfix(tmp_path, virtual_users=users)
    try:
        body = "Grüße\r\n.leading dot\r\n".encode()
        with smtplib.SMTP("127.0.0.1", postfix.port, timeout=30) as client:
            for user in users:
                client.sendmail(
                    "sender@far.example",
                    [user],
                    f"Subject: for {user}\r\nContent-Type: text/plain; charset=utf-8\r\n"
                    "Content-Transfer-Encoding: 8bit\r\n\r\n".encode()
                    + body,
                    mail_options=["BODY=8BITMIME"],
                )
            with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
                client.sendmail("sender@far.example", ["ghost@example.test"], b"Subject: x\r\n\r\n")
            assert refused.value.recipients["ghost@example.test"][0] == 550

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not all(maildir_files(postfix, u) for u in users):
            time.sleep(0.1)
        for user in users:
            files = maildir_files(postfix, user)
            assert len(files) == 1, f"{user}: {files}"
            content = files[0].read_bytes()
            # virtual(8) writes LF line ends and adds the delivery fields
            assert content.startswith(b"Return-Path: <sender@far.example>\n")
            assert f"Delivered-To: {user}\n".encode() in content
            assert f"Subject: for {user}\n".encode() in content
            assert content.endswith(body.replace(b"\r\n", b"\n"))
    finally:
        postfix.stop()
    assert postfix.home is not None and not postfix.home.exists()
