"""The queue's hints to delivery workers, and the delivery worker's cheap removal of a
finished message: real sockets and a real LMDB queue in a temporary directory."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import uvloop

from tachymail.queue.envelope import Envelope, Recipient, new_queue_id
from tachymail.queue.notify import Listener, Notifier, channel_address, shard_of
from tachymail.queue.store import QueueStore, put_message


def test_each_message_reaches_the_one_shard_that_owns_it(tmp_path: Path) -> None:
    """A message goes to one delivery worker whatever its recipients' domains, and the
    messages of one domain spread over both (a hot destination is not one worker's)."""

    async def run() -> tuple[list[str], list[str]]:
        got: list[list[str]] = [[], []]
        listeners = [Listener(tmp_path, k, got[k].extend) for k in (0, 1)]
        assert all(listener.bind() for listener in listeners)
        notifier = Notifier(tmp_path, 2)
        for n in range(20):
            notifier.queued(f"id{n}", [Recipient("user@hot.test")])
        notifier.queued("both", [Recipient(f"a@d{n}.test") for n in range(20)])
        for _ in range(100):
            await asyncio.sleep(0.01)
            if sum(map(len, got)) == 21:
                break
        for listener in listeners:
            listener.close()
        notifier.close()
        return got[0], got[1]

    shard0, shard1 = uvloop.run(run())
    ids = [f"id{n}" for n in range(20)] + ["both"]
    expected0 = [queue_id for queue_id in ids if shard_of(queue_id, 2) == 0]
    expected1 = [queue_id for queue_id in ids if shard_of(queue_id, 2) == 1]
    assert len(expected0) >= 3 and len(expected1) >= 3, "one domain's messages on both shards"
    assert shard0 == expected0 and shard1 == expected1


def test_a_second_listener_waits_until_the_first_lets_go(tmp_path: Path) -> None:
    async def run() -> list[str]:
        got: list[str] = []
        old = Listener(tmp_path, 0, got.extend)
        new = Listener(tmp_path, 0, got.extend)
        assert old.bind()
        assert not new.bind(), "the name is taken while the old worker holds it"
        old.close()
        assert new.bind()
        notifier = Notifier(tmp_path, 1)
        notifier.queued("after-reload", [Recipient("x@y.test")])
        for _ in range(100):
            await asyncio.sleep(0.01)
            if got:
                break
        new.close()
        notifier.close()
        return got

    assert uvloop.run(run()) == ["after-reload"]


def test_sending_with_nobody_listening_is_not_an_error(tmp_path: Path) -> None:
    async def run() -> int:
        notifier = Notifier(tmp_path, 1)
        notifier.queued("lost", [Recipient("x@y.test")])
        await asyncio.sleep(0.05)
        notifier.close()
        return notifier.dropped

    assert uvloop.run(run()) == 1


def test_channel_names_differ_per_queue_and_shard(tmp_path: Path) -> None:
    names = {
        channel_address(tmp_path / "a", 0),
        channel_address(tmp_path / "a", 1),
        channel_address(tmp_path / "b", 0),
    }
    assert len(names) == 3 and all(name.startswith(b"\0tachymail-") for name in names)


def _queued(store: QueueStore) -> tuple[Envelope, bytes]:
    envelope = Envelope(
        id=new_queue_id(),
        sender="a@x.test",
        recipients=[Recipient("b@y.test")],
        arrival=1000.0,
        size=5,
    )
    store.apply([put_message(envelope, b"hello")])
    [snapshot] = store.snapshots([envelope.id])
    assert snapshot is not None
    return snapshot[0], snapshot[2]


def test_a_finished_message_is_removed_without_decoding_if_unchanged(tmp_path: Path) -> None:
    store = QueueStore(tmp_path / "queue")
    envelope, raw = _queued(store)
    removed: list[bool] = []
    store.apply(
        [lambda s, txn: removed.append(s.discard_if_unchanged(txn, envelope.id, raw, envelope.due))]
    )
    assert removed == [True]
    assert store.count() == 0 and store.content(envelope.id) is None
    assert store.due_ids(2000.0) == [], "its schedule entry went with it"
    store.close()


def test_a_changed_record_is_not_removed_behind_the_change(tmp_path: Path) -> None:
    store = QueueStore(tmp_path / "queue")
    envelope, raw = _queued(store)

    def hold(s: QueueStore, txn: object) -> None:  # what `tachymail queue hold` does
        current = s.load(txn, envelope.id)  # type: ignore[arg-type]
        assert current is not None
        current.state = "held"
        s.save(txn, current)  # type: ignore[arg-type]

    store.apply([hold])
    removed: list[bool] = []
    store.apply(
        [lambda s, txn: removed.append(s.discard_if_unchanged(txn, envelope.id, raw, envelope.due))]
    )
    assert removed == [False]
    held = store.envelope(envelope.id)
    assert held is not None and held.state == "held"
    store.close()


@pytest.mark.parametrize(
    ("inline", "linger"),
    [(False, 0.0), (True, 0.001), (True, 0.0)],
    ids=["thread", "inline", "inline-no-linger"],
)
def test_messages_arriving_during_a_commit_are_stored_by_the_next(
    tmp_path: Path, inline: bool, linger: float
) -> None:
    """Every acknowledged message is in the queue: none is answered from a batch it was
    not part of."""
    from tachymail.queue.commit import GroupCommitter

    store = QueueStore(tmp_path / "queue")

    async def run() -> tuple[int, int]:
        committer = GroupCommitter(store, inline=inline, linger=linger)
        futures = []
        for n in range(50):
            envelope = Envelope(
                id=new_queue_id(), sender="a@x.test", recipients=[Recipient("b@y.test")]
            )
            futures.append(committer.submit(envelope, b"message %d" % n))
            if n % 10 == 0:
                await asyncio.sleep(0)  # a commit may start and others join behind it
        await asyncio.gather(*futures)
        committer.close()
        return committer.commits, store.count()

    commits, stored = uvloop.run(run())
    assert stored == 50
    assert commits < 50, "messages share commits"
    if not linger:
        # The first message starts a commit at once; the others queue behind it.
        assert commits > 1
    store.close()


def test_an_inline_commit_lingers_only_when_others_may_join(tmp_path: Path) -> None:
    from tachymail.queue.commit import GroupCommitter

    store = QueueStore(tmp_path / "queue")

    async def run() -> tuple[bool, bool]:
        # A linger far longer than the test: a commit that waits for it cannot finish here.
        committer = GroupCommitter(store, inline=True, linger=600.0)
        committer.more_may_join = lambda pending: False  # a lone client
        envelope = Envelope(id=new_queue_id(), sender="a@x.test", recipients=[Recipient("b@y")])
        alone = committer.submit(envelope, b"alone")
        for _ in range(3):
            await asyncio.sleep(0)
        committer.more_may_join = lambda pending: True  # other clients mid-transaction
        envelope = Envelope(id=new_queue_id(), sender="a@x.test", recipients=[Recipient("b@y")])
        waiting = committer.submit(envelope, b"in company")
        for _ in range(3):
            await asyncio.sleep(0)
        return alone.done(), waiting.done()

    assert uvloop.run(run()) == (True, False)
    store.close()


def _joining(
    store: QueueStore, gaps: list[float], *, linger: float, slide: bool, everyone: int = 0
) -> list[int]:
    """Messages submitted to an inline committer *gaps* seconds apart (the first at once);
    the size of each commit, in order. *everyone*: how many clients could join at most
    (0: always more)."""
    sizes: list[int] = []

    async def run() -> None:
        from tachymail.queue.commit import GroupCommitter

        committer = GroupCommitter(store, inline=True, linger=linger, slide=slide)
        committer.more_may_join = lambda pending: not everyone or pending < everyone
        futures = []
        for n, gap in enumerate([0.0, *gaps]):
            await asyncio.sleep(gap)
            envelope = Envelope(id=new_queue_id(), sender="a@x.test", recipients=[Recipient("b@y")])
            future = committer.submit(envelope, b"message %d" % n)
            # each commit's size, read as its first message is answered
            future.add_done_callback(lambda _f: sizes.append(committer.last_commit[0]))
            futures.append(future)
        await asyncio.wait_for(asyncio.gather(*futures), 30)  # a commit that never starts
        committer.close()

    uvloop.run(run())
    # one entry per message: keep each commit's once
    batches: list[int] = []
    while sizes:
        batches.append(sizes[0])
        del sizes[: sizes[0]]
    return batches


def test_a_sliding_window_stays_open_while_messages_keep_joining(tmp_path: Path) -> None:
    # A checked message keeps the loop busy before it joins: the window then counts from
    # the last message that joined, so four messages 0.12 s apart share one commit where a
    # fixed 0.3 s window leaves the last two to the next one.
    store = QueueStore(tmp_path / "queue")
    gaps = [0.12, 0.12, 0.12, 0.12]
    assert _joining(store, gaps, linger=0.3, slide=True) == [5]
    fixed = _joining(store, gaps, linger=0.3, slide=False)
    assert len(fixed) >= 2 and sum(fixed) == 5
    store.close()


def test_a_sliding_window_closes_at_its_limit(tmp_path: Path) -> None:
    from tachymail.queue.commit import LINGER_LIMIT

    # Messages that never stop coming: the window closes LINGER_LIMIT lingers after it
    # opened (0.4 s here), not when they stop.
    store = QueueStore(tmp_path / "queue")
    batches = _joining(store, [0.05] * 16, linger=0.1, slide=True)
    assert sum(batches) == 17
    assert len(batches) >= 2
    assert batches[0] <= LINGER_LIMIT * 0.1 / 0.05 + 1
    store.close()


def test_a_window_closes_once_everyone_who_could_join_has(tmp_path: Path) -> None:
    # A linger far longer than the test: only the third client's arrival can start the
    # commit (the worker counts its open sessions: none is left to wait for).
    store = QueueStore(tmp_path / "queue")
    for slide in (True, False):
        assert _joining(store, [0.01, 0.01], linger=600.0, slide=slide, everyone=3) == [3]
    store.close()
