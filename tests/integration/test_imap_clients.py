"""Real IMAP clients from Debian against a real `tachymail serve`: fetchmail (IMAP with
STARTTLS) and getmail6 (IMAP over TLS) each download a mailbox into a Maildir they write,
byte for byte (modulo the header fields each client adds and the LF line ends Maildir
uses), and delete it on the server (\\Deleted + EXPUNGE). getmail also reads a folder other
than INBOX and leaves it alone when asked to.

Certificate checks are off in each client (our certificate is self-signed); every
password goes over TLS, since 127.0.0.1 is not a trusted network here.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from server import Server, running_server
from tachymail.auth.users import UsersFile
from tachymail.mailbox import MailboxStore, deliver, prepare_delivery

DOMAIN = "example.test"
PASSWORD = "s3cret pass"
CONFIG = (
    f'[policy]\nlocal_domains = ["{DOMAIN}"]\ntrusted_networks = []\n[auth]\nfailure_delay = 0.2\n'
)


def require(tool: str) -> str:
    found = shutil.which(tool)
    if found is None:
        pytest.skip(f"{tool} is not installed (./dev installs it)")
    return found


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp_path = tmp_path_factory.mktemp("imap-clients")
    with running_server(tmp_path, CONFIG, roles=("mx", "imap", "imaps")) as srv:
        yield srv


def mailbox(server: Server, name: str, folder: str = "INBOX") -> tuple[str, list[bytes]]:
    """A user *name* with three messages (one 8-bit, one with a MIME attachment) in
    *folder*."""
    user = f"{name}@{DOMAIN}"
    UsersFile(server.data_dir / "users").add(user, PASSWORD)
    head = f"From: a@example.org\r\nTo: {user}\r\nMIME-Version: 1.0\r\n"
    name = f"{name}.{folder}"  # Message-IDs unique per folder
    messages = [
        (head + f"Subject: plain\r\nMessage-ID: <{name}.1@example.org>\r\n\r\nHello.\r\n").encode(),
        (
            head + f"Subject: eight bit\r\nMessage-ID: <{name}.2@example.org>\r\n"
            "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
            "Grüße aus Köln, ½ € — 8-bit\r\n"
        ).encode(),
        (
            head + f"Subject: attachment\r\nMessage-ID: <{name}.3@example.org>\r\n"
            'Content-Type: multipart/mixed; boundary="b1"\r\n\r\n'
            "--b1\r\nContent-Type: text/plain\r\n\r\nSee attached.\r\n"
            "--b1\r\nContent-Type: application/octet-stream\r\n"
            "Content-Transfer-Encoding: base64\r\n\r\nAAECAwQFBgcICQ==\r\n--b1--\r\n"
        ).encode(),
    ]
    store = MailboxStore(server.data_dir / "mailbox")
    try:
        store.apply([deliver(prepare_delivery(user, m, mailbox=folder)) for m in messages])
    finally:
        store.close()
    return user, messages


def maildir(path: Path) -> Path:
    for sub in ("tmp", "new", "cur"):
        (path / sub).mkdir(parents=True, exist_ok=True)
    return path


def downloaded(path: Path) -> list[bytes]:
    return [f.read_bytes() for d in ("new", "cur") for f in sorted((path / d).iterdir())]


def assert_intact(files: list[bytes], messages: list[bytes]) -> None:
    """Each message arrived whole: its bytes (LF line ends, as Maildir has them) end the
    file, and whatever comes before them is header fields the client added."""
    assert len(files) == len(messages), files
    for expected in messages:
        want = expected.replace(b"\r\n", b"\n")
        (got,) = [f for f in files if f.replace(b"\r\n", b"\n").endswith(want)]
        added = got.replace(b"\r\n", b"\n")[: -len(want)]
        for line in added.splitlines():
            assert line[:1] in (b" ", b"\t") or b":" in line, (line, added)


def left(server: Server, user: str, folder: str = "INBOX") -> int:
    store = MailboxStore(server.data_dir / "mailbox", readonly=True)
    try:
        return len(store.messages(user, folder))
    finally:
        store.close()


def run(cmd: list[str], env: dict[str, str] | None = None) -> None:
    out = subprocess.run(
        cmd, capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})}
    )
    assert out.returncode == 0, f"{cmd}: {out.returncode}\n{out.stdout}\n{out.stderr}"


def test_fetchmail_over_imap_starttls(server: Server, tmp_path: Path) -> None:
    fetchmail = require("fetchmail")
    user, messages = mailbox(server, "fetchmail")
    box = maildir(tmp_path / "Maildir")
    mda = tmp_path / "mda.sh"
    mda.write_text(f'#!/bin/sh\nexec cat > "{box}/new/$(date +%s%N).$$"\n')
    mda.chmod(0o755)
    rcfile = tmp_path / "fetchmailrc"
    rcfile.write_text(
        f"set no bouncemail\n"
        f"poll 127.0.0.1 service {server.ports['imap']} protocol imap auth password\n"
        f'  user "{user}" password "{PASSWORD}"\n'
        f"  sslproto TLS1.2+ no sslcertck fetchall\n"
        f'  mda "{mda}"\n'
    )
    rcfile.chmod(0o600)
    run(
        [fetchmail, "--fetchmailrc", str(rcfile), "--nodetach", "--nosyslog", "--invisible"],
        env={"FETCHMAILHOME": str(tmp_path), "HOME": str(tmp_path)},
    )
    assert_intact(downloaded(box), messages)
    assert left(server, user) == 0


def test_getmail_over_imaps(server: Server, tmp_path: Path) -> None:
    getmail = require("getmail")
    user, messages = mailbox(server, "getmail")
    _, archived = mailbox(server, "getmail", folder="Archive")
    box = maildir(tmp_path / "Maildir")
    rcfile = tmp_path / "getmailrc"
    # getmail's own Maildir writer refuses to run as root; an external MDA writes the same.
    store = f"cat > {box}/new/$(date +%s%N).$$"
    rcfile.write_text(
        "[retriever]\ntype = SimpleIMAPSSLRetriever\nserver = 127.0.0.1\n"
        f"port = {server.ports['imaps']}\nusername = {user}\npassword = {PASSWORD}\n"
        'mailboxes = ("INBOX", "Archive")\n'
        "[destination]\ntype = MDA_external\npath = /bin/sh\n"
        f'arguments = ("-c", "{store}")\nallow_root_commands = true\n'
        "[options]\ndelete = true\nread_all = true\nreceived = false\n"
        "delivered_to = false\nverbose = 0\n"
    )
    run([getmail, "--rcfile", str(rcfile), "--getmaildir", str(tmp_path)])
    # getmail adds its own field at the end of the header: take it out, note the folder.
    files, folders = [], []
    for data in downloaded(box):
        found = re.search(rb"X-getmail-retrieved-from-mailbox: (\S+)\r?\n", data)
        assert found is not None, data
        folders.append(found.group(1).decode())
        files.append(data[: found.start()] + data[found.end() :])
    assert sorted(folders) == ["Archive"] * 3 + ["INBOX"] * 3
    assert_intact(files, messages + archived)
    assert left(server, user) == 0 and left(server, user, "Archive") == 0
