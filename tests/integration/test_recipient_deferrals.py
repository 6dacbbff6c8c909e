"""A recipient's deferral defers that recipient; only trouble with the destination slows it.

The pool runs on a real event loop against the scripted peer (tests/smtp_peer.py); the
last test runs a whole server. Connection-level trouble (a 421, a 4xx to MAIL, a
connection lost) and a run of deferrals across many recipients lower a destination's
concurrency and pace it; one mailbox answering 451 again and again does not.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_delivery import delivery_log, relay_config, send

from server import running_server, wait_until
from smtp_peer import Script, SmtpPeer
from tachymail.config import Config, PoolConfig
from tachymail.delivery.pool import (
    DEFERRED,
    DELIVERED,
    MAX_PACE,
    RECIPIENT_RUN,
    DeliveryPool,
    Job,
    JobResult,
)
from tachymail.delivery.scheduler import flushed_by_operator
from tachymail.queue import admin
from tachymail.queue.envelope import Envelope, Recipient, new_queue_id
from tachymail.queue.store import QueueStore
from tachymail.smtpclient.client import ClientSettings
from tachymail.smtpclient.routing import NextHop

STUCK = "stuck@dest.test"
GREYLISTED = "451 4.7.1 greylisted, try again later"


def _pool(port: int) -> DeliveryPool:
    settings = ClientSettings("relay.test", tls="none", command_timeout=10.0)
    hop = NextHop(f"route:127.0.0.1:{port}", ("127.0.0.1",), port, settings)
    limits = PoolConfig(initial_connections=5, max_connections=5)
    return DeliveryPool(hop, limits, resolver=None)  # type: ignore[arg-type]


async def _send(pool: DeliveryPool, addresses: list[str]) -> list[JobResult]:
    """One job per address, all submitted at once; their results."""
    loop = asyncio.get_running_loop()
    futures = []
    for n, address in enumerate(addresses):
        future: asyncio.Future[JobResult] = loop.create_future()
        content = f"Subject: {n}\r\n\r\nbody {n}\r\n".encode()
        pool.submit(Job("a@sender.test", {}, [Recipient(address)], content, False, future))
        futures.append(future)
    return list(await asyncio.wait_for(asyncio.gather(*futures), 60))


def test_one_mailbox_deferred_again_and_again_does_not_slow_the_destination() -> None:
    with SmtpPeer(Script(rcpt={STUCK: GREYLISTED})) as peer:

        async def run() -> None:
            pool = _pool(peer.port)
            for _ in range(6):  # six 451s in a row for the one mailbox, as in issue 17
                [result] = await _send(pool, [STUCK])
                assert result.outcomes[0].kind == DEFERRED
            assert (pool.concurrency, pool.pace) == (5, 0.0), "the destination is not slowed"
            results = await _send(pool, [f"r{n}@dest.test" for n in range(20)])
            assert [r.outcomes[0].kind for r in results] == [DELIVERED] * 20
            assert pool.pace == 0.0 and pool.concurrency == 5
            await asyncio.sleep(0.1)  # let the runners say QUIT

        uvloop.run(run())
        assert len(peer.messages) == 20


def test_a_run_of_deferrals_across_many_recipients_slows_the_destination() -> None:
    many = [f"grey{n}@dest.test" for n in range(RECIPIENT_RUN + 3)]
    with SmtpPeer(Script(rcpt=dict.fromkeys(many, GREYLISTED))) as peer:

        async def run() -> None:
            pool = _pool(peer.port)
            for address in many:
                await _send(pool, [address])
            assert pool.concurrency < 5 and pool.pace > 0
            await asyncio.sleep(0.1)

        uvloop.run(run())


def test_a_4xx_to_mail_slows_the_destination_at_once() -> None:
    with SmtpPeer(Script(mail="451 4.3.0 system busy")) as peer:

        async def run() -> None:
            pool = _pool(peer.port)
            [result] = await _send(pool, ["one@dest.test"])
            assert result.outcomes[0].kind == DEFERRED
            assert pool.concurrency < 5 and pool.pace > 0
            await asyncio.sleep(0.1)

        uvloop.run(run())


def test_a_421_to_one_recipient_slows_the_destination_at_once() -> None:
    with SmtpPeer(Script(rcpt={STUCK: "421 4.3.2 shutting down"})) as peer:

        async def run() -> None:
            pool = _pool(peer.port)
            await _send(pool, [STUCK])
            assert pool.concurrency < 5 and pool.pace > 0
            await asyncio.sleep(0.1)

        uvloop.run(run())


def test_unrelated_mail_flows_while_one_mailbox_is_greylisted(tmp_path: Path) -> None:
    """Issue 17, defect 3, end to end: after six 451s for one mailbox, twenty other
    messages go through and the destination is never reported in trouble."""
    script = Script(rcpt={"stuck@dest.example": GREYLISTED})
    pool = "[pool]\ninitial_connections = 5\nmax_connections = 5\n"
    with (
        SmtpPeer(script) as peer,
        running_server(tmp_path, relay_config(peer.port) + pool, hold=False, roles=("mx",)) as srv,
    ):
        for _ in range(6):
            send(srv.port, ["stuck@dest.example"])
        wait_until(lambda: sum(e["result"] == "deferred" for e in delivery_log(srv)) >= 6)
        for n in range(20):
            send(srv.port, [f"r{n}@dest.example"])
        peer.wait_for(20, timeout=60)  # generous: only catches a destination stuck for good
        assert {m.recipients[0] for m in peer.messages} == {f"r{n}@dest.example" for n in range(20)}
        assert "in trouble" not in srv.log()


def test_a_paced_destination_takes_the_first_flushed_message_at_once() -> None:
    """After `queue flush`, the first message goes without waiting out the pace; the
    others keep to it."""
    with SmtpPeer() as peer:

        async def run() -> None:
            pool = _pool(peer.port)
            # As trouble leaves it: paced at the worst, the next turn far off.
            pool.concurrency, pool.pace = 1, MAX_PACE
            pool.next_send = time.monotonic() + 3 * MAX_PACE
            loop = asyncio.get_running_loop()
            flushed: asyncio.Future[JobResult] = loop.create_future()
            content = b"Subject: flushed\r\n\r\nbody\r\n"
            job = Job("a@sender.test", {}, [Recipient("f@dest.test")], content, False, flushed)
            job.flushed = True
            pool.submit(job)
            # Bounded only to catch the pace holding it (that would take 30 s).
            [outcome] = (await asyncio.wait_for(flushed, 2 * MAX_PACE)).outcomes
            assert outcome.kind == DELIVERED
            second: asyncio.Future[JobResult] = loop.create_future()
            job = Job("a@sender.test", {}, [Recipient("g@dest.test")], content, False, second)
            job.flushed = True
            pool.submit(job)
            await asyncio.sleep(1.0)
            assert not second.done(), "only the first flushed message skips the pace"
            pool.jobs.clear()

        uvloop.run(run())


def test_the_scheduler_knows_a_recipient_the_operator_flushed(tmp_path: Path) -> None:
    """`queue flush` (queue/admin.py) marks what it makes due; the delivery worker reads
    that mark from the real queue record."""
    store = QueueStore(tmp_path / "queue")
    try:
        waiting = Recipient("w@dest.test", attempts=2, next_attempt=time.time() + 3600)
        fresh = Recipient("n@dest.test")
        envelope = Envelope(new_queue_id(), "a@sender.test", [waiting, fresh], arrival=time.time())
        store.apply([lambda s, txn: s.insert(txn, envelope, b"Subject: x\r\n\r\nx\r\n")])
        [(loaded, _, _)] = [s for s in store.snapshots([envelope.id]) if s]
        assert [flushed_by_operator(r) for r in loaded.recipients] == [False, False]
        assert admin.run(store, Config(), "flush", None) == 1
        [(loaded, _, _)] = [s for s in store.snapshots([envelope.id]) if s]
        assert [flushed_by_operator(r) for r in loaded.recipients] == [True, False]
    finally:
        store.close()
