"""LocalDelivery against a real mailbox store and users file, without a server: the replies
that the integration tests cannot easily provoke (a full store, a store that will not open)
and the ones every recipient can get (unknown user, loop, over quota, exactly once).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from tachymail.auth.users import UsersFile
from tachymail.config import Config, from_dict
from tachymail.delivery.local import LocalDelivery, LocalOutcome
from tachymail.delivery.pool import DEFERRED, DELIVERED, FAILED, Outcome
from tachymail.mailbox import MailboxStore
from tachymail.queue.envelope import Envelope, Recipient, new_queue_id

MESSAGE = b"Subject: hello\r\nMessage-ID: <unit@test>\r\n\r\nbody\r\n"


def config(tmp_path: Path, **mailbox: object) -> Config:
    return from_dict(
        {
            "server": {"data_dir": str(tmp_path / "data")},
            "policy": {"local_domains": ["example.test"]},
            "mailbox": mailbox,
        }
    )


def envelope(*rcpts: str, sender: str = "carol@remote.example") -> Envelope:
    return Envelope(
        id=new_queue_id(),
        sender=sender,
        recipients=[Recipient(r) for r in rcpts],
        arrival=time.time(),
    )


def run(cfg: Config, env: Envelope, content: bytes = MESSAGE) -> list[Outcome]:
    async def go() -> list[Outcome]:
        local = LocalDelivery(cfg)
        try:
            return await local.deliver(env, content, env.recipients)
        finally:
            while not local.idle:
                await asyncio.sleep(0.001)
            local.close()

    return asyncio.run(go())


def inbox(cfg: Config, user: str) -> list[bytes]:
    store = MailboxStore(cfg.mailbox_path, readonly=True)
    try:
        return [store.content(m.content_id) or b"" for m in store.messages(user)]
    finally:
        store.close()


def test_each_recipient_gets_its_own_reply(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    users = UsersFile(cfg.users_path)
    users.add("alice@example.test", "pw")
    users.add("bob@example.test", "pw", quota=100)
    env = envelope("Alice+Tag@example.test", "gone@example.test", "bob@example.test")
    first, unknown, full = run(cfg, env)
    assert (first.kind, first.reply) == (DELIVERED, "250 2.0.0 delivered to mailbox")
    assert (unknown.kind, unknown.reply) == (
        FAILED,
        "550 5.1.1 <gone@example.test>: no such user",
    )
    assert (full.kind, full.reply, full.status) == (DEFERRED, "452 4.2.2 mailbox full", "4.2.2")
    [stored] = inbox(cfg, "alice@example.test")
    assert stored == (
        b"Return-Path: <carol@remote.example>\r\nDelivered-To: Alice+Tag@example.test\r\n" + MESSAGE
    )
    assert inbox(cfg, "bob@example.test") == []


def test_the_same_queue_id_and_recipient_is_stored_once(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    UsersFile(cfg.users_path).add("alice@example.test", "pw")
    env = envelope("alice@example.test")
    [first] = run(cfg, env)
    [again] = run(cfg, env)
    assert isinstance(first, LocalOutcome) and not first.duplicate
    assert isinstance(again, LocalOutcome) and again.duplicate
    assert again.kind == DELIVERED and again.code == 250
    assert len(inbox(cfg, "alice@example.test")) == 1
    [other] = run(cfg, envelope("alice@example.test"))  # another queue id: a new message
    assert isinstance(other, LocalOutcome) and not other.duplicate
    assert len(inbox(cfg, "alice@example.test")) == 2


def test_a_delivered_to_loop_bounces_and_null_sender_gets_an_empty_return_path(
    tmp_path: Path,
) -> None:
    cfg = config(tmp_path)
    UsersFile(cfg.users_path).add("alice@example.test", "pw")
    looped = b"Delivered-To: <alice@example.test>\r\n" + MESSAGE
    [outcome] = run(cfg, envelope("alice@example.test"), looped)
    assert (outcome.kind, outcome.code, outcome.status) == (FAILED, 554, "5.4.6")
    assert outcome.reply == "554 5.4.6 mail loop: Delivered-To already holds <alice@example.test>"
    # Delivered-To of another recipient in the body or header is no loop for alice.
    [fine] = run(cfg, envelope("alice@example.test", sender=""), b"Delivered-To: x@y\r\n" + MESSAGE)
    assert fine.kind == DELIVERED
    [stored] = inbox(cfg, "alice@example.test")
    assert stored.startswith(b"Return-Path: <>\r\nDelivered-To: alice@example.test\r\n")


def test_a_full_store_defers_with_4_3_1(tmp_path: Path) -> None:
    cfg = config(tmp_path, map_size_mb=1, max_map_size_mb=1)
    UsersFile(cfg.users_path).add("alice@example.test", "pw")
    big = MESSAGE + (b"x" * 998 + b"\r\n") * 2048  # 2 MiB: more than the whole map
    [outcome] = run(cfg, envelope("alice@example.test"), big)
    assert (outcome.kind, outcome.reply) == (DEFERRED, "452 4.3.1 mailbox store full")
    [small] = run(cfg, envelope("alice@example.test"))  # the store stays usable
    assert small.kind == DELIVERED


def test_a_store_that_does_not_open_defers_with_4_3_0(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    UsersFile(cfg.users_path).add("alice@example.test", "pw")
    cfg.mailbox_path.parent.mkdir(parents=True, exist_ok=True)
    cfg.mailbox_path.write_text("not a directory")
    [outcome] = run(cfg, envelope("alice@example.test"))
    assert (outcome.kind, outcome.reply) == (DEFERRED, "451 4.3.0 mailbox store unavailable")
