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
minimal client of this script (it finds the tagged line with bytes.find and skips literals;
it does not parse the responses, and costs far less CPU than either server per octet):

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
The random-fetch cell also records the client's own CPU per fetch (``client_cpu`` in the
JSON): on a small machine the client and the server share the cores.
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
from typing import cast

import uvloop

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
    "fetch-random-pipelined": 2.0,
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


def scan_tagged(buf: bytearray, pos: int, tagged: bytes) -> tuple[int, int]:
    """Look in *buf* (which starts at the start of a response line) from *pos* for the line
    that starts with ``tagged[1:]`` (*tagged* is LF, the tag and a space), skipping literals.

    (start, end) of that line, CRLF included, when it is complete; else (pos, 0): scan again
    from pos once more octets arrived (pos may be past the end while a literal arrives).
    bytes.find does the work (memchr speed, not a regular expression per octet): the
    client must cost far less than either server per octet received."""
    while True:
        if pos > len(buf):
            return pos, 0
        if pos == 0 and buf.startswith(tagged[1:]):
            found = 0
        else:
            found = buf.find(tagged, max(pos - 1, 0))
            found = found + 1 if found >= 0 else -1
        literal = buf.find(b"}\r\n", pos, found if found >= 0 else len(buf))
        if literal >= 0:
            start = buf.rfind(b"{", max(0, literal - 24), literal)  # {n} is on one line
            if start >= 0 and buf[start + 1 : literal].isdigit():
                pos = literal + 3 + int(buf[start + 1 : literal])
            else:
                pos = literal + 1
            continue
        if found >= 0:
            end = buf.find(b"\r\n", found)
            return found, (end + 2 if end >= 0 else 0)
        return max(pos, len(buf) - len(tagged)), 0


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
        tagged = b"\n" + tag + b" "
        buf = self.buf
        pos = 0
        received = 0
        head = b""
        while True:
            pos, end = scan_tagged(buf, pos, tagged)
            if end:
                if len(head) < 4096:
                    head += bytes(buf[: min(end, 4096 - len(head))])
                received += end
                line = bytes(buf[pos : end - 2])
                del buf[:end]
                return line, received, head
            if pos > 1 << 20:  # keep the buffer small: what is before pos is read
                cut = min(pos, len(buf))
                cut = buf.rfind(b"\n", 0, cut) + 1  # from a line start: scanning goes on
                if len(head) < 4096:
                    head += bytes(buf[: min(cut, 4096 - len(head))])
                received += cut
                del buf[:cut]
                pos -= cut
            self._fill()

    def ok(self, command: str) -> tuple[int, bytes]:
        line, received, head = self.run(command)
        if line.split(b" ", 2)[1] != b"OK":
            raise RuntimeError(f"{command!r}: {line!r}")
        return received, head

    def close(self) -> None:
        with suppress(OSError):
            self.run("LOGOUT")
        self.sock.close()


class RandomFetcher(asyncio.Protocol):
    """One session fetching ``UID FETCH n BODY.PEEK[]`` of random UIDs, one after another.

    A bare asyncio.Protocol scanning with bytes.find (:func:`scan_tagged`): a StreamReader
    with a readline per response line cost the client more CPU per fetch than Tachymail's
    server spent, on a machine whose cores the servers need."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.done = 0
        self.buf = bytearray()
        self.pos = 0
        self.tagged = b""
        self.waiter: asyncio.Future[bytes] | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        waiter = self.waiter
        if waiter is None or waiter.done():
            return
        self.pos, end = scan_tagged(buf, self.pos, self.tagged)
        if end:
            line = bytes(buf[self.pos : end])
            del buf[:end]
            self.pos = 0
            waiter.set_result(line)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("the server closed the connection"))

    def _expect(self, tag: bytes) -> asyncio.Future[bytes]:
        self.tagged = b"\n" + tag + b" "
        self.waiter = asyncio.get_running_loop().create_future()
        if self.buf:
            self.data_received(b"")
        return self.waiter

    async def open(self, port: int) -> None:
        """Connect, LOGIN and SELECT INBOX (not timed: the cell measures fetches)."""
        loop = asyncio.get_running_loop()
        await loop.create_connection(lambda: self, "127.0.0.1", port)
        assert self.transport is not None
        self.transport.write(f'a LOGIN "{USER}" "{PASSWORD}"\r\n'.encode())
        await self._expect(b"a")
        self.transport.write(b"s SELECT INBOX\r\n")
        if not (await self._expect(b"s")).startswith(b"s OK"):
            raise RuntimeError("SELECT failed")

    async def fetch_until(self, uids: int, until: float, depth: int = 1) -> None:
        """Fetch until *until*; *depth* commands are sent at once (RFC 9051 §5.5 lets a
        client send its next commands before the answers, as mbsync and other
        synchronising clients do) and all their answers awaited before the next batch."""
        transport = self.transport
        assert transport is not None
        tags = [b"f%d" % n for n in range(depth)]
        while time.monotonic() < until:
            transport.write(
                b"".join(
                    b"%s UID FETCH %d BODY.PEEK[]\r\n" % (tag, self.rng.randint(1, uids))
                    for tag in tags
                )
            )
            for tag in tags:
                line = await self._expect(tag)
                if not line.startswith(tag + b" OK"):
                    raise RuntimeError(line)
                self.done += 1
        transport.write(b"z LOGOUT\r\n")
        transport.close()


# --- the servers ----------------------------------------------------------------------------


@dataclass
class Side:
    name: str
    port: int
    root: int  # the process tree whose CPU is the server's
    stop: Callable[[], None]


@contextmanager
def tachymail(work: Path, maildir: Path, role: str = "imap", workers: int = 0) -> Iterator[Side]:
    """A tachymail serving the user's imported *maildir* on one listener of *role* (imap,
    or http for the JMAP benchmark) with *workers* SMTP worker processes (0: the default
    layout), stopped by PID afterwards."""
    binary = Path(sys.executable).with_name("tachymail")
    data = work / "tachymail-data"
    users = work / "users"
    port = peers.free_port()
    config = work / "tachymail.toml"
    config.write_text(
        f'[server]\nhostname = "tachymail.bench.test"\ndata_dir = "{data}"\nworkers = {workers}\n\n'
        f'[[listener]]\naddress = "127.0.0.1:{port}"\nrole = "{role}"\n\n'
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
    # both servers finish in the background what the warm-up started (Dovecot its index and
    # cache files, Tachymail its kept renderings) before any clock runs
    time.sleep(3.0)
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

    # uvloop, as the server's workers use: the client's share of the cores stays small
    cells["fetch-random"] = uvloop.run(fetch_random(side, p))
    if p.pipeline > 1:
        cells["fetch-random-pipelined"] = uvloop.run(fetch_random(side, p, p.pipeline))
    return cells


async def fetch_random(side: Side, p: argparse.Namespace, depth: int = 1) -> dict[str, float]:
    """--clients sessions log in and select first; then the clock runs for --seconds, each
    session with *depth* commands in flight."""
    fetchers = [RandomFetcher(seed) for seed in range(p.clients)]
    await asyncio.gather(*(f.open(side.port) for f in fetchers))
    cpu = peers.tree_cpu_seconds(side.root)
    client = time.process_time()
    start = time.perf_counter()
    until = time.monotonic() + p.seconds
    await asyncio.gather(*(f.fetch_until(p.messages, until, depth) for f in fetchers))
    wall = time.perf_counter() - start
    total = max(sum(f.done for f in fetchers), 1)
    used = peers.tree_cpu_seconds(side.root) - cpu
    # the client's CPU too: on a small machine the servers and the client share the cores
    client_cpu = (time.process_time() - client) / total
    return {"rate": total / wall, "cpu": used / total, "client_cpu": client_cpu, "seconds": wall}


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
        if name.startswith("fetch-random"):
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
    parser.add_argument(
        "--pipeline",
        type=int,
        default=8,
        help="commands each random-fetch session keeps in flight in the pipelined cell "
        "(1: no pipelined cell)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=0,
        help="tachymail's worker processes (0: its default layout, one SMTP worker beside "
        "the delivery worker on 2 cores)",
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
            with tachymail(work, maildir, workers=p.workers) as side:
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
