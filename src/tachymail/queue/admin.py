"""The queue commands, shared by the command line and the HTTP API: what they show of a
message (message_data, show_data), a page of a filtered listing (page), and the actions
that change the queue: flush, delete, hold, release, bounce (QueueAction, run).

Each action runs as one write transaction on the live queue, beside a running server
(LMDB serialises writers across processes); `delete --all` takes one per 500 messages,
so that it also works on a full disk. A delivery under way when a message
is deleted or bounced finishes, and its result is then ignored.

`bounce` queues its reports in the same transaction, built by the *reporter* the caller
passes: the queue knows nothing of delivery or of report formats, so the top layer (the
command line, the supervisor for the HTTP API) hands in
:func:`tachymail.delivery.bounce.operator_bounce`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import lmdb

from tachymail.config import Config
from tachymail.queue.envelope import (
    ACTIVE,
    BOUNCED,
    HELD,
    Envelope,
    Recipient,
)
from tachymail.queue.select import MessageFilter
from tachymail.queue.stats import ACTIVE as ACTIVE_STATE
from tachymail.queue.stats import DEFERRED, last_reason, message_state
from tachymail.queue.store import Operation, QueueStore

#: Builds the reports to queue when the operator bounces recipients: called with the
#: message's envelope, its content (b"" if missing), the recipients as they were before
#: (their last reply and attempt), and the time; returns (envelope, content) pairs.
Reporter = Callable[[Envelope, bytes, list[Recipient], float], list[tuple[Envelope, bytes]]]

#: the reason recorded in the queue for a recipient the operator bounced
BOUNCE_REASON = "5.0.0 bounced by the operator (tachymail queue bounce)"


def message_data(envelope: Envelope, now: float) -> dict[str, Any]:
    """One message as plain data: the stored record, with ``state`` the real state
    (active, deferred, held), ``next_attempt`` (unix time, None when held) and
    ``last_reason`` (the last reply of the pending recipient tried last, or "")."""
    data = envelope.summary()
    state = message_state(envelope, now)
    data["state"] = state
    data["next_attempt"] = None if state not in (ACTIVE_STATE, DEFERRED) else envelope.due
    data["last_reason"] = last_reason(envelope)
    return data


def show_data(envelope: Envelope, content: bytes, now: float, *, body: bool) -> dict[str, Any]:
    """`queue show --json` and the API's message: message_data plus ``headers`` (the header
    section as text) and, with *body*, ``content`` (the whole message as text; undecodable
    bytes replaced)."""
    data = message_data(envelope, now)
    end = content.find(b"\r\n\r\n")
    headers = content if end < 0 else content[: end + 2]
    data["headers"] = headers.decode("utf-8", "replace")
    if body:
        data["content"] = content.decode("utf-8", "replace")
    return data


#: envelopes one page of a filtered listing reads at most beyond its *limit* matches
#: (times the limit): a filter that matches little returns a short page and a cursor
#: instead of reading the whole queue in one request
SCAN_FACTOR = 50
#: ... and at least this many
SCAN_MIN = 10_000
#: recipients one page lists at most (a page holds at least one message): with thousands
#: of recipients per message, a thousand messages would make a reply of hundreds of MB
PAGE_RECIPIENTS = 100_000


def page(
    store: QueueStore,
    chosen: MessageFilter,
    now: float,
    *,
    after: str = "",
    limit: int = 100,
) -> tuple[list[Envelope], str | None]:
    """Up to *limit* messages matching *chosen*, oldest first, whose id sorts after
    *after*; and the id to continue after (None: the end of the queue was reached).

    Reads at most ``SCAN_FACTOR * limit`` envelopes (at least SCAN_MIN), and stops before
    ``PAGE_RECIPIENTS`` recipients: the page may be shorter than *limit*, even empty, with
    a continuation id all the same. Blocking (one LMDB read snapshot): call it off the
    event loop.
    """
    found: list[Envelope] = []
    budget = max(SCAN_FACTOR * limit, SCAN_MIN)
    recipients = 0
    last = ""
    for envelope in store.iter_envelopes(after):
        if chosen.matches(envelope, now):
            recipients += len(envelope.recipients)
            if found and recipients > PAGE_RECIPIENTS:
                break  # this one starts the next page
            found.append(envelope)
            last = envelope.id
            if len(found) >= limit:
                break
        else:
            last = envelope.id
        budget -= 1
        if budget <= 0:
            break
    else:
        return found, None  # the end of the queue
    return found, last


#: the actions of QueueAction
ACTIONS = ("flush", "delete", "hold", "release", "bounce")


class QueueAction:
    """One queue command on some messages, as an operation of a write transaction (run it
    with ``store.apply([action])`` or hand it to a group committer).

    *targets*: the queue ids (None: every message in the queue at the time it runs).
    After the run, ``changed`` says how many messages it changed and ``due_now`` holds the
    envelopes a flush or release made due (to wake the delivery workers with).
    ``bounce`` queues what *reporter* builds, in the same transaction.
    """

    def __init__(
        self,
        action: str,
        targets: list[str] | None,
        reporter: Reporter | None = None,
        now: float | None = None,
    ) -> None:
        if action not in ACTIONS:
            raise ValueError(f"not a queue action: {action!r}")
        if action == "bounce" and reporter is None:
            raise ValueError("queue bounce needs a reporter to build the sender's report")
        self.action = action
        self.targets = targets
        self.reporter = reporter
        self.now = time.time() if now is None else now
        self.changed = 0
        self.due_now: list[Envelope] = []

    def __call__(self, store: QueueStore, txn: lmdb.Transaction) -> None:
        # apply may run it again (map grown, reserve spent): count that run only
        self.changed = 0
        self.due_now = []
        targets = self.targets
        if targets is None:
            cursor = txn.cursor(db=store.envelopes)
            targets = [bytes(k).decode() for k in cursor.iternext(values=False)]
        for queue_id in targets:
            if self.action == "delete":
                self.changed += store.remove(txn, queue_id)
            elif self._change(store, txn, queue_id):
                self.changed += 1

    def _change(self, store: QueueStore, txn: lmdb.Transaction, queue_id: str) -> bool:
        """Apply the action to one message; whether it changed."""
        envelope = store.load(txn, queue_id)
        if envelope is None:
            return False
        action, now = self.action, self.now
        if action == "flush":
            due = [r for r in envelope.pending() if r.next_attempt > now]
            for rcpt in due:
                rcpt.next_attempt = 0.0
            if not due or envelope.state == HELD:
                return False
            self.due_now.append(envelope)
        elif action == "hold":
            if envelope.state == HELD:
                return False
            envelope.state = HELD
        elif action == "release":
            if envelope.state != HELD:
                return False
            envelope.state = ACTIVE
            self.due_now.append(envelope)
        elif action == "bounce":
            _bounce(store, txn, envelope, self.reporter, now)
        store.save(txn, envelope)
        return True


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
    operation = QueueAction(action, None if target is None else [target], reporter)
    # Only a deletion may spend the reserve: it is what gives the disk's room back.
    store.apply([operation], frees_space=action == "delete")
    if action == "delete" and operation.changed:
        store.settle()  # the room it freed is usable by the next commit, not the one after
    return operation.changed


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
