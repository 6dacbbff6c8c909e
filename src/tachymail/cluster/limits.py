"""Rate and connection limits for delivery, on one worker or across the whole cluster.

A delivery worker keeps one :class:`Limits`; its pools ask it for a :class:`Rate` (messages
per second with a burst) and :class:`Slots` (a connection limit) per shaping budget, and get
the same object for the same key, so every pool of one budget shares it.

Local limits (``shared=False``, or no ``[cluster] redis``) hold this worker's share of the
node's limit: ``per_second / workers`` and ``max(1, limit // workers)``.

Cluster-wide limits (``shared=True`` with Redis) hold across every node and worker:

- Rates are GCRA in Redis (:data:`RATE_SCRIPT`, Redis ``TIME`` as the clock, so node clocks
  do not matter). A worker takes grants in small batches (about 100 ms of its recent use, at
  least 1: one round trip per batch), reserved on the cluster's schedule up to 100 ms
  ahead, and hands them out spaced by the emission interval from the time the first is
  due; so a busy worker does not ask Redis per message, and batching adds no burst, even
  with ``burst = 1``.
- Connections are leases in a sorted set per key (member ``node:pid:n``, score = expiry in
  Redis ms). A background task renews the held leases every ``lease_ttl / 3``, so a dead
  node's connections free themselves within ``lease_ttl``. A released slot goes straight to
  the next local waiter (the lease stays held); otherwise its lease is removed at once.
  Waiters are served in order; the first of them polls Redis (50-200 ms backoff) for slots
  freed by other nodes.

Whenever Redis is away (:data:`~tachymail.cluster.client.UNAVAILABLE`), a cluster-wide limit
falls back at once to this worker's local share, ``per_second * fallback_share / workers``
and ``max(1, floor(limit * fallback_share / workers))``, counted in
``tachymail_cluster_fallbacks_total``; delivery never waits for Redis. Leases taken in
fallback are counted locally and written to Redis by the next renewal once it is back.

A throttle reaction (:meth:`Rate.set_factor`) scales the emission interval: locally the
worker spaces its messages ``1 / factor`` further apart, and in Redis each of this node's
grants advances the shared schedule by the longer interval, so a throttled node's messages
count ``1 / factor`` times against the cluster budget. When every node reacts (they all see
the provider's replies) the cluster as a whole sends at ``rate * factor``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import os
import random
import time
from collections import deque
from typing import Any

from tachymail.cluster.client import UNAVAILABLE, Cluster
from tachymail.metrics import m

log = logging.getLogger(__name__)

#: GCRA in Redis, with reservations. KEYS[1]: the schedule's key. ARGV: emission interval
#: (µs per grant), tolerance (µs: (burst - 1) intervals), grants wanted, horizon (µs). The
#: key holds the theoretical arrival time (TAT) in µs of Redis time. Grants may be reserved
#: up to the horizon ahead of their time on the schedule: a batch is handed out spaced from
#: the time its first grant is due, so batching adds no burst. Returns {granted, µs}: with
#: grants, the delay until the first is due; without, how long until one fits the horizon.
#: The key expires once the schedule has caught up with the clock (it then means "no
#: debt", the same as a missing key).
RATE_SCRIPT = """
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local wanted = tonumber(ARGV[3])
local horizon = tonumber(ARGV[4])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local room = math.floor((now + tolerance + horizon - tat) / interval) + 1
local granted = math.max(0, math.min(wanted, room))
if granted == 0 then
  return {0, tat - tolerance - horizon - now}
end
local first = math.max(0, tat - tolerance - now)
tat = tat + granted * interval
redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000) + 1000)
return {granted, first}
"""

#: The prelude of the lease scripts. KEYS: the sorted set of leases (score: expiry), the
#: queue of waiting processes (score: when they began to wait) and their heartbeats
#: (score: last poll). Drops expired leases, and waiters that have not polled for a second.
_LEASE_PRELUDE = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local stale = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now - 1000)
for _, proc in ipairs(stale) do
  redis.call('ZREM', KEYS[2], proc)
  redis.call('ZREM', KEYS[3], proc)
end
"""

#: A connection lease. ARGV: limit, lease ttl (ms), member, process, queue (1: the caller
#: is a waiter: it keeps or takes its place in the queue). A free slot goes to the caller
#: only when more are free than processes wait ahead of it, so waiters of every node are
#: served in the order they came. Returns 1 (leased) or 0.
ACQUIRE_SCRIPT = (
    _LEASE_PRELUDE
    + """
local limit = tonumber(ARGV[1])
local ttl = tonumber(ARGV[2])
local proc = ARGV[4]
local free = limit - redis.call('ZCARD', KEYS[1])
local since = redis.call('ZSCORE', KEYS[2], proc)
local ahead
if since then
  ahead = redis.call('ZCOUNT', KEYS[2], '-inf', '(' .. since)
else
  ahead = redis.call('ZCARD', KEYS[2])
end
if free > ahead then
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[3])
  redis.call('PEXPIRE', KEYS[1], ttl + 1000)
  redis.call('ZREM', KEYS[2], proc)
  redis.call('ZREM', KEYS[3], proc)
  return 1
end
if ARGV[5] == '1' then
  redis.call('ZADD', KEYS[2], 'NX', now, proc)
  redis.call('ZADD', KEYS[3], now, proc)
  redis.call('PEXPIRE', KEYS[2], 2000)
  redis.call('PEXPIRE', KEYS[3], 2000)
end
return 0
"""
)

#: A slot given back while this process has waiters. ARGV: member, process, lease ttl
#: (ms), local waiters. When no other process waits, the lease is kept (renewed) for the
#: next local waiter: returns 1. Otherwise it is removed, for the process first in the
#: queue: returns 0.
HANDOVER_SCRIPT = (
    _LEASE_PRELUDE
    + """
local proc = ARGV[2]
local queued = redis.call('ZSCORE', KEYS[2], proc)
local others = redis.call('ZCARD', KEYS[2])
if queued then others = others - 1 end
if others == 0 then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
  if tonumber(ARGV[4]) <= 1 then
    redis.call('ZREM', KEYS[2], proc)
    redis.call('ZREM', KEYS[3], proc)
  end
  return 1
end
redis.call('ZREM', KEYS[1], ARGV[1])
return 0
"""
)

#: Renew held leases. ARGV: lease ttl (ms), process, member, member... A member that
#: expired meanwhile (Redis restarted, or was away too long) is added again: the connection
#: is still open, so it counts. Returns {leases held now, other processes waiting}.
RENEW_SCRIPT = (
    _LEASE_PRELUDE
    + """
local ttl = tonumber(ARGV[1])
for i = 3, #ARGV do
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[i])
end
redis.call('PEXPIRE', KEYS[1], ttl + 1000)
local others = redis.call('ZCARD', KEYS[2])
if redis.call('ZSCORE', KEYS[2], ARGV[2]) then others = others - 1 end
return {redis.call('ZCARD', KEYS[1]), others}
"""
)

#: a batch of shared grants is about this much of the worker's recent use (seconds)
BATCH_SECONDS = 0.1
#: unused shared grants are dropped this long after their batch would have been spent:
#: sending them much later would burst past the cluster's schedule
STOCK_GRACE = 0.25
#: backoff of the first waiter polling Redis for a slot freed by another node (seconds)
POLL_MIN, POLL_MAX = 0.05, 0.2
#: the lowest factor a throttle reaction may set (a factor of 0 would stop delivery)
MIN_FACTOR = 0.001

_lease_ids = itertools.count(1)


class Gcra:
    """The generic cell rate algorithm on a float clock (seconds).

    ``interval`` is 1/rate; ``tolerance`` is (burst - 1) intervals. A message may go at
    ``due(now)``; :meth:`commit` with that time advances the theoretical arrival time
    (TAT). Committing the *scheduled* time rather than the wake-up time keeps timer lateness
    from accumulating: n grants in a row are exactly n intervals apart on the schedule.
    """

    __slots__ = ("interval", "tat", "tolerance")

    def __init__(self, per_second: float, burst: int) -> None:
        self.interval = 0.0
        self.tolerance = 0.0
        self.tat = -math.inf
        self.configure(per_second, burst)

    def configure(self, per_second: float, burst: int) -> None:
        """New rate (> 0) and burst (>= 1); the schedule already made is kept."""
        self.interval = 1.0 / per_second
        self.tolerance = (max(1, burst) - 1) * self.interval

    def due(self, now: float) -> float:
        """When the next message may go: *now* or later."""
        return max(now, self.tat - self.tolerance)

    def commit(self, at: float) -> None:
        """One message went at *at* (a time :meth:`due` returned)."""
        self.tat = max(self.tat, at) + self.interval


class Rate:
    """Messages per second with a burst: smooth (GCRA), never bursts at second boundaries.

    ``take()`` waits until one message may go and says whether it had to wait. Takers are
    served in the order they came. ``per_second <= 0`` means no limit.
    """

    def __init__(
        self,
        limits: Limits,
        key: str,
        per_second: float,
        burst: int,
        shared: bool,
        rule: str,
    ) -> None:
        self.limits = limits
        self.key = key
        self.rule = rule
        self.shared = shared and limits.cluster.enabled
        self.per_second = per_second
        self.burst = max(1, burst)
        self.factor = 1.0
        #: the local limiter: this worker's share, or its fallback share when shared
        self._local = Gcra(1.0, 1)
        #: shared mode: spacing of the grants handed out from the batch in stock
        self._spacing = Gcra(1.0, 1)
        self._stock = 0
        self._stock_until = 0.0
        #: the size of the last batch Redis granted
        self._batch = 0
        self._used = 0
        self._last_fetch = 0.0
        self._recent = 0.0
        self._probe: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._queued = 0
        self.redis_key = limits.cluster.key("rate", key) if self.shared else ""
        self.configure(per_second, burst)

    # -- settings --------------------------------------------------------------------

    def configure(self, per_second: float, burst: int) -> None:
        """New rate and burst (a shaping reload); takes effect from the next message."""
        self.per_second = per_second
        self.burst = max(1, burst)
        self._apply()

    def set_factor(self, factor: float) -> None:
        """A throttle reaction: the rate times *factor* (1.0 = back to normal)."""
        self.factor = max(MIN_FACTOR, factor)
        self._apply()

    def _apply(self) -> None:
        if self.per_second <= 0:
            return
        workers = self.limits.workers
        share = self.limits.cluster.fallback_share if self.shared else 1.0
        self._local.configure(self.per_second * share * self.factor / workers, self.burst)
        self._spacing.configure(self.per_second * self.factor, 1)

    @property
    def interval(self) -> float:
        """The cluster-wide emission interval, after the factor (seconds)."""
        return 1.0 / (self.per_second * self.factor)

    @property
    def local_per_second(self) -> float:
        """What this worker may send on its own now: its share, or its fallback share."""
        return 1.0 / self._local.interval if self.per_second > 0 else 0.0

    @property
    def mode(self) -> str:
        """ "local", "cluster", or "fallback" (shared, but Redis is away)."""
        if not self.shared:
            return "local"
        return "cluster" if self.limits.cluster.up else "fallback"

    # -- taking ----------------------------------------------------------------------

    def try_take(self) -> bool:
        """One message may go now, without waiting: True (and it is counted), or False
        and the caller awaits :meth:`take` instead. Never asks Redis, never waits."""
        if self.per_second <= 0:
            return True
        if self._queued:
            return False  # others wait: in order
        now = time.monotonic()
        if not self.shared:
            if self._local.due(now) <= now:
                self._local.commit(now)
                return True
        elif self._stock and now <= self._stock_until and self._spacing.due(now) <= now:
            self._stock -= 1
            self._used += 1
            self._spacing.commit(now)
            if self._stock * 2 < self._batch and self._probe is None and self.limits.cluster.up:
                # The next batch on its way before this one runs out: takers never find the
                # stock empty while a busy worker waits for Redis (each such wait would
                # break every pool's pipelining for a round trip).
                self._refill()
            return True
        return False

    async def take(self) -> bool:
        """Wait until one message may go; True if it had to wait."""
        if self.try_take():
            # The common case of a limit that does not bind: no lock, no await.
            return False
        self._queued += 1
        try:
            async with self._lock:
                if not self.shared:
                    return await _take_gcra(self._local)
                return await self._take_shared()
        finally:
            self._queued -= 1

    async def _take_shared(self) -> bool:
        waited = False
        cluster = self.limits.cluster
        while True:
            now = time.monotonic()
            if self._stock and now > self._stock_until:
                self._stock = 0
            if self._stock:
                self._stock -= 1
                self._used += 1
                if self._queued > 1 and self._stock * 2 < self._batch:
                    # More takers wait: ask for the next batch while this one waits for its
                    # turn, so the node keeps its place on the cluster's schedule.
                    self._refill()
                return await _take_gcra(self._spacing) or waited
            if not cluster.up:
                # Redis is away: this worker's fallback share at once; a probe (when the
                # cluster says it is time) runs beside it and refills the stock if it
                # answers. Nobody waits for the probe.
                if cluster.usable:
                    self._refill()
                m.cluster_fallbacks.labels("rate").inc()
                return await _take_gcra(self._local) or waited
            if self._probe is not None:
                await asyncio.shield(self._probe)  # the next batch, already asked for
                continue
            result = await self._fetch()
            if result is None:
                continue  # Redis failed just now: the fallback, next time round
            granted, wait = result
            if granted:
                continue
            await asyncio.sleep(wait)
            waited = True

    def _want(self, now: float) -> int:
        """The batch to ask for: ~100 ms of recent use, or the takers waiting now if more
        (a node held back by the others asks for what it needs, not for what it got), at
        least 1, at most 100 ms of the rate."""
        elapsed = now - self._last_fetch
        if elapsed > 0:
            used_rate = self._used / elapsed
            self._recent = used_rate if self._recent == 0 else (self._recent + used_rate) / 2
        full = max(1, math.ceil(BATCH_SECONDS / self.interval))
        want = max(math.ceil(self._recent * BATCH_SECONDS), self._queued)
        return max(1, min(want, full))

    async def _fetch(self) -> tuple[int, float] | None:
        """One round trip: grants put in stock (spaced from when the first is due), or how
        long to wait when none were left; None when Redis is away."""
        now = time.monotonic()
        want = self._want(now)
        interval = self.interval
        interval_us = max(1, round(interval * 1e6))
        tolerance_us = round((self.burst - 1) * interval * 1e6)
        args = [interval_us, tolerance_us, want, round(BATCH_SECONDS * 1e6)]
        result = await self.limits.run(self.limits.rate_script, [self.redis_key], args)
        if result is None:
            return None
        granted, micros = int(result[0]), int(result[1])
        if granted:
            # Recent use is measured from grant to grant, waits included.
            self._last_fetch = now
            self._used = 0
            first = time.monotonic() + micros / 1e6
            self._spacing.tat = max(self._spacing.tat, first)
            self._stock += granted
            self._batch = granted
            self._stock_until = first + granted * interval + STOCK_GRACE
            return granted, 0.0
        # Until one grant fits: waiting longer would let a node that keeps asking (its
        # stock just ran out) take the schedule ahead of this one every time.
        return 0, max(0.001, micros / 1e6)

    def _refill(self) -> None:
        """Fetch a batch in the background (one at a time)."""
        if self._probe is None:
            self._probe = asyncio.get_running_loop().create_task(self._refill_now())

    async def _refill_now(self) -> None:
        try:
            await self._fetch()
        except Exception:  # a taker awaits this task: never let it fail
            log.exception("limits: fetching grants for %s failed", self.key)
        finally:
            self._probe = None

    def snapshot(self) -> dict[str, Any]:
        """What the admin API shows of this limit."""
        return {
            "rule": self.rule,
            "per_second": self.per_second,
            "burst": self.burst,
            "factor": self.factor,
            "shared": self.shared,
            "mode": self.mode,
            "local_per_second": round(self.local_per_second, 3),
            "waiting": self._queued,
        }


async def _take_gcra(gcra: Gcra) -> bool:
    now = time.monotonic()
    due = gcra.due(now)
    if due > now:
        await asyncio.sleep(due - now)
        gcra.commit(due)
        return True
    gcra.commit(now)
    return False


class Slots:
    """A connection limit: ``acquire()`` waits for a free slot (in order), ``release()``
    gives it back, exactly once per successful acquire."""

    def __init__(self, limits: Limits, key: str, limit: int, shared: bool, rule: str) -> None:
        self.limits = limits
        self.key = key
        self.rule = rule
        self.shared = shared and limits.cluster.enabled
        self.limit = limit
        #: the slots this worker holds; shared: their lease members in Redis
        self.held: list[str] = []
        self._waiters: deque[asyncio.Future[str]] = deque()
        self._poller: asyncio.Task[None] | None = None
        #: slots given back whose lease is on its way to a local waiter or to Redis
        self._handing = 0
        #: other nodes (or workers) wait for a slot of this limit, as Redis said at the
        #: last renewal or hand-over: a pool may close an idle connection rather than keep
        #: its slot for the idle timeout
        self.contended = False
        self.redis_key = limits.cluster.key("conn", key) if self.shared else ""
        #: the leases, the queue of waiting processes, their heartbeats
        self.redis_keys = [self.redis_key, f"{self.redis_key}:wait", f"{self.redis_key}:beat"]

    def configure(self, limit: int) -> None:
        """A new limit (a shaping reload); more room is handed to waiters at once."""
        self.limit = limit
        if not self.shared:
            while len(self.held) < self.local_limit and self._hand(""):
                pass

    @property
    def local_limit(self) -> int:
        """This worker's share of the node's limit (not shared)."""
        return max(1, self.limit // self.limits.workers)

    @property
    def fallback_limit(self) -> int:
        """This worker's share of a cluster limit while Redis is away."""
        share = self.limits.cluster.fallback_share
        return max(1, math.floor(self.limit * share / self.limits.workers))

    @property
    def in_use(self) -> int:
        """Slots this worker holds now."""
        return len(self.held)

    @property
    def waiting(self) -> int:
        return sum(1 for w in self._waiters if not w.done())

    async def acquire(self) -> bool:
        """Wait for a free slot; True if it had to wait."""
        if self.shared:
            self.limits.ensure_renewer()
        if not self._waiters:
            member = await self._try(queue=False)
            if member is not None:
                self.held.append(member)
                return False
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[str] = loop.create_future()
        self._waiters.append(waiter)
        if self.shared and self._poller is None:
            self._poller = loop.create_task(self._poll())
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                # Granted as we were cancelled: the slot goes on to the next one.
                self.held.remove(waiter.result())
                self._give_back(waiter.result())
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            raise
        return True

    def release(self) -> None:
        """Give one slot back: to the next waiter here, or to the cluster at once (to the
        other nodes first when they have been waiting: see HANDOVER_SCRIPT)."""
        if not self.held:
            if not self.limits.closed:  # after close() every slot counts as released
                log.error("limits: %s released more slots than it acquired", self.key)
            return
        self._give_back(self.held.pop())

    def _give_back(self, member: str) -> None:
        if not self.waiting:
            if self.shared:
                self.limits.release_lease(self.redis_key, member)
            return
        if not self.shared or not self.limits.cluster.up:
            self._hand(member)
            return
        self._handing += 1
        self.limits.spawn(self._hand_over(member))

    async def _hand_over(self, member: str) -> None:
        try:
            args = [member, self.limits.proc, self.limits.lease_ms, self.waiting]
            kept = await self.limits.run(self.limits.handover_script, self.redis_keys, args)
        finally:
            self._handing -= 1
        if kept is not None:
            self.contended = not int(kept)
        # Kept when no other node waits (or Redis is away): the next waiter here takes it;
        # else the lease went back for another node's waiter, and ours wait in the queue.
        if (kept is None or int(kept)) and not self._hand(member):
            self.limits.release_lease(self.redis_key, member)

    def _hand(self, member: str) -> bool:
        """Give *member* to the first live waiter; False if there is none."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.held.append(member)
                waiter.set_result(member)
                return True
        return False

    async def _try(self, queue: bool) -> str | None:
        """A slot now if there is one (its member, not yet in ``held``), or None."""
        if not self.shared:
            return "" if len(self.held) < self.local_limit else None
        limits = self.limits
        member = f"{limits.proc}:{next(_lease_ids)}"
        if limits.cluster.up:
            args = [self.limit, limits.lease_ms, member, limits.proc, 1 if queue else 0]
            result = await limits.run(limits.acquire_script, self.redis_keys, args)
            if result is not None:
                return member if int(result) else None
        if len(self.held) + self._handing < self.fallback_limit:
            # Redis is away: the fallback share, counted here; the next renewal writes the
            # lease to Redis once it is back.
            m.cluster_fallbacks.labels("connections").inc()
            return member
        return None

    async def _poll(self) -> None:
        """The waiters' side: poll Redis (with backoff) for slots freed by other nodes,
        keeping this process's place in the cluster's queue of waiters."""
        delay = POLL_MIN
        try:
            while self.waiting:
                member = await self._try(queue=True)
                if member is not None:
                    if not self._hand(member):
                        self.limits.release_lease(self.redis_key, member)
                    delay = POLL_MIN
                    continue
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))
                delay = min(POLL_MAX, delay * 1.5)
        finally:
            self._poller = None
            if self.limits.cluster.up and not self.limits.closed:
                self.limits.spawn(self.limits.unqueue(self.redis_keys))

    def snapshot(self) -> dict[str, Any]:
        """What the admin API shows of this limit."""
        return {
            "rule": self.rule,
            "limit": self.limit,
            "shared": self.shared,
            "in_use": self.in_use,
            "waiting": self.waiting,
            "contended": self.contended,
            "local_limit": self.fallback_limit if self.shared else self.local_limit,
        }


class Limits:
    """The rate and connection limits of one delivery worker process (see the module
    docstring). ``rate``/``slots`` return the same object for the same key; calling them
    again with new numbers (a shaping reload) updates it in place. Whether a limit is
    shared is fixed when it is made: a reload that changes it makes a new object."""

    def __init__(self, cluster: Cluster, workers: int) -> None:
        self.cluster = cluster
        self.workers = max(1, workers)
        self.lease_ms = max(1, round(cluster.settings.lease_ttl * 1000))
        #: this process in the cluster (lease names are proc:n): one Limits per worker
        self.proc = f"{cluster.node}:{os.getpid()}"
        self.rates: dict[str, Rate] = {}
        self.slots_by_key: dict[str, Slots] = {}
        self.rate_script: Any = None
        self.acquire_script: Any = None
        self.handover_script: Any = None
        self.renew_script: Any = None
        if cluster.enabled:
            self.rate_script = cluster.script(RATE_SCRIPT)
            self.acquire_script = cluster.script(ACQUIRE_SCRIPT)
            self.handover_script = cluster.script(HANDOVER_SCRIPT)
            self.renew_script = cluster.script(RENEW_SCRIPT)
        #: leases given back while Redis was away: removed by the next renewal
        self._unreleased: dict[str, set[str]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._renewer: asyncio.Task[None] | None = None
        self.closed = False

    def rate(self, key: str, per_second: float, burst: int, shared: bool, rule: str) -> Rate:
        """The rate limit of *key* (messages per second, with a burst)."""
        rate = self.rates.get(key)
        if rate is None or rate.shared != (shared and self.cluster.enabled):
            rate = self.rates[key] = Rate(self, key, per_second, burst, shared, rule)
        elif (rate.per_second, rate.burst) != (per_second, max(1, burst)):
            rate.configure(per_second, burst)
        rate.rule = rule
        return rate

    def slots(self, key: str, limit: int, shared: bool, rule: str) -> Slots:
        """The connection limit of *key*."""
        slots = self.slots_by_key.get(key)
        if slots is None or slots.shared != (shared and self.cluster.enabled):
            slots = self.slots_by_key[key] = Slots(self, key, limit, shared, rule)
            if slots.shared:
                self.ensure_renewer()
        elif slots.limit != limit:
            slots.configure(limit)
        slots.rule = rule
        return slots

    def snapshot(self) -> dict[str, Any]:
        """Every limit of this worker, for the admin API."""
        return {
            "redis_up": self.cluster.up,
            "rates": {key: rate.snapshot() for key, rate in self.rates.items()},
            "connections": {key: s.snapshot() for key, s in self.slots_by_key.items()},
        }

    async def run(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        """Run one of the scripts: its result, or None when Redis is away."""
        result = await self.cluster.call(lambda c: script(keys=keys, args=args, client=c))
        return None if result is UNAVAILABLE else result

    async def unqueue(self, keys: list[str]) -> None:
        """This process waits no more for the slots of *keys*: out of the cluster's queue."""
        proc = self.proc
        await self.cluster.call(lambda c: c.zrem(keys[1], proc))
        await self.cluster.call(lambda c: c.zrem(keys[2], proc))

    # -- leases ----------------------------------------------------------------------

    def release_lease(self, redis_key: str, member: str) -> None:
        """Remove a lease from Redis now, in the background (never waits)."""
        self._unreleased.setdefault(redis_key, set()).add(member)
        if self.cluster.up:
            self.spawn(self._remove_leases(redis_key))

    async def _remove_leases(self, redis_key: str) -> None:
        members = self._unreleased.pop(redis_key, set())
        if not members:
            return
        names = sorted(members)
        result = await self.cluster.call(lambda client: client.zrem(redis_key, *names))
        if result is UNAVAILABLE:
            # Try again at the next renewal; the lease expires by itself meanwhile.
            self._unreleased.setdefault(redis_key, set()).update(members)

    def spawn(self, work: Any) -> None:
        try:
            task = asyncio.get_running_loop().create_task(work)
        except RuntimeError:
            work.close()  # no loop (closing): the leases expire by themselves
            return
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def ensure_renewer(self) -> None:
        if self._renewer is not None or self.closed:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # made outside the loop: started by the first renew_now()
        self._renewer = loop.create_task(self._renew_forever())

    async def _renew_forever(self) -> None:
        # Renewing more often than lease_ttl/3 is harmless, and this task is also the probe
        # that finds Redis again for connection limits.
        settings = self.cluster.settings
        period = min(settings.lease_ttl / 3, settings.retry_interval)
        while True:
            await asyncio.sleep(period)
            try:
                await self.renew_now()
            except Exception:  # keep renewing whatever one round did
                log.exception("limits: lease renewal failed")

    async def renew_now(self) -> None:
        """Renew every held lease and remove the ones given back while Redis was away.

        Also the probe that finds Redis again when no rate limit asks it."""
        cluster = self.cluster
        if not cluster.usable:
            return
        for redis_key in list(self._unreleased):
            await self._remove_leases(redis_key)
        busy = False
        for slots in list(self.slots_by_key.values()):
            if not slots.shared or not slots.held:
                continue
            busy = True
            args = [self.lease_ms, self.proc, *slots.held]
            result = await self.run(self.renew_script, slots.redis_keys, args)
            if result is None:
                return
            slots.contended = int(result[1]) > 0
        if not busy and not cluster.up:
            await cluster.call(lambda client: client.ping())

    async def close(self) -> None:
        """Release every lease, stop renewals and polls (the worker is stopping)."""
        self.closed = True
        tasks = [t for t in (self._renewer, *self._tasks) if t is not None]
        for slots in self.slots_by_key.values():
            if slots._poller is not None:
                tasks.append(slots._poller)
        for rate in self.rates.values():
            if rate._probe is not None:
                tasks.append(rate._probe)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._renewer = None
        for slots in self.slots_by_key.values():
            for waiter in slots._waiters:
                waiter.cancel()
            slots._waiters.clear()
            if slots.shared and slots.held:
                self._unreleased.setdefault(slots.redis_key, set()).update(slots.held)
            slots.held.clear()
        if self.cluster.up:
            for redis_key in list(self._unreleased):
                await self._remove_leases(redis_key)
