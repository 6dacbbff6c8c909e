"""The local side of tachymail.cluster.limits: GCRA arithmetic on a made-up clock, and the
local Rate and Slots (no Redis configured) on a real event loop."""

from __future__ import annotations

import asyncio
import itertools
import time

import pytest

from tachymail.cluster.client import Cluster
from tachymail.cluster.limits import Gcra, Limits
from tachymail.config import Config


def greedy(gcra: Gcra, until: float) -> list[float]:
    """Grant times of a taker that always wants the next message, from time 0."""
    times: list[float] = []
    now = 0.0
    while True:
        due = gcra.due(now)
        if due >= until:
            return times
        gcra.commit(due)
        times.append(due)
        now = due


def test_burst_of_one_spaces_every_message_by_the_interval() -> None:
    times = greedy(Gcra(20, 1), 1.0)
    assert len(times) == 20
    assert times == pytest.approx([i * 0.05 for i in range(20)])


def test_a_burst_goes_at_once_then_the_rest_is_spaced() -> None:
    times = greedy(Gcra(20, 5), 1.0)
    assert times[:5] == [0.0] * 5
    assert times[5:8] == pytest.approx([0.05, 0.10, 0.15])
    # the burst, plus one per interval after the first: never a second boundary's bunch
    assert len(times) == 5 + 19


@pytest.mark.parametrize(("rate", "burst"), [(20, 1), (20, 5), (7, 3), (1000, 50)])
def test_no_one_second_window_holds_more_than_rate_plus_burst(rate: int, burst: int) -> None:
    times = greedy(Gcra(rate, burst), 10.0)
    assert len(times) == pytest.approx(rate * 10 + burst - 1, abs=1)
    for i, start in enumerate(times):
        in_window = sum(1 for t in times[i:] if t < start + 1.0)
        assert in_window <= rate + burst


def test_idle_time_refills_the_burst_but_no_more() -> None:
    gcra = Gcra(10, 3)
    for _ in range(3):
        gcra.commit(gcra.due(0.0))
    assert gcra.due(0.0) == pytest.approx(0.1)
    # after a long pause three go at once again (not the whole pause's worth), then spaced
    for _ in range(3):
        assert gcra.due(100.0) == 100.0
        gcra.commit(100.0)
    assert gcra.due(100.0) == pytest.approx(100.1)


def test_commit_at_the_scheduled_time_keeps_lateness_from_accumulating() -> None:
    gcra = Gcra(50, 1)
    gcra.commit(0.0)
    woke = 0.0
    for i in range(1, 100):
        due = gcra.due(woke)
        assert due == pytest.approx(i * 0.02)
        gcra.commit(due)
        woke = due + 0.003  # each sleep ends 3 ms late: the schedule does not drift
    assert gcra.due(woke) == pytest.approx(100 * 0.02)


def test_a_new_rate_applies_from_the_next_message() -> None:
    gcra = Gcra(10, 1)
    gcra.commit(0.0)
    gcra.configure(5, 1)
    assert gcra.due(0.0) == pytest.approx(0.1)  # the grant already made keeps its interval
    gcra.commit(0.1)
    assert gcra.due(0.1) == pytest.approx(0.3)


def limits(workers: int = 1) -> Limits:
    return Limits(Cluster(Config()), workers)


def test_limits_hand_out_one_object_per_key_and_update_it() -> None:
    lim = limits(workers=2)
    rate = lim.rate("gmail", 40, 4, shared=True, rule="gmail")  # no Redis: local
    assert lim.rate("gmail", 40, 4, shared=True, rule="gmail") is rate
    assert not rate.shared and rate.mode == "local"
    assert rate.local_per_second == pytest.approx(20)  # this worker's half
    lim.rate("gmail", 80, 4, shared=True, rule="gmail")
    assert rate.local_per_second == pytest.approx(40)
    rate.set_factor(0.25)
    assert rate.local_per_second == pytest.approx(10)
    rate.set_factor(1.0)
    assert rate.local_per_second == pytest.approx(40)
    slots = lim.slots("gmail", 5, shared=False, rule="gmail")
    assert lim.slots("gmail", 5, shared=False, rule="gmail") is slots
    assert slots.local_limit == 2  # 5 // 2
    assert lim.slots("tiny", 1, shared=False, rule="tiny").local_limit == 1  # never 0
    assert lim.snapshot()["rates"]["gmail"]["per_second"] == 80


def test_local_rate_spaces_takes_on_a_real_loop() -> None:
    async def scenario() -> list[float]:
        rate = limits().rate("d", 20, 1, shared=False, rule="d")
        times: list[float] = []

        async def taker() -> None:
            while len(times) < 15:
                await rate.take()
                times.append(time.monotonic())

        await asyncio.wait_for(asyncio.gather(*(taker() for _ in range(3))), 10)
        return times

    times = asyncio.run(scenario())
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert min(gaps) > 0.04  # 50 ms apart (less a little timer jitter), never bunched
    assert times[14] - times[0] == pytest.approx(14 * 0.05, abs=0.05)


def test_take_says_whether_it_waited() -> None:
    async def scenario() -> list[bool]:
        rate = limits().rate("d", 100, 2, shared=False, rule="d")
        return [await rate.take() for _ in range(4)]

    assert asyncio.run(scenario()) == [False, False, True, True]


def test_local_slots_serve_waiters_in_order_and_survive_cancellation() -> None:
    async def scenario() -> list[str]:
        slots = limits().slots("d", 2, shared=False, rule="d")
        order: list[str] = []
        assert await slots.acquire() is False
        assert await slots.acquire() is False

        async def wait(name: str) -> None:
            assert await slots.acquire() is True
            order.append(name)

        tasks = {n: asyncio.create_task(wait(n)) for n in "abc"}
        await asyncio.sleep(0.01)
        assert slots.in_use == 2 and slots.waiting == 3
        tasks["b"].cancel()  # a waiter that gives up does not take a slot with it
        await asyncio.sleep(0)
        slots.release()
        await asyncio.sleep(0.01)
        assert order == ["a"]
        slots.release()
        await asyncio.sleep(0.01)
        assert order == ["a", "c"]
        assert slots.in_use == 2
        slots.release()
        slots.release()
        assert slots.in_use == 0
        return order

    assert asyncio.run(scenario()) == ["a", "c"]


def test_a_higher_limit_on_reload_wakes_waiters() -> None:
    async def scenario() -> int:
        lim = limits()
        slots = lim.slots("d", 1, shared=False, rule="d")
        await slots.acquire()
        waiter = asyncio.create_task(slots.acquire())
        await asyncio.sleep(0.01)
        assert not waiter.done()
        lim.slots("d", 2, shared=False, rule="d")
        assert await asyncio.wait_for(waiter, 1) is True
        return slots.in_use

    assert asyncio.run(scenario()) == 2


def test_try_take_grants_only_what_needs_no_wait() -> None:
    async def scenario() -> list[bool]:
        rate = limits().rate("d", 10, 2, shared=False, rule="d")
        seen = [rate.try_take(), rate.try_take(), rate.try_take()]
        assert await rate.take() is True  # the third had to wait its interval
        unlimited = limits().rate("none", 0, 1, shared=False, rule="none")
        return [*seen, unlimited.try_take()]

    assert asyncio.run(scenario()) == [True, True, False, True]
