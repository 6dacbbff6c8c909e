"""A real `tachymail sink --record FILE` for tests: start, stop by PID, read what it saw.

    with recording_sink(tmp_path, "--reply-for", "127.0.0.2=421 4.7.28 Slow down") as sink:
        ...deliver to 127.0.0.1:sink.port...
        sink.wait_for_messages(10)
    assert {m["peer"] for m in sink.messages()} == {"127.0.0.1"}

The record has one JSON object per line (see docs/load-testing.md): "connect"
(t, conn, peer, port, open[, refused]), "helo" (t, conn, verb, name), "refused"
(t, conn, stage, reply), "message" (t, conn, peer, ehlo, sender, rcpts, size,
headers, open[, queue_id]) and "close" (t, conn). The sink writes whole lines
once per loop turn, so the file can be read while it runs; a last line without
its newline (a write seen half done) is left for the next read.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server import free_port, tachymail_cmd, wait_until

Event = dict[str, Any]


def wait_listening(
    port: int, timeout: float = 15.0, proc: subprocess.Popen[str] | None = None
) -> None:
    """Wait until something listens on 127.0.0.1:port, without connecting (it would be recorded).

    Fails at once when *proc* (the process expected to listen) has exited.
    """
    wanted = f"0100007F:{port:04X}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the process exited with {proc.returncode} before listening")
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[1] == wanted and fields[3] == "0A":  # 0A: LISTEN
                return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port}")


@dataclass
class RecordingSink:
    """A running `tachymail sink --record`: its process, port and record file."""

    proc: subprocess.Popen[str]
    port: int
    record: Path
    stderr_path: Path
    counters: dict[str, int] | None = field(default=None)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, timeout: float = 30.0) -> dict[str, int]:
        """SIGTERM by PID; the counters the sink prints on exit (its record is complete then)."""
        if self.counters is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                out, _ = self.proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.communicate()
                raise
            assert self.proc.returncode == 0, self.stderr_path.read_text()
            self.counters = json.loads(out.strip().splitlines()[-1])
        return self.counters

    # --- reading the record ----------------------------------------------------------------

    def events(self, kind: str | None = None) -> list[Event]:
        """Every complete event so far, in file order; only those of *kind* if given."""
        try:
            text = self.record.read_text()
        except FileNotFoundError:
            return []
        lines = text.split("\n")[:-1]  # the part after the last newline is not whole yet
        events = [json.loads(line) for line in lines if line]
        return events if kind is None else [e for e in events if e["event"] == kind]

    def messages(self) -> list[Event]:
        """The accepted messages (250 at the end of data)."""
        return self.events("message")

    def connections(self) -> list[Event]:
        return self.events("connect")

    def refusals(self) -> list[Event]:
        """Scripted and random refusals: stage (greeting, mail, rcpt, data) and the reply."""
        return self.events("refused")

    def arrivals(self) -> list[float]:
        """When each accepted message's end of data arrived (unix time), in order."""
        return sorted(m["t"] for m in self.messages())

    def by_peer(self) -> dict[str, list[Event]]:
        """The accepted messages by the client's IP address."""
        out: dict[str, list[Event]] = defaultdict(list)
        for message in self.messages():
            out[message["peer"]].append(message)
        return dict(out)

    def helo_names(self) -> dict[int, str]:
        """Connection number -> the last EHLO/HELO name it gave."""
        return {e["conn"]: e["name"] for e in self.events("helo")}

    def max_concurrent(self) -> int:
        """The most connections open at once, refused ones not counted.

        Computed from the connect and close events in time order, so it holds across
        several sink processes too; with --procs 1 it equals the largest "open" field.
        """
        counted: set[int] = set()
        steps: list[tuple[float, int, int]] = []
        for event in self.events():
            if event["event"] == "connect" and not event.get("refused"):
                counted.add(event["conn"])
                steps.append((event["t"], 1, event["conn"]))
            elif event["event"] == "close" and event["conn"] in counted:
                steps.append((event["t"], -1, event["conn"]))
        steps.sort(key=lambda step: (step[0], step[1]))  # a close at the same instant first
        now = peak = 0
        for _, delta, _ in steps:
            now += delta
            peak = max(peak, now)
        return peak

    def wait_for_messages(self, count: int, timeout: float = 20.0) -> list[Event]:
        """Wait until at least *count* messages are recorded; the messages."""
        wait_until(lambda: len(self.messages()) >= count, timeout)
        return self.messages()


@contextmanager
def recording_sink(directory: Path, *args: str, port: int | None = None) -> Iterator[RecordingSink]:
    """`tachymail sink 127.0.0.1:PORT --procs 1 --record DIRECTORY/sink-PORT.jsonl ARGS`.

    Stopped by PID on exit, also when the test fails; ``stop()`` earlier to read a
    complete record (the close events of connections still open come at exit).
    Pass ``--procs N`` in *args* to override the single process.
    """
    port = port or free_port()
    record = directory / f"sink-{port}.jsonl"
    stderr_path = directory / f"sink-{port}.err"
    procs = [] if "--procs" in args else ["--procs", "1"]
    with stderr_path.open("w") as stderr:
        proc = subprocess.Popen(
            [
                *tachymail_cmd(),
                "sink",
                f"127.0.0.1:{port}",
                *procs,
                "--json",
                "--record",
                str(record),
                *args,
            ],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            start_new_session=True,
        )
    running = RecordingSink(proc, port, record, stderr_path)
    try:
        try:
            wait_listening(port, proc=proc)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}: {stderr_path.read_text()}") from None
        yield running
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
