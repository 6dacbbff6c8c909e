"""The delivery worker: takes due recipients from the queue, groups them by next hop,
hands them to the destination pools, and writes the results back.

Only a bounded window of the queue (``delivery.max_active`` messages) is in
memory. New messages arrive as notifications from the SMTP workers
(:mod:`tachymail.queue.notify`) the moment they are committed. Everything else
(retries coming due, messages whose notification was lost, work left by a crash)
is found by reading the schedule index in due order from a cursor, with a full
rescan now and then for entries that sorted behind it (a message committed a
moment after a later one). Results are written through the group committer, so
many messages' updates share one synced transaction. A crash between the remote
250 and that write makes the message go again: delivery is at least once, never
lost. Recipients of local domains go to the mailbox store instead of a pool
(:mod:`tachymail.delivery.local`), exactly once, under the same retry and DSN rules.

With several delivery workers, worker *k* of *n* delivers the messages whose queue id
hashes to *k* (:func:`tachymail.queue.notify.shard_of`): a hot destination's messages
spread over every worker, each with its own pool to it and its share of the destination's
limits (``max_connections``, ``initial_connections`` and ``rate`` divided by *n*, at least
one connection each), so the node as a whole stays within them (a limit below *n*
connections is the exception: every worker still gets one). A message lives in one
worker, so no recipient is attempted by two at once, and its finished record is removed
without decoding.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import random
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lmdb
import orjson

from tachymail.cluster.client import Cluster
from tachymail.cluster.limits import Limits, Rate, Slots
from tachymail.config import RELOAD_READY_TIMEOUT, Config, PoolConfig
from tachymail.delivery import shaping
from tachymail.delivery.bounce import RecipientReport, notifications
from tachymail.delivery.classify import (
    BounceClassifier,
    RulesError,
    builtin_rules,
    load_classifier,
)
from tachymail.delivery.destinations import DestinationGate, DestinationStats
from tachymail.delivery.egress import DEFAULT, DEFAULT_SOURCE, Egress, Source, pool_header
from tachymail.delivery.eightbit import needs_8bit
from tachymail.delivery.local import LocalDelivery, LocalOutcome
from tachymail.delivery.pool import (
    DEFERRED,
    DELIVERED,
    FAILED,
    DeliveryPool,
    Job,
    JobResult,
    Outcome,
)
from tachymail.dns.resolver import Resolver
from tachymail.metrics import m
from tachymail.queue.commit import GroupCommitter
from tachymail.queue.envelope import BOUNCED, QUEUED, Envelope, Recipient
from tachymail.queue.envelope import (
    DELIVERED as RCPT_DELIVERED,
)
from tachymail.queue.events import (
    EVENT_FIELDS,
    events_wanted,
    make_event,
    new_event_id,
    record_events,
)
from tachymail.queue.notify import Listener, shard_of
from tachymail.queue.store import Operation, QueueStore, StorageFull
from tachymail.queue.suppression import Suppression, SuppressionError, make_entry, shared_list
from tachymail.queue.suspensions import Suspension
from tachymail.smtpclient.routing import NextHop, OwnEndpoints, Router, RoutingFailure

log = logging.getLogger(__name__)

# Seconds between looks at the schedule, and between full rescans, with notifications
# coming in and without them (the channel not bound yet, after a reload). With them the
# scan is only a safety net; without, it is how new mail is found.
POLL, POLL_UNNOTIFIED = 0.1, 0.02
RESCAN, RESCAN_UNNOTIFIED = 1.0, 0.1
#: TEST FAULT INJECTION, never for production: a recipient address whose delivery attempts
#: raise RuntimeError once the peer has answered, as a bug in the delivery path would. Read
#: once when a delivery worker starts; documented in docs/configuration.md.
TEST_FAULT_ENV = "TACHYMAIL_TEST_DELIVERY_FAULT"
#: commits of one result tried before giving up on an error other than StorageFull (which
#: is retried as long as the worker runs: space comes back, a broken operation does not)
COMMIT_TRIES = 3
#: the outcome of an attempt that raised: a temporary failure like any other (RFC 3463 X.3.0)
INTERNAL_ERROR = Outcome(DEFERRED, 451, "4.3.0", "4.3.0 internal error during delivery")
#: lanes a worker remembers (recipient domains times sources) before starting afresh
MAX_LANES = 100_000
#: the hop of recipients in local domains: the mailbox store (tachymail.delivery.local)
LOCAL_HOP = "local"
#: the event (tachymail.queue.events) of an attempt's outcome; a failure that is a deferral
#: past the message's lifetime is an "expiry"
_EVENT_TYPES = {DELIVERED: "delivery", DEFERRED: "transient_failure", FAILED: "bounce"}
#: the delivery log's "result" of each outcome
_RESULTS = {DELIVERED: "delivered", FAILED: "bounced", DEFERRED: "deferred"}


@dataclass(slots=True)
class Lane:
    """Where mail to one domain through one next hop from one egress source goes."""

    key: str
    pool: DeliveryPool
    shape: shaping.Shape
    source: Source
    #: the source's transactions (tachymail_egress_messages_total)
    sent: Any = None


@dataclass(slots=True)
class Attempt:
    """One recipient's result in one delivery attempt, for the queue and the log."""

    index: int
    recipient: Recipient
    outcome: Outcome
    hop: str
    remote_ip: str = ""
    tls: str = ""
    #: the next hop took the DSN parameters: a success is its to report, not ours
    dsn_passed: bool = False
    #: local delivery found the message already in the mailbox (an earlier attempt's)
    duplicate: bool = False
    #: the retry schedule of the shaping rule that applied (empty: [delivery]'s)
    retry: tuple[int, ...] = ()


class DeliveryLog:
    """One JSON line per attempt, appended with O_APPEND so several processes can share it.

    Lines gather until the event loop turns and then go out in one write: O_APPEND keeps
    each write whole and in place, and under load one system call carries many lines.
    """

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        self.lines: list[bytes] = []

    def write(self, records: list[dict[str, object]]) -> None:
        if not records:
            return
        if not self.lines:
            asyncio.get_running_loop().call_soon(self.flush)
        self.lines.extend(orjson.dumps(r) + b"\n" for r in records)

    def flush(self) -> None:
        if self.lines:
            data, self.lines = b"".join(self.lines), []
            try:
                os.write(self.fd, data)
            except OSError as exc:
                # A full disk must not stop delivery: the queue, not this log, is the record.
                log.warning("delivery log: %d lines lost: %s", data.count(b"\n"), exc)

    def close(self) -> None:
        self.flush()
        os.close(self.fd)


class DeliveryWorker:
    """Delivers the recipients of shard ``index`` of ``count`` (see the module docstring)."""

    def __init__(
        self,
        config: Config,
        index: int,
        count: int,
        store: QueueStore,
        committer: GroupCommitter,
        local: LocalDelivery | None = None,
    ) -> None:
        self.config = config
        self.index = index
        self.count = count
        self.store = store
        self.committer = committer
        delivery = config.delivery
        self.resolver = Resolver(delivery.resolver or None, timeout=delivery.dns_timeout)
        self.router = Router(config, self.resolver)
        #: our listeners, so that a next hop pointing back at us bounces (5.4.6)
        self.own = OwnEndpoints(config)
        self.pools: dict[str, DeliveryPool] = {}
        #: the local hop; made on first use when the caller gave none
        self.local = local
        self.active: set[str] = set()
        self.skipped: set[bytes] = set()
        self.cursor = b""
        self.last_rescan = 0.0
        log_path = (
            Path(delivery.log_file) if delivery.log_file else config.data_path / "delivery.log"
        )
        self.log = DeliveryLog(log_path)
        self.hostname = config.server.hostname
        self.loop = asyncio.get_running_loop()
        self.wake = asyncio.Event()
        #: the window was full when there was work: wake the poll when a slot frees
        self.starved = False
        self.stopping = False
        #: set with ``stopping``: ends the waits between retries of a failed result commit
        self.halt = asyncio.Event()
        #: queue id -> time before which it is not taken again: its attempt could not be
        #: recorded, so the queue still says it is due (memory only; a restart forgets it)
        self.held: dict[str, float] = {}
        self.listener = Listener(config.data_path, index, self._notified)
        #: suspended destinations (not attempted) and the per-destination status file
        self.gate = DestinationGate(config.data_path)
        self.stats = DestinationStats(config.data_path, index)
        #: counters for metrics and tests
        self.attempts = 0
        self.delivered = 0
        self.bounced = 0
        #: the class of each failure's reply (tachymail.delivery.classify)
        self.classifier = _classifier(config)
        #: traffic shaping, egress sources and the limiters they share (cluster-wide ones
        #: through Redis when [cluster] redis is set)
        self.shaping = shaping.current(config)
        self.egress = Egress(config, index, count)
        self.cluster = Cluster(config)
        self.limits = Limits(self.cluster, count)
        #: reactions in force: (reaction, shape, source) -> when it ends
        self.reacting: dict[tuple[str, str, str], float] = {}
        self._bases: dict[str, PoolConfig] = {}
        #: throttle reactions in force, for the status: (rule, source) -> description
        self.throttles: dict[tuple[str, str], dict[str, Any]] = {}
        self.described: dict[str, Any] | None = None
        #: (domain, next hop key, source) -> its lane (see _lane)
        self.lanes: dict[tuple[str, str, Source], Lane] = {}
        #: classes of permanent failures that put the recipient on the suppression list
        self.suppress_classes = frozenset(config.suppression.on_bounce_classes)
        self.test_fault = os.environ.get(TEST_FAULT_ENV, "").lower()
        if self.test_fault:
            log.warning(
                "TEST FAULT INJECTION ACTIVE (%s): attempts for <%s> will raise",
                TEST_FAULT_ENV,
                self.test_fault,
            )

    # --- taking work from the queue ------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        # The notification channel doubles as this shard's lock. After a reload the worker
        # being replaced holds it until its last message is recorded; until then this one
        # takes nothing, or both would deliver the messages the old one still holds. A
        # worker that died let go of it with its last breath; should the channel stay taken
        # anyway, the queue scan takes over after the old worker's drain time.
        # The old worker is retired only once the new SMTP workers listen (or time out).
        drain = self.config.server.drain_timeout + RELOAD_READY_TIMEOUT
        patience = time.monotonic() + drain + 5
        waiting_logged = False
        try:
            while not stop.is_set():
                notified = self.listener.bind()
                if notified or time.monotonic() > patience:
                    try:
                        self.poll(RESCAN if notified else RESCAN_UNNOTIFIED)
                    except lmdb.Error as exc:
                        log.error("delivery worker %d: queue read failed: %s", self.index, exc)
                    self._destinations()
                elif not waiting_logged:
                    waiting_logged = True
                    log.info(
                        "delivery worker %d: waiting for its predecessor to finish", self.index
                    )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), POLL if notified else POLL_UNNOTIFIED)
                self.wake.clear()
        finally:
            self.stopping = True  # take no new work, notified or not
            self.halt.set()
        # Let transactions under way finish (the caller bounds this by its drain timeout),
        # then hand the channel on to the worker that replaces this one.
        while self.active:
            await asyncio.sleep(0.05)
        self.listener.close()
        self.stats.close()
        self.gate.close()
        self.egress.save()
        await self.limits.close()
        await self.cluster.close()

    def _destinations(self) -> None:
        """Once a second: publish the destination status, and make due at once what was
        postponed under a suspension since lifted (tachymail.delivery.destinations)."""
        now = time.time()
        if now - self.stats.published < 1.0:
            return
        connections: dict[str, int] = defaultdict(int)
        for pool in self.pools.values():
            connections[pool.hop.key] += pool.open_connections
        if self.described is None:
            self.described = self.shaping.describe()  # the rules do not change in a worker
        shaping_state = {
            **self.described,
            "throttles": [t for t in self.throttles.values() if t["until"] > now],
            "limits": self.limits.snapshot(),
        }
        self.stats.publish(connections, now, {"shaping": shaping_state})
        released = self.gate.lifted(now)
        if released and not self.stopping:
            self.loop.create_task(self._release(released))

    async def _release(self, released: list[tuple[str, Operation]]) -> None:
        for queue_id, operation in released:
            try:
                await self.committer.submit_operation(operation)
            except Exception as exc:  # they go at their postponed time instead
                log.warning("%s: release after a resume not recorded: %s", queue_id, exc)
        self._notified([queue_id for queue_id, _ in released])

    def poll(self, rescan_every: float = RESCAN_UNNOTIFIED) -> None:
        room = self.config.delivery.max_active - len(self.active)
        if room <= 0:
            self.starved = True
            return
        now = time.time()
        limit = min(room * 2, 2000)
        entries = self.store.due_ids(now, self.cursor, limit)
        count, index = self.count, self.index
        wanted = [
            (key, queue_id)
            for key, queue_id in entries
            if queue_id not in self.active
            and key not in self.skipped
            and (count == 1 or shard_of(queue_id, count) == index)  # others' messages unread
        ]
        full = len(wanted) > room
        del wanted[room:]
        snapshots = self.store.snapshots([queue_id for _, queue_id in wanted])
        for (key, queue_id), snapshot in zip(wanted, snapshots, strict=True):
            self._take(key, queue_id, snapshot, now)
        if full:
            # The window is full: carry on from the last entry taken when slots free up.
            self.starved = True
            self.cursor = wanted[-1][0]
            return
        if entries:
            self.cursor = entries[-1][0]
        if len(entries) < limit and now - self.last_rescan >= rescan_every:
            self.cursor = b""
            self.last_rescan = now
            self.skipped.clear()
            if self.held:  # forget holds that ran out (or whose message is gone)
                self.held = {q: until for q, until in self.held.items() if until > now}

    def _notified(self, ids: list[str]) -> None:
        """Newly queued messages from the SMTP workers: start them now if there is room."""
        if self.stopping:
            return
        room = self.config.delivery.max_active - len(self.active)
        count, index = self.count, self.index
        wanted = [
            queue_id
            for queue_id in ids
            if queue_id not in self.active and (count == 1 or shard_of(queue_id, count) == index)
        ]
        if len(wanted) > room:
            self.starved = True  # the scan takes the rest when slots free up
            del wanted[max(room, 0) :]
        now = time.time()
        try:
            snapshots = self.store.snapshots(wanted)
        except lmdb.Error as exc:
            log.error("delivery worker %d: queue read failed: %s", self.index, exc)
            return
        for queue_id, snapshot in zip(wanted, snapshots, strict=True):
            self._take(None, queue_id, snapshot, now)

    def _take(
        self,
        key: bytes | None,
        queue_id: str,
        snapshot: tuple[Envelope, bytes, bytes] | None,
        now: float,
    ) -> bool:
        """Start delivering *queue_id* (schedule entry *key*, None when notified)."""
        if snapshot is None or queue_id in self.active:
            return False
        if self.held and self.held.get(queue_id, 0.0) > now:
            if key is not None:
                self.skipped.add(key)  # not read again by every rescan until the hold ends
            return False
        self.held.pop(queue_id, None)
        envelope, content, raw = snapshot
        mine = [
            (i, r)
            for i, r in enumerate(envelope.recipients)
            if r.state == QUEUED and r.next_attempt <= now
        ]
        if not mine or envelope.state != "active":
            if key is not None:
                self.skipped.add(key)
            return False
        self.active.add(queue_id)
        self.loop.create_task(self._deliver(envelope, content, raw, mine))
        return True

    # --- one message ----------------------------------------------------------------------

    async def _deliver(
        self, envelope: Envelope, content: bytes, raw: bytes, mine: list[tuple[int, Recipient]]
    ) -> None:
        """Attempt and record; whatever fails, the next attempt follows the retry schedule.

        An attempt that raises is recorded as ``451 4.3.0 internal error during delivery``
        (traceback logged once). A result that cannot be committed is retried by
        :meth:`_commit` without sending the message again. Only if even that gives up (the
        worker stops, or an error other than StorageFull persists) is the message held in
        memory for one retry interval, then sent again (at least once).
        """
        domains = [r.address.rpartition("@")[2].lower() for _, r in mine]
        self.stats.begin(domains)
        try:
            try:
                attempts = await self._attempt(envelope, content, mine)
            except Exception:
                log.exception(
                    "delivery of %s failed unexpectedly; deferred on the retry schedule",
                    envelope.id,
                )
                attempts = [Attempt(i, r, INTERNAL_ERROR, "internal") for i, r in mine]
            now = time.time()
            for attempt in attempts:
                outcome = attempt.outcome
                domain = attempt.recipient.address.rpartition("@")[2].lower()
                ok = outcome.kind == DELIVERED
                self.stats.attempted(domain, ok, outcome.code, outcome.reply, now)
            if attempts:  # none when every recipient's destination is suspended
                await self._record(envelope, content, raw, attempts)
        except Exception:
            # The queue still says "due now": without this hold it would go again at once.
            delay = self._retry_delay(1 + min((r.attempts for _, r in mine), default=0))
            self.held[envelope.id] = time.time() + delay
            log.exception(
                "result of %s not recorded; it stays queued, next attempt in %.0fs",
                envelope.id,
                delay,
            )
        finally:
            self.stats.end(domains)
            self.active.discard(envelope.id)
            if self.starved:
                self.starved = False
                self.wake.set()

    async def _attempt(
        self, envelope: Envelope, content: bytes, mine: list[tuple[int, Recipient]]
    ) -> list[Attempt]:
        by_domain: dict[str, list[tuple[int, Recipient]]] = defaultdict(list)
        for index, rcpt in mine:
            by_domain[rcpt.address.rpartition("@")[2].lower()].append((index, rcpt))
        attempts: list[Attempt] = []
        # One group per lane (next hop, shape and egress source): one pool each.
        groups: dict[str, tuple[NextHop, Lane, list[tuple[int, Recipient]]]] = {}
        local_rcpts: list[tuple[int, Recipient]] = []
        egress = self.egress
        if egress.active:
            # The API's pool field wins over the header, which goes either way.
            requested, content = pool_header(content)
            pool_name = egress.pool_of(envelope.pool or requested, envelope.sender)
        else:
            pool_name = DEFAULT
        # Recipients of suspended destinations: not attempted, postponed (no attempt counted).
        held: list[tuple[Suspension, list[tuple[int, Recipient]]]] = []
        now = time.time()
        for domain, rcpts in by_domain.items():
            suspension = self.gate.check((domain,), now)  # before routing: no DNS for it
            if suspension is not None:
                held.append((suspension, rcpts))
                continue
            hop = await self.router.route(domain)
            if isinstance(hop, NextHop) and not hop.local:
                self.stats.routed(domain, hop.key, hop.hosts)
                suspension = self.gate.check(hop.hosts, now)
                if suspension is not None:
                    held.append((suspension, rcpts))
                    continue
            if isinstance(hop, RoutingFailure):
                kind = FAILED if hop.permanent else DEFERRED
                outcome = Outcome(kind, hop.code, hop.status, f"{hop.status} {hop.text}")
                attempts += [Attempt(i, r, outcome, "dns") for i, r in rcpts]
            elif hop.local:
                local_rcpts.extend(rcpts)
            else:
                source = DEFAULT_SOURCE  # the default pool: no choice to make
                if pool_name != DEFAULT:
                    names = (domain, *hop.hosts)
                    picked = egress.pick(pool_name, self._source_free(names, now))
                    if picked is None:
                        held.append((self._no_source(pool_name, names, domain, now), rcpts))
                        continue
                    source = picked
                lane = self.lanes.get((domain, hop.key, source))
                if lane is None:
                    lane = self._lane(domain, hop, source)
                group = groups.get(lane.key)
                if group is None:
                    group = groups[lane.key] = (hop, lane, [])
                group[2].extend(rcpts)
        if held:
            await self._commit(envelope.id, self.gate.postpone(envelope.id, held, now))
        eight_bit = envelope.mail_params.get("BODY") == "8BITMIME" or needs_8bit(content)
        loop = self.loop
        waits: list[
            tuple[NextHop, Lane, list[tuple[int, Recipient]], asyncio.Future[JobResult]]
        ] = []
        for hop, lane, rcpts in groups.values():
            pool = lane.pool
            step = pool.limits.max_recipients
            for start in range(0, len(rcpts), step):
                chunk = rcpts[start : start + step]
                future: asyncio.Future[JobResult] = loop.create_future()
                job = Job(
                    envelope.sender,
                    envelope.mail_params,
                    [r for _, r in chunk],
                    content,
                    eight_bit,
                    future,
                    flushed=any(flushed_by_operator(r) for _, r in chunk),
                )
                pool.submit(job)
                lane.sent.pending += 1
                if lane.source.warmup_daily:
                    egress.sent(lane.source)
                waits.append((hop, lane, chunk, future))
        if local_rcpts:
            # Into the mailboxes while the remote transactions are under way.
            if self.local is None:
                self.local = LocalDelivery(self.config)
                self.local.queue = self.committer  # vacation replies
            outcomes = await self.local.deliver(envelope, content, [r for _, r in local_rcpts])
            for (i, rcpt), outcome in zip(local_rcpts, outcomes, strict=True):
                duplicate = isinstance(outcome, LocalOutcome) and outcome.duplicate
                attempts.append(Attempt(i, rcpt, outcome, LOCAL_HOP, duplicate=duplicate))
        for hop, lane, chunk, future in waits:
            result = await future
            retry = lane.shape.retry_schedule
            reacted = False
            for (i, rcpt), outcome in zip(chunk, result.outcomes, strict=True):
                attempts.append(
                    Attempt(
                        i,
                        rcpt,
                        outcome,
                        result.remote_host or hop.key,
                        result.remote_ip,
                        result.tls,
                        result.dsn,
                        False,
                        retry,
                    )
                )
                if outcome.kind != DELIVERED and not reacted and self.shaping.reactions:
                    reacted = await self._react(lane.shape, lane.source, hop, outcome)
        if self.test_fault and any(
            a.recipient.address.lower() == self.test_fault for a in attempts
        ):
            raise RuntimeError(f"test fault injection ({TEST_FAULT_ENV})")
        return attempts

    def _lane(self, domain: str, hop: NextHop, source: Source) -> Lane:
        """The lane of mail to *domain* through *hop* from *source*: its shape and pool
        (made on first use, kept: a dict lookup per recipient domain after that)."""
        if len(self.lanes) > MAX_LANES:
            self.lanes.clear()  # bounded; pools themselves stay in self.pools
        shape = self.shaping.shape(domain, hop.key, hop.hosts, source.name, self._base_limits(hop))
        pool_key = f"{hop.key}|{shape.key}|{source.name}"
        lane = Lane(pool_key, self._pool(pool_key, hop, shape, source), shape, source)
        lane.sent = m.egress_tally(source.name)
        self.lanes[(domain, hop.key, source)] = lane
        return lane

    def _pool(self, key: str, hop: NextHop, shape: shaping.Shape, source: Source) -> DeliveryPool:
        pool = self.pools.get(key)
        if pool is None:
            settings = hop.settings
            if source is not DEFAULT_SOURCE or shape.tls:
                settings = dataclasses.replace(
                    settings,
                    helo=source.helo or settings.helo,
                    local_address=source.address,
                    tls=shape.tls or settings.tls,
                )
                hop = dataclasses.replace(hop, settings=settings)
            limits = self._worker_share(shape.limits)
            rates: list[Rate] = []
            slots: list[Slots] = []
            if shape.rate_budget is not None:
                budget = shape.rate_budget
                rates.append(
                    self.limits.rate(
                        budget.key, shape.rate, shape.burst, budget.shared, budget.rule
                    )
                )
            if shape.connection_budget is not None:
                budget = shape.connection_budget
                slots.append(
                    self.limits.slots(
                        budget.key, shape.connection_limit, budget.shared, budget.rule
                    )
                )
            if source.rate:
                rates.append(
                    self.limits.rate(f"source:{source.name}", source.rate, 1, False, source.name)
                )
            if source.max_connections:
                slots.append(
                    self.limits.slots(
                        f"source:{source.name}", source.max_connections, False, source.name
                    )
                )
            pool = DeliveryPool(
                hop, limits, self.resolver, own=self.own, rates=tuple(rates), slots=tuple(slots)
            )
            self.pools[key] = pool
        return pool

    def _source_free(self, names: tuple[str, ...], now: float) -> Callable[[Source], bool]:
        """Whether a source may send to *names* now (no suspension of it there)."""
        gate = self.gate
        return lambda source: gate.check_source(names, source.name, now) is None

    def _no_source(
        self, pool_name: str, names: tuple[str, ...], domain: str, now: float
    ) -> Suspension:
        """Why no source of *pool_name* may send to *names* now, as the suspension that
        holds the recipients back: the first source's own suspension, or the end of the
        day for a warm-up cap."""
        for source, _ in self.egress.pools[pool_name].members:
            suspension = self.gate.check_source(names, source.name, now)
            if suspension is not None:
                return suspension
        for source, _ in self.egress.pools[pool_name].members:
            m.warmup_deferred.labels(source.name).inc()
        reason = f"every source of egress pool {pool_name} reached its warm-up cap for today"
        return Suspension(domain, self.egress.next_day(), reason, now)

    async def _react(
        self, shape: shaping.Shape, source: Source, hop: NextHop, outcome: Outcome
    ) -> bool:
        """Apply the shaping reaction *outcome* matches, once while it is in force:
        suspend the destination (or only *source* towards it), or throttle the shape's
        rate. True when one matched."""
        reaction = self.shaping.reaction(outcome.code, outcome.status, outcome.text, shape.provider)
        if reaction is None:
            return False
        now = time.time()
        key = (reaction.name, shape.key, source.name)
        if self.reacting.get(key, 0.0) > now:
            return True
        self.reacting[key] = now + reaction.seconds
        m.shaping_reactions.labels(reaction.action).inc()
        fields = {
            "event": "shaping_reaction",
            "reaction": reaction.name,
            "action": reaction.action,
            "source": source.name,
            "destination": hop.key,
            "reply": outcome.reply,
            "seconds": reaction.seconds,
        }
        if reaction.action == "throttle":
            budget = shape.rate_budget
            if budget is None:
                log.info("shaping reaction %s to %s: no rate to throttle", reaction.name, hop.key)
                return True
            rate = self.limits.rate(budget.key, shape.rate, shape.burst, budget.shared, budget.rule)
            rate.set_factor(reaction.rate_factor)
            m.shaping_rate_factor.labels(budget.rule, source.name).set(reaction.rate_factor)
            self.throttles[(budget.rule, source.name)] = {
                "rule": budget.rule,
                "source": source.name,
                "reaction": reaction.name,
                "factor": reaction.rate_factor,
                "until": round(now + reaction.seconds, 3),
                "reply": outcome.reply[:200],
            }
            log.warning(
                "shaping reaction %s: rate of %s from %s x%.2f for %.0fs (%s)",
                reaction.name,
                budget.rule,
                source.name,
                reaction.rate_factor,
                reaction.seconds,
                outcome.reply,
                extra={"fields": fields},
            )

            def lift() -> None:
                self.throttles.pop((budget.rule, source.name), None)
                rate.set_factor(1.0)
                m.shaping_rate_factor.labels(budget.rule, source.name).set(1.0)
                log.info("shaping reaction %s lifted: rate of %s", reaction.name, budget.rule)

            self.loop.call_later(reaction.seconds, lift)
            return True
        only = source.name if reaction.action == "suspend_source" else ""
        until = now + reaction.seconds
        reason = f"shaping reaction {reaction.name}: {outcome.reply}"[:400]
        log.warning(
            "shaping reaction %s: %s %s%s for %.0fs (%s)",
            reaction.name,
            "suspending source" if only else "suspending",
            f"{only} towards " if only else "",
            ", ".join(shape.suspend_targets),
            reaction.seconds,
            outcome.reply,
            extra={"fields": fields},
        )
        try:
            await self.loop.run_in_executor(
                None, self.gate.suspend_all, shape.suspend_targets, until, reason, only
            )
        except Exception as exc:  # the reply is deferred all the same; retried next time
            log.error("shaping reaction %s not recorded: %s", reaction.name, exc)
            self.reacting.pop(key, None)
        return True

    def _base_limits(self, hop: NextHop) -> PoolConfig:
        """[pool] with the ``[[pool_override]]`` of *hop* applied (shaping rules go on it)."""
        cached = self._bases.get(hop.key)
        if cached is None:
            cached = self._bases[hop.key] = self._overridden(hop)
        return cached

    def _worker_share(self, limits: PoolConfig) -> PoolConfig:
        limits = dataclasses.replace(limits)
        if self.count > 1:
            # Every worker has a pool to this destination: each takes its share of the
            # node's limits, so that together they stay within them.
            limits.max_connections = max(1, limits.max_connections // self.count)
            limits.initial_connections = min(
                max(1, limits.initial_connections // self.count), limits.max_connections
            )
            limits.rate /= self.count
        return limits

    def _overridden(self, hop: NextHop) -> PoolConfig:
        limits = dataclasses.replace(self.config.pool)
        names = {h.lower() for h in hop.hosts} | {hop.key.partition(":")[2].lower()}
        for override in self.config.pool_overrides:
            if override.match.lower() in names or any(
                name.endswith("." + override.match.lower()) for name in names
            ):
                for name in (
                    "max_connections",
                    "initial_connections",
                    "max_messages_per_connection",
                    "max_recipients",
                    "idle_timeout",
                ):
                    value = getattr(override, name)
                    if value:
                        setattr(limits, name, value)
                if override.rate >= 0:
                    limits.rate = override.rate
        return limits

    # --- results --------------------------------------------------------------------------

    def _retry_delay(self, attempts: int, schedule: tuple[int, ...] | list[int] = ()) -> float:
        schedule = schedule or self.config.delivery.retry_schedule
        base = schedule[min(attempts, len(schedule)) - 1] if attempts else schedule[0]
        return base * random.uniform(0.9, 1.1)

    async def _record(
        self, envelope: Envelope, content: bytes, raw: bytes, attempts: list[Attempt]
    ) -> None:
        """Write the attempt's results to the queue, with any DSN, and log them.

        *raw* is the envelope record the attempt started from: when the attempt finished
        every recipient and the record is still the same at commit time, the message is
        removed without decoding and re-encoding it (the common case under load).
        """
        now = time.time()
        delivery = self.config.delivery
        lifetime = delivery.max_lifetime if envelope.sender else delivery.bounce_lifetime
        expired = now - envelope.arrival >= lifetime
        latency = now - envelope.arrival
        until = envelope.arrival + lifetime
        verbose = log.isEnabledFor(logging.INFO)
        # Reports of deferrals are built only when they may make the delay warning (once
        # per message, to a sender: see _reports); most deferrals need none.
        warn_after = delivery.delay_warning
        may_warn = bool(
            envelope.sender and warn_after and not envelope.warned and latency >= warn_after
        )
        changes: dict[int, Recipient] = {}
        failed: list[RecipientReport] = []
        delayed: list[RecipientReport] = []
        succeeded: list[RecipientReport] = []
        records: list[dict[str, Any]] = []
        hard: list[tuple[str, str, Outcome]] = []
        for attempt in attempts:
            rcpt = attempt.recipient
            outcome = attempt.outcome
            kind = outcome.kind
            bounce_class = (
                ""
                if kind == DELIVERED
                else self.classifier.classify(outcome.code, outcome.status, outcome.text)
            )
            if kind == DEFERRED and expired:
                kind = FAILED
                outcome = Outcome(
                    FAILED,
                    outcome.code,
                    "4.4.7",
                    f"{outcome.reply} (gave up after {lifetime // 3600} hours)",
                )
            updated = Recipient(
                rcpt.address,
                rcpt.params,
                state=QUEUED,
                attempts=rcpt.attempts + 1,
                last_attempt=now,
                last_reply=outcome.reply,
                status=outcome.status,
                remote_mta=attempt.hop,
            )
            if kind == DELIVERED:
                updated.state = RCPT_DELIVERED
                self.delivered += 1
                m.delivery_latency.observe(latency)
                # A success notice only for NOTIFY=SUCCESS, and only when the next hop
                # could not take the request on (RFC 3461 §5.2.2): one with DSN reports
                # delivery itself, and a second, "relayed" report would be wrong. Into a
                # mailbox here is final delivery: "delivered" (RFC 3464 §2.3.3).
                if not attempt.dsn_passed and "SUCCESS" in rcpt.params.get("NOTIFY", "").upper():
                    action = "delivered" if attempt.hop == LOCAL_HOP else "relayed"
                    succeeded.append(_report(updated, action, outcome, attempt, now, until))
            elif kind == FAILED:
                updated.state = BOUNCED
                failed.append(
                    _report(updated, "failed", outcome, attempt, now, until, bounce_class)
                )
                m.bounce_classes.labels(bounce_class or "unknown").inc()
                # A refusal, not a lifetime run out, of a class that says "never again".
                if attempt.outcome.kind == FAILED and bounce_class in self.suppress_classes:
                    hard.append((rcpt.address, bounce_class, outcome))
            else:
                updated.next_attempt = now + self._retry_delay(updated.attempts, attempt.retry)
                if may_warn:
                    delayed.append(_report(updated, "delayed", outcome, attempt, now, until))
            changes[attempt.index] = updated
            self.attempts += 1
            # The log line is the event (tachymail.queue.events) and a few fields more.
            records.append(
                make_event(
                    _EVENT_TYPES[kind]
                    if kind != FAILED or attempt.outcome.kind == FAILED
                    else "expiry",
                    envelope=envelope,
                    recipient=rcpt.address,
                    destination=attempt.hop,
                    remote_ip=attempt.remote_ip,
                    code=outcome.code,
                    enhanced_code=outcome.status,
                    reply=outcome.reply,
                    bounce_class=bounce_class,
                    attempt=updated.attempts,
                    when=now,
                )
            )
            records[-1].update(
                {
                    "next_hop": attempt.hop,
                    "result": _RESULTS[kind],
                    "tls": attempt.tls,
                    "latency": round(latency, 4),
                }
            )
            record = records[-1]
            m.delivery_attempt(str(record["result"]), attempt.hop)
            if attempt.hop == LOCAL_HOP:
                local_result = "duplicate" if attempt.duplicate else str(record["result"])
                m.local_deliveries[local_result].inc()
            if verbose:
                log.info(
                    "%s to <%s> via %s: %s: %s",
                    envelope.id,
                    rcpt.address,
                    attempt.hop,
                    record["result"],
                    outcome.reply,
                    extra={
                        "fields": {"event": "delivery_attempt", "queue_id": envelope.id, **record}
                    },
                )
        # Nothing to report (the common case: delivered, no NOTIFY=SUCCESS): no DSN work.
        reports = (
            self._reports(envelope, content, failed, delayed, succeeded, now)
            if failed or delayed or succeeded
            else []
        )
        finished = len(changes) == len(envelope.recipients) and all(
            r.state != QUEUED for r in changes.values()
        )
        warned = delayed_reported(reports)
        events = self._events(records, warned) if self.config.webhooks else None
        if hard:
            events = await self._suppress(envelope, hard, events, now)
        operation = _apply_attempt(
            envelope.id,
            changes,
            reports,
            warned=warned,
            finished_from=(raw, envelope.due) if finished else None,
            events=events,
        )
        try:
            await self._commit(envelope.id, operation)
        finally:
            self.log.write(records)

    def _events(self, records: list[dict[str, Any]], warned: bool) -> Operation | None:
        """The operation recording the webhooks' events of one attempt (None: none wanted):
        each record's event, and a ``delay`` event per deferred recipient when the delay
        warning went out with this attempt."""
        config = self.config
        events: list[dict[str, Any]] = []
        for record in records:
            event = {name: record.get(name, "") for name in EVENT_FIELDS}
            if events_wanted(config, event["type"]):
                events.append(event)
            if warned and record["type"] == "transient_failure" and events_wanted(config, "delay"):
                events.append({**event, "id": new_event_id(), "type": "delay"})
        return record_events(events) if events else None

    async def _suppress(
        self,
        envelope: Envelope,
        hard: list[tuple[str, str, Outcome]],
        events: Operation | None,
        now: float,
    ) -> Operation | None:
        """Put the recipients of *hard* (address, bounce class, outcome) on the suppression
        list (scope global, source "bounce", reason "CLASS: REPLY"), before the attempt's
        result is committed: a crash in between sends the message again, which bounces
        again and adds the same entry again. Returns *events* with a "suppression" event
        per entry when a webhook wants them. A list that cannot be written is logged and
        the result is recorded all the same."""
        expiry = self.config.suppression.bounce_expiry
        added: list[tuple[Suppression, str, Outcome]] = []
        for address, bounce_class, outcome in hard:
            try:
                entry = make_entry(
                    address,
                    None,
                    f"{bounce_class}: {outcome.reply}",
                    "bounce",
                    now + expiry if expiry else 0.0,
                    now,
                )
            except SuppressionError:
                continue  # not an address the list can hold (a domain-less postmaster)
            added.append((entry, bounce_class, outcome))
        if not added:
            return events
        suppressions = shared_list(self.config.data_path)
        try:
            # An fsync: off the event loop.
            await self.loop.run_in_executor(
                None, suppressions.add_many, [entry for entry, _, _ in added]
            )
        except Exception as exc:
            log.error("%s: could not add to the suppression list: %s", envelope.id, exc)
            return events
        for entry, bounce_class, _ in added:
            m.suppressions_added.labels(bounce_class).inc()
            log.info("%s: <%s> suppressed: %s", envelope.id, entry.address, entry.reason)
        if not (self.config.webhooks and events_wanted(self.config, "suppression")):
            return events
        extra = record_events(
            [
                make_event(
                    "suppression",
                    envelope=envelope,
                    recipient=entry.address,
                    code=outcome.code,
                    enhanced_code=outcome.status,
                    reply=outcome.reply,
                    bounce_class=bounce_class,
                    when=now,
                )
                for entry, bounce_class, outcome in added
            ]
        )
        return extra if events is None else _in_turn(events, extra)

    async def _commit(self, queue_id: str, operation: Operation) -> None:
        """Commit one attempt's result, retrying on the retry schedule while that fails.

        The message stays in the active window meanwhile, so it is not sent again: a result
        that cannot be written for want of space costs no duplicate while this worker
        lives. Raises the last error if the worker stops first, or after ``COMMIT_TRIES``
        failures of another kind; the message is then still queued and goes again after a
        retry interval (at least once).
        """
        failures = 0
        while True:
            try:
                await self.committer.submit_operation(operation)
            except Exception as exc:
                failures += 1
                if self.stopping or (not isinstance(exc, StorageFull) and failures >= COMMIT_TRIES):
                    raise
                delay = self._retry_delay(failures)
                log.error(
                    "%s: recording the delivery result failed (%s); retrying in %.1fs "
                    "without sending the message again",
                    queue_id,
                    exc,
                    delay,
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.halt.wait(), delay)
                continue
            if failures:
                log.info("%s: delivery result recorded after %d failures", queue_id, failures)
            return

    def _reports(
        self,
        envelope: Envelope,
        content: bytes,
        failed: list[RecipientReport],
        delayed: list[RecipientReport],
        succeeded: list[RecipientReport],
        now: float,
    ) -> list[tuple[Envelope, bytes, str]]:
        """DSN messages to queue: failures, success notices, one delay warning (built by
        :func:`tachymail.delivery.bounce.notifications`, which applies NOTIFY)."""
        if not envelope.sender:
            if failed:
                log.warning("dropping undeliverable DSN %s: %s", envelope.id, failed[0].diagnostic)
            return []  # never report on a report (RFC 5321 §4.5.5, RFC 3461 §6.2)
        warn_after = self.config.delivery.delay_warning
        wanted_delay = (
            delayed and warn_after and not envelope.warned and now - envelope.arrival >= warn_after
        )
        reports = failed + succeeded + (delayed if wanted_delay else [])
        out: list[tuple[Envelope, bytes, str]] = []
        for notice in notifications(
            envelope, content, reports, reporting_mta=self.hostname, now=now
        ):
            if notice.kind == "failed":
                self.bounced += notice.recipients
            m.bounces[notice.kind].inc()
            out.append((notice.envelope, notice.content, notice.kind))
        return out


def flushed_by_operator(recipient: Recipient) -> bool:
    """Whether `tachymail queue flush` made *recipient* due: it was tried before, and
    its next attempt is "as soon as possible" (0), which only a flush writes after an
    attempt (the retry schedule always writes a time)."""
    return recipient.attempts > 0 and recipient.next_attempt == 0.0


def _classifier(config: Config) -> BounceClassifier:
    """The classifier of *config*; the built-in rules alone when the operator's file went
    bad since the server started (``config check`` and ``serve`` refuse a bad one)."""
    try:
        return load_classifier(config)
    except RulesError as exc:
        log.error("bounce rules: %s; classifying with the built-in rules only", exc)
        return BounceClassifier(builtin_rules())


def _in_turn(first: Operation, second: Operation) -> Operation:
    """One queue operation running *first*, then *second*, in the same transaction."""

    def operation(store: QueueStore, txn: lmdb.Transaction) -> None:
        first(store, txn)
        second(store, txn)

    return operation


def _report(
    updated: Recipient,
    action: str,
    outcome: Outcome,
    attempt: Attempt,
    now: float,
    until: float,
    bounce_class: str = "",
) -> RecipientReport:
    return RecipientReport(
        recipient=updated,
        action=action,
        status=outcome.status,
        # Local reasons (DNS, lifetime, no SMTPUTF8) are worth telling the sender too.
        diagnostic=outcome.reply,
        remote_mta=attempt.hop if attempt.remote_ip else "",
        last_attempt=now,
        will_retry_until=until,
        bounce_class=bounce_class,
    )


def delayed_reported(reports: list[tuple[Envelope, bytes, str]]) -> bool:
    return any(kind == "delayed" for _, _, kind in reports)


def _apply_attempt(
    queue_id: str,
    changes: dict[int, Recipient],
    reports: list[tuple[Envelope, bytes, str]],
    warned: bool,
    finished_from: tuple[bytes, float] | None = None,
    events: Operation | None = None,
) -> Operation:
    """The queue operation recording one attempt: recipient states, new due time, DSNs.

    *finished_from* (the record the attempt read, and its due time) says the attempt
    left no recipient to deliver: if the record is unchanged, the message just goes.
    *events* (from tachymail.queue.events.record_events) commit with the result.
    """

    def operation(store: QueueStore, txn: lmdb.Transaction) -> None:
        if events is not None:
            events(store, txn)
        for report, body, _kind in reports:
            store.insert(txn, report, body)
        if finished_from is not None:
            raw, due = finished_from
            if store.discard_if_unchanged(txn, queue_id, raw, due):
                return
        envelope = store.load(txn, queue_id)
        if envelope is None:
            return  # deleted meanwhile by `tachymail queue delete`
        for index, updated in changes.items():
            if index < len(envelope.recipients) and envelope.recipients[index].state == QUEUED:
                envelope.recipients[index] = updated
        if warned:
            envelope.warned = True
        store.save(txn, envelope)

    return operation
