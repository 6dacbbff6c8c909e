"""POP3 against a real `tachymail serve` over loopback: poplib (STLS and pop3s), and raw
bytes for what poplib will not send (pipelining, over-long lines, bad base64).

Maildrops are filled through the mailbox store's own API (``prepare_delivery`` +
``deliver``), what LMTP and local delivery use; the server's policy.trusted_networks is
empty, so 127.0.0.1 is an untrusted client that must use TLS before any password.
"""

from __future__ import annotations

import base64
import hashlib
import poplib
import socket
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest

from conftest import LineClient, unverified_tls
from server import Server, free_port, metric, running_server, start, wait_until
from tachymail.auth.users import UsersFile
from tachymail.mailbox import SEEN, MailboxStore, delete_user, deliver, prepare_delivery

DOMAIN = "example.test"
PASSWORD = "correct horse"
ROLES = ("mx", "pop3", "pop3s")


def pop3_config(metrics_port: int, plaintext: bool = False) -> str:
    return (
        f'[policy]\nlocal_domains = ["{DOMAIN}"]\ntrusted_networks = []\n'
        "[auth]\nfailure_delay = 0.3\nmax_failures = 3\n"
        f"[pop3]\nplaintext_auth = {'true' if plaintext else 'false'}\n"
        f'[metrics]\naddress = "127.0.0.1:{metrics_port}"\n'
    )


def add_user(server: Server, name: str) -> str:
    """A local user with PASSWORD (the users file the server re-reads on change)."""
    address = f"{name}@{DOMAIN}"
    UsersFile(server.data_dir / "users").add(address, PASSWORD)
    return address


def fill(server: Server, user: str, *messages: bytes) -> None:
    """Deliver *messages* into *user*'s INBOX through the store, as LMTP would."""
    store = MailboxStore(server.data_dir / "mailbox")
    try:
        outcomes = store.apply([deliver(prepare_delivery(user, m)) for m in messages])
    finally:
        store.close()
    assert not any(isinstance(o, Exception) for o in outcomes), outcomes


def inbox(server: Server, user: str) -> list[tuple[int, frozenset[str], bytes]]:
    """(uid, flags, content) of every message in *user*'s INBOX, as the store has them."""
    store = MailboxStore(server.data_dir / "mailbox", readonly=True)
    try:
        return [
            (info.uid, info.flags, store.content(info.content_id) or b"")
            for info in store.messages(user, "INBOX")
        ]
    finally:
        store.close()


def message(n: int, body: bytes = b"") -> bytes:
    return (
        f"From: sender@example.org\r\nTo: someone@{DOMAIN}\r\nSubject: message {n}\r\n"
        f"Message-ID: <{n}@example.org>\r\n\r\n"
    ).encode() + (body or f"Body of message {n}.\r\n".encode())


def login(server: Server, user: str) -> poplib.POP3:
    """poplib over STLS on the pop3 listener, logged in as *user*."""
    client = poplib.POP3("127.0.0.1", server.ports["pop3"], timeout=30)
    client.stls(unverified_tls())
    client.user(user)
    client.pass_(PASSWORD)
    return client


def retrieved(client: poplib.POP3, n: int) -> bytes:
    """Message *n* as the wire carried it, dot-stuffing undone by poplib, CRLF restored."""
    _, lines, _ = client.retr(n)
    return b"".join(line + b"\r\n" for line in lines)


class RawPop3(LineClient):
    """A line-level POP3 client (plain, or TLS from the start on pop3s)."""

    def __init__(self, port: int, tls: bool = False) -> None:
        super().__init__(port, timeout=30, tls=unverified_tls() if tls else None)
        assert self.line().startswith(b"+OK")

    def multiline(self) -> list[bytes]:
        """The lines of a multi-line body up to the "." line, dot-stuffing undone."""
        lines = []
        while (line := self.line()) != b".":
            lines.append(line[1:] if line.startswith(b"..") else line)
        return lines

    def cmd(self, line: bytes) -> bytes:
        self.send(line + b"\r\n")
        return self.line()


@pytest.fixture(scope="module")
def pop3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server for the module (each test has its own users): mx, pop3 and pop3s."""
    tmp_path = tmp_path_factory.mktemp("pop3")
    metrics_port = free_port()
    with running_server(tmp_path, pop3_config(metrics_port), roles=ROLES) as server:
        server.extra["metrics_port"] = str(metrics_port)
        yield server


@pytest.fixture
def raw(pop3: Server) -> Iterator[RawPop3]:
    client = RawPop3(pop3.ports["pop3s"], tls=True)
    yield client
    client.close()


def test_no_password_before_stls_from_an_untrusted_client(pop3: Server) -> None:
    user = add_user(pop3, "plain")
    client = RawPop3(pop3.ports["pop3"])
    try:
        assert client.cmd(b"CAPA") == b"+OK Capability list follows"
        capabilities = client.multiline()
        assert b"STLS" in capabilities and b"PIPELINING" in capabilities
        assert b"USER" not in capabilities and b"SASL PLAIN" not in capabilities
        assert client.cmd(b"USER " + user.encode()).startswith(b"-ERR [AUTH] ")
        assert client.cmd(b"PASS " + PASSWORD.encode()).startswith(b"-ERR [AUTH] ")
        plain = base64.b64encode(f"\0{user}\0{PASSWORD}".encode())
        assert client.cmd(b"AUTH PLAIN " + plain).startswith(b"-ERR [AUTH] ")
        assert client.cmd(b"QUIT").startswith(b"+OK")
    finally:
        client.close()
    with closing(poplib.POP3("127.0.0.1", pop3.ports["pop3"], timeout=30)) as stls:
        stls.stls(unverified_tls())
        capabilities = stls.capa()
        assert "USER" in capabilities and capabilities["SASL"] == ["PLAIN"]
        assert "STLS" not in capabilities
        assert capabilities["IMPLEMENTATION"] == ["Tachymail"]
        stls.user(user)
        assert stls.pass_(PASSWORD).startswith(b"+OK")
        stls.quit()


def test_retrieve_delete_and_seen_over_stls(pop3: Server) -> None:
    user = add_user(pop3, "stls")
    eight_bit = message(2, "Grüße, déjà vu — 8-bit bytes intact\r\n".encode())
    dotted = message(3, b".\r\n..\r\n.leading dot\r\nend\r\n")
    messages = [message(1), eight_bit, dotted]
    fill(pop3, user, *messages)
    client = login(pop3, user)
    count, size = client.stat()
    assert (count, size) == (3, sum(len(m) for m in messages))
    _, listing, _ = client.list()
    assert listing == [f"{i + 1} {len(m)}".encode() for i, m in enumerate(messages)]
    for n, expected in enumerate(messages, 1):
        assert retrieved(client, n) == expected
    assert client.dele(1).startswith(b"+OK")
    assert client.stat() == (2, len(eight_bit) + len(dotted))
    assert client.quit().startswith(b"+OK")
    stored = inbox(pop3, user)
    assert [content for _, _, content in stored] == [eight_bit, dotted]
    assert all(SEEN in flags for _, flags, _ in stored)  # RETR marks them \Seen


def test_pop3s_and_auth_plain(pop3: Server, raw: RawPop3) -> None:
    user = add_user(pop3, "implicit")
    fill(pop3, user, message(1))
    with closing(
        poplib.POP3_SSL("127.0.0.1", pop3.ports["pop3s"], context=unverified_tls())
    ) as client:
        client.user(user)
        client.pass_(PASSWORD)
        assert client.stat()[0] == 1
        client.quit()
    assert raw.cmd(b"AUTH") == b"+OK Supported SASL mechanisms"
    assert raw.multiline() == [b"PLAIN"]
    assert raw.cmd(b"AUTH PLAIN") == b"+ "
    assert raw.cmd(base64.b64encode(f"\0{user}\0{PASSWORD}".encode())).startswith(b"+OK")
    assert raw.cmd(b"STAT") == b"+OK 1 " + str(len(message(1))).encode()
    assert raw.cmd(b"QUIT").startswith(b"+OK")
    # An initial response, and an authorisation identity that is the user itself.
    again = RawPop3(pop3.ports["pop3s"], tls=True)
    try:
        plain = base64.b64encode(f"{user}\0{user}\0{PASSWORD}".encode())
        assert again.cmd(b"AUTH PLAIN " + plain).startswith(b"+OK")
        assert again.cmd(b"QUIT").startswith(b"+OK")
    finally:
        again.close()


def test_pipelined_commands_in_one_write(pop3: Server, raw: RawPop3) -> None:
    user = add_user(pop3, "pipeline")
    messages = [message(1), message(2, b".dot first\r\n")]
    fill(pop3, user, *messages)
    raw.send(
        f"USER {user}\r\nPASS {PASSWORD}\r\nSTAT\r\nLIST\r\nUIDL\r\nRETR 2\r\nTOP 1 0\r\n"
        "DELE 1\r\nNOOP\r\nQUIT\r\n".encode()
    )
    assert raw.line().startswith(b"+OK")  # USER
    assert raw.line().startswith(b"+OK")  # PASS
    assert raw.line() == f"+OK 2 {sum(len(m) for m in messages)}".encode()
    assert raw.line().startswith(b"+OK")
    assert raw.multiline() == [f"{i + 1} {len(m)}".encode() for i, m in enumerate(messages)]
    assert raw.line().startswith(b"+OK")
    uids = raw.multiline()
    assert [u.split()[0] for u in uids] == [b"1", b"2"] and len(set(uids)) == 2
    assert raw.line() == f"+OK {len(messages[1])} octets".encode()
    assert b"".join(line + b"\r\n" for line in raw.multiline()) == messages[1]
    assert raw.line().startswith(b"+OK")
    header = messages[0].split(b"\r\n\r\n")[0]
    assert raw.multiline() == [*header.split(b"\r\n"), b""]
    assert raw.line().startswith(b"+OK")  # DELE
    assert raw.line() == b"+OK"  # NOOP
    assert raw.line().startswith(b"+OK")  # QUIT, after the expunge is synced
    assert raw.closed()
    assert [content for _, _, content in inbox(pop3, user)] == [messages[1]]


def test_pipelined_retrs_in_any_case_and_after_a_dele(pop3: Server, raw: RawPop3) -> None:
    """A batch of RETRs in one write takes the server's fast path; each still gets its own
    reply: keywords in any case, a deleted or missing message an -ERR in its place."""
    user = add_user(pop3, "pipecase")
    messages = [message(1), message(2, b"..two dots\r\n")]
    fill(pop3, user, *messages)
    raw.send(
        f"USER {user}\r\nPASS {PASSWORD}\r\nretr 1\r\nRetr 2\r\nDELE 1\r\nRETR 1\r\n"
        "RETR 3\r\nRETR 02\r\nRETR  2\r\nQUIT\r\n".encode()
    )
    assert raw.line().startswith(b"+OK")  # USER
    assert raw.line().startswith(b"+OK")  # PASS
    for content in messages:
        assert raw.line() == f"+OK {len(content)} octets".encode()
        assert b"".join(line + b"\r\n" for line in raw.multiline()) == content
    assert raw.line() == b"+OK Message 1 deleted"
    assert raw.line() == b"-ERR Message 1 already deleted"
    assert raw.line() == b"-ERR No such message"
    assert raw.line() == f"+OK {len(messages[1])} octets".encode()  # "02" is message 2
    assert b"".join(line + b"\r\n" for line in raw.multiline()) == messages[1]
    assert raw.line() == f"+OK {len(messages[1])} octets".encode()  # a stray space is let be
    assert b"".join(line + b"\r\n" for line in raw.multiline()) == messages[1]
    assert raw.line().startswith(b"+OK")  # QUIT
    assert [content for _, _, content in inbox(pop3, user)] == [messages[1]]


def test_top_rset_and_a_dropped_connection_deletes_nothing(pop3: Server) -> None:
    user = add_user(pop3, "dropped")
    body = b"".join(f"line {i}\r\n".encode() for i in range(10))
    fill(pop3, user, message(1, body), message(2))
    client = login(pop3, user)
    _, lines, _ = client.top(1, 3)
    assert lines[-4:] == [b"", b"line 0", b"line 1", b"line 2"]
    client.dele(1)
    client.dele(2)
    assert client.stat() == (0, 0)
    assert client.rset().startswith(b"+OK Maildrop has 2 messages")
    assert client.stat()[0] == 2
    client.dele(2)
    client.close()  # no QUIT: the UPDATE state never comes
    wait_until(lambda: _lock_free(pop3, user))
    stored = inbox(pop3, user)
    assert len(stored) == 2
    assert all(SEEN not in flags for _, flags, _ in stored)  # TOP does not mark seen


def _lock_free(server: Server, user: str) -> bool:
    """Whether a new session can lock *user*'s maildrop (the old one let go of it)."""
    try:
        client = login(server, user)
    except poplib.error_proto:
        return False
    client.quit()
    return True


def test_second_session_gets_in_use(pop3: Server) -> None:
    user = add_user(pop3, "inuse")
    fill(pop3, user, message(1))
    first = login(pop3, user)
    with closing(
        poplib.POP3_SSL("127.0.0.1", pop3.ports["pop3s"], context=unverified_tls())
    ) as second:
        second.user(user)
        with pytest.raises(poplib.error_proto, match=r"\[IN-USE\]"):
            second.pass_(PASSWORD)
    first.quit()
    again = login(pop3, user)  # the lock went with the first session
    assert again.stat()[0] == 1
    again.quit()


def test_wrong_password_is_delayed_and_counted(pop3: Server, raw: RawPop3) -> None:
    user = add_user(pop3, "guessed")
    port = int(pop3.extra["metrics_port"])
    before = metric(port, "tachymail_pop3_logins_total", result="failure")
    assert raw.cmd(f"USER {user}".encode()).startswith(b"+OK")
    started = time.monotonic()
    assert raw.cmd(b"PASS wrong").startswith(b"-ERR [AUTH] ")
    assert time.monotonic() - started >= 0.3  # auth.failure_delay: a tarpit for guessing
    assert raw.cmd(b"USER nobody@example.org").startswith(b"+OK")
    assert raw.cmd(b"PASS " + PASSWORD.encode()).startswith(b"-ERR [AUTH] ")  # no maildrop
    assert raw.cmd(f"USER {user}".encode()).startswith(b"+OK")
    assert raw.cmd(b"PASS wrong again").startswith(b"-ERR [AUTH] ")
    assert raw.line().startswith(b"-ERR")  # auth.max_failures = 3: closed
    assert raw.closed()
    wait_until(lambda: metric(port, "tachymail_pop3_logins_total", result="failure") >= before + 3)


def test_bad_input_gets_err_and_the_session_goes_on(pop3: Server, raw: RawPop3) -> None:
    user = add_user(pop3, "badinput")
    fill(pop3, user, message(1))
    assert raw.cmd(b"STAT") == b"-ERR STAT not valid in this state"
    assert raw.cmd(b"XYZZY") == b"-ERR Unknown command"
    assert raw.cmd(b"USER " + b"x" * 300) == b"-ERR Line too long"
    assert raw.cmd(b"AUTH PLAIN !!!notbase64") == b"-ERR Invalid base64 in AUTH response"
    assert raw.cmd(b"AUTH PLAIN") == b"+ "
    assert raw.cmd(b"*") == b"-ERR Authentication cancelled"
    assert raw.cmd(b"AUTH PLAIN " + base64.b64encode(b"no-nul-here")).startswith(b"-ERR")
    assert raw.cmd(b"AUTH CRAM-MD5").startswith(b"-ERR")
    assert raw.cmd(b"CAPA").startswith(b"+OK")
    assert b"USER" in raw.multiline()  # still served: six errors are below limits.max_errors
    with closing(RawPop3(pop3.ports["pop3s"], tls=True)) as again:  # a fresh error budget
        assert again.cmd(f"USER {user}".encode()).startswith(b"+OK")
        assert again.cmd(f"PASS {PASSWORD}".encode()).startswith(b"+OK")
        for bad in (b"RETR 0", b"RETR 2", b"RETR x", b"RETR", b"LIST 99", b"TOP 1", b"TOP 1 -1"):
            assert again.cmd(bad).startswith(b"-ERR"), bad
        assert again.cmd(b"DELE 1").startswith(b"+OK")
        assert again.cmd(b"DELE 1") == b"-ERR Message 1 already deleted"
        assert again.cmd(b"RETR 1") == b"-ERR Message 1 already deleted"
        assert again.cmd(b"USER again") == b"-ERR USER not valid in this state"
        assert again.cmd(b"NOOP") == b"+OK"
        assert again.cmd(b"RSET").startswith(b"+OK")
        assert again.cmd(b"QUIT").startswith(b"+OK")
    assert len(inbox(pop3, user)) == 1  # RSET took the deletion back


def test_too_many_errors_close_the_session(pop3: Server, raw: RawPop3) -> None:
    garbage = [b"BOGUS", b"\x00\xff\xfe", b"\xc3\xa9T\xc3\xa9", b"RETR\x001", b" ", b"\x1b[2J"]
    for i in range(10):  # limits.max_errors
        assert raw.cmd(garbage[i % len(garbage)]).startswith(b"-ERR")
    assert raw.cmd(b"BOGUS").startswith(b"-ERR")
    assert raw.line().startswith(b"-ERR Too many errors")
    assert raw.closed()
    assert "Traceback" not in pop3.log()


def _anonymous_memory(pid: int) -> int:
    """Octets of a process's private anonymous memory (RssAnon): not the store's mapping."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no RssAnon")


def test_a_20_mb_message_is_streamed(pop3: Server, raw: RawPop3) -> None:
    user = add_user(pop3, "huge")
    line = b"0123456789" * 7 + b"\r\n"
    big = message(1, b".leading dot\r\n" + line * (20 * 1024 * 1024 // len(line)))
    fill(pop3, user, big)
    (worker,) = pop3.worker_pids()
    assert raw.cmd(f"USER {user}".encode()).startswith(b"+OK")
    assert raw.cmd(f"PASS {PASSWORD}".encode()).startswith(b"+OK")
    before = _anonymous_memory(worker)
    # The client asks and then reads nothing for a while: the server must stop writing.
    raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    raw.send(b"RETR 1\r\n")
    time.sleep(2)
    grown = _anonymous_memory(worker) - before
    assert grown < 8 * 1024 * 1024, f"worker grew {grown} octets for a client that reads nothing"
    assert raw.line() == f"+OK {len(big)} octets".encode()
    digest = hashlib.sha256()
    for body_line in raw.multiline():
        digest.update(body_line + b"\r\n")
    assert digest.hexdigest() == hashlib.sha256(big).hexdigest()
    assert raw.cmd(b"QUIT").startswith(b"+OK")


def test_uidl_is_stable_across_sessions_and_a_restart(tmp_path: Path) -> None:
    metrics_port = free_port()
    with running_server(tmp_path, pop3_config(metrics_port, plaintext=True), roles=ROLES) as server:
        user = add_user(server, "stable")
        fill(server, user, message(1), message(2), message(3))
        with closing(poplib.POP3("127.0.0.1", server.ports["pop3"], timeout=30)) as client:
            client.user(user)  # pop3.plaintext_auth = true: no STLS needed
            client.pass_(PASSWORD)
            first = client.uidl()[1]
            client.dele(2)
            client.quit()
        with closing(poplib.POP3("127.0.0.1", server.ports["pop3"], timeout=30)) as client:
            client.user(user)
            client.pass_(PASSWORD)
            second = client.uidl()[1]
            client.quit()
    assert [u.split()[1] for u in second] == [first[0].split()[1], first[2].split()[1]]
    again = start(server.config_path, server.data_dir, server.ports, 1, tmp_path / "server2.log")
    try:
        with closing(poplib.POP3("127.0.0.1", again.ports["pop3"], timeout=30)) as client:
            client.user(user)
            client.pass_(PASSWORD)
            assert client.uidl()[1] == second
            client.quit()
    finally:
        again.stop()
    for entry in second:
        unique = entry.split()[1]
        assert 0 < len(unique) <= 70 and all(0x21 <= c <= 0x7E for c in unique)


def test_update_refused_by_the_store_gets_sys_temp(pop3: Server, raw: RawPop3) -> None:
    user = add_user(pop3, "vanished")
    fill(pop3, user, message(1), message(2))
    assert raw.cmd(f"USER {user}".encode()).startswith(b"+OK")
    assert raw.cmd(f"PASS {PASSWORD}".encode()).startswith(b"+OK")
    assert raw.cmd(b"DELE 1").startswith(b"+OK")
    store = MailboxStore(pop3.data_dir / "mailbox")  # the operator purges the user meanwhile
    try:
        store.apply([delete_user(user)])
    finally:
        store.close()
    assert raw.cmd(b"QUIT").startswith(b"-ERR [SYS/TEMP] ")
    assert raw.closed()
    assert "UPDATE of vanished@example.test failed" in pop3.log()
    assert "Traceback" not in pop3.log()


def test_trusted_client_logs_in_plain_and_a_locked_out_user_gets_sys_temp(
    tmp_path: Path,
) -> None:
    metrics_port = free_port()
    extra = (
        f'[policy]\nlocal_domains = ["{DOMAIN}"]\n'  # 127.0.0.1 is trusted by default
        "[auth]\nfailure_delay = 0.05\nmax_failures = 5\nmax_failures_per_user = 2\n"
        f'[metrics]\naddress = "127.0.0.1:{metrics_port}"\n'
    )
    with running_server(tmp_path, extra, roles=ROLES) as server:
        user = add_user(server, "locked")
        client = RawPop3(server.ports["pop3"])
        try:
            assert client.cmd(b"CAPA").startswith(b"+OK")
            assert b"USER" in client.multiline()  # a trusted network needs no STLS
            for _ in range(2):
                assert client.cmd(f"USER {user}".encode()).startswith(b"+OK")
                assert client.cmd(b"PASS wrong").startswith(b"-ERR [AUTH] ")
            plain = base64.b64encode(f"\0{user}\0{PASSWORD}".encode())
            # Locked out: even the right password is refused, unchecked, as temporary.
            assert client.cmd(b"AUTH PLAIN " + plain).startswith(b"-ERR [SYS/TEMP] ")
        finally:
            client.close()
        wait_until(
            lambda: metric(metrics_port, "tachymail_pop3_logins_total", result="locked_out") == 1
        )
        assert metric(metrics_port, "tachymail_auth_lockouts_total", scope="user") == 1


def test_mail_delivered_during_a_session_shows_in_the_next(pop3: Server) -> None:
    user = add_user(pop3, "later")
    fill(pop3, user, message(1))
    client = login(pop3, user)
    fill(pop3, user, message(2))  # while the maildrop is locked: delivery goes on
    assert client.stat()[0] == 1
    assert len(client.uidl()[1]) == 1
    client.quit()
    client = login(pop3, user)
    assert client.stat()[0] == 2
    assert retrieved(client, 2) == message(2)
    client.quit()
