"""The IMAP session's compact view of a mailbox (``tachymail.imap.index``) on a real mailbox
store: the columns read from the index are the store's messages; a cached entry brought up
to date by the store's changes (deliveries, flag changes, expunges, moves) is what reading
the mailbox afresh gives; what it tells a session that is behind equals the store's
``changed_since`` / ``expunged_since``; a view's changes never show in the cache or in
another view; the cache stays under its cap."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tachymail.imap.index import IndexCache, MessageList, flag_list
from tachymail.mailbox import (
    DELETED,
    FLAGGED,
    SEEN,
    MailboxStore,
    MessageInfo,
    create_user,
    deliver,
    expunge,
    move_messages,
    prepare_delivery,
    set_flags,
)
from tachymail.mailbox.store import MiB

ALICE = "alice@example.test"
FLAGS = [SEEN, FLAGGED, DELETED, "\\Answered", "$Junk", "work", "$Forwarded"]


@pytest.fixture
def store(tmp_path: Path) -> MailboxStore:
    opened = MailboxStore(tmp_path / "mailbox", map_size=8 * MiB)
    yield opened  # type: ignore[misc]
    opened.close()


def put(store: MailboxStore, n: int, mailbox: str = "INBOX", flags: tuple[str, ...] = ()) -> None:
    content = b"Subject: message %d\r\n\r\nbody %d\r\n" % (n, n)
    outcome = store.apply([deliver(prepare_delivery(ALICE, content, mailbox=mailbox, flags=flags))])
    assert not isinstance(outcome[0], Exception)


def rows(messages: list[MessageInfo] | MessageList) -> list[tuple[object, ...]]:
    return [
        (m.uid, m.size, sorted(m.flags), m.internaldate, m.modseq, m.content_id) for m in messages
    ]


def test_columns_are_the_store_messages(store: MailboxStore) -> None:
    for n in range(5):
        put(store, n, flags=(("$Junk", SEEN) if n % 2 else ()))
    columns = store.index_columns(ALICE, "inbox")
    assert columns is not None and columns.info.name == "INBOX"
    view = MessageList(columns)
    assert rows(view) == rows(store.messages(ALICE, "INBOX"))
    assert view.first_unseen() == 1
    assert view.keyword_set() == {"$Junk"}
    assert [view.flag_list(i) for i in range(5)] == [
        flag_list(columns.bits[i], columns.keywords.get(columns.uids[i])) for i in range(5)
    ]
    assert view.flag_lists(0, 5, [(2, 4)]) == [
        b"()",
        b"(\\Seen \\Recent $Junk)",
        b"(\\Recent)",
        b"(\\Seen $Junk)",
        b"()",
    ]
    assert store.index_columns(ALICE, "nonexistent") is None
    assert store.changes_since(ALICE, "nonexistent", 0) is None


def test_a_view_copies_before_it_changes(store: MailboxStore) -> None:
    for n in range(3):
        put(store, n)
    cache = IndexCache(store, 1000)
    entry = cache.refresh(ALICE, "INBOX")
    assert entry is not None
    one, two = entry.view(), entry.view()
    before = rows(two)
    changed = one[1]
    one.put(
        1,
        MessageInfo(changed.uid, changed.size, frozenset({SEEN, "x"}), 0.0, 99, changed.content_id),
    )
    one.remove([0])
    snapshot = one.snapshot()
    one.append(MessageInfo(50, 1, frozenset(), 1.0, 100, b"\0" * 7 + b"\x05"))
    assert rows(two) == before == rows(entry.view())
    assert [m.uid for m in snapshot] == [2, 3]
    assert [m.uid for m in one] == [2, 3, 50]
    assert one[0].flags == {SEEN, "x"} and one.find(50) == 2 and one.find(1) is None


def test_cache_cap_evicts_the_least_recently_used(store: MailboxStore) -> None:
    for name, count in (("INBOX", 4), ("A", 3), ("B", 3), ("Huge", 8)):
        for n in range(count):
            put(store, n, mailbox=name)
    cache = IndexCache(store, 7)
    for name in ("INBOX", "A"):
        cache.refresh(ALICE, name)
    assert len(cache) == 2 and cache.messages == 7
    info = store.mailbox(ALICE, "INBOX")
    assert info is not None and cache.entry(ALICE, "INBOX", info) is not None  # now the newest
    cache.refresh(ALICE, "B")
    assert cache.cached(ALICE, "A") is None and cache.messages == 7
    assert cache.refresh(ALICE, "Huge") is not None  # answered, but too big to keep
    assert cache.cached(ALICE, "Huge") is None and cache.messages <= 7
    put(store, 9)
    info = store.mailbox(ALICE, "INBOX")
    assert info is not None and cache.entry(ALICE, "INBOX", info) is None  # stale


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), steps=st.integers(1, 25))
def test_refreshed_entries_equal_a_fresh_read(
    tmp_path_factory: pytest.TempPathFactory, seed: int, steps: int
) -> None:
    """Random changes by "other processes" (straight to the store); the cache follows them
    step by step, and sessions left behind at every step learn exactly what the store's
    changed_since / expunged_since would tell them."""
    rng = random.Random(seed)
    store = MailboxStore(tmp_path_factory.mktemp("index") / "mailbox", map_size=8 * MiB)
    try:
        store.apply([create_user(ALICE)])
        for n in range(rng.randint(0, 6)):
            put(store, n)
        cache = IndexCache(store, 10_000)
        entry = cache.refresh(ALICE, "INBOX")
        assert entry is not None
        # (modseq, a session's view at it, the rows it had then)
        behind = [(entry.modseq, entry.view(), rows(entry.view()))]
        for step in range(steps):
            uids = [m.uid for m in store.messages(ALICE, "INBOX")]
            action = rng.randrange(5)
            if action == 0 or not uids:
                for n in range(rng.randint(1, 3)):
                    put(
                        store,
                        100 + step * 10 + n,
                        flags=tuple(rng.sample(FLAGS, rng.randint(0, 2))),
                    )
            elif action == 1:
                chosen = rng.sample(uids, rng.randint(1, len(uids)))
                mode = rng.choice(["add", "remove", "replace"])
                store.apply(
                    [set_flags(ALICE, "INBOX", chosen, rng.sample(FLAGS, rng.randint(0, 3)), mode)]
                )
            elif action == 2:
                store.apply([expunge(ALICE, "INBOX", rng.sample(uids, rng.randint(1, len(uids))))])
            elif action == 3:
                store.apply([move_messages(ALICE, "INBOX", "Trash", rng.sample(uids, 1))])
            else:
                pass  # nothing changed: the refresh must be a no-op
            entry = cache.refresh(ALICE, "INBOX")
            assert entry is not None
            fresh = store.index_columns(ALICE, "INBOX")
            assert fresh is not None
            assert rows(entry.view()) == rows(MessageList(fresh))
            assert entry.modseq == fresh.info.highestmodseq
            assert entry.first_unseen() == MessageList(fresh).first_unseen()
            assert entry.keywords() == MessageList(fresh).keyword_set()
            for modseq, view, then in behind:
                told = entry.changes_since(modseq)
                assert told is not None
                changed, gone = told
                assert rows(changed) == rows(store.changed_since(ALICE, "INBOX", modseq))
                assert gone == store.expunged_since(ALICE, "INBOX", modseq)
                assert rows(view) == then  # the cache's refreshes never change a view
            behind.append((entry.modseq, entry.view(), rows(entry.view())))
        # A modseq the log does not know: the caller must ask the store.
        assert entry.changes_since(entry.modseq + 1) is None
    finally:
        store.close()


def test_rendered_are_kept_and_go_with_the_last_copy(store: MailboxStore) -> None:
    from tachymail.mailbox import copy_messages
    from tachymail.mailbox.store import keep_rendered

    put(store, 1)
    info = store.messages(ALICE, "INBOX")[0]
    key = info.content_id
    assert store.rendered(key, b"S") is None
    assert store.apply([keep_rendered([(key, b"S", b"\x01(x)"), (key, b"E", b"\x01(y)")])]) == [2]
    assert store.rendered(key, b"S") == b"\x01(x)" and store.rendered(key, b"E") == b"\x01(y)"
    reader = store.reader()
    try:
        assert reader.rendered(key, b"E") == b"\x01(y)" and reader.rendered(key, b"B") is None
    finally:
        reader.close()
    store.apply([copy_messages(ALICE, "INBOX", "Archive", [info.uid])])
    store.apply([expunge(ALICE, "INBOX", [info.uid])])
    assert store.rendered(key, b"S") == b"\x01(x)"  # the copy in Archive still has it
    store.apply([expunge(ALICE, "Archive", [1])])
    assert store.rendered(key, b"S") is None and store.rendered(key, b"E") is None
    # Kept for a content deleted meanwhile: nothing written.
    assert store.apply([keep_rendered([(key, b"S", b"\x01(z)")])]) == [0]
    assert store.rendered(key, b"S") is None
