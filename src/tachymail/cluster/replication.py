"""Sharing the suppression list and the destination suspensions between the nodes of a
cluster through Redis.

Every node keeps its own copy of both lists in LMDB, and every process reads and writes
that copy as on a single node: nothing on the path of a message or of an operator's command
waits for Redis. A local change is also recorded, in the same transaction, in the store's
outbox (tachymail.queue.changes). One :class:`Replicator` per node (run by delivery worker
0) then, every :data:`POLL` seconds:

1. pushes the outbox to Redis with one Lua script per batch, which for each change keeps
   the newer of it and the cluster's current record (by the time the change was made; a
   removal is a record too, a *tombstone*, kept :data:`TOMBSTONE_TTL` seconds) in a hash
   per list, and appends each change it kept to a stream per list (``XADD MAXLEN ~``
   :data:`STREAM_MAX`); a change that lost comes back with the winner, which the node
   applies;
2. reads the stream from the last id it applied (kept in the local store) and applies its
   changes where newer than its own entry, without recording them again;
3. loads the whole hash instead, when it has no last id (a new node) or the stream was
   trimmed past it (a node that was away for long: Redis 7 counts the entries ever added,
   so the node knows how many it has seen and how many trimming removed).

Redis holds one *epoch* token for all lists; a node that finds another token than the one it
synced with (Redis lost its data, or the node joined) offers its whole list again before it
loads the hash, so a Redis restarted empty is refilled by the nodes. While Redis is away
the outbox grows (bounded: past tachymail.queue.changes.MAX_OUTBOX the whole list is
offered again instead, and removals made meanwhile stay local), the changes waiting are
counted in ``tachymail_cluster_fallbacks_total{what="replication"}``, and the local lists
work as ever.

Keys (``PREFIX`` is ``[cluster] key_prefix``): ``PREFIX:lists:epoch``;
``PREFIX:list:NAME`` (hash: entry key -> JSON change), ``PREFIX:list:NAME:deadlines`` (zset:
when an entry lapses or a tombstone may go), ``PREFIX:list:NAME:changes`` (stream: ``k``
key, ``d`` change, ``n`` the node that made it). NAME is ``suppression`` or
``suspensions``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import lmdb
import redis.asyncio as aioredis

from tachymail.cluster.client import UNAVAILABLE, Cluster
from tachymail.config import Config
from tachymail.metrics import m
from tachymail.queue import changes
from tachymail.queue.changes import Change, ReplicatedStore
from tachymail.queue.suppression import shared_list
from tachymail.queue.suspensions import Suspensions

log = logging.getLogger(__name__)

_T = TypeVar("_T")

#: seconds between two rounds of push and read
POLL = 0.25
#: changes per push, stream read or hash page
PAGE = 500
#: pages pushed or read per list and round (a busy list does not starve the other)
PAGES_PER_ROUND = 20
#: stream entries kept per list (approximately): a node further behind loads the hash
STREAM_MAX = 100_000
#: seconds a removal is remembered in Redis, so that an older copy cannot come back
TOMBSTONE_TTL = 30 * 86400.0
#: seconds between sweeps of lapsed entries and old tombstones from Redis
SWEEP_EVERY = 60.0

# KEYS: hash, deadlines, stream. ARGV: maxlen, node, then (field, stamp, data, deadline)...
# Returns the (field, winner) pairs of the changes that lost to a different record.
_PUSH = """
local losers = {}
for i = 3, #ARGV, 4 do
  local field, stamp, data = ARGV[i], tonumber(ARGV[i + 1]), ARGV[i + 2]
  local deadline = tonumber(ARGV[i + 3])
  local current = redis.call('HGET', KEYS[1], field)
  local wins = true
  if current then
    -- a record that does not decode (written by hand?) loses to any change
    local decoded, parsed = pcall(cjson.decode, current)
    local held = decoded and type(parsed) == 'table' and tonumber(parsed.t) or -1
    if held > stamp or (held == stamp and current >= data) then wins = false end
  end
  if wins then
    redis.call('HSET', KEYS[1], field, data)
    if deadline > 0 then
      redis.call('ZADD', KEYS[2], deadline, field)
    else
      redis.call('ZREM', KEYS[2], field)
    end
    redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[1], '*', 'k', field, 'd', data,
               'n', ARGV[2])
  elseif current ~= data then
    losers[#losers + 1] = field
    losers[#losers + 1] = current
  end
end
return losers
"""

# KEYS: hash, deadlines. ARGV: now. Removes up to 1000 lapsed entries and old tombstones.
_SWEEP = """
local doomed = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1], 'LIMIT', 0, 1000)
for _, field in ipairs(doomed) do
  redis.call('HDEL', KEYS[1], field)
  redis.call('ZREM', KEYS[2], field)
end
return #doomed
"""

# KEYS: epoch. ARGV: a fresh token, used when Redis has none.
_EPOCH = """
local epoch = redis.call('GET', KEYS[1])
if not epoch then
  redis.call('SET', KEYS[1], ARGV[1])
  epoch = ARGV[1]
end
return epoch
"""


class _Away(Exception):
    """Redis did not answer: this round ends, the next one tries again."""


def _stream_id(raw: bytes | str | None) -> tuple[int, int]:
    """A stream id ``MS-SEQ`` as a comparable pair ((0, 0) for none)."""
    if not raw:
        return (0, 0)
    text = raw.decode() if isinstance(raw, bytes) else raw
    ms, _, seq = text.partition("-")
    return (int(ms), int(seq or 0))


def _format_id(stream_id: tuple[int, int]) -> str:
    return f"{stream_id[0]}-{stream_id[1]}"


@dataclass(slots=True)
class _List:
    """One replicated list: its store, its Redis keys, and where this node stands."""

    name: str
    store: ReplicatedStore
    hash: str
    deadlines: str
    stream: str
    #: the last stream id applied; None: load the hash
    last_id: tuple[int, int] | None = None
    #: how many entries the stream had ever been given up to and including last_id
    seen: int = 0
    #: the epoch this node's copy was last synced with
    epoch: bytes | None = None
    #: the last outbox sequence number counted as waiting for Redis
    counted: int = -1
    #: whether this round found Redis away with changes waiting (logged once per outage)
    waiting: bool = False


class Replicator:
    """Keeps *stores* (name -> store: "suppression", "suspensions") in step with the
    cluster's copy in Redis (see the module doc). Call :meth:`run` once per node."""

    def __init__(self, cluster: Cluster, stores: dict[str, ReplicatedStore]) -> None:
        self.cluster = cluster
        self.lists = [
            _List(
                name,
                store,
                cluster.key("list", name),
                cluster.key("list", name, "deadlines"),
                cluster.key("list", name, "changes"),
            )
            for name, store in stores.items()
        ]
        self._push = cluster.script(_PUSH)
        self._sweep = cluster.script(_SWEEP)
        self._epoch = cluster.script(_EPOCH)
        self._swept = float("-inf")
        self._started = False

    async def _thread(self, work: Callable[..., _T], *args: Any) -> _T:
        return await asyncio.get_running_loop().run_in_executor(None, work, *args)

    async def _call(self, work: Callable[[aioredis.Redis], Awaitable[_T]]) -> _T:
        result = await self.cluster.call(work)
        if result is UNAVAILABLE:
            raise _Away
        return result  # type: ignore[return-value]

    async def start(self) -> None:
        """Turn the outboxes on and read where each list stands (idempotent)."""
        if self._started:
            return
        for item in self.lists:
            env = item.store.env
            if await self._thread(changes.set_enabled, env, True):
                log.info("cluster: the %s list is shared from now on", item.name)
            last = await self._thread(changes.get_state, env, "last")
            if last:
                stream_id, _, seen = last.partition(b" ")
                item.last_id, item.seen = _stream_id(stream_id), int(seen or 0)
            item.epoch = await self._thread(changes.get_state, env, "epoch")
        self._started = True

    async def run(self, stop: asyncio.Event) -> None:
        """Rounds of :meth:`sync` every POLL seconds until *stop* is set. Never raises
        for Redis being away; anything else is logged and the next round tries again."""
        while not stop.is_set():
            try:
                await self.sync()
            except Exception:
                log.exception("cluster: list replication failed; trying again")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), POLL)

    async def sync(self) -> bool:
        """One round for every list: push the outbox, offer the whole list when asked,
        apply the others' changes. False when Redis was away (the round is cut short)."""
        await self.start()
        done = True
        for item in self.lists:
            try:
                await self._round(item)
            except _Away:
                done = False
                await self._count_waiting(item)
        if done and time.monotonic() - self._swept >= SWEEP_EVERY:
            self._swept = time.monotonic()
            for item in self.lists:
                await self.cluster.call(self._sweeper(item))
        return done

    def _sweeper(self, item: _List) -> Callable[[aioredis.Redis], Awaitable[Any]]:
        """The call that removes *item*'s lapsed entries and old tombstones from Redis."""
        keys, now = [item.hash, item.deadlines], str(time.time())

        async def sweep(client: aioredis.Redis) -> Any:
            return await self._sweep(keys=keys, args=[now], client=client)

        return sweep

    async def _round(self, item: _List) -> None:
        env = item.store.env
        token = secrets.token_hex(8)
        epoch_key = self.cluster.key("lists", "epoch")
        epoch = await self._call(lambda c: self._epoch(keys=[epoch_key], args=[token], client=c))
        epoch = bytes(epoch) if not isinstance(epoch, bytes) else epoch
        fresh = epoch != item.epoch
        if fresh:
            if item.epoch is not None:
                log.warning(
                    "cluster: Redis lost the shared %s list (a restart without its data?); "
                    "this node offers its copy again",
                    item.name,
                )
            await self._thread(changes.want_resend, env, True)
            item.last_id = None
        await self._drain(item)
        if await self._thread(changes.resend_wanted, env):
            await self._resend(item)
        if item.last_id is None or await self._behind(item):
            await self._load(item)
        else:
            await self._follow(item)
        if fresh:
            item.epoch = epoch
            await self._thread(changes.set_state, env, "epoch", epoch)

    async def _count_waiting(self, item: _List) -> None:
        """Count the changes that now wait for Redis (each once), and say so once."""
        env = item.store.env
        last = await self._thread(changes.last_sequence, env)
        waiting = await self._thread(_outbox_size, env)
        fresh = min(last - item.counted, waiting)
        item.counted = last
        if fresh <= 0:
            return
        m.cluster_fallbacks.labels(what="replication").inc(fresh)
        if not item.waiting:
            item.waiting = True
            log.warning(
                "cluster: Redis unavailable; %d change(s) of the %s list wait in this "
                "node's outbox",
                waiting,
                item.name,
            )

    async def _push_changes(self, item: _List, batch: list[Change]) -> None:
        """Hand *batch* to Redis and apply what won over it instead."""
        if not batch:
            return
        args: list[Any] = [STREAM_MAX, self.cluster.node]
        for change in batch:
            deadline = change.stamp + TOMBSTONE_TTL if change.value is None else change.lapses
            args += [change.key, repr(change.stamp), change.data(), repr(deadline)]
        keys = [item.hash, item.deadlines, item.stream]
        losers = await self._call(lambda c: self._push(keys=keys, args=args, client=c))
        winners = _changes(list(zip(losers[::2], losers[1::2], strict=True)))
        if winners:
            await self._thread(item.store.apply_changes, winners, True)

    async def _drain(self, item: _List) -> None:
        """Push the outbox, oldest first, removing what Redis took."""
        env = item.store.env
        for _ in range(PAGES_PER_ROUND):
            batch = await self._thread(changes.pending, env, PAGE)
            if not batch:
                break
            await self._push_changes(item, [c for _, c in batch if c.key])
            await self._thread(changes.drop, env, batch[-1][0])
            item.counted = max(item.counted, batch[-1][0])
        else:
            return  # more next round
        if item.waiting:
            item.waiting = False
            log.warning("cluster: Redis is back; the %s list's outbox is drained", item.name)

    async def _resend(self, item: _List) -> None:
        """Offer every local entry (newer-wins in Redis), then clear the mark."""
        after = b""
        offered = 0
        while True:
            page, following = await self._thread(item.store.snapshot, after, PAGE)
            await self._push_changes(item, page)
            offered += len(page)
            if following is None:
                break
            after = following
        await self._thread(changes.want_resend, item.store.env, False)
        log.info("cluster: offered %d entries of the %s list to the cluster", offered, item.name)

    async def _position(self, item: _List) -> tuple[tuple[int, int], int, int]:
        """The stream's newest id, how many entries were ever added to it, and how many
        of those trimming removed ((0, 0), 0, 0 when there is no stream yet)."""

        async def info(client: aioredis.Redis) -> Any:
            if not await client.exists(item.stream):
                return None
            return await client.xinfo_stream(item.stream)

        found = await self._call(info)
        if found is None:
            return (0, 0), 0, 0
        added = int(found.get("entries-added") or 0)
        return (
            _stream_id(found.get("last-generated-id")),
            added,
            added - int(found.get("length") or 0),
        )

    async def _behind(self, item: _List) -> bool:
        """Whether trimming removed entries this node has not read: more entries went than
        it has seen (entries are counted in the order they were added; Redis 7)."""
        _, _, trimmed = await self._position(item)
        return trimmed > item.seen

    async def _load(self, item: _List) -> None:
        """Apply the whole hash, then follow the stream from where it stood before."""
        mark, added, _ = await self._position(item)
        cursor = 0
        loaded = 0
        while True:
            cursor, page = await self._call(
                lambda c, at=cursor: c.hscan(item.hash, at, count=PAGE)  # type: ignore[misc]
            )
            batch = _changes(list(page.items()))
            if batch:
                loaded += await self._thread(item.store.apply_changes, batch, True)
            if not cursor:
                break
        item.last_id, item.seen = mark, added
        await self._save_position(item)
        log.info("cluster: loaded the shared %s list (%d changes applied)", item.name, loaded)

    async def _save_position(self, item: _List) -> None:
        assert item.last_id is not None
        state = f"{_format_id(item.last_id)} {item.seen}".encode()
        await self._thread(changes.set_state, item.store.env, "last", state)

    async def _follow(self, item: _List) -> None:
        """Apply the stream's entries after the last id, page by page."""
        assert item.last_id is not None
        for _ in range(PAGES_PER_ROUND):
            start = "(" + _format_id(item.last_id)
            entries = await self._call(
                lambda c, s=start: c.xrange(item.stream, min=s, count=PAGE)  # type: ignore[misc]
            )
            if not entries:
                return
            # This node's own changes too: one of them may have to undo an older change of
            # another node applied here before it was pushed (a no-op otherwise).
            batch = _changes([(f.get(b"k", b""), f.get(b"d", b"")) for _, f in entries])
            if batch:
                await self._thread(item.store.apply_changes, batch, True)
            item.last_id = _stream_id(entries[-1][0])
            item.seen += len(entries)
            await self._save_position(item)
            if len(entries) < PAGE:
                return


def _outbox_size(env: Any) -> int:
    with env.begin() as txn:
        return changes.outbox_size(txn)


def _changes(pairs: list[tuple[bytes, bytes]]) -> list[Change]:
    """The changes stored as (key, data) pairs; malformed ones are logged and skipped."""
    out: list[Change] = []
    for key, data in pairs:
        try:
            out.append(Change.from_data(key, data))
        except ValueError as exc:
            log.warning("cluster: skipped a shared list record: %s", exc)
    return out


async def replicate(config: Config, suspensions: Suspensions | None, stop: asyncio.Event) -> None:
    """The node's list replication until *stop* is set, over this process's suppression
    list and *suspensions* (the delivery worker's; None: not open). With ``[cluster]
    redis``, a :class:`Replicator`; without, the stores' outboxes are turned off (a node
    that left its cluster records nothing more). Never raises: a store that cannot be
    opened is logged, and deliveries go on."""
    loop = asyncio.get_running_loop()
    try:
        stores: dict[str, ReplicatedStore] = {"suppression": shared_list(config.data_path)}
        if suspensions is not None:
            stores["suspensions"] = suspensions
        if not config.cluster.redis:
            for store in stores.values():
                await loop.run_in_executor(None, changes.set_enabled, store.env, False)
            return
    except (lmdb.Error, OSError) as exc:
        log.error("cluster: cannot open the lists to share (%s); they stay per node", exc)
        return
    cluster = Cluster(config)
    try:
        await Replicator(cluster, stores).run(stop)
    finally:
        await cluster.close()


__all__ = ["POLL", "STREAM_MAX", "TOMBSTONE_TTL", "Replicator", "replicate"]
