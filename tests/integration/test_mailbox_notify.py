"""Mailbox change notification across real processes: a commit in one process wakes the
subscribers of another (latency printed), a killed process's socket is cleaned up, a full
receiver is owed an "anything changed", and a real `tachymail serve` wakes a subscriber in
this test process when smtplib delivers mail to a local user."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import smtplib
import socket
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from server import run_cli, running_server, wait_until
from tachymail.mailbox import ChangeNotifier, MailboxStore, deliver, prepare_delivery
from tachymail.mailbox.notify import ANYTHING, DIRECTORY
from tachymail.mailbox.store import MiB

ALICE = "alice@example.test"
BOB = "bob@example.test"
#: seconds that only catch a hang: nothing here is timed
HANG = 20.0

#: another process with its own store and notifier on the same data directory: prints
#: "ready <socket>", then "woken <monotonic> <messages>" each time its subscriber for argv[2]
#: runs; "deliver USER" on stdin commits a message and prints "delivered <monotonic>"
PEER = r"""
import asyncio, sys, time
from pathlib import Path
from tachymail.mailbox import ChangeNotifier, MailboxStore, deliver, prepare_delivery

async def main() -> None:
    data, user = Path(sys.argv[1]), sys.argv[2]
    loop = asyncio.get_running_loop()
    store = MailboxStore(data / "mailbox", map_size=1 << 22)
    notifier = ChangeNotifier(data / "mailbox-notify")
    notifier.start(loop)
    store.on_commit = notifier.publish

    def woken() -> None:
        print("woken", time.monotonic(), len(store.messages(user)), flush=True)

    notifier.subscribe(user, woken)
    print("ready", notifier.name, flush=True)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        words = line.decode().split()
        if words and words[0] == "deliver":
            content = b"Subject: from the peer\r\n\r\nhello\r\n"
            store.apply([deliver(prepare_delivery(words[1], content))])
            print("delivered", time.monotonic(), flush=True)
    notifier.close()
    store.close()

asyncio.run(main())
"""


class Peer:
    """The PEER script as a child process, stopped by PID."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.socket = ""

    @classmethod
    async def start(cls, data: Path, user: str) -> Peer:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            PEER,
            str(data),
            user,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        peer = cls(proc)
        words = await peer.line()
        assert words[0] == "ready", words
        peer.socket = words[1]
        return peer

    async def line(self) -> list[str]:
        assert self.proc.stdout is not None
        raw = await asyncio.wait_for(self.proc.stdout.readline(), HANG)
        assert raw, "the peer process ended"
        return raw.decode().split()

    async def send(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode() + b"\n")
        await self.proc.stdin.drain()

    async def stop(self) -> None:
        if self.proc.returncode is None:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                self.proc.kill()  # by PID: our own child
                await self.proc.wait()


def open_store(data: Path) -> MailboxStore:
    return MailboxStore(data / "mailbox", map_size=4 * MiB)


def message(subject: str) -> bytes:
    return f"From: carol@remote.example\r\nSubject: {subject}\r\n\r\nbody\r\n".encode()


def report(text: str, capsys: pytest.CaptureFixture[str]) -> None:
    with capsys.disabled():
        print(f"\n    {text}")


def test_a_commit_in_one_process_wakes_the_other_process_both_ways(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rounds = 20

    async def scenario() -> tuple[list[float], list[float]]:
        loop = asyncio.get_running_loop()
        store = open_store(tmp_path)
        notifier = ChangeNotifier(tmp_path / DIRECTORY)
        notifier.start(loop)
        store.on_commit = notifier.publish
        woken = asyncio.Event()
        wake_times: list[float] = []

        def on_alice() -> None:
            wake_times.append(time.monotonic())
            woken.set()

        notifier.subscribe(ALICE, on_alice)
        peer = await Peer.start(tmp_path, ALICE)
        there: list[float] = []
        here: list[float] = []
        try:
            for n in range(1, rounds + 1):
                # this process commits: the peer's subscriber sees the new message
                woken.clear()
                store.apply([deliver(prepare_delivery(ALICE, message(f"here {n}")))])
                committed = time.monotonic()
                words = await peer.line()
                assert words[0] == "woken" and int(words[2]) == 2 * n - 1, words
                there.append(float(words[1]) - committed)
                await asyncio.wait_for(woken.wait(), HANG)  # and this process's own one
                # the peer commits: this process's subscriber is woken, the commit visible
                woken.clear()
                wake_times.clear()
                await peer.send(f"deliver {ALICE}")
                lines = {words[0]: words for words in [await peer.line(), await peer.line()]}
                # the peer's own subscriber runs too, right after its commit
                assert int(lines["woken"][2]) == 2 * n, lines
                await asyncio.wait_for(woken.wait(), HANG)
                here.append(wake_times[0] - float(lines["delivered"][1]))
                assert len(store.messages(ALICE)) == 2 * n
        finally:
            await peer.stop()
            notifier.close()
            store.close()
        return there, here

    there, here = asyncio.run(scenario())
    for name, values in (("to the other process", there), ("back to this one", here)):
        report(
            f"mailbox change notification {name}: median "
            f"{statistics.median(values) * 1000:.2f} ms, max {max(values) * 1000:.2f} ms "
            f"over {rounds} commits (from the synced commit to the subscriber running)",
            capsys,
        )
    assert not list((tmp_path / DIRECTORY).iterdir())  # both sockets unlinked at close


def test_the_socket_of_a_killed_process_is_removed_by_the_next_publisher(tmp_path: Path) -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        peer = await Peer.start(tmp_path, ALICE)
        stale = tmp_path / DIRECTORY / peer.socket
        assert stale.exists()
        notifier = ChangeNotifier(tmp_path / DIRECTORY)
        notifier.start(loop)
        store = open_store(tmp_path)
        store.on_commit = notifier.publish
        try:
            os.kill(peer.proc.pid, signal.SIGKILL)  # no close(): the file stays behind
            await asyncio.wait_for(peer.proc.wait(), HANG)
            assert stale.exists()
            store.apply([deliver(prepare_delivery(ALICE, message("after the kill")))])
            deadline = time.monotonic() + HANG
            while stale.exists() and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert not stale.exists()
            assert notifier.cleaned == 1 and notifier.peers == []
            # the next commit has nobody else to tell and does not try the dead socket
            sent = notifier.sent
            store.apply([deliver(prepare_delivery(ALICE, message("again")))])
            await asyncio.sleep(0.05)
            assert notifier.sent == sent and notifier.cleaned == 1
        finally:
            await peer.stop()
            notifier.close()
            store.close()

    asyncio.run(scenario())


def test_subscribers_are_per_user_and_anything_wakes_every_one(tmp_path: Path) -> None:
    """Two notifiers of one process behave as two processes (each its own socket); the
    directory's path is longer than a socket address may be."""
    directory = tmp_path / ("d" * 120) / DIRECTORY

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        sender, receiver = ChangeNotifier(directory), ChangeNotifier(directory)
        sender.start(loop)
        receiver.start(loop)
        calls: Counter[str] = Counter()
        arrived = asyncio.Event()

        def subscriber(name: str) -> None:
            calls[name] += 1
            arrived.set()

        stop_bob = receiver.subscribe(BOB, lambda: subscriber("bob"))
        receiver.subscribe(ALICE.upper(), lambda: subscriber("alice"))
        receiver.subscribe(ALICE, lambda: subscriber("alice again"))
        try:
            sender.publish([ALICE])
            await asyncio.wait_for(arrived.wait(), HANG)
            await asyncio.sleep(0.02)
            assert calls == {"alice": 1, "alice again": 1}
            # three publishes in one turn of the loop: one datagram, one call each
            calls.clear()
            arrived.clear()
            received = receiver.received
            for user in (BOB, BOB.upper(), "carol@example.test"):
                sender.publish([user])
            await asyncio.wait_for(arrived.wait(), HANG)
            await asyncio.sleep(0.02)
            assert calls == {"bob": 1} and receiver.received == received + 1
            # "maybe anything changed": every subscriber of the process runs
            calls.clear()
            arrived.clear()
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as raw:
                raw.sendto(ANYTHING, f"/proc/self/fd/{receiver._dirfd}/{receiver.name}")
            await asyncio.wait_for(arrived.wait(), HANG)
            await asyncio.sleep(0.02)
            assert calls == {"bob": 1, "alice": 1, "alice again": 1}
            # unsubscribed: no more calls; publishing from a thread works the same
            stop_bob()
            stop_bob()
            calls.clear()
            arrived.clear()
            await asyncio.to_thread(sender.publish, [BOB, ALICE])
            await asyncio.wait_for(arrived.wait(), HANG)
            await asyncio.sleep(0.02)
            assert calls == {"alice": 1, "alice again": 1}
        finally:
            sender.close()
            receiver.close()
        assert not list(directory.iterdir())

    asyncio.run(scenario())


def test_a_full_receiver_is_owed_anything_changed(tmp_path: Path) -> None:
    """A receiver that does not read (its queue holds net.unix.max_dgram_qlen datagrams) makes
    sends fail with EAGAIN; once it reads again it gets "*", so nothing is missed."""
    directory = tmp_path / DIRECTORY

    async def scenario() -> list[bytes]:
        loop = asyncio.get_running_loop()
        sender = ChangeNotifier(directory)
        sender.start(loop, listen=False)
        directory.mkdir(parents=True, exist_ok=True)
        stuck = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        stuck.bind(str(directory / "stuck.sock"))
        stuck.setblocking(False)
        got: list[bytes] = []
        try:
            for n in range(40):
                sender.publish([f"user{n}@example.test"])
                await asyncio.sleep(0)  # one datagram per turn of the loop
                await asyncio.sleep(0)
            assert sender.full >= 1  # the queue filled up
            while True:  # drain what was queued
                try:
                    got.append(stuck.recv(65536))
                except BlockingIOError:
                    break
            deadline = time.monotonic() + HANG
            while ANYTHING not in got and time.monotonic() < deadline:
                await asyncio.sleep(0.005)  # the sender retries every few ms
                with contextlib.suppress(BlockingIOError):
                    got.append(stuck.recv(65536))
        finally:
            stuck.close()
            sender.close()
        return got

    got = asyncio.run(scenario())
    assert got[0] == b"user0@example.test"
    assert 0 < len(got) < 40 and got[-1] == ANYTHING


def test_a_publisher_without_a_loop_reaches_the_listeners(tmp_path: Path) -> None:
    """The CLI's case: publish sends at once from the calling thread."""
    directory = tmp_path / DIRECTORY

    async def scenario() -> None:
        receiver = ChangeNotifier(directory)
        receiver.start(asyncio.get_running_loop())
        arrived = asyncio.Event()
        receiver.subscribe(ALICE, arrived.set)
        cli = ChangeNotifier(directory)
        try:
            cli.publish([ALICE])
            assert cli.sent == 1
            await asyncio.wait_for(arrived.wait(), HANG)
        finally:
            cli.close()
            receiver.close()
        cli.publish([ALICE])  # after close: nothing, no error
        assert cli.sent == 1

    asyncio.run(scenario())


def test_smtp_delivery_by_a_running_server_wakes_a_subscriber_here(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    extra = (
        '[policy]\nlocal_domains = ["example.test"]\n'
        '[delivery]\nresolver = "127.0.0.1:9"\nretry_schedule = [1, 2]\n'
    )
    with running_server(tmp_path, extra, roles=("mx", "lmtp"), hold=False) as srv:
        run_cli("user", "add", ALICE, "--password-stdin", data_dir=srv.data_dir, stdin="pw\n")
        directory = srv.data_dir / DIRECTORY
        # the SMTP worker listens from its start (the supervisor bound the ports before)
        wait_until(lambda: directory.exists() and any(directory.glob("*.sock")), HANG)

        async def scenario() -> list[tuple[str, float, int]]:
            loop = asyncio.get_running_loop()
            notifier = ChangeNotifier(directory)
            notifier.start(loop)
            woken: asyncio.Queue[float] = asyncio.Queue()
            notifier.subscribe(ALICE, lambda: woken.put_nowait(time.monotonic()))
            results: list[tuple[str, float, int]] = []
            try:
                for via, port in (("smtp", srv.ports["mx"]), ("lmtp", srv.ports["lmtp"])):
                    sent = await asyncio.to_thread(send, via, port)
                    when = await asyncio.wait_for(woken.get(), HANG)
                    store = MailboxStore(srv.data_dir / "mailbox", readonly=True)
                    try:
                        count = len(store.messages(ALICE))
                    finally:
                        store.close()
                    results.append((via, when - sent, count))
                    while not woken.empty():  # a later commit of the same delivery
                        woken.get_nowait()
            finally:
                notifier.close()
            return results

        results = asyncio.run(scenario())
        assert "Traceback" not in srv.log()
    # woken with the message visible: by the delivery worker after SMTP (through the queue),
    # by the SMTP worker's own commit for LMTP
    assert [(via, count) for via, _, count in results] == [("smtp", 1), ("lmtp", 2)]
    for via, latency, _ in results:
        report(
            f"delivery over {via}: a subscriber in another process woken {latency * 1000:+.1f} "
            "ms from the client's final reply (negative: before the client had read it)",
            capsys,
        )
    leftover = [p.name for p in directory.iterdir()]
    assert leftover == []  # every worker unlinked its socket at stop


def send(via: str, port: int) -> float:
    """Send one message to alice over SMTP or LMTP; the monotonic time of the final reply."""
    content = f"From: carol@remote.example\r\nTo: {ALICE}\r\nSubject: via {via}\r\n\r\nhi\r\n"
    if via == "smtp":
        with smtplib.SMTP("127.0.0.1", port, timeout=HANG) as client:
            client.sendmail("carol@remote.example", [ALICE], content)
    else:
        with smtplib.LMTP("127.0.0.1", port, timeout=HANG) as client:
            client.sendmail("carol@remote.example", [ALICE], content)
    return time.monotonic()
