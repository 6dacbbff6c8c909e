"""The mailbox store with a real LMDB environment: delivery, UIDs, UIDVALIDITY, flags,
expunge and space reuse, quotas, idempotent delivery, totals, summaries, read-only opening,
and the group committer in front of it."""

from __future__ import annotations

import asyncio
import email.policy
import os
import struct
import subprocess
import sys
import time
from email.parser import BytesParser
from pathlib import Path

import lmdb
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tachymail.mailbox import (
    DELETED,
    FLAGGED,
    SEEN,
    Delivered,
    InvalidMailboxName,
    MailboxExists,
    MailboxStore,
    MaildropLock,
    NoSuchMailbox,
    OverQuota,
    StorageFull,
    create_mailbox,
    create_user,
    delete_mailbox,
    delete_user,
    deliver,
    delivered_to,
    delivery_headers,
    expunge,
    prepare_delivery,
    rename_mailbox,
    set_flags,
    subscribe,
    sweep_delivered,
)
from tachymail.mailbox.store import DELIVERED_TTL, MiB
from tachymail.mailbox.summary import build_summary
from tachymail.mailbox.threads import MAX_PARENTS, ThreadRefs, id_key, thread_refs
from tachymail.mailbox.vacation import (
    auto_reply,
    load_vacation,
    may_reply,
    parse_utc_date,
    vacation_path,
)
from tachymail.queue.commit import GroupCommitter

ALICE = "alice@example.test"
CORPUS = Path(__file__).resolve().parents[3] / "shared" / "corpus" / "mime"


def message(subject: str, body: bytes = b"Hello.\r\n") -> bytes:
    return (
        b"From: Bob <bob@example.test>\r\nTo: alice@example.test\r\n"
        b"Subject: " + subject.encode() + b"\r\nMessage-ID: <" + subject.encode() + b"@x>\r\n"
        b"\r\n" + body
    )


@pytest.fixture
def store(tmp_path: Path) -> MailboxStore:
    opened = MailboxStore(tmp_path / "mailbox", map_size=4 * MiB)
    yield opened  # type: ignore[misc]
    opened.close()


def put(store: MailboxStore, content: bytes, user: str = ALICE, **kwargs: object) -> object:
    return store.apply([deliver(prepare_delivery(user, content, **kwargs))])[0]  # type: ignore[arg-type]


def test_delivery_creates_the_default_mailboxes_and_numbers_uids_from_one(
    store: MailboxStore,
) -> None:
    outcomes = [put(store, message(f"m{i}")) for i in range(3)]
    assert all(isinstance(o, Delivered) and not o.duplicate for o in outcomes)
    assert [o.uid for o in outcomes] == [1, 2, 3]  # type: ignore[attr-defined]
    names = [(info.name, info.special_use) for info in store.mailboxes(ALICE)]
    assert names[0] == ("INBOX", "")
    assert set(names) == {
        ("INBOX", ""),
        ("Archive", "\\Archive"),
        ("Drafts", "\\Drafts"),
        ("Junk", "\\Junk"),
        ("Sent", "\\Sent"),
        ("Trash", "\\Trash"),
    }
    inbox = store.mailbox(ALICE, "inbox")
    assert inbox is not None and inbox.name == "INBOX"
    assert (inbox.messages, inbox.unseen, inbox.uidnext) == (3, 3, 4)
    listed = store.messages(ALICE)
    assert [m.uid for m in listed] == [1, 2, 3]
    assert store.content(listed[1].content_id) == message("m1")
    assert inbox.size == sum(len(message(f"m{i}")) for i in range(3))
    assert store.usage(ALICE) == (inbox.size, 3)
    assert store.totals() == (inbox.size, 3, 1)
    assert store.mailboxes("nobody@example.test") == []
    assert store.messages("nobody@example.test") == []


def test_read_returns_slices_and_nothing_past_the_end(store: MailboxStore) -> None:
    content = message("slice", b"x" * 10_000 + b"\r\n")
    put(store, content)
    content_id = store.messages(ALICE)[0].content_id
    pieces = [store.read(content_id, offset, 4096) for offset in range(0, len(content), 4096)]
    assert b"".join(pieces) == content
    assert store.read(content_id, len(content) + 5, 10) == b""
    assert store.read(b"\0" * 8, 0, 10) == b""


def test_a_reader_reads_a_batch_in_one_transaction_and_then_closes(store: MailboxStore) -> None:
    contents = [message(f"batch {i}") for i in range(3)]
    for content in contents:
        put(store, content)
    listing = store.messages(ALICE)
    reader = store.reader()
    assert [reader.read(m.content_id, 0, m.size) for m in listing] == contents
    assert reader.read(listing[0].content_id, 3, 4) == contents[0][3:7]
    assert reader.read(b"\0" * 8, 0, 10) == b""
    reader.close()
    reader.close()  # twice is harmless
    with pytest.raises(ValueError, match="closed"):
        reader.read(listing[0].content_id, 0, 10)
    put(store, message("after"))  # the closed reader held no pages back from a writer
    assert len(store.messages(ALICE)) == 4


def test_flags_internaldate_and_keywords_are_kept(store: MailboxStore) -> None:
    put(store, message("a"), flags=[SEEN, "$Label1"], internaldate=1_600_000_000.5)
    first = store.messages(ALICE)[0]
    assert first.flags == {SEEN, "$Label1"}
    assert first.internaldate == 1_600_000_000.5
    assert store.mailbox(ALICE, "INBOX").unseen == 0  # type: ignore[union-attr]
    put(store, message("b"))
    before = store.mailbox(ALICE, "INBOX").highestmodseq  # type: ignore[union-attr]
    changed = store.apply([set_flags(ALICE, "INBOX", [2, 99], [SEEN, FLAGGED], "add")])[0]
    assert [m.uid for m in changed] == [2]  # type: ignore[attr-defined]
    inbox = store.mailbox(ALICE, "INBOX")
    assert inbox is not None and inbox.unseen == 0 and inbox.highestmodseq == before + 1
    assert store.messages(ALICE)[1].flags == {SEEN, FLAGGED}
    assert store.messages(ALICE)[1].modseq == before + 1
    # a change that changes nothing takes no modseq
    assert store.apply([set_flags(ALICE, "INBOX", [2], [SEEN], "add")])[0] == []
    store.apply([set_flags(ALICE, "INBOX", [1], [SEEN], "remove")])
    assert store.messages(ALICE)[0].flags == {"$Label1"}
    store.apply([set_flags(ALICE, "INBOX", [1, 2], [DELETED], "replace")])
    assert [m.flags for m in store.messages(ALICE)] == [{DELETED}, {DELETED}]
    assert store.mailbox(ALICE, "INBOX").unseen == 2  # type: ignore[union-attr]
    outcome = store.apply([set_flags(ALICE, "Nope", [1], [SEEN], "add")])[0]
    assert isinstance(outcome, NoSuchMailbox)


def test_expunge_frees_content_and_usage_and_uids_never_repeat(store: MailboxStore) -> None:
    for i in range(4):
        put(store, message(f"m{i}"))
    ids = [m.content_id for m in store.messages(ALICE)]
    removed = store.apply([expunge(ALICE, "INBOX", [2, 3, 42])])[0]
    assert removed == [2, 3]
    assert store.content(ids[1]) is None and store.summary(ids[1]) is None
    assert [m.uid for m in store.messages(ALICE)] == [1, 4]
    assert store.usage(ALICE) == (len(message("m0")) + len(message("m3")), 2)
    assert store.expunged_since(ALICE, "INBOX", 0) == [2, 3]
    new = put(store, message("m4"))
    assert isinstance(new, Delivered) and new.uid == 5


def test_deleting_gives_the_space_back(store: MailboxStore) -> None:
    """The data file stops growing over deliver/expunge cycles: freed pages are reused."""
    big = message("big", os.urandom(200_000).hex().encode()[:300_000] + b"\r\n")
    sizes = []
    for cycle in range(12):
        store.apply([deliver(prepare_delivery(ALICE, big)) for _ in range(5)])
        uids = [m.uid for m in store.messages(ALICE)]
        assert store.apply([expunge(ALICE, "INBOX", uids)])[0] == uids
        sizes.append(store.env.info()["last_pgno"])
        if cycle == 6:
            store.apply([delete_user(ALICE)])
    assert store.usage(ALICE) == (0, 0)
    assert store.totals()[:2] == (0, 0)
    # 5 x 300 kB live at the peak: after the first cycles the high-water mark stays put
    assert max(sizes[4:]) <= sizes[3] + 16
    assert store.env.info()["last_pgno"] * 4096 < 4 * 5 * len(big)


def test_quota_refuses_the_delivery_alone(store: MailboxStore) -> None:
    content = message("q", b"y" * 1000 + b"\r\n")
    quota = 2 * len(content) + 10
    assert isinstance(put(store, content, quota=quota), Delivered)
    outcomes = store.apply(
        [
            deliver(prepare_delivery(ALICE, content, quota=quota)),
            deliver(prepare_delivery(ALICE, content, quota=quota)),
            deliver(prepare_delivery("bob@example.test", content, quota=quota)),
        ]
    )
    assert isinstance(outcomes[0], Delivered)
    assert isinstance(outcomes[1], OverQuota)
    assert isinstance(outcomes[2], Delivered)
    assert store.usage(ALICE) == (2 * len(content), 2)
    assert store.totals() == (3 * len(content), 3, 2)


def test_a_delivery_key_is_delivered_exactly_once(store: MailboxStore) -> None:
    key = b"Q123\0alice@example.test"
    first = put(store, message("once"), key=key)
    again = store.apply(
        [deliver(prepare_delivery(ALICE, message("once"), key=key)) for _ in range(2)]
    )
    assert isinstance(first, Delivered) and not first.duplicate
    for outcome in again:
        assert isinstance(outcome, Delivered) and outcome.duplicate
        assert (outcome.mailbox_id, outcome.uid) == (first.mailbox_id, first.uid)
    assert len(store.messages(ALICE)) == 1
    assert store.delivered(key) == Delivered(first.mailbox_id, first.uid, first.uidvalidity, True)
    # a duplicate is found even when the mailbox is full by now
    assert isinstance(put(store, message("once"), key=key, quota=1), Delivered)


def test_old_delivery_keys_are_swept(store: MailboxStore) -> None:
    put(store, message("k"), key=b"old-key")
    later = time.time() + DELIVERED_TTL + 60
    assert store.apply([sweep_delivered(now=later)])[0] == 1
    assert store.delivered(b"old-key") is None


def test_deliveries_sweep_expired_keys_as_they_go(
    store: MailboxStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The idempotency table stays bounded without any sweeper: each delivery drops a few
    records older than DELIVERED_TTL."""
    for i in range(6):
        put(store, message(f"s{i}"), key=f"old-{i}".encode())
    later = time.time() + DELIVERED_TTL + 60
    monkeypatch.setattr(time, "time", lambda: later)
    put(store, message("new"), key=b"new-1")
    put(store, message("new"), key=b"new-2")
    assert [store.delivered(f"old-{i}".encode()) for i in range(6)] == [None] * 6
    assert store.delivered(b"new-1") is not None and store.delivered(b"new-2") is not None
    with store.env.begin() as txn:
        assert txn.stat(store.delivered_age)["entries"] == 2


def test_uidvalidity_grows_when_a_mailbox_is_made_again(store: MailboxStore) -> None:
    store.apply([create_user(ALICE)])
    assert store.apply([create_user(ALICE)]) == [False]  # idempotent
    made = store.apply([create_mailbox(ALICE, "Lists/rust")])[0]
    assert not isinstance(made, Exception)
    assert isinstance(store.apply([create_mailbox(ALICE, "Lists/rust")])[0], MailboxExists)
    assert isinstance(store.apply([create_mailbox(ALICE, "a//b")])[0], InvalidMailboxName)
    put(store, message("l"), mailbox="Lists/rust")
    first = store.mailbox(ALICE, "Lists/rust")
    assert first is not None and first.messages == 1
    assert store.apply([delete_mailbox(ALICE, "Lists/rust")])[0] == (len(message("l")), 1)
    assert store.usage(ALICE) == (0, 0)
    store.apply([create_mailbox(ALICE, "Lists/rust")])
    second = store.mailbox(ALICE, "Lists/rust")
    assert second is not None and second.uidvalidity > first.uidvalidity
    assert second.id != first.id and second.messages == 0
    assert isinstance(store.apply([delete_mailbox(ALICE, "INBOX")])[0], InvalidMailboxName)


def test_rename_keeps_messages_and_renaming_inbox_leaves_an_empty_one(
    store: MailboxStore,
) -> None:
    put(store, message("r"), mailbox="Work")
    put(store, message("r2"), mailbox="Work/2026")
    assert store.apply([rename_mailbox(ALICE, "Work", "Jobs")]) == [None]
    assert store.mailbox(ALICE, "Work") is None
    assert [m.uid for m in store.messages(ALICE, "Jobs")] == [1]
    assert store.content(store.messages(ALICE, "Jobs/2026")[0].content_id) == message("r2")
    put(store, message("i"))
    old_inbox = store.mailbox(ALICE, "INBOX")
    assert store.apply([rename_mailbox(ALICE, "INBOX", "Old")]) == [None]
    moved = store.mailbox(ALICE, "Old")
    assert moved is not None and old_inbox is not None and moved.messages == 1
    assert moved.uidvalidity == old_inbox.uidvalidity
    fresh = store.mailbox(ALICE, "INBOX")
    assert fresh is not None and fresh.messages == 0
    assert isinstance(store.apply([rename_mailbox(ALICE, "Old", "Jobs")])[0], MailboxExists)
    assert store.apply([subscribe(ALICE, "Old", False)]) == [None]
    assert store.mailbox(ALICE, "Old").subscribed is False  # type: ignore[union-attr]


def test_listing_a_large_mailbox_reads_only_the_index(store: MailboxStore) -> None:
    """100,000 index entries list without a single content or summary record."""
    store.apply([create_user(ALICE)])
    inbox = store.mailbox(ALICE, "INBOX")
    assert inbox is not None
    entry = struct.Struct(">QdQQB")
    count = 100_000
    mailbox_id = inbox.id

    def index_entries(store: MailboxStore, txn: lmdb.Transaction) -> None:
        for uid in range(1, count + 1):
            value = entry.pack(uid, 1_700_000_000.0 + uid, 1000 + uid, uid, 1 if uid % 2 else 0)
            txn.put(struct.pack(">II", mailbox_id, uid), value, db=store.index)

    store.apply([index_entries])  # through apply: the map grows as it must
    with store.env.begin() as txn:
        assert txn.stat(store.contents)["entries"] == 0  # no message bodies exist at all
    listed = store.messages(ALICE)
    assert len(listed) == count
    assert listed[-1].uid == count and listed[-1].size == 1000 + count
    assert listed[0].flags == {SEEN} and listed[1].flags == frozenset()


_WRITER = """
import sys
from pathlib import Path
from tachymail.mailbox import MailboxStore, deliver, prepare_delivery
store = MailboxStore(Path(sys.argv[1]), map_size=1 << 20)
for i in range(60):
    body = (sys.argv[2] * 20000).encode()
    store.apply([deliver(prepare_delivery("alice@example.test", b"Subject: x\\r\\n\\r\\n" + body))])
store.close()
"""


def test_processes_share_the_store_and_grow_its_map_together(tmp_path: Path) -> None:
    """Two processes deliver at once into a 1 MiB map that must grow to about 4 MiB: each
    adopts the other's growth, UIDs stay unique and gapless, and the totals add up."""
    directory = tmp_path / "mailbox"
    writers = [
        subprocess.Popen([sys.executable, "-c", _WRITER, str(directory), letter]) for letter in "ab"
    ]
    try:
        assert [w.wait(timeout=120) for w in writers] == [0, 0]
    finally:
        for writer in writers:
            if writer.poll() is None:
                writer.kill()
                writer.wait()
    store = MailboxStore(directory, readonly=True)
    try:
        listed = store.messages(ALICE)
        assert [m.uid for m in listed] == list(range(1, 121))
        bodies = [store.content(m.content_id) for m in listed]
        assert sorted(b[-1:] for b in bodies if b) == [b"a"] * 60 + [b"b"] * 60
        size = sum(m.size for m in listed)
        assert store.usage(ALICE) == (size, 120) and store.totals() == (size, 120, 1)
        assert store.env.info()["map_size"] > 2 << 20
    finally:
        store.close()


def test_readonly_open(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        MailboxStore(tmp_path / "missing", readonly=True)
    writer = MailboxStore(tmp_path / "mailbox", map_size=4 * MiB)
    put(writer, message("ro"))
    writer.close()  # LMDB opens an environment once per process
    reader = MailboxStore(tmp_path / "mailbox", readonly=True)
    try:
        assert [m.uid for m in reader.messages(ALICE)] == [1]
        assert reader.totals()[1] == 1
        with pytest.raises(lmdb.Error):
            reader.apply([create_user("x@example.test")])
    finally:
        reader.close()


def test_a_full_map_is_storage_full_and_nothing_is_stored(tmp_path: Path) -> None:
    store = MailboxStore(tmp_path / "mailbox", map_size=1 * MiB, max_map_size=2 * MiB)
    try:
        put(store, message("small"))
        huge = message("huge", b"z" * (3 * MiB) + b"\r\n")
        with pytest.raises(StorageFull):
            store.apply(
                [
                    deliver(prepare_delivery(ALICE, message("ok"))),
                    deliver(prepare_delivery(ALICE, huge)),
                ]
            )
        assert [m.uid for m in store.messages(ALICE)] == [1]
        assert isinstance(put(store, message("after")), Delivered)  # still usable
    finally:
        store.close()


def test_group_committer_resolves_outcomes_and_refusals(store: MailboxStore) -> None:
    async def run() -> list[object]:
        committer = GroupCommitter(store, max_batch=8, linger=0.001, inline=True, observe=False)
        futures = [
            committer.submit_operation(deliver(prepare_delivery(ALICE, message(f"g{i}"))))
            for i in range(5)
        ]
        futures.append(
            committer.submit_operation(deliver(prepare_delivery(ALICE, message("over"), quota=10)))
        )
        return list(await asyncio.gather(*futures, return_exceptions=True))

    outcomes = asyncio.run(run())
    assert [o.uid for o in outcomes[:5]] == [1, 2, 3, 4, 5]  # type: ignore[attr-defined]
    assert isinstance(outcomes[5], OverQuota)


def test_delivery_headers_and_loop_detection() -> None:
    assert delivery_headers("", ALICE) == (
        b"Return-Path: <>\r\nDelivered-To: alice@example.test\r\n"
    )
    content = delivery_headers("bob@example.test", ALICE) + message("loop")
    assert content.startswith(b"Return-Path: <bob@example.test>\r\n")
    assert delivered_to(content, "ALICE@example.test")
    assert not delivered_to(content, "carol@example.test")
    folded = b"Subject: x\r\nDelivered-To:\r\n  <carol@example.test>\r\n\r\nbody\r\n"
    assert delivered_to(folded, "carol@example.test")
    in_body = b"Subject: x\r\n\r\nDelivered-To: carol@example.test\r\n"
    assert not delivered_to(in_body, "carol@example.test")


def test_maildrop_lock_excludes_a_second_session(tmp_path: Path) -> None:
    first = MaildropLock.acquire(tmp_path, ALICE)
    assert first is not None
    assert MaildropLock.acquire(tmp_path, "ALICE@example.test") is None
    other = MaildropLock.acquire(tmp_path, "bob@example.test")
    assert other is not None
    first.release()
    first.release()
    again = MaildropLock.acquire(tmp_path, ALICE)
    assert again is not None
    again.release()
    other.release()


def test_summary_of_a_nested_message() -> None:
    content = (
        b"From: a@x\r\nTo: b@y\r\nSubject: outer\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\n"
        b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=XX\r\n\r\n"
        b"preamble\r\n--XX\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Language: fr\r\n\r\nline one\r\nline two\r\n"
        b"--XX\r\nContent-Type: message/rfc822\r\n"
        b'Content-Disposition: attachment; filename="fwd.eml"\r\n\r\n'
        b"From: c@z\r\nSubject: inner\r\nMessage-ID: <in@z>\r\n\r\ninner body\r\n"
        b"--XX--\r\n"
    )
    summary = build_summary(content)
    assert summary["envelope"]["subject"] == "outer"
    assert summary["envelope"]["cc"] is None
    body = summary["body"]
    assert (body["type"], body["subtype"], body["params"]) == (
        "multipart",
        "mixed",
        {"boundary": "XX"},
    )
    text, attached = body["parts"]
    assert text["params"] == {"charset": "utf-8"} and text["language"] == "fr"
    assert text["lines"] == 2
    assert content[text["body_start"] : text["end"]] == b"line one\r\nline two"
    assert attached["disposition"] == "attachment"
    assert attached["disposition_params"] == {"filename": "fwd.eml"}
    assert attached["message"]["envelope"]["message-id"] == "<in@z>"
    assert attached["message"]["body"]["type"] == "text"


def _corpus_messages() -> list[Path]:
    if not CORPUS.is_dir():
        return []
    found = [p for p in sorted(CORPUS.rglob("*")) if p.is_file() and p.stat().st_size < 2 * MiB]
    return found


def test_summaries_of_corpus_messages_never_raise(store: MailboxStore) -> None:
    files = _corpus_messages()
    if not files:
        pytest.skip(f"no corpus at {CORPUS}")
    for path in files:
        content = path.read_bytes()
        summary = build_summary(content)
        assert "summary failed" not in summary["body"]["defects"], path
        assert 0 <= summary["body"]["body_start"] <= summary["body"]["end"] <= len(content)
    # and a batch of them goes through the store intact
    batch = files[:50]
    outcomes = store.apply([deliver(prepare_delivery(ALICE, p.read_bytes())) for p in batch])
    assert all(isinstance(o, Delivered) for o in outcomes)
    for info, path in zip(store.messages(ALICE), batch, strict=True):
        assert store.content(info.content_id) == path.read_bytes()
        assert store.summary(info.content_id) == build_summary(path.read_bytes())


_PIECES = st.sampled_from(
    [
        b"Content-Type: multipart/mixed; boundary=b\r\n",
        b"Content-Type: message/rfc822\r\n",
        b"Content-Disposition: attachment; filename*=utf-8''%e2%82%ac\r\n",
        b"Subject: \xff\xfe\r\n",
        b"\r\n",
        b"--b\r\n",
        b"--b--\r\n",
        b"text\n",
        b"From: a@b\r\n",
    ]
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(_PIECES, st.binary(max_size=40)), max_size=30))
def test_a_summary_never_fails_and_always_encodes(pieces: list[bytes]) -> None:
    content = b"".join(pieces)
    summary = build_summary(content)
    assert "summary failed" not in summary["body"]["defects"]
    assert orjson.loads(orjson.dumps(summary)) == summary
    body = summary["body"]
    assert 0 <= body["start"] <= body["body_start"] <= body["end"] <= len(content)


def _threaded(subject: str, headers: str = "") -> bytes:
    return (
        f"From: bob@example.test\r\nSubject: {subject}\r\nMessage-ID: <{subject}@x>\r\n"
        f"{headers}\r\nHello.\r\n"
    ).encode()


def test_threads_come_from_message_ids_whatever_the_order(store: MailboxStore) -> None:
    """A reply arriving before its original, a reply naming only its parent, a message
    without a Message-ID and one of another user: each finds its conversation; an
    expunge removes the thread records with the content."""
    put(store, _threaded("b", "In-Reply-To: <a@x>\r\n"))  # before its parent
    put(store, _threaded("a"))
    put(store, _threaded("c", "References: <B@x>\r\n"))  # only the parent, another case
    put(store, b"Subject: no id\r\n\r\nx\r\n")
    put(store, _threaded("d", "References: <elsewhere@y>\r\n"))
    put(store, _threaded("a"), user="carol@example.test")  # same id, another user
    contents = [int.from_bytes(m.content_id, "big") for m in store.messages(ALICE)]
    threads = store.threads_of(contents)
    b, a, c, no_id, d = (threads[x] for x in contents)
    assert a == b == c and len({a, no_id, d}) == 3
    assert no_id == contents[3]  # a thread of its own, keyed by its content
    assert store.thread_members(ALICE, a) == sorted(contents[:3])
    assert store.thread_members("carol@example.test", a) != store.thread_members(ALICE, a)
    store.apply([expunge(ALICE, "INBOX", [1])])
    assert store.thread_members(ALICE, a) == sorted(contents[1:3])
    assert contents[0] not in store.threads_of(contents)


def test_thread_refs_are_lenient_and_bounded() -> None:
    own = thread_refs(b"Message-ID: <Me@x>\r\nReferences: <r1@x>\r\n <me@x> junk <r2@x>\r\n\r\n")
    assert own.own == id_key(b"<me@x>")
    assert own.parents == (id_key(b"<r1@x>"), id_key(b"<r2@x>"))
    many = " ".join(f"<r{i}@x>" for i in range(1000))
    refs = thread_refs(f"References: {many}\r\n\r\n".encode())
    assert refs.own == 0 and len(refs.parents) == MAX_PARENTS
    assert refs.parents[0] == id_key(b"<r0@x>") and refs.fallback == refs.parents[0]
    assert thread_refs(b"\xff\xfe garbage") == ThreadRefs(0, ())


def test_vacation_reply_is_due_once_per_sender_per_interval(store: MailboxStore) -> None:
    def with_reply(sender: str, days: float = 7.0) -> Delivered:
        delivery = prepare_delivery(ALICE, message("away"))
        delivery.reply = (sender, b"reply")
        delivery.reply_days = days
        outcome = store.apply([deliver(delivery)])[0]
        assert isinstance(outcome, Delivered)
        return outcome

    assert with_reply("bob@x.test").reply_due
    assert not with_reply("bob@x.test").reply_due
    assert with_reply("carol@x.test").reply_due
    time.sleep(0.01)
    assert with_reply("bob@x.test", days=1e-7).reply_due  # the interval is over
    assert not put(store, message("plain")).reply_due  # type: ignore[union-attr]


def test_vacation_rules_of_rfc_3834(tmp_path: Path) -> None:
    own = {"alice@example.test"}
    plain = b"From: bob@x.test\r\nSubject: hi\r\nMessage-ID: <m1@x>\r\n\r\nbody\r\n"
    assert may_reply(plain, "bob@x.test", own)
    assert not may_reply(plain, "", own)
    assert not may_reply(plain, "alice@example.test", own)
    assert not may_reply(plain, "MAILER-DAEMON@x.test", own)
    assert not may_reply(plain, "list-request@x.test", own)
    for field in (
        b"Auto-Submitted: auto-generated",
        b"Auto-Submitted: auto-replied; owner-email=x",
        b"Precedence: bulk",
        b"Precedence: JUNK",
        b"List-Unsubscribe: <mailto:u@x>",
    ):
        assert not may_reply(field + b"\r\n" + plain, "bob@x.test", own), field
    assert may_reply(b"Auto-Submitted: no\r\n" + plain, "bob@x.test", own)
    # the setting's window and state
    path = vacation_path(tmp_path, ALICE)
    assert load_vacation(tmp_path, ALICE) is None  # never set
    path.parent.mkdir(parents=True)
    path.write_bytes(
        orjson.dumps(
            {
                "isEnabled": True,
                "fromDate": "2030-01-01T00:00:00Z",
                "toDate": "2030-01-08T00:00:00Z",
                "subject": None,
                "textBody": "Away, back soon.",
                "htmlBody": "<p>Away</p>",
            }
        )
    )
    start = parse_utc_date("2030-01-01T00:00:00Z")
    assert start is not None
    assert load_vacation(tmp_path, ALICE, now=start - 1) is None
    assert load_vacation(tmp_path, ALICE, now=start + 7 * 86400) is None
    vacation = load_vacation(tmp_path, ALICE, now=start)
    assert vacation is not None
    reply = auto_reply(vacation, ALICE, b"Reply-To: Bob <b@x.test>\r\n" + plain, "mx.test")
    parsed = BytesParser(policy=email.policy.default).parsebytes(reply)
    assert parsed["Subject"] == "Auto: hi" and parsed["To"] == "Bob <b@x.test>"
    assert parsed["Auto-Submitted"] == "auto-replied"
    assert parsed["In-Reply-To"] == "<m1@x>" and parsed["References"] == "<m1@x>"
    assert parsed.get_body(("plain",)).get_content().strip() == "Away, back soon."  # type: ignore[union-attr]
    assert parsed.get_body(("html",)).get_content().strip() == "<p>Away</p>"  # type: ignore[union-attr]
    path.write_bytes(b"{broken")
    assert load_vacation(tmp_path, ALICE) is None
