"""Fault injection on the delivery side: every fault ends with nothing lost, and nothing
duplicated beyond at-least-once.

A real `tachymail serve` relays to the scripted peer (tests/smtp_peer.py) and resolves
through dnsmasq (tests/dnsserver.py) or a small UDP responder in this file that answers
garbage or nothing. Each test counts what the peer received per Message-ID and what is
left in the queue. Retry schedules are short so that every test takes seconds.
"""

from __future__ import annotations

import email
import json
import os
import random
import smtplib
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from email import policy
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dnsserver import DnsRecords, running_dnsmasq
from server import Server, run_cli, running_server, wait_until
from smtp_peer import Script, SmtpPeer

PEER_ROUTE = '[[route]]\ndomain = "{domain}"\nhost = "127.0.0.1:{port}"\ntls = "none"\n\n'


def relay_config(peer_port: int, schedule: str = "[1, 1, 2]", extra: str = "") -> str:
    """Recipient and sender domains routed to the peer; a short retry schedule."""
    routes = "".join(
        PEER_ROUTE.format(domain=d, port=peer_port) for d in ("dest.example", "sender.example")
    )
    return (
        f"{routes}[delivery]\nretry_schedule = {schedule}\ndelay_warning = 0\n"
        f'resolver = "127.0.0.1:9"\n{extra}'
    )


def send(port: int, rcpts: list[str], message_id: str, body: str = "Hello.\r\n") -> None:
    with smtplib.SMTP("127.0.0.1", port) as client:
        head = (
            f"From: alice@sender.example\r\nTo: {', '.join(rcpts)}\r\nSubject: fault\r\n"
            f"Message-ID: <{message_id}>\r\n"
        )
        client.sendmail("alice@sender.example", rcpts, f"{head}\r\n{body}".encode())


def copies(peer: SmtpPeer) -> Counter[str]:
    """How many copies of each Message-ID the peer accepted (per transaction)."""
    seen: Counter[str] = Counter()
    for received in list(peer.messages):
        message = email.message_from_bytes(received.content, policy=policy.default)
        seen[str(message["Message-ID"]).strip("<>")] += 1
    return seen


def queue_listing(srv: Server) -> list[dict[str, object]]:
    out = run_cli("queue", "list", "--json", data_dir=srv.data_dir)
    return [json.loads(line) for line in out.splitlines()]


def delivery_log(srv: Server) -> list[dict[str, object]]:
    path = srv.data_dir / "delivery.log"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# --- finding 10: the retry schedule applies to every failure ------------------------------


def test_an_unexpected_exception_is_retried_on_the_schedule(tmp_path: Path) -> None:
    """A bug in the delivery path (injected after the peer's 250) is a temporary failure:
    the next attempt waits for the retry schedule instead of coming about every second."""
    env = {"TACHYMAIL_TEST_DELIVERY_FAULT": "bug@dest.example"}
    with SmtpPeer() as peer:
        config = relay_config(peer.port, schedule="[4, 30]")
        with running_server(tmp_path, config, hold=False, roles=("mx",), env=env) as srv:
            send(srv.port, ["bug@dest.example"], "bug-1@test")
            send(srv.port, ["fine@dest.example"], "fine-1@test")
            wait_until(lambda: copies(peer)["bug-1@test"] >= 1)
            first = time.monotonic()
            time.sleep(2.5)
            assert copies(peer)["bug-1@test"] == 1, "re-sent before the retry interval"
            [entry] = queue_listing(srv)
            rcpt = entry["recipients"][0]  # type: ignore[index]
            assert rcpt["attempts"] == 1 and rcpt["status"] == "4.3.0"
            assert "internal error" in rcpt["last_reply"]
            delay = rcpt["next_attempt"] - rcpt["last_attempt"]
            assert 4 * 0.9 <= delay <= 4 * 1.1, f"next attempt after {delay:.2f}s, not ~4s"
            # The schedule goes on: the second attempt, then ~30 s to the third.
            wait_until(lambda: copies(peer)["bug-1@test"] >= 2, timeout=15)
            assert time.monotonic() - first >= 2.5
            wait_until(lambda: queue_listing(srv)[0]["recipients"][0]["attempts"] == 2)  # type: ignore[index]
            rcpt = queue_listing(srv)[0]["recipients"][0]  # type: ignore[index]
            delay = rcpt["next_attempt"] - rcpt["last_attempt"]
            assert 30 * 0.9 <= delay <= 30 * 1.1
            assert copies(peer)["fine-1@test"] == 1
            assert srv.log().count("RuntimeError: test fault injection") == 2, "one per failure"


# --- DNS that times out or answers garbage ---------------------------------------------------


class FaultyDns:
    """A UDP DNS responder on 127.0.0.1 that, by ``mode``, relays to a real server
    ("forward"), never answers ("silent"), or answers with the query's id followed by
    random bytes ("garbage": a malformed, truncated packet). Tests switch ``mode`` live."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream = ("127.0.0.1", upstream_port)
        self.mode = "forward"
        self.queries = 0
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.running = True
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        rng = random.Random(1234)
        while self.running:
            try:
                query, client = self.sock.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            self.queries += 1
            if self.mode == "silent":
                continue
            if self.mode == "garbage":
                # The right id and the response bit, then nonsense: dnspython must parse it.
                junk = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40)))
                self.sock.sendto(query[:2] + b"\x81\x80" + junk, client)
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as upstream:
                upstream.settimeout(2)
                upstream.sendto(query, self.upstream)
                try:
                    answer = upstream.recv(4096)
                except TimeoutError:
                    continue
            self.sock.sendto(answer, client)


@contextmanager
def faulty_dns(upstream_port: int) -> Iterator[FaultyDns]:
    server = FaultyDns(upstream_port)
    server.thread.start()
    try:
        yield server
    finally:
        server.running = False
        server.thread.join(5)
        server.sock.close()


def dns_records() -> DnsRecords:
    return (
        DnsRecords()
        .mx("dest.test", "mx1.dest.test", 10)
        .a("mx1.dest.test", "127.0.0.1")
        .mx("sender.test", "mx1.dest.test", 10)
    )


@pytest.mark.parametrize("lookup", ["mx", "host"])
@pytest.mark.parametrize("fault", ["silent", "garbage"])
def test_dns_trouble_defers_with_4_4_3_and_delivers_once_dns_is_back(
    tmp_path: Path, fault: str, lookup: str
) -> None:
    """The MX lookup (or, through a route naming a host, its address lookup) times out or
    gets garbage: the message is deferred with 4.4.3, never bounced, and goes once DNS
    answers again."""
    with (
        SmtpPeer() as peer,
        running_dnsmasq(tmp_path / "dns", dns_records()) as dnsmasq,
        faulty_dns(dnsmasq.port) as dns,
    ):
        route = (
            f'[[route]]\ndomain = "dest.test"\nhost = "mx1.dest.test:{peer.port}"\ntls = "none"\n\n'
            if lookup == "host"
            else ""
        )
        config = (
            f'{route}[delivery]\nresolver = "{dns.address}"\ndns_timeout = 1.0\n'
            f'port = {peer.port}\ntls = "none"\nretry_schedule = [1, 1, 2]\ndelay_warning = 0\n'
        )
        with running_server(tmp_path, config, hold=False, roles=("mx",)) as srv:
            dns.mode = fault
            with smtplib.SMTP("127.0.0.1", srv.port) as client:
                client.sendmail(
                    "alice@sender.test",
                    ["bob@dest.test"],
                    b"From: alice@sender.test\r\nMessage-ID: <dns-1@test>\r\n\r\nhi\r\n",
                )
            wait_until(lambda: sum(e["result"] == "deferred" for e in delivery_log(srv)) >= 2)
            deferred = [e for e in delivery_log(srv) if e["result"] == "deferred"]
            assert all("4.4.3" in str(e["reply"]) for e in deferred), deferred
            assert not any(e["result"] == "bounced" for e in delivery_log(srv))
            assert peer.messages == []
            [entry] = queue_listing(srv)  # the message, and no DSN
            assert entry["recipients"][0]["status"] == "4.4.3"  # type: ignore[index]
            assert dns.queries > 0
            dns.mode = "forward"
            peer.wait_for(1, timeout=30)
            wait_until(lambda: srv.queue_count() == 0)
            time.sleep(0.5)
            assert copies(peer) == Counter({"dns-1@test": 1})


# --- peers that cut the connection ----------------------------------------------------------


@pytest.mark.parametrize(
    ("cut_at", "peer_kept_it"),
    [
        ("CONTENT", False),  # after the 354, before the dot: the peer has nothing
        ("EOD", False),  # after the dot, no reply, the peer discarded it
        ("EOD_KEPT", True),  # after the dot, no reply, the peer queued it
        ("EOD_PARTIAL", True),  # "250 2.0.0 O" and close: the peer queued it
    ],
)
def test_a_peer_cutting_the_connection_loses_nothing(
    tmp_path: Path, cut_at: str, peer_kept_it: bool
) -> None:
    script = Script(cut_at=cut_at, cut_times=2)
    with (
        SmtpPeer(script) as peer,
        running_server(tmp_path, relay_config(peer.port), hold=False, roles=("mx",)) as srv,
    ):
        ids = [f"cut-{i}@test" for i in range(6)]
        for message_id in ids:
            send(srv.port, [f"{message_id.split('@')[0]}@dest.example"], message_id)
        wait_until(lambda: set(copies(peer)) == set(ids), timeout=30)
        wait_until(lambda: srv.queue_count() == 0, timeout=30)
        time.sleep(0.5)
        got = copies(peer)
        assert peer.cuts == 2
        assert set(got) == set(ids), "nothing lost"
        assert all(n <= 2 for n in got.values()), got
        extra = sum(got.values()) - len(ids)
        # A cut after the dot may leave the peer with a copy we must send again (at least
        # once); a cut before it may not cost a duplicate.
        assert extra <= (2 if peer_kept_it else 0), got
        deferred = [e for e in delivery_log(srv) if e["result"] == "deferred"]
        assert deferred and all(e["code"] == 451 for e in deferred)
        assert not any(e["result"] == "bounced" for e in delivery_log(srv))


# --- a delivery worker killed while it delivers and commits ---------------------------------


def delivery_worker_pids(srv: Server) -> list[int]:
    marker = "delivery worker 0/1 (pid "
    return [
        int(line.split(marker)[1].split(")")[0])
        for line in srv.log().splitlines()
        if marker in line
    ]


def test_a_killed_delivery_worker_is_restarted_and_nothing_is_lost(tmp_path: Path) -> None:
    script = Script(delay=0.002)  # a slow peer: many messages are in flight at the kill
    count = 200
    with SmtpPeer(script) as peer:
        with running_server(tmp_path, relay_config(peer.port), hold=True, roles=("mx",)) as srv:
            ids = [f"kill-{i}@test" for i in range(count)]
            for message_id in ids:
                send(srv.port, [f"{message_id.split('@')[0]}@dest.example"], message_id)
        config = srv.config_path.read_text().replace("hold = true", "hold = false")
        srv.config_path.write_text(config)
        from server import start

        srv = start(srv.config_path, srv.data_dir, srv.ports, 1, tmp_path / "again.log")
        try:
            wait_until(lambda: len(delivery_worker_pids(srv)) == 1)
            wait_until(lambda: len(peer.messages) > 30, timeout=30)
            [victim] = delivery_worker_pids(srv)
            os.kill(victim, 9)
            wait_until(lambda: len(delivery_worker_pids(srv)) == 2, timeout=30)
            assert delivery_worker_pids(srv)[1] != victim
            wait_until(lambda: srv.queue_count() == 0, timeout=60)
            time.sleep(0.5)
            assert srv.proc.poll() is None, "the supervisor lives on"
        finally:
            srv.stop()
        got = copies(peer)
        assert set(got) == set(ids), f"lost: {sorted(set(ids) - set(got))[:5]}"
        assert all(n <= 2 for n in got.values())
        assert "died" in (tmp_path / "again.log").read_text()


# --- a full disk under the queue while delivery results are committed -----------------------


@contextmanager
def small_tmpfs(path: Path, size_mb: int) -> Iterator[Path]:
    """A tmpfs of *size_mb* MiB mounted at *path* (needs root: it skips otherwise)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir(parents=True, exist_ok=True)
    import subprocess

    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(path)], check=True
    )
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(directory: Path) -> Path:
    """Fill the file system of *directory* to the last byte; returns the filler file."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for size in (1 << 20, 65536, 4096, 512, 1):  # down to the last partial block
            chunk = b"\0" * size
            try:
                while True:
                    os.write(fd, chunk)
            except OSError:
                continue
    finally:
        os.close(fd)
    return filler


def test_a_full_disk_during_delivery_commits_loses_and_repeats_nothing(tmp_path: Path) -> None:
    """Mail is queued, the disk fills up, then delivery starts: the peer takes a message
    for one recipient (250) and refuses the other (550), so the result's commit must store
    a bounce holding the whole message, on a full disk. The delivery worker survives, does
    not send the message again while the commit fails, and finishes (the bounce included)
    once there is space."""
    from server import start

    script = Script(rcpt={"gone@dest.example": "550 5.1.1 no such user"})
    body = ("x" * 76 + "\r\n") * 6000  # ~470 KB: its bounce needs new pages in the queue
    with small_tmpfs(tmp_path / "disk", 24) as disk, SmtpPeer(script) as peer:
        data_dir = disk / "data"
        config = relay_config(peer.port)
        with running_server(tmp_path, config, hold=True, roles=("mx",), data_dir=data_dir) as srv:
            send(srv.port, ["ok@dest.example", "gone@dest.example"], "big-1@test", body)
            for i in range(5):
                send(srv.port, [f"small{i}@dest.example"], f"small-{i}@test")
        filler = fill(disk)
        srv.config_path.write_text(
            srv.config_path.read_text().replace("hold = true", "hold = false")
        )
        srv = start(srv.config_path, srv.data_dir, srv.ports, 1, tmp_path / "full.log")
        try:
            wait_until(lambda: copies(peer)["big-1@test"] >= 1, timeout=30)
            [worker] = delivery_worker_pids(srv)
            time.sleep(3)  # several retry intervals: a storm would re-send meanwhile
            assert copies(peer)["big-1@test"] == 1, "re-sent while its result was unwritten"
            assert "recording the delivery result failed" in srv.log(), "the fault happened"
            assert delivery_worker_pids(srv) == [worker], "the delivery worker survived"
            assert srv.queue_count() >= 1, "the message is still queued"
            filler.unlink()  # space returns
            wait_until(lambda: srv.queue_count() == 0, timeout=30)
            assert delivery_worker_pids(srv) == [worker]
        finally:
            srv.stop()  # before the tmpfs goes
        got = copies(peer)
        originals = {k: v for k, v in got.items() if k.endswith("@test")}
        assert originals == {"big-1@test": 1, **{f"small-{i}@test": 1 for i in range(5)}}
        bounces = [m for m in peer.messages if m.sender == ""]
        assert len(bounces) == 1, "exactly one bounce, for gone@dest.example"
        assert bounces[0].recipients == ["alice@sender.example"]
        assert b"gone@dest.example" in bounces[0].content
