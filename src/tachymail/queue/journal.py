"""The intake journal: one fdatasync per batch, LMDB written behind it (``[queue] commit =
"journal"``).

Each SMTP worker appends the messages it accepts to a file of its own,
``data_dir/journal/<pid>-<seq>.jnl``, as framed, checksummed records (envelope record and
content). A batch is one ``write`` and one ``fdatasync`` by the journal thread, which
does nothing else (no LMDB put, so no GIL hand-off per operation); the 250s of a batch go
out once its sync has returned, and the next batch starts the moment it has, whatever it
holds: there is no timer. The event loop copies journaled messages into LMDB every few
milliseconds, in one commit with one data sync, off the reply path; each of those commits
also records how far into the journal file it got (the ``journal`` database: file name ->
offset), so the journal and the queue can never disagree about what was applied.

Recovery (:func:`replay_journals`, run by the supervisor before any worker starts and by
every SMTP worker at start) takes each journal file no live process holds (each owner
keeps an exclusive ``flock`` on its files), applies the records after the recorded offset,
and deletes the file. A message that LMDB already holds is never applied twice, even if
delivery has removed it since: replay starts after the offset committed with it. A torn
last record (a crash in the middle of a write) fails its length or checksum and is
ignored: it was never acknowledged, since its batch's sync had not returned.

Delivery learns of a journaled message only once it is in LMDB (:class:`JournalCommitter`
holds back the :class:`~tachymail.queue.notify.Notifier` until then).
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import mmap
import os
import queue
import struct
import threading
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lmdb

from tachymail.lmdbenv import is_storage_exhausted, write_zeros
from tachymail.metrics import m
from tachymail.queue.commit import AnyOperation, GroupCommitter
from tachymail.queue.envelope import Envelope, Recipient, new_queue_id
from tachymail.queue.notify import Notifier
from tachymail.queue.store import Prepared, QueueIdTaken, QueueStore, StorageFull, prepare

log = logging.getLogger(__name__)

#: the journal directory, under data_dir
DIRECTORY = "journal"
SUFFIX = ".jnl"
#: start a new journal file once the current one is this big (the old one is deleted once
#: everything in it is in LMDB)
ROTATE_BYTES = 32 * 1024 * 1024
#: zeros the journal thread keeps written past a file's last record (see
#: JournalCommitter._zero_ahead)
ZERO_AHEAD = 2 * 1024 * 1024
#: journaled content not yet in LMDB beyond which intake answers 452 4.3.1 (LMDB behind)
MAX_UNAPPLIED_BYTES = 256 * 1024 * 1024
#: most journaled messages in one LMDB commit of a replay
APPLY_BATCH = 4096
#: seconds journaled messages wait to be copied into LMDB together (the 250s do not wait
#: for it; delivery does)
APPLY_INTERVAL = 0.005
#: journal batches that start the LMDB commit at once, whatever the interval
APPLY_BATCHES = 64
#: seconds before a failed LMDB commit of journaled messages is tried again
RETRY_DELAY = 1.0
#: seconds between tries of journals a replay could not apply
ORPHAN_RETRY = 2.0

#: record header: magic, payload length, CRC-32 of the payload
_HEADER = struct.Struct(">4sII")
_MAGIC = b"TMJ1"
#: payload header: lengths of the queue id, envelope record, schedule key, content
_FIELDS = struct.Struct(">IIII")
#: the LMDB database of applied offsets (journal file name -> big-endian offset)
_APPLIED_DB = b"journal"
_OFFSET = struct.Struct(">Q")


def encode_record(prepared: Prepared) -> bytes:
    """One framed record of a prepared message (see :func:`read_records`)."""
    key, content, record, schedule = prepared
    payload = b"".join(
        (_FIELDS.pack(len(key), len(record), len(schedule), len(content)), key, record, schedule)
    )
    payload += content
    return _HEADER.pack(_MAGIC, len(payload), zlib.crc32(payload)) + payload


def read_records(data: bytes | mmap.mmap, start: int = 0) -> Iterator[tuple[int, Prepared]]:
    """(offset after the record, prepared message) for every whole, intact record of
    *data* from *start*; stops at the first torn or damaged one (a crash mid-write)."""
    offset = start
    while offset + _HEADER.size <= len(data):
        magic, length, crc = _HEADER.unpack_from(data, offset)
        body = offset + _HEADER.size
        end = body + length
        if magic != _MAGIC or end > len(data) or length < _FIELDS.size:
            break
        payload = data[body:end]  # a copy (of a mapping too): nothing holds on to *data*
        if zlib.crc32(payload) != crc:
            break
        key_len, record_len, schedule_len, content_len = _FIELDS.unpack_from(payload)
        if _FIELDS.size + key_len + record_len + schedule_len + content_len != length:
            break
        at = _FIELDS.size
        key = payload[at : at + key_len]
        at += key_len
        record = payload[at : at + record_len]
        at += record_len
        schedule = payload[at : at + schedule_len]
        at += schedule_len
        yield end, (key, payload[at:], record, schedule)
        offset = end
    if offset < len(data) and data[offset : offset + ZERO_AHEAD].strip(b"\0"):
        # (zeros are the space written ahead of the records: see JournalCommitter._zero_ahead)
        log.warning("journal: %d torn or damaged bytes at the end ignored", len(data) - offset)


def applied_db(store: QueueStore, txn: lmdb.Transaction) -> Any:
    """The queue's database of applied journal offsets (created on first use)."""
    return store.env.open_db(_APPLIED_DB, txn=txn)


def _insert(store: QueueStore, txn: lmdb.Transaction, prepared: Prepared) -> None:
    """Put a journaled message into LMDB. Its id may be taken: by this very message (then
    nothing is added), or by another one (more than 16,384 ids in a millisecond, the
    clock stepped back): the message was acknowledged, so it is queued under a new id."""
    try:
        store.insert_prepared(txn, prepared)
        return
    except QueueIdTaken:
        pass
    key, content, record, _schedule = prepared
    there = txn.get(key, db=store.envelopes)
    if there is not None and bytes(there) == bytes(record):
        return
    envelope = Envelope.from_record(record)
    taken = envelope.id
    while True:
        envelope.id = new_queue_id()
        try:
            store.insert_prepared(txn, prepare(envelope, bytes(content)))
            break
        except QueueIdTaken:
            continue
    log.error("journal: queue id %s was taken by another message; queued as %s", taken, envelope.id)


def replay_journals(store: QueueStore, directory: Path) -> int:
    """Apply every journal file in *directory* that no live process holds, then delete it;
    returns how many messages were applied. Safe to run from several processes at once
    (each file is taken under an exclusive flock, and a file found gone is skipped)."""
    if not directory.is_dir():
        return 0
    applied = 0
    for path in sorted(directory.glob(f"*{SUFFIX}")):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue  # replayed by another process meanwhile
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its owner is alive
            try:
                if os.stat(path).st_ino != os.fstat(fd).st_ino:
                    continue
            except FileNotFoundError:
                continue  # replayed and deleted while we waited for the lock
            try:
                applied += _replay_file(store, path, fd)
            except StorageFull as exc:  # kept for the next try (JournalCommitter retries)
                log.error("journal: %s cannot be applied yet: %s", path, exc)
        finally:
            os.close(fd)
    return applied


def orphans(directory: Path) -> bool:
    """Whether *directory* holds a journal file that no live process holds."""
    for path in directory.glob(f"*{SUFFIX}"):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            continue
        finally:
            os.close(fd)
    return False


def _replay_file(store: QueueStore, path: Path, fd: int) -> int:
    name = path.name.encode()
    raw: bytes | None = None

    def read_offset(store: QueueStore, txn: lmdb.Transaction) -> None:
        # a write transaction: a database handle opened in one stays valid once it commits
        nonlocal raw
        found = txn.get(name, db=applied_db(store, txn))
        raw = None if found is None else bytes(found)

    store.apply([read_offset])
    start = _OFFSET.unpack(raw)[0] if raw else 0
    size = os.fstat(fd).st_size
    # mapped, not read: a journal file may be larger than the memory to spare
    data: bytes | mmap.mmap = mmap.mmap(fd, size, prot=mmap.PROT_READ) if size else b""
    try:
        count = _apply_records(store, name, data, start)
    finally:
        if isinstance(data, mmap.mmap):
            data.close()
    store.env.sync(True)  # the last commit's meta page too, wherever metasync is off
    # The file goes first: a marker without its file is harmless, a file without its
    # marker would be applied again from the start.
    path.unlink()
    _forget(store, [name])
    if count:
        log.warning("journal: %d messages of %s applied to the queue after a crash", count, path)
    return count


def _apply_records(store: QueueStore, name: bytes, data: bytes | mmap.mmap, start: int) -> int:
    """Apply the records of *data* after *start* in commits of APPLY_BATCH, each with the
    offset it reached; how many there were."""
    chunk: list[Prepared] = []
    count = 0

    def commit(end: int) -> None:
        records = list(chunk)

        def operation(store: QueueStore, txn: lmdb.Transaction) -> None:
            for prepared in records:
                _insert(store, txn, prepared)
            txn.put(name, _OFFSET.pack(end), db=applied_db(store, txn))

        store.apply([operation])
        chunk.clear()

    end = start
    for end, prepared in read_records(data, start):
        chunk.append(prepared)
        count += 1
        if len(chunk) >= APPLY_BATCH:
            commit(end)
    if chunk:
        commit(end)
    return count


def _forget(store: QueueStore, names: Sequence[bytes]) -> None:
    def operation(store: QueueStore, txn: lmdb.Transaction) -> None:
        db = applied_db(store, txn)
        for name in names:
            txn.delete(name, db=db)

    store.apply([operation])


@dataclass(slots=True)
class _JournalFile:
    path: Path
    fd: int
    size: int = 0
    #: whether the directory entry is synced (done by the journal thread before its first
    #: sync of this file: a new file's name must survive a power cut too)
    announced: bool = False
    #: how far the file is written, records and zeros (the journal thread's to change)
    written: int = 0


@dataclass(slots=True)
class _Batch:
    """What the journal thread writes in one go, and what the applier then gets."""

    file: _JournalFile
    blob: bytes
    end: int
    records: list[tuple[Prepared, Envelope]] = field(default_factory=list)
    futures: list[asyncio.Future[Any]] = field(default_factory=list)
    content_bytes: int = 0


class JournalCommitter(GroupCommitter):
    """The journal commit mode: a future from :meth:`submit` resolves once the message is
    in a synced journal batch (StorageFull on a full disk or when LMDB is too far behind:
    452 4.3.1; the I/O error otherwise: 451 4.3.0). :meth:`submit_operation` runs the
    operation in the next LMDB commit, after every message journaled before it, and
    resolves once that commit is synced. Delivery hears of a message (the notifier given
    to :meth:`attach_notifier`) once it is in LMDB.

    LMDB is written in the event loop's own thread (py-lmdb releases the GIL for every put:
    a second thread would win it back from the busy loop once per operation) every
    ``APPLY_INTERVAL`` seconds, in one commit with one data sync: *store* should be opened
    with ``metasync=False``, since the journal is the durable copy. A commit's meta page
    is synced by the next commit or by an explicit ``env.sync``, which runs before any
    journal file is deleted and before an operation's future resolves.

    Must be created inside the running event loop it serves; call :meth:`close` once
    :attr:`idle`: the journal file then holds nothing LMDB lacks and is deleted.
    """

    def __init__(
        self,
        store: QueueStore,
        directory: Path,
        *,
        max_batch: int = 512,
        notifier: Notifier | None = None,
    ) -> None:
        super().__init__(store, max_batch=max_batch)
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._seq = 0
        self._file = self._open_file()
        #: earlier files still open (and locked) until LMDB holds all they contain
        self._retired: list[_JournalFile] = []
        self._queued: list[tuple[Prepared, Envelope, asyncio.Future[Any]]] = []
        self._batch: _Batch | None = None
        #: journaled batches (and operations behind them) for the next LMDB commit
        self._to_apply: list[_Batch] = []
        self._operations: list[tuple[AnyOperation, asyncio.Future[Any]]] = []
        self._apply_timer: asyncio.Handle | None = None
        self._apply_soon = False
        self._unapplied_bytes = 0
        #: ids journaled but not yet in LMDB -> recipients a notification waits for
        self._unapplied: dict[str, Sequence[Recipient] | None] = {}
        self.notifier: Notifier | None = None
        self.attach_notifier(notifier)
        #: other processes' journals a replay could not apply (a full disk): tried again
        #: every ORPHAN_RETRY seconds until they are in LMDB
        self._orphan_timer: asyncio.TimerHandle | None = None
        if orphans(directory):
            self._orphan_timer = self._loop.call_later(ORPHAN_RETRY, self._retry_orphans)
        #: set when a damaged journal file can be neither replaced nor cut back
        self._broken: OSError | None = None
        self._writes: queue.SimpleQueue[_Batch | None] = queue.SimpleQueue()
        self._writer = threading.Thread(target=self._write_loop, name="journal", daemon=True)
        self._writer.start()

    def attach_notifier(self, notifier: Notifier | None) -> None:
        """Hold back *notifier*'s news of each message until it is in LMDB."""
        self.notifier = notifier
        if notifier is not None:
            notifier.gate = self._hold_notification

    def _open_file(self) -> _JournalFile:
        self._seq += 1
        path = self.directory / f"{os.getpid()}-{self._seq:06d}{SUFFIX}"
        # no O_APPEND: records go over the zeros written ahead of them, with pwrite
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)  # held until this process ends: replay leaves it be
        return _JournalFile(path, fd)

    # --- the journal: what a 250 waits for ----------------------------------------------

    def submit(self, envelope: Envelope, content: bytes) -> asyncio.Future[None]:
        future: asyncio.Future[None] = self._loop.create_future()
        if self._unapplied_bytes > MAX_UNAPPLIED_BYTES:
            future.set_exception(StorageFull("the queue is behind its journal"))
            return future
        if self._broken is not None:
            future.set_exception(self._broken)
            return future
        self._queued.append((prepare(envelope, content), envelope, future))
        if self._batch is None:
            self._start_batch()
        return future

    def _start_batch(self) -> None:
        taken = self._queued[: self.max_batch]
        del self._queued[: self.max_batch]
        if self._file.size >= ROTATE_BYTES:
            self._retired.append(self._file)
            self._file = self._open_file()
        batch = _Batch(self._file, b"", 0)
        blobs = []
        for prepared, envelope, future in taken:
            blobs.append(encode_record(prepared))
            batch.records.append((prepared, envelope))
            batch.futures.append(future)
            batch.content_bytes += len(prepared[1])
        batch.blob = b"".join(blobs)
        self._file.size += len(batch.blob)
        batch.end = self._file.size
        self._batch = batch
        self._started = time.perf_counter()
        self._writes.put(batch)

    def _written(self, batch: _Batch, error: BaseException | None) -> None:
        """In the loop: the journal thread is done with *batch*; answer its clients and
        start the next batch at once with whatever arrived meanwhile."""
        self._batch = None
        elapsed = time.perf_counter() - self._started
        self.last_commit = (len(batch.futures), elapsed)
        if error is None:
            self.commits += 1
            self.messages += len(batch.futures)
            if self.observe:
                m.commit_batch_size.observe(len(batch.futures))
                m.commit_duration.observe(elapsed)
            for prepared, _envelope in batch.records:
                self._unapplied[prepared[0].decode()] = None
            self._unapplied_bytes += batch.content_bytes
            self._to_apply.append(batch)
            for future in batch.futures:
                if not future.cancelled():
                    future.set_result(None)
        else:
            log.error("journal write of %d messages failed: %s", len(batch.futures), error)
            reply = StorageFull(str(error)) if is_storage_exhausted(error) else error
            for future in batch.futures:
                if not future.cancelled():
                    future.set_exception(reply)
            self._set_aside(batch)
        if self._queued:
            self._start_batch()
        self._schedule_apply(soon=len(self._to_apply) >= APPLY_BATCHES)

    def _set_aside(self, batch: _Batch) -> None:
        """After a failed write or sync: the file may hold part of *batch*, and replay
        stops at the first damaged record, so later batches go to a new file (or, if none
        can be made, the file is cut back to where the batch began)."""
        try:
            self._retired.append(self._file)
            self._file = self._open_file()
            return
        except OSError as exc:
            self._retired.pop()
            log.error("journal: no new journal file (%s); cutting back the current one", exc)
        try:
            os.ftruncate(batch.file.fd, batch.end - len(batch.blob))
            # the journal thread waits for the next batch meanwhile: its zeros went too
            batch.file.size = batch.file.written = batch.end - len(batch.blob)
        except OSError as exc:  # nothing more can be journaled safely here
            log.critical(
                "journal: %s cannot be repaired (%s); intake refused", batch.file.path, exc
            )
            self._broken = exc

    # --- LMDB: behind the replies -------------------------------------------------------

    def submit_operation(self, operation: AnyOperation) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = self._loop.create_future()
        # committed at once, with every message already acknowledged (see _apply)
        self._operations.append((operation, future))
        self._schedule_apply(soon=True)
        return future

    def _schedule_apply(self, soon: bool) -> None:
        """Commit what waits for LMDB after APPLY_INTERVAL, or (*soon*) at the loop's next
        turn."""
        if not (self._to_apply or self._operations):
            return
        if self._apply_timer is not None:
            if not soon or self._apply_soon:
                return
            self._apply_timer.cancel()
        self._apply_soon = soon
        if soon:
            self._apply_timer = self._loop.call_soon(self._apply)
        else:
            self._apply_timer = self._loop.call_later(APPLY_INTERVAL, self._apply)

    def _apply(self) -> None:
        """One LMDB commit of every journaled batch not yet applied, then the operations
        waiting (their futures resolve once the commit is synced). An operation never
        overtakes a message whose 250 went out: that message was queued here first."""
        self._apply_timer = None
        if not (self._to_apply or self._operations):
            return
        batches, self._to_apply = self._to_apply, []
        operations, self._operations = self._operations, []
        offsets: dict[bytes, int] = {}
        for batch in batches:
            name = batch.file.path.name.encode()
            offsets[name] = max(offsets.get(name, 0), batch.end)

        def messages(store: QueueStore, txn: lmdb.Transaction) -> None:
            db = applied_db(store, txn)
            for batch in batches:
                for prepared, _envelope in batch.records:
                    _insert(store, txn, prepared)
            for name, end in offsets.items():
                txn.put(name, _OFFSET.pack(end), db=db)

        try:
            outcomes = self.store.apply([messages, *(op for op, _ in operations)])
            if operations or self._done_files(batches):
                self.store.env.sync(True)  # the meta page too: see the class docstring
        except Exception as exc:  # StorageFull or an LMDB error: the journal keeps them
            log.error("journal: applying %d batches to the queue failed: %s", len(batches), exc)
            if self.observe:
                m.commit_failures.inc()
            self._to_apply = batches + self._to_apply
            for _operation, future in operations:
                if not future.cancelled():
                    future.set_exception(exc)
            self._apply_soon = False
            self._apply_timer = self._loop.call_later(RETRY_DELAY, self._apply)
            return
        for (_operation, future), outcome in zip(operations, outcomes[1:], strict=True):
            if future.cancelled():
                continue
            if isinstance(outcome, Exception):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)
        notifier = self.notifier
        for batch in batches:
            self._unapplied_bytes -= batch.content_bytes
            for prepared, _envelope in batch.records:
                recipients = self._unapplied.pop(prepared[0].decode(), None)
                if recipients is not None and notifier is not None:
                    notifier.send(prepared[0].decode(), recipients)
        done = self._done_files(batches)
        if done:
            for file in done:  # the file first: a marker without its file is harmless
                file.path.unlink(missing_ok=True)
                os.close(file.fd)
                self._retired.remove(file)
            _forget(self.store, [f.path.name.encode() for f in done])

    def _retry_orphans(self) -> None:
        self._orphan_timer = None
        try:
            replay_journals(self.store, self.directory)
        except Exception as exc:  # an LMDB error: logged, tried again later
            log.error("journal: replay failed: %s", exc)
        if orphans(self.directory):
            self._orphan_timer = self._loop.call_later(ORPHAN_RETRY, self._retry_orphans)

    def _done_files(self, batches: list[_Batch]) -> list[_JournalFile]:
        """Retired files all of whose batches are in LMDB once *batches* are."""
        if self._batch is not None or self._to_apply:
            waiting = {id(self._batch.file) if self._batch else 0}
            waiting |= {id(b.file) for b in self._to_apply}
        else:
            waiting = set()
        return [f for f in self._retired if id(f) not in waiting]

    def _hold_notification(self, queue_id: str, recipients: Sequence[Recipient]) -> bool:
        """The notifier's gate: keep the news of a message not yet in LMDB until it is."""
        if queue_id in self._unapplied:
            self._unapplied[queue_id] = recipients
            return True
        return False

    @property
    def idle(self) -> bool:
        return (
            self._batch is None
            and not self._queued
            and not self._to_apply
            and not self._operations
            and not self._unapplied
        )

    def close(self) -> None:
        """Stop the journal thread; once :attr:`idle`, the journal files are deleted too."""
        clean = self.idle
        if self._apply_timer is not None:
            self._apply_timer.cancel()
        if self._orphan_timer is not None:
            self._orphan_timer.cancel()
        self._writes.put(None)
        self._writer.join()
        if self.notifier is not None:
            self.notifier.gate = None
        files = [*self._retired, self._file]
        if clean:
            self.store.env.sync(True)  # LMDB's last commit durable before its journal goes
        for file in files:
            if clean:
                file.path.unlink(missing_ok=True)
            os.close(file.fd)  # drops the flock: a later replay takes what is left
        if clean:
            _forget(self.store, [f.path.name.encode() for f in files])

    # --- the journal thread: write and fdatasync, nothing else --------------------------

    def _write_loop(self) -> None:
        while True:
            batch = self._writes.get()
            if batch is None:
                return
            error: BaseException | None = None
            file = batch.file
            try:
                if not file.announced:
                    _sync_directory(self.directory)
                    file.announced = True
                view = memoryview(batch.blob)
                offset = batch.end - len(view)
                while view:
                    written = os.pwrite(file.fd, view, offset)
                    view, offset = view[written:], offset + written
                os.fdatasync(file.fd)
                file.written = max(file.written, batch.end)
            except OSError as exc:
                error = exc
            try:
                self._loop.call_soon_threadsafe(self._written, batch, error)
            except RuntimeError:  # the loop is closed: nobody waits any more
                return
            if error is None:
                self._zero_ahead(file, batch.end)

    def _zero_ahead(self, file: _JournalFile, end: int) -> None:
        """Keep ZERO_AHEAD bytes of zeros written past the records of *file* (in the journal
        thread, after the batch ending at *end* was answered; the next batch waits for it).

        A record appended past the end of the file changes its size, so its fdatasync also
        waits for the file system's journal; written over zeros already on disk, it syncs
        as plain data, as the queue's own headroom does (tachymail.lmdbenv.GrowingMap).
        The zeros are not synced here: the next batch's fdatasync takes them, and the new
        size, once per ZERO_AHEAD / 2. Replay stops at them like at any record that does
        not check out. A file about to be rotated gets none, nor does a file system short
        of space (``write_zeros``); a failure only costs the speed-up."""
        if file.written - end >= ZERO_AHEAD // 2 or end >= ROTATE_BYTES:
            return
        target = end + ZERO_AHEAD
        try:
            if write_zeros(file.fd, max(file.written, end), target):
                file.written = target
        except OSError as exc:
            log.info("journal: no zeros written ahead in %s (%s)", file.path.name, exc)


def _sync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def journal_directory(data_path: Path) -> Path:
    """Where the SMTP workers keep their journals."""
    return Path(data_path) / DIRECTORY


__all__ = [
    "JournalCommitter",
    "encode_record",
    "journal_directory",
    "read_records",
    "replay_journals",
]
