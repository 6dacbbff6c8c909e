"""The LMDB queue store: envelopes, contents and the delivery schedule, in one environment.

Synchronous on purpose: the group committer calls it from its own thread, the
queue commands call it directly. Each process opens its own ``QueueStore``
after fork (an LMDB environment must not cross a fork).
"""

from __future__ import annotations

import errno
import logging
import struct
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import lmdb

from tachymail.queue.envelope import Envelope

log = logging.getLogger(__name__)

MiB = 1024 * 1024
GiB = 1024 * MiB

_DUE = struct.Struct(">Q")


class StorageFull(Exception):
    """The queue cannot take the message: map at its maximum or disk full (452 4.3.1)."""


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
    ) -> None:
        self.directory = Path(directory)
        self.max_map_size = max(max_map_size, map_size)
        if not readonly:
            self.directory.mkdir(parents=True, exist_ok=True)
        elif not (self.directory / "data.mdb").exists():
            raise FileNotFoundError(f"no queue at {self.directory} (wrong --data-dir?)")
        self.env = lmdb.open(
            str(self.directory),
            map_size=map_size,
            max_dbs=4,
            readonly=readonly,
            sync=True,
            # False only for delivery workers: each commit then syncs once, not twice; a
            # power cut may undo their last commit (never an acknowledged message: intake
            # processes keep both syncs), and the message is simply delivered again.
            metasync=metasync,
            max_readers=512,
            readahead=False,  # random access to envelopes; let the kernel not prefetch
        )
        if not readonly:
            with self.env.begin(write=True) as txn:
                self._open_dbs(txn)
        else:
            self._open_dbs(None, create=False)
        # Growing the map must not race a write transaction of this process.
        self._resize_lock = threading.Lock()

    def _open_dbs(self, txn: lmdb.Transaction | None, create: bool = True) -> None:
        self.envelopes = self.env.open_db(b"envelopes", txn=txn, create=create)
        self.contents = self.env.open_db(b"contents", txn=txn, create=create)
        # key: due time in milliseconds (big-endian) + queue id; the delivery scheduler
        # walks it in order.
        self.schedule = self.env.open_db(b"schedule", txn=txn, create=create)

    @staticmethod
    def schedule_key(due_ms: int, queue_id: str) -> bytes:
        return _DUE.pack(due_ms) + queue_id.encode()

    def apply(self, operations: Sequence[Operation]) -> None:
        """Run every operation in one synced write transaction.

        Raises ``StorageFull`` when the map cannot grow further or the disk is
        full; nothing of the batch is stored then, and the queue is unharmed.
        """
        with self._resize_lock:
            while True:
                try:
                    with self.env.begin(write=True) as txn:
                        for operation in operations:
                            operation(self, txn)
                    return
                except lmdb.MapFullError:
                    self._grow()
                except lmdb.MapResizedError:
                    self.env.set_mapsize(0)  # another process grew the map: adopt its size
                except lmdb.Error as exc:
                    if _is_disk_full(exc):
                        raise StorageFull(f"disk full: {exc}") from exc
                    raise

    # --- operations inside a write transaction --------------------------------------------

    def insert(self, txn: lmdb.Transaction, envelope: Envelope, content: bytes) -> None:
        """A new message: content, envelope, and its place in the schedule."""
        self.insert_prepared(txn, prepare(envelope, content))

    def insert_prepared(self, txn: lmdb.Transaction, prepared: Prepared) -> None:
        key, content, record, schedule = prepared
        txn.put(key, content, db=self.contents, overwrite=False)
        txn.put(key, record, db=self.envelopes, overwrite=False)
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

    def _grow(self) -> None:
        current = self.env.info()["map_size"]
        if current >= self.max_map_size:
            raise StorageFull(f"queue map is at its maximum size ({current // MiB} MiB)")
        new = min(current * 2, self.max_map_size)
        log.info("growing the queue map from %d MiB to %d MiB", current // MiB, new // MiB)
        self.env.set_mapsize(new)

    def _read(self) -> lmdb.Transaction:
        try:
            return self.env.begin(buffers=False)
        except lmdb.MapResizedError:
            self.env.set_mapsize(0)
            return self.env.begin(buffers=False)

    def envelope(self, queue_id: str) -> Envelope | None:
        with self._read() as txn:
            raw = txn.get(queue_id.encode(), db=self.envelopes)
        return None if raw is None else Envelope.from_record(raw)

    def content(self, queue_id: str) -> bytes | None:
        with self._read() as txn:
            raw = txn.get(queue_id.encode(), db=self.contents)
        return None if raw is None else bytes(raw)

    def iter_envelopes(self) -> Iterator[Envelope]:
        """Every queued envelope, oldest first (ids sort by arrival), in one read snapshot."""
        with self._read() as txn:
            for _key, raw in txn.cursor(db=self.envelopes):
                yield Envelope.from_record(raw)

    def count(self) -> int:
        with self._read() as txn:
            entries: int = txn.stat(self.envelopes)["entries"]
        return entries

    def close(self) -> None:
        self.env.close()


Operation = Callable[["QueueStore", lmdb.Transaction], None]

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

    def operation(store: QueueStore, txn: lmdb.Transaction) -> None:
        store.insert_prepared(txn, prepared)

    return operation


def _ms(when: float) -> int:
    return int(when * 1000)


def _is_disk_full(exc: lmdb.Error) -> bool:
    text = str(exc)
    return "No space left" in text or f"[Errno {errno.ENOSPC}]" in text or "ENOSPC" in text
