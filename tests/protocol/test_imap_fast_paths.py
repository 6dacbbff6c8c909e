"""The IMAP server's fast paths against a real `tachymail serve` (two worker processes):

- ``FETCH 1:* (UID FLAGS RFC822.SIZE [MODSEQ])`` (the compiled run writer) and FETCH of
  BODYSTRUCTURE / BODY / ENVELOPE (renderings kept in the store and in the process) send
  byte for byte what ``tachymail.imap.fetch.fetch_response`` renders for each message, for
  an IMAP4rev1 session and for one with UTF8=ACCEPT and IMAP4rev2, the first time (rendered
  from the stored summary) and the later times (read back), over corpus messages with 8-bit
  headers, message/global and broken MIME; the renderings are in the store afterwards.
- Sessions of any worker process, each SELECTing from its process's shared columns, follow
  random changes made by each other and by another process writing the store directly
  (deliveries, flag changes, expunges, moves): after a NOOP every session's view, as FETCH
  1:* (UID FLAGS) shows it, is the store's, and the EXISTS it was last told is the count.
"""

from __future__ import annotations

import random
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from server import Server, running_server, wait_until
from tachymail.auth.users import UsersFile
from tachymail.imap.fetch import fetch_response, format_flags
from tachymail.mailbox import (
    MailboxStore,
    deliver,
    expunge,
    move_messages,
    prepare_delivery,
    set_flags,
)
from tachymail.mailbox.summary import build_summary
from tachymail.protocol.imap import parse_fetch_items

DOMAIN = "example.test"
PASSWORD = "fast paths"
CORPUS_MIME = Path(__file__).resolve().parents[3] / "shared" / "corpus" / "mime"
#: 8-bit headers, message/global, RFC 2231, nested and broken MIME
CORPUS = (
    "flanker/tests/fixtures/messages/8bitmime.eml",
    "flanker/tests/fixtures/messages/enclosed.eml",
    "flanker/tests/fixtures/messages/enclosed-global.eml",
    "flanker/tests/fixtures/messages/encoded-header.eml",
    "flanker/tests/fixtures/messages/missing-boundaries.eml",
    "flanker/tests/fixtures/messages/torture.eml",
    "mime4j/testmsgs/russian-headers.msg",
    "mime4j/mimetools-testmsgs/attachment-filename-encoding-UTF8.msg",
    "mime4j/mimetools-testmsgs/multi-digest.msg",
)
EIGHT_BIT = (
    "From: J\u00f6rg <joerg@example.org>\r\nSubject: Gr\u00fc\u00dfe aus K\u00f6ln\r\n"
    "MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n"
    'Content-Type: text/plain; charset=utf-8; name="r\u00e9sum\u00e9.txt"\r\n\r\n'
    "caf\u00e9\r\n--b\r\nContent-Type: message/global\r\n\r\n"
    "Subject: \u00e9t\u00e9\r\n\r\ninner\r\n--b--\r\n"
).encode()


def crlf(raw: bytes) -> bytes:
    """The corpus files' line ends as stored (CRLF)."""
    return raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def config() -> str:
    return (
        f'[policy]\nlocal_domains = ["{DOMAIN}"]\ntrusted_networks = ["127.0.0.1/32"]\n'
        "[imap]\nmax_sessions_per_user = 0\n"
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp_path = tmp_path_factory.mktemp("fast")
    with running_server(tmp_path, config(), workers=2, roles=("imap",), hold=False) as running:
        yield running


def add_user(server: Server, name: str) -> str:
    address = f"{name}@{DOMAIN}"
    UsersFile(server.data_dir / "users").add(address, PASSWORD)
    return address


class Session:
    """A raw IMAP session (loopback is trusted: no TLS needed) reading responses whole."""

    def __init__(self, server: Server, user: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", server.ports["imap"]), timeout=30)
        self.buf = b""
        self.tags = 0
        self.read_until(b"* OK")  # the greeting
        assert b" OK" in self.run(f'LOGIN {user} "{PASSWORD}"')[1]

    def read_until(self, marker: bytes) -> None:
        while marker not in self.buf:
            self.fill()
        self.buf = self.buf[self.buf.index(b"\r\n", self.buf.index(marker)) + 2 :]

    def fill(self) -> None:
        data = self.sock.recv(1 << 16)
        if not data:
            raise ConnectionError("the server closed the connection")
        self.buf += data

    def run(self, command: str) -> tuple[bytes, bytes]:
        """(the untagged octets, the tagged line) of *command*."""
        self.tags += 1
        tag = b"t%d" % self.tags
        self.sock.sendall(tag + b" " + command.encode() + b"\r\n")
        marker = b"\r\n" + tag + b" "
        while True:
            whole = b"\r\n" + self.buf
            at = whole.find(marker)
            end = whole.find(b"\r\n", at + 2) if at >= 0 else -1
            if end >= 0:
                break
            self.fill()
        self.buf = whole[end + 2 :]
        return whole[2 : at + 2], whole[at + 2 : end]

    def ok(self, command: str) -> bytes:
        untagged, line = self.run(command)
        assert line.split(b" ")[1] == b"OK", (command, line)
        return untagged

    def close(self) -> None:
        self.sock.close()


def test_fast_fetches_are_byte_equal_to_the_general_renderer(server: Server) -> None:
    if not CORPUS_MIME.is_dir():
        pytest.skip(f"MIME corpus not found at {CORPUS_MIME} (it lives in ../shared/corpus)")
    user = add_user(server, "render")
    contents = [crlf((CORPUS_MIME / name).read_bytes()) for name in CORPUS] + [EIGHT_BIT]
    store = MailboxStore(server.data_dir / "mailbox")
    try:
        outcomes = store.apply([deliver(prepare_delivery(user, c)) for c in contents])
        assert not any(isinstance(o, Exception) for o in outcomes)
        store.apply([set_flags(user, "INBOX", [2, 5], ["\\Seen", "$Label"], "add")])
    finally:
        store.close()
    plain = Session(server, user)
    modern = Session(server, user)
    try:
        plain.ok("EXAMINE INBOX")
        modern.ok("ENABLE UTF8=ACCEPT IMAP4rev2")
        modern.ok("EXAMINE INBOX")
        cases = [
            (plain, "(BODYSTRUCTURE)"),
            (plain, "(ENVELOPE BODY UID)"),
            (modern, "(UID FLAGS RFC822.SIZE ENVELOPE BODYSTRUCTURE)"),
            (modern, "(BODYSTRUCTURE)"),
            (modern, "(INTERNALDATE BODY)"),
        ]
        for _ in range(2):  # rendered from the summaries, then read back
            for session, sent in cases:
                utf8 = rev2 = session is modern
                got = session.ok(f"FETCH 1:* {sent}")
                items = sent.strip("()")
                assert got == expected_general(server, user, items, utf8=utf8, rev2=rev2), sent
        # The compiled flags writer, with MODSEQ (CONDSTORE) and without, over a gap.
        got = modern.ok("FETCH 1:* (UID FLAGS RFC822.SIZE)")
        assert got == expected_general(server, user, "UID FLAGS RFC822.SIZE", utf8=True, rev2=True)
        got = modern.ok("FETCH 2,4:6 (FLAGS UID RFC822.SIZE MODSEQ)")
        lines = expected_general(
            server, user, "UID FLAGS RFC822.SIZE MODSEQ", utf8=True, rev2=True
        ).splitlines(keepends=True)
        # (CONDSTORE turned on by this FETCH: RFC 7162 §3.1 announces HIGHESTMODSEQ first)
        assert got.startswith(b"* OK [HIGHESTMODSEQ ")
        assert got.split(b"\r\n", 1)[1] == b"".join(lines[i] for i in (1, 3, 4, 5))
    finally:
        plain.close()
        modern.close()
    # The renderings were kept in the store (by a commit nobody waited for).
    store = MailboxStore(server.data_dir / "mailbox", readonly=True)
    try:
        keys = [m.content_id for m in store.messages(user, "INBOX")]
        wait_until(lambda: all(store.rendered(k, b"I") is not None for k in keys))
    finally:
        store.close()


def expected_general(server: Server, user: str, items: str, *, utf8: bool, rev2: bool) -> bytes:
    """fetch_response's rendering of FETCH 1:* (*items*) of the user's INBOX (space-separated
    item names), with MODSEQ / UID as a session adds them."""
    store = MailboxStore(server.data_dir / "mailbox", readonly=True)
    try:
        wanted = parse_fetch_items([[name.encode() for name in items.split()]])
        out = b""
        for seq, info in enumerate(store.messages(user, "INBOX"), 1):
            summary = store.summary(info.content_id) or build_summary(b"")
            pieces = fetch_response(
                seq,
                info,
                wanted,
                lambda summary=summary: summary,  # type: ignore[misc]
                lambda offset, length: b"",
                utf8=utf8,
                rev2=rev2,
                modseq="MODSEQ" in items,
            )
            out += b"".join(p for p in pieces if isinstance(p, bytes))
        return out
    finally:
        store.close()


def view_of(session: Session) -> list[tuple[int, bytes]]:
    """(uid, flag list) of each message as the session's FETCH 1:* (UID FLAGS RFC822.SIZE)
    shows (the fast path's compiled writer)."""
    got = session.ok("FETCH 1:* (UID FLAGS RFC822.SIZE)")
    found = []
    for line in got.splitlines():
        if b" FETCH (" in line:
            uid = int(line.split(b"UID ")[1].split(b" ")[0].rstrip(b")"))
            found.append((uid, line.split(b"FLAGS ")[1].split(b")")[0] + b")"))
    return found


def store_view(store: MailboxStore, user: str) -> list[tuple[int, bytes]]:
    """(uid, flag list) of each message of the user's INBOX as the store has it."""
    return [(m.uid, format_flags(m.flags)) for m in store.messages(user, "INBOX")]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_sessions_of_every_process_follow_random_changes(server: Server, seed: int) -> None:
    rng = random.Random(seed)
    user = add_user(server, f"follow{seed}")
    writer = MailboxStore(server.data_dir / "mailbox")
    sessions: list[Session] = []

    def put(count: int) -> None:
        notes = [
            prepare_delivery(user, b"Subject: %d\r\n\r\nhi\r\n" % rng.randrange(1000))
            for _ in range(count)
        ]
        writer.apply([deliver(note) for note in notes])

    try:
        put(rng.randint(1, 20))
        for _ in range(6):  # SO_REUSEPORT spreads them over both worker processes
            session = Session(server, user)
            session.ok("ENABLE IMAP4rev2")  # no \Recent: the flags are the store's
            session.ok("SELECT INBOX")
            sessions.append(session)
        for _step in range(25):
            uids = [uid for uid, _ in store_view(writer, user)]
            action = rng.randrange(7)
            actor = rng.choice(sessions)
            if action == 0 or not uids:
                put(rng.randint(1, 3))
            elif action == 1:
                chosen = rng.sample(uids, rng.randint(1, min(5, len(uids))))
                flags = rng.sample(["\\Seen", "\\Flagged", "$Work", "\\Deleted"], 2)
                writer.apply(
                    [set_flags(user, "INBOX", chosen, flags, rng.choice(["add", "remove"]))]
                )
            elif action == 2:
                writer.apply([expunge(user, "INBOX", rng.sample(uids, 1))])
            elif action == 3:
                writer.apply([move_messages(user, "INBOX", "Archive", rng.sample(uids, 1))])
            elif action == 4:
                actor.ok("NOOP")  # the actor's view is current: its STORE counts
                uid = rng.choice(uids)
                actor.ok(f"UID STORE {uid} +FLAGS ($Seen{rng.randrange(3)} \\Answered)")
            elif action == 5:
                actor.ok("NOOP")
                uid = rng.choice(uids)
                actor.ok(f"UID STORE {uid} +FLAGS (\\Deleted)")
                actor.ok(f"UID EXPUNGE {uid}")
            else:  # a new session selects the mailbox as it is now
                session = Session(server, user)
                session.ok("ENABLE IMAP4rev2")
                session.ok("SELECT INBOX")
                sessions.append(session)
            expected = store_view(writer, user)
            for session in sessions:
                told = session.ok("NOOP")
                exists = [
                    int(line.split()[1]) for line in told.splitlines() if line.endswith(b"EXISTS")
                ]
                assert view_of(session) == expected
                if exists:
                    assert exists[-1] == len(expected)
    finally:
        for session in sessions:
            session.close()
        writer.close()
