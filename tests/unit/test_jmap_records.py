"""What JMAP's RFC 8621 gaps rest on, on a real mailbox store (LMDB in a temporary
directory): expunge records that name the thread (and old ones without it), the
EmailSubmission records with their bounds and change log, and the thread counts of a
Mailbox with RFC 8621's Trash rule."""

from __future__ import annotations

import struct
from pathlib import Path

from tachymail.jmap.threadcounts import ThreadCounts
from tachymail.jmap.view import Views
from tachymail.mailbox import (
    MailboxStore,
    delete_user,
    deliver,
    expunge,
    move_messages,
    prepare_delivery,
    set_flags,
)
from tachymail.mailbox.submissions import (
    add_submission,
    destroy_submissions,
    read_submissions,
    submission_changes,
    submission_state,
)

USER = "u@example.test"


def message(ident: str, parent: str = "") -> bytes:
    reply = f"In-Reply-To: <{parent}>\r\n" if parent else ""
    return f"Subject: {ident}\r\nMessage-ID: <{ident}>\r\n{reply}\r\nbody\r\n".encode()


def test_expunge_records_name_the_thread_and_old_ones_are_told_apart(tmp_path: Path) -> None:
    store = MailboxStore(tmp_path / "mailbox")
    try:
        store.apply([deliver(prepare_delivery(USER, message("root@x")))])
        store.apply([deliver(prepare_delivery(USER, message("reply@x", "root@x")))])
        inbox = store.mailbox(USER, "INBOX")
        assert inbox is not None
        contents = sorted(Views(store).snapshot(USER).emails)
        [key] = set(store.threads_of(contents).values())
        store.apply([move_messages(USER, "INBOX", "Archive", [1])])
        store.apply([expunge(USER, "INBOX", [2])])
        # the reply's thread record went with its content; the expunge record kept the key
        assert store.threads_of([contents[1]]) == {}
        pairs = store.expunged_threads_since(inbox.id, inbox.highestmodseq)
        assert pairs == [(1, contents[0], key), (2, contents[1], key)]
        assert store.expunged_contents_since(inbox.id, inbox.highestmodseq) == contents
        # a record of an older version (the content id only): Email/changes can still tell,
        # Thread/changes cannot
        now = store.mailbox(USER, "INBOX")
        assert now is not None
        with store.env.begin(write=True) as txn:
            txn.put(
                struct.pack(">IQI", inbox.id, now.highestmodseq + 1, 99),
                struct.pack(">Q", 12345),
                db=store.expunged,
            )
        assert store.expunged_threads_since(inbox.id, now.highestmodseq) is None
        assert store.expunged_contents_since(inbox.id, now.highestmodseq) == [12345]
    finally:
        store.close()


def test_submission_records_are_bounded_and_their_changes_told(tmp_path: Path) -> None:
    store = MailboxStore(tmp_path / "mailbox")
    try:

        def add(ident: str, sent: float, now: float) -> object:
            data = {"emailId": "e1", "threadId": "t1"}
            [number] = store.apply(
                [add_submission(USER, ident, data, sent, keep=3, max_age=100.0, now=now)]
            )
            return number

        assert submission_state(store, USER).last == 0
        assert add("q1", 1000.0, 1000.0) == 1
        assert add("q2", 1001.0, 1001.0) == 2
        [taken] = store.apply(
            [add_submission(USER, "q2", {}, 1001.0, keep=3, max_age=100.0, now=1001.0)]
        )
        assert isinstance(taken, ValueError)
        state, records = read_submissions(store, USER, ["q2", "nope", "x" * 600])
        assert [(r.number, r.id, r.sent) for r in records] == [(2, "q2", 1001.0)]
        assert records[0].data == {"emailId": "e1", "threadId": "t1", "id": "q2"}
        changes = submission_changes(store, USER, 0)
        assert changes is not None and changes[1] == [(1, "q1", True), (2, "q2", True)]
        # destroy: a tombstone at the next change number
        assert store.apply([destroy_submissions(USER, ["q1", "nope"], keep=3)]) == [["q1"]]
        changes = submission_changes(store, USER, 2)
        assert changes is not None and changes[1] == [(3, "q1", False)]
        # made and destroyed since state 0: the client never saw q1
        changes = submission_changes(store, USER, 0)
        assert changes is not None and changes[1] == [(2, "q2", True)]
        # the count bound: q2 q3 q4 kept, q5 pushes out q2
        add("q3", 1002.0, 1002.0)
        add("q4", 1003.0, 1003.0)
        add("q5", 1004.0, 1004.0)
        _state, records = read_submissions(store, USER)
        assert [r.id for r in records] == ["q3", "q4", "q5"]
        # the age bound: 100 s after q3 and q4 were sent, the next one removes them
        add("q6", 1110.0, 1103.5)
        _state, records = read_submissions(store, USER)
        assert [r.id for r in records] == ["q5", "q6"]
        state = submission_state(store, USER)
        # tombstones are bounded too: states before the oldest kept one cannot be told
        assert state.floor > 0
        assert submission_changes(store, USER, 0) is None
        assert submission_changes(store, USER, state.last + 1) is None
        changes = submission_changes(store, USER, state.floor)
        assert changes is not None
        # deleting the user drops every record, index entry and counter
        store.apply([delete_user(USER)])
        assert read_submissions(store, USER) == (submission_state(store, USER), [])
        assert submission_state(store, USER).last == 0
    finally:
        store.close()


def test_thread_counts_follow_rfc_8621_with_its_trash_rule(tmp_path: Path) -> None:
    store = MailboxStore(tmp_path / "mailbox")
    try:
        # INBOX: a (root), c (unrelated), d (reply to a); b (reply to a) in Archive
        for ident, parent in (("a@x", ""), ("b@x", "a@x"), ("c@x", ""), ("d@x", "a@x")):
            store.apply([deliver(prepare_delivery(USER, message(ident, parent)))])
        store.apply([move_messages(USER, "INBOX", "Archive", [2])])
        store.apply([set_flags(USER, "INBOX", [1, 4], ["\\Seen"], "add")])
        views = Views(store)
        counts = ThreadCounts()
        ids = {info.name: info.id for info in store.mailboxes(USER)}

        def now() -> dict[str, tuple[int, int, int]]:
            found = counts.counts(views, views.snapshot(USER))
            return {name: found[box] for name, box in ids.items() if found[box] != (0, 0, 0)}

        # (totalThreads, unreadThreads, unreadEmails); thread a: a, d read in INBOX, b
        # unread in Archive: unread for both mailboxes; c is INBOX's one unread email
        assert now() == {"INBOX": (2, 2, 1), "Archive": (1, 1, 1)}
        store.apply([set_flags(USER, "INBOX", [3], ["\\Seen"], "add")])
        assert now() == {"INBOX": (2, 1, 0), "Archive": (1, 1, 1)}
        # b moved to the Trash: only there, so ignored by INBOX; the Trash counts it
        store.apply([move_messages(USER, "Archive", "Trash", [1])])
        assert now() == {"INBOX": (2, 0, 0), "Trash": (1, 1, 1)}
        # an unread email of the thread in INBOX does not count for the Trash
        store.apply([set_flags(USER, "INBOX", [4], ["\\Seen"], "remove")])
        store.apply([set_flags(USER, "Trash", [1], ["\\Seen"], "add")])
        assert now() == {"INBOX": (2, 1, 1), "Trash": (1, 0, 0)}
        # a draft is not unread
        store.apply([set_flags(USER, "INBOX", [4], ["\\Draft"], "add")])
        assert now() == {"INBOX": (2, 0, 0), "Trash": (1, 0, 0)}
        # the store's unseen count, which IMAP STATUS answers, still counts the draft
        assert {i.name: i.unseen for i in store.mailboxes(USER)}["INBOX"] == 1
        # the same snapshot again: the memo, not a new count
        snap = views.snapshot(USER)
        assert counts.counts(views, snap) is counts.counts(views, snap)
    finally:
        store.close()
