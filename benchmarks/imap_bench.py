"""IMAP side by side: Tachymail's ``imap`` listener against Dovecot's imap, same messages,
same client, same run.

    .venv/bin/python benchmarks/imap_bench.py [--messages 100000] [--search-messages 10000]
        [--repeat 3] [--clients 16] [--seconds 10] [--quick]

Both servers hold the same mail, put there before the clock starts: an INBOX of --messages
generated messages (1-4 KiB; plain text, multipart/alternative, and multipart/mixed with an
attachment) and a mailbox ``Search`` of --search-messages messages, 1 in 100 of which
carries the word SEARCH_WORD in its body (plain, quoted-printable or base64, so a TEXT
search must decode to find them all). Tachymail gets them with ``tachymail mailbox import``
(its Maildir import, into the store); Dovecot finds the same files in its Maildir and indexes
them at a warm-up SELECT and FETCH that is not timed. Each side then answers, through one
minimal client of this script (it reads responses with a regular expression and skips
literals; it does not parse them):

- select: ``SELECT INBOX`` of the big mailbox (median of --repeat, on one logged-in session);
- fetch-flags: ``FETCH 1:* (UID FLAGS RFC822.SIZE)`` of the INBOX;
- fetch-bodystructure: ``FETCH 1:* (BODYSTRUCTURE)`` of the INBOX;
- search-text: ``UID SEARCH TEXT <word>`` in ``Search`` (the match counts must agree);
- fetch-random: --clients sessions, logged in and with the INBOX selected before the clock
  starts, each fetching ``UID FETCH n BODY.PEEK[]`` of random messages one after another for
  --seconds: fetches per second.

Reported per line: the median time (or rate), the server's CPU-seconds per operation (its
whole process tree, from /proc: Dovecot's master, imap and auth processes; Tachymail's
supervisor and workers), and the ratio Dovecot/Tachymail (above 1: Tachymail is faster).
The issue's target: faster than Dovecot on every line, 2x on the FETCH lines. Writes
benchmarks/results/imap.json. Needs root and dovecot-core, dovecot-imapd.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

import peers  # noqa: E402
from dovecot import dovecot_unavailable, start_dovecot  # noqa: E402

USER = "bench@example.test"
PASSWORD = "bench-password"
SEARCH_WORD = "zanzibar"
TARGETS = {
    "select": 1.0,
    "fetch-flags": 2.0,
    "fetch-bodystructure": 2.0,
    "search-text": 1.0,
    "fetch-random": 2.0,
}
WORDS = [
    "mail",
    "server",
    "queue",
    "relay",
    "message",
    "delivery",
    "mailbox",
    "folder",
    "client",
    "header",
    "body",
    "part",
    "report",
    "invoice",
    "meeting",
    "project",
    "weekly",
    "update",
    "question",
    "answer",
    "ticket",
    "release",
]


# --- the messages ---------------------------------------------------------------------------


def make_message(rng: random.Random, n: int, *, search: bool = False) -> bytes:
    """One generated message (CRLF), about 1-4 KiB; with *search*, 1 in 100 carry
    SEARCH_WORD in a body part, encoded one of three ways."""
    msg = EmailMessage()
    msg["From"] = f"Sender {n % 97} <sender{n % 97}@example.org>"
    msg["To"] = USER
    msg["Subject"] = " ".join(rng.choice(WORDS) for _ in range(5)) + f" #{n}"
    msg["Date"] = format_datetime(datetime.fromtimestamp(1_700_000_000 + n * 60, UTC))
    msg["Message-ID"] = f"<bench-{n}@example.org>"
    lines = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(rng.randint(10, 50))]
    hit = search and n % 100 == 7
    if hit:
        lines.insert(len(lines) // 2, f"the word {SEARCH_WORD.capitalize()} is in here")
    text = "\n".join(lines) + "\n"
    kind = n % 10
    encoding = ("7bit", "quoted-printable", "base64")[n % 3] if hit else "7bit"
    if kind < 7:
        msg.set_content(text, cte=encoding)
    elif kind < 9:
        msg.set_content(text, cte=encoding)
        msg.add_alternative(f"<html><body><pre>{text}</pre></body></html>", subtype="html")
    else:
        msg.set_content(text, cte=encoding)
        msg.add_attachment(
            rng.randbytes(700), maintype="application", subtype="octet-stream", filename="a.bin"
        )
    return msg.as_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def write_maildir(root: Path, inbox: int, search: int) -> None:
    """A Maildir++ with the INBOX and the .Search folder, files in cur/ with LF line ends
    (the Maildir convention) and Dovecot's S= and W= sizes in their names."""
    rng = random.Random(20261201)
    for folder, count, searchable in ((root, inbox, False), (root / ".Search", search, True)):
        for sub in ("cur", "new", "tmp"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        stamp = 1_700_000_000
        for n in range(count):
            crlf = make_message(rng, n, search=searchable)
            lf = crlf.replace(b"\r\n", b"\n")
            name = f"{stamp + n}.M{n}P1.bench,S={len(lf)},W={len(crlf)}:2,"
            (folder / "cur" / name).write_bytes(lf)
            os.utime(folder / "cur" / name, (stamp + n, stamp + n))


# --- a minimal client -----------------------------------------------------------------------


class Client:
    """One IMAP connection: commands are sent whole; :meth:`run` reads until the tagged
    line and returns it with the octets received (literals are skipped, not parsed)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=600)
        self.buf = bytearray()
        self.tags = 0
        self._read_line()  # the greeting

    def _read_line(self) -> bytes:
        while b"\r\n" not in self.buf:
            self._fill()
        end = self.buf.index(b"\r\n") + 2
        line = bytes(self.buf[:end])
        del self.buf[:end]
        return line

    def _fill(self) -> None:
        data = self.sock.recv(1 << 20)
        if not data:
            raise ConnectionError("server closed the connection")
        self.buf += data

    def run(self, command: str) -> tuple[bytes, int, bytes]:
        """Send *command*; (the tagged line, octets received, the untagged text up to 4 KiB)."""
        self.tags += 1
        tag = b"b%d" % self.tags
        self.sock.sendall(tag + b" " + command.encode() + b"\r\n")
        pattern = re.compile(rb"\{(\d+)\}\r\n|(?:\A|\n)(" + tag + rb" [^\r\n]*)\r\n")
        pos = 0
        received = 0
        head = b""
        while True:
            match = pattern.search(self.buf, pos)
            if match is None:
                pos = max(pos, len(self.buf) - 40)
                if pos > 1 << 20:  # keep the buffer small: what is before pos is read
                    if len(head) < 4096:
                        head += bytes(self.buf[: 4096 - len(head)])
                    received += pos
                    del self.buf[:pos]
                    pos = 0
                self._fill()
                continue
            if match.group(1) is not None:
                pos = match.end() + int(match.group(1))
                while len(self.buf) < pos:
                    self._fill()
                continue
            end = match.end()
            if len(head) < 4096:
                head += bytes(self.buf[: min(end, 4096 - len(head))])
            received += end
            line = match.group(2)
            del self.buf[:end]
            return line, received, head

    def ok(self, command: str) -> tuple[int, bytes]:
        line, received, head = self.run(command)
        if line.split(b" ", 2)[1] != b"OK":
            raise RuntimeError(f"{command!r}: {line!r}")
        return received, head

    def close(self) -> None:
        with suppress(OSError):
            self.run("LOGOUT")
        self.sock.close()


class RandomFetcher:
    """One session fetching ``UID FETCH n BODY.PEEK[]`` of random UIDs, one after another."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.done = 0

    async def open(self, port: int) -> None:
        """Connect, LOGIN and SELECT INBOX (not timed: the cell measures fetches)."""
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", port)
        await self.reader.readline()
        self.writer.write(f'a LOGIN "{USER}" "{PASSWORD}"\r\na SELECT INBOX\r\n'.encode())
        for _ in range(2):
            while not (line := await self.reader.readline()).startswith(b"a "):
                if not line:
                    raise ConnectionError("the server closed the connection at login")

    async def fetch_until(self, uids: int, until: float) -> None:
        reader, writer = self.reader, self.writer
        while time.monotonic() < until:
            writer.write(b"f UID FETCH %d BODY.PEEK[]\r\n" % self.rng.randint(1, uids))
            while True:
                line = await reader.readline()
                if not line:
                    raise ConnectionError("the server closed the connection")
                if line.endswith(b"}\r\n"):
                    await reader.readexactly(int(line[line.rindex(b"{") + 1 : -3]))
                elif line.startswith(b"f "):
                    if not line.startswith(b"f OK"):
                        raise RuntimeError(line)
                    break
            self.done += 1
        writer.write(b"z LOGOUT\r\n")
        writer.close()


# --- the servers ----------------------------------------------------------------------------


@dataclass
class Side:
    name: str
    port: int
    root: int  # the process tree whose CPU is the server's
    stop: Callable[[], None]


@contextmanager
def tachymail(work: Path, maildir: Path) -> Iterator[Side]:
    binary = Path(sys.executable).with_name("tachymail")
    data = work / "tachymail-data"
    users = work / "users"
    port = peers.free_port()
    config = work / "tachymail.toml"
    config.write_text(
        f'[server]\nhostname = "tachymail.bench.test"\ndata_dir = "{data}"\n\n'
        f'[[listener]]\naddress = "127.0.0.1:{port}"\nrole = "imap"\n\n'
        '[policy]\nlocal_domains = ["example.test"]\n\n'
        f'[auth]\nusers_file = "{users}"\n\n[imap]\nplaintext_auth = true\n\n'
        '[delivery]\nresolver = "127.0.0.1:9"\n\n[metrics]\naddress = ""\n'
    )
    run = {"capture_output": True, "text": True, "timeout": 3600, "check": True}
    subprocess.run(
        [str(binary), "user", "add", "-c", str(config), "--password-stdin", USER],
        input=PASSWORD + "\n",
        **run,  # type: ignore[arg-type]
    )
    subprocess.run(
        [str(binary), "mailbox", "import", "-c", str(config), USER, str(maildir)],
        **run,  # type: ignore[arg-type]
    )
    log = open(work / "tachymail.log", "ab")  # noqa: SIM115 - kept open by the child
    proc = subprocess.Popen(
        [str(binary), "--log-level", "WARNING", "serve", "-c", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    log.close()
    peer = peers.Peer("tachymail", port, proc.pid, proc=proc)
    try:
        peers.wait_port(port)
        yield Side("tachymail", port, proc.pid, peer.stop)
    finally:
        peer.stop()


@contextmanager
def dovecot(maildir: Path) -> Iterator[Side]:
    # the 16 fetching sessions are one user from one address: Dovecot allows 10 by default
    server = start_dovecot(
        {USER: PASSWORD}, extra="protocol imap {\n  mail_max_userip_connections = 1000\n}\n"
    )
    try:
        target = server.maildir(USER)
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(maildir, target)
        for path in [target, *target.rglob("*")]:
            shutil.chown(path, "mail", "mail")
        yield Side("dovecot", server.ports["imap"], server.pid, server.stop)
    finally:
        server.stop()


# --- the cells ------------------------------------------------------------------------------


def timed(side: Side, work: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, server CPU-seconds) of *work*."""
    cpu = peers.tree_cpu_seconds(side.root)
    start = time.perf_counter()
    work()
    wall = time.perf_counter() - start
    return wall, peers.tree_cpu_seconds(side.root) - cpu


def measure(side: Side, p: argparse.Namespace) -> dict[str, dict[str, float]]:
    client = Client(side.port)
    client.ok(f'LOGIN "{USER}" "{PASSWORD}"')
    # warm-up, not timed: Dovecot builds its index and caches here, Tachymail opens its store
    client.ok("SELECT INBOX")
    client.ok("FETCH 1:* (UID FLAGS RFC822.SIZE BODYSTRUCTURE)")
    client.ok("SELECT Search")
    client.ok(f"UID SEARCH TEXT {SEARCH_WORD}")
    cells: dict[str, dict[str, float]] = {}

    def repeat(name: str, command: str, before: str | None = None) -> bytes:
        walls, cpus, head = [], [], b""
        for _ in range(p.repeat):
            if before:
                client.ok(before)
            replies: list[bytes] = []

            def once(replies: list[bytes] = replies) -> None:
                replies.append(client.ok(command)[1])

            wall, cpu = timed(side, once)
            walls.append(wall)
            cpus.append(cpu)
            head = replies[0]
        cells[name] = {"seconds": statistics.median(walls), "cpu": statistics.median(cpus)}
        return head

    repeat("select", "SELECT INBOX", before="UNSELECT")
    repeat("fetch-flags", "FETCH 1:* (UID FLAGS RFC822.SIZE)")
    repeat("fetch-bodystructure", "FETCH 1:* (BODYSTRUCTURE)")
    found = repeat("search-text", f"UID SEARCH TEXT {SEARCH_WORD}", before="SELECT Search")
    match = re.search(rb"\* (?:E?SEARCH)[^\r\n]*", found)
    cells["search-text"]["found"] = float(len(_numbers(match.group(0) if match else b"")))
    client.close()

    cells["fetch-random"] = asyncio.run(fetch_random(side, p))
    return cells


async def fetch_random(side: Side, p: argparse.Namespace) -> dict[str, float]:
    """--clients sessions log in and select first; then the clock runs for --seconds."""
    fetchers = [RandomFetcher(seed) for seed in range(p.clients)]
    await asyncio.gather(*(f.open(side.port) for f in fetchers))
    cpu = peers.tree_cpu_seconds(side.root)
    start = time.perf_counter()
    until = time.monotonic() + p.seconds
    await asyncio.gather(*(f.fetch_until(p.messages, until) for f in fetchers))
    wall = time.perf_counter() - start
    total = max(sum(f.done for f in fetchers), 1)
    used = peers.tree_cpu_seconds(side.root) - cpu
    return {"rate": total / wall, "cpu": used / total, "seconds": wall}


def _numbers(line: bytes) -> list[int]:
    """The numbers a SEARCH or ESEARCH ALL line lists (ranges expanded)."""
    found: list[int] = []
    words = line.split()
    if line.startswith(b"* ESEARCH"):
        words = words[words.index(b"ALL") + 1 :][:1] if b"ALL" in words else []
        words = [w for part in words for w in part.split(b",")]
    else:
        words = words[2:]
    for word in words:
        low, _, high = word.partition(b":")
        if low.isdigit():
            found.extend(range(int(low), int(high or low) + 1))
    return found


def table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    rows = [
        "| operation | Dovecot | Tachymail | ratio | target | CPU-s/op Dovecot | Tachymail |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    dove, tachy = results["dovecot"], results["tachymail"]
    for name, target in TARGETS.items():
        d, t = dove.get(name), tachy.get(name)
        if d is None or t is None:
            continue
        if name == "fetch-random":
            show = (f"{d['rate']:,.0f}/s", f"{t['rate']:,.0f}/s")
            ratio = t["rate"] / d["rate"]
        else:
            show = (f"{d['seconds'] * 1000:,.1f} ms", f"{t['seconds'] * 1000:,.1f} ms")
            ratio = d["seconds"] / t["seconds"]
        rows.append(
            f"| {name} | {show[0]} | {show[1]} | {ratio:.2f}x | {target:g}x | "
            f"{d['cpu']:.4f} | {t['cpu']:.4f} |"
        )
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--search-messages", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--quick", action="store_true", help="10,000 and 2,000 messages, 3 s")
    parser.add_argument(
        "--maildir", type=Path, help="keep the generated messages here and reuse them next time"
    )
    parser.add_argument(
        "--sides", default="dovecot,tachymail", help="which servers to run (comma-separated)"
    )
    parser.add_argument("--out", default=str(HERE / "results" / "imap.json"))
    p = parser.parse_args()
    if p.quick:
        p.messages, p.search_messages, p.seconds = 10_000, 2_000, 3.0
    why = dovecot_unavailable()
    if why:
        print(f"imap_bench: {why}", file=sys.stderr)
        return 2
    results: dict[str, dict[str, dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="imap-bench-") as tmp:
        maildir = p.maildir or Path(tmp) / "Maildir"
        started = time.perf_counter()
        stamp = maildir / f".generated-{p.messages}-{p.search_messages}"
        if not stamp.exists():
            if maildir.exists():
                shutil.rmtree(maildir)
            write_maildir(maildir, p.messages, p.search_messages)
            stamp.touch()
        print(
            f"generated {p.messages + p.search_messages} messages in "
            f"{time.perf_counter() - started:.0f} s",
            flush=True,
        )
        sides = p.sides.split(",")
        if "dovecot" in sides:
            with dovecot(maildir) as side:
                results["dovecot"] = measure(side, p)
                print("dovecot", json.dumps(results["dovecot"]), flush=True)
        if "tachymail" in sides:
            work = Path(tmp) / "tachymail"
            work.mkdir()
            with tachymail(work, maildir) as side:
                results["tachymail"] = measure(side, p)
                print("tachymail", json.dumps(results["tachymail"]), flush=True)
        if len(results) < 2:
            return 0
    found = {side: cells["search-text"].get("found") for side, cells in results.items()}
    if len(set(found.values())) != 1:
        print(f"warning: the TEXT searches found different counts: {found}", file=sys.stderr)
    print(table(results))
    record = {
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
        "params": {k: str(v) if isinstance(v, Path) else v for k, v in vars(p).items()},
        "results": results,
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    Path(p.out).parent.mkdir(parents=True, exist_ok=True)
    Path(p.out).write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
