"""The mailbox store's operations for IMAP on a real LMDB environment: COPY (shared content),
MOVE (one transaction, logged for QRESYNC), APPEND into an existing mailbox only, the
CONDSTORE reads (changed_since, index_state), the on_commit hook, and the counters and
quota usage staying exact through any mix of them."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tachymail.mailbox import (
    DELETED,
    FLAGGED,
    SEEN,
    CopyResult,
    Delivered,
    InvalidMailboxName,
    MailboxStore,
    NoSuchMailbox,
    OverQuota,
    claim_recent,
    copy_messages,
    create_mailbox,
    delete_mailbox,
    delete_user,
    deliver,
    expunge,
    move_messages,
    prepare_delivery,
    rename_mailbox,
    set_flags,
    subscribe,
)
from tachymail.mailbox.store import MiB

ALICE = "alice@example.test"
BOB = "bob@example.test"


def message(subject: str, body: bytes = b"Hello.\r\n") -> bytes:
    return (
        b"From: Bob <bob@example.test>\r\nTo: alice@example.test\r\n"
        b"Subject: " + subject.encode() + b"\r\n\r\n" + body
    )


@pytest.fixture
def store(tmp_path: Path) -> MailboxStore:
    opened = MailboxStore(tmp_path / "mailbox", map_size=4 * MiB)
    yield opened  # type: ignore[misc]
    opened.close()


def put(store: MailboxStore, content: bytes, user: str = ALICE, **kwargs: object) -> object:
    return store.apply([deliver(prepare_delivery(user, content, **kwargs))])[0]  # type: ignore[arg-type]


def one(store: MailboxStore, operation: object) -> object:
    return store.apply([operation])[0]  # type: ignore[list-item]


def records(store: MailboxStore, name: bytes) -> int:
    """Entries of one named database of the store."""
    db = {
        b"contents": store.contents,
        b"summaries": store.summaries,
        b"refs": store.refs,
        b"index": store.index,
    }[name]
    with store.env.begin() as txn:
        return int(txn.stat(db)["entries"])


def assert_consistent(store: MailboxStore, user: str = ALICE) -> None:
    """Every counter equals what the index holds: per mailbox (messages, unseen, size,
    uidnext above every UID, highestmodseq at least every entry's), the user's usage, the
    node's totals, and the content records (one per distinct content, refs for shared)."""
    total_size = total_count = 0
    for info in store.mailboxes(user):
        state = store.index_state(user, info.name)
        assert state is not None
        mailbox, listed = state
        assert mailbox.messages == len(listed), mailbox.name
        assert mailbox.unseen == sum(SEEN not in m.flags for m in listed), mailbox.name
        assert mailbox.size == sum(m.size for m in listed), mailbox.name
        assert all(m.uid < mailbox.uidnext for m in listed)
        assert all(m.modseq <= mailbox.highestmodseq for m in listed)
        total_size += mailbox.size
        total_count += mailbox.messages
    assert store.usage(user) == (total_size, total_count)
    contents = {
        m.content_id for info in store.mailboxes(user) for m in store.messages(user, info.name)
    }
    if store.users() == [user] or not store.users():
        assert store.totals()[:2] == (total_size, total_count)
        assert records(store, b"contents") == len(contents)
        assert records(store, b"summaries") == len(contents)
    for content_id in contents:
        assert store.content(content_id) is not None


def test_copy_keeps_flags_and_dates_takes_new_uids_and_shares_the_content(
    store: MailboxStore,
) -> None:
    put(store, message("a"), flags=[SEEN, "$Label1"], internaldate=1_600_000_000.0)
    put(store, message("b"), internaldate=1_600_000_100.0)
    put(store, message("c"), flags=[FLAGGED])
    archive = store.mailbox(ALICE, "Archive")
    assert archive is not None
    one(store, create_mailbox(ALICE, "Archive/2024"))  # the target has its own history
    before = store.mailbox(ALICE, "Archive")
    assert before is not None and before.uidvalidity == archive.uidvalidity
    result = one(store, copy_messages(ALICE, "INBOX", "Archive", [3, 1, 99, 1]))
    assert result == CopyResult(archive.uidvalidity, [1, 3], [1, 2])
    after = store.mailbox(ALICE, "Archive")
    assert after is not None
    assert (after.messages, after.unseen, after.uidnext) == (2, 1, 3)
    assert after.uidvalidity == archive.uidvalidity
    assert after.highestmodseq == before.highestmodseq + 1
    copies = store.messages(ALICE, "Archive")
    originals = store.messages(ALICE)
    assert [m.flags for m in copies] == [originals[0].flags, originals[2].flags]
    assert [m.internaldate for m in copies] == [
        originals[0].internaldate,
        originals[2].internaldate,
    ]
    assert {m.modseq for m in copies} == {after.highestmodseq}
    # one content record for two entries; COPY adds to the usage all the same
    assert copies[0].content_id == originals[0].content_id
    assert records(store, b"contents") == 3
    inbox = store.mailbox(ALICE, "INBOX")
    assert inbox is not None
    assert store.usage(ALICE) == (inbox.size + after.size, 5)
    assert store.content(copies[1].content_id) == message("c")
    assert_consistent(store)
    # a second copy into the same mailbox continues the UIDs
    again = one(store, copy_messages(ALICE, "INBOX", "Archive", [2]))
    assert again == CopyResult(archive.uidvalidity, [2], [3])


def test_expunging_a_copy_keeps_the_other_and_the_last_one_frees_the_content(
    store: MailboxStore,
) -> None:
    put(store, message("shared"))
    one(store, copy_messages(ALICE, "INBOX", "Archive", [1]))
    one(store, copy_messages(ALICE, "INBOX", "INBOX", [1]))  # into itself: a second entry
    content_id = store.messages(ALICE)[0].content_id
    assert [m.uid for m in store.messages(ALICE)] == [1, 2]
    assert records(store, b"refs") == 1
    assert one(store, expunge(ALICE, "INBOX", [1])) == [1]
    assert store.content(content_id) == message("shared")
    assert_consistent(store)
    assert one(store, delete_mailbox(ALICE, "Archive")) == (len(message("shared")), 1)
    assert store.content(content_id) == message("shared")
    assert records(store, b"refs") == 0  # one reference left: no record
    assert one(store, expunge(ALICE, "INBOX", [2])) == [2]
    assert store.content(content_id) is None and store.summary(content_id) is None
    assert records(store, b"contents") == 0 and records(store, b"summaries") == 0
    assert store.usage(ALICE) == (0, 0)


def test_deleting_the_user_frees_shared_contents(store: MailboxStore) -> None:
    for i in range(3):
        put(store, message(f"m{i}"))
    one(store, copy_messages(ALICE, "INBOX", "Archive", [1, 2, 3]))
    one(store, copy_messages(ALICE, "Archive", "Trash", [1, 2]))
    put(store, message("bob's"), user=BOB)
    size = 2 * sum(len(message(f"m{i}")) for i in range(3)) + len(message("m0"))
    size += len(message("m1"))
    assert one(store, delete_user(ALICE)) == (size, 8)
    assert records(store, b"contents") == 1  # bob's
    assert records(store, b"refs") == 0
    assert store.totals()[:2] == (len(message("bob's")), 1)


def test_copy_refusals_write_nothing(store: MailboxStore) -> None:
    put(store, message("x", b"z" * 1000 + b"\r\n"))
    highest = {info.name: info.highestmodseq for info in store.mailboxes(ALICE)}
    missing = one(store, copy_messages(ALICE, "INBOX", "Nowhere", [1]))
    assert isinstance(missing, NoSuchMailbox) and missing.mailbox == "Nowhere"
    gone = one(store, copy_messages(ALICE, "Gone", "INBOX", [1]))
    assert isinstance(gone, NoSuchMailbox) and gone.mailbox == "Gone"
    assert isinstance(one(store, copy_messages(ALICE, "INBOX", "a//b", [1])), InvalidMailboxName)
    used = store.usage(ALICE)[0]
    over = one(store, copy_messages(ALICE, "INBOX", "Archive", [1], quota=2 * used - 1))
    assert isinstance(over, OverQuota)
    assert isinstance(one(store, move_messages(ALICE, "INBOX", "Nowhere", [1])), NoSuchMailbox)
    assert {info.name: info.highestmodseq for info in store.mailboxes(ALICE)} == highest
    assert store.usage(ALICE) == (used, 1)
    # exactly at the quota is allowed; absent UIDs are an empty result, no new modseq
    fits = one(store, copy_messages(ALICE, "INBOX", "Archive", [1], quota=2 * used))
    assert isinstance(fits, CopyResult) and fits.dest == [1]
    archive = store.mailbox(ALICE, "Archive")
    assert archive is not None
    empty = one(store, copy_messages(ALICE, "INBOX", "Archive", [7, 8]))
    assert empty == CopyResult(archive.uidvalidity, [], [])
    assert store.mailbox(ALICE, "Archive") == archive
    assert_consistent(store)


def test_move_rekeys_the_entries_and_logs_the_expunge_under_one_modseq(
    store: MailboxStore,
) -> None:
    for i in range(5):
        put(store, message(f"m{i}"), flags=[SEEN] if i % 2 else [])
    inbox = store.mailbox(ALICE, "INBOX")
    trash = store.mailbox(ALICE, "Trash")
    assert inbox is not None and trash is not None
    contents = {m.uid: m.content_id for m in store.messages(ALICE)}
    usage = store.usage(ALICE)
    result = one(store, move_messages(ALICE, "INBOX", "Trash", [4, 2, 5, 77]))
    assert result == CopyResult(trash.uidvalidity, [2, 4, 5], [1, 2, 3])
    assert [m.uid for m in store.messages(ALICE)] == [1, 3]
    moved = store.messages(ALICE, "Trash")
    assert [m.content_id for m in moved] == [contents[2], contents[4], contents[5]]
    assert [SEEN in m.flags for m in moved] == [True, True, False]
    after = store.mailbox(ALICE, "INBOX")
    assert after is not None and after.highestmodseq == inbox.highestmodseq + 1
    assert (after.messages, after.unseen, after.uidnext) == (2, 2, 6)
    assert store.expunged_since(ALICE, "INBOX", inbox.highestmodseq) == [2, 4, 5]
    assert store.expunged_since(ALICE, "INBOX", after.highestmodseq) == []
    moved_to = store.mailbox(ALICE, "Trash")
    assert moved_to is not None and moved_to.highestmodseq == trash.highestmodseq + 1
    assert store.changed_since(ALICE, "Trash", trash.highestmodseq) == moved
    # no octet copied, nothing counted twice
    assert store.usage(ALICE) == usage
    assert records(store, b"contents") == 5 and records(store, b"refs") == 0
    assert_consistent(store)


def test_move_into_the_same_mailbox_renumbers(store: MailboxStore) -> None:
    for i in range(3):
        put(store, message(f"m{i}"))
    inbox = store.mailbox(ALICE, "INBOX")
    assert inbox is not None
    result = one(store, move_messages(ALICE, "inbox", "INBOX", [1, 2]))
    assert result == CopyResult(inbox.uidvalidity, [1, 2], [4, 5])
    assert [m.uid for m in store.messages(ALICE)] == [3, 4, 5]
    after = store.mailbox(ALICE, "INBOX")
    assert after is not None
    assert (after.messages, after.uidnext, after.highestmodseq) == (3, 6, inbox.highestmodseq + 1)
    assert store.expunged_since(ALICE, "INBOX", inbox.highestmodseq) == [1, 2]
    assert_consistent(store)


def test_copy_and_move_of_many_messages_in_one_operation(store: MailboxStore) -> None:
    count = 2000
    store.apply([deliver(prepare_delivery(ALICE, message(f"n{i}"))) for i in range(count)])
    uids = list(range(1, count + 1))
    copied = one(store, copy_messages(ALICE, "INBOX", "Archive", uids))
    assert isinstance(copied, CopyResult) and copied.dest == uids
    moved = one(store, move_messages(ALICE, "Archive", "Trash", uids[::2]))
    assert isinstance(moved, CopyResult) and moved.dest == list(range(1, count // 2 + 1))
    assert [m.uid for m in store.messages(ALICE, "Archive")] == uids[1::2]
    assert len(store.expunged_since(ALICE, "Archive", 0)) == count // 2
    assert records(store, b"contents") == count
    assert records(store, b"refs") == count  # each content has two entries
    trash = store.messages(ALICE, "Trash")
    assert store.content(trash[-1].content_id) == message(f"n{count - 2}")
    assert_consistent(store)


def test_a_big_message_is_copied_and_moved_without_a_second_copy(tmp_path: Path) -> None:
    store = MailboxStore(tmp_path / "mailbox", map_size=4 * MiB, max_map_size=256 * MiB)
    try:
        body = os.urandom(12 * MiB // 2).hex().encode() + b"\r\n"
        content = message("big", body)
        put(store, content)
        pages = store.env.info()["last_pgno"]
        one(store, copy_messages(ALICE, "INBOX", "Archive", [1]))
        one(store, move_messages(ALICE, "Archive", "Trash", [1]))
        # the 12 MiB were not written again (a copy would take about 3,000 more pages)
        assert store.env.info()["last_pgno"] < pages + 100
        copy = store.messages(ALICE, "Trash")[0]
        assert copy.size == len(content)
        assert store.read(copy.content_id, len(content) - 100, 200) == content[-100:]
        assert store.usage(ALICE) == (2 * len(content), 2)
        assert_consistent(store)
    finally:
        store.close()


def test_append_into_a_missing_mailbox_is_refused_when_create_is_false(
    store: MailboxStore,
) -> None:
    # a user not yet in the store: its default mailboxes count as existing
    first = put(store, message("first"), mailbox="Sent", create=False)
    assert isinstance(first, Delivered) and first.uid == 1
    assert {info.name for info in store.mailboxes(ALICE)} >= {"INBOX", "Sent", "Trash"}
    usage = store.usage(ALICE)
    refused = put(store, message("x"), mailbox="Projects", create=False)
    assert isinstance(refused, NoSuchMailbox) and refused.mailbox == "Projects"
    refused = put(store, message("x"), user=BOB, mailbox="Projects", create=False)
    assert isinstance(refused, NoSuchMailbox)
    assert store.users() == [ALICE] and store.usage(ALICE) == usage
    assert store.mailbox(ALICE, "Projects") is None
    made = put(store, message("y"), mailbox="Projects")  # create=True, the default: made
    assert isinstance(made, Delivered)
    kept = put(store, message("z"), mailbox="projects", create=False)
    assert isinstance(kept, NoSuchMailbox)  # names other than INBOX are case-sensitive
    inbox = put(store, message("w"), mailbox="inbox", create=False)
    assert isinstance(inbox, Delivered)
    assert_consistent(store)


def test_changed_since_and_index_state(store: MailboxStore) -> None:
    for i in range(6):
        put(store, message(f"m{i}"))
    inbox = store.mailbox(ALICE, "INBOX")
    assert inbox is not None
    base = inbox.highestmodseq
    assert store.changed_since(ALICE, "INBOX", base) == []
    one(store, set_flags(ALICE, "INBOX", [2, 5], [SEEN], "add"))
    one(store, set_flags(ALICE, "INBOX", [3], [DELETED, "$Junk"], "add"))
    one(store, expunge(ALICE, "INBOX", [5]))
    changed = store.changed_since(ALICE, "INBOX", base)
    assert [(m.uid, m.modseq) for m in changed] == [(2, base + 1), (3, base + 2)]
    assert changed[1].flags == {DELETED, "$Junk"}
    assert store.expunged_since(ALICE, "INBOX", base) == [5]
    assert [m.uid for m in store.changed_since(ALICE, "INBOX", 0)] == [1, 2, 3, 4, 6]
    assert store.changed_since(ALICE, "INBOX", base + 3) == []
    assert store.changed_since(ALICE, "Nope", 0) == []
    assert store.changed_since(ALICE, "a//b", 0) == []
    state = store.index_state(ALICE, "inbox")
    assert state is not None
    info, listed = state
    assert info == store.mailbox(ALICE, "INBOX")
    assert info.highestmodseq == base + 3
    assert listed == store.messages(ALICE)
    assert store.index_state(ALICE, "Nope") is None
    assert store.index_state(ALICE, "") is None
    assert store.index_state(BOB, "INBOX") is None


def test_on_commit_names_the_users_each_commit_changed(
    store: MailboxStore, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[set[str]] = []
    store.on_commit = seen.append
    store.apply(
        [
            deliver(prepare_delivery("Alice@Example.test", message("a"), key=b"k1")),
            deliver(prepare_delivery(BOB, message("b"))),
        ]
    )
    assert seen == [{ALICE, BOB}]
    seen.clear()
    # refusals, duplicates and no-op changes change nobody: no call at all
    store.apply(
        [
            deliver(prepare_delivery(ALICE, message("a"), key=b"k1")),
            copy_messages(ALICE, "INBOX", "Nowhere", [1]),
            set_flags(ALICE, "INBOX", [99], [SEEN], "add"),
            expunge(BOB, "INBOX", [42]),
        ]
    )
    assert seen == []
    store.apply(
        [set_flags(BOB, "INBOX", [1], [SEEN], "add"), copy_messages(ALICE, "INBOX", "Sent", [1])]
    )
    assert seen == [{ALICE, BOB}]
    seen.clear()
    store.apply([move_messages(ALICE, "Sent", "Trash", [1])])
    store.apply([create_mailbox(BOB, "New")])
    store.apply([delete_user(BOB)])
    assert seen == [{ALICE}, {BOB}, {BOB}]

    def broken(users: set[str]) -> None:
        raise RuntimeError("subscriber down")

    store.on_commit = broken
    with caplog.at_level(logging.ERROR, logger="tachymail.mailbox.store"):
        assert isinstance(put(store, message("c")), Delivered)  # committed all the same
    assert "notification failed" in caplog.text
    assert len(store.messages(ALICE)) == 2


# one random step: (operation, source index, destination index, uids, flag)
MAILBOXES = ("INBOX", "Archive", "Trash")
steps = st.lists(
    st.tuples(
        st.sampled_from(["deliver", "copy", "move", "expunge", "seen", "unseen", "drop"]),
        st.integers(0, 2),
        st.integers(0, 2),
        st.lists(st.integers(1, 12), max_size=5),
        st.booleans(),
    ),
    max_size=25,
)


@settings(max_examples=40, deadline=None)
@given(steps)
def test_counters_usage_and_contents_stay_exact_under_any_mix(
    program: list[tuple[str, int, int, list[int], bool]],
) -> None:
    with tempfile.TemporaryDirectory() as directory:
        store = MailboxStore(Path(directory) / "mailbox", map_size=4 * MiB)
        try:
            put(store, message("seed"))
            for step, (kind, a, b, uids, seen) in enumerate(program):
                source, dest = MAILBOXES[a], MAILBOXES[b]
                if kind == "deliver":
                    flags = [SEEN] if seen else []
                    put(
                        store, message(f"s{step}", b"x" * step + b"\r\n"), mailbox=dest, flags=flags
                    )
                elif kind == "copy":
                    one(store, copy_messages(ALICE, source, dest, uids))
                elif kind == "move":
                    one(store, move_messages(ALICE, source, dest, uids))
                elif kind == "expunge":
                    one(store, expunge(ALICE, source, uids))
                elif kind in ("seen", "unseen"):
                    mode = "add" if kind == "seen" else "remove"
                    one(store, set_flags(ALICE, source, uids, [SEEN], mode))
                elif source != "INBOX":
                    one(store, delete_mailbox(ALICE, source))
                    one(store, create_mailbox(ALICE, source))
                assert_consistent(store)
            one(store, delete_user(ALICE))
            assert records(store, b"contents") == 0 and records(store, b"refs") == 0
            assert store.totals()[:2] == (0, 0)
        finally:
            store.close()


def test_recent_is_claimed_once_and_only_up_to_uidnext(store: MailboxStore) -> None:
    for i in range(3):
        put(store, message(f"r{i}"))
    inbox = store.mailbox(ALICE, "INBOX")
    assert inbox is not None
    assert store.first_recent(inbox.id) == 0 and store.recent_count(ALICE, "INBOX") == 3
    # two sessions claim in one batch (as two workers' SELECTs would): only the first gets them
    assert store.apply([claim_recent(ALICE, "INBOX", inbox.id)] * 2) == [(0, 4), (4, 4)]
    assert store.first_recent(inbox.id) == 4 and store.recent_count(ALICE, "INBOX") == 0
    put(store, message("r3"))
    assert store.recent_count(ALICE, "INBOX") == 1
    assert one(store, claim_recent(ALICE, "INBOX", inbox.id)) == (4, 5)
    # a mailbox made again under the name is not the one the session selected
    put(store, message("w"), mailbox="Work")
    work = store.mailbox(ALICE, "Work")
    assert work is not None
    assert one(store, delete_mailbox(ALICE, "Work")) == (work.size, 1)
    assert store.first_recent(work.id) == 0  # dropped with the mailbox
    one(store, create_mailbox(ALICE, "Work"))
    assert one(store, claim_recent(ALICE, "Work", work.id)) == (0, 0)
    assert isinstance(one(store, claim_recent(ALICE, "Gone", 99)), NoSuchMailbox)


def test_subscriptions_outlive_delete_and_may_name_no_mailbox(store: MailboxStore) -> None:
    put(store, message("s"))
    assert one(store, create_mailbox(ALICE, "Box", subscribed=False)) is not None
    assert store.mailbox(ALICE, "Box").subscribed is False  # type: ignore[union-attr]
    assert one(store, subscribe(ALICE, "Box", True)) is None
    assert one(store, delete_mailbox(ALICE, "Box")) == (0, 0)
    assert store.subscriptions(ALICE) == ["Box"]
    # subscribing to a name that is not a mailbox (RFC 9051 §6.3.7)
    assert one(store, subscribe(ALICE, "Later/Child", True)) is None
    assert store.subscriptions(ALICE) == ["Box", "Later/Child"]
    assert isinstance(one(store, subscribe(ALICE, "a//b", True)), InvalidMailboxName)
    assert isinstance(one(store, subscribe(ALICE, "Never", False)), NoSuchMailbox)
    # CREATE takes the kept subscription back, even when it does not subscribe itself
    made = one(store, create_mailbox(ALICE, "Box", subscribed=False))
    assert getattr(made, "subscribed", None) is True
    assert store.subscriptions(ALICE) == ["Later/Child"]
    # so does RENAME onto a subscribed name
    one(store, create_mailbox(ALICE, "Tmp", subscribed=False))
    assert one(store, rename_mailbox(ALICE, "Tmp", "Later/Child")) is None
    assert store.mailbox(ALICE, "Later/Child").subscribed is True  # type: ignore[union-attr]
    assert store.subscriptions(ALICE) == []
    assert one(store, subscribe(ALICE, "Orphan", True)) is None
    assert one(store, subscribe(ALICE, "Orphan", False)) is None
    assert store.subscriptions(ALICE) == []
    one(store, subscribe(ALICE, "Orphan", True))
    one(store, delete_user(ALICE))
    assert store.subscriptions(ALICE) == []
