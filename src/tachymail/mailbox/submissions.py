"""EmailSubmission records (RFC 8621 §7) in the mailbox store, so that every worker
process reads the same ones.

The ``submissions`` database of the store holds, per user (lower case):

- ``n`` + user -> :data:`_STATE` (last change number, floor, records, tombstones): the
  change number is the user's EmailSubmission state; every create and every destroy takes
  the next one, so it only grows (also across a destroy of every record);
- ``r`` + user \\0 + change number at creation (>Q) -> the record: when it was sent (>d),
  then its properties as JSON (opaque here, with its ``id``), in creation order;
- ``i`` + user \\0 + id -> its creation number (>Q): the ids are the caller's (JMAP uses
  the queue id of the message sent, which the queue and the delivery log show too);
- ``d`` + user \\0 + change number of the destroy (>Q) -> the creation number (>Q) and the
  id of the record destroyed: what ``/changes`` reports as destroyed.

Bounds: :func:`add_submission` keeps at most *keep* records per user and removes those
older than *max_age* seconds (a few per call, oldest first); each removal is a destroy
with its tombstone. Tombstones are kept up to *keep* too; dropping the oldest raises the
floor: changes since a state below it cannot be calculated any more (RFC 8620 §5.2 lets
the server say ``cannotCalculateChanges``). ``delete_user`` drops all of it.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import lmdb
import orjson

from tachymail.mailbox.store import MailboxStore, Operation

# last change number, floor, records, tombstones
_STATE = struct.Struct(">QQII")
_SEQ = struct.Struct(">Q")
_WHEN = struct.Struct(">d")
# ids longer than this are no record's (LMDB keys are at most 511 octets)
_MAX_ID = 128
# records past their age removed per new submission (the count bound holds regardless)
_AGE_SWEEP = 8


def _key(kind: bytes, user: str, number: int | None = None) -> bytes:
    base = kind + user.lower().encode() + b"\0"
    return base if number is None else base + _SEQ.pack(number)


@dataclass(frozen=True, slots=True)
class SubmissionState:
    """A user's EmailSubmission state: *last* change number; changes since a state below
    *floor* cannot be calculated."""

    last: int
    floor: int


@dataclass(frozen=True, slots=True)
class SubmissionRecord:
    """One kept submission: its creation number, when it was sent, its properties."""

    number: int
    id: str
    sent: float
    data: dict[str, Any]


def _read_state(txn: lmdb.Transaction, db: Any, user: str) -> list[int]:
    raw = txn.get(b"n" + user.lower().encode(), db=db)
    return list(_STATE.unpack(raw)) if raw is not None else [0, 0, 0, 0]


def add_submission(
    user: str,
    submission_id: str,
    data: dict[str, Any],
    sent: float,
    *,
    keep: int,
    max_age: float,
    now: float | None = None,
) -> Operation:
    """The operation that keeps a new record *submission_id* (*data*: JSON-able
    properties) of *user*; its outcome is the record's creation number, or a ValueError
    when the id is taken (nothing written). Records beyond *keep*, and a few older than
    *max_age* seconds, are destroyed in the same transaction."""
    payload = _WHEN.pack(sent) + orjson.dumps({**data, "id": submission_id})
    index_key = b"i" + user.lower().encode() + b"\0" + submission_id.encode()

    def operation(store: MailboxStore, txn: lmdb.Transaction) -> object:
        db = store.submissions_db
        if txn.get(index_key, db=db) is not None:
            return ValueError(f"submission {submission_id} exists")
        state = _read_state(txn, db, user)
        state[0] += 1
        number = state[0]
        txn.put(_key(b"r", user, number), payload, db=db)
        txn.put(index_key, _SEQ.pack(number), db=db)
        state[2] += 1
        horizon = (time.time() if now is None else now) - max_age
        prefix = _key(b"r", user)
        cursor = txn.cursor(db=db)
        aged = 0
        more = cursor.set_range(prefix)
        while more and bytes(cursor.key()).startswith(prefix):
            old = _SEQ.unpack(bytes(cursor.key())[len(prefix) :])[0]
            too_many = state[2] > keep
            too_old = aged < _AGE_SWEEP and _WHEN.unpack(bytes(cursor.value())[:8])[0] < horizon
            if old == number or not (too_many or too_old):
                break
            aged += 0 if too_many else 1
            old_id = str(orjson.loads(bytes(cursor.value())[8:]).get("id", ""))
            more = cursor.delete()
            _forget(txn, db, user, state, old, old_id)
        _trim_tombstones(txn, db, user, state, keep)
        txn.put(b"n" + user.lower().encode(), _STATE.pack(*state), db=db)
        store._touch(user)
        return number

    return operation


def _forget(
    txn: lmdb.Transaction, db: Any, user: str, state: list[int], number: int, submission_id: str
) -> None:
    """Record the destroy of record *number* (already deleted): its index entry goes, a
    tombstone takes the next change number."""
    txn.delete(b"i" + user.lower().encode() + b"\0" + submission_id.encode(), db=db)
    state[2] -= 1
    state[0] += 1
    txn.put(_key(b"d", user, state[0]), _SEQ.pack(number) + submission_id.encode(), db=db)
    state[3] += 1


def _trim_tombstones(
    txn: lmdb.Transaction, db: Any, user: str, state: list[int], keep: int
) -> None:
    """Drop the oldest tombstones beyond *keep*, raising the floor past them."""
    prefix = _key(b"d", user)
    cursor = txn.cursor(db=db)
    more = cursor.set_range(prefix)
    while state[3] > keep and more and bytes(cursor.key()).startswith(prefix):
        state[1] = max(state[1], _SEQ.unpack(bytes(cursor.key())[len(prefix) :])[0])
        more = cursor.delete()
        state[3] -= 1


def destroy_submissions(user: str, ids: Iterable[str], *, keep: int) -> Operation:
    """The operation that destroys the records *ids* of *user* (absent ones are skipped);
    its outcome is the list of the ids destroyed."""
    wanted = list(dict.fromkeys(ids))

    def operation(store: MailboxStore, txn: lmdb.Transaction) -> object:
        db = store.submissions_db
        state = _read_state(txn, db, user)
        done: list[str] = []
        for submission_id in wanted:
            if len(submission_id.encode()) > _MAX_ID:
                continue
            raw = txn.get(b"i" + user.lower().encode() + b"\0" + submission_id.encode(), db=db)
            if raw is None:
                continue
            number = _SEQ.unpack(raw)[0]
            txn.delete(_key(b"r", user, number), db=db)
            _forget(txn, db, user, state, number, submission_id)
            done.append(submission_id)
        if done:
            _trim_tombstones(txn, db, user, state, keep)
            txn.put(b"n" + user.lower().encode(), _STATE.pack(*state), db=db)
            store._touch(user)
        return done

    return operation


def submission_state(store: MailboxStore, user: str) -> SubmissionState:
    """The user's EmailSubmission state now."""
    if store.submissions_db is None:
        return SubmissionState(0, 0)
    with store._read() as txn:
        state = _read_state(txn, store.submissions_db, user)
    return SubmissionState(state[0], state[1])


def read_submissions(
    store: MailboxStore, user: str, ids: Iterable[str] | None = None
) -> tuple[SubmissionState, list[SubmissionRecord]]:
    """The state and the records *ids* of *user* (absent ones skipped), or all of them in
    creation order when *ids* is None, read in one transaction."""
    db = store.submissions_db
    if db is None:
        return SubmissionState(0, 0), []
    found: list[SubmissionRecord] = []

    def record(number: int, raw: bytes) -> SubmissionRecord:
        data: dict[str, Any] = orjson.loads(raw[8:])
        return SubmissionRecord(number, str(data.get("id", "")), _WHEN.unpack(raw[:8])[0], data)

    with store._read() as txn:
        state = _read_state(txn, db, user)
        if ids is None:
            prefix = _key(b"r", user)
            cursor = txn.cursor(db=db)
            more = cursor.set_range(prefix)
            while more:
                key = bytes(cursor.key())
                if not key.startswith(prefix):
                    break
                found.append(record(_SEQ.unpack(key[len(prefix) :])[0], bytes(cursor.value())))
                more = cursor.next()
        else:
            for submission_id in ids:
                if len(submission_id.encode()) > _MAX_ID:  # no such id (and over LMDB's key size)
                    continue
                index = txn.get(
                    b"i" + user.lower().encode() + b"\0" + submission_id.encode(), db=db
                )
                number = _SEQ.unpack(index)[0] if index is not None else 0
                raw = txn.get(_key(b"r", user, number), db=db) if number else None
                if raw is not None:
                    found.append(record(number, bytes(raw)))
    return SubmissionState(state[0], state[1]), found


def submission_changes(
    store: MailboxStore, user: str, since: int
) -> tuple[SubmissionState, list[tuple[int, str, bool]]] | None:
    """The state now and what changed since the state *since*: (change number, id,
    created) in change order, for each record created since that still exists
    (created=True) and each record that existed at *since* and was destroyed since
    (created=False). None when *since* is below the floor or above the state (not a state
    of this user)."""
    db = store.submissions_db
    if db is None:
        return (SubmissionState(0, 0), []) if since == 0 else None
    out: list[tuple[int, str, bool]] = []
    with store._read() as txn:
        state = _read_state(txn, db, user)
        if since < state[1] or since > state[0]:
            return None
        for kind in (b"r", b"d"):
            prefix = _key(kind, user)
            cursor = txn.cursor(db=db)
            more = cursor.set_range(prefix + _SEQ.pack(since + 1))
            while more:
                key = bytes(cursor.key())
                if not key.startswith(prefix):
                    break
                change = _SEQ.unpack(key[len(prefix) :])[0]
                value = bytes(cursor.value())
                if kind == b"r":
                    out.append((change, str(orjson.loads(value[8:]).get("id", "")), True))
                elif _SEQ.unpack(value[:8])[0] <= since:  # else made and destroyed since
                    out.append((change, value[8:].decode(), False))
                more = cursor.next()
    out.sort()
    return SubmissionState(state[0], state[1]), out
