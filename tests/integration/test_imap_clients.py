"""Real IMAP clients against a real `tachymail serve`.

- fetchmail (IMAP with STARTTLS) and getmail6 (IMAP over TLS) each download a mailbox into
  a Maildir they write, byte for byte (modulo the header fields each client adds and the LF
  line ends Maildir uses), and delete it on the server (\\Deleted + EXPUNGE). getmail also
  reads a folder other than INBOX.
- imapclient (STARTTLS) and aioimaplib (imaps), the Python libraries: select, search,
  fetch, flag, move, and IDLE woken by a message sent with smtplib to the mx listener.
- mbsync (isync) syncs INBOX with a local Maildir both ways: the server's messages come
  down, a message written locally goes up, a flag set and a message expunged on the server
  reach the Maildir, a file deleted locally is expunged on the server.
- offlineimap syncs one way (remote read-only): two folders come down, later mail too, and
  nothing done locally reaches the server.
- neomutt, driven through tmux, opens INBOX, reads a message and saves it to Trash.

Each client's result is checked in the mailbox store (or in the Maildir the client wrote).
Certificate checks are off in each client that can turn them off (our certificate is
self-signed); mbsync, offlineimap and neomutt trust exactly the server's certificate
instead. Every password goes over TLS, since 127.0.0.1 is not a trusted network here.
"""

from __future__ import annotations

import asyncio
import hashlib
import imaplib
import os
import re
import shutil
import signal
import smtplib
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
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
    tmp_path = tmp_path_factory.mktemp("imap-clients")
    # hold=False: mail sent over SMTP is delivered, for the IDLE tests
    with running_server(tmp_path, CONFIG, roles=("mx", "imap", "imaps"), hold=False) as srv:
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


# --- Python client libraries: imapclient (STARTTLS) and aioimaplib (imaps) ----------------------


def unverified_tls() -> ssl.SSLContext:
    """A client context that accepts the server's self-signed certificate."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def on_server(server: Server, user: str, folder: str = "INBOX") -> dict[bytes, set[str]]:
    """Message-ID -> flags of every message in *user*'s *folder*, as the store has them."""
    store = MailboxStore(server.data_dir / "mailbox", readonly=True)
    try:
        found = {}
        for info in store.messages(user, folder):
            content = store.content(info.content_id) or b""
            mid = re.search(rb"(?im)^Message-ID:\s*(<[^>]*>)", content)
            found[mid.group(1) if mid else content] = set(info.flags)
        return found
    finally:
        store.close()


def send_by_smtp(server: Server, user: str, name: str) -> bytes:
    """Mail to *user* through the mx listener; the message sent (its Message-ID: <name@...>)."""
    data = (
        f"From: b@example.org\r\nTo: {user}\r\nSubject: {name}\r\n"
        f"Message-ID: <{name}@example.org>\r\n\r\nSent while the client idles.\r\n"
    ).encode()
    with smtplib.SMTP("127.0.0.1", server.ports["mx"], timeout=30) as smtp:
        smtp.sendmail("b@example.org", [user], data)
    return data


#: how long an idling client waits for the new message: below the server's IDLE poll (30 s),
#: so that only the store's change notification can wake it in time
IDLE_WAIT = 10.0


def test_imapclient_over_starttls(server: Server) -> None:
    imapclient = pytest.importorskip("imapclient", reason="imapclient (pip, ./dev installs it)")
    user, messages = mailbox(server, "imapclient")
    client = imapclient.IMAPClient("127.0.0.1", port=server.ports["imap"], ssl=False, timeout=30)
    try:
        client.starttls(unverified_tls())
        client.login(user, PASSWORD)
        selected = client.select_folder("INBOX")
        assert selected[b"EXISTS"] == 3 and selected[b"UIDVALIDITY"] > 0
        (uid,) = client.search(["SUBJECT", "eight bit"])
        assert client.search(["TEXT", "Köln"], charset="UTF-8") == [uid]
        assert sorted(client.search(["NOT", "SUBJECT", "eight"])) == sorted(
            set(client.search("ALL")) - {uid}
        )
        fetched = client.fetch([uid], ["RFC822", "FLAGS", "ENVELOPE", "RFC822.SIZE"])[uid]
        assert fetched[b"RFC822"] == messages[1]
        assert fetched[b"RFC822.SIZE"] == len(messages[1])
        assert fetched[b"ENVELOPE"].subject == b"eight bit"
        assert b"\\Seen" in client.get_flags([uid])[uid]  # RFC822 (not .PEEK) sets \Seen
        client.add_flags([uid], [imapclient.FLAGGED, b"$Label1"])
        flags = set(client.get_flags([uid])[uid]) - {b"\\Recent"}  # this session's, not stored
        assert flags == {b"\\Seen", b"\\Flagged", b"$Label1"}
        client.remove_flags([uid], [imapclient.SEEN])
        client.move([uid], "Archive")
        moved = on_server(server, user, "Archive")
        assert moved == {b"<imapclient.INBOX.2@example.org>": {"\\Flagged", "$Label1"}}
        assert len(on_server(server, user)) == 2
        # IDLE: a message delivered over SMTP shows up as EXISTS while the client idles.
        client.idle()
        sent = send_by_smtp(server, user, "imapclient-idle")
        responses = client.idle_check(timeout=IDLE_WAIT)
        client.idle_done()
        assert (3, b"EXISTS") in responses, responses
        (new,) = client.search(["HEADER", "Message-ID", "imapclient-idle"])
        assert client.fetch([new], ["BODY.PEEK[]"])[new][b"BODY[]"].endswith(
            sent.split(b"\r\n\r\n", 1)[1]
        )
        assert client.logout() == b"Logging out"
    except BaseException:
        client.shutdown()  # logout closes the connection itself; a failure leaves it open
        raise


def test_aioimaplib_over_imaps(server: Server) -> None:
    aioimaplib = pytest.importorskip("aioimaplib", reason="aioimaplib (pip, ./dev installs it)")
    user, messages = mailbox(server, "aioimaplib")

    async def session() -> None:
        client = aioimaplib.IMAP4_SSL(
            "127.0.0.1", server.ports["imaps"], ssl_context=unverified_tls(), timeout=30
        )
        try:
            await client.wait_hello_from_server()
            assert (await client.login(user, PASSWORD)).result == "OK"
            selected = await client.select("INBOX")
            assert selected.result == "OK" and b"3 EXISTS" in selected.lines
            # aioimaplib sends CHARSET utf-8 unless told otherwise
            found = await client.uid_search('SUBJECT "attachment"')
            assert found.result == "OK", found
            (uid,) = found.lines[0].split()  # aioimaplib strips the leading SEARCH
            fetched = await client.uid("fetch", uid.decode(), "(UID FLAGS BODY.PEEK[])")
            assert fetched.result == "OK", fetched
            literals = [line for line in fetched.lines if isinstance(line, bytearray)]
            assert literals == [messages[2]]
            stored = await client.uid("store", uid.decode(), "+FLAGS", "(\\Answered)")
            assert stored.result == "OK" and b"\\Answered" in stored.lines[0], stored
            moved = await client.uid("move", uid.decode(), "Trash")
            assert moved.result == "OK", moved
            assert on_server(server, user, "Trash") == {
                b"<aioimaplib.INBOX.3@example.org>": {"\\Answered"}
            }
            idle = await client.idle_start(timeout=30)
            sent = await asyncio.to_thread(send_by_smtp, server, user, "aioimaplib-idle")
            pushed = await client.wait_server_push(timeout=IDLE_WAIT)
            client.idle_done()
            await asyncio.wait_for(idle, 30)
            assert b"3 EXISTS" in pushed, pushed
            fetched = await client.fetch(
                "3", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)] BODY.PEEK[TEXT])"
            )
            assert fetched.result == "OK", fetched
            literals = [line for line in fetched.lines if isinstance(line, bytearray)]
            assert literals == [b"Subject: aioimaplib-idle\r\n\r\n", sent.split(b"\r\n\r\n", 1)[1]]
            assert (await client.logout()).result == "OK"
        finally:
            if client.protocol.transport is not None:  # logout has not closed it
                client.protocol.transport.close()

    asyncio.run(asyncio.wait_for(session(), 60))


# --- sync clients: mbsync (both ways), offlineimap (one way) ------------------------------------


def server_certificate(server: Server, path: Path) -> Path:
    """The imaps listener's (self-signed) certificate, in PEM at *path*: clients that cannot
    turn verification off trust exactly this certificate instead."""
    path.write_text(ssl.get_server_certificate(("127.0.0.1", server.ports["imaps"])))
    return path


def stored_content(server: Server, user: str, message_id: bytes, folder: str = "INBOX") -> bytes:
    """The bytes of the message with *message_id* in *user*'s *folder*, as the store has them."""
    store = MailboxStore(server.data_dir / "mailbox", readonly=True)
    try:
        for info in store.messages(user, folder):
            content = store.content(info.content_id) or b""
            if message_id in content:
                return content
        raise AssertionError(f"{message_id!r} is not in {folder}")
    finally:
        store.close()


@contextmanager
def imap_session(server: Server, user: str) -> Iterator[imaplib.IMAP4_SSL]:
    """imaplib logged in as *user* on imaps with INBOX selected; logged out afterwards."""
    client = imaplib.IMAP4_SSL(
        "127.0.0.1", server.ports["imaps"], ssl_context=unverified_tls(), timeout=30
    )
    try:
        client.login(user, PASSWORD)
        assert client.select("INBOX")[0] == "OK"
        yield client
        client.logout()
    finally:
        if client.state != "LOGOUT":
            client.shutdown()


def uid_of(client: imaplib.IMAP4_SSL, name: str) -> str:
    """The UID of the one message whose Message-ID is <name@example.org>."""
    typ, found = client.uid("SEARCH", "HEADER", "Message-ID", f"<{name}@example.org>")
    assert typ == "OK" and len(found[0].split()) == 1, found
    return str(found[0].decode())


def maildir_files(folder: Path) -> dict[bytes, Path]:
    """Message-ID -> file of every message in the Maildir *folder* (new and cur)."""
    found = {}
    for sub in ("new", "cur"):
        for path in (folder / sub).iterdir():
            mid = re.search(rb"(?im)^Message-ID:\s*(<[^>]*>)", path.read_bytes())
            assert mid is not None, path
            found[mid.group(1)] = path
    return found


def maildir_flags(path: Path) -> str:
    """The flag letters of a Maildir file name (``...:2,FS`` -> ``FS``)."""
    return path.name.rpartition(":2,")[2] if ":2," in path.name else ""


def test_mbsync_syncs_both_ways(server: Server, tmp_path: Path) -> None:
    mbsync = require("mbsync")
    user, messages = mailbox(server, "mbsync")
    local = tmp_path / "Mail"
    local.mkdir()
    config = tmp_path / "mbsyncrc"
    config.write_text(
        f"IMAPAccount tachymail\nHost 127.0.0.1\nPort {server.ports['imaps']}\n"
        f'User {user}\nPass "{PASSWORD}"\nSSLType IMAPS\n'
        f"CertificateFile {server_certificate(server, tmp_path / 'cert.pem')}\n\n"
        "IMAPStore remote\nAccount tachymail\n\n"
        f"MaildirStore local\nPath {local}/\nInbox {local}/INBOX\n\n"
        "Channel mail\nFar :remote:\nNear :local:\nPatterns INBOX\nCreate Both\n"
        "Expunge Both\nSyncState *\nSync All\n"
    )

    def sync() -> None:
        run([mbsync, "--config", str(config), "--all"], env={"HOME": str(tmp_path)})

    sync()
    inbox = local / "INBOX"
    # mbsync adds its transaction ID at the end of each header it copies, either way
    tuid = re.compile(rb"X-TUID: \S+\r?\n")
    assert_intact([tuid.sub(b"", data, count=1) for data in downloaded(inbox)], messages)
    # A message written locally is uploaded (APPEND) with its flag.
    added = (
        b"From: me@example.org\nTo: someone@example.org\nSubject: written locally\n"
        b"Message-ID: <mbsync.local@example.org>\n\nUp it goes.\n"
    )
    (inbox / "cur" / "1700000000.local.host:2,S").write_bytes(added)
    sync()
    remote = on_server(server, user)
    assert remote[b"<mbsync.local@example.org>"] == {"\\Seen"}
    uploaded = stored_content(server, user, b"<mbsync.local@example.org>")
    assert tuid.sub(b"", uploaded, count=1) == added.replace(b"\n", b"\r\n")
    # A flag set on the server reaches the local copy; a message expunged there goes away.
    with imap_session(server, user) as client:
        client.uid("STORE", uid_of(client, "mbsync.INBOX.1"), "+FLAGS", "(\\Flagged)")
        client.uid("STORE", uid_of(client, "mbsync.INBOX.3"), "+FLAGS", "(\\Deleted)")
        assert client.expunge()[0] == "OK"
    sync()
    files = maildir_files(inbox)
    assert maildir_flags(files[b"<mbsync.INBOX.1@example.org>"]) == "F"
    assert b"<mbsync.INBOX.3@example.org>" not in files
    # A message deleted locally is deleted (\Deleted, EXPUNGE) on the server too.
    files[b"<mbsync.INBOX.2@example.org>"].unlink()
    sync()
    remote = on_server(server, user)
    assert sorted(remote) == [b"<mbsync.INBOX.1@example.org>", b"<mbsync.local@example.org>"]
    assert sorted(remote) == sorted(maildir_files(inbox))


def test_offlineimap_one_way(server: Server, tmp_path: Path) -> None:
    offlineimap = require("offlineimap")
    user, messages = mailbox(server, "offlineimap")
    _, archived = mailbox(server, "offlineimap", folder="Archive")
    pem = server_certificate(server, tmp_path / "cert.pem").read_text()
    fingerprint = hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem)).hexdigest()
    local = tmp_path / "Mail"
    config = tmp_path / "offlineimaprc"
    config.write_text(
        f"[general]\naccounts = tachymail\nmetadata = {tmp_path / 'state'}\n\n"
        "[Account tachymail]\nlocalrepository = local\nremoterepository = remote\n\n"
        f"[Repository local]\ntype = Maildir\nlocalfolders = {local}\n\n"
        "[Repository remote]\ntype = IMAP\nremotehost = 127.0.0.1\n"
        f"remoteport = {server.ports['imaps']}\nremoteuser = {user}\nremotepass = {PASSWORD}\n"
        f"ssl = yes\ncert_fingerprint = {fingerprint}\nreadonly = True\n"
        "folderfilter = lambda name: name in ('INBOX', 'Archive')\n"
    )

    def sync() -> None:
        run([offlineimap, "-c", str(config), "-o", "-u", "quiet"], env={"HOME": str(tmp_path)})

    sync()
    assert_intact(downloaded(local / "INBOX"), messages)
    assert_intact(downloaded(local / "Archive"), archived)
    before = on_server(server, user), on_server(server, user, "Archive")
    # Read-only: what changes locally stays local; what is new on the server comes down.
    files = maildir_files(local / "INBOX")
    files[b"<offlineimap.INBOX.1@example.org>"].unlink()
    path = files[b"<offlineimap.INBOX.2@example.org>"]
    path.rename(path.parent.parent / "cur" / (path.name.partition(":2,")[0] + ":2,FS"))
    sent = send_by_smtp(server, user, "offlineimap-new")
    wait_until(lambda: len(on_server(server, user)) == 4)
    sync()
    assert (on_server(server, user), on_server(server, user, "Archive")) == (
        {**before[0], b"<offlineimap-new@example.org>": set()},
        before[1],
    )
    files = maildir_files(local / "INBOX")
    assert (
        files[b"<offlineimap-new@example.org>"]
        .read_bytes()
        .endswith(sent.split(b"\r\n\r\n", 1)[1].replace(b"\r\n", b"\n"))
    )
    assert b"<offlineimap.INBOX.1@example.org>" not in files


# --- neomutt, driven in tmux --------------------------------------------------------------------


class Terminal:
    """A private tmux server (its own socket) running one program in an 160x50 window."""

    def __init__(self, tmux: str, socket: Path, command: list[str], env: dict[str, str]) -> None:
        self.tmux = [tmux, "-S", str(socket)]
        self.env = {**os.environ, **env}
        self.tmux_cmd("-f", "/dev/null", "new-session", "-d", "-x", "160", "-y", "50", *command)
        self.pid = int(self.tmux_cmd("display-message", "-p", "#{pid}").strip())

    def tmux_cmd(self, *args: str) -> str:
        out = subprocess.run(
            [*self.tmux, *args], capture_output=True, text=True, timeout=30, env=self.env
        )
        assert out.returncode == 0, f"tmux {args}: {out.stderr}"
        return out.stdout

    def screen(self) -> str:
        return self.tmux_cmd("capture-pane", "-p")

    def keys(self, *keys: str) -> None:
        self.tmux_cmd("send-keys", *keys)

    def wait_for(self, text: str, timeout: float = 20.0) -> str:
        """The screen once it shows *text*; fails with the screen after *timeout* seconds."""
        deadline = time.monotonic() + timeout
        while True:
            screen = self.screen()
            if text in screen:
                return screen
            assert time.monotonic() < deadline, f"{text!r} never showed:\n{screen}"
            time.sleep(0.1)

    def running(self) -> bool:
        return Path(f"/proc/{self.pid}").exists() and "Z" not in self.state()

    def state(self) -> str:
        try:
            return Path(f"/proc/{self.pid}/stat").read_text().rpartition(")")[2].split()[0]
        except FileNotFoundError:
            return "X"

    def stop(self) -> None:
        """End the tmux server (and the program in it) by its PID."""
        if self.running():
            os.kill(self.pid, signal.SIGTERM)


def test_neomutt_reads_and_moves_to_trash(server: Server, tmp_path: Path) -> None:
    neomutt = require("neomutt")
    tmux = require("tmux")
    user, messages = mailbox(server, "neomutt")
    muttrc = tmp_path / "muttrc"
    muttrc.write_text(
        f'set folder = "imaps://{user.replace("@", "%40")}@127.0.0.1:{server.ports["imaps"]}/"\n'
        f'set imap_pass = "{PASSWORD}"\nset spoolfile = "+INBOX"\nset record = ""\n'
        f'set certificate_file = "{server_certificate(server, tmp_path / "certs.pem")}"\n'
        'set ssl_verify_host = no\nset imap_authenticators = "plain"\n'
        'set header_cache = ""\nset message_cachedir = ""\nset imap_idle = no\n'
        "set confirmappend = no\nset confirmcreate = no\nset delete = yes\nset move = no\n"
        "set quit = yes\nset wait_key = no\nset sort = date\nset mail_check_stats = no\n"
        "set mark_old = no\nset resolve = no\n"
    )
    terminal = Terminal(
        tmux,
        tmp_path / "tmux.sock",
        [neomutt, "-n", "-F", str(muttrc)],
        {"HOME": str(tmp_path), "LANG": "C.UTF-8", "TERM": "xterm"},
    )
    try:
        terminal.wait_for("eight bit")
        terminal.keys("2", "Enter")  # jump to the second message
        terminal.keys("Enter")  # and read it
        screen = terminal.wait_for("Grüße aus Köln")
        assert "Subject: eight bit" in screen
        terminal.keys("s")  # save it, which moves it, to =Trash
        terminal.wait_for("Save to mailbox")
        terminal.keys("C-u", "=Trash", "Enter")
        terminal.keys("q")  # back to the index
        terminal.keys("$")  # sync: expunge what was moved away
        terminal.keys("q")  # and quit
        deadline = time.monotonic() + 20
        while terminal.running():
            assert time.monotonic() < deadline, f"neomutt did not quit:\n{terminal.screen()}"
            time.sleep(0.1)
    finally:
        terminal.stop()
    # The message read is in Trash, \Seen; the others are in INBOX, unread.
    assert on_server(server, user, "Trash") == {b"<neomutt.INBOX.2@example.org>": {"\\Seen"}}
    assert on_server(server, user) == {
        b"<neomutt.INBOX.1@example.org>": set(),
        b"<neomutt.INBOX.3@example.org>": set(),
    }
    assert stored_content(server, user, b"<neomutt.INBOX.2@example.org>", "Trash") == messages[1]
