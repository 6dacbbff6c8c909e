"""The journal commit mode ([queue] commit = "journal") against a real server.

- kill -9 of the whole server, or of one SMTP worker, under load at random moments: after
  the restart every acknowledged message is queued (test_intake's kill round);
- messages already in LMDB and then removed (as delivery removes them) are not brought
  back by the replay of a journal a crash left behind: nothing is queued twice;
- a journal cut in the middle of its last record: the server starts and queues the rest;
- the sync order (test_durability_order's LD_PRELOAD shim): no 250 leaves a worker before
  an fdatasync of its journal that began after the message's final dot has returned, and
  the check fails against a copy of the package whose journal is not synced (or synced
  in a thread nobody waits for);
- a full disk (a real tmpfs): 452 4.3.1, nothing acknowledged lost across a kill -9;
- delivery of journaled messages, each once.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import smtplib
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_disk_full import send, tmpfs  # noqa: F401 - tmpfs: a fixture used here
from test_durability_order import (
    CLIENTS,
    DELAY_MS,
    FLUSHES,
    MESSAGES_PER_CLIENT,
    Ack,
    Event,
    Sender,
    build_shim,
    mutated_package,
    read_events,
)
from test_intake import AckingClient, run_kill_round

from server import free_port, run_cli, running_server, start, wait_until, write_config

JOURNAL = '[queue]\ncommit = "journal"\n'


def queued_ids(data_dir: Path) -> list[str]:
    listing = run_cli("queue", "list", "--json", data_dir=data_dir)
    return [json.loads(line)["id"] for line in listing.splitlines()]


def test_kill_9_of_the_server_at_random_moments_loses_nothing(tmp_path: Path) -> None:
    acked: dict[str, str] = {}
    for seed in (11, 12):
        run_kill_round(tmp_path, seed, acked, commit="journal")


def test_kill_9_of_one_worker_loses_nothing(tmp_path: Path) -> None:
    """The supervisor restarts the worker, which applies its dead predecessor's journal."""
    data_dir = tmp_path / "data"
    config = tmp_path / "tachymail.toml"
    port = free_port()
    write_config(config, data_dir, {"mx": port}, JOURNAL)
    srv = start(config, data_dir, {"mx": port}, 1, tmp_path / "server.log")
    try:
        acked: dict[str, str] = {}
        stop = threading.Event()
        clients = [AckingClient(port, f"w{i}", acked, stop) for i in range(8)]
        for client in clients:
            client.start()
        wait_until(lambda: len(acked) > 0, 60)
        time.sleep(random.Random(3).uniform(0.2, 1.5))
        # the SMTP worker is the child that owns a journal (a delivery worker has none)
        owners = {int(f.name.split("-")[0]) for f in (data_dir / "journal").glob("*.jnl")}
        [worker] = [pid for pid in srv.worker_pids() if pid in owners]
        os.kill(worker, signal.SIGKILL)
        stop.set()
        for client in clients:
            client.join(15)
        assert acked, f"nothing was acknowledged before the kill:\n{srv.log()}"
        # the dead worker's journal is applied by its successor, then deleted
        wait_until(lambda: not list((data_dir / "journal").glob(f"{worker}-*.jnl")), 30)
        queued = set(queued_ids(data_dir))
        missing = [q for q in acked.values() if q not in queued]
        assert not missing, f"{len(missing)} acknowledged messages lost"
    finally:
        srv.stop()


def test_replay_does_not_bring_back_removed_messages(tmp_path: Path) -> None:
    """Messages in LMDB, then removed, then a crash with their journal still there: the
    restart must not queue them again (at most once per acknowledgement)."""
    data_dir = tmp_path / "data"
    config = tmp_path / "tachymail.toml"
    port = free_port()
    write_config(config, data_dir, {"mx": port}, JOURNAL)
    srv = start(config, data_dir, {"mx": port}, 1, tmp_path / "server.log")
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            for n in range(20):
                client.sendmail("a@example.com", ["b@example.net"], f"Subject: {n}\r\n\r\nx\r\n")
        wait_until(lambda: len(queued_ids(data_dir)) == 20)
        srv.kill()  # the journal stays behind, its records already in LMDB
        assert list((data_dir / "journal").glob("*.jnl"))
        ids = queued_ids(data_dir)
        removed = ids[::2]
        for queue_id in removed:
            run_cli("queue", "delete", queue_id, data_dir=data_dir)
        srv = start(config, data_dir, {"mx": port}, 1, tmp_path / "server.log")
        assert sorted(queued_ids(data_dir)) == sorted(set(ids) - set(removed))
    finally:
        srv.stop()


def test_a_torn_journal_is_replayed_up_to_the_tear(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    config = tmp_path / "tachymail.toml"
    port = free_port()
    write_config(config, data_dir, {"mx": port}, JOURNAL)
    srv = start(config, data_dir, {"mx": port}, 1, tmp_path / "server.log")
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            for n in range(10):
                client.sendmail("a@example.com", ["b@example.net"], f"Subject: {n}\r\n\r\nx\r\n")
        srv.kill()
        [journal] = (data_dir / "journal").glob("*.jnl")
        data = journal.read_bytes()
        journal.write_bytes(data[:-5] + b"\x00\x00")  # a torn, damaged last record
        srv = start(config, data_dir, {"mx": port}, 1, tmp_path / "server.log")
        assert len(queued_ids(data_dir)) >= 9, srv.log()
        assert not journal.exists()
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            client.sendmail("a@example.com", ["b@example.net"], "Subject: after\r\n\r\nx\r\n")
    finally:
        srv.stop()


# --- the sync order ----------------------------------------------------------------------


def journal_violations(events: list[Event], acks: list[Ack], journal_dir: Path) -> list[str]:
    """Every ack whose 250 was not preceded, in the process that wrote it, by a flush of
    one of its journal files that began after the dot was sent and returned before."""
    written: dict[str, Event] = {}
    for event in events:
        if event.kind == "reply":
            for queue_id in event.detail.split(","):
                written.setdefault(queue_id, event)
    prefix = str(journal_dir.resolve()) + "/"
    problems = []
    for ack in acks:
        reply = written.get(ack.queue_id)
        if reply is None:
            problems.append(f"{ack.queue_id}: the shim saw no write of its 250")
            continue
        deadline = min(reply.start, ack.reply_received)
        if not any(
            e.kind in FLUSHES
            and e.pid == reply.pid
            and e.detail.startswith(prefix)
            and ack.dot_sent < e.start
            and e.end < deadline
            for e in events
        ):
            problems.append(f"{ack.queue_id}: no journal sync between its dot and its 250")
    return problems


def trace_journal(tmp_path: Path, pythonpath: Path | None = None) -> tuple[list[str], list[Ack]]:
    shim = build_shim(tmp_path)
    log = tmp_path / "sync.log"
    env = {"LD_PRELOAD": str(shim), "SYNCSHIM_LOG": str(log), "SYNCSHIM_DELAY_MS": str(DELAY_MS)}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    with running_server(tmp_path, extra=JOURNAL, roles=("mx",), env=env) as srv:
        senders = [Sender(srv.port, f"c{i}", MESSAGES_PER_CLIENT) for i in range(CLIENTS)]
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join(300)  # only catches a hang
            assert not sender.is_alive(), "a client hung"
            assert sender.error is None, f"{sender.error!r}\n{srv.log()}"
        journal_dir = srv.data_dir / "journal"
    acks = [ack for sender in senders for ack in sender.acks]
    assert len(acks) == CLIENTS * MESSAGES_PER_CLIENT
    return journal_violations(read_events(log), acks, journal_dir), acks


def test_no_250_before_its_journal_batch_is_synced(tmp_path: Path) -> None:
    violations, acks = trace_journal(tmp_path)
    assert not violations, "\n".join(violations)
    slow = [a for a in acks if a.reply_received - a.dot_sent < DELAY_MS / 1000]
    assert not slow, f"250s that did not wait for the slow disk: {slow}"


def test_journal_order_check_catches_a_removed_sync(tmp_path: Path) -> None:
    root = mutated_package(
        tmp_path, "queue/journal.py", "os.fdatasync(file.fd)", "pass  # mutation"
    )
    violations, _ = trace_journal(tmp_path, pythonpath=root)
    reported = {v.split(":")[0] for v in violations}
    assert len(reported) == CLIENTS * MESSAGES_PER_CLIENT, "\n".join(violations)


def test_journal_order_check_catches_an_early_ack(tmp_path: Path) -> None:
    """The sync still runs, but in a thread of its own that nobody waits for."""
    root = mutated_package(
        tmp_path,
        "queue/journal.py",
        "os.fdatasync(file.fd)",
        "threading.Thread(target=os.fdatasync, args=(file.fd,)).start()  # mutation",
    )
    violations, _ = trace_journal(tmp_path, pythonpath=root)
    assert violations, "the order check missed 250s sent before their journal was synced"


# --- a full disk -------------------------------------------------------------------------


def test_full_disk_in_journal_mode(tmp_path: Path, tmpfs: Path) -> None:  # noqa: F811
    """On a full disk (a real tmpfs) refusals are 452 4.3.1, nothing acknowledged is lost
    (after a kill -9 too: what LMDB had no room for is applied from the journal once a
    deletion made room), and the next message is accepted."""
    where = tmpfs
    data = where / "data"
    with running_server(tmp_path, extra=JOURNAL, roles=("mx",), data_dir=data) as srv:
        acked: list[str] = []
        with smtplib.SMTP("127.0.0.1", srv.port, timeout=30) as client:
            client.ehlo()
            refused = []
            for _ in range(600):
                client.mail("a@sender.example")
                client.rcpt("b@dest.example")
                code, text = client.data(b"Subject: fill\r\n\r\n" + b"y" * 100_000)
                if code == 250:
                    acked.append(re.search(rb"queued as (\w+)", text).group(1).decode())  # type: ignore[union-attr]
                else:
                    refused.append((code, text))
                    client.rset()
                    if len(refused) >= 15:
                        break
        assert refused, "the disk never filled"
        wrong = [(c, t) for c, t in refused if c != 452 or b"4.3.1" not in t]
        assert not wrong, f"{len(wrong)} of {len(refused)} refusals were not 452 4.3.1"
        assert "Traceback" not in srv.log()
        srv.kill()
    with running_server(tmp_path, extra=JOURNAL, roles=("mx",), data_dir=data) as srv:
        # What the full disk kept out of LMDB waits in its journal, which is kept...
        queued = set(queued_ids(data))
        unapplied = [q for q in acked if q not in queued]
        if unapplied:
            assert list((data / "journal").glob("*.jnl")), "unapplied, yet no journal kept"
        # room for what the journal holds, and then some: how many acknowledged messages
        # were still only in the journal at the kill depends on timing (with a fixed five
        # deleted, the disk stayed too full for them in 2 of 14 runs)
        deleted = sorted(queued)[: len(unapplied) + 5]
        for queue_id in deleted:
            run_cli("queue", "delete", queue_id, data_dir=data)
        # the journal left behind is applied (and deleted) within seconds: room again
        wait_until(lambda: send(srv.port, 20_000)[0] == 250, 60)
        # ...and applied once a deletion made room: every acknowledged message is queued
        wanted = set(acked) - set(deleted)
        wait_until(lambda: wanted <= set(queued_ids(data)), 60)


# --- delivery ----------------------------------------------------------------------------


def test_journaled_messages_are_delivered_once(tmp_path: Path) -> None:
    """Delivery sees journaled messages (once they are in LMDB) and delivers each once; a
    clean stop leaves no journal behind."""
    from test_delivery import relay_config
    from test_delivery import send as relay_send

    from smtp_peer import SmtpPeer

    with SmtpPeer() as peer:
        with running_server(
            tmp_path, relay_config(peer.port) + JOURNAL, hold=False, roles=("mx",)
        ) as srv:
            ids = [relay_send(srv.port, [f"j{i}@dest.example"]) for i in range(30)]
            got = peer.wait_for(30)
            wait_until(lambda: srv.queue_count() == 0)
        wanted = sorted(f"j{i}@dest.example" for i in range(30))
        assert sorted(m.recipients[0] for m in got) == wanted
        assert len(set(ids)) == 30
        time.sleep(0.5)  # a second copy of any message would arrive by now
        assert len(peer.messages) == 30, "a message was delivered twice"
        assert not list((srv.data_dir / "journal").glob("*.jnl"))
