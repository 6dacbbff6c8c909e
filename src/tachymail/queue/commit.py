"""Group commit: messages that finish while a commit is under way share the next one.

With a commit thread (``inline=False``) there is no timer. The first message
starts a commit at once; everything that arrives while that commit syncs is
taken by the following one, so batches grow with load and intake is not bounded
by the disk's sync rate, while a lone message waits for exactly one sync.

Inline commits (the default for intake, ``queue.commit``) run in the event
loop's thread after a short ``linger`` that lets concurrent messages join: the
loop stops for the sync, but no second thread competes with it for the GIL. The
gathering window closes early once no other client could join (``more_may_join``),
and intake's slides (``slide``): it stays open while messages keep joining, closing
``linger`` after the last one (at most LINGER_LIMIT lingers after it opened), so the
time the loop spends checking each message is not taken from it.

With ``chain`` (intake's inline commits, on an environment opened without metasync) a
commit costs one sync, not LMDB's two. LMDB writes the data pages, syncs them, then writes
the meta page that makes the commit visible; without metasync that write is not synced,
so a power cut could undo that one commit (never corrupt: LMDB keeps the previous meta
page's pages intact). The next commit of the file, ours or another process's, syncs the
file again and with it that meta page. So the batch is confirmed (its 250s go out) when
the environment's last transaction id shows a later commit, and the next batch starts at
once when messages wait; when none wait, one ``env.sync`` confirms it. Under load every
batch then costs one sync of the loop's time, and each message still waits for two.

Delivery results are not waited for by any client, so the delivery workers
commit with a ``linger``: the first result waits that long for others to join
it. Fewer, larger commits leave more of the queue's single write lock (shared by
every process) and of the disk's syncs to intake, where a client waits for them.
They also commit ``inline``, in the event loop's own thread: the loop stops for
the one sync of a batch every ``linger`` seconds, which costs a delivery worker
less than a commit thread would. py-lmdb releases the GIL for every put and
delete, and a second thread then waits for the busy loop to hand the GIL back
once per operation, a futex call and two context switches each time.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from tachymail.metrics import m
from tachymail.queue.envelope import Envelope
from tachymail.queue.store import QueueStore, put_message

log = logging.getLogger(__name__)

#: a gathering window that messages keep joining closes at the latest after this many
#: lingers
LINGER_LIMIT = 4
#: a window closing within this much of now closes now: uvloop rounds a timer's delay to
#: whole milliseconds, so a wait under half of one would be a timer due at once
LINGER_SLACK = 0.0006

#: an operation of any store: called with the store and the write transaction
AnyOperation = Callable[[Any, Any], Any]


class GroupCommitter:
    """Runs queue operations in batches, one synced write transaction per batch.

    Intake submits new messages (:meth:`submit`), delivery submits result updates
    (:meth:`submit_operation`); the returned future resolves once the batch is synced,
    or fails with ``StorageFull`` (any storage exhaustion: reply 452 4.3.1), the storage
    error (451 4.3.0), or, for that message alone, ``QueueIdTaken`` (its id is in use:
    451 4.3.0; the rest of the batch is stored).

    Generic over the store: anything with ``apply(operations) -> outcomes`` (the queue, the
    mailbox store). An operation's outcome that is an exception fails its future alone;
    any other outcome is the future's result. *observe* feeds the queue's commit metrics.

    Must be created inside the running event loop it serves.
    """

    def __init__(
        self,
        store: Any,
        *,
        max_batch: int = 512,
        linger: float = 0.0,
        inline: bool = False,
        observe: bool = True,
        chain: bool = False,
        slide: bool = False,
    ) -> None:
        self.store: QueueStore = store
        self.observe = observe
        #: inline commits on an environment without metasync: a batch is confirmed by the
        #: next commit's sync (see the module doc); *store* needs ``env``
        self.chain = chain and inline
        #: the last committed batch whose meta page may not be on disk yet, with its
        #: outcomes and the environment's last transaction id after it
        self._unconfirmed: (
            tuple[list[tuple[AnyOperation, asyncio.Future[Any]]], list[Any], int] | None
        ) = None
        self.max_batch = max_batch
        self.linger = linger
        #: the gathering window stays open while operations keep joining (see _linger_over)
        self.slide = slide
        self.inline = inline
        #: given the number of operations pending, whether more may join them within the
        #: linger (None: always wait); the SMTP worker answers from its open sessions
        self.more_may_join: Callable[[int], bool] | None = None
        self._lingering = False
        #: when the open gathering window opened and when its last operation joined
        self._window_opened = self._last_join = 0.0
        self._window: asyncio.TimerHandle | None = None
        # Kept, not asked for: asyncio.get_running_loop() makes a getpid system call.
        self._loop = asyncio.get_running_loop()
        self._pending: list[tuple[AnyOperation, asyncio.Future[Any]]] = []
        self._busy = False
        self._started = 0.0
        self._in_flight = 0
        #: (batch size, seconds) of the last commit, for metrics
        self.last_commit: tuple[int, float] = (0, 0.0)
        self.commits = 0
        self.messages = 0
        # One plain thread fed by a SimpleQueue: LMDB allows one write transaction per
        # environment at a time anyway, and py-lmdb releases the GIL while it syncs, so the
        # event loop keeps running. A ThreadPoolExecutor's futures, conditions and callback
        # chain cost several more GIL hand-offs per commit, each a futex call on both sides.
        self._requests: queue.SimpleQueue[list[AnyOperation] | None] = queue.SimpleQueue()
        #: started by the first commit: an idle thread still costs every GIL hand-off of
        #: the process a little (a worker's mailbox committer may never commit at all)
        self._thread: threading.Thread | None = None

    def submit(self, envelope: Envelope, content: bytes) -> asyncio.Future[None]:
        """Queue a new message for the next commit; the future resolves once it is synced."""
        return self.submit_operation(put_message(envelope, content))

    def submit_operation(self, operation: AnyOperation) -> asyncio.Future[Any]:
        """Run *operation* in the next commit; the future resolves once it is synced, with
        the operation's outcome (None for the queue's operations)."""
        future: asyncio.Future[Any] = self._loop.create_future()
        self._pending.append((operation, future))
        if self._lingering and self.slide:
            self._last_join = time.monotonic()
        self._schedule()
        return future

    def _schedule(self) -> None:
        """Start a commit of what is pending: now, or when the gathering window closes."""
        if self._busy or not self._pending:
            return
        if self._lingering:
            if not self._worth_waiting():  # everyone who could join has: no reason to wait
                self._close_window()
                self._start()
            return
        if self._unconfirmed is None and self.linger > 0 and self._worth_waiting():
            self._lingering = True
            self._window_opened = self._last_join = time.monotonic()
            self._window = self._loop.call_later(self.linger, self._linger_over)
        else:
            self._start()

    def _worth_waiting(self) -> bool:
        pending = len(self._pending)
        return pending < self.max_batch and (
            self.more_may_join is None or self.more_may_join(pending)
        )

    def _close_window(self) -> None:
        self._lingering = False
        if self._window is not None:
            self._window.cancel()
            self._window = None

    def _linger_over(self) -> None:
        # Timed by the clock, not the loop's: the loop reads its clock once per turn, so a
        # timer armed late in a long turn (one that checked several messages) fires early.
        now = time.monotonic()
        close = self._window_opened + self.linger
        if self.slide:
            # The window stays open while messages keep joining: it closes `linger` after
            # the last one, and at the latest LINGER_LIMIT lingers after it opened. Time the
            # loop spends on the messages themselves (their checks) is then not taken from
            # the window: a fixed window let only three checked 64 KiB messages in, and
            # each message of a batch of three pays for twice the syncs of one of six.
            close = min(
                max(close, self._last_join + self.linger),
                self._window_opened + self.linger * LINGER_LIMIT,
            )
        if now < close - LINGER_SLACK and self._worth_waiting():
            self._window = self._loop.call_later(close - now, self._linger_over)
            return
        self._window = None
        self._lingering = False
        if not self._busy and self._pending:
            self._start()

    def _start(self) -> None:
        # The batch is the head of _pending; what arrives meanwhile queues behind it and is
        # left there by _finish for the next commit.
        self._busy = True
        self._started = time.perf_counter()
        operations = [op for op, _ in self._pending[: self.max_batch]]
        self._in_flight = len(operations)
        if self.inline:
            error: BaseException | None = None
            outcomes: list[Any] = []
            try:
                outcomes = self.store.apply(operations)
            except Exception as exc:
                error = exc
            self._loop.call_soon(self._finish, error, outcomes)
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="queue-commit", daemon=True)
            self._thread.start()
        self._requests.put(operations)

    def _run(self) -> None:
        """The commit thread: one batch at a time, the outcome handed back to the loop."""
        while True:
            operations = self._requests.get()
            if operations is None:
                return
            error: BaseException | None = None
            outcomes: list[Any] = []
            try:
                outcomes = self.store.apply(operations)
            except Exception as exc:  # handed to every waiting client as its reply
                error = exc
            try:
                self._loop.call_soon_threadsafe(self._finish, error, outcomes)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                return

    def _finish(self, error: BaseException | None, outcomes: list[Any]) -> None:
        """Resolve the batch's futures: *error* fails them all, else each gets its outcome
        (an exception: that operation alone refused; anything else: its result)."""
        batch = self._pending[: self._in_flight]
        del self._pending[: self._in_flight]
        self._busy = False
        self.last_commit = (len(batch), time.perf_counter() - self._started)
        if error is None:
            self.commits += 1
            self.messages += len(batch)
            if self.observe:
                m.commit_batch_size.observe(len(batch))
                m.commit_duration.observe(self.last_commit[1])
        else:
            if self.observe:
                m.commit_failures.inc()
            log.error("commit of %d operations failed: %s", len(batch), error)
        if self.chain:
            self._chain(batch, error, outcomes)
        else:
            self._resolve(batch, error, outcomes)
        self._schedule()

    def _chain(
        self,
        batch: list[tuple[AnyOperation, asyncio.Future[Any]]],
        error: BaseException | None,
        outcomes: list[Any],
    ) -> None:
        """Confirm what the commit just made durable; keep *batch* for the next commit's
        sync when messages wait, else sync it now (see the module doc)."""
        last = -1  # the environment's last transaction id, read when needed (a lone
        # client's batches need none: each is synced at once)
        previous, self._unconfirmed = self._unconfirmed, None
        if previous is not None:
            older, older_outcomes, txnid = previous
            last = self.store.env.info()["last_txnid"]
            # a later commit synced the file, and with it that batch's meta page
            sync_error = None if last > txnid else self._sync()
            self._resolve(older, sync_error, older_outcomes)
        if error is not None or not batch:
            self._resolve(batch, error, outcomes)
        elif self._pending:
            if last < 0:
                last = self.store.env.info()["last_txnid"]
            self._unconfirmed = (batch, outcomes, last)
            # its sync confirms this batch: no linger, but the sessions ready now run first
            # (their messages join it) rather than the loop stopping for two syncs in a row
            self._busy = True
            self._loop.call_soon(self._start)
        else:
            self._resolve(batch, self._sync(), outcomes)

    def _sync(self) -> BaseException | None:
        """Sync the environment (the last commit's meta page); the error, if it fails."""
        try:
            self.store.env.sync(True)
        except Exception as exc:
            log.error("sync of the last commit failed: %s", exc)
            return exc
        return None

    def _resolve(
        self,
        batch: list[tuple[AnyOperation, asyncio.Future[Any]]],
        error: BaseException | None,
        outcomes: list[Any],
    ) -> None:
        """Resolve *batch*'s futures: *error* fails them all, else each gets its outcome."""
        for index, (_operation, future) in enumerate(batch):
            if future.cancelled():
                continue
            outcome = outcomes[index] if error is None and index < len(outcomes) else None
            if error is not None:
                future.set_exception(error)
            elif isinstance(outcome, Exception):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)

    @property
    def idle(self) -> bool:
        return not self._busy and not self._pending and not self._lingering

    def close(self) -> None:
        if self._thread is not None:
            self._requests.put(None)
            self._thread.join()
