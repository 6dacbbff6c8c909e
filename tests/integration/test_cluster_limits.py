"""Cluster-wide rate and connection limits (tachymail.cluster.limits) against a real
redis-server: GCRA spacing measured on the grant times, two "nodes" (each a Limits on its
own uvloop in its own thread) sharing one rate, three sharing a connection limit, a
SIGKILLed holder whose leases expire, and Redis stopped and started mid-run."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import pytest
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.redisserver import RedisServer, running_redis

from tachymail.cluster.client import Cluster
from tachymail.cluster.limits import Limits
from tachymail.config import Config
from tachymail.metrics import m

T = TypeVar("T")


@pytest.fixture
def redis_server(tmp_path: Path) -> Any:
    with running_redis(tmp_path / "redis") as server:
        yield server


def cluster(url: str, node: str, **settings: Any) -> Cluster:
    config = Config()
    config.cluster.redis = url
    config.cluster.node = node
    for name, value in settings.items():
        setattr(config.cluster, name, value)
    return Cluster(config)


def run(work: Callable[[], Awaitable[T]]) -> T:
    """Run *work* on a fresh uvloop, as a delivery worker does."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(asyncio.wait_for(work(), 60))


def in_threads(*works: Callable[[], Awaitable[T]]) -> list[T]:
    """Each *work* on its own loop in its own thread: nodes that share only Redis."""
    with ThreadPoolExecutor(len(works)) as pool:
        return [f.result() for f in [pool.submit(run, w) for w in works]]


def fallbacks(what: str) -> float:
    return float(m.cluster_fallbacks.labels(what)._value.get())


async def greedy(rate: Any, takers: int, start: float, stop: float) -> list[float]:
    """Grant times (monotonic) of *takers* tasks taking as fast as the rate lets them."""
    times: list[float] = []
    await asyncio.sleep(max(0.0, start - time.monotonic()))

    async def taker() -> None:
        while True:
            await rate.take()
            now = time.monotonic()
            if now >= stop:
                return
            times.append(now)

    await asyncio.gather(*(taker() for _ in range(takers)))
    return times


def windows_ok(times: list[float], most: int) -> bool:
    ordered = sorted(times)
    return all(
        sum(1 for t in ordered[i:] if t < start + 1.0) <= most for i, start in enumerate(ordered)
    )


def test_a_shared_rate_is_smooth_and_holds(redis_server: RedisServer) -> None:
    async def node() -> tuple[list[float], str]:
        limits = Limits(cluster(redis_server.url, "a"), workers=1)
        rate = limits.rate("dest.test", 20, 5, shared=True, rule="dest")
        begin = time.monotonic()
        times = await greedy(rate, 4, begin, begin + 3.0)
        mode = rate.mode
        await limits.close()
        await limits.cluster.close()
        return [t - begin for t in times], mode

    before = fallbacks("rate")
    times, mode = run(node)
    assert mode == "cluster" and fallbacks("rate") == before
    steady = [t for t in times if t >= 1.0]
    assert len(steady) == pytest.approx(40, rel=0.1)  # 20/s over the last 2 s
    assert len(times) <= 20 * 3 + 5  # the burst once, then the rate
    assert windows_ok(times, 20 + 5)  # never a bunch at a second boundary
    # Redis keeps the schedule (TAT, µs of Redis time), and it expires when idle
    ttl = int(redis_server.command("PTTL", "tachymail:rate:dest.test").split(b":")[1])
    assert 0 < ttl <= 1000 + 300


@pytest.mark.parametrize("split", ["even", "uneven"])
def test_two_nodes_share_one_rate_whatever_the_split(redis_server: RedisServer, split: str) -> None:
    start = time.monotonic() + 0.5
    stop = start + 5.0

    async def busy_node() -> list[float]:
        limits = Limits(cluster(redis_server.url, "busy"), workers=1)
        times = await greedy(limits.rate("dest.test", 50, 5, True, "dest"), 6, start, stop)
        await limits.close()
        await limits.cluster.close()
        return times

    async def other_node() -> list[float]:
        limits = Limits(cluster(redis_server.url, "other"), workers=1)
        rate = limits.rate("dest.test", 50, 5, True, "dest")
        if split == "even":
            times = await greedy(rate, 6, start, stop)
        else:
            # a node with little mail: a message every 100 ms, each taking its turn
            times = []

            async def message() -> None:
                await rate.take()
                if time.monotonic() < stop:
                    times.append(time.monotonic())

            await asyncio.sleep(start - time.monotonic())
            messages = []
            while time.monotonic() < stop:
                messages.append(asyncio.create_task(message()))
                await asyncio.sleep(0.1)
            await asyncio.gather(*messages)
        await limits.close()
        await limits.cluster.close()
        return times

    busy, other = in_threads(busy_node, other_node)
    steady = [t for t in busy + other if t >= start + 1.0]
    assert len(steady) == pytest.approx(50 * 4, rel=0.1)  # 50/s together over 4 s
    assert windows_ok(busy + other, 50 + 5)
    if split == "even":
        # neither node starves (the split follows when each asks, not a strict half)
        assert min(len(busy), len(other)) > 0.15 * (len(busy) + len(other))
    else:
        assert len(other) > 0.6 * 50  # the quiet node still gets most of what it asks for


def test_a_shared_connection_limit_is_never_exceeded(redis_server: RedisServer) -> None:
    lock = threading.Lock()
    state = {"now": 0, "most": 0}
    stop = time.monotonic() + 3.0

    async def node(name: str) -> int:
        limits = Limits(cluster(redis_server.url, name, lease_ttl=1.5), workers=1)
        slots = limits.slots("dest.test", 4, shared=True, rule="dest")
        done = 0

        async def connection() -> None:
            nonlocal done
            while time.monotonic() < stop:
                await slots.acquire()
                with lock:
                    state["now"] += 1
                    state["most"] = max(state["most"], state["now"])
                await asyncio.sleep(random.uniform(0.01, 0.06))
                with lock:
                    state["now"] -= 1
                slots.release()
                done += 1

        await asyncio.gather(*(connection() for _ in range(3)))
        assert slots.in_use == 0
        await limits.close()
        await limits.cluster.close()
        return done

    counts = in_threads(*(lambda n=n: node(n) for n in ("a", "b", "c")))
    assert state["most"] == 4  # reached, never more
    assert min(counts) > max(counts) / 2, counts  # the nodes take turns, in order
    assert redis_server.command("ZCARD", "tachymail:conn:dest.test") == b":0\r\n"


def test_a_holder_learns_that_another_node_waits(redis_server: RedisServer) -> None:
    async def scenario() -> list[bool]:
        holder = Limits(cluster(redis_server.url, "holder", lease_ttl=1.5), workers=1)
        waiter = Limits(cluster(redis_server.url, "waiter", lease_ttl=1.5), workers=1)
        held = holder.slots("dest.test", 2, shared=True, rule="dest")
        wanted = waiter.slots("dest.test", 2, shared=True, rule="dest")
        await held.acquire()
        await held.acquire()
        await holder.renew_now()
        seen = [held.contended]
        waiting = asyncio.create_task(wanted.acquire())
        await asyncio.sleep(0.2)  # the waiter is in the cluster's queue now
        await holder.renew_now()
        seen.append(held.contended)
        local = asyncio.create_task(held.acquire())  # a waiter here too
        await asyncio.sleep(0.05)
        held.release()  # the other node waited first: the slot goes there, not to `local`
        assert await asyncio.wait_for(waiting, 2) is True
        assert not local.done()
        held.release()  # now only this node waits: handed over here
        assert await asyncio.wait_for(local, 2) is True
        wanted.release()
        held.release()
        for limits in (holder, waiter):
            await limits.close()
            await limits.cluster.close()
        return seen

    assert run(scenario) == [False, True]


HOLDER = """
import asyncio, sys
from tachymail.cluster.client import Cluster
from tachymail.cluster.limits import Limits
from tachymail.config import Config

async def main():
    config = Config()
    config.cluster.redis = sys.argv[1]
    config.cluster.node = "doomed"
    config.cluster.lease_ttl = float(sys.argv[2])
    slots = Limits(Cluster(config), 1).slots("dest.test", 4, True, "dest")
    for _ in range(4):
        await slots.acquire()
    print("held", flush=True)
    await asyncio.sleep(120)

asyncio.run(main())
"""


def test_a_killed_holders_leases_expire(redis_server: RedisServer) -> None:
    lease_ttl = 1.5
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, redis_server.url, str(lease_ttl)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "held"

        async def node() -> float:
            limits = Limits(cluster(redis_server.url, "alive", lease_ttl=lease_ttl), 1)
            slots = limits.slots("dest.test", 4, shared=True, rule="dest")
            # the holder renews its leases: still full after more than a lease_ttl
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(slots.acquire(), lease_ttl + 0.5)
            members = redis_server.command("ZRANGE", "tachymail:conn:dest.test", "0", "-1")
            assert members.count(f"doomed:{holder.pid}:".encode()) == 4
            os.kill(holder.pid, signal.SIGKILL)
            killed = time.monotonic()
            await asyncio.wait_for(asyncio.gather(*(slots.acquire() for _ in range(4))), 10)
            freed = time.monotonic() - killed
            assert slots.in_use == 4
            await limits.close()
            await limits.cluster.close()
            return freed

        assert run(node) < lease_ttl + 0.4  # lease expiry plus one poll
    finally:
        if holder.poll() is None:
            os.kill(holder.pid, signal.SIGKILL)
        holder.wait(10)


def test_redis_away_falls_back_to_the_local_share_and_comes_back(
    redis_server: RedisServer,
) -> None:
    async def node() -> None:
        limits = Limits(
            cluster(
                redis_server.url,
                "a",
                nodes=2,  # fallback share: half the cluster's limit
                timeout=0.2,
                retry_interval=0.5,
                lease_ttl=1.5,
            ),
            workers=1,
        )
        rate = limits.rate("dest.test", 50, 1, shared=True, rule="dest")
        slots = limits.slots("dest.test", 4, shared=True, rule="dest")
        await slots.acquire()  # a lease in Redis

        async def measure(seconds: float) -> int:
            begin = time.monotonic()
            return len(await greedy(rate, 3, begin, begin + seconds))

        assert await measure(1.5) == pytest.approx(75, rel=0.1)
        assert rate.mode == "cluster"

        await asyncio.to_thread(redis_server.stop)
        before = fallbacks("rate")
        taken = await measure(2.0)  # takes go on, at the local share (25/s)
        assert taken == pytest.approx(50, rel=0.15)
        assert rate.mode == "fallback"
        # all from the fallback share but the stock granted before Redis went (<= 100 ms);
        # each taker's last take, after the end of the window, is not in `taken`
        assert taken - 6 <= fallbacks("rate") - before <= taken + 3
        # connections: the fallback share is 2 (4 * 1/2), counting the one already held
        connections = fallbacks("connections")
        assert await asyncio.wait_for(slots.acquire(), 1) is False
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(slots.acquire(), 0.3)
        assert fallbacks("connections") == connections + 1

        await asyncio.to_thread(redis_server.start)  # an empty Redis
        deadline = time.monotonic() + 5
        while rate.mode != "cluster" and time.monotonic() < deadline:
            await measure(0.1)
        assert rate.mode == "cluster"
        before = fallbacks("rate")
        assert await measure(1.5) == pytest.approx(75, rel=0.1)
        assert fallbacks("rate") == before
        assert redis_server.command("EXISTS", "tachymail:rate:dest.test") == b":1\r\n"
        # the renewal writes both held leases (one taken in fallback) to the new Redis
        await limits.renew_now()
        members = redis_server.command("ZRANGE", "tachymail:conn:dest.test", "0", "-1")
        assert members.count(b"a:") == 2
        slots.release()
        slots.release()
        await limits.close()
        await limits.cluster.close()

    run(node)
