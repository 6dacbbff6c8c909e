"""The LMDB helpers: lock files with real blocks, batched sweeps, the queue's zeroed
headroom."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tachymail import lmdbenv
from tachymail.lmdbenv import delete_where, open_side_store
from tachymail.queue.envelope import Envelope, Recipient, new_queue_id
from tachymail.queue.store import QueueStore, put_message


def test_the_lock_file_has_real_blocks_for_its_whole_length(tmp_path: Path) -> None:
    """A sparse lock file would make the first touch of a reader slot a SIGBUS on a full disk."""
    open_side_store(tmp_path / "side").close()
    stat = os.stat(tmp_path / "side" / "lock.mdb")
    assert stat.st_size > 0 and stat.st_blocks * 512 >= stat.st_size


@pytest.mark.parametrize("batch", [1, 7, 100, 5000])
def test_a_batched_sweep_deletes_exactly_what_it_picks(tmp_path: Path, batch: int) -> None:
    env = open_side_store(tmp_path / "side")
    with env.begin(write=True) as txn:
        for i in range(2500):
            txn.put(b"k%05d" % i, b"%d" % (i % 3))
    assert delete_where(env, lambda value: value == b"0", batch=batch) == 834
    with env.begin() as txn:
        left = [value for _, value in txn.cursor()]
    assert len(left) == 1666 and b"0" not in left
    assert delete_where(env, lambda value: True, batch=batch) == 1666
    assert env.stat()["entries"] == 0
    env.close()


def test_allocating_keeps_this_processs_locks_on_the_lock_file(tmp_path: Path) -> None:
    """POSIX drops a process's fcntl locks on any close of the file: an allocation through a
    second descriptor let the next process take itself for the first opener and reset the
    lock file (reader table and writer mutex) under the live processes; acknowledged
    messages were lost in the kill -9 test that way."""
    env = open_side_store(tmp_path / "side")
    reading = env.begin()  # a reader slot of this process, in the lock file
    try:
        assert_reader_seen(tmp_path / "side")
    finally:
        reading.abort()
        env.close()


def assert_reader_seen(directory: Path) -> None:
    """Another process opening the environment sees this process's reader slot: the lock
    file was not reset under it."""
    probe = "import lmdb, sys\nprint(lmdb.open(sys.argv[1], max_readers=512).readers())\n"
    seen = subprocess.run(
        [sys.executable, "-c", probe, str(directory)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    assert f"{os.getpid()}" in seen, f"the lock file was reset: readers {seen!r}"


# --- the queue's zeroed headroom (GrowingMap._keep_headroom) ---------------------------------


def _queue_messages(store: QueueStore, count: int, size: int) -> list[str]:
    """*count* messages of *size* octets, each in a commit of its own (as a lone client's)."""
    ids = []
    for _ in range(count):
        queue_id = new_queue_id()
        envelope = Envelope(
            id=queue_id, sender="a@x.test", recipients=[Recipient("b@y.test")], arrival=time.time()
        )
        store.apply([put_message(envelope, b"Subject: x\r\n\r\n" + b"y" * size)])
        ids.append(queue_id)
    return ids


def _used_end(store: QueueStore) -> int:
    return (store.env.info()["last_pgno"] + 1) * store.env.stat()["psize"]


def test_small_commits_keep_zeros_written_past_the_queue_data(tmp_path: Path) -> None:
    """A queue growing by small commits keeps HEADROOM of zeros on disk past its data, so a
    commit overwrites blocks in place instead of extending the file; LMDB reads every
    message back, after a reopen too, and nothing but zeros lies past the data."""
    store = QueueStore(tmp_path / "queue")
    ids = _queue_messages(store, 60, 1000)
    used = _used_end(store)
    data = tmp_path / "queue" / "data.mdb"
    size = data.stat().st_size
    assert size >= used + lmdbenv.HEADROOM // 2, (size, used)
    assert data.stat().st_blocks * 512 >= size  # written blocks, not a sparse tail
    with open(data, "rb") as file:
        file.seek(used)
        assert file.read() == bytes(size - used)
    store.close()
    again = QueueStore(tmp_path / "queue")
    assert again.count() == 60
    assert all(again.content(queue_id) is not None for queue_id in ids)
    again.close()


def test_big_commits_extend_the_queue_file_themselves(tmp_path: Path) -> None:
    """Zeros written ahead of big commits would cost more than they spare: none are."""
    store = QueueStore(tmp_path / "queue")
    _queue_messages(store, 30, 256 * 1024)
    size = (tmp_path / "queue" / "data.mdb").stat().st_size
    assert size - _used_end(store) < lmdbenv.HEADROOM // 2
    store.close()


def test_no_headroom_is_written_on_a_file_system_short_of_space(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Below HEADROOM_MIN_FREE of free space the queue takes no more disk than its data."""
    monkeypatch.setattr(lmdbenv, "HEADROOM_MIN_FREE", 1 << 62)
    store = QueueStore(tmp_path / "queue")
    _queue_messages(store, 60, 1000)
    size = (tmp_path / "queue" / "data.mdb").stat().st_size
    assert size - _used_end(store) < lmdbenv.HEADROOM // 2
    store.close()


def test_the_headroom_descriptor_leaves_the_lock_files_locks_alone(tmp_path: Path) -> None:
    """The zeros go through a descriptor of data.mdb of the store's own; closing it must not
    drop this process's fcntl locks (LMDB keeps them on lock.mdb only)."""
    store = QueueStore(tmp_path / "queue")
    _queue_messages(store, 60, 1000)
    assert store._map._fd is not None  # the headroom was written through it
    reading = store.env.begin()
    store._map.close()
    try:
        assert_reader_seen(tmp_path / "queue")
    finally:
        reading.abort()
        store.env.close()


# Another process grows the map and commits: its new size is in the meta page, larger than
# the one this process's lmdb.open read.
_GROWER = """
import sys
import lmdb
env = lmdb.open(sys.argv[1], map_size=16 << 20, max_dbs=24)
with env.begin(write=True) as txn:
    txn.put(b"grown", b"x" * (6 << 20))
env.close()
"""


@pytest.mark.parametrize("kind", ["queue", "mailbox"])
@pytest.mark.parametrize("readonly", [False, True])
def test_a_store_opened_while_another_process_grows_the_map_adopts_the_growth(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str, readonly: bool
) -> None:
    """The race CI hit: a worker's store opened (its map size read) just before another
    worker grew the map; the store's first transaction must take the new size, not fail
    with MDB_MAP_RESIZED."""
    from tachymail.mailbox import store as mailbox_store
    from tachymail.mailbox.store import MailboxStore
    from tachymail.queue import store as queue_store

    module = queue_store if kind == "queue" else mailbox_store
    cls = QueueStore if kind == "queue" else MailboxStore
    directory = tmp_path / kind
    cls(directory, map_size=1 << 20).close()  # the store exists, at 1 MiB
    real_open = module.open_store

    def open_then_grow(directory: Path, **kwargs: object) -> object:
        env = real_open(directory, **kwargs)  # type: ignore[arg-type]
        subprocess.run([sys.executable, "-c", _GROWER, str(directory)], check=True)
        return env

    monkeypatch.setattr(module, "open_store", open_then_grow)
    store = cls(directory, map_size=1 << 20, readonly=readonly)
    try:
        assert store.env.info()["map_size"] == 16 << 20
        if kind == "queue":
            assert store.envelope("nothing-here") is None
        else:
            assert store.users() == []
    finally:
        store.close()
