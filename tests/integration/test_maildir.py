"""Maildir interop and the ``tachymail mailbox`` commands, with real readers and writers.

Export: mail in the store goes out through ``tachymail mailbox export`` and is read back
with Python's ``mailbox.Maildir`` and with Dovecot (doveadm, tests/dovecot.py): same bytes
(LF line ends), same flags, same folders. Import: a Maildir written by mutt (its Fcc, in
batch mode) and by Python's ``mailbox.Maildir`` comes in through ``tachymail mailbox
import`` with its bytes (CRLF), flags and dates, and goes out again unchanged.
"""

from __future__ import annotations

import json
import mailbox
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tachymail.mailbox import (
    ANSWERED,
    DELETED,
    DRAFT,
    FLAGGED,
    SEEN,
    MailboxStore,
    deliver,
    prepare_delivery,
    set_flags,
)
from tachymail.mailbox.maildir import decode_mutf7, encode_mutf7, to_crlf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dovecot import read_maildir
from server import tachymail_cmd

ALICE = "alice@example.test"


def tachymail(
    config: Path, *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*tachymail_cmd(), *args, "-c", str(config)],
        capture_output=True,
        text=True,
        input=stdin,
        timeout=120,
    )


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "tachymail.toml"
    path.write_text(
        f'[server]\ndata_dir = "{tmp_path / "data"}"\n\n'
        '[policy]\nlocal_domains = ["example.test"]\n'
    )
    added = tachymail(
        path, "user", "add", ALICE, "--password-stdin", "--quota", "10M", stdin="pw\n"
    )
    assert added.returncode == 0, added.stderr
    return path


def message(subject: str, body: bytes) -> bytes:
    return (
        b"From: Bob <bob@example.test>\r\nTo: alice@example.test\r\nSubject: "
        + subject.encode()
        + b"\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n\r\n" + body
    )


# (mailbox, content, flags, internal date)
STORED = [
    ("INBOX", message("plain", "caf\u00e9 \u2014 8-bit\r\n".encode()), [], 1_700_000_000.0),
    ("INBOX", message("answered", b"seen and answered\r\n"), [SEEN, ANSWERED], 1_700_000_100.0),
    (
        "INBOX",
        message("busy", b".leading dot\r\nFrom the start\r\n"),
        [FLAGGED, DELETED, DRAFT, "$Label1"],
        1_700_000_200.0,
    ),
    ("Lists/rust", message("list", b"a list message\r\n"), [SEEN], 1_700_000_300.0),
    ("Entw\u00fcrfe", message("draft", b"non-ASCII folder\r\n"), [DRAFT], 1_700_000_400.0),
]


def fill(data_dir: Path) -> None:
    store = MailboxStore(data_dir / "mailbox")
    try:
        store.apply(
            [
                deliver(
                    prepare_delivery(ALICE, content, mailbox=name, flags=flags, internaldate=date)
                )
                for name, content, flags, date in STORED
            ]
        )
    finally:
        store.close()


def lf(content: bytes) -> bytes:
    return content.replace(b"\r\n", b"\n")


def test_modified_utf7_names_round_trip() -> None:
    assert encode_mutf7("Entw\u00fcrfe") == "Entw&APw-rfe"
    assert encode_mutf7("R&D") == "R&-D"
    assert encode_mutf7("\u65e5\u672c\u8a9e") == "&ZeVnLIqe-"
    for name in ("Entw\u00fcrfe", "R&D", "\u65e5\u672c\u8a9e", "plain", "mixed \u00e9&\u00e8"):
        assert decode_mutf7(encode_mutf7(name)) == name


def test_export_is_read_by_python_and_dovecot(tmp_path: Path, config: Path) -> None:
    fill(tmp_path / "data")
    target = tmp_path / "export"
    done = tachymail(config, "mailbox", "export", ALICE, str(target))
    assert done.returncode == 0, done.stderr
    assert "exported 5 messages" in done.stdout

    # Python's reader: bytes, flags, dates, folders
    inbox = mailbox.Maildir(target, factory=None, create=False)
    found = {}
    for key in inbox.iterkeys():
        msg = inbox[key]
        found[msg["Subject"]] = (
            inbox.get_bytes(key),
            msg.get_flags(),
            msg.get_subdir(),
            msg.get_date(),
        )
    assert found["plain"] == (lf(STORED[0][1]), "", "new", 1_700_000_000.0)
    assert found["answered"] == (lf(STORED[1][1]), "RS", "cur", 1_700_000_100.0)
    assert found["busy"][:3] == (lf(STORED[2][1]), "DFTa", "cur")
    assert sorted(inbox.list_folders()) == sorted(
        ["Lists.rust", "Entw&APw-rfe", "Drafts", "Sent", "Trash", "Junk", "Archive"]
    )
    lists = inbox.get_folder("Lists.rust")
    assert [lists.get_bytes(k) for k in lists.iterkeys()] == [lf(STORED[3][1])]
    assert (target / "dovecot-keywords").read_text() == "0 $Label1\n"

    # Dovecot opens it with its own Maildir code
    read = read_maildir(target)
    by_box: dict[str, list[tuple[bytes, frozenset[str]]]] = {}
    for item in read:
        by_box.setdefault(item.mailbox, []).append((item.content, item.flags))
    expected: dict[str, list[tuple[bytes, frozenset[str]]]] = {}
    for name, content, flags, _date in STORED:
        expected.setdefault(name, []).append((lf(content), frozenset(flags)))
    for name, messages in expected.items():
        assert sorted(by_box[name]) == sorted(messages), name
    assert {name for name, items in by_box.items() if items} == set(expected)

    # exported again after a flag change: the file is replaced, not doubled
    store = MailboxStore(tmp_path / "data" / "mailbox")
    try:
        store.apply([set_flags(ALICE, "INBOX", [1], [SEEN], "add")])
    finally:
        store.close()
    assert tachymail(config, "mailbox", "export", ALICE, str(target)).returncode == 0
    again = mailbox.Maildir(target, factory=None, create=False)
    flags = sorted((again[key]["Subject"], again[key].get_flags()) for key in again.iterkeys())
    assert flags == [("answered", "RS"), ("busy", "DFTa"), ("plain", "S")]


def mutt_fcc(record: Path, subject: str, body: bytes, workdir: Path) -> None:
    """Have mutt write a message into the Maildir *record* (its Fcc, in batch mode)."""
    body_file = workdir / f"{subject}.txt"
    body_file.write_bytes(body)
    settings = (
        f"set mbox_type=Maildir; set record={record}; set sendmail=/bin/true; set copy=yes; "
        "set from=alice@example.test; set charset=utf-8; set send_charset=utf-8"
    )
    with body_file.open("rb") as stdin:
        done = subprocess.run(
            [
                "mutt",
                "-F",
                "/dev/null",
                "-n",
                "-e",
                settings,
                "-s",
                subject,
                "--",
                "bob@example.test",
            ],
            stdin=stdin,
            capture_output=True,
            timeout=60,
            env={**os.environ, "HOME": str(workdir)},
        )
    assert done.returncode == 0, done.stderr


def test_import_a_maildir_written_by_mutt_and_python_then_export_it_again(
    tmp_path: Path, config: Path
) -> None:
    if shutil.which("mutt") is None:
        pytest.skip("mutt is not installed (Debian package mutt; ./dev installs it)")
    source = tmp_path / "source"
    work = tmp_path / "work"
    work.mkdir()
    mutt_fcc(source, "from mutt", "caf\u00e9 written by mutt\n".encode(), work)
    mutt_fcc(source, "second from mutt", b"another\n", work)
    mutt_fcc(source / ".Sent", "sent by mutt", b"into a folder\n", work)
    writer = mailbox.Maildir(source, factory=None)
    flagged = mailbox.MaildirMessage(b"Subject: python flagged\nFrom: c@example.test\n\nbody\n")
    flagged.set_subdir("cur")
    flagged.set_flags("FR")
    flagged.set_date(1_600_000_000.0)
    writer.add(flagged)
    fresh = mailbox.MaildirMessage(b"Subject: python new\n\nunread\n")
    fresh.set_date(1_600_000_100.0)
    writer.add(fresh)
    originals = {}  # subject -> (LF bytes, flags letters, mtime)
    for folder in (writer, writer.get_folder("Sent")):
        for key in folder.iterkeys():
            item = folder[key]
            originals[item["Subject"]] = (folder.get_bytes(key), item.get_flags(), item.get_date())
    assert originals["from mutt"][1] == "S"  # mutt's Fcc marks its copy seen

    done = tachymail(config, "mailbox", "import", ALICE, str(source))
    assert done.returncode == 0, done.stderr
    assert "imported 5 messages" in done.stdout
    again = tachymail(config, "mailbox", "import", ALICE, str(source))
    assert again.returncode == 0 and "imported 0 messages" in again.stdout

    store = MailboxStore(tmp_path / "data" / "mailbox", readonly=True)
    try:
        stored = {}
        for name in ("INBOX", "Sent"):
            for info in store.messages(ALICE, name):
                content = store.content(info.content_id)
                assert content is not None
                subject = content.split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0].decode()
                stored[subject] = (name, content, info.flags, info.internaldate)
    finally:
        store.close()
    assert set(stored) == set(originals)
    for subject, (raw, _letters, date) in originals.items():
        assert stored[subject][1] == to_crlf(raw), subject
        assert stored[subject][3] == pytest.approx(date, abs=1), subject
    assert stored["sent by mutt"][0] == "Sent"
    assert stored["from mutt"][2] == {SEEN}
    assert stored["python flagged"][2] == {FLAGGED, ANSWERED}
    assert stored["python new"][2] == frozenset()
    assert "caf\u00e9".encode() in stored["from mutt"][1]

    # and out again: the same bytes and flags as the tools wrote
    target = tmp_path / "again"
    assert tachymail(config, "mailbox", "export", ALICE, str(target)).returncode == 0
    exported = mailbox.Maildir(target, factory=None, create=False)
    round_trip = {}
    for folder in (exported, exported.get_folder("Sent")):
        for key in folder.iterkeys():
            item = folder[key]
            round_trip[item["Subject"]] = (folder.get_bytes(key), item.get_flags())
    assert round_trip == {s: (raw, letters) for s, (raw, letters, _date) in originals.items()}


def test_list_and_stats(tmp_path: Path, config: Path) -> None:
    fill(tmp_path / "data")
    listing = tachymail(config, "mailbox", "list", ALICE)
    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.splitlines()
    assert lines[0].split()[:4] == ["MAILBOX", "MESSAGES", "UNSEEN", "SIZE"]
    inbox = lines[1].split()
    assert inbox[:3] == ["INBOX", "3", "2"]
    as_json = [
        json.loads(line)
        for line in tachymail(config, "mailbox", "list", ALICE, "--json").stdout.splitlines()
    ]
    by_name = {row["mailbox"]: row for row in as_json}
    assert by_name["Lists/rust"]["messages"] == 1 and by_name["Sent"]["special_use"] == "\\Sent"
    assert by_name["INBOX"]["size"] == sum(len(c) for n, c, _f, _d in STORED if n == "INBOX")

    messages = tachymail(config, "mailbox", "list", ALICE, "--messages", "--json")
    rows = [json.loads(line) for line in messages.stdout.splitlines()]
    assert [row["uid"] for row in rows] == [1, 2, 3]
    assert rows[1]["flags"] == sorted([SEEN, ANSWERED])
    assert rows[0]["size"] == len(STORED[0][1])
    plain = tachymail(config, "mailbox", "list", ALICE, "--messages", "Lists/rust")
    assert plain.stdout.split()[0] == "1" and plain.stdout.rstrip().endswith("\\Seen")

    stats = tachymail(config, "mailbox", "stats", "--json")
    figures = json.loads(stats.stdout)
    total = sum(len(c) for _n, c, _f, _d in STORED)
    assert (figures["users"], figures["messages"], figures["bytes"]) == (1, 5, total)
    assert figures["per_user"] == [
        {"user": ALICE, "messages": 5, "bytes": total, "quota": 10 << 20}
    ]
    text = tachymail(config, "mailbox", "stats", ALICE)
    assert text.returncode == 0
    assert "1 users, 5 messages" in text.stdout and "quota 10M (0%)" in text.stdout

    unknown = tachymail(config, "mailbox", "list", "nobody@example.test")
    assert unknown.returncode == 2 and "no mailboxes" in unknown.stderr
    missing = tachymail(config, "mailbox", "import", "nobody@example.test", str(tmp_path))
    assert missing.returncode == 2 and "is no user" in missing.stderr
    not_maildir = tachymail(config, "mailbox", "import", ALICE, str(tmp_path / "nothing"))
    assert not_maildir.returncode == 2 and "not a Maildir" in not_maildir.stderr


def test_commands_on_a_data_dir_without_a_store(tmp_path: Path, config: Path) -> None:
    stats = tachymail(config, "mailbox", "stats", "--json")
    assert stats.returncode == 0, stats.stderr
    assert json.loads(stats.stdout)["messages"] == 0
    listing = tachymail(config, "mailbox", "list", ALICE)
    assert listing.returncode == 2 and "no mailbox store" in listing.stderr
