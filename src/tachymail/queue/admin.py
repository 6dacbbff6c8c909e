"""The queue commands that change it: flush, delete, hold, release, bounce.

Each runs as one write transaction on the live queue, beside a running server
(LMDB serialises writers across processes); `delete --all` takes one per 500 messages,
so that it also works on a full disk. A delivery under way when a message
is deleted or bounced finishes, and its result is then ignored.

`bounce` queues its reports in the same transaction, built by the *reporter* the caller
passes: the queue knows nothing of delivery or of report formats, so the command line
(the top layer) hands in :func:`tachymail.delivery.bounce.operator_bounce`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import lmdb

from tachymail.config import Config
from tachymail.queue.envelope import (
    ACTIVE,
    BOUNCED,
    HELD,
    Envelope,
    Recipient,
)
from tachymail.queue.store import Operation, QueueStore

#: Builds the reports to queue when the operator bounces recipients: called with the
#: message's envelope, its content (b"" if missing), the recipients as they were before
#: (their last reply and attempt), and the time; returns (envelope, content) pairs.
Reporter = Callable[[Envelope, bytes, list[Recipient], float], list[tuple[Envelope, bytes]]]

#: the reason recorded in the queue for a recipient the operator bounced
BOUNCE_REASON = "5.0.0 bounced by the operator (tachymail queue bounce)"


def _ids(store: QueueStore, txn: lmdb.Transaction, target: str | None) -> list[str]:
    if target is not None:
        return [target]
    return [bytes(k).decode() for k in txn.cursor(db=store.envelopes).iternext(values=False)]


def run(
    store: QueueStore,
    config: Config,
    action: str,
    target: str | None,
    reporter: Reporter | None = None,
) -> int:
    """Apply *action* to message *target* (None: every message); returns how many changed.

    `bounce` queues what *reporter* builds; it raises ValueError without one.

    Raises StorageFull when the disk has no room for the change; a delete first spends
    the store's reserve file (see QueueStore.ensure_reserve), so it commits on a full disk.
    """
    if action == "bounce" and reporter is None:
        raise ValueError("queue bounce needs a reporter to build the sender's report")
    if action == "delete" and target is None:
        return _delete_all(store)
    changed = 0
    now = time.time()

    def operation(store: QueueStore, txn: lmdb.Transaction) -> None:
        nonlocal changed
        changed = 0  # apply may run it again (map grown, reserve spent): count that run only
        for queue_id in _ids(store, txn, target):
            if action == "delete":
                changed += store.remove(txn, queue_id)
                continue
            envelope = store.load(txn, queue_id)
            if envelope is None:
                continue
            if action == "flush":
                due = [r for r in envelope.pending() if r.next_attempt > now]
                for rcpt in due:
                    rcpt.next_attempt = 0.0
                if not due or envelope.state == HELD:
                    continue
            elif action == "hold":
                if envelope.state == HELD:
                    continue
                envelope.state = HELD
            elif action == "release":
                if envelope.state != HELD:
                    continue
                envelope.state = ACTIVE
            elif action == "bounce":
                _bounce(store, txn, envelope, reporter, now)
            changed += 1
            store.save(txn, envelope)

    # Only a deletion may spend the reserve: it is what gives the disk's room back.
    store.apply([operation], frees_space=action == "delete")
    if action == "delete" and changed:
        store.settle()  # the room it freed is usable by the next commit, not the one after
    return changed


#: messages removed per commit by `queue delete --all`
DELETE_CHUNK = 500


def _delete_all(store: QueueStore) -> int:
    """Remove every message queued now (not those arriving meanwhile), DELETE_CHUNK per
    commit: on a full disk each commit then needs room only for its own list of freed
    pages (the first one spends the reserve), and later ones reuse what earlier ones
    freed. Raises StorageFull if even that finds no room; what was deleted stays deleted.
    """
    queue_ids = store.ids()
    removed = 0
    for start in range(0, len(queue_ids), DELETE_CHUNK):
        counted: list[int] = []
        store.apply([_remover(queue_ids[start : start + DELETE_CHUNK], counted)], frees_space=True)
        removed += counted[-1]  # the last run: apply may have run it twice
    if removed:
        store.settle()
    return removed


def _remover(queue_ids: list[str], counted: list[int]) -> Operation:
    """The operation removing *queue_ids*; appends how many it found to *counted*."""

    def operation(store: QueueStore, txn: lmdb.Transaction) -> None:
        counted.append(sum(store.remove(txn, queue_id) for queue_id in queue_ids))

    return operation


def _bounce(
    store: QueueStore,
    txn: lmdb.Transaction,
    envelope: Envelope,
    reporter: Reporter | None,
    now: float,
) -> None:
    """Fail every pending recipient now (``BOUNCE_REASON``), queueing in the same
    transaction the reports *reporter* builds about them."""
    pending = envelope.pending()
    before = [dataclasses.replace(rcpt) for rcpt in pending]  # with their last attempt
    for rcpt in pending:
        rcpt.state = BOUNCED
        rcpt.status, rcpt.last_reply, rcpt.last_attempt = "5.0.0", BOUNCE_REASON, now
    if reporter is None or not before:
        return
    content = store.content_in(txn, envelope.id) or b""
    for report, body in reporter(envelope, content, before, now):
        store.insert(txn, report, body)
