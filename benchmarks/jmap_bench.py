"""The webmail's first page side by side: Tachymail's JMAP against Dovecot's IMAP, same
messages, same run.

    flock /tmp/bench.lock .venv/bin/python benchmarks/jmap_bench.py [--messages 100000]
        [--sizes 500,10000,100000] [--repeat 3] [--block 10] [--clients 16] [--seconds 10]
        [--quick]

Both servers hold the same INBOX of --messages generated messages (imap_bench's generator:
1-4 KiB, plain, alternative and mixed with an attachment), put there before the clock starts
(Tachymail by ``tachymail mailbox import``, Dovecot from its Maildir, indexed at an untimed
warm-up). One page is:

- Tachymail: one ``POST /jmap/api`` with ``Email/query`` (inMailbox INBOX, receivedAt
  descending, limit 50) and ``Email/get`` of its ids by result reference, with the list
  properties (id, threadId, mailboxIds, keywords, size, receivedAt, from, subject,
  preview, hasAttachment);
- Dovecot: ``SORT (REVERSE ARRIVAL) UTF-8 ALL`` then ``FETCH`` of the first 50 with
  ``(UID FLAGS RFC822.SIZE INTERNALDATE ENVELOPE)`` on a selected INBOX.

Cells: ``page`` (one client: the median of --repeat blocks of --block pages one after the
other, per page, after an untimed warm-up page, a pause for the servers' background work,
and an untimed page that wakes the machine from that pause; CPU: the server's over those
pages, per page) and
``page-16`` (--clients clients doing pages in a loop for --seconds: pages per second and
the server's CPU-seconds per page, its whole process tree). The issue's target: the page
at least 2x faster than Dovecot's. ``--sizes`` runs several INBOX sizes one after the other
(both servers anew for each) and ends with a table of one row per size: the fixed cost of a
request is what small mailboxes feel. Writes benchmarks/results/jmap.json. Needs root and
dovecot-core, dovecot-imapd.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import re
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import orjson

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

import peers  # noqa: E402
from dovecot import dovecot_unavailable  # noqa: E402
from imap_bench import PASSWORD, USER, Client, Side, dovecot, tachymail, write_maildir  # noqa: E402

LIST_PROPERTIES = [
    "id", "threadId", "mailboxIds", "keywords", "size", "receivedAt", "from", "subject",
    "preview", "hasAttachment",
]  # fmt: skip
TARGET = 2.0


_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)


class HttpConnection:
    """One keep-alive HTTP/1.1 connection, as lean as imap_bench's IMAP Client: a request
    is sent whole, a response read by its Content-Length (http.client's header parsing
    would cost the client more than the server's page)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=600)
        self.buf = bytearray()

    def _fill(self) -> None:
        data = self.sock.recv(1 << 20)
        if not data:
            raise ConnectionError("server closed the connection")
        self.buf += data

    def request(
        self, method: str, path: str, headers: dict[str, str], body: bytes = b""
    ) -> tuple[int, bytes]:
        """(status, body) of one request."""
        fields = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{fields}"
        self.sock.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
        while (end := self.buf.find(b"\r\n\r\n")) < 0:
            self._fill()
        header = bytes(self.buf[: end + 4])
        del self.buf[: end + 4]
        length = _CONTENT_LENGTH.search(header)
        if length is None:
            raise RuntimeError(f"no Content-Length: {header[:200]!r}")
        size = int(length.group(1))
        while len(self.buf) < size:
            self._fill()
        data = bytes(self.buf[:size])
        del self.buf[:size]
        return int(header.split(b" ", 2)[1]), data


class JmapPage:
    """One keep-alive HTTP connection doing the page request."""

    def __init__(self, port: int) -> None:
        self.conn = HttpConnection(port)
        token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        self.headers = {"Authorization": f"Basic {token}", "Content-Type": "application/json"}
        session = self._get("/.well-known/jmap")
        self.account = session["primaryAccounts"]["urn:ietf:params:jmap:mail"]
        reply = self._post(
            {
                "using": ["urn:ietf:params:jmap:core", "urn:ietf:params:jmap:mail"],
                "methodCalls": [["Mailbox/get", {"accountId": self.account}, "0"]],
            }
        )
        inbox = next(b for b in reply["methodResponses"][0][1]["list"] if b["role"] == "inbox")
        self.body = json.dumps(
            {
                "using": ["urn:ietf:params:jmap:core", "urn:ietf:params:jmap:mail"],
                "methodCalls": [
                    [
                        "Email/query",
                        {
                            "accountId": self.account,
                            "filter": {"inMailbox": inbox["id"]},
                            "sort": [{"property": "receivedAt", "isAscending": False}],
                            "limit": 50,
                        },
                        "q",
                    ],
                    [
                        "Email/get",
                        {
                            "accountId": self.account,
                            "#ids": {"resultOf": "q", "name": "Email/query", "path": "/ids"},
                            "properties": LIST_PROPERTIES,
                        },
                        "g",
                    ],
                ],
            }
        ).encode()

    def _get(self, path: str) -> dict[str, object]:
        status, data = self.conn.request("GET", path, self.headers)
        if status != 200:
            raise RuntimeError(f"GET {path}: {status} {data[:200]!r}")
        found: dict[str, object] = orjson.loads(data)
        return found

    def _post(self, body: object) -> dict[str, object]:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        status, data = self.conn.request("POST", "/jmap/api", self.headers, raw)
        if status != 200:
            raise RuntimeError(f"POST: {status} {data[:200]!r}")
        found: dict[str, object] = orjson.loads(data)
        return found

    def page(self) -> int:
        reply = self._post(self.body)
        responses = reply["methodResponses"]
        assert isinstance(responses, list)
        got = responses[1]
        if got[0] != "Email/get":
            raise RuntimeError(f"page: {got!r}")
        return len(got[1]["list"])


class ImapPage:
    """One IMAP session with the INBOX selected doing the page commands."""

    def __init__(self, port: int) -> None:
        self.client = Client(port)
        self.client.ok(f'LOGIN "{USER}" "{PASSWORD}"')
        self.client.ok("SELECT INBOX")

    def page(self) -> int:
        _received, head = self.client.ok("SORT (REVERSE ARRIVAL) UTF-8 ALL")
        match = re.search(rb"\* SORT((?: \d+){0,50})", head)
        numbers = match.group(1).split() if match else []
        if not numbers:
            raise RuntimeError(f"SORT: {head[:200]!r}")
        wanted = ",".join(n.decode() for n in numbers[:50])
        _received, head = self.client.ok(
            f"FETCH {wanted} (UID FLAGS RFC822.SIZE INTERNALDATE ENVELOPE)"
        )
        return len(numbers[:50])


def measure(
    side: Side, make: Callable[[int], JmapPage | ImapPage], p: argparse.Namespace
) -> dict[str, dict[str, float]]:
    one = make(side.port)
    if one.page() != 50:  # the warm-up: Dovecot's index and caches, Tachymail's snapshot
        raise RuntimeError("the page does not have 50 messages")
    time.sleep(2.0)
    # one more page, not timed: the first request after an idle pause pays for waking the
    # machine up (5-10 ms on this VM, for Dovecot as for Tachymail), not for the page
    one.page()
    walls = []
    # blocks of pages back to back: reading the process tree's CPU between pages (a walk
    # of /proc) would leave the servers idle long enough to pay the wake-up again, and a
    # sub-millisecond page alone is mostly noise
    cpu = peers.tree_cpu_seconds(side.root)
    for _ in range(p.repeat):
        start = time.perf_counter()
        for _ in range(p.block):
            one.page()
        walls.append((time.perf_counter() - start) / p.block)
    cpu = (peers.tree_cpu_seconds(side.root) - cpu) / (p.repeat * p.block)
    cells = {"page": {"seconds": statistics.median(walls), "cpu": cpu}}
    clients = [make(side.port) for _ in range(p.clients)]
    for client in clients:
        client.page()
    done = [0] * len(clients)
    until = time.monotonic() + p.seconds

    def loop(index: int) -> None:
        while time.monotonic() < until:
            clients[index].page()
            done[index] += 1

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(len(clients))]
    cpu = peers.tree_cpu_seconds(side.root)
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    total = max(sum(done), 1)
    cells["page-16"] = {
        "rate": total / wall,
        "cpu": (peers.tree_cpu_seconds(side.root) - cpu) / total,
        "seconds": wall,
    }
    return cells


def table(results: dict[str, dict[str, dict[str, float]]], clients: int) -> str:
    dove, tachy = results["dovecot"], results["tachymail"]
    d, t = dove["page"], tachy["page"]
    d16, t16 = dove["page-16"], tachy["page-16"]
    return "\n".join(
        [
            "| cell | Dovecot IMAP | Tachymail JMAP | ratio | target "
            "| CPU-s/page Dovecot | Tachymail |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
            f"| page (SORT+FETCH 50 / query+get 50) | {d['seconds'] * 1000:.1f} ms | "
            f"{t['seconds'] * 1000:.1f} ms | {d['seconds'] / t['seconds']:.2f}x | {TARGET:g}x | "
            f"{d['cpu']:.4f} | {t['cpu']:.4f} |",
            f"| pages/s, {clients} clients in a loop | {d16['rate']:,.0f}/s | "
            f"{t16['rate']:,.0f}/s | {t16['rate'] / d16['rate']:.2f}x | | "
            f"{d16['cpu']:.4f} | {t16['cpu']:.4f} |",
        ]
    )


def sweep_table(by_size: dict[int, dict[str, dict[str, dict[str, float]]]], clients: int) -> str:
    """One row per mailbox size: the page (median wall time) and the loop of *clients*
    (pages per second, server CPU per page), Dovecot against Tachymail."""
    lines = [
        "| messages | page Dovecot | page Tachymail | ratio "
        f"| {clients} clients Dovecot | Tachymail | ratio | CPU/page Dovecot | Tachymail |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for size, results in by_size.items():
        d, t = results["dovecot"], results["tachymail"]
        d16, t16 = d["page-16"], t["page-16"]
        lines.append(
            f"| {size:,} | {d['page']['seconds'] * 1000:.1f} ms | "
            f"{t['page']['seconds'] * 1000:.1f} ms | "
            f"{d['page']['seconds'] / t['page']['seconds']:.2f}x | "
            f"{d16['rate']:,.0f}/s | {t16['rate']:,.0f}/s | {t16['rate'] / d16['rate']:.2f}x | "
            f"{d16['cpu'] * 1000:.2f} ms | {t16['cpu'] * 1000:.2f} ms |"
        )
    return "\n".join(lines)


def run_size(
    size: int, maildir: Path, tmp: Path, p: argparse.Namespace
) -> dict[str, dict[str, dict[str, float]]]:
    """Both servers on the same *size*-message INBOX (generated into *maildir* unless it
    holds that many already), measured one after the other."""
    stamp = maildir / f".generated-{size}-0"
    if not stamp.exists():
        if maildir.exists():
            shutil.rmtree(maildir)
        write_maildir(maildir, size, 0)
        stamp.touch()
    results: dict[str, dict[str, dict[str, float]]] = {}
    with dovecot(maildir) as side:
        results["dovecot"] = measure(side, ImapPage, p)
        print(size, "dovecot", json.dumps(results["dovecot"]), flush=True)
    work = tmp / f"tachymail-{size}"
    work.mkdir()
    with tachymail(work, maildir, role="http") as side:
        results["tachymail"] = measure(side, JmapPage, p)
        print(size, "tachymail", json.dumps(results["tachymail"]), flush=True)
    print(table(results, p.clients), flush=True)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument(
        "--sizes",
        default="",
        help="comma-separated INBOX sizes to run one after the other (instead of --messages), "
        "e.g. 500,10000,100000; a table row each",
    )
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--block", type=int, default=10, help="pages per timed block")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--quick", action="store_true", help="10,000 messages, 3 s")
    parser.add_argument(
        "--maildir",
        help="keep the generated messages here ({n} in it: the size, for --sizes)",
    )
    parser.add_argument("--out", default=str(HERE / "results" / "jmap.json"))
    p = parser.parse_args()
    if p.quick:
        p.messages, p.seconds = 10_000, 3.0
    sizes = [int(size) for size in p.sizes.split(",")] if p.sizes else [p.messages]
    why = dovecot_unavailable()
    if why:
        print(f"jmap_bench: {why}", file=sys.stderr)
        return 2
    by_size: dict[int, dict[str, dict[str, dict[str, float]]]] = {}
    with tempfile.TemporaryDirectory(prefix="jmap-bench-") as tmp:
        for size in sizes:
            if p.maildir:
                maildir = Path(p.maildir.replace("{n}", str(size)))
                if len(sizes) > 1 and "{n}" not in p.maildir:
                    maildir = maildir / str(size)
            else:
                maildir = Path(tmp) / f"Maildir-{size}"
            by_size[size] = run_size(size, maildir, Path(tmp), p)
    if len(sizes) > 1:
        print(sweep_table(by_size, p.clients))
    record = {
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
        "params": {k: str(v) if isinstance(v, Path) else v for k, v in vars(p).items()},
        # one size: the results as before; several: by size
        "results": by_size[sizes[0]]
        if len(sizes) == 1
        else {str(k): v for k, v in by_size.items()},
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    Path(p.out).parent.mkdir(parents=True, exist_ok=True)
    Path(p.out).write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
