"""Local delivery (issue 10): SMTP in, a real `tachymail serve` delivers into the mailbox
store, and each test reads the users' mailboxes as IMAP and POP3 will (the store's index
and contents, opened read-only beside the running server).

Covers what lands in INBOX (Return-Path, Delivered-To, bytes intact, 8-bit too), aliases
and sub-addresses, the "delivered" DSN of NOTIFY=SUCCESS, loops (a bounce to the sender),
quota (a deferral, delivered once the quota is raised and the queue flushed), mail queued
before its domain became local, and kill -9 of the delivery worker under load (every
message once, none lost).
"""

from __future__ import annotations

import email
import json
import os
import random
import signal
import smtplib
import sys
import time
from collections import Counter
from email import policy
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from server import Server, free_port, metric, run_cli, running_server, start, wait_until
from tachymail.mailbox import (
    Delivered,
    MailboxStore,
    deliver,
    delivery_headers,
    prepare_delivery,
)
from tachymail.queue.envelope import Envelope, Recipient, new_queue_id
from tachymail.queue.store import QueueStore, put_message

DOMAIN = "example.test"


def local_config(retry: str = "[1, 2]", extra: str = "") -> str:
    return (
        f'[policy]\nlocal_domains = ["{DOMAIN}"]\n'
        f'[delivery]\nresolver = "127.0.0.1:9"\nretry_schedule = {retry}\n{extra}'
    )


def add_user(data_dir: Path, user: str, *extra: str) -> None:
    run_cli("user", "add", user, "--password-stdin", *extra, data_dir=data_dir, stdin="pw\n")


def mailbox(data_dir: Path, user: str, name: str = "INBOX") -> list[bytes]:
    """The messages of *user*'s mailbox *name*, in UID order ([] before any delivery)."""
    if not (data_dir / "mailbox").exists():
        return []
    store = MailboxStore(data_dir / "mailbox", readonly=True)
    try:
        return [
            content
            for info in store.messages(user, name)
            if (content := store.content(info.content_id)) is not None
        ]
    finally:
        store.close()


def delivery_log(srv: Server) -> list[dict[str, object]]:
    path = srv.data_dir / "delivery.log"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def queue_listing(srv: Server) -> list[dict[str, object]]:
    out = run_cli("queue", "list", "--json", data_dir=srv.data_dir)
    return [json.loads(line) for line in out.splitlines()]


def header_block(content: bytes) -> bytes:
    return content.split(b"\r\n\r\n", 1)[0] + b"\r\n"


def dsn_status(content: bytes) -> str:
    """The message/delivery-status part of a DSN, as text."""
    parsed = email.message_from_bytes(content, policy=policy.default)
    parts = list(parsed.iter_parts())
    assert parsed.get_content_type() == "multipart/report", parsed.get_content_type()
    return parts[1].as_string().replace("\n ", " ")  # unfolded


# --- into INBOX ------------------------------------------------------------------------


def test_a_message_lands_in_the_inbox_with_delivery_headers_and_intact_bytes(
    tmp_path: Path,
) -> None:
    metrics_port = free_port()
    extra = f'[metrics]\naddress = "127.0.0.1:{metrics_port}"\n'
    body = "Grüße aus Köln: ½ € — non-ASCII bytes travel as they are.\r\n.dot line\r\n"
    message = (
        f"From: carol@remote.example\r\nTo: alice@{DOMAIN}\r\nSubject: eight bit\r\n"
        "Message-ID: <eight@test>\r\nMIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n"
        f"\r\n{body}"
    ).encode()
    with running_server(tmp_path, local_config(extra=extra), roles=("mx",), hold=False) as srv:
        add_user(srv.data_dir, f"alice@{DOMAIN}")
        with smtplib.SMTP("127.0.0.1", srv.port) as client:
            client.sendmail(
                "carol@remote.example", [f"alice@{DOMAIN}"], message, mail_options=["BODY=8BITMIME"]
            )
        wait_until(lambda: len(mailbox(srv.data_dir, f"alice@{DOMAIN}")) == 1)
        [stored] = mailbox(srv.data_dir, f"alice@{DOMAIN}")
        prefix = f"Return-Path: <carol@remote.example>\r\nDelivered-To: alice@{DOMAIN}\r\n"
        assert stored.startswith(prefix.encode()), stored[:200]
        assert stored.endswith(message), "the message's own bytes are stored unchanged"
        # Between the delivery headers and the message: only our Received trace field.
        between = stored[len(prefix) : len(stored) - len(message)]
        assert between.startswith(b"Received: ") and between.count(b"\r\n") >= 1
        wait_until(lambda: srv.queue_count() == 0)
        wait_until(lambda: delivery_log(srv))
        [entry] = delivery_log(srv)
        assert entry["next_hop"] == "local" and entry["result"] == "delivered"
        assert entry["code"] == 250 and entry["reply"] == "250 2.0.0 delivered to mailbox"

        def counted() -> bool:
            return (
                metric(metrics_port, "tachymail_local_deliveries_total", result="delivered") == 1
                and metric(metrics_port, "tachymail_mailbox_messages") == 1
            )

        wait_until(counted, timeout=15)
        assert metric(metrics_port, "tachymail_local_delivery_seconds_count") == 1
        assert metric(metrics_port, "tachymail_local_deliveries_total", result="bounced") == 0
        assert metric(metrics_port, "tachymail_mailbox_bytes") == len(stored)


def test_aliases_and_sub_addresses_reach_the_right_mailbox(tmp_path: Path) -> None:
    alice, bob = f"alice@{DOMAIN}", f"bob@{DOMAIN}"
    with running_server(tmp_path, local_config(), roles=("mx",), hold=False) as srv:
        add_user(srv.data_dir, alice)
        add_user(srv.data_dir, bob)
        run_cli("alias", "add", f"postmaster@{DOMAIN}", alice, data_dir=srv.data_dir)
        run_cli("alias", "add", f"team@{DOMAIN}", alice, bob, data_dir=srv.data_dir)
        sends = {
            f"postmaster@{DOMAIN}": "alias",
            f"alice+news@{DOMAIN}": "tag",
            f"team@{DOMAIN}": "team",
        }
        with smtplib.SMTP("127.0.0.1", srv.port) as client:
            for rcpt, subject in sends.items():
                client.sendmail(
                    "carol@remote.example",
                    [rcpt],
                    f"Subject: {subject}\r\nMessage-ID: <{subject}@test>\r\n\r\nbody\r\n".encode(),
                )
        wait_until(lambda: len(mailbox(srv.data_dir, alice)) == 3)
        wait_until(lambda: len(mailbox(srv.data_dir, bob)) == 1)
        wait_until(lambda: srv.queue_count() == 0)
        by_subject = {
            email.message_from_bytes(c, policy=policy.default)["Subject"]: c
            for c in mailbox(srv.data_dir, alice)
        }
        assert set(by_subject) == {"alias", "tag", "team"}
        # Aliases are expanded at intake: the final recipient is alice herself.
        assert f"Delivered-To: {alice}\r\n".encode() in header_block(by_subject["alias"])
        # A sub-address is delivered to alice's mailbox as written.
        assert f"Delivered-To: alice+news@{DOMAIN}\r\n".encode() in header_block(by_subject["tag"])
        [team] = mailbox(srv.data_dir, bob)
        assert f"Delivered-To: {bob}\r\n".encode() in header_block(team)
        assert b"Subject: team\r\n" in team
        assert mailbox(srv.data_dir, f"postmaster@{DOMAIN}") == []


def test_notify_success_gives_a_delivered_dsn(tmp_path: Path) -> None:
    alice, bob = f"alice@{DOMAIN}", f"bob@{DOMAIN}"
    with running_server(tmp_path, local_config(), roles=("mx",), hold=False) as srv:
        add_user(srv.data_dir, alice)
        add_user(srv.data_dir, bob)
        with smtplib.SMTP("127.0.0.1", srv.port) as client:
            client.sendmail(
                alice,
                [bob],
                b"Subject: please confirm\r\nMessage-ID: <confirm@test>\r\n\r\nHi.\r\n",
                mail_options=["ENVID=confirm-1"],
                rcpt_options=["NOTIFY=SUCCESS", f"ORCPT=rfc822;{bob}"],
            )
        wait_until(lambda: len(mailbox(srv.data_dir, bob)) == 1)
        wait_until(lambda: len(mailbox(srv.data_dir, alice)) == 1)
        [report] = mailbox(srv.data_dir, alice)
        assert report.startswith(b"Return-Path: <>\r\n"), "a DSN has the null sender"
        status = dsn_status(report)
        assert "Action: delivered" in status and "Status: 2.0.0" in status
        assert f"Final-Recipient: rfc822; {bob}" in status
        assert "Original-Envelope-Id: confirm-1" in status
        wait_until(lambda: srv.queue_count() == 0)


# --- loops and quota ----------------------------------------------------------------------


def queue_directly(data_dir: Path, sender: str, rcpt: str, content: bytes) -> str:
    """Put a message in the queue the way intake would, before the server starts (so no
    check at intake can stop it: this is the delivery side's test)."""
    store = QueueStore(data_dir / "queue")
    try:
        envelope = Envelope(
            id=new_queue_id(),
            sender=sender,
            recipients=[Recipient(rcpt)],
            arrival=time.time(),
            size=len(content),
        )
        store.apply([put_message(envelope, content)])
    finally:
        store.close()
    return envelope.id


def test_a_message_whose_delivered_to_holds_the_recipient_bounces(tmp_path: Path) -> None:
    alice, bob = f"alice@{DOMAIN}", f"bob@{DOMAIN}"
    data_dir = tmp_path / "data"
    content = (
        f"Delivered-To: {bob.upper()}\r\nReceived: from somewhere\r\n"
        f"Subject: round and round\r\nMessage-ID: <loop@test>\r\n\r\nagain\r\n"
    ).encode()
    queue_id = queue_directly(data_dir, alice, bob, content)
    for user in (alice, bob):
        add_user(data_dir, user)
    with running_server(tmp_path, local_config(), roles=("mx",), hold=False) as srv:
        wait_until(lambda: len(mailbox(srv.data_dir, alice)) == 1)
        wait_until(lambda: srv.queue_count() == 0)
        assert mailbox(srv.data_dir, bob) == [], "a looping message is not delivered"
        [bounce] = mailbox(srv.data_dir, alice)
        status = dsn_status(bounce)
        assert "Action: failed" in status and "Status: 5.4.6" in status
        assert f"mail loop: Delivered-To already holds <{bob}>" in status
        [entry] = [e for e in delivery_log(srv) if e["queue_id"] == queue_id]
        assert entry["result"] == "bounced" and entry["code"] == 554


def test_a_message_over_quota_is_deferred_then_delivered_when_the_quota_grows(
    tmp_path: Path,
) -> None:
    alice, bob = f"alice@{DOMAIN}", f"bob@{DOMAIN}"
    with running_server(tmp_path, local_config(retry="[3600]"), roles=("mx",), hold=False) as srv:
        add_user(srv.data_dir, alice)
        add_user(srv.data_dir, bob, "--quota", "2K")
        # About 3 KiB: over bob's 2 KiB quota, well under 1 MiB.
        big = b"Subject: too big\r\nMessage-ID: <big@test>\r\n\r\n" + (b"y" * 70 + b"\r\n") * 40
        with smtplib.SMTP("127.0.0.1", srv.port) as client:
            client.sendmail(alice, [bob], big)

        def deferred() -> dict[str, object] | None:
            for entry in queue_listing(srv):
                for rcpt in entry["recipients"]:  # type: ignore[attr-defined]
                    if rcpt["attempts"] >= 1:
                        return rcpt  # type: ignore[no-any-return]
            return None

        wait_until(deferred)
        rcpt = deferred()
        assert rcpt is not None
        assert rcpt["status"] == "4.2.2" and rcpt["last_reply"] == "452 4.2.2 mailbox full"
        assert rcpt["state"] == "queued", "deferred, not bounced"
        assert mailbox(srv.data_dir, bob) == []
        assert mailbox(srv.data_dir, alice) == [], "no bounce and no delay DSN yet"
        assert srv.queue_count() == 1
        run_cli("user", "quota", bob, "1M", data_dir=srv.data_dir)
        run_cli("queue", "flush", data_dir=srv.data_dir)
        wait_until(lambda: len(mailbox(srv.data_dir, bob)) == 1)
        wait_until(lambda: srv.queue_count() == 0)
        [stored] = mailbox(srv.data_dir, bob)
        assert stored.endswith(big)
        results = [e["result"] for e in delivery_log(srv)]
        assert results == ["deferred", "delivered"]


def test_a_delivery_already_in_the_mailbox_is_not_stored_again(tmp_path: Path) -> None:
    """The state a kill -9 leaves between the mailbox commit and the queue update: the
    message is in the mailbox under its key, and still queued. The next attempt reports
    it delivered (and counts a duplicate) without a second copy."""
    metrics_port = free_port()
    extra = f'[metrics]\naddress = "127.0.0.1:{metrics_port}"\n'
    alice = f"alice@{DOMAIN}"
    data_dir = tmp_path / "data"
    content = b"Subject: once\r\nMessage-ID: <once@test>\r\n\r\nonly once\r\n"
    queue_id = queue_directly(data_dir, "carol@remote.example", alice, content)
    add_user(data_dir, alice)
    store = MailboxStore(data_dir / "mailbox")
    try:
        first = delivery_headers("carol@remote.example", alice) + content
        key = f"{queue_id}\0{alice}".encode()
        [outcome] = store.apply([deliver(prepare_delivery(alice, first, key=key))])
        assert isinstance(outcome, Delivered) and not outcome.duplicate
    finally:
        store.close()
    with running_server(
        tmp_path, local_config(extra=extra), roles=("mx",), data_dir=data_dir, hold=False
    ) as srv:
        wait_until(lambda: srv.queue_count() == 0)
        wait_until(
            lambda: (
                metric(metrics_port, "tachymail_local_deliveries_total", result="duplicate") == 1
            )
        )
        assert metric(metrics_port, "tachymail_local_deliveries_total", result="delivered") == 0
        assert mailbox(data_dir, alice) == [first]
        [entry] = delivery_log(srv)
        assert entry["result"] == "delivered" and entry["reply"] == "250 2.0.0 delivered to mailbox"
        assert f"{queue_id} to <{alice}>: already in the mailbox" in srv.log()


def test_mail_queued_before_its_domain_became_local_is_delivered(tmp_path: Path) -> None:
    """Held in the queue while example.test was a relay destination, then the domain
    becomes local: a user's mail is delivered, a non-user's bounces (5.1.1)."""
    data_dir = tmp_path / "data"
    alice = f"alice@{DOMAIN}"
    first = tmp_path / "first"
    first.mkdir()
    with running_server(first, roles=("mx",), data_dir=data_dir) as srv:
        with smtplib.SMTP("127.0.0.1", srv.port) as client:
            client.sendmail(alice, [alice], b"Subject: early\r\n\r\nqueued before\r\n")
            client.sendmail(alice, [f"gone@{DOMAIN}"], b"Subject: nobody\r\n\r\nno user\r\n")
        assert srv.queue_count() == 2
    add_user(data_dir, alice)
    second = tmp_path / "second"
    second.mkdir()
    with running_server(
        second, local_config(), roles=("mx",), data_dir=data_dir, hold=False
    ) as srv:
        wait_until(lambda: len(mailbox(data_dir, alice)) == 2)
        wait_until(lambda: srv.queue_count() == 0)
        subjects = sorted(
            str(email.message_from_bytes(c, policy=policy.default)["Subject"])
            for c in mailbox(data_dir, alice)
        )
        assert subjects[0] == "Undelivered Mail Returned to Sender", subjects
        assert subjects[1] == "early"
        bounce = next(c for c in mailbox(data_dir, alice) if b"Subject: early" not in c)
        status = dsn_status(bounce)
        assert "Status: 5.1.1" in status and f"<gone@{DOMAIN}>: no such user" in status


# --- kill -9 under load -------------------------------------------------------------------


def delivery_worker_pids(log: Path) -> list[int]:
    marker = "delivery worker 0/1 (pid "
    text = log.read_text(errors="replace") if log.exists() else ""
    return [
        int(line.split(marker)[1].split(")")[0]) for line in text.splitlines() if marker in line
    ]


def delivered_count(data_dir: Path) -> int:
    path = data_dir / "delivery.log"
    if not path.exists():
        return 0
    return path.read_bytes().count(b'"result":"delivered"')


def run_kills(tmp_path: Path, count: int, kills: int, commit: str = "thread") -> None:
    """Queue *count* messages to local users (held), then deliver them while the delivery
    worker is killed with SIGKILL *kills* times; every message must end up in exactly one
    mailbox exactly once, and the queue empty. *commit*: ``[mailbox] commit``."""
    users = [f"u{n}@{DOMAIN}" for n in range(4)]
    data_dir = tmp_path / "data"
    for user in users:
        add_user(data_dir, user)
    ids = [f"crash-{n}@test" for n in range(count)]
    config = local_config(extra=f'[mailbox]\ncommit = "{commit}"\n')
    with running_server(tmp_path, config, roles=("mx",), data_dir=data_dir) as srv:
        with smtplib.SMTP("127.0.0.1", srv.port) as client:
            for n, message_id in enumerate(ids):
                client.sendmail(
                    "carol@remote.example",
                    [users[n % len(users)]],
                    f"Subject: {n}\r\nMessage-ID: <{message_id}>\r\n\r\nbody {n}\r\n".encode(),
                )
        assert srv.queue_count() == count
    config = srv.config_path.read_text().replace("hold = true", "hold = false")
    srv.config_path.write_text(config)
    log_path = tmp_path / "deliver.log"
    srv = start(srv.config_path, data_dir, srv.ports, 1, log_path)
    try:
        rng = random.Random(count)
        thresholds = sorted(rng.sample(range(1, count * 3 // 4), kills))
        killed: list[int] = []
        progress: list[int] = []
        for threshold in thresholds:
            wait_until(lambda: len(delivery_worker_pids(log_path)) == len(killed) + 1, timeout=60)
            victim = delivery_worker_pids(log_path)[-1]
            # Wait for progress past the threshold, then kill at once, mid-batch.
            deadline = time.monotonic() + 60
            while delivered_count(data_dir) < threshold and time.monotonic() < deadline:
                time.sleep(0.002)
            os.kill(victim, signal.SIGKILL)
            killed.append(victim)
            progress.append(delivered_count(data_dir))
        wait_until(lambda: srv.queue_count() == 0, timeout=120)
        assert srv.proc.poll() is None, "the supervisor lives on"
    finally:
        srv.stop()
    assert progress[0] < count, "the first kill came after the last delivery: nothing tested"
    assert log_path.read_text().count("died (signal SIGKILL)") == kills
    seen: Counter[str] = Counter()
    for user in users:
        for content in mailbox(data_dir, user):
            parsed = email.message_from_bytes(content, policy=policy.default)
            seen[str(parsed["Message-ID"]).strip("<>")] += 1
            assert f"Delivered-To: {user}\r\n".encode() in header_block(content)
    assert set(seen) == set(ids), f"lost: {sorted(set(ids) - set(seen))[:5]}"
    twice = [message_id for message_id, n in seen.items() if n > 1]
    assert not twice, f"delivered more than once: {twice[:5]}"
    assert sum(seen.values()) == count


@pytest.mark.parametrize("commit", ["thread", "inline"])
def test_killing_the_delivery_worker_loses_and_duplicates_nothing(
    tmp_path: Path, commit: str
) -> None:
    run_kills(tmp_path, count=500, kills=2, commit=commit)


@pytest.mark.slow
def test_killing_the_delivery_worker_often_under_load(tmp_path: Path) -> None:
    run_kills(tmp_path, count=3000, kills=8)
