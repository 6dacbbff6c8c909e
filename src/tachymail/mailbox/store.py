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
``usage``
    user -> >QQ (bytes, messages) over all the user's mailboxes: the quota check reads one
    record. A user exists in the store when it has one.
``delivered`` / ``delivered_age``
    idempotency key -> >IIId (mailbox id, uid, uidvalidity, time) / time in ms (>Q) + key,
    the sweep order. Entries older than :data:`DELIVERED_TTL` are dropped a few at a time
    by later deliveries, so the table stays bounded.
``expunged``
    mailbox id (>I) + modseq (>Q) + uid (>I) -> b"": what an expunge removed, for IMAP
    QRESYNC's VANISHED (EARLIER); dropped with the mailbox.

UIDs start at 1 per mailbox and are never reused within a UIDVALIDITY. A new mailbox's
UIDVALIDITY is above every earlier one of the node (the larger of the last one + 1 and
the clock), so a mailbox deleted and made again under the same name never repeats one.
Every change of a mailbox's messages takes the next modseq (RFC 7162 CONDSTORE).
Deleting messages (expunge, delete_mailbox, delete_user) deletes their content and
summary and lowers the usage: LMDB reuses the freed pages, so the file stops growing.
Each message has its own content record: no reference counts (an IMAP COPY copies).
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lmdb
import orjson

from tachymail.lmdbenv import GrowingMap, open_store
from tachymail.mailbox.summary import encode_summary

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


class OverQuota(Exception):
    """The user's mailboxes would exceed the quota: 452 4.2.2 at RCPT, a deferral at
    delivery (retried until the user makes room or the message expires)."""


class StorageFull(Exception):
    """The store's map is at its maximum size or the disk is full: nothing of the batch was
    stored (452 4.3.1 at intake, a deferral at delivery)."""


class NoSuchMailbox(Exception):
    """The user or mailbox does not exist; nothing was written (IMAP NO [NONEXISTENT])."""


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
class Delivered:
    """Where a delivery went; *duplicate*: its key was delivered before, nothing written."""

    mailbox_id: int
    uid: int
    uidvalidity: int
    duplicate: bool


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


class ContentReader:
    """Reads of message contents in one read transaction: a pipelined batch of POP3 RETRs
    (or IMAP FETCHes) pays for one transaction, not one each. Close it before the event
    loop turns: an open read transaction keeps LMDB from reusing the pages it sees."""

    __slots__ = ("_db", "_txn")

    def __init__(self, txn: lmdb.Transaction[memoryview], db: Any) -> None:
        self._txn: lmdb.Transaction[memoryview] | None = txn
        self._db = db

    def read(self, content_id: bytes, offset: int, length: int) -> bytes:
        """As :meth:`MailboxStore.read`."""
        txn = self._txn
        if txn is None:
            raise ValueError("the reader is closed")
        view = txn.get(content_id, db=self._db)
        if view is None:
            return b""
        return bytes(view[offset : offset + length])

    def close(self) -> None:
        if self._txn is not None:
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
            self.directory, what="mailbox store", map_size=map_size, max_dbs=12, readonly=readonly
        )
        if not readonly:
            with self.env.begin(write=True) as txn:
                self._open_dbs(txn)
        else:
            self._open_dbs(None, create=False)
        self._map = GrowingMap(
            self.env,
            self.max_map_size,
            name="mailbox",
            full=StorageFull,
            no_room="no room in the mailbox store",
        )

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

    # --- writing ----------------------------------------------------------------------------

    def apply(self, operations: Sequence[Operation]) -> list[object]:
        """Run every operation in one synced write transaction; each one's outcome.

        An operation that refuses returns an exception instance, having written nothing;
        the others are committed all the same. Raises ``StorageFull`` when the map cannot
        grow further or the disk is full: nothing of the batch is stored, and the store
        stays usable.
        """
        return self._map.write(lambda txn: [operation(self, txn) for operation in operations])

    # --- helpers inside a write transaction (operations call them) --------------------------

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
        self, txn: lmdb.Transaction, user: str, name: str, special_use: str = ""
    ) -> list[Any]:
        """Create a mailbox record (the caller checked it is absent); its fields as a list."""
        mailbox_id = self._counter(txn, b"next_mailbox", _ID)
        raw = txn.get(b"last_uidvalidity", db=self.meta)
        last = _ID.unpack(raw)[0] if raw else 0
        uidvalidity = max(last + 1, int(time.time()))
        txn.put(b"last_uidvalidity", _ID.pack(uidvalidity), db=self.meta)
        fields: list[Any] = [mailbox_id, uidvalidity, 1, 1, 0, 0, 0, 1, special_use]
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
            return NoSuchMailbox(f"{user}: no mailbox {name!r}")
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

    def _drop_messages(self, txn: lmdb.Transaction, mailbox_id: int) -> tuple[int, int]:
        """Delete every message, index entry and expunge record of a mailbox; (bytes, count)."""
        size = count = 0
        prefix = _ID.pack(mailbox_id)
        cursor = txn.cursor(db=self.index)
        more = cursor.set_range(prefix)
        while more and bytes(cursor.key()[:4]) == prefix:
            content_id, _date, length, _modseq, _bits = _ENTRY.unpack_from(cursor.value())
            content_key = _CONTENT.pack(content_id)
            txn.delete(content_key, db=self.contents)
            txn.delete(content_key, db=self.summaries)
            size += length
            count += 1
            more = cursor.delete()  # moves to the next record
        cursor = txn.cursor(db=self.expunged)
        more = cursor.set_range(prefix)
        while more and bytes(cursor.key()[:4]) == prefix:
            more = cursor.delete()
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
        try:
            return self.env.begin()
        except lmdb.MapResizedError:
            self.env.set_mapsize(0)  # another process grew the map
            return self.env.begin()

    def _read_in_place(self) -> lmdb.Transaction[memoryview]:
        """A read transaction whose values are views into the map (no copy)."""
        try:
            return self.env.begin(buffers=True)
        except lmdb.MapResizedError:
            self.env.set_mapsize(0)
            return self.env.begin(buffers=True)

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
        try:
            name = normalize_name(name)
        except InvalidMailboxName:
            return []
        found: list[MessageInfo] = []
        unpack = _ENTRY.unpack_from
        size = _ENTRY.size
        with self._read() as txn:
            fields = self._get_mailbox(txn, user, name)
            if fields is None:
                return found
            prefix = _ID.pack(fields[0])
            cursor = txn.cursor(db=self.index)
            if not cursor.set_range(prefix):
                return found
            for key, value in cursor:
                if key[:4] != prefix:
                    break
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
        return ContentReader(self._read_in_place(), self.contents)

    def summary(self, content_id: bytes) -> dict[str, Any] | None:
        """The message's summary (see ``tachymail.mailbox.summary``), or None."""
        with self._read() as txn:
            raw = txn.get(content_id, db=self.summaries)
        if raw is None:
            return None
        decoded: dict[str, Any] = orjson.loads(raw)
        return decoded

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

    def file_size(self) -> int:
        """Bytes of the environment's data file (grows with the high-water mark only)."""
        return (self.directory / "data.mdb").stat().st_size

    def close(self) -> None:
        self.env.close()


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
) -> Delivery:
    """A message ready for :func:`deliver`: the MIME scan and the summary are done here, in
    the caller, not inside the commit. *key*: idempotency key (b"": none); *quota*: bytes,
    0 for none. Raises InvalidMailboxName for a bad *mailbox*."""
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
    )


def deliver(delivery: Delivery) -> Operation:
    """The operation that stores *delivery*; its outcome is a :class:`Delivered`
    (``duplicate=True`` when its key was delivered before: nothing written), or an
    :class:`OverQuota` instance, refused alone, when usage + size would exceed the quota.
    The user's default mailboxes are made on the first delivery; another target mailbox
    that does not exist is made too."""

    def operation(store: MailboxStore, txn: lmdb.Transaction) -> object:
        now = time.time()
        if delivery.key:
            raw = txn.get(delivery.key, db=store.delivered_db)
            if raw is not None:
                mailbox_id, uid, uidvalidity, _when = _DELIVERED.unpack(raw)
                return Delivered(mailbox_id, uid, uidvalidity, True)
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
        entry = _ENTRY.pack(content_id, delivery.internaldate, size, modseq, delivery.flag_bits)
        txn.put(_KEY.pack(mailbox_id, uid), entry + delivery.keywords, db=store.index)
        fields[2] = uid + 1
        fields[3] = modseq
        fields[4] += 1
        fields[5] += 0 if delivery.flag_bits & _SEEN_BIT else 1
        fields[6] += size
        store._put_mailbox(txn, delivery.user, delivery.mailbox, fields)
        store._add_usage(txn, delivery.user, size, 1)
        if delivery.key:
            txn.put(
                delivery.key,
                _DELIVERED.pack(mailbox_id, uid, uidvalidity, now),
                db=store.delivered_db,
            )
            stamp = _CONTENT.pack(int(now * 1000))
            txn.put(stamp + delivery.key, b"", db=store.delivered_age)
            store._sweep_delivered(txn, now, _SWEEP_PER_DELIVERY)
        return Delivered(mailbox_id, uid, uidvalidity, False)

    return operation


def create_user(user: str) -> Operation:
    """Make the user's default mailboxes (INBOX, Drafts, Sent, Trash, Junk, Archive with
    their SPECIAL-USE); idempotent. Outcome: whether the user was new."""

    def operation(store: MailboxStore, txn: lmdb.Transaction) -> object:
        return store._ensure_user(txn, user)

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
        size = count = 0
        for raw in doomed:
            freed, removed = store._drop_messages(txn, _unpack_mailbox(raw)[0])
            size += freed
            count += removed
        if txn.get(_user(user), db=store.usage_db) is not None:
            store._add_totals(txn, -size, -count)
            txn.delete(_user(user), db=store.usage_db)
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
            txn.delete(content_key, db=store.contents)
            txn.delete(content_key, db=store.summaries)
            txn.delete(key, db=store.index)
            txn.put(_EXPUNGED.pack(fields[0], modseq, uid), b"", db=store.expunged)
            freed += size
            removed.append(uid)
            fields[4] -= 1
            fields[5] -= 0 if bits & _SEEN_BIT else 1
            fields[6] -= size
        if removed:
            fields[3] = modseq
            store._put_mailbox(txn, user, mailbox, fields)
            store._add_usage(txn, user, -freed, -len(removed))
        return removed

    return operation


def create_mailbox(user: str, name: str, special_use: str = "") -> Operation:
    """Make a mailbox (the user's defaults too, if new). Outcome: its MailboxInfo, or
    MailboxExists / InvalidMailboxName."""

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
            fields = store._new_mailbox(txn, user, mailbox, special_use)
        return _info(user.lower(), mailbox, fields)

    return operation


def delete_mailbox(user: str, name: str) -> Operation:
    """Delete a mailbox and its messages, freeing their space (not INBOX; its children,
    "name/...", stay). Outcome: (bytes, messages) freed, or NoSuchMailbox /
    InvalidMailboxName."""

    def operation(store: MailboxStore, txn: lmdb.Transaction) -> object:
        if name.upper() == "INBOX":  # checked first: refused even for an unknown user
            return InvalidMailboxName("INBOX cannot be deleted")
        found = store._find_mailbox(txn, user, name)
        if isinstance(found, Exception):
            return found
        mailbox, fields = found
        size, count = store._drop_messages(txn, fields[0])
        txn.delete(_mailbox_key(user, mailbox), db=store.mailbox_db)
        store._add_usage(txn, user, -size, -count)
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
            return NoSuchMailbox(f"{user}: no mailbox {old!r}")
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
            txn.put(_mailbox_key(user, destination), bytes(record), db=store.mailbox_db)
        if source == "INBOX":
            store._new_mailbox(txn, user, "INBOX")
        return None

    return operation


def subscribe(user: str, name: str, subscribed: bool) -> Operation:
    """Set the mailbox's subscription (IMAP SUBSCRIBE/UNSUBSCRIBE). Outcome: None or
    NoSuchMailbox."""

    def operation(store: MailboxStore, txn: lmdb.Transaction) -> object:
        found = store._find_mailbox(txn, user, name)
        if isinstance(found, Exception):
            return found
        mailbox, fields = found
        fields[7] = int(subscribed)
        store._put_mailbox(txn, user, mailbox, fields)
        return None

    return operation


def sweep_delivered(now: float | None = None, limit: int = 10_000) -> Operation:
    """Drop up to *limit* idempotency records older than DELIVERED_TTL. Outcome: how many."""

    def operation(store: MailboxStore, txn: lmdb.Transaction) -> object:
        return store._sweep_delivered(txn, time.time() if now is None else now, limit)

    return operation
