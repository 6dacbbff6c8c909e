"""The private Dovecot peer (tests/dovecot.py) works: LMTP in, POP3 out, Maildir reading.

It is the anchor of the mailbox benchmarks and the Maildir reader of the export tests, so
it is checked on its own here.
"""

from __future__ import annotations

import poplib
import smtplib
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dovecot import read_maildir, running_dovecot

MESSAGE = (
    b"From: bob@example.com\r\nTo: alice@example.test\r\nSubject: caf\xc3\xa9\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
    b"8-bit body: \xc3\xa9t\xc3\xa9\r\n.a line starting with a dot\r\n"
)


def test_lmtp_delivery_then_pop3_retrieval() -> None:
    users = {"alice@example.test": "secret", "carol@example.test": "hunter2"}
    with running_dovecot(users) as dovecot:
        lmtp = smtplib.LMTP("127.0.0.1", dovecot.ports["lmtp"], timeout=30)
        try:
            refused = lmtp.sendmail(
                "bob@example.com",
                ["alice+news@example.test", "nobody@example.test"],
                MESSAGE,
                mail_options=["BODY=8BITMIME"],
            )
        finally:
            lmtp.quit()
        # LMTP answers per recipient: the unknown one alone is refused
        assert set(refused) == {"nobody@example.test"}
        assert refused["nobody@example.test"][0] == 550

        files = list((dovecot.maildir("alice@example.test") / "new").iterdir())
        assert len(files) == 1
        # Dovecot stores LF line ends in Maildir files (the ",W=" size is the CRLF one)
        assert files[0].read_bytes().endswith(MESSAGE.replace(b"\r\n", b"\n"))

        pop = poplib.POP3("127.0.0.1", dovecot.ports["pop3"], timeout=30)
        try:
            pop.user("alice@example.test")
            pop.pass_("secret")
            count, _size = pop.stat()
            assert count == 1
            _resp, lines, _octets = pop.retr(1)
        finally:
            pop.quit()
        received = b"\r\n".join(lines) + b"\r\n"
        assert received.startswith(b"Return-Path: <bob@example.com>\r\n")
        assert b"Delivered-To: alice+news@example.test\r\n" in received
        # poplib undoes the dot-stuffing: the body arrives byte for byte
        assert received.endswith(MESSAGE)

        pop = poplib.POP3("127.0.0.1", dovecot.ports["pop3"], timeout=30)
        try:
            pop.user("carol@example.test")
            with pytest.raises(poplib.error_proto):
                pop.pass_("wrong")
        finally:
            pop.close()
    assert not dovecot.home.exists()  # stopped and cleaned up


def test_read_maildir_sees_flags_folders_and_bytes(tmp_path: Path) -> None:
    maildir = tmp_path / "Maildir"
    for folder in (maildir, maildir / ".Archive.2024"):
        for sub in ("new", "cur", "tmp"):
            (folder / sub).mkdir(parents=True)
    (maildir / "new" / "1700000000.M1P1.host").write_bytes(MESSAGE)
    (maildir / "cur" / "1700000001.M2P1.host:2,FS").write_bytes(b"Subject: two\r\n\r\nx\r\n")
    (maildir / ".Archive.2024" / "cur" / "1700000002.M3P1.host:2,RS").write_bytes(b"S: 3\n\n3\n")
    before = sorted(p.relative_to(maildir) for p in maildir.rglob("*"))

    messages = read_maildir(maildir)

    by_box = {(m.mailbox, m.content): m.flags for m in messages}
    assert by_box == {
        ("INBOX", MESSAGE): frozenset(),
        ("INBOX", b"Subject: two\r\n\r\nx\r\n"): frozenset({"\\Flagged", "\\Seen"}),
        ("Archive/2024", b"S: 3\n\n3\n"): frozenset({"\\Answered", "\\Seen"}),
    }
    assert sorted(m.uid for m in messages if m.mailbox == "INBOX") == [1, 2]
    # Dovecot worked on a copy: no index files, nothing moved out of new/
    assert sorted(p.relative_to(maildir) for p in maildir.rglob("*")) == before
