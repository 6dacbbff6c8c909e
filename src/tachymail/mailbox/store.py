"""The mailbox store: local users' mailboxes, messages, flags and UIDs in one LMDB environment.

Synchronous on purpose, like ``tachymail.queue.store``: writes are *operations* run by
:meth:`MailboxStore.apply` inside one synced write transaction (a group commit feeds it
batches); reads are short read transactions, safe from any thread. Every process opens
its own ``MailboxStore`` after fork.

Layout (named databases of the environment at ``config.mailbox_path``):

``meta``
    counters: ``next_mailbox`` (>I), ``next_content`` (>Q), ``last_uidvalidity`` (>I),
    ``totals`` (>QQ bytes, messages of the node).
``mailboxes``
    ``user \\0 name`` -> :data:`_MAILBOX` record (id, uidvalidity, uidnext, highestmodseq,
    messages, unseen, size, subscribed) then the SPECIAL-USE attribute. Names use "/" as
    the hierarchy separator; INBOX in any case is stored as "INBOX".
``index``
    mailbox id (>I) + uid (>I) -> :data:`_ENTRY` (content id, internal date, size, modseq,
    system-flag bits) then the keywords, NUL-separated. Listing a mailbox reads only this
    (about 40 bytes a message): never the contents.
``contents`` / ``summaries``
    content id (>Q) -> the message as delivered (CRLF, delivery headers first) / its
    summary (``tachymail.mailbox.summary``, orjson) for IMAP BODYSTRUCTURE and ENVELOPE.
``rendered``
    content id (>Q) + one kind byte -> octets derived from the message that a front end
    keeps so as not to compute them again (IMAP keeps its BODYSTRUCTURE, BODY and ENVELOPE
    there, as Dovecot's cache file does); opaque to the store, written by
    :func:`keep_rendered`, deleted with the content.
``refs``
    content id (>Q) -> >I, how many index entries share the content, present only when
    more than one does (no record: exactly one; every store written before COPY existed
    has none).
``usage``
    user -> >QQ (bytes, messages) over all the user's mailboxes: the quota check reads one
    record. A user exists in the store when it has one.
``delivered`` / ``delivered_age``
    idempotency key -> >IIId (mailbox id, uid, uidvalidity, time) / time in ms (>Q) + key,
    the sweep order. Entries older than :data:`DELIVERED_TTL` are dropped a few at a time
    by later deliveries, so the table stays bounded.
``expunged``
    mailbox id (>I) + modseq (>Q) + uid (>I) -> the content id and its thread key (>QQ; only
    the content id (>Q) in records written before the thread key was kept, b"" before that):
    what an expunge removed, for IMAP QRESYNC's VANISHED (EARLIER) and JMAP's Email/changes
    and Thread/changes; dropped with the mailbox.
``recent``
    mailbox id (>I) -> >I, the first UID no IMAP4rev1 session has claimed as \\Recent yet
    (RFC 3501 §2.3.2; no record: 0, every message is recent); dropped with the mailbox.
``subscriptions``
    ``user \\0 name`` -> b"": subscriptions to names that are not mailboxes (RFC 9051
    §6.3.7: a subscription survives DELETE and may name a mailbox that does not exist).
    A mailbox's own subscription is the flag of its record; DELETE moves a set flag here
    and CREATE takes it back.
``threads``
    conversations (``tachymail.mailbox.threads``), three kinds of keys: ``c`` + content id
    (>Q) -> thread key (>Q), own Message-ID key (>Q), user; ``m`` + user \\0 + thread key
    (>Q) + content id (>Q) -> b"" (the thread's messages); ``i`` + user \\0 + Message-ID key
    (>Q) -> thread key (>Q) (where a later reply goes). Written by every delivery, removed
    with the content; contents delivered before it existed have none.
``replies``
    whom vacation replies went to (``tachymail.mailbox.vacation``): ``r`` + user \\0 +
    sender -> when (>d); ``a`` + when in ms (>Q) + user \\0 + sender -> b"", the sweep
    order (records older than the reply interval go a few per reply).
``submissions``
    JMAP EmailSubmission records (``tachymail.mailbox.submissions``): per user a change
    counter, the records in creation order and tombstones of the destroyed ones; bounded
    per user, dropped with the user.

UIDs start at 1 per mailbox and are never reused within a UIDVALIDITY. A new mailbox's
UIDVALIDITY is above every earlier one of the node (the larger of the last one + 1 and
the clock), so a mailbox deleted and made again under the same name never repeats one.
Every change of a mailbox's messages takes the next modseq (RFC 7162 CONDSTORE).
Deleting messages (expunge, delete_mailbox, delete_user) drops their reference to their
content, deleting content and summary with the last one, and lowers the usage: LMDB reuses
the freed pages, so the file stops growing.

An IMAP COPY shares the content (``refs`` counts the entries) instead of writing the
octets again: copying a big message or a whole mailbox (clients copy to Sent, Archive,
Trash all the time) costs one index entry a message, never the message twice on disk or
in one transaction. The usage still counts every copy in full (what the user sees in IMAP
QUOTA, and what Dovecot counts): quotas and the node's totals are logical sizes. MOVE
re-keys the index entries; the content is not touched.

Every commit that changed some user's mailboxes (their messages, flags, or the mailboxes
themselves) calls :attr:`MailboxStore.on_commit` with those users once it is synced: the
workers hand them to their ``tachymail.mailbox.notify.ChangeNotifier``.
"""

from __future__ import annotations

import contextlib
import logging
import struct
import time
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lmdb
import orjson

from tachymail.lmdbenv import GrowingMap, adopting_growth, open_store
from tachymail.mailbox.summary import encode_summary
from tachymail.mailbox.threads import ThreadRefs, thread_refs

log = logging.getLogger(__name__)

MiB = 1024 * 1024
GiB = 1024 * MiB

SEEN = "\\Seen"
ANSWERED = "\\Answered"
FLAGGED = "\\Flagged"
DELETED = "\\Deleted"
DRAFT = "\\Draft"

#: system flags kept as bits of the index entry, in bit order
SYSTEM_FLAGS = (SEEN, ANSWERED, FLAGGED, DELETED, DRAFT)
_FLAG_BIT = {flag.lower(): 1 << bit for bit, flag in enumerate(SYSTEM_FLAGS)}
_SEEN_BIT = _FLAG_BIT[SEEN.lower()]

#: the mailboxes every user starts with, and their RFC 6154 SPECIAL-USE attributes
DEFAULT_MAILBOXES = (
    ("INBOX", ""),
    ("Drafts", "\\Drafts"),
    ("Sent", "\\Sent"),
    ("Trash", "\\Trash"),
    ("Junk", "\\Junk"),
    ("Archive", "\\Archive"),
)

#: how long an idempotency key is remembered (seconds): longer than any queue lifetime
#: (5 days by default), so a redelivery after a crash always finds it
DELIVERED_TTL = 7 * 86400
# expired idempotency records removed by each delivery: more than one arrives per delivery,
# so the table shrinks back under any steady load
_SWEEP_PER_DELIVERY = 4

# id, uidvalidity, uidnext, highestmodseq, messages, unseen, size, subscribed
_MAILBOX = struct.Struct(">IIIQIIQB")
# content id, internal date, size, modseq, system-flag bits
_ENTRY = struct.Struct(">QdQQB")
_ID = struct.Struct(">I")
_KEY = struct.Struct(">II")  # mailbox id, uid
_CONTENT = struct.Struct(">Q")
_PAIR = struct.Struct(">QQ")
_DELIVERED = struct.Struct(">IIId")
_EXPUNGED = struct.Struct(">IQI")
_REFS = struct.Struct(">I")
_WHEN = struct.Struct(">d")
# where an index entry's modseq is (CONDSTORE reads only that field of most entries)
_MODSEQ = struct.Struct(">Q")
_MODSEQ_AT = struct.calcsize(">QdQ")


class OverQuota(Exception):
    """The user's mailboxes would exceed the quota: 452 4.2.2 at RCPT, a deferral at
    delivery (retried until the user makes room or the message expires)."""


class StorageFull(Exception):
    """The store's map is at its maximum size or the disk is full: nothing of the batch was
    stored (452 4.3.1 at intake, a deferral at delivery)."""


class NoSuchMailbox(Exception):
    """The user or mailbox does not exist; nothing was written (IMAP NO [NONEXISTENT], or
    NO [TRYCREATE] when *mailbox* is the target of a COPY, MOVE or APPEND).

    *mailbox*: the name that was not found, as the caller gave it ("" when not known)."""

    def __init__(self, text: str, mailbox: str = "") -> None:
        super().__init__(text)
        self.mailbox = mailbox


class MailboxExists(Exception):
    """A mailbox of that name already exists; nothing was written (IMAP NO [ALREADYEXISTS])."""


class InvalidMailboxName(Exception):
    """The name is empty, has a NUL or an empty level ("a//b", "/a"), or is not allowed for
    this operation (deleting INBOX); nothing was written (IMAP NO / BAD)."""


@dataclass(slots=True)
class MailboxInfo:
    user: str
    name: str
    id: int
    uidvalidity: int
    uidnext: int
    highestmodseq: int
    messages: int
    unseen: int
    size: int
    special_use: str
    subscribed: bool


@dataclass(slots=True)
class MessageInfo:
    uid: int
    size: int
    flags: frozenset[str]
    internaldate: float
    modseq: int
    content_id: bytes


@dataclass(slots=True)
class IndexColumns:
    """Index entries of one mailbox as columns (UID order; position i of every column is
    the same message), read in one read transaction with *info*, the mailbox record: the
    compact form IMAP keeps per mailbox (about 37 octets a message, no object per message).

    *bits*: the system-flag bits (``SYSTEM_FLAGS`` order, bit 0 ``\\Seen``); *keywords*: UID
    -> its keywords, only for messages that have any; *contents*: the content ids (the
    ``content_id`` of MessageInfo is their 8-octet big-endian form)."""

    info: MailboxInfo
    uids: array[int]  # "I"
    sizes: array[int]  # "Q"
    modseqs: array[int]  # "Q"
    dates: array[float]  # "d"
    bits: bytearray
    contents: array[int]  # "Q"
    keywords: dict[int, frozenset[str]]


@dataclass(slots=True)
class IndexChanges:
    """What changed in a mailbox since a modseq (:meth:`MailboxStore.changes_since`), read in
    one read transaction: *info* the record now, *changed* the entries whose modseq is above
    it (new messages and flag changes), *expunged* the UIDs expunged above it, ascending."""

    info: MailboxInfo
    changed: IndexColumns
    expunged: list[int]


@dataclass(slots=True)
class Delivered:
    """Where a delivery went; *duplicate*: its key was delivered before, nothing written."""

    mailbox_id: int
    uid: int
    uidvalidity: int
    duplicate: bool
    #: the delivery carried an automatic reply (:attr:`Delivery.reply`) and its sender was
    #: not answered within the delivery's ``reply_days``: queue the reply now (recorded)
    reply_due: bool = False


@dataclass(slots=True)
class CopyResult:
    """What a COPY or MOVE did (IMAP UIDPLUS COPYUID): *source* UIDs, ascending, and the
    UIDs they got in the destination, same order; both empty when none of the UIDs asked
    for was there (nothing written)."""

    uidvalidity: int  # of the destination
    source: list[int]
    dest: list[int]


@dataclass(slots=True)
class Delivery:
    """A message ready to deliver (see :func:`prepare_delivery`): everything encoded."""

    user: str
    mailbox: str
    content: bytes
    summary: bytes
    flag_bits: int
    keywords: bytes
    internaldate: float
    key: bytes
    quota: int
    create: bool = True
    #: where its conversation is (None: no thread record, e.g. a Delivery made by hand)
    thread: ThreadRefs | None = None
    #: an automatic (vacation) reply to send if its sender was not answered in the last
    #: *reply_days* days: (the sender to answer, lower case; the reply's octets)
    reply: tuple[str, bytes] | None = None
    reply_days: float = 7.0


class ContentReader:
    """Reads of message contents in one read transaction: a pipelined batch of POP3 RETRs
    (or IMAP FETCHes) pays for one transaction, not one each. Close it before the event
    loop turns: an open read transaction keeps LMDB from reusing the pages it sees.

    A write in another thread of the process that grows the map invalidates the read
    transaction (py-lmdb's set_mapsize): the read is then made again in a new one."""

    __slots__ = ("_begin", "_db", "_rendered", "_txn")

    def __init__(
        self,
        begin: Callable[[], lmdb.Transaction[memoryview]],
        db: Any,
        rendered: Any = None,
    ) -> None:
        self._begin = begin
        self._txn: lmdb.Transaction[memoryview] | None = begin()
        self._db = db
        self._rendered = rendered

    def _get(self, key: bytes, db: Any) -> memoryview | None:
        txn = self._txn
        if txn is None:
            raise ValueError("the reader is closed")
        try:
            return txn.get(key, db=db)
        except lmdb.Error:  # invalidated by a map growth meanwhile: read in a new transaction
            with contextlib.suppress(lmdb.Error):
                txn.abort()
            self._txn = txn = self._begin()
            return txn.get(key, db=db)

    def read(self, content_id: bytes, offset: int, length: int) -> bytes:
        """As :meth:`MailboxStore.read`."""
        view = self._get(content_id, self._db)
        if view is None:
            return b""
        return bytes(view[offset : offset + length])

    def rendered(self, content_id: bytes, kind: bytes) -> bytes | None:
        """As :meth:`MailboxStore.rendered`."""
        if self._rendered is None:
            if self._txn is None:
                raise ValueError("the reader is closed")
            return None
        view = self._get(content_id + kind, self._rendered)
        return None if view is None else bytes(view)

    def close(self) -> None:
        if self._txn is not None:
            with contextlib.suppress(lmdb.Error):
                self._txn.abort()
            self._txn = None


#: a change inside a write transaction; its return value is its outcome, an exception
#: instance meaning "refused alone, nothing written" (the rest of the batch commits)
Operation = Callable[["MailboxStore", lmdb.Transaction], object]


def normalize_name(name: str) -> str:
    """The stored form of a mailbox name: INBOX (any case) is "INBOX"; raises
    InvalidMailboxName for an empty name, a NUL, or an empty hierarchy level."""
    if not name or "\0" in name or any(not level for level in name.split("/")):
        raise InvalidMailboxName(f"invalid mailbox name {name!r}")
    return "INBOX" if name.upper() == "INBOX" else name


def encode_flags(flags: Iterable[str]) -> tuple[int, bytes]:
    """System-flag bits and the keywords (NUL-separated, sorted, case kept) of *flags*.
    \\Recent is session state, never stored."""
    bits = 0
    keywords: set[str] = set()
    for flag in flags:
        bit = _FLAG_BIT.get(flag.lower())
        if bit is not None:
            bits |= bit
        elif flag and flag.lower() != "\\recent" and "\0" not in flag:
            keywords.add(flag)
    return bits, "\0".join(sorted(keywords)).encode()


def decode_flags(bits: int, keywords: bytes | memoryview) -> frozenset[str]:
    names = [flag for bit, flag in enumerate(SYSTEM_FLAGS) if bits & (1 << bit)]
    if keywords:
        names.extend(bytes(keywords).decode().split("\0"))
    return frozenset(names)


def _user(user: str) -> bytes:
    return user.lower().encode()


def _mailbox_key(user: str, name: str) -> bytes:
    return _user(user) + b"\0" + name.encode()


class MailboxStore:
    """One LMDB environment under ``directory`` holding every local user's mailboxes.

    ``map_size`` is where the memory map starts; it doubles on demand up to
    ``max_map_size``. Commits are synchronous (``sync=True``): when :meth:`apply`
    returns, the batch is on disk. ``readonly`` (the CLI's listings) raises
    FileNotFoundError when there is no store yet.
    """

    def __init__(
        self,
        directory: Path,
        *,
        map_size: int = 256 * MiB,
        max_map_size: int = 64 * GiB,
        readonly: bool = False,
    ) -> None:
        self.directory = Path(directory)
        self.max_map_size = max(max_map_size, map_size)
        self.env = open_store(
            self.directory, what="mailbox store", map_size=map_size, max_dbs=24, readonly=readonly
        )
        self._map = GrowingMap(
            self.env,
            self.max_map_size,
            name="mailbox",
            full=StorageFull,
            no_room="no room in the mailbox store",
        )
        # through the map: another process may have grown it since lmdb.open read its size
        if not readonly:
            self._map.write(self._open_dbs)
        else:
            adopting_growth(self.env, lambda: self._open_dbs(None, create=False))
        #: called after each successful commit with the users (lower case) whose mailboxes
        #: it changed, in the thread that ran :meth:`apply` (the committer's: it must be
        #: thread-safe); the workers set it to their ChangeNotifier's ``publish``
        self.on_commit: Callable[[set[str]], None] | None = None
        # the users the batch being written changed (reset for every attempt of a batch)
        self._touched: set[str] = set()

    def _open_dbs(self, txn: lmdb.Transaction | None, create: bool = True) -> None:
        def db(name: bytes) -> Any:
            return self.env.open_db(name, txn=txn, create=create)

        self.meta = db(b"meta")
        self.mailbox_db = db(b"mailboxes")
        self.index = db(b"index")
        self.contents = db(b"contents")
        self.summaries = db(b"summaries")
        self.usage_db = db(b"usage")
        self.delivered_db = db(b"delivered")
        self.delivered_age = db(b"delivered_age")
        self.expunged = db(b"expunged")
        try:
            self.rendered_db: Any = db(b"rendered")
        except lmdb.NotFoundError:  # read-only on a store no writer has opened since it came
            self.rendered_db = None
        try:
            self.refs = db(b"refs")
        except lmdb.NotFoundError:  # read-only on a store no writer has opened since COPY came
            self.refs = None
        try:
            self.recent_db: Any = db(b"recent")
            self.subscriptions_db: Any = db(b"subscriptions")
        except lmdb.NotFoundError:  # read-only on a store no writer has opened since they came
            self.recent_db = self.subscriptions_db = None
        try:
            self.threads_db: Any = db(b"threads")
            self.replies_db: Any = db(b"replies")
        except lmdb.NotFoundError:  # read-only on a store no writer has opened since they came
            self.threads_db = self.replies_db = None
        try:
            self.submissions_db: Any = db(b"submissions")
        except lmdb.NotFoundError:  # read-only on a store no writer has opened since it came
            self.submissions_db = None

    # --- writing ----------------------------------------------------------------------------

    def apply(self, operations: Sequence[Operation]) -> list[object]:
        """Run every operation in one synced write transaction; each one's outcome.

        An operation that refuses returns an exception instance, having written nothing;
        the others are committed all the same. Raises ``StorageFull`` when the map cannot
        grow further or the disk is full: nothing of the batch is stored, and the store
        stays usable.

        Once the batch is synced, :attr:`on_commit` (when set) is called with the users it
        changed; an error there is logged, never raised: the batch is committed.
        """

        def work(txn: lmdb.Transaction) -> tuple[list[object], set[str]]:
            # GrowingMap serialises writers and may run this again: a fresh set each time
            touched = self._touched = set()
            return [operation(self, txn) for operation in operations], touched

        outcomes, touched = self._map.write(work)
        if touched and self.on_commit is not None:
            try:
                self.on_commit(touched)
            except Exception:  # the commit stands; readers catch up on their next look
                log.exception("mailbox change notification failed")
        return outcomes

    # --- helpers inside a write transaction (operations call them) --------------------------

    def _touch(self, user: str) -> None:
        """Record that the batch being written changes *user*'s mailboxes."""
        self._touched.add(user.lower())

    def _share_content(self, txn: lmdb.Transaction, content_key: bytes) -> None:
        """One more index entry refers to the content *content_key*."""
        raw = txn.get(content_key, db=self.refs)
        count = _REFS.unpack(raw)[0] if raw is not None else 1
        txn.put(content_key, _REFS.pack(count + 1), db=self.refs)

    def _release_content(self, txn: lmdb.Transaction, content_key: bytes) -> None:
        """An index entry referring to *content_key* is gone: delete the content and its
        summary with the last reference."""
        raw = txn.get(content_key, db=self.refs)
        if raw is None:
            txn.delete(content_key, db=self.contents)
            txn.delete(content_key, db=self.summaries)
            self._drop_rendered(txn, content_key)
            self._unthread(txn, content_key)
            return
        count = _REFS.unpack(raw)[0] - 1
        if count <= 1:
            txn.delete(content_key, db=self.refs)
        else:
            txn.put(content_key, _REFS.pack(count), db=self.refs)

    def _thread(
        self, txn: lmdb.Transaction, user: str, content_key: bytes, refs: ThreadRefs
    ) -> None:
        """Record the conversation of the new content *content_key* (module docstring of
        ``tachymail.mailbox.threads``: a known parent's thread, else the root's key)."""
        prefix = b"i" + _user(user) + b"\0"
        thread = 0
        for key in (refs.own, *refs.parents) if refs.own else refs.parents:
            raw = txn.get(prefix + _CONTENT.pack(key), db=self.threads_db)
            if raw is not None:
                thread = _CONTENT.unpack(raw)[0]
                break
        if not thread:
            thread = refs.fallback or _CONTENT.unpack(content_key)[0]
        if refs.own:
            txn.put(prefix + _CONTENT.pack(refs.own), _CONTENT.pack(thread), db=self.threads_db)
        record = _PAIR.pack(thread, refs.own) + _user(user)
        txn.put(b"c" + content_key, record, db=self.threads_db)
        member = b"m" + _user(user) + b"\0" + _CONTENT.pack(thread) + content_key
        txn.put(member, b"", db=self.threads_db)

    def _note_reply(
        self, txn: lmdb.Transaction, user: str, sender: str, days: float, now: float
    ) -> bool:
        """Whether *user* may answer *sender* now (not answered in the last *days*); if so
        it is recorded. Records older than *days* are swept a few at a time."""
        key = b"r" + _user(user) + b"\0" + sender.lower().encode()
        horizon = now - days * 86400
        raw = txn.get(key, db=self.replies_db)
        if raw is not None and _WHEN.unpack(raw)[0] > horizon:
            return False
        if raw is not None:
            txn.delete(
                b"a" + _CONTENT.pack(int(_WHEN.unpack(raw)[0] * 1000)) + key[1:], db=self.replies_db
            )
        txn.put(key, _WHEN.pack(now), db=self.replies_db)
        txn.put(b"a" + _CONTENT.pack(int(now * 1000)) + key[1:], b"", db=self.replies_db)
        cursor = txn.cursor(db=self.replies_db)
        more = cursor.set_range(b"a")
        for _ in range(_SWEEP_PER_DELIVERY):
            if not more:
                break
            aged = bytes(cursor.key())
            if aged[:1] != b"a" or _CONTENT.unpack(aged[1:9])[0] > horizon * 1000:
                break
            txn.delete(b"r" + aged[9:], db=self.replies_db)
            more = cursor.delete()
        return True

    def _unthread(self, txn: lmdb.Transaction, content_key: bytes) -> None:
        """Forget the conversation records of the deleted content *content_key*."""
        if self.threads_db is None:
            return
        raw = txn.get(b"c" + content_key, db=self.threads_db)
        if raw is None:
            return
        thread, own = _PAIR.unpack(raw[: _PAIR.size])
        user = bytes(raw[_PAIR.size :])
        txn.delete(b"c" + content_key, db=self.threads_db)
        txn.delete(b"m" + user + b"\0" + _CONTENT.pack(thread) + content_key, db=self.threads_db)
        if own:
            # a copy of the same Message-ID elsewhere loses the entry: its later replies
            # fall back to the References root, which is the same key for a normal thread
            txn.delete(b"i" + user + b"\0" + _CONTENT.pack(own), db=self.threads_db)

    def _thread_key(self, txn: lmdb.Transaction, content_key: bytes) -> int:
        """The thread key of the content *content_key* (the content id itself when it has
        no thread record: a thread of one, as JMAP shows it)."""
        raw = None if self.threads_db is None else txn.get(b"c" + content_key, db=self.threads_db)
        return int(
            _CONTENT.unpack(raw[:8])[0] if raw is not None else _CONTENT.unpack(content_key)[0]
        )

    def _drop_submissions(self, txn: lmdb.Transaction, user: str) -> None:
        """Delete the user's EmailSubmission records, tombstones and counter."""
        txn.delete(b"n" + _user(user), db=self.submissions_db)
        for kind in (b"r", b"i", b"d"):
            prefix = kind + _user(user) + b"\0"
            cursor = txn.cursor(db=self.submissions_db)
            more = cursor.set_range(prefix)
            while more and bytes(cursor.key()).startswith(prefix):
                more = cursor.delete()

    def _drop_rendered(self, txn: lmdb.Transaction, content_key: bytes) -> None:
        """Delete what front ends kept for the content (every kind)."""
        cursor = txn.cursor(db=self.rendered_db)
        more = cursor.set_range(content_key)
        while more and bytes(cursor.key()[:8]) == content_key:
            more = cursor.delete()

    def _counter(self, txn: lmdb.Transaction, name: bytes, fmt: struct.Struct) -> int:
        """Take the next value of a meta counter (starting at 1)."""
        raw = txn.get(name, db=self.meta)
        value = (fmt.unpack(raw)[0] if raw else 0) + 1
        txn.put(name, fmt.pack(value), db=self.meta)
        return int(value)

    def _add_totals(self, txn: lmdb.Transaction, size: int, messages: int) -> None:
        raw = txn.get(b"totals", db=self.meta)
        total, count = _PAIR.unpack(raw) if raw else (0, 0)
        txn.put(b"totals", _PAIR.pack(max(0, total + size), max(0, count + messages)), db=self.meta)

    def _add_usage(self, txn: lmdb.Transaction, user: str, size: int, messages: int) -> None:
        key = _user(user)
        raw = txn.get(key, db=self.usage_db)
        if raw is None:
            return  # the user was deleted meanwhile: nothing to account
        total, count = _PAIR.unpack(raw)
        txn.put(key, _PAIR.pack(max(0, total + size), max(0, count + messages)), db=self.usage_db)
        self._add_totals(txn, size, messages)

    def _new_mailbox(
        self,
        txn: lmdb.Transaction,
        user: str,
        name: str,
        special_use: str = "",
        subscribed: bool = True,
    ) -> list[Any]:
        """Create a mailbox record (the caller checked it is absent); its fields as a list.
        A subscription kept for the name (``subscriptions``) becomes the mailbox's."""
        mailbox_id = self._counter(txn, b"next_mailbox", _ID)
        raw = txn.get(b"last_uidvalidity", db=self.meta)
        last = _ID.unpack(raw)[0] if raw else 0
        uidvalidity = max(last + 1, int(time.time()))
        txn.put(b"last_uidvalidity", _ID.pack(uidvalidity), db=self.meta)
        if txn.delete(_mailbox_key(user, name), db=self.subscriptions_db):
            subscribed = True
        fields: list[Any] = [mailbox_id, uidvalidity, 1, 1, 0, 0, 0, int(subscribed), special_use]
        self._put_mailbox(txn, user, name, fields)
        return fields

    def _put_mailbox(self, txn: lmdb.Transaction, user: str, name: str, fields: list[Any]) -> None:
        record = _MAILBOX.pack(*fields[:8]) + fields[8].encode()
        txn.put(_mailbox_key(user, name), record, db=self.mailbox_db)

    def _get_mailbox(self, txn: lmdb.Transaction, user: str, name: str) -> list[Any] | None:
        raw = txn.get(_mailbox_key(user, name), db=self.mailbox_db)
        return None if raw is None else _unpack_mailbox(raw)

    def _find_mailbox(
        self, txn: lmdb.Transaction, user: str, name: str
    ) -> tuple[str, list[Any]] | Exception:
        """The stored name and fields of the user's mailbox *name*, or the refusal an
        operation returns as its outcome (InvalidMailboxName, NoSuchMailbox)."""
        try:
            mailbox = normalize_name(name)
        except InvalidMailboxName as exc:
            return exc
        fields = self._get_mailbox(txn, user, mailbox)
        if fields is None:
            return NoSuchMailbox(f"{user}: no mailbox {name!r}", name)
        return mailbox, fields

    def _entries(
        self, txn: lmdb.Transaction, mailbox_id: int, uids: Iterable[int]
    ) -> Iterator[tuple[int, bytes, bytes | memoryview]]:
        """(uid, index key, index entry) of each of *uids* the mailbox holds, in UID order
        (absent ones are skipped)."""
        for uid in sorted(set(uids)):
            key = _KEY.pack(mailbox_id, uid)
            raw = txn.get(key, db=self.index)
            if raw is not None:
                yield uid, key, raw

    def _ensure_user(self, txn: lmdb.Transaction, user: str) -> bool:
        """Create the user's usage record and default mailboxes if missing; whether it did."""
        key = _user(user)
        if txn.get(key, db=self.usage_db) is not None:
            return False
        txn.put(key, _PAIR.pack(0, 0), db=self.usage_db)
        for name, special_use in DEFAULT_MAILBOXES:
            if txn.get(_mailbox_key(user, name), db=self.mailbox_db) is None:
                self._new_mailbox(txn, user, name, special_use)
        return True

    def _will_exist(self, txn: lmdb.Transaction, user: str, name: str) -> bool:
        """Whether the user's mailbox *name* (normalized) exists, or is a default mailbox
        that :meth:`_ensure_user` makes for a user not yet in the store."""
        if txn.get(_mailbox_key(user, name), db=self.mailbox_db) is not None:
            return True
        if txn.get(_user(user), db=self.usage_db) is not None:
            return False
        return any(name == default for default, _use in DEFAULT_MAILBOXES)

    def _drop_messages(self, txn: lmdb.Transaction, mailbox_id: int) -> tuple[int, int]:
        """Delete every message, index entry and expunge record of a mailbox; (bytes, count)."""
        size = count = 0
        prefix = _ID.pack(mailbox_id)
        cursor = txn.cursor(db=self.index)
        more = cursor.set_range(prefix)
        while more and bytes(cursor.key()[:4]) == prefix:
            content_id, _date, length, _modseq, _bits = _ENTRY.unpack_from(cursor.value())
            self._release_content(txn, _CONTENT.pack(content_id))
            size += length
            count += 1
            more = cursor.delete()  # moves to the next record
        cursor = txn.cursor(db=self.expunged)
        more = cursor.set_range(prefix)
        while more and bytes(cursor.key()[:4]) == prefix:
            more = cursor.delete()
        txn.delete(prefix, db=self.recent_db)
        return size, count

    def _sweep_delivered(self, txn: lmdb.Transaction, now: float, limit: int) -> int:
        horizon = _CONTENT.pack(int((now - DELIVERED_TTL) * 1000))
        cursor = txn.cursor(db=self.delivered_age)
        removed = 0
        more = cursor.first()
        while more and removed < limit:
            key = bytes(cursor.key())
            if not key or key[:8] >= horizon:  # empty: the cursor ran off the end
                break
            txn.delete(key[8:], db=self.delivered_db)
            more = cursor.delete()
            removed += 1
        return removed

    # --- reading ----------------------------------------------------------------------------

    def _read(self) -> lmdb.Transaction[bytes]:
        return adopting_growth(self.env, self.env.begin)

    def _read_in_place(self) -> lmdb.Transaction[memoryview]:
        """A read transaction whose values are views into the map (no copy)."""
        return adopting_growth(self.env, lambda: self.env.begin(buffers=True))

    def usage(self, user: str) -> tuple[int, int]:
        """(bytes, messages) of all the user's mailboxes; (0, 0) for an unknown user."""
        with self._read() as txn:
            raw = txn.get(_user(user), db=self.usage_db)
        return (0, 0) if raw is None else _PAIR.unpack(raw)

    def users(self) -> list[str]:
        """Every user that has mailboxes in the store, sorted."""
        with self._read() as txn:
            cursor = txn.cursor(db=self.usage_db)
            return [bytes(key).decode() for key in cursor.iternext(values=False)]

    def mailboxes(self, user: str) -> list[MailboxInfo]:
        """The user's mailboxes, INBOX first, then by name; [] for an unknown user."""
        prefix = _user(user) + b"\0"
        found: list[MailboxInfo] = []
        with self._read() as txn:
            cursor = txn.cursor(db=self.mailbox_db)
            more = cursor.set_range(prefix)
            while more:
                key = bytes(cursor.key())
                if not key.startswith(prefix):
                    break
                name = key[len(prefix) :].decode()
                found.append(_info(user.lower(), name, _unpack_mailbox(cursor.value())))
                more = cursor.next()
        found.sort(key=lambda info: (info.name != "INBOX", info.name))
        return found

    def mailbox(self, user: str, name: str) -> MailboxInfo | None:
        """One mailbox ("inbox" in any case is INBOX); None when it does not exist."""
        try:
            name = normalize_name(name)
        except InvalidMailboxName:
            return None
        with self._read() as txn:
            fields = self._get_mailbox(txn, user, name)
        return None if fields is None else _info(user.lower(), name, fields)

    def messages(self, user: str, name: str = "INBOX") -> list[MessageInfo]:
        """The mailbox's messages in UID order, from the index alone; [] when it does not
        exist."""
        state = self.index_state(user, name)
        return [] if state is None else state[1]

    def index_state(self, user: str, name: str) -> tuple[MailboxInfo, list[MessageInfo]] | None:
        """The mailbox record and its messages (UID order), read in one read transaction:
        the counters (messages, unseen, size, uidnext, highestmodseq) are exactly those of
        the list. None when the mailbox does not exist (or the name is invalid)."""
        try:
            name = normalize_name(name)
        except InvalidMailboxName:
            return None
        with self._read() as txn:
            fields = self._get_mailbox(txn, user, name)
            if fields is None:
                return None
            found = self._index_entries(txn, fields[0], -1)
        return _info(user.lower(), name, fields), found

    def changed_since(self, user: str, name: str, modseq: int) -> list[MessageInfo]:
        """The mailbox's messages whose modseq is above *modseq* (new, or flags changed), in
        UID order: IMAP CONDSTORE's CHANGEDSINCE and QRESYNC. [] when the mailbox does not
        exist. Reads every index entry (about 40 bytes a message), decodes only matches."""
        try:
            name = normalize_name(name)
        except InvalidMailboxName:
            return []
        with self._read() as txn:
            fields = self._get_mailbox(txn, user, name)
            if fields is None or fields[3] <= modseq:  # nothing is newer than the mailbox
                return []
            return self._index_entries(txn, fields[0], modseq)

    def _index_walk(
        self, txn: lmdb.Transaction[bytes], mailbox_id: int, above: int
    ) -> Iterator[tuple[bytes, bytes]]:
        """(key, value) of the mailbox's index entries with a modseq above *above* (-1:
        all), in UID order."""
        modseq_of = _MODSEQ.unpack_from
        prefix = _ID.pack(mailbox_id)
        cursor = txn.cursor(db=self.index)
        if not cursor.set_range(prefix):
            return
        for key, value in cursor:
            if key[:4] != prefix:
                return
            if above < 0 or modseq_of(value, _MODSEQ_AT)[0] > above:
                yield key, value

    def _index_entries(
        self, txn: lmdb.Transaction[bytes], mailbox_id: int, above: int
    ) -> list[MessageInfo]:
        """The mailbox's index entries with a modseq above *above* (-1: all), UID order."""
        found: list[MessageInfo] = []
        unpack = _ENTRY.unpack_from
        size = _ENTRY.size
        for key, value in self._index_walk(txn, mailbox_id, above):
            content_id, date, length, modseq, bits = unpack(value)
            found.append(
                MessageInfo(
                    uid=_KEY.unpack(key)[1],
                    size=length,
                    flags=decode_flags(bits, value[size:]),
                    internaldate=date,
                    modseq=modseq,
                    content_id=_CONTENT.pack(content_id),
                )
            )
        return found

    def index_columns(self, user: str, name: str) -> IndexColumns | None:
        """The mailbox record and all its index entries as columns, in one read transaction
        (the counters are exactly those of the columns). None when the mailbox does not
        exist (or the name is invalid)."""
        try:
            name = normalize_name(name)
        except InvalidMailboxName:
            return None
        with self._read() as txn:
            fields = self._get_mailbox(txn, user, name)
            if fields is None:
                return None
            return self._columns(txn, _info(user.lower(), name, fields), -1)

    def changes_since(self, user: str, name: str, modseq: int) -> IndexChanges | None:
        """What changed in the mailbox above *modseq*, in one read transaction (see
        :class:`IndexChanges`); None when the mailbox does not exist. Reads every index
        entry's modseq (8 octets of each) when the mailbox changed, nothing else when not."""
        try:
            name = normalize_name(name)
        except InvalidMailboxName:
            return None
        with self._read() as txn:
            fields = self._get_mailbox(txn, user, name)
            if fields is None:
                return None
            info = _info(user.lower(), name, fields)
            if fields[3] <= modseq:  # nothing is newer than the mailbox
                return IndexChanges(info, _empty_columns(info), [])
            changed = self._columns(txn, info, modseq)
            prefix = _ID.pack(fields[0])
            gone: list[int] = []
            cursor = txn.cursor(db=self.expunged)
            if cursor.set_range(_EXPUNGED.pack(fields[0], modseq + 1, 0)):
                for key in cursor.iternext(values=False):
                    if key[:4] != prefix:
                        break
                    gone.append(_EXPUNGED.unpack(key)[2])
        gone.sort()
        return IndexChanges(info, changed, gone)

    def _columns(self, txn: lmdb.Transaction[bytes], info: MailboxInfo, above: int) -> IndexColumns:
        """The mailbox's index entries with a modseq above *above* (-1: all) as columns."""
        columns = _empty_columns(info)
        uids, sizes, modseqs = columns.uids, columns.sizes, columns.modseqs
        dates, bits, contents = columns.dates, columns.bits, columns.contents
        keywords = columns.keywords
        unpack = _ENTRY.unpack_from
        size = _ENTRY.size
        uid_of = _KEY.unpack_from
        for key, value in self._index_walk(txn, info.id, above):
            content_id, date, length, modseq, flag_bits = unpack(value)
            uid = uid_of(key)[1]
            uids.append(uid)
            sizes.append(length)
            modseqs.append(modseq)
            dates.append(date)
            bits.append(flag_bits)
            contents.append(content_id)
            if len(value) > size:
                keywords[uid] = frozenset(value[size:].decode().split("\0"))
        return columns

    def rendered(self, content_id: bytes, kind: bytes) -> bytes | None:
        """What a front end kept for the content under *kind* (:func:`keep_rendered`), or
        None."""
        if self.rendered_db is None:
            return None
        with self._read() as txn:
            raw = txn.get(content_id + kind, db=self.rendered_db)
        return None if raw is None else bytes(raw)

    def content(self, content_id: bytes) -> bytes | None:
        """The whole message, or None when it was deleted."""
        with self._read() as txn:
            raw = txn.get(content_id, db=self.contents)
        return None if raw is None else bytes(raw)

    def read(self, content_id: bytes, offset: int, length: int) -> bytes:
        """*length* bytes of the message from *offset* (fewer at its end; b"" past it or
        when it was deleted): the message is read in place, only the slice is copied."""
        with self._read_in_place() as txn:
            view = txn.get(content_id, db=self.contents)
            if view is None:
                return b""
            return bytes(view[offset : offset + length])

    def reader(self) -> ContentReader:
        """A :class:`ContentReader` for a batch of reads in one transaction."""
        return ContentReader(self._read_in_place, self.contents, self.rendered_db)

    def summary(self, content_id: bytes) -> dict[str, Any] | None:
        """The message's summary (see ``tachymail.mailbox.summary``), or None."""
        with self._read() as txn:
            raw = txn.get(content_id, db=self.summaries)
        if raw is None:
            return None
        decoded: dict[str, Any] = orjson.loads(raw)
        return decoded

    def threads_of(self, contents: Iterable[int]) -> dict[int, int]:
        """content id -> thread key of each of *contents* that has a thread record (those
        delivered before the thread index existed, or gone, have none), one read
        transaction."""
        out: dict[int, int] = {}
        if self.threads_db is None:
            return out
        with self._read_in_place() as txn:
            for content in contents:
                raw = txn.get(b"c" + _CONTENT.pack(content), db=self.threads_db)
                if raw is not None:
                    out[content] = _CONTENT.unpack(raw[:8])[0]
        return out

    def thread_members(self, user: str, thread: int, limit: int = 100_000) -> list[int]:
        """The content ids of *user*'s thread *thread* (at most *limit*), ascending."""
        if self.threads_db is None:
            return []
        prefix = b"m" + _user(user.lower()) + b"\0" + _CONTENT.pack(thread)
        found: list[int] = []
        with self._read_in_place() as txn:
            cursor = txn.cursor(db=self.threads_db)
            more = cursor.set_range(prefix)
            while more and len(found) < limit:
                key = bytes(cursor.key())
                if not key.startswith(prefix):
                    break
                found.append(_CONTENT.unpack(key[len(prefix) :])[0])
                more = cursor.next()
        return found

    def delivered(self, key: bytes) -> Delivered | None:
        """The idempotency record of *key* (duplicate=True), or None."""
        with self._read() as txn:
            raw = txn.get(key, db=self.delivered_db)
        if raw is None:
            return None
        mailbox_id, uid, uidvalidity, _when = _DELIVERED.unpack(raw)
        return Delivered(mailbox_id, uid, uidvalidity, True)

    def totals(self) -> tuple[int, int, int]:
        """(bytes, messages, users) of the whole store."""
        with self._read() as txn:
            raw = txn.get(b"totals", db=self.meta)
            users: int = txn.stat(self.usage_db)["entries"]
        total, count = _PAIR.unpack(raw) if raw else (0, 0)
        return total, count, users

    def expunged_since(self, user: str, name: str, modseq: int) -> list[int]:
        """UIDs expunged from the mailbox at a modseq above *modseq* (IMAP QRESYNC)."""
        found: list[int] = []
        with self._read() as txn:
            fields = self._get_mailbox(txn, user, normalize_name(name))
            if fields is None:
                return found
            prefix = _ID.pack(fields[0])
            cursor = txn.cursor(db=self.expunged)
            if not cursor.set_range(_EXPUNGED.pack(fields[0], modseq + 1, 0)):
                return found
            for key in cursor.iternext(values=False):
                if key[:4] != prefix:
                    break
                found.append(_EXPUNGED.unpack(key)[2])
        return sorted(found)

    def expunged_contents_since(self, mailbox_id: int, modseq: int) -> list[int] | None:
        """The content ids of the messages expunged (or moved away) from the mailbox
        *mailbox_id* at a modseq above *modseq* (JMAP Email/changes), in expunge order; None
        when one of those records was written before they named their content."""
        found = self.expunged_threads_since(mailbox_id, modseq, need_threads=False)
        return None if found is None else [content for _uid, content, _thread in found]

    def expunged_threads_since(
        self, mailbox_id: int, modseq: int, *, need_threads: bool = True
    ) -> list[tuple[int, int, int]] | None:
        """(uid, content id, thread key) of the messages expunged (or moved away) from the
        mailbox *mailbox_id* at a modseq above *modseq* (JMAP Email/changes and
        Thread/changes), in expunge order; None when one of those records was written
        before they named their content or (*need_threads*) their thread key. The thread
        key is 0 where it is not known."""
        found: list[tuple[int, int, int]] = []
        prefix = _ID.pack(mailbox_id)
        with self._read() as txn:
            cursor = txn.cursor(db=self.expunged)
            if not cursor.set_range(_EXPUNGED.pack(mailbox_id, modseq + 1, 0)):
                return found
            for key, value in cursor:
                if key[:4] != prefix:
                    break
                uid = _EXPUNGED.unpack(key)[2]
                if len(value) == _PAIR.size:
                    found.append((uid, *_PAIR.unpack(value)))
                elif len(value) == _CONTENT.size and not need_threads:
                    found.append((uid, _CONTENT.unpack(value)[0], 0))
                else:
                    return None
        return found

    def first_recent(self, mailbox_id: int) -> int:
        """The first UID of the mailbox no IMAP4rev1 session has claimed as \\Recent (see
        :func:`claim_recent`): every message from it on is recent; 0 when none was claimed."""
        if self.recent_db is None:
            return 0
        with self._read() as txn:
            raw = txn.get(_ID.pack(mailbox_id), db=self.recent_db)
        return 0 if raw is None else int(_ID.unpack(raw)[0])

    def recent_count(self, user: str, name: str) -> int:
        """How many messages of the mailbox no session has claimed as \\Recent (IMAP STATUS
        RECENT); 0 when the mailbox does not exist. Reads only the unclaimed index entries."""
        try:
            name = normalize_name(name)
        except InvalidMailboxName:
            return 0
        with self._read() as txn:
            fields = self._get_mailbox(txn, user, name)
            if fields is None:
                return 0
            raw = (
                None if self.recent_db is None else txn.get(_ID.pack(fields[0]), db=self.recent_db)
            )
            first = 0 if raw is None else _ID.unpack(raw)[0]
            prefix = _ID.pack(fields[0])
            cursor = txn.cursor(db=self.index)
            count = 0
            if cursor.set_range(_KEY.pack(fields[0], first)):
                for key in cursor.iternext(values=False):
                    if key[:4] != prefix:
                        break
                    count += 1
        return count

    def subscriptions(self, user: str) -> list[str]:
        """The user's subscribed names that are not mailboxes (deleted, or never made),
        sorted; the subscription of a mailbox is its MailboxInfo.subscribed."""
        if self.subscriptions_db is None:
            return []
        prefix = _user(user) + b"\0"
        found: list[str] = []
        with self._read() as txn:
            cursor = txn.cursor(db=self.subscriptions_db)
            more = cursor.set_range(prefix)
            while more:
                key = bytes(cursor.key())
                if not key.startswith(prefix):
                    break
                found.append(key[len(prefix) :].decode())
                more = cursor.next()
        return found

    def file_size(self) -> int:
        """Bytes of the environment's data file (grows with the high-water mark only)."""
        return (self.directory / "data.mdb").stat().st_size

    def close(self) -> None:
        self.env.close()


def _empty_columns(info: MailboxInfo) -> IndexColumns:
    return IndexColumns(
        info, array("I"), array("Q"), array("Q"), array("d"), bytearray(), array("Q"), {}
    )


def _unpack_mailbox(raw: bytes | memoryview) -> list[Any]:
    fields: list[Any] = list(_MAILBOX.unpack_from(raw))
    fields.append(bytes(raw[_MAILBOX.size :]).decode())
    return fields


def _info(user: str, name: str, fields: list[Any]) -> MailboxInfo:
    mailbox_id, uidvalidity, uidnext, modseq, messages, unseen, size, subscribed, use = fields
    return MailboxInfo(
        user=user,
        name=name,
        id=mailbox_id,
        uidvalidity=uidvalidity,
        uidnext=uidnext,
        highestmodseq=modseq,
        messages=messages,
        unseen=unseen,
        size=size,
        special_use=use,
        subscribed=bool(subscribed),
    )


# --- operations: build them outside the transaction, pass them to apply / a committer -------


def prepare_delivery(
    user: str,
    content: bytes,
    *,
    mailbox: str = "INBOX",
    flags: Iterable[str] = (),
    internaldate: float | None = None,
    key: bytes = b"",
    quota: int = 0,
    create: bool = True,
) -> Delivery:
    """A message ready for :func:`deliver`: the MIME scan and the summary are done here, in
    the caller, not inside the commit. *key*: idempotency key (b"": none); *quota*: bytes,
    0 for none; *create*: False when *mailbox* must already exist (IMAP APPEND), else the
    outcome is NoSuchMailbox. Raises InvalidMailboxName for a bad *mailbox*."""
    bits, keywords = encode_flags(flags)
    return Delivery(
        user=user.lower(),
        mailbox=normalize_name(mailbox),
        content=bytes(content),
        summary=encode_summary(content),
        flag_bits=bits,
        keywords=keywords,
        internaldate=time.time() if internaldate is None else internaldate,
        key=key,
        quota=quota,
        create=create,
        thread=thread_refs(content),
    )


def deliver(delivery: Delivery) -> Operation:
    """The operation that stores *delivery*; its outcome is a :class:`Delivered`
    (``duplicate=True`` when its key was delivered before: nothing written), or an
    :class:`OverQuota` instance, refused alone, when usage + size would exceed the quota.
    The user's default mailboxes are made on the first delivery; another target mailbox
    that does not exist is made too, unless the delivery was prepared with
    ``create=False``: then the outcome is a :class:`NoSuchMailbox` (with *mailbox* set),
    nothing written. A default mailbox of a user not yet in the store counts as existing
    (the user's first message makes them all)."""

    def operation(store: MailboxStore, txn: lmdb.Transaction) -> object:
        now = time.time()
        if delivery.key:
            raw = txn.get(delivery.key, db=store.delivered_db)
            if raw is not None:
                mailbox_id, uid, uidvalidity, _when = _DELIVERED.unpack(raw)
                return Delivered(mailbox_id, uid, uidvalidity, True)
        if not delivery.create and not store._will_exist(txn, delivery.user, delivery.mailbox):
            return NoSuchMailbox(
                f"{delivery.user}: no mailbox {delivery.mailbox!r}", delivery.mailbox
            )
        size = len(delivery.content)
        if delivery.quota:
            raw = txn.get(_user(delivery.user), db=store.usage_db)
            used = _PAIR.unpack(raw)[0] if raw else 0
            if used + size > delivery.quota:
                return OverQuota(
                    f"{delivery.user}: {used} + {size} bytes exceed the quota of "
                    f"{delivery.quota} bytes"
                )
        store._ensure_user(txn, delivery.user)
        fields = store._get_mailbox(txn, delivery.user, delivery.mailbox)
        if fields is None:
            fields = store._new_mailbox(txn, delivery.user, delivery.mailbox)
        mailbox_id, uidvalidity, uid = fields[0], fields[1], fields[2]
        modseq = fields[3] + 1
        content_id = store._counter(txn, b"next_content", _CONTENT)
        content_key = _CONTENT.pack(content_id)
        txn.put(content_key, delivery.content, db=store.contents)
        txn.put(content_key, delivery.summary, db=store.summaries)
        if delivery.thread is not None:
            store._thread(txn, delivery.user, content_key, delivery.thread)
        entry = _ENTRY.pack(content_id, delivery.internaldate, size, modseq, delivery.flag_bits)
        txn.put(_KEY.pack(mailbox_id, uid), entry + delivery.keywords, db=store.index)
        fields[2] = uid + 1
        fields[3] = modseq
        fields[4] += 1
        fields[5] += 0 if delivery.flag_bits & _SEEN_BIT else 1
        fields[6] += size
        store._put_mailbox(txn, delivery.user, delivery.mailbox, fields)
        store._add_usage(txn, delivery.user, size, 1)
        store._touch(delivery.user)
        if delivery.key:
            txn.put(
                delivery.key,
                _DELIVERED.pack(mailbox_id, uid, uidvalidity, now),
                db=store.delivered_db,
            )
            stamp = _CONTENT.pack(int(now * 1000))
            txn.put(stamp + delivery.key, b"", db=store.delivered_age)
            store._sweep_delivered(txn, now, _SWEEP_PER_DELIVERY)
        reply_due = delivery.reply is not None and store._note_reply(
            txn, delivery.user, delivery.reply[0], delivery.reply_days, now
        )
        return Delivered(mailbox_id, uid, uidvalidity, False, reply_due)

    return operation


def create_user(user: str) -> Operation:
    """Make the user's default mailboxes (INBOX, Drafts, Sent, Trash, Junk, Archive with
    their SPECIAL-USE); idempotent. Outcome: whether the user was new."""

    def operation(store: MailboxStore, txn: lmdb.Transaction) -> object:
        made = store._ensure_user(txn, user)
        if made:
            store._touch(user)
        return made

    return operation


def delete_user(user: str) -> Operation:
    """Delete all the user's mailboxes and messages, freeing their space. Outcome:
    (bytes, messages) freed; (0, 0) for an unknown user."""

    def operation(store: MailboxStore, txn: lmdb.Transaction) -> object:
        prefix = _user(user) + b"\0"
        doomed: list[bytes] = []
        cursor = txn.cursor(db=store.mailbox_db)
        more = cursor.set_range(prefix)
        while more and bytes(cursor.key()).startswith(prefix):
            doomed.append(bytes(cursor.value()))
            more = cursor.delete()
        cursor = txn.cursor(db=store.subscriptions_db)
        more = cursor.set_range(prefix)
        while more and bytes(cursor.key()).startswith(prefix):
            more = cursor.delete()
        store._drop_submissions(txn, user)
        size = count = 0
        for raw in doomed:
            freed, removed = store._drop_messages(txn, _unpack_mailbox(raw)[0])
            size += freed
            count += removed
        known = txn.get(_user(user), db=store.usage_db) is not None
        if known:
            store._add_totals(txn, -size, -count)
            txn.delete(_user(user), db=store.usage_db)
        if known or doomed:
            store._touch(user)
        return (size, count)

    return operation


def set_flags(
    user: str, name: str, uids: Sequence[int], flags: Iterable[str], mode: str
) -> Operation:
    """Add, remove or replace (*mode* "add" | "remove" | "replace") flags of the messages
    *uids* (absent ones are skipped). Each changed message takes the mailbox's next modseq.
    Outcome: the changed messages' :class:`MessageInfo`, in UID order, or NoSuchMailbox."""
    if mode not in ("add", "remove", "replace"):
        raise ValueError(f"mode must be add, remove or replace, not {mode!r}")
    bits, keywords = encode_flags(flags)
    words = set(keywords.decode().split("\0")) if keywords else set()

    def operation(store: MailboxStore, txn: lmdb.Transaction) -> object:
        found = store._find_mailbox(txn, user, name)
        if isinstance(found, Exception):
            return found
        mailbox, fields = found
        modseq = fields[3] + 1
        changed: list[MessageInfo] = []
        for uid, key, raw in store._entries(txn, fields[0], uids):
            content_id, date, size, _old_modseq, old_bits = _ENTRY.unpack_from(raw)
            old_words = set(bytes(raw[_ENTRY.size :]).decode().split("\0")) - {""}
            if mode == "add":
                new_bits, new_words = old_bits | bits, old_words | words
            elif mode == "remove":
                new_bits, new_words = old_bits & ~bits, old_words - words
            else:
                new_bits, new_words = bits, set(words)
            if new_bits == old_bits and new_words == old_words:
                continue
            encoded = "\0".join(sorted(new_words)).encode()
            entry = _ENTRY.pack(content_id, date, size, modseq, new_bits)
            txn.put(key, entry + encoded, db=store.index)
            if (old_bits ^ new_bits) & _SEEN_BIT:
                fields[5] += -1 if new_bits & _SEEN_BIT else 1
            changed.append(
                MessageInfo(
                    uid,
                    size,
                    decode_flags(new_bits, encoded),
                    date,
                    modseq,
                    _CONTENT.pack(content_id),
                )
            )
        if changed:
            fields[3] = modseq
            store._put_mailbox(txn, user, mailbox, fields)
            store._touch(user)
        return changed

    return operation


def expunge(user: str, name: str, uids: Sequence[int]) -> Operation:
    """Remove the messages *uids* (absent ones are skipped), freeing their content and
    quota usage; logged under one new modseq for QRESYNC. Outcome: the UIDs removed, in
    order, or NoSuchMailbox."""

    def operation(store: MailboxStore, txn: lmdb.Transaction) -> object:
        found = store._find_mailbox(txn, user, name)
        if isinstance(found, Exception):
            return found
        mailbox, fields = found
        modseq = fields[3] + 1
        removed: list[int] = []
        freed = 0
        for uid, key, raw in store._entries(txn, fields[0], uids):
            content_id, _date, size, _modseq, bits = _ENTRY.unpack_from(raw)
            content_key = _CONTENT.pack(content_id)
            # the value names the content and its thread (read before the release forgets
            # it): JMAP's Email/changes and Thread/changes report what went
            gone = _PAIR.pack(content_id, store._thread_key(txn, content_key))
            store._release_content(txn, content_key)
            txn.delete(key, db=store.index)
            txn.put(_EXPUNGED.pack(fields[0], modseq, uid), gone, db=store.expunged)
            freed += size
            removed.append(uid)
            fields[4] -= 1
            fields[5] -= 0 if bits & _SEEN_BIT else 1
            fields[6] -= size
        if removed:
            fields[3] = modseq
            store._put_mailbox(txn, user, mailbox, fields)
            store._add_usage(txn, user, -freed, -len(removed))
            store._touch(user)
        return removed

    return operation


def copy_messages(
    user: str, source: str, dest: str, uids: Sequence[int], *, quota: int = 0
) -> Operation:
    """Copy the messages *uids* of mailbox *source* (absent ones are skipped) to *dest*,
    keeping their flags and INTERNALDATE; the copies take the destination's next UIDs in
    source-UID order and one new modseq. The content is shared, not written again (see the
    module docstring); the usage grows by every copy's size, checked against *quota*
    (bytes, 0 for none). *dest* may be *source*.

    Outcome: a :class:`CopyResult`, or, nothing written: NoSuchMailbox (*mailbox* tells
    which: the session answers NO [TRYCREATE] when it is *dest*), InvalidMailboxName, or
    OverQuota when usage + the copies' size would exceed *quota*."""

    def operation(store: MailboxStore, txn: lmdb.Transaction) -> object:
        found = store._find_mailbox(txn, user, source)
        if isinstance(found, Exception):
            return found
        _source_name, source_fields = found
        target = store._find_mailbox(txn, user, dest)
        if isinstance(target, Exception):
            return target
        dest_name, fields = target
        found_entries = store._entries(txn, source_fields[0], uids)
        entries = [(uid, bytes(raw)) for uid, _key, raw in found_entries]
        if not entries:
            return CopyResult(fields[1], [], [])
        total = sum(_ENTRY.unpack_from(raw)[2] for _uid, raw in entries)
        if quota:
            raw_usage = txn.get(_user(user), db=store.usage_db)
            used = _PAIR.unpack(raw_usage)[0] if raw_usage else 0
            if used + total > quota:
                return OverQuota(
                    f"{user}: {used} + {total} bytes exceed the quota of {quota} bytes"
                )
        modseq = fields[3] + 1
        first = fields[2]
        for offset, (_uid, raw) in enumerate(entries):
            content_id, date, size, _modseq, bits = _ENTRY.unpack_from(raw)
            store._share_content(txn, _CONTENT.pack(content_id))
            entry = _ENTRY.pack(content_id, date, size, modseq, bits)
            keywords = raw[_ENTRY.size :]
            txn.put(_KEY.pack(fields[0], first + offset), entry + keywords, db=store.index)
            fields[5] += 0 if bits & _SEEN_BIT else 1
        fields[2] = first + len(entries)
        fields[3] = modseq
        fields[4] += len(entries)
        fields[6] += total
        store._put_mailbox(txn, user, dest_name, fields)
        store._add_usage(txn, user, total, len(entries))
        store._touch(user)
        return CopyResult(fields[1], [uid for uid, _raw in entries], list(range(first, fields[2])))

    return operation


def move_messages(user: str, source: str, dest: str, uids: Sequence[int]) -> Operation:
    """Move the messages *uids* of mailbox *source* (absent ones are skipped) to *dest*
    (IMAP MOVE, RFC 6851): as :func:`copy_messages`, and in the same transaction the
    source messages are expunged under one new modseq of the source, logged for QRESYNC
    like :func:`expunge`. No octet is copied (the index entries are re-keyed) and the
    usage does not change. *dest* may be *source*: the messages get new UIDs.

    Outcome: a :class:`CopyResult`, or NoSuchMailbox / InvalidMailboxName, nothing
    written."""

    def operation(store: MailboxStore, txn: lmdb.Transaction) -> object:
        found = store._find_mailbox(txn, user, source)
        if isinstance(found, Exception):
            return found
        source_name, source_fields = found
        target = store._find_mailbox(txn, user, dest)
        if isinstance(target, Exception):
            return target
        dest_name, fields = target
        if dest_name == source_name:
            fields = source_fields  # one record: its counters change once for both halves
        entries = [
            (uid, key, bytes(raw)) for uid, key, raw in store._entries(txn, source_fields[0], uids)
        ]
        if not entries:
            return CopyResult(fields[1], [], [])
        source_modseq = source_fields[3] + 1
        for uid, key, raw in entries:
            txn.delete(key, db=store.index)
            content_key = raw[: _CONTENT.size]  # the content id (the entry's first field)
            txn.put(
                _EXPUNGED.pack(source_fields[0], source_modseq, uid),
                content_key + _CONTENT.pack(store._thread_key(txn, content_key)),  # as expunge
                db=store.expunged,
            )
            size, bits = _ENTRY.unpack_from(raw)[2], raw[_ENTRY.size - 1]
            source_fields[4] -= 1
            source_fields[5] -= 0 if bits & _SEEN_BIT else 1
            source_fields[6] -= size
        source_fields[3] = source_modseq
        # the destination's modseq: the same one when source and destination are one record
        modseq = fields[3] if fields is source_fields else fields[3] + 1
        first = fields[2]
        for offset, (_uid, _key, raw) in enumerate(entries):
            content_id, date, size, _modseq, bits = _ENTRY.unpack_from(raw)
            entry = _ENTRY.pack(content_id, date, size, modseq, bits)
            keywords = raw[_ENTRY.size :]
            txn.put(_KEY.pack(fields[0], first + offset), entry + keywords, db=store.index)
            fields[4] += 1
            fields[5] += 0 if bits & _SEEN_BIT else 1
            fields[6] += size
        fields[2] = first + len(entries)
        fields[3] = modseq
        if fields is not source_fields:
            store._put_mailbox(txn, user, source_name, source_fields)
        store._put_mailbox(txn, user, dest_name, fields)
        store._touch(user)
        return CopyResult(
            fields[1], [uid for uid, _key, _raw in entries], list(range(first, fields[2]))
        )

    return operation


def create_mailbox(
    user: str, name: str, special_use: str = "", *, subscribed: bool = True
) -> Operation:
    """Make a mailbox (the user's defaults too, if new). *subscribed*: whether the new
    mailbox is subscribed (IMAP CREATE passes False, RFC 3501 §6.3.3); a subscription to
    the name that outlived an earlier mailbox, or was made before it existed, stays either
    way. Outcome: its MailboxInfo, or MailboxExists / InvalidMailboxName."""

    def operation(store: MailboxStore, txn: lmdb.Transaction) -> object:
        try:
            mailbox = normalize_name(name)
        except InvalidMailboxName as exc:
            return exc
        if store._get_mailbox(txn, user, mailbox) is not None:
            return MailboxExists(f"{user}: mailbox {mailbox!r} exists")
        store._ensure_user(txn, user)
        fields = store._get_mailbox(txn, user, mailbox)
        if fields is None:
            fields = store._new_mailbox(txn, user, mailbox, special_use, subscribed)
        store._touch(user)
        return _info(user.lower(), mailbox, fields)

    return operation


def delete_mailbox(user: str, name: str) -> Operation:
    """Delete a mailbox and its messages, freeing their space (not INBOX; its children,
    "name/...", stay). Its subscription stays (``MailboxStore.subscriptions``, RFC 9051
    §6.3.4). Outcome: (bytes, messages) freed, or NoSuchMailbox / InvalidMailboxName."""

    def operation(store: MailboxStore, txn: lmdb.Transaction) -> object:
        if name.upper() == "INBOX":  # checked first: refused even for an unknown user
            return InvalidMailboxName("INBOX cannot be deleted")
        found = store._find_mailbox(txn, user, name)
        if isinstance(found, Exception):
            return found
        mailbox, fields = found
        size, count = store._drop_messages(txn, fields[0])
        txn.delete(_mailbox_key(user, mailbox), db=store.mailbox_db)
        if fields[7]:
            txn.put(_mailbox_key(user, mailbox), b"", db=store.subscriptions_db)
        store._add_usage(txn, user, -size, -count)
        store._touch(user)
        return (size, count)

    return operation


def rename_mailbox(user: str, old: str, new: str) -> Operation:
    """Rename a mailbox and its children ("old/..." -> "new/..."), keeping ids, UIDs and
    UIDVALIDITY. Renaming INBOX moves it (messages included) to *new* and makes a new,
    empty INBOX (RFC 3501 §6.3.5). Outcome: None, or NoSuchMailbox / MailboxExists /
    InvalidMailboxName."""

    def operation(store: MailboxStore, txn: lmdb.Transaction) -> object:
        try:
            source, target = normalize_name(old), normalize_name(new)
        except InvalidMailboxName as exc:
            return exc
        if target == "INBOX" or target == source or target.startswith(source + "/"):
            return InvalidMailboxName(f"cannot rename {source!r} to {target!r}")
        fields = store._get_mailbox(txn, user, source)
        if fields is None:
            return NoSuchMailbox(f"{user}: no mailbox {old!r}", old)
        moves = [(source, target)]
        if source != "INBOX":  # INBOX's children stay where they are
            prefix = _mailbox_key(user, source + "/")
            cursor = txn.cursor(db=store.mailbox_db)
            more = cursor.set_range(prefix)
            while more and bytes(cursor.key()).startswith(prefix):
                child = bytes(cursor.key())[len(_user(user)) + 1 :].decode()
                moves.append((child, target + child[len(source) :]))
                more = cursor.next()
        for _, destination in moves:
            if txn.get(_mailbox_key(user, destination), db=store.mailbox_db) is not None:
                return MailboxExists(f"{user}: mailbox {destination!r} exists")
        for origin, destination in moves:
            key = _mailbox_key(user, origin)
            record = txn.get(key, db=store.mailbox_db)
            if record is None:  # listed above in this same transaction
                continue
            txn.delete(key, db=store.mailbox_db)
            fields = _unpack_mailbox(record)
            if txn.delete(_mailbox_key(user, destination), db=store.subscriptions_db):
                fields[7] = 1  # the name was subscribed: the mailbox now under it is
            store._put_mailbox(txn, user, destination, fields)
        if source == "INBOX":
            store._new_mailbox(txn, user, "INBOX")
        store._touch(user)
        return None

    return operation


def subscribe(user: str, name: str, subscribed: bool) -> Operation:
    """Set the subscription of *name* (IMAP SUBSCRIBE/UNSUBSCRIBE): a mailbox's, or a name
    that is not a mailbox (RFC 9051 §6.3.7 allows subscribing to it; see
    ``MailboxStore.subscriptions``). Outcome: None, InvalidMailboxName, or NoSuchMailbox
    when unsubscribing a name that is neither a mailbox nor subscribed."""

    def operation(store: MailboxStore, txn: lmdb.Transaction) -> object:
        found = store._find_mailbox(txn, user, name)
        if isinstance(found, InvalidMailboxName):
            return found
        if isinstance(found, Exception):
            key = _mailbox_key(user, normalize_name(name))
            if subscribed:
                txn.put(key, b"", db=store.subscriptions_db)
            elif not txn.delete(key, db=store.subscriptions_db):
                return found
            store._touch(user)
            return None
        mailbox, fields = found
        fields[7] = int(subscribed)
        store._put_mailbox(txn, user, mailbox, fields)
        store._touch(user)
        return None

    return operation


def claim_recent(user: str, name: str, mailbox_id: int) -> Operation:
    """Claim the mailbox's messages no session has claimed yet as \\Recent for the calling
    IMAP4rev1 session (RFC 3501 §2.3.2: recent in exactly one session). Inside one write
    transaction of the store's group commit, so two sessions in any processes never both
    get a message. *mailbox_id*: the mailbox the session selected (a mailbox since made
    under the same name claims nothing).

    Outcome: (first, end): the session's new recent UIDs are first <= uid < end (first ==
    end: none, nothing written), or NoSuchMailbox / InvalidMailboxName."""

    def operation(store: MailboxStore, txn: lmdb.Transaction) -> object:
        found = store._find_mailbox(txn, user, name)
        if isinstance(found, Exception):
            return found
        _mailbox, fields = found
        if fields[0] != mailbox_id:
            return (0, 0)
        key = _ID.pack(mailbox_id)
        raw = txn.get(key, db=store.recent_db)
        first = _ID.unpack(raw)[0] if raw is not None else 0
        end = fields[2]  # uidnext: every message there is now is claimed
        if first >= end:
            return (end, end)
        txn.put(key, _ID.pack(end), db=store.recent_db)
        return (first, end)

    return operation


def keep_rendered(items: Sequence[tuple[bytes, bytes, bytes]]) -> Operation:
    """Keep (content id, kind, octets) for each item: derived data a front end computed once
    and reads back with :meth:`MailboxStore.rendered` (IMAP's BODYSTRUCTURE and ENVELOPE).
    Items of a content deleted meanwhile are skipped. Outcome: how many were kept. Changes
    no mailbox: nobody is notified."""

    def operation(store: MailboxStore, txn: lmdb.Transaction) -> object:
        kept = 0
        for content_id, kind, data in items:
            if txn.get(content_id, db=store.contents) is None:
                continue  # deleted since it was read: keep nothing that outlives it
            txn.put(content_id + kind, data, db=store.rendered_db)
            kept += 1
        return kept

    return operation


def sweep_delivered(now: float | None = None, limit: int = 10_000) -> Operation:
    """Drop up to *limit* idempotency records older than DELIVERED_TTL. Outcome: how many."""

    def operation(store: MailboxStore, txn: lmdb.Transaction) -> object:
        return store._sweep_delivered(txn, time.time() if now is None else now, limit)

    return operation
