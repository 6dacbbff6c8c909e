"""SIGHUP reloads refuse no connection (issue 17, defect 4).

Four probing clients connect, read the 220 greeting and QUIT in a loop while the
supervisor reloads three times; every attempt must be served: no refusal (nothing
listening), no reset (a connection dropped from a closed socket's accept backlog), no
silence. Once on an idle machine, once with a busy loop per core, which is what made
the new workers slow to bind and the old fixed 0.2 s wait too short.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from server import Server, running_server, wait_until

PROBERS = 4
RELOADS = 3


class Prober:
    """Threads that open a connection, read the greeting and QUIT, over and over."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.outcomes: Counter[str] = Counter()
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(PROBERS)]

    def __enter__(self) -> Prober:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    def _run(self) -> None:
        while not self._stop.is_set():
            outcome = self._probe()
            with self._lock:
                self.outcomes[outcome] += 1

    def _probe(self) -> str:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
                greeting = _read_line(sock)
                if not greeting.startswith(b"220 "):
                    self._note(f"greeting {greeting!r}")
                    return "bad greeting"
                sock.sendall(b"QUIT\r\n")
                bye = _read_line(sock)
                if not bye.startswith(b"221 "):
                    self._note(f"QUIT answered {bye!r}")
                    return "bad quit"
                return "served"
        except ConnectionRefusedError:
            return "refused"
        except ConnectionResetError:
            return "reset"
        except TimeoutError:
            return "timeout"
        except OSError as exc:
            self._note(repr(exc))
            return "error"

    def _note(self, what: str) -> None:
        with self._lock:
            self.errors.append(what)


def _read_line(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\r\n"):
        chunk = sock.recv(512)
        if not chunk:  # closed before a whole line: the client sees what a reset is to it
            return data or b"<closed>"
        data += chunk
    return data


@contextmanager
def busy_cpus(busy: bool) -> Iterator[None]:
    """A busy-loop process per core for the duration (stopped by PID), or nothing."""
    procs = []
    try:
        if busy:
            for _ in range(os.cpu_count() or 1):
                procs.append(subprocess.Popen([sys.executable, "-c", "while True: pass"]))
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def reload_and_wait(srv: Server, done: int) -> None:
    """SIGHUP once; return when the new generation has taken over and the old one is gone."""
    old = set(srv.worker_pids())
    srv.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: srv.log().count("configuration reloaded") == done, timeout=30)
    wait_until(lambda: not old & set(srv.worker_pids()), timeout=30)
    time.sleep(0.3)  # a moment of steady state between reloads


@pytest.mark.parametrize("busy", [False, True], ids=["idle", "cpu-busy"])
def test_reloads_refuse_no_connection(tmp_path: Path, busy: bool) -> None:
    with running_server(tmp_path, workers=2, roles=("mx",)) as srv:
        wait_until(lambda: srv.log().count("listening on") >= 2)
        with busy_cpus(busy), Prober(srv.port) as prober:
            wait_until(lambda: prober.outcomes["served"] >= 20)
            for done in range(1, RELOADS + 1):
                reload_and_wait(srv, done)
            before = prober.outcomes["served"]
            wait_until(lambda: prober.outcomes["served"] >= before + 20)  # still serving
        outcomes = dict(prober.outcomes)
        assert set(outcomes) == {"served"}, (outcomes, prober.errors[:5])
        assert outcomes["served"] >= 100  # the probers really ran through the reloads
        assert srv.log().count("configuration reloaded") == RELOADS


def test_a_reload_whose_workers_die_keeps_the_old_ones_serving(tmp_path: Path) -> None:
    """New workers that die before they listen (here: a DKIM key that does not exist)
    undo the reload: the old worker and the previous configuration stay, and the probers
    see no refusal, rather than the ports being left to a crash loop."""
    with running_server(tmp_path, workers=1, roles=("mx",)) as srv:
        wait_until(lambda: "listening on" in srv.log())
        [old] = srv.worker_pids()
        text = srv.config_path.read_text() + '\n[dkim]\ndomains = { "example.com" = "s1" }\n'
        srv.config_path.write_text(text)
        with Prober(srv.port) as prober:
            wait_until(lambda: prober.outcomes["served"] >= 20)
            srv.proc.send_signal(signal.SIGHUP)
            wait_until(lambda: "configuration not reloaded" in srv.log(), timeout=30)
            wait_until(lambda: srv.worker_pids() == [old], timeout=30)  # the new one is gone
            before = prober.outcomes["served"]
            wait_until(lambda: prober.outcomes["served"] >= before + 20)
        assert set(prober.outcomes) == {"served"}, (dict(prober.outcomes), prober.errors[:5])
        assert "new smtp workers 0 could not listen" in srv.log()
        assert "configuration reloaded" not in srv.log()
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
            assert _read_line(sock).startswith(b"220 mx.test.example")  # the old settings


def test_a_reload_with_a_listener_that_cannot_be_bound_keeps_the_old_ones_serving(
    tmp_path: Path,
) -> None:
    """A new listener on a port another program holds: the new workers cannot listen, so
    the old worker (and its unchanged ports) must go on serving, not be retired."""
    with socket.socket() as taken, running_server(tmp_path, workers=1, roles=("mx",)) as srv:
        taken.bind(("127.0.0.1", 0))  # no SO_REUSEPORT: our bind on this port must fail
        taken.listen(1)
        wait_until(lambda: "listening on" in srv.log())
        [old] = srv.worker_pids()
        port = taken.getsockname()[1]
        text = srv.config_path.read_text() + f'\n[[listener]]\naddress = "127.0.0.1:{port}"\n'
        srv.config_path.write_text(text)
        with Prober(srv.port) as prober:
            wait_until(lambda: prober.outcomes["served"] >= 20)
            srv.proc.send_signal(signal.SIGHUP)
            wait_until(lambda: "configuration not reloaded" in srv.log(), timeout=30)
            before = prober.outcomes["served"]
            wait_until(lambda: prober.outcomes["served"] >= before + 20)
            assert srv.worker_pids() == [old]
        assert set(prober.outcomes) == {"served"}, (dict(prober.outcomes), prober.errors[:5])
