"""A Mailbox's ``totalThreads``, ``unreadThreads`` (RFC 8621 §2, from the thread index) and
``unreadEmails``.

What callers may rely on (:meth:`ThreadCounts.counts`):

- ``totalThreads``: the number of distinct threads with at least one email in the mailbox.
- ``unreadThreads``: RFC 8621's "quality implementation": the threads with at least one
  email in the mailbox and at least one unread email (neither ``$seen`` nor ``$draft``)
  anywhere in the thread, except that the Trash (role ``trash``) is a world of its own:
  an email that is only in the Trash is not counted for the other mailboxes, and for the
  Trash only unread emails in the Trash count. So a thread with a read email in INBOX and
  an unread one in Trash is unread in Trash and read in INBOX, as the RFC's example says.
- An email in several mailboxes is unread when none of its places has ``\\Seen`` or
  ``\\Draft`` (its JMAP keywords are the union of its places' flags).
- ``unreadEmails``: the emails in the mailbox that are unread in that sense (the store's
  own unseen count, which IMAP STATUS UNSEEN answers, also counts unseen drafts).

Cost: each mailbox's thread set and its unread entries are kept per process, keyed by the
mailbox's (HIGHESTMODSEQ, UIDNEXT), and rebuilt only for a mailbox that changed (one pass
over its index columns; the thread keys come from ``Views.threads_of``, cached per
process). Per snapshot of the user (one per state), the result is memoised, so a
``Mailbox/get`` after no change costs a dict lookup, and after a change it costs the
changed mailbox's entries plus the user's unread emails, never a read of every message.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from tachymail.jmap.view import Snapshot, Views, role_of

# the store's flag bits (tachymail.mailbox.store.SYSTEM_FLAGS order): \Seen 0, \Draft 4
_READ_BITS = (1 << 0) | (1 << 4)
_MEMO = "thread-counts"


@dataclass(slots=True)
class _Box:
    """What one mailbox contributes, at the (modseq, uidnext) it was made at."""

    mark: tuple[int, int]
    #: thread keys of its emails
    threads: set[int]
    #: content id -> thread key of its entries with neither \\Seen nor \\Draft
    unread: dict[int, int]


class ThreadCounts:
    """Per process: the per-mailbox parts of the counts (see the module docstring), at most
    *capacity* mailboxes (least recently used out)."""

    def __init__(self, capacity: int = 256) -> None:
        self.capacity = capacity
        self._boxes: OrderedDict[int, _Box] = OrderedDict()

    def _box(self, views: Views, box: int, snap: Snapshot) -> _Box | None:
        columns = snap.emails.columns_of(box)
        if columns is None:
            return None
        mark = (columns.info.highestmodseq, columns.info.uidnext)
        cached = self._boxes.get(box)
        if cached is not None and cached.mark == mark:
            self._boxes.move_to_end(box)
            return cached
        contents = columns.contents
        keys = views.threads_of(contents)
        unread = {
            c: keys[c]
            for c, bits in zip(contents, columns.bits, strict=True)
            if not bits & _READ_BITS
        }
        made = _Box(mark, set(keys.values()), unread)
        self._boxes[box] = made
        while len(self._boxes) > self.capacity:
            self._boxes.popitem(last=False)
        return made

    def counts(self, views: Views, snap: Snapshot) -> dict[int, tuple[int, int, int]]:
        """mailbox id -> (totalThreads, unreadThreads, unreadEmails) of every mailbox of
        *snap*."""
        memo: dict[int, tuple[int, int, int]] | None = snap.memo.get(_MEMO)
        if memo is not None:
            return memo
        trash = {info.id for info in snap.infos if role_of(info) == "trash"}
        boxes = {info.id: self._box(views, info.id, snap) for info in snap.infos}
        index = snap.emails
        # an email in several mailboxes is read if any of its places is (keywords: the union)
        read_elsewhere = {c for c in index.more if index[c].bits & _READ_BITS}
        unread_outside: set[int] = set()  # threads with an unread email outside the Trash
        unread_trash: set[int] = set()  # threads with an unread email in the Trash
        for box, part in boxes.items():
            if part is None or not part.unread:
                continue
            target = unread_trash if box in trash else unread_outside
            if read_elsewhere:
                target.update(k for c, k in part.unread.items() if c not in read_elsewhere)
            else:
                target.update(part.unread.values())
        out: dict[int, tuple[int, int, int]] = {}
        for box, part in boxes.items():
            if part is None:
                out[box] = (0, 0, 0)
                continue
            unread_threads = unread_trash if box in trash else unread_outside
            unread_emails = len(part.unread)
            if read_elsewhere:
                unread_emails -= len(read_elsewhere.intersection(part.unread))
            out[box] = (len(part.threads), len(part.threads & unread_threads), unread_emails)
        snap.memo[_MEMO] = out
        return out


#: the process's counts (every user's mailboxes; mailbox ids are unique in the store)
COUNTS = ThreadCounts()
