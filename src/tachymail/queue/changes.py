"""The outbox of a side store whose entries a cluster shares (the suppression list, the
destination suspensions): each local change, recorded in the same LMDB transaction as the
change itself, waits here until the node's replicator (tachymail.cluster.replication) has
handed it to Redis.

Writers (the HTTP API, the CLI, delivery) never talk to Redis: they only append here, and
only while the store is *enabled* for replication, which the replicator of a node with a
``[cluster] redis`` sets (and a node without one clears) when it starts. A store that was
never in a cluster has no outbox and pays one key look-up per write transaction.

Every key of this module starts with a NUL byte, which no entry of either store does
(addresses, scopes and destination names are printable): readers of the entries start
their walks at :data:`FIRST_ENTRY` and count entries with :func:`entry_count`.

- ``NUL repl NUL on``: present while the store is replicated;
- ``NUL repl NUL resend``: the whole list must be offered to the cluster again (the node
  joined, Redis lost its data, or the outbox filled up while Redis was away);
- ``NUL repl NUL state NUL name``: the replicator's bookmarks (last stream id, epoch);
- ``NUL outbox NUL`` + an 8-byte big-endian sequence number: one :class:`Change` each,
  in the order they were made.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import lmdb
import orjson

#: the first key an entry of a replicated store can have (every bookkeeping key is below)
FIRST_ENTRY = b"\x01"
#: changes the outbox holds at most; past it the store is marked for a full resend instead
#: (a node cut off from Redis for long must not fill its disk with a backlog)
MAX_OUTBOX = 1_000_000

_ON = b"\x00repl\x00on"
_RESEND = b"\x00repl\x00resend"
_STATE = b"\x00repl\x00state\x00"
_NEXT = b"\x00repl\x00next"
_OUTBOX = b"\x00outbox\x00"
_OUTBOX_END = b"\x00outbox\x01"
_SEQ = struct.Struct(">Q")
_KEY_LENGTH = struct.Struct("<H")


@dataclass(frozen=True, slots=True)
class Change:
    """One change of a replicated list: the entry's *key* in the store, when it was made
    (*stamp*, epoch seconds: the newer change wins), the entry as JSON data (None: the
    entry was removed), and when the entry lapses by itself (*lapses*, 0: never)."""

    key: bytes
    stamp: float
    value: dict[str, Any] | None
    lapses: float = 0.0

    def data(self) -> bytes:
        """The change as the cluster stores it (JSON: ``t`` stamp, ``v`` value, ``l``
        lapses); equal changes give equal bytes."""
        return orjson.dumps(
            {"t": self.stamp, "v": self.value, "l": self.lapses}, option=orjson.OPT_SORT_KEYS
        )

    @classmethod
    def from_data(cls, key: bytes, data: bytes) -> Change:
        """The change stored as *data* for *key*; raises ValueError when it is not one."""
        try:
            parsed = orjson.loads(data)
            value = parsed["v"]
            if value is not None and not isinstance(value, dict):
                raise TypeError("value")
            return cls(bytes(key), float(parsed["t"]), value, float(parsed.get("l") or 0.0))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a change: {bytes(data)[:80]!r} ({exc})") from None


class ReplicatedStore(Protocol):
    """What the replicator needs of a store (SuppressionList, Suspensions)."""

    env: lmdb.Environment

    def apply_changes(self, changes: list[Change], at_least: bool) -> int:
        """Apply other nodes' *changes* where newer than (or, *at_least*, as new as) the
        local entry, without recording them in the outbox; synced; how many changed
        something."""
        ...

    def snapshot(self, after: bytes, limit: int) -> tuple[list[Change], bytes | None]:
        """Up to *limit* entries after key *after* (b"": from the first) as changes, and the
        key to go on from (None at the end)."""
        ...


def is_bookkeeping(key: bytes) -> bool:
    """Whether *key* is this module's (or the store's own counters'), not an entry."""
    return key[:1] == b"\x00"


def enabled(txn: lmdb.Transaction) -> bool:
    return txn.get(_ON) is not None


def record(txn: lmdb.Transaction, changes: Iterable[Change], limit: int = MAX_OUTBOX) -> None:
    """Append *changes* to the outbox in *txn* when the store is replicated (else nothing);
    when the outbox holds *limit* changes, mark the store for a full resend instead."""
    if txn.get(_ON) is None:
        return  # not in a cluster
    size = outbox_size(txn)
    raw = txn.get(_NEXT)
    following = _SEQ.unpack(raw)[0] if raw is not None else 0
    for change in changes:
        if size >= limit:
            txn.put(_RESEND, b"outbox full")
            break
        value = _KEY_LENGTH.pack(len(change.key)) + change.key + change.data()
        txn.put(_OUTBOX + _SEQ.pack(following), value)
        following += 1
        size += 1
    txn.put(_NEXT, _SEQ.pack(following))


def last_sequence(env: lmdb.Environment) -> int:
    """The sequence number of the last change ever recorded (-1: none yet); numbers only
    grow, also across an emptied outbox."""
    with env.begin() as txn:
        raw = txn.get(_NEXT)
    return _SEQ.unpack(raw)[0] - 1 if raw is not None else -1


def _bounds(txn: lmdb.Transaction) -> tuple[int | None, int | None]:
    """The first and last sequence numbers in the outbox (None, None when empty)."""
    cursor = txn.cursor()
    if not cursor.set_range(_OUTBOX) or not bytes(cursor.key()).startswith(_OUTBOX):
        return None, None
    first = _SEQ.unpack(bytes(cursor.key())[len(_OUTBOX) :])[0]
    cursor.set_range(_OUTBOX_END)
    cursor.prev()
    last = _SEQ.unpack(bytes(cursor.key())[len(_OUTBOX) :])[0]
    return first, last


def outbox_size(txn: lmdb.Transaction) -> int:
    """Changes waiting in the outbox (sequence numbers are contiguous: drained in order)."""
    first, last = _bounds(txn)
    return 0 if first is None or last is None else last - first + 1


def entry_count(txn: lmdb.Transaction) -> int:
    """Entries of the store in *txn*: every record but the bookkeeping ones."""
    total: int = txn.stat()["entries"]
    cursor = txn.cursor()
    more = cursor.first()
    while more and is_bookkeeping(bytes(cursor.key())):
        key = bytes(cursor.key())
        if key.startswith(_OUTBOX):
            total -= outbox_size(txn)
            more = cursor.set_range(_OUTBOX_END)
            continue
        total -= 1
        more = cursor.next()
    return total


def set_enabled(env: lmdb.Environment, on: bool) -> bool:
    """Start (*on*) or stop recording changes; synced. Starting for the first time marks
    the whole list for a resend (what the node had before it joined goes to the cluster);
    stopping drops the outbox and the bookmarks. Whether anything changed."""
    with env.begin() as txn:
        if (txn.get(_ON) is not None) == on:
            return False  # the common case: no write transaction at every start
    with env.begin(write=True) as txn:
        if on:
            if txn.get(_ON) is not None:
                return False
            txn.put(_ON, b"1")
            txn.put(_RESEND, b"joined")
        else:
            if txn.get(_ON) is None:
                return False
            doomed = []
            cursor = txn.cursor()
            more = cursor.first()
            while more and is_bookkeeping(bytes(cursor.key())):
                key = bytes(cursor.key())
                if key.startswith((b"\x00repl\x00", _OUTBOX)):
                    doomed.append(key)
                more = cursor.next()
            for key in doomed:
                txn.delete(key)
    env.sync(True)
    return True


def pending(env: lmdb.Environment, limit: int) -> list[tuple[int, Change]]:
    """The first *limit* changes of the outbox with their sequence numbers, oldest first.
    A record that does not decode is returned as a removal-free no-op of key b"" (the
    caller drops it)."""
    out: list[tuple[int, Change]] = []
    with env.begin() as txn:
        cursor = txn.cursor()
        more = cursor.set_range(_OUTBOX)
        while more and len(out) < limit:
            key = bytes(cursor.key())
            if not key.startswith(_OUTBOX):
                break
            seq = _SEQ.unpack(key[len(_OUTBOX) :])[0]
            raw = bytes(cursor.value())
            length = _KEY_LENGTH.unpack_from(raw)[0]
            entry_key = raw[_KEY_LENGTH.size : _KEY_LENGTH.size + length]
            try:
                change = Change.from_data(entry_key, raw[_KEY_LENGTH.size + length :])
            except ValueError:
                change = Change(b"", 0.0, None)
            out.append((seq, change))
            more = cursor.next()
    return out


def drop(env: lmdb.Environment, upto: int) -> None:
    """Remove every change up to sequence number *upto* (handed to the cluster)."""
    with env.begin(write=True) as txn:
        cursor = txn.cursor()
        more = cursor.set_range(_OUTBOX)
        while more:
            key = bytes(cursor.key())
            if not key.startswith(_OUTBOX) or _SEQ.unpack(key[len(_OUTBOX) :])[0] > upto:
                break
            more = cursor.delete()
    env.sync(True)


def resend_wanted(env: lmdb.Environment) -> bool:
    with env.begin() as txn:
        return txn.get(_RESEND) is not None


def want_resend(env: lmdb.Environment, wanted: bool) -> None:
    """Mark (or, after a complete resend, unmark) the whole list for a resend; synced."""
    with env.begin(write=True) as txn:
        if wanted:
            txn.put(_RESEND, b"asked")
        else:
            txn.delete(_RESEND)
    env.sync(True)


def get_state(env: lmdb.Environment, name: str) -> bytes | None:
    """The replicator's bookmark *name* (None when never set)."""
    with env.begin() as txn:
        raw = txn.get(_STATE + name.encode())
    return None if raw is None else bytes(raw)


def set_state(env: lmdb.Environment, name: str, value: bytes) -> None:
    with env.begin(write=True) as txn:
        txn.put(_STATE + name.encode(), value)
    env.sync(True)


__all__ = [
    "FIRST_ENTRY",
    "MAX_OUTBOX",
    "Change",
    "ReplicatedStore",
    "drop",
    "enabled",
    "entry_count",
    "get_state",
    "is_bookkeeping",
    "last_sequence",
    "outbox_size",
    "pending",
    "record",
    "resend_wanted",
    "set_enabled",
    "set_state",
    "want_resend",
]
