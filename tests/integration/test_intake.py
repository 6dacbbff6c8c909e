"""Intake under load with real clients, and durability across kill -9.

Postfix's smtp-source drives 100 parallel sessions; our own client records
every message the server acknowledged, the server is killed with SIGKILL at a
random moment, and after a restart every acknowledged message must be queued.
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from server import free_port, run_cli, running_server, start, wait_until, write_config

SMTP_SOURCE = shutil.which("smtp-source") or "/usr/sbin/smtp-source"


def need_smtp_source() -> None:
    if not Path(SMTP_SOURCE).exists():
        pytest.skip("Postfix's smtp-source is not installed (./dev test installs postfix as root)")


def test_smtp_source_100_sessions_10000_messages(tmp_path: Path) -> None:
    need_smtp_source()
    with running_server(tmp_path, workers=2, roles=("mx",)) as srv:
        out = subprocess.run(
            [
                SMTP_SOURCE,
                "-s",
                "100",
                "-m",
                "10000",
                "-l",
                "1024",
                "-f",
                "load@example.com",
                "-t",
                "sink@example.net",
                f"127.0.0.1:{srv.port}",
            ],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert out.returncode == 0, out.stderr
        assert "error" not in out.stderr.lower(), out.stderr
        entries = [
            json.loads(x)
            for x in run_cli("queue", "list", "--json", data_dir=srv.data_dir).splitlines()
        ]
    ids = [e["id"] for e in entries]
    assert len(ids) == 10000
    assert len(set(ids)) == 10000, "a message was queued twice"
    assert all(e["sender"] == "load@example.com" for e in entries)


class AckingClient(threading.Thread):
    """Sends numbered messages on one connection and records what the server acknowledged."""

    def __init__(self, port: int, name: str, acked: dict[str, str], stop: threading.Event):
        super().__init__(daemon=True)
        self.port, self.name, self.acked, self.stop_event = port, name, acked, stop

    def run(self) -> None:
        with contextlib.suppress(OSError):  # the server is killed under us: expected
            self._run()

    def _run(self) -> None:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        reader = sock.makefile("rb")

        def reply() -> bytes:
            line = reader.readline()
            while line[3:4] == b"-":
                line = reader.readline()
            if not line:
                raise ConnectionError("closed")
            return line

        reply()
        sock.sendall(b"EHLO durability\r\n")
        reply()
        n = 0
        while not self.stop_event.is_set():
            n += 1
            marker = f"{self.name}-{n}"
            body = f"Subject: {marker}\r\nX-Marker: {marker}\r\n\r\n" + "x" * 900 + "\r\n"
            sock.sendall(b"MAIL FROM:<d@example.com>\r\nRCPT TO:<r@example.net>\r\nDATA\r\n")
            assert reply().startswith(b"250") and reply().startswith(b"250")
            assert reply().startswith(b"354")
            sock.sendall(body.encode() + b".\r\n")
            final = reply()
            match = re.match(rb"250 2\.0\.0 Ok: queued as (\w+)", final)
            if match:
                self.acked[marker] = match.group(1).decode()


def run_kill_round(
    tmp_path: Path, seed: int, acked: dict[str, str], commit: str = "inline"
) -> None:
    """Load the server, kill -9 everything at a random moment, restart, check every ack.

    *acked* accumulates across rounds on the same queue, so later rounds also check that
    messages acknowledged before earlier kills survive further crashes.
    """
    rng = random.Random(seed)
    data_dir = tmp_path / "data"
    config = tmp_path / "tachymail.toml"
    if not config.exists():
        write_config(config, data_dir, {"mx": free_port()}, f'[queue]\ncommit = "{commit}"\n')
    port = int(config.read_text().split("127.0.0.1:")[1].split('"')[0])
    log = tmp_path / "server.log"
    srv = start(config, data_dir, {"mx": port}, 2, log)
    before = len(acked)
    stop = threading.Event()
    clients = [AckingClient(port, f"r{seed}c{i}", acked, stop) for i in range(16)]
    for client in clients:
        client.start()
    # the random moment counts from the first acknowledgement: on a busy machine the
    # workers may take over a second to start listening
    wait_until(lambda: len(acked) > before, 60)
    time.sleep(rng.uniform(0.5, 2.0))
    srv.kill()
    stop.set()
    for client in clients:
        client.join(15)
    assert len(acked) > before, f"nothing was acknowledged before the kill:\n{srv.log()}"
    # Restart on the same queue: it must open cleanly and hold every acknowledged message.
    srv = start(config, data_dir, {"mx": port}, 2, log)
    try:
        listing = run_cli("queue", "list", "--json", data_dir=data_dir)
        queued = {json.loads(line)["id"] for line in listing.splitlines()}
        missing = {m: q for m, q in acked.items() if q not in queued}
        assert not missing, f"{len(missing)} acknowledged messages lost: {list(missing)[:5]}"
        for marker, queue_id in rng.sample(sorted(acked.items()), min(20, len(acked))):
            shown = run_cli("queue", "show", queue_id, "--body", data_dir=data_dir)
            assert f"X-Marker: {marker}" in shown
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            assert sock.recv(512).startswith(b"220"), "the restarted server takes mail"
    finally:
        srv.stop()


@pytest.mark.parametrize("commit", ["inline", "thread"])
def test_kill_9_under_load_loses_nothing_acknowledged(tmp_path: Path, commit: str) -> None:
    run_kill_round(tmp_path, seed=1, acked={}, commit=commit)


@pytest.mark.slow
def test_kill_9_repeatedly_on_one_queue(tmp_path: Path) -> None:
    acked: dict[str, str] = {}
    for seed in range(2, 8):
        run_kill_round(tmp_path, seed, acked)
