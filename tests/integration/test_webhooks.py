"""Delivery events by webhook, end to end: a real `tachymail serve` relays to a scripted SMTP
peer (tests/smtp_peer.py) that accepts, defers and refuses recipients, and POSTs the events
to a real aiohttp receiver on 127.0.0.1 that checks every body's HMAC. The receiver answers
500, goes away and comes back; the server is killed with -9 while events wait in the outbox.
`tachymail sink` with a seeded reply mix makes bounces and deferrals at random, checked
against the sink's own counts.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from test_delivery import send

from server import free_port, metric, running_server, start, wait_until
from smtp_peer import Script, SmtpPeer
from tachymail.queue.envelope import Envelope, Recipient, new_queue_id
from tachymail.queue.events import EVENT_FIELDS
from tachymail.queue.store import QueueStore, put_message

SECRET = "webhook-test-secret"
OK, LATER, GONE = "ok@dest.example", "later@dest.example", "gone@dest.example"


class Receiver:
    """An aiohttp webhook receiver in a thread of the test process: records each POSTed
    body's events (when the HMAC matches and ``status`` is 2xx) and answers ``status``."""

    def __init__(self, port: int, secret: str = SECRET) -> None:
        self.port = port
        self.secret = secret
        self.status = 200
        self.events: list[dict[str, Any]] = []
        self.posts = 0
        self.bad_signatures = 0
        self.lock = threading.Lock()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.runner: web.AppRunner | None = None

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        expected = "sha256=" + hmac.new(self.secret.encode(), body, hashlib.sha256).hexdigest()
        with self.lock:
            self.posts += 1
            if not hmac.compare_digest(request.headers.get("X-Tachymail-Signature", ""), expected):
                self.bad_signatures += 1
                return web.Response(status=401)
            if request.content_type != "application/json":
                return web.Response(status=415)
            if 200 <= self.status < 300:
                self.events.extend(json.loads(body))
        return web.Response(status=self.status)

    def start(self) -> None:
        async def up() -> web.AppRunner:
            app = web.Application()
            app.router.add_post("/hook", self._handle)
            runner = web.AppRunner(app)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", self.port).start()
            return runner

        self.runner = asyncio.run_coroutine_threadsafe(up(), self.loop).result(10)

    def stop(self) -> None:
        if self.runner is not None:
            asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
            self.runner = None

    def close(self) -> None:
        self.stop()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    def got(self) -> list[dict[str, Any]]:
        with self.lock:
            return list(self.events)

    def of(self, queue_id: str, kind: str | None = None) -> list[dict[str, Any]]:
        return [e for e in self.got() if e["queue_id"] == queue_id and kind in (None, e["type"])]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    hook = Receiver(free_port())
    hook.start()
    try:
        yield hook
    finally:
        hook.close()


@pytest.fixture
def peer() -> Iterator[SmtpPeer]:
    script = Script(
        rcpt={LATER: "450 4.2.1 mailbox busy, try later", GONE: "550 5.1.1 no such user"}
    )
    with SmtpPeer(script) as scripted:
        yield scripted


#: what these tests subscribe to: everything but "suppression" (test_suppression.py's part)
DELIVERY_EVENTS = ["reception", "delivery", "transient_failure", "bounce", "delay", "expiry"]


def config(
    peer_port: int, hook_port: int, metrics_port: int = 0, events: list[str] = DELIVERY_EVENTS
) -> str:
    metrics = f'\n[metrics]\naddress = "127.0.0.1:{metrics_port}"\n' if metrics_port else ""
    return (
        f'[[route]]\ndomain = "dest.example"\nhost = "127.0.0.1:{peer_port}"\ntls = "none"\n\n'
        f'[[route]]\ndomain = "sender.example"\nhost = "127.0.0.1:{peer_port}"\ntls = "none"\n\n'
        "[delivery]\nretry_schedule = [1]\ndelay_warning = 1\n"
        'resolver = "127.0.0.1:9"\n\n'
        f'[[webhook]]\nname = "test"\nurl = "http://127.0.0.1:{hook_port}/hook"\n'
        f'secret = "{SECRET}"\nbatch_ms = 200\nevents = {json.dumps(events)}\n{metrics}'
    )


def check_shape(events: list[dict[str, Any]]) -> None:
    for event in events:
        assert tuple(event) == EVENT_FIELDS, event
    ids = [e["id"] for e in events]
    assert len(ids) == len(set(ids)), "an event arrived twice"


def test_every_outcome_arrives_signed_with_its_fields_and_in_order(
    tmp_path: Path, receiver: Receiver, peer: SmtpPeer
) -> None:
    with running_server(
        tmp_path, config(peer.port, receiver.port), hold=False, roles=("mx",)
    ) as srv:
        queue_id = send(srv.port, [OK, LATER, GONE])
        wait_until(lambda: len(receiver.of(queue_id, "transient_failure")) >= 2, timeout=30)
        wait_until(lambda: receiver.of(queue_id, "delay"))
        events = receiver.of(queue_id)
        log = [
            json.loads(line) for line in (srv.data_dir / "delivery.log").read_text().splitlines()
        ]
    assert receiver.bad_signatures == 0 and receiver.posts > 0
    check_shape(receiver.got())
    for event in events:
        assert event["sender"] == "alice@sender.example"
        assert event["tags"] == [] and event["metadata"] == {}  # SMTP mail carries neither
    received = [e for e in events if e["type"] == "reception"]
    assert sorted(e["recipient"] for e in received) == sorted([OK, LATER, GONE])
    assert all(e["remote_ip"] == "127.0.0.1" and e["code"] == 250 for e in received)
    hop = "127.0.0.1"  # the host that answered (the route's next hop)
    [delivered] = [e for e in events if e["type"] == "delivery"]
    assert delivered["recipient"] == OK and delivered["code"] == 250
    assert delivered["destination"] == hop and delivered["remote_ip"] == "127.0.0.1"
    assert delivered["attempt"] == 1 and delivered["reply"].startswith("250")
    [bounced] = [e for e in events if e["type"] == "bounce"]
    assert (bounced["recipient"], bounced["code"], bounced["enhanced_code"]) == (GONE, 550, "5.1.1")
    assert "no such user" in bounced["reply"] and bounced["destination"] == hop
    deferred = [e for e in events if e["type"] == "transient_failure"]
    assert {e["recipient"] for e in deferred} == {LATER}
    assert all(e["code"] == 450 and e["enhanced_code"] == "4.2.1" for e in deferred)
    [delay] = [e for e in events if e["type"] == "delay"]
    assert delay["recipient"] == LATER and delay["code"] == 450
    # order per message: reception first, then the attempts as they happened
    kinds = [e["type"] for e in events]
    assert kinds[:3] == ["reception"] * 3
    assert [e["attempt"] for e in deferred] == list(range(1, len(deferred) + 1))
    assert [e["time"] for e in events] == sorted(e["time"] for e in events)
    # the delivery log carries the same events (same ids), with its own few fields more
    logged = {e["id"]: e for e in log}
    for event in [delivered, bounced, deferred[0]]:
        assert {k: logged[event["id"]][k] for k in EVENT_FIELDS} == event
        assert logged[event["id"]]["result"] in ("delivered", "bounced", "deferred")


def test_a_receiver_that_fails_or_is_down_gets_every_event_when_it_is_back(
    tmp_path: Path, receiver: Receiver, peer: SmtpPeer
) -> None:
    metrics_port = free_port()
    receiver.status = 500
    text = config(peer.port, receiver.port, metrics_port)
    with running_server(tmp_path, text, hold=False, roles=("mx",)) as srv:
        first = send(srv.port, [OK, GONE])
        # a 500 is retried (with back-off), and nothing is taken as received meanwhile
        wait_until(lambda: receiver.posts >= 2, timeout=30)
        assert receiver.got() == []
        assert metric(metrics_port, "tachymail_webhook_failures_total", webhook="test") >= 1
        assert metric(metrics_port, "tachymail_webhook_posts_total", result="http_error") >= 1
        # now it is gone altogether: the events pile up in the outbox
        receiver.stop()
        more = [send(srv.port, [f"r{n}@dest.example"]) for n in range(5)]
        peer.wait_for(6)
        wait_until(
            lambda: metric(metrics_port, "tachymail_webhook_outbox_depth", webhook="test") >= 14
        )
        receiver.status = 200
        receiver.start()
        wait_until(
            lambda: (
                len(receiver.of(first)) == 4
                and all(len(receiver.of(queue_id)) == 2 for queue_id in more)
            ),
            timeout=60,
        )
        wait_until(
            lambda: metric(metrics_port, "tachymail_webhook_outbox_depth", webhook="test") == 0
        )
        assert metric(metrics_port, "tachymail_webhook_posts_total", result="ok") >= 1
    events = receiver.got()
    check_shape(events)
    # one attempt's results are one commit, in the order of the message's recipients
    assert [e["type"] for e in receiver.of(first)] == [
        "reception",
        "reception",
        "delivery",
        "bounce",
    ]
    for queue_id in more:
        assert [e["type"] for e in receiver.of(queue_id)] == ["reception", "delivery"]
    # and the bounce's DSN, delivered to the sender
    [dsn] = [e for e in events if e["sender"] == ""]
    assert dsn["type"] == "delivery" and dsn["recipient"] == "alice@sender.example"
    assert len(events) == 4 + 2 * len(more) + 1


def test_events_in_the_outbox_survive_kill_9(
    tmp_path: Path, receiver: Receiver, peer: SmtpPeer
) -> None:
    receiver.stop()
    peer.script.rcpt.update({f"gone{n}@dest.example": "550 5.1.1 no such user" for n in range(10)})
    text = config(peer.port, receiver.port)
    with running_server(tmp_path, text, hold=False, roles=("mx",)) as srv:
        # (a new refused address each time: H4's suppression list remembers the last one)
        ids = [send(srv.port, [f"k{n}@dest.example", f"gone{n}@dest.example"]) for n in range(10)]
        peer.wait_for(10)
        # the results are committed (with their events) once the log has them all
        wait_until(lambda: len((srv.data_dir / "delivery.log").read_text().splitlines()) >= 20)
        srv.kill()
        receiver.start()
        again = start(srv.config_path, srv.data_dir, srv.ports, 1, tmp_path / "again.log")
        try:
            wait_until(lambda: all(len(receiver.of(q)) >= 4 for q in ids), timeout=60)
        finally:
            again.stop()
    events = receiver.got()
    # at least once: an event may come twice, but only ever as the very same event
    by_id: dict[str, list[dict[str, Any]]] = {}
    for event in events:
        by_id.setdefault(event["id"], []).append(event)
    assert all(all(e == copies[0] for e in copies) for copies in by_id.values())
    for queue_id in ids:
        kinds = Counter(e["type"] for e in {e["id"]: e for e in receiver.of(queue_id)}.values())
        assert kinds["reception"] == 2 and kinds["bounce"] >= 1 and kinds["delivery"] >= 1


def test_a_message_past_its_lifetime_expires_with_an_event(
    tmp_path: Path, receiver: Receiver, peer: SmtpPeer
) -> None:
    data_dir = tmp_path / "data"
    store = QueueStore(data_dir / "queue", map_size=16 * 1024 * 1024)
    old = Envelope(
        new_queue_id(),
        "alice@sender.example",
        [Recipient(LATER)],
        arrival=time.time() - 6 * 86400,  # older than the default 5-day lifetime
        size=30,
    )
    store.apply([put_message(old, b"Subject: old\r\n\r\nStill here?\r\n")])
    store.close()
    text = config(peer.port, receiver.port, events=["expiry", "bounce"])
    with running_server(tmp_path, text, hold=False, roles=("mx",), data_dir=data_dir):
        wait_until(lambda: receiver.of(old.id), timeout=30)
    [expired] = receiver.got()
    assert expired["type"] == "expiry" and expired["recipient"] == LATER
    assert (expired["code"], expired["enhanced_code"]) == (450, "4.4.7")
    assert "gave up after" in expired["reply"] and expired["attempt"] == 1


def test_a_sink_reply_mix_gives_each_recipient_its_event(
    tmp_path: Path, receiver: Receiver
) -> None:
    """`tachymail sink` refuses recipients at random (seeded) with 550 and 450: every
    recipient gets its reception event and one attempt event, and the events add up to what
    the sink itself counted (accepted: delivery; refused: bounce or transient_failure)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_loadtest import sink

    with sink("--rcpt-reply", "550:30", "--rcpt-reply", "450:30", "--seed", "11") as mix:
        settings = config(mix.port, receiver.port, events=DELIVERY_EVENTS).replace(
            "retry_schedule = [1]\ndelay_warning = 1", "retry_schedule = [3600]\ndelay_warning = 0"
        )
        recipients = [f"r{n}@dest.example" for n in range(40)]
        with running_server(tmp_path, settings, hold=False, roles=("mx",)) as srv:
            # NOTIFY=NEVER: no DSN goes back through the sink to blur its counts
            ids = {r: send(srv.port, [r], rcpt_options=("NOTIFY=NEVER",)) for r in recipients}
            attempts = ("delivery", "bounce", "transient_failure")
            wait_until(
                lambda: all(
                    any(e["type"] in attempts for e in receiver.of(ids[r])) for r in recipients
                ),
                timeout=60,
            )
        counted = mix.stop()
    kinds: Counter[str] = Counter()
    for recipient in recipients:
        events = receiver.of(ids[recipient])
        assert events[0]["type"] == "reception", events
        [attempt] = [e for e in events if e["type"] in attempts]
        assert attempt["recipient"] == recipient and attempt["attempt"] == 1
        expected_code = {"delivery": 250, "bounce": 550, "transient_failure": 450}
        assert attempt["code"] == expected_code[attempt["type"]], attempt
        kinds[attempt["type"]] += 1
    assert kinds["delivery"] == counted["recipients"]
    assert kinds["bounce"] + kinds["transient_failure"] == counted["recipients_rejected"]
    assert kinds["bounce"] > 0 and kinds["transient_failure"] > 0  # the seeded mix has both
    check_shape(receiver.got())
