"""The supervisor's HTTP endpoint: ``/metrics``, ``/healthz`` and ``/readyz``.

The supervisor has no event loop, so a threaded ``http.server`` runs in a daemon thread
of its own, one short-lived thread per client, bounded in number and in time (see
:class:`_Server`): no idle or slow client can keep a probe from its answer. ``/metrics``
adds up every worker's multiprocess files and appends what only the supervisor knows,
computed at scrape time: queue depth by state and the oldest message's age (the queue
package's own :func:`~tachymail.queue.stats.queue_stats`, one LMDB read transaction),
workers alive, and each process's CPU time and memory read from ``/proc``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Protocol

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from tachymail import __version__
from tachymail.config import Config
from tachymail.net import split_hostport
from tachymail.queue.stats import queue_stats
from tachymail.queue.store import QueueStore

log = logging.getLogger(__name__)

_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")
# LMDB forbids opening one environment twice at once in a process (closing either drops
# the process's file locks), and each client of the endpoint has a thread of its own.
_QUEUE_OPEN = threading.Lock()


class WorkerSlot(Protocol):
    index: int
    kind: str
    pid: int


class SupervisorView(Protocol):
    """What the endpoint reads from the supervisor (from its own thread, never writing)."""

    config: Config
    stopping: bool

    @property
    def slots(self) -> Sequence[WorkerSlot]: ...


def process_usage(pid: int) -> tuple[float, int] | None:
    """(CPU seconds, resident bytes) of *pid* from /proc, or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        statm = Path(f"/proc/{pid}/statm").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()
    cpu = (int(fields[11]) + int(fields[12])) / _TICKS  # utime, stime
    return cpu, int(statm.split()[1]) * _PAGE


def listening_ports() -> set[int]:
    """TCP ports with a socket in LISTEN state in this network namespace."""
    ports: set[int] = set()
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(name).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if len(parts) > 3 and parts[3] == "0A":
                ports.add(int(parts[1].rpartition(":")[2], 16))
    return ports


class SupervisorCollector(Collector):
    """The supervisor's own metrics, computed when scraped."""

    def __init__(self, view: SupervisorView) -> None:
        self.view = view

    def collect(self) -> Iterable[Metric]:
        view = self.view
        info = GaugeMetricFamily("tachymail_build_info", "Always 1.", labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        slots = list(view.slots)
        alive = GaugeMetricFamily(
            "tachymail_workers_alive", "Worker processes running, by kind.", labels=["kind"]
        )
        wanted = GaugeMetricFamily(
            "tachymail_workers_configured", "Worker processes configured, by kind.", labels=["kind"]
        )
        for kind in ("smtp", "delivery"):
            alive.add_metric([kind], sum(1 for s in slots if s.kind == kind and s.pid))
            wanted.add_metric([kind], sum(1 for s in slots if s.kind == kind))
        yield alive
        yield wanted
        ready = GaugeMetricFamily("tachymail_ready", "1 when /readyz would answer 200.")
        ready.add_metric([], 1.0 if readiness(view)[0] else 0.0)
        yield ready
        cpu = CounterMetricFamily(
            "tachymail_process_cpu_seconds",
            "User and system CPU time of each process (restarts begin again at 0).",
            labels=["kind", "index"],
        )
        rss = GaugeMetricFamily(
            "tachymail_process_resident_memory_bytes",
            "Resident memory of each process.",
            labels=["kind", "index"],
        )
        processes = [("supervisor", "0", os.getpid())]
        processes += [(s.kind, str(s.index), s.pid) for s in slots if s.pid]
        for kind, index, pid in processes:
            usage = process_usage(pid)
            if usage is not None:
                cpu.add_metric([kind, index], usage[0])
                rss.add_metric([kind, index], usage[1])
        yield cpu
        yield rss
        yield from self._queue()

    def _queue(self) -> Iterator[Metric]:
        with _QUEUE_OPEN:
            try:
                store = QueueStore(self.view.config.data_path / "queue", readonly=True)
            except Exception as exc:  # the queue may be missing or broken: /healthz reports it
                log.debug("queue metrics unavailable: %s", exc)
                return
            try:
                stats = queue_stats(store)
            finally:
                store.close()
        depth = GaugeMetricFamily(
            "tachymail_queue_messages",
            "Messages in the queue by state: active (due now), deferred (waiting to retry), held.",
            labels=["state"],
        )
        depth.add_metric(["active"], stats.active)
        depth.add_metric(["deferred"], stats.deferred)
        depth.add_metric(["held"], stats.held)
        yield depth
        oldest = GaugeMetricFamily(
            "tachymail_queue_oldest_message_age_seconds",
            "Age of the oldest message in the queue (0 when empty).",
        )
        oldest.add_metric([], stats.oldest_age)
        yield oldest


def health(view: SupervisorView) -> tuple[bool, str]:
    """(healthy, why): the queue opens and every worker position has a live process."""
    try:
        with _QUEUE_OPEN:
            QueueStore(view.config.data_path / "queue", readonly=True).close()
    except Exception as exc:
        return False, f"queue does not open: {exc}"
    dead = [f"{s.kind} {s.index}" for s in view.slots if not s.pid]
    if dead:
        return False, "workers not running: " + ", ".join(dead)
    return True, "ok"


def readiness(view: SupervisorView) -> tuple[bool, str]:
    """(ready, why): not draining and every configured listener port is in LISTEN state."""
    if view.stopping:
        return False, "draining"
    listening = listening_ports()
    missing = [
        lst.address
        for lst in view.config.listeners
        if split_hostport(lst.address)[1] not in listening
    ]
    if missing:
        return False, "not listening on " + ", ".join(missing)
    return True, "ok"


class _CappedSocketReader(io.RawIOBase):
    """Reads a socket, but never more than *cap* bytes in all: then it reports end of file.

    Requests to this endpoint are a few hundred bytes; the cap keeps a client from making
    the server hold megabytes of headers (http.server allows 100 lines of 64 KiB).
    """

    def __init__(self, sock: socket.socket, cap: int) -> None:
        super().__init__()
        self._sock = sock
        self._left = cap

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self._left <= 0:
            return 0
        view = memoryview(buffer).cast("B")
        got = self._sock.recv_into(view[: min(len(view), self._left)])
        self._left -= got
        return got


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.server.client_timeout)  # the longest silence
        self.rfile.close()  # the uncapped reader setup() made: replaced by a capped one
        self.rfile = io.BufferedReader(_CappedSocketReader(self.connection, MAX_REQUEST_BYTES))

    def do_GET(self) -> None:
        self.server.answering(self.connection)
        path = self.path.partition("?")[0]
        if path == "/metrics":
            try:
                body, status, ctype = (
                    generate_latest(self.server.registry),
                    200,
                    CONTENT_TYPE_LATEST,
                )
            except Exception as exc:
                log.exception("metrics collection failed")
                body, status, ctype = f"{exc}\n".encode(), 500, "text/plain"
        elif path in ("/healthz", "/readyz"):
            check = health if path == "/healthz" else readiness
            ok, why = check(self.server.view)
            body, status, ctype = f"{why}\n".encode(), 200 if ok else 503, "text/plain"
        else:
            body, status, ctype = b"try /metrics, /healthz or /readyz\n", 404, "text/plain"
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass  # scrapes every few seconds would drown the log


#: pending connections the kernel queues for accept(); http.server's default is 5
LISTEN_BACKLOG = 128
#: bytes a client may send in all (request line and headers): a GET is a few hundred
MAX_REQUEST_BYTES = 16 * 1024
_BUSY = (
    b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: text/plain\r\n"
    b"Content-Length: 31\r\nConnection: close\r\n\r\ntoo many metrics clients at once\n"
)


@dataclass(slots=True)
class _Client:
    deadline: float  # time.monotonic() by which the connection must be over
    answering: bool = False  # its request has arrived; it is no longer evictable


class _Server(ThreadingHTTPServer):
    """One thread per client, at most ``max_clients`` of them, each with a deadline.

    A client can block nobody else: each has its own thread; a silent socket times out
    after ``client_timeout``; :meth:`service_actions` (run by ``serve_forever`` every poll
    interval) shuts down any connection older than its deadline, however slowly it
    dribbles; and when all ``max_clients`` slots are taken, a newcomer displaces the
    oldest client still sending its request (a prober's request arrives at once, an idle
    or slow one never does), or gets 503 when every slot is answering.
    """

    daemon_threads = True
    request_queue_size = LISTEN_BACKLOG

    def __init__(
        self,
        address: tuple[str, int],
        view: SupervisorView,
        directory: Path,
        *,
        client_timeout: float = 10.0,
        max_clients: int = 64,
    ) -> None:
        self.client_timeout = client_timeout
        self.max_clients = max_clients
        self._clients: dict[socket.socket, _Client] = {}
        self._clients_lock = threading.Lock()
        super().__init__(address, _Handler)
        self.view = view
        self.registry = CollectorRegistry(auto_describe=False)
        MultiProcessCollector(self.registry, str(directory))  # type: ignore[no-untyped-call]
        self.registry.register(SupervisorCollector(view))

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._clients_lock:
            admitted = len(self._clients) < self.max_clients or self._evict_one()
            if admitted:
                deadline = time.monotonic() + self.client_timeout
                self._clients[request] = _Client(deadline)
        if not admitted:
            self._refuse(request)
            return
        super().process_request(request, client_address)

    def _evict_one(self) -> bool:
        """Disconnect the oldest client still sending its request (lock held)."""
        waiting = [(c.deadline, s) for s, c in self._clients.items() if not c.answering]
        if not waiting:
            return False
        _deadline, sock = min(waiting, key=lambda item: item[0])
        del self._clients[sock]
        _cut(sock)
        return True

    def _refuse(self, request: socket.socket) -> None:
        log.warning("metrics endpoint: %d clients at once, one refused", self.max_clients)
        with contextlib.suppress(OSError):
            request.setblocking(False)  # the serving thread must never wait on a client
            request.send(_BUSY)
        self.shutdown_request(request)

    def answering(self, sock: socket.socket) -> None:
        """The request of *sock* has arrived: it now keeps its slot until answered."""
        with self._clients_lock:
            client = self._clients.get(sock)
            if client is not None:
                client.answering = True

    def service_actions(self) -> None:
        now = time.monotonic()
        with self._clients_lock:
            late = [sock for sock, client in self._clients.items() if client.deadline <= now]
            for sock in late:
                del self._clients[sock]
        for sock in late:
            _cut(sock)

    def shutdown_request(self, request: Any) -> None:
        with self._clients_lock:
            self._clients.pop(request, None)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        error = sys.exc_info()[1]
        if isinstance(error, OSError):  # a client gone or cut off by its deadline: not news
            log.debug("metrics client %s: %s", client_address, error)
        else:
            log.error("metrics endpoint failed for %s", client_address, exc_info=error)


def _cut(sock: socket.socket) -> None:
    """End a connection from another thread: its handler's blocked read or write returns."""
    with contextlib.suppress(OSError):  # already closed by its own thread
        sock.shutdown(socket.SHUT_RDWR)


class MetricsEndpoint:
    """The running HTTP server thread; :meth:`close` stops it."""

    def __init__(self, server: _Server) -> None:
        self.server = server
        self.address = server.server_address
        self.thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True
        )
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def start_endpoint(
    view: SupervisorView,
    address: str,
    directory: Path,
    *,
    client_timeout: float = 10.0,
    max_clients: int = 64,
) -> MetricsEndpoint | None:
    """Serve on *address* ("HOST:PORT"); None (with a warning) if it cannot bind.

    A busy metrics port never stops the MTA: mail matters more than its graphs. No client
    can keep another from an answer (see :class:`_Server`): each gets at most
    *client_timeout* seconds, and at most *max_clients* are served at once.
    """
    host, port = split_hostport(address)
    try:
        server = _Server(
            (host, port), view, directory, client_timeout=client_timeout, max_clients=max_clients
        )
    except OSError as exc:
        log.warning("metrics endpoint not started: cannot listen on %s: %s", address, exc.strerror)
        return None
    log.info("metrics on http://%s/metrics (and /healthz, /readyz)", address)
    return MetricsEndpoint(server)
