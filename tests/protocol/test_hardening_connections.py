"""Connection-level hardening of the SMTP front end, against a real `tachymail serve`.

Issue 16, findings 1 (per-IP limit bypass), 2 (write-side back-pressure), 5 (slowloris,
stress mode) and the flood items (reserved slots, idle connections' memory). Clients
from 127.0.0.1 are made untrusted by configuring another trusted network; a second
loopback source address (127.0.0.2) plays the trusted client where one is needed.
"""

from __future__ import annotations

import contextlib
import errno
import re
import resource
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import RawClient
from server import Server, free_port, running_server, wait_until

UNTRUSTED = '[policy]\ntrusted_networks = ["192.0.2.0/24"]\n'


def rss_kib(pid: int) -> int:
    """Resident set size of process *pid*, in KiB (from /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def with_metrics(extra: str) -> tuple[str, int]:
    """*extra* plus a metrics endpoint on a free port (the default one may be taken)."""
    port = free_port()
    return extra + f'[metrics]\naddress = "127.0.0.1:{port}"\n', port


def metric(port: int, sample: str) -> float:
    """The value of one sample line (name and labels) on /metrics; 0.0 when absent."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text: str = response.read().decode()
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[-1])
    return 0.0


def the_worker(srv: Server) -> int:
    wait_until(lambda: len(srv.worker_pids()) == 1)
    [pid] = srv.worker_pids()
    return pid


def connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    return sock


def greeted(port: int, source: str = "127.0.0.1") -> socket.socket:
    """A connection that got its 220, retried while the server still counts the start-up
    probe's connection (wait_port's), which closes just before the test begins."""
    deadline = time.monotonic() + 10
    while True:
        sock = connect(port, source)
        reply = first_reply(sock)
        if reply.startswith(b"220 "):
            return sock
        sock.close()
        assert time.monotonic() < deadline, reply
        time.sleep(0.05)


def first_reply(sock: socket.socket) -> bytes:
    """The first reply line the server sends on *sock* (b"" if it closes first)."""
    data = b""
    while b"\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def closed_by_server(sock: socket.socket, timeout: float) -> bytes | None:
    """Everything the server still sends until it closes; None if still open at *timeout*."""
    sock.settimeout(timeout)
    data = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return data
            data += chunk
    except TimeoutError:
        return None
    except ConnectionResetError:
        return data


# --- finding 1: per-IP and global limits ----------------------------------------------------


def test_refused_connections_do_not_free_per_ip_slots(tmp_path: Path) -> None:
    extra = "[limits]\nmax_connections_per_ip = 2\n" + UNTRUSTED
    with running_server(tmp_path, extra, roles=("mx",)) as srv:
        kept = [greeted(srv.port) for _ in range(2)]
        try:
            for _ in range(5):
                # Each refused client leaves before the next one comes: the bypass of issue 16.
                with connect(srv.port) as refused:
                    assert first_reply(refused).startswith(b"421 4.7.0")
                    assert closed_by_server(refused, 10) is not None
            kept.pop().close()
            # The slot of a session that really ended is free again.
            with connect(srv.port) as again:
                assert first_reply(again).startswith(b"220 ")
        finally:
            for sock in kept:
                sock.close()
        assert "too many connections from 127.0.0.1" in srv.log()


def test_global_limit_admits_exactly_max_connections(tmp_path: Path) -> None:
    extra = "[limits]\nmax_connections = 3\nreserved_connections = 0\n" + UNTRUSTED
    with running_server(tmp_path, extra, roles=("mx",)) as srv:
        kept = [greeted(srv.port) for _ in range(3)]
        try:
            for _ in range(3):
                with connect(srv.port) as refused:
                    assert first_reply(refused).startswith(b"421 4.7.0")
            kept.pop().close()

            kept.append(greeted(srv.port))  # the slot is free again once the session ended
        finally:
            for sock in kept:
                sock.close()


# --- floods: reserved slots -----------------------------------------------------------------


def test_reserved_slots_serve_trusted_and_submission_clients(tmp_path: Path) -> None:
    extra = (
        "[limits]\nmax_connections = 4\nreserved_connections = 2\n"
        '[policy]\ntrusted_networks = ["127.0.0.2/32"]\n'
    )
    with running_server(tmp_path, extra, roles=("mx", "submission")) as srv:
        kept: list[socket.socket] = []
        try:
            for _ in range(2):  # untrusted mx clients take the unreserved slots
                kept.append(greeted(srv.port))
            with connect(srv.port) as refused:
                assert first_reply(refused).startswith(b"421 4.7.0")
            kept.append(connect(srv.port, source="127.0.0.2"))  # trusted: a reserved slot
            assert first_reply(kept[-1]).startswith(b"220 ")
            kept.append(connect(srv.ports["submission"]))  # submission: a reserved slot
            assert first_reply(kept[-1]).startswith(b"220 ")
            with connect(srv.port, source="127.0.0.2") as full:  # the global limit itself
                assert first_reply(full).startswith(b"421 4.7.0")
        finally:
            for sock in kept:
                sock.close()
        assert "too many connections" in srv.log()


# --- finding 2: write-side back-pressure ----------------------------------------------------


def test_client_that_never_reads_is_paused_and_cut_off(tmp_path: Path) -> None:
    extra, metrics = with_metrics("[limits]\ncommand_timeout = 3.0\n")
    with running_server(tmp_path, extra, roles=("mx",)) as srv:
        worker = the_worker(srv)
        greedy = socket.socket()
        greedy.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        greedy.connect(("127.0.0.1", srv.port))
        served_meanwhile = False
        try:
            assert first_reply(greedy).startswith(b"220 ")
            before = rss_kib(worker)
            greedy.setblocking(False)
            block = b"HELP\r\n" * 20000
            growth, cut, blocked = 0, False, 0
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    greedy.send(block)
                except BlockingIOError:
                    blocked += 1
                    if blocked == 10:  # the greedy client is stuck: others are still served
                        other = RawClient(srv.port)
                        assert other.cmd(b"EHLO other").startswith(b"250")
                        other.close()
                        served_meanwhile = True
                    time.sleep(0.005)
                except OSError as exc:  # the server has cut us off
                    assert exc.errno in (errno.EPIPE, errno.ECONNRESET), exc
                    cut = True
                    break
                growth = max(growth, rss_kib(worker) - before)
                assert growth < 50 * 1024, f"worker grew by {growth} KiB"
            assert cut, f"a client that never reads was never cut off (grew {growth} KiB)"
            print(f"worker grew by {growth} KiB at most")
            assert served_meanwhile
        finally:
            greedy.close()
        after = RawClient(srv.port)
        assert after.cmd(b"NOOP").startswith(b"250")
        after.close()
        wait_until(lambda: "write_stalled" in srv.log(), timeout=10)
        cut = 'tachymail_smtp_sessions_cut_total{reason="write_stalled"}'
        wait_until(lambda: metric(metrics, cut) == 1.0, timeout=10)


def test_slow_reader_gets_every_reply_in_order(tmp_path: Path) -> None:
    """Back-pressure loses nothing: commands held back while the client did not read (and
    while a commit paused reading too) all run, in order, once it reads again."""
    count = 50_000  # 5.5 MB of HELP replies: more than the kernel's buffers take
    with running_server(tmp_path, "[limits]\ncommand_timeout = 30.0\n", roles=("mx",)) as srv:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", srv.port))
        sock.settimeout(30)
        try:
            assert first_reply(sock).startswith(b"220 ")
            sock.sendall(b"EHLO slow\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\n")
            sock.sendall(b"DATA\r\n")
            received = b""
            while b"354 " not in received:
                received += sock.recv(4096)
            tail = b"Subject: x\r\n\r\nbody\r\n.\r\n" + b"HELP\r\n" * count + b"QUIT\r\n"
            sender = threading.Thread(target=sock.sendall, args=(tail,))
            sender.start()
            time.sleep(1.0)  # the server stops reading while its replies pile up unread
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                received += chunk
            sender.join(30)
            assert not sender.is_alive()
        finally:
            sock.close()
        lines = received.split(b"\r\n")
        assert lines[-1] == b""
        after = lines[lines.index(next(x for x in lines if x.startswith(b"354 "))) + 1 : -1]
        assert after[0].startswith(b"250 2.0.0 Ok: queued as ")
        helps = after[1:-1]
        assert len(helps) == 2 * count and all(x.startswith(b"214") for x in helps)
        assert after[-1].startswith(b"221 ")


# --- finding 5: slowloris -------------------------------------------------------------------


def drip(sock: socket.socket, data: bytes, interval: float, limit: float) -> bytes | None:
    """Send *data* a byte at a time every *interval* s; what the server said when it closed,
    or None if it was still open after *limit* seconds."""
    sock.settimeout(interval)
    received = b""
    deadline = time.monotonic() + limit
    i = 0
    while time.monotonic() < deadline:
        try:
            sock.send(data[i % len(data) : i % len(data) + 1])
        except OSError:
            return received
        i += 1
        try:
            chunk = sock.recv(4096)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return received
        if not chunk:
            return received
        received += chunk
    return None


def test_command_line_deadline_cuts_a_slow_drip(tmp_path: Path) -> None:
    extra = "[limits]\ncommand_timeout = 10.0\ncommand_deadline = 2.0\n"
    with running_server(tmp_path, extra, roles=("mx",)) as srv:
        with connect(srv.port) as sock:
            assert first_reply(sock).startswith(b"220 ")
            said = drip(sock, b"NOOP NOOP NOOP NOOP", interval=0.3, limit=20)
        assert said is not None, "a one-byte-at-a-time command line was never cut off"
        assert said.startswith(b"421 4.4.2"), said
        assert "command_deadline" in srv.log()


def test_whole_command_lines_reset_the_line_deadline(tmp_path: Path) -> None:
    extra = "[limits]\ncommand_timeout = 10.0\ncommand_deadline = 1.0\n"
    with running_server(tmp_path, extra, roles=("mx",)) as srv:
        client = RawClient(srv.port)
        for _ in range(4):  # 2 s of quick, complete commands: under the deadline each
            assert client.cmd(b"NOOP").startswith(b"250")
            time.sleep(0.5)
        client.close()


@pytest.mark.parametrize("transfer", ["DATA", "BDAT"])
def test_data_deadline_cuts_a_slow_transfer(tmp_path: Path, transfer: str) -> None:
    extra = "[limits]\ndata_timeout = 10.0\ndata_deadline = 2.0\nmin_data_rate = 0\n"
    with running_server(tmp_path, extra, roles=("mx",)) as srv:
        client = RawClient(srv.port)
        client.cmd(b"EHLO slow")
        client.cmd(b"MAIL FROM:<a@example.com>")
        client.cmd(b"RCPT TO:<b@example.net>")
        if transfer == "DATA":
            assert client.cmd(b"DATA").startswith(b"354")
        else:
            client.send(b"BDAT 100000 LAST\r\n")
        said = drip(client.sock, b"Subject: x\r\n", interval=0.3, limit=20)
        client.close()
        assert said is not None, f"a slow {transfer} was never cut off"
        assert said.startswith(b"421 4.4.2"), said
        assert "data_deadline" in srv.log()


def test_min_data_rate_cuts_a_slow_body(tmp_path: Path) -> None:
    extra = (
        "[limits]\ndata_timeout = 10.0\ndata_deadline = 60.0\n"
        "min_data_rate = 1000\ndata_rate_grace = 1.0\n"
    )
    with running_server(tmp_path, extra, roles=("mx",)) as srv:
        client = RawClient(srv.port)
        client.cmd(b"EHLO slow")
        client.cmd(b"MAIL FROM:<a@example.com>")
        client.cmd(b"RCPT TO:<b@example.net>")
        assert client.cmd(b"DATA").startswith(b"354")
        said = drip(client.sock, b"Subject: x\r\n", interval=0.2, limit=20)
        client.close()
        assert said is not None, "a body at a few bytes per second was never cut off"
        assert said.startswith(b"421 4.4.2"), said
        assert "min_data_rate" in srv.log()


def test_stress_mode_shortens_idle_timeouts(tmp_path: Path) -> None:
    extra, metrics = with_metrics(
        "[limits]\nmax_connections = 10\nreserved_connections = 0\ncommand_timeout = 60.0\n"
        "stress_command_timeout = 1.0\n"
    )
    stress = "tachymail_smtp_workers_in_stress"
    with running_server(tmp_path, extra, roles=("mx",)) as srv:
        idle = RawClient(srv.port)
        busy: list[RawClient] = []
        try:
            time.sleep(1.5)  # below the stress threshold the normal timeout holds
            assert not idle.closed(timeout=0.1)
            busy = [RawClient(srv.port) for _ in range(8)]  # 9 of 10 open: stress
            deadline = time.monotonic() + 15
            cut = False
            while not cut and time.monotonic() < deadline:
                for client in busy:  # these keep talking, so only the idle one is cut
                    assert client.cmd(b"NOOP").startswith(b"250")
                cut = idle.closed(timeout=0.2)
            assert cut, "an idle session outlived the stress timeout"
            assert idle.buffer.startswith(b"421 4.4.2"), idle.buffer
            assert "stress mode started" in srv.log()
            assert metric(metrics, stress) == 1.0
            cut_metric = 'tachymail_smtp_sessions_cut_total{reason="stress_timeout"}'
            wait_until(lambda: metric(metrics, cut_metric) == 1.0, timeout=10)
        finally:
            for client in [idle, *busy]:
                client.close()
        wait_until(lambda: "stress mode ended" in srv.log(), timeout=10)
        assert metric(metrics, stress) == 0.0
        # Out of stress again: a new idle session keeps the long timeout.
        calm = RawClient(srv.port)
        assert not calm.closed(timeout=2.0)
        calm.close()


# --- floods: many idle connections ----------------------------------------------------------


@contextlib.contextmanager
def open_files(wanted: int) -> Iterator[None]:
    """Raise this process's RLIMIT_NOFILE soft limit for *wanted* sockets; restore it after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < wanted + 100:
        pytest.skip(f"needs {wanted + 100} open files, the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted + 100), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def idle_flood(tmp_path: Path, count: int) -> None:
    """*count* idle sessions cost under 10 KiB of worker memory each; a new client is greeted."""
    # Twice the connections as the limit: far from stress mode, which would cut idle sessions.
    extra = f"[limits]\nmax_connections = {2 * count + 100}\n"
    with open_files(count), running_server(tmp_path, extra, roles=("mx",)) as srv:
        worker = the_worker(srv)
        warm = [connect(srv.port) for _ in range(50)]  # allocator warm-up, not counted
        for sock in warm:
            first_reply(sock)
        before = rss_kib(worker)
        socks: list[socket.socket] = []
        try:
            for _ in range(count):
                # One at a time, each greeted: a burst of connects would overflow the listen
                # backlog, and the kernel's SYN retries would only slow the test down.
                socks.append(connect(srv.port))
                assert first_reply(socks[-1]).startswith(b"220 ")
            per_connection = (rss_kib(worker) - before) * 1024 / count
            assert per_connection < 10 * 1024, f"{per_connection:.0f} bytes per idle connection"
            with connect(srv.port) as late:
                late.settimeout(10)  # generous: only a hang fails
                assert first_reply(late).startswith(b"220 ")
            match = re.search(r"open files limit (\d+)", srv.log())
            assert match is not None and int(match.group(1)) >= count
        finally:
            for sock in socks + warm:
                sock.close()


def test_idle_flood_memory_per_connection(tmp_path: Path) -> None:
    idle_flood(tmp_path, 2000)


@pytest.mark.slow
def test_idle_flood_10000_connections(tmp_path: Path) -> None:
    idle_flood(tmp_path, 10_000)
