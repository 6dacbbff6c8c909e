"""The webmail's first page side by side: Tachymail's JMAP against Dovecot's IMAP, same
messages, same run.

    flock /tmp/bench.lock .venv/bin/python benchmarks/jmap_bench.py [--messages 100000]
        [--repeat 3] [--clients 16] [--seconds 10] [--quick]

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

Cells: ``page`` (one client, median of --repeat, after an untimed warm-up page) and
``page-16`` (--clients clients doing pages in a loop for --seconds: pages per second and
the server's CPU-seconds per page, its whole process tree). The issue's target: the page
at least 2x faster than Dovecot's. Writes benchmarks/results/jmap.json. Needs root and
dovecot-core, dovecot-imapd.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

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


class JmapPage:
    """One keep-alive HTTP connection doing the page request."""

    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
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
        self.conn.request("GET", path, headers=self.headers)
        response = self.conn.getresponse()
        data = response.read()
        if response.status != 200:
            raise RuntimeError(f"GET {path}: {response.status} {data[:200]!r}")
        found: dict[str, object] = json.loads(data)
        return found

    def _post(self, body: object) -> dict[str, object]:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.conn.request("POST", "/jmap/api", body=raw, headers=self.headers)
        response = self.conn.getresponse()
        data = response.read()
        if response.status != 200:
            raise RuntimeError(f"POST: {response.status} {data[:200]!r}")
        found: dict[str, object] = json.loads(data)
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
    walls, cpus = [], []
    for _ in range(p.repeat):
        cpu = peers.tree_cpu_seconds(side.root)
        start = time.perf_counter()
        one.page()
        walls.append(time.perf_counter() - start)
        cpus.append(peers.tree_cpu_seconds(side.root) - cpu)
    cells = {"page": {"seconds": statistics.median(walls), "cpu": statistics.median(cpus)}}
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--quick", action="store_true", help="10,000 messages, 3 s")
    parser.add_argument("--maildir", type=Path, help="keep the generated messages here")
    parser.add_argument("--out", default=str(HERE / "results" / "jmap.json"))
    p = parser.parse_args()
    if p.quick:
        p.messages, p.seconds = 10_000, 3.0
    why = dovecot_unavailable()
    if why:
        print(f"jmap_bench: {why}", file=sys.stderr)
        return 2
    results: dict[str, dict[str, dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="jmap-bench-") as tmp:
        maildir = p.maildir or Path(tmp) / "Maildir"
        stamp = maildir / f".generated-{p.messages}-0"
        if not stamp.exists():
            if maildir.exists():
                shutil.rmtree(maildir)
            write_maildir(maildir, p.messages, 0)
            stamp.touch()
        with dovecot(maildir) as side:
            results["dovecot"] = measure(side, ImapPage, p)
            print("dovecot", json.dumps(results["dovecot"]), flush=True)
        work = Path(tmp) / "tachymail"
        work.mkdir()
        with tachymail(work, maildir, role="http") as side:
            results["tachymail"] = measure(side, JmapPage, p)
            print("tachymail", json.dumps(results["tachymail"]), flush=True)
    print(table(results, p.clients))
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
