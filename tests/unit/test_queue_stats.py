"""The queue's one definition of a message's state (queue.stats), shared by the listings
and the metrics: the per-envelope state and the schedule-index counts must agree."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pytest

from tachymail.queue import stats
from tachymail.queue.envelope import HELD, Envelope, Recipient, new_queue_id
from tachymail.queue.store import QueueStore, put_message


def _envelope(arrival: float, next_attempt: float = 0.0, state: str = "active") -> Envelope:
    return Envelope(
        id=new_queue_id(),
        sender="a@sender.example",
        recipients=[Recipient("b@dest.example", next_attempt=next_attempt)],
        arrival=arrival,
        size=10,
        state=state,
    )


@pytest.mark.parametrize("scan_limit", [20_000, 3])
def test_message_state_agrees_with_queue_stats(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, scan_limit: int
) -> None:
    monkeypatch.setattr(stats, "SCAN_LIMIT", scan_limit)
    now = time.time()
    store = QueueStore(tmp_path / "queue")
    try:
        ops = [put_message(_envelope(now - 600 + i), b"x") for i in range(8)]  # due now
        ops += [put_message(_envelope(now, now + 3600 + i), b"x") for i in range(5)]  # later
        ops += [put_message(_envelope(now, state=HELD), b"x") for _ in range(2)]
        # due exactly now (to the millisecond): active, as the schedule index says
        ops += [put_message(_envelope(now - 5, now), b"x")]
        store.apply(ops)
        counted = stats.queue_stats(store, now)
        states = Counter(stats.message_state(e, now) for e in store.iter_envelopes())
    finally:
        store.close()
    assert states == {"active": 9, "deferred": 5, "held": 2}
    assert counted.held == states["held"]
    assert counted.active + counted.deferred == states["active"] + states["deferred"]
    assert counted.oldest_age == pytest.approx(600, abs=1)
    if scan_limit > 16:
        assert (counted.active, counted.deferred, counted.exact) == (9, 5, True)
    else:  # walks of 3 from each end: the middle is estimated, not counted
        assert not counted.exact and 3 <= counted.active <= 11


def test_age_columns_are_qshapes() -> None:
    assert stats.age_bucket(0) == 0
    assert stats.age_bucket(5 * 60) == 0  # "5": up to five minutes
    assert stats.age_bucket(5 * 60 + 1) == 1
    assert stats.age_bucket(1280 * 60) == len(stats.AGE_BUCKETS) - 1
    assert stats.age_bucket(1280 * 60 + 1) == len(stats.AGE_BUCKETS)  # "1280+"


def test_last_reason_is_the_latest_pending_reply() -> None:
    envelope = _envelope(time.time())
    envelope.recipients = [
        Recipient("a@x.example", last_attempt=10, last_reply="451 4.7.1 first"),
        Recipient("b@x.example", last_attempt=20, last_reply="421 4.4.2 later"),
        Recipient("c@x.example", state="delivered", last_attempt=30, last_reply="250 ok"),
    ]
    assert stats.last_reason(envelope) == "421 4.4.2 later"
    assert stats.last_reason(_envelope(time.time())) == ""
