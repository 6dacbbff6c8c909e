"""LMDB environments beside the queue: opening them so that a full disk cannot kill a worker.

LMDB maps its lock file (the reader table) into memory. The file is sparse, so the first
write to a page of it allocates a block; on a full filesystem that write is a SIGBUS that
kills the process, not an error. Allocating the lock file's blocks when the environment is
opened (the supervisor opens every environment before it starts a worker) moves that
failure to start-up, where it is an ``OSError``, and a worker that opens it later on a full
disk finds its blocks already there.

The queue and the mailbox store open their environments with :func:`open_store` and
write through :class:`GrowingMap`, which grows the map on demand and turns every way
LMDB says "no room" into the store's own StorageFull.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import lmdb

log = logging.getLogger(__name__)

# errno values that mean "no room": LMDB reports a short write as EIO.
_EXHAUSTED = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO})
_EXHAUSTED_TEXT = tuple(os.strerror(code) for code in _EXHAUSTED)

#: map of the small, unsynced side stores (AUTH failure counts, address-probe results)
SIDE_MAP_SIZE = 64 * 1024 * 1024
_MiB = 1024 * 1024

_T = TypeVar("_T")

#: zeroed space a growing store keeps written past its data (see GrowingMap)
HEADROOM = 4 * _MiB
#: ... while commits grow the file by less than this on average: writing zeros costs about
#: 2.7 ms per MiB here (written, then synced), a commit extending the file about 75 us more
#: than one writing in place, so bigger commits gain nothing from it
SMALL_COMMIT = 24 * 1024
#: commits between two looks at the file (``env.info()`` alone is about 10k instructions, 3%
#: of an intake message's; 16 small commits use at most a quarter of the headroom)
HEADROOM_EVERY = 16
#: ... and while the file system keeps this much free besides
HEADROOM_MIN_FREE = 256 * _MiB
#: seconds before a store whose zeroing failed tries again
HEADROOM_RETRY = 60.0
_ZEROS = bytes(_MiB)


def write_zeros(fd: int, start: int, end: int) -> bool:
    """Write zeros over ``[start, end)`` of the file *fd* (not synced), unless that would
    leave its file system less than ``HEADROOM_MIN_FREE``: then False, nothing written.
    Raises OSError. Zeros written ahead of a growing file (the queue's headroom, the intake
    journal's) let later writes land in place: their syncs are then plain data writes,
    not also a file-system journal commit for a longer file."""
    fs = os.fstatvfs(fd)
    if fs.f_bavail * fs.f_frsize < HEADROOM_MIN_FREE + end - start:
        return False
    zeros = memoryview(_ZEROS)
    for offset in range(start, end, len(zeros)):
        os.pwrite(fd, zeros[: end - offset], offset)
    return True


def allocate_lock_file(directory: Path) -> None:
    """Give ``directory/lock.mdb`` real blocks for its whole length (see the module doc).

    Call it after opening the environment in this process. It works on LMDB's own
    descriptor of the file, found in /proc/self/fd: opening and closing a second descriptor
    would drop this process's fcntl locks on the file (POSIX releases them on any close),
    and the next process to open the environment would then take itself for the first one
    and reset the lock file under the live writers. A full disk is logged, not raised."""
    lock = os.path.realpath(directory / "lock.mdb")
    try:
        descriptors = os.listdir("/proc/self/fd")
    except OSError:
        return  # no /proc: the lock file stays sparse
    for name in descriptors:
        try:
            if os.readlink(f"/proc/self/fd/{name}") != lock:
                continue
            fd = int(name)
            os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.EBADF):
                continue  # a descriptor that closed while we looked
            log.warning("could not allocate %s (%s): a full disk may stop this process", lock, exc)
        return


def is_storage_exhausted(exc: BaseException) -> bool:
    """Whether *exc* says the storage has no room: a full map, disk or quota, a file over
    its size limit, or a short write (which LMDB reports as EIO)."""
    if isinstance(exc, lmdb.MapFullError | lmdb.DiskError):
        return True
    if isinstance(exc, OSError):
        return exc.errno in _EXHAUSTED
    if isinstance(exc, lmdb.Error):
        if getattr(exc, "code", None) in _EXHAUSTED:
            return True
        text = str(exc)  # older py-lmdb builds keep the errno only in the message
        return "ENOSPC" in text or any(reason in text for reason in _EXHAUSTED_TEXT)
    return False


def open_store(
    directory: Path,
    *,
    what: str,
    map_size: int,
    max_dbs: int,
    readonly: bool = False,
    metasync: bool = True,
) -> lmdb.Environment:
    """Open (creating it unless *readonly*) a synced store's environment: the queue's, the
    mailbox store's. Random access (no readahead), 512 readers for every process of the
    node, and the lock file's blocks allocated (see the module doc). Raises
    FileNotFoundError "no <what> at <directory>" when *readonly* finds none."""
    if not readonly:
        directory.mkdir(parents=True, exist_ok=True)
    elif not (directory / "data.mdb").exists():
        raise FileNotFoundError(f"no {what} at {directory} (wrong --data-dir?)")
    env = lmdb.open(
        str(directory),
        map_size=map_size,
        max_dbs=max_dbs,
        readonly=readonly,
        sync=True,
        metasync=metasync,
        max_readers=512,
        readahead=False,  # random access to records; let the kernel not prefetch
    )
    if not readonly:
        allocate_lock_file(directory)
    return env


def adopting_growth(env: lmdb.Environment, call: Callable[[], _T]) -> _T:
    """*call*'s result, made again after adopting the map size another process grew to
    (a transaction begun on the old size raises MapResizedError): the readers' way in,
    and a read-only open's."""
    while True:
        try:
            return call()
        except lmdb.MapResizedError:
            env.set_mapsize(0)  # 0: take the size the other process wrote in the meta page


class GrowingMap:
    """Write transactions on an environment whose memory map doubles on demand up to
    *max_map_size*, shared by the queue and the mailbox store.

    *name* names the store in log lines and errors ("queue map is at its maximum size");
    *full* is the store's own exception for "no room", raised with *no_room* and the
    cause: a map at its maximum, or a disk, quota or file size limit reached however
    LMDB reports it.
    """

    def __init__(
        self,
        env: lmdb.Environment,
        max_map_size: int,
        *,
        name: str,
        full: type[Exception],
        no_room: str,
        headroom: int = 0,
    ) -> None:
        self.env = env
        self.max_map_size = max_map_size
        self.name = name
        self.full = full
        self.no_room = no_room
        # Growing the map must not race a write transaction of this process.
        self._lock = threading.Lock()
        #: zeroed bytes to keep past the data while commits are small (0: none; see
        #: _keep_headroom)
        self.headroom = headroom
        self._data = Path(env.path()) / "data.mdb"
        self._page = int(env.stat()["psize"])
        self._fd: int | None = None
        self._commits = 0
        self._last = (-1, 0)  # (last transaction id, data's end) at the last look
        self._zeroed = 0  # where the file ends, as last seen
        self._retry_at = 0.0

    def write(
        self, work: Callable[[lmdb.Transaction], _T], make_room: Callable[[], bool] | None = None
    ) -> _T:
        """*work*'s result, run in one write transaction committed (synced, when the
        environment is) before it returns; run again from the start after the map grew or
        another process's growth was adopted, so *work* must only write through its txn.

        Raises *full* when there is no room: nothing of *work* is stored, the transaction
        is aborted and the environment stays usable. *make_room*, when given, is tried
        first on a full disk; True: it freed some, try once more.
        """
        with self._lock:
            while True:
                try:
                    with self.env.begin(write=True) as txn:
                        result = work(txn)
                        if self.headroom:
                            self._keep_headroom()
                        return result
                except lmdb.MapFullError:
                    self._grow()
                except lmdb.MapResizedError:
                    self.env.set_mapsize(0)  # another process grew the map: adopt its size
                except (lmdb.Error, OSError) as exc:
                    if not is_storage_exhausted(exc):
                        raise
                    if make_room is not None and make_room():
                        continue
                    raise self.full(f"{self.no_room}: {exc}") from exc

    def _keep_headroom(self) -> None:
        """Keep ``headroom`` bytes of zeros written past the data file's used end, while
        commits are small; called in a write transaction, so no other writer of the node
        can be writing there meanwhile.

        Why: a commit that extends the file changes its size and allocates blocks, and the
        commit's fdatasync then also waits for the file system's journal. The queue grows
        by every message it holds, so small commits (one per batch of short messages)
        each paid that: 30% of a commit's time on ext4 here. Pages written once as zeros
        are overwritten in place, which syncs as plain data. The zeros cost writing twice,
        so big commits (large messages) are left to extend the file themselves; so is a
        file system with less than ``HEADROOM_MIN_FREE`` to spare. It looks every
        ``HEADROOM_EVERY`` commits. Never raises: the commit goes on without it."""
        self._commits += 1
        if self._commits % HEADROOM_EVERY:
            return
        info = self.env.info()
        txnid, used = info["last_txnid"], (info["last_pgno"] + 1) * self._page
        # the file's growth per commit since the last look, other processes' commits included
        (before, was), self._last = self._last, (txnid, used)
        if before < 0 or used - was > (txnid - before) * SMALL_COMMIT:
            return  # a first look, or big commits
        if used + self.headroom // 2 <= self._zeroed:
            return
        now = time.monotonic()
        if now < self._retry_at:
            return
        try:
            if self._fd is None:
                self._fd = os.open(self._data, os.O_WRONLY | os.O_CLOEXEC)
            end = os.fstat(self._fd).st_size
            target = min(used + self.headroom, info["map_size"])
            if end < target - self.headroom // 2:
                if not write_zeros(self._fd, end, target):
                    self._retry_at = now + HEADROOM_RETRY
                    return
                os.fdatasync(self._fd)
                end = target
            self._zeroed = end
        except OSError as exc:
            log.info("%s: zeroed headroom not written (%s); retried later", self.name, exc)
            self._retry_at = now + HEADROOM_RETRY

    def close(self) -> None:
        """Close the descriptor the headroom is written through (the environment is the
        caller's to close)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _grow(self) -> None:
        """Double the map (up to the maximum); raises *full* when it cannot grow."""
        current = self.env.info()["map_size"]
        if current >= self.max_map_size:
            raise self.full(f"{self.name} map is at its maximum size ({current // _MiB} MiB)")
        new = min(current * 2, self.max_map_size)
        log.info(
            "growing the %s map from %d MiB to %d MiB", self.name, current // _MiB, new // _MiB
        )
        try:
            self.env.set_mapsize(new)
        except (lmdb.Error, OSError) as exc:
            if is_storage_exhausted(exc):
                raise self.full(f"{self.name} map cannot grow: {exc}") from exc
            raise


def open_side_store(directory: Path, map_size: int = SIDE_MAP_SIZE) -> lmdb.Environment:
    """An unsynced environment for state that may be lost in a power cut (counts, caches),
    shared by every process of the node; created if missing."""
    directory.mkdir(parents=True, exist_ok=True)
    env = lmdb.open(
        str(directory),
        map_size=map_size,
        sync=False,  # losing the last writes costs one more probe or one forgotten failure
        metasync=False,
        max_readers=512,
        readahead=False,
    )
    allocate_lock_file(directory)
    return env


def delete_where(
    env: lmdb.Environment, doomed: Callable[[bytes], bool], batch: int = 1000, start: bytes = b""
) -> int:
    """Delete every record (from key *start* on) whose value *doomed* picks; how many went
    (the side stores' sweeps of expired entries). At most *batch* records are visited per
    write transaction: LMDB has one writer per environment for the whole node, and another
    worker's event loop may be waiting for it."""
    removed = 0
    after = start
    while True:
        with env.begin(write=True) as txn:
            cursor = txn.cursor()
            more = cursor.set_range(after) if after else cursor.first()
            seen = 0
            while more and cursor.key() and seen < batch:
                seen += 1
                if doomed(cursor.value()):
                    more = cursor.delete()  # moves to the next record
                    removed += 1
                else:
                    more = cursor.next()
            if not (more and cursor.key()):
                return removed
            after = bytes(cursor.key())
