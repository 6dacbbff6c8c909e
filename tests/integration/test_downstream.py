"""Real MTAs downstream: Postfix's smtp-sink and a real Postfix instance as next hops."""

from __future__ import annotations

import json
import os
import shutil
import smtplib
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import peers
from server import free_port, running_server, wait_until

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def smarthost(port: int) -> str:
    return f'[delivery]\nsmarthost = "127.0.0.1:{port}"\nsmarthost_tls = "none"\n'


def send_many(port: int, count: int) -> None:
    with smtplib.SMTP("127.0.0.1", port) as client:
        for i in range(count):
            client.sendmail(
                "load@example.com",
                [f"r{i}@far.example"],
                f"Subject: {i}\r\nMessage-ID: <m{i}@example.com>\r\n\r\nbody {i}\r\n".encode(),
            )


def test_relay_to_smtp_sink_uses_few_connections(tmp_path: Path) -> None:
    if not Path(peers.SMTP_SINK).exists():
        pytest.skip("Postfix's smtp-sink is not installed (./dev test installs postfix as root)")
    counters = tmp_path / "sink.counters"
    sink = peers.start_smtp_sink(tmp_path, counters)
    # start_smtp_sink's readiness probe is a session of its own: count from after it.
    wait_until(lambda: peers.sink_counters(counters).get("sess", 0) >= 1, timeout=30)
    probes = peers.sink_counters(counters)["sess"]
    try:
        with running_server(tmp_path, smarthost(sink.port), hold=False, roles=("mx",)) as srv:
            send_many(srv.port, 200)
            wait_until(lambda: peers.sink_counters(counters).get("mesg", 0) >= 200, timeout=30)
            wait_until(lambda: srv.queue_count() == 0, timeout=30)
        time.sleep(0.5)  # tachymail stopped: its cached connections have closed
        seen = peers.sink_counters(counters)
        assert seen["mesg"] == 200
        connections = seen["sess"] - probes
        assert 1 <= connections <= 20, f"{connections} connections for 200 messages"
    finally:
        sink.stop()


def test_relay_to_a_real_postfix(tmp_path: Path) -> None:
    why = peers.postfix_available()
    if why:
        pytest.skip(why)
    postfix = peers.start_postfix(tmp_path)
    try:
        with running_server(tmp_path, smarthost(postfix.port), hold=False, roles=("mx",)) as srv:
            send_many(srv.port, 5)
            wait_until(lambda: srv.queue_count() == 0, timeout=30)
        assert postfix.home is not None
        spool = postfix.home / "spool"

        def queued_files() -> list[Path]:
            found = []
            for sub in ("incoming", "active", "deferred"):
                for root, _dirs, files in os.walk(spool / sub):
                    found += [Path(root) / f for f in files]
            return found

        wait_until(lambda: len(queued_files()) == 5, timeout=30)
        contents = b"".join(p.read_bytes() for p in queued_files())
        for i in range(5):
            assert f"<m{i}@example.com>".encode() in contents
            assert f"r{i}@far.example".encode() in contents
        assert b"by mx.test.example (Tachymail)" in contents
    finally:
        postfix.stop()


def listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def test_private_postfix_ignores_the_machines_master_cf(tmp_path: Path) -> None:
    """Defect 7: the private Postfix used to copy /etc/postfix/master.cf and rewrite its
    "smtp inet" line; on a machine whose file says something else it listened where that
    file said (here a decoy port), never on its own port, and was left running."""
    why = peers.postfix_available()
    if why:
        pytest.skip(why)
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is needed to show Postfix another master.cf")
    decoy = free_port()
    machines = tmp_path / "machines-master.cf"
    machines.write_text(f"127.0.0.1:{decoy}\tinet\tn\t-\tn\t-\t-\tsmtpd\n")
    starter = (
        f"import dataclasses, json, sys; sys.path.insert(0, {str(BENCHMARKS)!r}); import peers\n"
        f"peer = peers.start_postfix(__import__('pathlib').Path({str(tmp_path)!r}))\n"
        "print(json.dumps(dataclasses.asdict(peer), default=str))\n"
    )
    # A mount namespace of its own shows this process tree (Postfix included) the decoy file
    # in place of /etc/postfix/master.cf, and nobody else.
    started = subprocess.run(
        [
            "unshare",
            "--mount",
            "sh",
            "-c",
            'mount --bind "$0" /etc/postfix/master.cf && exec "$1" -c "$2"',
            str(machines),
            sys.executable,
            starter,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert started.returncode == 0, started.stderr[-2000:]
    fields = json.loads(started.stdout.strip().splitlines()[-1])
    postfix = peers.Peer(
        "postfix",
        fields["port"],
        fields["pid"],
        home=Path(fields["home"]),
    )
    try:
        assert listening(postfix.port)
        assert not listening(decoy)
        with smtplib.SMTP("127.0.0.1", postfix.port, timeout=30) as client:
            assert client.ehlo()[0] == 250
    finally:
        postfix.stop()
    assert not Path(f"/proc/{postfix.pid}").exists()
    assert not listening(postfix.port)
