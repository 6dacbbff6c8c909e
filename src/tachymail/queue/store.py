"""The LMDB queue store: envelopes, contents and the delivery schedule, in one environment.

Synchronous on purpose: the group committer calls it from its own thread, the
queue commands call it directly. Each process opens its own ``QueueStore``
after fork (an LMDB environment must not cross a fork).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import struct
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import lmdb

from tachymail.lmdbenv import HEADROOM, GrowingMap, adopting_growth, open_store

# moved to lmdbenv (the mailbox store shares it); still exported from here
from tachymail.lmdbenv import is_storage_exhausted as is_storage_exhausted
from tachymail.queue.envelope import Envelope

log = logging.getLogger(__name__)

MiB = 1024 * 1024
GiB = 1024 * MiB

_DUE = struct.Struct(">Q")


#: the file of spare disk space kept beside data.mdb (see QueueStore.ensure_reserve)
RESERVE_FILE = "reserve"


class StorageFull(Exception):
    """The queue cannot take the message: map at its maximum or disk full (452 4.3.1)."""


class QueueIdTaken(Exception):
    """A message with this queue id is already stored; nothing was written (451 4.3.0)."""


class QueueStore:
    """One LMDB environment under ``directory`` holding the whole queue.

    ``map_size`` is where the memory map starts; it doubles on demand up to
    ``max_map_size``. Commits are synchronous (``sync=True``): when
    :meth:`apply` returns, the batch is on disk (see ``metasync`` for the one exception).
    """

    def __init__(
        self,
        directory: Path,
        *,
        map_size: int = 256 * MiB,
        max_map_size: int = 64 * GiB,
        readonly: bool = False,
        metasync: bool = True,
        reserve: int = 0,
    ) -> None:
        self.directory = Path(directory)
        self.max_map_size = max(max_map_size, map_size)
        #: bytes of disk kept free in RESERVE_FILE for commits that free space (0: none)
        self.reserve = reserve
        #: bytes of reserve file this store deleted to let a commit through (0: none)
        self.reserve_spent = 0
        self.env = open_store(
            self.directory,
            what="queue",
            map_size=map_size,
            max_dbs=8,
            readonly=readonly,
            # False only for delivery workers: each commit then syncs once, not twice; a
            # power cut may undo their last commit (never an acknowledged message: intake
            # processes keep both syncs), and the message is simply delivered again.
            metasync=metasync,
        )
        self._map = GrowingMap(
            self.env,
            self.max_map_size,
            name="queue",
            full=StorageFull,
            no_room="no room for the queue",
            # the queue grows by every message it holds: see GrowingMap._keep_headroom
            headroom=0 if readonly else HEADROOM,
        )
        # through the map: another process may have grown it since lmdb.open read its size
        if not readonly:
            self._map.write(self._open_dbs)
        else:
            adopting_growth(self.env, lambda: self._open_dbs(None, create=False))

    def _open_dbs(self, txn: lmdb.Transaction | None, create: bool = True) -> None:
        self.envelopes = self.env.open_db(b"envelopes", txn=txn, create=create)
        self.contents = self.env.open_db(b"contents", txn=txn, create=create)
        # key: due time in milliseconds (big-endian) + queue id; the delivery scheduler
        # walks it in order.
        self.schedule = self.env.open_db(b"schedule", txn=txn, create=create)
        # the delivery events' outbox (tachymail.queue.events); a read-only look at a queue
        # made before it existed finds none: an empty one stands in (no handle at all)
        try:
            self.events: Any = self.env.open_db(b"events", txn=txn, create=create)
        except lmdb.NotFoundError:
            self.events = None

    @staticmethod
    def schedule_key(due_ms: int, queue_id: str) -> bytes:
        return _DUE.pack(due_ms) + queue_id.encode()

    def apply(
        self, operations: Sequence[Operation], *, frees_space: bool = False
    ) -> list[Exception | None]:
        """Run every operation in one synced write transaction; returns each one's outcome.

        An operation may refuse on its own by returning an exception (having written
        nothing, e.g. QueueIdTaken): the others are committed all the same.

        Raises ``StorageFull`` when the map cannot grow further or the disk, the quota or
        the file size limit is reached (however LMDB reports it); nothing of the batch is
        stored then, the transaction is aborted and the queue stays usable: the next
        commit succeeds once there is room. With *frees_space* (deleting messages), a
        commit that finds the disk full deletes the reserve file and tries once more.
        """
        return self._map.write(
            lambda txn: [operation(self, txn) for operation in operations],
            self._use_reserve if frees_space else None,
        )

    def settle(self) -> None:
        """One tiny commit after a deletion, so the very next commit can reuse its pages.

        LMDB keeps the last two snapshots: pages freed by commit N are reused from commit
        N + 2 on. On a full disk that is the difference between a second
        ``tachymail queue delete`` that finds room and one that does not. Best effort:
        StorageFull is ignored.
        """

        def touch(store: QueueStore, txn: lmdb.Transaction) -> None:
            # No schedule key is one byte long, and this one never outlives the transaction.
            txn.put(b"\0", b"", db=store.schedule)
            txn.delete(b"\0", db=store.schedule)

        with contextlib.suppress(StorageFull):
            self.apply([touch], frees_space=True)

    # --- the reserve: spare disk space for commits that free space ---------------------

    def ensure_reserve(self) -> bool:
        """Make sure RESERVE_FILE holds ``reserve`` bytes of real disk blocks.

        LMDB copies every page it changes, so even deleting a message needs free pages: on
        a full disk, only the space this file gives back lets ``tachymail queue delete``
        commit. Made only while the filesystem has four times that much free, so that it
        never takes the last room intake needs. Returns whether the reserve is in place.
        """
        if not self.reserve:
            return False
        path = self.directory / RESERVE_FILE
        with contextlib.suppress(OSError):
            if path.stat().st_size >= self.reserve:
                return True
        try:
            fs = os.statvfs(self.directory)
            if fs.f_bavail * fs.f_frsize < 4 * self.reserve:
                log.warning(
                    "queue: no room for the %d MiB reserve in %s yet", self.reserve // MiB, path
                )
                return False
            _write_reserve(path, self.reserve)
        except OSError as exc:
            log.warning("queue: cannot make the reserve %s: %s", path, exc)
            return False
        log.info("queue: %d MiB of disk kept in reserve in %s", self.reserve // MiB, path)
        return True

    def _use_reserve(self) -> bool:
        """Delete the reserve file so that a commit freeing space can run; False: none."""
        if not self.reserve:
            return False
        path = self.directory / RESERVE_FILE
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            return False
        self.reserve_spent += size
        log.warning("queue: disk full; the reserve file was deleted to let a deletion commit")
        return True

    # --- operations inside a write transaction --------------------------------------------

    def insert(self, txn: lmdb.Transaction, envelope: Envelope, content: bytes) -> None:
        """A new message: content, envelope, and its place in the schedule."""
        self.insert_prepared(txn, prepare(envelope, content))

    def insert_prepared(self, txn: lmdb.Transaction, prepared: Prepared) -> None:
        """Store a prepared new message; raises QueueIdTaken, having written nothing, when
        its id is in use (a message is never overwritten)."""
        key, content, record, schedule = prepared
        if not txn.put(key, content, db=self.contents, overwrite=False):
            raise QueueIdTaken(f"queue id {key.decode()} is already in use")
        if not txn.put(key, record, db=self.envelopes, overwrite=False):
            txn.delete(key, db=self.contents)  # ours, just written: leave nothing behind
            raise QueueIdTaken(f"queue id {key.decode()} is already in use")
        if schedule:
            txn.put(schedule, b"", db=self.schedule)

    def load(self, txn: lmdb.Transaction, queue_id: str) -> Envelope | None:
        raw = txn.get(queue_id.encode(), db=self.envelopes)
        return None if raw is None else Envelope.from_record(raw)

    def save(self, txn: lmdb.Transaction, envelope: Envelope) -> None:
        """Write back a changed envelope, moving it in the schedule; remove it when done.

        A message whose recipients are all final (and that is not held) leaves the queue
        with its content.
        """
        key = envelope.id.encode()
        if envelope.due:
            txn.delete(self.schedule_key(_ms(envelope.due), envelope.id), db=self.schedule)
        if not envelope.pending():
            txn.delete(key, db=self.envelopes)
            txn.delete(key, db=self.contents)
            return
        envelope.due = envelope.next_due()
        txn.put(key, envelope.to_record(), db=self.envelopes)
        if envelope.due:
            txn.put(self.schedule_key(_ms(envelope.due), envelope.id), b"", db=self.schedule)

    def discard_if_unchanged(
        self, txn: lmdb.Transaction, queue_id: str, raw: bytes, due: float
    ) -> bool:
        """Remove a finished message if its record is still *raw* (due at *due*).

        Nothing is decoded: the delivery worker read *raw* before its attempt, and an
        unchanged record means nobody (a queue command, another worker) touched it since.
        """
        key = queue_id.encode()
        if txn.get(key, db=self.envelopes) != raw:
            return False
        if due:
            txn.delete(self.schedule_key(_ms(due), queue_id), db=self.schedule)
        txn.delete(key, db=self.envelopes)
        txn.delete(key, db=self.contents)
        return True

    def content_in(self, txn: lmdb.Transaction, queue_id: str) -> bytes | None:
        raw = txn.get(queue_id.encode(), db=self.contents)
        return None if raw is None else bytes(raw)

    def remove(self, txn: lmdb.Transaction, queue_id: str) -> bool:
        envelope = self.load(txn, queue_id)
        if envelope is None:
            return False
        if envelope.due:
            txn.delete(self.schedule_key(_ms(envelope.due), envelope.id), db=self.schedule)
        txn.delete(queue_id.encode(), db=self.envelopes)
        txn.delete(queue_id.encode(), db=self.contents)
        return True

    # --- reading ----------------------------------------------------------------------------

    def due_ids(self, now: float, after: bytes = b"", limit: int = 1000) -> list[tuple[bytes, str]]:
        """Up to *limit* (schedule key, queue id) due by *now*, in due order, after *after*."""
        found: list[tuple[bytes, str]] = []
        horizon = _DUE.pack(_ms(now) + 1)
        with self._read() as txn:
            cursor = txn.cursor(db=self.schedule)
            if not (cursor.set_range(after + b"\0") if after else cursor.first()):
                return found
            for raw in cursor.iternext(values=False):
                key = bytes(raw)
                if key >= horizon or len(found) >= limit:
                    break
                found.append((key, key[_DUE.size :].decode()))
        return found

    def snapshots(self, queue_ids: Sequence[str]) -> list[tuple[Envelope, bytes, bytes] | None]:
        """Envelope, content and the envelope's raw record of each message, all read in one
        transaction (None: the message is gone)."""
        out: list[tuple[Envelope, bytes, bytes] | None] = []
        if not queue_ids:
            return out
        with self._read() as txn:
            for queue_id in queue_ids:
                key = queue_id.encode()
                raw = txn.get(key, db=self.envelopes)
                content = txn.get(key, db=self.contents)
                if raw is None or content is None:
                    out.append(None)
                else:
                    out.append((Envelope.from_record(raw), bytes(content), bytes(raw)))
        return out

    def _read(self) -> lmdb.Transaction:
        return adopting_growth(self.env, self.env.begin)

    def envelope(self, queue_id: str) -> Envelope | None:
        with self._read() as txn:
            raw = txn.get(queue_id.encode(), db=self.envelopes)
        return None if raw is None else Envelope.from_record(raw)

    def content(self, queue_id: str) -> bytes | None:
        with self._read() as txn:
            raw = txn.get(queue_id.encode(), db=self.contents)
        return None if raw is None else bytes(raw)

    def iter_envelopes(self, after: str = "") -> Iterator[Envelope]:
        """Every queued envelope, oldest first (ids sort by arrival), in one read snapshot;
        with *after*, only those whose id sorts after it (paging)."""
        with self._read() as txn:
            cursor = txn.cursor(db=self.envelopes)
            # the least key above *after*; iternext then starts where the cursor stands
            if after and not cursor.set_range(after.encode() + b"\0"):
                return
            for _key, raw in cursor.iternext():
                yield Envelope.from_record(raw)

    def ids(self) -> list[str]:
        """Every queued message's id, oldest first, from one read snapshot."""
        with self._read() as txn:
            cursor = txn.cursor(db=self.envelopes)
            return [bytes(key).decode() for key in cursor.iternext(values=False)]

    def count(self) -> int:
        with self._read() as txn:
            entries: int = txn.stat(self.envelopes)["entries"]
        return entries

    def close(self) -> None:
        self._map.close()
        self.env.close()


#: a change inside a write transaction; it may return an exception to refuse on its own,
#: having written nothing (the rest of the batch commits)
Operation = Callable[["QueueStore", lmdb.Transaction], Exception | None]

#: a new message ready to store: key, content, envelope record, schedule key (or b"")
Prepared = tuple[bytes, bytes, bytes, bytes]


def prepare(envelope: Envelope, content: bytes) -> Prepared:
    """Everything a new message's insertion writes, computed before the transaction."""
    envelope.due = envelope.next_due()
    schedule = QueueStore.schedule_key(_ms(envelope.due), envelope.id) if envelope.due else b""
    return envelope.id.encode(), content, envelope.to_record(), schedule


def put_message(envelope: Envelope, content: bytes) -> Operation:
    """The operation that stores a newly accepted message.

    The record is encoded here, in the caller's thread, not in the commit thread: there
    every Python step competes for the GIL with the busy event loop, and each forced
    switch stretches the commit that every waiting client waits for.
    """
    prepared = prepare(envelope, content)

    def operation(store: QueueStore, txn: lmdb.Transaction) -> Exception | None:
        try:
            store.insert_prepared(txn, prepared)
        except QueueIdTaken as exc:  # refused alone: the rest of the group commit goes on
            log.error("message refused, nothing overwritten: %s", exc)
            return exc
        return None

    return operation


def _ms(when: float) -> int:
    return int(when * 1000)


def _write_reserve(path: Path, size: int) -> None:
    """Allocate *size* bytes of real blocks at *path*, atomically (a temporary file first)."""
    partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open(partial, "wb") as file:
            try:
                os.posix_fallocate(file.fileno(), 0, size)
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                chunk = bytes(MiB)  # no fallocate here: zeros take the blocks as well
                for offset in range(0, size, MiB):
                    file.write(chunk[: size - offset])
            file.flush()
            os.fsync(file.fileno())
        os.replace(partial, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()
