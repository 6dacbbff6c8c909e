"""IMAP against a real `tachymail serve` over loopback: imaplib (STARTTLS and imaps), and raw
bytes for what imaplib will not send (bad commands, literals over the limit, pipelining).

Mailboxes are filled through the mailbox store's own API (``prepare_delivery`` +
``deliver``), what LMTP and local delivery use, or by SMTP to the mx listener (delivery
runs: the server does not hold). The server's policy.trusted_networks is empty, so
127.0.0.1 is an untrusted client that must use TLS before any password.
"""

from __future__ import annotations

import imaplib
import re
import smtplib
import socket
import ssl
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import LineClient, unverified_tls
from server import Server, free_port, metric, running_server, wait_until
from tachymail.auth.users import UsersFile
from tachymail.mailbox import MailboxStore, deliver, prepare_delivery, set_flags

DOMAIN = "example.test"
PASSWORD = "correct horse"
ROLES = ("mx", "imap", "imaps")
MAX_LITERAL = 256 * 1024


def imap_config(metrics_port: int, trusted: bool = False) -> str:
    networks = '["127.0.0.1/32"]' if trusted else "[]"
    return (
        f'[policy]\nlocal_domains = ["{DOMAIN}"]\ntrusted_networks = {networks}\n'
        "[auth]\nfailure_delay = 0.3\nmax_failures = 3\n"
        f"[imap]\nmax_literal = {MAX_LITERAL}\nmax_sessions_per_user = 4\n"
        "[limits]\nmax_errors = 50\n"
        f'[metrics]\naddress = "127.0.0.1:{metrics_port}"\n'
    )


def add_user(server: Server, name: str, quota: int = 0) -> str:
    """A local user with PASSWORD (the users file the server re-reads on change)."""
    address = f"{name}@{DOMAIN}"
    UsersFile(server.data_dir / "users").add(address, PASSWORD, quota=quota)
    return address


def fill(server: Server, user: str, *messages: bytes, mailbox: str = "INBOX") -> None:
    """Deliver *messages* into *user*'s *mailbox* through the store, as LMTP would."""
    store = MailboxStore(server.data_dir / "mailbox")
    try:
        outcomes = store.apply(
            [deliver(prepare_delivery(user, m, mailbox=mailbox)) for m in messages]
        )
    finally:
        store.close()
    assert not any(isinstance(o, Exception) for o in outcomes), outcomes


def stored(server: Server, user: str, mailbox: str = "INBOX") -> list[tuple[int, set[str], bytes]]:
    """(uid, flags, content) of every message in *user*'s *mailbox*, as the store has them."""
    store = MailboxStore(server.data_dir / "mailbox", readonly=True)
    try:
        return [
            (info.uid, set(info.flags), store.content(info.content_id) or b"")
            for info in store.messages(user, mailbox)
        ]
    finally:
        store.close()


def message(n: int, body: bytes = b"") -> bytes:
    return (
        f"From: Sender <sender@example.org>\r\nTo: someone@{DOMAIN}\r\nSubject: message {n}\r\n"
        f"Message-ID: <{n}@example.org>\r\nDate: Tue, 1 Dec 2026 10:00:0{n % 10} +0000\r\n\r\n"
    ).encode() + (body or f"Body of message {n}.\r\n".encode())


def login(server: Server, user: str) -> imaplib.IMAP4_SSL:
    """imaplib on the imaps listener, logged in as *user*."""
    client = imaplib.IMAP4_SSL(
        "127.0.0.1", server.ports["imaps"], ssl_context=unverified_tls(), timeout=30
    )
    client.login(user, PASSWORD)
    return client


class RawImap(LineClient):
    """A line-level IMAP client (TLS from the start on imaps)."""

    def __init__(self, port: int, tls: bool = True) -> None:
        super().__init__(port, timeout=30, tls=unverified_tls() if tls else None)
        self.greeting = self.line()
        assert self.greeting.startswith(b"* OK")

    def cmd(self, tag: bytes, text: bytes) -> list[bytes]:
        """Send ``tag text``; every line up to the tagged one (included)."""
        self.send(tag + b" " + text + b"\r\n")
        return self.until(tag)

    def until(self, tag: bytes) -> list[bytes]:
        lines = []
        while True:
            line = self.line()
            lines.append(line)
            if line.startswith(tag + b" "):
                return lines


@pytest.fixture(scope="module")
def imap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server for the module (each test has its own users): mx, imap and imaps, with
    delivery running so that SMTP mail reaches the mailboxes."""
    tmp_path = tmp_path_factory.mktemp("imap")
    metrics_port = free_port()
    with running_server(tmp_path, imap_config(metrics_port), roles=ROLES, hold=False) as server:
        server.extra["metrics_port"] = str(metrics_port)
        yield server


def logged_in_raw(server: Server, user: str) -> RawImap:
    raw = RawImap(server.ports["imaps"])
    assert raw.cmd(b"L", f'LOGIN {user} "{PASSWORD}"'.encode())[-1].startswith(b"L OK")
    return raw


# --- login ------------------------------------------------------------------------------------


def test_no_password_before_starttls_from_an_untrusted_client(imap: Server) -> None:
    user = add_user(imap, "plain")
    raw = RawImap(imap.ports["imap"], tls=False)
    try:
        assert b"STARTTLS" in raw.greeting and b"LOGINDISABLED" in raw.greeting
        assert b"AUTH=PLAIN" not in raw.greeting
        reply = raw.cmd(b"a1", f'LOGIN {user} "{PASSWORD}"'.encode())
        assert reply[-1].startswith(b"a1 NO [PRIVACYREQUIRED]")
        reply = raw.cmd(b"a2", b"AUTHENTICATE PLAIN AGZvbwBiYXI=")
        assert reply[-1].startswith(b"a2 NO [PRIVACYREQUIRED]")
        assert raw.cmd(b"a3", b"LOGOUT")[-1].startswith(b"a3 OK")
    finally:
        raw.close()
    # imaplib's STARTTLS, then the same password works.
    client = imaplib.IMAP4("127.0.0.1", imap.ports["imap"], timeout=30)
    try:
        client.starttls(unverified_tls())
        typ, _ = client.login(user, PASSWORD)
        assert typ == "OK"
        typ, data = client.capability()
        assert b"COMPRESS=DEFLATE" in data[0] and b"STARTTLS" not in data[0]  # type: ignore[operator]
    finally:
        client.logout()


def test_wrong_password_is_refused_and_delayed(imap: Server) -> None:
    user = add_user(imap, "wrong")
    client = imaplib.IMAP4_SSL(
        "127.0.0.1", imap.ports["imaps"], ssl_context=unverified_tls(), timeout=30
    )
    try:
        started = time.monotonic()
        with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
            client.login(user, "not the password")
        assert time.monotonic() - started >= 0.25  # failure_delay = 0.3
        typ, _ = client.login(user, PASSWORD)
        assert typ == "OK"
    finally:
        client.logout()
    port = int(imap.extra["metrics_port"])
    wait_until(lambda: metric(port, "tachymail_imap_logins_total", result="failure") >= 1)


def test_authenticate_plain_with_and_without_initial_response(imap: Server) -> None:
    import base64

    user = add_user(imap, "sasl")
    token = base64.b64encode(f"\0{user}\0{PASSWORD}".encode())
    raw = RawImap(imap.ports["imaps"])
    try:
        assert raw.cmd(b"a1", b"AUTHENTICATE PLAIN " + token)[-1].startswith(b"a1 OK")
    finally:
        raw.close()
    raw = RawImap(imap.ports["imaps"])
    try:
        raw.send(b"a1 AUTHENTICATE PLAIN\r\n")
        assert raw.line() == b"+ "
        raw.send(token + b"\r\n")
        assert raw.until(b"a1")[-1].startswith(b"a1 OK [CAPABILITY ")
        assert raw.cmd(b"a2", b"NOOP")[-1].startswith(b"a2 OK")
    finally:
        raw.close()


def test_trusted_client_may_log_in_without_tls(tmp_path: Path) -> None:
    metrics_port = free_port()
    with running_server(
        tmp_path, imap_config(metrics_port, trusted=True), roles=("imap",)
    ) as server:
        user = add_user(server, "trusted")
        client = imaplib.IMAP4("127.0.0.1", server.ports["imap"], timeout=30)
        try:
            assert "AUTH=PLAIN" in client.capabilities
            assert "LOGINDISABLED" not in client.capabilities
            assert client.login(user, PASSWORD)[0] == "OK"
            typ, data = client.select("INBOX")
            assert typ == "OK" and data == [b"0"]
        finally:
            client.logout()


# --- reading and changing mail ------------------------------------------------------------


def test_select_fetch_store_search(imap: Server) -> None:
    user = add_user(imap, "reader")
    messages = [message(1), message(2, b"Bananas are yellow.\r\n"), message(3)]
    fill(imap, user, *messages)
    client = login(imap, user)
    try:
        typ, data = client.select("INBOX")
        assert (typ, data) == ("OK", [b"3"])
        assert client.untagged_responses.get("UIDVALIDITY")
        assert client.untagged_responses.get("UIDNEXT") == [b"4"]
        typ, data = client.fetch("1:*", "(UID FLAGS RFC822.SIZE)")
        assert typ == "OK"
        sizes = [int(re.search(rb"RFC822.SIZE (\d+)", d).group(1)) for d in data]  # type: ignore[union-attr]
        assert sizes == [len(m) for m in messages]
        # BODY.PEEK leaves \Seen alone; BODY[] sets it.
        typ, data = client.fetch("2", "(BODY.PEEK[])")
        assert data[0][1] == messages[1]  # type: ignore[index]
        assert all("\\Seen" not in flags for _, flags, _ in stored(imap, user))
        typ, data = client.fetch("2", "(BODY[])")
        assert data[0][1] == messages[1]  # type: ignore[index]
        # The \Seen just set is reported with the data (RFC 9051 §6.4.5); \Recent: this
        # IMAP4rev1 session is the first to select the new mail (RFC 3501 §2.3.2).
        joined = b"".join(d[0] if isinstance(d, tuple) else d for d in data)
        assert b"FLAGS (\\Seen \\Recent)" in joined
        assert ["\\Seen" in flags for _, flags, _ in stored(imap, user)] == [False, True, False]
        typ, data = client.store("1,3", "+FLAGS", "(\\Flagged $Important)")
        assert typ == "OK" and len(data) == 2
        assert {"\\Flagged", "$Important"} <= stored(imap, user)[0][1]
        assert client.search(None, "FLAGGED") == ("OK", [b"1 3"])
        assert client.search(None, "BODY", "bananas") == ("OK", [b"2"])
        typ, data = client.uid("SEARCH", "UNSEEN")
        assert (typ, data) == ("OK", [b"1 3"])
        typ, data = client.store("3", "-FLAGS.SILENT", "(\\Flagged)")
        assert typ == "OK" and data == [None]
        assert client.search(None, "FLAGGED") == ("OK", [b"1"])
        typ, data = client.fetch("1", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        assert data[0][1] == b"Subject: message 1\r\n\r\n"  # type: ignore[index]
    finally:
        client.logout()


def test_copy_move_expunge(imap: Server) -> None:
    user = add_user(imap, "mover")
    fill(imap, user, message(1), message(2), message(3), message(4))
    client = login(imap, user)
    try:
        client.select("INBOX")
        typ, data = client.copy("1", "Archive")
        assert typ == "OK" and b"COPYUID" in data[0]  # type: ignore[operator]
        assert [c for _, _, c in stored(imap, user, "Archive")] == [message(1)]
        typ, data = client.uid("MOVE", "2", "Trash")
        assert typ == "OK"
        assert client.untagged_responses.pop("EXPUNGE") == [b"2"]
        assert [c for _, _, c in stored(imap, user, "Trash")] == [message(2)]
        assert [c for _, _, c in stored(imap, user)] == [message(1), message(3), message(4)]
        typ, data = client.copy("1", "No/Such/Box")
        assert typ == "NO" and b"[TRYCREATE]" in data[0]  # type: ignore[operator]
        client.store("1,3", "+FLAGS", "(\\Deleted)")
        typ, data = client.expunge()
        assert (typ, data) == ("OK", [b"3", b"1"])  # highest first
        assert [c for _, _, c in stored(imap, user)] == [message(3)]
        typ, data = client.select("INBOX")
        assert data == [b"1"]
    finally:
        client.logout()


def test_append_and_mailbox_commands(imap: Server) -> None:
    user = add_user(imap, "appender")
    fill(imap, user, message(1))
    client = login(imap, user)
    try:
        typ, data = client.list()
        names = {line.rsplit(b" ", 1)[1].strip(b'"') for line in data}  # type: ignore[union-attr]
        assert {b"INBOX", b"Drafts", b"Sent", b"Trash", b"Junk", b"Archive"} <= names
        assert any(b"\\Sent" in line and b'"Sent"' in line for line in data)  # type: ignore[operator]
        date = imaplib.Time2Internaldate(time.mktime((2020, 5, 17, 12, 30, 0, 0, 0, -1)))
        typ, data = client.append("Sent", "(\\Seen $Sent)", date, message(7))
        assert typ == "OK" and data[0].startswith(b"[APPENDUID ")  # type: ignore[union-attr]
        [(_, flags, content)] = stored(imap, user, "Sent")
        assert content == message(7) and flags == {"\\Seen", "$Sent"}
        typ, data = client.append("Nowhere", None, None, message(8))
        assert typ == "NO" and b"[TRYCREATE]" in data[0]  # type: ignore[operator]
        assert client.create("Projects/2026")[0] == "OK"
        assert client.create("Projects/2026")[0] == "NO"
        typ, data = client.list('""', "%")
        assert any(b"\\HasChildren" in line and b'"Projects"' in line for line in data)  # type: ignore[operator]
        typ, data = client.list("Projects/", "*")
        assert len(data) == 1 and b'"Projects/2026"' in data[0]  # type: ignore[operator]
        assert client.rename("Projects/2026", "Projects/2027")[0] == "OK"
        typ, data = client.status("Projects/2027", "(MESSAGES UIDNEXT UNSEEN)")
        assert typ == "OK" and b"MESSAGES 0 UIDNEXT 1 UNSEEN 0" in data[0]  # type: ignore[operator]
        typ, data = client.status("INBOX", "(MESSAGES UNSEEN SIZE)")
        assert f"MESSAGES 1 UNSEEN 1 SIZE {len(message(1))}".encode() in data[0]  # type: ignore[operator]
        assert client.delete("Projects/2027")[0] == "OK"
        assert client.delete("INBOX")[0] == "NO"
        assert client.subscribe("Sent")[0] == "OK"
        typ, data = client.lsub('""', "*")
        assert any(b'"Sent"' in line for line in data)  # type: ignore[operator]
    finally:
        client.logout()


# --- updates between sessions, IDLE ------------------------------------------------------------


def test_two_sessions_see_each_others_changes(imap: Server) -> None:
    user = add_user(imap, "twins")
    fill(imap, user, message(1), message(2), message(3))
    one, two = logged_in_raw(imap, user), logged_in_raw(imap, user)
    try:
        assert b"* 3 EXISTS" in one.cmd(b"s", b"SELECT INBOX")
        assert b"* 3 EXISTS" in two.cmd(b"s", b"SELECT INBOX")
        assert one.cmd(b"a", b"STORE 2 +FLAGS.SILENT (\\Flagged)")[-1].startswith(b"a OK")
        reply = two.cmd(b"b", b"NOOP")
        assert b"* 2 FETCH (FLAGS (\\Flagged))" in reply
        one.cmd(b"c", b"STORE 1 +FLAGS.SILENT (\\Deleted)")
        assert one.cmd(b"d", b"EXPUNGE")[:-1] == [b"* 1 EXPUNGE"]
        fill(imap, user, message(4))
        reply = two.cmd(b"e", b"NOOP")
        # the first session to see the new message gets it as \Recent (RFC 3501 §2.3.2)
        assert reply[:-1] == [b"* 1 EXPUNGE", b"* 3 EXISTS", b"* 1 RECENT"]
        # EXPUNGE is held back during FETCH by sequence number (RFC 9051 §7.5.1).
        one.cmd(b"f", b"STORE 1 +FLAGS.SILENT (\\Deleted)")
        one.cmd(b"g", b"EXPUNGE")
        reply = two.cmd(b"h", b"FETCH 1 (FLAGS)")
        assert not any(b"EXPUNGE" in line for line in reply)
        reply = two.cmd(b"i", b"NOOP")
        assert reply[:-1] == [b"* 1 EXPUNGE"]
        assert two.cmd(b"j", b"FETCH 1:* (UID)")[:-1] == [
            b"* 1 FETCH (UID 3)",
            b"* 2 FETCH (UID 4)",
        ]
    finally:
        one.close()
        two.close()


def set_stored_flags(
    server: Server, user: str, uid: int, add: list[str], remove: list[str]
) -> None:
    """Change one message's flags through the store's own operation, as JMAP Email/set does,
    from outside the server (another process)."""
    store = MailboxStore(server.data_dir / "mailbox")
    try:
        outcomes = store.apply(
            [
                set_flags(user, "INBOX", [uid], add, "add"),
                set_flags(user, "INBOX", [uid], remove, "remove"),
            ]
        )
    finally:
        store.close()
    assert not any(isinstance(o, Exception) for o in outcomes), outcomes


def test_a_flag_change_elsewhere_is_seen_by_the_next_command(imap: Server) -> None:
    """RFC 9051 §5.2: a command that reads flags answers with the store's flags as they are
    when it runs, whoever changed them (another process, another session), without a NOOP
    first; EXPUNGE stays held back during FETCH, STORE and SEARCH by sequence number."""
    user = add_user(imap, "samestore")
    fill(imap, user, message(1), message(2), message(3))
    one, two = logged_in_raw(imap, user), logged_in_raw(imap, user)
    try:
        assert b"* 3 EXISTS" in one.cmd(b"a", b"SELECT INBOX")
        assert b"* 3 EXISTS" in two.cmd(b"b", b"SELECT INBOX")
        one.cmd(b"c", b"STORE 2 +FLAGS.SILENT (\\Seen)")
        # Another process (the test, through the store) flags message 2 and unsees it.
        set_stored_flags(imap, user, 2, ["\\Flagged", "$Important"], ["\\Seen"])
        reply = one.cmd(b"d", b"UID FETCH 2 (FLAGS)")
        fetched = [line for line in reply if line.startswith(b"* ") and b" FETCH " in line]
        assert fetched, reply
        # every FETCH response of the command shows the new flags, none the old ones
        assert all(b"\\Flagged" in line and b"\\Seen" not in line for line in fetched), reply
        assert all(b"$Important" in line for line in fetched), reply
        assert len(fetched) == 1, reply  # its own answer carries them: no second line
        assert reply[-1].startswith(b"d OK")
        # Another session's STORE: the next SEARCH on flags finds it.
        assert two.cmd(b"e", b"STORE 3 +FLAGS.SILENT (\\Answered)")[-1].startswith(b"e OK")
        reply = one.cmd(b"f", b"SEARCH ANSWERED")
        assert b"* SEARCH 3" in reply, reply
        # STORE UNCHANGEDSINCE judges by the store's modseqs now: message 1 changed after the
        # modseq the first session last saw for it.
        [line] = [x for x in one.cmd(b"g", b"FETCH 1 (MODSEQ)") if x.startswith(b"* 1 FETCH")]
        before = int(re.search(rb"MODSEQ \((\d+)\)", line).group(1))  # type: ignore[union-attr]
        assert two.cmd(b"h", b"STORE 1 +FLAGS.SILENT (\\Draft)")[-1].startswith(b"h OK")
        reply = one.cmd(b"i", b"STORE 1 (UNCHANGEDSINCE %d) +FLAGS (\\Flagged)" % before)
        assert reply[-1].startswith(b"i OK [MODIFIED 1]"), reply
        assert "\\Flagged" not in stored(imap, user)[0][1]
        # An expunge elsewhere is not announced during FETCH by sequence number (RFC 9051
        # §7.5.1), but flag changes are: the FETCH of message 3 shows the new flags.
        two.cmd(b"j", b"STORE 1 +FLAGS.SILENT (\\Deleted)")
        two.cmd(b"k", b"EXPUNGE")
        set_stored_flags(imap, user, 3, ["$Later"], [])
        reply = one.cmd(b"l", b"FETCH 3 (FLAGS)")
        assert not any(b"EXPUNGE" in line for line in reply), reply
        fetched = [line for line in reply if line.startswith(b"* ") and b" FETCH " in line]
        assert fetched and all(b"$Later" in line for line in fetched), reply
        reply = one.cmd(b"m", b"NOOP")
        assert reply[:-1] == [b"* 1 EXPUNGE"], reply
        # A UID command may announce expunges (§7.5.1): before its own answers.
        two.cmd(b"n", b"STORE 1 +FLAGS.SILENT (\\Deleted)")
        two.cmd(b"o", b"EXPUNGE")
        reply = one.cmd(b"p", b"UID FETCH 1:* (FLAGS)")
        assert reply[0] == b"* 1 EXPUNGE", reply
        assert [line.split(b" (")[0] for line in reply[1:-1]] == [b"* 1 FETCH"], reply
    finally:
        one.close()
        two.close()


def test_idle_wakes_on_smtp_delivery(imap: Server) -> None:
    user = add_user(imap, "idler")
    fill(imap, user, message(1))
    raw = logged_in_raw(imap, user)
    try:
        assert b"* 1 EXISTS" in raw.cmd(b"s", b"SELECT INBOX")
        raw.send(b"i IDLE\r\n")
        assert raw.line() == b"+ idling"
        with smtplib.SMTP("127.0.0.1", imap.ports["mx"], timeout=30) as smtp:
            smtp.sendmail("sender@example.org", [user], message(2))
            sent = time.monotonic()
        raw.sock.settimeout(30)
        assert raw.line() == b"* 2 EXISTS"
        latency = time.monotonic() - sent
        print(f"IDLE saw the SMTP delivery {latency * 1000:.1f} ms after the 250")
        raw.send(b"DONE\r\n")
        assert raw.until(b"i")[-1].startswith(b"i OK")
        # Another session's flag change reaches an IDLE session at once too.
        raw.send(b"j IDLE\r\n")
        assert raw.line() == b"+ idling"
        other = logged_in_raw(imap, user)
        try:
            other.cmd(b"s", b"SELECT INBOX")
            other.cmd(b"t", b"STORE 1 +FLAGS.SILENT (\\Answered)")
            assert raw.line() == b"* 1 FETCH (FLAGS (\\Answered \\Recent))"
        finally:
            other.close()
        raw.send(b"DONE\r\n")
        assert raw.until(b"j")[-1].startswith(b"j OK")
    finally:
        raw.close()


# --- COMPRESS ---------------------------------------------------------------------------------


class DeflateIMAP(imaplib.IMAP4_SSL):
    """imaplib with RFC 4978 COMPRESS=DEFLATE: after ``compress()`` every octet both ways
    goes through raw deflate (imaplib does all its I/O through read/readline/send)."""

    deflater: zlib._Compress | None = None
    inflater: zlib._Decompress | None = None
    plain = b""
    wire_in = 0

    def compress(self) -> tuple[str, list[bytes]]:
        imaplib.Commands.setdefault("COMPRESS", ("AUTH", "SELECTED"))  # unknown to imaplib
        typ, data = self._simple_command("COMPRESS", "DEFLATE")
        if typ == "OK":
            self.deflater = zlib.compressobj(6, zlib.DEFLATED, -15)
            self.inflater = zlib.decompressobj(-15)
        return typ, data

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise imaplib.IMAP4.abort("connection closed")
        self.wire_in += len(chunk)
        assert self.inflater is not None
        self.plain += self.inflater.decompress(chunk)

    def read(self, size: int) -> bytes:
        if self.inflater is None:
            return super().read(size)
        while len(self.plain) < size:
            self._fill()
        data, self.plain = self.plain[:size], self.plain[size:]
        return data

    def readline(self) -> bytes:
        if self.inflater is None:
            return super().readline()
        while b"\n" not in self.plain:
            self._fill()
        line, _, self.plain = self.plain.partition(b"\n")
        return line + b"\n"

    def send(self, data: bytes) -> None:
        if self.deflater is None:
            super().send(data)
            return
        self.sock.sendall(self.deflater.compress(data) + self.deflater.flush(zlib.Z_SYNC_FLUSH))


def test_compress_deflate_with_imaplib(imap: Server) -> None:
    user = add_user(imap, "squeezed")
    big = message(1, b"All work and no play makes Jack a dull boy.\r\n" * 2000)
    fill(imap, user, big, message(2))
    client = DeflateIMAP("127.0.0.1", imap.ports["imaps"], ssl_context=unverified_tls(), timeout=30)
    try:
        client.login(user, PASSWORD)
        assert client.compress()[0] == "OK"
        assert client.select("INBOX") == ("OK", [b"2"])
        typ, data = client.fetch("1", "(BODY.PEEK[])")
        assert typ == "OK" and data[0][1] == big  # type: ignore[index]
        assert client.wire_in < len(big) // 10  # it really came compressed
        typ, data = client.append("INBOX", None, None, message(3))
        assert typ == "OK"
        assert client.compress()[0] == "NO"  # [COMPRESSIONACTIVE]
        assert client.search(None, "ALL") == ("OK", [b"1 2 3"])
    finally:
        client.logout()
    assert stored(imap, user)[2][2] == message(3)


def test_compress_pipelined_commands_after_a_store_all_answered(imap: Server) -> None:
    """mbsync sends ``UID STORE`` and ``CHECK`` in one deflate block: the batch is inflated
    whole, and the CHECK waiting behind the STORE's commit must still be answered."""
    user = add_user(imap, "pipesqueezed")
    fill(imap, user, message(1), message(2))
    client = DeflateIMAP("127.0.0.1", imap.ports["imaps"], ssl_context=unverified_tls(), timeout=30)
    try:
        client.login(user, PASSWORD)
        assert client.compress()[0] == "OK"
        assert client.select("INBOX") == ("OK", [b"2"])
        client.sock.settimeout(10)  # a lost reply shows as a timeout, not a hang
        client.send(b"p1 UID STORE 2 +FLAGS.SILENT (\\Deleted)\r\np2 CHECK\r\np3 NOOP\r\n")
        replies = [client.readline() for _ in range(3)]
        assert [r.split(b" ", 2)[:2] for r in replies] == [
            [b"p1", b"OK"],
            [b"p2", b"OK"],
            [b"p3", b"OK"],
        ]
    finally:
        client.logout()
    assert [flags for _uid, flags, _ in stored(imap, user)] == [set(), {"\\Deleted"}]


# --- bad input -------------------------------------------------------------------------------


def test_bad_commands_get_bad_and_the_session_goes_on(imap: Server) -> None:
    user = add_user(imap, "clumsy")
    fill(imap, user, message(1))
    raw = RawImap(imap.ports["imaps"])
    try:
        assert raw.cmd(b"a1", b"FROBNICATE")[-1].startswith(b"a1 BAD")
        assert raw.cmd(b"a2", b"SELECT INBOX")[-1].startswith(b"a2 BAD")  # not logged in
        assert raw.cmd(b"a3", b'LOGIN "unterminated')[-1].startswith(b"a3 BAD")
        raw.send(b"\r\n")  # no tag at all
        assert raw.line().startswith(b"* BAD ")
        assert raw.cmd(b"a4", f'LOGIN {user} "{PASSWORD}"'.encode())[-1].startswith(b"a4 OK")
        assert raw.cmd(b"a5", b"FETCH 1 (FLAGS)")[-1].startswith(b"a5 BAD")  # nothing selected
        raw.cmd(b"a6", b"SELECT INBOX")
        for tag, text in [
            (b"b1", b"FETCH 1:x (FLAGS)"),
            (b"b2", b"FETCH 5 (FLAGS)"),
            (b"b3", b"FETCH 1 (NOSUCHITEM)"),
            (b"b4", b"STORE 1 +FLAGS (\\Bogus)"),
            (b"b5", b"STORE 1 PLUSFLAGS (\\Seen)"),
            (b"b6", b"SEARCH NOSUCHKEY"),
            (b"b7", b"SELECT"),
            (b"b8", b"LIST"),
            (b"b9", b"UID"),
            (b"c1", b"COPY 1"),
            (b"c2", b"STATUS INBOX (NOSUCH)"),
            (b"c3", b"LOGIN again please"),
            (b"c4", b"FETCH 1 (BODY[1.2.HEADER.X])"),
        ]:
            reply = raw.cmd(tag, text)
            assert reply[-1].startswith(tag + b" BAD"), (text, reply)
        assert raw.cmd(b"c5", b"NOOP")[-1].startswith(b"c5 OK")
        # Pipelined commands are answered in order, in one go.
        raw.send(b"p1 NOOP\r\np2 FETCH 1 (UID)\r\np3 BOGUS\r\np4 CHECK\r\n")
        lines = raw.until(b"p4")
        assert [line.split(b" ")[:2] for line in lines] == [
            [b"p1", b"OK"],
            [b"*", b"1"],
            [b"p2", b"OK"],
            [b"p3", b"BAD"],
            [b"p4", b"OK"],
        ]
    finally:
        raw.close()


def test_literal_over_the_limit_gets_toobig(imap: Server) -> None:
    user = add_user(imap, "bigsender")
    raw = logged_in_raw(imap, user)
    try:
        size = MAX_LITERAL + 1
        raw.send(b"a1 APPEND INBOX {%d}\r\n" % size)
        assert raw.line().startswith(b"a1 NO [TOOBIG]")
        # A non-synchronizing literal is read and dropped, then the session goes on.
        raw.send(b"a2 APPEND INBOX {%d+}\r\n" % size + b"x" * size + b"\r\n")
        assert raw.until(b"a2")[-1].startswith(b"a2 NO [TOOBIG]")
        assert raw.cmd(b"a3", b"NOOP")[-1].startswith(b"a3 OK")
        ok = message(1)
        raw.send(b"a4 APPEND INBOX {%d}\r\n" % len(ok))
        assert raw.line().startswith(b"+ ")
        raw.send(ok + b"\r\n")
        assert raw.until(b"a4")[-1].startswith(b"a4 OK [APPENDUID ")
        assert [c for _, _, c in stored(imap, user)] == [ok]
    finally:
        raw.close()


def test_command_line_too_long_gets_bad(imap: Server) -> None:
    raw = RawImap(imap.ports["imaps"])
    try:
        raw.send(b"a1 NOOP " + b"x" * 10000 + b"\r\n")
        assert b" BAD " in raw.line()
        assert raw.cmd(b"a2", b"NOOP")[-1].startswith(b"a2 OK")
    finally:
        raw.close()


def test_big_message_streams_to_a_slow_reader(imap: Server) -> None:
    user = add_user(imap, "slowreader")
    big = message(1, (b"z" * 998 + b"\r\n") * 8000)  # 8 MB: more than the socket buffers
    fill(imap, user, big)
    sock = socket.create_connection(("127.0.0.1", imap.ports["imaps"]), timeout=30)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    tls = unverified_tls().wrap_socket(sock)
    raw = RawImap.__new__(RawImap)
    raw.sock, raw.buffer = tls, b""
    try:
        raw.greeting = raw.line()
        raw.cmd(b"L", f'LOGIN {user} "{PASSWORD}"'.encode())
        raw.cmd(b"s", b"SELECT INBOX")
        raw.send(b"f FETCH 1 (BODY.PEEK[])\r\n")
        time.sleep(1.0)  # the server meets a full socket and must wait, not buffer it all
        head = raw.line()
        assert head == b"* 1 FETCH (BODY[] {%d}" % len(big)
        data = raw.buffer
        while len(data) < len(big):
            chunk = raw.sock.recv(1 << 20)
            assert chunk
            data += chunk
        raw.buffer = data[len(big) :]
        assert data[: len(big)] == big
        assert raw.until(b"f")[-1].startswith(b"f OK")
    finally:
        raw.close()


def test_a_whole_message_fetch_answers_as_the_general_path(imap: Server) -> None:
    """``[UID] FETCH n BODY.PEEK[]`` of one message has a short path of its own: its answer
    is byte for byte the general path's (a FETCH of several messages), tagged line
    included, and \\Seen stays unset."""
    user = add_user(imap, "wholefetch")
    fill(imap, user, message(1, b"first body\r\n"), message(2, b"second\r\n" * 300), message(3))
    raw = logged_in_raw(imap, user)

    def exchange(tag: bytes, text: bytes) -> tuple[bytes, bytes]:
        """(the untagged bytes, the tagged line's text after the tag)."""
        raw.send(tag + b" " + text + b"\r\n")
        # a line end in front, so that a tagged line with nothing before it is found too
        data, raw.buffer = b"\r\n" + raw.buffer, b""
        end = b"\r\n" + tag + b" "
        while (at := data.find(end)) < 0 or data.find(b"\r\n", at + 2) < 0:
            chunk = raw.sock.recv(65536)
            assert chunk, "the server closed the connection"
            data = data + chunk
        stop = data.find(b"\r\n", at + 2) + 2
        raw.buffer = data[stop:]
        return data[2 : at + 2], data[at + 2 + len(tag) + 1 : stop]

    try:
        raw.cmd(b"s", b"SELECT INBOX")
        general, done = exchange(b"g1", b"UID FETCH 1,2 BODY.PEEK[]")
        first, done1 = exchange(b"w1", b"UID FETCH 1 BODY.PEEK[]")
        second, done2 = exchange(b"w2", b"UID FETCH 2 BODY.PEEK[]")
        assert first.startswith(b"* 1 FETCH (UID 1 BODY[] {") and b"first body" in first
        assert general == first + second
        assert done == done1 == done2 == b"OK UID FETCH completed\r\n"
        general, done = exchange(b"g2", b"FETCH 2:3 BODY.PEEK[]")
        second, done2 = exchange(b"w3", b"FETCH 2 BODY.PEEK[]")
        third, done3 = exchange(b"w4", b"FETCH 3 BODY.PEEK[]")
        assert general == second + third and second.startswith(b"* 2 FETCH (BODY[] {")
        assert done == done2 == done3 == b"OK FETCH completed\r\n"
        # a UID that is not there: nothing but the tagged OK, as for any UID FETCH
        assert exchange(b"w5", b"UID FETCH 99 BODY.PEEK[]") == (b"", done1)
        # PEEK: nothing was marked read
        flags, _ = exchange(b"f", b"FETCH 1:3 FLAGS")
        assert flags.count(b"FETCH (FLAGS") == 3 and b"\\Seen" not in flags
    finally:
        raw.close()


def test_tls_context_is_used_for_imaps(imap: Server) -> None:
    sock = socket.create_connection(("127.0.0.1", imap.ports["imaps"]), timeout=10)
    with unverified_tls().wrap_socket(sock) as tls:
        assert isinstance(tls, ssl.SSLSocket) and tls.version() is not None
        assert tls.recv(100).startswith(b"* OK [CAPABILITY IMAP4rev1 IMAP4rev2 ")


# --- extensions ------------------------------------------------------------------------------


def test_condstore_qresync_and_esearch(imap: Server) -> None:
    user = add_user(imap, "resync")
    fill(imap, user, message(1), message(2), message(3))
    raw = logged_in_raw(imap, user)
    try:
        reply = raw.cmd(b"a", b"SELECT INBOX (CONDSTORE)")
        [validity] = [re.search(rb"UIDVALIDITY (\d+)", x) for x in reply if b"UIDVALIDITY" in x]
        [highest] = [re.search(rb"HIGHESTMODSEQ (\d+)", x) for x in reply if b"HIGHESTMODSEQ" in x]
        assert validity is not None and highest is not None
        modseq = int(highest.group(1))
        reply = raw.cmd(b"b", b"STORE 2 +FLAGS (\\Seen)")
        flags = b"FLAGS (\\Seen \\Recent)"  # the first SELECT claimed the messages as \Recent
        assert reply[0] == b"* 2 FETCH (%s MODSEQ (%d))" % (flags, modseq + 1)
        # Changed since the first modseq: only message 2.
        reply = raw.cmd(b"c", b"FETCH 1:* (FLAGS) (CHANGEDSINCE %d)" % modseq)
        assert reply[:-1] == [b"* 2 FETCH (%s MODSEQ (%d))" % (flags, modseq + 1)]
        # UNCHANGEDSINCE refuses what changed meanwhile.
        reply = raw.cmd(b"d", b"STORE 1:2 (UNCHANGEDSINCE %d) +FLAGS (\\Flagged)" % modseq)
        assert reply[-1].startswith(b"d OK [MODIFIED 2]")
        assert "\\Flagged" not in stored(imap, user)[1][1]
        assert "\\Flagged" in stored(imap, user)[0][1]
        raw.cmd(b"e", b"STORE 3 +FLAGS.SILENT (\\Deleted)")
        raw.cmd(b"f", b"EXPUNGE")
        raw.cmd(b"g", b"UNSELECT")
        # QRESYNC: what vanished and what changed since the client's last state.
        assert raw.cmd(b"h", b"ENABLE QRESYNC")[0] == b"* ENABLED CONDSTORE QRESYNC"
        reply = raw.cmd(b"i", b"SELECT INBOX (QRESYNC (%s %d))" % (validity.group(1), modseq))
        assert b"* VANISHED (EARLIER) 3" in reply
        changed = [x for x in reply if b" FETCH " in x]
        assert [x.split(b" FETCH ")[0] for x in changed] == [b"* 1", b"* 2"]
        assert all(b"UID " in x and b"MODSEQ" in x for x in changed)
        # IMAP4rev2: SEARCH answers ESEARCH; RETURN (SAVE) keeps $ for the next command.
        assert raw.cmd(b"j", b"ENABLE IMAP4rev2")[0] == b"* ENABLED IMAP4rev2"
        reply = raw.cmd(b"k", b"SEARCH RETURN (SAVE COUNT) FLAGGED")
        assert reply[0] == b'* ESEARCH (TAG "k") COUNT 1'
        reply = raw.cmd(b"l", b"FETCH $ (UID)")
        assert reply[0].startswith(b"* 1 FETCH (UID 1")
    finally:
        raw.close()


def test_quota_and_overquota(imap: Server) -> None:
    user = add_user(imap, "quoted", quota=4096)
    fill(imap, user, message(1))
    client = login(imap, user)
    try:
        typ, data = client.getquotaroot("INBOX")
        assert typ == "OK"
        assert data[0] == [b'"INBOX" ""']
        assert data[1] == [b'"" (STORAGE 1 4)']
        typ, data = client.append("INBOX", None, None, message(2, b"x" * 5000 + b"\r\n"))
        assert typ == "NO" and b"[OVERQUOTA]" in data[0]  # type: ignore[operator]
        assert len(stored(imap, user)) == 1
    finally:
        client.logout()


def test_sessions_per_user_are_limited(imap: Server) -> None:
    user = add_user(imap, "crowd")
    clients = [logged_in_raw(imap, user) for _ in range(4)]
    try:
        fifth = RawImap(imap.ports["imaps"])
        try:
            reply = fifth.cmd(b"L", f'LOGIN {user} "{PASSWORD}"'.encode())
            assert reply[-1].startswith(b"L NO [LIMIT]")
        finally:
            fifth.close()
        clients.pop().close()

        def admitted() -> bool:
            client = RawImap(imap.ports["imaps"])
            try:
                reply = client.cmd(b"L", f'LOGIN {user} "{PASSWORD}"'.encode())
                return reply[-1].startswith(b"L OK")
            finally:
                client.close()

        wait_until(admitted)  # the closed session's slot is free again
    finally:
        for client in clients:
            client.close()
    port = int(imap.extra["metrics_port"])
    wait_until(lambda: metric(port, "tachymail_imap_logins_total", result="limit") >= 1)


def test_deleting_the_selected_mailbox_ends_other_sessions(imap: Server) -> None:
    user = add_user(imap, "deleter")
    one, two = logged_in_raw(imap, user), logged_in_raw(imap, user)
    try:
        assert one.cmd(b"a", b"CREATE Doomed")[-1].startswith(b"a OK")
        assert two.cmd(b"b", b"SELECT Doomed")[-1].startswith(b"b OK")
        assert one.cmd(b"c", b"DELETE Doomed")[-1].startswith(b"c OK")
        two.send(b"d NOOP\r\n")
        assert two.line().startswith(b"* BYE ")
        assert two.closed()
    finally:
        one.close()
        two.close()


# --- \Recent, subscriptions, BINARY APPEND (imaptest select, copy, listext, append-binary) ---


def recent_of(reply: list[bytes]) -> int | None:
    """The number in ``* n RECENT`` (None when the reply has none)."""
    found = [int(line.split()[1]) for line in reply if re.fullmatch(rb"\* \d+ RECENT", line)]
    return found[-1] if found else None


def test_recent_belongs_to_the_first_session_to_select(imap: Server) -> None:
    user = add_user(imap, "recent")
    fill(imap, user, message(1), message(2))
    one, two, rev2 = (logged_in_raw(imap, user) for _ in range(3))
    try:
        # EXAMINE and STATUS show the unclaimed messages without claiming them
        assert recent_of(one.cmd(b"a", b"EXAMINE INBOX")) == 2
        assert one.cmd(b"b", b"FETCH 1 (FLAGS)")[0] == b"* 1 FETCH (FLAGS (\\Recent))"
        one.cmd(b"c", b"CLOSE")
        assert b'* STATUS "INBOX" (RECENT 2)' in two.cmd(b"a", b"STATUS INBOX (RECENT)")
        # an IMAP4rev2 session neither sees nor claims \Recent
        rev2.cmd(b"a", b"ENABLE IMAP4rev2")
        reply = rev2.cmd(b"b", b"SELECT INBOX")
        assert recent_of(reply) is None and reply[-1].startswith(b"b OK")
        assert b"\\Recent" not in b"".join(rev2.cmd(b"c", b"FETCH 1:* (FLAGS)"))
        # SELECT claims them: recent here, in no other session
        assert recent_of(one.cmd(b"d", b"SELECT INBOX")) == 2
        assert recent_of(two.cmd(b"b", b"SELECT INBOX")) == 0
        assert b'* STATUS "INBOX" (RECENT 0)' in rev2.cmd(b"d", b"STATUS INBOX (RECENT)")
        one.cmd(b"e", b"STORE 1 +FLAGS.SILENT (\\Seen)")
        assert one.cmd(b"f", b"SEARCH RECENT")[0] == b"* SEARCH 1 2"
        assert one.cmd(b"g", b"SEARCH NEW")[0] == b"* SEARCH 2"
        assert one.cmd(b"h", b"SEARCH OLD")[0] == b"* SEARCH"
        # the first session's \Seen comes first (the search sees the store's flags now)
        assert two.cmd(b"c", b"SEARCH OLD")[:-1] == [b"* 1 FETCH (FLAGS (\\Seen))", b"* SEARCH 1 2"]
        assert two.cmd(b"d", b"FETCH 2 (FLAGS)")[0] == b"* 2 FETCH (FLAGS ())"
        # new mail is recent in the first session that finds it, even with both selected
        fill(imap, user, message(3))
        assert two.cmd(b"e", b"NOOP")[:-1] == [b"* 3 EXISTS", b"* 1 RECENT"]
        assert two.cmd(b"f", b"FETCH 3 (FLAGS)")[0] == b"* 3 FETCH (FLAGS (\\Recent))"
        reply = one.cmd(b"i", b"NOOP")
        assert b"* 3 EXISTS" in reply and recent_of(reply) == 2
        assert one.cmd(b"j", b"SEARCH RECENT")[0] == b"* SEARCH 1 2"
    finally:
        for client in (one, two, rev2):
            client.close()


def test_subscriptions_outlive_delete_and_may_name_no_mailbox(imap: Server) -> None:
    user = add_user(imap, "subscriber")
    raw = logged_in_raw(imap, user)
    try:
        assert raw.cmd(b"a", b"CREATE Lists/Gone")[-1].startswith(b"a OK")
        assert raw.cmd(b"b", b"SUBSCRIBE Lists/Gone")[-1].startswith(b"b OK")
        assert raw.cmd(b"c", b"DELETE Lists/Gone")[-1].startswith(b"c OK")
        # RFC 9051 §6.3.7: a name that is not a mailbox may be subscribed
        assert raw.cmd(b"d", b"SUBSCRIBE Lists/Later")[-1].startswith(b"d OK")
        reply = raw.cmd(b"e", b'LIST (SUBSCRIBED) "" "Lists/*"')
        assert reply[:-1] == [
            b'* LIST (\\NonExistent \\Subscribed) "/" "Lists/Gone"',
            b'* LIST (\\NonExistent \\Subscribed) "/" "Lists/Later"',
        ]
        assert raw.cmd(b"f", b'LSUB "" "Lists/*"')[:-1] == [
            b'* LSUB () "/" "Lists/Gone"',
            b'* LSUB () "/" "Lists/Later"',
        ]
        # a plain LIST shows mailboxes only
        assert b"Gone" not in b"".join(raw.cmd(b"g", b'LIST "" "Lists/*"'))
        # CREATE brings the mailbox back under its kept subscription
        assert raw.cmd(b"h", b"CREATE Lists/Later")[-1].startswith(b"h OK")
        reply = raw.cmd(b"i", b'LIST (SUBSCRIBED) "" "Lists/Later"')
        assert reply[0] == b'* LIST (\\HasNoChildren \\Subscribed) "/" "Lists/Later"'
        assert raw.cmd(b"j", b"UNSUBSCRIBE Lists/Gone")[-1].startswith(b"j OK")
        reply = raw.cmd(b"k", b"UNSUBSCRIBE Lists/Gone")
        assert reply[-1].startswith(b"k NO [NONEXISTENT]")
        assert raw.cmd(b"l", b'LSUB "" "Lists/*"')[:-1] == [b'* LSUB () "/" "Lists/Later"']
        # LSUB shows the parent of a subscribed name only when "%" hides the name itself
        parents = [x for x in raw.cmd(b"m", b'LSUB "" "%"') if x.endswith(b'"/" "Lists"')]
        assert len(parents) == 1 and parents[0].startswith(b"* LSUB (\\Noselect")
        assert not any(b'"Lists"' in line for line in raw.cmd(b"n", b'LSUB "" "*"'))
    finally:
        raw.close()


def test_binary_append_is_stored_base64(imap: Server) -> None:
    user = add_user(imap, "binary")
    octets = b"\x00-\xe4\n\r\n\n"
    appended = (
        b"From: user@example.org\r\nMime-Version: 1.0\r\n"
        b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: binary\r\n"
        b"\r\n" + octets
    )
    raw = logged_in_raw(imap, user)
    try:
        raw.send(b"a APPEND INBOX ~{%d}\r\n" % len(appended))
        assert raw.line().startswith(b"+ ")
        raw.send(appended + b"\r\n")
        assert raw.until(b"a")[-1].startswith(b"a OK [APPENDUID ")
        raw.cmd(b"b", b"SELECT INBOX")
        # BODY[1] is a string IMAP4rev1 can carry: base64, and the MIME header says so
        reply = raw.cmd(b"c", b"FETCH 1 (BODY.PEEK[1] BODY.PEEK[1.MIME] BODYSTRUCTURE)")
        joined = b"\n".join(reply)
        assert b"\x00" not in joined
        assert b"AC3kCg0KCg==" in joined
        assert b"Content-Transfer-Encoding: base64" in joined
        assert b'"APPLICATION" "OCTET-STREAM" NIL NIL NIL "BASE64"' in joined.upper()
        # BINARY gives back exactly the octets appended (RFC 3516)
        raw.send(b"d FETCH 1 (BINARY.SIZE[1] BINARY.PEEK[1])\r\n")
        head = raw.line()
        assert head == b"* 1 FETCH (BINARY.SIZE[1] %d BINARY[1] ~{%d}" % (len(octets), len(octets))
        data = raw.buffer
        while len(data) < len(octets):
            chunk = raw.sock.recv(4096)
            assert chunk
            data += chunk
        assert data[: len(octets)] == octets
        raw.buffer = data[len(octets) :]
        assert raw.until(b"d")[-1].startswith(b"d OK")
    finally:
        raw.close()
