"""The supervisor's HTTP endpoint stays up while clients connect and say nothing (finding 3).

A real `tachymail serve` with its metrics endpoint on a loopback port; idle TCP clients,
clients that dribble a request one byte at a time, and a flood beyond the client limit
must not keep /healthz or /metrics from answering an ordinary client promptly, and the
server must drop the idle and slow clients once their time is up.
"""

from __future__ import annotations

import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from server import Server, free_port, running_server, wait_until

IDLE = 50
SLOW = 3
#: generous: only catches a hang (on the old single-threaded endpoint it never answers)
ANSWER_WITHIN = 5.0


def http_get(port: int, path: str, timeout: float = ANSWER_WITHIN) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def still_open(sock: socket.socket) -> bool:
    """True while the peer has neither closed nor reset *sock* (nothing is ever sent)."""
    timeout = sock.gettimeout()
    sock.setblocking(False)  # a socket with a timeout would wait for data before peeking
    try:
        return sock.recv(1, socket.MSG_PEEK) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        sock.settimeout(timeout)


@contextmanager
def metrics_server(tmp_path: Path, settings: str = "") -> Iterator[tuple[Server, int]]:
    port = free_port()
    extra = f'[metrics]\naddress = "127.0.0.1:{port}"\n{settings}'
    with running_server(tmp_path, extra, roles=("mx",)) as srv:
        wait_until(lambda: http_get(port, "/healthz", timeout=10)[0] == 200)
        yield srv, port


@contextmanager
def idle_clients(port: int, count: int) -> Iterator[list[socket.socket]]:
    """*count* connections that never send a byte; closed by the test at the end."""
    with ExitStack() as stack:
        socks = []
        for _ in range(count):
            sock = stack.enter_context(socket.create_connection(("127.0.0.1", port), timeout=5))
            socks.append(sock)
        yield socks


@contextmanager
def slow_clients(port: int, count: int, interval: float) -> Iterator[list[socket.socket]]:
    """*count* connections sending a request line one byte every *interval* seconds."""
    stop = threading.Event()
    socks = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(count)]
    request = b"GET /metrics HTTP/1.1\r\nHost: x\r\n" + b"X-Padding: " + b"a" * 1000

    def dribble() -> None:
        for byte in request:
            for sock in socks:
                with suppress(OSError):  # dropped by the server: what it should do eventually
                    sock.send(bytes([byte]))
            if stop.wait(interval):
                return

    thread = threading.Thread(target=dribble, daemon=True)
    thread.start()
    try:
        yield socks
    finally:
        stop.set()
        thread.join(10)
        for sock in socks:
            sock.close()


def test_idle_and_slow_clients_do_not_block_health_or_metrics(tmp_path: Path) -> None:
    with (
        metrics_server(tmp_path) as (_srv, port),
        idle_clients(port, IDLE) as idle,
        slow_clients(port, SLOW, 0.5),
    ):
        time.sleep(0.5)  # the slow clients have started their requests
        assert http_get(port, "/healthz") == (200, "ok\n")
        status, text = http_get(port, "/metrics")
        assert status == 200
        assert "tachymail_workers_alive" in text
        assert http_get(port, "/readyz") == (200, "ok\n")
        # answered while every idle client was still connected (default timeout: 10 s)
        assert [still_open(sock) for sock in idle] == [True] * IDLE


def test_idle_and_slow_clients_are_dropped(tmp_path: Path) -> None:
    settings = "client_timeout = 2.0\n"
    with (
        metrics_server(tmp_path, settings) as (_srv, port),
        idle_clients(port, 10) as idle,
        # never silent for 2 s, so only the whole-request deadline can end them
        slow_clients(port, 2, 0.3) as slow,
    ):
        wait_until(lambda: not any(still_open(sock) for sock in idle + slow), timeout=20)
        assert http_get(port, "/healthz") == (200, "ok\n")


def test_flood_beyond_the_client_limit_still_answers_health(tmp_path: Path) -> None:
    settings = "max_clients = 8\n"
    with metrics_server(tmp_path, settings) as (_srv, port), idle_clients(port, 40) as idle:
        for _ in range(3):
            assert http_get(port, "/healthz") == (200, "ok\n")
        # the oldest silent clients made room; never more than the limit stay connected
        wait_until(lambda: sum(still_open(sock) for sock in idle) <= 8, timeout=10)
