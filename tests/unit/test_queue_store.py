"""The LMDB queue store with a real environment: id collisions, storage errors.

Finding 9: a second message under a queue id already stored must never overwrite the
first; it is refused on its own (QueueIdTaken, 451 4.3.0 at intake) while the rest of
its group commit is stored. Finding 7: every way LMDB reports storage exhaustion is
StorageFull (452 4.3.1).
"""

from __future__ import annotations

import asyncio
import errno
import os
import time
from pathlib import Path

import lmdb
import pytest

from tachymail.queue import envelope as envelope_module
from tachymail.queue.commit import GroupCommitter
from tachymail.queue.envelope import Envelope, Recipient, new_queue_id
from tachymail.queue.store import QueueIdTaken, QueueStore, StorageFull, is_storage_exhausted


def envelope(queue_id: str, rcpt: str = "b@y.test") -> Envelope:
    return Envelope(
        id=queue_id, sender="a@x.test", recipients=[Recipient(rcpt)], arrival=time.time()
    )


def commit_all(
    store: QueueStore, messages: list[tuple[Envelope, bytes]], inline: bool = True
) -> list[object]:
    """Submit *messages* to one group commit; each one's outcome (None or error)."""

    async def run() -> list[object]:
        committer = GroupCommitter(store, inline=inline)
        futures = [committer.submit(env, content) for env, content in messages]
        outcomes = await asyncio.gather(*futures, return_exceptions=True)
        committer.close()
        return list(outcomes)

    return asyncio.run(run())


@pytest.mark.parametrize("inline", [True, False], ids=["inline", "thread"])
def test_a_second_message_under_a_taken_id_is_refused_and_the_first_kept(
    tmp_path: Path, inline: bool
) -> None:
    store = QueueStore(tmp_path / "queue")
    try:
        taken = new_queue_id()
        first = [(envelope(taken, "first@y.test"), b"first\r\n")]
        assert commit_all(store, first, inline) == [None]
        other = new_queue_id()
        outcomes = commit_all(
            store,
            [
                (envelope(taken, "second@y.test"), b"second\r\n"),
                (envelope(other), b"other\r\n"),  # same batch: must not fail with it
            ],
            inline,
        )
        assert isinstance(outcomes[0], QueueIdTaken)
        assert outcomes[1] is None
        kept = store.envelope(taken)
        assert kept is not None
        assert [r.address for r in kept.recipients] == ["first@y.test"]
        assert store.content(taken) == b"first\r\n"
        assert store.content(other) == b"other\r\n"
        assert store.count() == 2
    finally:
        store.close()


def test_insert_of_a_taken_id_raises_and_changes_nothing(tmp_path: Path) -> None:
    store = QueueStore(tmp_path / "queue")
    try:
        taken = new_queue_id()
        store.apply([lambda s, txn: s.insert(txn, envelope(taken, "first@y.test"), b"one")])
        with pytest.raises(QueueIdTaken):
            store.apply([lambda s, txn: s.insert(txn, envelope(taken, "dsn@y.test"), b"two")])
        assert store.content(taken) == b"one"
        kept = store.envelope(taken)
        assert kept is not None and kept.recipients[0].address == "first@y.test"
    finally:
        store.close()


def test_queue_ids_of_processes_whose_pids_share_low_bits_differ(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Linux pids go up to 2**22: two live workers may agree in their low 20 bits."""
    monkeypatch.setattr(envelope_module.time, "time_ns", lambda: 1_700_000_000_000_000_000)
    ids = set()
    for pid in (12345, 12345 + 2**20, 12345 + 2**21):
        monkeypatch.setattr(envelope_module, "_pid_bits", envelope_module.pid_bits(pid))
        monkeypatch.setattr(envelope_module, "_counter", iter([7]))
        ids.add(new_queue_id())
    assert len(ids) == 3
    assert all(len(i) == 20 and int(i, 16) >= 0 for i in ids)


def lmdb_error(cls: type[lmdb.Error], code: int) -> lmdb.Error:
    """An error worded as py-lmdb words the ones it raises: "what: strerror"."""
    return cls(f"mdb_txn_commit: {os.strerror(code)}")


@pytest.mark.parametrize(
    "error",
    [
        lmdb_error(lmdb.DiskError, errno.ENOSPC),
        lmdb_error(lmdb.Error, errno.EIO),  # LMDB's word for a short write
        lmdb_error(lmdb.Error, errno.EDQUOT),
        lmdb_error(lmdb.Error, errno.EFBIG),
        lmdb.MapFullError("mdb_put: MDB_MAP_FULL: Environment mapsize limit reached"),
        OSError(errno.ENOSPC, "No space left on device"),
        OSError(errno.EIO, "Input/output error"),
    ],
)
def test_every_storage_exhaustion_is_recognised(error: Exception) -> None:
    assert is_storage_exhausted(error)


@pytest.mark.parametrize(
    "error",
    [
        lmdb_error(lmdb.Error, errno.EINVAL),
        lmdb.CorruptedError("mdb_get: MDB_CORRUPTED: Located page was wrong type"),
        OSError(errno.EACCES, "Permission denied"),
        ValueError("no"),
    ],
)
def test_other_errors_are_not_storage_exhaustion(error: Exception) -> None:
    assert not is_storage_exhausted(error)


def test_a_full_map_is_storage_full_and_the_store_stays_usable(tmp_path: Path) -> None:
    store = QueueStore(tmp_path / "queue", map_size=1 << 20, max_map_size=1 << 20)
    try:
        big, small = new_queue_id(), new_queue_id()
        with pytest.raises(StorageFull):
            store.apply([lambda s, txn: s.insert(txn, envelope(big), b"x" * (2 << 20))])
        store.apply([lambda s, txn: s.insert(txn, envelope(small), b"small")])
        assert store.envelope(big) is None
        assert store.content(small) == b"small"
    finally:
        store.close()
