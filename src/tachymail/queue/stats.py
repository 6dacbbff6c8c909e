"""What state each message is in, and the queue's statistics: depth by state, oldest age,
and the per-destination shape by age (like Postfix's qshape).

One definition of a message's state serves `tachymail queue list`, `mailq`,
`queue summary` and the metrics endpoint: *held* (not in the schedule: `queue hold`),
*active* (scheduled and due now, or being tried), *deferred* (scheduled for a later
attempt). The metrics endpoint counts the same states from the schedule index without
decoding envelopes (:func:`queue_stats`); the listings decode each envelope
(:func:`message_state`); both compare due times in whole milliseconds, as the schedule
index stores them, so they agree.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from tachymail.queue.envelope import HELD, Envelope, Recipient
from tachymail.queue.store import QueueStore

#: the message states the listings and the metrics show
ACTIVE = "active"
DEFERRED = "deferred"
STATES = (ACTIVE, DEFERRED, HELD)

#: schedule entries counted one by one from each end of the index per queue_stats call
SCAN_LIMIT = 20_000

#: upper bounds (minutes) of the age columns of `queue summary`, as Postfix's qshape has them
AGE_BUCKETS = (5, 10, 20, 40, 80, 160, 320, 640, 1280)


def _ms(when: float) -> int:
    return int(when * 1000)


def _due_ms(key: bytes) -> int:
    """The due time (ms) at the front of a schedule key (see QueueStore.schedule_key)."""
    return int.from_bytes(key[:_DUE_SIZE], "big")


#: octets of the due time at the front of each schedule key
_DUE_SIZE = len(QueueStore.schedule_key(0, ""))


def message_state(envelope: Envelope, now: float) -> str:
    """ "held", "deferred" or "active" for *envelope* at *now*.

    Held: put on hold, or not in the schedule at all; deferred: its next attempt is
    later than *now*; active: due now (or being delivered right now).
    """
    if envelope.state == HELD or not envelope.due:
        return HELD
    return DEFERRED if _ms(envelope.due) > _ms(now) else ACTIVE


def last_reason(envelope: Envelope) -> str:
    """The last reply (or local reason) of the pending recipient tried last; "" if none was."""
    tried = [r for r in envelope.pending() if r.last_reply]
    if not tried:
        return ""
    return max(tried, key=lambda r: r.last_attempt).last_reply


def recipient_domain(recipient: Recipient) -> str:
    """The recipient's domain, lower-cased ("" for an address without one)."""
    return recipient.address.rpartition("@")[2].lower() if "@" in recipient.address else ""


@dataclass(frozen=True, slots=True)
class QueueStats:
    """Queue depth by state and the age of the oldest message, at one instant."""

    active: int  # scheduled and due now
    deferred: int  # scheduled for a later attempt
    held: int  # in the queue but not scheduled (tachymail queue hold)
    oldest_age: float  # seconds since the oldest message arrived; 0 for an empty queue
    exact: bool  # False when active/deferred were estimated (see queue_stats)


def queue_stats(store: QueueStore, now: float | None = None) -> QueueStats:
    """Counts from database statistics plus a bounded walk of the schedule index.

    Cheap enough for every metrics scrape, whatever the queue's length: totals come from
    LMDB's entry counts, so held = messages minus schedule entries. Splitting the schedule
    into due-now (active) and later (deferred) walks keys from the front (earliest due)
    and from the back, at most SCAN_LIMIT each. When both walks stop short of the
    boundary (over 2 x SCAN_LIMIT scheduled messages), the unwalked middle is split by
    interpolating its due times linearly, and ``exact`` is False. Raises lmdb.Error when
    the queue cannot be read.
    """
    now = time.time() if now is None else now
    horizon = QueueStore.schedule_key(_ms(now) + 1, "")
    with store.env.begin(buffers=False) as txn:
        total: int = txn.stat(store.envelopes)["entries"]
        scheduled: int = txn.stat(store.schedule)["entries"]
        oldest_age = 0.0
        cursor = txn.cursor(db=store.envelopes)
        if cursor.first():
            oldest_age = max(0.0, now - Envelope.from_record(cursor.value()).arrival)
        active, deferred, fraction = _split_schedule(txn.cursor(db=store.schedule), horizon, now)
    if fraction is not None:
        active += round((scheduled - active - deferred) * fraction)
        deferred = scheduled - active
    return QueueStats(active, deferred, max(0, total - scheduled), oldest_age, fraction is None)


def _split_schedule(cursor: object, horizon: bytes, now: float) -> tuple[int, int, float | None]:
    """(due now, due later, None) from walks at both ends of the schedule index; when the
    walks do not meet, the third item is the share of the unwalked middle that is due."""
    cur = cursor  # an lmdb.Cursor; typed loosely since lmdb ships no stubs for it
    active = 0
    front_key = b""
    if cur.first():  # type: ignore[attr-defined]
        for raw in cur.iternext(values=False):  # type: ignore[attr-defined]
            key = bytes(raw)
            if key >= horizon:
                return active, _count_back(cur, horizon), None
            active += 1
            front_key = key
            if active >= SCAN_LIMIT:
                break
        else:
            return active, 0, None
    else:
        return 0, 0, None
    deferred = 0
    back_key = b""
    if cur.last():  # type: ignore[attr-defined]
        for raw in cur.iterprev(values=False):  # type: ignore[attr-defined]
            key = bytes(raw)
            if key < horizon or key <= front_key:
                return active, deferred, None
            deferred += 1
            back_key = key
            if deferred >= SCAN_LIMIT:
                break
    first_due = _due_ms(front_key)
    last_due = _due_ms(back_key)
    span = max(1, last_due - first_due)
    return active, deferred, min(1.0, max(0.0, (now * 1000 - first_due) / span))


def _count_back(cur: object, horizon: bytes) -> int:
    count = 0
    if cur.last():  # type: ignore[attr-defined]
        for raw in cur.iterprev(values=False):  # type: ignore[attr-defined]
            if bytes(raw) < horizon:
                break
            count += 1
    return count


def age_bucket(age: float) -> int:
    """The index in AGE_BUCKETS of the column an age (seconds) falls in; len(AGE_BUCKETS)
    for the last column (older than AGE_BUCKETS[-1] minutes)."""
    minutes = age / 60
    for index, bound in enumerate(AGE_BUCKETS):
        if minutes <= bound:
            return index
    return len(AGE_BUCKETS)


@dataclass(slots=True)
class DestinationShape:
    """Pending recipients of one destination domain: by age column and by message state."""

    total: int = 0
    ages: list[int] = field(default_factory=lambda: [0] * (len(AGE_BUCKETS) + 1))
    states: dict[str, int] = field(default_factory=dict)

    def add(self, age: float, state: str) -> None:
        self.total += 1
        self.ages[age_bucket(age)] += 1
        self.states[state] = self.states.get(state, 0) + 1


@dataclass(slots=True)
class QueueShape:
    """The queue by destination, age and state (`tachymail queue summary`).

    Destinations count pending recipients (a message to three mailboxes of one domain
    counts three there), as qshape does; ``states`` counts messages.
    """

    domains: dict[str, DestinationShape] = field(default_factory=dict)
    states: dict[str, int] = field(default_factory=dict)
    messages: int = 0
    oldest_age: float = 0.0

    def total(self) -> DestinationShape:
        """Every destination added up."""
        out = DestinationShape()
        for shape in self.domains.values():
            out.total += shape.total
            out.ages = [a + b for a, b in zip(out.ages, shape.ages, strict=True)]
            for state, n in shape.states.items():
                out.states[state] = out.states.get(state, 0) + n
        return out

    def as_dict(self) -> dict[str, Any]:
        """Plain data for ``--json``: age columns keyed by their heading ("5" … "1280+")."""
        headings = [str(b) for b in AGE_BUCKETS] + [f"{AGE_BUCKETS[-1]}+"]

        def one(shape: DestinationShape) -> dict[str, Any]:
            return {
                "total": shape.total,
                "ages": dict(zip(headings, shape.ages, strict=True)),
                "states": dict(sorted(shape.states.items())),
            }

        return {
            "messages": self.messages,
            "oldest_age": round(self.oldest_age, 3),
            "states": dict(sorted(self.states.items())),
            "total": one(self.total()),
            "domains": {name: one(shape) for name, shape in self.domains.items()},
        }


def queue_shape(envelopes: Iterable[Envelope], now: float) -> QueueShape:
    """The shape of *envelopes* at *now*; destinations sorted by pending recipients, most
    first (then by name)."""
    shape = QueueShape()
    for envelope in envelopes:
        state = message_state(envelope, now)
        age = max(0.0, now - envelope.arrival)
        shape.messages += 1
        shape.states[state] = shape.states.get(state, 0) + 1
        shape.oldest_age = max(shape.oldest_age, age)
        for rcpt in envelope.pending():
            domain = recipient_domain(rcpt) or "(none)"
            shape.domains.setdefault(domain, DestinationShape()).add(age, state)
    shape.domains = dict(sorted(shape.domains.items(), key=lambda item: (-item[1].total, item[0])))
    return shape
