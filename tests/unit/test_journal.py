"""The intake journal ([queue] commit = "journal"): its records, its replay, its committer,
on a real LMDB queue in a temporary directory."""

from __future__ import annotations

import asyncio
import fcntl
import os
from pathlib import Path

import pytest

from tachymail.queue.envelope import Envelope, Recipient, new_queue_id
from tachymail.queue.journal import (
    ZERO_AHEAD,
    JournalCommitter,
    encode_record,
    read_records,
    replay_journals,
)
from tachymail.queue.store import QueueStore, prepare


def message(n: int) -> tuple[Envelope, bytes]:
    envelope = Envelope(
        id=new_queue_id(), sender="s@example.com", recipients=[Recipient("r@example.net")]
    )
    content = f"Subject: m{n}\r\n\r\nbody {n}\r\n".encode() + bytes(n * 37)
    envelope.size = len(content)
    return envelope, content


def write_journal(path: Path, count: int) -> list[tuple[bytes, int]]:
    """A journal of *count* messages; (queue id, offset after its record) of each."""
    ends = []
    blob = b""
    for n in range(count):
        envelope, content = message(n)
        blob += encode_record(prepare(envelope, content))
        ends.append((envelope.id.encode(), len(blob)))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(blob)
    return ends


@pytest.fixture
def store(tmp_path: Path) -> QueueStore:
    queue = QueueStore(tmp_path / "queue", map_size=16 * 1024 * 1024)
    yield queue
    queue.close()


def test_records_round_trip() -> None:
    envelope, content = message(5)
    prepared = prepare(envelope, content)
    blob = encode_record(prepared) + encode_record(prepared)
    read = list(read_records(blob))
    assert [p for _end, p in read] == [prepared, prepared]
    assert read[-1][0] == len(blob)
    assert Envelope.from_record(read[0][1][2]).id == envelope.id


def test_a_torn_last_record_is_ignored_wherever_it_is_cut(tmp_path: Path) -> None:
    """A crash mid-write leaves part of the last record: replay applies every whole one
    before it, whatever the cut, and deletes the file."""
    path = tmp_path / "journal" / "1-000001.jnl"
    ends = write_journal(path, 3)
    whole = path.read_bytes()
    last_start = ends[1][1]
    for cut in range(last_start + 1, len(whole), 7):
        queue = QueueStore(tmp_path / f"queue{cut}", map_size=16 * 1024 * 1024)
        try:
            path.write_bytes(whole[:cut])
            assert replay_journals(queue, path.parent) == 2
            assert set(queue.ids()) == {ends[0][0].decode(), ends[1][0].decode()}
            assert not path.exists()
        finally:
            queue.close()


def test_a_damaged_record_stops_the_replay(tmp_path: Path, store: QueueStore) -> None:
    path = tmp_path / "journal" / "1-000001.jnl"
    ends = write_journal(path, 3)
    data = bytearray(path.read_bytes())
    data[ends[0][1] + 40] ^= 0xFF  # inside the second record: its CRC no longer matches
    path.write_bytes(bytes(data))
    assert replay_journals(store, path.parent) == 1
    assert store.ids() == [ends[0][0].decode()]


def test_replay_never_brings_back_what_lmdb_already_applied(
    tmp_path: Path, store: QueueStore
) -> None:
    """Records up to the offset committed with them are not applied again: a message
    delivered (deleted) since is not resurrected."""
    path = tmp_path / "journal" / "7-000001.jnl"
    ends = write_journal(path, 4)
    data = path.read_bytes()
    # The applier's state after two records: both in LMDB with the offset after them.
    path.write_bytes(data[: ends[1][1]])
    assert replay_journals(store, path.parent) == 2
    # replay deleted the file; the owner (this test) goes on writing a new one, then
    # "delivery" removes the first message and the process dies.
    path.write_bytes(data)
    from tachymail.queue.journal import _APPLIED_DB, _OFFSET

    def applied_two(store: QueueStore, txn: object) -> None:
        db = store.env.open_db(_APPLIED_DB, txn=txn)  # type: ignore[arg-type]
        txn.put(path.name.encode(), _OFFSET.pack(ends[1][1]), db=db)  # type: ignore[attr-defined]

    store.apply([applied_two])
    store.apply([lambda s, txn: s.remove(txn, ends[0][0].decode()) and None])
    assert replay_journals(store, path.parent) == 2
    assert set(store.ids()) == {ends[n][0].decode() for n in (1, 2, 3)}


def test_replay_leaves_a_journal_its_owner_still_holds(tmp_path: Path, store: QueueStore) -> None:
    path = tmp_path / "journal" / "9-000001.jnl"
    write_journal(path, 2)
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as a live worker holds its own journal
        assert replay_journals(store, path.parent) == 0
        assert path.exists() and store.count() == 0
    finally:
        os.close(fd)
    assert replay_journals(store, path.parent) == 2


def test_committer_acknowledges_then_fills_lmdb(tmp_path: Path, store: QueueStore) -> None:
    """Futures resolve once the journal is synced; LMDB then holds every message, and a
    clean close deletes the journal."""
    directory = tmp_path / "journal"

    async def run() -> list[str]:
        committer = JournalCommitter(store, directory, max_batch=16)
        sent = [message(n) for n in range(100)]
        await asyncio.gather(*(committer.submit(e, c) for e, c in sent))
        journals = list(directory.glob("*.jnl"))
        assert len(journals) == 1 and journals[0].stat().st_size > 100 * 40
        for _ in range(500):
            if committer.idle:
                break
            await asyncio.sleep(0.01)
        assert committer.idle
        # an operation runs after the messages journaled before it
        count = await committer.submit_operation(lambda s, txn: txn.stat(s.envelopes)["entries"])
        assert count == 100
        committer.close()
        return [e.id for e, _ in sent]

    ids = asyncio.run(run())
    assert store.ids() == sorted(ids)
    assert list(directory.glob("*.jnl")) == []
    assert store.content(ids[3]) == message(3)[1]


def test_a_journaled_message_whose_id_was_taken_is_queued_under_a_new_one(
    tmp_path: Path, store: QueueStore
) -> None:
    """Acknowledged means kept: when another message holds the id by the time a journal
    record is applied (ids repeated within a millisecond, a clock stepped back), the
    journaled message gets a new id instead of being dropped; the very same message
    applied again adds nothing."""
    envelope, content = message(3)
    other, other_content = message(4)
    other.id = envelope.id  # the collision
    store.apply([lambda s, txn: s.insert_prepared(txn, prepare(other, other_content))])
    path = tmp_path / "journal" / "9-000001.jnl"
    path.parent.mkdir(parents=True)
    record = encode_record(prepare(envelope, content))
    path.write_bytes(record)
    assert replay_journals(store, path.parent) == 1
    ids = store.ids()
    assert len(ids) == 2 and envelope.id in ids
    [moved] = [i for i in ids if i != envelope.id]
    assert store.content(moved) == content and store.content(envelope.id) == other_content
    again = Envelope.from_record(store.envelope(moved).to_record())  # type: ignore[union-attr]
    path.write_bytes(encode_record(prepare(again, content)))
    assert replay_journals(store, path.parent) == 1
    assert len(store.ids()) == 2


def test_records_go_over_zeros_written_ahead_and_replay_reads_to_them(
    tmp_path: Path, store: QueueStore, caplog: pytest.LogCaptureFixture
) -> None:
    """The journal thread keeps zeros written past the last record (a record then syncs as
    plain data, not as a longer file): the file of a worker that died holds every record,
    then zeros, and replay applies them all without calling the zeros damage."""
    directory = tmp_path / "journal"
    copy = tmp_path / "crashed" / "5-000001.jnl"

    async def run() -> list[str]:
        committer = JournalCommitter(store, directory, max_batch=8)
        sent = [message(n) for n in range(60)]
        for n in range(0, 60, 6):  # batches of their own, as clients come and go
            await asyncio.gather(*(committer.submit(e, c) for e, c in sent[n : n + 6]))
        [journal] = directory.glob("*.jnl")
        copy.parent.mkdir()
        copy.write_bytes(journal.read_bytes())  # the file as a kill -9 would leave it
        committer.close()
        return [e.id for e, _ in sent]

    ids = asyncio.run(run())
    data = copy.read_bytes()
    ends = [end for end, _ in read_records(data)]
    assert len(ends) == 60
    assert len(data) - ends[-1] >= ZERO_AHEAD // 2 and not data[ends[-1] :].strip(b"\0")
    replayed = QueueStore(tmp_path / "replayed", map_size=16 * 1024 * 1024)
    try:
        with caplog.at_level("WARNING", logger="tachymail.queue.journal"):
            assert replay_journals(replayed, copy.parent) == 60
        assert sorted(replayed.ids()) == sorted(ids)
        assert "torn or damaged" not in caplog.text
    finally:
        replayed.close()
