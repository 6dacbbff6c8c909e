"""The queue commands that change it: flush, delete, hold, release, bounce.

Each runs as one write transaction on the live queue, beside a running server
(LMDB serialises writers across processes); `delete --all` takes one per 500 messages,
so that it also works on a full disk. A delivery under way when a message
is deleted or bounced finishes, and its result is then ignored.
"""

from __future__ import annotations

import socket
import time

import lmdb

from tachymail.config import Config
from tachymail.queue.envelope import (
    ACTIVE,
    BOUNCED,
    HELD,
    Envelope,
    Recipient,
    new_queue_id,
)
from tachymail.queue.store import Operation, QueueStore


def _ids(store: QueueStore, txn: lmdb.Transaction, target: str | None) -> list[str]:
    if target is not None:
        return [target]
    return [bytes(k).decode() for k in txn.cursor(db=store.envelopes).iternext(values=False)]


def run(store: QueueStore, config: Config, action: str, target: str | None) -> int:
    """Apply *action* to message *target* (None: every message); returns how many changed.

    Raises StorageFull when the disk has no room for the change; a delete first spends
    the store's reserve file (see QueueStore.ensure_reserve), so it commits on a full disk.
    """
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
                _bounce(store, txn, envelope, config, now)
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
    store: QueueStore, txn: lmdb.Transaction, envelope: Envelope, config: Config, now: float
) -> None:
    """Fail every pending recipient now, queueing a DSN to the sender (unless it is one)."""
    from tachymail.delivery.bounce import (
        RecipientReport,
        build_report,
        report_recipients,
    )

    pending = envelope.pending()
    reason = "5.0.0 bounced by the postmaster (tachymail queue bounce)"
    reports = []
    for rcpt in pending:
        rcpt.state = BOUNCED
        rcpt.status, rcpt.last_reply, rcpt.last_attempt = "5.0.0", reason, now
        reports.append(
            RecipientReport(
                recipient=rcpt, action="failed", status="5.0.0", diagnostic="", last_attempt=now
            )
        )
    wanted = {r.address for r in report_recipients(envelope, "failed")}
    chosen = [r for r in reports if r.recipient.address in wanted]
    content = store.content_in(txn, envelope.id)
    if not envelope.sender or not chosen or content is None:
        return
    hostname = config.server.hostname or socket.getfqdn()
    queue_id = new_queue_id()
    body = build_report(
        envelope, content, chosen, reporting_mta=hostname, now=now, queue_id=queue_id
    )
    dsn = Envelope(
        id=queue_id,
        sender="",
        recipients=[Recipient(envelope.sender)],
        arrival=now,
        size=len(body),
        helo=hostname,
        listener="dsn",
    )
    store.insert(txn, dsn, body)
