"""Real POP3 clients from Debian against a real `tachymail serve`: fetchmail (STLS),
getmail6 (pop3s) and mpop (STLS) each download a maildrop into a Maildir they write,
byte for byte (modulo the header fields each client adds and the LF line ends Maildir
uses), and delete it on the server. An SMTP -> local delivery -> POP3 round trip closes
the loop with the delivery workers.

Certificate checks are off in each client (our certificate is self-signed); every
password goes over TLS, since 127.0.0.1 is not a trusted network here.
"""

from __future__ import annotations

import os
import poplib
import shutil
import smtplib
import ssl
import subprocess
import sys
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from server import Server, running_server, wait_until
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
    tmp_path = tmp_path_factory.mktemp("clients")
    with running_server(tmp_path, CONFIG, roles=("mx", "pop3", "pop3s")) as srv:
        yield srv


def maildrop(server: Server, name: str) -> tuple[str, list[bytes]]:
    """A user *name* with three messages (one 8-bit, one with dot lines) in its INBOX."""
    user = f"{name}@{DOMAIN}"
    UsersFile(server.data_dir / "users").add(user, PASSWORD)
    messages = [
        (
            f"From: a@example.org\r\nTo: {user}\r\nSubject: {subject}\r\n"
            f"Message-ID: <{name}.{i}@example.org>\r\n"
            "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
            "Content-Transfer-Encoding: 8bit\r\n\r\n"
        ).encode()
        + body
        for i, (subject, body) in enumerate(
            [
                ("plain", b"Hello.\r\n"),
                ("eight bit", "Grüße aus Köln, ½ € — 8-bit\r\n".encode()),
                ("dots", b".\r\n..\r\n.leading\r\nlast line\r\n"),
            ]
        )
    ]
    store = MailboxStore(server.data_dir / "mailbox")
    try:
        store.apply([deliver(prepare_delivery(user, m)) for m in messages])
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


def server_empty(server: Server, user: str) -> bool:
    store = MailboxStore(server.data_dir / "mailbox", readonly=True)
    try:
        return store.messages(user, "INBOX") == []
    finally:
        store.close()


def run(cmd: list[str], env: dict[str, str] | None = None) -> None:
    out = subprocess.run(
        cmd, capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})}
    )
    assert out.returncode == 0, f"{cmd}: {out.returncode}\n{out.stdout}\n{out.stderr}"


def test_fetchmail_over_stls(server: Server, tmp_path: Path) -> None:
    fetchmail = require("fetchmail")
    user, messages = maildrop(server, "fetchmail")
    box = maildir(tmp_path / "Maildir")
    # fetchmail hands each message to an MDA; this one writes it into the Maildir.
    mda = tmp_path / "mda.sh"
    mda.write_text(f'#!/bin/sh\nexec cat > "{box}/new/$(date +%s%N).$$"\n')
    mda.chmod(0o755)
    rcfile = tmp_path / "fetchmailrc"
    rcfile.write_text(
        f"set no bouncemail\n"
        f"poll 127.0.0.1 service {server.ports['pop3']} protocol pop3 auth password\n"
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
    assert server_empty(server, user)


def test_getmail_over_pop3s(server: Server, tmp_path: Path) -> None:
    getmail = require("getmail")
    user, messages = maildrop(server, "getmail")
    box = maildir(tmp_path / "Maildir")
    rcfile = tmp_path / "getmailrc"
    # getmail's own Maildir writer refuses to run as root (as ./dev test runs); an external
    # MDA, allowed explicitly, writes the same files either way.
    store = f"cat > {box}/new/$(date +%s%N).$$"
    rcfile.write_text(
        "[retriever]\ntype = SimplePOP3SSLRetriever\nserver = 127.0.0.1\n"
        f"port = {server.ports['pop3s']}\nusername = {user}\npassword = {PASSWORD}\n"
        "[destination]\ntype = MDA_external\npath = /bin/sh\n"
        f'arguments = ("-c", "{store}")\nallow_root_commands = true\n'
        "[options]\ndelete = true\nread_all = true\nreceived = false\n"
        "delivered_to = false\nverbose = 0\n"
    )
    run([getmail, "--rcfile", str(rcfile), "--getmaildir", str(tmp_path)])
    assert_intact(downloaded(box), messages)
    assert server_empty(server, user)


def test_mpop_over_stls(server: Server, tmp_path: Path) -> None:
    mpop = require("mpop")
    user, messages = maildrop(server, "mpop")
    box = maildir(tmp_path / "Maildir")
    config = tmp_path / "mpoprc"
    config.write_text(
        "account default\nhost 127.0.0.1\n"
        f"port {server.ports['pop3']}\nuser {user}\npassword {PASSWORD}\n"
        "auth user\ntls on\ntls_starttls on\ntls_certcheck off\n"
        f"delivery maildir {box}\nkeep off\nreceived_header off\n"
        f"uidls_file {tmp_path}/uidls\n"
    )
    config.chmod(0o600)
    run([mpop, "-C", str(config), "--quiet"], env={"HOME": str(tmp_path)})
    assert_intact(downloaded(box), messages)
    assert server_empty(server, user)


def test_smtp_to_local_delivery_to_pop3(tmp_path: Path) -> None:
    """The whole path: SMTP intake, the delivery worker's local delivery, POP3 RETR."""
    with running_server(tmp_path, CONFIG, roles=("mx", "pop3s"), hold=False) as srv:
        user = f"round@{DOMAIN}"
        UsersFile(srv.data_dir / "users").add(user, PASSWORD)
        body = "Subject: round trip\r\n\r\nÜber SMTP, lokal zugestellt, per POP3 geholt.\r\n"
        with smtplib.SMTP("127.0.0.1", srv.ports["mx"], timeout=30) as client:
            client.sendmail("sender@example.org", [user], body.encode())
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE

        def arrived() -> bool:
            with closing(poplib.POP3_SSL("127.0.0.1", srv.ports["pop3s"], context=context)) as c:
                c.user(user)
                c.pass_(PASSWORD)
                count = c.stat()[0]
                c.quit()
                return count == 1

        wait_until(arrived, timeout=60)
        with closing(poplib.POP3_SSL("127.0.0.1", srv.ports["pop3s"], context=context)) as c:
            c.user(user)
            c.pass_(PASSWORD)
            _, lines, _ = c.retr(1)
            got = b"".join(line + b"\r\n" for line in lines)
            c.dele(1)
            c.quit()
        assert got.startswith(b"Return-Path: <sender@example.org>\r\n")
        assert f"Delivered-To: {user}\r\n".encode() in got
        assert got.endswith(body.encode())
        assert server_empty(srv, user)
