"""Delivery events and their durable outbox in the queue's LMDB environment.

An event says what became of a message or one of its recipients: ``reception``,
``delivery``, ``transient_failure``, ``bounce``, ``delay``, ``suppression`` or
``expiry``. Its shape (:func:`make_event`) is the same in the JSON delivery log and in
the webhooks' POST bodies.

Events are written by :func:`record_events`, a queue operation that rides in the same
write transaction as the change it reports (a message's insertion, a delivery result):
a crash never loses an event of a committed change, nor reports one that did not commit.
Nothing is written unless some ``[[webhook]]`` wants the type (:func:`events_wanted`).

The outbox is the ``events`` database of the queue environment, with these keys (a
sequence number is 8 octets, big-endian):

- ``b"s"``: the last sequence number handed out. Each recording transaction takes the
  next ones: write transactions are serialised across every process of the node, so the
  numbers follow commit order (an event of a message sorts after every event of an
  earlier commit of that message) and never repeat, even once the outbox ran empty.
  A number is at least the commit's Unix time in milliseconds shifted 16 bits left,
  so that a number read in a log still tells when it was written.
- ``b"i" + seq``: recorded events not yet handed to the webhooks (the value: the event as
  JSON). The webhook sender (:mod:`tachymail.delivery.webhooks`) fans them out with
  :func:`fan_out`, with no need of the configuration at recording time.
- ``b"w" + name + b"\\0" + seq``: the events one webhook has still to receive, in order;
  removed (:func:`remove`) once it answered 2xx. One key space per webhook, so that a
  receiver that is down holds nobody else up.
- ``b"n" + name``: how many events that webhook's key space holds (its outbox depth),
  kept in the same transactions.
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Iterable, Mapping
from itertools import count
from typing import TYPE_CHECKING, Any

import lmdb
import orjson

from tachymail.config import EVENT_TYPES as EVENT_TYPES
from tachymail.config import Config
from tachymail.queue.envelope import Envelope, pid_bits
from tachymail.queue.store import Operation, put_message

if TYPE_CHECKING:
    from tachymail.queue.store import QueueStore

#: the fields of every event, in order
EVENT_FIELDS = (
    "id",
    "type",
    "time",
    "queue_id",
    "recipient",
    "sender",
    "destination",
    "remote_ip",
    "code",
    "enhanced_code",
    "reply",
    "bounce_class",
    "attempt",
    "tags",
    "metadata",
)

_SEQ = struct.Struct(">Q")
LAST_SEQ = b"s"
INCOMING = b"i"
WEBHOOK = b"w"
DEPTH = b"n"

_counter = count()
# The pid part of event ids, renewed in forked children (see queue.envelope).
_pid_bits = pid_bits(os.getpid())


def _renew_pid_bits() -> None:
    global _pid_bits
    _pid_bits = pid_bits(os.getpid())


os.register_at_fork(after_in_child=_renew_pid_bits)


def new_event_id() -> str:
    """A unique, time-sortable event id: 24 hex digits of milliseconds, pid, counter.

    44 bits of milliseconds, the 22 bits of the pid, a 30-bit per-process counter: two
    live processes never share a pid, and no process makes a billion events in a
    millisecond, so an id is never made twice. A receiver deduplicates on it.
    """
    millis = time.time_ns() // 1_000_000
    return f"{millis:011x}{(_pid_bits << 30) | (next(_counter) & 0x3FFFFFFF):013x}"


def make_event(
    type: str,
    *,
    envelope: Envelope | None = None,
    recipient: str = "",
    sender: str = "",
    destination: str = "",
    remote_ip: str = "",
    code: int = 0,
    enhanced_code: str = "",
    reply: str = "",
    bounce_class: str = "",
    attempt: int = 0,
    when: float | None = None,
) -> dict[str, Any]:
    """One event, every field present (empty when it does not apply).

    ``queue_id``, ``sender``, ``tags`` and ``metadata`` come from *envelope* when it is
    given (*sender* then only when the envelope's is the null sender's ""); ``time`` is
    *when* (Unix seconds, rounded to the millisecond), by default now. ``id`` is unique.
    """
    if envelope is not None:
        queue_id = envelope.id
        sender = envelope.sender or sender
        tags: list[str] = envelope.tags
        metadata: dict[str, Any] = envelope.metadata
    else:
        queue_id, tags, metadata = "", [], {}
    return {
        "id": new_event_id(),
        "type": type,
        "time": round(time.time() if when is None else when, 3),
        "queue_id": queue_id,
        "recipient": recipient,
        "sender": sender,
        "destination": destination,
        "remote_ip": remote_ip,
        "code": code,
        "enhanced_code": enhanced_code,
        "reply": reply,
        "bounce_class": bounce_class,
        "attempt": attempt,
        "tags": tags,
        "metadata": metadata,
    }


def events_wanted(config: Config, type: str) -> bool:
    """Whether some ``[[webhook]]`` receives events of *type*: if not, record none.

    Without webhooks this is one attribute read, so intake pays nothing by default.
    """
    webhooks = config.webhooks
    if not webhooks:
        return False
    return any(not hook.events or type in hook.events for hook in webhooks)


def record_events(events: list[dict[str, Any]]) -> Operation:
    """The queue operation appending *events* to the outbox, in order.

    Encoded here, in the caller's thread (see queue.store.put_message); run it in the same
    commit as the change the events report (``committer.submit_operation`` or a batch
    of operations given to ``QueueStore.apply``).
    """
    encoded = [orjson.dumps(event) for event in events]

    def operation(store: QueueStore, txn: lmdb.Transaction) -> None:
        if not encoded:
            return None
        db = store.events
        first = _next_seq(txn, db, len(encoded))
        for offset, value in enumerate(encoded):
            txn.put(INCOMING + _SEQ.pack(first + offset), value, db=db)
        return None

    return operation


def _next_seq(txn: lmdb.Transaction, db: Any, n: int) -> int:
    """Reserve *n* sequence numbers; returns the first."""
    raw = txn.get(LAST_SEQ, db=db)
    last = _SEQ.unpack(raw)[0] if raw is not None else 0
    first = max(last + 1, (time.time_ns() // 1_000_000) << 16)
    txn.put(LAST_SEQ, _SEQ.pack(first + n - 1), db=db)
    return first


def _prefix(name: str) -> bytes:
    return WEBHOOK + name.encode() + b"\0"


def _add_depth(txn: lmdb.Transaction, db: Any, name: str, delta: int) -> None:
    key = DEPTH + name.encode()
    raw = txn.get(key, db=db)
    depth = max(0, (_SEQ.unpack(raw)[0] if raw is not None else 0) + delta)
    txn.put(key, _SEQ.pack(depth), db=db)


def _read(store: QueueStore) -> lmdb.Transaction:
    return store._read()


def _page(store: QueueStore, prefix: bytes, limit: int) -> list[tuple[bytes, bytes]]:
    """Up to *limit* (key, value) with *prefix*, in key order, from one read snapshot."""
    found: list[tuple[bytes, bytes]] = []
    if store.events is None or limit <= 0:
        return found
    with _read(store) as txn:
        cursor = txn.cursor(db=store.events)
        if not cursor.set_range(prefix):
            return found
        for key, value in cursor:
            key = bytes(key)
            if not key.startswith(prefix) or len(found) >= limit:
                break
            found.append((key, bytes(value)))
    return found


def incoming(store: QueueStore, limit: int = 1000) -> list[tuple[bytes, bytes]]:
    """Up to *limit* recorded events not yet fanned out to the webhooks: (key, JSON)."""
    return _page(store, INCOMING, limit)


def fan_out(entries: list[tuple[bytes, bytes]], routes: Mapping[str, frozenset[str]]) -> Operation:
    """The operation moving *entries* (from :func:`incoming`) into the key space of each
    webhook of *routes* (name -> the event types it wants), in the same order; an event
    nobody wants is dropped. An entry already gone (fanned out by a predecessor during a
    reload) is skipped, so no event is fanned out twice."""
    typed = [(key, value, _type_of(value)) for key, value in entries]

    def operation(store: QueueStore, txn: lmdb.Transaction) -> None:
        db = store.events
        added: dict[str, int] = {}
        for key, value, kind in typed:
            if not txn.delete(key, db=db):
                continue
            seq = key[len(INCOMING) :]
            for name, wanted in routes.items():
                if kind in wanted:
                    txn.put(_prefix(name) + seq, value, db=db)
                    added[name] = added.get(name, 0) + 1
        for name, n in added.items():
            _add_depth(txn, db, name, n)
        return None

    return operation


def _type_of(value: bytes) -> str:
    try:
        kind = orjson.loads(value).get("type", "")
    except (orjson.JSONDecodeError, AttributeError):
        return ""
    return kind if isinstance(kind, str) else ""


def pending(store: QueueStore, name: str, limit: int) -> list[tuple[bytes, bytes]]:
    """The oldest *limit* events webhook *name* has still to receive: (key, JSON), in
    the order they were recorded."""
    return _page(store, _prefix(name), limit)


def remove(name: str, keys: Iterable[bytes]) -> Operation:
    """The operation removing events webhook *name* received (keys from :func:`pending`)."""
    wanted = list(keys)

    def operation(store: QueueStore, txn: lmdb.Transaction) -> None:
        db = store.events
        gone = sum(1 for key in wanted if txn.delete(key, db=db))
        if gone:
            _add_depth(txn, db, name, -gone)
        return None

    return operation


def depth(store: QueueStore, name: str) -> int:
    """How many events webhook *name* has still to receive."""
    if store.events is None:
        return 0
    with _read(store) as txn:
        raw = txn.get(DEPTH + name.encode(), db=store.events)
    return _SEQ.unpack(raw)[0] if raw is not None else 0


def outboxes(store: QueueStore) -> dict[str, int]:
    """Every webhook name with events waiting in the outbox, and how many (configured
    or not: a webhook removed from the configuration leaves its events here)."""
    found: dict[str, int] = {}
    if store.events is None:
        return found
    with _read(store) as txn:
        cursor = txn.cursor(db=store.events)
        if not cursor.set_range(DEPTH):
            return found
        for key, value in cursor:
            key = bytes(key)
            if not key.startswith(DEPTH):
                break
            n = _SEQ.unpack(value)[0]
            if n:
                found[key[len(DEPTH) :].decode()] = n
    return found


def reported(operation: Operation, events: list[dict[str, Any]]) -> Operation:
    """*operation* followed, in the same transaction, by recording *events*, unless the
    operation refused (returned an exception, having written nothing): then neither."""
    record = record_events(events)

    def combined(store: QueueStore, txn: lmdb.Transaction) -> Exception | None:
        outcome = operation(store, txn)
        if outcome is None:
            record(store, txn)
        return outcome

    return combined


def reception_events(envelope: Envelope, reply: str = "") -> list[dict[str, Any]]:
    """One ``reception`` event per recipient of a newly queued *envelope* (its client's
    address as ``remote_ip``; *reply*: what the client will be told)."""
    now = envelope.arrival or None
    return [
        make_event(
            "reception",
            envelope=envelope,
            recipient=rcpt.address,
            remote_ip=envelope.client_ip,
            code=250,
            enhanced_code="2.0.0",
            reply=reply or f"250 2.0.0 Ok: queued as {envelope.id}",
            when=now,
        )
        for rcpt in envelope.recipients
    ]


def put_message_reported(envelope: Envelope, content: bytes) -> Operation:
    """``queue.store.put_message`` with the message's ``reception`` events in the same
    transaction (for intake paths where :func:`events_wanted` said yes)."""
    return reported(put_message(envelope, content), reception_events(envelope))
