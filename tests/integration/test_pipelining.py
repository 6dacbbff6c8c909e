"""A destination pool pipelining one message's content with the next one's commands.

The pool runs on a real event loop and talks TCP to the scripted peer
(tests/smtp_peer.py), which records every message and every read it made.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from smtp_peer import Script, SmtpPeer
from tachymail.config import PoolConfig
from tachymail.delivery.pool import DEFERRED, DELIVERED, FAILED, DeliveryPool, Job, JobResult
from tachymail.queue.envelope import Recipient
from tachymail.smtpclient.client import ClientSettings
from tachymail.smtpclient.routing import NextHop


def body(n: int) -> bytes:
    # A leading dot on a line checks the dot-stuffing survives the combined writes.
    return f"Subject: message {n}\r\n\r\nline one of {n}\r\n.dot line of {n}\r\n".encode()


def deliver(
    port: int, recipients: list[str], connections: int = 1, timeout: float = 5.0
) -> list[JobResult]:
    """Submit one job per recipient, all at once, and wait for every result."""

    async def run() -> list[JobResult]:
        settings = ClientSettings("relay.test", tls="none", command_timeout=timeout)
        hop = NextHop(f"route:127.0.0.1:{port}", ("127.0.0.1",), port, settings)
        limits = PoolConfig(initial_connections=connections, max_connections=connections)
        pool = DeliveryPool(hop, limits, resolver=None)  # type: ignore[arg-type]
        loop = asyncio.get_running_loop()
        futures = []
        for n, address in enumerate(recipients):
            future: asyncio.Future[JobResult] = loop.create_future()
            pool.submit(Job("a@sender.test", {}, [Recipient(address)], body(n), False, future))
            futures.append(future)
        results = await asyncio.wait_for(asyncio.gather(*futures), 60)
        await asyncio.sleep(0.1)  # let the runners say QUIT
        return list(results)

    return uvloop.run(run())


def test_a_busy_connection_writes_content_and_next_commands_together() -> None:
    with SmtpPeer() as peer:
        results = deliver(peer.port, [f"r{n}@dest.test" for n in range(40)])
        got = peer.wait_for(40)
    assert [r.outcomes[0].kind for r in results] == [DELIVERED] * 40
    assert [m.content for m in got] == [body(n) for n in range(40)]
    assert [m.recipients for m in got] == [[f"r{n}@dest.test"] for n in range(40)]
    assert peer.connections == 1
    # Two reads a message (commands, then content) without the combined write; with it,
    # one a message and a few for the greeting, EHLO and QUIT.
    assert len(peer.reads) < 40 + 10, peer.reads


def test_a_refused_recipient_next_does_not_disturb_the_message_before_it() -> None:
    script = Script(rcpt={"bad@dest.test": "550 5.1.1 no such user"})
    with SmtpPeer(script) as peer:
        results = deliver(peer.port, ["one@dest.test", "bad@dest.test", "three@dest.test"])
        got = peer.wait_for(2)
    kinds = [r.outcomes[0].kind for r in results]
    assert kinds == [DELIVERED, FAILED, DELIVERED]
    assert results[1].outcomes[0].code == 550 and results[1].outcomes[0].status == "5.1.1"
    assert [m.recipients for m in got] == [["one@dest.test"], ["three@dest.test"]]
    assert b"line one of 0" in got[0].content and b"line one of 2" in got[1].content


def test_a_temporary_reply_at_end_of_data_defers_each_pipelined_message() -> None:
    script = Script(data="451 4.3.0 try again later")
    with SmtpPeer(script) as peer:
        results = deliver(peer.port, [f"r{n}@dest.test" for n in range(5)])
    assert all(r.outcomes[0].kind == DEFERRED for r in results)
    assert {r.outcomes[0].text for r in results} == {"4.3.0 try again later"}
    assert not peer.messages


def test_a_connection_cut_after_the_content_defers_what_was_under_way() -> None:
    script = Script(cut_at="EOD")
    with SmtpPeer(script) as peer:
        results = deliver(peer.port, [f"r{n}@dest.test" for n in range(4)])
    assert all(r.outcomes[0].kind == DEFERRED for r in results)
    assert all(r.outcomes[0].status == "4.4.2" for r in results)
    assert not peer.messages


def test_temporary_failures_at_end_of_data_shrink_the_pool() -> None:
    """A run of 4xx lowers the concurrency and paces the pool, pipelined or not, and the
    connections beyond the new concurrency close."""
    script = Script(data="451 4.3.0 try again later")
    with SmtpPeer(script) as peer:

        async def run() -> tuple[int, int, float]:
            settings = ClientSettings("relay.test", tls="none", command_timeout=5.0)
            hop = NextHop(f"route:127.0.0.1:{peer.port}", ("127.0.0.1",), peer.port, settings)
            limits = PoolConfig(initial_connections=4, max_connections=4)
            pool = DeliveryPool(hop, limits, resolver=None)  # type: ignore[arg-type]
            loop = asyncio.get_running_loop()
            futures = []
            for n in range(8):
                future: asyncio.Future[JobResult] = loop.create_future()
                job = Job(
                    "a@sender.test", {}, [Recipient(f"r{n}@dest.test")], body(n), False, future
                )
                pool.submit(job)
                futures.append(future)
            await asyncio.wait_for(asyncio.gather(*futures), 60)
            return pool.concurrency, pool.runners, pool.pace

        concurrency, runners, pace = uvloop.run(run())
    assert concurrency == 1 and pace > 0
    assert runners <= concurrency, "runners beyond the concurrency have stopped"
