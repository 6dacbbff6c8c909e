"""A full disk under a real `tachymail serve` (finding 7).

The data directory lives on a real 20 MiB tmpfs mounted by the test (we run as root, as
CI does). Every refusal for lack of room must be `452 4.3.1`, whatever errno LMDB saw
(ENOSPC, or EIO for a short write); `tachymail queue delete` must work on the full disk
and say what it did, the other queue commands must fail in one line, never a traceback;
and once a deletion made room the next message is accepted.
"""

from __future__ import annotations

import errno
import os
import smtplib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tachymail.queue.envelope import Envelope, Recipient, new_queue_id
from tachymail.queue.store import QueueStore, put_message

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from server import Server, run_cli, running_server, tachymail_cmd

SIZE = "20m"


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A fresh 20 MiB tmpfs, unmounted afterwards (also when the test fails)."""
    where = tmp_path / "tmpfs"
    where.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={SIZE}", "tmpfs", str(where)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        reason = f"cannot mount a tmpfs (needs root): {mounted.stderr.strip()}"
        if os.environ.get("TACHYMAIL_REQUIRE_ALL") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    try:
        yield where
    finally:
        if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)


def message(size: int) -> bytes:
    line = b"y" * 76 + b"\r\n"
    return b"Subject: fill\r\n\r\n" + line * (size // len(line))


def send(port: int, size: int) -> tuple[int, bytes]:
    """One message in its own session: (code, text) of the reply to its data."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo()
        client.mail("a@sender.example")
        client.rcpt("b@dest.example")
        code, text = client.data(message(size))
        return code, text


def fill_until_refused(server: Server, size: int, refusals: int = 15) -> list[tuple[int, bytes]]:
    """Send messages until *refusals* have been refused; every non-250 reply."""
    refused: list[tuple[int, bytes]] = []
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as client:
        client.ehlo()
        for _ in range(600):
            client.mail("a@sender.example")
            client.rcpt("b@dest.example")
            code, text = client.data(message(size))
            if code != 250:
                refused.append((code, text))
                client.rset()
                if len(refused) >= refusals:
                    break
    return refused


def fill_the_disk(where: Path) -> None:
    """Take every block left on the filesystem of *where* with a new plain file."""
    index = 0
    while (where / f"filler{index}").exists():
        index += 1
    with open(where / f"filler{index}", "wb", buffering=0) as filler:
        for size in (1 << 20, 1 << 16, 1 << 12, 1 << 9, 1):  # down to the last byte
            try:
                while True:
                    filler.write(bytes(size))
            except OSError as exc:
                assert exc.errno == errno.ENOSPC


def cli(*args: str, data_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*tachymail_cmd(), *args, "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_full_disk_answers_452_and_queue_delete_makes_room(tmp_path: Path, tmpfs: Path) -> None:
    data = tmpfs / "data"
    with running_server(tmp_path, roles=("mx",), data_dir=data) as server:
        refused = fill_until_refused(server, 100_000)
        assert refused, "the disk never filled"
        wrong = [(code, text) for code, text in refused if code != 452 or b"4.3.1" not in text]
        assert not wrong, f"{len(wrong)} of {len(refused)} refusals were not 452 4.3.1: {wrong}"
        assert "Traceback" not in server.log()

        ids = [line.split()[0] for line in run_cli("queue", "list", data_dir=data).splitlines()]
        for queue_id in ids[:3]:
            out = cli("queue", "delete", queue_id, data_dir=data)
            assert out.returncode == 0, out.stderr
            assert "delete: 1 message(s)" in out.stdout
            assert "Traceback" not in out.stderr
        assert int(run_cli("queue", "count", data_dir=data)) == len(ids) - 3

        code, text = send(server.port, 20_000)
        assert code == 250, text


def test_queue_delete_works_on_a_disk_full_to_the_last_block(tmp_path: Path, tmpfs: Path) -> None:
    """No slack in the LMDB file (all written in one transaction), the rest of the
    filesystem taken by another file: only the reserve lets a deletion commit."""
    data = tmpfs / "data"
    store = QueueStore(data / "queue")
    ids = [new_queue_id() for _ in range(60)]
    store.apply(
        [
            put_message(
                Envelope(
                    id=queue_id,
                    sender="a@sender.example",
                    recipients=[Recipient("b@dest.example")],
                    arrival=time.time(),
                ),
                os.urandom(60_000),
            )
            for queue_id in ids
        ]
    )
    store.close()
    with running_server(tmp_path, roles=("mx",), data_dir=data) as server:
        fill_the_disk(tmpfs)

        held = cli("queue", "hold", ids[0], data_dir=data)
        assert held.returncode != 0
        assert "Traceback" not in held.stderr
        assert "no room" in held.stderr
        assert len([line for line in held.stderr.splitlines() if "tachymail:" in line]) == 1

        deleted = cli("queue", "delete", ids[0], data_dir=data)
        assert deleted.returncode == 0, deleted.stderr
        assert "Traceback" not in deleted.stderr
        assert "delete: 1 message(s)" in deleted.stdout
        assert "reserve" in deleted.stdout  # it says how it found the room
        fill_the_disk(tmpfs)  # what the reserve gave back, taken again
        for queue_id in ids[1:4]:  # the pages freed by one deletion make room for the next
            deleted = cli("queue", "delete", queue_id, data_dir=data)
            assert deleted.returncode == 0, deleted.stderr
            assert "delete: 1 message(s)" in deleted.stdout
        assert int(run_cli("queue", "count", data_dir=data)) == len(ids) - 4

        code, text = send(server.port, 2_000)
        assert code == 250, text

        fill_the_disk(tmpfs)
        deleted = cli("queue", "delete", "--all", data_dir=data)
        assert deleted.returncode == 0, deleted.stderr
        assert f"delete: {len(ids) - 3} message(s)" in deleted.stdout
        assert int(run_cli("queue", "count", data_dir=data)) == 0
